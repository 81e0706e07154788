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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{free_port, Daemon};

use stockd_client::{Applied, Client, Error, Key, Line};

const ITEMS: u64 = 24;
const INITIAL: u64 = 400;
/// Acknowledged mutations before the SIGKILL (the load keeps going meanwhile).
const KILL_AFTER_ACKS: usize = 3_000;

#[derive(Clone, Debug)]
struct Sent {
    order: bool,
    id: u64,
    lines: Vec<Line>,
}

#[derive(Debug, PartialEq)]
enum Fate {
    Acked,
    Refused,
    Unknown,
}

async fn send(c: &Client, s: &Sent) -> Result<Applied, Error> {
    if s.order {
        c.order(s.id, &s.lines).await
    } else {
        c.inbound(s.id, &s.lines).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_nothing_acknowledged_and_half_applies_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let d = Daemon::spawn(dir.path(), port, &["--shards", "2"]);
    let c = d.client().await;
    let initial: Vec<Line> = (0..ITEMS).map(|i| Line::new(i, 1, INITIAL as u32)).collect();
    c.inbound(u64::MAX, &initial).await.unwrap();

    let journal: Arc<Mutex<Vec<(Sent, Fate)>>> = Arc::default();
    let mut tasks = Vec::new();
    for w in 0..16u64 {
        let (c, journal) = (c.clone(), journal.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = w.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut next = || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            for n in 0.. {
                let id = w << 32 | n;
                let order = next() % 4 != 0;
                let lines = (0..1 + next() % 3)
                    .map(|_| Line::new(next() % ITEMS, 1, 1 + (next() % 5) as u32))
                    .collect();
                let s = Sent { order, id, lines };
                let fate = match send(&c, &s).await {
                    Ok(Applied::New { .. }) => Fate::Acked,
                    Err(Error::Insufficient { .. }) => Fate::Refused,
                    Err(Error::Server { .. }) => Fate::Refused, // e.g. OVERLOADED: not applied
                    Ok(Applied::Duplicate { .. }) => panic!("fresh id {id} reported as duplicate"),
                    Err(_) => Fate::Unknown, // the connection died with the answer
                };
                let dead = fate == Fate::Unknown;
                journal.lock().unwrap().push((s, fate));
                if dead {
                    return;
                }
            }
        }));
    }
    // Kill once the load has run for real: a few thousand acknowledgements.
    let t = std::time::Instant::now();
    let acked = || journal.lock().unwrap().iter().filter(|(_, f)| *f == Fate::Acked).count();
    while acked() < KILL_AFTER_ACKS {
        assert!(t.elapsed() < Duration::from_secs(60), "only {} acknowledgements in 60 s", acked());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    d.kill_9();
    for t in tasks {
        t.await.unwrap();
    }
    drop(c);

    let d = Daemon::spawn(dir.path(), port, &["--shards", "2"]);
    let c = d.client().await;
    let journal = std::mem::take(&mut *journal.lock().unwrap());
    let acked = journal.iter().filter(|(_, f)| *f == Fate::Acked).count();
    assert!(acked >= KILL_AFTER_ACKS, "the load ran before the kill ({acked} acknowledged)");
    let mut expected: HashMap<u64, i64> = (0..ITEMS).map(|i| (i, INITIAL as i64)).collect();
    let mut retried_applied = 0;
    let mut unknown = 0;
    for (s, fate) in &journal {
        let applied = match fate {
            Fate::Refused => false,
            Fate::Acked => {
                let again = send(&c, s).await;
                assert!(matches!(again, Ok(Applied::Duplicate { .. })), "acknowledged {s:?} lost: {again:?}");
                true
            }
            Fate::Unknown => {
                unknown += 1;
                match send(&c, s).await {
                    Ok(Applied::Duplicate { .. }) => {
                        retried_applied += 1;
                        true
                    }
                    Ok(Applied::New { .. }) => true,
                    Err(Error::Insufficient { .. }) => false,
                    other => panic!("retry of {s:?}: {other:?}"),
                }
            }
        };
        if applied {
            for l in &s.lines {
                let d = l.qty as i64;
                *expected.get_mut(&l.key.item).unwrap() += if s.order { -d } else { d };
            }
        }
    }
    let keys: Vec<Key> = (0..ITEMS).map(|i| Key { item: i, fc: 1 }).collect();
    let got = c.query_batch(&keys).await.unwrap();
    for (k, g) in keys.iter().zip(got) {
        assert_eq!(g as i64, expected[&k.item], "item {}", k.item);
    }
    eprintln!(
        "crash test: {} mutations sent, {acked} acknowledged before SIGKILL, {unknown} unanswered \
         ({retried_applied} of them had been applied)",
        journal.len()
    );
    d.kill_9();
}
