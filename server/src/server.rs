//! Startup (recovery, threads, listeners), snapshots, and shutdown.

use std::collections::HashMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed, Ordering::Release};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use stockd_persistence::retention::Retention;
use stockd_persistence::snapshot::{self, Manifest};
use stockd_persistence::wal::{self, Wal, WalConfig};
use stockd_protocol::{HelloInfo, HASH_FMIX64_MOD, MAX_BATCH_KEYS, MAX_BODY, MAX_LINES};
use stockd_sinks::cassandra::{CassandraConfig, CassandraSink};
use stockd_sinks::kafka::{KafkaConfig, KafkaSink};
use stockd_sinks::redis::RedisSink;
use stockd_sinks::{Level, Levels, RunnerConfig, Runners, Sink};

use crate::conn::ConnCtx;
use crate::event_loop::shard_main;
use crate::listeners::Listeners;
use crate::metrics::{self, Observed};
use crate::recovery::{recover, Recovered};
use crate::replication::envelope::data_messages;
use crate::replication::kafka::{spawn_producer, Outgoing};
use crate::replication::reader::{self, ReaderParts, ReaderThread};
use crate::replication::{sync, Replica, ReplicationConfig};
use crate::shard::commits::{Router, SnapshotPolicy};
use crate::shard::mailbox::WalToken;
use crate::shard::shared::{SnapshotPart, SnapshotQueue};
use crate::shard::{now_ms, Mailbox, ShardStats, Shared, MAX_SHARDS};
use crate::state::{IdLimits, LogRecord, Store};

#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub shards: usize,
    /// First per-shard port; default: the listen port + 1 (or ephemeral ports if that is 0).
    pub shard_port_base: Option<u16>,
    pub auth_token: Option<String>,
    /// Snapshot when this much time has passed and something was logged...
    pub snapshot_interval: Duration,
    /// ...or when this many records were logged since the last snapshot.
    pub snapshot_records: u64,
    pub ids: IdLimits,
    /// Pin shard threads to cores.
    pub pin: bool,
    /// Client connections open at once, over all shards; more are refused.
    pub max_connections: usize,
    /// A connection holding part of a frame this long without sending more is closed.
    pub partial_frame_timeout: Duration,
    /// Serve Prometheus metrics (`GET /metrics`) here.
    pub metrics_listen: Option<SocketAddr>,
    /// Where the log streams to (none by default).
    pub sinks: SinkConfig,
    /// Replication through Kafka, primary and standbys (docs/ha.md); off by default.
    pub replication: Option<ReplicationConfig>,
}

/// The downstream systems the log streams to.
#[derive(Clone, Debug)]
pub struct SinkConfig {
    pub kafka: Option<KafkaConfig>,
    /// `redis://host:port/db` of the Redis read model.
    pub redis_url: Option<String>,
    pub cassandra: Option<CassandraConfig>,
    /// A sink more records behind than this is logged loudly.
    pub lag_limit_records: u64,
}

impl SinkConfig {
    /// Refuses what no downstream system could accept, before anything starts.
    pub fn check(&self) -> Result<(), String> {
        if let Some(url) = &self.redis_url {
            stockd_sinks::redis::check_url(url)?;
        }
        if let Some(c) = &self.cassandra {
            c.check()?;
        }
        Ok(())
    }
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig { kafka: None, redis_url: None, cassandra: None, lag_limit_records: 1_000_000 }
    }
}

/// File descriptors kept for the log, snapshots, listeners and the like.
const RESERVED_FDS: usize = 128;

/// The default connection cap: what the file-descriptor limit leaves after
/// the server's own files (at least 16).
pub fn default_max_connections() -> usize {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct we pass and nothing else.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX)
    } else {
        1024
    };
    soft.saturating_sub(RESERVED_FDS).max(16)
}

