//! Property tests of the state machine against a deliberately simple model.

use std::collections::{HashMap, HashSet};

use proptest::prelude::*;
use stockd_protocol::{Key, Line, Lines, STOCK_MAX};

use super::*;

/// What the model says a command should do.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Ok,
    Insufficient { line: u16, available: u64 },
    Duplicate,
    NotFound,
    Conflict,
}

#[derive(Clone, Debug)]
enum ModelId {
    Order { lines: Vec<Line>, cancelled: bool, from_hold: bool },
    Hold { lines: Vec<Line>, deadline: u64, done: Option<bool> }, // Some(true) confirmed, Some(false) released
}

/// Sequential reference: no pending, no sharding, no eviction.
#[derive(Default)]
struct Model {
    rows: HashMap<Key, (u64, u64)>,
    ids: HashMap<u64, ModelId>,
    receipts: HashSet<u64>,
}

impl Model {
    fn avail(&self, k: Key) -> u64 {
        self.rows.get(&k).map_or(0, |(o, h)| o - h)
    }

    /// Takes `lines` from available (orders: on hand; holds: into held) if all fit.
    fn take(&mut self, lines: &[Line], into_held: bool) -> Outcome {
        let mut need: HashMap<Key, u64> = HashMap::new();
        for (i, l) in lines.iter().enumerate() {
            let n = need.entry(l.key).or_default();
            *n += l.qty as u64;
            if *n > self.avail(l.key) {
                let available = self.avail(l.key) - (*n - l.qty as u64);
                return Outcome::Insufficient { line: i as u16, available };
            }
        }
        for l in lines {
            let r = self.rows.entry(l.key).or_default();
            if into_held {
                r.1 += l.qty as u64;
            } else {
                r.0 -= l.qty as u64;
            }
        }
        Outcome::Ok
    }

    fn add(&mut self, lines: &[Line]) {
        for l in lines {
            self.rows.entry(l.key).or_default().0 += l.qty as u64;
        }
    }

    fn run(&mut self, cmd: &Command, now: u64) -> Outcome {
        match cmd {
            Command::Order { id, lines } => match self.ids.get(id) {
                Some(ModelId::Order { from_hold: false, .. }) => Outcome::Duplicate,
                Some(_) => Outcome::Conflict,
                None => {
                    let o = self.take(lines, false);
                    if o == Outcome::Ok {
                        self.ids.insert(
                            *id,
                            ModelId::Order { lines: lines.to_vec(), cancelled: false, from_hold: false },
                        );
                    }
                    o
                }
            },
            Command::Inbound { id, lines } => {
                if !self.receipts.insert(*id) {
                    return Outcome::Duplicate;
                }
                self.add(lines);
                Outcome::Ok
            }
            Command::Reserve { id, ttl_ms, lines } => match self.ids.get(id) {
                Some(ModelId::Hold { .. }) | Some(ModelId::Order { from_hold: true, .. }) => {
                    Outcome::Duplicate
                }
                Some(_) => Outcome::Conflict,
                None => {
                    let o = self.take(lines, true);
                    if o == Outcome::Ok {
                        let deadline = now + *ttl_ms as u64;
                        self.ids.insert(*id, ModelId::Hold { lines: lines.to_vec(), deadline, done: None });
                    }
                    o
                }
            },
            Command::Cancel { id } => match self.ids.get(id).cloned() {
                None => Outcome::NotFound,
                Some(ModelId::Order { cancelled: true, .. }) => Outcome::Duplicate,
                Some(ModelId::Order { lines, from_hold, .. }) => {
                    self.add(&lines);
                    self.ids.insert(*id, ModelId::Order { lines, cancelled: true, from_hold });
                    Outcome::Ok
                }
                Some(ModelId::Hold { .. }) => Outcome::Conflict,
            },
            Command::Confirm { id } => match self.ids.get(id).cloned() {
                None => Outcome::NotFound,
                Some(ModelId::Hold { lines, deadline, done: None }) if deadline > now => {
                    for l in &lines {
                        let r = self.rows.get_mut(&l.key).unwrap();
                        r.0 -= l.qty as u64;
                        r.1 -= l.qty as u64;
                    }
                    // A confirmed hold is an order from now on.
                    self.ids.insert(*id, ModelId::Order { lines, cancelled: false, from_hold: true });
                    Outcome::Ok
                }
                Some(ModelId::Order { from_hold: true, .. }) => Outcome::Duplicate,
                Some(_) => Outcome::Conflict,
            },
            Command::Release { id, .. } => match self.ids.get(id).cloned() {
                None => Outcome::NotFound,
                Some(ModelId::Hold { lines, deadline, done: None }) => {
                    for l in &lines {
                        self.rows.get_mut(&l.key).unwrap().1 -= l.qty as u64;
                    }
                    self.ids.insert(*id, ModelId::Hold { lines, deadline, done: Some(false) });
                    Outcome::Ok
                }
                Some(ModelId::Hold { done: Some(false), .. }) => Outcome::Duplicate,
                Some(_) => Outcome::Conflict,
            },
            Command::Adjust { key, on_hand, .. } => {
                let held = self.rows.get(key).map_or(0, |r| r.1);
                if *on_hand < held {
                    return Outcome::Conflict;
                }
                self.rows.entry(*key).or_default().0 = *on_hand;
                Outcome::Ok
            }
        }
    }
}

