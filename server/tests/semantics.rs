//! The corner cases docs/protocol.md spells out (section "Semantics", "Ids
//! and their answers"), each checked against a real server.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use stockd_client::{Applied, Error, Line, Status};
use stockd_protocol::{Request, Response};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_answers_duplicate_for_its_own_kind_and_conflict_for_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path(), 2);
    let c = client(&srv).await;
    c.inbound(1, &[Line::new(5, 1, 10)]).await.unwrap();
    let order = c.order(10, &[Line::new(5, 1, 1)]).await.unwrap();
    let hold = c.reserve(20, 60_000, &[Line::new(5, 1, 1)]).await.unwrap();
    let confirm = c.confirm(20).await.unwrap();
    // Each retry answers DUPLICATE with the LSN of its own operation's record.
    assert_eq!(c.order(10, &[Line::new(5, 1, 1)]).await.unwrap(), Applied::Duplicate { lsn: order.lsn() });
    let again = c.reserve(20, 60_000, &[Line::new(5, 1, 1)]).await.unwrap();
    assert_eq!(again, Applied::Duplicate { lsn: hold.lsn() });
    assert_eq!(c.confirm(20).await.unwrap(), Applied::Duplicate { lsn: confirm.lsn() });
    let cancel = c.cancel(20).await.unwrap();
    assert_eq!(c.cancel(20).await.unwrap(), Applied::Duplicate { lsn: cancel.lsn() });
    // The same id as the other kind of operation: CONFLICT, nothing changes.
    let conflict =
        |r: Result<Applied, Error>| matches!(r, Err(Error::Server { status: Status::Conflict, .. }));
    assert!(conflict(c.order(20, &[Line::new(5, 1, 1)]).await), "an order with a (confirmed) hold's id");
    assert!(conflict(c.reserve(10, 60_000, &[Line::new(5, 1, 1)]).await), "a hold with an order's id");
    assert_eq!(c.query(5, 1).await.unwrap(), 9);
    srv.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releasing_an_expired_hold_answers_duplicate_with_the_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path(), 2);
    let c = client(&srv).await;
    c.inbound(1, &[Line::new(5, 1, 10)]).await.unwrap();
    let hold = c.reserve(30, 1, &[Line::new(5, 1, 4)]).await.unwrap();
    let back = eventually(Duration::from_secs(5), || async { c.query(5, 1).await.unwrap() == 10 }).await;
    assert!(back, "the server released the hold when it expired");
    match c.release(30).await.unwrap() {
        Applied::Duplicate { lsn } => assert!(lsn > hold.lsn(), "the expiry's record, after the hold's"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(c.confirm(30).await, Err(Error::Server { status: Status::Conflict, .. })));
    srv.shutdown();
}

/// Writes `requests` on `s` and reads as many answers: (request id, answer).
fn exchange(s: &mut TcpStream, requests: &[(u64, Request)]) -> Vec<(u64, Response)> {
    let mut out = Vec::new();
    for (rid, req) in requests {
        req.encode(*rid, &mut out);
    }
    s.write_all(&out).unwrap();
    let answers = read_answers(s, requests.len());
    assert_eq!(answers.len(), requests.len(), "an answer to every request");
    answers
}

#[test]
fn a_request_id_reused_while_in_flight_gets_two_answers() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path(), 2);
    let mut s = TcpStream::connect(srv.addr).unwrap();
    let line = vec![stockd_protocol::Line::new(5, 1, 3)];
    let answers = exchange(
        &mut s,
        &[
            (7, Request::Inbound { id: 1, lines: line.clone().into() }),
            (7, Request::Inbound { id: 2, lines: line.into() }),
        ],
    );
    assert_eq!(answers.len(), 2);
    assert!(answers.iter().all(|(rid, r)| *rid == 7 && r.status() == Status::Ok), "{answers:?}");
    srv.shutdown();
}

#[test]
fn a_wrong_hello_after_a_right_one_does_not_take_authorization_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 1);
    cfg.auth_token = Some("right".into());
    let srv = stockd::start(cfg).unwrap();
    let mut s = TcpStream::connect(srv.addr).unwrap();
    let hello = |t: &str| Request::Hello { token: t.as_bytes().to_vec() };
    let key = stockd_protocol::Key { item: 1, fc: 1 };
    let got = exchange(&mut s, &[(1, hello("wrong")), (2, Request::Query { key })]);
    assert_eq!(got.iter().map(|(_, r)| r.status()).collect::<Vec<_>>(), [Status::Unauthorized; 2]);
    let got = exchange(&mut s, &[(3, hello("right")), (4, hello("wrong")), (5, Request::Query { key })]);
    let statuses: Vec<_> = got.iter().map(|(_, r)| r.status()).collect();
    assert_eq!(statuses, [Status::Ok, Status::Unauthorized, Status::Ok]);
    srv.shutdown();
}
