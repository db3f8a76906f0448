//! `ccpa-bench`: what the gateway costs on top of calling ACS directly.
//!
//! For each scenario, in one run and against one emulator (a separate process, with the
//! scenario's latency), the same operations are made twice: directly with the client crate from
//! this process (the floor for that work), then through a gateway (another process). The report
//! gives both, overall and by method (`by_method`), their ratios, and the gateway's CPU time per
//! call and peak RSS read from `/proc` (with a ledger on this machine's PostgreSQL, the server's
//! CPU per call too). `BENCHMARKS.md` records the figures.
//!
//! The benchmark is a binary of its own, so that the production binary holds what production
//! runs. The emulator and the gateway it measures are this binary run as `ccpa-bench gateway
//! ...`, which is `ccpa-gateway ...`: the same library, allocator and build profile.

mod bulk;
mod export;
mod load;
mod processes;
mod tls;

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use acs_emulator::EmulatorConfig;
use acs_profile_client::{
    AccessToken, CallError, CallSettings, Client, ClientConfig, SharedToken, ThrottleSettings,
    types,
};
use clap::{Args, Parser, ValueEnum};
use serde_json::{Value, json};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use ccpa_gateway::cli::exit_codes;
use ccpa_gateway::proto::ccpa_v1::ccpa_service_client::CcpaServiceClient;
use ccpa_gateway::proto::ccpa_v1::{GetOptOutRequest, RequestSource, SetOptOutRequest};
use load::{Method, drive, round};
use processes::{GatewayLimits, postgres_server_cpu, start_emulator, start_gateway, usage};

/// `ccpa-bench`'s arguments.
#[derive(Parser)]
#[command(
    name = "ccpa-bench",
    about = "Measure the gateway against calling Adobe Campaign directly (emulated), and report"
)]
struct BenchArgs {
    /// Which scenario to run.
    #[arg(long, value_enum, default_value = "all")]
    scenario: ScenarioChoice,
    /// Run every scenario briefly (under a minute in all): a smoke check, not a measurement.
    #[arg(long)]
    quick: bool,
    /// Print one JSON object with the figures instead of a table.
    #[arg(long)]
    json: bool,
    /// Measured time of each phase (default 15 s, 3 s with --quick).
    #[arg(long, value_parser = ccpa_gateway::config::duration_within(Duration::from_millis(100), Duration::from_secs(3600)))]
    duration: Option<Duration>,
    /// Unmeasured warm-up before each phase (default 3 s, 0.5 s with --quick).
    #[arg(long, value_parser = ccpa_gateway::config::duration_within(Duration::ZERO, Duration::from_secs(3600)))]
    warmup: Option<Duration>,
    /// Log filter of the gateway: `info` (a line per call, as in production) or `warn` (to see
    /// what those lines cost).
    #[arg(long, value_enum, default_value = "info")]
    gateway_log: GatewayLog,
    /// Requests to ACS in progress at once, for the gateway and the direct client alike,
    /// instead of the scenario's own value.
    #[arg(long)]
    max_in_flight: Option<usize>,
    /// Calls in flight at once, instead of the scenario's own value.
    #[arg(long)]
    concurrency: Option<usize>,
    /// The share of SetOptOut calls (0 to 1), instead of the scenario's own value: `fanout
    /// --set-share 0` shows what the durable writes of its SetOptOuts cost.
    #[arg(long, value_parser = share)]
    set_share: Option<f64>,
    /// Items in the stream of the `bulk` and `bulk-record-only` scenarios (default 100,000,
    /// 2,000 with --quick).
    #[arg(long)]
    items: Option<usize>,
    /// Records in the ledger of the `export` scenario (default 200,000, 2,000 with --quick).
    #[arg(long)]
    records: Option<u64>,
    /// Worker threads of the gateway (the load generator and the emulator have one each).
    #[arg(long)]
    gateway_threads: Option<usize>,
    /// The gateway's ledger: a `postgres://` URL, or a SQLite file path. Default: a new SQLite
    /// file in the temporary directory for each scenario, deleted afterwards.
    #[arg(long)]
    ledger: Option<String>,
    /// Also measure each scenario through a second gateway serving mutual TLS (certificates
    /// made for the run, the load generator's identity allowed everything), reported as
    /// `gateway_tls` beside the plaintext figures.
    #[arg(long, conflicts_with = "target_addr")]
    tls: bool,
    /// Also measure each scenario through a gateway with metrics and tracing off
    /// (`--trace-context false`, no `--metrics-listen`), reported as `gateway_observability_off`
    /// beside the main figures, which are taken with both on (as deployed: Prometheus metrics
    /// served, W3C trace context taken and sent on, OTLP export off).
    #[arg(long, conflicts_with = "target_addr")]
    compare_observability: bool,
    /// Webhook recipients the gateway notifies of every request (`serve --recipients`): each a
    /// `webhook-receiver` process on loopback, verifying every signature. The report adds the
    /// notifications delivered per second during the measured phase.
    #[arg(long, default_value_t = 0, conflicts_with = "target_addr",
          value_parser = clap::value_parser!(u16).range(0..=16))]
    recipients: u16,
    #[command(flatten)]
    target: Target,
}

