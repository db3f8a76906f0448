//! ACS's timestamps (`2020-07-31 11:19:00.304Z`: a space where RFC 3339 has `T`) as protobuf
//! `Timestamp`s.

use chrono::NaiveDateTime;

/// Milliseconds since the epoch as a protobuf `Timestamp`.
pub fn ms_to_proto(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        // Below one billion by construction.
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

/// A protobuf `Timestamp` as milliseconds since the epoch (sub-millisecond parts dropped).
pub fn proto_to_ms(at: &prost_types::Timestamp) -> i64 {
    at.seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(at.nanos / 1_000_000))
}

/// The protobuf form of an ACS timestamp; `None` for `""` (ACS's "never").
///
/// An unreadable timestamp is logged and treated as absent rather than failing the call: it
/// only says *when* the opt-out changed, and the opt-out itself must still be answered.
pub fn acs_timestamp_to_proto(text: &str) -> Option<prost_types::Timestamp> {
    if text.is_empty() {
        return None;
    }
    let parsed = NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.fZ")
        // Tolerate the RFC 3339 form too, in case ACS (or a proxy) ever normalises it.
        .or_else(|_| NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.fZ"));
    match parsed {
        Ok(at) => {
            let at = at.and_utc();
            Some(prost_types::Timestamp {
                seconds: at.timestamp(),
                // Below one billion by construction, so it fits an i32.
                nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(0),
            })
        }
        Err(_) => {
            tracing::warn!(
                length = text.len(),
                "ACS sent a ccpaOptOutLastModified that is not a timestamp; reporting none"
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acs_form_is_read_to_the_millisecond() {
        let at = acs_timestamp_to_proto("2020-07-31 11:19:00.304Z").unwrap();
        assert_eq!(at.seconds, 1_596_194_340);
        assert_eq!(at.nanos, 304_000_000);
    }

    #[test]
    fn empty_means_never_and_garbage_means_unknown() {
        assert_eq!(acs_timestamp_to_proto(""), None);
        assert_eq!(acs_timestamp_to_proto("yesterday"), None);
    }

    #[test]
    fn rfc3339_form_is_tolerated() {
        let at = acs_timestamp_to_proto("2020-07-31T11:19:00Z").unwrap();
        assert_eq!(at.seconds, 1_596_194_340);
    }
}
