//! The one way the tests start a gateway: [`GatewayBuilder`], either in the test's process
//! ([`GatewayBuilder::start`], in front of an emulator of its own) or as a `ccpa-gateway serve`
//! process ([`GatewayBuilder::spawn`], what a deployment runs, with its own memory and its own
//! death). Both find the gateway's address in the file `--listen-addr-file` names, or in the
//! listener they bound; neither reads it from logs.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use acs_emulator::{Emulator, EmulatorConfig, NewProfile};
use acs_profile_client::{Client, ClientConfig, Clock};
use ccpa_gateway::proto::ccpa_v1::ccpa_service_client::CcpaServiceClient;
use ccpa_gateway::server::{self, Listeners, ServeError, ServerOptions};
use ccpa_gateway::store::Ledger;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, ClientTlsConfig};

use super::{acs_config, connect, connect_tls};

/// `serve` settings for a process whose tests wait for deliveries: ACS calls time out after a
/// second, and the deliverer looks for due requests every 100 ms.
pub const QUICK_DELIVERY_ARGS: &[&str] =
    &["--acs-timeout", "1s", "--delivery-poll-interval", "100ms"];

/// How the gateway calls ACS.
enum Acs {
    /// Its own emulator, with [`acs_config`]'s settings adjusted so.
    OwnEmulator(Box<dyn FnOnce(ClientConfig) -> ClientConfig + Send>),
    /// As these settings say (the test's own emulator, say): it starts none.
    Calling(ClientConfig),
}

/// Where the gateway's ledger is.
enum LedgerChoice {
    /// In memory (in the test's process), or a new file in a temporary directory (a process).
    Fresh,
    /// At this location (a file path or a `postgres://` URL).
    At(String),
}

/// How to start a gateway. Every setting has a default: an emulator with its default
/// configuration, a fresh ledger, the default server options, the system's clock.
pub struct GatewayBuilder {
    emulator: EmulatorConfig,
    acs: Acs,
    ledger: LedgerChoice,
    options: ServerOptions,
    health: Option<TcpListener>,
    clock: Option<Arc<dyn Clock>>,
    store: Option<super::Store>,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    log_filter: String,
    tls: Option<ClientTlsConfig>,
}

impl Default for GatewayBuilder {
    fn default() -> Self {
        Self {
            emulator: EmulatorConfig::default(),
            acs: Acs::OwnEmulator(Box::new(|acs| acs)),
            ledger: LedgerChoice::Fresh,
            options: ServerOptions::default(),
            health: None,
            clock: None,
            store: None,
            args: Vec::new(),
            envs: Vec::new(),
            log_filter: "warn,ccpa_gateway::cli=info".to_owned(),
            tls: None,
        }
    }
}

/// A builder with every default.
pub fn gateway() -> GatewayBuilder {
    GatewayBuilder::default()
}

impl GatewayBuilder {
    /// The emulator it starts in front of ([`GatewayBuilder::start`]).
    pub fn emulator(mut self, config: EmulatorConfig) -> Self {
        self.emulator = config;
        self
    }

    /// How it calls its emulator ([`GatewayBuilder::start`]): `adjust` changes the settings
    /// of [`acs_config`] (the emulator's tenant, and a fixed token).
    pub fn adjust_acs(
        mut self,
        adjust: impl FnOnce(ClientConfig) -> ClientConfig + Send + 'static,
    ) -> Self {
        self.acs = Acs::OwnEmulator(Box::new(adjust));
        self
    }

    /// Calls ACS as `acs` says, and starts no emulator of its own ([`GatewayBuilder::start`]):
    /// for a test that holds its emulator itself.
    pub fn calling(mut self, acs: ClientConfig) -> Self {
        self.acs = Acs::Calling(acs);
        self
    }

    /// Its ledger, at `location` (a file path, or a `postgres://` URL).
    pub fn ledger_at(mut self, location: &str) -> Self {
        self.ledger = LedgerChoice::At(location.to_owned());
        self
    }

    /// Its ledger, in `store`, which the gateway keeps ([`GatewayBuilder::start`]).
    pub fn store(mut self, store: super::Store) -> Self {
        self.ledger = LedgerChoice::At(store.location.clone());
        self.store = Some(store);
        self
    }

    /// Its options ([`GatewayBuilder::start`]).
    pub fn options(mut self, options: ServerOptions) -> Self {
        self.options = options;
        self
    }

    /// A health-only listener beside the gRPC one ([`GatewayBuilder::start`]).
    pub fn health_listener(mut self, listener: TcpListener) -> Self {
        self.health = Some(listener);
        self
    }

