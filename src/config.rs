//! The gateway's settings: one typed home, every flag also an environment variable, and every bad
//! or missing value refused at start-up with a message that names it.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use acs_profile_client::{
    AccessToken, CallSettings, Client, ClientConfig, ConfigError, ImsConfig, ImsSecret,
    ImsTokenSource, SharedToken, ThrottleSettings, TokenSource,
};
use clap::Args;
use secrecy::{ExposeSecret, SecretString};

use crate::access::tls::{ServerTls, TlsFiles};
use crate::access::{AccessControl, IdentityMode, PolicySource};
use crate::notify::{Notifications, NotifySettings};
use crate::optout::delivery::DeliverySettings;
use crate::optout::reconcile::ReconcileSettings;
use crate::server::{Boundary, ConnectionLimits, ServerOptions, ShutdownOptions};
use crate::store::Ledger;

/// Settings of `ccpa-gateway serve`.
#[derive(Args, Clone)]
pub struct ServeSettings {
    /// Address the gRPC server listens on.
    #[arg(long, env = "CCPA_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Once listening, write the address the gRPC server bound (say, with `--listen
    /// 127.0.0.1:0`) to this file, for whatever started the gateway to read.
    #[arg(long, env = "CCPA_LISTEN_ADDR_FILE")]
    pub listen_addr_file: Option<PathBuf>,

    /// Run an Adobe Campaign emulator in this process, seeded with demo profiles, and use it
    /// instead of Adobe. For trying the gateway out; nothing is kept.
    #[arg(long, conflicts_with_all = [
        "acs_tenant", "acs_api_key", "acs_access_token", "ims_client_id", "ims_client_secret",
        "ims_client_secret_file",
    ])]
    pub emulator: bool,

    /// With --emulator: the emulator's profile table is a large one, as every production
    /// tenant's is (more profiles than Campaign's XtkBigTableThreshold option, 100,000 by
    /// default), so that a lookup by email gets a next-page link only when it asks with
    /// `_forcePagination=true`, as the gateway always does. On by default; `false` answers as a
    /// small table does. Refused without --emulator.
    #[arg(long, env = "CCPA_EMULATOR_LARGE_TABLE", num_args = 0..=1,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    pub emulator_large_table: Option<bool>,

    /// Time between reporting NOT_SERVING and closing the listener on shutdown, so that load
    /// balancers stop sending calls first (e.g. "5s" behind Kubernetes).
    #[arg(long, env = "CCPA_DRAIN_DELAY", default_value = "0s",
          value_parser = duration_within(Duration::ZERO, Duration::from_secs(600)))]
    pub drain_delay: Duration,

    /// Longest wait for calls in flight on shutdown.
    #[arg(long, env = "CCPA_DRAIN_TIMEOUT", default_value = "30s",
          value_parser = duration_within(Duration::ZERO, Duration::from_secs(3600)))]
    pub drain_timeout: Duration,

    /// How often ACS is probed while it refuses the gateway's credentials (health is
    /// NOT_SERVING until a probe or a call gets through).
    #[arg(long, env = "CCPA_HEALTH_PROBE_INTERVAL", default_value = "10s",
          value_parser = duration_within(Duration::from_millis(100), Duration::from_secs(3600)))]
    pub health_probe_interval: Duration,

    /// Where opt-out requests are recorded.
    #[command(flatten, next_help_heading = "Opt-out ledger")]
    pub ledger: LedgerSettings,

    /// How to reach Adobe Campaign.
    #[command(flatten, next_help_heading = "Adobe Campaign")]
    pub acs: AcsSettings,

    /// How to obtain tokens from Adobe IMS.
    #[command(flatten, next_help_heading = "Adobe IMS (OAuth server-to-server)")]
    pub ims: ImsSettings,

    /// Limits on the calls made to Adobe Campaign.
    #[command(flatten, next_help_heading = "Calls to Adobe Campaign")]
    pub calls: CallLimits,

    /// Who may call, and how much.
    #[command(
        flatten,
        next_help_heading = "Callers: TLS, identity, policy and limits"
    )]
    pub callers: CallerSettings,

    /// Metrics and traces.
    #[command(flatten, next_help_heading = "Metrics and traces")]
    pub observability: ObservabilitySettings,

    /// Third parties told of each consumer request.
    #[command(flatten, next_help_heading = "Notifications to third parties")]
    pub notify: NotifyArgs,
}

/// Which third parties are told of consumer requests, by signed webhooks (docs/notifications.md).
#[derive(Args, Clone)]
pub struct NotifyArgs {
    /// The recipients of notifications (TOML: id, url, secret_file, events, max_rps for each
    /// `[[recipient]]`). Every consumer request recorded while a recipient is named, of the kinds
    /// it asked for, is delivered to it, at least once. Reloaded when it or a secret file
    /// changes; a version that does not load keeps the previous one. None named: no one is told.
    #[arg(long, env = "CCPA_RECIPIENTS")]
    pub recipients: Option<PathBuf>,

    /// Retries of a notification end this long after its request was recorded; it is FAILED
    /// then, with the reason.
    #[arg(long, env = "CCPA_NOTIFY_GIVE_UP", default_value = "72h",
          value_parser = duration_within(Duration::from_secs(60), 366 * DAY))]
    pub notify_give_up: Duration,

    /// Bound on one attempt to deliver a notification: connecting, sending, and the answer.
    #[arg(long, env = "CCPA_NOTIFY_TIMEOUT", default_value = "10s",
          value_parser = duration_within(Duration::from_millis(100), Duration::from_secs(300)))]
    pub notify_timeout: Duration,
}

/// `--recipients`, as errors name it.
pub const RECIPIENTS: &str = "--recipients (CCPA_RECIPIENTS)";

