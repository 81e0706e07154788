//! The idempotency memory: which order, hold and receipt ids a shard
//! remembers, what became of each, and which it forgets when.
//!
//! Ids wait in a line (`fifo`) in the order they began to age, which is LSN
//! order: an order and a receipt from the record that created them, a hold
//! from the record that confirmed or released it. A live hold is not in the
//! line and is never forgotten. Forgetting runs at apply time from log
//! timestamps on the shard that owns the id, so a replay under the same
//! layout forgets exactly what live service forgot.

use std::num::{NonZeroU32, NonZeroU64};

use stockd_protocol::{Key, Line, Lines};
use stockd_record::{Mutation, Op};
use thin_vec::ThinVec;

use super::Store;

/// The life of an order or hold id. (LSNs start at 1: a confirm LSN is
/// never 0, which lets an `Option` of one take no room of its own.)
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
        confirm_lsn: Option<NonZeroU64>,
    },
    Cancelled {
        lsn: u64,
        confirm_lsn: Option<NonZeroU64>,
    },
}

/// A place in the log: a record's LSN and its timestamp.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogStamp {
    pub lsn: u64,
    pub ts_ms: u64,
}

/// One remembered order or hold id: 56 bytes, a one-line order's line
/// included (112 before the lines became a boxed slice, the optional LSNs
/// used their niche and the aging stamp its LSN 0 for "none"; then 80 bytes
/// and a 32-byte allocation for the boxed line; then 96 with the line
/// inline in a `Lines`; 80 once [`IdLines`] kept it in 16 bytes; 56 since
/// whether it is a hold and where it ages from are read off its state).
/// Lines of more than one take an allocation of their own.
/// The id tables are the largest thing a shard keeps, and replay's critical
/// path is inserting into them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdEntry {
    /// LSN of the ORDER or RESERVE that created the id.
    pub lsn: u64,
    /// Timestamp of the record the id ages from (see
    /// [`IdEntry::aging_from`]): its creation, or for a confirmed or
    /// released hold, that confirmation or release.
    pub ts_ms: u64,
    pub lines: IdLines,
    pub state: IdState,
}

impl IdEntry {
    /// An order (`ts_ms` its record's) or a live hold.
    pub fn new(lsn: u64, ts_ms: u64, lines: IdLines, state: IdState) -> IdEntry {
        IdEntry { lsn, ts_ms, lines, state }
    }

    /// True for an id a RESERVE created: a live hold, or one confirmed
    /// (an order now, or cancelled since), or released. Only a hold has a
    /// confirmation, so the state says it.
    pub fn is_hold(&self) -> bool {
        match self.state {
            IdState::Held { .. } | IdState::Released { .. } => true,
            IdState::Ordered { confirm_lsn } | IdState::Cancelled { confirm_lsn, .. } => {
                confirm_lsn.is_some()
            }
        }
    }

    /// The record from which the id ages towards being forgotten: its
    /// creation for an order, its confirmation or release for a hold. None
    /// while a hold is live: a live hold is never forgotten. (A confirmed
    /// hold that is cancelled still ages from its confirmation.)
    pub fn aging_from(&self) -> Option<LogStamp> {
        let lsn = match self.state {
            IdState::Held { .. } => return None,
            IdState::Released { lsn, .. } => lsn,
            IdState::Ordered { confirm_lsn: Some(c) } | IdState::Cancelled { confirm_lsn: Some(c), .. } => {
                c.get()
            }
            IdState::Ordered { confirm_lsn: None } | IdState::Cancelled { confirm_lsn: None, .. } => self.lsn,
        };
        Some(LogStamp { lsn, ts_ms: self.ts_ms })
    }
}

/// The lines an id entry keeps, in 16 bytes: one line in place (most
/// orders have one; a `Lines` would take 32), more in one allocation
/// behind a thin pointer (a `ThinVec`: its length and capacity in the
/// allocation, so reading the lines is one cache miss), which leaves the
/// enum's tag room in the niche of the one line's quantity (never 0 in a
/// record; a line of 0 units would be kept on the heap, never lost).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdLines {
    One { item: u64, fc: u32, qty: NonZeroU32 },
    Many(ThinVec<Line>),
}

impl IdLines {
    pub fn of(lines: &[Line]) -> IdLines {
        if let [l] = lines {
            if let Some(qty) = NonZeroU32::new(l.qty) {
                return IdLines::One { item: l.key.item, fc: l.key.fc, qty };
            }
        }
        let mut many = ThinVec::with_capacity(lines.len());
        many.extend_from_slice(lines);
        IdLines::Many(many)
    }