    /// The clock its ledger and deliverer read ([`GatewayBuilder::start`]): a test's
    /// `ManualClock`, to move leases, back-off, the overdue clock and retention at will.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Arguments to `serve` ([`GatewayBuilder::spawn`]).
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|arg| (*arg).to_owned()));
        self
    }

    /// An environment variable of the process ([`GatewayBuilder::spawn`]).
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.envs.push((name.to_owned(), value.to_owned()));
        self
    }

    /// The process's `RUST_LOG` ([`GatewayBuilder::spawn`]).
    pub fn log_filter(mut self, filter: &str) -> Self {
        filter.clone_into(&mut self.log_filter);
        self
    }

    /// Connects to the process with TLS ([`GatewayBuilder::spawn`]; its TLS settings go in
    /// [`GatewayBuilder::args`]).
    pub fn tls(mut self, tls: ClientTlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Starts it in the test's process, in front of a new emulator (unless it was told what to
    /// call), listening on 127.0.0.1:0.
    pub async fn start(self) -> Gateway {
        assert!(
            self.args.is_empty() && self.envs.is_empty() && self.tls.is_none(),
            "arguments, environment and TLS to connect with are for a process (spawn)"
        );
        let (emulator, acs) = match self.acs {
            Acs::OwnEmulator(adjust) => {
                let emulator = Emulator::start(self.emulator).await.unwrap();
                let acs = adjust(acs_config(&emulator));
                (Some(emulator), acs)
            }
            Acs::Calling(acs) => (None, acs),
        };
        let ledger = match self.ledger {
            LedgerChoice::Fresh => Ledger::open("sqlite::memory:").await.unwrap(),
            LedgerChoice::At(location) => Ledger::open(&location).await.unwrap(),
        };
        let ledger = match self.clock {
            Some(clock) => ledger.with_clock(clock),
            None => ledger,
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = Client::from_config(acs).expect("valid ACS settings");
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(server::serve(
            client,
            ledger.clone(),
            Listeners {
                grpc: listener,
                health: self.health,
                metrics: None,
            },
            async {
                let _ = stopped.await;
            },
            self.options,
        ));
        // Lazy: the listener is bound, so the first call connects; and a gateway serving TLS is
        // reached with `connect_tls` instead.
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .connect_lazy();
        Gateway {
            emulator,
            addr,
            channel,
            ledger,
            store: self.store,
            stop: Some(stop),
            server,
        }
    }

    /// Starts a `ccpa-gateway serve` process on 127.0.0.1:0 with JSON logs, calling ACS at
    /// `emulator` if one is given (otherwise its arguments say where, `--emulator` say), and
    /// connects to it.
    pub async fn spawn(self, emulator: Option<&Emulator>) -> GatewayProcess {
        let dir = tempfile::tempdir().unwrap();
        let addr_file = dir.path().join("listen-addr");
        let ledger = match self.ledger {
            LedgerChoice::Fresh => dir.path().join("ledger.sqlite3").display().to_string(),
            LedgerChoice::At(location) => location,
        };
        let mut command = super::cli::ccpa_gateway();
        command
            .args(["--log-format", "json", "serve", "--listen", "127.0.0.1:0"])
            .arg("--listen-addr-file")
            .arg(&addr_file)
            .args(["--ledger", &ledger])
            .args(&self.args)
            .env("RUST_LOG", &self.log_filter)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        if let Some(emulator) = emulator {
            let config = emulator.config();
            command
                .env("CCPA_ACS_BASE_URL", emulator.url())
                .env("CCPA_ACS_TENANT", &config.tenant)
                .env("CCPA_ACS_API_KEY", &config.api_key)
                .env("CCPA_ACS_ACCESS_TOKEN", &config.access_token);
        }
        for (name, value) in &self.envs {
            command.env(name, value);
        }
        assert!(
            self.clock.is_none() && self.health.is_none(),
            "a process reads the system's clock and has no health listener of the test's"
        );
        let mut child = command.spawn().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let log_reader = tokio::spawn(collect_lines(child.stderr.take().unwrap(), logs.clone()));
        let stdout = Arc::new(Mutex::new(Vec::new()));
        tokio::spawn(collect_lines(child.stdout.take().unwrap(), stdout.clone()));
        let addr = ccpa_gateway::cli::listen_addr::wait(&addr_file, Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("{e}: {}", logs.lock().unwrap().join("\n")));
        let channel = match self.tls {
            None => connect(addr).await,
            Some(tls) => connect_tls(addr, tls)
                .await
                .expect("the gateway accepts TLS connections"),
        };
        GatewayProcess {
            child,
            client: CcpaServiceClient::new(channel.clone()),
            channel,
            addr,
            logs,
            log_reader: Some(log_reader),
            stdout,
            dir,
            _store: self.store,
        }
    }
}

async fn collect_lines(stream: impl tokio::io::AsyncRead + Unpin, into: Arc<Mutex<Vec<String>>>) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        into.lock().unwrap().push(line);
    }
}

