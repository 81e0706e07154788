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
//!
//! Files: this one (the store, its rows, prepare/apply/abort, regrouping),
//! [`plan`] (commands and step 1), [`ids`] (the idempotency memory and
//! forgetting), [`snapshot`] (the snapshot codec) and [`varint`] (its
//! compact integers), [`answer`] (answers and
//! refusals), [`hash`] and [`id_table`] (id-keyed tables), [`chunked`]
//! (their storage, grown without copies), [`rows`] (the rows), [`index`]
//! (the u64 -> u32 table both build on).

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashSet};

use stockd_protocol::{shard_of, Key, MAX_CENTERS_PER_ITEM, STOCK_MAX};
pub use stockd_record::{Delta, LogRecord, Mutation, Op};

pub mod answer;
pub mod chunked;
pub mod hash;
pub mod id_table;
pub mod ids;
pub mod index;
pub mod plan;
pub mod rows;
pub mod snapshot;
pub mod varint;

pub use answer::{Answer, IdKind, Refusal};
use chunked::ChunkedQueue;
pub use hash::{IdHashBuilder, IdMap, SplitMap, SPLIT_PARTS};
use ids::AgingId;
pub use ids::{IdEntry, IdLimits, IdLines, IdState, LogStamp};
pub use plan::{Command, IdKey};
pub use rows::Row;
use rows::{Found, Pending, PendingRows, RowKey, Rows};
use snapshot::Capture;
pub use snapshot::SnapshotPiece;

/// Keys whose lookups are started together (see `Rows::prefetch`): enough
/// to keep the memory system busy, few enough that their lines stay in L1.
pub const PREFETCH_KEYS: usize = 32;

/// The rows and ids of one shard (or, during recovery, of all of them).
pub struct Store {
    pub shard: usize,
    pub shards: usize,
    limits: IdLimits,
    rows: Rows,
    /// What prepared mutations reserve, for the rows they touch (only those).
    pend: PendingRows,
    ids: SplitMap<IdEntry>,
    /// Receipt id -> the record that created it.
    receipts: SplitMap<LogStamp>,
    /// Ids that may be forgotten, in the order they began to age, which is
    /// LSN order. Every receipt and every id entry with `aging_from` is
    /// here exactly once.
    fifo: ChunkedQueue<AgingId>,
    /// Holds not yet confirmed or released: (deadline_ms, id).
    deadlines: BTreeSet<(u64, u64)>,
    /// Prepared, undecided mutations that reserved room here. What they
    /// reserved are the deltas of their lines this shard owns, which
    /// settling or aborting one gives back (from the mutation): nothing is
    /// stored per line, so preparing allocates nothing, however many lines.
    pending: HashSet<u64, IdHashBuilder>,
    /// LSN of the last record applied.
    pub applied_lsn: u64,
    /// A snapshot being written part by part.
    capture: Option<Capture>,
    /// Slots of the id tables one snapshot step writes at most.
    snapshot_step_slots: usize,
    /// Bytes of a snapshot held before they are handed over as a piece.
    snapshot_piece_bytes: usize,
    /// Buffers of pieces already written, to be filled again while the
    /// snapshot lasts.
    snapshot_spares: Vec<Vec<u8>>,
}

impl Store {
    pub fn new(shard: usize, shards: usize, limits: IdLimits) -> Store {
        Store {
            shard,
            shards,
            limits,
            rows: Rows::default(),
            pend: PendingRows::default(),
            ids: SplitMap::default(),
            receipts: SplitMap::default(),
            fifo: ChunkedQueue::default(),
            deadlines: BTreeSet::new(),
            pending: HashSet::default(),
            applied_lsn: 0,
            capture: None,
            snapshot_step_slots: snapshot::SNAPSHOT_STEP_SLOTS,
            snapshot_piece_bytes: snapshot::SNAPSHOT_PIECE_BYTES,
            snapshot_spares: Vec::new(),
        }
    }

