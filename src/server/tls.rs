//! TLS termination: the rustls server configuration and the accept loop.
//!
//! We terminate TLS ourselves instead of using tonic's `ServerTlsConfig` so
//! that we control the handshake: every accepted socket is handshaken in its
//! own task under a timeout, with a cap on concurrent handshakes, so a client
//! that connects and sends nothing cannot stall the accept loop. The server
//! certificate is served through an [`ArcSwap`], so [`TlsMaterial::reload`]
//! can replace it without a restart.
//!
//! Wiring into tonic:
//!
//! ```no_run
//! # async fn run(
//! #     listener: tokio::net::TcpListener,
//! #     files: reassigned::server::tls::TlsFiles,
//! #     shutdown: impl std::future::Future<Output = ()>,
//! # ) -> anyhow::Result<()> {
//! use reassigned::server::{auth::AuthLayer, tls};
//!
//! let config = tls::server_config(&files)?;
//! let (_reporter, health) = tonic_health::server::health_reporter();
//! tonic::transport::Server::builder()
//!     .layer(AuthLayer::new())
//!     .add_service(health)
//!     .serve_with_incoming_shutdown(
//!         tls::incoming(listener, config, tls::AcceptOptions::default()),
//!         shutdown,
//!     )
//!     .await?;
//! # Ok(())
//! # }
//! ```

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::Stream;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{InconsistentKeys, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::server::auth::{Platform, platform_from_cert};

/// Pause after an accept error that is not about a single connection
/// (e.g. EMFILE), so the loop does not spin while the process is out of
/// file descriptors.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Completed handshakes buffered between the handshake tasks and the server.
const READY_CONNECTIONS: usize = 64;

/// Where the server's TLS material lives on disk (all PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Server certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key of the leaf (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates that sign client (platform) certificates.
    pub client_ca: PathBuf,
}

/// What went wrong while loading TLS material. Messages name the file and
/// never include key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {what} file {}: {source}", path.display())]
    Read {
        /// Which file: "certificate", "private key" or "client CA".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// A file is not well-formed PEM.
    #[error("{what} file {} is not valid PEM: {reason}", path.display())]
    Pem {
        /// Which file: "certificate", "private key" or "client CA".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What the PEM parser reported.
        reason: String,
    },
    /// A certificate file holds no `CERTIFICATE` section.
    #[error("no certificate found in {what} file {}", path.display())]
    NoCertificate {
        /// Which file: "certificate" or "client CA".
        what: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// A key file holds no private key section.
    #[error("no private key (PKCS#8, PKCS#1 or SEC1 PEM) found in {}", path.display())]
    NoPrivateKey {
        /// The file.
        path: PathBuf,
    },
    /// The private key is of a type or curve the crypto provider cannot use.
    #[error("private key in {} is not usable: {reason}", path.display())]
    UnusableKey {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The leaf certificate cannot be parsed.
    #[error("certificate in {} cannot be parsed: {reason}", path.display())]
    BadCertificate {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The private key is not the key of the leaf certificate.
    #[error("private key {} does not match the certificate in {}", key.display(), cert.display())]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// A client CA certificate cannot be used as a trust anchor.
    #[error("client CA file {}: certificate #{index} is not a usable trust anchor: {reason}", path.display())]
    BadClientCa {
        /// The file.
        path: PathBuf,
        /// Position of the certificate in the file, from 1.
        index: usize,
        /// Why.
        reason: String,
    },
    /// The client certificate verifier could not be built.
    #[error("cannot build the client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// rustls refused the configuration.
    #[error("cannot build the TLS server configuration: {0}")]
    Config(#[source] rustls::Error),
}

/// The crypto provider used everywhere in this module: ring, never aws-lc-rs
/// (see STACK.md, "crypto-provider trap").
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Server TLS material with a hot-swappable certificate.
///
/// The [`ServerConfig`] built by [`TlsMaterial::server_config`] resolves the
/// server certificate through this handle on every handshake, so
/// [`TlsMaterial::reload`] takes effect for new connections at once. The
/// client CA bundle is fixed in the `ServerConfig`; changing it needs a new
/// config.
#[derive(Debug)]
pub struct TlsMaterial {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    current: Arc<ArcSwap<CertifiedKey>>,
}

impl TlsMaterial {
    /// Load the server certificate chain and key from `files`, checking that
    /// the key belongs to the leaf certificate.
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let provider = provider();
        let key = load_certified_key(&files, &provider)?;
        Ok(Self {
            files,
            provider,
            current: Arc::new(ArcSwap::from_pointee(key)),
        })
    }

    /// Re-read the certificate and key files and serve them to new
    /// connections. On error the previous certificate stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let key = load_certified_key(&self.files, &self.provider)?;
        self.current.store(Arc::new(key));
        Ok(())
    }

    /// The files this material is loaded from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The certificate chain currently served (leaf first).
    pub fn current_chain(&self) -> Vec<CertificateDer<'static>> {
        self.current.load().cert.clone()
    }

    /// Build the rustls server configuration: client certificates required
    /// and verified against `files.client_ca`, safe default protocol
    /// versions, ALPN `h2`, server certificate served from this handle.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let roots = load_client_roots(&self.files.client_ca)?;
        // No `allow_unauthenticated()`: a client without a certificate fails
        // the handshake.
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), self.provider.clone()).build()?;
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(SwappableCert(self.current.clone())));
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

