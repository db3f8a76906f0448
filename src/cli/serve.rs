//! `serve` and `emulator`: the long-running commands.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use acs_emulator::{Emulator, EmulatorConfig, FaultSettings, demo_profiles};
use acs_profile_client::{AccessToken, Client, SharedToken};
use clap::Args;
use secrecy::SecretString;
use tokio::net::TcpListener;

use super::exit_codes;
use super::output::{CliError, Output, print_now};
use crate::config::{AcsSettings, LEDGER, ServeSettings, duration_within};
use crate::server;
use crate::store::Ledger;
use crate::telemetry::metrics::Exporter;

/// Arguments of `emulator`.
#[derive(Args)]
pub struct EmulatorArgs {
    /// Address to listen on.
    #[arg(long, env = "CCPA_EMULATOR_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Tenant name it answers for.
    #[arg(long, env = "CCPA_EMULATOR_TENANT", default_value = EmulatorConfig::DEFAULT_TENANT)]
    tenant: String,
    /// API key it expects in `X-Api-Key`.
    #[arg(long, env = "CCPA_EMULATOR_API_KEY", default_value = EmulatorConfig::DEFAULT_API_KEY)]
    api_key: String,
    /// Bearer token it accepts.
    #[arg(long, env = "CCPA_EMULATOR_ACCESS_TOKEN", default_value = EmulatorConfig::DEFAULT_ACCESS_TOKEN, hide_env_values = true)]
    access_token: String,
    /// Store a few demo profiles at start and print their keys.
    #[arg(long, env = "CCPA_EMULATOR_SEED_DEMO")]
    seed_demo: bool,
    /// Client id its IMS endpoint (`/ims/token/v3`) accepts.
    #[arg(long, env = "CCPA_EMULATOR_IMS_CLIENT_ID", default_value = EmulatorConfig::DEFAULT_IMS_CLIENT_ID)]
    ims_client_id: String,
    /// Client secret its IMS endpoint accepts.
    #[arg(long, env = "CCPA_EMULATOR_IMS_CLIENT_SECRET", default_value = EmulatorConfig::DEFAULT_IMS_CLIENT_SECRET, hide_env_values = true)]
    ims_client_secret: String,
    /// Lifetime of the tokens its IMS endpoint issues.
    #[arg(long, env = "CCPA_EMULATOR_TOKEN_LIFETIME", default_value = "86399s", value_parser = duration_within(Duration::from_secs(1), Duration::from_secs(7 * 24 * 3600)))]
    token_lifetime: Duration,
    /// Do not keep requests for inspection (they are only useful to tests): for benchmarks.
    #[arg(long, env = "CCPA_EMULATOR_NO_RECORD")]
    no_record: bool,
    #[command(flatten, next_help_heading = "Latency and failures")]
    faults: FaultArgs,
}

