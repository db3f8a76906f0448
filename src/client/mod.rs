//! A client for the gateway's own API (`ccpa.v1.CcpaService`), for Rust services that call it.
//!
//! It carries the generated messages and tonic's client, and nothing of the server: depend on
//! this package with `default-features = false` (the `server` feature is the gateway itself).
//! The gateway's CLI calls through it too.
//!
//! ```no_run
//! use ccpa_gateway::client::{ClientBuilder, Error, Reason};
//! use ccpa_gateway::proto::ccpa_v1::{RequestSource, SetOptOutRequest};
//!
//! # async fn run() -> Result<(), Error> {
//! let client = ClientBuilder::new("https://ccpa-gateway:50051")
//!     .tls_ca("/etc/ccpa/ca.pem")
//!     .tls_identity("/etc/ccpa/client.pem", "/etc/ccpa/client.key")
//!     .connect()
//!     .await?;
//! let answer = client
//!     .set_opt_out(SetOptOutRequest {
//!         pkey: "@UyAH-YQ4QfDv6ZpCtLhEv4HbSYJhz8Kx".into(),
//!         ccpa_opt_out: Some(true),
//!         source: RequestSource::WebForm as i32,
//!         ..Default::default()
//!     })
//!     .await;
//! match answer {
//!     Ok(recorded) => println!("recorded as {}", recorded.request_id),
//!     Err(Error::Status { reason: Reason::ProfileNotFound, .. }) => println!("no such profile"),
//!     Err(other) => return Err(other),
//! }
//! # Ok(())
//! # }
//! ```
//!
//! - **Safe retries.** [`Client::set_opt_out`] always sends a request id (a new UUID when the
//!   request has none), and retries UNAVAILABLE and DEADLINE_EXCEEDED with that same id, with
//!   exponential back-off and jitter: the gateway's ledger answers a repeated id with its first
//!   outcome, so a retry never records a request twice. Reads are retried the same way.
//!   [`Client::create_profile`] is not retried: without an opt-out it is not recorded under its
//!   id, and a repeat could create a second profile.
//! - **Deadlines.** Every unary attempt carries the default deadline ([`ClientBuilder::deadline`],
//!   30 seconds), sent to the gateway as `grpc-timeout`.
//! - **Errors** are [`Error`]: the status's `ErrorInfo` reason, `RetryInfo` and `BadRequest`
//!   decoded into enums.

mod error;

use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt as _};
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

pub use error::{Error, FieldProblem, FieldViolation, Reason};

use crate::backoff::Backoff;
use crate::proto::ccpa_v1::ccpa_service_client::CcpaServiceClient;
use crate::proto::ccpa_v1::{
    BulkSetOptOutRequest, BulkSetOptOutResponse, CreateProfileRequest, CreateProfileResponse,
    GetOptOutRecordRequest, GetOptOutRecordResponse, GetOptOutRequest, GetOptOutResponse,
    ListOptOutRecordsRequest, ListOptOutRecordsResponse, OptOutChange, SetOptOutRequest,
    SetOptOutResponse, WatchOptOutChangesRequest,
};

/// The metadata that carries a self-declared caller's name.
pub const CALLER_HEADER: &str = "x-ccpa-caller";

/// The longest deadline (or connection timeout) the builder takes: a day. Longer ones are
/// mistakes, and tonic cannot send them.
pub const MAX_DEADLINE: Duration = Duration::from_secs(24 * 60 * 60);

/// The longest caller name the gateway accepts.
pub const MAX_CALLER_CHARS: usize = 64;

/// Whether the gateway accepts `name` as a caller's name: 1 to [`MAX_CALLER_CHARS`] printable
/// ASCII characters, no spaces.
pub fn is_valid_caller_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_CALLER_CHARS && name.bytes().all(|b| b.is_ascii_graphic())
}

/// How calls are retried. The default: 4 attempts, back-off from 200 ms doubling up to 5 s
/// ([`Backoff::GATEWAY_CLIENT`]), each wait a random share of its ceiling (full jitter).
/// [`ClientBuilder::connect`] refuses a zero `initial_backoff`, or one above `max_backoff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; 1 turns retries off.
    pub max_attempts: u32,
    /// The ceiling of the back-off before the first retry; each next one doubles it.
    pub initial_backoff: Duration,
    /// The longest back-off. A `RetryInfo` delay longer than this is not waited for: the error
    /// is returned, with its `retry_after`, for the caller to decide.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 4,
            initial_backoff: Backoff::GATEWAY_CLIENT.base(),
            max_backoff: Backoff::GATEWAY_CLIENT.max(),
        }
    }
}

