//! The one place where a failure upstream (ACS, or the Adobe I/O gateway in front of it) becomes a
//! gRPC status.
//!
//! | upstream                                             | gRPC code          | `ErrorInfo.reason`         |
//! |------------------------------------------------------|--------------------|----------------------------|
//! | 404 with `RST-360011`, or an empty collection        | NOT_FOUND          | `PROFILE_NOT_FOUND`        |
//! | any other 404 (a proxy, a wrong base path or tenant) | UNAVAILABLE        | `ACS_ENDPOINT_NOT_FOUND`   |
//! | 500 holding `XTK-170036` (ACS cannot parse the key)  | NOT_FOUND          | `PROFILE_NOT_FOUND`        |
//! | 500 holding `RST-360012` or `PGS-220000` (conflict)  | ALREADY_EXISTS     | `PROFILE_CONFLICT`         |
//! | 429, 502, 503, 504                                   | UNAVAILABLE        | `ACS_UNAVAILABLE`          |
//! | no connection (refused, DNS, TLS)                    | UNAVAILABLE        | `ACS_UNREACHABLE`          |
//! | connection broken or timed out mid-call              | UNAVAILABLE        | `ACS_INTERRUPTED`          |
//! | a 2xx body that cannot be read                       | UNAVAILABLE        | `ACS_MALFORMED_RESPONSE`   |
//! | no access token could be obtained                    | UNAVAILABLE        | `ACS_TOKEN_UNAVAILABLE`    |
//! | 401 (after a token refresh) or 403: our credentials  | INTERNAL           | `ACS_CREDENTIALS_REJECTED` |
//! | any other 4xx                                        | INTERNAL           | `ACS_REFUSED_REQUEST`      |
//! | any other 5xx, or a 1xx/3xx (redirects not followed) | INTERNAL           | `ACS_SERVER_ERROR`         |
//! | a profile without a field we must read               | INTERNAL           | `ACS_CONTRACT_BROKEN`      |
//! | a request the client could not build                 | INTERNAL           | `GATEWAY_MISCONFIGURED`    |
//! | the call's deadline passed (the caller's, or ours)   | DEADLINE_EXCEEDED  | `DEADLINE_EXCEEDED`        |
//! | too many calls already wait for the throttle         | RESOURCE_EXHAUSTED | `ACS_CALL_QUEUE_FULL`      |
//! | the ledger's database failed (nothing sent to ACS)   | UNAVAILABLE        | `LEDGER_UNAVAILABLE`       |
//! | a replayed request id whose request FAILED           | as the first time  | `REQUEST_FAILED`           |
//!
//! The gateway's own trust boundary answers first, with statuses of its own
//! (`crate::access::status`: no identity, an untrusted proxy, a missing permission, over the
//! caller's rate). A lookup by email answers:
//!
//! | the caller                                           | gRPC code          | `ErrorInfo.reason`         |
//! |------------------------------------------------------|--------------------|----------------------------|
//! | asked by an email that more profiles have than allowed | FAILED_PRECONDITION | `TOO_MANY_PROFILES`     |
//!
//! The change feed (`WatchOptOutChanges`) answers:
//!
//! | the watcher                                          | gRPC code          | `ErrorInfo.reason`         |
//! |------------------------------------------------------|--------------------|----------------------------|
//! | resumes from a cursor retention has pruned past      | FAILED_PRECONDITION | `CURSOR_EXPIRED`          |
//! | is connected when the gateway shuts down             | UNAVAILABLE        | `SHUTTING_DOWN`            |
//!
//! UNAVAILABLE and RESOURCE_EXHAUSTED also carry a `google.rpc.RetryInfo`: the delay ACS asked
//! for in `Retry-After` when it did (at most [`MAX_RETRY_DELAY`]), else [`DEFAULT_RETRY_DELAY`].
//!
//! Why these choices:
//! - `XTK-170036` is NOT_FOUND rather than INVALID_ARGUMENT: every key reaching ACS has passed
//!   our syntax checks, so ACS failing to parse it means the key is not one of this tenant's
//!   (another tenant's, or stale). From the caller's side, no profile has that key here.
//! - Only ACS's own answer that a profile does not exist (a 404 whose body carries `RST-360011`)
//!   may fail a request for good. Any other 404 comes from something in front of ACS, or from a
//!   gateway pointed at the wrong base path or tenant: it says nothing about the profile. It is
//!   UNAVAILABLE (the request stays PENDING and is delivered once the route is fixed), logged
//!   at error level for operators, and `ccpa.v1.CcpaService` reports NOT_SERVING while it
//!   lasts, as for refused credentials (`crate::health`).
//! - 401 and 403 speak of the gateway's credentials, not the caller's, so they must not become
//!   UNAUTHENTICATED or PERMISSION_DENIED (which tell the caller to fix *its* credentials). They
//!   are INTERNAL and logged at error level for operators.
//! - Other 500s are INTERNAL, not UNAVAILABLE: ACS answers 500 for bad input as readily as for
//!   outages, so a blind retry is not known to help.
//! - No token (the token source failed, say Adobe IMS is down) is UNAVAILABLE: the caller can
//!   do nothing but retry later, and operators are alerted by the log.
//! - A broken connection or an unreadable success body is UNAVAILABLE: gRPC defines it as
//!   retryable with back-off, and warns that non-idempotent calls (CreateProfile) may have taken
//!   effect; the proto says the same.
//!
//! - DEADLINE_EXCEEDED is also used when the caller set no deadline and the gateway's own budget
//!   for the call (`--acs-timeout`) ran out: retries included, the work could not finish in time.
//! - RESOURCE_EXHAUSTED is the gateway protecting the ACS contract (`--acs-max-queued`): the
//!   caller should slow down.
//!
//! Upstream bodies are never copied into a status or a log line: they can quote personal data.

