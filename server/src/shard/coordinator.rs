//! The two-phase commit of one mutation, run by the shard that owns its id:
//! plan -> prepare on every shard owning a line (votes) -> one log record ->
//! (after fdatasync, see `commits.rs`) every involved shard applies it ->
//! the coordinator answers. Also the retry of contended refusals and the
//! release of expired holds, which start mutations of their own.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use stockd_persistence::wal::SubmitError;
use stockd_protocol::{opcode, shard_of, Reply, Response, Status};

use super::answers::{answer_response, refusal_response, respond, respond_error};
use super::mailbox::{Internal, ReplyTo, WalToken};
use super::passed::Passed;
use super::{now_ms, send, Shard};
use crate::state::{Answer, Command, IdKey, Refusal};

/// Most mutations one shard coordinates at once; beyond it, OVERLOADED.
pub const MAX_TXNS: usize = 16_384;
/// How long a mutation refused only by contention keeps being prepared again
/// (from its first contended refusal) before the refusal is returned as it stands. Undecided mutations settle
/// within an fsync or two; this only bounds pathological cases.
pub const CONTENDED_RETRY_FOR: Duration = Duration::from_secs(2);
/// Expired holds released per tick of the expiry timer.
pub const EXPIRY_BATCH: usize = 256;
/// Records one pass of the event loop queues for the log writer at most
/// before they are handed over without waiting for the pass to end: the
/// first record of a long pass waits for at most this many more (~0.4 ms
/// of shard time here), and the writer still gets them by the hundred.
/// With 1,024, orders 16 x 64 ran 0.92-0.94x the build that handed
/// records over one by one (docs/benchmarks.md).
pub const LOG_PASS_MAX: usize = 128;

/// A mutation this shard coordinates, from its first prepare to its answer.
pub(super) struct Txn {
    op: u8,
    request_id: u64,
    reply: ReplyTo,
    id_key: Option<IdKey>,
    m: Passed,
    participants: u64,
    waiting: u32,
    prepared: u64,
    /// The first definitive refusal (by line).
    refusal: Option<Refusal>,
    /// The first contended refusal of this attempt, if any.
    contended: Option<Refusal>,
    /// When the first contended refusal came (no clock read for the
    /// mutations that never meet one).
    contended_since: Option<Instant>,
    expiry: bool,
}

impl Shard {
    /// Begins a mutation this shard coordinates (it owns the command's id).
    pub fn start(&mut self, op: u8, request_id: u64, cmd: Command, reply: ReplyTo) {
        // Records already durable must be applied before this shard judges
        // anything: a client may send this right after an acknowledgement.
        self.drain_internal();
        let expiry = matches!(cmd, Command::Release { expired: true, .. });
        if let Some(r) = self.shared.replica.as_ref().filter(|r| !r.may_write()) {
            self.stats().errors.fetch_add(1, Relaxed);
            return send(&reply, respond_error(op, request_id, Status::NotPrimary, &r.not_primary()));
        }
        if self.txns.len() >= MAX_TXNS {
            self.stats().overloaded.fetch_add(1, Relaxed);
            let msg = "too many mutations in flight on this shard; retry";
            return send(&reply, respond_error(op, request_id, Status::Overloaded, msg));
        }
        let id_key = cmd.id_key();
        // The id is marked in flight at once: one probe of the set, where
        // a look and then an insert were two; a mutation that does not go
        // ahead takes the mark back below. An id already in flight is
        // refused, except a retried order, reserve or inbound whose id is
        // remembered: it has its answer whatever else runs on the id (say,
        // the server releasing that hold as it expires), which plan gives
        // below. The id table is asked only then: `plan` looks every id up
        // anyway, and a new id's lookup walks the longest probe.
        let marked = id_key.is_some_and(|k| self.busy_ids.insert(k));
        let retry_of_known = |k: &IdKey| cmd.creates_id() && self.store.remembers(*k);
        if let Some(k) = id_key.filter(|k| !marked && !retry_of_known(k)) {
            let msg = format!("id {} has an operation in flight; retry when it is answered", k.id());
            self.stats().errors.fetch_add(1, Relaxed);
            return send(&reply, respond_error(op, request_id, Status::Conflict, &msg));
        }
        let m = match self.store.plan(cmd, now_ms) {
            Ok(m) => Passed::new(m),
            Err(answer) => {
                if let Some(k) = id_key.filter(|_| marked) {
                    self.busy_ids.remove(&k);
                }
                if answer == Answer::TableFull {
                    self.warn_table_full();
                }
                let resp = answer_response(&answer);
                self.count_outcome(&resp);
                return send(&reply, respond(op, request_id, resp));
            }
        };
        let n = self.shared.shards();
        let participants = m.lines.iter().fold(0u64, |acc, l| acc | 1 << shard_of(l.key.item, n));
        let waiting = participants.count_ones();
        let (refusal, contended, contended_since) = (None, None, None);
        let t = Txn {
            op,
            request_id,
            reply,
            id_key,
            m,
            participants,
            waiting,
            prepared: 0,
            refusal,
            contended,
            contended_since,
            expiry,
        };
        let txn = self.txns.insert(t);
        self.stats().txns_open.store(self.txns.len() as u64, Relaxed);
        self.prepare_everywhere(txn);
    }

