//! The stock state machine: plain synchronous code, no I/O, no clock.
//!
//! A [`Store`] holds the rows and ids one shard owns. A mutation goes
//! through three steps:
//!
//! 1. [`Store::plan`] on the shard that owns the id turns a request into a
//!    [`Mutation`] (the log record), or answers it at once (duplicate,
//!    unknown id, conflict).
//! 2. [`Store::prepare`] on every shard that owns one of its rows checks the
//!    rows against durable stock minus what other in-flight mutations may
//!    take, and reserves that room ("pending").
//! 3. After the record is durable, [`Store::apply`] on every involved shard
//!    moves the change from pending into durable state; or [`Store::abort`]
//!    drops the reservation.
//!
//! Replay after a crash calls only [`Store::apply`], in LSN order. Because a
//! record carries its decided deltas, replay rebuilds exactly the state that
//! acknowledged answers were based on.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;

use stockd_protocol::{fmix64, shard_of, Key, Line, Reader, Response, Status, STOCK_MAX};

/// Hashes the u64 ids that key every table here: one keyed murmur3
/// finalizer instead of SipHash (a query is mostly this lookup; the profile
/// showed SipHash at a fifth of server time). The key is random per process,
/// so clients cannot choose ids that collide in the table.
#[derive(Clone, Copy)]
pub struct IdHashBuilder(u64);

impl Default for IdHashBuilder {
    fn default() -> Self {
        static KEY: OnceLock<u64> = OnceLock::new();
        IdHashBuilder(
            *KEY.get_or_init(|| std::collections::hash_map::RandomState::new().hash_one(0x5eed_u64)),
        )
    }
}

impl BuildHasher for IdHashBuilder {
    type Hasher = IdHasher;
    fn build_hasher(&self) -> IdHasher {
        IdHasher(self.0)
    }
}

pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Not used by the u64-keyed tables; correct for any other key anyway.
        for b in bytes {
            self.0 = fmix64(self.0 ^ *b as u64);
        }
    }
    fn write_u64(&mut self, x: u64) {
        self.0 = fmix64(self.0 ^ x);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

pub type IdMap<V> = HashMap<u64, V, IdHashBuilder>;

/// A map from id split into 64 tables, for the tables that grow to millions
/// of entries: growing one re-hashes 1/64 of the entries, so the shard
/// stalls for milliseconds, not for the hundred-odd a single table takes.
pub struct SplitMap<V> {
    parts: Vec<IdMap<V>>,
    len: usize,
}

/// Tables in a [`SplitMap`]; also the steps of a snapshot's id section.
pub const SPLIT_PARTS: usize = 64;

impl<V> Default for SplitMap<V> {
    fn default() -> Self {
        SplitMap { parts: (0..SPLIT_PARTS).map(|_| IdMap::default()).collect(), len: 0 }
    }
}

impl<V> SplitMap<V> {
    fn part_of(id: u64) -> usize {
        // Top bits of an unkeyed mix; the tables hash with their own key.
        (fmix64(id ^ 0x0123_4567_89ab_cdef) >> 58) as usize
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn get(&self, id: &u64) -> Option<&V> {
        self.parts[Self::part_of(*id)].get(id)
    }
    pub fn get_mut(&mut self, id: &u64) -> Option<&mut V> {
        self.parts[Self::part_of(*id)].get_mut(id)
    }
    pub fn insert(&mut self, id: u64, v: V) -> Option<V> {
        let old = self.parts[Self::part_of(id)].insert(id, v);
        if old.is_none() {
            self.len += 1;
        }
        old
    }
    pub fn remove(&mut self, id: &u64) -> Option<V> {
        let old = self.parts[Self::part_of(*id)].remove(id);
        if old.is_some() {
            self.len -= 1;
        }
        old
    }
    pub fn iter(&self) -> impl Iterator<Item = (&u64, &V)> {
        self.parts.iter().flat_map(|p| p.iter())
    }
    pub fn part(&self, i: usize) -> &IdMap<V> {
        &self.parts[i]
    }
}

/// A snapshot being serialized: the rows exactly as of `lsn`, then the id
/// tables one part per step, so that a shard with millions of ids never
/// stops for the whole table at once.
///
/// Ids are read as they are at each step, not as of `lsn`: ids created
/// after `lsn` are left out, but changes after `lsn` to older ids (cancel,
/// confirm, release, eviction) may be in. That is safe because recovery
/// replays every record after `lsn`, and re-applying such a change to an id
/// that already shows it leaves the id as it was (see the property test).
/// Rows are exact, so no unit is counted twice.
pub struct SnapshotJob {
    pub lsn: u64,
    buf: Vec<u8>,
    next_part: usize,
}

impl SnapshotJob {
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
}

/// Durable quantities of one row, plus what in-flight mutations may change.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Row {
    pub on_hand: u64,
    pub held: u64,
    /// Units that prepared, not yet durable mutations may take from `available`.
    pend_take: u64,
    /// Units that prepared mutations may add to `on_hand`.
    pend_add: u64,
    /// Prepared mutations touching this row.
    pend_n: u32,
}

impl Row {
    /// What a query answers: durable on hand minus durable holds.
    pub fn available(&self) -> u64 {
        self.on_hand - self.held
    }
}

/// The kinds of log record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Order { id: u64 },
    Inbound { id: u64 },
    Cancel { id: u64 },
    Reserve { id: u64, ttl_ms: u32 },
    Confirm { id: u64 },
    Release { id: u64, expired: bool },
    Adjust { before: u64, after: u64, reason: u16 },
}

