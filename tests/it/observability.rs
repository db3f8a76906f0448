//! What operators see: Prometheus metrics scraped from a `ccpa-gateway serve` process after
//! known calls, W3C trace context from a caller through the gateway to the emulator, spans
//! exported to an OTLP collector running in the test, and no personal data in any of it.

use crate::common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use acs_emulator::{Emulator, EmulatorConfig, FaultSettings, NewProfile};
use ccpa_gateway::proto::ccpa_v1::ccpa_service_client::CcpaServiceClient;
use ccpa_gateway::proto::ccpa_v1::{
    BulkSetOptOutRequest, CreateProfileRequest, GetOptOutRequest, RequestSource, SetOptOutRequest,
};
use common::{QUICK_DELIVERY_ARGS, bulk, eventually_within, set, until_settled};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use tonic::transport::Channel;

/// The samples of a Prometheus text exposition, by series: `name` and its labels, sorted.
#[derive(Debug)]
struct Scrape {
    text: String,
    samples: BTreeMap<String, f64>,
}

impl Scrape {
    async fn of(url: &str) -> Self {
        let response = reqwest::get(url).await.unwrap();
        assert_eq!(response.status(), 200);
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/plain; version=0.0.4")
        );
        let text = response.text().await.unwrap();
        let samples = text
            .lines()
            .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
            .map(|line| {
                let (series, value) = line.rsplit_once(' ').unwrap();
                (normalise(series), value.parse::<f64>().unwrap())
            })
            .collect();
        Self { text, samples }
    }

    /// The value of `name{labels}`, 0 when the series does not exist (yet).
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut labels = labels.to_vec();
        labels.sort();
        let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        let series = if labels.is_empty() {
            name.to_owned()
        } else {
            format!("{name}{{{}}}", labels.join(","))
        };
        self.samples.get(&series).copied().unwrap_or(0.0)
    }
}

/// A series with its labels sorted, so that it compares whatever order they were written in.
fn normalise(series: &str) -> String {
    let Some((name, labels)) = series.split_once('{') else {
        return series.to_owned();
    };
    let mut labels: Vec<&str> = labels.trim_end_matches('}').split("\",").collect();
    for label in &mut labels {
        *label = label.strip_suffix('"').unwrap_or(label);
    }
    labels.sort();
    let labels: Vec<String> = labels.iter().map(|l| format!("{l}\"")).collect();
    format!("{name}{{{}}}", labels.join(","))
}

fn rpc<'a>(kind: &'a str, service: &'a str, method: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("grpc_type", kind),
        ("grpc_service", service),
        ("grpc_method", method),
    ]
}

fn handled<'a>(
    kind: &'a str,
    service: &'a str,
    method: &'a str,
    code: &'a str,
) -> Vec<(&'a str, &'a str)> {
    let mut labels = rpc(kind, service, method);
    labels.push(("grpc_code", code));
    labels
}

const CCPA: &str = "ccpa.v1.CcpaService";

fn at(time: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(time)
}

