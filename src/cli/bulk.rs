//! `ccpa-gateway bulk-set-opt-out --file FILE.csv`: a file of opt-out requests, streamed to a
//! gateway's BulkSetOptOut, with a progress bar, a summary and a results file.
//!
//! The CSV has a header row naming its columns, in any order:
//!
//! | column        | value                                                                  |
//! |---------------|------------------------------------------------------------------------|
//! | `pkey`        | the profile's key; or leave it empty and give `email`                   |
//! | `email`       | every profile with this address                                         |
//! | `opt_out`     | `true` / `false` (also `1`/`0`, `yes`/`no`)                              |
//! | `source`      | `gpc`, `web-form`, `email`, `phone`, `postal-mail`, `in-person`, `authorized-agent`, `internal` |
//! | `received_at` | when the consumer made the request, RFC 3339; empty for now            |
//! | `request_id`  | optional; when empty, `bulk-<file digest>-<line>`, the same every run  |
//!
//! With `--record-only`, each row is answered PENDING once the gateway has durably recorded it,
//! and its deliverer applies it to Adobe later (rows by `pkey` only).
//!
//! Running the same file twice records nothing twice: every row has the same request id each
//! time, and the ledger answers a replayed id with its first outcome. If the stream breaks, the
//! rows not yet answered are sent again, the same way.
//!
//! One bad row fails alone: a row with more or fewer fields than the header, a blank one (but
//! for spaces) or one that is not UTF-8 is answered `INVALID_ROW` at its line, and the rest of
//! the file is sent. Lines are the file's own (1 is the header), counting blank lines and the
//! lines inside quoted fields; a UTF-8 byte order mark and CRLF line ends are accepted.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use clap::Args;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use super::calls::{Connection, connect_lazily, state_name, timestamp};
use super::exit_codes;
use super::output::{CliError, Output, note};
use super::source;
use crate::backoff::Backoff;
use crate::client::Client;
use crate::proto::ccpa_v1::{BulkSetOptOutRequest, DeliveryState, SetOptOutRequest};

/// Arguments of `bulk-set-opt-out`.
#[derive(Args)]
pub struct BulkArgs {
    /// The CSV file of requests (columns: see `ccpa-gateway help bulk-set-opt-out`).
    #[arg(long)]
    file: PathBuf,
    /// Where to write one result per row; default: the file's name with `.results.csv`.
    #[arg(long)]
    results: Option<PathBuf>,
    /// The calling service recorded with each request (`x-ccpa-caller`).
    #[arg(long, env = "CCPA_CALLER", default_value = "ccpa-gateway-bulk")]
    caller: String,
    /// Times to resume after the stream breaks.
    #[arg(long, default_value = "5")]
    retries: u32,
    /// Have each row answered as soon as the gateway has durably recorded it (PENDING), and
    /// applied to Adobe later by its deliverer, instead of within its own call. For large files:
    /// they are handed over at the speed of the ledger, not of Adobe. Rows must give `pkey`.
    #[arg(long)]
    record_only: bool,
    #[command(flatten)]
    connection: Connection,
}

/// One row, ready to send, or why it cannot be.
enum Row {
    Item(SetOptOutRequest),
    Invalid { request_id: String, problem: String },
}

/// The header: each column's index by its name, and how many fields every row must have.
struct Header {
    columns: HashMap<String, usize>,
    width: usize,
}

/// Opens the file for reading rows. Flexible, because a strict reader stops at the first row
/// whose length differs from the header's, and one bad row must not stop the file: such a row
/// is read, and answered INVALID_ROW by `parse_row`.
fn open(path: &Path) -> csv::Result<csv::Reader<File>> {
    csv::ReaderBuilder::new().flexible(true).from_path(path)
}

/// Reads the header (raw bytes, so that a header not in UTF-8 still names what it can).
fn header(reader: &mut csv::Reader<File>) -> csv::Result<Header> {
    let names = reader.byte_headers()?;
    Ok(Header {
        columns: names
            .iter()
            .enumerate()
            .map(|(i, name)| (String::from_utf8_lossy(name).trim().to_ascii_lowercase(), i))
            .collect(),
        width: names.len(),
    })
}

