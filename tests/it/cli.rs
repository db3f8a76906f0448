//! The `ccpa-gateway` binary: the terminal commands against a running gateway, and `serve` as a
//! process (settings, SIGTERM, logs).

use crate::common;

// The gateway client's example (`examples/gateway_client.rs`), whose `opt_out` the test of
// `serve --emulator`'s printed commands runs; its `main` is the example's alone.
#[allow(dead_code)]
#[path = "../../examples/gateway_client.rs"]
mod gateway_client_example;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use acs_emulator::{Emulator, EmulatorConfig, Fault};
use ccpa_gateway::proto::ccpa_v1::ccpa_service_client::CcpaServiceClient;
use ccpa_gateway::proto::ccpa_v1::{
    BulkSetOptOutRequest, CreateProfileRequest, GetOptOutRequest, RequestSource, SetOptOutRequest,
};
use common::cli::{self, Outcome};
use common::gateway;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Runs a terminal command against the gateway at `addr`.
async fn run(addr: SocketAddr, args: &[&str]) -> Outcome {
    cli::run(
        cli::ccpa_gateway()
            .args(args)
            .arg("--addr")
            .arg(format!("http://{addr}")),
    )
    .await
}

#[tokio::test]
async fn get_set_and_create_print_json() {
    let harness = gateway().start().await;
    let pkey = harness.profile(false);

    // GetOptOutResponse in the proto3 JSON mapping, as `grpcurl -emit-defaults` prints it:
    // every field, at its default value too; an unset message field (no instant, no request yet)
    // left out. One profile read, for a key.
    let got = run(harness.addr, &["get-opt-out", &pkey]).await;
    assert_eq!(got.code, 0, "{}", got.stderr);
    let profile = json!({
        "pkey": pkey,
        "ccpaOptOut": false,
        "changePending": false,
        "driftDetected": false,
    });
    assert_eq!(
        got.json(),
        json!({
            "pkey": pkey,
            "ccpaOptOut": false,
            "changePending": false,
            "profiles": [profile],
            "driftDetected": false,
        })
    );

    let set = run(
        harness.addr,
        &[
            "set-opt-out",
            &pkey,
            "--opt-out",
            "true",
            "--source",
            "web-form",
        ],
    )
    .await;
    assert_eq!(set.code, 0, "{}", set.stderr);
    let json = set.json();
    assert_eq!(json["pkey"], pkey.as_str(), "{json}");
    assert_eq!(json["ccpaOptOut"], true, "{json}");
    assert_eq!(json["state"], "DELIVERY_STATE_APPLIED", "{json}");
    assert!(
        json["requestId"].as_str().is_some_and(|id| !id.is_empty()),
        "{json}"
    );
    let profiles = json["profiles"].as_array().unwrap();
    assert_eq!(profiles.len(), 1, "{json}");
    assert_eq!(profiles[0]["pkey"], pkey.as_str(), "{json}");
    assert_eq!(profiles[0]["state"], "DELIVERY_STATE_APPLIED", "{json}");
    // RFC 3339 in UTC, with `Z`, as the mapping writes instants.
    let changed = json["ccpaOptOutLastModified"].as_str().unwrap();
    assert!(
        chrono::DateTime::parse_from_rfc3339(changed).is_ok() && changed.ends_with('Z'),
        "{changed}"
    );
    assert_eq!(
        harness.emulator().profile(&pkey).unwrap()["ccpaOptOut"],
        true
    );

    let created = run(
        harness.addr,
        &[
            "create-profile",
            "--email",
            "grace@example.com",
            "--first-name",
            "Grace",
            "--last-name",
            "Hopper",
            "--opt-out",
            "--source",
            "email",
        ],
    )
    .await;
    assert_eq!(created.code, 0, "{}", created.stderr);
    // CreateProfileResponse: the profile, and the request that recorded its opt-out.
    let json = created.json();
    let profile = &json["profile"];
    assert_eq!(profile["email"], "grace@example.com", "{json}");
    assert_eq!(profile["firstName"], "Grace", "{json}");
    assert_eq!(profile["lastName"], "Hopper", "{json}");
    assert_eq!(profile["ccpaOptOut"], true, "{json}");
    assert!(
        json["requestId"].as_str().is_some_and(|id| !id.is_empty()),
        "{json}"
    );
    let new_key = profile["pkey"].as_str().unwrap();
    assert_eq!(
        harness.emulator().profile(new_key).unwrap()["lastName"],
        "Hopper"
    );
}

