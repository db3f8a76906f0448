//! TLS on the gRPC listener: rustls with aws-lc-rs, the certificate, key and client CA reloaded
//! when they change on disk, and the caller's identity read from its client certificate once
//! per connection.
//!
//! With a client CA, a certificate that does not chain to it is refused at the handshake; a
//! connection without a certificate is accepted (health probes carry none) and its calls are
//! left to the gate (`super::gate`), which answers everything but health UNAUTHENTICATED.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;

use super::watched::Watched;

/// The longest a client may take to complete its handshake (a few round trips on a data-centre
/// network take milliseconds).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Handshakes in progress at once: a flood of connections that never finish their handshake
/// holds at most this many tasks.
const MAX_HANDSHAKES: usize = 1024;

/// Handshakes in progress at once from one address: one host holding silent sockets open
/// cannot take every slot from the others (health probes included).
const MAX_HANDSHAKES_PER_PEER: usize = 32;

/// The handshakes in progress, in all and per peer address.
#[derive(Default)]
struct Handshakes {
    per_peer: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
}

/// A slot taken by one handshake; given back when dropped.
struct HandshakeSlot {
    handshakes: Arc<Handshakes>,
    peer: std::net::IpAddr,
}

impl Handshakes {
    fn take(self: &Arc<Self>, peer: std::net::IpAddr) -> Option<HandshakeSlot> {
        let mut per_peer = self.lock();
        let total: usize = per_peer.values().sum();
        let mine = per_peer.entry(peer).or_insert(0);
        if total >= MAX_HANDSHAKES || *mine >= MAX_HANDSHAKES_PER_PEER {
            return None;
        }
        *mine += 1;
        Some(HandshakeSlot {
            handshakes: self.clone(),
            peer,
        })
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<std::net::IpAddr, usize>> {
        // Counts only: a panic cannot leave them worse than off by one.
        self.per_peer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut per_peer = self.handshakes.lock();
        if let Some(count) = per_peer.get_mut(&self.peer) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                per_peer.remove(&self.peer);
            }
        }
    }
}

/// The files TLS is served from.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The server's certificate chain, PEM.
    pub cert: PathBuf,
    /// Its private key, PEM.
    pub key: PathBuf,
    /// The CA client certificates must chain to (mutual TLS), PEM.
    pub client_ca: Option<PathBuf>,
}

/// The TLS settings in force, reloaded when their files change.
pub struct ServerTls {
    config: Arc<Watched<Arc<ServerConfig>>>,
    mutual: bool,
}

impl ServerTls {
    /// Loads the files; an error says which and why (never their content).
    pub fn open(files: &TlsFiles) -> Result<Self, String> {
        let mut paths = vec![files.cert.clone(), files.key.clone()];
        paths.extend(files.client_ca.clone());
        let config = Watched::open("--tls-cert, --tls-key, --tls-client-ca", paths, load)?;
        Ok(Self {
            config: Arc::new(config),
            mutual: files.client_ca.is_some(),
        })
    }

    /// Whether client certificates are asked for (a client CA is set).
    pub fn mutual(&self) -> bool {
        self.mutual
    }

    /// Reloads the files when they change, until `stop`.
    pub fn watch(&self, stop: CancellationToken) -> impl Future<Output = ()> + Send + 'static {
        self.config.clone().watch(stop)
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(Arc::clone(&*self.config.current()))
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Reads the certificate, key and CA: `paths` is `[cert, key]` or `[cert, key, client_ca]`.
fn load(paths: &[PathBuf]) -> Result<Arc<ServerConfig>, String> {
    let [cert, key, rest @ ..] = paths else {
        return Err("the certificate and its key are both required".into());
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: not a PEM certificate chain ({e})", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: holds no certificate", cert.display()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("{}: not a PEM private key ({e})", key.display()))?;
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS cannot be set up: {e}"))?;
    let builder = match rest.first() {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(ca)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("{}: not a PEM certificate ({e})", ca.display()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!("{}: holds no usable CA certificate", ca.display()));
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                // No certificate is allowed at the handshake: health probes carry none, and
                // the gate answers their other calls UNAUTHENTICATED.
                .allow_unauthenticated()
                .build()
                .map_err(|e| format!("{}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key_der)
        .map_err(|e| format!("{} and {}: {e}", cert.display(), key.display()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// What the gateway knows of a connection's other end, put in every request's extensions.
#[derive(Debug, Clone, Default)]
pub struct ConnectionInfo {
    /// The peer's address.
    pub remote: Option<SocketAddr>,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// Whether the peer presented a client certificate (it chains to the client CA: the
    /// handshake verified it).
    pub client_certificate: bool,
    /// The identity its certificate names: its first URI SAN (a SPIFFE ID), else its first
    /// DNS SAN.
    pub identity: Option<Arc<str>>,
}

/// The identity a client certificate names: its first URI SAN, else its first DNS SAN.
pub fn certificate_identity(der: &[u8]) -> Option<String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let names = cert
        .subject_alternative_name()
        .ok()??
        .value
        .general_names
        .clone();
    names
        .iter()
        .find_map(|name| match name {
            GeneralName::URI(uri) => Some((*uri).to_owned()),
            _ => None,
        })
        .or_else(|| {
            names.iter().find_map(|name| match name {
                GeneralName::DNSName(dns) => Some((*dns).to_owned()),
                _ => None,
            })
        })
}

/// A connection accepted by the gateway: plaintext or TLS.
pub struct Connection {
    io: Io,
    info: ConnectionInfo,
}

enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Connected for Connection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Io::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Io::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            Io::Tls(tls) => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(tcp) => tcp.is_write_vectored(),
            Io::Tls(tls) => tls.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Io::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Io::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The connections accepted on `listener` until `stop`: TLS with `tls`, else plaintext.
///
/// Handshakes run on tasks of their own, so that a slow or silent client delays no other; each
/// is bounded by [`HANDSHAKE_TIMEOUT`]. A failed handshake (a certificate from a foreign CA,
/// say) is logged with its reason and the connection dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    stop: CancellationToken,
) -> impl Stream<Item = io::Result<Connection>> {
    let (sender, receiver) = tokio::sync::mpsc::channel::<io::Result<Connection>>(64);
    let handshakes = Arc::new(Handshakes::default());
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = stop.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let (tcp, remote) = match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was taken:
                    // pause briefly rather than spin, as hyper's own acceptor does.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let Some(tls) = &tls else {
                let connection = Connection {
                    io: Io::Plain(tcp),
                    info: ConnectionInfo {
                        remote: Some(remote),
                        ..ConnectionInfo::default()
                    },
                };
                if sender.send(Ok(connection)).await.is_err() {
                    return;
                }
                continue;
            };
            let Some(slot) = handshakes.take(remote.ip()) else {
                tracing::warn!("too many TLS handshakes in progress; connection dropped");
                continue;
            };
            let acceptor = tls.acceptor();
            let sender = sender.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
                let stream = match handshake.await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        tracing::info!(error = %e, "TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        tracing::info!("TLS handshake timed out");
                        return;
                    }
                };
                let leaf = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first());
                let info = ConnectionInfo {
                    remote: Some(remote),
                    tls: true,
                    client_certificate: leaf.is_some(),
                    identity: leaf
                        .and_then(|cert| certificate_identity(cert))
                        .map(Arc::from),
                };
                let connection = Connection {
                    io: Io::Tls(Box::new(stream)),
                    info,
                };
                let _ = sender.send(Ok(connection)).await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(receiver)
}