impl NotifyArgs {
    /// The recipients file, loaded (a file that does not load stops start-up), and how
    /// notifications are delivered.
    pub fn notifications(&self) -> Result<Notifications, SettingError> {
        let recipients = match &self.recipients {
            None => None,
            Some(path) => Some(Arc::new(crate::notify::recipients::open(path).map_err(
                |problem| SettingError {
                    setting: RECIPIENTS,
                    problem,
                },
            )?)),
        };
        Ok(Notifications {
            recipients,
            settings: NotifySettings {
                give_up: self.notify_give_up,
                timeout: self.notify_timeout,
                ..NotifySettings::default()
            },
        })
    }
}

/// What the gateway exports about itself. See `docs/operations.md`, "Metrics and traces".
#[derive(Args, Clone)]
pub struct ObservabilitySettings {
    /// Serve Prometheus metrics at GET /metrics on this address (its own port, plaintext;
    /// every other path answers 404). Off by default; `--emulator` turns it on, on a free
    /// loopback port, unless set, and prints its URL.
    #[arg(long, env = "CCPA_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Export spans over OTLP/gRPC to this collector (e.g. http://otel-collector:4317, or
    /// https:// with the system's roots), with service.name ccpa-gateway. Else read from
    /// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, then OTEL_EXPORTER_OTLP_ENDPOINT.
    #[arg(long, env = "CCPA_OTLP_ENDPOINT", value_parser = otlp_endpoint)]
    pub otlp_endpoint: Option<url::Url>,

    /// Take W3C trace context (traceparent, tracestate) from calls, send it on to Adobe, and put
    /// trace_id and span_id in JSON logs. `false` turns tracing off (and --otlp-endpoint with
    /// it).
    #[arg(long, env = "CCPA_TRACE_CONTEXT", default_value_t = true, action = clap::ArgAction::Set)]
    pub trace_context: bool,
}

/// The OpenTelemetry SDKs' own variable for the collector, honoured when --otlp-endpoint is not
/// given.
pub const OTEL_EXPORTER_OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

impl ObservabilitySettings {
    /// Where spans go, and whether trace context is taken and given at all. The endpoint is
    /// `--otlp-endpoint`, else the OpenTelemetry SDKs' own variables (the traces one first, as
    /// their specification orders them).
    pub fn traces(&self) -> Result<crate::telemetry::TraceSettings, String> {
        let otlp_endpoint = match &self.otlp_endpoint {
            Some(url) => Some((url.clone(), OTLP_ENDPOINT)),
            None => {
                let mut found = None;
                for variable in [
                    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
                    OTEL_EXPORTER_OTLP_ENDPOINT,
                ] {
                    match std::env::var(variable) {
                        Ok(text) if !text.trim().is_empty() => {
                            let url =
                                otlp_endpoint(&text).map_err(|e| format!("{variable}: {e}"))?;
                            found = Some((url, variable));
                            break;
                        }
                        _ => {}
                    }
                }
                found
            }
        };
        if let Some((_, setting)) = &otlp_endpoint
            && !self.trace_context
        {
            return Err(format!(
                "{setting} exports spans, and --trace-context (CCPA_TRACE_CONTEXT) false turns \
                 them off: set one or the other"
            ));
        }
        Ok(crate::telemetry::TraceSettings {
            trace_context: self.trace_context,
            otlp_endpoint,
        })
    }
}

const OTLP_ENDPOINT: &str = "--otlp-endpoint (CCPA_OTLP_ENDPOINT)";

/// The OpenTelemetry SDKs' variable for the traces collector alone.
pub const OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";

/// An OTLP/gRPC endpoint: an absolute http(s) URL with a host. Its text is configuration, not
/// personal, but credentials in it would be logged by nothing and refused here.
fn otlp_endpoint(text: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(text.trim()).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err("an http:// or https:// URL with a host is expected".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("credentials do not belong in the URL".into());
    }
    Ok(url)
}

/// Who may connect and call the gateway, and the limits that keep one caller from starving
/// the rest. See `docs/security.md`.
#[derive(Args, Clone)]
pub struct CallerSettings {
    /// The server's certificate chain (PEM): serve TLS. Reloaded when the file changes.
    #[arg(long, env = "CCPA_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The server's private key (PEM). Reloaded when the file changes.
    #[arg(long, env = "CCPA_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// The CA that client certificates must chain to (PEM): mutual TLS. A connection without a
    /// certificate may call grpc.health.v1.Health only. Reloaded when the file changes.
    #[arg(long, env = "CCPA_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Also serve grpc.health.v1.Health alone, in plaintext, on this address: for the
    /// kubelet's native gRPC probes, which speak no TLS. Nothing else answers there.
    #[arg(long, env = "CCPA_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,

    /// How callers are identified: `mtls` (the client certificate's URI SAN, else its first DNS
    /// SAN; the default with --tls-client-ca), `header:NAME` (a service mesh's header, such as
    /// header:l5d-client-id or header:x-forwarded-client-cert; the port must then be reachable
    /// only through the mesh), or `self-declared` (x-ccpa-caller; loopback or --emulator only;
    /// the default otherwise).
    #[arg(long, env = "CCPA_CALLER_IDENTITY")]
    pub caller_identity: Option<IdentityMode>,

