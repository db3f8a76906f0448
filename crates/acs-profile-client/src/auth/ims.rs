//! OAuth server-to-server tokens from Adobe IMS (`POST {ims}/ims/token/v3`), cached and refreshed
//! ahead of expiry by a single request at a time.
//!
//! Adobe throttles integrations that mint too many tokens, so:
//! - a token is reused until 80% of its lifetime; then one background request refreshes it while
//!   callers keep using the current one; with no usable token, callers all wait for the same
//!   request (a thousand calls at expiry make one token request);
//! - that request runs as a task of its own: a caller whose deadline passes stops waiting, but the
//!   request goes on, so a slow IMS still yields a token for the callers after it;
//! - a failed request is followed by a back-off (0.5 s doubling to 60 s) that every caller
//!   respects, so nothing can make the source hammer IMS;
//! - a token request that fails in any way, a panic included, ends its flight and backs off: no
//!   caller is ever left waiting on a request that is over;
//! - `expires_in` is believed up to a day, what IMS issues: a larger value is a fault upstream;
//! - [`ImsTokenSource::invalidate`] (ACS said `401013`) drops the cached token only if it is the
//!   one ACS refused, so a thousand calls refused at once cause one refresh, not a thousand.

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use tokio::time::Instant;
use tracing::Instrument;

use super::{AccessToken, TokenError, TokenErrorKind, TokenSource};
use crate::Backoff;
use crate::clock::{Clock, TokioClock};

/// Where the client secret comes from.
#[derive(Clone)]
pub enum ImsSecret {
    /// The secret itself.
    Value(SecretString),
    /// A file holding it (a mounted secret), read again for every token request so that a
    /// rotated secret is picked up without a restart. Surrounding whitespace is ignored.
    File(PathBuf),
}

impl fmt::Debug for ImsSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Value(_) => f.write_str("Value([REDACTED])"),
            Self::File(path) => f.debug_tuple("File").field(path).finish(),
        }
    }
}

/// How to ask Adobe IMS for tokens.
#[derive(Debug, Clone)]
pub struct ImsConfig {
    /// The IMS endpoint, `https://ims-na1.adobelogin.com` for Adobe.
    pub url: String,
    /// The integration's client id (also the API key ACS expects).
    pub client_id: String,
    /// The integration's client secret.
    pub client_secret: ImsSecret,
    /// Comma-separated scopes.
    pub scopes: String,
    /// Bound on one token request.
    pub request_timeout: Duration,
}

impl ImsConfig {
    /// Adobe's IMS endpoint for North America, which serves every region's integrations.
    pub const DEFAULT_URL: &'static str = "https://ims-na1.adobelogin.com";
    /// The scopes real ACS integrations ask for.
    pub const DEFAULT_SCOPES: &'static str =
        "openid,AdobeID,campaign_sdk,additional_info.projectedProductContext";
}

/// Share of a token's lifetime after which it is refreshed.
const REFRESH_AT: f64 = 0.8;
/// A token is not used in the last 5% of its lifetime (at most a minute): clocks and queues can
/// make a token that is valid here expired by the time ACS reads it.
const EXPIRY_MARGIN_SHARE: f64 = 0.05;
const MAX_EXPIRY_MARGIN: Duration = Duration::from_secs(60);
/// Back-off after failed token requests: doubling from the first, capped, not jittered (one
/// source per process, each wait logged).
const BACKOFF: Backoff = Backoff::IMS_TOKEN;
/// Token requests one caller waits for before giving up; the back-off outlives the caller.
const ATTEMPTS_PER_CALLER: u32 = 3;
/// The longest lifetime believed, whatever `expires_in` says: IMS issues tokens for a day. A
/// larger value is a fault upstream, and taken literally it would overflow the clock arithmetic.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);

/// The lifetime a token is treated as having, from the `expires_in` (seconds) IMS announced.
fn believed_lifetime(expires_in: u64) -> Duration {
    Duration::from_secs(expires_in).min(MAX_TOKEN_LIFETIME)
}

struct CachedToken {
    token: AccessToken,
    refresh_at: Instant,
    usable_until: Instant,
}

type TokenResult = Result<AccessToken, TokenError>;
/// The token request in progress, which every caller waiting for a token shares.
type Flight = Shared<BoxFuture<'static, TokenResult>>;

