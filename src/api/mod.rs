//! The gRPC API: the service, its input checks, and the mapping of upstream failures to gRPC
//! statuses.

pub mod deadline;
pub mod error_mapping;
pub mod service;
mod timestamps;
pub mod validation;

pub use service::CcpaApi;
