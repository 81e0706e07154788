//! The table under each part of a [`super::SplitMap`]: id -> value, as a
//! small [`Index`] (id -> slot, 12 bytes an entry) over a slab of values.
//!
//! Values are appended to the slab with their ids, and the slots of
//! removed ids are used again; a slot never moves (the slab grows a chunk
//! at a time, `chunked.rs`), so a snapshot can walk the slab a stretch at
//! a time while the table changes (see `state/snapshot.rs`). A general
//! hash map keeps each value in its bucket, so every new id writes a
//! random place of a table of hundreds of megabytes and reads its control
//! bytes first; here it probes one line of the small index and writes the
//! slab's end. And because where an id's index entry lives is known from
//! its hash alone, replay asks for a chunk's entries before it inserts
//! them ([`IdTable::prefetch`]).

use super::chunked::ChunkedVec;
use super::index::{Index, EMPTY};

pub struct IdTable<V> {
    /// Id -> its value's slot.
    index: Index,
    slab: ChunkedVec<Option<(u64, V)>>,
    /// Slots of removed ids, used again first.
    free: Vec<u32>,
}

impl<V> Default for IdTable<V> {
    fn default() -> Self {
        IdTable { index: Index::default(), slab: ChunkedVec::default(), free: Vec::new() }
    }
}

impl<V> IdTable<V> {
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn get(&self, id: &u64) -> Option<&V> {
        self.index.get(*id).and_then(|s| self.slab.at(s as usize).as_ref().map(|(_, v)| v))
    }

    pub fn get_mut(&mut self, id: &u64) -> Option<&mut V> {
        self.index.get(*id).and_then(|s| self.slab.at_mut(s as usize).as_mut().map(|(_, v)| v))
    }

    /// Sets the value of `id`; the old one back if it had one.
    pub fn insert(&mut self, id: u64, v: V) -> Option<V> {
        if let Some(slot) = self.index.get(id) {
            return self.slab.at_mut(slot as usize).replace((id, v)).map(|(_, old)| old);
        }
        let slot = match self.free.pop() {
            Some(slot) => {
                *self.slab.at_mut(slot as usize) = Some((id, v));
                slot
            }
            None => {
                assert!(self.slab.len() < EMPTY as usize, "invariant: fewer than 2^32 - 1 ids in one table");
                self.slab.push(Some((id, v)));
                (self.slab.len() - 1) as u32
            }
        };
        self.index.get_or_insert(id, slot);
        None
    }

    /// Forgets `id`; its value back.
    pub fn remove(&mut self, id: &u64) -> Option<V> {
        let slot = self.index.remove(*id)?;
        self.free.push(slot);
        self.slab.at_mut(slot as usize).take().map(|(_, v)| v)
    }

    /// Room for `additional` more ids without growing the index (the slab
    /// grows a chunk at a time, copying nothing).
    pub fn reserve(&mut self, additional: usize) {
        self.index.reserve(additional);
    }

    /// Asks the CPU for the cache line of `id`'s index entry, without
    /// waiting for it.
    pub fn prefetch(&self, id: u64) {
        self.index.prefetch(id);
    }

    /// Every id and its value, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &V)> + '_ {
        self.slab.iter().filter_map(|e| e.as_ref().map(|(id, v)| (*id, v)))
    }

    /// Slots in the slab (used or free): [`IdTable::slots_from`] walks
    /// `0..slots()`.
    pub fn slots(&self) -> usize {
        self.slab.len()
    }

    /// The slots from `slot` on, in order: each one's id and value if it
    /// is in use.
    pub fn slots_from(&self, slot: usize) -> impl Iterator<Item = Option<(u64, &V)>> + '_ {
        self.slab.iter_from(slot).map(|e| e.as_ref().map(|(id, v)| (*id, v)))
    }

    /// The slot of `id`, if it is in the table.
    pub fn slot_of(&self, id: u64) -> Option<usize> {
        self.index.get(id).map(|s| s as usize)
    }

    /// Empties the table, yielding every id and its value.
    pub fn drain(&mut self) -> impl Iterator<Item = (u64, V)> + '_ {
        self.index = Index::default();
        self.free.clear();
        self.slab.take_all().flatten()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// Random inserts, replacements and removals against a std HashMap.
    #[test]
    fn behaves_as_a_map_through_growth_removals_and_reuse() {
        let mut t: IdTable<u64> = IdTable::default();
        let mut model: HashMap<u64, u64> = HashMap::new();
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for step in 0..200_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // A small id space (with ids that differ only in one half) so that ids meet again.
            let id = match x % 3 {
                0 => x >> 52,
                1 => (x >> 52) << 32,
                _ => u64::MAX - (x >> 52),
            };
            match (x >> 8) % 5 {
                0 | 1 => assert_eq!(t.insert(id, step), model.insert(id, step), "insert {id}"),
                2 => assert_eq!(t.remove(&id), model.remove(&id), "remove {id}"),
                3 => {
                    if let (Some(a), Some(b)) = (t.get_mut(&id), model.get_mut(&id)) {
                        *a += 1;
                        *b += 1;
                    }
                }
                _ => assert_eq!(t.get(&id), model.get(&id), "get {id}"),
            }
            assert_eq!(t.len(), model.len());
        }
        let mut all: Vec<(u64, u64)> = t.iter().map(|(id, v)| (id, *v)).collect();
        let mut want: Vec<(u64, u64)> = model.iter().map(|(id, v)| (*id, *v)).collect();
        all.sort_unstable();
        want.sort_unstable();
        assert_eq!(all, want);
        for (id, _) in &want {
            t.prefetch(*id);
        }
        let mut drained: Vec<(u64, u64)> = t.drain().collect();
        drained.sort_unstable();
        assert_eq!(drained, want);
        assert!(t.is_empty() && t.get(&want[0].0).is_none());
    }
}
