//! stock-torture: kill -9 a real stockd under load, again and again, and
//! account for every unit and every acknowledgement.
//!
//! Each cycle starts the server (a shard count drawn from `--shards`),
//! runs concurrent clients with random multi-line orders, cancels, inbounds
//! and reservations (confirmed or released) under known ids, keeping a
//! client-side record of every answer, and kills the server with SIGKILL
//! at a random moment (snapshots are frequent, so some kills land in one).
//! After the restart it re-sends every mutation of the cycle: each
//! acknowledged one must answer DUPLICATE with the LSN it was acknowledged
//! with; each unanswered one is settled by its retry (applied before,
//! applied now, or refused). Then every row must equal the initial stock
//! plus the effect of every applied mutation, exactly.
//!
//! With `--kafka-brokers`, the same against a replicated pair (docs/ha.md):
//! a `--replicate` primary and a `--standby`; each cycle kills the primary,
//! the standby takes over, every mutation of the cycle is settled on it (an
//! acknowledged one must answer DUPLICATE with the same LSN: the two logs
//! are one history), and the killed node restarts and rejoins as the
//! standby for the next cycle. The recovery time is then the failover time.
//!
//! Exit code 0 when nothing was violated, 1 otherwise.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use stockd_client::{Applied, Client, Error, Key, Line};

/// Kill -9 stockd under load and check every acknowledged mutation.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The stockd binary to torture.
    #[arg(long, default_value = "target/release/stockd")]
    stockd: PathBuf,
    /// Kill-and-restart cycles.
    #[arg(long, default_value_t = 10)]
    cycles: u32,
    /// Shard counts to draw from at each start, e.g. 1,2,3.
    #[arg(long, default_value = "1,2,3", value_delimiter = ',')]
    shards: Vec<u16>,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    clients: u64,
    /// Items (all at fulfillment center 1).
    #[arg(long, default_value_t = 32)]
    items: u64,
    /// Longest load before the kill, in ms (each cycle draws 10%..100% of it).
    #[arg(long, default_value_t = 1_500)]
    max_load_ms: u64,
    /// Data directory (default: a fresh temporary one, removed at the end).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Seed of the random choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Torture a replicated pair through these brokers instead (the shard
    /// count is drawn once: a replicated log keeps its layout).
    #[arg(long)]
    kafka_brokers: Option<String>,
    /// The standby's failover timeout, with --kafka-brokers.
    #[arg(long, default_value_t = 500)]
    failover_timeout_ms: u64,
}

/// Units each item starts with.
const INITIAL_UNITS: u32 = 1_000;
/// Holds live longer than any run (the longest TTL there is: one hour).
const HOLD_TTL_MS: u32 = 3_600_000;

/// xorshift64: enough randomness for choosing operations, reproducible by seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[derive(Clone, Debug)]
enum Op {
    Order {
        id: u64,
        lines: Vec<Line>,
    },
    Inbound {
        id: u64,
        lines: Vec<Line>,
    },
    Reserve {
        id: u64,
        lines: Vec<Line>,
    },
    Confirm {
        id: u64,
    },
    Release {
        id: u64,
        lines: Vec<Line>,
    },
    /// Cancel of an order (or a confirmed hold) with these lines.
    Cancel {
        id: u64,
        lines: Vec<Line>,
    },
}

impl Op {
    async fn send(&self, c: &Client) -> Result<Applied, Error> {
        match self {
            Op::Order { id, lines } => c.order(*id, lines).await,
            Op::Inbound { id, lines } => c.inbound(*id, lines).await,
            Op::Reserve { id, lines } => c.reserve(*id, HOLD_TTL_MS, lines).await,
            Op::Confirm { id } => c.confirm(*id).await,
            Op::Release { id, .. } => c.release(*id).await,
            Op::Cancel { id, .. } => c.cancel(*id).await,
        }
    }