impl Config {
    pub fn new(listen: SocketAddr, data_dir: impl Into<PathBuf>, shards: usize) -> Config {
        Config {
            listen,
            data_dir: data_dir.into(),
            shards,
            shard_port_base: None,
            auth_token: None,
            snapshot_interval: Duration::from_secs(60),
            snapshot_records: 1_000_000,
            ids: IdLimits::default(),
            pin: true,
            max_connections: default_max_connections(),
            partial_frame_timeout: Duration::from_secs(10),
            metrics_listen: None,
            sinks: SinkConfig::default(),
            replication: None,
        }
    }
}

/// A running server; [`Running::shutdown`] stops it.
pub struct Running {
    pub addr: SocketAddr,
    pub shard_ports: Vec<u16>,
    /// Where `GET /metrics` is served, with `Config::metrics_listen`.
    pub metrics_addr: Option<SocketAddr>,
    metrics_thread: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
    shard_threads: Vec<JoinHandle<()>>,
    wal_thread: JoinHandle<()>,
    snapshot_thread: JoinHandle<()>,
    sinks: Runners,
    /// A replicating server's reader and producer threads.
    replication: Option<(ReaderThread, JoinHandle<()>)>,
    _lock: File,
    _port_claim: Option<File>,
}

fn server_id(dir: &Path) -> Result<u64, String> {
    let path = dir.join("SERVER_ID");
    if let Ok(s) = std::fs::read_to_string(&path) {
        return s.trim().parse().map_err(|e| format!("{}: {e}", path.display()));
    }
    let seed =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    let id = stockd_protocol::fmix64(seed as u64 ^ (std::process::id() as u64) << 32);
    snapshot::write_durably(dir, "SERVER_ID", id.to_string().as_bytes()).map_err(|e| e.to_string())?;
    Ok(id)
}

