//! The snapshot codec: a shard's durable state as bytes, written part by
//! part while the shard keeps serving, and read back into a store of any
//! layout.
//!
//! Payload, the fourth layout (little-endian; `v` a varint, `d(base)` a
//! value as its zigzag-coded difference from a base, both in
//! `varint.rs`): magic `STKSTAT4`, u64 lsn, u64 base_ts (a time near the
//! mark: the newest an id began to age at), u64 row count, rows (v item,
//! v center, v on_hand, v held); then for each of the 64 id parts: u64
//! receipt count, receipts (u64 id, d(lsn) lsn, d(base_ts) ts_ms); u64 id
//! count, ids (u64 id, d(lsn) lsn, d(base_ts) ts_ms, state (see
//! [`put_state`]), v line count, lines of v item, v center, v qty).
//! `ts_ms` is the timestamp the id ages from: its creation's, or for a
//! confirmed or released hold that record's. A one-line order takes ~22
//! bytes, where the third layout's fixed-width fields took 61.
//!
//! The third layout (`STKSTAT3`, written until the twenty-first session)
//! is still read: u64 lsn, u64 row count, rows (u64 item, u32 center, u64
//! on_hand, u64 held); per part u64 receipt count, receipts (u64 id, u64
//! lsn, u64 ts_ms), u64 id count, ids (u64 id, u64 lsn, u64 ts_ms, u8
//! is_hold, state (see [`read_state_v3`]), u64 aging_lsn, u64 aging_ts_ms,
//! u16 line count, lines of u64 item, u32 center, u32 qty); a live hold
//! has aging stamp 0, 0, and `is_hold` and `aging_lsn` follow from the
//! state and are checked against it.

use std::num::NonZeroU64;

use std::collections::HashMap;

use stockd_protocol::{prefetch, shard_of, DecodeError, Key, Line, Lines, Reader, STOCK_MAX};

use super::id_table::IdTable;
use super::ids::{IdEntry, IdLines, IdState, LogStamp};
use super::rows::Rows;
use super::varint;
use super::{IdHashBuilder, IdMap, Row, SplitMap, Store, SPLIT_PARTS};

/// A snapshot being serialized a stretch of at most `step` positions or
/// slots per step, so that a shard with millions of rows and ids never
/// stops for long (all rows at once took ~20 ms for 400,000 rows, a whole
/// part of an id table ~5 ms with 1 M ids, and open-loop orders showed
/// both): first the rows ([`RowsCursor`]), then the id tables.
///
/// Both are exact as of `lsn`. For ids: before a change after `lsn`
/// touches an id not yet written, its entry as of `lsn` is kept aside (a
/// before-image) and written instead, at the end of its part. Slots never
/// move (`IdTable`), so "not yet written" is: a later part, or this part at
/// or after the cursor. Replay after `lsn` then sees exactly the state the
/// live shard had, and forgets the same ids.
pub(super) struct Capture {
    /// Its LSN, and the time its times are written as differences from.
    base: Base,
    /// The rows still to write, if any (they go first).
    rows: Option<RowsCursor>,
    /// The part being written and where in it.
    next_part: usize,
    section: Section,
    /// The next slot of that section's table to write.
    cursor: usize,
    /// Where that section's entry count goes, and the entries written so far.
    count_at: usize,
    written: u64,
    /// Most slots looked at (and before-images written) per step.
    step: usize,
    buf: Vec<u8>,
    /// Per part: the entries, as of `lsn`, of ids that existed then and
    /// have changed or been forgotten since, before they were written.
    /// Ids made after the mark need none: their LSN leaves them out.
    ids_before: Vec<IdMap<IdEntry>>,
    receipts_before: Vec<IdMap<LogStamp>>,
}

/// Where a snapshot's rows section stands: the rows are walked item by
/// item in the order of the item table, whose positions stay put while no
/// item is added that grows it (then the rest is written at once first).
/// A row is "not yet written" if its item sits at or after `pos`; before
/// such a row changes, its value at the mark is kept in `before`. Rows
/// made after the mark have slots from `slots_at_mark` on and are left out.
struct RowsCursor {
    pos: usize,
    slots_at_mark: usize,
    before: HashMap<Key, Row, IdHashBuilder>,
}

