//! Submitting a profile's request: the one way a change of opt-out enters the ledger. It is
//! recorded durably first; then, unless the caller asked only for it to be recorded, it is
//! applied within the caller's deadline and its outcome settled, or it is left to the deliverer.
//! Callers (the gRPC API, tests) translate the [`Submitted`] outcome; they never sequence the
//! steps themselves.

use std::time::{Duration, Instant};

use super::delivery::{Attempt, Delivery};
use crate::store::{LedgerError, NewRequest, Record, Recorded, State};

/// When a submitted request is applied.
#[derive(Debug, Clone, Copy)]
pub enum Apply {
    /// Now, within the call: until this deadline (the caller's, if it gave one), and never for
    /// longer than one attempt's budget. Past it, the request is answered pending and the
    /// deliverer takes over.
    WithinCall(Option<Instant>),
    /// Later, by the deliverer, oldest first and after every call someone is waiting for: the
    /// caller is answered as soon as the request is durably recorded.
    Later,
}

/// What became of a submitted request.
#[derive(Debug)]
pub enum Submitted {
    /// ACS holds it.
    Applied(Record),
    /// Recorded and not yet held by ACS; the deliverer applies it.
    Pending(Record),
    /// A newer request for the profile overtook it; it will never be applied.
    Superseded(Record),
    /// It cannot be applied (the profile does not exist); the record holds the basis.
    Failed(Record),
    /// Its id was recorded before, for the same request: nothing was done, and this is its
    /// record as it stands.
    Replay(Record),
    /// Its id was recorded before, for a different request: nothing was done.
    Conflict,
}

impl Submitted {
    fn of(record: Record) -> Self {
        match record.state {
            State::Applied => Self::Applied(record),
            State::Superseded => Self::Superseded(record),
            State::Failed => Self::Failed(record),
            State::Pending => Self::Pending(record),
        }
    }
}

/// How much earlier than the caller's deadline an attempt stops, so that its outcome can be
/// recorded and the caller answered PENDING in time when ACS is slow: a quarter of the time
/// left, at most this.
const ANSWER_MARGIN: Duration = Duration::from_millis(250);

impl Delivery {
    /// Records a profile's request (`request.pkey` set) and applies it as `apply` says.
    ///
    /// Within a call, the request is applied only if it is its profile's newest and no other
    /// delivery holds the profile (the lease is taken in the same write as the record); otherwise
    /// it is answered as it stands and the deliverer takes it from there.
    pub async fn submit(
        &self,
        request: &NewRequest,
        apply: Apply,
    ) -> Result<Submitted, LedgerError> {
        let deadline = match apply {
            Apply::WithinCall(deadline) => deadline,
            Apply::Later => {
                // No call is applying it: it is due for the deliverer at once, not after the
                // window a call would have had.
                let request = NewRequest {
                    first_attempt_window_ms: 0,
                    ..request.clone()
                };
                return Ok(match self.ledger().record_answered(&request).await? {
                    Recorded::New(record) => Submitted::of(record),
                    Recorded::Replay(record) => Submitted::Replay(record),
                    Recorded::Conflict(_) => Submitted::Conflict,
                });
            }
        };
        let claim = self.new_claim();
        let (recorded, claimed) = self.ledger().record(request, Some(&claim)).await?;
        let record = match recorded {
            Recorded::Conflict(_) => return Ok(Submitted::Conflict),
            Recorded::Replay(record) => return Ok(Submitted::Replay(record)),
            Recorded::New(record) => record,
        };
        if record.state != State::Pending || !claimed {
            // Overtaken by a newer request, or another delivery of this profile is under way:
            // the deliverer takes it from here.
            self.ledger().mark_answered(&record.request_id).await?;
            return Ok(Submitted::of(record));
        }
        let attempt = self
            .apply(&record, &claim, self.attempt_deadline(deadline), true)
            .await?;
        Ok(match attempt {
            Attempt::Applied => Submitted::Applied(record),
            Attempt::Pending => Submitted::Pending(record),
            Attempt::Superseded => Submitted::Superseded(record),
            Attempt::Failed => {
                // The record as settled, with its basis.
                let failed = self.ledger().get(&record.request_id).await?;
                Submitted::Failed(failed.unwrap_or(record))
            }
        })
    }

    /// The deadline of an attempt made within a call: early enough to record the outcome and
    /// answer PENDING in time if ACS is slow, and never later than one attempt's budget (the
    /// profile's lease is sized for that).
    fn attempt_deadline(&self, deadline: Option<Instant>) -> Instant {
        let now = Instant::now();
        let budget_end = now + self.settings().attempt_budget;
        let end = deadline.map_or(budget_end, |d| d.min(budget_end));
        let remaining = end.saturating_duration_since(now);
        end - (remaining / 4).min(ANSWER_MARGIN)
    }
}
