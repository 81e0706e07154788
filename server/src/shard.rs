//! One shard: its [`Store`], the mutations it coordinates, and the queues
//! other threads use to reach it.
//!
//! A shard is touched only by its own thread. Other threads reach it through
//! its [`Mailbox`]: `requests` (bounded; client requests forwarded by other
//! shards' connections: full means OVERLOADED) and `internal` (two-phase
//! commit votes, aborts, commits and snapshot marks; its length is bounded by
//! the transaction cap of every shard, not by the queue).
//!
//! A mutation is coordinated by the shard that owns its id:
//! plan -> prepare on every shard owning a line (votes) -> one log record ->
//! after fdatasync the WAL thread hands the record to every involved shard,
//! coordinator last -> each applies -> the coordinator answers.

use std::collections::HashSet;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam::queue::{ArrayQueue, SegQueue};
use stockd_persistence::wal::{Committed, SubmitError, Wal};
use stockd_protocol::{encode_error, opcode, shard_of, Key, Reply, Response, Status};
use tokio::sync::{mpsc, Notify};

use crate::state::{Command, IdHashBuilder, IdMap, Mutation, Refusal, Store};

/// Most shards: a mutation's participants are a 64-bit mask.
pub const MAX_SHARDS: usize = 64;
/// Most mutations one shard coordinates at once; beyond it, OVERLOADED.
pub const MAX_TXNS: usize = 16_384;
/// Client requests other shards may queue for this one.
pub const FORWARD_CAPACITY: usize = 8_192;
/// How long a mutation refused only by contention keeps being prepared again
/// (every ~0.5 ms) before the refusal is returned as it stands. Undecided
/// mutations settle within an fsync or two; this only bounds pathological cases.
pub const CONTENDED_RETRY_FOR: Duration = Duration::from_secs(2);

/// What a connection receives from shards.
pub enum Out {
    /// A complete response frame.
    Frame(Vec<u8>),
    /// Part of a cross-shard `QUERY_BATCH`: values for these positions.
    BatchPart { request_id: u64, positions: Vec<u16>, values: Vec<u64> },
}

/// Where an answer goes: a connection's channel (None for internal work such as hold expiry).
pub type ReplyTo = Option<mpsc::UnboundedSender<Out>>;

/// A client request handed to the shard that owns it.
pub enum Forwarded {
    Query { request_id: u64, key: Key, reply: ReplyTo },
    QueryItem { request_id: u64, item: u64, reply: ReplyTo },
    QueryBatch { request_id: u64, positions: Vec<u16>, keys: Vec<Key>, reply: ReplyTo },
    Command { op: u8, request_id: u64, cmd: Command, reply: ReplyTo },
}

pub enum Internal {
    Prepare {
        txn: u64,
        coord: usize,
        m: Arc<Mutation>,
    },
    Vote {
        txn: u64,
        from: usize,
        result: Result<(), Refusal>,
    },
    Abort {
        txn: u64,
    },
    Committed(Vec<Commit>),
    /// Serialize the store: every record up to `lsn` has been applied before this mark.
    Snapshot {
        lsn: u64,
    },
}

pub struct Commit {
    pub txn: u64,
    pub lsn: u64,
    pub ts_ms: u64,
    pub m: Arc<Mutation>,
    pub coord: usize,
}

/// What the coordinator hands the log with each record.
pub struct WalToken {
    pub txn: u64,
    pub coord: usize,
    /// Bit i: shard i owns a line of the mutation.
    pub participants: u64,
    pub m: Arc<Mutation>,
}

pub struct Mailbox {
    pub requests: ArrayQueue<Forwarded>,
    pub internal: SegQueue<Internal>,
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
    pub fn push_internal(&self, m: Internal) {
        self.internal.push(m);
        self.notify.notify_one();
    }
    /// Hands over a client request; gives it back if the queue is full.
    pub fn push_request(&self, f: Forwarded) -> Result<(), Forwarded> {
        self.requests.push(f)?;
        self.notify.notify_one();
        Ok(())
    }
}

impl Default for Mailbox {
    fn default() -> Self {
        Mailbox::new()
    }
}

/// Counters of one shard, written by its thread, read by STATS from any thread.
#[derive(Default)]
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

/// Everything the shard threads share.
pub struct Node {
    pub mailboxes: Arc<Vec<Mailbox>>,
    pub stats: Arc<Vec<ShardStats>>,
    pub wal: Wal<WalToken>,
    pub stop: AtomicBool,
    pub snapshots: crossbeam::channel::Sender<(u64, usize, Vec<u8>)>,
}

impl Node {
    pub fn shards(&self) -> usize {
        self.mailboxes.len()
    }
}

