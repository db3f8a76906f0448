//! `ccpa-gateway records`: the ledger for operators and auditors, read straight from its
//! database (the gateway need not run).

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::exit_codes;
use super::output::{CliError, Lines, Output, note};
use crate::config::{LEDGER, retention};
use crate::optout::business_days::business_days_before;
use crate::optout::reconcile::Direction;
use crate::store::report::{Figures, YearlyReport};
use crate::store::{Ledger, LedgerError, Notification, NotificationState, Record};
use futures::StreamExt;
use futures::stream::BoxStream;

/// Arguments of `records`.
#[derive(Args)]
pub struct RecordsArgs {
    /// The ledger, as `serve --ledger`: an existing one (it is never created or migrated
    /// here). Required; accepted before or after the subcommand.
    #[arg(long, env = "CCPA_LEDGER", hide_env_values = true, global = true)]
    ledger: Option<String>,
    /// Print the pending requests older than --overdue-after business days, as JSON lines, and
    /// count the notifications to third parties pending as long; exit with 6 when there is one.
    #[arg(long)]
    overdue: bool,
    /// The threshold of --overdue, in business days (Monday to Friday, UTC).
    #[arg(long, env = "CCPA_OVERDUE_AFTER", default_value = "5",
          value_parser = clap::value_parser!(u32).range(1..=15))]
    overdue_after: u32,
    #[command(subcommand)]
    action: Option<RecordsAction>,
}

