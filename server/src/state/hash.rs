//! Hashing for the id-keyed tables: a keyed murmur3 finalizer, and a map
//! split into 64 tables so that growing one never stalls a shard for long.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;

use stockd_protocol::fmix64;

use super::id_table::IdTable;

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
    // An enum's discriminant is hashed as a usize (`IdKey`'s, say): one mix
    // step, not one per byte through `write` (which made each hash of an
    // `IdKey` nine finalizers, ~100 instructions per lookup of `busy_ids`).
    fn write_usize(&mut self, x: usize) {
        self.write_u64(x as u64);
    }
    fn write_u32(&mut self, x: u32) {
        self.write_u64(x as u64);
    }
    fn write_u8(&mut self, x: u8) {
        self.write_u64(x as u64);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

pub type IdMap<V> = HashMap<u64, V, IdHashBuilder>;

/// A map from id split into 64 tables ([`IdTable`]s), for the tables that
/// grow to millions of entries: growing one re-hashes 1/64 of the entries,
/// so the shard stalls for milliseconds, not for the hundred-odd a single
/// table takes.
pub struct SplitMap<V> {
    parts: Vec<IdTable<V>>,
    len: usize,
}

/// Tables in a [`SplitMap`]; also the steps of a snapshot's id section.
pub const SPLIT_PARTS: usize = 64;

impl<V> Default for SplitMap<V> {
    fn default() -> Self {
        SplitMap { parts: (0..SPLIT_PARTS).map(|_| IdTable::default()).collect(), len: 0 }
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
    pub fn iter(&self) -> impl Iterator<Item = (u64, &V)> {
        self.parts.iter().flat_map(|p| p.iter())
    }
    pub fn part(&self, i: usize) -> &IdTable<V> {
        &self.parts[i]
    }
    /// Room for `additional` more entries in part `i`, without re-hashing as they come.
    pub fn reserve_part(&mut self, i: usize, additional: usize) {
        self.parts[i].reserve(additional);
    }
    /// Room for about `additional` more entries, spread over the parts.
    pub fn reserve(&mut self, additional: usize) {
        let each = additional.div_ceil(SPLIT_PARTS);
        for p in self.parts.iter_mut() {
            p.reserve(each);
        }
    }
    /// Asks the CPU for where `id` is (or would be) in its part, without waiting.
    pub fn prefetch(&self, id: u64) {
        self.parts[Self::part_of(id)].prefetch(id);
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
