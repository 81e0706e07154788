//! A mutation as it passes between the threads that handle it: the
//! coordinator's transaction, a prepare to another shard, the log
//! writer's token, and each applying shard's commit.
//!
//! A mutation of at most one line travels by copy: no allocation, and no
//! shared reference count whose cache line moves between the cores of the
//! coordinator, the commit thread and the applying shards with every
//! clone and drop. A longer one is shared behind an `Arc` (one allocation
//! whatever the shards it visits, where copies would allocate its lines
//! once per shard).

use std::ops::Deref;
use std::sync::Arc;

use crate::state::Mutation;

#[derive(Clone, Debug)]
pub enum Passed {
    Copied(Mutation),
    Shared(Arc<Mutation>),
}

impl Passed {
    pub fn new(m: Mutation) -> Passed {
        if m.lines.len() <= 1 {
            Passed::Copied(m)
        } else {
            Passed::Shared(Arc::new(m))
        }
    }
}

impl Deref for Passed {
    type Target = Mutation;

    fn deref(&self) -> &Mutation {
        match self {
            Passed::Copied(m) => m,
            Passed::Shared(m) => m,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Op;
    use stockd_protocol::{Key, Line};

    fn order(lines: u32) -> Mutation {
        let lines = (0..lines).map(|i| Line { key: Key { item: i as u64, fc: 1 }, qty: 1 }).collect();
        Mutation { op: Op::Order { id: 7 }, lines }
    }

    #[test]
    fn one_line_travels_by_copy_more_are_shared() {
        for lines in [0, 1] {
            let p = Passed::new(order(lines));
            assert!(matches!(p, Passed::Copied(_)));
            assert!(!p.lines.spilled(), "a copy of it allocates nothing");
            assert_eq!(*p.clone(), order(lines));
        }
        let p = Passed::new(order(3));
        let Passed::Shared(arc) = &p else { panic!("three lines are shared") };
        let q = p.clone();
        assert_eq!(Arc::strong_count(arc), 2, "a clone shares them");
        assert_eq!(*q, order(3));
    }
}
