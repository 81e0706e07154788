//! Log segments filled with zeros ahead of use.
//!
//! An fdatasync after an append must also make the file's new size durable:
//! on ext4 that is a journal commit besides the data, on every group
//! commit. Overwriting blocks that already hold zeros on disk changes no
//! metadata, so the fdatasync writes the data alone: measured here with
//! 12 KB group commits, 110-166 us -> 60-83 us at the median, p99.9 541 ->
//! 147 us (docs/benchmarks.md, *The log writes into zeros*).
//! Space made with `fallocate` does not do it: its blocks are marked
//! unwritten, and the first write to each is a metadata change again.
//!
//! A thread writes each next segment's zeros in the background, a chunk
//! at a time so that the log's own fdatasync never waits behind much of
//! them ([`BoundedWriter`]), and paced: at twice the rate the log grew
//! since the last segment was begun, and at least [`MIN_PACE`]. Written as
//! fast as the disk takes them, 64 MiB of zeros held fdatasyncs beside
//! them up to 3.5 ms here (20 of them over 1.5 ms in 60 ms); at 100 MiB/s,
//! up to 1.7 ms (3 in 0.7 s). It fsyncs the file and hands it over as
//! `wal-{seq}.prep`; the writer renames it to the segment's name when it
//! starts that segment. One is prepared ahead at a time. `*.prep` files
//! are not segments: readers never list them, and the next start deletes
//! any a crash left.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver};

use crate::bounded::BoundedWriter;
use crate::remove::remove_gently;
use crate::tail::Durable;
use crate::Error;

const SUFFIX: &str = ".prep";
/// The first segment prepared after a start; each next one is twice as
/// large, up to the configured segment size: a server that logs little
/// (a test, a quiet shop) writes few zeros, a busy one soon gets whole
/// segments.
const FIRST_LEN: u64 = 1 << 20;
/// The slowest zeros are written: 64 MiB in two seconds.
const MIN_PACE: f64 = (32 << 20) as f64;
/// Longest sleep between checks of the stop flag.
const NAP: Duration = Duration::from_millis(20);
/// Zeros written per call. Small on purpose: a 1 MiB buffer cost the
/// server 1 MiB of RSS (allocated, it came from the thread's malloc arena
/// and was zeroed by hand: +1.9 bytes per row at 1 M rows in
/// `scripts/memory.py`; as a static, it is 1 MiB of the binary, read in).
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// A segment file of `len` zero bytes, durable, not yet named as a segment.
pub(crate) struct Prepared {
    pub file: File,
    pub path: PathBuf,
    pub len: u64,
}

