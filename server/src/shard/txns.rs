//! The mutations one shard coordinates, by transaction number: a slab, not
//! a hash map. A number names its slot (the low bits) and which use of the
//! slot it was (the bits above), so a number that outlived its mutation (a
//! vote for one already refused, say) finds nothing, and a lookup is an
//! index and one compare. A mutation's number passes through several hands
//! (prepare, vote, log, commit, answer): with a hash map each of them hashed
//! and probed, ~250 instructions of the shard's ~5,200 per 1-line order
//! (callgrind, docs/benchmarks.md).

/// Numbers of one shard: `shard << SHARD_SHIFT | use << slot_bits | slot`.
const SHARD_SHIFT: u32 = 56;

pub struct Txns<T> {
    slots: Vec<Slot<T>>,
    /// Slots without a mutation, the latest freed last (taken first: its
    /// memory is the warmest).
    free: Vec<u32>,
    len: usize,
    /// The most slots: a power of two.
    capacity: usize,
    slot_bits: u32,
    /// `shard << SHARD_SHIFT`: numbers of different shards never meet.
    prefix: u64,
}

struct Slot<T> {
    /// The number of the mutation in it (or of its last one).
    txn: u64,
    value: Option<T>,
}

impl<T> Txns<T> {
    /// A table for shard `shard` (below 256) holding at most `capacity`
    /// mutations (a power of two).
    pub fn new(shard: usize, capacity: usize) -> Txns<T> {
        assert!(capacity.is_power_of_two(), "invariant: the slots are numbered by a power of two");
        assert!(shard < 1 << (64 - SHARD_SHIFT), "invariant: a shard's index fits its numbers' top byte");
        Txns {
            slots: Vec::new(),
            free: Vec::new(),
            len: 0,
            capacity,
            slot_bits: capacity.trailing_zeros(),
            prefix: (shard as u64) << SHARD_SHIFT,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Keeps `value` and gives it its number. The caller keeps below the
    /// capacity (it refuses the mutation otherwise).
    pub fn insert(&mut self, value: T) -> u64 {
        assert!(self.len < self.capacity, "invariant: at most {} mutations in flight", self.capacity);
        self.len += 1;
        let uses_mask = (1u64 << (SHARD_SHIFT - self.slot_bits)) - 1;
        if let Some(at) = self.free.pop() {
            let slot = &mut self.slots[at as usize];
            // The next use of the slot: 2^42 of them before a number repeats.
            let uses = ((slot.txn & ((1 << SHARD_SHIFT) - 1)) >> self.slot_bits).wrapping_add(1) & uses_mask;
            slot.txn = self.prefix | uses << self.slot_bits | at as u64;
            slot.value = Some(value);
            return slot.txn;
        }
        // Uses count from 1: no number is 0.
        let at = self.slots.len() as u64;
        let txn = self.prefix | 1 << self.slot_bits | at;
        self.slots.push(Slot { txn, value: Some(value) });
        txn
    }

    /// The slot a number names (whether or not it still holds that number).
    fn at(&self, txn: u64) -> usize {
        (txn & (self.capacity as u64 - 1)) as usize
    }

    pub fn get(&self, txn: u64) -> Option<&T> {
        self.slots.get(self.at(txn)).filter(|s| s.txn == txn)?.value.as_ref()
    }

    pub fn get_mut(&mut self, txn: u64) -> Option<&mut T> {
        let at = self.at(txn);
        self.slots.get_mut(at).filter(|s| s.txn == txn)?.value.as_mut()
    }

    pub fn contains(&self, txn: u64) -> bool {
        self.get(txn).is_some()
    }

    pub fn remove(&mut self, txn: u64) -> Option<T> {
        let at = self.at(txn);
        let value = self.slots.get_mut(at).filter(|s| s.txn == txn)?.value.take()?;
        self.len -= 1;
        self.free.push(at as u32);
        Some(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_number_finds_its_mutation_and_nothing_after_it_is_removed() {
        let mut t = Txns::new(3, 4);
        let a = t.insert("a");
        let b = t.insert("b");
        assert_ne!(a, b);
        assert_eq!(a >> SHARD_SHIFT, 3, "the shard is in the number");
        assert_eq!((t.get(a), t.get(b), t.len()), (Some(&"a"), Some(&"b"), 2));
        assert_eq!(t.remove(a), Some("a"));
        assert_eq!(t.remove(a), None);
        assert_eq!((t.get(a), t.len()), (None, 1));
        // The slot is used again under a new number; the old one stays dead.
        let c = t.insert("c");
        assert_eq!(c & 3, a & 3, "the freed slot is taken first");
        assert_ne!(c, a);
        assert_eq!((t.get(a), t.get(c)), (None, Some(&"c")));
        *t.get_mut(c).unwrap() = "c2";
        assert!(t.get_mut(a).is_none());
        assert_eq!(t.remove(c), Some("c2"));
        assert!(t.contains(b) && !t.contains(c));
        // A number of another shard, or of a slot never used, finds nothing.
        assert!(t.get(b ^ 1 << SHARD_SHIFT).is_none());
        assert!(t.get(3).is_none());
    }

    #[test]
    fn every_mutation_in_flight_has_its_own_number() {
        let cap = 64;
        let mut t = Txns::new(0, cap);
        let mut live = std::collections::HashMap::new();
        let mut seen = std::collections::HashSet::new();
        for round in 0..1_000u64 {
            // Fill to the capacity, then free a varying part of it.
            while t.len() < cap {
                let n = t.insert(round);
                assert!(seen.insert(n), "number {n} given twice");
                live.insert(n, round);
            }
            let mut gone: Vec<u64> = live.keys().copied().filter(|n| (n ^ round) % 3 == 0).collect();
            gone.sort_unstable();
            for n in gone {
                assert_eq!(t.remove(n), live.remove(&n));
            }
            for (n, v) in &live {
                assert_eq!(t.get(*n), Some(v));
            }
            assert_eq!(t.len(), live.len());
        }
    }

    #[test]
    #[should_panic(expected = "mutations in flight")]
    fn inserting_past_the_capacity_is_a_bug() {
        let mut t = Txns::new(0, 2);
        t.insert(1);
        t.insert(2);
        t.insert(3);
    }
}
