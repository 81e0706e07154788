//! The queues other threads use to reach a shard, and what travels in them.
//!
//! `requests` (bounded: client requests forwarded by other shards'
//! connections; full means OVERLOADED) and `internal` (two-phase commit
//! votes, aborts, commits and snapshot marks; its length is bounded by the
//! transaction cap of every shard, not by the queue).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use crossbeam::queue::{ArrayQueue, SegQueue};
use stockd_persistence::wal::SubmitError;
use stockd_protocol::{Key, Response};
use tokio::sync::Notify;

use super::passed::Passed;
use crate::state::{Command, Refusal};

/// Client requests other shards may queue for this one.
pub const FORWARD_CAPACITY: usize = 8_192;

/// What a connection receives from shards.
pub enum Out {
    /// A response to request `request_id` (opcode `op`).
    Response { op: u8, request_id: u64, resp: Response },
    /// Part of a cross-shard `QUERY_BATCH`: values for these positions.
    BatchPart { request_id: u64, positions: Vec<u16>, values: Vec<u64> },
}

/// A connection's answers from shards, its own and others, waiting for it
/// to write them. Two queues take turns (`take_all` swaps the caller's
/// empty one in), so answers cost no allocation once both have grown: a
/// channel of linked blocks allocated a block of 32 answers per pass, and
/// glibc merges its small free chunks before every allocation of 1 KiB or
/// more, after which it hands them out oldest first, out of cache.
#[derive(Default)]
pub struct Outbox {
    queue: Mutex<VecDeque<Out>>,
    ready: Notify,
}

impl Outbox {
    /// Queues an answer and wakes the connection. One whose connection is
    /// gone is dropped with the outbox, once nothing refers to it.
    pub fn send(&self, out: Out) {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).push_back(out);
        self.ready.notify_one();
    }

    /// Moves every queued answer into `into`, which must be empty.
    pub fn take_all(&self, into: &mut VecDeque<Out>) {
        debug_assert!(into.is_empty());
        std::mem::swap(&mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()), into);
    }

    /// Completes once an answer was queued after the last call completed
    /// (at once if one was queued in between).
    pub async fn ready(&self) {
        self.ready.notified().await
    }
}

/// Where an answer goes: a connection's outbox (None for internal work such as hold expiry).
pub type ReplyTo = Option<Arc<Outbox>>;

/// A client request handed to the shard that owns it.
pub enum Forwarded {
    Query { request_id: u64, key: Key, reply: ReplyTo },
    QueryItem { request_id: u64, item: u64, reply: ReplyTo },
    QueryBatch { request_id: u64, positions: Vec<u16>, keys: Vec<Key>, reply: ReplyTo },
    Command { op: u8, request_id: u64, cmd: Command, reply: ReplyTo },
}

impl Forwarded {
    /// Sets where the answer goes.
    pub fn reply_to(mut self, to: Arc<Outbox>) -> Forwarded {
        match &mut self {
            Forwarded::Query { reply, .. }
            | Forwarded::QueryItem { reply, .. }
            | Forwarded::QueryBatch { reply, .. }
            | Forwarded::Command { reply, .. } => *reply = Some(to),
        }
        self
    }
}

/// Messages between shards and from the log writer.
pub enum Internal {
    /// Check and reserve this shard's lines of `m` for `txn`; vote to `coord`.
    /// With `log_if_ready` (the mutation's participants), this shard is the
    /// last one undecided, every other one is ready: if its lines are ready
    /// too it logs the record itself instead of voting (a refusal is still a
    /// vote), and the coordinator next hears of it when it is durable.
    Prepare { txn: u64, coord: usize, m: Passed, log_if_ready: Option<u64> },
    /// A participant's answer to `Prepare`.
    Vote { txn: u64, from: usize, result: Result<(), Refusal> },
    /// A participant that was to log `txn` found the log writer full or
    /// stopped; it dropped its reservation.
    NotLogged { txn: u64, error: SubmitError },
    /// Drop what `Prepare` reserved for `txn`, whose mutation is `m` (the
    /// room its lines here reserved).
    Abort { txn: u64, m: Passed },
    /// Durable records this shard takes part in, in LSN order: apply them.
    Committed(Vec<Commit>),
    /// Durable records this shard coordinated, already queued on every
    /// participant: answer their clients. (txn, lsn)
    Answer(Vec<(u64, u64)>),
    /// Serialize the store: every record up to `lsn` has been applied before this mark.
    Snapshot { lsn: u64 },
    /// Logged records this shard coordinated that the replication topic will
    /// never confirm (another node became the primary): drop what they
    /// reserved and answer NOT_PRIMARY with `message`.
    Fenced { txns: Vec<u64>, message: Arc<str> },
}