/// Each part is written as its receipts, then its order and hold ids.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Section {
    Receipts,
    Ids,
}

/// Bytes of a snapshot a shard holds before it hands them over as a piece
/// (at the next boundary between sections, where no count is left open):
/// what a snapshot holds in memory is a piece and one part's section, not
/// the whole payload (~80 bytes an id: 1.3 GB for a shard at its 16 M id
/// cap).
pub const SNAPSHOT_PIECE_BYTES: usize = 4 << 20;

/// A stretch of the payload of the snapshot in progress, handed over in
/// order; the one with `last` set completes it.
pub struct SnapshotPiece {
    pub lsn: u64,
    pub bytes: Vec<u8>,
    pub last: bool,
}

/// Positions of the item table, or slots of the id tables, a snapshot step
/// looks at: ~0.3-0.5 us each (a cache miss or two), so a step takes
/// 0.15-0.25 ms; the shard runs steps for a turn's time budget
/// (`event_loop::SNAPSHOT_TURN`).
pub const SNAPSHOT_STEP_SLOTS: usize = 512;

impl Capture {
    /// A capture whose `buf` holds the header; `rows_at_mark` (the store's
    /// row count at the mark) rows are still to be written, unless `buf`
    /// has them already (None).
    fn new(base: Base, step: usize, buf: Vec<u8>, rows_at_mark: Option<usize>) -> Capture {
        let mut c = Capture {
            base,
            rows: rows_at_mark.map(|n| RowsCursor { pos: 0, slots_at_mark: n, before: HashMap::default() }),
            next_part: 0,
            section: Section::Receipts,
            cursor: 0,
            count_at: 0,
            written: 0,
            step,
            buf,
            ids_before: (0..SPLIT_PARTS).map(|_| IdMap::default()).collect(),
            receipts_before: (0..SPLIT_PARTS).map(|_| IdMap::default()).collect(),
        };
        if c.rows.is_none() {
            c.begin_section();
        }
        c
    }

    /// Writes the rows of up to `budget` positions of the item table; what
    /// is left of the budget (all of it once the rows are written).
    fn step_rows(&mut self, rows: &Rows, mut budget: usize) -> usize {
        let Some(r) = self.rows.as_mut() else { return budget };
        let end = rows.positions().min(r.pos.saturating_add(budget));
        for pos in r.pos..end {
            for (key, slot, row) in rows.rows_at(pos) {
                if slot < r.slots_at_mark {
                    put_row(&mut self.buf, key, r.before.get(&key).unwrap_or(row));
                }
            }
        }
        budget -= end - r.pos;
        r.pos = end;
        if end == rows.positions() {
            self.rows = None;
            self.begin_section();
        }
        budget
    }

    /// Before the row of `key` changes (or is made): keeps its value at the
    /// mark if it is still to be written; if making it would grow the item
    /// table (moving every item), writes the rest of the rows first.
    fn before_row_change(&mut self, rows: &Rows, key: Key) {
        let Some(r) = self.rows.as_mut() else { return };
        match rows.place_of(key) {
            (Some(pos), Some(slot)) if pos >= r.pos && slot < r.slots_at_mark => {
                if let std::collections::hash_map::Entry::Vacant(e) = r.before.entry(key) {
                    e.insert(*rows.get(key).expect("a row with a slot"));
                }
            }
            (Some(_), Some(_)) => {} // written already, or made after the mark
            // A row to be made: its item's entry is set or added, which
            // grows the table when it is full.
            _ if rows.grows_on_insert() => {
                self.step_rows(rows, usize::MAX);
            }
            _ => {}
        }
    }

    /// How much of `buf` is final: everything but the section still open
    /// (its count is written when it closes).
    fn final_len(&self) -> usize {
        if self.rows.is_some() || self.next_part == SPLIT_PARTS {
            self.buf.len()
        } else {
            self.count_at
        }
    }

