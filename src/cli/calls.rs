//! Commands that call a running gateway over gRPC and print its answer as JSON, in the proto3
//! JSON mapping (see `json.rs`).

use std::time::Duration;

use clap::Args;
use std::path::PathBuf;

use super::output::{CliError, Lines, Output};
use crate::client::{Client, ClientBuilder};
use crate::proto::ccpa_v1::{
    CreateProfileRequest, DeliveryState, GetOptOutRequest, RequestSource, SetOptOutRequest,
};

/// Where the gateway is, and how long to wait for it.
#[derive(Args)]
pub struct Connection {
    /// The gateway's address.
    #[arg(long, env = "CCPA_ADDR", default_value = "http://127.0.0.1:50051")]
    addr: String,

    /// Deadline of each attempt of a call, sent to the gateway as `grpc-timeout` (a call that
    /// meets UNAVAILABLE or DEADLINE_EXCEEDED is tried up to 4 times, but for create-profile; a
    /// bulk stream has none).
    #[arg(long, env = "CCPA_CALL_TIMEOUT", default_value = "30s",
          value_parser = crate::config::duration_within(Duration::from_millis(100), Duration::from_secs(3600)))]
    timeout: Duration,

    /// For an https:// address: the CA the gateway's certificate must chain to (PEM). The
    /// system's roots when left out.
    #[arg(long, env = "CCPA_CLIENT_TLS_CA")]
    tls_ca: Option<PathBuf>,

    /// For a gateway that asks for client certificates (mutual TLS): this client's certificate
    /// (PEM). Its URI SAN (or DNS SAN) is the identity the gateway records.
    #[arg(long, env = "CCPA_CLIENT_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "CCPA_CLIENT_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

/// Which profiles a command is about: one key, or every profile with an email address.
#[derive(Args)]
#[group(required = true, multiple = false)]
pub struct Profiles {
    /// The profile's ACS primary key (`@...`).
    pkey: Option<String>,
    /// Instead of a key: every profile with this email address (whole, ignoring case).
    #[arg(long)]
    email: Option<String>,
}

/// Arguments of `get-opt-out`.
#[derive(Args)]
pub struct GetOptOutArgs {
    #[command(flatten)]
    profiles: Profiles,
    #[command(flatten)]
    connection: Connection,
}

/// Arguments of `watch`.
#[derive(Args)]
pub struct WatchArgs {
    /// The `cursor` of the last change seen; from the oldest retained change when left out.
    #[arg(long, default_value = "")]
    after: String,
    /// Also print consumers' requests to opt back in.
    #[arg(long)]
    include_opt_ins: bool,
    #[command(flatten)]
    connection: Connection,
}

/// What identifies a recorded request: its id, its manner, its time.
#[derive(Args)]
pub struct RequestArgs {
    /// Your id for the request; running the command again with it changes nothing.
    #[arg(long, default_value = "")]
    request_id: String,
    /// When the consumer made the request (RFC 3339); now when left out.
    #[arg(long, value_parser = timestamp)]
    received_at: Option<prost_types::Timestamp>,
}

pub(super) fn timestamp(text: &str) -> Result<prost_types::Timestamp, String> {
    let at = chrono::DateTime::parse_from_rfc3339(text)
        .map_err(|e| format!("not an RFC 3339 instant such as 2026-11-29T10:00:00Z: {e}"))?;
    Ok(prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(0),
    })
}

/// Arguments of `set-opt-out`.
#[derive(Args)]
pub struct SetOptOutArgs {
    #[command(flatten)]
    profiles: Profiles,
    /// With --email: when no profile has the address, create one holding the opt-out.
    #[arg(long, conflicts_with = "pkey")]
    create_if_missing: bool,
    /// true: do not sell this consumer's personal information; false: opt back in.
    #[arg(long, action = clap::ArgAction::Set, required = true)]
    opt_out: bool,
    /// How the consumer made the request.
    #[arg(long, value_enum)]
    source: RequestSource,
    #[command(flatten)]
    request: RequestArgs,
    #[command(flatten)]
    connection: Connection,
}

