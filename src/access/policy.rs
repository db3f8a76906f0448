//! What each caller may do: the authorization policy (`--authz-policy`), a TOML file.
//!
//! ```toml
//! [[caller]]
//! id = "spiffe://corp.example/ns/web/sa/privacy-portal"
//! allow = ["read", "opt-out", "records"]
//! max_rps = 50            # optional: calls per second for this caller
//! ```
//!
//! A caller is governed by the entry with its exact id, else by the entry `id = "*"`, else by
//! none (every call denied). Entries do not add up: the most specific one is the whole rule, so
//! that reading one entry tells everything a caller may do. An unknown key or permission, or
//! the same id twice, makes the file invalid.

use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use serde::Deserialize;

/// What a caller may be allowed to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Permission {
    /// GetOptOut by key.
    Read,
    /// GetOptOut by email.
    ReadByEmail,
    /// SetOptOut, a bulk item, or CreateProfile, with `ccpa_opt_out` true.
    OptOut,
    /// The same with `ccpa_opt_out` false: opting a consumer back in.
    OptIn,
    /// CreateProfile.
    CreateProfile,
    /// GetOptOutRecord and ListOptOutRecords.
    Records,
    /// Opening a BulkSetOptOut stream (each item also needs `opt-out` or `opt-in`).
    Bulk,
    /// WatchOptOutChanges: following every consumer request in the ledger.
    Watch,
}

impl Permission {
    /// The name the policy file uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::ReadByEmail => "read-by-email",
            Self::OptOut => "opt-out",
            Self::OptIn => "opt-in",
            Self::CreateProfile => "create-profile",
            Self::Records => "records",
            Self::Bulk => "bulk",
            Self::Watch => "watch",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Permissions(u8);

impl Permissions {
    /// Every permission: what self-declared callers have.
    pub const ALL: Self = Self(u8::MAX);

    /// Whether `permission` is in the set.
    pub fn contains(self, permission: Permission) -> bool {
        self.0 & permission.bit() != 0
    }
}

impl FromIterator<Permission> for Permissions {
    fn from_iter<I: IntoIterator<Item = Permission>>(iter: I) -> Self {
        Self(iter.into_iter().fold(0, |bits, p| bits | p.bit()))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    caller: Vec<CallerEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CallerEntry {
    id: String,
    allow: Vec<Permission>,
    max_rps: Option<NonZeroU32>,
}

type CallerLimiter = RateLimiter<Arc<str>, DefaultKeyedStateStore<Arc<str>>, DefaultClock>;

/// One entry of the policy: what its callers may do, and how often.
pub struct Rule {
    permissions: Permissions,
    /// Per caller: with `id = "*"` each caller has a budget of its own.
    limiter: Option<CallerLimiter>,
}

impl Rule {
    /// What the rule allows.
    pub fn permissions(&self) -> Permissions {
        self.permissions
    }

    /// Takes one call from `caller`'s budget; `Err` is how long until the next would be
    /// allowed.
    pub fn admit(&self, caller: &Arc<str>) -> Result<(), Duration> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        limiter
            .check_key(caller)
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }
}

/// The policy in force.
pub struct Policy {
    exact: HashMap<String, Rule>,
    any: Option<Rule>,
}

/// The id that matches every authenticated caller.
pub const ANY_CALLER: &str = "*";

impl Policy {
    /// Parses a policy file's text; the error names the entry or key at fault.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: PolicyFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut exact = HashMap::new();
        let mut any = None;
        for (n, entry) in file.caller.into_iter().enumerate() {
            let rule = Rule {
                permissions: entry.allow.iter().copied().collect(),
                limiter: entry
                    .max_rps
                    .map(|rps| RateLimiter::keyed(Quota::per_second(rps))),
            };
            if entry.id == ANY_CALLER {
                if any.replace(rule).is_some() {
                    return Err(format!("[[caller]] {}: id \"*\" appears twice", n + 1));
                }
                continue;
            }
            if !super::identity::well_formed(&entry.id) {
                return Err(format!(
                    "[[caller]] {}: id must be 1 to {} printable ASCII characters",
                    n + 1,
                    super::identity::MAX_IDENTITY_BYTES
                ));
            }
            if exact.insert(entry.id, rule).is_some() {
                return Err(format!(
                    "[[caller]] {}: this id appears in an earlier entry",
                    n + 1
                ));
            }
        }
        Ok(Self { exact, any })
    }

