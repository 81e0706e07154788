//! Startup (recovery, threads, listeners), snapshots, and shutdown.

use std::cell::RefCell;
use std::fs::File;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use stockd_persistence::snapshot::{self, Manifest};
use stockd_persistence::wal::{self, Wal, WalConfig};
use stockd_protocol::{HelloInfo, HASH_FMIX64_MOD, MAX_BATCH_KEYS, MAX_BODY, MAX_LINES};

use crate::conn::{serve, ConnCtx};
use crate::recovery::recover;
use crate::shard::{now_ms, route_commits, Mailbox, Node, Shard, ShardStats, MAX_SHARDS};
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
        }
    }
}

/// A running server; [`Running::shutdown`] stops it.
pub struct Running {
    pub addr: SocketAddr,
    pub shard_ports: Vec<u16>,
    node: Arc<Node>,
    shard_threads: Vec<JoinHandle<()>>,
    wal_thread: JoinHandle<()>,
    snapshot_thread: JoinHandle<()>,
    _lock: File,
}

fn listener(addr: SocketAddr, reuse_port: bool) -> Result<StdListener, String> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| format!("socket: {e}"))?;
    sock.set_reuse_address(true).map_err(|e| e.to_string())?;
    if reuse_port {
        sock.set_reuse_port(true).map_err(|e| e.to_string())?;
    }
    sock.set_nonblocking(true).map_err(|e| e.to_string())?;
    sock.bind(&addr.into()).map_err(|e| format!("bind {addr}: {e}"))?;
    sock.listen(1024).map_err(|e| format!("listen {addr}: {e}"))?;
    Ok(sock.into())
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
    let dir = &cfg.data_dir;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let lock = File::create(dir.join("LOCK")).map_err(|e| format!("{}: {e}", dir.display()))?;
    lock.try_lock().map_err(|_| format!("{} is in use by another stockd", dir.display()))?;
    let id = server_id(dir)?;

    let t = Instant::now();
    let (stores, mut rec) = recover(dir, n, cfg.ids)?;
    if rec.needs_layout_record {
        // Before any record of this process: replay must know which shard
        // owned each id when it decided what to forget.
        let ts_ms = now_ms().max(rec.last_ts_ms);
        rec.next_lsn =
            wal::write_one(dir, rec.next_lsn, ts_ms, &LogRecord::layout(n)).map_err(|e| e.to_string())?;
        rec.last_ts_ms = ts_ms;
        tracing::info!(shards = n, lsn = rec.next_lsn - 1, "logged the shard layout");
    }
    let rows: usize = stores.iter().map(Store::row_count).sum();
    let ids: usize = stores.iter().map(Store::id_count).sum();
    tracing::info!(
        snapshot_lsn = rec.snapshot_lsn,
        replayed = rec.replayed,
        next_lsn = rec.next_lsn,
        torn_bytes = rec.torn_bytes,
        rows,
        ids,
        ms = t.elapsed().as_millis() as u64,
        "recovered {}",
        dir.display()
    );

    // Listeners first, so that the ports are known for HELLO.
    let shared0 = listener(cfg.listen, true)?;
    let addr = shared0.local_addr().map_err(|e| e.to_string())?;
    let mut shared = vec![shared0];
    for _ in 1..n {
        shared.push(listener(addr, true)?);
    }
    let base = cfg.shard_port_base.unwrap_or(if cfg.listen.port() == 0 { 0 } else { cfg.listen.port() + 1 });
    let mut own = Vec::new();
    for i in 0..n {
        let port = if base == 0 { 0 } else { base.checked_add(i as u16).ok_or("shard port out of range")? };
        own.push(listener(SocketAddr::new(addr.ip(), port), false)?);
    }
    let shard_ports: Vec<u16> = own.iter().map(|l| l.local_addr().map(|a| a.port()).unwrap_or(0)).collect();

    let mailboxes: Arc<Vec<Mailbox>> = Arc::new((0..n).map(|_| Mailbox::new()).collect());
    let (snap_tx, snap_rx) = crossbeam::channel::unbounded();
    let snapshot_thread = {
        let dir = dir.clone();
        std::thread::Builder::new()
            .name("stockd-snapshot".into())
            .spawn(move || snapshot_loop(&dir, n, snap_rx))
            .map_err(|e| e.to_string())?
    };
    let mb = mailboxes.clone();
    let stats: Arc<Vec<ShardStats>> = Arc::new((0..n).map(|_| ShardStats::default()).collect());
    let st = stats.clone();
    let (interval, every) = (cfg.snapshot_interval, cfg.snapshot_records);
    let (mut last_at, mut last_lsn) = (Instant::now(), rec.next_lsn - 1);
    let (wal, wal_thread) = Wal::start(WalConfig::new(dir), rec.next_lsn, rec.last_ts_ms, move |batch| {
        route_commits(&mb, batch, |lsn| {
            // A snapshot costs about the size of the state, so take one only
            // once the log has grown by half of that (and by at least `every`
            // records; or after `interval`, by an eighth): snapshot work stays
            // proportional to the records written, and replay after a crash
            // stays shorter than about one snapshot's worth.
            let state: u64 = st.iter().map(|s| s.rows.load(Relaxed) + s.ids.load(Relaxed)).sum();
            let grown = lsn.saturating_sub(last_lsn);
            let due = grown >= every.max(state / 2)
                || (grown > 0 && last_at.elapsed() >= interval && grown >= state / 8);
            if due {
                (last_at, last_lsn) = (Instant::now(), lsn);
            }
            due
        })
    })
    .map_err(|e| e.to_string())?;
    let node = Arc::new(Node { mailboxes, stats, wal, stop: AtomicBool::new(false), snapshots: snap_tx });
    let hello = HelloInfo {
        server_id: id,
        hash_id: HASH_FMIX64_MOD,
        shard_ports: shard_ports.clone(),
        max_body: MAX_BODY as u32,
        max_batch_keys: MAX_BATCH_KEYS as u16,
        max_lines: MAX_LINES as u16,
    };
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let mut shard_threads = Vec::new();
    for (i, (store, (sl, ol))) in stores.into_iter().zip(shared.into_iter().zip(own)).enumerate() {
        let node = node.clone();
        let ctx =
            ConnCtx { hello: hello.clone(), auth_token: cfg.auth_token.clone().map(String::into_bytes) };
        let core = if cfg.pin && !cores.is_empty() { Some(cores[i % cores.len()]) } else { None };
        let h = std::thread::Builder::new()
            .name(format!("stockd-shard-{i}"))
            .spawn(move || {
                if let Some(c) = core {
                    core_affinity::set_for_current(c);
                }
                shard_main(i, node, store, vec![sl, ol], ctx)
            })
            .map_err(|e| e.to_string())?;
        shard_threads.push(h);
    }
    tracing::info!(%addr, ?shard_ports, shards = n, "stockd serving");
    Ok(Running { addr, shard_ports, node, shard_threads, wal_thread, snapshot_thread, _lock: lock })
}

