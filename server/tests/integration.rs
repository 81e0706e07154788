//! End-to-end behaviour over real TCP on 127.0.0.1, with a real log directory.

mod common;

use std::time::Duration;

use common::*;
use stockd_client::{Applied, Client, Error, Line, Options, Status};

#[tokio::test]
async fn pipelined_queries_and_batches_on_every_path() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path(), 3);
    let aware = client(&srv).await;
    assert_eq!(aware.hello().shard_ports.len(), 3);
    let lines: Vec<Line> = (1..=60u64).map(|i| Line::new(i, (i % 4) as u32, i as u32)).collect();
    aware.inbound(1, &lines).await.unwrap();
    let keys: Vec<_> = lines.iter().map(|l| l.key).collect();
    let want: Vec<u64> = lines.iter().map(|l| l.qty as u64).collect();
    for c in [aware.clone(), single(&srv).await] {
        // 600 queries in flight on the same connections, answered out of order as they come.
        let mut tasks = Vec::new();
        for round in 0..10 {
            for l in &lines {
                let (c, l) = (c.clone(), *l);
                tasks.push(tokio::spawn(async move { (round, l, c.query(l.key.item, l.key.fc).await) }));
            }
        }
        for t in tasks {
            let (_, l, got) = t.await.unwrap();
            assert_eq!(got.unwrap(), l.qty as u64);
        }
        // One batch frame per shard, and (single connection) one batch split by the server.
        assert_eq!(c.query_batch(&keys).await.unwrap(), want);
        // More keys than one frame may carry, on every shard: several frames
        // per shard, answers in order.
        let n = 6 * stockd_protocol::MAX_BATCH_KEYS + 100;
        let many: Vec<_> = keys.iter().cycle().take(n).copied().collect();
        for shard in 0..3 {
            let on_it = many.iter().filter(|k| stockd_protocol::shard_of(k.item, 3) == shard).count();
            assert!(on_it > stockd_protocol::MAX_BATCH_KEYS, "shard {shard} gets {on_it} keys");
        }
        let want_many: Vec<u64> = want.iter().cycle().take(n).copied().collect();
        assert_eq!(c.query_batch(&many).await.unwrap(), want_many);
        let mut with_unknown = keys.clone();
        with_unknown.push(key(999_999, 1));
        assert_eq!(*c.query_batch(&with_unknown).await.unwrap().last().unwrap(), 0);
        assert_eq!(c.query_item(4).await.unwrap(), vec![(0, 4)]);
    }
    srv.shutdown();
}

#[tokio::test]
async fn cross_shard_orders_are_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path(), 2);
    let (a, b) = (items_on(0, 2, 1)[0], items_on(1, 2, 1)[0]);
    let c = client(&srv).await;
    c.inbound(1, &[Line::new(a, 1, 5), Line::new(b, 1, 3)]).await.unwrap();
    // Second line cannot be filled: nothing changes on either shard.
    let err = c.order(10, &[Line::new(a, 1, 2), Line::new(b, 1, 4)]).await.unwrap_err();
    assert!(matches!(err, Error::Insufficient { line: 1, available: 3 }), "{err}");
    assert_eq!((c.query(a, 1).await.unwrap(), c.query(b, 1).await.unwrap()), (5, 3));
    // The refused id was not remembered: the same id may be used again.
    let ok = c.order(10, &[Line::new(a, 1, 2), Line::new(b, 1, 3)]).await.unwrap();
    assert!(matches!(ok, Applied::New { .. }));
    assert_eq!((c.query(a, 1).await.unwrap(), c.query(b, 1).await.unwrap()), (3, 0));
    // Over one connection the server forwards to the coordinator; same result.
    let s = single(&srv).await;
    let err = s.order(11, &[Line::new(b, 1, 1)]).await.unwrap_err();
    assert!(matches!(err, Error::Insufficient { line: 0, available: 0 }));
    s.order(12, &[Line::new(a, 1, 1), Line::new(a, 1, 2)]).await.unwrap();
    assert_eq!(s.query(a, 1).await.unwrap(), 0);
    srv.shutdown();
}