use std::collections::HashMap;
use std::time::Duration;

use crate::optout::read::ReadFailure;
use crate::store::{FailureCode, LedgerError, Record};
use crate::upstream::{Cause, Classified, UpstreamError};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

pub use crate::proto::error_reasons::{ERROR_DOMAIN, Reason};

/// The delay suggested to callers in `RetryInfo` when ACS gave none.
pub const DEFAULT_RETRY_DELAY: Duration = Duration::from_secs(1);

/// The longest delay passed on to callers from a `Retry-After`: the header is ACS's (or a
/// proxy's) to choose, and a caller told to wait a year would drop an opt-out it holds.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(300);

/// What the table above says for one failure: code, reason, message, log level.
struct Mapping {
    code: Code,
    reason: Reason,
    message: &'static str,
    severity: Severity,
}

#[derive(Clone, Copy)]
enum Severity {
    /// The caller's business (a missing profile): not worth an operator's attention.
    Expected,
    /// Likely to pass (ACS overloaded or unreachable).
    Transient,
    /// Needs an operator: credentials, a broken contract, a bug.
    Operator,
}

fn mapping(classified: &Classified) -> Mapping {
    use Severity::*;
    let (code, message, severity) = match classified.cause {
        Cause::ProfileNotFound => (
            Code::NotFound,
            "no profile has this key in the configured Adobe Campaign tenant",
            Expected,
        ),
        Cause::Conflict => (
            Code::AlreadyExists,
            "Adobe Campaign reported a conflicting profile",
            Expected,
        ),
        Cause::Overloaded => (
            Code::Unavailable,
            "Adobe Campaign is overloaded or unavailable; retry with back-off",
            Transient,
        ),
        Cause::Unreachable => (
            Code::Unavailable,
            "Adobe Campaign could not be reached; retry with back-off",
            Transient,
        ),
        Cause::Interrupted => (
            Code::Unavailable,
            "the call to Adobe Campaign was interrupted; it may or may not have taken effect",
            Transient,
        ),
        Cause::MalformedResponse => (
            Code::Unavailable,
            "Adobe Campaign's answer could not be read; the call may or may not have taken effect",
            Transient,
        ),
        Cause::EndpointNotFound => (
            Code::Unavailable,
            "the gateway's address for Adobe Campaign answered 404 without Adobe Campaign's own \
             error: check its base URL and tenant; the request is kept and retried",
            Operator,
        ),
        Cause::NoToken => (
            Code::Unavailable,
            "the gateway could not obtain an access token for Adobe Campaign; retry with back-off",
            Operator,
        ),
        Cause::CredentialsRejected => (
            Code::Internal,
            "the gateway's credentials for Adobe Campaign were refused; operators are alerted",
            Operator,
        ),
        Cause::Refused => (
            Code::Internal,
            "Adobe Campaign refused the request",
            Operator,
        ),
        Cause::ServerError => (
            Code::Internal,
            "Adobe Campaign failed to process the request",
            Operator,
        ),
        Cause::Misconfigured => (
            Code::Internal,
            "the gateway could not build a valid request to Adobe Campaign; check its credentials",
            Operator,
        ),
        Cause::ContractBroken => (
            Code::Internal,
            "Adobe Campaign's answer lacked a field the gateway needs",
            Operator,
        ),
        Cause::DeadlineExceeded => (
            Code::DeadlineExceeded,
            "the deadline passed before Adobe Campaign answered",
            Transient,
        ),
        Cause::QueueFull => (
            Code::ResourceExhausted,
            "too many calls are waiting for Adobe Campaign; slow down and retry",
            Transient,
        ),
    };
    let reason = match (classified.cause, classified.name) {
        (Cause::ContractBroken, _) => Reason::AcsContractBroken,
        (Cause::DeadlineExceeded, _) => Reason::DeadlineExceeded,
        (Cause::QueueFull, _) => Reason::AcsCallQueueFull,
        // The ACS client crate names its failures; each is a `Reason` (tested below).
        (_, Some(name)) => Reason::from_wire(name),
        (_, None) => Reason::AcsServerError,
    };
    Mapping {
        code,
        reason,
        message,
        severity,
    }
}

