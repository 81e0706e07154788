//! stockd's own Prometheus endpoint (`--metrics-listen HOST:PORT`, `GET
//! /metrics`), encoded by the `prometheus-client` crate from the counters
//! the server keeps anyway: per-shard operations by outcome, queue depths,
//! connections, rows and ids; the log writer's fsync time, records and
//! bytes per group commit; snapshot durations; the last recovery.
//!
//! The endpoint is a plain blocking HTTP/1.1 responder on its own thread:
//! one request per connection, a few per minute. It never touches a shard.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use stockd_persistence::histogram::{AtomicHistogram, HistogramSnapshot};
use stockd_sinks::SinkStatus;

use crate::shard::{ShardStats, Shared};

/// Bucket bounds of a snapshot set's write time, in milliseconds.
pub const SNAPSHOT_MS_BUCKETS: &[u64] = &[10, 50, 100, 250, 500, 1_000, 2_500, 10_000, 60_000];
/// How often the endpoint's thread looks at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(100);
/// Largest request head read.
const MAX_REQUEST_BYTES: usize = 8 << 10;

/// What the server records for the endpoint besides the shards' counters.
pub struct Observed {
    /// Each snapshot set, from its first part's arrival to its manifest.
    pub snapshot_ms: AtomicHistogram,
    pub recovery_ms: AtomicU64,
    pub recovered_records: AtomicU64,
}

impl Default for Observed {
    fn default() -> Self {
        Observed {
            snapshot_ms: AtomicHistogram::new(SNAPSHOT_MS_BUCKETS),
            recovery_ms: AtomicU64::new(0),
            recovered_records: AtomicU64::new(0),
        }
    }
}

/// A histogram read from an [`AtomicHistogram`], scaled (e.g. micros to seconds).
struct HistogramRead(HistogramSnapshot, f64);

impl std::fmt::Debug for HistogramRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "histogram")
    }
}

impl EncodeMetric for HistogramRead {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let ((sum, count, buckets), scale) = (&self.0, self.1);
        let scaled: Vec<(f64, u64)> = buckets.iter().map(|(b, c)| (b * scale, *c)).collect();
        encoder.encode_histogram::<NoLabelSet>(*sum as f64 * scale, *count, &scaled, None)
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// A per-shard series: name, help, and how to read it from shard i.
type ShardCounter = (&'static str, &'static str, fn(&ShardStats) -> &AtomicU64);
type ShardGauge<'a> = (&'static str, &'static str, Box<dyn Fn(usize, &ShardStats) -> u64 + 'a>);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShardLabel {
    shard: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SinkLabel {
    sink: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    shard: String,
    outcome: String,
}

/// The whole exposition, read now.
pub fn render(shared: &Shared, observed: &Observed) -> String {
    let mut registry = Registry::with_prefix("stockd");
    register_shards(&mut registry, shared);
    register_sinks(&mut registry, shared);
    let w = &shared.wal.stats;
    let histogram = |h: &AtomicHistogram, scale: f64| HistogramRead(h.snapshot(), scale);
    registry.register_with_unit(
        "wal_fsync",
        "Write + fdatasync time of each group commit",
        Unit::Seconds,
        histogram(&w.sync_micros_hist, 1e-6),
    );
    registry.register_with_unit(
        "wal_wait",
        "Each record's wait from its hand-over to the log writer to the end of the fdatasync that made it durable (the group commit under way, then its own)",
        Unit::Seconds,
        histogram(&w.wait_micros_hist, 1e-6),
    );
    registry.register("wal_batch_records", "Records per group commit", histogram(&w.batch_records_hist, 1.0));
    registry.register_with_unit(
        "wal_batch",
        "Bytes per group commit",
        Unit::Bytes,
        histogram(&w.batch_bytes_hist, 1.0),
    );
    registry.register_with_unit(
        "snapshot",
        "Time to take a snapshot set, from its mark (the shards begin, in paced turns) to the manifest",
        Unit::Seconds,
        histogram(&observed.snapshot_ms, 1e-3),
    );
    let gauge = |v: u64| {
        let g: Gauge = Gauge::default();
        g.set(v as i64);
        g
    };
    let recovery_s: Gauge<f64, AtomicU64> = Gauge::default();
    recovery_s.set(observed.recovery_ms.load(Relaxed) as f64 / 1e3);
    registry.register_with_unit(
        "recovery",
        "Time the last start spent recovering",
        Unit::Seconds,
        recovery_s,
    );
    registry.register(
        "recovered_records",
        "Log records the last start replayed",
        gauge(observed.recovered_records.load(Relaxed)),
    );
    registry.register(
        "wal_stalled",
        "1 while the log writer waits for room on the log's disk (mutations are refused meanwhile)",
        gauge(u64::from(w.stalled.load(Relaxed))),
    );
    let stalls: Counter = Counter::default();
    stalls.inc_by(w.stalls.load(Relaxed));
    registry.register(
        "wal_stalls",
        "Times the log writer found no room on the log's disk and waited",
        stalls,
    );
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry).expect("text encoding into a String");
    out
}

