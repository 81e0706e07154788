//! stockd's downstream: the write-ahead log streamed, as it becomes
//! durable, to the systems the rest of a shop reads (Kafka events, a Redis
//! read model).
//!
//! The log is the outbox. A record reaches a sink because it is in the log
//! and durable, never through a second write path, and each sink runs on a
//! thread of its own ([`runner`]) with its own cursor, so that a slow or
//! absent downstream system never slows a shard or an acknowledgement.
//! Delivery is at least once, in LSN order; the LSN is the event id.

pub mod cassandra;
pub mod events;
pub mod kafka;
pub mod levels;
pub mod redis;
pub mod runner;
pub mod sink;

pub use levels::{Level, Levels};
pub use runner::{RunnerConfig, Runners, SinkStatus};
pub use sink::{Batch, Change, Sink, SinkError};
