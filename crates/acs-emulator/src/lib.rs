//! An in-memory emulator of the Adobe Campaign Standard (ACS) profile API.
//!
//! It answers as the real API does (see `shared/reference/adobe-campaign-standard.md`): opaque
//! `@...` keys that only this instance can read, 201 for a creation, `{PKey, href}` for a PATCH,
//! ACS's timestamp form, `ccpaOptOutLastModified` set when the opt-out changes, 401 `401013`
//! without a valid bearer token, 403 `403003` without the API key, 500 `XTK-170036` for a key it
//! cannot read, 404 `RST-360011` for one it can but does not hold, 500 "Check your URI" for
//! another tenant, and no `next` link on a large table unless asked for `_forcePagination=true`
//! ([`EmulatorConfig::big_table_threshold`]). It also plays Adobe IMS (`POST /ims/token/v3`,
//! client credentials) and issues tokens that expire. Tests can inject faults, one at a time
//! ([`Fault`]) or at random rates with latency ([`FaultSettings`]), and see every request it
//! received.
//!
//! ```no_run
//! # async fn run() -> std::io::Result<()> {
//! use acs_emulator::{Emulator, EmulatorConfig, NewProfile};
//!
//! let emulator = Emulator::start(EmulatorConfig::default()).await?;
//! let pkey = emulator.insert_profile(NewProfile { email: "a@example.com".into(), ..Default::default() });
//! println!("ACS at {} (tenant {}), profile {pkey}", emulator.url(), emulator.config().tenant);
//! emulator.shutdown().await;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod faults;
mod ims;
mod pkey;
mod routes;
mod store;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::Utc;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use faults::{Fault, FaultSettings};

use ims::{ImsSettings, TokenStore};
use pkey::KeyCodec;
use store::{Changes, StoredProfile};

/// How an emulator identifies its tenant and whom it lets in.
#[derive(Clone)]
pub struct EmulatorConfig {
    /// The tenant name expected in paths: `/{tenant}/campaign/...`.
    pub tenant: String,
    /// The API key expected in `X-Api-Key`.
    pub api_key: String,
    /// The bearer token accepted at start. More can be added with
    /// [`Emulator::add_access_token`].
    pub access_token: String,
    /// Answer reads of one profile wrapped in a collection (`{"content":[...]}`), as one ACS
    /// documentation page shows them, instead of bare.
    pub wrap_reads_in_collection: bool,
    /// The client id its IMS endpoint (`/ims/token/v3`) accepts.
    pub ims_client_id: String,
    /// The client secret its IMS endpoint accepts.
    pub ims_client_secret: String,
    /// Lifetime of the tokens its IMS endpoint issues (whole seconds are reported).
    pub token_lifetime: Duration,
    /// Latency and random failures of the profile API.
    pub faults: FaultSettings,
    /// Give `byEmail`'s `next.href` as a path relative to the host instead of an absolute URL
    /// (ACS has been seen to give both).
    pub relative_next_links: bool,
    /// Keep the newest requests for [`Emulator::requests`]. Off for benchmarks, where copying
    /// every request's headers would be the emulator's main cost.
    pub record_requests: bool,
    /// Campaign's `XtkBigTableThreshold` option: while the emulator holds more profiles than
    /// this, a collection (`byEmail`) answers no `next` link unless the request carries
    /// `_forcePagination=true`, as ACS does on a large table (API documentation, "Pagination").
    /// ACS's default, [`EmulatorConfig::DEFAULT_BIG_TABLE_THRESHOLD`], is above any table a test
    /// fills, while every production profile table is past it: set
    /// [`EmulatorConfig::LARGE_TABLE`] to answer as a real tenant does. The `next` links it
    /// writes never carry `_forcePagination` (Adobe's sample link has none, and nothing says ACS
    /// copies it), so a client must add it to every page it asks for.
    pub big_table_threshold: usize,
}

