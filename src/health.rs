//! What `grpc.health.v1` reports, and why.
//!
//! - `ccpa.v1.CcpaService` is SERVING while the gateway's credentials work at its address for
//!   ACS. It turns NOT_SERVING when no access token can be obtained, ACS refuses our credentials
//!   (401 after a token refresh, or 403), or the address answers 404 without ACS's own error
//!   (`RST-360011`): a proxy, a wrong base path or tenant. It turns SERVING again once a call or
//!   a probe gets through. ACS being down or
//!   slow does not change it: every replica would be equally affected, so taking this one out of
//!   rotation would not help.
//! - `""` (the server as a whole) follows it.
//! - `liveness` is SERVING for as long as the process answers: restarting does not fix bad
//!   credentials, so liveness must not follow them.
//! - `ccpa.v1.OptOutDelivery` turns NOT_SERVING while a recorded opt-out request has waited
//!   longer than the overdue threshold (see [`crate::optout::business_days`]): an alert, not a readiness
//!   signal.
//!
//! Use `ccpa.v1.CcpaService` (or `""`) as the readiness signal and `liveness` as the liveness
//! signal. While NOT_SERVING, a probe (a read of a key that cannot exist; any answer from ACS
//! other than 401/403 or a bare 404 proves the credentials and the address) runs every
//! `probe_interval`, since a load balancer
//! that has stopped sending calls would otherwise never let the gateway see that things work
//! again. The first answer from ACS after failures (a call's or a probe's) makes due at once
//! the recorded requests backing off from an outage ([`GatewayHealth::recoveries`]); while such
//! requests wait and no call hears from ACS, the deliverer probes it
//! ([`GatewayHealth::acs_failing_unheard_for`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use acs_profile_client::{CallError, Client, Failure};
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::proto::CCPA_SERVICE_NAME;

/// The health entry to use for liveness.
pub const LIVENESS_SERVICE_NAME: &str = "liveness";

/// The health entry that turns NOT_SERVING while a recorded opt-out request is overdue: alert on
/// it; do not use it for readiness (a replica taken out of rotation delivers nothing faster).
pub const DELIVERY_SERVICE_NAME: &str = "ccpa.v1.OptOutDelivery";

/// A key no ACS tenant can hold (`@` and text that decrypts to nothing): ACS answers it with
/// `XTK-170036` once it has accepted our credentials.
const PROBE_KEY: &str = "@ccpa-gateway-health-probe";

/// What one call's outcome says about the gateway's way to ACS: its credentials, and its
/// address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamSignal {
    /// ACS processed the request: the credentials work and the address leads to ACS.
    Accepted,
    /// No token, ACS refused the credentials, or the address answered 404 without ACS's own
    /// error (it does not lead to ACS). `reason` is the failure's name, for the log.
    Refused {
        /// The failure's name, such as `ACS_CREDENTIALS_REJECTED`.
        reason: &'static str,
    },
    /// ACS could not be reached or did not answer in time (a 429 or 5xx from its gateway, a
    /// refused or broken connection, a deadline passed with the request sent). Says nothing of
    /// the credentials, but once ACS answers again, requests backing off from this are due at
    /// once (see [`GatewayHealth::recoveries`]).
    Unavailable,
    /// Says nothing about either (a malformed answer, our own throttle).
    Unknown,
}

/// Whether a failed call means ACS (or IMS, for its token) was unavailable: a failure that
/// passes by itself once it answers again, so that a request backing off from it need not wait
/// out its back-off then. A bare 404 counts (a proxy or gateway in front of ACS that lost its
/// route). Our own throttle's refusal does not: ACS was not asked.
pub fn acs_unavailable(error: &CallError) -> bool {
    match error {
        CallError::Api(error) => matches!(
            Failure::classify(error),
            Failure::Unreachable
                | Failure::Interrupted { .. }
                | Failure::Transient { .. }
                | Failure::EndpointNotFound
                | Failure::NoToken
        ),
        CallError::DeadlineExceeded { sent } => *sent,
        CallError::Throttled => false,
    }
}

impl UpstreamSignal {
    /// Reads the signal from a call's outcome.
    pub fn of<T>(result: &Result<T, CallError>) -> Self {
        match result {
            Ok(_) => Self::Accepted,
            Err(CallError::Api(error)) => match Failure::classify(error) {
                failure @ (Failure::NoToken
                | Failure::TokenRejected
                | Failure::AccessDenied
                | Failure::EndpointNotFound) => Self::Refused {
                    reason: failure.name(),
                },
                Failure::Unreachable | Failure::Interrupted { .. } | Failure::Transient { .. } => {
                    Self::Unavailable
                }
                Failure::MalformedResponse | Failure::InvalidRequest => Self::Unknown,
                Failure::NotFound
                | Failure::UnparsableKey
                | Failure::Conflict
                | Failure::Refused { .. }
                | Failure::ServerError { .. } => Self::Accepted,
            },
            Err(CallError::DeadlineExceeded { sent: true }) => Self::Unavailable,
            Err(CallError::DeadlineExceeded { sent: false } | CallError::Throttled) => {
                Self::Unknown
            }
        }
    }
}

struct State {
    upstream_ok: bool,
    shutting_down: bool,
}