/// A gateway running in the test's process, and the emulator behind it. Dropping it shuts the
/// gateway down.
pub struct Gateway {
    emulator: Option<Emulator>,
    pub addr: SocketAddr,
    pub channel: Channel,
    /// The ledger it serves, on its clock.
    pub ledger: Ledger,
    /// Where its ledger is, if it was given one to keep.
    store: Option<super::Store>,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<Result<(), ServeError>>,
}

impl Gateway {
    /// The emulator it started.
    pub fn emulator(&self) -> &Emulator {
        self.emulator
            .as_ref()
            .expect("this gateway calls the test's own emulator")
    }

    /// Where its ledger is, if it was given a [`GatewayBuilder::store`].
    pub fn store(&self) -> &super::Store {
        self.store.as_ref().expect("this gateway was given a store")
    }

    /// A client of the CCPA service.
    pub fn client(&self) -> CcpaServiceClient<Channel> {
        CcpaServiceClient::new(self.channel.clone())
    }

    /// Stores a profile in the emulator and returns its key.
    pub fn profile(&self, ccpa_opt_out: bool) -> String {
        self.emulator().insert_profile(NewProfile {
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

    /// Waits for `serve` to return without asking it to: what a gateway that refuses to start
    /// does at once.
    pub async fn stopped(mut self) -> Result<(), ServeError> {
        (&mut self.server)
            .await
            .expect("the server task does not panic")
    }
}

/// A `ccpa-gateway serve` process, connected.
pub struct GatewayProcess {
    child: tokio::process::Child,
    pub client: CcpaServiceClient<Channel>,
    pub channel: Channel,
    /// Its gRPC address.
    pub addr: SocketAddr,
    /// Every line it has written to stderr so far.
    logs: Arc<Mutex<Vec<String>>>,
    log_reader: Option<JoinHandle<()>>,
    /// Every line it has written to stdout so far.
    stdout: Arc<Mutex<Vec<String>>>,
    /// Its address file, and its ledger unless it was given one.
    dir: tempfile::TempDir,
    /// Where its ledger is, if it was given one to keep: dropped after the process.
    _store: Option<super::Store>,
}

impl GatewayProcess {
    /// Waits for a log line holding every one of `needles`, and returns it. The wait ends when
    /// the line is written; the bound is only there so that a broken gateway fails the test.
    pub async fn log_line(&self, needles: &[&str]) -> String {
        let what = format!("a log line holding {needles:?}");
        super::eventually_within(Duration::from_secs(30), &what, || {
            let logs = self.logs.lock().unwrap();
            let found = logs
                .iter()
                .find(|line| needles.iter().all(|n| line.contains(n)))
                .cloned();
            std::future::ready(found.ok_or_else(|| logs.clone()))
        })
        .await
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

    /// The URL of its metrics (`--metrics-listen`), from the line that announces it.
    pub async fn metrics_url(&self) -> String {
        let line = self.log_line(&["metrics listening"]).await;
        let line: serde_json::Value = serde_json::from_str(&line).unwrap();
        line["url"].as_str().unwrap().to_owned()
    }

    /// Its stderr so far.
    pub fn log(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// The directory of its ledger (`ledger.sqlite3`), unless it was given one elsewhere.
    pub fn ledger_dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Its stdout so far.
    pub fn stdout(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("still running")
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

    /// Sends it `signal`.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(self.pid()).unwrap()),
            signal,
        )
        .unwrap();
    }

    /// Asks it to stop, as Kubernetes does.
    pub fn sigterm(&self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
    }

    /// Waits for it to exit and for its last log lines to be read; its exit code.
    pub async fn wait(&mut self) -> i32 {
        let status = tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("the gateway exits")
            .unwrap();
        if let Some(reader) = self.log_reader.take() {
            reader.await.unwrap();
        }
        status.code().expect("exited, not killed")
    }

    /// Kills it at once: no shutdown, no flush beyond what each commit already made durable.
    pub async fn kill(mut self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
        self.child.wait().await.unwrap();
    }
}
