//! The change feed (WatchOptOutChanges) over real sockets, on both stores: the history and live
//! changes in the ledger's order, resuming from a cursor, opt-ins on request, the refusals
//! (malformed and expired cursors, the `watch` permission), PostgreSQL's transactions that
//! commit out of order, two replicas, the Rust client's resumption when a connection reaches its
//! maximum age, shutdown, and the CLI.

use crate::common;

use common::set;

use std::sync::Arc;
use std::time::Duration;

use acs_profile_client::ManualClock;
use ccpa_gateway::access::{AccessControl, PolicySource};
use ccpa_gateway::client::{ClientBuilder, Error};
use ccpa_gateway::optout::retention::MIN_RETENTION;
use ccpa_gateway::proto::ccpa_v1::ccpa_service_client::CcpaServiceClient;
use ccpa_gateway::proto::ccpa_v1::{
    DeliveryState, OptOutChange, RequestSource, SetOptOutRequest, WatchOptOutChangesRequest,
};
use ccpa_gateway::server::{Boundary, ConnectionLimits, ServerOptions};
use common::{Gateway, Store, acs_config};
use futures::{Stream, StreamExt};
use tonic::transport::Channel;
use tonic::{Code, Request, Streaming};
use tonic_types::StatusExt;

fn watch_request(after_cursor: &str, include_opt_ins: bool) -> WatchOptOutChangesRequest {
    WatchOptOutChangesRequest {
        after_cursor: after_cursor.into(),
        include_opt_ins,
    }
}

/// Records `request` through `client`; it must be APPLIED.
async fn applied(client: &mut CcpaServiceClient<Channel>, request: SetOptOutRequest) {
    let answer = client.set_opt_out(request).await.unwrap().into_inner();
    assert_eq!(answer.state, DeliveryState::Applied as i32, "{answer:?}");
}

async fn watch(
    client: &mut CcpaServiceClient<Channel>,
    after_cursor: &str,
    include_opt_ins: bool,
) -> Streaming<OptOutChange> {
    client
        .watch_opt_out_changes(watch_request(after_cursor, include_opt_ins))
        .await
        .unwrap()
        .into_inner()
}

/// The next `n` changes of `changes`, each within ten seconds.
async fn next<S, E>(changes: &mut S, n: usize) -> Vec<OptOutChange>
where
    S: Stream<Item = Result<OptOutChange, E>> + Unpin,
    E: std::fmt::Debug,
{
    let mut got = Vec::with_capacity(n);
    for _ in 0..n {
        let change = tokio::time::timeout(Duration::from_secs(10), changes.next())
            .await
            .unwrap_or_else(|_| panic!("no change within 10 s after {got:?}"))
            .expect("the stream goes on")
            .expect("a change");
        got.push(change);
    }
    got
}

/// `(request_id, state)` of each change.
fn steps(changes: &[OptOutChange]) -> Vec<(String, DeliveryState)> {
    changes
        .iter()
        .map(|c| (c.request_id.clone(), c.state()))
        .collect()
}

fn step(request_id: &str, state: DeliveryState) -> (String, DeliveryState) {
    (request_id.to_owned(), state)
}

/// Nothing arrives on `changes` for `quiet` (several of the feed's follow intervals).
async fn assert_quiet<S: Stream + Unpin>(changes: &mut S, quiet: Duration)
where
    S::Item: std::fmt::Debug,
{
    if let Ok(item) = tokio::time::timeout(quiet, changes.next()).await {
        panic!("expected nothing yet, got {item:?}");
    }
}

// Each runs once on SQLite and once on PostgreSQL.
on_both_stores!(
    a_watcher_gets_the_history_then_live_changes_in_order_and_resumes_from_a_cursor,
    a_cursor_retention_has_passed_is_expired_and_an_empty_one_starts_at_the_oldest_kept,
);

