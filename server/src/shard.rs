//! One shard: its [`Store`], the mutations it coordinates, and the messages
//! it takes from other threads.
//!
//! A shard is touched only by its own thread. Other threads reach it through
//! its [`Mailbox`]. A mutation is coordinated by the shard that owns its id:
//! plan -> prepare on every shard owning a line (votes) -> one log record ->
//! after fdatasync the log writer hands the record to every involved shard,
//! then tells the coordinator to answer -> each applies -> the coordinator
//! answers.
//!
//! Files: this one (the shard, its mailbox loop and reads), [`mailbox`]
//! (queues and messages), [`shared`] (state all shards share, STATS),
//! [`coordinator`] (two-phase commit), [`commits`] (routing durable records,
//! snapshot policy), [`answers`] (domain answers as wire responses),
//! [`passed`] (a mutation as it passes between threads), [`txns`] (the
//! mutations a shard coordinates, by number).

use std::collections::{HashSet, VecDeque};
use std::rc::Rc;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use stockd_persistence::wal;
use stockd_protocol::{opcode, Key, Reply, Response};
use tokio::sync::Notify;

pub mod answers;
pub mod commits;
pub mod coordinator;
pub mod mailbox;
pub mod passed;
pub mod shared;
pub mod txns;

pub use coordinator::{CONTENDED_RETRY_FOR, MAX_TXNS};
pub use mailbox::{Forwarded, Internal, Mailbox, Out, Outbox, ReplyTo, FORWARD_CAPACITY};
pub use shared::{ShardStats, Shared, SnapshotPart, SnapshotQueue, SNAPSHOT_QUEUED_BYTES};

use crate::state::{IdHashBuilder, IdKey, SnapshotPiece, Store, PREFETCH_KEYS};
use crate::throttled::{Throttled, WARN_EVERY};
use answers::respond;
use coordinator::Txn;
use mailbox::WalToken;
use txns::Txns;

/// Most shards: a mutation's participants are a 64-bit mask.
pub const MAX_SHARDS: usize = 64;
/// Forwarded requests one drain serves before connections get a turn.
const DRAIN_BUDGET: usize = 1024;
/// Internal messages taken from the queue at a time (see
/// [`Shard::drain_internal`]).
const INTERNAL_RUN: usize = PREFETCH_KEYS;

pub struct Shard {
    index: usize,
    shared: Arc<Shared>,
    store: Store,
    txns: Txns<Txn>,
    /// Ids with a mutation in flight.
    busy_ids: HashSet<IdKey, IdHashBuilder>,
    /// Mutations refused only because undecided ones reserved the units:
    /// prepared again after a short pause (see [`Shard::retry_contended`]).
    retries: Vec<u64>,
    retry_wake: Rc<Notify>,
    /// Woken when a snapshot begins.
    snapshot_wake: Rc<Notify>,
    /// When the snapshot in progress began (its mark arrived).
    snapshot_began: Option<Instant>,
    /// Records of this pass for the log writer (see [`Shard::flush_log`]).
    to_log: wal::Batch<WalToken>,
    /// Woken when the first record of a pass is queued.
    log_wake: Rc<Notify>,
    /// Internal messages taken from the mailbox and not yet handled (see
    /// [`Shard::drain_internal`]), its room kept.
    internal_run: VecDeque<Internal>,
    /// The warning that new ids are refused because the id table is full.
    table_full: Throttled,
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn send(reply: &ReplyTo, out: Out) {
    if let Some(outbox) = reply {
        // The connection may be gone; its client will retry by id.
        outbox.send(out);
    }
}

impl Shard {
    pub fn new(index: usize, shared: Arc<Shared>, store: Store) -> Shard {
        let stats = &shared.stats[index];
        stats.rows.store(store.row_count() as u64, Relaxed);
        stats.ids.store(store.id_count() as u64, Relaxed);
        Shard {
            index,
            shared,
            store,
            txns: Txns::new(index, MAX_TXNS),
            busy_ids: HashSet::default(),
            retries: Vec::new(),
            retry_wake: Rc::new(Notify::new()),
            snapshot_wake: Rc::new(Notify::new()),
            snapshot_began: None,
            to_log: wal::Batch::default(),
            log_wake: Rc::new(Notify::new()),
            internal_run: VecDeque::with_capacity(INTERNAL_RUN),
            table_full: Throttled::new(WARN_EVERY),
        }
    }

    pub fn index(&self) -> usize {
        self.index
    }

