//! Between the ledger's types and the wire contract's.

use super::timestamps::{acs_timestamp_to_proto, ms_to_proto};
use crate::optout::read::Reading;
use crate::proto::ccpa_v1::{
    DeliveryState, LatestRequest, NotificationState as ProtoNotificationState, OptOutChange,
    OptOutRecord, ProfileOptOut, RecipientNotification, RequestSource,
};
use crate::store::{Change, Kind, Notification, NotificationState, Record, Source, State};

/// The wire form of a state.
pub fn delivery_state(state: State) -> DeliveryState {
    match state {
        State::Pending => DeliveryState::Pending,
        State::Applied => DeliveryState::Applied,
        State::Failed => DeliveryState::Failed,
        State::Superseded => DeliveryState::Superseded,
    }
}

/// The ledger form of a wire state; `None` for UNSPECIFIED or an unknown value.
pub fn ledger_state(value: i32) -> Option<State> {
    match DeliveryState::try_from(value).ok()? {
        DeliveryState::Unspecified => None,
        DeliveryState::Pending => Some(State::Pending),
        DeliveryState::Applied => Some(State::Applied),
        DeliveryState::Failed => Some(State::Failed),
        DeliveryState::Superseded => Some(State::Superseded),
    }
}

/// The wire form of a source: the one conversion from the ledger's sources to the contract's.
impl From<Source> for RequestSource {
    fn from(source: Source) -> Self {
        match source {
            Source::GlobalPrivacyControl => Self::GlobalPrivacyControl,
            Source::WebForm => Self::WebForm,
            Source::Email => Self::Email,
            Source::Phone => Self::Phone,
            Source::PostalMail => Self::PostalMail,
            Source::InPerson => Self::InPerson,
            Source::AuthorizedAgent => Self::AuthorizedAgent,
            Source::Internal => Self::Internal,
        }
    }
}

/// A wire source the ledger has no form for: UNSPECIFIED (the regulations require the manner of
/// each request, so no request is recorded without one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnspecifiedSource;

/// The ledger form of a wire source: the one conversion from the contract's sources to the
/// ledger's.
impl TryFrom<RequestSource> for Source {
    type Error = UnspecifiedSource;

    fn try_from(source: RequestSource) -> Result<Self, UnspecifiedSource> {
        Ok(match source {
            RequestSource::Unspecified => return Err(UnspecifiedSource),
            RequestSource::GlobalPrivacyControl => Self::GlobalPrivacyControl,
            RequestSource::WebForm => Self::WebForm,
            RequestSource::Email => Self::Email,
            RequestSource::Phone => Self::Phone,
            RequestSource::PostalMail => Self::PostalMail,
            RequestSource::InPerson => Self::InPerson,
            RequestSource::AuthorizedAgent => Self::AuthorizedAgent,
            RequestSource::Internal => Self::Internal,
        })
    }
}

/// The wire form of a change of the feed.
pub fn opt_out_change(change: &Change) -> OptOutChange {
    OptOutChange {
        cursor: super::changes::encode_cursor(change.at),
        request_id: change.request_id.clone(),
        pkey: change.pkey.clone(),
        ccpa_opt_out: change.opt_out,
        source: RequestSource::from(change.source) as i32,
        received_at: Some(ms_to_proto(change.received_at)),
        state: delivery_state(change.state) as i32,
        changed_at: Some(ms_to_proto(change.changed_at)),
        honored_at: change.honored_at.map(ms_to_proto),
    }
}

/// The wire form of a record.
pub fn opt_out_record(record: &Record) -> OptOutRecord {
    OptOutRecord {
        request_id: record.request_id.clone(),
        pkey: record.pkey.clone().unwrap_or_default(),
        ccpa_opt_out: record.opt_out,
        source: RequestSource::from(record.source) as i32,
        received_at: Some(ms_to_proto(record.received_at)),
        recorded_at: Some(ms_to_proto(record.recorded_at)),
        caller: record.caller.clone(),
        state: delivery_state(record.state) as i32,
        answered_at: record.answered_at.map(ms_to_proto),
        resolved_at: record.resolved_at.map(ms_to_proto),
        attempts: i32::try_from(record.attempts).unwrap_or(i32::MAX),
        last_error: record.last_error.clone().unwrap_or_default(),
        failure_reason: record.failure_reason.clone().unwrap_or_default(),
        superseded_by: record.superseded_by.clone().unwrap_or_default(),
        profile_creation: record.kind == Kind::CreateProfile,
        parent_request_id: record.parent_request_id.clone().unwrap_or_default(),
        by_email: record.kind == Kind::SetByEmail,
        restores_request_id: record.restores_request_id.clone().unwrap_or_default(),
    }
}

/// The wire form of a notification to a recipient.
pub fn recipient_notification(notification: &Notification) -> RecipientNotification {
    let state = match notification.state {
        NotificationState::Pending => ProtoNotificationState::Pending,
        NotificationState::Delivered => ProtoNotificationState::Delivered,
        NotificationState::Failed => ProtoNotificationState::Failed,
    };
    RecipientNotification {
        recipient: notification.recipient.clone(),
        state: state as i32,
        attempts: i32::try_from(notification.attempts).unwrap_or(i32::MAX),
        delivered_at: notification.delivered_at.map(ms_to_proto),
        last_failure_class: notification.last_failure_class.clone().unwrap_or_default(),
        failure_reason: notification.failure_reason.clone().unwrap_or_default(),
        next_attempt_at: (notification.state == NotificationState::Pending)
            .then(|| ms_to_proto(notification.next_attempt_at)),
    }
}

/// The wire form of a profile's latest request.
pub fn latest_request(record: &Record) -> LatestRequest {
    LatestRequest {
        request_id: record.request_id.clone(),
        source: RequestSource::from(record.source) as i32,
        received_at: Some(ms_to_proto(record.received_at)),
        state: delivery_state(record.state) as i32,
        honored_at: match record.state {
            State::Applied => record.resolved_at.map(ms_to_proto),
            _ => None,
        },
        ccpa_opt_out: record.opt_out,
    }
}

/// The wire form of one profile's read.
pub fn profile_opt_out(reading: &Reading) -> ProfileOptOut {
    ProfileOptOut {
        pkey: reading.pkey.clone(),
        ccpa_opt_out: reading.opt_out,
        ccpa_opt_out_last_modified: reading
            .last_modified
            .as_deref()
            .and_then(acs_timestamp_to_proto),
        change_pending: reading.change_pending,
        drift_detected: reading.drift_detected,
        latest_request: reading.latest_request.as_ref().map(latest_request),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_ledger_source_goes_to_the_wire_and_back() {
        for &source in Source::ALL {
            assert_eq!(Source::try_from(RequestSource::from(source)), Ok(source));
        }
        assert_eq!(
            Source::try_from(RequestSource::Unspecified),
            Err(UnspecifiedSource)
        );
    }
}
