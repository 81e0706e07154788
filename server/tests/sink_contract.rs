//! The contract every sink keeps, run against each sink directly with its
//! real downstream system: Redis (redis-server) and Kafka (tansu) always,
//! Cassandra/ScyllaDB when `STOCKD_TEST_CASSANDRA=host:port` names a node
//! (none runs on these machines; the test says SKIPPED then).
//!
//! 1. A fresh system has no cursor; a resync makes it hold every row's level
//!    and confirms the resync's LSN.
//! 2. A batch is delivered and confirmed through its last LSN; the system
//!    holds the levels after it.
//! 3. After a reconnect the sink's cursor is where it was (kept downstream,
//!    or the runner's local one handed back).
//! 4. The same batch again (at least once) changes no level.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::servers::{Kafka, Redis};
use stockd_protocol::{Key, Line};
use stockd_record::{Mutation, Op};
use stockd_sinks::{Batch, Change, Level, Levels, Sink};

type Rows = BTreeMap<(u64, u32), u64>;

fn available(levels: &Levels) -> Rows {
    levels.iter().map(|(k, l)| ((k.item, k.fc), l.available())).collect()
}

/// Rows 1..=3 x centers 1..=2 at LSN 10, then a batch (10, 14] of every kind
/// of change, one of them a layout-like gap (LSN 13 carries no change).
fn fixtures() -> (Levels, Levels, Batch) {
    let rows = (1..=3u64)
        .flat_map(|item| (1..=2u32).map(move |fc| (Key { item, fc }, Level { on_hand: 10 * item, held: 0 })));
    let start = Levels::new(10, rows);
    let mut after = start.clone();
    let mut changes = Vec::new();
    for (lsn, op, lines) in [
        (11, Op::Order { id: 500 }, vec![Line::new(1, 1, 10), Line::new(2, 2, 5)]),
        (12, Op::Reserve { id: 501, ttl_ms: 60_000 }, vec![Line::new(3, 1, 7)]),
        (14, Op::Adjust { before: 30, after: 12, reason: 2 }, vec![Line::new(3, 2, 0)]),
    ] {
        let mutation = Mutation { op, lines: lines.into() };
        let lines = after.apply(lsn, &mutation);
        changes.push(Change { lsn, ts_ms: 1_795_000_000_000 + lsn, mutation, lines });
    }
    (start, after, Batch { after_lsn: 10, through_lsn: 14, changes })
}

/// Delivers (or idles) until the sink confirms `lsn` (Kafka confirms on delivery reports).
fn confirmed(sink: &mut dyn Sink, first: u64, lsn: u64) {
    let (t, mut cursor) = (Instant::now(), first);
    while cursor < lsn {
        assert!(t.elapsed() < Duration::from_secs(30), "{} confirmed {cursor}, not {lsn}", sink.name());
        std::thread::sleep(Duration::from_millis(5));
        cursor = sink.idle().unwrap();
    }
    assert_eq!(cursor, lsn, "{}", sink.name());
}

fn contract(sink: &mut dyn Sink, read: &mut dyn FnMut(&Rows) -> Rows, keeps_cursor_downstream: bool) {
    let (start, after, batch) = fixtures();
    assert_eq!(sink.connect(None).unwrap(), None, "{}: a fresh system has no cursor", sink.name());
    let c = sink.resync(&start).unwrap();
    assert_eq!(c, 10, "{}: a resync confirms its LSN", sink.name());
    assert_eq!(read(&available(&start)), available(&start), "{}: every row after the resync", sink.name());

    let c = sink.deliver(&batch).unwrap();
    confirmed(sink, c, 14);
    let want = available(&after);
    assert_eq!(read(&want), want, "{}: the levels after the batch", sink.name());

    let local = if keeps_cursor_downstream { None } else { Some(14) };
    assert_eq!(sink.connect(local).unwrap(), Some(14), "{}: the cursor survives a reconnect", sink.name());
    let c = sink.deliver(&batch).unwrap();
    confirmed(sink, c, 14);
    assert_eq!(read(&want), want, "{}: a batch delivered twice changes nothing", sink.name());
}

/// The Redis read model's rows of the items in `want`.
fn redis_rows(conn: &mut redis::Connection, want: &Rows) -> Rows {
    let mut out = Rows::new();
    for item in want.keys().map(|(i, _)| *i) {
        let h: BTreeMap<u32, u64> = redis::cmd("HGETALL").arg(format!("stock:{item}")).query(conn).unwrap();
        out.extend(h.into_iter().map(|(fc, v)| ((item, fc), v)));
    }
    out
}

#[test]
fn redis_keeps_the_sink_contract() {
    let redis = Redis::start();
    let mut sink = stockd_sinks::redis::RedisSink::new(&redis.url(), 77).unwrap();
    let mut conn = redis.conn();
    contract(&mut sink, &mut |want| redis_rows(&mut conn, want), true);
    let cursor: u64 = redis::cmd("GET").arg("stockd:77:lsn").query(&mut redis.conn()).unwrap();
    assert_eq!(cursor, 14, "the cursor key moves with the data");
}

