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
    /// The part an id lives in (also the snapshot step that writes it).
    pub fn part_index(id: u64) -> usize {
        Self::part_of(id)
    }
    /// Empties the map, yielding every entry.
    pub fn drain(&mut self) -> impl Iterator<Item = (u64, V)> + '_ {
        self.len = 0;
        self.parts.iter_mut().flat_map(|p| p.drain())
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

/// A log record's payload: a mutation, or the shard layout that the records
/// after it were applied under.
///
/// Which ids a shard forgets depends on which ids it owns, so replay must
/// use the layout the live server used. A server that starts with another
/// shard count than the log's last layout logs a `Layout` record before it
/// serves; replay regroups its stores at that record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogRecord {
    Mutation(Mutation),
    Layout { shards: u16 },
}

/// Record type of a [`LogRecord::Layout`]; mutations use 1 to 7.
const LAYOUT_TAG: u8 = 8;

impl LogRecord {
    pub fn layout(shards: usize) -> Vec<u8> {
        let shards = u16::try_from(shards).expect("shard counts fit in a u16");
        let mut out = vec![LAYOUT_TAG];
        out.extend_from_slice(&shards.to_le_bytes());
        out
    }

    pub fn decode(buf: &[u8]) -> Result<LogRecord, String> {
        if buf.first() != Some(&LAYOUT_TAG) {
            return Mutation::decode(buf).map(LogRecord::Mutation);
        }
        let mut r = Reader::new(&buf[1..]);
        let shards = r.u16("shards").map_err(|e| e.0)?;
        r.finish().map_err(|e| e.0)?;
        if shards == 0 {
            return Err("layout record with 0 shards".into());
        }
        Ok(LogRecord::Layout { shards })
    }
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

/// A place in the log: a record's LSN and its timestamp.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogStamp {
    pub lsn: u64,
    pub ts_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdEntry {
    /// LSN of the ORDER or RESERVE that created the id.
    pub lsn: u64,
    pub ts_ms: u64,
    pub is_hold: bool,
    pub lines: Vec<Line>,
    pub state: IdState,
    /// The record from which the id ages towards being forgotten: its
    /// creation for an order, its confirmation or release for a hold. None
    /// while a hold is live: a live hold is never forgotten.
    pub aging_from: Option<LogStamp>,
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
    /// Receipt id -> the record that created it.
    receipts: SplitMap<LogStamp>,
    /// Ids that may be forgotten, in the order they began to age, which is
    /// LSN order: (ts_ms aging began, is_receipt, id). Every receipt and
    /// every id entry with `aging_from` is here exactly once.
    fifo: VecDeque<(u64, bool, u64)>,
    /// Holds not yet confirmed or released: (deadline_ms, id).
    deadlines: BTreeSet<(u64, u64)>,
    /// Prepared, undecided mutations: txn -> the deltas reserved for it here.
    pending: IdMap<Vec<(Key, i64, i64)>>,
    /// LSN of the last record applied.
    pub applied_lsn: u64,
    /// A snapshot being written part by part.
    capture: Option<Capture>,
}

/// A snapshot being serialized: the rows exactly as of `lsn` at once, then
/// the id tables one part per step, so that a shard with millions of ids
/// never stops for the whole table at once.
///
/// The id tables are exact as of `lsn` too: before a change after `lsn`
/// touches an id in a part not yet written, its entry as of `lsn` is kept
/// aside (a before-image) and written instead. Replay after `lsn` then sees
/// exactly the state the live shard had, and forgets the same ids.
struct Capture {
    lsn: u64,
    next_part: usize,
    buf: Vec<u8>,
    /// Per part: entries as of `lsn` of ids changed since (None: not in the snapshot).
    ids_before: Vec<IdMap<Option<IdEntry>>>,
    receipts_before: Vec<IdMap<Option<LogStamp>>>,
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
            capture: None,
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
                Some(r) => Err(Response::Duplicate { lsn: r.lsn }),
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
        let stamp = LogStamp { lsn, ts_ms };
        match m.op {
            Op::Order { .. } | Op::Reserve { .. } => {
                self.capture_id(id);
                let (state, aging_from) = match m.op {
                    Op::Reserve { ttl_ms, .. } => {
                        let deadline_ms = ts_ms + ttl_ms as u64;
                        self.deadlines.insert((deadline_ms, id));
                        (IdState::Held { deadline_ms }, None)
                    }
                    _ => (IdState::Ordered { confirm_lsn: None }, Some(stamp)),
                };
                let is_hold = aging_from.is_none();
                self.ids
                    .insert(id, IdEntry { lsn, ts_ms, is_hold, lines: m.lines.clone(), state, aging_from });
                if aging_from.is_some() {
                    self.fifo.push_back((ts_ms, false, id));
                }
            }
            Op::Inbound { .. } => {
                self.capture_receipt(id);
                self.receipts.insert(id, stamp);
                self.fifo.push_back((ts_ms, true, id));
            }
            Op::Cancel { .. } | Op::Confirm { .. } | Op::Release { .. } => {
                self.capture_id(id);
                let Some(e) = self.ids.get_mut(&id) else { return };
                let was_held = match e.state {
                    IdState::Held { deadline_ms } => {
                        self.deadlines.remove(&(deadline_ms, id));
                        true
                    }
                    _ => false,
                };
                e.state = match (&m.op, &e.state) {
                    (Op::Cancel { .. }, IdState::Ordered { confirm_lsn }) => {
                        IdState::Cancelled { lsn, confirm_lsn: *confirm_lsn }
                    }
                    (Op::Confirm { .. }, _) => IdState::Ordered { confirm_lsn: Some(lsn) },
                    (Op::Release { expired, .. }, _) => IdState::Released { lsn, expired: *expired },
                    (_, s) => s.clone(),
                };
                // A hold that is settled starts to age now, at the back of the line.
                if was_held && !matches!(e.state, IdState::Held { .. }) {
                    e.aging_from = Some(stamp);
                    self.fifo.push_back((ts_ms, false, id));
                }
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

    /// Forgets ids that aged past the window, and the oldest ones beyond the
    /// cap (never younger than the minimum window). Runs at apply time from
    /// log timestamps on the shard that owns the id, so live service and a
    /// replay under the same layout forget the same ids. Live holds are not
    /// in the line at all.
    fn evict(&mut self, now_ms: u64) {
        let cutoff = now_ms.saturating_sub(self.limits.window_ms);
        while let Some(&(ts, is_receipt, id)) = self.fifo.front() {
            let over = self.id_count() > self.limits.max_ids && ts + self.limits.min_window_ms <= now_ms;
            if ts >= cutoff && !over {
                break;
            }
            self.fifo.pop_front();
            if is_receipt {
                self.capture_receipt(id);
                let gone = self.receipts.remove(&id);
                assert!(gone.is_some(), "invariant: every receipt in the eviction line is remembered ({id})");
            } else {
                self.capture_id(id);
                let gone = self.ids.remove(&id);
                assert!(
                    gone.is_some_and(|e| e.aging_from.is_some()),
                    "invariant: every id in the eviction line is remembered and not a live hold ({id})"
                );
            }
        }
    }

    /// Holds whose deadline has passed at `now_ms`, oldest first.
    pub fn expired_holds(&self, now_ms: u64, max: usize) -> Vec<u64> {
        self.deadlines.iter().take_while(|(d, _)| *d <= now_ms).take(max).map(|(_, id)| *id).collect()
    }

    /// Keeps an order or hold id's entry as of the snapshot's LSN before it changes.
    fn capture_id(&mut self, id: u64) {
        let Some(c) = self.capture.as_mut() else { return };
        let part = SplitMap::<IdEntry>::part_index(id);
        if part < c.next_part || c.ids_before[part].contains_key(&id) {
            return;
        }
        let before = self.ids.get(&id).filter(|e| e.lsn <= c.lsn).cloned();
        c.ids_before[part].insert(id, before);
    }

    /// Keeps a receipt as of the snapshot's LSN before it changes.
    fn capture_receipt(&mut self, id: u64) {
        let Some(c) = self.capture.as_mut() else { return };
        let part = SplitMap::<LogStamp>::part_index(id);
        if part < c.next_part || c.receipts_before[part].contains_key(&id) {
            return;
        }
        let before = self.receipts.get(&id).filter(|r| r.lsn <= c.lsn).copied();
        c.receipts_before[part].insert(id, before);
    }

    /// Serializes the durable state (rows, ids, receipts; not pending) at once.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_rows(self.applied_lsn, &mut out);
        for part in 0..SPLIT_PARTS {
            self.write_id_part(part, self.applied_lsn, None, &mut out);
        }
        out
    }

    /// Starts a snapshot as of `lsn` (every record up to it applied, none
    /// after): writes the rows now; [`Store::snapshot_step`] writes the ids.
    pub fn begin_snapshot(&mut self, lsn: u64) {
        assert!(self.capture.is_none(), "invariant: one snapshot at a time per shard");
        let mut buf = Vec::with_capacity(self.row_count() * 32 + self.id_count() * 80 + 64);
        self.write_rows(lsn, &mut buf);
        self.capture = Some(Capture {
            lsn,
            next_part: 0,
            buf,
            ids_before: (0..SPLIT_PARTS).map(|_| IdMap::default()).collect(),
            receipts_before: (0..SPLIT_PARTS).map(|_| IdMap::default()).collect(),
        });
    }

    pub fn snapshot_in_progress(&self) -> bool {
        self.capture.is_some()
    }

    /// Writes the next part of the id tables; returns (lsn, payload) when the
    /// snapshot is complete.
    pub fn snapshot_step(&mut self) -> Option<(u64, Vec<u8>)> {
        let mut c = self.capture.take()?;
        let part = c.next_part;
        let before = (std::mem::take(&mut c.ids_before[part]), std::mem::take(&mut c.receipts_before[part]));
        self.write_id_part(part, c.lsn, Some(&before), &mut c.buf);
        c.next_part += 1;
        if c.next_part < SPLIT_PARTS {
            self.capture = Some(c);
            return None;
        }
        Some((c.lsn, c.buf))
    }

    /// Finishes a snapshot in progress at once.
    pub fn finish_snapshot(&mut self) -> Option<(u64, Vec<u8>)> {
        loop {
            self.capture.as_ref()?;
            if let Some(done) = self.snapshot_step() {
                return Some(done);
            }
        }
    }

    /// Layout: magic, u64 lsn, u64 row count, rows (item, center, on_hand, held).
    fn write_rows(&self, lsn: u64, out: &mut Vec<u8>) {
        out.extend_from_slice(SNAPSHOT_MAGIC);
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
    }

    /// One part of the id tables as of `lsn`: u64 count, receipts (id, lsn,
    /// ts); u64 count, ids (id, lsn, ts, is_hold, state tag, state_lsn,
    /// state_extra, aging_lsn, aging_ts, u16 line count, lines). Entries in
    /// `before` replace the live ones (see [`Capture`]).
    fn write_id_part(&self, part: usize, lsn: u64, before: Option<&BeforeImages>, out: &mut Vec<u8>) {
        let put = |out: &mut Vec<u8>, v: u64| out.extend_from_slice(&v.to_le_bytes());
        let (ids_before, receipts_before) = match before {
            Some((i, r)) => (Some(i), Some(r)),
            None => (None, None),
        };
        let live_receipts = self
            .receipts
            .part(part)
            .iter()
            .filter(|(id, r)| r.lsn <= lsn && !receipts_before.is_some_and(|b| b.contains_key(id)))
            .map(|(id, r)| (*id, *r));
        let kept_receipts = receipts_before.into_iter().flatten().filter_map(|(id, r)| r.map(|r| (*id, r)));
        let receipts: Vec<(u64, LogStamp)> = live_receipts.chain(kept_receipts).collect();
        put(out, receipts.len() as u64);
        for (id, r) in receipts {
            put(out, id);
            put(out, r.lsn);
            put(out, r.ts_ms);
        }
        let live_ids = self
            .ids
            .part(part)
            .iter()
            .filter(|(id, e)| e.lsn <= lsn && !ids_before.is_some_and(|b| b.contains_key(id)));
        let kept_ids = ids_before.into_iter().flatten().filter_map(|(id, e)| e.as_ref().map(|e| (id, e)));
        let ids: Vec<(&u64, &IdEntry)> = live_ids.chain(kept_ids).collect();
        put(out, ids.len() as u64);
        for (id, e) in ids {
            put(out, *id);
            put(out, e.lsn);
            put(out, e.ts_ms);
            out.push(e.is_hold as u8);
            let (tag, state_lsn, state_extra) = match e.state {
                IdState::Held { deadline_ms } => (0u8, deadline_ms, 0),
                IdState::Released { lsn, expired } => (1, lsn, expired as u64),
                IdState::Ordered { confirm_lsn } => (2, confirm_lsn.map_or(0, |l| l + 1), 0),
                IdState::Cancelled { lsn, confirm_lsn } => (3, lsn, confirm_lsn.map_or(0, |l| l + 1)),
            };
            out.push(tag);
            put(out, state_lsn);
            put(out, state_extra);
            let aging = e.aging_from.unwrap_or(LogStamp { lsn: 0, ts_ms: 0 });
            put(out, aging.lsn);
            put(out, aging.ts_ms);
            put_lines(out, &e.lines);
        }
    }

    /// Adds the state of an encoded snapshot (of any shard count) to this store,
    /// keeping only what this store owns.
    pub fn absorb(&mut self, buf: &[u8]) -> Result<(), String> {
        let mut r = Reader::new(buf);
        let e = |e: stockd_protocol::DecodeError| e.0;
        if r.bytes(SNAPSHOT_MAGIC.len(), "magic").map_err(e)? != SNAPSHOT_MAGIC {
            return Err("not a stockd state snapshot of this format (written by another version?)".into());
        }
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
                let stamp = LogStamp { lsn: r.u64("lsn").map_err(e)?, ts_ms: r.u64("ts").map_err(e)? };
                if shard_of(id, self.shards) == self.shard {
                    self.receipts.insert(id, stamp);
                }
            }
            for _ in 0..r.u64("ids").map_err(e)? {
                let (id, entry) = read_id_entry(&mut r).map_err(e)?;
                if shard_of(id, self.shards) == self.shard {
                    self.insert_entry(id, entry);
                }
            }
        }
        r.finish().map_err(e)?;
        self.rebuild_fifo();
        Ok(())
    }

