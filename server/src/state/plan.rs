//! Step 1 of a mutation: a command, on the shard that owns its id, becomes
//! the record to log, or is answered at once from the id's state
//! (duplicate, unknown id, conflict, table full).

use stockd_protocol::{Key, Line, Lines};
use stockd_record::{Mutation, Op};

use super::answer::{Answer, IdKind};
use super::ids::{IdEntry, IdState};
use super::Store;

/// A mutation request, as the coordinator sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Order { id: u64, lines: Lines },
    Inbound { id: u64, lines: Lines },
    Cancel { id: u64 },
    Reserve { id: u64, ttl_ms: u32, lines: Lines },
    Confirm { id: u64 },
    Release { id: u64, expired: bool },
    Adjust { key: Key, on_hand: u64, reason: u16 },
}

/// An id in its space: order and hold ids share one, receipt ids have their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IdKey {
    OrderOrHold(u64),
    Receipt(u64),
}

impl IdKey {
    pub fn id(self) -> u64 {
        match self {
            IdKey::OrderOrHold(id) | IdKey::Receipt(id) => id,
        }
    }
}

impl Command {
    /// The id whose owner shard coordinates the command (an adjust: its item).
    pub fn owner_id(&self) -> u64 {
        match self {
            Command::Order { id, .. }
            | Command::Inbound { id, .. }
            | Command::Cancel { id }
            | Command::Reserve { id, .. }
            | Command::Confirm { id }
            | Command::Release { id, .. } => *id,
            Command::Adjust { key, .. } => key.item,
        }
    }

    /// True for the commands that create their id (order, reserve, inbound).
    pub fn creates_id(&self) -> bool {
        matches!(self, Command::Order { .. } | Command::Reserve { .. } | Command::Inbound { .. })
    }

    /// The id this command is about; None for an adjust, which has none.
    pub fn id_key(&self) -> Option<IdKey> {
        match self {
            Command::Inbound { id, .. } => Some(IdKey::Receipt(*id)),
            Command::Adjust { .. } => None,
            other => Some(IdKey::OrderOrHold(other.owner_id())),
        }
    }
}

fn conflict<T>(message: String) -> Result<T, Answer> {
    Err(Answer::Conflict(message))
}

/// The wall clock in ms, read only if a plan needs it (a full id table, a
/// hold's deadline): most orders never do, and a clock read was ~1% of a
/// shard's time under 1-line orders. Tests give a fixed time.
pub trait NowMs {
    fn now_ms(&self) -> u64;
}

impl NowMs for u64 {
    fn now_ms(&self) -> u64 {
        *self
    }
}

impl<F: Fn() -> u64> NowMs for F {
    fn now_ms(&self) -> u64 {
        self()
    }
}

impl Store {
    /// Step 1, on the owner of the command's id: the record to log, or the answer now.
    pub fn plan(&self, cmd: Command, now: impl NowMs) -> Result<Mutation, Answer> {
        let new_id = |op: Op, lines: Lines| {
            if self.table_full(&now) {
                Err(Answer::TableFull)
            } else {
                Ok(Mutation { op, lines })
            }
        };
        match cmd {
            Command::Order { id, lines } => match self.ids.get(&id) {
                Some(e) if !e.is_hold() => Err(Answer::Duplicate { lsn: e.lsn }),
                Some(_) => conflict(format!("id {id} is a hold, not an order")),
                None => new_id(Op::Order { id }, lines),
            },
            Command::Reserve { id, ttl_ms, lines } => match self.ids.get(&id) {
                Some(e) if e.is_hold() => Err(Answer::Duplicate { lsn: e.lsn }),
                Some(_) => conflict(format!("id {id} is an order, not a hold")),
                None => new_id(Op::Reserve { id, ttl_ms }, lines),
            },
            Command::Inbound { id, lines } => match self.receipts.get(&id) {
                Some(r) => Err(Answer::Duplicate { lsn: r.lsn }),
                None => new_id(Op::Inbound { id }, lines),
            },
            Command::Cancel { id } => {
                let e = self.ids.get(&id).ok_or(Answer::NotFound { what: IdKind::Order, id })?;
                plan_cancel(id, e)
            }
            Command::Confirm { id } => {
                let e = self.ids.get(&id).ok_or(Answer::NotFound { what: IdKind::Hold, id })?;
                plan_confirm(id, e, now.now_ms())
            }
            Command::Release { id, expired } => {
                let e = self.ids.get(&id).ok_or(Answer::NotFound { what: IdKind::Hold, id })?;
                plan_release(id, e, expired)
            }
            Command::Adjust { key, on_hand, reason } => {
                let before = self.row(key).map_or(0, |r| r.on_hand);
                Ok(Mutation {
                    op: Op::Adjust { before, after: on_hand, reason },
                    lines: Lines::from_slice(&[Line { key, qty: 0 }]),
                })
            }
        }
    }
}

fn plan_cancel(id: u64, e: &IdEntry) -> Result<Mutation, Answer> {
    match e.state {
        IdState::Ordered { .. } => Ok(Mutation { op: Op::Cancel { id }, lines: e.lines.to_lines() }),
        IdState::Cancelled { lsn, .. } => Err(Answer::Duplicate { lsn }),
        IdState::Held { .. } => conflict(format!("hold {id} is not confirmed; release it instead")),
        IdState::Released { .. } => conflict(format!("hold {id} was released, not confirmed")),
    }
}

fn plan_confirm(id: u64, e: &IdEntry, now_ms: u64) -> Result<Mutation, Answer> {
    match e.state {
        _ if !e.is_hold() => conflict(format!("id {id} is an order, not a hold")),
        IdState::Held { deadline_ms } if deadline_ms <= now_ms => conflict(format!("hold {id} has expired")),
        IdState::Held { .. } => Ok(Mutation { op: Op::Confirm { id }, lines: e.lines.to_lines() }),
        IdState::Ordered { confirm_lsn: Some(lsn) } | IdState::Cancelled { confirm_lsn: Some(lsn), .. } => {
            Err(Answer::Duplicate { lsn: lsn.get() })
        }
        IdState::Released { expired, .. } => conflict(format!(
            "hold {id} was {}",
            if expired { "released when it expired" } else { "released" }
        )),
        _ => conflict(format!("hold {id} is in an unexpected state")),
    }
}

fn plan_release(id: u64, e: &IdEntry, expired: bool) -> Result<Mutation, Answer> {
    match e.state {
        _ if !e.is_hold() => conflict(format!("id {id} is an order, not a hold")),
        IdState::Held { .. } => Ok(Mutation { op: Op::Release { id, expired }, lines: e.lines.to_lines() }),
        IdState::Released { lsn, .. } => Err(Answer::Duplicate { lsn }),
        _ => conflict(format!("hold {id} was confirmed; cancel the order instead")),
    }
}
