//! How one logical call to ACS is made: within a deadline, through the throttle, retried only
//! when that is safe, and with one token refresh when ACS says the token expired.
//!
//! Retried: failures that are likely to pass (no connection, 429, 502, 503, 504, a broken or
//! timed-out answer), and only for calls that are safe to repeat ([`Idempotency::Idempotent`]:
//! reads, and writes of an absolute value). A call that is not idempotent (a creation) is retried
//! only when the request provably never reached ACS: the connection could not be made. Never
//! retried: 500, which ACS uses for bad input as much as for outages.
//!
//! Delays grow exponentially with full jitter (a random wait between zero and the cap), or
//! follow ACS's `Retry-After` when it sends one and it fits in the deadline. A retry budget (a
//! share of recent calls, with a small floor) stops retries from multiplying the load when ACS is
//! down. The deadline bounds everything: the wait for admission, the token, every attempt and
//! every pause; when it passes, the attempt in progress is dropped (its connection closed).

use std::future::Future;
use std::time::{Duration, SystemTime};

use reqwest::header::RETRY_AFTER;
use tokio::time::Instant;
use tower::retry::budget::{Budget, TpsBudget};

use crate::Backoff;
use crate::hooks::TOKEN_ERROR_PREFIX;
use crate::throttle::{Throttle, ThrottleSettings};
use crate::{ApiError, Failure, TokenError, TokenSource};

/// Whether a call may be made twice with the same effect as once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idempotency {
    /// A read, or a write of an absolute value (`PATCH {"ccpaOptOut":true}`).
    Idempotent,
    /// A creation: a second attempt can create a second profile.
    NotIdempotent,
}

/// Retry and throttling settings of a client.
#[derive(Debug, Clone, PartialEq)]
pub struct CallSettings {
    /// Attempts per call, the first included.
    pub max_attempts: u32,
    /// Delays between attempts: full jitter under a doubling cap ([`Backoff::ACS_CALL`]), unless
    /// ACS's `Retry-After` says otherwise.
    pub backoff: Backoff,
    /// Retries allowed as a share of calls over the last ten seconds (0.2: one retry for five
    /// calls).
    pub retry_ratio: f32,
    /// Retries allowed per second whatever the traffic, so that a quiet client can still retry.
    pub min_retries_per_second: u32,
    /// The deadline of a call made without one.
    pub default_budget: Duration,
    /// Limits on the requests made to ACS.
    pub throttle: ThrottleSettings,
}

impl Default for CallSettings {
    fn default() -> Self {
        Self {
            max_attempts: 4,
            backoff: Backoff::ACS_CALL,
            retry_ratio: 0.2,
            min_retries_per_second: 10,
            default_budget: Duration::from_secs(10),
            throttle: ThrottleSettings::default(),
        }
    }
}

/// Why a call failed.
#[derive(Debug)]
pub enum CallError {
    /// ACS answered an error, or could not be reached; this is the last attempt's error.
    Api(ApiError),
    /// The deadline passed before the call could finish.
    DeadlineExceeded {
        /// Whether a request of the call had been sent by then: if so, it may still take
        /// effect at ACS. If not, the call waited (for the throttle or a token) and nothing of
        /// it reached ACS.
        sent: bool,
    },
    /// Too many calls are already waiting for the throttle toward ACS.
    Throttled,
}

impl CallError {
    /// What went wrong, by name ([`Failure::name`]), with the HTTP status when ACS answered
    /// one: for logs and records. Never a body.
    pub fn reason(&self) -> String {
        match self {
            Self::Api(error) => {
                let name = Failure::classify(error).name();
                match error.status() {
                    Some(status) => format!("{name} (HTTP {})", status.as_u16()),
                    None => name.to_owned(),
                }
            }
            Self::DeadlineExceeded { .. } => "DEADLINE_EXCEEDED".to_owned(),
            Self::Throttled => "ACS_CALL_QUEUE_FULL".to_owned(),
        }
    }
}

impl CallError {
    /// Whether a request of this call may have reached ACS, and so may still take effect there
    /// (a write may land after this answer). False only when none was sent: the call was
    /// refused by the throttle, its deadline passed while it waited for its turn, or no token
    /// could be had.
    pub fn may_have_reached_acs(&self) -> bool {
        match self {
            Self::Throttled => false,
            Self::DeadlineExceeded { sent } => *sent,
            Self::Api(error) => Failure::classify(error) != Failure::NoToken,
        }
    }
}

