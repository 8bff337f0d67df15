//! The accept loop: accepts TCP connections and completes each TLS handshake
//! in its own task, under a first-byte deadline and a handshake timeout, in
//! a large pool that sheds the oldest pending handshake (per source
//! address, then overall) rather than refusing the newest, so sockets that
//! connect and send nothing cannot stall the accept loop or lock new
//! clients out. Each handshake takes the current configuration of a
//! [`SharedServerConfig`] (see [`crate::server::tls`]), so a reload applies
//! to new connections; every connection handed to tonic is registered in
//! the configuration's [`OpenConnections`](crate::server::revoke::OpenConnections), so a reload that refuses its
//! client certificate closes it (see [`crate::server::revoke`]).
//!
//! Wiring into tonic:
//!
//! ```no_run
//! # async fn run(
//! #     listener: tokio::net::TcpListener,
//! #     files: reassigned::server::tls::TlsFiles,
//! #     shutdown: impl std::future::Future<Output = ()>,
//! # ) -> anyhow::Result<()> {
//! use reassigned::server::{accept, auth::AuthLayer, tls};
//!
//! let config = tls::server_config(&files)?;
//! let (_reporter, health) = tonic_health::server::health_reporter();
//! tonic::transport::Server::builder()
//!     .layer(AuthLayer::new())
//!     .add_service(health)
//!     .serve_with_incoming_shutdown(
//!         accept::incoming(listener, config, accept::AcceptOptions::default()),
//!         shutdown,
//!     )
//!     .await?;
//! # Ok(())
//! # }
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::identity::{PeerInfo, Platform, platform_from_cert};
use crate::lograte;
use crate::server::revoke::Registered;
use crate::server::tls::SharedServerConfig;

/// Pause after an accept error that is not about a single connection
/// (e.g. EMFILE), so the loop does not spin while the process is out of
/// file descriptors.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Completed handshakes buffered between the handshake tasks and the server.
const READY_CONNECTIONS: usize = 64;

/// Limits of the accept loop.
///
/// A pending handshake (accepted, not yet completed) costs little: a socket
/// and a small task. So the pool of pending handshakes is large, a client
/// that sends nothing is dropped after [`AcceptOptions::first_byte_timeout`],
/// and when a limit is reached the OLDEST pending handshake (of the same
/// source address, or of all) is shed to make room for the newest, so the
/// accept loop never stops accepting and a newcomer is never refused because
/// idle sockets got there first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceptOptions {
    /// A TLS handshake that takes longer (from accept to completion) is
    /// abandoned and its socket closed.
    pub handshake_timeout: Duration,
    /// At most this many handshakes are pending at once; at the cap the
    /// oldest pending one is shed for each new connection. Values below 1
    /// are treated as 1.
    pub max_handshakes: usize,
    /// A client that has not sent its first byte within this time is
    /// dropped (shorter than `handshake_timeout`: an idle socket costs the
    /// attacker nothing).
    pub first_byte_timeout: Duration,
    /// At most this many pending handshakes per source IP address; at the
    /// cap the oldest pending one of that address is shed. Values below 1
    /// are treated as 1.
    pub max_handshakes_per_ip: usize,
    /// Listen backlog set on the listener when the accept loop starts
    /// (the kernel caps it at `net.core.somaxconn`); 0 leaves it as bound.
    pub listen_backlog: u32,
    /// When a reload revokes an open connection's certificate, the
    /// connection is closed once its calls finish, or after this long.
    pub revoked_grace: Duration,
}

impl Default for AcceptOptions {
    /// The defaults of `serve`'s settings.
    fn default() -> Self {
        use crate::config::defaults;
        Self {
            handshake_timeout: Duration::from_millis(defaults::HANDSHAKE_TIMEOUT_MS),
            max_handshakes: defaults::MAX_HANDSHAKES,
            first_byte_timeout: Duration::from_millis(defaults::HANDSHAKE_FIRST_BYTE_TIMEOUT_MS),
            max_handshakes_per_ip: defaults::MAX_HANDSHAKES_PER_IP,
            listen_backlog: defaults::LISTEN_BACKLOG,
            revoked_grace: Duration::from_millis(defaults::REQUEST_TIMEOUT_MS),
        }
    }
}

