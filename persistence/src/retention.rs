//! Which log segments may go: those wholly behind the snapshot and behind
//! every reader that still needs the log (each enabled sink's cursor).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::wal::delete_segments_through;
use crate::Error;

/// Marks below which records are no longer needed; deletes segments behind all of them.
pub struct Retention {
    dir: PathBuf,
    snapshot_lsn: AtomicU64,
    /// One mark per reader: records at or below it may go.
    holds: Mutex<Vec<Arc<AtomicU64>>>,
}

impl Retention {
    /// `snapshot_lsn`: the LSN of the current snapshot set (0: none).
    pub fn new(dir: impl Into<PathBuf>, snapshot_lsn: u64) -> Retention {
        Retention {
            dir: dir.into(),
            snapshot_lsn: AtomicU64::new(snapshot_lsn),
            holds: Mutex::new(Vec::new()),
        }
    }

    /// Adds a reader that needs every record above `lsn`; it moves the mark
    /// forward with `store` as it goes.
    pub fn hold(&self, lsn: u64) -> Arc<AtomicU64> {
        let mark = Arc::new(AtomicU64::new(lsn));
        self.holds.lock().unwrap_or_else(|p| p.into_inner()).push(mark.clone());
        mark
    }

    /// The highest LSN whose records are no longer needed by anyone.
    pub fn deletable_through(&self) -> u64 {
        let holds = self.holds.lock().unwrap_or_else(|p| p.into_inner());
        let readers = holds.iter().map(|h| h.load(Ordering::Acquire)).min().unwrap_or(u64::MAX);
        self.snapshot_lsn.load(Ordering::Acquire).min(readers)
    }

    /// A new snapshot set covers everything through `lsn`.
    pub fn snapshot_taken(&self, lsn: u64) {
        self.snapshot_lsn.fetch_max(lsn, Ordering::AcqRel);
    }

    /// Deletes the segments nobody needs; returns how many. One caller at a time.
    pub fn collect(&self) -> Result<usize, Error> {
        let holds = self.holds.lock().unwrap_or_else(|p| p.into_inner());
        let readers = holds.iter().map(|h| h.load(Ordering::Acquire)).min().unwrap_or(u64::MAX);
        let through = self.snapshot_lsn.load(Ordering::Acquire).min(readers);
        // Still holding the lock: two collectors must not delete the same file.
        delete_segments_through(&self.dir, through)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::{list_segments, write_one};

    #[test]
    fn keeps_segments_a_reader_needs_until_it_moves_on() {
        let dir = tempfile::tempdir().unwrap();
        let mut lsn = 1;
        for _ in 0..6 {
            lsn = write_one(dir.path(), lsn, 0, b"x").unwrap(); // one segment per record
        }
        let r = Retention::new(dir.path(), 0);
        let reader = r.hold(2);
        r.snapshot_taken(5);
        assert_eq!(r.deletable_through(), 2);
        assert_eq!(r.collect().unwrap(), 2, "records 1 and 2 are behind both");
        reader.store(4, Ordering::Release);
        assert_eq!(r.collect().unwrap(), 2);
        reader.store(10, Ordering::Release);
        assert_eq!(r.collect().unwrap(), 1, "the snapshot at 5 still needs 6");
        let left: Vec<u64> = list_segments(dir.path()).unwrap().iter().map(|(l, _)| *l).collect();
        assert_eq!(left, vec![6]);
    }
}
