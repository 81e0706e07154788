//! stock-loadgen: drives stockd or Redis with the same workloads and
//! reports throughput and latency (HdrHistogram).
//!
//! Key space: items `1..=keys`, each with centers `1..=centers`. Items are
//! drawn from a Zipf distribution of exponent `zipf` (0 = uniform; item 1 is
//! the hottest), centers uniformly. Orders and inbounds use distinct keys
//! within one request and quantity 1 per line.
//!
//! Redis key layout: `stock:{vendor_item_id}:{fulfillment_center_id}` holds
//! the available units as an integer string. Queries are GET / MGET, orders
//! one Lua script (EVALSHA) that checks every line and decrements all or
//! none, inbounds INCRBY per line (one pipeline per receipt).

mod pacer;
pub mod plot;
mod schedule;

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use stockd_client::{prefetch, Applied, Client, Error as ClientError, Key, Line};
use tokio::sync::{oneshot, watch};

use pacer::Pacer;
pub use schedule::{schedule, Sched};

/// What a request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    Query,
    QueryBatch,
    Order,
    Inbound,
    /// Percentages of queries, orders and inbounds (summing to 100).
    Mixed {
        query: u32,
        order: u32,
        inbound: u32,
    },
}

impl FromStr for Workload {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "query" => Workload::Query,
            "query-batch" => Workload::QueryBatch,
            "order" => Workload::Order,
            "inbound" => Workload::Inbound,
            _ => {
                let Some(mix) = s.strip_prefix("mixed:") else {
                    return Err(format!(
                        "unknown workload `{s}`: query, query-batch, order, inbound, mixed:Q,O,I"
                    ));
                };
                let parts: Vec<u32> = mix
                    .split(',')
                    .map(|p| p.trim().parse::<u32>().map_err(|e| format!("mixed:{mix}: {e}")))
                    .collect::<Result<_, _>>()?;
                let [query, order, inbound] = parts[..] else {
                    return Err(format!("mixed:{mix}: expected three percentages Q,O,I"));
                };
                if query + order + inbound != 100 {
                    return Err(format!("mixed:{mix}: percentages must add up to 100"));
                }
                Workload::Mixed { query, order, inbound }
            }
        })
    }
}

impl std::fmt::Display for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Workload::Query => f.write_str("query"),
            Workload::QueryBatch => f.write_str("query-batch"),
            Workload::Order => f.write_str("order"),
            Workload::Inbound => f.write_str("inbound"),
            Workload::Mixed { query, order, inbound } => write!(f, "mixed:{query},{order},{inbound}"),
        }
    }
}

/// Which server, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Stockd(String),
    Redis(String),
}

impl FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(a) = s.strip_prefix("stockd://") {
            Ok(Target::Stockd(a.to_string()))
        } else if s.starts_with("redis://") {
            Ok(Target::Redis(s.to_string()))
        } else {
            Err(format!("`{s}`: target must be stockd://HOST:PORT or redis://HOST:PORT"))
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Stockd(a) => write!(f, "stockd://{a}"),
            Target::Redis(a) => f.write_str(a),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub target: Target,
    pub workload: Workload,
    pub keys: u64,
    pub centers: u32,
    pub zipf: f64,
    pub connections: usize,
    pub pipeline: usize,
    pub batch: usize,
    pub lines: usize,
    pub duration: Duration,
    /// Offered requests per second (open loop); None: closed loop.
    pub rate: Option<f64>,
    pub seed: u64,
    /// Put `preload_qty` units on every key first, through the target's write path.
    pub preload: bool,
    pub preload_qty: u32,
    /// Print a progress line every second.
    pub progress: bool,
    /// Threads, each with its own share of the clients (at most one per client).
    pub threads: usize,
    /// Each of the `connections` clients opens connections of its own. By
    /// default the clients of one thread share one set: the stockd client
    /// shares them itself (a socket per shard), and a Redis target's
    /// multiplexed connection is cloned, so both carry a thread's requests
    /// over as few sockets as the target allows.
    pub own_connections: bool,
    /// How long the run waits, once its duration is over, for the answers
    /// still in flight; past it the run ends with an error (a server that
    /// holds requests, its log's disk full say, or stopped answering).
    pub drain_limit: Duration,
}

impl Config {
    pub fn new(target: Target, workload: Workload) -> Config {
        Config {
            target,
            workload,
            keys: 100_000,
            centers: 4,
            zipf: 0.0,
            connections: 16,
            pipeline: 16,
            batch: 64,
            lines: 1,
            duration: Duration::from_secs(10),
            rate: None,
            seed: 1,
            preload: false,
            preload_qty: 1_000_000,
            progress: false,
            threads: 2,
            own_connections: false,
            drain_limit: Duration::from_secs(10),
        }
    }
}

/// xorshift64*: small, fast, reproducible from the seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(stockd_client::fmix64(seed ^ 0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in [0, n): the high half of a 128-bit product (a multiply,
    /// where `%` is a division of up to ~40 cycles; the bias is below n / 2^64).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

