//! A gateway on a real socket in front of a real emulator, for the integration tests.

#![allow(dead_code)] // Each test binary uses its own part of this harness.

pub mod pki;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use acs_emulator::{Emulator, EmulatorConfig, NewProfile};
use acs_profile_client::{AccessToken, Client, ClientConfig, SharedToken};
use ccpa_gateway::ledger::Ledger;
use ccpa_gateway::proto::ccpa_v1::ccpa_service_client::CcpaServiceClient;
use ccpa_gateway::server::{self, ServeError, ServerOptions};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, ClientTlsConfig};

/// A running gateway and the emulator behind it.
pub struct Harness {
    pub emulator: Emulator,
    pub addr: SocketAddr,
    pub channel: Channel,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<Result<(), ServeError>>,
}

/// A client configuration for the emulator's tenant and credentials.
pub fn acs_config(emulator: &Emulator) -> ClientConfig {
    let config = emulator.config();
    ClientConfig::new(
        emulator.url(),
        config.tenant.clone(),
        config.api_key.clone(),
        Arc::new(SharedToken::new(AccessToken::new(
            config.access_token.as_str(),
        ))),
    )
}

/// A running gateway: its address, a channel to it, what stops it, and its task.
pub type Running = (
    SocketAddr,
    Channel,
    oneshot::Sender<()>,
    JoinHandle<Result<(), ServeError>>,
);

/// Starts a gateway on 127.0.0.1:0 that calls ACS through `acs`, with an in-memory ledger.
pub async fn start_gateway(acs: ClientConfig, options: ServerOptions) -> Running {
    let ledger = Ledger::open("sqlite::memory:")
        .await
        .expect("an in-memory ledger");
    start_gateway_on(acs, ledger, options).await
}

/// Starts a gateway on 127.0.0.1:0 that calls ACS through `acs` and records in `ledger`.
pub async fn start_gateway_on(
    acs: ClientConfig,
    ledger: Ledger,
    options: ServerOptions,
) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, server) = spawn_gateway(acs, ledger, listener.into(), options);
    let channel = connect(addr).await;
    (addr, channel, stop, server)
}

/// Starts a gateway on `listeners`, already bound, without connecting to it (TLS, say): what
/// stops it, and its task.
pub fn spawn_gateway(
    acs: ClientConfig,
    ledger: Ledger,
    listeners: server::Listeners,
    options: ServerOptions,
) -> (oneshot::Sender<()>, JoinHandle<Result<(), ServeError>>) {
    let client = Client::from_config(acs).expect("valid ACS settings");
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(server::serve(
        client,
        ledger,
        listeners,
        async {
            let _ = stopped.await;
        },
        options,
    ));
    (stop, server)
}

/// A channel to a gateway serving TLS; `Err` when the handshake is refused.
pub async fn connect_tls(
    addr: SocketAddr,
    tls: ClientTlsConfig,
) -> Result<Channel, tonic::transport::Error> {
    Channel::from_shared(format!("https://localhost:{}", addr.port()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// A channel to a gateway.
pub async fn connect(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("the gateway accepts connections")
}

impl Harness {
    /// A gateway in front of a fresh emulator with default settings.
    pub async fn start() -> Self {
        Self::start_with(EmulatorConfig::default(), ServerOptions::default()).await
    }

    /// A gateway in front of a fresh emulator configured as given.
    pub async fn start_with(config: EmulatorConfig, options: ServerOptions) -> Self {
        let emulator = Emulator::start(config).await.unwrap();
        let (addr, channel, stop, server) = start_gateway(acs_config(&emulator), options).await;
        Self {
            emulator,
            addr,
            channel,
            stop: Some(stop),
            server,
        }
    }

    /// A client of the CCPA service.
    pub fn client(&self) -> CcpaServiceClient<Channel> {
        CcpaServiceClient::new(self.channel.clone())
    }

    /// Stores a profile in the emulator and returns its key.
    pub fn profile(&self, ccpa_opt_out: bool) -> String {
        self.emulator.insert_profile(NewProfile {
            email: "ada@example.com".into(),
            first_name: "Ada".into(),
            last_name: "Lovelace".into(),
            ccpa_opt_out,
        })
    }

    /// Starts the gateway's shutdown without waiting for it.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Shuts the gateway down and waits for `serve` to return.
    pub async fn shutdown(mut self) -> Result<(), ServeError> {
        self.begin_shutdown();
        (&mut self.server)
            .await
            .expect("the server task does not panic")
    }
}

/// The PostgreSQL the tests use; CI machines run one on 127.0.0.1:5432 with trust auth.
pub fn postgres_url() -> String {
    std::env::var("CCPA_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// Where a test's ledger lives: a SQLite file in a temporary directory, or a schema of its own
/// in the test PostgreSQL database. Dropping it removes both.
pub struct Store {
    /// What `--ledger` (or `Ledger::open`) takes.
    pub location: String,
    _dir: Option<tempfile::TempDir>,
    schema: Option<String>,
}

impl Store {
    /// A new SQLite ledger file.
    pub fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self {
            location: dir.path().join("ledger.sqlite3").display().to_string(),
            _dir: Some(dir),
            schema: None,
        }
    }

    /// A new, empty schema in the test PostgreSQL database. Fails (never skips) when no
    /// PostgreSQL is reachable.
    pub async fn postgres() -> Self {
        let schema = format!("ledger_test_{}", uuid::Uuid::new_v4().simple());
        let admin = postgres_admin().await;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&admin)
            .await
            .expect("the test PostgreSQL accepts CREATE SCHEMA");
        let separator = if postgres_url().contains('?') {
            '&'
        } else {
            '?'
        };
        Self {
            location: format!("{}{separator}options[search_path]={schema}", postgres_url()),
            _dir: None,
            schema: Some(schema),
        }
    }

    /// The ledger itself.
    pub async fn open(&self) -> Ledger {
        Ledger::open(&self.location)
            .await
            .expect("the ledger opens")
    }
}

async fn postgres_admin() -> sqlx::AnyPool {
    sqlx::any::install_default_drivers();
    sqlx::any::AnyPoolOptions::new()
        .max_connections(1)
        .connect(&postgres_url())
        .await
        .unwrap_or_else(|e| {
            panic!(
                "PostgreSQL at {} is required by these tests (set CCPA_TEST_POSTGRES_URL): {e}",
                postgres_url()
            )
        })
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Some(schema) = self.schema.take() {
            // Drop runs outside any runtime the test may still hold: use a thread of its own.
            let _ = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                if let Ok(runtime) = runtime {
                    runtime.block_on(drop_schema(&schema));
                }
            })
            .join();
        }
    }
}

