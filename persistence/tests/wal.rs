use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::sync::mpsc;

use stockd_persistence::snapshot::{self, Manifest};
use stockd_persistence::wal::{self, Batch, Wal, WalConfig};
use stockd_persistence::Error;

/// Logs `n` payloads through a real writer thread, waiting for every commit.
fn write_records(cfg: WalConfig, first: u64, n: u64) -> Vec<(u64, u64)> {
    let (tx, rx) = mpsc::channel();
    let (w, handle) = Wal::start(cfg, first, 0, move |batch, _| {
        for c in batch {
            tx.send((c.lsn, c.token)).unwrap();
        }
    })
    .unwrap();
    for i in 0..n {
        w.submit(format!("payload {i}").into_bytes(), i).unwrap();
    }
    drop(w);
    handle.join().unwrap();
    let got: Vec<_> = rx.iter().collect();
    assert_eq!(got.len() as u64, n);
    got
}

/// A record as replayed, owned.
#[derive(Debug)]
struct Owned {
    lsn: u64,
    payload: Vec<u8>,
}

fn replay_all(dir: &Path, after: u64) -> (Vec<Owned>, wal::ReplayEnd) {
    let mut recs = Vec::new();
    let end =
        wal::replay(dir, after, |r| recs.push(Owned { lsn: r.lsn, payload: r.payload.to_vec() })).unwrap();
    (recs, end)
}

#[test]
fn committed_records_replay_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let got = write_records(WalConfig::new(dir.path()), 1, 500);
    // LSNs are assigned in submission order from one thread.
    for (i, (lsn, token)) in got.iter().enumerate() {
        assert_eq!(*lsn, i as u64 + 1);
        assert_eq!(*token, i as u64);
    }
    let (recs, end) = replay_all(dir.path(), 0);
    assert_eq!(recs.len(), 500);
    assert_eq!(end.next_lsn, 501);
    assert_eq!(recs[7].payload, b"payload 7");
    let (recs, end) = replay_all(dir.path(), 480);
    assert_eq!(recs.first().unwrap().lsn, 481);
    assert_eq!(end.replayed, 20);
    // A second writer continues the log in a new segment.
    write_records(WalConfig::new(dir.path()), end.next_lsn, 10);
    let (recs, end) = replay_all(dir.path(), 0);
    assert_eq!(recs.len(), 510);
    assert_eq!(end.next_lsn, 511);
    assert!(wal::list_segments(dir.path()).unwrap().iter().any(|(first, _)| *first == 501));
}

#[test]
fn torn_tail_is_truncated_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    write_records(WalConfig::new(dir.path()), 1, 10);
    let (_, seg) = wal::list_segments(dir.path()).unwrap().pop().unwrap();
    let good_len = std::fs::metadata(&seg).unwrap().len();
    // Half of an eleventh record, as a crash in the middle of a write leaves it.
    let mut rec = Vec::new();
    wal::encode_record(11, 5, b"never acknowledged", &mut rec);
    let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
    f.write_all(&rec[..rec.len() / 2]).unwrap();
    drop(f);
    let (recs, end) = replay_all(dir.path(), 0);
    assert_eq!(recs.len(), 10);
    assert_eq!(end.next_lsn, 11);
    assert_eq!(end.torn_bytes, (rec.len() / 2) as u64);
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), good_len);
    // A flipped byte inside the last record is also a torn write there.
    let mut data = std::fs::read(&seg).unwrap();
    let n = data.len();
    data[n - 1] ^= 0xff;
    std::fs::write(&seg, &data).unwrap();
    let (recs, end) = replay_all(dir.path(), 0);
    assert_eq!((recs.len(), end.next_lsn), (9, 10));
}

#[test]
fn a_scan_reports_a_torn_tail_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    write_records(WalConfig::new(dir.path()), 1, 10);
    let (_, seg) = wal::list_segments(dir.path()).unwrap().pop().unwrap();
    let mut rec = Vec::new();
    wal::encode_record(11, 5, b"still being written", &mut rec);
    OpenOptions::new().append(true).open(&seg).unwrap().write_all(&rec[..rec.len() - 3]).unwrap();
    let len = std::fs::metadata(&seg).unwrap().len();
    let mut lsns = Vec::new();
    let end = wal::scan(dir.path(), 4, |r| lsns.push(r.lsn)).unwrap();
    assert_eq!(lsns, (5..=10).collect::<Vec<_>>());
    assert_eq!((end.next_lsn, end.records), (11, 6));
    let torn = end.torn.expect("the partial record is reported");
    assert_eq!(torn.bytes, rec.len() as u64 - 3);
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), len, "a scan never truncates");
}

