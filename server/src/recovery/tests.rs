//! Restarts against runs that never restarted: random operations under small
//! id caps (so ids are forgotten all the time), snapshots at random points,
//! restarts with 1 to 4 shards. After every restart the shards must remember
//! exactly the ids a run without the restart remembers, and answer every
//! retry the same way, then and after more operations.

use proptest::prelude::*;
use stockd_protocol::{shard_of, Key, Line, Reply, Response};

use super::Rebuild;
use crate::shard::answers::{answer_response, refusal_response};
use crate::state::{Answer, Command, IdEntry, IdLimits, LogRecord, LogStamp, Mutation, Refusal, Store};

/// Ids come from a small range so that retries, reuse after forgetting and
/// the caps all meet often.
const IDS: u64 = 12;
const KEYS: [Key; 3] = [Key { item: 1, fc: 1 }, Key { item: 2, fc: 1 }, Key { item: 3, fc: 2 }];

fn lines() -> impl Strategy<Value = Vec<Line>> {
    prop::collection::vec((0..KEYS.len(), 1u32..4), 1..3)
        .prop_map(|v| v.into_iter().map(|(k, qty)| Line { key: KEYS[k], qty }).collect())
}

fn command() -> impl Strategy<Value = Command> {
    let id = 0..IDS;
    prop_oneof![
        4 => (id.clone(), lines()).prop_map(|(id, lines)| Command::Order { id, lines: lines.into() }),
        4 => (id.clone(), lines()).prop_map(|(id, lines)| Command::Inbound { id, lines: lines.into() }),
        1 => id.clone().prop_map(|id| Command::Cancel { id }),
        2 => (id.clone(), 1u32..200, lines()).prop_map(|(id, ttl_ms, lines)| Command::Reserve { id, ttl_ms, lines: lines.into() }),
        1 => id.clone().prop_map(|id| Command::Confirm { id }),
        1 => id.clone().prop_map(|id| Command::Release { id, expired: false }),
    ]
}

/// A snapshot set as the disk holds it: lsn, one payload per shard.
type SnapshotSet = (u64, Vec<Vec<u8>>);
/// Every remembered order/hold id and receipt id, sorted by id.
type Remembered = (Vec<(u64, IdEntry)>, Vec<(u64, LogStamp)>);

/// One shard's snapshot pieces so far, and whether the last one came.
type Pieces = (Vec<u8>, bool);

/// Shards driven the way the server drives them, with their log and snapshots.
struct Cluster {
    stores: Vec<Store>,
    limits: IdLimits,
    /// (lsn, ts_ms, payload), as the WAL holds them.
    log: Vec<(u64, u64, Vec<u8>)>,
    lsn: u64,
    txn: u64,
    /// The last complete snapshot set (what the manifest names).
    snapshot: Option<SnapshotSet>,
    /// Parts of the snapshot being written.
    /// The snapshot being written: its LSN, and per shard its pieces so far.
    writing: Option<(u64, Vec<Pieces>)>,
}

impl Cluster {
    /// A fresh data directory: the server logs its layout first.
    fn fresh(shards: usize, limits: IdLimits) -> Cluster {
        let mut c = Cluster {
            stores: Store::regroup(Vec::new(), shards, limits),
            limits,
            log: Vec::new(),
            lsn: 0,
            txn: 0,
            snapshot: None,
            writing: None,
        };
        c.log_layout(shards, 0);
        c
    }

    fn log_layout(&mut self, shards: usize, ts_ms: u64) {
        self.lsn += 1;
        self.log.push((self.lsn, ts_ms, LogRecord::layout(shards as u16)));
    }

    /// plan on the id's owner, prepare everywhere, log, apply: one mutation.
    fn run(&mut self, cmd: Command, now: u64) -> Response {
        let n = self.stores.len();
        let m = match self.stores[shard_of(cmd.owner_id(), n)].plan(cmd, now) {
            Ok(m) => m,
            Err(answer) => return answer_response(&answer),
        };
        self.txn += 1;
        let txn = self.txn;
        let mut refusal: Option<Refusal> = None;
        for s in self.stores.iter_mut() {
            if let Err(r) = s.prepare(txn, &m) {
                refusal = refusal.filter(|f| f.line() < r.line()).or(Some(r));
            }
        }
        if let Some(r) = refusal {
            self.stores.iter_mut().for_each(|s| s.abort(txn, &m));
            return refusal_response(&r);
        }
        self.lsn += 1;
        let mut payload = Vec::new();
        m.encode(&mut payload);
        self.log.push((self.lsn, now, payload));
        for s in self.stores.iter_mut() {
            s.apply(Some(txn), self.lsn, now, &m);
        }
        Response::Ok(Reply::Committed { lsn: self.lsn })
    }

    /// One step of a client's life: expired holds released first (as the timer does), then `cmd`.
    fn step(&mut self, cmd: Command, now: u64, parts_per_step: usize) -> Response {
        for s in 0..self.stores.len() {
            for id in self.stores[s].expired_holds(now, 100) {
                self.run(Command::Release { id, expired: true }, now);
            }
        }
        let resp = self.run(cmd, now);
        self.snapshot_steps(parts_per_step);
        resp
    }

    fn begin_snapshot(&mut self) {
        if self.writing.is_none() {
            let lsn = self.lsn;
            for s in self.stores.iter_mut() {
                s.set_snapshot_piece_bytes(64); // handed over in many pieces
                s.begin_snapshot(lsn);
            }
            self.writing = Some((lsn, vec![(Vec::new(), false); self.stores.len()]));
        }
    }

