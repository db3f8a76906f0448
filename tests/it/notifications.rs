//! Notifications to third parties over real sockets: a gateway records consumer requests, and
//! delivers each to the recipients of `--recipients` as a signed CloudEvent, which a receiver
//! verifies with the Standard Webhooks reference library. Both stores; retries and their
//! back-off on the ledger's clock; a recipient that answers 410; one that hangs, which delays no
//! other; a gateway killed during a delivery; two replicas on PostgreSQL; the recipients file's
//! reloads and refusals; the records CLI.

use crate::common;

use common::receiver::{Receiver, RecipientSpec, Reply, write_recipients};
use common::{Store, acs_config, eventually, set};

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use acs_profile_client::{Clock, ManualClock};
use ccpa_gateway::backoff::Backoff;
use ccpa_gateway::notify::{Notifications, NotifySettings, recipients};
use ccpa_gateway::proto::ccpa_v1::ccpa_service_client::CcpaServiceClient;
use ccpa_gateway::proto::ccpa_v1::{NotificationState, RecipientNotification, SetOptOutRequest};
use ccpa_gateway::server::ServerOptions;
use tonic::transport::Channel;

/// Quick settings: idle workers look every 50 ms, retries wait about a second (on the ledger's
/// clock, which the tests move).
fn quick() -> NotifySettings {
    NotifySettings {
        poll_interval: Duration::from_millis(50),
        timeout: Duration::from_secs(2),
        backoff: Backoff::NOTIFICATION
            .between(Duration::from_secs(1), Duration::from_secs(60))
            .unwrap(),
        ..NotifySettings::default()
    }
}

/// Server options notifying the recipients of the file at `path`.
fn notifying(path: &Path, settings: NotifySettings) -> ServerOptions {
    ServerOptions {
        notifications: Notifications {
            recipients: Some(Arc::new(recipients::open(path).expect("the file loads"))),
            settings,
        },
        ..ServerOptions::default()
    }
}

fn recipient<'a>(
    id: &'a str,
    receiver: &Receiver,
    dir: &Path,
    events: &'a [&'a str],
) -> RecipientSpec<'a> {
    RecipientSpec {
        id,
        url: receiver.url(),
        secret_file: receiver.secret_file(dir, &format!("{id}.secret")),
        events,
        max_rps: 100,
    }
}

async fn notifications_of(
    client: &mut CcpaServiceClient<Channel>,
    request_id: &str,
) -> Vec<RecipientNotification> {
    common::record_response(client, request_id)
        .await
        .notifications
}

/// Waits until `request_id`'s notification to `recipient` is `what` says (`done`).
async fn until(
    client: &mut CcpaServiceClient<Channel>,
    request_id: &str,
    recipient: &str,
    what: &str,
    done: impl Fn(&RecipientNotification) -> bool,
) -> RecipientNotification {
    let done = &done;
    eventually(&format!("{request_id} to {recipient}: {what}"), || {
        let mut client = client.clone();
        async move {
            let notifications = notifications_of(&mut client, request_id).await;
            let found = notifications
                .iter()
                .find(|n| n.recipient == recipient && done(n))
                .cloned();
            found.ok_or(notifications)
        }
    })
    .await
}

/// Waits until `request_id`'s notification to `recipient` is in `state`.
async fn until_state(
    client: &mut CcpaServiceClient<Channel>,
    request_id: &str,
    recipient: &str,
    state: NotificationState,
) -> RecipientNotification {
    until(client, request_id, recipient, &format!("{state:?}"), |n| {
        n.state() == state
    })
    .await
}

/// Waits until `request_id`'s notification to `recipient` has had `attempts`.
async fn until_attempts(
    client: &mut CcpaServiceClient<Channel>,
    request_id: &str,
    recipient: &str,
    attempts: i32,
) -> RecipientNotification {
    until(
        client,
        request_id,
        recipient,
        &format!("{attempts} attempts"),
        |n| n.attempts == attempts,
    )
    .await
}