async fn a_watcher_gets_the_history_then_live_changes_in_order_and_resumes_from_a_cursor(
    store: Store,
) {
    let gw = common::gateway().store(store).start().await;
    let mut client = gw.client();
    let first = gw.profile(false);
    let second = gw.profile(false);
    applied(&mut client, set(&first, true, "out-1")).await;
    applied(&mut client, set(&first, false, "in-1")).await;

    // The history: each opt-out recorded, then applied; the opt-in left out by default.
    let mut changes = watch(&mut client, "", false).await;
    let history = next(&mut changes, 2).await;
    assert_eq!(
        steps(&history),
        [
            step("out-1", DeliveryState::Pending),
            step("out-1", DeliveryState::Applied)
        ]
    );
    let recorded = &history[0];
    assert_eq!(recorded.pkey, first);
    assert!(recorded.ccpa_opt_out);
    assert_eq!(recorded.source(), RequestSource::WebForm);
    assert!(recorded.received_at.is_some() && recorded.changed_at.is_some());
    assert_eq!(recorded.honored_at, None, "not held by ACS yet");
    assert!(history[1].honored_at.is_some(), "APPLIED says since when");
    assert_ne!(history[0].cursor, history[1].cursor);

    // Then live: a request recorded while the stream is open.
    applied(&mut client, set(&second, true, "out-2")).await;
    let live = next(&mut changes, 2).await;
    assert_eq!(
        steps(&live),
        [
            step("out-2", DeliveryState::Pending),
            step("out-2", DeliveryState::Applied)
        ]
    );
    assert_eq!(live[0].pkey, second);

    // Resuming after a cursor sends what follows it, once.
    let mut resumed = watch(&mut client, &history[0].cursor, false).await;
    assert_eq!(
        steps(&next(&mut resumed, 3).await),
        [
            step("out-1", DeliveryState::Applied),
            step("out-2", DeliveryState::Pending),
            step("out-2", DeliveryState::Applied)
        ]
    );
    assert_quiet(&mut resumed, Duration::from_millis(600)).await;

    // With opt-ins: every request, in the order recorded.
    let mut everything = watch(&mut client, "", true).await;
    let all = next(&mut everything, 6).await;
    assert_eq!(
        steps(&all),
        [
            step("out-1", DeliveryState::Pending),
            step("out-1", DeliveryState::Applied),
            step("in-1", DeliveryState::Pending),
            step("in-1", DeliveryState::Applied),
            step("out-2", DeliveryState::Pending),
            step("out-2", DeliveryState::Applied)
        ]
    );
    assert!(!all[2].ccpa_opt_out);
    // The same cursor on the stream with opt-ins names the same change.
    assert_eq!(all[0].cursor, history[0].cursor);
}

#[tokio::test]
async fn a_malformed_cursor_is_refused_naming_the_field() {
    let gw = common::gateway().start().await;
    let mut client = gw.client();
    for cursor in ["not-a-cursor", "v1.1", "v1.-1.2", "v2.0.1"] {
        let status = client
            .watch_opt_out_changes(watch_request(cursor, false))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        let bad_request = status.get_details_bad_request().expect("BadRequest");
        assert_eq!(bad_request.field_violations[0].field, "after_cursor");
        assert!(
            !status.message().contains(cursor),
            "the input is not echoed"
        );
    }
}

#[tokio::test]
async fn watching_needs_the_watch_permission() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[[caller]]\nid = \"reader\"\nallow = [\"read\", \"records\", \"opt-out\"]\n\n\
         [[caller]]\nid = \"watcher\"\nallow = [\"watch\"]\n",
    )
    .unwrap();
    let boundary = Boundary {
        tls: None,
        access: AccessControl {
            mode: "header:l5d-client-id".parse().unwrap(),
            policy: Some(Arc::new(PolicySource::open(policy).unwrap())),
            client_certificate_required: false,
            trusted_proxies: Vec::new(),
        },
    };
    let gw = common::gateway()
        .options(ServerOptions {
            boundary,
            ..ServerOptions::default()
        })
        .start()
        .await;
    let mut client = gw.client();
    let as_caller = |caller: &str| {
        let mut request = Request::new(watch_request("", false));
        request
            .metadata_mut()
            .insert("l5d-client-id", caller.parse().unwrap());
        request
    };
    let denied = client
        .watch_opt_out_changes(as_caller("reader"))
        .await
        .expect_err("no `watch` permission");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let info = denied.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "CALLER_NOT_ALLOWED");
    assert_eq!(
        info.metadata.get("permission").map(String::as_str),
        Some("watch")
    );
    // Refused before the cursor is read: a malformed one is not what it is told.
    let mut malformed = as_caller("reader");
    malformed.get_mut().after_cursor = "bad".into();
    assert_eq!(
        client
            .watch_opt_out_changes(malformed)
            .await
            .expect_err("refused")
            .code(),
        Code::PermissionDenied
    );

    let pkey = gw.profile(false);
    let mut request = Request::new(set(&pkey, true, "watched-1"));
    request
        .metadata_mut()
        .insert("l5d-client-id", "reader".parse().unwrap());
    client.set_opt_out(request).await.unwrap();
    let mut changes = client
        .watch_opt_out_changes(as_caller("watcher"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut changes, 1).await[0].request_id, "watched-1");
}