/// The WAL thread's commit callback. Every shard owning a line of a record
/// gets it to apply; the coordinator gets it to apply and answer. All
/// participants' copies are queued before any coordinator's copy, so by the
/// time a client sees an acknowledgement every shard already holds the
/// record, and a shard drains its queue before serving a read: a client never
/// reads state older than what it was told is durable.
pub fn route_commits(
    mailboxes: &[Mailbox],
    batch: Vec<Committed<WalToken>>,
    snapshot_due: impl FnOnce(u64) -> bool,
) {
    let n = mailboxes.len();
    let mut parts: Vec<Vec<Commit>> = (0..n).map(|_| Vec::new()).collect();
    let mut coords: Vec<Vec<Commit>> = (0..n).map(|_| Vec::new()).collect();
    let last_lsn = batch.last().map_or(0, |c| c.lsn);
    for c in batch {
        let t = c.token;
        for (i, out) in parts.iter_mut().enumerate() {
            if i != t.coord && t.participants & (1 << i) != 0 {
                out.push(Commit { txn: t.txn, lsn: c.lsn, ts_ms: c.ts_ms, m: t.m.clone(), coord: t.coord });
            }
        }
        coords[t.coord].push(Commit { txn: t.txn, lsn: c.lsn, ts_ms: c.ts_ms, m: t.m, coord: t.coord });
    }
    for lists in [parts, coords] {
        for (mb, list) in mailboxes.iter().zip(lists) {
            if !list.is_empty() {
                mb.internal.push(Internal::Committed(list));
            }
        }
    }
    if snapshot_due(last_lsn) {
        for mb in mailboxes {
            mb.internal.push(Internal::Snapshot { lsn: last_lsn });
        }
    }
    for mb in mailboxes {
        mb.notify.notify_one();
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

struct Txn {
    op: u8,
    request_id: u64,
    reply: ReplyTo,
    id_key: Option<(bool, u64)>,
    m: Arc<Mutation>,
    participants: u64,
    waiting: u32,
    prepared: u64,
    /// The first definitive refusal (by line).
    refusal: Option<Refusal>,
    /// The first contended refusal of this attempt, if any.
    contended: Option<Refusal>,
    /// When the mutation was first prepared.
    started: Instant,
    expiry: bool,
}

pub struct Shard {
    pub index: usize,
    pub node: Arc<Node>,
    pub store: Store,
    txns: IdMap<Txn>,
    /// Ids with a mutation in flight: (is_receipt, id).
    busy_ids: HashSet<(bool, u64), IdHashBuilder>,
    next_txn: u64,
    /// Mutations refused only because undecided ones reserved the units:
    /// prepared again after a short pause (see [`Shard::retry_contended`]).
    pub retries: Vec<u64>,
    pub retry_wake: Rc<Notify>,
}

fn send(reply: &ReplyTo, out: Out) {
    if let Some(tx) = reply {
        // The connection may be gone; its client will retry by id.
        let _ = tx.send(out);
    }
}

fn frame(op: u8, request_id: u64, resp: &Response) -> Out {
    let mut buf = Vec::with_capacity(32);
    resp.encode(op, request_id, &mut buf);
    Out::Frame(buf)
}

pub fn error_frame(op: u8, request_id: u64, status: Status, message: &str) -> Out {
    let mut buf = Vec::with_capacity(64 + message.len());
    encode_error(op, request_id, status, message, &mut buf);
    Out::Frame(buf)
}

impl Shard {
    pub fn new(index: usize, node: Arc<Node>, store: Store) -> Shard {
        Shard {
            index,
            node,
            store,
            txns: IdMap::default(),
            busy_ids: HashSet::default(),
            next_txn: 0,
            retries: Vec::new(),
            retry_wake: Rc::new(Notify::new()),
        }
    }

    fn stats(&self) -> &ShardStats {
        &self.node.stats[self.index]
    }

    fn mailbox(&self, i: usize) -> &Mailbox {
        &self.node.mailboxes[i]
    }

    /// Applies everything queued for this shard. Called by the shard's event
    /// loop, and by connections before they answer a read, so that a client
    /// that saw an acknowledgement never reads older state afterwards.
    pub fn drain(&mut self) {
        self.drain_internal();
        let mut budget = 1024;
        while budget > 0 {
            let Some(f) = self.node.mailboxes[self.index].requests.pop() else { break };
            self.forwarded(f);
            budget -= 1;
            // Commits that arrive meanwhile go first: they finish work and free memory.
            self.drain_internal();
        }
        if self.store.snapshot_in_progress() {
            match self.store.snapshot_step() {
                Some(done) => self.send_snapshot(done),
                None => budget = 0, // come back for the next part after connections had a turn
            }
        }
        if budget == 0 {
            self.mailbox(self.index).notify.notify_one(); // more to do; yield to connections first
        }
    }

    fn send_snapshot(&self, (lsn, payload): (u64, Vec<u8>)) {
        let _ = self.node.snapshots.send((lsn, self.index, payload));
    }

    /// Applies queued commits and votes (not forwarded requests).
    pub fn drain_internal(&mut self) {
        while let Some(msg) = self.node.mailboxes[self.index].internal.pop() {
            self.internal(msg);
        }
    }

    fn forwarded(&mut self, f: Forwarded) {
        match f {
            Forwarded::Query { request_id, key, reply } => {
                let resp = Response::Ok(Reply::Available(self.store.available(key)));
                self.count_read(1);
                send(&reply, frame(opcode::QUERY, request_id, &resp));
            }
            Forwarded::QueryItem { request_id, item, reply } => {
                let resp = Response::Ok(Reply::Item(self.store.item(item)));
                self.count_read(1);
                send(&reply, frame(opcode::QUERY_ITEM, request_id, &resp));
            }
            Forwarded::QueryBatch { request_id, positions, keys, reply } => {
                let values = keys.iter().map(|k| self.store.available(*k)).collect();
                self.count_read(keys.len());
                send(&reply, Out::BatchPart { request_id, positions, values });
            }
            Forwarded::Command { op, request_id, cmd, reply } => self.start(op, request_id, cmd, reply),
        }
    }

    pub fn count_read(&self, keys: usize) {
        let s = self.stats();
        s.queries.fetch_add(1, Relaxed);
        s.keys_read.fetch_add(keys as u64, Relaxed);
    }

    /// Begins a mutation this shard coordinates (it owns the command's id).
    pub fn start(&mut self, op: u8, request_id: u64, cmd: Command, reply: ReplyTo) {
        // Records already durable must be applied before this shard judges
        // anything: a client may send this right after an acknowledgement.
        self.drain_internal();
        let expiry = matches!(cmd, Command::Release { expired: true, .. });
        if self.txns.len() >= MAX_TXNS {
            self.stats().overloaded.fetch_add(1, Relaxed);
            let msg = "too many mutations in flight on this shard; retry";
            return send(&reply, error_frame(op, request_id, Status::Overloaded, msg));
        }
        let id_key = cmd.id_key();
        if let Some(k) = id_key {
            if self.busy_ids.contains(&k) {
                let msg = format!("id {} has an operation in flight; retry when it is answered", k.1);
                self.stats().errors.fetch_add(1, Relaxed);
                return send(&reply, error_frame(op, request_id, Status::Conflict, &msg));
            }
        }
        let m = match self.store.plan(cmd, now_ms()) {
            Ok(m) => Arc::new(m),
            Err(resp) => {
                self.count_outcome(&resp);
                return send(&reply, frame(op, request_id, &resp));
            }
        };
        let n = self.node.shards();
        let participants = m.lines.iter().fold(0u64, |acc, l| acc | 1 << shard_of(l.key.item, n));
        self.next_txn += 1;
        let txn = (self.index as u64) << 56 | self.next_txn;
        if let Some(k) = id_key {
            self.busy_ids.insert(k);
        }
        let t = Txn {
            op,
            request_id,
            reply,
            id_key,
            m: m.clone(),
            participants,
            waiting: participants.count_ones(),
            prepared: 0,
            refusal: None,
            contended: None,
            started: Instant::now(),
            expiry,
        };
        self.txns.insert(txn, t);
        self.stats().txns_open.store(self.txns.len() as u64, Relaxed);
        self.prepare_everywhere(txn);
    }

    fn prepare_everywhere(&mut self, txn: u64) {
        let Some(t) = self.txns.get_mut(&txn) else { return };
        let (participants, m) = (t.participants, t.m.clone());
        t.waiting = participants.count_ones();
        t.prepared = 0;
        t.contended = None;
        for i in 0..self.node.shards() {
            if participants & (1 << i) == 0 {
                continue;
            }
            if i == self.index {
                let result = self.store.prepare(txn, &m);
                self.vote(txn, i, result);
            } else {
                self.mailbox(i).push_internal(Internal::Prepare { txn, coord: self.index, m: m.clone() });
            }
        }
    }

    /// Prepares again the mutations that met only contended refusals.
    pub fn retry_contended(&mut self) {
        self.drain_internal();
        for txn in std::mem::take(&mut self.retries) {
            self.prepare_everywhere(txn);
        }
    }

    fn internal(&mut self, msg: Internal) {
        match msg {
            Internal::Prepare { txn, coord, m } => {
                let result = self.store.prepare(txn, &m);
                self.mailbox(coord).push_internal(Internal::Vote { txn, from: self.index, result });
            }
            Internal::Vote { txn, from, result } => self.vote(txn, from, result),
            Internal::Abort { txn } => self.store.abort(txn),
            Internal::Committed(list) => {
                for c in list {
                    self.store.apply(Some(c.txn), c.lsn, c.ts_ms, &c.m);
                    if c.coord == self.index {
                        self.finish_committed(c.txn, c.lsn);
                    }
                }
                let s = self.stats();
                s.rows.store(self.store.row_count() as u64, Relaxed);
                s.ids.store(self.store.id_count() as u64, Relaxed);
            }
            Internal::Snapshot { lsn } => {
                // Rows now, exactly at the mark; the id tables a part per
                // event-loop turn (see `snapshot_step`). A mark that arrives
                // while one is still being written finishes that one first.
                if let Some(done) = self.store.finish_snapshot() {
                    self.send_snapshot(done);
                }
                self.store.begin_snapshot(lsn);
                self.mailbox(self.index).notify.notify_one();
            }
        }
    }

    fn vote(&mut self, txn: u64, from: usize, result: Result<(), Refusal>) {
        let Some(t) = self.txns.get_mut(&txn) else { return };
        t.waiting -= 1;
        match result {
            Ok(()) => t.prepared |= 1 << from,
            Err(r) => {
                let slot = if r.is_contended() { &mut t.contended } else { &mut t.refusal };
                if slot.as_ref().is_none_or(|old| r.line() < old.line()) {
                    *slot = Some(r);
                }
            }
        }
        if t.waiting == 0 {
            self.decide(txn);
        }
    }

    fn decide(&mut self, txn: u64) {
        let t = self.txns.get_mut(&txn).expect("decide is called for a known txn");
        // A definitive refusal answers at once. A contended one (the units
        // exist but undecided mutations reserved them) would be an answer no
        // serial order explains if those mutations abort; so release our own
        // reservations and try again once they had time to be decided.
        if t.refusal.is_none() && t.contended.is_some() && t.started.elapsed() < CONTENDED_RETRY_FOR {
            self.abort_everywhere(txn);
            self.retries.push(txn);
            self.retry_wake.notify_one();
            return;
        }
        if let Some(r) = t.refusal.clone().or_else(|| t.contended.clone()) {
            let resp = r.response();
            self.abort_everywhere(txn);
            return self.finish(txn, &resp);
        }
        let mut payload = Vec::with_capacity(16 + 16 * t.m.lines.len());
        t.m.encode(&mut payload);
        let token = WalToken { txn, coord: self.index, participants: t.participants, m: t.m.clone() };
        if let Err((e, _)) = self.node.wal.try_submit(payload, token) {
            self.abort_everywhere(txn);
            let resp = Response::Error {
                status: if e == SubmitError::Full { Status::Overloaded } else { Status::Internal },
                message: match e {
                    SubmitError::Full => "the log writer is saturated; retry".into(),
                    SubmitError::Closed => "the log writer has stopped".into(),
                },
            };
            self.finish(txn, &resp);
        }
    }

    fn abort_everywhere(&mut self, txn: u64) {
        let prepared = self.txns[&txn].prepared;
        for i in 0..self.node.shards() {
            if prepared & (1 << i) != 0 {
                if i == self.index {
                    self.store.abort(txn);
                } else {
                    self.mailbox(i).push_internal(Internal::Abort { txn });
                }
            }
        }
    }

    fn finish_committed(&mut self, txn: u64, lsn: u64) {
        if self.txns.get(&txn).is_some_and(|t| t.expiry) {
            self.stats().holds_expired.fetch_add(1, Relaxed);
        }
        self.finish(txn, &Response::Ok(Reply::Committed { lsn }));
    }

    fn finish(&mut self, txn: u64, resp: &Response) {
        let Some(t) = self.txns.remove(&txn) else { return };
        if let Some(k) = t.id_key {
            self.busy_ids.remove(&k);
        }
        self.count_outcome(resp);
        self.stats().txns_open.store(self.txns.len() as u64, Relaxed);
        send(&t.reply, frame(t.op, t.request_id, resp));
    }

    fn count_outcome(&self, resp: &Response) {
        let s = self.stats();
        let c = match resp.status() {
            Status::Ok => &s.mutations_ok,
            Status::InsufficientStock => &s.refused_insufficient,
            Status::Duplicate => &s.duplicates,
            Status::Overloaded => &s.overloaded,
            _ => &s.errors,
        };
        c.fetch_add(1, Relaxed);
    }

    /// Starts the release of holds whose deadline has passed.
    pub fn expire_holds(&mut self) {
        let now = now_ms();
        for id in self.store.expired_holds(now, 256) {
            if !self.busy_ids.contains(&(false, id)) {
                self.start(opcode::RELEASE, 0, Command::Release { id, expired: true }, None);
            }
        }
    }
}