fn shard_main(index: usize, node: Arc<Node>, store: Store, listeners: Vec<StdListener>, ctx: ConnCtx) {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, shard = index, "cannot build the shard runtime");
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let shard = Rc::new(RefCell::new(Shard::new(index, node.clone(), store)));
        let ctx = Rc::new(ctx);
        for l in listeners {
            let l = match tokio::net::TcpListener::from_std(l) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "listener");
                    continue;
                }
            };
            let (shard, ctx, node) = (shard.clone(), ctx.clone(), node.clone());
            tokio::task::spawn_local(async move {
                loop {
                    match l.accept().await {
                        Ok((stream, _)) => {
                            let _ = stream.set_nodelay(true);
                            let (shard, ctx, node) = (shard.clone(), ctx.clone(), node.clone());
                            tokio::task::spawn_local(async move {
                                node.stats[index].connections.fetch_add(1, Relaxed);
                                serve(stream, shard, ctx).await;
                                node.stats[index].connections.fetch_sub(1, Relaxed);
                            });
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            });
        }
        let retry_shard = shard.clone();
        let wake = shard.borrow().retry_wake.clone();
        tokio::task::spawn_local(async move {
            loop {
                wake.notified().await;
                tokio::time::sleep(Duration::from_micros(500)).await;
                retry_shard.borrow_mut().retry_contended();
            }
        });
        let timer_shard = shard.clone();
        tokio::task::spawn_local(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                timer_shard.borrow_mut().expire_holds();
            }
        });
        let mailbox = &node.mailboxes[index];
        loop {
            mailbox.notify.notified().await;
            if node.stop.load(Relaxed) {
                break;
            }
            shard.borrow_mut().drain();
        }
    });
}