/// What one command got: a record, an answer from `plan`, or a refusal.
#[derive(Debug)]
pub(crate) enum Got {
    Committed,
    Answered(Answer),
    Refused(Refusal),
}

fn outcome(r: &Got) -> Outcome {
    match r {
        Got::Committed => Outcome::Ok,
        Got::Refused(Refusal::Insufficient { line, available, .. }) => {
            Outcome::Insufficient { line: *line, available: *available }
        }
        Got::Answered(Answer::Duplicate { .. }) => Outcome::Duplicate,
        Got::Answered(Answer::NotFound { .. }) => Outcome::NotFound,
        Got::Answered(Answer::Conflict(_))
        | Got::Refused(Refusal::Busy { .. } | Refusal::BelowHeld { .. }) => Outcome::Conflict,
        other => panic!("unexpected {other:?}"),
    }
}

const KEYS: [Key; 4] =
    [Key { item: 1, fc: 1 }, Key { item: 1, fc: 2 }, Key { item: 2, fc: 1 }, Key { item: 77, fc: 3 }];

fn lines() -> impl Strategy<Value = Vec<Line>> {
    prop::collection::vec((0..KEYS.len(), 1u32..6), 1..4)
        .prop_map(|v| v.into_iter().map(|(k, qty)| Line { key: KEYS[k], qty }).collect())
}

fn command() -> impl Strategy<Value = Command> {
    let id = 0u64..8;
    prop_oneof![
        4 => (id.clone(), lines()).prop_map(|(id, lines)| Command::Order { id, lines: lines.into() }),
        3 => (id.clone(), lines()).prop_map(|(id, lines)| Command::Inbound { id, lines: lines.into() }),
        1 => id.clone().prop_map(|id| Command::Cancel { id }),
        2 => (id.clone(), 1u32..50, lines()).prop_map(|(id, ttl_ms, lines)| Command::Reserve { id, ttl_ms, lines: lines.into() }),
        1 => id.clone().prop_map(|id| Command::Confirm { id }),
        1 => id.clone().prop_map(|id| Command::Release { id, expired: false }),
        1 => (0..KEYS.len(), 0u64..20).prop_map(|(k, on_hand)| Command::Adjust { key: KEYS[k], on_hand, reason: 1 }),
    ]
}

/// Runs one command through plan, prepare on every shard, and apply, the way the server does.
fn execute(stores: &mut [Store], cmd: Command, txn: u64, lsn: &mut u64, now: u64) -> (Got, Option<Mutation>) {
    let n = stores.len();
    let owner = shard_of(cmd.owner_id(), n);
    let m = match stores[owner].plan(cmd, now) {
        Ok(m) => m,
        Err(answer) => return (Got::Answered(answer), None),
    };
    let mut first_refusal: Option<Refusal> = None;
    let mut prepared = Vec::new();
    for (i, s) in stores.iter_mut().enumerate() {
        match s.prepare(txn, &m) {
            Ok(()) => prepared.push(i),
            Err(r) => {
                // Sequential: nothing else is in flight, so no refusal is contended.
                assert!(!r.is_contended(), "{r:?}");
                if first_refusal.as_ref().is_none_or(|f| r.line() < f.line()) {
                    first_refusal = Some(r);
                }
            }
        }
    }
    if let Some(r) = first_refusal {
        for i in prepared {
            stores[i].abort(txn, &m);
        }
        return (Got::Refused(r), None);
    }
    *lsn += 1;
    for s in stores.iter_mut() {
        s.apply(Some(txn), *lsn, now, &m);
    }
    (Got::Committed, Some(m))
}

/// Adds a snapshot piece to what came before it; pieces come in order and
/// none after the last.
fn take_piece(out: &mut (Vec<u8>, bool), piece: SnapshotPiece) {
    assert!(!out.1, "no piece after the last");
    out.0.extend_from_slice(&piece.bytes);
    out.1 = piece.last;
}