/// Latency and random failures of the emulated profile API.
#[derive(Args)]
struct FaultArgs {
    /// Added to every answer.
    #[arg(long, env = "CCPA_EMULATOR_LATENCY", default_value = "0ms", value_parser = duration_within(Duration::ZERO, Duration::from_secs(60)))]
    latency: Duration,
    /// Random extra latency, between zero and this.
    #[arg(long, env = "CCPA_EMULATOR_LATENCY_JITTER", default_value = "0ms", value_parser = duration_within(Duration::ZERO, Duration::from_secs(60)))]
    latency_jitter: Duration,
    /// Share of requests answered 429 with Retry-After (0 to 1).
    #[arg(long, env = "CCPA_EMULATOR_FAIL_429", default_value = "0", value_parser = rate)]
    fail_429: f64,
    /// The Retry-After of those 429 answers.
    #[arg(long, env = "CCPA_EMULATOR_RETRY_AFTER", default_value = "1s", value_parser = duration_within(Duration::ZERO, Duration::from_secs(3600)))]
    retry_after: Duration,
    /// Share of requests answered 500.
    #[arg(long, env = "CCPA_EMULATOR_FAIL_500", default_value = "0", value_parser = rate)]
    fail_500: f64,
    /// Share of requests answered 502 with an HTML body.
    #[arg(long, env = "CCPA_EMULATOR_FAIL_502", default_value = "0", value_parser = rate)]
    fail_502: f64,
    /// Share of requests answered 503.
    #[arg(long, env = "CCPA_EMULATOR_FAIL_503", default_value = "0", value_parser = rate)]
    fail_503: f64,
    /// Share of connections broken after the headers.
    #[arg(long, env = "CCPA_EMULATOR_FAIL_RESET", default_value = "0", value_parser = rate)]
    fail_reset: f64,
    /// Share of answers whose body stalls for --stall-for.
    #[arg(long, env = "CCPA_EMULATOR_FAIL_STALL", default_value = "0", value_parser = rate)]
    fail_stall: f64,
    /// How long a stalled body is held.
    #[arg(long, env = "CCPA_EMULATOR_STALL_FOR", default_value = "30s", value_parser = duration_within(Duration::ZERO, Duration::from_secs(3600)))]
    stall_for: Duration,
    /// Share of answers whose JSON is cut in half.
    #[arg(long, env = "CCPA_EMULATOR_FAIL_TRUNCATED", default_value = "0", value_parser = rate)]
    fail_truncated: f64,
    /// Share of answers that are not JSON.
    #[arg(long, env = "CCPA_EMULATOR_FAIL_MALFORMED", default_value = "0", value_parser = rate)]
    fail_malformed: f64,
}

impl FaultArgs {
    fn settings(&self) -> FaultSettings {
        FaultSettings {
            latency: self.latency,
            latency_jitter: self.latency_jitter,
            too_many_requests: self.fail_429,
            retry_after: self.retry_after,
            internal_error: self.fail_500,
            bad_gateway: self.fail_502,
            unavailable: self.fail_503,
            reset: self.fail_reset,
            stall: self.fail_stall,
            stall_for: self.stall_for,
            truncated: self.fail_truncated,
            malformed: self.fail_malformed,
        }
    }
}

fn rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if (0.0..=1.0).contains(&rate) => Ok(rate),
        _ => Err("a rate between 0 and 1".into()),
    }
}

/// Completes on Ctrl-C or SIGTERM.
pub(super) async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the server");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

/// Seeds demo profiles and prints their keys; names and emails are not printed.
fn seed_demo(emulator: &Emulator) -> Vec<(String, bool)> {
    demo_profiles()
        .into_iter()
        .map(|profile| {
            let opt_out = profile.ccpa_opt_out;
            (emulator.insert_profile(profile), opt_out)
        })
        .collect()
}