#[test]
fn corruption_before_the_last_segment_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    write_records(WalConfig::new(dir.path()), 1, 10);
    write_records(WalConfig::new(dir.path()), 11, 10);
    let (_, first) = wal::list_segments(dir.path()).unwrap().remove(0);
    let mut data = std::fs::read(&first).unwrap();
    data[30] ^= 1;
    std::fs::write(&first, &data).unwrap();
    let e = wal::replay(dir.path(), 0, |_| {}).unwrap_err();
    assert!(matches!(e, Error::Corrupt(_)), "{e}");
}

#[test]
fn a_scan_that_meets_a_segment_deleted_while_it_reads_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let mut lsn = 1;
    for _ in 0..3 {
        lsn = wal::write_one(dir.path(), lsn, 0, b"x").unwrap(); // one segment per record
    }
    // The middle segment goes while a reader has it listed: a dangling
    // link under its name stands for one a running server just renamed
    // to *.deleting.
    let (_, middle) = wal::list_segments(dir.path()).unwrap().remove(1);
    std::fs::remove_file(&middle).unwrap();
    std::os::unix::fs::symlink(dir.path().join("gone"), &middle).unwrap();
    let e = wal::scan(dir.path(), 0, |_| {}).unwrap_err().to_string();
    assert!(e.contains("deleted behind a snapshot while it was read"), "{e}");
}

#[test]
fn segments_roll_and_are_deleted_behind_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = WalConfig { segment_bytes: 1000, max_batch: 8, ..WalConfig::new(dir.path()) };
    write_records(cfg, 1, 400);
    let segs = wal::list_segments(dir.path()).unwrap();
    assert!(segs.len() > 5, "{} segments", segs.len());
    let deleted = wal::delete_segments_through(dir.path(), 200).unwrap();
    assert!(deleted > 0);
    let left = wal::list_segments(dir.path()).unwrap();
    assert!(left[0].0 <= 201, "first remaining segment starts at {}", left[0].0);
    let (recs, end) = replay_all(dir.path(), 200);
    assert_eq!(recs.first().unwrap().lsn, 201);
    assert_eq!(end.next_lsn, 401);
    // Replaying from before the deleted range is an error, not silent loss.
    assert!(wal::replay(dir.path(), 0, |_| {}).is_err());
}

#[test]
fn snapshot_set_and_manifest() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(snapshot::read_manifest(dir.path()).unwrap(), None);
    for (lsn, payload) in [(5u64, b"old".as_slice()), (9, b"new")] {
        for shard in 0..2u32 {
            snapshot::write_snapshot(dir.path(), lsn, shard, 2, payload).unwrap();
        }
        snapshot::commit_manifest(dir.path(), Manifest { lsn, shard_count: 2 }).unwrap();
    }
    let m = snapshot::read_manifest(dir.path()).unwrap().unwrap();
    assert_eq!(m, Manifest { lsn: 9, shard_count: 2 });
    assert_eq!(snapshot::read_snapshot(dir.path(), 9, 1, 2).unwrap(), b"new");
    assert!(snapshot::read_snapshot(dir.path(), 5, 0, 2).is_err(), "old set removed");
    let path = dir.path().join(snapshot::snapshot_name(9, 0));
    let mut data = std::fs::read(&path).unwrap();
    data[33] ^= 4;
    std::fs::write(&path, data).unwrap();
    assert!(matches!(snapshot::read_snapshot(dir.path(), 9, 0, 2), Err(Error::Corrupt(_))));
}

