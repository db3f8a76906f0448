//! Compiles `proto/ccpa/v1/ccpa.proto` into Rust with protox (no system `protoc`) and
//! tonic-prost-build, and writes the descriptor set that server reflection serves.

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