async fn a_cursor_retention_has_passed_is_expired_and_an_empty_one_starts_at_the_oldest_kept(
    store: Store,
) {
    let clock = Arc::new(ManualClock::new());
    let gw = common::gateway()
        .store(store)
        .clock(clock.clone())
        .start()
        .await;
    let mut client = gw.client();
    let pkey = gw.profile(false);
    applied(&mut client, set(&pkey, true, "old")).await;
    let mut changes = watch(&mut client, "", false).await;
    let old = next(&mut changes, 2).await;
    drop(changes);

    clock.advance(MIN_RETENTION + Duration::from_secs(7 * 24 * 3600));
    applied(&mut client, set(&pkey, true, "new")).await;
    gw.ledger.prune(MIN_RETENTION).await.unwrap();

    // After the first change, the second was pruned: resuming there would skip it.
    let mut expired = watch(&mut client, &old[0].cursor, false).await;
    let status = tokio::time::timeout(Duration::from_secs(10), expired.next())
        .await
        .unwrap()
        .expect("an answer")
        .expect_err("expired");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "CURSOR_EXPIRED");
    assert!(expired.next().await.is_none(), "the stream ends");

    // After the last change pruned, nothing was lost: the watcher saw every pruned change.
    let kept = [
        step("new", DeliveryState::Pending),
        step("new", DeliveryState::Applied),
    ];
    let mut after_last_pruned = watch(&mut client, &old[1].cursor, false).await;
    assert_eq!(steps(&next(&mut after_last_pruned, 2).await), kept);
    // From the oldest change kept.
    let mut from_oldest = watch(&mut client, "", false).await;
    assert_eq!(steps(&next(&mut from_oldest, 2).await), kept);
}

/// A record written straight into the ledger's table, by a transaction the test holds open.
async fn begin_held_record(location: &str, request_id: &str) -> sqlx::AnyConnection {
    use sqlx::Connection as _;
    sqlx::any::install_default_drivers();
    let mut held = sqlx::AnyConnection::connect(location).await.unwrap();
    sqlx::query("BEGIN").execute(&mut held).await.unwrap();
    sqlx::query(
        "INSERT INTO opt_out_records (request_id, kind, pkey, opt_out, source, received_at, \
         received_at_given, recorded_at, caller, state, attempts, next_attempt_at, resolved_at) \
         VALUES ($1, 'SET_OPT_OUT', '@held', 1, 'WEB_FORM', 1, 0, 1, 'test', 'APPLIED', 1, 1, 1)",
    )
    .bind(request_id)
    .execute(&mut held)
    .await
    .unwrap();
    held
}

#[tokio::test]
async fn on_postgres_a_transaction_held_open_holds_the_feed_back_and_no_change_is_skipped() {
    let gw = common::gateway()
        .store(Store::postgres().await)
        .start()
        .await;
    let mut client = gw.client();
    let pkey = gw.profile(false);
    let mut changes = watch(&mut client, "", false).await;

    // A transaction takes its id first and commits last; the gateway's request, after it,
    // commits first.
    let mut held = begin_held_record(&gw.store().location, "held").await;
    applied(&mut client, set(&pkey, true, "after-held")).await;
    // A feed that followed the sequence alone would send "after-held" now, and pass "held"
    // for good when it commits.
    assert_quiet(&mut changes, Duration::from_millis(1500)).await;

    sqlx::query("COMMIT").execute(&mut held).await.unwrap();
    assert_eq!(
        steps(&next(&mut changes, 3).await),
        [
            step("held", DeliveryState::Applied),
            step("after-held", DeliveryState::Pending),
            step("after-held", DeliveryState::Applied)
        ]
    );
}

#[tokio::test]
async fn on_postgres_a_watcher_of_one_replica_sees_what_another_records() {
    let store = Store::postgres().await;
    let location = store.location.clone();
    let one = common::gateway().store(store).start().await;
    let other = common::gateway()
        .ledger_at(&location)
        .calling(acs_config(one.emulator()))
        .start()
        .await;
    let pkey = one.profile(false);
    let mut changes = watch(&mut other.client(), "", false).await;
    applied(&mut one.client(), set(&pkey, true, "via-one")).await;
    let seen = next(&mut changes, 2).await;
    assert_eq!(
        steps(&seen),
        [
            step("via-one", DeliveryState::Pending),
            step("via-one", DeliveryState::Applied)
        ]
    );
    assert_eq!(seen[0].pkey, pkey);
}

fn with_connection_age(age: Duration) -> ServerOptions {
    ServerOptions {
        connections: ConnectionLimits {
            max_connection_age: age,
            max_connection_age_grace: Duration::from_millis(200),
            ..ConnectionLimits::default()
        },
        ..ServerOptions::default()
    }
}

