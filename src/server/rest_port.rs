//! The REST face's own port (`rest_listen`): the same accept loop, TLS
//! material (reloaded with the gRPC port's), client CA and revocation as
//! the gRPC port, offering ALPN `h2` and `http/1.1`, and hyper serving
//! HTTP/1.1 (keep-alive) or HTTP/2 per connection. Each request gets the
//! connection's [`PeerInfo`] and goes to [`RestFace::handle`]; bearer tokens
//! are checked with the gRPC port's [`TokenVerifier`].
//!
//! A port of its own rather than the gRPC port routed by content type:
//! HTTP/1.1 clients (curl, CAMARA SDKs, API gateways) need ALPN
//! `http/1.1`, which the gRPC port does not offer, and the gRPC port keeps
//! its own HTTP/2 settings and hot path untouched.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::identity::{PeerInfo, Platform, Scopes};
use crate::rest::{RestFace, TokenCheck};
use crate::server::accept::{self, AcceptOptions, HandshakeStats};
use crate::server::metrics::MetricsHandle;
use crate::server::tls::SharedServerConfig;
use crate::server::token::TokenVerifier;

/// HTTP/1.1 request headers must arrive within this long.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

impl TokenCheck for TokenVerifier {
    fn scopes(
        &self,
        authorization: Option<&[u8]>,
        peer: &PeerInfo,
        platform: &Platform,
    ) -> Result<Scopes, String> {
        self.verify_on_connection(authorization, platform, &peer.token_memo)
            .map_err(|e| e.to_string())
    }
}

/// What the REST port needs besides its face.
pub struct RestPort {
    /// Where to listen.
    pub addr: SocketAddr,
    /// The gRPC port's TLS configuration (this port offers `http/1.1` too).
    pub tls: SharedServerConfig,
    /// The accept loop's limits.
    pub accept: AcceptOptions,
    /// Handshake counters (shared with the gRPC port's).
    pub handshakes: Arc<HandshakeStats>,
    /// Concurrent HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// Time in-flight calls get after `stop`.
    pub drain: Duration,
    /// Counts every call (`http_server_*`) and observes it when the access
    /// log or trace export is on.
    pub metrics: MetricsHandle,
}

/// Binds `port.addr`, publishes the bound address on `bound`, and serves
/// `face` until `stop` turns true; then lets in-flight calls finish (at
/// most `port.drain`).
pub async fn serve(
    port: RestPort,
    face: RestFace,
    bound: &crate::server::BoundAddr,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(port.addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for REST on {}: {e}", port.addr))?;
    let addr = listener.local_addr()?;
    let mut incoming =
        accept::incoming_counted(listener, port.tls.with_http1(), port.accept, port.handshakes);
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(port.max_concurrent_streams);
    tracing::info!(%addr, "rest: serving CAMARA Number Recycling and JSON batches");
    port.metrics.enable_rest();
    let metrics = port.metrics.clone();
    bound.publish(addr);
    Ok(tokio::spawn(async move {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        loop {
            tokio::select! {
                conn = incoming.next() => {
                    let Some(Ok(conn)) = conn else { break };
                    let peer = conn.peer_info().clone();
                    let face = face.clone();
                    let metrics = metrics.clone();
                    let service = hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
                        let face = face.clone();
                        let peer = peer.clone();
                        let metrics = metrics.clone();
                        async move {
                            // Counted as a call of the connection, so that a
                            // reload revoking its certificate waits for it.
                            let _call = CallGuard::start(peer.calls.clone());
                            req.extensions_mut().insert(peer);
                            // Metrics, access log and span: dropped with
                            // the call if the client goes away.
                            let counted = metrics.start_rest(&mut req);
                            let response = face.handle(req).await;
                            counted.finish(response.status());
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let served = graceful.watch(builder.serve_connection(TokioIo::new(conn), service).into_owned());
                    tokio::spawn(async move {
                        if let Err(e) = served.await {
                            tracing::debug!(error = %e, "rest connection ended with an error");
                        }
                    });
                }
                _ = stop.wait_for(|s| *s) => break,
            }
        }
        drop(incoming);
        if tokio::time::timeout(port.drain, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(after = ?port.drain, "rest drain timed out: closing the remaining connections");
        }
    }))
}

/// One call of a connection, from its start until it is answered or
/// dropped (see [`crate::identity::CallHook`]).
struct CallGuard(Option<Arc<dyn crate::identity::CallHook>>);

impl CallGuard {
    fn start(calls: Option<Arc<dyn crate::identity::CallHook>>) -> Self {
        if let Some(calls) = &calls {
            calls.call_started();
        }
        Self(calls)
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if let Some(calls) = &self.0 {
            calls.call_ended();
        }
    }
}
