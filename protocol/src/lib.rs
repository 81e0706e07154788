//! The stockd wire format: frames, requests, responses and status codes.
//!
//! This crate does no I/O. `docs/protocol.md` is the normative description;
//! the constants and layouts here follow it byte for byte.
//!
//! Every frame is a 16-byte little-endian header followed by a body:
//!
//! ```text
//! u32 length      bytes after this field (12 + body length)
//! u8  version     1
//! u8  opcode      request opcode, or request opcode | 0x80 in a response
//! u16 flags       0 (reserved)
//! u64 request_id  chosen by the client, echoed in the response
//! ```

use std::fmt;

pub const VERSION: u8 = 1;
/// Bytes in a frame header, the length field included.
pub const HEADER_LEN: usize = 16;
/// Largest body the server accepts or sends.
pub const MAX_BODY: usize = 1 << 20;
/// Keys in one `QUERY_BATCH`.
pub const MAX_BATCH_KEYS: usize = 4096;
/// Lines in one `ORDER`, `INBOUND` or `RESERVE`.
pub const MAX_LINES: usize = 256;
/// Fulfillment centers one item may have rows in (so that a `QUERY_ITEM`
/// answer always fits its u16 count and `MAX_BODY`).
pub const MAX_CENTERS_PER_ITEM: usize = 4096;
/// Bytes of an auth token in `HELLO`.
pub const MAX_TOKEN: usize = 256;
/// Longest hold a `RESERVE` may ask for: one hour.
pub const MAX_TTL_MS: u32 = 3_600_000;
/// Largest quantity a row may hold: 2^53, so every figure is exact in JSON.
pub const STOCK_MAX: u64 = 1 << 53;
/// Response opcodes are the request opcode with this bit set.
pub const RESPONSE_BIT: u8 = 0x80;
/// Identifier of the key-to-shard hash reported by `HELLO` (see [`shard_of`]).
pub const HASH_FMIX64_MOD: u8 = 1;

pub mod opcode {
    pub const HELLO: u8 = 0x01;
    pub const PING: u8 = 0x02;
    pub const STATS: u8 = 0x03;
    pub const PROMOTE: u8 = 0x04;
    pub const QUERY: u8 = 0x10;
    pub const QUERY_BATCH: u8 = 0x11;
    pub const QUERY_ITEM: u8 = 0x12;
    pub const ORDER: u8 = 0x20;
    pub const INBOUND: u8 = 0x21;
    pub const CANCEL: u8 = 0x22;
    pub const RESERVE: u8 = 0x23;
    pub const CONFIRM: u8 = 0x24;
    pub const RELEASE: u8 = 0x25;
    pub const ADJUST: u8 = 0x26;
}

/// Status byte that starts every response body.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    InsufficientStock = 1,
    Duplicate = 2,
    NotFound = 3,
    BadRequest = 4,
    FrameTooLarge = 5,
    UnsupportedVersion = 6,
    Unauthorized = 7,
    Overloaded = 8,
    Internal = 9,
    Conflict = 10,
    /// A replicated server that is not the primary: a standby, or a primary
    /// that another node replaced. The message names the primary if known.
    NotPrimary = 11,
}

impl Status {
    pub fn from_u8(v: u8) -> Option<Status> {
        use Status::*;
        Some(match v {
            0 => Ok,
            1 => InsufficientStock,
            2 => Duplicate,
            3 => NotFound,
            4 => BadRequest,
            5 => FrameTooLarge,
            6 => UnsupportedVersion,
            7 => Unauthorized,
            8 => Overloaded,
            9 => Internal,
            10 => Conflict,
            11 => NotPrimary,
            _ => return None,
        })
    }