/// Reads one data row, found at `line` of the file.
fn parse_row(record: csv::ByteRecord, header: &Header, line: u64, digest: &str) -> Row {
    let generated = || format!("bulk-{digest}-{line}");
    // The problems say what is wrong, never what the row holds: it is personal data.
    if record.iter().all(|field| field.trim_ascii().is_empty()) {
        return Row::Invalid {
            request_id: generated(),
            problem: "the row is empty".into(),
        };
    }
    if record.len() != header.width {
        return Row::Invalid {
            request_id: generated(),
            problem: format!(
                "the row has {} fields; the header has {}",
                record.len(),
                header.width
            ),
        };
    }
    let Ok(record) = csv::StringRecord::from_byte_record(record) else {
        return Row::Invalid {
            request_id: generated(),
            problem: "the row is not UTF-8".into(),
        };
    };
    let columns = &header.columns;
    let get = |name: &str| {
        columns
            .get(name)
            .and_then(|i| record.get(*i))
            .map(str::trim)
            .unwrap_or("")
    };
    let request_id = match get("request_id") {
        "" => generated(),
        given => given.to_owned(),
    };
    let invalid = |problem: String| Row::Invalid {
        request_id: request_id.clone(),
        problem,
    };
    let opt_out = match get("opt_out").to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => true,
        "false" | "0" | "no" => false,
        "" => return invalid("opt_out is required".into()),
        _ => return invalid("opt_out must be true or false".into()),
    };
    let Some(source) = source::from_column(get("source")) else {
        return invalid("source is not one of the known manners of request".into());
    };
    let received_at = match get("received_at") {
        "" => None,
        text => match timestamp(text) {
            Ok(at) => Some(at),
            Err(_) => return invalid("received_at is not an RFC 3339 instant".into()),
        },
    };
    Row::Item(SetOptOutRequest {
        pkey: get("pkey").to_owned(),
        email: get("email").to_owned(),
        ccpa_opt_out: Some(opt_out),
        request_id,
        source: source as i32,
        received_at,
        create_if_missing: false,
    })
}

/// The file's digest, which makes generated request ids stable from one run to the next.
fn digest_of(path: &Path) -> std::io::Result<String> {
    let bytes = std::fs::read(path)?;
    let digest = Sha256::digest(&bytes);
    Ok(digest.iter().take(8).map(|b| format!("{b:02x}")).collect())
}

/// Counts the file's lines up to each row. A record's own `position().line()` cannot be used:
/// it is the line where the reader stopped after the row before, which is not the row's after a
/// blank line or with CRLF line ends (csv issues 208 and 395). Its byte offset is exact up to
/// those line ends, which this skips.
struct LineCounter {
    bytes: BufReader<File>,
    offset: u64,
    line: u64,
}

impl LineCounter {
    fn open(path: &Path) -> std::io::Result<Self> {
        Ok(Self {
            bytes: BufReader::new(File::open(path)?),
            offset: 0,
            line: 1,
        })
    }

    /// The line of the row whose position is byte `at`: the line of the first byte from `at`
    /// on that ends no line (a row begins with a field or a quote, never with a line end).
    /// Rows come in the file's order, so the count goes forward only.
    fn line_of(&mut self, at: u64) -> std::io::Result<u64> {
        loop {
            let buffer = self.bytes.fill_buf()?;
            if buffer.is_empty() {
                return Ok(self.line);
            }
            let mut used = 0;
            let mut found = false;
            for &byte in buffer {
                if self.offset + used as u64 >= at && byte != b'\r' && byte != b'\n' {
                    found = true;
                    break;
                }
                if byte == b'\n' {
                    self.line += 1;
                }
                used += 1;
            }
            self.bytes.consume(used);
            self.offset += used as u64;
            if found {
                return Ok(self.line);
            }
        }
    }
}

/// The line each data row starts on, in order: one pass over the file before anything is sent.
fn row_lines(path: &Path) -> Result<Vec<u64>, String> {
    let mut reader = open(path).map_err(|e| e.to_string())?;
    header(&mut reader).map_err(|e| e.to_string())?;
    let mut counter = LineCounter::open(path).map_err(|e| e.to_string())?;
    let mut lines: Vec<u64> = Vec::new();
    for record in reader.byte_records() {
        let record = record.map_err(|e| e.to_string())?;
        let line = match record.position() {
            Some(position) => counter
                .line_of(position.byte())
                .map_err(|e| e.to_string())?,
            // The reader gives every record its position; were it not to, the line after the
            // last row's is the likeliest.
            None => lines.last().map_or(2, |last| last + 1),
        };
        lines.push(line);
    }
    Ok(lines)
}

/// Where every row stands: answered (with its result written), or not yet.
struct Progress {
    answered: Vec<bool>,
    /// The line of each row: as long as `answered`, both being one entry per row.
    lines: Arc<Vec<u64>>,
    counts: HashMap<String, u64>,
    results: csv::Writer<std::fs::File>,
    /// The first failure to write the results file: the command then fails, since its results
    /// are the only account of which rows were recorded.
    write_error: Option<String>,
}

