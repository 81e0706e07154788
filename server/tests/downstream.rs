//! The log flows downstream: real stockd binary, real redis-server, real
//! Kafka-protocol broker (tansu), all on 127.0.0.1 and started here.
//!
//! What must hold after any run: every committed mutation's LSN is in Kafka
//! (exactly once without a crash; after a kill -9 only LSNs above the saved
//! cursor come twice), in LSN order per key, with the right fields; the last
//! level per row in Kafka and the Redis read model equal stockd's state.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use common::servers::{Kafka, Redis};
use common::{free_port, Daemon};
use serde_json::Value;
use stockd_client::{Client, Line};
use stockd_persistence::wal;
use stockd_record::{LogRecord, Mutation, Op};

const ITEMS: u64 = 24;
const CENTERS: u32 = 2;

fn sink_args(kafka: &Kafka, redis: &Redis) -> Vec<String> {
    vec![
        "--kafka-brokers".into(),
        kafka.brokers(),
        "--kafka-partitions".into(),
        "3".into(),
        "--redis-url".into(),
        redis.url(),
    ]
}

/// A broker, a Redis and a data directory, and stockd's flags for them.
fn downstream() -> (Kafka, Redis, tempfile::TempDir, Vec<String>) {
    let (kafka, redis) = (Kafka::start(), Redis::start());
    let args = sink_args(&kafka, &redis);
    (kafka, redis, tempfile::tempdir().unwrap(), args)
}

/// Everything Kafka holds, against the log of the stopped server and its
/// final state `want`; returns how many LSNs came twice (only above `cursor`).
fn check_kafka(kafka: &Kafka, dir: &Path, want: &BTreeMap<(u64, u32), u64>, cursor: u64) -> (usize, usize) {
    let log = logged(dir);
    let dups = check_events(kafka, &log, cursor);
    check_levels_exact(kafka, &log);
    same_rows("kafka levels", &kafka_levels(kafka, &log), want);
    (log.len(), dups)
}

fn spawn(dir: &Path, port: u16, args: &[String], more: &[&str]) -> Daemon {
    let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
    all.extend_from_slice(more);
    Daemon::spawn(dir, port, &all)
}

/// A deterministic mix of every kind of mutation (some refused), ids from `first_id`.
async fn workload(c: &Client, first_id: u64, ops: u64) {
    let mut x = first_id.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut rnd = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let mut holds = Vec::new();
    let mut orders = Vec::new();
    for i in 0..ops {
        let id = first_id + i;
        let line = |r: &mut dyn FnMut(u64) -> u64, max: u64| {
            Line::new(1 + r(ITEMS), r(CENTERS as u64) as u32, 1 + r(max) as u32)
        };
        match rnd(10) {
            0 | 1 => {
                let _ = c.inbound(id, &[line(&mut rnd, 20)]).await;
            }
            2..=4 => {
                let n = 1 + rnd(3);
                let lines: Vec<Line> = (0..n).map(|_| line(&mut rnd, 4)).collect();
                if c.order(id, &lines).await.is_ok() {
                    orders.push(id);
                }
            }
            5 => {
                let ttl = if rnd(3) == 0 { 30 } else { 60_000 };
                if c.reserve(id, ttl, &[line(&mut rnd, 3)]).await.is_ok() {
                    holds.push(id);
                }
            }
            6 => {
                if let Some(h) = holds.pop() {
                    let _ = c.confirm(h).await;
                }
            }
            7 => {
                if let Some(h) = holds.pop() {
                    let _ = c.release(h).await;
                }
            }
            8 => {
                if let Some(o) = orders.pop() {
                    let _ = c.cancel(o).await;
                }
            }
            _ => {
                let _ = c.adjust(1 + rnd(ITEMS), rnd(CENTERS as u64) as u32, rnd(40), 1).await;
            }
        }
    }
}

fn stat(stats: &[(String, u64)], name: &str) -> u64 {
    stats.iter().find(|(n, _)| n == name).map(|(_, v)| *v).unwrap_or_else(|| panic!("STATS has no {name}"))
}

/// Waits until both sinks have confirmed everything durable (at most
/// `limit`), after the workload's short holds (30 ms) have expired: their
/// expiry records come from the server, after the workload is done.
async fn caught_up(c: &Client, limit: Duration) {
    caught_up_on(c, &["kafka", "redis"], limit).await
}

