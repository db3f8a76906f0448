//! What the integration tests share: starting a gateway on a real socket in front of a real
//! emulator (`gateway`), its ledger's stores, and helpers for calls.

/// Runs a test body (an `async fn(Store)` of the test file, which imports `Store`) once on SQLite
/// and once on PostgreSQL.
macro_rules! on_both_stores {
    ($($name:ident),+ $(,)?) => {
        $(
            mod $name {
                #[tokio::test]
                async fn sqlite() {
                    super::$name(super::Store::sqlite()).await;
                }

                #[tokio::test]
                async fn postgres() {
                    super::$name(super::Store::postgres().await).await;
                }
            }
        )+
    };
}

pub mod cli;
pub mod gateway;
pub mod pki;
pub mod receiver;
mod requests;

pub use requests::{get, health_request, opt_out_of, record, record_response, records_of, set};

#[allow(unused_imports)] // Each test binary uses its own part.
pub use gateway::{Gateway, GatewayBuilder, GatewayProcess, QUICK_DELIVERY_ARGS, gateway};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use acs_emulator::Emulator;
use acs_profile_client::{AccessToken, ClientConfig, SharedToken};
use ccpa_gateway::proto::ccpa_v1::ccpa_service_client::CcpaServiceClient;
use ccpa_gateway::store::Ledger;
use tonic::transport::{Channel, ClientTlsConfig};

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

    /// The PostgreSQL schema of the store, if it is one.
    pub fn schema(&self) -> Option<&str> {
        self.schema.as_deref()
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

/// How long [`eventually`] waits for what a test expects before failing it: far beyond what a
/// busy 2-core machine takes, so that reaching it means the thing will not happen.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// What a check given to [`eventually`] answers: `Some(found)` or `Ok(found)` once what is awaited
/// has happened; `None`, or `Err(seen)` with what it saw instead (which a failure shows), until
/// then.
pub trait Checked {
    type Found;
    fn found(self) -> Result<Self::Found, Option<String>>;
}

impl<T> Checked for Option<T> {
    type Found = T;
    fn found(self) -> Result<T, Option<String>> {
        self.ok_or(None)
    }
}

impl<T, E: std::fmt::Debug> Checked for Result<T, E> {
    type Found = T;
    fn found(self) -> Result<T, Option<String>> {
        self.map_err(|seen| Some(format!("{seen:?}")))
    }
}

/// Polls `check` every 20 ms until it gives what is awaited (see [`Checked`]), and returns that;
/// fails the test, saying `what` was awaited and what the last check saw, after [`PATIENCE`].
/// The one way the tests wait for something that happens in the background.
pub async fn eventually<C, F, Fut>(what: &str, check: F) -> C::Found
where
    C: Checked,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = C>,
{
    eventually_within(PATIENCE, what, check).await
}

/// [`eventually`], failing after `patience` instead: for what takes longer on a busy machine
/// (delivering a backlog), or a test that bounds how soon a thing happens.
pub async fn eventually_within<C, F, Fut>(patience: Duration, what: &str, mut check: F) -> C::Found
where
    C: Checked,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = C>,
{
    let give_up = tokio::time::Instant::now() + patience;
    loop {
        let seen = match check().await.found() {
            Ok(found) => return found,
            Err(seen) => seen,
        };
        assert!(
            tokio::time::Instant::now() < give_up,
            "waited {patience:?} for {what}{}",
            seen.map(|seen| format!("; the last check saw {seen}"))
                .unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until no record is PENDING: the deliverer has finished whatever answered PENDING (an
/// item whose attempt outlived its budget on a busy machine is PENDING, and delivered after).
pub async fn until_settled(client: &mut CcpaServiceClient<Channel>) {
    until_settled_within(client, Duration::from_secs(300)).await;
}

/// [`until_settled`], failing after `patience`.
pub async fn until_settled_within(client: &mut CcpaServiceClient<Channel>, patience: Duration) {
    eventually_within(patience, "no record to be PENDING", || {
        let mut client = client.clone();
        async move {
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
                Ok(())
            } else {
                Err(pending)
            }
        }
    })
    .await;
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
