//! The rows of one store, packed for memory. Every row is one 24-byte slot
//! in a single vector; the rows of an item form a chain through it, and a
//! table maps each item to the head of its chain ([`Index`], 12 bytes an
//! entry). With a few centers per item that is about 30 bytes of memory a
//! row, where a table of per-item vectors took 72 (docs/benchmarks.md,
//! "Memory per row").
//! What in-flight mutations reserve on a row is kept beside it, in the
//! store, only while they are in flight.
//!
//! An item with more than [`CHAIN_MAX`] rows also gets its rows indexed
//! by (item, center) in a second table, so that a lookup never walks a
//! long chain (4,096 centers scattered over the vector would be as many
//! cache misses).
//!
//! Rows are never removed one by one (a row, once it exists, stays: empty
//! rows too); regrouping moves them all.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use smallvec::SmallVec;
use stockd_protocol::{prefetch, Key};

use super::index::Index;
use super::{IdHashBuilder, PREFETCH_KEYS};

/// Durable quantities of one row.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Row {
    pub on_hand: u64,
    pub held: u64,
}

impl Row {
    /// What a query answers: durable on hand minus durable holds.
    pub fn available(&self) -> u64 {
        self.on_hand.checked_sub(self.held).expect("invariant: held never exceeds on hand")
    }
}

/// Where [`Rows::locate`] found a key's row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// In this slot ([`Rows::at`]).
    At(u32),
    /// Nowhere: the store has no such row.
    Absent,
    /// Not known from the walk: look the key up.
    Ask,
}

/// The end of a chain.
const END: u32 = u32::MAX;
/// Set in an item's head entry when its rows are in `Rows::indexed` too.
const INDEXED: u32 = 1 << 31;
/// Rows of a chain [`Rows::prefetch`] reads at most (an item's
/// centers are a handful, typically).
const PREFETCH_CHAIN_STEPS: usize = 4;
/// Most rows an item has before its rows are indexed.
pub const CHAIN_MAX: usize = 16;

#[derive(Clone, Copy)]
struct Slot {
    fc: u32,
    /// The item's next row, or [`END`].
    next: u32,
    row: Row,
}

#[derive(Default)]
pub struct Rows {
    /// Item -> its first slot, with [`INDEXED`] set for the items in `indexed`.
    heads: Index,
    slots: Vec<Slot>,
    /// (item, center) -> slot, for the rows of items with more than [`CHAIN_MAX`].
    indexed: HashMap<RowKey, u32, IdHashBuilder>,
}

impl Rows {
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    fn find(&self, key: Key) -> Option<usize> {
        let head = self.heads.get(key.item)?;
        if head & INDEXED != 0 {
            return self.indexed.get(&RowKey(key)).map(|at| *at as usize);
        }
        let mut at = head;
        loop {
            let slot = &self.slots[at as usize];
            if slot.fc == key.fc {
                return Some(at as usize);
            }
            if slot.next == END {
                return None;
            }
            at = slot.next;
        }
    }

    /// Asks for the cache lines that finding `keys` reads, all at once:
    /// first every key's head entry, then (reading those) the head row of
    /// each chain, then the chains a step at a time for every key together.
    /// Lookups that follow find their lines in the cache instead of waiting
    /// for one miss after another. Changes nothing.
    pub fn prefetch(&self, keys: impl Iterator<Item = Key> + Clone) {
        // The last row asked for is left to arrive while the caller works.
        self.walk(keys, PREFETCH_CHAIN_STEPS - 1, |_, _| {});
    }

    /// Finds the rows of `keys` together, their cache misses overlapped as
    /// in [`Rows::prefetch`]: `found[i]` says where the row of `keys[i]` is,
    /// [`Found::Ask`] where the walk stopped before it knew. A caller that
    /// reads the rows then looks up nothing twice (a read of 64 keys looked
    /// each up once to prefetch and once to read).
    pub fn locate(&self, keys: &[Key], found: &mut [Found]) {
        assert_eq!(found.len(), keys.len(), "invariant: a place for every key");
        found.fill(Found::Ask);
        self.walk(keys.iter().copied(), PREFETCH_CHAIN_STEPS, |i, f| found[i] = f);
    }

    /// The slot of `key`'s row, if it has one (for [`Rows::at`]).
    pub fn slot_of(&self, key: Key) -> Option<u32> {
        self.find(key).map(|at| at as u32)
    }

    /// The row in `slot`, as [`Rows::locate`] found it.
    pub fn at(&self, slot: u32) -> &Row {
        &self.slots[slot as usize].row
    }