/// Recovers the data directory and starts serving.
pub fn start(cfg: Config) -> Result<Running, String> {
    let n = cfg.shards;
    if n == 0 || n > MAX_SHARDS {
        return Err(format!("--shards must be between 1 and {MAX_SHARDS}, not {n}"));
    }
    cfg.sinks.check()?;
    let sinks_configured =
        cfg.sinks.kafka.is_some() || cfg.sinks.redis_url.is_some() || cfg.sinks.cassandra.is_some();
    if cfg.replication.is_some() && sinks_configured {
        return Err("the sinks (Kafka events, Redis, Cassandra) do not run with replication yet: start a replicating server without them (docs/ha.md)".into());
    }
    // Ports first: a server that cannot have its ports leaves no trace.
    let mut listeners = Listeners::bind(cfg.listen, n, cfg.shard_port_base)?;
    let dir = &cfg.data_dir;
    if dir.exists() && !dir.is_dir() {
        return Err(format!("--data-dir {} exists and is not a directory", dir.display()));
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("--data-dir {}: {e}", dir.display()))?;
    let lock = File::create(dir.join("LOCK")).map_err(|e| format!("{}: {e}", dir.display()))?;
    lock.try_lock().map_err(|_| format!("{} is in use by another stockd", dir.display()))?;
    let id = server_id(dir)?;
    // A replicating server first cuts what the topic never confirmed.
    let synced = cfg.replication.as_ref().map(|r| sync::sync(r, dir, id)).transpose()?;
    // The layout record starts a log; a replicated log has the primary's.
    let layout = match (&cfg.replication, &synced) {
        (Some(r), Some((_, history))) if *history || r.standby => LayoutRecord::Primary,
        _ => LayoutRecord::Own,
    };
    let (stores, rec) = recover_and_log_layout(dir, n, cfg.ids, layout)?;
    let (addr, shard_ports) = (listeners.addr, listeners.shard_ports.clone());
    let sinks = make_sinks(&cfg.sinks, id)?;
    // Every row as the log's durable end leaves it: where the sinks' readers start.
    let levels = if sinks.is_empty() {
        Levels::default()
    } else {
        let rows = stores.iter().flat_map(Store::rows).map(|(k, on_hand, held)| (k, Level { on_hand, held }));
        Levels::new(rec.next_lsn - 1, rows)
    };
    let retention = Arc::new(Retention::new(dir, rec.snapshot_lsn));

    let mailboxes: Arc<Vec<Mailbox>> = Arc::new((0..n).map(|_| Mailbox::new()).collect());
    let (snap_tx, snap_rx) = crossbeam::channel::unbounded();
    let observed = Arc::new(Observed::default());
    observed.recovery_ms.store(rec.recovery_ms, Relaxed);
    observed.recovered_records.store(rec.replayed, Relaxed);
    let snapshot_in_flight = Arc::new(AtomicBool::new(false));
    let snapshot_queues: Arc<Vec<SnapshotQueue>> =
        Arc::new((0..n).map(|_| SnapshotQueue::default()).collect());
    let snapshot_thread = {
        let dir = dir.clone();
        let observed_by_snapshots = observed.clone();
        let retention = retention.clone();
        let in_flight = snapshot_in_flight.clone();
        let queues = snapshot_queues.clone();
        std::thread::Builder::new()
            .name("stockd-snapshot".into())
            .spawn(move || {
                snapshot_loop(&dir, n, snap_rx, &queues, &retention, &observed_by_snapshots, &in_flight)
            })
            .map_err(|e| e.to_string())?
    };
    let stats: Arc<Vec<ShardStats>> = Arc::new((0..n).map(|_| ShardStats::default()).collect());
    let (interval, min_records) = (cfg.snapshot_interval, cfg.snapshot_records);
    // Records count from the last snapshot, not from this start: a server
    // restarted again and again (a crash loop) still snapshots once the log
    // tail is long, instead of replaying an ever longer tail.
    let policy =
        SnapshotPolicy::new(interval, min_records, rec.snapshot_lsn, stats.clone(), snapshot_in_flight);
    let mut router = Router { mailboxes: mailboxes.clone(), policy };
    let replica = cfg.replication.as_ref().map(|_| Arc::new(Replica::new(id)));
    let (wal, wal_thread, replication) = match (&cfg.replication, &replica, synced) {
        (Some(r), Some(replica), Some((start, _))) => {
            let producer = spawn_producer(r, replica.clone())?;
            let (commits_tx, commits) = crossbeam::channel::unbounded();
            let (to_topic, on_commit_replica) = (producer.tx.clone(), replica.clone());
            let (wal, wal_thread) =
                Wal::start(log_config(dir, n), rec.next_lsn, rec.last_ts_ms, move |batch, group| {
                    send_own_records(&to_topic, &on_commit_replica, &batch, group);
                    let _ = commits_tx.send(batch);
                })
                .map_err(|e| e.to_string())?;
            let parts = ReaderParts {
                cfg: r.clone(),
                dir: dir.clone(),
                replica: replica.clone(),
                start,
                local_end: rec.next_lsn - 1,
                shards: n,
                wal: wal.clone(),
                commits,
                router,
                producer: producer.tx,
            };
            let reader = reader::spawn(parts)?;
            (wal, wal_thread, Some((reader, producer.thread)))
        }
        _ => {
            let (wal, wal_thread) =
                Wal::start(log_config(dir, n), rec.next_lsn, rec.last_ts_ms, move |batch, _| {
                    router.route(batch)
                })
                .map_err(|e| e.to_string())?;
            (wal, wal_thread, None)
        }
    };
    let mut sink_cfg = RunnerConfig::new(dir);
    sink_cfg.lag_limit_records = cfg.sinks.lag_limit_records;
    let sinks = Runners::start(sink_cfg, sinks, &levels, wal.durable.clone(), &retention)?;
    drop(levels);
    let shared = Arc::new(Shared {
        mailboxes,
        stats,
        sinks: sinks.statuses.clone(),
        wal,
        stop: AtomicBool::new(false),
        snapshots: snap_tx,
        snapshot_queues,
        max_connections: cfg.max_connections,
        replica,
    });
    let hello = HelloInfo {
        server_id: id,
        hash_id: HASH_FMIX64_MOD,
        shard_ports: shard_ports.clone(),
        max_body: MAX_BODY as u32,
        max_batch_keys: MAX_BATCH_KEYS as u16,
        max_lines: MAX_LINES as u16,
    };
    let port_claim = listeners.port_claim.take();
    let shard_threads = spawn_shards(&cfg, &shared, stores, listeners, hello)?;
    let metrics =
        cfg.metrics_listen.map(|a| metrics::serve(a, shared.clone(), observed.clone())).transpose()?;
    let (metrics_addr, metrics_thread) = metrics.map_or((None, None), |(a, t)| (Some(a), Some(t)));
    tracing::info!(%addr, ?shard_ports, shards = n, "stockd serving");
    Ok(Running {
        addr,
        shard_ports,
        metrics_addr,
        metrics_thread,
        shared,
        shard_threads,
        wal_thread,
        snapshot_thread,
        sinks,
        replication,
        _lock: lock,
        _port_claim: port_claim,
    })
}

