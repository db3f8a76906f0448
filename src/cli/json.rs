//! The API's answers in the proto3 JSON mapping, as grpcurl prints them: field names in
//! camelCase, enums by their full names (`DELIVERY_STATE_APPLIED`), instants in RFC 3339, 64-bit
//! integers as strings.
//!
//! The serde impls are pbjson's, generated (by `build.rs`) for a twin of the messages rather than
//! for the API's own types, which the client of other Rust services uses: their
//! `prost_types::Timestamp` has no serde impl, and the alternative (pbjson-types' `Timestamp`
//! in every message) would change the client's types and bring serde into it. The twin has the
//! same fields and tags, so an answer becomes its twin by being encoded and decoded again
//! ([`twin_of`]); only its `Timestamp` differs, the one below.
//!
//! Every field is printed, also at its default value, as `grpcurl -emit-defaults` prints them:
//! `"ccpaOptOut": false` is an answer, and a script reading the field should not find it missing.
//! A message field that is not set (an instant never reached, no latest request) is left out, as
//! `null` would say no more.

use chrono::{DateTime, SecondsFormat, Utc};
use prost::Message as _;
use serde::de::Error as _;
use serde::ser::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::proto::ccpa_v1;

/// `ccpa.v1`, again, with serde impls (pbjson's): generated, never edited.
mod twin {
    #![allow(missing_docs, dead_code, clippy::all, clippy::pedantic)]
    include!(concat!(env!("OUT_DIR"), "/json/ccpa.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/json/ccpa.v1.serde.rs"));
}

/// `google.protobuf.Timestamp` in the twin: the same fields on the wire, printed as the proto3
/// JSON mapping says and grpcurl prints, in UTC with `Z` and 0, 3, 6 or 9 fractional digits
/// (pbjson-types' own prints `+00:00`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, prost::Message)]
pub struct Timestamp {
    /// Seconds since the Unix epoch.
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    /// Nanoseconds within the second (0 to 999,999,999).
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let at = u32::try_from(self.nanos)
            .ok()
            .and_then(|nanos| DateTime::<Utc>::from_timestamp(self.seconds, nanos))
            .ok_or_else(|| S::Error::custom("a timestamp out of range"))?;
        serializer.serialize_str(&at.to_rfc3339_opts(SecondsFormat::AutoSi, true))
    }
}

/// pbjson's generated code reads messages too, so the twin's `Timestamp` must be readable; the
/// CLI itself reads none.
impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let at = DateTime::parse_from_rfc3339(&text).map_err(D::Error::custom)?;
        Ok(Self {
            seconds: at.timestamp(),
            // Below 1,000,000,000, so within an i32.
            nanos: i32::try_from(at.timestamp_subsec_nanos()).map_err(D::Error::custom)?,
        })
    }
}

/// An answer of the API that the CLI prints, and its twin.
pub(super) trait Printed: prost::Message {
    /// The same message in the twin, which serde prints.
    type Twin: prost::Message + Default + Serialize;
}

macro_rules! printed {
    ($($message:ident),* $(,)?) => {
        $(impl Printed for ccpa_v1::$message {
            type Twin = twin::$message;
        })*
    };
}

printed!(
    GetOptOutResponse,
    SetOptOutResponse,
    CreateProfileResponse,
    OptOutChange,
);

/// `message`'s twin, to print: the same bytes, decoded as the twin.
pub(super) fn twin_of<M: Printed>(message: &M) -> Result<M::Twin, prost::DecodeError> {
    M::Twin::decode(message.encode_to_vec().as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::ccpa_v1::{
        DeliveryState, GetOptOutResponse, LatestRequest, OptOutChange, RequestSource,
    };

    fn at(seconds: i64, nanos: i32) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp { seconds, nanos })
    }

    #[test]
    fn answers_print_as_grpcurl_emit_defaults_prints_them() {
        let change = OptOutChange {
            cursor: "v1.1.2".into(),
            request_id: "r-1".into(),
            pkey: "@abc".into(),
            ccpa_opt_out: true,
            source: RequestSource::WebForm as i32,
            received_at: at(1_795_000_000, 0),
            state: DeliveryState::Applied as i32,
            changed_at: at(1_795_000_001, 120_000_000),
            honored_at: None,
        };
        let printed = serde_json::to_string(&twin_of(&change).unwrap()).unwrap();
        assert_eq!(
            printed,
            r#"{"cursor":"v1.1.2","requestId":"r-1","pkey":"@abc","ccpaOptOut":true,"source":"REQUEST_SOURCE_WEB_FORM","receivedAt":"2026-11-18T11:06:40Z","state":"DELIVERY_STATE_APPLIED","changedAt":"2026-11-18T11:06:41.120Z"}"#
        );

        let answer = GetOptOutResponse {
            pkey: "@abc".into(),
            latest_request: Some(LatestRequest {
                honored_at: at(1_795_000_000, 1_500),
                ..Default::default()
            }),
            ..Default::default()
        };
        let printed = serde_json::to_value(twin_of(&answer).unwrap()).unwrap();
        assert_eq!(
            printed,
            serde_json::json!({
                "pkey": "@abc",
                "ccpaOptOut": false,
                "changePending": false,
                "profiles": [],
                "driftDetected": false,
                "latestRequest": {
                    "requestId": "",
                    "source": "REQUEST_SOURCE_UNSPECIFIED",
                    "state": "DELIVERY_STATE_UNSPECIFIED",
                    "honoredAt": "2026-11-18T11:06:40.000001500Z",
                    "ccpaOptOut": false,
                },
            })
        );
    }

    #[test]
    fn a_timestamp_reads_back_what_it_prints() {
        let stamp = Timestamp {
            seconds: 1_795_000_000,
            nanos: 7_000_000,
        };
        let text = serde_json::to_string(&stamp).unwrap();
        assert_eq!(text, r#""2026-11-18T11:06:40.007Z""#);
        assert_eq!(serde_json::from_str::<Timestamp>(&text).unwrap(), stamp);
    }
}
