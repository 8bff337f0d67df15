//! The Prometheus metrics, in the text exposition format, written by hand:
//! served as `GET /metrics` by the admin listener ([`super::admin`],
//! `--admin-listen` or its alias `--metrics-listen`).
//!
//! Calls are counted by [`CountLayer`] with relaxed atomics per (method,
//! code) and per (method, latency bucket): no lock, no allocation and no
//! formatting per call; the text is made only when scraped. The gRPC
//! families follow go-grpc-prometheus (`grpc_server_started_total`,
//! `grpc_server_handled_total`, `grpc_server_handling_seconds`, labels
//! `grpc_type`, `grpc_service`, `grpc_method`, `grpc_code`), so the
//! standard gRPC dashboards work; the `reassigned_*` families are kept
//! beside them. Calls to the REST face (`--rest-listen`) are counted apart,
//! in `http_server_*` families labelled by route, HTTP method and status
//! code ([`RestCall`]): HTTP statuses are not gRPC codes, and a gRPC
//! dashboard must not mix them in.
//!
//! It carries no secrets or numbers, but it is plain HTTP without
//! authentication: bind it to a private interface, never expose it publicly.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::{Body, Frame, SizeHint};

use crate::api::methods;
use crate::audit::AuditStats;
use crate::domain::Date;
use crate::quota::{QuotaKind, Quotas};
use crate::server::auth::{REFUSAL_REASONS, RefusalStats};
use crate::server::trace::{Observed, Observer};
use crate::stats::{Histogram, HistogramReading, LATENCY_BOUNDS};
use crate::store::calls::{self as store_calls, Backend, ERROR_KINDS, Op};
use crate::store::{AnyStore, Kind, Store};

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

/// The `grpc_code` label of a column: the code as grpc-go names it
/// (`OK`, `Canceled`, `InvalidArgument`, ...: go-grpc-prometheus' values),
/// or `none` (no status: cancelled by the client or connection lost).
const GO_CODE_NAMES: [&str; CODES] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
    "none",
];

/// The `grpc_type`, `grpc_service` and `grpc_method` labels of the metrics
/// label `index` ([`methods::label_index`]), as go-grpc-prometheus writes
/// them.
fn grpc_labels(index: usize) -> (&'static str, &'static str, &'static str) {
    let (path, streaming) = match (
        methods::METHODS.get(index),
        index
            .checked_sub(methods::METHODS.len())
            .and_then(|i| methods::EXEMPT_LABELS.get(i)),
    ) {
        (Some(m), _) => (m.path, Some(m.streaming)),
        (None, Some((path, _))) if path.ends_with("/Watch") => (*path, Some(methods::Streaming::Server)),
        (None, Some((path, _))) => (*path, Some(methods::Streaming::Unary)),
        (None, None) => return ("unknown", "unknown", "unknown"),
    };
    let kind = match streaming {
        Some(methods::Streaming::Unary) => "unary",
        Some(methods::Streaming::Server) => "server_stream",
        Some(methods::Streaming::Client) => "client_stream",
        Some(methods::Streaming::Bidi) => "bidi_stream",
        None => "unknown",
    };
    let (service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or(("unknown", "unknown"));
    (kind, service, method)
}

/// The `method` label values of the REST metrics: the standard HTTP
/// methods; any other is counted as `_OTHER` (OpenTelemetry's spelling), so
/// clients cannot grow the label set.
const HTTP_METHODS: [&str; 10] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "_OTHER",
];

/// The column of `method` in [`HTTP_METHODS`].
fn http_method_column(method: &http::Method) -> usize {
    HTTP_METHODS
        .iter()
        .position(|m| *m == method.as_str())
        .unwrap_or(HTTP_METHODS.len() - 1)
}

/// Rows of the REST counters: the face's routes, then `other`.
const REST_ROUTES: usize = crate::rest::ROUTES.len() + 1;

/// Columns of status codes: 100 to 599 at their number; 0 for "no
/// response" (the client went away before the answer).
const HTTP_STATUSES: usize = 600;

