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
        /// The builder method (and the CLI flag of the same name) that was wrong.
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
    #[error("{code:?} ({reason}): {message}")]
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
    /// Decodes a status from the gateway.
    pub fn from_status(status: &tonic::Status) -> Self {
        let details = status.get_error_details();
        let info = details.error_info();
        // A connection that breaks while the call is in flight is UNAVAILABLE in gRPC's
        // definitions (retry with back-off); tonic reports it as UNKNOWN, "transport error".
        let code = match status.code() {
            Code::Unknown if broke_in_transport(status) => Code::Unavailable,
            code => code,
        };
        Self::Status {
            code,
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
    /// repeat.
    pub fn is_retryable(&self) -> bool {
        matches!(self.code(), Code::Unavailable | Code::DeadlineExceeded)
    }
}

/// Whether `status` is tonic's report of a transport failure rather than the gateway's answer.
fn broke_in_transport(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if error.is::<tonic::transport::Error>() {
            return true;
        }
        source = error.source();
    }
    false
}