/// Draws keys: Zipf over items (rank 1 = item 1 hottest), uniform over centers.
#[derive(Clone, Debug)]
pub struct KeyGen {
    /// Walker's alias table over items; empty for the uniform case.
    alias: Arc<Vec<AliasEntry>>,
    keys: u64,
    centers: u32,
}

/// A uniform draw made ahead of the key it stands for (see
/// [`KeyGen::key_ahead`]).
#[derive(Clone, Copy, Debug)]
pub struct Ahead(u64);

/// One column of an alias table: keep the column's own item with
/// probability `keep / 2^32`, else draw `other`.
#[derive(Clone, Copy, Debug)]
struct AliasEntry {
    keep: u32,
    other: u32,
}

/// Walker's alias method (Vose's construction): one uniform column and one
/// coin per draw, where a binary search of the CDF took 17 dependent,
/// mostly cache-missing steps for 100,000 items (the load generator's
/// largest cost in its profile).
fn alias_table(weights: &[f64]) -> Vec<AliasEntry> {
    let n = weights.len();
    let total: f64 = weights.iter().sum();
    let mut scaled: Vec<f64> = weights.iter().map(|w| w * n as f64 / total).collect();
    let (mut small, mut large): (Vec<usize>, Vec<usize>) = (0..n).partition(|&i| scaled[i] < 1.0);
    let mut table: Vec<AliasEntry> = (0..n).map(|i| AliasEntry { keep: u32::MAX, other: i as u32 }).collect();
    while let (Some(&s), Some(&l)) = (small.last(), large.last()) {
        small.pop();
        table[s] = AliasEntry { keep: (scaled[s] * 4_294_967_296.0) as u32, other: l as u32 };
        scaled[l] -= 1.0 - scaled[s];
        if scaled[l] < 1.0 {
            large.pop();
            small.push(l);
        }
    }
    // What is left has probability 1 up to rounding: keep it always.
    table
}

impl KeyGen {
    pub fn new(keys: u64, centers: u32, zipf: f64) -> KeyGen {
        assert!(keys > 0 && centers > 0, "keys and centers must be positive");
        assert!(keys <= u32::MAX as u64 || zipf == 0.0, "a Zipf key space has at most 2^32 - 1 items");
        let alias = if zipf == 0.0 {
            Vec::new()
        } else {
            let weights: Vec<f64> = (1..=keys).map(|k| 1.0 / (k as f64).powf(zipf)).collect();
            alias_table(&weights)
        };
        KeyGen { alias: Arc::new(alias), keys, centers }
    }

    pub fn item(&self, rng: &mut Rng) -> u64 {
        self.item_of(rng.next_u64())
    }

    /// The item a uniform random `r` stands for.
    fn item_of(&self, r: u64) -> u64 {
        if self.alias.is_empty() {
            return 1 + ((r as u128 * self.keys as u128) >> 64) as u64;
        }
        let column = self.column(r);
        let e = self.alias[column];
        1 + if (r as u32) < e.keep { column as u64 } else { e.other as u64 }
    }

    /// High bits pick the column (multiply-shift, no division), low bits flip the coin.
    fn column(&self, r: u64) -> usize {
        (((r >> 32) * self.alias.len() as u64) >> 32) as usize
    }

    pub fn key(&self, rng: &mut Rng) -> Key {
        Key { item: self.item(rng), fc: 1 + rng.below(self.centers as u64) as u32 }
    }

    /// A draw for the next [`KeyGen::key_ahead`], its alias-table column
    /// asked for now.
    pub fn ahead(&self, rng: &mut Rng) -> Ahead {
        let a = Ahead(rng.next_u64());
        self.fetch_column(a.0);
        a
    }

    /// A key as [`KeyGen::key`] draws it, from the draw made one request
    /// ahead; the next draw is made now and its column fetched while this
    /// key's request is in flight. A worker's single keys each missed the
    /// cache on the table (100,000 columns of 8 bytes): a fifth of the load
    /// generator's CPU on unbatched queries at one shard. (At 8 shards on
    /// the 2-core machine the line is evicted again before its use, by the
    /// kernel's work for the sockets on the same core: no gain there.)
    pub fn key_ahead(&self, rng: &mut Rng, a: &mut Ahead) -> Key {
        let key = Key { item: self.item_of(a.0), fc: 1 + rng.below(self.centers as u64) as u32 };
        *a = self.ahead(rng);
        key
    }

    fn fetch_column(&self, r: u64) {
        if !self.alias.is_empty() {
            prefetch(&self.alias[self.column(r)]);
        }
    }