/// The REST face's counters: calls by (route, method, status), and per
/// route the calls in flight and the latency.
struct RestCounters {
    /// On once the server serves the REST face (its families are left out
    /// of the exposition otherwise).
    on: AtomicBool,
    /// `[route][method][status]`, flattened (on the heap: 192 kB).
    requests: Box<[AtomicU64]>,
    in_flight: [AtomicI64; REST_ROUTES],
    latency: [Histogram; REST_ROUTES],
}

impl Default for RestCounters {
    fn default() -> Self {
        Self {
            on: AtomicBool::new(false),
            requests: (0..REST_ROUTES * HTTP_METHODS.len() * HTTP_STATUSES)
                .map(|_| AtomicU64::new(0))
                .collect(),
            in_flight: Default::default(),
            latency: std::array::from_fn(|_| Histogram::new()),
        }
    }
}

impl RestCounters {
    fn cell(&self, route: usize, method: usize, status: usize) -> &AtomicU64 {
        &self.requests[(route * HTTP_METHODS.len() + method) * HTTP_STATUSES + status]
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
    /// Calls started, per metrics label.
    started: [AtomicU64; methods::LABEL_COUNT],
    /// Calls in flight, per metrics label.
    in_flight: [AtomicI64; methods::LABEL_COUNT],
    /// Handling time of finished calls (to the status, or the end of the
    /// stream), per metrics label.
    latency: [Histogram; methods::LABEL_COUNT],
    bound: crate::server::BoundAddr,
    /// Counters of the TLS accept loop.
    handshakes: Arc<crate::server::accept::HandshakeStats>,
    /// Calls refused by the auth layer, by reason.
    refusals: Arc<RefusalStats>,
    /// The access log and trace export, once the server set them up.
    observer: std::sync::OnceLock<Arc<Observer>>,
    /// Calls to the REST face.
    rest: RestCounters,
}

impl Default for MetricsHandle {
    fn default() -> Self {
        Self {
            inner: Arc::new(Inner {
                requests: Default::default(),
                started: Default::default(),
                in_flight: Default::default(),
                latency: std::array::from_fn(|_| Histogram::new()),
                bound: crate::server::BoundAddr::default(),
                handshakes: Arc::default(),
                refusals: Arc::default(),
                observer: std::sync::OnceLock::new(),
                rest: RestCounters::default(),
            }),
        }
    }
}

impl std::fmt::Debug for MetricsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsHandle")
            .field("bound", &self.inner.bound)
            .finish_non_exhaustive()
    }
}