/// A gRPC call made by hand over HTTP/2, to see the response's headers as the wire carries
/// them: an error answered before any message is trailers-only (`grpc-status` in the headers).
async fn raw_call(addr: std::net::SocketAddr, path: &str) -> reqwest::Response {
    let http2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    http2
        .post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        // One empty message: every field at its default.
        .body(vec![0u8, 0, 0, 0, 0])
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn rpc_metrics_count_each_call_by_method_and_code_with_trailers_only_errors_and_streams() {
    let emulator = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let pkey = emulator.insert_profile(NewProfile::default());
    let mut args = vec!["--metrics-listen", "127.0.0.1:0"];
    args.extend_from_slice(QUICK_DELIVERY_ARGS);
    let gw = common::gateway().args(&args).spawn(Some(&emulator)).await;
    let url = gw.metrics_url().await;
    let mut client = gw.client.clone();

    // The endpoint answers /metrics only.
    let other = reqwest::get(url.replace("/metrics", "/other"))
        .await
        .unwrap();
    assert_eq!(other.status(), 404);

    let before = Scrape::of(&url).await;
    let scraped_before = std::time::Instant::now();
    for _ in 0..2 {
        common::opt_out_of(&mut client, &pkey).await;
    }
    let missing = client
        .get_opt_out(GetOptOutRequest {
            pkey: "@no-such-profile".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    client.set_opt_out(set(&pkey, true, "")).await.unwrap();
    // An empty GetOptOut: INVALID_ARGUMENT, answered trailers-only.
    let invalid = raw_call(gw.addr, "/ccpa.v1.CcpaService/GetOptOut").await;
    assert_eq!(invalid.headers()["grpc-status"], "3", "{invalid:?}");
    // A method no service has: counted under `unknown`, never under the caller's words.
    let unknown = raw_call(gw.addr, "/ccpa.v1.CcpaService/SellEverything").await;
    assert_eq!(unknown.headers()["grpc-status"], "12", "{unknown:?}");
    let answers = bulk(
        &mut client,
        vec![
            BulkSetOptOutRequest {
                item: Some(set(&pkey, false, "")),
                ..Default::default()
            },
            BulkSetOptOutRequest {
                item: Some(set(&pkey, true, "")),
                ..Default::default()
            },
            BulkSetOptOutRequest {
                item: Some(SetOptOutRequest::default()),
                ..Default::default()
            },
        ],
    )
    .await;
    assert_eq!(answers.len(), 3);
    let mut health = tonic_health::pb::health_client::HealthClient::new(gw.channel.clone());
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: CCPA.into(),
        })
        .await
        .unwrap();
    until_settled(&mut client).await;

    let after = Scrape::of(&url).await;
    let increase = |name: &str, labels: &[(&str, &str)]| {
        after.value(name, labels) - before.value(name, labels)
    };
    let started = "grpc_server_started_total";
    let done = "grpc_server_handled_total";
    // Three GetOptOuts by the client, one by hand; none other (the scrapes are not RPCs).
    assert_eq!(increase(started, &rpc("unary", CCPA, "GetOptOut")), 4.0);
    assert_eq!(
        increase(done, &handled("unary", CCPA, "GetOptOut", "OK")),
        2.0
    );
    assert_eq!(
        increase(done, &handled("unary", CCPA, "GetOptOut", "NotFound")),
        1.0
    );
    assert_eq!(
        increase(
            done,
            &handled("unary", CCPA, "GetOptOut", "InvalidArgument")
        ),
        1.0
    );
    assert_eq!(
        increase(done, &handled("unary", CCPA, "SetOptOut", "OK")),
        1.0
    );
    assert_eq!(
        increase(
            done,
            &handled("unary", "unknown", "unknown", "Unimplemented")
        ),
        1.0
    );
    assert!(!after.text.contains("SellEverything"));
    // The stream's final status, and its items by outcome.
    assert_eq!(
        increase(done, &handled("bidi_stream", CCPA, "BulkSetOptOut", "OK")),
        1.0
    );
    assert_eq!(increase("ccpa_bulk_items_total", &[("outcome", "OK")]), 2.0);
    assert_eq!(
        increase("ccpa_bulk_items_total", &[("outcome", "InvalidArgument")]),
        1.0
    );
    // Health is counted like any service.
    assert_eq!(
        increase(
            done,
            &handled("unary", "grpc.health.v1.Health", "Check", "OK")
        ),
        1.0
    );
    assert_eq!(
        increase(
            "grpc_server_handling_seconds_count",
            &rpc("unary", CCPA, "GetOptOut")
        ),
        4.0
    );
    // go-grpc-prometheus's buckets.
    assert!(after.samples.contains_key(&normalise(
        "grpc_server_handling_seconds_bucket{grpc_type=\"unary\",grpc_service=\"ccpa.v1.CcpaService\",grpc_method=\"GetOptOut\",le=\"0.005\"}"
    )));
    // Toward ACS: every request the emulator received, counted under its operation.
    let received = |method: &str| {
        emulator
            .requests()
            .iter()
            .filter(|r| r.method == method && r.received_at > scraped_before)
            .count() as f64
    };
    let counted = |operation: &str| {
        ["2xx", "4xx", "5xx"]
            .iter()
            .map(|class| {
                increase(
                    "ccpa_acs_requests_total",
                    &[("operation", operation), ("outcome", class)],
                )
            })
            .sum::<f64>()
    };
    assert!(received("GET") >= 3.0);
    assert_eq!(counted("get"), received("GET"));
    assert_eq!(counted("patch"), received("PATCH"));
    assert_eq!(
        increase(
            "ccpa_acs_request_duration_seconds_count",
            &[("operation", "patch")]
        ),
        received("PATCH")
    );
    assert_eq!(after.value("ccpa_acs_in_flight", &[]), 0.0);
    assert_eq!(after.value("ccpa_acs_throttle_waiting", &[]), 0.0);
    for service in ["", CCPA, "liveness", "ccpa.v1.OptOutDelivery"] {
        assert_eq!(
            after.value("ccpa_health_serving", &[("service", service)]),
            1.0,
            "{service:?}"
        );
    }
    assert!(after.value("ccpa_ledger_commit_seconds_count", &[]) >= 1.0);
    assert!(after.value("process_resident_memory_bytes", &[]) > 0.0);
    assert!(after.value("process_open_fds", &[]) > 0.0);
    assert!(after.text.contains("process_cpu_seconds_total"));
}

#[tokio::test]
async fn ledger_gauges_show_pending_and_overdue_requests_and_time_to_honor_is_measured() {
    let emulator = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let old = emulator.insert_profile(NewProfile::default());
    let fresh = emulator.insert_profile(NewProfile::default());
    let mut args = vec!["--metrics-listen", "127.0.0.1:0"];
    args.extend_from_slice(QUICK_DELIVERY_ARGS);
    let gw = common::gateway().args(&args).spawn(Some(&emulator)).await;
    let url = gw.metrics_url().await;
    let mut client = gw.client.clone();

    // ACS answers nothing but 503: what is recorded stays pending.
    emulator.set_faults(FaultSettings {
        unavailable: 1.0,
        ..Default::default()
    });
    let thirty_days_ago = SystemTime::now() - Duration::from_secs(30 * 86_400);
    let mut overdue = set(&old, true, "");
    overdue.received_at = Some(at(thirty_days_ago));
    let _ = client.set_opt_out(overdue).await;
    let _ = client.set_opt_out(set(&fresh, true, "")).await;

    let scrape = Scrape::of(&url).await;
    assert_eq!(scrape.value("ccpa_ledger_pending_requests", &[]), 2.0);
    assert_eq!(scrape.value("ccpa_ledger_overdue_requests", &[]), 1.0);
    let age = scrape.value("ccpa_ledger_oldest_pending_age_seconds", &[]);
    assert!(
        (30.0 * 86_400.0..31.0 * 86_400.0).contains(&age),
        "oldest pending age {age}"
    );
    assert!(
        scrape.value(
            "ccpa_acs_requests_total",
            &[("operation", "patch"), ("outcome", "5xx")]
        ) >= 1.0
    );
    assert_eq!(
        scrape.value("ccpa_opt_out_time_to_honor_seconds_count", &[]),
        0.0
    );

    // ACS recovers: both are delivered, each measured from its received_at; a creation with
    // an opt-out is honoured as it is made.
    emulator.set_faults(FaultSettings::default());
    until_settled(&mut client).await;
    client
        .create_profile(CreateProfileRequest {
            email: "someone@example.com".into(),
            ccpa_opt_out: Some(true),
            source: RequestSource::WebForm as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    let scrape = Scrape::of(&url).await;
    assert_eq!(scrape.value("ccpa_ledger_pending_requests", &[]), 0.0);
    assert_eq!(scrape.value("ccpa_ledger_overdue_requests", &[]), 0.0);
    assert_eq!(
        scrape.value("ccpa_ledger_oldest_pending_age_seconds", &[]),
        0.0
    );
    assert_eq!(
        scrape.value("ccpa_ledger_requests_total", &[("state", "APPLIED")]),
        3.0
    );
    let bucket =
        |le: &str| scrape.value("ccpa_opt_out_time_to_honor_seconds_bucket", &[("le", le)]);
    assert_eq!(
        scrape.value("ccpa_opt_out_time_to_honor_seconds_count", &[]),
        3.0
    );
    // The fresh ones within a minute; the old one past fifteen days, in +Inf only.
    assert_eq!(bucket("60"), 2.0);
    assert_eq!(bucket("1296000"), 2.0);
    assert_eq!(bucket("+Inf"), 3.0);
    assert!(scrape.value("ccpa_opt_out_time_to_honor_seconds_sum", &[]) >= 30.0 * 86_400.0);
}

/// An OTLP/gRPC collector: keeps every span it is sent.
#[derive(Clone, Default)]
struct Collector {
    received: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.received.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    async fn start(self) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(self))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        addr
    }

    fn spans(&self) -> Vec<Span> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .flat_map(|export| &export.resource_spans)
            .flat_map(|resource| &resource.scope_spans)
            .flat_map(|scope| scope.spans.clone())
            .collect()
    }

    /// Waits until a span satisfies `wanted`; the bound only fails a broken exporter.
    async fn until(&self, wanted: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let what = "the collector to receive the spans wanted";
        eventually_within(Duration::from_secs(30), what, || {
            let spans = self.spans();
            std::future::ready(if wanted(&spans) {
                Ok(spans)
            } else {
                Err(spans)
            })
        })
        .await
    }
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
        .map(|value| match value {
            Value::StringValue(s) => s.clone(),
            Value::IntValue(i) => i.to_string(),
            other => format!("{other:?}"),
        })
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN_ID: &str = "00f067aa0ba902b7";

fn with_traceparent<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{CALLER_SPAN_ID}-01")
            .parse()
            .unwrap(),
    );
    request
        .metadata_mut()
        .insert("tracestate", "vendor=opaque".parse().unwrap());
    request
}