/// A gateway, and the emulator it calls, started elsewhere: measured instead of starting both.
/// The emulator must use the default tenant and credentials; its latency is whatever it was
/// started with, so the scenario's latency does not apply.
#[derive(Args, Clone)]
struct Target {
    /// Address of the running gateway.
    #[arg(long, requires = "target_emulator_url")]
    target_addr: Option<SocketAddr>,
    /// Its process id, to read its CPU time and peak RSS.
    #[arg(long, requires = "target_addr")]
    target_pid: Option<i32>,
    /// URL of the emulator that gateway calls; the baseline calls it directly.
    #[arg(long, requires = "target_addr")]
    target_emulator_url: Option<String>,
    /// The emulator's process id, to read its CPU time.
    #[arg(long, requires = "target_addr")]
    target_emulator_pid: Option<i32>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum GatewayLog {
    Info,
    Warn,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ScenarioChoice {
    All,
    Cpu,
    Fanout,
    Ledger,
    Flood,
    Bulk,
    /// The bulk stream with every item `record_only`: answered once recorded. Also spelled as
    /// its key in the JSON report.
    #[value(alias = "bulk_record_only")]
    BulkRecordOnly,
    /// `records export` and `records --overdue` over a large ledger.
    Export,
}

/// One load shape.
#[derive(Debug, Clone, Copy)]
struct Scenario {
    name: &'static str,
    /// Latency the emulator adds to every answer, standing for ACS's response time.
    upstream_latency: Duration,
    /// Calls in flight at once.
    concurrency: usize,
    /// Share of calls that are SetOptOut (a write and a read-back); the rest are GetOptOut.
    set_share: f64,
    /// Requests to ACS in progress at once, at most: the same for the gateway and the direct
    /// client, so that both do the same work under the same limit.
    max_in_flight: usize,
}

const SCENARIOS: [Scenario; 4] = [
    Scenario {
        name: "cpu",
        upstream_latency: Duration::ZERO,
        concurrency: 64,
        set_share: 0.0,
        max_in_flight: 256,
    },
    Scenario {
        name: "fanout",
        upstream_latency: Duration::from_millis(50),
        concurrency: 1_000,
        set_share: 0.1,
        max_in_flight: 2_048,
    },
    Scenario {
        name: "ledger",
        upstream_latency: Duration::ZERO,
        concurrency: 64,
        set_share: 1.0,
        max_in_flight: 256,
    },
    Scenario {
        name: "flood",
        upstream_latency: Duration::from_millis(200),
        concurrency: 10_000,
        set_share: 0.0,
        max_in_flight: 1_024,
    },
];

/// Profiles the load is spread over.
const PROFILES: usize = 512;
/// Deadline of every call: long enough that only a real failure fails one.
const CALL_DEADLINE: Duration = Duration::from_secs(30);
/// Streams per connection from the load generator to the gateway (HTTP/2 servers commonly
/// allow 100 to 200 at once; more wait for a free stream).
const STREAMS_PER_CONNECTION: usize = 100;

/// The allocator of the gateway binary: the gateway measured is this binary (`ccpa-bench
/// gateway ...`), and must allocate as production does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The first argument that makes this binary run the gateway's command line instead.
const GATEWAY: &str = "gateway";

fn main() -> ExitCode {
    let mut args = std::env::args_os();
    let program = args.next();
    let rest: Vec<_> = args.collect();
    if rest.first().is_some_and(|first| first == GATEWAY) {
        return ccpa_gateway::cli::run_from(program.into_iter().chain(rest.into_iter().skip(1)));
    }
    let args = BenchArgs::parse();
    let _telemetry = ccpa_gateway::telemetry::init(
        ccpa_gateway::telemetry::LogFormat::Human,
        &ccpa_gateway::telemetry::TraceSettings::default(),
    );
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if std::env::var_os(ccpa_gateway::cli::WORKER_THREADS).is_none() {
        // The load generator shares the machine with the gateway and the emulator it starts;
        // each gets one worker thread, unless TOKIO_WORKER_THREADS says otherwise.
        runtime.worker_threads(1);
    }
    match runtime.build() {
        Ok(runtime) => ExitCode::from(runtime.block_on(run(args))),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::from(exit_codes::FAILURE)
        }
    }
}

/// Runs the benchmark and prints the report.
async fn run(args: BenchArgs) -> u8 {
    // Quick: under a minute in all, set-up (processes, 512 profiles per scenario) included.
    let (default_warmup, default_duration) = if args.quick {
        (Duration::from_millis(500), Duration::from_secs(3))
    } else {
        (Duration::from_secs(3), Duration::from_secs(15))
    };
    let warmup = args.warmup.unwrap_or(default_warmup);
    let duration = args.duration.unwrap_or(default_duration);
    let chosen: Vec<Scenario> = SCENARIOS
        .into_iter()
        .filter(|s| match args.scenario {
            ScenarioChoice::All => true,
            ScenarioChoice::Cpu => s.name == "cpu",
            ScenarioChoice::Fanout => s.name == "fanout",
            ScenarioChoice::Ledger => s.name == "ledger",
            ScenarioChoice::Flood => s.name == "flood",
            ScenarioChoice::Bulk | ScenarioChoice::BulkRecordOnly | ScenarioChoice::Export => false,
        })
        .collect();
    let log_filter = match args.gateway_log {
        GatewayLog::Info => "info",
        // The start-up line carries the address the benchmark needs.
        GatewayLog::Warn => "warn,ccpa_gateway::cli=info",
    };

    if let Some(ledger) = &args.ledger
        && (ledger.starts_with("postgres://") || ledger.starts_with("postgresql://"))
        && !local_postgres(ledger)
    {
        eprintln!(
            "note: the ledger's PostgreSQL is not on this machine: its server's CPU is not reported"
        );
    }
    let mut scenarios = serde_json::Map::new();
    for mut scenario in chosen {
        if let Some(max_in_flight) = args.max_in_flight {
            scenario.max_in_flight = max_in_flight;
        }
        if let Some(concurrency) = args.concurrency {
            scenario.concurrency = concurrency;
        }
        if let Some(set_share) = args.set_share {
            scenario.set_share = set_share;
        }
        if !args.json {
            eprintln!(
                "running {} ({} concurrent, {} ms upstream, {:.0}% SetOptOut) ...",
                scenario.name,
                scenario.concurrency,
                scenario.upstream_latency.as_millis(),
                scenario.set_share * 100.0
            );
        }
        let gateway = GatewaySetup {
            log_filter,
            worker_threads: args.gateway_threads,
            ledger: args.ledger.clone(),
            recipients: args.recipients,
        };
        let run = run_scenario(
            scenario,
            warmup,
            duration,
            gateway,
            &args.target,
            args.tls,
            args.compare_observability,
        );
        match run.await {
            Ok(report) => {
                if !args.json {
                    print_report(scenario, &report);
                }
                scenarios.insert(scenario.name.to_owned(), report);
            }
            Err(e) => {
                eprintln!("error: scenario {}: {e}", scenario.name);
                return exit_codes::FAILURE;
            }
        }
    }
    for (name, record_only) in [("bulk", false), ("bulk_record_only", true)] {
        let wanted = match args.scenario {
            ScenarioChoice::All => true,
            ScenarioChoice::Bulk => !record_only,
            ScenarioChoice::BulkRecordOnly => record_only,
            _ => false,
        };
        if !wanted {
            continue;
        }
        let items = args
            .items
            .unwrap_or(if args.quick { 2_000 } else { 100_000 });
        if !args.json {
            eprintln!("running {name} ({items} items in one stream) ...");
        }
        let gateway = GatewaySetup {
            log_filter,
            worker_threads: args.gateway_threads,
            ledger: args.ledger.clone(),
            recipients: 0,
        };
        match bulk::run(items, gateway, record_only).await {
            Ok(report) => {
                if !args.json {
                    bulk::print_report(name, &report);
                }
                scenarios.insert(name.to_owned(), report);
            }
            Err(e) => {
                eprintln!("error: scenario {name}: {e}");
                return exit_codes::FAILURE;
            }
        }
    }
    if matches!(args.scenario, ScenarioChoice::All | ScenarioChoice::Export) {
        let records = args
            .records
            .unwrap_or(if args.quick { 2_000 } else { 200_000 });
        if !args.json {
            eprintln!("running export ({records} records) ...");
        }
        match export::run(records).await {
            Ok(report) => {
                if !args.json {
                    export::print_report(&report);
                }
                scenarios.insert("export".to_owned(), report);
            }
            Err(e) => {
                eprintln!("error: scenario export: {e}");
                return exit_codes::FAILURE;
            }
        }
    }
    if args.json {
        let report = json!({
            "machine": machine(),
            "quick": args.quick,
            "warmup_s": warmup.as_secs_f64(),
            "duration_s": duration.as_secs_f64(),
            "scenarios": scenarios,
        });
        println!("{report}");
    }
    exit_codes::OK
}

fn machine() -> Value {
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "kernel": procfs::sys::kernel::Version::current()
            .map(|v| format!("{}.{}.{}", v.major, v.minor, v.patch))
            .unwrap_or_default(),
    })
}

