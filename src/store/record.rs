//! One row of the ledger, and the names its enumerations are stored under.

use serde::Serialize;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::LedgerError;

/// The manner in which the consumer made a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Source {
    /// A Global Privacy Control signal.
    GlobalPrivacyControl,
    /// A form on a website or in an app.
    WebForm,
    /// An email.
    Email,
    /// A phone call.
    Phone,
    /// A letter.
    PostalMail,
    /// In person.
    InPerson,
    /// An agent the consumer authorized.
    AuthorizedAgent,
    /// The business itself.
    Internal,
}

/// Where a request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum State {
    /// Recorded, not yet held by ACS.
    Pending,
    /// Held by ACS.
    Applied,
    /// Cannot be applied; `failure_reason` says why.
    Failed,
    /// Overtaken by a newer request for the same profile before it was applied.
    Superseded,
}

/// What kind of call made the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Kind {
    /// SetOptOut.
    SetOptOut,
    /// CreateProfile with an opt-out.
    CreateProfile,
    /// SetOptOut by email: the request itself, fanned out to one record per profile found.
    SetByEmail,
}

/// Why a request FAILED, in the ledger's own words: what the caller was told, kept so that a
/// replay of the request id is told the same. (Stored under the names of the gRPC codes the
/// gateway answers them with, which is what earlier versions stored.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureCode {
    /// The profile (or any profile with the address) does not exist.
    ProfileNotFound,
    /// ACS reported a conflict, creating a profile.
    ProfileConflict,
    /// ACS could not be reached or did not answer in time; the caller must retry.
    Unavailable,
    /// The call's deadline passed first; the caller must retry.
    DeadlinePassed,
    /// More profiles have the address than the gateway works on at once.
    TooManyProfiles,
    /// Anything else: a failure the caller cannot fix by retrying.
    Internal,
}

impl FailureCode {
    /// Whether the failure was transient: the request did nothing, and may be tried again under
    /// its id.
    pub fn is_transient(self) -> bool {
        matches!(self, Self::Unavailable | Self::DeadlinePassed)
    }
}

impl Serialize for FailureCode {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

macro_rules! stored_names {
    ($type:ty { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $type {
            /// Every value, in declaration order.
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];

            /// The name it is stored under.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $name),+ }
            }

            /// The value stored under `name`.
            pub fn parse(name: &str) -> Result<Self, LedgerError> {
                match name {
                    $($name => Ok(Self::$variant),)+
                    other => Err(LedgerError::Corrupt(format!(
                        "unknown {} {other:?}", stringify!($type)
                    ))),
                }
            }
        }
    };
}

stored_names!(Source {
    GlobalPrivacyControl => "GLOBAL_PRIVACY_CONTROL",
    WebForm => "WEB_FORM",
    Email => "EMAIL",
    Phone => "PHONE",
    PostalMail => "POSTAL_MAIL",
    InPerson => "IN_PERSON",
    AuthorizedAgent => "AUTHORIZED_AGENT",
    Internal => "INTERNAL",
});

stored_names!(State {
    Pending => "PENDING",
    Applied => "APPLIED",
    Failed => "FAILED",
    Superseded => "SUPERSEDED",
});

/// Where a notification to a recipient stands (`opt_out_notifications`, migration 10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum NotificationState {
    /// Not delivered yet; tried again with back-off.
    Pending,
    /// The recipient answered 2xx.
    Delivered,
    /// No further attempt is made: the recipient refused it, or retries ended.
    Failed,
}

stored_names!(NotificationState {
    Pending => "PENDING",
    Delivered => "DELIVERED",
    Failed => "FAILED",
});

stored_names!(FailureCode {
    ProfileNotFound => "NOT_FOUND",
    ProfileConflict => "ALREADY_EXISTS",
    Unavailable => "UNAVAILABLE",
    DeadlinePassed => "DEADLINE_EXCEEDED",
    TooManyProfiles => "FAILED_PRECONDITION",
    Internal => "INTERNAL",
});

stored_names!(Kind {
    SetOptOut => "SET_OPT_OUT",
    CreateProfile => "CREATE_PROFILE",
    SetByEmail => "SET_BY_EMAIL",
});

/// A recorded request. Instants are milliseconds since the Unix epoch (UTC).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Record {
    /// The request's id.
    pub request_id: String,
    /// The call that made it.
    pub kind: Kind,
    /// The profile's ACS key; `None` for a creation ACS has not (yet) answered.
    pub pkey: Option<String>,
    /// The requested value: true to opt out of sale.
    pub opt_out: bool,
    /// How the consumer made it.
    pub source: Source,
    /// When the consumer made it.
    pub received_at: i64,
    /// Whether the caller gave `received_at` (else it is when the gateway received the call).
    pub received_at_given: bool,
    /// When the gateway recorded it.
    pub recorded_at: i64,
    /// The calling service.
    pub caller: String,
    /// Where it stands.
    pub state: State,
    /// When the gateway first answered the caller.
    pub answered_at: Option<i64>,
    /// When it became APPLIED, FAILED or SUPERSEDED.
    pub resolved_at: Option<i64>,
    /// Attempts made to apply it.
    pub attempts: i64,
    /// When the deliverer may try it next.
    pub next_attempt_at: i64,
    /// The last upstream error met (a reason, never a body).
    pub last_error: Option<String>,
    /// For FAILED: the basis of the response.
    pub failure_reason: Option<String>,
    /// For FAILED: what the caller was told, for replays.
    pub failure_code: Option<FailureCode>,
    /// For SUPERSEDED: the newer request that overtook it.
    pub superseded_by: Option<String>,
    /// The request made by email this one is a part of.
    pub parent_request_id: Option<String>,
    /// For a restore by the reconciler: the consumer's request whose value it puts back in ACS.
    pub restores_request_id: Option<String>,
    /// See [`super::NewRequest::fingerprint`]: for telling replays apart, not for auditors.
    #[serde(skip)]
    pub fingerprint: Option<String>,
}

