//! The `bulk` scenario: one BulkSetOptOut stream of many items, against the same opt-outs made
//! directly with the client crate (a write and a read-back each, as many at once as the
//! gateway's stream works on). It reports items per second both ways, the gateway's CPU per item
//! (and on a PostgreSQL ledger of this machine the server's, `store_server_cpu_us_per_item`),
//! and its peak RSS after a tenth of the stream and at its end: bounded memory shows as the two
//! being equal.
//!
//! `bulk_record_only` sends the same stream with every item `record_only`: each is answered
//! once durably recorded, and the gateway's deliverer applies them meanwhile, in the background.
//! Its `items_per_s` is the rate of intake; the direct figures are the same floor as `bulk`'s.
//!
//! Unlike the call scenarios, neither side reports `by_method`: each side makes one kind of
//! operation (one BulkSetOptOut stream; the same opt-outs as writes and read-backs), so a
//! breakdown by method would repeat the totals, and no reads wait behind the writes. Nor is a
//! latency per item reported: the stream's items wait in HTTP/2 flow control and in the
//! gateway's window of `BULK_CONCURRENCY` at once, so an item's time from being sent to being
//! answered measures its place in the stream more than its cost. The throughput is the figure.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};

use crate::processes::{GatewayLimits, postgres_server_cpu, start_emulator, start_gateway, usage};
use crate::{
    CALL_DEADLINE, GatewaySetup, connect, create_profiles, direct_client, error_kind,
    local_postgres,
};
use ccpa_gateway::api::bulk::BULK_CONCURRENCY;
use ccpa_gateway::proto::ccpa_v1::ccpa_service_client::CcpaServiceClient;
use ccpa_gateway::proto::ccpa_v1::{
    BulkSetOptOutRequest, DeliveryState, RequestSource, SetOptOutRequest,
};

/// Requests to ACS in progress at once, for the gateway and the direct client alike.
const MAX_IN_FLIGHT: usize = 256;

