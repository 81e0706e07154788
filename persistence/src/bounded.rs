//! Writing a big file beside the log without stalling its fdatasync: the
//! file goes to the disk a chunk at a time as it is written (snapshot
//! files, log segments filled with zeros ahead of use).

use std::fs::File;
use std::io::Write;

/// A file is handed to the disk in chunks of this size as it is written.
const WRITEBACK_CHUNK: u64 = 1 << 20;

/// Appends to a file so that at most about two chunks of it wait to reach
/// the disk at any time: each chunk's writeback starts as soon as it is
/// written, and the one before it is waited for. A snapshot file is
/// hundreds of MB and shares the disk with the log: written at once and
/// then fsynced, its whole writeback queued ahead of the log's fdatasync
/// and durable orders waited tens of ms behind it (docs/architecture.md,
/// *Known stalls*). The writeback calls are hints: an error there (a
/// platform without them) is ignored, and the fsync that follows is what
/// makes the file durable and reports a failed write.
#[derive(Default)]
pub(crate) struct BoundedWriter {
    written: u64,
    started: u64,
    waited: u64,
}

impl BoundedWriter {
    pub(crate) fn write(&mut self, f: &mut File, bytes: &[u8]) -> std::io::Result<()> {
        for piece in bytes.chunks(WRITEBACK_CHUNK as usize) {
            f.write_all(piece)?;
            self.written += piece.len() as u64;
            if self.written - self.started >= WRITEBACK_CHUNK {
                writeback::start(f, self.started, self.written - self.started);
                writeback::wait(f, self.waited, self.started - self.waited);
                (self.waited, self.started) = (self.started, self.written);
            }
        }
        Ok(())
    }
}

#[cfg(target_os = "linux")]
mod writeback {
    use std::fs::File;
    use std::os::fd::AsRawFd;

    fn sync_file_range(f: &File, offset: u64, len: u64, flags: libc::c_uint) {
        if len > 0 {
            // SAFETY: a valid open descriptor; the call only starts or
            // awaits writeback of the file's own pages.
            unsafe { libc::sync_file_range(f.as_raw_fd(), offset as i64, len as i64, flags) };
        }
    }

    /// Starts writeback of the range without waiting for it.
    pub fn start(f: &File, offset: u64, len: u64) {
        sync_file_range(f, offset, len, libc::SYNC_FILE_RANGE_WRITE)
    }

    /// Waits until the range's writeback is done.
    pub fn wait(f: &File, offset: u64, len: u64) {
        let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        sync_file_range(f, offset, len, flags)
    }
}

/// Elsewhere the writeback is left to the final fsync.
#[cfg(not(target_os = "linux"))]
mod writeback {
    use std::fs::File;

    pub fn start(_: &File, _: u64, _: u64) {}

    pub fn wait(_: &File, _: u64, _: u64) {}
}
