//! The write-ahead log: segment files of checksummed records, written by one
//! thread with group commit.
//!
//! Record layout (little-endian), 24-byte header then payload:
//!
//! ```text
//! u32 payload_len
//! u32 crc32c       over the 16 bytes lsn|ts_ms and the payload
//! u64 lsn          1, 2, 3, ... without gaps
//! u64 ts_ms        writer clock, never decreasing
//! payload
//! ```
//!
//! Segments are `wal-{first_lsn:020}.log`. A new one starts at every open and
//! when the current one passes the configured size. Segments are written
//! into zeros laid down ahead of use (`prepare.rs`: an fdatasync then has
//! no file size to commit), so a segment's records may be followed by
//! zeros: a header of zeros (no record has LSN 0) is where its records
//! end, in every segment, and is not a torn write.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam::channel::{self, Receiver, Sender, TrySendError};

use crate::histogram::AtomicHistogram;
use crate::prepare::{Prepared, Preparer};
use crate::remove::{remove_gently, remove_leftovers};
use crate::tail::{Durable, LogEnd};
use crate::{sync_dir, Error};

pub const RECORD_HEADER: usize = 24;
/// Largest payload a record may carry.
pub const MAX_PAYLOAD: usize = 16 << 20;

/// One committed record, as read: its payload borrowed from the segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record<'a> {
    pub lsn: u64,
    pub ts_ms: u64,
    pub payload: &'a [u8],
}

fn crc(lsn: u64, ts_ms: u64, payload: &[u8]) -> u32 {
    let mut head = [0u8; 16];
    head[..8].copy_from_slice(&lsn.to_le_bytes());
    head[8..].copy_from_slice(&ts_ms.to_le_bytes());
    crc32c::crc32c_append(crc32c::crc32c(&head), payload)
}

/// Appends one encoded record to `out`.
pub fn encode_record(lsn: u64, ts_ms: u64, payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc(lsn, ts_ms, payload).to_le_bytes());
    out.extend_from_slice(&lsn.to_le_bytes());
    out.extend_from_slice(&ts_ms.to_le_bytes());
    out.extend_from_slice(payload);
}

pub fn segment_name(first_lsn: u64) -> String {
    format!("wal-{first_lsn:020}.log")
}

/// Segments in `dir`, ascending by first LSN.
pub fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, Error> {
    let mut segs = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(num) = name.strip_prefix("wal-").and_then(|s| s.strip_suffix(".log")) {
            if let Ok(lsn) = num.parse::<u64>() {
                segs.push((lsn, entry.path()));
            }
        }
    }
    segs.sort();
    Ok(segs)
}

/// What replay found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReplayEnd {
    /// The LSN the next record gets.
    pub next_lsn: u64,
    /// Timestamp of the last record (0 if none were replayed).
    pub last_ts_ms: u64,
    /// Records handed to the callback.
    pub replayed: u64,
    /// Bytes cut from the end of the last segment: a write torn by a crash.
    pub torn_bytes: u64,
}

/// Where a scan stopped early: a bad record at the end of the last segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    pub segment: PathBuf,
    /// Offset of the first byte that is not part of a good record.
    pub offset: u64,
    /// Bytes from there to the end of the segment.
    pub bytes: u64,
    pub why: String,
}

/// What a read-only scan found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ScanEnd {
    /// The LSN after the last good record.
    pub next_lsn: u64,
    /// Timestamp of the last good record (0 if none).
    pub last_ts_ms: u64,
    /// Records handed to the callback.
    pub records: u64,
    /// A bad record at the end of the last segment: a write a crash cut
    /// short, or one still being written by a live server.
    pub torn: Option<TornTail>,
}