#[derive(Subcommand)]
enum RecordsAction {
    /// Write the records of requests made in [--since, --until) as JSON lines, oldest first.
    Export {
        /// The first instant (RFC 3339).
        #[arg(long, value_parser = instant)]
        since: DateTime<Utc>,
        /// The instant after the last (RFC 3339); now when left out.
        #[arg(long, value_parser = instant)]
        until: Option<DateTime<Utc>>,
    },
    /// Write the drift the reconciler (or a read) found since --since, as JSON lines, oldest
    /// first: which way a profile had been changed behind the gateway's back, and the restore.
    Drift {
        /// The first instant (RFC 3339); the beginning of the ledger when left out.
        #[arg(long, value_parser = instant)]
        since: Option<DateTime<Utc>>,
    },
    /// The yearly figures of 11 CCR 7102(a): opt-out requests received, complied with in whole
    /// or in part, denied, and the median and mean days to respond.
    Report {
        /// The calendar year (UTC).
        #[arg(long, value_parser = clap::value_parser!(i32).range(2000..=9999))]
        year: i32,
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Write the notifications to third parties (`serve --recipients`) as JSON lines, by request
    /// id and recipient: each one's state, attempts, delivery time and last failure's class.
    Notifications {
        /// Only those to this recipient (its id in the recipients file).
        #[arg(long)]
        recipient: Option<String>,
        /// Only those in this state.
        #[arg(long, value_enum)]
        state: Option<NotificationStateArg>,
    },
    /// Delete the records of requests answered longer ago than --retention (pending ones are kept).
    Prune {
        /// At least 24 months.
        #[arg(long, env = "CCPA_RETENTION", default_value = "731days", value_parser = retention)]
        retention: Duration,
    },
}

/// The states `records notifications --state` selects.
#[derive(Clone, Copy, clap::ValueEnum)]
enum NotificationStateArg {
    /// Not delivered yet.
    Pending,
    /// Failed for good.
    Failed,
    /// Delivered.
    Delivered,
}

impl From<NotificationStateArg> for NotificationState {
    fn from(state: NotificationStateArg) -> Self {
        match state {
            NotificationStateArg::Pending => NotificationState::Pending,
            NotificationStateArg::Failed => NotificationState::Failed,
            NotificationStateArg::Delivered => NotificationState::Delivered,
        }
    }
}

/// A notification as auditors read it: instants in RFC 3339.
fn notification_json(notification: &Notification) -> Value {
    json!({
        "requestId": notification.request_id,
        "recipient": notification.recipient,
        "state": notification.state.as_str(),
        "recordedAt": rfc3339(notification.created_at),
        "attempts": notification.attempts,
        "nextAttemptAt": (notification.state == NotificationState::Pending)
            .then(|| rfc3339(notification.next_attempt_at)),
        "deliveredAt": notification.delivered_at.map(rfc3339),
        "failedAt": notification.failed_at.map(rfc3339),
        "lastFailureClass": notification.last_failure_class,
        "failureReason": notification.failure_reason,
    })
}

/// Prints every notification selected, page by page (constant memory whatever the count), and
/// says how many there were.
async fn print_notifications(
    ledger: &Ledger,
    recipient: Option<&str>,
    state: Option<NotificationState>,
) -> Result<u64, CliError> {
    const PAGE: i64 = 1_000;
    let mut out = Lines::buffered();
    let mut printed = 0u64;
    let mut after = None;
    loop {
        let page = ledger
            .list_notifications(recipient, state, after.as_ref(), PAGE)
            .await?;
        for notification in &page {
            out.json(&notification_json(notification))?;
            printed += 1;
        }
        match page.last() {
            Some(last) if i64::try_from(page.len()).unwrap_or(i64::MAX) == PAGE => {
                after = Some((
                    last.created_at,
                    last.request_id.clone(),
                    last.recipient.clone(),
                ));
            }
            _ => break,
        }
    }
    out.finish()?;
    Ok(printed)
}

fn instant(text: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(text)
        .map(|at| at.with_timezone(&Utc))
        .map_err(|e| format!("not an RFC 3339 instant such as 2026-01-01T00:00:00Z: {e}"))
}

fn rfc3339(ms: i64) -> Value {
    DateTime::<Utc>::from_timestamp_millis(ms).map_or(Value::Null, |at| {
        json!(at.to_rfc3339_opts(SecondsFormat::Millis, true))
    })
}

/// A record as auditors read it: instants in RFC 3339.
pub fn record_json(record: &Record) -> Value {
    json!({
        "requestId": record.request_id,
        "kind": record.kind.as_str(),
        "pkey": record.pkey,
        "ccpaOptOut": record.opt_out,
        "source": record.source.as_str(),
        "receivedAt": rfc3339(record.received_at),
        "receivedAtGivenByCaller": record.received_at_given,
        "recordedAt": rfc3339(record.recorded_at),
        "caller": record.caller,
        "state": record.state.as_str(),
        "answeredAt": record.answered_at.map(rfc3339),
        "resolvedAt": record.resolved_at.map(rfc3339),
        "attempts": record.attempts,
        "lastError": record.last_error,
        "failureReason": record.failure_reason,
        "supersededBy": record.superseded_by,
        "parentRequestId": record.parent_request_id,
        "restoresRequestId": record.restores_request_id,
    })
}

/// Prints each record as a JSON line as it is read (constant memory whatever the count), and
/// says how many there were.
async fn print_all(records: BoxStream<'_, Result<Record, LedgerError>>) -> Result<u64, CliError> {
    print_lines(records, record_json).await
}

/// Prints each record as the JSON line `line` makes of it, as it is read.
async fn print_lines(
    mut records: BoxStream<'_, Result<Record, LedgerError>>,
    line: fn(&Record) -> Value,
) -> Result<u64, CliError> {
    let mut out = Lines::buffered();
    let mut printed = 0u64;
    while let Some(record) = records.next().await {
        out.json(&line(&record?))?;
        printed += 1;
    }
    out.finish()?;
    Ok(printed)
}

/// A drift, from the restore that put it right.
fn drift_json(restore: &Record) -> Value {
    json!({
        "detectedAt": rfc3339(restore.recorded_at),
        "direction": Direction::of_restore(restore.opt_out).as_str(),
        "pkey": restore.pkey,
        "restoresRequestId": restore.restores_request_id,
        "requestId": restore.request_id,
        "state": restore.state.as_str(),
    })
}

/// The figures of one kind of request, as JSON; `with_days` adds the days to respond and the
/// sources (what the regulation asks for opt-outs).
fn figures_json(figures: &Figures, with_days: bool) -> Value {
    let mut value = json!({
        "received": figures.received,
        "complied": figures.complied,
        "denied": figures.denied,
        "pending": figures.pending,
    });
    if with_days {
        value["median_days_to_respond"] = json!(figures.median_days_to_respond());
        value["mean_days_to_respond"] = json!(figures.mean_days_to_respond());
        value["by_source"] = json!(figures.by_source);
        value["notifications"] = json!({
            "delivered": figures.notifications.delivered,
            "failed": figures.notifications.failed,
            "pending": figures.notifications.pending,
        });
    }
    value
}

/// The yearly report: one JSON object, or a table a privacy officer can paste.
fn report_output(report: &YearlyReport, as_json: bool) -> Result<Output, CliError> {
    if as_json {
        return Output::json(&json!({
            "year": report.year,
            "opt_out": figures_json(&report.opt_out, true),
            "opt_in": figures_json(&report.opt_in, false),
        }));
    }
    let row = |name: &str, f: &Figures| {
        format!(
            "{name:<10} {:>10} {:>10} {:>10} {:>10}",
            f.received, f.complied, f.denied, f.pending
        )
    };
    let sources = report
        .opt_out
        .by_source
        .iter()
        .filter(|(_, count)| **count > 0)
        .map(|(source, count)| format!("{source} {count}"))
        .collect::<Vec<_>>()
        .join(", ");
    Ok(Output::text(format!(
        "Requests to opt out of sale or sharing, {} (11 CCR 7102(a))\n\
         {:<10} {:>10} {:>10} {:>10} {:>10}\n{}\n{}\n\
         Days to respond to opt-outs: median {:.2}, mean {:.2}\n\
         Opt-outs by source: {}\n\
         Third parties notified of opt-outs: {} delivered, {} failed, {} pending",
        report.year,
        "",
        "received",
        "complied",
        "denied",
        "pending",
        row("opt-out", &report.opt_out),
        row("opt-in", &report.opt_in),
        report.opt_out.median_days_to_respond(),
        report.opt_out.mean_days_to_respond(),
        if sources.is_empty() { "none" } else { &sources },
        report.opt_out.notifications.delivered,
        report.opt_out.notifications.failed,
        report.opt_out.notifications.pending,
    )))
}

/// A failure of the ledger, told as the ledger tells it.
impl From<LedgerError> for CliError {
    fn from(error: LedgerError) -> Self {
        CliError::failure(error)
    }
}

/// `records`.
pub(super) async fn run(args: RecordsArgs) -> Result<Output, CliError> {
    if !args.overdue && args.action.is_none() {
        return Err(CliError::usage(
            "give --overdue, or a subcommand (export, drift, report, notifications, prune); \
             see --help",
        ));
    }
    let Some(location) = &args.ledger else {
        return Err(CliError::usage(format!(
            "{LEDGER} is required: the ledger to read"
        )));
    };
    let ledger = Ledger::open_existing(location)
        .await
        .map_err(|e| CliError::usage(format!("{LEDGER}: {e}")))?;
    match args.action {
        Some(RecordsAction::Export { since, until }) => {
            let until = until.map_or_else(|| ledger.now_ms(), |at| at.timestamp_millis());
            let exported = print_all(ledger.export(since.timestamp_millis(), until)).await?;
            note(&format!("{exported} records exported"));
            Ok(Output::nothing())
        }
        Some(RecordsAction::Drift { since }) => {
            let since = since.map_or(0, |at| at.timestamp_millis());
            let found = print_lines(ledger.drift(since), drift_json).await?;
            note(&format!("{found} drifts found"));
            Ok(Output::nothing())
        }
        Some(RecordsAction::Report { year, json }) => {
            report_output(&ledger.yearly_report(year).await?, json)
        }
        Some(RecordsAction::Notifications { recipient, state }) => {
            let listed =
                print_notifications(&ledger, recipient.as_deref(), state.map(Into::into)).await?;
            note(&format!("{listed} notifications"));
            Ok(Output::nothing())
        }
        Some(RecordsAction::Prune { retention }) => {
            let pruned = ledger.prune(retention).await?;
            note(&format!("{pruned} records deleted"));
            Ok(Output::nothing())
        }
        None => {
            let cutoff = business_days_before(ledger.now_ms(), args.overdue_after);
            let notifications = ledger.overdue_notifications(cutoff).await?;
            let overdue = print_all(ledger.pending_before(cutoff)).await?;
            note(&format!(
                "{overdue} pending requests older than {} business days",
                args.overdue_after
            ));
            if notifications > 0 {
                note(&format!(
                    "{notifications} notifications to third parties still pending after {} \
                     business days (list them: records notifications --state pending)",
                    args.overdue_after
                ));
            }
            if overdue == 0 && notifications == 0 {
                Ok(Output::nothing())
            } else {
                Ok(Output::nothing().exit_with(exit_codes::OVERDUE))
            }
        }
    }
}