/// A call left over from a connection the sink gave up on (sent while
/// Redis stalled, run once it is back) writes nothing: only the latest
/// connection's calls do. Without that, such a call could land between
/// two calls of a newer batch and leave rows at older levels for good.
#[test]
fn redis_refuses_calls_of_a_connection_that_is_no_longer_the_writer() {
    let redis = Redis::start();
    let (start, after, batch) = fixtures();
    let mut conn = redis.conn();
    let mut read = |want: &Rows| redis_rows(&mut conn, want);
    let mut old = stockd_sinks::redis::RedisSink::new(&redis.url(), 78).unwrap();
    assert_eq!(old.connect(None).unwrap(), None);
    assert_eq!(old.resync(&start).unwrap(), 10);
    // The sink reconnects (the runner does so after a timeout); the first
    // connection is still open and its call still comes.
    let mut new = stockd_sinks::redis::RedisSink::new(&redis.url(), 78).unwrap();
    assert_eq!(new.connect(None).unwrap(), Some(10));
    let stale = old.deliver(&batch);
    assert!(
        matches!(stale, Err(stockd_sinks::SinkError::Unavailable(_))),
        "a call of the earlier connection is refused: {stale:?}"
    );
    assert_eq!(read(&available(&start)), available(&start), "and wrote no row");
    assert_eq!(new.deliver(&batch).unwrap(), 14);
    let want = available(&after);
    assert_eq!(read(&want), want, "the latest connection writes");
    assert!(old.deliver(&batch).is_err(), "still refused after the writer moved on");
    assert_eq!(read(&want), want);
}

#[test]
fn kafka_keeps_the_sink_contract() {
    let kafka = Kafka::start();
    let cfg = stockd_sinks::kafka::KafkaConfig {
        brokers: kafka.brokers(),
        topic_prefix: "contract".into(),
        partitions: 2,
        replication: 1,
    };
    let mut sink = stockd_sinks::kafka::KafkaSink::new(cfg);
    let mut read = |want: &Rows| -> Rows {
        let latest = |got: &[(i32, String, serde_json::Value)]| {
            let mut by_key: BTreeMap<(u64, u32), (u64, u64)> = BTreeMap::new();
            for (_, _, v) in got {
                let key = (
                    v["vendor_item_id"].as_u64().unwrap(),
                    v["fulfillment_center_id"].as_u64().unwrap() as u32,
                );
                let (lsn, avail) = (v["lsn"].as_u64().unwrap(), v["available"].as_u64().unwrap());
                if by_key.get(&key).is_none_or(|(l, _)| *l <= lsn) {
                    by_key.insert(key, (lsn, avail));
                }
            }
            by_key.into_iter().map(|(k, (_, a))| (k, a)).collect::<Rows>()
        };
        latest(&kafka.read_until("contract.levels", Duration::from_millis(300), |got| &latest(got) == want))
    };
    contract(&mut sink, &mut read, false);
}

#[test]
fn cassandra_keeps_the_sink_contract() {
    let Ok(node) = std::env::var("STOCKD_TEST_CASSANDRA") else {
        println!(
            "SKIPPED: set STOCKD_TEST_CASSANDRA=host:port to run the Cassandra sink against a real node"
        );
        return;
    };
    use scylla::client::session_builder::SessionBuilder;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let session = rt
        .block_on(SessionBuilder::new().known_node(&node).build())
        .expect("connect to STOCKD_TEST_CASSANDRA");
    // Our own keyspace, dropped at the end: nothing else on the node is touched.
    let ks = format!(
        "stockd_test_{}_{}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos()
    );
    let create = format!(
        "CREATE KEYSPACE {ks} WITH replication = {{'class': 'SimpleStrategy', 'replication_factor': 1}}"
    );
    rt.block_on(session.query_unpaged(create, ())).unwrap();
    let cfg = stockd_sinks::cassandra::CassandraConfig { nodes: vec![node.clone()], keyspace: ks.clone() };
    let mut sink = stockd_sinks::cassandra::CassandraSink::new(cfg, 77).unwrap();
    let mut read = |_: &Rows| -> Rows {
        let q = format!("SELECT vendor_item_id, fulfillment_center_id, available FROM {ks}.stock_by_item");
        let rows = rt.block_on(session.query_unpaged(q, ())).unwrap().into_rows_result().unwrap();
        rows.rows::<(i64, i64, i64)>()
            .unwrap()
            .map(|r| {
                let (item, fc, a) = r.unwrap();
                ((item as u64, fc as u32), a as u64)
            })
            .collect()
    };
    contract(&mut sink, &mut read, true);
    let q = format!(
        "SELECT lsn, type FROM {ks}.stock_movements WHERE vendor_item_id = 1 AND fulfillment_center_id = 1"
    );
    let rows = rt.block_on(session.query_unpaged(q, ())).unwrap().into_rows_result().unwrap();
    let history: Vec<(i64, String)> = rows.rows::<(i64, String)>().unwrap().map(Result::unwrap).collect();
    assert_eq!(history, vec![(11, "order".to_string())], "row 1:1's movements, newest first");
    rt.block_on(session.query_unpaged(format!("DROP KEYSPACE {ks}"), ())).unwrap();
}
