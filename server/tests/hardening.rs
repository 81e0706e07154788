//! Regressions from the hardening review, each against real sockets: a
//! second server on a taken port, half-closed connections, the centers-per-
//! item bound, STATS right after a restart.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::process::Command;
use std::time::Duration;

use common::*;
use stockd_protocol::{
    parse_frame, Key, Line, Reply, Request, Response, Status, HEADER_LEN, MAX_CENTERS_PER_ITEM,
};

/// Runs the stockd binary to completion (it must exit by itself within 20 s).
fn stockd_exits(args: &[&str]) -> (i32, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_stockd"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("stockd {args:?} kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_a_taken_port_refuses_to_start() {
    let first_dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let first = Daemon::spawn(first_dir.path(), port, &["--shards", "2"]);
    let c = first.client().await;
    let server_id = c.hello().server_id;
    let second_dir = tempfile::tempdir().unwrap();
    let data = second_dir.path().join("data");
    let listen = format!("127.0.0.1:{port}");
    let (code, err) =
        stockd_exits(&["--listen", &listen, "--shard-port-base", "0", "--data-dir", data.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("{listen} is already in use by another stockd (server id {server_id})")),
        "{err}"
    );
    assert!(!data.exists(), "a server that could not start left its data dir behind");
    // The first server is untouched and answers alone.
    c.inbound(1, &[stockd_client::Line::new(1, 1, 5)]).await.unwrap();
    assert_eq!(c.query(1, 1).await.unwrap(), 5);
}

#[test]
fn a_listen_port_with_no_room_above_it_for_shards_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (code, err) =
        stockd_exits(&["--listen", "127.0.0.1:65535", "--data-dir", dir.path().join("d").to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no port above it for the shards"), "{err}");
}

/// Every answer on `s` until the server closes it.
fn answers_until_closed(s: &mut TcpStream) -> Vec<(u64, Response)> {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).expect("the server closes after answering, within 10 s");
    let mut out = Vec::new();
    let mut at = 0;
    while let Some((h, body)) = parse_frame(&buf[at..]).unwrap() {
        out.push((h.request_id, Response::decode(h.opcode, body).unwrap()));
        at += HEADER_LEN + h.body_len;
    }
    assert_eq!(at, buf.len(), "only whole answers");
    out
}

#[test]
fn a_half_closed_connection_gets_every_answer_then_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path(), 2);
    let mut s = TcpStream::connect(srv.addr).unwrap();
    let mut out = Vec::new();
    Request::Inbound { id: 1, lines: vec![Line::new(7, 1, 10)].into() }.encode(1, &mut out);
    s.write_all(&out).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let answers = answers_until_closed(&mut s);
    assert!(matches!(answers[..], [(1, Response::Ok(Reply::Committed { .. }))]), "{answers:?}");
    // Many requests, then the half-close, in one go: the mutations go to the
    // log and are answered after the peer stopped sending.
    let mut s = TcpStream::connect(srv.addr).unwrap();
    out.clear();
    for id in 2..41u64 {
        Request::Order { id, lines: vec![Line::new(7, 1, 1)].into() }.encode(id, &mut out);
    }
    Request::Query { key: Key { item: 7, fc: 1 } }.encode(41, &mut out);
    s.write_all(&out).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let answers = answers_until_closed(&mut s);
    assert_eq!(answers.len(), 40, "one answer per request");
    let ok = answers.iter().filter(|(_, r)| matches!(r, Response::Ok(Reply::Committed { .. }))).count();
    let short = answers.iter().filter(|(_, r)| r.status() == Status::InsufficientStock).count();
    assert_eq!((ok, short), (10, 29), "10 orders applied, 29 refused");
    srv.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_item_has_at_most_max_centers_and_query_item_answers_them_all() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path(), 2);
    let c = client(&srv).await;
    let per = 256;
    for (i, chunk) in (0..MAX_CENTERS_PER_ITEM as u32).collect::<Vec<_>>().chunks(per).enumerate() {
        let lines: Vec<_> = chunk.iter().map(|fc| stockd_client::Line::new(9, *fc, 1)).collect();
        c.inbound(i as u64, &lines).await.unwrap();
    }
    let more =
        c.inbound(10_000, &[stockd_client::Line::new(9, 5, 1), stockd_client::Line::new(9, 99_999, 1)]).await;
    match more {
        Err(e) => {
            assert_eq!(e.status(), Some(Status::BadRequest), "{e}");
            assert!(e.to_string().contains("line 1"), "{e}");
        }
        Ok(a) => panic!("a center beyond the bound was accepted: {a:?}"),
    }
    let centers = c.query_item(9).await.unwrap();
    assert_eq!(centers.len(), MAX_CENTERS_PER_ITEM);
    assert!(centers.iter().all(|(_, available)| *available == 1), "the refused inbound changed nothing");
    srv.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_match_the_recovered_state_right_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path(), 2);
    let c = client(&srv).await;
    c.inbound(1, &[stockd_client::Line::new(1, 1, 5), stockd_client::Line::new(2, 1, 5)]).await.unwrap();
    c.order(2, &[stockd_client::Line::new(1, 1, 1)]).await.unwrap();
    let stat = |v: &[(String, u64)], k: &str| v.iter().find(|(n, _)| n == k).map(|(_, v)| *v).unwrap();
    let before = c.stats().await.unwrap();
    assert_eq!((stat(&before, "rows"), stat(&before, "ids")), (2, 2));
    drop(c);
    srv.shutdown();
    let srv = start(dir.path(), 3);
    let c = client(&srv).await;
    let after = c.stats().await.unwrap();
    assert_eq!((stat(&after, "rows"), stat(&after, "ids"), stat(&after, "shards")), (2, 2, 3));
    srv.shutdown();
}

