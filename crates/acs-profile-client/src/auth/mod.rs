//! Where the client gets the bearer token it sends to ACS.
//!
//! The client asks its [`TokenSource`] for a token on every request instead of keeping one, so a
//! token can be rotated ([`SharedToken`]) or refreshed from Adobe IMS ([`ImsTokenSource`]) while
//! the client lives.

mod ims;

pub use ims::{ImsConfig, ImsSecret, ImsTokenSource};

use std::fmt;
use std::sync::{Arc, RwLock};

use futures::future::BoxFuture;
use secrecy::{ExposeSecret, SecretString};

/// An access token for the Adobe I/O gateway. Its `Debug` output never shows the token.
#[derive(Clone)]
pub struct AccessToken(SecretString);

impl AccessToken {
    /// Wraps a token string.
    pub fn new(token: impl Into<String>) -> Self {
        Self(SecretString::from(token.into()))
    }

    /// The token itself, for building the `Authorization` header.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AccessToken([REDACTED])")
    }
}

impl PartialEq for AccessToken {
    fn eq(&self, other: &Self) -> bool {
        self.expose() == other.expose()
    }
}

/// Whether trying again later may produce a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenErrorKind {
    /// The identity provider could not be reached or failed: it may work later.
    Unavailable,
    /// The identity provider refused the credentials (or they could not be read): an operator
    /// must fix them.
    Refused,
}

/// Why no token could be obtained. The message never contains a secret.
#[derive(Debug, Clone, thiserror::Error)]
#[error("no access token for Adobe Campaign: {reason}")]
pub struct TokenError {
    kind: TokenErrorKind,
    reason: String,
}

impl TokenError {
    /// A token error with a reason that must not contain a secret.
    pub fn new(kind: TokenErrorKind, reason: impl Into<String>) -> Self {
        Self {
            kind,
            reason: reason.into(),
        }
    }

    /// Whether trying again later may help.
    pub fn kind(&self) -> TokenErrorKind {
        self.kind
    }

    /// Why no token could be obtained.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

/// Supplies the current access token. The client calls it once per request.
pub trait TokenSource: Send + Sync + fmt::Debug {
    /// The token to send with the next request.
    fn access_token(&self) -> BoxFuture<'_, Result<AccessToken, TokenError>>;

    /// Says that ACS refused `rejected` as invalid or expired (401 `401013`): a source that can
    /// get a new one should stop answering it. Sources that cannot (a fixed token) ignore it.
    fn invalidate(&self, rejected: &AccessToken) {
        let _ = rejected;
    }
}

/// A token set from outside: fixed for its whole life, or replaced with [`SharedToken::replace`]
/// (say, by a task that reads a rotated secret). Clones share the token.
#[derive(Clone)]
pub struct SharedToken {
    current: Arc<RwLock<AccessToken>>,
}

impl SharedToken {
    /// A source that answers `token` until it is replaced.
    pub fn new(token: AccessToken) -> Self {
        Self {
            current: Arc::new(RwLock::new(token)),
        }
    }

    /// Replaces the token; requests that start after this call send the new one.
    pub fn replace(&self, token: AccessToken) {
        // A poisoned lock only means a writer panicked mid-assignment of a whole value; the
        // value is still a complete token, so keep going rather than fail every request.
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        *current = token;
    }
}

impl fmt::Debug for SharedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedToken").finish_non_exhaustive()
    }
}

impl TokenSource for SharedToken {
    fn access_token(&self) -> BoxFuture<'_, Result<AccessToken, TokenError>> {
        let token = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Box::pin(std::future::ready(Ok(token)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_hides_tokens() {
        let token = AccessToken::new("very-secret-token");
        assert_eq!(format!("{token:?}"), "AccessToken([REDACTED])");
        let shared = SharedToken::new(token);
        assert!(!format!("{shared:?}").contains("very-secret-token"));
    }

    #[tokio::test]
    async fn replaced_token_is_answered_next() {
        let shared = SharedToken::new(AccessToken::new("first"));
        assert_eq!(shared.access_token().await.unwrap().expose(), "first");
        shared.replace(AccessToken::new("second"));
        assert_eq!(shared.access_token().await.unwrap().expose(), "second");
    }
}
