//! The CCPA clock: an opt-out must be honoured within 15 business days of the request.

use chrono::{DateTime, Datelike, Duration, Utc, Weekday};

/// The legal limit, in business days (11 CCR 7026(f)).
pub const LEGAL_LIMIT_BUSINESS_DAYS: u32 = 15;

/// The instant `business_days` business days before `now_ms`, both in milliseconds since the
/// epoch. Business days are Monday to Friday in UTC; public holidays are not known here, so the
/// clock runs slightly ahead of the legal one (it warns early, never late).
pub fn business_days_before(now_ms: i64, business_days: u32) -> i64 {
    let Some(mut at) = DateTime::<Utc>::from_timestamp_millis(now_ms) else {
        return now_ms;
    };
    let mut counted = 0;
    while counted < business_days {
        at -= Duration::days(1);
        if !matches!(at.weekday(), Weekday::Sat | Weekday::Sun) {
            counted += 1;
        }
    }
    at.timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> i64 {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
            .timestamp_millis()
    }

    #[test]
    fn weekends_do_not_count() {
        // Monday 2026-11-30 10:00 UTC, one business day back: Friday.
        assert_eq!(
            business_days_before(at("2026-11-30T10:00:00Z"), 1),
            at("2026-11-27T10:00:00Z")
        );
        // Five business days back from a Wednesday: the Wednesday before.
        assert_eq!(
            business_days_before(at("2026-12-02T08:00:00Z"), 5),
            at("2026-11-25T08:00:00Z")
        );
        // Fifteen: three calendar weeks.
        assert_eq!(
            business_days_before(at("2026-12-02T08:00:00Z"), 15),
            at("2026-11-11T08:00:00Z")
        );
    }

    #[test]
    fn zero_days_is_now() {
        assert_eq!(business_days_before(1_000, 0), 1_000);
    }
}