impl RetryPolicy {
    /// One attempt, no retries: for a caller that retries on its own terms.
    pub fn no_retries() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }
}

/// A [`RetryPolicy`] the builder has checked, its back-off built.
#[derive(Debug, Clone, Copy)]
struct Retries {
    max_attempts: u32,
    backoff: Backoff,
}

impl TryFrom<RetryPolicy> for Retries {
    type Error = Error;

    fn try_from(policy: RetryPolicy) -> Result<Self, Error> {
        let refused = |reason: String| Error::Config {
            setting: "retry",
            reason,
        };
        if policy.max_attempts == 0 {
            return Err(refused("max_attempts must be at least 1".into()));
        }
        let backoff = Backoff::GATEWAY_CLIENT
            .between(policy.initial_backoff, policy.max_backoff)
            .map_err(|e| refused(e.to_string()))?;
        Ok(Self {
            max_attempts: policy.max_attempts,
            backoff,
        })
    }
}

impl Retries {
    /// The wait before retry number `retry` (1 for the first) after `error`, or `None` when the
    /// call is not to be retried.
    fn wait(&self, retry: u32, error: &Error) -> Option<Duration> {
        if retry >= self.max_attempts || !error.is_retryable() {
            return None;
        }
        let backoff = self.backoff.after(retry);
        match error {
            Error::Status {
                retry_after: Some(asked),
                ..
            } => (*asked <= self.backoff.max()).then_some((*asked).max(backoff)),
            _ => Some(backoff),
        }
    }
}

/// Settings of a [`Client`], named as the CLI's flags are.
#[derive(Clone)]
pub struct ClientBuilder {
    addr: String,
    tls_ca: Option<PathBuf>,
    tls_identity: Option<(PathBuf, PathBuf)>,
    caller: Option<String>,
    deadline: Duration,
    connect_timeout: Duration,
    retry: RetryPolicy,
}

impl std::fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Paths only: the key's content is read at `connect` and never kept here.
        f.debug_struct("ClientBuilder")
            .field("addr", &self.addr)
            .field("tls_ca", &self.tls_ca)
            .field("tls_identity", &self.tls_identity)
            .field("caller", &self.caller)
            .field("deadline", &self.deadline)
            .field("connect_timeout", &self.connect_timeout)
            .field("retry", &self.retry)
            .finish()
    }
}

