//! Recovery: the shard stores rebuilt from the snapshot set and the log tail.
//!
//! Replay applies every record to the stores of the layout it was written
//! under, the way the live shards did: rows on the shards that own them, an
//! id (and the forgetting of old ids that its arrival may cause) on the shard
//! that owns the id. The snapshot set's shard count is the layout at its
//! LSN; a `Layout` record in the log marks a restart with another count, and
//! replay regroups the stores there. So after any restart, with any shard
//! count before and after, the shards remember exactly the ids they did
//! before it, and they forget the same ones afterwards.
//!
//! [`Rebuild`] is the pure part (bytes in, stores out), shared with the
//! property tests; [`recover`] feeds it from the data directory.

use std::path::Path;
use std::time::{Duration, Instant};

use stockd_persistence::snapshot::{self, Manifest};
use stockd_persistence::wal;
use stockd_protocol::shard_of;

use appliers::Appliers;

use crate::shard::MAX_SHARDS;
use crate::state::{IdLimits, LogRecord, Op, Store};

/// A long replay reports its progress this often...
const PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// ...looking at the clock once per this many records.
const PROGRESS_CHECK_RECORDS: u64 = 65_536;

/// Bytes of log a record that creates an id takes at least (a 1-line order).
const SMALLEST_ID_RECORD: u64 = 52;

/// Stores being rebuilt, in the layout of the records being replayed, each
/// applying its records on threads of its own (see [`appliers`]).
pub struct Rebuild {
    limits: IdLimits,
    appliers: Appliers,
    /// The layout the log says the stores are in; None before the first
    /// snapshot or `Layout` record (an empty data directory).
    layout: Option<usize>,
    /// About how many ids the log to replay may create: each store gets room
    /// for its share at once instead of re-hashing as they come.
    expected_ids: usize,
}

impl Rebuild {
    pub fn new(limits: IdLimits, expected_ids: usize) -> Rebuild {
        Rebuild { limits, appliers: Appliers::start(Vec::new()), layout: None, expected_ids }
    }

    /// Starts from a snapshot set: part `i` of `shard_count`, as `load(i)`
    /// reads and checks it, into store `i`. Each part is read and loaded
    /// on a thread of its own: the parts share nothing, and loading one is
    /// mostly inserts into its id tables, a cache miss each, so the set
    /// loads in about the time of its largest part, not the sum of them
    /// (one part after another on one thread until the twenty-first
    /// session), and holds one part's bytes per thread only while it loads.
    pub fn from_snapshot(
        limits: IdLimits,
        shard_count: usize,
        load: impl Fn(usize) -> Result<Vec<u8>, String> + Sync,
        expected_ids: usize,
    ) -> Result<Rebuild, String> {
        check_layout(shard_count)?;
        let mut stores: Vec<Store> = (0..shard_count).map(|i| Store::new(i, shard_count, limits)).collect();
        let load = &load;
        std::thread::scope(|scope| {
            let loaders: Vec<_> = stores
                .iter_mut()
                .map(|store| {
                    std::thread::Builder::new()
                        .name(format!("stockd-load-{}", store.shard))
                        .spawn_scoped(scope, move || {
                            let payload = load(store.shard)?;
                            store.absorb(&payload).map_err(|e| format!("snapshot part {}: {e}", store.shard))
                        })
                        .map_err(|e| format!("cannot start a thread to load a snapshot part: {e}"))
                })
                .collect();
            // Every started loader is joined (the scope would anyway) before the first error is returned.
            let results: Vec<Result<(), String>> = loaders
                .into_iter()
                .map(|l| l?.join().unwrap_or_else(|_| Err("a snapshot loader thread panicked".into())))
                .collect();
            results.into_iter().collect::<Result<(), String>>()
        })?;
        let appliers = start_with_room(stores, expected_ids);
        Ok(Rebuild { limits, appliers, layout: Some(shard_count), expected_ids })
    }

    /// Replays one log record.
    pub fn record(&mut self, lsn: u64, ts_ms: u64, payload: &[u8]) -> Result<(), String> {
        match LogRecord::decode(payload).map_err(|e| format!("log record {lsn}: {e}"))? {
            LogRecord::Layout { shards } => {
                let shards = shards as usize;
                check_layout(shards).map_err(|e| format!("log record {lsn}: {e}"))?;
                tracing::debug!(
                    lsn,
                    from = self.appliers.len(),
                    to = shards,
                    "replay: the layout changes here"
                );
                self.regroup(shards);
                self.layout = Some(shards);
            }
            LogRecord::Mutation(m) => {
                if self.appliers.is_empty() {
                    // Records before any layout: a log from before layouts were
                    // logged. One store replays them; the server's count is used after.
                    self.regroup(1);
                }
                let n = self.appliers.len();
                let mut participants = m.lines.iter().fold(0u64, |acc, l| acc | 1 << shard_of(l.key.item, n));
                if !matches!(m.op, Op::Adjust { .. }) {
                    participants |= 1 << shard_of(m.owner_id(), n);
                }
                self.appliers.push(participants, lsn, ts_ms, payload);
            }
        }
        Ok(())
    }

    /// Waits for the stores, moves their state into `shards` new ones, and
    /// starts those.
    fn regroup(&mut self, shards: usize) {
        let stores = std::mem::replace(&mut self.appliers, Appliers::start(Vec::new())).finish();
        self.appliers = start_with_room(Store::regroup(stores, shards, self.limits), self.expected_ids);
    }