/// `serve`: runs the gateway until Ctrl-C or SIGTERM.
pub async fn serve(settings: ServeSettings) -> Result<Output, CliError> {
    let large_table = settings.emulator_large_table().map_err(CliError::usage)?;
    // The emulator must outlive the server, so it is held here even when unused.
    let (client, emulator) = if settings.emulator {
        start_embedded_emulator(&settings, large_table).await?
    } else {
        (settings.client().map_err(CliError::usage)?, None)
    };

    let options = settings.server_options().map_err(CliError::usage)?;

    let location = settings.ledger_location().map_err(CliError::usage)?;
    let ledger = Ledger::open(&location)
        .await
        .map_err(|e| CliError::usage(format!("{LEDGER}: {e}")))?;

    let (listener, listen) = super::listen_addr::listen(
        settings.listen,
        "--listen (CCPA_LISTEN)",
        settings.listen_addr_file.as_deref(),
        "--listen-addr-file (CCPA_LISTEN_ADDR_FILE)",
    )
    .await?;
    let health_listener = match settings.callers.health_listen {
        None => None,
        Some(addr) => {
            let listener = TcpListener::bind(addr).await.map_err(|e| {
                CliError::usage(format!(
                    "--health-listen (CCPA_HEALTH_LISTEN): cannot listen on {addr}: {e}"
                ))
            })?;
            let bound = listener.local_addr().unwrap_or(addr);
            tracing::info!(health_listen = %bound, "health listening (plaintext, health only)");
            Some(listener)
        }
    };
    let metrics_addr = settings.observability.metrics_listen.or_else(|| {
        settings
            .emulator
            .then_some(SocketAddr::from(([127, 0, 0, 1], 0)))
    });
    let metrics = match metrics_addr {
        None => None,
        Some(addr) => Some(bind_metrics(addr).await.map_err(CliError::usage)?),
    };
    let metrics_url = metrics
        .as_ref()
        .and_then(|(listener, _)| listener.local_addr().ok())
        .map(|addr| format!("http://{addr}/metrics"));
    if let Some(url) = &metrics_url {
        tracing::info!(url, "metrics listening (Prometheus, plaintext)");
    }
    tracing::info!(
        %listen,
        tls = options.boundary.tls.is_some(),
        caller_identity = %options.boundary.access.mode,
        // Configuration (workload names), not personal data: what an operator checks first
        // when a front proxy's calls are refused UNTRUSTED_PROXY.
        trusted_proxies = ?options.boundary.access.trusted_proxies,
        "gRPC server listening (health and reflection on)"
    );
    if let Some((emulator, profiles)) = &emulator {
        print_try_it(emulator, profiles, listen, metrics_url.as_deref())?;
    }

    let listeners = server::Listeners {
        grpc: listener,
        health: health_listener,
        metrics,
    };
    let result = server::serve(client, ledger, listeners, shutdown_signal(), options).await;
    drop(emulator);
    match result {
        Ok(()) => Ok(Output::nothing()),
        Err(e) => {
            // In the log, where operators look (and, with --log-format json, their tools).
            tracing::error!(error = %e, "the server stopped");
            Err(CliError::logged(exit_codes::FAILURE))
        }
    }
}

type EmbeddedEmulator = (Emulator, Vec<(String, bool)>);

/// Starts the emulator of `serve --emulator`; `large_table` makes its profile table answer as a
/// production tenant's does (see `EmulatorConfig::big_table_threshold`).
async fn start_embedded_emulator(
    settings: &ServeSettings,
    large_table: bool,
) -> Result<(Client, Option<EmbeddedEmulator>), CliError> {
    let config = EmulatorConfig {
        big_table_threshold: if large_table {
            EmulatorConfig::LARGE_TABLE
        } else {
            EmulatorConfig::DEFAULT_BIG_TABLE_THRESHOLD
        },
        ..EmulatorConfig::default()
    };
    let emulator = Emulator::start(config)
        .await
        .map_err(|e| CliError::failure(format!("cannot start the embedded emulator: {e}")))?;
    let profiles = seed_demo(&emulator);
    let tokens = Arc::new(SharedToken::new(AccessToken::new(
        emulator.config().access_token.as_str(),
    )));
    let towards_emulator = AcsSettings {
        acs_base_url: emulator.url(),
        ..settings.acs.clone()
    };
    let client = towards_emulator
        .client_for(
            emulator.config().tenant.clone(),
            SecretString::from(emulator.config().api_key.as_str()),
            tokens,
            settings.calls.settings(settings.acs.acs_timeout),
        )
        .map_err(|e| {
            CliError::failure(format!(
                "cannot build the client for the embedded emulator: {e}"
            ))
        })?;
    tracing::info!(url = %emulator.url(), large_table, "embedded Adobe Campaign emulator started");
    Ok((client, Some((emulator, profiles))))
}

/// Binds the metrics listener and installs the recorder.
async fn bind_metrics(addr: SocketAddr) -> Result<(TcpListener, Exporter), String> {
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        format!("--metrics-listen (CCPA_METRICS_LISTEN): cannot listen on {addr}: {e}")
    })?;
    let exporter = Exporter::install().map_err(|e| e.to_string())?;
    Ok((listener, exporter))
}

