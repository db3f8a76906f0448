//! CreateProfile. With an opt-out, the request is recorded in the ledger first, like a
//! SetOptOut; the ledger keeps no email or name, so a creation that fails cannot be completed
//! later: it is FAILED, and the caller (told so) retries.

use acs_profile_client::types;
use tonic::metadata::MetadataMap;
use tonic::{Code, Status};

use super::error_mapping::{Reason, gateway_status, replayed_failure};
use super::opt_out::request_id_or_new;
use super::service::{CcpaApi, Deadline, OptOutState, recorded_caller};
use super::validation::{Violations, request_id_conflict};
use crate::access::Caller;
use crate::optout::Created;
use crate::proto::ccpa_v1::{CreateProfileRequest, CreateProfileResponse, Profile};
use crate::store::{Kind, NewRequest, State, fingerprint};
use crate::upstream::UpstreamError;

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

        let non_empty = |s: String| (!s.is_empty()).then_some(s);
        let input = types::ProfileInput {
            email: Some(request.email),
            first_name: non_empty(request.first_name),
            last_name: non_empty(request.last_name),
            ccpa_opt_out: request.ccpa_opt_out,
            ..Default::default()
        };
        let Some((opt_out, Some(source), received_at)) = recorded else {
            // No opt-out: nothing for the ledger.
            let profile = self.create_in_acs(&input, deadline).await?;
            return Ok(CreateProfileResponse {
                profile: Some(profile),
                request_id: String::new(),
            });
        };

        let request_id = request_id_or_new(&request.request_id);
        // The address and names are not kept, but a replay of this id with others is a
        // different request.
        let content = fingerprint(
            &request_id,
            &[
                &input.email.as_deref().unwrap_or_default().to_lowercase(),
                input.first_name.as_deref().unwrap_or_default(),
                input.last_name.as_deref().unwrap_or_default(),
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
        };
        let request_id = new.request_id.clone();
        let profile = self.create_recorded(&new, &input, deadline).await?;
        Ok(CreateProfileResponse {
            profile: Some(profile),
            request_id,
        })
    }

    /// Records a creation with an opt-out, then creates the profile; a replayed request id
    /// answers the profile created the first time, without creating another.
    async fn create_recorded(
        &self,
        new: &NewRequest,
        input: &types::ProfileInput,
        deadline: Deadline,
    ) -> Result<Profile, Status> {
        let created = self.delivery.create(new, input, deadline).await?;
        let profile = match created {
            Created::Created(profile) => profile,
            Created::Failed(error) => return Err(Status::from(error)),
            Created::Conflict => return Err(request_id_conflict()),
            Created::Replay(record) => {
                return match (record.state, record.pkey.as_deref()) {
                    (State::Failed, _) => Err(replayed_failure(&record)),
                    (_, Some(pkey)) => self
                        .noted(self.acs.read_profile(pkey, deadline).await)
                        .await
                        .and_then(|p| p.ok_or(UpstreamError::EmptyCollection))
                        .and_then(proto_profile)
                        .map_err(Status::from),
                    (_, None) => Err(gateway_status(
                        Code::Unavailable,
                        Reason::RequestInProgress,
                        "this request id's creation is still in progress; retry",
                    )),
                };
            }
        };
        proto_profile(profile).map_err(Status::from)
    }

    async fn create_in_acs(
        &self,
        input: &types::ProfileInput,
        deadline: Deadline,
    ) -> Result<Profile, Status> {
        let created = self.acs.add_profile(input, deadline).await;
        self.noted(created)
            .await
            .and_then(proto_profile)
            .map_err(Status::from)
    }
}

fn proto_profile(profile: types::Profile) -> Result<Profile, UpstreamError> {
    let state = OptOutState::from_profile(&profile)?;
    Ok(Profile {
        pkey: profile.p_key.ok_or(UpstreamError::MissingField("PKey"))?,
        email: profile.email.unwrap_or_default(),
        first_name: profile.first_name.unwrap_or_default(),
        last_name: profile.last_name.unwrap_or_default(),
        ccpa_opt_out: state.opt_out,
        ccpa_opt_out_last_modified: state.last_modified,
    })
}
