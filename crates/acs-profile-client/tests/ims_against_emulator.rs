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

/// Writes a secret file as a mounted secret is replaced: a whole new file moved into place, so
/// that no reader sees it half written.
fn write_secret(path: &std::path::Path, text: &str) {
    let staged = path.with_extension("new");
    std::fs::write(&staged, text).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

#[tokio::test]
async fn a_secret_file_is_read_for_each_token_request_and_its_rotation_picked_up() {
    let emulator = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("client-secret");
    // Surrounding whitespace, as `echo` or an editor leaves it, is not part of the secret.
    write_secret(
        &path,
        &format!("  {}\n", EmulatorConfig::DEFAULT_IMS_CLIENT_SECRET),
    );
    let client = client_with(
        &emulator,
        ims_source(&emulator, ImsSecret::File(path.clone())),
    );
    let pkey = emulator.insert_profile(NewProfile::default());

    assert!(client.read_profile(&pkey, None).await.unwrap().is_some());
    assert_eq!(emulator.ims_request_count(), 1);

    // The secret is rotated in IMS and in the file; the day's token then expires. The refresh
    // that ACS's 401013 causes reads the file again: no restart.
    emulator.set_ims_client_secret("rotated-secret");
    write_secret(&path, "rotated-secret\n");
    emulator.expire_access_tokens();
    assert!(client.read_profile(&pkey, None).await.unwrap().is_some());
    assert_eq!(emulator.ims_request_count(), 2);
}

#[tokio::test]
async fn a_stale_or_missing_secret_file_fails_without_quoting_the_secret() {
    let emulator = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("client-secret");
    write_secret(&path, "stale-secret-value");
    let tokens = ims_source(&emulator, ImsSecret::File(path.clone()));

    let refused = tokens.access_token().await.unwrap_err();
    assert_eq!(refused.kind(), acs_profile_client::TokenErrorKind::Refused);
    assert!(
        !refused.reason().contains("stale-secret-value"),
        "{refused}"
    );

    std::fs::remove_file(&path).unwrap();
    let missing = ImsTokenSource::new(ImsConfig {
        url: emulator.url(),
        client_id: EmulatorConfig::DEFAULT_IMS_CLIENT_ID.into(),
        client_secret: ImsSecret::File(path.clone()),
        scopes: ImsConfig::DEFAULT_SCOPES.into(),
        request_timeout: Duration::from_secs(5),
    })
    .unwrap();
    let unreadable = missing.access_token().await.unwrap_err();
    assert_eq!(
        unreadable.kind(),
        acs_profile_client::TokenErrorKind::Refused
    );
    assert!(
        unreadable.reason().contains("client secret file"),
        "{unreadable}"
    );

    // Once the right secret is in place, the source recovers by itself.
    write_secret(&path, EmulatorConfig::DEFAULT_IMS_CLIENT_SECRET);
    assert!(missing.access_token().await.is_ok());
}