    /// Takes the final bytes of `buf`; what follows them (the open section
    /// so far) starts `next`, the next buffer, with room for `room` more.
    fn take_final(&mut self, mut next: Vec<u8>, room: usize) -> Vec<u8> {
        let n = self.final_len();
        next.clear();
        next.reserve(room.max(self.buf.len() - n));
        next.extend_from_slice(&self.buf[n..]);
        self.buf.truncate(n);
        self.count_at -= n.min(self.count_at);
        std::mem::replace(&mut self.buf, next)
    }

    /// Room for the entry count of the section about to be written.
    fn begin_section(&mut self) {
        self.count_at = self.buf.len();
        self.buf.extend_from_slice(&0u64.to_le_bytes());
    }

    /// Whether the entry of `slot` in `part`'s `section` is still to be
    /// written (then a change to it must keep its before-image first).
    fn pending(&self, part: usize, section: Section, slot: Option<usize>) -> bool {
        match part.cmp(&self.next_part) {
            std::cmp::Ordering::Less => false,
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Equal => match (section, self.section) {
                (Section::Receipts, Section::Ids) => false,
                (Section::Ids, Section::Receipts) => true,
                _ => slot.is_none_or(|s| s >= self.cursor),
            },
        }
    }

    /// Writes up to `self.step` slots' worth of the id tables of `ids` and
    /// `receipts`; true once every part is written.
    fn step(&mut self, rows: &Rows, ids: &SplitMap<IdEntry>, receipts: &SplitMap<LogStamp>) -> bool {
        let mut budget = self.step_rows(rows, self.step);
        while budget > 0 {
            if self.next_part == SPLIT_PARTS {
                return true;
            }
            let part = self.next_part;
            let (buf, written, cursor, base) = (&mut self.buf, &mut self.written, self.cursor, self.base);
            let (end, slots) = match self.section {
                Section::Receipts => write_live(
                    receipts.part(part),
                    cursor,
                    budget,
                    base,
                    &self.receipts_before[part],
                    buf,
                    written,
                ),
                Section::Ids => {
                    write_live(ids.part(part), cursor, budget, base, &self.ids_before[part], buf, written)
                }
            };
            budget -= end - self.cursor;
            self.cursor = end;
            if end < slots {
                continue; // the budget ran out inside this section
            }
            // The section's live entries are written: its before-images, its count.
            let kept = match self.section {
                Section::Receipts => {
                    write_kept(&std::mem::take(&mut self.receipts_before[part]), base, buf, written)
                }
                Section::Ids => write_kept(&std::mem::take(&mut self.ids_before[part]), base, buf, written),
            };
            budget = budget.saturating_sub(kept);
            self.buf[self.count_at..self.count_at + 8].copy_from_slice(&self.written.to_le_bytes());
            (self.section, self.next_part) = match self.section {
                Section::Receipts => (Section::Ids, part),
                Section::Ids => (Section::Receipts, part + 1),
            };
            self.cursor = 0;
            self.written = 0;
            if self.next_part < SPLIT_PARTS {
                self.begin_section();
            }
        }
        self.next_part == SPLIT_PARTS
    }
}

impl Store {
    /// Keeps an order or hold id's entry as of the snapshot's LSN before it changes.
    pub(super) fn capture_id(&mut self, id: u64) {
        let Some(c) = self.capture.as_mut() else { return };
        let part = SplitMap::<IdEntry>::part_index(id);
        let slot = self.ids.part(part).slot_of(id);
        if !c.pending(part, Section::Ids, slot) || c.ids_before[part].contains_key(&id) {
            return;
        }
        // An id made after the mark (most of those that change during a
        // snapshot: every new order) keeps no image: `write_live` leaves it
        // out by its LSN. (It kept an empty one until 2026-11-27: a hash
        // insert per new id, and a map the snapshot's steps then probed for
        // every id they wrote.)
        if let Some(before) = self.ids.get(&id).filter(|e| e.lsn <= c.base.lsn) {
            c.ids_before[part].insert(id, before.clone());
        }
    }

