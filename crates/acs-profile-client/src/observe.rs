//! What the client tells the application about its requests, through the facades libraries are
//! meant to use, so that it costs nothing until the application installs something:
//!
//! - metrics through the `metrics` facade (no-ops until a recorder is installed);
//! - a client span per request (`tracing`; none in a trace that is not sampled), and W3C trace
//!   context sent onward in `traceparent` through the global OpenTelemetry propagator (nothing
//!   is sent until one is installed).
//!
//! Labels and span attributes name the operation and the route template, never the URL: a
//! profile's key is in its URL, and an email in a lookup's query.
//!
//! | metric | labels | meaning |
//! |---|---|---|
//! | `ccpa_acs_requests_total` | `operation`, `outcome` | requests to ACS, by operation (`get`, `patch`, `post`, `by_email`) and outcome (`2xx`..`5xx`, `timeout`, `connect_error`, `io_error`) |
//! | `ccpa_acs_request_duration_seconds` | `operation` | time from sending a request to its answer's head |
//! | `ccpa_acs_retries_total` | `operation` | requests repeated by the retry rules (a token refresh included) |
//! | `ccpa_acs_throttle_waiting` | | calls waiting for their turn at the client-side throttle |
//! | `ccpa_acs_in_flight` | | requests sent and not yet answered |
//! | `ccpa_ims_token_requests_total` | `outcome` | token requests to IMS: `ok`, `refused` (credentials), `unavailable` |

use std::cell::Cell;
use std::time::Instant;

use metrics::{counter, gauge, histogram};
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_http::HeaderInjector;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Requests sent to ACS.
pub const ACS_REQUESTS_TOTAL: &str = "ccpa_acs_requests_total";
/// Time from sending a request to ACS to its answer's head.
pub const ACS_REQUEST_DURATION_SECONDS: &str = "ccpa_acs_request_duration_seconds";
/// Requests repeated by the retry rules.
pub const ACS_RETRIES_TOTAL: &str = "ccpa_acs_retries_total";
/// Calls waiting at the client-side throttle.
pub const ACS_THROTTLE_WAITING: &str = "ccpa_acs_throttle_waiting";
/// Requests to ACS in progress.
pub const ACS_IN_FLIGHT: &str = "ccpa_acs_in_flight";
/// Token requests to IMS.
pub const IMS_TOKEN_REQUESTS_TOTAL: &str = "ccpa_ims_token_requests_total";

/// One ACS operation as it is labelled and traced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Operation {
    /// The `operation` label.
    pub(crate) label: &'static str,
    /// The span's name: the method and the route template (the HTTP semantic conventions).
    span_name: &'static str,
    method: &'static str,
    route: &'static str,
}

const PROFILE_ROUTE: &str = "/{tenant}/campaign/profileAndServices/profile/{PKey}";
const PROFILES_ROUTE: &str = "/{tenant}/campaign/profileAndServices/profile";
const BY_EMAIL_ROUTE: &str = "/{tenant}/campaign/profileAndServices/profile/byEmail";

impl Operation {
    /// The operation of a progenitor operation id (or of the page follower's).
    pub(crate) fn of(operation_id: &str) -> Self {
        match operation_id {
            "get_profile" => Self {
                label: "get",
                span_name: "GET /{tenant}/campaign/profileAndServices/profile/{PKey}",
                method: "GET",
                route: PROFILE_ROUTE,
            },
            "update_profile" => Self {
                label: "patch",
                span_name: "PATCH /{tenant}/campaign/profileAndServices/profile/{PKey}",
                method: "PATCH",
                route: PROFILE_ROUTE,
            },
            "create_profile" => Self {
                label: "post",
                span_name: "POST /{tenant}/campaign/profileAndServices/profile",
                method: "POST",
                route: PROFILES_ROUTE,
            },
            "list_profiles_by_email" | crate::pages::NEXT_PAGE_OPERATION => Self {
                label: "by_email",
                span_name: "GET /{tenant}/campaign/profileAndServices/profile/byEmail",
                method: "GET",
                route: BY_EMAIL_ROUTE,
            },
            // Every operation in the spec is listed above; a new one shows up as `other` until
            // it is named here.
            _ => Self {
                label: "other",
                span_name: "ACS request",
                method: "_OTHER",
                route: "",
            },
        }
    }
}

tokio::task_local! {
    /// The operation of the latest request of the call running in this task, so that the retry
    /// rules (which see only results) can label the retry they make.
    static LATEST_OPERATION: Cell<Option<&'static str>>;
}

/// Runs one call's attempts with room to note the operation of each request.
///
/// Not an `async fn`: that would hold `call` twice, as its argument and as the future it awaits,
/// and `call` is most of the state of a call waiting for its turn at the throttle (thousands of
/// them at once when ACS is slow).
pub(crate) fn within_call<F: Future>(call: F) -> impl Future<Output = F::Output> {
    LATEST_OPERATION.scope(Cell::new(None), call)
}

