//! One client connection, served on the shard thread that accepted it.
//!
//! Requests are read in batches; reads of keys this shard owns are answered
//! inline into the write buffer, everything else is handed to the owning
//! shard and answered through the connection's channel, possibly out of
//! order. At most [`MAX_INFLIGHT`] requests wait for another shard or for the
//! log; beyond that the connection stops reading (backpressure, not memory).

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use stockd_protocol::{
    begin_frame, constant_time_eq, encode_available_frame, end_frame, opcode, parse_frame, shard_of,
    DecodeError, FrameError, HelloInfo, Key, Reply, Request, Response, Status, HEADER_LEN, MAX_BODY,
    RESPONSE_BIT,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::shard::{Forwarded, Out, Outbox, Shard};
use crate::state::{Command, IdKey, PREFETCH_KEYS};

/// Requests of one connection that may wait for another shard or the log.
pub const MAX_INFLIGHT: usize = 1024;
/// A connection's read and write buffers start at this size; reads add this much room.
const BUFFER_BYTES: usize = 64 << 10;
/// Room left in the read buffer below which it grows before the next read.
const MIN_READ_ROOM_BYTES: usize = 16 << 10;

/// What every connection of a shard needs to know.
pub struct ConnCtx {
    pub hello: HelloInfo,
    pub auth_token: Option<Vec<u8>>,
    /// A connection holding part of a frame this long without sending more is closed.
    pub partial_frame_timeout: Duration,
}

struct PendingBatch {
    values: Vec<u64>,
    parts_left: usize,
    /// Answered already (OVERLOADED); parts still out are absorbed silently.
    failed: bool,
}

/// Frames decoded ahead of being served, their lookups prefetched together;
/// fewer when their rows reach `PREFETCH_KEYS` first (multi-line orders).
const DECODE_AHEAD: usize = PREFETCH_KEYS;

/// A frame decoded ahead of being served.
struct Ahead {
    op: u8,
    rid: u64,
    /// Its length in the read buffer, header included.
    len: usize,
    req: Result<Request, DecodeError>,
}

struct Conn {
    /// Where shards leave this connection's answers.
    outbox: Arc<Outbox>,
    /// Lookups of the frames decoded ahead (buffers kept between reads).
    keys: Vec<Key>,
    ids: Vec<IdKey>,
    inflight: usize,
    authed: bool,
    batches: HashMap<u64, PendingBatch>,
    wbuf: Vec<u8>,
}

/// Serves one connection until the peer closes it or breaks the framing.
/// A peer that half-closes (shuts down its sending side) still gets an
/// answer to every request it sent before; then the connection closes.
pub async fn serve(mut stream: TcpStream, shard: Rc<RefCell<Shard>>, ctx: Rc<ConnCtx>) {
    let outbox = Arc::new(Outbox::default());
    // The answers taken from the outbox, and its other queue.
    let mut answers = VecDeque::new();
    let mut conn = Conn {
        outbox: outbox.clone(),
        keys: Vec::with_capacity(DECODE_AHEAD),
        ids: Vec::with_capacity(DECODE_AHEAD),
        inflight: 0,
        authed: ctx.auth_token.is_none(),
        batches: HashMap::new(),
        wbuf: Vec::with_capacity(BUFFER_BYTES),
    };
    let mut rbuf: Vec<u8> = Vec::with_capacity(BUFFER_BYTES);
    let mut ahead: Vec<Ahead> = Vec::with_capacity(DECODE_AHEAD);
    // The peer will send nothing more (it closed or half-closed the socket).
    let mut peer_done = false;
    loop {
        let mut close = false;
        let mut consumed = 0;
        {
            let mut sh = shard.borrow_mut();
            'frames: while conn.inflight < MAX_INFLIGHT {
                // Decode a run of frames first and ask memory for the rows
                // and ids they will look up, all at once; then serve them.
                let mut at = consumed;
                let mut broken = None;
                while ahead.len() < DECODE_AHEAD && conn.keys.len() < PREFETCH_KEYS {
                    match parse_frame(&rbuf[at..]) {
                        Ok(Some((h, body))) => {
                            let req = Request::decode(h.opcode, body);
                            conn.note_lookups(&req);
                            ahead.push(Ahead {
                                op: h.opcode,
                                rid: h.request_id,
                                len: HEADER_LEN + h.body_len,
                                req,
                            });
                            at += HEADER_LEN + h.body_len;
                        }
                        Ok(None) => break,
                        Err(e) => {
                            broken = Some(e);
                            break;
                        }
                    }
                }
                let more = ahead.len() == DECODE_AHEAD || conn.keys.len() >= PREFETCH_KEYS;
                conn.prefetch(&sh);
                for a in ahead.drain(..) {
                    if conn.inflight >= MAX_INFLIGHT {
                        // The rest stay in the buffer, decoded again later.
                        broken = None;
                        break;
                    }
                    conn.handle(&mut sh, &ctx, a.op, a.rid, a.req);
                    consumed += a.len;
                }
                ahead.clear();
                if let Some(e) = broken {
                    conn.frame_error(&mut sh, &e);
                    close = true;
                    break 'frames;
                }
                if !more {
                    break;
                }
            }
        }
        rbuf.drain(..consumed);
        // Parsing stopped at the in-flight bound: frames may still wait in
        // the buffer, and no new bytes need arrive to make them readable.
        let paused = conn.inflight >= MAX_INFLIGHT;
        outbox.take_all(&mut answers);
        for out in answers.drain(..) {
            conn.deliver(out);
        }
        if !conn.wbuf.is_empty() {
            if stream.write_all(&conn.wbuf).await.is_err() {
                break;
            }
            conn.wbuf.clear();
        }
        if close {
            break;
        }
        if paused && conn.inflight < MAX_INFLIGHT {
            continue; // answers drained below the bound: serve the buffered frames first
        }
        if peer_done && conn.inflight == 0 {
            break; // every request it sent is answered and written
        }
        if rbuf.capacity() - rbuf.len() < MIN_READ_ROOM_BYTES {
            rbuf.reserve(BUFFER_BYTES);
        }
        let can_read = !peer_done && conn.inflight < MAX_INFLIGHT && rbuf.len() < 2 * (MAX_BODY + HEADER_LEN);
        // Part of a frame waits for its rest: a client that stops there (a
        // slow-loris) is closed once the timeout passes without new bytes.
        let partial = can_read && !rbuf.is_empty();
        tokio::select! {
            biased;
            () = outbox.ready() => {} // delivered at the top of the loop
            r = stream.read_buf(&mut rbuf), if can_read => match r {
                Ok(0) => peer_done = true,
                Err(_) => break,
                Ok(_) => {}
            },
            _ = tokio::time::sleep(ctx.partial_frame_timeout), if partial => {
                let sh = shard.borrow();
                sh.stats().errors.fetch_add(1, Relaxed);
                tracing::debug!(bytes = rbuf.len(), "closing a connection that stopped inside a frame");
                break;
            }
        }
    }
}

