//! The opt-out ledger, through the gRPC API, on SQLite and on PostgreSQL alike: idempotent and
//! conflicting replays, PENDING then delivered, superseding, the protective read, permanent
//! failures, listing, the overdue clock.

use crate::common;

use common::set;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use acs_emulator::{Emulator, EmulatorConfig, Fault, FaultSettings, NewProfile};
use acs_profile_client::ManualClock;
use ccpa_gateway::backoff::Backoff;
use ccpa_gateway::health::DELIVERY_SERVICE_NAME;
use ccpa_gateway::optout::delivery::DeliverySettings;
use ccpa_gateway::proto::ccpa_v1::ccpa_service_client::CcpaServiceClient;
use ccpa_gateway::proto::ccpa_v1::{
    BulkSetOptOutRequest, CreateProfileRequest, DeliveryState, GetOptOutRecordRequest,
    GetOptOutRequest, ListOptOutRecordsRequest, OptOutRecord, RequestSource, SetOptOutRequest,
};
use ccpa_gateway::server::ServerOptions;
use ccpa_gateway::store::{Ledger, LedgerError};
use common::{
    GatewayBuilder, Store, acs_config, bulk, eventually, eventually_within, opt_out_of, record,
    until_settled,
};
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt;

on_both_stores!(
    a_replayed_request_id_answers_the_original_outcome_and_changes_nothing,
    a_request_id_reused_for_another_request_is_refused,
    acs_down_answers_pending_and_the_deliverer_applies_it_later,
    a_pending_opt_in_does_not_turn_the_answer_to_false,
    a_newer_request_supersedes_an_older_pending_one_and_a_late_older_one,
    an_unknown_profile_is_recorded_failed_with_the_reason,
    records_are_listed_newest_first_in_pages,
    requests_without_a_source_or_from_the_future_are_refused,
    overdue_requests_are_reported,
    a_creation_with_an_opt_out_is_recorded_and_replayed,
    a_request_by_email_replayed_with_other_content_is_refused,
    a_request_by_email_whose_lookup_failed_is_tried_again_when_replayed,
    a_newer_request_waits_while_an_older_one_may_still_be_on_its_way_to_acs,
    record_only_items_are_answered_once_recorded_and_delivered_later,
    a_record_only_backlog_is_watched_by_the_overdue_clock,
    a_record_only_item_is_due_for_the_deliverer_at_once,
);

