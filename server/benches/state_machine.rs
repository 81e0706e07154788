//! State-machine operations per second on one core (no I/O, no threads).
//!
//! `cargo bench -p stockd --bench state_machine`
//!
//! 100,000 rows (25,000 items x 4 centers). Each figure is the median of 5
//! runs of 1,000,000 operations. "order" is the full path a single-shard
//! order takes on its shard: plan (idempotency check), prepare (validate and
//! reserve), record encoding, and apply after the commit; the baseline is a
//! bare HashMap lookup+decrement of the same keys, the floor for any design.

use std::collections::HashMap;
use std::hint::black_box;
use std::time::Instant;

use stockd::state::{Command, IdLimits, Store};
use stockd_protocol::{Key, Line};

const ITEMS: u64 = 25_000;
const CENTERS: u32 = 4;
const OPS: u64 = 1_000_000;

fn key(i: u64) -> Key {
    let x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11;
    Key { item: x % ITEMS, fc: (x / ITEMS % CENTERS as u64) as u32 }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn measure(mut f: impl FnMut(u64) -> u64) -> f64 {
    let mut runs = Vec::new();
    let mut base = 0;
    for _ in 0..5 {
        let t = Instant::now();
        let mut acc = 0;
        for i in 0..OPS {
            acc ^= f(base + i);
        }
        black_box(acc);
        runs.push(OPS as f64 / t.elapsed().as_secs_f64());
        base += OPS;
    }
    median(runs)
}

fn stocked() -> Store {
    let mut s = Store::new(0, 1, IdLimits { window_ms: u64::MAX, min_window_ms: 0, max_ids: usize::MAX });
    let mut lsn = 0;
    for item in 0..ITEMS {
        let lines: Vec<Line> = (0..CENTERS).map(|fc| Line::new(item, fc, 4_000_000)).collect();
        let m = s.plan(Command::Inbound { id: item, lines: lines.into() }, 0).unwrap();
        lsn += 1;
        s.apply(None, lsn, 0, &m);
    }
    s
}

fn main() {
    let mut map: HashMap<Key, u64> =
        (0..ITEMS).flat_map(|item| (0..CENTERS).map(move |fc| (Key { item, fc }, 4_000_000u64))).collect();
    let base_read = measure(|i| map[&key(i)]);
    let base_write = measure(|i| {
        let v = map.get_mut(&key(i)).unwrap();
        *v -= 1;
        *v
    });
    let s = stocked();
    let query = measure(|i| s.available(key(i)));
    let mut s = stocked();
    let mut lsn = 1_000_000;
    let mut buf = Vec::new();
    let mut order = |lines: u64| {
        let s = &mut s;
        measure(|i| {
            let id = i + lines * 10_000_000 + 1_000_000;
            let ls: Vec<Line> = (0..lines).map(|j| Line { key: key(i * 7 + j), qty: 1 }).collect();
            let m = s.plan(Command::Order { id, lines: ls.into() }, 0).unwrap();
            s.prepare(id, &m).unwrap();
            buf.clear();
            m.encode(&mut buf);
            lsn += 1;
            s.apply(Some(id), lsn, 0, &m);
            buf.len() as u64
        })
    };
    let order1 = order(1);
    let order3 = order(3);
    // Snapshot stall: the whole store at once, against the longest single
    // step of the part-by-part snapshot the shards use.
    let t = Instant::now();
    let whole = s.encode();
    let whole_ms = t.elapsed().as_secs_f64() * 1e3;
    s.begin_snapshot(lsn);
    let (mut longest, mut stepped) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
    let (mut parts, mut pieces) = (Vec::new(), 0);
    loop {
        let t = Instant::now();
        let piece = s.snapshot_step();
        longest = longest.max(t.elapsed());
        stepped += t.elapsed();
        if let Some(p) = piece {
            parts.extend_from_slice(&p.bytes);
            pieces += 1;
            if p.last {
                break;
            }
        }
    }
    assert!(parts == whole, "a snapshot in pieces is the whole store's encoding");
    println!("state machine, one core, {} rows, median of 5 x {OPS} ops", ITEMS * CENTERS as u64);
    println!("{:<34} {:>14} {:>12}", "operation", "ops/s", "vs baseline");
    println!("{:<34} {:>14.0} {:>12}", "baseline: HashMap get", base_read, "1.00");
    println!("{:<34} {:>14.0} {:>12.2}", "query (available)", query, query / base_read);
    println!("{:<34} {:>14.0} {:>12}", "baseline: HashMap get_mut+decr", base_write, "1.00");
    println!("{:<34} {:>14.0} {:>12.2}", "order, 1 line (plan+prepare+apply)", order1, order1 / base_write);
    println!("{:<34} {:>14.0} {:>12.2}", "order, 3 lines", order3, order3 / base_write);
    println!(
        "snapshot of {} rows + {} ids ({} MB): whole store {:.0} ms; part by part {:.0} ms in all ({pieces} pieces), longest step {:.1} ms",
        s.row_count(),
        s.id_count(),
        whole.len() >> 20,
        whole_ms,
        stepped.as_secs_f64() * 1e3,
        longest.as_secs_f64() * 1e3
    );
}
