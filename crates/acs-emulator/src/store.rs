//! The profiles an emulator holds, and the rules ACS applies when they are written.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

/// ACS's timestamp form: `2020-07-31 11:19:00.304Z`, a space where RFC 3339 has `T`.
pub(crate) fn acs_timestamp(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S%.3fZ").to_string()
}

/// The fields a client may write, as strings; everything else in a body ACS ignores or refuses.
const WRITABLE_TEXT_FIELDS: &[&str] = &[
    "email",
    "firstName",
    "lastName",
    "middleName",
    "salutation",
    "birthDate",
    "phone",
    "mobilePhone",
    "preferredLanguage",
];

const WRITABLE_FLAGS: &[&str] = &[
    "blackList",
    "blackListEmail",
    "blackListMobile",
    "blackListPhone",
    "blackListPostalMail",
    "blackListPushnotification",
];

const GENDERS: &[&str] = &["male", "female", "unknown"];

/// One stored profile.
#[derive(Debug, Clone)]
pub(crate) struct StoredProfile {
    text: HashMap<&'static str, String>,
    flags: HashMap<&'static str, bool>,
    gender: String,
    ccpa_opt_out: bool,
    ccpa_opt_out_last_modified: Option<DateTime<Utc>>,
    created: DateTime<Utc>,
    last_modified: DateTime<Utc>,
}

/// Why ACS would refuse a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum WriteError {
    /// The body is not a JSON object, or a field has the wrong JSON type.
    Malformed(String),
    /// A value outside an enumeration: ACS answers 500 `RST-360011`.
    NotInEnumeration { field: &'static str },
}

/// A validated set of changes, applied all at once or not at all.
#[derive(Debug, Default)]
pub(crate) struct Changes {
    text: Vec<(&'static str, String)>,
    flags: Vec<(&'static str, bool)>,
    gender: Option<String>,
    ccpa_opt_out: Option<bool>,
}

impl Changes {
    /// Reads a POST or PATCH body. Read-only and unknown fields are ignored, as ACS does.
    pub(crate) fn parse(body: &Value) -> Result<Self, WriteError> {
        let object = body
            .as_object()
            .ok_or_else(|| WriteError::Malformed("the body is not a JSON object".into()))?;
        let mut changes = Changes::default();
        for &field in WRITABLE_TEXT_FIELDS {
            if let Some(value) = object.get(field) {
                changes
                    .text
                    .push((field, expect_str(field, value)?.to_owned()));
            }
        }
        for &field in WRITABLE_FLAGS {
            if let Some(value) = object.get(field) {
                changes.flags.push((field, expect_bool(field, value)?));
            }
        }
        if let Some(value) = object.get("gender") {
            let gender = expect_str("gender", value)?;
            if !GENDERS.contains(&gender) {
                return Err(WriteError::NotInEnumeration { field: "gender" });
            }
            changes.gender = Some(gender.to_owned());
        }
        if let Some(value) = object.get("ccpaOptOut") {
            changes.ccpa_opt_out = Some(expect_bool("ccpaOptOut", value)?);
        }
        Ok(changes)
    }
}

fn expect_str<'a>(field: &str, value: &'a Value) -> Result<&'a str, WriteError> {
    value
        .as_str()
        .ok_or_else(|| WriteError::Malformed(format!("'{field}' must be a string")))
}

fn expect_bool(field: &str, value: &Value) -> Result<bool, WriteError> {
    value
        .as_bool()
        .ok_or_else(|| WriteError::Malformed(format!("'{field}' must be a boolean")))
}

impl StoredProfile {
    pub(crate) fn new(now: DateTime<Utc>) -> Self {
        Self {
            text: HashMap::new(),
            flags: HashMap::new(),
            gender: "unknown".into(),
            ccpa_opt_out: false,
            ccpa_opt_out_last_modified: None,
            created: now,
            last_modified: now,
        }
    }

