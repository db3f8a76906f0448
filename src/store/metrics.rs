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
