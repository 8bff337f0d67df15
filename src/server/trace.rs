//! Per-call observation, off by default: the access log line
//! (`--access-log`) and a trace span per call exported over OTLP/gRPC
//! (`--otlp-endpoint`), for both faces: gRPC and REST (`--rest-listen`).
//!
//! [`metrics::CountLayer`](crate::server::metrics::CountLayer) calls
//! [`Observer::start`] when a gRPC call arrives (only if an observer is set)
//! and [`Observer::finish`] when its status is known; the REST port does the
//! same with [`Observer::start_rest`] and [`Observer::finish_rest`]. The
//! caller's W3C `traceparent` (gRPC metadata, HTTP header) parents the span;
//! without one the call starts a trace. Spans go to a bounded queue that a
//! background task drains in batches ([`MAX_BATCH`] spans, or every
//! [`FLUSH_INTERVAL`]) to the collector with the project's own tonic client:
//! a request never waits on the collector, and spans that do not fit (queue
//! full, collector down) are dropped and counted. At shutdown the server
//! flushes what is still queued ([`Observer::flush`], bounded). No attribute
//! carries a phone number, its hash, or a token.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot};

use crate::api::methods;
use crate::api::note::CallNote;
use crate::audit::NumberKey;
use crate::identity::PeerInfo;

/// The OTLP trace export messages and service (a wire-compatible subset of
/// opentelemetry-proto; see `proto/otlp/trace_export.proto`).
#[allow(missing_docs, clippy::all, clippy::pedantic, clippy::unwrap_used)]
pub mod otlp {
    tonic::include_proto!("opentelemetry.proto.collector.trace.v1");
}

/// Spans waiting for export; more are dropped (and counted).
pub const QUEUE: usize = 4096;
/// Most spans in one export request.
pub const MAX_BATCH: usize = 512;
/// Longest a span waits in the queue before its batch is sent.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// Bound of one export request.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest the server waits at shutdown for the spans still queued to
/// reach the collector ([`Observer::flush`]).
pub const SHUTDOWN_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// The metadata key of W3C trace context.
pub const TRACEPARENT: &str = "traceparent";

/// A parsed W3C `traceparent`: trace id, parent span id, flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace id (16 bytes, not all zero).
    pub trace_id: [u8; 16],
    /// The caller's span id (8 bytes, not all zero).
    pub parent_id: [u8; 8],
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

impl TraceParent {
    /// Parses `version-traceid-parentid-flags` (W3C Trace Context level 1):
    /// lowercase hex, version `ff` and all-zero ids refused; a future
    /// version may carry more fields after the flags.
    pub fn parse(value: &str) -> Option<Self> {
        let mut parts = value.trim().split('-');
        let version = parts.next()?;
        let (trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?);
        if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
            return None;
        }
        let hex_of = |s: &str, out: &mut [u8]| -> Option<()> {
            let lower = s
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            (lower && s.len() == out.len() * 2).then_some(())?;
            hex::decode_to_slice(s, out).ok()
        };
        let mut v = [0u8; 1];
        hex_of(version, &mut v)?;
        let mut trace_id = [0u8; 16];
        let mut parent_id = [0u8; 8];
        let mut f = [0u8; 1];
        hex_of(trace, &mut trace_id)?;
        hex_of(parent, &mut parent_id)?;
        hex_of(flags, &mut f)?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            parent_id,
            flags: f[0],
        })
    }
}

/// What is kept of a call between [`Observer::start`] and
/// [`Observer::finish`].
#[derive(Debug)]
pub struct Observed {
    note: CallNote,
    platform: Option<String>,
    request_id: String,
    parent: Option<TraceParent>,
    trace_id: [u8; 16],
    span_id: [u8; 8],
    start: SystemTime,
}

/// Counters of the trace export.
#[derive(Debug, Default)]
pub struct ExportStats {
    exported: AtomicU64,
    dropped: AtomicU64,
}

impl ExportStats {
    /// Spans the collector accepted.
    pub fn exported(&self) -> u64 {
        self.exported.load(Ordering::Relaxed)
    }

