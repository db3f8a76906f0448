//! The yearly figures of 11 CCR 7102(a): how many opt-out requests a year brought, how many were
//! complied with (in whole or in part) or denied, and how long responding took.
//!
//! A consumer's request counts once: a request made by email counts as one, whatever the number
//! of profiles it reached, and the reconciler's restores are not consumer requests. Complied: the
//! request was APPLIED, or SUPERSEDED by a later request of the consumer's (which was then the one
//! to apply); for a request by email, when any of its profiles was. Denied: FAILED (the record
//! holds the basis); for a request by email, when none of the profiles it reached could be
//! applied, or it failed before reaching any. Days to respond run from `received_at` to `resolved_at` (for a request by email, to
//! its last profile's).

use std::collections::BTreeMap;

use chrono::{TimeZone, Utc};
use futures::StreamExt;
use sqlx::Row;

use super::{Kind, Ledger, LedgerError, Source, State, Store, sqlite};

/// Each request of a year counted once, with what its profiles came to when it was made by
/// email. Restores and the parts of requests by email are left out.
macro_rules! consumer_requests {
    ($from:literal, $until:literal) => {
        concat!(
            "SELECT r.kind, r.opt_out, r.source, r.received_at, r.state, \
     r.resolved_at, \
     (SELECT COUNT(*) FROM opt_out_records c WHERE c.parent_request_id = r.request_id) AS parts, \
     (SELECT COUNT(*) FROM opt_out_records c WHERE c.parent_request_id = r.request_id \
        AND c.state IN ('APPLIED', 'SUPERSEDED')) AS parts_complied, \
     (SELECT COUNT(*) FROM opt_out_records c WHERE c.parent_request_id = r.request_id \
        AND c.state = 'PENDING') AS parts_pending, \
     (SELECT MAX(c.resolved_at) FROM opt_out_records c WHERE c.parent_request_id = r.request_id) \
        AS parts_resolved_at, \
     (SELECT COUNT(*) FROM opt_out_notifications n \
        WHERE n.created_at = r.recorded_at AND n.request_id = r.request_id \
        AND n.state = 'DELIVERED') AS notifications_delivered, \
     (SELECT COUNT(*) FROM opt_out_notifications n \
        WHERE n.created_at = r.recorded_at AND n.request_id = r.request_id \
        AND n.state = 'FAILED') AS notifications_failed, \
     (SELECT COUNT(*) FROM opt_out_notifications n \
        WHERE n.created_at = r.recorded_at AND n.request_id = r.request_id \
        AND n.state = 'PENDING') AS notifications_pending \
     FROM opt_out_records r \
     WHERE r.received_at >= ",
            $from,
            " AND r.received_at < ",
            $until,
            " AND r.parent_request_id IS NULL \
       AND r.restores_request_id IS NULL \
     ORDER BY r.received_at"
        )
    };
}
const CONSUMER_REQUESTS: &str = consumer_requests!("$1", "$2");
/// The same, with SQLite's numbered parameters.
pub(super) const CONSUMER_REQUESTS_SQLITE: &str = consumer_requests!("?1", "?2");

/// A row of [`CONSUMER_REQUESTS`].
pub(super) struct ConsumerRequest {
    pub(super) kind: Kind,
    pub(super) opt_out: bool,
    pub(super) source: Source,
    pub(super) received_at: i64,
    pub(super) state: State,
    pub(super) resolved_at: Option<i64>,
    pub(super) parts: i64,
    pub(super) parts_complied: i64,
    pub(super) parts_pending: i64,
    pub(super) parts_resolved_at: Option<i64>,
    pub(super) notifications: Notifications,
}

impl YearlyReport {
    /// Counts one request.
    fn count(&mut self, request: ConsumerRequest) {
        let (response, responded_at) = if request.kind == Kind::SetByEmail && request.parts > 0 {
            // A request by email that reached profiles: what they came to (even when it
            // failed before reaching them all, those it reached were delivered).
            if request.parts_pending > 0 {
                (Response::Pending, None)
            } else if request.parts_complied > 0 {
                (Response::Complied, request.parts_resolved_at)
            } else {
                (Response::Denied, request.parts_resolved_at)
            }
        } else {
            match request.state {
                State::Applied | State::Superseded => (Response::Complied, request.resolved_at),
                State::Failed => (Response::Denied, request.resolved_at),
                State::Pending => (Response::Pending, None),
            }
        };
        let seconds = responded_at.map(|at| at.saturating_sub(request.received_at) / 1000);
        let figures = if request.opt_out {
            &mut self.opt_out
        } else {
            &mut self.opt_in
        };
        figures.count(request.source, response, seconds);
        figures.notifications.delivered += request.notifications.delivered;
        figures.notifications.failed += request.notifications.failed;
        figures.notifications.pending += request.notifications.pending;
    }
}

/// What became of a request, for the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Response {
    Complied,
    Denied,
    Pending,
}

/// The figures of one kind of request (opt-out or opt-in) in a year.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Figures {
    /// Requests received.
    pub received: u64,
    /// Complied with, in whole or in part.
    pub complied: u64,
    /// Denied.
    pub denied: u64,
    /// Not yet responded to.
    pub pending: u64,
    /// Requests received, by the manner the consumer made them.
    pub by_source: BTreeMap<&'static str, u64>,
    /// The requests' notifications to third parties (`--recipients`), one per request and
    /// recipient, by where they stand.
    pub notifications: Notifications,
    /// How many requests took each number of seconds to respond to (complied or denied).
    seconds_to_respond: BTreeMap<i64, u64>,
}

