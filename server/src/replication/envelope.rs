//! A message of the replication topic: a log record with the epoch of the
//! primary that wrote it, a promotion, or a primary's heartbeat. Byte by
//! byte in docs/ha.md:
//!
//! ```text
//! u8  version (1)   u8 kind (1 data, 2 promote, 3 heartbeat)
//! u64 epoch         u64 lsn   u64 ts_ms   u64 node (server id of the writer)
//! data: the log record's payload; promote: the promoter's client address (UTF-8)
//! ```
//!
//! Kafka checksums its batches, so there is no checksum here. Decoding
//! answers any bytes with a message or an error, never a panic.

pub const VERSION: u8 = 1;
const HEADER: usize = 2 + 4 * 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A log record at `lsn`, written by the primary of `epoch`.
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
    /// Data: the record's payload. Promote: the promoter's address. Heartbeat: empty.
    pub body: &'a [u8],
}

impl Envelope<'_> {
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

    pub fn decode(buf: &[u8]) -> Result<Envelope<'_>, String> {
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
        if kind == Kind::Data && body.is_empty() {
            return Err("a data message without a record".into());
        }
        Ok(Envelope { kind, epoch: u(0), lsn: u(1), ts_ms: u(2), node: u(3), body })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bad_input() {
        let e = Envelope { kind: Kind::Data, epoch: 3, lsn: 77, ts_ms: 9, node: 5, body: b"rec" };
        let bytes = e.to_vec();
        assert_eq!(Envelope::decode(&bytes).unwrap(), e);
        // A message is framed by Kafka: a header cut short, or a data
        // message without its record, is an error.
        for cut in 0..=HEADER {
            assert!(Envelope::decode(&bytes[..cut]).is_err(), "{cut} bytes");
        }
        let mut bad = bytes.clone();
        bad[0] = 2;
        assert!(Envelope::decode(&bad).unwrap_err().contains("version 2"));
        bad = bytes;
        bad[1] = 9;
        assert!(Envelope::decode(&bad).unwrap_err().contains("kind 9"));
        let hb = Envelope { kind: Kind::Heartbeat, epoch: 1, lsn: 0, ts_ms: 0, node: 1, body: b"" };
        assert_eq!(Envelope::decode(&hb.to_vec()).unwrap(), hb);
    }
}
