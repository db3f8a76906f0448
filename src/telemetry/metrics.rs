//! Prometheus metrics: the names the gateway exports, their buckets, and the endpoint that
//! serves them (`--metrics-listen`): `GET /metrics` in the text format, on a port of its own;
//! every other path answers 404.
//!
//! Metrics are recorded through the `metrics` facade (as the ACS client crate records its own),
//! so that recording costs nothing until [`Exporter::install`] installs the recorder. No label
//! holds anything personal: labels name RPC methods, operations, outcomes, states, health
//! entries and directions, from closed sets, and notification recipients by the ids the
//! operator gave them in the recipients file.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::future::BoxFuture;
use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use acs_profile_client::observe as acs;

pub use crate::store::metrics::{
    LEDGER_COMMIT_BATCH_SIZE, LEDGER_COMMIT_SECONDS, LEDGER_REQUESTS_TOTAL,
    LEDGER_WRITE_ERRORS_TOTAL,
};

/// RPCs started, by `grpc_type`, `grpc_service` and `grpc_method` (go-grpc-prometheus).
pub const GRPC_STARTED_TOTAL: &str = "grpc_server_started_total";
/// RPCs finished, by method and `grpc_code` (go-grpc-prometheus).
pub const GRPC_HANDLED_TOTAL: &str = "grpc_server_handled_total";
/// Time from an RPC's start to its final status (go-grpc-prometheus).
pub const GRPC_HANDLING_SECONDS: &str = "grpc_server_handling_seconds";
/// Items of BulkSetOptOut streams, by `outcome`.
pub const BULK_ITEMS_TOTAL: &str = "ccpa_bulk_items_total";
/// Opt-out requests waiting for ACS to hold them.
pub const LEDGER_PENDING: &str = "ccpa_ledger_pending_requests";
/// Age of the oldest pending request (0 when none is pending).
pub const LEDGER_OLDEST_PENDING_AGE_SECONDS: &str = "ccpa_ledger_oldest_pending_age_seconds";
/// Pending requests, and pending notifications to third parties, older than the overdue
/// threshold.
pub const LEDGER_OVERDUE: &str = "ccpa_ledger_overdue_requests";
/// From a request's `received_at` to the moment ACS held it.
pub const TIME_TO_HONOR_SECONDS: &str = "ccpa_opt_out_time_to_honor_seconds";
/// Notification attempts, by `recipient` and `outcome` (`delivered`, `retried`, `failed`).
pub const NOTIFICATIONS_TOTAL: &str = "ccpa_notifications_total";
/// Notifications not yet delivered, by `recipient`.
pub const NOTIFICATIONS_PENDING: &str = "ccpa_notifications_pending";
/// Age of a recipient's oldest pending notification, by `recipient` (0 when none is pending).
pub const NOTIFICATIONS_OLDEST_PENDING_AGE_SECONDS: &str =
    "ccpa_notifications_oldest_pending_age_seconds";
/// Whether a health entry is SERVING (1) or not (0), by `service`.
pub const HEALTH_SERVING: &str = "ccpa_health_serving";
/// Profiles found changed behind the gateway, by `direction`.
pub const DRIFT_TOTAL: &str = "ccpa_opt_out_drift_total";

/// go-grpc-prometheus's default buckets (Prometheus's `DefBuckets`), which its dashboards
/// assume.
const RPC_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// One second to fifteen days: the law's limit is fifteen business days.
const TIME_TO_HONOR_BUCKETS: &[f64] = &[
    1.0,
    5.0,
    15.0,
    60.0,
    300.0,
    900.0,
    3_600.0,
    4.0 * 3_600.0,
    12.0 * 3_600.0,
    86_400.0,
    2.0 * 86_400.0,
    5.0 * 86_400.0,
    10.0 * 86_400.0,
    15.0 * 86_400.0,
];
/// An ACS request takes tens of milliseconds, and at most the client's timeout.
const ACS_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// A commit is one fsync, or a wait for one.
const COMMIT_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];
/// Up to the writer's largest batch.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// Why the exporter could not start.
#[derive(Debug, thiserror::Error)]
#[error("--metrics-listen (CCPA_METRICS_LISTEN): {0}")]
pub struct MetricsError(String);

/// The installed recorder, and what it reports about the process.
#[derive(Clone)]
pub struct Exporter {
    handle: PrometheusHandle,
    process: Arc<metrics_process::Collector>,
}

static INSTALLED: OnceLock<Exporter> = OnceLock::new();

impl Exporter {
    /// Installs the process's recorder, or returns the one already installed (a process has
    /// one recorder; in-process tests start several gateways).
    pub fn install() -> Result<Self, MetricsError> {
        if let Some(exporter) = INSTALLED.get() {
            return Ok(exporter.clone());
        }
        let mut builder = PrometheusBuilder::new();
        for (name, buckets) in [
            (GRPC_HANDLING_SECONDS, RPC_BUCKETS),
            (TIME_TO_HONOR_SECONDS, TIME_TO_HONOR_BUCKETS),
            (acs::ACS_REQUEST_DURATION_SECONDS, ACS_BUCKETS),
            (LEDGER_COMMIT_SECONDS, COMMIT_BUCKETS),
            (LEDGER_COMMIT_BATCH_SIZE, BATCH_BUCKETS),
        ] {
            builder = builder
                .set_buckets_for_metric(Matcher::Full(name.to_owned()), buckets)
                .map_err(|e| MetricsError(e.to_string()))?;
        }
        let handle = builder
            .install_recorder()
            .map_err(|e| MetricsError(e.to_string()))?;
        let process = Arc::new(metrics_process::Collector::default());
        process.describe();
        describe();
        let exporter = Self { handle, process };
        Ok(INSTALLED.get_or_init(|| exporter).clone())
    }