    /// `n` keys drawn as [`KeyGen::key`] draws them, with the alias-table
    /// columns of each chunk fetched from memory together: a table of
    /// 100,000 items does not stay in a core's cache, and one miss after
    /// another was half of the load generator's time on 64-key batches.
    /// Fills `out` (no allocation once it has room).
    pub fn keys_into(&self, rng: &mut Rng, n: usize, out: &mut Vec<Key>) {
        const CHUNK: usize = 16;
        out.clear();
        let mut draws = [0u64; CHUNK];
        while out.len() < n {
            let m = (n - out.len()).min(CHUNK);
            for d in draws[..m].iter_mut() {
                *d = rng.next_u64();
                self.fetch_column(*d);
            }
            for d in &draws[..m] {
                out.push(Key { item: self.item_of(*d), fc: 1 + rng.below(self.centers as u64) as u32 });
            }
        }
    }

    /// `n` distinct keys (fewer if the key space is smaller).
    pub fn distinct(&self, rng: &mut Rng, n: usize) -> Vec<Key> {
        let mut lines = Vec::with_capacity(n);
        self.distinct_lines(rng, n, &mut lines);
        lines.into_iter().map(|l| l.key).collect()
    }

    /// Fills `out` with lines of one unit on `n` distinct keys drawn as
    /// [`KeyGen::distinct`] draws them (no allocation once `out` has room).
    pub fn distinct_lines(&self, rng: &mut Rng, n: usize, out: &mut Vec<Line>) {
        out.clear();
        let n = n.min((self.keys * self.centers as u64) as usize);
        let mut tries = 0;
        while out.len() < n && tries < n * 100 {
            let key = self.key(rng);
            if !out.iter().any(|l| l.key == key) {
                out.push(Line { key, qty: 1 });
            }
            tries += 1;
        }
    }

    /// Every key, for preloading and conservation checks.
    pub fn all(&self) -> impl Iterator<Item = Key> + '_ {
        (1..=self.keys).flat_map(move |item| (1..=self.centers).map(move |fc| Key { item, fc }))
    }
}

/// The JSON report: exactly these fields.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Report {
    pub target: String,
    pub workload: String,
    pub ops: u64,
    pub errors: u64,
    pub duration_s: f64,
    pub throughput_ops_s: f64,
    pub keys_per_s: f64,
    /// The load generator's own CPU (user + system, all its threads) per
    /// operation during the measured run: a benchmark whose client is the
    /// bottleneck measures the client.
    pub client_cpu_us_per_op: f64,
    pub latency_us: Latency,
    /// Open loop: how long after a worker could send (its intended time,
    /// or its previous answer if that came later) the load generator sent:
    /// its own delay, part of the latency (which counts from the intended
    /// time). Large values mean the load generator did not keep up.
    pub send_late_us: Option<Latency>,
    /// A mixed workload's latency for each kind of request in it, by name
    /// (`query`, `order`, `inbound`): an order's answer waits for the disk,
    /// a query's does not. Null for a workload of one kind.
    pub latency_by_kind_us: Option<BTreeMap<String, Latency>>,
}

