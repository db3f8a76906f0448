//! Input checks that run before anything is sent to ACS.
//!
//! Every failure is INVALID_ARGUMENT with a `google.rpc.BadRequest` that names each bad field.
//! Descriptions say what is wrong, never what was sent: the values can be personal data.

use std::collections::HashMap;
use std::str::FromStr;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use super::convert::UnspecifiedSource;
use super::error_mapping::{ERROR_DOMAIN, Reason};
use crate::optout::RESERVED_REQUEST_ID_SEPARATOR;
use crate::proto::ccpa_v1::RequestSource;
use crate::store::Source;

/// Real PKeys are 90 to 130 characters; four times that leaves room for longer ones ACS may
/// mint while keeping absurd inputs out of URLs and logs.
pub const MAX_PKEY_BYTES: usize = 512;
/// The longest address SMTP can carry (RFC 5321's path limit, less the angle brackets).
pub const MAX_EMAIL_BYTES: usize = 254;
/// A bound on names that no real name reaches. ACS's own column size is not documented.
pub const MAX_NAME_CHARS: usize = 128;
/// Room for a UUID, a ULID or a caller's own scheme, but not for a payload.
pub const MAX_REQUEST_ID_CHARS: usize = 128;

pub use crate::client::MAX_CALLER_CHARS;
/// How far in the future `received_at` may be: clocks of callers drift a little.
pub const CLOCK_SKEW_MS: i64 = 60_000;
/// No consumer request predates this (2000-01-01): an earlier `received_at` is a mistake.
pub const EARLIEST_RECEIVED_AT_MS: i64 = 946_684_800_000;

/// The reasons attached to field violations, stable for callers that branch on them: the
/// contract's [`FieldProblem`]s.
pub use crate::proto::error_reasons::FieldProblem;

/// Collects the problems of one request, so that a caller learns of all of them at once.
#[derive(Debug, Default)]
pub struct Violations(Vec<FieldViolation>);

impl Violations {
    fn add(&mut self, field: &str, problem: FieldProblem, description: String) {
        let mut violation = FieldViolation::new(field, description);
        violation.reason = problem.as_str().to_owned();
        self.0.push(violation);
    }