/// The status of a call the ledger could not serve. An opt-out that cannot be recorded is not
/// sent to ACS either: durability comes first, and the caller retries. (The log line is in the
/// call's span, which names the RPC.)
impl From<LedgerError> for Status {
    fn from(error: LedgerError) -> Self {
        ledger_status(&error)
    }
}

/// An upstream failure becomes a status through [`upstream_status`].
impl From<UpstreamError> for Status {
    fn from(error: UpstreamError) -> Self {
        upstream_status(&error)
    }
}

/// A read that has no answer.
impl From<ReadFailure> for Status {
    fn from(failure: ReadFailure) -> Self {
        match failure {
            ReadFailure::Upstream(error) => Self::from(error),
            ReadFailure::Ledger(error) => Self::from(error),
            ReadFailure::EmailNotFound => gateway_status(
                Code::NotFound,
                Reason::EmailNotFound,
                "no profile has this email address",
            ),
            ReadFailure::TooManyProfiles(max) => too_many_profiles(max),
        }
    }
}

fn ledger_status(error: &LedgerError) -> Status {
    tracing::error!(error = %error, "the ledger failed");
    gateway_status(
        Code::Unavailable,
        Reason::LedgerUnavailable,
        "the opt-out ledger is unavailable; nothing was sent to Adobe Campaign; retry",
    )
}

/// A lookup by email that matched more profiles than `--max-profiles-per-email`.
pub fn too_many_profiles(max: usize) -> Status {
    gateway_status(
        Code::FailedPrecondition,
        Reason::TooManyProfiles,
        &format!(
            "more than {max} profiles have this email address; nothing was changed (ask by key, \
             or raise --max-profiles-per-email)"
        ),
    )
}

/// A status the gateway decides itself (not an upstream failure's: see [`upstream_status`]),
/// with its `ErrorInfo` reason, and a `RetryInfo` when the caller should retry. Like every
/// message here, `message` names no personal data.
pub fn gateway_status(code: Code, reason: Reason, message: &str) -> Status {
    let mut details = ErrorDetails::with_error_info(reason.as_str(), ERROR_DOMAIN, HashMap::new());
    if matches!(code, Code::Unavailable | Code::ResourceExhausted) {
        details.set_retry_info(Some(DEFAULT_RETRY_DELAY));
    }
    Status::with_error_details(code, message, details)
}

/// The answer to a replayed request id whose request FAILED: the code the caller was given the
/// first time, and the recorded basis.
pub fn replayed_failure(record: &Record) -> Status {
    let code = record.failure_code.map_or(Code::Unavailable, replayed_code);
    let metadata = HashMap::from([("request_id".to_owned(), record.request_id.clone())]);
    let details =
        ErrorDetails::with_error_info(Reason::RequestFailed.as_str(), ERROR_DOMAIN, metadata);
    let message = format!(
        "this request id was used before and the request failed: {}",
        record
            .failure_reason
            .as_deref()
            .unwrap_or("no reason recorded")
    );
    Status::with_error_details(code, message, details)
}

