//! The trust boundary over real sockets: TLS and mutual TLS with certificates made here, the
//! three identity modes, the policy's permissions, per-caller rates, the fan-out cap, the
//! health-only listener, rotation of certificates and policy, and the start-up refusals.

use crate::common;

use common::{get, set};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use acs_emulator::{Emulator, EmulatorConfig, NewProfile};
use ccpa_gateway::access::tls::{ServerTls, TlsFiles};
use ccpa_gateway::access::{AccessControl, IdentityMode, PolicySource};
use ccpa_gateway::proto::ccpa_v1::ccpa_service_client::CcpaServiceClient;
use ccpa_gateway::proto::ccpa_v1::{
    BulkSetOptOutRequest, CreateProfileRequest, DeliveryState, GetOptOutRecordRequest,
    GetOptOutRequest, ListOptOutRecordsRequest, RequestSource, SetOptOutRequest,
};
use ccpa_gateway::server::{Boundary, ServerOptions};
use common::pki::{Ca, Name, Pem, client_tls, write_atomically};
use common::{
    Gateway, GatewayProcess, QUICK_DELIVERY_ARGS, connect, connect_tls, eventually_within,
};
use futures::StreamExt;
use tokio::net::TcpListener;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_types::StatusExt;

const PORTAL: &str = "spiffe://corp.example/ns/web/sa/privacy-portal";
const AUDITOR: &str = "auditor.corp.example";
/// The front proxy trusted to name callers in a header, when the gateway terminates TLS.
const FRONT_PROXY: &str = "spiffe://corp.example/ns/edge/sa/front-proxy";
/// A workload with a certificate from the same CA, trusted with nothing.
const ATTACKER: &str = "spiffe://corp.example/ns/evil/sa/attacker";
/// A gateway in the test's process, in front of a fresh emulator, behind `boundary`.
struct Secured(Gateway);

impl std::ops::Deref for Secured {
    type Target = Gateway;

    fn deref(&self) -> &Gateway {
        &self.0
    }
}

impl Secured {
    async fn start(boundary: Boundary) -> Self {
        Self::start_with(boundary, ServerOptions::default(), None).await
    }

    async fn start_with(
        boundary: Boundary,
        options: ServerOptions,
        health: Option<TcpListener>,
    ) -> Self {
        let options = ServerOptions {
            boundary,
            ..options
        };
        let builder = common::gateway().options(options);
        let builder = match health {
            Some(listener) => builder.health_listener(listener),
            None => builder,
        };
        Self(builder.start().await)
    }

    fn profile(&self) -> String {
        self.0.profile(false)
    }

    /// How many requests that change a profile the emulator has seen.
    fn writes(&self) -> usize {
        self.emulator()
            .requests()
            .iter()
            .filter(|r| r.method == "PATCH" || r.method == "POST")
            .count()
    }
}

/// Certificates for a test: a CA for everything, server files on disk, and two callers.
struct Certificates {
    dir: tempfile::TempDir,
    ca: Ca,
    portal: Pem,
    auditor: Pem,
    files: TlsFiles,
}

impl Certificates {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("ccpa test CA");
        let (cert, key) = ca.server().write(dir.path(), "server");
        let client_ca = dir.path().join("client-ca.crt");
        std::fs::write(&client_ca, ca.pem()).unwrap();
        Self {
            portal: ca.client(Name::Uri(PORTAL)),
            auditor: ca.client(Name::Dns(AUDITOR)),
            files: TlsFiles {
                cert,
                key,
                client_ca: Some(client_ca),
            },
            ca,
            dir,
        }
    }

    fn policy(&self, text: &str) -> PathBuf {
        let path = self.dir.path().join("policy.toml");
        write_atomically(&path, text);
        path
    }

    fn mtls(&self, policy: &str) -> Boundary {
        Boundary {
            tls: Some(Arc::new(ServerTls::open(&self.files).unwrap())),
            access: AccessControl {
                mode: IdentityMode::Mtls,
                policy: Some(Arc::new(PolicySource::open(self.policy(policy)).unwrap())),
                client_certificate_required: true,
                trusted_proxies: Vec::new(),
            },
        }
    }

    /// Mutual TLS terminated by the gateway, the caller named in `l5d-client-id` by the front
    /// proxy [`FRONT_PROXY`], the only peer trusted to set it.
    fn behind_a_front_proxy(&self, policy: &str) -> Boundary {
        Boundary {
            tls: Some(Arc::new(ServerTls::open(&self.files).unwrap())),
            access: AccessControl {
                mode: "header:l5d-client-id".parse().unwrap(),
                policy: Some(Arc::new(PolicySource::open(self.policy(policy)).unwrap())),
                client_certificate_required: true,
                trusted_proxies: vec![FRONT_PROXY.to_owned()],
            },
        }
    }

    async fn channel(&self, addr: SocketAddr, who: Option<&Pem>) -> Channel {
        connect_tls(addr, client_tls(&self.ca.pem(), who))
            .await
            .unwrap()
    }
}

fn header_boundary(header: &str, policy: &Path) -> Boundary {
    Boundary {
        tls: None,
        access: AccessControl {
            mode: format!("header:{header}").parse().unwrap(),
            policy: Some(Arc::new(PolicySource::open(policy.to_owned()).unwrap())),
            client_certificate_required: false,
            trusted_proxies: Vec::new(),
        },
    }
}

fn record_request(request_id: &str) -> GetOptOutRecordRequest {
    GetOptOutRecordRequest {
        request_id: request_id.into(),
    }
}

/// Asserts PERMISSION_DENIED with reason CALLER_NOT_ALLOWED naming `permission`.
fn assert_denied(status: &Status, permission: &str) {
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "CALLER_NOT_ALLOWED");
    assert_eq!(
        info.metadata.get("permission").map(String::as_str),
        Some(permission)
    );
}

fn assert_unauthenticated(status: &Status) {
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(
        status.get_details_error_info().expect("ErrorInfo").reason,
        "CALLER_UNAUTHENTICATED"
    );
}

/// Asserts UNAUTHENTICATED with reason UNTRUSTED_PROXY: a header identity from a peer that is
/// not a trusted front proxy.
fn assert_untrusted_proxy(status: &Status) {
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(
        status.get_details_error_info().expect("ErrorInfo").reason,
        "UNTRUSTED_PROXY"
    );
}

/// The caller recorded for `request_id`, read by a caller identified by `header: value`.
async fn caller_recorded(
    client: &mut CcpaServiceClient<Channel>,
    request_id: &str,
    header: &'static str,
    value: &str,
) -> String {
    client
        .get_opt_out_record(with_header(record_request(request_id), header, value))
        .await
        .unwrap()
        .into_inner()
        .record
        .unwrap()
        .caller
}

