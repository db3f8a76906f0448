//! `serve` and `emulator`: the long-running commands.

use std::net::SocketAddr;
use std::sync::Arc;

use acs_emulator::{Emulator, EmulatorConfig, demo_profiles};
use acs_profile_client::{AccessToken, Client, ClientConfig, SharedToken};
use clap::Args;
use secrecy::SecretString;
use tokio::net::TcpListener;

use super::exit_codes;
use crate::api::CcpaApi;
use crate::config::ServeSettings;
use crate::server;

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
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
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
pub async fn serve(settings: ServeSettings) -> u8 {
    // The emulator must outlive the server, so it is held here even when unused.
    let (client, emulator) = if settings.emulator {
        match start_embedded_emulator(&settings).await {
            Ok(pair) => pair,
            Err(code) => return code,
        }
    } else {
        match settings.acs.client() {
            Ok(client) => (client, None),
            Err(e) => {
                eprintln!("error: {e}");
                return exit_codes::USAGE;
            }
        }
    };

    let listener = match TcpListener::bind(settings.listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!(
                "error: --listen (CCPA_LISTEN): cannot listen on {}: {e}",
                settings.listen
            );
            return exit_codes::USAGE;
        }
    };
    let listen = listener.local_addr().unwrap_or(settings.listen);
    tracing::info!(%listen, "gRPC server listening (health and reflection on)");
    if let Some((emulator, profiles)) = &emulator {
        print_try_it(emulator, profiles, listen);
    }

    let result = server::serve(
        CcpaApi::new(client),
        listener,
        shutdown_signal(),
        settings.shutdown_options(),
    )
    .await;
    drop(emulator);
    match result {
        Ok(()) => exit_codes::OK,
        Err(e) => {
            tracing::error!(error = %e, "the server stopped");
            exit_codes::FAILURE
        }
    }
}

type EmbeddedEmulator = (Emulator, Vec<(String, bool)>);

async fn start_embedded_emulator(
    settings: &ServeSettings,
) -> Result<(Client, Option<EmbeddedEmulator>), u8> {
    let emulator = Emulator::start(EmulatorConfig::default())
        .await
        .map_err(|e| {
            eprintln!("error: cannot start the embedded emulator: {e}");
            exit_codes::FAILURE
        })?;
    let profiles = seed_demo(&emulator);
    let config = ClientConfig {
        base_url: emulator.url(),
        tenant: emulator.config().tenant.clone(),
        api_key: SecretString::from(emulator.config().api_key.as_str()),
        tokens: Arc::new(SharedToken::new(AccessToken::new(
            emulator.config().access_token.as_str(),
        ))),
        timeout: settings.acs.acs_timeout,
        connect_timeout: settings.acs.acs_connect_timeout,
    };
    let client = Client::from_config(config).map_err(|e| {
        eprintln!("error: cannot build the client for the embedded emulator: {e}");
        exit_codes::FAILURE
    })?;
    tracing::info!(url = %emulator.url(), "embedded Adobe Campaign emulator started");
    Ok((client, Some((emulator, profiles))))
}

fn print_try_it(emulator: &Emulator, profiles: &[(String, bool)], listen: SocketAddr) {
    let addr = if listen.port() == 50051 && listen.ip().is_loopback() {
        String::new()
    } else {
        format!(" --addr http://{listen}")
    };
    println!(
        "ccpa-gateway is serving on {listen}, backed by an in-memory Adobe Campaign emulator at {}.",
        emulator.url()
    );
    println!("Demo profiles (made up; gone when the gateway stops):");
    for (pkey, opt_out) in profiles {
        println!("  {pkey}  ccpaOptOut={opt_out}");
    }
    if let Some((pkey, _)) = profiles.first() {
        println!("\nTry, from another terminal:");
        println!("  cargo run --release -- get-opt-out '{pkey}'{addr}");
        println!("  cargo run --release -- set-opt-out '{pkey}' --opt-out true{addr}");
        println!(
            "  cargo run --release -- create-profile --email someone@example.com --opt-out{addr}"
        );
        println!(
            "  grpcurl -plaintext -d '{{\"pkey\":\"{pkey}\"}}' {listen} ccpa.v1.CcpaService/GetOptOut"
        );
        println!("  grpcurl -plaintext {listen} grpc.health.v1.Health/Check");
    }
    println!("Stop with Ctrl-C.");
}

/// `emulator`: runs an emulator alone until Ctrl-C or SIGTERM.
pub async fn emulator(args: EmulatorArgs) -> u8 {
    let config = EmulatorConfig {
        tenant: args.tenant,
        api_key: args.api_key,
        access_token: args.access_token,
        ..Default::default()
    };
    let emulator = match Emulator::bind(args.listen, config).await {
        Ok(emulator) => emulator,
        Err(e) => {
            eprintln!(
                "error: --listen (CCPA_EMULATOR_LISTEN): cannot listen on {}: {e}",
                args.listen
            );
            return exit_codes::USAGE;
        }
    };
    println!(
        "Adobe Campaign emulator at {} (tenant {}). Point the gateway at it with:",
        emulator.url(),
        emulator.config().tenant
    );
    println!(
        "  CCPA_ACS_BASE_URL={} CCPA_ACS_TENANT={} CCPA_ACS_API_KEY=... CCPA_ACS_ACCESS_TOKEN=... ccpa-gateway serve",
        emulator.url(),
        emulator.config().tenant
    );
    if args.seed_demo {
        println!("Demo profiles:");
        for (pkey, opt_out) in seed_demo(&emulator) {
            println!("  {pkey}  ccpaOptOut={opt_out}");
        }
    }
    shutdown_signal().await;
    emulator.shutdown().await;
    exit_codes::OK
}
