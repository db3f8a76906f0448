//! The benchmark command runs end to end (briefly, at low concurrency) and reports every figure
//! it promises. Speed is not asserted here: `BENCHMARKS.md` reports it.

use std::process::Command;

use serde_json::Value;

/// Checks a side's `by_method`: exactly the `methods` named, each with calls, p50 and p99, its
/// calls adding up to the side's. Returns it.
fn by_method<'a>(side: &'a Value, methods: &[&str], label: &str) -> &'a Value {
    let by_method = &side["by_method"];
    let named: Vec<&str> = by_method
        .as_object()
        .unwrap_or_else(|| panic!("{label}: no by_method: {side}"))
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(named, methods, "{label}: {side}");
    let mut calls = 0;
    for method in methods {
        let figures = &by_method[method];
        assert!(
            figures["calls"].as_u64().unwrap() > 0,
            "{label}.{method}: {side}"
        );
        calls += figures["calls"].as_u64().unwrap();
        let p50 = figures["p50_ms"].as_f64().unwrap();
        let p99 = figures["p99_ms"].as_f64().unwrap();
        assert!(0.0 < p50 && p50 <= p99, "{label}.{method}: {side}");
        assert_eq!(
            figures.as_object().unwrap().len(),
            3,
            "{label}.{method}: calls, p50_ms and p99_ms: {side}"
        );
    }
    assert_eq!(Some(calls), side["calls"].as_u64(), "{label}: {side}");
    by_method
}

/// Runs `ccpa-bench` with `args` (ending in `--json`), which must succeed, and returns its
/// report.
fn bench(args: &[&str]) -> Value {
    let output = Command::new(env!("CARGO_BIN_EXE_ccpa-bench"))
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}", String::from_utf8_lossy(&output.stdout));
    })
}

#[test]
fn a_short_benchmark_reports_every_figure() {
    // Each worker's first calls in a hundred are its SetOptOuts (two upstream calls of 50 ms
    // each): 5% of them, over 2 s, leave time for GetOptOuts in every phase.
    let report = bench(&[
        "--scenario",
        "fanout",
        "--concurrency",
        "8",
        "--set-share",
        "0.05",
        "--warmup",
        "200ms",
        "--duration",
        "2s",
        "--tls",
        "--json",
    ]);
    let fanout = &report["scenarios"]["fanout"];
    for key in [
        "throughput_ratio",
        "added_p50_ms",
        "added_p99_ms",
        "gateway_cpu_us_per_call",
        "gateway_cpu_s_per_1000_calls",
        "gateway_peak_rss_mb",
    ] {
        assert!(fanout[key].is_number(), "{key}: {fanout}");
    }
    for side in ["direct", "gateway"] {
        let figures = &fanout[side];
        assert!(figures["ok"].as_u64().unwrap() > 0, "{side}: {figures}");
        assert_eq!(
            figures["errors"],
            serde_json::json!({}),
            "{side}: {figures}"
        );
        for key in ["throughput_per_s", "p50_ms", "p90_ms", "p99_ms", "max_ms"] {
            assert!(
                figures[key].as_f64().unwrap() > 0.0,
                "{side}.{key}: {figures}"
            );
        }
    }
    // The same through a gateway serving mutual TLS.
    let tls = &fanout["gateway_tls"];
    for key in [
        "throughput_ratio",
        "added_p99_ms",
        "gateway_cpu_us_per_call",
    ] {
        assert!(tls[key].is_number(), "gateway_tls.{key}: {tls}");
    }
    assert!(tls["gateway"]["ok"].as_u64().unwrap() > 0, "{tls}");
    assert_eq!(tls["gateway"]["errors"], serde_json::json!({}), "{tls}");
    // Every side by method, the direct side naming its equivalents the same way.
    let methods = ["GetOptOut", "SetOptOut"];
    let direct = by_method(&fanout["direct"], &methods, "direct");
    let gateway = by_method(&fanout["gateway"], &methods, "gateway");
    by_method(&tls["gateway"], &methods, "gateway_tls");
    for by_method in [direct, gateway] {
        assert!(by_method["GetOptOut"]["p50_ms"].as_f64().unwrap() >= 50.0);
    }
    // A direct SetOptOut is a write and a read-back: two upstream calls.
    assert!(direct["SetOptOut"]["p50_ms"].as_f64().unwrap() >= 100.0);
    // A SQLite ledger has no server to measure.
    assert!(
        fanout.get("store_server_cpu_us_per_call").is_none(),
        "{fanout}"
    );
    assert!(tls.get("store_server_cpu_us_per_call").is_none(), "{tls}");
    // The scenario's 50 ms of upstream latency shows in both paths.
    assert!(fanout["direct"]["p50_ms"].as_f64().unwrap() >= 50.0);
    assert!(fanout["gateway"]["p50_ms"].as_f64().unwrap() >= 50.0);
    assert_eq!(
        report["machine"]["cpus"].as_u64(),
        Some(std::thread::available_parallelism().unwrap().get() as u64)
    );
}

