//! The gate: a tower layer in front of every service of the gRPC listener. It answers
//! `grpc.health.v1.Health` whoever calls; for every other call it establishes the caller's
//! identity (UNAUTHENTICATED without one, or when a header identity comes over TLS from a peer
//! that is not a trusted front proxy), applies the caller's `max_rps` (RESOURCE_EXHAUSTED
//! with RetryInfo beyond it), and puts the [`Caller`] in the request's extensions for the
//! handlers, which check the permission each call needs.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{Either, Ready, ready};
use tonic::Status;
use tower::{Layer, Service};

use super::identity::{self, IdentityMode, Unidentified};
use super::status::{caller_rate_limited, unauthenticated, untrusted_proxy};
use super::tls::ConnectionInfo;
use super::{AccessControl, Caller, Permissions};

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
    if matches!(access.mode, IdentityMode::Header(_)) {
        // Before the header is even read: reflection included, nothing past this point sees a
        // header an untrusted peer wrote.
        require_trusted_proxy(&access.trusted_proxies, connection)?;
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

/// In `header:` mode, whether the header can be believed on this connection. Over TLS the
/// gateway terminated the connection itself, so no mesh sidecar set or stripped the header: the
/// peer wrote it, and only a front proxy listed in `trusted` (by its certificate's identity) is
/// believed. In plaintext a sidecar terminated TLS and vouches for the header, as the mode has
/// always assumed. A call whose connection the gateway knows nothing of counts as TLS: deny by
/// default.
fn require_trusted_proxy(
    trusted: &[String],
    connection: Option<&ConnectionInfo>,
) -> Result<(), Status> {
    if !connection.is_none_or(|c| c.tls) {
        return Ok(());
    }
    let peer = connection
        .filter(|c| c.client_certificate)
        .and_then(|c| c.identity.as_deref());
    if peer.is_some_and(|peer| trusted.iter().any(|proxy| proxy == peer)) {
        return Ok(());
    }
    // The peer's certificate identity (a workload's name, never the header's value), for the
    // operator who lists the proxies; debug like every refusal at the gate.
    tracing::debug!(
        peer = peer.unwrap_or("none"),
        "a header identity from a peer that is not a trusted proxy"
    );
    Err(untrusted_proxy())
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

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;
    use tonic_types::StatusExt;

    const PROXY: &str = "spiffe://corp.example/ns/edge/sa/front-proxy";
    const ATTACKER: &str = "spiffe://corp.example/ns/evil/sa/attacker";
    const PORTAL: &str = "spiffe://corp.example/ns/web/sa/privacy-portal";
    const SET: &str = "/ccpa.v1.CcpaService/SetOptOut";
    const REFLECTION: &str = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";
    const HEALTH: &str = "/grpc.health.v1.Health/Check";

    /// `header:l5d-client-id` behind mutual TLS, `PROXY` trusted.
    fn behind_a_proxy() -> AccessControl {
        AccessControl {
            mode: "header:l5d-client-id".parse().unwrap(),
            policy: None,
            client_certificate_required: true,
            trusted_proxies: vec![PROXY.to_owned()],
        }
    }

    fn tls_from(identity: &str) -> ConnectionInfo {
        ConnectionInfo {
            tls: true,
            client_certificate: true,
            identity: Some(Arc::from(identity)),
            ..ConnectionInfo::default()
        }
    }

    fn call(
        path: &str,
        connection: Option<ConnectionInfo>,
        header: Option<&str>,
    ) -> http::Request<()> {
        let mut request = http::Request::builder().uri(path).body(()).unwrap();
        if let Some(connection) = connection {
            request.extensions_mut().insert(connection);
        }
        if let Some(value) = header {
            request
                .headers_mut()
                .insert("l5d-client-id", value.parse().unwrap());
        }
        request
    }

    fn caller(request: &http::Request<()>) -> Option<&str> {
        match request.extensions().get::<Caller>() {
            Some(Caller::Authenticated { id, .. }) => Some(id),
            _ => None,
        }
    }

    fn assert_refused(access: &AccessControl, mut request: http::Request<()>, reason: &str) {
        let status = admit(access, &mut request).unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert_eq!(
            status.get_details_error_info().expect("ErrorInfo").reason,
            reason
        );
        assert!(request.extensions().get::<Caller>().is_none());
    }

    #[test]
    fn over_tls_only_a_trusted_proxy_names_the_caller() {
        let access = behind_a_proxy();
        let mut request = call(SET, Some(tls_from(PROXY)), Some(PORTAL));
        admit(&access, &mut request).unwrap();
        assert_eq!(caller(&request), Some(PORTAL));

        // Any other certificate from the client CA: the header is its own word, whatever it
        // says, for reflection as for the API.
        for path in [SET, REFLECTION] {
            for header in [Some(PORTAL), Some(ATTACKER), None] {
                let request = call(path, Some(tls_from(ATTACKER)), header);
                assert_refused(&access, request, "UNTRUSTED_PROXY");
            }
        }
        // Health stays open to everyone.
        let mut probe = call(HEALTH, Some(tls_from(ATTACKER)), Some(PORTAL));
        admit(&access, &mut probe).unwrap();

        // The proxy itself is no caller: without the header there is no identity.
        let request = call(SET, Some(tls_from(PROXY)), None);
        assert_refused(&access, request, "CALLER_UNAUTHENTICATED");
        // No certificate at all: the client CA's rule speaks first.
        let anonymous = ConnectionInfo {
            tls: true,
            ..ConnectionInfo::default()
        };
        let request = call(SET, Some(anonymous.clone()), Some(PORTAL));
        assert_refused(&access, request, "CALLER_UNAUTHENTICATED");
        let without_ca = AccessControl {
            client_certificate_required: false,
            ..behind_a_proxy()
        };
        let request = call(SET, Some(anonymous), Some(PORTAL));
        assert_refused(&without_ca, request, "UNTRUSTED_PROXY");
        // No proxy listed: nobody is believed over TLS.
        let none_listed = AccessControl {
            trusted_proxies: Vec::new(),
            ..behind_a_proxy()
        };
        let request = call(SET, Some(tls_from(PROXY)), Some(PORTAL));
        assert_refused(&none_listed, request, "UNTRUSTED_PROXY");
    }

    #[test]
    fn in_plaintext_the_mesh_vouches_for_the_header() {
        let access = AccessControl {
            client_certificate_required: false,
            trusted_proxies: Vec::new(),
            ..behind_a_proxy()
        };
        let mut request = call(SET, Some(ConnectionInfo::default()), Some(PORTAL));
        admit(&access, &mut request).unwrap();
        assert_eq!(caller(&request), Some(PORTAL));
        // A connection the gateway knows nothing of might be TLS: deny by default.
        let request = call(SET, None, Some(PORTAL));
        assert_refused(&access, request, "UNTRUSTED_PROXY");
    }

    #[test]
    fn mutual_tls_identities_ignore_the_proxy_list() {
        let access = AccessControl {
            mode: IdentityMode::Mtls,
            ..behind_a_proxy()
        };
        let mut request = call(SET, Some(tls_from(ATTACKER)), Some(PORTAL));
        admit(&access, &mut request).unwrap();
        assert_eq!(caller(&request), Some(ATTACKER));
    }
}