/// One log record: what happened and the lines it touched. For cancel,
/// confirm and release the lines are those of the original order or hold,
/// so that every shard can apply the record without asking another.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mutation {
    pub op: Op,
    pub lines: Vec<Line>,
}

impl Mutation {
    /// The id that decides which shard coordinates this mutation.
    pub fn owner_id(&self) -> u64 {
        match self.op {
            Op::Order { id }
            | Op::Inbound { id }
            | Op::Cancel { id }
            | Op::Reserve { id, .. }
            | Op::Confirm { id }
            | Op::Release { id, .. } => id,
            Op::Adjust { .. } => self.lines[0].key.item,
        }
    }

    /// (key, change of on_hand, change of held) for every line.
    pub fn deltas(&self) -> impl Iterator<Item = (Key, i64, i64)> + '_ {
        self.lines.iter().map(move |l| {
            let q = l.qty as i64;
            let (d_on, d_held) = match self.op {
                Op::Order { .. } => (-q, 0),
                Op::Inbound { .. } | Op::Cancel { .. } => (q, 0),
                Op::Reserve { .. } => (0, q),
                Op::Confirm { .. } => (-q, -q),
                Op::Release { .. } => (0, -q),
                Op::Adjust { before, after, .. } => (after as i64 - before as i64, 0),
            };
            (l.key, d_on, d_held)
        })
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        let (tag, id) = match self.op {
            Op::Order { id } => (1u8, id),
            Op::Inbound { id } => (2, id),
            Op::Cancel { id } => (3, id),
            Op::Reserve { id, .. } => (4, id),
            Op::Confirm { id } => (5, id),
            Op::Release { id, .. } => (6, id),
            Op::Adjust { .. } => (7, 0),
        };
        out.push(tag);
        out.extend_from_slice(&id.to_le_bytes());
        match self.op {
            Op::Reserve { ttl_ms, .. } => out.extend_from_slice(&ttl_ms.to_le_bytes()),
            Op::Release { expired, .. } => out.push(expired as u8),
            Op::Adjust { before, after, reason } => {
                out.extend_from_slice(&before.to_le_bytes());
                out.extend_from_slice(&after.to_le_bytes());
                out.extend_from_slice(&reason.to_le_bytes());
            }
            _ => {}
        }
        put_lines(out, &self.lines);
    }

    pub fn decode(buf: &[u8]) -> Result<Mutation, String> {
        let mut r = Reader::new(buf);
        let e = |e: stockd_protocol::DecodeError| e.0;
        let tag = r.u8("op").map_err(e)?;
        let id = r.u64("id").map_err(e)?;
        let op = match tag {
            1 => Op::Order { id },
            2 => Op::Inbound { id },
            3 => Op::Cancel { id },
            4 => Op::Reserve { id, ttl_ms: r.u32("ttl").map_err(e)? },
            5 => Op::Confirm { id },
            6 => Op::Release { id, expired: r.u8("expired").map_err(e)? != 0 },
            7 => Op::Adjust {
                before: r.u64("before").map_err(e)?,
                after: r.u64("after").map_err(e)?,
                reason: r.u16("reason").map_err(e)?,
            },
            t => return Err(format!("unknown record type {t}")),
        };
        let n = r.u16("lines").map_err(e)? as usize;
        let mut lines = Vec::with_capacity(n);
        for _ in 0..n {
            let key = r.key().map_err(e)?;
            lines.push(Line { key, qty: r.u32("qty").map_err(e)? });
        }
        r.finish().map_err(e)?;
        Ok(Mutation { op, lines })
    }
}

