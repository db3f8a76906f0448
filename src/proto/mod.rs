//! The wire contract, generated from `proto/ccpa/v1/ccpa.proto` by `build.rs`.

pub mod codec;
pub mod error_reasons;

/// `ccpa.v1`: the gateway's gRPC API (messages and client; the server with the `server`
/// feature).
pub mod ccpa_v1 {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("ccpa.v1");
}

/// The encoded descriptors of `ccpa.v1` and its imports, with comments, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/ccpa_v1_descriptor.bin"));