    /// With header:NAME and --tls-cert: the certificate identity (URI SAN, else first DNS SAN)
    /// of a front proxy allowed to name the caller in that header. Repeatable; comma-separated
    /// in the variable. The gateway then terminates TLS itself, so no mesh sidecar sets or
    /// strips the header: it is believed only from these peers (their certificates chain to
    /// --tls-client-ca, which is required), and any other peer's call is UNAUTHENTICATED.
    #[arg(long = "trusted-proxy-identity", env = "CCPA_TRUSTED_PROXY_IDENTITIES",
          value_name = "ID", value_delimiter = ',', value_parser = proxy_identity)]
    pub trusted_proxy_identities: Vec<String>,

    /// The authorization policy (TOML): which caller may do what, and how often. Required with
    /// mtls and header: identities; reloaded when the file changes.
    #[arg(long, env = "CCPA_AUTHZ_POLICY")]
    pub authz_policy: Option<PathBuf>,

    /// Calls in progress at once on one connection.
    #[arg(long, env = "CCPA_MAX_CONCURRENT_STREAMS", default_value = "200",
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_concurrent_streams: u32,

    /// Time between HTTP/2 keepalive pings on a connection.
    #[arg(long, env = "CCPA_HTTP2_KEEPALIVE_INTERVAL", default_value = "60s",
          value_parser = duration_within(Duration::from_secs(1), DAY))]
    pub http2_keepalive_interval: Duration,

    /// How long a keepalive ping may go unanswered before the connection is closed.
    #[arg(long, env = "CCPA_HTTP2_KEEPALIVE_TIMEOUT", default_value = "20s",
          value_parser = duration_within(Duration::from_secs(1), Duration::from_secs(3600)))]
    pub http2_keepalive_timeout: Duration,

    /// Age at which a connection is asked to go away, so that callers reconnect and spread
    /// across replicas behind a load balancer.
    #[arg(long, env = "CCPA_MAX_CONNECTION_AGE", default_value = "5min",
          value_parser = duration_within(Duration::from_secs(1), DAY))]
    pub max_connection_age: Duration,

    /// How long the calls of a connection past its age may still take before it is closed
    /// (a long bulk stream is cut then; `bulk-set-opt-out` resumes it).
    #[arg(long, env = "CCPA_MAX_CONNECTION_AGE_GRACE", default_value = "5min",
          value_parser = duration_within(Duration::from_secs(1), DAY))]
    pub max_connection_age_grace: Duration,

    /// A lookup by email that matches more profiles is refused (FAILED_PRECONDITION,
    /// TOO_MANY_PROFILES), and nothing is recorded for them.
    #[arg(long, env = "CCPA_MAX_PROFILES_PER_EMAIL", default_value = "100",
          value_parser = clap::value_parser!(u32).range(1..=i64::from(crate::store::MAX_PROFILES_PER_EMAIL)))]
    pub max_profiles_per_email: u32,
}

const DAY: Duration = Duration::from_secs(24 * 3600);

/// One `--trusted-proxy-identity`: a certificate identity as the gateway reads it from a peer
/// (`access::identity::well_formed`), spaces around it dropped (a comma-separated variable
/// written `a, b`).
fn proxy_identity(text: &str) -> Result<String, String> {
    let identity = text.trim();
    if crate::access::identity::well_formed(identity) {
        Ok(identity.to_owned())
    } else {
        Err(format!(
            "a certificate identity (a URI SAN such as a SPIFFE ID, or a DNS name) is expected: \
             non-empty, printable ASCII without spaces, at most {} bytes",
            crate::access::identity::MAX_IDENTITY_BYTES
        ))
    }
}

/// A parser of durations from `min` to `max`, both included: every duration setting has bounds,
/// so that none is 0 where that makes no sense and none can overflow what is computed from it.
pub fn duration_within(
    min: Duration,
    max: Duration,
) -> impl Fn(&str) -> Result<Duration, String> + Clone + Send + Sync + 'static {
    move |text| {
        let value = humantime::parse_duration(text).map_err(|e| e.to_string())?;
        if value < min || value > max {
            return Err(format!(
                "must be from {} to {}",
                humantime::format_duration(min),
                humantime::format_duration(max)
            ));
        }
        Ok(value)
    }
}

const TLS_FILES: &str =
    "--tls-cert (CCPA_TLS_CERT), --tls-key (CCPA_TLS_KEY) or --tls-client-ca (CCPA_TLS_CLIENT_CA)";
const CALLER_IDENTITY: &str = "--caller-identity (CCPA_CALLER_IDENTITY)";
const AUTHZ_POLICY: &str = "--authz-policy (CCPA_AUTHZ_POLICY)";
const LISTEN: &str = "--listen (CCPA_LISTEN)";
const TLS_CLIENT_CA: &str = "--tls-client-ca (CCPA_TLS_CLIENT_CA)";
const TRUSTED_PROXY: &str = "--trusted-proxy-identity (CCPA_TRUSTED_PROXY_IDENTITIES)";