/// The sinks the configuration asks for.
fn make_sinks(cfg: &SinkConfig, server_id: u64) -> Result<Vec<Box<dyn Sink>>, String> {
    let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
    if let Some(k) = &cfg.kafka {
        sinks.push(Box::new(KafkaSink::new(k.clone())));
    }
    if let Some(url) = &cfg.redis_url {
        sinks.push(Box::new(RedisSink::new(url, server_id)?));
    }
    if let Some(c) = &cfg.cassandra {
        sinks.push(Box::new(CassandraSink::new(c.clone(), server_id)?));
    }
    Ok(sinks)
}

/// A replicating primary sends the mutations it logged to the topic, one
/// message per run of records, in the epoch it leads (a replaced one's are
/// ignored by every reader).
fn send_own_records(
    to_topic: &crossbeam::channel::Sender<Outgoing>,
    replica: &Replica,
    batch: &[wal::Committed<WalToken>],
    group: &[u8],
) {
    let own = batch
        .iter()
        .filter(|c| matches!(c.token, WalToken::Own { .. }))
        .map(|c| (c.lsn, c.ts_ms, c.payload(group)));
    let messages = data_messages(replica.epoch(), replica.node, own);
    if !messages.is_empty() {
        let _ = to_topic.send(Outgoing::Data(messages));
    }
}

/// Who writes the layout record a log needs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum LayoutRecord {
    /// This server, before it serves.
    Own,
    /// A replicated log takes the primary's: a start may not change it.
    Primary,
}

/// Recovers the stores; logs the layout first if this start changes it.
fn recover_and_log_layout(
    dir: &Path,
    n: usize,
    ids: IdLimits,
    layout: LayoutRecord,
) -> Result<(Vec<Store>, Recovered), String> {
    let t = Instant::now();
    let (stores, mut rec) = recover(dir, n, ids)?;
    let empty = rec.next_lsn == 1 && rec.snapshot_lsn == 0;
    if rec.needs_layout_record && layout == LayoutRecord::Primary && !empty {
        return Err(format!(
            "{} holds a replicated log written with another shard count than --shards {n}: start this node with the primary's shard count",
            dir.display()
        ));
    }
    if rec.needs_layout_record && layout == LayoutRecord::Own {
        // Before any record of this process: replay must know which shard
        // owned each id when it decided what to forget.
        let ts_ms = now_ms().max(rec.last_ts_ms);
        let layout = LogRecord::layout(n as u16);
        rec.next_lsn = wal::write_one(dir, rec.next_lsn, ts_ms, &layout).map_err(|e| e.to_string())?;
        rec.last_ts_ms = ts_ms;
        tracing::info!(shards = n, lsn = rec.next_lsn - 1, "logged the shard layout");
    }
    let rows: usize = stores.iter().map(Store::row_count).sum();
    let ids: usize = stores.iter().map(Store::id_count).sum();
    tracing::info!(
        snapshot_lsn = rec.snapshot_lsn,
        replayed = rec.replayed,
        replay_ms = rec.replay_ms,
        next_lsn = rec.next_lsn,
        torn_bytes = rec.torn_bytes,
        rows,
        ids,
        ms = t.elapsed().as_millis() as u64,
        "recovered {}",
        dir.display()
    );
    Ok((stores, rec))
}

