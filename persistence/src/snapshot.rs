//! Snapshot files and the manifest that names the current set.
//!
//! A snapshot set is one file per shard, all taken at the same LSN:
//! `snap-{lsn:020}-{shard}.bin`. A set becomes current only when
//! `MANIFEST` names it; the manifest is replaced atomically (write a
//! temporary file, fsync, rename, fsync the directory), so a crash leaves
//! either the old set or the new one, never a mix.
//!
//! Snapshot file: `b"STKSNAP1"`, u64 lsn, u32 shard, u32 shard_count,
//! u64 payload_len, payload, u32 crc32c of everything before it.
//! Manifest: `b"STKMANI1"`, u64 lsn, u32 shard_count, u32 crc32c.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::Path;

use crate::bounded::BoundedWriter;
use crate::remove::remove_gently;
use crate::{sync_dir, Error};

const SNAP_MAGIC: &[u8; 8] = b"STKSNAP1";
const MANIFEST_MAGIC: &[u8; 8] = b"STKMANI1";
pub const MANIFEST: &str = "MANIFEST";

pub fn snapshot_name(lsn: u64, shard: u32) -> String {
    format!("snap-{lsn:020}-{shard}.bin")
}

/// Writes a small file (a manifest, a cursor, the server id) to
/// `dir/name` so that after return it survives a crash: temporary file,
/// fsync, rename, directory fsync.
pub fn write_durably(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), Error> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(|e| Error::io(&tmp, e))?;
    publish(dir, &tmp, name)
}

/// Gives a fsynced temporary file its name, durably.
fn publish(dir: &Path, tmp: &Path, name: &str) -> Result<(), Error> {
    let dst = dir.join(name);
    fs::rename(tmp, &dst).map_err(|e| Error::io(&dst, e))?;
    sync_dir(dir)
}

fn read_all(path: &Path) -> Result<Vec<u8>, Error> {
    let mut data = Vec::new();
    File::open(path).and_then(|mut f| f.read_to_end(&mut data)).map_err(|e| Error::io(path, e))?;
    Ok(data)
}

/// Writes one shard's snapshot file around its payload, durably.
pub fn write_snapshot(
    dir: &Path,
    lsn: u64,
    shard: u32,
    shard_count: u32,
    payload: &[u8],
) -> Result<(), Error> {
    let mut w = SnapshotWriter::create(dir, lsn, shard, shard_count)?;
    w.append(payload)?;
    w.finish()
}

/// Writes one shard's snapshot file as its payload arrives piece by piece
/// (a snapshot of millions of ids is hundreds of MB: the shard hands it
/// over a few MB at a time instead of holding all of it), into a
/// temporary file that [`SnapshotWriter::finish`] makes durable and names.
/// Dropped unfinished, it leaves the temporary file (a crash would too);
/// the next snapshot of the same LSN and shard, if any, truncates it.
pub struct SnapshotWriter {
    dir: std::path::PathBuf,
    name: String,
    tmp: std::path::PathBuf,
    /// Given its name: the file is no longer ours to remove.
    published: bool,
    file: File,
    writer: BoundedWriter,
    header: [u8; 32],
    payload_len: u64,
    payload_crc: u32,
}

impl SnapshotWriter {
    /// Starts the file with its header; the payload length goes in at the end.
    pub fn create(dir: &Path, lsn: u64, shard: u32, shard_count: u32) -> Result<SnapshotWriter, Error> {
        let name = snapshot_name(lsn, shard);
        let tmp = dir.join(format!("{name}.tmp"));
        let mut file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut header = [0u8; 32];
        header[..8].copy_from_slice(SNAP_MAGIC);
        header[8..16].copy_from_slice(&lsn.to_le_bytes());
        header[16..20].copy_from_slice(&shard.to_le_bytes());
        header[20..24].copy_from_slice(&shard_count.to_le_bytes());
        let mut writer = BoundedWriter::default();
        writer.write(&mut file, &header).map_err(|e| Error::io(&tmp, e))?;
        let dir = dir.to_path_buf();
        Ok(SnapshotWriter {
            dir,
            name,
            tmp,
            published: false,
            file,
            writer,
            header,
            payload_len: 0,
            payload_crc: 0,
        })
    }

    /// Appends the next piece of the payload.
    pub fn append(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.writer.write(&mut self.file, bytes).map_err(|e| Error::io(&self.tmp, e))?;
        self.payload_crc = crc32c::crc32c_append(self.payload_crc, bytes);
        self.payload_len += bytes.len() as u64;
        Ok(())
    }

