//! One test per row of the upstream-to-gRPC mapping (`src/api/error_mapping.rs`), each over real
//! sockets with the emulator producing the upstream answer.

use crate::common;

use std::sync::Arc;

use acs_emulator::{Emulator, EmulatorConfig, Fault, FaultSettings, NewProfile};
use acs_profile_client::{
    AccessToken, ClientConfig, SharedToken, TokenError, TokenErrorKind, TokenSource,
};
use ccpa_gateway::proto::ccpa_v1::ccpa_service_client::CcpaServiceClient;
use ccpa_gateway::proto::ccpa_v1::{
    CreateProfileRequest, DeliveryState, GetOptOutRecordRequest, GetOptOutRequest, RequestSource,
    SetOptOutRequest,
};
use common::{Gateway, acs_config, gateway};
use futures::future::BoxFuture;
use serde_json::json;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt;

/// A marker placed in upstream bodies: it must never reach the caller.
const UPSTREAM_MARKER: &str = "upstream-body-marker";

fn assert_mapped(status: Status, code: Code, reason: &str, http_status: Option<u16>) {
    assert_eq!(status.code(), code, "{status:?}");
    let info = status
        .get_details_error_info()
        .expect("every mapped error carries an ErrorInfo");
    assert_eq!(info.reason, reason, "{status:?}");
    assert_eq!(info.domain, "ccpa-gateway");
    assert_eq!(
        info.metadata.get("upstream_http_status").cloned(),
        http_status.map(|s| s.to_string())
    );
    assert!(
        !status.message().contains(UPSTREAM_MARKER),
        "upstream body leaked: {}",
        status.message()
    );
}

async fn get(harness: &Gateway, pkey: &str) -> Status {
    harness
        .client()
        .get_opt_out(GetOptOutRequest {
            pkey: pkey.into(),
            ..Default::default()
        })
        .await
        .expect_err("the call should fail")
}

/// Reads a profile through a gateway of its own, configured with `acs`.
async fn get_through(acs: ClientConfig, pkey: String) -> Status {
    let gateway = gateway().calling(acs).start().await;
    gateway
        .client()
        .get_opt_out(GetOptOutRequest {
            pkey,
            ..Default::default()
        })
        .await
        .expect_err("the call should fail")
}

/// An emulator holding one profile, and its key.
async fn emulator_with_profile() -> (Emulator, String) {
    let emulator = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let pkey = emulator.insert_profile(NewProfile::default());
    (emulator, pkey)
}

/// The gateway's default number of attempts per call.
const ATTEMPTS: usize = 4;

/// A profile to read, and a fault for each of the next [`ATTEMPTS`] requests: a transient fault
/// that went away on retry would not reach the mapping.
async fn with_fault(fault: Fault) -> (Gateway, String) {
    let harness = gateway().start().await;
    let pkey = harness.profile(true);
    for _ in 0..ATTEMPTS {
        harness.emulator().inject(fault.clone());
    }
    (harness, pkey)
}

/// Asserts how many requests reached the emulator: every attempt for a retried failure, one for
/// a failure that is not retried.
fn assert_attempts(harness: &Gateway, expected: usize) {
    assert_eq!(
        harness.emulator().request_count(),
        expected,
        "attempts made"
    );
}

fn marked_json(status: u16, message: &str) -> Fault {
    Fault::json(
        status,
        json!({"code": status, "message": format!("{message} {UPSTREAM_MARKER}")}),
    )
}

#[tokio::test]
async fn not_found_404_is_not_found() {
    let harness = gateway().start().await;
    let pkey = harness.profile(true);
    harness.emulator().remove_profile(&pkey);
    assert_mapped(
        get(&harness, &pkey).await,
        Code::NotFound,
        "PROFILE_NOT_FOUND",
        Some(404),
    );
}

#[tokio::test]
async fn a_proxy_404_page_is_unavailable_not_a_missing_profile() {
    // Not retried: the same address will not lead elsewhere a moment later.
    let (harness, pkey) = with_fault(Fault::html(404)).await;
    assert_mapped(
        get(&harness, &pkey).await,
        Code::Unavailable,
        "ACS_ENDPOINT_NOT_FOUND",
        Some(404),
    );
    assert_attempts(&harness, 1);
}