/// The log's nice value when the shards take every CPU the process may run
/// on: when an fdatasync ends, each core may then be running a busy shard,
/// and a writer at the shards' priority waits for one before it hands the
/// group commit on and starts the next. On 16 cores with 8 shards on 8
/// CPUs that doubled the write + fdatasync (186 us against 80 us with a
/// core to spare), and nice -10 gave 1.14x the 1-line orders at 0.97x the
/// CPU per order; where a core is spare it gained nothing (4 shards on 8
/// CPUs 0.98x, 1 shard on 2 cores 0.95x and 0.97x), the log's wake-ups
/// only preempting shards more often (docs/benchmarks.md, *Sixteen cores,
/// twentieth session*). The log's work is short (~0.2 us a record on each
/// of its two threads), so it cannot starve a shard.
const LOG_NICE_WITHOUT_A_SPARE_CORE: i32 = -10;

fn log_nice(shards: usize, cpus: usize) -> i32 {
    if shards >= cpus {
        LOG_NICE_WITHOUT_A_SPARE_CORE
    } else {
        0
    }
}

fn log_config(dir: &Path, shards: usize) -> WalConfig {
    // The CPUs this process may run on (its affinity mask), as for the default shard count.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    WalConfig { nice: log_nice(shards, cpus), ..WalConfig::new(dir) }
}

/// One thread per shard, pinned to a core unless `cfg.pin` is off.
fn spawn_shards(
    cfg: &Config,
    shared: &Arc<Shared>,
    stores: Vec<Store>,
    listeners: Listeners,
    hello: HelloInfo,
) -> Result<Vec<JoinHandle<()>>, String> {
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let mut threads = Vec::new();
    let sockets = listeners.shared_port.into_iter().zip(listeners.own_port);
    for (i, (store, (on_shared, on_own))) in stores.into_iter().zip(sockets).enumerate() {
        let shared = shared.clone();
        let ctx = ConnCtx {
            hello: hello.clone(),
            auth_token: cfg.auth_token.clone().map(String::into_bytes),
            partial_frame_timeout: cfg.partial_frame_timeout,
        };
        let core = if cfg.pin && !cores.is_empty() { Some(cores[i % cores.len()]) } else { None };
        let h = std::thread::Builder::new()
            .name(format!("stockd-shard-{i}"))
            .spawn(move || {
                if let Some(c) = core {
                    core_affinity::set_for_current(c);
                }
                shard_main(i, shared, store, vec![on_shared, on_own], ctx)
            })
            .map_err(|e| e.to_string())?;
        threads.push(h);
    }
    Ok(threads)
}

