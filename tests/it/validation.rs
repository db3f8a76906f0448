//! Every input rule: INVALID_ARGUMENT naming the field, and nothing sent to ACS.

use crate::common;

use ccpa_gateway::proto::ccpa_v1::{
    CreateProfileRequest, GetOptOutRequest, RequestSource, SetOptOutRequest,
};
use common::gateway;
use tonic::{Code, Status};
use tonic_types::StatusExt;

/// Asserts INVALID_ARGUMENT whose `BadRequest` names exactly `fields`, with the reason given.
fn assert_refused(result: Result<impl std::fmt::Debug, Status>, fields: &[(&str, &str)]) {
    let status = result.expect_err("the request should be refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let bad_request = status
        .get_details_bad_request()
        .expect("a google.rpc.BadRequest detail");
    let named: Vec<(&str, &str)> = bad_request
        .field_violations
        .iter()
        .map(|v| (v.field.as_str(), v.reason.as_str()))
        .collect();
    assert_eq!(named, fields, "{status:?}");
    for (field, _) in fields {
        assert!(status.message().contains(field), "{}", status.message());
    }
    let info = status
        .get_details_error_info()
        .expect("an ErrorInfo detail");
    assert_eq!(info.reason, "INVALID_REQUEST");
}

const REQUIRED: &str = "FIELD_REQUIRED";
const TOO_LONG: &str = "FIELD_TOO_LONG";
const MALFORMED: &str = "FIELD_MALFORMED";

fn bad_pkeys() -> Vec<(String, &'static str)> {
    vec![
        (String::new(), REQUIRED),
        ("no-at-sign".into(), MALFORMED),
        ("@".into(), MALFORMED),
        ("@abc/def".into(), MALFORMED),
        ("@abc?x=1".into(), MALFORMED),
        ("@abc#frag".into(), MALFORMED),
        ("@abc%2Fdef".into(), MALFORMED),
        ("@abc def".into(), MALFORMED),
        ("@abc\ndef".into(), MALFORMED),
        ("@abc\u{7f}".into(), MALFORMED),
        ("@..".into(), MALFORMED),
        (format!("@{}", "a".repeat(512)), TOO_LONG),
    ]
}

#[tokio::test]
async fn get_opt_out_refuses_malformed_keys_before_calling_acs() {
    let harness = gateway().start().await;
    let mut client = harness.client();
    for (pkey, reason) in bad_pkeys() {
        assert_refused(
            client
                .get_opt_out(GetOptOutRequest {
                    pkey,
                    ..Default::default()
                })
                .await,
            &[("pkey", reason)],
        );
    }
    assert_eq!(harness.emulator().request_count(), 0);
}

#[tokio::test]
async fn set_opt_out_refuses_malformed_keys_before_calling_acs() {
    let harness = gateway().start().await;
    let mut client = harness.client();
    for (pkey, reason) in bad_pkeys() {
        assert_refused(
            client
                .set_opt_out(SetOptOutRequest {
                    pkey,
                    ccpa_opt_out: Some(true),
                    source: RequestSource::WebForm as i32,
                    ..Default::default()
                })
                .await,
            &[("pkey", reason)],
        );
    }
    assert_eq!(harness.emulator().request_count(), 0);
}

#[tokio::test]
async fn set_opt_out_without_a_value_is_refused_never_read_as_false() {
    let harness = gateway().start().await;
    let pkey = harness.profile(true);
    assert_refused(
        harness
            .client()
            .set_opt_out(SetOptOutRequest {
                pkey: pkey.clone(),
                ccpa_opt_out: None,
                source: RequestSource::WebForm as i32,
                ..Default::default()
            })
            .await,
        &[("ccpa_opt_out", REQUIRED)],
    );
    assert_eq!(harness.emulator().request_count(), 0);
    assert_eq!(
        harness.emulator().profile(&pkey).unwrap()["ccpaOptOut"],
        true
    );
}

#[tokio::test]
async fn every_bad_field_is_named_at_once() {
    let harness = gateway().start().await;
    assert_refused(
        harness
            .client()
            .set_opt_out(SetOptOutRequest {
                pkey: "bad".into(),
                ccpa_opt_out: None,
                source: RequestSource::WebForm as i32,
                ..Default::default()
            })
            .await,
        &[("pkey", MALFORMED), ("ccpa_opt_out", REQUIRED)],
    );
    assert_eq!(harness.emulator().request_count(), 0);
}

fn creation(email: &str) -> CreateProfileRequest {
    CreateProfileRequest {
        email: email.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn create_profile_refuses_bad_input_before_calling_acs() {
    let harness = gateway().start().await;
    let mut client = harness.client();
    let long_local_part = format!("{}@example.com", "a".repeat(250));
    let cases: Vec<(CreateProfileRequest, Vec<(&str, &str)>)> = vec![
        (creation(""), vec![("email", REQUIRED)]),
        (creation("not-an-address"), vec![("email", MALFORMED)]),
        (creation("two@@example.com"), vec![("email", MALFORMED)]),
        (creation("space in@example.com"), vec![("email", MALFORMED)]),
        (
            creation("line\nbreak@example.com"),
            vec![("email", MALFORMED)],
        ),
        (creation(&long_local_part), vec![("email", TOO_LONG)]),
        (
            CreateProfileRequest {
                first_name: "x".repeat(129),
                ..creation("a@example.com")
            },
            vec![("first_name", TOO_LONG)],
        ),
        (
            CreateProfileRequest {
                last_name: "é".repeat(129),
                ..creation("a@example.com")
            },
            vec![("last_name", TOO_LONG)],
        ),
        (
            CreateProfileRequest {
                first_name: "Ada\u{0}".into(),
                last_name: "Love\rlace".into(),
                ..creation("a@example.com")
            },
            vec![("first_name", MALFORMED), ("last_name", MALFORMED)],
        ),
        (
            CreateProfileRequest {
                first_name: "x".repeat(200),
                ..creation("")
            },
            vec![("email", REQUIRED), ("first_name", TOO_LONG)],
        ),
    ];
    for (request, fields) in cases {
        assert_refused(client.create_profile(request).await, &fields);
    }
    assert_eq!(harness.emulator().request_count(), 0);
    assert_eq!(harness.emulator().profile_count(), 0);
}

/// A 254-byte address: local parts stop at 64 bytes and domain labels at 63, so the length is in
/// the domain.
fn longest_valid_email() -> String {
    let email = format!(
        "a@{}.{}.{}.{}.com",
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(63),
        "e".repeat(56)
    );
    assert_eq!(email.len(), 254);
    email
}

#[tokio::test]
async fn limits_are_inclusive() {
    let harness = gateway().start().await;
    let mut client = harness.client();
    let created = client
        .create_profile(CreateProfileRequest {
            email: longest_valid_email(),
            first_name: "é".repeat(128),
            last_name: "x".repeat(128),
            ..Default::default()
        })
        .await;
    assert!(created.is_ok(), "{created:?}");

    // A 512-byte key passes validation and reaches ACS, which does not know it.
    let status = client
        .get_opt_out(GetOptOutRequest {
            pkey: format!("@{}", "a".repeat(511)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test]
async fn refusals_never_quote_the_input() {
    let harness = gateway().start().await;
    let status = harness
        .client()
        .create_profile(creation("canary-person at example.com"))
        .await
        .unwrap_err();
    let bad_request = status.get_details_bad_request().unwrap();
    assert!(!status.message().contains("canary"));
    for violation in bad_request.field_violations {
        assert!(!violation.description.contains("canary"));
    }
}

#[tokio::test]
async fn get_opt_out_takes_exactly_one_of_pkey_and_email() {
    let harness = gateway().start().await;
    let pkey = harness.profile(true);
    let mut client = harness.client();
    assert_refused(
        client.get_opt_out(GetOptOutRequest::default()).await,
        &[("pkey", REQUIRED)],
    );
    assert_refused(
        client
            .get_opt_out(GetOptOutRequest {
                pkey,
                email: "ada@example.com".into(),
            })
            .await,
        &[("email", MALFORMED)],
    );
    assert_refused(
        client
            .get_opt_out(GetOptOutRequest {
                email: "not-an-address".into(),
                ..Default::default()
            })
            .await,
        &[("email", MALFORMED)],
    );
    assert_eq!(harness.emulator().request_count(), 0);
}

/// `:` joins a request by email's id to its profiles' records (`<id>:1`, ...): a caller's id of
/// that form could collide with one of them.
#[tokio::test]
async fn request_ids_with_the_reserved_separator_are_refused() {
    let harness = gateway().start().await;
    let pkey = harness.profile(false);
    let mut client = harness.client();
    assert_refused(
        client
            .set_opt_out(SetOptOutRequest {
                pkey: pkey.clone(),
                ccpa_opt_out: Some(true),
                source: RequestSource::WebForm as i32,
                request_id: "order:1".into(),
                ..Default::default()
            })
            .await,
        &[("request_id", MALFORMED)],
    );
    assert_refused(
        client
            .create_profile(CreateProfileRequest {
                ccpa_opt_out: Some(true),
                source: RequestSource::WebForm as i32,
                request_id: "signup:7".into(),
                ..creation("ada@example.com")
            })
            .await,
        &[("request_id", MALFORMED)],
    );
    assert_eq!(harness.emulator().request_count(), 0);
    assert_eq!(
        harness.emulator().profile(&pkey).unwrap()["ccpaOptOut"],
        false
    );
}

/// A Global Privacy Control signal only ever says "do not sell"; an opt-in must be the
/// consumer's explicit choice, made another way.
#[tokio::test]
async fn a_global_privacy_control_signal_cannot_opt_in() {
    let harness = gateway().start().await;
    let pkey = harness.profile(true);
    let mut client = harness.client();
    assert_refused(
        client
            .set_opt_out(SetOptOutRequest {
                pkey: pkey.clone(),
                ccpa_opt_out: Some(false),
                source: RequestSource::GlobalPrivacyControl as i32,
                ..Default::default()
            })
            .await,
        &[("source", MALFORMED)],
    );
    assert_refused(
        client
            .create_profile(CreateProfileRequest {
                ccpa_opt_out: Some(false),
                source: RequestSource::GlobalPrivacyControl as i32,
                ..creation("ada@example.com")
            })
            .await,
        &[("source", MALFORMED)],
    );
    assert_eq!(harness.emulator().request_count(), 0);
    assert_eq!(
        harness.emulator().profile(&pkey).unwrap()["ccpaOptOut"],
        true
    );

    // The same signal opting out is taken.
    let answer = client
        .set_opt_out(SetOptOutRequest {
            pkey: pkey.clone(),
            ccpa_opt_out: Some(true),
            source: RequestSource::GlobalPrivacyControl as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(answer.ccpa_opt_out);
}