    pub fn len(&self) -> usize {
        match self {
            IdLines::One { .. } => 1,
            IdLines::Many(lines) => lines.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The lines, in the order they were given.
    pub fn iter(&self) -> impl Iterator<Item = Line> + '_ {
        let (one, many) = match self {
            IdLines::One { item, fc, qty } => {
                (Some(Line { key: Key { item: *item, fc: *fc }, qty: qty.get() }), &[][..])
            }
            IdLines::Many(lines) => (None, &lines[..]),
        };
        one.into_iter().chain(many.iter().copied())
    }

    /// The lines as a record carries them.
    pub fn to_lines(&self) -> Lines {
        self.iter().collect()
    }

    /// Lines of more than one, in their allocation (finding them reads
    /// its header).
    pub fn heap(&self) -> Option<&[Line]> {
        match self {
            IdLines::One { .. } => None,
            IdLines::Many(lines) => Some(lines),
        }
    }
}

impl From<Lines> for IdLines {
    fn from(lines: Lines) -> IdLines {
        IdLines::of(&lines)
    }
}

/// A place in the eviction line: when an id began to age, whether it is a
/// receipt's, and the id, in 16 bytes (the flag in the timestamp's top
/// bit; a log timestamp in milliseconds never reaches it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct AgingId {
    ts_and_kind: u64,
    id: u64,
}

const RECEIPT_BIT: u64 = 1 << 63;

impl AgingId {
    fn new(ts_ms: u64, is_receipt: bool, id: u64) -> AgingId {
        let kind = if is_receipt { RECEIPT_BIT } else { 0 };
        AgingId { ts_and_kind: ts_ms.min(RECEIPT_BIT - 1) | kind, id }
    }

    fn ts_ms(&self) -> u64 {
        self.ts_and_kind & !RECEIPT_BIT
    }