    fn snapshot_steps(&mut self, parts: usize) {
        let Some((lsn, done)) = self.writing.as_mut() else { return };
        for (s, out) in self.stores.iter_mut().zip(done.iter_mut()) {
            for _ in 0..parts {
                if let Some(piece) = s.snapshot_step() {
                    assert!(!out.1, "no piece after the last");
                    out.0.extend_from_slice(&piece.bytes);
                    out.1 = piece.last;
                }
            }
        }
        if done.iter().all(|(_, last)| *last) {
            let lsn = *lsn;
            let (_, done) = self.writing.take().expect("present");
            self.snapshot = Some((lsn, done.into_iter().map(|(bytes, _)| bytes).collect()));
        }
    }

    /// What a restart with `shards` rebuilds from the disk: the last
    /// snapshot set and the log after it (a snapshot still being written is lost).
    fn restart(&self, shards: usize, now: u64) -> Cluster {
        let mut rebuild = match &self.snapshot {
            Some((_, parts)) => {
                Rebuild::from_snapshot(self.limits, parts.len(), |i| Ok(parts[i].clone()), 0).unwrap()
            }
            None => Rebuild::new(self.limits, 0),
        };
        let after = self.snapshot.as_ref().map_or(0, |(lsn, _)| *lsn);
        for (lsn, ts, payload) in self.log.iter().filter(|(lsn, _, _)| *lsn > after) {
            rebuild.record(*lsn, *ts, payload).unwrap();
        }
        let (stores, needs_layout) = rebuild.finish(shards, self.lsn);
        let mut c = Cluster {
            stores,
            limits: self.limits,
            log: self.log.clone(),
            lsn: self.lsn,
            txn: 0,
            snapshot: self.snapshot.clone(),
            writing: None,
        };
        if needs_layout {
            c.log_layout(shards, now);
        }
        c
    }

    /// The same shards, never stopped, regrouped in memory into `shards`
    /// (the reference a restart must match).
    fn regrouped(mut self, shards: usize, now: u64) -> Cluster {
        for s in self.stores.iter_mut() {
            s.finish_snapshot();
        }
        self.writing = None;
        let changed = shards != self.stores.len();
        self.stores = Store::regroup(std::mem::take(&mut self.stores), shards, self.limits);
        if changed {
            self.log_layout(shards, now);
        }
        self
    }

    fn remembered(&self) -> Remembered {
        let mut ids: Vec<_> = self.stores.iter().flat_map(|s| s.remembered_ids()).collect();
        let mut receipts: Vec<_> = self.stores.iter().flat_map(|s| s.remembered_receipts()).collect();
        ids.sort_by_key(|(id, _)| *id);
        receipts.sort_by_key(|(id, _)| *id);
        (ids, receipts)
    }

    /// What every possible retry would be answered now.
    fn retry_answers(&self, now: u64) -> Vec<Result<Mutation, Answer>> {
        let line = vec![Line { key: KEYS[0], qty: 1 }];
        let mut out = Vec::new();
        for id in 0..IDS {
            for cmd in [
                Command::Order { id, lines: line.clone().into() },
                Command::Reserve { id, ttl_ms: 50, lines: line.clone().into() },
                Command::Inbound { id, lines: line.clone().into() },
                Command::Cancel { id },
                Command::Confirm { id },
                Command::Release { id, expired: false },
            ] {
                let owner = shard_of(cmd.owner_id(), self.stores.len());
                out.push(self.stores[owner].plan(cmd, now));
            }
        }
        out
    }
}

fn same(a: &Cluster, b: &Cluster, now: u64, when: &str) -> Result<(), TestCaseError> {
    prop_assert_eq!(a.remembered(), b.remembered(), "remembered ids differ {}", when);
    prop_assert_eq!(a.retry_answers(now), b.retry_answers(now), "retry answers differ {}", when);
    prop_assert_eq!(a.lsn, b.lsn);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn a_restart_remembers_exactly_what_a_run_without_restart_remembers(
        before in prop::collection::vec(command(), 1..70),
        after in prop::collection::vec(command(), 0..50),
        layouts in (1usize..5, 1usize..5, 1usize..5),
        max_ids in 1usize..8,
        min_window_ms in 0u64..60,
        window_ms in 40u64..600,
        snapshots in (any::<prop::sample::Index>(), any::<prop::sample::Index>(), 1usize..24),
    ) {
        let limits = IdLimits { window_ms, min_window_ms, max_ids };
        let (first, second, third) = layouts;
        let (snap1, snap2, parts_per_step) = snapshots;
        let time = |step: usize| 1_000 + step as u64 * 10;

        let mut live = Cluster::fresh(first, limits);
        let snap1 = snap1.index(before.len());
        for (step, cmd) in before.iter().enumerate() {
            if step == snap1 {
                live.begin_snapshot();
            }
            live.step(cmd.clone(), time(step), parts_per_step);
        }
        let now = time(before.len());
        let mut restarted = live.restart(second, now);
        let mut reference = live.regrouped(second, now);
        same(&restarted, &reference, now, "after the first restart")?;

        let snap2 = snap2.index(after.len().max(1));
        for (i, cmd) in after.iter().enumerate() {
            let step = before.len() + i;
            if i == snap2 {
                restarted.begin_snapshot();
            }
            let got = restarted.step(cmd.clone(), time(step), parts_per_step);
            let want = reference.step(cmd.clone(), time(step), parts_per_step);
            prop_assert_eq!(got, want, "{:?} at step {}", cmd, step);
            same(&restarted, &reference, time(step), "while serving after the restart")?;
        }
        // A second restart replays across the first one's layout record.
        let now = time(before.len() + after.len());
        let again = restarted.restart(third, now);
        let reference = reference.regrouped(third, now);
        same(&again, &reference, now, "after the second restart")?;
    }
}
