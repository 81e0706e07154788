//! A warning whose cause can repeat thousands of times a second (every
//! order refused while the id table is full, every connection over the
//! cap): logged at most once per interval, with how many times its cause
//! came since the last one, so that the log says what happened without
//! drowning in it.

use std::time::{Duration, Instant};

/// How often a throttled warning is logged at most.
pub const WARN_EVERY: Duration = Duration::from_secs(10);

pub struct Throttled {
    every: Duration,
    last: Option<Instant>,
    /// Occurrences since the last warning, this one not counted yet.
    since: u64,
}

impl Throttled {
    pub const fn new(every: Duration) -> Throttled {
        Throttled { every, last: None, since: 0 }
    }

    /// Counts one occurrence at `now`. Some(n) when the warning is due:
    /// the first occurrence, or the first once `every` has passed since the
    /// last warning; n is how many occurrences it covers (this one and
    /// those not warned about since the last one).
    pub fn hit(&mut self, now: Instant) -> Option<u64> {
        self.since += 1;
        if self.last.is_some_and(|last| now.saturating_duration_since(last) < self.every) {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.since))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warns_at_once_then_once_per_interval_with_the_count_in_between() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut w = Throttled::new(Duration::from_secs(10));
        assert_eq!(w.hit(at(0)), Some(1), "the first occurrence warns");
        assert_eq!(w.hit(at(1)), None);
        assert_eq!(w.hit(at(9_999)), None);
        assert_eq!(w.hit(at(10_000)), Some(3), "the next warning covers the two held back and itself");
        assert_eq!(w.hit(at(15_000)), None);
        assert_eq!(w.hit(at(60_000)), Some(2));
        assert_eq!(w.hit(at(70_001)), Some(1), "a quiet interval starts over");
    }
}
