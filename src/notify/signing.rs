//! Standard Webhooks signatures (<https://www.standardwebhooks.com>), so that a recipient can
//! check a notification with its own library: `webhook-signature` holds `v1,<base64 of
//! HMAC-SHA256(key, "<webhook-id>.<webhook-timestamp>.<body>")>`, one entry per secret,
//! separated by spaces.
//!
//! Written here rather than taken from the `standardwebhooks` crate: its signing needs the
//! whole body as UTF-8, its verification reads the system clock and checks against one key,
//! and it would bring a second base64 and another SHA-256. The tests check our signatures with
//! that crate, the receivers' reference.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::recipients::Secrets;

/// The header naming the message: the same for every attempt to deliver it, so that the
/// recipient can drop a second delivery.
pub const WEBHOOK_ID: &str = "webhook-id";
/// The header holding when the message was signed, in seconds since the Unix epoch.
pub const WEBHOOK_TIMESTAMP: &str = "webhook-timestamp";
/// The header holding the signatures.
pub const WEBHOOK_SIGNATURE: &str = "webhook-signature";

/// How far a signature's timestamp may be from the receiver's clock, either way: the reference
/// libraries' tolerance, five minutes. It bounds how long a captured delivery can be replayed.
pub const TOLERANCE_S: i64 = 5 * 60;

/// The one version of signature Standard Webhooks defines for symmetric keys.
const VERSION: &str = "v1";

type HmacSha256 = Hmac<Sha256>;

