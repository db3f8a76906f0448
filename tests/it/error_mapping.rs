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
use futures::StreamExt;
use futures::future::BoxFuture;
use serde_json::json;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt;

/// A marker placed in upstream bodies: it must never reach the caller.
const UPSTREAM_MARKER: &str = "upstream-body-marker";

/// Checks what the caller got for `what`: the code, an ErrorInfo with the reason and the upstream
/// HTTP status, and nothing of the upstream body.
fn assert_mapped(what: &str, status: &Status, code: Code, reason: &str, http_status: Option<u16>) {
    assert_eq!(status.code(), code, "{what}: {status:?}");
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("{what}: every mapped error carries an ErrorInfo"));
    assert_eq!(info.reason, reason, "{what}: {status:?}");
    assert_eq!(info.domain, "ccpa-gateway", "{what}");
    assert_eq!(
        info.metadata.get("upstream_http_status").cloned(),
        http_status.map(|s| s.to_string()),
        "{what}"
    );
    assert!(
        !status.message().contains(UPSTREAM_MARKER),
        "{what}: upstream body leaked: {}",
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

fn marked_json(status: u16, message: &str) -> Fault {
    Fault::json(
        status,
        json!({"code": status, "message": format!("{message} {UPSTREAM_MARKER}")}),
    )
}

/// What a row's gateway meets upstream.
enum Upstream {
    /// ACS answers each of the call's attempts with this.
    Answers(Fault),
    /// What `Setup` makes of the emulator, the gateway's ACS settings and the profile's key; it
    /// gives the key the call uses.
    Setup(Setup),
}

type Setup = for<'a> fn(&'a Emulator, &'a mut ClientConfig, String) -> BoxFuture<'a, String>;

/// The call a row makes.
#[derive(Clone, Copy)]
enum Call {
    /// GetOptOut of the profile.
    Read,
    /// CreateProfile.
    Create,
}

/// How many requests a row's failure let reach the emulator.
#[derive(Clone, Copy, Debug)]
enum Sent {
    /// One: a failure that is not retried.
    Once,
    /// Every attempt: a retried one.
    EveryAttempt,
    /// None: refused before anything was sent.
    Nothing,
    /// Not counted: the emulator's answer comes from its state, not from a fault.
    Uncounted,
}

/// A row of the mapping (`src/api/error_mapping.rs`): an upstream answer, and the status,
/// reason and upstream HTTP status the caller gets.
struct Row {
    name: &'static str,
    upstream: Upstream,
    call: Call,
    code: Code,
    reason: &'static str,
    http_status: Option<u16>,
    sent: Sent,
}

fn row(
    name: &'static str,
    upstream: Upstream,
    code: Code,
    reason: &'static str,
    http_status: Option<u16>,
    sent: Sent,
) -> Row {
    Row {
        name,
        upstream,
        call: Call::Read,
        code,
        reason,
        http_status,
        sent,
    }
}

fn rows() -> Vec<Row> {
    use Sent::*;
    use Upstream::{Answers, Setup};
    let create = |row: Row| Row {
        call: Call::Create,
        ..row
    };
    vec![
        row(
            "not found 404 is NOT_FOUND",
            Setup(|emulator, _, pkey| {
                emulator.remove_profile(&pkey);
                Box::pin(std::future::ready(pkey))
            }),
            Code::NotFound,
            "PROFILE_NOT_FOUND",
            Some(404),
            Uncounted,
        ),
        row(
            "a proxy's 404 page is UNAVAILABLE, not a missing profile (and not retried: the same \
             address will not lead elsewhere a moment later)",
            Answers(Fault::html(404)),
            Code::Unavailable,
            "ACS_ENDPOINT_NOT_FOUND",
            Some(404),
            Once,
        ),
        row(
            "a JSON 404 without RST-360011 is UNAVAILABLE, not a missing profile",
            Answers(marked_json(404, "Resource not found")),
            Code::Unavailable,
            "ACS_ENDPOINT_NOT_FOUND",
            Some(404),
            Once,
        ),
        row(
            "a host that is not ACS is UNAVAILABLE, not a missing profile",
            Setup(|_, acs, pkey| {
                Box::pin(async move {
                    acs.base_url = not_acs().await;
                    pkey
                })
            }),
            Code::Unavailable,
            "ACS_ENDPOINT_NOT_FOUND",
            Some(404),
            Nothing,
        ),
        row(
            "an unparsable key, 500 XTK-170036, is NOT_FOUND",
            Setup(|_, _, _| {
                Box::pin(async {
                    let elsewhere = Emulator::start(EmulatorConfig::default()).await.unwrap();
                    elsewhere.insert_profile(NewProfile::default())
                })
            }),
            Code::NotFound,
            "PROFILE_NOT_FOUND",
            Some(500),
            Uncounted,
        ),
        row(
            "an empty collection is NOT_FOUND",
            Answers(Fault::json(200, json!({"content": []}))),
            Code::NotFound,
            "PROFILE_NOT_FOUND",
            None,
            Once,
        ),
        create(row(
            "a duplicate key, 500 PGS-220000, is ALREADY_EXISTS",
            Answers(marked_json(
                500,
                "PGS-220000 PostgreSQL error: duplicate key",
            )),
            Code::AlreadyExists,
            "PROFILE_CONFLICT",
            Some(500),
            Once,
        )),
        create(row(
            "an inconsistent operation, 500 RST-360012, is ALREADY_EXISTS",
            Answers(marked_json(500, "RST-360012 Inconsistent operation")),
            Code::AlreadyExists,
            "PROFILE_CONFLICT",
            Some(500),
            Once,
        )),
        row(
            "a bad gateway, 502 with HTML, is UNAVAILABLE",
            Answers(Fault::Respond {
                status: 502,
                content_type: Some("text/html".into()),
                body: format!("<html><body>Bad Gateway {UPSTREAM_MARKER}</body></html>"),
                headers: vec![],
            }),
            Code::Unavailable,
            "ACS_UNAVAILABLE",
            Some(502),
            EveryAttempt,
        ),
        row(
            "service unavailable, 503, is UNAVAILABLE",
            Answers(marked_json(503, "Service Unavailable")),
            Code::Unavailable,
            "ACS_UNAVAILABLE",
            Some(503),
            EveryAttempt,
        ),
        row(
            "a gateway timeout, 504 with an empty body, is UNAVAILABLE",
            Answers(Fault::empty(504)),
            Code::Unavailable,
            "ACS_UNAVAILABLE",
            Some(504),
            EveryAttempt,
        ),
        row(
            "a refused connection is UNAVAILABLE",
            Setup(|_, acs, pkey| {
                let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                acs.base_url = format!("http://{}", listener.local_addr().unwrap());
                drop(listener);
                Box::pin(std::future::ready(pkey))
            }),
            Code::Unavailable,
            "ACS_UNREACHABLE",
            None,
            Nothing,
        ),
        row(
            "a connection broken mid-answer is UNAVAILABLE",
            Answers(Fault::BreakAfterHeaders),
            Code::Unavailable,
            "ACS_INTERRUPTED",
            None,
            EveryAttempt,
        ),
        row(
            "an upstream timeout is UNAVAILABLE",
            Setup(|emulator, acs, pkey| {
                emulator.set_faults(FaultSettings {
                    latency: std::time::Duration::from_secs(2),
                    ..Default::default()
                });
                acs.timeout = std::time::Duration::from_millis(200);
                Box::pin(std::future::ready(pkey))
            }),
            Code::Unavailable,
            "ACS_INTERRUPTED",
            None,
            EveryAttempt,
        ),
        row(
            "an unreadable success body is UNAVAILABLE",
            Answers(Fault::Respond {
                status: 200,
                content_type: Some("application/json".into()),
                body: format!("{{\"PKey\":\"{UPSTREAM_MARKER}\",\"ccpaOpt"),
                headers: vec![],
            }),
            Code::Unavailable,
            "ACS_MALFORMED_RESPONSE",
            None,
            EveryAttempt,
        ),
        row(
            "no token is UNAVAILABLE, and nothing is sent",
            Setup(|_, acs, pkey| {
                acs.tokens = Arc::new(FailingTokens);
                Box::pin(std::future::ready(pkey))
            }),
            Code::Unavailable,
            "ACS_TOKEN_UNAVAILABLE",
            None,
            Nothing,
        ),
        row(
            "a token rejected, 401 401013, is INTERNAL, not UNAUTHENTICATED",
            Setup(|emulator, _, pkey| {
                emulator.revoke_access_token(EmulatorConfig::DEFAULT_ACCESS_TOKEN);
                Box::pin(std::future::ready(pkey))
            }),
            Code::Internal,
            "ACS_CREDENTIALS_REJECTED",
            Some(401),
            Uncounted,
        ),
        row(
            "an empty 401 from a proxy is INTERNAL",
            Answers(Fault::empty(401)),
            Code::Internal,
            "ACS_CREDENTIALS_REJECTED",
            Some(401),
            Once,
        ),
        row(
            "an API key rejected, 403 403003, is INTERNAL, not PERMISSION_DENIED",
            Setup(|_, acs, pkey| {
                acs.api_key = "not-the-api-key".into();
                Box::pin(std::future::ready(pkey))
            }),
            Code::Internal,
            "ACS_CREDENTIALS_REJECTED",
            Some(403),
            Uncounted,
        ),
        row(
            "a token not provisioned, 403 403023, is INTERNAL",
            Answers(Fault::json(
                403,
                json!({"error_code": "403023", "message": "Profile is not valid"}),
            )),
            Code::Internal,
            "ACS_CREDENTIALS_REJECTED",
            Some(403),
            Once,
        ),
        row(
            "another 4xx is INTERNAL",
            Answers(marked_json(400, "Bad request")),
            Code::Internal,
            "ACS_REFUSED_REQUEST",
            Some(400),
            Once,
        ),
        row(
            "a wrong tenant, 500 \"Check your URI\", is INTERNAL",
            Setup(|_, acs, pkey| {
                acs.tenant = "another-tenant".into();
                Box::pin(std::future::ready(pkey))
            }),
            Code::Internal,
            "ACS_SERVER_ERROR",
            Some(500),
            Uncounted,
        ),
        row(
            "another 500 is INTERNAL, not UNAVAILABLE",
            Answers(marked_json(500, "Oops. Something went wrong.")),
            Code::Internal,
            "ACS_SERVER_ERROR",
            Some(500),
            Once,
        ),
        row(
            "another 5xx is INTERNAL",
            Answers(Fault::html(507)),
            Code::Internal,
            "ACS_SERVER_ERROR",
            Some(507),
            Once,
        ),
        row(
            "a redirect is not followed, and is INTERNAL",
            Answers(Fault::empty(307).with_header("Location", "http://127.0.0.1:1/elsewhere")),
            Code::Internal,
            "ACS_SERVER_ERROR",
            Some(307),
            Once,
        ),
        row(
            "a profile without the opt-out is INTERNAL, never false",
            Answers(Fault::json(
                200,
                json!({"PKey": "@abc", "email": UPSTREAM_MARKER}),
            )),
            Code::Internal,
            "ACS_CONTRACT_BROKEN",
            None,
            Once,
        ),
        row(
            "a token that cannot be a header is INTERNAL",
            Setup(|_, acs, pkey| {
                acs.tokens = Arc::new(SharedToken::new(AccessToken::new("line\nbreak")));
                Box::pin(std::future::ready(pkey))
            }),
            Code::Internal,
            "GATEWAY_MISCONFIGURED",
            None,
            Nothing,
        ),
    ]
}

/// Makes a row's upstream answer on a gateway and an emulator of its own, calls, and checks
/// what the caller got.
async fn check(row: Row) {
    let name = row.name;
    let emulator = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let mut acs = acs_config(&emulator);
    let mut pkey = emulator.insert_profile(NewProfile {
        ccpa_opt_out: true,
        ..Default::default()
    });
    match row.upstream {
        Upstream::Answers(fault) => {
            for _ in 0..ATTEMPTS {
                emulator.inject(fault.clone());
            }
        }
        Upstream::Setup(setup) => pkey = setup(&emulator, &mut acs, pkey).await,
    }
    let gateway = gateway().calling(acs).start().await;
    let mut client = gateway.client();
    let answer = match row.call {
        Call::Read => client
            .get_opt_out(GetOptOutRequest {
                pkey,
                ..Default::default()
            })
            .await
            .map(drop),
        Call::Create => client
            .create_profile(CreateProfileRequest {
                email: "a@example.com".into(),
                ..Default::default()
            })
            .await
            .map(drop),
    };
    let status = answer.expect_err(name);
    assert_mapped(name, &status, row.code, row.reason, row.http_status);
    let sent = emulator.request_count();
    match row.sent {
        Sent::Once => assert_eq!(sent, 1, "{name}: attempts made"),
        Sent::EveryAttempt => assert_eq!(sent, ATTEMPTS, "{name}: attempts made"),
        Sent::Nothing => assert_eq!(sent, 0, "{name}: requests sent"),
        Sent::Uncounted => {}
    }
}

/// Every row of the mapping, a few at a time, each on a gateway and an emulator of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_upstream_failure_crosses_into_grpc_as_its_row_says() {
    let rows = rows();
    assert_eq!(rows.len(), 27);
    futures::stream::iter(rows)
        .map(check)
        .buffer_unordered(4)
        .collect::<Vec<()>>()
        .await;
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
    assert_mapped(
        "429",
        &status,
        Code::Unavailable,
        "ACS_UNAVAILABLE",
        Some(429),
    );
    assert_eq!(harness.emulator().request_count(), 1, "attempts made");
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
        assert_mapped(
            asked,
            &status,
            Code::Unavailable,
            "ACS_UNAVAILABLE",
            Some(503),
        );
    }
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
