//! `ccpa-gateway records`: the ledger for operators and auditors, read straight from its
//! database (the gateway need not run).

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::exit_codes;
use crate::config::{LEDGER, retention};
use crate::ledger::clock::business_days_before;
use crate::ledger::{Ledger, LedgerError, Record};
use futures::StreamExt;
use futures::stream::BoxStream;

/// Arguments of `records`.
#[derive(Args)]
pub struct RecordsArgs {
    /// The ledger, as `serve --ledger`: an existing one (it is never created or migrated
    /// here). Required; accepted before or after the subcommand.
    #[arg(long, env = "CCPA_LEDGER", hide_env_values = true, global = true)]
    ledger: Option<String>,
    /// Print the pending requests older than --overdue-after business days, as JSON lines; exit
    /// with 6 when there is one.
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
    /// Delete the records of requests answered longer ago than --retention (pending ones are kept).
    Prune {
        /// At least 24 months.
        #[arg(long, env = "CCPA_RETENTION", default_value = "731days", value_parser = retention)]
        retention: Duration,
    },
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
    })
}

/// Prints each record as a JSON line as it is read (constant memory whatever the count), and
/// says how many there were.
async fn print_all(
    mut records: BoxStream<'_, Result<Record, LedgerError>>,
) -> Result<u64, Problem> {
    use std::io::Write;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut printed = 0u64;
    while let Some(record) = records.next().await {
        // A closed or full standard output ends the command: the records were not all written.
        writeln!(out, "{}", record_json(&record?)).map_err(Problem::Output)?;
        printed += 1;
    }
    out.flush().map_err(Problem::Output)?;
    Ok(printed)
}

/// Why a `records` command failed.
#[derive(Debug, thiserror::Error)]
enum Problem {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("the records could not all be written to standard output: {0}")]
    Output(std::io::Error),
}

/// `records`.
pub async fn run(args: RecordsArgs) -> u8 {
    if !args.overdue && args.action.is_none() {
        eprintln!("error: give --overdue, or a subcommand (export, prune); see --help");
        return exit_codes::USAGE;
    }
    let Some(location) = &args.ledger else {
        eprintln!("error: {LEDGER} is required: the ledger to read");
        return exit_codes::USAGE;
    };
    let ledger = match Ledger::open_existing(location).await {
        Ok(ledger) => ledger,
        Err(e) => {
            eprintln!("error: {LEDGER}: {e}");
            return exit_codes::USAGE;
        }
    };
    let result = match args.action {
        Some(RecordsAction::Export { since, until }) => {
            let until = until.map_or_else(|| ledger.now_ms(), |at| at.timestamp_millis());
            print_all(ledger.export(since.timestamp_millis(), until))
                .await
                .map(|exported| {
                    eprintln!("{exported} records exported");
                    exit_codes::OK
                })
        }
        Some(RecordsAction::Prune { retention }) => ledger
            .prune(retention)
            .await
            .map_err(Problem::from)
            .map(|pruned| {
                eprintln!("{pruned} records deleted");
                exit_codes::OK
            }),
        None => {
            let cutoff = business_days_before(ledger.now_ms(), args.overdue_after);
            print_all(ledger.pending_before(cutoff))
                .await
                .map(|overdue| {
                    eprintln!(
                        "{overdue} pending requests older than {} business days",
                        args.overdue_after
                    );
                    if overdue == 0 {
                        exit_codes::OK
                    } else {
                        exit_codes::OVERDUE
                    }
                })
        }
    };
    result.unwrap_or_else(|e| {
        eprintln!("error: {e}");
        exit_codes::FAILURE
    })
}
