//! A lock-free histogram with fixed buckets: the log writer and the
//! snapshot thread record into it on their hot paths (one atomic add per
//! observation), and a metrics endpoint reads it from any thread.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

pub struct AtomicHistogram {
    /// Upper bounds of the buckets, ascending; one more bucket catches the rest.
    bounds: &'static [u64],
    counts: Vec<AtomicU64>,
    sum: AtomicU64,
}

/// What a histogram holds at one moment: (sum, count, per-bucket counts by upper bound).
pub type HistogramSnapshot = (u64, u64, Vec<(f64, u64)>);

impl AtomicHistogram {
    pub fn new(bounds: &'static [u64]) -> AtomicHistogram {
        assert!(bounds.windows(2).all(|w| w[0] < w[1]), "invariant: bucket bounds ascend");
        AtomicHistogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: u64) {
        self.observe_n(value, 1);
    }

    /// Observes `value` `n` times (say, the wait of each record of a batch
    /// that waited together).
    pub fn observe_n(&self, value: u64, n: u64) {
        let i = self.bounds.partition_point(|b| *b < value);
        self.counts[i].fetch_add(n, Relaxed);
        self.sum.fetch_add(value.saturating_mul(n), Relaxed);
    }

    /// The upper bound of the bucket that holds the `q` quantile (0..=1) of
    /// what was observed: the quantile is at most this (`u64::MAX`: above
    /// every bound); `None` before any observation.
    pub fn quantile_bound(&self, q: f64) -> Option<u64> {
        let counts: Vec<u64> = self.counts.iter().map(|c| c.load(Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let want = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                return Some(self.bounds.get(i).copied().unwrap_or(u64::MAX));
            }
        }
        Some(u64::MAX)
    }

    /// The counts now (not one atomic moment: good enough for monitoring).
    pub fn snapshot(&self) -> HistogramSnapshot {
        let buckets: Vec<(f64, u64)> = self
            .counts
            .iter()
            .enumerate()
            .map(|(i, c)| (self.bounds.get(i).map_or(f64::INFINITY, |b| *b as f64), c.load(Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, c)| c).sum();
        (self.sum.load(Relaxed), count, buckets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_land_in_the_first_bucket_that_holds_them() {
        let h = AtomicHistogram::new(&[10, 100]);
        for v in [0, 10, 11, 100, 101, 5_000] {
            h.observe(v);
        }
        let (sum, count, buckets) = h.snapshot();
        assert_eq!((sum, count), (5_222, 6));
        assert_eq!(buckets, vec![(10.0, 2), (100.0, 2), (f64::INFINITY, 2)]);
        assert_eq!(h.quantile_bound(0.3), Some(10));
        h.observe_n(50, 4);
        let (sum, count, buckets) = h.snapshot();
        assert_eq!((sum, count), (5_422, 10), "four observations of 50");
        assert_eq!(buckets[1], (100.0, 6));
        assert_eq!(h.quantile_bound(0.5), Some(100));
        assert_eq!(h.quantile_bound(0.99), Some(u64::MAX));
        assert_eq!(AtomicHistogram::new(&[1]).quantile_bound(0.5), None);
    }
}