/// A snapshot handed over piece by piece makes the same file, byte for
/// byte, as one written at once; one left unfinished is not a snapshot.
#[test]
fn snapshot_written_in_pieces_is_the_same_file() {
    let dir = tempfile::tempdir().unwrap();
    let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    snapshot::write_snapshot(dir.path(), 7, 0, 2, &payload).unwrap();
    let whole = std::fs::read(dir.path().join(snapshot::snapshot_name(7, 0))).unwrap();

    // Dropped unfinished (its write failed, say): no file under the
    // snapshot's name, and nothing of it left taking room.
    let mut w = snapshot::SnapshotWriter::create(dir.path(), 7, 1, 2).unwrap();
    w.append(&payload[..1000]).unwrap();
    drop(w);
    assert!(!dir.path().join(snapshot::snapshot_name(7, 1)).exists());
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, [std::ffi::OsString::from(snapshot::snapshot_name(7, 0))], "only the finished part");

    // Pieces of many sizes, empty ones and ones across the 1 MiB writeback chunks.
    let mut w = snapshot::SnapshotWriter::create(dir.path(), 7, 1, 2).unwrap();
    let mut at = 0;
    for len in [0, 1, 31, 1 << 20, 0, (1 << 20) + 17, 5].into_iter().cycle() {
        let end = (at + len).min(payload.len());
        w.append(&payload[at..end]).unwrap();
        at = end;
        if at == payload.len() {
            break;
        }
    }
    w.finish().unwrap();
    let pieces = std::fs::read(dir.path().join(snapshot::snapshot_name(7, 1))).unwrap();
    assert_eq!(pieces.len(), whole.len());
    assert_eq!(&pieces[..16], &whole[..16]);
    assert_eq!(&pieces[24..whole.len() - 4], &whole[24..whole.len() - 4], "length and payload");
    assert_eq!(snapshot::read_snapshot(dir.path(), 7, 1, 2).unwrap(), payload);
    assert_eq!(snapshot::read_snapshot(dir.path(), 7, 0, 2).unwrap(), payload);
}

#[test]
fn truncate_after_cuts_across_segments_and_the_log_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = WalConfig::new(dir.path());
    for first in [1, 16, 31, 46] {
        write_records(cfg.clone(), first, 15); // a segment each
    }
    assert_eq!(wal::list_segments(dir.path()).unwrap().len(), 4);
    assert_eq!(wal::truncate_after(dir.path(), 23).unwrap(), 37);
    let (recs, end) = replay_all(dir.path(), 0);
    assert_eq!(recs.len(), 23);
    assert_eq!(end.next_lsn, 24);
    assert_eq!(end.torn_bytes, 0);
    assert_eq!(recs[22].payload, b"payload 7"); // the second segment's eighth
                                                // Nothing to cut: a no-op; and the log continues where it was cut.
    assert_eq!(wal::truncate_after(dir.path(), 23).unwrap(), 0);
    write_records(cfg, 24, 5);
    let (recs, end) = replay_all(dir.path(), 0);
    assert_eq!((recs.len(), end.next_lsn), (28, 29));
    assert_eq!(wal::truncate_after(dir.path(), 0).unwrap(), 28);
    assert_eq!(replay_all(dir.path(), 0).0.len(), 0);
}

/// A batch's records get consecutive LSNs in the order they were pushed,
/// between the records submitted before and after it; the callback finds
/// each payload in its group commit's bytes, and replay finds the same.
#[test]
fn a_batch_is_logged_in_order_and_its_payloads_reach_the_callback() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, rx) = mpsc::channel();
    let (w, handle) = Wal::start(WalConfig::new(dir.path()), 1, 0, move |batch, group| {
        for c in batch {
            tx.send((c.lsn, c.token, c.payload(group).to_vec())).unwrap();
        }
    })
    .unwrap();
    w.submit(b"before".to_vec(), 0).unwrap();
    let mut batch = wal::Batch::default();
    batch.reserve(2, 16);
    batch.push(1, |_, buf| buf.extend_from_slice(b"first"));
    batch.push(2, |_, _| {}); // an empty payload is a record too
    batch.push(3, |_, buf| buf.extend_from_slice(b"third of three"));
    assert_eq!(batch.len(), 3);
    w.try_submit(batch).map_err(|(e, _)| e).unwrap();
    w.submit(b"after".to_vec(), 4).unwrap();
    drop(w);
    handle.join().unwrap();
    let want: Vec<(u64, u64, Vec<u8>)> = [&b"before"[..], b"first", b"", b"third of three", b"after"]
        .iter()
        .enumerate()
        .map(|(i, p)| (i as u64 + 1, i as u64, p.to_vec()))
        .collect();
    assert_eq!(rx.iter().collect::<Vec<_>>(), want);
    let (recs, _) = replay_all(dir.path(), 0);
    let replayed: Vec<(u64, Vec<u8>)> = recs.into_iter().map(|r| (r.lsn, r.payload)).collect();
    assert_eq!(replayed, want.into_iter().map(|(lsn, _, p)| (lsn, p)).collect::<Vec<_>>());
}

