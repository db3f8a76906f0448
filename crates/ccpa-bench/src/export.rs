//! The `export` scenario: `records export` and `records --overdue` over a SQLite ledger of
//! 200,000 records (`--records`), each command's output read line by line as a log shipper
//! would. It reports rows per second and the command's peak RSS after a tenth of the rows and
//! after nine tenths (while the last rows are still to be written, so the process is alive):
//! memory that does not grow with the ledger shows as the two being equal. Holding the records
//! would cost several hundred MB at this size.

use std::process::Stdio;
use std::time::Instant;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::processes::{this_binary_command, usage};

/// Runs the scenario over a new ledger of `records` pending requests, all overdue.
pub async fn run(records: u64) -> Result<Value, String> {
    let dir = tempfile::tempdir().map_err(|e| format!("cannot make a directory: {e}"))?;
    let ledger = dir.path().join("ledger.sqlite3");
    let ledger = ledger
        .to_str()
        .ok_or("the temporary directory's path is not UTF-8")?
        .to_owned();
    seed(&ledger, records).await?;
    Ok(json!({
        "records": records,
        "export": read_all(&ledger, &["export", "--since", "1970-01-01T00:00:00Z"], 0, records).await?,
        "overdue": read_all(&ledger, &["--overdue"], ccpa_gateway::cli::exit_codes::OVERDUE, records).await?,
    }))
}

/// Creates the ledger (the gateway's own migrations) and fills it with `records` pending
/// requests received in 1970, in one statement.
async fn seed(ledger: &str, records: u64) -> Result<(), String> {
    drop(
        ccpa_gateway::store::Ledger::open(ledger)
            .await
            .map_err(|e| format!("cannot create the ledger: {e}"))?,
    );
    let count = i64::try_from(records).map_err(|_| "too many records")?;
    let connection = rusqlite::Connection::open(ledger).map_err(|e| e.to_string())?;
    connection
        .execute(
            "INSERT INTO opt_out_records (request_id, kind, pkey, opt_out, source, received_at, \
             received_at_given, recorded_at, caller, state, attempts, next_attempt_at) \
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1) \
             SELECT 'export-' || i, 'SET_OPT_OUT', '@export-profile-' || i, 1, 'WEB_FORM', \
             1000000 + i, 1, 1000000 + i, 'bench', 'PENDING', 0, 9000000000000 FROM n",
            [count],
        )
        .map_err(|e| format!("cannot fill the ledger: {e}"))?;
    connection
        .close()
        .map_err(|(_, e)| format!("cannot close the ledger: {e}"))
}

/// Runs `records --ledger <ledger> <args>`, reads every line, and checks that it printed
/// `records` rows and exited with `code`.
async fn read_all(ledger: &str, args: &[&str], code: u8, records: u64) -> Result<Value, String> {
    let mut child = this_binary_command()?
        .args(["records", "--ledger", ledger])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start records {args:?}: {e}"))?;
    let pid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .ok_or("the records command has no pid")?;
    let stdout = child
        .stdout
        .take()
        .ok_or("the records command has no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let started = Instant::now();
    let (mut read, mut after_a_tenth, mut after_nine_tenths) = (0u64, None, None);
    while let Some(_line) = lines
        .next_line()
        .await
        .map_err(|e| format!("reading records {args:?}: {e}"))?
    {
        read += 1;
        // Read while a tenth of the rows are still to come: the command cannot have ended.
        if read == records / 10 {
            after_a_tenth = Some(usage(pid)?.peak_rss);
        } else if read == records * 9 / 10 {
            after_nine_tenths = Some(usage(pid)?.peak_rss);
        }
    }
    let elapsed = started.elapsed();
    let status = child
        .wait()
        .await
        .map_err(|e| format!("records {args:?}: {e}"))?;
    if status.code() != Some(i32::from(code)) || read != records {
        return Err(format!(
            "records {args:?} printed {read} of {records} rows and exited with {status}"
        ));
    }
    let mb = |bytes: Option<u64>| bytes.map(|b| crate::round(b as f64 / 1_048_576.0, 1));
    Ok(json!({
        "rows_per_s": crate::round(read as f64 / elapsed.as_secs_f64(), 0),
        "peak_rss_mb_after_a_tenth": mb(after_a_tenth),
        "peak_rss_mb_after_nine_tenths": mb(after_nine_tenths),
    }))
}

/// Prints the scenario's figures.
pub fn print_report(report: &Value) {
    eprintln!("export ({} records)", report["records"]);
    for command in ["export", "overdue"] {
        let figures = &report[command];
        eprintln!(
            "  records {command}: {} rows/s, peak RSS {} MB after a tenth, {} MB after nine tenths",
            figures["rows_per_s"],
            figures["peak_rss_mb_after_a_tenth"],
            figures["peak_rss_mb_after_nine_tenths"],
        );
    }
}
