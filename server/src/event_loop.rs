//! A shard thread's event loop: one tokio current-thread runtime per shard,
//! running the shard's listeners, its connections, its mailbox, the retry
//! of contended mutations, the hold-expiry timer, the paced snapshot turns
//! and the hand-over of each pass's records to the log writer, all on one
//! thread.

use std::cell::RefCell;
use std::net::TcpListener as StdListener;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use crate::conn::{serve, ConnCtx};
use crate::shard::{Shard, Shared};
use crate::state::Store;
use crate::throttled::{Throttled, WARN_EVERY};

/// Pause before contended mutations are prepared again: long enough for
/// the mutations holding the units to be decided (an fsync or so).
pub const CONTENDED_RETRY_PAUSE: Duration = Duration::from_micros(500);
/// How often expired holds are looked for.
pub const HOLD_EXPIRY_TICK: Duration = Duration::from_millis(100);
/// A snapshot is written in turns of about this much shard time...
pub const SNAPSHOT_TURN: Duration = Duration::from_micros(300);
/// ...each followed by at least this pause (the timer's granularity is a
/// millisecond, so 1-2 ms): a snapshot takes at most about a fifth of its
/// shard's time, and no order waits behind more than one turn.
pub const SNAPSHOT_PAUSE: Duration = Duration::from_millis(1);
/// Pause after a failed accept (out of file descriptors, say).
pub const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Runs shard `index` on the calling thread until the server stops.
pub fn shard_main(
    index: usize,
    shared: Arc<Shared>,
    store: Store,
    listeners: Vec<StdListener>,
    ctx: ConnCtx,
) {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, shard = index, "cannot build the shard runtime");
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let shard = Rc::new(RefCell::new(Shard::new(index, shared.clone(), store)));
        let ctx = Rc::new(ctx);
        for l in listeners {
            match tokio::net::TcpListener::from_std(l) {
                Ok(l) => {
                    tokio::task::spawn_local(accept_loop(l, shard.clone(), ctx.clone()));
                }
                Err(e) => tracing::error!(error = %e, "listener"),
            }
        }
        tokio::task::spawn_local(retry_loop(shard.clone()));
        tokio::task::spawn_local(expiry_loop(shard.clone()));
        tokio::task::spawn_local(snapshot_loop(shard.clone()));
        tokio::task::spawn_local(log_loop(shard.clone()));
        let mailbox = &shared.mailboxes[index];
        loop {
            mailbox.notify.notified().await;
            if shared.stop.load(Relaxed) {
                // What this pass decided goes to the log writer, which
                // finishes what it was given (`Running::shutdown`).
                shard.borrow_mut().flush_log();
                break;
            }
            // A drain that left work (a full budget of forwarded requests)
            // has notified itself again, and a stored notification
            // completes `notified()` at once: without this yield the next
            // drain would start before any connection ran.
            if shard.borrow_mut().drain() {
                tokio::task::yield_now().await;
            }
        }
    });
}

async fn accept_loop(l: tokio::net::TcpListener, shard: Rc<RefCell<Shard>>, ctx: Rc<ConnCtx>) {
    let mut over_cap = Throttled::new(WARN_EVERY);
    loop {
        match l.accept().await {
            Ok((stream, peer)) => {
                let (shared, index) = (shard.borrow().shared().clone(), shard.borrow().index());
                // Counted here, before the task runs, so a burst cannot pass the cap.
                if shared.connections() >= shared.max_connections {
                    refuse(stream, shared.max_connections);
                    if let Some(refused) = over_cap.hit(std::time::Instant::now()) {
                        tracing::warn!(
                            max = shared.max_connections,
                            refused,
                            "refused connections: at --max-connections"
                        );
                    }
                    continue;
                }
                shared.stats[index].connections.fetch_add(1, Relaxed);
                let _ = stream.set_nodelay(true);
                let (shard, ctx) = (shard.clone(), ctx.clone());
                tokio::task::spawn_local(async move {
                    tracing::debug!(%peer, shard = index, "connection opened");
                    serve(stream, shard, ctx).await;
                    shared.stats[index].connections.fetch_sub(1, Relaxed);
                    tracing::debug!(%peer, shard = index, "connection closed");
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            }
        }
    }
}

/// Answers a connection over the cap with one OVERLOADED frame (request id
/// 0: it sent nothing yet) and closes it. Never waits: a client that does
/// not read it just sees the close.
fn refuse(stream: tokio::net::TcpStream, max: usize) {
    let mut frame = Vec::new();
    let message = format!("stockd has {max} connections open, its --max-connections; retry later");
    stockd_protocol::encode_error(0, 0, stockd_protocol::Status::Overloaded, &message, &mut frame);
    let _ = stream.try_write(&frame);
}

async fn retry_loop(shard: Rc<RefCell<Shard>>) {
    let wake = shard.borrow().retry_wake();
    loop {
        wake.notified().await;
        tokio::time::sleep(CONTENDED_RETRY_PAUSE).await;
        shard.borrow_mut().retry_contended();
    }
}

/// Writes each snapshot in turns of [`SNAPSHOT_TURN`] with a pause of
/// [`SNAPSHOT_PAUSE`] after each. Before, a step of 4,096 slots (1-4 ms)
/// ran on every drain of the mailbox, which, under load, came every few
/// hundred microseconds: the snapshot took all of the shard's spare time
/// and more, and orders offered at a quarter of the maximum (2-core
/// machine) waited up to 0.1 s behind it (docs/architecture.md, *Known stalls*).
async fn snapshot_loop(shard: Rc<RefCell<Shard>>) {
    let wake = shard.borrow().snapshot_wake();
    loop {
        wake.notified().await;
        while shard.borrow_mut().snapshot_turn(SNAPSHOT_TURN) {
            tokio::time::sleep(SNAPSHOT_PAUSE).await;
        }
    }
}

/// Hands the log writer the records of each pass of this event loop
/// together, once the pass is over: after the first record of a pass is
/// queued, every task that is ready (the connections with requests, the
/// mailbox) runs before this one does. Handed over one by one, as they
/// were made, the writer took the first few of a pass into one fdatasync
/// and the rest waited for the next (docs/benchmarks.md, *One hand-over
/// to the log per pass*).
async fn log_loop(shard: Rc<RefCell<Shard>>) {
    let wake = shard.borrow().log_wake();
    loop {
        wake.notified().await;
        tokio::task::yield_now().await;
        shard.borrow_mut().flush_log();
    }
}

async fn expiry_loop(shard: Rc<RefCell<Shard>>) {
    let mut tick = tokio::time::interval(HOLD_EXPIRY_TICK);
    loop {
        tick.tick().await;
        shard.borrow_mut().expire_holds();
    }
}
