//! stockctl against a real server: output, JSON fields, exit codes.

use std::process::Command;

use serde_json::Value;

fn stockctl(addr: &str, args: &[&str]) -> (i32, String, String) {
    let out =
        Command::new(env!("CARGO_BIN_EXE_stockctl")).arg("--addr").arg(addr).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(addr: &str, args: &[&str]) -> (i32, Value) {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (code, out, err) = stockctl(addr, &all);
    let v = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: stdout {out:?} stderr {err:?}"));
    (code, v)
}

#[test]
fn stockctl_commands_and_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = stockd::Config::new("127.0.0.1:0".parse().unwrap(), dir.path(), 2);
    cfg.pin = false;
    let srv = stockd::start(cfg).unwrap();
    let addr = srv.addr.to_string();
    let a = addr.as_str();

    let (code, out, _) = stockctl(a, &["inbound", "--id", "1", "1001:7:10", "1001:9:30"]);
    assert_eq!(code, 0);
    assert!(out.contains("receipt_id 1: ok"), "{out}");
    let (code, v) = json(a, &["query", "1001", "7"]);
    assert_eq!(code, 0);
    assert_eq!(v, serde_json::json!({"vendor_item_id": 1001, "fulfillment_center_id": 7, "available": 10}));
    let (_, v) = json(a, &["query", "1001"]);
    assert_eq!(v["centers"].as_array().unwrap().len(), 2);
    let (code, v) = json(a, &["order", "--id", "42", "1001:7:2", "1001:9:1"]);
    assert_eq!((code, v["status"].as_str(), v["order_id"].as_u64()), (0, Some("ok"), Some(42)));
    let (code, v) = json(a, &["order", "--id", "42", "1001:7:2", "1001:9:1"]);
    assert_eq!((code, v["status"].as_str()), (0, Some("duplicate")));
    // Refused for lack of stock: exit 3, reason printed.
    let (code, v) = json(a, &["order", "--id", "43", "1001:7:100"]);
    assert_eq!(code, 3);
    assert_eq!(v["status"], "insufficient_stock");
    assert_eq!((v["line"].as_u64(), v["available"].as_u64()), (Some(0), Some(8)));
    assert_eq!(v["error"], "insufficient_stock", "a code, as the gateway's errors");
    assert!(v["message"].as_str().unwrap().contains("insufficient stock"));
    let (code, _, err) = stockctl(a, &["order", "--id", "43", "1001:7:100"]);
    assert_eq!(code, 3);
    assert!(err.contains("line 0 has only 8 available"), "{err}");
    // Other errors: non-zero with a clear message.
    let (code, _, err) = stockctl(a, &["cancel", "999"]);
    assert_eq!(code, 1);
    assert!(err.contains("not_found"), "{err}");
    let (code, _, err) = stockctl(a, &["order", "--id", "5", "1001:7:0"]);
    assert_eq!(code, 2, "bad arguments");
    assert!(err.contains("qty must be greater than 0"), "{err}");
    let (code, _, _) = stockctl(a, &["reserve", "--id", "77", "--ttl-ms", "60000", "1001:7:1"]);
    assert_eq!(code, 0);
    assert_eq!(stockctl(a, &["confirm", "77"]).0, 0);
    assert_eq!(stockctl(a, &["cancel", "42"]).0, 0);
    assert_eq!(stockctl(a, &["adjust", "1001", "7", "50", "--reason", "3"]).0, 0);
    let (_, v) = json(a, &["query", "1001", "7"]);
    assert_eq!(v["available"], 50);
    let (code, v) = json(a, &["stats"]);
    assert_eq!(code, 0);
    assert!(v["mutations_ok"].as_u64().unwrap() >= 5, "{v}");
    // Promotion is for replicating servers (server/tests/ha.rs), and names one node.
    let (code, _, err) = stockctl(a, &["promote"]);
    assert_eq!(code, 1);
    assert!(err.contains("bad_request") && err.contains("does not replicate"), "{err}");
    let (code, _, err) = stockctl(&format!("{a},{a}"), &["promote"]);
    assert_eq!(code, 1);
    assert!(err.contains("promote names one node"), "{err}");
    srv.shutdown();
    let (code, _, err) = stockctl(a, &["ping"]);
    assert_eq!(code, 1, "server gone");
    assert!(err.contains(&format!("cannot connect to {a}")), "the address is named: {err}");
}

#[test]
fn a_malformed_address_is_a_bad_argument() {
    let (code, _, err) = stockctl("nonsense", &["ping"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("`nonsense`: expected HOST:PORT"), "{err}");
}

#[test]
fn an_http_server_is_named_as_not_stockd() {
    // A minimal HTTP server: answers anything with a 400, as HTTP servers do to stockd's frames.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 256];
        let _ = s.read(&mut buf);
        let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
    });
    let (code, _, err) = stockctl(&addr, &["ping"]);
    server.join().unwrap();
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("answered in HTTP: it is not a stockd server"), "{err}");
}