fn by_email(email: &str, opt_out: bool, request_id: &str) -> SetOptOutRequest {
    SetOptOutRequest {
        email: email.into(),
        pkey: String::new(),
        ..set("", opt_out, request_id)
    }
}

on_both_stores!(each_consumer_request_reaches_the_recipients_that_asked_for_its_kind_signed);

async fn each_consumer_request_reaches_the_recipients_that_asked_for_its_kind_signed(store: Store) {
    let dir = tempfile::tempdir().unwrap();
    let (outs, both) = (Receiver::start().await, Receiver::start().await);
    let file = dir.path().join("recipients.toml");
    write_recipients(
        &file,
        &[
            recipient("opt-outs-only", &outs, dir.path(), &["opt-out"]),
            recipient("everything", &both, dir.path(), &["opt-out", "opt-in"]),
        ],
    );
    let gateway = common::gateway()
        .store(store)
        .options(notifying(&file, quick()))
        .start()
        .await;
    let mut client = gateway.client();
    let pkey = gateway.profile(false);
    client.set_opt_out(set(&pkey, true, "out-1")).await.unwrap();
    client.set_opt_out(set(&pkey, false, "in-1")).await.unwrap();
    client
        .set_opt_out(by_email("Ada@Example.COM", true, "mail-1"))
        .await
        .unwrap();

    let to_both = both.until_received(3).await;
    let to_outs = outs.until_received(2).await;
    // Nothing else comes: the opt-in is not for `opt-outs-only`.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(outs.received().len(), 2, "{:?}", outs.received());
    assert_eq!(both.received().len(), 3);

    for delivery in to_both.iter().chain(&to_outs) {
        assert!(delivery.verified, "signature: {delivery:?}");
        assert_eq!(delivery.signatures, 1);
        assert_eq!(delivery.content_type, "application/cloudevents+json");
        let event = &delivery.event;
        assert_eq!(event["specversion"], "1.0");
        assert_eq!(event["source"], "ccpa-gateway");
        assert_eq!(
            event["id"],
            delivery.id.as_str(),
            "the event id is the webhook-id"
        );
        assert!(event["time"].is_string());
        // Never the address, nor a name.
        assert!(
            !delivery.body.to_lowercase().contains("ada@"),
            "{}",
            delivery.body
        );
        assert!(!delivery.body.contains("Lovelace"));
    }
    let find = |deliveries: &[common::receiver::Delivery], id: &str| {
        deliveries
            .iter()
            .find(|d| d.event["data"]["request_id"] == id)
            .unwrap_or_else(|| panic!("{id} in {deliveries:?}"))
            .clone()
    };
    let out = find(&to_both, "out-1").event;
    assert_eq!(out["type"], "ccpa.v1.opt_out.recorded");
    assert_eq!(out["data"]["pkey"], pkey.as_str());
    assert_eq!(out["data"]["ccpa_opt_out"], true);
    assert_eq!(out["data"]["source"], "WEB_FORM");
    assert!(out["data"]["received_at"].is_string());
    assert!(out["data"].get("email_sha256").is_none());
    let opt_in = find(&to_both, "in-1").event;
    assert_eq!(opt_in["type"], "ccpa.v1.opt_in.recorded");
    assert_eq!(opt_in["data"]["ccpa_opt_out"], false);
    let mail = find(&to_both, "mail-1").event;
    assert_eq!(
        mail["data"]["email_sha256"],
        ccpa_gateway::notify::event::email_sha256("ada@example.com"),
        "the digest of the trimmed, lower-cased address"
    );
    assert!(mail["data"].get("pkey").is_none(), "{mail}");
    // Each recipient's id of one request is its own, and stable.
    assert_ne!(find(&to_outs, "out-1").id, find(&to_both, "out-1").id);

    let delivered = until_state(
        &mut client,
        "out-1",
        "opt-outs-only",
        NotificationState::Delivered,
    )
    .await;
    assert_eq!(delivered.attempts, 1);
    assert!(delivered.delivered_at.is_some());
    assert!(delivered.last_failure_class.is_empty());
    let states: Vec<_> = notifications_of(&mut client, "in-1")
        .await
        .iter()
        .map(|n| n.recipient.clone())
        .collect();
    assert_eq!(states, ["everything"], "the opt-in is for one recipient");
    // The profile's part of the request by email is not a consumer request of its own.
    let part = format!(
        "mail-1{}1",
        ccpa_gateway::optout::RESERVED_REQUEST_ID_SEPARATOR
    );
    assert!(notifications_of(&mut client, &part).await.is_empty());
    assert_eq!(notifications_of(&mut client, "mail-1").await.len(), 2);
}