    /// The walk of [`Rows::prefetch`] and [`Rows::locate`]: asks for up to
    /// [`PREFETCH_CHAIN_STEPS`] rows of each chain, reads up to `reads` of
    /// them, and tells `found` where the `i`th key's row is once its walk
    /// knows (never for an item whose rows are indexed).
    fn walk(
        &self,
        keys: impl Iterator<Item = Key> + Clone,
        reads: usize,
        mut found: impl FnMut(usize, Found),
    ) {
        for k in keys.clone() {
            self.heads.prefetch(k.item);
        }
        // (slot, center, key's place). Inline for the runs callers make
        // (`PREFETCH_KEYS`): the walks of a 64-key batch's part or a run of
        // queries cost no allocation (a collected `Vec` was a malloc, a
        // realloc or two and a free per run).
        let mut walks: SmallVec<[(u32, u32, u32); PREFETCH_KEYS]> = SmallVec::new();
        for (i, k) in keys.enumerate() {
            match self.heads.get(k.item) {
                None => found(i, Found::Absent),
                Some(head) if head & INDEXED != 0 => {}
                Some(head) => {
                    prefetch(&self.slots[head as usize]);
                    walks.push((head, k.fc, i as u32));
                }
            }
        }
        for step in 1..=reads {
            walks.retain_mut(|(at, fc, i)| {
                let slot = &self.slots[*at as usize];
                if slot.fc == *fc {
                    found(*i as usize, Found::At(*at));
                    return false;
                }
                if slot.next == END {
                    found(*i as usize, Found::Absent);
                    return false;
                }
                *at = slot.next;
                if step < PREFETCH_CHAIN_STEPS {
                    prefetch(&self.slots[*at as usize]);
                }
                step < reads
            });
        }
    }

    pub fn get(&self, key: Key) -> Option<&Row> {
        self.find(key).map(|at| &self.slots[at].row)
    }

    /// The row of `key`, created empty if it does not exist.
    pub fn get_or_insert(&mut self, key: Key) -> &mut Row {
        let at = match self.find(key) {
            Some(at) => at,
            None => {
                let at = self.slots.len();
                // A head with INDEXED set is never the table's empty mark.
                assert!(at < (INDEXED - 1) as usize, "invariant: fewer than 2^31 - 1 rows in one store");
                // A new item's head is this slot; an item's existing head
                // becomes this slot's next, and this slot its head.
                let head = self.heads.get_or_insert(key.item, at as u32);
                let (first, indexed) = match *head {
                    h if h == at as u32 => (END, false),
                    h => (h & !INDEXED, h & INDEXED != 0),
                };
                self.slots.push(Slot { fc: key.fc, next: first, row: Row::default() });
                *head = at as u32 | if indexed { INDEXED } else { 0 };
                if indexed {
                    self.indexed.insert(RowKey(key), at as u32);
                } else if chain_from(&self.slots, at as u32).take(CHAIN_MAX + 1).count() > CHAIN_MAX {
                    // This row is one too many for a chain walk: index them all.
                    *head |= INDEXED;
                    for (slot, fc) in chain_from(&self.slots, at as u32) {
                        self.indexed.insert(RowKey(Key { item: key.item, fc }), slot);
                    }
                }
                at
            }
        };
        &mut self.slots[at].row
    }

    /// The rows of one item: (center, row), in no particular order.
    pub fn of_item(&self, item: u64) -> impl Iterator<Item = (u32, &Row)> + '_ {
        let head = self.heads.get(item).map_or(END, |h| h & !INDEXED);
        chain_from(&self.slots, head).map(|(at, fc)| (fc, &self.slots[at as usize].row))
    }

    /// Positions of the item table, for a walk a stretch at a time:
    /// [`Rows::rows_at`] takes `0..positions()`. Rows are never removed, so
    /// an item keeps its position until the table grows
    /// ([`Rows::grows_on_insert`]).
    pub fn positions(&self) -> usize {
        self.heads.positions()
    }

    /// The rows of the item at `pos` of the item table: (key, slot, row);
    /// slots are numbered in the order rows were made.
    pub fn rows_at(&self, pos: usize) -> impl Iterator<Item = (Key, usize, &Row)> + '_ {
        self.heads.at(pos).into_iter().flat_map(move |(item, head)| {
            chain_from(&self.slots, head & !INDEXED)
                .map(move |(at, fc)| (Key { item, fc }, at as usize, &self.slots[at as usize].row))
        })
    }

    /// The position of `item` in the item table, and the slot of `key`'s row.
    pub fn place_of(&self, key: Key) -> (Option<usize>, Option<usize>) {
        (self.heads.position_of(key.item), self.find(key))
    }

    /// Whether making the next row moves every item in the item table.
    pub fn grows_on_insert(&self) -> bool {
        self.heads.grows_on_insert()
    }

    /// Every row: its key and quantities.
    pub fn iter(&self) -> impl Iterator<Item = (Key, &Row)> + '_ {
        self.heads.iter().flat_map(move |(item, head)| {
            chain_from(&self.slots, head & !INDEXED)
                .map(move |(at, fc)| (Key { item, fc }, &self.slots[at as usize].row))
        })
    }
}

/// The slots of a chain from `at`: (slot, center).
fn chain_from(slots: &[Slot], mut at: u32) -> impl Iterator<Item = (u32, u32)> + '_ {
    std::iter::from_fn(move || {
        let slot = slots.get(at as usize)?;
        let this = at;
        at = slot.next;
        Some((this, slot.fc))
    })
}

/// What prepared, not yet durable mutations may do to one row.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pending {
    /// Units they may take from `available`.
    pub take: u64,
    /// Units they may add to `on_hand`.
    pub add: u64,
    /// How many of them touch the row.
    pub n: u32,
}

