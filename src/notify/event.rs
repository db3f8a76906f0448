//! What a recipient is told: one CloudEvents 1.0 event in structured mode (the whole event is
//! the JSON body), one per consumer request and recipient.
//!
//! ```json
//! {"specversion":"1.0","id":"msg_…","source":"ccpa-gateway","type":"ccpa.v1.opt_out.recorded",
//!  "time":"2024-05-01T12:00:00.123Z","datacontenttype":"application/json",
//!  "data":{"request_id":"…","pkey":"@…","ccpa_opt_out":true,"source":"WEB_FORM",
//!          "received_at":"2024-05-01T11:59:59.000Z","email_sha256":"…"}}
//! ```
//!
//! The event names the consumer by profile key and, for a request made by email, by the hash
//! of the address: never by the address or a name. A recipient that holds the address can
//! hash it the same way ([`email_sha256`]) to find its own record.
//!
//! Built with serde rather than the `cloudevents-sdk` crate: that crate brings hyper, snafu,
//! hostname, a bitflags and chrono's serde support into the gateway (and a reqwest 0.12 with its
//! HTTP binding) for the seven attributes written here, and its licence is given as a file that
//! cargo-deny would need clarified. The attributes are checked against the specification in
//! this file's tests.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// The content type of a structured-mode CloudEvent in JSON.
pub const CONTENT_TYPE: &str = "application/cloudevents+json";

/// The event's `source`: the gateway as a whole (every replica is the same source).
pub const SOURCE: &str = "ccpa-gateway";

/// The event `type` of a recorded opt-out.
pub const OPT_OUT_TYPE: &str = "ccpa.v1.opt_out.recorded";

/// The event `type` of a recorded opt-in.
pub const OPT_IN_TYPE: &str = "ccpa.v1.opt_in.recorded";

/// One notification to make: a consumer request, as the ledger recorded it, for one
/// recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// The consumer request's id (the caller's, or the gateway's when it gave none).
    pub request_id: String,
    /// The recipient's id (part of the event's id, not of its body).
    pub recipient: String,
    /// The profile's key, when the request named one (or resolved to one).
    pub pkey: Option<String>,
    /// Whether the request opts out (`true`) or back in.
    pub opt_out: bool,
    /// Where the request came from, by the ledger's stored name (`WEB_FORM`, …).
    pub source: &'static str,
    /// When the consumer made the request, in milliseconds since the Unix epoch.
    pub received_at_ms: i64,
    /// The hex SHA-256 of the address ([`email_sha256`]), when the request was made by email.
    pub email_sha256: Option<String>,
}

/// The event's id, also its `webhook-id`: the same for every attempt to deliver one request to
/// one recipient, so that a recipient can drop repeats, and different for every other pair.
///
/// `msg_` and 32 hex digits (128 bits) of the SHA-256 of both ids, each preceded by its length
/// so that no two pairs run together into the same bytes. The hash says nothing of the request
/// id, which a caller may have made from personal data.
pub fn event_id(request_id: &str, recipient: &str) -> String {
    let mut hash = Sha256::new();
    for part in [request_id, recipient] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part.as_bytes());
    }
    format!("msg_{}", &hex(&hash.finalize())[..32])
}

/// The event's JSON, made at `time_ms` (milliseconds since the Unix epoch: when the
/// notification was first made, so that every attempt sends the same bytes).
pub fn body(notice: &Notice, time_ms: i64) -> Vec<u8> {
    let event = CloudEvent {
        specversion: "1.0",
        id: event_id(&notice.request_id, &notice.recipient),
        source: SOURCE,
        kind: if notice.opt_out {
            OPT_OUT_TYPE
        } else {
            OPT_IN_TYPE
        },
        time: rfc3339(time_ms),
        datacontenttype: "application/json",
        data: Data {
            request_id: &notice.request_id,
            pkey: notice.pkey.as_deref(),
            ccpa_opt_out: notice.opt_out,
            source: notice.source,
            received_at: rfc3339(notice.received_at_ms),
            email_sha256: notice.email_sha256.as_deref(),
        },
    };
    // Strings, booleans and structs of them: serde_json fails only on maps with keys that are
    // not strings, or on a `Serialize` that reports an error, and there are none here.
    serde_json::to_vec(&event).expect("an event of strings and booleans serializes")
}

/// The lower-case hex SHA-256 of an address, trimmed and lower-cased first, so that the case
/// or stray spaces a consumer typed do not change it.
pub fn email_sha256(email: &str) -> String {
    hex(&Sha256::digest(email.trim().to_lowercase().as_bytes()))
}

