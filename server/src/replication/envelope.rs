//! A message of the replication topic: a run of log records with the epoch
//! of the primary that wrote them, a promotion, or a primary's heartbeat.
//! Byte by byte in docs/ha.md:
//!
//! ```text
//! u8  version (1)   u8 kind (1 data, 2 promote, 3 heartbeat)
//! u64 epoch         u64 lsn   u64 ts_ms   u64 node (server id of the writer)
//! data: records at lsn, lsn + 1, ...: each u32 length, then the log record's payload
//! promote: the promoter's client address (UTF-8)
//! ```
//!
//! One data message carries the records of a group commit (up to
//! [`MAX_DATA_BYTES`]), so the broker and every reader handle one message
//! per fsync, not one per mutation. Kafka checksums its batches, so there is
//! no checksum here. Decoding answers any bytes with a message or an error,
//! never a panic.

pub const VERSION: u8 = 1;
const HEADER: usize = 2 + 4 * 8;
/// A data message holds records up to about this many bytes (a record is at
/// most about 4 KiB, so a message stays far below Kafka's 1 MB default).
pub const MAX_DATA_BYTES: usize = 256 << 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Log records from `lsn` on, written by the primary of `epoch`.
    Data,
    /// `node` asks to be the primary of `epoch`; `lsn` is the last record it had applied.
    Promote,
    /// The primary of `epoch` is alive; `lsn` is its last record.
    Heartbeat,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope<'a> {
    pub kind: Kind,
    pub epoch: u64,
    pub lsn: u64,
    pub ts_ms: u64,
    pub node: u64,
    /// Data: the framed records. Promote: the promoter's address. Heartbeat: empty.
    pub body: &'a [u8],
}

/// Frames one record for a data message's body.
pub fn push_record(body: &mut Vec<u8>, payload: &[u8]) {
    body.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    body.extend_from_slice(payload);
}

/// The records of a data body, checked whole.
fn split_records(mut body: &[u8]) -> Result<Vec<&[u8]>, String> {
    let mut out = Vec::new();
    while !body.is_empty() {
        let Some(len) = body.get(..4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
        else {
            return Err("a record length cut short".into());
        };
        let Some(payload) = body.get(4..4 + len).filter(|p| !p.is_empty()) else {
            return Err(format!("a record of {len} bytes where {} remain", body.len() - 4));
        };
        out.push(payload);
        body = &body[4 + len..];
    }
    if out.is_empty() {
        return Err("a data message without a record".into());
    }
    Ok(out)
}

impl<'a> Envelope<'a> {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(VERSION);
        out.push(match self.kind {
            Kind::Data => 1,
            Kind::Promote => 2,
            Kind::Heartbeat => 3,
        });
        for v in [self.epoch, self.lsn, self.ts_ms, self.node] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(self.body);
    }

    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + self.body.len());
        self.encode(&mut out);
        out
    }

    /// A message and, for data, its records (record i is at LSN `lsn + i`).
    pub fn decode(buf: &'a [u8]) -> Result<(Envelope<'a>, Vec<&'a [u8]>), String> {
        if buf.len() < HEADER {
            return Err(format!("{} bytes, a replication message has at least {HEADER}", buf.len()));
        }
        if buf[0] != VERSION {
            return Err(format!("replication message version {} is not one this build reads", buf[0]));
        }
        let kind = match buf[1] {
            1 => Kind::Data,
            2 => Kind::Promote,
            3 => Kind::Heartbeat,
            k => return Err(format!("unknown replication message kind {k}")),
        };
        let u = |i: usize| u64::from_le_bytes(buf[2 + 8 * i..10 + 8 * i].try_into().expect("8 bytes"));
        let body = &buf[HEADER..];
        let records = if kind == Kind::Data { split_records(body)? } else { Vec::new() };
        let e = Envelope { kind, epoch: u(0), lsn: u(1), ts_ms: u(2), node: u(3), body };
        if kind == Kind::Data && (e.lsn == 0 || e.lsn.checked_add(records.len() as u64).is_none()) {
            return Err(format!("records from LSN {} do not fit the LSN range", e.lsn));
        }
        Ok((e, records))
    }
}

