//! The ledger across process deaths and between replicas: gateways killed with SIGKILL lose no
//! request, and two gateways sharing one PostgreSQL ledger deliver every request once, in order.

use crate::common;

use std::cell::Cell;
use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use acs_emulator::{Emulator, EmulatorConfig, FaultSettings, NewProfile};
use ccpa_gateway::proto::ccpa_v1::ccpa_service_client::CcpaServiceClient;
use ccpa_gateway::proto::ccpa_v1::{
    DeliveryState, ListOptOutRecordsRequest, OptOutRecord, RequestSource, SetOptOutRequest,
};
use common::{QUICK_DELIVERY_ARGS, Store, eventually_within, record, until_settled_within};
use tonic::transport::Channel;

fn now_ms() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

fn at_ms(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms / 1000,
        nanos: i32::try_from((ms % 1000) * 1_000_000).unwrap(),
    }
}

async fn pending_count(client: &mut CcpaServiceClient<Channel>) -> usize {
    client
        .list_opt_out_records(ListOptOutRecordsRequest {
            state: DeliveryState::Pending as i32,
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .records
        .len()
}

async fn killed_gateways_lose_nothing(store: Store) {
    let emulator = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let mut requests: Vec<(String, String)> = Vec::new();

    // Three gateways in turn, each killed after answering PENDING while ACS is down.
    emulator.set_faults(FaultSettings {
        unavailable: 1.0,
        ..Default::default()
    });
    for round in 0..3 {
        let mut gateway = common::gateway()
            .ledger_at(&store.location)
            .args(QUICK_DELIVERY_ARGS)
            .spawn(Some(&emulator))
            .await;
        for i in 0..10 {
            let pkey = emulator.insert_profile(NewProfile::default());
            let request_id = format!("kill-{round}-{i}");
            let mut request = tonic::Request::new(SetOptOutRequest {
                pkey: pkey.clone(),
                ccpa_opt_out: Some(true),
                request_id: request_id.clone(),
                source: RequestSource::GlobalPrivacyControl as i32,
                ..Default::default()
            });
            request.set_timeout(Duration::from_secs(3));
            let answer = gateway
                .client
                .set_opt_out(request)
                .await
                .unwrap()
                .into_inner();
            assert_eq!(answer.state, DeliveryState::Pending as i32);
            requests.push((request_id, pkey));
        }
        gateway.kill().await;
    }

    // ACS comes back, slowly: a gateway is killed in the middle of delivering.
    emulator.set_faults(FaultSettings {
        latency: Duration::from_millis(150),
        ..Default::default()
    });
    let gateway = common::gateway()
        .ledger_at(&store.location)
        .args(QUICK_DELIVERY_ARGS)
        .spawn(Some(&emulator))
        .await;
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    gateway.kill().await;

    // The last one finishes the work.
    let mut gateway = common::gateway()
        .ledger_at(&store.location)
        .args(QUICK_DELIVERY_ARGS)
        .spawn(Some(&emulator))
        .await;
    // One request read a round: the first not yet seen applied (applied stays applied).
    let applied = Cell::new(0);
    eventually_within(
        Duration::from_secs(60),
        "every request to be applied",
        || {
            let mut client = gateway.client.clone();
            let (requests, applied) = (&requests, &applied);
            async move {
                while let Some((request_id, _)) = requests.get(applied.get()) {
                    let record = record(&mut client, request_id).await;
                    if record.state != DeliveryState::Applied as i32 {
                        // Not lost: still pending.
                        assert_eq!(record.state, DeliveryState::Pending as i32, "{record:?}");
                        return Err(record);
                    }
                    applied.set(applied.get() + 1);
                }
                Ok(())
            }
        },
    )
    .await;
    for (_, pkey) in &requests {
        assert_eq!(emulator.profile(pkey).unwrap()["ccpaOptOut"], true);
    }
    assert_eq!(pending_count(&mut gateway.client).await, 0);
    gateway.kill().await;
}

/// Many SetOptOuts in flight at once (so that commits carry many of them), and the gateway
/// killed in the middle: every request it acknowledged is in the ledger afterwards, as it was
/// acknowledged.
async fn a_kill_among_concurrent_writes_loses_no_acknowledged_request(store: Store) {
    const CALLS: usize = 400;
    let emulator = Emulator::start(EmulatorConfig::default()).await.unwrap();
    // Each call waits for ACS a little, so that many are between their writes when it dies.
    emulator.set_faults(FaultSettings {
        latency: Duration::from_millis(50),
        ..Default::default()
    });
    let gateway = common::gateway()
        .ledger_at(&store.location)
        .args(QUICK_DELIVERY_ARGS)
        .args(&["--acs-max-rps", "100000", "--acs-max-queued", "100000"])
        .spawn(Some(&emulator))
        .await;
    let pkeys: Vec<String> = (0..CALLS)
        .map(|_| emulator.insert_profile(NewProfile::default()))
        .collect();
    let acknowledged = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (enough, mut reached) = tokio::sync::watch::channel(false);
    let calls: Vec<_> = pkeys
        .iter()
        .enumerate()
        .map(|(i, pkey)| {
            let mut client = gateway.client.clone();
            let acknowledged = acknowledged.clone();
            let enough = enough.clone();
            let request = SetOptOutRequest {
                pkey: pkey.clone(),
                ccpa_opt_out: Some(true),
                request_id: format!("concurrent-{i}"),
                source: RequestSource::WebForm as i32,
                ..Default::default()
            };
            tokio::spawn(async move {
                let mut call = tonic::Request::new(request);
                call.set_timeout(Duration::from_secs(20));
                if let Ok(answer) = client.set_opt_out(call).await {
                    let answer = answer.into_inner();
                    let mut acknowledged = acknowledged.lock().unwrap();
                    acknowledged.push((answer.request_id, answer.state));
                    if acknowledged.len() >= CALLS / 4 {
                        let _ = enough.send(true);
                    }
                }
            })
        })
        .collect();
    // Only the calls hold a sender now: if they all end short of enough answers, this fails
    // instead of waiting for ever.
    drop(enough);
    reached
        .wait_for(|reached| *reached)
        .await
        .expect("a quarter of the calls are answered");
    gateway.kill().await;
    for call in calls {
        call.await.unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(
        acknowledged.len() < CALLS,
        "the kill came after every call was answered: nothing was in flight"
    );

    let mut gateway = common::gateway()
        .ledger_at(&store.location)
        .args(QUICK_DELIVERY_ARGS)
        .spawn(Some(&emulator))
        .await;
    for (request_id, state) in &acknowledged {
        let recorded = record(&mut gateway.client, request_id).await;
        if *state == DeliveryState::Applied as i32 {
            assert_eq!(recorded.state, *state, "{request_id}: {recorded:?}");
        } else {
            // Answered PENDING: still pending, or delivered since; never lost or overtaken.
            assert_eq!(*state, DeliveryState::Pending as i32, "{request_id}");
            assert!(
                [DeliveryState::Pending as i32, DeliveryState::Applied as i32]
                    .contains(&recorded.state),
                "{recorded:?}"
            );
        }
    }
    gateway.kill().await;
}

mod a_kill_among_concurrent_writes_loses_no_acknowledged_request {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        super::a_kill_among_concurrent_writes_loses_no_acknowledged_request(super::Store::sqlite())
            .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        super::a_kill_among_concurrent_writes_loses_no_acknowledged_request(
            super::Store::postgres().await,
        )
        .await;
    }
}

mod killed_gateways_lose_nothing {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        super::killed_gateways_lose_nothing(super::Store::sqlite()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        super::killed_gateways_lose_nothing(super::Store::postgres().await).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_on_one_postgres_ledger_apply_each_profile_in_order() {
    const PROFILES: usize = 8;
    const CHANGES: usize = 6;
    let store = Store::postgres().await;
    let emulator = Emulator::start(EmulatorConfig::default()).await.unwrap();
    // ACS flaps: a third of requests fail, some connections break.
    emulator.set_faults(FaultSettings {
        latency: Duration::from_millis(10),
        unavailable: 0.25,
        reset: 0.1,
        ..Default::default()
    });
    let a = common::gateway()
        .ledger_at(&store.location)
        .args(QUICK_DELIVERY_ARGS)
        .spawn(Some(&emulator))
        .await;
    let b = common::gateway()
        .ledger_at(&store.location)
        .args(QUICK_DELIVERY_ARGS)
        .spawn(Some(&emulator))
        .await;

    // Every profile gets six changes, alternating true and false, made a second apart, sent in
    // a scrambled order, half to each gateway, all at once.
    let base = now_ms() - 60_000;
    let mut sends = Vec::new();
    let mut expected_last: HashMap<String, (String, bool)> = HashMap::new();
    for p in 0..PROFILES {
        let pkey = emulator.insert_profile(NewProfile::default());
        for change in 0..CHANGES {
            let value = change % 2 == 0;
            let request_id = format!("replica-{p}-{change}");
            let received_at = base + i64::try_from(change).unwrap() * 1_000;
            expected_last.insert(pkey.clone(), (request_id.clone(), value));
            sends.push((pkey.clone(), request_id, value, received_at));
        }
    }
    sends.sort_by_key(|(_, id, _, _)| {
        let mut hash = 0u64;
        for b in id.bytes() {
            hash = hash.wrapping_mul(31).wrapping_add(u64::from(b));
        }
        hash
    });
    let calls = sends
        .iter()
        .enumerate()
        .map(|(n, (pkey, request_id, value, received_at))| {
            let mut client = if n % 2 == 0 {
                a.client.clone()
            } else {
                b.client.clone()
            };
            let request = SetOptOutRequest {
                pkey: pkey.clone(),
                ccpa_opt_out: Some(*value),
                request_id: request_id.clone(),
                source: RequestSource::WebForm as i32,
                received_at: Some(at_ms(*received_at)),
                ..Default::default()
            };
            async move {
                let mut request = tonic::Request::new(request);
                request.set_timeout(Duration::from_secs(5));
                client.set_opt_out(request).await.unwrap().into_inner()
            }
        });
    futures::future::join_all(calls).await;

    let mut client = a.client.clone();
    until_settled_within(&mut client, Duration::from_secs(90)).await;

    for (pkey, (last_id, last_value)) in &expected_last {
        assert_eq!(
            emulator.profile(pkey).unwrap()["ccpaOptOut"],
            *last_value,
            "ACS holds the newest request's value"
        );
        let mut records: Vec<OptOutRecord> = client
            .list_opt_out_records(ListOptOutRecordsRequest {
                pkey: pkey.clone(),
                page_size: 100,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .records;
        assert_eq!(records.len(), CHANGES);
        records.reverse(); // oldest request first
        let newest = records.last().unwrap();
        assert_eq!(&newest.request_id, last_id);
        assert_eq!(newest.state, DeliveryState::Applied as i32, "{newest:?}");
        let mut last_applied_at = None;
        for record in &records {
            let state = DeliveryState::try_from(record.state).unwrap();
            assert!(
                matches!(state, DeliveryState::Applied | DeliveryState::Superseded),
                "{record:?}"
            );
            if state == DeliveryState::Applied {
                let applied_at = record.resolved_at.unwrap();
                let applied_ms =
                    applied_at.seconds * 1000 + i64::from(applied_at.nanos / 1_000_000);
                if let Some(previous) = last_applied_at {
                    assert!(
                        applied_ms >= previous,
                        "an older request was applied after a newer one: {records:?}"
                    );
                }
                last_applied_at = Some(applied_ms);
            }
        }
    }
    a.kill().await;
    b.kill().await;
}
