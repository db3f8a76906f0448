//! The gRPC server: the CCPA service, `grpc.health.v1` (see [`crate::health`]), server
//! reflection, behind the trust boundary ([`crate::access`]), with connection limits and an
//! orderly shutdown. Health can also be served alone, in plaintext, on a listener of its own for
//! the kubelet's native gRPC probes.
//!
//! Shutdown runs in this order: both readiness entries (`""` and `ccpa.v1.CcpaService`) turn
//! NOT_SERVING and health watchers are told so; after `drain_delay` (time for load balancers to
//! notice) the listener closes; calls in flight finish, bounded by `drain_timeout`; then
//! [`serve`] returns. A SQLite ledger's exclusive hold ends with the last task that can write
//! to it, even if that outlasts the drain.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};

use acs_profile_client::Client;

use crate::access::AccessControl;
use crate::access::gate::GateLayer;
use crate::access::tls::ServerTls;
use crate::api::CcpaApi;
use crate::health::GatewayHealth;
use crate::notify::{Notifications, Notifier};
use crate::optout::delivery::{Delivery, DeliverySettings};
use crate::optout::reconcile::{ReconcileSettings, Reconciler};
use crate::proto::ccpa_v1::ccpa_service_server::CcpaServiceServer;
use crate::store::Ledger;
use crate::telemetry;
use crate::telemetry::metrics::{Exporter, Refresh};
use crate::telemetry::rpc::RpcLayer;

/// The name health checks use for the CCPA service, `ccpa.v1.CcpaService`: the contract's
/// ([`crate::proto`]), here too for the callers that know it from the server.
pub use crate::proto::CCPA_SERVICE_NAME;

/// Largest request message accepted: every request is a few hundred bytes (a bulk item is one
/// message).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Largest response message sent: a page of 1,000 records, or the profiles of one email
/// (`--max-profiles-per-email`), fit well within it.
pub const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;
/// Largest header block accepted on a call (an Istio `x-forwarded-client-cert` included).
pub const MAX_HEADER_LIST_BYTES: u32 = 32 * 1024;

/// How the server runs and shuts down.
#[derive(Clone)]
pub struct ServerOptions {
    /// How often ACS is probed while it refuses the gateway's credentials.
    pub health_probe_interval: Duration,
    /// The shutdown sequence.
    pub shutdown: ShutdownOptions,
    /// How recorded requests are delivered.
    pub delivery: DeliverySettings,
    /// How applied profiles are re-read, and drift put back.
    pub reconcile: ReconcileSettings,
    /// TLS, caller identity and policy.
    pub boundary: Boundary,
    /// Limits on each connection.
    pub connections: ConnectionLimits,
    /// A lookup by email that matches more profiles is refused (TOO_MANY_PROFILES).
    pub max_profiles_per_email: usize,
    /// Which third parties are told of consumer requests, and how.
    pub notifications: Notifications,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            health_probe_interval: Duration::from_secs(10),
            shutdown: ShutdownOptions::default(),
            delivery: DeliverySettings::default(),
            reconcile: ReconcileSettings::default(),
            boundary: Boundary::default(),
            connections: ConnectionLimits::default(),
            max_profiles_per_email: 100,
            notifications: Notifications::default(),
        }
    }
}

/// Who may connect and call: TLS (with its files reloaded on change) and access control.
/// The default, plaintext with self-declared callers, is for loopback listeners only; the
/// settings (`crate::config`) refuse it anywhere else.
#[derive(Clone)]
pub struct Boundary {
    /// TLS on the gRPC listener.
    pub tls: Option<Arc<ServerTls>>,
    /// How callers are identified and what they may do.
    pub access: AccessControl,
}

impl Default for Boundary {
    fn default() -> Self {
        Self {
            tls: None,
            access: AccessControl::self_declared(),
        }
    }
}

/// Limits on each connection, so that one caller cannot starve the rest.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Calls in progress at once on one connection.
    pub max_concurrent_streams: u32,
    /// Time between HTTP/2 pings on an idle connection (a dead peer is found and dropped).
    pub keepalive_interval: Duration,
    /// How long a ping may go unanswered before the connection is closed.
    pub keepalive_timeout: Duration,
    /// Age at which a connection is asked to go away (GOAWAY), so that clients reconnect and
    /// spread across replicas behind a load balancer.
    pub max_connection_age: Duration,
    /// How long calls in progress on such a connection may still take before it is closed.
    pub max_connection_age_grace: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 200,
            keepalive_interval: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(20),
            max_connection_age: Duration::from_secs(5 * 60),
            max_connection_age_grace: Duration::from_secs(5 * 60),
        }
    }
}

/// Where the server listens: the gRPC listener, and optionally one for health alone and one
/// for metrics.
pub struct Listeners {
    /// Every service, behind the gate (TLS when configured).
    pub grpc: TcpListener,
    /// `grpc.health.v1.Health` alone, in plaintext, for probes (`--health-listen`).
    pub health: Option<TcpListener>,
    /// `GET /metrics` (`--metrics-listen`), with the installed exporter.
    pub metrics: Option<(TcpListener, Exporter)>,
}

