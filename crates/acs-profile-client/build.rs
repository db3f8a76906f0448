//! Generates the ACS client from `openapi/acs-profile.json` with progenitor.
//!
//! The output lands in `OUT_DIR` and is included by `src/generated.rs`; it is
//! never written into the source tree, so it cannot be edited by hand or drift
//! from the spec.

use std::path::{Path, PathBuf};

use progenitor::{GenerationSettings, Generator, HooksMode, InterfaceStyle, TagStyle};

fn main() {
    let spec_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../openapi/acs-profile.json");
    println!("cargo:rerun-if-changed={}", spec_path.display());

    let spec_text = std::fs::read_to_string(&spec_path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", spec_path.display()));
    let spec = serde_json::from_str(&spec_text)
        .unwrap_or_else(|e| panic!("parsing {} as OpenAPI 3.0: {e}", spec_path.display()));

    let mut settings = GenerationSettings::new();
    settings
        .with_interface(InterfaceStyle::Positional)
        .with_tag(TagStyle::Merged)
        // The hand-written `ClientHooks` impl in `src/hooks.rs` adds ACS's headers and keeps
        // the status of non-JSON error bodies; `Expected` makes forgetting it a compile error.
        .with_hooks(HooksMode::Expected)
        .with_inner_type(quote_path("crate::ClientContext"))
        .with_derive("PartialEq");
    let mut generator = Generator::new(&settings);

    let tokens = generator
        .generate_tokens(&spec)
        .unwrap_or_else(|e| panic!("generating the client: {e}"));
    let file: syn::File =
        syn::parse2(tokens).unwrap_or_else(|e| panic!("parsing the generated code: {e}"));
    let code = prettyplease::unparse(&file);

    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let out_path = out_dir.join("acs_profile_api.rs");
    std::fs::write(&out_path, code)
        .unwrap_or_else(|e| panic!("writing {}: {e}", out_path.display()));
}

fn quote_path(path: &str) -> proc_macro2::TokenStream {
    path.parse()
        .unwrap_or_else(|e| panic!("{path} is not a Rust path: {e}"))
}
