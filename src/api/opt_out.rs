//! GetOptOut and SetOptOut, by key or by email: the protective read, and the recorded, delivered
//! write.

use futures::{StreamExt, stream};
use tonic::metadata::MetadataMap;
use tonic::{Code, Status};

use super::convert::{self, delivery_state};
use super::error_mapping::{Reason, gateway_status, replayed_failure, too_many_profiles};
use super::service::{CcpaApi, Deadline, recorded_caller};
use super::timestamps::acs_timestamp_to_proto;
use super::validation::{Violations, request_id_conflict};
use crate::access::Caller;
use crate::optout::read::{Delivered, EMAIL_PROFILE_CONCURRENCY, ReadTarget, Submission};
use crate::optout::{Apply, ByEmailFailure, EmailRequest, SubmittedByEmail};
use crate::proto::ccpa_v1::{
    DeliveryState, GetOptOutRequest, GetOptOutResponse, ProfileDelivery, ProfileOptOut,
    SetOptOutRequest, SetOptOutResponse,
};
use crate::store::{Kind, NewRequest, Record, Source, State};

/// A validated SetOptOut.
pub(super) struct SetRequest {
    target: Target,
    opt_out: bool,
    request_id: String,
    source: Source,
    received_at: Option<i64>,
    caller: String,
    /// Answer once recorded; the deliverer applies it later (BulkSetOptOut's `record_only`).
    record_only: bool,
}

enum Target {
    Pkey(String),
    Email {
        email: String,
        create_if_missing: bool,
    },
}

/// Checks that exactly one of `pkey` and `email` is given, and that it is well formed.
fn check_target(violations: &mut Violations, pkey: &str, email: &str) {
    match (pkey.is_empty(), email.is_empty()) {
        (false, true) => violations.pkey("pkey", pkey),
        (true, false) => violations.email("email", email),
        (true, true) => violations.missing(
            "pkey",
            "pkey is required, or email instead (exactly one of the two)".to_owned(),
        ),
        (false, false) => violations.malformed("email", "give pkey or email, not both".to_owned()),
    }
}

impl SetRequest {
    /// Validates a SetOptOut; every problem is reported at once.
    pub(super) fn parse(
        request: SetOptOutRequest,
        caller: &Caller,
        metadata: &MetadataMap,
        now_ms: i64,
    ) -> Result<Self, Status> {
        let mut violations = Violations::default();
        check_target(&mut violations, &request.pkey, &request.email);
        if request.create_if_missing && request.email.is_empty() {
            violations.malformed(
                "create_if_missing",
                "create_if_missing goes with email".to_owned(),
            );
        }
        let opt_out = violations.required_bool("ccpa_opt_out", request.ccpa_opt_out);
        violations.new_request_id("request_id", &request.request_id);
        let source = violations.source("source", request.source);
        violations.source_fits("source", source, request.ccpa_opt_out);
        let received_at =
            violations.received_at("received_at", request.received_at.as_ref(), now_ms);
        let caller = recorded_caller(caller, metadata, &mut violations);
        violations.into_result()?;
        let Some(source) = source else {
            unreachable!("a missing source is a violation, returned just above");
        };
        let target = if request.email.is_empty() {
            Target::Pkey(request.pkey)
        } else {
            Target::Email {
                email: request.email,
                create_if_missing: request.create_if_missing,
            }
        };
        Ok(Self {
            target,
            opt_out,
            request_id: request_id_or_new(&request.request_id),
            source,
            received_at,
            caller,
            record_only: false,
        })
    }

    /// The same request, answered as soon as it is durably recorded and applied later by the
    /// deliverer. Only by key: a request by email needs its profiles looked up in ACS first,
    /// which cannot wait.
    pub(super) fn record_only(self) -> Result<Self, Status> {
        if matches!(self.target, Target::Email { .. }) {
            let mut violations = Violations::default();
            violations.malformed(
                "record_only",
                "record_only takes items by pkey: an email's profiles must be looked up in ACS \
                 first, which cannot wait"
                    .to_owned(),
            );
            violations.into_result()?;
        }
        Ok(Self {
            record_only: true,
            ..self
        })
    }

    /// The request's id.
    pub(super) fn request_id(&self) -> &str {
        &self.request_id
    }

    fn new_request(
        &self,
        kind: Kind,
        request_id: String,
        pkey: Option<String>,
        parent: Option<String>,
        window_ms: i64,
    ) -> NewRequest {
        NewRequest {
            request_id,
            kind,
            pkey,
            opt_out: self.opt_out,
            source: self.source,
            received_at: self.received_at,
            caller: self.caller.clone(),
            first_attempt_window_ms: window_ms,
            parent_request_id: parent,
            fingerprint: None,
            restores_request_id: None,
            email_sha256: None,
        }
    }
}

/// The wire form of one profile's delivery.
fn profile_delivery(delivered: &Delivered, pkey: &str, created: bool) -> ProfileDelivery {
    ProfileDelivery {
        pkey: pkey.to_owned(),
        request_id: delivered.record.request_id.clone(),
        state: delivery_state(delivered.state) as i32,
        ccpa_opt_out: delivered.opt_out(),
        created,
    }
}

