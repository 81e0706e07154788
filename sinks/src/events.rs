//! The messages downstream consumers read, as JSON (schema in docs/events.md).
//!
//! - An event per committed mutation, keyed by its order, receipt or hold id
//!   (an adjust: `item:center`).
//! - A derived `sold_out` or `restocked` event, keyed `item:center`, when a
//!   record takes a row's available to 0 or lifts it from 0.
//! - A level per changed row, keyed `item:center`: the latest one per key is
//!   the row's current level (fit for a compacted topic).

use std::io::Write;

use stockd_protocol::Key;
use stockd_record::Op;

use crate::levels::{rows_changed, Level};
use crate::sink::Change;

/// Version of the JSON layout of events and levels.
pub const SCHEMA_VERSION: u32 = 1;

/// A message: key and JSON value.
pub type Message = (String, Vec<u8>);

pub fn row_key(row: Key) -> String {
    let mut key = String::new();
    write_row_key(row, &mut key);
    key
}

/// The type name of a mutation's event.
pub fn event_type(op: &Op) -> &'static str {
    match op {
        Op::Order { .. } => "order",
        Op::Inbound { .. } => "inbound",
        Op::Cancel { .. } => "cancel",
        Op::Reserve { .. } => "reserve",
        Op::Confirm { .. } => "confirm",
        Op::Release { expired: false, .. } => "release",
        Op::Release { expired: true, .. } => "expiry",
        Op::Adjust { .. } => "adjust",
    }
}

// The JSON is written directly: every value is an integer or one of the
// fixed type names above, so nothing needs escaping, and a Value tree per
// message (a map allocation per field) was the sink's largest cost.

/// Which topic a message goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topic {
    Events,
    Levels,
}

/// Every message of one mutation, in order: its event, its derived events,
/// then its rows' levels. `key` and `value` are scratch buffers reused for
/// each message.
pub fn messages(c: &Change, key: &mut String, value: &mut Vec<u8>, mut each: impl FnMut(Topic, &str, &[u8])) {
    write_event(c, key, value);
    each(Topic::Events, key, value);
    let rows = rows_changed(&c.lines);
    for &(row, before, after) in &rows {
        if write_derived(c, row, before, after, key, value) {
            each(Topic::Events, key, value);
        }
    }
    for &(row, _, after) in &rows {
        write_level(row, after, c.lsn, key, value);
        each(Topic::Levels, key, value);
    }
}

/// The event of one committed mutation.
pub fn event(c: &Change) -> Message {
    let (mut key, mut value) = (String::new(), Vec::new());
    write_event(c, &mut key, &mut value);
    (key, value)
}

/// `sold_out` and `restocked` events of one mutation, one per row whose available reached or left 0.
pub fn derived_events(c: &Change) -> Vec<Message> {
    let mut out = Vec::new();
    for (row, before, after) in rows_changed(&c.lines) {
        let (mut key, mut value) = (String::new(), Vec::new());
        if write_derived(c, row, before, after, &mut key, &mut value) {
            out.push((key, value));
        }
    }
    out
}

/// A row's level as of `lsn`.
pub fn level(row: Key, l: Level, lsn: u64) -> Message {
    let (mut key, mut value) = (String::new(), Vec::new());
    write_level(row, l, lsn, &mut key, &mut value);
    (key, value)
}

/// The levels of the rows one mutation changed.
pub fn levels(c: &Change) -> Vec<Message> {
    rows_changed(&c.lines).into_iter().map(|(row, _, after)| level(row, after, c.lsn)).collect()
}

// The JSON is written directly: every value is an integer or one of the
// fixed type names above, so nothing needs escaping, and a Value tree per
// message (a map allocation per field) was the sink's largest cost.