    /// The rule governing `caller`, if any.
    pub fn rule_for(&self, caller: &str) -> Option<&Rule> {
        self.exact.get(caller).or(self.any.as_ref())
    }

    /// How many callers it names (the wildcard counting as one).
    pub fn len(&self) -> usize {
        self.exact.len() + usize::from(self.any.is_some())
    }

    /// Whether it names no caller (and so denies every call).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets the rate budgets of callers not seen lately (the `*` entry keeps one per
    /// caller).
    pub fn forget_idle_callers(&self) {
        for rule in self.exact.values().chain(self.any.as_ref()) {
            if let Some(limiter) = &rule.limiter {
                limiter.retain_recent();
            }
        }
    }
}

/// Loads the policy file (the loader of the watched file).
pub fn load(paths: &[PathBuf]) -> Result<Policy, String> {
    let [path] = paths else {
        return Err("one policy file".into());
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot be read ({e})", path.display()))?;
    let policy = Policy::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    if policy.is_empty() {
        tracing::warn!(
            file = %path.display(),
            "the policy names no caller: every call but health is denied"
        );
    }
    Ok(policy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_specific_entry_is_the_whole_rule() {
        let policy = Policy::parse(
            r#"
            [[caller]]
            id = "spiffe://corp.example/ns/web/sa/privacy-portal"
            allow = ["read", "opt-out", "records"]
            max_rps = 50

            [[caller]]
            id = "*"
            allow = ["read"]
            "#,
        )
        .unwrap();
        let portal = policy
            .rule_for("spiffe://corp.example/ns/web/sa/privacy-portal")
            .unwrap();
        assert!(portal.permissions().contains(Permission::OptOut));
        assert!(!portal.permissions().contains(Permission::OptIn));
        let other = policy.rule_for("spiffe://corp.example/ns/x/sa/y").unwrap();
        assert!(other.permissions().contains(Permission::Read));
        assert!(!other.permissions().contains(Permission::Records));
        assert_eq!(policy.len(), 2);
    }

    #[test]
    fn no_entry_means_nothing_allowed() {
        let policy = Policy::parse("[[caller]]\nid = \"a\"\nallow = []\n").unwrap();
        assert!(policy.rule_for("b").is_none());
        assert_eq!(
            policy.rule_for("a").unwrap().permissions(),
            Permissions::default()
        );
        assert!(Policy::parse("").unwrap().is_empty());
    }

    #[test]
    fn a_bad_file_is_refused_with_the_place_at_fault() {
        for (text, expected) in [
            ("[[caller]]\nid = \"a\"\nallow = [\"write\"]\n", "write"),
            (
                "[[caller]]\nid = \"a\"\nallow = []\nmax_rps = 0\n",
                "max_rps",
            ),
            ("[[caller]]\nid = \"a\"\nallow = []\ncolour = 1\n", "colour"),
            ("[[caller]]\nallow = []\n", "id"),
            (
                "[[caller]]\nid = \"a\"\nallow = []\n[[caller]]\nid = \"a\"\nallow = []\n",
                "earlier entry",
            ),
            ("[[caller]]\nid = \"a b\"\nallow = []\n", "printable"),
            ("[[callers]]\nid = \"a\"\nallow = []\n", "callers"),
        ] {
            let error = Policy::parse(text)
                .err()
                .unwrap_or_else(|| panic!("{text}"));
            assert!(error.contains(expected), "{text}: {error}");
        }
    }

    #[test]
    fn each_caller_of_the_wildcard_has_a_budget_of_its_own() {
        let policy = Policy::parse("[[caller]]\nid = \"*\"\nallow = []\nmax_rps = 1\n").unwrap();
        let rule = policy.rule_for("a").unwrap();
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        assert!(rule.admit(&a).is_ok());
        let wait = rule.admit(&a).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert!(rule.admit(&b).is_ok());
    }
}