    pub fn owns_item(&self, item: u64) -> bool {
        shard_of(item, self.shards) == self.shard
    }

    pub fn owns_id(&self, id: u64) -> bool {
        shard_of(id, self.shards) == self.shard
    }

    pub fn row(&self, key: Key) -> Option<&Row> {
        self.rows.get(key)
    }

    fn row_mut(&mut self, key: Key) -> &mut Row {
        self.capture_row(key);
        self.rows.get_or_insert(key)
    }

    /// What prepared mutations reserve on a row.
    fn pending_on(&self, key: Key) -> Pending {
        if self.pend.is_empty() {
            return Pending::default();
        }
        self.pend.get(&RowKey(key)).copied().unwrap_or_default()
    }

    /// Durable available units; unknown rows have none.
    pub fn available(&self, key: Key) -> u64 {
        self.row(key).map_or(0, Row::available)
    }

    /// Durable available units of many rows, in order, each handed to
    /// `each`; their lookups' cache misses overlapped, each key looked up once
    /// (see `Rows::locate`).
    pub fn available_each(&self, keys: &[Key], mut each: impl FnMut(u64)) {
        let mut found = [Found::Ask; PREFETCH_KEYS];
        for chunk in keys.chunks(PREFETCH_KEYS) {
            let found = &mut found[..chunk.len()];
            self.rows.locate(chunk, found);
            for (k, f) in chunk.iter().zip(found.iter()) {
                each(match *f {
                    Found::At(slot) => self.rows.at(slot).available(),
                    Found::Absent => 0,
                    Found::Ask => self.available(*k),
                });
            }
        }
    }

