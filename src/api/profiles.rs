//! CreateProfile. With an opt-out, the request is recorded in the ledger first, like a
//! SetOptOut; the ledger keeps no email or name, so a creation that fails cannot be completed
//! later: it is FAILED, and the caller (told so) retries.

use tonic::metadata::MetadataMap;
use tonic::{Code, Status};

use super::error_mapping::{Reason, gateway_status, replayed_failure};
use super::opt_out::request_id_or_new;
use super::service::{CcpaApi, Deadline, recorded_caller};
use super::timestamps::acs_timestamp_to_proto;
use super::validation::{Violations, request_id_conflict};
use crate::access::Caller;
use crate::optout::{Created, CreatedProfile, NewProfile};
use crate::proto::ccpa_v1::{CreateProfileRequest, CreateProfileResponse, Profile};
use crate::store::{Kind, NewRequest, State, fingerprint};

impl CcpaApi {
    pub(super) async fn create(
        &self,
        request: CreateProfileRequest,
        caller: &Caller,
        metadata: &MetadataMap,
        deadline: Deadline,
    ) -> Result<CreateProfileResponse, Status> {
        let now_ms = self.delivery.ledger().now_ms();
        let mut violations = Violations::default();
        violations.email("email", &request.email);
        violations.name("first_name", &request.first_name);
        violations.name("last_name", &request.last_name);
        violations.new_request_id("request_id", &request.request_id);
        let recorded = request.ccpa_opt_out.map(|opt_out| {
            let source = violations.source("source", request.source);
            violations.source_fits("source", source, Some(opt_out));
            let received_at =
                violations.received_at("received_at", request.received_at.as_ref(), now_ms);
            (opt_out, source, received_at)
        });
        let caller = recorded_caller(caller, metadata, &mut violations);
        violations.into_result()?;

        let profile = NewProfile {
            email: request.email,
            first_name: request.first_name,
            last_name: request.last_name,
            opt_out: request.ccpa_opt_out,
        };
        let Some((opt_out, Some(source), received_at)) = recorded else {
            // No opt-out: nothing for the ledger.
            let created = self.delivery.create_unrecorded(&profile, deadline).await?;
            return Ok(CreateProfileResponse {
                profile: Some(proto_profile(created)),
                request_id: String::new(),
            });
        };

        let request_id = request_id_or_new(&request.request_id);
        // The address and names are not kept, but a replay of this id with others is a
        // different request.
        let content = fingerprint(
            &request_id,
            &[
                &profile.email.to_lowercase(),
                &profile.first_name,
                &profile.last_name,
            ],
        );
        let new = NewRequest {
            request_id,
            kind: Kind::CreateProfile,
            pkey: None,
            opt_out,
            source,
            received_at,
            caller,
            first_attempt_window_ms: 0,
            parent_request_id: None,
            fingerprint: Some(content),
            restores_request_id: None,
            email_sha256: None,
        };
        let request_id = new.request_id.clone();
        let created = self.create_recorded(&new, &profile, deadline).await?;
        Ok(CreateProfileResponse {
            profile: Some(created),
            request_id,
        })
    }

    /// Records a creation with an opt-out, then creates the profile; a replayed request id
    /// answers the profile created the first time, without creating another.
    async fn create_recorded(
        &self,
        new: &NewRequest,
        profile: &NewProfile,
        deadline: Deadline,
    ) -> Result<Profile, Status> {
        let created = match self.delivery.create(new, profile, deadline).await? {
            Created::Created(created) => created,
            Created::Failed(error) => return Err(Status::from(error)),
            Created::Conflict => return Err(request_id_conflict()),
            Created::Replay(record) => {
                return match (record.state, record.pkey.as_deref()) {
                    (State::Failed, _) => Err(replayed_failure(&record)),
                    (_, Some(pkey)) => Ok(proto_profile(
                        self.delivery.created_profile(pkey, deadline).await?,
                    )),
                    (_, None) => Err(gateway_status(
                        Code::Unavailable,
                        Reason::RequestInProgress,
                        "this request id's creation is still in progress; retry",
                    )),
                };
            }
        };
        Ok(proto_profile(created))
    }
}

fn proto_profile(profile: CreatedProfile) -> Profile {
    Profile {
        pkey: profile.pkey,
        email: profile.email,
        first_name: profile.first_name,
        last_name: profile.last_name,
        ccpa_opt_out: profile.held.opt_out,
        ccpa_opt_out_last_modified: profile
            .held
            .last_modified
            .as_deref()
            .and_then(acs_timestamp_to_proto),
    }
}