/// CPU seconds (user + system) this process has used so far.
pub fn process_cpu_seconds() -> f64 {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes the struct we pass and nothing else.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(u.ru_utime) + secs(u.ru_stime)
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Latency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Latency {
        Latency {
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// Everything a run measured.
pub struct Outcome {
    pub report: Report,
    pub histogram: Histogram<u64>,
    /// Orders refused for lack of stock: an expected outcome, not an error.
    pub insufficient: u64,
    /// Unexpected errors by kind (status name or "io").
    pub errors_by_kind: BTreeMap<String, u64>,
    /// Units taken by successful orders, and added by successful inbounds.
    pub order_units: u64,
    pub inbound_units: u64,
}

/// What the workers count and time, kept per OS thread: a worker adds to
/// the tally of the thread it runs on, so no cache line is shared between
/// threads and there is one histogram per thread, not one per worker (a
/// histogram is ~130 KB: one per worker put the load generator's recording
/// among its largest costs). Readers sum the tallies.
#[derive(Clone)]
struct Tally {
    /// Open loop: the load generator's own delay per send (us), see
    /// [`Report::send_late_us`].
    late: Histogram<u64>,
    /// Latency by kind of request, indexed by [`Kind`] (for
    /// [`Report::latency_by_kind_us`]); the run's is their sum
    /// ([`Tally::latency`]), so that a request is recorded once.
    by_kind: [Histogram<u64>; 4],
    ops: u64,
    keys: u64,
    insufficient: u64,
    order_units: u64,
    inbound_units: u64,
    errors: BTreeMap<String, u64>,
    /// The longest latency since the last progress line took it (us).
    slowest: u64,
}

impl Default for Tally {
    fn default() -> Tally {
        Tally {
            late: new_histogram(),
            by_kind: std::array::from_fn(|_| new_histogram()),
            ops: 0,
            keys: 0,
            insufficient: 0,
            order_units: 0,
            inbound_units: 0,
            errors: BTreeMap::new(),
            slowest: 0,
        }
    }
}

impl Tally {
    fn add(&mut self, o: &Tally) {
        self.late.add(&o.late).expect("histograms of the same bounds");
        for (h, o) in self.by_kind.iter_mut().zip(&o.by_kind) {
            h.add(o).expect("histograms of the same bounds");
        }
        self.ops += o.ops;
        self.keys += o.keys;
        self.insufficient += o.insufficient;
        self.order_units += o.order_units;
        self.inbound_units += o.inbound_units;
        for (k, n) in &o.errors {
            *self.errors.entry(k.clone()).or_default() += n;
        }
        self.slowest = self.slowest.max(o.slowest);
    }

    /// Every request's latency, whatever its kind.
    fn latency(&self) -> Histogram<u64> {
        let mut all = new_histogram();
        for h in &self.by_kind {
            all.add(h).expect("histograms of the same bounds");
        }
        all
    }
}

/// The tallies of one run, one per thread that recorded.
struct Recorder {
    id: u64,
    tallies: Mutex<Vec<Arc<Mutex<Tally>>>>,
}

thread_local! {
    /// This thread's tally, and the run (recorder id) it belongs to.
    static TALLY: std::cell::RefCell<Option<(u64, Arc<Mutex<Tally>>)>> = const { std::cell::RefCell::new(None) };
}

impl Recorder {
    fn new() -> Recorder {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Recorder { id: NEXT.fetch_add(1, Relaxed), tallies: Mutex::new(Vec::new()) }
    }

    /// Adds to the calling thread's tally (registered on first use).
    fn record(&self, f: impl FnOnce(&mut Tally)) {
        TALLY.with(|cell| {
            let mut cell = cell.borrow_mut();
            if cell.as_ref().is_none_or(|(id, _)| *id != self.id) {
                let t = Arc::new(Mutex::new(Tally::default()));
                self.tallies.lock().unwrap().push(t.clone());
                *cell = Some((self.id, t));
            }
            let (_, t) = cell.as_ref().expect("registered above");
            f(&mut t.lock().unwrap());
        })
    }

    fn sum(&self) -> Tally {
        let mut all = Tally::default();
        for t in self.tallies.lock().unwrap().iter() {
            all.add(&t.lock().unwrap());
        }
        all
    }

    /// The longest latency any thread recorded since the last call (us).
    fn take_slowest(&self) -> u64 {
        let tallies = self.tallies.lock().unwrap();
        tallies.iter().map(|t| std::mem::take(&mut t.lock().unwrap().slowest)).max().unwrap_or(0)
    }
}

const ORDER_SCRIPT: &str = r#"
for i = 1, #KEYS do
  local v = tonumber(redis.call('GET', KEYS[i]) or '0')
  if v < tonumber(ARGV[i]) then return {i - 1, v} end
end
for i = 1, #KEYS do redis.call('DECRBY', KEYS[i], ARGV[i]) end
return {-1, 0}
"#;

pub fn redis_key(k: Key) -> String {
    format!("stock:{}:{}", k.item, k.fc)
}

/// One connection to the target.
#[derive(Clone)]
pub enum Conn {
    Stockd(Client),
    Redis(redis::aio::MultiplexedConnection, Arc<redis::Script>),
}

/// What one request ended as.
enum Res {
    Ok,
    Insufficient,
    Err(String),
}

fn client_err(e: ClientError) -> Res {
    match e {
        ClientError::Insufficient { .. } => Res::Insufficient,
        other => Res::Err(other.status().map_or("io".to_string(), |s| s.name().to_string())),
    }
}

fn redis_err(e: redis::RedisError) -> Res {
    Res::Err(format!("redis:{:?}", e.kind()))
}

impl Conn {
    /// A client of `target`; with `own_connections`, one that shares no
    /// connection with the other clients of this thread.
    pub async fn open(target: &Target, own_connections: bool) -> Result<Conn, String> {
        match target {
            Target::Stockd(a) => {
                let opts = stockd_client::Options { own_connections, ..Default::default() };
                Client::connect_with(a, opts).await.map(Conn::Stockd).map_err(|e| format!("{target}: {e}"))
            }
            Target::Redis(url) => {
                let c = redis::Client::open(url.as_str()).map_err(|e| format!("{url}: {e}"))?;
                let conn = c.get_multiplexed_async_connection().await.map_err(|e| format!("{url}: {e}"))?;
                Ok(Conn::Redis(conn, Arc::new(redis::Script::new(ORDER_SCRIPT))))
            }
        }
    }

    async fn query(&mut self, k: Key) -> Res {
        match self {
            Conn::Stockd(c) => c.query(k.item, k.fc).await.map_or_else(client_err, |_| Res::Ok),
            Conn::Redis(c, _) => redis::cmd("GET")
                .arg(redis_key(k))
                .query_async::<Option<i64>>(c)
                .await
                .map_or_else(redis_err, |_| Res::Ok),
        }
    }

    /// Available units of many keys, in order.
    pub async fn query_batch(&mut self, keys: &[Key]) -> Result<Vec<u64>, String> {
        match self {
            Conn::Stockd(c) => c.query_batch(keys).await.map_err(|e| e.to_string()),
            Conn::Redis(c, _) => {
                let names: Vec<String> = keys.iter().map(|k| redis_key(*k)).collect();
                let v: Vec<Option<i64>> =
                    redis::cmd("MGET").arg(names).query_async(c).await.map_err(|e| e.to_string())?;
                Ok(v.into_iter().map(|x| x.unwrap_or(0).max(0) as u64).collect())
            }
        }
    }

    async fn order(&mut self, id: u64, lines: &[Line]) -> Res {
        match self {
            Conn::Stockd(c) => match c.order(id, lines).await {
                Ok(Applied::New { .. }) => Res::Ok,
                Ok(Applied::Duplicate { .. }) => Res::Err("duplicate".into()),
                Err(e) => client_err(e),
            },
            Conn::Redis(c, script) => {
                let mut inv = script.prepare_invoke();
                for l in lines {
                    inv.key(redis_key(l.key)).arg(l.qty);
                }
                match inv.invoke_async::<(i64, i64)>(c).await {
                    Ok((-1, _)) => Res::Ok,
                    Ok(_) => Res::Insufficient,
                    Err(e) => redis_err(e),
                }
            }
        }
    }

    async fn inbound(&mut self, id: u64, lines: &[Line]) -> Res {
        match self {
            Conn::Stockd(c) => match c.inbound(id, lines).await {
                Ok(Applied::New { .. }) => Res::Ok,
                Ok(Applied::Duplicate { .. }) => Res::Err("duplicate".into()),
                Err(e) => client_err(e),
            },
            Conn::Redis(c, _) => {
                let mut p = redis::pipe();
                for l in lines {
                    p.cmd("INCRBY").arg(redis_key(l.key)).arg(l.qty);
                }
                p.query_async::<Vec<i64>>(c).await.map_or_else(redis_err, |_| Res::Ok)
            }
        }
    }
}

/// Puts `qty` units on every key, through the target's own write path
/// (stockd: INBOUND receipts of up to 256 lines; Redis: SET in pipelines).
pub async fn preload(conn: &Conn, keys: &KeyGen, qty: u32, seed: u64) -> Result<u64, String> {
    let all: Vec<Key> = keys.all().collect();
    let mut tasks = Vec::new();
    let chunks: Vec<Vec<Key>> = all.chunks(256).map(|c| c.to_vec()).collect();
    let base = receipt_base(seed) | 0xFFFF_0000_0000;
    for (n, part) in chunks.chunks(chunks.len().div_ceil(16).max(1)).enumerate() {
        let mut conn = conn.clone();
        let part = part.to_vec();
        tasks.push(tokio::spawn(async move {
            for (i, chunk) in part.iter().enumerate() {
                match &mut conn {
                    Conn::Stockd(c) => {
                        let lines: Vec<Line> = chunk.iter().map(|k| Line { key: *k, qty }).collect();
                        let id = base + ((n as u64) << 20) + i as u64;
                        c.inbound(id, &lines).await.map_err(|e| format!("preload: {e}"))?;
                    }
                    Conn::Redis(c, _) => {
                        let mut p = redis::pipe();
                        for k in chunk {
                            p.cmd("SET").arg(redis_key(*k)).arg(qty).ignore();
                        }
                        p.query_async::<()>(c).await.map_err(|e| format!("preload: {e}"))?;
                    }
                }
            }
            Ok::<_, String>(())
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    Ok(all.len() as u64)
}

/// Most workers in one run: worker `w`'s ids are the run's base, `w` in
/// bits 32-47 and a sequence below them; `0xFFFF` there is the preload's.
pub const MAX_WORKERS: usize = 0xFFFF;

/// High bits of every id this run uses, from the seed, so runs against the
/// same server do not collide.
fn receipt_base(seed: u64) -> u64 {
    stockd_client::fmix64(seed) & 0xFFFF_0000_0000_0000
}

/// What one request is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Query,
    Batch,
    Order,
    Inbound,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Query, Kind::Batch, Kind::Order, Kind::Inbound];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Query => "query",
            Kind::Batch => "batch",
            Kind::Order => "order",
            Kind::Inbound => "inbound",
        }
    }
}

/// Picks the kind of the next request.
pub fn pick(workload: Workload, rng: &mut Rng) -> Kind {
    match workload {
        Workload::Query => Kind::Query,
        Workload::QueryBatch => Kind::Batch,
        Workload::Order => Kind::Order,
        Workload::Inbound => Kind::Inbound,
        Workload::Mixed { query, order, .. } => {
            let r = rng.below(100) as u32;
            if r < query {
                Kind::Query
            } else if r < query + order {
                Kind::Order
            } else {
                Kind::Inbound
            }
        }
    }
}

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

/// Runs the workload and measures it. Opens `connections` clients and
/// keeps `pipeline` requests in flight on each (the clients of a thread
/// share their sockets unless `own_connections`).
pub async fn run(cfg: &Config) -> Result<Outcome, String> {
    if cfg.connections == 0 || cfg.pipeline == 0 || cfg.batch == 0 || cfg.lines == 0 {
        return Err("connections, pipeline, batch and lines must be at least 1".into());
    }
    // A worker per caller; in a mixed open loop one per caller and kind.
    let kinds = match (cfg.rate, cfg.workload) {
        (Some(_), Workload::Mixed { query, order, inbound }) => {
            [query, order, inbound].iter().filter(|&&share| share > 0).count()
        }
        _ => 1,
    };
    let workers = cfg.connections.saturating_mul(cfg.pipeline).saturating_mul(kinds);
    if workers > MAX_WORKERS {
        let per_kind = if kinds > 1 { ", one per kind in a mixed open loop" } else { "" };
        return Err(format!(
            "{workers} workers (--connections x --pipeline{per_kind}): at most {MAX_WORKERS}, so that \
             every worker's ids stay its own"
        ));
    }
    // Open loop: every worker's send times and kind, checked before anything runs.
    let sched = match cfg.rate {
        Some(rate) => Some(Arc::new(schedule(cfg.workload, cfg.connections, cfg.pipeline, rate)?)),
        None => None,
    };
    let keys = KeyGen::new(cfg.keys, cfg.centers, cfg.zipf);
    if cfg.preload {
        let t = Instant::now();
        let conn = Conn::open(&cfg.target, cfg.own_connections).await?;
        let n = preload(&conn, &keys, cfg.preload_qty, cfg.seed).await?;
        if cfg.progress {
            eprintln!(
                "preloaded {n} keys with {} units each in {:.1}s",
                cfg.preload_qty,
                t.elapsed().as_secs_f64()
            );
        }
    }
    let threads = cfg.threads.clamp(1, cfg.connections);
    let recorder = Arc::new(Recorder::new());
    let stop = Arc::new(AtomicBool::new(false));
    let (go_tx, go_rx) = watch::channel(None);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut finished = Vec::with_capacity(threads);
    for t in 0..threads {
        let (done_tx, done_rx) = oneshot::channel();
        let run = ThreadRun {
            t,
            threads,
            cfg: cfg.clone(),
            sched: sched.clone(),
            keys: keys.clone(),
            recorder: recorder.clone(),
            stop: stop.clone(),
            go: go_rx.clone(),
            ready: Ready(Some(ready_tx.clone())),
        };
        std::thread::Builder::new()
            .name(format!("stock-loadgen-{t}"))
            .spawn(move || {
                let _ = done_tx.send(run.run());
            })
            .map_err(|e| format!("cannot start a load generator thread: {e}"))?;
        finished.push(done_rx);
    }
    drop(ready_tx);
    for _ in 0..threads {
        let ready =
            ready_rx.recv().await.unwrap_or_else(|| Err("a load generator thread ended early".into()));
        if let Err(e) = ready {
            // Threads still waiting for the start see it with `stop` set, and end.
            stop.store(true, Relaxed);
            go_tx.send_replace(Some(Instant::now()));
            return Err(e);
        }
    }
    let start = Instant::now();
    let cpu_at_start = process_cpu_seconds();
    go_tx.send_replace(Some(start));
    // Progress, once per second, until the duration is over.
    let mut last_ops = 0;
    let mut tick = tokio::time::interval_at((start + Duration::from_secs(1)).into(), Duration::from_secs(1));
    while start.elapsed() < cfg.duration {
        let left = cfg.duration.saturating_sub(start.elapsed());
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::time::sleep(left) => break,
        }
        if cfg.progress {
            let now = recorder.sum();
            eprintln!(
                "[{:>3.0}s] {:>10} ops/s  errors {}  insufficient {}  p99 so far {} us  slowest this second {} us",
                start.elapsed().as_secs_f64(),
                now.ops - last_ops,
                now.errors.values().sum::<u64>(),
                now.insufficient,
                now.latency().value_at_quantile(0.99),
                recorder.take_slowest()
            );
            last_ops = now.ops;
        }
    }
    stop.store(true, Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    let drained = tokio::time::timeout(cfg.drain_limit, async {
        for done in finished {
            done.await.map_err(|_| "a load generator thread panicked".to_string())??;
        }
        Ok::<(), String>(())
    });
    drained.await.map_err(|_| {
        format!(
            "requests were still unanswered {:.1}s after the run's {:.1}s: the target holds them (a stockd whose \
             log disk is full does) or stopped answering",
            cfg.drain_limit.as_secs_f64(),
            cfg.duration.as_secs_f64()
        )
    })??;
    let client_cpu_s = process_cpu_seconds() - cpu_at_start;
    let all = recorder.sum();
    let histogram = all.latency();
    let Tally {
        late,
        by_kind,
        ops,
        keys,
        insufficient,
        order_units,
        inbound_units,
        errors: errors_by_kind,
        slowest: _,
    } = all;
    let client_cpu_us_per_op = client_cpu_s * 1e6 / ops.max(1) as f64;
    let errors = errors_by_kind.values().sum();
    let report = Report {
        target: cfg.target.to_string(),
        workload: cfg.workload.to_string(),
        ops,
        errors,
        duration_s: elapsed,
        throughput_ops_s: ops as f64 / elapsed,
        keys_per_s: keys as f64 / elapsed,
        client_cpu_us_per_op,
        latency_us: Latency::of(&histogram),
        send_late_us: (!late.is_empty()).then(|| Latency::of(&late)),
        latency_by_kind_us: matches!(cfg.workload, Workload::Mixed { .. }).then(|| {
            Kind::ALL
                .iter()
                .zip(&by_kind)
                .filter(|(_, h)| !h.is_empty())
                .map(|(k, h)| (k.name().to_string(), Latency::of(h)))
                .collect()
        }),
    };
    Ok(Outcome { report, histogram, insufficient, errors_by_kind, order_units, inbound_units })
}

/// One load generator thread: a current-thread runtime that opens its share
/// of the clients (client `c` belongs to thread `c % threads`; they share
/// the thread's connections unless `own_connections`) and runs every worker
/// of those clients. A connection's callers, its writer and its reader thus
/// live on one thread and never wake each other across threads
/// (docs/benchmarks.md, *Client and load generator cost per request*).
struct ThreadRun {
    t: usize,
    threads: usize,
    cfg: Config,
    /// Open loop: every worker's sends (see [`schedule`]).
    sched: Option<Arc<Vec<Sched>>>,
    keys: KeyGen,
    recorder: Arc<Recorder>,
    stop: Arc<AtomicBool>,
    /// The run's start, once every thread has its connections open.
    go: watch::Receiver<Option<Instant>>,
    /// Each thread says once whether it opened its connections.
    ready: Ready,
}

/// A thread's one word on whether its connections are open. Dropped unsaid
/// (the thread failed before, or panicked), it says the thread ended, so
/// the run never waits for a thread that is gone.
struct Ready(Option<tokio::sync::mpsc::UnboundedSender<Result<(), String>>>);

impl Ready {
    fn say(&mut self, r: Result<(), String>) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(r);
        }
    }
}

impl Drop for Ready {
    fn drop(&mut self) {
        self.say(Err("a load generator thread ended before its connections were open".into()));
    }
}

impl ThreadRun {
    fn run(self) -> Result<(), String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot build a load generator runtime: {e}"))?;
        rt.block_on(self.serve())
    }

    async fn serve(mut self) -> Result<(), String> {
        let (t, threads, connections) = (self.t, self.threads, self.cfg.connections);
        let mut conns = Vec::new();
        for _ in (t..connections).step_by(threads) {
            let own = self.cfg.own_connections;
            let opened = match conns.first() {
                // Redis's client keeps no table of shared connections: the
                // thread's first one is cloned (one multiplexed socket).
                Some(first @ Conn::Redis(..)) if !own => Ok(first.clone()),
                _ => Conn::open(&self.cfg.target, own).await,
            };
            match opened {
                Ok(c) => conns.push(c),
                Err(e) => {
                    self.ready.say(Err(e.clone()));
                    return Err(e);
                }
            }
        }
        self.ready.say(Ok(()));
        let start = loop {
            if let Some(start) = *self.go.borrow_and_update() {
                break start;
            }
            if self.go.changed().await.is_err() {
                return Ok(()); // the run was abandoned
            }
        };
        // (worker, caller, its open-loop sends): a worker per caller in a
        // closed loop; in an open loop as [`schedule`] says (a mixed
        // workload's has one per caller and kind). Worker numbers seed the
        // random streams and keep ids apart.
        let workers: Vec<(usize, usize, Option<Sched>)> = match &self.sched {
            Some(s) => s.iter().enumerate().map(|(w, s)| (w, s.caller, Some(*s))).collect(),
            None => (0..connections * self.cfg.pipeline).map(|w| (w, w, None)).collect(),
        };
        let pacer = match self.sched {
            Some(_) => Some(Pacer::start(self.stop.clone())?),
            None => None,
        };
        let id_base = receipt_base(self.cfg.seed);
        let mut tasks = Vec::new();
        for (w, caller, sched) in workers.into_iter().filter(|(_, c, _)| c % connections % threads == t) {
            let worker = Worker {
                w,
                conn: conns[caller % connections / threads].clone(),
                keys: self.keys.clone(),
                recorder: self.recorder.clone(),
                stop: self.stop.clone(),
                cfg: self.cfg.clone(),
                sched,
                pacer: pacer.clone(),
                start,
                id_base,
            };
            tasks.push(tokio::spawn(worker.run()));
        }
        for task in tasks {
            task.await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// One caller: a request at a time, recorded into its thread's tally. In
/// an open loop it sends at evenly spaced intended times, each once the one
/// before is answered, and latency counts from the intended time, so a slow
/// answer is charged to the requests it held up; in a mixed workload each
/// worker sends one kind ([`schedule`]). Tried and not kept: each request a
/// task of its own, sent on time whatever the one before (18-96% more of
/// the load generator's CPU per request, and its own delay in sending
/// became the tail: docs/benchmarks.md, *An open loop of independent
/// requests*).
struct Worker {
    w: usize,
    conn: Conn,
    keys: KeyGen,
    recorder: Arc<Recorder>,
    stop: Arc<AtomicBool>,
    cfg: Config,
    /// Open loop: this worker's sends, and what wakes the worker at each.
    sched: Option<Sched>,
    pacer: Option<Arc<Pacer>>,
    start: Instant,
    id_base: u64,
}

impl Worker {
    async fn run(self) {
        let Worker { w, mut conn, keys, recorder, stop, cfg, sched, pacer, start, id_base } = self;
        let mut rng = Rng::new(cfg.seed.wrapping_add(w as u64 * 7919));
        let mut seq: u64 = 0;
        let mut lines: Vec<Line> = Vec::with_capacity(cfg.lines);
        let mut batch: Vec<Key> = Vec::with_capacity(cfg.batch);
        let mut ahead = keys.ahead(&mut rng);
        // Open loop: evenly spaced intended send times (see [`schedule`]).
        let mut intended = sched.map(|s| start + s.offset);
        // Closed loop: a request is sent when the one before is answered, so
        // that answer's time is the next request's start (one clock read per
        // request; the clock was a tenth of this thread's own code).
        let mut last_done = Instant::now();
        while !stop.load(Relaxed) {
            let (sent_at, late) = match (intended, &pacer) {
                (Some(t), Some(pacer)) => {
                    pacer.until(t).await;
                    if stop.load(Relaxed) {
                        break;
                    }
                    // The load generator's own delay: from when this worker
                    // could send (its time, or its last answer if that came
                    // later: a slow server's share) to now.
                    (t, Some(Instant::now().saturating_duration_since(t.max(last_done))))
                }
                _ => (last_done, None),
            };
            // An open-loop worker of a mixed workload sends one kind only.
            let kind = sched.and_then(|s| s.kind).unwrap_or_else(|| pick(cfg.workload, &mut rng));
            let (res, nkeys, units) = match kind {
                Kind::Query => (conn.query(keys.key_ahead(&mut rng, &mut ahead)).await, 1, 0),
                Kind::Batch => {
                    keys.keys_into(&mut rng, cfg.batch, &mut batch);
                    let r = conn.query_batch(&batch).await.map_or_else(Res::Err, |_| Res::Ok);
                    (r, batch.len() as u64, 0)
                }
                Kind::Order | Kind::Inbound => {
                    seq += 1;
                    let id = id_base | (w as u64) << 32 | seq;
                    keys.distinct_lines(&mut rng, cfg.lines, &mut lines);
                    let units = lines.len() as u64;
                    let r = if kind == Kind::Order {
                        conn.order(id, &lines).await
                    } else {
                        conn.inbound(id, &lines).await
                    };
                    (r, 0, units)
                }
            };
            let done = Instant::now();
            last_done = done;
            let us = done.saturating_duration_since(sent_at).as_micros().max(1) as u64;
            recorder.record(|t| {
                t.by_kind[kind as usize].saturating_record(us);
                if let Some(late) = late {
                    t.late.saturating_record(late.as_micros() as u64);
                }
                t.slowest = t.slowest.max(us);
                t.ops += 1;
                match res {
                    Res::Ok => {
                        t.keys += nkeys;
                        match kind {
                            Kind::Order => t.order_units += units,
                            Kind::Inbound => t.inbound_units += units,
                            _ => {}
                        }
                    }
                    Res::Insufficient => t.insufficient += 1,
                    Res::Err(e) => *t.errors.entry(e).or_default() += 1,
                }
            });
            if let (Some(t), Some(s)) = (intended.as_mut(), sched) {
                *t += s.interval;
            }
        }
    }
}

/// The HdrHistogram percentile distribution (".hgrm" text), values in microseconds.
pub fn hgrm(h: &Histogram<u64>) -> String {
    let mut out = String::from("       Value     Percentile TotalCount 1/(1-Percentile)\n\n");
    let mut total = 0;
    for v in h.iter_quantiles(5) {
        let p = v.quantile_iterated_to();
        total += v.count_since_last_iteration();
        let inv = if p < 1.0 { format!("{:.2}", 1.0 / (1.0 - p)) } else { "inf".into() };
        out.push_str(&format!(
            "{:>12.3} {:>14.12} {:>10} {:>14}\n",
            v.value_iterated_to() as f64,
            p,
            total,
            inv
        ));
    }
    out.push_str(&format!(
        "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]\n#[Max     = {:>12.3}, Total count    = {:>12}]\n#[Value unit: microseconds]\n",
        h.mean(),
        h.stdev(),
        h.max() as f64,
        h.len()
    ));
    out
}

#[cfg(test)]
mod tests;