    /// Snake-case name, as used in JSON output (`"insufficient_stock"`).
    pub fn name(self) -> &'static str {
        use Status::*;
        match self {
            Ok => "ok",
            InsufficientStock => "insufficient_stock",
            Duplicate => "duplicate",
            NotFound => "not_found",
            BadRequest => "bad_request",
            FrameTooLarge => "frame_too_large",
            UnsupportedVersion => "unsupported_version",
            Unauthorized => "unauthorized",
            Overloaded => "overloaded",
            Internal => "internal",
            Conflict => "conflict",
            NotPrimary => "not_primary",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A stock row: one vendor item at one fulfillment center.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub item: u64,
    pub fc: u32,
}

/// One line of an order, receipt or hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Line {
    pub key: Key,
    pub qty: u32,
}

impl Line {
    pub const fn new(item: u64, fc: u32, qty: u32) -> Line {
        Line { key: Key { item, fc }, qty }
    }
}

/// The lines of an order, receipt or hold. One line, the common case for an
/// event product, is kept inline: decoding, logging and remembering a
/// one-line order allocates nothing for its lines. Build one from a `Vec`
/// (`lines.into()`), a slice (`Lines::from_slice`) or an iterator (`collect`).
pub type Lines = smallvec::SmallVec<[Line; 1]>;

/// Starts loading the cache line of `at` and returns at once: callers with
/// many lookups at hand ask for all their lines, then use them, and wait
/// for many cache misses at once instead of one after another.
pub fn prefetch<T>(at: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint; it never faults and changes no memory,
    // and `at` is a valid reference anyway.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(at as *const T as *const i8);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
}

/// The murmur3 64-bit finalizer; spreads sequential ids over shards.
pub fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

/// Compares secrets (auth tokens, API keys) without leaking through timing
/// where they differ. Lengths are not secret.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The shard that owns a vendor item (all its centers) or an order/hold/receipt id.
pub fn shard_of(id: u64, shards: usize) -> usize {
    (fmix64(id) % shards as u64) as usize
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Body length in bytes.
    pub body_len: usize,
    pub version: u8,
    pub opcode: u8,
    pub flags: u16,
    pub request_id: u64,
}

/// Why a byte stream cannot be framed. The connection is answered (when a
/// request id is known) and then closed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// The length field is below the 12 bytes every header needs.
    BadLength(u32),
    /// The body is larger than [`MAX_BODY`].
    TooLarge { request_id: u64, body_len: usize },
    /// A version this crate does not speak.
    BadVersion { request_id: u64, version: u8 },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::BadLength(n) => write!(f, "frame length {n} is below the 12-byte minimum"),
            FrameError::TooLarge { body_len, .. } => {
                write!(f, "frame body of {body_len} bytes exceeds the {MAX_BODY}-byte limit")
            }
            FrameError::BadVersion { version, .. } => {
                write!(f, "protocol version {version} is not supported (this server speaks {VERSION})")
            }
        }
    }
}

impl std::error::Error for FrameError {}

/// Looks for one complete frame at the start of `buf`.
///
/// `Ok(None)`: more bytes are needed. `Ok(Some((header, body)))`: a frame of
/// `HEADER_LEN + header.body_len` bytes. Errors are checked as soon as the
/// header is in, before the body arrives.
pub fn parse_frame(buf: &[u8]) -> Result<Option<(Header, &[u8])>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_le_bytes(buf[0..4].try_into().unwrap());
    if len < 12 {
        return Err(FrameError::BadLength(len));
    }
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let body_len = len as usize - 12;
    let request_id = u64::from_le_bytes(buf[8..16].try_into().unwrap());
    let version = buf[4];
    if version != VERSION {
        return Err(FrameError::BadVersion { request_id, version });
    }
    if body_len > MAX_BODY {
        return Err(FrameError::TooLarge { request_id, body_len });
    }
    if buf.len() < HEADER_LEN + body_len {
        return Ok(None);
    }
    let header =
        Header { body_len, version, opcode: buf[5], flags: u16::from_le_bytes([buf[6], buf[7]]), request_id };
    Ok(Some((header, &buf[HEADER_LEN..HEADER_LEN + body_len])))
}

/// Appends a frame header for a body of `body_len` bytes.
pub fn put_header(out: &mut Vec<u8>, opcode: u8, request_id: u64, body_len: usize) {
    out.extend_from_slice(&header(opcode, request_id, body_len));
}