/// The state of a request made by email, from its profiles' states.
fn combined_state(states: impl IntoIterator<Item = DeliveryState>) -> DeliveryState {
    let states: Vec<DeliveryState> = states.into_iter().collect();
    [
        DeliveryState::Pending,
        DeliveryState::Failed,
        DeliveryState::Applied,
    ]
    .into_iter()
    .find(|wanted| states.contains(wanted))
    .unwrap_or(DeliveryState::Superseded)
}

impl CcpaApi {
    /// GetOptOut: what ACS holds, made more protective by the ledger (`optout::read`). By
    /// email: every profile, and opted out if any is.
    pub(super) async fn get(
        &self,
        request: GetOptOutRequest,
        deadline: Deadline,
    ) -> Result<GetOptOutResponse, Status> {
        let mut violations = Violations::default();
        check_target(&mut violations, &request.pkey, &request.email);
        violations.into_result()?;

        let by_key = request.email.is_empty();
        let target = if by_key {
            ReadTarget::Key(&request.pkey)
        } else {
            ReadTarget::Email {
                email: &request.email,
                max_profiles: self.max_profiles_per_email,
            }
        };
        let profiles: Vec<ProfileOptOut> = self
            .delivery
            .read(target, deadline)
            .await?
            .iter()
            .map(convert::profile_opt_out)
            .collect();
        Ok(GetOptOutResponse {
            pkey: request.pkey,
            ccpa_opt_out: profiles.iter().any(|p| p.ccpa_opt_out),
            // One instant only means something for one profile.
            ccpa_opt_out_last_modified: match profiles.as_slice() {
                [only] => only.ccpa_opt_out_last_modified,
                _ => None,
            },
            change_pending: profiles.iter().any(|p| p.change_pending),
            drift_detected: profiles.iter().any(|p| p.drift_detected),
            latest_request: match profiles.as_slice() {
                [only] if by_key => only.latest_request.clone(),
                _ => None,
            },
            profiles,
        })
    }

    /// SetOptOut: record (durably, before anything else), then apply within the deadline.
    pub(super) async fn set(
        &self,
        request: SetOptOutRequest,
        caller: &Caller,
        metadata: &MetadataMap,
        deadline: Deadline,
    ) -> Result<SetOptOutResponse, Status> {
        let now_ms = self.delivery.ledger().now_ms();
        let request = SetRequest::parse(request, caller, metadata, now_ms)?;
        self.set_parsed(&request, deadline).await
    }

    /// SetOptOut, once validated (shared with BulkSetOptOut).
    pub(super) async fn set_parsed(
        &self,
        request: &SetRequest,
        deadline: Deadline,
    ) -> Result<SetOptOutResponse, Status> {
        match &request.target {
            Target::Pkey(pkey) => self.set_for_key(request, pkey, deadline).await,
            Target::Email {
                email,
                create_if_missing,
            } => {
                self.set_by_email(request, email, *create_if_missing, deadline)
                    .await
            }
        }
    }

    async fn set_for_key(
        &self,
        request: &SetRequest,
        pkey: &str,
        deadline: Deadline,
    ) -> Result<SetOptOutResponse, Status> {
        let new = request.new_request(
            Kind::SetOptOut,
            request.request_id.clone(),
            Some(pkey.to_owned()),
            None,
            self.delivery.first_attempt_window_ms(),
        );
        let apply = if request.record_only {
            Apply::Later
        } else {
            Apply::WithinCall(deadline)
        };
        let submitted = self.delivery.submit(&new, apply).await?;
        let delivered = match self.delivery.read_back(submitted, deadline).await {
            Submission::Delivered(delivered) => delivered,
            Submission::Replay(record) => return self.answer_recorded(&record).await,
            Submission::Conflict => return Err(request_id_conflict()),
        };
        if delivered.state == State::Failed {
            return Err(replayed_failure(&delivered.record));
        }
        Ok(SetOptOutResponse {
            pkey: pkey.to_owned(),
            ccpa_opt_out: delivered.opt_out(),
            ccpa_opt_out_last_modified: delivered
                .held
                .as_ref()
                .and_then(|h| h.last_modified.as_deref())
                .and_then(acs_timestamp_to_proto),
            request_id: delivered.record.request_id.clone(),
            state: delivery_state(delivered.state) as i32,
            profiles: vec![profile_delivery(&delivered, pkey, false)],
        })
    }

