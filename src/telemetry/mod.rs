//! What the gateway tells its operators: logs, traces and metrics.
//!
//! - Logs go through `tracing`, on standard error (standard output carries command results).
//!   What is logged is chosen where it is logged: RPC name, gRPC code, latency, upstream HTTP
//!   status and failure reasons. Never an email, a name, a key, a token or a body.
//! - Traces: W3C trace context arriving with a call becomes the parent of the call's span
//!   ([`rpc`]), requests to ACS and IMS carry it onward (the client crate's `observe` module),
//!   JSON log lines carry `trace_id` and `span_id` ([`logs`]), and with an OTLP endpoint spans
//!   are exported.
//! - Metrics: Prometheus, on a port of their own ([`metrics`]).

pub mod logs;
pub mod metrics;
pub mod rpc;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_subscriber::filter::{EnvFilter, FilterExt as _, Targets, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

pub use logs::LogFormat;

/// The `service.name` spans are exported under.
pub const SERVICE_NAME: &str = "ccpa-gateway";

/// Whether and where spans go.
#[derive(Debug, Clone, Default)]
pub struct TraceSettings {
    /// Take W3C trace context from calls, send it on to ACS and IMS, and put trace ids in logs.
    pub trace_context: bool,
    /// Export spans over OTLP/gRPC to this collector, named by the setting it came from.
    pub otlp_endpoint: Option<(url::Url, &'static str)>,
}

/// Keeps the tracing pipeline alive; dropping it flushes the spans not yet exported.
#[must_use = "dropping the guard stops span export"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            tracing::warn!(error = %e, "spans could not all be exported at shutdown");
        }
    }
}

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built; the setting it came from is named.
    #[error("{setting}: {reason}")]
    Otlp {
        /// The flag or variable the endpoint came from.
        setting: &'static str,
        /// What went wrong.
        reason: String,
    },
}

/// Installs the global subscriber: logs filtered by `RUST_LOG` (default `info`), and, with
/// `traces.trace_context`, the OpenTelemetry layer and the W3C propagator. Call it inside the
/// tokio runtime: the OTLP exporter runs on it.
pub fn init(format: LogFormat, traces: &TraceSettings) -> Result<TelemetryGuard, TelemetryError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Events only: a log line carries its span's trace ids, not its fields, so formatting every
    // span's fields for the log layer would be work no line shows.
    let logs =
        logs::layer(format).with_filter(filter.and(filter_fn(|metadata| metadata.is_event())));
    if !traces.trace_context {
        // A second initialisation (only possible in tests) keeps the first subscriber.
        let _ = Registry::default().with(logs).try_init();
        return Ok(TelemetryGuard { provider: None });
    }
    let provider = tracer_provider(traces.otlp_endpoint.as_ref())?;
    let tracer = provider.tracer(SERVICE_NAME);
    // The gateway's spans and the ACS client's only, whatever RUST_LOG says: a span the log
    // filter hides must still carry the trace onward. Other crates' spans are not the
    // gateway's to export. Spans only, never log events: an event would travel as a span event
    // with all its fields, and logs are the place for those (they carry the trace's ids).
    let spans = Targets::new()
        .with_target("ccpa_gateway", tracing::Level::INFO)
        .with_target("acs_profile_client", tracing::Level::INFO)
        .and(filter_fn(|metadata| metadata.is_span()));
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_level(false)
        .with_threads(false)
        .with_location(false)
        .with_target(false)
        // Each poll of a call's future enters its span: timing every entry, or making the
        // context current on each, would be paid many times per call for nothing the gateway
        // reads (it asks a span for its context explicitly).
        .with_tracked_inactivity(false)
        .with_context_activation(false)
        .with_filter(spans);
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let _ = Registry::default().with(logs).with(otel).try_init();
    Ok(TelemetryGuard {
        provider: Some(provider),
    })
}

/// Spans are sampled as their caller sampled them. A trace the call starts is sampled when spans
/// are exported (the volume is one span per call and one per request to ACS), and not without an
/// exporter: its spans would be recorded for no one, and the `traceparent` sent onward would
/// claim that someone keeps them.
fn tracer_provider(
    endpoint: Option<&(url::Url, &'static str)>,
) -> Result<SdkTracerProvider, TelemetryError> {
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(SERVICE_NAME)
        .build();
    let builder = SdkTracerProvider::builder().with_resource(resource);
    let Some((endpoint, setting)) = endpoint else {
        // Spans get ids (for logs and propagation) and go nowhere.
        return Ok(builder
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOff)))
            .build());
    };
    let builder = builder.with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)));
    use opentelemetry_otlp::WithExportConfig as _;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint.as_str())
        .build()
        .map_err(|e| TelemetryError::Otlp {
            setting,
            reason: e.to_string(),
        })?;
    Ok(builder.with_batch_exporter(exporter).build())
}
