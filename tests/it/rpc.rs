//! Each RPC over real sockets: tonic client -> gateway -> generated client -> emulator.

use crate::common;

use acs_emulator::{EmulatorConfig, Fault};
use ccpa_gateway::proto::ccpa_v1::{
    CreateProfileRequest, GetOptOutRequest, RequestSource, SetOptOutRequest,
};
use common::{gateway, opt_out_of};
use serde_json::Value;

#[tokio::test]
async fn get_opt_out_answers_what_acs_holds() {
    let harness = gateway().start().await;
    let opted_out = harness.profile(true);
    let opted_in = harness.profile(false);
    let mut client = harness.client();

    let answer = opt_out_of(&mut client, &opted_out).await;
    assert_eq!(answer.pkey, opted_out);
    assert!(answer.ccpa_opt_out);
    let changed_at = answer
        .ccpa_opt_out_last_modified
        .expect("set when opted out");
    let stored = harness.emulator().profile(&opted_out).unwrap();
    assert_eq!(
        Some(changed_at.seconds),
        acs_seconds(&stored["ccpaOptOutLastModified"])
    );

    let answer = opt_out_of(&mut client, &opted_in).await;
    assert!(!answer.ccpa_opt_out);
    assert_eq!(answer.ccpa_opt_out_last_modified, None, "never changed");
}

/// Seconds since the epoch of an ACS timestamp (`2020-07-31 11:19:00.304Z`).
fn acs_seconds(value: &Value) -> Option<i64> {
    let text = value.as_str()?;
    chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.fZ")
        .ok()
        .map(|at| at.and_utc().timestamp())
}

#[tokio::test]
async fn get_opt_out_reads_profiles_wrapped_in_a_collection() {
    let harness = gateway()
        .emulator(EmulatorConfig {
            wrap_reads_in_collection: true,
            ..Default::default()
        })
        .start()
        .await;
    let pkey = harness.profile(true);
    let answer = harness
        .client()
        .get_opt_out(GetOptOutRequest {
            pkey,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(answer.ccpa_opt_out);
}

#[tokio::test]
async fn set_opt_out_changes_acs_and_reports_the_state_read_back() {
    let harness = gateway().start().await;
    let pkey = harness.profile(false);
    let mut client = harness.client();

    let answer = client
        .set_opt_out(SetOptOutRequest {
            pkey: pkey.clone(),
            ccpa_opt_out: Some(true),
            source: RequestSource::WebForm as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.pkey, pkey);
    assert!(answer.ccpa_opt_out);
    assert!(answer.ccpa_opt_out_last_modified.is_some());
    assert_eq!(
        harness.emulator().profile(&pkey).unwrap()["ccpaOptOut"],
        true
    );

    // A PATCH of the flag alone, then a read: ACS's PATCH answer carries no profile.
    let requests = harness.emulator().requests();
    let methods: Vec<&str> = requests.iter().map(|r| r.method.as_str()).collect();
    assert_eq!(methods, ["PATCH", "GET"]);
    assert_eq!(&requests[0].body[..], br#"{"ccpaOptOut":true}"#);

    let answer = client
        .set_opt_out(SetOptOutRequest {
            pkey: pkey.clone(),
            ccpa_opt_out: Some(false),
            source: RequestSource::WebForm as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!answer.ccpa_opt_out);
    assert_eq!(
        harness.emulator().profile(&pkey).unwrap()["ccpaOptOut"],
        false
    );
}

#[tokio::test]
async fn set_opt_out_answers_what_acs_holds_even_if_another_writer_won() {
    let harness = gateway().start().await;
    let pkey = harness.profile(false);
    // The PATCH goes through; the read-back sees a profile someone else opted back in.
    harness
        .emulator()
        .inject(Fault::Delay(std::time::Duration::ZERO));
    harness.emulator().inject(Fault::json(
        200,
        serde_json::json!({"PKey": pkey, "ccpaOptOut": false, "ccpaOptOutLastModified": ""}),
    ));
    let answer = harness
        .client()
        .set_opt_out(SetOptOutRequest {
            pkey: pkey.clone(),
            ccpa_opt_out: Some(true),
            source: RequestSource::WebForm as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        !answer.ccpa_opt_out,
        "the state read back, not the one asked for"
    );
}

#[tokio::test]
async fn set_opt_out_again_is_harmless() {
    let harness = gateway().start().await;
    let pkey = harness.profile(true);
    let before = harness.emulator().profile(&pkey).unwrap()["ccpaOptOutLastModified"].clone();
    let answer = harness
        .client()
        .set_opt_out(SetOptOutRequest {
            pkey: pkey.clone(),
            ccpa_opt_out: Some(true),
            source: RequestSource::WebForm as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(answer.ccpa_opt_out);
    assert_eq!(
        harness.emulator().profile(&pkey).unwrap()["ccpaOptOutLastModified"],
        before,
        "setting the same value is not a change"
    );
}

#[tokio::test]
async fn create_profile_creates_it_in_acs() {
    let harness = gateway().start().await;
    let mut client = harness.client();

    let created = client
        .create_profile(CreateProfileRequest {
            email: "grace@example.com".into(),
            first_name: "Grace".into(),
            last_name: "Hopper".into(),
            ccpa_opt_out: Some(true),
            source: RequestSource::WebForm as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .profile
        .unwrap();
    assert!(created.pkey.starts_with('@'));
    assert_eq!(created.email, "grace@example.com");
    assert_eq!(created.first_name, "Grace");
    assert_eq!(created.last_name, "Hopper");
    assert!(created.ccpa_opt_out);
    assert!(created.ccpa_opt_out_last_modified.is_some());

    let stored = harness.emulator().profile(&created.pkey).unwrap();
    assert_eq!(stored["email"], "grace@example.com");
    assert_eq!(stored["ccpaOptOut"], true);

    // The new key works for the other calls.
    let answer = opt_out_of(&mut client, &created.pkey).await;
    assert!(answer.ccpa_opt_out);
}

#[tokio::test]
async fn create_profile_sends_only_the_fields_given() {
    let harness = gateway().start().await;
    let created = harness
        .client()
        .create_profile(CreateProfileRequest {
            email: "alan@example.com".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .profile
        .unwrap();
    assert!(!created.ccpa_opt_out, "ACS's default");
    assert_eq!(created.ccpa_opt_out_last_modified, None);

    let post = harness.emulator().requests().pop().unwrap();
    assert_eq!(post.method, "POST");
    let sent: Value = serde_json::from_slice(&post.body).unwrap();
    assert_eq!(sent, serde_json::json!({"email": "alan@example.com"}));
}
