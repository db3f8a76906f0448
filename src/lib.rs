//! The CCPA opt-out gateway: a gRPC service (`ccpa.v1.CcpaService`) that reads and sets a
//! consumer's "do not sell my personal information" opt-out in Adobe Campaign Standard, and
//! creates profiles, through the generated client in `crates/acs-profile-client`.
//!
//! - [`backoff`]: the one way retries wait.
//! - [`proto`]: the wire contract, generated from `proto/ccpa/v1/ccpa.proto`.
//! - [`client`]: the client for Rust services that call the gateway (all this package builds
//!   with `default-features = false`).
//! - [`access`]: the trust boundary: TLS, caller identity, the policy, per-caller rates.
//! - [`api`]: the service, its input checks, and the one mapping of upstream failures to gRPC.
//! - [`server`]: the server with health, reflection and orderly shutdown.
//! - [`health`]: what the health service reports, and the probe that restores it.
//! - [`optout`]: the opt-out protocol: requests recorded, delivered to ACS, read protectively,
//!   drift put back.
//! - [`store`]: the ledger's store: the database and nothing else.
//! - [`notify`]: webhooks to third parties: recipients, signing, the event, one delivery, and a
//!   receiver.
//! - [`clock`]: the one clock of every time rule.
//! - [`transport`]: the gateway's own connections (ACS, IMS, a PostgreSQL ledger) over verified
//!   TLS.
//! - [`config`]: settings, from flags and environment variables.
//! - [`cli`]: the `ccpa-gateway` command.

#![warn(missing_docs)]

// What a Rust service that calls the gateway needs: always built.
pub use ccpa_backoff as backoff;
pub mod client;
pub mod proto;

// The gateway itself (the default `server` feature).
#[cfg(feature = "server")]
pub mod access;
#[cfg(feature = "server")]
pub mod api;
#[cfg(feature = "server")]
pub mod cli;
#[cfg(feature = "server")]
pub mod clock;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub mod health;
#[cfg(feature = "server")]
pub mod notify;
#[cfg(feature = "server")]
pub mod optout;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod store;
#[cfg(feature = "server")]
pub mod telemetry;
#[cfg(feature = "server")]
pub mod transport;
#[cfg(feature = "server")]
pub mod upstream;