/// Read leniently: a code this version does not know (written by a newer one) must not make
/// every listing and export fail; it reads as the most cautious meaning.
fn lenient_failure_code(code: &str) -> FailureCode {
    FailureCode::parse(code).unwrap_or_else(|_| {
        tracing::warn!(
            code,
            "a record holds an unknown failure code; read as INTERNAL"
        );
        FailureCode::Internal
    })
}

impl Record {
    /// The instant the request is ordered by among its profile's requests: when the consumer
    /// made it, but no later than when the ledger recorded it (SQL: `ordered_at!()`). A restore's
    /// `received_at` is the gateway's own (a millisecond after the request it restores), not a
    /// caller's: it counts as it is, so that a restore recorded within that millisecond, or
    /// on a clock that stands still, still follows the request it restores.
    pub fn ordered_at(&self) -> i64 {
        if self.restores_request_id.is_none() {
            self.received_at.min(self.recorded_at)
        } else {
            self.received_at
        }
    }

    /// Reads a row of `opt_out_records` from SQLite: every column, in `queries::COLUMNS`' order.
    pub(super) fn from_sqlite(row: &rusqlite::Row<'_>) -> Result<Self, LedgerError> {
        let text = |index: usize| -> Result<String, LedgerError> { Ok(row.get(index)?) };
        let optional_text =
            |index: usize| -> Result<Option<String>, LedgerError> { Ok(row.get(index)?) };
        let number = |index: usize| -> Result<i64, LedgerError> { Ok(row.get(index)?) };
        let optional_number =
            |index: usize| -> Result<Option<i64>, LedgerError> { Ok(row.get(index)?) };
        let name =
            |index: usize| -> Result<&str, LedgerError> { Ok(row.get_ref(index)?.as_str()?) };
        Ok(Self {
            request_id: text(0)?,
            kind: Kind::parse(name(1)?)?,
            pkey: optional_text(2)?,
            opt_out: number(3)? != 0,
            source: Source::parse(name(4)?)?,
            received_at: number(5)?,
            received_at_given: number(6)? != 0,
            recorded_at: number(7)?,
            caller: text(8)?,
            state: State::parse(name(9)?)?,
            answered_at: optional_number(10)?,
            resolved_at: optional_number(11)?,
            attempts: number(12)?,
            next_attempt_at: number(13)?,
            last_error: optional_text(14)?,
            failure_reason: optional_text(15)?,
            failure_code: optional_text(16)?.map(|code| lenient_failure_code(&code)),
            superseded_by: optional_text(17)?,
            parent_request_id: optional_text(18)?,
            fingerprint: optional_text(19)?,
            restores_request_id: optional_text(20)?,
        })
    }

    /// Reads a row of `opt_out_records`.
    pub(super) fn from_row(row: &AnyRow) -> Result<Self, LedgerError> {
        let text = |column: &str| row.try_get::<String, _>(column);
        let optional_text = |column: &str| row.try_get::<Option<String>, _>(column);
        let number = |column: &str| row.try_get::<i64, _>(column);
        let optional_number = |column: &str| row.try_get::<Option<i64>, _>(column);
        Ok(Self {
            request_id: text("request_id")?,
            kind: Kind::parse(&text("kind")?)?,
            pkey: optional_text("pkey")?,
            opt_out: number("opt_out")? != 0,
            source: Source::parse(&text("source")?)?,
            received_at: number("received_at")?,
            received_at_given: number("received_at_given")? != 0,
            recorded_at: number("recorded_at")?,
            caller: text("caller")?,
            state: State::parse(&text("state")?)?,
            answered_at: optional_number("answered_at")?,
            resolved_at: optional_number("resolved_at")?,
            attempts: number("attempts")?,
            next_attempt_at: number("next_attempt_at")?,
            last_error: optional_text("last_error")?,
            failure_reason: optional_text("failure_reason")?,
            // Read leniently: a code this version does not know (written by a newer one) must
            // not make every listing and export fail; it reads as the most cautious meaning.
            failure_code: optional_text("failure_code")?.map(|code| lenient_failure_code(&code)),
            superseded_by: optional_text("superseded_by")?,
            parent_request_id: optional_text("parent_request_id")?,
            restores_request_id: optional_text("restores_request_id")?,
            fingerprint: optional_text("fingerprint")?,
        })
    }
}
