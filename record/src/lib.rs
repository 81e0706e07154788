//! stockd's log records: what each write-ahead log record's payload means.
//!
//! The log (crate `stockd-persistence`) stores opaque payloads with an LSN
//! and a timestamp; this crate says what is in them. Every consumer of the
//! log decodes with it: recovery, the `stockd-log` reader, and the sinks that
//! stream the log downstream. It does no I/O, and [`LogRecord::decode`]
//! answers any bytes with a record or an error, never a panic.
//!
//! The format is documented field by field in `docs/log-format.md`:
//!
//! ```text
//! u8 format (0x81: version 1)  u8 kind  kind's fields
//! ```
//!
//! Payloads written before records were versioned start with the kind
//! itself (1-8); they are read as version 1 without the format byte.

use stockd_protocol::{Key, Line, Lines, Reader};

/// First byte of a version-1 payload. The high bit tells it from the kinds
/// (1-8) that unversioned payloads start with.
pub const FORMAT_V1: u8 = 0x81;

/// A kind of record, as stored.
pub mod kind {
    pub const ORDER: u8 = 1;
    pub const INBOUND: u8 = 2;
    pub const CANCEL: u8 = 3;
    pub const RESERVE: u8 = 4;
    pub const CONFIRM: u8 = 5;
    pub const RELEASE: u8 = 6;
    pub const ADJUST: u8 = 7;
    pub const LAYOUT: u8 = 8;
}

/// Most lines one record carries (the line count is a u16).
pub const MAX_RECORD_LINES: usize = u16::MAX as usize;

/// A log record's payload: a mutation, or the shard layout that the records
/// after it were applied under.
///
/// Which ids a shard forgets depends on which ids it owns, so replay must
/// use the layout the live server used. A server that starts with another
/// shard count than the log's last layout logs a `Layout` record before it
/// serves; replay regroups its stores at that record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogRecord {
    Mutation(Mutation),
    Layout { shards: u16 },
}

/// The kinds of mutation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Order {
        id: u64,
    },
    Inbound {
        id: u64,
    },
    Cancel {
        id: u64,
    },
    Reserve {
        id: u64,
        ttl_ms: u32,
    },
    Confirm {
        id: u64,
    },
    /// `expired`: released by the server when the hold's deadline passed.
    Release {
        id: u64,
        expired: bool,
    },
    /// A stock-take: on hand went from `before` to `after`.
    Adjust {
        before: u64,
        after: u64,
        reason: u16,
    },
}

/// One mutation: what happened and the lines it touched. For cancel,
/// confirm and release the lines are those of the original order or hold,
/// so that every shard can apply the record without asking another. An
/// adjust has one line (quantity 0) naming its row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mutation {
    pub op: Op,
    pub lines: Lines,
}

/// How one line changes its row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delta {
    pub key: Key,
    /// Change of on hand, in units.
    pub on_hand: i64,
    /// Change of held, in units.
    pub held: i64,
}

impl Mutation {
    /// The id that decides which shard coordinates this mutation (an adjust: its item).
    pub fn owner_id(&self) -> u64 {
        match self.op {
            Op::Order { id }
            | Op::Inbound { id }
            | Op::Cancel { id }
            | Op::Reserve { id, .. }
            | Op::Confirm { id }
            | Op::Release { id, .. } => id,
            Op::Adjust { .. } => self.lines.first().map_or(0, |l| l.key.item),
        }
    }