fn put_lines(out: &mut Vec<u8>, lines: &[Line]) {
    out.extend_from_slice(&(lines.len() as u16).to_le_bytes());
    for l in lines {
        out.extend_from_slice(&l.key.item.to_le_bytes());
        out.extend_from_slice(&l.key.fc.to_le_bytes());
        out.extend_from_slice(&l.qty.to_le_bytes());
    }
}

/// A mutation request, as the coordinator sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Order { id: u64, lines: Vec<Line> },
    Inbound { id: u64, lines: Vec<Line> },
    Cancel { id: u64 },
    Reserve { id: u64, ttl_ms: u32, lines: Vec<Line> },
    Confirm { id: u64 },
    Release { id: u64, expired: bool },
    Adjust { key: Key, on_hand: u64, reason: u16 },
}

impl Command {
    /// The id whose owner shard coordinates the command.
    pub fn owner_id(&self) -> u64 {
        match self {
            Command::Order { id, .. }
            | Command::Inbound { id, .. }
            | Command::Cancel { id }
            | Command::Reserve { id, .. }
            | Command::Confirm { id }
            | Command::Release { id, .. } => *id,
            Command::Adjust { key, .. } => key.item,
        }
    }

    /// Ids of orders/holds and of receipts live in separate spaces.
    pub fn id_key(&self) -> Option<(bool, u64)> {
        match self {
            Command::Inbound { id, .. } => Some((true, *id)),
            Command::Adjust { .. } => None,
            other => Some((false, other.owner_id())),
        }
    }
}

/// The life of an order or hold id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdState {
    Held {
        deadline_ms: u64,
    },
    Released {
        lsn: u64,
        expired: bool,
    },
    /// An order: placed directly (`confirm_lsn` None) or a confirmed hold.
    Ordered {
        confirm_lsn: Option<u64>,
    },
    Cancelled {
        lsn: u64,
        confirm_lsn: Option<u64>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdEntry {
    /// LSN of the ORDER or RESERVE that created the id.
    pub lsn: u64,
    pub ts_ms: u64,
    pub is_hold: bool,
    pub lines: Vec<Line>,
    pub state: IdState,
}

/// Why a prepare refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `available` is what this line can take now. `contended`: durable stock
    /// would cover the line, but other undecided mutations have reserved it;
    /// the coordinator retries until they are decided instead of refusing.
    Insufficient {
        line: u16,
        available: u64,
        contended: bool,
    },
    Overflow {
        line: u16,
    },
    Busy {
        line: u16,
    },
    BelowHeld {
        held: u64,
    },
}

impl Refusal {
    /// The first line this refusal is about.
    pub fn line(&self) -> u16 {
        match *self {
            Refusal::Insufficient { line, .. } | Refusal::Overflow { line } | Refusal::Busy { line } => line,
            Refusal::BelowHeld { .. } => 0,
        }
    }

    pub fn is_contended(&self) -> bool {
        matches!(self, Refusal::Insufficient { contended: true, .. })
    }

    pub fn response(&self) -> Response {
        match *self {
            Refusal::Insufficient { line, available, .. } => Response::Insufficient { line, available },
            Refusal::Overflow { line } => Response::Error {
                status: Status::BadRequest,
                message: format!("line {line}: the row would exceed the maximum of {STOCK_MAX} units"),
            },
            Refusal::Busy { line } => Response::Error {
                status: Status::Conflict,
                message: format!("line {line}: the row has changes in flight; retry the adjustment"),
            },
            Refusal::BelowHeld { held } => Response::Error {
                status: Status::Conflict,
                message: format!("cannot adjust below the {held} units currently held"),
            },
        }
    }
}

