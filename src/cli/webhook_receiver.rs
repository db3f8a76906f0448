//! `webhook-receiver`: receives the gateway's webhooks, verifies each delivery's signature and
//! prints its event as a JSON line (see [`crate::notify::receiver`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use clap::Args as ClapArgs;

use super::exit_codes;
use super::output::{CliError, Lines, Output};
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

/// `webhook-receiver`: runs until Ctrl-C or SIGTERM, printing each delivery the receiver verifies
/// as a JSON line (see [`receiver`]).
pub async fn run(args: Args) -> Result<Output, CliError> {
    let secrets = Secrets::read(&args.secret_file).map_err(|e| {
        CliError::usage(format!(
            "--secret-file (CCPA_WEBHOOK_RECEIVER_SECRET_FILE): {e}"
        ))
    })?;
    let (listener, listen) = super::listen_addr::listen(
        args.listen,
        "--listen (CCPA_WEBHOOK_RECEIVER_LISTEN)",
        args.listen_addr_file.as_deref(),
        "--listen-addr-file (CCPA_WEBHOOK_RECEIVER_LISTEN_ADDR_FILE)",
    )
    .await?;
    tracing::info!(
        %listen,
        secrets = secrets.count(),
        "webhook receiver listening: deliveries verified are printed on standard output"
    );
    // One line a delivery, whole and flushed before it is acknowledged: a reader of a pipe sees
    // each as it is taken.
    let lines = Mutex::new(Lines::flushed());
    let print: receiver::Print = Arc::new(move |line: &str| {
        let mut lines = lines
            .lock()
            .map_err(|_| "an earlier print panicked".to_owned())?;
        lines.text(line).map_err(|e| e.to_string())
    });
    match receiver::serve(listener, secrets, print, super::serve::shutdown_signal()).await {
        Ok(()) => Ok(Output::nothing()),
        Err(e) => {
            // In the log, where an operator of the receiver looks.
            tracing::error!(error = %e, "the webhook receiver stopped");
            Err(CliError::logged(exit_codes::FAILURE))
        }
    }
}