/// Drops a test's schema. A gateway of the test may still hold a transaction in it: the test's
/// runtime (often its only thread) is blocked in this drop, so that transaction can never end,
/// and `DROP SCHEMA` would wait for its locks forever. So the drop waits a little for locks, and
/// meanwhile ends the sessions that hold any in the schema.
async fn drop_schema(schema: &str) {
    let admin = postgres_admin().await;
    for _ in 0..20 {
        let _ = sqlx::query(
            "SELECT pg_terminate_backend(l.pid)::text FROM pg_locks l \
             JOIN pg_class c ON c.oid = l.relation \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND l.pid <> pg_backend_pid()",
        )
        .bind(schema)
        .fetch_all(&admin)
        .await;
        let _ = sqlx::query("SET lock_timeout = '1s'").execute(&admin).await;
        let dropped = sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
            .execute(&admin)
            .await;
        if dropped.is_ok() {
            return;
        }
    }
}

/// A `ccpa-gateway serve` process on a ledger, in front of the test's emulator: what a
/// deployment runs, with its own memory and its own death.
pub struct GatewayProcess {
    child: tokio::process::Child,
    pub client: CcpaServiceClient<Channel>,
    /// Its gRPC address.
    pub addr: SocketAddr,
    /// Every line it has written to stderr so far.
    logs: Arc<Mutex<Vec<String>>>,
}

impl GatewayProcess {
    /// Starts one with the test settings (a 1 s ACS timeout, delivery polled every 100 ms).
    pub async fn start(emulator: &Emulator, ledger: &str) -> Self {
        Self::start_with(emulator, ledger, &[], "warn,ccpa_gateway::cli=info").await
    }

    /// Starts one with `extra` arguments to `serve` and the log filter `log`.
    pub async fn start_with(emulator: &Emulator, ledger: &str, extra: &[&str], log: &str) -> Self {
        Self::start_connected(emulator, ledger, extra, log, None).await
    }

    /// Starts one serving TLS (given in `extra`), connected with `tls`.
    pub async fn start_tls(
        emulator: &Emulator,
        ledger: &str,
        extra: &[&str],
        log: &str,
        tls: ClientTlsConfig,
    ) -> Self {
        Self::start_connected(emulator, ledger, extra, log, Some(tls)).await
    }