#[tokio::test]
async fn retries_cancels_and_adjustments() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path(), 2);
    let c = client(&srv).await;
    let first = c.inbound(5, &[Line::new(7, 1, 10)]).await.unwrap();
    assert_eq!(c.inbound(5, &[Line::new(7, 1, 10)]).await.unwrap(), Applied::Duplicate { lsn: first.lsn() });
    assert_eq!(c.query(7, 1).await.unwrap(), 10);
    let o = c.order(42, &[Line::new(7, 1, 4)]).await.unwrap();
    assert_eq!(c.order(42, &[Line::new(7, 1, 4)]).await.unwrap(), Applied::Duplicate { lsn: o.lsn() });
    assert_eq!(c.query(7, 1).await.unwrap(), 6);
    let cancel = c.cancel(42).await.unwrap();
    assert!(matches!(cancel, Applied::New { .. }));
    assert_eq!(c.cancel(42).await.unwrap(), Applied::Duplicate { lsn: cancel.lsn() });
    assert_eq!(c.query(7, 1).await.unwrap(), 10, "units come back exactly once");
    let e = c.cancel(4242).await.unwrap_err();
    assert_eq!(e.status(), Some(Status::NotFound), "{e}");
    // Adjust to an absolute figure; refused below what is held.
    c.reserve(77, 60_000, &[Line::new(7, 1, 4)]).await.unwrap();
    let e = c.adjust(7, 1, 3, 1).await.unwrap_err();
    assert_eq!(e.status(), Some(Status::Conflict), "{e}");
    c.adjust(7, 1, 20, 1).await.unwrap();
    assert_eq!(c.query(7, 1).await.unwrap(), 16);
    c.confirm(77).await.unwrap();
    assert_eq!(c.query(7, 1).await.unwrap(), 16, "confirm keeps availability: the units were held");
    assert_eq!(c.release(77).await.unwrap_err().status(), Some(Status::Conflict));
    c.cancel(77).await.unwrap();
    assert_eq!(c.query(7, 1).await.unwrap(), 20);
    srv.shutdown();
}

#[tokio::test]
async fn holds_expire_also_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path(), 2);
    let c = client(&srv).await;
    c.inbound(1, &[Line::new(3, 1, 10), Line::new(4, 1, 10)]).await.unwrap();
    c.reserve(100, 200, &[Line::new(3, 1, 6), Line::new(4, 1, 1)]).await.unwrap();
    assert_eq!(c.query(3, 1).await.unwrap(), 4);
    let back = eventually(Duration::from_secs(5), || async { c.query(3, 1).await.unwrap() == 10 }).await;
    assert!(back, "an unconfirmed hold is released at its deadline");
    assert_eq!(c.confirm(100).await.unwrap_err().status(), Some(Status::Conflict));
    // A hold whose deadline passes while the server is down is released after restart.
    c.reserve(101, 300, &[Line::new(4, 1, 9)]).await.unwrap();
    drop(c);
    srv.shutdown();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let srv = start(dir.path(), 3);
    let c = client(&srv).await;
    let back = eventually(Duration::from_secs(5), || async { c.query(4, 1).await.unwrap() == 10 }).await;
    assert!(back, "expired during downtime, released after recovery");
    let stats = c.stats().await.unwrap();
    assert!(stats.iter().any(|(k, v)| k == "holds_expired" && *v == 1), "{stats:?}");
    srv.shutdown();
}

