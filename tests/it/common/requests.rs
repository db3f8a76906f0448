//! The requests the tests make, built one way: the common case of each, which a test changes
//! with struct update syntax where it needs something else.

use ccpa_gateway::proto::ccpa_v1::ccpa_service_client::CcpaServiceClient;
use ccpa_gateway::proto::ccpa_v1::{
    GetOptOutRecordRequest, GetOptOutRecordResponse, GetOptOutRequest, GetOptOutResponse,
    ListOptOutRecordsRequest, OptOutRecord, RequestSource, SetOptOutRequest,
};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;

/// A SetOptOut of `pkey` to `opt_out`, made through a web form, under `request_id` (empty: the
/// gateway names it).
pub fn set(pkey: &str, opt_out: bool, request_id: &str) -> SetOptOutRequest {
    SetOptOutRequest {
        pkey: pkey.into(),
        ccpa_opt_out: Some(opt_out),
        source: RequestSource::WebForm as i32,
        request_id: request_id.into(),
        ..Default::default()
    }
}

/// A GetOptOut of `pkey`.
pub fn get(pkey: &str) -> GetOptOutRequest {
    GetOptOutRequest {
        pkey: pkey.into(),
        ..Default::default()
    }
}

/// A health check of `service` (empty: the server as a whole).
pub fn health_request(service: &str) -> HealthCheckRequest {
    HealthCheckRequest {
        service: service.into(),
    }
}

/// GetOptOut by key, which must succeed.
pub async fn opt_out_of(client: &mut CcpaServiceClient<Channel>, pkey: &str) -> GetOptOutResponse {
    client.get_opt_out(get(pkey)).await.unwrap().into_inner()
}

/// GetOptOutRecord of `request_id`, which must succeed: the record and its notifications.
pub async fn record_response(
    client: &mut CcpaServiceClient<Channel>,
    request_id: &str,
) -> GetOptOutRecordResponse {
    client
        .get_opt_out_record(GetOptOutRecordRequest {
            request_id: request_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// One record of the ledger, by request id; it must exist.
pub async fn record(client: &mut CcpaServiceClient<Channel>, request_id: &str) -> OptOutRecord {
    record_response(client, request_id).await.record.unwrap()
}

/// Every record of a profile (up to a hundred), newest first.
pub async fn records_of(client: &mut CcpaServiceClient<Channel>, pkey: &str) -> Vec<OptOutRecord> {
    client
        .list_opt_out_records(ListOptOutRecordsRequest {
            pkey: pkey.into(),
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .records
}
