//! Remembered ids survive a restart with several shards (the real binary,
//! real TCP): a retried order answers DUPLICATE after SIGTERM or SIGKILL
//! and is never applied twice.
//!
//! The reproduction: two shards, a cap of 1,000 ids per shard, a minimum
//! window of 1 s; ~900 ids per shard (below the cap), half of them older
//! than the minimum window. Recovery once replayed everything into one
//! store with the per-shard cap and forgot 800 of them.

mod common;

use std::time::Duration;

use common::*;
use stockd_client::{Applied, Client, Line};

const ARGS: &[&str] = &["--shards", "2", "--max-ids-per-shard", "1000", "--id-min-window-secs", "1"];
const STOCK: u64 = 100_000;

/// Orders 1 unit of (1, 1) under every id, concurrently; (new, duplicate) counts.
async fn order_all(c: &Client, ids: impl Iterator<Item = u64>) -> (usize, usize) {
    let mut calls = tokio::task::JoinSet::new();
    for id in ids {
        let c = c.clone();
        calls.spawn(async move { c.order(id, &[Line::new(1, 1, 1)]).await });
    }
    let (mut new, mut duplicate) = (0, 0);
    while let Some(r) = calls.join_next().await {
        match r.unwrap() {
            Ok(Applied::New { .. }) => new += 1,
            Ok(Applied::Duplicate { .. }) => duplicate += 1,
            Err(e) => panic!("order refused: {e}"),
        }
    }
    (new, duplicate)
}

async fn stat(c: &Client, name: &str) -> u64 {
    c.stats().await.unwrap().into_iter().find(|(k, _)| k == name).map(|(_, v)| v).unwrap()
}

fn order_ids() -> impl Iterator<Item = u64> + Clone {
    (10..910).chain(1000..1900)
}

/// A server on a fresh data directory with the stock in (1, 1) and orders 10..909 placed.
async fn started() -> (tempfile::TempDir, Daemon, Client) {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::spawn(dir.path(), free_port(), ARGS);
    let c = d.client().await;
    c.inbound(1, &[Line::new(1, 1, STOCK as u32)]).await.unwrap();
    assert_eq!(order_all(&c, 10..910).await, (900, 0));
    (dir, d, c)
}

async fn retries_after_restart(stop: fn(Daemon)) {
    let (dir, d, c) = started().await;
    let port = d.port;
    // Older than the minimum window: the cap may now forget them, if it is reached.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(order_all(&c, 1000..1900).await, (900, 0));
    assert_eq!(order_all(&c, order_ids()).await, (0, 1800), "retries before the restart");
    assert_eq!(stat(&c, "ids").await, 1801);
    assert_eq!(c.query(1, 1).await.unwrap(), STOCK - 1800);
    drop(c);
    stop(d);

    let d = Daemon::spawn(dir.path(), port, ARGS);
    let c = d.client().await;
    assert_eq!(order_all(&c, order_ids()).await, (0, 1800), "retries after the restart");
    assert_eq!(c.query(1, 1).await.unwrap(), STOCK - 1800, "no order applied twice");
    assert_eq!(c.inbound(1, &[Line::new(1, 1, 5)]).await.unwrap(), Applied::Duplicate { lsn: 2 });
    drop(c);
    d.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_orders_are_duplicates_after_sigterm_with_two_shards() {
    retries_after_restart(Daemon::terminate).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_orders_are_duplicates_after_kill_9_with_two_shards() {
    retries_after_restart(Daemon::kill_9).await;
}

/// The same ids, with the shard count changed across restarts (2 -> 3 -> 1):
/// every shard count sees every id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_orders_are_duplicates_when_the_shard_count_changes() {
    let (dir, d, c) = started().await;
    let port = d.port;
    drop(c);
    d.kill_9();
    for shards in ["3", "1"] {
        let args = ["--shards", shards, "--max-ids-per-shard", "2000", "--id-min-window-secs", "1"];
        let d = Daemon::spawn(dir.path(), port, &args);
        let c = d.client().await;
        assert_eq!(order_all(&c, 10..910).await, (0, 900), "retries with {shards} shards");
        assert_eq!(c.query(1, 1).await.unwrap(), STOCK - 900);
        drop(c);
        d.kill_9();
    }
}
