//! Prints the worked hex examples of docs/protocol.md, one request and its
//! answer per opcode. Regenerate the doc's examples with
//! `cargo run -p stockd-protocol --example hex_examples`.

use stockd_protocol::*;

fn hex(b: &[u8]) -> String {
    let mut lines = Vec::new();
    for chunk in b.chunks(16) {
        lines.push(chunk.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(" "));
    }
    lines.join("\n")
}

fn show(title: &str, req: Request, rid: u64, resps: &[Response]) {
    println!("### {title}\n");
    let mut b = Vec::new();
    req.encode(rid, &mut b);
    println!("Request `{req:?}`, request id {rid}:\n\n```\n{}\n```\n", hex(&b));
    for r in resps {
        let mut b = Vec::new();
        r.encode(req.opcode(), rid, &mut b);
        println!("Answer `{r:?}`:\n\n```\n{}\n```\n", hex(&b));
    }
}

fn main() {
    let k = Key { item: 1001, fc: 7 };
    show(
        "HELLO (0x01)",
        Request::Hello { token: b"tok".to_vec() },
        1,
        &[
            Response::Ok(Reply::Hello(HelloInfo {
                server_id: 0x0102030405060708,
                hash_id: HASH_FMIX64_MOD,
                shard_ports: vec![7401, 7402],
                max_body: MAX_BODY as u32,
                max_batch_keys: MAX_BATCH_KEYS as u16,
                max_lines: MAX_LINES as u16,
            })),
            Response::Error { status: Status::Unauthorized, message: "bad auth token".into() },
        ],
    );
    show("PING (0x02)", Request::Ping, 1, &[Response::Ok(Reply::Pong)]);
    show("STATS (0x03)", Request::Stats, 2, &[Response::Ok(Reply::Stats(vec![("rows".into(), 2)]))]);
    let not_standby = "this server does not replicate (start it with --replicate or --standby)";
    show(
        "PROMOTE (0x04)",
        Request::Promote,
        3,
        &[
            Response::Ok(Reply::Promoting),
            Response::Error { status: Status::BadRequest, message: not_standby.into() },
        ],
    );
    show("QUERY (0x10)", Request::Query { key: k }, 2, &[Response::Ok(Reply::Available(8))]);
    show(
        "QUERY_BATCH (0x11)",
        Request::QueryBatch { keys: vec![k, Key { item: 5, fc: 1 }] },
        4,
        &[Response::Ok(Reply::Batch(vec![8, 0]))],
    );
    show(
        "QUERY_ITEM (0x12)",
        Request::QueryItem { item: 1001 },
        5,
        &[Response::Ok(Reply::Item(vec![(7, 8), (9, 30)]))],
    );
    show(
        "ORDER (0x20)",
        Request::Order { id: 42, lines: vec![Line::new(1001, 7, 2)].into() },
        3,
        &[
            Response::Ok(Reply::Committed { lsn: 2 }),
            Response::Insufficient { line: 0, available: 1 },
            Response::Duplicate { lsn: 2 },
        ],
    );
    show(
        "INBOUND (0x21)",
        Request::Inbound { id: 9, lines: vec![Line::new(1001, 7, 10), Line::new(5, 1, 3)].into() },
        6,
        &[Response::Ok(Reply::Committed { lsn: 1 })],
    );
    show(
        "CANCEL (0x22)",
        Request::Cancel { id: 42 },
        7,
        &[
            Response::Ok(Reply::Committed { lsn: 3 }),
            Response::Error { status: Status::NotFound, message: "unknown order id 42".into() },
        ],
    );
    show(
        "RESERVE (0x23)",
        Request::Reserve { id: 77, ttl_ms: 60_000, lines: vec![Line::new(1001, 7, 1)].into() },
        8,
        &[Response::Ok(Reply::Committed { lsn: 4 })],
    );
    show("CONFIRM (0x24)", Request::Confirm { id: 77 }, 9, &[Response::Ok(Reply::Committed { lsn: 5 })]);
    show(
        "RELEASE (0x25)",
        Request::Release { id: 77 },
        10,
        &[Response::Error {
            status: Status::Conflict,
            message: "hold 77 was confirmed; cancel the order instead".into(),
        }],
    );
    show(
        "ADJUST (0x26)",
        Request::Adjust { key: k, on_hand: 50, reason: 3 },
        11,
        &[Response::Ok(Reply::Committed { lsn: 6 })],
    );
}
