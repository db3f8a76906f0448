//! The reasons the gateway gives in its errors' `google.rpc.ErrorInfo` and `google.rpc.BadRequest`
//! details: part of the wire contract, spelled once here for the server that sends them and the
//! client that decodes them.

/// The `ErrorInfo.domain` of every error the gateway reports.
pub const ERROR_DOMAIN: &str = "ccpa-gateway";

/// A gRPC code as a bulk item's `ItemError.code` spells it: the canonical name
/// (`INVALID_ARGUMENT`, `NOT_FOUND`).
pub fn code_name(code: tonic::Code) -> String {
    format!("{code:?}")
        .chars()
        .enumerate()
        .flat_map(|(i, c)| {
            let upper = c.to_ascii_uppercase();
            if c.is_ascii_uppercase() && i > 0 {
                vec!['_', upper]
            } else {
                vec![upper]
            }
        })
        .collect()
}

/// The code [`code_name`] spells `name`; UNKNOWN for a name it does not.
pub fn code_from_name(name: &str) -> tonic::Code {
    (0..=16)
        .map(tonic::Code::from_i32)
        .find(|code| code_name(*code) == name)
        .unwrap_or(tonic::Code::Unknown)
}

macro_rules! reasons {
    ($(#[$enum_doc:meta])* $name:ident { $($(#[$doc:meta])* $variant:ident = $text:literal,)* }) => {
        $(#[$enum_doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum $name {
            $($(#[$doc])* $variant,)*
            /// A reason this build does not know (a newer gateway's), as sent; empty when none
            /// was sent.
            Other(String),
        }

        impl $name {
            /// The reason as the wire spells it.
            pub fn as_str(&self) -> &str {
                match self {
                    $(Self::$variant => $text,)*
                    Self::Other(text) => text,
                }
            }

            /// The reason spelled `text` on the wire.
            pub fn from_wire(text: &str) -> Self {
                match text {
                    $($text => Self::$variant,)*
                    other => Self::Other(other.to_owned()),
                }
            }

            /// Every reason this build knows.
            pub fn known() -> Vec<Self> {
                vec![$(Self::$variant,)*]
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

reasons! {
    /// Why a call failed: `ErrorInfo.reason` (domain [`ERROR_DOMAIN`]). The gRPC code says what
    /// kind of failure it is; the reason says which, and whether retrying can help.
    Reason {
        /// The input was refused; the field violations say which fields and why.
        InvalidRequest = "INVALID_REQUEST",
        /// No profile has that key (or address) in this tenant.
        ProfileNotFound = "PROFILE_NOT_FOUND",
        /// No profile has the email address.
        EmailNotFound = "EMAIL_NOT_FOUND",
        /// No request has that id in the ledger.
        RecordNotFound = "RECORD_NOT_FOUND",
        /// ACS refused a profile that conflicts with one it holds.
        ProfileConflict = "PROFILE_CONFLICT",
        /// More profiles have the address than the gateway acts on in one call.
        TooManyProfiles = "TOO_MANY_PROFILES",
        /// The call carried no identity the gateway accepts.
        CallerUnauthenticated = "CALLER_UNAUTHENTICATED",
        /// The call came over TLS from a peer whose certificate is not one of the front proxies
        /// trusted to name the caller in the identity header: the header is not believed.
        UntrustedProxy = "UNTRUSTED_PROXY",
        /// The caller lacks the permission the call needs (named in the error).
        CallerNotAllowed = "CALLER_NOT_ALLOWED",
        /// The caller is over its rate; retry after the delay given.
        CallerRateLimited = "CALLER_RATE_LIMITED",
        /// ACS asked the gateway to slow down, or is unavailable (429, 502, 503, 504).
        AcsUnavailable = "ACS_UNAVAILABLE",
        /// ACS could not be reached (refused, DNS, TLS).
        AcsUnreachable = "ACS_UNREACHABLE",
        /// The connection to ACS broke or timed out mid-call.
        AcsInterrupted = "ACS_INTERRUPTED",
        /// ACS answered success with a body that cannot be read.
        AcsMalformedResponse = "ACS_MALFORMED_RESPONSE",
        /// The gateway could not obtain an access token from Adobe IMS.
        AcsTokenUnavailable = "ACS_TOKEN_UNAVAILABLE",
        /// Something in front of ACS answered 404: the gateway's route to ACS is wrong.
        AcsEndpointNotFound = "ACS_ENDPOINT_NOT_FOUND",
        /// ACS refused the gateway's own credentials (an operator's matter, not the caller's).
        AcsCredentialsRejected = "ACS_CREDENTIALS_REJECTED",
        /// ACS refused the gateway's request (another 4xx).
        AcsRefusedRequest = "ACS_REFUSED_REQUEST",
        /// ACS failed (another 5xx, or an unexpected status).
        AcsServerError = "ACS_SERVER_ERROR",
        /// ACS answered without a field the gateway must read.
        AcsContractBroken = "ACS_CONTRACT_BROKEN",
        /// The gateway could not build its request to ACS.
        GatewayMisconfigured = "GATEWAY_MISCONFIGURED",
        /// The call's deadline passed, retries included.
        DeadlineExceeded = "DEADLINE_EXCEEDED",
        /// Too many calls already wait for their turn toward ACS: slow down.
        AcsCallQueueFull = "ACS_CALL_QUEUE_FULL",
        /// The ledger's database failed; nothing was sent to ACS.
        LedgerUnavailable = "LEDGER_UNAVAILABLE",
        /// A replayed request id whose request failed: answered as the first time.
        RequestFailed = "REQUEST_FAILED",
        /// The first call with this request id is still creating the profile: retry.
        RequestInProgress = "REQUEST_IN_PROGRESS",
        /// One of an address's profiles could not be recorded.
        ProfileNotRecorded = "PROFILE_NOT_RECORDED",
        /// The gateway's work for the call stopped unexpectedly.
        WorkStopped = "WORK_STOPPED",
        /// Retention has pruned the ledger's changes after the watcher's cursor.
        CursorExpired = "CURSOR_EXPIRED",
        /// The gateway is shutting down: a stream it ended early; resume elsewhere.
        ShuttingDown = "SHUTTING_DOWN",
    }
}

reasons! {
    /// What is wrong with one field of a refused request (`BadRequest.FieldViolation.reason`).
    FieldProblem {
        /// A required field is missing or empty.
        Required = "FIELD_REQUIRED",
        /// The field is longer than its bound.
        TooLong = "FIELD_TOO_LONG",
        /// The field does not have the form it must have.
        Malformed = "FIELD_MALFORMED",
        /// The request id is already recorded for a different request.
        RequestIdConflict = "REQUEST_ID_CONFLICT",
    }
}

#[cfg(test)]
mod tests {
    use super::{FieldProblem, Reason, code_from_name, code_name};

    #[test]
    fn code_names_are_the_canonical_ones_and_read_back() {
        assert_eq!(code_name(tonic::Code::InvalidArgument), "INVALID_ARGUMENT");
        assert_eq!(code_name(tonic::Code::Cancelled), "CANCELLED");
        for code in (0..=16).map(tonic::Code::from_i32) {
            assert_eq!(code_from_name(&code_name(code)), code);
        }
        assert_eq!(code_from_name("NO_SUCH_CODE"), tonic::Code::Unknown);
    }

    #[test]
    fn every_reason_reads_back_from_its_wire_spelling() {
        for reason in Reason::known() {
            assert_eq!(Reason::from_wire(reason.as_str()), reason);
        }
        for problem in FieldProblem::known() {
            assert_eq!(FieldProblem::from_wire(problem.as_str()), problem);
        }
        assert_eq!(
            Reason::from_wire("SOMETHING_NEW"),
            Reason::Other("SOMETHING_NEW".into())
        );
    }
}
