//! Replay in parallel: two threads per store apply the records that store
//! takes part in, in LSN order, one its rows and one its ids, while the
//! caller reads and checks the log. Stores are independent (each holds only
//! the rows and ids it owns), and within a store the rows and the ids
//! change independently, so this is the same as applying every record to
//! each store in turn.
//!
//! A store's thread gets the records' bytes, back to back in one buffer,
//! and decodes them itself: the decoded records are then made, used and
//! freed on one core. (Handing over decoded records, each in its own
//! allocation made on the reading thread, cost a cache miss per record to
//! reach it and cross-thread frees: replay ran at ~0.3 M records/s.)
//! It takes them 32 at a time: decodes the chunk, asks for the cache lines
//! of all its rows (or ids) at once, then applies it, so that the misses
//! of a chunk are waited for together (docs/architecture.md, replay).

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam::channel::{bounded, Receiver, Sender};

use crate::state::{LogRecord, Mutation, Store, PREFETCH_KEYS};

/// Records handed to a store's thread at once.
const BATCH_RECORDS: usize = 1024;
/// Batches that may wait for a store's thread (bounds replay's memory).
const QUEUED_BATCHES: usize = 8;

/// Records for one store's thread: their payloads back to back, and for
/// each its (lsn, ts_ms, payload length).
#[derive(Default)]
struct Batch {
    bytes: Vec<u8>,
    records: Vec<(u64, u64, u32)>,
}

impl Batch {
    fn with_capacity() -> Batch {
        Batch { bytes: Vec::with_capacity(BATCH_RECORDS * 64), records: Vec::with_capacity(BATCH_RECORDS) }
    }
}

/// The stores of one layout, each on two threads.
pub struct Appliers {
    /// Per store: the rows thread's queue and the ids thread's.
    senders: Vec<[Sender<Arc<Batch>>; 2]>,
    threads: Vec<[JoinHandle<Store>; 2]>,
    batches: Vec<Batch>,
}

fn replay_thread(name: String, rx: Receiver<Arc<Batch>>, mut store: Store, rows: bool) -> JoinHandle<Store> {
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            let mut decoded: Vec<(u64, u64, Mutation)> = Vec::with_capacity(PREFETCH_KEYS);
            for batch in rx {
                let mut at = 0;
                for chunk in batch.records.chunks(PREFETCH_KEYS) {
                    for &(lsn, ts_ms, len) in chunk {
                        let payload = &batch.bytes[at..at + len as usize];
                        at += len as usize;
                        match LogRecord::decode(payload) {
                            Ok(LogRecord::Mutation(m)) => decoded.push((lsn, ts_ms, m)),
                            other => {
                                panic!("invariant: replay hands its stores mutations it decoded ({other:?})")
                            }
                        }
                    }
                    // The rows (or ids) of a chunk of records are looked up at once.
                    if rows {
                        store.prefetch_rows(decoded.iter().map(|(_, _, m)| m));
                    } else {
                        store.prefetch_ids(decoded.iter().map(|(_, _, m)| m));
                    }
                    for (lsn, ts_ms, m) in decoded.drain(..) {
                        if rows {
                            store.apply_replayed_rows(lsn, &m);
                        } else {
                            store.apply_replayed_ids(lsn, ts_ms, m);
                        }
                    }
                }
            }
            store
        })
        .expect("a replay thread starts")
}

impl Appliers {
    pub fn start(stores: Vec<Store>) -> Appliers {
        let (mut senders, mut threads) = (Vec::new(), Vec::new());
        for (i, mut ids) in stores.into_iter().enumerate() {
            let rows = ids.split_rows();
            let (rows_tx, rows_rx) = bounded::<Arc<Batch>>(QUEUED_BATCHES);
            let (ids_tx, ids_rx) = bounded::<Arc<Batch>>(QUEUED_BATCHES);
            threads.push([
                replay_thread(format!("stockd-replay-{i}r"), rows_rx, rows, true),
                replay_thread(format!("stockd-replay-{i}i"), ids_rx, ids, false),
            ]);
            senders.push([rows_tx, ids_tx]);
        }
        let batches = (0..senders.len()).map(|_| Batch::with_capacity()).collect();
        Appliers { senders, threads, batches }
    }

    pub fn len(&self) -> usize {
        self.senders.len()
    }

    pub fn is_empty(&self) -> bool {
        self.senders.is_empty()
    }

    /// Queues a record (a mutation's payload, already decoded once by the
    /// caller) for the stores whose bit is set in `participants`.
    pub fn push(&mut self, participants: u64, lsn: u64, ts_ms: u64, payload: &[u8]) {
        for i in 0..self.senders.len() {
            if participants & (1 << i) == 0 {
                continue;
            }
            let b = &mut self.batches[i];
            b.bytes.extend_from_slice(payload);
            b.records.push((lsn, ts_ms, payload.len() as u32));
            if b.records.len() == BATCH_RECORDS {
                let full = std::mem::replace(b, Batch::with_capacity());
                self.send(i, full);
            }
        }
    }

    fn send(&self, i: usize, batch: Batch) {
        let batch = Arc::new(batch);
        if self.senders[i].iter().any(|tx| tx.send(batch.clone()).is_err()) {
            // The thread is gone: it panicked on an invariant. Say so where it is joined.
        }
    }

    /// Waits until every queued record is applied; the stores back.
    pub fn finish(mut self) -> Vec<Store> {
        for (i, batch) in std::mem::take(&mut self.batches).into_iter().enumerate() {
            if !batch.records.is_empty() {
                self.send(i, batch);
            }
        }
        drop(self.senders);
        self.threads
            .into_iter()
            .map(|[rows, ids]| {
                let join =
                    |t: JoinHandle<Store>| t.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                let (rows, mut ids) = (join(rows), join(ids));
                ids.join_rows(rows);
                ids
            })
            .collect()
    }
}