    /// Checks an ACS primary key: `@`, then base64url characters (letters, digits, `-`, `_`,
    /// and `=` padding), at most [`MAX_PKEY_BYTES`] in all.
    ///
    /// The allow-list keeps out everything that would change the meaning of the URL the key is
    /// placed in (`/`, `?`, `#`, `%`, `.`), whitespace and control characters.
    pub fn pkey(&mut self, field: &str, value: &str) {
        if value.is_empty() {
            self.add(
                field,
                FieldProblem::Required,
                format!("{field} is required"),
            );
        } else if value.len() > MAX_PKEY_BYTES {
            self.add(
                field,
                FieldProblem::TooLong,
                format!("{field} must be at most {MAX_PKEY_BYTES} bytes"),
            );
        } else {
            let well_formed = value.strip_prefix('@').is_some_and(|rest| {
                !rest.is_empty()
                    && rest
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'='))
            });
            if !well_formed {
                self.add(
                    field,
                    FieldProblem::Malformed,
                    format!(
                        "{field} must be '@' followed by letters, digits, '-', '_' or '=' \
                         (an ACS primary key)"
                    ),
                );
            }
        }
    }

    /// Checks that a required boolean was set, and returns it.
    pub fn required_bool(&mut self, field: &str, value: Option<bool>) -> bool {
        if value.is_none() {
            self.add(
                field,
                FieldProblem::Required,
                format!("{field} is required: true to opt out of sale, false to opt back in"),
            );
        }
        value.unwrap_or_default()
    }

    /// Checks a required email address.
    pub fn email(&mut self, field: &str, value: &str) {
        if value.is_empty() {
            self.add(
                field,
                FieldProblem::Required,
                format!("{field} is required"),
            );
        } else if value.len() > MAX_EMAIL_BYTES {
            self.add(
                field,
                FieldProblem::TooLong,
                format!("{field} must be at most {MAX_EMAIL_BYTES} bytes"),
            );
        } else if email_address::EmailAddress::from_str(value).is_err()
            || value.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            self.add(
                field,
                FieldProblem::Malformed,
                format!("{field} is not a valid email address"),
            );
        }
    }

    /// Checks an optional name: at most [`MAX_NAME_CHARS`] characters, none of them control
    /// characters.
    pub fn name(&mut self, field: &str, value: &str) {
        if value.chars().count() > MAX_NAME_CHARS {
            self.add(
                field,
                FieldProblem::TooLong,
                format!("{field} must be at most {MAX_NAME_CHARS} characters"),
            );
        } else if value.chars().any(char::is_control) {
            self.add(
                field,
                FieldProblem::Malformed,
                format!("{field} must not contain control characters"),
            );
        }
    }

    /// Checks a caller-chosen request id: empty (one is generated), or at most
    /// [`MAX_REQUEST_ID_CHARS`] printable ASCII characters.
    pub fn request_id(&mut self, field: &str, value: &str) {
        if value.len() > MAX_REQUEST_ID_CHARS {
            self.add(
                field,
                FieldProblem::TooLong,
                format!("{field} must be at most {MAX_REQUEST_ID_CHARS} characters"),
            );
        } else if !value.bytes().all(|b| b.is_ascii_graphic()) {
            self.add(
                field,
                FieldProblem::Malformed,
                format!("{field} must be printable ASCII without spaces"),
            );
        }
    }

    /// Checks the id a caller chooses for a new request: as [`Self::request_id`], and without
    /// `:`, which is reserved for the records of a request by email (`<id>:<n>`): a caller's
    /// id of that form could collide with one of them and leave a profile without its record.
    pub fn new_request_id(&mut self, field: &str, value: &str) {
        let before = self.0.len();
        self.request_id(field, value);
        if self.0.len() == before && value.contains(RESERVED_REQUEST_ID_SEPARATOR) {
            self.add(
                field,
                FieldProblem::Malformed,
                format!(
                    "{field} must not contain '{RESERVED_REQUEST_ID_SEPARATOR}' (reserved for the \
                     records of a request by email)"
                ),
            );
        }
    }

    /// Checks that a request's manner fits its value: a Global Privacy Control signal can only
    /// ever say "do not sell"; an opt-in must be the consumer's explicit choice, made another
    /// way (CCPA regulations §7025, §7026).
    pub fn source_fits(&mut self, field: &str, source: Option<Source>, opt_out: Option<bool>) {
        if source == Some(Source::GlobalPrivacyControl) && opt_out == Some(false) {
            self.add(
                field,
                FieldProblem::Malformed,
                format!(
                    "{field} GLOBAL_PRIVACY_CONTROL can only opt out: an opt-in (ccpa_opt_out \
                     false) must come from the consumer another way"
                ),
            );
        }
    }

    /// Checks the manner of a request: required, and one of the known values.
    pub fn source(&mut self, field: &str, value: i32) -> Option<Source> {
        match RequestSource::try_from(value).map(Source::try_from) {
            Ok(Ok(source)) => Some(source),
            Ok(Err(UnspecifiedSource)) => {
                self.add(
                    field,
                    FieldProblem::Required,
                    format!(
                        "{field} is required: the regulations require the manner of each request"
                    ),
                );
                None
            }
            Err(_) => {
                self.add(
                    field,
                    FieldProblem::Malformed,
                    format!("{field} is not a known RequestSource"),
                );
                None
            }
        }
    }

    /// Checks when the consumer made a request: not in the future (beyond a minute of clock
    /// skew), not before 2000. Returns milliseconds since the epoch, or `None` when unset.
    pub fn received_at(
        &mut self,
        field: &str,
        value: Option<&prost_types::Timestamp>,
        now_ms: i64,
    ) -> Option<i64> {
        let value = value?;
        let valid_nanos = (0..1_000_000_000).contains(&value.nanos);
        let ms = value
            .seconds
            .checked_mul(1000)
            .and_then(|ms| ms.checked_add(i64::from(value.nanos / 1_000_000)));
        match ms {
            Some(ms) if valid_nanos && ms > now_ms + CLOCK_SKEW_MS => {
                self.add(
                    field,
                    FieldProblem::Malformed,
                    format!("{field} must not be in the future"),
                );
                None
            }
            Some(ms) if valid_nanos && ms >= EARLIEST_RECEIVED_AT_MS => Some(ms),
            _ => {
                self.add(
                    field,
                    FieldProblem::Malformed,
                    format!("{field} must be a valid instant after 2000-01-01"),
                );
                None
            }
        }
    }

    /// Checks the calling service's name (the `x-ccpa-caller` metadata): at most
    /// [`MAX_CALLER_CHARS`] printable ASCII characters.
    pub fn caller(&mut self, field: &str, value: &str) {
        if !value.is_empty() && !crate::client::is_valid_caller_name(value) {
            self.add(
                field,
                FieldProblem::Malformed,
                format!("{field} must be at most {MAX_CALLER_CHARS} printable ASCII characters"),
            );
        }
    }

    /// Checks a page size: not negative.
    pub fn page_size(&mut self, field: &str, value: i32) {
        if value < 0 {
            self.add(
                field,
                FieldProblem::Malformed,
                format!("{field} must not be negative"),
            );
        }
    }

    /// Records a missing field found by a check of the caller's own.
    pub fn missing(&mut self, field: &str, description: String) {
        self.add(field, FieldProblem::Required, description);
    }

    /// Records a problem found by a check of the caller's own.
    pub fn malformed(&mut self, field: &str, description: String) {
        self.add(field, FieldProblem::Malformed, description);
    }

    /// `Ok` when no check failed, else the INVALID_ARGUMENT status naming every bad field.
    pub fn into_result(self) -> Result<(), Status> {
        if self.0.is_empty() {
            return Ok(());
        }
        let fields: Vec<&str> = self.0.iter().map(|v| v.field.as_str()).collect();
        let message = format!("invalid request: check {}", fields.join(", "));
        let mut details = ErrorDetails::with_bad_request(self.0);
        details.set_error_info(
            Reason::InvalidRequest.as_str(),
            ERROR_DOMAIN,
            HashMap::new(),
        );
        Err(Status::with_error_details(
            Code::InvalidArgument,
            message,
            details,
        ))
    }
}