#[tokio::test]
async fn get_and_set_by_email_answer_every_profile() {
    let harness = gateway().start().await;
    let first = harness.profile(false);
    let second = harness.profile(true);

    let got = run(harness.addr, &["get-opt-out", "--email", "ADA@example.com"]).await;
    assert_eq!(got.code, 0, "{}", got.stderr);
    let json = got.json();
    assert_eq!(json["ccpaOptOut"], true, "one is opted out: {json}");
    let mut keys: Vec<&str> = json["profiles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["pkey"].as_str().unwrap())
        .collect();
    keys.sort_unstable();
    let mut expected = [first.as_str(), second.as_str()];
    expected.sort_unstable();
    assert_eq!(keys, expected);
    assert!(!got.stdout.contains("ada@"), "the address is not echoed");
    for profile in json["profiles"].as_array().unwrap() {
        assert!(profile["ccpaOptOut"].is_boolean(), "{json}");
        assert_eq!(profile["changePending"], false, "{json}");
        assert_eq!(profile["driftDetected"], false, "{json}");
    }

    let set = run(
        harness.addr,
        &[
            "set-opt-out",
            "--email",
            "ada@example.com",
            "--opt-out",
            "true",
            "--source",
            "email",
            "--request-id",
            "cli-email-1",
        ],
    )
    .await;
    assert_eq!(set.code, 0, "{}", set.stderr);
    let json = set.json();
    assert_eq!(json["requestId"], "cli-email-1");
    assert_eq!(json["profiles"].as_array().unwrap().len(), 2, "{json}");
    for profile in json["profiles"].as_array().unwrap() {
        assert_eq!(profile["state"], "DELIVERY_STATE_APPLIED", "{json}");
        assert_eq!(profile["ccpaOptOut"], true, "{json}");
        assert_eq!(profile["created"], false, "{json}");
    }
    for pkey in [&first, &second] {
        assert_eq!(
            harness.emulator().profile(pkey).unwrap()["ccpaOptOut"],
            true
        );
    }

    let unknown = run(
        harness.addr,
        &[
            "set-opt-out",
            "--email",
            "new@example.com",
            "--opt-out",
            "true",
            "--source",
            "email",
            "--create-if-missing",
        ],
    )
    .await;
    assert_eq!(unknown.code, 0, "{}", unknown.stderr);
    assert_eq!(unknown.json()["profiles"][0]["created"], true);

    for args in [
        &["get-opt-out"][..],
        &["get-opt-out", &first, "--email", "ada@example.com"][..],
        &[
            "set-opt-out",
            &first,
            "--opt-out",
            "true",
            "--source",
            "email",
            "--create-if-missing",
        ][..],
    ] {
        let refused = run(harness.addr, args).await;
        assert_eq!(refused.code, 2, "{args:?}: {}", refused.stderr);
    }
}

#[tokio::test]
async fn create_profile_without_opt_out_leaves_acs_default() {
    let harness = gateway().start().await;
    let created = run(
        harness.addr,
        &["create-profile", "--email", "alan@example.com"],
    )
    .await;
    assert_eq!(created.code, 0, "{}", created.stderr);
    let json = created.json();
    assert_eq!(json["profile"]["ccpaOptOut"], false, "{json}");
    assert_eq!(json["requestId"], "", "no opt-out, so no request: {json}");
    let post = harness.emulator().requests().pop().unwrap();
    assert_eq!(&post.body[..], br#"{"email":"alan@example.com"}"#);
}

#[tokio::test]
async fn exit_codes_tell_outcomes_apart() {
    let harness = gateway().start().await;
    let pkey = harness.profile(false);
    harness.emulator().remove_profile(&pkey);

    let not_found = run(harness.addr, &["get-opt-out", &pkey]).await;
    assert_eq!(not_found.code, 3, "{}", not_found.stderr);
    assert!(
        not_found.stderr.contains("NotFound"),
        "{}",
        not_found.stderr
    );
    assert!(not_found.stdout.is_empty());

    let invalid = run(
        harness.addr,
        &[
            "set-opt-out",
            "@bad/key",
            "--opt-out",
            "false",
            "--source",
            "phone",
        ],
    )
    .await;
    assert_eq!(invalid.code, 4, "{}", invalid.stderr);
    assert!(invalid.stderr.contains("pkey:"), "{}", invalid.stderr);

    let invalid_email = run(harness.addr, &["create-profile", "--email", "nope"]).await;
    assert_eq!(invalid_email.code, 4, "{}", invalid_email.stderr);
    assert!(invalid_email.stderr.contains("email:"));

    // Every attempt fails: the gateway retries a read up to its attempt limit (4), and the
    // command (through the library client) retries the gateway's UNAVAILABLE up to its own (4).
    for _ in 0..16 {
        harness.emulator().inject(Fault::html(503));
    }
    let upstream_down = run(harness.addr, &["get-opt-out", "@abc"]).await;
    assert_eq!(upstream_down.code, 5, "{}", upstream_down.stderr);

    let missing_value = run(harness.addr, &["set-opt-out", "@abc", "--source", "phone"]).await;
    assert_eq!(missing_value.code, 2, "clap's usage error");

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = listener.local_addr().unwrap();
    drop(listener);
    let gateway_down = run(closed, &["get-opt-out", "@abc"]).await;
    assert_eq!(gateway_down.code, 5, "{}", gateway_down.stderr);
}

#[tokio::test]
async fn the_help_lists_every_exit_code() {
    let help = cli::run(cli::ccpa_gateway().arg("--help")).await;
    assert_eq!(help.code, 0, "{}", help.stderr);
    for (code, meaning) in ccpa_gateway::cli::exit_codes::MEANINGS {
        assert!(
            help.stdout.contains(&format!("  {code}  {meaning}\n")),
            "{}",
            help.stdout
        );
    }
}

#[tokio::test]
async fn a_bulk_file_for_a_gateway_that_is_down_is_resumed_then_reported_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("opt-outs.csv");
    std::fs::write(&file, "pkey,opt_out,source\n@abc,true,gpc\n").unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = listener.local_addr().unwrap();
    drop(listener);

    let output = cli::ccpa_gateway()
        .args(["bulk-set-opt-out", "--retries", "1", "--file"])
        .arg(&file)
        .args(["--addr", &format!("http://{closed}")])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(5), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot reach the gateway at http://{closed}")),
        "{stderr}"
    );
    assert!(stderr.contains("resuming (1/1)"), "{stderr}");
    assert!(stderr.contains("1 not answered"), "the summary: {stderr}");
}

