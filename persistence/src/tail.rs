//! Following the log while a server writes it: the durable-LSN watermark
//! the writer publishes after every fdatasync, and a read-only reader that
//! hands out records up to it.
//!
//! A record above the watermark may still vanish in a crash (it was never
//! acknowledged, and replay truncates a torn tail), so nothing downstream may
//! see it: [`LogTail`] never reads past the watermark it is given. It opens
//! segment files read-only and never truncates or writes them.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crate::wal::{list_segments, parse_record, segment_name, Record};
use crate::Error;

/// The highest LSN the writer has made durable, and the log bytes it has
/// made durable since it started. Readers wait on it.
pub struct Durable {
    lsn: AtomicU64,
    bytes: AtomicU64,
    waiters: AtomicUsize,
    lock: Mutex<()>,
    moved: Condvar,
}

impl Durable {
    pub fn new(lsn: u64) -> Durable {
        Durable {
            lsn: AtomicU64::new(lsn),
            bytes: AtomicU64::new(0),
            waiters: AtomicUsize::new(0),
            lock: Mutex::new(()),
            moved: Condvar::new(),
        }
    }

    pub fn get(&self) -> u64 {
        self.lsn.load(Ordering::Acquire)
    }

    /// Log bytes made durable since the writer started (records through [`Durable::get`]).
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Acquire)
    }

    /// Publishes `lsn` as durable, `bytes` more log bytes with it, and wakes
    /// the readers waiting for it.
    pub fn advance(&self, lsn: u64, bytes: u64) {
        self.bytes.fetch_add(bytes, Ordering::AcqRel);
        self.lsn.fetch_max(lsn, Ordering::AcqRel);
        // SeqCst pairs with the waiter's: either it sees the new LSN before
        // sleeping, or this sees it waiting and wakes it.
        if self.waiters.load(Ordering::SeqCst) > 0 {
            let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.moved.notify_all();
        }
    }

    /// Waits until the durable LSN is above `lsn` or `timeout` passes; returns it.
    pub fn wait_past(&self, lsn: u64, timeout: Duration) -> u64 {
        let now = self.get();
        if now > lsn {
            return now;
        }
        let guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let (_guard, _) = self
            .moved
            .wait_timeout_while(guard, timeout, |_| self.lsn.load(Ordering::SeqCst) <= lsn)
            .unwrap_or_else(|p| p.into_inner());
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        self.get()
    }
}

/// The first LSN of the oldest segment in `dir` (`None`: no segment):
/// records below it are gone.
pub fn oldest_segment(dir: &Path) -> Result<Option<u64>, Error> {
    Ok(list_segments(dir)?.first().map(|(lsn, _)| *lsn))
}

/// How much a reader takes from a segment file at once.
const READ_CHUNK: usize = 1 << 20;

/// A read-only reader of the log that follows it as it grows.
pub struct LogTail {
    dir: PathBuf,
    next_lsn: u64,
    /// The open segment and its first LSN.
    segment: Option<(File, u64)>,
    /// Bytes read from the segment and not yet handed out: `buf[start..]`.
    buf: Vec<u8>,
    start: usize,
    /// Bytes of the open segment before `buf[start]`.
    offset: u64,
}

impl LogTail {
    /// A reader whose first record will be `after_lsn + 1`.
    pub fn new(dir: impl Into<PathBuf>, after_lsn: u64) -> LogTail {
        LogTail {
            dir: dir.into(),
            next_lsn: after_lsn + 1,
            segment: None,
            buf: Vec::new(),
            start: 0,
            offset: 0,
        }
    }

    /// The LSN of the next record this reader hands out.
    pub fn next_lsn(&self) -> u64 {
        self.next_lsn
    }

    /// Where this reader stands: the open segment's first LSN and the bytes of it already handed out.
    pub fn position(&self) -> Option<(u64, u64)> {
        self.segment.as_ref().map(|(_, first)| (*first, self.offset))
    }

