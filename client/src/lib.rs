//! Native async client for stockd: pipelined, shard-aware, typed.
//!
//! [`Client::connect`] says `HELLO` to the server, learns the shard count,
//! the key-to-shard hash and one port per shard, and opens one connection
//! per shard. Every key then goes straight to the shard that owns it, and
//! every mutation to the shard that coordinates its id; batches are split
//! per shard and sent in parallel. Any number of tasks may share a `Client`
//! (it is `Clone`); requests on one connection are pipelined, and answers
//! are matched to requests by request id. The clients one thread connects
//! to one server share their connections too, so that its requests travel
//! over deep sockets, not over many shallow ones (see [`Options::own_connections`]).
//!
//! [`Replicated`] takes several addresses of a replicated stockd and follows
//! the primary among them (docs/ha.md).
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

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{lookup_host, TcpStream};
use tokio::sync::Notify;

pub use stockd_protocol::{
    constant_time_eq, fmix64, prefetch, HelloInfo, Key, Line, Reply, Request, Response, Status,
};
use stockd_protocol::{
    encode_batch_frame, encode_lines_frame, opcode, parse_frame, shard_of, HASH_FMIX64_MOD, HEADER_LEN,
    MAX_BATCH_KEYS,
};

mod replicated;
mod shared;
pub use replicated::Replicated;

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
    /// Open connections of this client's own. By default a client shares
    /// the connections of the clients this thread connected before, in the
    /// same tokio runtime, to the same address with the same token and
    /// `single_connection`, while one of them is still held: one socket per
    /// shard carries all of their requests, so each send and read carries
    /// many (sixteen clients of 16 requests on two threads: 2.3x the
    /// queries and 1.15x the orders on one shard, 2.9x and 1.7x on two,
    /// docs/benchmarks.md). Own connections keep one client's traffic off
    /// the others' sockets (a bulk load beside latency-sensitive reads, say).
    pub own_connections: bool,
}

/// Requests one connection has in flight at most; more callers wait for a
/// slot, so a server that stops reading (overloaded, or stopped) makes
/// callers wait instead of growing this client's queues without bound.
/// Four times the server's own per-connection bound: the server pauses
/// reading a connection at 1,024, and the rest wait in the socket.
pub const MAX_IN_FLIGHT_PER_CONNECTION: usize = 4096;

/// Frames in one write that make it worth its syscall: a writer with fewer
/// waits for the callers that answers woke before it writes (see
/// [`Unclaimed`]); one with more writes at once, as waiting would only
/// delay them (1-line orders on one shard: ~250 frames a write, and 0.93x
/// the orders when they waited, docs/benchmarks.md).
const DEEP_WRITE: usize = 64;

/// Request ids are (generation << 16) | slot: an answer finds its caller's
/// slot without a lookup, and a late answer for a slot that has been given
/// to another request since (its caller gave up) does not match it.
const SLOT_BITS: u32 = 16;
const _: () = assert!(MAX_IN_FLIGHT_PER_CONNECTION <= 1 << SLOT_BITS);

/// A caller's place in a connection's table.
enum Slot {
    Free,
    /// Sent, no answer yet: the request id, and who to wake.
    Waiting {
        id: u64,
        waker: Option<Waker>,
    },
    Answered(Result<Response, Error>),
}

/// What the callers, the writer task and the reader task of one connection share.
struct ConnState {
    /// Frames encoded by callers, not yet taken by the writer.
    out: Vec<u8>,
    /// How many frames `out` holds.
    frames: usize,
    slots: Vec<Slot>,
    free: Vec<u16>,
    /// Callers waiting for a slot (all were taken), first come first
    /// served: each its ticket and who to wake.
    queue: VecDeque<(u64, Option<Waker>)>,
    /// Slots handed to callers of the queue that have not taken them yet.
    granted: Vec<(u64, u16)>,
    next_ticket: u64,
    generation: u64,
    /// Set once the connection is gone: what every later call fails with.
    closed: Option<Option<String>>,
    /// The `Conn` was dropped: the writer ends (closing the socket's write side).
    dropped: bool,
}

impl ConnState {
    fn new(slots: usize) -> ConnState {
        ConnState {
            out: Vec::with_capacity(64 << 10),
            frames: 0,
            slots: (0..slots).map(|_| Slot::Free).collect(),
            free: (0..slots as u16).rev().collect(),
            queue: VecDeque::new(),
            granted: Vec::new(),
            next_ticket: 0,
            generation: 0,
            closed: None,
            dropped: false,
        }
    }