/// Data messages for consecutive records `(lsn, ts_ms, payload)` of one
/// timestamp, each up to [`MAX_DATA_BYTES`]: `(first lsn, last lsn, message)`.
pub fn data_messages<'r>(
    epoch: u64,
    node: u64,
    records: impl IntoIterator<Item = (u64, u64, &'r [u8])>,
) -> Vec<(u64, u64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut body = Vec::new();
    let mut run: Option<(u64, u64, u64)> = None; // first, last, ts
    let mut flush = |body: &mut Vec<u8>, run: &mut Option<(u64, u64, u64)>| {
        if let Some((first, last, ts_ms)) = run.take() {
            let env = Envelope { kind: Kind::Data, epoch, lsn: first, ts_ms, node, body };
            out.push((first, last, env.to_vec()));
            body.clear();
        }
    };
    for (lsn, ts_ms, payload) in records {
        // A run shares one timestamp (a group commit's), which readers log it with.
        let follows = run.is_some_and(|(_, last, ts)| last + 1 == lsn && ts == ts_ms);
        if !follows || body.len() + 4 + payload.len() > MAX_DATA_BYTES {
            flush(&mut body, &mut run);
        }
        push_record(&mut body, payload);
        run = Some(match run {
            Some((first, _, ts)) => (first, lsn, ts),
            None => (lsn, lsn, ts_ms),
        });
    }
    flush(&mut body, &mut run);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bad_input() {
        let msgs = data_messages(3, 5, [(77, 9, &b"rec"[..]), (78, 9, b"ord")]);
        assert_eq!(msgs.len(), 1);
        let (first, last, bytes) = &msgs[0];
        assert_eq!((*first, *last), (77, 78));
        let (e, records) = Envelope::decode(bytes).unwrap();
        assert_eq!((e.kind, e.epoch, e.lsn, e.ts_ms, e.node), (Kind::Data, 3, 77, 9, 5));
        assert_eq!(records, vec![&b"rec"[..], b"ord"]);
        // Framed by Kafka: a cut inside the header, a length or a record is an
        // error; a cut between records leaves a shorter run.
        let boundary = HEADER + 4 + 3;
        for cut in 0..bytes.len() {
            match Envelope::decode(&bytes[..cut]) {
                Ok((_, r)) => assert!(cut == boundary && r == vec![&b"rec"[..]], "{cut} bytes"),
                Err(_) => assert_ne!(cut, boundary),
            }
        }
        let mut bad = bytes.clone();
        bad[0] = 2;
        assert!(Envelope::decode(&bad).unwrap_err().contains("version 2"));
        bad = bytes.clone();
        bad[1] = 9;
        assert!(Envelope::decode(&bad).unwrap_err().contains("kind 9"));
        bad = bytes.clone();
        bad[HEADER..HEADER + 4].copy_from_slice(&0u32.to_le_bytes());
        assert!(Envelope::decode(&bad).is_err(), "an empty record");
        let hb = Envelope { kind: Kind::Heartbeat, epoch: 1, lsn: 0, ts_ms: 0, node: 1, body: b"" };
        assert_eq!(Envelope::decode(&hb.to_vec()).unwrap(), (hb, vec![]));
    }

    #[test]
    fn data_messages_split_at_gaps_timestamps_and_the_size_limit() {
        let big = vec![7u8; MAX_DATA_BYTES / 2];
        let recs =
            [(1, 0, &b"a"[..]), (2, 0, b"b"), (4, 0, b"c"), (5, 0, &big[..]), (6, 0, &big[..]), (7, 1, b"d")];
        let spans: Vec<(u64, u64)> = data_messages(1, 1, recs).iter().map(|(f, l, _)| (*f, *l)).collect();
        assert_eq!(spans, vec![(1, 2), (4, 5), (6, 6), (7, 7)]);
        let huge = vec![1u8; MAX_DATA_BYTES + 10];
        let msgs = data_messages(1, 1, [(9, 0, &huge[..])]);
        assert_eq!(Envelope::decode(&msgs[0].2).unwrap().1, vec![&huge[..]]);
    }
}