    async fn start_connected(
        emulator: &Emulator,
        ledger: &str,
        extra: &[&str],
        log: &str,
        tls: Option<ClientTlsConfig>,
    ) -> Self {
        use tokio::io::{AsyncBufReadExt, BufReader};
        let config = emulator.config();
        let addr_dir = tempfile::tempdir().unwrap();
        let addr_file = addr_dir.path().join("listen-addr");
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ccpa-gateway"))
            .args(["--log-format", "json", "serve", "--listen", "127.0.0.1:0"])
            .arg("--listen-addr-file")
            .arg(&addr_file)
            .args(["--ledger", ledger, "--acs-timeout", "1s"])
            .args(["--delivery-poll-interval", "100ms"])
            .args(extra)
            .env("CCPA_ACS_BASE_URL", emulator.url())
            .env("CCPA_ACS_TENANT", &config.tenant)
            .env("CCPA_ACS_API_KEY", &config.api_key)
            .env("CCPA_ACS_ACCESS_TOKEN", &config.access_token)
            .env("RUST_LOG", log)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let kept = logs.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                kept.lock().unwrap().push(line);
            }
        });
        let addr = ccpa_gateway::cli::listen_addr::wait(&addr_file, Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("{e}: {}", logs.lock().unwrap().join("\n")));
        let channel = match tls {
            None => connect(addr).await,
            Some(tls) => connect_tls(addr, tls)
                .await
                .expect("the gateway accepts TLS connections"),
        };
        Self {
            child,
            client: CcpaServiceClient::new(channel),
            addr,
            logs,
        }
    }

    /// Waits for a log line holding every one of `needles`, and returns it. The wait ends when
    /// the line is written; the bound is only there so that a broken gateway fails the test.
    pub async fn log_line(&self, needles: &[&str]) -> String {
        let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let found = self
                .logs
                .lock()
                .unwrap()
                .iter()
                .find(|line| needles.iter().all(|n| line.contains(n)))
                .cloned();
            if let Some(line) = found {
                return line;
            }
            assert!(
                tokio::time::Instant::now() < give_up,
                "no log line holds {needles:?}: {:?}",
                self.logs.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// How many log lines hold every one of `needles` so far.
    pub fn log_count(&self, needles: &[&str]) -> usize {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter(|line| needles.iter().all(|n| line.contains(n)))
            .count()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap()
    }

    /// Its peak resident set size so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("/proc/<pid>/status has VmHWM");
        kib * 1024
    }

    /// Kills it at once: no shutdown, no flush beyond what each commit already made durable.
    pub async fn kill(mut self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(self.pid()).unwrap()),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        self.child.wait().await.unwrap();
    }
}

/// Every answer of a BulkSetOptOut stream of `items`, each one a success at the gRPC level.
pub async fn bulk(
    client: &mut CcpaServiceClient<Channel>,
    items: Vec<ccpa_gateway::proto::ccpa_v1::BulkSetOptOutRequest>,
) -> Vec<ccpa_gateway::proto::ccpa_v1::BulkSetOptOutResponse> {
    use futures::StreamExt;
    let answers: Vec<_> = client
        .bulk_set_opt_out(futures::stream::iter(items))
        .await
        .unwrap()
        .into_inner()
        .collect()
        .await;
    answers.into_iter().map(Result::unwrap).collect()
}

/// Waits until no record is PENDING: the deliverer has finished whatever answered PENDING (an
/// item whose attempt outlived its budget on a busy machine is PENDING, and delivered after).
pub async fn until_settled(client: &mut CcpaServiceClient<Channel>) {
    let give_up = tokio::time::Instant::now() + Duration::from_secs(300);
    loop {
        let pending = client
            .list_opt_out_records(ccpa_gateway::proto::ccpa_v1::ListOptOutRecordsRequest {
                state: ccpa_gateway::proto::ccpa_v1::DeliveryState::Pending as i32,
                page_size: 1,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .records;
        if pending.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "still pending after five minutes: {pending:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One record of the ledger, by request id; it must exist.
/// GetOptOut by key, which must succeed.
pub async fn opt_out_of(
    client: &mut CcpaServiceClient<Channel>,
    pkey: &str,
) -> ccpa_gateway::proto::ccpa_v1::GetOptOutResponse {
    client
        .get_opt_out(ccpa_gateway::proto::ccpa_v1::GetOptOutRequest {
            pkey: pkey.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

pub async fn record(
    client: &mut CcpaServiceClient<Channel>,
    request_id: &str,
) -> ccpa_gateway::proto::ccpa_v1::OptOutRecord {
    client
        .get_opt_out_record(ccpa_gateway::proto::ccpa_v1::GetOptOutRecordRequest {
            request_id: request_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .record
        .unwrap()
}

/// The most requests that arrived within any one second.
pub fn busiest_second(arrivals: &[std::time::Instant]) -> usize {
    busiest_window(arrivals, Duration::from_secs(1))
}

/// The most requests that arrived within any `window` (starting at one of them).
pub fn busiest_window(arrivals: &[std::time::Instant], window: Duration) -> usize {
    arrivals
        .iter()
        .map(|start| {
            arrivals
                .iter()
                .filter(|t| **t >= *start && **t < *start + window)
                .count()
        })
        .max()
        .unwrap_or(0)
}
