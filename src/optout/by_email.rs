//! A request by email: recorded first (without the address, which the ledger does not keep),
//! then the address's profiles are looked up in ACS, and each gets a request of its own, linked
//! to it and submitted like one by key; or, when none exists and the caller asked for it, one is
//! created with the opt-out. The request's own record says whether it reached its profiles.
//!
//! Without the address the deliverer cannot finish such a request later: whatever stops it
//! within the call (the lookup failing, too many profiles) FAILS it, and the caller, told so,
//! retries under a new id. Its profiles' requests, once recorded, are delivered like any other.

use std::time::Instant;

use futures::{StreamExt, stream};

use super::creation::{Created, CreatedProfile, NewProfile};
use super::delivery::Delivery;
use super::submit::{Apply, Submitted};
use crate::health::UpstreamSignal;
use crate::store::{
    FailureCode, Kind, LedgerError, NewRequest, Outcome, Record, Recorded, fingerprint,
};
use crate::upstream::UpstreamError;

/// Joins a request by email's id to the number of each of its profiles' records. Callers' own
/// ids may not hold it, so that none can collide with one of these.
pub const RESERVED_REQUEST_ID_SEPARATOR: char = ':';

/// Profiles of one address whose requests are applied at once.
const PROFILE_CONCURRENCY: usize = 4;

/// A request by email, as the caller made it.
#[derive(Debug)]
pub struct EmailRequest<'a> {
    /// The request itself: kind `SetByEmail`, no key, no fingerprint (this sets it).
    pub request: NewRequest,
    /// The address, used for the lookup and the fingerprint only.
    pub email: &'a str,
    /// Create a profile with the opt-out if none has the address.
    pub create_if_missing: bool,
    /// More profiles than this with the address, and nothing is changed.
    pub max_profiles: usize,
}

/// What became of a request by email.
#[derive(Debug)]
pub enum SubmittedByEmail {
    /// Each profile's request, in the order ACS listed the profiles.
    Profiles(Vec<Submitted>),
    /// No profile had the address: one was created with the opt-out, under the request
    /// recorded with this id.
    Created {
        /// The creation's own request id.
        request_id: String,
        /// The profile ACS created.
        profile: CreatedProfile,
    },
    /// It could not be completed; its record is FAILED with the basis.
    Failed(ByEmailFailure),
    /// Its id was recorded before, for the same request: nothing was done, and this is its
    /// record as it stands.
    Replay(Record),
    /// Its id was recorded before, for a different request: nothing was done.
    Conflict,
}

/// Why a request by email FAILED.
#[derive(Debug)]
pub enum ByEmailFailure {
    /// The profiles could not be looked up, or ACS listed one without its key.
    Lookup(UpstreamError),
    /// No profile has the address, and none was to be created.
    NoProfile,
    /// More profiles have the address than `max_profiles`: nothing was changed.
    TooManyProfiles,
    /// The profile could not be created.
    Create(UpstreamError),
    /// A profile's request could not be recorded (those recorded are delivered).
    Unrecorded(LedgerError),
    /// A record with the id of one of its profiles' requests already existed: that profile has
    /// no record of its own.
    Duplicate,
}

