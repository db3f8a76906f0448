//! A Rust service's first calls to the gateway, through `ccpa_gateway::client`.
//!
//! Against the README's first command (`cargo run --release -- serve --emulator`, whose emulator
//! holds `ada@example.com`):
//!
//! ```sh
//! cargo run --example gateway_client
//! CCPA_ADDR=https://ccpa-gateway:50051 cargo run --example gateway_client -- someone@example.com
//! ```
//!
//! It opts the address's profiles out of sale and sharing, then reads the opt-out back. An
//! address no profile has is reported and is not a failure; any other failure exits with 1.

use ccpa_gateway::client::{ClientBuilder, Error, Reason};
use ccpa_gateway::proto::ccpa_v1::{GetOptOutRequest, RequestSource, SetOptOutRequest};

#[tokio::main]
async fn main() -> Result<(), Error> {
    let addr = std::env::var("CCPA_ADDR").unwrap_or_else(|_| "http://127.0.0.1:50051".into());
    let email = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "ada@example.com".into());
    opt_out(addr, email).await
}

/// Opts the profiles with `email` out through the gateway at `addr`, and reads the opt-out back.
/// (`pub`: the test of what `serve --emulator` prints runs it, tests/it/cli.rs.)
pub async fn opt_out(addr: String, email: String) -> Result<(), Error> {
    let client = ClientBuilder::new(addr)
        .caller("example-service")
        .connect()
        .await?;

    let set = client
        .set_opt_out(SetOptOutRequest {
            email: email.clone(),
            ccpa_opt_out: Some(true),
            source: RequestSource::WebForm as i32,
            ..Default::default()
        })
        .await;
    match set {
        // The request id is the one the client generated; retries reused it.
        Ok(answer) => println!("opt-out recorded for {} profile(s)", answer.profiles.len()),
        Err(Error::Status {
            reason: Reason::EmailNotFound,
            ..
        }) => {
            println!("no profile has that address");
            return Ok(());
        }
        Err(other) => return Err(other),
    }

    let read = client
        .get_opt_out(GetOptOutRequest {
            email,
            ..Default::default()
        })
        .await?;
    println!("opted out: {}", read.ccpa_opt_out);
    Ok(())
}