impl Progress {
    fn answer(&mut self, row: usize, request_id: &str, outcome: &str, code: &str, message: &str) {
        if std::mem::replace(&mut self.answered[row], true) {
            return;
        }
        *self.counts.entry(outcome.to_owned()).or_default() += 1;
        let line = self.lines[row].to_string();
        let cells = [line.as_str(), request_id, outcome, code, message].map(spreadsheet_safe);
        if let Err(e) = self.results.write_record(cells.iter().map(|c| c.as_ref()))
            && self.write_error.is_none()
        {
            self.write_error = Some(e.to_string());
        }
    }
}

/// A cell as a spreadsheet will show it, never run it: one that begins with `=`, `+`, `-`, `@`,
/// a tab or a carriage return is prefixed with `'` (OWASP's rule against CSV injection), since
/// people open results files in spreadsheets and a request id or a message comes from outside.
fn spreadsheet_safe(cell: &str) -> std::borrow::Cow<'_, str> {
    if cell.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        std::borrow::Cow::Owned(format!("'{cell}"))
    } else {
        std::borrow::Cow::Borrowed(cell)
    }
}

/// `bulk-set-opt-out`.
pub async fn run(args: BulkArgs) -> Result<Output, CliError> {
    let digest = digest_of(&args.file).map_err(|e| {
        CliError::usage(format!("--file: cannot read {}: {e}", args.file.display()))
    })?;
    let lines =
        Arc::new(row_lines(&args.file).map_err(|e| CliError::usage(format!("--file: {e}")))?);
    let rows = lines.len();
    let results_path = args.results.clone().unwrap_or_else(|| {
        let mut name = args.file.clone().into_os_string();
        name.push(".results.csv");
        PathBuf::from(name)
    });
    let cannot_write = |e: csv::Error| {
        CliError::usage(format!(
            "--results: cannot write {}: {e}",
            results_path.display()
        ))
    };
    let mut results = csv::Writer::from_path(&results_path).map_err(cannot_write)?;
    results
        .write_record(["line", "request_id", "outcome", "code", "message"])
        .map_err(cannot_write)?;
    // Connected at the first stream, and again as a stream after a break opens: a gateway not
    // reachable yet is a break like any other, resumed up to --retries times.
    let client = connect_lazily(args.connection.builder().caller(args.caller.clone()))?;
    let progress = Arc::new(Mutex::new(Progress {
        answered: vec![false; rows],
        lines: lines.clone(),
        counts: HashMap::new(),
        results,
        write_error: None,
    }));
    let bar = indicatif::ProgressBar::new(rows as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} rows  {per_sec}  eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );

    let mut attempts = 0;
    // Why the stream broke for good, if it did.
    let broken = loop {
        match stream_once(&client, &args, &digest, &lines, &progress, &bar).await {
            Ok(()) => break None,
            Err(problem) if attempts < args.retries => {
                attempts += 1;
                bar.suspend(|| {
                    note(&format!(
                        "the stream broke ({problem}); resuming ({attempts}/{})",
                        args.retries
                    ))
                });
                tokio::time::sleep(Backoff::BULK_RESUME.after(attempts)).await;
            }
            Err(problem) => break Some(format!("UNAVAILABLE: {problem}")),
        }
    };
    bar.finish_and_clear();

    let mut progress = match progress.lock() {
        Ok(progress) => progress,
        Err(poisoned) => poisoned.into_inner(),
    };
    if let Err(e) = progress.results.flush()
        && progress.write_error.is_none()
    {
        progress.write_error = Some(e.to_string());
    }
    let unanswered = progress.answered.iter().filter(|a| !**a).count();
    let mut summary: Vec<_> = progress.counts.iter().collect();
    summary.sort();
    note(&format!(
        "{rows} rows: {}{}; results in {}",
        summary
            .iter()
            .map(|(outcome, count)| format!("{count} {outcome}"))
            .collect::<Vec<_>>()
            .join(", "),
        if unanswered > 0 {
            format!(", {unanswered} not answered")
        } else {
            String::new()
        },
        results_path.display()
    ));
    // A row the gateway answered FAILED (a request by email whose profiles' deliveries failed
    // comes back so, without an error) failed as surely as one refused.
    let failed = progress
        .counts
        .keys()
        .any(|outcome| outcome == "ERROR" || outcome == "FAILED");
    if let Some(problem) = &progress.write_error {
        // The rows were sent (and recorded, or refused), but which is which is not on disk: a
        // re-run of the same file replays them without recording anything twice.
        return Err(CliError::failure(format!(
            "--results: writing {} failed: {problem}; run the same file again for a complete \
             results file (nothing is recorded twice)",
            results_path.display()
        ))
        .with_details(broken.map(|broken| format!("and the stream broke: {broken}"))));
    }
    if let Some(broken) = broken {
        return Err(CliError::new(exit_codes::UNAVAILABLE, broken));
    }
    Ok(if failed {
        Output::nothing().exit_with(exit_codes::SOME_ROWS_FAILED)
    } else {
        Output::nothing()
    })
}