    /// The metrics as Prometheus text, after `refresh` has updated the gauges read on demand.
    pub async fn render(&self, refresh: &Refresh) -> String {
        self.process.collect();
        refresh().await;
        self.handle.render()
    }
}

/// Updates the gauges that are read on demand (the ledger's), before each scrape.
pub type Refresh = Arc<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>;

/// Serves `GET /metrics` on `listener` until `stop`.
pub async fn serve(
    listener: TcpListener,
    exporter: Exporter,
    refresh: Refresh,
    stop: CancellationToken,
) -> std::io::Result<()> {
    use axum::routing::get;
    let upkeep = exporter.handle.clone();
    let upkeep_stop = stop.clone();
    // Histograms are drained into their buckets here rather than on the recording path.
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = upkeep_stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(5)) => upkeep.run_upkeep(),
            }
        }
    });
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let exporter = exporter.clone();
            let refresh = refresh.clone();
            async move {
                (
                    [(
                        http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    exporter.render(&refresh).await,
                )
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
}

/// Says what each metric means, in the `# HELP` lines.
fn describe() {
    describe_counter!(
        GRPC_STARTED_TOTAL,
        "Total number of RPCs started on the server."
    );
    describe_counter!(
        GRPC_HANDLED_TOTAL,
        "Total number of RPCs completed on the server, regardless of success or failure."
    );
    describe_histogram!(
        GRPC_HANDLING_SECONDS,
        Unit::Seconds,
        "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server."
    );
    describe_counter!(
        BULK_ITEMS_TOTAL,
        "Items of BulkSetOptOut streams answered, by outcome."
    );
    describe_gauge!(
        LEDGER_PENDING,
        "Opt-out requests recorded and not yet held by Adobe Campaign."
    );
    describe_gauge!(
        LEDGER_OLDEST_PENDING_AGE_SECONDS,
        Unit::Seconds,
        "Age of the oldest pending opt-out request, from its received_at; 0 when none is pending."
    );
    describe_gauge!(
        LEDGER_OVERDUE,
        "Pending opt-out requests, and pending notifications of them to third parties, older than --overdue-after business days."
    );
    describe_counter!(
        LEDGER_REQUESTS_TOTAL,
        "Opt-out requests resolved, by the state they reached."
    );
    describe_histogram!(
        TIME_TO_HONOR_SECONDS,
        Unit::Seconds,
        "From an opt-out request's received_at to the moment Adobe Campaign held it."
    );
    describe_histogram!(
        LEDGER_COMMIT_SECONDS,
        Unit::Seconds,
        "Time a ledger commit takes."
    );
    describe_histogram!(
        LEDGER_COMMIT_BATCH_SIZE,
        "Units of work committed together (SQLite's grouped commits)."
    );
    describe_counter!(
        LEDGER_WRITE_ERRORS_TOTAL,
        "Ledger writes that failed; nothing of them was kept."
    );
    describe_counter!(
        NOTIFICATIONS_TOTAL,
        "Attempts to notify a recipient of a consumer's request, by recipient and outcome."
    );
    describe_gauge!(
        NOTIFICATIONS_PENDING,
        "Notifications to a recipient not yet delivered (and not failed for good)."
    );
    describe_gauge!(
        NOTIFICATIONS_OLDEST_PENDING_AGE_SECONDS,
        Unit::Seconds,
        "Age of a recipient's oldest pending notification, from its request's recording; 0 when none is pending."
    );
    describe_gauge!(
        HEALTH_SERVING,
        "1 when the health entry is SERVING, 0 otherwise."
    );
    describe_counter!(
        DRIFT_TOTAL,
        "Profiles whose opt-out was found changed behind the gateway, by direction."
    );
    describe_counter!(
        acs::ACS_REQUESTS_TOTAL,
        "HTTP requests sent to Adobe Campaign."
    );
    describe_histogram!(
        acs::ACS_REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "From sending a request to Adobe Campaign to its answer's head."
    );
    describe_counter!(
        acs::ACS_RETRIES_TOTAL,
        "Requests to Adobe Campaign repeated by the retry rules."
    );
    describe_gauge!(
        acs::ACS_THROTTLE_WAITING,
        "Calls waiting for their turn at the client-side throttle toward Adobe Campaign."
    );
    describe_gauge!(
        acs::ACS_IN_FLIGHT,
        "Requests to Adobe Campaign sent and not yet answered."
    );
    describe_counter!(
        acs::IMS_TOKEN_REQUESTS_TOTAL,
        "Token requests to Adobe IMS, by outcome."
    );
}