impl From<&crate::config::ServeConfig> for AcceptOptions {
    /// The accept-loop settings of `config`; a revoked connection gets the
    /// per-call timeout to finish its calls.
    fn from(config: &crate::config::ServeConfig) -> Self {
        Self {
            handshake_timeout: Duration::from_millis(config.handshake_timeout_ms),
            max_handshakes: config.max_handshakes,
            first_byte_timeout: Duration::from_millis(config.handshake_first_byte_timeout_ms),
            max_handshakes_per_ip: config.max_handshakes_per_ip,
            listen_backlog: config.listen_backlog,
            revoked_grace: config.request_timeout(),
        }
    }
}

/// Why a handshake did not complete, as counted in [`HandshakeStats`] and
/// reported as `reassigned_handshake_failures_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// No byte within [`AcceptOptions::first_byte_timeout`].
    FirstByteTimeout,
    /// Not completed within [`AcceptOptions::handshake_timeout`].
    Timeout,
    /// The client closed (or reset) the connection before completing.
    Closed,
    /// TLS refused it (bad certificate, revoked, not TLS, ...).
    TlsError,
    /// Shed, oldest first, to make room at the per-address cap.
    ShedPerIp,
    /// Shed, oldest first, to make room at the pool cap.
    ShedPool,
}

impl HandshakeFailure {
    /// Every reason, in the order of the metric lines.
    pub const ALL: [HandshakeFailure; 6] = [
        HandshakeFailure::FirstByteTimeout,
        HandshakeFailure::Timeout,
        HandshakeFailure::Closed,
        HandshakeFailure::TlsError,
        HandshakeFailure::ShedPerIp,
        HandshakeFailure::ShedPool,
    ];

    /// The `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            HandshakeFailure::FirstByteTimeout => "first_byte_timeout",
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Closed => "closed",
            HandshakeFailure::TlsError => "tls_error",
            HandshakeFailure::ShedPerIp => "shed_per_ip",
            HandshakeFailure::ShedPool => "shed_pool",
        }
    }
}

/// The `kind` label of handshakes that failed with a TLS error
/// ([`HandshakeFailure::TlsError`]), by what rustls refused: the client
/// certificate (`cert_expired`, `cert_untrusted`: unknown issuer or bad
/// signature, `cert_revoked`, `cert_invalid`: any other certificate
/// problem, `no_client_cert`), an incompatible peer (`incompatible`: no
/// shared version, cipher suite or ALPN), or anything else (`protocol`: not
/// TLS, malformed or unexpected messages).
pub const TLS_ERROR_KINDS: [&str; 7] = [
    "cert_expired",
    "cert_untrusted",
    "cert_revoked",
    "cert_invalid",
    "no_client_cert",
    "incompatible",
    "protocol",
];

/// The [`TLS_ERROR_KINDS`] column of a failed handshake's error.
fn tls_error_kind(err: Option<&io::Error>) -> usize {
    use rustls::{CertificateError, Error};
    let rustls_error = err
        .and_then(|e| e.get_ref())
        .and_then(|e| e.downcast_ref::<Error>());
    match rustls_error {
        Some(Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        )) => 0,
        Some(Error::InvalidCertificate(CertificateError::UnknownIssuer | CertificateError::BadSignature)) => {
            1
        }
        Some(Error::InvalidCertificate(CertificateError::Revoked)) => 2,
        Some(Error::InvalidCertificate(_)) => 3,
        Some(Error::NoCertificatesPresented) => 4,
        Some(Error::PeerIncompatible(_) | Error::NoApplicationProtocol) => 5,
        _ => 6,
    }
}

/// Counters of the accept loop: every handshake is counted once, completed
/// or failed with its reason, whether or not its log line was written.
#[derive(Debug, Default)]
pub struct HandshakeStats {
    completed: AtomicU64,
    failed: [AtomicU64; HandshakeFailure::ALL.len()],
    /// [`HandshakeFailure::TlsError`]s by [`TLS_ERROR_KINDS`].
    tls_errors: [AtomicU64; TLS_ERROR_KINDS.len()],
    pending: AtomicU64,
    closed_revoked: AtomicU64,
}

