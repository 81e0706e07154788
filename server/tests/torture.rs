//! A few cycles of stock-torture against the stockd binary: kill -9 under
//! load, restart with another shard count, every acknowledgement and every
//! unit accounted for; and the same against a replicated pair, whose
//! primary is killed each cycle. (docs/reliability.md reports longer runs.)

mod common;

use std::process::Command;

use common::servers::Kafka;

fn torture(extra: &[&str]) {
    let args =
        ["--stockd", env!("CARGO_BIN_EXE_stockd"), "--cycles", "3", "--max-load-ms", "400", "--seed", "7"];
    let out = Command::new(env!("CARGO_BIN_EXE_stock-torture")).args(args).args(extra).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "violations:\n{stderr}\n{stdout}");
    let summary = stdout.lines().last().expect("a summary row");
    let cells: Vec<&str> = summary.split('|').map(str::trim).collect();
    // | cycles | acknowledged | verified | unanswered (applied) | violations | ...
    assert_eq!(cells[1], "3", "{summary}");
    assert_eq!(cells[2], cells[3], "every acknowledgement verified: {summary}");
    assert!(cells[2].parse::<u64>().unwrap() > 0, "the load ran: {summary}");
    assert_eq!(cells[5], "0", "{summary}");
}

#[test]
fn a_few_kill_9_cycles_lose_nothing() {
    torture(&[]);
}

#[test]
fn a_few_failovers_after_kill_9_lose_nothing() {
    let kafka = Kafka::start();
    torture(&["--kafka-brokers", &kafka.brokers(), "--shards", "2", "--failover-timeout-ms", "300"]);
}