#[derive(Default)]
struct State {
    cached: Option<CachedToken>,
    flight: Option<Flight>,
    /// No token request before this instant (set after a failure).
    not_before: Option<Instant>,
    /// Token requests failed in a row.
    failures: u32,
}

impl State {
    /// Records a failed token request at `now`: no other before the back-off passes, and a
    /// longer one next time. Returns the back-off.
    fn note_failure(&mut self, now: Instant) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let backoff = BACKOFF.after(self.failures);
        self.not_before = Some(now + backoff);
        backoff
    }
}

/// Ends a flight, however its task ends: on completion, on a panic (the guard is dropped while
/// unwinding) or on cancellation. Without it, a flight whose task panicked stayed in
/// `state.flight`, and every caller after it was answered that flight's failure, forever.
struct FlightEnd {
    inner: Arc<Inner>,
    /// Whether the request ran to its end and recorded its outcome itself.
    settled: bool,
}

impl Drop for FlightEnd {
    fn drop(&mut self) {
        let now = self.inner.clock.now();
        let mut state = self.inner.state();
        state.flight = None;
        if !self.settled {
            // A request that never recorded an outcome failed: back off as after any failure,
            // so that a request that panics every time cannot make the source hammer IMS.
            state.note_failure(now);
        }
    }
}

/// A [`TokenSource`] that obtains tokens from Adobe IMS with the client-credentials grant.
pub struct ImsTokenSource {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    endpoint: String,
    config: ImsConfig,
    state: Mutex<State>,
    /// The time of the refresh and back-off rules.
    clock: Arc<dyn Clock>,
}

impl fmt::Debug for ImsTokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImsTokenSource")
            .field("endpoint", &self.inner.endpoint)
            .field("client_id", &self.inner.config.client_id)
            .field("client_secret", &self.inner.config.client_secret)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    expires_in: u64,
}

/// What a caller does after one look at the state.
enum Next {
    Answer(AccessToken),
    Wait(Flight),
}

impl ImsTokenSource {
    /// A source for this integration. No request is made until a token is needed.
    pub fn new(config: ImsConfig) -> Result<Self, TokenError> {
        Self::with_clock(config, Arc::new(TokioClock))
    }