    /// Hands every record from the next one through `durable` (at most
    /// `max` of them) to `each`, in LSN order; returns how many it handed.
    /// Records the writer has not yet made durable are never read. A record
    /// that fails its checksum or breaks the LSN sequence at or below
    /// `durable`, or a record that is no longer in the log, is an error.
    pub fn read(
        &mut self,
        durable: u64,
        max: usize,
        mut each: impl FnMut(Record<'_>),
    ) -> Result<usize, Error> {
        let mut handed = 0;
        while handed < max && self.next_lsn <= durable {
            if self.segment.is_none() {
                self.open_segment()?;
            }
            match parse_record(&self.buf[self.start..]) {
                Some((rec, len)) if rec.lsn < self.next_lsn => {
                    // Positioning inside the first segment.
                    self.start += len;
                    self.offset += len as u64;
                }
                Some((rec, len)) if rec.lsn == self.next_lsn => {
                    each(rec);
                    self.start += len;
                    self.offset += len as u64;
                    self.next_lsn += 1;
                    handed += 1;
                }
                Some((rec, _)) => {
                    return Err(self.corrupt(format!("LSN {} where {} was expected", rec.lsn, self.next_lsn)));
                }
                None => {
                    if self.fill()? == 0 {
                        self.next_segment()?;
                    }
                }
            }
        }
        Ok(handed)
    }

    fn corrupt(&self, why: String) -> Error {
        let first = self.segment.as_ref().map_or(0, |(_, f)| *f);
        Error::Corrupt(format!(
            "{} at offset {}: {why}",
            self.dir.join(segment_name(first)).display(),
            self.offset
        ))
    }

    /// Opens the segment that holds `next_lsn`.
    fn open_segment(&mut self) -> Result<(), Error> {
        let segs = list_segments(&self.dir)?;
        let Some((first, path)) = segs.iter().rev().find(|(first, _)| *first <= self.next_lsn) else {
            let oldest = segs.first().map_or("none".to_string(), |(l, _)| l.to_string());
            return Err(Error::Corrupt(format!(
                "LSN {} is no longer in the log {} (its oldest segment starts at {oldest})",
                self.next_lsn,
                self.dir.display()
            )));
        };
        self.switch_to(path.clone(), *first)
    }

    fn switch_to(&mut self, path: PathBuf, first: u64) -> Result<(), Error> {
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        self.segment = Some((file, first));
        self.buf.clear();
        self.start = 0;
        self.offset = 0;
        Ok(())
    }

    /// Reads more of the open segment; returns the bytes read (0 at its end).
    fn fill(&mut self) -> Result<usize, Error> {
        self.buf.drain(..self.start);
        self.start = 0;
        let (file, first) = self.segment.as_mut().expect("invariant: fill runs with a segment open");
        // Appends without zeroing the room first.
        file.take(READ_CHUNK as u64)
            .read_to_end(&mut self.buf)
            .map_err(|e| Error::io(&self.dir.join(segment_name(*first)), e))
    }

    /// At the end of the open segment while `next_lsn` is durable: the writer
    /// went on in a segment of its own, named after `next_lsn`.
    fn next_segment(&mut self) -> Result<(), Error> {
        if self.start < self.buf.len() {
            return Err(self.corrupt("an incomplete or checksum-failing record below the durable LSN".into()));
        }
        let path = self.dir.join(segment_name(self.next_lsn));
        if !path.exists() {
            return Err(
                self.corrupt(format!("the segment ends, and no segment starts at LSN {}", self.next_lsn))
            );
        }
        self.switch_to(path, self.next_lsn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::{Wal, WalConfig};
    use std::sync::Arc;

    fn payload(lsn: u64) -> Vec<u8> {
        format!("record {lsn}").into_bytes()
    }

    #[test]
    fn follows_the_writer_across_segments_and_never_reads_past_the_watermark() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = WalConfig::new(dir.path());
        cfg.segment_bytes = 300; // a new segment every few records
        let (wal, handle) = Wal::start(cfg, 1, 0, |_: Vec<crate::wal::Committed<()>>| {}).unwrap();
        let durable: Arc<Durable> = wal.durable.clone();
        let mut tail = LogTail::new(dir.path(), 0);
        let mut seen = Vec::new();
        for lsn in 1..=200u64 {
            wal.submit(payload(lsn), ()).unwrap();
            // One record per group commit, so that segments turn over often.
            let d = durable.wait_past(lsn - 1, Duration::from_secs(5));
            if lsn % 37 == 0 {
                tail.read(d, usize::MAX, |r| seen.push((r.lsn, r.payload.to_vec()))).unwrap();
                assert!(seen.last().is_none_or(|(l, _)| *l <= d));
            }
        }
        drop(wal);
        handle.join().unwrap();
        tail.read(durable.get(), usize::MAX, |r| seen.push((r.lsn, r.payload.to_vec()))).unwrap();
        let want: Vec<(u64, Vec<u8>)> = (1..=200).map(|l| (l, payload(l))).collect();
        assert_eq!(seen, want);
        assert!(list_segments(dir.path()).unwrap().len() > 10, "the test must cross segments");
    }

    #[test]
    fn starts_in_the_middle_and_reads_at_most_max() {
        let dir = tempfile::tempdir().unwrap();
        let mut lsn = 1;
        for _ in 0..5 {
            lsn = crate::wal::write_one(dir.path(), lsn, 0, &payload(lsn)).unwrap();
        }
        let mut tail = LogTail::new(dir.path(), 2);
        let mut seen = Vec::new();
        assert_eq!(tail.read(5, 2, |r| seen.push(r.lsn)).unwrap(), 2);
        assert_eq!(tail.read(4, 10, |r| seen.push(r.lsn)).unwrap(), 0, "LSN 5 is above the watermark");
        assert_eq!(tail.read(5, 10, |r| seen.push(r.lsn)).unwrap(), 1);
        assert_eq!(seen, vec![3, 4, 5]);
        assert_eq!(tail.next_lsn(), 6);
    }

    #[test]
    fn a_deleted_or_broken_record_below_the_watermark_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut lsn = 1;
        for _ in 0..3 {
            lsn = crate::wal::write_one(dir.path(), lsn, 0, &payload(lsn)).unwrap();
        }
        std::fs::remove_file(dir.path().join(segment_name(1))).unwrap();
        let err = LogTail::new(dir.path(), 0).read(3, 10, |_| {}).unwrap_err();
        assert!(err.to_string().contains("no longer in the log"), "{err}");

        let seg2 = dir.path().join(segment_name(2));
        let mut bytes = std::fs::read(&seg2).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&seg2, bytes).unwrap();
        let err = LogTail::new(dir.path(), 1).read(3, 10, |_| {}).unwrap_err();
        assert!(err.to_string().contains("checksum-failing"), "{err}");
    }
}