impl Conn {
    fn deliver(&mut self, out: Out) {
        match out {
            Out::Response { op, request_id, resp } => {
                self.inflight -= 1;
                resp.encode(op, request_id, &mut self.wbuf);
            }
            Out::BatchPart { request_id, positions, values } => {
                self.inflight -= 1;
                let Some(b) = self.batches.get_mut(&request_id) else { return };
                for (p, v) in positions.iter().zip(values) {
                    b.values[*p as usize] = v;
                }
                b.parts_left -= 1;
                if b.parts_left == 0 {
                    let b = self.batches.remove(&request_id).expect("present");
                    if !b.failed {
                        put_batch(&mut self.wbuf, request_id, &b.values);
                    }
                }
            }
        }
    }

    fn error(&mut self, op: u8, request_id: u64, status: Status, message: &str) {
        stockd_protocol::encode_error(op, request_id, status, message, &mut self.wbuf);
    }

    fn frame_error(&mut self, sh: &mut Shard, e: &FrameError) {
        sh.stats().errors.fetch_add(1, Relaxed);
        tracing::debug!(error = %e, "closing a connection that broke the framing");
        match *e {
            FrameError::TooLarge { request_id, .. } => {
                self.error(0, request_id, Status::FrameTooLarge, &e.to_string())
            }
            FrameError::BadVersion { request_id, .. } => {
                self.error(0, request_id, Status::UnsupportedVersion, &e.to_string())
            }
            FrameError::BadLength(_) => {}
        }
    }

