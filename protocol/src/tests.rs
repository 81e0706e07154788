use super::*;
use proptest::prelude::*;

fn key() -> impl Strategy<Value = Key> {
    (any::<u64>(), any::<u32>()).prop_map(|(item, fc)| Key { item, fc })
}

fn lines() -> impl Strategy<Value = Vec<Line>> {
    prop::collection::vec((key(), 1u32..), 1..20)
        .prop_map(|v| v.into_iter().map(|(key, qty)| Line { key, qty }).collect())
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..40).prop_map(|token| Request::Hello { token }),
        Just(Request::Ping),
        Just(Request::Stats),
        Just(Request::Promote),
        key().prop_map(|key| Request::Query { key }),
        prop::collection::vec(key(), 0..50).prop_map(|keys| Request::QueryBatch { keys }),
        any::<u64>().prop_map(|item| Request::QueryItem { item }),
        (any::<u64>(), lines()).prop_map(|(id, lines)| Request::Order { id, lines: lines.into() }),
        (any::<u64>(), lines()).prop_map(|(id, lines)| Request::Inbound { id, lines: lines.into() }),
        any::<u64>().prop_map(|id| Request::Cancel { id }),
        (any::<u64>(), 1..=MAX_TTL_MS, lines()).prop_map(|(id, ttl_ms, lines)| Request::Reserve {
            id,
            ttl_ms,
            lines: lines.into()
        }),
        any::<u64>().prop_map(|id| Request::Confirm { id }),
        any::<u64>().prop_map(|id| Request::Release { id }),
        (key(), 0..=STOCK_MAX, any::<u16>()).prop_map(|(key, on_hand, reason)| Request::Adjust {
            key,
            on_hand,
            reason
        }),
    ]
}

fn response_for(op: u8) -> BoxedStrategy<Response> {
    let ok = match op {
        opcode::HELLO => (any::<u64>(), prop::collection::vec(any::<u16>(), 1..8))
            .prop_map(|(server_id, shard_ports)| {
                Reply::Hello(HelloInfo {
                    server_id,
                    hash_id: HASH_FMIX64_MOD,
                    shard_ports,
                    max_body: MAX_BODY as u32,
                    max_batch_keys: MAX_BATCH_KEYS as u16,
                    max_lines: MAX_LINES as u16,
                })
            })
            .boxed(),
        opcode::PING => Just(Reply::Pong).boxed(),
        opcode::PROMOTE => Just(Reply::Promoting).boxed(),
        opcode::STATS => {
            prop::collection::vec(("[a-z_]{1,20}", any::<u64>()), 0..10).prop_map(Reply::Stats).boxed()
        }
        opcode::QUERY => any::<u64>().prop_map(Reply::Available).boxed(),
        opcode::QUERY_BATCH => prop::collection::vec(any::<u64>(), 0..50).prop_map(Reply::Batch).boxed(),
        opcode::QUERY_ITEM => {
            prop::collection::vec((any::<u32>(), any::<u64>()), 0..50).prop_map(Reply::Item).boxed()
        }
        _ => any::<u64>().prop_map(|lsn| Reply::Committed { lsn }).boxed(),
    };
    prop_oneof![
        ok.prop_map(Response::Ok),
        (any::<u16>(), any::<u64>()).prop_map(|(line, available)| Response::Insufficient { line, available }),
        any::<u64>().prop_map(|lsn| Response::Duplicate { lsn }),
        (3u8..=11, ".{0,40}")
            .prop_map(|(s, message)| Response::Error { status: Status::from_u8(s).unwrap(), message }),
    ]
    .boxed()
}

fn one_frame(buf: &[u8]) -> (Header, &[u8]) {
    let (h, body) = parse_frame(buf).unwrap().expect("a whole frame");
    assert_eq!(HEADER_LEN + h.body_len, buf.len());
    (h, body)
}