#[tokio::test]
async fn the_rust_client_resumes_from_its_last_cursor_when_a_connection_reaches_its_maximum_age() {
    let gw = common::gateway()
        .options(with_connection_age(Duration::from_secs(1)))
        .start()
        .await;
    let pkey = gw.profile(false);
    let mut raw = watch(&mut gw.client(), "", false).await;
    let client = ClientBuilder::new(format!("http://{}", gw.addr))
        .connect()
        .await
        .unwrap();
    let mut changes = client.watch_opt_out_changes(String::new(), false);

    let mut expected = Vec::new();
    for n in 0..4 {
        let request_id = format!("aged-{n}");
        applied(&mut gw.client(), set(&pkey, true, &request_id)).await;
        expected.push(step(&request_id, DeliveryState::Pending));
        expected.push(step(&request_id, DeliveryState::Applied));
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    // The streams spanned connections that reached their age: a plain stream broke…
    let broken = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(_)) = raw.next().await {}
    })
    .await;
    assert!(broken.is_ok(), "a stream is cut at the connection's age");
    // …and the client's carried on after its last cursor: each change once, in order.
    assert_eq!(steps(&next(&mut changes, 8).await), expected);
}

#[tokio::test]
async fn shutdown_ends_a_watch_with_unavailable_and_is_not_held_by_it() {
    let mut gw = common::gateway().start().await;
    let mut changes = watch(&mut gw.client(), "", false).await;
    gw.begin_shutdown();
    let status = tokio::time::timeout(Duration::from_secs(10), changes.next())
        .await
        .expect("the watch ends at once")
        .expect("an answer")
        .expect_err("UNAVAILABLE");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "SHUTTING_DOWN");
    tokio::time::timeout(Duration::from_secs(10), gw.shutdown())
        .await
        .expect("shutdown is not held by the watch")
        .unwrap();
}

#[tokio::test]
async fn the_client_ends_a_watch_the_gateway_refuses_with_its_reason() {
    let gw = common::gateway().start().await;
    let client = ClientBuilder::new(format!("http://{}", gw.addr))
        .connect()
        .await
        .unwrap();
    let mut changes = client.watch_opt_out_changes("v1.x.1".into(), false);
    let error = tokio::time::timeout(Duration::from_secs(10), changes.next())
        .await
        .unwrap()
        .expect("an answer")
        .expect_err("refused");
    assert!(
        matches!(
            &error,
            Error::Status {
                code: Code::InvalidArgument,
                ..
            }
        ),
        "{error:?}"
    );
    assert!(changes.next().await.is_none(), "not resumed");
}

#[tokio::test]
async fn the_cli_prints_each_change_as_a_json_line() {
    use tokio::io::AsyncBufReadExt;
    let gw: Gateway = common::gateway().start().await;
    let pkey = gw.profile(false);
    applied(&mut gw.client(), set(&pkey, true, "cli-1")).await;
    let mut watcher = common::cli::ccpa_gateway()
        .args(["watch", "--addr", &format!("http://{}", gw.addr)])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(watcher.stdout.take().unwrap()).lines();
    let mut printed = Vec::new();
    for _ in 0..2 {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("a line within 30 s")
            .unwrap()
            .expect("the command goes on");
        printed.push(serde_json::from_str::<serde_json::Value>(&line).unwrap());
    }
    // OptOutChange in the proto3 JSON mapping: enums by their full names, instants in RFC 3339
    // with `Z`, an instant not reached yet left out.
    assert_eq!(printed[0]["requestId"], "cli-1");
    assert_eq!(printed[0]["state"], "DELIVERY_STATE_PENDING");
    assert_eq!(printed[0]["pkey"], pkey.as_str());
    assert_eq!(printed[0]["ccpaOptOut"], true);
    assert_eq!(printed[0]["source"], "REQUEST_SOURCE_WEB_FORM");
    assert!(printed[0]["cursor"].as_str().is_some_and(|c| !c.is_empty()));
    for instant in ["receivedAt", "changedAt"] {
        let at = printed[0][instant].as_str().unwrap();
        assert!(
            chrono::DateTime::parse_from_rfc3339(at).is_ok() && at.ends_with('Z'),
            "{instant}: {at}"
        );
    }
    assert!(printed[0].get("honoredAt").is_none(), "{}", printed[0]);
    assert_eq!(printed[1]["state"], "DELIVERY_STATE_APPLIED");
    assert!(printed[1]["honoredAt"].is_string());

    // Resumed from a cursor, it prints what follows it.
    let mut after = common::cli::ccpa_gateway()
        .args([
            "watch",
            "--addr",
            &format!("http://{}", gw.addr),
            "--after",
            printed[0]["cursor"].as_str().unwrap(),
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(after.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let resumed: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(resumed["cursor"], printed[1]["cursor"]);
}
