//! Deep pipelines on one connection (the real binary, real TCP): more
//! requests in one write than a connection may have in flight are all
//! answered. The in-flight bound pauses reading; once answers drain below
//! it, frames already in the buffer are served without waiting for more bytes.
//!
//! Retries are the sharp case: a DUPLICATE is answered while the request is
//! parsed, so every answer may be back before the connection looks at its
//! buffer again.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use stockd_protocol::{parse_frame, Line, Reply, Request, Response, HEADER_LEN};

/// Writes `n` INBOUND requests (ids from `first_id`) in one write, and
/// returns how many answers arrive within 10 s (all OK, or all DUPLICATE when `retry`).
fn answered(port: u16, n: u64, first_id: u64, retry: bool) -> u64 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut out = Vec::new();
    for i in 0..n {
        let req = Request::Inbound { id: first_id + i, lines: vec![Line::new(1 + i % 7, 1, 1)].into() };
        req.encode(i, &mut out);
    }
    let mut writer = s.try_clone().unwrap();
    let write = std::thread::spawn(move || writer.write_all(&out).unwrap());
    let (mut buf, mut chunk, mut got) = (Vec::new(), [0u8; 64 << 10], 0);
    let t = Instant::now();
    while got < n && t.elapsed() < Duration::from_secs(10) {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                continue
            }
            Err(e) => panic!("read: {e}"),
        }
        let mut at = 0;
        while let Some((h, body)) = parse_frame(&buf[at..]).expect("well-formed answers") {
            let resp = Response::decode(h.opcode, body).unwrap();
            if retry {
                assert!(matches!(resp, Response::Duplicate { .. }), "{resp:?}");
            } else {
                assert!(matches!(resp, Response::Ok(Reply::Committed { .. })), "{resp:?}");
            }
            at += HEADER_LEN + h.body_len;
            got += 1;
        }
        buf.drain(..at);
    }
    write.join().unwrap();
    got
}

#[test]
fn thousands_of_requests_in_one_write_are_all_answered() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // Shard ports the system picks (a base of our own could meet a port in use), learnt from HELLO.
    let _d = Daemon::spawn(dir.path(), port, &["--shards", "2", "--shard-port-base", "0"]);
    let t = Instant::now();
    let mut s = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(_) => assert!(t.elapsed() < Duration::from_secs(20), "stockd did not come up"),
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut hello = Vec::new();
    Request::Hello { token: Vec::new() }.encode(1, &mut hello);
    s.write_all(&hello).unwrap();
    let shard_port = match read_answers(&mut s, 1).pop() {
        Some((_, Response::Ok(Reply::Hello(h)))) => h.shard_ports[0],
        other => panic!("HELLO answered {other:?}"),
    };
    let mut first_id = 1;
    for n in [1_100, 1_500, 5_000] {
        for p in [port, shard_port] {
            assert_eq!(answered(p, n, first_id, false), n, "{n} requests in one write to port {p}");
            assert_eq!(answered(p, n, first_id, true), n, "{n} retries in one write to port {p}");
            first_id += n;
        }
    }
}