async fn caught_up_on(c: &Client, sinks: &[&str], limit: Duration) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    loop {
        let s = c.stats().await.unwrap();
        if sinks.iter().all(|n| stat(&s, &format!("sink_{n}_lag_records")) == 0) {
            return;
        }
        assert!(t.elapsed() < limit, "sinks did not catch up: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// stockd's available per row, via its own queries.
async fn state(c: &Client) -> BTreeMap<(u64, u32), u64> {
    let mut out = BTreeMap::new();
    for item in 1..=ITEMS {
        for (fc, available) in c.query_item(item).await.unwrap() {
            out.insert((item, fc), available);
        }
    }
    out
}

fn redis_state(redis: &Redis) -> BTreeMap<(u64, u32), u64> {
    let mut conn = redis.conn();
    let mut out = BTreeMap::new();
    for item in 1..=ITEMS {
        let h: HashMap<u32, u64> =
            redis::cmd("HGETALL").arg(format!("stock:{item}")).query(&mut conn).unwrap();
        out.extend(h.into_iter().map(|(fc, v)| ((item, fc), v)));
    }
    out
}

/// The mutations in the log of a stopped server, by LSN.
fn logged(dir: &Path) -> BTreeMap<u64, Mutation> {
    let mut out = BTreeMap::new();
    wal::scan(dir, 0, |r| {
        if let Ok(LogRecord::Mutation(m)) = LogRecord::decode(r.payload) {
            out.insert(r.lsn, m);
        }
    })
    .unwrap();
    out
}

fn is_derived(v: &Value) -> bool {
    matches!(v["type"].as_str(), Some("sold_out" | "restocked"))
}

/// Checks the events topic against the log; returns how many LSNs came more than once.
fn check_events(kafka: &Kafka, log: &BTreeMap<u64, Mutation>, duplicates_above: u64) -> usize {
    let events = kafka.read_until("stock.events", Duration::from_millis(500), |got| {
        let lsns: std::collections::HashSet<u64> =
            got.iter().filter(|(_, _, v)| !is_derived(v)).filter_map(|(_, _, v)| v["lsn"].as_u64()).collect();
        log.keys().all(|l| lsns.contains(l))
    });
    let mut seen: BTreeMap<u64, usize> = BTreeMap::new();
    let mut last_per_key: HashMap<String, u64> = HashMap::new();
    for (_, key, v) in &events {
        assert_eq!(v["schema_version"], 1);
        let lsn = v["lsn"].as_u64().unwrap();
        // In LSN order per key (a resend after a crash starts over at the cursor).
        if let Some(prev) = last_per_key.insert(key.clone(), lsn) {
            // A derived event shares its mutation's LSN (and, for an adjust, its key).
            assert!(lsn >= prev || lsn > duplicates_above, "key {key}: LSN {lsn} after {prev}");
        }
        if is_derived(v) {
            continue;
        }
        *seen.entry(lsn).or_default() += 1;
        let m = log
            .get(&lsn)
            .unwrap_or_else(|| panic!("event for LSN {lsn}, which is no mutation in the log: {v}"));
        let want_type = stockd_sinks::events::event_type(&m.op);
        assert_eq!(v["type"], want_type, "LSN {lsn}");
        let lines = v["lines"].as_array().unwrap();
        assert_eq!(lines.len(), m.lines.len(), "LSN {lsn}");
        for (l, want) in lines.iter().zip(&m.lines) {
            assert_eq!(l["vendor_item_id"], want.key.item);
            assert_eq!(l["fulfillment_center_id"], want.key.fc);
            assert_eq!(l["quantity"], want.qty);
        }
        match m.op {
            Op::Adjust { .. } => assert_eq!(key, &format!("{}:{}", m.lines[0].key.item, m.lines[0].key.fc)),
            _ => {
                assert_eq!(v["id"].as_u64(), Some(m.owner_id()), "LSN {lsn}");
                assert_eq!(key, &m.owner_id().to_string());
            }
        }
    }
    let missing: Vec<u64> = log.keys().filter(|l| !seen.contains_key(l)).copied().collect();
    assert!(
        missing.is_empty(),
        "{} committed LSNs never reached Kafka, first {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let twice: Vec<u64> = seen.iter().filter(|(_, n)| **n > 1).map(|(l, _)| *l).collect();
    assert!(
        twice.iter().all(|l| *l > duplicates_above),
        "duplicates at or below the cursor {duplicates_above}: {twice:?}"
    );
    twice.len()
}

/// Every row's (on hand, held) right after each record that changed it, from the whole log.
fn levels_after(log: &BTreeMap<u64, Mutation>) -> HashMap<(String, u64), (u64, u64)> {
    let mut rows: HashMap<String, (i64, i64)> = HashMap::new();
    let mut out = HashMap::new();
    for (lsn, m) in log {
        for d in m.deltas() {
            let key = format!("{}:{}", d.key.item, d.key.fc);
            let row = rows.entry(key.clone()).or_default();
            (row.0, row.1) = (row.0 + d.on_hand, row.1 + d.held);
            out.insert((key, *lsn), (row.0 as u64, row.1 as u64));
        }
    }
    out
}

/// Every level message equals the level the log gives its row at its LSN.
fn check_levels_exact(kafka: &Kafka, log: &BTreeMap<u64, Mutation>) {
    let want = levels_after(log);
    let mut checked = 0;
    for (_, key, v) in read_levels(kafka, log) {
        let lsn = v["lsn"].as_u64().unwrap();
        if let Some(&(on_hand, held)) = want.get(&(key.clone(), lsn)) {
            assert_eq!(
                (v["on_hand"].as_u64().unwrap(), v["held"].as_u64().unwrap()),
                (on_hand, held),
                "{key} at LSN {lsn}: {v}"
            );
            checked += 1;
        }
    }
    assert!(checked > 0);
}

/// The levels topic, read until every row's last change in the log is in.
fn read_levels(kafka: &Kafka, log: &BTreeMap<u64, Mutation>) -> Vec<(i32, String, Value)> {
    let mut last: HashMap<String, u64> = HashMap::new();
    for (lsn, m) in log {
        for l in &m.lines {
            last.insert(format!("{}:{}", l.key.item, l.key.fc), *lsn);
        }
    }
    kafka.read_until("stock.levels", Duration::from_millis(300), |got| {
        let mut seen: HashMap<&str, u64> = HashMap::new();
        for (_, k, v) in got {
            let e = seen.entry(k.as_str()).or_default();
            *e = (*e).max(v["lsn"].as_u64().unwrap_or(0));
        }
        last.iter().all(|(k, lsn)| seen.get(k.as_str()).is_some_and(|s| s >= lsn))
    })
}

/// The last level per row in the levels topic, by LSN.
fn kafka_levels(kafka: &Kafka, log: &BTreeMap<u64, Mutation>) -> BTreeMap<(u64, u32), u64> {
    let mut latest: HashMap<String, (u64, u64, u64, u32)> = HashMap::new();
    for (_, key, v) in read_levels(kafka, log) {
        let lsn = v["lsn"].as_u64().unwrap();
        let entry = (
            lsn,
            v["available"].as_u64().unwrap(),
            v["vendor_item_id"].as_u64().unwrap(),
            v["fulfillment_center_id"].as_u64().unwrap() as u32,
        );
        let (on_hand, held) = (v["on_hand"].as_u64().unwrap(), v["held"].as_u64().unwrap());
        assert!(held <= on_hand, "held above on hand: {v}");
        assert_eq!(v["available"].as_u64().unwrap(), on_hand - held);
        if latest.get(&key).is_none_or(|e| e.0 <= lsn) {
            latest.insert(key, entry);
        }
    }
    latest.into_values().map(|(_, available, item, fc)| ((item, fc), available)).collect()
}

/// Rows that exist with 0 available may be absent downstream only if they never had stock.
fn same_rows(name: &str, got: &BTreeMap<(u64, u32), u64>, want: &BTreeMap<(u64, u32), u64>) {
    for (k, v) in want {
        assert_eq!(got.get(k).copied().unwrap_or(0), *v, "{name}: row {k:?}");
    }
    for (k, v) in got {
        assert_eq!(want.get(k).copied().unwrap_or(0), *v, "{name}: row {k:?} that stockd does not report");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_committed_mutation_reaches_kafka_once_and_redis_matches_row_for_row() {
    let (kafka, redis, dir, args) = downstream();
    let d = spawn(dir.path(), free_port(), &args, &["--shards", "2"]);
    let c = d.client().await;
    c.inbound(1, &[Line::new(1, 0, 1)]).await.unwrap();
    c.reserve(2, 1, &[Line::new(1, 0, 1)]).await.unwrap(); // expires: a record the server makes
    workload(&c, 1_000, 1_500).await;
    caught_up(&c, Duration::from_secs(30)).await;
    let want = state(&c).await;
    same_rows("redis", &redis_state(&redis), &want);
    drop(c);
    d.terminate();
    let log = logged(dir.path());
    assert!(log.len() > 1_000, "the workload commits most of its mutations: {}", log.len());
    assert!(
        log.values().any(|m| matches!(m.op, Op::Release { expired: true, .. })),
        "an expiry is in the mix"
    );
    let (_, dups) = check_kafka(&kafka, dir.path(), &want, u64::MAX);
    assert_eq!(dups, 0, "without a crash every LSN arrives exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_leaves_no_gap_and_duplicates_only_above_the_cursor() {
    let (kafka, redis, dir, args) = downstream();
    let port = free_port();
    let d = spawn(dir.path(), port, &args, &["--shards", "2"]);
    let c = d.client().await;
    workload(&c, 1_000, 800).await;
    // Kill it while the sinks are busy with a burst.
    let load = {
        let c = c.clone();
        tokio::spawn(async move { workload(&c, 100_000, 100_000).await })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    d.kill_9();
    let _ = load.await;
    let saved: u64 =
        std::fs::read_to_string(dir.path().join("sink-kafka.cursor")).unwrap().trim().parse().unwrap();
    let d = spawn(dir.path(), port, &args, &["--shards", "2"]);
    let c = d.client().await;
    workload(&c, 300_000, 300).await;
    caught_up(&c, Duration::from_secs(60)).await;
    let want = state(&c).await;
    same_rows("redis", &redis_state(&redis), &want);
    drop(c);
    d.terminate();
    let (logged, dups) = check_kafka(&kafka, dir.path(), &want, saved);
    println!("kill -9: {logged} mutations logged, kafka cursor saved at {saved}, {dups} LSNs delivered twice (all above it)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_or_redis_away_for_10_s_only_grows_the_backlog_and_a_flushed_redis_is_resynced() {
    let (kafka, redis, dir, args) = downstream();
    let d = spawn(dir.path(), free_port(), &args, &["--shards", "2"]);
    let c = d.client().await;
    workload(&c, 1_000, 300).await;
    caught_up(&c, Duration::from_secs(30)).await;

    kafka.pause();
    redis.pause();
    let t = Instant::now();
    let mut round = 0;
    let mut slowest = Duration::ZERO;
    while t.elapsed() < Duration::from_secs(10) {
        let r = Instant::now();
        workload(&c, 10_000 + round * 1_000, 100).await;
        slowest = slowest.max(r.elapsed());
        round += 1;
    }
    let s = c.stats().await.unwrap();
    let (kafka_lag, redis_lag) = (stat(&s, "sink_kafka_lag_records"), stat(&s, "sink_redis_lag_records"));
    println!("10 s without broker and redis: {round} rounds of 100 mutations (slowest {slowest:?}), lag kafka {kafka_lag} redis {redis_lag} records, {} / {} bytes",
        stat(&s, "sink_kafka_lag_bytes"), stat(&s, "sink_redis_lag_bytes"));
    assert!(round >= 10, "shards kept answering: {round} rounds in 10 s");
    assert!(kafka_lag > 500 && redis_lag > 500, "the backlog grew: {s:?}");
    assert!(
        stat(&s, "sink_kafka_lag_bytes") > 500 * 24 && stat(&s, "sink_redis_lag_bytes") > 500 * 24,
        "{s:?}"
    );
    kafka.resume();
    redis.resume();
    caught_up(&c, Duration::from_secs(60)).await;
    let want = state(&c).await;
    same_rows("redis after the pause", &redis_state(&redis), &want);

    // Our own redis-server: flushing it is ours to do.
    let resyncs = stat(&c.stats().await.unwrap(), "sink_redis_resyncs");
    redis::cmd("FLUSHALL").query::<()>(&mut redis.conn()).unwrap();
    let t = Instant::now();
    while stat(&c.stats().await.unwrap(), "sink_redis_resyncs") == resyncs {
        assert!(t.elapsed() < Duration::from_secs(20), "a flushed redis is noticed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    workload(&c, 50_000, 200).await;
    caught_up(&c, Duration::from_secs(30)).await;
    let want = state(&c).await;
    same_rows("redis after FLUSHALL", &redis_state(&redis), &want);
    drop(c);
    d.terminate();
    let (_, dups) = check_kafka(&kafka, dir.path(), &want, u64::MAX);
    assert_eq!(dups, 0, "a broker that was away gets every LSN once");
}

/// Segments wholly at or below `lsn`: those a snapshot at `lsn` alone would let go.
fn segments_covered_by(dir: &Path, lsn: u64) -> usize {
    let segs = wal::list_segments(dir).unwrap();
    segs.windows(2).filter(|w| w[1].0 <= lsn + 1).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_stay_while_a_sink_is_behind_and_go_once_it_has_caught_up() {
    let redis = Redis::start();
    let redis_port = redis.port;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let args = vec!["--redis-url".to_string(), redis.url(), "--snapshot-interval-secs".into(), "1".into()];
    let mut d = spawn(dir.path(), port, &args, &["--shards", "2"]);
    let c = d.client().await;
    workload(&c, 1_000, 200).await;
    caught_up_on(&c, &["redis"], Duration::from_secs(30)).await;
    drop(c);
    drop(redis); // away: the sink's cursor stops
    let manifest_lsn =
        || stockd_persistence::snapshot::read_manifest(dir.path()).unwrap().map_or(0, |m| m.lsn);
    for round in 0..3u64 {
        let before = manifest_lsn();
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        let c = d.client().await;
        workload(&c, 10_000 + round * 1_000, 150).await; // a snapshot falls due
        let t = Instant::now();
        while manifest_lsn() == before {
            assert!(t.elapsed() < Duration::from_secs(10), "a snapshot is taken");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(c);
        d.terminate(); // every start begins a segment
        d = spawn(dir.path(), port, &args, &["--shards", "2"]);
    }
    let snap = stockd_persistence::snapshot::read_manifest(dir.path()).unwrap().unwrap().lsn;
    let kept = segments_covered_by(dir.path(), snap);
    println!("redis away: snapshot at LSN {snap}, {kept} segments behind it kept for the sink");
    assert!(kept >= 2, "segments the snapshot covers stay while the sink needs them");

    let redis = Redis::start_on(redis_port); // an empty redis: the sink resyncs
    let c = d.client().await;
    caught_up_on(&c, &["redis"], Duration::from_secs(30)).await;
    let t = Instant::now();
    while segments_covered_by(dir.path(), snap) > 0 {
        assert!(t.elapsed() < Duration::from_secs(10), "segments go once the sink has caught up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    same_rows("redis", &redis_state(&redis), &state(&c).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_cassandra_is_retried_loudly_and_stockd_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let nowhere = format!("127.0.0.1:{}", free_port()); // nothing listens there
    let d = Daemon::spawn(dir.path(), free_port(), &["--cassandra-nodes", &nowhere, "--shards", "1"]);
    let c = d.client().await;
    c.inbound(1, &[Line::new(1, 1, 5)]).await.unwrap();
    c.order(2, &[Line::new(1, 1, 2)]).await.unwrap();
    let t = Instant::now();
    loop {
        let s = c.stats().await.unwrap();
        if stat(&s, "sink_cassandra_errors") >= 2 {
            assert_eq!(stat(&s, "sink_cassandra_connected"), 0);
            assert!(stat(&s, "sink_cassandra_lag_records") >= 2, "the backlog waits in the log: {s:?}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "connect failures are counted: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(c.query(1, 1).await.unwrap(), 3, "stockd keeps serving");
}

#[test]
fn a_bad_cassandra_keyspace_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stockd"))
        .args(["--listen", &format!("127.0.0.1:{}", free_port()), "--shard-port-base", "0"])
        .arg("--data-dir")
        .arg(dir.path())
        // A free port: the flags are refused before anything would connect anyway.
        .args([
            "--cassandra-nodes",
            &format!("127.0.0.1:{}", free_port()),
            "--cassandra-keyspace",
            "stock;drop",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--cassandra-keyspace \"stock;drop\": letters, digits and _ only"), "{err}");
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "nothing written to the data dir");
}