impl CallerSettings {
    /// TLS and access control, checked together: an unsafe combination stops start-up.
    /// `listen` is the gRPC address; `emulator` whether the gateway runs on its emulator.
    pub fn boundary(&self, listen: SocketAddr, emulator: bool) -> Result<Boundary, SettingError> {
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                let files = TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    client_ca: self.tls_client_ca.clone(),
                };
                Some(Arc::new(ServerTls::open(&files).map_err(|problem| {
                    SettingError {
                        setting: TLS_FILES,
                        problem,
                    }
                })?))
            }
            // clap requires the pair; this is only reached when one is given empty.
            (None, None) => None,
            _ => {
                return Err(SettingError {
                    setting: TLS_FILES,
                    problem: "--tls-cert and --tls-key go together".into(),
                });
            }
        };
        let mode = self.caller_identity.clone().unwrap_or_else(|| {
            if self.tls_client_ca.is_some() {
                IdentityMode::Mtls
            } else {
                IdentityMode::SelfDeclared
            }
        });
        match &mode {
            IdentityMode::Mtls if self.tls_client_ca.is_none() => {
                return Err(SettingError {
                    setting: CALLER_IDENTITY,
                    problem: "mtls needs client certificates: set --tls-cert, --tls-key and \
                              --tls-client-ca (CCPA_TLS_CLIENT_CA)"
                        .into(),
                });
            }
            IdentityMode::SelfDeclared if !(emulator || listen.ip().is_loopback()) => {
                return Err(SettingError {
                    setting: LISTEN,
                    problem: format!(
                        "{listen} is not a loopback address, and callers would only declare who \
                         they are: serve mutual TLS (--tls-cert, --tls-key, --tls-client-ca) or \
                         take the identity from a service mesh (--caller-identity header:NAME), \
                         with --authz-policy"
                    ),
                });
            }
            IdentityMode::SelfDeclared if self.tls_client_ca.is_some() => {
                return Err(SettingError {
                    setting: CALLER_IDENTITY,
                    problem: "self-declared callers are not identified by their certificates: \
                              use mtls with --tls-client-ca (CCPA_TLS_CLIENT_CA), or drop it"
                        .into(),
                });
            }
            IdentityMode::SelfDeclared if self.authz_policy.is_some() => {
                return Err(SettingError {
                    setting: AUTHZ_POLICY,
                    problem: "has no effect with self-declared callers (everything is allowed): \
                              use --caller-identity mtls or header:NAME"
                        .into(),
                });
            }
            _ => {}
        }
        self.check_trusted_proxies(&mode, tls.is_some())?;
        let policy = match (&mode, &self.authz_policy) {
            (IdentityMode::SelfDeclared, _) => None,
            (_, None) => {
                return Err(SettingError {
                    setting: AUTHZ_POLICY,
                    problem: format!("is required with --caller-identity {mode}"),
                });
            }
            (_, Some(path)) => Some(Arc::new(PolicySource::open(path.clone()).map_err(
                |problem| SettingError {
                    setting: AUTHZ_POLICY,
                    problem,
                },
            )?)),
        };
        Ok(Boundary {
            tls,
            access: AccessControl {
                mode,
                policy,
                client_certificate_required: self.tls_client_ca.is_some(),
                trusted_proxies: self.trusted_proxy_identities.clone(),
            },
        })
    }

    /// A header identity is believed only from a peer trusted to set it. When the gateway
    /// terminates TLS itself no mesh sidecar sets or strips the header, so only the caller
    /// could: `header:` with TLS needs the front proxies listed, and their certificates
    /// (`--tls-client-ca`) to know them by. A list where it would be ignored is refused too.
    fn check_trusted_proxies(&self, mode: &IdentityMode, tls: bool) -> Result<(), SettingError> {
        let listed = !self.trusted_proxy_identities.is_empty();
        match mode {
            IdentityMode::Header(name) if tls && !listed => Err(SettingError {
                setting: CALLER_IDENTITY,
                problem: format!(
                    "header:{name} with --tls-cert (CCPA_TLS_CERT): the gateway terminates TLS \
                     itself, so no mesh sidecar sets or strips {name}, and any caller could \
                     name another in it. Name the front proxies allowed to set it with \
                     {TRUSTED_PROXY}, known by their certificates through {TLS_CLIENT_CA}; or \
                     let the mesh terminate TLS (drop --tls-cert)"
                ),
            }),
            IdentityMode::Header(_) if tls && self.tls_client_ca.is_none() => Err(SettingError {
                setting: TLS_CLIENT_CA,
                problem: format!(
                    "is required with {TRUSTED_PROXY}: the front proxies are known by their \
                     client certificates"
                ),
            }),
            IdentityMode::Header(_) if tls => Ok(()),
            _ if listed => Err(SettingError {
                setting: TRUSTED_PROXY,
                problem: format!(
                    "has no effect with --caller-identity {mode}{}: front proxies are trusted to \
                     name the caller only with header:NAME and --tls-cert",
                    if tls { "" } else { " without --tls-cert" }
                ),
            }),
            _ => Ok(()),
        }
    }

    /// The limits on each connection.
    pub fn connection_limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            max_concurrent_streams: self.max_concurrent_streams,
            keepalive_interval: self.http2_keepalive_interval,
            keepalive_timeout: self.http2_keepalive_timeout,
            max_connection_age: self.max_connection_age,
            max_connection_age_grace: self.max_connection_age_grace,
        }
    }
}

impl ServeSettings {
    /// How the server runs and shuts down, who may call it, and its limits.
    pub fn server_options(&self) -> Result<ServerOptions, SettingError> {
        Ok(ServerOptions {
            health_probe_interval: self.health_probe_interval,
            shutdown: ShutdownOptions {
                drain_delay: self.drain_delay,
                drain_timeout: self.drain_timeout,
            },
            delivery: DeliverySettings {
                // Three attempts' worth: a lease must outlast the attempt that holds it.
                lease: (self.acs.acs_timeout * 3).max(Duration::from_secs(3)),
                poll_interval: self.ledger.delivery_poll_interval,
                attempt_budget: self.acs.acs_timeout,
                overdue_after_business_days: self.ledger.overdue_after,
                retention: self.ledger.retention,
                ..DeliverySettings::default()
            },
            reconcile: ReconcileSettings {
                interval: self.ledger.reconcile_interval,
                max_rps: f64::from(self.calls.acs_max_rps.get()) * self.ledger.reconcile_share,
            },
            boundary: self.callers.boundary(self.listen, self.emulator)?,
            connections: self.callers.connection_limits(),
            max_profiles_per_email: usize::try_from(self.callers.max_profiles_per_email)
                .unwrap_or(usize::MAX),
            notifications: self.notify.notifications()?,
        })
    }

    /// The ledger's location: the setting, else an in-memory ledger with `--emulator` (a demo
    /// keeps nothing). Anywhere else it must be named: a default file in the working directory
    /// (often thrown away with a container) would lose the record of every opt-out unseen.
    pub fn ledger_location(&self) -> Result<String, SettingError> {
        match (&self.ledger.ledger, self.emulator) {
            // Outside a demo, a ledger in memory would answer "recorded" for requests that
            // vanish at the next restart: the record of every opt-out lost unseen.
            (Some(location), false) if Ledger::in_memory(location) => Err(SettingError {
                setting: LEDGER,
                problem: "is a ledger in memory, which loses every request at restart: only \
                          --emulator may use one; name a SQLite file on a persistent volume, or \
                          a postgres:// URL"
                    .into(),
            }),
            (Some(location), _) => Ok(location.clone()),
            (None, true) => Ok("sqlite::memory:".to_owned()),
            (None, false) => Err(SettingError {
                setting: LEDGER,
                problem: "is required (outside --emulator): the ledger is the record of every \
                          opt-out; name its SQLite file on a persistent volume, or a \
                          postgres:// URL"
                    .into(),
            }),
        }
    }

