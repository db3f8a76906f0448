//! What `grpc.health.v1` reports, and why.
//!
//! - `ccpa.v1.CcpaService` is SERVING while the gateway's credentials work. It turns NOT_SERVING
//!   when no access token can be obtained or ACS refuses our credentials (401 after a token
//!   refresh, or 403), and SERVING again once a call or a probe gets through. ACS being down or
//!   slow does not change it: every replica would be equally affected, so taking this one out of
//!   rotation would not help.
//! - `""` (the server as a whole) follows it.
//! - `liveness` is SERVING for as long as the process answers: restarting does not fix bad
//!   credentials, so liveness must not follow them.
//! - `ccpa.v1.OptOutDelivery` turns NOT_SERVING while a recorded opt-out request has waited
//!   longer than the overdue threshold (see [`crate::ledger::clock`]): an alert, not a readiness
//!   signal.
//!
//! Use `ccpa.v1.CcpaService` (or `""`) as the readiness signal and `liveness` as the liveness
//! signal. While NOT_SERVING, a probe (a read of a key that cannot exist; any answer from ACS
//! other than 401/403 proves the credentials) runs every `probe_interval`, since a load balancer
//! that has stopped sending calls would otherwise never let the gateway see that things work
//! again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use acs_profile_client::{CallError, Client, Failure};
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::server::CCPA_SERVICE_NAME;

/// The health entry to use for liveness.
pub const LIVENESS_SERVICE_NAME: &str = "liveness";

/// The health entry that turns NOT_SERVING while a recorded opt-out request is overdue: alert on
/// it; do not use it for readiness (a replica taken out of rotation delivers nothing faster).
pub const DELIVERY_SERVICE_NAME: &str = "ccpa.v1.OptOutDelivery";

/// A key no ACS tenant can hold (`@` and text that decrypts to nothing): ACS answers it with
/// `XTK-170036` once it has accepted our credentials.
const PROBE_KEY: &str = "@ccpa-gateway-health-probe";

/// What one call's outcome says about the gateway's credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialSignal {
    /// ACS processed the request: the credentials work.
    Accepted,
    /// No token, or ACS refused the credentials.
    Refused,
    /// Says nothing about the credentials (ACS unreachable, a deadline, the throttle).
    Unknown,
}

impl CredentialSignal {
    /// Reads the signal from a call's outcome.
    pub fn of<T>(result: &Result<T, CallError>) -> Self {
        match result {
            Ok(_) => Self::Accepted,
            Err(CallError::Api(error)) => match Failure::classify(error) {
                Failure::NoToken | Failure::TokenRejected | Failure::AccessDenied => Self::Refused,
                Failure::Unreachable
                | Failure::Interrupted { .. }
                | Failure::Transient { .. }
                | Failure::MalformedResponse
                | Failure::InvalidRequest => Self::Unknown,
                Failure::NotFound
                | Failure::UnparsableKey
                | Failure::Conflict
                | Failure::Refused { .. }
                | Failure::ServerError { .. } => Self::Accepted,
            },
            Err(CallError::DeadlineExceeded { .. } | CallError::Throttled) => Self::Unknown,
        }
    }
}

struct State {
    credentials_ok: bool,
    shutting_down: bool,
}

/// Tracks the credentials' state and reports it through `grpc.health.v1`.
pub struct GatewayHealth {
    reporter: HealthReporter,
    /// Mirrors `state.credentials_ok`, so that the common case (no change) takes no lock.
    credentials_ok: AtomicBool,
    state: tokio::sync::Mutex<State>,
}

impl GatewayHealth {
    /// Starts with everything SERVING.
    pub async fn new(reporter: HealthReporter) -> Arc<Self> {
        for name in [
            "",
            CCPA_SERVICE_NAME,
            LIVENESS_SERVICE_NAME,
            DELIVERY_SERVICE_NAME,
        ] {
            reporter
                .set_service_status(name, ServingStatus::Serving)
                .await;
        }
        Arc::new(Self {
            reporter,
            credentials_ok: AtomicBool::new(true),
            state: tokio::sync::Mutex::new(State {
                credentials_ok: true,
                shutting_down: false,
            }),
        })
    }

    /// Takes a call's outcome into account.
    pub async fn observe(&self, signal: CredentialSignal) {
        let ok = match signal {
            CredentialSignal::Accepted => true,
            CredentialSignal::Refused => false,
            CredentialSignal::Unknown => return,
        };
        if self.credentials_ok.load(Ordering::Acquire) == ok {
            return;
        }
        let mut state = self.state.lock().await;
        if state.credentials_ok == ok {
            return;
        }
        state.credentials_ok = ok;
        self.credentials_ok.store(ok, Ordering::Release);
        if ok {
            tracing::info!("Adobe Campaign accepts the gateway's credentials again: SERVING");
        } else {
            tracing::error!(
                "Adobe Campaign refuses the gateway's credentials, or no token can be obtained: NOT_SERVING"
            );
        }
        if !state.shutting_down {
            let status = if ok {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            self.set_ready(status).await;
        }
    }

    /// Reports whether a recorded request is overdue on the `ccpa.v1.OptOutDelivery` entry.
    pub async fn set_delivery_overdue(&self, overdue: bool) {
        let status = if overdue {
            ServingStatus::NotServing
        } else {
            ServingStatus::Serving
        };
        self.reporter
            .set_service_status(DELIVERY_SERVICE_NAME, status)
            .await;
    }

    /// Whether the credentials worked last time they were tried.
    pub fn credentials_ok(&self) -> bool {
        self.credentials_ok.load(Ordering::Acquire)
    }

    /// Shutdown has begun: NOT_SERVING for good (liveness stays SERVING until the process ends).
    pub async fn shutting_down(&self) {
        let mut state = self.state.lock().await;
        state.shutting_down = true;
        self.set_ready(ServingStatus::NotServing).await;
    }

    async fn set_ready(&self, status: ServingStatus) {
        self.reporter
            .set_service_status(CCPA_SERVICE_NAME, status)
            .await;
        self.reporter.set_service_status("", status).await;
    }

    /// While the credentials are refused, probes ACS every `interval` until `stop`.
    pub async fn probe_while_refused(
        self: Arc<Self>,
        acs: Client,
        interval: Duration,
        stop: CancellationToken,
    ) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
            if self.credentials_ok() {
                continue;
            }
            let deadline = Instant::now() + interval.min(Duration::from_secs(10));
            let outcome = acs.read_profile(PROBE_KEY, Some(deadline)).await;
            let signal = CredentialSignal::of(&outcome);
            tracing::debug!(signal = ?signal, "health probe");
            self.observe(signal).await;
        }
    }
}
