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

use crate::wal::{list_segments, parse_record, records_end, segment_name, Record, RECORD_HEADER};
use crate::Error;

/// The highest LSN the writer has made durable, and the log bytes it has
/// made durable since it started. Readers wait on it.
pub struct Durable {
    lsn: AtomicU64,
    bytes: AtomicU64,
    waiters: AtomicUsize,
    /// Where the durable records end on disk; set before `lsn` moves.
    end: Mutex<LogEnd>,
    moved: Condvar,
}

/// Where the durable records end: the segment being written (its first
/// LSN) and its bytes of records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogEnd {
    pub segment: u64,
    pub bytes: u64,
}

/// How far a reader may read: the durable LSN and, for a log still being
/// written, where its records end. Past that end the writer's segment holds
/// zeros laid down ahead of use, which read as the end of the segment and
/// would be stale once records are written over them: a reader that
/// follows a live log must not read there ([`Durable::watermark`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Watermark {
    pub lsn: u64,
    pub end: Option<LogEnd>,
}

/// A log no writer is writing: every segment is read to its end.
impl From<u64> for Watermark {
    fn from(lsn: u64) -> Watermark {
        Watermark { lsn, end: None }
    }
}

impl Durable {
    pub fn new(lsn: u64) -> Durable {
        Durable {
            lsn: AtomicU64::new(lsn),
            bytes: AtomicU64::new(0),
            waiters: AtomicUsize::new(0),
            end: Mutex::new(LogEnd::default()),
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

    /// The durable LSN and where its records end: a reader that follows the
    /// log reads no further (see [`Watermark`]). The end is read after the
    /// LSN and set before it, so it is at or past that LSN's last byte.
    pub fn watermark(&self) -> Watermark {
        let lsn = self.get();
        let end = *self.end.lock().unwrap_or_else(|p| p.into_inner());
        Watermark { lsn, end: Some(end) }
    }

    /// Publishes `lsn` as durable, `bytes` more log bytes with it, and
    /// where its records end; wakes the readers waiting for it.
    pub fn advance(&self, lsn: u64, bytes: u64, end: LogEnd) {
        let mut guard = self.end.lock().unwrap_or_else(|p| p.into_inner());
        *guard = end;
        self.bytes.fetch_add(bytes, Ordering::AcqRel);
        self.lsn.fetch_max(lsn, Ordering::AcqRel);
        // SeqCst pairs with the waiter's: either it sees the new LSN before
        // sleeping, or this sees it waiting and wakes it.
        if self.waiters.load(Ordering::SeqCst) > 0 {
            self.moved.notify_all();
        }
    }

    /// Waits until the durable LSN is above `lsn` or `timeout` passes; returns it.
    pub fn wait_past(&self, lsn: u64, timeout: Duration) -> u64 {
        let now = self.get();
        if now > lsn {
            return now;
        }
        let guard = self.end.lock().unwrap_or_else(|p| p.into_inner());
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

/// What [`LogTail::fill`] found.
#[derive(PartialEq, Eq)]
enum Filled {
    More,
    /// The end of the segment's file.
    End,
    /// The end of the durable records in the writer's segment.
    Watermark,
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
    /// Records the writer has not yet made durable are never read: follow a
    /// live log with [`Durable::watermark`]; a bare LSN is for a log no one
    /// writes. A record that fails its checksum or breaks the LSN sequence
    /// at or below `durable`, or a record that is no longer in the log, is
    /// an error.
    pub fn read(
        &mut self,
        durable: impl Into<Watermark>,
        max: usize,
        mut each: impl FnMut(Record<'_>),
    ) -> Result<usize, Error> {
        let durable = durable.into();
        let mut handed = 0;
        while handed < max && self.next_lsn <= durable.lsn {
            if self.segment.is_none() {
                self.open_segment()?;
            }
            let rest = &self.buf[self.start..];
            if rest.len() >= RECORD_HEADER && records_end(rest) {
                // Zeros: this segment's records end here. Below the
                // watermark of the writer's own segment that cannot be.
                if self.writing(&durable).is_some() {
                    return Err(self.corrupt("zeros where a durable record should be".into()));
                }
                self.next_segment()?;
                continue;
            }
            match parse_record(rest) {
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
                None => match self.fill(&durable)? {
                    Filled::More => {}
                    Filled::End => self.next_segment()?,
                    Filled::Watermark => {
                        return Err(self.corrupt(format!(
                            "the durable records end before LSN {} (durable through {})",
                            self.next_lsn, durable.lsn
                        )))
                    }
                },
            }
        }
        Ok(handed)
    }

    /// If the open segment is the one the writer of `durable` is writing,
    /// the bytes of it that hold durable records.
    fn writing(&self, durable: &Watermark) -> Option<u64> {
        let (_, first) = self.segment.as_ref()?;
        durable.end.filter(|e| e.segment == *first).map(|e| e.bytes)
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

    /// Reads more of the open segment, never past the durable records of
    /// the writer's segment.
    fn fill(&mut self, durable: &Watermark) -> Result<Filled, Error> {
        self.buf.drain(..self.start);
        self.start = 0;
        let read_to = self.offset + self.buf.len() as u64;
        let chunk = match self.writing(durable) {
            Some(end) if end <= read_to => return Ok(Filled::Watermark),
            Some(end) => (end - read_to).min(READ_CHUNK as u64),
            None => READ_CHUNK as u64,
        };
        let (file, first) = self.segment.as_mut().expect("invariant: fill runs with a segment open");
        // Appends without zeroing the room first.
        let n = file
            .take(chunk)
            .read_to_end(&mut self.buf)
            .map_err(|e| Error::io(&self.dir.join(segment_name(*first)), e))?;
        Ok(if n == 0 { Filled::End } else { Filled::More })
    }

    /// At the end of the open segment's records while `next_lsn` is
    /// durable: the writer went on in a segment of its own, named after
    /// `next_lsn`. What is left of the segment may only be zeros.
    fn next_segment(&mut self) -> Result<(), Error> {
        if self.buf[self.start..].iter().any(|&b| b != 0) {
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
        let (wal, handle) = Wal::start(cfg, 1, 0, |_: Vec<crate::wal::Committed<()>>, _: &[u8]| {}).unwrap();
        let durable: Arc<Durable> = wal.durable.clone();
        let mut tail = LogTail::new(dir.path(), 0);
        let mut seen = Vec::new();
        for lsn in 1..=200u64 {
            wal.submit(payload(lsn), ()).unwrap();
            // One record per group commit, so that segments turn over often.
            durable.wait_past(lsn - 1, Duration::from_secs(5));
            if lsn % 37 == 0 || lsn % 41 == 0 {
                let w = durable.watermark();
                tail.read(w, usize::MAX, |r| seen.push((r.lsn, r.payload.to_vec()))).unwrap();
                assert!(seen.last().is_none_or(|(l, _)| *l <= w.lsn));
            }
        }
        drop(wal);
        handle.join().unwrap();
        tail.read(durable.watermark(), usize::MAX, |r| seen.push((r.lsn, r.payload.to_vec()))).unwrap();
        let want: Vec<(u64, Vec<u8>)> = (1..=200).map(|l| (l, payload(l))).collect();
        assert_eq!(seen, want);
        let segments = list_segments(dir.path()).unwrap();
        assert!(segments.len() > 10, "the test must cross segments");
        let zeroed = segments.iter().filter(|(_, p)| std::fs::metadata(p).unwrap().len() == 300).count();
        assert!(zeroed > 5, "the test must read segments written into zeros ({zeroed})");
    }

    #[test]
    fn a_reader_of_a_live_log_never_takes_the_zeros_ahead_of_the_writer_for_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = WalConfig::new(dir.path());
        cfg.segment_bytes = 64 << 10;
        let (wal, handle) = Wal::start(cfg, 1, 0, |_: Vec<crate::wal::Committed<()>>, _: &[u8]| {}).unwrap();
        let durable: Arc<Durable> = wal.durable.clone();
        // Until the writer is in a zeroed segment (after its first, appended one).
        let mut lsn = 0;
        while list_segments(dir.path()).unwrap().len() < 2 {
            lsn += 1;
            wal.submit(payload(lsn), ()).unwrap();
            durable.wait_past(lsn - 1, Duration::from_secs(5));
            assert!(lsn < 100_000, "no zeroed segment came");
        }
        let (first, path) = list_segments(dir.path()).unwrap().pop().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 64 << 10, "written into zeros");
        // A reader at the writer's end, then more records over the zeros after it.
        let mut tail = LogTail::new(dir.path(), 0);
        let mut seen = Vec::new();
        tail.read(durable.watermark(), usize::MAX, |r| seen.push(r.lsn)).unwrap();
        for _ in 0..5 {
            lsn += 1;
            wal.submit(payload(lsn), ()).unwrap();
            durable.wait_past(lsn - 1, Duration::from_secs(5));
        }
        tail.read(durable.watermark(), usize::MAX, |r| seen.push(r.lsn)).unwrap();
        assert_eq!(seen, (1..=lsn).collect::<Vec<_>>());
        assert_eq!(list_segments(dir.path()).unwrap().last().unwrap().0, first, "the same segment");
        drop(wal);
        handle.join().unwrap();
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