impl ClientBuilder {
    /// A client of the gateway at `addr`: `http://host:port`, or `https://host:port` for TLS.
    pub fn new(addr: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            tls_ca: None,
            tls_identity: None,
            caller: None,
            deadline: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            retry: RetryPolicy::default(),
        }
    }

    /// For an `https://` address: the CA (PEM) the gateway's certificate must chain to. The
    /// system's roots when not given.
    pub fn tls_ca(mut self, pem_file: impl Into<PathBuf>) -> Self {
        self.tls_ca = Some(pem_file.into());
        self
    }

    /// For a gateway that asks for client certificates (mutual TLS): this service's certificate
    /// and private key (PEM). The certificate's URI SAN (or DNS SAN) is the identity the
    /// gateway authorizes and records.
    pub fn tls_identity(
        mut self,
        cert_pem_file: impl Into<PathBuf>,
        key_pem_file: impl Into<PathBuf>,
    ) -> Self {
        self.tls_identity = Some((cert_pem_file.into(), key_pem_file.into()));
        self
    }

    /// The calling service's name, sent as `x-ccpa-caller`, for a gateway whose identities are
    /// self-declared (loopback or the emulator). A gateway behind mutual TLS ignores it.
    pub fn caller(mut self, name: impl Into<String>) -> Self {
        self.caller = Some(name.into());
        self
    }

    /// The deadline of each unary attempt (default 30 s; more than zero, at most
    /// [`MAX_DEADLINE`]). A bulk stream has none.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// How long to wait for the connection (default 5 s; more than zero, at most
    /// [`MAX_DEADLINE`]).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How calls are retried.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Checks the settings, reads the TLS files and connects.
    pub async fn connect(self) -> Result<Client, Error> {
        let (endpoint, checked) = self.checked()?;
        let channel = endpoint.connect().await.map_err(|source| Error::Connect {
            addr: self.addr.clone(),
            source,
        })?;
        Ok(self.client(channel, checked))
    }

    /// Checks the settings and reads the TLS files, and connects at the first call: a gateway
    /// that cannot be reached then fails that call (UNAVAILABLE) rather than this one. For a
    /// caller that starts before the gateway, or retries on its own.
    pub fn connect_lazy(self) -> Result<Client, Error> {
        let (endpoint, checked) = self.checked()?;
        Ok(self.client(endpoint.connect_lazy(), checked))
    }

    fn client(&self, channel: Channel, checked: Checked) -> Client {
        Client {
            inner: CcpaServiceClient::new(channel),
            caller: checked.caller,
            deadline: self.deadline,
            retry: checked.retries,
        }
    }

    /// The settings, checked: the endpoint to connect to, the caller's name as metadata, and
    /// the retries.
    fn checked(&self) -> Result<(Endpoint, Checked), Error> {
        let config = |setting: &'static str, reason: String| Error::Config { setting, reason };
        let caller = self
            .caller
            .as_deref()
            .map(|name| {
                AsciiMetadataValue::try_from(name)
                    .ok()
                    .filter(|_| is_valid_caller_name(name))
                    .ok_or_else(|| {
                        config(
                            "caller",
                            format!("must be 1 to {MAX_CALLER_CHARS} printable ASCII characters"),
                        )
                    })
            })
            .transpose()?;
        within_a_day("deadline", self.deadline)?;
        within_a_day("connect_timeout", self.connect_timeout)?;
        let retries = Retries::try_from(self.retry)?;
        let mut endpoint = Endpoint::from_shared(self.addr.clone())
            .map_err(|_| {
                config(
                    "addr",
                    "not a URL such as http://127.0.0.1:50051 or https://ccpa-gateway:50051".into(),
                )
            })?
            .connect_timeout(self.connect_timeout);
        if let Some((tls, identity)) = self.tls_config()? {
            // The CA first, then with the identity: a failure names the setting at fault.
            endpoint
                .clone()
                .tls_config(tls.clone())
                .map_err(|e| config("tls_ca", format!("cannot be used: {e}")))?;
            let tls = match identity {
                Some(identity) => tls.identity(identity),
                None => tls,
            };
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| config("tls_identity", format!("cannot be used: {e}")))?;
        }
        Ok((endpoint, Checked { caller, retries }))
    }

    /// The TLS settings for an `https://` address, and the client's identity apart.
    fn tls_config(&self) -> Result<Option<(ClientTlsConfig, Option<Identity>)>, Error> {
        let read = |path: &PathBuf, setting: &'static str| {
            std::fs::read(path).map_err(|e| Error::Config {
                setting,
                reason: format!("cannot read {}: {e}", path.display()),
            })
        };
        if !self.addr.starts_with("https://") {
            if self.tls_ca.is_some() || self.tls_identity.is_some() {
                return Err(Error::Config {
                    setting: "addr",
                    reason: "TLS settings need an https:// address".into(),
                });
            }
            return Ok(None);
        }
        let tls = match &self.tls_ca {
            Some(ca) => {
                ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca, "tls_ca")?))
            }
            None => ClientTlsConfig::new().with_native_roots(),
        };
        let identity = match &self.tls_identity {
            Some((cert, key)) => Some(Identity::from_pem(
                read(cert, "tls_identity")?,
                read(key, "tls_identity")?,
            )),
            None => None,
        };
        Ok(Some((tls, identity)))
    }
}

/// What [`ClientBuilder::checked`] makes of the settings besides the endpoint.
struct Checked {
    caller: Option<AsciiMetadataValue>,
    retries: Retries,
}

/// A connected client. Cheap to clone; clones share the connection.
#[derive(Debug, Clone)]
pub struct Client {
    inner: CcpaServiceClient<Channel>,
    caller: Option<AsciiMetadataValue>,
    deadline: Duration,
    retry: Retries,
}

