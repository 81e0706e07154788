//! kill -9 under load, restart, and account for every unit.
//!
//! Clients place orders and inbounds with unique ids against the real
//! `stockd` binary until it is killed with SIGKILL. After a restart on the
//! same data directory:
//! - every acknowledged mutation is there (retrying its id answers DUPLICATE);
//! - every mutation whose answer was lost is retried with its id: it was
//!   either applied (DUPLICATE) or not at all (applied now, or refused);
//! - every row equals initial + applied inbounds - applied orders, exactly.

mod common;

use common::journal::{account, acked_at_least, load, Journal};
use common::{free_port, Daemon};
use stockd_client::Line;

const ITEMS: u64 = 24;
const INITIAL: u64 = 400;
/// Acknowledged mutations before the SIGKILL (the load keeps going meanwhile).
const KILL_AFTER_ACKS: usize = 3_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_nothing_acknowledged_and_half_applies_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let d = Daemon::spawn(dir.path(), port, &["--shards", "2"]);
    let c = d.client().await;
    let initial: Vec<Line> = (0..ITEMS).map(|i| Line::new(i, 1, INITIAL as u32)).collect();
    c.inbound(u64::MAX, &initial).await.unwrap();

    let (journal, stop): (Journal, _) = Default::default();
    let tasks = load(&c, 16, 0, ITEMS, &journal, &stop);
    // Kill once the load has run for real: a few thousand acknowledgements.
    acked_at_least(&journal, KILL_AFTER_ACKS).await;
    d.kill_9();
    for t in tasks {
        t.await.unwrap();
    }
    drop(c);

    let d = Daemon::spawn(dir.path(), port, &["--shards", "2"]);
    let c = d.client().await;
    let journal = std::mem::take(&mut *journal.lock().unwrap());
    let a = account(&c, &journal, ITEMS, INITIAL).await;
    assert!(a.acked >= KILL_AFTER_ACKS, "the load ran before the kill ({} acknowledged)", a.acked);
    eprintln!(
        "crash test: {} mutations sent, {} acknowledged before SIGKILL, {} unanswered \
         ({} of them had been applied)",
        journal.len(),
        a.acked,
        a.unknown,
        a.unknown_applied
    );
    d.kill_9();
}