impl MetricsHandle {
    /// The address the metrics endpoint is bound to, waiting until the
    /// server has bound it (forever if metrics are off: put a timeout on it).
    pub async fn bound_addr(&self) -> SocketAddr {
        self.inner.bound.wait().await
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

    /// Publishes the address the admin listener is bound to.
    pub(crate) fn publish_bound(&self, addr: SocketAddr) {
        self.inner.bound.publish(addr);
    }

    /// The counters of the auth layer's refusals of the server running
    /// with this handle.
    pub fn refusals(&self) -> Arc<RefusalStats> {
        self.inner.refusals.clone()
    }

    /// The handling time of the calls to `path` finished so far.
    pub fn latency(&self, path: &str) -> HistogramReading {
        self.inner.latency[methods::label_index(path)].read()
    }

    /// Calls to `path` in flight now.
    pub fn in_flight(&self, path: &str) -> i64 {
        self.inner.in_flight[methods::label_index(path)].load(Ordering::Relaxed)
    }

    /// Observes every call from now on with `observer` (access log, trace
    /// export); the first observer set stays.
    pub fn observe_with(&self, observer: Arc<Observer>) {
        if self.inner.observer.set(observer).is_err() {
            tracing::warn!("an observer is already set on these metrics: keeping the first");
        }
    }

    /// The observer set with [`MetricsHandle::observe_with`], if any.
    pub fn observer(&self) -> Option<Arc<Observer>> {
        self.inner.observer.get().cloned()
    }

    /// Marks the REST face as served: its `http_server_*` families are
    /// exported from now on.
    pub fn enable_rest(&self) {
        self.inner.rest.on.store(true, Ordering::Relaxed);
    }

    /// Starts counting the REST call `req` (its connection's peer already
    /// in its extensions) and, with the access log or trace export on,
    /// observing it; end it with [`RestCall::finish`] (dropped unfinished,
    /// it counts as answered with no status).
    pub fn start_rest<B>(&self, req: &mut http::Request<B>) -> RestCall {
        let route = crate::rest::route_index(req.uri().path());
        let method = http_method_column(req.method());
        self.inner.rest.in_flight[route].fetch_add(1, Ordering::Relaxed);
        let observed = self.inner.observer.get().map(|o| o.start_rest(req));
        RestCall {
            handle: Some(self.clone()),
            route,
            method,
            started: Instant::now(),
            observed,
        }
    }

    /// REST calls to `path` (a route of [`crate::rest::ROUTES`]; any other
    /// path reads the `other` row) with `method`, answered with `status`
    /// (`None`: no response) so far.
    pub fn rest_requests(&self, path: &str, method: &http::Method, status: Option<u16>) -> u64 {
        let column = status.map_or(0, |s| usize::from(s).min(HTTP_STATUSES - 1));
        self.inner
            .rest
            .cell(crate::rest::route_index(path), http_method_column(method), column)
            .load(Ordering::Relaxed)
    }

    fn start(&self, method: usize) {
        self.inner.started[method].fetch_add(1, Ordering::Relaxed);
        self.inner.in_flight[method].fetch_add(1, Ordering::Relaxed);
    }

    fn count(&self, method: usize, code: usize, started: Instant, observed: Option<Box<Observed>>) {
        let elapsed = started.elapsed();
        self.inner.requests[method][code].fetch_add(1, Ordering::Relaxed);
        self.inner.latency[method].observe(elapsed);
        self.inner.in_flight[method].fetch_sub(1, Ordering::Relaxed);
        if let (Some(observed), Some(observer)) = (observed, self.inner.observer.get()) {
            let code = i32::try_from(code)
                .ok()
                .filter(|_| code < NO_CODE)
                .map(tonic::Code::from_i32);
            observer.finish(observed, method, code, elapsed);
        }
    }
}

/// One REST call being counted (see [`MetricsHandle::start_rest`]).
pub struct RestCall {
    // `Some` until counted.
    handle: Option<MetricsHandle>,
    route: usize,
    method: usize,
    started: Instant,
    observed: Option<Box<Observed>>,
}

impl RestCall {
    /// Counts the call as answered with `status`.
    pub fn finish(mut self, status: http::StatusCode) {
        self.end(Some(status.as_u16()));
    }