/// The ledger's changes, in the order the gateway gives them (see
/// [`Client::watch_opt_out_changes`]).
pub type Changes = Pin<Box<dyn Stream<Item = Result<OptOutChange, Error>> + Send>>;

/// The answers of a bulk stream, in the order the gateway gives them.
pub type BulkAnswers = Pin<Box<dyn Stream<Item = Result<BulkSetOptOutResponse, Error>> + Send>>;

impl Client {
    /// This client with another deadline per attempt, for the calls that need one of their own
    /// (more than zero, at most [`MAX_DEADLINE`]). It shares the connection.
    pub fn with_deadline(&self, deadline: Duration) -> Result<Self, Error> {
        within_a_day("deadline", deadline)?;
        Ok(Self {
            deadline,
            ..self.clone()
        })
    }

    /// `message` with the deadline and the caller's name.
    fn request<T>(&self, message: T, deadline: Option<Duration>) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(deadline) = deadline {
            request.set_timeout(deadline);
        }
        if let Some(caller) = &self.caller {
            request.metadata_mut().insert(CALLER_HEADER, caller.clone());
        }
        request
    }

    /// Runs `call` until it succeeds, fails for good, or runs out of attempts.
    async fn with_retries<T, R, F>(&self, message: T, call: F) -> Result<R, Error>
    where
        T: Clone,
        F: AsyncFn(
            CcpaServiceClient<Channel>,
            tonic::Request<T>,
        ) -> Result<tonic::Response<R>, tonic::Status>,
    {
        let mut attempt = 1;
        loop {
            let request = self.request(message.clone(), Some(self.deadline));
            let error = match call(self.inner.clone(), request).await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) => Error::from_status(&status),
            };
            let Some(wait) = self.retry.wait(attempt, &error) else {
                return Err(error);
            };
            tracing::debug!(attempt, code = ?error.code(), "retrying the call");
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    /// Reads a consumer's opt-out, by key or by email. Retried when UNAVAILABLE or
    /// DEADLINE_EXCEEDED.
    pub async fn get_opt_out(&self, request: GetOptOutRequest) -> Result<GetOptOutResponse, Error> {
        self.with_retries(request, async |mut client, request| {
            client.get_opt_out(request).await
        })
        .await
    }

    /// Records and applies an opt-out (or an opt-in). The request carries a request id (a new
    /// UUID when it has none), and is retried with it when UNAVAILABLE or DEADLINE_EXCEEDED:
    /// the gateway records it once whatever the number of attempts. The answer's `request_id`
    /// is the id used.
    pub async fn set_opt_out(
        &self,
        mut request: SetOptOutRequest,
    ) -> Result<SetOptOutResponse, Error> {
        with_request_id(&mut request.request_id);
        self.with_retries(request, async |mut client, request| {
            client.set_opt_out(request).await
        })
        .await
    }

    /// Creates a profile. Not retried: a profile created without an opt-out has no record
    /// under its request id, so a repeat could create a second one.
    pub async fn create_profile(
        &self,
        request: CreateProfileRequest,
    ) -> Result<CreateProfileResponse, Error> {
        let request = self.request(request, Some(self.deadline));
        self.inner
            .clone()
            .create_profile(request)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| Error::from_status(&status))
    }

    /// Reads one recorded request by its id. Retried when UNAVAILABLE or DEADLINE_EXCEEDED.
    pub async fn get_opt_out_record(
        &self,
        request: GetOptOutRecordRequest,
    ) -> Result<GetOptOutRecordResponse, Error> {
        self.with_retries(request, async |mut client, request| {
            client.get_opt_out_record(request).await
        })
        .await
    }

    /// Lists recorded requests, a page at a time. Retried when UNAVAILABLE or
    /// DEADLINE_EXCEEDED.
    pub async fn list_opt_out_records(
        &self,
        request: ListOptOutRecordsRequest,
    ) -> Result<ListOptOutRecordsResponse, Error> {
        self.with_retries(request, async |mut client, request| {
            client.list_opt_out_records(request).await
        })
        .await
    }

    /// Streams `items` to BulkSetOptOut and yields the gateway's answers as they come: one per
    /// item, carrying the item's `index` (from 0, in the order sent) and its request id. An
    /// item without a request id gets a new UUID. Give your own ids if you will send items
    /// again after the stream breaks: the ledger then records each once.
    ///
    /// The stream is neither retried nor given a deadline: it lasts as long as `items` do. An
    /// item's own failure is in its answer's `error` ([`Error::from_item`] decodes it); an `Err`
    /// ends the stream.
    pub async fn bulk_set_opt_out<S>(&self, items: S) -> Result<BulkAnswers, Error>
    where
        S: Stream<Item = BulkSetOptOutRequest> + Send + 'static,
    {
        let items = items.map(|mut item| {
            if let Some(request) = item.item.as_mut() {
                with_request_id(&mut request.request_id);
            }
            item
        });
        let request = self.request(items, None);
        let answers = self
            .inner
            .clone()
            .bulk_set_opt_out(request)
            .await
            .map_err(|status| Error::from_status(&status))?
            .into_inner();
        Ok(Box::pin(answers.map(|answer| {
            answer.map_err(|status| Error::from_status(&status))
        })))
    }

    /// Follows the ledger's changes after `after_cursor` (empty: from the oldest retained),
    /// opt-ins too with `include_opt_ins`, for as long as the stream is read.
    ///
    /// When the stream breaks (the gateway shuts down, a connection reaches its maximum age,
    /// the network fails), it is opened again after the last change yielded, with the retry
    /// policy's back-off: nothing is missed, and a change may come twice. It ends with an
    /// `Err` only when the gateway refuses the watch itself (a cursor retention has passed,
    /// `CURSOR_EXPIRED`; a malformed one; a caller without `watch`): a gateway that is down
    /// (restarting, say) is tried again for as long as the stream is read, the back-off growing
    /// to the policy's longest.
    pub fn watch_opt_out_changes(&self, after_cursor: String, include_opt_ins: bool) -> Changes {
        struct Watch {
            client: Client,
            after_cursor: String,
            include_opt_ins: bool,
            changes: Option<tonic::Streaming<OptOutChange>>,
            failures: u32,
            ended: bool,
        }
        let watch = Watch {
            client: self.clone(),
            after_cursor,
            include_opt_ins,
            changes: None,
            failures: 0,
            ended: false,
        };
        Box::pin(futures::stream::unfold(watch, |mut watch| async move {
            if watch.ended {
                return None;
            }
            loop {
                let error = match watch.changes.as_mut() {
                    None => {
                        let request = watch.client.request(
                            WatchOptOutChangesRequest {
                                after_cursor: watch.after_cursor.clone(),
                                include_opt_ins: watch.include_opt_ins,
                            },
                            None,
                        );
                        match watch
                            .client
                            .inner
                            .clone()
                            .watch_opt_out_changes(request)
                            .await
                        {
                            Ok(changes) => {
                                watch.changes = Some(changes.into_inner());
                                continue;
                            }
                            Err(status) => Error::from_status(&status),
                        }
                    }
                    Some(changes) => match changes.next().await {
                        Some(Ok(change)) => {
                            watch.failures = 0;
                            watch.after_cursor.clone_from(&change.cursor);
                            return Some((Ok(change), watch));
                        }
                        Some(Err(status)) => Error::from_status(&status),
                        // The gateway ends a watch only with an error; an end without one is
                        // a break like any other.
                        None => Error::from_status(&tonic::Status::unavailable(
                            "the change stream ended",
                        )),
                    },
                };
                watch.changes = None;
                watch.failures = watch.failures.saturating_add(1);
                // Whatever breaks a stream is resumed, but for the gateway's refusals of the
                // watch itself, which a retry would meet again.
                let refused = matches!(
                    error.code(),
                    tonic::Code::FailedPrecondition
                        | tonic::Code::InvalidArgument
                        | tonic::Code::PermissionDenied
                        | tonic::Code::Unauthenticated
                        | tonic::Code::Unimplemented
                );
                if refused {
                    watch.ended = true;
                    return Some((Err(error), watch));
                }
                tracing::debug!(code = ?error.code(), "resuming the change stream");
                tokio::time::sleep(watch.client.retry.backoff.after(watch.failures)).await;
            }
        }))
    }
}