/// Load `files` and build the server configuration in one step.
///
/// The certificate cannot be reloaded through this path; keep a
/// [`TlsMaterial`] for that.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    TlsMaterial::load(files.clone())?.server_config()
}

/// Resolves every handshake to the certificate currently in the swap.
#[derive(Debug)]
struct SwappableCert(Arc<ArcSwap<CertifiedKey>>);

impl ResolvesServerCert for SwappableCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| TlsError::Pem {
            what,
            path: path.to_owned(),
            reason: err.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_file("private key", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|err| match err {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::NoPrivateKey {
            path: path.to_owned(),
        },
        // The PEM errors describe structure (markers, base64), never content.
        other => TlsError::Pem {
            what: "private key",
            path: path.to_owned(),
            reason: other.to_string(),
        },
    })
}

fn load_certified_key(files: &TlsFiles, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let chain = read_certs("certificate", &files.cert)?;
    let key = read_key(&files.key)?;
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|err| TlsError::UnusableKey {
            path: files.key.clone(),
            reason: err.to_string(),
        })?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => Ok(certified),
        Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => Err(TlsError::KeyMismatch {
            cert: files.cert.clone(),
            key: files.key.clone(),
        }),
        Err(other) => Err(TlsError::BadCertificate {
            path: files.cert.clone(),
            reason: other.to_string(),
        }),
    }
}

fn load_client_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for (index, cert) in read_certs("client CA", path)?.into_iter().enumerate() {
        roots.add(cert).map_err(|err| TlsError::BadClientCa {
            path: path.to_owned(),
            index: index + 1,
            reason: err.to_string(),
        })?;
    }
    Ok(roots)
}

/// Limits of the accept loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceptOptions {
    /// A TLS handshake that takes longer is abandoned and its socket closed.
    pub handshake_timeout: Duration,
    /// At most this many handshakes run at once; further connections wait in
    /// the kernel's listen backlog. Values below 1 are treated as 1.
    pub max_handshakes: usize,
}

impl Default for AcceptOptions {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            max_handshakes: 256,
        }
    }
}

/// Who is on the other end of a connection, computed once at handshake time.
///
/// Tonic inserts a clone into every request's extensions (see
/// [`tonic::transport::server::Connected`]); [`crate::server::auth::AuthLayer`]
/// reads it from there.
#[derive(Debug, Clone, Default)]
pub struct PeerInfo {
    /// The client's address.
    pub remote_addr: Option<SocketAddr>,
    /// Our address on this connection.
    pub local_addr: Option<SocketAddr>,
    /// The platform named by the client certificate, if it names one.
    pub platform: Option<Arc<Platform>>,
}

