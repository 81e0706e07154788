//! When each open-loop worker sends, and what.
//!
//! Caller `c` is the `c / connections`-th of client `c % connections`.
//! Send times are staggered in slot order, the callers of one client next
//! to each other, so that those due in one tick of the pacer mostly share a
//! connection and go out in one write (spread over every connection
//! instead, each request was a packet of its own: docs/benchmarks.md,
//! *Open-loop sends on time*).
//!
//! A worker sends a request once its previous one is answered, and latency
//! counts from the intended time, so a request held up behind a slow one is
//! charged the wait. A mixed workload is therefore its kinds' open loops run
//! together: every caller runs one worker per kind in the mix, and a kind's
//! workers share its part of the rate. A query never waits behind an order
//! of its own worker that waits for the disk (a shopper's query does not
//! wait for another shopper's order), each kind has the concurrency a run
//! of that kind alone would have (a worker per caller: orders, slower than
//! queries, are not starved of workers by their small share), and the mix
//! of requests sent is the workload's, exactly.

use std::time::Duration;

use crate::{Kind, Workload};

/// One open-loop worker: it runs on the connection of client `caller %
/// connections`; its first send is at the run's start plus `offset`, then
/// one every `interval`, each of kind `kind` (none: drawn per request from
/// the workload, which has one kind).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sched {
    pub caller: usize,
    pub offset: Duration,
    pub interval: Duration,
    pub kind: Option<Kind>,
}

/// Every open-loop worker's sends, `rate` requests a second in all.
pub fn schedule(
    workload: Workload,
    connections: usize,
    pipeline: usize,
    rate: f64,
) -> Result<Vec<Sched>, String> {
    let callers = connections * pipeline;
    if callers == 0 || !(rate > 0.0 && rate.is_finite()) {
        return Err("an open loop needs at least one caller and a positive rate".into());
    }
    let kinds: Vec<(Option<Kind>, f64)> = match workload {
        Workload::Mixed { query, order, inbound } => {
            [(Kind::Query, query), (Kind::Order, order), (Kind::Inbound, inbound)]
                .into_iter()
                .filter(|&(_, share)| share > 0)
                .map(|(k, share)| (Some(k), rate * share as f64 / 100.0))
                .collect()
        }
        _ => vec![(None, rate)],
    };
    let slot_of = |c: usize| (c % connections) * pipeline + c / connections;
    let mut all = Vec::with_capacity(kinds.len() * callers);
    for (kind, part) in kinds {
        let interval = Duration::try_from_secs_f64(callers as f64 / part).map_err(|_| {
            format!("--rate {rate} is too low: a worker would wait longer between sends than a clock counts")
        })?;
        all.extend((0..callers).map(|caller| Sched {
            caller,
            offset: interval.mul_f64(slot_of(caller) as f64 / callers as f64),
            interval,
            kind,
        }));
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offered(s: &[Sched], kind: Option<Kind>) -> f64 {
        s.iter().filter(|x| x.kind == kind).map(|x| 1.0 / x.interval.as_secs_f64()).sum()
    }

    #[test]
    fn one_kind_spreads_the_rate_over_every_worker_evenly() {
        let s = schedule(Workload::Order, 4, 8, 64_000.0).unwrap();
        assert_eq!(s.len(), 32);
        assert!(s.iter().all(|x| x.kind.is_none() && x.interval == Duration::from_micros(500)));
        assert_eq!(s.iter().map(|x| x.caller).collect::<Vec<_>>(), (0..32).collect::<Vec<_>>());
        assert!((offered(&s, None) / 64_000.0 - 1.0).abs() < 1e-9);
        // Offsets: every multiple of 500 / 32 us once, a client's callers adjacent.
        let mut offsets: Vec<_> = s.iter().map(|x| x.offset).collect();
        offsets.sort();
        for (i, o) in offsets.iter().enumerate() {
            assert_eq!(*o, Duration::from_micros(500).mul_f64(i as f64 / 32.0));
        }
        assert_eq!(s[0].offset, Duration::ZERO); // client 0, caller 0
        assert_eq!(s[4].offset, Duration::from_micros(500).mul_f64(1.0 / 32.0));
        // client 0, caller 1
    }

    #[test]
    fn a_mix_runs_each_kind_on_every_caller_at_its_share_of_the_rate() {
        let mix = Workload::Mixed { query: 90, order: 9, inbound: 1 };
        let s = schedule(mix, 16, 16, 300_000.0).unwrap();
        assert_eq!(s.len(), 3 * 256);
        for (k, share) in [(Kind::Query, 0.90), (Kind::Order, 0.09), (Kind::Inbound, 0.01)] {
            let mine: Vec<_> = s.iter().filter(|x| x.kind == Some(k)).collect();
            let mut callers: Vec<_> = mine.iter().map(|x| x.caller).collect();
            callers.sort();
            assert_eq!(callers, (0..256).collect::<Vec<_>>(), "{k:?}: a worker on every caller");
            // Exact but for the nanosecond the interval is rounded to.
            let r = offered(&s, Some(k));
            assert!((r / (300_000.0 * share) - 1.0).abs() < 1e-6, "{k:?}: {r}/s offered");
            // A kind's sends are evenly staggered over its interval.
            let mut offsets: Vec<_> = mine.iter().map(|x| x.offset.as_secs_f64()).collect();
            offsets.sort_by(f64::total_cmp);
            let step = mine[0].interval.as_secs_f64() / 256.0;
            for (i, o) in offsets.iter().enumerate() {
                assert!(
                    (o - step * i as f64).abs() < 1e-9,
                    "{k:?}: offset {i} is {o}, not {}",
                    step * i as f64
                );
            }
        }
        let none = schedule(Workload::Mixed { query: 100, order: 0, inbound: 0 }, 1, 2, 10.0).unwrap();
        assert_eq!(none.len(), 2, "no workers for a kind of share 0");
        assert!(none.iter().all(|x| x.kind == Some(Kind::Query) && x.interval == Duration::from_millis(200)));
        assert!(schedule(mix, 1, 1, 0.0).is_err());
        assert!(schedule(mix, 1, 1, 1e-300).unwrap_err().contains("rate"), "an interval beyond any clock");
    }
}
