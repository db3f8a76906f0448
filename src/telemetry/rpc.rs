//! The RPC layer: a tower layer around every service of the gRPC listener (the gate, health
//! and reflection included) that counts and times each call under go-grpc-prometheus's names
//! and labels, and opens the call's server span, whose parent is the W3C trace context that
//! arrived with the call.
//!
//! A call's code is read where gRPC puts it: in the response headers of a trailers-only answer
//! (an error before any message), else in the trailers that end the body, which for a
//! streaming call is its final status. A call whose body is dropped before its trailers (the
//! client went away) counts as `Canceled`.
//!
//! Labels come from closed sets: the methods of the services compiled into the binary, and a
//! path that names none of them counts as `unknown`, so that no caller can add a label value.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};
use std::time::Instant;

use http_body::{Body, Frame, SizeHint};
use metrics::{Counter, Histogram, counter, histogram};
use opentelemetry_http::HeaderExtractor;
use pin_project_lite::pin_project;
use prost::Message as _;
use tonic::Code;
use tower::{Layer, Service};
use tracing::Span;
use tracing::instrument::Instrumented;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::metrics::{GRPC_HANDLED_TOTAL, GRPC_HANDLING_SECONDS, GRPC_STARTED_TOTAL};

/// One RPC method, as labelled.
#[derive(Debug)]
struct Method {
    service: String,
    method: String,
    /// go-grpc-prometheus's `grpc_type`.
    kind: &'static str,
    /// `service/method`, the span's name (the RPC semantic conventions).
    full_name: String,
}

/// Every method served, by path (`/package.Service/Method`).
fn methods() -> &'static HashMap<String, Method> {
    static METHODS: OnceLock<HashMap<String, Method>> = OnceLock::new();
    METHODS.get_or_init(|| {
        let mut methods = HashMap::new();
        for encoded in [
            crate::proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ] {
            // Compiled into the binary from descriptors that built: decoding cannot fail, and
            // if it did, that set's methods would count as unknown, nothing worse.
            let Ok(set) = prost_types::FileDescriptorSet::decode(encoded) else {
                continue;
            };
            for file in set.file {
                let package = file.package().to_owned();
                for service in file.service {
                    let service_name = match package.as_str() {
                        "" => service.name().to_owned(),
                        package => format!("{package}.{}", service.name()),
                    };
                    for method in service.method {
                        let kind = match (method.client_streaming(), method.server_streaming()) {
                            (false, false) => "unary",
                            (true, false) => "client_stream",
                            (false, true) => "server_stream",
                            (true, true) => "bidi_stream",
                        };
                        let path = format!("/{service_name}/{}", method.name());
                        methods.insert(
                            path,
                            Method {
                                service: service_name.clone(),
                                method: method.name().to_owned(),
                                kind,
                                full_name: format!("{service_name}/{}", method.name()),
                            },
                        );
                    }
                }
            }
        }
        methods
    })
}

static UNKNOWN: Method = Method {
    service: String::new(),
    method: String::new(),
    kind: "unary",
    full_name: String::new(),
};

impl Method {
    fn service_label(&self) -> &str {
        if self.service.is_empty() {
            "unknown"
        } else {
            &self.service
        }
    }

    fn method_label(&self) -> &str {
        if self.method.is_empty() {
            "unknown"
        } else {
            &self.method
        }
    }
}

/// A gRPC code as go-grpc-prometheus's dashboards spell it (Go's `codes.Code.String()`).
pub fn code_label(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// One method's metric handles, made once: a call then touches no registry.
struct MethodMetrics {
    method: &'static Method,
    started: Counter,
    handling: Histogram,
    /// By code, made at the first call that ends with it (no series for codes never seen).
    handled: [OnceLock<Counter>; 17],
}

impl MethodMetrics {
    fn new(method: &'static Method) -> Self {
        let labels = [
            ("grpc_type", method.kind.to_owned()),
            ("grpc_service", method.service_label().to_owned()),
            ("grpc_method", method.method_label().to_owned()),
        ];
        Self {
            method,
            started: counter!(GRPC_STARTED_TOTAL, &labels),
            handling: histogram!(GRPC_HANDLING_SECONDS, &labels),
            handled: std::array::from_fn(|_| OnceLock::new()),
        }
    }

    fn handled(&self, code: Code) -> &Counter {
        // `Code` has 17 values, 0 to 16; a value past them (none exists) would share the last.
        let index = (code as usize).min(self.handled.len() - 1);
        self.handled[index].get_or_init(|| {
            let method = self.method;
            counter!(
                GRPC_HANDLED_TOTAL,
                "grpc_type" => method.kind,
                "grpc_service" => method.service_label().to_owned(),
                "grpc_method" => method.method_label().to_owned(),
                "grpc_code" => code_label(code),
            )
        })
    }
}

/// The handles of every method, and of `unknown`.
struct Table {
    methods: HashMap<&'static str, Arc<MethodMetrics>>,
    unknown: Arc<MethodMetrics>,
}

/// The layer. Make it after the metrics recorder is installed: it takes its metric handles
/// from the recorder in place when it is made.
#[derive(Clone)]
pub struct RpcLayer {
    table: Arc<Table>,
}

impl RpcLayer {
    /// A layer counting into the installed recorder (none: counting nothing).
    pub fn new() -> Self {
        let methods = methods()
            .iter()
            .map(|(path, method)| (path.as_str(), Arc::new(MethodMetrics::new(method))))
            .collect();
        Self {
            table: Arc::new(Table {
                methods,
                unknown: Arc::new(MethodMetrics::new(&UNKNOWN)),
            }),
        }
    }
}

impl Default for RpcLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> Layer<S> for RpcLayer {
    type Service = Rpc<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Rpc {
            inner,
            table: self.table.clone(),
        }
    }
}

