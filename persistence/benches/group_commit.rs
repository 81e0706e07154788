//! Group-commit throughput and latency of the write-ahead log on this disk.
//!
//! `cargo bench -p stockd-persistence --bench group_commit [-- SECONDS]`
//!
//! Baseline, measured first in the same run: one 64-byte record per
//! write+fdatasync (what a log without group commit does), appended; and
//! the same written over zeros already on disk (what the log does since
//! its segments are prepared with zeros: no file size to commit). Then C writer
//! threads each submit a 64-byte record and wait for its commit, in a loop;
//! the table shows records/s, fsyncs/s, records per fsync and the commit
//! latency (submit to durable callback) at p50/p99.

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use stockd_persistence::wal::{Wal, WalConfig};

fn main() {
    let secs: f64 = std::env::args().filter_map(|a| a.parse().ok()).next().unwrap_or(3.0);
    let run = Duration::from_secs_f64(secs);
    let dir = tempfile::tempdir_in(".").expect("temp dir next to the build (same disk as a data dir)");

    // Baseline: write + fdatasync per record, appended.
    let path = dir.path().join("baseline.log");
    let f = OpenOptions::new().create(true).append(true).open(&path).unwrap();
    let (base, h) = one_record_per_fsync(&f, run, None);
    println!("disk: {}", dir.path().display());
    println!(
        "baseline (1 record per write+fdatasync, appended): {:.0} records/s, p50 {} us, p99 {} us",
        base,
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99)
    );
    // The same over zeros already on disk.
    let path = dir.path().join("zeros.log");
    let mut f = OpenOptions::new().create(true).truncate(true).write(true).open(&path).unwrap();
    for _ in 0..256 {
        f.write_all(&[0u8; 1 << 20]).unwrap();
    }
    f.sync_all().unwrap();
    let (zeroed, h) = one_record_per_fsync(&f, run, Some(256 << 20));
    println!(
        "baseline (1 record per write+fdatasync, over zeros): {:.0} records/s, p50 {} us, p99 {} us = {:.2}x appended",
        zeroed,
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        zeroed / base
    );
    println!();
    println!(
        "{:>8} {:>12} {:>10} {:>12} {:>9} {:>9} {:>10}",
        "writers", "records/s", "fsyncs/s", "rec/fsync", "p50 us", "p99 us", "x baseline"
    );
    for writers in [1usize, 4, 16, 64, 256] {
        let sub = dir.path().join(format!("wal-{writers}"));
        std::fs::create_dir_all(&sub).unwrap();
        // Each record's token is the submitting thread's reply channel and its send time.
        let (wal, handle) =
            Wal::<(mpsc::Sender<()>, Instant, usize)>::start(WalConfig::new(&sub), 1, 0, move |batch, _| {
                for c in batch {
                    let _ = c.token.0.send(());
                }
            })
            .unwrap();
        let (hist_tx, hist_rx) = mpsc::channel();
        let start = Instant::now();
        let threads: Vec<_> = (0..writers)
            .map(|w| {
                let wal = wal.clone();
                let hist_tx = hist_tx.clone();
                std::thread::spawn(move || {
                    let mut h = Histogram::<u64>::new(3).unwrap();
                    let (tx, rx) = mpsc::channel();
                    let payload = vec![w as u8; 64];
                    while start.elapsed() < run {
                        let s = Instant::now();
                        wal.submit(payload.clone(), (tx.clone(), s, w)).unwrap();
                        rx.recv().unwrap();
                        h.record(s.elapsed().as_micros() as u64).unwrap();
                    }
                    hist_tx.send(h).unwrap();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let elapsed = start.elapsed().as_secs_f64();
        drop(hist_tx);
        let mut h = Histogram::<u64>::new(3).unwrap();
        for part in hist_rx {
            h.add(part).unwrap();
        }
        let records = wal.stats.records.load(Relaxed) as f64;
        let fsyncs = wal.stats.fsyncs.load(Relaxed) as f64;
        drop(wal);
        handle.join().unwrap();
        println!(
            "{:>8} {:>12.0} {:>10.0} {:>12.1} {:>9} {:>9} {:>10.1}",
            writers,
            records / elapsed,
            fsyncs / elapsed,
            records / fsyncs.max(1.0),
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            records / elapsed / base
        );
    }
}

/// Writes an 88-byte record and fdatasyncs it, again and again for `run`:
/// appended, or at increasing offsets within the first `zeroed` bytes
/// (wrapping around). Records/s and the latency of each.
fn one_record_per_fsync(f: &std::fs::File, run: Duration, zeroed: Option<u64>) -> (f64, Histogram<u64>) {
    use std::os::unix::fs::FileExt;
    let mut h = Histogram::<u64>::new(3).unwrap();
    let t = Instant::now();
    let mut n = 0u64;
    while t.elapsed() < run {
        let s = Instant::now();
        match zeroed {
            Some(len) => f.write_all_at(&[7u8; 88], n * 88 % (len - 88)).unwrap(),
            None => (&*f).write_all(&[7u8; 88]).unwrap(),
        }
        f.sync_data().unwrap();
        h.record(s.elapsed().as_micros() as u64).unwrap();
        n += 1;
    }
    (n as f64 / t.elapsed().as_secs_f64(), h)
}
