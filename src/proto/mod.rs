//! The wire contract, generated from `proto/ccpa/v1/ccpa.proto` by `build.rs`.

pub mod codec;
pub mod error_reasons;

/// `ccpa.v1`: the gateway's gRPC API (messages and client; the server with the `server`
/// feature).
pub mod ccpa_v1 {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("ccpa.v1");
}

/// The name of the CCPA service on the wire, `ccpa.v1.CcpaService`: the health entry of
/// readiness (see `crate::health`), part of the contract as the service itself is.
#[cfg(feature = "server")]
pub const CCPA_SERVICE_NAME: &str = ccpa_v1::ccpa_service_server::SERVICE_NAME;

/// The encoded descriptors of `ccpa.v1` and its imports, with comments, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/ccpa_v1_descriptor.bin"));
