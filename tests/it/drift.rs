//! An opt-out stays honoured: the reconciler puts back what another system changed in ACS, a
//! read that meets such drift answers protectively and starts the restore, every answer carries
//! the profile's latest request, and `records report` gives the yearly figures of 11 CCR
//! 7102(a). On SQLite and PostgreSQL, over real sockets.

use crate::common;

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use acs_emulator::{Emulator, EmulatorConfig, FaultSettings, NewProfile};
use acs_profile_client::{CallSettings, ClientConfig, ManualClock, ThrottleSettings};
use ccpa_gateway::backoff::Backoff;
use ccpa_gateway::optout::delivery::DeliverySettings;
use ccpa_gateway::optout::reconcile::ReconcileSettings;
use ccpa_gateway::proto::ccpa_v1::ccpa_service_client::CcpaServiceClient;
use ccpa_gateway::proto::ccpa_v1::{
    CreateProfileRequest, DeliveryState, GetOptOutRequest, GetOptOutResponse, OptOutRecord,
    RequestSource, SetOptOutRequest,
};
use ccpa_gateway::server::ServerOptions;
use common::{
    Gateway, GatewayBuilder, Store, acs_config, eventually, opt_out_of, record, records_of, set,
};
use tonic::transport::Channel;

on_both_stores!(
    the_reconciler_restores_a_reverted_opt_out_within_its_interval,
    a_read_that_meets_drift_answers_opted_out_and_starts_the_restore,
    a_consumers_own_opt_in_is_not_drift,
    answers_carry_the_latest_request_on_each_path,
    the_yearly_report_counts_each_consumer_request_once,
);

const HOUR: Duration = Duration::from_secs(3600);

/// Settings for a gateway whose reconciler re-reads each applied profile once per `interval`,
/// its deliverer quick.
fn options(interval: Duration, max_rps: f64) -> ServerOptions {
    ServerOptions {
        delivery: DeliverySettings {
            poll_interval: Duration::from_millis(100),
            backoff: Backoff::LEDGER_DELIVERY
                .between(Duration::from_millis(100), Duration::from_millis(300))
                .unwrap(),
            ..Default::default()
        },
        reconcile: ReconcileSettings { interval, max_rps },
        ..Default::default()
    }
}

/// A gateway on `store` whose reconciler runs once an hour on `clock`.
fn hourly(store: Store, clock: Arc<ManualClock>) -> GatewayBuilder {
    common::gateway()
        .store(store)
        .options(options(HOUR, 100.0))
        .clock(clock)
}

/// A consumer's SetOptOut: by Global Privacy Control to opt out, by web form to opt back in.
fn from_consumer(pkey: &str, opt_out: bool, request_id: &str) -> SetOptOutRequest {
    SetOptOutRequest {
        // A signal can only opt out.
        source: if opt_out {
            RequestSource::GlobalPrivacyControl
        } else {
            RequestSource::WebForm
        } as i32,
        ..set(pkey, opt_out, request_id)
    }
}