    /// Whether the embedded emulator's profile table is a large one: the setting, else yes with
    /// `--emulator`, since that is how a real tenant's table behaves (and the gateway asks for
    /// every page as it must there). Refused without `--emulator` rather than ignored: it says
    /// nothing about a real tenant, whose table is what it is.
    pub fn emulator_large_table(&self) -> Result<bool, SettingError> {
        match (self.emulator_large_table, self.emulator) {
            (large, true) => Ok(large.unwrap_or(true)),
            (None, false) => Ok(false),
            (Some(_), false) => Err(SettingError {
                setting: EMULATOR_LARGE_TABLE,
                problem: "only applies with --emulator (the size of the embedded emulator's \
                          profile table); a real tenant's table is as large as it is"
                    .into(),
            }),
        }
    }

    /// The ACS client these settings describe.
    pub fn client(&self) -> Result<Client, SettingError> {
        require_https(&self.acs.acs_base_url, BASE_URL)?;
        if self.acs.acs_access_token.is_none() {
            require_https(&self.ims.ims_url, IMS_URL)?;
        }
        let (tokens, client_id) = self.token_source()?;
        let api_key = self
            .acs
            .acs_api_key
            .clone()
            .or_else(|| client_id.map(SecretString::from))
            .ok_or(SettingError {
                setting: API_KEY,
                problem: "is required (with OAuth it defaults to --ims-client-id)".into(),
            })?;
        let tenant = required(self.acs.acs_tenant.clone(), TENANT)?;
        self.acs.client_for(
            tenant,
            api_key,
            tokens,
            self.calls.settings(self.acs.acs_timeout),
        )
    }

    /// The token source, and the OAuth client id when there is one (the API key's default).
    fn token_source(&self) -> Result<(Arc<dyn TokenSource>, Option<String>), SettingError> {
        let oauth = self.ims.ims_client_id.is_some()
            || self.ims.ims_client_secret.is_some()
            || self.ims.ims_client_secret_file.is_some();
        match (&self.acs.acs_access_token, oauth) {
            (Some(_), true) => Err(SettingError {
                setting: ACCESS_TOKEN,
                problem: "conflicts with --ims-client-id (CCPA_IMS_CLIENT_ID) and its secret: \
                          use a static token or OAuth, not both"
                    .into(),
            }),
            (Some(token), false) => {
                if !acs_profile_client::is_header_token(token.expose_secret()) {
                    return Err(SettingError {
                        setting: ACCESS_TOKEN,
                        problem: "must be non-empty visible ASCII".into(),
                    });
                }
                let token = AccessToken::new(token.expose_secret());
                Ok((Arc::new(SharedToken::new(token)), None))
            }
            (None, true) => {
                let source = self.ims.token_source(self.acs.acs_timeout)?;
                Ok((Arc::new(source), self.ims.ims_client_id.clone()))
            }
            (None, false) => Err(SettingError {
                setting: CREDENTIALS,
                problem: "no credentials: set CCPA_IMS_CLIENT_ID and CCPA_IMS_CLIENT_SECRET \
                          (OAuth server-to-server), or CCPA_ACS_ACCESS_TOKEN (a static token), \
                          or run with --emulator"
                    .into(),
            }),
        }
    }
}

/// Where opt-out requests are recorded, and for how long.
#[derive(Args, Clone)]
pub struct LedgerSettings {
    /// The ledger: a SQLite file path (one gateway; created readable by its owner only), or a
    /// `postgres://` URL (several gateways sharing it). Required, except with --emulator, where
    /// it defaults to a ledger in memory.
    #[arg(long, env = "CCPA_LEDGER", hide_env_values = true)]
    pub ledger: Option<String>,

    /// Pending requests older than this many business days are reported overdue (warning log,
    /// `ccpa.v1.OptOutDelivery` health NOT_SERVING, `ccpa-gateway records --overdue`). The legal
    /// limit is 15.
    #[arg(long, env = "CCPA_OVERDUE_AFTER", default_value = "5",
          value_parser = clap::value_parser!(u32).range(1..=15))]
    pub overdue_after: u32,

    /// How long records are kept after the request was made. The regulations require at least
    /// 24 months; less is refused.
    #[arg(long, env = "CCPA_RETENTION", default_value = "731days", value_parser = retention)]
    pub retention: Duration,

    /// How often the deliverer looks for pending requests to deliver.
    #[arg(long, env = "CCPA_DELIVERY_POLL_INTERVAL", default_value = "1s",
          value_parser = duration_within(Duration::from_millis(10), Duration::from_secs(60)))]
    pub delivery_poll_interval: Duration,

    /// Every profile whose latest resolved request was applied is re-read from ACS once per
    /// interval (spread evenly over it), and what another system changed there is put back.
    /// `0s` turns it off.
    #[arg(long, env = "CCPA_RECONCILE_INTERVAL", default_value = "24h", value_parser = reconcile_interval)]
    pub reconcile_interval: Duration,

    /// The share of --acs-max-rps the reconciler may use, after interactive calls and pending
    /// deliveries: more than 0, at most 1.
    #[arg(long, env = "CCPA_RECONCILE_SHARE", default_value = "0.1", value_parser = share)]
    pub reconcile_share: f64,
}

/// Parses `--reconcile-interval`: 0 (off), or from a minute to a year.
fn reconcile_interval(text: &str) -> Result<Duration, String> {
    if humantime::parse_duration(text).map_err(|e| e.to_string())? == Duration::ZERO {
        return Ok(Duration::ZERO);
    }
    duration_within(Duration::from_secs(60), 366 * DAY)(text)
        .map_err(|e| format!("0s (off), or {e}"))
}

