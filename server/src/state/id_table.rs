//! The table under each part of a [`super::SplitMap`]: id -> value, as a
//! small index probed linearly over a slab of values.
//!
//! An index entry is 12 bytes (the id as two u32 halves, the value's slot);
//! values are appended to the slab, and the slots of removed ids are used
//! again. A general hash map keeps each (80-byte) value in its bucket, so
//! every new id writes a random place of a table of hundreds of megabytes
//! and reads its control bytes first; here it probes one line of the small
//! index and writes the slab's end. And because where an id's index entry
//! lives is known from its hash alone, replay asks for a chunk's entries
//! before it inserts them ([`IdTable::prefetch`]).
//!
//! Removal shifts the entries after the hole back (no tombstones), so
//! probes stay as short as the load allows.

use std::hash::BuildHasher;

use stockd_protocol::prefetch;

use super::IdHashBuilder;

/// Marks an empty index entry (no slot has this number).
const EMPTY: u32 = u32::MAX;
/// The index grows when it would be fuller than this (numerator / 8).
const MAX_LOAD_EIGHTHS: usize = 7;

pub struct IdTable<V> {
    /// (id low half, id high half, slot); the length is zero or a power of two.
    index: Vec<[u32; 3]>,
    slab: Vec<Option<V>>,
    /// Slots of removed ids, used again first.
    free: Vec<u32>,
    hasher: IdHashBuilder,
}

impl<V> Default for IdTable<V> {
    fn default() -> Self {
        IdTable { index: Vec::new(), slab: Vec::new(), free: Vec::new(), hasher: IdHashBuilder::default() }
    }
}

fn id_of(e: &[u32; 3]) -> u64 {
    e[0] as u64 | (e[1] as u64) << 32
}

impl<V> IdTable<V> {
    pub fn len(&self) -> usize {
        self.slab.len() - self.free.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn mask(&self) -> usize {
        self.index.len() - 1
    }

    fn home(&self, id: u64) -> usize {
        self.hasher.hash_one(id) as usize & self.mask()
    }

    /// The index entry of `id`, or the empty one where it would go.
    fn probe(&self, id: u64) -> usize {
        let (lo, hi) = (id as u32, (id >> 32) as u32);
        let mut at = self.home(id);
        loop {
            let e = &self.index[at];
            if e[2] == EMPTY || (e[0] == lo && e[1] == hi) {
                return at;
            }
            at = (at + 1) & self.mask();
        }
    }

    fn slot(&self, id: u64) -> Option<usize> {
        if self.index.is_empty() {
            return None;
        }
        let slot = self.index[self.probe(id)][2];
        (slot != EMPTY).then_some(slot as usize)
    }

    pub fn get(&self, id: &u64) -> Option<&V> {
        self.slot(*id).and_then(|s| self.slab[s].as_ref())
    }

    pub fn get_mut(&mut self, id: &u64) -> Option<&mut V> {
        self.slot(*id).and_then(|s| self.slab[s].as_mut())
    }

    /// Sets the value of `id`; the old one back if it had one.
    pub fn insert(&mut self, id: u64, v: V) -> Option<V> {
        self.reserve(1);
        let at = self.probe(id);
        if self.index[at][2] != EMPTY {
            return self.slab[self.index[at][2] as usize].replace(v);
        }
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slab[slot as usize] = Some(v);
                slot
            }
            None => {
                assert!(self.slab.len() < EMPTY as usize, "invariant: fewer than 2^32 - 1 ids in one table");
                self.slab.push(Some(v));
                (self.slab.len() - 1) as u32
            }
        };
        self.index[at] = [id as u32, (id >> 32) as u32, slot];
        None
    }

    /// Forgets `id`; its value back.
    pub fn remove(&mut self, id: &u64) -> Option<V> {
        if self.index.is_empty() {
            return None;
        }
        let mut hole = self.probe(*id);
        let slot = self.index[hole][2];
        if slot == EMPTY {
            return None;
        }
        // Entries after the hole that may sit in it (their probe passed it) move back.
        let mut next = (hole + 1) & self.mask();
        while self.index[next][2] != EMPTY {
            let home = self.home(id_of(&self.index[next]));
            if next.wrapping_sub(home) & self.mask() >= next.wrapping_sub(hole) & self.mask() {
                self.index[hole] = self.index[next];
                hole = next;
            }
            next = (next + 1) & self.mask();
        }
        self.index[hole] = [0, 0, EMPTY];
        self.free.push(slot);
        self.slab[slot as usize].take()
    }

    /// Room for `additional` more ids without growing the index or the slab.
    pub fn reserve(&mut self, additional: usize) {
        let want = self.len() + additional;
        if want * 8 > self.index.len() * MAX_LOAD_EIGHTHS {
            let mut size = self.index.len().max(16);
            while want * 8 > size * MAX_LOAD_EIGHTHS {
                size *= 2;
            }
            let old = std::mem::replace(&mut self.index, vec![[0, 0, EMPTY]; size]);
            for e in old.into_iter().filter(|e| e[2] != EMPTY) {
                let at = self.probe(id_of(&e));
                self.index[at] = e;
            }
        }
        self.slab.reserve(additional.saturating_sub(self.free.len()));
    }

    /// Asks the CPU for the cache line of `id`'s index entry, without
    /// waiting for it.
    pub fn prefetch(&self, id: u64) {
        if !self.index.is_empty() {
            prefetch(&self.index[self.home(id)]);
        }
    }

    /// Every id and its value, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &V)> + '_ {
        self.index
            .iter()
            .filter(|e| e[2] != EMPTY)
            .filter_map(|e| Some((id_of(e), self.slab[e[2] as usize].as_ref()?)))
    }

    /// Empties the table, yielding every id and its value.
    pub fn drain(&mut self) -> impl Iterator<Item = (u64, V)> + '_ {
        let index = std::mem::take(&mut self.index);
        let mut slab = std::mem::take(&mut self.slab);
        self.free.clear();
        index
            .into_iter()
            .filter(|e| e[2] != EMPTY)
            .filter_map(move |e| Some((id_of(&e), slab[e[2] as usize].take()?)))
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