impl Delivery {
    /// Records and carries out a request by email before `deadline` (and within half a lease:
    /// past a whole one, such a request still pending is taken for one abandoned by a stopped
    /// gateway, and FAILED).
    pub async fn submit_by_email(
        &self,
        email_request: EmailRequest<'_>,
        deadline: Option<Instant>,
    ) -> Result<SubmittedByEmail, LedgerError> {
        let EmailRequest {
            mut request,
            email,
            create_if_missing,
            max_profiles,
        } = email_request;
        let deadline = self.within_lease(deadline);
        // The address is not kept, but a replay of this id with another address (or without
        // `create_if_missing`) is a different request.
        request.fingerprint = Some(fingerprint(
            &request.request_id,
            &[
                &email.to_lowercase(),
                if create_if_missing { "create" } else { "" },
            ],
        ));
        // What third parties match consumers by, for the request's notifications: recorded with
        // it, in its unit of work.
        request.email_sha256 = Some(crate::notify::event::email_sha256(email));
        let (recorded, _) = self.ledger().record(&request, None).await?;
        match recorded {
            Recorded::New(_) => {}
            Recorded::Replay(record) => return Ok(SubmittedByEmail::Replay(record)),
            Recorded::Conflict(_) => return Ok(SubmittedByEmail::Conflict),
        }
        let id = request.request_id.as_str();

        let found = self.acs().profiles_by_email(email, Some(deadline)).await;
        self.health().observe(UpstreamSignal::of(&found)).await;
        let found = match found {
            Ok(found) => found,
            Err(error) => {
                let error = UpstreamError::from(error);
                let reason = format!(
                    "the profiles of this email could not be looked up ({}); the caller was \
                     told and must retry",
                    error.reason()
                );
                return self.fail(id, &reason, ByEmailFailure::Lookup(error)).await;
            }
        };
        if found.is_empty() {
            if create_if_missing {
                return self.create_for_email(&request, email, deadline).await;
            }
            return self
                .fail(
                    id,
                    "no profile has this email address",
                    ByEmailFailure::NoProfile,
                )
                .await;
        }
        if found.len() > max_profiles {
            return self
                .fail(
                    id,
                    "more profiles have this email address than --max-profiles-per-email \
                     allows; nothing was changed",
                    ByEmailFailure::TooManyProfiles,
                )
                .await;
        }
        let mut parts = Vec::with_capacity(found.len());
        for (n, profile) in found.into_iter().enumerate() {
            let Some(pkey) = profile.p_key else {
                return self
                    .fail(
                        id,
                        "ACS listed a profile of this email without its key; nothing was changed",
                        ByEmailFailure::Lookup(UpstreamError::MissingField("PKey")),
                    )
                    .await;
            };
            parts.push(NewRequest {
                request_id: format!("{id}{RESERVED_REQUEST_ID_SEPARATOR}{}", n + 1),
                kind: Kind::SetOptOut,
                pkey: Some(pkey),
                first_attempt_window_ms: self.first_attempt_window_ms(),
                parent_request_id: Some(id.to_owned()),
                fingerprint: None,
                email_sha256: None,
                ..request.clone()
            });
        }
        let submitted: Vec<Result<Submitted, LedgerError>> = stream::iter(parts)
            .map(|part| async move { self.submit(&part, Apply::WithinCall(Some(deadline))).await })
            .buffered(PROFILE_CONCURRENCY)
            .collect()
            .await;

        let mut profiles = Vec::with_capacity(submitted.len());
        let mut unrecorded = None;
        for result in submitted {
            match result {
                Ok(Submitted::Replay(_) | Submitted::Conflict) => {
                    // The request is new and callers cannot choose ids with the separator, so no
                    // record of this id can exist: if one does, this profile has no record of its
                    // own, and the request must not read as done.
                    tracing::error!(
                        "a record with the id of one of a request's profiles already existed"
                    );
                    unrecorded = Some(ByEmailFailure::Duplicate);
                }
                Ok(submitted) => profiles.push(submitted),
                Err(error) => unrecorded = Some(ByEmailFailure::Unrecorded(error)),
            }
        }
        // The request's own record says it reached its profiles (each record says where it
        // stands), or that it did not: then the caller is told, and retries with a new id.
        match unrecorded {
            None => {
                self.ledger()
                    .settle(id, Outcome::Applied { pkey: None }, true, None)
                    .await?;
                Ok(SubmittedByEmail::Profiles(profiles))
            }
            Some(failure) => {
                self.fail(
                    id,
                    "not every profile of this email could be recorded (those recorded are \
                     delivered); the caller was told and must retry",
                    failure,
                )
                .await
            }
        }
    }

    /// No profile has the address and the caller asked for one: it is created with the opt-out,
    /// as a creation linked to the request.
    async fn create_for_email(
        &self,
        request: &NewRequest,
        email: &str,
        deadline: Instant,
    ) -> Result<SubmittedByEmail, LedgerError> {
        let id = request.request_id.as_str();
        let creation = NewRequest {
            request_id: format!("{id}{RESERVED_REQUEST_ID_SEPARATOR}1"),
            kind: Kind::CreateProfile,
            pkey: None,
            first_attempt_window_ms: 0,
            parent_request_id: Some(id.to_owned()),
            fingerprint: None,
            email_sha256: None,
            ..request.clone()
        };
        let profile = NewProfile {
            email: email.to_owned(),
            opt_out: Some(request.opt_out),
            ..Default::default()
        };
        match self.create(&creation, &profile, Some(deadline)).await? {
            Created::Created(profile) => {
                self.ledger()
                    .settle(id, Outcome::Applied { pkey: None }, true, None)
                    .await?;
                Ok(SubmittedByEmail::Created {
                    request_id: creation.request_id,
                    profile,
                })
            }
            Created::Failed(error) => {
                self.fail(
                    id,
                    "the profile for this email could not be created",
                    ByEmailFailure::Create(error),
                )
                .await
            }
            Created::Replay(_) | Created::Conflict => {
                tracing::error!("a record with the id of a request's creation already existed");
                self.fail(
                    id,
                    "the profile for this email could not be created",
                    ByEmailFailure::Duplicate,
                )
                .await
            }
        }
    }

    /// Settles the request FAILED with `reason`, and the code that goes with `failure`.
    async fn fail(
        &self,
        request_id: &str,
        reason: &str,
        failure: ByEmailFailure,
    ) -> Result<SubmittedByEmail, LedgerError> {
        let code = match &failure {
            ByEmailFailure::Lookup(error) | ByEmailFailure::Create(error) => {
                FailureCode::from(error)
            }
            ByEmailFailure::NoProfile => FailureCode::ProfileNotFound,
            ByEmailFailure::TooManyProfiles => FailureCode::TooManyProfiles,
            // Nothing was wrong with the request: the caller retries.
            ByEmailFailure::Unrecorded(_) => FailureCode::Unavailable,
            ByEmailFailure::Duplicate => FailureCode::Internal,
        };
        self.ledger()
            .settle(request_id, Outcome::Failed { reason, code }, true, None)
            .await?;
        Ok(SubmittedByEmail::Failed(failure))
    }
}