    fn end(&mut self, status: Option<u16>) {
        let Some(handle) = self.handle.take() else {
            return;
        };
        let elapsed = self.started.elapsed();
        let rest = &handle.inner.rest;
        let column = status.map_or(0, |s| {
            let s = usize::from(s);
            if (100..HTTP_STATUSES).contains(&s) { s } else { 0 }
        });
        rest.cell(self.route, self.method, column)
            .fetch_add(1, Ordering::Relaxed);
        rest.latency[self.route].observe(elapsed);
        rest.in_flight[self.route].fetch_sub(1, Ordering::Relaxed);
        if let (Some(observed), Some(observer)) = (self.observed.take(), handle.inner.observer.get()) {
            observer.finish_rest(
                observed,
                HTTP_METHODS[self.method],
                crate::rest::route_label(self.route),
                status,
                elapsed,
            );
        }
    }
}

impl Drop for RestCall {
    fn drop(&mut self) {
        // Dropped before an answer: the client went away.
        self.end(None);
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
    /// The quota limiter, for its refusals (`None`: no quotas).
    pub quotas: Option<Arc<Quotas>>,
    /// The TLS material in service, for the certificate's expiry.
    pub tls: Option<Arc<crate::server::reload::Reloader>>,
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
    let tls_errors: Vec<(String, u64)> = crate::server::accept::TLS_ERROR_KINDS
        .iter()
        .enumerate()
        .map(|(i, kind)| (format!("{{kind=\"{kind}\"}}"), handshakes.tls_errors(i)))
        .collect();
    metric(
        "reassigned_handshake_tls_errors_total",
        "counter",
        "TLS handshakes failed with a TLS error (reason tls_error), by what was refused (cert_expired, cert_untrusted, cert_revoked, cert_invalid, no_client_cert, incompatible, protocol).",
        &tls_errors,
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
    render_grpc(&mut out, handle);
    render_rest(&mut out, handle);
    render_refusals(&mut out, handle, sources);
    render_store(&mut out, sources, meta.as_deref());
    render_process(&mut out, sources);
    if let Some(observer) = handle.inner.observer.get().filter(|o| o.exports()) {
        family(
            &mut out,
            "reassigned_otlp_spans_exported_total",
            "counter",
            "Trace spans the OTLP collector accepted.",
        );
        let _ = writeln!(
            out,
            "reassigned_otlp_spans_exported_total {}",
            observer.stats().exported()
        );
        family(
            &mut out,
            "reassigned_otlp_spans_dropped_total",
            "counter",
            "Trace spans dropped: export queue full, or the collector refused or could not be reached.",
        );
        let _ = writeln!(
            out,
            "reassigned_otlp_spans_dropped_total {}",
            observer.stats().dropped()
        );
    }
    out
}

/// `# HELP` and `# TYPE` of a family.
pub(crate) fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// The samples of one histogram series: `labels` without braces, `""` for
/// none.
fn histogram_samples(out: &mut String, name: &str, labels: &str, reading: &HistogramReading) {
    let sep = if labels.is_empty() { "" } else { "," };
    for (bound, count) in LATENCY_BOUNDS.iter().zip(reading.cumulative) {
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {count}");
    }
    let count = reading.count();
    let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
    let braces = if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    };
    let _ = writeln!(out, "{name}_sum{braces} {}", reading.sum_seconds);
    let _ = writeln!(out, "{name}_count{braces} {count}");
}

/// The go-grpc-prometheus families and the in-flight gauge. Every method
/// of the API is listed (zeros included, so dashboards and alerts see it
/// before its first call); health and `unknown` once called.
fn render_grpc(out: &mut String, handle: &MetricsHandle) {
    let inner = &handle.inner;
    let listed: Vec<(usize, String)> = (0..methods::LABEL_COUNT)
        .filter(|&i| i < methods::METHODS.len() || inner.started[i].load(Ordering::Relaxed) > 0)
        .map(|i| {
            let (kind, service, method) = grpc_labels(i);
            (
                i,
                format!("grpc_type=\"{kind}\",grpc_service=\"{service}\",grpc_method=\"{method}\""),
            )
        })
        .collect();
    family(
        out,
        "grpc_server_started_total",
        "counter",
        "gRPC calls started on the server.",
    );
    for (i, labels) in &listed {
        let n = inner.started[*i].load(Ordering::Relaxed);
        let _ = writeln!(out, "grpc_server_started_total{{{labels}}} {n}");
    }
    family(
        out,
        "grpc_server_handled_total",
        "counter",
        "gRPC calls finished on the server, by gRPC code (grpc-go spelling; none: no status).",
    );
    for (i, labels) in &listed {
        for (column, counter) in inner.requests[*i].iter().enumerate() {
            let n = counter.load(Ordering::Relaxed);
            if n > 0 || (column == 0 && *i < methods::METHODS.len()) {
                let code = GO_CODE_NAMES[column];
                let _ = writeln!(
                    out,
                    "grpc_server_handled_total{{{labels},grpc_code=\"{code}\"}} {n}"
                );
            }
        }
    }
    family(
        out,
        "grpc_server_handling_seconds",
        "histogram",
        "Time from the call's arrival to its status (streams: to their end), seconds.",
    );
    for (i, labels) in &listed {
        histogram_samples(
            out,
            "grpc_server_handling_seconds",
            labels,
            &inner.latency[*i].read(),
        );
    }
    family(
        out,
        "reassigned_requests_in_flight",
        "gauge",
        "gRPC calls in progress on the server.",
    );
    for (i, labels) in &listed {
        let n = inner.in_flight[*i].load(Ordering::Relaxed).max(0);
        let _ = writeln!(out, "reassigned_requests_in_flight{{{labels}}} {n}");
    }
}

/// The REST face's families (only while it is served): every route's
/// answers listed from the start (`200` zeros for the routes' methods) so
/// rates and alerts see them before the first call; any other pair once
/// seen.
fn render_rest(out: &mut String, handle: &MetricsHandle) {
    let rest = &handle.inner.rest;
    if !rest.on.load(Ordering::Relaxed) {
        return;
    }
    let listed: Vec<usize> = (0..REST_ROUTES)
        .filter(|&r| {
            r < crate::rest::ROUTES.len()
                || rest.in_flight[r].load(Ordering::Relaxed) != 0
                || rest.latency[r].read().count() > 0
        })
        .collect();
    family(
        out,
        "http_server_requests_total",
        "counter",
        "REST calls (--rest-listen) answered, by route, HTTP method and status code (none: no response, the client went away).",
    );
    for &route in &listed {
        let label = crate::rest::route_label(route);
        // The method each route serves (zeros listed for it).
        let served = if label == crate::rest::OPENAPI_PATH {
            "GET"
        } else {
            "POST"
        };
        for (m, method) in HTTP_METHODS.iter().enumerate() {
            for column in 0..HTTP_STATUSES {
                let n = rest.cell(route, m, column).load(Ordering::Relaxed);
                let zero_listed = column == 200 && *method == served && route < crate::rest::ROUTES.len();
                if n > 0 || zero_listed {
                    let code = if column == 0 {
                        "none".to_owned()
                    } else {
                        column.to_string()
                    };
                    let _ = writeln!(
                        out,
                        "http_server_requests_total{{route=\"{label}\",method=\"{method}\",code=\"{code}\"}} {n}"
                    );
                }
            }
        }
    }
    family(
        out,
        "http_server_request_duration_seconds",
        "histogram",
        "Time from a REST call's arrival to its answer, by route, seconds.",
    );
    for &route in &listed {
        let labels = format!("route=\"{}\"", crate::rest::route_label(route));
        histogram_samples(
            out,
            "http_server_request_duration_seconds",
            &labels,
            &rest.latency[route].read(),
        );
    }
    family(
        out,
        "http_server_requests_in_flight",
        "gauge",
        "REST calls in progress, by route.",
    );
    for &route in &listed {
        let n = rest.in_flight[route].load(Ordering::Relaxed).max(0);
        let label = crate::rest::route_label(route);
        let _ = writeln!(out, "http_server_requests_in_flight{{route=\"{label}\"}} {n}");
    }
}

/// Refusals of the auth layer (certificate, token, scope) and of quotas.
fn render_refusals(out: &mut String, handle: &MetricsHandle, sources: &Sources) {
    family(
        out,
        "reassigned_auth_refusals_total",
        "counter",
        "Calls refused before the handler: no certificate identity, unknown method, missing scope, or the token's reason (token_*).",
    );
    for (i, reason) in REFUSAL_REASONS.iter().enumerate() {
        let n = handle.inner.refusals.refused(i);
        let _ = writeln!(out, "reassigned_auth_refusals_total{{reason=\"{reason}\"}} {n}");
    }
    family(
        out,
        "reassigned_quota_refusals_total",
        "counter",
        "Calls refused by a per-platform quota, by kind (rate, daily: RESOURCE_EXHAUSTED; quota_store_down: UNAVAILABLE with fail-closed).",
    );
    for kind in QuotaKind::ALL {
        let n = sources.quotas.as_ref().map_or(0, |q| q.refused(kind));
        let _ = writeln!(
            out,
            "reassigned_quota_refusals_total{{kind=\"{}\"}} {n}",
            kind.label()
        );
    }
}

/// Store call latency and errors (this server's store only), imports,
/// the mirror's date as a timestamp.
fn render_store(out: &mut String, sources: &Sources, meta: Option<&crate::domain::MirrorMeta>) {
    let calls = store_calls::calls();
    let backend: Backend = sources.store.backend();
    let store = backend.label();
    family(
        out,
        "reassigned_store_call_seconds",
        "histogram",
        "Latency of the server's store calls (lookups, health pings, metadata reads), seconds; lookups answered in process count as 0.",
    );
    for op in Op::ALL {
        let labels = format!("store=\"{store}\",op=\"{}\"", op.label());
        histogram_samples(
            out,
            "reassigned_store_call_seconds",
            &labels,
            &calls.latency(backend, op),
        );
    }
    family(
        out,
        "reassigned_store_errors_total",
        "counter",
        "Store calls that failed, by op and kind (timeout, unavailable, conflict, corrupt).",
    );
    for op in Op::ALL {
        for (k, kind) in ERROR_KINDS.iter().enumerate() {
            let n = calls.errors(backend, op, k);
            let _ = writeln!(
                out,
                "reassigned_store_errors_total{{store=\"{store}\",op=\"{}\",kind=\"{kind}\"}} {n}",
                op.label()
            );
        }
    }
    render_imports(out);
    family(
        out,
        "reassigned_mirror_as_of_timestamp_seconds",
        "gauge",
        "Start (00:00 UTC) of the day the mirror's data is complete through, Unix seconds (0 when not loaded).",
    );
    let as_of = meta.map_or(0, |m| i64::from(m.as_of.days()) * 86_400);
    let _ = writeln!(out, "reassigned_mirror_as_of_timestamp_seconds {as_of}");
}

/// The register files this process applied (the embedded store's
/// re-sync in a server; every run of `reassigned sync`).
pub(crate) fn render_imports(out: &mut String) {
    let calls = store_calls::calls();
    family(
        out,
        "reassigned_import_runs_total",
        "counter",
        "Register files this process applied (result ok) or refused/failed (result error), by kind.",
    );
    family(
        out,
        "reassigned_import_records_applied_total",
        "counter",
        "Records of the register files this process applied, by kind.",
    );
    for kind in [Kind::Snapshot, Kind::Delta] {
        let k = kind.as_str();
        for (ok, result) in [(true, "ok"), (false, "error")] {
            let n = calls.imports(kind, ok);
            let _ = writeln!(
                out,
                "reassigned_import_runs_total{{kind=\"{k}\",result=\"{result}\"}} {n}"
            );
        }
        let n = calls.records_applied(kind);
        let _ = writeln!(out, "reassigned_import_records_applied_total{{kind=\"{k}\"}} {n}");
    }
}

/// Build info, the server certificate's expiry and the process figures
/// (Linux `/proc`; a figure that cannot be read is left out).
fn render_process(out: &mut String, sources: &Sources) {
    render_build_info(out);
    if let Some(reloader) = &sources.tls {
        family(
            out,
            "reassigned_tls_certificate_not_after_timestamp_seconds",
            "gauge",
            "End of validity of the server certificate in service, Unix seconds.",
        );
        let not_after = reloader.tls().summary().not_after_unix;
        let _ = writeln!(
            out,
            "reassigned_tls_certificate_not_after_timestamp_seconds {not_after}"
        );
    }
    render_process_figures(out);
}

/// `reassigned_build_info`.
pub(crate) fn render_build_info(out: &mut String) {
    family(
        out,
        "reassigned_build_info",
        "gauge",
        "Always 1; the labels name the version and the git commit it was built from.",
    );
    let _ = writeln!(
        out,
        "reassigned_build_info{{version=\"{}\",git_sha=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        env!("REASSIGNED_GIT_SHA")
    );
}

/// The standard `process_*` figures (Linux `/proc`; a figure that cannot
/// be read is left out).
pub(crate) fn render_process_figures(out: &mut String) {
    if let Some(p) = ProcessFigures::read() {
        let mut gauge = |name: &str, kind: &str, help: &str, value: f64| {
            family(out, name, kind, help);
            let _ = writeln!(out, "{name} {value}");
        };
        gauge(
            "process_cpu_seconds_total",
            "counter",
            "User and system CPU time spent, seconds.",
            p.cpu_seconds,
        );
        gauge(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size, bytes.",
            p.resident_bytes,
        );
        gauge(
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size, bytes.",
            p.virtual_bytes,
        );
        gauge(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since the Unix epoch, seconds.",
            p.start_time_seconds,
        );
        if let Some(fds) = p.open_fds {
            gauge("process_open_fds", "gauge", "Open file descriptors.", fds);
        }
        if let Some(max) = p.max_fds {
            gauge(
                "process_max_fds",
                "gauge",
                "Limit of open file descriptors (soft).",
                max,
            );
        }
    }
}

/// The figures of the standard `process_*` metrics, from `/proc/self`.
struct ProcessFigures {
    cpu_seconds: f64,
    resident_bytes: f64,
    virtual_bytes: f64,
    start_time_seconds: f64,
    open_fds: Option<f64>,
    max_fds: Option<f64>,
}

impl ProcessFigures {
    fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command name (which may hold spaces and
        // parentheses): state is field 3 of proc(5), so index 0 here.
        let rest = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| -> Option<f64> { fields.get(n - 3)?.parse::<f64>().ok() };
        let ticks = rustix::param::clock_ticks_per_second() as f64;
        let page = rustix::param::page_size() as f64;
        let boot_time = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<f64>().ok())
        })?;
        let open_fds = std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count() as f64);
        let max_fds = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .map(|n| n as f64);
        Some(Self {
            cpu_seconds: (field(14)? + field(15)?) / ticks,
            virtual_bytes: field(23)?,
            resident_bytes: field(24)? * page,
            start_time_seconds: boot_time + field(22)? / ticks,
            open_fds,
            max_fds,
        })
    }
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

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let method = methods::label_index(req.uri().path());
        self.handle.start(method);
        let observed = self.handle.inner.observer.get().map(|o| o.start(&mut req));
        CountFuture {
            call: self.inner.call(req),
            method,
            started: Instant::now(),
            handle: Some(self.handle.clone()),
            observed,
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`Count`] (no allocation per call). Dropped
    /// before it finished (the client went away while the handler ran),
    /// the call counts as `none`.
    pub struct CountFuture<F> {
        #[pin]
        call: F,
        method: usize,
        started: Instant,
        // `Some` until the response (or the error) passes.
        handle: Option<MetricsHandle>,
        // The access log's and trace's part, when they are on.
        observed: Option<Box<Observed>>,
    }

    impl<F> PinnedDrop for CountFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            finish(this.handle, *this.method, NO_CODE, *this.started, this.observed);
        }
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
        let (method, started) = (*this.method, *this.started);
        let Some(handle) = this.handle.take() else {
            return Poll::Pending;
        };
        let observed = this.observed.take();
        Poll::Ready(match result {
            Ok(response) => {
                // A trailers-only response (errors) carries the status
                // in its headers; others in the trailers of the body.
                let (pending, observed) = match status_of(response.headers()) {
                    Some(code) => {
                        handle.count(method, code, started, observed);
                        (None, None)
                    }
                    None => (Some(handle), observed),
                };
                Ok(response.map(|body| CountBody {
                    inner: body,
                    method,
                    started,
                    pending,
                    observed,
                }))
            }
            Err(e) => {
                handle.count(method, NO_CODE, started, observed);
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
        started: Instant,
        // `Some` until the call is counted.
        pending: Option<MetricsHandle>,
        observed: Option<Box<Observed>>,
    }

    impl<B> PinnedDrop for CountBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            finish(this.pending, *this.method, NO_CODE, *this.started, this.observed);
        }
    }
}

/// Counts the call once, with `code`.
fn finish(
    pending: &mut Option<MetricsHandle>,
    method: usize,
    code: usize,
    started: Instant,
    observed: &mut Option<Box<Observed>>,
) {
    if let Some(handle) = pending.take() {
        handle.count(method, code, started, observed.take());
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
        let (method, started) = (*this.method, *this.started);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    let code = status_of(trailers).unwrap_or(NO_CODE);
                    finish(this.pending, method, code, started, this.observed);
                }
            }
            Poll::Ready(Some(Err(_)) | None) => {
                finish(this.pending, method, NO_CODE, started, this.observed);
            }
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
            quotas: None,
            tls: None,
        };
        render(handle, &sources)
            .lines()
            .filter(|l| l.starts_with("reassigned_requests_total"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}