    /// Spans dropped: queue full, or the export failed.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// What the export task's queue carries: spans, and flush requests that
/// are answered once every span queued before them went out.
#[derive(Debug)]
enum Queued {
    Span(otlp::Span),
    Flush(oneshot::Sender<()>),
}

/// The access log and the trace export of one server.
#[derive(Debug)]
pub struct Observer {
    key: Arc<NumberKey>,
    access_log: bool,
    spans: Option<mpsc::Sender<Queued>>,
    stats: Arc<ExportStats>,
}

/// How [`Observer::flush`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flushed {
    /// Every span queued before the flush was sent (accepted, or counted
    /// dropped if the collector refused or failed).
    Done,
    /// The bound passed first: about this many spans were still queued.
    TimedOut {
        /// Spans still in the queue when the bound passed.
        queued: usize,
    },
}

impl Observer {
    /// An observer writing access log lines if `access_log`, and exporting
    /// spans to `otlp_endpoint` if set (its task runs until the observer is
    /// dropped); `None` if both are off. Numbers are hashed with `key`.
    /// Must run inside a Tokio runtime.
    pub fn start_with(
        access_log: bool,
        otlp_endpoint: Option<&str>,
        key: NumberKey,
    ) -> anyhow::Result<Option<Arc<Self>>> {
        if !access_log && otlp_endpoint.is_none() {
            return Ok(None);
        }
        let stats = Arc::new(ExportStats::default());
        let spans = match otlp_endpoint {
            Some(endpoint) => {
                let channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned())?
                    .timeout(EXPORT_TIMEOUT)
                    .connect_timeout(EXPORT_TIMEOUT)
                    .connect_lazy();
                let (tx, rx) = mpsc::channel(QUEUE);
                tokio::spawn(export(
                    otlp::trace_service_client::TraceServiceClient::new(channel),
                    rx,
                    stats.clone(),
                ));
                tracing::info!("traces: exporting spans over OTLP/gRPC");
                Some(tx)
            }
            None => None,
        };
        if access_log {
            tracing::info!("access log: on (target reassigned::access)");
        }
        Ok(Some(Arc::new(Self {
            key: Arc::new(key),
            access_log,
            spans,
            stats,
        })))
    }

    /// The export counters.
    pub fn stats(&self) -> &ExportStats {
        &self.stats
    }

    /// Whether spans are exported.
    pub fn exports(&self) -> bool {
        self.spans.is_some()
    }

    /// Starts observing the gRPC call `req`: reads its platform, request id
    /// and `traceparent`, gives the request an `x-request-id` if it has none
    /// (so receipts and audit records carry the same id) and a
    /// [`CallNote`] for the handler.
    pub fn start<B>(&self, req: &mut http::Request<B>) -> Box<Observed> {
        let request_id = match crate::api::usable_request_id(
            req.headers()
                .get(crate::api::REQUEST_ID_HEADER)
                .and_then(|v| v.to_str().ok()),
        ) {
            Some(id) => id.to_owned(),
            None => {
                let id = new_request_id();
                if let Ok(value) = http::HeaderValue::from_str(&id) {
                    req.headers_mut().insert(crate::api::REQUEST_ID_HEADER, value);
                }
                id
            }
        };
        self.observe(req, request_id)
    }

    /// Starts observing the REST call `req` (its connection's
    /// [`PeerInfo`] already in its extensions): like [`Observer::start`],
    /// with CAMARA's `x-correlator` as the request id. A request without one
    /// is given a generated one, which the face then echoes in its response
    /// and hands to receipts and the audit trail: the client can quote it.
    /// One the face will refuse (not CAMARA's pattern) is left as it is and
    /// logged under a generated id.
    pub fn start_rest<B>(&self, req: &mut http::Request<B>) -> Box<Observed> {
        let correlator = req.headers().get(crate::rest::CORRELATOR_HEADER);
        let request_id = match correlator {
            Some(value) => {
                crate::api::usable_request_id(value.to_str().ok()).map_or_else(new_request_id, str::to_owned)
            }
            None => {
                let id = new_request_id();
                if let Ok(value) = http::HeaderValue::from_str(&id) {
                    req.headers_mut().insert(crate::rest::CORRELATOR_HEADER, value);
                }
                id
            }
        };
        self.observe(req, request_id)
    }

    /// The observation of `req` under `request_id`: its platform and
    /// `traceparent`, a [`CallNote`] put in its extensions for the handler.
    fn observe<B>(&self, req: &mut http::Request<B>, request_id: String) -> Box<Observed> {
        let parent = req
            .headers()
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(TraceParent::parse);
        let platform = req
            .extensions()
            .get::<PeerInfo>()
            .and_then(|p| p.platform.as_ref())
            .map(|p| p.id.clone());
        let note = CallNote::new(self.key.clone());
        req.extensions_mut().insert(note.clone());
        Box::new(Observed {
            note,
            platform,
            request_id,
            trace_id: parent.map_or_else(rand::random, |p| p.trace_id),
            parent,
            span_id: loop {
                let id: [u8; 8] = rand::random();
                if id != [0; 8] {
                    break id;
                }
            },
            start: SystemTime::now(),
        })
    }

    /// Ends the observation of a gRPC call to the metrics label `method`
    /// that ended with `code` (`None`: no status) after `elapsed`.
    pub fn finish(&self, call: Box<Observed>, method: usize, code: Option<tonic::Code>, elapsed: Duration) {
        let code_name = code.map_or("none", methods::code_name);
        let store = call.note.store_time();
        if self.access_log {
            access_line(
                &call,
                "grpc",
                methods::label(method),
                "-",
                &code_name,
                elapsed,
                store,
            );
        }
        if self.samples(&call) {
            self.queue(span_of(&call, method, code, code_name, store, elapsed));
        }
    }

    /// Ends the observation of a REST call: `http_method` (the metrics'
    /// label: a standard method, else `_OTHER`) on `route` (a label of
    /// [`crate::rest::ROUTES`], or `other`), answered with `status` (`None`:
    /// no response, the client went away) after `elapsed`. The access line
    /// has the gRPC line's fields, with `protocol="rest"`, the HTTP method,
    /// the `route`, and the status code as `code`.
    pub fn finish_rest(
        &self,
        call: Box<Observed>,
        http_method: &'static str,
        route: &'static str,
        status: Option<u16>,
        elapsed: Duration,
    ) {
        let store = call.note.store_time();
        if self.access_log {
            let code = status.map_or_else(|| "none".to_owned(), |s| s.to_string());
            access_line(
                &call,
                "rest",
                http_method,
                route,
                &tracing::field::display(&code),
                elapsed,
                store,
            );
        }
        if self.samples(&call) {
            self.queue(rest_span_of(&call, http_method, route, status, store, elapsed));
        }
    }

    /// Whether `call` gets a span: spans are exported, and the caller did
    /// not decide against sampling its trace.
    fn samples(&self, call: &Observed) -> bool {
        self.spans.is_some() && call.parent.is_none_or(|p| p.flags & 1 != 0)
    }

    /// Queues `span` for export, or counts it dropped if the queue is full.
    fn queue(&self, span: otlp::Span) {
        if let Some(spans) = &self.spans
            && spans.try_send(Queued::Span(span)).is_err()
        {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Sends every span queued so far to the collector, waiting at most
    /// `within` (at shutdown: [`SHUTDOWN_FLUSH_TIMEOUT`]); spans of calls
    /// that end later are exported as usual. Without trace export there
    /// is nothing to flush.
    pub async fn flush(&self, within: Duration) -> Flushed {
        let Some(queue) = &self.spans else {
            return Flushed::Done;
        };
        let (done_tx, done_rx) = oneshot::channel();
        let flushed = tokio::time::timeout(within, async {
            queue.send(Queued::Flush(done_tx)).await.is_ok() && done_rx.await.is_ok()
        })
        .await;
        match flushed {
            Ok(true) => Flushed::Done,
            // The export task is gone (runtime shutting down): nothing
            // more can be sent.
            Ok(false) | Err(_) => Flushed::TimedOut {
                queued: queue.max_capacity() - queue.capacity(),
            },
        }
    }
}

/// A fresh request id: 128 random bits in hex (valid as `x-request-id` and
/// as CAMARA's `x-correlator`).
fn new_request_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn attribute(key: &str, value: otlp::any_value::Value) -> otlp::KeyValue {
    otlp::KeyValue {
        key: key.to_owned(),
        value: Some(otlp::AnyValue { value: Some(value) }),
    }
}

/// The span of a finished call (OpenTelemetry RPC conventions: name
/// `package.Service/Method`, `rpc.*` attributes; ours under `reassigned.*`).
fn span_of(
    call: &Observed,
    method: usize,
    code: Option<tonic::Code>,
    code_name: &str,
    store: Option<Duration>,
    elapsed: Duration,
) -> otlp::Span {
    use otlp::any_value::Value;
    let path = methods::METHODS
        .get(method)
        .map(|m| m.path)
        .or_else(|| {
            method
                .checked_sub(methods::METHODS.len())
                .and_then(|i| methods::EXEMPT_LABELS.get(i))
                .map(|(p, _)| *p)
        })
        .unwrap_or("/unknown/unknown");
    let name = path.trim_start_matches('/');
    let (service, rpc_method) = name.split_once('/').unwrap_or(("unknown", "unknown"));
    let mut attributes = vec![
        attribute("rpc.system", Value::StringValue("grpc".into())),
        attribute("rpc.service", Value::StringValue(service.into())),
        attribute("rpc.method", Value::StringValue(rpc_method.into())),
        attribute("reassigned.code", Value::StringValue(code_name.into())),
        attribute(
            "reassigned.request_id",
            Value::StringValue(call.request_id.clone()),
        ),
        attribute(
            "reassigned.numbers",
            Value::IntValue(i64::try_from(call.note.number_count()).unwrap_or(i64::MAX)),
        ),
    ];
    if let Some(code) = code {
        attributes.push(attribute("rpc.grpc.status_code", Value::IntValue(code as i64)));
    }
    if let Some(platform) = &call.platform {
        attributes.push(attribute(
            "reassigned.platform",
            Value::StringValue(platform.clone()),
        ));
    }
    if let Some(store) = store {
        attributes.push(attribute(
            "reassigned.store_seconds",
            Value::DoubleValue(store.as_secs_f64()),
        ));
    }
    let failed = !matches!(code, Some(tonic::Code::Ok));
    span_with(call, name.to_owned(), attributes, failed, elapsed)
}

/// The span of a finished REST call (OpenTelemetry HTTP conventions: name
/// `METHOD route`, `http.*` attributes, error only for 5xx or no response;
/// ours under `reassigned.*`).
fn rest_span_of(
    call: &Observed,
    http_method: &str,
    route: &str,
    status: Option<u16>,
    store: Option<Duration>,
    elapsed: Duration,
) -> otlp::Span {
    use otlp::any_value::Value;
    let mut attributes = vec![
        attribute("http.request.method", Value::StringValue(http_method.into())),
        attribute("http.route", Value::StringValue(route.into())),
        attribute("url.scheme", Value::StringValue("https".into())),
        attribute(
            "reassigned.request_id",
            Value::StringValue(call.request_id.clone()),
        ),
        attribute(
            "reassigned.numbers",
            Value::IntValue(i64::try_from(call.note.number_count()).unwrap_or(i64::MAX)),
        ),
    ];
    if let Some(status) = status {
        attributes.push(attribute(
            "http.response.status_code",
            Value::IntValue(i64::from(status)),
        ));
    }
    if let Some(platform) = &call.platform {
        attributes.push(attribute(
            "reassigned.platform",
            Value::StringValue(platform.clone()),
        ));
    }
    if let Some(store) = store {
        attributes.push(attribute(
            "reassigned.store_seconds",
            Value::DoubleValue(store.as_secs_f64()),
        ));
    }
    let failed = status.is_none_or(|s| s >= 500);
    span_with(
        call,
        format!("{http_method} {route}"),
        attributes,
        failed,
        elapsed,
    )
}

/// The span of `call` named `name` with `attributes`, status error if
/// `failed`.
fn span_with(
    call: &Observed,
    name: String,
    attributes: Vec<otlp::KeyValue>,
    failed: bool,
    elapsed: Duration,
) -> otlp::Span {
    let start = unix_nanos(call.start);
    otlp::Span {
        trace_id: call.trace_id.to_vec(),
        span_id: call.span_id.to_vec(),
        parent_span_id: call.parent.map(|p| p.parent_id.to_vec()).unwrap_or_default(),
        name,
        kind: otlp::SpanKind::Server as i32,
        start_time_unix_nano: start,
        end_time_unix_nano: start.saturating_add(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX)),
        attributes,
        status: Some(otlp::Status {
            message: String::new(),
            code: if failed {
                otlp::StatusCode::Error as i32
            } else {
                otlp::StatusCode::Unset as i32
            },
        }),
        flags: u32::from(call.parent.map_or(1, |p| p.flags)),
        ..Default::default()
    }
}