/// How the gateway process is started.
#[derive(Clone)]
struct GatewaySetup {
    log_filter: &'static str,
    worker_threads: Option<usize>,
    ledger: Option<String>,
    /// Webhook receivers the gateway notifies (`--recipients`).
    recipients: u16,
}

/// CPU time used per call by each process during one measured phase.
struct PhaseCpu {
    load_generator: Duration,
    emulator: Option<Duration>,
    gateway: Option<Duration>,
    /// The PostgreSQL server's, when the gateway's ledger is on this machine's PostgreSQL.
    store_server: Option<Duration>,
}

impl PhaseCpu {
    fn per_call_json(&self, calls: u64) -> Value {
        let per_call = |cpu: Duration| round(cpu.as_secs_f64() * 1e6 / calls.max(1) as f64, 1);
        json!({
            "load_generator": per_call(self.load_generator),
            "emulator": self.emulator.map(per_call),
            "gateway": self.gateway.map(per_call),
        })
    }

    /// Adds `store_server_cpu_us_per_call` to a report when the server's CPU was read: the
    /// PostgreSQL server's CPU over the gateway's calls, every method's (in the `ledger`
    /// scenario every call is a SetOptOut). Absent otherwise (a SQLite ledger has no server).
    fn add_store_server(&self, calls: u64, report: &mut Value) {
        if let (Some(cpu), Some(report)) = (self.store_server, report.as_object_mut()) {
            let us = round(cpu.as_secs_f64() * 1e6 / calls.max(1) as f64, 1);
            report.insert("store_server_cpu_us_per_call".into(), us.into());
        }
    }
}

