//! The integration tests: one binary, a module for each area, so that the shared harness
//! (`common`) is compiled and linked once. Each test starts what it needs (gateways, emulators,
//! PostgreSQL databases, certificates) over real sockets; none shares state with another.

#![cfg(feature = "server")] // The gateway itself is under test.

#[macro_use] // `on_both_stores!`, for the modules below.
mod common;

mod bulk_at_scale;
mod changes;
mod cli;
mod client;
mod deploy;
mod drift;
mod email_and_bulk;
mod error_mapping;
mod health_reflection;
mod ledger;
mod ledger_durability;
mod notifications;
mod observability;
mod resilience;
mod rpc;
mod security;
mod soak;
mod validation;
mod webhook_receiver;
