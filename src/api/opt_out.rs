//! GetOptOut and SetOptOut: the protective read, and the recorded, delivered write.

use tonic::Status;
use tonic::metadata::MetadataMap;

use super::convert::delivery_state;
use super::error_mapping::{ledger_status, replayed_failure};
use super::service::{CcpaApi, Deadline, caller_of, upstream};
use super::validation::{Violations, request_id_conflict};
use crate::ledger::delivery::Attempt;
use crate::ledger::{Kind, NewRequest, Record, Recorded, State, now_ms};
use crate::proto::ccpa_v1::{
    DeliveryState, GetOptOutRequest, GetOptOutResponse, SetOptOutRequest, SetOptOutResponse,
};

const GET: &str = "GetOptOut";
const SET: &str = "SetOptOut";

impl CcpaApi {
    /// GetOptOut: what ACS holds, made more protective by what is recorded and not yet
    /// delivered. A pending opt-out reads as opted out, even while ACS is unreachable; a pending
    /// opt-in changes nothing until ACS holds it.
    pub(super) async fn get(
        &self,
        request: GetOptOutRequest,
        deadline: Deadline,
    ) -> Result<GetOptOutResponse, Status> {
        let mut violations = Violations::default();
        violations.pkey("pkey", &request.pkey);
        violations.into_result()?;

        let pending = self
            .ledger()
            .pending_change(&request.pkey)
            .await
            .map_err(|e| ledger_status(GET, &e))?;
        let held = self.read_opt_out(&request.pkey, deadline).await;
        let (ccpa_opt_out, last_modified) = match (held, pending) {
            (Ok(state), Some(true)) => (true, state.last_modified),
            (Ok(state), _) => (state.opt_out, state.last_modified),
            // ACS cannot say, but the ledger can: this consumer asked not to be sold.
            (Err(error), Some(true)) if !error.is_not_found() => (true, None),
            (Err(error), _) => return Err(upstream(GET)(error)),
        };
        Ok(GetOptOutResponse {
            pkey: request.pkey,
            ccpa_opt_out,
            ccpa_opt_out_last_modified: last_modified,
            change_pending: pending.is_some(),
        })
    }

    /// SetOptOut: record (durably, before anything else), then apply within the deadline.
    pub(super) async fn set(
        &self,
        request: SetOptOutRequest,
        metadata: &MetadataMap,
        deadline: Deadline,
    ) -> Result<SetOptOutResponse, Status> {
        let mut violations = Violations::default();
        violations.pkey("pkey", &request.pkey);
        let opt_out = violations.required_bool("ccpa_opt_out", request.ccpa_opt_out);
        violations.request_id("request_id", &request.request_id);
        let source = violations.source("source", request.source);
        let received_at =
            violations.received_at("received_at", request.received_at.as_ref(), now_ms());
        let caller = caller_of(metadata, &mut violations);
        violations.into_result()?;
        let Some(source) = source else {
            unreachable!("a missing source is a violation, returned just above");
        };

        let new = NewRequest {
            request_id: request_id_or_new(&request.request_id),
            kind: Kind::SetOptOut,
            pkey: Some(request.pkey.clone()),
            opt_out,
            source,
            received_at,
            caller,
            first_attempt_window_ms: i64::try_from(
                self.delivery.settings().attempt_budget.as_millis(),
            )
            .unwrap_or(i64::MAX),
        };
        let claim = self.delivery.new_claim();
        let (recorded, claimed) = self
            .ledger()
            .record(&new, Some(&claim))
            .await
            .map_err(|e| ledger_status(SET, &e))?;
        let record = match recorded {
            Recorded::Conflict(_) => return Err(request_id_conflict()),
            Recorded::Replay(record) => return self.answer_recorded(&record),
            Recorded::New(record) => record,
        };
        if record.state != State::Pending || !claimed {
            // Overtaken by a newer request, or another delivery of this profile is under way:
            // the deliverer takes it from here.
            self.ledger()
                .mark_answered(&record.request_id)
                .await
                .map_err(|e| ledger_status(SET, &e))?;
            return self.answer_recorded(&record);
        }

        let attempt = self
            .delivery
            .apply(&record, &claim, self.attempt_deadline(deadline), true)
            .await
            .map_err(|e| ledger_status(SET, &e))?;
        let state = match attempt {
            Attempt::Applied => DeliveryState::Applied,
            Attempt::Pending => DeliveryState::Pending,
            Attempt::Superseded => DeliveryState::Superseded,
            Attempt::Failed { .. } => {
                let failed = self
                    .ledger()
                    .get(&record.request_id)
                    .await
                    .map_err(|e| ledger_status(SET, &e))?;
                return Err(failed.as_ref().map_or_else(
                    || Status::not_found("the profile does not exist in Adobe Campaign"),
                    replayed_failure,
                ));
            }
        };

        let mut response = SetOptOutResponse {
            pkey: request.pkey,
            ccpa_opt_out: opt_out,
            ccpa_opt_out_last_modified: None,
            request_id: record.request_id,
            state: state as i32,
        };
        if state == DeliveryState::Applied {
            // ACS answers a PATCH with `{PKey, href}` only. Reading the profile back costs a
            // second call, but it lets the answer say what ACS holds (and when it changed)
            // rather than echo what was asked. If the read fails, the change is still applied.
            match self.read_opt_out(&response.pkey, deadline).await {
                Ok(held) => {
                    if held.opt_out != opt_out {
                        tracing::warn!(
                            rpc = SET,
                            "the opt-out read back differs from the one just set"
                        );
                    }
                    response.ccpa_opt_out = held.opt_out;
                    response.ccpa_opt_out_last_modified = held.last_modified;
                }
                Err(error) => tracing::warn!(
                    rpc = SET,
                    error = ?error,
                    "applied, but the read-back failed; answering the value set"
                ),
            }
        }
        Ok(response)
    }

    /// The answer for a request already recorded: its current state, without calling ACS.
    fn answer_recorded(&self, record: &Record) -> Result<SetOptOutResponse, Status> {
        if record.state == State::Failed {
            return Err(replayed_failure(record));
        }
        Ok(SetOptOutResponse {
            pkey: record.pkey.clone().unwrap_or_default(),
            ccpa_opt_out: record.opt_out,
            ccpa_opt_out_last_modified: None,
            request_id: record.request_id.clone(),
            state: delivery_state(record.state) as i32,
        })
    }
}

/// The caller's request id, or a new one.
pub(super) fn request_id_or_new(given: &str) -> String {
    if given.is_empty() {
        uuid::Uuid::new_v4().to_string()
    } else {
        given.to_owned()
    }
}
