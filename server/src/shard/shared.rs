//! What all shard threads share: their mailboxes, their counters, the log
//! writer's handle, the stop flag and the snapshot channel; and STATS, the
//! counters summed over shards.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use crossbeam::queue::ArrayQueue;

use stockd_persistence::wal::Wal;
use stockd_sinks::SinkStatus;

use super::mailbox::{Mailbox, WalToken};

/// Counters of one shard, written by its thread, read by STATS from any thread.
///
/// Aligned to 128 bytes, so that no two shards' counters share a cache
/// line (or the pair of lines Intel's spatial prefetcher fetches
/// together). 13 counters are 104 bytes: packed in a `Vec`, each shard's
/// counters shared lines with its neighbours', and a shard writes some of
/// them for every order it coordinates (`txns_open` twice, an outcome)
/// and every read (`queries`, `keys_read`). On 16 cores, 8 shards, 1-line
/// orders: 1.08x the orders/s (docs/benchmarks.md, *Sixteen cores, sixth
/// session*).
#[derive(Default)]
#[repr(align(128))]
pub struct ShardStats {
    pub connections: AtomicU64,
    pub queries: AtomicU64,
    pub keys_read: AtomicU64,
    pub forwarded: AtomicU64,
    pub mutations_ok: AtomicU64,
    pub refused_insufficient: AtomicU64,
    pub duplicates: AtomicU64,
    pub errors: AtomicU64,
    pub overloaded: AtomicU64,
    pub holds_expired: AtomicU64,
    pub rows: AtomicU64,
    pub ids: AtomicU64,
    pub txns_open: AtomicU64,
}

/// A piece of one shard's part of a snapshot set, in order (the snapshot
/// thread writes it to that part's file as it comes).
pub struct SnapshotPart {
    pub lsn: u64,
    pub shard: usize,
    pub bytes: Vec<u8>,
    /// The part's last piece: its file can be finished.
    pub last: bool,
    /// When the shard began its part (its mark arrived).
    pub began: std::time::Instant,
}

/// Most bytes of one shard's snapshot handed over and not yet written: the
/// shard writes no more of it until the snapshot thread has caught up.
/// Without the bound, a disk slower than the shard let the pieces (so,
/// much of the snapshot) pile up in memory.
pub const SNAPSHOT_QUEUED_BYTES: usize = 16 << 20;

/// One shard's snapshot pieces on their way to the snapshot thread.
pub struct SnapshotQueue {
    /// Bytes handed over and not yet written.
    pub queued: AtomicUsize,
    /// Buffers of written pieces, back to be filled again while the
    /// snapshot lasts (pages already in memory, not fresh ones to fault in).
    pub spares: ArrayQueue<Vec<u8>>,
}

impl Default for SnapshotQueue {
    fn default() -> Self {
        SnapshotQueue { queued: AtomicUsize::new(0), spares: ArrayQueue::new(4) }
    }
}

/// Everything the shard threads share.
pub struct Shared {
    pub mailboxes: Arc<Vec<Mailbox>>,
    pub stats: Arc<Vec<ShardStats>>,
    /// The sinks the log streams to.
    pub sinks: Vec<Arc<SinkStatus>>,
    pub wal: Wal<WalToken>,
    pub stop: AtomicBool,
    pub snapshots: crossbeam::channel::Sender<SnapshotPart>,
    /// Per shard: its snapshot pieces in flight (see [`SnapshotQueue`]).
    pub snapshot_queues: Arc<Vec<SnapshotQueue>>,
    /// Client connections open at once, over all shards.
    pub max_connections: usize,
    /// The role of a replicating server (none: not replicating).
    pub replica: Option<Arc<crate::replication::Replica>>,
}

impl Shared {
    pub fn shards(&self) -> usize {
        self.mailboxes.len()
    }

    /// Client connections open now, over all shards.
    pub fn connections(&self) -> usize {
        self.stats.iter().map(|s| s.connections.load(Relaxed) as usize).sum()
    }

    /// Counters summed over shards, plus the log writer's.
    pub fn collect_stats(&self) -> Vec<(String, u64)> {
        let sum =
            |f: fn(&ShardStats) -> &AtomicU64| self.stats.iter().map(|s| f(s).load(Relaxed)).sum::<u64>();
        let mut out: Vec<(String, u64)> = vec![
            ("shards".into(), self.shards() as u64),
            ("connections".into(), sum(|s| &s.connections)),
            ("queries".into(), sum(|s| &s.queries)),
            ("keys_read".into(), sum(|s| &s.keys_read)),
            ("forwarded".into(), sum(|s| &s.forwarded)),
            ("mutations_ok".into(), sum(|s| &s.mutations_ok)),
            ("refused_insufficient".into(), sum(|s| &s.refused_insufficient)),
            ("duplicates".into(), sum(|s| &s.duplicates)),
            ("errors".into(), sum(|s| &s.errors)),
            ("overloaded".into(), sum(|s| &s.overloaded)),
            ("holds_expired".into(), sum(|s| &s.holds_expired)),
            ("rows".into(), sum(|s| &s.rows)),
            ("ids".into(), sum(|s| &s.ids)),
            ("mutations_in_flight".into(), sum(|s| &s.txns_open)),
        ];
        let w = &self.wal.stats;
        out.push(("wal_records".into(), w.records.load(Relaxed)));
        out.push(("wal_fsyncs".into(), w.fsyncs.load(Relaxed)));
        out.push(("wal_bytes".into(), w.bytes.load(Relaxed)));
        out.push(("wal_sync_micros".into(), w.sync_micros.load(Relaxed)));
        out.push(("wal_stalled".into(), u64::from(w.stalled.load(Relaxed))));
        if let Some(r) = &self.replica {
            out.push(("replication_role".into(), r.role() as u64));
            out.push(("replication_epoch".into(), r.following()));
        }
        for s in &self.sinks {
            let name = s.name;
            out.push((format!("sink_{name}_cursor"), s.cursor.load(Relaxed)));
            out.push((format!("sink_{name}_lag_records"), s.lag_records()));
            out.push((format!("sink_{name}_lag_bytes"), s.lag_bytes()));
            out.push((format!("sink_{name}_delivered"), s.delivered.load(Relaxed)));
            out.push((format!("sink_{name}_resyncs"), s.resyncs.load(Relaxed)));
            out.push((format!("sink_{name}_errors"), s.errors.load(Relaxed)));
            out.push((format!("sink_{name}_connected"), s.connected.load(Relaxed) as u64));
            // Bucket bounds: the quantile is at most this many ms (0: nothing delivered yet).
            for (q, label) in [(0.5, "p50"), (0.99, "p99")] {
                let bound = s.delivery_ms.quantile_bound(q).unwrap_or(0);
                out.push((format!("sink_{name}_delivery_{label}_ms_at_most"), bound));
            }
        }
        out
    }
}