/// Per-shard counters and gauges, from the shards' atomics.
fn register_shards(registry: &mut Registry, shared: &Shared) {
    let counters: [ShardCounter; 4] = [
        ("queries", "Read requests answered", |s| &s.queries),
        ("keys_read", "Rows read, over all read requests", |s| &s.keys_read),
        ("forwarded", "Requests handed to the shard that owns them", |s| &s.forwarded),
        ("holds_expired", "Holds released by the server at their deadline", |s| &s.holds_expired),
    ];
    for (name, help, field) in counters {
        let family = Family::<ShardLabel, Counter>::default();
        for (i, s) in shared.stats.iter().enumerate() {
            family.get_or_create(&ShardLabel { shard: i.to_string() }).inc_by(field(s).load(Relaxed));
        }
        registry.register(name, help, family);
    }
    let outcomes = Family::<OutcomeLabel, Counter>::default();
    for (i, s) in shared.stats.iter().enumerate() {
        for (outcome, value) in [
            ("ok", &s.mutations_ok),
            ("insufficient_stock", &s.refused_insufficient),
            ("duplicate", &s.duplicates),
            ("overloaded", &s.overloaded),
            ("error", &s.errors),
        ] {
            let label = OutcomeLabel { shard: i.to_string(), outcome: outcome.to_string() };
            outcomes.get_or_create(&label).inc_by(value.load(Relaxed));
        }
    }
    registry.register("mutations", "Mutations answered, by outcome", outcomes);
    let gauges: [ShardGauge; 6] = [
        ("connections", "Client connections open", Box::new(|_, s| s.connections.load(Relaxed))),
        ("rows", "Rows held", Box::new(|_, s| s.rows.load(Relaxed))),
        ("ids", "Order, hold and receipt ids remembered", Box::new(|_, s| s.ids.load(Relaxed))),
        (
            "mutations_in_flight",
            "Mutations coordinated and not yet answered",
            Box::new(|_, s| s.txns_open.load(Relaxed)),
        ),
        (
            "forward_queue_depth",
            "Forwarded requests waiting for the shard",
            Box::new(|i, _| shared.mailboxes[i].depths().0 as u64),
        ),
        (
            "internal_queue_depth",
            "Votes, commits and marks waiting for the shard",
            Box::new(|i, _| shared.mailboxes[i].depths().1 as u64),
        ),
    ];
    for (name, help, value) in gauges {
        let family = Family::<ShardLabel, Gauge>::default();
        for (i, s) in shared.stats.iter().enumerate() {
            family.get_or_create(&ShardLabel { shard: i.to_string() }).set(value(i, s) as i64);
        }
        registry.register(name, help, family);
    }
}

/// Per sink: where it is and how far behind the log.
fn register_sinks(registry: &mut Registry, shared: &Shared) {
    type SinkGauge = (&'static str, &'static str, fn(&SinkStatus) -> u64);
    let gauges: [SinkGauge; 4] = [
        ("sink_cursor", "Highest LSN the sink has confirmed", |s| s.cursor.load(Relaxed)),
        ("sink_lag_records", "Durable log records the sink has not confirmed", SinkStatus::lag_records),
        ("sink_lag_bytes", "Durable log bytes the sink has not confirmed", SinkStatus::lag_bytes),
        ("sink_connected", "1 while the sink reaches its downstream system", |s| {
            s.connected.load(Relaxed) as u64
        }),
    ];
    for (name, help, value) in gauges {
        let family = Family::<SinkLabel, Gauge>::default();
        for s in &shared.sinks {
            family.get_or_create(&SinkLabel { sink: s.name.to_string() }).set(value(s) as i64);
        }
        registry.register(name, help, family);
    }
    for s in &shared.sinks {
        let labelled = registry.sub_registry_with_label(("sink".into(), s.name.into()));
        labelled.register_with_unit(
            "sink_delivery",
            "Per batch, from its oldest record's commit to the sink's confirmation",
            Unit::Seconds,
            HistogramRead(s.delivery_ms.snapshot(), 1e-3),
        );
    }
    type SinkCounter = (&'static str, &'static str, fn(&SinkStatus) -> u64);
    let counters: [SinkCounter; 3] = [
        ("sink_delivered", "Mutations handed to the sink (again after a reconnect)", |s| {
            s.delivered.load(Relaxed)
        }),
        ("sink_resyncs", "Full resyncs of every row's level", |s| s.resyncs.load(Relaxed)),
        ("sink_errors", "Failed connects and deliveries", |s| s.errors.load(Relaxed)),
    ];
    for (name, help, value) in counters {
        let family = Family::<SinkLabel, Counter>::default();
        for s in &shared.sinks {
            family.get_or_create(&SinkLabel { sink: s.name.to_string() }).inc_by(value(s));
        }
        registry.register(name, help, family);
    }
}

/// Serves `GET /metrics` on `addr` until `shared.stop` is set.
pub fn serve(
    addr: SocketAddr,
    shared: Arc<Shared>,
    observed: Arc<Observed>,
) -> Result<(SocketAddr, JoinHandle<()>), String> {
    let listener = TcpListener::bind(addr).map_err(|e| format!("--metrics-listen {addr}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let thread = std::thread::Builder::new()
        .name("stockd-metrics".into())
        .spawn(move || {
            while !shared.stop.load(Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => answer(stream, &shared, &observed),
                    Err(_) => std::thread::sleep(STOP_POLL),
                }
            }
        })
        .map_err(|e| e.to_string())?;
    Ok((local, thread))
}

fn answer(mut stream: TcpStream, shared: &Shared, observed: &Observed) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut head = Vec::new();
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST_BYTES {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&chunk[..n]),
        }
    }
    let (status, content_type, body) =
        if head.starts_with(b"GET /metrics ") || head.starts_with(b"GET /metrics?") {
            ("200 OK", "application/openmetrics-text; version=1.0.0; charset=utf-8", render(shared, observed))
        } else {
            ("404 Not Found", "text/plain", "stockd serves only GET /metrics here\n".to_string())
        };
    let mut response = String::new();
    let _ = write!(
        response,
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes());
}
