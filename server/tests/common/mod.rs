//! Shared helpers: a real server on 127.0.0.1 with a real data directory.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use stockd::{Config, Running};
use stockd_client::{Client, Key, Options};

pub fn config(dir: &Path, shards: usize) -> Config {
    let mut cfg = Config::new("127.0.0.1:0".parse().unwrap(), dir, shards);
    cfg.pin = false;
    cfg
}

pub fn start(dir: &Path, shards: usize) -> Running {
    stockd::start(config(dir, shards)).expect("server starts")
}

pub async fn client(r: &Running) -> Client {
    Client::connect(&r.addr.to_string()).await.expect("connect")
}

/// A client that sends everything over one connection, so the server forwards between shards.
pub async fn single(r: &Running) -> Client {
    let opts = Options { single_connection: true, ..Options::default() };
    Client::connect_with(&r.addr.to_string(), opts).await.expect("connect")
}

/// The first `n` items owned by `shard` of `shards`.
pub fn items_on(shard: usize, shards: usize, n: usize) -> Vec<u64> {
    (1..).filter(|i| stockd_protocol::shard_of(*i, shards) == shard).take(n).collect()
}

pub fn key(item: u64, fc: u32) -> Key {
    Key { item, fc }
}

/// Polls `f` until it returns true, for at most `limit`.
pub async fn eventually<F, Fut>(limit: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t = std::time::Instant::now();
    while t.elapsed() < limit {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}