#[test]
fn the_bulk_scenario_reports_throughput_and_memory() {
    let report = bench(&["--scenario", "bulk", "--items", "400", "--json"]);
    let bulk = &report["scenarios"]["bulk"];
    assert_eq!(bulk["items"], 400);
    assert_eq!(bulk["direct"]["errors"], 0, "{bulk}");
    assert_eq!(bulk["gateway"]["failed"], 0, "{bulk}");
    assert_eq!(
        bulk["gateway"]["applied"].as_u64().unwrap() + bulk["gateway"]["pending"].as_u64().unwrap(),
        400,
        "{bulk}"
    );
    for key in [
        "throughput_ratio",
        "gateway_cpu_us_per_item",
        "gateway_peak_rss_mb_after_a_tenth",
        "gateway_peak_rss_mb",
    ] {
        assert!(bulk[key].as_f64().unwrap() > 0.0, "{key}: {bulk}");
    }
    for side in ["direct", "gateway"] {
        assert!(
            bulk[side]["items_per_s"].as_f64().unwrap() > 0.0,
            "{side}: {bulk}"
        );
    }
}

#[test]
fn the_record_only_bulk_scenario_reports_intake_and_memory() {
    let report = bench(&["--scenario", "bulk_record_only", "--items", "400", "--json"]);
    assert!(
        report["scenarios"]["bulk"].is_null(),
        "only the scenario asked for"
    );
    let intake = &report["scenarios"]["bulk_record_only"];
    assert_eq!(intake["items"], 400);
    assert_eq!(intake["record_only"], true);
    // Every item is answered once recorded: PENDING, none applied within the stream.
    assert_eq!(intake["gateway"]["pending"], 400, "{intake}");
    assert_eq!(intake["gateway"]["applied"], 0, "{intake}");
    assert_eq!(intake["gateway"]["failed"], 0, "{intake}");
    for key in [
        "items_per_s",
        "gateway_cpu_us_per_item",
        "gateway_peak_rss_mb",
        "throughput_ratio",
    ] {
        assert!(intake[key].as_f64().unwrap() > 0.0, "{key}: {intake}");
    }
    assert!(
        intake["direct"]["items_per_s"].as_f64().unwrap() > 0.0,
        "{intake}"
    );
}

/// The export scenario at a size the suite can afford (the benchmark runs 200,000): the
/// commands' peak memory after nine tenths of 5,000 rows is what it was after the first 500.
/// Holding the rows would add several MB here (about a kB each, as records and as JSON).
#[test]
fn records_export_reads_a_ledger_in_flat_memory() {
    let report = bench(&["--scenario", "export", "--records", "5000", "--json"]);
    let export = &report["scenarios"]["export"];
    assert_eq!(export["records"], 5000, "{export}");
    for command in ["export", "overdue"] {
        let figures = &export[command];
        assert!(
            figures["rows_per_s"].as_f64().unwrap() > 0.0,
            "{command}: {export}"
        );
        let first = figures["peak_rss_mb_after_a_tenth"].as_f64().unwrap();
        let last = figures["peak_rss_mb_after_nine_tenths"].as_f64().unwrap();
        assert!(first > 0.0, "{command}: {export}");
        assert!(
            last <= first + 1.0,
            "{command}: peak RSS grew from {first} MB to {last} MB: {export}"
        );
    }
}

/// The PostgreSQL the tests use (as the gateway's own tests: `CCPA_TEST_POSTGRES_URL`, or the
/// one CI machines run on 127.0.0.1:5432 with trust auth).
fn postgres_url() -> String {
    std::env::var("CCPA_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// Runs `sql` in the test PostgreSQL database; fails (never skips) when none is reachable.
fn postgres(sql: String) {
    use sqlx::Connection;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut connection = sqlx::PgConnection::connect(&postgres_url())
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "PostgreSQL at {} is required by this test (set CCPA_TEST_POSTGRES_URL): {e}",
                    postgres_url()
                )
            });
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut connection)
            .await
            .unwrap();
        let _ = connection.close().await;
    });
}

/// A new schema in the test database, dropped when done with.
struct Schema(String);

impl Drop for Schema {
    fn drop(&mut self) {
        // The bench has stopped its gateway: nothing holds the schema's locks.
        postgres(format!("DROP SCHEMA IF EXISTS {} CASCADE", self.0));
    }
}

#[test]
fn a_postgresql_ledger_reports_its_servers_cpu() {
    let schema = Schema(format!("bench_test_{}", uuid::Uuid::new_v4().simple()));
    postgres(format!("CREATE SCHEMA {}", schema.0));
    let separator = if postgres_url().contains('?') {
        '&'
    } else {
        '?'
    };
    let ledger = format!(
        "{}{separator}options[search_path]={}",
        postgres_url(),
        schema.0
    );
    let report = bench(&[
        "--scenario",
        "ledger",
        "--concurrency",
        "4",
        "--warmup",
        "0s",
        "--duration",
        "1s",
        "--ledger",
        &ledger,
        "--json",
    ]);
    let scenario = &report["scenarios"]["ledger"];
    assert_eq!(
        scenario["gateway"]["errors"],
        serde_json::json!({}),
        "{scenario}"
    );
    // Every call of the scenario is a SetOptOut, and each one costs the server some CPU.
    by_method(&scenario["gateway"], &["SetOptOut"], "gateway");
    by_method(&scenario["direct"], &["SetOptOut"], "direct");
    assert!(
        scenario["store_server_cpu_us_per_call"].as_f64().unwrap() > 0.0,
        "{scenario}"
    );
}
