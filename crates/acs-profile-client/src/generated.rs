//! The client progenitor generates from `openapi/acs-profile.json` at build time.
//!
//! Nothing here is written by hand: the code comes from `build.rs` into `OUT_DIR`. Its lints are
//! the generator's business, so they are allowed here rather than fixed.

#![allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    unused_imports,
    unused_qualifications,
    unreachable_pub
)]

include!(concat!(env!("OUT_DIR"), "/acs_profile_api.rs"));