    /// The stores of `shards` shards, and whether the server must log a
    /// `Layout` record before it serves (the log's layout is another, or unknown).
    pub fn finish(self, shards: usize, last_lsn: u64) -> (Vec<Store>, bool) {
        let needs_layout_record = self.layout != Some(shards);
        let stores = self.appliers.finish();
        let mut stores =
            if needs_layout_record { Store::regroup(stores, shards, self.limits) } else { stores };
        for s in stores.iter_mut() {
            s.applied_lsn = s.applied_lsn.max(last_lsn);
        }
        (stores, needs_layout_record)
    }
}

/// Gives each store room for its share of the ids the log may create, then
/// starts its replay threads.
fn start_with_room(mut stores: Vec<Store>, expected_ids: usize) -> Appliers {
    let n = stores.len().max(1);
    for s in stores.iter_mut() {
        s.reserve_ids(expected_ids / n);
    }
    Appliers::start(stores)
}

fn check_layout(shards: usize) -> Result<(), String> {
    if shards == 0 || shards > MAX_SHARDS {
        return Err(format!("a layout of {shards} shards (1 to {MAX_SHARDS} are possible)"));
    }
    Ok(())
}

/// What recovery found, for the startup log line and for tests.
#[derive(Debug, Default)]
pub struct Recovered {
    pub snapshot_lsn: u64,
    pub replayed: u64,
    /// Time spent reading and applying the log after the snapshot.
    pub replay_ms: u64,
    pub next_lsn: u64,
    pub last_ts_ms: u64,
    pub torn_bytes: u64,
    /// The server must log a `Layout` record before serving.
    pub needs_layout_record: bool,
    /// Time spent reading the snapshot and replaying the log.
    pub recovery_ms: u64,
}

/// At most about how many ids the records after `after_lsn` create: a
/// 1-line order, the smallest record that makes one, takes 52 bytes of log.
/// Of a segment that starts at or below `after_lsn`, only the share of its
/// records after it counts (none, for one a sink still keeps).
fn ids_the_log_may_create(dir: &Path, after_lsn: u64) -> Result<usize, String> {
    let segs = wal::list_segments(dir).map_err(|e| e.to_string())?;
    let mut bytes = 0u64;
    for (i, (first, path)) in segs.iter().enumerate() {
        let size = wal::records_len(path).unwrap_or(0);
        bytes += match segs.get(i + 1) {
            // The segment the snapshot cuts: the share of its records after it.
            Some((next, _)) if *first <= after_lsn => {
                let (all, after) = (next - first, next.saturating_sub(after_lsn + 1));
                size * after / all.max(1)
            }
            _ => size,
        };
    }
    Ok((bytes / SMALLEST_ID_RECORD) as usize)
}

/// Rebuilds the stores of `shards` shards from the snapshot set and the log tail.
pub fn recover(dir: &Path, shards: usize, limits: IdLimits) -> Result<(Vec<Store>, Recovered), String> {
    let started = Instant::now();
    let manifest = snapshot::read_manifest(dir).map_err(|e| e.to_string())?;
    let expected_ids = ids_the_log_may_create(dir, manifest.map_or(0, |m| m.lsn))?;
    let mut rec = Recovered::default();
    let mut rebuild = match manifest {
        Some(Manifest { lsn, shard_count }) => {
            rec.snapshot_lsn = lsn;
            tracing::debug!(lsn, shard_count, "recovery: loading the snapshot set");
            let load = |i: usize| {
                snapshot::read_snapshot(dir, lsn, i as u32, shard_count).map_err(|e| e.to_string())
            };
            let rebuild = Rebuild::from_snapshot(limits, shard_count as usize, load, expected_ids)
                .map_err(|e| format!("snapshot {lsn}: {e}"))?;
            tracing::info!(
                lsn,
                ms = started.elapsed().as_millis() as u64,
                "recovery: snapshot set loaded; replaying the log after it"
            );
            rebuild
        }
        None => Rebuild::new(limits, expected_ids),
    };
    let mut bad: Option<String> = None;
    let replay_started = Instant::now();
    let (mut reported, mut replayed) = (Instant::now(), 0u64);
    let end = wal::replay(dir, rec.snapshot_lsn, |r| {
        if bad.is_none() {
            bad = rebuild.record(r.lsn, r.ts_ms, r.payload).err();
        }
        replayed += 1;
        if replayed % PROGRESS_CHECK_RECORDS == 0 && reported.elapsed() >= PROGRESS_EVERY {
            reported = Instant::now();
            let per_s = replayed as f64 / replay_started.elapsed().as_secs_f64();
            tracing::info!(replayed, lsn = r.lsn, records_per_s = per_s as u64, "replaying the log");
        }
    })
    .map_err(|e| e.to_string())?;
    if let Some(e) = bad {
        return Err(e);
    }
    rec.replayed = end.replayed;
    rec.next_lsn = end.next_lsn;
    rec.last_ts_ms = end.last_ts_ms;
    rec.torn_bytes = end.torn_bytes;
    let (stores, needs_layout_record) = rebuild.finish(shards, end.next_lsn - 1);
    rec.replay_ms = replay_started.elapsed().as_millis() as u64;
    rec.needs_layout_record = needs_layout_record;
    rec.recovery_ms = started.elapsed().as_millis() as u64;
    Ok((stores, rec))
}

mod appliers;

#[cfg(test)]
mod tests;