    /// Brings the rows of `mutations` that this store owns into the cache,
    /// all at once, before they are prepared or applied one by one.
    pub fn prefetch_rows<'a>(&self, mutations: impl Iterator<Item = &'a Mutation> + Clone) {
        let keys = mutations.flat_map(|m| m.lines.iter().map(|l| l.key));
        if self.shards == 1 {
            // Every row is this store's: no hash and division per key (the
            // walk goes over the keys twice).
            self.rows.prefetch(keys);
        } else {
            self.rows.prefetch(keys.filter(|k| self.owns_item(k.item)));
        }
    }

    /// Brings where the ids of `mutations` live (or would) into the cache,
    /// all at once, before they are applied one by one.
    pub fn prefetch_ids<'a>(&self, mutations: impl Iterator<Item = &'a Mutation>) {
        for m in mutations.filter(|m| self.takes_id(m)) {
            match m.op {
                Op::Inbound { .. } => self.receipts.prefetch(m.owner_id()),
                _ => self.ids.prefetch(m.owner_id()),
            }
        }
    }

    /// Brings the rows of `keys` and the entries of `ids` that this store
    /// owns into the cache, all at once, before requests look them up one
    /// by one. Changes nothing.
    pub fn prefetch_lookups(&self, keys: &[Key], ids: &[IdKey]) {
        for id in ids.iter().filter(|k| self.owns_id(k.id())) {
            match *id {
                IdKey::OrderOrHold(id) => self.ids.prefetch(id),
                IdKey::Receipt(id) => self.receipts.prefetch(id),
            }
        }
        self.rows.prefetch(keys.iter().copied().filter(|k| self.owns_item(k.item)));
    }

    /// Every center of one item, ascending by center id.
    pub fn item(&self, item: u64) -> Vec<(u32, u64)> {
        let mut v: Vec<_> = self.rows.of_item(item).map(|(fc, r)| (fc, r.available())).collect();
        v.sort_unstable();
        v
    }

    /// The limits of the id memory this store was made with.
    pub fn id_limits(&self) -> IdLimits {
        self.limits
    }

    pub fn row_count(&self) -> usize {
        self.rows.len()
    }

    /// Room for about `ids` more remembered ids (at most the per-shard cap),
    /// so that a replay that creates them does not re-hash the table again
    /// and again.
    pub fn reserve_ids(&mut self, ids: usize) {
        self.ids.reserve(ids.min(self.limits.max_ids));
    }

    /// Every row this store owns: its key, on hand and held.
    pub fn rows(&self) -> impl Iterator<Item = (Key, u64, u64)> + '_ {
        self.rows.iter().map(|(key, r)| (key, r.on_hand, r.held))
    }

    /// Step 2, on every shard owning a row of `m`: check this shard's lines and
    /// reserve room for them under `txn`. All or nothing on this shard.
    pub fn prepare(&mut self, txn: u64, m: &Mutation) -> Result<(), Refusal> {
        // Lines before this one are reserved (those this shard owns).
        let mut reserved_upto = 0;
        let mut owns_a_row = false;
        let mut result = Ok(());
        for (i, d) in m.deltas().enumerate() {
            if !self.owns_item(d.key.item) {
                continue;
            }
            let earlier = m.deltas().take(reserved_upto);
            if let Err(r) = self.reserve(i as u16, d, &m.op, earlier) {
                result = Err(r);
                break;
            }
            reserved_upto = i + 1;
            owns_a_row = true;
        }
        if result.is_err() {
            self.give_back(m, reserved_upto);
        } else if owns_a_row {
            let fresh = self.pending.insert(txn);
            assert!(fresh, "invariant: a transaction is prepared once per shard ({txn})");
        }
        result
    }

    /// Returns the room the first `lines` lines of `m` reserved here (the
    /// ones this shard owns).
    fn give_back(&mut self, m: &Mutation, lines: usize) {
        for d in m.deltas().take(lines) {
            if self.owns_item(d.key.item) {
                self.unreserve(d);
            }
        }
    }

    /// Checks line `line` (`d`) against its row and what is reserved on the
    /// row already, and if it fits, reserves room for it (making the row if
    /// it is new). `earlier`: the lines of the same mutation reserved here.
    /// One lookup of the row and one of its reservations: a hot row is
    /// checked and reserved in one probe of each table.
    fn reserve(
        &mut self,
        line: u16,
        d: Delta,
        op: &Op,
        earlier: impl Iterator<Item = Delta>,
    ) -> Result<(), Refusal> {
        let slot = self.rows.slot_of(d.key);
        let row = slot.map_or_else(Row::default, |at| *self.rows.at(at));
        let (take, add) = (units_taken(d), d.on_hand.max(0) as u64);
        let pend = match self.pend.entry(RowKey(d.key)) {
            Entry::Occupied(mut o) => {
                check_line(line, &row, o.get(), d, op, earlier)?;
                let p = o.get_mut();
                p.take += take;
                p.add += add;
                p.n += 1;
                *p
            }
            // Nothing is inserted unless the line fits.
            Entry::Vacant(v) => {
                check_line(line, &row, &Pending::default(), d, op, earlier)?;
                if slot.is_none() && self.rows.of_item(d.key.item).count() >= MAX_CENTERS_PER_ITEM {
                    return Err(Refusal::TooManyCenters { line });
                }
                *v.insert(Pending { take, add, n: 1 })
            }
        };
        assert!(
            pend.take <= row.available(),
            "invariant: reservations never exceed available units ({row:?}, {pend:?})"
        );
        if slot.is_none() {
            // Taking makes the row (rows are never removed, so returning
            // finds it); its quantities change only when the record applies.
            self.row_mut(d.key);
        }
        Ok(())
    }

    /// Returns the room [`Store::reserve`] set aside for `d`: what is left
    /// reserved on its row.
    fn unreserve(&mut self, d: Delta) -> Pending {
        let (take, add) = (units_taken(d), d.on_hand.max(0) as u64);
        let bad = "invariant: a reservation is returned at most once";
        let Entry::Occupied(mut o) = self.pend.entry(RowKey(d.key)) else { panic!("{bad}") };
        let p = o.get_mut();
        p.take = p.take.checked_sub(take).expect(bad);
        p.add = p.add.checked_sub(add).expect(bad);
        p.n = p.n.checked_sub(1).expect(bad);
        let p = *p;
        if p.n == 0 {
            assert_eq!(p, Pending::default(), "invariant: a row's last reservation returns all of it");
            o.remove();
            self.shrink_pend();
        }
        p
    }

    /// Gives back the room a burst left in the table of reserved rows. A
    /// preload's receipts of 256 lines grew it to 16,384 buckets (655 KB,
    /// more than a core's L2), where the few hundred rows of the orders in
    /// flight then each landed on a line of their own: one cache miss per
    /// order in `reserve`, its hottest instruction. Shrunk once it is 64
    /// times larger than its contents, it holds those in a few KB.
    fn shrink_pend(&mut self) {
        const SMALL: usize = 1024;
        let (len, capacity) = (self.pend.len(), self.pend.capacity());
        if capacity > SMALL && len * 64 < capacity {
            self.pend.shrink_to((len * 4).max(SMALL / 4));
        }
    }

    /// Drops what `prepare` reserved for `txn`, whose mutation is `m` (it
    /// was refused elsewhere). Nothing if it reserved nothing here.
    pub fn abort(&mut self, txn: u64, m: &Mutation) {
        if self.pending.remove(&txn) {
            self.give_back(m, m.lines.len());
        }
    }

    /// Step 3: a durable record. `txn` names the reservation it settles (None in replay).
    /// Applies the rows this shard owns and, if it owns the id, the id's new state.
    pub fn apply(&mut self, txn: Option<u64>, lsn: u64, ts_ms: u64, m: &Mutation) {
        self.apply_rows(txn, lsn, m);
        if self.takes_id(m) {
            self.apply_id(LogStamp { lsn, ts_ms }, m);
            self.evict(ts_ms);
        }
    }

    /// Replay in two halves that may run at once, on two threads: the rows
    /// half ([`Store::split_rows`], then this) and the ids half
    /// ([`Store::apply_replayed_ids`]) of one store touch nothing in common,
    /// and together do what [`Store::apply`] does.
    pub fn apply_replayed_rows(&mut self, lsn: u64, m: &Mutation) {
        self.apply_rows(None, lsn, m);
    }

    /// The ids half of replay.
    pub fn apply_replayed_ids(&mut self, lsn: u64, ts_ms: u64, m: Mutation) {
        assert!(
            lsn > self.applied_lsn,
            "invariant: a shard applies LSNs in increasing order ({lsn} after {})",
            self.applied_lsn
        );
        self.applied_lsn = lsn;
        if self.takes_id(&m) {
            self.apply_id(LogStamp { lsn, ts_ms }, &m);
            self.evict(ts_ms);
        }
    }

    /// Moves this quiet store's rows into a new store of the same shard,
    /// for the rows half of replay; [`Store::join_rows`] brings them back.
    pub fn split_rows(&mut self) -> Store {
        assert!(
            self.pending.is_empty() && self.pend.is_empty() && self.capture.is_none(),
            "invariant: only a quiet store (no mutation or snapshot in flight) is split"
        );
        let mut rows = Store::new(self.shard, self.shards, self.limits);
        rows.rows = std::mem::take(&mut self.rows);
        rows.applied_lsn = self.applied_lsn;
        rows
    }

    /// Takes back the rows of the store [`Store::split_rows`] made.
    pub fn join_rows(&mut self, rows: Store) {
        assert!(
            self.rows.is_empty() && rows.pend.is_empty() && rows.pending.is_empty() && rows.ids.is_empty(),
            "invariant: rows are joined into the store they were split from"
        );
        self.applied_lsn = self.applied_lsn.max(rows.applied_lsn);
        self.rows = rows.rows;
    }

    /// Whether this store keeps the id of `m` (adjustments have none).
    fn takes_id(&self, m: &Mutation) -> bool {
        !matches!(m.op, Op::Adjust { .. }) && self.owns_id(m.owner_id())
    }

    fn apply_rows(&mut self, txn: Option<u64>, lsn: u64, m: &Mutation) {
        assert!(
            lsn > self.applied_lsn,
            "invariant: a shard applies LSNs in increasing order ({lsn} after {})",
            self.applied_lsn
        );
        self.applied_lsn = lsn;
        let settled = txn.map(|txn| (txn, self.pending.remove(&txn)));
        let give_back = settled.is_some_and(|(_, settled)| settled);
        let mut owns_a_row = false;
        for d in m.deltas() {
            if self.owns_item(d.key.item) {
                owns_a_row = true;
                // Each line's reservation goes first: then its row changes
                // by the line itself.
                let pend = if give_back { self.unreserve(d) } else { self.pending_on(d.key) };
                self.apply_delta(d, m, pend);
            }
        }
        if let Some((txn, settled)) = settled {
            assert_eq!(settled, owns_a_row, "invariant: a commit settles its reservation once ({txn})");
        }
    }

    /// Changes a row by one line; `pend` is what stays reserved on it.
    fn apply_delta(&mut self, d: Delta, m: &Mutation, pend: Pending) {
        let row = self.row_mut(d.key);
        let on_hand = row.on_hand.checked_add_signed(d.on_hand);
        let held = row.held.checked_add_signed(d.held);
        match (on_hand, held) {
            (Some(on_hand), Some(held)) if held <= on_hand && on_hand <= STOCK_MAX => {
                (row.on_hand, row.held) = (on_hand, held);
            }
            _ => panic!("invariant: 0 <= held <= on hand <= STOCK_MAX; {row:?} cannot take {m:?}"),
        }
        let row = *row;
        assert!(
            pend.take <= row.available(),
            "invariant: reservations never exceed available units ({row:?}, {pend:?})"
        );
    }

    /// Moves the durable state of `stores` (any layout) into the stores of
    /// `shards` shards. Nothing is forgotten on the way: the new stores hold
    /// exactly the ids the old ones did, and their eviction lines keep LSN order.
    pub fn regroup(stores: Vec<Store>, shards: usize, limits: IdLimits) -> Vec<Store> {
        let mut out: Vec<Store> = (0..shards).map(|i| Store::new(i, shards, limits)).collect();
        for mut s in stores {
            assert!(
                s.pending.is_empty() && s.pend.is_empty() && s.capture.is_none(),
                "invariant: only a quiet store (no mutation or snapshot in flight) is regrouped"
            );
            for (key, row) in s.rows.iter() {
                *out[shard_of(key.item, shards)].rows.get_or_insert(key) = *row;
            }
            s.rows = Rows::default();
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

/// Units a line takes from available (orders, holds; 0 for what adds stock).
fn units_taken(d: Delta) -> u64 {
    (d.held - d.on_hand).max(0) as u64
}

/// Whether one line of a mutation fits its row now. `taken`: the lines of
/// the same mutation already reserved on this shard.
fn check_line(
    line: u16,
    row: &Row,
    pend: &Pending,
    d: Delta,
    op: &Op,
    earlier: impl Iterator<Item = Delta>,
) -> Result<(), Refusal> {
    if let Op::Adjust { before, after, .. } = *op {
        if pend.n > 0 || row.on_hand != before {
            return Err(Refusal::Busy { line });
        }
        if after < row.held {
            return Err(Refusal::BelowHeld { held: row.held });
        }
        return Ok(());
    }
    let take = units_taken(d);
    let room = row.available().saturating_sub(pend.take);
    if take > room {
        // Units earlier lines of this same mutation reserved are not contention.
        let own: u64 = earlier.filter(|t| t.key == d.key).map(units_taken).sum();
        let contended = take + own <= row.available();
        return Err(Refusal::Insufficient { line, available: room, contended });
    }
    if d.on_hand > 0 && row.on_hand + pend.add + d.on_hand as u64 > STOCK_MAX {
        return Err(Refusal::Overflow { line });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
