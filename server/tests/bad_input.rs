//! Hostile and broken clients over real sockets: each gets its documented
//! error or a clean close, other connections keep being served, and stock
//! never changes.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use stockd_protocol::{
    opcode, parse_frame, put_header, Key, Line, Reply, Request, Response, Status, HEADER_LEN, MAX_BODY,
    MAX_LINES, STOCK_MAX,
};

fn connect(addr: std::net::SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// Reads one response frame, or None if the server closed the connection.
fn read_response(s: &mut TcpStream) -> Option<(u64, Response)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((h, body)) = parse_frame(&buf).expect("server frames are well formed") {
            let resp = Response::decode(h.opcode, body).expect("decodable response");
            assert_eq!(buf.len(), HEADER_LEN + h.body_len, "one answer per request here");
            return Some((h.request_id, resp));
        }
        match s.read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
            Err(e) => panic!("no answer and no close: {e}"),
        }
    }
}

fn call(s: &mut TcpStream, rid: u64, req: &Request) -> Response {
    let mut out = Vec::new();
    req.encode(rid, &mut out);
    s.write_all(&out).unwrap();
    let (got, resp) = read_response(s).expect("an answer");
    assert_eq!(got, rid);
    resp
}

fn status(s: &mut TcpStream, rid: u64, req: &Request) -> Status {
    call(s, rid, req).status()
}

fn stock(addr: std::net::SocketAddr, keys: &[Key]) -> Vec<u64> {
    let mut s = connect(addr);
    match call(&mut s, 1, &Request::QueryBatch { keys: keys.to_vec() }) {
        Response::Ok(Reply::Batch(v)) => v,
        other => panic!("{other:?}"),
    }
}

fn expect_closed(s: &mut TcpStream) {
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected the server to close, got {other:?}"),
    }
}

#[test]
fn bad_frames_and_bad_values_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path(), 2);
    let addr = srv.addr;
    let keys = [Key { item: 1, fc: 1 }, Key { item: 2, fc: 1 }];
    let mut good = connect(addr);
    let inbound = Request::Inbound { id: 1, lines: vec![Line::new(1, 1, 10), Line::new(2, 1, 10)].into() };
    assert_eq!(status(&mut good, 1, &inbound), Status::Ok);
    let before = stock(addr, &keys);
    assert_eq!(before, vec![10, 10]);

    // Garbage (an HTTP request): the "version" byte is wrong; answered, then closed.
    let mut s = connect(addr);
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let (_, r) = read_response(&mut s).expect("an UNSUPPORTED_VERSION answer");
    assert_eq!(r.status(), Status::UnsupportedVersion);
    expect_closed(&mut s);

    // A length below the header size: no request id to answer, so just closed.
    let mut s = connect(addr);
    s.write_all(&[4, 0, 0, 0, 1, 2, 3, 4]).unwrap();
    expect_closed(&mut s);

    // A frame over the size limit is refused from its header alone.
    let mut s = connect(addr);
    let mut big = Vec::new();
    put_header(&mut big, opcode::ORDER, 77, MAX_BODY + 1);
    s.write_all(&big).unwrap();
    let (rid, r) = read_response(&mut s).unwrap();
    assert_eq!((rid, r.status()), (77, Status::FrameTooLarge));
    expect_closed(&mut s);

    // Unknown opcode, a response opcode, trailing bytes: BAD_REQUEST, connection stays usable.
    let mut s = connect(addr);
    let mut f = Vec::new();
    put_header(&mut f, 0x7f, 5, 0);
    s.write_all(&f).unwrap();
    let (rid, r) = read_response(&mut s).unwrap();
    assert_eq!((rid, r.status()), (5, Status::BadRequest));
    if let Response::Error { message, .. } = r {
        assert!(message.starts_with("opcode: unknown opcode 0x7f"), "{message}");
    }
    let mut f = Vec::new();
    put_header(&mut f, opcode::PING | 0x80, 6, 0);
    s.write_all(&f).unwrap();
    assert_eq!(read_response(&mut s).unwrap().1.status(), Status::BadRequest);
    let mut f = Vec::new();
    put_header(&mut f, opcode::PING, 7, 3);
    f.extend_from_slice(&[1, 2, 3]);
    s.write_all(&f).unwrap();
    assert_eq!(read_response(&mut s).unwrap().1.status(), Status::BadRequest);
    assert_eq!(status(&mut s, 8, &Request::Ping), Status::Ok);

    // Zero quantity, too many lines, a body cut short.
    let mut zero = Vec::new();
    Request::Order { id: 9, lines: vec![Line::new(1, 1, 1)].into() }.encode(9, &mut zero);
    let n = zero.len();
    zero[n - 4..].copy_from_slice(&0u32.to_le_bytes());
    s.write_all(&zero).unwrap();
    assert_eq!(read_response(&mut s).unwrap().1.status(), Status::BadRequest);
    let many = Request::Order { id: 10, lines: vec![Line::new(1, 1, 1); MAX_LINES + 1].into() };
    assert_eq!(status(&mut s, 10, &many), Status::BadRequest);
    let mut short = Vec::new();
    put_header(&mut short, opcode::ORDER, 11, 10);
    short.extend_from_slice(&[0u8; 10]);
    s.write_all(&short).unwrap();
    assert_eq!(read_response(&mut s).unwrap().1.status(), Status::BadRequest);

    // Overflow: a row may not pass 2^53 units; an adjustment above it is malformed.
    let adjust = Request::Adjust { key: Key { item: 2, fc: 1 }, on_hand: STOCK_MAX - 5, reason: 9 };
    assert_eq!(status(&mut s, 12, &adjust), Status::Ok);
    let over = Request::Inbound { id: 13, lines: vec![Line::new(1, 1, 1), Line::new(2, 1, 6)].into() };
    let r = call(&mut s, 13, &over);
    assert_eq!(r.status(), Status::BadRequest, "{r:?}");
    let mut adj = Vec::new();
    Request::Adjust { key: Key { item: 2, fc: 1 }, on_hand: 0, reason: 0 }.encode(14, &mut adj);
    adj[HEADER_LEN + 12..HEADER_LEN + 20].copy_from_slice(&u64::MAX.to_le_bytes());
    s.write_all(&adj).unwrap();
    assert_eq!(read_response(&mut s).unwrap().1.status(), Status::BadRequest);
    assert_eq!(stock(addr, &keys), vec![10, STOCK_MAX - 5]);
    let back = Request::Adjust { key: Key { item: 2, fc: 1 }, on_hand: 10, reason: 9 };
    assert_eq!(status(&mut s, 15, &back), Status::Ok);

    // A truncated frame followed by a hang-up.
    let mut t = connect(addr);
    let mut f = Vec::new();
    Request::Order { id: 16, lines: vec![Line::new(1, 1, 10)].into() }.encode(16, &mut f);
    t.write_all(&f[..f.len() - 3]).unwrap();
    drop(t);

    // Unknown ids.
    assert_eq!(status(&mut good, 17, &Request::Cancel { id: 999 }), Status::NotFound);
    assert_eq!(status(&mut good, 18, &Request::Confirm { id: 999 }), Status::NotFound);
    assert_eq!(status(&mut good, 19, &Request::Release { id: 999 }), Status::NotFound);

    // The first connection was served throughout, and nothing changed.
    assert_eq!(status(&mut good, 20, &Request::Ping), Status::Ok);
    assert_eq!(stock(addr, &keys), before);
    srv.shutdown();
}