#[tokio::test]
async fn a_json_404_without_rst_360011_is_unavailable_not_a_missing_profile() {
    let (harness, pkey) = with_fault(marked_json(404, "Resource not found")).await;
    assert_mapped(
        get(&harness, &pkey).await,
        Code::Unavailable,
        "ACS_ENDPOINT_NOT_FOUND",
        Some(404),
    );
}

/// An HTTP server that is not ACS and answers every request with an empty 404, as a host the
/// gateway was wrongly pointed at would. (ACS itself answers a wrong path or tenant with a 500
/// "Check your URI", which the emulator reproduces.)
async fn not_acs() -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = vec![0u8; 16 * 1024];
                let mut read = 0;
                // Up to the end of the headers; the requests made here carry no body.
                while !request[..read].windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut request[read..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => read += n,
                    }
                }
                let _ = socket
                    .write_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    )
                    .await;
            });
        }
    });
    format!("http://{address}")
}

#[tokio::test]
async fn a_host_that_is_not_acs_is_unavailable_not_a_missing_profile() {
    let (emulator, pkey) = emulator_with_profile().await;
    let mut acs = acs_config(&emulator);
    acs.base_url = not_acs().await;
    assert_mapped(
        get_through(acs, pkey).await,
        Code::Unavailable,
        "ACS_ENDPOINT_NOT_FOUND",
        Some(404),
    );
}

#[tokio::test]
async fn unparsable_key_500_xtk_170036_is_not_found() {
    let harness = gateway().start().await;
    let elsewhere = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let foreign_key = elsewhere.insert_profile(NewProfile::default());
    assert_mapped(
        get(&harness, &foreign_key).await,
        Code::NotFound,
        "PROFILE_NOT_FOUND",
        Some(500),
    );
}

#[tokio::test]
async fn empty_collection_is_not_found() {
    let (harness, pkey) = with_fault(Fault::json(200, json!({"content": []}))).await;
    assert_mapped(
        get(&harness, &pkey).await,
        Code::NotFound,
        "PROFILE_NOT_FOUND",
        None,
    );
    assert_attempts(&harness, 1);
}