    /// Notes the rows and ids a request decoded ahead will look up.
    fn note_lookups(&mut self, req: &Result<Request, DecodeError>) {
        match req {
            Ok(Request::Query { key }) => self.keys.push(*key),
            Ok(Request::Order { id, lines } | Request::Reserve { id, lines, .. }) => {
                self.ids.push(IdKey::OrderOrHold(*id));
                self.keys.extend(lines.iter().map(|l| l.key));
            }
            Ok(Request::Inbound { id, lines }) => {
                self.ids.push(IdKey::Receipt(*id));
                self.keys.extend(lines.iter().map(|l| l.key));
            }
            Ok(Request::Cancel { id } | Request::Confirm { id } | Request::Release { id }) => {
                self.ids.push(IdKey::OrderOrHold(*id))
            }
            _ => {}
        }
    }

    /// Asks memory for the rows and ids of this shard that the requests
    /// decoded ahead will look up (for an authenticated connection), so
    /// that their cache misses overlap (see `Store::prefetch_lookups`), and
    /// forgets the list. Changes no state.
    fn prefetch(&mut self, sh: &Shard) {
        if self.authed {
            // Beyond this, the first lines would leave L1 before they are read.
            self.keys.truncate(PREFETCH_KEYS);
            sh.prefetch_lookups(&self.keys, &self.ids);
        }
        self.keys.clear();
        self.ids.clear();
    }

    fn handle(&mut self, sh: &mut Shard, ctx: &ConnCtx, op: u8, rid: u64, req: Result<Request, DecodeError>) {
        if op & RESPONSE_BIT != 0 {
            return self.error(
                op & !RESPONSE_BIT,
                rid,
                Status::BadRequest,
                "response frames are not requests",
            );
        }
        if !self.authed && op != opcode::HELLO && op != opcode::PING {
            return self.error(
                op,
                rid,
                Status::Unauthorized,
                "this server requires HELLO with a valid token first",
            );
        }
        let req = match req {
            Ok(r) => r,
            Err(e) => {
                sh.stats().errors.fetch_add(1, Relaxed);
                return self.error(op, rid, Status::BadRequest, &e.0);
            }
        };
        match req {
            Request::Hello { token } => {
                if let Some(want) = &ctx.auth_token {
                    if !constant_time_eq(&token, want) {
                        return self.error(op, rid, Status::Unauthorized, "bad auth token");
                    }
                }
                self.authed = true;
                Response::Ok(Reply::Hello(ctx.hello.clone())).encode(op, rid, &mut self.wbuf);
            }
            Request::Ping => Response::Ok(Reply::Pong).encode(op, rid, &mut self.wbuf),
            Request::Stats => {
                Response::Ok(Reply::Stats(sh.shared().collect_stats())).encode(op, rid, &mut self.wbuf)
            }
            Request::Promote => match sh.shared().replica.as_ref().map(|r| r.ask_promotion()) {
                Some(Ok(())) => Response::Ok(Reply::Promoting).encode(op, rid, &mut self.wbuf),
                Some(Err(why)) => self.error(op, rid, Status::Conflict, why),
                None => self.error(
                    op,
                    rid,
                    Status::BadRequest,
                    "this server does not replicate (start it with --replicate or --standby)",
                ),
            },
            Request::Query { key } => self.query(sh, op, rid, key),
            Request::QueryItem { item } => self.query_item(sh, op, rid, item),
            Request::QueryBatch { keys } => self.query_batch(sh, op, rid, keys),
            Request::Order { id, lines } => self.command(sh, op, rid, Command::Order { id, lines }),
            Request::Inbound { id, lines } => self.command(sh, op, rid, Command::Inbound { id, lines }),
            Request::Cancel { id } => self.command(sh, op, rid, Command::Cancel { id }),
            Request::Reserve { id, ttl_ms, lines } => {
                self.command(sh, op, rid, Command::Reserve { id, ttl_ms, lines })
            }
            Request::Confirm { id } => self.command(sh, op, rid, Command::Confirm { id }),
            Request::Release { id } => self.command(sh, op, rid, Command::Release { id, expired: false }),
            Request::Adjust { key, on_hand, reason } => {
                self.command(sh, op, rid, Command::Adjust { key, on_hand, reason })
            }
        }
    }

