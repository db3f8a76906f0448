//! What a call through [`super::Client`] can fail with, decoded from the status's details so that
//! callers match on enums instead of parsing messages.

use std::time::Duration;

use tonic::Code;
use tonic_types::StatusExt;

pub use crate::proto::error_reasons::{FieldProblem, Reason};

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting of the [`super::ClientBuilder`] cannot be used. Nothing was sent.
    #[error("{setting}: {reason}")]
    Config {
        /// The builder method that was wrong (`addr`, `tls_ca`, `tls_identity`, `caller`,
        /// `deadline`, `connect_timeout`, `retry`).
        setting: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The gateway could not be reached to open the connection.
    #[error("cannot connect to the gateway at {addr}: {source}")]
    Connect {
        /// The address given to the builder.
        addr: String,
        /// What the transport reported.
        #[source]
        source: tonic::transport::Error,
    },
    /// The gateway (or the network on the way) answered the call with an error status.
    #[error("{code:?}{}: {message}", in_parentheses(reason))]
    Status {
        /// The gRPC code.
        code: Code,
        /// `ErrorInfo.reason`; `Reason::Other("")` when the status had none (say, the
        /// transport's own UNAVAILABLE).
        reason: Reason,
        /// The status message: meant for people, not for matching.
        message: String,
        /// `RetryInfo`: how long the gateway asks the caller to wait before calling again.
        retry_after: Option<Duration>,
        /// `BadRequest`: each refused field, with INVALID_ARGUMENT.
        violations: Vec<FieldViolation>,
        /// `ErrorInfo.metadata["permission"]`: the permission a caller refused with
        /// `CALLER_NOT_ALLOWED` lacks.
        missing_permission: Option<String>,
    },
}

/// One refused field of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// The field, as the proto names it (`pkey`, `item.email`).
    pub field: String,
    /// What is wrong with it.
    pub problem: FieldProblem,
    /// The same, for people.
    pub description: String,
}

impl Error {
    /// Decodes a status from the gateway, or one tonic made on this side of the connection.
    pub fn from_status(status: &tonic::Status) -> Self {
        let details = status.get_error_details();
        // A reason is the gateway's only in its domain: a proxy's ErrorInfo is not decoded as one.
        let info = details
            .error_info()
            .filter(|info| info.domain == crate::proto::error_reasons::ERROR_DOMAIN);
        Self::Status {
            code: local_code(status).unwrap_or(status.code()),
            reason: Reason::from_wire(info.map_or("", |info| info.reason.as_str())),
            message: status.message().to_owned(),
            retry_after: details
                .retry_info()
                .and_then(|retry| retry.retry_delay)
                .filter(|delay| !delay.is_zero()),
            violations: details
                .bad_request()
                .map(|bad| {
                    bad.field_violations
                        .iter()
                        .map(|violation| FieldViolation {
                            field: violation.field.clone(),
                            problem: FieldProblem::from_wire(&violation.reason),
                            description: violation.description.clone(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            missing_permission: info.and_then(|info| info.metadata.get("permission").cloned()),
        }
    }

    /// Decodes the error of one item of a bulk stream (`BulkSetOptOutResponse.error`), as
    /// [`Error::from_status`] decodes a call's. Its fields come without their problems.
    pub fn from_item(error: &crate::proto::ccpa_v1::ItemError) -> Self {
        Self::Status {
            code: crate::proto::error_reasons::code_from_name(&error.code),
            reason: Reason::from_wire(&error.reason),
            message: error.message.clone(),
            retry_after: None,
            violations: error
                .fields
                .iter()
                .map(|field| FieldViolation {
                    field: field.clone(),
                    problem: FieldProblem::Other(String::new()),
                    description: String::new(),
                })
                .collect(),
            missing_permission: None,
        }
    }

    /// The gRPC code of a failed call; UNAVAILABLE when the connection could not be opened,
    /// INVALID_ARGUMENT for a setting that cannot be used.
    pub fn code(&self) -> Code {
        match self {
            Self::Config { .. } => Code::InvalidArgument,
            Self::Connect { .. } => Code::Unavailable,
            Self::Status { code, .. } => *code,
        }
    }

    /// The reason of a failed call, if the gateway gave one.
    pub fn reason(&self) -> Option<&Reason> {
        match self {
            Self::Status { reason, .. } if reason != &Reason::Other(String::new()) => Some(reason),
            _ => None,
        }
    }

    /// Whether sending the same call again, with the same request id, may succeed: UNAVAILABLE
    /// and DEADLINE_EXCEEDED, which the client retries itself for the calls that are safe to
    /// repeat. Not `REQUEST_FAILED`: the gateway replays a failed request's first answer for
    /// as long as its id is sent, so only a new request (a new id) can do better.
    pub fn is_retryable(&self) -> bool {
        matches!(self.code(), Code::Unavailable | Code::DeadlineExceeded)
            && self.reason() != Some(&Reason::RequestFailed)
    }
}

/// The code of a status tonic made on this side of the connection, by gRPC's definitions, where
/// tonic's own differs (and differs with the features tonic is built with):
/// - this call's deadline passed before the answer came: DEADLINE_EXCEEDED (tonic: CANCELLED);
/// - the connection failed or broke while the call was in flight, before or during its answer:
///   UNAVAILABLE, to be retried with back-off (tonic: UNKNOWN, INTERNAL or CANCELLED).
///
/// `None` for the gateway's own answers: a status decoded from the wire has no source.
fn local_code(status: &tonic::Status) -> Option<Code> {
    let chain = || std::iter::successors(std::error::Error::source(status), |e| e.source());
    // The timeout first: tonic wraps it in a transport error.
    if chain().any(|e| e.is::<tonic::TimeoutExpired>()) {
        return Some(Code::DeadlineExceeded);
    }
    // A failure of the connection: a transport error when the call was sent or its answer's
    // head read, an HTTP/2 or hyper error from the answer's body. Any source means a local
    // failure; only the codes tonic gives a broken connection are changed, so that a
    // deliberate code (RESOURCE_EXHAUSTED for HTTP/2's ENHANCE_YOUR_CALM, say) is kept.
    (chain().next().is_some()
        && matches!(
            status.code(),
            Code::Unknown | Code::Internal | Code::Cancelled | Code::Unavailable
        ))
    .then_some(Code::Unavailable)
}

/// ` (REASON)`, or nothing for a status without one.
fn in_parentheses(reason: &Reason) -> String {
    match reason.as_str() {
        "" => String::new(),
        reason => format!(" ({reason})"),
    }
}
