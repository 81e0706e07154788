//! Replication through a real Kafka-protocol broker (tansu) between real
//! `stockd` processes on 127.0.0.1 (docs/ha.md): a standby takes over when
//! the primary is killed, a primary that was replaced acknowledges nothing
//! the topic did not confirm and rejoins after a restart, and of two
//! standbys racing to take over exactly one serves.
//!
//! Every mutation the load sends is journaled with what its client saw;
//! afterwards every acknowledged one must answer DUPLICATE on the new
//! primary, and every row must equal its initial stock plus the inbounds
//! and less the orders that were applied, exactly.

mod common;

use std::time::{Duration, Instant};

use common::journal::{account, acked_at_least, load, Fate, Journal};
use common::proxy::KafkaProxy;
use common::servers::Kafka;
use common::{client_at, free_port, Daemon};
use stockd_client::{Applied, Client, Error, Key, Line, Options, Replicated, Status};

const ITEMS: u64 = 16;
const INITIAL: u64 = 1_000;
const FAILOVER_MS: u64 = 1_000;
/// An item nobody stocks: an order for it is refused by a primary, and
/// answered NOT_PRIMARY by any other node, without changing anything.
const PROBE_ITEM: u64 = 1 << 40;

/// One test at a time: each runs a broker and two or three servers.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn node(dir: &std::path::Path, port: u16, kafka: &Kafka, role: &str) -> Daemon {
    let brokers = kafka.brokers();
    let timeout = FAILOVER_MS.to_string();
    let args = ["--shards", "2", "--kafka-brokers", &brokers, role, "--failover-timeout-ms", &timeout];
    Daemon::spawn(dir, port, &args)
}