/// A frame header for a body of `body_len` bytes, as bytes: what
/// [`put_header`] appends in one copy (five appends, each with its own
/// check of the vector's room, were ~50 instructions a frame).
fn header(opcode: u8, request_id: u64, body_len: usize) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&((body_len + 12) as u32).to_le_bytes());
    h[4] = VERSION;
    h[5] = opcode;
    // h[6..8]: flags, 0.
    h[8..16].copy_from_slice(&request_id.to_le_bytes());
    h
}

/// Appends a whole `QUERY` frame: what [`Request::encode`] writes for one,
/// in one copy.
pub fn encode_query_frame(request_id: u64, key: Key, out: &mut Vec<u8>) {
    let mut f = [0u8; HEADER_LEN + 12];
    f[..HEADER_LEN].copy_from_slice(&header(opcode::QUERY, request_id, 12));
    f[HEADER_LEN..HEADER_LEN + 8].copy_from_slice(&key.item.to_le_bytes());
    f[HEADER_LEN + 8..].copy_from_slice(&key.fc.to_le_bytes());
    out.extend_from_slice(&f);
}

/// Appends a whole `OK` answer to a `QUERY` (opcode `op`, the request's)
/// of `available` units: what `Response::Ok(Reply::Available(available))`
/// encodes, in one copy.
pub fn encode_available_frame(op: u8, request_id: u64, available: u64, out: &mut Vec<u8>) {
    let mut f = [0u8; HEADER_LEN + 9];
    f[..HEADER_LEN].copy_from_slice(&header(op | RESPONSE_BIT, request_id, 9));
    f[HEADER_LEN] = Status::Ok as u8;
    f[HEADER_LEN + 1..].copy_from_slice(&available.to_le_bytes());
    out.extend_from_slice(&f);
}

/// Starts a frame whose body length is not known yet; finish with [`end_frame`].
pub fn begin_frame(out: &mut Vec<u8>, opcode: u8, request_id: u64) -> usize {
    let start = out.len();
    put_header(out, opcode, request_id, 0);
    start
}

/// Patches the length field of the frame started at `start`.
pub fn end_frame(out: &mut [u8], start: usize) {
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

/// A malformed body: which field, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError(pub String);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DecodeError {}

fn err<T>(msg: impl Into<String>) -> Result<T, DecodeError> {
    Err(DecodeError(msg.into()))
}

/// A little-endian cursor over a body.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() - self.pos < n {
            return err(format!("body ends inside {what}"));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    pub fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }
    pub fn u16(&mut self, what: &str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.take(2, what)?.try_into().unwrap()))
    }
    pub fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    pub fn u64(&mut self, what: &str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    pub fn bytes(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        self.take(n, what)
    }
    pub fn key(&mut self) -> Result<Key, DecodeError> {
        // Both fields with one check of the length; the field-by-field
        // path (which names the field the body ends in) only when short.
        if let Some(b) = self.buf.get(self.pos..self.pos + 12) {
            self.pos += 12;
            let (item, fc) = b.split_at(8);
            return Ok(Key {
                item: u64::from_le_bytes(item.try_into().unwrap()),
                fc: u32::from_le_bytes(fc.try_into().unwrap()),
            });
        }
        Ok(Key { item: self.u64("vendor_item_id")?, fc: self.u32("fulfillment_center_id")? })
    }
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    /// The bytes not read yet, for a field of variable length decoded in
    /// place; [`Reader::skip`] then moves past what it took.
    pub fn rest(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }
    /// Moves past `n` bytes of [`Reader::rest`] (at most all of them).
    pub fn skip(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.buf.len());
    }
    /// Fails if bytes are left over: every body has an exact length.
    pub fn finish(&self) -> Result<(), DecodeError> {
        if self.remaining() != 0 {
            return err(format!("{} unexpected trailing bytes", self.remaining()));
        }
        Ok(())
    }
}

fn put_key(out: &mut Vec<u8>, k: Key) {
    out.extend_from_slice(&k.item.to_le_bytes());
    out.extend_from_slice(&k.fc.to_le_bytes());
}

