//! A gateway on a real socket in front of a real emulator, for the integration tests.

#![allow(dead_code)] // Each test binary uses its own part of this harness.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use acs_emulator::{Emulator, EmulatorConfig, NewProfile};
use acs_profile_client::{AccessToken, Client, ClientConfig, SharedToken};
use ccpa_gateway::ledger::Ledger;
use ccpa_gateway::proto::ccpa_v1::ccpa_service_client::CcpaServiceClient;
use ccpa_gateway::server::{self, ServeError, ServerOptions};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

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
    let client = Client::from_config(acs).expect("valid ACS settings");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(server::serve(
        client,
        ledger,
        listener,
        async {
            let _ = stopped.await;
        },
        options,
    ));
    let channel = connect(addr).await;
    (addr, channel, stop, server)
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