/// Calls `each` for every good record with an LSN above `after_lsn`, in
/// order, without changing anything on disk: safe on the directory of a
/// running server. A bad record at the end of the last segment ends the
/// scan (see [`ScanEnd::torn`]); anywhere else, or a gap in LSNs, it is an
/// error.
pub fn scan(dir: &Path, after_lsn: u64, mut each: impl FnMut(Record<'_>)) -> Result<ScanEnd, Error> {
    let segs = list_segments(dir)?;
    let mut end = ScanEnd { next_lsn: after_lsn + 1, ..Default::default() };
    // Segments wholly at or below after_lsn are skipped: the next one starts at or below it + 1.
    let first = segs.iter().rposition(|(lsn, _)| *lsn <= after_lsn + 1).unwrap_or(0);
    let mut expect: Option<u64> = None;
    for (i, (first_lsn, path)) in segs.iter().enumerate().skip(first) {
        let last_segment = i + 1 == segs.len();
        let mut data = Vec::new();
        File::open(path).and_then(|mut f| f.read_to_end(&mut data)).map_err(|e| {
            if path.exists() {
                Error::io(path, e)
            } else {
                deleted_while_read(path)
            }
        })?;
        match expect {
            Some(want) if *first_lsn != want => {
                return Err(Error::Corrupt(format!(
                    "{}: starts at LSN {first_lsn}, expected {want}",
                    path.display()
                )));
            }
            None if *first_lsn > after_lsn + 1 => {
                return Err(Error::Corrupt(format!(
                    "log starts at LSN {first_lsn} but the snapshot ends at {after_lsn}: records are missing"
                )));
            }
            _ => {}
        }
        let (lsn_here, bad) = scan_segment(&data, *first_lsn, after_lsn, &mut end, &mut each);
        if let Some((offset, why)) = bad {
            if !last_segment {
                if !path.exists() {
                    return Err(deleted_while_read(path)); // cut while it was read
                }
                return Err(Error::Corrupt(format!("{}: offset {offset}: {why}", path.display())));
            }
            let bytes = (data.len() - offset) as u64;
            end.torn = Some(TornTail { segment: path.clone(), offset: offset as u64, bytes, why });
        }
        expect = Some(lsn_here);
        end.next_lsn = end.next_lsn.max(lsn_here);
    }
    Ok(end)
}

/// A running server deleted `path` (behind a snapshot) while a scan read
/// it: renamed to `*.deleting`, then cut from the end (`remove.rs`).
fn deleted_while_read(path: &Path) -> Error {
    Error::Io(format!(
        "{}: deleted behind a snapshot while it was read (the server is running); read again from a later LSN",
        path.display()
    ))
}

/// Hands the good records of one segment to `each`; returns the LSN after
/// the last good one and, if one is bad, its offset and what is wrong.
fn scan_segment(
    data: &[u8],
    first_lsn: u64,
    after_lsn: u64,
    end: &mut ScanEnd,
    each: &mut impl FnMut(Record<'_>),
) -> (u64, Option<(usize, String)>) {
    let (mut pos, mut lsn_here) = (0usize, first_lsn);
    while pos < data.len() && !records_end(&data[pos..]) {
        match parse_record(&data[pos..]) {
            Some((rec, len)) if rec.lsn == lsn_here => {
                pos += len;
                lsn_here += 1;
                end.last_ts_ms = rec.ts_ms;
                if rec.lsn > after_lsn {
                    end.records += 1;
                    each(rec);
                }
            }
            Some((rec, _)) => {
                return (lsn_here, Some((pos, format!("LSN {} where {lsn_here} was expected", rec.lsn))))
            }
            None => return (lsn_here, Some((pos, "an incomplete or checksum-failing record".to_string()))),
        }
    }
    (lsn_here, None)
}

/// Calls `apply` for every record with an LSN above `after_lsn`, in order,
/// for recovery: like [`scan`], and a bad record at the end of the last
/// segment is a write that a crash cut short (it was never acknowledged):
/// the segment is truncated there. Never call it on a running server's directory.
pub fn replay(dir: &Path, after_lsn: u64, apply: impl FnMut(Record<'_>)) -> Result<ReplayEnd, Error> {
    let scanned = scan(dir, after_lsn, apply)?;
    let mut end = ReplayEnd {
        next_lsn: scanned.next_lsn,
        last_ts_ms: scanned.last_ts_ms,
        replayed: scanned.records,
        torn_bytes: 0,
    };
    if let Some(t) = scanned.torn {
        tracing::warn!(
            segment = %t.segment.display(), offset = t.offset, bytes = t.bytes,
            "torn write at the end of the log ({}); truncating: it was never acknowledged", t.why
        );
        let f = OpenOptions::new().write(true).open(&t.segment).map_err(|e| Error::io(&t.segment, e))?;
        f.set_len(t.offset).and_then(|_| f.sync_all()).map_err(|e| Error::io(&t.segment, e))?;
        end.torn_bytes = t.bytes;
    }
    Ok(end)
}

/// Bytes of a segment file up to its last byte that is not zero: its
/// records, without the zeros written ahead of them (and without any zero
/// bytes that end its last record, which only an estimate can ignore).
pub fn records_len(path: &Path) -> Result<u64, Error> {
    const STEP: u64 = 64 << 10;
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut end = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut chunk = vec![0u8; STEP as usize];
    while end > 0 {
        let start = end.saturating_sub(STEP);
        let piece = &mut chunk[..(end - start) as usize];
        file.read_exact_at(piece, start).map_err(|e| Error::io(path, e))?;
        if let Some(last) = piece.iter().rposition(|&b| b != 0) {
            return Ok(start + last as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// True if `rest`, the bytes of a segment after its last record, start
/// with zeros where the next record's header would be: the zeros written
/// ahead of use, where the segment's records end. `rest` must reach the end
/// of the file if it is shorter than a header. No record starts so (its
/// LSN is at least 1).
pub(crate) fn records_end(rest: &[u8]) -> bool {
    !rest.is_empty() && rest.iter().take(RECORD_HEADER).all(|&b| b == 0)
}

/// Parses one record; `None` if it is incomplete or fails its checksum.
pub(crate) fn parse_record(buf: &[u8]) -> Option<(Record<'_>, usize)> {
    if buf.len() < RECORD_HEADER {
        return None;
    }
    let len = u32::from_le_bytes(buf[0..4].try_into().unwrap()) as usize;
    let sum = u32::from_le_bytes(buf[4..8].try_into().unwrap());
    let lsn = u64::from_le_bytes(buf[8..16].try_into().unwrap());
    let ts_ms = u64::from_le_bytes(buf[16..24].try_into().unwrap());
    if len > MAX_PAYLOAD || buf.len() - RECORD_HEADER < len {
        return None;
    }
    let payload = &buf[RECORD_HEADER..RECORD_HEADER + len];
    if crc(lsn, ts_ms, payload) != sum {
        return None;
    }
    Some((Record { lsn, ts_ms, payload }, RECORD_HEADER + len))
}

/// Deletes segments whose records all have LSN <= `lsn` (a snapshot covers
/// them), a few MiB at a time ([`remove_gently`]), and finishes deletions a
/// crash interrupted. The newest segment is never deleted.
pub fn delete_segments_through(dir: &Path, lsn: u64) -> Result<usize, Error> {
    remove_leftovers(dir, "wal-")?;
    let segs = list_segments(dir)?;
    let mut deleted = 0;
    for pair in segs.windows(2) {
        let (next_first, _) = pair[1];
        if next_first <= lsn + 1 {
            remove_gently(&pair[0].1)?;
            deleted += 1;
        }
    }
    if deleted > 0 {
        sync_dir(dir)?;
    }
    Ok(deleted)
}

/// Cuts the log after record `lsn`: later segments are deleted and the one
/// holding `lsn` is truncated after it, durably. For a replicated server
/// whose tail the replication topic never confirmed (docs/ha.md); never on a
/// running server's directory. Returns the records cut.
pub fn truncate_after(dir: &Path, lsn: u64) -> Result<u64, Error> {
    let mut cut = 0;
    let mut keep_until: Option<(PathBuf, u64)> = None;
    for (first, path) in list_segments(dir)? {
        if first > lsn {
            let mut records = 0;
            scan_file(&path, first, |_| records += 1)?;
            fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            cut += records;
            continue;
        }
        // The last segment starting at or below lsn + 1 holds the cut.
        let (mut pos, mut records_after) = (0u64, 0u64);
        scan_file(&path, first, |(rec, end)| {
            if rec.lsn <= lsn {
                pos = end;
            } else {
                records_after += 1;
            }
        })?;
        cut += records_after;
        keep_until = Some((path, pos));
    }
    if let Some((path, pos)) = keep_until {
        let f = OpenOptions::new().write(true).open(&path).map_err(|e| Error::io(&path, e))?;
        if f.metadata().map_err(|e| Error::io(&path, e))?.len() > pos {
            f.set_len(pos).and_then(|_| f.sync_all()).map_err(|e| Error::io(&path, e))?;
        }
    }
    sync_dir(dir)?;
    Ok(cut)
}

/// Good records of one segment file with the offset just past each.
fn scan_file(path: &Path, first_lsn: u64, mut each: impl FnMut((Record<'_>, u64))) -> Result<(), Error> {
    let mut data = Vec::new();
    File::open(path).and_then(|mut f| f.read_to_end(&mut data)).map_err(|e| Error::io(path, e))?;
    let (mut pos, mut want) = (0usize, first_lsn);
    while let Some((rec, len)) = parse_record(&data[pos..]).filter(|(r, _)| r.lsn == want) {
        pos += len;
        want += 1;
        each((rec, pos as u64));
    }
    Ok(())
}

/// Writes one record at `lsn` in a segment of its own and makes it durable,
/// for what a server logs before its writer starts (the shard layout).
/// `lsn` must be the next LSN replay reported; returns the one after it.
pub fn write_one(dir: &Path, lsn: u64, ts_ms: u64, payload: &[u8]) -> Result<u64, Error> {
    let mut buf = Vec::with_capacity(RECORD_HEADER + payload.len());
    encode_record(lsn, ts_ms, payload, &mut buf);
    let mut file = create_segment(dir, lsn)?;
    let path = dir.join(segment_name(lsn));
    file.write_all(&buf).and_then(|_| file.sync_data()).map_err(|e| Error::io(&path, e))?;
    Ok(lsn + 1)
}

#[derive(Clone, Debug)]
pub struct WalConfig {
    pub dir: PathBuf,
    /// Start a new segment when the current one passes this many bytes.
    pub segment_bytes: u64,
    /// Most records in one group commit: the writer takes no further
    /// batch once it has this many (so one may carry a batch's records
    /// more).
    pub max_batch: usize,
    /// Batches that may wait for the writer; beyond this `try_submit` says Full.
    pub queue_capacity: usize,
    /// The nice value the writer and its commit thread run at: 0 leaves
    /// them at the process's own, as any other thread; a negative one runs
    /// them ahead of the rest (see [`run_at_nice`]).
    pub nice: i32,
}

impl WalConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        WalConfig {
            dir: dir.into(),
            segment_bytes: 64 << 20,
            max_batch: 4096,
            queue_capacity: 16384,
            nice: 0,
        }
    }
}

/// Sets the calling thread's nice value, unless it is 0 (on Linux a nice
/// value is a thread's own). A process that may not raise its priority
/// (no `CAP_SYS_NICE`, `RLIMIT_NICE` too low) keeps the default and says
/// so, once: the log is as correct, only slower on a busy machine.
fn run_at_nice(nice: i32) {
    static REFUSED: std::sync::Once = std::sync::Once::new();
    // SAFETY: setpriority reads no memory of ours; 0 names the calling thread.
    if nice != 0 && unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } != 0 {
        let e = io::Error::last_os_error();
        REFUSED.call_once(|| {
            tracing::warn!(nice, error = %e, "the log's threads run at the default priority (raise RLIMIT_NICE or grant CAP_SYS_NICE to let them run ahead of the shards)");
        });
    }
}

/// Bucket bounds of the write + fdatasync time, in microseconds.
pub const SYNC_MICROS_BUCKETS: &[u64] =
    &[50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000, 1_000_000];
/// Bucket bounds of the records in one group commit.
pub const BATCH_RECORDS_BUCKETS: &[u64] = &[1, 4, 16, 64, 256, 1_024, 4_096];
/// Bucket bounds of the bytes in one group commit.
pub const BATCH_BYTES_BUCKETS: &[u64] = &[256, 1_024, 4_096, 16_384, 65_536, 262_144, 1_048_576, 4_194_304];

/// Counters the writer keeps; read them from any thread.
pub struct WalStats {
    pub records: AtomicU64,
    pub fsyncs: AtomicU64,
    pub bytes: AtomicU64,
    /// Sum over fsyncs of the microseconds spent in write + fdatasync.
    pub sync_micros: AtomicU64,
    /// Each group commit's write + fdatasync, in microseconds.
    pub sync_micros_hist: AtomicHistogram,
    /// Each record's wait from its hand-over to the writer to the end of
    /// the fdatasync that made it durable, in microseconds: what the log
    /// adds to an acknowledgement (the group commit under way, then its own).
    pub wait_micros_hist: AtomicHistogram,
    /// Records per group commit.
    pub batch_records_hist: AtomicHistogram,
    /// Bytes per group commit.
    pub batch_bytes_hist: AtomicHistogram,
    /// The writer is waiting for room on the log's disk (see
    /// [`SubmitError::NoRoom`]).
    pub stalled: AtomicBool,
    /// Times the writer found no room on the log's disk and waited.
    pub stalls: AtomicU64,
}

impl Default for WalStats {
    fn default() -> Self {
        WalStats {
            records: AtomicU64::new(0),
            fsyncs: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            sync_micros: AtomicU64::new(0),
            sync_micros_hist: AtomicHistogram::new(SYNC_MICROS_BUCKETS),
            wait_micros_hist: AtomicHistogram::new(SYNC_MICROS_BUCKETS),
            batch_records_hist: AtomicHistogram::new(BATCH_RECORDS_BUCKETS),
            batch_bytes_hist: AtomicHistogram::new(BATCH_BYTES_BUCKETS),
            stalled: AtomicBool::new(false),
            stalls: AtomicU64::new(0),
        }
    }
}

/// Records handed to the writer together: their payloads back to back in
/// one buffer. A shard hands over the records of one pass of its event
/// loop as one batch, so a record costs no allocation of its own and no
/// place of its own in the writer's queue; the batch's buffers are freed
/// by the writer, once, after it has copied them into its group commit.
pub struct Batch<T> {
    bytes: Vec<u8>,
    records: Vec<Pending<T>>,
    /// When it was handed to the writer: its records' wait for durability
    /// (the group commit under way, then their own) counts from here.
    handed_at: Option<Instant>,
}

/// One record of a [`Batch`].
struct Pending<T> {
    /// Where its payload ends in the batch's bytes (it starts where the
    /// previous one ends).
    end: usize,
    /// The record's timestamp if it has one already (a record copied from
    /// another server's log); else the writer's clock. Never below the
    /// previous record's.
    ts_ms: Option<u64>,
    token: T,
}

impl<T> Default for Batch<T> {
    fn default() -> Self {
        Batch { bytes: Vec::new(), records: Vec::new(), handed_at: None }
    }
}

impl<T> Batch<T> {
    /// A batch of one record.
    fn one(payload: Vec<u8>, token: T) -> Self {
        assert_payload_fits(payload.len());
        Batch {
            records: vec![Pending { end: payload.len(), ts_ms: None, token }],
            bytes: payload,
            handed_at: None,
        }
    }

    /// Room for `records` more records of `bytes` more payload bytes in all.
    pub fn reserve(&mut self, records: usize, bytes: usize) {
        self.records.reserve(records);
        self.bytes.reserve(bytes);
    }

    /// Records in the batch.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Appends a record whose payload `encode` appends to the buffer it is
    /// given (from the token, if that is where the record's contents are);
    /// `token` comes back with the record once it is durable.
    pub fn push(&mut self, token: T, encode: impl FnOnce(&T, &mut Vec<u8>)) {
        let start = self.bytes.len();
        encode(&token, &mut self.bytes);
        assert_payload_fits(self.bytes.len() - start);
        self.records.push(Pending { end: self.bytes.len(), ts_ms: None, token });
    }

    /// Appends a record copied from another server's log: its payload as
    /// it was, and its timestamp (raised to the previous record's if lower).
    pub fn push_copied(&mut self, token: T, ts_ms: u64, payload: &[u8]) {
        assert_payload_fits(payload.len());
        self.bytes.extend_from_slice(payload);
        self.records.push(Pending { end: self.bytes.len(), ts_ms: Some(ts_ms), token });
    }

    /// The tokens of the records, in order: what a caller whose batch the
    /// writer refused gets back.
    pub fn into_tokens(self) -> impl Iterator<Item = T> {
        self.records.into_iter().map(|p| p.token)
    }

    /// Bytes the records take in the log.
    fn log_bytes(&self) -> u64 {
        (self.bytes.len() + RECORD_HEADER * self.records.len()) as u64
    }
}

/// A payload over [`MAX_PAYLOAD`] would be written, acknowledged, and then
/// read back as a torn write and cut: refuse it before it is logged. The
/// server's records are far below it (256 lines at most: ~4 KiB).
fn assert_payload_fits(len: usize) {
    assert!(
        len <= MAX_PAYLOAD,
        "invariant: a log record's payload is at most {MAX_PAYLOAD} bytes, not {len}"
    );
}

/// A durable record, handed to the commit callback with the bytes of its
/// group commit, in which its payload is ([`Committed::payload`]).
pub struct Committed<T> {
    pub lsn: u64,
    pub ts_ms: u64,
    pub token: T,
    /// Where the payload is in the group commit's bytes.
    at: usize,
    len: usize,
}

impl<T> Committed<T> {
    /// The record's payload, out of the bytes of the group commit that
    /// wrote it (the callback's second argument).
    pub fn payload<'a>(&self, group: &'a [u8]) -> &'a [u8] {
        &group[self.at..self.at + self.len]
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// The writer queue is full: shed load.
    Full,
    /// The writer has stopped.
    Closed,
    /// The log's disk has no room: the writer waits for space with what it
    /// was given, and takes no more mutations meanwhile (reads go on).
    NoRoom,
}

/// Emptied batches the writer keeps for [`Wal::batch`]: a shard's pass
/// takes one with its buffers' room, so that handing records over costs no
/// allocation of a few KiB each pass (glibc merges its small free chunks
/// on every such allocation, which then cost cache misses to reuse).
const SPARE_BATCHES: usize = 64;
/// A batch whose payload buffer grew past this is freed, not kept (a
/// shard's pass holds a few KiB; the pool stays under ~5 MiB).
const SPARE_BATCH_BYTES: usize = 64 << 10;

/// The submitting side of the log; cheap to clone.
pub struct Wal<T> {
    tx: Sender<Batch<T>>,
    /// Dropped with the last handle: a writer waiting for room on the disk
    /// then gives up (see [`Writer::reserve`]).
    _open: Arc<Open>,
    spare_batches: Receiver<Batch<T>>,
    pub stats: Arc<WalStats>,
    /// The highest LSN on disk, for readers that follow the log.
    pub durable: Arc<Durable>,
}

impl<T> Clone for Wal<T> {
    fn clone(&self) -> Self {
        Wal {
            tx: self.tx.clone(),
            _open: self._open.clone(),
            spare_batches: self.spare_batches.clone(),
            stats: self.stats.clone(),
            durable: self.durable.clone(),
        }
    }
}

impl<T: Send + 'static> Wal<T> {
    /// Starts the writer thread. It appends at `next_lsn` (from [`replay`]) in
    /// a fresh segment, then writes into segments a third thread fills with
    /// zeros ahead of use (`prepare.rs`), and after every fdatasync advances [`Wal::durable`]
    /// and hands the group commit it made durable to a second thread, which
    /// calls `on_commit` with each group commit's records in LSN order and
    /// the bytes it wrote (where [`Committed::payload`] finds each record's
    /// payload): the writer goes on to the next write + fdatasync while the
    /// callback runs, with at most one group commit waiting between them (a
    /// slow callback slows the writer, so nothing grows without bound). The
    /// threads end when every `Wal` handle is dropped, after the last
    /// callback; join the returned handle to wait for both.
    ///
    /// No room on the disk makes the writer wait (see `Writer::reserve`);
    /// a failed write or fsync aborts the process: after a failed fsync the
    /// kernel may have dropped the dirty pages, so retrying could acknowledge
    /// data that is not on disk.
    pub fn start(
        cfg: WalConfig,
        next_lsn: u64,
        last_ts_ms: u64,
        on_commit: impl FnMut(Vec<Committed<T>>, &[u8]) + Send + 'static,
    ) -> Result<(Wal<T>, std::thread::JoinHandle<()>), Error> {
        let (tx, rx) = channel::bounded(cfg.queue_capacity);
        let nice = cfg.nice;
        let (spare_batches_tx, spare_batches) = channel::bounded(SPARE_BATCHES);
        let stats = Arc::new(WalStats::default());
        let durable = Arc::new(Durable::new(next_lsn - 1));
        let closed = Arc::new(AtomicBool::new(false));
        let file = create_segment(&cfg.dir, next_lsn)?;
        // This first segment is appended to until the first zeroed one is ready.
        let preparer = Preparer::start(&cfg.dir, cfg.segment_bytes, durable.clone())?;
        let mut w = Writer {
            cfg,
            file,
            first_lsn: next_lsn,
            written: 0,
            zeroed: 0,
            preparer,
            next_lsn,
            last_ts_ms,
            stats: stats.clone(),
            durable: durable.clone(),
            closed: closed.clone(),
        };
        // A rendezvous: the writer hands over a group commit only when the
        // callback thread is done with the previous one. Its buffer comes
        // back for a later group commit.
        let (commits_tx, commits_rx) = channel::bounded::<(Vec<Committed<T>>, Vec<u8>)>(0);
        let (spare_tx, spare_rx) = channel::bounded::<Vec<u8>>(2);
        let mut on_commit = on_commit;
        let callbacks = std::thread::Builder::new()
            .name("stockd-wal-commit".into())
            .spawn(move || {
                run_at_nice(nice);
                for (records, bytes) in commits_rx {
                    on_commit(records, &bytes);
                    let _ = spare_tx.try_send(bytes);
                }
            })
            .map_err(|e| Error::io(Path::new("<thread>"), e))?;
        let handle = std::thread::Builder::new()
            .name("stockd-wal".into())
            .spawn(move || {
                run_at_nice(nice);
                w.run(rx, commits_tx, spare_rx, spare_batches_tx);
                let _ = callbacks.join();
            })
            .map_err(|e| Error::io(Path::new("<thread>"), e))?;
        Ok((Wal { tx, _open: Arc::new(Open(closed)), spare_batches, stats, durable }, handle))
    }

    /// An empty batch to fill: one the writer is done with (its buffers'
    /// room kept) if there is one, else a new one.
    pub fn batch(&self) -> Batch<T> {
        self.spare_batches.try_recv().unwrap_or_default()
    }

    /// Queues a batch of records without blocking; refused whole, and
    /// given back, if the writer's queue is full or the writer has stopped.
    /// An empty batch is taken at once (there is nothing to write).
    pub fn try_submit(&self, mut batch: Batch<T>) -> Result<(), (SubmitError, Batch<T>)> {
        if batch.is_empty() {
            return Ok(());
        }
        if self.stats.stalled.load(Ordering::Relaxed) {
            return Err((SubmitError::NoRoom, batch));
        }
        batch.handed_at = Some(Instant::now());
        self.tx.try_send(batch).map_err(|e| match e {
            TrySendError::Full(b) => (SubmitError::Full, b),
            TrySendError::Disconnected(b) => (SubmitError::Closed, b),
        })
    }

    /// Queues a payload, waiting while the queue is full (for tools and tests).
    pub fn submit(&self, payload: Vec<u8>, token: T) -> Result<(), SubmitError> {
        let mut batch = Batch::one(payload, token);
        batch.handed_at = Some(Instant::now());
        self.tx.send(batch).map_err(|_| SubmitError::Closed)
    }

    /// Queues a batch, waiting while the queue is full: a standby logs the
    /// records of each message from its primary as one batch
    /// ([`Batch::push_copied`]).
    pub fn submit_batch(&self, mut batch: Batch<T>) -> Result<(), SubmitError> {
        if batch.is_empty() {
            return Ok(());
        }
        batch.handed_at = Some(Instant::now());
        self.tx.send(batch).map_err(|_| SubmitError::Closed)
    }
}

fn create_segment(dir: &Path, first_lsn: u64) -> Result<File, Error> {
    let path = dir.join(segment_name(first_lsn));
    // A segment named after the next LSN can hold no valid record: replay
    // ended before it. Truncating it is safe.
    let file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    file.sync_all().map_err(|e| Error::io(&path, e))?;
    sync_dir(dir)?;
    Ok(file)
}

struct Writer {
    cfg: WalConfig,
    /// The segment being written, its first LSN, and its bytes of records.
    file: File,
    first_lsn: u64,
    written: u64,
    /// Bytes of the segment that were zeros on disk before records went
    /// there (0: a segment only appended to).
    zeroed: u64,
    preparer: Preparer,
    next_lsn: u64,
    last_ts_ms: u64,
    stats: Arc<WalStats>,
    durable: Arc<Durable>,
    /// Set once every [`Wal`] handle is gone.
    closed: Arc<AtomicBool>,
}

/// Sets its flag when dropped, that is when the last [`Wal`] handle goes.
struct Open(Arc<AtomicBool>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The writer's pauses while the log's disk has no room: short at first,
/// so that freed space is used at once, then a few a second.
const NO_ROOM_PAUSE_MIN: Duration = Duration::from_millis(10);
const NO_ROOM_PAUSE_MAX: Duration = Duration::from_millis(250);
/// How often a writer still waiting for room says so again.
const NO_ROOM_REPEAT: Duration = Duration::from_secs(10);

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Writer {
    fn run<T>(
        &mut self,
        rx: Receiver<Batch<T>>,
        commits: Sender<(Vec<Committed<T>>, Vec<u8>)>,
        spare: Receiver<Vec<u8>>,
        spare_batches: Sender<Batch<T>>,
    ) {
        let mut batches: Vec<Batch<T>> = Vec::new();
        // (handed to the writer at, records) of each batch in a group commit.
        let mut handed: Vec<(Option<Instant>, u64)> = Vec::new();
        while let Ok(first) = rx.recv() {
            let mut records = first.len();
            batches.push(first);
            // Everything that queued up during the previous fsync joins this one.
            while records < self.cfg.max_batch {
                match rx.try_recv() {
                    Ok(b) => {
                        records += b.len();
                        batches.push(b);
                    }
                    Err(_) => break,
                }
            }
            self.make_room(batches.iter().map(Batch::log_bytes).sum());
            let now = now_ms();
            let mut buf = spare.try_recv().unwrap_or_else(|_| Vec::with_capacity(1 << 20));
            buf.clear();
            let mut done = Vec::with_capacity(records);
            for mut b in batches.drain(..) {
                handed.push((b.handed_at.take(), b.records.len() as u64));
                let mut start = 0;
                for p in b.records.drain(..) {
                    let lsn = self.next_lsn;
                    self.next_lsn += 1;
                    let ts_ms = p.ts_ms.unwrap_or(now).max(self.last_ts_ms);
                    self.last_ts_ms = ts_ms;
                    let at = buf.len() + RECORD_HEADER;
                    encode_record(lsn, ts_ms, &b.bytes[start..p.end], &mut buf);
                    done.push(Committed { lsn, ts_ms, token: p.token, at, len: p.end - start });
                    start = p.end;
                }
                if b.bytes.capacity() <= SPARE_BATCH_BYTES && b.records.capacity() <= self.cfg.max_batch {
                    b.bytes.clear();
                    let _ = spare_batches.try_send(b);
                }
            }
            if !self.reserve(buf.len() as u64, done.len()) {
                tracing::warn!(
                    records = done.len(),
                    "stopping with records not written for lack of room on the log's disk; none was acknowledged"
                );
                return;
            }
            let t = Instant::now();
            if let Err(e) = self.file.write_all_at(&buf, self.written).and_then(|_| self.file.sync_data()) {
                tracing::error!(error = %e, "write-ahead log write or fdatasync failed; aborting to avoid acknowledging lost data");
                std::process::abort();
            }
            let synced = Instant::now();
            let micros = synced.duration_since(t).as_micros() as u64;
            for (at, records) in handed.drain(..) {
                if let Some(at) = at {
                    let waited = synced.saturating_duration_since(at).as_micros() as u64;
                    self.stats.wait_micros_hist.observe_n(waited, records);
                }
            }
            self.stats.sync_micros.fetch_add(micros, Ordering::Relaxed);
            self.stats.sync_micros_hist.observe(micros);
            self.stats.batch_records_hist.observe(done.len() as u64);
            self.stats.batch_bytes_hist.observe(buf.len() as u64);
            self.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
            self.stats.records.fetch_add(done.len() as u64, Ordering::Relaxed);
            self.stats.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
            self.written += buf.len() as u64;
            let end = LogEnd { segment: self.first_lsn, bytes: self.written };
            self.durable.advance(self.next_lsn - 1, buf.len() as u64, end);
            if commits.send((done, buf)).is_err() {
                // The callback thread is gone (it panicked): nothing durable
                // can be acknowledged any more.
                tracing::error!("the log's commit callback thread has stopped; aborting");
                std::process::abort();
            }
        }
    }

    /// Makes sure the disk holds room for the next `bytes` of the segment
    /// before they are written, so that a full disk never fails a write
    /// half-way (its first records complete on disk, the rest not, and all
    /// of them refused). Bytes over zeros laid down ahead (`prepare.rs`) have
    /// their room; past them it is allocated first (`fallocate`, which
    /// leaves zeros: a crash before the write ends the log there). With no
    /// room the writer waits, and says so, until there is: the batches it
    /// holds wait with it, new mutations are refused with
    /// [`SubmitError::NoRoom`] meanwhile, and reads go on. False: every
    /// [`Wal`] handle went while it waited (the server stops), and nothing
    /// was written. Where `fallocate` fails otherwise (a file system without
    /// it), the write goes ahead as before.
    fn reserve(&mut self, bytes: u64, records: usize) -> bool {
        if self.written + bytes <= self.zeroed {
            return true;
        }
        let (mut pause, mut since, mut told) = (NO_ROOM_PAUSE_MIN, None::<Instant>, None::<Instant>);
        loop {
            let e = match allocate(&self.file, self.written, bytes) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // No room: the disk is full, a quota or the file-size limit is reached.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG)) => e,
                // Anything else (no `fallocate` here, say): the write finds out.
                Err(_) => break,
            };
            let first = *since.get_or_insert_with(|| {
                self.stats.stalled.store(true, Ordering::Relaxed);
                self.stats.stalls.fetch_add(1, Ordering::Relaxed);
                Instant::now()
            });
            if told.is_none_or(|t| t.elapsed() >= NO_ROOM_REPEAT) {
                tracing::error!(
                    error = %e,
                    bytes,
                    records,
                    waiting_s = first.elapsed().as_secs(),
                    dir = %self.cfg.dir.display(),
                    "no room on the log's disk: these records wait and new mutations are refused until space is freed"
                );
                told = Some(Instant::now());
            }
            if self.closed.load(Ordering::Relaxed) {
                return false;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(NO_ROOM_PAUSE_MAX);
        }
        if let Some(since) = since {
            self.stats.stalled.store(false, Ordering::Relaxed);
            tracing::warn!(
                waited_ms = since.elapsed().as_millis() as u64,
                "room on the log's disk again: writing"
            );
        }
        true
    }

    /// Starts the next segment, before `bytes` of records are written,
    /// when the current one is full, or when they would go past its zeros
    /// (or it has none) and a zeroed segment is ready. Past the zeros with
    /// none ready, records are appended (an fdatasync then commits the new
    /// size too) until one is.
    fn make_room(&mut self, bytes: u64) {
        let full = self.written >= self.cfg.segment_bytes;
        if self.written == 0 || (!full && self.written + bytes <= self.zeroed) {
            return; // nothing here yet (a new segment would take this one's name), or room
        }
        let next = self.preparer.take();
        if next.is_none() && !full {
            return;
        }
        match self.open_segment(next) {
            Ok((file, zeroed)) => {
                (self.file, self.first_lsn, self.written, self.zeroed) = (file, self.next_lsn, 0, zeroed);
            }
            Err(e) => tracing::error!(error = %e, "cannot start a new log segment; keeping the current one"),
        }
    }

    /// The segment whose first record is `next_lsn`: the zeroed one given,
    /// renamed, or else a new empty one; and its zeroed bytes.
    fn open_segment(&self, zeroed: Option<Prepared>) -> Result<(File, u64), Error> {
        let Some(p) = zeroed else {
            return Ok((create_segment(&self.cfg.dir, self.next_lsn)?, 0));
        };
        let path = self.cfg.dir.join(segment_name(self.next_lsn));
        fs::rename(&p.path, &path).map_err(|e| Error::io(&path, e))?;
        sync_dir(&self.cfg.dir)?;
        Ok((p.file, p.len))
    }
}

/// Allocates `len` bytes of `file` from `offset` (zeros to readers).
fn allocate(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EFBIG));
    };
    // SAFETY: a plain system call on a file descriptor this `File` owns.
    if unsafe { libc::fallocate(file.as_raw_fd(), 0, offset, len) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Error {
    pub(crate) fn io(path: &Path, e: io::Error) -> Error {
        Error::Io(format!("{}: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch the writer gives back comes empty with its room kept, and
    /// what is pushed into it is logged as it was pushed.
    #[test]
    fn a_batch_comes_back_empty_with_its_room_and_is_logged_right_again() {
        let dir = tempfile::tempdir().unwrap();
        let (done_tx, done) = std::sync::mpsc::channel();
        let (w, handle) = Wal::start(WalConfig::new(dir.path()), 1, 0, move |batch, group| {
            for c in batch {
                done_tx.send((c.lsn, c.payload(group).to_vec(), c.token)).unwrap();
            }
        })
        .unwrap();
        let mut first = w.batch();
        first.reserve(8, 4096);
        first.push(1u32, |_, out| out.extend_from_slice(b"first, long payload"));
        first.push(2, |_, out| out.extend_from_slice(b"second"));
        w.try_submit(first).map_err(|(e, _)| e).unwrap();
        assert_eq!(done.recv().unwrap().0, 1);
        assert_eq!(done.recv().unwrap().0, 2);
        // The writer gives the batch back after it copied it, before the callback runs.
        let mut again = w.batch();
        assert!(again.is_empty(), "no record of the first pass is left in it");
        assert!(again.bytes.capacity() >= 4096 && again.records.capacity() >= 8, "its room is kept");
        again.push(3, |_, out| out.extend_from_slice(b"third"));
        w.try_submit(again).map_err(|(e, _)| e).unwrap();
        assert_eq!(done.recv().unwrap(), (3, b"third".to_vec(), 3));
        // One grown past the bound is freed, not kept.
        let mut big = w.batch();
        big.push(4, |_, out| out.resize(SPARE_BATCH_BYTES + 1, 7));
        w.try_submit(big).map_err(|(e, _)| e).unwrap();
        assert_eq!(done.recv().unwrap().0, 4);
        assert_eq!(w.batch().bytes.capacity(), 0, "a new batch, not the big one");
        drop(w);
        handle.join().unwrap();
        let mut replayed = Vec::new();
        replay(dir.path(), 0, |r| replayed.push(r.payload.to_vec())).unwrap();
        assert_eq!(replayed[..3], [b"first, long payload".to_vec(), b"second".to_vec(), b"third".to_vec()]);
        assert_eq!(replayed[3].len(), SPARE_BATCH_BYTES + 1);
    }

    /// The writer and its commit thread run at the configured nice value.
    /// A positive one, which any process may take, so the test needs no
    /// privilege; the threads of other tests' logs run at 0.
    #[test]
    fn the_logs_threads_run_at_the_configured_nice_value() {
        let dir = tempfile::tempdir().unwrap();
        let (done_tx, done) = std::sync::mpsc::channel();
        let cfg = WalConfig { nice: 7, ..WalConfig::new(dir.path()) };
        let (w, handle) = Wal::start(cfg, 1, 0, move |batch, _| {
            for c in batch {
                done_tx.send(c.lsn).unwrap();
            }
        })
        .unwrap();
        w.submit(b"one".to_vec(), ()).unwrap();
        assert_eq!(done.recv().unwrap(), 1, "both threads have run");
        let nice_of = |name: &str| -> Vec<i64> {
            let mut found = Vec::new();
            for t in fs::read_dir("/proc/self/task").unwrap().flatten() {
                let comm = fs::read_to_string(t.path().join("comm")).unwrap_or_default();
                if comm.trim_end() == name {
                    let stat = fs::read_to_string(t.path().join("stat")).unwrap_or_default();
                    // Fields after the name: state is field 3, nice field 19.
                    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
                    found.push(fields[16].parse().unwrap());
                }
            }
            found
        };
        // Thread names are cut to 15 bytes: "stockd-wal-commit" reads "stockd-wal-comm".
        assert!(nice_of("stockd-wal").contains(&7), "writer: {:?}", nice_of("stockd-wal"));
        assert!(nice_of("stockd-wal-comm").contains(&7), "commit thread: {:?}", nice_of("stockd-wal-comm"));
        drop(w);
        handle.join().unwrap();
    }
}
