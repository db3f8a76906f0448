//! `ccpa.v1.CcpaService`: the RPCs, each a thin layer over its module (`opt_out`, `profiles`,
//! `records`), with one log line per call.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use futures::FutureExt as _;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Response, Status};

use super::deadline::caller_deadline;
use super::error_mapping::{Reason, gateway_status};
use super::validation::Violations;
use crate::access::status::{caller_not_allowed, unauthenticated};
use crate::access::{Caller, Permission};
use crate::optout::delivery::Delivery;
use crate::proto::ccpa_v1::{
    BulkSetOptOutRequest, CreateProfileRequest, CreateProfileResponse, GetOptOutRecordRequest,
    GetOptOutRecordResponse, GetOptOutRequest, GetOptOutResponse, ListOptOutRecordsRequest,
    ListOptOutRecordsResponse, SetOptOutRequest, SetOptOutResponse, WatchOptOutChangesRequest,
    ccpa_service_server::CcpaService,
};
use crate::store::Ledger;

/// The metadata key naming the calling service where identities are self-declared.
pub const CALLER_METADATA: &str = crate::access::identity::SELF_DECLARED_HEADER;

/// The gRPC service. Cloning it is cheap: clones share the protocol's state (the client's
/// connection pool, the ledger's).
#[derive(Clone)]
pub struct CcpaApi {
    pub(super) delivery: Arc<Delivery>,
    /// A lookup by email matching more profiles than this is refused (TOO_MANY_PROFILES).
    pub(super) max_profiles_per_email: usize,
    /// Cancelled when the gateway begins to shut down: change feeds end then (UNAVAILABLE), since
    /// a stream that never ends would hold the server's graceful shutdown to its timeout.
    pub(super) watches_end: CancellationToken,
}

/// When the work for a call must be done by: the caller's deadline, or (if it set none) the
/// client's default budget.
pub(super) type Deadline = Option<Instant>;

impl CcpaApi {
    /// A service over the opt-out protocol of `delivery`, which refuses lookups by email
    /// matching more than `max_profiles_per_email`.
    pub fn new(delivery: Arc<Delivery>, max_profiles_per_email: usize) -> Self {
        Self {
            delivery,
            max_profiles_per_email,
            watches_end: CancellationToken::new(),
        }
    }

    /// The same service, whose change feeds end when `end` is cancelled.
    pub fn ending_watches(mut self, end: CancellationToken) -> Self {
        self.watches_end = end;
        self
    }

    pub(super) fn ledger(&self) -> &Ledger {
        self.delivery.ledger()
    }
}

/// The caller recorded with a request: the authenticated identity, or where identities are
/// self-declared the `x-ccpa-caller` metadata (checked like any input; `unknown` when absent).
pub(super) fn recorded_caller(
    caller: &Caller,
    metadata: &MetadataMap,
    violations: &mut Violations,
) -> String {
    match caller {
        Caller::Authenticated { id, .. } => id.to_string(),
        Caller::SelfDeclared => declared_caller(metadata, violations),
    }
}

fn declared_caller(metadata: &MetadataMap, violations: &mut Violations) -> String {
    match metadata.get(CALLER_METADATA).map(|v| v.to_str()) {
        None => "unknown".to_owned(),
        Some(Ok(caller)) => {
            violations.caller(CALLER_METADATA, caller);
            caller.to_owned()
        }
        Some(Err(_)) => {
            violations.caller(CALLER_METADATA, "\u{0}");
            String::new()
        }
    }
}

/// The caller of a call, as the gate established it. A request the gate did not see has none,
/// and is refused: deny by default.
pub(super) fn caller_in<T>(request: &Request<T>) -> Result<Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| unauthenticated("the call carries no caller identity"))
}

/// `Ok` if `caller` may do `permission`; else PERMISSION_DENIED naming it, logged.
pub(super) fn authorize(caller: &Caller, permission: Permission) -> Result<(), Status> {
    caller.require(permission).map_err(|missing| {
        if let Caller::Authenticated { id, .. } = caller {
            tracing::info!(
                caller = &**id,
                permission = missing.as_str(),
                "call denied by the policy"
            );
        }
        caller_not_allowed(missing)
    })
}

/// Authorizes a SetOptOut (or a bulk item): the change itself, and by email also
/// `read-by-email` (the answer tells whether the address is a customer's, and names its
/// profiles), and `create-profile` with `create_if_missing`.
pub(super) fn authorize_set(caller: &Caller, request: &SetOptOutRequest) -> Result<(), Status> {
    authorize_change(caller, request.ccpa_opt_out)?;
    if !request.email.is_empty() {
        authorize(caller, Permission::ReadByEmail)?;
    }
    if request.create_if_missing {
        authorize(caller, Permission::CreateProfile)?;
    }
    Ok(())
}

/// Authorizes a change of the opt-out: `opt-out` to set it, `opt-in` to clear it. Without a
/// value (which validation then refuses), either will do.
pub(super) fn authorize_change(caller: &Caller, opt_out: Option<bool>) -> Result<(), Status> {
    match opt_out {
        Some(value) => authorize(caller, Caller::permission_to_set(value)),
        None if caller.may(Permission::OptOut) || caller.may(Permission::OptIn) => Ok(()),
        None => authorize(caller, Permission::OptOut),
    }
}