    /// A slot for a caller: a free one if no caller waits before it, else
    /// its place in the queue (`ticket`, which it keeps until it is given
    /// a slot). None: wait.
    fn take_slot(&mut self, ticket: &mut Option<u64>, waker: &Waker) -> Option<usize> {
        if let Some(t) = *ticket {
            if let Some(at) = self.granted.iter().position(|(g, _)| *g == t) {
                *ticket = None;
                return Some(self.granted.swap_remove(at).1 as usize);
            }
            if let Some((_, w)) = self.queue.iter_mut().find(|(q, _)| *q == t) {
                if !w.as_ref().is_some_and(|w| w.will_wake(waker)) {
                    *w = Some(waker.clone());
                }
            }
            return None;
        }
        if self.queue.is_empty() {
            if let Some(index) = self.free.pop() {
                return Some(index as usize);
            }
        }
        self.next_ticket += 1;
        *ticket = Some(self.next_ticket);
        self.queue.push_back((self.next_ticket, Some(waker.clone())));
        None
    }

    /// Gives slot `index` back: to the first caller of the queue, if one
    /// waits (returned, to be woken once the lock is released), else to
    /// the free list.
    fn give_back(&mut self, index: usize) -> Option<Waker> {
        self.slots[index] = Slot::Free;
        match self.queue.pop_front() {
            Some((ticket, waker)) => {
                self.granted.push((ticket, index as u16));
                waker
            }
            None => {
                self.free.push(index as u16);
                None
            }
        }
    }

    /// A caller with `ticket` gave up: out of the queue, and a slot it was
    /// given but had not taken goes to the next.
    fn leave_queue(&mut self, ticket: u64) -> Option<Waker> {
        if let Some(at) = self.queue.iter().position(|(q, _)| *q == ticket) {
            self.queue.remove(at);
            return None;
        }
        let at = self.granted.iter().position(|(g, _)| *g == ticket)?;
        let (_, index) = self.granted.swap_remove(at);
        self.give_back(index as usize)
    }

    /// Fails every waiting caller and every later call; how many callers
    /// it answered (with the error), and who to wake.
    fn close(&mut self, protocol_error: Option<String>) -> (usize, Vec<Waker>) {
        let mut wake = Vec::new();
        wake.extend(self.queue.iter_mut().filter_map(|(_, w)| w.take()));
        let mut answered = 0;
        for slot in self.slots.iter_mut() {
            if let Slot::Waiting { waker, .. } = slot {
                wake.extend(waker.take());
                *slot = Slot::Answered(Err(closed_error(&protocol_error)));
                answered += 1;
            }
        }
        self.closed.get_or_insert(protocol_error);
        (answered, wake)
    }
}

fn closed_error(protocol_error: &Option<String>) -> Error {
    protocol_error.clone().map_or(Error::Disconnected, Error::Protocol)
}

struct ConnShared {
    state: Mutex<ConnState>,
    /// Wakes the writer: frames are waiting in `out`, or the `Conn` was dropped.
    writer: Notify,
    /// Answers of this connection's set (see [`Unclaimed`]) that no caller
    /// has taken yet.
    unclaimed: Arc<Unclaimed>,
}

impl ConnShared {
    /// Fails every waiting caller and every later call.
    fn close(&self, protocol_error: Option<String>) {
        let mut st = self.state.lock().unwrap();
        let (answered, wake) = st.close(protocol_error);
        // Counted before a caller can take one of them (under the lock).
        self.unclaimed.add(answered);
        drop(st);
        wake.into_iter().for_each(Waker::wake);
    }
}

/// How many answers the callers of a set of connections have not taken
/// yet: callers a reader woke that have not run. A writer lets them run
/// before it writes, so that the requests they send next go out in the
/// same write (a socket per shard carries a shard's share of a thread's
/// requests; without the wait, a writer that ran before the callers its
/// neighbours' readers woke sent a few frames at a time).
#[derive(Default)]
struct Unclaimed(AtomicUsize);

impl Unclaimed {
    fn add(&self, n: usize) {
        if n > 0 {
            self.0.fetch_add(n, Relaxed);
        }
    }

    fn take_one(&self) {
        self.0.fetch_sub(1, Relaxed);
    }

