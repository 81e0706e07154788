//! Every row's level as of one LSN, kept by each sink's reader of the log.
//!
//! Log records say what changed (an order of 3 takes 3 from on hand), not
//! what a row holds afterwards; events and read models need the level after
//! each change. Levels are sums of changes, so a reader that starts from the
//! server's state at LSN `E` can also go back to any earlier LSN `C` whose
//! later records are still in the log, by taking those records' changes back
//! out ([`Levels::rewind`]).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use stockd_protocol::{fmix64, Key};
use stockd_record::Mutation;

/// A hasher for row keys (two integers): one multiply-xorshift finish
/// instead of SipHash; the keys come from stockd's own log, not from an
/// attacker choosing collisions.
#[derive(Default)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        fmix64(self.0)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8)) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = fmix64(self.0 ^ v);
    }
    fn write_u32(&mut self, v: u32) {
        self.0 ^= u64::from(v).rotate_left(32);
    }
}

/// A map keyed by rows.
pub type KeyMap<V> = HashMap<Key, V, BuildHasherDefault<KeyHasher>>;

/// One row's level.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Level {
    pub on_hand: u64,
    pub held: u64,
}

impl Level {
    /// What can still be ordered: on hand less held.
    pub fn available(&self) -> u64 {
        self.on_hand.saturating_sub(self.held)
    }
}

/// What one line of a record did to its row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LineChange {
    pub key: Key,
    /// The line's quantity, as the request gave it (0 for an adjust).
    pub qty: u32,
    pub before: Level,
    pub after: Level,
}

/// Every row's level as of [`Levels::lsn`].
#[derive(Clone, Debug, Default)]
pub struct Levels {
    rows: KeyMap<Level>,
    lsn: u64,
}

fn add(v: u64, d: i64) -> u64 {
    v.checked_add_signed(d).unwrap_or_else(|| {
        tracing::error!(
            value = v,
            delta = d,
            "a row's level would leave 0..u64::MAX: the log disagrees with the state"
        );
        if d < 0 {
            0
        } else {
            u64::MAX
        }
    })
}

impl Levels {
    /// The levels `rows` (item, center, on hand, held) as of `lsn`.
    pub fn new(lsn: u64, rows: impl IntoIterator<Item = (Key, Level)>) -> Levels {
        Levels { rows: rows.into_iter().collect(), lsn }
    }

    pub fn lsn(&self) -> u64 {
        self.lsn
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn get(&self, key: Key) -> Level {
        self.rows.get(&key).copied().unwrap_or_default()
    }

    pub fn iter(&self) -> impl Iterator<Item = (Key, Level)> + '_ {
        self.rows.iter().map(|(k, l)| (*k, *l))
    }

    /// Applies the record at `lsn` and says what each of its lines did.
    pub fn apply(&mut self, lsn: u64, m: &Mutation) -> Vec<LineChange> {
        self.lsn = lsn;
        m.deltas()
            .zip(&m.lines)
            .map(|(d, line)| {
                let row = self.rows.entry(d.key).or_default();
                let before = *row;
                row.on_hand = add(row.on_hand, d.on_hand);
                row.held = add(row.held, d.held);
                LineChange { key: d.key, qty: line.qty, before, after: *row }
            })
            .collect()
    }

    /// Goes back to the levels as of `lsn`, taking out the records after it
    /// (through [`Levels::lsn`]), summed in `back`.
    pub fn rewind(&mut self, lsn: u64, back: Rewind) {
        for (key, (on_hand, held)) in back.0 {
            let row = self.rows.entry(key).or_default();
            row.on_hand = add(row.on_hand, -on_hand);
            row.held = add(row.held, -held);
        }
        self.lsn = lsn;
    }

    /// Marks the levels as of `lsn` (after records without changes, such as layout records).
    pub fn set_lsn(&mut self, lsn: u64) {
        self.lsn = lsn;
    }
}

/// The changes of records to take back out of levels, summed per row.
///
/// They are summed first and taken out at once because a row's level is a
/// valid one (nothing below 0) only between records in the order they were
/// applied: taking a reserve back before the confirm that followed it would
/// take held below 0.
#[derive(Default)]
pub struct Rewind(KeyMap<(i64, i64)>);

impl Rewind {
    pub fn add(&mut self, m: &Mutation) {
        for d in m.deltas() {
            let row = self.0.entry(d.key).or_default();
            row.0 += d.on_hand;
            row.1 += d.held;
        }
    }
}

/// The rows one record changed, each once: its level before the record and after it.
pub fn rows_changed(lines: &[LineChange]) -> Vec<(Key, Level, Level)> {
    let mut rows: Vec<(Key, Level, Level)> = Vec::with_capacity(lines.len());
    for l in lines {
        match rows.iter_mut().find(|(k, _, _)| *k == l.key) {
            Some(row) => row.2 = l.after,
            None => rows.push((l.key, l.before, l.after)),
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use stockd_protocol::Line;
    use stockd_record::Op;

    fn m(op: Op, lines: &[(u64, u32, u32)]) -> Mutation {
        Mutation { op, lines: lines.iter().map(|&(i, f, q)| Line::new(i, f, q)).collect() }
    }

    #[test]
    fn apply_says_each_line_and_rewind_goes_back_exactly() {
        let key = Key { item: 7, fc: 1 };
        let mut levels = Levels::new(10, [(key, Level { on_hand: 10, held: 0 })]);
        let records = [
            m(Op::Reserve { id: 1, ttl_ms: 1000 }, &[(7, 1, 4)]),
            m(Op::Order { id: 2 }, &[(7, 1, 6), (8, 2, 0)]),
            m(Op::Confirm { id: 1 }, &[(7, 1, 4)]),
            m(Op::Inbound { id: 3 }, &[(7, 1, 5), (7, 1, 1)]),
            m(Op::Adjust { before: 6, after: 2, reason: 1 }, &[(7, 1, 0)]),
        ];
        let mut seen = Vec::new();
        for (i, r) in records.iter().enumerate() {
            seen.push(levels.apply(11 + i as u64, r));
        }
        assert_eq!(seen[0][0].after, Level { on_hand: 10, held: 4 });
        assert_eq!(seen[1][0].after.available(), 0, "sold out");
        assert_eq!(seen[2][0].after, Level { on_hand: 0, held: 0 });
        assert_eq!(rows_changed(&seen[3]), vec![(key, Level::default(), Level { on_hand: 6, held: 0 })]);
        assert_eq!(levels.get(key), Level { on_hand: 2, held: 0 });
        assert_eq!(levels.lsn(), 15);
        // In log order, as a reader finds them: the reserve before the confirm.
        let mut back = Rewind::default();
        for r in &records {
            back.add(r);
        }
        levels.rewind(10, back);
        assert_eq!(levels.lsn(), 10);
        assert_eq!(levels.get(key), Level { on_hand: 10, held: 0 });
        assert_eq!(levels.get(Key { item: 8, fc: 2 }), Level::default());
    }
}