/// Sets a profile's opt-out through the gateway; it must be applied at once.
async fn applied(gw: &Gateway, pkey: &str, opt_out: bool, request_id: &str) {
    let answer = gw
        .client()
        .set_opt_out(from_consumer(pkey, opt_out, request_id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.state, DeliveryState::Applied as i32, "{answer:?}");
}

/// The restores recorded for a profile.
async fn restores_of(client: &mut CcpaServiceClient<Channel>, pkey: &str) -> Vec<OptOutRecord> {
    records_of(client, pkey)
        .await
        .into_iter()
        .filter(|r| !r.restores_request_id.is_empty())
        .collect()
}

/// Waits until ACS holds `opt_out` for the profile.
async fn until_acs_holds(emulator: &Emulator, pkey: &str, opt_out: bool) {
    eventually(&format!("ACS to hold {opt_out}"), || {
        std::future::ready((emulator.profile(pkey).unwrap()["ccpaOptOut"] == opt_out).then_some(()))
    })
    .await;
}

/// How many GETs the emulator has answered.
fn gets(emulator: &Emulator) -> usize {
    emulator
        .requests()
        .iter()
        .filter(|r| r.method == "GET")
        .count()
}

/// Waits until the emulator has answered a GET more than `before`: the reconciler re-read.
async fn until_reread(emulator: &Emulator, before: usize) {
    eventually("the reconciler to re-read", || {
        std::future::ready((gets(emulator) > before).then_some(()))
    })
    .await;
}

/// `records` run against a ledger; its exit code and standard output.
async fn records(args: &[&str]) -> (i32, String) {
    let outcome = common::cli::run(common::cli::ccpa_gateway().arg("records").args(args)).await;
    (outcome.code, outcome.stdout)
}

async fn the_reconciler_restores_a_reverted_opt_out_within_its_interval(store: Store) {
    let location = store.location.clone();
    let clock = Arc::new(ManualClock::new());
    let gw = hourly(store, clock.clone()).start().await;
    let pkey = gw.profile(false);
    applied(&gw, &pkey, true, "consumer-opt-out").await;

    // A list import sets it back; the gateway is not told.
    assert!(gw.emulator().change_behind_the_gateway(&pkey, false));
    // Not yet due: re-read an hour after it was applied.
    clock.advance(HOUR - Duration::from_secs(60));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(gw.emulator().profile(&pkey).unwrap()["ccpaOptOut"], false);
    assert!(restores_of(&mut gw.client(), &pkey).await.is_empty());

    clock.advance(Duration::from_secs(120));
    until_acs_holds(gw.emulator(), &pkey, true).await;
    let restores = restores_of(&mut gw.client(), &pkey).await;
    assert_eq!(restores.len(), 1, "{restores:?}");
    let restore = &restores[0];
    assert_eq!(restore.restores_request_id, "consumer-opt-out");
    assert_eq!(restore.caller, "reconciler");
    assert_eq!(restore.source, RequestSource::Internal as i32);
    assert!(restore.ccpa_opt_out);
    let restore = eventually("the restore to be applied", || async {
        let restore = record(&mut gw.client(), &restore.request_id).await;
        (restore.state == DeliveryState::Applied as i32).then_some(restore)
    })
    .await;

    // The drift, for the privacy officer.
    let (code, out) = records(&["--ledger", &location, "drift"]).await;
    assert_eq!(code, 0);
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{out}");
    assert_eq!(lines[0]["direction"], "REVERTED_OPT_OUT");
    assert_eq!(lines[0]["restoresRequestId"], "consumer-opt-out");
    assert_eq!(lines[0]["requestId"], restore.request_id);
    assert_eq!(lines[0]["state"], "APPLIED");
    // Nothing since a moment in the future.
    let (code, out) = records(&[
        "drift",
        "--since",
        "2999-01-01T00:00:00Z",
        "--ledger",
        &location,
    ])
    .await;
    assert_eq!((code, out.as_str()), (0, ""));

    // ACS holds it again: the next re-read finds nothing to restore.
    let reads = gets(gw.emulator());
    clock.advance(HOUR + Duration::from_secs(60));
    until_reread(gw.emulator(), reads).await;
    assert_eq!(restores_of(&mut gw.client(), &pkey).await.len(), 1);
}

async fn a_read_that_meets_drift_answers_opted_out_and_starts_the_restore(store: Store) {
    // The clock stands still: the reconciler never runs, only the read finds the drift.
    let gw = hourly(store, Arc::new(ManualClock::new())).start().await;
    let pkey = gw.profile(false);
    applied(&gw, &pkey, true, "opted-out").await;
    assert!(gw.emulator().change_behind_the_gateway(&pkey, false));

    let read = opt_out_of(&mut gw.client(), &pkey).await;
    assert!(read.ccpa_opt_out, "the protective answer: {read:?}");
    assert!(read.drift_detected);
    assert!(read.profiles[0].drift_detected);
    let latest = read.latest_request.unwrap();
    assert_eq!(latest.request_id, "opted-out", "the consumer's request");
    assert_eq!(latest.state, DeliveryState::Applied as i32);
    assert!(latest.honored_at.is_some());

    // The restore follows at once, through the deliverer.
    until_acs_holds(gw.emulator(), &pkey, true).await;
    let restores = restores_of(&mut gw.client(), &pkey).await;
    assert_eq!(restores.len(), 1, "{restores:?}");
    assert_eq!(restores[0].restores_request_id, "opted-out");
    let read = opt_out_of(&mut gw.client(), &pkey).await;
    assert!(read.ccpa_opt_out && !read.drift_detected, "{read:?}");

    // By email: the profile that drifted is flagged, and the answer is protective.
    let other = gw.emulator().insert_profile(NewProfile {
        email: "ada@example.com".into(),
        ..Default::default()
    });
    let restored = until_applied_restores(&gw, &pkey, 1).await;
    assert!(gw.emulator().change_behind_the_gateway(&pkey, false));
    let read = gw
        .client()
        .get_opt_out(GetOptOutRequest {
            email: "ada@example.com".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(read.ccpa_opt_out && read.drift_detected, "{read:?}");
    assert!(
        read.latest_request.is_none(),
        "by email, each profile has its own"
    );
    let drifted = profile_in(&read, &pkey);
    assert!(drifted.ccpa_opt_out && drifted.drift_detected);
    assert_eq!(
        drifted.latest_request.as_ref().unwrap().request_id,
        "opted-out",
        "a restore is not the consumer's request: {restored:?}"
    );
    let untouched = profile_in(&read, &other);
    assert!(!untouched.ccpa_opt_out && !untouched.drift_detected);
    assert!(untouched.latest_request.is_none());
    until_acs_holds(gw.emulator(), &pkey, true).await;
}

/// Waits until a profile has `count` restores, all applied; returns them.
async fn until_applied_restores(gw: &Gateway, pkey: &str, count: usize) -> Vec<OptOutRecord> {
    eventually(&format!("{count} applied restores"), || async {
        let restores = restores_of(&mut gw.client(), pkey).await;
        let all_applied = restores
            .iter()
            .all(|r| r.state == DeliveryState::Applied as i32);
        (restores.len() == count && all_applied).then_some(restores)
    })
    .await
}

fn profile_in<'a>(
    read: &'a GetOptOutResponse,
    pkey: &str,
) -> &'a ccpa_gateway::proto::ccpa_v1::ProfileOptOut {
    read.profiles.iter().find(|p| p.pkey == pkey).unwrap()
}

async fn a_consumers_own_opt_in_is_not_drift(store: Store) {
    let clock = Arc::new(ManualClock::new());
    let gw = hourly(store, clock.clone()).start().await;
    let pkey = gw.profile(false);
    applied(&gw, &pkey, true, "out").await;
    // A moment later (requests in the same millisecond have no order between them).
    clock.advance(Duration::from_secs(1));
    applied(&gw, &pkey, false, "back-in").await;

    let read = opt_out_of(&mut gw.client(), &pkey).await;
    assert!(!read.ccpa_opt_out && !read.drift_detected, "{read:?}");
    let latest = read.latest_request.unwrap();
    assert_eq!(latest.request_id, "back-in");
    assert!(!latest.ccpa_opt_out);

    // Re-read past its interval: ACS holds the opt-in, which is the latest request.
    let reads = gets(gw.emulator());
    clock.advance(HOUR + Duration::from_secs(60));
    until_reread(gw.emulator(), reads).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(restores_of(&mut gw.client(), &pkey).await.is_empty());

    // Opted out in ACS through another channel: never written back to "may sell".
    assert!(gw.emulator().change_behind_the_gateway(&pkey, true));
    let reads = gets(gw.emulator());
    clock.advance(HOUR + Duration::from_secs(60));
    until_reread(gw.emulator(), reads).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(restores_of(&mut gw.client(), &pkey).await.is_empty());
    assert_eq!(gw.emulator().profile(&pkey).unwrap()["ccpaOptOut"], true);
}

async fn answers_carry_the_latest_request_on_each_path(store: Store) {
    let gw = hourly(store, Arc::new(ManualClock::new())).start().await;
    // None in the ledger: no latest request.
    let untouched = gw.profile(false);
    let read = opt_out_of(&mut gw.client(), &untouched).await;
    assert!(read.latest_request.is_none() && read.profiles[0].latest_request.is_none());

    // Pending: received, not yet honoured in ACS (but already in every answer).
    let pkey = gw.profile(false);
    gw.emulator().set_faults(FaultSettings {
        unavailable: 1.0,
        ..Default::default()
    });
    let mut request = tonic::Request::new(SetOptOutRequest {
        source: RequestSource::WebForm as i32,
        ..from_consumer(&pkey, true, "signal")
    });
    request.set_timeout(Duration::from_secs(4));
    gw.client().set_opt_out(request).await.unwrap();
    gw.emulator().set_faults(FaultSettings::default());
    let read = opt_out_of(&mut gw.client(), &pkey).await;
    assert!(read.ccpa_opt_out && read.change_pending);
    let latest = read.latest_request.unwrap();
    assert_eq!(latest.request_id, "signal");
    assert_eq!(latest.source, RequestSource::WebForm as i32);
    assert_eq!(latest.state, DeliveryState::Pending as i32);
    assert!(latest.received_at.is_some() && latest.honored_at.is_none());
    assert_eq!(read.profiles[0].latest_request.as_ref(), Some(&latest));

    // Applied: honoured, since when ACS held it.
    applied(&gw, &untouched, true, "gpc").await;
    let read = opt_out_of(&mut gw.client(), &untouched).await;
    let latest = read.latest_request.unwrap();
    assert_eq!(
        (latest.request_id.as_str(), latest.source),
        ("gpc", RequestSource::GlobalPrivacyControl as i32)
    );
    assert_eq!(latest.state, DeliveryState::Applied as i32);
    let honored_at = latest.honored_at.unwrap();
    let applied_record = record(&mut gw.client(), "gpc").await;
    assert_eq!(Some(honored_at), applied_record.resolved_at);

    // A profile created with an opt-out: its creation is its latest request (its key known only
    // once ACS made it).
    let created = gw
        .client()
        .create_profile(CreateProfileRequest {
            email: "grace@example.com".into(),
            first_name: "Grace".into(),
            last_name: "Hopper".into(),
            ccpa_opt_out: Some(true),
            source: RequestSource::WebForm as i32,
            request_id: "signed-up".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .profile
        .unwrap();
    let read = opt_out_of(&mut gw.client(), &created.pkey).await;
    assert!(read.ccpa_opt_out);
    let latest = read.latest_request.unwrap();
    assert_eq!(latest.request_id, "signed-up");
    assert_eq!(latest.state, DeliveryState::Applied as i32);
}

/// The reconciler's re-reads are paced by its share of the ACS budget, whatever the backlog: on
/// the ledger's clock, which the test moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconcilers_share_of_the_rate_limit_is_held() {
    // A budget of 20 requests a second toward ACS; the reconciler's share, 10%: 2 a second, one
    // every 500 ms.
    let clock = Arc::new(ManualClock::new());
    let gw = common::gateway()
        .adjust_acs(|acs| ClientConfig {
            call: CallSettings {
                throttle: ThrottleSettings {
                    max_rps: std::num::NonZeroU32::new(20).unwrap(),
                    ..Default::default()
                },
                ..Default::default()
            },
            ..acs
        })
        .options(options(Duration::from_secs(1), 2.0))
        .clock(clock.clone())
        .start()
        .await;
    let pkeys: Vec<String> = (0..20).map(|_| gw.profile(false)).collect();
    for (n, pkey) in pkeys.iter().enumerate() {
        applied(&gw, pkey, true, &format!("out-{n}")).await;
    }
    // Over a second on: every profile is due at once, twenty where the share allows one.
    let before = gets(gw.emulator());
    clock.advance(Duration::from_millis(1_001));
    until_reread(gw.emulator(), before).await;
    for _ in 0..3 {
        let reread = gets(gw.emulator());
        // However long it waits, no re-read comes before 500 ms of the ledger's clock: the
        // reconciler looks again every poll interval (100 ms here), three times in this wait.
        clock.advance(Duration::from_millis(499));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            gets(gw.emulator()),
            reread,
            "a re-read within 500 ms of the last"
        );
        // At 500 ms, the next one, and only one.
        clock.advance(Duration::from_millis(1));
        until_reread(gw.emulator(), reread).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(gets(gw.emulator()), reread + 1, "one re-read every 500 ms");
    }
}

/// Moves `clock` on by `step` every 20 ms (of real time) until `done`.
async fn drive_until(clock: &ManualClock, step: Duration, what: &str, done: impl Fn() -> bool) {
    eventually(what, || {
        let finished = done();
        if !finished {
            clock.advance(step);
        }
        std::future::ready(finished.then_some(()))
    })
    .await;
}

/// Two gateways on one PostgreSQL ledger, both reconciling: each reverted profile is restored
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_postgresql_ledger_restore_each_profile_once() {
    let store = Store::postgres().await;
    let emulator = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let clock = Arc::new(ManualClock::new());
    // Every profile re-read every 2 s of the ledger's clock, both replicas on that one clock.
    let replica = || {
        common::gateway()
            .calling(acs_config(&emulator))
            .ledger_at(&store.location)
            .options(options(Duration::from_secs(2), 50.0))
            .clock(clock.clone())
            .start()
    };
    let (a, b) = (replica().await, replica().await);
    let pkeys: Vec<String> = (0..10)
        .map(|_| emulator.insert_profile(NewProfile::default()))
        .collect();
    for (n, pkey) in pkeys.iter().enumerate() {
        let gw = if n % 2 == 0 { &a } else { &b };
        applied(gw, pkey, true, &format!("replica-{n}")).await;
    }
    for pkey in &pkeys {
        assert!(emulator.change_behind_the_gateway(pkey, false));
    }
    let holds_every_opt_out = || {
        pkeys
            .iter()
            .all(|pkey| emulator.profile(pkey).unwrap()["ccpaOptOut"] == true)
    };
    drive_until(
        &clock,
        Duration::from_millis(250),
        "every opt-out restored",
        holds_every_opt_out,
    )
    .await;
    // Two more intervals of both reconcilers re-reading (each profile at least twice more):
    // nothing more to restore.
    let before = gets(&emulator);
    drive_until(
        &clock,
        Duration::from_millis(250),
        "twenty more re-reads",
        || gets(&emulator) >= before + 2 * pkeys.len(),
    )
    .await;
    for pkey in &pkeys {
        let restores = restores_of(&mut a.client(), pkey).await;
        assert_eq!(restores.len(), 1, "{pkey}: {restores:?}");
    }
}

async fn the_yearly_report_counts_each_consumer_request_once(store: Store) {
    use ccpa_gateway::store::{FailureCode, Kind, NewRequest, Outcome, Source};
    // Tuesday 2026-03-10, 00:00 UTC; every response below is given at this instant.
    let d0 = UNIX_EPOCH + Duration::from_secs(1_773_100_800);
    let clock = Arc::new(ManualClock::at(d0));
    let ledger = store.open().await.with_clock(clock.clone());
    let now = ledger.now_ms();
    let days_ago = |days: i64| now - days * 86_400_000;
    let request =
        |id: &str, pkey: Option<&str>, opt_out: bool, source: Source, at: i64| NewRequest {
            request_id: id.into(),
            kind: Kind::SetOptOut,
            pkey: pkey.map(Into::into),
            opt_out,
            source,
            received_at: Some(at),
            caller: "privacy-portal".into(),
            first_attempt_window_ms: 0,
            parent_request_id: None,
            fingerprint: None,
            restores_request_id: None,
            email_sha256: None,
        };
    let record = |new: NewRequest| {
        let ledger = ledger.clone();
        async move {
            ledger.record(&new, None).await.unwrap();
        }
    };
    let applied = |id: &'static str| {
        let ledger = ledger.clone();
        async move {
            ledger
                .settle(id, Outcome::Applied { pkey: None }, true, None)
                .await
                .unwrap();
        }
    };
    let failed = |id: &'static str| {
        let ledger = ledger.clone();
        async move {
            let outcome = Outcome::Failed {
                reason: "the profile does not exist in Adobe Campaign",
                code: FailureCode::ProfileNotFound,
            };
            ledger.settle(id, outcome, true, None).await.unwrap();
        }
    };
    // Opt-outs: applied after 2 days; denied after 1; pending since 4.
    record(request(
        "r1",
        Some("@r1"),
        true,
        Source::WebForm,
        days_ago(2),
    ))
    .await;
    applied("r1").await;
    record(request(
        "r2",
        Some("@r2"),
        true,
        Source::GlobalPrivacyControl,
        days_ago(1),
    ))
    .await;
    failed("r2").await;
    record(request(
        "r3",
        Some("@r3"),
        true,
        Source::GlobalPrivacyControl,
        days_ago(4),
    ))
    .await;
    // An opt-in, applied.
    record(request(
        "r4",
        Some("@r4"),
        false,
        Source::WebForm,
        days_ago(3),
    ))
    .await;
    applied("r4").await;
    // By email, 5 days ago: two profiles, one applied, one failed. One request, complied with
    // in part, after 5 days.
    record(NewRequest {
        kind: Kind::SetByEmail,
        ..request("p", None, true, Source::Email, days_ago(5))
    })
    .await;
    for (child, pkey) in [("p:1", "@p1"), ("p:2", "@p2")] {
        record(NewRequest {
            parent_request_id: Some("p".into()),
            ..request(child, Some(pkey), true, Source::Email, days_ago(5))
        })
        .await;
    }
    applied("p:1").await;
    failed("p:2").await;
    applied("p").await;
    // Overtaken by the consumer's later request: complied with (by the later one), after 6
    // days; the later one applied after 1.
    record(request("r6", Some("@s"), true, Source::Phone, days_ago(6))).await;
    record(request("r7", Some("@s"), true, Source::Phone, days_ago(1))).await;
    applied("r7").await;
    // Not counted: the reconciler's restore, and a request of 2025.
    record(NewRequest {
        source: Source::Internal,
        caller: "reconciler".into(),
        restores_request_id: Some("r1".into()),
        email_sha256: None,
        ..request(
            "reconciler:1",
            Some("@r1"),
            true,
            Source::Internal,
            days_ago(2),
        )
    })
    .await;
    record(request(
        "old",
        Some("@old"),
        true,
        Source::WebForm,
        days_ago(100),
    ))
    .await;
    applied("old").await;

    let (code, out) = records(&[
        "--ledger",
        &store.location,
        "report",
        "--year",
        "2026",
        "--json",
    ])
    .await;
    assert_eq!(code, 0, "{out}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        report,
        serde_json::json!({
            "year": 2026,
            "opt_out": {
                "received": 6, "complied": 4, "denied": 1, "pending": 1,
                // Days to respond: 1 (r2), 1 (r7), 2 (r1), 5 (p), 6 (r6).
                "median_days_to_respond": 2.0, "mean_days_to_respond": 3.0,
                "by_source": {
                    "EMAIL": 1, "GLOBAL_PRIVACY_CONTROL": 2, "PHONE": 2, "WEB_FORM": 1,
                    "POSTAL_MAIL": 0, "IN_PERSON": 0, "AUTHORIZED_AGENT": 0, "INTERNAL": 0
                },
                // No recipient was named: none was told (tests/notifications.rs counts some).
                "notifications": {"delivered": 0, "failed": 0, "pending": 0}
            },
            "opt_in": {"received": 1, "complied": 1, "denied": 0, "pending": 0}
        })
    );
    // 2025 holds the one request of that year.
    let (_, out) = records(&[
        "--ledger",
        &store.location,
        "report",
        "--year",
        "2025",
        "--json",
    ])
    .await;
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["opt_out"]["received"], 1);
    assert_eq!(report["opt_out"]["median_days_to_respond"], 100.0);

    // The table a privacy officer pastes.
    let (code, table) = records(&["--ledger", &store.location, "report", "--year", "2026"]).await;
    assert_eq!(code, 0);
    let row = |name: &str| {
        table
            .lines()
            .find(|line| line.starts_with(name))
            .map(|line| line.split_whitespace().skip(1).collect::<Vec<_>>())
            .unwrap_or_else(|| panic!("no {name} row: {table}"))
    };
    assert_eq!(row("opt-out"), ["6", "4", "1", "1"]);
    assert_eq!(row("opt-in"), ["1", "1", "0", "0"]);
    assert!(table.contains("median 2.00, mean 3.00"), "{table}");
}