    /// Returns once no answer waits for its caller, or a turn of the
    /// runtime's queue has passed with none taken (a caller that woke on
    /// another thread, or whose task is busy elsewhere, is not waited
    /// for), and after at most `MAX_TURNS` turns.
    async fn drained(&self) {
        const MAX_TURNS: usize = 4;
        let mut before = usize::MAX;
        for _ in 0..MAX_TURNS {
            let now = self.0.load(Relaxed);
            if now == 0 || now >= before {
                return;
            }
            before = now;
            // To the back of the run queue, behind the callers already woken
            // (tokio's `yield_now` would run before them).
            let mut queued = false;
            std::future::poll_fn(|cx| {
                if queued {
                    return Poll::Ready(());
                }
                queued = true;
                cx.waker().wake_by_ref();
                Poll::Pending
            })
            .await;
        }
    }
}

/// One pipelined connection. A caller encodes its frame straight into the
/// connection's output buffer and waits in a slot of a fixed table; one
/// writer task sends whatever frames have collected in one write, one
/// reader task decodes the answers of a whole read and wakes their callers.
/// Per request: no allocation (but for answers that carry vectors), no
/// channel and no hashing; two locks by the caller, a share of the
/// reader's one lock per read, and one count of [`Unclaimed`] answers.
struct Conn {
    shared: Arc<ConnShared>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.shared.state.lock().unwrap().dropped = true;
        self.shared.writer.notify_one();
    }
}