    /// Puts the payload length into the header and the checksum after the
    /// payload, fsyncs, and gives the file its name: after return it
    /// survives a crash.
    pub fn finish(mut self) -> Result<(), Error> {
        use std::os::unix::fs::FileExt;
        self.header[24..32].copy_from_slice(&self.payload_len.to_le_bytes());
        let sum =
            crc32c::crc32c_combine(crc32c::crc32c(&self.header), self.payload_crc, self.payload_len as usize);
        let io = |e| Error::io(&self.tmp, e);
        self.writer.write(&mut self.file, &sum.to_le_bytes()).map_err(io)?;
        self.file.write_all_at(&self.header[24..32], 24).map_err(io)?;
        self.file.sync_all().map_err(io)?;
        publish(&self.dir, &self.tmp, &self.name)?;
        self.published = true;
        Ok(())
    }
}

/// A part that failed (a full disk, say) or was given up is removed at
/// once: its room is what a full disk needs back, and no snapshot set will
/// name it.
impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        if !self.published {
            let _ = remove_gently(&self.tmp);
        }
    }
}

/// Removes the parts of the snapshot set at `lsn` that were written, for a
/// set no manifest will name (one of its parts failed).
pub fn remove_set(dir: &Path, lsn: u64, shard_count: u32) {
    for shard in 0..shard_count {
        let path = dir.join(snapshot_name(lsn, shard));
        if path.exists() {
            let _ = remove_gently(&path);
        }
    }
}

/// Reads and checks one snapshot file; returns its payload.
pub fn read_snapshot(dir: &Path, lsn: u64, shard: u32, shard_count: u32) -> Result<Vec<u8>, Error> {
    let path = dir.join(snapshot_name(lsn, shard));
    let data = read_all(&path)?;
    let bad = |why: &str| Error::Corrupt(format!("{}: {why}", path.display()));
    if data.len() < 36 || &data[..8] != SNAP_MAGIC {
        return Err(bad("not a snapshot file"));
    }
    let (body, sum) = data.split_at(data.len() - 4);
    if crc32c::crc32c(body) != u32::from_le_bytes(sum.try_into().unwrap()) {
        return Err(bad("checksum mismatch"));
    }
    let f_lsn = u64::from_le_bytes(body[8..16].try_into().unwrap());
    let f_shard = u32::from_le_bytes(body[16..20].try_into().unwrap());
    let f_count = u32::from_le_bytes(body[20..24].try_into().unwrap());
    let len = u64::from_le_bytes(body[24..32].try_into().unwrap()) as usize;
    if (f_lsn, f_shard, f_count) != (lsn, shard, shard_count) || len != body.len() - 32 {
        return Err(bad("header does not match the manifest"));
    }
    Ok(body[32..].to_vec())
}

/// The current snapshot set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub lsn: u64,
    pub shard_count: u32,
}

pub fn read_manifest(dir: &Path) -> Result<Option<Manifest>, Error> {
    let path = dir.join(MANIFEST);
    if !path.exists() {
        return Ok(None);
    }
    let data = read_all(&path)?;
    if data.len() != 24 || &data[..8] != MANIFEST_MAGIC {
        return Err(Error::Corrupt(format!("{}: not a manifest", path.display())));
    }
    if crc32c::crc32c(&data[..20]) != u32::from_le_bytes(data[20..24].try_into().unwrap()) {
        return Err(Error::Corrupt(format!("{}: checksum mismatch", path.display())));
    }
    Ok(Some(Manifest {
        lsn: u64::from_le_bytes(data[8..16].try_into().unwrap()),
        shard_count: u32::from_le_bytes(data[16..20].try_into().unwrap()),
    }))
}

/// Makes a fully written snapshot set current, then removes older snapshot files.
pub fn commit_manifest(dir: &Path, m: Manifest) -> Result<(), Error> {
    let mut out = Vec::with_capacity(24);
    out.extend_from_slice(MANIFEST_MAGIC);
    out.extend_from_slice(&m.lsn.to_le_bytes());
    out.extend_from_slice(&m.shard_count.to_le_bytes());
    let sum = crc32c::crc32c(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    write_durably(dir, MANIFEST, &out)?;
    let keep = format!("snap-{:020}-", m.lsn);
    let old: Vec<_> = fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with("snap-") && !n.starts_with(&keep)))
        .map(|e| e.path())
        .collect();
    for path in old {
        let _ = remove_gently(&path); // a leftover is removed after the next snapshot
    }
    Ok(())
}