/// A row's key for the tables keyed by row (the [`Pending`] rows, the
/// indexed rows of items with many centers): one u64 to hash.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RowKey(pub Key);

impl Hash for RowKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        h.write_u64(self.0.item ^ (self.0.fc as u64).rotate_left(40));
    }
}

pub type PendingRows = HashMap<RowKey, Pending, IdHashBuilder>;

#[cfg(test)]
mod tests {
    use super::*;

    fn key(item: u64, fc: u32) -> Key {
        Key { item, fc }
    }

    #[test]
    fn rows_of_an_item_chain_and_every_row_is_found() {
        let mut rows = Rows::default();
        for item in [1u64, u64::MAX, 1 << 32] {
            for fc in [7u32, 0, u32::MAX] {
                rows.get_or_insert(key(item, fc)).on_hand = item.wrapping_add(fc as u64);
            }
        }
        assert_eq!(rows.len(), 9);
        rows.get_or_insert(key(1, 7)).held = 3; // an existing row: no new slot
        assert_eq!(rows.len(), 9);
        assert_eq!(rows.get(key(1, 7)), Some(&Row { on_hand: 8, held: 3 }));
        assert_eq!(rows.get(key(1, 8)), None);
        assert_eq!(rows.get(key(2, 7)), None);
        let mut centers: Vec<u32> = rows.of_item(1 << 32).map(|(fc, _)| fc).collect();
        centers.sort_unstable();
        assert_eq!(centers, [0, 7, u32::MAX]);
        assert_eq!(rows.of_item(5).count(), 0);
        let mut all: Vec<(u64, u32, u64)> = rows.iter().map(|(k, r)| (k.item, k.fc, r.on_hand)).collect();
        all.sort_unstable();
        assert_eq!(all.len(), 9);
        assert_eq!(all[0], (1, 0, 1));
        assert_eq!(all[8], (u64::MAX, u32::MAX, u64::MAX.wrapping_add(u32::MAX as u64)));
    }

    #[test]
    fn an_item_with_many_centers_is_indexed_and_every_row_still_found() {
        let mut rows = Rows::default();
        let many = (CHAIN_MAX * 3) as u32;
        // Interleaved with another item's rows, as centers arrive over time.
        for fc in 0..many {
            rows.get_or_insert(key(7, fc)).on_hand = fc as u64 + 1;
            rows.get_or_insert(key(8, fc % 4)).on_hand = 1;
        }
        assert_eq!(rows.len(), many as usize + 4);
        assert_eq!(rows.indexed.len(), many as usize, "item 7 is indexed, item 8 is not");
        for fc in 0..many {
            assert_eq!(rows.get(key(7, fc)).map(|r| r.on_hand), Some(fc as u64 + 1));
        }
        assert_eq!(rows.get(key(7, many)), None);
        assert_eq!(rows.get(key(8, 3)).map(|r| r.on_hand), Some(1));
        assert_eq!(rows.of_item(7).count(), many as usize);
        assert_eq!(rows.iter().count(), many as usize + 4);
        // An existing row of an indexed item is found, not added again.
        rows.get_or_insert(key(7, 0)).held = 1;
        assert_eq!(rows.len(), many as usize + 4);
        assert_eq!(rows.get(key(7, 0)), Some(&Row { on_hand: 1, held: 1 }));
    }

    #[test]
    fn locate_finds_what_get_finds() {
        let mut rows = Rows::default();
        // Chains of 1 to 9 rows (past the walk's steps), and one indexed item.
        for item in 1..=9u64 {
            for fc in 0..item as u32 {
                rows.get_or_insert(key(item, fc * 3)).on_hand = item * 100 + fc as u64;
            }
        }
        for fc in 0..=CHAIN_MAX as u32 {
            rows.get_or_insert(key(50, fc)).on_hand = 5_000 + fc as u64;
        }
        assert!(rows.heads.get(50).unwrap() & INDEXED != 0);
        let mut keys = Vec::new();
        for item in [1, 2, 4, 5, 8, 9, 50, 51] {
            for fc in [0, 1, 3, 12, 24, 16] {
                keys.push(key(item, fc));
            }
        }
        let mut asked = 0;
        for run in keys.chunks(PREFETCH_KEYS) {
            let mut found = vec![Found::At(u32::MAX); run.len()];
            rows.locate(run, &mut found);
            for (k, f) in run.iter().zip(&found) {
                let row = match *f {
                    Found::At(slot) => Some(rows.at(slot)),
                    Found::Absent => None,
                    Found::Ask => {
                        asked += 1;
                        rows.get(*k)
                    }
                };
                assert_eq!(row, rows.get(*k), "{k:?}: {f:?}");
            }
        }
        // Only the rows past the walk's steps, and the indexed item's, are left to ask.
        assert!(asked > 0 && asked < keys.len() / 2, "{asked} of {}", keys.len());
    }

    #[test]
    fn a_slot_and_a_head_entry_are_as_small_as_the_memory_figures_assume() {
        assert_eq!(std::mem::size_of::<Slot>(), 24);
    }
}
