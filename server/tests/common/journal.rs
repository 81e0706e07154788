//! A load of orders and inbounds with fresh ids, every answer journaled,
//! and the account afterwards: every acknowledged mutation must answer
//! DUPLICATE when sent again, every unanswered one is retried with its id,
//! and every row must equal its initial stock plus the inbounds and less
//! the orders that were applied, exactly. For the crash and failover tests.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stockd_client::{Applied, Client, Error, Key, Line, Status};

#[derive(Clone, Debug)]
pub struct Sent {
    pub order: bool,
    pub id: u64,
    pub lines: Vec<Line>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    Acked,
    /// Refused: nothing applied (short of stock, OVERLOADED, NOT_PRIMARY).
    Refused,
    /// The connection died with the answer.
    Unknown,
}

pub type Journal = Arc<Mutex<Vec<(Sent, Fate)>>>;

pub async fn send(c: &Client, s: &Sent) -> Result<Applied, Error> {
    if s.order {
        c.order(s.id, &s.lines).await
    } else {
        c.inbound(s.id, &s.lines).await
    }
}

/// `tasks` tasks, each sending orders (3 in 4) and inbounds of 1-3 lines
/// of 1-5 units on items `0..items` at center 1, one after another, until
/// `stop`, a lost connection, or NOT_PRIMARY. Ids are `seed << 48 | task << 32 | n`.
pub fn load(
    c: &Client,
    tasks: u64,
    seed: u64,
    items: u64,
    journal: &Journal,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..tasks)
        .map(|w| {
            let (c, journal, stop) = (c.clone(), journal.clone(), stop.clone());
            tokio::spawn(async move {
                let mut rng = (seed << 8 | w).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                let mut next = || {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng
                };
                for n in 0.. {
                    if stop.load(Relaxed) {
                        return;
                    }
                    let id = seed << 48 | w << 32 | n;
                    let order = next() % 4 != 0;
                    let lines = (0..1 + next() % 3)
                        .map(|_| Line::new(next() % items, 1, 1 + (next() % 5) as u32))
                        .collect();
                    let s = Sent { order, id, lines };
                    let (fate, last) = match send(&c, &s).await {
                        Ok(Applied::New { .. }) => (Fate::Acked, false),
                        Ok(Applied::Duplicate { .. }) => panic!("fresh id {id} answered DUPLICATE"),
                        Err(Error::Insufficient { .. }) => (Fate::Refused, false),
                        Err(Error::Server { status: Status::NotPrimary, .. }) => (Fate::Refused, true),
                        Err(Error::Server { .. }) => (Fate::Refused, false), // e.g. OVERLOADED
                        Err(_) => (Fate::Unknown, true),
                    };
                    journal.lock().unwrap().push((s, fate));
                    if last {
                        return;
                    }
                }
            })
        })
        .collect()
}

/// Waits until the journal holds `n` acknowledgements (at most 60 s).
pub async fn acked_at_least(journal: &Journal, n: usize) {
    let t = Instant::now();
    let acked = || journal.lock().unwrap().iter().filter(|(_, f)| *f == Fate::Acked).count();
    while acked() < n {
        assert!(t.elapsed() < Duration::from_secs(60), "only {} acknowledgements in 60 s", acked());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What [`account`] found.
pub struct Accounted {
    pub acked: usize,
    pub unknown: usize,
    /// Unanswered mutations that turned out to have been applied.
    pub unknown_applied: usize,
}

/// Checks the journal against the server `c`: every acknowledged mutation
/// answers DUPLICATE, every unanswered one is retried, and each of the
/// `items` rows (center 1, `initial` units at first) adds up.
pub async fn account(c: &Client, journal: &[(Sent, Fate)], items: u64, initial: u64) -> Accounted {
    let mut expected: HashMap<u64, i64> = (0..items).map(|i| (i, initial as i64)).collect();
    let mut a = Accounted { acked: 0, unknown: 0, unknown_applied: 0 };
    for (s, fate) in journal {
        let applied = match fate {
            Fate::Refused => false,
            Fate::Acked => {
                a.acked += 1;
                let again = send(c, s).await;
                assert!(matches!(again, Ok(Applied::Duplicate { .. })), "acknowledged {s:?} lost: {again:?}");
                true
            }
            Fate::Unknown => {
                a.unknown += 1;
                match send(c, s).await {
                    Ok(Applied::Duplicate { .. }) => {
                        a.unknown_applied += 1;
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
                let q = l.qty as i64;
                *expected.get_mut(&l.key.item).unwrap() += if s.order { -q } else { q };
            }
        }
    }
    let keys: Vec<Key> = (0..items).map(|i| Key { item: i, fc: 1 }).collect();
    let got = c.query_batch(&keys).await.unwrap();
    for (k, g) in keys.iter().zip(got) {
        assert_eq!(g as i64, expected[&k.item], "item {}", k.item);
    }
    a
}
