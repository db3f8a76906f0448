//! Reads a profile's CCPA opt-out, sets it, and reads it again, against an emulator started in
//! this process. Point [`ClientConfig`] at `https://mc.adobe.io`, your tenant, API key and an
//! IMS token to do the same against Adobe.
//!
//! Run it with `cargo run -p acs-profile-client --example opt_out`.

use std::sync::Arc;

use acs_emulator::{Emulator, EmulatorConfig, NewProfile};
use acs_profile_client::{AccessToken, Client, ClientConfig, SharedToken};

// `pub`: the crate's tests run this example as it is (tests/against_emulator.rs).
#[tokio::main]
pub async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let emulator = Emulator::start(EmulatorConfig::default()).await?;
    let pkey = emulator.insert_profile(NewProfile {
        email: "ada@example.com".into(),
        ..Default::default()
    });

    let tokens = Arc::new(SharedToken::new(AccessToken::new(
        EmulatorConfig::DEFAULT_ACCESS_TOKEN,
    )));
    let client = Client::from_config(ClientConfig::new(
        emulator.url(),
        emulator.config().tenant.clone(),
        EmulatorConfig::DEFAULT_API_KEY,
        tokens,
    ))?;

    let before = client
        .read_profile(&pkey, None)
        .await?
        .ok_or("no such profile")?;
    println!("opt-out before: {:?}", before.ccpa_opt_out);

    // ACS answers a PATCH with a reference only: read the profile again to see what it holds.
    client.set_ccpa_opt_out(&pkey, true, None).await?;
    let after = client
        .read_profile(&pkey, None)
        .await?
        .ok_or("no such profile")?;
    println!(
        "opt-out after: {:?} (changed at {:?})",
        after.ccpa_opt_out, after.ccpa_opt_out_last_modified
    );

    // What a failure looks like: a key minted by another tenant.
    let stranger = Emulator::start(EmulatorConfig::default()).await?;
    let foreign_key = stranger.insert_profile(NewProfile::default());
    match client.read_profile(&foreign_key, None).await {
        Err(error) => println!("a foreign key: {error}"),
        Ok(_) => println!("a foreign key was unexpectedly readable"),
    }

    emulator.shutdown().await;
    Ok(())
}
