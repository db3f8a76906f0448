//! Creating a profile with an opt-out: recorded durably first, then created in ACS within the
//! call, and settled. ACS's POST is not idempotent and the ledger does not keep the profile's
//! personal data, so the deliverer cannot create it later: a creation that does not complete
//! within the call FAILS, and the caller, told so, retries under a new request id.

use std::time::Instant;

use acs_profile_client::types;

use super::delivery::Delivery;
use crate::health::UpstreamSignal;
use crate::store::{FailureCode, LedgerError, NewRequest, Outcome, Record, Recorded, Settled};
use crate::upstream::UpstreamError;

/// What became of a recorded creation.
#[derive(Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "one answer per call, moved once: boxing would cost more than it saves"
)]
pub enum Created {
    /// ACS created the profile, and holds its key and opt-out; the record is APPLIED.
    Created(types::Profile),
    /// ACS did not create it (or its answer could not be trusted); the record is FAILED with
    /// what the caller is told.
    Failed(UpstreamError),
    /// Its id was recorded before, for the same creation: nothing was done, and this is its
    /// record as it stands.
    Replay(Record),
    /// Its id was recorded before, for a different request: nothing was done.
    Conflict,
}

impl Delivery {
    /// Records the creation `request` (kind `CreateProfile`, with a fingerprint of `input`), then
    /// creates the profile in ACS before `deadline` (and within half a lease: past a whole one, a
    /// creation still pending is taken for one abandoned by a stopped gateway).
    pub async fn create(
        &self,
        request: &NewRequest,
        input: &types::ProfileInput,
        deadline: Option<Instant>,
    ) -> Result<Created, LedgerError> {
        let deadline = self.within_lease(deadline);
        let (recorded, _) = self.ledger().record(request, None).await?;
        let record = match recorded {
            Recorded::New(record) => record,
            Recorded::Replay(record) => return Ok(Created::Replay(record)),
            Recorded::Conflict(_) => return Ok(Created::Conflict),
        };
        let result = self.acs().add_profile(input, Some(deadline)).await;
        self.health().observe(UpstreamSignal::of(&result)).await;
        let created = result.map_err(UpstreamError::from).and_then(|profile| {
            // Without its key the creation cannot be recorded, and without its opt-out it cannot
            // be told to the caller: either way ACS broke its contract.
            if profile.p_key.is_none() {
                return Err(UpstreamError::MissingField("PKey"));
            }
            if profile.ccpa_opt_out.is_none() {
                return Err(UpstreamError::MissingField("ccpaOptOut"));
            }
            Ok(profile)
        });
        match created {
            Ok(profile) => {
                let pkey = profile.p_key.as_deref();
                let settled = self
                    .ledger()
                    .settle(&request.request_id, Outcome::Applied { pkey }, true, None)
                    .await?;
                match settled {
                    Settled::Recorded => self.honored(&record),
                    // Settled without a fence, and a creation's record takes its key whatever
                    // became of it meanwhile (see `settle`): this cannot happen.
                    Settled::NotPending | Settled::LeaseLost => tracing::error!(
                        request_id = request.request_id,
                        "a created profile's key could not be recorded"
                    ),
                }
                Ok(Created::Created(profile))
            }
            Err(error) => {
                let code = FailureCode::from(&error);
                let reason = format!(
                    "Adobe Campaign did not create the profile ({}); the caller was told and \
                     must retry",
                    code.as_str()
                );
                self.ledger()
                    .settle(
                        &request.request_id,
                        Outcome::Failed {
                            reason: &reason,
                            code,
                        },
                        true,
                        None,
                    )
                    .await?;
                Ok(Created::Failed(error))
            }
        }
    }
}