#[tokio::test]
async fn racing_for_the_last_units_exactly_the_stock_sells() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path(), 2);
    let (a, b) = (items_on(0, 2, 1)[0], items_on(1, 2, 1)[0]);
    let c = client(&srv).await;
    c.inbound(1, &[Line::new(a, 1, 37), Line::new(b, 1, 100)]).await.unwrap();
    let clients = [client(&srv).await, single(&srv).await, client(&srv).await, single(&srv).await];
    let mut tasks = Vec::new();
    for i in 0..200u64 {
        let c = clients[i as usize % clients.len()].clone();
        // Every order takes one unit of `a` (the scarce item) and one of `b`, across both shards.
        tasks.push(tokio::spawn(async move {
            c.order(1000 + i, &[Line::new(b, 1, 1), Line::new(a, 1, 1)]).await
        }));
    }
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(Applied::New { .. }) => ok += 1,
            Err(Error::Insufficient { line: 1, available: 0 }) => refused += 1,
            Err(Error::Server { status: Status::Overloaded, .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(ok, 37, "exactly as many orders succeed as there are units");
    assert!(refused > 0);
    assert_eq!((c.query(a, 1).await.unwrap(), c.query(b, 1).await.unwrap()), (0, 63));
    srv.shutdown();
}

#[tokio::test]
async fn restart_recovers_from_snapshot_and_log_with_another_shard_count() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 2);
    cfg.snapshot_records = 50;
    let srv = stockd::start(cfg).unwrap();
    let c = client(&srv).await;
    for i in 0..200u64 {
        c.inbound(i, &[Line::new(i % 17, 1, 3)]).await.unwrap();
        if i % 2 == 0 {
            c.order(i, &[Line::new(i % 17, 1, 1)]).await.unwrap();
        }
    }
    let before: Vec<u64> = c.query_batch(&(0..17).map(|i| key(i, 1)).collect::<Vec<_>>()).await.unwrap();
    drop(c);
    srv.shutdown();
    let files: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(files.iter().any(|f| f == "MANIFEST"), "a snapshot was taken: {files:?}");
    for shards in [1, 3] {
        let srv = start(dir.path(), shards);
        let c = client(&srv).await;
        let after = c.query_batch(&(0..17).map(|i| key(i, 1)).collect::<Vec<_>>()).await.unwrap();
        assert_eq!(after, before, "{shards} shards");
        // Ids survive too: every retry is a duplicate and changes nothing.
        for i in 0..200u64 {
            let again = c.inbound(i, &[Line::new(i % 17, 1, 3)]).await.unwrap();
            assert!(
                matches!(again, Applied::Duplicate { .. }),
                "receipt {i} with {shards} shards: {again:?}"
            );
            if i % 2 == 0 {
                let again = c.order(i, &[Line::new(i % 17, 1, 1)]).await.unwrap();
                assert!(
                    matches!(again, Applied::Duplicate { .. }),
                    "order {i} with {shards} shards: {again:?}"
                );
            }
        }
        let unchanged = c.query_batch(&(0..17).map(|i| key(i, 1)).collect::<Vec<_>>()).await.unwrap();
        assert_eq!(unchanged, before, "retries changed stock with {shards} shards");
        drop(c);
        srv.shutdown();
    }
}

#[tokio::test]
async fn auth_token_is_required_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 2);
    cfg.auth_token = Some("s3cret".into());
    let srv = stockd::start(cfg).unwrap();
    let addr = srv.addr.to_string();
    let e = Client::connect(&addr).await.err().expect("no token refused");
    assert_eq!(e.status(), Some(Status::Unauthorized), "{e}");
    let bad = Options { token: Some("wrong".into()), ..Options::default() };
    assert_eq!(Client::connect_with(&addr, bad).await.err().unwrap().status(), Some(Status::Unauthorized));
    let good = Options { token: Some("s3cret".into()), ..Options::default() };
    let c = Client::connect_with(&addr, good).await.unwrap();
    c.inbound(1, &[Line::new(1, 1, 1)]).await.unwrap();
    assert_eq!(c.query(1, 1).await.unwrap(), 1);
    srv.shutdown();
}

/// A server restarted again and again before it writes a snapshot's worth
/// still snapshots: records count from the last snapshot, not from the start.
#[tokio::test]
async fn restarts_do_not_postpone_the_snapshot_forever() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("MANIFEST");
    for run in 0..2u64 {
        let mut cfg = config(dir.path(), 2);
        cfg.snapshot_records = 1_000;
        let srv = stockd::start(cfg).unwrap();
        let c = client(&srv).await;
        for i in 0..600u64 {
            c.inbound(run * 1_000 + i, &[Line::new(i % 50, 1, 1)]).await.unwrap();
        }
        if run == 0 {
            assert!(!manifest.exists(), "600 records are below the snapshot threshold");
        } else {
            let snapshotted = eventually(Duration::from_secs(10), || async { manifest.exists() }).await;
            assert!(snapshotted, "1,200 records since the last snapshot, over two runs: a snapshot");
        }
        drop(c);
        srv.shutdown();
    }
}