/// Writes each shard's part of a snapshot set; when all parts of one LSN are
/// in, makes the set current and deletes the log segments it covers.
fn snapshot_loop(dir: &Path, shards: usize, rx: crossbeam::channel::Receiver<(u64, usize, Vec<u8>)>) {
    let mut done: std::collections::BTreeMap<u64, usize> = Default::default();
    for (lsn, shard, payload) in rx {
        let bytes = snapshot::encode_snapshot(lsn, shard as u32, shards as u32, &payload);
        if let Err(e) = snapshot::write_durably(dir, &snapshot::snapshot_name(lsn, shard as u32), &bytes) {
            tracing::error!(error = %e, lsn, shard, "snapshot write failed; the log keeps everything meanwhile");
            continue;
        }
        let count = done.entry(lsn).or_default();
        *count += 1;
        if *count < shards {
            continue;
        }
        done.retain(|l, _| *l > lsn);
        let t = Instant::now();
        let res = snapshot::commit_manifest(dir, Manifest { lsn, shard_count: shards as u32 })
            .and_then(|_| wal::delete_segments_through(dir, lsn));
        match res {
            Ok(deleted) => tracing::info!(
                lsn,
                deleted_segments = deleted,
                ms = t.elapsed().as_millis() as u64,
                "snapshot"
            ),
            Err(e) => tracing::error!(error = %e, lsn, "snapshot manifest failed"),
        }
    }
}

/// Counters summed over shards, plus the log writer's.
pub fn collect_stats(node: &Node) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = Vec::new();
    let sum = |f: fn(&ShardStats) -> &std::sync::atomic::AtomicU64| {
        node.stats.iter().map(|s| f(s).load(Relaxed)).sum::<u64>()
    };
    out.push(("shards".into(), node.shards() as u64));
    out.push(("connections".into(), sum(|s| &s.connections)));
    out.push(("queries".into(), sum(|s| &s.queries)));
    out.push(("keys_read".into(), sum(|s| &s.keys_read)));
    out.push(("forwarded".into(), sum(|s| &s.forwarded)));
    out.push(("mutations_ok".into(), sum(|s| &s.mutations_ok)));
    out.push(("refused_insufficient".into(), sum(|s| &s.refused_insufficient)));
    out.push(("duplicates".into(), sum(|s| &s.duplicates)));
    out.push(("errors".into(), sum(|s| &s.errors)));
    out.push(("overloaded".into(), sum(|s| &s.overloaded)));
    out.push(("holds_expired".into(), sum(|s| &s.holds_expired)));
    out.push(("rows".into(), sum(|s| &s.rows)));
    out.push(("ids".into(), sum(|s| &s.ids)));
    out.push(("mutations_in_flight".into(), sum(|s| &s.txns_open)));
    let w = &node.wal.stats;
    out.push(("wal_records".into(), w.records.load(Relaxed)));
    out.push(("wal_fsyncs".into(), w.fsyncs.load(Relaxed)));
    out.push(("wal_bytes".into(), w.bytes.load(Relaxed)));
    out.push(("wal_sync_micros".into(), w.sync_micros.load(Relaxed)));
    out
}

impl Running {
    /// Stops accepting, drops connections, lets the log writer finish what
    /// it was given, and waits for every thread.
    pub fn shutdown(self) {
        let Running { node, shard_threads, wal_thread, snapshot_thread, _lock, .. } = self;
        node.stop.store(true, Relaxed);
        for mb in node.mailboxes.iter() {
            mb.notify.notify_one();
        }
        for h in shard_threads {
            let _ = h.join();
        }
        // The shard threads are gone; with the last Node goes the last Wal
        // handle, so the writer drains its queue and exits.
        drop(node);
        for h in [wal_thread, snapshot_thread] {
            let _ = h.join();
        }
        tracing::info!("stockd stopped");
    }
}