impl Conn {
    async fn open(addr: SocketAddr, unclaimed: Arc<Unclaimed>) -> Result<Conn, Error> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot connect to {addr}: {e}")))?;
        stream.set_nodelay(true)?;
        let (mut rd, mut wr) = stream.into_split();
        let shared = Arc::new(ConnShared {
            state: Mutex::new(ConnState::new(MAX_IN_FLIGHT_PER_CONNECTION)),
            writer: Notify::new(),
            unclaimed,
        });
        // Writer: takes every frame that has collected and sends them in one write.
        let sh = shared.clone();
        tokio::spawn(async move {
            let mut sending: Vec<u8> = Vec::with_capacity(64 << 10);
            loop {
                {
                    let mut st = sh.state.lock().unwrap();
                    if st.out.is_empty() && (st.dropped || st.closed.is_some()) {
                        break;
                    }
                    std::mem::swap(&mut st.out, &mut sending);
                    st.frames = 0;
                }
                if sending.is_empty() {
                    sh.writer.notified().await;
                    // Let the other tasks of this runtime add their frames too,
                    // so that one write carries many (fewer syscalls on both
                    // ends); and if that leaves the socket shallow, the callers
                    // that answers woke too (they run after the readers that
                    // `yield_now` waits for).
                    tokio::task::yield_now().await;
                    if sh.state.lock().unwrap().frames < DEEP_WRITE {
                        sh.unclaimed.drained().await;
                    }
                    continue;
                }
                if wr.write_all(&sending).await.is_err() {
                    sh.close(None);
                    break;
                }
                sending.clear();
            }
        });
        // Reader: decodes the answers of each read, then hands them to their
        // callers under one lock.
        let sh = shared.clone();
        tokio::spawn(async move {
            let mut buf: Vec<u8> = Vec::with_capacity(64 << 10);
            let mut answers: Vec<(u64, Result<Response, Error>)> = Vec::new();
            let mut wake: Vec<Waker> = Vec::new();
            // Ends with the framing error's text, or None when the connection closed.
            let protocol_error: Option<String> = loop {
                let mut used = 0;
                let mut bad = None;
                loop {
                    match parse_frame(&buf[used..]) {
                        Ok(Some((h, body))) => {
                            let answer = Response::decode(h.opcode, body).map_err(|e| Error::Protocol(e.0));
                            answers.push((h.request_id, answer));
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
                if !answers.is_empty() {
                    let mut st = sh.state.lock().unwrap();
                    let mut answered = 0;
                    for (id, answer) in answers.drain(..) {
                        let slot = &mut st.slots[(id & ((1 << SLOT_BITS) - 1)) as usize];
                        if let Slot::Waiting { id: waiting, waker } = slot {
                            if *waiting == id {
                                wake.extend(waker.take());
                                *slot = Slot::Answered(answer);
                                answered += 1;
                            }
                        }
                    }
                    sh.unclaimed.add(answered);
                }
                wake.drain(..).for_each(Waker::wake);
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
            sh.close(protocol_error);
            sh.writer.notify_one();
        });
        Ok(Conn { shared })
    }

    async fn call(&self, req: &Request) -> Result<Response, Error> {
        self.call_with(|request_id, out| req.encode(request_id, out)).await
    }

    /// Whether the connection is gone (closed by either end, or broken).
    fn is_closed(&self) -> bool {
        self.shared.state.lock().unwrap().closed.is_some()
    }

    /// Says `HELLO`; what the server answered.
    async fn hello(&self, token: &Option<String>) -> Result<HelloInfo, Error> {
        let hello = Request::Hello { token: token.clone().unwrap_or_default().into_bytes() };
        match self.call(&hello).await? {
            Response::Ok(Reply::Hello(h)) => Ok(h),
            other => Err(unexpected(other)),
        }
    }

    /// Sends the frame `encode` appends for a request id. One lock to send
    /// (taking a slot, encoding the frame, leaving the waker), one to take
    /// the answer (freeing the slot). With every slot taken, the caller
    /// waits in the connection's queue for the next one given back.
    async fn call_with(&self, encode: impl Fn(u64, &mut Vec<u8>)) -> Result<Response, Error> {
        // Gives the slot (or the place in the queue) back if the caller
        // gives up (a late answer then matches no slot); an answered call
        // gives it back itself.
        let mut slot = SlotGuard { shared: &self.shared, index: None, ticket: None };
        std::future::poll_fn(|cx| {
            let mut st = self.shared.state.lock().unwrap();
            let Some(index) = slot.index else {
                if let Some(e) = &st.closed {
                    return Poll::Ready(Err(closed_error(e)));
                }
                let Some(index) = st.take_slot(&mut slot.ticket, cx.waker()) else {
                    return Poll::Pending;
                };
                st.generation += 1;
                let id = st.generation << SLOT_BITS | index as u64;
                st.slots[index] = Slot::Waiting { id, waker: Some(cx.waker().clone()) };
                let first = st.out.is_empty();
                encode(id, &mut st.out);
                st.frames += 1;
                drop(st);
                slot.index = Some(index);
                if first {
                    self.shared.writer.notify_one();
                }
                return Poll::Pending;
            };
            match &mut st.slots[index] {
                Slot::Waiting { waker, .. } => {
                    if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                        *waker = Some(cx.waker().clone());
                    }
                    Poll::Pending
                }
                Slot::Answered(_) => {
                    let Slot::Answered(answer) = std::mem::replace(&mut st.slots[index], Slot::Free) else {
                        unreachable!("matched above")
                    };
                    let next = st.give_back(index);
                    drop(st);
                    self.shared.unclaimed.take_one();
                    slot.index = None;
                    next.into_iter().for_each(Waker::wake);
                    Poll::Ready(answer)
                }
                Slot::Free => unreachable!("a slot is freed only by its own caller"),
            }
        })
        .await
    }
}

/// A caller's slot, or its place in the queue for one, given back if the
/// call is dropped before its answer.
struct SlotGuard<'a> {
    shared: &'a ConnShared,
    index: Option<usize>,
    ticket: Option<u64>,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        if self.index.is_none() && self.ticket.is_none() {
            return;
        }
        let mut st = self.shared.state.lock().unwrap();
        let next = match (self.index, self.ticket) {
            (Some(index), _) => {
                if matches!(st.slots[index], Slot::Answered(_)) {
                    self.shared.unclaimed.take_one();
                }
                st.give_back(index)
            }
            (None, Some(ticket)) => st.leave_queue(ticket),
            (None, None) => None,
        };
        drop(st);
        next.into_iter().for_each(Waker::wake);
    }
}

/// A client's connections and what the server said about itself: one set
/// per client, or shared by the clients of a thread (`shared.rs`).
struct Inner {
    conns: Vec<Conn>,
    hello: HelloInfo,
}

impl Inner {
    /// Says `HELLO` at `addr`, then opens a connection per shard (and says
    /// `HELLO` on each), unless `opts` asks for the one connection.
    async fn open(addr: SocketAddr, opts: &Options) -> Result<Inner, Error> {
        let unclaimed = Arc::new(Unclaimed::default());
        let first = Conn::open(addr, unclaimed.clone()).await?;
        let hello = first.hello(&opts.token).await?;
        if hello.hash_id != HASH_FMIX64_MOD {
            return Err(Error::Protocol(format!("unknown shard hash {}", hello.hash_id)));
        }
        let mut conns = Vec::new();
        if opts.single_connection || hello.shard_ports.is_empty() {
            conns.push(first);
        } else {
            for port in &hello.shard_ports {
                let c = Conn::open(SocketAddr::new(addr.ip(), *port), unclaimed.clone()).await?;
                c.hello(&opts.token).await?;
                conns.push(c);
            }
        }
        Ok(Inner { conns, hello })
    }