/// Arguments of `create-profile`.
#[derive(Args)]
pub struct CreateProfileArgs {
    /// Email address.
    #[arg(long)]
    email: String,
    /// First name.
    #[arg(long, default_value = "")]
    first_name: String,
    /// Last name.
    #[arg(long, default_value = "")]
    last_name: String,
    /// Record an opt-out of sale with the profile (`--opt-out` or `--opt-out=true`;
    /// `--opt-out=false` records an explicit opt-in). Needs --source.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", require_equals = true,
          requires = "source")]
    opt_out: Option<bool>,
    /// How the consumer made the request, with --opt-out.
    #[arg(long, value_enum)]
    source: Option<RequestSource>,
    #[command(flatten)]
    request: RequestArgs,
    #[command(flatten)]
    connection: Connection,
}

impl Connection {
    /// The gateway's address, as given.
    pub(super) fn addr(&self) -> &str {
        &self.addr
    }

    /// The library client's settings, from these flags.
    pub(super) fn builder(&self) -> ClientBuilder {
        let mut builder = ClientBuilder::new(self.addr.clone()).deadline(self.timeout);
        if let Some(ca) = &self.tls_ca {
            builder = builder.tls_ca(ca);
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            builder = builder.tls_identity(cert, key);
        }
        builder
    }
}

/// Connects with the flags (a failure names the flag).
pub(super) async fn connect(connection: &Connection) -> Result<Client, CliError> {
    Ok(connection.builder().connect().await?)
}

/// Checks `builder`'s settings (a failure names the flag) and gives a client that connects at
/// its first call.
pub(super) fn connect_lazily(builder: ClientBuilder) -> Result<Client, CliError> {
    Ok(builder.connect_lazy()?)
}

/// `watch [--after CURSOR] [--include-opt-ins]`: one JSON line per change, until interrupted
/// or the gateway refuses the watch (a broken stream is resumed after the last line printed).
pub async fn watch(args: WatchArgs) -> Result<Output, CliError> {
    use futures::StreamExt as _;
    let client = connect(&args.connection).await?;
    let mut changes = client.watch_opt_out_changes(args.after, args.include_opt_ins);
    // Printed as they come: the watch has no end to wait for.
    let mut lines = Lines::flushed();
    while let Some(change) = changes.next().await {
        lines.message(&change?)?;
    }
    lines.finish()?;
    Ok(Output::nothing())
}

/// `get-opt-out PKEY` or `get-opt-out --email E`.
pub async fn get_opt_out(args: GetOptOutArgs) -> Result<Output, CliError> {
    let client = connect(&args.connection).await?;
    let answer = client
        .get_opt_out(GetOptOutRequest {
            pkey: args.profiles.pkey.unwrap_or_default(),
            email: args.profiles.email.unwrap_or_default(),
        })
        .await?;
    Output::message(&answer)
}

/// `set-opt-out PKEY|--email E --opt-out true|false`.
pub async fn set_opt_out(args: SetOptOutArgs) -> Result<Output, CliError> {
    let client = connect(&args.connection).await?;
    let answer = client
        .set_opt_out(SetOptOutRequest {
            pkey: args.profiles.pkey.unwrap_or_default(),
            email: args.profiles.email.unwrap_or_default(),
            create_if_missing: args.create_if_missing,
            ccpa_opt_out: Some(args.opt_out),
            request_id: args.request.request_id,
            source: args.source as i32,
            received_at: args.request.received_at,
        })
        .await?;
    Output::message(&answer)
}

/// `create-profile --email E [--first-name F] [--last-name L] [--opt-out]`.
pub async fn create_profile(args: CreateProfileArgs) -> Result<Output, CliError> {
    let client = connect(&args.connection).await?;
    let answer = client
        .create_profile(CreateProfileRequest {
            email: args.email,
            first_name: args.first_name,
            last_name: args.last_name,
            ccpa_opt_out: args.opt_out,
            request_id: args.request.request_id,
            source: args.source.unwrap_or(RequestSource::Unspecified) as i32,
            received_at: args.request.received_at,
        })
        .await?;
    if answer.profile.is_none() {
        return Err(CliError::failure(
            "the gateway answered without the profile",
        ));
    }
    Output::message(&answer)
}

/// The name of a delivery state, as the proto spells it without its prefix.
pub(super) fn state_name(state: i32) -> &'static str {
    match DeliveryState::try_from(state) {
        Ok(DeliveryState::Pending) => "PENDING",
        Ok(DeliveryState::Applied) => "APPLIED",
        Ok(DeliveryState::Failed) => "FAILED",
        Ok(DeliveryState::Superseded) => "SUPERSEDED",
        _ => "UNSPECIFIED",
    }
}