/// Whether a `--ledger` is a PostgreSQL on this machine, whose server processes the benchmark
/// can read in `/proc`: a `postgres://` URL whose host (or `host`/`hostaddr` parameters) is a
/// loopback address, `localhost`, a Unix socket directory, or left out (the local socket).
fn local_postgres(ledger: &str) -> bool {
    let Some(rest) = ledger
        .strip_prefix("postgres://")
        .or_else(|| ledger.strip_prefix("postgresql://"))
    else {
        return false;
    };
    let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
    let authority = before_query.split('/').next().unwrap_or_default();
    let host_port = authority.rsplit('@').next().unwrap_or_default();
    let url_hosts = match host_port.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next().unwrap_or_default(),
        None => host_port.split(':').next().unwrap_or_default(),
    };
    let given: Vec<&str> = query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .filter(|(key, _)| *key == "host" || *key == "hostaddr")
        .map(|(_, value)| value)
        .collect();
    let hosts = if given.is_empty() {
        vec![url_hosts]
    } else {
        given
    };
    hosts.iter().all(|host| {
        let host = host.replace("%2F", "/").replace("%2f", "/");
        host.is_empty()
            || host.starts_with('/')
            || host.eq_ignore_ascii_case("localhost")
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    })
}

/// Runs one measured phase and reads the CPU each process used during it, and the PostgreSQL
/// server's when `store_server` is given.
async fn measured<F, Fut>(
    concurrency: usize,
    duration: Duration,
    operation: F,
    emulator_pid: Option<i32>,
    gateway_pid: Option<i32>,
    store_server: bool,
) -> Result<(load::LoadResult, PhaseCpu), String>
where
    F: Fn(usize, u64) -> (Method, Fut) + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    let own_pid = i32::try_from(std::process::id()).map_err(|e| e.to_string())?;
    let server = || {
        if store_server {
            postgres_server_cpu()
        } else {
            Ok(None)
        }
    };
    // The server is read outside the load generator's own readings, so that reading every
    // process in /proc is not counted as the load generator's.
    let server_before = server()?;
    let before = (
        usage(own_pid)?,
        emulator_pid.map(usage).transpose()?,
        gateway_pid.map(usage).transpose()?,
    );
    let result = drive(concurrency, duration, operation).await;
    let after = (
        usage(own_pid)?,
        emulator_pid.map(usage).transpose()?,
        gateway_pid.map(usage).transpose()?,
    );
    let server_after = server()?;
    let cpu = PhaseCpu {
        load_generator: after.0.cpu - before.0.cpu,
        emulator: after.1.zip(before.1).map(|(a, b)| a.cpu - b.cpu),
        gateway: after.2.zip(before.2).map(|(a, b)| a.cpu - b.cpu),
        store_server: server_after
            .zip(server_before)
            .map(|(a, b)| a.saturating_sub(b)),
    };
    Ok((result, cpu))
}

