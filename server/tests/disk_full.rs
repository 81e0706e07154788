//! A full disk under the log (a small tmpfs mounted for the test): stockd
//! keeps answering reads, refuses new mutations with a clear error, holds
//! the records its log writer already had until there is room, and then
//! goes on; nothing acknowledged is lost, across a restart too; told to
//! stop while it waits, it stops, and what it held was never applied.
//! Mounting needs root: without it the test prints SKIPPED and checks
//! nothing.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use common::*;
use stockd_client::{Applied, Client, Error, Key, Line, Status};

/// A tmpfs of `mb` MiB mounted at a fresh directory; unmounted when dropped
/// (then the directory goes with `_dir`).
struct Tmpfs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(mb: u32) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "tmpfs"])
            .arg(dir.path())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs { path: dir.path().to_path_buf(), _dir: dir })
    }

    fn grow(&self, mb: u32) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={mb}m")])
            .arg(&self.path)
            .status()
            .unwrap()
            .success();
        assert!(ok, "remount with more space");
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}

/// What a mutation refused for lack of room on the log's disk answers.
fn no_room(r: &Result<Applied, Error>) -> bool {
    matches!(r, Err(Error::Server { status: Status::Overloaded, message }) if message.contains("no room"))
}

/// Every row of `keys` holds `units`.
async fn rows_hold(c: &Client, keys: &[Key], units: u64) {
    let rows = c.query_batch(keys).await.unwrap();
    assert!(rows.iter().all(|r| *r == units), "rows {:?}.. hold {units} each", &rows[..4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_holds_mutations_keeps_reads_and_loses_nothing() {
    let Some(fs) = Tmpfs::mount(3) else {
        println!("SKIPPED: the disk-full test needs root to mount a tmpfs");
        return;
    };
    let dir = fs.path().join("data");
    let port = free_port();
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let m = metrics.to_string();
    let args = ["--shards", "2", "--snapshot-interval-secs", "3600", "--metrics-listen", &m];
    let stalled = || sample(&get(metrics, "/metrics").1, "stockd_wal_stalled");
    let d = Daemon::spawn(&dir, port, &args);
    let c = d.client().await;
    // 256-line inbounds of 1 unit each (about 4 KiB of log each) until one
    // is refused for lack of room; those the log writer holds meanwhile
    // are not answered (given up on here after 2 s).
    let lines: Vec<Line> = (0..256).map(|i| Line::new(i, 1, 1)).collect();
    let keys: Vec<Key> = (0..256).map(|i| Key { item: i, fc: 1 }).collect();
    let (mut acked, mut held, mut id, t) = (Vec::new(), Vec::new(), 0u64, Instant::now());
    let refused = loop {
        id += 1;
        match tokio::time::timeout(Duration::from_secs(2), c.inbound(id, &lines)).await {
            Ok(Ok(Applied::New { .. })) => acked.push(id),
            Ok(r) if no_room(&r) => break id,
            Ok(other) => panic!("receipt {id} answered {other:?}"),
            Err(_) => held.push(id),
        }
        assert!(t.elapsed() < Duration::from_secs(60), "3 MiB filled within 60 s");
    };
    assert!(acked.len() > 100, "the log took a few hundred records first ({})", acked.len());
    println!("{} receipts acknowledged, {:?} held, {refused} refused for lack of room", acked.len(), held);
    // Reads go on, and show exactly what was acknowledged.
    rows_hold(&c, &keys, acked.len() as u64).await;
    assert!(no_room(&c.order(1_000_000, &[Line::new(0, 1, 1)]).await), "an order is refused too");
    assert_eq!(stalled(), 1.0, "the metrics say the log writer waits");
    let stats = c.stats().await.unwrap();
    assert!(stats.contains(&("wal_stalled".to_string(), 1)), "and STATS: {stats:?}");

    // Room again: the log writer writes what it held and takes new mutations.
    fs.grow(64);
    let next = AtomicU64::new(2_000_000);
    let taken = eventually(Duration::from_secs(10), || async {
        let id = next.fetch_add(1, Relaxed);
        matches!(c.inbound(id, &lines).await, Ok(Applied::New { .. }))
    })
    .await;
    assert!(taken, "mutations are taken again within 10 s of the room coming back");
    assert_eq!(stalled(), 0.0);
    assert_eq!(sample(&get(metrics, "/metrics").1, "stockd_wal_stalls_total"), 1.0, "one episode");
    let fresh = next.load(Relaxed) - 1; // the one taken
    for &h in &held {
        let r = c.inbound(h, &lines).await.unwrap();
        assert!(
            matches!(r, Applied::Duplicate { .. }),
            "held receipt {h} was written once there was room: {r:?}"
        );
    }
    let r = c.inbound(refused, &lines).await.unwrap();
    assert!(matches!(r, Applied::New { .. }), "the refused receipt {refused} had not been applied: {r:?}");
    let applied = (acked.len() + held.len() + 2) as u64;
    rows_hold(&c, &keys, applied).await;
    drop(c);

    // kill -9 and a restart: everything acknowledged is there, once.
    d.kill_9();
    let d = Daemon::spawn(&dir, port, &args);
    let c = d.client().await;
    rows_hold(&c, &keys, applied).await;
    for id in acked.iter().chain(&held).chain([&refused, &fresh]) {
        let r = c.inbound(*id, &lines).await.unwrap();
        assert!(matches!(r, Applied::Duplicate { .. }), "receipt {id} after the restart: {r:?}");
    }

    // Full again (a file fills the rest), and the server told to stop
    // while its log writer waits: it stops, and what it held is not applied.
    let filler = fs.path().join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let mb = vec![7u8; 1 << 20];
    while std::io::Write::write_all(&mut f, &mb).is_ok() {}
    let (mut id, mut held, t) = (3_000_000u64, Vec::new(), Instant::now());
    let refused = loop {
        id += 1;
        match tokio::time::timeout(Duration::from_secs(2), c.inbound(id, &lines)).await {
            Ok(r) if no_room(&r) => break id,
            Ok(Ok(Applied::New { .. })) => {} // room left in a segment laid down ahead
            Ok(other) => panic!("receipt {id} answered {other:?}"),
            Err(_) => held.push(id),
        }
        assert!(t.elapsed() < Duration::from_secs(60), "the disk filled up again within 60 s");
    };
    println!("full again: {:?} held, {refused} refused; stopping", held);
    drop(c);
    d.terminate(); // asserts a clean exit within 20 s
    drop(f);
    std::fs::remove_file(&filler).unwrap();
    let d = Daemon::spawn(&dir, port, &args);
    let c = d.client().await;
    let rows = c.query_batch(&keys).await.unwrap();
    assert!(rows.windows(2).all(|w| w[0] == w[1]), "every line of a receipt or none");
    for id in held.iter().chain([&refused]) {
        let r = c.inbound(*id, &lines).await.unwrap();
        assert!(
            matches!(r, Applied::New { .. }),
            "receipt {id}, held or refused before the stop, was not applied: {r:?}"
        );
    }
    drop(c);
    d.terminate();
}