/// A durable record for one shard to apply.
pub struct Commit {
    /// The mutation's transaction on this server; none for a record of the
    /// primary's history that a standby applies (nothing was prepared here).
    pub txn: Option<u64>,
    pub lsn: u64,
    pub ts_ms: u64,
    pub m: Passed,
}

/// What the log writer hands back with each record.
pub enum WalToken {
    /// A mutation this server coordinates: applied, then answered.
    Own {
        txn: u64,
        coord: usize,
        /// Bit i: shard i owns a line of the mutation.
        participants: u64,
        m: Passed,
    },
    /// A record of the primary's history that this standby logs and applies
    /// (replication, docs/ha.md); `None`: a layout record, nothing to apply.
    Replicated(Option<Passed>),
}

pub struct Mailbox {
    requests: ArrayQueue<Forwarded>,
    internal: SegQueue<Internal>,
    pub notify: Notify,
}

impl Mailbox {
    pub fn new() -> Mailbox {
        Mailbox {
            requests: ArrayQueue::new(FORWARD_CAPACITY),
            internal: SegQueue::new(),
            notify: Notify::new(),
        }
    }

    /// Queues a message and wakes the shard.
    pub fn push_internal(&self, m: Internal) {
        self.internal.push(m);
        self.notify.notify_one();
    }

    /// Queues a message without waking the shard (the caller wakes it later).
    pub fn queue_internal(&self, m: Internal) {
        self.internal.push(m);
    }

    /// Hands over a client request; gives it back if the queue is full.
    pub fn push_request(&self, f: Forwarded) -> Result<(), Forwarded> {
        self.requests.push(f)?;
        self.notify.notify_one();
        Ok(())
    }

    /// Messages waiting now: (forwarded requests, internal messages).
    pub fn depths(&self) -> (usize, usize) {
        (self.requests.len(), self.internal.len())
    }

    pub fn pop_internal(&self) -> Option<Internal> {
        self.internal.pop()
    }

    pub fn pop_request(&self) -> Option<Forwarded> {
        self.requests.pop()
    }
}

impl Default for Mailbox {
    fn default() -> Self {
        Mailbox::new()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use stockd_protocol::{opcode, Reply};

    use super::*;

    fn pong(request_id: u64) -> Out {
        Out::Response { op: opcode::PING, request_id, resp: Response::Ok(Reply::Pong) }
    }

    fn ids(taken: &mut VecDeque<Out>) -> Vec<u64> {
        taken
            .drain(..)
            .map(|o| match o {
                Out::Response { request_id, .. } => request_id,
                Out::BatchPart { .. } => unreachable!(),
            })
            .collect()
    }

    /// Answers come out in the order they were sent, a wait ends for an
    /// answer sent before it began or while it lasts (from another thread),
    /// and the two queues take turns without losing one.
    #[test]
    fn an_outbox_keeps_the_order_and_wakes_its_connection() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let outbox = Arc::new(Outbox::default());
        let mut taken = VecDeque::new();
        let wait = |o: &Arc<Outbox>| {
            let o = o.clone();
            rt.block_on(async move { tokio::time::timeout(Duration::from_secs(10), o.ready()).await })
        };
        outbox.send(pong(1));
        outbox.send(pong(2));
        wait(&outbox).expect("an answer sent before the wait ends it");
        outbox.take_all(&mut taken);
        assert_eq!(ids(&mut taken), [1, 2]);
        let sender = outbox.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            for id in 3..=5 {
                sender.send(pong(id));
            }
        });
        wait(&outbox).expect("an answer from another thread ends the wait");
        t.join().unwrap();
        outbox.take_all(&mut taken);
        assert_eq!(ids(&mut taken), [3, 4, 5]);
        outbox.take_all(&mut taken);
        assert!(taken.is_empty(), "nothing is handed out twice");
    }
}
