//! What every sink does: the contract the runner drives.

use std::fmt;

use stockd_record::Mutation;

use crate::levels::{Levels, LineChange};

/// One committed mutation, with what it did to each row.
#[derive(Clone, Debug)]
pub struct Change {
    pub lsn: u64,
    /// The writer's clock when the record was committed.
    pub ts_ms: u64,
    pub mutation: Mutation,
    /// Per line of the mutation, in order.
    pub lines: Vec<LineChange>,
}

/// Consecutive records of the log: the mutations among them, in LSN order.
/// Records without a downstream meaning (shard layouts) have no change, but
/// `through_lsn` covers them.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    /// The LSN before the first record of the batch.
    pub after_lsn: u64,
    /// The LSN of the last record of the batch.
    pub through_lsn: u64,
    pub changes: Vec<Change>,
}

#[derive(Debug)]
pub enum SinkError {
    /// The downstream system is unreachable or failed: the runner waits,
    /// reconnects and goes on from the sink's cursor.
    Unavailable(String),
    /// The downstream system lost its copy (a flushed Redis): the runner
    /// sends every row's level, then goes on.
    NeedsResync,
}

impl fmt::Display for SinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SinkError::Unavailable(m) => write!(f, "{m}"),
            SinkError::NeedsResync => write!(f, "the downstream copy is gone and needs a full resync"),
        }
    }
}

/// A downstream system fed from the log. The runner gives it batches in LSN
/// order; each call returns the highest LSN the system has durably taken
/// (its cursor), which may trail what was handed over (Kafka confirms
/// deliveries later). After an error, the runner calls [`Sink::connect`]
/// again and starts over from the cursor it returns, so a sink must accept
/// records it already delivered (at least once).
pub trait Sink: Send {
    /// A short name for logs, metrics and the cursor file: `kafka`, `redis`.
    fn name(&self) -> &'static str;

    /// Connects (or reconnects) and returns the cursor to go on from.
    /// `local` is the cursor the runner keeps in the data directory; a sink
    /// that keeps its own cursor downstream (Redis) returns that one. `None`:
    /// nothing was ever delivered, or the downstream copy is gone.
    fn connect(&mut self, local: Option<u64>) -> Result<Option<u64>, SinkError>;

    /// Replaces the downstream copy with every row's level as of
    /// `levels.lsn()`, for a sink that starts without a usable cursor; returns
    /// the cursor, `levels.lsn()`, once durable.
    fn resync(&mut self, levels: &Levels) -> Result<u64, SinkError>;

    /// Whether the sink takes another batch now; while it does not, the
    /// runner calls [`Sink::idle`] instead and the backlog waits in the log.
    fn ready(&mut self) -> bool {
        true
    }

    /// Delivers a batch; returns the cursor.
    fn deliver(&mut self, batch: &Batch) -> Result<u64, SinkError>;

    /// Called when the log has nothing new: finish pending deliveries;
    /// returns the cursor.
    fn idle(&mut self) -> Result<u64, SinkError>;
}
