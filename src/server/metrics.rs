//! A small Prometheus endpoint: plain HTTP `GET /metrics` on its own port
//! (`--metrics-listen`), in the text exposition format, written by hand.
//!
//! It carries no secrets or numbers, but it is plain HTTP without
//! authentication: bind it to a private interface, never expose it publicly.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::methods;
use crate::audit::AuditStats;
use crate::domain::Date;
use crate::store::{AnyStore, Store};

/// Columns of the request counters: the 17 gRPC codes by number, then
/// `none` (the call ended without a status: cancelled by the client or
/// connection lost).
const CODES: usize = 18;
const NO_CODE: usize = CODES - 1;

/// The `code` label of a column: the gRPC code as tonic names it (`OK`,
/// `InvalidArgument`, `Unavailable`, ...: the label values dashboards were
/// built on, kept as documented), or `none`. The canonical spelling of
/// error codes in responses is [`methods::code_name`].
fn code_label(column: usize) -> String {
    match i32::try_from(column) {
        Ok(0) => "OK".to_owned(),
        Ok(code) if column < NO_CODE => format!("{:?}", tonic::Code::from_i32(code)),
        _ => "none".to_owned(),
    }
}

/// Handle shared between a [`crate::config::ServeConfig`] and the server
/// running it: the request counters, and the address the metrics endpoint
/// is bound to once it is (useful with port 0).
#[derive(Clone)]
pub struct MetricsHandle {
    inner: Arc<Inner>,
}

struct Inner {
    /// One row per metrics label of [`methods::label_index`]; one column
    /// per gRPC code, then `none` (see [`code_label`]).
    requests: [[AtomicU64; CODES]; methods::LABEL_COUNT],
    bound: watch::Sender<Option<SocketAddr>>,
    /// Counters of the TLS accept loop.
    handshakes: Arc<crate::server::accept::HandshakeStats>,
}

impl Default for MetricsHandle {
    fn default() -> Self {
        Self {
            inner: Arc::new(Inner {
                requests: Default::default(),
                bound: watch::channel(None).0,
                handshakes: Arc::default(),
            }),
        }
    }
}

impl std::fmt::Debug for MetricsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsHandle")
            .field("bound", &*self.inner.bound.borrow())
            .finish_non_exhaustive()
    }
}