#[tokio::test]
async fn retries_what_may_pass_with_back_off_and_fails_a_410_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let (flaky, gone) = (Receiver::start().await, Receiver::start().await);
    flaky.answer_next([Reply::Status(503, None), Reply::Status(429, Some("30"))]);
    gone.answer_always(Reply::Status(410, None));
    let file = dir.path().join("recipients.toml");
    write_recipients(
        &file,
        &[
            recipient("flaky", &flaky, dir.path(), &["opt-out"]),
            recipient("gone", &gone, dir.path(), &["opt-out"]),
        ],
    );
    let clock = Arc::new(ManualClock::new());
    let gateway = common::gateway()
        .clock(clock.clone())
        .options(notifying(&file, quick()))
        .start()
        .await;
    let mut client = gateway.client();
    let pkey = gateway.profile(false);
    client.set_opt_out(set(&pkey, true, "r-1")).await.unwrap();

    flaky.until_received(1).await;
    let first = until_attempts(&mut client, "r-1", "flaky", 1).await;
    assert_eq!(first.state(), NotificationState::Pending);
    assert_eq!(first.last_failure_class, "http_503");
    // Not again before its back-off, on the ledger's clock.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(flaky.received().len(), 1);
    clock.advance(Duration::from_secs(2));
    flaky.until_received(2).await;
    let second = until_attempts(&mut client, "r-1", "flaky", 2).await;
    assert_eq!(second.last_failure_class, "http_429");
    // Retry-After: 30 is honoured over the shorter back-off.
    let due = second.next_attempt_at.unwrap();
    let now = clock.unix_ms();
    assert!(
        due.seconds * 1000 + i64::from(due.nanos / 1_000_000) >= now + 29_000,
        "due {due:?}, now {now}"
    );
    clock.advance(Duration::from_secs(10));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(flaky.received().len(), 2, "not before Retry-After");
    clock.advance(Duration::from_secs(25));
    let delivered = until_state(&mut client, "r-1", "flaky", NotificationState::Delivered).await;
    assert_eq!(delivered.attempts, 3);
    let received = flaky.received();
    assert!(
        received.iter().all(|d| d.id == received[0].id),
        "one webhook-id for every retry"
    );

    let failed = until_state(&mut client, "r-1", "gone", NotificationState::Failed).await;
    assert_eq!(failed.attempts, 1);
    assert_eq!(failed.last_failure_class, "http_410");
    assert!(failed.failure_reason.contains("410"), "{failed:?}");
    clock.advance(Duration::from_secs(3600));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(gone.received().len(), 1, "never again");
}

#[tokio::test]
async fn retries_end_after_the_give_up_period() {
    let dir = tempfile::tempdir().unwrap();
    let down = Receiver::start().await;
    down.answer_always(Reply::Status(503, None));
    let file = dir.path().join("recipients.toml");
    write_recipients(&file, &[recipient("down", &down, dir.path(), &["opt-out"])]);
    let clock = Arc::new(ManualClock::new());
    let gateway = common::gateway()
        .clock(clock.clone())
        .options(notifying(
            &file,
            NotifySettings {
                give_up: Duration::from_secs(72 * 3600),
                ..quick()
            },
        ))
        .start()
        .await;
    let mut client = gateway.client();
    let pkey = gateway.profile(false);
    client.set_opt_out(set(&pkey, true, "r-1")).await.unwrap();
    down.until_received(1).await;
    // Its answer recorded (a retry) before the period ends: the next attempt is the last.
    let first = until_attempts(&mut client, "r-1", "down", 1).await;
    assert_eq!(first.state(), NotificationState::Pending);
    clock.advance(Duration::from_secs(72 * 3600));
    let failed = until_state(&mut client, "r-1", "down", NotificationState::Failed).await;
    assert_eq!(failed.last_failure_class, "http_503");
    assert!(
        failed.failure_reason.contains("--notify-give-up"),
        "{failed:?}"
    );
    assert_eq!(failed.attempts, 2);
}

