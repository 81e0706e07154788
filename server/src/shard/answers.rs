//! The state machine's answers and refusals as wire responses, and the
//! answers a shard sends to connections.

use stockd_protocol::{Response, Status, MAX_CENTERS_PER_ITEM, STOCK_MAX};

use super::mailbox::Out;
use crate::state::{Answer, Refusal};

/// What the client is told when `plan` answered at once.
pub fn answer_response(a: &Answer) -> Response {
    let error = |status, message: String| Response::Error { status, message };
    match a {
        Answer::Duplicate { lsn } => Response::Duplicate { lsn: *lsn },
        Answer::NotFound { what, id } => error(Status::NotFound, format!("unknown {} id {id}", what.name())),
        Answer::Conflict(message) => error(Status::Conflict, message.clone()),
        Answer::TableFull => {
            error(Status::Overloaded, "the idempotency table of this shard is full; retry later".into())
        }
    }
}

/// What the client is told when a prepare refused.
pub fn refusal_response(r: &Refusal) -> Response {
    match *r {
        Refusal::Insufficient { line, available, .. } => Response::Insufficient { line, available },
        Refusal::Overflow { line } => Response::Error {
            status: Status::BadRequest,
            message: format!("line {line}: the row would exceed the maximum of {STOCK_MAX} units"),
        },
        Refusal::Busy { line } => Response::Error {
            status: Status::Conflict,
            message: format!("line {line}: the row has changes in flight; retry the adjustment"),
        },
        Refusal::BelowHeld { held } => Response::Error {
            status: Status::Conflict,
            message: format!("cannot adjust below the {held} units currently held"),
        },
        Refusal::TooManyCenters { line } => Response::Error {
            status: Status::BadRequest,
            message: format!(
                "line {line}: the item has rows in {MAX_CENTERS_PER_ITEM} fulfillment centers, the most one item may have"
            ),
        },
    }
}

/// A response for a connection, which encodes it straight into its write
/// buffer (no buffer of its own per answer).
pub fn respond(op: u8, request_id: u64, resp: Response) -> Out {
    Out::Response { op, request_id, resp }
}

pub fn respond_error(op: u8, request_id: u64, status: Status, message: &str) -> Out {
    respond(op, request_id, Response::Error { status, message: message.into() })
}