impl MetricsHandle {
    /// The address the metrics endpoint is bound to, waiting until the
    /// server has bound it (forever if metrics are off: put a timeout on it).
    pub async fn bound_addr(&self) -> SocketAddr {
        let mut rx = self.inner.bound.subscribe();
        loop {
            if let Some(addr) = *rx.borrow_and_update() {
                return addr;
            }
            if rx.changed().await.is_err() {
                // The sender lives in `self`: unreachable, but never spin.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Calls to the gRPC path `path` finished so far with the gRPC status
    /// `code` (a number; `None`: without a status).
    pub fn requests(&self, path: &str, code: Option<tonic::Code>) -> u64 {
        let code = code.map_or(NO_CODE, |c| c as usize);
        self.inner.requests[methods::label_index(path)][code].load(Ordering::Relaxed)
    }

    /// The counters of the TLS accept loop of the server running with
    /// this handle.
    pub fn handshakes(&self) -> Arc<crate::server::accept::HandshakeStats> {
        self.inner.handshakes.clone()
    }

    fn count(&self, method: usize, code: usize) {
        self.inner.requests[method][code].fetch_add(1, Ordering::Relaxed);
    }
}

/// What the endpoint reports besides the request counters.
pub struct Sources {
    /// The store whose cached mirror metadata is reported.
    pub store: AnyStore,
    /// The audit trail's counters.
    pub audit: Arc<AuditStats>,
    /// Delivery's counters (webhooks).
    pub delivery: Arc<crate::federation::deliver::DeliveryStats>,
    /// Beyond this many days the mirror counts as stale.
    pub max_staleness_days: u32,
}

/// The exposition text of all metrics.
pub fn render(handle: &MetricsHandle, sources: &Sources) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    // Only the (method, code) pairs seen so far: a fixed, bounded set.
    let requests: Vec<(String, u64)> = (0..methods::LABEL_COUNT)
        .map(methods::label)
        .zip(&handle.inner.requests)
        .flat_map(|(m, row)| {
            row.iter().enumerate().filter_map(move |(column, c)| {
                let n = c.load(Ordering::Relaxed);
                let code = code_label(column);
                (n > 0).then(|| (format!("{{method=\"{m}\",code=\"{code}\"}}"), n))
            })
        })
        .collect();
    metric(
        "reassigned_requests_total",
        "counter",
        "gRPC calls finished, by method and gRPC status (authentication failures included).",
        &requests,
    );
    let one = |v: u64| vec![(String::new(), v)];
    metric(
        "reassigned_audit_records_written_total",
        "counter",
        "Audit records written to the audit stream.",
        &one(sources.audit.written()),
    );
    metric(
        "reassigned_audit_records_dropped_total",
        "counter",
        "Audit records dropped (queue full or audit sink down).",
        &one(sources.audit.dropped()),
    );
    metric(
        "reassigned_audit_records_in_doubt",
        "gauge",
        "Audit records sent in batches not yet settled as written or dropped (audit sink down).",
        &one(sources.audit.in_doubt()),
    );
    let delivery = &sources.delivery;
    metric(
        "reassigned_watch_events_sent_total",
        "counter",
        "Events handed to WatchDisconnections streams.",
        &one(delivery.watch_events_sent.load(Ordering::Relaxed)),
    );
    metric(
        "reassigned_webhook_delivered_total",
        "counter",
        "Webhook events answered 2xx by the platform's receiver.",
        &one(delivery.webhook_delivered.load(Ordering::Relaxed)),
    );
    metric(
        "reassigned_webhook_retries_total",
        "counter",
        "Webhook attempts that failed and were retried.",
        &one(delivery.webhook_retries.load(Ordering::Relaxed)),
    );
    metric(
        "reassigned_webhook_dead_letters_total",
        "counter",
        "Webhook events given up after the retry budget (dead letters).",
        &one(delivery.webhook_dead.load(Ordering::Relaxed)),
    );
    let meta = sources.store.cached_meta();
    let today = Date::today_utc();
    let (sequence, records, age, stale) = match &meta {
        Some(m) => (
            m.sequence,
            m.record_count,
            (i64::from(today.days()) - i64::from(m.as_of.days())).max(0) as u64,
            u64::from(m.is_stale(today, sources.max_staleness_days)),
        ),
        None => (0, 0, 0, 1),
    };
    metric(
        "reassigned_mirror_loaded",
        "gauge",
        "1 if the mirror holds a data set.",
        &one(u64::from(meta.is_some())),
    );
    metric(
        "reassigned_mirror_sequence",
        "gauge",
        "Sequence number of the last applied snapshot or delta (0 when not loaded).",
        &one(sequence),
    );
    metric(
        "reassigned_mirror_records",
        "gauge",
        "Numbers with a recorded disconnect in the mirror.",
        &one(records),
    );
    metric(
        "reassigned_mirror_data_age_days",
        "gauge",
        "Days since the date the mirror's data is complete through.",
        &one(age),
    );
    let unsafe_reason = sources.store.unsafe_reason();
    let policy_unsafe = unsafe_reason
        .as_deref()
        .is_some_and(|r| r.contains("maxmemory-policy"));
    metric(
        "reassigned_store_unsafe",
        "gauge",
        "1 if the store must not be answered from (health NOT_SERVING, lookups UNAVAILABLE), by reason.",
        &[
            (
                "{reason=\"maxmemory_policy\"}".to_owned(),
                u64::from(policy_unsafe),
            ),
            (
                "{reason=\"data_lost\"}".to_owned(),
                u64::from(unsafe_reason.as_deref().is_some_and(|r| r.contains("went back"))),
            ),
        ],
    );
    if let AnyStore::Redis(redis) = &sources.store {
        metric(
            "reassigned_store_unproven_reads_total",
            "counter",
            "Redis reads whose bucket sentinel was missing or named another generation (retried on the master, else UNAVAILABLE).",
            &one(redis.unproven_reads()),
        );
    }
    metric(
        "reassigned_mirror_stale",
        "gauge",
        "1 if the mirror is older than the configured max staleness (or not loaded).",
        &one(stale),
    );
    let handshakes = &handle.inner.handshakes;
    metric(
        "reassigned_handshakes_completed_total",
        "counter",
        "TLS handshakes completed.",
        &one(handshakes.completed()),
    );
    let failures: Vec<(String, u64)> = crate::server::accept::HandshakeFailure::ALL
        .iter()
        .map(|r| (format!("{{reason=\"{}\"}}", r.label()), handshakes.failed(*r)))
        .collect();
    metric(
        "reassigned_handshake_failures_total",
        "counter",
        "TLS handshakes that did not complete, by reason (first_byte_timeout, timeout, closed, tls_error, shed_per_ip, shed_pool).",
        &failures,
    );
    metric(
        "reassigned_handshakes_pending",
        "gauge",
        "TLS handshakes in progress.",
        &one(handshakes.pending()),
    );
    metric(
        "reassigned_connections_closed_revoked_total",
        "counter",
        "Open connections closed because a TLS reload revoked or stopped trusting their client certificate.",
        &one(handshakes.closed_revoked()),
    );
    metric(
        "reassigned_log_suppressed_total",
        "counter",
        "Log lines not written by the rate limit of repeated lines (process-wide).",
        &one(crate::lograte::global().suppressed_total()),
    );
    metric(
        "reassigned_import_skipped_files",
        "gauge",
        "Register files skipped at the last load or resync of the data directory (embedded store).",
        &one(sources.store.import_problems().len() as u64),
    );
    out
}

/// Binds `addr`, publishes the bound address on `handle` and serves
/// `GET /metrics` (404 for any other path) until `stop` changes.
pub async fn serve(
    addr: SocketAddr,
    handle: MetricsHandle,
    sources: Sources,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use axum::routing::get;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for metrics on {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    let sources = Arc::new(sources);
    let state = handle.clone();
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let text = render(&state, &sources);
            async move { ([(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], text) }
        }),
    );
    tracing::info!(%bound, "metrics: serving plain HTTP GET /metrics");
    handle.inner.bound.send_replace(Some(bound));
    Ok(tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
            tracing::warn!(error = %e, "metrics endpoint failed");
        }
    }))
}

