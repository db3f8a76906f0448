//! What a failed ACS call means, decided once from the HTTP facts and ACS's error codes.
//!
//! ACS reports application errors loosely: a malformed key is a 500 whose message holds
//! `XTK-170036`, a conflict a 500 with `RST-360012` or `PGS-220000`. [`Failure::classify`] reads
//! those facts so that callers decide on meanings ("the profile does not exist", "try again"),
//! not on status codes and substrings.

use reqwest::StatusCode;

use crate::hooks::TOKEN_ERROR_PREFIX;
use crate::{ApiError, types};

/// The meaning of a failed call to ACS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// No connection could be made (DNS, refused, TLS): the request never reached ACS, so any
    /// call, even a creation, can be retried.
    Unreachable,
    /// The connection failed or timed out after the request may have been sent: ACS may or may
    /// not have acted on it.
    Interrupted {
        /// Whether the client's timeout ran out (as opposed to a reset or a broken body).
        timed_out: bool,
    },
    /// The token source could not supply a token; nothing was sent.
    NoToken,
    /// ACS (its API gateway) refused our access token: 401, `401013` when invalid or expired.
    TokenRejected,
    /// ACS refused our API key (`403003`) or the token is not provisioned for the tenant
    /// (`403023`): 403.
    AccessDenied,
    /// 404 carrying `RST-360011`: ACS itself says the key is well formed but names no profile.
    NotFound,
    /// A 404 without `RST-360011`: not ACS's answer about a profile, but a route that leads
    /// nowhere (a proxy's 404, a wrong base path, another tenant's URL). It says nothing about
    /// the profile, so nothing may be concluded about it: the gateway's configuration or the
    /// network in front of ACS is at fault.
    EndpointNotFound,
    /// A 500 holding `XTK-170036`: ACS could not parse the key (malformed, or from another
    /// tenant or instance).
    UnparsableKey,
    /// A 500 holding `RST-360012` (inconsistent operation) or `PGS-220000` (duplicate key).
    Conflict,
    /// 429, 502, 503 or 504: ACS or a proxy in front of it is overloaded or down for now.
    Transient {
        /// The HTTP status ACS answered.
        status: StatusCode,
    },
    /// Any other 4xx: ACS refused a request it considers wrong.
    Refused {
        /// The HTTP status ACS answered.
        status: StatusCode,
    },
    /// Any other 5xx, or a status ACS never sends (1xx, 3xx: redirects are not followed). ACS
    /// uses 500 for bad input as much as for outages, so this is not considered transient.
    ServerError {
        /// The HTTP status ACS answered.
        status: StatusCode,
    },
    /// ACS answered success with a body that could not be read: the call's effect is unknown.
    MalformedResponse,
    /// The request could not be built (say, a token that is not a valid header value).
    InvalidRequest,
}

impl Failure {
    /// Decides what an error from the generated client means.
    pub fn classify(error: &ApiError) -> Self {
        match error {
            progenitor_client::Error::CommunicationError(e)
            | progenitor_client::Error::ResponseBodyError(e)
            | progenitor_client::Error::InvalidUpgrade(e) => Self::from_transport(e),
            progenitor_client::Error::ErrorResponse(response) => {
                Self::from_status(response.status(), Some(response.as_ref()))
            }
            progenitor_client::Error::UnexpectedResponse(response) => {
                if response.status().is_success() {
                    Self::MalformedResponse
                } else {
                    Self::from_status(response.status(), None)
                }
            }
            progenitor_client::Error::InvalidResponsePayload(..) => Self::MalformedResponse,
            progenitor_client::Error::Custom(message)
                if message.starts_with(TOKEN_ERROR_PREFIX) =>
            {
                Self::NoToken
            }
            progenitor_client::Error::Custom(_) | progenitor_client::Error::InvalidRequest(_) => {
                Self::InvalidRequest
            }
        }
    }

    fn from_transport(error: &reqwest::Error) -> Self {
        if error.is_connect() {
            Self::Unreachable
        } else if error.is_builder() {
            Self::InvalidRequest
        } else {
            Self::Interrupted {
                timed_out: error.is_timeout(),
            }
        }
    }

    fn from_status(status: StatusCode, body: Option<&types::AcsError>) -> Self {
        let mentions = |code: &str| body.is_some_and(|b| b.mentions(code));
        match status.as_u16() {
            401 => Self::TokenRejected,
            403 => Self::AccessDenied,
            404 if mentions("RST-360011") => Self::NotFound,
            404 => Self::EndpointNotFound,
            429 | 502 | 503 | 504 => Self::Transient { status },
            500 if mentions("XTK-170036") => Self::UnparsableKey,
            500 if mentions("RST-360012") || mentions("PGS-220000") => Self::Conflict,
            400..=499 => Self::Refused { status },
            _ => Self::ServerError { status },
        }
    }

    /// A stable name for this kind of failure, such as `ACS_UNAVAILABLE`: what a service built
    /// on this client reports as its error's reason, and what a record of the call keeps. Never
    /// a body, which can quote personal data.
    pub fn name(&self) -> &'static str {
        match self {
            Self::NotFound | Self::UnparsableKey => "PROFILE_NOT_FOUND",
            Self::Conflict => "PROFILE_CONFLICT",
            Self::EndpointNotFound => "ACS_ENDPOINT_NOT_FOUND",
            Self::Transient { .. } => "ACS_UNAVAILABLE",
            Self::Unreachable => "ACS_UNREACHABLE",
            Self::Interrupted { .. } => "ACS_INTERRUPTED",
            Self::MalformedResponse => "ACS_MALFORMED_RESPONSE",
            Self::NoToken => "ACS_TOKEN_UNAVAILABLE",
            Self::TokenRejected | Self::AccessDenied => "ACS_CREDENTIALS_REJECTED",
            Self::Refused { .. } => "ACS_REFUSED_REQUEST",
            Self::ServerError { .. } => "ACS_SERVER_ERROR",
            // The request never left: the client's configuration (its credentials) is at fault.
            Self::InvalidRequest => "GATEWAY_MISCONFIGURED",
        }
    }

    /// Whether the same call may succeed if made again unchanged. Only calls that are safe to
    /// repeat (reads, and writes of an absolute value) should be retried, and a creation only
    /// after [`Failure::Unreachable`].
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Unreachable | Self::Interrupted { .. } | Self::Transient { .. }
        )
    }
}

impl types::AcsError {
    /// Whether the error names `code` (an ACS code such as `XTK-170036`, or a gateway code such
    /// as `401013`) in its code fields or its message.
    pub fn mentions(&self, code: &str) -> bool {
        self.error_code.as_deref() == Some(code)
            || matches!(&self.code, Some(types::AcsErrorCode::Text(c)) if c == code)
            || self.message.as_deref().is_some_and(|m| m.contains(code))
    }
}