/// The code a replay of a request FAILED with `failure` is answered with: the one its caller was
/// first given. (The ledger records an upstream failure as [`FailureCode::from`] says; a status
/// that asked the caller to come back later, RESOURCE_EXHAUSTED included, is recorded as
/// unavailable: such a request did nothing and may be tried again under its id.)
fn replayed_code(failure: FailureCode) -> Code {
    match failure {
        FailureCode::ProfileNotFound => Code::NotFound,
        FailureCode::ProfileConflict => Code::AlreadyExists,
        FailureCode::Internal => Code::Internal,
        FailureCode::DeadlinePassed => Code::DeadlineExceeded,
        FailureCode::TooManyProfiles => Code::FailedPrecondition,
        FailureCode::Unavailable => Code::Unavailable,
    }
}

/// Turns an upstream failure into the status the caller receives, with a
/// `google.rpc.ErrorInfo` (reason, domain, and the upstream HTTP status when there was one) and,
/// when retrying later can help, a `google.rpc.RetryInfo`; and logs it at the level the table
/// implies (in the call's span, which names the RPC).
pub fn upstream_status(error: &UpstreamError) -> Status {
    let classified = error.classify();
    let mapped = mapping(&classified);
    let http_status = classified.http_status;
    let cause = classified.cause;
    match mapped.severity {
        Severity::Expected => {
            tracing::debug!(reason = mapped.reason.as_str(), http_status, "upstream")
        }
        Severity::Transient => tracing::warn!(
            reason = mapped.reason.as_str(),
            http_status,
            cause = ?cause,
            "Adobe Campaign unavailable"
        ),
        Severity::Operator => tracing::error!(
            reason = mapped.reason.as_str(),
            http_status,
            cause = ?cause,
            missing_field = classified.missing_field.unwrap_or_default(),
            "Adobe Campaign call failed: needs an operator"
        ),
    }

    let mut metadata = HashMap::new();
    if let Some(status) = http_status {
        metadata.insert("upstream_http_status".to_owned(), status.to_string());
    }
    let mut details = ErrorDetails::with_error_info(mapped.reason.as_str(), ERROR_DOMAIN, metadata);
    if matches!(mapped.code, Code::Unavailable | Code::ResourceExhausted) {
        let delay = classified
            .retry_after
            .map_or(DEFAULT_RETRY_DELAY, |asked| asked.min(MAX_RETRY_DELAY));
        details.set_retry_info(Some(delay));
    }
    Status::with_error_details(mapped.code, mapped.message, details)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reasons named by the ACS client crate's failures (the gateway's own are `Reason`s
    /// already) are ones the gateway's client decodes: a new failure must be added to
    /// `crate::proto::error_reasons` too, or callers would see it as `Reason::Other`.
    #[test]
    fn every_failure_of_acs_has_a_reason_the_client_knows() {
        for name in UpstreamError::every_named_failure() {
            assert!(
                !matches!(Reason::from_wire(name), Reason::Other(_)),
                "{name} is sent but not in Reason"
            );
        }
    }

    /// The ledger records what an upstream failure means (`FailureCode::from`); a replay of the
    /// request id is answered from that record. Both must tell the caller what it was told the
    /// first time, through this table.
    #[test]
    fn a_replayed_failure_is_answered_with_the_code_of_the_first_answer() {
        let mut errors: Vec<UpstreamError> = [200, 302, 400, 401, 403, 404, 409, 429, 500, 501]
            .into_iter()
            .chain([502, 503, 504])
            .map(UpstreamError::answered)
            .collect();
        errors.push(UpstreamError::deadline_exceeded(true));
        errors.push(UpstreamError::deadline_exceeded(false));
        errors.push(UpstreamError::EmptyCollection);
        errors.push(UpstreamError::MissingField("ccpaOptOut"));
        for error in &errors {
            let first = upstream_status(error).code();
            let replayed = replayed_code(FailureCode::from(error));
            assert_eq!(replayed, first, "{}", error.reason());
        }
        // The one exception: a full queue toward ACS asked the caller to slow down; the request
        // did nothing, and its replay says to retry.
        let throttled = UpstreamError::queue_full();
        assert_eq!(upstream_status(&throttled).code(), Code::ResourceExhausted);
        assert_eq!(
            replayed_code(FailureCode::from(&throttled)),
            Code::Unavailable
        );
    }
}
