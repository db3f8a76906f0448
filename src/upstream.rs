//! A failure on the way to ACS, or in what it answered, in terms that belong to neither side of
//! the gateway: the ledger records what it means (`FailureCode`'s `From<&UpstreamError>`, in `crate::optout`), and the
//! API tells the caller (`api::error_mapping`). Both read it here, so neither imports the other.

use acs_profile_client::{CallError, Failure};

/// A failure on the way to ACS or in what it answered.
#[derive(Debug)]
pub enum UpstreamError {
    /// The call failed. Boxed: progenitor's error is large, and this travels by value.
    Call(Box<CallError>),
    /// ACS answered a read with an empty collection instead of the profile.
    EmptyCollection,
    /// ACS answered without a field the gateway must read (say, `ccpaOptOut`): answering a
    /// default instead could tell a caller that it may sell data when ACS did not say so.
    MissingField(&'static str),
}

impl UpstreamError {
    /// Whether ACS said the profile does not exist (404, or a key it cannot read).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::EmptyCollection)
            || matches!(
                self,
                Self::Call(call) if matches!(
                    call.as_ref(),
                    CallError::Api(e) if matches!(
                        Failure::classify(e),
                        Failure::NotFound | Failure::UnparsableKey
                    )
                )
            )
    }

    /// What went wrong, for logs and records: a reason and an HTTP status, never a body, a URL
    /// (it holds the key) or a header. (`Debug` would show all of those.)
    pub fn reason(&self) -> String {
        match self {
            Self::Call(call) => call.reason(),
            Self::EmptyCollection => "EMPTY_COLLECTION".to_owned(),
            Self::MissingField(field) => format!("MISSING_FIELD {field}"),
        }
    }
}

impl From<CallError> for UpstreamError {
    fn from(error: CallError) -> Self {
        Self::Call(Box::new(error))
    }
}
