//! Commands that call a running gateway over gRPC and print its answer as JSON.

use std::time::Duration;

use clap::Args;
use serde_json::{Value, json};
use std::path::PathBuf;

use super::output::{CliError, Lines, Output};
use crate::client::{Client, ClientBuilder};
use crate::proto::ccpa_v1::{
    CreateProfileRequest, CreateProfileResponse, DeliveryState, GetOptOutRequest, OptOutChange,
    Profile, RequestSource, SetOptOutRequest,
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

fn rfc3339(timestamp: Option<&prost_types::Timestamp>) -> Value {
    timestamp
        .and_then(|t| {
            chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0))
        })
        .map_or(Value::Null, |at| {
            json!(at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        })
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
        lines.json(&change_json(&change?))?;
    }
    lines.finish()?;
    Ok(Output::nothing())
}

/// A change of the feed, as `watch` prints it.
fn change_json(change: &OptOutChange) -> Value {
    json!({
        "cursor": change.cursor,
        "requestId": change.request_id,
        "pkey": change.pkey,
        "ccpaOptOut": change.ccpa_opt_out,
        "source": source_name(change.source),
        "receivedAt": rfc3339(change.received_at.as_ref()),
        "state": state_name(change.state),
        "changedAt": rfc3339(change.changed_at.as_ref()),
        "honoredAt": rfc3339(change.honored_at.as_ref()),
    })
}

/// The name of a request source, as the proto spells it without its prefix.
fn source_name(source: i32) -> &'static str {
    RequestSource::try_from(source).map_or("UNSPECIFIED", |source| {
        source
            .as_str_name()
            .strip_prefix("REQUEST_SOURCE_")
            .unwrap_or("UNSPECIFIED")
    })
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
    let mut json = opt_out_json(
        &answer.pkey,
        answer.ccpa_opt_out,
        answer.ccpa_opt_out_last_modified.as_ref(),
    );
    json["changePending"] = json!(answer.change_pending);
    if answer.pkey.is_empty() {
        // By email: the overall answer is the protective one; each profile follows.
        json["profiles"] = answer
            .profiles
            .iter()
            .map(|p| {
                let mut profile = opt_out_json(
                    &p.pkey,
                    p.ccpa_opt_out,
                    p.ccpa_opt_out_last_modified.as_ref(),
                );
                profile["changePending"] = json!(p.change_pending);
                profile
            })
            .collect();
    }
    Output::json(&json)
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
    let mut json = opt_out_json(
        &answer.pkey,
        answer.ccpa_opt_out,
        answer.ccpa_opt_out_last_modified.as_ref(),
    );
    json["requestId"] = json!(answer.request_id);
    json["state"] = json!(state_name(answer.state));
    if answer.pkey.is_empty() {
        // By email: each profile's own request and state.
        json["profiles"] = answer
            .profiles
            .iter()
            .map(|p| {
                json!({
                    "pkey": p.pkey,
                    "requestId": p.request_id,
                    "state": state_name(p.state),
                    "ccpaOptOut": p.ccpa_opt_out,
                    "created": p.created,
                })
            })
            .collect();
    }
    Output::json(&json)
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
    match answer {
        CreateProfileResponse {
            profile: Some(profile),
            request_id,
        } => {
            let mut json = profile_json(&profile);
            if !request_id.is_empty() {
                json["requestId"] = json!(request_id);
            }
            Output::json(&json)
        }
        CreateProfileResponse { profile: None, .. } => Err(CliError::failure(
            "the gateway answered without the profile",
        )),
    }
}

/// What `get-opt-out` and `set-opt-out` print.
fn opt_out_json(
    pkey: &str,
    opt_out: bool,
    last_modified: Option<&prost_types::Timestamp>,
) -> Value {
    json!({
        "pkey": pkey,
        "ccpaOptOut": opt_out,
        "ccpaOptOutLastModified": rfc3339(last_modified),
    })
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

fn profile_json(profile: &Profile) -> Value {
    json!({
        "pkey": profile.pkey,
        "email": profile.email,
        "firstName": profile.first_name,
        "lastName": profile.last_name,
        "ccpaOptOut": profile.ccpa_opt_out,
        "ccpaOptOutLastModified": rfc3339(profile.ccpa_opt_out_last_modified.as_ref()),
    })
}
