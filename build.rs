//! Compiles `proto/ccpa/v1/ccpa.proto` into Rust with protox (no system `protoc`) and
//! tonic-prost-build, and writes the descriptor set that server reflection serves. With the
//! `server` feature, also the CLI's JSON twin of the messages (see `json_twin`).

use std::path::PathBuf;

use prost::Message;

const PROTO_ROOT: &str = "proto";
const PROTO_FILES: &[&str] = &["ccpa/v1/ccpa.proto"];

fn main() {
    // `compile_fds` does not announce its inputs to cargo: without this, editing the proto would
    // not rebuild the crate.
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
    for file in PROTO_FILES {
        println!("cargo:rerun-if-changed={PROTO_ROOT}/{file}");
    }

    let mut compiler = protox::Compiler::new([PROTO_ROOT]).expect("the proto root exists");
    // Imports (google/protobuf/timestamp.proto) and comments go into the descriptor set, so that
    // reflection clients can resolve every type and show the documentation.
    compiler.include_imports(true).include_source_info(true);
    compiler
        .open_files(PROTO_FILES)
        .unwrap_or_else(|e| panic!("compiling the proto files: {e}"));
    let descriptors = compiler.file_descriptor_set();

    // `compile_fds` does not write the descriptor set either: reflection needs it.
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let descriptor_path = out_dir.join("ccpa_v1_descriptor.bin");
    std::fs::write(&descriptor_path, descriptors.encode_to_vec())
        .unwrap_or_else(|e| panic!("writing {}: {e}", descriptor_path.display()));

    #[cfg(feature = "server")]
    json_twin(&descriptors, &out_dir);

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // The server's half needs tonic's server: only with the `server` feature, so that a
        // service that only calls the gateway builds without it.
        .server_mod_attribute("ccpa.v1", "#[cfg(feature = \"server\")]")
        // Small per-call buffers: see src/proto/codec.rs.
        .codec_path("crate::proto::codec::SmallBufferCodec")
        .compile_fds(descriptors)
        .unwrap_or_else(|e| panic!("generating the gRPC code: {e}"));
}

/// The messages of `ccpa.v1` again, in `OUT_DIR/json/`, with serde impls in the proto3 JSON
/// mapping (pbjson-build): what the CLI prints, as `grpcurl -emit-defaults` would (see
/// `src/cli/json.rs`).
///
/// A twin rather than serde impls on the API's own types: pbjson's impls need a `Timestamp`
/// that implements serde, which `prost_types::Timestamp` does not, and swapping it for one that
/// does would change the types every caller of `ccpa_gateway::client` builds (and bring serde
/// into the client). The twin decodes the same bytes, so the CLI converts an answer by
/// re-encoding it; its `Timestamp` is the CLI's own, printed as the mapping says.
#[cfg(feature = "server")]
fn json_twin(descriptors: &tonic_prost_build::FileDescriptorSet, out_dir: &std::path::Path) {
    let dir = out_dir.join("json");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .extern_path(".google.protobuf.Timestamp", "crate::cli::json::Timestamp")
        .out_dir(&dir)
        .compile_fds(descriptors.clone())
        .unwrap_or_else(|e| panic!("generating the JSON twin of the messages: {e}"));
    pbjson_build::Builder::new()
        .register_descriptors(&descriptors.encode_to_vec())
        .and_then(|builder| {
            builder
                // Every field, also at its default value (`"ccpaOptOut": false` is an answer,
                // not something to leave out), as `grpcurl -emit-defaults` prints.
                .emit_fields()
                .extern_path(".google.protobuf.Timestamp", "crate::cli::json::Timestamp")
                .out_dir(&dir)
                .build(&[".ccpa.v1"])
        })
        .unwrap_or_else(|e| panic!("generating the serde impls of the JSON twin: {e}"));
}