    fn is_receipt(&self) -> bool {
        self.ts_and_kind & RECEIPT_BIT != 0
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

impl Store {
    /// True if the id is remembered in its space.
    pub fn remembers(&self, key: crate::state::IdKey) -> bool {
        match key {
            crate::state::IdKey::OrderOrHold(id) => self.ids.get(&id).is_some(),
            crate::state::IdKey::Receipt(id) => self.receipts.get(&id).is_some(),
        }
    }

    pub fn id_count(&self) -> usize {
        self.ids.len() + self.receipts.len()
    }

    pub fn id(&self, id: u64) -> Option<&IdEntry> {
        self.ids.get(&id)
    }

    /// When the newest id in the line began to age (0 if none does): a
    /// time near now by the log's clock, which a snapshot writes its
    /// times as differences from.
    pub(super) fn newest_aging_ts(&self) -> u64 {
        self.fifo.back().map_or(0, |a| a.ts_ms())
    }

    /// The record a remembered receipt id came with.
    pub fn receipt(&self, id: u64) -> Option<&LogStamp> {
        self.receipts.get(&id)
    }

    /// True if a new id cannot be remembered at `now_ms` without forgetting
    /// one younger than the minimum window.
    pub(super) fn table_full(&self, now: &impl super::plan::NowMs) -> bool {
        self.id_count() >= self.limits.max_ids
            && self.fifo.front().is_none_or(|a| a.ts_ms() + self.limits.min_window_ms > now.now_ms())
    }

    /// Forgets ids that aged past the window, and the oldest ones beyond the
    /// cap (never younger than the minimum window). Runs at apply time from
    /// log timestamps on the shard that owns the id, so live service and a
    /// replay under the same layout forget the same ids. Live holds are not
    /// in the line at all.
    pub(super) fn evict(&mut self, now_ms: u64) {
        let cutoff = now_ms.saturating_sub(self.limits.window_ms);
        while let Some(&a) = self.fifo.front() {
            let (ts, id) = (a.ts_ms(), a.id);
            let over = self.id_count() > self.limits.max_ids && ts + self.limits.min_window_ms <= now_ms;
            if ts >= cutoff && !over {
                break;
            }
            self.fifo.pop_front();
            if a.is_receipt() {
                self.capture_receipt(id);
                let gone = self.receipts.remove(&id);
                assert!(gone.is_some(), "invariant: every receipt in the eviction line is remembered ({id})");
            } else {
                self.capture_id(id);
                let gone = self.ids.remove(&id);
                assert!(
                    gone.is_some_and(|e| e.aging_from().is_some()),
                    "invariant: every id in the eviction line is remembered and not a live hold ({id})"
                );
            }
        }
    }

    /// Holds whose deadline has passed at `now_ms`, oldest first.
    pub fn expired_holds(&self, now_ms: u64, max: usize) -> Vec<u64> {
        self.deadlines.iter().take_while(|(d, _)| *d <= now_ms).take(max).map(|(_, id)| *id).collect()
    }

    pub(super) fn insert_entry(&mut self, id: u64, entry: IdEntry) {
        if let IdState::Held { deadline_ms } = entry.state {
            self.deadlines.insert((deadline_ms, id));
        }
        self.ids.insert(id, entry);
    }

    /// The eviction line from the tables: everything that ages, in LSN order.
    /// The vector is sized at once (grown from a filtered chain, it doubled
    /// and copied its way to tens of millions of entries after a snapshot
    /// load) and holds 24 bytes an entry, not 32; ties of LSN, which one
    /// record never makes, are ordered as before (time, orders before
    /// receipts, id).
    pub(super) fn rebuild_fifo(&mut self) {
        let mut all: Vec<(u64, AgingId)> = Vec::with_capacity(self.receipts.len() + self.ids.len());
        all.extend(self.receipts.iter().map(|(id, r)| (r.lsn, AgingId::new(r.ts_ms, true, id))));
        all.extend(
            self.ids
                .iter()
                .filter_map(|(id, e)| e.aging_from().map(|a| (a.lsn, AgingId::new(a.ts_ms, false, id)))),
        );
        all.sort_unstable_by_key(|(lsn, a)| (*lsn, a.ts_and_kind, a.id));
        self.fifo = all.into_iter().map(|(_, a)| a).collect();
    }

    /// The id's new state after a durable record, on the shard that owns the id.
    pub(super) fn apply_id(&mut self, stamp: LogStamp, m: &Mutation) {
        let id = m.owner_id();
        match m.op {
            Op::Order { .. } | Op::Reserve { .. } => {
                self.capture_id(id);
                let state = match m.op {
                    Op::Reserve { ttl_ms, .. } => {
                        let deadline_ms = stamp.ts_ms + ttl_ms as u64;
                        self.deadlines.insert((deadline_ms, id));
                        IdState::Held { deadline_ms }
                    }
                    _ => IdState::Ordered { confirm_lsn: None },
                };
                let entry = IdEntry::new(stamp.lsn, stamp.ts_ms, IdLines::of(&m.lines), state);
                let ages = entry.aging_from().is_some();
                let fresh = self.ids.insert(id, entry).is_none();
                assert!(fresh, "invariant: an order or hold id is created once while remembered ({id})");
                if ages {
                    self.fifo.push_back(AgingId::new(stamp.ts_ms, false, id));
                }
            }
            Op::Inbound { .. } => {
                self.capture_receipt(id);
                let fresh = self.receipts.insert(id, stamp).is_none();
                assert!(fresh, "invariant: a receipt id is applied once while remembered ({id})");
                self.fifo.push_back(AgingId::new(stamp.ts_ms, true, id));
            }
            Op::Cancel { .. } | Op::Confirm { .. } | Op::Release { .. } => self.settle(stamp, id, &m.op),
            Op::Adjust { .. } => {}
        }
    }

    /// Cancel, confirm or release: the id's next state. A hold that is
    /// settled starts to age now, at the back of the line. (The id may have
    /// been forgotten since the command was planned: then only rows change.)
    fn settle(&mut self, stamp: LogStamp, id: u64, op: &Op) {
        self.capture_id(id);
        let Some(e) = self.ids.get_mut(&id) else { return };
        let was_held = match e.state {
            IdState::Held { deadline_ms } => {
                self.deadlines.remove(&(deadline_ms, id));
                true
            }
            _ => false,
        };
        let lsn = stamp.lsn;
        e.state = match (op, &e.state) {
            (Op::Cancel { .. }, IdState::Ordered { confirm_lsn }) => {
                IdState::Cancelled { lsn, confirm_lsn: *confirm_lsn }
            }
            (Op::Confirm { .. }, _) => IdState::Ordered {
                confirm_lsn: Some(NonZeroU64::new(lsn).expect("invariant: LSNs start at 1")),
            },
            (Op::Release { expired, .. }, _) => IdState::Released { lsn, expired: *expired },
            (_, s) => s.clone(),
        };
        if was_held && !matches!(e.state, IdState::Held { .. }) {
            // It ages from this record now (its LSN is in the new state).
            e.ts_ms = stamp.ts_ms;
            debug_assert_eq!(e.aging_from(), Some(stamp));
            self.fifo.push_back(AgingId::new(stamp.ts_ms, false, id));
        }
    }
}
