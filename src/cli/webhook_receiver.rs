//! `webhook-receiver`: receives the gateway's webhooks, verifies each delivery's signature and
//! prints its event as a JSON line (see [`crate::notify::receiver`]).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args as ClapArgs;
use tokio::net::TcpListener;

use super::exit_codes;
use crate::notify::receiver;
use crate::notify::recipients::Secrets;

/// Arguments of `webhook-receiver`.
#[derive(ClapArgs)]
pub struct Args {
    /// Address to listen on (plain HTTP: put it on loopback, or behind a TLS proxy).
    #[arg(long, env = "CCPA_WEBHOOK_RECEIVER_LISTEN")]
    listen: SocketAddr,
    /// File of the Standard Webhooks secrets deliveries are signed with (`whsec_` + base64;
    /// several, separated by white space, during a rotation): the recipient's `secret_file`.
    #[arg(long, env = "CCPA_WEBHOOK_RECEIVER_SECRET_FILE")]
    secret_file: PathBuf,
    /// Once listening, write the address bound (say, with `--listen 127.0.0.1:0`) to this
    /// file, for whatever started the receiver to read.
    #[arg(long, env = "CCPA_WEBHOOK_RECEIVER_LISTEN_ADDR_FILE")]
    listen_addr_file: Option<PathBuf>,
}

/// `webhook-receiver`: runs until Ctrl-C or SIGTERM.
pub async fn run(args: Args) -> u8 {
    let secrets = match Secrets::read(&args.secret_file) {
        Ok(secrets) => secrets,
        Err(e) => {
            eprintln!("error: --secret-file (CCPA_WEBHOOK_RECEIVER_SECRET_FILE): {e}");
            return exit_codes::USAGE;
        }
    };
    let listener = match TcpListener::bind(args.listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!(
                "error: --listen (CCPA_WEBHOOK_RECEIVER_LISTEN): cannot listen on {}: {e}",
                args.listen
            );
            return exit_codes::USAGE;
        }
    };
    let listen = listener.local_addr().unwrap_or(args.listen);
    if let Some(path) = &args.listen_addr_file
        && let Err(e) = super::listen_addr::write(path, listen)
    {
        eprintln!(
            "error: --listen-addr-file (CCPA_WEBHOOK_RECEIVER_LISTEN_ADDR_FILE): cannot write \
             {}: {e}",
            path.display()
        );
        return exit_codes::USAGE;
    }
    tracing::info!(
        %listen,
        secrets = secrets.count(),
        "webhook receiver listening: deliveries verified are printed on standard output"
    );
    match receiver::serve(listener, secrets, super::serve::shutdown_signal()).await {
        Ok(()) => exit_codes::OK,
        Err(e) => {
            tracing::error!(error = %e, "the webhook receiver stopped");
            exit_codes::FAILURE
        }
    }
}