/// Counts a retry of the call running in this task.
pub(crate) fn count_retry() {
    let operation = LATEST_OPERATION
        .try_with(Cell::get)
        .ok()
        .flatten()
        .unwrap_or("other");
    counter!(ACS_RETRIES_TOTAL, "operation" => operation).increment(1);
}

/// The client span of one request, and the trace context it sends onward.
///
/// In a trace that is not sampled (no one records its spans), the request gets no span of its
/// own: it sends the call's context onward, and the work of a span no one keeps is saved on
/// every request.
pub(crate) fn request_span(operation: Operation, request: &mut reqwest::Request) -> Span {
    let call = Span::current().context();
    let unsampled = {
        let span = call.span();
        span.span_context().is_valid() && !span.span_context().is_sampled()
    };
    if unsampled {
        inject_context(&call, request.headers_mut());
        return Span::none();
    }
    let span = tracing::info_span!(
        "ACS request",
        otel.name = operation.span_name,
        otel.kind = "client",
        http.request.method = operation.method,
        url.template = operation.route,
        server.address = request.url().host_str().unwrap_or_default(),
        http.response.status_code = tracing::field::Empty,
        error.r#type = tracing::field::Empty,
    );
    inject_trace_context(&span, request.headers_mut());
    span
}

/// Puts `span`'s trace context in `headers` (`traceparent`, `tracestate`) through the global
/// propagator.
pub(crate) fn inject_trace_context(span: &Span, headers: &mut http::HeaderMap) {
    inject_context(&span.context(), headers);
}

fn inject_context(context: &opentelemetry::Context, headers: &mut http::HeaderMap) {
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(context, &mut HeaderInjector(headers));
    });
}

/// Measures one request from sending to its answer's head. Dropped before [`Self::answered`]
/// or [`Self::failed`] (the call's deadline passed), it counts a timeout.
pub(crate) struct RequestMeter {
    operation: Operation,
    started: Instant,
    span: Span,
    done: bool,
}

impl RequestMeter {
    pub(crate) fn start(operation: Operation, span: Span) -> Self {
        let _ = LATEST_OPERATION.try_with(|latest| latest.set(Some(operation.label)));
        gauge!(ACS_IN_FLIGHT).increment(1.0);
        Self {
            operation,
            started: Instant::now(),
            span,
            done: false,
        }
    }

    /// ACS (or something in the way) answered with `status`.
    pub(crate) fn answered(mut self, status: http::StatusCode) {
        self.span
            .record("http.response.status_code", status.as_u16());
        if status.is_client_error() || status.is_server_error() {
            self.span.record("error.type", status.as_str());
        }
        let class = match status.as_u16() {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.finish(class);
    }

    /// The request failed without an answer.
    pub(crate) fn failed(mut self, error: &reqwest::Error) {
        let outcome = if error.is_timeout() {
            "timeout"
        } else if error.is_connect() {
            "connect_error"
        } else {
            "io_error"
        };
        self.span.record("error.type", outcome);
        self.finish(outcome);
    }

    fn finish(&mut self, outcome: &'static str) {
        self.done = true;
        let label = self.operation.label;
        counter!(ACS_REQUESTS_TOTAL, "operation" => label, "outcome" => outcome).increment(1);
        histogram!(ACS_REQUEST_DURATION_SECONDS, "operation" => label)
            .record(self.started.elapsed().as_secs_f64());
        gauge!(ACS_IN_FLIGHT).decrement(1.0);
    }
}

impl Drop for RequestMeter {
    fn drop(&mut self) {
        if !self.done {
            self.span.record("error.type", "timeout");
            self.finish("timeout");
        }
    }
}

/// Counts a token request to IMS by its outcome.
pub(crate) fn count_token_request(outcome: &'static str) {
    counter!(IMS_TOKEN_REQUESTS_TOTAL, "outcome" => outcome).increment(1);
}

/// A call waiting at the throttle, counted while it waits.
pub(crate) struct ThrottleWait(());

impl ThrottleWait {
    pub(crate) fn begin() -> Self {
        gauge!(ACS_THROTTLE_WAITING).increment(1.0);
        Self(())
    }
}

impl Drop for ThrottleWait {
    fn drop(&mut self) {
        gauge!(ACS_THROTTLE_WAITING).decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::Operation;

    #[test]
    fn every_operation_of_the_spec_has_a_label_and_a_route_template() {
        for (id, label) in [
            ("get_profile", "get"),
            ("update_profile", "patch"),
            ("create_profile", "post"),
            ("list_profiles_by_email", "by_email"),
            (crate::pages::NEXT_PAGE_OPERATION, "by_email"),
        ] {
            let operation = Operation::of(id);
            assert_eq!(operation.label, label, "{id}");
            assert_eq!(
                operation.span_name,
                format!("{} {}", operation.method, operation.route),
                "{id}"
            );
        }
    }
}