async fn run_scenario(
    scenario: Scenario,
    warmup: Duration,
    duration: Duration,
    gateway_setup: GatewaySetup,
    target: &Target,
    with_tls: bool,
    compare_observability: bool,
) -> Result<Value, String> {
    let (emulator, emulator_url, emulator_pid) = match &target.target_emulator_url {
        Some(url) => (None, url.clone(), target.target_emulator_pid),
        None => {
            let (process, url) = start_emulator(scenario.upstream_latency).await?;
            let pid = process.pid();
            (Some(process), url, Some(pid))
        }
    };
    let tls = if with_tls {
        Some(tls::BenchTls::new()?)
    } else {
        None
    };
    let direct = direct_client(&emulator_url, scenario.max_in_flight)?;
    let profiles = Arc::new(create_profiles(&direct, PROFILES, "bench").await?);

    // The floor: the same operations, straight to the emulator.
    let operation = direct_operation(direct.clone(), profiles.clone(), scenario.set_share);
    drive(scenario.concurrency, warmup, operation.clone()).await;
    let (direct_result, direct_cpu) = measured(
        scenario.concurrency,
        duration,
        operation,
        emulator_pid,
        None,
        false,
    )
    .await?;

    // The same through the gateway.
    let phase = GatewayPhase {
        scenario,
        warmup,
        duration,
        setup: &gateway_setup,
        target,
        emulator_url: &emulator_url,
        emulator_pid,
        profiles: &profiles,
    };
    let (gateway_result, gateway_cpu, gateway_peak_rss, notified) =
        phase.run(None, Observability::On).await?;
    let without_notified =
        |(result, cpu, rss, _): (load::LoadResult, PhaseCpu, Option<u64>, Option<Value>)| {
            (result, cpu, rss)
        };
    let through_tls = match &tls {
        Some(tls) => Some(without_notified(
            phase.run(Some(tls), Observability::On).await?,
        )),
        None => None,
    };
    let observability_off = if compare_observability {
        Some(without_notified(phase.run(None, Observability::Off).await?))
    } else {
        None
    };
    // The gateway's CPU per call against the load generator's per direct call, in this run:
    // what the issue on metrics bounds (2.5 for GetOptOut).
    let direct_load_us =
        direct_cpu.load_generator.as_secs_f64() * 1e6 / direct_result.calls().max(1) as f64;
    let against_direct = |gateway_us: Option<f64>| {
        gateway_us.map(|us| round(us / direct_load_us.max(f64::MIN_POSITIVE), 3))
    };
    let compared = |(result, cpu, peak_rss): (load::LoadResult, PhaseCpu, Option<u64>)| {
        other_gateway_phase(&result, &cpu, peak_rss, &direct_result, direct_load_us)
    };
    let gateway_observability_off = observability_off.map(compared);
    if let Some(emulator) = emulator {
        emulator.stop().await;
    }

    let gateway_cpu_us_per_call = gateway_cpu
        .gateway
        .map(|cpu| cpu.as_secs_f64() * 1e6 / gateway_result.calls().max(1) as f64);
    let gateway_tls = through_tls.map(compared);
    let mut report = json!({
        "concurrency": scenario.concurrency,
        "upstream_latency_ms": scenario.upstream_latency.as_millis() as u64,
        "set_share": scenario.set_share,
        "max_in_flight": scenario.max_in_flight,
        "direct": direct_result.to_json(),
        "gateway": gateway_result.to_json(),
        "throughput_ratio": round(gateway_result.throughput() / direct_result.throughput().max(f64::MIN_POSITIVE), 3),
        "added_p50_ms": round(gateway_result.quantile_ms(0.5) - direct_result.quantile_ms(0.5), 3),
        "added_p99_ms": round(gateway_result.quantile_ms(0.99) - direct_result.quantile_ms(0.99), 3),
        "gateway_cpu_s_per_1000_calls": gateway_cpu_us_per_call.map(|us| round(us / 1000.0, 4)),
        "gateway_cpu_us_per_call": gateway_cpu_us_per_call.map(|us| round(us, 1)),
        "gateway_cpu_per_direct_load_generator_cpu": against_direct(gateway_cpu_us_per_call),
        "gateway_peak_rss_mb": gateway_peak_rss.map(|bytes| round(bytes as f64 / 1_048_576.0, 1)),
        "gateway_observability_off": gateway_observability_off,
        "cpu_us_per_call": {
            "direct": direct_cpu.per_call_json(direct_result.calls()),
            "gateway": gateway_cpu.per_call_json(gateway_result.calls()),
        },
        "gateway_tls": gateway_tls,
        "notifications": notified,
    });
    gateway_cpu.add_store_server(gateway_result.calls(), &mut report);
    Ok(report)
}

/// The figures of a second gateway phase (over TLS, or with metrics and tracing off) against
/// the direct phase of the same run.
fn other_gateway_phase(
    result: &load::LoadResult,
    cpu: &PhaseCpu,
    peak_rss: Option<u64>,
    direct: &load::LoadResult,
    direct_load_us: f64,
) -> Value {
    let cpu_us_per_call = cpu
        .gateway
        .map(|cpu| cpu.as_secs_f64() * 1e6 / result.calls().max(1) as f64);
    let mut report = json!({
        "gateway": result.to_json(),
        "throughput_ratio": round(result.throughput() / direct.throughput().max(f64::MIN_POSITIVE), 3),
        "added_p50_ms": round(result.quantile_ms(0.5) - direct.quantile_ms(0.5), 3),
        "added_p99_ms": round(result.quantile_ms(0.99) - direct.quantile_ms(0.99), 3),
        "gateway_cpu_us_per_call": cpu_us_per_call.map(|us| round(us, 1)),
        "gateway_cpu_per_direct_load_generator_cpu":
            cpu_us_per_call.map(|us| round(us / direct_load_us.max(f64::MIN_POSITIVE), 3)),
        "gateway_peak_rss_mb": peak_rss.map(|bytes| round(bytes as f64 / 1_048_576.0, 1)),
        "cpu_us_per_call": cpu.per_call_json(result.calls()),
    });
    cpu.add_store_server(result.calls(), &mut report);
    report
}

/// The measured phase through a gateway: the one given by `--target-addr`, or one started for
/// it (with mutual TLS when `tls` is given) on a ledger of its own.
struct GatewayPhase<'a> {
    scenario: Scenario,
    warmup: Duration,
    duration: Duration,
    setup: &'a GatewaySetup,
    target: &'a Target,
    emulator_url: &'a str,
    emulator_pid: Option<i32>,
    profiles: &'a Arc<Vec<String>>,
}

/// Whether a started gateway serves metrics and takes and gives trace context.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Observability {
    /// `--metrics-listen` on a loopback port, trace context on (the default), OTLP off.
    On,
    /// `--trace-context false`, no metrics.
    Off,
}

impl Observability {
    fn serve_args(self) -> Vec<String> {
        match self {
            Self::On => vec!["--metrics-listen".into(), "127.0.0.1:0".into()],
            Self::Off => vec!["--trace-context".into(), "false".into()],
        }
    }
}