    /// Keeps a row as of the snapshot's LSN before it changes or is made.
    pub(super) fn capture_row(&mut self, key: Key) {
        if let Some(c) = self.capture.as_mut() {
            c.before_row_change(&self.rows, key);
        }
    }

    /// Keeps a receipt as of the snapshot's LSN before it changes.
    pub(super) fn capture_receipt(&mut self, id: u64) {
        let Some(c) = self.capture.as_mut() else { return };
        let part = SplitMap::<LogStamp>::part_index(id);
        let slot = self.receipts.part(part).slot_of(id);
        if !c.pending(part, Section::Receipts, slot) || c.receipts_before[part].contains_key(&id) {
            return;
        }
        if let Some(before) = self.receipts.get(&id).filter(|r| r.lsn <= c.base.lsn) {
            c.receipts_before[part].insert(id, *before);
        }
    }

    /// Serializes the durable state (rows, ids, receipts; not pending) at once.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let base = Base { lsn: self.applied_lsn, ts_ms: self.newest_aging_ts() };
        write_header(base, self.row_count(), &mut out);
        for (key, r) in self.rows.iter() {
            put_row(&mut out, key, r);
        }
        let mut c = Capture::new(base, usize::MAX, out, None);
        c.step(&self.rows, &self.ids, &self.receipts);
        c.buf
    }

    /// Starts a snapshot as of `lsn` (every record up to it applied, none
    /// after): writes the rows now; [`Store::snapshot_step`] writes the ids.
    pub fn begin_snapshot(&mut self, lsn: u64) {
        assert!(self.capture.is_none(), "invariant: one snapshot at a time per shard");
        let mut buf = Vec::with_capacity(2 * self.snapshot_piece_bytes);
        let base = Base { lsn, ts_ms: self.newest_aging_ts() };
        write_header(base, self.row_count(), &mut buf);
        self.capture = Some(Capture::new(base, self.snapshot_step_slots, buf, Some(self.row_count())));
    }

    /// Slots of the id tables one step writes at most (tests make it tiny).
    #[cfg(test)]
    pub(crate) fn set_snapshot_step_slots(&mut self, slots: usize) {
        self.snapshot_step_slots = slots.max(1);
    }

    /// A buffer of a written piece, to be filled again (kept only while a
    /// snapshot is in progress).
    pub fn give_snapshot_buffer(&mut self, buf: Vec<u8>) {
        if self.capture.is_some() && self.snapshot_spares.len() < 4 {
            self.snapshot_spares.push(buf);
        }
    }

    /// Bytes held before they go as a piece (tests make it tiny).
    #[cfg(test)]
    pub(crate) fn set_snapshot_piece_bytes(&mut self, bytes: usize) {
        self.snapshot_piece_bytes = bytes;
    }

    pub fn snapshot_in_progress(&self) -> bool {
        self.capture.is_some()
    }

    /// Writes the next stretch of the snapshot; returns a piece of its
    /// payload when enough of it is final, and the last piece when the
    /// snapshot is complete.
    pub fn snapshot_step(&mut self) -> Option<SnapshotPiece> {
        let mut c = self.capture.take()?;
        if c.step(&self.rows, &self.ids, &self.receipts) {
            self.snapshot_spares.clear();
            return Some(SnapshotPiece { lsn: c.base.lsn, bytes: c.buf, last: true });
        }
        let piece = (c.final_len() >= self.snapshot_piece_bytes.max(1)).then(|| {
            let next = self.snapshot_spares.pop().unwrap_or_default();
            SnapshotPiece {
                lsn: c.base.lsn,
                bytes: c.take_final(next, 2 * self.snapshot_piece_bytes),
                last: false,
            }
        });
        self.capture = Some(c);
        piece
    }

    /// Finishes a snapshot in progress at once: its last piece.
    pub fn finish_snapshot(&mut self) -> Option<SnapshotPiece> {
        let mut c = self.capture.take()?;
        c.step = usize::MAX;
        c.step(&self.rows, &self.ids, &self.receipts);
        self.snapshot_spares.clear();
        Some(SnapshotPiece { lsn: c.base.lsn, bytes: c.buf, last: true })
    }

    /// Adds the state of an encoded snapshot (of any shard count) to this store,
    /// keeping only what this store owns.
    pub fn absorb(&mut self, buf: &[u8]) -> Result<(), String> {
        let mut r = Reader::new(buf);
        let e = |e: DecodeError| e.0;
        let magic = r.bytes(SNAPSHOT_MAGIC.len(), "magic").map_err(e)?;
        let lsn = r.u64("lsn").map_err(e)?;
        let layout = match magic {
            m if m == SNAPSHOT_MAGIC => Layout::Compact(Base { lsn, ts_ms: r.u64("base_ts").map_err(e)? }),
            m if m == SNAPSHOT_MAGIC_V3 => Layout::Fixed,
            _ => return Err("not a stockd state snapshot of a layout this version reads".into()),
        };
        self.applied_lsn = self.applied_lsn.max(lsn);
        for _ in 0..r.u64("rows").map_err(e)? {
            let (key, Row { on_hand, held }) = read_row(layout, &mut r).map_err(e)?;
            if held > on_hand || on_hand > STOCK_MAX {
                return Err(format!("row {key:?}: held {held} > on_hand {on_hand} or above max"));
            }
            if self.owns_item(key.item) {
                *self.row_mut(key) = Row { on_hand, held };
            }
        }
        for part in 0..SPLIT_PARTS {
            // Counts come first: room for them at once, not a re-hash per doubling.
            let receipts = r.u64("receipts").map_err(e)?;
            self.receipts
                .reserve_part(part, (receipts as usize).min(r.remaining() / layout.least_receipt_bytes()));
            for _ in 0..receipts {
                let (id, stamp) = read_receipt(layout, &mut r).map_err(e)?;
                if shard_of(id, self.shards) == self.shard {
                    self.receipts.insert(id, stamp);
                }
            }
            let ids = r.u64("ids").map_err(e)?;
            self.ids.reserve_part(part, (ids as usize).min(r.remaining() / layout.least_id_bytes()));
            for _ in 0..ids {
                let (id, entry) = match layout {
                    Layout::Compact(base) => read_id_entry(base, &mut r),
                    Layout::Fixed => read_id_entry_v3(&mut r),
                }
                .map_err(e)?;
                if shard_of(id, self.shards) == self.shard {
                    self.insert_entry(id, entry);
                }
            }
        }
        r.finish().map_err(e)?;
        self.rebuild_fifo();
        Ok(())
    }
}

