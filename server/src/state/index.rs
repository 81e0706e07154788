//! u64 -> u32, an open-addressing table with linear probing: the rows'
//! item -> first slot table, and the index under each id table
//! ([`super::id_table`]).
//!
//! An entry is 12 bytes (the key as two u32 halves, the value) and holds
//! everything a lookup needs, so a lookup reads one cache line, where a
//! general hash map reads its control bytes first and then its bucket: two
//! dependent misses on a table larger than the caches. And because where a
//! key's entry lives is known from its hash alone, callers with many keys
//! at hand (a batch of queries, a chunk of replayed records) can ask for
//! the entries' lines ahead of use ([`Index::prefetch`]) and wait for many
//! misses at once instead of one after another.
//!
//! Removal shifts the entries after the hole back (no tombstones), so
//! probes stay as short as the load allows.

use std::hash::BuildHasher;

use stockd_protocol::prefetch;

use super::IdHashBuilder;

/// Marks an empty entry: no value may be this.
pub const EMPTY: u32 = u32::MAX;
/// The table grows when it would be fuller than this (numerator / 8):
/// linear probing stays short below it.
const MAX_LOAD_EIGHTHS: usize = 7;

#[derive(Default)]
pub struct Index {
    /// (key low half, key high half, value); the length is zero or a power of two.
    entries: Vec<[u32; 3]>,
    len: usize,
    hasher: IdHashBuilder,
}

fn key_of(e: &[u32; 3]) -> u64 {
    e[0] as u64 | (e[1] as u64) << 32
}

impl Index {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn mask(&self) -> usize {
        self.entries.len() - 1
    }

    /// Where the probe for `key` starts.
    fn home(&self, key: u64) -> usize {
        self.hasher.hash_one(key) as usize & self.mask()
    }

    /// The entry of `key`, or the empty one where it would go.
    fn probe(&self, key: u64) -> usize {
        let (lo, hi) = (key as u32, (key >> 32) as u32);
        let mut at = self.home(key);
        loop {
            let e = &self.entries[at];
            if e[2] == EMPTY || (e[0] == lo && e[1] == hi) {
                return at;
            }
            at = (at + 1) & self.mask();
        }
    }

    pub fn get(&self, key: u64) -> Option<u32> {
        if self.entries.is_empty() {
            return None;
        }
        let value = self.entries[self.probe(key)][2];
        (value != EMPTY).then_some(value)
    }

    /// The value of `key`, set to `value` if the key has no entry yet. The
    /// caller may change it, never to [`EMPTY`].
    pub fn get_or_insert(&mut self, key: u64, value: u32) -> &mut u32 {
        assert!(value != EMPTY, "invariant: a value is never the empty mark");
        self.reserve(1);
        let at = self.probe(key);
        let e = &mut self.entries[at];
        if e[2] == EMPTY {
            *e = [key as u32, (key >> 32) as u32, value];
            self.len += 1;
        }
        &mut e[2]
    }

    /// Where `key`'s entry is, if it has one. Positions stay put until the
    /// table grows (see [`Index::grows_on_insert`]); removal may move them.
    pub fn position_of(&self, key: u64) -> Option<usize> {
        if self.entries.is_empty() {
            return None;
        }
        let at = self.probe(key);
        (self.entries[at][2] != EMPTY).then_some(at)
    }

    /// Positions in the table (used or empty): [`Index::at`] takes `0..positions()`.
    pub fn positions(&self) -> usize {
        self.entries.len()
    }

    /// The key and value at `pos`, if it is in use.
    pub fn at(&self, pos: usize) -> Option<(u64, u32)> {
        let e = &self.entries[pos];
        (e[2] != EMPTY).then(|| (key_of(e), e[2]))
    }

    /// Whether the next [`Index::get_or_insert`] (of any key) grows the
    /// table, moving every entry.
    pub fn grows_on_insert(&self) -> bool {
        (self.len + 1) * 8 > self.entries.len() * MAX_LOAD_EIGHTHS
    }

