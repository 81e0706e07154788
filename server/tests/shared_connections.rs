//! The clients one thread connects to one server share its connections
//! (one per shard), unless a client asks for its own; a client never
//! shares a connection authenticated with another token, and one connected
//! after the server restarted gets new connections even while a client of
//! the old ones is still held; nor one in another runtime of the thread.

mod common;

use std::time::Duration;

use common::*;
use stockd::Config;
use stockd_client::{Client, Line, Options, Status};

async fn connections(c: &Client) -> u64 {
    let stats = c.stats().await.unwrap();
    stats.iter().find(|(name, _)| name == "connections").expect("a connections counter").1
}

/// Waits until the server counts `n` client connections (a client's first
/// connection, used only for HELLO, closes a moment after it connects).
async fn until_connections(c: &Client, n: u64) {
    let counted = eventually(Duration::from_secs(10), || async { connections(c).await == n }).await;
    assert!(counted, "the server counts {} connections, not {n}", connections(c).await);
}

fn own() -> Options {
    Options { own_connections: true, ..Options::default() }
}

#[tokio::test]
async fn the_clients_of_a_thread_share_one_connection_per_shard() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path(), 2);
    let addr = srv.addr.to_string();
    let a = Client::connect(&addr).await.unwrap();
    let b = Client::connect(&addr).await.unwrap();
    until_connections(&a, 2).await;
    let c = Client::connect_with(&addr, own()).await.unwrap();
    until_connections(&a, 4).await;

    // Every client is served, over shared connections or its own.
    let items = [items_on(0, 2, 1)[0], items_on(1, 2, 1)[0]];
    a.inbound(1, &[Line::new(items[0], 1, 10), Line::new(items[1], 1, 10)]).await.unwrap();
    b.order(2, &[Line::new(items[0], 1, 3)]).await.unwrap();
    c.order(3, &[Line::new(items[1], 1, 4)]).await.unwrap();
    for client in [&a, &b, &c] {
        assert_eq!(client.query_batch(&[key(items[0], 1), key(items[1], 1)]).await.unwrap(), vec![7, 6]);
    }

    // The shared connections stay while one client holds them.
    drop(a);
    assert_eq!(b.query(items[0], 1).await.unwrap(), 7);
    until_connections(&c, 4).await;
    drop(b);
    until_connections(&c, 2).await;
    // A client after them all opens new ones, and shares them again.
    let d = Client::connect(&addr).await.unwrap();
    let e = Client::connect(&addr).await.unwrap();
    until_connections(&c, 4).await;
    assert_eq!(e.query(items[1], 1).await.unwrap(), 6);
    drop((c, d, e));
    srv.shutdown();
}

#[tokio::test]
async fn a_client_never_shares_a_connection_authenticated_with_another_token() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg: Config = config(dir.path(), 2);
    cfg.auth_token = Some("s3cret".into());
    let srv = stockd::start(cfg).unwrap();
    let addr = srv.addr.to_string();
    let token = |t: &str| Options { token: Some(t.into()), ..Options::default() };
    let good = Client::connect_with(&addr, token("s3cret")).await.unwrap();
    good.inbound(1, &[Line::new(1, 1, 5)]).await.unwrap();
    for refused in [Client::connect(&addr).await, Client::connect_with(&addr, token("wrong")).await] {
        assert_eq!(refused.err().expect("refused").status(), Some(Status::Unauthorized));
    }
    let again = Client::connect_with(&addr, token("s3cret")).await.unwrap();
    until_connections(&good, 2).await;
    assert_eq!(again.query(1, 1).await.unwrap(), 5);
    drop((good, again));
    srv.shutdown();
}

/// The real binary, killed and started again on its port with another
/// shard count while a client of its old connections is still held.
#[tokio::test]
async fn a_client_connected_after_a_restart_gets_new_connections() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::spawn(dir.path(), free_port(), &["--shards", "2"]);
    let port = d.port;
    let old = d.client().await;
    old.inbound(1, &[Line::new(1, 1, 9)]).await.unwrap();
    assert_eq!(old.hello().shard_ports.len(), 2);
    d.kill_9();

    let d = Daemon::spawn(dir.path(), port, &["--shards", "3"]);
    let new = d.client().await;
    assert_eq!(new.hello().shard_ports.len(), 3, "the new server's shards, not the old one's");
    assert_eq!(new.query(1, 1).await.unwrap(), 9);
    new.order(2, &[Line::new(1, 1, 2)]).await.unwrap();
    assert_eq!(new.query(1, 1).await.unwrap(), 7);
    assert!(old.query(1, 1).await.is_err(), "the old connections are gone");
    drop((old, new));
    d.terminate();
}

/// A set's tasks run on the runtime that opened it: a client connected on
/// the same thread in another runtime (the first one not driven meanwhile)
/// must not take it, or its `HELLO` would wait for tasks that never run.
#[test]
fn a_client_in_another_runtime_of_the_thread_gets_its_own_connections() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path(), 2);
    let addr = srv.addr.to_string();
    let runtime = || tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (first_rt, second_rt) = (runtime(), runtime());
    let first = first_rt.block_on(async {
        let first = Client::connect(&addr).await.unwrap();
        until_connections(&first, 2).await;
        first
    });
    let second = second_rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), Client::connect(&addr)).await })
        .expect("connected without the first runtime's tasks")
        .unwrap();
    second_rt.block_on(async {
        second.inbound(1, &[Line::new(1, 1, 4)]).await.unwrap();
        until_connections(&second, 4).await;
    });
    assert_eq!(first_rt.block_on(first.query(1, 1)).unwrap(), 4);
    drop((first, second));
    srv.shutdown();
}
