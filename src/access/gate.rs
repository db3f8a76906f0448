//! The gate: a tower layer in front of every service of the gRPC listener. It answers
//! `grpc.health.v1.Health` whoever calls; for every other call it establishes the caller's
//! identity (UNAUTHENTICATED without one), applies the caller's `max_rps` (RESOURCE_EXHAUSTED
//! with RetryInfo beyond it), and puts the [`Caller`] in the request's extensions for the
//! handlers, which check the permission each call needs.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{Either, Ready, ready};
use tonic::Status;
use tower::{Layer, Service};

use super::identity::{self, IdentityMode, Unidentified};
use super::tls::ConnectionInfo;
use super::{AccessControl, Caller, Permissions};
use crate::api::error_mapping::{caller_rate_limited, unauthenticated};

const HEALTH_PATH: &str = "/grpc.health.v1.Health/";
const REFLECTION_PATH: &str = "/grpc.reflection.";

/// The layer.
#[derive(Clone)]
pub struct GateLayer {
    access: Arc<AccessControl>,
}

impl GateLayer {
    /// A gate applying `access`.
    pub fn new(access: AccessControl) -> Self {
        Self {
            access: Arc::new(access),
        }
    }
}

impl<S> Layer<S> for GateLayer {
    type Service = Gate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Gate {
            inner,
            access: self.access.clone(),
        }
    }
}

/// The gate around a service.
#[derive(Clone)]
pub struct Gate<S> {
    inner: S,
    access: Arc<AccessControl>,
}

impl<S, B, R> Service<http::Request<B>> for Gate<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    R: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<Ready<Result<Self::Response, Self::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        match admit(&self.access, &mut request) {
            Ok(()) => Either::Right(self.inner.call(request)),
            Err(status) => {
                // Debug, not info: an unauthenticated flood must not become a log flood.
                tracing::debug!(
                    path = request.uri().path(),
                    code = ?status.code(),
                    reason = status.message(),
                    "call refused at the gate"
                );
                Either::Left(ready(Ok(status.into_http())))
            }
        }
    }
}

/// Lets a call through, with its [`Caller`], or says why not.
fn admit<B>(access: &AccessControl, request: &mut http::Request<B>) -> Result<(), Status> {
    let path = request.uri().path();
    if path.starts_with(HEALTH_PATH) {
        return Ok(());
    }
    let reflection = path.starts_with(REFLECTION_PATH);
    let connection = request.extensions().get::<ConnectionInfo>();
    if access.client_certificate_required && !connection.is_some_and(|c| c.client_certificate) {
        return Err(unauthenticated(Unidentified::NoCertificate.message()));
    }
    let id: Arc<str> = match &access.mode {
        IdentityMode::SelfDeclared => {
            request.extensions_mut().insert(Caller::SelfDeclared);
            return Ok(());
        }
        IdentityMode::Mtls => certificate_identity(connection),
        IdentityMode::Header(name) => identity::from_header(request.headers(), name).map(Arc::from),
    }
    .map_err(|why| unauthenticated(why.message()))?;
    if reflection {
        // Describing the API needs an identity, not a permission.
        return Ok(());
    }
    let policy = access.policy.as_ref().map(|source| source.current());
    let permissions = match policy.as_deref().and_then(|p| p.rule_for(&id)) {
        Some(rule) => {
            rule.admit(&id).map_err(|wait| {
                tracing::debug!(caller = &*id, "caller over its max_rps");
                caller_rate_limited(wait)
            })?;
            rule.permissions()
        }
        None => Permissions::default(),
    };
    request
        .extensions_mut()
        .insert(Caller::Authenticated { id, permissions });
    Ok(())
}

fn certificate_identity(connection: Option<&ConnectionInfo>) -> Result<Arc<str>, Unidentified> {
    let connection = connection
        .filter(|c| c.client_certificate)
        .ok_or(Unidentified::NoCertificate)?;
    connection
        .identity
        .clone()
        .filter(|id| identity::well_formed(id))
        .ok_or(Unidentified::CertificateWithoutName)
}