impl GatewayPhase<'_> {
    async fn run(
        &self,
        tls: Option<&tls::BenchTls>,
        observability: Observability,
    ) -> Result<(load::LoadResult, PhaseCpu, Option<u64>, Option<Value>), String> {
        let scenario = self.scenario;
        let receivers = Receivers::start(self.setup.recipients).await?;
        let mut temporary_ledger = None;
        // The ledger of a gateway started elsewhere is not known here.
        let store_server = self.target.target_addr.is_none()
            && self.setup.ledger.as_deref().is_some_and(local_postgres);
        let (gateway, addr, gateway_pid) = match self.target.target_addr {
            Some(addr) => (None, addr, self.target.target_pid),
            None => {
                let limits = GatewayLimits {
                    max_in_flight: scenario.max_in_flight,
                    worker_threads: self.setup.worker_threads,
                    log_filter: self.setup.log_filter,
                };
                let ledger = self.setup.ledger.clone().unwrap_or_else(|| {
                    let file = std::env::temp_dir().join(format!(
                        "ccpa-bench-{}-{}{}{}.sqlite3",
                        std::process::id(),
                        scenario.name,
                        if tls.is_some() { "-tls" } else { "" },
                        if observability == Observability::Off {
                            "-plain"
                        } else {
                            ""
                        }
                    ));
                    temporary_ledger = Some(file.clone());
                    file.display().to_string()
                });
                let mut extra = tls.map(tls::BenchTls::serve_args).unwrap_or_default();
                extra.extend(observability.serve_args());
                extra.extend(receivers.serve_args());
                let (process, addr) =
                    start_gateway(self.emulator_url, &ledger, limits, &extra).await?;
                let pid = process.pid();
                (Some(process), addr, Some(pid))
            }
        };
        let channels = connect(addr, scenario.concurrency, tls.map(tls::BenchTls::client)).await?;
        let operation = gateway_operation(channels, self.profiles.clone(), scenario.set_share);
        drive(scenario.concurrency, self.warmup, operation.clone()).await;
        let delivered_before = receivers.delivered();
        let receivers_cpu_before = receivers.cpu()?;
        let (result, cpu) = measured(
            scenario.concurrency,
            self.duration,
            operation,
            self.emulator_pid,
            gateway_pid,
            store_server,
        )
        .await?;
        let delivered = receivers.delivered().saturating_sub(delivered_before);
        // The receivers run on this machine too, beside the gateway: what they took of it.
        let receivers_cpu = receivers.cpu()?.saturating_sub(receivers_cpu_before);
        let notified = (self.setup.recipients > 0).then(|| {
            json!({
                "recipients": self.setup.recipients,
                "delivered": delivered,
                "delivered_per_second": round(delivered as f64 / self.duration.as_secs_f64(), 1),
                "receivers_cpu_us_per_delivery":
                    round(receivers_cpu.as_secs_f64() * 1e6 / delivered.max(1) as f64, 1),
            })
        });
        let peak_rss = gateway_pid.map(usage).transpose()?.map(|u| u.peak_rss);
        if let Some(gateway) = gateway {
            gateway.stop().await;
        }
        if let Some(file) = temporary_ledger {
            for suffix in ["", "-wal", "-shm", ".lock"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", file.display()));
            }
        }
        Ok((result, cpu, peak_rss, notified))
    }
}

/// The webhook receivers of a gateway phase, and the recipients file naming them.
struct Receivers {
    dir: Option<tempfile::TempDir>,
    running: Vec<(processes::Process, Arc<std::sync::atomic::AtomicU64>)>,
}

impl Receivers {
    async fn start(count: u16) -> Result<Self, String> {
        if count == 0 {
            return Ok(Self {
                dir: None,
                running: Vec::new(),
            });
        }
        let dir = tempfile::tempdir().map_err(|e| format!("cannot make a directory: {e}"))?;
        let mut file = String::new();
        let mut running = Vec::new();
        for n in 0..count {
            let secret = dir.path().join(format!("receiver-{n}.secret"));
            // A fixed key is enough: the receivers are this run's own.
            std::fs::write(
                &secret,
                "whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
            )
            .map_err(|e| format!("cannot write a secret: {e}"))?;
            let (process, addr, delivered) = processes::start_receiver(&secret).await?;
            file.push_str(&format!(
                "[[recipient]]\nid = \"bench-{n}\"\nurl = \"http://{addr}/\"\nsecret_file = {:?}\n\
                 events = [\"opt-out\", \"opt-in\"]\nmax_rps = {}\n\n",
                secret.display().to_string(),
                ccpa_gateway::notify::recipients::MAX_RPS,
            ));
            running.push((process, delivered));
        }
        std::fs::write(dir.path().join("recipients.toml"), file)
            .map_err(|e| format!("cannot write the recipients file: {e}"))?;
        Ok(Self {
            dir: Some(dir),
            running,
        })
    }

    fn serve_args(&self) -> Vec<String> {
        self.dir.as_ref().map_or_else(Vec::new, |dir| {
            vec![
                "--recipients".into(),
                dir.path().join("recipients.toml").display().to_string(),
            ]
        })
    }

    /// CPU time the receivers have used so far.
    fn cpu(&self) -> Result<Duration, String> {
        self.running
            .iter()
            .try_fold(Duration::ZERO, |total, (process, _)| {
                Ok(total + usage(process.pid())?.cpu)
            })
    }

    /// Deliveries the receivers have verified and taken so far.
    fn delivered(&self) -> u64 {
        self.running
            .iter()
            .map(|(_, delivered)| delivered.load(std::sync::atomic::Ordering::Relaxed))
            .sum()
    }
}