/// Sets a health entry, and its `ccpa_health_serving` gauge.
async fn report(reporter: &HealthReporter, service: &'static str, status: ServingStatus) {
    let serving = f64::from(u8::from(status == ServingStatus::Serving));
    metrics::gauge!(crate::telemetry::metrics::HEALTH_SERVING, "service" => service).set(serving);
    reporter.set_service_status(service, status).await;
}

/// Tracks the state of the way to ACS and reports it through `grpc.health.v1`.
pub struct GatewayHealth {
    reporter: HealthReporter,
    /// Whether the last call or probe that said anything of ACS's availability failed (ACS
    /// unavailable, or our credentials or address refused).
    acs_failing: AtomicBool,
    /// Counts the times ACS answered again after failures: see [`GatewayHealth::recoveries`].
    recoveries: tokio::sync::watch::Sender<u64>,
    /// When a call or probe last said anything of ACS's availability, in ms from `started`.
    last_heard_ms: AtomicU64,
    started: tokio::time::Instant,
    /// Mirrors `state.upstream_ok`, so that the common case (no change) takes no lock.
    upstream_ok: AtomicBool,
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
            report(&reporter, name, ServingStatus::Serving).await;
        }
        Arc::new(Self {
            reporter,
            acs_failing: AtomicBool::new(false),
            recoveries: tokio::sync::watch::Sender::new(0),
            last_heard_ms: AtomicU64::new(0),
            started: tokio::time::Instant::now(),
            upstream_ok: AtomicBool::new(true),
            state: tokio::sync::Mutex::new(State {
                upstream_ok: true,
                shutting_down: false,
            }),
        })
    }

    /// Takes a call's outcome into account.
    pub async fn observe(&self, signal: UpstreamSignal) {
        if signal != UpstreamSignal::Unknown {
            let heard = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.last_heard_ms.store(heard, Ordering::Release);
        }
        match signal {
            UpstreamSignal::Accepted => {
                if self.acs_failing.swap(false, Ordering::AcqRel) {
                    tracing::info!(
                        "Adobe Campaign answers again: requests backing off from its outage are \
                         due now"
                    );
                    self.recoveries.send_modify(|n| *n = n.wrapping_add(1));
                }
            }
            UpstreamSignal::Refused { .. } | UpstreamSignal::Unavailable => {
                self.acs_failing.store(true, Ordering::Release);
            }
            UpstreamSignal::Unknown => {}
        }
        let (ok, reason) = match signal {
            UpstreamSignal::Accepted => (true, ""),
            UpstreamSignal::Refused { reason } => (false, reason),
            UpstreamSignal::Unavailable | UpstreamSignal::Unknown => return,
        };
        if self.upstream_ok.load(Ordering::Acquire) == ok {
            return;
        }
        let mut state = self.state.lock().await;
        if state.upstream_ok == ok {
            return;
        }
        state.upstream_ok = ok;
        self.upstream_ok.store(ok, Ordering::Release);
        if ok {
            tracing::info!(
                "Adobe Campaign accepts the gateway's credentials at its address again: SERVING"
            );
        } else {
            tracing::error!(
                reason,
                "Adobe Campaign refuses the gateway's credentials, no token can be obtained, or \
                 the gateway's address for it is wrong: NOT_SERVING"
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
        report(&self.reporter, DELIVERY_SERVICE_NAME, status).await;
    }

    /// Whether the credentials and the address worked last time they were tried.
    pub fn upstream_ok(&self) -> bool {
        self.upstream_ok.load(Ordering::Acquire)
    }

    /// Changes each time a call or probe gets an answer from ACS after failures: the deliverer
    /// then makes due at once the requests whose back-off came from ACS being unavailable.
    pub fn recoveries(&self) -> tokio::sync::watch::Receiver<u64> {
        self.recoveries.subscribe()
    }

    /// Shutdown has begun: NOT_SERVING for good (liveness stays SERVING until the process ends).
    pub async fn shutting_down(&self) {
        let mut state = self.state.lock().await;
        state.shutting_down = true;
        self.set_ready(ServingStatus::NotServing).await;
    }

    async fn set_ready(&self, status: ServingStatus) {
        report(&self.reporter, CCPA_SERVICE_NAME, status).await;
        report(&self.reporter, "", status).await;
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
            if self.upstream_ok() {
                continue;
            }
            self.probe(&acs, interval.min(Duration::from_secs(10)))
                .await;
        }
    }

    /// Asks ACS for a key no tenant holds, within `budget`, and takes the answer into account.
    pub async fn probe(&self, acs: &Client, budget: Duration) {
        let outcome = acs
            .read_profile(PROBE_KEY, Some(Instant::now() + budget))
            .await;
        let signal = UpstreamSignal::of(&outcome);
        tracing::debug!(signal = ?signal, "health probe");
        self.observe(signal).await;
    }

    /// Whether ACS failed (unavailable, or refusing us) when last asked, and nothing that said
    /// anything of it has come back for `quiet`: a probe would tell what calls do not.
    pub fn acs_failing_unheard_for(&self, quiet: Duration) -> bool {
        let last_ms = self.last_heard_ms.load(Ordering::Acquire);
        let since = self
            .started
            .elapsed()
            .saturating_sub(Duration::from_millis(last_ms));
        self.acs_failing.load(Ordering::Acquire) && since >= quiet
    }
}