/// An entry of a snapshot's id sections: the LSN it was made at, and its encoding.
trait Entry {
    fn lsn(&self) -> u64;
    fn put(&self, id: u64, base: Base, out: &mut Vec<u8>);
    /// Asks for what `put` will read outside the table's own slot.
    fn prefetch(&self) {}
}

impl Entry for LogStamp {
    fn lsn(&self) -> u64 {
        self.lsn
    }
    fn put(&self, id: u64, base: Base, out: &mut Vec<u8>) {
        put_receipt(out, id, self, base);
    }
}

impl Entry for IdEntry {
    fn lsn(&self) -> u64 {
        self.lsn
    }
    fn put(&self, id: u64, base: Base, out: &mut Vec<u8>) {
        put_id(out, id, self, base);
    }
    /// Lines of more than one live on the heap: one cache miss per id, most
    /// of what writing an id cost before it was asked for ahead. (One line
    /// is in the entry: nothing to ask for.)
    fn prefetch(&self) {
        if let Some(lines) = self.lines.heap() {
            if let (Some(first), Some(last)) = (lines.first(), lines.last()) {
                prefetch(first);
                prefetch(last);
            }
        }
    }
}

/// How many slots ahead `write_live` asks for an entry's heap data.
const PREFETCH_AHEAD: usize = 16;