    /// A source whose refresh and back-off rules read `clock` (a test's [`crate::ManualClock`],
    /// say) instead of tokio's.
    pub fn with_clock(config: ImsConfig, clock: Arc<dyn Clock>) -> Result<Self, TokenError> {
        let endpoint = format!("{}/ims/token/v3", config.url.trim_end_matches('/'));
        reqwest::Url::parse(&endpoint).map_err(|_| {
            TokenError::new(TokenErrorKind::Refused, "the IMS URL is not a valid URL")
        })?;
        let http = reqwest::Client::builder()
            .timeout(config.request_timeout)
            .connect_timeout(config.request_timeout.min(Duration::from_secs(3)))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| TokenError::new(TokenErrorKind::Refused, e.to_string()))?;
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                endpoint,
                config,
                state: Mutex::new(State::default()),
                clock,
            }),
        })
    }

    async fn token(&self) -> TokenResult {
        let mut last_error = None;
        for _ in 0..ATTEMPTS_PER_CALLER {
            let flight = match self.inner.next(self.inner.clock.now()) {
                Next::Answer(token) => return Ok(token),
                Next::Wait(flight) => flight,
            };
            match flight.await {
                Ok(token) => return Ok(token),
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap_or_else(|| {
            TokenError::new(TokenErrorKind::Unavailable, "no token request was made")
        }))
    }
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        // Every critical section assigns whole values, so a poisoned state is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Decides, under the lock, between answering the cached token and waiting for a request
    /// (starting one if none is in progress).
    fn next(self: &Arc<Self>, now: Instant) -> Next {
        let mut state = self.state();
        let usable = match &state.cached {
            Some(c) if now < c.refresh_at => return Next::Answer(c.token.clone()),
            Some(c) if now < c.usable_until => Some(c.token.clone()),
            _ => None,
        };
        let backing_off = state.not_before.is_some_and(|t| now < t);
        if let Some(still_good) = usable {
            // Time to refresh, but the token still works: refresh in the background.
            if state.flight.is_none() && !backing_off {
                state.flight = Some(self.start_flight(None));
            }
            return Next::Answer(still_good);
        }
        let flight = match &state.flight {
            Some(flight) => flight.clone(),
            None => {
                let flight = self.start_flight(state.not_before.filter(|_| backing_off));
                state.flight = Some(flight.clone());
                flight
            }
        };
        Next::Wait(flight)
    }

    /// Spawns one token request, after `not_before` if given.
    fn start_flight(self: &Arc<Self>, not_before: Option<Instant>) -> Flight {
        self.spawn_flight(not_before, |inner| async move { inner.request().await })
    }

    /// Spawns `request` as the flight; whatever becomes of it, `state.flight` is cleared when it
    /// ends (see [`FlightEnd`]).
    fn spawn_flight<F, Fut>(self: &Arc<Self>, not_before: Option<Instant>, request: F) -> Flight
    where
        F: FnOnce(Arc<Self>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = TokenResult> + Send + 'static,
    {
        let inner = self.clone();
        // The request belongs to the call that needed the token first: its span is the parent.
        let parent = tracing::Span::current();
        let task = tokio::spawn(
            async move {
                let mut end = FlightEnd {
                    inner: inner.clone(),
                    settled: false,
                };
                if let Some(not_before) = not_before {
                    // Measured on the source's clock, waited out on tokio's.
                    let wait = not_before.saturating_duration_since(inner.clock.now());
                    tokio::time::sleep(wait).await;
                }
                let result = request(inner).await;
                end.settled = true;
                drop(end);
                result
            }
            .instrument(parent),
        );
        async move {
            task.await.unwrap_or_else(|_| {
                Err(TokenError::new(
                    TokenErrorKind::Unavailable,
                    "the token request was abandoned",
                ))
            })
        }
        .boxed()
        .shared()
    }

    /// One token request, its outcome recorded in the state.
    async fn request(&self) -> TokenResult {
        let started = self.clock.now();
        let result = self.exchange().await;
        let now = self.clock.now();
        let mut state = self.state();
        match result {
            Ok(response) => {
                let lifetime = believed_lifetime(response.expires_in);
                let margin = lifetime.mul_f64(EXPIRY_MARGIN_SHARE).min(MAX_EXPIRY_MARGIN);
                let token = AccessToken::new(response.access_token);
                state.cached = Some(CachedToken {
                    token: token.clone(),
                    refresh_at: started + lifetime.mul_f64(REFRESH_AT),
                    usable_until: started + lifetime.saturating_sub(margin),
                });
                state.not_before = None;
                state.failures = 0;
                crate::observe::count_token_request("ok");
                tracing::info!(
                    lifetime_s = lifetime.as_secs(),
                    "obtained an IMS access token"
                );
                Ok(token)
            }
            Err(error) => {
                crate::observe::count_token_request(match error.kind() {
                    TokenErrorKind::Refused => "refused",
                    _ => "unavailable",
                });
                let backoff = state.note_failure(now);
                tracing::warn!(
                    kind = ?error.kind(),
                    reason = error.reason(),
                    retry_in_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX),
                    "IMS token request failed"
                );
                Err(error)
            }
        }
    }

    async fn exchange(&self) -> Result<TokenResponse, TokenError> {
        let secret = match &self.config.client_secret {
            ImsSecret::Value(secret) => secret.clone(),
            ImsSecret::File(path) => {
                let text = tokio::fs::read_to_string(path).await.map_err(|e| {
                    TokenError::new(
                        TokenErrorKind::Refused,
                        format!("cannot read the client secret file {}: {e}", path.display()),
                    )
                })?;
                SecretString::from(text.trim())
            }
        };
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", self.config.client_id.as_str()),
            ("client_secret", secret.expose_secret()),
            ("scope", self.config.scopes.as_str()),
        ];
        // A client span of its own, its context sent onward; the URL is configuration, not
        // personal, but the template is what the conventions name.
        let span = tracing::info_span!(
            "IMS token request",
            otel.name = "POST",
            otel.kind = "client",
            http.request.method = "POST",
            http.response.status_code = tracing::field::Empty,
        );
        let mut headers = http::HeaderMap::new();
        crate::observe::inject_trace_context(&span, &mut headers);
        let response = self
            .http
            .post(&self.endpoint)
            .headers(headers)
            .form(&form)
            .send()
            .instrument(span.clone())
            .await
            .map_err(|e| {
                let what = if e.is_timeout() {
                    "timed out"
                } else if e.is_connect() {
                    "could not connect"
                } else {
                    "failed"
                };
                TokenError::new(
                    TokenErrorKind::Unavailable,
                    format!("the IMS token request {what}"),
                )
            })?;
        let status = response.status();
        span.record("http.response.status_code", status.as_u16());
        if !status.is_success() {
            // 400 and 401 mean IMS refused the client id, secret or scopes; anything else is IMS
            // (or a proxy) failing.
            let kind = if matches!(status.as_u16(), 400 | 401 | 403) {
                TokenErrorKind::Refused
            } else {
                TokenErrorKind::Unavailable
            };
            return Err(TokenError::new(kind, format!("IMS answered HTTP {status}")));
        }
        let body = response.bytes().await.map_err(|_| {
            TokenError::new(TokenErrorKind::Unavailable, "the IMS answer was cut short")
        })?;
        let parsed: TokenResponse = serde_json::from_slice(&body).map_err(|_| {
            TokenError::new(TokenErrorKind::Unavailable, "the IMS answer is not a token")
        })?;
        if parsed.access_token.is_empty() || parsed.expires_in == 0 {
            return Err(TokenError::new(
                TokenErrorKind::Unavailable,
                "IMS answered an empty or already expired token",
            ));
        }
        Ok(parsed)
    }
}

