//! stockd: a thread-per-core exact inventory server.
//!
//! - [`state`]: the stock state machine (no I/O).
//! - [`shard`]: one shard's thread state, its mailbox, mutation coordination.
//! - [`conn`]: one client connection.
//! - [`event_loop`]: a shard thread's runtime: listeners, connections, mailbox, timers.
//! - [`listeners`]: the shared and per-shard ports; a taken port is refused;
//!   the port a harness restarts a server on.
//! - [`metrics`]: the Prometheus endpoint (`--metrics-listen`).
//! - [`recovery`]: the stores rebuilt from snapshots and the log.
//! - [`server`]: startup, snapshots, shutdown.
//! - [`throttled`]: a warning logged at most once per interval, with a count.

pub mod conn;
pub mod event_loop;
pub mod listeners;
pub mod metrics;
pub mod recovery;
pub mod replication;
pub mod server;
pub mod shard;
pub mod state;
pub mod throttled;

pub use server::{start, Config, Running, SinkConfig};