    fn insert_entry(&mut self, id: u64, entry: IdEntry) {
        if let IdState::Held { deadline_ms } = entry.state {
            self.deadlines.insert((deadline_ms, id));
        }
        self.ids.insert(id, entry);
    }

    /// The eviction line from the tables: everything that ages, in LSN order.
    fn rebuild_fifo(&mut self) {
        let mut all: Vec<(u64, u64, bool, u64)> = self
            .receipts
            .iter()
            .map(|(id, r)| (r.lsn, r.ts_ms, true, *id))
            .chain(self.ids.iter().filter_map(|(id, e)| e.aging_from.map(|a| (a.lsn, a.ts_ms, false, *id))))
            .collect();
        all.sort_unstable();
        self.fifo = all.into_iter().map(|(_, ts, r, id)| (ts, r, id)).collect();
    }

    /// Moves the durable state of `stores` (any layout) into the stores of
    /// `shards` shards. Nothing is forgotten on the way: the new stores hold
    /// exactly the ids the old ones did, and their eviction lines keep LSN order.
    pub fn regroup(stores: Vec<Store>, shards: usize, limits: IdLimits) -> Vec<Store> {
        let mut out: Vec<Store> = (0..shards).map(|i| Store::new(i, shards, limits)).collect();
        for mut s in stores {
            assert!(
                s.pending.is_empty() && s.capture.is_none(),
                "invariant: only a quiet store (no mutation or snapshot in flight) is regrouped"
            );
            for (item, rows) in s.rows.drain() {
                let to = &mut out[shard_of(item, shards)];
                to.row_count += rows.len();
                to.rows.insert(item, rows);
            }
            for (id, entry) in s.ids.drain() {
                out[shard_of(id, shards)].insert_entry(id, entry);
            }
            for (id, stamp) in s.receipts.drain() {
                out[shard_of(id, shards)].receipts.insert(id, stamp);
            }
            for o in out.iter_mut() {
                o.applied_lsn = o.applied_lsn.max(s.applied_lsn);
            }
        }
        for o in out.iter_mut() {
            o.rebuild_fifo();
        }
        out
    }
}

