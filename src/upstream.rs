//! A failure on the way to ACS, or in what it answered, in terms that belong to neither side of
//! the gateway: the ledger records what it means (`FailureCode`'s `From<&UpstreamError>`, in `crate::optout`), and the
//! API tells the caller (`api::error_mapping`). Both read it here, so neither imports the other.

use std::time::Duration;

use acs_profile_client::{CallError, Failure, retry_after};

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

/// What kind of failure an upstream error is, in the gateway's terms: one for each row of the
/// table in `api::error_mapping`, which turns it into a status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// ACS said the profile does not exist (or cannot read its key), or answered a read with
    /// nothing.
    ProfileNotFound,
    /// ACS reported a conflicting profile.
    Conflict,
    /// ACS (or its gateway) is overloaded or unavailable: 429, 502, 503, 504.
    Overloaded,
    /// ACS could not be reached.
    Unreachable,
    /// The call was broken or timed out mid-way.
    Interrupted,
    /// A success whose body could not be read.
    MalformedResponse,
    /// A 404 without ACS's own error: a proxy, a wrong base path or tenant.
    EndpointNotFound,
    /// No access token could be obtained.
    NoToken,
    /// ACS refused the gateway's credentials (401 after a refresh, 403).
    CredentialsRejected,
    /// Any other 4xx.
    Refused,
    /// Any other 5xx, or a status ACS never sends.
    ServerError,
    /// The client could not build the request.
    Misconfigured,
    /// ACS's answer lacked a field the gateway needs.
    ContractBroken,
    /// The call's deadline passed first.
    DeadlineExceeded,
    /// Too many calls already wait for their turn toward ACS.
    QueueFull,
}

/// An upstream failure, classified: what it is, its stable name (the ACS client crate's, which
/// the gateway sends as its `ErrorInfo` reason), and what ACS's answer said of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classified {
    /// What kind of failure it is.
    pub cause: Cause,
    /// The ACS client crate's name for it (`ACS_UNAVAILABLE`, ...), for the failures that
    /// crate names; `None` for the gateway's own (deadline, queue, a broken contract).
    pub name: Option<&'static str>,
    /// The HTTP status ACS (or a proxy) answered, if it answered.
    pub http_status: Option<u16>,
    /// The delay its `Retry-After` asked for, if it did.
    pub retry_after: Option<Duration>,
    /// For [`Cause::ContractBroken`]: the field that was missing.
    pub missing_field: Option<&'static str>,
}

impl Classified {
    fn own(cause: Cause) -> Self {
        Self {
            cause,
            name: None,
            http_status: None,
            retry_after: None,
            missing_field: None,
        }
    }
}

impl UpstreamError {
    /// What kind of failure this is, and what ACS's answer said of it.
    pub fn classify(&self) -> Classified {
        match self {
            Self::Call(call) => match call.as_ref() {
                CallError::Api(error) => {
                    let failure = Failure::classify(error);
                    let cause = match failure {
                        Failure::NotFound | Failure::UnparsableKey => Cause::ProfileNotFound,
                        Failure::Conflict => Cause::Conflict,
                        Failure::Transient { .. } => Cause::Overloaded,
                        Failure::Unreachable => Cause::Unreachable,
                        Failure::Interrupted { .. } => Cause::Interrupted,
                        Failure::MalformedResponse => Cause::MalformedResponse,
                        Failure::EndpointNotFound => Cause::EndpointNotFound,
                        Failure::NoToken => Cause::NoToken,
                        Failure::TokenRejected | Failure::AccessDenied => {
                            Cause::CredentialsRejected
                        }
                        Failure::Refused { .. } => Cause::Refused,
                        Failure::ServerError { .. } => Cause::ServerError,
                        Failure::InvalidRequest => Cause::Misconfigured,
                    };
                    Classified {
                        cause,
                        name: Some(failure.name()),
                        http_status: error.status().map(|status| status.as_u16()),
                        retry_after: retry_after(error),
                        missing_field: None,
                    }
                }
                CallError::DeadlineExceeded { .. } => Classified::own(Cause::DeadlineExceeded),
                CallError::Throttled => Classified::own(Cause::QueueFull),
            },
            Self::EmptyCollection => Classified {
                name: Some(Failure::NotFound.name()),
                ..Classified::own(Cause::ProfileNotFound)
            },
            Self::MissingField(field) => Classified {
                missing_field: Some(field),
                ..Classified::own(Cause::ContractBroken)
            },
        }
    }

    /// An answer of ACS with `status` and no body, as the client reports it: for tests of what
    /// each answer means.
    #[cfg(test)]
    pub fn answered(status: u16) -> Self {
        let response = http::Response::builder()
            .status(status)
            .body(Vec::<u8>::new())
            .expect("a status and an empty body make a response");
        CallError::Api(acs_profile_client::Error::UnexpectedResponse(
            reqwest::Response::from(response),
        ))
        .into()
    }

    /// A call whose deadline passed, with its request `sent` or not: for tests.
    #[cfg(test)]
    pub fn deadline_exceeded(sent: bool) -> Self {
        CallError::DeadlineExceeded { sent }.into()
    }

    /// A call refused by the gateway's own queue toward ACS: for tests.
    #[cfg(test)]
    pub fn queue_full() -> Self {
        CallError::Throttled.into()
    }

    /// Every failure the ACS client crate names, as the gateway meets it: for tests that each
    /// has a reason and a row.
    #[cfg(test)]
    pub fn every_named_failure() -> Vec<&'static str> {
        let status = http::StatusCode::SERVICE_UNAVAILABLE;
        [
            Failure::Unreachable,
            Failure::Interrupted { timed_out: true },
            Failure::NoToken,
            Failure::TokenRejected,
            Failure::AccessDenied,
            Failure::NotFound,
            Failure::EndpointNotFound,
            Failure::UnparsableKey,
            Failure::Conflict,
            Failure::Transient { status },
            Failure::Refused { status },
            Failure::ServerError { status },
            Failure::MalformedResponse,
            Failure::InvalidRequest,
        ]
        .iter()
        .map(Failure::name)
        .collect()
    }
}
