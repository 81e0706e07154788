//! stockd-log against a real data directory: every record, as JSON lines,
//! from a given LSN, read-only.

mod common;

use std::process::Command;

use common::*;
use stockd_client::Line;

fn stockd_log(dir: &std::path::Path, args: &[&str]) -> (Vec<serde_json::Value>, String, bool) {
    let out = Command::new(env!("CARGO_BIN_EXE_stockd-log"))
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .output()
        .unwrap();
    let lines = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    (lines, String::from_utf8(out.stderr).unwrap(), out.status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prints_every_record_from_an_lsn_as_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 2);
    let c = client(&server).await;
    c.inbound(7, &[Line::new(1001, 3, 10)]).await.unwrap();
    c.order(42, &[Line::new(1001, 3, 2)]).await.unwrap();
    c.reserve(43, 60_000, &[Line::new(1001, 3, 1)]).await.unwrap();
    c.release(43).await.unwrap();
    c.adjust(1001, 3, 5, 9).await.unwrap();
    // Read while the server runs: the tool changes nothing.
    let (all, _, ok) = stockd_log(dir.path(), &[]);
    assert!(ok);
    let types: Vec<&str> = all.iter().map(|r| r["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["layout", "inbound", "order", "reserve", "release", "adjust"]);
    assert_eq!(all[0]["shards"], 2);
    let order = &all[2];
    assert_eq!((order["lsn"].as_u64(), order["id"].as_u64()), (Some(3), Some(42)));
    assert_eq!(
        order["lines"][0],
        serde_json::json!({"vendor_item_id": 1001, "fulfillment_center_id": 3, "qty": 2})
    );
    assert_eq!(all[3]["ttl_ms"], 60_000);
    assert_eq!(all[4]["expired"], false);
    assert_eq!((all[5]["on_hand_before"].as_u64(), all[5]["on_hand_after"].as_u64()), (Some(8), Some(5)));
    let (tail, _, _) = stockd_log(dir.path(), &["--from", "4", "--count", "2"]);
    let lsns: Vec<u64> = tail.iter().map(|r| r["lsn"].as_u64().unwrap()).collect();
    assert_eq!(lsns, [4, 5]);
    server.shutdown();
}

#[test]
fn a_directory_without_a_log_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (lines, err, ok) = stockd_log(dir.path(), &[]);
    assert!(!ok && lines.is_empty());
    assert!(err.contains("no log segments"), "{err}");
}

/// A reader that stops early (`stockd-log | head`) is not an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_early_is_not_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 1);
    let c = client(&server).await;
    c.inbound(7, &[Line::new(1001, 3, 10)]).await.unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_stockd-log"))
        .arg("--data-dir")
        .arg(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // gone before the first line is written
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.is_empty(), "exit {:?}: {stderr}", out.status);
    server.shutdown();
}