impl TokenSource for ImsTokenSource {
    fn access_token(&self) -> BoxFuture<'_, Result<AccessToken, TokenError>> {
        Box::pin(self.token())
    }

    fn invalidate(&self, rejected: &AccessToken) {
        let mut state = self.inner.state();
        if state.cached.as_ref().is_some_and(|c| c.token == *rejected) {
            state.cached = None;
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_hides_the_secret() {
        let source = ImsTokenSource::new(ImsConfig {
            url: ImsConfig::DEFAULT_URL.into(),
            client_id: "client".into(),
            client_secret: ImsSecret::Value("very-secret-value".into()),
            scopes: ImsConfig::DEFAULT_SCOPES.into(),
            request_timeout: Duration::from_secs(1),
        })
        .unwrap();
        let debug = format!("{source:?}");
        assert!(!debug.contains("very-secret-value"), "{debug}");
        assert!(debug.contains("REDACTED"), "{debug}");
    }

    #[test]
    fn a_lifetime_beyond_a_day_is_not_believed() {
        assert_eq!(believed_lifetime(86_399), Duration::from_secs(86_399));
        assert_eq!(believed_lifetime(86_401), MAX_TOKEN_LIFETIME);
        assert_eq!(believed_lifetime(u64::MAX), MAX_TOKEN_LIFETIME);
    }

    #[tokio::test]
    async fn a_flight_that_panics_leaves_no_flight_behind() {
        use acs_emulator::{Emulator, EmulatorConfig};

        let emulator = Emulator::start(EmulatorConfig::default()).await.unwrap();
        let source = ImsTokenSource::new(ImsConfig {
            url: emulator.url(),
            client_id: EmulatorConfig::DEFAULT_IMS_CLIENT_ID.into(),
            client_secret: ImsSecret::Value(EmulatorConfig::DEFAULT_IMS_CLIENT_SECRET.into()),
            scopes: ImsConfig::DEFAULT_SCOPES.into(),
            request_timeout: Duration::from_secs(5),
        })
        .unwrap();
        {
            // As `next` does, under the lock: a flight whose request is a bug. Its panic message
            // in the test output is expected.
            let mut state = source.inner.state();
            state.flight = Some(
                source
                    .inner
                    .spawn_flight(None, |_| async { panic!("a bug inside a token request") }),
            );
        }

        // The first attempt shares the broken flight and fails; the next starts a new one after
        // the back-off and gets a token.
        let token = source.access_token().await;
        assert!(token.is_ok(), "{token:?}");
        assert_eq!(emulator.ims_request_count(), 1);
        assert!(source.inner.state().flight.is_none());
    }

    #[test]
    fn an_unusable_url_is_refused_at_once() {
        let error = ImsTokenSource::new(ImsConfig {
            url: "not a url".into(),
            client_id: "client".into(),
            client_secret: ImsSecret::Value("s".into()),
            scopes: ImsConfig::DEFAULT_SCOPES.into(),
            request_timeout: Duration::from_secs(1),
        })
        .unwrap_err();
        assert_eq!(error.kind(), TokenErrorKind::Refused);
    }
}