/// Runs the scenario with `items` opt-outs, each to its own profile.
pub async fn run(
    items: usize,
    gateway_setup: GatewaySetup,
    record_only: bool,
) -> Result<Value, String> {
    let (emulator, emulator_url) = start_emulator(Duration::ZERO).await?;
    let direct = direct_client(&emulator_url, MAX_IN_FLIGHT)?;
    let profiles = Arc::new(create_profiles(&direct, items, "bulk").await?);

    // The floor: the same opt-outs straight to the emulator, with the stream's concurrency.
    let started = Instant::now();
    let direct_errors = futures::stream::iter(profiles.iter().cloned())
        .map(|pkey| {
            let client = direct.clone();
            async move {
                let deadline = Some(Instant::now() + CALL_DEADLINE);
                client
                    .set_ccpa_opt_out(&pkey, true, deadline)
                    .await
                    .map_err(|e| error_kind(&e))?;
                client
                    .read_profile(&pkey, deadline)
                    .await
                    .map_err(|e| error_kind(&e))?;
                Ok::<(), String>(())
            }
        })
        .buffer_unordered(BULK_CONCURRENCY)
        .filter(|result| futures::future::ready(result.is_err()))
        .count()
        .await;
    let direct_elapsed = started.elapsed();

    let mut temporary_ledger = None;
    let ledger = gateway_setup.ledger.clone().unwrap_or_else(|| {
        let file =
            std::env::temp_dir().join(format!("ccpa-bench-{}-bulk.sqlite3", std::process::id()));
        temporary_ledger = Some(file.clone());
        file.display().to_string()
    });
    let limits = GatewayLimits {
        max_in_flight: MAX_IN_FLIGHT,
        worker_threads: gateway_setup.worker_threads,
        log_filter: gateway_setup.log_filter,
    };
    let (gateway, addr) = start_gateway(&emulator_url, &ledger, limits, &[]).await?;
    let channels = connect(addr, 1, None).await?;
    let mut client = CcpaServiceClient::new(channels[0].clone());
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let outbound_profiles = profiles.clone();
    let outbound = futures::stream::iter(0..items).map(move |i| BulkSetOptOutRequest {
        item: Some(SetOptOutRequest {
            pkey: outbound_profiles[i].clone(),
            ccpa_opt_out: Some(true),
            request_id: format!("bench-{run_id}-{i}"),
            source: RequestSource::Internal as i32,
            ..Default::default()
        }),
        record_only,
    });

    // The PostgreSQL server's CPU, when the ledger is on this machine's (see the call scenarios).
    let local_server = local_postgres(&ledger);
    let store_server = || {
        if local_server {
            postgres_server_cpu()
        } else {
            Ok(None)
        }
    };
    let server_before = store_server()?;
    let cpu_before = usage(gateway.pid())?.cpu;
    let started = Instant::now();
    let mut answers = client
        .bulk_set_opt_out(outbound)
        .await
        .map_err(|status| format!("BulkSetOptOut: {:?}", status.code()))?
        .into_inner();
    let (mut applied, mut pending, mut failed) = (0u64, 0u64, 0u64);
    let mut rss_after_a_tenth = None;
    while let Some(answer) = answers.next().await {
        let answer = answer.map_err(|status| format!("the stream broke: {:?}", status.code()))?;
        match (
            answer.error.is_some(),
            DeliveryState::try_from(answer.state),
        ) {
            (false, Ok(DeliveryState::Applied)) => applied += 1,
            (false, Ok(DeliveryState::Pending)) => pending += 1,
            _ => failed += 1,
        }
        if applied + pending + failed == (items / 10) as u64 {
            rss_after_a_tenth = Some(usage(gateway.pid())?.peak_rss);
        }
    }
    let gateway_elapsed = started.elapsed();
    let after = usage(gateway.pid())?;
    let server_cpu = store_server()?
        .zip(server_before)
        .map(|(after, before)| after.saturating_sub(before));
    gateway.stop().await;
    if let Some(file) = temporary_ledger {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", file.display()));
        }
    }
    emulator.stop().await;

    let per_s = |elapsed: Duration| crate::round(items as f64 / elapsed.as_secs_f64(), 1);
    let mb = |bytes: u64| crate::round(bytes as f64 / 1_048_576.0, 1);
    let gateway_cpu_us_per_item = crate::round(
        (after.cpu - cpu_before).as_secs_f64() * 1e6 / items.max(1) as f64,
        1,
    );
    let mut report = json!({
        "items": items,
        "record_only": record_only,
        "concurrency": BULK_CONCURRENCY,
        "items_per_s": per_s(gateway_elapsed),
        "direct": {
            "items_per_s": per_s(direct_elapsed),
            "errors": direct_errors,
        },
        "gateway": {
            "items_per_s": per_s(gateway_elapsed),
            "applied": applied,
            "pending": pending,
            "failed": failed,
        },
        "throughput_ratio": crate::round(direct_elapsed.as_secs_f64() / gateway_elapsed.as_secs_f64(), 3),
        "gateway_cpu_us_per_item": gateway_cpu_us_per_item,
        "gateway_peak_rss_mb_after_a_tenth": rss_after_a_tenth.map(mb),
        "gateway_peak_rss_mb": mb(after.peak_rss),
    });
    // Absent for a SQLite ledger, as in the call scenarios. With `record_only` the deliverer's
    // work after the stream ends is not in it, as it is not in `gateway_cpu_us_per_item`.
    if let (Some(cpu), Some(report)) = (server_cpu, report.as_object_mut()) {
        let us = crate::round(cpu.as_secs_f64() * 1e6 / items.max(1) as f64, 1);
        report.insert("store_server_cpu_us_per_item".into(), us.into());
    }
    Ok(report)
}

/// Prints the scenario's figures.
pub fn print_report(name: &str, report: &Value) {
    println!(
        "{name}: {} items, {} at once",
        report["items"], report["concurrency"]
    );
    println!(
        "  direct   {:>9.0} items/s   errors {}",
        report["direct"]["items_per_s"].as_f64().unwrap_or(0.0),
        report["direct"]["errors"]
    );
    println!(
        "  gateway  {:>9.0} items/s   applied {}   pending {}   failed {}",
        report["gateway"]["items_per_s"].as_f64().unwrap_or(0.0),
        report["gateway"]["applied"],
        report["gateway"]["pending"],
        report["gateway"]["failed"],
    );
    println!(
        "  throughput ratio {}   gateway CPU {} us/item   gateway peak RSS {} MB after a tenth, {} MB at the end",
        report["throughput_ratio"],
        report["gateway_cpu_us_per_item"],
        report["gateway_peak_rss_mb_after_a_tenth"],
        report["gateway_peak_rss_mb"],
    );
    if let Some(us) = report.get("store_server_cpu_us_per_item") {
        println!("  PostgreSQL server CPU {us} us/item");
    }
}
