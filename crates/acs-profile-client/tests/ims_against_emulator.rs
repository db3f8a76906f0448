//! Tokens from the emulator's IMS, over HTTP: hostile lifetimes, and secrets read from a file.

use std::sync::Arc;
use std::time::Duration;

use acs_emulator::{Emulator, EmulatorConfig, NewProfile};
use acs_profile_client::{Client, ClientConfig, ImsConfig, ImsSecret, ImsTokenSource, TokenSource};

fn ims_source(emulator: &Emulator, client_secret: ImsSecret) -> Arc<ImsTokenSource> {
    Arc::new(
        ImsTokenSource::new(ImsConfig {
            url: emulator.url(),
            client_id: EmulatorConfig::DEFAULT_IMS_CLIENT_ID.into(),
            client_secret,
            scopes: ImsConfig::DEFAULT_SCOPES.into(),
            request_timeout: Duration::from_secs(5),
        })
        .unwrap(),
    )
}

fn client_with(emulator: &Emulator, tokens: Arc<ImsTokenSource>) -> Client {
    let config = emulator.config();
    Client::from_config(ClientConfig::new(
        emulator.url(),
        config.tenant.clone(),
        config.api_key.clone(),
        tokens,
    ))
    .unwrap()
}

#[tokio::test]
async fn an_absurd_token_lifetime_neither_panics_nor_stalls_the_source() {
    let emulator = Emulator::start(EmulatorConfig::default()).await.unwrap();
    // `expires_in: 18446744073709551615`: added to the clock as is, it overflowed inside the
    // token request, which then never cleared its flight.
    emulator.set_token_lifetime(Duration::from_secs(u64::MAX));
    let tokens = ims_source(
        &emulator,
        ImsSecret::Value(EmulatorConfig::DEFAULT_IMS_CLIENT_SECRET.into()),
    );
    let client = client_with(&emulator, tokens.clone());
    let pkey = emulator.insert_profile(NewProfile::default());

    assert!(client.read_profile(&pkey, None).await.unwrap().is_some());
    let first = tokens.access_token().await.unwrap();
    let again = tokens.access_token().await.unwrap();
    assert_eq!(first, again, "cached");
    assert_eq!(emulator.ims_request_count(), 1);
}