    pub(crate) fn apply(&mut self, changes: Changes, now: DateTime<Utc>) {
        for (field, value) in changes.text {
            self.text.insert(field, value);
        }
        for (field, value) in changes.flags {
            self.flags.insert(field, value);
        }
        if let Some(gender) = changes.gender {
            self.gender = gender;
        }
        if let Some(opt_out) = changes.ccpa_opt_out
            && opt_out != self.ccpa_opt_out
        {
            self.ccpa_opt_out = opt_out;
            self.ccpa_opt_out_last_modified = Some(now);
        }
        self.last_modified = now;
    }

    /// The profile's email address.
    pub(crate) fn email(&self) -> &str {
        self.text("email")
    }

    fn text(&self, field: &str) -> &str {
        self.text.get(field).map(String::as_str).unwrap_or("")
    }

    /// The profile as ACS renders it: every field present, empty strings for missing values.
    pub(crate) fn render(&self, pkey: &str, href: &str) -> Value {
        let mut object = Map::new();
        object.insert("PKey".into(), json!(pkey));
        object.insert("href".into(), json!(href));
        for &field in WRITABLE_TEXT_FIELDS {
            object.insert(field.into(), json!(self.text(field)));
        }
        if self.text("preferredLanguage").is_empty() {
            object.insert("preferredLanguage".into(), json!("none"));
        }
        for &field in WRITABLE_FLAGS {
            object.insert(
                field.into(),
                json!(self.flags.get(field).copied().unwrap_or(false)),
            );
        }
        let title = format!(
            "{} {} ({})",
            self.text("firstName"),
            self.text("lastName"),
            self.text("email")
        );
        object.insert("title".into(), json!(title.trim()));
        object.insert("gender".into(), json!(self.gender));
        object.insert("age".into(), json!(0));
        object.insert("emailFormat".into(), json!("unknown"));
        object.insert("timeZone".into(), json!("none"));
        object.insert("created".into(), json!(acs_timestamp(self.created)));
        object.insert(
            "lastModified".into(),
            json!(acs_timestamp(self.last_modified)),
        );
        object.insert("ccpaOptOut".into(), json!(self.ccpa_opt_out));
        object.insert(
            "ccpaOptOutLastModified".into(),
            json!(
                self.ccpa_opt_out_last_modified
                    .map(acs_timestamp)
                    .unwrap_or_default()
            ),
        );
        object.insert(
            "location".into(),
            json!({
                "address1": "", "address2": "", "address3": "", "address4": "",
                "city": "", "countryCode": "", "stateCode": "", "zipCode": ""
            }),
        );
        object.insert(
            "subscriptions".into(),
            json!({ "href": format!("{href}/subscriptions/") }),
        );
        Value::Object(object)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opt_out_timestamp_moves_only_when_the_value_changes() {
        let t0 = Utc::now();
        let mut profile = StoredProfile::new(t0);
        let rendered = profile.render("@k", "h");
        assert_eq!(rendered["ccpaOptOutLastModified"], "");

        let t1 = t0 + chrono::Duration::seconds(5);
        profile.apply(Changes::parse(&json!({"ccpaOptOut": true})).unwrap(), t1);
        assert_eq!(
            profile.render("@k", "h")["ccpaOptOutLastModified"],
            acs_timestamp(t1)
        );

        let t2 = t1 + chrono::Duration::seconds(5);
        profile.apply(Changes::parse(&json!({"ccpaOptOut": true})).unwrap(), t2);
        assert_eq!(
            profile.render("@k", "h")["ccpaOptOutLastModified"],
            acs_timestamp(t1)
        );
    }

    #[test]
    fn timestamps_have_acs_form() {
        let at = DateTime::parse_from_rfc3339("2020-07-31T11:19:00.304Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(acs_timestamp(at), "2020-07-31 11:19:00.304Z");
    }

    #[test]
    fn bad_writes_are_refused_whole() {
        assert_eq!(
            Changes::parse(&json!({"gender": "robot"})).unwrap_err(),
            WriteError::NotInEnumeration { field: "gender" }
        );
        assert!(matches!(
            Changes::parse(&json!({"ccpaOptOut": "yes"})),
            Err(WriteError::Malformed(_))
        ));
        assert!(matches!(
            Changes::parse(&json!([1, 2])),
            Err(WriteError::Malformed(_))
        ));
    }
}