/// One stream: sends every row not yet answered, records the answers. `Err` when the stream
/// broke (the caller resumes).
async fn stream_once(
    client: &Client,
    args: &BulkArgs,
    digest: &str,
    lines: &Arc<Vec<u64>>,
    progress: &Arc<Mutex<Progress>>,
    bar: &indicatif::ProgressBar,
) -> Result<(), String> {
    // Rows are read as the stream takes them: a bounded channel holds the file back.
    let (items, to_send) = mpsc::channel::<BulkSetOptOutRequest>(256);
    let sent_rows: Arc<Mutex<Vec<usize>>> = Arc::new(Mutex::new(Vec::new()));
    let file = args.file.clone();
    let record_only = args.record_only;
    let digest = digest.to_owned();
    let lines = lines.clone();
    let reader_progress = progress.clone();
    let reader_sent = sent_rows.clone();
    let reader_bar = bar.clone();
    let reader = tokio::task::spawn_blocking(move || -> Result<(), String> {
        let mut reader = open(&file).map_err(|e| e.to_string())?;
        let header = header(&mut reader).map_err(|e| e.to_string())?;
        for (row, record) in reader.byte_records().enumerate() {
            let record = record.map_err(|e| e.to_string())?;
            let Some(&line) = lines.get(row) else {
                return Err("the file grew while it was being sent".into());
            };
            let already = reader_progress
                .lock()
                .map(|p| p.answered[row])
                .unwrap_or(false);
            if already {
                continue;
            }
            match parse_row(record, &header, line, &digest) {
                Row::Invalid {
                    request_id,
                    problem,
                } => {
                    if let Ok(mut p) = reader_progress.lock() {
                        p.answer(row, &request_id, "ERROR", "INVALID_ROW", &problem);
                    }
                    reader_bar.inc(1);
                }
                Row::Item(item) => {
                    if let Ok(mut sent) = reader_sent.lock() {
                        sent.push(row);
                    }
                    if items
                        .blocking_send(BulkSetOptOutRequest {
                            item: Some(item),
                            record_only,
                        })
                        .is_err()
                    {
                        // The stream is gone; the caller resumes with what is left.
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    });

    let mut answers = client
        .bulk_set_opt_out(ReceiverStream::new(to_send))
        .await
        .map_err(|error| match error.reason() {
            None if error.code() == tonic::Code::Unavailable => format!(
                "cannot reach the gateway at {}: {error}",
                args.connection.addr()
            ),
            _ => error.to_string(),
        })?;
    while let Some(answer) = answers.next().await {
        let answer = answer.map_err(|error| error.to_string())?;
        let row = sent_rows
            .lock()
            .ok()
            .and_then(|sent| sent.get(answer.index as usize).copied());
        let Some(row) = row else {
            return Err(format!(
                "the gateway answered an item never sent ({})",
                answer.index
            ));
        };
        if let Ok(mut p) = progress.lock() {
            match &answer.error {
                Some(error) => {
                    let message = if error.fields.is_empty() {
                        error.message.clone()
                    } else {
                        format!("{} ({})", error.message, error.fields.join(", "))
                    };
                    p.answer(row, &answer.request_id, "ERROR", &error.code, &message);
                }
                None => {
                    // The call worked (code OK) but the request may not have: say which of its
                    // profiles' records did not (by their ids: no key, no address).
                    let failed: Vec<&str> = answer
                        .profiles
                        .iter()
                        .filter(|p| p.state == DeliveryState::Failed as i32)
                        .map(|p| p.request_id.as_str())
                        .collect();
                    let message = if failed.is_empty() {
                        String::new()
                    } else {
                        format!("failed for the records {}", failed.join(" "))
                    };
                    p.answer(
                        row,
                        &answer.request_id,
                        state_name(answer.state),
                        "OK",
                        &message,
                    );
                }
            }
        }
        bar.inc(1);
    }
    reader
        .await
        .map_err(|e| format!("reading the file failed: {e}"))??;
    let complete = progress
        .lock()
        .map(|p| p.answered.iter().all(|a| *a))
        .unwrap_or(false);
    if complete {
        Ok(())
    } else {
        Err("the stream ended before every row was answered".into())
    }
}
