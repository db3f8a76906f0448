//! A long BulkSetOptOut stream through a gateway process (so that its memory is its own, read
//! from `/proc`) on a PostgreSQL ledger (what replicas share) to the emulator: every item is
//! answered once, every profile ends opted out and is recorded once, and the gateway's peak
//! memory after the whole stream is what it was after its first tenth. The suite runs 5,000
//! items (`CCPA_BULK_SCALE_ITEMS` changes it); the benchmark's `bulk` scenario runs 100,000 and
//! reports the same two figures on an optimised build (see BENCHMARKS.md), with items per second.

use crate::common;

use std::time::Instant;

use acs_emulator::{Emulator, EmulatorConfig, NewProfile};
use ccpa_gateway::proto::ccpa_v1::{
    BulkSetOptOutRequest, DeliveryState, RequestSource, SetOptOutRequest,
};
use ccpa_gateway::store::{Ledger, State};
use common::{QUICK_DELIVERY_ARGS, Store, until_settled};
use futures::StreamExt;

const MIB: u64 = 1024 * 1024;

/// How much the gateway's peak RSS may grow between the first tenth of the stream and its end.
/// Bounded memory means it holds the same few dozen items whatever the length: what it may still
/// grow by is allocator and cache slack (none was seen: 59 MiB after 500 items and after 5,000).
/// Holding the other 4,500 items (each a request, a ledger row and a task with its ACS calls,
/// several KiB) would exceed it.
const GROWTH_ALLOWED: u64 = 8 * MIB;

fn items() -> usize {
    std::env::var("CCPA_BULK_SCALE_ITEMS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(5_000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_stream_is_applied_once_each_in_bounded_memory() {
    let count = items();
    let emulator = Emulator::start(EmulatorConfig {
        // The emulator keeps no log of the stream's requests: its memory is not what is
        // measured, but it shares the machine.
        record_requests: false,
        ..Default::default()
    })
    .await
    .unwrap();
    let pkeys: std::sync::Arc<Vec<String>> = std::sync::Arc::new(
        (0..count)
            .map(|_| emulator.insert_profile(NewProfile::default()))
            .collect(),
    );
    let store = Store::postgres().await;
    let mut gateway = common::gateway()
        .ledger_at(&store.location)
        .args(QUICK_DELIVERY_ARGS)
        // The rate limit is the contract's, not under test here (see the throttle tests). Nor
        // is the connection's age: in the debug build, on a busy 2-core machine, the stream
        // can outlast the default age and grace (10 minutes), which would cut it.
        .args(&[
            "--acs-max-rps",
            "100000",
            "--acs-max-queued",
            "100000",
            "--max-connection-age",
            "1h",
        ])
        .spawn(Some(&emulator))
        .await;
    let rss_at_start = gateway.peak_rss();

    let started = Instant::now();
    let stream_keys = pkeys.clone();
    let outbound = futures::stream::iter(0..count).map(move |i| BulkSetOptOutRequest {
        item: Some(SetOptOutRequest {
            pkey: stream_keys[i].clone(),
            ccpa_opt_out: Some(true),
            request_id: format!("scale-{i}"),
            source: RequestSource::GlobalPrivacyControl as i32,
            ..Default::default()
        }),
        record_only: false,
    });
    let mut answers = gateway
        .client
        .bulk_set_opt_out(outbound)
        .await
        .unwrap()
        .into_inner();
    let mut answered = vec![false; count];
    let mut answered_count = 0;
    let mut pending = 0;
    let mut rss_at_tenth = None;
    while let Some(answer) = answers.next().await {
        let answer = answer.unwrap();
        let index = usize::try_from(answer.index).unwrap();
        assert!(answer.error.is_none(), "{answer:?}");
        assert_eq!(answer.request_id, format!("scale-{index}"));
        assert!(
            !std::mem::replace(&mut answered[index], true),
            "item {index} answered twice"
        );
        if answer.state == DeliveryState::Pending as i32 {
            pending += 1;
        } else {
            assert_eq!(answer.state, DeliveryState::Applied as i32, "{answer:?}");
        }
        answered_count += 1;
        if answered_count == count / 10 {
            rss_at_tenth = Some(gateway.peak_rss());
        }
    }
    let elapsed = started.elapsed();
    let rss_at_end = gateway.peak_rss();
    assert_eq!(answered_count, count, "every item answered");

    until_settled(&mut gateway.client).await;
    for pkey in pkeys.iter() {
        assert_eq!(emulator.profile(pkey).unwrap()["ccpaOptOut"], true);
    }
    let ledger = Ledger::open(&store.location).await.unwrap();
    let records: Vec<_> = futures::TryStreamExt::try_collect(ledger.export(0, i64::MAX))
        .await
        .unwrap();
    assert_eq!(records.len(), count, "each item recorded once");
    assert!(records.iter().all(|r| r.state == State::Applied));

    let rss_at_tenth = rss_at_tenth.unwrap_or(rss_at_start);
    eprintln!(
        "bulk at scale: {count} items in {:.1} s = {:.0} items/s ({pending} answered PENDING, \
         delivered after); gateway peak RSS {} MiB at start, {} MiB after {} items, {} MiB \
         after {count}",
        elapsed.as_secs_f64(),
        count as f64 / elapsed.as_secs_f64(),
        rss_at_start / MIB,
        rss_at_tenth / MIB,
        count / 10,
        rss_at_end / MIB,
    );
    assert!(
        rss_at_end <= rss_at_tenth + GROWTH_ALLOWED,
        "the gateway's peak RSS grew from {} MiB to {} MiB over the stream",
        rss_at_tenth / MIB,
        rss_at_end / MIB
    );
}