impl EmulatorConfig {
    /// The tenant of [`EmulatorConfig::default`].
    pub const DEFAULT_TENANT: &'static str = "emulated-tenant";
    /// The API key of [`EmulatorConfig::default`].
    pub const DEFAULT_API_KEY: &'static str = "emulator-api-key";
    /// The access token of [`EmulatorConfig::default`].
    pub const DEFAULT_ACCESS_TOKEN: &'static str = "emulator-access-token";
    /// The IMS client id of [`EmulatorConfig::default`]; also its API key, as with Adobe.
    pub const DEFAULT_IMS_CLIENT_ID: &'static str = Self::DEFAULT_API_KEY;
    /// The IMS client secret of [`EmulatorConfig::default`].
    pub const DEFAULT_IMS_CLIENT_SECRET: &'static str = "emulator-client-secret";
    /// The token lifetime of [`EmulatorConfig::default`]: Adobe's, just under a day.
    pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(86_399);
    /// The big-table threshold of [`EmulatorConfig::default`]: ACS's own default for
    /// `XtkBigTableThreshold`, 100,000 records.
    pub const DEFAULT_BIG_TABLE_THRESHOLD: usize = 100_000;
    /// A [`EmulatorConfig::big_table_threshold`] that makes any table that holds a profile a
    /// large one: what a production tenant's profile table is, without storing 100,000
    /// profiles.
    pub const LARGE_TABLE: usize = 0;
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        Self {
            tenant: Self::DEFAULT_TENANT.into(),
            api_key: Self::DEFAULT_API_KEY.into(),
            access_token: Self::DEFAULT_ACCESS_TOKEN.into(),
            wrap_reads_in_collection: false,
            ims_client_id: Self::DEFAULT_IMS_CLIENT_ID.into(),
            ims_client_secret: Self::DEFAULT_IMS_CLIENT_SECRET.into(),
            token_lifetime: Self::DEFAULT_TOKEN_LIFETIME,
            faults: FaultSettings::default(),
            record_requests: true,
            relative_next_links: false,
            big_table_threshold: Self::DEFAULT_BIG_TABLE_THRESHOLD,
        }
    }
}

impl std::fmt::Debug for EmulatorConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmulatorConfig")
            .field("tenant", &self.tenant)
            .field("api_key", &"[REDACTED]")
            .field("access_token", &"[REDACTED]")
            .field("wrap_reads_in_collection", &self.wrap_reads_in_collection)
            .field("ims_client_id", &self.ims_client_id)
            .field("ims_client_secret", &"[REDACTED]")
            .field("token_lifetime", &self.token_lifetime)
            .field("faults", &self.faults)
            .field("record_requests", &self.record_requests)
            .field("relative_next_links", &self.relative_next_links)
            .field("big_table_threshold", &self.big_table_threshold)
            .finish()
    }
}

/// A profile to put straight into the emulator, bypassing the API.
#[derive(Debug, Clone, Default)]
pub struct NewProfile {
    /// Email address.
    pub email: String,
    /// First name.
    pub first_name: String,
    /// Last name.
    pub last_name: String,
    /// CCPA opt-out of sale.
    pub ccpa_opt_out: bool,
}

/// A request as the emulator received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// When it arrived.
    pub received_at: Instant,
    /// The HTTP method.
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The query, as sent (still percent-encoded), if there was one.
    pub query: Option<String>,
    /// The headers, names in lower case, in the order received.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Bytes,
}

impl RecordedRequest {
    /// The first value of a header, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Only the newest requests are kept, so that a long run does not grow without bound.
pub(crate) const MAX_RECORDED_REQUESTS: usize = 10_000;

/// The state every request handler shares.
pub(crate) struct Shared {
    config: EmulatorConfig,
    base_url: String,
    codec: KeyCodec,
    profiles: Mutex<HashMap<u64, StoredProfile>>,
    next_id: AtomicU64,
    api_key: Mutex<String>,
    access_tokens: Mutex<TokenStore>,
    ims: Mutex<ImsSettings>,
    ims_request_count: AtomicUsize,
    ims_request_headers: Mutex<Vec<Vec<(String, String)>>>,
    ims_faults: Mutex<VecDeque<Fault>>,
    requests: Mutex<VecDeque<RecordedRequest>>,
    request_count: AtomicUsize,
    active_requests: AtomicUsize,
    peak_active_requests: AtomicUsize,
    faults: Mutex<VecDeque<Fault>>,
    fault_settings: Mutex<FaultSettings>,
    /// Put in every `byEmail` next link and required back on the page it leads to.
    listing_token: String,
    /// `byEmail` next links carry the position under another name than `_lineStart`.
    next_links_without_line_start: AtomicBool,
}

/// Locks a mutex, carrying on after a panic elsewhere: every critical section here leaves the
/// data whole (single inserts and removals), so a poisoned lock still guards valid state.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn href(&self, pkey: &str) -> String {
        format!(
            "{}/{}/campaign/profileAndServices/profile/{pkey}",
            self.base_url, self.config.tenant
        )
    }

    fn insert(&self, changes: Changes) -> (String, serde_json::Value) {
        let now = Utc::now();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut profile = StoredProfile::new(now);
        profile.apply(changes, now);
        let pkey = self.codec.encode(id);
        let rendered = profile.render(&pkey, &self.href(&pkey));
        lock(&self.profiles).insert(id, profile);
        (pkey, rendered)
    }
}