/// Counts every call by its gRPC method into a [`MetricsHandle`].
#[derive(Clone)]
pub struct CountLayer(pub MetricsHandle);

impl<S> tower::Layer<S> for CountLayer {
    type Service = Count<S>;
    fn layer(&self, inner: S) -> Count<S> {
        Count {
            inner,
            handle: self.0.clone(),
        }
    }
}

/// The service of [`CountLayer`].
#[derive(Clone)]
pub struct Count<S> {
    inner: S,
    handle: MetricsHandle,
}

impl<S, B, R> tower::Service<http::Request<B>> for Count<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    R: Body,
{
    type Response = http::Response<CountBody<R>>;
    type Error = S::Error;
    type Future = CountFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = methods::label_index(req.uri().path());
        CountFuture {
            call: self.inner.call(req),
            method,
            handle: Some(self.handle.clone()),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`Count`] (no allocation per call).
    pub struct CountFuture<F> {
        #[pin]
        call: F,
        method: usize,
        // `Some` until the response (or the error) passes.
        handle: Option<MetricsHandle>,
    }
}

impl<F, R, E> Future for CountFuture<F>
where
    F: Future<Output = Result<http::Response<R>, E>>,
{
    type Output = Result<http::Response<CountBody<R>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if this.handle.is_none() {
            // Polled again after it finished (a caller's contract
            // violation): never ready again, never counted twice.
            return Poll::Pending;
        }
        let result = std::task::ready!(this.call.poll(cx));
        let method = *this.method;
        let Some(handle) = this.handle.take() else {
            return Poll::Pending;
        };
        Poll::Ready(match result {
            Ok(response) => {
                // A trailers-only response (errors) carries the status
                // in its headers; others in the trailers of the body.
                let pending = match status_of(response.headers()) {
                    Some(code) => {
                        handle.count(method, code);
                        None
                    }
                    None => Some(handle),
                };
                Ok(response.map(|body| CountBody {
                    inner: body,
                    method,
                    pending,
                }))
            }
            Err(e) => {
                handle.count(method, NO_CODE);
                Err(e)
            }
        })
    }
}

