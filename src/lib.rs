//! The CCPA opt-out gateway: a gRPC service (`ccpa.v1.CcpaService`) that reads and sets a
//! consumer's "do not sell my personal information" opt-out in Adobe Campaign Standard, and
//! creates profiles, through the generated client in `crates/acs-profile-client`.
//!
//! - [`proto`]: the wire contract, generated from `proto/ccpa/v1/ccpa.proto`.
//! - [`access`]: the trust boundary: TLS, caller identity, the policy, per-caller rates.
//! - [`api`]: the service, its input checks, and the one mapping of upstream failures to gRPC.
//! - [`server`]: the server with health, reflection and orderly shutdown.
//! - [`health`]: what the health service reports, and the probe that restores it.
//! - [`ledger`]: the durable record of opt-out requests, and their delivery to ACS.
//! - [`config`]: settings, from flags and environment variables.
//! - [`cli`]: the `ccpa-gateway` command.

#![warn(missing_docs)]

pub mod access;
pub mod api;
pub mod cli;
pub mod config;
pub mod health;
pub mod ledger;
pub mod proto;
pub mod server;
pub mod telemetry;
pub mod upstream;
