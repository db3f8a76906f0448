//! 100,000 opt-outs in one BulkSetOptOut stream, through a gateway process (so that its memory
//! is its own, read from `/proc`) on a PostgreSQL ledger (what replicas share) to the emulator: every item is answered once, every profile
//! ends opted out and is recorded once, and the gateway's peak memory does not grow with the
//! stream's length. The figures (items per second, peak RSS) are printed; run with
//! `--nocapture` to see them. `CCPA_BULK_SCALE_ITEMS` changes the number of items.
//!
//! This checks correctness and the memory bound, not speed: `cargo run --release -p ccpa-bench -- --scenario bulk`
//! measures throughput on a release build (see BENCHMARKS.md).

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
/// grow by is allocator and SQLite cache slack, well under this. Holding every item (no
/// back-pressure) would cost hundreds of MiB at this length.
const GROWTH_ALLOWED: u64 = 32 * MIB;

fn items() -> usize {
    std::env::var("CCPA_BULK_SCALE_ITEMS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100_000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_000_item_stream_is_applied_once_each_in_bounded_memory() {
    let count = items();
    let emulator = Emulator::start(EmulatorConfig {
        // The emulator keeps no log of 200,000 requests: its memory is not what is measured,
        // but it shares the machine.
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

/// Peak resident memory of a running process, from `/proc/<pid>/status` (`VmHWM`).
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status");
    kib * 1024
}

/// `records export` and `records --overdue` read a ledger of 200,000 records row by row: their
/// peak memory, read while the last rows are still to be written, stays far below what holding
/// the records would take (several hundred MiB here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_200_000_requests_are_exported_in_flat_memory() {
    use tokio::io::AsyncBufReadExt;
    const RECORDS: u64 = 200_000;
    const PEAK_ALLOWED: u64 = 64 * MIB;
    let store = Store::sqlite();
    let ledger = Ledger::open(&store.location).await.unwrap();
    drop(ledger);
    {
        let connection = rusqlite::Connection::open_with_flags(
            &store.location,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE,
        )
        .unwrap();
        connection
            .busy_timeout(std::time::Duration::from_secs(10))
            .unwrap();
        // Long pending (received in 1970): every one of them is overdue, too.
        connection
            .execute(
            "INSERT INTO opt_out_records (request_id, kind, pkey, opt_out, source, received_at, \
             received_at_given, recorded_at, caller, state, attempts, next_attempt_at) \
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < $1) \
             SELECT 'scale-' || i, 'SET_OPT_OUT', '@scale-profile-' || i, 1, 'WEB_FORM', \
             1000000 + i, 1, 1000000 + i, 'scale-test', 'PENDING', 0, 9000000000000 FROM n",
            [i64::try_from(RECORDS).unwrap()],
        )
        .unwrap();
        connection.close().map_err(|(_, e)| e).unwrap();
    }

    for (args, expected_code) in [
        (vec!["export", "--since", "1970-01-01T00:00:00Z"], Some(0)),
        (vec!["--overdue"], Some(6)),
    ] {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ccpa-gateway"))
            .args(["records", "--ledger", &store.location])
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let pid = child.id().unwrap();
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let mut read = 0u64;
        let mut peak = 0;
        while let Some(line) = lines.next_line().await.unwrap() {
            read += 1;
            if read == 1 {
                let first: serde_json::Value = serde_json::from_str(&line).unwrap();
                assert_eq!(first["requestId"], "scale-1", "{args:?}: oldest first");
            }
            if read == RECORDS * 9 / 10 {
                // The command cannot have ended: a tenth of its rows are still to be read.
                peak = peak_rss(pid);
            }
        }
        let status = child.wait().await.unwrap();
        assert_eq!(status.code(), expected_code, "{args:?}");
        assert_eq!(read, RECORDS, "{args:?}");
        println!("records {args:?}: peak RSS {} MiB", peak / MIB);
        assert!(
            peak < PEAK_ALLOWED,
            "{args:?}: peak RSS {} MiB while exporting",
            peak / MIB
        );
    }
}
