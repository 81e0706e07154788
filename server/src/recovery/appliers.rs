//! Replay in parallel: one thread per store applies the records that store
//! takes part in, in LSN order, while the caller reads and decodes the log.
//! Stores are independent (each holds only the rows and ids it owns), so
//! this is the same as applying every record to each store in turn.

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam::channel::{bounded, Sender};

use crate::state::{Mutation, Store};

/// Records handed to a store's thread at once.
const BATCH_RECORDS: usize = 1024;
/// Batches that may wait for a store's thread (bounds replay's memory).
const QUEUED_BATCHES: usize = 8;

/// (lsn, ts_ms, the mutation).
type Job = (u64, u64, Arc<Mutation>);

/// The stores of one layout, each on its own thread.
pub struct Appliers {
    senders: Vec<Sender<Vec<Job>>>,
    threads: Vec<JoinHandle<Store>>,
    batches: Vec<Vec<Job>>,
}

impl Appliers {
    pub fn start(stores: Vec<Store>) -> Appliers {
        let (mut senders, mut threads) = (Vec::new(), Vec::new());
        for (i, mut store) in stores.into_iter().enumerate() {
            let (tx, rx) = bounded::<Vec<Job>>(QUEUED_BATCHES);
            let thread = std::thread::Builder::new()
                .name(format!("stockd-replay-{i}"))
                .spawn(move || {
                    for batch in rx {
                        for (lsn, ts_ms, m) in batch {
                            store.apply(None, lsn, ts_ms, &m);
                        }
                    }
                    store
                })
                .expect("a replay thread starts");
            senders.push(tx);
            threads.push(thread);
        }
        let batches = (0..senders.len()).map(|_| Vec::with_capacity(BATCH_RECORDS)).collect();
        Appliers { senders, threads, batches }
    }

    pub fn len(&self) -> usize {
        self.senders.len()
    }

    pub fn is_empty(&self) -> bool {
        self.senders.is_empty()
    }

    /// Queues a record for the stores whose bit is set in `participants`.
    pub fn push(&mut self, participants: u64, lsn: u64, ts_ms: u64, m: Arc<Mutation>) {
        for i in 0..self.senders.len() {
            if participants & (1 << i) == 0 {
                continue;
            }
            self.batches[i].push((lsn, ts_ms, m.clone()));
            if self.batches[i].len() == BATCH_RECORDS {
                let full = std::mem::replace(&mut self.batches[i], Vec::with_capacity(BATCH_RECORDS));
                self.send(i, full);
            }
        }
    }

    fn send(&self, i: usize, batch: Vec<Job>) {
        if self.senders[i].send(batch).is_err() {
            // The thread is gone: it panicked on an invariant. Say so where it is joined.
        }
    }

    /// Waits until every queued record is applied; the stores back.
    pub fn finish(mut self) -> Vec<Store> {
        for (i, batch) in std::mem::take(&mut self.batches).into_iter().enumerate() {
            if !batch.is_empty() {
                self.send(i, batch);
            }
        }
        drop(self.senders);
        self.threads
            .into_iter()
            .map(|t| t.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
            .collect()
    }
}