    /// Forgets `key`; its value back.
    pub fn remove(&mut self, key: u64) -> Option<u32> {
        if self.entries.is_empty() {
            return None;
        }
        let mut hole = self.probe(key);
        let value = self.entries[hole][2];
        if value == EMPTY {
            return None;
        }
        // Entries after the hole that may sit in it (their probe passed it) move back.
        let mut next = (hole + 1) & self.mask();
        while self.entries[next][2] != EMPTY {
            let home = self.home(key_of(&self.entries[next]));
            if next.wrapping_sub(home) & self.mask() >= next.wrapping_sub(hole) & self.mask() {
                self.entries[hole] = self.entries[next];
                hole = next;
            }
            next = (next + 1) & self.mask();
        }
        self.entries[hole] = [0, 0, EMPTY];
        self.len -= 1;
        Some(value)
    }

    /// Room for `additional` more keys without growing.
    pub fn reserve(&mut self, additional: usize) {
        let want = self.len + additional;
        if want * 8 <= self.entries.len() * MAX_LOAD_EIGHTHS {
            return;
        }
        let mut size = self.entries.len().max(16);
        while want * 8 > size * MAX_LOAD_EIGHTHS {
            size *= 2;
        }
        let old = std::mem::replace(&mut self.entries, vec![[0, 0, EMPTY]; size]);
        for e in old.into_iter().filter(|e| e[2] != EMPTY) {
            let at = self.probe(key_of(&e));
            self.entries[at] = e;
        }
    }

    /// Asks the CPU to bring `key`'s entry into the cache, without waiting
    /// for it: a later [`Index::get`] then finds it there. The two lines
    /// from the key's home on, because a probe for a key that is not in the
    /// table (every new id) walks to the next empty entry: ~2.1 entries at
    /// the lowest load, 8.6 at 3/4 and 23 at 0.85, 1.2 to 5 lines (measured
    /// with this hash); one line left most such probes waiting for memory.
    pub fn prefetch(&self, key: u64) {
        if !self.entries.is_empty() {
            let home = self.home(key);
            // Entries are 12 bytes: those 4 and 8 after home start 48 and
            // 96 bytes on, so home's line and the next are both asked for.
            for ahead in [0, 4, 8] {
                prefetch(&self.entries[(home + ahead) & self.mask()]);
            }
        }
    }

    /// Every key and its value, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.entries.iter().filter(|e| e[2] != EMPTY).map(|e| (key_of(e), e[2]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_keeps_its_value_through_growth() {
        let mut index = Index::default();
        assert_eq!(index.get(5), None);
        // Keys that differ only in their high half, or only in their low one.
        let keys: Vec<u64> = (1..=5_000u64).flat_map(|i| [i, i << 32, u64::MAX - i]).collect();
        for (n, key) in keys.iter().enumerate() {
            assert_eq!(*index.get_or_insert(*key, n as u32), n as u32);
        }
        assert_eq!(index.len, keys.len());
        for (n, key) in keys.iter().enumerate() {
            assert_eq!(index.get(*key), Some(n as u32), "key {key:#x}");
            index.prefetch(*key);
        }
        assert_eq!(index.get(5_001), None);
        assert_eq!(index.get(5_001 << 32), None);
        // An existing key keeps its value; the caller may change it.
        *index.get_or_insert(7, 1) = 99;
        assert_eq!(index.get(7), Some(99));
        assert_eq!(index.len, keys.len());
        let mut all: Vec<u64> = index.iter().map(|(key, _)| key).collect();
        all.sort_unstable();
        let mut expected = keys.clone();
        expected.sort_unstable();
        assert_eq!(all, expected);
        assert!(index.entries.len() * MAX_LOAD_EIGHTHS >= index.len * 8);
    }

    #[test]
    fn an_entry_is_twelve_bytes() {
        assert_eq!(std::mem::size_of::<[u32; 3]>(), 12);
    }
}
