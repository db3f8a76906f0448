//! `ccpa-gateway`: see `ccpa-gateway --help`.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    ccpa_gateway::cli::run().await
}
