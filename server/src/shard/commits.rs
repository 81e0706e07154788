//! The log writer's commit callback: durable records go to the shards that
//! apply them, then to the coordinators that answer; and the policy that
//! decides when the shards take a snapshot.

use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stockd_persistence::wal::Committed;
use stockd_protocol::shard_of;

use super::mailbox::{Commit, Internal, Mailbox, WalToken};
use super::shared::ShardStats;

/// Routes one group commit. Every shard that owns a line or the id of a
/// record gets it to apply, in LSN order. Only after every shard's list is
/// queued do coordinators get the word to answer, so by the time a client
/// sees an acknowledgement every shard already holds the record, and a
/// shard drains its queue before serving a read: a client never reads state
/// older than what it was told is durable.
pub fn route_commits(
    mailboxes: &[Mailbox],
    batch: Vec<Committed<WalToken>>,
    snapshot_due: impl FnOnce(u64) -> bool,
) {
    let n = mailboxes.len();
    let mut applies: Vec<Vec<Commit>> = (0..n).map(|_| Vec::new()).collect();
    let mut answers: Vec<Vec<(u64, u64)>> = (0..n).map(|_| Vec::new()).collect();
    let last_lsn = batch.last().map_or(0, |c| c.lsn);
    for c in batch {
        let (txn, involved, m) = match c.token {
            WalToken::Own { txn, coord, participants, m } => {
                answers[coord].push((txn, c.lsn));
                (Some(txn), participants | 1 << coord, m)
            }
            WalToken::Replicated(Some(m)) => {
                let owners = m.lines.iter().fold(0u64, |acc, l| acc | 1 << shard_of(l.key.item, n));
                (None, owners | 1 << shard_of(m.owner_id(), n), m)
            }
            WalToken::Replicated(None) => continue,
        };
        // A copy for each involved shard but the last, which takes the original.
        let last = (u64::BITS - 1 - involved.leading_zeros()) as usize;
        let commit = |m| Commit { txn, lsn: c.lsn, ts_ms: c.ts_ms, m };
        for (i, list) in applies.iter_mut().enumerate().take(last) {
            if involved & (1 << i) != 0 {
                list.push(commit(m.clone()));
            }
        }
        applies[last].push(commit(m));
    }
    // Shards that got something: only they are woken (a group commit of
    // few records involves few of many shards).
    let mut queued = 0u64;
    for (i, (mb, list)) in mailboxes.iter().zip(applies).enumerate() {
        if !list.is_empty() {
            mb.queue_internal(Internal::Committed(list));
            queued |= 1 << i;
        }
    }
    for (i, (mb, list)) in mailboxes.iter().zip(answers).enumerate() {
        if !list.is_empty() {
            mb.queue_internal(Internal::Answer(list));
            queued |= 1 << i;
        }
    }
    if snapshot_due(last_lsn) {
        for mb in mailboxes {
            mb.queue_internal(Internal::Snapshot { lsn: last_lsn });
        }
        queued = u64::MAX;
    }
    for (i, mb) in mailboxes.iter().enumerate() {
        if queued & (1 << i) != 0 {
            mb.notify.notify_one();
        }
    }
}

/// Routes group commits with the snapshot policy: from the log writer's
/// callback, or, on a replicating server, from the replication reader.
pub struct Router {
    pub mailboxes: Arc<Vec<Mailbox>>,
    pub policy: SnapshotPolicy,
}

impl Router {
    pub fn route(&mut self, batch: Vec<Committed<WalToken>>) {
        let policy = &mut self.policy;
        route_commits(&self.mailboxes, batch, |lsn| policy.due(lsn));
    }
}

/// Logged records that will never be confirmed (this server is no longer
/// the primary): their coordinators release what they reserved and answer
/// NOT_PRIMARY. Nothing is applied.
pub fn fence_commits(mailboxes: &[Mailbox], batch: Vec<Committed<WalToken>>, message: &Arc<str>) {
    let mut txns: Vec<Vec<u64>> = (0..mailboxes.len()).map(|_| Vec::new()).collect();
    for c in batch {
        if let WalToken::Own { txn, coord, .. } = c.token {
            txns[coord].push(txn);
        }
    }
    for (mb, txns) in mailboxes.iter().zip(txns) {
        if !txns.is_empty() {
            mb.push_internal(Internal::Fenced { txns, message: message.clone() });
        }
    }
}

/// When to take a snapshot. A snapshot costs about the size of the state,
/// so take one only once the log has grown by half of that (and by at least
/// `min_records`); or after `interval`, by an eighth: snapshot work stays
/// proportional to the records written, and replay after a crash stays
/// shorter than about one snapshot's worth. Never while the last one is
/// still being written (`in_flight`, cleared by the snapshot thread): a
/// mark that found a shard still writing would make it finish at once.
pub struct SnapshotPolicy {
    pub interval: Duration,
    pub min_records: u64,
    last_at: Instant,
    last_lsn: u64,
    stats: Arc<Vec<ShardStats>>,
    in_flight: Arc<AtomicBool>,
}

impl SnapshotPolicy {
    pub fn new(
        interval: Duration,
        min_records: u64,
        last_lsn: u64,
        stats: Arc<Vec<ShardStats>>,
        in_flight: Arc<AtomicBool>,
    ) -> Self {
        SnapshotPolicy { interval, min_records, last_at: Instant::now(), last_lsn, stats, in_flight }
    }

    /// True if the shards should snapshot at `lsn`, the last record of a group commit.
    pub fn due(&mut self, lsn: u64) -> bool {
        if self.in_flight.load(Acquire) {
            return false;
        }
        let state: u64 = self.stats.iter().map(|s| s.rows.load(Relaxed) + s.ids.load(Relaxed)).sum();
        let grown = lsn.saturating_sub(self.last_lsn);
        let due = grown >= self.min_records.max(state / 2)
            || (grown > 0 && self.last_at.elapsed() >= self.interval && grown >= state / 8);
        if due {
            (self.last_at, self.last_lsn) = (Instant::now(), lsn);
            self.in_flight.store(true, Release);
            tracing::info!(
                lsn,
                state,
                "snapshot begins (written in paced turns; a line follows when it is done)"
            );
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_is_due_by_the_log_grown_and_never_while_the_last_is_written() {
        let stats: Arc<Vec<ShardStats>> = Arc::new(vec![ShardStats::default()]);
        stats[0].rows.store(1_200, Relaxed);
        stats[0].ids.store(800, Relaxed); // state 2,000: due after 1,000 records
        let in_flight = Arc::new(AtomicBool::new(false));
        let mut policy = SnapshotPolicy::new(Duration::from_secs(3600), 100, 0, stats, in_flight.clone());
        assert!(!policy.due(999), "the log grew by less than half the state");
        assert!(policy.due(1_000));
        assert!(in_flight.load(Acquire), "marked: in flight until the snapshot thread is done");
        assert!(!policy.due(50_000), "no mark while the last set is still being written");
        in_flight.store(false, Release);
        assert!(!policy.due(1_999), "counted from the last mark, at 1,000");
        assert!(policy.due(2_000));
    }
}
