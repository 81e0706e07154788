//! A client of a replicated stockd (docs/ha.md): several addresses, one of
//! them the primary. Mutations go to the node this client believes is the
//! primary; a NOT_PRIMARY answer, or a connection lost with the answer, sends
//! the call to the next address, for up to [`Replicated::follow_for`].
//!
//! Retrying is safe because every mutation carries its id: a node that is
//! not the primary applied nothing, and a mutation the old primary applied
//! before it died answers DUPLICATE on the new one. Reads are answered by
//! whichever node the client is on (a standby's state trails the primary's
//! by its replication delay).

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use stockd_protocol::{Key, Line, Status};
use tokio::sync::Mutex;

use crate::{Applied, Client, Error, Options};

pub struct Replicated {
    addrs: Vec<String>,
    opts: Options,
    /// How long one call keeps looking for the primary before it returns
    /// the last error (default 10 s: a failover takes the standby's
    /// failover timeout, 3 s by default, plus its promotion).
    pub follow_for: Duration,
    current: Mutex<Option<(usize, Client)>>,
    /// The address to try next when there is no connection.
    next: AtomicUsize,
    /// When every address last failed to connect: for [`RECONNECT_EVERY`]
    /// after it, calls fail at once instead of each waiting for a connect.
    failed_at: std::sync::Mutex<Option<Instant>>,
}

/// A connection attempt that takes longer fails.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// After every address failed, the next attempt waits this long.
pub const RECONNECT_EVERY: Duration = Duration::from_millis(200);

/// The connection is dropped after this error: the next call connects again.
fn must_reconnect(e: &Error) -> bool {
    must_follow(e) || matches!(e, Error::Protocol(_))
}

/// The call may go to the next address.
fn must_follow(e: &Error) -> bool {
    matches!(e, Error::Io(_) | Error::Disconnected)
        || matches!(e, Error::Server { status: Status::NotPrimary, .. })
}

impl Replicated {
    /// `addrs`: `HOST:PORT[,HOST:PORT...]`. Connects on the first call.
    pub fn new(addrs: &str, opts: Options) -> Result<Replicated, Error> {
        let addrs: Vec<String> =
            addrs.split(',').map(str::trim).filter(|a| !a.is_empty()).map(String::from).collect();
        if addrs.is_empty() {
            return Err(Error::Protocol("no stockd address given".into()));
        }
        Ok(Replicated {
            addrs,
            opts,
            follow_for: Duration::from_secs(10),
            current: Mutex::new(None),
            next: AtomicUsize::new(0),
            failed_at: std::sync::Mutex::new(None),
        })
    }

    pub fn addrs(&self) -> &[String] {
        &self.addrs
    }

    /// The connection in use, or one to the next address that answers.
    async fn client(&self) -> Result<(usize, Client), Error> {
        let mut current = self.current.lock().await;
        if let Some((i, c)) = current.as_ref() {
            return Ok((*i, c.clone()));
        }
        let failed_at = *self.failed_at.lock().unwrap_or_else(|p| p.into_inner());
        if failed_at.is_some_and(|t| t.elapsed() < RECONNECT_EVERY) {
            let what = format!("{} did not accept a connection; trying again shortly", self.addrs.join(","));
            return Err(Error::Io(std::io::Error::new(std::io::ErrorKind::NotConnected, what)));
        }
        let mut last = None;
        for _ in 0..self.addrs.len() {
            let i = self.next.fetch_add(1, Relaxed) % self.addrs.len();
            let addr = &self.addrs[i];
            match tokio::time::timeout(CONNECT_TIMEOUT, Client::connect_with(addr, self.opts.clone())).await {
                Ok(Ok(c)) => {
                    *current = Some((i, c.clone()));
                    self.next.store(i, Relaxed);
                    return Ok((i, c));
                }
                Ok(Err(e)) => last = Some(e),
                Err(_) => {
                    let what = format!("{addr} did not answer within {CONNECT_TIMEOUT:?}");
                    last = Some(Error::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, what)));
                }
            }
        }
        *self.failed_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        Err(last.expect("at least one address"))
    }

    /// Leaves the node at `i` for the next address.
    async fn leave(&self, i: usize) {
        let mut current = self.current.lock().await;
        if current.as_ref().is_some_and(|(j, _)| *j == i) {
            *current = None;
            self.next.store(i + 1, Relaxed);
        }
    }

    /// Runs `f` against the primary, following it to another address when
    /// the node answers NOT_PRIMARY or the connection is lost.
    pub async fn run<T, F, Fut>(&self, f: F) -> Result<T, Error>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        let started = Instant::now();
        let mut tries = 0usize;
        loop {
            let result = match self.client().await {
                Ok((i, c)) => {
                    let r = f(c).await;
                    if r.as_ref().is_err_and(must_reconnect) {
                        self.leave(i).await;
                    }
                    r
                }
                Err(e) => Err(e),
            };
            match result {
                Err(e) if must_follow(&e) && self.addrs.len() > 1 && started.elapsed() < self.follow_for => {
                    tries += 1;
                    // Every node tried: give the standbys time to take over.
                    if tries.is_multiple_of(self.addrs.len()) {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                r => return r,
            }
        }
    }

    pub async fn order(&self, id: u64, lines: &[Line]) -> Result<Applied, Error> {
        self.run(|c| async move { c.order(id, lines).await }).await
    }

    pub async fn inbound(&self, id: u64, lines: &[Line]) -> Result<Applied, Error> {
        self.run(|c| async move { c.inbound(id, lines).await }).await
    }

    pub async fn cancel(&self, id: u64) -> Result<Applied, Error> {
        self.run(|c| async move { c.cancel(id).await }).await
    }

    pub async fn reserve(&self, id: u64, ttl_ms: u32, lines: &[Line]) -> Result<Applied, Error> {
        self.run(|c| async move { c.reserve(id, ttl_ms, lines).await }).await
    }

    pub async fn confirm(&self, id: u64) -> Result<Applied, Error> {
        self.run(|c| async move { c.confirm(id).await }).await
    }

    pub async fn release(&self, id: u64) -> Result<Applied, Error> {
        self.run(|c| async move { c.release(id).await }).await
    }

    pub async fn adjust(&self, item: u64, fc: u32, on_hand: u64, reason: u16) -> Result<Applied, Error> {
        self.run(|c| async move { c.adjust(item, fc, on_hand, reason).await }).await
    }

    pub async fn query(&self, item: u64, fc: u32) -> Result<u64, Error> {
        self.run(|c| async move { c.query(item, fc).await }).await
    }

    pub async fn query_item(&self, item: u64) -> Result<Vec<(u32, u64)>, Error> {
        self.run(|c| async move { c.query_item(item).await }).await
    }

    pub async fn query_batch(&self, keys: &[Key]) -> Result<Vec<u64>, Error> {
        self.run(|c| async move { c.query_batch(keys).await }).await
    }
}