    /// Prepares `txn` on every participant. With exactly one other shard
    /// among them, and this shard's own lines (if any) ready, that shard is
    /// asked to log the record itself when its lines are ready too: one
    /// message between the shards instead of two (prepare and vote), and
    /// the record reaches the log a hop sooner.
    fn prepare_everywhere(&mut self, txn: u64) {
        let Some(t) = self.txns.get_mut(txn) else { return };
        let participants = t.participants;
        t.waiting = participants.count_ones();
        t.prepared = 0;
        t.contended = None;
        let me = 1u64 << self.index;
        let others = participants & !me;
        // A copy for the other participants, if there are any.
        let m = (others != 0).then(|| t.m.clone());
        let mut local_ready = true;
        if participants & me != 0 {
            let result = self.store.prepare(txn, &t.m);
            local_ready = result.is_ok();
            self.vote(txn, self.index, result);
        }
        let Some(m) = m else { return };
        if others.count_ones() == 1 && local_ready {
            let i = others.trailing_zeros() as usize;
            // Counted as prepared from now on: if the mutation is aborted
            // after all (the record fenced, say), `i` is told to drop what
            // it may have reserved; an abort of nothing is a no-op.
            self.txns.get_mut(txn).expect("present").prepared |= 1 << i;
            let log_if_ready = Some(participants);
            self.mailbox(i).push_internal(Internal::Prepare { txn, coord: self.index, m, log_if_ready });
            return;
        }
        for i in 0..self.shared.shards() {
            if others & (1 << i) != 0 {
                let m = m.clone();
                self.mailbox(i).push_internal(Internal::Prepare {
                    txn,
                    coord: self.index,
                    m,
                    log_if_ready: None,
                });
            }
        }
    }

    /// Tells the operator, at most every [`crate::throttled::WARN_EVERY`], that new ids are
    /// being refused and what to change: clients see only OVERLOADED.
    fn warn_table_full(&mut self) {
        let Some(refused) = self.table_full.hit(Instant::now()) else { return };
        let limits = self.store.id_limits();
        tracing::warn!(
            shard = self.index,
            refused,
            ids = self.store.id_count(),
            max_ids_per_shard = limits.max_ids,
            id_min_window_secs = limits.min_window_ms / 1000,
            "the id table is full: new orders, holds and receipts are refused with OVERLOADED until its oldest ids \
             are older than --id-min-window-secs; raise --max-ids-per-shard (about 100 bytes an id) or run more shards"
        );
    }

    /// Queues the record of `txn` for the log writer. The records of one
    /// pass of the event loop go to the writer together at its end
    /// ([`Shard::flush_log`]), so that one group commit takes them all
    /// instead of the first few of them; each comes back through the commit
    /// callback (`commits.rs`) once durable. `coord` is this shard, or the
    /// coordinator this shard logs for as the last participant to be ready
    /// (see `prepare_everywhere`).
    pub(super) fn log(&mut self, txn: u64, coord: usize, participants: u64, m: Passed) {
        if self.to_log.is_empty() {
            self.log_wake.notify_one();
            // A batch the writer is done with, its room kept (or a new one).
            self.to_log = self.shared.wal.batch();
            self.to_log.reserve(LOG_PASS_MAX, LOG_PASS_MAX * 32);
        }
        self.to_log.push(WalToken::Own { txn, coord, participants, m }, |token, payload| {
            if let WalToken::Own { m, .. } = token {
                m.encode(payload)
            }
        });
        if self.to_log.len() >= LOG_PASS_MAX {
            self.flush_log();
        }
    }