    fn query(&mut self, sh: &mut Shard, op: u8, rid: u64, key: Key) {
        let owner = shard_of(key.item, sh.shards());
        if owner != sh.index() {
            return self.forward(sh, owner, op, rid, Forwarded::Query { request_id: rid, key, reply: None });
        }
        // The hot path: straight into the write buffer, no Response value.
        encode_available_frame(op, rid, sh.read_one(key), &mut self.wbuf);
    }

    fn query_item(&mut self, sh: &mut Shard, op: u8, rid: u64, item: u64) {
        let owner = shard_of(item, sh.shards());
        if owner != sh.index() {
            let f = Forwarded::QueryItem { request_id: rid, item, reply: None };
            return self.forward(sh, owner, op, rid, f);
        }
        Response::Ok(Reply::Item(sh.read_item(item))).encode(op, rid, &mut self.wbuf);
    }

    fn query_batch(&mut self, sh: &mut Shard, op: u8, rid: u64, keys: Vec<Key>) {
        let n = sh.shards();
        let me = sh.index();
        if keys.iter().all(|k| shard_of(k.item, n) == me) {
            // The hot path (a shard-aware client sends each shard its own
            // keys): the values go straight into the write buffer.
            let out = &mut self.wbuf;
            let start = begin_batch(out, rid, keys.len());
            sh.read_each(&keys, |v| out.extend_from_slice(&v.to_le_bytes()));
            return end_frame(out, start);
        }
        if self.batches.contains_key(&rid) {
            return self.error(
                op,
                rid,
                Status::BadRequest,
                "a QUERY_BATCH with this request id is still in flight",
            );
        }
        let mut parts: Vec<(Vec<u16>, Vec<Key>)> = (0..n).map(|_| (Vec::new(), Vec::new())).collect();
        for (i, k) in keys.iter().enumerate() {
            let p = &mut parts[shard_of(k.item, n)];
            p.0.push(i as u16);
            p.1.push(*k);
        }
        let mut values = vec![0u64; keys.len()];
        let (positions, local) = std::mem::take(&mut parts[me]);
        for (p, v) in positions.iter().zip(sh.read(&local)) {
            values[*p as usize] = v;
        }
        // Parts already handed over answer later; if a later part cannot be
        // handed over, the whole batch answers OVERLOADED now and the parts
        // still out are absorbed silently when they come back.
        let mut batch = PendingBatch { values, parts_left: 0, failed: false };
        for (owner, (positions, keys)) in parts.into_iter().enumerate() {
            if keys.is_empty() {
                continue;
            }
            let f =
                Forwarded::QueryBatch { request_id: rid, positions, keys, reply: Some(self.outbox.clone()) };
            if sh.forward(owner, f).is_err() {
                batch.failed = true;
                break;
            }
            self.inflight += 1;
            batch.parts_left += 1;
        }
        if batch.failed {
            self.error(op, rid, Status::Overloaded, "shard queue full; retry");
        }
        if batch.parts_left > 0 {
            self.batches.insert(rid, batch);
        }
    }

    fn command(&mut self, sh: &mut Shard, op: u8, rid: u64, cmd: Command) {
        let coord = shard_of(cmd.owner_id(), sh.shards());
        if coord == sh.index() {
            self.inflight += 1;
            sh.start(op, rid, cmd, Some(self.outbox.clone()));
        } else {
            self.forward(sh, coord, op, rid, Forwarded::Command { op, request_id: rid, cmd, reply: None });
        }
    }

    /// Hands a request to its owner shard, with this connection as the reply address.
    fn forward(&mut self, sh: &mut Shard, owner: usize, op: u8, rid: u64, f: Forwarded) {
        if sh.forward(owner, f.reply_to(self.outbox.clone())).is_err() {
            return self.error(op, rid, Status::Overloaded, "shard queue full; retry");
        }
        self.inflight += 1;
    }
}

fn put_batch(out: &mut Vec<u8>, rid: u64, values: &[u64]) {
    let start = begin_batch(out, rid, values.len());
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    end_frame(out, start);
}

/// Starts a `QUERY_BATCH` answer of `count` values (8 bytes each, which the
/// caller appends, then ends the frame at the returned start).
fn begin_batch(out: &mut Vec<u8>, rid: u64, count: usize) -> usize {
    let start = begin_frame(out, opcode::QUERY_BATCH | RESPONSE_BIT, rid);
    out.push(Status::Ok as u8);
    out.extend_from_slice(&(count as u16).to_le_bytes());
    out.reserve(count * 8);
    start
}