/// Appends a whole ORDER, INBOUND or RESERVE frame (`ttl_ms` only for
/// RESERVE) from borrowed lines: what [`Request::encode`] writes for them,
/// for a client that has no reason to copy the lines into a [`Request`].
pub fn encode_lines_frame(
    op: u8,
    request_id: u64,
    id: u64,
    ttl_ms: Option<u32>,
    lines: &[Line],
    out: &mut Vec<u8>,
) {
    let start = begin_frame(out, op, request_id);
    put_lines_body(out, id, ttl_ms, lines);
    end_frame(out, start);
}

/// Appends a whole QUERY_BATCH frame from borrowed keys: what
/// [`Request::encode`] writes for them.
pub fn encode_batch_frame(request_id: u64, keys: &[Key], out: &mut Vec<u8>) {
    let start = begin_frame(out, opcode::QUERY_BATCH, request_id);
    put_batch_body(out, keys);
    end_frame(out, start);
}

fn put_batch_body(out: &mut Vec<u8>, keys: &[Key]) {
    out.extend_from_slice(&(keys.len() as u16).to_le_bytes());
    for k in keys {
        put_key(out, *k);
    }
}

/// The body of ORDER, INBOUND (no `ttl_ms`) and RESERVE.
fn put_lines_body(out: &mut Vec<u8>, id: u64, ttl_ms: Option<u32>, lines: &[Line]) {
    out.extend_from_slice(&id.to_le_bytes());
    if let Some(ttl_ms) = ttl_ms {
        out.extend_from_slice(&ttl_ms.to_le_bytes());
    }
    out.extend_from_slice(&(lines.len() as u16).to_le_bytes());
    for l in lines {
        put_key(out, l.key);
        out.extend_from_slice(&l.qty.to_le_bytes());
    }
}

fn read_lines(r: &mut Reader<'_>) -> Result<Lines, DecodeError> {
    let n = r.u16("line count")? as usize;
    if n == 0 {
        return err("an order, receipt or hold needs at least one line");
    }
    if n > MAX_LINES {
        return err(format!("{n} lines exceed the limit of {MAX_LINES}"));
    }
    let mut lines = Lines::with_capacity(n);
    for i in 0..n {
        let key = r.key()?;
        let qty = r.u32("qty")?;
        if qty == 0 {
            return err(format!("line {i}: qty must be greater than 0"));
        }
        lines.push(Line { key, qty });
    }
    Ok(lines)
}

/// A request body, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Hello {
        token: Vec<u8>,
    },
    Ping,
    Stats,
    /// A replicating standby takes over as the primary (docs/ha.md).
    Promote,
    Query {
        key: Key,
    },
    QueryBatch {
        keys: Vec<Key>,
    },
    QueryItem {
        item: u64,
    },
    Order {
        id: u64,
        lines: Lines,
    },
    Inbound {
        id: u64,
        lines: Lines,
    },
    Cancel {
        id: u64,
    },
    Reserve {
        id: u64,
        ttl_ms: u32,
        lines: Lines,
    },
    Confirm {
        id: u64,
    },
    Release {
        id: u64,
    },
    Adjust {
        key: Key,
        on_hand: u64,
        reason: u16,
    },
}

impl Request {
    pub fn opcode(&self) -> u8 {
        use opcode::*;
        match self {
            Request::Hello { .. } => HELLO,
            Request::Ping => PING,
            Request::Stats => STATS,
            Request::Promote => PROMOTE,
            Request::Query { .. } => QUERY,
            Request::QueryBatch { .. } => QUERY_BATCH,
            Request::QueryItem { .. } => QUERY_ITEM,
            Request::Order { .. } => ORDER,
            Request::Inbound { .. } => INBOUND,
            Request::Cancel { .. } => CANCEL,
            Request::Reserve { .. } => RESERVE,
            Request::Confirm { .. } => CONFIRM,
            Request::Release { .. } => RELEASE,
            Request::Adjust { .. } => ADJUST,
        }
    }