/// Writes the entries of `table` in up to `budget` slots from `from` that
/// existed at `lsn` and have no before-image (those are written by
/// [`write_kept`]); adds them to `written`. Returns (the slot it stopped
/// at, the table's slots).
fn write_live<V: Entry>(
    table: &IdTable<V>,
    from: usize,
    budget: usize,
    base: Base,
    before: &IdMap<V>,
    out: &mut Vec<u8>,
    written: &mut u64,
) -> (usize, usize) {
    let end = table.slots().min(from.saturating_add(budget));
    let mut ahead = table.slots_from(from + PREFETCH_AHEAD);
    for entry in table.slots_from(from).take(end - from) {
        if let Some(Some((_, v))) = ahead.next() {
            v.prefetch();
        }
        if let Some((id, v)) = entry {
            if v.lsn() <= base.lsn && !before.contains_key(&id) {
                v.put(id, base, out);
                *written += 1;
            }
        }
    }
    (end, table.slots())
}

/// Writes the before-images; adds them to `written`. Returns how many.
fn write_kept<V: Entry>(kept: &IdMap<V>, base: Base, out: &mut Vec<u8>, written: &mut u64) -> usize {
    for (id, v) in kept {
        v.put(*id, base, out);
        *written += 1;
    }
    kept.len()
}

/// What a snapshot's LSNs and times are written as differences from: its
/// LSN, and a time near its mark (ids age within a window of it).
#[derive(Clone, Copy, Debug)]
struct Base {
    lsn: u64,
    ts_ms: u64,
}

/// The layout a snapshot being read was written in.
#[derive(Clone, Copy)]
enum Layout {
    /// The fourth: varints and differences from its base.
    Compact(Base),
    /// The third: fixed-width fields.
    Fixed,
}

impl Layout {
    /// The fewest bytes a receipt or an id takes (a bound on what the
    /// counts read ask to reserve, whatever a damaged count says).
    fn least_receipt_bytes(self) -> usize {
        match self {
            Layout::Compact(_) => 10,
            Layout::Fixed => 24,
        }
    }

    fn least_id_bytes(self) -> usize {
        match self {
            Layout::Compact(_) => 12,
            Layout::Fixed => 40,
        }
    }
}

/// Magic, u64 lsn, u64 base_ts, u64 row count; the rows follow.
fn write_header(base: Base, rows: usize, out: &mut Vec<u8>) {
    out.extend_from_slice(SNAPSHOT_MAGIC);
    out.extend_from_slice(&base.lsn.to_le_bytes());
    out.extend_from_slice(&base.ts_ms.to_le_bytes());
    out.extend_from_slice(&(rows as u64).to_le_bytes());
}

/// A row: v item, v center, v on_hand, v held.
fn put_row(out: &mut Vec<u8>, key: Key, r: &Row) {
    varint::put(out, key.item);
    varint::put(out, key.fc.into());
    varint::put(out, r.on_hand);
    varint::put(out, r.held);
}

fn read_row(layout: Layout, r: &mut Reader<'_>) -> Result<(Key, Row), DecodeError> {
    Ok(match layout {
        Layout::Compact(_) => {
            let key = Key { item: varint::read(r, "item")?, fc: varint::read_u32(r, "center")? };
            (key, Row { on_hand: varint::read(r, "on_hand")?, held: varint::read(r, "held")? })
        }
        Layout::Fixed => (r.key()?, Row { on_hand: r.u64("on_hand")?, held: r.u64("held")? }),
    })
}

/// A receipt: u64 id, d(lsn) lsn, d(base_ts) ts_ms.
fn put_receipt(out: &mut Vec<u8>, id: u64, r: &LogStamp, base: Base) {
    out.extend_from_slice(&id.to_le_bytes());
    varint::put_delta(out, r.lsn, base.lsn);
    varint::put_delta(out, r.ts_ms, base.ts_ms);
}

fn read_receipt(layout: Layout, r: &mut Reader<'_>) -> Result<(u64, LogStamp), DecodeError> {
    let id = r.u64("id")?;
    let stamp = match layout {
        Layout::Compact(base) => LogStamp {
            lsn: varint::read_delta(r, base.lsn, "lsn")?,
            ts_ms: varint::read_delta(r, base.ts_ms, "ts")?,
        },
        Layout::Fixed => LogStamp { lsn: r.u64("lsn")?, ts_ms: r.u64("ts")? },
    };
    Ok((id, stamp))
}