/// A server-side TLS connection whose handshake has completed.
#[derive(Debug)]
pub struct TlsConnection {
    stream: TlsStream<TcpStream>,
    info: PeerInfo,
}

impl TlsConnection {
    /// The peer identity of this connection.
    pub fn peer_info(&self) -> &PeerInfo {
        &self.info
    }

    /// The underlying TLS stream (e.g. for the negotiated protocol or the
    /// peer certificates).
    pub fn get_ref(&self) -> &TlsStream<TcpStream> {
        &self.stream
    }
}

impl tonic::transport::server::Connected for TlsConnection {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The stream of handshaken connections made by [`incoming`].
///
/// Dropping it stops the accept loop, closes the listener and abandons the
/// handshakes in progress.
#[derive(Debug)]
pub struct TlsIncoming {
    ready: mpsc::Receiver<TlsConnection>,
    accept_loop: JoinHandle<()>,
}

impl Stream for TlsIncoming {
    type Item = Result<TlsConnection, io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.ready.poll_recv(cx).map(|conn| conn.map(Ok))
    }
}

impl Drop for TlsIncoming {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

/// Accept TCP connections on `listener` and complete their TLS handshakes,
/// yielding the connections ready for `Server::serve_with_incoming_shutdown`.
///
/// Handshakes never run in the accept loop: each one runs in its own task
/// under [`AcceptOptions::handshake_timeout`], at most
/// [`AcceptOptions::max_handshakes`] at a time. Failed handshakes are logged
/// and dropped; accept errors are logged and never end the stream.
///
/// Must be called inside a tokio runtime.
pub fn incoming(listener: TcpListener, config: Arc<ServerConfig>, opts: AcceptOptions) -> TlsIncoming {
    let (tx, ready) = mpsc::channel(READY_CONNECTIONS);
    let accept_loop = tokio::spawn(accept_loop(listener, TlsAcceptor::from(config), opts, tx));
    TlsIncoming { ready, accept_loop }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    opts: AcceptOptions,
    tx: mpsc::Sender<TlsConnection>,
) {
    let slots = Arc::new(Semaphore::new(opts.max_handshakes.max(1)));
    // Owning the handshake tasks means they are aborted when this loop ends.
    let mut handshakes = JoinSet::new();
    loop {
        while handshakes.try_join_next().is_some() {}

        // Take a handshake slot before accepting: at the cap, new connections
        // wait in the listen backlog instead of piling up here.
        let permit = tokio::select! {
            () = tx.closed() => break,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_closed) => break,
            },
        };
        let accepted = tokio::select! {
            () = tx.closed() => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, remote_addr) = match accepted {
            Ok(accepted) => accepted,
            Err(err) if is_connection_error(&err) => {
                tracing::debug!(error = %err, "accept: connection failed before it was accepted");
                continue;
            }
            Err(err) => {
                tracing::warn!(
                    error = %err,
                    backoff_ms = ACCEPT_ERROR_BACKOFF.as_millis() as u64,
                    "accept failed; backing off"
                );
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                continue;
            }
        };
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(peer = %remote_addr, error = %err, "cannot set TCP_NODELAY");
        }

        let acceptor = acceptor.clone();
        let tx = tx.clone();
        handshakes.spawn(async move {
            // Held until the connection is handed over, so a server that stops
            // taking connections also stops new handshakes.
            let _permit = permit;
            let local_addr = tcp.local_addr().ok();
            let stream = match tokio::time::timeout(opts.handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(err)) => {
                    tracing::info!(peer = %remote_addr, error = %err, "tls handshake failed");
                    return;
                }
                Err(_elapsed) => {
                    tracing::info!(
                        peer = %remote_addr,
                        timeout_ms = opts.handshake_timeout.as_millis() as u64,
                        "tls handshake timed out"
                    );
                    return;
                }
            };
            let info = PeerInfo {
                remote_addr: Some(remote_addr),
                local_addr,
                platform: connection_platform(&stream, remote_addr),
            };
            // An error means the server is gone; the connection is dropped.
            let _ = tx.send(TlsConnection { stream, info }).await;
        });
    }
}