fn acs_env(emulator: &Emulator) -> Vec<(&'static str, String)> {
    let config = emulator.config();
    vec![
        ("CCPA_ACS_BASE_URL", emulator.url()),
        ("CCPA_ACS_TENANT", config.tenant.clone()),
        ("CCPA_ACS_API_KEY", config.api_key.clone()),
        ("CCPA_ACS_ACCESS_TOKEN", config.access_token.clone()),
    ]
}

fn as_refs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

#[tokio::test]
async fn sigterm_reports_not_serving_drains_and_exits_zero() {
    let emulator = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let pkey = emulator.insert_profile(acs_emulator::NewProfile {
        ccpa_opt_out: true,
        ..Default::default()
    });
    let mut gateway = common::gateway()
        .log_filter("debug")
        .spawn(Some(&emulator))
        .await;
    let channel = common::connect(gateway.addr).await;

    let mut health = HealthClient::new(channel.clone());
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "ccpa.v1.CcpaService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.next().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );

    emulator.inject(Fault::Delay(Duration::from_millis(700)));
    let mut client = CcpaServiceClient::new(channel);
    let in_flight = tokio::spawn(async move {
        client
            .get_opt_out(GetOptOutRequest {
                pkey,
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().ccpa_opt_out)
    });
    while emulator.request_count() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    gateway.sigterm();
    assert_eq!(
        watch.next().await.unwrap().unwrap().status,
        ServingStatus::NotServing as i32
    );
    assert!(
        in_flight
            .await
            .unwrap()
            .expect("the call in flight completes")
    );
    assert_eq!(gateway.wait().await, 0, "{}", gateway.log());

    let log = gateway.log();
    let not_serving = log.find("reporting NOT_SERVING").expect("logged");
    let draining = log.find("draining calls in flight").expect("logged");
    assert!(not_serving < draining);
}

#[tokio::test]
async fn logs_carry_no_personal_data_or_secrets() {
    let emulator = Emulator::start(EmulatorConfig {
        api_key: "api-key-canary-7c1f".into(),
        access_token: "token-canary-93ab".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut gateway = common::gateway()
        .log_filter("debug")
        .spawn(Some(&emulator))
        .await;
    let mut client = CcpaServiceClient::new(common::connect(gateway.addr).await);

    let created = client
        .create_profile(CreateProfileRequest {
            email: "email-canary@example.com".into(),
            first_name: "Firstcanary".into(),
            last_name: "Lastcanary".into(),
            ccpa_opt_out: Some(true),
            source: RequestSource::WebForm as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .profile
        .unwrap();
    client
        .get_opt_out(GetOptOutRequest {
            pkey: created.pkey.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    // Failures too: an upstream body quoting the person, and a refused input.
    emulator.inject(Fault::Respond {
        status: 500,
        content_type: Some("application/json".into()),
        body: r#"{"code":500,"message":"email-canary@example.com is broken"}"#.into(),
        headers: vec![],
    });
    // (Answered true all the same: the profile's latest request is an applied opt-out.)
    let _ = client
        .get_opt_out(GetOptOutRequest {
            pkey: created.pkey.clone(),
            ..Default::default()
        })
        .await;
    let _ = client
        .create_profile(CreateProfileRequest {
            email: "bad-canary-address".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    // By email (found, then a failed lookup) and in bulk (a good item and a refused one).
    client
        .set_opt_out(SetOptOutRequest {
            email: "EMAIL-canary@example.com".into(),
            ccpa_opt_out: Some(true),
            source: RequestSource::Email as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    emulator.inject(Fault::Respond {
        status: 400,
        content_type: Some("application/json".into()),
        body: r#"{"code":400,"message":"email-canary@example.com: no"}"#.into(),
        headers: vec![],
    });
    let _ = client
        .get_opt_out(GetOptOutRequest {
            email: "email-canary@example.com".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let items = [
        SetOptOutRequest {
            email: "email-canary@example.com".into(),
            ccpa_opt_out: Some(true),
            source: RequestSource::GlobalPrivacyControl as i32,
            ..Default::default()
        },
        SetOptOutRequest {
            email: "bulk-canary-not-an-address".into(),
            ccpa_opt_out: Some(true),
            source: RequestSource::GlobalPrivacyControl as i32,
            ..Default::default()
        },
    ]
    .map(|item| BulkSetOptOutRequest {
        item: Some(item),
        record_only: false,
    });
    let answers = common::bulk(&mut client, items.into()).await;
    assert_eq!(answers.len(), 2);
    let refused = answers.iter().find(|a| a.error.is_some()).unwrap();
    assert!(
        !refused.error.as_ref().unwrap().message.contains("canary"),
        "{refused:?}"
    );
    emulator.revoke_access_token("token-canary-93ab");
    // (Answered true all the same: the profile's latest request is an applied opt-out.)
    let _ = client
        .get_opt_out(GetOptOutRequest {
            pkey: created.pkey.clone(),
            ..Default::default()
        })
        .await;

    gateway.sigterm();
    assert_eq!(gateway.wait().await, 0);
    let log = gateway.log();
    assert!(
        log.contains(r#""rpc":"CreateProfile""#),
        "one line per RPC: {log}"
    );
    assert!(log.contains(r#""code":"Internal""#), "{log}");
    let bulk_line = log
        .lines()
        .find(|line| line.contains(r#""rpc":"BulkSetOptOut""#))
        .unwrap_or_else(|| panic!("a line for the stream: {log}"));
    assert!(bulk_line.contains(r#""code":"Ok""#), "{bulk_line}");
    // Nor does the ledger keep an address, a name or a body (its files, WAL included).
    let mut files = 0;
    for file in std::fs::read_dir(gateway.ledger_dir()).unwrap() {
        let path = file.unwrap().path();
        files += 1;
        let bytes = std::fs::read(&path).unwrap();
        assert!(
            !bytes.windows(6).any(|w| w.eq_ignore_ascii_case(b"canary")),
            "{} holds personal data",
            path.display()
        );
    }
    assert!(files > 0, "the ledger was written");
    for secret in [
        "canary",
        "token-canary-93ab",
        "api-key-canary-7c1f",
        created.pkey.as_str(),
    ] {
        assert!(
            !log.contains(secret),
            "{secret:?} appears in the log:\n{log}"
        );
    }
}

#[tokio::test]
async fn with_oauth_logs_carry_no_secret_and_no_token() {
    let emulator = Emulator::start(EmulatorConfig {
        api_key: "client-id-canary-2b7e".into(),
        ims_client_id: "client-id-canary-2b7e".into(),
        ims_client_secret: "client-secret-canary-51d2".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let pkey = emulator.insert_profile(acs_emulator::NewProfile::default());
    let mut gateway = common::gateway()
        .env("CCPA_ACS_BASE_URL", &emulator.url())
        .env("CCPA_ACS_TENANT", &emulator.config().tenant)
        .env("CCPA_IMS_URL", &emulator.url())
        .env("CCPA_IMS_CLIENT_ID", "client-id-canary-2b7e")
        .env("CCPA_IMS_CLIENT_SECRET", "client-secret-canary-51d2")
        .log_filter("debug")
        .spawn(None)
        .await;
    let mut client = CcpaServiceClient::new(common::connect(gateway.addr).await);
    client
        .get_opt_out(GetOptOutRequest {
            pkey: pkey.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    // The token expires and IMS refuses the secret: the failure path logs too.
    emulator.set_ims_client_secret("rotated");
    emulator.expire_access_tokens();
    let mut request = tonic::Request::new(GetOptOutRequest {
        pkey,
        ..Default::default()
    });
    request.set_timeout(Duration::from_secs(2));
    let _ = client.get_opt_out(request).await.unwrap_err();

    gateway.sigterm();
    assert_eq!(gateway.wait().await, 0);
    let log = gateway.log();
    assert!(log.contains("obtained an IMS access token"), "{log}");
    assert!(log.contains("IMS token request failed"), "{log}");
    for secret in ["canary", "ims-"] {
        assert!(
            !log.contains(secret),
            "{secret:?} appears in the log:\n{log}"
        );
    }
}

#[tokio::test]
async fn emulator_command_injects_the_faults_it_is_told() {
    let mut child = cli::ccpa_gateway()
        .args([
            "emulator",
            "--listen",
            "127.0.0.1:0",
            "--seed-demo",
            "--fail-503",
            "1",
            "--latency",
            "100ms",
            "--ims-client-secret",
            "flag-secret",
            "--token-lifetime",
            "42s",
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = stdout.next_line().await.unwrap().unwrap();
    let url = first
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .expect("the emulator prints its URL")
        .to_owned();
    let http = reqwest::Client::new();

    let token: Value = http
        .post(format!("{url}/ims/token/v3"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", EmulatorConfig::DEFAULT_IMS_CLIENT_ID),
            ("client_secret", "flag-secret"),
            ("scope", "openid"),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(token["expires_in"], 42);

    let started = std::time::Instant::now();
    let response = http
        .get(format!(
            "{url}/{}/campaign/profileAndServices/profile/@any",
            EmulatorConfig::DEFAULT_TENANT
        ))
        .bearer_auth(token["access_token"].as_str().unwrap())
        .header("X-Api-Key", EmulatorConfig::DEFAULT_API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 503);
    assert!(started.elapsed() >= Duration::from_millis(100));
    child.kill().await.unwrap();
}

#[tokio::test]
async fn missing_or_bad_settings_stop_start_up_naming_them() {
    let cases: [(&[&str], &[&str]); 6] = [
        (
            &["serve", "--acs-api-key", "k", "--acs-access-token", "t"],
            &["CCPA_ACS_TENANT"],
        ),
        (
            &["serve", "--acs-tenant", "acme", "--acs-access-token", "t"],
            &["CCPA_ACS_API_KEY"],
        ),
        (
            &["serve", "--acs-tenant", "acme", "--acs-api-key", "k"],
            &["CCPA_IMS_CLIENT_ID", "CCPA_ACS_ACCESS_TOKEN"],
        ),
        (
            &[
                "serve",
                "--acs-tenant",
                "acme",
                "--acs-api-key",
                "k",
                "--acs-access-token",
                "t",
                "--acs-base-url",
                "nope",
            ],
            &["CCPA_ACS_BASE_URL"],
        ),
        (
            &[
                "serve",
                "--acs-tenant",
                "acme",
                "--acs-access-token",
                "t",
                "--ims-client-id",
                "id",
                "--ims-client-secret",
                "s",
            ],
            &["CCPA_ACS_ACCESS_TOKEN", "CCPA_IMS_CLIENT_ID"],
        ),
        (
            &[
                "serve",
                "--acs-tenant",
                "acme",
                "--acs-api-key",
                "k",
                "--acs-access-token",
                "t",
                "--emulator-large-table",
            ],
            &["--emulator-large-table", "CCPA_EMULATOR_LARGE_TABLE"],
        ),
    ];
    for (args, named) in cases {
        let output = cli::ccpa_gateway()
            .args(args)
            .env_remove("CCPA_ACS_TENANT")
            .env_remove("CCPA_ACS_API_KEY")
            .env_remove("CCPA_ACS_ACCESS_TOKEN")
            .env_remove("CCPA_IMS_CLIENT_ID")
            .env_remove("CCPA_IMS_CLIENT_SECRET")
            .env_remove("CCPA_EMULATOR_LARGE_TABLE")
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        for name in named {
            assert!(stderr.contains(name), "{args:?}: {stderr}");
        }
    }

    let output = cli::ccpa_gateway()
        .args(["serve", "--listen", "not-an-address"])
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--listen"));

    let output = cli::ccpa_gateway()
        .args(["serve", "--emulator", "--acs-tenant", "acme"])
        .output()
        .await
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(2),
        "--emulator excludes ACS settings"
    );

    let output = cli::ccpa_gateway()
        .args(["serve", "--emulator", "--listen", "127.0.0.1:0"])
        .args(["--listen-addr-file", "/nonexistent-directory/addr"])
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--listen-addr-file"));
}

/// Runs the binary with `args` in `dir`, with no ledger named in the environment.
async fn run_in(dir: &std::path::Path, args: &[&str], envs: &[(&str, &str)]) -> Outcome {
    cli::run(
        cli::ccpa_gateway()
            .args(args)
            .current_dir(dir)
            .env_remove("CCPA_LEDGER")
            .envs(envs.iter().copied()),
    )
    .await
}

#[tokio::test]
async fn serve_requires_a_ledger_outside_the_emulator_and_creates_none_by_itself() {
    let emulator = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let env = acs_env(&emulator);
    let dir = tempfile::tempdir().unwrap();
    let outcome = run_in(
        dir.path(),
        &["serve", "--listen", "127.0.0.1:0"],
        &as_refs(&env),
    )
    .await;
    assert_eq!(outcome.code, 2, "{}", outcome.stderr);
    assert!(
        outcome.stderr.contains("--ledger (CCPA_LEDGER)") && outcome.stderr.contains("required"),
        "{}",
        outcome.stderr
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing is created in the working directory"
    );

    // A ledger in memory would answer "recorded" for requests that vanish at restart: only the
    // emulator's demo may have one.
    for in_memory in [
        "sqlite::memory:",
        ":memory:",
        "file::memory:?cache=shared",
        "ledger.db?mode=memory",
    ] {
        let outcome = run_in(
            dir.path(),
            &["serve", "--listen", "127.0.0.1:0", "--ledger", in_memory],
            &as_refs(&env),
        )
        .await;
        assert_eq!(outcome.code, 2, "{in_memory}: {}", outcome.stderr);
        assert!(
            outcome.stderr.contains("--ledger (CCPA_LEDGER)")
                && outcome.stderr.contains("in memory"),
            "{in_memory}: {}",
            outcome.stderr
        );
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn records_opens_an_existing_ledger_only_with_ledger_before_or_after_its_subcommand() {
    let emulator = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let pkey = emulator.insert_profile(acs_emulator::NewProfile::default());
    let mut gateway = common::gateway()
        .log_filter("debug")
        .spawn(Some(&emulator))
        .await;
    let set = run(
        gateway.addr,
        &[
            "set-opt-out",
            &pkey,
            "--opt-out",
            "true",
            "--source",
            "web-form",
        ],
    )
    .await;
    assert_eq!(set.code, 0, "{}", set.stderr);

    // The ledger and the files SQLite and the gateway keep beside it: the owner's only.
    let ledger = gateway.ledger_dir().join("ledger.sqlite3");
    let ledger = ledger.to_str().unwrap().to_owned();
    for suffix in ["", "-wal", "-shm", ".lock"] {
        use std::os::unix::fs::PermissionsExt;
        let path = format!("{ledger}{suffix}");
        let mode = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{path}: {e}"))
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{path}: {mode:o}");
    }

    let dir = tempfile::tempdir().unwrap();
    let since = "2000-01-01T00:00:00Z";
    for args in [
        vec!["records", "--ledger", &ledger, "export", "--since", since],
        vec!["records", "export", "--ledger", &ledger, "--since", since],
        vec!["records", "export", "--since", since, "--ledger", &ledger],
    ] {
        let outcome = run_in(dir.path(), &args, &[]).await;
        assert_eq!(outcome.code, 0, "{args:?}: {}", outcome.stderr);
        assert_eq!(outcome.stdout.lines().count(), 1, "{args:?}");
    }
    let outcome = run_in(
        dir.path(),
        &["records", "--overdue"],
        &[("CCPA_LEDGER", &ledger)],
    )
    .await;
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);

    // A mistyped path, no path, or a file that holds no ledger: an error naming the setting,
    // never an empty ledger with nothing overdue; and nothing is created.
    let typo = dir.path().join("ledgr.sqlite3");
    let typo = typo.to_str().unwrap();
    let not_a_ledger = dir.path().join("notes.sqlite3");
    std::fs::write(&not_a_ledger, b"").unwrap();
    let not_a_ledger = not_a_ledger.to_str().unwrap();
    for args in [
        vec!["records", "--overdue", "--ledger", typo],
        vec!["records", "export", "--since", since, "--ledger", typo],
        vec!["records", "prune", "--ledger", typo],
        vec!["records", "--overdue"],
        vec!["records", "--overdue", "--ledger", not_a_ledger],
    ] {
        let outcome = run_in(dir.path(), &args, &[]).await;
        assert_eq!(outcome.code, 2, "{args:?}: {}", outcome.stderr);
        assert!(
            outcome.stderr.contains("--ledger (CCPA_LEDGER)"),
            "{args:?}: {}",
            outcome.stderr
        );
        assert!(outcome.stdout.is_empty(), "{args:?}: {}", outcome.stdout);
    }
    assert!(!std::path::Path::new(typo).exists(), "no ledger is created");

    gateway.sigterm();
    assert_eq!(gateway.wait().await, 0);
}

/// Splits a command line as a POSIX shell would, for the quoting the printed commands use
/// (single quotes); anything else a shell would treat specially fails the test, since the test
/// could not say what pasting it does.
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                word.get_or_insert_default();
            }
            c if c.is_whitespace() && !quoted => words.extend(word.take()),
            '"' | '\\' | '$' | '`' | '|' | ';' | '&' | '<' | '>' | '#' | '*' | '?' if !quoted => {
                panic!("{c:?} outside single quotes in {line:?}")
            }
            c => word.get_or_insert_default().push(c),
        }
    }
    assert!(!quoted, "an unbalanced quote in {line:?}");
    words.extend(word);
    words
}

/// Runs a printed `ccpa-gateway` command as it stands (its own `--addr`, nothing added).
async fn run_as_printed(args: &[String]) -> Outcome {
    cli::run(cli::ccpa_gateway().args(args).env_remove("CCPA_ADDR")).await
}

/// What a printed `grpcurl` command does, made over gRPC by the test: grpcurl is not something
/// the tests can count on, but the call it names (address, method, JSON body) can be checked.
async fn call_as_grpcurl_would(gateway: SocketAddr, line: &str, args: &[String]) {
    let mut plaintext = false;
    let mut body = None;
    let mut positional = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-plaintext" => plaintext = true,
            "-d" => {
                let json = args.next().expect("-d takes a body");
                body = Some(serde_json::from_str::<Value>(json).unwrap());
            }
            flag if flag.starts_with('-') => {
                panic!("{flag}: a grpcurl flag the test does not know")
            }
            _ => positional.push(arg.as_str()),
        }
    }
    assert!(plaintext, "the gateway serves plaintext: {line}");
    let [addr, method] = positional[..] else {
        panic!("grpcurl ADDRESS METHOD: {line}");
    };
    assert_eq!(addr.parse::<SocketAddr>().unwrap(), gateway, "{line}");
    let body = body.unwrap_or_else(|| serde_json::json!({}));
    let fields: Vec<&String> = body.as_object().expect("a JSON object").keys().collect();
    let text = |name: &str| body[name].as_str().unwrap_or_default().to_owned();
    let channel = common::connect(gateway).await;
    match method {
        "ccpa.v1.CcpaService/GetOptOut" => {
            assert!(
                fields
                    .iter()
                    .all(|f| ["pkey", "email"].contains(&f.as_str())),
                "{line}"
            );
            let answer = CcpaServiceClient::new(channel)
                .get_opt_out(GetOptOutRequest {
                    pkey: text("pkey"),
                    email: text("email"),
                })
                .await
                .unwrap_or_else(|status| panic!("{line}: {status:?}"))
                .into_inner();
            assert_eq!(answer.pkey, text("pkey"), "{line}");
        }
        "grpc.health.v1.Health/Check" => {
            assert!(fields.iter().all(|f| *f == "service"), "{line}");
            let answer = HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: text("service"),
                })
                .await
                .unwrap_or_else(|status| panic!("{line}: {status:?}"))
                .into_inner();
            assert_eq!(answer.status, ServingStatus::Serving as i32, "{line}");
        }
        other => panic!("{other}: a method the test does not know, in {line}"),
    }
}

#[tokio::test]
async fn serve_with_the_embedded_emulator_prints_commands_that_work() {
    let mut gateway = common::gateway()
        .args(&["--emulator"])
        .log_filter("debug")
        .spawn(None)
        .await;
    let printed = loop {
        let lines = gateway.stdout();
        if lines.iter().any(|l| l.starts_with("Stop with")) {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let commands: Vec<&str> = printed
        .iter()
        .skip_while(|l| !l.starts_with("Try, from another terminal"))
        .skip(1)
        .take_while(|l| !l.starts_with("Stop with"))
        .map(|l| l.trim())
        .filter(|l| !l.is_empty())
        .collect();
    let pkey = commands
        .iter()
        .find(|l| l.contains("get-opt-out"))
        .and_then(|l| l.split('\'').nth(1))
        .expect("a get-opt-out command with a quoted key");

    // Every command printed is run, as pasted: one that fails would fail whoever tries it.
    let mut ran = Vec::new();
    for line in &commands {
        let words = shell_words(line);
        match words.iter().map(String::as_str).collect::<Vec<_>>()[..] {
            ["cargo", "run", "--release", "--", subcommand, ..] => {
                let outcome = run_as_printed(&words[4..]).await;
                assert_eq!(outcome.code, 0, "{line}: {}", outcome.stderr);
                let json = outcome.json();
                match subcommand {
                    "get-opt-out" => {
                        assert_eq!(json["pkey"], pkey, "{line}: {json}");
                        assert!(json["ccpaOptOut"].is_boolean(), "{line}: {json}");
                    }
                    "set-opt-out" => {
                        assert_eq!(json["pkey"], pkey, "{line}: {json}");
                        assert_eq!(json["ccpaOptOut"], true, "{line}: {json}");
                        assert_eq!(json["state"], "DELIVERY_STATE_APPLIED", "{line}: {json}");
                    }
                    "create-profile" => {
                        let profile = &json["profile"];
                        assert!(
                            profile["pkey"].as_str().unwrap().starts_with('@'),
                            "{line}: {json}"
                        );
                        assert_eq!(profile["email"], "someone@example.com", "{line}: {json}");
                        assert_eq!(profile["ccpaOptOut"], true, "{line}: {json}");
                    }
                    other => panic!("{other}: a printed command the test does not check"),
                }
                ran.push(subcommand.to_owned());
            }
            ["grpcurl", ..] => {
                call_as_grpcurl_would(gateway.addr, line, &words[1..]).await;
                ran.push(words.last().unwrap().clone());
            }
            [assignment, "cargo", "run", "--example", "gateway_client"] => {
                // The library client's example, as a Rust service would call: its code, compiled
                // into this test (a `cargo run` here would build the dependencies again with the
                // root package's features alone, for minutes), given what the line sets.
                let addr = assignment
                    .strip_prefix("CCPA_ADDR=")
                    .unwrap_or_else(|| panic!("{line}: only CCPA_ADDR is set"));
                if let Err(error) =
                    gateway_client_example::opt_out(addr.to_owned(), "ada@example.com".into()).await
                {
                    panic!("{line}: {error}");
                }
                let read = CcpaServiceClient::new(common::connect(gateway.addr).await)
                    .get_opt_out(GetOptOutRequest {
                        email: "ada@example.com".into(),
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                assert!(read.ccpa_opt_out, "{line}: {read:?}");
                ran.push("gateway_client".to_owned());
            }
            ["curl", "-s", url] => {
                // After the calls above: the metrics count them.
                let metrics = reqwest::get(url).await.unwrap().text().await.unwrap();
                assert!(
                    metrics.contains("grpc_server_handled_total{grpc_type=\"unary\",grpc_service=\"ccpa.v1.CcpaService\",grpc_method=\"GetOptOut\",grpc_code=\"OK\"}"),
                    "{metrics}"
                );
                ran.push("metrics".to_owned());
            }
            _ => panic!("a printed command the test does not know: {line}"),
        }
    }
    assert_eq!(
        ran,
        [
            "get-opt-out",
            "set-opt-out",
            "create-profile",
            "ccpa.v1.CcpaService/GetOptOut",
            "grpc.health.v1.Health/Check",
            "gateway_client",
            "metrics"
        ],
        "{printed:#?}"
    );

    // Ctrl-C at the terminal: the same orderly stop as SIGTERM.
    gateway.signal(nix::sys::signal::Signal::SIGINT);
    assert_eq!(gateway.wait().await, 0);
    assert!(gateway.log().contains("reporting NOT_SERVING"));
}

/// Profiles at one address in the emulator behind `serve --emulator`, and whether its first page
/// of them links a second when asked without, then with, `_forcePagination=true`.
async fn embedded_emulator_links_pages(args: &[&str]) -> (bool, bool) {
    let gateway = common::gateway().args(args).spawn(None).await;
    let line = gateway
        .log_line(&["embedded Adobe Campaign emulator started"])
        .await;
    let line: Value = serde_json::from_str(&line).unwrap();
    let acs = acs_profile_client::Client::from_config(acs_profile_client::ClientConfig::new(
        line["url"].as_str().unwrap(),
        EmulatorConfig::DEFAULT_TENANT,
        EmulatorConfig::DEFAULT_API_KEY,
        std::sync::Arc::new(acs_profile_client::SharedToken::new(
            acs_profile_client::AccessToken::new(EmulatorConfig::DEFAULT_ACCESS_TOKEN),
        )),
    ))
    .unwrap();
    for _ in 0..26 {
        let profile = acs_profile_client::types::ProfileInput {
            email: Some("ada@example.com".into()),
            ..Default::default()
        };
        acs.add_profile(&profile, None).await.unwrap();
    }
    let mut linked = [false; 2];
    for (force_pagination, linked) in [None, Some(true)].into_iter().zip(&mut linked) {
        let page = acs
            .list_profiles_by_email(force_pagination, None, None, "ada@example.com")
            .await
            .unwrap()
            .into_inner();
        assert_eq!(page.content.len(), 25);
        *linked = page.next.is_some();
    }
    (linked[0], linked[1])
}

#[tokio::test]
async fn serve_with_the_embedded_emulator_answers_as_a_large_table_unless_told_otherwise() {
    assert_eq!(
        embedded_emulator_links_pages(&["--emulator"]).await,
        (false, true),
        "a production tenant's table: a second page only when forced"
    );
    assert_eq!(
        embedded_emulator_links_pages(&["--emulator", "--emulator-large-table", "false"]).await,
        (true, true),
        "a small table"
    );
}

#[tokio::test]
async fn emulator_command_serves_until_terminated() {
    let mut child = cli::ccpa_gateway()
        .args(["emulator", "--listen", "127.0.0.1:0", "--seed-demo"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = stdout.next_line().await.unwrap().unwrap();
    let url = first
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .expect("the emulator prints its URL");
    let mut pkey = None;
    while let Some(line) = stdout.next_line().await.unwrap() {
        if let Some(key) = line.split_whitespace().find(|w| w.starts_with('@')) {
            pkey = Some(key.to_owned());
            break;
        }
    }
    let pkey = pkey.expect("a demo profile key");

    let response = reqwest::Client::new()
        .get(format!(
            "{url}/{}/campaign/profileAndServices/profile/{pkey}",
            EmulatorConfig::DEFAULT_TENANT
        ))
        .bearer_auth(EmulatorConfig::DEFAULT_ACCESS_TOKEN)
        .header("X-Api-Key", EmulatorConfig::DEFAULT_API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}