/// GetOptOut by key in the caller's trace ([`with_traceparent`]); it must succeed.
async fn read_in_trace(
    client: &mut CcpaServiceClient<Channel>,
    pkey: &str,
) -> ccpa_gateway::proto::ccpa_v1::GetOptOutResponse {
    client
        .get_opt_out(with_traceparent(GetOptOutRequest {
            pkey: pkey.into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn trace_context_goes_from_the_caller_through_the_gateway_to_acs_and_the_collector_without_personal_data()
 {
    const CANARY_EMAIL: &str = "canary.7f3a9c@example.com";
    const CANARY_REQUEST_ID: &str = "request-canary-5e1d";
    let emulator = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let collector = Collector::default();
    let collector_addr = collector.clone().start().await;
    let endpoint = format!("http://{collector_addr}");
    let mut args = vec![
        "--metrics-listen",
        "127.0.0.1:0",
        "--otlp-endpoint",
        &endpoint,
    ];
    args.extend_from_slice(QUICK_DELIVERY_ARGS);
    let gw = common::gateway()
        .args(&args)
        // Spans are sent every 100 ms instead of every 5 s.
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .log_filter("info")
        .spawn(Some(&emulator))
        .await;
    let url = gw.metrics_url().await;
    let mut client = gw.client.clone();

    // A profile made through the gateway with the canary address, then opted out by key and by
    // address, and read.
    let created = client
        .create_profile(with_traceparent(CreateProfileRequest {
            email: CANARY_EMAIL.into(),
            first_name: "Canary".into(),
            last_name: "Sentinel".into(),
            ccpa_opt_out: Some(false),
            source: RequestSource::WebForm as i32,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let pkey = created.profile.unwrap().pkey;
    assert!(!pkey.is_empty());
    client
        .set_opt_out(with_traceparent(SetOptOutRequest {
            request_id: CANARY_REQUEST_ID.into(),
            ..set(&pkey, true, "")
        }))
        .await
        .unwrap();
    client
        .set_opt_out(with_traceparent(SetOptOutRequest {
            email: CANARY_EMAIL.into(),
            ccpa_opt_out: Some(true),
            source: RequestSource::Email as i32,
            ..Default::default()
        }))
        .await
        .unwrap();
    read_in_trace(&mut client, &pkey).await;

    // Another system opts the consumer back in; the next read meets the drift and restores the
    // opt-out (logged at error level with the request ids: in logs, never in spans).
    assert!(emulator.change_behind_the_gateway(&pkey, false));
    let read = read_in_trace(&mut client, &pkey).await;
    assert!(read.ccpa_opt_out);
    let restore_line: serde_json::Value =
        serde_json::from_str(&gw.log_line(&["reverted", "restores_request_id"]).await).unwrap();
    let restore_ids = [
        restore_line["request_id"].as_str().unwrap().to_owned(),
        restore_line["restores_request_id"]
            .as_str()
            .unwrap()
            .to_owned(),
    ];
    until_settled(&mut client).await;

    // The emulator saw the caller's trace, each request from a span of the gateway's own.
    let requests = emulator.requests();
    let patch = requests
        .iter()
        .find(|r| {
            r.method == "PATCH"
                && r.header("traceparent")
                    .is_some_and(|t| t.starts_with(&format!("00-{TRACE_ID}-")))
        })
        .expect("the caller's opt-out reached ACS in the caller's trace");
    let traceparent = patch
        .header("traceparent")
        .expect("traceparent sent to ACS");
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    assert_eq!(parts[1], TRACE_ID);
    assert_ne!(
        parts[2], CALLER_SPAN_ID,
        "the ACS request is a span of its own"
    );
    assert_eq!(parts[3], "01");

    // The collector has the RPC's server span, child of the caller's, and its ACS client spans.
    let spans = collector
        .until(|spans| {
            spans
                .iter()
                .any(|s| s.name == "ccpa.v1.CcpaService/GetOptOut")
                && spans
                    .iter()
                    .any(|s| s.kind == SpanKind::Client as i32 && s.name.starts_with("PATCH "))
        })
        .await;
    let set_rpc = spans
        .iter()
        .find(|s| s.name == "ccpa.v1.CcpaService/SetOptOut" && hex(&s.trace_id) == TRACE_ID)
        .expect("the SetOptOut span");
    assert_eq!(set_rpc.kind, SpanKind::Server as i32);
    assert_eq!(hex(&set_rpc.parent_span_id), CALLER_SPAN_ID);
    assert_eq!(attribute(set_rpc, "rpc.system").as_deref(), Some("grpc"));
    assert_eq!(attribute(set_rpc, "rpc.service").as_deref(), Some(CCPA));
    assert_eq!(
        attribute(set_rpc, "rpc.method").as_deref(),
        Some("SetOptOut")
    );
    assert_eq!(
        attribute(set_rpc, "rpc.grpc.status_code").as_deref(),
        Some("0")
    );
    let children: Vec<&Span> = spans
        .iter()
        .filter(|s| s.parent_span_id == set_rpc.span_id && s.kind == SpanKind::Client as i32)
        .collect();
    let patch_span = children
        .iter()
        .find(|s| s.name == "PATCH /{tenant}/campaign/profileAndServices/profile/{PKey}")
        .unwrap_or_else(|| panic!("no PATCH child of the SetOptOut span: {children:#?}"));
    assert_eq!(hex(&patch_span.trace_id), TRACE_ID);
    assert_eq!(
        attribute(patch_span, "url.template").as_deref(),
        Some("/{tenant}/campaign/profileAndServices/profile/{PKey}")
    );
    assert_eq!(
        attribute(patch_span, "http.request.method").as_deref(),
        Some("PATCH")
    );
    assert_eq!(
        attribute(patch_span, "http.response.status_code").as_deref(),
        Some("200")
    );
    // The span id ACS was sent is that of an exported PATCH span.
    assert!(
        spans.iter().any(|s| s.kind == SpanKind::Client as i32
            && s.name.starts_with("PATCH ")
            && hex(&s.span_id) == parts[2]),
        "no exported span has the id sent to ACS ({traceparent})"
    );
    // The resource names the service.
    let exports = collector.received.lock().unwrap().clone();
    let service_names: Vec<String> = exports
        .iter()
        .flat_map(|e| &e.resource_spans)
        .filter_map(|r| r.resource.as_ref())
        .flat_map(|r| &r.attributes)
        .filter(|kv| kv.key == "service.name")
        .map(|kv| format!("{:?}", kv.value))
        .collect();
    assert!(!service_names.is_empty());
    assert!(
        service_names.iter().all(|n| n.contains("ccpa-gateway")),
        "{service_names:?}"
    );

    // JSON log lines carry the trace: the SetOptOut's line has its trace and span ids.
    let rpc_line = gw.log_line(&["\"rpc\":\"SetOptOut\"", TRACE_ID]).await;
    assert!(
        rpc_line.contains(&format!("\"span_id\":\"{}\"", hex(&set_rpc.span_id))),
        "{rpc_line}"
    );

    // The drift is counted; the honoured opt-outs are those by key and by address (the
    // creation chose to allow sale, and a restore is drift, not a consumer's wait).
    let scrape = Scrape::of(&url).await;
    assert_eq!(
        scrape.value(
            "ccpa_opt_out_drift_total",
            &[("direction", "REVERTED_OPT_OUT")]
        ),
        1.0
    );
    assert_eq!(
        scrape.value("ccpa_opt_out_time_to_honor_seconds_count", &[]),
        2.0
    );

    // No canary anywhere: not in metrics, span names, attributes or events, nor in logs (but
    // the request id, which logs may carry).
    let metrics = scrape.text;
    let exported = format!("{exports:?}");
    let logs = gw.log();
    let local_part = CANARY_EMAIL.split('@').next().unwrap();
    for (what, text) in [("metrics", &metrics), ("spans", &exported), ("logs", &logs)] {
        for canary in [CANARY_EMAIL, local_part, &pkey, "Canary", "Sentinel"] {
            assert!(!text.contains(canary), "{what} hold {canary:?}");
        }
    }
    for (what, text) in [("metrics", &metrics), ("spans", &exported)] {
        for request_id in [CANARY_REQUEST_ID, &restore_ids[0], &restore_ids[1]] {
            assert!(
                !text.contains(request_id),
                "{what} hold the request id {request_id}"
            );
        }
    }
}

#[tokio::test]
async fn without_an_exporter_a_trace_the_gateway_starts_is_sent_on_unsampled_and_a_callers_stays_sampled()
 {
    let emulator = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let pkey = emulator.insert_profile(NewProfile::default());
    let gw = common::gateway().spawn(Some(&emulator)).await;
    let mut client = gw.client.clone();
    let last_read_traceparent = || {
        emulator
            .requests()
            .into_iter()
            .rev()
            .find(|r| r.method == "GET")
            .and_then(|r| r.header("traceparent").map(str::to_owned))
            .expect("the read carries traceparent")
    };

    client
        .get_opt_out(GetOptOutRequest {
            pkey: pkey.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let started = last_read_traceparent();
    let parts: Vec<&str> = started.split('-').collect();
    assert_eq!(parts.len(), 4, "{started}");
    assert_eq!(parts[0], "00");
    assert!(
        parts[1].len() == 32 && parts[1] != "0".repeat(32),
        "a trace of its own: {started}"
    );
    assert_eq!(parts[3], "00", "no one keeps these spans: {started}");

    read_in_trace(&mut client, &pkey).await;
    let callers = last_read_traceparent();
    assert!(callers.starts_with(&format!("00-{TRACE_ID}-")), "{callers}");
    assert!(callers.ends_with("-01"), "{callers}");
}

#[tokio::test]
async fn with_trace_context_off_nothing_is_propagated_and_metrics_still_count() {
    let emulator = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let pkey = emulator.insert_profile(NewProfile::default());
    let gw = common::gateway()
        .args(&[
            "--metrics-listen",
            "127.0.0.1:0",
            "--trace-context",
            "false",
        ])
        .spawn(Some(&emulator))
        .await;
    let url = gw.metrics_url().await;
    let mut client = gw.client.clone();
    read_in_trace(&mut client, &pkey).await;
    let read = emulator
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.method == "GET")
        .unwrap();
    assert_eq!(read.header("traceparent"), None);
    let scrape = Scrape::of(&url).await;
    assert_eq!(
        scrape.value(
            "grpc_server_handled_total",
            &handled("unary", CCPA, "GetOptOut", "OK")
        ),
        1.0
    );
}

#[tokio::test]
async fn token_requests_to_ims_carry_trace_context_and_are_counted() {
    let emulator = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let pkey = emulator.insert_profile(NewProfile::default());
    let config = emulator.config().clone();
    let gw = common::gateway()
        .args(&["--metrics-listen", "127.0.0.1:0"])
        .env("CCPA_ACS_BASE_URL", &emulator.url())
        .env("CCPA_ACS_TENANT", &config.tenant)
        .env("CCPA_IMS_URL", &emulator.url())
        .env("CCPA_IMS_CLIENT_ID", &config.ims_client_id)
        .env("CCPA_IMS_CLIENT_SECRET", &config.ims_client_secret)
        .spawn(None)
        .await;
    let url = gw.metrics_url().await;
    let mut client = gw.client.clone();
    read_in_trace(&mut client, &pkey).await;

    let token_requests = emulator.ims_request_headers();
    assert!(!token_requests.is_empty());
    let traceparent = token_requests[0]
        .iter()
        .find(|(name, _)| name == "traceparent")
        .map(|(_, value)| value.clone())
        .expect("the token request carries traceparent");
    // The first call needed the token: its request is part of the caller's trace.
    assert!(
        traceparent.starts_with(&format!("00-{TRACE_ID}-")),
        "{traceparent}"
    );
    let scrape = Scrape::of(&url).await;
    assert_eq!(
        scrape.value("ccpa_ims_token_requests_total", &[("outcome", "ok")]),
        token_requests.len() as f64
    );
}

/// `ccpa-gateway serve --emulator` with `args` and `envs`, expected to stop at start-up: its
/// exit code and standard error.
async fn refused_start(args: &[&str], envs: &[(&str, &str)]) -> (i32, String) {
    let outcome = common::cli::run(
        common::cli::ccpa_gateway()
            .args(["serve", "--emulator", "--listen", "127.0.0.1:0"])
            .args(args)
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .envs(envs.iter().copied())
            .stdin(std::process::Stdio::null()),
    )
    .await;
    (outcome.code, outcome.stderr)
}

#[tokio::test]
async fn bad_observability_settings_stop_start_up_naming_the_setting() {
    let (code, stderr) = refused_start(&["--otlp-endpoint", "ftp://collector:4317"], &[]).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--otlp-endpoint"), "{stderr}");

    let (code, stderr) = refused_start(
        &[
            "--otlp-endpoint",
            "http://collector:4317",
            "--trace-context",
            "false",
        ],
        &[],
    )
    .await;
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("--otlp-endpoint") && stderr.contains("--trace-context"),
        "{stderr}"
    );

    for variable in [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ] {
        let (code, stderr) = refused_start(&[], &[(variable, "not a url")]).await;
        assert_eq!(code, 2, "{stderr}");
        assert!(stderr.contains(variable), "{stderr}");
    }

    let (code, stderr) = refused_start(&["--metrics-listen", "nowhere"], &[]).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--metrics-listen"), "{stderr}");
}