fn check_rows(stores: &[Store], model: &Model) -> Result<(), TestCaseError> {
    for k in KEYS {
        let owner = &stores[shard_of(k.item, stores.len())];
        prop_assert_eq!(owner.available(k), model.avail(k), "key {:?}", k);
        if let Some(r) = owner.row(k) {
            prop_assert_eq!((r.on_hand, r.held), *model.rows.get(&k).unwrap_or(&(0, 0)));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Sequential commands on 1 to 3 shards behave exactly like the model; the
    /// log replayed into a fresh store, and a snapshot re-split, agree too.
    #[test]
    fn matches_reference_model(
        cmds in prop::collection::vec(command(), 1..60),
        shards in 1usize..4,
        snap_at in any::<prop::sample::Index>(),
        parts_per_cmd in 1usize..12,
        step_slots in 1usize..4,
        piece_bytes in 1usize..200,
    ) {
        let mut stores: Vec<Store> = (0..shards).map(|i| Store::new(i, shards, IdLimits::default())).collect();
        // Steps of a slot or three: the cursor stops inside the tables' parts.
        stores.iter_mut().for_each(|s| s.set_snapshot_step_slots(step_slots));
        // Pieces of a few bytes: handed over at almost every section's end.
        stores.iter_mut().for_each(|s| s.set_snapshot_piece_bytes(piece_bytes));
        let mut model = Model::default();
        let mut log = Vec::new();
        let mut lsn = 0;
        // A snapshot begun at one step and written part by part while commands keep coming.
        let snap_step = snap_at.index(cmds.len());
        let mut snap_lsn = 0;
        // Each store's pieces so far, and whether its last one came.
        let mut snapshot: Vec<(Vec<u8>, bool)> = vec![(Vec::new(), false); shards];
        for (step, cmd) in cmds.into_iter().enumerate() {
            if step == snap_step {
                snap_lsn = lsn;
                stores.iter_mut().for_each(|s| s.begin_snapshot(lsn));
            }
            let now = 1_000 + step as u64 * 10;
            // Holds past their deadline are released first, as the expiry timer does.
            for s in 0..shards {
                for id in stores[s].expired_holds(now, 100) {
                    let (r, m) = execute(&mut stores, Command::Release { id, expired: true }, step as u64, &mut lsn, now);
                    prop_assert_eq!(outcome(&r), model.run(&Command::Release { id, expired: true }, now));
                    log.extend(m.map(|m| (lsn, now, m)));
                }
            }
            let want = model.run(&cmd, now);
            let (resp, m) = execute(&mut stores, cmd.clone(), 1_000 + step as u64, &mut lsn, now);
            prop_assert_eq!(outcome(&resp), want, "{:?}", cmd);
            log.extend(m.map(|m| (lsn, now, m)));
            check_rows(&stores, &model)?;
            for (s, out) in stores.iter_mut().zip(snapshot.iter_mut()) {
                for _ in 0..parts_per_cmd {
                    if let Some(piece) = s.snapshot_step() {
                        take_piece(out, piece);
                    }
                }
            }
        }
        for (s, out) in stores.iter_mut().zip(snapshot.iter_mut()) {
            if let Some(piece) = s.finish_snapshot() {
                take_piece(out, piece);
            }
        }
        let snapshot: Vec<Option<Vec<u8>>> =
            snapshot.into_iter().map(|(bytes, done)| done.then_some(bytes)).collect();
        // Replay of the log (encoded and decoded, as on disk) into one store.
        let mut replayed = Store::new(0, 1, IdLimits::default());
        for (lsn, ts, m) in &log {
            let mut bytes = Vec::new();
            m.encode(&mut bytes);
            let LogRecord::Mutation(m) = LogRecord::decode(&bytes).unwrap() else { panic!("a mutation") };
            replayed.apply(None, *lsn, *ts, &m);
        }
        check_rows(std::slice::from_ref(&replayed), &model)?;
        // The part-by-part snapshot plus the records after its LSN gives the same state.
        let mut restored = Store::new(0, 1, IdLimits::default());
        for bytes in snapshot.into_iter().flatten() {
            restored.absorb(&bytes).unwrap();
        }
        for (l, ts, m) in log.iter().filter(|(l, _, _)| *l > snap_lsn) {
            restored.apply(None, *l, *ts, m);
        }
        check_rows(std::slice::from_ref(&restored), &model)?;
        for id in 0..8u64 {
            prop_assert_eq!(restored.id(id), replayed.id(id), "id {} after snapshot at {}", id, snap_lsn);
        }
        // The shards regrouped into a different count hold the same rows and ids.
        let resplit = Store::regroup(stores, shards % 3 + 1, IdLimits::default());
        check_rows(&resplit, &model)?;
        for s in &resplit {
            for id in 0..8u64 {
                if shard_of(id, s.shards) == s.shard {
                    prop_assert_eq!(s.id(id), replayed.id(id));
                }
            }
        }
    }

    /// Orders and inbounds prepared concurrently on two shards, decided in any
    /// order: no row ever goes below zero, and replaying the committed records
    /// gives the same rows.
    #[test]
    fn interleaved_prepares_never_oversell(
        steps in prop::collection::vec((any::<bool>(), lines(), any::<prop::sample::Index>(), 0u8..3), 1..80)
    ) {
        let mut stores: Vec<Store> = (0..2).map(|i| Store::new(i, 2, IdLimits::default())).collect();
        let mut open: Vec<(u64, Mutation)> = Vec::new();
        let mut log = Vec::new();
        let mut lsn = 0;
        for (n, (is_order, lines, pick, action)) in steps.into_iter().enumerate() {
            let id = n as u64;
            let op = if is_order { Op::Order { id } } else { Op::Inbound { id } };
            let m = Mutation { op, lines: lines.into() };
            let results: Vec<_> = stores.iter_mut().map(|s| s.prepare(id, &m)).collect();
            if results.iter().all(Result::is_ok) {
                open.push((id, m));
            } else {
                for s in stores.iter_mut() {
                    s.abort(id, &m);
                }
            }
            if !open.is_empty() && action > 0 {
                let (txn, m) = open.remove(pick.index(open.len()));
                if action == 1 {
                    lsn += 1;
                    for s in stores.iter_mut() {
                        s.apply(Some(txn), lsn, 0, &m);
                    }
                    log.push((lsn, m));
                } else {
                    for s in stores.iter_mut() {
                        s.abort(txn, &m);
                    }
                }
            }
            for s in &stores {
                for k in KEYS {
                    if let Some(r) = s.row(k) {
                        prop_assert!(r.held <= r.on_hand && r.on_hand <= STOCK_MAX);
                        prop_assert!(s.pending_on(k).take <= r.available(), "{:?}", r);
                    }
                }
            }
        }
        // Commit what is still open: every prepared order must still fit.
        for (txn, m) in open {
            lsn += 1;
            for s in stores.iter_mut() {
                s.apply(Some(txn), lsn, 0, &m);
            }
            log.push((lsn, m));
        }
        let mut replayed = Store::new(0, 1, IdLimits::default());
        for (lsn, m) in &log {
            replayed.apply(None, *lsn, 0, m);
        }
        for k in KEYS {
            let s = &stores[shard_of(k.item, 2)];
            let live = s.row(k).map_or((0, 0, 0), |r| (r.on_hand, r.held, s.pending_on(k).n));
            prop_assert_eq!(live, replayed.row(k).map_or((0, 0, 0), |r| (r.on_hand, r.held, 0)));
        }
    }
}

#[test]
fn ids_are_forgotten_after_the_window_or_beyond_the_cap_but_live_holds_are_kept() {
    let limits = IdLimits { window_ms: 1_000, min_window_ms: 100, max_ids: 3 };
    let mut s = Store::new(0, 1, limits);
    let key = Key { item: 5, fc: 1 };
    let line = |qty| vec![Line { key, qty }];
    s.apply(None, 1, 0, &Mutation { op: Op::Inbound { id: 1 }, lines: line(10).into() });
    s.apply(None, 2, 10, &Mutation { op: Op::Reserve { id: 2, ttl_ms: 5_000 }, lines: line(1).into() });
    s.apply(None, 3, 20, &Mutation { op: Op::Order { id: 3 }, lines: line(1).into() });
    // Full, and the oldest id is younger than the minimum window: refused.
    assert_eq!(s.plan(Command::Order { id: 4, lines: line(1).into() }, 30), Err(Answer::TableFull));
    assert_eq!(
        s.plan(Command::Inbound { id: 1, lines: line(1).into() }, 30),
        Err(Answer::Duplicate { lsn: 1 })
    );
    // Later the oldest may go: accepted, and applying it forgets receipt 1.
    let m = s.plan(Command::Order { id: 4, lines: line(1).into() }, 200).unwrap();
    s.apply(None, 4, 200, &m);
    assert_eq!(s.id_count(), 3);
    let again = s.plan(Command::Inbound { id: 1, lines: line(1).into() }, 200);
    assert!(!matches!(again, Err(Answer::Duplicate { .. })), "{again:?}");
    // Past the window everything old is forgotten except the live hold.
    s.apply(None, 5, 2_000, &Mutation { op: Op::Inbound { id: 9 }, lines: line(1).into() });
    assert!(s.id(2).is_some(), "live hold kept");
    assert!(s.id(3).is_none() && s.id(4).is_none());
    assert_eq!(s.id_count(), 2);
    assert_eq!(s.expired_holds(5_010, 10), vec![2]);
}

#[test]
fn adjust_refuses_below_held_and_with_changes_in_flight() {
    let mut s = Store::new(0, 1, IdLimits::default());
    let key = Key { item: 5, fc: 1 };
    s.apply(None, 1, 0, &Mutation { op: Op::Inbound { id: 1 }, lines: vec![Line { key, qty: 10 }].into() });
    s.apply(
        None,
        2,
        0,
        &Mutation { op: Op::Reserve { id: 2, ttl_ms: 100 }, lines: vec![Line { key, qty: 4 }].into() },
    );
    let adj = |s: &Store, on_hand| s.plan(Command::Adjust { key, on_hand, reason: 0 }, 0).unwrap();
    assert_eq!(s.clone_prepare(&adj(&s, 3)), Err(Refusal::BelowHeld { held: 4 }));
    let order = Mutation { op: Op::Order { id: 3 }, lines: vec![Line { key, qty: 1 }].into() };
    s.prepare(77, &order).unwrap();
    assert_eq!(s.prepare(78, &adj(&s, 8)), Err(Refusal::Busy { line: 0 }));
    s.abort(77, &order);
    let m = adj(&s, 8);
    s.prepare(79, &m).unwrap();
    s.apply(Some(79), 3, 0, &m);
    assert_eq!((s.row(key).unwrap().on_hand, s.available(key)), (8, 4));
}

#[test]
fn the_reserved_rows_table_shrinks_after_a_burst_and_reservations_stay_exact() {
    let mut s = Store::new(0, 1, IdLimits::default());
    let key = |i: u64| Key { item: i, fc: 1 };
    let rows = 20_000u64;
    let stock: Vec<Line> = (0..rows).map(|i| Line { key: key(i), qty: 3 }).collect();
    for (n, chunk) in stock.chunks(256).enumerate() {
        s.apply(
            None,
            1 + n as u64,
            0,
            &Mutation { op: Op::Inbound { id: n as u64 }, lines: chunk.to_vec().into() },
        );
    }
    let mut lsn = 1_000;
    // A burst: one order per row, all prepared before any is decided.
    let burst: Vec<Mutation> = (0..rows)
        .map(|i| Mutation {
            op: Op::Order { id: 1_000_000 + i },
            lines: vec![Line { key: key(i), qty: 1 }].into(),
        })
        .collect();
    for (txn, m) in burst.iter().enumerate() {
        s.prepare(txn as u64, m).unwrap();
    }
    let grown = s.pend.capacity();
    assert!(grown >= rows as usize, "the burst reserved every row ({grown})");
    // Half commit, half are refused elsewhere; a few stay in flight.
    let keep = 10u64;
    for (txn, m) in burst.iter().enumerate().skip(keep as usize) {
        if txn % 2 == 0 {
            lsn += 1;
            s.apply(Some(txn as u64), lsn, 0, m);
        } else {
            s.abort(txn as u64, m);
        }
    }
    assert_eq!(s.pend.len(), keep as usize);
    assert!(s.pend.capacity() * 64 <= grown, "shrunk: {} of {grown}", s.pend.capacity());
    // What is still reserved counts, before and after the shrink alike.
    for i in 0..rows {
        let committed = i >= keep && i % 2 == 0;
        assert_eq!(s.available(key(i)), if committed { 2 } else { 3 }, "row {i}");
        assert_eq!(s.pending_on(key(i)).take, u64::from(i < keep), "row {i}");
    }
    // A row still reserved cannot be oversold, and its reservation settles once.
    let rest = Mutation { op: Op::Order { id: 7 }, lines: vec![Line { key: key(0), qty: 3 }].into() };
    assert!(s.prepare(99_999_999, &rest).is_err(), "1 of 3 units is reserved");
    for txn in 0..keep {
        lsn += 1;
        s.apply(Some(txn), lsn, 0, &burst[txn as usize]);
    }
    assert!(s.pend.is_empty());
    assert_eq!(s.available(key(0)), 2);
}

impl Store {
    pub(crate) fn remembered_ids(&self) -> Vec<(u64, IdEntry)> {
        self.ids.iter().map(|(id, e)| (id, e.clone())).collect()
    }

    pub(crate) fn remembered_receipts(&self) -> Vec<(u64, LogStamp)> {
        self.receipts.iter().map(|(id, r)| (id, *r)).collect()
    }

    pub(crate) fn clone_prepare(&self, m: &Mutation) -> Result<(), Refusal> {
        let mut copy = Store::new(self.shard, self.shards, self.limits);
        copy.absorb(&self.encode()).unwrap();
        copy.prepare(0, m)
    }
}

#[test]
fn an_id_entry_is_as_small_as_its_documentation_says() {
    assert_eq!(std::mem::size_of::<IdEntry>(), 56);
    // An id table's slab holds Option<IdEntry>: a niche of the state makes None free.
    assert_eq!(std::mem::size_of::<Option<IdEntry>>(), 56);
    assert_eq!(std::mem::size_of::<IdState>(), 24);
    assert_eq!(std::mem::size_of::<IdLines>(), 16);
}

#[test]
fn id_lines_give_back_the_lines_they_were_given() {
    let line = |item, fc, qty| Line { key: Key { item, fc }, qty };
    let cases: Vec<Vec<Line>> = vec![
        vec![line(7, 1, 3)],
        vec![line(u64::MAX, u32::MAX, u32::MAX)],
        // Never in a record (quantities are at least 1), but kept if given.
        vec![line(7, 1, 0)],
        vec![line(1, 1, 1), line(2, 3, 4)],
        vec![line(1, 1, 1), line(1, 2, 5), line(9, 1, 2)],
        vec![],
    ];
    for lines in cases {
        for kept in [IdLines::of(&lines), IdLines::from(lines.iter().copied().collect::<Lines>())] {
            assert_eq!(kept.len(), lines.len());
            assert_eq!(kept.is_empty(), lines.is_empty());
            assert_eq!(kept.iter().collect::<Vec<_>>(), lines);
            assert_eq!(kept.to_lines().to_vec(), lines);
            assert_eq!(kept.heap().is_some(), !matches!(kept, IdLines::One { .. }));
        }
    }
}

/// Lines over 300 items of up to 3 centers: new items keep coming, so the
/// item table grows while a snapshot walks it.
fn wide_lines() -> impl Strategy<Value = Vec<Line>> {
    prop::collection::vec((1u64..300, 1u32..4, 1u32..6), 1..4)
        .prop_map(|v| v.into_iter().map(|(item, fc, qty)| Line { key: Key { item, fc }, qty }).collect())
}

fn wide_command() -> impl Strategy<Value = Command> {
    let id = 0u64..400;
    prop_oneof![
        5 => (id.clone(), wide_lines()).prop_map(|(id, lines)| Command::Order { id, lines: lines.into() }),
        4 => (id.clone(), wide_lines()).prop_map(|(id, lines)| Command::Inbound { id, lines: lines.into() }),
        2 => id.clone().prop_map(|id| Command::Cancel { id }),
        2 => (id.clone(), 1u32..50, wide_lines()).prop_map(|(id, ttl_ms, lines)| Command::Reserve { id, ttl_ms, lines: lines.into() }),
        1 => id.clone().prop_map(|id| Command::Confirm { id }),
        1 => id.clone().prop_map(|id| Command::Release { id, expired: false }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// A snapshot written a few slots at a time while hundreds of ids are
    /// created, changed and forgotten (a short window) and rows of new
    /// items keep growing the item table holds exactly the
    /// state at its LSN (the store encoded at once then), and rolled forward
    /// with the later records it equals the live store, id for id and row
    /// for row.
    #[test]
    fn a_snapshot_in_small_steps_is_exact_while_ids_and_rows_change(
        cmds in prop::collection::vec(wide_command(), 50..400),
        snap_at in any::<prop::sample::Index>(),
        step_slots in 1usize..16,
        steps_per_cmd in 0usize..3,
    ) {
        let limits = IdLimits { window_ms: 300, min_window_ms: 0, max_ids: 1_000 };
        let mut stores = vec![Store::new(0, 1, limits)];
        stores[0].set_snapshot_step_slots(step_slots);
        stores[0].set_snapshot_piece_bytes(step_slots * 16);
        let mut log = Vec::new();
        let mut lsn = 0;
        let snap_step = snap_at.index(cmds.len());
        let mut snap_lsn = 0;
        let mut snapshot = (Vec::new(), false);
        let mut at_mark = Vec::new();
        for (step, cmd) in cmds.into_iter().enumerate() {
            if step == snap_step {
                snap_lsn = lsn;
                at_mark = stores[0].encode();
                stores[0].begin_snapshot(lsn);
            }
            let now = 1_000 + step as u64 * 10;
            let (_, m) = execute(&mut stores, cmd, step as u64, &mut lsn, now);
            log.extend(m.map(|m| (lsn, now, m)));
            for _ in 0..steps_per_cmd {
                if let Some(piece) = stores[0].snapshot_step() {
                    take_piece(&mut snapshot, piece);
                }
            }
        }
        if let Some(piece) = stores[0].finish_snapshot() {
            take_piece(&mut snapshot, piece);
        }
        assert!(snapshot.1, "a snapshot was taken");
        let mut restored = Store::new(0, 1, limits);
        restored.absorb(&snapshot.0).unwrap();
        // The snapshot is the state at its mark, encoded at once then.
        let mut mark = Store::new(0, 1, limits);
        mark.absorb(&at_mark).unwrap();
        for id in 0..400u64 {
            prop_assert_eq!(restored.id(id), mark.id(id), "id {} at the mark {}", id, snap_lsn);
            prop_assert_eq!(restored.receipt(id), mark.receipt(id), "receipt {} at the mark {}", id, snap_lsn);
        }
        prop_assert_eq!(restored.id_count(), mark.id_count());
        let sorted = |s: &Store| {
            let mut rows: Vec<(Key, u64, u64)> = s.rows().collect();
            rows.sort_unstable_by_key(|(k, _, _)| (k.item, k.fc));
            rows
        };
        prop_assert_eq!(sorted(&restored), sorted(&mark), "rows at the mark {}", snap_lsn);
        // Rolled forward with the later records, it is the live store.
        for (l, ts, m) in log.iter().filter(|(l, _, _)| *l > snap_lsn) {
            restored.apply(None, *l, *ts, m);
        }
        let live = &stores[0];
        for id in 0..400u64 {
            prop_assert_eq!(restored.id(id), live.id(id), "id {} (snapshot at {})", id, snap_lsn);
            prop_assert_eq!(restored.receipt(id), live.receipt(id), "receipt {} (snapshot at {})", id, snap_lsn);
        }
        prop_assert_eq!(restored.id_count(), live.id_count());
        prop_assert_eq!(sorted(&restored), sorted(live));
    }
}

/// A store with every kind of id entry: receipts, one- and many-line
/// orders, an order cancelled, live, confirmed, released (by hand and
/// expired) and confirmed-then-cancelled holds, ids and items at the ends
/// of their ranges. Deterministic: its encoding of the third snapshot
/// layout is kept in `testdata/snapshot-v3.bin`.
fn every_kind_of_entry() -> Store {
    let mut stores = vec![Store::new(0, 1, IdLimits::default())];
    let big_item = u64::MAX / 3;
    let l = |item: u64, fc: u32, qty: u32| Line { key: Key { item, fc }, qty };
    let cmds = vec![
        Command::Inbound { id: 1, lines: vec![l(10, 1, 100), l(20, 2, 50), l(big_item, u32::MAX, 5)].into() },
        Command::Inbound { id: u64::MAX, lines: vec![l(10, 1, 1)].into() },
        Command::Order { id: 100, lines: vec![l(10, 1, 3)].into() },
        Command::Order { id: 101, lines: vec![l(10, 1, 1), l(20, 2, 2)].into() },
        Command::Reserve { id: 200, ttl_ms: 60_000, lines: vec![l(20, 2, 4)].into() },
        Command::Reserve { id: 201, ttl_ms: 60_000, lines: vec![l(10, 1, 2)].into() },
        Command::Confirm { id: 201 },
        Command::Reserve { id: 202, ttl_ms: 60_000, lines: vec![l(10, 1, 1)].into() },
        Command::Release { id: 202, expired: false },
        Command::Reserve {
            id: 203,
            ttl_ms: 60_000,
            lines: vec![l(20, 2, 1), l(big_item, u32::MAX, 1)].into(),
        },
        Command::Release { id: 203, expired: true },
        Command::Reserve { id: 204, ttl_ms: 60_000, lines: vec![l(10, 1, 1)].into() },
        Command::Confirm { id: 204 },
        Command::Cancel { id: 204 },
        Command::Order { id: 102, lines: vec![l(20, 2, 1)].into() },
        Command::Cancel { id: 102 },
        Command::Order { id: u64::MAX - 5, lines: vec![l(big_item, u32::MAX, 2)].into() },
    ];
    let mut lsn = 0;
    for (step, cmd) in cmds.into_iter().enumerate() {
        let (got, _) = execute(&mut stores, cmd, step as u64, &mut lsn, 1_795_000_000_000 + 7 * step as u64);
        assert!(matches!(got, Got::Committed), "step {step}: {got:?}");
    }
    stores.pop().unwrap()
}

/// What a store remembers and holds, entry by entry.
fn same_state(a: &Store, b: &Store, ids: &[u64]) {
    for &id in ids {
        assert_eq!(a.id(id), b.id(id), "id {id}");
        assert_eq!(a.receipt(id), b.receipt(id), "receipt {id}");
    }
    assert_eq!(a.id_count(), b.id_count());
    let sorted = |s: &Store| {
        let mut rows: Vec<(Key, u64, u64)> = s.rows().collect();
        rows.sort_unstable_by_key(|(k, _, _)| (k.item, k.fc));
        rows
    };
    assert_eq!(sorted(a), sorted(b));
    assert_eq!(a.applied_lsn, b.applied_lsn);
}

const EVERY_KIND_IDS: [u64; 11] = [1, u64::MAX, 100, 101, 102, 200, 201, 202, 203, 204, u64::MAX - 5];

/// A snapshot written by servers before the twenty-first session (the
/// third layout, fixed-width fields; `testdata/snapshot-v3.bin`, made by
/// that code from [`every_kind_of_entry`]) is read into the same state.
#[test]
fn a_snapshot_of_the_third_layout_is_read() {
    let v3: &[u8] = include_bytes!("testdata/snapshot-v3.bin");
    assert_eq!(&v3[..8], b"STKSTAT3");
    let mut read = Store::new(0, 1, IdLimits::default());
    read.absorb(v3).unwrap();
    same_state(&read, &every_kind_of_entry(), &EVERY_KIND_IDS);
}

/// The fourth layout holds every kind of entry exactly, in under a third
/// of the third's bytes; into two shards, each keeps what it owns.
#[test]
fn every_kind_of_entry_reads_back_from_the_fourth_layout_in_less_room() {
    let s = every_kind_of_entry();
    let v4 = s.encode();
    assert_eq!(&v4[..8], b"STKSTAT4");
    let mut read = Store::new(0, 1, IdLimits::default());
    read.absorb(&v4).unwrap();
    same_state(&read, &s, &EVERY_KIND_IDS);
    // Beyond the header (32 bytes; the third's 24) and the 128 sections'
    // u64 counts, the entries: in under a third of the third layout's room.
    let counts = 2 * SPLIT_PARTS * 8;
    let (entries, v3) =
        (v4.len() - 32 - counts, include_bytes!("testdata/snapshot-v3.bin").len() - 24 - counts);
    assert!(entries * 3 < v3, "{entries} bytes of entries, the third layout {v3}");
    let mut halves: Vec<Store> = (0..2).map(|i| Store::new(i, 2, IdLimits::default())).collect();
    for h in halves.iter_mut() {
        h.absorb(&v4).unwrap();
    }
    for id in EVERY_KIND_IDS {
        let owner = &halves[shard_of(id, 2)];
        assert_eq!(owner.id(id), s.id(id), "id {id}");
        assert_eq!(owner.receipt(id), s.receipt(id), "receipt {id}");
    }
}

/// A state byte that no state has is refused, not taken for another.
#[test]
fn a_snapshot_with_an_unknown_id_state_is_refused() {
    let mut stores = vec![Store::new(0, 1, IdLimits::default())];
    let mut lsn = 0;
    let line = |qty| vec![Line { key: Key { item: 1, fc: 1 }, qty }].into();
    execute(&mut stores, Command::Inbound { id: 1, lines: line(5) }, 0, &mut lsn, 1_000);
    execute(&mut stores, Command::Order { id: 9, lines: line(1) }, 1, &mut lsn, 1_001);
    let good = stores[0].encode();
    // The order's entry: u64 id 9, then one byte each for its LSN and time
    // (both near the base), then its state byte (ordered: 2).
    let at = good.windows(8).position(|w| w == 9u64.to_le_bytes()).unwrap() + 10;
    assert_eq!(good[at], 2, "the state byte of an order");
    // An order marked expired, a live hold marked confirmed, bits no state uses.
    for bad in [2 | 8, 4, 16, 0xff] {
        let mut b = good.clone();
        b[at] = bad;
        let e = Store::new(0, 1, IdLimits::default()).absorb(&b).unwrap_err();
        assert!(e.contains("bad id state"), "{bad:#x}: {e}");
    }
}