/// The MAC of a message with one key, fed but not finished.
fn mac(key: &[u8], msg_id: &str, timestamp_s: i64, body: &[u8]) -> HmacSha256 {
    // HMAC takes a key of any length (a long one is hashed first): this cannot fail.
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp_s.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The `webhook-signature` header for a message: one `v1,<base64>` entry per secret, in the
/// secrets' order, separated by spaces.
pub fn signature_header(secrets: &Secrets, msg_id: &str, timestamp_s: i64, body: &[u8]) -> String {
    secrets
        .keys()
        .map(|key| {
            let tag = mac(key, msg_id, timestamp_s, body).finalize().into_bytes();
            format!(
                "{VERSION},{}",
                base64::engine::general_purpose::STANDARD.encode(tag)
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Why a delivery was not accepted. The messages quote nothing from the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// A header is absent.
    #[error("the {0} header is missing")]
    MissingHeader(&'static str),
    /// A header is not text, or the timestamp not a number of seconds.
    #[error("the {0} header is malformed")]
    MalformedHeader(&'static str),
    /// The timestamp is further in the past than [`TOLERANCE_S`].
    #[error("the webhook-timestamp is more than 5 minutes old")]
    TooOld,
    /// The timestamp is further in the future than [`TOLERANCE_S`].
    #[error("the webhook-timestamp is more than 5 minutes in the future")]
    TooNew,
    /// No `v1` signature matches any of the secrets.
    #[error("no signature matches")]
    NoMatch,
}

/// Checks a delivery as a receiver does: its timestamp within [`TOLERANCE_S`] of `now_s`, and
/// one of its `v1` signatures made with one of `secrets`. Comparisons take constant time.
pub fn verify(
    secrets: &Secrets,
    headers: &http::HeaderMap,
    body: &[u8],
    now_s: i64,
) -> Result<(), VerifyError> {
    let header = |name: &'static str| {
        headers
            .get(name)
            .ok_or(VerifyError::MissingHeader(name))?
            .to_str()
            .map_err(|_| VerifyError::MalformedHeader(name))
    };
    let msg_id = header(WEBHOOK_ID)?;
    let timestamp_s: i64 = header(WEBHOOK_TIMESTAMP)?
        .trim()
        .parse()
        .map_err(|_| VerifyError::MalformedHeader(WEBHOOK_TIMESTAMP))?;
    let signatures = header(WEBHOOK_SIGNATURE)?;
    if timestamp_s < now_s.saturating_sub(TOLERANCE_S) {
        return Err(VerifyError::TooOld);
    }
    if timestamp_s > now_s.saturating_add(TOLERANCE_S) {
        return Err(VerifyError::TooNew);
    }
    // Entries that are not `v1` or not base64 are skipped, as the reference libraries skip
    // them: a sender may add versions this receiver does not know.
    let candidates: Vec<Vec<u8>> = signatures
        .split(' ')
        .filter_map(|entry| entry.split_once(','))
        .filter(|(version, _)| *version == VERSION)
        .filter_map(|(_, tag)| base64::engine::general_purpose::STANDARD.decode(tag).ok())
        .collect();
    let matched = secrets.keys().any(|key| {
        let mac = mac(key, msg_id, timestamp_s, body);
        candidates
            .iter()
            .any(|tag| mac.clone().verify_slice(tag).is_ok())
    });
    if matched {
        Ok(())
    } else {
        Err(VerifyError::NoMatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The test vector of the Standard Webhooks reference libraries.
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const MSG_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TIMESTAMP: i64 = 1_614_265_330;
    const PAYLOAD: &[u8] = br#"{"test": 2432232314}"#;
    const EXPECTED: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    const OTHER: &str = "whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    fn secrets(text: &str) -> Secrets {
        Secrets::parse(text).unwrap()
    }

    fn headers(msg_id: &str, timestamp_s: i64, signature: &str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert(WEBHOOK_ID, msg_id.parse().unwrap());
        headers.insert(WEBHOOK_TIMESTAMP, timestamp_s.to_string().parse().unwrap());
        headers.insert(WEBHOOK_SIGNATURE, signature.parse().unwrap());
        headers
    }

    fn now_s() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            .try_into()
            .unwrap()
    }

    #[test]
    fn the_specification_test_vector_is_reproduced_and_verified() {
        let signature = signature_header(&secrets(SECRET), MSG_ID, TIMESTAMP, PAYLOAD);
        assert_eq!(signature, EXPECTED);
        let headers = headers(MSG_ID, TIMESTAMP, EXPECTED);
        assert_eq!(
            verify(&secrets(SECRET), &headers, PAYLOAD, TIMESTAMP),
            Ok(())
        );
    }

    #[test]
    fn every_secret_signs_in_order() {
        let both = signature_header(
            &secrets(&format!("{SECRET} {OTHER}")),
            MSG_ID,
            TIMESTAMP,
            PAYLOAD,
        );
        let other = signature_header(&secrets(OTHER), MSG_ID, TIMESTAMP, PAYLOAD);
        assert_eq!(both, format!("{EXPECTED} {other}"));
    }

    #[test]
    fn any_entry_matching_any_secret_passes() {
        let other_only = signature_header(&secrets(OTHER), MSG_ID, TIMESTAMP, PAYLOAD);
        // The receiver knows both secrets (it is rotating); the sender signs with one.
        let receiver = secrets(&format!("{SECRET} {OTHER}"));
        for signature in [
            EXPECTED.to_owned(),
            other_only.clone(),
            format!("v2,abc {other_only}"),
            format!("v1,bm90LWEtbWFj {EXPECTED}"),
            format!("garbage v1,!!! {EXPECTED}"),
        ] {
            let headers = headers(MSG_ID, TIMESTAMP, &signature);
            assert_eq!(
                verify(&receiver, &headers, PAYLOAD, TIMESTAMP),
                Ok(()),
                "{signature}"
            );
        }
    }

    #[test]
    fn what_does_not_match_is_refused() {
        let keys = secrets(SECRET);
        let cases = [
            (
                headers(MSG_ID, TIMESTAMP, EXPECTED),
                &b"{\"test\": 2432232315}"[..],
                VerifyError::NoMatch,
            ),
            (
                headers("msg_other", TIMESTAMP, EXPECTED),
                PAYLOAD,
                VerifyError::NoMatch,
            ),
            (
                headers(
                    MSG_ID,
                    TIMESTAMP,
                    "v2,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
                ),
                PAYLOAD,
                VerifyError::NoMatch,
            ),
            (
                headers(MSG_ID, TIMESTAMP, "v1,"),
                PAYLOAD,
                VerifyError::NoMatch,
            ),
            // A prefix of the right MAC.
            (
                headers(MSG_ID, TIMESTAMP, "v1,g0hM9SsE"),
                PAYLOAD,
                VerifyError::NoMatch,
            ),
            (
                headers(
                    MSG_ID,
                    TIMESTAMP,
                    &signature_header(&secrets(OTHER), MSG_ID, TIMESTAMP, PAYLOAD),
                ),
                PAYLOAD,
                VerifyError::NoMatch,
            ),
        ];
        for (headers, body, expected) in cases {
            assert_eq!(
                verify(&keys, &headers, body, TIMESTAMP),
                Err(expected),
                "{headers:?}"
            );
        }
    }

    #[test]
    fn the_timestamp_must_be_within_five_minutes_either_way() {
        let keys = secrets(SECRET);
        let signed = headers(MSG_ID, TIMESTAMP, EXPECTED);
        for now in [TIMESTAMP - TOLERANCE_S, TIMESTAMP, TIMESTAMP + TOLERANCE_S] {
            assert_eq!(verify(&keys, &signed, PAYLOAD, now), Ok(()));
        }
        assert_eq!(
            verify(&keys, &signed, PAYLOAD, TIMESTAMP + TOLERANCE_S + 1),
            Err(VerifyError::TooOld)
        );
        assert_eq!(
            verify(&keys, &signed, PAYLOAD, TIMESTAMP - TOLERANCE_S - 1),
            Err(VerifyError::TooNew)
        );
        // No overflow at the ends of the range.
        let extreme = headers(MSG_ID, i64::MAX, EXPECTED);
        assert_eq!(
            verify(&keys, &extreme, PAYLOAD, i64::MIN),
            Err(VerifyError::TooNew)
        );
        let extreme = headers(MSG_ID, i64::MIN, EXPECTED);
        assert_eq!(
            verify(&keys, &extreme, PAYLOAD, i64::MAX),
            Err(VerifyError::TooOld)
        );
    }

    #[test]
    fn missing_and_malformed_headers_are_named() {
        let keys = secrets(SECRET);
        for name in [WEBHOOK_ID, WEBHOOK_TIMESTAMP, WEBHOOK_SIGNATURE] {
            let mut headers = headers(MSG_ID, TIMESTAMP, EXPECTED);
            headers.remove(name);
            assert_eq!(
                verify(&keys, &headers, PAYLOAD, TIMESTAMP),
                Err(VerifyError::MissingHeader(name))
            );
            headers.insert(name, http::HeaderValue::from_bytes(b"\xff").unwrap());
            assert_eq!(
                verify(&keys, &headers, PAYLOAD, TIMESTAMP),
                Err(VerifyError::MalformedHeader(name))
            );
        }
        let mut headers = headers(MSG_ID, TIMESTAMP, EXPECTED);
        headers.insert(WEBHOOK_TIMESTAMP, "2021-02-25T15:42:10Z".parse().unwrap());
        assert_eq!(
            verify(&keys, &headers, PAYLOAD, TIMESTAMP),
            Err(VerifyError::MalformedHeader(WEBHOOK_TIMESTAMP))
        );
    }

    /// What receivers run: the Standard Webhooks reference library accepts our signatures,
    /// from each of several secrets, of a CloudEvent body as the gateway sends it.
    #[test]
    fn the_reference_library_verifies_our_signatures() {
        let notice = super::super::event::Notice {
            request_id: "req-1".into(),
            recipient: "ad-platform-sync".into(),
            pkey: Some("@AAAx".into()),
            opt_out: true,
            source: "WEB_FORM",
            received_at_ms: 1_700_000_000_000,
            email_sha256: None,
        };
        let body = super::super::event::body(&notice, 1_700_000_000_123);
        let msg_id = super::super::event::event_id(&notice.request_id, &notice.recipient);
        // The reference library checks the timestamp against the system clock.
        let now = now_s();
        let signature =
            signature_header(&secrets(&format!("{SECRET} {OTHER}")), &msg_id, now, &body);
        let headers = headers(&msg_id, now, &signature);
        for secret in [SECRET, OTHER] {
            let reference = standardwebhooks::Webhook::new(secret).unwrap();
            reference.verify(&body, &headers).unwrap();
            // And it signs as we do.
            let ours = signature_header(&secrets(secret), &msg_id, now, &body);
            assert_eq!(reference.sign(&msg_id, now, &body).unwrap(), ours);
        }
        // A key it was not signed with is refused by it too.
        let stranger =
            standardwebhooks::Webhook::new("whsec_c3RyYW5nZXItc3RyYW5nZXItc3RyYW5nZXI=").unwrap();
        assert!(stranger.verify(&body, &headers).is_err());

        // The other way: what the reference library signs, we verify.
        let reference = standardwebhooks::Webhook::new(OTHER).unwrap();
        let signed = reference.sign(&msg_id, now, &body).unwrap();
        assert_eq!(
            verify(
                &secrets(OTHER),
                &self::headers(&msg_id, now, &signed),
                &body,
                now
            ),
            Ok(())
        );
    }
}
