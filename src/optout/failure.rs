//! What an upstream failure means for the request it stopped, in the ledger's words.

use acs_profile_client::{CallError, Failure};

use crate::store::FailureCode;
use crate::upstream::UpstreamError;

impl From<&UpstreamError> for FailureCode {
    /// The caller is told the same through `api::error_mapping`'s table; a test there checks the
    /// two agree row by row.
    fn from(error: &UpstreamError) -> Self {
        match error {
            UpstreamError::EmptyCollection => Self::ProfileNotFound,
            UpstreamError::MissingField(_) => Self::Internal,
            UpstreamError::Call(call) => match call.as_ref() {
                CallError::DeadlineExceeded { .. } => Self::DeadlinePassed,
                // The gateway's own queue toward ACS was full: nothing was sent.
                CallError::Throttled => Self::Unavailable,
                CallError::Api(e) => match Failure::classify(e) {
                    Failure::NotFound | Failure::UnparsableKey => Self::ProfileNotFound,
                    Failure::Conflict => Self::ProfileConflict,
                    Failure::Transient { .. }
                    | Failure::Unreachable
                    | Failure::Interrupted { .. }
                    | Failure::MalformedResponse
                    | Failure::EndpointNotFound
                    | Failure::NoToken => Self::Unavailable,
                    Failure::TokenRejected
                    | Failure::AccessDenied
                    | Failure::Refused { .. }
                    | Failure::ServerError { .. }
                    | Failure::InvalidRequest => Self::Internal,
                },
            },
        }
    }
}
