//! Native async client for stockd: pipelined, shard-aware, typed.
//!
//! [`Client::connect`] says `HELLO` to the server, learns the shard count,
//! the key-to-shard hash and one port per shard, and opens one connection
//! per shard. Every key then goes straight to the shard that owns it, and
//! every mutation to the shard that coordinates its id; batches are split
//! per shard and sent in parallel. Any number of tasks may share a `Client`
//! (it is `Clone`); requests on one connection are pipelined, and answers
//! are matched to requests by request id.
//!
//! ```no_run
//! use stockd_client::{Client, Error, Line};
//!
//! # async fn demo() -> Result<(), Error> {
//! let client = Client::connect("127.0.0.1:7400").await?;
//! client.inbound(1, &[Line::new(1001, 7, 10)]).await?;
//! match client.order(42, &[Line::new(1001, 7, 2)]).await {
//!     Ok(applied) => println!("order 42 at LSN {}", applied.lsn()),
//!     Err(Error::Insufficient { line, available }) => println!("line {line}: only {available} left"),
//!     Err(e) => return Err(e),
//! }
//! assert_eq!(client.query(1001, 7).await?, 8);
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{lookup_host, TcpStream};
use tokio::sync::{mpsc, oneshot, Semaphore};

pub use stockd_protocol::{constant_time_eq, fmix64, HelloInfo, Key, Line, Reply, Request, Response, Status};
use stockd_protocol::{parse_frame, shard_of, HASH_FMIX64_MOD, HEADER_LEN, MAX_BATCH_KEYS};

/// Everything a call can fail with.
#[derive(Debug)]
pub enum Error {
    /// Connecting or talking to the server failed.
    Io(std::io::Error),
    /// The connection closed with the request unanswered. A mutation may or
    /// may not have been applied: retry it with the same id.
    Disconnected,
    /// The server sent something this client cannot read.
    Protocol(String),
    /// An order or hold was refused: `line` is the first line that cannot be filled.
    Insufficient { line: u16, available: u64 },
    /// Any other refusal, with the server's message.
    Server { status: Status, message: String },
}

impl Error {
    /// The status code, for errors that came from the server.
    pub fn status(&self) -> Option<Status> {
        match self {
            Error::Insufficient { .. } => Some(Status::InsufficientStock),
            Error::Server { status, .. } => Some(*status),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(e) => write!(f, "connection error: {e}"),
            Error::Disconnected => write!(f, "connection closed before the answer arrived"),
            Error::Protocol(m) => write!(f, "protocol error: {m}"),
            Error::Insufficient { line, available } => {
                write!(f, "insufficient stock: line {line} has only {available} available")
            }
            Error::Server { status, message } => write!(f, "{status}: {message}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e)
    }
}

/// A mutation that the server holds durably.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Applied by this call; its log sequence number.
    New { lsn: u64 },
    /// The id had been applied before (a retry); nothing changed.
    Duplicate { lsn: u64 },
}

impl Applied {
    pub fn lsn(&self) -> u64 {
        match *self {
            Applied::New { lsn } | Applied::Duplicate { lsn } => lsn,
        }
    }
}

/// How to connect.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Sent in HELLO; required when the server runs with `--auth-token`.
    pub token: Option<String>,
    /// Use only the given address (the server forwards keys between shards)
    /// instead of one connection per shard.
    pub single_connection: bool,
}

type Waiter = oneshot::Sender<Result<(u8, Vec<u8>), Error>>;

/// Requests one connection has in flight at most; more callers wait for a
/// slot, so a server that stops reading (overloaded, or stopped) makes
/// callers wait instead of growing this client's queues without bound.
/// Four times the server's own per-connection bound: the server pauses
/// reading a connection at 1,024, and the rest wait in the socket.
pub const MAX_IN_FLIGHT_PER_CONNECTION: usize = 4096;