#[tokio::test]
async fn a_recipient_that_hangs_delays_no_other_and_no_opt_out() {
    let dir = tempfile::tempdir().unwrap();
    let (stuck, fine) = (Receiver::start().await, Receiver::start().await);
    stuck.answer_always(Reply::Hang);
    let file = dir.path().join("recipients.toml");
    write_recipients(
        &file,
        &[
            recipient("stuck", &stuck, dir.path(), &["opt-out"]),
            recipient("fine", &fine, dir.path(), &["opt-out"]),
        ],
    );
    let gateway = common::gateway()
        .options(notifying(
            &file,
            NotifySettings {
                timeout: Duration::from_secs(30),
                ..quick()
            },
        ))
        .start()
        .await;
    let mut client = gateway.client();
    let started = std::time::Instant::now();
    for n in 0..40 {
        let pkey = gateway.profile(false);
        client
            .set_opt_out(set(&pkey, true, &format!("r-{n}")))
            .await
            .unwrap();
    }
    fine.until_received(40).await;
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the other recipient and the calls went on: {:?}",
        started.elapsed()
    );
    // The stuck one has its bound in flight, and no more.
    let bound = ccpa_gateway::notify::IN_FLIGHT_PER_RECIPIENT;
    stuck.until_received(bound).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(stuck.received().len(), bound);
}

#[tokio::test]
async fn a_recipients_file_that_does_not_load_stops_start_up_or_keeps_the_previous() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let secret = receiver.secret_file(dir.path(), "r.secret");
    let file = dir.path().join("recipients.toml");
    write_recipients(
        &file,
        &[RecipientSpec {
            id: "plain",
            url: "http://sync.example.com/ccpa".into(),
            secret_file: secret.clone(),
            events: &["opt-out"],
            max_rps: 5,
        }],
    );
    let output = common::cli::ccpa_gateway()
        .args([
            "serve",
            "--emulator",
            "--listen",
            "127.0.0.1:0",
            "--recipients",
        ])
        .arg(&file)
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--recipients"), "{stderr}");
    assert!(stderr.contains("https"), "{stderr}");

    // A gateway with no recipient, then one added: only requests recorded after it reach it.
    write_recipients(&file, &[]);
    let gateway = common::gateway()
        .options(notifying(&file, quick()))
        .start()
        .await;
    let mut client = gateway.client();
    let pkey = gateway.profile(false);
    client
        .set_opt_out(set(&pkey, true, "before"))
        .await
        .unwrap();
    write_recipients(
        &file,
        &[recipient("late", &receiver, dir.path(), &["opt-out"])],
    );
    // The reload (a second) and its write to the ledger.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    client.set_opt_out(set(&pkey, false, "in")).await.unwrap();
    client.set_opt_out(set(&pkey, true, "after")).await.unwrap();
    let received = receiver.until_received(1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.received().len(), 1, "{received:?}");
    assert_eq!(received[0].event["data"]["request_id"], "after");
    // A broken edit keeps the recipient in force.
    std::fs::write(&file, "[[recipient]]\nid = \"late\"\n").unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    client.set_opt_out(set(&pkey, false, "in-2")).await.unwrap();
    client
        .set_opt_out(set(&pkey, true, "after-2"))
        .await
        .unwrap();
    let received = receiver.until_received(2).await;
    assert_eq!(received[1].event["data"]["request_id"], "after-2");
}

