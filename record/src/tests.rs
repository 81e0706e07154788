//! Round trips of every kind, and a decoder that never panics.

use proptest::prelude::*;
use stockd_protocol::{Key, Line};

use super::*;

fn line() -> impl Strategy<Value = Line> {
    (any::<u64>(), any::<u32>(), any::<u32>()).prop_map(|(item, fc, qty)| Line { key: Key { item, fc }, qty })
}

fn record() -> impl Strategy<Value = LogRecord> {
    let id = any::<u64>();
    let lines = prop::collection::vec(line(), 0..6);
    let mutation = prop_oneof![
        id.prop_map(|id| Op::Order { id }),
        id.prop_map(|id| Op::Inbound { id }),
        id.prop_map(|id| Op::Cancel { id }),
        (id, any::<u32>()).prop_map(|(id, ttl_ms)| Op::Reserve { id, ttl_ms }),
        id.prop_map(|id| Op::Confirm { id }),
        (id, any::<bool>()).prop_map(|(id, expired)| Op::Release { id, expired }),
        (any::<u64>(), any::<u64>(), any::<u16>()).prop_map(|(before, after, reason)| Op::Adjust {
            before,
            after,
            reason
        }),
    ];
    prop_oneof![
        9 => (mutation, lines, line()).prop_map(|(op, mut lines, one)| {
            if matches!(op, Op::Adjust { .. }) {
                lines = vec![Line { qty: 0, ..one }];
            }
            LogRecord::Mutation(Mutation { op, lines: lines.into() })
        }),
        1 => (1u16..).prop_map(|shards| LogRecord::Layout { shards }),
    ]
}

proptest! {
    #[test]
    fn every_record_reads_back_as_written(r in record()) {
        let mut bytes = Vec::new();
        r.encode(&mut bytes);
        prop_assert_eq!(bytes[0], FORMAT_V1);
        prop_assert_eq!(LogRecord::decode(&bytes), Ok(r));
    }

    #[test]
    fn any_bytes_decode_to_a_record_or_an_error(bytes in prop::collection::vec(any::<u8>(), 0..96)) {
        let _ = LogRecord::decode(&bytes);
    }

    #[test]
    fn damaged_records_decode_to_a_record_or_an_error(r in record(), cut in any::<prop::sample::Index>(), flip in any::<(prop::sample::Index, u8)>()) {
        let mut bytes = Vec::new();
        r.encode(&mut bytes);
        let mut flipped = bytes.clone();
        let at = flip.0.index(flipped.len());
        flipped[at] ^= flip.1;
        let _ = LogRecord::decode(&flipped);
        let short = &bytes[..cut.index(bytes.len())];
        prop_assert!(LogRecord::decode(short).is_err(), "a cut record is never whole");
    }
}

#[test]
fn unversioned_payloads_read_as_version_1() {
    let m = Mutation {
        op: Op::Order { id: 42 },
        lines: vec![Line { key: Key { item: 7, fc: 3 }, qty: 2 }].into(),
    };
    let mut bytes = Vec::new();
    m.encode(&mut bytes);
    assert_eq!(LogRecord::decode(&bytes[1..]), Ok(LogRecord::Mutation(m)));
    assert_eq!(LogRecord::decode(&[kind::LAYOUT, 3, 0]), Ok(LogRecord::Layout { shards: 3 }));
}

#[test]
fn unknown_formats_and_kinds_are_named() {
    assert_eq!(LogRecord::decode(&[0x82, 1]), Err("record format 0x82 is not one this build reads".into()));
    assert_eq!(
        LogRecord::decode(&[FORMAT_V1, 9, 0, 0, 0, 0, 0, 0, 0, 0]),
        Err("unknown record kind 9".into())
    );
    assert_eq!(LogRecord::decode(&[]), Err("empty record".into()));
}

/// The bytes of docs/log-format.md's example, so the document cannot drift.
#[test]
fn the_documented_example_is_exact() {
    let m = Mutation {
        op: Op::Order { id: 42 },
        lines: vec![Line { key: Key { item: 1001, fc: 7 }, qty: 2 }].into(),
    };
    let mut bytes = Vec::new();
    m.encode(&mut bytes);
    let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        hex.join(" "),
        "81 01 2a 00 00 00 00 00 00 00 01 00 e9 03 00 00 00 00 00 00 07 00 00 00 02 00 00 00"
    );
}