impl Figures {
    fn count(&mut self, source: Source, response: Response, seconds_to_respond: Option<i64>) {
        self.received += 1;
        *self.by_source.entry(source.as_str()).or_default() += 1;
        match response {
            Response::Complied => self.complied += 1,
            Response::Denied => self.denied += 1,
            Response::Pending => self.pending += 1,
        }
        if let Some(seconds) = seconds_to_respond {
            *self.seconds_to_respond.entry(seconds.max(0)).or_default() += 1;
        }
    }

    /// The median number of days it took to respond; 0 when nothing was responded to.
    pub fn median_days_to_respond(&self) -> f64 {
        let responded: u64 = self.seconds_to_respond.values().sum();
        if responded == 0 {
            return 0.0;
        }
        // The values at positions (n-1)/2 and n/2 (0-based): the same one when n is odd.
        let nth = |n: u64| {
            let mut seen = 0;
            for (seconds, count) in &self.seconds_to_respond {
                seen += count;
                if seen > n {
                    return *seconds;
                }
            }
            0
        };
        let (low, high) = (nth((responded - 1) / 2), nth(responded / 2));
        days((low as f64 + high as f64) / 2.0)
    }

    /// The mean number of days it took to respond; 0 when nothing was responded to.
    pub fn mean_days_to_respond(&self) -> f64 {
        let (mut total, mut responded) = (0.0, 0u64);
        for (seconds, count) in &self.seconds_to_respond {
            total += *seconds as f64 * *count as f64;
            responded += count;
        }
        if responded == 0 {
            return 0.0;
        }
        days(total / responded as f64)
    }
}

/// Notifications to third parties, by where they stand (11 CCR 7026(f)(2): the business
/// notifies those it sold or shared the consumer's information with).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Notifications {
    /// The recipient answered 2xx.
    pub delivered: u64,
    /// No further attempt is made.
    pub failed: u64,
    /// Not delivered yet.
    pub pending: u64,
}

impl Notifications {
    /// From a row's counts (never negative: counts).
    pub(super) fn of(delivered: i64, failed: i64, pending: i64) -> Self {
        let count = |n: i64| u64::try_from(n).unwrap_or(0);
        Self {
            delivered: count(delivered),
            failed: count(failed),
            pending: count(pending),
        }
    }
}

/// Seconds as days, to the hundredth.
fn days(seconds: f64) -> f64 {
    (seconds / 86_400.0 * 100.0).round() / 100.0
}

/// A year's figures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct YearlyReport {
    /// The calendar year (UTC).
    pub year: i32,
    /// Requests to opt out of sale and sharing.
    pub opt_out: Figures,
    /// Requests to opt back in.
    pub opt_in: Figures,
}

impl Ledger {
    /// The figures of requests received in `year` (UTC), read row by row: memory stays flat
    /// however many there were (the durations are kept as counts per second).
    pub async fn yearly_report(&self, year: i32) -> Result<YearlyReport, LedgerError> {
        let start = |year: i32| {
            Utc.with_ymd_and_hms(year, 1, 1, 0, 0, 0)
                .single()
                .map(|at| at.timestamp_millis())
                .ok_or_else(|| {
                    LedgerError::Location(format!("{year} is not a year a report covers"))
                })
        };
        let (from, until) = (start(year)?, start(year.saturating_add(1))?);
        let mut report = YearlyReport {
            year,
            ..YearlyReport::default()
        };
        // Every manner is listed, those no request came by with 0.
        for figures in [&mut report.opt_out, &mut report.opt_in] {
            for source in Source::ALL {
                figures.by_source.insert(source.as_str(), 0);
            }
        }
        let pg = match &self.store {
            Store::Sqlite(db) => {
                // Read on the reader's thread, row by row, counted as they come.
                return db
                    .read(move |c| {
                        sqlite::units::consumer_requests(c, from, until, |request| {
                            report.count(request);
                            Ok(())
                        })?;
                        Ok(report)
                    })
                    .await;
            }
            Store::Postgres(pg) => pg,
        };
        let mut rows = sqlx::query(CONSUMER_REQUESTS)
            .bind(from)
            .bind(until)
            .fetch(&pg.reader);
        while let Some(row) = rows.next().await {
            let row = row?;
            report.count(ConsumerRequest {
                kind: Kind::parse(&row.try_get::<String, _>("kind")?)?,
                opt_out: row.try_get::<i64, _>("opt_out")? != 0,
                source: Source::parse(&row.try_get::<String, _>("source")?)?,
                received_at: row.try_get("received_at")?,
                state: State::parse(&row.try_get::<String, _>("state")?)?,
                resolved_at: row.try_get("resolved_at")?,
                parts: row.try_get("parts")?,
                parts_complied: row.try_get("parts_complied")?,
                parts_pending: row.try_get("parts_pending")?,
                parts_resolved_at: row.try_get("parts_resolved_at")?,
                notifications: Notifications::of(
                    row.try_get("notifications_delivered")?,
                    row.try_get("notifications_failed")?,
                    row.try_get("notifications_pending")?,
                ),
            });
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(seconds: &[i64]) -> Figures {
        let mut figures = Figures::default();
        for s in seconds {
            figures.count(Source::WebForm, Response::Complied, Some(*s));
        }
        figures
    }

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        let day = 86_400;
        assert_eq!(
            figures(&[day, 3 * day, 2 * day, 10 * day]).median_days_to_respond(),
            2.5
        );
        assert_eq!(
            figures(&[day, 3 * day, 2 * day]).median_days_to_respond(),
            2.0
        );
        assert_eq!(
            figures(&[day, 3 * day, 2 * day, 10 * day]).mean_days_to_respond(),
            4.0
        );
        assert_eq!(figures(&[]).median_days_to_respond(), 0.0);
        assert_eq!(figures(&[]).mean_days_to_respond(), 0.0);
    }
}