/// Limits of the idempotency memory.
///
/// An id is remembered for `window_ms` (by log time), unless the table
/// reaches `max_ids`: then the oldest ids are forgotten first, but never one
/// younger than `min_window_ms`. If even that does not fit, new ids are
/// refused with OVERLOADED: shedding load is better than applying a retried
/// order twice.
#[derive(Clone, Copy, Debug)]
pub struct IdLimits {
    pub window_ms: u64,
    pub min_window_ms: u64,
    pub max_ids: usize,
}

impl Default for IdLimits {
    fn default() -> Self {
        IdLimits { window_ms: 24 * 3600 * 1000, min_window_ms: 60_000, max_ids: 16_000_000 }
    }
}

/// The rows and ids of one shard (or, during recovery, of all of them).
pub struct Store {
    pub shard: usize,
    pub shards: usize,
    limits: IdLimits,
    rows: IdMap<Vec<(u32, Row)>>,
    /// Rows in `rows` (kept, not counted: STATS reads it after every commit).
    row_count: usize,
    ids: SplitMap<IdEntry>,
    /// Receipt id -> (lsn, ts_ms).
    receipts: SplitMap<(u64, u64)>,
    /// Ids in the order they were created: (ts_ms, is_receipt, id).
    fifo: VecDeque<(u64, bool, u64)>,
    /// Holds not yet confirmed or released: (deadline_ms, id).
    deadlines: BTreeSet<(u64, u64)>,
    /// Prepared, undecided mutations: txn -> the deltas reserved for it here.
    pending: IdMap<Vec<(Key, i64, i64)>>,
    /// LSN of the last record applied.
    pub applied_lsn: u64,
}

impl Store {
    pub fn new(shard: usize, shards: usize, limits: IdLimits) -> Store {
        Store {
            shard,
            shards,
            limits,
            rows: IdMap::default(),
            row_count: 0,
            ids: SplitMap::default(),
            receipts: SplitMap::default(),
            fifo: VecDeque::new(),
            deadlines: BTreeSet::new(),
            pending: IdMap::default(),
            applied_lsn: 0,
        }
    }

    pub fn owns_item(&self, item: u64) -> bool {
        shard_of(item, self.shards) == self.shard
    }

    pub fn row(&self, key: Key) -> Option<&Row> {
        self.rows.get(&key.item)?.iter().find(|(fc, _)| *fc == key.fc).map(|(_, r)| r)
    }

    fn row_mut(&mut self, key: Key) -> &mut Row {
        let v = self.rows.entry(key.item).or_default();
        let i = match v.iter().position(|(fc, _)| *fc == key.fc) {
            Some(i) => i,
            None => {
                v.push((key.fc, Row::default()));
                self.row_count += 1;
                v.len() - 1
            }
        };
        &mut v[i].1
    }

    /// Durable available units; unknown rows have none.
    pub fn available(&self, key: Key) -> u64 {
        self.row(key).map_or(0, Row::available)
    }

    /// Every center of one item, ascending by center id.
    pub fn item(&self, item: u64) -> Vec<(u32, u64)> {
        let mut v: Vec<_> =
            self.rows.get(&item).map_or(&[][..], |v| v).iter().map(|(fc, r)| (*fc, r.available())).collect();
        v.sort_unstable();
        v
    }

    pub fn row_count(&self) -> usize {
        self.row_count
    }

    pub fn id_count(&self) -> usize {
        self.ids.len() + self.receipts.len()
    }

    pub fn id(&self, id: u64) -> Option<&IdEntry> {
        self.ids.get(&id)
    }