/// A full queue refuses a batch whole and gives its tokens back in order.
#[test]
fn a_refused_batch_gives_its_tokens_back() {
    let dir = tempfile::tempdir().unwrap();
    let (gate_tx, gate_rx) = mpsc::channel::<()>();
    let cfg = WalConfig { queue_capacity: 1, ..WalConfig::new(dir.path()) };
    let (w, handle) = Wal::start(cfg, 1, 0, move |_, _| {
        let _ = gate_rx.recv();
    })
    .unwrap();
    let timeout = std::time::Duration::from_secs(10);
    // The callback holds record 1, the writer waits to hand it record 2,
    // and record 3 fills the queue.
    for lsn in 1..=2u64 {
        w.submit(b"x".to_vec(), lsn).unwrap();
        assert_eq!(w.durable.wait_past(lsn - 1, timeout), lsn);
    }
    w.submit(b"x".to_vec(), 3).unwrap();
    let mut batch = wal::Batch::default();
    for token in [7, 8, 9] {
        batch.push(token, |_, buf| buf.push(1));
    }
    let (error, batch) = w.try_submit(batch).expect_err("the queue is full");
    assert_eq!(error, wal::SubmitError::Full);
    assert_eq!(batch.into_tokens().collect::<Vec<_>>(), vec![7, 8, 9]);
    drop(gate_tx);
    drop(w);
    handle.join().unwrap();
}

#[test]
fn copied_records_keep_their_timestamps_never_going_back() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, rx) = mpsc::channel();
    let (w, handle) = Wal::start(WalConfig::new(dir.path()), 1, 0, move |batch, _| {
        for c in batch {
            tx.send((c.lsn, c.ts_ms)).unwrap();
        }
    })
    .unwrap();
    // Two messages from a primary: a batch of three, then one of one.
    let mut first = Batch::default();
    for ts in [1_000, 1_000, 2_000] {
        first.push_copied((), ts, b"copied");
    }
    w.submit_batch(first).unwrap();
    let mut second = Batch::default();
    second.push_copied((), 1_500, b"copied");
    w.submit_batch(second).unwrap();
    w.submit_batch(Batch::default()).unwrap();
    w.submit(b"own".to_vec(), ()).unwrap();
    drop(w);
    handle.join().unwrap();
    let got: Vec<(u64, u64)> = rx.iter().collect();
    assert_eq!(
        &got[..4],
        &[(1, 1_000), (2, 1_000), (3, 2_000), (4, 2_000)],
        "kept, and never below the last"
    );
    assert!(got[4].1 > 1_000_000_000_000, "the writer's clock for its own records");
    let mut replayed = Vec::new();
    wal::replay(dir.path(), 0, |r| replayed.push((r.lsn, r.ts_ms, r.payload.to_vec()))).unwrap();
    assert_eq!(replayed.iter().map(|r| (r.0, r.1)).collect::<Vec<_>>(), got);
    assert!(replayed[..4].iter().all(|r| r.2 == b"copied"), "payloads as they were");
    assert_eq!(replayed[4].2, b"own");
}

/// The commit callback runs on a thread of its own: while it works on one
/// batch the writer makes the next durable, and no further (a stuck
/// callback stops the writer instead of queueing batches without bound).
#[test]
fn the_writer_makes_the_next_batch_durable_while_the_callback_runs_and_no_more() {
    let dir = tempfile::tempdir().unwrap();
    let (gate_tx, gate_rx) = mpsc::channel::<()>();
    let (seen_tx, seen_rx) = mpsc::channel::<Vec<u64>>();
    let (w, handle) = Wal::start(WalConfig::new(dir.path()), 1, 0, move |batch, _| {
        seen_tx.send(batch.iter().map(|c| c.lsn).collect()).unwrap();
        let _ = gate_rx.recv();
    })
    .unwrap();
    let timeout = std::time::Duration::from_secs(10);
    w.submit(b"one".to_vec(), ()).unwrap();
    assert_eq!(seen_rx.recv_timeout(timeout).unwrap(), vec![1]);
    // The callback holds batch 1. Record 2 still becomes durable...
    w.submit(b"two".to_vec(), ()).unwrap();
    assert_eq!(w.durable.wait_past(1, timeout), 2);
    // ...and then the writer waits to hand it over: record 3 is not written.
    w.submit(b"three".to_vec(), ()).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(w.durable.get(), 2);
    // Released, the callback gets the rest in LSN order.
    drop(gate_tx);
    assert_eq!(seen_rx.recv_timeout(timeout).unwrap(), vec![2]);
    assert_eq!(seen_rx.recv_timeout(timeout).unwrap(), vec![3]);
    drop(w);
    handle.join().unwrap();
}

