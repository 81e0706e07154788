//! The Prometheus endpoint over real HTTP: the figures move with the work done.

mod common;

use common::*;
use stockd_client::Line;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_the_server_did() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 2);
    cfg.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let srv = stockd::start(cfg).unwrap();
    let addr = srv.metrics_addr.expect("metrics are served");
    let c = client(&srv).await;
    c.inbound(1, &[Line::new(1, 1, 5), Line::new(2, 1, 5)]).await.unwrap();
    c.inbound(1, &[Line::new(1, 1, 5), Line::new(2, 1, 5)]).await.unwrap();
    let _ = c.order(2, &[Line::new(1, 1, 50)]).await;
    let (head, body) = get(addr, "/metrics");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("application/openmetrics-text"), "{head}");
    let outcome = |o: &str| -> f64 {
        (0..2)
            .map(|s| sample(&body, &format!("stockd_mutations_total{{shard=\"{s}\",outcome=\"{o}\"}}")))
            .sum()
    };
    assert_eq!((outcome("ok"), outcome("duplicate"), outcome("insufficient_stock")), (1.0, 1.0, 1.0));
    let rows: f64 = (0..2).map(|s| sample(&body, &format!("stockd_rows{{shard=\"{s}\"}}"))).sum();
    assert_eq!(rows, 2.0);
    assert_eq!(sample(&body, "stockd_wal_fsync_seconds_count"), 1.0, "one group commit: the inbound");
    assert!(sample(&body, "stockd_wal_batch_records_count") >= 1.0);
    assert_eq!(sample(&body, "stockd_wal_wait_seconds_count"), 1.0, "one record waited: the inbound");
    assert_eq!(sample(&body, "stockd_wal_stalled"), 0.0, "the log's disk has room");
    assert!(
        sample(&body, "stockd_wal_wait_seconds_sum") >= sample(&body, "stockd_wal_fsync_seconds_sum"),
        "a record waits at least for the write + fdatasync that makes it durable"
    );
    assert!(body.contains("stockd_wal_fsync_seconds_bucket{le=\"0.001\"}"), "{body}");
    assert!(body.trim_end().ends_with("# EOF"), "a complete OpenMetrics exposition");
    let (head, _) = get(addr, "/other");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    drop(c);
    srv.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_each_sink_and_its_backlog() {
    let redis = common::servers::Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 2);
    cfg.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.sinks.redis_url = Some(redis.url());
    let srv = stockd::start(cfg).unwrap();
    let addr = srv.metrics_addr.expect("metrics are served");
    let c = client(&srv).await;
    let a = c.inbound(1, &[Line::new(1, 1, 5)]).await.unwrap();
    let caught_up = eventually(std::time::Duration::from_secs(10), || async {
        let (_, body) = get(addr, "/metrics");
        sample(&body, "stockd_sink_lag_records{sink=\"redis\"}") == 0.0
            && sample(&body, "stockd_sink_cursor{sink=\"redis\"}") == a.lsn() as f64
    })
    .await;
    let (_, body) = get(addr, "/metrics");
    assert!(caught_up, "the redis sink confirms LSN {}:\n{body}", a.lsn());
    assert_eq!(sample(&body, "stockd_sink_lag_bytes{sink=\"redis\"}"), 0.0);
    assert_eq!(sample(&body, "stockd_sink_connected{sink=\"redis\"}"), 1.0);
    assert_eq!(sample(&body, "stockd_sink_delivered_total{sink=\"redis\"}"), 1.0);
    assert_eq!(
        sample(&body, "stockd_sink_resyncs_total{sink=\"redis\"}"),
        1.0,
        "a fresh redis starts with a resync"
    );
    let stats = c.stats().await.unwrap();
    assert!(stats.contains(&("sink_redis_cursor".to_string(), a.lsn())), "{stats:?}");
    drop(c);
    srv.shutdown();
}
