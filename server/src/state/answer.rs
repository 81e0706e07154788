//! What the state machine answers instead of a log record: the answers
//! `plan` gives at once, and why `prepare` refuses. Domain terms only; the
//! shard turns them into wire statuses (`shard/answers.rs`).

/// Why `plan` answered at once instead of producing a record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The id was applied before; `lsn` is the record that decided the
    /// outcome the retry asks about. Nothing changes.
    Duplicate { lsn: u64 },
    /// No order or hold with this id is remembered.
    NotFound { what: IdKind, id: u64 },
    /// The request contradicts the id's state.
    Conflict(String),
    /// The id table is at its cap and its oldest id is younger than the
    /// minimum window: a new id would force forgetting one too soon.
    TableFull,
}

/// What an id names, for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdKind {
    Order,
    Hold,
}

impl IdKind {
    pub fn name(self) -> &'static str {
        match self {
            IdKind::Order => "order",
            IdKind::Hold => "hold",
        }
    }
}

/// Why a prepare refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `available` is what this line can take now. `contended`: durable stock
    /// would cover the line, but other undecided mutations have reserved it;
    /// the coordinator retries until they are decided instead of refusing.
    Insufficient { line: u16, available: u64, contended: bool },
    /// The row would pass `STOCK_MAX` units.
    Overflow { line: u16 },
    /// An adjust met a row with changes in flight (or changed since it was planned).
    Busy { line: u16 },
    /// An adjust would set on hand below the units held.
    BelowHeld { held: u64 },
    /// The line would add a row to an item that has `MAX_CENTERS_PER_ITEM` already.
    TooManyCenters { line: u16 },
}

impl Refusal {
    /// The first line this refusal is about.
    pub fn line(&self) -> u16 {
        match *self {
            Refusal::Insufficient { line, .. }
            | Refusal::Overflow { line }
            | Refusal::Busy { line }
            | Refusal::TooManyCenters { line } => line,
            Refusal::BelowHeld { .. } => 0,
        }
    }

    pub fn is_contended(&self) -> bool {
        matches!(self, Refusal::Insufficient { contended: true, .. })
    }
}