/// Parses a share: a number more than 0 and at most 1.
fn share(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(share) if share > 0.0 && share <= 1.0 => Ok(share),
        _ => Err("must be a number more than 0 and at most 1, such as 0.1".into()),
    }
}

pub use crate::optout::MIN_RETENTION;

/// The longest retention accepted.
pub const MAX_RETENTION: Duration = Duration::from_secs(3653 * 24 * 3600);

/// Parses a retention period, refusing less than [`MIN_RETENTION`].
pub fn retention(text: &str) -> Result<Duration, String> {
    let retention = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if retention < MIN_RETENTION {
        return Err(
            "the regulations require records to be kept at least 24 months (731days)".into(),
        );
    }
    if retention > MAX_RETENTION {
        return Err(
            "at most ten years (3653days): records hold personal data, kept no longer than needed"
                .into(),
        );
    }
    Ok(retention)
}

/// How to reach the Adobe Campaign Standard tenant.
#[derive(Args, Clone)]
pub struct AcsSettings {
    /// Adobe I/O endpoint in front of Campaign.
    #[arg(long, env = "CCPA_ACS_BASE_URL", default_value = "https://mc.adobe.io")]
    pub acs_base_url: String,

    /// Campaign tenant (organization) name: `<tenant>` in production, `<tenant>-mkt-stage<N>`
    /// on stage.
    #[arg(long, env = "CCPA_ACS_TENANT")]
    pub acs_tenant: Option<String>,

    /// API key, sent as `X-Api-Key`: the client id of the Adobe Developer Console integration.
    /// Defaults to --ims-client-id with OAuth.
    #[arg(long, env = "CCPA_ACS_API_KEY", hide_env_values = true, value_parser = secret)]
    pub acs_api_key: Option<SecretString>,

    /// A static access token, instead of OAuth. It expires (about a day for Adobe's); prefer the
    /// IMS settings. Prefer the environment variable to the flag: command lines are visible to
    /// other users of the machine.
    #[arg(long, env = "CCPA_ACS_ACCESS_TOKEN", hide_env_values = true, value_parser = secret)]
    pub acs_access_token: Option<SecretString>,

    /// Bound on the ACS work of a call whose caller set no deadline (retries and pauses
    /// included), and on any single request to ACS.
    #[arg(long, env = "CCPA_ACS_TIMEOUT", default_value = "10s",
          value_parser = duration_within(Duration::from_millis(100), Duration::from_secs(300)))]
    pub acs_timeout: Duration,

    /// Bound on establishing a connection to ACS.
    #[arg(long, env = "CCPA_ACS_CONNECT_TIMEOUT", default_value = "3s",
          value_parser = duration_within(Duration::from_millis(100), Duration::from_secs(60)))]
    pub acs_connect_timeout: Duration,
}

/// OAuth server-to-server credentials for Adobe IMS.
#[derive(Args, Clone)]
pub struct ImsSettings {
    /// Adobe IMS endpoint.
    #[arg(long, env = "CCPA_IMS_URL", default_value = ImsConfig::DEFAULT_URL)]
    pub ims_url: String,

    /// Client id of the integration (Adobe Developer Console, OAuth server-to-server).
    #[arg(long, env = "CCPA_IMS_CLIENT_ID")]
    pub ims_client_id: Option<String>,

    /// Client secret of the integration. Prefer CCPA_IMS_CLIENT_SECRET_FILE.
    #[arg(long, env = "CCPA_IMS_CLIENT_SECRET", hide_env_values = true, value_parser = secret,
          conflicts_with = "ims_client_secret_file")]
    pub ims_client_secret: Option<SecretString>,

    /// File holding the client secret (a mounted secret); read again at every token request, so
    /// a rotated secret needs no restart.
    #[arg(long, env = "CCPA_IMS_CLIENT_SECRET_FILE")]
    pub ims_client_secret_file: Option<PathBuf>,

    /// Comma-separated scopes to ask for.
    #[arg(long, env = "CCPA_IMS_SCOPES", default_value = ImsConfig::DEFAULT_SCOPES)]
    pub ims_scopes: String,
}

/// Limits on the calls made to ACS. Adobe does not throttle the profile API; the contract caps
/// engine calls, so the gateway must. Every request counts: a SetOptOut is two (write, then
/// read back), and each retry is one more.
#[derive(Args, Clone)]
pub struct CallLimits {
    /// Requests to ACS started per second, at most.
    #[arg(long, env = "CCPA_ACS_MAX_RPS", default_value = "100")]
    pub acs_max_rps: NonZeroU32,

    /// Requests to ACS in progress at once, at most.
    #[arg(long, env = "CCPA_ACS_MAX_IN_FLIGHT", default_value = "64",
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub acs_max_in_flight: u32,

    /// Calls waiting for their turn toward ACS, at most; past this a call fails at once with
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "CCPA_ACS_MAX_QUEUED", default_value = "10000",
          value_parser = clap::value_parser!(u32).range(0..=10_000_000))]
    pub acs_max_queued: u32,

    /// Attempts per call, the first included; only transient failures of calls that are safe to
    /// repeat are retried.
    #[arg(long, env = "CCPA_ACS_MAX_ATTEMPTS", default_value = "4", value_parser = clap::value_parser!(u32).range(1..=10))]
    pub acs_max_attempts: u32,
}

impl CallLimits {
    /// The client's call settings, with `default_budget` for calls without a deadline.
    pub fn settings(&self, default_budget: Duration) -> CallSettings {
        CallSettings {
            max_attempts: self.acs_max_attempts,
            default_budget,
            throttle: ThrottleSettings {
                max_rps: self.acs_max_rps,
                max_in_flight: usize::try_from(self.acs_max_in_flight).unwrap_or(usize::MAX),
                max_queued: usize::try_from(self.acs_max_queued).unwrap_or(usize::MAX),
            },
            ..CallSettings::default()
        }
    }
}

