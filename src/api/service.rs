//! `ccpa.v1.CcpaService` on top of the generated ACS client.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use acs_profile_client::{CallError, Client, types};
use tonic::{Request, Response, Status};

use super::deadline::caller_deadline;
use super::error_mapping::{UpstreamError, upstream_status};
use super::timestamps::acs_timestamp_to_proto;
use super::validation::Violations;
use crate::health::{CredentialSignal, GatewayHealth};
use crate::proto::ccpa_v1::{
    CreateProfileRequest, CreateProfileResponse, GetOptOutRequest, GetOptOutResponse, Profile,
    SetOptOutRequest, SetOptOutResponse, ccpa_service_server::CcpaService,
};

/// The gRPC service. Cloning it is cheap: clones share the client's connection pool.
#[derive(Clone)]
pub struct CcpaApi {
    acs: Client,
    health: Arc<GatewayHealth>,
}

/// When the work for a call must be done by: the caller's deadline, or (if it set none) the
/// client's default budget.
type Deadline = Option<Instant>;

impl CcpaApi {
    /// A service that answers from the ACS tenant `acs` is configured for, and tells `health`
    /// what each call says about the gateway's credentials.
    pub fn new(acs: Client, health: Arc<GatewayHealth>) -> Self {
        Self { acs, health }
    }

    /// Passes a call's outcome by the health tracker on its way back.
    async fn noted<T>(&self, result: Result<T, CallError>) -> Result<T, UpstreamError> {
        self.health.observe(CredentialSignal::of(&result)).await;
        result.map_err(UpstreamError::from)
    }

    /// The profile's opt-out as ACS holds it now.
    async fn read_opt_out(
        &self,
        pkey: &str,
        deadline: Deadline,
    ) -> Result<OptOutState, UpstreamError> {
        let profile = self
            .noted(self.acs.read_profile(pkey, deadline).await)
            .await?
            .ok_or(UpstreamError::EmptyCollection)?;
        OptOutState::from_profile(&profile)
    }
}

/// What ACS holds about one profile's opt-out.
struct OptOutState {
    opt_out: bool,
    last_modified: Option<prost_types::Timestamp>,
}

impl OptOutState {
    fn from_profile(profile: &types::Profile) -> Result<Self, UpstreamError> {
        Ok(Self {
            // Never default a missing flag to false: that would read as "may sell".
            opt_out: profile
                .ccpa_opt_out
                .ok_or(UpstreamError::MissingField("ccpaOptOut"))?,
            last_modified: profile
                .ccpa_opt_out_last_modified
                .as_deref()
                .and_then(acs_timestamp_to_proto),
        })
    }
}

/// Runs one RPC and writes its log line: method, gRPC code, latency. Nothing from the request
/// or the answer goes into it.
async fn observed<T>(
    rpc: &'static str,
    call: impl Future<Output = Result<T, Status>>,
) -> Result<Response<T>, Status> {
    let started = Instant::now();
    let result = call.await;
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    let code = match &result {
        Ok(_) => tonic::Code::Ok,
        Err(status) => status.code(),
    };
    tracing::info!(rpc, code = ?code, latency_ms, "rpc");
    result.map(Response::new)
}

#[tonic::async_trait]
impl CcpaService for CcpaApi {
    async fn get_opt_out(
        &self,
        request: Request<GetOptOutRequest>,
    ) -> Result<Response<GetOptOutResponse>, Status> {
        const RPC: &str = "GetOptOut";
        let deadline = caller_deadline(request.metadata(), Instant::now());
        observed(RPC, async {
            let request = request.into_inner();
            let mut violations = Violations::default();
            violations.pkey("pkey", &request.pkey);
            violations.into_result()?;

            let state = self
                .read_opt_out(&request.pkey, deadline)
                .await
                .map_err(|e| upstream_status(RPC, &e))?;
            Ok(GetOptOutResponse {
                pkey: request.pkey,
                ccpa_opt_out: state.opt_out,
                ccpa_opt_out_last_modified: state.last_modified,
            })
        })
        .await
    }

    async fn set_opt_out(
        &self,
        request: Request<SetOptOutRequest>,
    ) -> Result<Response<SetOptOutResponse>, Status> {
        const RPC: &str = "SetOptOut";
        let deadline = caller_deadline(request.metadata(), Instant::now());
        observed(RPC, async {
            let request = request.into_inner();
            let mut violations = Violations::default();
            violations.pkey("pkey", &request.pkey);
            let opt_out = violations.required_bool("ccpa_opt_out", request.ccpa_opt_out);
            violations.into_result()?;

            let written = self
                .acs
                .set_ccpa_opt_out(&request.pkey, opt_out, deadline)
                .await;
            self.noted(written)
                .await
                .map_err(|e| upstream_status(RPC, &e))?;
            // ACS answers a PATCH with `{PKey, href}` only. Reading the profile back costs a
            // second call, but it is what lets the answer say what ACS holds (and when it
            // changed) rather than echo what was asked.
            let state = self
                .read_opt_out(&request.pkey, deadline)
                .await
                .map_err(|e| upstream_status(RPC, &e))?;
            if state.opt_out != opt_out {
                // Another writer changed it in between; the caller is told the truth.
                tracing::warn!(
                    rpc = RPC,
                    "the opt-out read back differs from the one just set"
                );
            }
            Ok(SetOptOutResponse {
                pkey: request.pkey,
                ccpa_opt_out: state.opt_out,
                ccpa_opt_out_last_modified: state.last_modified,
            })
        })
        .await
    }

    async fn create_profile(
        &self,
        request: Request<CreateProfileRequest>,
    ) -> Result<Response<CreateProfileResponse>, Status> {
        const RPC: &str = "CreateProfile";
        let deadline = caller_deadline(request.metadata(), Instant::now());
        observed(RPC, async {
            let request = request.into_inner();
            let mut violations = Violations::default();
            violations.email("email", &request.email);
            violations.name("first_name", &request.first_name);
            violations.name("last_name", &request.last_name);
            violations.into_result()?;

            let non_empty = |s: String| (!s.is_empty()).then_some(s);
            let input = types::ProfileInput {
                email: Some(request.email),
                first_name: non_empty(request.first_name),
                last_name: non_empty(request.last_name),
                ccpa_opt_out: request.ccpa_opt_out,
                ..Default::default()
            };
            let created = self.acs.add_profile(&input, deadline).await;
            let created = self
                .noted(created)
                .await
                .map_err(|e| upstream_status(RPC, &e))?;
            let profile = proto_profile(created).map_err(|e| upstream_status(RPC, &e))?;
            Ok(CreateProfileResponse {
                profile: Some(profile),
            })
        })
        .await
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
