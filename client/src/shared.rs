//! The connections a thread's clients share.
//!
//! A shard-aware client spreads its callers' requests over one socket per
//! shard, so each socket carries its share of what is in flight: 16
//! clients of 16 requests each against 8 shards make 128 sockets 2 deep,
//! and a socket 2 deep costs a `send` and a `recv` on both ends for every
//! second request. The clients that one thread connects to one server
//! therefore share one set of connections: the same requests then travel
//! over one socket per shard, as deep as all of them together
//! (docs/benchmarks.md, *Sockets: deep or shallow*).
//!
//! A set is shared by clients connected on the same thread, in the same
//! tokio runtime (its tasks run there), to the same address, with the same
//! token and [`crate::Options::single_connection`]; a client asks for its
//! own with [`crate::Options::own_connections`]. The set lives while a
//! client holds it; this table only points at it. A client that finds a
//! set here first says `HELLO` on each of its connections: a set whose
//! server restarted (a connection closed, or the server's answer differs)
//! is replaced by a new one.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};

use crate::{Inner, Options};

/// What makes two clients' connections the same.
#[derive(PartialEq, Eq)]
pub(crate) struct SetKey {
    runtime: tokio::runtime::Id,
    addr: SocketAddr,
    token: Option<String>,
    single_connection: bool,
}

impl SetKey {
    /// The key of a client connecting to `addr` with `opts`; none if it
    /// asks for its own connections (or runs outside a tokio runtime).
    pub(crate) fn new(addr: SocketAddr, opts: &Options) -> Option<SetKey> {
        if opts.own_connections {
            return None;
        }
        let runtime = tokio::runtime::Handle::try_current().ok()?.id();
        Some(SetKey { runtime, addr, token: opts.token.clone(), single_connection: opts.single_connection })
    }
}

thread_local! {
    static SETS: RefCell<Vec<(SetKey, Weak<Inner>)>> = const { RefCell::new(Vec::new()) };
}

/// The set of this key that a client of this thread still holds.
pub(crate) fn find(key: &SetKey) -> Option<Arc<Inner>> {
    SETS.with(|sets| {
        let mut sets = sets.borrow_mut();
        sets.retain(|(_, set)| set.strong_count() > 0);
        sets.iter().find(|(k, _)| k == key).and_then(|(_, set)| set.upgrade())
    })
}

/// Offers `set` to the next clients of this thread with this key (in place
/// of the one there, if any).
pub(crate) fn offer(key: SetKey, set: &Arc<Inner>) {
    SETS.with(|sets| {
        let mut sets = sets.borrow_mut();
        sets.retain(|(k, set)| set.strong_count() > 0 && *k != key);
        sets.push((key, Arc::downgrade(set)));
    })
}
