//! WatchOptOutChanges: the ledger's change feed over gRPC (the protocol is
//! `crate::optout::changes`). A cursor is `v1.<tx>.<position>`: opaque to callers, and the same
//! on every replica sharing the ledger.

use std::pin::Pin;
use std::time::Instant;

use futures::{Stream, StreamExt};
use tonic::{Code, Status};

use super::convert::opt_out_change;
use super::error_mapping::{Reason, gateway_status};
use super::service::CcpaApi;
use super::validation::Violations;
use crate::optout::changes::{FeedEnded, follow};
use crate::proto::ccpa_v1::{OptOutChange, WatchOptOutChangesRequest};
use crate::store::ChangePosition;

/// The changes of a WatchOptOutChanges stream.
pub type ChangeStream = Pin<Box<dyn Stream<Item = Result<OptOutChange, Status>> + Send>>;

/// The longest cursor read: `v1.` and two 19-digit numbers with their dot.
const MAX_CURSOR_BYTES: usize = 64;

/// The cursor that names `at`.
pub fn encode_cursor(at: ChangePosition) -> String {
    format!("v1.{}.{}", at.tx, at.position)
}

/// The position a cursor names; `None` when it is not one this gateway issues.
pub fn decode_cursor(cursor: &str) -> Option<ChangePosition> {
    if cursor.len() > MAX_CURSOR_BYTES {
        return None;
    }
    let mut parts = cursor.strip_prefix("v1.")?.split('.');
    let number = |part: Option<&str>| -> Option<i64> {
        let part = part?;
        // Digits only: no sign, no `+`, no spaces, as `encode_cursor` writes them.
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    let tx = number(parts.next())?;
    let position = number(parts.next())?;
    parts
        .next()
        .is_none()
        .then_some(ChangePosition { tx, position })
}

impl From<FeedEnded> for Status {
    fn from(ended: FeedEnded) -> Self {
        match ended {
            FeedEnded::CursorExpired => gateway_status(
                Code::FailedPrecondition,
                Reason::CursorExpired,
                "retention has pruned the ledger's changes after this cursor; start again from \
                 the oldest retained change (an empty cursor)",
            ),
            FeedEnded::ShuttingDown => gateway_status(
                Code::Unavailable,
                Reason::ShuttingDown,
                "the gateway is shutting down; resume from the last cursor received",
            ),
            FeedEnded::Ledger(error) => error.into(),
        }
    }
}

/// Writes a stream's log line when it ends (or is dropped): no cursor, no key.
struct StreamLog {
    started: Instant,
    changes: u64,
    code: Code,
}

impl Drop for StreamLog {
    fn drop(&mut self) {
        tracing::info!(
            rpc = "WatchOptOutChanges",
            code = ?self.code,
            changes = self.changes,
            latency_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            "rpc"
        );
    }
}

impl CcpaApi {
    /// The feed after the request's cursor; INVALID_ARGUMENT for a cursor this gateway did not
    /// issue, before the ledger is read.
    pub(super) fn watch(&self, request: WatchOptOutChangesRequest) -> Result<ChangeStream, Status> {
        let mut violations = Violations::default();
        let after = if request.after_cursor.is_empty() {
            None
        } else {
            let after = decode_cursor(&request.after_cursor);
            if after.is_none() {
                violations.malformed(
                    "after_cursor",
                    "must be the cursor of a change this gateway sent, or empty".to_owned(),
                );
            }
            after
        };
        violations.into_result()?;
        let mut log = StreamLog {
            started: Instant::now(),
            changes: 0,
            code: Code::Cancelled,
        };
        let changes = follow(
            self.ledger().clone(),
            after,
            request.include_opt_ins,
            self.watches_end.clone(),
        )
        .map(move |change| {
            let log = &mut log;
            match change {
                Ok(change) => {
                    log.changes += 1;
                    Ok(opt_out_change(&change))
                }
                Err(ended) => {
                    let status = Status::from(ended);
                    log.code = status.code();
                    Err(status)
                }
            }
        });
        Ok(Box::pin(changes))
    }
}

#[cfg(test)]
mod tests {
    use super::{ChangePosition, decode_cursor, encode_cursor};

    #[test]
    fn cursors_read_back_and_nothing_else_reads() {
        let at = ChangePosition {
            tx: 7_000_123,
            position: 42,
        };
        assert_eq!(decode_cursor(&encode_cursor(at)), Some(at));
        let far = ChangePosition {
            tx: i64::MAX,
            position: i64::MAX,
        };
        assert_eq!(decode_cursor(&encode_cursor(far)), Some(far));
        for bad in [
            "",
            "v1",
            "v1.",
            "v1.1",
            "v1.1.",
            "v1..1",
            "v1.1.2.3",
            "v2.1.2",
            "v1.-1.2",
            "v1.+1.2",
            "v1.1. 2",
            "v1.99999999999999999999.1",
            "1.2",
        ] {
            assert_eq!(decode_cursor(bad), None, "{bad:?}");
        }
    }
}