/// The export task: batches from `queue` to the collector until the
/// observer (the sender) is dropped; a flush request sends the batch at
/// once and is answered after it.
async fn export(
    mut client: otlp::trace_service_client::TraceServiceClient<tonic::transport::Channel>,
    mut queue: mpsc::Receiver<Queued>,
    stats: Arc<ExportStats>,
) {
    let resource = otlp::Resource {
        attributes: vec![
            attribute(
                "service.name",
                otlp::any_value::Value::StringValue("reassigned".into()),
            ),
            attribute(
                "service.version",
                otlp::any_value::Value::StringValue(env!("CARGO_PKG_VERSION").into()),
            ),
        ],
        dropped_attributes_count: 0,
    };
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        match queue.recv().await {
            None => return,
            Some(Queued::Span(span)) => batch.push(span),
            Some(Queued::Flush(done)) => {
                // Nothing queued before it.
                let _ = done.send(());
                continue;
            }
        }
        let mut flush = None;
        let deadline = tokio::time::Instant::now() + FLUSH_INTERVAL;
        while batch.len() < MAX_BATCH {
            match tokio::time::timeout_at(deadline, queue.recv()).await {
                Ok(Some(Queued::Span(span))) => batch.push(span),
                Ok(Some(Queued::Flush(done))) => {
                    flush = Some(done);
                    break;
                }
                Ok(None) | Err(_) => break,
            }
        }
        send_batch(&mut client, &resource, std::mem::take(&mut batch), &stats).await;
        if let Some(done) = flush {
            let _ = done.send(());
        }
    }
}

