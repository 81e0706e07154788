//! Durable storage for stockd: the write-ahead log with group commit
//! ([`wal`]), readers that follow it while it is written ([`tail`]), and
//! snapshot files with their manifest ([`snapshot`]).
//!
//! The payloads are opaque bytes here; the server defines what they mean.

use std::fmt;
use std::fs::File;
use std::path::Path;

mod bounded;
pub mod histogram;
mod prepare;
pub mod remove;
pub mod retention;
pub mod snapshot;
pub mod tail;
pub mod wal;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    Io(String),
    /// Data on disk that fails a check in a place a crash cannot explain.
    Corrupt(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(m) => write!(f, "I/O error: {m}"),
            Error::Corrupt(m) => write!(f, "corrupt data: {m}"),
        }
    }
}

impl std::error::Error for Error {}

/// fsyncs a directory, so that a created, renamed or removed entry survives a crash.
pub fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir).and_then(|f| f.sync_all()).map_err(|e| Error::io(dir, e))
}