/// INVALID_ARGUMENT for a request id recorded before for a different request.
pub fn request_id_conflict() -> Status {
    let mut violations = Violations::default();
    violations.add(
        "request_id",
        FieldProblem::RequestIdConflict,
        "request_id was already used for a different request".to_owned(),
    );
    match violations.into_result() {
        Err(status) => status,
        Ok(()) => unreachable!("one violation was just added"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkey_problems(value: &str) -> usize {
        let mut violations = Violations::default();
        violations.pkey("pkey", value);
        violations.0.len()
    }

    #[test]
    fn pkeys_shaped_like_acs_keys_pass() {
        assert_eq!(
            pkey_problems("@UyAB_JhRC8T3ZWvWpaz5Ev3rk7bOBDvKD-1a9u5H"),
            0
        );
        assert_eq!(pkey_problems("@abc=="), 0);
        assert_eq!(pkey_problems(&format!("@{}", "a".repeat(511))), 0);
    }

    #[test]
    fn pkeys_that_would_bend_the_url_are_refused() {
        for bad in [
            "", "abc", "@", "@a/b", "@a?b", "@a#b", "@a%2F", "@a b", "@a\tb", "@a\u{0}b", "@a.b",
            "@../x", "@é",
        ] {
            assert_eq!(pkey_problems(bad), 1, "{bad:?} should be refused");
        }
        assert_eq!(pkey_problems(&format!("@{}", "a".repeat(512))), 1);
    }

    #[test]
    fn descriptions_never_quote_the_value() {
        let mut violations = Violations::default();
        violations.email("email", "not-an-address-but-personal");
        violations.pkey("pkey", "@secret/value");
        for violation in &violations.0 {
            assert!(!violation.description.contains("personal"));
            assert!(!violation.description.contains("secret"));
        }
    }
}