    /// Step 1, on the owner of the command's id: the record to log, or the answer now.
    pub fn plan(&self, cmd: Command, now_ms: u64) -> Result<Mutation, Response> {
        let conflict = |message: String| Err(Response::Error { status: Status::Conflict, message });
        let not_found = |what: &str, id: u64| {
            Err(Response::Error { status: Status::NotFound, message: format!("unknown {what} id {id}") })
        };
        let full = || {
            Err(Response::Error {
                status: Status::Overloaded,
                message: "the idempotency table of this shard is full; retry later".into(),
            })
        };
        match cmd {
            Command::Order { id, lines } => match self.ids.get(&id) {
                Some(e) if !e.is_hold => Err(Response::Duplicate { lsn: e.lsn }),
                Some(_) => conflict(format!("id {id} is a hold, not an order")),
                None if self.table_full(now_ms) => full(),
                None => Ok(Mutation { op: Op::Order { id }, lines }),
            },
            Command::Reserve { id, ttl_ms, lines } => match self.ids.get(&id) {
                Some(e) if e.is_hold => Err(Response::Duplicate { lsn: e.lsn }),
                Some(_) => conflict(format!("id {id} is an order, not a hold")),
                None if self.table_full(now_ms) => full(),
                None => Ok(Mutation { op: Op::Reserve { id, ttl_ms }, lines }),
            },
            Command::Inbound { id, lines } => match self.receipts.get(&id) {
                Some(&(lsn, _)) => Err(Response::Duplicate { lsn }),
                None if self.table_full(now_ms) => full(),
                None => Ok(Mutation { op: Op::Inbound { id }, lines }),
            },
            Command::Cancel { id } => {
                let Some(e) = self.ids.get(&id) else { return not_found("order", id) };
                match e.state {
                    IdState::Ordered { .. } => Ok(Mutation { op: Op::Cancel { id }, lines: e.lines.clone() }),
                    IdState::Cancelled { lsn, .. } => Err(Response::Duplicate { lsn }),
                    IdState::Held { .. } => {
                        conflict(format!("hold {id} is not confirmed; release it instead"))
                    }
                    IdState::Released { .. } => conflict(format!("hold {id} was released, not confirmed")),
                }
            }
            Command::Confirm { id } => {
                let Some(e) = self.ids.get(&id) else { return not_found("hold", id) };
                match e.state {
                    _ if !e.is_hold => conflict(format!("id {id} is an order, not a hold")),
                    IdState::Held { deadline_ms } if deadline_ms <= now_ms => {
                        conflict(format!("hold {id} has expired"))
                    }
                    IdState::Held { .. } => Ok(Mutation { op: Op::Confirm { id }, lines: e.lines.clone() }),
                    IdState::Ordered { confirm_lsn: Some(lsn) }
                    | IdState::Cancelled { confirm_lsn: Some(lsn), .. } => Err(Response::Duplicate { lsn }),
                    IdState::Released { expired, .. } => conflict(format!(
                        "hold {id} was {}",
                        if expired { "released when it expired" } else { "released" }
                    )),
                    _ => conflict(format!("hold {id} is in an unexpected state")),
                }
            }
            Command::Release { id, expired } => {
                let Some(e) = self.ids.get(&id) else { return not_found("hold", id) };
                match e.state {
                    _ if !e.is_hold => conflict(format!("id {id} is an order, not a hold")),
                    IdState::Held { .. } => {
                        Ok(Mutation { op: Op::Release { id, expired }, lines: e.lines.clone() })
                    }
                    IdState::Released { lsn, .. } => Err(Response::Duplicate { lsn }),
                    _ => conflict(format!("hold {id} was confirmed; cancel the order instead")),
                }
            }
            Command::Adjust { key, on_hand, reason } => {
                let before = self.row(key).map_or(0, |r| r.on_hand);
                Ok(Mutation {
                    op: Op::Adjust { before, after: on_hand, reason },
                    lines: vec![Line { key, qty: 0 }],
                })
            }
        }
    }

    /// Step 2, on every shard owning a row of `m`: check this shard's lines and
    /// reserve room for them under `txn`. All or nothing on this shard.
    pub fn prepare(&mut self, txn: u64, m: &Mutation) -> Result<(), Refusal> {
        let mut taken: Vec<(Key, i64, i64)> = Vec::new();
        let mut result = Ok(());
        for (i, (key, d_on, d_held)) in m.deltas().enumerate() {
            if !self.owns_item(key.item) {
                continue;
            }
            let line = i as u16;
            let row = self.row(key).copied().unwrap_or_default();
            if let Op::Adjust { before, after, .. } = m.op {
                if row.pend_n > 0 || row.on_hand != before {
                    result = Err(Refusal::Busy { line });
                    break;
                }
                if after < row.held {
                    result = Err(Refusal::BelowHeld { held: row.held });
                    break;
                }
            } else {
                let take = (d_held - d_on).max(0) as u64;
                let room = row.available().saturating_sub(row.pend_take);
                if take > room {
                    // Units earlier lines of this same mutation reserved are not contention.
                    let own: u64 = taken
                        .iter()
                        .filter(|(k, _, _)| *k == key)
                        .map(|(_, d_on, d_held)| (d_held - d_on).max(0) as u64)
                        .sum();
                    let contended = take + own <= row.available();
                    result = Err(Refusal::Insufficient { line, available: room, contended });
                    break;
                }
                if d_on > 0 && row.on_hand + row.pend_add + d_on as u64 > STOCK_MAX {
                    result = Err(Refusal::Overflow { line });
                    break;
                }
            }
            self.reserve(key, d_on, d_held, 1);
            taken.push((key, d_on, d_held));
        }
        if result.is_err() {
            for (key, d_on, d_held) in taken {
                self.reserve(key, d_on, d_held, -1);
            }
        } else if !taken.is_empty() {
            self.pending.insert(txn, taken);
        }
        result
    }