fn write_event(c: &Change, key: &mut String, v: &mut Vec<u8>) {
    key.clear();
    v.clear();
    let kind = event_type(&c.mutation.op);
    let _ = write!(
        v,
        r#"{{"schema_version":{SCHEMA_VERSION},"lsn":{},"type":"{kind}","committed_at_ms":{}"#,
        c.lsn, c.ts_ms
    );
    match c.mutation.op {
        Op::Order { id }
        | Op::Inbound { id }
        | Op::Cancel { id }
        | Op::Reserve { id, .. }
        | Op::Confirm { id }
        | Op::Release { id, .. } => {
            let _ = write!(v, r#","id":{id}"#);
            if let Op::Reserve { ttl_ms, .. } = c.mutation.op {
                let _ = write!(v, r#","ttl_ms":{ttl_ms}"#);
            }
            let _ = std::fmt::Write::write_fmt(key, format_args!("{id}"));
        }
        Op::Adjust { before, after, reason } => {
            let _ = write!(v, r#","before":{before},"after":{after},"reason":{reason}"#);
            if let Some(l) = c.lines.first() {
                write_row_key(l.key, key);
            }
        }
    }
    v.extend_from_slice(br#","lines":["#);
    for (i, l) in c.lines.iter().enumerate() {
        let delta = l.after.available() as i128 - l.before.available() as i128;
        let _ = write!(
            v,
            r#"{}{{"vendor_item_id":{},"fulfillment_center_id":{},"quantity":{},"delta":{delta},"available_after":{}}}"#,
            if i == 0 { "" } else { "," },
            l.key.item,
            l.key.fc,
            l.qty,
            l.after.available()
        );
    }
    v.extend_from_slice(b"]}");
}

/// Writes the derived event of a row the mutation took to 0 or lifted from
/// 0; false (nothing written) for any other row.
fn write_derived(
    c: &Change,
    row: Key,
    before: Level,
    after: Level,
    key: &mut String,
    v: &mut Vec<u8>,
) -> bool {
    let kind = match (before.available(), after.available()) {
        (b, 0) if b > 0 => "sold_out",
        (0, a) if a > 0 => "restocked",
        _ => return false,
    };
    write_row_key(row, key);
    v.clear();
    let _ = write!(
        v,
        r#"{{"schema_version":{SCHEMA_VERSION},"lsn":{},"type":"{kind}","committed_at_ms":{},"vendor_item_id":{},"fulfillment_center_id":{},"available_after":{}}}"#,
        c.lsn,
        c.ts_ms,
        row.item,
        row.fc,
        after.available()
    );
    true
}

fn write_level(row: Key, l: Level, lsn: u64, key: &mut String, v: &mut Vec<u8>) {
    write_row_key(row, key);
    v.clear();
    let _ = write!(
        v,
        r#"{{"schema_version":{SCHEMA_VERSION},"vendor_item_id":{},"fulfillment_center_id":{},"available":{},"on_hand":{},"held":{},"lsn":{lsn}}}"#,
        row.item,
        row.fc,
        l.available(),
        l.on_hand,
        l.held
    );
}

fn write_row_key(row: Key, key: &mut String) {
    key.clear();
    let _ = std::fmt::Write::write_fmt(key, format_args!("{}:{}", row.item, row.fc));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::levels::Levels;
    use serde_json::{json, Value};
    use stockd_protocol::Line;
    use stockd_record::Mutation;

    fn change(levels: &mut Levels, lsn: u64, op: Op, lines: &[(u64, u32, u32)]) -> Change {
        let mutation = Mutation { op, lines: lines.iter().map(|&(i, f, q)| Line::new(i, f, q)).collect() };
        let lines = levels.apply(lsn, &mutation);
        Change { lsn, ts_ms: 1_700_000_000_000 + lsn, mutation, lines }
    }

    fn json(m: &Message) -> Value {
        serde_json::from_slice(&m.1).unwrap()
    }

    #[test]
    fn an_order_that_sells_out_a_row_says_so_and_a_receipt_restocks_it() {
        let key = Key { item: 42, fc: 7 };
        let mut levels = Levels::new(0, [(key, Level { on_hand: 5, held: 0 })]);
        let order = change(&mut levels, 1, Op::Order { id: 9001 }, &[(42, 7, 5)]);
        let (k, _) = event(&order);
        assert_eq!(k, "9001");
        assert_eq!(
            json(&event(&order)),
            json!({"schema_version": 1, "lsn": 1, "type": "order", "id": 9001, "committed_at_ms": 1_700_000_000_001u64,
                   "lines": [{"vendor_item_id": 42, "fulfillment_center_id": 7, "quantity": 5, "delta": -5, "available_after": 0}]})
        );
        let derived = derived_events(&order);
        assert_eq!(derived.len(), 1);
        assert_eq!(derived[0].0, "42:7");
        assert_eq!(json(&derived[0])["type"], "sold_out");
        assert_eq!(
            json(&super::levels(&order)[0]),
            json!({"schema_version": 1, "vendor_item_id": 42, "fulfillment_center_id": 7, "available": 0, "on_hand": 0, "held": 0, "lsn": 1})
        );

        let mut all = Vec::new();
        messages(&order, &mut String::new(), &mut Vec::new(), |t, k, v| {
            all.push((t, k.to_string(), v.to_vec()))
        });
        let want = [
            (Topic::Events, event(&order)),
            (Topic::Events, derived[0].clone()),
            (Topic::Levels, super::levels(&order)[0].clone()),
        ];
        assert_eq!(all, want.map(|(t, (k, v))| (t, k, v)).to_vec(), "event, derived, levels, in that order");

        let receipt = change(&mut levels, 2, Op::Inbound { id: 5 }, &[(42, 7, 3)]);
        assert_eq!(json(&derived_events(&receipt)[0])["type"], "restocked");
        let reserve = change(&mut levels, 3, Op::Reserve { id: 6, ttl_ms: 500 }, &[(42, 7, 1)]);
        assert!(derived_events(&reserve).is_empty());
        assert_eq!(json(&event(&reserve))["ttl_ms"], 500);
        let expiry = change(&mut levels, 4, Op::Release { id: 6, expired: true }, &[(42, 7, 1)]);
        assert_eq!(json(&event(&expiry))["type"], "expiry");
        let adjust = change(&mut levels, 5, Op::Adjust { before: 3, after: 10, reason: 2 }, &[(42, 7, 0)]);
        let (k, _) = event(&adjust);
        assert_eq!(k, "42:7");
        let v = json(&event(&adjust));
        assert_eq!(
            (v["before"].clone(), v["after"].clone(), v["reason"].clone()),
            (json!(3), json!(10), json!(2))
        );
        assert_eq!(v["lines"][0]["available_after"], 10);
    }
}