    /// Appends the whole frame (header and body).
    pub fn encode(&self, request_id: u64, out: &mut Vec<u8>) {
        if let Request::Query { key } = self {
            // The commonest request, in one copy.
            return encode_query_frame(request_id, *key, out);
        }
        let start = begin_frame(out, self.opcode(), request_id);
        match self {
            Request::Hello { token } => {
                out.extend_from_slice(&(token.len() as u16).to_le_bytes());
                out.extend_from_slice(token);
            }
            Request::Ping | Request::Stats | Request::Promote => {}
            Request::Query { .. } => {} // written above
            Request::QueryBatch { keys } => put_batch_body(out, keys),
            Request::QueryItem { item } => out.extend_from_slice(&item.to_le_bytes()),
            Request::Order { id, lines } | Request::Inbound { id, lines } => {
                put_lines_body(out, *id, None, lines)
            }
            Request::Cancel { id } | Request::Confirm { id } | Request::Release { id } => {
                out.extend_from_slice(&id.to_le_bytes())
            }
            Request::Reserve { id, ttl_ms, lines } => put_lines_body(out, *id, Some(*ttl_ms), lines),
            Request::Adjust { key, on_hand, reason } => {
                put_key(out, *key);
                out.extend_from_slice(&on_hand.to_le_bytes());
                out.extend_from_slice(&reason.to_le_bytes());
            }
        }
        end_frame(out, start);
    }

    /// Decodes and validates a request body. Every limit of the spec is
    /// checked here, so the server only ever sees well-formed requests.
    pub fn decode(op: u8, body: &[u8]) -> Result<Request, DecodeError> {
        let mut r = Reader::new(body);
        let req = match op {
            opcode::HELLO => {
                let n = r.u16("token length")? as usize;
                if n > MAX_TOKEN {
                    return err(format!("token of {n} bytes exceeds the limit of {MAX_TOKEN}"));
                }
                Request::Hello { token: r.bytes(n, "token")?.to_vec() }
            }
            opcode::PING => Request::Ping,
            opcode::STATS => Request::Stats,
            opcode::PROMOTE => Request::Promote,
            opcode::QUERY => Request::Query { key: r.key()? },
            opcode::QUERY_BATCH => {
                let n = r.u16("key count")? as usize;
                if n > MAX_BATCH_KEYS {
                    return err(format!("{n} keys exceed the batch limit of {MAX_BATCH_KEYS}"));
                }
                let mut keys = Vec::with_capacity(n);
                for _ in 0..n {
                    keys.push(r.key()?);
                }
                Request::QueryBatch { keys }
            }
            opcode::QUERY_ITEM => Request::QueryItem { item: r.u64("vendor_item_id")? },
            opcode::ORDER => Request::Order { id: r.u64("order_id")?, lines: read_lines(&mut r)? },
            opcode::INBOUND => Request::Inbound { id: r.u64("receipt_id")?, lines: read_lines(&mut r)? },
            opcode::CANCEL => Request::Cancel { id: r.u64("order_id")? },
            opcode::RESERVE => {
                let id = r.u64("hold_id")?;
                let ttl_ms = r.u32("ttl_ms")?;
                if ttl_ms == 0 || ttl_ms > MAX_TTL_MS {
                    return err(format!("ttl_ms {ttl_ms} is outside 1..={MAX_TTL_MS}"));
                }
                Request::Reserve { id, ttl_ms, lines: read_lines(&mut r)? }
            }
            opcode::CONFIRM => Request::Confirm { id: r.u64("hold_id")? },
            opcode::RELEASE => Request::Release { id: r.u64("hold_id")? },
            opcode::ADJUST => {
                let key = r.key()?;
                let on_hand = r.u64("on_hand")?;
                if on_hand > STOCK_MAX {
                    return err(format!("on_hand {on_hand} exceeds the row maximum {STOCK_MAX}"));
                }
                Request::Adjust { key, on_hand, reason: r.u16("reason")? }
            }
            other => return err(format!("opcode: unknown opcode 0x{other:02x}")),
        };
        r.finish()?;
        Ok(req)
    }
}