/// Writes each shard's part of a snapshot set as its pieces come; when all
/// parts of one LSN are in, makes the set current and deletes the log
/// segments it covers that no sink still needs. Clears `in_flight` when a
/// set is done or failed, so the policy may mark the next.
fn snapshot_loop(
    dir: &Path,
    shards: usize,
    rx: crossbeam::channel::Receiver<SnapshotPart>,
    queues: &[SnapshotQueue],
    retention: &Retention,
    observed: &Observed,
    in_flight: &AtomicBool,
) {
    // Per LSN: parts written, and when the first shard began its part.
    let mut done: std::collections::BTreeMap<u64, (usize, Instant)> = Default::default();
    // Per (LSN, shard): the part's file being written.
    let mut open: HashMap<(u64, usize), snapshot::SnapshotWriter> = HashMap::new();
    // Sets with a part that failed: no manifest will name them, so the rest
    // of their pieces are dropped and what was written of them is removed
    // (a full disk, the usual cause, wants that room back).
    let mut failed: std::collections::BTreeSet<u64> = Default::default();
    for SnapshotPart { lsn, shard, bytes, last, began } in rx {
        let key = (lsn, shard);
        let mut error = None;
        if !failed.contains(&lsn) {
            let writer = match open.entry(key) {
                std::collections::hash_map::Entry::Occupied(o) => Some(o.into_mut()),
                std::collections::hash_map::Entry::Vacant(v) => {
                    match snapshot::SnapshotWriter::create(dir, lsn, shard as u32, shards as u32) {
                        Ok(w) => Some(v.insert(w)),
                        Err(e) => {
                            error = Some(e);
                            None
                        }
                    }
                }
            };
            if let Some(Err(e)) = writer.map(|w| w.append(&bytes)) {
                error = Some(e);
            }
        }
        let queue = &queues[shard];
        queue.queued.fetch_sub(bytes.len(), Release);
        if last {
            // The shard's part is complete: the buffers it would fill again are freed.
            while queue.spares.pop().is_some() {}
            if let (None, Some(w)) = (&error, open.remove(&key)) {
                error = w.finish().err();
            }
        } else {
            let mut spare = bytes;
            spare.clear();
            let _ = queue.spares.push(spare); // beyond a few, dropped
        }
        if let Some(e) = error {
            snapshot_failed(&e, lsn, shard, in_flight);
            failed.insert(lsn);
            open.retain(|(l, _), _| *l != lsn); // their unfinished files go with them
            done.remove(&lsn);
            snapshot::remove_set(dir, lsn, shards as u32);
            continue;
        }
        if !last || failed.contains(&lsn) {
            continue;
        }
        tracing::debug!(lsn, shard, "snapshot part written");
        let (count, first_began) = done.entry(lsn).or_insert((0, began));
        *count += 1;
        *first_began = (*first_began).min(began);
        if *count < shards {
            continue;
        }
        let began = *first_began;
        done.retain(|l, _| *l > lsn);
        failed.retain(|l| *l > lsn);
        let t = Instant::now();
        let res =
            snapshot::commit_manifest(dir, Manifest { lsn, shard_count: shards as u32 }).and_then(|_| {
                retention.snapshot_taken(lsn);
                retention.collect()
            });
        match res {
            Ok(deleted) => {
                let took_ms = began.elapsed().as_millis() as u64;
                observed.snapshot_ms.observe(took_ms);
                tracing::info!(
                    lsn,
                    deleted_segments = deleted,
                    took_ms,
                    manifest_and_deletes_ms = t.elapsed().as_millis() as u64,
                    "snapshot"
                )
            }
            Err(e) => tracing::error!(error = %e, lsn, "snapshot manifest failed"),
        }
        in_flight.store(false, Release);
    }
}

/// A part of a snapshot set could not be written: the set will not be
/// made current, and the policy may mark the next one.
fn snapshot_failed(e: &stockd_persistence::Error, lsn: u64, shard: usize, in_flight: &AtomicBool) {
    tracing::error!(error = %e, lsn, shard, "snapshot write failed; the log keeps everything meanwhile");
    in_flight.store(false, Release);
}