/// Logs `n` payloads one group commit at a time, so that the writer keeps
/// starting segments; the files of the directory's `.prep` segments are
/// checked to be gone once the writer has stopped.
fn write_one_by_one(cfg: WalConfig, first: u64, n: u64) {
    let dir = cfg.dir.clone();
    let (w, handle) = Wal::start(cfg, first, 0, |_: Vec<wal::Committed<()>>, _: &[u8]| {}).unwrap();
    for lsn in first..first + n {
        w.submit(format!("payload {lsn}").into_bytes(), ()).unwrap();
        w.durable.wait_past(lsn - 1, std::time::Duration::from_secs(5));
    }
    drop(w);
    handle.join().unwrap();
    assert_eq!(prep_files(&dir), 0, "no prepared segment outlives its writer");
}

fn prep_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().to_string_lossy().contains(".prep"))
        .count()
}

#[test]
fn records_written_into_zeros_replay_and_the_zeros_after_them_are_no_torn_write() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = WalConfig::new(dir.path());
    cfg.segment_bytes = 16 << 10;
    write_one_by_one(cfg, 1, 2_000);
    let segments = wal::list_segments(dir.path()).unwrap();
    let zero_tails = segments
        .iter()
        .filter(|(_, p)| wal::records_len(p).unwrap() < std::fs::metadata(p).unwrap().len())
        .count();
    assert!(zero_tails >= 2, "segments written into zeros, with zeros left after their records");
    let (recs, end) = replay_all(dir.path(), 0);
    assert_eq!(recs.iter().map(|r| r.lsn).collect::<Vec<_>>(), (1..=2_000).collect::<Vec<_>>());
    assert_eq!((end.next_lsn, end.torn_bytes), (2_001, 0));
    // A crash in the middle of a write into the zeros of the last segment.
    let (_, last) = segments.last().unwrap();
    let at = wal::records_len(last).unwrap();
    let mut rec = Vec::new();
    wal::encode_record(2_001, 5, b"never acknowledged", &mut rec);
    let f = OpenOptions::new().write(true).open(last).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &rec[..rec.len() / 2], at).unwrap();
    drop(f);
    let (recs, end) = replay_all(dir.path(), 0);
    assert_eq!((recs.len(), end.next_lsn), (2_000, 2_001));
    assert!(end.torn_bytes >= (rec.len() / 2) as u64, "the half record is cut, with the zeros after it");
    assert_eq!(std::fs::metadata(last).unwrap().len(), at);
    // The log goes on after a restart, and every record is still there.
    let mut cfg = WalConfig::new(dir.path());
    cfg.segment_bytes = 16 << 10;
    write_one_by_one(cfg, 2_001, 100);
    let (recs, end) = replay_all(dir.path(), 0);
    assert_eq!((recs.len(), end.next_lsn, end.torn_bytes), (2_100, 2_101, 0));
}

#[test]
fn prepared_segments_a_crash_left_are_deleted_at_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("wal-00000000000000000003.prep"), b"half made").unwrap();
    write_one_by_one(WalConfig::new(dir.path()), 1, 3);
    let (recs, end) = replay_all(dir.path(), 0);
    assert_eq!((recs.len(), end.torn_bytes), (3, 0));
}

/// A payload replay would take for a torn write is refused before it is logged.
#[test]
#[should_panic(expected = "at most 16777216 bytes")]
fn a_payload_over_the_limit_is_refused_before_it_is_logged() {
    let mut batch = wal::Batch::default();
    batch.push((), |_, buf| buf.resize(wal::MAX_PAYLOAD + 1, 0));
}