    pub fn shards(&self) -> usize {
        self.shared.shards()
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub fn stats(&self) -> &ShardStats {
        &self.shared.stats[self.index]
    }

    /// Woken when a contended mutation should be prepared again.
    pub fn retry_wake(&self) -> Rc<Notify> {
        self.retry_wake.clone()
    }

    /// Woken when a snapshot begins: the event loop writes it in turns.
    pub fn snapshot_wake(&self) -> Rc<Notify> {
        self.snapshot_wake.clone()
    }

    /// Woken when a pass of the event loop queues its first record for
    /// the log writer: [`Shard::flush_log`] once the pass is over.
    pub fn log_wake(&self) -> Rc<Notify> {
        self.log_wake.clone()
    }

    fn mailbox(&self, i: usize) -> &Mailbox {
        &self.shared.mailboxes[i]
    }

    /// Hands a client request to shard `owner`; gives it back if its queue is full.
    pub fn forward(&self, owner: usize, f: Forwarded) -> Result<(), Forwarded> {
        let result = self.mailbox(owner).push_request(f);
        let counter = if result.is_ok() { &self.stats().forwarded } else { &self.stats().overloaded };
        counter.fetch_add(1, Relaxed);
        result
    }

    /// Available units of one row this shard owns (everything durable applied first).
    pub fn read_one(&mut self, key: Key) -> u64 {
        self.drain_internal();
        self.count_read(1);
        self.store.available(key)
    }

    /// Available units of rows this shard owns, for a read of `keys`
    /// (everything durable applied first).
    pub fn read(&mut self, keys: &[Key]) -> Vec<u64> {
        let mut values = Vec::with_capacity(keys.len());
        self.read_each(keys, |v| values.push(v));
        values
    }

    /// Like [`Shard::read`], each value handed to `each` in order (a
    /// connection writes them straight into its buffer: no vector).
    pub fn read_each(&mut self, keys: &[Key], each: impl FnMut(u64)) {
        self.drain_internal();
        self.count_read(keys.len());
        self.store.available_each(keys, each)
    }

    /// Every center of an item this shard owns (everything durable applied first).
    pub fn read_item(&mut self, item: u64) -> Vec<(u32, u64)> {
        self.drain_internal();
        self.count_read(1);
        self.store.item(item)
    }

    /// Asks memory for the rows and ids a run of requests will look up
    /// (those this shard owns), all at once. Changes nothing.
    pub fn prefetch_lookups(&self, keys: &[Key], ids: &[IdKey]) {
        self.store.prefetch_lookups(keys, ids);
    }

    fn count_read(&self, keys: usize) {
        let s = self.stats();
        s.queries.fetch_add(1, Relaxed);
        s.keys_read.fetch_add(keys as u64, Relaxed);
    }

    /// Applies everything queued for this shard. Called by the shard's event
    /// loop, and by connections before they answer a read, so that a client
    /// that saw an acknowledgement never reads older state afterwards.
    ///
    /// Returns true if it left forwarded requests beyond its budget; it has
    /// then notified itself, and the caller must yield to the connections
    /// before draining again.
    pub fn drain(&mut self) -> bool {
        self.drain_internal();
        let mut budget = DRAIN_BUDGET;
        while budget > 0 {
            let Some(f) = self.mailbox(self.index).pop_request() else { break };
            self.forwarded(f);
            budget -= 1;
            // Commits that arrive meanwhile go first: they finish work and free memory.
            self.drain_internal();
        }
        if budget == 0 {
            self.mailbox(self.index).notify.notify_one(); // more to do; yield to connections first
        }
        budget == 0
    }

    /// Writes the snapshot in progress, a step at a time, for about `budget`;
    /// true while some of it is left (the event loop pauses, then calls
    /// again: see `event_loop::snapshot_loop`).
    pub fn snapshot_turn(&mut self, budget: Duration) -> bool {
        let start = Instant::now();
        let queues = self.shared.snapshot_queues.clone();
        let queue = &queues[self.index];
        while let Some(spare) = queue.spares.pop() {
            self.store.give_snapshot_buffer(spare);
        }
        while self.store.snapshot_in_progress() {
            if queue.queued.load(Acquire) >= SNAPSHOT_QUEUED_BYTES {
                return true; // the disk is behind: try again after a pause
            }
            if let Some(piece) = self.store.snapshot_step() {
                let last = piece.last;
                self.send_snapshot(piece);
                if last {
                    return false;
                }
            }
            if start.elapsed() >= budget {
                return true;
            }
        }
        false
    }

    fn send_snapshot(&mut self, piece: SnapshotPiece) {
        let SnapshotPiece { lsn, bytes, last } = piece;
        let began = *self.snapshot_began.get_or_insert_with(Instant::now);
        if last {
            self.snapshot_began = None;
        }
        self.shared.snapshot_queues[self.index].queued.fetch_add(bytes.len(), Release);
        let part = SnapshotPart { lsn, shard: self.index, bytes, last, began };
        let _ = self.shared.snapshots.send(part);
    }

    /// Applies queued commits and votes (not forwarded requests), in the
    /// order they came. They are taken a run at a time, and the rows the
    /// run's prepares check are asked for together first: a prepare from
    /// another shard finds rows that no request on this shard brought into
    /// the cache (with 2 shards, `Rows::find` was 117 ns per order when
    /// every order stayed on its shard, 377 when half of them crossed).
    ///
    /// The run is the shard's, not the call's: should handling a message
    /// ever drain again, that call goes on with the same run, and every
    /// message is still handled once, in order.
    pub fn drain_internal(&mut self) {
        loop {
            if self.internal_run.is_empty() {
                let mut lines = 0;
                while self.internal_run.len() < INTERNAL_RUN && lines < PREFETCH_KEYS {
                    let Some(msg) = self.mailbox(self.index).pop_internal() else { break };
                    if let Internal::Prepare { m, .. } = &msg {
                        lines += m.lines.len();
                    }
                    self.internal_run.push_back(msg);
                }
                if self.internal_run.is_empty() {
                    return;
                }
                if lines > 0 {
                    self.store.prefetch_rows(self.internal_run.iter().filter_map(|msg| match msg {
                        Internal::Prepare { m, .. } => Some(&**m),
                        _ => None,
                    }));
                }
            }
            let msg = self.internal_run.pop_front().expect("a run is not empty here");
            self.internal(msg);
        }
    }

    fn forwarded(&mut self, f: Forwarded) {
        match f {
            Forwarded::Query { request_id, key, reply } => {
                let available = self.read_one(key);
                send(&reply, respond(opcode::QUERY, request_id, Response::Ok(Reply::Available(available))));
            }
            Forwarded::QueryItem { request_id, item, reply } => {
                let resp = Response::Ok(Reply::Item(self.read_item(item)));
                send(&reply, respond(opcode::QUERY_ITEM, request_id, resp));
            }
            Forwarded::QueryBatch { request_id, positions, keys, reply } => {
                let values = self.read(&keys);
                send(&reply, Out::BatchPart { request_id, positions, values });
            }
            Forwarded::Command { op, request_id, cmd, reply } => self.start(op, request_id, cmd, reply),
        }
    }

    fn internal(&mut self, msg: Internal) {
        match msg {
            Internal::Prepare { txn, coord, m, log_if_ready } => {
                let result = self.store.prepare(txn, &m);
                match (result, log_if_ready) {
                    (Ok(()), Some(participants)) => self.log(txn, coord, participants, m),
                    (result, _) => {
                        self.mailbox(coord).push_internal(Internal::Vote { txn, from: self.index, result })
                    }
                }
            }
            Internal::Vote { txn, from, result } => self.vote(txn, from, result),
            Internal::NotLogged { txn, error } => self.not_logged(txn, error),
            Internal::Abort { txn, m } => self.store.abort(txn, &m),
            Internal::Committed(list) => {
                let mut rest = &list[..];
                while !rest.is_empty() {
                    // A run whose rows fit one prefetch (three-line orders
                    // come 10 at a time), at least one record.
                    let mut rows = 0;
                    let n = rest
                        .iter()
                        .take(PREFETCH_KEYS)
                        .take_while(|c| {
                            rows += c.m.lines.len();
                            rows <= PREFETCH_KEYS
                        })
                        .count()
                        .max(1);
                    let (chunk, tail) = rest.split_at(n);
                    rest = tail;
                    self.store.prefetch_rows(chunk.iter().map(|c| &*c.m));
                    self.store.prefetch_ids(chunk.iter().map(|c| &*c.m));
                    for c in chunk {
                        self.store.apply(c.txn, c.lsn, c.ts_ms, &c.m);
                    }
                }
                let s = self.stats();
                s.rows.store(self.store.row_count() as u64, Relaxed);
                s.ids.store(self.store.id_count() as u64, Relaxed);
            }
            Internal::Fenced { txns, message } => {
                for txn in txns {
                    self.fence(txn, &message);
                }
            }
            Internal::Answer(list) => {
                for (txn, lsn) in list {
                    self.answer_committed(txn, lsn);
                }
            }
            Internal::Snapshot { lsn } => {
                // Exactly at the mark, written in paced turns (see
                // `Store::snapshot_step`, `event_loop::snapshot_loop`). The
                // policy marks no snapshot while one is in flight; should a
                // mark come anyway, the one still being written is finished first.
                if let Some(last) = self.store.finish_snapshot() {
                    self.send_snapshot(last);
                }
                self.store.begin_snapshot(lsn);
                self.snapshot_began = Some(Instant::now());
                self.snapshot_wake.notify_one();
            }
        }
    }
}

#[cfg(test)]
mod tests;