    /// Whether every connection of a set found for another client still
    /// reaches the server that made it: each answers `HELLO` (with that
    /// client's token) as it did when it was opened. After a restart on the
    /// same port the old sockets fail or the answer differs.
    async fn still_serving(&self, opts: &Options) -> bool {
        if self.conns.iter().any(Conn::is_closed) {
            return false;
        }
        let hellos = futures_util::future::join_all(self.conns.iter().map(|c| c.hello(&opts.token))).await;
        hellos.into_iter().all(|h| h.is_ok_and(|h| h == self.hello))
    }
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

    /// Connects with `opts`: to a set of connections of this thread's
    /// clients if one matches (see [`Options::own_connections`]), else to
    /// new ones.
    pub async fn connect_with(addr: &str, opts: Options) -> Result<Client, Error> {
        let name = addr;
        let addr = lookup_host(name)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("{name}: {e}")))?
            .next()
            .ok_or_else(|| Error::Protocol(format!("{name}: the name resolves to no address")))?;
        let key = shared::SetKey::new(addr, &opts);
        if let Some(inner) = key.as_ref().and_then(shared::find) {
            if inner.still_serving(&opts).await {
                return Ok(Client { inner });
            }
        }
        let inner = Arc::new(Inner::open(addr, &opts).await?);
        if let Some(key) = key {
            shared::offer(key, &inner);
        }
        Ok(Client { inner })
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
            Request::Hello { .. } | Request::Ping | Request::Stats | Request::Promote => 0,
        };
        self.conn_for(route).call(req).await
    }

    pub async fn ping(&self) -> Result<(), Error> {
        match self.call(&Request::Ping).await? {
            Response::Ok(Reply::Pong) => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Asks a replicating standby to take over as the primary now (docs/ha.md):
    /// `Ok` once asked; it serves as the primary when its promotion is read
    /// back (`replication_role` 1 in [`Client::stats`]).
    pub async fn promote(&self) -> Result<(), Error> {
        match self.call(&Request::Promote).await? {
            Response::Ok(Reply::Promoting) => Ok(()),
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
    /// sent as one batch frame per shard (split at the batch limit), in
    /// parallel. Keys that all live on one shard (always so over a single
    /// connection) go as they are: the one allocation is the answer's.
    /// Otherwise a counting sort puts each shard's keys side by side, each
    /// frame is encoded from its slice, and each answer is written straight
    /// to the places its keys came from: a few allocations per batch, not a
    /// few per shard.
    pub async fn query_batch(&self, keys: &[Key]) -> Result<Vec<u64>, Error> {
        let n = self.inner.conns.len();
        let owner = |k: &Key| if n == 1 { 0 } else { shard_of(k.item, n) };
        let Some(first) = keys.first().map(owner) else {
            return Ok(Vec::new());
        };
        if keys.len() <= MAX_BATCH_KEYS && keys.iter().all(|k| owner(k) == first) {
            return self.batch_frame(first, keys).await;
        }
        // Each shard's keys at sorted[start[s]..start[s + 1]], in the order
        // given; origin[p]: where the key at sorted[p] came from.
        let owners: Vec<u32> = keys.iter().map(|k| owner(k) as u32).collect();
        let mut start = vec![0usize; n + 1];
        for &o in &owners {
            start[o as usize + 1] += 1;
        }
        for s in 0..n {
            start[s + 1] += start[s];
        }
        let mut next = start.clone();
        let mut sorted = vec![Key { item: 0, fc: 0 }; keys.len()];
        let mut origin = vec![0u32; keys.len()];
        for (i, (k, &o)) in keys.iter().zip(&owners).enumerate() {
            let at = &mut next[o as usize];
            sorted[*at] = *k;
            origin[*at] = i as u32;
            *at += 1;
        }
        // A frame per shard with keys, and per MAX_BATCH_KEYS of them;
        // collected first, so that join_all knows how many and keeps them in
        // one allocation.
        let sorted = &sorted;
        let frames = (0..n).map(|s| (start[s + 1] - start[s]).div_ceil(MAX_BATCH_KEYS)).sum();
        let mut calls = Vec::with_capacity(frames);
        calls.extend((0..n).flat_map(|s| {
            let (from, to) = (start[s], start[s + 1]);
            (from..to).step_by(MAX_BATCH_KEYS).map(move |p| async move {
                let values = self.batch_frame(s, &sorted[p..to.min(p + MAX_BATCH_KEYS)]).await?;
                Ok::<_, Error>((p, values))
            })
        }));
        let mut out = vec![0u64; keys.len()];
        for answer in futures_util::future::join_all(calls).await {
            let (p, values) = answer?;
            for (q, v) in (p..).zip(values) {
                out[origin[q] as usize] = v;
            }
        }
        Ok(out)
    }

    /// One batch frame to one shard; the answer is checked to hold a value per key.
    async fn batch_frame(&self, shard: usize, keys: &[Key]) -> Result<Vec<u64>, Error> {
        let encode = |request_id, out: &mut Vec<u8>| encode_batch_frame(request_id, keys, out);
        match self.inner.conns[shard].call_with(encode).await? {
            Response::Ok(Reply::Batch(v)) if v.len() == keys.len() => Ok(v),
            other => Err(unexpected(other)),
        }
    }

    fn applied(answer: Response) -> Result<Applied, Error> {
        match answer {
            Response::Ok(Reply::Committed { lsn }) => Ok(Applied::New { lsn }),
            Response::Duplicate { lsn } => Ok(Applied::Duplicate { lsn }),
            other => Err(unexpected(other)),
        }
    }

    async fn mutate(&self, req: Request) -> Result<Applied, Error> {
        Client::applied(self.call(&req).await?)
    }

    /// A mutation with lines, encoded from the caller's slice (no copy).
    async fn mutate_lines(
        &self,
        op: u8,
        id: u64,
        ttl_ms: Option<u32>,
        lines: &[Line],
    ) -> Result<Applied, Error> {
        let encode =
            |request_id, out: &mut Vec<u8>| encode_lines_frame(op, request_id, id, ttl_ms, lines, out);
        Client::applied(self.conn_for(id).call_with(encode).await?)
    }

    /// Places an order: all lines or none. `id` is the idempotency key.
    pub async fn order(&self, id: u64, lines: &[Line]) -> Result<Applied, Error> {
        self.mutate_lines(opcode::ORDER, id, None, lines).await
    }

    /// Books an inbound receipt (stock goes up). `id` is the idempotency key.
    pub async fn inbound(&self, id: u64, lines: &[Line]) -> Result<Applied, Error> {
        self.mutate_lines(opcode::INBOUND, id, None, lines).await
    }

    /// Cancels an order (or a confirmed hold): its units come back, once.
    pub async fn cancel(&self, id: u64) -> Result<Applied, Error> {
        self.mutate(Request::Cancel { id }).await
    }

    /// Holds units for `ttl_ms`; confirm or release before the deadline.
    pub async fn reserve(&self, id: u64, ttl_ms: u32, lines: &[Line]) -> Result<Applied, Error> {
        self.mutate_lines(opcode::RESERVE, id, Some(ttl_ms), lines).await
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
#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Reads frames until it has seen `n` request ids (all of them, in order).
    async fn ids(peer: &mut TcpStream, seen: &mut Vec<u8>, n: usize) -> Vec<u64> {
        loop {
            let mut out = Vec::new();
            let mut at = 0;
            while let Ok(Some((h, _))) = parse_frame(&seen[at..]) {
                out.push(h.request_id);
                at += HEADER_LEN + h.body_len;
            }
            if out.len() >= n {
                return out;
            }
            assert!(peer.read_buf(seen).await.unwrap() > 0, "the client closed the connection");
        }
    }

    fn query(item: u64) -> Request {
        Request::Query { key: Key { item, fc: 1 } }
    }

    fn unclaimed(conn: &Conn) -> usize {
        conn.shared.unclaimed.0.load(Relaxed)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_late_answer_for_a_caller_that_gave_up_never_reaches_the_next_caller_of_its_slot() {
        use stockd_protocol::opcode;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let conn = Arc::new(Conn::open(listener.local_addr().unwrap(), Arc::default()).await.unwrap());
        let (mut peer, _) = listener.accept().await.unwrap();
        let mut seen: Vec<u8> = Vec::new();
        // The first caller gives up before its answer comes.
        let gave_up = tokio::time::timeout(Duration::from_millis(100), conn.call(&query(1))).await;
        assert!(gave_up.is_err());
        // The next caller gets the same slot (the table hands out the slot freed last).
        let next = tokio::spawn({
            let conn = conn.clone();
            async move { conn.call(&query(2)).await }
        });
        let sent = ids(&mut peer, &mut seen, 2).await;
        assert_eq!(sent[0] & 0xFFFF, sent[1] & 0xFFFF, "the slot is reused");
        assert_ne!(sent[0], sent[1], "under another request id");
        // The late answer comes first, then the right one.
        let mut answers = Vec::new();
        Response::Ok(Reply::Available(111)).encode(opcode::QUERY, sent[0], &mut answers);
        Response::Ok(Reply::Available(222)).encode(opcode::QUERY, sent[1], &mut answers);
        peer.write_all(&answers).await.unwrap();
        match next.await.unwrap().unwrap() {
            Response::Ok(Reply::Available(n)) => assert_eq!(n, 222),
            other => panic!("{other:?}"),
        }
        // Both slots are free again, and a closed connection fails later calls at once.
        drop(peer);
        let after = conn.call(&query(3)).await;
        assert!(matches!(after, Err(Error::Disconnected)), "{after:?}");
        let st = conn.shared.state.lock().unwrap();
        assert_eq!(st.free.len(), MAX_IN_FLIGHT_PER_CONNECTION);
        assert!(st.queue.is_empty() && st.granted.is_empty());
        drop(st);
        assert_eq!(unclaimed(&conn), 0, "every answer stored was taken");
    }

    /// The writer lets the callers that answers woke send first, but an
    /// answer whose caller never comes for it does not hold the writer up,
    /// and a caller that gives up after its answer came takes it off the count.
    #[tokio::test]
    async fn a_writer_does_not_wait_for_an_answer_nobody_takes() {
        use std::future::Future;
        use stockd_protocol::opcode;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let conn = Conn::open(listener.local_addr().unwrap(), Arc::default()).await.unwrap();
        let (mut peer, _) = listener.accept().await.unwrap();
        let mut seen: Vec<u8> = Vec::new();
        // A caller sends (one poll) and is answered, but is not polled again.
        let (first, second) = (query(1), query(2));
        let mut held = Box::pin(conn.call(&first));
        std::future::poll_fn(|cx| {
            assert!(held.as_mut().poll(cx).is_pending());
            Poll::Ready(())
        })
        .await;
        let sent = ids(&mut peer, &mut seen, 1).await;
        let mut answer = Vec::new();
        Response::Ok(Reply::Available(111)).encode(opcode::QUERY, sent[0], &mut answer);
        peer.write_all(&answer).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), async {
            while unclaimed(&conn) == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("the answer is stored for its caller");
        // Another caller's request still goes out, and its answer comes back.
        let serve = async {
            let sent = ids(&mut peer, &mut seen, 2).await;
            let mut answer = Vec::new();
            Response::Ok(Reply::Available(222)).encode(opcode::QUERY, sent[1], &mut answer);
            peer.write_all(&answer).await.unwrap();
        };
        let (next, ()) =
            tokio::time::timeout(Duration::from_secs(5), async { tokio::join!(conn.call(&second), serve) })
                .await
                .expect("the second request was written");
        assert!(matches!(next, Ok(Response::Ok(Reply::Available(222)))), "{next:?}");
        assert_eq!(unclaimed(&conn), 1, "the first answer still waits for its caller");
        drop(held);
        assert_eq!(unclaimed(&conn), 0, "a caller that gave up after its answer came takes it off the count");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_server_that_stops_reading_makes_callers_wait_instead_of_queues_grow() {
        // A peer that accepts and never reads nor answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let conn = Arc::new(Conn::open(listener.local_addr().unwrap(), Arc::default()).await.unwrap());
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
        let (in_flight, queued) = {
            let st = conn.shared.state.lock().unwrap();
            (st.slots.iter().filter(|s| matches!(s, Slot::Waiting { .. })).count(), st.queue.len())
        };
        assert_eq!(in_flight, MAX_IN_FLIGHT_PER_CONNECTION);
        assert_eq!(queued, 3_000, "the rest wait for a slot");
        for c in callers {
            c.abort();
        }
    }

    /// Counts its wake-ups.
    struct Count(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn counted() -> (Arc<Count>, Waker) {
        let c = Arc::new(Count(0.into()));
        (c.clone(), Waker::from(c))
    }

    #[test]
    fn callers_beyond_the_table_get_slots_in_the_order_they_came_and_one_that_gives_up_passes_its_turn_on() {
        let mut st = ConnState::new(2);
        let (_, w) = counted();
        let (mut a, mut b) = (None, None);
        let (sa, sb) = (st.take_slot(&mut a, &w).unwrap(), st.take_slot(&mut b, &w).unwrap());
        // Three more callers queue: c, d, e.
        let ((cc, wc), (_, wd), (ce, we)) = (counted(), counted(), counted());
        let (mut c, mut d, mut e) = (None, None, None);
        assert_eq!(st.take_slot(&mut c, &wc), None);
        assert_eq!(st.take_slot(&mut d, &wd), None);
        assert_eq!(st.take_slot(&mut e, &we), None);
        assert_eq!(st.queue.len(), 3);
        // d gives up while it waits: out of the queue, nobody woken.
        assert!(st.leave_queue(d.unwrap()).is_none());
        // a's slot comes back: it goes to c, the first in line, not to the free list...
        st.give_back(sa).unwrap().wake();
        assert_eq!(cc.0.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert!(st.free.is_empty());
        // ...and a newcomer does not take it from c.
        let mut late = None;
        assert_eq!(st.take_slot(&mut late, &w), None, "a newcomer queues behind e");
        // c gives up before it takes the slot: it passes to e.
        st.leave_queue(c.unwrap()).unwrap().wake();
        assert_eq!(ce.0.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert_eq!(st.take_slot(&mut e, &we), Some(sa));
        assert_eq!(e, None, "a caller with a slot has no ticket");
        // b's slot goes to the newcomer; then both come back to the free list.
        st.give_back(sb).unwrap().wake();
        assert_eq!(st.take_slot(&mut late, &w), Some(sb));
        assert!(st.give_back(sa).is_none() && st.give_back(sb).is_none());
        assert_eq!(st.free.len(), 2);
        assert!(st.queue.is_empty() && st.granted.is_empty());
    }

    /// Random takes, give-backs and give-ups against a small table: every
    /// slot is always in exactly one place (free, handed to a queued
    /// caller, or held), no caller waits while a slot is free, and slots
    /// are handed to the queue's callers in the order they came.
    #[test]
    fn the_slot_queue_keeps_its_books_under_random_callers() {
        let (_, w) = counted();
        let mut st = ConnState::new(4);
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut rand = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        // Callers: (ticket, slot held). Tickets of waiting callers, in the order they queued.
        let mut callers: Vec<(Option<u64>, Option<usize>)> = Vec::new();
        let mut served_tickets: Vec<u64> = Vec::new();
        for _ in 0..20_000 {
            match rand(4) {
                0 => {
                    let mut ticket = None;
                    let got = st.take_slot(&mut ticket, &w);
                    callers.push((ticket, got));
                }
                1 if !callers.is_empty() => {
                    // A waiting caller polls again (it may have been handed a slot).
                    let i = rand(callers.len());
                    if let (Some(t), None) = callers[i] {
                        let mut ticket = Some(t);
                        if let Some(slot) = st.take_slot(&mut ticket, &w) {
                            served_tickets.push(t);
                            callers[i] = (None, Some(slot));
                        }
                    }
                }
                2 if !callers.is_empty() => {
                    // A caller with a slot is answered and gives it back.
                    let i = rand(callers.len());
                    if let (_, Some(slot)) = callers[i] {
                        let _ = st.give_back(slot);
                        callers.swap_remove(i);
                    }
                }
                _ if !callers.is_empty() => {
                    // A waiting caller gives up.
                    let i = rand(callers.len());
                    if let (Some(t), None) = callers[i] {
                        let _ = st.leave_queue(t);
                        callers.swap_remove(i);
                    }
                }
                _ => {}
            }
            let held = callers.iter().filter(|(_, s)| s.is_some()).count();
            assert_eq!(held + st.free.len() + st.granted.len(), 4, "every slot in one place");
            assert!(st.free.is_empty() || st.queue.is_empty(), "nobody waits beside a free slot");
            let waiting = callers.iter().filter(|(t, s)| t.is_some() && s.is_none()).count();
            assert_eq!(waiting, st.queue.len() + st.granted.len());
            let granted_last = st.granted.iter().map(|(t, _)| *t).max();
            let queued_first = st.queue.front().map(|(t, _)| *t);
            if let (Some(g), Some(q)) = (granted_last, queued_first) {
                assert!(g < q, "a slot went to ticket {g} while {q}, who came earlier, still waits");
            }
        }
        assert!(served_tickets.len() > 100, "the queue was used: {}", served_tickets.len());
    }
}
