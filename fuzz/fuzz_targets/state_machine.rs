//! Drives the state machine with an arbitrary sequence of operations on 1
//! to 3 shards, the way the coordinator does (plan on the id's owner,
//! prepare everywhere, apply or abort), with one mutation at a time left
//! undecided so that prepares meet reservations, small id caps so that ids
//! are forgotten, hold expiry, and snapshots taken part by part while
//! commands keep coming. The store asserts its invariants itself (held <=
//! on hand <= STOCK_MAX, reservations <= available, LSNs increasing, ...);
//! this target adds: a snapshot read back and a regroup hold the same rows.
//! Any panic is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stockd::state::{Command, IdKey, IdLimits, Mutation, Store};
use stockd_protocol::{shard_of, Key, Line, Lines};

struct Run {
    stores: Vec<Store>,
    lsn: u64,
    now_ms: u64,
    next_txn: u64,
    /// A prepared, undecided mutation: (txn, record, its id). Like the
    /// coordinator's busy ids, no other command on that id runs meanwhile.
    open: Option<(u64, Mutation, Option<IdKey>)>,
}

impl Run {
    fn plan(&self, cmd: Command) -> Option<Mutation> {
        let owner = shard_of(cmd.owner_id(), self.stores.len());
        self.stores[owner].plan(cmd, self.now_ms).ok()
    }

    fn prepare(&mut self, m: &Mutation) -> Option<u64> {
        self.next_txn += 1;
        let txn = self.next_txn;
        let ok = self.stores.iter_mut().map(|s| s.prepare(txn, m).is_ok()).fold(true, |a, b| a & b);
        if !ok {
            self.stores.iter_mut().for_each(|s| s.abort(txn));
            return None;
        }
        Some(txn)
    }

    fn commit(&mut self, txn: u64, m: &Mutation) {
        self.lsn += 1;
        for s in self.stores.iter_mut() {
            s.apply(Some(txn), self.lsn, self.now_ms, m);
        }
    }

    /// Plans and prepares `cmd`; keeps it undecided if `hold_open`, else commits it.
    fn run(&mut self, cmd: Command, hold_open: bool) {
        let key = cmd.id_key();
        if key.is_some() && self.open.as_ref().is_some_and(|(_, _, open)| *open == key) {
            return; // the coordinator answers CONFLICT: an operation on this id is in flight
        }
        let Some(m) = self.plan(cmd) else { return };
        let Some(txn) = self.prepare(&m) else { return };
        if hold_open && self.open.is_none() {
            self.open = Some((txn, m, key));
        } else {
            self.commit(txn, &m);
        }
    }

    fn decide_open(&mut self, commit: bool) {
        if let Some((txn, m, _)) = self.open.take() {
            if commit {
                self.commit(txn, &m);
            } else {
                self.stores.iter_mut().for_each(|s| s.abort(txn));
            }
        }
    }

    fn expire_holds(&mut self) {
        for i in 0..self.stores.len() {
            for id in self.stores[i].expired_holds(self.now_ms, 16) {
                self.run(Command::Release { id, expired: true }, false);
            }
        }
    }

    /// Snapshots every store (read back into fresh stores) and regroups: same rows.
    fn check_snapshot_and_regroup(&mut self, shards: usize, limits: IdLimits) {
        self.decide_open(false);
        let rows = |stores: &[Store]| -> Vec<u64> {
            (0..8u64).map(|item| stores[shard_of(item, stores.len())].available(Key { item, fc: 1 })).collect()
        };
        let before = rows(&self.stores);
        let n = self.stores.len();
        let mut read_back: Vec<Store> = (0..n).map(|i| Store::new(i, n, limits)).collect();
        for (s, fresh) in self.stores.iter().zip(read_back.iter_mut()) {
            fresh.absorb(&s.encode()).expect("a store reads its own snapshot");
        }
        assert_eq!(rows(&read_back), before, "snapshot read back");
        let stores = std::mem::take(&mut self.stores);
        self.stores = Store::regroup(stores, shards, limits);
        assert_eq!(rows(&self.stores), before, "regrouped");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&head, ops)) = data.split_first() else { return };
    let shards = 1 + (head % 3) as usize;
    let limits = IdLimits { window_ms: 400, min_window_ms: (head as u64 >> 2) % 50, max_ids: 1 + (head >> 4) as usize };
    let stores = (0..shards).map(|i| Store::new(i, shards, limits)).collect();
    let mut run = Run { stores, lsn: 0, now_ms: 1_000, next_txn: 0, open: None };
    let mut snapshot_parts = 0;
    for c in ops.chunks_exact(4) {
        let (op, id, item, qty) = (c[0], (c[1] % 16) as u64, (c[2] % 8) as u64, 1 + (c[3] % 5) as u32);
        let lines = vec![Line::new(item, 1, qty), Line::new((item + c[1] as u64) % 8, 1, qty)];
        let lines = Lines::from_slice(&lines[..1 + (c[0] as usize >> 7)]);
        let hold_open = c[3] & 0x80 != 0;
        match op % 12 {
            0 | 1 => run.run(Command::Order { id, lines }, hold_open),
            2 | 3 => run.run(Command::Inbound { id, lines }, hold_open),
            4 => run.run(Command::Cancel { id }, hold_open),
            5 => run.run(Command::Reserve { id, ttl_ms: 10 * qty, lines }, hold_open),
            6 => run.run(Command::Confirm { id }, hold_open),
            7 => run.run(Command::Release { id, expired: false }, hold_open),
            8 => run.run(Command::Adjust { key: Key { item, fc: 1 }, on_hand: 3 * qty as u64, reason: 0 }, hold_open),
            9 => {
                run.now_ms += 7 * qty as u64;
                run.expire_holds();
            }
            10 => {
                run.decide_open(c[1] & 1 == 0);
                // A snapshot begun now, written a part per operation from here on.
                if snapshot_parts == 0 {
                    let lsn = run.lsn;
                    run.stores.iter_mut().for_each(|s| s.begin_snapshot(lsn));
                    snapshot_parts = 64;
                }
            }
            _ => {
                if snapshot_parts == 0 {
                    run.check_snapshot_and_regroup(1 + (c[1] % 3) as usize, limits);
                }
            }
        }
        if snapshot_parts > 0 {
            for s in run.stores.iter_mut() {
                s.snapshot_step();
            }
            snapshot_parts -= 1;
        }
    }
});
