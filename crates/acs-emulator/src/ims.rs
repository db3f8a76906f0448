//! Adobe IMS as far as a server-to-server integration sees it: `POST /ims/token/v3` with client
//! credentials, answering bearer tokens that expire.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::Form;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use serde_json::json;

use crate::routes::{answers::json_response, apply_before_handling};
use crate::{Shared, lock};

/// The bearer tokens ACS's gateway accepts, each with its expiry (`None`: never expires).
#[derive(Debug, Default)]
pub(crate) struct TokenStore {
    tokens: HashMap<String, Option<Instant>>,
}

impl TokenStore {
    pub(crate) fn with_static(token: &str) -> Self {
        let mut store = Self::default();
        store.add(token, None);
        store
    }

    pub(crate) fn add(&mut self, token: &str, expires_at: Option<Instant>) {
        self.tokens.insert(token.to_owned(), expires_at);
    }

    pub(crate) fn remove(&mut self, token: &str) {
        self.tokens.remove(token);
    }

    /// Makes every token accepted so far expire now.
    pub(crate) fn expire_all(&mut self, now: Instant) {
        for expiry in self.tokens.values_mut() {
            *expiry = Some(now);
        }
    }

    pub(crate) fn is_valid(&self, token: &str, now: Instant) -> bool {
        match self.tokens.get(token) {
            Some(None) => true,
            Some(Some(expires_at)) => now < *expires_at,
            None => false,
        }
    }
}

/// The integration IMS knows, and the lifetime of the tokens it issues.
#[derive(Debug, Clone)]
pub(crate) struct ImsSettings {
    pub(crate) client_id: String,
    pub(crate) client_secret: String,
    pub(crate) token_lifetime: Duration,
}

/// The form fields of a client-credentials token request.
#[derive(Deserialize)]
pub(crate) struct TokenRequest {
    grant_type: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    scope: Option<String>,
}

fn invalid(error: &str, description: &str) -> Response {
    json_response(
        StatusCode::BAD_REQUEST,
        &json!({"error": error, "error_description": description}),
    )
}

pub(crate) async fn issue_token(
    State(shared): State<Arc<Shared>>,
    headers: axum::http::HeaderMap,
    Form(request): Form<TokenRequest>,
) -> Response {
    shared.ims_request_count.fetch_add(1, Ordering::SeqCst);
    if shared.config.record_requests {
        // The headers only: the body holds the client secret.
        let headers = headers
            .iter()
            .map(|(name, value)| {
                (
                    name.as_str().to_owned(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                )
            })
            .collect();
        let mut recorded = lock(&shared.ims_request_headers);
        if recorded.len() < crate::MAX_RECORDED_REQUESTS {
            recorded.push(headers);
        }
    }
    let fault = lock(&shared.ims_faults).pop_front();
    if let Some(early) = apply_before_handling(fault).await {
        return early;
    }

    let settings = lock(&shared.ims).clone();
    if request.grant_type.as_deref() != Some("client_credentials") {
        return invalid(
            "unsupported_grant_type",
            "grant_type must be client_credentials",
        );
    }
    if request.client_id.as_deref() != Some(settings.client_id.as_str()) {
        return invalid("invalid_client", "invalid client_id parameter");
    }
    if request.client_secret.as_deref() != Some(settings.client_secret.as_str()) {
        return invalid("invalid_client", "invalid client_secret parameter");
    }
    if request.scope.as_deref().is_none_or(str::is_empty) {
        return invalid("invalid_scope", "scope is required");
    }

    let token = format!("ims-{}", URL_SAFE_NO_PAD.encode(rand::random::<[u8; 24]>()));
    let lifetime = settings.token_lifetime;
    // A lifetime past the end of the clock (a test of a client's arithmetic) never expires.
    lock(&shared.access_tokens).add(&token, Instant::now().checked_add(lifetime));
    json_response(
        StatusCode::OK,
        &json!({
            "access_token": token,
            "token_type": "bearer",
            "expires_in": lifetime.as_secs(),
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_expire() {
        let now = Instant::now();
        let mut store = TokenStore::with_static("static");
        store.add("short", Some(now + Duration::from_secs(1)));
        assert!(store.is_valid("static", now));
        assert!(store.is_valid("short", now));
        assert!(!store.is_valid("short", now + Duration::from_secs(1)));
        assert!(!store.is_valid("unknown", now));
        store.expire_all(now);
        assert!(!store.is_valid("static", now));
    }
}
