//! A webhook receiver (`ccpa-gateway webhook-receiver`): it verifies each delivery's signature
//! and prints the event, one JSON line each. For teams writing a receiver of their own (what to
//! check, and what arrives) and for tests, which read what it prints.
//!
//! A delivery that is not signed with one of its secrets, or signed more than five minutes
//! away from its clock, is answered 401 and printed nowhere; why is logged, never the body.

use std::sync::Arc;
use std::time::SystemTime;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use http::{HeaderMap, StatusCode};
use serde::Serialize;
use tokio::net::TcpListener;

use super::recipients::Secrets;
use super::signing::{self, VerifyError, WEBHOOK_ID};

/// The largest body accepted (413 beyond): the gateway's events are far smaller.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Why a delivery was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Its signature does not check out (401).
    #[error("signature check failed: {0}")]
    Unverified(#[from] VerifyError),
    /// It is signed, but its body is not JSON (400).
    #[error("the body is not JSON")]
    NotJson,
}

impl Refusal {
    /// The status it is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unverified(_) => StatusCode::UNAUTHORIZED,
            Self::NotJson => StatusCode::BAD_REQUEST,
        }
    }
}

/// One line of output: the delivery's `webhook-id` and its event, as JSON.
#[derive(Serialize)]
struct Line<'a> {
    webhook_id: &'a str,
    event: serde_json::Value,
}

/// Checks a delivery at `now_s` (seconds since the Unix epoch) and makes the line to print for
/// it.
pub fn accept(
    secrets: &Secrets,
    headers: &HeaderMap,
    body: &[u8],
    now_s: i64,
) -> Result<String, Refusal> {
    signing::verify(secrets, headers, body, now_s)?;
    // Verified, so present and text.
    let webhook_id = headers
        .get(WEBHOOK_ID)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    let event: serde_json::Value = serde_json::from_slice(body).map_err(|_| Refusal::NotJson)?;
    // Re-serialized rather than copied, so that an event sent over several lines still prints
    // as one.
    serde_json::to_string(&Line { webhook_id, event }).map_err(|_| Refusal::NotJson)
}

/// Where a verified delivery's line goes before the delivery is acknowledged: the command's
/// standard output, which the CLI owns (`cli::webhook_receiver`). An error is answered 500, so
/// that the sender tries again.
pub type Print = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// What every delivery is checked with, and where its line goes.
struct Receiver {
    secrets: Secrets,
    print: Print,
}

/// The receiver's routes: POST to any path.
pub fn app(secrets: Secrets, print: Print) -> Router {
    Router::new()
        .route("/", post(receive))
        .route("/{*path}", post(receive))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(Arc::new(Receiver { secrets, print }))
}

/// Serves deliveries on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    secrets: Secrets,
    print: Print,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app(secrets, print))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn receive(
    State(receiver): State<Arc<Receiver>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let now_s = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| {
            i64::try_from(since.as_secs()).unwrap_or(i64::MAX)
        });
    match accept(&receiver.secrets, &headers, &body, now_s) {
        Ok(line) => match (receiver.print)(&line) {
            Ok(()) => StatusCode::NO_CONTENT.into_response(),
            Err(e) => {
                tracing::error!(error = %e, "cannot print a delivery; answered 500");
                StatusCode::INTERNAL_SERVER_ERROR.into_response()
            }
        },
        Err(refusal) => {
            tracing::warn!(reason = %refusal, "delivery refused");
            (refusal.status(), format!("{refusal}\n")).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::event::{self, Notice};
    use super::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn signed(body: &[u8], now_s: i64) -> HeaderMap {
        let secrets = Secrets::parse(SECRET).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(WEBHOOK_ID, "msg_abc".parse().unwrap());
        headers.insert(signing::WEBHOOK_TIMESTAMP, now_s.into());
        headers.insert(
            signing::WEBHOOK_SIGNATURE,
            signing::signature_header(&secrets, "msg_abc", now_s, body)
                .parse()
                .unwrap(),
        );
        headers
    }

    #[test]
    fn a_signed_event_becomes_one_line() {
        let notice = Notice {
            request_id: "r1".into(),
            recipient: "x".into(),
            pkey: Some("@k".into()),
            opt_out: true,
            source: "API",
            received_at_ms: 0,
            email_sha256: None,
        };
        let body = event::body(&notice, 0);
        let line = accept(
            &Secrets::parse(SECRET).unwrap(),
            &signed(&body, 1000),
            &body,
            1000,
        )
        .unwrap();
        assert!(!line.contains('\n'));
        let printed: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(printed["webhook_id"], "msg_abc");
        assert_eq!(
            printed["event"],
            serde_json::from_slice::<serde_json::Value>(&body).unwrap()
        );
    }

    #[test]
    fn a_pretty_printed_event_still_prints_as_one_line() {
        let body = b"{\n  \"a\": 1\n}\n";
        let line = accept(&Secrets::parse(SECRET).unwrap(), &signed(body, 5), body, 5).unwrap();
        assert_eq!(line, r#"{"webhook_id":"msg_abc","event":{"a":1}}"#);
    }

    #[test]
    fn refusals_say_why_and_how() {
        let secrets = Secrets::parse(SECRET).unwrap();
        let body = br#"{"a":1}"#;
        let refusal = accept(&secrets, &signed(body, 5), br#"{"a":2}"#, 5).unwrap_err();
        assert_eq!(refusal, Refusal::Unverified(VerifyError::NoMatch));
        assert_eq!(refusal.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            refusal.to_string(),
            "signature check failed: no signature matches"
        );
        let refusal = accept(&secrets, &signed(body, 5), body, 5 + 301).unwrap_err();
        assert_eq!(refusal, Refusal::Unverified(VerifyError::TooOld));
        let refusal = accept(&secrets, &HeaderMap::new(), body, 5).unwrap_err();
        assert_eq!(
            refusal,
            Refusal::Unverified(VerifyError::MissingHeader(WEBHOOK_ID))
        );
        let refusal = accept(&secrets, &signed(b"not json", 5), b"not json", 5).unwrap_err();
        assert_eq!(refusal, Refusal::NotJson);
        assert_eq!(refusal.status(), StatusCode::BAD_REQUEST);
    }
}
