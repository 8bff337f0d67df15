//! Closing open connections whose client certificate a reload revoked.
//!
//! A CRL or client CA reload applies at the handshake, so without more a
//! connection made before the reload would keep its (now revoked or
//! untrusted) certificate's access for as long as the client holds it
//! open. [`OpenConnections`] remembers every open connection's peer chain;
//! after each successful reload, [`crate::server::tls::TlsMaterial`] checks
//! every chain with the new client certificate verifier, and marks the
//! connections it refuses. A marked connection is closed (its next read is
//! end-of-file, so the HTTP/2 connection ends and the socket is closed) as
//! soon as it has no call in flight, and at the latest after its grace
//! period, so calls in progress can finish. [`TrackLayer`] counts the calls
//! in flight per connection.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use http_body::{Body, Frame, SizeHint};
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::{CertificateDer, UnixTime};

use crate::identity::{CallHook, PeerInfo};
use crate::lograte;

/// Identifies a connection: our address and the client's.
type ConnKey = (Option<SocketAddr>, SocketAddr);

/// The open connections of one server, with their client certificates.
#[derive(Clone, Default)]
pub struct OpenConnections(Arc<Registry>);

#[derive(Default)]
struct Registry {
    conns: Mutex<HashMap<ConnKey, Arc<ConnState>>>,
}

impl std::fmt::Debug for OpenConnections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenConnections")
            .field("open", &self.len())
            .finish_non_exhaustive()
    }
}

/// What is known of one open connection.
#[derive(Debug)]
pub(crate) struct ConnState {
    chain: Vec<CertificateDer<'static>>,
    peer: SocketAddr,
    in_flight: AtomicUsize,
    revoked: AtomicBool,
    grace: Duration,
    /// The task reading the connection, woken to close it.
    reader: AtomicWaker,
}

impl ConnState {
    /// Whether the connection must close now: revoked and idle.
    pub(crate) fn revoked(&self) -> bool {
        self.revoked.load(Ordering::Acquire)
    }

    /// Calls in flight on the connection.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// The longest a revoked connection waits for its calls.
    pub(crate) fn grace(&self) -> Duration {
        self.grace
    }

    /// Registers the waker of the task reading the connection.
    pub(crate) fn register_reader(&self, waker: &std::task::Waker) {
        self.reader.register(waker);
    }

    /// The client's address.
    pub(crate) fn peer(&self) -> SocketAddr {
        self.peer
    }
}

impl CallHook for ConnState {
    fn call_started(&self) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
    }

    fn call_ended(&self) {
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 && self.revoked() {
            self.reader.wake();
        }
    }
}

impl OpenConnections {
    /// A registry with no connections.
    pub fn new() -> Self {
        Self::default()
    }

    /// Connections open now.
    pub fn len(&self) -> usize {
        self.0.conns.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Whether no connection is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Remembers a connection; it is forgotten when the returned guard drops.
    pub(crate) fn register(
        &self,
        local: Option<SocketAddr>,
        peer: SocketAddr,
        chain: Vec<CertificateDer<'static>>,
        grace: Duration,
    ) -> Registered {
        let state = Arc::new(ConnState {
            chain,
            peer,
            in_flight: AtomicUsize::new(0),
            revoked: AtomicBool::new(false),
            grace,
            reader: AtomicWaker::new(),
        });
        let key = (local, peer);
        self.0
            .conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, state.clone());
        Registered {
            registry: self.clone(),
            key,
            state,
        }
    }

    /// Checks every open connection's client certificate chain with
    /// `verifier` and marks those it refuses for closing; returns how many
    /// were marked.
    pub fn revalidate(&self, verifier: &dyn ClientCertVerifier) -> usize {
        let conns: Vec<Arc<ConnState>> = self
            .0
            .conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        let now = UnixTime::now();
        conns.iter().filter(|conn| conn.revalidate(verifier, now)).count()
    }
}

impl ConnState {
    /// Checks this connection's chain with `verifier`; marks it for
    /// closing (and says so) if it is refused.
    pub(crate) fn revalidate(&self, verifier: &dyn ClientCertVerifier, now: UnixTime) -> bool {
        if self.revoked() {
            return false;
        }
        let Some((leaf, intermediates)) = self.chain.split_first() else {
            return false;
        };
        let Err(err) = verifier.verify_client_cert(leaf, intermediates, now) else {
            return false;
        };
        if let Some(suppressed) = lograte::global().check("connection_revoked") {
            tracing::info!(
                peer = %self.peer,
                reason = %err,
                in_flight = self.in_flight(),
                suppressed,
                "client certificate no longer accepted; closing its connection after its calls"
            );
        }
        self.revoked.store(true, Ordering::Release);
        self.reader.wake();
        true
    }
}

/// A connection's entry in [`OpenConnections`], removed on drop.
#[derive(Debug)]
pub(crate) struct Registered {
    registry: OpenConnections,
    key: ConnKey,
    pub(crate) state: Arc<ConnState>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut conns = self
            .registry
            .0
            .conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if conns.get(&self.key).is_some_and(|s| Arc::ptr_eq(s, &self.state)) {
            conns.remove(&self.key);
        }
    }
}

/// Counts the calls in flight on each tracked connection (from the request
/// until its response body ends or is dropped), through the connection's
/// own [`CallHook`] in its [`PeerInfo`]: no shared lookup per call.
#[derive(Clone, Copy, Debug, Default)]
pub struct TrackLayer;

impl<S> tower::Layer<S> for TrackLayer {
    type Service = Track<S>;
    fn layer(&self, inner: S) -> Track<S> {
        Track { inner }
    }
}

/// The service of [`TrackLayer`].
#[derive(Clone, Debug)]
pub struct Track<S> {
    inner: S,
}

/// One call in flight on a connection.
struct InFlight(Arc<dyn CallHook>);

impl InFlight {
    fn new(hook: Arc<dyn CallHook>) -> Self {
        hook.call_started();
        Self(hook)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.call_ended();
    }
}

impl<S, B, R> tower::Service<http::Request<B>> for Track<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    R: Body,
{
    type Response = http::Response<TrackedBody<R>>;
    type Error = S::Error;
    type Future = TrackFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // The connection's own hook, set at handshake time: no shared
        // lookup per call.
        let guard = req
            .extensions()
            .get::<PeerInfo>()
            .and_then(|peer| peer.calls.clone())
            .map(InFlight::new);
        TrackFuture {
            call: self.inner.call(req),
            guard,
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`Track`] (no allocation per call).
    pub struct TrackFuture<F> {
        #[pin]
        call: F,
        guard: Option<InFlight>,
    }
}

impl<F, R, E> Future for TrackFuture<F>
where
    F: Future<Output = Result<http::Response<R>, E>>,
{
    type Output = Result<http::Response<TrackedBody<R>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = std::task::ready!(this.call.poll(cx))?;
        let in_flight = this.guard.take();
        Poll::Ready(Ok(response.map(|body| TrackedBody {
            inner: body,
            _in_flight: in_flight,
        })))
    }
}

pin_project_lite::pin_project! {
    /// A response body that holds its call's place in flight until it ends.
    pub struct TrackedBody<B> {
        #[pin]
        inner: B,
        _in_flight: Option<InFlight>,
    }
}

impl<B: Body> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