/// An order or hold id: u64 id, d(lsn) lsn, d(base_ts) ts (the one it ages
/// from), state (see [`put_state`]), v line count, lines of v item, v
/// center, v qty. Whether it is a hold and the LSN it ages from follow
/// from its state.
fn put_id(out: &mut Vec<u8>, id: u64, e: &IdEntry, base: Base) {
    out.extend_from_slice(&id.to_le_bytes());
    varint::put_delta(out, e.lsn, base.lsn);
    varint::put_delta(out, e.ts_ms, base.ts_ms);
    put_state(out, &e.state, base);
    varint::put(out, e.lines.len() as u64);
    for l in e.lines.iter() {
        varint::put(out, l.key.item);
        varint::put(out, l.key.fc.into());
        varint::put(out, l.qty.into());
    }
}

/// Marks a state snapshot payload of this layout (the 4th: varints, LSNs
/// and times as differences from the header's).
const SNAPSHOT_MAGIC: &[u8; 8] = b"STKSTAT4";
/// The 3rd layout (fixed-width fields; ids carry their aging stamp), still read.
const SNAPSHOT_MAGIC_V3: &[u8; 8] = b"STKSTAT3";

fn read_id_entry(base: Base, r: &mut Reader<'_>) -> Result<(u64, IdEntry), DecodeError> {
    let id = r.u64("id")?;
    let lsn = varint::read_delta(r, base.lsn, "lsn")?;
    let ts_ms = varint::read_delta(r, base.ts_ms, "ts")?;
    let state = read_state(r, base)?;
    let n = varint::read(r, "lines")?;
    if n > u64::from(u16::MAX) {
        return Err(DecodeError(format!("id {id}: {n} lines")));
    }
    let mut lines = Lines::with_capacity((n as usize).min(r.remaining() / 3));
    for _ in 0..n {
        let key = Key { item: varint::read(r, "item")?, fc: varint::read_u32(r, "center")? };
        lines.push(Line { key, qty: varint::read_u32(r, "qty")? });
    }
    Ok((id, IdEntry::new(lsn, ts_ms, IdLines::from(lines), state)))
}

fn read_id_entry_v3(r: &mut Reader<'_>) -> Result<(u64, IdEntry), DecodeError> {
    let id = r.u64("id")?;
    let lsn = r.u64("lsn")?;
    let ts_ms = r.u64("ts")?;
    let is_hold = r.u8("is_hold")? != 0;
    let state = read_state_v3(r)?;
    let aging = LogStamp { lsn: r.u64("aging_lsn")?, ts_ms: r.u64("aging_ts")? };
    let aging_from = (aging.lsn != 0).then_some(aging);
    let n = r.u16("lines")? as usize;
    let mut lines = Lines::with_capacity(n);
    for _ in 0..n {
        let key = r.key()?;
        lines.push(Line { key, qty: r.u32("qty")? });
    }
    // The entry keeps the timestamp it ages from; whether it is a hold and
    // the LSN it ages from follow from its state, and must agree with what
    // the snapshot says.
    let e = IdEntry::new(lsn, aging_from.map_or(ts_ms, |a| a.ts_ms), IdLines::from(lines), state);
    if e.is_hold() != is_hold || e.aging_from() != aging_from {
        return Err(DecodeError(format!("id {id}: hold flag or aging stamp does not fit its state")));
    }
    Ok((id, e))
}

/// The bits of a state's byte beside its kind (the two low bits).
const STATE_CONFIRMED: u8 = 4;
const STATE_EXPIRED: u8 = 8;

