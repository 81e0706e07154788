//! A few cycles of stock-torture against the stockd binary: kill -9 under
//! load, restart with another shard count, every acknowledgement and every
//! unit accounted for. (docs/reliability.md reports a 100-cycle run.)

use std::process::Command;

#[test]
fn a_few_kill_9_cycles_lose_nothing() {
    let out = Command::new(env!("CARGO_BIN_EXE_stock-torture"))
        .args([
            "--stockd",
            env!("CARGO_BIN_EXE_stockd"),
            "--cycles",
            "3",
            "--max-load-ms",
            "400",
            "--seed",
            "7",
        ])
        .output()
        .unwrap();
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