    /// Hands the records queued by [`Shard::log`] to the log writer, one
    /// batch for them all. A batch it cannot take (its queue is full, or it
    /// stopped) is refused whole: for each record the coordinator drops the
    /// reservations and answers; a shard that logged for another drops its
    /// own and tells the coordinator.
    pub fn flush_log(&mut self) {
        if self.to_log.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.to_log);
        let Err((error, batch)) = self.shared.wal.try_submit(batch) else { return };
        for token in batch.into_tokens() {
            let WalToken::Own { txn, coord, m, .. } = token else {
                unreachable!("a shard logs only its own mutations")
            };
            if coord == self.index {
                self.abort_everywhere(txn);
                self.finish(txn, log_refused(error));
            } else {
                self.store.abort(txn, &m);
                self.mailbox(coord).push_internal(Internal::NotLogged { txn, error });
            }
        }
    }

    /// The participant that was to log `txn` could not.
    pub(super) fn not_logged(&mut self, txn: u64, error: SubmitError) {
        if self.txns.contains(txn) {
            self.abort_everywhere(txn);
            self.finish(txn, log_refused(error));
        }
    }

    /// Prepares again the mutations that met only contended refusals.
    pub fn retry_contended(&mut self) {
        self.drain_internal();
        for txn in std::mem::take(&mut self.retries) {
            self.prepare_everywhere(txn);
        }
    }

    pub(super) fn vote(&mut self, txn: u64, from: usize, result: Result<(), Refusal>) {
        let Some(t) = self.txns.get_mut(txn) else { return };
        t.waiting = t.waiting.checked_sub(1).expect("invariant: one vote per participant");
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
        let t = self.txns.get_mut(txn).expect("decide is called for a known txn");
        // A definitive refusal answers at once. A contended one (the units
        // exist but undecided mutations reserved them) would be an answer no
        // serial order explains if those mutations abort; so release our own
        // reservations and try again once they had time to be decided.
        let retrying_for =
            t.contended.as_ref().map(|_| t.contended_since.get_or_insert_with(Instant::now).elapsed());
        if t.refusal.is_none() && retrying_for.is_some_and(|d| d < CONTENDED_RETRY_FOR) {
            self.abort_everywhere(txn);
            self.retries.push(txn);
            self.retry_wake.notify_one();
            return;
        }
        if let Some(r) = t.refusal.clone().or_else(|| t.contended.clone()) {
            self.abort_everywhere(txn);
            return self.finish(txn, refusal_response(&r));
        }
        let (participants, m) = (t.participants, t.m.clone());
        self.log(txn, self.index, participants, m);
    }

    fn abort_everywhere(&mut self, txn: u64) {
        let t = self.txns.get(txn).expect("invariant: a mutation aborted is in flight");
        let (prepared, m) = (t.prepared, t.m.clone());
        for i in 0..self.shared.shards() {
            if prepared & (1 << i) != 0 {
                if i == self.index {
                    self.store.abort(txn, &m);
                } else {
                    self.mailbox(i).push_internal(Internal::Abort { txn, m: m.clone() });
                }
            }
        }
    }

    /// The record of `txn` is logged here but will never be confirmed by the
    /// replication topic: another node is the primary (docs/ha.md).
    pub(super) fn fence(&mut self, txn: u64, message: &str) {
        if self.txns.contains(txn) {
            self.abort_everywhere(txn);
            self.finish(txn, Response::Error { status: Status::NotPrimary, message: message.into() });
        }
    }

    /// The record of `txn` is durable and queued on every shard it involves.
    pub(super) fn answer_committed(&mut self, txn: u64, lsn: u64) {
        if self.txns.get(txn).is_some_and(|t| t.expiry) {
            self.stats().holds_expired.fetch_add(1, Relaxed);
        }
        self.finish(txn, Response::Ok(Reply::Committed { lsn }));
    }

    fn finish(&mut self, txn: u64, resp: Response) {
        let Some(t) = self.txns.remove(txn) else { return };
        if let Some(k) = t.id_key {
            self.busy_ids.remove(&k);
        }
        self.count_outcome(&resp);
        self.stats().txns_open.store(self.txns.len() as u64, Relaxed);
        send(&t.reply, respond(t.op, t.request_id, resp));
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
        if self.shared.replica.as_ref().is_some_and(|r| !r.may_write()) {
            return; // the primary releases them, and this node applies its records
        }
        let now = now_ms();
        for id in self.store.expired_holds(now, EXPIRY_BATCH) {
            if !self.busy_ids.contains(&IdKey::OrderOrHold(id)) {
                self.start(opcode::RELEASE, 0, Command::Release { id, expired: true }, None);
            }
        }
    }
}

/// What the client is told when the log writer could not take its record.
fn log_refused(e: SubmitError) -> Response {
    match e {
        SubmitError::Full => Response::Error {
            status: Status::Overloaded,
            message: "the log writer is saturated; retry".into(),
        },
        SubmitError::Closed => {
            Response::Error { status: Status::Internal, message: "the log writer has stopped".into() }
        }
        SubmitError::NoRoom => Response::Error {
            status: Status::Overloaded,
            message: "no room on the server's log disk: not applied; retry once space is freed".into(),
        },
    }
}
