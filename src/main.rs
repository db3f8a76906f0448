//! `ccpa-gateway`: see `ccpa-gateway --help`.

use std::process::ExitCode;

/// glibc's allocator took a large share of the gateway's CPU time under load (its arenas
/// contend and consolidate across the runtime's threads); mimalloc's per-thread heaps do not.
/// `docs/performance-history.md` has the before and after.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    ccpa_gateway::cli::run()
}