/// The thread that prepares the next segment. Dropping it stops the thread
/// and deletes the files it made and nobody took.
pub(crate) struct Preparer {
    ready: Option<Receiver<Prepared>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Preparer {
    /// Deletes the `*.prep` files an earlier run left in `dir` and starts
    /// preparing segments, one ahead, of up to `max_len` bytes, at a pace
    /// set by how fast `durable` moves.
    pub fn start(dir: &Path, max_len: u64, durable: Arc<Durable>) -> Result<Preparer, Error> {
        remove_leftovers(dir)?;
        // A rendezvous: the thread holds the one prepared file until the
        // writer takes it, and only then prepares the next.
        let (tx, rx) = channel::bounded::<Prepared>(0);
        let stop = Arc::new(AtomicBool::new(false));
        let (dir, halt) = (dir.to_path_buf(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("stockd-wal-prep".into())
            .spawn(move || {
                // When the last segment was begun, and the log's bytes then.
                let mut last: Option<(Instant, u64)> = None;
                // The pause before trying again after a failure (a full disk).
                let mut retry = RETRY_MIN;
                let mut seq = 0u64;
                loop {
                    let len = (FIRST_LEN << seq.min(32)).min(max_len);
                    let path = dir.join(format!("wal-{seq:020}{SUFFIX}"));
                    let now = (Instant::now(), durable.bytes());
                    let pace = last.map_or(MIN_PACE, |(at, bytes)| {
                        let secs = now.0.duration_since(at).as_secs_f64().max(1e-3);
                        (2.0 * (now.1 - bytes) as f64 / secs).max(MIN_PACE)
                    });
                    last = Some(now);
                    // A segment is prepared only where it leaves as much room
                    // again: near a full disk the writer's appends need it more.
                    let room = free_bytes(&dir).and_then(|free| {
                        if free >= 2 * len {
                            Ok(())
                        } else {
                            Err(Error::Io(format!("{}: {free} bytes free, too few to lay down {len}", dir.display())))
                        }
                    });
                    let made = match room.and_then(|()| zero_file(&path, len, pace, &halt)) {
                        Ok(Some(file)) => Prepared { file, path, len },
                        Ok(None) => break, // stopped half-way
                        Err(e) => {
                            // The writer appends to plain segments meanwhile
                            // (reserving their room as it goes, `Writer::reserve`).
                            if retry == RETRY_MIN {
                                tracing::warn!(error = %e, "cannot prepare a log segment; appending instead, and trying again");
                            }
                            let _ = remove_gently(&path);
                            if !pause(retry, &halt) {
                                break;
                            }
                            retry = (retry * 2).min(RETRY_MAX);
                            continue;
                        }
                    };
                    if retry != RETRY_MIN {
                        tracing::info!("log segments are prepared again");
                        retry = RETRY_MIN;
                    }
                    seq += 1;
                    // Waits until the writer takes it; fails once the writer is gone.
                    if let Err(unsent) = tx.send(made) {
                        let _ = remove_gently(&unsent.0.path);
                        break;
                    }
                }
            })
            .map_err(|e| Error::io(Path::new("<thread>"), e))?;
        Ok(Preparer { ready: Some(rx), stop, thread: Some(thread) })
    }

    /// The next prepared segment, if it is ready.
    pub fn take(&self) -> Option<Prepared> {
        self.ready.as_ref()?.try_recv().ok()
    }
}

impl Drop for Preparer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(rx) = self.ready.take() {
            for unused in rx.try_iter() {
                let _ = remove_gently(&unused.path);
            }
            // Dropping the receiver fails the thread's next send: it deletes
            // that file and ends.
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The preparer's pauses after a failure: it tries again, soon at first.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Bytes an unprivileged writer may still use on the file system of `dir`.
fn free_bytes(dir: &Path) -> Result<u64, Error> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|e| Error::Io(e.to_string()))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: a NUL-terminated path and a buffer of the size statvfs fills.
    if unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) } != 0 {
        return Err(Error::io(dir, std::io::Error::last_os_error()));
    }
    // SAFETY: statvfs returned 0, so it filled the buffer.
    let st = unsafe { st.assume_init() };
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Sleeps for `d` unless `stop` is set first; false if it was.
fn pause(d: Duration, stop: &AtomicBool) -> bool {
    let until = Instant::now() + d;
    while Instant::now() < until {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        std::thread::sleep(NAP.min(until.saturating_duration_since(Instant::now())));
    }
    !stop.load(Ordering::Relaxed)
}

/// Writes `len` zero bytes to a new file at `path`, at most `pace` bytes a
/// second, and fsyncs it; `None` (the file deleted) if `stop` was set on
/// the way.
fn zero_file(path: &Path, len: u64, pace: f64, stop: &AtomicBool) -> Result<Option<File>, Error> {
    let io = |e| Error::io(path, e);
    let mut file = OpenOptions::new().create(true).truncate(true).write(true).open(path).map_err(io)?;
    let (mut writer, mut done, began) = (BoundedWriter::default(), 0u64, Instant::now());
    while done < len {
        let due = began + Duration::from_secs_f64(done as f64 / pace);
        let now = Instant::now();
        if now < due {
            std::thread::sleep((due - now).min(NAP));
        }
        if stop.load(Ordering::Relaxed) {
            drop(file);
            remove_gently(path)?;
            return Ok(None);
        }
        if Instant::now() < due {
            continue;
        }
        let n = (len - done).min(ZEROS.len() as u64) as usize;
        writer.write(&mut file, &ZEROS[..n]).map_err(io)?;
        done += n as u64;
    }
    file.sync_all().map_err(io)?;
    Ok(Some(file))
}

/// Deletes every `*.prep` file in `dir`: half-made or unused segments of
/// an earlier run (a few MiB at a time, like every big file here).
fn remove_leftovers(dir: &Path) -> Result<(), Error> {
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        if entry.file_name().to_str().is_some_and(|n| n.starts_with("wal-") && n.ends_with(SUFFIX)) {
            remove_gently(&entry.path())?;
        }
    }
    Ok(())
}