/// Sends one batch of spans, counting them exported or dropped.
async fn send_batch(
    client: &mut otlp::trace_service_client::TraceServiceClient<tonic::transport::Channel>,
    resource: &otlp::Resource,
    spans: Vec<otlp::Span>,
    stats: &ExportStats,
) {
    let count = spans.len() as u64;
    let request = otlp::ExportTraceServiceRequest {
        resource_spans: vec![otlp::ResourceSpans {
            resource: Some(resource.clone()),
            scope_spans: vec![otlp::ScopeSpans {
                scope: Some(otlp::InstrumentationScope {
                    name: "reassigned".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                }),
                spans,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    };
    match client.export(request).await {
        Ok(response) => {
            let rejected = response
                .into_inner()
                .partial_success
                .map_or(0, |p| u64::try_from(p.rejected_spans).unwrap_or(0));
            stats
                .exported
                .fetch_add(count.saturating_sub(rejected), Ordering::Relaxed);
            stats.dropped.fetch_add(rejected.min(count), Ordering::Relaxed);
        }
        Err(status) => {
            stats.dropped.fetch_add(count, Ordering::Relaxed);
            if let Some(suppressed) = crate::lograte::global().check("otlp_export_failed") {
                tracing::warn!(code = ?status.code(), spans = count, suppressed, "traces: export failed, spans dropped");
            }
        }
    }
}

/// Writes the access line of one call (target `reassigned::access`, at
/// info): the same fields for both faces; `route` is `-` on gRPC and the
/// route label on REST, `code` the gRPC code name (a string) or the HTTP
/// status (a bare number).
fn access_line(
    call: &Observed,
    protocol: &'static str,
    method: &str,
    route: &str,
    code: &dyn tracing::Value,
    elapsed: Duration,
    store: Option<Duration>,
) {
    tracing::info!(
        target: "reassigned::access",
        protocol,
        platform = call.platform.as_deref().unwrap_or("-"),
        method,
        route,
        code,
        latency_us = elapsed.as_micros() as u64,
        request_id = %call.request_id,
        number_hmac = call.note.number_hmac().unwrap_or("-"),
        numbers = call.note.number_count(),
        store_us = store.map_or(0, |d| d.as_micros() as u64),
        trace_id = %hex::encode(call.trace_id),
        "call"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_parsed_as_w3c_says() {
        let tp =
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").expect("valid");
        assert_eq!(hex::encode(tp.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex::encode(tp.parent_id), "00f067aa0ba902b7");
        assert_eq!(tp.flags, 1);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
        // A later version may append fields.
        assert!(TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x").is_some());
    }
}