#[tokio::test]
async fn a_gateway_killed_during_a_delivery_delivers_it_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    receiver.answer_next([Reply::Hang]);
    let file = dir.path().join("recipients.toml");
    write_recipients(
        &file,
        &[recipient("sync", &receiver, dir.path(), &["opt-out"])],
    );
    let ledger = dir.path().join("ledger.sqlite3").display().to_string();
    let emulator = acs_emulator::Emulator::start(Default::default())
        .await
        .unwrap();
    let args = ["--recipients", file.to_str().unwrap()];
    let mut first = common::gateway()
        .ledger_at(&ledger)
        .args(&args)
        .spawn(Some(&emulator))
        .await;
    let pkey = emulator.insert_profile(acs_emulator::NewProfile {
        email: "ada@example.com".into(),
        first_name: "Ada".into(),
        last_name: "Lovelace".into(),
        ccpa_opt_out: false,
    });
    first
        .client
        .set_opt_out(set(&pkey, true, "killed"))
        .await
        .unwrap();
    receiver.until_received(1).await;
    first.kill().await;
    let mut second = common::gateway()
        .ledger_at(&ledger)
        .args(&args)
        .spawn(Some(&emulator))
        .await;
    let received = receiver.until_received(2).await;
    assert_eq!(
        received[0].id, received[1].id,
        "the same webhook-id: the receiver drops it"
    );
    until_state(
        &mut second.client,
        "killed",
        "sync",
        NotificationState::Delivered,
    )
    .await;
}

#[tokio::test]
async fn on_postgres_two_replicas_deliver_every_notification() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let file = dir.path().join("recipients.toml");
    write_recipients(
        &file,
        &[recipient("sync", &receiver, dir.path(), &["opt-out"])],
    );
    let store = Store::postgres().await;
    let location = store.location.clone();
    let one = common::gateway()
        .store(store)
        .options(notifying(&file, quick()))
        .start()
        .await;
    let other = common::gateway()
        .ledger_at(&location)
        .calling(acs_config(one.emulator()))
        .options(notifying(&file, quick()))
        .start()
        .await;
    let total = 60;
    for n in 0..total {
        let pkey = one.profile(false);
        let mut client = if n % 2 == 0 {
            one.client()
        } else {
            other.client()
        };
        client
            .set_opt_out(set(&pkey, true, &format!("r-{n}")))
            .await
            .unwrap();
    }
    receiver.until_received(total).await;
    let mut client = one.client();
    for n in 0..total {
        until_state(
            &mut client,
            &format!("r-{n}"),
            "sync",
            NotificationState::Delivered,
        )
        .await;
    }
    let received = receiver.received();
    let mut ids: Vec<_> = received.iter().map(|d| d.id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), total, "every one");
    assert_eq!(
        received.len(),
        total,
        "each once: the leases kept the replicas apart"
    );
}