fn print_try_it(
    emulator: &Emulator,
    profiles: &[(String, bool)],
    listen: SocketAddr,
    metrics_url: Option<&str>,
) -> Result<(), CliError> {
    let addr = if listen.port() == 50051 && listen.ip().is_loopback() {
        String::new()
    } else {
        format!(" --addr http://{listen}")
    };
    let mut lines = vec![
        format!(
            "ccpa-gateway is serving on {listen}, backed by an in-memory Adobe Campaign emulator at {}.",
            emulator.url()
        ),
        "Demo profiles (made up; gone when the gateway stops):".to_owned(),
    ];
    lines.extend(
        profiles
            .iter()
            .map(|(pkey, opt_out)| demo_profile(pkey, *opt_out)),
    );
    if let Some((pkey, _)) = profiles.first() {
        lines.extend([
            "\nTry, from another terminal:".to_owned(),
            format!("  cargo run --release -- get-opt-out '{pkey}'{addr}"),
            // Every opt-out is recorded with the manner of its request, so --source is required.
            format!(
                "  cargo run --release -- set-opt-out '{pkey}' --opt-out true --source web-form{addr}"
            ),
            format!(
                "  cargo run --release -- create-profile --email someone@example.com --opt-out --source email{addr}"
            ),
            format!(
                "  grpcurl -plaintext -d '{{\"pkey\":\"{pkey}\"}}' {listen} ccpa.v1.CcpaService/GetOptOut"
            ),
            format!("  grpcurl -plaintext {listen} grpc.health.v1.Health/Check"),
            // A Rust service's calls, through the library client (examples/gateway_client.rs).
            format!("  CCPA_ADDR=http://{listen} cargo run --example gateway_client"),
        ]);
        lines.extend(metrics_url.map(|url| format!("  curl -s {url}")));
    }
    lines.push("Stop with Ctrl-C.".to_owned());
    // Written whole, once the gateway listens: a reader of the pipe (a test) runs what it reads.
    print_now(&lines)
}

/// `emulator`: runs an emulator alone until Ctrl-C or SIGTERM.
pub async fn emulator(args: EmulatorArgs) -> Result<Output, CliError> {
    let config = EmulatorConfig {
        tenant: args.tenant,
        api_key: args.api_key,
        access_token: args.access_token,
        ims_client_id: args.ims_client_id,
        ims_client_secret: args.ims_client_secret,
        token_lifetime: args.token_lifetime,
        faults: args.faults.settings(),
        wrap_reads_in_collection: false,
        record_requests: !args.no_record,
        relative_next_links: false,
        // ACS's own default: a table past 100,000 profiles is a large one.
        big_table_threshold: EmulatorConfig::DEFAULT_BIG_TABLE_THRESHOLD,
    };
    let emulator = Emulator::bind(args.listen, config).await.map_err(|e| {
        CliError::usage(format!(
            "--listen (CCPA_EMULATOR_LISTEN): cannot listen on {}: {e}",
            args.listen
        ))
    })?;
    let mut lines = vec![
        format!(
            "Adobe Campaign emulator at {} (tenant {}). Point the gateway at it with:",
            emulator.url(),
            emulator.config().tenant
        ),
        format!(
            "  CCPA_ACS_BASE_URL={url} CCPA_ACS_TENANT={} CCPA_IMS_URL={url} CCPA_IMS_CLIENT_ID=... CCPA_IMS_CLIENT_SECRET=... ccpa-gateway serve",
            emulator.config().tenant,
            url = emulator.url(),
        ),
    ];
    if args.seed_demo {
        lines.push("Demo profiles:".to_owned());
        lines.extend(
            seed_demo(&emulator)
                .into_iter()
                .map(|(pkey, opt_out)| demo_profile(&pkey, opt_out)),
        );
    }
    // Written whole before it serves: whatever started it reads its URL from the first line.
    print_now(&lines)?;
    shutdown_signal().await;
    emulator.shutdown().await;
    Ok(Output::nothing())
}

/// A demo profile's line: its key and opt-out, never its name or address.
fn demo_profile(pkey: &str, opt_out: bool) -> String {
    format!("  {pkey}  ccpaOptOut={opt_out}")
}