proptest! {
    #[test]
    fn request_round_trip(req in request(), rid in any::<u64>()) {
        let mut buf = Vec::new();
        req.encode(rid, &mut buf);
        let (h, body) = one_frame(&buf);
        prop_assert_eq!(h.request_id, rid);
        prop_assert_eq!(h.opcode, req.opcode());
        prop_assert_eq!(&Request::decode(h.opcode, body).unwrap(), &req);
        // The client's borrowed encoding of lines requests is the same frame.
        let borrowed = match &req {
            Request::Order { id, lines } | Request::Inbound { id, lines } => Some((*id, None, lines)),
            Request::Reserve { id, ttl_ms, lines } => Some((*id, Some(*ttl_ms), lines)),
            _ => None,
        };
        if let Some((id, ttl_ms, lines)) = borrowed {
            let mut same = Vec::new();
            encode_lines_frame(req.opcode(), rid, id, ttl_ms, lines, &mut same);
            prop_assert_eq!(&same, &buf);
        }
        // And its borrowed encoding of a batch.
        if let Request::QueryBatch { keys } = &req {
            let mut same = Vec::new();
            encode_batch_frame(rid, keys, &mut same);
            prop_assert_eq!(&same, &buf);
        }
        // Every strict prefix is incomplete, never an error or a frame.
        for cut in 0..buf.len() {
            prop_assert_eq!(parse_frame(&buf[..cut]).unwrap(), None);
        }
    }

    #[test]
    fn response_round_trip(
        (op, resp) in prop::sample::select(vec![1u8, 2, 3, 4, 0x10, 0x11, 0x12, 0x20, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26])
            .prop_flat_map(|op| (Just(op), response_for(op))),
        rid in any::<u64>(),
    ) {
        let mut buf = Vec::new();
        resp.encode(op, rid, &mut buf);
        let (h, body) = one_frame(&buf);
        prop_assert_eq!(h.opcode, op | RESPONSE_BIT);
        prop_assert_eq!(h.request_id, rid);
        prop_assert_eq!(&Response::decode(h.opcode, body).unwrap(), &resp);
        // The server's one-copy answer to a query is the same frame.
        if let (opcode::QUERY, Response::Ok(Reply::Available(n))) = (op, &resp) {
            let mut same = Vec::new();
            encode_available_frame(op, rid, *n, &mut same);
            prop_assert_eq!(&same, &buf);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300), op in any::<u8>()) {
        let _ = parse_frame(&bytes);
        if let Ok(req) = Request::decode(op, &bytes) {
            // Bodies have one encoding: what decodes re-encodes to the same bytes.
            let mut again = Vec::new();
            req.encode(0, &mut again);
            prop_assert_eq!(&again[HEADER_LEN..], &bytes[..]);
        }
        let _ = Response::decode(op | RESPONSE_BIT, &bytes);
    }

    #[test]
    fn shard_of_is_in_range(id in any::<u64>(), n in 1usize..64) {
        prop_assert!(shard_of(id, n) < n);
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
}

/// The worked examples of docs/protocol.md, byte for byte.
#[test]
fn documented_examples() {
    let cases: Vec<(Request, u64, &str)> = vec![
        (Request::Ping, 1, "0c 00 00 00 01 02 00 00 01 00 00 00 00 00 00 00"),
        (
            Request::Query { key: Key { item: 1001, fc: 7 } },
            2,
            "18 00 00 00 01 10 00 00 02 00 00 00 00 00 00 00 e9 03 00 00 00 00 00 00 07 00 00 00",
        ),
        (
            Request::Order { id: 42, lines: vec![Line { key: Key { item: 1001, fc: 7 }, qty: 2 }].into() },
            3,
            "26 00 00 00 01 20 00 00 03 00 00 00 00 00 00 00 2a 00 00 00 00 00 00 00 01 00 \
             e9 03 00 00 00 00 00 00 07 00 00 00 02 00 00 00",
        ),
    ];
    for (req, rid, want) in cases {
        let mut buf = Vec::new();
        req.encode(rid, &mut buf);
        assert_eq!(hex(&buf), want.split_whitespace().collect::<Vec<_>>().join(" "), "{req:?}");
    }
    let mut buf = Vec::new();
    Response::Insufficient { line: 0, available: 1 }.encode(opcode::ORDER, 3, &mut buf);
    assert_eq!(hex(&buf), "17 00 00 00 01 a0 00 00 03 00 00 00 00 00 00 00 01 00 00 01 00 00 00 00 00 00 00");
}

#[test]
fn a_short_key_names_the_field_it_ends_in() {
    let body = 1001u64.to_le_bytes();
    let e = Request::decode(opcode::QUERY, &body[..5]).unwrap_err();
    assert_eq!(e.0, "body ends inside vendor_item_id");
    let e = Request::decode(opcode::QUERY, &body).unwrap_err();
    assert_eq!(e.0, "body ends inside fulfillment_center_id");
    let mut long = body.to_vec();
    long.extend_from_slice(&[7, 0, 0, 0, 9]);
    assert_eq!(Request::decode(opcode::QUERY, &long).unwrap_err().0, "1 unexpected trailing bytes");
    assert_eq!(
        Request::decode(opcode::QUERY, &long[..12]).unwrap(),
        Request::Query { key: Key { item: 1001, fc: 7 } }
    );
}

#[test]
fn header_errors_are_reported_before_the_body_arrives() {
    let mut buf = Vec::new();
    put_header(&mut buf, opcode::PING, 9, MAX_BODY + 1);
    assert_eq!(parse_frame(&buf), Err(FrameError::TooLarge { request_id: 9, body_len: MAX_BODY + 1 }));
    let mut buf = Vec::new();
    put_header(&mut buf, opcode::PING, 9, 0);
    buf[4] = 2;
    assert_eq!(parse_frame(&buf), Err(FrameError::BadVersion { request_id: 9, version: 2 }));
    assert_eq!(parse_frame(&[3, 0, 0, 0]), Err(FrameError::BadLength(3)));
}

#[test]
fn limits_are_enforced() {
    let zero = {
        let mut b = Vec::new();
        Request::Order { id: 1, lines: vec![Line { key: Key { item: 1, fc: 1 }, qty: 1 }].into() }
            .encode(0, &mut b);
        let n = b.len();
        b[n - 4..].copy_from_slice(&0u32.to_le_bytes());
        b
    };
    let (h, body) = one_frame(&zero);
    assert!(Request::decode(h.opcode, body).unwrap_err().0.contains("qty must be greater than 0"));
    assert!(Request::decode(opcode::ORDER, &[1, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_err(), "no lines");
    assert!(Request::decode(0x7f, &[]).unwrap_err().0.contains("unknown opcode"));
    let mut adjust = Vec::new();
    Request::Adjust { key: Key { item: 1, fc: 1 }, on_hand: STOCK_MAX, reason: 0 }.encode(0, &mut adjust);
    let (h, body) = one_frame(&adjust);
    let mut body = body.to_vec();
    body[12..20].copy_from_slice(&(STOCK_MAX + 1).to_le_bytes());
    assert!(Request::decode(h.opcode, &body).is_err());
    assert!(Request::decode(opcode::PING, &[0]).unwrap_err().0.contains("trailing"));
}

#[test]
fn secrets_compare_by_content_and_length() {
    assert!(constant_time_eq(b"s3cret", b"s3cret"));
    assert!(!constant_time_eq(b"s3cret", b"s3creT"));
    assert!(!constant_time_eq(b"s3cret", b"s3cre"));
    assert!(constant_time_eq(b"", b""));
}
