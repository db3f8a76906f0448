//! Retention's policy: how long the regulations require a record of each request and its
//! response to be kept (11 CCR 7101(a)). The store prunes what is older (`Ledger::prune`).

/// 24 months: 731 days, the longest any 24 months can be (when they hold a 29 February), so that
/// a record is never pruned a day early.
pub const MIN_RETENTION: std::time::Duration = std::time::Duration::from_secs(731 * 24 * 3600);
