//! A short mixed run against a real stockd and a real redis-server, both on
//! 127.0.0.1: no unexpected errors, and every unit accounted for.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use stock_loadgen::{run, Config, Conn, KeyGen, Target, Workload};

struct Redis(Child);

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_redis() -> (Redis, u16) {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server must be installed (apt-get install redis-server; .ci/run does it)");
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(10), "redis-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    (Redis(child), port)
}

/// A short mixed run conserves stock; `rate` makes it an open loop.
async fn conserved(target: Target, rate: Option<f64>) {
    let mut cfg = Config::new(target.clone(), Workload::Mixed { query: 60, order: 30, inbound: 10 });
    cfg.keys = 40;
    cfg.centers = 2;
    cfg.zipf = 0.99;
    cfg.connections = 3;
    cfg.pipeline = 4;
    cfg.lines = 2;
    cfg.duration = Duration::from_secs(2);
    // The open loop runs on the closed loop's stock (a preload adds to it on stockd).
    cfg.preload = rate.is_none();
    cfg.preload_qty = 150;
    // Another seed for the open loop: its ids must not repeat the closed loop's.
    cfg.seed = if rate.is_some() { 12 } else { 11 };
    cfg.rate = rate;
    // The closed loop's clients share their thread's connections (the
    // default), the open loop's have their own.
    cfg.own_connections = rate.is_some();
    let keys: Vec<_> = KeyGen::new(cfg.keys, cfg.centers, 0.0).all().collect();
    let mut conn = Conn::open(&target, true).await.unwrap();
    let before: u64 = conn.query_batch(&keys).await.unwrap().iter().sum();
    let out = run(&cfg).await.unwrap();
    let r = &out.report;
    assert_eq!(r.errors, 0, "{target}: unexpected errors {:?}", out.errors_by_kind);
    assert!(r.ops > 100, "{target}: only {} ops", r.ops);
    assert_eq!(r.send_late_us.is_some(), rate.is_some(), "send lateness is measured in open loops only");
    assert!(out.order_units > 0 && out.inbound_units > 0);
    let kinds = r.latency_by_kind_us.as_ref().expect("a mixed run reports its latency by kind");
    assert_eq!(kinds.keys().map(String::as_str).collect::<Vec<_>>(), ["inbound", "order", "query"]);
    assert!(kinds.values().all(|l| l.p50 >= 1 && l.p50 <= l.max && l.max <= r.latency_us.max));
    assert_eq!(kinds.values().map(|l| l.max).max(), Some(r.latency_us.max), "the slowest is of some kind");
    let total: u64 = conn.query_batch(&keys).await.unwrap().iter().sum();
    let preload = if cfg.preload { keys.len() as u64 * cfg.preload_qty as u64 } else { 0 };
    assert_eq!(
        total,
        before + preload + out.inbound_units - out.order_units,
        "{target}: before {before} + preload {preload} - ordered {} + received {}",
        out.order_units,
        out.inbound_units
    );
    eprintln!(
        "{target}: {} ops, {} refused for stock, {} units ordered, {} received, conserved",
        r.ops, out.insufficient, out.order_units, out.inbound_units
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_mixed_runs_conserve_stock_on_both_targets() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = stockd::Config::new("127.0.0.1:0".parse().unwrap(), dir.path(), 2);
    cfg.pin = false;
    let srv = stockd::start(cfg).unwrap();
    conserved(Target::Stockd(srv.addr.to_string()), None).await;
    conserved(Target::Stockd(srv.addr.to_string()), Some(2_000.0)).await;
    srv.shutdown();

    let (_redis, port) = start_redis();
    conserved(Target::Redis(format!("redis://127.0.0.1:{port}")), None).await;
}

/// A reader of the summary that stops reading (`| head`) ends nothing else:
/// no panic, a clean exit, the JSON report still written.
#[test]
fn a_reader_that_stops_early_ends_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = stockd::Config::new("127.0.0.1:0".parse().unwrap(), dir.path(), 1);
    cfg.pin = false;
    let srv = stockd::start(cfg).unwrap();
    let json = dir.path().join("report.json");
    let mut child = Command::new(env!("CARGO_BIN_EXE_stock-loadgen"))
        .args(["--target", &format!("stockd://{}", srv.addr), "--workload", "mixed:90,9,1", "--keys", "50"])
        .args(["--preload", "--duration", "300ms", "--quiet", "--json"])
        .arg(&json)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader is gone before the summary is written
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(report["ops"].as_u64().unwrap() > 0);
    srv.shutdown();
}

/// A target that stops answering in the middle of a run (redis-server
/// stopped with SIGSTOP): the run still ends, `drain_limit` after its
/// duration, with an error that says why, instead of waiting for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_stops_answering_ends_the_run_with_an_error() {
    let (redis, port) = start_redis();
    let mut cfg = Config::new(format!("redis://127.0.0.1:{port}").parse().unwrap(), Workload::Query);
    (cfg.connections, cfg.pipeline, cfg.keys) = (2, 4, 100);
    (cfg.duration, cfg.drain_limit) = (Duration::from_millis(800), Duration::from_millis(500));
    let pid = redis.0.id().to_string();
    let signal = |sig: &str| assert!(Command::new("kill").args([sig, &pid]).status().unwrap().success());
    let stopper = {
        let pid = pid.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            assert!(Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
        })
    };
    let t = Instant::now();
    let result = run(&cfg).await;
    stopper.join().unwrap();
    signal("-CONT");
    let err = result.err().expect("a run whose target stopped answering fails");
    assert!(err.contains("still unanswered") && err.contains("0.5s"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(5), "it ended {:?} after the start", t.elapsed());
}