impl From<ApiError> for CallError {
    fn from(error: ApiError) -> Self {
        Self::Api(error)
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Api(error) => write!(f, "{:?}", Failure::classify(error)),
            Self::DeadlineExceeded { .. } => f.write_str("the deadline passed"),
            Self::Throttled => f.write_str("too many calls are waiting for ACS"),
        }
    }
}

impl std::error::Error for CallError {}

/// The shared state behind the calls of one client (and its clones).
pub(crate) struct CallRuntime {
    settings: CallSettings,
    throttle: Throttle,
    budget: TpsBudget,
}

impl std::fmt::Debug for CallRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallRuntime")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Whether a failure of this call is worth another attempt.
pub fn is_retryable(failure: &Failure, idempotency: Idempotency) -> bool {
    match failure {
        // The request never left: repeating it cannot do anything twice.
        Failure::Unreachable => true,
        Failure::Interrupted { .. } | Failure::Transient { .. } | Failure::MalformedResponse => {
            idempotency == Idempotency::Idempotent
        }
        _ => false,
    }
}

/// The delay ACS asked for in `Retry-After` (seconds, or an HTTP date), if any.
pub fn retry_after(error: &ApiError) -> Option<Duration> {
    let headers = match error {
        progenitor_client::Error::ErrorResponse(response) => response.headers(),
        progenitor_client::Error::UnexpectedResponse(response) => response.headers(),
        _ => return None,
    };
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// The error the request hook reports when the token source fails, made here when the token is
/// fetched ahead of the request.
fn no_token_error(error: &TokenError) -> ApiError {
    progenitor_client::Error::Custom(format!("{TOKEN_ERROR_PREFIX}{}", error.reason()))
}

/// Whether ACS refused the token as invalid or expired (401 `401013`), the one case where a new
/// token can help.
fn token_expired(error: &ApiError) -> bool {
    match error {
        progenitor_client::Error::ErrorResponse(response) => {
            response.status().as_u16() == 401 && response.mentions("401013")
        }
        _ => false,
    }
}

impl CallRuntime {
    pub(crate) fn new(settings: CallSettings) -> Self {
        Self {
            throttle: Throttle::new(settings.throttle),
            budget: TpsBudget::new(
                Duration::from_secs(10),
                settings.min_retries_per_second,
                settings.retry_ratio,
            ),
            settings,
        }
    }

    /// The deadline of a call made without one.
    pub(crate) fn default_budget(&self) -> Duration {
        self.settings.default_budget
    }

    /// Makes a call by running `attempt` as often as the rules allow.
    pub(crate) async fn run<T, F, Fut>(
        &self,
        tokens: &dyn TokenSource,
        idempotency: Idempotency,
        deadline: Option<std::time::Instant>,
        background: bool,
        attempt: F,
    ) -> Result<T, CallError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, ApiError>>,
    {
        crate::observe::within_call(self.run_attempts(
            tokens,
            idempotency,
            deadline,
            background,
            attempt,
        ))
        .await
    }

    async fn run_attempts<T, F, Fut>(
        &self,
        tokens: &dyn TokenSource,
        idempotency: Idempotency,
        deadline: Option<std::time::Instant>,
        background: bool,
        mut attempt: F,
    ) -> Result<T, CallError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, ApiError>>,
    {
        let deadline = deadline
            .map(Instant::from_std)
            .unwrap_or_else(|| Instant::now() + self.settings.default_budget);
        self.budget.deposit();
        let mut attempts = 0;
        let mut refreshed_token = false;
        // Whether any attempt has sent its request (set just before it does).
        let mut sent = false;
        loop {
            attempts += 1;
            let sending = &mut sent;
            let outcome = tokio::time::timeout_at(deadline, async {
                let admission = if background {
                    self.throttle.admit_background().await
                } else {
                    self.throttle.admit().await
                };
                let _admitted = admission.map_err(|_| CallError::Throttled)?;
                // The token this attempt sends (the request hook finds it cached), known here so
                // that a 401013 invalidates that one and no other.
                let token = tokens
                    .access_token()
                    .await
                    .map_err(|e| CallError::Api(no_token_error(&e)))?;
                // Boxed: the request's state (a few KiB) then exists only while the request
                // does, not in every call waiting for admission; with thousands queued, that is
                // most of the gateway's memory.
                *sending = true;
                Ok::<_, CallError>((Box::pin(attempt()).await, token))
            })
            .await;
            let (result, token) = match outcome {
                Err(_elapsed) => return Err(CallError::DeadlineExceeded { sent }),
                Ok(Err(throttled)) => return Err(throttled),
                Ok(Ok(pair)) => pair,
            };
            let error = match result {
                Ok(value) => return Ok(value),
                Err(error) => error,
            };

            if token_expired(&error) && !refreshed_token {
                // ACS says the token is invalid or expired: one refresh, one more try, at once.
                refreshed_token = true;
                tokens.invalidate(&token);
                crate::observe::count_retry();
                continue;
            }
            let failure = Failure::classify(&error);
            if attempts >= self.settings.max_attempts || !is_retryable(&failure, idempotency) {
                return Err(error.into());
            }
            let delay =
                retry_after(&error).unwrap_or_else(|| self.settings.backoff.after(attempts));
            // Checked: `Retry-After` is ACS's (or a proxy's) to choose, and a huge one must mean
            // "not within this deadline", not an overflow.
            let resume_at = Instant::now().checked_add(delay);
            if resume_at.is_none_or(|at| at >= deadline) {
                // Waiting would outlive the caller: give it the answer now.
                return Err(error.into());
            }
            if !self.budget.withdraw() {
                tracing::warn!(failure = ?failure, "retry budget spent: not retrying");
                return Err(error.into());
            }
            tracing::debug!(failure = ?failure, delay_ms = delay.as_millis() as u64, attempts, "retrying");
            crate::observe::count_retry();
            tokio::time::sleep(delay).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::StatusCode;

    fn one_per_second() -> CallSettings {
        CallSettings {
            throttle: crate::ThrottleSettings {
                max_rps: std::num::NonZeroU32::MIN,
                max_in_flight: 1,
                max_queued: 10,
            },
            ..CallSettings::default()
        }
    }

    #[tokio::test]
    async fn a_deadline_passed_in_the_queue_says_nothing_was_sent() {
        let runtime = CallRuntime::new(one_per_second());
        let tokens = crate::SharedToken::new(crate::AccessToken::new("token"));
        let soon = || Some(std::time::Instant::now() + Duration::from_millis(100));
        // The one slot of this second.
        let first = runtime
            .run(&tokens, Idempotency::Idempotent, soon(), false, || async {
                Ok::<_, ApiError>(())
            })
            .await;
        assert!(first.is_ok());
        let mut attempted = false;
        let waited = runtime
            .run(&tokens, Idempotency::Idempotent, soon(), false, || {
                attempted = true;
                async { Ok::<_, ApiError>(()) }
            })
            .await
            .unwrap_err();
        assert!(!attempted);
        assert!(matches!(
            waited,
            CallError::DeadlineExceeded { sent: false }
        ));
        assert!(!waited.may_have_reached_acs());
    }

    #[tokio::test]
    async fn a_deadline_passed_during_a_request_says_it_may_have_reached_acs() {
        let runtime = CallRuntime::new(one_per_second());
        let tokens = crate::SharedToken::new(crate::AccessToken::new("token"));
        let deadline = Some(std::time::Instant::now() + Duration::from_millis(100));
        let slow = runtime
            .run(
                &tokens,
                Idempotency::Idempotent,
                deadline,
                false,
                || async {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    Ok::<_, ApiError>(())
                },
            )
            .await
            .unwrap_err();
        assert!(matches!(slow, CallError::DeadlineExceeded { sent: true }));
        assert!(slow.may_have_reached_acs());
    }

    #[test]
    fn only_safe_retries_are_allowed() {
        use Idempotency::*;
        let transient = Failure::Transient {
            status: StatusCode::SERVICE_UNAVAILABLE,
        };
        let cases = [
            (Failure::Unreachable, Idempotent, true),
            (Failure::Unreachable, NotIdempotent, true),
            (transient.clone(), Idempotent, true),
            (transient, NotIdempotent, false),
            (Failure::Interrupted { timed_out: true }, Idempotent, true),
            (
                Failure::Interrupted { timed_out: false },
                NotIdempotent,
                false,
            ),
            (Failure::MalformedResponse, Idempotent, true),
            (Failure::MalformedResponse, NotIdempotent, false),
            (
                Failure::ServerError {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                },
                Idempotent,
                false,
            ),
            (Failure::NotFound, Idempotent, false),
            (Failure::TokenRejected, Idempotent, false),
            (Failure::NoToken, Idempotent, false),
        ];
        for (failure, idempotency, expected) in cases {
            assert_eq!(
                is_retryable(&failure, idempotency),
                expected,
                "{failure:?} {idempotency:?}"
            );
        }
    }

    #[test]
    fn the_default_back_off_is_the_acs_call_policy() {
        let settings = CallSettings::default();
        assert_eq!(settings.backoff, Backoff::ACS_CALL);
        assert_eq!(settings.backoff.jitter(), crate::Jitter::Full);
    }
}
