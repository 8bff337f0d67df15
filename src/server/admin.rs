//! The admin listener (`--admin-listen`, alias `--metrics-listen`): plain
//! HTTP on its own port for probes and scrapers, never the API's port.
//!
//! - `GET /metrics`: the Prometheus exposition of [`super::metrics::render`];
//! - `GET /livez`: 200 while the process is up;
//! - `GET /readyz`: 200 while this server can answer (mirror loaded, store
//!   reachable and safe, not draining), else 503 with a one-line reason.
//!
//! It carries no secrets or numbers, but it is plain HTTP without
//! authentication: bind it to the pod's or host's private interface and never
//! expose it outside (Kubernetes: a NetworkPolicy; compose: no published port
//! beyond the host's loopback).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;

use super::metrics::{MetricsHandle, Sources, render};
use super::reload::AbortOnDrop;

/// The readiness of a running server, as `/readyz` reports it: set by the
/// health watcher (store and mirror) and by the shutdown (draining).
#[derive(Clone, Debug)]
pub struct Readiness {
    state: Arc<Mutex<ReadyState>>,
}

#[derive(Debug)]
struct ReadyState {
    /// Why the store cannot answer (`None`: it can).
    store: Option<String>,
    /// Shutting down: in-flight calls are draining.
    draining: bool,
}

impl Default for Readiness {
    /// Not ready until the first health check: "starting".
    fn default() -> Self {
        Self {
            state: Arc::new(Mutex::new(ReadyState {
                store: Some("starting: store not checked yet".into()),
                draining: false,
            })),
        }
    }
}

impl Readiness {
    fn with<T>(&self, f: impl FnOnce(&mut ReadyState) -> T) -> T {
        // A panic elsewhere while holding this lock leaves plain data: use it.
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    /// Records the latest store check: `None` serving, `Some(reason)` not.
    pub fn set_store(&self, not_serving: Option<String>) {
        self.with(|s| s.store = not_serving);
    }

    /// Marks the server as draining (for good: it is shutting down).
    pub fn set_draining(&self) {
        self.with(|s| s.draining = true);
    }

    /// `Ok(())` when ready, else the one-line reason.
    pub fn check(&self) -> Result<(), String> {
        self.with(|s| {
            if s.draining {
                return Err("draining: shutting down".into());
            }
            match &s.store {
                Some(reason) => Err(reason.clone()),
                None => Ok(()),
            }
        })
    }
}

/// Binds `addr`, publishes the bound address on `handle` (see
/// [`MetricsHandle::bound_addr`]) and serves `/metrics`, `/livez` and
/// `/readyz` (404 for any other path) until the returned task is dropped:
/// it outlives the drain, so `/readyz` says "draining" while calls finish.
pub(crate) async fn serve(
    addr: SocketAddr,
    handle: MetricsHandle,
    sources: Sources,
    readiness: Readiness,
) -> anyhow::Result<AbortOnDrop> {
    use axum::routing::get;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for admin (probes, metrics) on {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    let sources = Arc::new(sources);
    let state = handle.clone();
    let text = |status: http::StatusCode, body: String| {
        (
            status,
            [(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            body,
        )
    };
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let text = render(&state, &sources);
                async move { ([(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], text) }
            }),
        )
        .route(
            "/livez",
            get(move || async move { text(http::StatusCode::OK, "ok\n".into()) }),
        )
        .route(
            "/readyz",
            get(move || {
                let answer = match readiness.check() {
                    Ok(()) => text(http::StatusCode::OK, "ready\n".into()),
                    Err(reason) => text(http::StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
                };
                async move { answer }
            }),
        );
    tracing::info!(%bound, "admin: serving plain HTTP /metrics, /livez, /readyz");
    handle.publish_bound(bound);
    Ok(AbortOnDrop(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "admin endpoint failed");
        }
    })))
}

/// Binds `addr` and serves a sync process's `/metrics`
/// ([`super::sync_metrics::render_sync`]) and `/livez` (404 for any other
/// path; no `/readyz`: a sync serves no one) until the returned task is
/// dropped. For `reassigned sync --admin-listen`; the same rules as the
/// server's admin listener: plain HTTP, never exposed.
pub(crate) async fn serve_sync(
    addr: SocketAddr,
    stats: Arc<super::sync_metrics::SyncStats>,
) -> anyhow::Result<(SocketAddr, AbortOnDrop)> {
    use axum::routing::get;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for admin (metrics) on {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let text = super::sync_metrics::render_sync(&stats, true);
                async move { ([(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], text) }
            }),
        )
        .route(
            "/livez",
            get(|| async {
                (
                    [(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                    "ok\n",
                )
            }),
        );
    tracing::info!(%bound, "admin: serving plain HTTP /metrics, /livez");
    Ok((
        bound,
        AbortOnDrop(tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::warn!(error = %e, "admin endpoint failed");
            }
        })),
    ))
}

/// The answer of `GET path` on the admin listener at `addr` (HTTP/1.1, no
/// TLS): the status code and the body. For `reassigned health --admin`.
pub async fn get(addr: &str, path: &str, timeout: std::time::Duration) -> anyhow::Result<(u16, String)> {
    use anyhow::Context as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        // Probe answers are one line: cap what a wrong peer can make us read.
        stream.take(64 * 1024).read_to_end(&mut raw).await?;
        anyhow::Ok(raw)
    };
    let raw = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| anyhow::anyhow!("{addr} did not answer within {timeout:?}"))??;
    let raw = String::from_utf8_lossy(&raw);
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse::<u16>().ok())
        .with_context(|| format!("{addr} did not answer HTTP"))?;
    Ok((status, body.trim().to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_reports_the_store_then_draining_wins() {
        let r = Readiness::default();
        assert!(matches!(r.check(), Err(reason) if reason.starts_with("starting")));
        r.set_store(None);
        assert_eq!(r.check(), Ok(()));
        r.set_store(Some("mirror empty".into()));
        assert_eq!(r.check(), Err("mirror empty".into()));
        r.set_store(None);
        r.set_draining();
        assert_eq!(r.check(), Err("draining: shutting down".into()));
    }
}