#[test]
fn bad_arguments_exit_2_and_a_data_dir_that_is_a_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (code, err) = stockd_exits(&["--shards", "0", "--data-dir", dir.path().to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--shards"), "{err}");
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let (code, err) =
        stockd_exits(&["--listen", &listen, "--shard-port-base", "0", "--data-dir", file.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("exists and is not a directory"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_takes_a_host_name() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_stockd"))
        .args(["--listen", &format!("localhost:{port}"), "--shard-port-base", "0", "--shards", "1"])
        .arg("--data-dir")
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    let c = loop {
        match stockd_client::Client::connect(&format!("localhost:{port}")).await {
            Ok(c) => break c,
            Err(_) if t.elapsed() < Duration::from_secs(20) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("stockd --listen localhost:{port} did not come up: {e}"),
        }
    };
    c.ping().await.unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn connections_beyond_the_cap_are_refused_with_overloaded() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 2);
    cfg.max_connections = 3;
    let srv = stockd::start(cfg).unwrap();
    let mut held: Vec<TcpStream> = Vec::new();
    for i in 0..3u64 {
        let mut s = TcpStream::connect(srv.addr).unwrap();
        let mut out = Vec::new();
        Request::Ping.encode(i, &mut out);
        s.write_all(&out).unwrap();
        assert_eq!(read_answers(&mut s, 1)[0].1.status(), Status::Ok, "connection {i} is served");
        held.push(s);
    }
    let mut over = TcpStream::connect(srv.addr).unwrap();
    let refused = answers_until_closed(&mut over);
    match &refused[..] {
        [(0, Response::Error { status: Status::Overloaded, message })] => {
            assert!(message.contains("--max-connections"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    // One goes, one more may come.
    drop(held.pop());
    let served = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        let mut s = TcpStream::connect(srv.addr).unwrap();
        let mut out = Vec::new();
        Request::Ping.encode(9, &mut out);
        s.write_all(&out).is_ok() && read_answers(&mut s, 1).first().is_some_and(|(id, _)| *id == 9)
    });
    assert!(served, "a freed slot is usable again");
    srv.shutdown();
}

#[test]
fn a_client_that_stops_inside_a_frame_is_closed_after_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 1);
    cfg.partial_frame_timeout = Duration::from_millis(300);
    let srv = stockd::start(cfg).unwrap();
    let mut s = TcpStream::connect(srv.addr).unwrap();
    let mut out = Vec::new();
    Request::Ping.encode(1, &mut out);
    Request::Ping.encode(2, &mut out);
    // One whole frame and half of the next, then nothing.
    s.write_all(&out[..out.len() - 5]).unwrap();
    let t = std::time::Instant::now();
    let answers = answers_until_closed(&mut s);
    assert_eq!(answers.len(), 1, "the whole frame is answered");
    assert!(t.elapsed() >= Duration::from_millis(250), "closed only after the timeout: {:?}", t.elapsed());
    // An idle connection with no partial frame is kept.
    let mut idle = TcpStream::connect(srv.addr).unwrap();
    std::thread::sleep(Duration::from_millis(600));
    out.clear();
    Request::Ping.encode(3, &mut out);
    idle.write_all(&out).unwrap();
    assert_eq!(read_answers(&mut idle, 1)[0].0, 3);
    srv.shutdown();
}

/// With the id table full, clients get OVERLOADED and the operator gets one
/// warning that says what to change, not one per refused order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_id_table_is_told_to_the_operator_once_not_per_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let log = tempfile::NamedTempFile::new().unwrap();
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_stockd"))
        .args(["--listen", &format!("127.0.0.1:{port}"), "--shard-port-base", "0", "--shards", "1"])
        .args(["--max-ids-per-shard", "5", "--id-min-window-secs", "600"])
        .arg("--data-dir")
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(log.reopen().unwrap()) // where stockd logs
        .spawn()
        .unwrap();
    let c = client_at(port).await;
    let line = [Line::new(1, 1, 1)];
    c.inbound(1, &[Line::new(1, 1, 100)]).await.unwrap();
    let mut refused = 0;
    for id in 1..=20 {
        match c.order(id, &line).await {
            Ok(_) => {}
            Err(e) if e.status() == Some(Status::Overloaded) => refused += 1,
            Err(e) => panic!("order {id}: {e}"),
        }
    }
    assert_eq!(refused, 16, "a receipt and four orders fill the table of five ids");
    assert_eq!(c.query(1, 1).await.unwrap(), 96, "refused orders take nothing");
    drop(c);
    child.kill().unwrap();
    child.wait().unwrap();
    let text = std::fs::read_to_string(log.path()).unwrap();
    let warnings: Vec<&str> = text.lines().filter(|l| l.contains("the id table is full")).collect();
    assert_eq!(warnings.len(), 1, "one warning within ten seconds:\n{text}");
    for said in ["refused=1", "max_ids_per_shard=5", "id_min_window_secs=600", "--max-ids-per-shard"] {
        assert!(warnings[0].contains(said), "{said} in {}", warnings[0]);
    }
}