/// The before-images of one part: ids, receipts.
type BeforeImages = (IdMap<Option<IdEntry>>, IdMap<Option<LogStamp>>);

/// Marks a state snapshot payload of this layout (the 2nd: ids carry their aging stamp).
const SNAPSHOT_MAGIC: &[u8; 8] = b"STKSTAT2";

fn read_id_entry(r: &mut Reader<'_>) -> Result<(u64, IdEntry), stockd_protocol::DecodeError> {
    let id = r.u64("id")?;
    let lsn = r.u64("lsn")?;
    let ts_ms = r.u64("ts")?;
    let is_hold = r.u8("is_hold")? != 0;
    let tag = r.u8("state")?;
    let state_lsn = r.u64("state_lsn")?;
    let state_extra = r.u64("state_extra")?;
    let opt = |v: u64| v.checked_sub(1);
    let state = match tag {
        0 => IdState::Held { deadline_ms: state_lsn },
        1 => IdState::Released { lsn: state_lsn, expired: state_extra != 0 },
        2 => IdState::Ordered { confirm_lsn: opt(state_lsn) },
        3 => IdState::Cancelled { lsn: state_lsn, confirm_lsn: opt(state_extra) },
        t => return Err(stockd_protocol::DecodeError(format!("unknown id state {t}"))),
    };
    let aging = LogStamp { lsn: r.u64("aging_lsn")?, ts_ms: r.u64("aging_ts")? };
    let aging_from = (aging.lsn != 0).then_some(aging);
    if aging_from.is_none() != matches!(state, IdState::Held { .. }) {
        return Err(stockd_protocol::DecodeError(format!("id {id}: aging stamp does not fit its state")));
    }
    let n = r.u16("lines")? as usize;
    let mut lines = Vec::with_capacity(n);
    for _ in 0..n {
        let key = r.key()?;
        lines.push(Line { key, qty: r.u32("qty")? });
    }
    Ok((id, IdEntry { lsn, ts_ms, is_hold, lines, state, aging_from }))
}

#[cfg(test)]
mod tests;