#[tokio::test]
async fn duplicate_key_500_pgs_220000_is_already_exists() {
    let harness = gateway().start().await;
    harness.emulator().inject(marked_json(
        500,
        "PGS-220000 PostgreSQL error: duplicate key",
    ));
    let status = harness
        .client()
        .create_profile(CreateProfileRequest {
            email: "a@example.com".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_mapped(status, Code::AlreadyExists, "PROFILE_CONFLICT", Some(500));
}

#[tokio::test]
async fn inconsistent_operation_500_rst_360012_is_already_exists() {
    let harness = gateway().start().await;
    harness
        .emulator()
        .inject(marked_json(500, "RST-360012 Inconsistent operation"));
    let status = harness
        .client()
        .create_profile(CreateProfileRequest {
            email: "a@example.com".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_mapped(status, Code::AlreadyExists, "PROFILE_CONFLICT", Some(500));
}

#[tokio::test]
async fn too_many_requests_429_is_unavailable_with_acs_retry_delay() {
    let fault = marked_json(429, "Too many requests").with_header("Retry-After", "3");
    let (harness, pkey) = with_fault(fault).await;
    // The caller's 1 s deadline leaves no room for the 3 s ACS asks for: the gateway answers at
    // once, passing the delay on.
    let mut request = tonic::Request::new(GetOptOutRequest {
        pkey,
        ..Default::default()
    });
    request.set_timeout(std::time::Duration::from_secs(1));
    let started = std::time::Instant::now();
    let status = harness.client().get_opt_out(request).await.unwrap_err();
    assert!(started.elapsed() < std::time::Duration::from_millis(500));
    let retry = status.get_details_retry_info().expect("a RetryInfo detail");
    assert_eq!(retry.retry_delay, Some(std::time::Duration::from_secs(3)));
    assert_mapped(status, Code::Unavailable, "ACS_UNAVAILABLE", Some(429));
    assert_attempts(&harness, 1);
}

#[tokio::test]
async fn a_retry_after_beyond_five_minutes_is_passed_on_as_five_minutes() {
    for asked in ["999999999999", "Fri, 31 Dec 9999 23:59:59 GMT"] {
        let fault = marked_json(503, "Come back much later").with_header("Retry-After", asked);
        let (harness, pkey) = with_fault(fault).await;
        let status = get(&harness, &pkey).await;
        let retry = status.get_details_retry_info().expect("a RetryInfo detail");
        assert_eq!(
            retry.retry_delay,
            Some(std::time::Duration::from_secs(300)),
            "{asked}"
        );
        assert_mapped(status, Code::Unavailable, "ACS_UNAVAILABLE", Some(503));
    }
}

#[tokio::test]
async fn bad_gateway_502_with_html_is_unavailable() {
    let (harness, pkey) = with_fault(Fault::Respond {
        status: 502,
        content_type: Some("text/html".into()),
        body: format!("<html><body>Bad Gateway {UPSTREAM_MARKER}</body></html>"),
        headers: vec![],
    })
    .await;
    assert_mapped(
        get(&harness, &pkey).await,
        Code::Unavailable,
        "ACS_UNAVAILABLE",
        Some(502),
    );
    assert_attempts(&harness, ATTEMPTS);
}

#[tokio::test]
async fn service_unavailable_503_is_unavailable() {
    let (harness, pkey) = with_fault(marked_json(503, "Service Unavailable")).await;
    assert_mapped(
        get(&harness, &pkey).await,
        Code::Unavailable,
        "ACS_UNAVAILABLE",
        Some(503),
    );
    assert_attempts(&harness, ATTEMPTS);
}

#[tokio::test]
async fn gateway_timeout_504_with_empty_body_is_unavailable() {
    let (harness, pkey) = with_fault(Fault::empty(504)).await;
    assert_mapped(
        get(&harness, &pkey).await,
        Code::Unavailable,
        "ACS_UNAVAILABLE",
        Some(504),
    );
    assert_attempts(&harness, ATTEMPTS);
}

#[tokio::test]
async fn connection_refused_is_unavailable() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = listener.local_addr().unwrap();
    drop(listener);
    let acs = ClientConfig::new(
        format!("http://{closed}"),
        "tenant",
        "key",
        Arc::new(SharedToken::new(AccessToken::new("token"))),
    );
    let status = get_through(acs, "@abc".into()).await;
    assert_mapped(status, Code::Unavailable, "ACS_UNREACHABLE", None);
}

#[tokio::test]
async fn connection_broken_mid_answer_is_unavailable() {
    let (harness, pkey) = with_fault(Fault::BreakAfterHeaders).await;
    assert_mapped(
        get(&harness, &pkey).await,
        Code::Unavailable,
        "ACS_INTERRUPTED",
        None,
    );
    assert_attempts(&harness, ATTEMPTS);
}

#[tokio::test]
async fn upstream_timeout_is_unavailable() {
    let emulator = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let pkey = emulator.insert_profile(NewProfile::default());
    emulator.set_faults(FaultSettings {
        latency: std::time::Duration::from_secs(2),
        ..Default::default()
    });
    let mut acs = acs_config(&emulator);
    acs.timeout = std::time::Duration::from_millis(200);
    let status = get_through(acs, pkey).await;
    assert_mapped(status, Code::Unavailable, "ACS_INTERRUPTED", None);
    assert_eq!(emulator.request_count(), ATTEMPTS, "each attempt timed out");
}

#[tokio::test]
async fn unreadable_success_body_is_unavailable() {
    let (harness, pkey) = with_fault(Fault::Respond {
        status: 200,
        content_type: Some("application/json".into()),
        body: format!("{{\"PKey\":\"{UPSTREAM_MARKER}\",\"ccpaOpt"),
        headers: vec![],
    })
    .await;
    assert_mapped(
        get(&harness, &pkey).await,
        Code::Unavailable,
        "ACS_MALFORMED_RESPONSE",
        None,
    );
    assert_attempts(&harness, ATTEMPTS);
}

/// A token source whose identity provider is down.
#[derive(Debug)]
struct FailingTokens;

impl TokenSource for FailingTokens {
    fn access_token(&self) -> BoxFuture<'_, Result<AccessToken, TokenError>> {
        Box::pin(async {
            Err(TokenError::new(
                TokenErrorKind::Unavailable,
                "identity provider unreachable",
            ))
        })
    }
}

#[tokio::test]
async fn no_token_is_unavailable_and_nothing_is_sent() {
    let (emulator, pkey) = emulator_with_profile().await;
    let mut acs = acs_config(&emulator);
    acs.tokens = Arc::new(FailingTokens);
    let status = get_through(acs, pkey).await;
    assert_mapped(status, Code::Unavailable, "ACS_TOKEN_UNAVAILABLE", None);
    assert_eq!(emulator.request_count(), 0);
}

#[tokio::test]
async fn token_rejected_401_401013_is_internal_not_unauthenticated() {
    let harness = gateway().start().await;
    let pkey = harness.profile(true);
    harness
        .emulator()
        .revoke_access_token(EmulatorConfig::DEFAULT_ACCESS_TOKEN);
    assert_mapped(
        get(&harness, &pkey).await,
        Code::Internal,
        "ACS_CREDENTIALS_REJECTED",
        Some(401),
    );
}

#[tokio::test]
async fn empty_401_from_a_proxy_is_internal() {
    let (harness, pkey) = with_fault(Fault::empty(401)).await;
    assert_mapped(
        get(&harness, &pkey).await,
        Code::Internal,
        "ACS_CREDENTIALS_REJECTED",
        Some(401),
    );
    assert_attempts(&harness, 1);
}

#[tokio::test]
async fn api_key_rejected_403_403003_is_internal_not_permission_denied() {
    let (emulator, pkey) = emulator_with_profile().await;
    let mut acs = acs_config(&emulator);
    acs.api_key = "not-the-api-key".into();
    let status = get_through(acs, pkey).await;
    assert_mapped(
        status,
        Code::Internal,
        "ACS_CREDENTIALS_REJECTED",
        Some(403),
    );
}

#[tokio::test]
async fn token_not_provisioned_403_403023_is_internal() {
    let (harness, pkey) = with_fault(Fault::json(
        403,
        json!({"error_code": "403023", "message": "Profile is not valid"}),
    ))
    .await;
    assert_mapped(
        get(&harness, &pkey).await,
        Code::Internal,
        "ACS_CREDENTIALS_REJECTED",
        Some(403),
    );
    assert_attempts(&harness, 1);
}

#[tokio::test]
async fn other_4xx_is_internal() {
    let (harness, pkey) = with_fault(marked_json(400, "Bad request")).await;
    assert_mapped(
        get(&harness, &pkey).await,
        Code::Internal,
        "ACS_REFUSED_REQUEST",
        Some(400),
    );
    assert_attempts(&harness, 1);
}

#[tokio::test]
async fn wrong_tenant_500_check_your_uri_is_internal() {
    let (emulator, pkey) = emulator_with_profile().await;
    let mut acs = acs_config(&emulator);
    acs.tenant = "another-tenant".into();
    let status = get_through(acs, pkey).await;
    assert_mapped(status, Code::Internal, "ACS_SERVER_ERROR", Some(500));
}

#[tokio::test]
async fn other_500_is_internal_not_unavailable() {
    let (harness, pkey) = with_fault(marked_json(500, "Oops. Something went wrong.")).await;
    assert_mapped(
        get(&harness, &pkey).await,
        Code::Internal,
        "ACS_SERVER_ERROR",
        Some(500),
    );
    assert_attempts(&harness, 1);
}

#[tokio::test]
async fn other_5xx_is_internal() {
    let (harness, pkey) = with_fault(Fault::html(507)).await;
    assert_mapped(
        get(&harness, &pkey).await,
        Code::Internal,
        "ACS_SERVER_ERROR",
        Some(507),
    );
    assert_attempts(&harness, 1);
}

#[tokio::test]
async fn redirect_is_not_followed_and_is_internal() {
    let (harness, pkey) =
        with_fault(Fault::empty(307).with_header("Location", "http://127.0.0.1:1/elsewhere")).await;
    assert_mapped(
        get(&harness, &pkey).await,
        Code::Internal,
        "ACS_SERVER_ERROR",
        Some(307),
    );
    assert_attempts(&harness, 1);
}

#[tokio::test]
async fn profile_without_the_opt_out_is_internal_never_false() {
    let (harness, pkey) = with_fault(Fault::json(
        200,
        json!({"PKey": "@abc", "email": UPSTREAM_MARKER}),
    ))
    .await;
    assert_mapped(
        get(&harness, &pkey).await,
        Code::Internal,
        "ACS_CONTRACT_BROKEN",
        None,
    );
    assert_attempts(&harness, 1);
}

#[tokio::test]
async fn token_that_cannot_be_a_header_is_internal() {
    let (emulator, pkey) = emulator_with_profile().await;
    let mut acs = acs_config(&emulator);
    acs.tokens = Arc::new(SharedToken::new(AccessToken::new("line\nbreak")));
    let status = get_through(acs, pkey).await;
    assert_mapped(status, Code::Internal, "GATEWAY_MISCONFIGURED", None);
    assert_eq!(emulator.request_count(), 0);
}

#[tokio::test]
async fn set_opt_out_answers_pending_not_an_error_when_acs_fails() {
    let harness = gateway().start().await;
    let pkey = harness.profile(false);
    let mut client: CcpaServiceClient<Channel> = harness.client();
    let request = || SetOptOutRequest {
        pkey: pkey.clone(),
        ccpa_opt_out: Some(true),
        source: RequestSource::WebForm as i32,
        ..Default::default()
    };

    // The PATCH fails, every attempt: nothing changed in ACS, but the request is recorded.
    for _ in 0..ATTEMPTS {
        harness.emulator().inject(Fault::html(503));
    }
    let answer = client.set_opt_out(request()).await.unwrap().into_inner();
    assert_eq!(answer.state, DeliveryState::Pending as i32);
    assert!(answer.ccpa_opt_out, "the value asked for");
    assert_eq!(
        harness.emulator().profile(&pkey).unwrap()["ccpaOptOut"],
        false
    );

    // The PATCH succeeds, the read-back fails: APPLIED, answering the value set. On a gateway
    // and emulator of their own: the first one's pending request (its deliverer's retries, its
    // probe of ACS) would take the faults injected here.
    let harness = gateway().start().await;
    let mut client: CcpaServiceClient<Channel> = harness.client();
    let other = harness.profile(false);
    harness
        .emulator()
        .inject(Fault::Delay(std::time::Duration::ZERO));
    for _ in 0..ATTEMPTS {
        harness.emulator().inject(Fault::html(502));
    }
    let answer = client
        .set_opt_out(SetOptOutRequest {
            pkey: other.clone(),
            ..request()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.state, DeliveryState::Applied as i32);
    assert!(answer.ccpa_opt_out);
    assert_eq!(answer.ccpa_opt_out_last_modified, None);
    assert_eq!(
        harness.emulator().profile(&other).unwrap()["ccpaOptOut"],
        true
    );
}

#[tokio::test]
async fn set_opt_out_on_an_unknown_profile_is_not_found_and_recorded_failed() {
    let harness = gateway().start().await;
    let pkey = harness.profile(false);
    harness.emulator().remove_profile(&pkey);
    let mut client = harness.client();
    let status = client
        .set_opt_out(SetOptOutRequest {
            pkey,
            ccpa_opt_out: Some(true),
            source: RequestSource::WebForm as i32,
            request_id: "unknown-profile-1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let record = client
        .get_opt_out_record(GetOptOutRecordRequest {
            request_id: "unknown-profile-1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .record
        .unwrap();
    assert_eq!(record.state, DeliveryState::Failed as i32);
    assert!(
        record.failure_reason.contains("does not exist"),
        "{record:?}"
    );
}
