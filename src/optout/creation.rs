//! Creating a profile with an opt-out: recorded durably first, then created in ACS within the
//! call, and settled. ACS's POST is not idempotent and the ledger does not keep the profile's
//! personal data, so the deliverer cannot create it later: a creation that does not complete
//! within the call FAILS, and the caller, told so, retries under a new request id.

use std::time::Instant;

use acs_profile_client::types;

use super::delivery::Delivery;
use super::read::Held;
use crate::health::UpstreamSignal;
use crate::store::{FailureCode, LedgerError, NewRequest, Outcome, Record, Recorded, Settled};
use crate::upstream::UpstreamError;

/// A profile to create, as the caller gave it (empty names are left out).
#[derive(Debug, Clone, Default)]
pub struct NewProfile {
    /// Its email address.
    pub email: String,
    /// Its first name, if any.
    pub first_name: String,
    /// Its last name, if any.
    pub last_name: String,
    /// Its opt-out, if the caller set one.
    pub opt_out: Option<bool>,
}

impl NewProfile {
    fn input(&self) -> types::ProfileInput {
        let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        types::ProfileInput {
            email: Some(self.email.clone()),
            first_name: non_empty(&self.first_name),
            last_name: non_empty(&self.last_name),
            ccpa_opt_out: self.opt_out,
            ..Default::default()
        }
    }
}

/// A profile as ACS created (or holds) it, for an answer.
#[derive(Debug, Clone)]
pub struct CreatedProfile {
    /// Its key.
    pub pkey: String,
    /// Its email address.
    pub email: String,
    /// Its first name ("" when none).
    pub first_name: String,
    /// Its last name ("" when none).
    pub last_name: String,
    /// Its opt-out.
    pub held: Held,
}

impl CreatedProfile {
    /// What ACS answered; without its key or its opt-out, ACS broke its contract.
    pub fn of(profile: types::Profile) -> Result<Self, UpstreamError> {
        let held = Held::of(&profile)?;
        Ok(Self {
            pkey: profile.p_key.ok_or(UpstreamError::MissingField("PKey"))?,
            email: profile.email.unwrap_or_default(),
            first_name: profile.first_name.unwrap_or_default(),
            last_name: profile.last_name.unwrap_or_default(),
            held,
        })
    }
}

/// What became of a recorded creation.
#[derive(Debug)]
pub enum Created {
    /// ACS created the profile, and holds its key and opt-out; the record is APPLIED.
    Created(CreatedProfile),
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
        profile: &NewProfile,
        deadline: Option<Instant>,
    ) -> Result<Created, LedgerError> {
        let deadline = self.within_lease(deadline);
        let (recorded, _) = self.ledger().record(request, None).await?;
        let record = match recorded {
            Recorded::New(record) => record,
            Recorded::Replay(record) => return Ok(Created::Replay(record)),
            Recorded::Conflict(_) => return Ok(Created::Conflict),
        };
        let result = self
            .acs()
            .add_profile(&profile.input(), Some(deadline))
            .await;
        self.health().observe(UpstreamSignal::of(&result)).await;
        // Without its key the creation cannot be recorded, and without its opt-out it cannot be
        // told to the caller: either way ACS broke its contract.
        let created = result
            .map_err(UpstreamError::from)
            .and_then(CreatedProfile::of);
        match created {
            Ok(profile) => {
                let pkey = Some(profile.pkey.as_str());
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

    /// Creates a profile without an opt-out: nothing for the ledger.
    pub async fn create_unrecorded(
        &self,
        profile: &NewProfile,
        deadline: Option<Instant>,
    ) -> Result<CreatedProfile, UpstreamError> {
        let created = self.acs().add_profile(&profile.input(), deadline).await;
        CreatedProfile::of(self.noted(created).await?)
    }

    /// A profile created before, as ACS holds it now (for a replayed creation).
    pub async fn created_profile(
        &self,
        pkey: &str,
        deadline: Option<Instant>,
    ) -> Result<CreatedProfile, UpstreamError> {
        CreatedProfile::of(self.read_profile(pkey, deadline).await?)
    }
}
