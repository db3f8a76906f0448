//! The gRPC API: the service (`opt_out`: GetOptOut and SetOptOut; `profiles`: CreateProfile;
//! `records`: the ledger's records), its input checks, and the one mapping of upstream failures to
//! gRPC statuses.

pub mod bulk;
pub mod changes;
mod convert;
pub mod deadline;
pub mod error_mapping;
mod opt_out;
mod profiles;
mod records;
pub mod service;
pub mod timestamps;
pub mod validation;

pub use service::CcpaApi;