fn with_header<T>(message: T, name: &'static str, value: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(name, value.parse().unwrap());
    request
}

async fn list_services(channel: Channel) -> Result<Vec<String>, Status> {
    let mut reflection = ServerReflectionClient::new(channel);
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(futures::stream::iter([request]))
        .await?
        .into_inner();
    let answer = answers.next().await.expect("an answer")?;
    match answer.message_response {
        Some(tonic_reflection::pb::v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) => {
            Ok(list.service.into_iter().map(|s| s.name).collect())
        }
        other => panic!("not a list of services: {other:?}"),
    }
}

async fn health_of(channel: Channel, service: &str) -> Result<i32, Status> {
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .map(|r| r.into_inner().status)
}

#[tokio::test]
async fn mutual_tls_records_the_certificate_identity_and_enforces_the_policy() {
    let certs = Certificates::new();
    let gateway = Secured::start(certs.mtls(&format!(
        "[[caller]]\nid = \"{PORTAL}\"\nallow = [\"read\", \"opt-out\"]\n\n\
         [[caller]]\nid = \"{AUDITOR}\"\nallow = [\"records\", \"create-profile\"]\n"
    )))
    .await;
    let pkey = gateway.profile();
    let mut portal = CcpaServiceClient::new(certs.channel(gateway.addr, Some(&certs.portal)).await);
    let mut auditor =
        CcpaServiceClient::new(certs.channel(gateway.addr, Some(&certs.auditor)).await);

    // Allowed to opt out: applied, and recorded under the certificate's URI SAN, whatever the
    // caller declares.
    let applied = portal
        .set_opt_out(with_header(
            set(&pkey, true, "portal-1"),
            "x-ccpa-caller",
            "someone-else",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(applied.state, DeliveryState::Applied as i32);
    let record = auditor
        .get_opt_out_record(record_request("portal-1"))
        .await
        .unwrap()
        .into_inner()
        .record
        .unwrap();
    assert_eq!(record.caller, PORTAL, "the URI SAN wins over the DNS SAN");
    assert!(
        portal
            .get_opt_out(get(&pkey))
            .await
            .unwrap()
            .into_inner()
            .ccpa_opt_out
    );
    let writes = gateway.writes();
    assert_eq!(writes, 1);

    // Not allowed to opt back in: refused before the ledger or Adobe.
    let seen_by_adobe = gateway.emulator().requests().len();
    let denied = portal
        .set_opt_out(set(&pkey, false, "portal-2"))
        .await
        .unwrap_err();
    assert_denied(&denied, "opt-in");
    assert_eq!(
        gateway.emulator().requests().len(),
        seen_by_adobe,
        "nothing, not even a read, was sent to Adobe"
    );
    let missing = auditor
        .get_opt_out_record(record_request("portal-2"))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "nothing was recorded");
    assert!(
        portal
            .get_opt_out(get(&pkey))
            .await
            .unwrap()
            .into_inner()
            .ccpa_opt_out
    );

    // Each other permission, refused by name.
    let status = portal
        .list_opt_out_records(ListOptOutRecordsRequest::default())
        .await
        .unwrap_err();
    assert_denied(&status, "records");
    let status = portal
        .get_opt_out_record(record_request("portal-1"))
        .await
        .unwrap_err();
    assert_denied(&status, "records");
    let status = auditor.get_opt_out(get(&pkey)).await.unwrap_err();
    assert_denied(&status, "read");
    let status = portal
        .get_opt_out(GetOptOutRequest {
            email: "ada@example.com".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_denied(&status, "read-by-email");
    let status = portal
        .create_profile(CreateProfileRequest {
            email: "new@example.com".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_denied(&status, "create-profile");
    // By email, the answer tells whether the address is a customer's: that is a read by email.
    let by_email = SetOptOutRequest {
        email: "ada@example.com".into(),
        ..set("", true, "portal-4")
    };
    let status = portal.set_opt_out(by_email).await.unwrap_err();
    assert_denied(&status, "read-by-email");
    // A creation may carry an opt-out only for a caller allowed that opt-out.
    let status = auditor
        .create_profile(CreateProfileRequest {
            email: "new@example.com".into(),
            ccpa_opt_out: Some(true),
            source: RequestSource::WebForm as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_denied(&status, "opt-out");
    let status = portal
        .bulk_set_opt_out(futures::stream::iter([BulkSetOptOutRequest {
            item: Some(set(&pkey, true, "portal-3")),
            record_only: false,
        }]))
        .await
        .unwrap_err();
    assert_denied(&status, "bulk");
    assert_eq!(gateway.writes(), writes, "nothing was sent to Adobe");
    let records = auditor
        .list_opt_out_records(ListOptOutRecordsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .records;
    assert_eq!(records.len(), 1, "only portal-1 was recorded: {records:?}");
}

#[tokio::test]
async fn a_certificate_naming_no_one_is_not_an_identity() {
    let certs = Certificates::new();
    let gateway = Secured::start(certs.mtls("[[caller]]\nid = \"*\"\nallow = [\"read\"]\n")).await;
    let pkey = gateway.profile();
    let nameless = certs.ca.client(Name::Nothing);
    let mut client = CcpaServiceClient::new(certs.channel(gateway.addr, Some(&nameless)).await);
    let status = client.get_opt_out(get(&pkey)).await.unwrap_err();
    assert_unauthenticated(&status);
    assert!(status.message().contains("SAN"), "{status:?}");
}

#[tokio::test]
async fn without_a_client_certificate_only_health_answers() {
    let certs = Certificates::new();
    let gateway = Secured::start(certs.mtls(&format!(
        "[[caller]]\nid = \"{PORTAL}\"\nallow = [\"read\"]\n"
    )))
    .await;
    let pkey = gateway.profile();
    let anonymous = certs.channel(gateway.addr, None).await;

    for service in ["", "ccpa.v1.CcpaService"] {
        assert_eq!(
            health_of(anonymous.clone(), service).await.unwrap(),
            ServingStatus::Serving as i32
        );
    }
    let status = CcpaServiceClient::new(anonymous.clone())
        .get_opt_out(get(&pkey))
        .await
        .unwrap_err();
    assert_unauthenticated(&status);
    let status = CcpaServiceClient::new(anonymous.clone())
        .set_opt_out(set(&pkey, false, "anonymous-1"))
        .await
        .unwrap_err();
    assert_unauthenticated(&status);
    assert_unauthenticated(&list_services(anonymous).await.unwrap_err());
    assert_eq!(gateway.writes(), 0);

    // Reflection answers an authenticated caller, whatever its permissions.
    let portal = certs.channel(gateway.addr, Some(&certs.portal)).await;
    let services = list_services(portal).await.unwrap();
    assert!(
        services.contains(&"ccpa.v1.CcpaService".to_owned()),
        "{services:?}"
    );
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused_at_the_handshake() {
    let certs = Certificates::new();
    let gateway = Secured::start(certs.mtls(&format!(
        "[[caller]]\nid = \"{PORTAL}\"\nallow = [\"read\", \"opt-out\", \"opt-in\"]\n"
    )))
    .await;
    let pkey = gateway.profile();
    // The same identity, from a CA the gateway does not trust.
    let impostor = Ca::new("another CA").client(Name::Uri(PORTAL));
    // With TLS 1.3 the client may finish its side before the server refuses the certificate:
    // either the connection fails, or the first call does.
    let failure =
        match connect_tls(gateway.addr, client_tls(&certs.ca.pem(), Some(&impostor))).await {
            Err(error) => format!("{error:?}"),
            Ok(channel) => format!(
                "{:?}",
                CcpaServiceClient::new(channel)
                    .set_opt_out(set(&pkey, false, "impostor-1"))
                    .await
                    .expect_err("the handshake must fail")
            ),
        };
    // The gateway's alert, as the client saw it.
    assert!(failure.contains("UnknownCA"), "{failure}");
    assert_eq!(gateway.writes(), 0);

    // A plaintext client gets nowhere either.
    let plaintext = tonic::transport::Endpoint::from_shared(format!("http://{}", gateway.addr))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await;
    if let Ok(channel) = plaintext {
        let result = health_of(channel, "").await;
        assert!(result.is_err(), "{result:?}");
    }
}

#[tokio::test]
async fn a_denied_bulk_item_is_that_items_error_and_the_stream_goes_on() {
    let certs = Certificates::new();
    let gateway = Secured::start(certs.mtls(&format!(
        "[[caller]]\nid = \"{PORTAL}\"\nallow = [\"bulk\", \"opt-out\"]\n"
    )))
    .await;
    let (first, second) = (gateway.profile(), gateway.profile());
    let mut portal = CcpaServiceClient::new(certs.channel(gateway.addr, Some(&certs.portal)).await);
    let items = [
        set(&first, true, "bulk-1"),
        set(&second, false, "bulk-2"),
        set(&second, true, "bulk-3"),
    ]
    .map(|item| BulkSetOptOutRequest {
        item: Some(item),
        record_only: false,
    });
    let mut answers: Vec<_> = portal
        .bulk_set_opt_out(futures::stream::iter(items))
        .await
        .unwrap()
        .into_inner()
        .map(|answer| answer.unwrap())
        .collect()
        .await;
    answers.sort_by_key(|a| a.index);
    assert_eq!(answers.len(), 3);
    let denied = answers[1].error.as_ref().expect("item 1 is denied");
    assert_eq!(denied.code, "PERMISSION_DENIED");
    assert_eq!(denied.reason, "CALLER_NOT_ALLOWED");
    for answer in [&answers[0], &answers[2]] {
        assert!(answer.error.is_none(), "{answer:?}");
        assert_ne!(answer.state, DeliveryState::Failed as i32);
    }
    assert_eq!(
        gateway
            .emulator()
            .requests()
            .iter()
            .filter(|r| r.method == "PATCH")
            .count(),
        2,
        "the denied item reached Adobe"
    );
}

#[tokio::test]
async fn a_mesh_header_names_the_caller() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    write_atomically(
        &policy,
        "[[caller]]\nid = \"web.privacy.serviceaccount.identity.linkerd.cluster.local\"\n\
         allow = [\"opt-out\", \"records\"]\n",
    );
    let gateway = Secured::start(header_boundary("l5d-client-id", &policy)).await;
    let pkey = gateway.profile();
    let mut client = CcpaServiceClient::new(connect(gateway.addr).await);
    let identity = "web.privacy.serviceaccount.identity.linkerd.cluster.local";

    client
        .set_opt_out(with_header(
            set(&pkey, true, "mesh-1"),
            "l5d-client-id",
            identity,
        ))
        .await
        .unwrap();
    assert_eq!(
        caller_recorded(&mut client, "mesh-1", "l5d-client-id", identity).await,
        identity
    );

    // No header, no identity; a self-declared name counts for nothing.
    let status = client
        .set_opt_out(with_header(
            set(&pkey, true, "mesh-2"),
            "x-ccpa-caller",
            identity,
        ))
        .await
        .unwrap_err();
    assert_unauthenticated(&status);
    assert_unauthenticated(
        &list_services(connect(gateway.addr).await)
            .await
            .unwrap_err(),
    );
    // An identity the policy does not name may do nothing.
    let status = client
        .set_opt_out(with_header(
            set(&pkey, true, "mesh-3"),
            "l5d-client-id",
            "other.ns.serviceaccount.identity.linkerd.cluster.local",
        ))
        .await
        .unwrap_err();
    assert_denied(&status, "opt-out");
    assert_eq!(gateway.writes(), 1);
}

#[tokio::test]
async fn over_tls_a_header_identity_from_a_peer_that_is_no_trusted_proxy_is_refused() {
    let certs = Certificates::new();
    let gateway = Secured::start(certs.behind_a_front_proxy(&format!(
        "[[caller]]\nid = \"{PORTAL}\"\nallow = [\"read\", \"opt-out\", \"opt-in\"]\n\n\
         [[caller]]\nid = \"{AUDITOR}\"\nallow = [\"records\"]\n"
    )))
    .await;
    let pkey = gateway.profile();
    let seen_by_adobe = gateway.emulator().requests().len();
    // A workload holding a certificate from the client CA, as any in the cluster may.
    let attacker = certs.ca.client(Name::Uri(ATTACKER));
    let channel = certs.channel(gateway.addr, Some(&attacker)).await;
    let mut client = CcpaServiceClient::new(channel.clone());

    // The attack: it names the portal in the header, to opt a consumer out as the portal.
    let status = client
        .set_opt_out(with_header(
            set(&pkey, true, "forged-1"),
            "l5d-client-id",
            PORTAL,
        ))
        .await
        .unwrap_err();
    assert_untrusted_proxy(&status);
    // Whatever it sends: a read, no header, its own name; reflection too.
    let status = client
        .get_opt_out(with_header(get(&pkey), "l5d-client-id", PORTAL))
        .await
        .unwrap_err();
    assert_untrusted_proxy(&status);
    let status = client
        .set_opt_out(set(&pkey, true, "forged-2"))
        .await
        .unwrap_err();
    assert_untrusted_proxy(&status);
    let status = client
        .set_opt_out(with_header(
            set(&pkey, true, "forged-3"),
            "l5d-client-id",
            ATTACKER,
        ))
        .await
        .unwrap_err();
    assert_untrusted_proxy(&status);
    assert_untrusted_proxy(&list_services(channel.clone()).await.unwrap_err());
    // Health stays open, as to everyone.
    assert_eq!(
        health_of(channel, "").await.unwrap(),
        ServingStatus::Serving as i32
    );

    // Nothing reached Adobe, nothing was recorded, and the profile is as it was.
    assert_eq!(
        gateway.emulator().requests().len(),
        seen_by_adobe,
        "nothing, not even a read, was sent to Adobe"
    );
    let front_proxy = certs.ca.client(Name::Uri(FRONT_PROXY));
    let mut proxy = CcpaServiceClient::new(certs.channel(gateway.addr, Some(&front_proxy)).await);
    let records = proxy
        .list_opt_out_records(with_header(
            ListOptOutRecordsRequest::default(),
            "l5d-client-id",
            AUDITOR,
        ))
        .await
        .unwrap()
        .into_inner()
        .records;
    assert!(records.is_empty(), "nothing was recorded: {records:?}");
    assert!(
        !proxy
            .get_opt_out(with_header(get(&pkey), "l5d-client-id", PORTAL))
            .await
            .unwrap()
            .into_inner()
            .ccpa_opt_out
    );
}

#[tokio::test]
async fn a_trusted_front_proxy_names_the_caller_in_the_header() {
    let certs = Certificates::new();
    let dir = certs.dir.path();
    let policy = portal_policy(dir, "\"read\", \"opt-out\", \"records\"");
    let emulator = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let pkey = emulator.insert_profile(NewProfile {
        email: "ada@example.com".into(),
        first_name: "Ada".into(),
        last_name: "Lovelace".into(),
        ccpa_opt_out: false,
    });
    let path = |p: &Path| p.display().to_string();
    let front_proxy = certs.ca.client(Name::Uri(FRONT_PROXY));
    // The real binary, configured as docs/security.md shows, with the list in its variable.
    let mut gateway = common::gateway()
        .args(&[
            "--tls-cert",
            &path(&certs.files.cert),
            "--tls-key",
            &path(&certs.files.key),
            "--tls-client-ca",
            &path(certs.files.client_ca.as_ref().unwrap()),
            "--caller-identity",
            "header:l5d-client-id",
            "--authz-policy",
            &path(&policy),
        ])
        .env(
            "CCPA_TRUSTED_PROXY_IDENTITIES",
            &format!("spiffe://corp.example/ns/edge/sa/other-proxy, {FRONT_PROXY}"),
        )
        .tls(client_tls(&certs.ca.pem(), Some(&front_proxy)))
        .spawn(Some(&emulator))
        .await;

    let applied = gateway
        .client
        .set_opt_out(with_header(
            set(&pkey, true, "proxied-1"),
            "l5d-client-id",
            PORTAL,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(applied.state, DeliveryState::Applied as i32);
    assert_eq!(
        caller_recorded(&mut gateway.client, "proxied-1", "l5d-client-id", PORTAL).await,
        PORTAL,
        "the ledger records the caller the proxy named, not the proxy"
    );
    // The proxy is no caller of its own: without the header there is no identity.
    let status = gateway.client.get_opt_out(get(&pkey)).await.unwrap_err();
    assert_unauthenticated(&status);
    // Even the portal's own certificate is not believed about the header: only the proxy is.
    let mut direct = CcpaServiceClient::new(
        connect_tls(
            gateway.addr,
            client_tls(&certs.ca.pem(), Some(&certs.portal)),
        )
        .await
        .unwrap(),
    );
    let status = direct
        .get_opt_out(with_header(get(&pkey), "l5d-client-id", PORTAL))
        .await
        .unwrap_err();
    assert_untrusted_proxy(&status);
    gateway.kill().await;
}

#[tokio::test]
async fn istio_names_the_caller_in_the_last_element_of_its_header() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    write_atomically(
        &policy,
        &format!("[[caller]]\nid = \"{PORTAL}\"\nallow = [\"opt-out\", \"records\"]\n"),
    );
    let gateway = Secured::start(header_boundary("x-forwarded-client-cert", &policy)).await;
    let pkey = gateway.profile();
    let mut client = CcpaServiceClient::new(connect(gateway.addr).await);
    let xfcc = format!(
        "By=spiffe://corp.example/ns/privacy/sa/ccpa-gateway;Hash=aa;URI=spiffe://corp.example/ns/edge/sa/proxy,\
         By=spiffe://corp.example/ns/privacy/sa/ccpa-gateway;Hash=bb;Subject=\"CN=portal, O=corp\";URI={PORTAL}"
    );
    client
        .set_opt_out(with_header(
            set(&pkey, true, "istio-1"),
            "x-forwarded-client-cert",
            &xfcc,
        ))
        .await
        .unwrap();
    assert_eq!(
        caller_recorded(&mut client, "istio-1", "x-forwarded-client-cert", &xfcc).await,
        PORTAL
    );
    let status = client
        .set_opt_out(with_header(
            set(&pkey, true, "istio-2"),
            "x-forwarded-client-cert",
            "Hash=cc;DNS=portal.corp.example",
        ))
        .await
        .unwrap_err();
    assert_unauthenticated(&status);
}

#[tokio::test]
async fn each_caller_is_held_to_its_own_max_rps() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    write_atomically(
        &policy,
        "[[caller]]\nid = \"slow\"\nallow = [\"read\"]\nmax_rps = 2\n\n\
         [[caller]]\nid = \"*\"\nallow = [\"read\"]\n",
    );
    let gateway = Secured::start(header_boundary("x-caller-id", &policy)).await;
    let pkey = gateway.profile();
    let mut client = CcpaServiceClient::new(connect(gateway.addr).await);

    let started = Instant::now();
    let mut admitted = 0u32;
    let mut limited = Vec::new();
    for _ in 0..10 {
        match client
            .get_opt_out(with_header(get(&pkey), "x-caller-id", "slow"))
            .await
        {
            Ok(_) => admitted += 1,
            Err(status) => limited.push(status),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    // A burst of 2, then 2 a second: however slow this machine, never more than that.
    let allowed = 2.0 + 2.0 * elapsed.ceil();
    assert!(
        f64::from(admitted) <= allowed,
        "{admitted} admitted in {elapsed:.2}s"
    );
    assert!(admitted >= 2, "the burst is admitted");
    let status = limited.first().expect("some calls are over the rate");
    assert_eq!(status.code(), Code::ResourceExhausted);
    let details = status.get_error_details();
    assert_eq!(
        details.error_info().expect("ErrorInfo").reason,
        "CALLER_RATE_LIMITED"
    );
    let delay = details
        .retry_info()
        .and_then(|r| r.retry_delay)
        .expect("RetryInfo");
    assert!(
        delay > Duration::ZERO && delay <= Duration::from_secs(1),
        "{delay:?}"
    );

    // Another caller has no limit, and is not held back by the first.
    for _ in 0..10 {
        client
            .get_opt_out(with_header(get(&pkey), "x-caller-id", "fast"))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn an_email_with_too_many_profiles_is_refused_and_nothing_is_recorded_for_them() {
    let options = ServerOptions {
        max_profiles_per_email: 2,
        ..ServerOptions::default()
    };
    let gateway = Secured::start_with(Boundary::default(), options, None).await;
    for n in 0..3 {
        gateway.emulator().insert_profile(NewProfile {
            email: "many@example.com".into(),
            first_name: format!("Many{n}"),
            last_name: "Profiles".into(),
            ccpa_opt_out: false,
        });
    }
    for _ in 0..2 {
        gateway.emulator().insert_profile(NewProfile {
            email: "two@example.com".into(),
            first_name: "Two".into(),
            last_name: "Profiles".into(),
            ccpa_opt_out: false,
        });
    }
    let mut client = CcpaServiceClient::new(connect(gateway.addr).await);
    let too_many = |status: Status| {
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert_eq!(
            status.get_details_error_info().expect("ErrorInfo").reason,
            "TOO_MANY_PROFILES"
        );
    };
    too_many(
        client
            .get_opt_out(GetOptOutRequest {
                email: "many@example.com".into(),
                ..Default::default()
            })
            .await
            .unwrap_err(),
    );
    too_many(
        client
            .set_opt_out(SetOptOutRequest {
                email: "many@example.com".into(),
                ccpa_opt_out: Some(true),
                source: RequestSource::Email as i32,
                request_id: "fan-1".into(),
                ..Default::default()
            })
            .await
            .unwrap_err(),
    );
    let records = client
        .list_opt_out_records(ListOptOutRecordsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .records;
    assert_eq!(records.len(), 1, "only the request itself: {records:?}");
    assert_eq!(records[0].request_id, "fan-1");
    assert_eq!(records[0].state, DeliveryState::Failed as i32);
    assert_eq!(gateway.writes(), 0);
    // Replayed, the request answers what it answered the first time, and is not tried again.
    let lookups_before = gateway.emulator().requests().len();
    let replayed = client
        .set_opt_out(SetOptOutRequest {
            email: "many@example.com".into(),
            ccpa_opt_out: Some(true),
            source: RequestSource::Email as i32,
            request_id: "fan-1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(replayed.code(), Code::FailedPrecondition, "{replayed:?}");
    assert_eq!(
        replayed.get_details_error_info().expect("ErrorInfo").reason,
        "REQUEST_FAILED"
    );
    assert_eq!(
        gateway.emulator().requests().len(),
        lookups_before,
        "a replay does not look the address up again"
    );

    // At the limit, the request goes through.
    let applied = client
        .set_opt_out(SetOptOutRequest {
            email: "two@example.com".into(),
            ccpa_opt_out: Some(true),
            source: RequestSource::Email as i32,
            request_id: "fan-2".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(applied.profiles.len(), 2);
    assert_eq!(gateway.writes(), 2);
}

#[tokio::test]
async fn the_health_listener_answers_health_alone_in_plaintext() {
    let certs = Certificates::new();
    let health = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let health_addr = health.local_addr().unwrap();
    let gateway = Secured::start_with(
        certs.mtls(&format!(
            "[[caller]]\nid = \"{PORTAL}\"\nallow = [\"read\"]\n"
        )),
        ServerOptions::default(),
        Some(health),
    )
    .await;
    let pkey = gateway.profile();
    let probe = connect(health_addr).await;
    for service in ["", "ccpa.v1.CcpaService"] {
        assert_eq!(
            health_of(probe.clone(), service).await.unwrap(),
            ServingStatus::Serving as i32
        );
    }
    let status = CcpaServiceClient::new(probe.clone())
        .get_opt_out(get(&pkey))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
    assert_eq!(
        list_services(probe).await.unwrap_err().code(),
        Code::Unimplemented
    );
}

/// Writes a policy allowing the portal `permissions`.
fn portal_policy(dir: &Path, permissions: &str) -> PathBuf {
    let path = dir.join("policy.toml");
    write_atomically(
        &path,
        &format!("[[caller]]\nid = \"{PORTAL}\"\nallow = [{permissions}]\n"),
    );
    path
}

#[tokio::test]
async fn certificates_and_policy_rotate_without_a_restart() {
    let certs = Certificates::new();
    let policy = portal_policy(certs.dir.path(), "\"read\", \"opt-out\"");
    let emulator = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let pkey = emulator.insert_profile(NewProfile {
        email: "ada@example.com".into(),
        first_name: "Ada".into(),
        last_name: "Lovelace".into(),
        ccpa_opt_out: false,
    });
    let ledger = certs.dir.path().join("ledger.sqlite3");
    let path = |p: &Path| p.display().to_string();
    let client_ca = certs.files.client_ca.clone().unwrap();
    let mut gateway = common::gateway()
        .ledger_at(&path(&ledger))
        .args(QUICK_DELIVERY_ARGS)
        .args(&[
            "--tls-cert",
            &path(&certs.files.cert),
            "--tls-key",
            &path(&certs.files.key),
            "--tls-client-ca",
            &path(&client_ca),
            "--authz-policy",
            &path(&policy),
        ])
        .log_filter("info")
        .tls(client_tls(&certs.ca.pem(), Some(&certs.portal)))
        .spawn(Some(&emulator))
        .await;
    let policy_reloads = ["reloaded after a change on disk", "--authz-policy"];
    let policy_refusals = ["do not load", "--authz-policy"];
    let tls_reloads = ["reloaded after a change on disk", "--tls-cert"];
    let tls_refusals = ["do not load", "--tls-cert"];

    let status = gateway
        .client
        .set_opt_out(set(&pkey, false, "rotate-1"))
        .await
        .unwrap_err();
    assert_denied(&status, "opt-in");

    // A new policy takes effect without a restart.
    after(&gateway, &policy_reloads, || {
        portal_policy(certs.dir.path(), "\"read\", \"opt-out\", \"opt-in\"");
    })
    .await;
    gateway
        .client
        .set_opt_out(set(&pkey, false, "rotate-2"))
        .await
        .unwrap();

    // A policy that does not parse leaves the last good one in force.
    after(&gateway, &policy_refusals, || {
        write_atomically(&policy, "[[caller]]\nid = \"unterminated\n");
    })
    .await;
    gateway
        .client
        .set_opt_out(set(&pkey, false, "rotate-3"))
        .await
        .unwrap();

    // A new server certificate, from another CA: new handshakes see it.
    let next_ca = Ca::new("next CA");
    after(&gateway, &tls_reloads, || {
        next_ca.server().write(certs.dir.path(), "server");
    })
    .await;
    let next = connect_tls(
        gateway.addr,
        client_tls(&next_ca.pem(), Some(&certs.portal)),
    )
    .await
    .expect("a handshake trusting the new CA");
    assert_eq!(
        health_of(next.clone(), "").await.unwrap(),
        ServingStatus::Serving as i32
    );
    assert!(
        !handshake_works(gateway.addr, &certs.ca.pem(), &certs.portal).await,
        "the old certificate is no longer served"
    );

    // A new client CA: certificates from it are let in, those from the old one no longer.
    let next_portal = next_ca.client(Name::Uri(PORTAL));
    after(&gateway, &tls_reloads, || {
        write_atomically(&client_ca, &next_ca.pem());
    })
    .await;
    let mut client = CcpaServiceClient::new(
        connect_tls(gateway.addr, client_tls(&next_ca.pem(), Some(&next_portal)))
            .await
            .unwrap(),
    );
    client.get_opt_out(get(&pkey)).await.unwrap();
    assert!(
        !handshake_works(gateway.addr, &next_ca.pem(), &certs.portal).await,
        "a certificate from the old client CA is refused"
    );

    // A certificate file that does not parse keeps the one in force.
    after(&gateway, &tls_refusals, || {
        write_atomically(
            &certs.files.cert,
            "-----BEGIN CERTIFICATE-----\nnot base64\n",
        );
    })
    .await;
    assert!(handshake_works(gateway.addr, &next_ca.pem(), &next_portal).await);
    gateway.kill().await;
}

/// Makes `change`, then waits for the gateway to log one more line holding `needles`.
async fn after(gateway: &GatewayProcess, needles: &[&str], change: impl FnOnce()) {
    let before = gateway.log_count(needles);
    change();
    eventually_within(
        Duration::from_secs(30),
        &format!("a new log line holding {needles:?}"),
        || std::future::ready((gateway.log_count(needles) != before).then_some(())),
    )
    .await;
}

/// Whether a client trusting `ca` and presenting `identity` completes a call to health.
async fn handshake_works(addr: SocketAddr, ca: &str, identity: &Pem) -> bool {
    match connect_tls(addr, client_tls(ca, Some(identity))).await {
        Err(_) => false,
        Ok(channel) => health_of(channel, "").await.is_ok(),
    }
}

/// Runs `serve` with a static ACS token and `args`, in a directory of its own, and returns
/// its exit code and standard error. It must refuse to start.
async fn refused(args: &[&str], dir: &Path) -> (Option<i32>, String) {
    refused_with(args, &[], dir).await
}

/// [`refused`], with the environment variables `envs` as well.
async fn refused_with(args: &[&str], envs: &[(&str, &str)], dir: &Path) -> (Option<i32>, String) {
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        common::cli::ccpa_gateway()
            .arg("serve")
            .args(args)
            .current_dir(dir)
            .env("CCPA_ACS_TENANT", "acme")
            .env("CCPA_ACS_API_KEY", "key")
            .env("CCPA_ACS_ACCESS_TOKEN", "token")
            .env_remove("CCPA_LISTEN")
            .env_remove("CCPA_LEDGER")
            .env_remove("CCPA_TRUSTED_PROXY_IDENTITIES")
            .envs(envs.iter().copied())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("serve refuses at once")
    .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn unsafe_settings_stop_start_up_naming_the_fix() {
    let certs = Certificates::new();
    let dir = certs.dir.path();
    let path = |p: &Path| p.display().to_string();
    let (cert, key) = (path(&certs.files.cert), path(&certs.files.key));
    let ca = path(certs.files.client_ca.as_ref().unwrap());
    let policy = path(&portal_policy(dir, "\"read\""));
    let bad_policy = dir.join("bad-policy.toml");
    std::fs::write(&bad_policy, "[[caller]]\nid = \"a\"\nallow = [\"sell\"]\n").unwrap();
    let bad_policy = path(&bad_policy);
    let not_a_cert = dir.join("not-a-cert.pem");
    std::fs::write(&not_a_cert, "hello").unwrap();
    let not_a_cert = path(&not_a_cert);

    let cases: Vec<(Vec<&str>, &[&str])> = vec![
        // Anyone on the network could declare themselves any caller.
        (
            vec!["--listen", "0.0.0.0:0"],
            &["--listen", "--tls-client-ca", "header:"],
        ),
        // TLS alone does not say who calls.
        (
            vec![
                "--listen",
                "0.0.0.0:0",
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
            ],
            &["--listen", "--tls-client-ca"],
        ),
        (
            vec!["--caller-identity", "mtls", "--authz-policy", &policy],
            &["--caller-identity", "--tls-client-ca"],
        ),
        (
            vec![
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
                "--tls-client-ca",
                &ca,
            ],
            &["--authz-policy"],
        ),
        (
            vec!["--caller-identity", "header:l5d-client-id"],
            &["--authz-policy"],
        ),
        (
            vec![
                "--caller-identity",
                "header:l5d-client-id",
                "--authz-policy",
                &bad_policy,
            ],
            &["--authz-policy", "sell"],
        ),
        (
            vec!["--authz-policy", &policy],
            &["--authz-policy", "self-declared"],
        ),
        (
            vec![
                "--tls-cert",
                &not_a_cert,
                "--tls-key",
                &key,
                "--tls-client-ca",
                &ca,
                "--authz-policy",
                &policy,
            ],
            &["--tls-cert"],
        ),
        (vec!["--tls-cert", &cert], &["--tls-key"]),
        (
            vec![
                "--caller-identity",
                "self-declared",
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
                "--tls-client-ca",
                &ca,
            ],
            &["--caller-identity", "mtls"],
        ),
        (
            vec!["--caller-identity", "header:x-ccpa-caller"],
            &["--caller-identity"],
        ),
        (
            vec!["--acs-base-url", "http://mc.adobe.io"],
            &["CCPA_ACS_BASE_URL", "https://"],
        ),
        (
            vec!["--ledger", "postgres://ledger.corp.example/ccpa"],
            &["--ledger", "sslmode=verify-full"],
        ),
        (
            vec![
                "--ledger",
                "postgres://ledger.corp.example/ccpa?sslmode=require",
            ],
            &["--ledger", "sslmode=verify-full"],
        ),
        (
            vec!["--max-connection-age", "0s"],
            &["--max-connection-age"],
        ),
        (
            vec!["--max-concurrent-streams", "0"],
            &["--max-concurrent-streams"],
        ),
        (
            vec!["--max-profiles-per-email", "0"],
            &["--max-profiles-per-email"],
        ),
        // Every duration and limit has bounds: no 0 where it makes no sense, nothing that can
        // overflow what is computed from it.
        (vec!["--acs-timeout", "0s"], &["--acs-timeout"]),
        (vec!["--acs-timeout", "1000000000days"], &["--acs-timeout"]),
        (
            vec!["--acs-connect-timeout", "0s"],
            &["--acs-connect-timeout"],
        ),
        (
            vec!["--health-probe-interval", "0s"],
            &["--health-probe-interval"],
        ),
        (
            vec!["--delivery-poll-interval", "0s"],
            &["--delivery-poll-interval"],
        ),
        (vec!["--drain-timeout", "100years"], &["--drain-timeout"]),
        (vec!["--drain-delay", "100years"], &["--drain-delay"]),
        (vec!["--retention", "500years"], &["--retention"]),
        (vec!["--acs-max-in-flight", "0"], &["--acs-max-in-flight"]),
        (
            vec!["--acs-max-queued", "99999999999999999999"],
            &["--acs-max-queued"],
        ),
    ];
    for (args, named) in cases {
        let (code, stderr) = refused(&args, dir).await;
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        for name in named {
            assert!(stderr.contains(name), "{args:?} must name {name}: {stderr}");
        }
    }
    assert!(
        !dir.join("ccpa-ledger.sqlite3").exists(),
        "a refused start creates no ledger"
    );

    // OAuth's token endpoint, too, must be https:// (the emulator's loopback excepted).
    let output = common::cli::ccpa_gateway()
        .args(["serve", "--acs-tenant", "acme"])
        .args(["--ims-client-id", "id", "--ims-client-secret", "s"])
        .args(["--ims-url", "http://ims.corp.example"])
        .current_dir(dir)
        .env_remove("CCPA_ACS_ACCESS_TOKEN")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("CCPA_IMS_URL"), "{stderr}");
}

#[tokio::test]
async fn a_header_identity_over_tls_starts_only_with_trusted_proxies_and_a_client_ca() {
    let certs = Certificates::new();
    let dir = certs.dir.path();
    let path = |p: &Path| p.display().to_string();
    let (cert, key) = (path(&certs.files.cert), path(&certs.files.key));
    let ca = path(certs.files.client_ca.as_ref().unwrap());
    let policy = path(&portal_policy(dir, "\"read\""));
    let tls = ["--tls-cert", &cert, "--tls-key", &key];
    let mutual = [
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-client-ca",
        &ca,
    ];
    let header = [
        "--caller-identity",
        "header:l5d-client-id",
        "--authz-policy",
        &policy,
    ];
    let mtls = ["--caller-identity", "mtls", "--authz-policy", &policy];
    let proxy = ["--trusted-proxy-identity", FRONT_PROXY];
    fn with<'a>(parts: &[&[&'a str]]) -> Vec<&'a str> {
        parts.concat()
    }
    const VARIABLE: &str = "CCPA_TRUSTED_PROXY_IDENTITIES";

    /// The arguments, the environment, and what the refusal must name.
    type Case<'a> = (Vec<&'a str>, &'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: Vec<Case> = vec![
        // TLS terminated here: only the caller could have set the header.
        (
            with(&[&tls, &header]),
            &[],
            &[
                "--caller-identity",
                "--tls-cert",
                "--trusted-proxy-identity",
                "--tls-client-ca",
            ],
        ),
        (
            with(&[&mutual, &header]),
            &[],
            &[
                "--caller-identity",
                "--tls-cert",
                "--trusted-proxy-identity",
                VARIABLE,
            ],
        ),
        // Proxies listed, but nothing to know them by.
        (
            with(&[&tls, &header, &proxy]),
            &[],
            &["--tls-client-ca", "--trusted-proxy-identity"],
        ),
        (
            with(&[&tls, &header]),
            &[(VARIABLE, FRONT_PROXY)],
            &["--tls-client-ca", "--trusted-proxy-identity"],
        ),
        // A list that would be ignored: each caller's certificate names it, or a mesh vouches.
        (
            with(&[&mutual, &mtls, &proxy]),
            &[],
            &["--trusted-proxy-identity", "mtls"],
        ),
        (
            with(&[&header, &proxy]),
            &[],
            &["--trusted-proxy-identity", "--tls-cert"],
        ),
        // An identity no certificate could name.
        (
            with(&[
                &mutual,
                &header,
                &["--trusted-proxy-identity", "front proxy"],
            ]),
            &[],
            &["--trusted-proxy-identity"],
        ),
        (
            with(&[&mutual, &header]),
            &[(
                VARIABLE,
                "spiffe://corp.example/ns/edge/sa/front-proxy,,other",
            )],
            &["--trusted-proxy-identity"],
        ),
    ];
    for (args, envs, named) in cases {
        let (code, stderr) = refused_with(&args, envs, dir).await;
        assert_eq!(code, Some(2), "{args:?} {envs:?}: {stderr}");
        for name in named {
            assert!(
                stderr.contains(name),
                "{args:?} {envs:?} must name {name}: {stderr}"
            );
        }
    }
    assert!(
        !dir.join("ccpa-ledger.sqlite3").exists(),
        "a refused start creates no ledger"
    );
}

#[tokio::test]
async fn the_terminal_commands_speak_mutual_tls() {
    let certs = Certificates::new();
    let gateway = Secured::start(certs.mtls(&format!(
        "[[caller]]\nid = \"{PORTAL}\"\nallow = [\"read\", \"opt-out\", \"bulk\", \"records\"]\n"
    )))
    .await;
    let pkey = gateway.profile();
    let dir = certs.dir.path();
    let (cert, key) = certs.portal.write(dir, "portal");
    let ca = dir.join("ca.crt");
    std::fs::write(&ca, certs.ca.pem()).unwrap();
    let addr = format!("https://localhost:{}", gateway.addr.port());
    let run = |args: Vec<String>, with_identity: bool| {
        let mut command = common::cli::ccpa_gateway();
        command
            .args(args)
            .args(["--addr", &addr])
            .env("CCPA_CLIENT_TLS_CA", &ca);
        if with_identity {
            command
                .env("CCPA_CLIENT_TLS_CERT", &cert)
                .env("CCPA_CLIENT_TLS_KEY", &key);
        }
        command.kill_on_drop(true).output()
    };
    let strings = |args: &[&str]| args.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    let output = run(
        strings(&[
            "set-opt-out",
            &pkey,
            "--opt-out",
            "true",
            "--source",
            "web-form",
        ]),
        true,
    )
    .await
    .unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let output = run(strings(&["get-opt-out", &pkey]), true).await.unwrap();
    assert_eq!(output.status.code(), Some(0));
    let answer: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(answer["ccpaOptOut"], true, "{answer}");

    let csv = dir.join("opt-outs.csv");
    std::fs::write(&csv, format!("pkey,opt_out,source\n{pkey},true,web-form\n")).unwrap();
    let results = dir.join("results.csv");
    let output = run(
        vec![
            "bulk-set-opt-out".into(),
            "--file".into(),
            csv.display().to_string(),
            "--results".into(),
            results.display().to_string(),
        ],
        true,
    )
    .await
    .unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // Without its certificate the command is refused, and says so.
    let output = run(strings(&["get-opt-out", &pkey]), false).await.unwrap();
    assert_ne!(output.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("Unauthenticated"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn oversized_requests_are_refused_before_anything_is_touched() {
    let gateway = Secured::start(Boundary::default()).await;
    let mut client = CcpaServiceClient::new(connect(gateway.addr).await);
    // Far beyond any real request: 100 KiB of key.
    let status = client
        .set_opt_out(set(&format!("@{}", "A".repeat(100 * 1024)), true, "big-1"))
        .await
        .unwrap_err();
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{status:?}"
    );
    let records = client
        .list_opt_out_records(ListOptOutRecordsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .records;
    assert!(records.is_empty(), "{records:?}");
    assert!(gateway.emulator().requests().is_empty());
}

#[tokio::test]
async fn one_connection_has_at_most_max_concurrent_streams_calls_in_progress() {
    let latency = Duration::from_millis(400);
    let options = ServerOptions {
        connections: ccpa_gateway::server::ConnectionLimits {
            max_concurrent_streams: 2,
            ..Default::default()
        },
        ..ServerOptions::default()
    };
    let gateway = Secured::start_with(Boundary::default(), options, None).await;
    let pkey = gateway.profile();
    let channel = connect(gateway.addr).await;
    // One call first, so that the client has the server's SETTINGS (and its limit) before it
    // opens streams: until then it may open more, which the server refuses (REFUSED_STREAM).
    CcpaServiceClient::new(channel.clone())
        .get_opt_out(get(&pkey))
        .await
        .unwrap();
    gateway.emulator().set_faults(acs_emulator::FaultSettings {
        latency,
        ..Default::default()
    });
    let calls = (0..6).map(|_| {
        let mut client = CcpaServiceClient::new(channel.clone());
        let request = get(&pkey);
        async move { client.get_opt_out(request).await }
    });
    for answer in futures::future::join_all(calls).await {
        answer.unwrap();
    }
    // Each call holds its stream for at least the emulator's latency, so calls that overlapped
    // at the emulator arrived within that latency of each other.
    let arrivals: Vec<Instant> = gateway
        .emulator()
        .requests()
        .iter()
        .skip(1)
        .map(|r| r.received_at)
        .collect();
    assert_eq!(arrivals.len(), 6);
    let overlapping = common::busiest_window(&arrivals, latency * 9 / 10);
    assert_eq!(overlapping, 2, "{arrivals:?}");
}

#[tokio::test]
async fn the_profiles_of_one_email_are_worked_a_few_at_a_time() {
    let latency = Duration::from_millis(300);
    let gateway = Secured::start(Boundary::default()).await;
    for n in 0..12 {
        gateway.emulator().insert_profile(NewProfile {
            email: "family@example.com".into(),
            first_name: format!("Member{n}"),
            last_name: "Family".into(),
            ccpa_opt_out: false,
        });
    }
    gateway.emulator().set_faults(acs_emulator::FaultSettings {
        latency,
        ..Default::default()
    });
    let mut client = CcpaServiceClient::new(connect(gateway.addr).await);
    let mut request = Request::new(SetOptOutRequest {
        email: "family@example.com".into(),
        ..set("", true, "family-1")
    });
    request.set_timeout(Duration::from_secs(60));
    let answer = client.set_opt_out(request).await.unwrap().into_inner();
    assert_eq!(answer.profiles.len(), 12);
    // Each PATCH is answered after the emulator's latency: PATCHes that arrived within it of
    // each other were in progress together.
    let patches: Vec<Instant> = gateway
        .emulator()
        .requests()
        .iter()
        .filter(|r| r.method == "PATCH")
        .map(|r| r.received_at)
        .collect();
    assert_eq!(patches.len(), 12);
    let together = common::busiest_window(&patches, latency * 9 / 10);
    assert!(
        (2..=ccpa_gateway::optout::read::EMAIL_PROFILE_CONCURRENCY).contains(&together),
        "{together} PATCHes in progress at once"
    );
}

#[tokio::test]
async fn a_connection_past_its_age_and_grace_is_closed() {
    let options = ServerOptions {
        connections: ccpa_gateway::server::ConnectionLimits {
            max_connection_age: Duration::from_secs(1),
            max_connection_age_grace: Duration::from_secs(1),
            ..Default::default()
        },
        ..ServerOptions::default()
    };
    let gateway = Secured::start_with(Boundary::default(), options, None).await;
    let pkey = gateway.profile();
    // A call far longer than the connection's age and grace together.
    gateway.emulator().set_faults(acs_emulator::FaultSettings {
        latency: Duration::from_secs(20),
        ..Default::default()
    });
    let mut client = CcpaServiceClient::new(connect(gateway.addr).await);
    let mut request = Request::new(get(&pkey));
    request.set_timeout(Duration::from_secs(30));
    let started = Instant::now();
    let status = client.get_opt_out(request).await.unwrap_err();
    assert_ne!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the connection was closed at its age plus grace, not at the call's end: {status:?}"
    );
}