    fn reserve(&mut self, key: Key, d_on: i64, d_held: i64, sign: i64) {
        let row = self.row_mut(key);
        let take = (d_held - d_on).max(0) as u64;
        let add = d_on.max(0) as u64;
        if sign > 0 {
            row.pend_take += take;
            row.pend_add += add;
            row.pend_n += 1;
        } else {
            row.pend_take -= take;
            row.pend_add -= add;
            row.pend_n -= 1;
        }
    }

    /// Drops what `prepare` reserved for `txn` (the mutation was refused elsewhere).
    pub fn abort(&mut self, txn: u64) {
        for (key, d_on, d_held) in self.pending.remove(&txn).unwrap_or_default() {
            self.reserve(key, d_on, d_held, -1);
        }
    }

    /// Step 3: a durable record. `txn` names the reservation it settles (None in replay).
    /// Applies the rows this shard owns and, if it owns the id, the id's new state.
    pub fn apply(&mut self, txn: Option<u64>, lsn: u64, ts_ms: u64, m: &Mutation) {
        if let Some(txn) = txn {
            self.abort(txn);
        }
        for (key, d_on, d_held) in m.deltas() {
            if !self.owns_item(key.item) {
                continue;
            }
            let row = self.row_mut(key);
            row.on_hand = row.on_hand.wrapping_add_signed(d_on);
            row.held = row.held.wrapping_add_signed(d_held);
            debug_assert!(row.held <= row.on_hand && row.on_hand <= STOCK_MAX, "{row:?} after {m:?}");
        }
        self.applied_lsn = lsn;
        if matches!(m.op, Op::Adjust { .. }) {
            return;
        }
        let id = m.owner_id();
        if shard_of(id, self.shards) != self.shard {
            return;
        }
        match m.op {
            Op::Order { .. } | Op::Reserve { .. } => {
                let is_hold = matches!(m.op, Op::Reserve { .. });
                let state = match m.op {
                    Op::Reserve { ttl_ms, .. } => {
                        let deadline_ms = ts_ms + ttl_ms as u64;
                        self.deadlines.insert((deadline_ms, id));
                        IdState::Held { deadline_ms }
                    }
                    _ => IdState::Ordered { confirm_lsn: None },
                };
                self.ids.insert(id, IdEntry { lsn, ts_ms, is_hold, lines: m.lines.clone(), state });
                self.fifo.push_back((ts_ms, false, id));
            }
            Op::Inbound { .. } => {
                self.receipts.insert(id, (lsn, ts_ms));
                self.fifo.push_back((ts_ms, true, id));
            }
            Op::Cancel { .. } | Op::Confirm { .. } | Op::Release { .. } => {
                let Some(e) = self.ids.get_mut(&id) else { return };
                if let IdState::Held { deadline_ms } = e.state {
                    self.deadlines.remove(&(deadline_ms, id));
                }
                e.state = match (&m.op, &e.state) {
                    (Op::Cancel { .. }, IdState::Ordered { confirm_lsn }) => {
                        IdState::Cancelled { lsn, confirm_lsn: *confirm_lsn }
                    }
                    (Op::Confirm { .. }, _) => IdState::Ordered { confirm_lsn: Some(lsn) },
                    (Op::Release { expired, .. }, _) => IdState::Released { lsn, expired: *expired },
                    (_, s) => s.clone(),
                };
            }
            Op::Adjust { .. } => {}
        }
        self.evict(ts_ms);
    }

    /// True if a new id cannot be remembered at `now_ms` without forgetting
    /// one younger than the minimum window.
    fn table_full(&self, now_ms: u64) -> bool {
        self.id_count() >= self.limits.max_ids
            && self.fifo.front().is_none_or(|(ts, _, _)| ts + self.limits.min_window_ms > now_ms)
    }

