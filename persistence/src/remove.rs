//! Deleting big files (old snapshot files, log segments behind a snapshot)
//! without stalling the log's fdatasync on the same disk.
//!
//! Freeing a file of tens of MB is one long filesystem transaction (and,
//! with online discard, one long trim) that every fsync on the disk waits
//! behind: on ext4 here, unlinking an 80 MB file took 97 ms and an
//! fdatasync running beside it waited up to 74 ms. Cut from the end a few
//! MiB at a time, each cut made durable on its own, the same file took
//! 117 ms and the other fdatasync waited at most 7 ms.
//!
//! The file is first renamed to `<name>.deleting`, so a crash half-way
//! leaves no cut file under a name that counts (a log segment cut in the
//! middle of a record would read as corrupt); [`remove_leftovers`] finishes
//! such files.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};

use crate::{sync_dir, Error};

/// Suffix of a file being deleted.
pub const DELETING: &str = ".deleting";
/// Bytes freed per durable cut.
const CUT_BYTES: u64 = 4 << 20;

/// Deletes `path` a few MiB at a time. Returns once it is gone.
pub fn remove_gently(path: &Path) -> Result<(), Error> {
    let doomed = doomed_name(path);
    if doomed != path {
        fs::rename(path, &doomed).map_err(|e| Error::io(path, e))?;
        if let Some(dir) = path.parent() {
            sync_dir(dir)?;
        }
    }
    cut_and_unlink(&doomed)
}

/// Finishes the deletion of every `{prefix}*.deleting` file in `dir` (left
/// by a crash); returns how many there were. Each kind of file is finished
/// by the one thread that deletes its kind (log segments: the collector of
/// `retention.rs`; snapshot files: the snapshot thread, which removes every
/// `snap-` file that is not current).
pub fn remove_leftovers(dir: &Path, prefix: &str) -> Result<usize, Error> {
    let mut removed = 0;
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        if name.to_str().is_some_and(|n| n.starts_with(prefix) && n.ends_with(DELETING)) {
            let path = entry.path();
            cut_and_unlink(&path)?;
            removed += 1;
        }
    }
    Ok(removed)
}

fn doomed_name(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    if !path.to_str().is_some_and(|p| p.ends_with(DELETING)) {
        name.push(DELETING);
    }
    PathBuf::from(name)
}

/// Cuts and unlinks `path`; one already gone counts as done.
fn cut_and_unlink(path: &Path) -> Result<(), Error> {
    let io = |e| Error::io(path, e);
    let f = match OpenOptions::new().write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(e)),
    };
    let mut len = f.metadata().map_err(io)?.len();
    while len > CUT_BYTES {
        len -= CUT_BYTES;
        f.set_len(len).and_then(|_| f.sync_data()).map_err(io)?;
    }
    drop(f);
    fs::remove_file(path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_cut_and_removed_and_a_leftover_is_finished() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("wal-00000000000000000001.log");
        fs::write(&big, vec![7u8; (CUT_BYTES * 2 + 5) as usize]).unwrap();
        remove_gently(&big).unwrap();
        assert!(
            fs::read_dir(dir.path()).unwrap().next().is_none(),
            "nothing left, not even the renamed file"
        );

        // A crash after the rename and a cut: the next collector of that
        // kind of file finishes it, and leaves other kinds alone.
        fs::write(dir.path().join(format!("wal-00000000000000000002.log{DELETING}")), vec![1u8; 100])
            .unwrap();
        fs::write(dir.path().join(format!("snap-1-0.bin{DELETING}")), vec![1u8; 100]).unwrap();
        fs::write(dir.path().join("keep"), b"x").unwrap();
        assert_eq!(remove_leftovers(dir.path(), "wal-").unwrap(), 1);
        let mut names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, vec![std::ffi::OsString::from("keep"), format!("snap-1-0.bin{DELETING}").into()]);
        // A doomed file already gone counts as done; a file never there is an error.
        assert!(cut_and_unlink(&dir.path().join(format!("gone{DELETING}"))).is_ok());
        let err = remove_gently(&dir.path().join("never-there")).unwrap_err();
        assert!(err.to_string().contains("never-there"), "{err}");
    }
}