fn direct_client(emulator_url: &str, max_in_flight: usize) -> Result<Client, String> {
    let config = ClientConfig {
        call: CallSettings {
            throttle: ThrottleSettings {
                max_rps: NonZeroU32::MAX,
                max_in_flight,
                max_queued: usize::MAX,
            },
            default_budget: CALL_DEADLINE,
            ..CallSettings::default()
        },
        ..ClientConfig::new(
            emulator_url,
            EmulatorConfig::DEFAULT_TENANT,
            EmulatorConfig::DEFAULT_API_KEY,
            Arc::new(SharedToken::new(AccessToken::new(
                EmulatorConfig::DEFAULT_ACCESS_TOKEN,
            ))),
        )
    };
    Client::from_config(config).map_err(|e| e.to_string())
}

/// `count` profiles, created through the API as a tenant's would be (half opted out), their
/// addresses numbered after `prefix`.
async fn create_profiles(
    client: &Client,
    count: usize,
    prefix: &str,
) -> Result<Vec<String>, String> {
    use futures::StreamExt;
    let created: Vec<Result<String, String>> = futures::stream::iter(0..count)
        .map(|i| async move {
            let input = types::ProfileInput {
                email: Some(format!("{prefix}-{i}@example.com")),
                ccpa_opt_out: Some(i % 2 == 0),
                ..Default::default()
            };
            let profile = client
                .add_profile(&input, Some(Instant::now() + CALL_DEADLINE))
                .await
                .map_err(|e| format!("creating a profile: {e}"))?;
            profile
                .p_key
                .ok_or_else(|| "a profile without a key".to_owned())
        })
        .buffer_unordered(64)
        .collect()
        .await;
    created.into_iter().collect()
}

/// A share from 0 to 1 (`--set-share`).
fn share(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(share) if (0.0..=1.0).contains(&share) => Ok(share),
        _ => Err("a share from 0 to 1".to_owned()),
    }
}

/// Which profile, and whether to set, for call `n` of worker `worker`.
fn pick(profiles: &[String], worker: usize, n: u64, set_share: f64) -> (String, bool) {
    // A fixed spread: every worker walks the profiles from its own offset, and sets on a fixed
    // share of its calls, so both runs make the same mix. The sets are spread evenly through a
    // worker's calls (one each time the running share passes a whole call), and each worker
    // starts at its own point of that pattern: writes and reads overlap all through a phase,
    // rather than every worker writing at once (10 calls in each 100, all at the start).
    let index = (worker.wrapping_mul(7919) + n as usize) % profiles.len();
    let position = n.wrapping_add((worker as u64).wrapping_mul(37)) as f64;
    let set = ((position + 1.0) * set_share).floor() > (position * set_share).floor();
    (profiles[index].clone(), set)
}

fn direct_operation(
    client: Client,
    profiles: Arc<Vec<String>>,
    set_share: f64,
) -> impl Fn(usize, u64) -> (Method, Call) + Clone + Send + Sync + 'static {
    move |worker, n| {
        let client = client.clone();
        let (pkey, set) = pick(&profiles, worker, n, set_share);
        let call: Call = Box::pin(async move {
            let deadline = Some(Instant::now() + CALL_DEADLINE);
            // What the gateway does for the same call: a read, or a write and a read-back.
            if set {
                client
                    .set_ccpa_opt_out(&pkey, n % 2 == 0, deadline)
                    .await
                    .map_err(|e| error_kind(&e))?;
            }
            match client.read_profile(&pkey, deadline).await {
                Ok(Some(_)) => Ok(()),
                Ok(None) => Err("empty collection".into()),
                Err(e) => Err(error_kind(&e)),
            }
        });
        (method(set), call)
    }
}

/// One call of the load: it fails with its error kind.
type Call = futures::future::BoxFuture<'static, Result<(), String>>;

/// The method a call of `pick` is: a SetOptOut when it sets, else a GetOptOut.
fn method(set: bool) -> Method {
    if set {
        Method::SetOptOut
    } else {
        Method::GetOptOut
    }
}

fn error_kind(error: &CallError) -> String {
    error.to_string()
}

fn gateway_operation(
    channels: Arc<Vec<Channel>>,
    profiles: Arc<Vec<String>>,
    set_share: f64,
) -> impl Fn(usize, u64) -> (Method, Call) + Clone + Send + Sync + 'static {
    move |worker, n| {
        let mut client = CcpaServiceClient::new(channels[worker % channels.len()].clone());
        let (pkey, set) = pick(&profiles, worker, n, set_share);
        let call: Call = Box::pin(async move {
            let result = if set {
                let mut request = tonic::Request::new(SetOptOutRequest {
                    pkey,
                    ccpa_opt_out: Some(n % 2 == 0),
                    source: RequestSource::Internal as i32,
                    ..Default::default()
                });
                request.set_timeout(CALL_DEADLINE);
                client.set_opt_out(request).await.map(|_| ())
            } else {
                let mut request = tonic::Request::new(GetOptOutRequest {
                    pkey,
                    ..Default::default()
                });
                request.set_timeout(CALL_DEADLINE);
                client.get_opt_out(request).await.map(|_| ())
            };
            result.map_err(|status| format!("{:?}", status.code()))
        });
        (method(set), call)
    }
}

