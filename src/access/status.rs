//! The statuses of the trust boundary, built here rather than in `crate::api`: the gate runs in
//! front of every service, and the layers inside it (the API) may depend on it, never the
//! reverse. Each answers before anything is recorded or sent to Adobe, with a
//! `google.rpc.ErrorInfo` in the contract's domain:
//!
//! | the caller                                           | gRPC code          | `ErrorInfo.reason`         |
//! |------------------------------------------------------|--------------------|----------------------------|
//! | has no identity (no client certificate, no header)   | UNAUTHENTICATED    | `CALLER_UNAUTHENTICATED`   |
//! | calls over TLS (`header:`) but is no trusted proxy   | UNAUTHENTICATED    | `UNTRUSTED_PROXY`          |
//! | lacks the permission the call needs                  | PERMISSION_DENIED  | `CALLER_NOT_ALLOWED`       |
//! | is over its `max_rps`                                | RESOURCE_EXHAUSTED | `CALLER_RATE_LIMITED`      |
//!
//! `CALLER_NOT_ALLOWED` names the missing permission in its metadata (`permission`), so the
//! owner of the caller knows what to ask the policy's owners for. `CALLER_RATE_LIMITED`'s
//! RetryInfo is when the caller's budget allows its next call. Messages name no caller and no
//! personal data.

use std::collections::HashMap;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use super::Permission;
use crate::proto::error_reasons::{ERROR_DOMAIN, Reason};

/// A status of the boundary: `code` and `message`, with `reason` (and `metadata`) as its
/// `ErrorInfo`, and `retry` as its `RetryInfo` when the caller may try again later.
fn boundary_status(
    code: Code,
    reason: Reason,
    message: impl Into<String>,
    metadata: HashMap<String, String>,
    retry: Option<Duration>,
) -> Status {
    let mut details = ErrorDetails::with_error_info(reason.as_str(), ERROR_DOMAIN, metadata);
    if let Some(retry) = retry {
        details.set_retry_info(Some(retry));
    }
    Status::with_error_details(code, message, details)
}

/// A call without an identity that can be trusted (see [`super::identity`]).
pub fn unauthenticated(message: &str) -> Status {
    boundary_status(
        Code::Unauthenticated,
        Reason::CallerUnauthenticated,
        message,
        HashMap::new(),
        None,
    )
}

/// A call over TLS, in `header:` identity mode, from a peer whose certificate is not one of the
/// front proxies trusted to set the header (`--trusted-proxy-identity`). Whatever the header
/// says, it was set by the peer itself, which may be anyone holding a certificate from the
/// client CA.
pub fn untrusted_proxy() -> Status {
    boundary_status(
        Code::Unauthenticated,
        Reason::UntrustedProxy,
        "this connection's client certificate is not one of the proxies trusted to name the \
         caller in the identity header",
        HashMap::new(),
        None,
    )
}

/// A call its caller is not allowed to make: the policy does not grant it `permission`.
pub fn caller_not_allowed(permission: Permission) -> Status {
    boundary_status(
        Code::PermissionDenied,
        Reason::CallerNotAllowed,
        format!("the gateway's policy does not allow this caller \"{permission}\""),
        HashMap::from([("permission".to_owned(), permission.as_str().to_owned())]),
        None,
    )
}

/// A call beyond its caller's `max_rps`; `wait` is when the next would be admitted (at least a
/// millisecond, so that a caller never reads "retry at once").
pub fn caller_rate_limited(wait: Duration) -> Status {
    boundary_status(
        Code::ResourceExhausted,
        Reason::CallerRateLimited,
        "this caller is over the calls per second its policy allows; retry after the delay given",
        HashMap::new(),
        Some(wait.max(Duration::from_millis(1))),
    )
}