/// Refuses a deadline or timeout of zero, or longer than [`MAX_DEADLINE`].
fn within_a_day(setting: &'static str, value: Duration) -> Result<(), Error> {
    if value.is_zero() || value > MAX_DEADLINE {
        return Err(Error::Config {
            setting,
            reason: "must be more than zero and at most a day".into(),
        });
    }
    Ok(())
}

/// Gives a request without an id a new UUID, so that retries of it share one.
fn with_request_id(request_id: &mut String) {
    if request_id.is_empty() {
        // Time-ordered (UUIDv7), as the gateway's own: cheap for the ledger's index of ids.
        *request_id = uuid::Uuid::now_v7().to_string();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tonic::Code;

    use super::{Error, Reason, Retries, RetryPolicy};

    fn status(code: Code, retry_after: Option<Duration>) -> Error {
        Error::Status {
            code,
            reason: Reason::Other(String::new()),
            message: String::new(),
            retry_after,
            violations: Vec::new(),
            missing_permission: None,
        }
    }

    fn retries(policy: RetryPolicy) -> Retries {
        Retries::try_from(policy).unwrap()
    }

    #[test]
    fn only_unavailable_and_deadline_exceeded_are_retried_and_only_so_often() {
        let policy = RetryPolicy::default();
        let retries = retries(policy);
        for code in [Code::Unavailable, Code::DeadlineExceeded] {
            for retry in 1..policy.max_attempts {
                let wait = retries.wait(retry, &status(code, None)).unwrap();
                assert!(wait <= policy.max_backoff);
            }
            assert_eq!(retries.wait(policy.max_attempts, &status(code, None)), None);
        }
        for code in [
            Code::InvalidArgument,
            Code::NotFound,
            Code::Internal,
            Code::Unknown,
        ] {
            assert_eq!(retries.wait(1, &status(code, None)), None);
        }
    }

    #[test]
    fn a_retry_info_delay_is_waited_for_unless_it_is_longer_than_the_longest_back_off() {
        let policy = RetryPolicy::default();
        let retries = retries(policy);
        let asked = Duration::from_secs(2);
        assert!(
            retries
                .wait(1, &status(Code::Unavailable, Some(asked)))
                .unwrap()
                >= asked
        );
        let too_long = Some(policy.max_backoff + Duration::from_secs(1));
        assert_eq!(retries.wait(1, &status(Code::Unavailable, too_long)), None);
    }

    #[test]
    fn the_back_off_is_full_jitter_under_the_policy_s_ceiling() {
        let retries = retries(RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(350),
        });
        for (retry, cap) in [(1, 100), (2, 200), (3, 350), (9, 350)] {
            let waits: Vec<_> = (0..200)
                .map(|_| {
                    retries
                        .wait(retry, &status(Code::Unavailable, None))
                        .unwrap()
                })
                .collect();
            assert!(waits.iter().all(|w| *w <= Duration::from_millis(cap)));
            assert!(
                waits.iter().any(|w| *w < Duration::from_millis(cap / 4)),
                "full jitter reaches near zero"
            );
        }
    }

    #[test]
    fn settings_that_make_no_back_off_are_refused() {
        let refused = |policy: RetryPolicy| {
            matches!(
                Retries::try_from(policy),
                Err(Error::Config {
                    setting: "retry",
                    ..
                })
            )
        };
        assert!(refused(RetryPolicy {
            max_attempts: 0,
            ..RetryPolicy::default()
        }));
        assert!(refused(RetryPolicy {
            initial_backoff: Duration::ZERO,
            ..RetryPolicy::default()
        }));
        assert!(refused(RetryPolicy {
            initial_backoff: Duration::from_secs(6),
            max_backoff: Duration::from_secs(5),
            ..RetryPolicy::default()
        }));
        assert!(!refused(RetryPolicy::no_retries()));
    }

    #[test]
    fn extreme_settings_cannot_overflow() {
        let retries = retries(RetryPolicy {
            max_attempts: u32::MAX,
            initial_backoff: Duration::MAX,
            max_backoff: Duration::MAX,
        });
        for retry in [1, 2, 64, u32::MAX - 1] {
            assert!(
                retries
                    .wait(retry, &status(Code::Unavailable, None))
                    .is_some()
            );
        }
    }
}