    /// SetOptOut by email: the ledger records it, looks its profiles up and submits a request
    /// for each (or creates one); this translates what came of it.
    async fn set_by_email(
        &self,
        request: &SetRequest,
        email: &str,
        create_if_missing: bool,
        deadline: Deadline,
    ) -> Result<SetOptOutResponse, Status> {
        let email_request = EmailRequest {
            request: request.new_request(
                Kind::SetByEmail,
                request.request_id.clone(),
                None,
                None,
                0,
            ),
            email,
            create_if_missing,
            max_profiles: self.max_profiles_per_email,
        };
        let submitted = self
            .delivery
            .submit_by_email(email_request, deadline)
            .await?;
        let profiles = match submitted {
            SubmittedByEmail::Replay(record) => return self.answer_recorded(&record).await,
            SubmittedByEmail::Conflict => return Err(request_id_conflict()),
            SubmittedByEmail::Failed(failure) => {
                return Err(by_email_status(failure, self.max_profiles_per_email));
            }
            SubmittedByEmail::Created {
                request_id: creation_id,
                profile,
            } => {
                let state = &profile.held;
                return Ok(SetOptOutResponse {
                    pkey: String::new(),
                    ccpa_opt_out: state.opt_out,
                    ccpa_opt_out_last_modified: state
                        .last_modified
                        .as_deref()
                        .and_then(acs_timestamp_to_proto),
                    request_id: request.request_id.clone(),
                    state: DeliveryState::Applied as i32,
                    profiles: vec![ProfileDelivery {
                        pkey: profile.pkey,
                        request_id: creation_id,
                        state: DeliveryState::Applied as i32,
                        ccpa_opt_out: state.opt_out,
                        created: true,
                    }],
                });
            }
            SubmittedByEmail::Profiles(profiles) => profiles,
        };
        let profiles: Vec<ProfileDelivery> = stream::iter(profiles)
            .map(|submitted| async move {
                match self.delivery.read_back(submitted, deadline).await {
                    Submission::Delivered(delivered) => {
                        let pkey = delivered.record.pkey.clone().unwrap_or_default();
                        Some(profile_delivery(&delivered, &pkey, false))
                    }
                    // The ledger answers these as failures of the whole request.
                    Submission::Replay(_) | Submission::Conflict => None,
                }
            })
            .buffered(EMAIL_PROFILE_CONCURRENCY)
            .filter_map(std::future::ready)
            .collect()
            .await;
        Ok(SetOptOutResponse {
            pkey: String::new(),
            ccpa_opt_out: request.opt_out,
            ccpa_opt_out_last_modified: None,
            request_id: request.request_id.clone(),
            state: combined_state(
                profiles
                    .iter()
                    .map(|p| DeliveryState::try_from(p.state).unwrap_or(DeliveryState::Pending)),
            ) as i32,
            profiles,
        })
    }

    /// The answer for a request already recorded: its current state (and, for a request by
    /// email, its profiles'), without calling ACS.
    pub(super) async fn answer_recorded(
        &self,
        record: &Record,
    ) -> Result<SetOptOutResponse, Status> {
        if record.state == State::Failed {
            return Err(replayed_failure(record));
        }
        if record.kind != Kind::SetByEmail {
            let profile = ProfileDelivery {
                pkey: record.pkey.clone().unwrap_or_default(),
                request_id: record.request_id.clone(),
                state: delivery_state(record.state) as i32,
                ccpa_opt_out: record.opt_out,
                created: record.kind == Kind::CreateProfile,
            };
            return Ok(SetOptOutResponse {
                pkey: record.pkey.clone().unwrap_or_default(),
                ccpa_opt_out: record.opt_out,
                ccpa_opt_out_last_modified: None,
                request_id: record.request_id.clone(),
                state: delivery_state(record.state) as i32,
                profiles: vec![profile],
            });
        }
        let children = self.ledger().children(&record.request_id).await?;
        let profiles: Vec<ProfileDelivery> = children
            .iter()
            .map(|child| ProfileDelivery {
                pkey: child.pkey.clone().unwrap_or_default(),
                request_id: child.request_id.clone(),
                state: delivery_state(child.state) as i32,
                ccpa_opt_out: child.opt_out,
                created: child.kind == Kind::CreateProfile,
            })
            .collect();
        Ok(SetOptOutResponse {
            pkey: String::new(),
            ccpa_opt_out: record.opt_out,
            ccpa_opt_out_last_modified: None,
            request_id: record.request_id.clone(),
            state: combined_state(children.iter().map(|c| delivery_state(c.state))) as i32,
            profiles,
        })
    }
}

/// What the caller of a request by email that FAILED is told.
fn by_email_status(failure: ByEmailFailure, max_profiles: usize) -> Status {
    match failure {
        ByEmailFailure::Lookup(error) | ByEmailFailure::Create(error) => Status::from(error),
        ByEmailFailure::NoProfile => gateway_status(
            Code::NotFound,
            Reason::EmailNotFound,
            "no profile has this email address",
        ),
        ByEmailFailure::TooManyProfiles => too_many_profiles(max_profiles),
        ByEmailFailure::Unrecorded(error) => Status::from(error),
        ByEmailFailure::Duplicate => gateway_status(
            Code::Internal,
            Reason::ProfileNotRecorded,
            "one of this email's profiles could not be recorded",
        ),
    }
}

/// The caller's request id, or a new one.
pub(super) fn request_id_or_new(given: &str) -> String {
    if given.is_empty() {
        // Time-ordered (UUIDv7): the ledger's index of ids then grows at its end, one page
        // written per batch of requests, where random ids wrote a random page each.
        uuid::Uuid::now_v7().to_string()
    } else {
        given.to_owned()
    }
}