/// What the server says in `HELLO`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelloInfo {
    pub server_id: u64,
    pub hash_id: u8,
    /// One port per shard, in shard order; its length is the shard count.
    pub shard_ports: Vec<u16>,
    pub max_body: u32,
    pub max_batch_keys: u16,
    pub max_lines: u16,
}

/// The payload of an OK response, by request opcode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Hello(HelloInfo),
    Pong,
    Stats(Vec<(String, u64)>),
    /// `PROMOTE`: asked; the node serves as the primary once its promotion
    /// is read back (or it already was the primary).
    Promoting,
    /// `QUERY`: available units.
    Available(u64),
    /// `QUERY_BATCH`: available units per key, in request order.
    Batch(Vec<u64>),
    /// `QUERY_ITEM`: (fulfillment_center_id, available), ascending by center.
    Item(Vec<(u32, u64)>),
    /// A mutation: the LSN of its durable log record.
    Committed {
        lsn: u64,
    },
}

/// A response body, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    Ok(Reply),
    /// The first line that cannot be filled, and what is available on its row.
    Insufficient {
        line: u16,
        available: u64,
    },
    /// The id was applied before; the original LSN.
    Duplicate {
        lsn: u64,
    },
    /// Any other status, with a human-readable message.
    Error {
        status: Status,
        message: String,
    },
}

impl Response {
    pub fn status(&self) -> Status {
        match self {
            Response::Ok(_) => Status::Ok,
            Response::Insufficient { .. } => Status::InsufficientStock,
            Response::Duplicate { .. } => Status::Duplicate,
            Response::Error { status, .. } => *status,
        }
    }

    /// Appends the whole frame answering request `request_id` of opcode `op`.
    pub fn encode(&self, op: u8, request_id: u64, out: &mut Vec<u8>) {
        let start = begin_frame(out, op | RESPONSE_BIT, request_id);
        out.push(self.status() as u8);
        match self {
            Response::Ok(reply) => encode_reply(reply, out),
            Response::Insufficient { line, available } => {
                out.extend_from_slice(&line.to_le_bytes());
                out.extend_from_slice(&available.to_le_bytes());
            }
            Response::Duplicate { lsn } => out.extend_from_slice(&lsn.to_le_bytes()),
            Response::Error { message, .. } => put_message(out, message),
        }
        end_frame(out, start);
    }

    /// Decodes the body of a response frame with opcode `op` (response bit set).
    pub fn decode(op: u8, body: &[u8]) -> Result<Response, DecodeError> {
        // The commonest answer, a query's OK, without the general path's
        // checks field by field (the same value it would decode).
        if op == opcode::QUERY | RESPONSE_BIT && body.len() == 9 && body[0] == Status::Ok as u8 {
            return Ok(Response::Ok(Reply::Available(u64::from_le_bytes(body[1..9].try_into().unwrap()))));
        }
        if op & RESPONSE_BIT == 0 {
            return err(format!("opcode 0x{op:02x} is not a response"));
        }
        let mut r = Reader::new(body);
        let code = r.u8("status")?;
        let Some(status) = Status::from_u8(code) else {
            return err(format!("unknown status {code}"));
        };
        let resp = match status {
            Status::Ok => Response::Ok(decode_reply(op & !RESPONSE_BIT, &mut r)?),
            Status::InsufficientStock => {
                Response::Insufficient { line: r.u16("line")?, available: r.u64("available")? }
            }
            Status::Duplicate => Response::Duplicate { lsn: r.u64("lsn")? },
            status => {
                let n = r.u16("message length")? as usize;
                let message = String::from_utf8_lossy(r.bytes(n, "message")?).into_owned();
                Response::Error { status, message }
            }
        };
        r.finish()?;
        Ok(resp)
    }
}

fn put_message(out: &mut Vec<u8>, message: &str) {
    // Messages are short by construction; clip at a char boundary to stay in u16.
    let mut end = message.len().min(u16::MAX as usize);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&(end as u16).to_le_bytes());
    out.extend_from_slice(&message.as_bytes()[..end]);
}