    /// Forgets ids older than the window, and the oldest ones beyond the cap
    /// (never younger than the minimum window). Runs at apply time from log
    /// timestamps, so live service and replay forget the same ids. A live
    /// hold is never forgotten: it goes to the back of the line.
    fn evict(&mut self, now_ms: u64) {
        let cutoff = now_ms.saturating_sub(self.limits.window_ms);
        let mut rotated = 0;
        while let Some(&(ts, is_receipt, id)) = self.fifo.front() {
            let over = self.id_count() > self.limits.max_ids && ts + self.limits.min_window_ms <= now_ms;
            if ts >= cutoff && !over {
                break;
            }
            self.fifo.pop_front();
            if is_receipt {
                self.receipts.remove(&id);
            } else if matches!(self.ids.get(&id).map(|e| &e.state), Some(IdState::Held { .. })) {
                self.fifo.push_back((now_ms, false, id));
                rotated += 1;
                if rotated > self.fifo.len() {
                    break;
                }
            } else {
                self.ids.remove(&id);
            }
        }
    }

    /// Holds whose deadline has passed at `now_ms`, oldest first.
    pub fn expired_holds(&self, now_ms: u64, max: usize) -> Vec<u64> {
        self.deadlines.iter().take_while(|(d, _)| *d <= now_ms).take(max).map(|(_, id)| *id).collect()
    }

    /// Serializes the durable state (rows, ids, receipts; not pending) at once.
    pub fn encode(&self) -> Vec<u8> {
        let mut job = self.begin_snapshot(self.applied_lsn);
        while !self.snapshot_step(&mut job) {}
        job.into_bytes()
    }

    /// Starts a snapshot as of `lsn` (every record up to it applied, none
    /// after): writes the rows. Layout: u64 lsn, u64 row count, rows
    /// (item, center, on_hand, held); then per id part: u64 count, receipts
    /// (id, lsn, ts); u64 count, ids (id, lsn, ts, is_hold, state, a, b, lines).
    pub fn begin_snapshot(&self, lsn: u64) -> SnapshotJob {
        let mut out = Vec::with_capacity(self.row_count() * 28 + self.id_count() * 70 + 64);
        out.extend_from_slice(&lsn.to_le_bytes());
        out.extend_from_slice(&(self.row_count() as u64).to_le_bytes());
        for (item, v) in &self.rows {
            for (fc, r) in v {
                out.extend_from_slice(&item.to_le_bytes());
                out.extend_from_slice(&fc.to_le_bytes());
                out.extend_from_slice(&r.on_hand.to_le_bytes());
                out.extend_from_slice(&r.held.to_le_bytes());
            }
        }
        SnapshotJob { lsn, buf: out, next_part: 0 }
    }

    /// Writes the next part of the id tables; true when the snapshot is complete.
    pub fn snapshot_step(&self, job: &mut SnapshotJob) -> bool {
        if job.next_part >= SPLIT_PARTS {
            return true;
        }
        let i = job.next_part;
        job.next_part += 1;
        let out = &mut job.buf;
        let put = |out: &mut Vec<u8>, v: u64| out.extend_from_slice(&v.to_le_bytes());
        let at = out.len();
        put(out, 0);
        let mut n = 0u64;
        for (id, (lsn, ts)) in self.receipts.part(i) {
            if *lsn <= job.lsn {
                put(out, *id);
                put(out, *lsn);
                put(out, *ts);
                n += 1;
            }
        }
        out[at..at + 8].copy_from_slice(&n.to_le_bytes());
        let at = out.len();
        put(out, 0);
        let mut n = 0u64;
        for (id, e) in self.ids.part(i) {
            if e.lsn > job.lsn {
                continue;
            }
            n += 1;
            put(out, *id);
            put(out, e.lsn);
            put(out, e.ts_ms);
            out.push(e.is_hold as u8);
            let (tag, a, b) = match e.state {
                IdState::Held { deadline_ms } => (0u8, deadline_ms, 0),
                IdState::Released { lsn, expired } => (1, lsn, expired as u64),
                IdState::Ordered { confirm_lsn } => (2, confirm_lsn.map_or(0, |l| l + 1), 0),
                IdState::Cancelled { lsn, confirm_lsn } => (3, lsn, confirm_lsn.map_or(0, |l| l + 1)),
            };
            out.push(tag);
            put(out, a);
            put(out, b);
            // Lines as a record body (tag, id, count, lines), read back by `absorb`.
            out.push(1);
            put(out, 0);
            put_lines(out, &e.lines);
        }
        out[at..at + 8].copy_from_slice(&n.to_le_bytes());
        job.next_part >= SPLIT_PARTS
    }