/// The counter column of the `grpc-status` in `headers`, if any.
fn status_of(headers: &http::HeaderMap) -> Option<usize> {
    let code = headers.get("grpc-status")?.to_str().ok()?.parse::<usize>().ok()?;
    (code < NO_CODE).then_some(code)
}

pin_project_lite::pin_project! {
    /// A response body that counts its call when its trailers pass (or, with
    /// no status, when it ends or is dropped).
    pub struct CountBody<B> {
        #[pin]
        inner: B,
        method: usize,
        // `Some` until the call is counted.
        pending: Option<MetricsHandle>,
    }

    impl<B> PinnedDrop for CountBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            finish(this.pending, *this.method, NO_CODE);
        }
    }
}

/// Counts the call of a [`CountBody`] once, with `code`.
fn finish(pending: &mut Option<MetricsHandle>, method: usize, code: usize) {
    if let Some(handle) = pending.take() {
        handle.count(method, code);
    }
}

impl<B: Body> Body for CountBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    finish(this.pending, *this.method, status_of(trailers).unwrap_or(NO_CODE));
                }
            }
            Poll::Ready(Some(Err(_)) | None) => finish(this.pending, *this.method, NO_CODE),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use tower::{Layer, Service, ServiceExt};

    use super::*;

    const CHECK: &str = "/reassigned.v1.ReassignedNumbers/CheckNumber";

    async fn call(
        handle: &MetricsHandle,
        path: &str,
        status: Option<&str>,
    ) -> http::Response<CountBody<String>> {
        let status = status.map(str::to_owned);
        let inner = tower::service_fn(move |_req: http::Request<()>| {
            let status = status.clone();
            async move {
                let mut response = http::Response::new(String::from("body"));
                if let Some(s) = status {
                    response
                        .headers_mut()
                        .insert("grpc-status", s.parse().expect("header value"));
                }
                Ok::<_, std::convert::Infallible>(response)
            }
        });
        let mut svc = CountLayer(handle.clone()).layer(inner);
        let req = http::Request::builder().uri(path).body(()).expect("request");
        svc.ready()
            .await
            .expect("ready")
            .call(req)
            .await
            .expect("response")
    }

    #[tokio::test]
    async fn trailers_only_responses_count_their_status_at_once() {
        let handle = MetricsHandle::default();
        let _response = call(&handle, CHECK, Some("16")).await;
        assert_eq!(handle.requests(CHECK, Some(tonic::Code::Unauthenticated)), 1);
        assert_eq!(handle.requests(CHECK, None), 0);
    }

    #[tokio::test]
    async fn a_body_dropped_without_trailers_counts_as_none_and_unknown_paths_as_other() {
        let handle = MetricsHandle::default();
        let response = call(&handle, "/some.Unknown/Path", None).await;
        assert_eq!(
            handle.requests("/some.Unknown/Path", None),
            0,
            "not before the body ends"
        );
        drop(response);
        assert_eq!(handle.requests("/another/unknown", None), 1, "one `other` row");
        let text = render_requests(&handle);
        assert!(
            text.contains("reassigned_requests_total{method=\"other\",code=\"none\"} 1"),
            "{text}"
        );
    }

    /// The request lines of the exposition text.
    fn render_requests(handle: &MetricsHandle) -> String {
        let sources = Sources {
            store: AnyStore::Embedded(Arc::new(crate::store::EmbeddedStore::new())),
            audit: Arc::default(),
            delivery: Arc::default(),
            max_staleness_days: 45,
        };
        render(handle, &sources)
            .lines()
            .filter(|l| l.starts_with("reassigned_requests_total"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}