fn secret(value: &str) -> Result<SecretString, String> {
    Ok(SecretString::from(value))
}

/// A setting that is missing or wrong. The message names the flag and its environment variable,
/// never the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{setting}: {problem}")]
pub struct SettingError {
    /// The flag and variable, as `--acs-tenant (CCPA_ACS_TENANT)`.
    pub setting: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

const BASE_URL: &str = "--acs-base-url (CCPA_ACS_BASE_URL)";
/// The ledger's location, in `serve` and `records`.
pub const LEDGER: &str = "--ledger (CCPA_LEDGER)";
const TENANT: &str = "--acs-tenant (CCPA_ACS_TENANT)";
const API_KEY: &str = "--acs-api-key (CCPA_ACS_API_KEY)";
const ACCESS_TOKEN: &str = "--acs-access-token (CCPA_ACS_ACCESS_TOKEN)";
const CREDENTIALS: &str = "credentials";
const EMULATOR_LARGE_TABLE: &str = "--emulator-large-table (CCPA_EMULATOR_LARGE_TABLE)";
const IMS_URL: &str = "--ims-url (CCPA_IMS_URL)";
const IMS_CLIENT_ID: &str = "--ims-client-id (CCPA_IMS_CLIENT_ID)";
const IMS_CLIENT_SECRET: &str = "--ims-client-secret (CCPA_IMS_CLIENT_SECRET) or --ims-client-secret-file (CCPA_IMS_CLIENT_SECRET_FILE)";

/// Refuses an upstream URL that would carry tokens in clear (see `access::transport`).
fn require_https(text: &str, setting: &'static str) -> Result<(), SettingError> {
    crate::transport::require_https(text).map_err(|problem| SettingError { setting, problem })
}

fn required<T>(value: Option<T>, setting: &'static str) -> Result<T, SettingError> {
    value.ok_or(SettingError {
        setting,
        problem: "is required (or run with --emulator)".into(),
    })
}

impl ImsSettings {
    fn token_source(&self, request_timeout: Duration) -> Result<ImsTokenSource, SettingError> {
        let client_id = required(self.ims_client_id.clone(), IMS_CLIENT_ID)?;
        let client_secret = match (&self.ims_client_secret, &self.ims_client_secret_file) {
            (Some(secret), None) => ImsSecret::Value(secret.clone()),
            (None, Some(path)) => {
                // Read now as well, so that a wrong path stops start-up instead of every call.
                std::fs::metadata(path).map_err(|e| SettingError {
                    setting: IMS_CLIENT_SECRET,
                    problem: format!("cannot read {}: {e}", path.display()),
                })?;
                ImsSecret::File(path.clone())
            }
            _ => {
                return Err(SettingError {
                    setting: IMS_CLIENT_SECRET,
                    problem: "exactly one is required with --ims-client-id".into(),
                });
            }
        };
        ImsTokenSource::new(ImsConfig {
            url: self.ims_url.clone(),
            client_id,
            client_secret,
            scopes: self.ims_scopes.clone(),
            request_timeout,
        })
        .map_err(|e| SettingError {
            setting: IMS_URL,
            problem: e.reason().to_owned(),
        })
    }
}

impl AcsSettings {
    /// A client for `tenant` with these connection settings.
    pub fn client_for(
        &self,
        tenant: String,
        api_key: SecretString,
        tokens: Arc<dyn TokenSource>,
        call: CallSettings,
    ) -> Result<Client, SettingError> {
        let config = ClientConfig {
            base_url: self.acs_base_url.clone(),
            tenant,
            api_key,
            tokens,
            timeout: self.acs_timeout,
            connect_timeout: self.acs_connect_timeout,
            call,
        };
        Client::from_config(config).map_err(|e| {
            let setting = match &e {
                ConfigError::BaseUrl(_) | ConfigError::HttpClient(_) => BASE_URL,
                ConfigError::Tenant => TENANT,
                ConfigError::ApiKey => API_KEY,
            };
            SettingError {
                setting,
                problem: e.to_string(),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Harness {
        #[command(flatten)]
        serve: ServeSettings,
    }

    fn parse(args: &[&str]) -> ServeSettings {
        Harness::try_parse_from(std::iter::once("serve").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{e}"))
            .serve
    }

    #[test]
    fn the_reconciler_takes_its_share_of_the_acs_budget() {
        let options = parse(&["--emulator"]).server_options().unwrap();
        assert_eq!(options.reconcile.interval, Duration::from_secs(24 * 3600));
        assert!(
            (options.reconcile.max_rps - 10.0).abs() < 1e-9,
            "10% of 100"
        );
        let options = parse(&[
            "--emulator",
            "--acs-max-rps",
            "40",
            "--reconcile-share",
            "0.25",
            "--reconcile-interval",
            "0s",
        ])
        .server_options()
        .unwrap();
        assert!((options.reconcile.max_rps - 10.0).abs() < 1e-9, "25% of 40");
        assert!(options.reconcile.interval.is_zero(), "off");
        for (flag, value) in [
            ("--reconcile-share", "0"),
            ("--reconcile-share", "1.5"),
            ("--reconcile-share", "NaN"),
            ("--reconcile-interval", "30s"),
            ("--reconcile-interval", "400days"),
        ] {
            let refused = Harness::try_parse_from(["serve", "--emulator", flag, value]);
            let message = refused.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(message.contains(flag), "{flag} {value}: {message}");
        }
    }

    #[test]
    fn a_static_token_or_oauth_makes_a_client() {
        let with_token = parse(&[
            "--acs-tenant",
            "acme",
            "--acs-api-key",
            "key",
            "--acs-access-token",
            "token",
        ]);
        assert!(with_token.client().is_ok());
        let with_oauth = parse(&[
            "--acs-tenant",
            "acme",
            "--ims-client-id",
            "id",
            "--ims-client-secret",
            "secret",
        ]);
        assert!(
            with_oauth.client().is_ok(),
            "the API key defaults to the client id"
        );
    }

    #[test]
    fn each_missing_or_bad_setting_is_named() {
        let cases: &[(&[&str], &str)] = &[
            (&["--acs-api-key", "k", "--acs-access-token", "t"], TENANT),
            (&["--acs-tenant", "a", "--acs-access-token", "t"], API_KEY),
            (&["--acs-tenant", "a", "--acs-api-key", "k"], CREDENTIALS),
            (
                &[
                    "--acs-tenant",
                    "a",
                    "--acs-api-key",
                    "k",
                    "--acs-access-token",
                    " ",
                ],
                ACCESS_TOKEN,
            ),
            (
                &[
                    "--acs-tenant",
                    "a",
                    "--acs-api-key",
                    "k",
                    "--acs-access-token",
                    "t",
                    "--acs-base-url",
                    "mc.adobe.io",
                ],
                BASE_URL,
            ),
            (
                &[
                    "--acs-tenant",
                    "a b",
                    "--acs-api-key",
                    "k",
                    "--acs-access-token",
                    "t",
                ],
                TENANT,
            ),
            (
                &[
                    "--acs-tenant",
                    "a",
                    "--acs-access-token",
                    "t",
                    "--ims-client-id",
                    "id",
                    "--ims-client-secret",
                    "s",
                ],
                ACCESS_TOKEN,
            ),
            (
                &["--acs-tenant", "a", "--ims-client-id", "id"],
                IMS_CLIENT_SECRET,
            ),
            (
                &["--acs-tenant", "a", "--ims-client-secret", "s"],
                IMS_CLIENT_ID,
            ),
            (
                &[
                    "--acs-tenant",
                    "a",
                    "--ims-client-id",
                    "id",
                    "--ims-client-secret-file",
                    "/no/such/file",
                ],
                IMS_CLIENT_SECRET,
            ),
            (
                &[
                    "--acs-tenant",
                    "a",
                    "--ims-client-id",
                    "id",
                    "--ims-client-secret",
                    "s",
                    "--ims-url",
                    "not a url",
                ],
                IMS_URL,
            ),
        ];
        for (args, setting) in cases {
            let error = parse(args)
                .client()
                .err()
                .unwrap_or_else(|| panic!("{args:?}"));
            assert_eq!(error.setting, *setting, "{args:?}: {error}");
        }
    }

    #[test]
    fn callers_declare_themselves_only_on_loopback_or_the_emulator() {
        let settings = parse(&[]);
        let boundary =
            |listen: &str, emulator| settings.callers.boundary(listen.parse().unwrap(), emulator);
        assert!(boundary("127.0.0.1:50051", false).is_ok());
        assert!(boundary("[::1]:50051", false).is_ok());
        assert!(boundary("0.0.0.0:50051", true).is_ok(), "--emulator");
        let refused = boundary("0.0.0.0:50051", false).err().unwrap();
        assert_eq!(refused.setting, LISTEN);
        assert!(refused.problem.contains("--tls-client-ca"), "{refused}");
    }

    #[test]
    fn trusted_proxies_are_listed_well_formed_and_only_where_they_count() {
        let settings = parse(&[
            "--trusted-proxy-identity",
            "spiffe://corp.example/ns/edge/sa/front-proxy, front.corp.example",
            "--trusted-proxy-identity",
            "canary.corp.example",
        ]);
        assert_eq!(
            settings.callers.trusted_proxy_identities,
            [
                "spiffe://corp.example/ns/edge/sa/front-proxy",
                "front.corp.example",
                "canary.corp.example"
            ]
        );
        // Self-declared, then a mesh header without TLS: the list would be ignored.
        let loopback = "127.0.0.1:50051".parse().unwrap();
        let refused = settings.callers.boundary(loopback, false).err().unwrap();
        assert_eq!(refused.setting, TRUSTED_PROXY, "{refused}");
        let mut header = settings.callers.clone();
        header.caller_identity = Some("header:l5d-client-id".parse().unwrap());
        let refused = header.boundary(loopback, false).err().unwrap();
        assert_eq!(refused.setting, TRUSTED_PROXY, "{refused}");
        assert!(refused.problem.contains("--tls-cert"), "{refused}");

        for bad in ["", "front proxy", "a,,b", &"a".repeat(513)] {
            let parsed = Harness::try_parse_from(["serve", "--trusted-proxy-identity", bad]);
            let message = parsed.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(
                message.contains("--trusted-proxy-identity"),
                "{bad:?}: {message}"
            );
        }
    }

    #[test]
    fn the_large_table_is_the_emulators_by_default_and_refused_without_it() {
        assert_eq!(parse(&["--emulator"]).emulator_large_table(), Ok(true));
        assert_eq!(
            parse(&["--emulator", "--emulator-large-table"]).emulator_large_table(),
            Ok(true)
        );
        assert_eq!(
            parse(&["--emulator", "--emulator-large-table", "false"]).emulator_large_table(),
            Ok(false)
        );
        assert_eq!(
            parse(&["--emulator-large-table=false", "--emulator"]).emulator_large_table(),
            Ok(false)
        );
        assert_eq!(parse(&[]).emulator_large_table(), Ok(false));
        for args in [
            &["--emulator-large-table"][..],
            &["--emulator-large-table", "false"],
        ] {
            let refused = parse(args).emulator_large_table().unwrap_err();
            assert_eq!(refused.setting, EMULATOR_LARGE_TABLE, "{args:?}");
            assert!(refused.to_string().contains("--emulator"), "{refused}");
        }
        let refused = Harness::try_parse_from(["serve", "--emulator-large-table", "maybe"]);
        assert!(refused.is_err(), "only true or false");
    }

    #[test]
    fn secret_and_secret_file_conflict() {
        let parsed = Harness::try_parse_from([
            "serve",
            "--ims-client-secret",
            "s",
            "--ims-client-secret-file",
            "/tmp/s",
        ]);
        assert!(parsed.is_err());
    }
}
