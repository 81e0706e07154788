//! The rule every reader of the replication topic applies, primary and
//! standbys alike, so that all of them agree on one history:
//!
//! - the first `promote` with an epoch above the current one wins: its
//!   node is the primary of that epoch from there on;
//! - a data record counts only if its epoch is the current one (epoch 0 has
//!   no primary) and its LSN is the last one applied + 1. Lower LSNs are
//!   duplicates (a re-sent message) and skipped; a higher one is a gap:
//!   skipped, and the reader stays where it is until the missing record
//!   comes (never applied out of order); records of other epochs are a
//!   replaced primary's and ignored. A data message carries a run of
//!   records: those already applied are skipped, the rest applied.
//!
//! Pure: no I/O, so the rule is tested on its own.

use super::envelope::{Envelope, Kind};

/// Who leads the current epoch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Leader {
    pub node: u64,
    /// Its client address, as it announced it.
    pub addr: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Follower {
    pub epoch: u64,
    pub leader: Option<Leader>,
    /// The last LSN of the agreed history.
    pub applied: u64,
}

/// What one message means for a reader.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// The next records of the history: apply the message's records from
    /// index `from` on (the last of them is now `applied`).
    Apply { from: usize },
    /// A new epoch begins; `leader` leads it.
    Promoted,
    /// The current primary is alive.
    Heartbeat,
    /// Nothing to do: why, for the log.
    Skip(&'static str),
    /// A record beyond the next one: the reader waits for the missing ones.
    Gap { want: u64, got: u64 },
}

impl Follower {
    pub fn new(epoch: u64, leader: Option<Leader>, applied: u64) -> Follower {
        Follower { epoch, leader, applied }
    }

    /// What message `e`, with `records` records if it is data, means.
    pub fn step(&mut self, e: &Envelope<'_>, records: usize) -> Step {
        match e.kind {
            Kind::Promote if e.epoch > self.epoch => {
                self.epoch = e.epoch;
                let addr = String::from_utf8_lossy(e.body).into_owned();
                self.leader = Some(Leader { node: e.node, addr });
                Step::Promoted
            }
            Kind::Promote => Step::Skip("a promotion that lost: its epoch is not above the current one"),
            Kind::Heartbeat if e.epoch == self.epoch => Step::Heartbeat,
            Kind::Heartbeat => Step::Skip("a heartbeat of another epoch"),
            Kind::Data if e.epoch != self.epoch || e.epoch == 0 => Step::Skip("a record of another epoch"),
            Kind::Data if e.lsn + records as u64 <= self.applied + 1 => {
                Step::Skip("a record already applied")
            }
            Kind::Data if e.lsn > self.applied + 1 => Step::Gap { want: self.applied + 1, got: e.lsn },
            Kind::Data => {
                let from = (self.applied + 1 - e.lsn) as usize;
                self.applied = e.lsn + records as u64 - 1;
                Step::Apply { from }
            }
        }
    }

    /// The current epoch is led by `node`.
    pub fn led_by(&self, node: u64) -> bool {
        self.leader.as_ref().is_some_and(|l| l.node == node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(epoch: u64, lsn: u64) -> Envelope<'static> {
        Envelope { kind: Kind::Data, epoch, lsn, ts_ms: 0, node: epoch, body: b"" }
    }

    fn promote(epoch: u64, node: u64) -> Envelope<'static> {
        Envelope { kind: Kind::Promote, epoch, lsn: 0, ts_ms: 0, node, body: b"127.0.0.1:1" }
    }

    #[test]
    fn first_higher_promote_wins_and_fences_the_old_epoch() {
        let mut f = Follower::default();
        assert_eq!(f.step(&data(0, 1), 1), Step::Skip("a record of another epoch"));
        assert_eq!(f.step(&promote(1, 10), 0), Step::Promoted);
        assert_eq!(f.step(&data(1, 1), 1), Step::Apply { from: 0 });
        assert_eq!(f.step(&data(1, 2), 1), Step::Apply { from: 0 });
        // Two standbys race for epoch 2: the first wins, the second is stale.
        assert_eq!(f.step(&promote(2, 20), 0), Step::Promoted);
        assert_eq!(
            f.step(&promote(2, 30), 0),
            Step::Skip("a promotion that lost: its epoch is not above the current one")
        );
        assert!(f.led_by(20) && !f.led_by(30));
        // The old primary's late record is ignored; the new one continues.
        assert_eq!(f.step(&data(1, 3), 1), Step::Skip("a record of another epoch"));
        assert_eq!(f.step(&data(2, 3), 1), Step::Apply { from: 0 });
        assert_eq!(f.applied, 3);
    }

    #[test]
    fn duplicates_are_skipped_and_gaps_wait() {
        let mut f = Follower::new(1, None, 5);
        assert_eq!(f.step(&data(1, 5), 1), Step::Skip("a record already applied"));
        assert_eq!(f.step(&data(1, 8), 1), Step::Gap { want: 6, got: 8 });
        assert_eq!(f.applied, 5);
        // The producer sends again from 6: 6, 7, 8 apply; 8's first copy never did.
        for lsn in 6..=8 {
            assert_eq!(f.step(&data(1, lsn), 1), Step::Apply { from: 0 });
        }
        assert_eq!(f.step(&data(1, 7), 1), Step::Skip("a record already applied"));
        // A run of records 7..=10 after 8: 9 and 10 apply, from index 2.
        assert_eq!(f.step(&data(1, 7), 4), Step::Apply { from: 2 });
        assert_eq!(f.applied, 10);
        assert_eq!(f.step(&data(1, 9), 2), Step::Skip("a record already applied"));
        assert_eq!(f.step(&data(1, 12), 3), Step::Gap { want: 11, got: 12 });
    }

    #[test]
    fn heartbeats_count_only_in_their_epoch() {
        let mut f = Follower::new(2, None, 0);
        let hb = |epoch| Envelope { kind: Kind::Heartbeat, epoch, lsn: 0, ts_ms: 0, node: 1, body: b"" };
        assert_eq!(f.step(&hb(2), 0), Step::Heartbeat);
        assert_eq!(f.step(&hb(1), 0), Step::Skip("a heartbeat of another epoch"));
    }
}