impl Running {
    /// Stops accepting, drops connections, lets the log writer finish what
    /// it was given, and waits for every thread.
    pub fn shutdown(self) {
        let Running {
            shared,
            shard_threads,
            wal_thread,
            snapshot_thread,
            metrics_thread,
            sinks,
            replication,
            ..
        } = self;
        shared.stop.store(true, Relaxed);
        for mb in shared.mailboxes.iter() {
            mb.notify.notify_one();
        }
        for h in shard_threads {
            let _ = h.join();
        }
        // The reader holds a log handle and the producer's queue.
        let producer = replication.map(|(reader, producer)| {
            reader.stop();
            producer
        });
        // The shard threads are gone; with the last Shared goes the last Wal
        // handle, so the writer drains its queue and exits.
        drop(shared);
        for h in [wal_thread, snapshot_thread].into_iter().chain(metrics_thread).chain(producer) {
            let _ = h.join();
        }
        // Last: the sinks get what the writer made durable before it stopped.
        sinks.stop();
        tracing::info!("stockd stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_runs_ahead_of_the_shards_only_where_they_take_every_cpu() {
        assert_eq!(log_nice(8, 8), LOG_NICE_WITHOUT_A_SPARE_CORE);
        assert_eq!(log_nice(1, 1), LOG_NICE_WITHOUT_A_SPARE_CORE);
        assert_eq!(log_nice(16, 8), LOG_NICE_WITHOUT_A_SPARE_CORE);
        assert_eq!(log_nice(4, 8), 0, "the default count on 8 CPUs leaves cores to spare");
        assert_eq!(log_nice(7, 8), 0);
        assert_eq!(log_nice(1, 2), 0, "the default on 2 cores");
    }

    /// A snapshot set one of whose parts cannot be written leaves nothing
    /// behind: the part already written is removed, the later parts are not
    /// written, and no manifest names the set; a later set is written whole.
    #[test]
    fn a_snapshot_set_with_a_failed_part_is_removed_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (shards, lsn) = (3, 7);
        // Shard 1's part cannot be created: its temporary name is a directory.
        let blocker = dir.path().join(format!("{}.tmp", snapshot::snapshot_name(lsn, 1)));
        std::fs::create_dir(&blocker).unwrap();
        let part = |lsn, shard, last| SnapshotPart {
            lsn,
            shard,
            bytes: vec![shard as u8; 1000],
            last,
            began: Instant::now(),
        };
        let queues: Vec<SnapshotQueue> = (0..shards).map(|_| SnapshotQueue::default()).collect();
        let (retention, observed) = (Retention::new(dir.path(), 0), Observed::default());
        let in_flight = AtomicBool::new(true);
        let run = |parts: Vec<SnapshotPart>| {
            let (tx, rx) = crossbeam::channel::unbounded();
            for p in parts {
                queues[p.shard].queued.fetch_add(p.bytes.len(), Relaxed);
                tx.send(p).unwrap();
            }
            drop(tx);
            snapshot_loop(dir.path(), shards, rx, &queues, &retention, &observed, &in_flight);
            assert!(queues.iter().all(|q| q.queued.load(Relaxed) == 0), "every piece accounted for");
            // (The blocking directory is the test's, whatever a cleanup made of its name.)
            let blocker_name = blocker.file_name().unwrap().to_str().unwrap().to_string();
            let mut left: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|n| !n.starts_with(&blocker_name))
                .collect();
            left.sort();
            left
        };
        let left = run(vec![part(lsn, 0, true), part(lsn, 2, false), part(lsn, 1, true), part(lsn, 2, true)]);
        assert!(left.is_empty(), "nothing of set {lsn} is left: {left:?}");
        assert!(!in_flight.load(Relaxed), "the policy may mark the next set");
        assert_eq!(snapshot::read_manifest(dir.path()).unwrap(), None);

        let left = run((0..shards).map(|s| part(9, s, true)).collect());
        let mut want: Vec<String> = (0..shards as u32).map(|s| snapshot::snapshot_name(9, s)).collect();
        want.push(snapshot::MANIFEST.to_string());
        want.sort();
        assert_eq!(left, want, "a later set is written whole");
        assert_eq!(snapshot::read_manifest(dir.path()).unwrap().map(|m| m.lsn), Some(9));
    }
}