    /// Adds the state of an encoded snapshot (of any shard count) to this store,
    /// keeping only what this store owns.
    pub fn absorb(&mut self, buf: &[u8]) -> Result<(), String> {
        let mut r = Reader::new(buf);
        let e = |e: stockd_protocol::DecodeError| e.0;
        let lsn = r.u64("lsn").map_err(e)?;
        self.applied_lsn = self.applied_lsn.max(lsn);
        for _ in 0..r.u64("rows").map_err(e)? {
            let key = r.key().map_err(e)?;
            let on_hand = r.u64("on_hand").map_err(e)?;
            let held = r.u64("held").map_err(e)?;
            if held > on_hand || on_hand > STOCK_MAX {
                return Err(format!("row {key:?}: held {held} > on_hand {on_hand} or above max"));
            }
            if self.owns_item(key.item) {
                *self.row_mut(key) = Row { on_hand, held, ..Row::default() };
            }
        }
        for _ in 0..SPLIT_PARTS {
            for _ in 0..r.u64("receipts").map_err(e)? {
                let id = r.u64("id").map_err(e)?;
                let v = (r.u64("lsn").map_err(e)?, r.u64("ts").map_err(e)?);
                if shard_of(id, self.shards) == self.shard {
                    self.receipts.insert(id, v);
                }
            }
            for _ in 0..r.u64("ids").map_err(e)? {
                let id = r.u64("id").map_err(e)?;
                let lsn = r.u64("lsn").map_err(e)?;
                let ts_ms = r.u64("ts").map_err(e)?;
                let is_hold = r.u8("is_hold").map_err(e)? != 0;
                let tag = r.u8("state").map_err(e)?;
                let a = r.u64("a").map_err(e)?;
                let b = r.u64("b").map_err(e)?;
                let opt = |v: u64| v.checked_sub(1);
                let state = match tag {
                    0 => IdState::Held { deadline_ms: a },
                    1 => IdState::Released { lsn: a, expired: b != 0 },
                    2 => IdState::Ordered { confirm_lsn: opt(a) },
                    3 => IdState::Cancelled { lsn: a, confirm_lsn: opt(b) },
                    t => return Err(format!("unknown id state {t}")),
                };
                // Lines are stored as a record body: tag, id, count, lines.
                let start = buf.len() - r.remaining();
                let n = {
                    let mut peek = Reader::new(&buf[start + 9..]);
                    peek.u16("lines").map_err(e)? as usize
                };
                let len = 9 + 2 + n * 16;
                let m = Mutation::decode(r.bytes(len, "lines").map_err(e)?)?;
                if shard_of(id, self.shards) == self.shard {
                    if let IdState::Held { deadline_ms } = state {
                        self.deadlines.insert((deadline_ms, id));
                    }
                    self.ids.insert(id, IdEntry { lsn, ts_ms, is_hold, lines: m.lines, state });
                }
            }
        }
        r.finish().map_err(e)?;
        self.rebuild_fifo();
        Ok(())
    }

    fn rebuild_fifo(&mut self) {
        let mut all: Vec<(u64, u64, bool, u64)> = self
            .receipts
            .iter()
            .map(|(id, (lsn, ts))| (*lsn, *ts, true, *id))
            .chain(self.ids.iter().map(|(id, e)| (e.lsn, e.ts_ms, false, *id)))
            .collect();
        all.sort_unstable();
        self.fifo = all.into_iter().map(|(_, ts, r, id)| (ts, r, id)).collect();
    }

    /// Splits a whole-state store into the stores of `shards` shards.
    pub fn split(self, shards: usize) -> Vec<Store> {
        let bytes = self.encode();
        (0..shards)
            .map(|i| {
                let mut s = Store::new(i, shards, self.limits);
                s.absorb(&bytes).expect("a store re-reads its own encoding");
                s
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
