//! Item -> the first slot of its rows: an open-addressing table with linear
//! probing, built for the one lookup every row access starts with.
//!
//! An entry is 12 bytes (the item as two u32 halves, the head) and holds
//! everything a lookup needs, so a lookup reads one cache line, where a
//! general hash map reads its control bytes first and then its bucket: two
//! dependent misses on a table larger than the caches. And because where an
//! item's entry lives is known from its hash alone, callers with many keys
//! at hand (a batch of queries, a batch of replayed records) can ask for
//! the entries' lines ahead of use ([`Heads::prefetch`]) and wait for many
//! misses at once instead of one after another.
//!
//! Entries are never removed (rows, once they exist, stay), so probing
//! needs no tombstones.

use std::hash::BuildHasher;

use stockd_protocol::prefetch;

use super::IdHashBuilder;

/// Marks an empty entry: no head is this value (a store holds fewer than
/// 2^31 - 1 rows, see `Rows::get_or_insert`).
const EMPTY: u32 = u32::MAX;
/// The table grows when it would be fuller than this (numerator / 8):
/// linear probing stays short below it.
const MAX_LOAD_EIGHTHS: usize = 7;

#[derive(Default)]
pub struct Heads {
    /// (item low half, item high half, head); the length is zero or a power of two.
    entries: Vec<[u32; 3]>,
    len: usize,
    hasher: IdHashBuilder,
}

fn halves(item: u64) -> (u32, u32) {
    (item as u32, (item >> 32) as u32)
}

impl Heads {
    /// Where the probe for `item` starts.
    fn home(&self, item: u64) -> usize {
        self.hasher.hash_one(item) as usize & (self.entries.len() - 1)
    }

    /// The entry of `item`, or the empty one where it would go.
    fn probe(&self, item: u64) -> usize {
        let (lo, hi) = halves(item);
        let mask = self.entries.len() - 1;
        let mut at = self.home(item);
        loop {
            let e = &self.entries[at];
            if e[2] == EMPTY || (e[0] == lo && e[1] == hi) {
                return at;
            }
            at = (at + 1) & mask;
        }
    }

    pub fn get(&self, item: u64) -> Option<u32> {
        if self.entries.is_empty() {
            return None;
        }
        let head = self.entries[self.probe(item)][2];
        (head != EMPTY).then_some(head)
    }

    /// The head of `item`, set to `head` if the item has no entry yet.
    pub fn get_or_insert(&mut self, item: u64, head: u32) -> &mut u32 {
        assert!(head != EMPTY, "invariant: a head is a slot, never the empty mark");
        if (self.len + 1) * 8 > self.entries.len() * MAX_LOAD_EIGHTHS {
            self.grow();
        }
        let at = self.probe(item);
        let e = &mut self.entries[at];
        if e[2] == EMPTY {
            let (lo, hi) = halves(item);
            *e = [lo, hi, head];
            self.len += 1;
        }
        &mut e[2]
    }

    fn grow(&mut self) {
        let size = (self.entries.len() * 2).max(16);
        let old = std::mem::replace(&mut self.entries, vec![[0, 0, EMPTY]; size]);
        for e in old.into_iter().filter(|e| e[2] != EMPTY) {
            let at = self.probe(e[0] as u64 | (e[1] as u64) << 32);
            self.entries[at] = e;
        }
    }

    /// Asks the CPU to bring `item`'s entry into the cache, without waiting
    /// for it: a later [`Heads::get`] then finds it there.
    pub fn prefetch(&self, item: u64) {
        if !self.entries.is_empty() {
            prefetch(&self.entries[self.home(item)]);
        }
    }

    /// Every item with an entry, in no particular order.
    pub fn items(&self) -> impl Iterator<Item = u64> + '_ {
        self.entries.iter().filter(|e| e[2] != EMPTY).map(|e| e[0] as u64 | (e[1] as u64) << 32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_keeps_its_head_through_growth() {
        let mut heads = Heads::default();
        assert_eq!(heads.get(5), None);
        // Items that differ only in their high half, or only in their low one.
        let items: Vec<u64> = (1..=5_000u64).flat_map(|i| [i, i << 32, u64::MAX - i]).collect();
        for (n, item) in items.iter().enumerate() {
            assert_eq!(*heads.get_or_insert(*item, n as u32), n as u32);
        }
        assert_eq!(heads.len, items.len());
        for (n, item) in items.iter().enumerate() {
            assert_eq!(heads.get(*item), Some(n as u32), "item {item:#x}");
            heads.prefetch(*item);
        }
        assert_eq!(heads.get(5_001), None);
        assert_eq!(heads.get(5_001 << 32), None);
        // An existing item keeps its head; the caller may change it.
        *heads.get_or_insert(7, 1) = 99;
        assert_eq!(heads.get(7), Some(99));
        assert_eq!(heads.len, items.len());
        let mut all: Vec<u64> = heads.items().collect();
        all.sort_unstable();
        let mut expected = items.clone();
        expected.sort_unstable();
        assert_eq!(all, expected);
        assert!(heads.entries.len() * MAX_LOAD_EIGHTHS >= heads.len * 8);
    }

    #[test]
    fn an_entry_is_twelve_bytes() {
        assert_eq!(std::mem::size_of::<[u32; 3]>(), 12);
    }
}