impl HandshakeStats {
    /// Handshakes completed.
    pub fn completed(&self) -> u64 {
        self.completed.load(Ordering::Relaxed)
    }

    /// Handshakes failed for `reason`.
    pub fn failed(&self, reason: HandshakeFailure) -> u64 {
        self.failed[reason as usize].load(Ordering::Relaxed)
    }

    /// Handshakes failed with a TLS error of the kind
    /// `TLS_ERROR_KINDS[kind]`.
    pub fn tls_errors(&self, kind: usize) -> u64 {
        self.tls_errors.get(kind).map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Handshakes pending now.
    pub fn pending(&self) -> u64 {
        self.pending.load(Ordering::Relaxed)
    }

    /// Open connections closed because a reload revoked (or stopped
    /// trusting) their client certificate.
    pub fn closed_revoked(&self) -> u64 {
        self.closed_revoked.load(Ordering::Relaxed)
    }

    fn fail(&self, reason: HandshakeFailure) {
        self.failed[reason as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// A server-side TLS connection whose handshake has completed.
#[derive(Debug)]
pub struct TlsConnection {
    stream: TlsStream<TcpStream>,
    info: PeerInfo,
    /// Its entry in the open connections (with a client certificate).
    tracked: Option<Tracked>,
}

/// An open connection's registration, and the grace timer started when a
/// reload revoked its certificate.
#[derive(Debug)]
struct Tracked {
    registered: Registered,
    stats: Arc<HandshakeStats>,
    grace: Option<Pin<Box<tokio::time::Sleep>>>,
    closed: bool,
}

impl Tracked {
    /// Whether the connection must read as closed now: its certificate was
    /// revoked and it has no call in flight, or its grace is over.
    fn poll_closed(&mut self, cx: &mut Context<'_>) -> bool {
        if self.closed {
            return true;
        }
        let state = &self.registered.state;
        state.register_reader(cx.waker());
        if !state.revoked() {
            return false;
        }
        let grace = self
            .grace
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(state.grace())));
        let expired = grace.as_mut().poll(cx).is_ready();
        if expired || state.in_flight() == 0 {
            if let Some(suppressed) = lograte::global().check("revoked_connection_closed") {
                tracing::info!(
                    peer = %state.peer(),
                    in_flight = state.in_flight(),
                    suppressed,
                    "closed a connection whose client certificate is no longer accepted"
                );
            }
            self.stats.closed_revoked.fetch_add(1, Ordering::Relaxed);
            self.closed = true;
        }
        self.closed
    }
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
        let this = self.get_mut();
        if this.tracked.as_mut().is_some_and(|t| t.poll_closed(cx)) {
            // End of file: the HTTP/2 connection ends and the socket closes.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
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
/// Handshakes never run in the accept loop, and the loop never waits for a
/// handshake slot: each connection is handshaken in its own task under the
/// limits of [`AcceptOptions`] (first-byte deadline, handshake timeout,
/// pending pool and per-address caps that shed the oldest). Failed
/// handshakes are counted and logged (rate-limited, see
/// [`crate::lograte`]); accept errors are logged and never end the
/// stream.
///
/// `config` is an `Arc<ServerConfig>` (fixed) or a [`SharedServerConfig`]
/// (e.g. [`TlsMaterial::shared_config`](crate::server::tls::TlsMaterial::shared_config)): each new handshake takes the
/// configuration current at its accept, so a reload never touches the
/// connections already open, except to close those whose client
/// certificate it refuses: after their calls if the server counts them with
/// [`crate::server::revoke::TrackLayer`] (each connection's calls reach it
/// through its [`PeerInfo`]), else at once.
///
/// Must be called inside a tokio runtime.
pub fn incoming(
    listener: TcpListener,
    config: impl Into<SharedServerConfig>,
    opts: AcceptOptions,
) -> TlsIncoming {
    incoming_counted(listener, config, opts, Arc::default())
}

/// [`incoming`], counting every handshake into `stats`.
pub fn incoming_counted(
    listener: TcpListener,
    config: impl Into<SharedServerConfig>,
    opts: AcceptOptions,
    stats: Arc<HandshakeStats>,
) -> TlsIncoming {
    if opts.listen_backlog > 0 {
        // listen(2) again on a listening socket sets its backlog (Linux);
        // tokio binds with a small one.
        let backlog = i32::try_from(opts.listen_backlog).unwrap_or(i32::MAX);
        if let Err(err) = socket2::SockRef::from(&listener).listen(backlog) {
            tracing::warn!(error = %err, backlog, "cannot raise the listen backlog");
        }
    }
    let (tx, ready) = mpsc::channel(READY_CONNECTIONS);
    let accept_loop = tokio::spawn(accept_loop(listener, config.into(), opts, tx, stats));
    TlsIncoming { ready, accept_loop }
}

/// Pending handshakes, oldest first, and per source address.
#[derive(Default)]
struct Pending {
    next_id: u64,
    by_age: BTreeMap<u64, (IpAddr, AbortHandle)>,
    by_ip: HashMap<IpAddr, BTreeSet<u64>>,
}

impl Pending {
    fn remove(&mut self, id: u64) -> Option<AbortHandle> {
        let (ip, handle) = self.by_age.remove(&id)?;
        if let Some(ids) = self.by_ip.get_mut(&ip) {
            ids.remove(&id);
            if ids.is_empty() {
                self.by_ip.remove(&ip);
            }
        }
        Some(handle)
    }

    /// Sheds the oldest pending handshake of `ip` if it is at `per_ip`, else
    /// the oldest of all if the pool is at `pool`.
    fn make_room(&mut self, ip: IpAddr, per_ip: usize, pool: usize) -> Option<HandshakeFailure> {
        let oldest_of_ip = self
            .by_ip
            .get(&ip)
            .filter(|ids| ids.len() >= per_ip)
            .and_then(|ids| ids.first().copied());
        let (victim, reason) = match oldest_of_ip {
            Some(id) => (id, HandshakeFailure::ShedPerIp),
            None if self.by_age.len() >= pool => (*self.by_age.keys().next()?, HandshakeFailure::ShedPool),
            None => return None,
        };
        self.remove(victim)?.abort();
        Some(reason)
    }
}

/// Takes a handshake out of [`Pending`] when its task ends (or is aborted).
struct PendingGuard {
    pending: Arc<Mutex<Pending>>,
    stats: Arc<HandshakeStats>,
    id: u64,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(self.id);
        self.stats.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn accept_loop(
    listener: TcpListener,
    config: SharedServerConfig,
    opts: AcceptOptions,
    tx: mpsc::Sender<TlsConnection>,
    stats: Arc<HandshakeStats>,
) {
    let pending = Arc::new(Mutex::new(Pending::default()));
    // Owning the handshake tasks means they are aborted when this loop ends.
    let mut handshakes = JoinSet::new();
    loop {
        while handshakes.try_join_next().is_some() {}

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
                if let Some(suppressed) = lograte::global().check("accept_failed") {
                    tracing::warn!(
                        error = %err,
                        backoff_ms = ACCEPT_ERROR_BACKOFF.as_millis() as u64,
                        suppressed,
                        "accept failed; backing off"
                    );
                }
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                continue;
            }
        };
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(peer = %remote_addr, error = %err, "cannot set TCP_NODELAY");
        }

        // The configuration of the latest reload, for this handshake and
        // this connection's whole life.
        let used = config.current();
        let acceptor = TlsAcceptor::from(used.clone());
        let shared = config.clone();
        let tx = tx.clone();
        let task_stats = stats.clone();
        let mut registry = pending.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(reason) = registry.make_room(
            remote_addr.ip(),
            opts.max_handshakes_per_ip.max(1),
            opts.max_handshakes.max(1),
        ) {
            stats.fail(reason);
            log_failure(reason, remote_addr, None, &opts);
        }
        let id = registry.next_id;
        registry.next_id += 1;
        stats.pending.fetch_add(1, Ordering::Relaxed);
        let guard = PendingGuard {
            pending: pending.clone(),
            stats: stats.clone(),
            id,
        };
        // Registered under the lock the guard takes, so a task that ends at
        // once still finds (and removes) its entry.
        let abort = handshakes.spawn(async move {
            // Held until the connection is handed over.
            let _guard = guard;
            let (stream, local_addr) = match handshake(acceptor, tcp, &opts).await {
                Ok(done) => done,
                Err((reason, err)) => {
                    task_stats.fail(reason);
                    if reason == HandshakeFailure::TlsError {
                        task_stats.tls_errors[tls_error_kind(err.as_ref())].fetch_add(1, Ordering::Relaxed);
                    }
                    log_failure(reason, remote_addr, err.as_ref(), &opts);
                    return;
                }
            };
            task_stats.completed.fetch_add(1, Ordering::Relaxed);
            let tracked = stream.get_ref().1.peer_certificates().map(|chain| Tracked {
                registered: shared.connections().register(
                    local_addr,
                    remote_addr,
                    chain.iter().map(|c| c.clone().into_owned()).collect(),
                    opts.revoked_grace,
                ),
                stats: task_stats.clone(),
                grace: None,
                closed: false,
            });
            let info = PeerInfo {
                remote_addr: Some(remote_addr),
                local_addr,
                platform: connection_platform(&stream, remote_addr),
                token_memo: Arc::default(),
                calls: tracked
                    .as_ref()
                    .map(|t| t.registered.state.clone() as Arc<dyn crate::identity::CallHook>),
            };
            // A reload during the handshake revalidated the connections
            // registered then, not this one: check it with the new verifier.
            if let Some(tracked) = &tracked
                && !Arc::ptr_eq(&used, &shared.current())
                && let Some(verifier) = shared.verifier()
            {
                tracked
                    .registered
                    .state
                    .revalidate(verifier.as_ref().as_ref(), rustls_pki_types::UnixTime::now());
            }
            // An error means the server is gone; the connection is dropped.
            let _ = tx
                .send(TlsConnection {
                    stream,
                    info,
                    tracked,
                })
                .await;
        });
        registry.by_age.insert(id, (remote_addr.ip(), abort));
        registry.by_ip.entry(remote_addr.ip()).or_default().insert(id);
        drop(registry);
    }
}

/// Waits for the client's first byte (at most `first_byte_timeout`), then
/// completes the handshake (within `handshake_timeout` of the accept).
async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    opts: &AcceptOptions,
) -> Result<(TlsStream<TcpStream>, Option<SocketAddr>), (HandshakeFailure, Option<io::Error>)> {
    let started = tokio::time::Instant::now();
    let local_addr = tcp.local_addr().ok();
    let first_byte = opts.first_byte_timeout.min(opts.handshake_timeout);
    let mut byte = [0_u8; 1];
    match tokio::time::timeout(first_byte, tcp.peek(&mut byte)).await {
        Err(_elapsed) => return Err((HandshakeFailure::FirstByteTimeout, None)),
        Ok(Ok(0)) => return Err((HandshakeFailure::Closed, None)),
        Ok(Err(err)) => return Err((HandshakeFailure::Closed, Some(err))),
        Ok(Ok(_)) => {}
    }
    match tokio::time::timeout_at(started + opts.handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => Ok((stream, local_addr)),
        Ok(Err(err)) if is_closed(&err) => Err((HandshakeFailure::Closed, Some(err))),
        Ok(Err(err)) => Err((HandshakeFailure::TlsError, Some(err))),
        Err(_elapsed) => Err((HandshakeFailure::Timeout, None)),
    }
}

/// The peer went away mid-handshake (not a TLS refusal).
fn is_closed(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

/// One rate-limited line per failed handshake (they are all counted).
fn log_failure(reason: HandshakeFailure, peer: SocketAddr, err: Option<&io::Error>, opts: &AcceptOptions) {
    let Some(suppressed) = lograte::global().check(reason.label()) else {
        return;
    };
    let reason = reason.label();
    match err {
        Some(err) => tracing::info!(%peer, reason, error = %err, suppressed, "tls handshake failed"),
        None => tracing::info!(
            %peer,
            reason,
            timeout_ms = opts.handshake_timeout.as_millis() as u64,
            first_byte_timeout_ms = opts.first_byte_timeout.as_millis() as u64,
            suppressed,
            "tls handshake failed"
        ),
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
            if let Some(suppressed) = lograte::global().check("certificate_names_no_platform") {
                tracing::info!(peer = %peer, error = %err, suppressed, "client certificate names no platform");
            }
            None
        }
    }
}
