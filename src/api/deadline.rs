//! The caller's deadline, from the `grpc-timeout` header.
//!
//! tonic enforces that header itself, but only by dropping the handler and answering CANCELLED
//! ("Timeout expired"), and it offers no getter for it. So the handler reads the header too and
//! works to a deadline [`MARGIN`] earlier than tonic's: its own DEADLINE_EXCEEDED then goes out
//! first, and the upstream work is dropped (connections closed) at that moment.

use std::time::{Duration, Instant};

use tonic::metadata::MetadataMap;

/// How much earlier than tonic's timer the handler gives up, so that its answer wins the race.
pub const MARGIN: Duration = Duration::from_millis(20);

/// The instant by which the call must be answered, if the caller set a deadline.
pub fn caller_deadline(metadata: &MetadataMap, received: Instant) -> Option<Instant> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let timeout = parse_grpc_timeout(value)?;
    Some(received + timeout.saturating_sub(MARGIN))
}

/// Parses `grpc-timeout`: at most eight ASCII digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`),
/// as the gRPC over HTTP/2 specification defines it.
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if !value.is_ascii() {
        return None;
    }
    let split = value.len().checked_sub(1)?;
    let (digits, unit) = value.split_at(split);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_unit_is_read() {
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout("4S"), Some(Duration::from_secs(4)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(
            parse_grpc_timeout("99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(parse_grpc_timeout("10n"), Some(Duration::from_nanos(10)));
    }

    #[test]
    fn malformed_values_mean_no_deadline() {
        for bad in ["", "S", "10", "10x", "123456789S", "-1S", "1.5S", "１S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_deadline_comes_a_margin_early() {
        let mut metadata = MetadataMap::new();
        metadata.insert("grpc-timeout", "100m".parse().unwrap());
        let received = Instant::now();
        let deadline = caller_deadline(&metadata, received).unwrap();
        assert_eq!(deadline, received + Duration::from_millis(100) - MARGIN);
        assert_eq!(caller_deadline(&MetadataMap::new(), received), None);
    }
}