/// Delivery tuned for tests: tries often, backs off little.
fn quick_delivery() -> ServerOptions {
    ServerOptions {
        delivery: DeliverySettings {
            lease: Duration::from_secs(3),
            poll_interval: Duration::from_millis(100),
            attempt_budget: Duration::from_millis(600),
            backoff: Backoff::LEDGER_DELIVERY
                .between(Duration::from_millis(100), Duration::from_millis(400))
                .unwrap(),
            clock_interval: Duration::from_millis(200),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// A gateway in front of a new emulator, on `store`, its deliverer quick to retry.
fn quick(store: Store) -> GatewayBuilder {
    common::gateway().store(store).options(quick_delivery())
}

fn ms_ago(ms: i64) -> prost_types::Timestamp {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    ms_before(i64::try_from(now.as_millis()).unwrap(), ms)
}

/// `ms` before `now_ms` (a ledger's clock, say).
fn ms_before(now_ms: i64, ms: i64) -> prost_types::Timestamp {
    let at = now_ms - ms;
    prost_types::Timestamp {
        seconds: at / 1000,
        nanos: i32::try_from((at % 1000) * 1_000_000).unwrap(),
    }
}

/// Waits until a record reaches `state`.
async fn until_state(
    client: &mut CcpaServiceClient<Channel>,
    request_id: &str,
    state: DeliveryState,
) -> OptOutRecord {
    until_state_within(client, request_id, state, common::PATIENCE).await
}

/// [`until_state`], failing after `patience`.
async fn until_state_within(
    client: &mut CcpaServiceClient<Channel>,
    request_id: &str,
    state: DeliveryState,
    patience: Duration,
) -> OptOutRecord {
    let what = format!("{request_id} to reach {state:?}");
    eventually_within(patience, &what, || {
        let mut client = client.clone();
        async move {
            // Not recorded yet is possible too: a call whose caller went away records in the
            // background.
            let found = client
                .get_opt_out_record(GetOptOutRecordRequest {
                    request_id: request_id.into(),
                })
                .await
                .map(|answer| answer.into_inner().record);
            match &found {
                Ok(Some(record)) if record.state == state as i32 => return Ok(record.clone()),
                Ok(_) => {}
                Err(status) => assert_eq!(status.code(), Code::NotFound, "{status:?}"),
            }
            Err(found)
        }
    })
    .await
}

/// Waits until the deliverer's health (which its overdue clock sets) is `status`.
async fn until_delivery_is(
    health: &HealthClient<Channel>,
    status: ServingStatus,
    patience: Duration,
    what: &str,
) {
    eventually_within(patience, what, || {
        let mut health = health.clone();
        async move {
            let now = health
                .check(HealthCheckRequest {
                    service: DELIVERY_SERVICE_NAME.into(),
                })
                .await
                .unwrap()
                .into_inner()
                .status;
            (now == status as i32).then_some(())
        }
    })
    .await;
}

fn acs_down() -> FaultSettings {
    FaultSettings {
        unavailable: 1.0,
        ..Default::default()
    }
}

async fn a_replayed_request_id_answers_the_original_outcome_and_changes_nothing(store: Store) {
    let gw = quick(store).start().await;
    let pkey = gw.emulator().insert_profile(NewProfile::default());

    let first = gw
        .client()
        .set_opt_out(set(&pkey, true, "replay-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.request_id, "replay-1");
    assert_eq!(first.state, DeliveryState::Applied as i32);
    let requests = gw.emulator().request_count();
    let recorded = record(&mut gw.client(), "replay-1").await;

    let again = gw
        .client()
        .set_opt_out(set(&pkey, true, "replay-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.state, DeliveryState::Applied as i32);
    assert!(again.ccpa_opt_out);
    assert_eq!(
        gw.emulator().request_count(),
        requests,
        "a replay calls nothing"
    );
    assert_eq!(
        record(&mut gw.client(), "replay-1").await,
        recorded,
        "and changes nothing"
    );

    // A generated id is answered, and works for replays too.
    let generated = gw
        .client()
        .set_opt_out(set(&pkey, false, ""))
        .await
        .unwrap()
        .into_inner();
    assert!(!generated.request_id.is_empty());
    let replayed = gw
        .client()
        .set_opt_out(set(&pkey, false, &generated.request_id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replayed.request_id, generated.request_id);
    assert_eq!(replayed.state, DeliveryState::Applied as i32);
}

async fn a_request_id_reused_for_another_request_is_refused(store: Store) {
    let gw = quick(store).start().await;
    let pkey = gw.emulator().insert_profile(NewProfile::default());
    gw.client()
        .set_opt_out(set(&pkey, true, "conflict-1"))
        .await
        .unwrap();
    let requests = gw.emulator().request_count();

    let status = gw
        .client()
        .set_opt_out(set(&pkey, false, "conflict-1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let violation = &status.get_details_bad_request().unwrap().field_violations[0];
    assert_eq!(violation.field, "request_id");
    assert_eq!(violation.reason, "REQUEST_ID_CONFLICT");
    assert_eq!(gw.emulator().request_count(), requests, "nothing sent");
    assert_eq!(gw.emulator().profile(&pkey).unwrap()["ccpaOptOut"], true);
    assert!(record(&mut gw.client(), "conflict-1").await.ccpa_opt_out);
}

async fn acs_down_answers_pending_and_the_deliverer_applies_it_later(store: Store) {
    let gw = quick(store).start().await;
    let pkey = gw.emulator().insert_profile(NewProfile::default());
    gw.emulator().set_faults(acs_down());

    let started = Instant::now();
    let mut request = tonic::Request::new(set(&pkey, true, "down-1"));
    request.set_timeout(Duration::from_secs(2));
    let answer = gw.client().set_opt_out(request).await.unwrap().into_inner();
    assert_eq!(answer.state, DeliveryState::Pending as i32);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "PENDING within the deadline"
    );
    assert_eq!(gw.emulator().profile(&pkey).unwrap()["ccpaOptOut"], false);

    // While pending, and with ACS down, reads give the protective answer.
    let read = opt_out_of(&mut gw.client(), &pkey).await;
    assert!(read.ccpa_opt_out && read.change_pending);

    let pending = record(&mut gw.client(), "down-1").await;
    assert_eq!(pending.state, DeliveryState::Pending as i32);
    assert!(pending.answered_at.is_some());
    assert!(
        pending.last_error.contains("ACS_UNAVAILABLE"),
        "{pending:?}"
    );

    gw.emulator().set_faults(FaultSettings::default());
    let applied = until_state(&mut gw.client(), "down-1", DeliveryState::Applied).await;
    assert!(applied.resolved_at.is_some());
    assert!(applied.attempts >= 2, "{applied:?}");
    assert_eq!(gw.emulator().profile(&pkey).unwrap()["ccpaOptOut"], true);
    let read = gw
        .client()
        .get_opt_out(GetOptOutRequest {
            pkey,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(read.ccpa_opt_out && !read.change_pending);
}

async fn a_pending_opt_in_does_not_turn_the_answer_to_false(store: Store) {
    let gw = quick(store).start().await;
    let pkey = gw.emulator().insert_profile(NewProfile {
        ccpa_opt_out: true,
        ..Default::default()
    });
    // Every attempt of the PATCH fails; reads work.
    for _ in 0..8 {
        gw.emulator().inject(Fault::html(503));
    }
    let answer = gw
        .client()
        .set_opt_out(set(&pkey, false, "opt-in-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.state, DeliveryState::Pending as i32);
    // Hold the profile's lease, as another replica delivering it would: the deliverer leaves the
    // opt-in pending until it is given back, so the reads below see it pending.
    let ledger = gw.ledger.clone();
    let lease = ledger.new_claim(MINUTE);
    eventually("the profile's lease", || async {
        ledger.claim(&pkey, &lease).await.unwrap().then_some(())
    })
    .await;
    gw.emulator().set_faults(acs_down());
    let read = gw
        .client()
        .get_opt_out(GetOptOutRequest {
            pkey: pkey.clone(),
            ..Default::default()
        })
        .await;
    assert!(
        read.is_err(),
        "without ACS there is no answer but the protective one"
    );
    gw.emulator().set_faults(FaultSettings::default());
    // ACS holds true until the opt-in reaches it: the answer stays true, pending.
    let read = opt_out_of(&mut gw.client(), &pkey).await;
    assert!(read.ccpa_opt_out && read.change_pending, "{read:?}");
    ledger.release(&pkey, &lease).await.unwrap();
    until_state(&mut gw.client(), "opt-in-1", DeliveryState::Applied).await;
    let read = gw
        .client()
        .get_opt_out(GetOptOutRequest {
            pkey,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!read.ccpa_opt_out && !read.change_pending);
}

async fn a_newer_request_supersedes_an_older_pending_one_and_a_late_older_one(store: Store) {
    let gw = quick(store).start().await;
    let pkey = gw.emulator().insert_profile(NewProfile::default());
    gw.emulator().set_faults(acs_down());

    let at = |ms: i64, value: bool, id: &str| SetOptOutRequest {
        received_at: Some(ms_ago(ms)),
        ..set(&pkey, value, id)
    };
    let older = gw
        .client()
        .set_opt_out(at(3_000, true, "order-older"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(older.state, DeliveryState::Pending as i32);
    let newer = gw
        .client()
        .set_opt_out(at(2_000, false, "order-newer"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(newer.state, DeliveryState::Pending as i32);
    let late = gw
        .client()
        .set_opt_out(at(5_000, true, "order-late"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        late.state,
        DeliveryState::Superseded as i32,
        "made before the newest"
    );

    let superseded = record(&mut gw.client(), "order-older").await;
    assert_eq!(superseded.state, DeliveryState::Superseded as i32);
    assert_eq!(superseded.superseded_by, "order-newer");
    assert_eq!(
        record(&mut gw.client(), "order-late").await.superseded_by,
        "order-newer"
    );

    let patches_before = gw.emulator().request_count();
    gw.emulator().set_faults(FaultSettings::default());
    until_state(&mut gw.client(), "order-newer", DeliveryState::Applied).await;
    assert_eq!(gw.emulator().profile(&pkey).unwrap()["ccpaOptOut"], false);
    // The superseded requests were never applied after it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(gw.emulator().profile(&pkey).unwrap()["ccpaOptOut"], false);
    let patches: Vec<_> = gw.emulator().requests()[patches_before..]
        .iter()
        .filter(|r| r.method == "PATCH")
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect();
    assert!(
        patches.iter().all(|p| p == r#"{"ccpaOptOut":false}"#),
        "{patches:?}"
    );
}

async fn an_unknown_profile_is_recorded_failed_with_the_reason(store: Store) {
    let gw = quick(store).start().await;
    let pkey = gw.emulator().insert_profile(NewProfile::default());
    gw.emulator().remove_profile(&pkey);
    let status = gw
        .client()
        .set_opt_out(set(&pkey, true, "gone-1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let failed = record(&mut gw.client(), "gone-1").await;
    assert_eq!(failed.state, DeliveryState::Failed as i32);
    assert_eq!(
        failed.failure_reason,
        "the profile does not exist in Adobe Campaign"
    );
    assert!(failed.resolved_at.is_some() && failed.answered_at.is_some());

    // The replay answers the same, without calling ACS.
    let requests = gw.emulator().request_count();
    let replayed = gw
        .client()
        .set_opt_out(set(&pkey, true, "gone-1"))
        .await
        .unwrap_err();
    assert_eq!(replayed.code(), Code::NotFound);
    assert_eq!(
        replayed.get_details_error_info().unwrap().reason,
        "REQUEST_FAILED"
    );
    assert_eq!(gw.emulator().request_count(), requests);
}

async fn records_are_listed_newest_first_in_pages(store: Store) {
    let gw = quick(store).start().await;
    let pkey = gw.emulator().insert_profile(NewProfile::default());
    let other = gw.emulator().insert_profile(NewProfile::default());
    for i in 0..7 {
        let request = SetOptOutRequest {
            received_at: Some(ms_ago(10_000 - i * 1_000)),
            ..set(&pkey, i % 2 == 0, &format!("list-{i}"))
        };
        gw.client().set_opt_out(request).await.unwrap();
    }
    gw.client()
        .set_opt_out(set(&other, true, "list-other"))
        .await
        .unwrap();

    let mut ids = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = gw
            .client()
            .list_opt_out_records(ListOptOutRecordsRequest {
                pkey: pkey.clone(),
                page_size: 3,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.records.len() <= 3);
        ids.extend(page.records.into_iter().map(|r| r.request_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    let expected: Vec<String> = (0..7).rev().map(|i| format!("list-{i}")).collect();
    assert_eq!(ids, expected, "newest request first, each once");

    // Filters: by state; a token is refused with other filters.
    let applied = gw
        .client()
        .list_opt_out_records(ListOptOutRecordsRequest {
            state: DeliveryState::Applied as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(applied.records.len(), 8);
    let first = gw
        .client()
        .list_opt_out_records(ListOptOutRecordsRequest {
            pkey: pkey.clone(),
            page_size: 3,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mismatched = gw
        .client()
        .list_opt_out_records(ListOptOutRecordsRequest {
            pkey: other,
            page_size: 3,
            page_token: first.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(mismatched.code(), Code::InvalidArgument);
    let window = gw
        .client()
        .list_opt_out_records(ListOptOutRecordsRequest {
            pkey,
            received_after: Some(ms_ago(8_500)),
            received_before: Some(ms_ago(5_500)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = window
        .records
        .iter()
        .map(|r| r.request_id.as_str())
        .collect();
    assert_eq!(ids, ["list-4", "list-3", "list-2"]);
}

fn assert_refused(result: Result<impl std::fmt::Debug, Status>, field: &str) {
    let status = result.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let fields: Vec<String> = status
        .get_details_bad_request()
        .unwrap()
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    assert_eq!(fields, [field]);
}

async fn requests_without_a_source_or_from_the_future_are_refused(store: Store) {
    let gw = quick(store).start().await;
    let pkey = gw.emulator().insert_profile(NewProfile::default());
    assert_refused(
        gw.client()
            .set_opt_out(SetOptOutRequest {
                source: RequestSource::Unspecified as i32,
                ..set(&pkey, true, "")
            })
            .await,
        "source",
    );
    assert_refused(
        gw.client()
            .set_opt_out(SetOptOutRequest {
                received_at: Some(ms_ago(-3_600_000)),
                ..set(&pkey, true, "")
            })
            .await,
        "received_at",
    );
    assert_refused(
        gw.client()
            .set_opt_out(set(&pkey, true, &"x".repeat(129)))
            .await,
        "request_id",
    );
    assert_refused(
        gw.client().set_opt_out(set(&pkey, true, "has space")).await,
        "request_id",
    );
    let mut with_caller = tonic::Request::new(set(&pkey, true, ""));
    with_caller
        .metadata_mut()
        .insert("x-ccpa-caller", "a b".parse().unwrap());
    assert_refused(gw.client().set_opt_out(with_caller).await, "x-ccpa-caller");
    assert_eq!(gw.emulator().request_count(), 0, "nothing sent");
    let listed = gw
        .client()
        .list_opt_out_records(ListOptOutRecordsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.records.is_empty(), "nothing recorded");
}

async fn overdue_requests_are_reported(store: Store) {
    let location = store.location.clone();
    let gw = quick(store).start().await;
    let pkey = gw.emulator().insert_profile(NewProfile::default());
    let mut health = HealthClient::new(gw.channel.clone());
    let delivery = || HealthCheckRequest {
        service: DELIVERY_SERVICE_NAME.into(),
    };
    assert_eq!(
        health.check(delivery()).await.unwrap().into_inner().status,
        ServingStatus::Serving as i32
    );

    gw.emulator().set_faults(acs_down());
    let mut caller = tonic::Request::new(SetOptOutRequest {
        received_at: Some(ms_ago(10 * 86_400_000)),
        source: RequestSource::GlobalPrivacyControl as i32,
        ..set(&pkey, true, "overdue-1")
    });
    caller
        .metadata_mut()
        .insert("x-ccpa-caller", "privacy-portal".parse().unwrap());
    let answer = gw.client().set_opt_out(caller).await.unwrap().into_inner();
    assert_eq!(answer.state, DeliveryState::Pending as i32);
    assert_eq!(
        record(&mut gw.client(), "overdue-1").await.caller,
        "privacy-portal"
    );

    // The deliverer's clock notices (it checks on its first round).
    until_delivery_is(
        &health,
        ServingStatus::NotServing,
        Duration::from_secs(10),
        "the clock to report it",
    )
    .await;

    let output = common::cli::ccpa_gateway()
        .args(["records", "--overdue", "--ledger", &location])
        .output()
        .await
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line: serde_json::Value = serde_json::from_str(
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(line["requestId"], "overdue-1");
    assert_eq!(line["state"], "PENDING");
    assert_eq!(line["source"], "GLOBAL_PRIVACY_CONTROL");
    assert_eq!(line["caller"], "privacy-portal");

    let export = common::cli::ccpa_gateway()
        .args([
            "records",
            "--ledger",
            &location,
            "export",
            "--since",
            "2000-01-01T00:00:00Z",
        ])
        .output()
        .await
        .unwrap();
    assert!(export.status.success());
    assert_eq!(String::from_utf8_lossy(&export.stdout).lines().count(), 1);
    // `--until` ends the range: a request made ten days ago is outside one ending eleven days
    // ago, inside one ending a week ago.
    let days_ago =
        |days: u32| humantime::format_rfc3339(SystemTime::now() - days * DAY).to_string();
    for (until, lines) in [(days_ago(11), 0), (days_ago(7), 1)] {
        let until = until.as_str();
        let export = common::cli::ccpa_gateway()
            .args([
                "records",
                "--ledger",
                &location,
                "export",
                "--since",
                "2000-01-01T00:00:00Z",
                "--until",
                until,
            ])
            .output()
            .await
            .unwrap();
        assert!(export.status.success());
        assert_eq!(
            String::from_utf8_lossy(&export.stdout).lines().count(),
            lines,
            "until {until}"
        );
    }

    // Delivered: no longer overdue.
    gw.emulator().set_faults(FaultSettings::default());
    until_state(&mut gw.client(), "overdue-1", DeliveryState::Applied).await;
    until_delivery_is(
        &health,
        ServingStatus::Serving,
        Duration::from_secs(70),
        "the clock to clear",
    )
    .await;
}

async fn a_creation_with_an_opt_out_is_recorded_and_replayed(store: Store) {
    let gw = quick(store).start().await;
    let creation = || CreateProfileRequest {
        email: "create-record@example.com".into(),
        ccpa_opt_out: Some(true),
        source: RequestSource::WebForm as i32,
        request_id: "create-1".into(),
        ..Default::default()
    };
    let created = gw
        .client()
        .create_profile(creation())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.request_id, "create-1");
    let profile = created.profile.unwrap();
    let recorded = record(&mut gw.client(), "create-1").await;
    assert_eq!(recorded.state, DeliveryState::Applied as i32);
    assert_eq!(recorded.pkey, profile.pkey);
    assert!(recorded.profile_creation);

    // A replay answers the same profile and creates nothing.
    let replayed = gw
        .client()
        .create_profile(creation())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replayed.profile.unwrap().pkey, profile.pkey);
    assert_eq!(gw.emulator().profile_count(), 1);

    // Without a source, a creation with an opt-out is refused.
    assert_refused(
        gw.client()
            .create_profile(CreateProfileRequest {
                source: RequestSource::Unspecified as i32,
                request_id: String::new(),
                ..creation()
            })
            .await,
        "source",
    );

    // A creation ACS refuses is FAILED, with its basis; the caller gets the error.
    for _ in 0..4 {
        gw.emulator().inject(Fault::html(503));
    }
    let status = gw
        .client()
        .create_profile(CreateProfileRequest {
            request_id: "create-2".into(),
            ..creation()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    let failed = record(&mut gw.client(), "create-2").await;
    assert_eq!(failed.state, DeliveryState::Failed as i32);
    assert!(
        failed.failure_reason.contains("did not create"),
        "{failed:?}"
    );
}

on_both_stores!(a_failed_attempt_is_tried_again_only_after_its_back_off);

/// Back-off on the ledger's clock: a request whose attempt failed is not tried again before its
/// back-off (from 5 to 10 s here, with jitter) has passed, and is once it has.
async fn a_failed_attempt_is_tried_again_only_after_its_back_off(store: Store) {
    let mut options = quick_delivery();
    options.delivery.backoff = Backoff::LEDGER_DELIVERY
        .between(Duration::from_secs(10), Duration::from_secs(10))
        .unwrap();
    let clock = Arc::new(ManualClock::new());
    let gw = common::gateway()
        .store(store)
        .options(options)
        .clock(clock.clone())
        .start()
        .await;
    let pkey = gw.emulator().insert_profile(NewProfile::default());
    gw.emulator().set_faults(acs_down());
    let answer = gw
        .client()
        .set_opt_out(set(&pkey, true, "backs-off"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.state, DeliveryState::Pending as i32);
    gw.emulator().set_faults(FaultSettings::default());

    // Past the lease (3 s) and the first-attempt window, short of the back-off.
    let requests = gw.emulator().request_count();
    clock.advance(Duration::from_secs(4));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        gw.emulator().request_count(),
        requests,
        "not tried again yet"
    );
    assert_eq!(
        record(&mut gw.client(), "backs-off").await.state,
        DeliveryState::Pending as i32
    );

    clock.advance(Duration::from_secs(7));
    until_state(&mut gw.client(), "backs-off", DeliveryState::Applied).await;
    assert_eq!(gw.emulator().profile(&pkey).unwrap()["ccpaOptOut"], true);
}

on_both_stores!(a_pending_request_is_overdue_after_its_business_days_on_the_clock);

/// The overdue clock counts business days on the ledger's clock: a request pending since a
/// Monday is not overdue on the Friday, and is by the next Monday, the weekend not counted.
async fn a_pending_request_is_overdue_after_its_business_days_on_the_clock(store: Store) {
    // Monday 2026-11-30, 10:00 UTC.
    let monday = UNIX_EPOCH + Duration::from_secs(1_796_032_800);
    let clock = Arc::new(ManualClock::at(monday));
    let gw = quick(store).clock(clock.clone()).start().await;
    let mut health = HealthClient::new(gw.channel.clone());
    let delivery = || HealthCheckRequest {
        service: DELIVERY_SERVICE_NAME.into(),
    };
    let pkey = gw.emulator().insert_profile(NewProfile::default());
    gw.emulator().set_faults(acs_down());
    let answer = gw
        .client()
        .set_opt_out(set(&pkey, true, "waits"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.state, DeliveryState::Pending as i32);

    // Friday 09:00: four business days. The deliverer's clock looks every 200 ms.
    clock.advance(4 * DAY - Duration::from_secs(3_600));
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        health.check(delivery()).await.unwrap().into_inner().status,
        ServingStatus::Serving as i32,
        "not overdue within its business days"
    );

    // The next Monday, 11:00: five business days and an hour.
    clock.advance(3 * DAY + Duration::from_secs(2 * 3_600));
    until_delivery_is(
        &health,
        ServingStatus::NotServing,
        Duration::from_secs(10),
        "the clock to report it",
    )
    .await;
}

on_both_stores!(only_records_past_their_retention_are_pruned_and_never_pending_ones);

async fn only_records_past_their_retention_are_pruned_and_never_pending_ones(store: Store) {
    use ccpa_gateway::optout::MIN_RETENTION;
    use ccpa_gateway::store::{Kind, NewRequest, Outcome, Recorded, Source};
    let clock = Arc::new(ManualClock::new());
    let ledger = store.open().await.with_clock(clock.clone());
    let three_years = 3 * 365 * 86_400_000_i64;
    let request = |id: &str, pkey: &str, received_at: i64| NewRequest {
        request_id: id.into(),
        kind: Kind::SetOptOut,
        pkey: Some(pkey.into()),
        opt_out: true,
        source: Source::PostalMail,
        received_at: Some(received_at),
        caller: "test".into(),
        first_attempt_window_ms: 0,
        parent_request_id: None,
        fingerprint: None,
        restores_request_id: None,
        email_sha256: None,
    };
    let now = ledger.now_ms();
    for (id, pkey, received_at, applied) in [
        ("old-applied", "@a", now - three_years, true),
        ("newer-applied", "@a", now - 2 * 86_400_000, true),
        ("old-pending", "@b", now - three_years, false),
        ("recent-applied", "@c", now - 86_400_000, true),
    ] {
        let (recorded, _) = ledger
            .record(&request(id, pkey, received_at), None)
            .await
            .unwrap();
        assert!(matches!(recorded, Recorded::New(_)));
        if applied {
            assert_eq!(
                ledger
                    .settle(id, Outcome::Applied { pkey: None }, true, None)
                    .await
                    .unwrap(),
                ccpa_gateway::store::Settled::Recorded
            );
        }
    }
    assert_eq!(
        ledger.prune(MIN_RETENTION).await.unwrap(),
        0,
        "retention counts from the response: a request made long ago but answered now is kept"
    );
    assert!(ledger.get("old-applied").await.unwrap().is_some());
    // A day short of the retention after the responses, they are kept; once it has passed, they
    // go.
    clock.advance(MIN_RETENTION - DAY);
    assert_eq!(ledger.prune(MIN_RETENTION).await.unwrap(), 0);
    clock.advance(DAY + Duration::from_secs(1));
    assert_eq!(ledger.prune(MIN_RETENTION).await.unwrap(), 1);
    assert!(ledger.get("old-applied").await.unwrap().is_none());
    for kept in ["newer-applied", "recent-applied"] {
        assert!(
            ledger.get(kept).await.unwrap().is_some(),
            "{kept}: a profile's latest request is what its opt-out stands on"
        );
    }
    assert!(
        ledger.get("old-pending").await.unwrap().is_some(),
        "pending is never pruned"
    );

    // A lease given back long ago names a profile: its row goes with a prune, unless the
    // profile still has a pending request. (A claim after that starts at generation 1 again.)
    // "@b" is the profile of "old-pending".
    for pkey in ["@lease-given-back", "@b"] {
        let claim = ledger.new_claim(MINUTE);
        assert!(ledger.claim(pkey, &claim).await.unwrap(), "{pkey}");
        ledger.release(pkey, &claim).await.unwrap();
    }
    ledger.prune(MIN_RETENTION).await.unwrap();
    let again = ledger.new_claim(MINUTE);
    assert!(ledger.claim("@lease-given-back", &again).await.unwrap());
    assert_eq!(
        again.generation(),
        Some(1),
        "the lapsed lease's row was pruned"
    );
    let kept = ledger.new_claim(MINUTE);
    assert!(ledger.claim("@b", &kept).await.unwrap());
    assert!(
        kept.generation() > Some(1),
        "the lease of a profile with a pending request is kept"
    );
}

on_both_stores!(a_caller_that_goes_away_does_not_interrupt_its_request);

/// tonic drops a handler when its caller cancels; the request's work must still end properly
/// (applied, recorded, the profile's lease given back) rather than wait for the deliverer.
async fn a_caller_that_goes_away_does_not_interrupt_its_request(store: Store) {
    // The clock stands still: the lease cannot lapse, so no one but the call can apply it.
    let gw = quick(store)
        .clock(Arc::new(ManualClock::new()))
        .start()
        .await;
    let pkey = gw.emulator().insert_profile(NewProfile::default());
    gw.emulator().set_faults(FaultSettings {
        latency: Duration::from_millis(300),
        ..Default::default()
    });
    let cancelled = tokio::time::timeout(
        Duration::from_millis(100),
        gw.client().set_opt_out(set(&pkey, true, "went-away")),
    )
    .await;
    assert!(cancelled.is_err(), "the caller gave up first");
    let applied = until_state(&mut gw.client(), "went-away", DeliveryState::Applied).await;
    assert_eq!(
        applied.attempts, 1,
        "applied by the call itself: {applied:?}"
    );
    assert_eq!(gw.emulator().profile(&pkey).unwrap()["ccpaOptOut"], true);
}

on_both_stores!(interrupted_requests_that_cannot_be_completed_later_fail_with_their_reason);

async fn interrupted_requests_that_cannot_be_completed_later_fail_with_their_reason(store: Store) {
    use ccpa_gateway::store::{Kind, NewRequest, Recorded, Source, State};
    let clock = Arc::new(ManualClock::new());
    let ledger = store.open().await.with_clock(clock.clone());
    let request = |id: &str, kind: Kind, pkey: Option<&str>, parent: Option<&str>| NewRequest {
        request_id: id.into(),
        kind,
        pkey: pkey.map(Into::into),
        opt_out: true,
        source: Source::Email,
        received_at: None,
        caller: "test".into(),
        first_attempt_window_ms: 0,
        parent_request_id: parent.map(Into::into),
        fingerprint: None,
        restores_request_id: None,
        email_sha256: None,
    };
    for new in [
        request("creation", Kind::CreateProfile, None, None),
        request("by-email", Kind::SetByEmail, None, None),
        request(
            "by-email:1",
            Kind::SetOptOut,
            Some("@one"),
            Some("by-email"),
        ),
        request("by-key", Kind::SetOptOut, Some("@two"), None),
    ] {
        let (recorded, _) = ledger.record(&new, None).await.unwrap();
        assert!(matches!(recorded, Recorded::New(_)));
    }
    clock.advance(Duration::from_secs(59));
    assert_eq!(
        ledger.fail_abandoned(60_000).await.unwrap(),
        0,
        "requests still within a lease may be in progress"
    );
    clock.advance(Duration::from_secs(2));
    assert_eq!(ledger.fail_abandoned(60_000).await.unwrap(), 2);
    for id in ["creation", "by-email"] {
        let record = ledger.get(id).await.unwrap().unwrap();
        assert_eq!(record.state, State::Failed, "{id}");
        assert!(
            record
                .failure_reason
                .as_deref()
                .unwrap()
                .contains("must retry"),
            "{record:?}"
        );
    }
    for id in ["by-email:1", "by-key"] {
        assert_eq!(
            ledger.get(id).await.unwrap().unwrap().state,
            State::Pending,
            "{id}: the deliverer completes it"
        );
    }
}

#[tokio::test]
async fn a_retention_under_24_months_is_refused() {
    for args in [
        &["serve", "--emulator", "--retention", "700days"][..],
        &["records", "prune", "--retention", "1day"][..],
    ] {
        let output = common::cli::ccpa_gateway()
            .args(args)
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("24 months"), "{stderr}");
    }
}

const MINUTE: Duration = Duration::from_secs(60);
const DAY: Duration = Duration::from_secs(86_400);

fn set_by_email(email: &str, opt_out: bool, request_id: &str) -> SetOptOutRequest {
    SetOptOutRequest {
        email: email.into(),
        ccpa_opt_out: Some(opt_out),
        request_id: request_id.into(),
        source: RequestSource::Email as i32,
        ..Default::default()
    }
}

fn profile_with_email(email: &str) -> NewProfile {
    NewProfile {
        email: email.into(),
        ..Default::default()
    }
}

/// The ledger keeps no address, yet a request id replayed with another address (or another
/// `create_if_missing`) is another request: refused, not answered as the first one.
async fn a_request_by_email_replayed_with_other_content_is_refused(store: Store) {
    let gw = quick(store).start().await;
    let pkey = gw
        .emulator()
        .insert_profile(profile_with_email("grace@example.com"));
    gw.emulator()
        .insert_profile(profile_with_email("other@example.com"));
    let first = gw
        .client()
        .set_opt_out(set_by_email("grace@example.com", true, "mail-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.state, DeliveryState::Applied as i32);
    assert_eq!(gw.emulator().profile(&pkey).unwrap()["ccpaOptOut"], true);
    let requests = gw.emulator().request_count();

    for other in [
        set_by_email("other@example.com", true, "mail-1"),
        SetOptOutRequest {
            create_if_missing: true,
            ..set_by_email("grace@example.com", true, "mail-1")
        },
    ] {
        let status = gw.client().set_opt_out(other).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        let violation = &status.get_details_bad_request().unwrap().field_violations[0];
        assert_eq!(violation.reason, "REQUEST_ID_CONFLICT");
    }
    // The same address, spelt in another case, is the same request.
    let replayed = gw
        .client()
        .set_opt_out(set_by_email("Grace@Example.com", true, "mail-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replayed.state, DeliveryState::Applied as i32);
    assert_eq!(replayed.profiles, first.profiles);
    assert_eq!(gw.emulator().request_count(), requests, "nothing sent");
}

/// A lookup that could not be made did nothing under its request id: replaying the id (say,
/// running a CSV file again) tries the request again. An address no profile has is an outcome:
/// replaying it answers it again.
async fn a_request_by_email_whose_lookup_failed_is_tried_again_when_replayed(store: Store) {
    let gw = quick(store).start().await;
    let pkey = gw
        .emulator()
        .insert_profile(profile_with_email("lin@example.com"));

    let unknown = gw
        .client()
        .set_opt_out(set_by_email("nobody@example.com", true, "nobody-1"))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    assert!(!unknown.message().contains("used before"), "{unknown:?}");
    assert_eq!(
        unknown.get_details_error_info().unwrap().reason,
        "EMAIL_NOT_FOUND"
    );
    let replayed = gw
        .client()
        .set_opt_out(set_by_email("nobody@example.com", true, "nobody-1"))
        .await
        .unwrap_err();
    assert_eq!(replayed.code(), Code::NotFound);
    assert!(replayed.message().contains("used before"), "{replayed:?}");

    gw.emulator().set_faults(acs_down());
    let mut request = tonic::Request::new(set_by_email("lin@example.com", true, "lin-1"));
    request.set_timeout(Duration::from_secs(2));
    let status = gw.client().set_opt_out(request).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded),
        "{status:?}"
    );
    let failed = record(&mut gw.client(), "lin-1").await;
    assert_eq!(failed.state, DeliveryState::Failed as i32);
    assert_eq!(gw.emulator().profile(&pkey).unwrap()["ccpaOptOut"], false);

    gw.emulator().set_faults(FaultSettings::default());
    let answer = gw
        .client()
        .set_opt_out(set_by_email("lin@example.com", true, "lin-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.state, DeliveryState::Applied as i32);
    assert_eq!(answer.profiles.len(), 1);
    assert_eq!(answer.profiles[0].request_id, "lin-1:1");
    assert_eq!(gw.emulator().profile(&pkey).unwrap()["ccpaOptOut"], true);
    let reopened = record(&mut gw.client(), "lin-1").await;
    assert_eq!(reopened.state, DeliveryState::Applied as i32);
    assert!(reopened.attempts >= 1, "{reopened:?}");
    assert!(
        !reopened.last_error.is_empty(),
        "the earlier failure is kept: {reopened:?}"
    );

    // Once it reached its profiles, a replay answers that outcome and sends nothing.
    let requests = gw.emulator().request_count();
    let again = gw
        .client()
        .set_opt_out(set_by_email("lin@example.com", true, "lin-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.state, DeliveryState::Applied as i32);
    assert_eq!(gw.emulator().request_count(), requests);
}

/// A PATCH that timed out may still be on its way through ACS. Until the profile's lease lapses,
/// no newer request is sent, so that the older one cannot land after it.
async fn a_newer_request_waits_while_an_older_one_may_still_be_on_its_way_to_acs(store: Store) {
    let clock = Arc::new(ManualClock::new());
    let gw = quick(store).clock(clock.clone()).start().await;
    let pkey = gw.emulator().insert_profile(NewProfile::default());
    gw.emulator().set_faults(FaultSettings {
        latency: Duration::from_secs(2),
        ..Default::default()
    });
    // On the gateway's clock: it stands still, and the newer request is made at its now.
    let mut older = tonic::Request::new(SetOptOutRequest {
        received_at: Some(ms_before(gw.ledger.now_ms(), 1_000)),
        ..set(&pkey, true, "in-flight-1")
    });
    older.set_timeout(Duration::from_millis(700));
    let answer = gw.client().set_opt_out(older).await.unwrap().into_inner();
    assert_eq!(answer.state, DeliveryState::Pending as i32);

    gw.emulator().set_faults(FaultSettings::default());
    let mut newer = tonic::Request::new(set(&pkey, false, "after-1"));
    newer.set_timeout(Duration::from_secs(2));
    let answer = gw.client().set_opt_out(newer).await.unwrap().into_inner();
    assert_eq!(
        answer.state,
        DeliveryState::Pending as i32,
        "not sent while the older PATCH may still land"
    );
    // The older PATCH ends at ACS. Past both requests' back-off and first-attempt window, but
    // within the lease (3 s), the deliverer, polling all the while, sends nothing newer.
    until_acs_is_idle(gw.emulator()).await;
    let patches = gw.emulator().request_count();
    clock.advance(Duration::from_secs(1));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        record(&mut gw.client(), "after-1").await.state,
        DeliveryState::Pending as i32
    );
    assert_eq!(gw.emulator().request_count(), patches, "nothing sent");

    // Once the lease has lapsed, the newer request is applied, and the older never.
    clock.advance(quick_delivery().delivery.lease);
    until_state(&mut gw.client(), "after-1", DeliveryState::Applied).await;
    until_state(&mut gw.client(), "in-flight-1", DeliveryState::Superseded).await;
    assert_eq!(gw.emulator().profile(&pkey).unwrap()["ccpaOptOut"], false);
}

/// Waits until ACS handles no request: every PATCH sent has landed or died.
async fn until_acs_is_idle(emulator: &Emulator) {
    eventually("every request to ACS to end", || {
        std::future::ready((emulator.active_requests() == 0).then_some(()))
    })
    .await;
}

/// Waits until ACS has received a `method` request.
async fn until_sent(emulator: &Emulator, method: &str) {
    eventually_within(
        Duration::from_secs(5),
        &format!("the {method} to be sent"),
        || {
            std::future::ready(
                emulator
                    .requests()
                    .iter()
                    .any(|r| r.method == method)
                    .then_some(()),
            )
        },
    )
    .await;
}

on_both_stores!(a_patch_held_up_past_its_lease_cannot_land_after_a_newer_applied_request);

/// A call's attempt may last longer than the profile's lease (the attempt budget and the
/// caller's deadline allow 10 s here, the lease 2 s). A PATCH held up in ACS must then be
/// abandoned before the lease can lapse: otherwise a newer request, sent once the lease has
/// lapsed, is applied first and the held-up older one lands after it, leaving ACS with the older
/// value while the ledger says the newer one is APPLIED.
async fn a_patch_held_up_past_its_lease_cannot_land_after_a_newer_applied_request(store: Store) {
    let mut options = quick_delivery();
    options.delivery.lease = Duration::from_secs(2);
    options.delivery.attempt_budget = Duration::from_secs(10);
    // The deliverer does not try the older request again before the newer one arrives.
    options.delivery.backoff = Backoff::LEDGER_DELIVERY
        .between(Duration::from_secs(30), Duration::from_secs(30))
        .unwrap();
    let clock = Arc::new(ManualClock::new());
    let gw = common::gateway()
        .store(store)
        .options(options)
        .clock(clock.clone())
        .start()
        .await;
    let pkey = gw.emulator().insert_profile(NewProfile::default());

    // The older request's PATCH is held up in ACS for 4 s before ACS handles it.
    gw.emulator().inject(Fault::Delay(Duration::from_secs(4)));
    let mut older = tonic::Request::new(SetOptOutRequest {
        received_at: Some(ms_before(gw.ledger.now_ms(), 1_000)),
        ..set(&pkey, true, "held-up")
    });
    older.set_timeout(Duration::from_secs(10));
    let older = gw.client().set_opt_out(older).await.unwrap().into_inner();
    assert_eq!(
        older.state,
        DeliveryState::Pending as i32,
        "abandoned before its lease could lapse"
    );

    // Once its lease has lapsed, a newer request is applied.
    clock.advance(Duration::from_millis(2_300));
    let mut newer = tonic::Request::new(set(&pkey, false, "newer"));
    newer.set_timeout(Duration::from_secs(5));
    gw.client().set_opt_out(newer).await.unwrap();
    until_state(&mut gw.client(), "newer", DeliveryState::Applied).await;

    // Once the held-up PATCH has ended at ACS: ACS holds the newer request.
    until_acs_is_idle(gw.emulator()).await;
    until_state(&mut gw.client(), "held-up", DeliveryState::Superseded).await;
    assert_eq!(gw.emulator().profile(&pkey).unwrap()["ccpaOptOut"], false);
}

/// A SQLite ledger is for one gateway: a second one on the same file refuses to start, naming
/// the way to run several.
#[tokio::test]
async fn a_second_gateway_on_one_sqlite_ledger_refuses_to_start() {
    let store = Store::sqlite();
    let emulator = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let _first = common::gateway()
        .calling(acs_config(&emulator))
        .ledger_at(&store.location)
        .options(quick_delivery())
        .start()
        .await;
    let second = common::gateway()
        .calling(acs_config(&emulator))
        .ledger_at(&store.location)
        .options(quick_delivery())
        .start()
        .await;
    let refused = tokio::time::timeout(Duration::from_secs(5), second.stopped())
        .await
        .expect("the second gateway stops at once")
        .unwrap_err();
    let message = refused.to_string();
    assert!(message.contains("already serves"), "{message}");
    assert!(message.contains("PostgreSQL"), "{message}");
}

on_both_stores!(an_attempt_whose_lease_was_taken_over_settles_nothing);

/// The fencing token: an attempt settled after its lease lapsed and another claim took the
/// profile records nothing, and cannot give the new holder's lease back.
async fn an_attempt_whose_lease_was_taken_over_settles_nothing(store: Store) {
    use ccpa_gateway::store::{Kind, NewRequest, Outcome, Settled, Source, State};
    let clock = Arc::new(ManualClock::new());
    let ledger = store.open().await.with_clock(clock.clone());
    let pkey = "@fencing-profile";
    let request = NewRequest {
        request_id: "fenced".into(),
        kind: Kind::SetOptOut,
        pkey: Some(pkey.into()),
        opt_out: true,
        source: Source::WebForm,
        received_at: None,
        caller: "test".into(),
        first_attempt_window_ms: 0,
        parent_request_id: None,
        fingerprint: None,
        restores_request_id: None,
        email_sha256: None,
    };
    let first = ledger.new_claim(MINUTE);
    let (_, claimed) = ledger.record(&request, Some(&first)).await.unwrap();
    assert!(claimed);
    let first_generation = first.generation().unwrap();

    // Within the lease, no one else takes the profile.
    clock.advance(MINUTE - Duration::from_secs(1));
    assert!(!ledger.claim(pkey, &ledger.new_claim(MINUTE)).await.unwrap());
    // The first lease lapses; another claim takes the profile.
    clock.advance(Duration::from_secs(2));
    let second = ledger.new_claim(MINUTE);
    assert!(ledger.claim(pkey, &second).await.unwrap());
    assert!(second.generation().unwrap() > first_generation);

    let settled = ledger
        .settle(
            "fenced",
            Outcome::Applied { pkey: None },
            false,
            Some((pkey, &first)),
        )
        .await
        .unwrap();
    assert_eq!(settled, Settled::LeaseLost);
    assert_eq!(
        ledger.get("fenced").await.unwrap().unwrap().state,
        State::Pending
    );
    // The second claim still holds the profile: a third cannot take it.
    assert!(!ledger.claim(pkey, &ledger.new_claim(MINUTE)).await.unwrap());

    // Its holder settles, and gives the lease back: the next claim gets a higher generation.
    let settled = ledger
        .settle(
            "fenced",
            Outcome::Applied { pkey: None },
            false,
            Some((pkey, &second)),
        )
        .await
        .unwrap();
    assert_eq!(settled, Settled::Recorded);
    let third = ledger.new_claim(MINUTE);
    assert!(ledger.claim(pkey, &third).await.unwrap());
    assert!(third.generation().unwrap() > second.generation().unwrap());
}

/// On PostgreSQL, recording a profile's request waits for that profile's advisory lock. A burst
/// of calls for one profile, while another replica holds that lock in a slow transaction, must
/// not take every pooled connection while they wait: reads of other profiles are answered
/// meanwhile, each within a second, and the burst is recorded once the lock is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_for_one_profile_does_not_starve_calls_for_others_on_postgres() {
    use sqlx::Connection;
    let store = Store::postgres().await;
    let emulator = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let hot = emulator.insert_profile(NewProfile::default());
    let others: Vec<String> = (0..20)
        .map(|_| emulator.insert_profile(NewProfile::default()))
        .collect();
    let gateway = common::gateway()
        .calling(acs_config(&emulator))
        .ledger_at(&store.location)
        .options(quick_delivery())
        .start()
        .await;
    let addr = gateway.addr;
    let client = gateway.client();
    // The other profiles' caller is another service, on a connection of its own.
    let mut reader = CcpaServiceClient::new(common::connect(addr).await);

    // Another replica, in a slow transaction, holds the hot profile's lock until the reads
    // below are answered.
    let (locked, is_locked) = oneshot::channel();
    let (release, released) = oneshot::channel::<()>();
    let (location, profile) = (store.location.clone(), hot.clone());
    let slow = tokio::spawn(async move {
        let mut replica = sqlx::PgConnection::connect(&location).await.unwrap();
        let mut transaction = replica.begin().await.unwrap();
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))::text")
            .bind(&profile)
            .fetch_one(&mut *transaction)
            .await
            .unwrap();
        locked.send(()).unwrap();
        released.await.unwrap();
        transaction.commit().await.unwrap();
    });
    is_locked.await.unwrap();

    let burst: Vec<_> = (0..200)
        .map(|n| {
            let mut client = client.clone();
            let hot = hot.clone();
            tokio::spawn(async move {
                let mut request = tonic::Request::new(set(&hot, n % 2 == 0, &format!("burst-{n}")));
                request.set_timeout(Duration::from_secs(60));
                client.set_opt_out(request).await
            })
        })
        .collect();
    // The burst is waiting for the lock (in this test's database) before the reads begin.
    let watcher = sqlx::PgPool::connect(&store.location).await.unwrap();
    eventually("the burst to wait for the hot profile's lock", || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .fetch_one(&watcher)
        .await
        .unwrap();
        (waiting > 0).then_some(())
    })
    .await;
    for pkey in &others {
        let mut request = tonic::Request::new(GetOptOutRequest {
            pkey: pkey.clone(),
            ..Default::default()
        });
        request.set_timeout(Duration::from_secs(1));
        let answer = reader.get_opt_out(request).await;
        assert!(answer.is_ok(), "a read of another profile: {answer:?}");
    }
    release.send(()).unwrap();
    slow.await.unwrap();
    for call in burst {
        let answer = call.await.unwrap();
        assert!(answer.is_ok(), "{answer:?}");
    }
}

on_both_stores!(requests_left_pending_by_an_earlier_run_are_protective_from_the_start);

/// A gateway starting on a ledger that holds pending requests gives the protective answer for
/// their profiles from its first call, before and after its deliverer's first round.
async fn requests_left_pending_by_an_earlier_run_are_protective_from_the_start(store: Store) {
    use ccpa_gateway::store::{Kind, NewRequest, Recorded, Source};
    let emulator = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let pkey = emulator.insert_profile(NewProfile::default());
    let other = emulator.insert_profile(NewProfile::default());
    {
        let earlier_run = store.open().await;
        // The earlier run holds the profile's lease (as a gateway that died mid-attempt would,
        // until it lapses): the request stays pending here while ACS works.
        let lease = earlier_run.new_claim(MINUTE);
        let (recorded, claimed) = earlier_run
            .record(
                &NewRequest {
                    request_id: "left-pending".into(),
                    kind: Kind::SetOptOut,
                    pkey: Some(pkey.clone()),
                    opt_out: true,
                    source: Source::WebForm,
                    received_at: None,
                    caller: "test".into(),
                    first_attempt_window_ms: 0,
                    parent_request_id: None,
                    fingerprint: None,
                    restores_request_id: None,
                    email_sha256: None,
                },
                Some(&lease),
            )
            .await
            .unwrap();
        assert!(matches!(recorded, Recorded::New(_)) && claimed);
    }
    let gateway = common::gateway()
        .calling(acs_config(&emulator))
        .ledger_at(&store.location)
        .options(quick_delivery())
        .start()
        .await;
    let mut client = gateway.client();
    for round in 0..2 {
        let read = opt_out_of(&mut client, &pkey).await;
        assert!(read.ccpa_opt_out && read.change_pending, "round {round}");
        let unrelated = opt_out_of(&mut client, &other).await;
        assert!(!unrelated.ccpa_opt_out && !unrelated.change_pending);
        // After a few of the deliverer's rounds (each refreshes what may be pending).
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn record_only(item: SetOptOutRequest) -> BulkSetOptOutRequest {
    BulkSetOptOutRequest {
        item: Some(item),
        record_only: true,
    }
}

async fn record_only_items_are_answered_once_recorded_and_delivered_later(store: Store) {
    let gw = quick(store).start().await;
    let keys: Vec<String> = (0..40)
        .map(|_| gw.emulator().insert_profile(NewProfile::default()))
        .collect();
    let items = || -> Vec<BulkSetOptOutRequest> {
        keys.iter()
            .enumerate()
            .map(|(i, pkey)| record_only(set(pkey, true, &format!("record-only-{i}"))))
            .collect()
    };
    let by_email = record_only(SetOptOutRequest {
        email: "ada@example.com".into(),
        ..set("", true, "record-only-by-email")
    });

    // Adobe is down throughout the intake: a record-only item does not wait for it.
    gw.emulator().set_faults(acs_down());
    let mut stream = items();
    stream.push(by_email);
    let answers = bulk(&mut gw.client(), stream).await;
    assert_eq!(answers.len(), keys.len() + 1);
    for answer in &answers {
        let index = usize::try_from(answer.index).unwrap();
        if index == keys.len() {
            // Only by key: an email's profiles must be looked up first.
            let error = answer.error.as_ref().unwrap();
            assert_eq!(error.code, "INVALID_ARGUMENT", "{error:?}");
            assert_eq!(error.fields, ["record_only"]);
            continue;
        }
        assert!(answer.error.is_none(), "{answer:?}");
        assert_eq!(answer.request_id, format!("record-only-{index}"));
        assert_eq!(answer.state, DeliveryState::Pending as i32, "{answer:?}");
        assert_eq!(answer.profiles.len(), 1);
        assert_eq!(answer.profiles[0].pkey, keys[index]);
        assert_eq!(answer.profiles[0].state, DeliveryState::Pending as i32);
    }
    let refused = gw
        .client()
        .get_opt_out_record(GetOptOutRecordRequest {
            request_id: "record-only-by-email".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        Code::NotFound,
        "the refused item recorded nothing"
    );
    let recorded = record(&mut gw.client(), "record-only-0").await;
    assert!(recorded.answered_at.is_some(), "answered when recorded");
    // Pending and opted out: the protective read says so while Adobe cannot.
    assert!(opt_out_of(&mut gw.client(), &keys[0]).await.ccpa_opt_out);

    // Adobe is back: the deliverer applies every one.
    gw.emulator().set_faults(FaultSettings::default());
    until_settled(&mut gw.client()).await;
    for (i, pkey) in keys.iter().enumerate() {
        assert_eq!(gw.emulator().profile(pkey).unwrap()["ccpaOptOut"], true);
        let applied = record(&mut gw.client(), &format!("record-only-{i}")).await;
        assert_eq!(applied.state, DeliveryState::Applied as i32, "{applied:?}");
    }

    // The same items again: each answered as recorded, nothing recorded or sent twice.
    let requests = gw.emulator().request_count();
    let again = bulk(&mut gw.client(), items()).await;
    assert_eq!(again.len(), keys.len());
    for answer in again {
        assert!(answer.error.is_none(), "{answer:?}");
        assert_eq!(answer.state, DeliveryState::Applied as i32, "{answer:?}");
    }
    let listed = gw
        .client()
        .list_opt_out_records(ListOptOutRecordsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    assert_eq!(listed.len(), keys.len());
    assert_eq!(
        gw.emulator().request_count(),
        requests,
        "a replay calls nothing"
    );
}

async fn a_record_only_backlog_is_watched_by_the_overdue_clock(store: Store) {
    let gw = quick(store).start().await;
    let health = HealthClient::new(gw.channel.clone());
    gw.emulator().set_faults(acs_down());
    let pkey = gw.emulator().insert_profile(NewProfile::default());
    let answers = bulk(
        &mut gw.client(),
        vec![record_only(SetOptOutRequest {
            received_at: Some(ms_ago(10 * 86_400_000)),
            ..set(&pkey, true, "backlog-overdue")
        })],
    )
    .await;
    assert_eq!(
        answers[0].state,
        DeliveryState::Pending as i32,
        "{answers:?}"
    );

    until_delivery_is(
        &health,
        ServingStatus::NotServing,
        Duration::from_secs(10),
        "the clock to report the backlog",
    )
    .await;
    let output = common::cli::ccpa_gateway()
        .args(["records", "--overdue", "--ledger", &gw.store().location])
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(6));
    assert!(String::from_utf8_lossy(&output.stdout).contains("backlog-overdue"));

    gw.emulator().set_faults(FaultSettings::default());
    until_state(&mut gw.client(), "backlog-overdue", DeliveryState::Applied).await;
}

async fn a_record_only_item_is_due_for_the_deliverer_at_once(store: Store) {
    // A call has a minute to apply its own request before the deliverer may take it over; a
    // record-only item has no call applying it, so it must not wait for that minute.
    let emulator = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let mut options = quick_delivery();
    options.delivery.attempt_budget = Duration::from_secs(60);
    options.delivery.lease = Duration::from_secs(120);
    let gateway = common::gateway()
        .calling(acs_config(&emulator))
        .ledger_at(&store.location)
        .options(options)
        .start()
        .await;
    let mut client = gateway.client();
    let pkey = emulator.insert_profile(NewProfile::default());
    let answers = bulk(
        &mut client,
        vec![record_only(set(&pkey, true, "record-only-due"))],
    )
    .await;
    assert_eq!(
        answers[0].state,
        DeliveryState::Pending as i32,
        "{answers:?}"
    );
    // Within until_state's 20 s, a third of the window a call would have had.
    until_state(&mut client, "record-only-due", DeliveryState::Applied).await;
    assert_eq!(emulator.profile(&pkey).unwrap()["ccpaOptOut"], true);
}

on_both_stores!(an_opt_in_stamped_in_the_future_does_not_overtake_a_later_opt_out);

/// A portal whose clock runs 50 s fast stamps an opt-in 50 s ahead; 20 s later the consumer's
/// Global Privacy Control opt-out arrives without `received_at`. Ordered by the stamp as given,
/// the opt-in would overtake the opt-out (SUPERSEDED at once) and the consumer would read as
/// not opted out. Ordered by `min(received_at, the ledger's clock at recording)`, the opt-out is
/// the newer request. The stated instant is still what the record shows.
async fn an_opt_in_stamped_in_the_future_does_not_overtake_a_later_opt_out(store: Store) {
    let clock = Arc::new(ManualClock::new());
    let gw = quick(store).clock(clock.clone()).start().await;
    let pkey = gw.emulator().insert_profile(NewProfile {
        ccpa_opt_out: true,
        ..Default::default()
    });
    let mut client = gw.client();

    let stated_ms = gw.ledger.now_ms() + 50_000;
    let opt_in = SetOptOutRequest {
        received_at: Some(ms_before(stated_ms, 0)),
        ..set(&pkey, false, "fast-clock-opt-in")
    };
    client.set_opt_out(opt_in).await.unwrap();
    until_state(&mut client, "fast-clock-opt-in", DeliveryState::Applied).await;

    clock.advance(Duration::from_secs(20));
    let opt_out = SetOptOutRequest {
        source: RequestSource::GlobalPrivacyControl as i32,
        ..set(&pkey, true, "gpc-opt-out")
    };
    let answer = client.set_opt_out(opt_out).await.unwrap().into_inner();
    assert_eq!(
        answer.state,
        DeliveryState::Applied as i32,
        "the later opt-out is applied, not overtaken: {answer:?}"
    );
    let read = client
        .get_opt_out(GetOptOutRequest {
            pkey: pkey.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(read.ccpa_opt_out, "{read:?}");
    assert_eq!(gw.emulator().profile(&pkey).unwrap()["ccpaOptOut"], true);

    // The caller's stated instant is kept as given, for the records.
    let opt_in = record(&mut client, "fast-clock-opt-in").await;
    assert_eq!(opt_in.received_at, Some(ms_before(stated_ms, 0)));
}

on_both_stores!(a_creation_given_up_as_abandoned_still_records_its_key_when_acs_answers);

/// A creation whose POST is held up in ACS while the ledger's clock runs past its lease is
/// FAILED as abandoned by the deliverer. When ACS then answers "created with the opt-out", the
/// record must end APPLIED with the profile's key: otherwise no read or reconciliation would
/// ever protect that profile.
async fn a_creation_given_up_as_abandoned_still_records_its_key_when_acs_answers(store: Store) {
    let mut options = quick_delivery();
    // Real time for the held POST: a creation gets half a lease (5 s) to complete.
    options.delivery.lease = Duration::from_secs(10);
    let clock = Arc::new(ManualClock::new());
    let gw = quick(store)
        .options(options)
        .clock(clock.clone())
        .start()
        .await;
    gw.emulator().inject(Fault::Delay(Duration::from_secs(2)));
    let mut client = gw.client();
    let creating = tokio::spawn(async move {
        client
            .create_profile(CreateProfileRequest {
                email: "held-creation@example.com".into(),
                ccpa_opt_out: Some(true),
                source: RequestSource::WebForm as i32,
                request_id: "held-creation".into(),
                ..Default::default()
            })
            .await
    });

    // While ACS holds the POST, the ledger's clock passes the lease: the deliverer gives the
    // creation up as abandoned.
    until_sent(gw.emulator(), "POST").await;
    clock.advance(Duration::from_secs(11));
    until_state(&mut gw.client(), "held-creation", DeliveryState::Failed).await;

    // ACS answers: the caller hears "created", and the record holds the key.
    let created = creating.await.unwrap().unwrap().into_inner();
    let pkey = created.profile.unwrap().pkey;
    assert!(!pkey.is_empty());
    let recorded = record(&mut gw.client(), "held-creation").await;
    assert_eq!(
        recorded.state,
        DeliveryState::Applied as i32,
        "{recorded:?}"
    );
    assert_eq!(recorded.pkey, pkey);
    let read = gw
        .client()
        .get_opt_out(GetOptOutRequest {
            pkey: pkey.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(read.ccpa_opt_out);
    assert_eq!(
        read.latest_request.map(|latest| latest.request_id),
        Some("held-creation".to_owned()),
        "the profile's latest request is its creation"
    );
}

on_both_stores!(
    requests_backing_off_from_an_outage_are_due_once_a_call_gets_an_answer,
    after_an_outage_a_probe_finds_acs_back_and_the_pending_opt_out_is_applied,
);

/// Delivery whose back-off is long on the ledger's (manual) clock: a request backing off is due
/// again only if something makes it due.
fn long_backoff() -> ServerOptions {
    let mut options = quick_delivery();
    options.delivery.backoff = Backoff::LEDGER_DELIVERY
        .between(Duration::from_secs(60), Duration::from_secs(600))
        .unwrap();
    options
}

/// A request backing off because ACS was down becomes due as soon as any call gets an answer
/// from ACS again; one backing off for another reason (ACS refused it) waits out its back-off.
async fn requests_backing_off_from_an_outage_are_due_once_a_call_gets_an_answer(store: Store) {
    let clock = Arc::new(ManualClock::new());
    let gw = quick(store)
        .options(long_backoff())
        .clock(clock.clone())
        .start()
        .await;
    let refused = gw.emulator().insert_profile(NewProfile::default());
    let waiting = gw.emulator().insert_profile(NewProfile::default());
    let other = gw.emulator().insert_profile(NewProfile::default());
    let mut client = gw.client();

    // ACS refuses one request (400, which is not retried): it backs off for a minute of the
    // ledger's clock.
    gw.emulator().inject(Fault::json(
        400,
        serde_json::json!({"code": 400, "message": "refused"}),
    ));
    let answer = client
        .set_opt_out(set(&refused, true, "refused"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.state, DeliveryState::Pending as i32);

    // An outage: another request backs off too.
    gw.emulator().set_faults(FaultSettings {
        unavailable: 1.0,
        ..Default::default()
    });
    let answer = client
        .set_opt_out(set(&waiting, true, "during-outage"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.state, DeliveryState::Pending as i32);
    // The PATCH may still be on its way: the profile's lease is kept until it lapses, which the
    // back-off outlasts.
    clock.advance(Duration::from_secs(4));

    // ACS is back, and a read gets an answer: the request backing off from the outage is
    // applied, the ledger's clock unmoved.
    gw.emulator().set_faults(FaultSettings::default());
    client
        .get_opt_out(GetOptOutRequest {
            pkey: other,
            ..Default::default()
        })
        .await
        .unwrap();
    // Due once ACS answered: applied within 5 s of real time, the ledger's clock unmoved.
    until_state_within(
        &mut client,
        "during-outage",
        DeliveryState::Applied,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(gw.emulator().profile(&waiting).unwrap()["ccpaOptOut"], true);
    // The refused one still waits out its back-off.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let still = record(&mut client, "refused").await;
    assert_eq!(still.state, DeliveryState::Pending as i32, "{still:?}");
}

/// After a 40 s outage (on the ledger's clock, the deliverer failing all along and backing off
/// further each time), a pending opt-out is applied within seconds of ACS answering, with no
/// call to the gateway meanwhile: the gateway probes ACS while it is unavailable.
async fn after_an_outage_a_probe_finds_acs_back_and_the_pending_opt_out_is_applied(store: Store) {
    let clock = Arc::new(ManualClock::new());
    let mut options = quick_delivery();
    options.delivery.backoff = Backoff::LEDGER_DELIVERY
        .between(Duration::from_secs(1), Duration::from_secs(300))
        .unwrap();
    let gw = quick(store)
        .options(options)
        .clock(clock.clone())
        .start()
        .await;
    let pkey = gw.emulator().insert_profile(NewProfile::default());
    let mut client = gw.client();

    gw.emulator().set_faults(FaultSettings {
        unavailable: 1.0,
        ..Default::default()
    });
    let answer = client
        .set_opt_out(set(&pkey, true, "outage"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.state, DeliveryState::Pending as i32);
    // 40 s of outage on the ledger's clock, the deliverer trying whenever the request is due.
    for _ in 0..40 {
        clock.advance(Duration::from_secs(1));
        tokio::time::sleep(Duration::from_millis(120)).await;
    }
    // Still down, the clock standing: an attempt the moving clock cut short (not sent, due again
    // at once) is made and fails, so that the request surely waits out a back-off.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let before = record(&mut client, "outage").await;
    assert_eq!(before.state, DeliveryState::Pending as i32);
    assert!(
        before.attempts >= 3,
        "the deliverer kept trying: {before:?}"
    );

    gw.emulator().set_faults(FaultSettings::default());
    // Applied within seconds (6, of real time) of ACS answering, the ledger's clock unmoved.
    until_state_within(
        &mut client,
        "outage",
        DeliveryState::Applied,
        Duration::from_secs(6),
    )
    .await;
    assert_eq!(gw.emulator().profile(&pkey).unwrap()["ccpaOptOut"], true);
}

/// The exclusive hold on a SQLite ledger lasts as long as any of the gateway's work can still
/// write to it: work that a call whose caller went away left running to completion is such work.
/// A second gateway that took the file before that work recorded its outcome would learn the
/// ledger without it.
#[tokio::test]
async fn a_sqlite_ledger_stays_held_while_work_a_cancelled_call_left_running_can_write() {
    let store = Store::sqlite();
    let emulator = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let pkey = emulator.insert_profile(NewProfile::default());
    // The call has 10 s to apply its request.
    let mut options = quick_delivery();
    options.delivery.attempt_budget = Duration::from_secs(10);
    options.delivery.lease = Duration::from_secs(30);
    // The drain gives up on that work long before it ends: `serve` returns while it runs.
    options.shutdown.drain_timeout = Duration::from_millis(300);
    let gw = common::gateway()
        .calling(acs_config(&emulator))
        .ledger_at(&store.location)
        .options(options)
        .start()
        .await;

    // ACS takes 3 s over the PATCH; the caller goes away once it is sent.
    emulator.inject(Fault::Delay(Duration::from_secs(3)));
    let mut client = gw.client();
    let call = tokio::spawn(async move {
        let mut request = tonic::Request::new(set(&pkey, true, "left-running"));
        request.set_timeout(Duration::from_secs(10));
        client.set_opt_out(request).await
    });
    until_sent(&emulator, "PATCH").await;
    call.abort();
    gw.shutdown().await.unwrap();

    // The gateway has stopped serving (its drain timed out), but the call's work is still on
    // its way: the file is still held.
    let second = Ledger::open(&store.location).await.unwrap();
    let held = second.hold_exclusively();
    assert!(
        matches!(held, Err(LedgerError::Held(_))),
        "held while the work can still write: {held:?}"
    );

    // Once the work has recorded its outcome, the file is free, and holds that outcome.
    let hold = eventually_within(
        Duration::from_secs(10),
        "the hold to end with the work",
        || std::future::ready(second.hold_exclusively()),
    )
    .await;
    let recorded = second.get("left-running").await.unwrap().unwrap();
    assert_eq!(recorded.state, ccpa_gateway::store::State::Applied);
    drop(hold);
}

on_both_stores!(a_restore_started_by_a_read_gives_its_lease_back_when_the_read_is_cut_short);

/// Something that holds up the ledger's writes for one profile, from outside the gateway: on
/// SQLite the database's write lock, on PostgreSQL the profile's advisory lock (which recording
/// a request for it takes). Dropped, it lets them through.
enum HeldWrites {
    Postgres(sqlx::AnyConnection),
    Sqlite(rusqlite::Connection),
}

impl HeldWrites {
    async fn hold(location: &str, pkey: &str) -> Self {
        use sqlx::Connection;
        sqlx::any::install_default_drivers();
        if location.starts_with("postgres") {
            let mut connection = sqlx::AnyConnection::connect(location).await.unwrap();
            sqlx::query("SELECT pg_advisory_lock(hashtext($1))::text")
                .bind(pkey)
                .fetch_one(&mut connection)
                .await
                .unwrap();
            Self::Postgres(connection)
        } else {
            let connection = rusqlite::Connection::open_with_flags(
                location,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE,
            )
            .unwrap();
            connection
                .busy_timeout(std::time::Duration::from_secs(10))
                .unwrap();
            connection.execute_batch("BEGIN IMMEDIATE").unwrap();
            Self::Sqlite(connection)
        }
    }

    async fn release(self) {
        use sqlx::Connection;
        // Closing the connection ends its transaction and its session's advisory locks.
        match self {
            Self::Postgres(connection) => connection.close().await.unwrap(),
            Self::Sqlite(connection) => connection.close().map_err(|(_, e)| e).unwrap(),
        }
    }
}

/// A read that finds an applied opt-out reverted in ACS starts its restore, which claims the
/// profile's lease. If the read's caller runs out of time while the restore waits on the ledger,
/// the restore must still run to its end and give the lease back: otherwise every SetOptOut for
/// that profile answers PENDING for a whole lease (a minute here).
async fn a_restore_started_by_a_read_gives_its_lease_back_when_the_read_is_cut_short(store: Store) {
    let location = store.location.clone();
    let mut options = quick_delivery();
    options.delivery.lease = Duration::from_secs(60);
    let gw = quick(store).options(options).start().await;
    let pkey = gw.emulator().insert_profile(NewProfile::default());
    let mut client = gw.client();
    let applied = client
        .set_opt_out(set(&pkey, true, "applied"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(applied.state, DeliveryState::Applied as i32);
    assert!(gw.emulator().change_behind_the_gateway(&pkey, false));

    // The ledger's writes for the profile are held up while the read runs out of time.
    let held = HeldWrites::hold(&location, &pkey).await;
    let mut read = tonic::Request::new(GetOptOutRequest {
        pkey: pkey.clone(),
        ..Default::default()
    });
    read.set_timeout(Duration::from_secs(1));
    let answer = client.get_opt_out(read).await.unwrap().into_inner();
    assert!(
        answer.ccpa_opt_out && answer.drift_detected,
        "answered protectively, without waiting on the restore: {answer:?}"
    );
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    held.release().await;

    // The restore ends and gives the lease back at once, not a lease (a minute) later.
    eventually_within(
        Duration::from_secs(5),
        "the restore to give the profile's lease back",
        || async {
            let claim = gw.ledger.new_claim(Duration::from_secs(1));
            let claimed = gw.ledger.claim(&pkey, &claim).await.unwrap();
            if claimed {
                gw.ledger.release(&pkey, &claim).await.unwrap();
            }
            claimed.then_some(())
        },
    )
    .await;
    // And the restore is delivered: ACS holds the opt-out again.
    eventually_within(
        Duration::from_secs(10),
        "the opt-out to be restored",
        || {
            std::future::ready(
                (gw.emulator().profile(&pkey).unwrap()["ccpaOptOut"] == true).then_some(()),
            )
        },
    )
    .await;
}

/// A PostgreSQL ledger written by the previous release (schema version 5,
/// `tests/it/fixtures/ledger-v5.postgres.sql`: dumped with `pg_dump --inserts` from its `serve
/// --emulator` after an opt-out, an opt-in and a creation with an opt-out) opens, migrates, reads
/// back what it holds, and records anew.
#[tokio::test]
async fn a_postgres_ledger_of_the_previous_release_opens_migrates_and_reads_back() {
    use sqlx::Connection;
    let store = Store::postgres().await;
    let schema = store.schema().unwrap().to_owned();
    // The dump creates its schema itself; it loads into the test's instead. psql's own commands
    // (`\restrict`) are not SQL.
    let script: String = include_str!("fixtures/ledger-v5.postgres.sql")
        .lines()
        .filter(|line| !line.starts_with('\\') && !line.starts_with("CREATE SCHEMA"))
        .map(|line| line.replace("fixture_v5.", &format!("{schema}.")))
        .collect::<Vec<_>>()
        .join("\n");
    let mut admin = sqlx::postgres::PgConnection::connect(&common::postgres_url())
        .await
        .unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(script))
        .execute(&mut admin)
        .await
        .expect("the previous release's ledger loads");

    let ledger = Ledger::open(&store.location).await.expect("it migrates");
    let opt_out = ledger.get("fixture-opt-out").await.unwrap().unwrap();
    assert_eq!(opt_out.state, ccpa_gateway::store::State::Applied);
    assert!(opt_out.opt_out);
    let pkey = opt_out.pkey.clone().unwrap();
    let latest = ledger.latest_in_store(&pkey).await.unwrap().unwrap();
    assert_eq!(latest.request_id, "fixture-opt-out");
    let opt_in = ledger.get("fixture-opt-in").await.unwrap().unwrap();
    assert!(!opt_in.opt_out);
    let created = ledger.get("fixture-created").await.unwrap().unwrap();
    assert_eq!(created.kind, ccpa_gateway::store::Kind::CreateProfile);
    assert!(created.pkey.is_some(), "a creation keeps its key");

    // The migrated schema takes new requests, ordered after the old ones.
    let newer = ccpa_gateway::store::NewRequest {
        request_id: "after-migration".into(),
        kind: ccpa_gateway::store::Kind::SetOptOut,
        pkey: Some(pkey.clone()),
        opt_out: false,
        source: ccpa_gateway::store::Source::WebForm,
        received_at: None,
        caller: "test".into(),
        first_attempt_window_ms: 0,
        parent_request_id: None,
        fingerprint: None,
        restores_request_id: None,
        email_sha256: None,
    };
    let (recorded, _) = ledger.record(&newer, None).await.unwrap();
    assert!(matches!(
        recorded,
        ccpa_gateway::store::Recorded::New(ref record)
            if record.state == ccpa_gateway::store::State::Pending
    ));
    let latest = ledger.latest_in_store(&pkey).await.unwrap().unwrap();
    assert_eq!(latest.request_id, "after-migration");
    // And a tool that only reads it finds it up to date.
    Ledger::open_existing(&store.location)
        .await
        .expect("this version's schema");
}

/// SQLite ledgers written by the previous release (sqlx's migrator and connections), kept in
/// `tests/it/fixtures/`: `ledger-v6.sqlite3` was made by that release's `serve --emulator --ledger`
/// with one SetOptOut applied (`fixture-applied`) and one failed (`fixture-missing`, a profile
/// ACS does not have); `ledger-v5.sqlite3` is the same file with migration 6 undone (its column
/// dropped, its row of history deleted), as the release before it left its ledgers. Each opens
/// with this version, is migrated, reads back, and keeps a history sqlx itself accepts: the
/// same versions and checksums as sqlx wrote, followed by this version's migrations, each with
/// the checksum sqlx's migrator computes from its SQLite text (migration 8, PostgreSQL's
/// functions, is on SQLite a text that changes nothing).
#[tokio::test]
async fn sqlite_ledgers_of_the_previous_releases_open_and_migrate() {
    use ccpa_gateway::store::{FailureCode, State};
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/fixtures");
    let history = |path: &std::path::Path| -> Vec<(i64, String, bool, Vec<u8>)> {
        let connection = rusqlite::Connection::open(path).unwrap();
        let mut statement = connection
            .prepare(
                "SELECT version, description, success, checksum FROM _sqlx_migrations \
                 ORDER BY version",
            )
            .unwrap();
        statement
            .query_map([], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    // As sqlx wrote it.
    let mut written_by_sqlx = history(&fixtures.join("ledger-v6.sqlite3"));
    assert_eq!(written_by_sqlx.len(), 6);
    for (version, description, sql) in [
        (
            7,
            "indexes that cost what they serve",
            include_str!("../../migrations/0007_requests_in_order.sql"),
        ),
        (
            8,
            "one round trip per unit",
            include_str!("../../migrations/0008_one_round_trip_units.sqlite.sql"),
        ),
        (
            9,
            "opt-out changes",
            include_str!("../../migrations/0009_opt_out_changes.sqlite.sql"),
        ),
        (
            10,
            "notifications",
            include_str!("../../migrations/0010_notifications.sqlite.sql"),
        ),
    ] {
        let migration = sqlx::migrate::Migration::new(
            version,
            description.into(),
            sqlx::migrate::MigrationType::Simple,
            sqlx::SqlSafeStr::into_sql_str(sql),
            false,
        );
        written_by_sqlx.push((
            version,
            migration.description.into(),
            true,
            migration.checksum.into(),
        ));
    }
    for fixture in ["ledger-v5.sqlite3", "ledger-v6.sqlite3"] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(fixture);
        std::fs::copy(fixtures.join(fixture), &path).unwrap();
        let location = path.display().to_string();
        let ledger = Ledger::open(&location).await.unwrap();
        let applied = ledger.get("fixture-applied").await.unwrap().unwrap();
        assert_eq!(applied.state, State::Applied, "{fixture}");
        assert!(applied.pkey.is_some());
        let failed = ledger.get("fixture-missing").await.unwrap().unwrap();
        assert_eq!(failed.state, State::Failed, "{fixture}");
        assert_eq!(failed.failure_code, Some(FailureCode::ProfileNotFound));
        assert_eq!(
            ledger.latest("@no-such-profile").await.unwrap(),
            Some(failed)
        );
        // The change feed starts with the records kept: each one's state, in the order
        // recorded (migration 9).
        let ccpa_gateway::store::ChangesAfter::Changes(changes) =
            ledger.changes_after(None, true, 10).await.unwrap()
        else {
            panic!("a new feed has nothing pruned");
        };
        let mut seen: Vec<_> = changes
            .iter()
            .map(|c| (c.request_id.as_str(), c.state))
            .collect();
        seen.sort_unstable_by_key(|(id, _)| *id);
        assert_eq!(
            seen,
            [
                ("fixture-applied", State::Applied),
                ("fixture-missing", State::Failed)
            ],
            "{fixture}"
        );
        // It takes writes, with migration 6's column.
        ledger
            .retry_now_that_acs_answers()
            .await
            .expect("the migrated schema has every column");
        drop(ledger);
        assert_eq!(history(&path), written_by_sqlx, "{fixture}");
        // And it is this version's for a tool that only reads.
        Ledger::open_existing(&location).await.unwrap();
    }
}

/// On a SQLite file this gateway holds, a read of a recorded profile answers from memory (the
/// writer keeps each profile's latest request), every write through the ledger is seen by the
/// next read, and once the hold ends every read asks the file again. Shown by changing the file
/// behind the ledger's back, which only a process without the hold could do.
#[tokio::test]
async fn a_held_sqlite_ledger_answers_reads_from_memory_and_forgets_what_each_write_touches() {
    use ccpa_gateway::store::{Kind, NewRequest, Source};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.sqlite3");
    std::fs::File::create(&path).unwrap();
    let ledger = Ledger::open(&path.display().to_string()).await.unwrap();
    let hold = ledger.hold_exclusively().unwrap();
    ledger.learn_known_profiles(&hold).await.unwrap();
    let request = |id: &str, opt_out: bool| NewRequest {
        request_id: id.into(),
        kind: Kind::SetOptOut,
        pkey: Some("@memory".into()),
        opt_out,
        source: Source::WebForm,
        received_at: None,
        caller: "privacy-portal".into(),
        first_attempt_window_ms: 0,
        parent_request_id: None,
        fingerprint: None,
        restores_request_id: None,
        email_sha256: None,
    };
    let behind_its_back = |sql: &str| {
        let connection = rusqlite::Connection::open(&path).unwrap();
        connection.busy_timeout(Duration::from_secs(5)).unwrap();
        connection.execute_batch(sql).unwrap();
    };

    ledger.record(&request("first", true), None).await.unwrap();
    let read = ledger.latest("@memory").await.unwrap().unwrap();
    assert_eq!((read.request_id.as_str(), read.opt_out), ("first", true));
    behind_its_back("UPDATE opt_out_records SET opt_out = 0 WHERE request_id = 'first'");
    let read = ledger.latest("@memory").await.unwrap().unwrap();
    assert!(read.opt_out, "answered from memory, not from the file");
    assert!(
        !ledger
            .latest_in_store("@memory")
            .await
            .unwrap()
            .unwrap()
            .opt_out,
        "the store itself holds the change"
    );

    // A write through the ledger: the next read sees it.
    ledger.record(&request("second", true), None).await.unwrap();
    let read = ledger.latest("@memory").await.unwrap().unwrap();
    assert_eq!(read.request_id, "second");
    ledger
        .settle(
            "second",
            ccpa_gateway::store::Outcome::Applied { pkey: None },
            false,
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        ledger.latest("@memory").await.unwrap().unwrap().state,
        ccpa_gateway::store::State::Applied,
        "a settle is seen by the next read"
    );

    // Without the hold, every read asks the file.
    behind_its_back("UPDATE opt_out_records SET opt_out = 0 WHERE request_id = 'second'");
    assert!(ledger.latest("@memory").await.unwrap().unwrap().opt_out);
    drop(hold);
    assert!(!ledger.latest("@memory").await.unwrap().unwrap().opt_out);
}

/// On PostgreSQL each hot unit of work is one statement, its own transaction (#25): migration 8
/// creates its functions, and the units of a SetOptOut applied within its call (recorded with a
/// claim on its profile's lease, then settled as applied, answered, giving the lease back, as
/// `optout::submit` does), a claim and a release, each reach the server as one round trip
/// carrying one statement. The round trips are read between the ledger and the server by a
/// proxy that sees the protocol's messages: a round trip of the extended protocol ends with a
/// Sync; a BEGIN or COMMIT would be a simple Query of its own. Each unit is committed when it
/// returns: another connection reads what it wrote.
#[tokio::test]
async fn on_postgres_each_hot_unit_is_one_statement_and_one_round_trip() {
    use ccpa_gateway::store::{Kind, NewRequest, Outcome, Recorded, Settled, Source, State};
    use sqlx::Connection;
    let store = Store::postgres().await;
    let schema = store.schema().unwrap().to_owned();
    let mut direct = url::Url::parse(&store.location).unwrap();
    let upstream = format!(
        "{}:{}",
        direct.host_str().unwrap(),
        direct.port().unwrap_or(5432)
    );
    let proxy = RoundTrips::start(upstream).await;
    // In clear, so that the proxy can read the messages.
    direct.query_pairs_mut().append_pair("sslmode", "disable");
    let mut proxied = direct.clone();
    proxied.set_host(Some("127.0.0.1")).unwrap();
    proxied.set_port(Some(proxy.port)).unwrap();
    let ledger = Ledger::open(proxied.as_str()).await.unwrap();

    let mut admin = sqlx::postgres::PgConnection::connect(direct.as_str())
        .await
        .unwrap();
    let functions: Vec<String> = sqlx::query_scalar(
        "SELECT p.proname::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
         WHERE n.nspname = $1 ORDER BY p.proname",
    )
    .bind(&schema)
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert_eq!(
        functions,
        [
            "ccpa_claim_lease",
            // Migration 9's trigger function: it runs inside the units' statements.
            "ccpa_note_change",
            // Migration 10's: likewise.
            "ccpa_note_notifications",
            "ccpa_record_request",
            "ccpa_release_lease",
            "ccpa_settle"
        ]
    );

    let request = |request_id: &str, pkey: &str| NewRequest {
        request_id: request_id.into(),
        kind: Kind::SetOptOut,
        pkey: Some(pkey.into()),
        opt_out: true,
        source: Source::WebForm,
        received_at: None,
        caller: "test".into(),
        first_attempt_window_ms: 10_000,
        parent_request_id: None,
        fingerprint: None,
        restores_request_id: None,
        email_sha256: None,
    };
    // The round trips of a SetOptOut's units: recording it, then settling it.
    let set_opt_out = async |request_id: &str, pkey: &str| -> (Vec<String>, Vec<String>) {
        let claim = ledger.new_claim(MINUTE);
        let (recording, recorded) = proxy
            .round_trips_of(ledger.record(&request(request_id, pkey), Some(&claim)))
            .await;
        let (recorded, claimed) = recorded.unwrap();
        assert!(matches!(recorded, Recorded::New(ref record) if record.state == State::Pending));
        assert!(claimed, "a free lease is taken in the same statement");
        let (settling, settled) = proxy
            .round_trips_of(ledger.settle(
                request_id,
                Outcome::Applied { pkey: None },
                true,
                Some((pkey, &claim)),
            ))
            .await;
        assert_eq!(settled.unwrap(), Settled::Recorded);
        (recording, settling)
    };
    // The first use of each statement on a connection also prepares it (a round trip of its
    // own, once), and the connection itself is opened and set up: not what is counted.
    set_opt_out("warm-up", "@warm-up").await;
    let claim = ledger.new_claim(MINUTE);
    assert!(
        proxy
            .round_trips_of(ledger.claim("@warm-up", &claim))
            .await
            .1
            .unwrap()
    );
    proxy
        .round_trips_of(ledger.release("@warm-up", &claim))
        .await
        .1
        .unwrap();

    // One round trip each: Bind, Execute, Close (the portal), Sync.
    let one_statement = vec!["BECS".to_owned()];
    let (recording, settling) = set_opt_out("counted", "@counted").await;
    assert_eq!(recording, one_statement, "a SetOptOut's record");
    assert_eq!(settling, one_statement, "a SetOptOut's settle");
    // Committed when they returned: the record is applied, its lease given back, its profile
    // scheduled for re-reading, all seen from another connection.
    let state: String =
        sqlx::query_scalar("SELECT state FROM opt_out_records WHERE request_id = 'counted'")
            .fetch_one(&mut admin)
            .await
            .unwrap();
    assert_eq!(state, "APPLIED");
    let (expires_at, scheduled): (i64, i64) = sqlx::query_as(
        "SELECT l.expires_at, (SELECT COUNT(*) FROM reconcile_schedule s \
         WHERE s.pkey = l.pkey) FROM profile_leases l WHERE l.pkey = '@counted'",
    )
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert_eq!((expires_at, scheduled), (0, 1));

    let claim = ledger.new_claim(MINUTE);
    let (claiming, claimed) = proxy.round_trips_of(ledger.claim("@counted", &claim)).await;
    assert!(claimed.unwrap());
    assert_eq!(claiming, one_statement, "a claim");
    let (releasing, released) = proxy
        .round_trips_of(ledger.release("@counted", &claim))
        .await;
    released.unwrap();
    assert_eq!(releasing, one_statement, "a release");
}

/// A TCP proxy in front of PostgreSQL that notes the frontend's round trips: for each, the types
/// of its messages (`P`arse, `D`escribe, `B`ind, `E`xecute, `C`lose, `S`ync; a simple `Q`uery is
/// a round trip of its own).
struct RoundTrips {
    port: u16,
    seen: Arc<std::sync::Mutex<Vec<String>>>,
}

impl RoundTrips {
    async fn start(upstream: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let noted = seen.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = tokio::net::TcpStream::connect(&upstream).await.unwrap();
                tokio::spawn(Self::relay(client, server, noted.clone()));
            }
        });
        Self { port, seen }
    }

    async fn relay(
        client: tokio::net::TcpStream,
        server: tokio::net::TcpStream,
        seen: Arc<std::sync::Mutex<Vec<String>>>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut from_client, mut to_client) = client.into_split();
        let (mut from_server, mut to_server) = server.into_split();
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
        });
        // The startup message has no type byte: its length, then its protocol version.
        let mut length = [0u8; 4];
        if from_client.read_exact(&mut length).await.is_err() {
            return;
        }
        let mut body = vec![0u8; u32::from_be_bytes(length) as usize - 4];
        from_client.read_exact(&mut body).await.unwrap();
        assert_ne!(
            body[..4],
            80_877_103u32.to_be_bytes(),
            "TLS was asked for: the proxy reads messages in clear (sslmode=disable)"
        );
        to_server.write_all(&length).await.unwrap();
        to_server.write_all(&body).await.unwrap();
        // Then every message: its type, its length (itself included), its body.
        let mut round_trip = String::new();
        loop {
            let mut header = [0u8; 5];
            if from_client.read_exact(&mut header).await.is_err() {
                return;
            }
            let length = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
            let mut body = vec![0u8; length as usize - 4];
            if from_client.read_exact(&mut body).await.is_err() {
                return;
            }
            round_trip.push(char::from(header[0]));
            // Noted before it is sent on: noted before its answer can reach the ledger.
            if matches!(header[0], b'S' | b'Q') {
                seen.lock().unwrap().push(std::mem::take(&mut round_trip));
            }
            if to_server.write_all(&header).await.is_err()
                || to_server.write_all(&body).await.is_err()
            {
                return;
            }
        }
    }

    /// What `unit` returns, and its round trips. sqlx tests a connection given back to its pool
    /// with a bare Sync, after the unit has returned, off its caller's path: that ping (one per
    /// unit) is not the unit's, and is waited for, so that the next unit finds the connection
    /// back in the pool (and its prepared statements with it) rather than opening another.
    async fn round_trips_of<T>(&self, unit: impl Future<Output = T>) -> (Vec<String>, T) {
        let before = self.seen.lock().unwrap().len();
        let value = unit.await;
        let mut round_trips = eventually_within(
            Duration::from_secs(5),
            "the connection to be given back to the pool",
            || {
                let seen = self.seen.lock().unwrap()[before..].to_vec();
                let pinged = seen.iter().any(|round_trip| round_trip == "S");
                std::future::ready(pinged.then_some(seen))
            },
        )
        .await;
        let ping = round_trips.iter().rposition(|round_trip| round_trip == "S");
        round_trips.remove(ping.unwrap());
        // The ping is answered, and the connection put back, a moment after it is sent.
        tokio::time::sleep(Duration::from_millis(50)).await;
        (round_trips, value)
    }
}

/// On PostgreSQL, a hot unit sent as one statement outside any transaction is answered
/// `Ok` only once its commit has succeeded. The commit of an implicit transaction happens at the
/// Sync that follows the statement's Execute, after its row was produced: a failure there (a
/// deferred constraint, or SERIALIZABLE's commit-time check when the database's default
/// isolation is serializable) must fail the unit. Here a constraint trigger deferred to the
/// commit refuses one request id, standing in for any commit-time error.
#[tokio::test]
async fn on_postgres_a_record_whose_commit_fails_is_not_answered_ok() {
    use ccpa_gateway::store::{Kind, NewRequest, Source};
    use sqlx::Connection;
    let store = Store::postgres().await;
    let schema = store.schema().unwrap().to_owned();
    let ledger = store.open().await;
    let mut admin = sqlx::postgres::PgConnection::connect(&common::postgres_url())
        .await
        .unwrap();
    for ddl in [
        format!(
            "CREATE FUNCTION {schema}.refuse_at_commit() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN IF NEW.request_id = 'doomed' THEN RAISE EXCEPTION 'refused at commit'; \
             END IF; RETURN NULL; END $$"
        ),
        format!(
            "CREATE CONSTRAINT TRIGGER refuse_at_commit AFTER INSERT ON \
             {schema}.opt_out_records DEFERRABLE INITIALLY DEFERRED FOR EACH ROW \
             EXECUTE FUNCTION {schema}.refuse_at_commit()"
        ),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(ddl))
            .execute(&mut admin)
            .await
            .unwrap();
    }
    let request = NewRequest {
        request_id: "doomed".into(),
        kind: Kind::SetOptOut,
        pkey: Some("@doomed".into()),
        opt_out: true,
        source: Source::WebForm,
        received_at: None,
        caller: "test".into(),
        first_attempt_window_ms: 10_000,
        parent_request_id: None,
        fingerprint: None,
        restores_request_id: None,
        email_sha256: None,
    };
    let recorded = ledger.record(&request, None).await;
    let kept: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT COUNT(*) FROM {schema}.opt_out_records WHERE request_id = 'doomed'"
    )))
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert_eq!(kept, 0, "the commit was refused: nothing is in the ledger");
    assert!(
        recorded.is_err(),
        "a request that is not in the ledger was answered as recorded: {recorded:?}"
    );
    // And the refused commit's error does not fall on the connection's next, unrelated unit.
    ledger
        .claim("@unrelated", &ledger.new_claim(MINUTE))
        .await
        .expect("a unit after the refused one");
}