async fn connect(
    addr: SocketAddr,
    concurrency: usize,
    tls: Option<ClientTlsConfig>,
) -> Result<Arc<Vec<Channel>>, String> {
    let count = concurrency.div_ceil(STREAMS_PER_CONNECTION).max(1);
    let mut channels = Vec::with_capacity(count);
    for _ in 0..count {
        let endpoint = match &tls {
            None => Endpoint::from_shared(format!("http://{addr}")),
            Some(_) => Endpoint::from_shared(format!("https://localhost:{}", addr.port())),
        }
        .map_err(|e| e.to_string())?;
        let endpoint = match &tls {
            None => endpoint,
            Some(tls) => endpoint
                .tls_config(tls.clone())
                .map_err(|e| e.to_string())?,
        };
        let channel = endpoint
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| format!("connecting to the gateway: {e}"))?;
        channels.push(channel);
    }
    Ok(Arc::new(channels))
}

fn print_report(scenario: Scenario, report: &Value) {
    let line = |label: &str, side: &Value| {
        println!(
            "  {label:<8} {:>9.0} calls/s   p50 {:>8.3} ms   p90 {:>8.3} ms   p99 {:>8.3} ms   max {:>9.3} ms   errors {}",
            side["throughput_per_s"].as_f64().unwrap_or(0.0),
            side["p50_ms"].as_f64().unwrap_or(0.0),
            side["p90_ms"].as_f64().unwrap_or(0.0),
            side["p99_ms"].as_f64().unwrap_or(0.0),
            side["max_ms"].as_f64().unwrap_or(0.0),
            side["errors"],
        );
        if let Some(methods) = side["by_method"].as_object() {
            for (name, figures) in methods {
                println!(
                    "    {name:<10} {:>8} calls      p50 {:>8.3} ms   p99 {:>8.3} ms",
                    figures["calls"],
                    figures["p50_ms"].as_f64().unwrap_or(0.0),
                    figures["p99_ms"].as_f64().unwrap_or(0.0),
                );
            }
        }
    };
    println!(
        "{}: {} concurrent, {} ms upstream",
        scenario.name,
        scenario.concurrency,
        scenario.upstream_latency.as_millis()
    );
    line("direct", &report["direct"]);
    line("gateway", &report["gateway"]);
    println!(
        "  throughput ratio {}   added p50 {} ms   added p99 {} ms   gateway CPU {} us/call ({} s per 1000)   gateway peak RSS {} MB",
        report["throughput_ratio"],
        report["added_p50_ms"],
        report["added_p99_ms"],
        report["gateway_cpu_us_per_call"],
        report["gateway_cpu_s_per_1000_calls"],
        report["gateway_peak_rss_mb"],
    );
    println!(
        "  CPU us per call: direct {}   through the gateway {}",
        report["cpu_us_per_call"]["direct"], report["cpu_us_per_call"]["gateway"],
    );
    if let Some(us) = report.get("store_server_cpu_us_per_call") {
        println!("  PostgreSQL server CPU {us} us per gateway call");
    }
    let tls = &report["gateway_tls"];
    if !tls.is_null() {
        line("mTLS", &tls["gateway"]);
        println!(
            "  over mutual TLS: throughput ratio {}   added p50 {} ms   added p99 {} ms   gateway CPU {} us/call   gateway peak RSS {} MB",
            tls["throughput_ratio"],
            tls["added_p50_ms"],
            tls["added_p99_ms"],
            tls["gateway_cpu_us_per_call"],
            tls["gateway_peak_rss_mb"],
        );
    }
    println!(
        "  gateway CPU per call / load generator CPU per direct call: {}",
        report["gateway_cpu_per_direct_load_generator_cpu"]
    );
    let off = &report["gateway_observability_off"];
    if !off.is_null() {
        line("no o11y", &off["gateway"]);
        println!(
            "  metrics and tracing off: throughput ratio {}   added p99 {} ms   gateway CPU {} us/call ({} of the load generator's per direct call)",
            off["throughput_ratio"],
            off["added_p99_ms"],
            off["gateway_cpu_us_per_call"],
            off["gateway_cpu_per_direct_load_generator_cpu"],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::local_postgres;

    #[test]
    fn a_ledger_on_this_machines_postgresql_is_recognised() {
        for ledger in [
            "postgres://postgres@127.0.0.1:5432/test",
            "postgres://postgres@127.0.0.1:5432/test?options[search_path]=benchpg",
            "postgresql://localhost/test",
            "postgres://u@[::1]:5432/db",
            "postgres:///test",
            "postgres:///test?host=/run/postgresql",
            "postgres://localhost/test?host=%2Frun%2Fpostgresql",
        ] {
            assert!(local_postgres(ledger), "{ledger}");
        }
        for ledger in [
            "/tmp/ledger.sqlite3",
            "postgres://ledger.corp.example/ccpa?sslmode=verify-full",
            "postgres://10.1.2.3/x",
            "postgres://127.0.0.1.corp.example/x",
            "postgres://127.0.0.1/ccpa?host=ledger.corp.example",
            "postgres://127.0.0.1/ccpa?hostaddr=10.0.0.5",
        ] {
            assert!(!local_postgres(ledger), "{ledger}");
        }
    }
}