/// Appends a complete error frame: the common case for the server.
pub fn encode_error(op: u8, request_id: u64, status: Status, message: &str, out: &mut Vec<u8>) {
    let start = begin_frame(out, op | RESPONSE_BIT, request_id);
    out.push(status as u8);
    put_message(out, message);
    end_frame(out, start);
}

fn encode_reply(reply: &Reply, out: &mut Vec<u8>) {
    match reply {
        Reply::Hello(h) => {
            out.extend_from_slice(&h.server_id.to_le_bytes());
            out.push(h.hash_id);
            out.extend_from_slice(&(h.shard_ports.len() as u16).to_le_bytes());
            for p in &h.shard_ports {
                out.extend_from_slice(&p.to_le_bytes());
            }
            out.extend_from_slice(&h.max_body.to_le_bytes());
            out.extend_from_slice(&h.max_batch_keys.to_le_bytes());
            out.extend_from_slice(&h.max_lines.to_le_bytes());
        }
        Reply::Pong | Reply::Promoting => {}
        Reply::Stats(stats) => {
            out.extend_from_slice(&(stats.len() as u16).to_le_bytes());
            for (name, v) in stats {
                let name = &name.as_bytes()[..name.len().min(255)];
                out.push(name.len() as u8);
                out.extend_from_slice(name);
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        Reply::Available(n) => out.extend_from_slice(&n.to_le_bytes()),
        Reply::Batch(v) => {
            out.extend_from_slice(&(v.len() as u16).to_le_bytes());
            for n in v {
                out.extend_from_slice(&n.to_le_bytes());
            }
        }
        Reply::Item(v) => {
            out.extend_from_slice(&(v.len() as u16).to_le_bytes());
            for (fc, n) in v {
                out.extend_from_slice(&fc.to_le_bytes());
                out.extend_from_slice(&n.to_le_bytes());
            }
        }
        Reply::Committed { lsn } => out.extend_from_slice(&lsn.to_le_bytes()),
    }
}

fn decode_reply(op: u8, r: &mut Reader<'_>) -> Result<Reply, DecodeError> {
    use opcode::*;
    Ok(match op {
        HELLO => {
            let server_id = r.u64("server_id")?;
            let hash_id = r.u8("hash_id")?;
            let n = r.u16("shard count")? as usize;
            let mut shard_ports = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                shard_ports.push(r.u16("port")?);
            }
            Reply::Hello(HelloInfo {
                server_id,
                hash_id,
                shard_ports,
                max_body: r.u32("max_body")?,
                max_batch_keys: r.u16("max_batch_keys")?,
                max_lines: r.u16("max_lines")?,
            })
        }
        PING => Reply::Pong,
        PROMOTE => Reply::Promoting,
        STATS => {
            let n = r.u16("stat count")? as usize;
            let mut v = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                let len = r.u8("name length")? as usize;
                let name = String::from_utf8_lossy(r.bytes(len, "name")?).into_owned();
                v.push((name, r.u64("value")?));
            }
            Reply::Stats(v)
        }
        QUERY => Reply::Available(r.u64("available")?),
        QUERY_BATCH => {
            let n = r.u16("count")? as usize;
            let mut v = Vec::with_capacity(n.min(MAX_BATCH_KEYS));
            for _ in 0..n {
                v.push(r.u64("available")?);
            }
            Reply::Batch(v)
        }
        QUERY_ITEM => {
            let n = r.u16("count")? as usize;
            let mut v = Vec::with_capacity(n.min(4096));
            for _ in 0..n {
                v.push((r.u32("fulfillment_center_id")?, r.u64("available")?));
            }
            Reply::Item(v)
        }
        ORDER | INBOUND | CANCEL | RESERVE | CONFIRM | RELEASE | ADJUST => {
            Reply::Committed { lsn: r.u64("lsn")? }
        }
        other => return err(format!("opcode: unknown opcode 0x{other:02x}")),
    })
}

#[cfg(test)]
mod tests;
