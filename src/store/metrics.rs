//! The names of what the store counts and times itself (the `metrics` facade; the gateway's
//! recorder, in `crate::telemetry`, describes and serves them with the rest).

/// Requests resolved, by the `state` they reached.
pub const LEDGER_REQUESTS_TOTAL: &str = "ccpa_ledger_requests_total";
/// Time a ledger commit takes.
pub const LEDGER_COMMIT_SECONDS: &str = "ccpa_ledger_commit_seconds";
/// Units of work per grouped commit (SQLite).
pub const LEDGER_COMMIT_BATCH_SIZE: &str = "ccpa_ledger_commit_batch_size";
/// Ledger writes that failed (nothing of them was kept).
pub const LEDGER_WRITE_ERRORS_TOTAL: &str = "ccpa_ledger_write_errors_total";

/// Times a commit of `units` units of work; a failed one counts each unit as a write error
/// (each failed because the batch did). Both databases' writers report through it.
pub(super) fn observe_commit(started: std::time::Instant, units: usize, committed: bool) {
    if committed {
        metrics::histogram!(LEDGER_COMMIT_SECONDS).record(started.elapsed().as_secs_f64());
        metrics::histogram!(LEDGER_COMMIT_BATCH_SIZE).record(units as f64);
    } else {
        metrics::counter!(LEDGER_WRITE_ERRORS_TOTAL).increment(units as u64);
    }
}