    /// Change of available units per item when applied.
    fn effect(&self) -> Vec<(u64, i64)> {
        let each =
            |lines: &[Line], sign: i64| lines.iter().map(|l| (l.key.item, sign * l.qty as i64)).collect();
        match self {
            Op::Order { lines, .. } | Op::Reserve { lines, .. } => each(lines, -1),
            Op::Inbound { lines, .. } | Op::Release { lines, .. } | Op::Cancel { lines, .. } => {
                each(lines, 1)
            }
            Op::Confirm { .. } => Vec::new(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    Acked(u64),
    Refused,
    /// The connection died before the answer: applied or not, the retry says.
    Unknown,
}

type Journal = Arc<Mutex<Vec<(Op, Fate)>>>;

/// One client's life until the server dies: random operations on its own ids.
async fn client_loop(c: Client, journal: Journal, seed: u64, id_base: u64, items: u64) {
    let mut rng = Rng(seed | 1);
    // This client's acknowledged orders (cancellable) and live holds, with their lines.
    let mut orders: Vec<(u64, Vec<Line>)> = Vec::new();
    let mut holds: Vec<(u64, Vec<Line>)> = Vec::new();
    let lines = |rng: &mut Rng, most: u64, qty: u64| -> Vec<Line> {
        (0..1 + rng.below(most)).map(|_| Line::new(rng.below(items), 1, 1 + rng.below(qty) as u32)).collect()
    };
    for n in 0.. {
        let id = id_base + n;
        let op = match rng.below(100) {
            0..=44 => Op::Order { id, lines: lines(&mut rng, 3, 3) },
            45..=64 => Op::Inbound { id, lines: lines(&mut rng, 2, 5) },
            65..=79 => Op::Reserve { id, lines: lines(&mut rng, 1, 2) },
            80..=89 if !holds.is_empty() => {
                let (hold, hold_lines) = holds.swap_remove(rng.below(holds.len() as u64) as usize);
                if rng.below(2) == 0 {
                    orders.push((hold, hold_lines));
                    Op::Confirm { id: hold }
                } else {
                    Op::Release { id: hold, lines: hold_lines }
                }
            }
            90..=99 if !orders.is_empty() => {
                let (order, order_lines) = orders.swap_remove(rng.below(orders.len() as u64) as usize);
                Op::Cancel { id: order, lines: order_lines }
            }
            _ => continue,
        };
        let fate = match op.send(&c).await {
            Ok(Applied::New { lsn }) => Fate::Acked(lsn),
            Ok(Applied::Duplicate { .. }) => panic!("a fresh operation {op:?} answered DUPLICATE"),
            Err(Error::Insufficient { .. } | Error::Server { .. }) => Fate::Refused,
            Err(_) => Fate::Unknown,
        };
        match (&op, fate) {
            (Op::Order { id, lines }, Fate::Acked(_)) => orders.push((*id, lines.clone())),
            (Op::Reserve { id, lines }, Fate::Acked(_)) => holds.push((*id, lines.clone())),
            // A confirm that did not take leaves the hold alone from now on.
            (Op::Confirm { id }, Fate::Refused | Fate::Unknown) => orders.retain(|(o, _)| o != id),
            _ => {}
        }
        journal.lock().unwrap().push((op, fate));
        if fate == Fate::Unknown {
            return;
        }
    }
}

/// A stockd process, killed when dropped (also when a check panics: an
/// orphan would hold the pipes of whoever runs this harness).
struct Node(Child);

impl Node {
    fn kill_9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill_9();
    }
}

fn spawn_stockd(bin: &Path, dir: &Path, port: u16, shards: u16, extra: &[String]) -> Node {
    let log = std::env::var("STOCKD_LOG").ok();
    let child = Command::new(bin)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--shard-port-base", "0"])
        .args(["--shards", &shards.to_string(), "--snapshot-interval-secs", "1"])
        .arg("--data-dir")
        .arg(dir)
        .args(extra)
        // The servers' log (stdout) with STOCKD_LOG=LEVEL, else errors only.
        .env("RUST_LOG", log.clone().unwrap_or_else(|| "error".into()))
        .stdout(if log.is_some() { Stdio::inherit() } else { Stdio::null() })
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    Node(child)
}

async fn connect(port: u16) -> Client {
    let t = Instant::now();
    loop {
        match Client::connect(&format!("127.0.0.1:{port}")).await {
            Ok(c) => return c,
            Err(_) if t.elapsed() < Duration::from_secs(60) => {
                tokio::time::sleep(Duration::from_millis(5)).await
            }
            Err(e) => panic!("stockd did not come up within 60 s: {e}"),
        }
    }
}

fn free_port() -> u16 {
    stockd::listeners::restartable_port()
}

fn data_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |d| d.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
}

/// What one cycle found.
#[derive(Default)]
struct Cycle {
    shards: u16,
    acked: usize,
    unknown: usize,
    unknown_applied: usize,
    verified: usize,
    violations: Vec<String>,
    recovery_ms: u128,
    data_mb: f64,
}

/// Re-sends every mutation of the cycle; returns the ones that are applied.
async fn settle(c: &Client, journal: Vec<(Op, Fate)>, cycle: &mut Cycle) -> Vec<Op> {
    let mut applied = Vec::new();
    for (op, fate) in journal {
        if fate == Fate::Refused {
            continue; // never applied, and a retry now could apply it
        }
        let again = op.send(c).await;
        match (fate, again) {
            (Fate::Acked(lsn), Ok(Applied::Duplicate { lsn: got })) if got == lsn => {
                cycle.verified += 1;
                applied.push(op);
            }
            (Fate::Acked(lsn), other) => {
                cycle.violations.push(format!("{op:?} was acknowledged at LSN {lsn}; its retry: {other:?}"))
            }
            (Fate::Refused, _) => unreachable!("skipped above"),
            (Fate::Unknown, Ok(a)) => {
                cycle.unknown_applied += matches!(a, Applied::Duplicate { .. }) as usize;
                applied.push(op);
            }
            (Fate::Unknown, Err(Error::Insufficient { .. } | Error::Server { .. })) => {}
            (Fate::Unknown, Err(e)) => cycle.violations.push(format!("retry of {op:?} failed: {e}")),
        }
    }
    applied
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.items == 0 || args.items > stockd_protocol::MAX_LINES as u64 || args.shards.is_empty() {
        eprintln!("stock-torture: --items must be 1..={} and --shards non-empty", stockd_protocol::MAX_LINES);
        return ExitCode::from(2);
    }
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let cycles = match &args.kafka_brokers {
        Some(brokers) => rt.block_on(torture_replicated(&args, brokers)),
        None => rt.block_on(torture(&args)),
    };
    print_summary(&cycles);
    if cycles.iter().all(|c| c.violations.is_empty()) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

async fn torture(args: &Args) -> Vec<Cycle> {
    let temp = tempfile::tempdir().expect("a temporary directory");
    let dir = args.data_dir.clone().unwrap_or_else(|| temp.path().to_path_buf());
    let mut rng = Rng(args.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let port = free_port();
    let mut shards = args.shards[rng.below(args.shards.len() as u64) as usize];
    let mut child = spawn_stockd(&args.stockd, &dir, port, shards, &[]);
    let mut c = connect(port).await;
    let mut model = stock(&c, args.items).await;
    let mut cycles = Vec::new();
    for n in 0..args.cycles as u64 {
        let (journal, mut tasks) = run_load(&c, args, n, &mut rng).await;
        child.kill_9();
        while let Some(done) = tasks.join_next().await {
            done.expect("a client task panicked");
        }
        drop(c);
        shards = args.shards[rng.below(args.shards.len() as u64) as usize];
        let data_mb = data_bytes(&dir) as f64 / 1e6;
        let t = Instant::now();
        child = spawn_stockd(&args.stockd, &dir, port, shards, &[]);
        c = connect(port).await;
        let mut cycle = Cycle { shards, recovery_ms: t.elapsed().as_millis(), data_mb, ..Cycle::default() };
        let journal = std::mem::take(&mut *journal.lock().unwrap());
        check_cycle(&c, journal, &mut model, args.items, n, &mut cycle).await;
        cycles.push(cycle);
    }
    child.kill_9();
    cycles
}

/// Puts the initial units on every item; returns the model of every item's units.
async fn stock(c: &Client, items: u64) -> HashMap<u64, i64> {
    let initial: Vec<Line> = (0..items).map(|i| Line::new(i, 1, INITIAL_UNITS)).collect();
    if let Err(e) = c.inbound(u64::MAX, &initial).await {
        panic!("the initial inbound failed: {e}");
    }
    (0..items).map(|i| (i, INITIAL_UNITS as i64)).collect()
}

/// Starts cycle `n`'s clients and lets them run for a random while (the
/// caller then kills the server): their journal and tasks.
async fn run_load(c: &Client, args: &Args, n: u64, rng: &mut Rng) -> (Journal, tokio::task::JoinSet<()>) {
    let journal: Journal = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..args.clients {
        let id_base = (n + 1) << 40 | k << 32;
        tasks.spawn(client_loop(c.clone(), journal.clone(), rng.next(), id_base, args.items));
    }
    let load_ms = args.max_load_ms / 10 + rng.below(args.max_load_ms - args.max_load_ms / 10 + 1);
    tokio::time::sleep(Duration::from_millis(load_ms)).await;
    (journal, tasks)
}

/// Settles a cycle's mutations on `c` and checks every row against the model.
async fn check_cycle(
    c: &Client,
    journal: Vec<(Op, Fate)>,
    model: &mut HashMap<u64, i64>,
    items: u64,
    n: u64,
    cycle: &mut Cycle,
) {
    cycle.acked = journal.iter().filter(|(_, f)| matches!(f, Fate::Acked(_))).count();
    cycle.unknown = journal.iter().filter(|(_, f)| *f == Fate::Unknown).count();
    for op in settle(c, journal, cycle).await {
        for (item, delta) in op.effect() {
            *model.get_mut(&item).expect("a known item") += delta;
        }
    }
    let keys: Vec<Key> = (0..items).map(|i| Key { item: i, fc: 1 }).collect();
    match c.query_batch(&keys).await {
        Ok(rows) => {
            for (k, got) in keys.iter().zip(rows) {
                if got as i64 != model[&k.item] {
                    cycle
                        .violations
                        .push(format!("item {}: {got} available, {} expected", k.item, model[&k.item]));
                }
            }
        }
        Err(e) => cycle.violations.push(format!("query after the restart: {e}")),
    }
    for v in &cycle.violations {
        eprintln!("cycle {n}: VIOLATION {v}");
    }
    eprintln!(
        "cycle {n}: {} shards, {} acknowledged, {} verified, {} unanswered ({} had been applied), recovery {} ms, {:.1} MB",
        cycle.shards, cycle.acked, cycle.verified, cycle.unknown, cycle.unknown_applied, cycle.recovery_ms, cycle.data_mb
    );
}

/// An item no one stocks: a primary refuses an order for it, any other node
/// answers NOT_PRIMARY; nothing changes either way.
const PROBE_ITEM: u64 = 1 << 40;

/// Waits until the node on `port` takes mutations (at most 60 s).
async fn until_primary(port: u16) -> Client {
    let t = Instant::now();
    let c = connect(port).await;
    loop {
        match c.order(u64::MAX - 1, &[Line::new(PROBE_ITEM, 1, 1)]).await {
            Err(Error::Insufficient { .. }) => return c,
            Err(Error::Server { status: stockd_protocol::Status::NotPrimary, .. }) => {}
            other => panic!("probe order on 127.0.0.1:{port}: {other:?}"),
        }
        assert!(t.elapsed() < Duration::from_secs(60), "127.0.0.1:{port} did not become the primary in 60 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until the standby on `port` names `primary` (it has read the latest promotion).
async fn until_following(port: u16, primary: u16) {
    let t = Instant::now();
    let c = connect(port).await;
    loop {
        if let Err(Error::Server { message, .. }) =
            c.order(u64::MAX - 1, &[Line::new(PROBE_ITEM, 1, 1)]).await
        {
            if message.contains(&format!("127.0.0.1:{primary}")) {
                return;
            }
        }
        assert!(t.elapsed() < Duration::from_secs(60), "127.0.0.1:{port} did not follow {primary} in 60 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The replicated pair: kill the primary each cycle, settle on the new one.
async fn torture_replicated(args: &Args, brokers: &str) -> Vec<Cycle> {
    let temp = tempfile::tempdir().expect("a temporary directory");
    let root = args.data_dir.clone().unwrap_or_else(|| temp.path().to_path_buf());
    let dirs = [root.join("a"), root.join("b")];
    let mut rng = Rng(args.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let ports = [free_port(), free_port()];
    let shards = args.shards[rng.below(args.shards.len() as u64) as usize];
    let topic = format!("stock-torture-{}-{}", std::process::id(), args.seed);
    let flags = |role: &str| -> Vec<String> {
        let timeout = args.failover_timeout_ms.to_string();
        ["--kafka-brokers", brokers, "--replication-topic", &topic, role, "--failover-timeout-ms", &timeout]
            .map(String::from)
            .to_vec()
    };
    let mut nodes = [
        spawn_stockd(&args.stockd, &dirs[0], ports[0], shards, &flags("--replicate")),
        spawn_stockd(&args.stockd, &dirs[1], ports[1], shards, &flags("--standby")),
    ];
    let mut c = until_primary(ports[0]).await;
    until_following(ports[1], ports[0]).await;
    let mut model = stock(&c, args.items).await;
    let mut primary = 0;
    let mut cycles = Vec::new();
    for n in 0..args.cycles as u64 {
        let (journal, mut tasks) = run_load(&c, args, n, &mut rng).await;
        nodes[primary].kill_9();
        let killed = Instant::now();
        while let Some(done) = tasks.join_next().await {
            done.expect("a client task panicked");
        }
        drop(c);
        let standby = 1 - primary;
        c = until_primary(ports[standby]).await;
        let data_mb = data_bytes(&dirs[standby]) as f64 / 1e6;
        let mut cycle =
            Cycle { shards, recovery_ms: killed.elapsed().as_millis(), data_mb, ..Cycle::default() };
        let journal = std::mem::take(&mut *journal.lock().unwrap());
        check_cycle(&c, journal, &mut model, args.items, n, &mut cycle).await;
        cycles.push(cycle);
        // The killed node comes back, cuts what the topic never confirmed, and follows.
        nodes[primary] =
            spawn_stockd(&args.stockd, &dirs[primary], ports[primary], shards, &flags("--replicate"));
        until_following(ports[primary], ports[standby]).await;
        primary = standby;
    }
    for node in nodes.iter_mut() {
        node.kill_9();
    }
    cycles
}

fn print_summary(cycles: &[Cycle]) {
    let sum = |f: fn(&Cycle) -> usize| cycles.iter().map(f).sum::<usize>();
    let mut recovery: Vec<u128> = cycles.iter().map(|c| c.recovery_ms).collect();
    recovery.sort_unstable();
    let pct = |p: usize| recovery.get((recovery.len().saturating_sub(1)) * p / 100).copied().unwrap_or(0);
    println!("| cycles | acknowledged | verified | unanswered (applied) | violations | recovery p50 / max ms | data at the last kill |");
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| {} | {} | {} | {} ({}) | {} | {} / {} | {:.1} MB |",
        cycles.len(),
        sum(|c| c.acked),
        sum(|c| c.verified),
        sum(|c| c.unknown),
        sum(|c| c.unknown_applied),
        sum(|c| c.violations.len()),
        pct(50),
        pct(100),
        cycles.last().map_or(0.0, |c| c.data_mb)
    );
}