/// Waits until the server on `port` takes mutations; returns how long that took.
async fn until_primary(port: u16, limit: Duration) -> Duration {
    let t = Instant::now();
    let c = client_at(port).await;
    loop {
        match c.order(u64::MAX - 1, &[Line::new(PROBE_ITEM, 1, 1)]).await {
            Err(Error::Insufficient { .. }) => return t.elapsed(),
            Err(Error::Server { status: Status::NotPrimary, .. }) => {}
            other => panic!("probe order: {other:?}"),
        }
        assert!(t.elapsed() < limit, "127.0.0.1:{port} did not become the primary within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The answer a non-primary gives, with the message.
async fn not_primary(port: u16) -> Option<String> {
    let c = client_at(port).await;
    match c.order(u64::MAX - 1, &[Line::new(PROBE_ITEM, 1, 1)]).await {
        Err(Error::Server { status: Status::NotPrimary, message }) => Some(message),
        _ => None,
    }
}

async fn stock(c: &Client) {
    let initial: Vec<Line> = (0..ITEMS).map(|i| Line::new(i, 1, INITIAL as u32)).collect();
    c.inbound(u64::MAX, &initial).await.unwrap();
}

/// A broker, a primary and a standby, each node in a data directory of its own.
struct Pair {
    kafka: Kafka,
    dirs: [tempfile::TempDir; 2],
    ports: [u16; 2],
    primary: Daemon,
    standby: Daemon,
}

/// Starts a broker and a primary, stocks every row through the primary, then starts a standby.
async fn pair() -> Pair {
    pair_on(Kafka::start()).await
}

/// [`pair`] on a broker of the caller's.
async fn pair_on(kafka: Kafka) -> Pair {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let ports = [free_port(), free_port()];
    let primary = node(dirs[0].path(), ports[0], &kafka, "--replicate");
    until_primary(ports[0], Duration::from_secs(20)).await;
    stock(&client_at(ports[0]).await).await;
    let standby = node(dirs[1].path(), ports[1], &kafka, "--standby");
    client_at(ports[1]).await;
    Pair { kafka, dirs, ports, primary, standby }
}

/// Every row as `port` answers it.
async fn rows(port: u16) -> Vec<u64> {
    let keys: Vec<Key> = (0..ITEMS).map(|i| Key { item: i, fc: 1 }).collect();
    client_at(port).await.query_batch(&keys).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_takes_over_after_kill_9_with_every_acknowledgement() {
    let _serial = SERIAL.lock().await;
    let Pair { kafka: _kafka, dirs: _dirs, ports: [a_port, b_port], primary: a, standby: b } = pair().await;
    let c = client_at(a_port).await;
    let t = Instant::now();
    loop {
        let message = not_primary(b_port).await.expect("a standby refuses mutations");
        if message.contains(&format!("127.0.0.1:{a_port}")) {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "the standby never named the primary: {message}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let (journal, stop): (Journal, _) = Default::default();
    let tasks = load(&c, 16, 1, ITEMS, &journal, &stop);
    acked_at_least(&journal, 1_500).await;
    a.kill_9();
    let killed = Instant::now();
    for t in tasks {
        t.await.unwrap();
    }
    until_primary(b_port, Duration::from_secs(20)).await;
    let failover = killed.elapsed();
    assert!(
        failover < Duration::from_millis(FAILOVER_MS + 2_000),
        "the standby took over {failover:?} after the kill (timeout {FAILOVER_MS} ms)"
    );
    let journal = std::mem::take(&mut *journal.lock().unwrap());
    let a = account(&client_at(b_port).await, &journal, ITEMS, INITIAL).await;
    eprintln!(
        "failover: {} acknowledged by the old primary, all there; {} unanswered; serving after {failover:?}",
        a.acked, a.unknown
    );
    drop(b);
}

/// Waits until `port` answers every row as `want`.
async fn converges(port: u16, want: &[u64]) {
    let t = Instant::now();
    loop {
        let got = rows(port).await;
        if got == want {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "127.0.0.1:{port} shows {got:?}, the primary {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_primary_acknowledges_nothing_unconfirmed_and_rejoins_after_restart() {
    let _serial = SERIAL.lock().await;
    let Pair { kafka, dirs, ports: [a_port, b_port], primary: a, standby: b } = pair().await;
    let c = client_at(a_port).await;

    // The primary stops answering (SIGSTOP) with mutations in flight: the
    // standby takes over; when the old primary wakes up, the topic has a
    // newer epoch, and what it logged meanwhile is never acknowledged.
    let (journal, stop): (Journal, _) = Default::default();
    let tasks = load(&c, 16, 2, ITEMS, &journal, &stop);
    acked_at_least(&journal, 1_000).await;
    a.pause();
    until_primary(b_port, Duration::from_secs(20)).await;
    a.resume();
    for t in tasks {
        t.await.unwrap(); // every task ends on NOT_PRIMARY
    }
    let message = not_primary(a_port).await.expect("the replaced primary refuses mutations");
    assert!(message.contains("replaced") && message.contains(&format!("127.0.0.1:{b_port}")), "{message}");
    let journal = std::mem::take(&mut *journal.lock().unwrap());
    let refused = journal.iter().filter(|(_, f)| *f == Fate::Refused).count();
    let accounted = account(&client_at(b_port).await, &journal, ITEMS, INITIAL).await;
    assert_eq!(accounted.unknown, 0, "every request had an answer");
    eprintln!(
        "replaced primary: {} acknowledged, all on the new primary; {refused} refused",
        accounted.acked
    );

    // New mutations on the new primary; the old one restarts, cuts what the
    // topic never confirmed, and follows as a standby.
    let cb = client_at(b_port).await;
    cb.inbound(u64::MAX - 7, &[Line::new(3, 1, 11)]).await.unwrap();
    a.terminate();
    let a = node(dirs[0].path(), a_port, &kafka, "--replicate");
    let want = rows(b_port).await;
    converges(a_port, &want).await;
    assert!(not_primary(a_port).await.expect("rejoined as a standby").contains("standby"));
    cb.order(u64::MAX - 8, &[Line::new(3, 1, 5)]).await.unwrap();
    converges(a_port, &rows(b_port).await).await;
    drop((a, b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_standbys_racing_to_take_over_exactly_one_serves() {
    let _serial = SERIAL.lock().await;
    let kafka = Kafka::start();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let a = node(dirs[0].path(), ports[0], &kafka, "--replicate");
    until_primary(ports[0], Duration::from_secs(20)).await;
    let b = node(dirs[1].path(), ports[1], &kafka, "--standby");
    let s = node(dirs[2].path(), ports[2], &kafka, "--standby");
    let c = client_at(ports[0]).await;
    stock(&c).await;
    c.order(5, &[Line::new(1, 1, 7)]).await.unwrap();
    let want = rows(ports[0]).await;
    converges(ports[1], &want).await;
    converges(ports[2], &want).await;
    a.kill_9();
    // Both standbys see the same silence and both ask; the first promotion
    // in the topic wins and the other follows it.
    let t = Instant::now();
    let winner = loop {
        let mut serving = Vec::new();
        for &p in &ports[1..] {
            if not_primary(p).await.is_none() {
                serving.push(p);
            }
        }
        assert!(serving.len() <= 1, "two primaries: {serving:?}");
        if let [p] = serving[..] {
            break p;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "no standby took over");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let loser = if winner == ports[1] { ports[2] } else { ports[1] };
    // Well past another failover timeout: still one primary, and the other names it.
    tokio::time::sleep(Duration::from_millis(3 * FAILOVER_MS)).await;
    let message = not_primary(loser).await.expect("the other stays a standby");
    assert!(message.contains(&format!("127.0.0.1:{winner}")), "{message}");
    assert!(not_primary(winner).await.is_none());
    let cw = client_at(winner).await;
    assert!(matches!(cw.order(5, &[Line::new(1, 1, 7)]).await, Ok(Applied::Duplicate { .. })));
    cw.order(6, &[Line::new(1, 1, 2)]).await.unwrap();
    converges(loser, &rows(winner).await).await;
    drop((b, s));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_follows_the_primary_through_a_failover() {
    let _serial = SERIAL.lock().await;
    let Pair { kafka: _kafka, dirs: _dirs, ports: [a_port, b_port], primary: a, standby: b } = pair().await;
    // The standby first: the client finds the primary by its NOT_PRIMARY answer.
    let addrs = format!("127.0.0.1:{b_port},127.0.0.1:{a_port}");
    let c = Replicated::new(&addrs, Options::default()).unwrap();
    c.inbound(1, &[Line::new(1, 1, 100)]).await.unwrap();
    for id in 2..50 {
        assert!(matches!(c.order(id, &[Line::new(1, 1, 1)]).await, Ok(Applied::New { .. })));
    }
    a.kill_9();
    // The caller sees no failover: the call waits for the new primary.
    let t = Instant::now();
    assert!(matches!(c.order(50, &[Line::new(1, 1, 1)]).await, Ok(Applied::New { .. })));
    eprintln!("an order through the failover took {:?}", t.elapsed());
    assert!(matches!(c.order(49, &[Line::new(1, 1, 1)]).await, Ok(Applied::Duplicate { .. })));
    assert_eq!(c.query(1, 1).await.unwrap(), INITIAL + 100 - 49);
    drop(b);
}

/// Every message of partition 0 of `topic`, from the start to its end.
fn topic_messages(kafka: &Kafka, topic: &str) -> Vec<Vec<u8>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Message, Offset, TopicPartitionList};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka.brokers())
        .set("group.id", "stockd-ha-test")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("fetch.wait.max.ms", "10")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning).unwrap();
    consumer.assign(&tpl).unwrap();
    let (mut out, t) = (Vec::new(), Instant::now());
    while t.elapsed() < Duration::from_secs(30) {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => out.push(m.payload().unwrap_or_default().to_vec()),
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => return out,
            _ => {}
        }
    }
    panic!("{topic} was not read to its end in 30 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_sent_and_stale_records_change_nothing() {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let _serial = SERIAL.lock().await;
    let Pair { kafka, dirs, ports: [a_port, b_port], primary: a, standby: b } = pair().await;
    let c = client_at(a_port).await;
    for id in 1..=20 {
        c.order(id, &[Line::new(id % ITEMS, 1, 3)]).await.unwrap();
    }
    let before = rows(a_port).await;
    converges(b_port, &before).await;

    // Every message again, as a producer that was recreated after an error
    // would send it, and each data message once more under an epoch that
    // never had a primary (0) and under one no promotion started (99).
    let messages = topic_messages(&kafka, "stock.log");
    assert!(messages.len() > 20, "the topic holds the primary's records ({} messages)", messages.len());
    let producer: BaseProducer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", kafka.brokers()).create().unwrap();
    let mut sent = 0;
    for m in &messages {
        let mut copies = vec![m.clone()];
        if m[1] == 1 {
            for epoch in [0u64, 99] {
                let mut stale = m.clone();
                stale[2..10].copy_from_slice(&epoch.to_le_bytes());
                copies.push(stale);
            }
        }
        for bytes in copies {
            producer.send(BaseRecord::<(), [u8]>::to("stock.log").partition(0).payload(&bytes[..])).unwrap();
            sent += 1;
        }
    }
    producer.flush(Duration::from_secs(10)).unwrap();
    assert!(sent > messages.len());

    // Nothing changed on either node, and both go on.
    c.order(21, &[Line::new(2, 1, 4)]).await.unwrap();
    let after = rows(a_port).await;
    let mut want = before.clone();
    want[2] -= 4;
    assert_eq!(after, want, "the primary applied nothing twice");
    converges(b_port, &want).await;

    // The standby's log is the primary's, record for record: LSN, timestamp
    // (ids age by it) and payload.
    let log = |dir: &std::path::Path| {
        let mut out = Vec::new();
        stockd_persistence::wal::scan(dir, 0, |r| out.push((r.lsn, r.ts_ms, r.payload.to_vec()))).unwrap();
        out
    };
    let (primary_log, standby_log) = (log(dirs[0].path()), log(dirs[1].path()));
    assert!(primary_log.len() > 20, "{} records", primary_log.len());
    assert_eq!(standby_log, primary_log);
    drop((a, b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promote_hands_over_from_a_live_primary_without_losing_an_acknowledgement() {
    let _serial = SERIAL.lock().await;
    let Pair { kafka: _kafka, dirs: _dirs, ports: [a_port, b_port], primary: a, standby: b } = pair().await;
    let c = client_at(a_port).await;
    let stat =
        |stats: Vec<(String, u64)>, name: &str| stats.into_iter().find(|(k, _)| k == name).map(|(_, v)| v);
    let cb = client_at(b_port).await;
    assert_eq!(stat(cb.stats().await.unwrap(), "replication_role"), Some(0), "a standby");
    assert_eq!(stat(c.stats().await.unwrap(), "replication_role"), Some(1), "the primary");
    assert!(c.promote().await.is_ok(), "the primary has nothing to do");

    // A switchover under load: the standby is told to take over while the
    // primary is alive and taking orders.
    let (journal, stop): (Journal, _) = Default::default();
    let tasks = load(&c, 16, 3, ITEMS, &journal, &stop);
    acked_at_least(&journal, 500).await;
    cb.promote().await.unwrap();
    until_primary(b_port, Duration::from_secs(20)).await;
    for t in tasks {
        t.await.unwrap(); // every task ends on NOT_PRIMARY from the old primary
    }
    let journal = std::mem::take(&mut *journal.lock().unwrap());
    let accounted = account(&cb, &journal, ITEMS, INITIAL).await;
    assert_eq!(accounted.unknown, 0, "every request had an answer");
    let message = not_primary(a_port).await.expect("the old primary is replaced");
    assert!(message.contains(&format!("127.0.0.1:{b_port}")), "{message}");
    assert_eq!(stat(c.stats().await.unwrap(), "replication_role"), Some(2), "replaced");
    assert!(matches!(c.promote().await, Err(Error::Server { status: Status::Conflict, .. })));
    assert_eq!(stat(cb.stats().await.unwrap(), "replication_epoch"), Some(2));
    eprintln!("switchover: {} acknowledged by the old primary, all on the new one", accounted.acked);
    drop((a, b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_cut_off_from_kafka_acknowledges_nothing_the_new_primary_lacks() {
    let _serial = SERIAL.lock().await;
    // Every connection to the broker goes through a proxy that can cut one
    // node's clients off while the node itself runs on.
    let broker_port = free_port();
    let proxy = KafkaProxy::start(move || broker_port);
    let kafka = Kafka::start_on(broker_port, proxy.port);
    let Pair { kafka, dirs, ports: [a_port, b_port], primary: a, standby: b } = pair_on(kafka).await;
    let c = client_at(a_port).await;
    let a_clients = format!("stockd-{}", c.hello().server_id);
    let (journal, stop): (Journal, _) = Default::default();
    let tasks = load(&c, 16, 4, ITEMS, &journal, &stop);
    acked_at_least(&journal, 500).await;

    // Cut off: the primary goes on logging what its clients send, but
    // nothing reaches Kafka and nothing comes back; the standby hears no
    // heartbeat and takes over.
    proxy.cut(&a_clients);
    let logged =
        |stats: Vec<(String, u64)>| stats.into_iter().find(|(k, _)| k == "wal_records").map(|(_, v)| v);
    let logged_at_cut = logged(c.stats().await.unwrap());
    // A new order during the cut: logged and fsynced here, never confirmed.
    let unconfirmed = Line::new(5, 1, 1);
    let probe = tokio::spawn({
        let c = c.clone();
        async move { c.order(u64::MAX - 9, &[unconfirmed]).await }
    });
    let t = Instant::now();
    while logged(c.stats().await.unwrap()) == logged_at_cut {
        assert!(t.elapsed() < Duration::from_secs(10), "the cut-off primary did not log the new order");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    until_primary(b_port, Duration::from_secs(20)).await;
    let acked_before_heal = journal.lock().unwrap().iter().filter(|(_, f)| *f == Fate::Acked).count();
    assert!(!probe.is_finished(), "the order logged during the cut is not answered while cut off");

    // Healed: the old primary reads the new epoch, answers its waiting
    // clients NOT_PRIMARY, and refuses from then on.
    proxy.heal(&a_clients);
    for t in tasks {
        t.await.unwrap();
    }
    let answer = probe.await.unwrap();
    assert!(matches!(answer, Err(Error::Server { status: Status::NotPrimary, .. })), "{answer:?}");
    let journal = std::mem::take(&mut *journal.lock().unwrap());
    // Acknowledged after the heal: records that reached the partition
    // before the new primary's promotion, read back only now. Every
    // acknowledgement, before or after, must be in the new primary's history.
    let after_heal = journal.iter().filter(|(_, f)| *f == Fate::Acked).count() - acked_before_heal;
    let accounted = account(&client_at(b_port).await, &journal, ITEMS, INITIAL).await;
    assert_eq!(accounted.unknown, 0, "every request had an answer");
    let message = not_primary(a_port).await.expect("the old primary is replaced");
    assert!(message.contains(&format!("127.0.0.1:{b_port}")), "{message}");
    eprintln!(
        "cut off: {} acknowledged by the old primary ({after_heal} after the heal), all on the new one",
        accounted.acked
    );

    // The new primary never saw that order: sent there, it is new.
    let cb = client_at(b_port).await;
    assert!(matches!(cb.order(u64::MAX - 9, &[unconfirmed]).await, Ok(Applied::New { .. })));

    // Restarted, the old primary cuts what it logged during the cut and follows.
    a.terminate();
    let a = node(dirs[0].path(), a_port, &kafka, "--replicate");
    converges(a_port, &rows(b_port).await).await;
    drop((a, b, proxy));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_with_another_shard_count_stops_and_says_which() {
    let _serial = SERIAL.lock().await;
    let Pair { kafka, dirs: _dirs, ports: [_, _], primary: a, standby: b } = pair().await;
    let dir = tempfile::tempdir().unwrap();
    let mut standby = std::process::Command::new(env!("CARGO_BIN_EXE_stockd"))
        .args(["--listen", &format!("127.0.0.1:{}", free_port()), "--shard-port-base", "0", "--shards", "3"])
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--kafka-brokers", &kafka.brokers(), "--standby"])
        .env("RUST_LOG", "off")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(status) = standby.try_wait().unwrap() {
            break status;
        }
        if t.elapsed() > Duration::from_secs(30) {
            let _ = standby.kill();
            panic!("a standby with the wrong shard count still runs after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut standby.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("restart it with --shards 2"), "{stderr}");
    drop((a, b));
}