/// Runs a writing call's work to its end even if the caller goes away. tonic drops a handler's
/// future when its caller cancels or its stream breaks; dropped mid-way, a write would leave the
/// profile's lease held until it expires (holding back every later request for that profile) and
/// a by-email request half fanned out. The work is bounded by its own deadline, so the task is
/// too. The `Status` of a panicked task is INTERNAL.
/// It runs as the deliverer's detached work, which the gateway drains, and which keeps a SQLite
/// ledger's exclusive hold until it ends.
pub(super) async fn to_completion<T: Send + 'static>(
    delivery: &Delivery,
    work: impl Future<Output = Result<T, Status>> + Send + 'static,
) -> Result<T, Status> {
    // The work stays in the call's span (and trace) in the task it runs in.
    delivery.detach(work).await.unwrap_or_else(|_| {
        Err(gateway_status(
            Code::Internal,
            Reason::WorkStopped,
            "the request's work stopped unexpectedly",
        ))
    })
}

/// Runs one RPC and writes its log line: method, gRPC code, latency. Nothing from the request
/// or the answer goes into it.
///
/// Not an `async fn`: that would hold `call` twice, as its argument and as the future it awaits,
/// and `call` is the whole of the call's work, which every call waiting for its turn at ACS
/// holds (thousands at once when ACS is slow).
fn observed<T>(
    rpc: &'static str,
    call: impl Future<Output = Result<T, Status>>,
) -> impl Future<Output = Result<Response<T>, Status>> {
    let started = Instant::now();
    call.map(move |result| {
        let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
        let code = match &result {
            Ok(_) => tonic::Code::Ok,
            Err(status) => status.code(),
        };
        tracing::info!(rpc, code = ?code, latency_ms, "rpc");
        result.map(Response::new)
    })
}

#[tonic::async_trait]
impl CcpaService for CcpaApi {
    async fn get_opt_out(
        &self,
        request: Request<GetOptOutRequest>,
    ) -> Result<Response<GetOptOutResponse>, Status> {
        let deadline = caller_deadline(request.metadata(), Instant::now());
        let caller = caller_in(&request);
        let request = request.into_inner();
        let work = async {
            let permission = if request.email.is_empty() {
                Permission::Read
            } else {
                Permission::ReadByEmail
            };
            authorize(&caller?, permission)?;
            self.get(request, deadline).await
        };
        observed("GetOptOut", work).await
    }

    async fn set_opt_out(
        &self,
        request: Request<SetOptOutRequest>,
    ) -> Result<Response<SetOptOutResponse>, Status> {
        let deadline = caller_deadline(request.metadata(), Instant::now());
        let caller = caller_in(&request);
        let (metadata, _, request) = request.into_parts();
        let api = self.clone();
        let work = async move {
            let caller = caller?;
            authorize_set(&caller, &request)?;
            let delivery = api.delivery.clone();
            to_completion(&delivery, async move {
                api.set(request, &caller, &metadata, deadline).await
            })
            .await
        };
        observed("SetOptOut", work).await
    }

    async fn create_profile(
        &self,
        request: Request<CreateProfileRequest>,
    ) -> Result<Response<CreateProfileResponse>, Status> {
        let deadline = caller_deadline(request.metadata(), Instant::now());
        let caller = caller_in(&request);
        let (metadata, _, request) = request.into_parts();
        let api = self.clone();
        let work = async move {
            let caller = caller?;
            authorize(&caller, Permission::CreateProfile)?;
            if let Some(opt_out) = request.ccpa_opt_out {
                authorize_change(&caller, Some(opt_out))?;
            }
            let delivery = api.delivery.clone();
            to_completion(&delivery, async move {
                api.create(request, &caller, &metadata, deadline).await
            })
            .await
        };
        observed("CreateProfile", work).await
    }

    async fn get_opt_out_record(
        &self,
        request: Request<GetOptOutRecordRequest>,
    ) -> Result<Response<GetOptOutRecordResponse>, Status> {
        let caller = caller_in(&request);
        let work = async {
            authorize(&caller?, Permission::Records)?;
            self.get_record(request.into_inner()).await
        };
        observed("GetOptOutRecord", work).await
    }

    type BulkSetOptOutStream = super::bulk::BulkStream;

    async fn bulk_set_opt_out(
        &self,
        request: Request<tonic::Streaming<BulkSetOptOutRequest>>,
    ) -> Result<Response<Self::BulkSetOptOutStream>, Status> {
        let caller = caller_in(&request)?;
        authorize(&caller, Permission::Bulk)?;
        let (metadata, _, items) = request.into_parts();
        Ok(Response::new(self.bulk(caller, metadata, items)))
    }

    type WatchOptOutChangesStream = super::changes::ChangeStream;

    async fn watch_opt_out_changes(
        &self,
        request: Request<WatchOptOutChangesRequest>,
    ) -> Result<Response<Self::WatchOptOutChangesStream>, Status> {
        let caller = caller_in(&request)?;
        authorize(&caller, Permission::Watch)?;
        Ok(Response::new(self.watch(request.into_inner())?))
    }

    async fn list_opt_out_records(
        &self,
        request: Request<ListOptOutRecordsRequest>,
    ) -> Result<Response<ListOptOutRecordsResponse>, Status> {
        let caller = caller_in(&request);
        let work = async {
            authorize(&caller?, Permission::Records)?;
            self.list_records(request.into_inner()).await
        };
        observed("ListOptOutRecords", work).await
    }
}
