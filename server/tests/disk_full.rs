//! A full disk under the log (a small tmpfs mounted for the test): stockd
//! stops loudly rather than acknowledge what it could not make durable,
//! nothing acknowledged is lost, and once there is space again a restart
//! recovers cleanly. Mounting needs root: without it the test prints
//! SKIPPED and checks nothing.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use stockd_client::{Applied, Error, Line};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_stockd_loudly_and_loses_nothing_acknowledged() {
    let Some(fs) = Tmpfs::mount(3) else {
        println!("SKIPPED: the disk-full test needs root to mount a tmpfs");
        return;
    };
    let dir = fs.path().join("data");
    let port = free_port();
    let args = ["--shards", "2", "--snapshot-interval-secs", "3600"];
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_stockd"))
            .args(["--listen", &format!("127.0.0.1:{port}"), "--shard-port-base", "0"])
            .args(args)
            .arg("--data-dir")
            .arg(&dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped()) // stockd logs to stdout
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let c = client_at(port).await;
    // 256-line inbounds of 1 unit each (about 4 KiB of log each) until the disk is full.
    let lines: Vec<Line> = (0..256).map(|i| Line::new(i, 1, 1)).collect();
    let (mut acked, mut id, t) = (0u64, 0u64, Instant::now());
    let stopped = loop {
        id += 1;
        match c.inbound(id, &lines).await {
            Ok(Applied::New { .. }) => acked += 1,
            Ok(other) => panic!("a fresh receipt answered {other:?}"),
            Err(Error::Server { .. }) => {} // overloaded, say: not applied
            Err(_) => break true,           // the connection died with the server
        }
        if t.elapsed() > Duration::from_secs(60) {
            break false;
        }
    };
    assert!(stopped, "3 MiB filled within 60 s and the server stopped");
    let status = child.0.wait().unwrap();
    assert!(!status.success(), "stockd stopped with a failure status: {status}");
    let mut log = String::new();
    std::io::Read::read_to_string(child.0.stdout.as_mut().unwrap(), &mut log).unwrap();
    assert!(log.contains("write-ahead log write or fdatasync failed"), "it said why: {log}");
    assert!(acked > 100, "the log took a few hundred records first ({acked})");

    // Space returns; a restart recovers everything that was acknowledged.
    fs.grow(64);
    let d = Daemon::spawn(&dir, port, &args);
    let c = d.client().await;
    let mut verified = 0;
    for rid in 1..=acked {
        match c.inbound(rid, &lines).await.unwrap() {
            Applied::Duplicate { .. } => verified += 1,
            Applied::New { .. } => panic!("acknowledged receipt {rid} was lost"),
        }
    }
    assert_eq!(verified, acked);
    let keys: Vec<_> = (0..256).map(|i| stockd_client::Key { item: i, fc: 1 }).collect();
    let rows = c.query_batch(&keys).await.unwrap();
    // Receipts after the acknowledged ones (unanswered) may or may not be there.
    assert!(rows.iter().all(|r| *r >= acked && *r <= id), "rows {:?} vs {acked} acknowledged", &rows[..4]);
    assert!(rows.windows(2).all(|w| w[0] == w[1]), "every line of a receipt or none");
    drop(c);
    d.terminate();
}

/// The first server, killed if the test fails before it stops by itself (so the tmpfs can go).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