#[test]
fn requests_before_hello_are_unauthorized_when_a_token_is_set() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 1);
    cfg.auth_token = Some("tok".into());
    let srv = stockd::start(cfg).unwrap();
    let mut s = connect(srv.addr);
    let order = Request::Inbound { id: 1, lines: vec![Line::new(1, 1, 1)].into() };
    assert_eq!(status(&mut s, 1, &order), Status::Unauthorized);
    assert_eq!(status(&mut s, 2, &Request::Hello { token: b"nope".to_vec() }), Status::Unauthorized);
    assert_eq!(status(&mut s, 3, &order), Status::Unauthorized);
    assert_eq!(status(&mut s, 4, &Request::Hello { token: b"tok".to_vec() }), Status::Ok);
    assert_eq!(status(&mut s, 5, &order), Status::Ok);
    srv.shutdown();
}

/// Frames that arrive in one write are decoded a run at a time before they
/// are served (their lookups prefetched together): still, every frame is
/// served in order and judged as if alone. Frames before a HELLO with the
/// token are unauthorized, those after it are served, the frames before a
/// broken one are answered, and nothing behind the broken one is served.
#[test]
fn frames_in_one_write_are_served_in_order_up_to_a_broken_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 1);
    cfg.auth_token = Some("tok".into());
    let srv = stockd::start(cfg).unwrap();
    let key = Key { item: 1, fc: 1 };
    let mut out = Vec::new();
    Request::Query { key }.encode(1, &mut out);
    Request::Hello { token: b"tok".to_vec() }.encode(2, &mut out);
    let queries = 10..50u64; // more than one run of frames decoded ahead
    for rid in queries.clone() {
        Request::Query { key }.encode(rid, &mut out);
    }
    put_header(&mut out, opcode::ORDER, 99, MAX_BODY + 1);
    Request::Inbound { id: 7, lines: vec![Line::new(1, 1, 5)].into() }.encode(100, &mut out);
    let mut s = connect(srv.addr);
    s.write_all(&out).unwrap();

    let (mut buf, mut chunk, mut answers) = (Vec::new(), [0u8; 4096], Vec::new());
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("neither answers nor a close: {e}"),
        }
    }
    let mut at = 0;
    while let Some((h, body)) = parse_frame(&buf[at..]).expect("server frames are well formed") {
        answers.push((h.request_id, Response::decode(h.opcode, body).unwrap()));
        at += HEADER_LEN + h.body_len;
    }
    assert_eq!(at, buf.len(), "nothing but whole answers");
    let rids: Vec<u64> = answers.iter().map(|(rid, _)| *rid).collect();
    let want: Vec<u64> = [1, 2].into_iter().chain(queries).chain([99]).collect();
    assert_eq!(rids, want, "answered in order, nothing behind the broken frame");
    assert_eq!(answers[0].1.status(), Status::Unauthorized);
    assert!(matches!(answers[1].1, Response::Ok(Reply::Hello(_))), "{:?}", answers[1].1);
    for (rid, r) in &answers[2..answers.len() - 1] {
        assert_eq!(*r, Response::Ok(Reply::Available(0)), "query {rid}");
    }
    assert_eq!(answers.last().unwrap().1.status(), Status::FrameTooLarge);

    // The inbound behind the broken frame was never applied.
    let mut s = connect(srv.addr);
    assert_eq!(status(&mut s, 1, &Request::Hello { token: b"tok".to_vec() }), Status::Ok);
    assert_eq!(call(&mut s, 2, &Request::Query { key }), Response::Ok(Reply::Available(0)));
    srv.shutdown();
}