/// One pipelined connection.
struct Conn {
    next_id: AtomicU64,
    pending: Arc<Mutex<Option<HashMap<u64, Waiter>>>>,
    tx: mpsc::UnboundedSender<Vec<u8>>,
    /// One permit per request in flight: bounds `pending` and the write queue.
    slots: Arc<Semaphore>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Result<Conn, Error> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot connect to {addr}: {e}")))?;
        stream.set_nodelay(true)?;
        let (mut rd, mut wr) = stream.into_split();
        let pending: Arc<Mutex<Option<HashMap<u64, Waiter>>>> = Arc::new(Mutex::new(Some(HashMap::new())));
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        // Writer: coalesces whatever is queued into one write.
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(64 << 10);
            while let Some(first) = rx.recv().await {
                buf.clear();
                buf.extend_from_slice(&first);
                // Let the other tasks of this runtime queue their requests
                // too, so that one write carries many frames (fewer syscalls
                // on both ends under pipelining; one scheduler pass of delay).
                tokio::task::yield_now().await;
                while buf.len() < (256 << 10) {
                    match rx.try_recv() {
                        Ok(f) => buf.extend_from_slice(&f),
                        Err(_) => break,
                    }
                }
                if wr.write_all(&buf).await.is_err() {
                    break;
                }
            }
        });
        // Reader: matches answers to waiters by request id.
        let p = pending.clone();
        tokio::spawn(async move {
            let mut buf: Vec<u8> = Vec::with_capacity(64 << 10);
            // Ends with the framing error's text, or None when the connection closed.
            let protocol_error: Option<String> = loop {
                let mut used = 0;
                let mut bad = None;
                loop {
                    match parse_frame(&buf[used..]) {
                        Ok(Some((h, body))) => {
                            let w = p.lock().unwrap().as_mut().and_then(|m| m.remove(&h.request_id));
                            if let Some(w) = w {
                                let _ = w.send(Ok((h.opcode, body.to_vec())));
                            }
                            used += HEADER_LEN + h.body_len;
                        }
                        Ok(None) => break,
                        Err(e) => {
                            bad = Some(if buf[used..].starts_with(b"HTTP/") {
                                format!("{addr} answered in HTTP: it is not a stockd server (an HTTP gateway's port?)")
                            } else {
                                format!("{addr}: {e}")
                            });
                            break;
                        }
                    }
                }
                buf.drain(..used);
                if bad.is_some() {
                    break bad;
                }
                buf.reserve(64 << 10);
                match rd.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => break None,
                    Ok(_) => {}
                }
            };
            // Every request still waiting fails; later calls see `None` and fail at once.
            let waiters = p.lock().unwrap().take().unwrap_or_default();
            for (_, w) in waiters {
                let _ = w.send(Err(protocol_error.clone().map_or(Error::Disconnected, Error::Protocol)));
            }
        });
        let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT_PER_CONNECTION));
        Ok(Conn { next_id: AtomicU64::new(1), pending, tx, slots })
    }

    async fn call(&self, req: &Request) -> Result<Response, Error> {
        // Held until the answer came (or the call was dropped).
        let _slot = self.slots.acquire().await.map_err(|_| Error::Disconnected)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut frame = Vec::with_capacity(64);
        req.encode(id, &mut frame);
        let (wtx, wrx) = oneshot::channel();
        match self.pending.lock().unwrap().as_mut() {
            Some(m) => m.insert(id, wtx),
            None => return Err(Error::Disconnected),
        };
        if self.tx.send(frame).is_err() {
            return Err(Error::Disconnected);
        }
        let (op, body) = wrx.await.map_err(|_| Error::Disconnected)??;
        Response::decode(op, &body).map_err(|e| Error::Protocol(e.0))
    }
}

struct Inner {
    conns: Vec<Conn>,
    hello: HelloInfo,
}

/// A stockd client; clone it freely, clones share the connections.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

fn unexpected(r: Response) -> Error {
    match r {
        Response::Insufficient { line, available } => Error::Insufficient { line, available },
        Response::Error { status, message } => Error::Server { status, message },
        other => Error::Protocol(format!("unexpected answer {other:?}")),
    }
}

impl Client {
    /// Connects shard-aware, without a token.
    pub async fn connect(addr: &str) -> Result<Client, Error> {
        Client::connect_with(addr, Options::default()).await
    }