#[tokio::test]
async fn the_records_cli_lists_notifications_and_counts_them_overdue_and_in_the_report() {
    let dir = tempfile::tempdir().unwrap();
    let (good, gone) = (Receiver::start().await, Receiver::start().await);
    gone.answer_always(Reply::Status(410, None));
    let down = Receiver::start().await;
    down.answer_always(Reply::Status(503, None));
    let file = dir.path().join("recipients.toml");
    write_recipients(
        &file,
        &[
            recipient("good", &good, dir.path(), &["opt-out"]),
            recipient("gone", &gone, dir.path(), &["opt-out"]),
            recipient("down", &down, dir.path(), &["opt-out"]),
        ],
    );
    // Kept past the gateway's end, for the CLI to read.
    let store = Store::sqlite();
    let location = store.location.clone();
    // Recorded a month ago: the one still pending is overdue now.
    let clock = Arc::new(ManualClock::at(
        std::time::SystemTime::now() - Duration::from_secs(30 * 86_400),
    ));
    let gateway = common::gateway()
        .ledger_at(&location)
        .clock(clock.clone())
        .options(notifying(&file, quick()))
        .start()
        .await;
    let mut client = gateway.client();
    let pkey = gateway.profile(false);
    client.set_opt_out(set(&pkey, true, "r-1")).await.unwrap();
    until_state(&mut client, "r-1", "good", NotificationState::Delivered).await;
    until_state(&mut client, "r-1", "gone", NotificationState::Failed).await;
    down.until_received(1).await;
    // Its answer recorded before the gateway stops (one cut short is sent again, unrecorded).
    until_attempts(&mut client, "r-1", "down", 1).await;
    gateway.shutdown().await.unwrap();

    let records = async |args: &[&str]| {
        let outcome = common::cli::run(
            common::cli::ccpa_gateway()
                .args(["records", "--ledger", &location])
                .args(args),
        )
        .await;
        (Some(outcome.code), outcome.stdout, outcome.stderr)
    };

    let (code, out, err) = records(&["notifications"]).await;
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{out}");
    let (code, out, _) = records(&["notifications", "--state", "failed"]).await;
    assert_eq!(code, Some(0));
    let failed: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(failed["recipient"], "gone");
    assert_eq!(failed["lastFailureClass"], "http_410");
    let (_, out, _) = records(&["notifications", "--recipient", "down"]).await;
    let pending: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(pending["state"], "PENDING");
    assert_eq!(pending["lastFailureClass"], "http_503");

    let (code, _, err) = records(&["--overdue"]).await;
    assert_eq!(code, Some(6), "{err}");
    assert!(err.contains("1 notifications"), "{err}");

    let year = chrono::DateTime::<chrono::Utc>::from(
        std::time::SystemTime::now() - Duration::from_secs(30 * 86_400),
    );
    let (code, out, _) = records(&[
        "report",
        "--year",
        &chrono::Datelike::year(&year).to_string(),
        "--json",
    ])
    .await;
    assert_eq!(code, Some(0));
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        report["opt_out"]["notifications"],
        serde_json::json!({"delivered": 1, "failed": 1, "pending": 1})
    );
}

#[tokio::test]
async fn serve_with_the_embedded_emulator_notifies_and_exports_the_notification_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let file = dir.path().join("recipients.toml");
    write_recipients(
        &file,
        &[recipient("sync", &receiver, dir.path(), &["opt-out"])],
    );
    let mut gateway = common::gateway()
        .args(&[
            "--emulator",
            "--metrics-listen",
            "127.0.0.1:0",
            "--recipients",
            file.to_str().unwrap(),
        ])
        .spawn(None)
        .await;
    // A demo profile's key, from the commands the embedded emulator prints.
    let pkey = eventually("a demo profile's key printed", || {
        let printed = gateway.stdout();
        let key = printed
            .iter()
            .find(|l| l.contains("get-opt-out"))
            .and_then(|l| l.split('\'').nth(1).map(str::to_owned));
        std::future::ready(key.ok_or(printed))
    })
    .await;
    gateway
        .client
        .set_opt_out(set(&pkey, true, "demo-1"))
        .await
        .unwrap();
    let received = receiver.until_received(1).await;
    assert!(received[0].verified);
    until_state(
        &mut gateway.client,
        "demo-1",
        "sync",
        NotificationState::Delivered,
    )
    .await;

    let url = gateway.metrics_url().await;
    let scrape = reqwest::get(&url).await.unwrap().text().await.unwrap();
    let value = |name: &str, labels: &[&str]| {
        scrape
            .lines()
            .find(|l| {
                l.starts_with(&format!("{name}{{")) && labels.iter().all(|label| l.contains(label))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{name} {labels:?} in\n{scrape}"))
    };
    let sync = r#"recipient="sync""#;
    assert_eq!(
        value(
            "ccpa_notifications_total",
            &[sync, r#"outcome="delivered""#]
        ),
        1.0
    );
    assert_eq!(
        value("ccpa_notifications_total", &[sync, r#"outcome="failed""#]),
        0.0,
        "every outcome's series exists from the start"
    );
    assert_eq!(value("ccpa_notifications_pending", &[sync]), 0.0);
    assert_eq!(
        value("ccpa_notifications_oldest_pending_age_seconds", &[sync]),
        0.0
    );
}
