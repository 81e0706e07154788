//! A failed fdatasync, injected under the real binary: stockd must not
//! acknowledge the records of that group commit, must stop loudly (after a
//! failed fsync the kernel may have dropped the dirty pages, so retrying
//! could acknowledge data that is not on disk), and must recover every
//! acknowledged mutation on restart.
//!
//! The fault comes from a small preload library, built here with the
//! system C compiler, that makes `fdatasync` fail with EIO once a flag
//! file exists.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{client_at, free_port};
use stockd_client::{Applied, Error, Line};

const SHIM: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    const char *flag = getenv("STOCKD_TEST_FAIL_FDATASYNC");
    if (flag && access(flag, F_OK) == 0) {
        errno = EIO;
        return -1;
    }
    return real(fd);
}
"#;

/// A child process killed when dropped, also when the test fails half way.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn build_shim(dir: &Path) -> std::path::PathBuf {
    let src = dir.join("fail_fdatasync.c");
    let lib = dir.join("libfail_fdatasync.so");
    std::fs::write(&src, SHIM).unwrap();
    let out = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&lib)
        .arg(&src)
        .arg("-ldl")
        .output()
        .expect("a C compiler (cc) builds the fault shim; .ci/run installs one");
    assert!(out.status.success(), "cc: {}", String::from_utf8_lossy(&out.stderr));
    lib
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fdatasync_acknowledges_nothing_stops_stockd_and_loses_nothing_acknowledged() {
    let tools = tempfile::tempdir().unwrap();
    let shim = build_shim(tools.path());
    let flag = tools.path().join("fail-now");
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let stockd = |preload: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_stockd"));
        cmd.args(["--listen", &format!("127.0.0.1:{port}"), "--shard-port-base", "0", "--shards", "2"])
            .arg("--data-dir")
            .arg(data.path())
            .env("RUST_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if preload {
            cmd.env("LD_PRELOAD", &shim).env("STOCKD_TEST_FAIL_FDATASYNC", &flag);
        }
        Reaped(cmd.spawn().unwrap())
    };

    let mut child = stockd(true);
    let c = client_at(port).await;
    for id in 1..=50u64 {
        c.inbound(id, &[Line::new(id % 5, 1, 10)]).await.expect("acknowledged while fdatasync works");
    }
    std::fs::write(&flag, b"").unwrap();
    let failed = c.inbound(1_000, &[Line::new(1, 1, 10)]).await;
    assert!(
        matches!(failed, Err(Error::Io(_)) | Err(Error::Disconnected)),
        "a record whose fdatasync failed is never acknowledged: {failed:?}"
    );
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "stockd stops after a failed fdatasync");
        std::thread::sleep(Duration::from_millis(20));
    };
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGABRT), "stockd aborts: {status}");
    let mut said = String::new();
    std::io::Read::read_to_string(child.0.stdout.as_mut().unwrap(), &mut said).unwrap();
    assert!(said.contains("fdatasync failed; aborting"), "it says why: {said}");

    // The disk is healthy again: every acknowledged receipt is there.
    std::fs::remove_file(&flag).unwrap();
    let _child = stockd(false);
    let c = client_at(port).await;
    for id in 1..=50u64 {
        let again = c.inbound(id, &[Line::new(id % 5, 1, 10)]).await.unwrap();
        assert!(
            matches!(again, Applied::Duplicate { .. }),
            "receipt {id} was acknowledged, so it survives: {again:?}"
        );
    }
    let mut total = 0;
    for item in 0..5u64 {
        total += c.query(item, 1).await.unwrap();
    }
    // The failed group commit's bytes may still be in the page cache and be
    // replayed: a mutation never acknowledged may be applied or not.
    assert!(total == 500 || total == 510, "50 receipts of 10, and the unacknowledged one at most: {total}");
}
