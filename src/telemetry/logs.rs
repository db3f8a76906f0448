//! Log lines, on standard error: readable, or one JSON object per event that carries the
//! `trace_id` and `span_id` of the span it happened in, so that logs and traces join.

use std::io::IsTerminal;

use opentelemetry::trace::TraceContextExt as _;
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{Format, Json, JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{Layer, fmt};

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One readable line per event.
    Human,
    /// One JSON object per event, for log collectors.
    Json,
}

/// The layer that writes log lines in `format`.
pub fn layer<S>(format: LogFormat) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let lines = fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Human => Box::new(lines),
        LogFormat::Json => Box::new(
            lines
                .fmt_fields(JsonFields::new())
                .event_format(JsonWithTraceIds(
                    // The span's own fields are its trace's business: the ids join them.
                    fmt::format()
                        .json()
                        .flatten_event(true)
                        .with_current_span(false)
                        .with_span_list(false),
                )),
        ),
    }
}

/// tracing-subscriber's JSON line, with `trace_id` and `span_id` added when the event happened
/// inside a span that has them.
struct JsonWithTraceIds(Format<Json>);

impl<S, N> FormatEvent<S, N> for JsonWithTraceIds
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        // The thread's current span, as the whole subscriber sees it (this layer sees no spans).
        // No span extension is held here: the line above is complete.
        let ids = tracing::dispatcher::get_default(|dispatch| {
            let id = dispatch.current_span().id()?.clone();
            tracing_opentelemetry::get_otel_context(&id, dispatch)
        })
        .and_then(|context| {
            let span = context.span();
            let span_context = span.span_context();
            span_context
                .is_valid()
                .then(|| (span_context.trace_id(), span_context.span_id()))
        });
        match (ids, line.trim_end().strip_suffix('}')) {
            (Some((trace_id, span_id)), Some(object)) => {
                // The formatter always writes an object with at least a timestamp and a level.
                writer.write_str(object)?;
                write!(
                    writer,
                    ",\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\"}}"
                )?;
                writeln!(writer)
            }
            _ => writer.write_str(&line),
        }
    }
}
