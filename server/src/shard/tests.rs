//! Shard and connection logic without threads: shards built by hand around
//! a real log writer (whose commit callback the test controls), driven by
//! calling them directly, as their event loops would.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::AtomicBool;
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::{Duration, Instant};

use stockd_persistence::wal::{Committed, Wal, WalConfig};
use stockd_protocol::{
    opcode, parse_frame, shard_of, HelloInfo, Key, Line, Request, Response, Status, HEADER_LEN,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::conn::{serve, ConnCtx};
use crate::state::{Command, IdKey, IdLimits, Mutation, Op};

/// `n` shards' shared state around a real log writer in `dir`; every group
/// commit goes to `on_commit` (the shards never hear of it unless it says so).
fn shared_with(
    dir: &std::path::Path,
    n: usize,
    queue_capacity: usize,
    on_commit: impl FnMut(Vec<Committed<mailbox::WalToken>>, &[u8]) + Send + 'static,
) -> Arc<Shared> {
    shared_from(dir, n, queue_capacity, 1, on_commit)
}

/// As [`shared_with`], the log writer's first record at `next_lsn`.
fn shared_from(
    dir: &std::path::Path,
    n: usize,
    queue_capacity: usize,
    next_lsn: u64,
    on_commit: impl FnMut(Vec<Committed<mailbox::WalToken>>, &[u8]) + Send + 'static,
) -> Arc<Shared> {
    let cfg = WalConfig { queue_capacity, ..WalConfig::new(dir) };
    let (wal, _writer) = Wal::start(cfg, next_lsn, 0, on_commit).unwrap();
    let (snapshots, _) = crossbeam::channel::unbounded();
    Arc::new(Shared {
        mailboxes: Arc::new((0..n).map(|_| Mailbox::new()).collect()),
        stats: Arc::new((0..n).map(|_| ShardStats::default()).collect()),
        sinks: Vec::new(),
        wal,
        stop: AtomicBool::new(false),
        snapshots,
        snapshot_queues: Arc::new((0..n).map(|_| Default::default()).collect()),
        max_connections: 100,
        replica: None,
    })
}

/// A store of shard `i` of `n` with `units` available in `key` (if it owns it).
fn stocked(i: usize, n: usize, key: Key, units: u32) -> Store {
    let mut s = Store::new(i, n, IdLimits::default());
    s.apply(
        None,
        1,
        0,
        &Mutation { op: Op::Inbound { id: u64::MAX }, lines: vec![Line { key, qty: units }].into() },
    );
    s
}

fn order(id: u64, key: Key, qty: u32) -> Command {
    Command::Order { id, lines: vec![Line { key, qty }].into() }
}

/// A connection's outbox, and what the test has taken out of it.
fn outbox() -> (Arc<Outbox>, Inbox) {
    let outbox = Arc::new(Outbox::default());
    (outbox.clone(), Inbox { outbox, taken: VecDeque::new() })
}

struct Inbox {
    outbox: Arc<Outbox>,
    taken: VecDeque<Out>,
}

/// The next answer a shard left in the outbox, decoded.
fn answer(rx: &mut Inbox) -> Option<Response> {
    if rx.taken.is_empty() {
        rx.outbox.take_all(&mut rx.taken);
    }
    match rx.taken.pop_front()? {
        Out::Response { op, request_id, resp } => {
            // What the connection would write, read back as a client would.
            let mut f = Vec::new();
            resp.encode(op, request_id, &mut f);
            let (h, body) = parse_frame(&f).unwrap().unwrap();
            Some(Response::decode(h.opcode, body).unwrap())
        }
        Out::BatchPart { .. } => panic!("a batch part where a frame was expected"),
    }
}

const KEY: Key = Key { item: 5, fc: 1 };

#[test]
fn a_contended_refusal_is_retried_until_its_time_runs_out() {
    let dir = tempfile::tempdir().unwrap();
    // Commits are never routed: the first order stays undecided for good.
    let shared = shared_with(dir.path(), 1, 1024, |_, _| {});
    let mut shard = Shard::new(0, shared, stocked(0, 1, KEY, 5));
    let (tx, mut rx) = outbox();
    shard.start(opcode::ORDER, 1, order(10, KEY, 5), Some(tx.clone()));
    shard.start(opcode::ORDER, 2, order(11, KEY, 1), Some(tx));
    // The units exist but an undecided order reserved them: no answer yet, a retry instead.
    assert!(answer(&mut rx).is_none());
    assert_eq!(shard.retries.len(), 1);
    let t = Instant::now();
    let resp = loop {
        std::thread::sleep(Duration::from_millis(20));
        shard.retry_contended();
        if let Some(resp) = answer(&mut rx) {
            break resp;
        }
        assert!(t.elapsed() < CONTENDED_RETRY_FOR * 3, "the retry never gave up");
    };
    assert!(t.elapsed() >= CONTENDED_RETRY_FOR - Duration::from_millis(100));
    assert_eq!(resp, Response::Insufficient { line: 0, available: 0 });
    assert!(shard.retries.is_empty());
}

#[test]
fn beyond_max_txns_a_shard_answers_overloaded() {
    let dir = tempfile::tempdir().unwrap();
    let shared = shared_with(dir.path(), 1, MAX_TXNS * 2, |_, _| {});
    let mut shard = Shard::new(0, shared, stocked(0, 1, KEY, 1_000_000));
    let (tx, mut rx) = outbox();
    for id in 0..MAX_TXNS as u64 {
        shard.start(opcode::ORDER, id, order(id, KEY, 1), Some(tx.clone()));
    }
    assert!(answer(&mut rx).is_none(), "all in flight, none answered");
    shard.start(opcode::ORDER, 0, order(u64::MAX - 1, KEY, 1), Some(tx));
    match answer(&mut rx) {
        Some(Response::Error { status: Status::Overloaded, message }) => {
            assert!(message.contains("too many mutations in flight"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(shard.txns.len(), MAX_TXNS);
}

fn assert_log_saturated(resp: Response) {
    match resp {
        Response::Error { status: Status::Overloaded, message } => {
            assert!(message.contains("log writer is saturated"), "{message}")
        }
        other => panic!("{other:?}"),
    }
}

/// A log writer whose commit callback waits on `gate` from the first batch
/// on: the writer soon stops taking records and its queue of `capacity`
/// fills.
fn stuck_log(dir: &std::path::Path, n: usize, capacity: usize, gate: std_mpsc::Receiver<()>) -> Arc<Shared> {
    shared_with(dir, n, capacity, move |_, _| {
        let _ = gate.recv();
    })
}

#[test]
fn a_full_log_queue_answers_every_order_of_the_pass_it_refuses_overloaded_and_reserves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (gate_tx, gate_rx) = std_mpsc::channel::<()>();
    let shared = stuck_log(dir.path(), 1, 1, gate_rx);
    let mut shard = Shard::new(0, shared, stocked(0, 1, KEY, 100));
    let (tx, mut rx) = outbox();
    // Orders of 10 units until the log refuses one: the writer takes a few
    // (one to the waiting callback, one it waits to hand over), the queue one more.
    let mut logged = 0;
    let refused = loop {
        assert!(logged < 8, "the log never filled");
        shard.start(opcode::ORDER, logged, order(logged, KEY, 10), Some(tx.clone()));
        shard.flush_log(); // the end of the event loop's pass
        std::thread::sleep(Duration::from_millis(20)); // let the writer take what it can
        if let Some(resp) = answer(&mut rx) {
            break resp;
        }
        logged += 1;
    };
    assert_log_saturated(refused);
    // The records of a pass go to the log as one batch, refused whole:
    // each of its orders is answered.
    for id in 100..103 {
        shard.start(opcode::ORDER, id, order(id, KEY, 10), Some(tx.clone()));
    }
    assert!(answer(&mut rx).is_none(), "nothing answered before the pass ends");
    shard.flush_log();
    for _ in 100..103 {
        assert_log_saturated(answer(&mut rx).expect("every order of the batch is answered"));
    }
    assert!(answer(&mut rx).is_none());
    // The refused orders' reservations were dropped: all but the logged ones' units are free.
    let rest = 100 - 10 * logged as u32;
    assert!(shard
        .store
        .prepare(99, &Mutation { op: Op::Order { id: 99 }, lines: vec![Line { key: KEY, qty: rest }].into() })
        .is_ok());
    drop(gate_tx);
}

/// A shard hands the log writer the records of a pass of its event loop
/// when the pass ends (`flush_log`), or once it has queued `LOG_PASS_MAX`.
#[test]
fn the_records_of_a_pass_reach_the_log_when_it_ends() {
    let dir = tempfile::tempdir().unwrap();
    let (batch_tx, batches) = std_mpsc::channel();
    let shared = shared_with(dir.path(), 1, 4 * coordinator::LOG_PASS_MAX, move |b, _| {
        let _ = batch_tx.send(b.len());
    });
    let mut shard = Shard::new(0, shared, stocked(0, 1, KEY, 1_000_000));
    let (tx, _rx) = outbox();
    let logged = |n: usize| {
        let mut got = 0;
        while got < n {
            got += batches.recv_timeout(Duration::from_secs(10)).expect("a group commit");
        }
        assert_eq!(got, n);
    };
    for id in 0..3 {
        shard.start(opcode::ORDER, id, order(id, KEY, 1), Some(tx.clone()));
    }
    assert!(batches.recv_timeout(Duration::from_millis(100)).is_err(), "nothing logged mid-pass");
    shard.flush_log();
    logged(3);
    // A pass that queues LOG_PASS_MAX records hands them over without ending.
    for id in 3..3 + coordinator::LOG_PASS_MAX as u64 {
        shard.start(opcode::ORDER, id, order(id, KEY, 1), Some(tx.clone()));
    }
    logged(coordinator::LOG_PASS_MAX);
    assert!(shard.to_log.is_empty());
}

/// A QUERY_BATCH over three shards whose third owner's queue is full: the
/// batch answers OVERLOADED, the part already handed over comes back later
/// and is absorbed, and the connection keeps serving.
#[test]
fn a_cross_shard_batch_with_a_full_owner_answers_overloaded_and_survives() {
    let dir = tempfile::tempdir().unwrap();
    let shared = shared_with(dir.path(), 3, 1024, |_, _| {});
    let key_on = |s: usize| Key { item: (1..).find(|i| shard_of(*i, 3) == s).unwrap(), fc: 1 };
    let (k0, k1, k2) = (key_on(0), key_on(1), key_on(2));
    // The owner of k2 has a full request queue.
    let (dead_tx, _dead_rx) = outbox();
    for _ in 0..FORWARD_CAPACITY {
        let f = Forwarded::Query { request_id: 0, key: k2, reply: Some(dead_tx.clone()) };
        assert!(shared.mailboxes[2].push_request(f).is_ok());
    }
    let shard0 = Rc::new(RefCell::new(Shard::new(0, shared.clone(), Store::new(0, 3, IdLimits::default()))));
    let mut shard1 = Shard::new(1, shared.clone(), Store::new(1, 3, IdLimits::default()));
    let hello = HelloInfo {
        server_id: 1,
        hash_id: 1,
        shard_ports: vec![0; 3],
        max_body: 1 << 20,
        max_batch_keys: 64,
        max_lines: 64,
    };
    let ctx = Rc::new(ConnCtx { hello, auth_token: None, partial_frame_timeout: Duration::from_secs(10) });
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::task::spawn_local(async move {
            let (stream, _) = listener.accept().await.unwrap();
            serve(stream, shard0, ctx).await;
        });
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut out = Vec::new();
        Request::QueryBatch { keys: vec![k0, k1, k2] }.encode(7, &mut out);
        client.write_all(&out).await.unwrap();
        let (id, resp) = read_answer(&mut client).await;
        assert_eq!(id, 7);
        assert_eq!(resp.status(), Status::Overloaded);
        // Shard 1 answers its part now; the connection must absorb it, not panic.
        let _ = shard1.drain();
        out.clear();
        Request::Ping.encode(8, &mut out);
        client.write_all(&out).await.unwrap();
        let (id, resp) = read_answer(&mut client).await;
        assert_eq!((id, resp.status()), (8, Status::Ok));
        drop(client);
        tokio::time::timeout(Duration::from_secs(5), server).await.unwrap().unwrap();
    });
}

async fn read_answer(s: &mut tokio::net::TcpStream) -> (u64, Response) {
    let mut buf = Vec::new();
    loop {
        if let Some((h, body)) = parse_frame(&buf).unwrap() {
            assert_eq!(buf.len(), HEADER_LEN + h.body_len, "one answer at a time here");
            return (h.request_id, Response::decode(h.opcode, body).unwrap());
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk)).await.unwrap().unwrap();
        assert!(n > 0, "the server closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[test]
fn a_mutation_that_does_not_go_ahead_leaves_its_id_free() {
    let dir = tempfile::tempdir().unwrap();
    let shared = shared_with(dir.path(), 1, 1024, |_, _| {});
    let mut store = stocked(0, 1, KEY, 5);
    let known = Mutation { op: Op::Order { id: 41 }, lines: vec![Line { key: KEY, qty: 1 }].into() };
    store.apply(None, 2, 1_000, &known);
    let mut shard = Shard::new(0, shared, store);
    let (tx, mut rx) = outbox();
    // A retry of a remembered order, and a cancel of an order never seen:
    // answered from the plan, neither leaves its id in flight.
    shard.start(opcode::ORDER, 1, order(41, KEY, 1), Some(tx.clone()));
    assert_eq!(answer(&mut rx), Some(Response::Duplicate { lsn: 2 }));
    shard.start(opcode::CANCEL, 2, Command::Cancel { id: 42 }, Some(tx.clone()));
    assert!(matches!(answer(&mut rx), Some(Response::Error { status: Status::NotFound, .. })));
    assert!(shard.busy_ids.is_empty(), "no id stays marked in flight");
    // A new order goes ahead and holds its id until it is answered.
    shard.start(opcode::ORDER, 3, order(43, KEY, 1), Some(tx));
    assert!(shard.busy_ids.contains(&IdKey::OrderOrHold(43)));
    assert_eq!(shard.busy_ids.len(), 1);
}

#[test]
fn a_reserve_retried_while_its_hold_expires_answers_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    // Commits are never routed: the expiry's release stays in flight.
    let shared = shared_with(dir.path(), 1, 1024, |_, _| {});
    let mut store = stocked(0, 1, KEY, 5);
    let hold =
        Mutation { op: Op::Reserve { id: 77, ttl_ms: 1 }, lines: vec![Line { key: KEY, qty: 2 }].into() };
    store.apply(None, 2, 1_000, &hold);
    let mut shard = Shard::new(0, shared, store);
    shard.expire_holds(); // its deadline (ts 1,001) is long past: a release starts
    assert!(shard.busy_ids.contains(&IdKey::OrderOrHold(77)), "the expiry is in flight");
    let (tx, mut rx) = outbox();
    let retry = Command::Reserve { id: 77, ttl_ms: 60_000, lines: vec![Line { key: KEY, qty: 2 }].into() };
    shard.start(opcode::RESERVE, 5, retry, Some(tx.clone()));
    assert_eq!(answer(&mut rx), Some(Response::Duplicate { lsn: 2 }));
    // Other operations on the id still wait for the one in flight.
    shard.start(opcode::CONFIRM, 6, Command::Confirm { id: 77 }, Some(tx));
    match answer(&mut rx) {
        Some(Response::Error { status: Status::Conflict, message }) => {
            assert!(message.contains("in flight"), "{message}")
        }
        other => panic!("{other:?}"),
    }
}

/// Two shards, an order id coordinated by one and a key owned by the
/// other; the log writer's batches come back to the test.
struct Pair {
    shared: Arc<Shared>,
    coord: Shard,
    rows: Shard,
    id: u64,
    key: Key,
    batches: std_mpsc::Receiver<Vec<Committed<mailbox::WalToken>>>,
    _dir: tempfile::TempDir,
}

/// State for `n` shards whose log hands each group commit to the receiver
/// (the rows a test stocks are LSN 1, so its records start at 2).
fn logging(
    dir: &std::path::Path,
    n: usize,
) -> (Arc<Shared>, std_mpsc::Receiver<Vec<Committed<mailbox::WalToken>>>) {
    let (batch_tx, batches) = std_mpsc::channel();
    let shared = shared_from(dir, n, 1024, 2, move |b, _| {
        let _ = batch_tx.send(b);
    });
    (shared, batches)
}

fn pair(units: u32) -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let (shared, batches) = logging(dir.path(), 2);
    let id = 1000;
    let c = shard_of(id, 2);
    let key = Key { item: (1..).find(|i| shard_of(*i, 2) != c).unwrap(), fc: 1 };
    let coord = Shard::new(c, shared.clone(), Store::new(c, 2, IdLimits::default()));
    let rows = Shard::new(1 - c, shared.clone(), stocked(1 - c, 2, key, units));
    Pair { shared, coord, rows, id, key, batches, _dir: dir }
}

impl Pair {
    fn next_batch(&self) -> Vec<Committed<mailbox::WalToken>> {
        self.batches.recv_timeout(Duration::from_secs(10)).expect("a group commit")
    }
}

#[test]
fn the_one_other_participant_logs_the_record_itself_and_the_coordinator_answers_once_durable() {
    let mut p = pair(10);
    let (tx, mut rx) = outbox();
    p.coord.start(opcode::ORDER, 1, order(p.id, p.key, 3), Some(tx));
    // The owner of the row prepares and logs; it sends no vote.
    assert_eq!(p.shared.mailboxes[p.rows.index()].depths().1, 1, "one prepare");
    p.rows.drain();
    p.rows.flush_log();
    assert_eq!(p.shared.mailboxes[p.coord.index()].depths().1, 0, "no vote");
    let batch = p.next_batch();
    assert_eq!(batch.len(), 1);
    commits::route_commits(&p.shared.mailboxes, batch, |_| false);
    p.rows.drain();
    p.coord.drain();
    assert!(matches!(answer(&mut rx), Some(Response::Ok(stockd_protocol::Reply::Committed { lsn: 2 }))));
    assert_eq!(p.rows.read_one(p.key), 7);
    assert!(p.coord.txns.is_empty() && p.coord.busy_ids.is_empty());
}

#[test]
fn the_one_other_participant_that_refuses_votes_and_nothing_is_logged() {
    let mut p = pair(2);
    let (tx, mut rx) = outbox();
    p.coord.start(opcode::ORDER, 1, order(p.id, p.key, 3), Some(tx));
    p.rows.drain();
    assert!(answer(&mut rx).is_none());
    p.coord.drain();
    assert_eq!(answer(&mut rx), Some(Response::Insufficient { line: 0, available: 2 }));
    // The coordinator's abort reaches the row's owner, which reserved nothing.
    p.rows.drain();
    assert_eq!(p.rows.read_one(p.key), 2);
    assert!(p.batches.recv_timeout(Duration::from_millis(100)).is_err(), "nothing was logged");
}

#[test]
fn a_record_logged_by_the_other_participant_and_then_fenced_releases_its_units() {
    let mut p = pair(10);
    let (tx, mut rx) = outbox();
    p.coord.start(opcode::ORDER, 1, order(p.id, p.key, 10), Some(tx));
    p.rows.drain();
    p.rows.flush_log();
    let batch = p.next_batch();
    commits::fence_commits(&p.shared.mailboxes, batch, &Arc::from("another node is the primary"));
    p.coord.drain();
    match answer(&mut rx) {
        Some(Response::Error { status: Status::NotPrimary, .. }) => {}
        other => panic!("{other:?}"),
    }
    p.rows.drain();
    let all = Mutation { op: Op::Order { id: 4 }, lines: vec![Line { key: p.key, qty: 10 }].into() };
    assert!(p.rows.store.prepare(99, &all).is_ok(), "the fenced order's 10 units are free again");
}

#[test]
fn the_one_other_participant_that_finds_the_log_full_drops_its_reservation_and_the_client_hears_overloaded() {
    let dir = tempfile::tempdir().unwrap();
    let (gate_tx, gate_rx) = std_mpsc::channel::<()>();
    let shared = stuck_log(dir.path(), 2, 1, gate_rx);
    let c = shard_of(1000, 2);
    let key = Key { item: (1..).find(|i| shard_of(*i, 2) != c).unwrap(), fc: 1 };
    let mut coord = Shard::new(c, shared.clone(), Store::new(c, 2, IdLimits::default()));
    let mut rows = Shard::new(1 - c, shared.clone(), stocked(1 - c, 2, key, 100));
    let ids: Vec<u64> = (1000..).filter(|i| shard_of(*i, 2) == c).take(8).collect();
    let (tx, mut rx) = outbox();
    let mut logged = 0;
    let refused = loop {
        assert!(logged < ids.len(), "the log never filled");
        coord.start(opcode::ORDER, logged as u64, order(ids[logged], key, 10), Some(tx.clone()));
        rows.drain(); // prepares and queues the record...
        rows.flush_log(); // ...which the log takes or refuses
        std::thread::sleep(Duration::from_millis(20));
        coord.drain();
        if let Some(resp) = answer(&mut rx) {
            break resp;
        }
        logged += 1;
    };
    assert_log_saturated(refused);
    rows.drain();
    // The logged orders keep their 10 units each; the refused one's are free again.
    let rest =
        Mutation { op: Op::Order { id: 4 }, lines: vec![Line { key, qty: 100 - 10 * logged as u32 }].into() };
    assert!(rows.store.prepare(99, &rest).is_ok());
    drop(gate_tx);
}

#[test]
fn shard_counters_never_share_a_cache_line() {
    // Every shard writes its counters on every order and read; a line (or
    // Intel's prefetched pair of lines) shared with a neighbour's counters
    // moves between their cores on each write.
    let stats: Vec<ShardStats> = (0..4).map(|_| ShardStats::default()).collect();
    for pair in stats.windows(2) {
        let (a, b) = (&pair[0] as *const ShardStats as usize, &pair[1] as *const ShardStats as usize);
        assert_eq!(a % 128, 0, "a shard's counters start a 128-byte block");
        assert!(b - a >= 128, "neighbours' counters {} bytes apart", b - a);
    }
}

/// Whether `mb` holds a wake-up (a stored notification), taking it.
fn woken(mb: &Mailbox) -> bool {
    use std::future::Future;
    let mut notified = std::pin::pin!(mb.notify.notified());
    notified.as_mut().poll(&mut std::task::Context::from_waker(std::task::Waker::noop())).is_ready()
}

#[test]
fn a_group_commit_wakes_only_the_shards_it_gives_something() {
    let dir = tempfile::tempdir().unwrap();
    let (shared, batches) = logging(dir.path(), 3);
    // An order whose id and row live on the same shard: the others take no part.
    let id = 1000;
    let c = shard_of(id, 3);
    let key = Key { item: (1..).find(|i| shard_of(*i, 3) == c).unwrap(), fc: 1 };
    let mut shard = Shard::new(c, shared.clone(), stocked(c, 3, key, 10));
    let (tx, mut rx) = outbox();
    shard.start(opcode::ORDER, 1, order(id, key, 3), Some(tx));
    shard.flush_log();
    let batch = batches.recv_timeout(Duration::from_secs(10)).expect("a group commit");
    for mb in shared.mailboxes.iter() {
        woken(mb); // what came before
    }
    commits::route_commits(&shared.mailboxes, batch, |_| false);
    for (i, mb) in shared.mailboxes.iter().enumerate() {
        assert_eq!(woken(mb), i == c, "shard {i} (the order's is {c})");
    }
    shard.drain();
    assert!(matches!(answer(&mut rx), Some(Response::Ok(stockd_protocol::Reply::Committed { lsn: 2 }))));
    // A snapshot's mark goes to every shard, and wakes each.
    let second = (id + 1..).find(|i| shard_of(*i, 3) == c).unwrap();
    shard.start(opcode::ORDER, 2, order(second, key, 1), None);
    shard.flush_log();
    let batch = batches.recv_timeout(Duration::from_secs(10)).expect("a group commit");
    commits::route_commits(&shared.mailboxes, batch, |_| true);
    assert!(shared.mailboxes.iter().all(woken), "every shard takes the snapshot");
}