/// A running emulator. Dropping it stops it at once; [`Emulator::shutdown`] stops it gracefully.
pub struct Emulator {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Emulator {
    /// Starts an emulator on a free port of 127.0.0.1.
    pub async fn start(config: EmulatorConfig) -> std::io::Result<Self> {
        Self::bind(SocketAddr::from(([127, 0, 0, 1], 0)), config).await
    }

    /// Starts an emulator listening on `addr`.
    pub async fn bind(addr: SocketAddr, config: EmulatorConfig) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            api_key: Mutex::new(config.api_key.clone()),
            access_tokens: Mutex::new(TokenStore::with_static(&config.access_token)),
            ims: Mutex::new(ImsSettings {
                client_id: config.ims_client_id.clone(),
                client_secret: config.ims_client_secret.clone(),
                token_lifetime: config.token_lifetime,
            }),
            ims_request_count: AtomicUsize::new(0),
            ims_request_headers: Mutex::new(Vec::new()),
            ims_faults: Mutex::new(VecDeque::new()),
            active_requests: AtomicUsize::new(0),
            peak_active_requests: AtomicUsize::new(0),
            fault_settings: Mutex::new(config.faults.clone()),
            config,
            base_url: format!("http://{addr}"),
            codec: KeyCodec::new(),
            profiles: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            requests: Mutex::new(VecDeque::new()),
            request_count: AtomicUsize::new(0),
            faults: Mutex::new(VecDeque::new()),
            // Random per emulator, and with characters a URL must encode, so that only a link
            // followed as given carries it back.
            listing_token: format!("{:016x}+/=", rand::random::<u64>()),
            next_links_without_line_start: AtomicBool::new(false),
        });
        let app = routes::router(shared.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
        });
        Ok(Self {
            addr,
            shared,
            stop: Some(stop),
            task,
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its base URL, `http://127.0.0.1:PORT`: what `https://mc.adobe.io` is to the real API.
    pub fn url(&self) -> String {
        self.shared.base_url.clone()
    }

    /// Its configuration at start. [`Emulator::set_api_key`] and the other setters change the
    /// live values, not this.
    pub fn config(&self) -> &EmulatorConfig {
        &self.shared.config
    }

    /// Accepts another bearer token from now on, without expiry.
    pub fn add_access_token(&self, token: &str) {
        lock(&self.shared.access_tokens).add(token, None);
    }

    /// Refuses a bearer token from now on, with 401 `401013`.
    pub fn revoke_access_token(&self, token: &str) {
        lock(&self.shared.access_tokens).remove(token);
    }

    /// Makes every token accepted so far expire now (401 `401013` from here on), as if a day had
    /// passed.
    pub fn expire_access_tokens(&self) {
        lock(&self.shared.access_tokens).expire_all(Instant::now());
    }

    /// Expects another API key from now on; the old one gets 403 `403003`.
    pub fn set_api_key(&self, api_key: &str) {
        *lock(&self.shared.api_key) = api_key.to_owned();
    }

    /// Changes the client secret IMS accepts (a rotated or revoked secret).
    pub fn set_ims_client_secret(&self, secret: &str) {
        lock(&self.shared.ims).client_secret = secret.to_owned();
    }

    /// Changes the lifetime of tokens issued from now on. Any value is answered as is in
    /// `expires_in` (whole seconds), `u64::MAX` seconds included, to test clients against an
    /// absurd one; a lifetime beyond what the clock can count never expires here.
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        lock(&self.shared.ims).token_lifetime = lifetime;
    }

    /// From now on, gives `byEmail`'s `next.href` the next page's position in a parameter of
    /// another name than `_lineStart` (`true`), or as ACS documents it (`false`, the default).
    /// The reference says to follow `next.href` and treat what it holds as opaque: a client
    /// that looks for `_lineStart` in it stops after the first page.
    pub fn set_next_links_without_line_start(&self, without: bool) {
        self.shared
            .next_links_without_line_start
            .store(without, Ordering::SeqCst);
    }

    /// How many token requests its IMS endpoint has received.
    pub fn ims_request_count(&self) -> usize {
        self.shared.ims_request_count.load(Ordering::SeqCst)
    }

    /// The headers of each token request its IMS endpoint received (names in lower case), in
    /// order; never their bodies, which hold the client secret.
    pub fn ims_request_headers(&self) -> Vec<Vec<(String, String)>> {
        lock(&self.shared.ims_request_headers).clone()
    }

    /// Queues a fault for the next token request.
    pub fn inject_ims(&self, fault: Fault) {
        lock(&self.shared.ims_faults).push_back(fault);
    }

    /// Replaces the latency and random failures of the profile API.
    pub fn set_faults(&self, settings: FaultSettings) {
        *lock(&self.shared.fault_settings) = settings;
    }

    /// Profile requests being handled now. A request whose client went away is no longer
    /// counted once the server notices.
    pub fn active_requests(&self) -> usize {
        self.shared.active_requests.load(Ordering::SeqCst)
    }

    /// The most profile requests handled at once since start.
    pub fn peak_active_requests(&self) -> usize {
        self.shared.peak_active_requests.load(Ordering::SeqCst)
    }

    /// Stores a profile without going through the API, and returns its key.
    pub fn insert_profile(&self, profile: NewProfile) -> String {
        let body = serde_json::json!({
            "email": profile.email,
            "firstName": profile.first_name,
            "lastName": profile.last_name,
            "ccpaOptOut": profile.ccpa_opt_out,
        });
        let changes = match Changes::parse(&body) {
            Ok(changes) => changes,
            Err(e) => unreachable!("a body built from NewProfile is always valid: {e:?}"),
        };
        self.shared.insert(changes).0
    }

    /// Another valid key for the profile `pkey` names, different from it: ACS can show one
    /// profile under several keys. `None` when the key names no profile here.
    pub fn alternate_pkey(&self, pkey: &str) -> Option<String> {
        let id = self.shared.codec.decode(pkey)?;
        Some(self.shared.codec.encode_alternate(id))
    }

    /// Forgets a profile, as if it had been deleted in Campaign: its key is then well formed but
    /// unknown (404). Returns whether it existed.
    pub fn remove_profile(&self, pkey: &str) -> bool {
        self.shared
            .codec
            .decode(pkey)
            .is_some_and(|id| lock(&self.shared.profiles).remove(&id).is_some())
    }

    /// Sets a profile's opt-out without going through the API, as another system writing to
    /// Campaign would (a list import, a workflow, a CRM sync, someone in the UI): the gateway is
    /// not told, and the change is not among [`Emulator::requests`]. Returns whether the profile
    /// exists.
    pub fn change_behind_the_gateway(&self, pkey: &str, ccpa_opt_out: bool) -> bool {
        let changes = match Changes::parse(&serde_json::json!({ "ccpaOptOut": ccpa_opt_out })) {
            Ok(changes) => changes,
            Err(e) => unreachable!("a body holding only ccpaOptOut is always valid: {e:?}"),
        };
        let Some(id) = self.shared.codec.decode(pkey) else {
            return false;
        };
        match lock(&self.shared.profiles).get_mut(&id) {
            Some(profile) => {
                profile.apply(changes, chrono::Utc::now());
                true
            }
            None => false,
        }
    }

    /// A profile as the API would answer it, or `None` when the key names no profile here.
    pub fn profile(&self, pkey: &str) -> Option<serde_json::Value> {
        let id = self.shared.codec.decode(pkey)?;
        let profiles = lock(&self.shared.profiles);
        Some(profiles.get(&id)?.render(pkey, &self.shared.href(pkey)))
    }

    /// How many profiles it holds.
    pub fn profile_count(&self) -> usize {
        lock(&self.shared.profiles).len()
    }

    /// The newest requests received (at most 10,000), oldest first; none when
    /// [`EmulatorConfig::record_requests`] is off.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.requests).iter().cloned().collect()
    }

    /// How many requests it has received since it started.
    pub fn request_count(&self) -> usize {
        self.shared.request_count.load(Ordering::SeqCst)
    }

    /// Queues a fault for the next request that has none queued before it.
    pub fn inject(&self, fault: Fault) {
        lock(&self.shared.faults).push_back(fault);
    }

    /// Stops accepting connections, lets requests in progress finish, and waits for it.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Profiles for demos and manual runs: made-up people at `example.com`.
pub fn demo_profiles() -> Vec<NewProfile> {
    [
        ("ada@example.com", "Ada", "Lovelace", false),
        ("grace@example.com", "Grace", "Hopper", true),
        ("alan@example.com", "Alan", "Turing", false),
    ]
    .into_iter()
    .map(|(email, first, last, opt_out)| NewProfile {
        email: email.into(),
        first_name: first.into(),
        last_name: last.into(),
        ccpa_opt_out: opt_out,
    })
    .collect()
}
