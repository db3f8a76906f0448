//! The trust boundary: who may connect (TLS), who is calling (caller identity), what they may do
//! (the policy), and how often (per-caller rates).
//!
//! - [`tls`]: TLS and mutual TLS on the listener, with files reloaded on change.
//! - [`identity`]: the three identity modes of `--caller-identity`.
//! - [`policy`]: the TOML policy of `--authz-policy`.
//! - [`status`]: the statuses the boundary answers with (its own: it depends on no layer
//!   inside it).
//! - [`gate`]: the layer in front of every service that authenticates each call, applies the
//!   caller's rate, and hands the handlers a [`Caller`] to check permissions against.
//!
//! Health answers everyone, on every listener. Every other call needs an identity when `mtls`
//! or `header:` identity is on (and, with `header:` over TLS the gateway terminates, a peer
//! whose certificate names one of the trusted front proxies); the CCPA service's handlers then ask [`Caller::require`] for
//! the permission each call needs, before anything is recorded or sent to Adobe.

pub mod gate;
pub mod identity;
pub mod policy;
pub mod status;
pub mod tls;
pub(crate) mod watched;

use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

pub use identity::IdentityMode;
pub use policy::{Permission, Permissions, Policy};
pub use watched::RELOAD_INTERVAL;

use watched::Watched;

/// The caller of one call to the CCPA service, as the gate established it. The gate puts it in
/// every such request's extensions; a request without one is refused (deny by default).
#[derive(Debug, Clone)]
pub enum Caller {
    /// Identities are self-declared: the handler reads `x-ccpa-caller` itself (and checks it
    /// like any input), and everything is allowed.
    SelfDeclared,
    /// An identity established by mutual TLS or a mesh, and what the policy allows it.
    Authenticated {
        /// The identity: what the ledger records as the request's caller.
        id: Arc<str>,
        /// What the policy allows it.
        permissions: Permissions,
    },
}

impl Caller {
    /// Whether the caller may do `permission`.
    pub fn may(&self, permission: Permission) -> bool {
        match self {
            Self::SelfDeclared => true,
            Self::Authenticated { permissions, .. } => permissions.contains(permission),
        }
    }

    /// `Ok` if the caller may do `permission`, else the permission it lacks.
    pub fn require(&self, permission: Permission) -> Result<(), Permission> {
        if self.may(permission) {
            Ok(())
        } else {
            Err(permission)
        }
    }

    /// The permission a change of the opt-out to `opt_out` needs.
    pub fn permission_to_set(opt_out: bool) -> Permission {
        if opt_out {
            Permission::OptOut
        } else {
            Permission::OptIn
        }
    }
}

/// The policy in force, reloaded when its file changes.
pub struct PolicySource {
    watched: Arc<Watched<Policy>>,
}

impl PolicySource {
    /// Loads the policy file; an error says what is wrong with it.
    pub fn open(path: PathBuf) -> Result<Self, String> {
        let watched = Watched::open("--authz-policy", vec![path], policy::load)?;
        Ok(Self {
            watched: Arc::new(watched),
        })
    }

    /// The policy in force.
    pub fn current(&self) -> Arc<Policy> {
        self.watched.current()
    }

    /// Reloads the policy when its file changes, until `stop`.
    pub async fn watch(&self, stop: CancellationToken) {
        let watched = self.watched.clone();
        let forget = {
            let watched = self.watched.clone();
            let stop = stop.clone();
            async move {
                // Rate budgets of callers not seen for a while are dropped, so that a `*`
                // entry's map of callers does not grow without end.
                let mut ticks = tokio::time::interval(std::time::Duration::from_secs(60));
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        _ = ticks.tick() => watched.current().forget_idle_callers(),
                    }
                }
            }
        };
        tokio::join!(watched.watch(stop), forget);
    }
}

/// How calls are authenticated and authorized.
#[derive(Clone)]
pub struct AccessControl {
    /// How callers are identified.
    pub mode: IdentityMode,
    /// What they may do: required with `mtls` and `header:` identities, unused with
    /// self-declared ones.
    pub policy: Option<Arc<PolicySource>>,
    /// Calls other than health need a client certificate (a client CA is set), whatever the
    /// identity mode.
    pub client_certificate_required: bool,
    /// With `header:` identities, the certificate identities (URI SAN, else first DNS SAN) of
    /// the front proxies allowed to name the caller in the header, on a connection the gateway
    /// terminates TLS for itself. There no sidecar sets or strips the header, so it is believed
    /// only from these peers; a TLS call from any other peer is refused, whatever header it
    /// carries (empty: every such call). Plaintext connections, where a mesh sidecar terminates
    /// TLS and vouches for the header, are not concerned. Unused by the other modes.
    pub trusted_proxies: Vec<String>,
}

impl AccessControl {
    /// Self-declared identities, everything allowed: for a loopback listener or the emulator.
    pub fn self_declared() -> Self {
        Self {
            mode: IdentityMode::SelfDeclared,
            policy: None,
            client_certificate_required: false,
            trusted_proxies: Vec::new(),
        }
    }
}