    pub async fn connect_with(addr: &str, opts: Options) -> Result<Client, Error> {
        let name = addr;
        let addr = lookup_host(name)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("{name}: {e}")))?
            .next()
            .ok_or_else(|| Error::Protocol(format!("{name}: the name resolves to no address")))?;
        let first = Conn::open(addr).await?;
        let hello = Request::Hello { token: opts.token.clone().unwrap_or_default().into_bytes() };
        let info = match first.call(&hello).await? {
            Response::Ok(Reply::Hello(h)) => h,
            other => return Err(unexpected(other)),
        };
        if info.hash_id != HASH_FMIX64_MOD {
            return Err(Error::Protocol(format!("unknown shard hash {}", info.hash_id)));
        }
        let mut conns = Vec::new();
        if opts.single_connection || info.shard_ports.is_empty() {
            conns.push(first);
        } else {
            for port in &info.shard_ports {
                let c = Conn::open(SocketAddr::new(addr.ip(), *port)).await?;
                match c.call(&hello).await? {
                    Response::Ok(Reply::Hello(_)) => {}
                    other => return Err(unexpected(other)),
                }
                conns.push(c);
            }
        }
        Ok(Client { inner: Arc::new(Inner { conns, hello: info }) })
    }

    /// What the server said in HELLO.
    pub fn hello(&self) -> &HelloInfo {
        &self.inner.hello
    }

    fn conn_for(&self, id: u64) -> &Conn {
        let c = &self.inner.conns;
        if c.len() == 1 {
            &c[0]
        } else {
            &c[shard_of(id, c.len())]
        }
    }

    /// Sends any request to the shard that owns it and returns the raw answer.
    pub async fn call(&self, req: &Request) -> Result<Response, Error> {
        let route = match req {
            Request::Query { key } => key.item,
            Request::QueryItem { item } => *item,
            Request::QueryBatch { keys } => keys.first().map_or(0, |k| k.item),
            Request::Order { id, .. }
            | Request::Inbound { id, .. }
            | Request::Cancel { id }
            | Request::Reserve { id, .. }
            | Request::Confirm { id }
            | Request::Release { id } => *id,
            Request::Adjust { key, .. } => key.item,
            Request::Hello { .. } | Request::Ping | Request::Stats => 0,
        };
        self.conn_for(route).call(req).await
    }

    pub async fn ping(&self) -> Result<(), Error> {
        match self.call(&Request::Ping).await? {
            Response::Ok(Reply::Pong) => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Server counters, summed over shards.
    pub async fn stats(&self) -> Result<Vec<(String, u64)>, Error> {
        match self.call(&Request::Stats).await? {
            Response::Ok(Reply::Stats(s)) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    /// Available units of one row (0 for a row never stocked).
    pub async fn query(&self, item: u64, fc: u32) -> Result<u64, Error> {
        match self.call(&Request::Query { key: Key { item, fc } }).await? {
            Response::Ok(Reply::Available(n)) => Ok(n),
            other => Err(unexpected(other)),
        }
    }

    /// Every center of one item: (fulfillment_center_id, available).
    pub async fn query_item(&self, item: u64) -> Result<Vec<(u32, u64)>, Error> {
        match self.call(&Request::QueryItem { item }).await? {
            Response::Ok(Reply::Item(v)) => Ok(v),
            other => Err(unexpected(other)),
        }
    }

    /// Available units of many rows, in order. Keys are grouped by shard and
    /// sent as one batch frame per shard (split at the batch limit), in parallel.
    pub async fn query_batch(&self, keys: &[Key]) -> Result<Vec<u64>, Error> {
        let n = self.inner.conns.len();
        let mut groups: Vec<(Vec<usize>, Vec<Key>)> = vec![(Vec::new(), Vec::new()); n];
        for (i, k) in keys.iter().enumerate() {
            let g = &mut groups[if n == 1 { 0 } else { shard_of(k.item, n) }];
            g.0.push(i);
            g.1.push(*k);
        }
        let mut calls = Vec::new();
        for (s, (pos, ks)) in groups.iter().enumerate() {
            for (pc, kc) in pos.chunks(MAX_BATCH_KEYS).zip(ks.chunks(MAX_BATCH_KEYS)) {
                let req = Request::QueryBatch { keys: kc.to_vec() };
                calls.push(async move { (pc, self.inner.conns[s].call(&req).await) });
            }
        }
        let mut out = vec![0u64; keys.len()];
        for (pos, resp) in futures_join_all(calls).await {
            match resp? {
                Response::Ok(Reply::Batch(v)) if v.len() == pos.len() => {
                    for (p, v) in pos.iter().zip(v) {
                        out[*p] = v;
                    }
                }
                other => return Err(unexpected(other)),
            }
        }
        Ok(out)
    }

    async fn mutate(&self, req: Request) -> Result<Applied, Error> {
        match self.call(&req).await? {
            Response::Ok(Reply::Committed { lsn }) => Ok(Applied::New { lsn }),
            Response::Duplicate { lsn } => Ok(Applied::Duplicate { lsn }),
            other => Err(unexpected(other)),
        }
    }

    /// Places an order: all lines or none. `id` is the idempotency key.
    pub async fn order(&self, id: u64, lines: &[Line]) -> Result<Applied, Error> {
        self.mutate(Request::Order { id, lines: lines.to_vec() }).await
    }

    /// Books an inbound receipt (stock goes up). `id` is the idempotency key.
    pub async fn inbound(&self, id: u64, lines: &[Line]) -> Result<Applied, Error> {
        self.mutate(Request::Inbound { id, lines: lines.to_vec() }).await
    }

    /// Cancels an order (or a confirmed hold): its units come back, once.
    pub async fn cancel(&self, id: u64) -> Result<Applied, Error> {
        self.mutate(Request::Cancel { id }).await
    }

    /// Holds units for `ttl_ms`; confirm or release before the deadline.
    pub async fn reserve(&self, id: u64, ttl_ms: u32, lines: &[Line]) -> Result<Applied, Error> {
        self.mutate(Request::Reserve { id, ttl_ms, lines: lines.to_vec() }).await
    }

    /// Turns a hold into an order with the same id.
    pub async fn confirm(&self, id: u64) -> Result<Applied, Error> {
        self.mutate(Request::Confirm { id }).await
    }

    /// Gives a hold's units back.
    pub async fn release(&self, id: u64) -> Result<Applied, Error> {
        self.mutate(Request::Release { id }).await
    }

    /// Sets a row's on-hand quantity after a stock-take.
    pub async fn adjust(&self, item: u64, fc: u32, on_hand: u64, reason: u16) -> Result<Applied, Error> {
        self.mutate(Request::Adjust { key: Key { item, fc }, on_hand, reason }).await
    }
}

/// Awaits futures concurrently, results in input order (a tiny join_all, to
/// keep the dependency list short).
async fn futures_join_all<F: std::future::Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut futs: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = (0..futs.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (f, o) in futs.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *o = Some(v),
                    std::task::Poll::Pending => done = false,
                }
            }
        }
        if done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    out.into_iter().map(|o| o.expect("polled to completion")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_server_that_stops_reading_makes_callers_wait_instead_of_queues_grow() {
        // A peer that accepts and never reads nor answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let conn = Arc::new(Conn::open(listener.local_addr().unwrap()).await.unwrap());
        let (_silent_peer, _) = listener.accept().await.unwrap();
        let callers: Vec<_> = (0..MAX_IN_FLIGHT_PER_CONNECTION + 3_000)
            .map(|i| {
                let conn = conn.clone();
                tokio::spawn(async move {
                    conn.call(&Request::Query { key: Key { item: i as u64, fc: 1 } }).await
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let in_flight = conn.pending.lock().unwrap().as_ref().map_or(0, HashMap::len);
        assert_eq!(in_flight, MAX_IN_FLIGHT_PER_CONNECTION, "the rest wait for a slot");
        assert_eq!(conn.slots.available_permits(), 0);
        for c in callers {
            c.abort();
        }
    }
}
