//! GetOptOutRecord and ListOptOutRecords: the ledger, read over gRPC.
//!
//! Listing follows AIP-158: `page_size` defaults to 50 and is capped at 1,000; `page_token` is
//! opaque, and only valid with the filters it was issued for.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use tonic::{Code, Status};

use super::convert::{ledger_state, opt_out_record, recipient_notification};
use super::error_mapping::{Reason, gateway_status};
use super::service::CcpaApi;
use super::timestamps::proto_to_ms;
use super::validation::Violations;
use crate::proto::ccpa_v1::{
    GetOptOutRecordRequest, GetOptOutRecordResponse, ListOptOutRecordsRequest,
    ListOptOutRecordsResponse,
};
use crate::store::{Cursor, ListFilter};

/// Page size when the caller gives none.
pub const DEFAULT_PAGE_SIZE: i64 = 50;
/// The largest page; larger sizes are reduced to it.
pub const MAX_PAGE_SIZE: i64 = 1_000;

/// What a page token carries: where the next page starts, and a fingerprint of the filters it
/// belongs to.
#[derive(Serialize, Deserialize)]
struct PageToken {
    filter: u64,
    received_at: i64,
    request_id: String,
}

/// A digest of the filters, stable across builds and Rust versions (unlike `DefaultHasher`), so
/// that a token stays valid on another replica or after an upgrade.
fn fingerprint(filter: &ListFilter) -> u64 {
    use sha2::{Digest, Sha256};
    let filters = serde_json::json!([
        filter.pkey,
        filter.received_after,
        filter.received_before,
        filter.state.map(|s| s.as_str()),
    ]);
    let digest = Sha256::digest(filters.to_string().as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

fn encode_token(filter: &ListFilter, cursor: &Cursor) -> String {
    let token = PageToken {
        filter: fingerprint(filter),
        received_at: cursor.received_at,
        request_id: cursor.request_id.clone(),
    };
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(&token).unwrap_or_default())
}

fn decode_token(filter: &ListFilter, token: &str) -> Option<Cursor> {
    let bytes = URL_SAFE_NO_PAD.decode(token).ok()?;
    let token: PageToken = serde_json::from_slice(&bytes).ok()?;
    (token.filter == fingerprint(filter)).then_some(Cursor {
        received_at: token.received_at,
        request_id: token.request_id,
    })
}

impl CcpaApi {
    pub(super) async fn get_record(
        &self,
        request: GetOptOutRecordRequest,
    ) -> Result<GetOptOutRecordResponse, Status> {
        let mut violations = Violations::default();
        if request.request_id.is_empty() {
            violations.malformed("request_id", "request_id is required".to_owned());
        }
        violations.request_id("request_id", &request.request_id);
        violations.into_result()?;
        let record = self
            .ledger()
            .get(&request.request_id)
            .await?
            .ok_or_else(|| {
                gateway_status(
                    Code::NotFound,
                    Reason::RecordNotFound,
                    "no request has this id in the ledger",
                )
            })?;
        let notifications = self.ledger().notifications_of(&record).await?;
        Ok(GetOptOutRecordResponse {
            record: Some(opt_out_record(&record)),
            notifications: notifications.iter().map(recipient_notification).collect(),
        })
    }

    pub(super) async fn list_records(
        &self,
        request: ListOptOutRecordsRequest,
    ) -> Result<ListOptOutRecordsResponse, Status> {
        let mut violations = Violations::default();
        if !request.pkey.is_empty() {
            violations.pkey("pkey", &request.pkey);
        }
        violations.page_size("page_size", request.page_size);
        let state = match request.state {
            0 => None,
            value => {
                let state = ledger_state(value);
                if state.is_none() {
                    violations.malformed("state", "state is not a known DeliveryState".to_owned());
                }
                state
            }
        };
        let filter = ListFilter {
            pkey: (!request.pkey.is_empty()).then_some(request.pkey),
            received_after: request.received_after.as_ref().map(proto_to_ms),
            received_before: request.received_before.as_ref().map(proto_to_ms),
            state,
        };
        let cursor = if request.page_token.is_empty() {
            None
        } else {
            let cursor = decode_token(&filter, &request.page_token);
            if cursor.is_none() {
                violations.malformed(
                    "page_token",
                    "page_token is not one this listing issued with these filters".to_owned(),
                );
            }
            cursor
        };
        violations.into_result()?;

        let page_size = match i64::from(request.page_size) {
            0 => DEFAULT_PAGE_SIZE,
            size => size.min(MAX_PAGE_SIZE),
        };
        // One more than the page: whether it exists says whether there is a next page.
        let mut records = self
            .ledger()
            .list(&filter, cursor.as_ref(), page_size + 1)
            .await?;
        let next_page_token = if records.len() as i64 > page_size {
            records.truncate(usize::try_from(page_size).unwrap_or(usize::MAX));
            records.last().map_or_else(String::new, |last| {
                encode_token(
                    &filter,
                    &Cursor {
                        received_at: last.received_at,
                        request_id: last.request_id.clone(),
                    },
                )
            })
        } else {
            String::new()
        };
        Ok(ListOptOutRecordsResponse {
            records: records.iter().map(opt_out_record).collect(),
            next_page_token,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::ccpa_v1::DeliveryState;
    use crate::store::State;

    #[test]
    fn tokens_only_work_with_their_filters() {
        let filter = ListFilter {
            pkey: Some("@abc".into()),
            ..Default::default()
        };
        let cursor = Cursor {
            received_at: 42,
            request_id: "r-1".into(),
        };
        let token = encode_token(&filter, &cursor);
        assert_eq!(decode_token(&filter, &token), Some(cursor));
        let other = ListFilter {
            state: Some(State::Pending),
            ..filter
        };
        assert_eq!(decode_token(&other, &token), None);
        assert_eq!(decode_token(&other, "garbage"), None);
    }

    #[test]
    fn the_unspecified_state_filters_nothing() {
        assert_eq!(ledger_state(DeliveryState::Unspecified as i32), None);
        assert_eq!(
            ledger_state(DeliveryState::Pending as i32),
            Some(State::Pending)
        );
    }
}