/// An id's state: a u8 whose two low bits say which (held 0, released 1,
/// ordered 2, cancelled 3), bit 2 that a confirm LSN follows, bit 3 that a
/// release was an expiry; then its fields: held d(base_ts) deadline_ms;
/// released d(lsn) lsn; ordered [d(lsn) confirm lsn]; cancelled d(lsn) lsn,
/// [d(lsn) confirm lsn].
fn put_state(out: &mut Vec<u8>, state: &IdState, base: Base) {
    let confirmed = |c: Option<NonZeroU64>| if c.is_some() { STATE_CONFIRMED } else { 0 };
    match *state {
        IdState::Held { deadline_ms } => {
            out.push(0);
            varint::put_delta(out, deadline_ms, base.ts_ms);
        }
        IdState::Released { lsn, expired } => {
            out.push(1 | if expired { STATE_EXPIRED } else { 0 });
            varint::put_delta(out, lsn, base.lsn);
        }
        IdState::Ordered { confirm_lsn } => out.push(2 | confirmed(confirm_lsn)),
        IdState::Cancelled { lsn, confirm_lsn } => {
            out.push(3 | confirmed(confirm_lsn));
            varint::put_delta(out, lsn, base.lsn);
        }
    }
    if let IdState::Ordered { confirm_lsn: Some(c) } | IdState::Cancelled { confirm_lsn: Some(c), .. } =
        *state
    {
        varint::put_delta(out, c.get(), base.lsn);
    }
}

fn read_state(r: &mut Reader<'_>, base: Base) -> Result<IdState, DecodeError> {
    let tag = r.u8("state")?;
    let (kind, confirmed, expired) = (tag & 3, tag & STATE_CONFIRMED != 0, tag & STATE_EXPIRED != 0);
    let fits = tag < 2 * STATE_EXPIRED && (!confirmed || kind >= 2) && (!expired || kind == 1);
    if !fits {
        return Err(DecodeError(format!("bad id state {tag:#04x}")));
    }
    let confirm = |r: &mut Reader<'_>| -> Result<Option<NonZeroU64>, DecodeError> {
        if !confirmed {
            return Ok(None);
        }
        match NonZeroU64::new(varint::read_delta(r, base.lsn, "confirm_lsn")?) {
            Some(lsn) => Ok(Some(lsn)),
            None => Err(DecodeError("confirm_lsn 0 (LSNs start at 1)".into())),
        }
    };
    Ok(match kind {
        0 => IdState::Held { deadline_ms: varint::read_delta(r, base.ts_ms, "deadline_ms")? },
        1 => IdState::Released { lsn: varint::read_delta(r, base.lsn, "release lsn")?, expired },
        2 => IdState::Ordered { confirm_lsn: confirm(r)? },
        _ => {
            let lsn = varint::read_delta(r, base.lsn, "cancel lsn")?;
            IdState::Cancelled { lsn, confirm_lsn: confirm(r)? }
        }
    })
}

/// The third layout's state: u8 tag, then its fields. held (0): u64
/// deadline_ms; released (1): u64 lsn, u8 expired; ordered (2): optional
/// confirm lsn; cancelled (3): u64 lsn, optional confirm lsn. Optional: u8
/// 0, or u8 1 and u64.
fn read_state_v3(r: &mut Reader<'_>) -> Result<IdState, DecodeError> {
    let read_opt = |r: &mut Reader<'_>| -> Result<Option<NonZeroU64>, DecodeError> {
        match r.u8("has confirm_lsn")? {
            0 => Ok(None),
            1 => match NonZeroU64::new(r.u64("confirm_lsn")?) {
                Some(lsn) => Ok(Some(lsn)),
                None => Err(DecodeError("confirm_lsn 0 (LSNs start at 1)".into())),
            },
            f => Err(DecodeError(format!("bad option flag {f}"))),
        }
    };
    Ok(match r.u8("state")? {
        0 => IdState::Held { deadline_ms: r.u64("deadline_ms")? },
        1 => IdState::Released { lsn: r.u64("release lsn")?, expired: r.u8("expired")? != 0 },
        2 => IdState::Ordered { confirm_lsn: read_opt(r)? },
        3 => IdState::Cancelled { lsn: r.u64("cancel lsn")?, confirm_lsn: read_opt(r)? },
        t => return Err(DecodeError(format!("unknown id state {t}"))),
    })
}