    /// What every line does to its row.
    pub fn deltas(&self) -> impl Iterator<Item = Delta> + '_ {
        self.lines.iter().map(move |l| {
            let q = l.qty as i64;
            let (on_hand, held) = match self.op {
                Op::Order { .. } => (-q, 0),
                Op::Inbound { .. } | Op::Cancel { .. } => (q, 0),
                Op::Reserve { .. } => (0, q),
                Op::Confirm { .. } => (-q, -q),
                Op::Release { .. } => (0, -q),
                Op::Adjust { before, after, .. } => (after as i64 - before as i64, 0),
            };
            Delta { key: l.key, on_hand, held }
        })
    }

    fn kind(&self) -> (u8, u64) {
        match self.op {
            Op::Order { id } => (kind::ORDER, id),
            Op::Inbound { id } => (kind::INBOUND, id),
            Op::Cancel { id } => (kind::CANCEL, id),
            Op::Reserve { id, .. } => (kind::RESERVE, id),
            Op::Confirm { id } => (kind::CONFIRM, id),
            Op::Release { id, .. } => (kind::RELEASE, id),
            Op::Adjust { .. } => (kind::ADJUST, 0),
        }
    }

    /// Appends this mutation's payload (version 1) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        assert!(self.lines.len() <= MAX_RECORD_LINES, "invariant: a record's lines fit its u16 count");
        let (kind, id) = self.kind();
        out.push(FORMAT_V1);
        out.push(kind);
        out.extend_from_slice(&id.to_le_bytes());
        match self.op {
            Op::Reserve { ttl_ms, .. } => out.extend_from_slice(&ttl_ms.to_le_bytes()),
            Op::Release { expired, .. } => out.push(expired as u8),
            Op::Adjust { before, after, reason } => {
                out.extend_from_slice(&before.to_le_bytes());
                out.extend_from_slice(&after.to_le_bytes());
                out.extend_from_slice(&reason.to_le_bytes());
            }
            _ => {}
        }
        out.extend_from_slice(&(self.lines.len() as u16).to_le_bytes());
        for l in &self.lines {
            out.extend_from_slice(&l.key.item.to_le_bytes());
            out.extend_from_slice(&l.key.fc.to_le_bytes());
            out.extend_from_slice(&l.qty.to_le_bytes());
        }
    }
}

impl LogRecord {
    /// The payload of a `Layout` record (version 1).
    pub fn layout(shards: u16) -> Vec<u8> {
        let mut out = vec![FORMAT_V1, kind::LAYOUT];
        out.extend_from_slice(&shards.to_le_bytes());
        out
    }

    /// The payload of this record (version 1).
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            LogRecord::Mutation(m) => m.encode(out),
            LogRecord::Layout { shards } => out.extend_from_slice(&LogRecord::layout(*shards)),
        }
    }

    /// Reads one payload. Any bytes give a record or an error naming what is wrong.
    pub fn decode(buf: &[u8]) -> Result<LogRecord, String> {
        let body = match buf.first() {
            None => return Err("empty record".into()),
            Some(&FORMAT_V1) => &buf[1..],
            Some(&k) if (kind::ORDER..=kind::LAYOUT).contains(&k) => buf, // unversioned: as version 1
            Some(&f) => return Err(format!("record format {f:#04x} is not one this build reads")),
        };
        decode_v1(body).map_err(|e| e.0)
    }
}

fn decode_v1(body: &[u8]) -> Result<LogRecord, stockd_protocol::DecodeError> {
    let mut r = Reader::new(body);
    let kind = r.u8("kind")?;
    if kind == kind::LAYOUT {
        let shards = r.u16("shards")?;
        r.finish()?;
        if shards == 0 {
            return Err(stockd_protocol::DecodeError("layout record with 0 shards".into()));
        }
        return Ok(LogRecord::Layout { shards });
    }
    let id = r.u64("id")?;
    let op = match kind {
        kind::ORDER => Op::Order { id },
        kind::INBOUND => Op::Inbound { id },
        kind::CANCEL => Op::Cancel { id },
        kind::RESERVE => Op::Reserve { id, ttl_ms: r.u32("ttl_ms")? },
        kind::CONFIRM => Op::Confirm { id },
        kind::RELEASE => Op::Release { id, expired: r.u8("expired")? != 0 },
        kind::ADJUST => {
            Op::Adjust { before: r.u64("before")?, after: r.u64("after")?, reason: r.u16("reason")? }
        }
        k => return Err(stockd_protocol::DecodeError(format!("unknown record kind {k}"))),
    };
    let n = r.u16("line count")? as usize;
    if r.remaining() != n * 16 {
        return Err(stockd_protocol::DecodeError(format!(
            "{n} lines need {} bytes, the record has {}",
            n * 16,
            r.remaining()
        )));
    }
    let mut lines = Lines::with_capacity(n);
    for _ in 0..n {
        let key = r.key()?;
        lines.push(Line { key, qty: r.u32("qty")? });
    }
    if matches!(op, Op::Adjust { .. }) && lines.len() != 1 {
        return Err(stockd_protocol::DecodeError("an adjust record names exactly one row".into()));
    }
    Ok(LogRecord::Mutation(Mutation { op, lines }))
}

#[cfg(test)]
mod tests;
