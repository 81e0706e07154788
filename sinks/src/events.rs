//! The messages downstream consumers read, as JSON (schema in docs/events.md).
//!
//! - An event per committed mutation, keyed by its order, receipt or hold id
//!   (an adjust: `item:center`).
//! - A derived `sold_out` or `restocked` event, keyed `item:center`, when a
//!   record takes a row's available to 0 or lifts it from 0.
//! - A level per changed row, keyed `item:center`: the latest one per key is
//!   the row's current level (fit for a compacted topic).

use serde_json::{json, Value};
use stockd_protocol::Key;
use stockd_record::Op;

use crate::levels::{rows_changed, Level};
use crate::sink::Change;

/// Version of the JSON layout of events and levels.
pub const SCHEMA_VERSION: u32 = 1;

/// A message: key and JSON value.
pub type Message = (String, Vec<u8>);

pub fn row_key(key: Key) -> String {
    format!("{}:{}", key.item, key.fc)
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

/// The event of one committed mutation.
pub fn event(c: &Change) -> Message {
    let lines: Vec<Value> = c
        .lines
        .iter()
        .map(|l| {
            json!({
                "vendor_item_id": l.key.item,
                "fulfillment_center_id": l.key.fc,
                "quantity": l.qty,
                "delta": l.after.available() as i64 - l.before.available() as i64,
                "available_after": l.after.available(),
            })
        })
        .collect();
    let mut v = json!({
        "schema_version": SCHEMA_VERSION,
        "lsn": c.lsn,
        "type": event_type(&c.mutation.op),
        "committed_at_ms": c.ts_ms,
        "lines": lines,
    });
    let key = match c.mutation.op {
        Op::Order { id }
        | Op::Inbound { id }
        | Op::Cancel { id }
        | Op::Reserve { id, .. }
        | Op::Confirm { id }
        | Op::Release { id, .. } => {
            v["id"] = json!(id);
            if let Op::Reserve { ttl_ms, .. } = c.mutation.op {
                v["ttl_ms"] = json!(ttl_ms);
            }
            id.to_string()
        }
        Op::Adjust { before, after, reason } => {
            v["before"] = json!(before);
            v["after"] = json!(after);
            v["reason"] = json!(reason);
            c.lines.first().map_or_else(String::new, |l| row_key(l.key))
        }
    };
    (key, v.to_string().into_bytes())
}

/// `sold_out` and `restocked` events of one mutation, one per row whose available reached or left 0.
pub fn derived_events(c: &Change) -> Vec<Message> {
    rows_changed(&c.lines)
        .into_iter()
        .filter_map(|(key, before, after)| {
            let kind = match (before.available(), after.available()) {
                (b, 0) if b > 0 => "sold_out",
                (0, a) if a > 0 => "restocked",
                _ => return None,
            };
            let v = json!({
                "schema_version": SCHEMA_VERSION,
                "lsn": c.lsn,
                "type": kind,
                "committed_at_ms": c.ts_ms,
                "vendor_item_id": key.item,
                "fulfillment_center_id": key.fc,
                "available_after": after.available(),
            });
            Some((row_key(key), v.to_string().into_bytes()))
        })
        .collect()
}

/// A row's level as of `lsn`.
pub fn level(key: Key, l: Level, lsn: u64) -> Message {
    let v = json!({
        "schema_version": SCHEMA_VERSION,
        "vendor_item_id": key.item,
        "fulfillment_center_id": key.fc,
        "available": l.available(),
        "on_hand": l.on_hand,
        "held": l.held,
        "lsn": lsn,
    });
    (row_key(key), v.to_string().into_bytes())
}

/// The levels of the rows one mutation changed.
pub fn levels(c: &Change) -> Vec<Message> {
    rows_changed(&c.lines).into_iter().map(|(key, _, after)| level(key, after, c.lsn)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::levels::Levels;
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