/// RFC 3339 in UTC with milliseconds, as the rest of the gateway writes times. A time outside
/// chrono's range (about 262,000 years either way, which no clock gives) is written as the
/// epoch rather than failing the notification.
fn rfc3339(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut text, b| {
            // Writing to a String cannot fail.
            let _ = write!(text, "{b:02x}");
            text
        })
}

/// The attributes of CloudEvents 1.0 that the gateway sets, in the specification's order.
#[derive(Serialize)]
struct CloudEvent<'a> {
    specversion: &'static str,
    id: String,
    source: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
    time: String,
    datacontenttype: &'static str,
    data: Data<'a>,
}

#[derive(Serialize)]
struct Data<'a> {
    request_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pkey: Option<&'a str>,
    ccpa_opt_out: bool,
    source: &'a str,
    received_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    email_sha256: Option<&'a str>,
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn notice() -> Notice {
        Notice {
            request_id: "2b7c1a6e-req".into(),
            recipient: "ad-platform-sync".into(),
            pkey: Some("@AAAxyz".into()),
            opt_out: true,
            source: "WEB_FORM",
            received_at_ms: 1_714_564_799_000,
            email_sha256: None,
        }
    }

    #[test]
    fn an_opt_out_is_a_cloudevent_with_its_data() {
        let body = body(&notice(), 1_714_564_800_123);
        let event: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            event,
            json!({
                "specversion": "1.0",
                "id": event_id("2b7c1a6e-req", "ad-platform-sync"),
                "source": "ccpa-gateway",
                "type": "ccpa.v1.opt_out.recorded",
                "time": "2024-05-01T12:00:00.123Z",
                "datacontenttype": "application/json",
                "data": {
                    "request_id": "2b7c1a6e-req",
                    "pkey": "@AAAxyz",
                    "ccpa_opt_out": true,
                    "source": "WEB_FORM",
                    "received_at": "2024-05-01T11:59:59.000Z",
                },
            })
        );
        // Compact: one line, as a JSON-lines printer would print it.
        assert!(!body.contains(&b'\n'));
    }

    #[test]
    fn an_opt_in_by_email_carries_the_hash_and_no_key() {
        let notice = Notice {
            pkey: None,
            opt_out: false,
            email_sha256: Some(email_sha256("Someone@Example.com")),
            ..notice()
        };
        let event: Value = serde_json::from_slice(&body(&notice, 0)).unwrap();
        assert_eq!(event["type"], "ccpa.v1.opt_in.recorded");
        assert_eq!(event["time"], "1970-01-01T00:00:00.000Z");
        assert_eq!(event["data"]["ccpa_opt_out"], false);
        assert_eq!(
            event["data"]["email_sha256"],
            email_sha256("someone@example.com")
        );
        assert!(event["data"].get("pkey").is_none());
        let text = String::from_utf8(body(&notice, 0)).unwrap();
        assert!(!text.to_lowercase().contains("someone"), "{text}");
    }

    #[test]
    fn the_event_id_is_stable_per_request_and_recipient_and_says_nothing() {
        let id = event_id("req-1", "warehouse");
        assert_eq!(id, event_id("req-1", "warehouse"));
        assert_eq!(id.len(), 4 + 32);
        assert!(id.starts_with("msg_"));
        assert!(
            id[4..]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert_ne!(id, event_id("req-1", "ad-platform-sync"));
        assert_ne!(id, event_id("req-2", "warehouse"));
        // Lengths keep the two parts apart.
        assert_ne!(event_id("ab", "c"), event_id("a", "bc"));
        assert!(!id.contains("req"));
        // Pinned: a recipient dropping repeats relies on the id never changing with a release.
        assert_eq!(
            event_id("req-1", "warehouse"),
            format!(
                "msg_{}",
                &hex(&Sha256::digest(
                    b"\0\0\0\0\0\0\0\x05req-1\0\0\0\0\0\0\0\x09warehouse"
                ))[..32]
            )
        );
    }

    #[test]
    fn the_email_hash_ignores_case_and_surrounding_space() {
        let hash = email_sha256("someone@example.com");
        // SHA-256 of "someone@example.com".
        assert_eq!(hash, hex(&Sha256::digest(b"someone@example.com")));
        assert_eq!(hash.len(), 64);
        assert_eq!(email_sha256("  SomeOne@Example.COM\n"), hash);
        assert_ne!(email_sha256("someone2@example.com"), hash);
    }

    #[test]
    fn the_email_hash_is_the_published_sha256() {
        // sha256("abc"), FIPS 180-2's example.
        assert_eq!(
            email_sha256(" ABC "),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