/// The layer around a service.
#[derive(Clone)]
pub struct Rpc<S> {
    inner: S,
    table: Arc<Table>,
}

impl<S, B, R> Service<http::Request<B>> for Rpc<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
{
    type Response = http::Response<MeteredBody<R>>;
    type Error = S::Error;
    type Future = RpcFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let metrics = self
            .table
            .methods
            .get(request.uri().path())
            .unwrap_or(&self.table.unknown)
            .clone();
        metrics.started.increment(1);
        let method = metrics.method;
        let span = tracing::info_span!(
            "RPC",
            otel.name = if method.full_name.is_empty() {
                "unknown"
            } else {
                method.full_name.as_str()
            },
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            rpc.system = "grpc",
            rpc.service = method.service_label(),
            rpc.method = method.method_label(),
            rpc.grpc.status_code = tracing::field::Empty,
        );
        if !span.is_disabled() {
            let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
                propagator.extract(&HeaderExtractor(request.headers()))
            });
            // Without a propagator, or without trace context on the call, the span starts a
            // trace.
            let _ = span.set_parent(parent);
        }
        let meter = CallMeter {
            metrics,
            started: Instant::now(),
            span: span.clone(),
            finished: false,
        };
        // What the service does as it is called (the gate, say) is inside the span too.
        let inner = span.in_scope(|| self.inner.call(request));
        RpcFuture {
            inner: tracing::Instrument::instrument(inner, span),
            meter: Some(meter),
        }
    }
}

/// Counts one call's end, once.
struct CallMeter {
    metrics: Arc<MethodMetrics>,
    started: Instant,
    span: Span,
    finished: bool,
}

impl CallMeter {
    fn finish(&mut self, code: Code) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        self.metrics.handled(code).increment(1);
        self.metrics
            .handling
            .record(self.started.elapsed().as_secs_f64());
        self.span.record("rpc.grpc.status_code", code as i32);
        // The server-side errors of the RPC conventions; a caller's mistake is not the
        // server's error.
        if matches!(
            code,
            Code::Unknown
                | Code::DeadlineExceeded
                | Code::Unimplemented
                | Code::Internal
                | Code::Unavailable
                | Code::DataLoss
        ) {
            self.span.record("otel.status_code", "ERROR");
        }
    }
}

impl Drop for CallMeter {
    fn drop(&mut self) {
        // The body went away before its trailers: the client cancelled, or the connection
        // broke.
        self.finish(Code::Cancelled);
    }
}

/// The code in `headers`, if `grpc-status` is there.
fn status_in(headers: &http::HeaderMap) -> Option<Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    Some(Code::from_i32(value.parse().ok()?))
}

pin_project! {
    /// The call's future; its response carries the meter in its body.
    pub struct RpcFuture<F> {
        #[pin]
        inner: Instrumented<F>,
        meter: Option<CallMeter>,
    }
}

impl<F, R, E> Future for RpcFuture<F>
where
    F: Future<Output = Result<http::Response<R>, E>>,
{
    type Output = Result<http::Response<MeteredBody<R>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let mut meter = this.meter.take();
        Poll::Ready(result.map(|response| {
            if let Some(code) = status_in(response.headers())
                && let Some(meter) = meter.as_mut()
            {
                // Trailers-only: the status is in the headers and the body is empty.
                meter.finish(code);
            }
            // A streaming handler runs as the body is polled, so the body enters the span; a
            // unary one has finished by now, and entering on each frame would be paid per call
            // for nothing.
            let span = meter
                .as_ref()
                .filter(|meter| meter.metrics.method.kind != "unary")
                .map_or_else(Span::none, |meter| meter.span.clone());
            response.map(|body| MeteredBody {
                inner: body,
                meter,
                span,
            })
        }))
        // An error here (the transport's) drops the meter: counted as Canceled.
    }
}

pin_project! {
    /// A response body that counts the call's end when its trailers pass.
    pub struct MeteredBody<B> {
        #[pin]
        inner: B,
        meter: Option<CallMeter>,
        span: Span,
    }
}

impl<B: Body> Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        // A streaming handler runs as its body is polled: inside the call's span.
        let _entered = this.span.enter();
        let frame = ready!(this.inner.poll_frame(cx));
        if let Some(meter) = this.meter.as_mut() {
            match &frame {
                Some(Ok(frame)) => {
                    if let Some(code) = frame.trailers_ref().and_then(status_in) {
                        meter.finish(code);
                    }
                }
                Some(Err(_)) => meter.finish(Code::Internal),
                // Ended without trailers: gRPC has no status for that.
                None => meter.finish(Code::Unknown),
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