impl From<TcpListener> for Listeners {
    fn from(grpc: TcpListener) -> Self {
        Self {
            grpc,
            health: None,
            metrics: None,
        }
    }
}

/// How the server shuts down.
#[derive(Debug, Clone, Copy)]
pub struct ShutdownOptions {
    /// Between turning NOT_SERVING and closing the listener: long enough for load balancers
    /// polling health to stop sending new calls. Zero for a terminal session.
    pub drain_delay: Duration,
    /// The longest wait for calls in flight once the listener is closed.
    pub drain_timeout: Duration,
}

impl Default for ShutdownOptions {
    fn default() -> Self {
        Self {
            drain_delay: Duration::ZERO,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// Why the server stopped other than by being asked to.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The transport failed.
    #[error("the gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The reflection service refused the descriptor sets compiled into the binary.
    #[error("server reflection could not be set up: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The ledger cannot be served by this gateway (another serves its SQLite file).
    #[error("{0}")]
    Ledger(#[from] crate::store::LedgerError),
    /// The health listener failed.
    #[error("the health listener failed: {0}")]
    HealthListener(tonic::transport::Error),
    /// The HTTP client of notifications could not be built.
    #[error("notifications cannot be sent: {0}")]
    Notifier(String),
}

/// Serves the gateway, calling ACS through `acs` and recording opt-out requests in `ledger`, on
/// `listeners` until `shutdown` completes, then shuts down in order. The deliverer runs
/// alongside.
pub async fn serve(
    acs: Client,
    ledger: Ledger,
    listeners: impl Into<Listeners>,
    shutdown: impl Future<Output = ()>,
    options: ServerOptions,
) -> Result<(), ServeError> {
    let Listeners {
        grpc: listener,
        health: health_listener,
        metrics: metrics_listener,
    } = listeners.into();
    // One gateway per SQLite ledger: held by the deliverer, so until the last task that can
    // write has ended (which may be after this function returns, if the drain timed out).
    let exclusive = ledger.hold_exclusively()?;
    ledger.learn_known_profiles(&exclusive).await?;
    // Leases of notifications a killed gateway was delivering: on a SQLite ledger this one holds
    // alone, due again now rather than when they lapse.
    ledger.release_stale_notification_leases(&exclusive).await?;
    // The shutdown's phases, each a token: the root ends everything when this function returns,
    // however it returns (its drop guard, so an early `?` or error stops every task spawned
    // here too); each earlier phase is a child of the next one, so that cancelling a phase
    // ends every phase before it as well, and the order below cannot be broken by a phase
    // cancelled late or not at all.
    let root = CancellationToken::new();
    let _end_everything_on_return = root.clone().drop_guard();
    // The metrics listener: last, once the work it reports on has ended.
    let workers_done = root.child_token();
    // Stop accepting calls; the deliverer, reconciler and notifier finish what they are on.
    let draining = workers_done.child_token();
    // Shutdown begins: the health probe stops, and watches (health, change feed) end.
    let shutting_down = draining.child_token();
    // The work the drain waits for, once it has been asked to stop.
    let workers = TaskTracker::new();

    let reporter = HealthReporter::new();
    let health = GatewayHealth::new(reporter.clone()).await;
    tokio::spawn(health.clone().probe_while_refused(
        acs.clone(),
        options.health_probe_interval,
        shutting_down.clone(),
    ));
    let delivery = Arc::new(
        Delivery::new(ledger, acs.clone(), health.clone(), options.delivery).holding(exclusive),
    );
    workers.spawn(delivery.clone().run(draining.clone()));
    let notifier = Arc::new(
        Notifier::new(delivery.clone(), options.notifications.clone())
            .map_err(ServeError::Notifier)?,
    );
    workers.spawn(notifier.clone().run(draining.clone()));
    let metrics_server = metrics_listener.map(|(listener, exporter)| {
        let observed = (delivery.clone(), notifier.clone());
        let refresh: Refresh = Arc::new(move || {
            let (delivery, notifier) = observed.clone();
            Box::pin(async move {
                delivery.observe_pending().await;
                notifier.observe_pending().await;
            })
        });
        let stop = workers_done.clone();
        tokio::spawn(async move {
            if let Err(e) = telemetry::metrics::serve(listener, exporter, refresh, stop).await {
                tracing::error!(error = %e, "the metrics listener stopped");
            }
        })
    });
    let reconciler = Reconciler::new(delivery.clone(), &acs, options.reconcile);
    workers.spawn(reconciler.run(draining.clone()));
    // Every worker is spawned: the tracker is done once they have all ended.
    workers.close();

    // Every stream that would not end by itself (health and change-feed watches) ends once
    // shutdown begins.
    let api = CcpaApi::new(delivery.clone(), options.max_profiles_per_email)
        .ending_watches(shutting_down.clone());
    // The files of the boundary and of the recipients are watched for as long as this function
    // runs: a reload during the drain still applies to the calls in flight.
    if let Some(tls) = &options.boundary.tls {
        tokio::spawn(tls.watch(root.clone()));
    }
    if let Some(policy) = options.boundary.access.policy.clone() {
        let stop = root.clone();
        tokio::spawn(async move { policy.watch(stop).await });
    }
    if let Some(recipients) = options.notifications.recipients.clone() {
        tokio::spawn(recipients.watch(root.clone()));
    }
    let limits = options.connections;
    let tls = options.boundary.tls.clone();
    let gate = GateLayer::new(options.boundary.access.clone());
    let options = options.shutdown;
    let health_service = HealthServer::new(EndingWatches {
        inner: HealthService::from_health_reporter(reporter.clone()),
        end: shutting_down.clone(),
    })
    .max_decoding_message_size(MAX_REQUEST_BYTES)
    .max_encoding_message_size(MAX_RESPONSE_BYTES);

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?
        .max_decoding_message_size(MAX_REQUEST_BYTES)
        .max_encoding_message_size(MAX_RESPONSE_BYTES);
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?
        .max_decoding_message_size(MAX_REQUEST_BYTES)
        .max_encoding_message_size(MAX_RESPONSE_BYTES);

    // Made here, after the CLI installed the metrics recorder.
    let rpc = RpcLayer::new();
    if let Some(listener) = health_listener {
        // Probes only: any other service there is UNIMPLEMENTED (tonic's answer for a service
        // it does not route).
        let probes = with_limits(Server::builder(), &limits)
            .layer(rpc.clone())
            .add_service(health_service.clone())
            .serve_with_incoming_shutdown(
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                draining.clone().cancelled_owned(),
            );
        tokio::spawn(async move {
            if let Err(e) = probes.await {
                tracing::error!(error = %ServeError::HealthListener(e), "health listener stopped");
            }
        });
    }
    let incoming = crate::access::tls::incoming(listener, tls, draining.clone());
    let server = with_limits(Server::builder(), &limits)
        // Outside the gate, so that calls it refuses are counted and traced too.
        .layer(rpc)
        .layer(gate)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            CcpaServiceServer::new(api)
                .max_decoding_message_size(MAX_REQUEST_BYTES)
                .max_encoding_message_size(MAX_RESPONSE_BYTES),
        )
        .serve_with_incoming_shutdown(incoming, draining.clone().cancelled_owned());
    tokio::pin!(server);

    tokio::select! {
        result = &mut server => return result.map_err(ServeError::from),
        () = shutdown => {}
    }

    tracing::info!("shutting down: reporting NOT_SERVING");
    health.shutting_down().await;
    shutting_down.cancel();
    if !options.drain_delay.is_zero() {
        // Health checks keep being answered (NOT_SERVING) while balancers catch up.
        tokio::select! {
            result = &mut server => return result.map_err(ServeError::from),
            () = tokio::time::sleep(options.drain_delay) => {}
        }
    }

    tracing::info!("shutting down: draining calls in flight");
    draining.cancel();
    let drained = async {
        let served = (&mut server).await;
        // The deliverer finishes the batch it is on; what it leaves stays pending in the ledger.
        // The reconciler finishes the profile it is on. Notifications in flight are cut short
        // and their leases given back: they are sent again, by this gateway or another.
        workers.wait().await;
        // Work whose caller went away, and restores that reads started, run to their ends.
        delivery.detached_work_done().await;
        workers_done.cancel();
        if let Some(metrics_server) = metrics_server {
            let _ = metrics_server.await;
        }
        served
    };
    match tokio::time::timeout(options.drain_timeout, drained).await {
        Ok(result) => result.map_err(ServeError::from)?,
        Err(_) => tracing::warn!(
            timeout_s = options.drain_timeout.as_secs_f64(),
            "calls still in flight after the drain timeout; stopping anyway"
        ),
    }
    tracing::info!("shut down");
    Ok(())
}

fn with_limits(builder: Server, limits: &ConnectionLimits) -> Server {
    builder
        .max_concurrent_streams(limits.max_concurrent_streams)
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        .max_connection_age(limits.max_connection_age)
        .max_connection_age_grace(limits.max_connection_age_grace)
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
}

/// The health service, with one change: `Watch` streams end once shutdown has begun.
///
/// A watch stream never ends by itself, and the server's graceful shutdown waits for every
/// stream, so one health watcher would hold shutdown until the drain timeout. Each stream
/// instead sends NOT_SERVING and ends.
struct EndingWatches {
    inner: HealthService,
    end: CancellationToken,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for EndingWatches {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let updates = self.inner.watch(request).await?.into_inner();
        let end = self.end.clone().cancelled_owned();
        let last = futures::stream::once(async {
            Ok(HealthCheckResponse {
                status: tonic_health::pb::health_check_response::ServingStatus::NotServing as i32,
            })
        });
        let stream: WatchStream = Box::pin(updates.take_until(end).chain(last));
        Ok(Response::new(stream))
    }
}

#[cfg(test)]
mod tests {
    use tonic::server::NamedService;

    use super::*;

    #[test]
    fn the_contract_names_the_service_tonic_routes() {
        assert_eq!(
            CCPA_SERVICE_NAME,
            <CcpaServiceServer<CcpaApi> as NamedService>::NAME
        );
    }
}
