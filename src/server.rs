//! The gRPC server: the CCPA service, `grpc.health.v1` (see [`crate::health`]), server
//! reflection, and an orderly shutdown.
//!
//! Shutdown runs in this order: both readiness entries (`""` and `ccpa.v1.CcpaService`) turn
//! NOT_SERVING and health watchers are told so; after `drain_delay` (time for load balancers to
//! notice) the listener closes; calls in flight finish, bounded by `drain_timeout`; then
//! [`serve`] returns.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};

use acs_profile_client::Client;

use crate::api::CcpaApi;
use crate::health::GatewayHealth;
use crate::ledger::Ledger;
use crate::ledger::delivery::{Delivery, DeliverySettings};
use crate::proto::ccpa_v1::ccpa_service_server::CcpaServiceServer;

/// The name health checks use for the CCPA service: `ccpa.v1.CcpaService`.
pub const CCPA_SERVICE_NAME: &str = <CcpaServiceServer<CcpaApi> as NamedService>::NAME;

/// How the server runs and shuts down.
#[derive(Debug, Clone, Copy)]
pub struct ServerOptions {
    /// How often ACS is probed while it refuses the gateway's credentials.
    pub health_probe_interval: Duration,
    /// The shutdown sequence.
    pub shutdown: ShutdownOptions,
    /// How recorded requests are delivered.
    pub delivery: DeliverySettings,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            health_probe_interval: Duration::from_secs(10),
            shutdown: ShutdownOptions::default(),
            delivery: DeliverySettings::default(),
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
    Ledger(#[from] crate::ledger::LedgerError),
}

/// Serves the gateway, calling ACS through `acs` and recording opt-out requests in `ledger`, on
/// `listener` until `shutdown` completes, then shuts down in order. The deliverer runs alongside.
pub async fn serve(
    acs: Client,
    ledger: Ledger,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    options: ServerOptions,
) -> Result<(), ServeError> {
    // Held until the server returns: one gateway per SQLite ledger.
    let _exclusive = ledger.hold_exclusively()?;
    let reporter = HealthReporter::new();
    let health = GatewayHealth::new(reporter.clone()).await;
    let stop_probing = CancellationToken::new();
    let _stop_probing_on_return = stop_probing.clone().drop_guard();
    tokio::spawn(health.clone().probe_while_refused(
        acs.clone(),
        options.health_probe_interval,
        stop_probing.clone(),
    ));
    let delivery = Arc::new(Delivery::new(
        ledger,
        acs.clone(),
        health.clone(),
        options.delivery,
    ));
    let stop_delivering = CancellationToken::new();
    let _stop_delivering_on_return = stop_delivering.clone().drop_guard();
    let deliverer = tokio::spawn(delivery.clone().run(stop_delivering.clone()));
    let api = CcpaApi::new(acs, health.clone(), delivery);
    let options = options.shutdown;
    let watches_end = CancellationToken::new();
    let health_service = HealthServer::new(EndingWatches {
        inner: HealthService::from_health_reporter(reporter.clone()),
        end: watches_end.clone(),
    });

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let stop_accepting = CancellationToken::new();
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let server = Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(CcpaServiceServer::new(api))
        .serve_with_incoming_shutdown(incoming, stop_accepting.clone().cancelled_owned());
    tokio::pin!(server);

    tokio::select! {
        result = &mut server => return result.map_err(ServeError::from),
        () = shutdown => {}
    }

    tracing::info!("shutting down: reporting NOT_SERVING");
    health.shutting_down().await;
    stop_probing.cancel();
    watches_end.cancel();
    if !options.drain_delay.is_zero() {
        // Health checks keep being answered (NOT_SERVING) while balancers catch up.
        tokio::select! {
            result = &mut server => return result.map_err(ServeError::from),
            () = tokio::time::sleep(options.drain_delay) => {}
        }
    }

    tracing::info!("shutting down: draining calls in flight");
    stop_accepting.cancel();
    stop_delivering.cancel();
    let drained = async {
        let served = (&mut server).await;
        // The deliverer finishes the batch it is on; what it leaves stays pending in the ledger.
        let _ = deliverer.await;
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