/// Errors that concern only the one connection being accepted.
fn is_connection_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

fn connection_platform(stream: &TlsStream<TcpStream>, peer: SocketAddr) -> Option<Arc<Platform>> {
    let leaf = stream.get_ref().1.peer_certificates()?.first()?;
    match platform_from_cert(leaf) {
        Ok(platform) => {
            tracing::debug!(peer = %peer, platform = %platform.id, "tls handshake completed");
            Some(Arc::new(platform))
        }
        Err(err) => {
            tracing::info!(peer = %peer, error = %err, "client certificate names no platform");
            None
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::cli::certs::DevPki;

    struct Fixture {
        dir: tempfile::TempDir,
        files: TlsFiles,
        pki: DevPki,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::new().unwrap();
        let server = pki.server(&["localhost"]).unwrap();
        let files = TlsFiles {
            cert: dir.path().join("server.pem"),
            key: dir.path().join("server.key"),
            client_ca: dir.path().join("ca.pem"),
        };
        std::fs::write(&files.cert, &server.cert_pem).unwrap();
        std::fs::write(&files.key, &server.key_pem).unwrap();
        std::fs::write(&files.client_ca, pki.ca_cert_pem()).unwrap();
        Fixture { dir, files, pki }
    }

    fn error(files: &TlsFiles) -> TlsError {
        server_config(files).unwrap_err()
    }

    #[test]
    fn loads_a_valid_configuration() {
        let fx = fixture();
        let config = server_config(&fx.files).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"h2".to_vec()]);
    }

    #[test]
    fn missing_file_is_named() {
        let fx = fixture();
        let files = TlsFiles {
            key: fx.dir.path().join("nope.key"),
            ..fx.files.clone()
        };
        let err = error(&files);
        assert!(
            matches!(
                err,
                TlsError::Read {
                    what: "private key",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("nope.key"), "{err}");
    }

    #[test]
    fn file_without_certificate_is_refused() {
        let fx = fixture();
        let files = TlsFiles {
            cert: fx.files.key.clone(),
            ..fx.files.clone()
        };
        assert!(matches!(
            error(&files),
            TlsError::NoCertificate {
                what: "certificate",
                ..
            }
        ));
        let files = TlsFiles {
            client_ca: fx.files.key.clone(),
            ..fx.files.clone()
        };
        assert!(matches!(
            error(&files),
            TlsError::NoCertificate {
                what: "client CA",
                ..
            }
        ));
    }

    #[test]
    fn file_without_key_is_refused() {
        let fx = fixture();
        let files = TlsFiles {
            key: fx.files.cert.clone(),
            ..fx.files.clone()
        };
        let err = error(&files);
        assert!(matches!(err, TlsError::NoPrivateKey { .. }), "{err}");
        assert!(err.to_string().contains("server.pem"), "{err}");
    }

    #[test]
    fn key_of_another_certificate_is_refused() {
        let fx = fixture();
        let other = fx.pki.server(&["localhost"]).unwrap();
        let other_key = fx.dir.path().join("other.key");
        std::fs::write(&other_key, &other.key_pem).unwrap();
        let files = TlsFiles {
            key: other_key,
            ..fx.files.clone()
        };
        let err = error(&files);
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
        assert!(!err.to_string().contains("PRIVATE KEY"), "{err}");
    }

    #[test]
    fn reload_swaps_the_certificate_and_keeps_it_on_error() {
        let fx = fixture();
        let material = TlsMaterial::load(fx.files.clone()).unwrap();
        let _config = material.server_config().unwrap();
        let before = material.current_chain();

        let next = fx.pki.server(&["localhost"]).unwrap();
        std::fs::write(&fx.files.cert, &next.cert_pem).unwrap();
        std::fs::write(&fx.files.key, &next.key_pem).unwrap();
        material.reload().unwrap();
        let after = material.current_chain();
        assert_ne!(before[0], after[0]);

        std::fs::write(&fx.files.key, "garbage").unwrap();
        assert!(material.reload().is_err());
        assert_eq!(material.current_chain()[0], after[0]);
    }
}
