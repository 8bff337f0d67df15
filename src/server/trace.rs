//! Per-call observation, off by default: the access log line
//! (`--access-log`) and a trace span per call exported over OTLP/gRPC
//! (`--otlp-endpoint`).
//!
//! [`metrics::CountLayer`](crate::server::metrics::CountLayer) calls
//! [`Observer::start`] when a call arrives (only if an observer is set) and
//! [`Observer::finish`] when its status is known. The caller's W3C
//! `traceparent` (gRPC metadata) parents the span; without one the call
//! starts a trace. Spans go to a bounded queue that a background task
//! drains in batches ([`MAX_BATCH`] spans, or every [`FLUSH_INTERVAL`]) to
//! the collector with the project's own tonic client: a request never waits
//! on the collector, and spans that do not fit (queue full, collector down)
//! are dropped and counted. No attribute carries a phone number, its hash,
//! or a token.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;

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

/// The access log and the trace export of one server.
#[derive(Debug)]
pub struct Observer {
    key: Arc<NumberKey>,
    access_log: bool,
    spans: Option<mpsc::Sender<otlp::Span>>,
    stats: Arc<ExportStats>,
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

    /// Starts observing the call `req`: reads its platform, request id and
    /// `traceparent`, gives the request an `x-request-id` if it has none
    /// (so receipts and audit records carry the same id) and a
    /// [`CallNote`] for the handler.
    pub fn start<B>(&self, req: &mut http::Request<B>) -> Box<Observed> {
        let headers = req.headers();
        let parent = headers
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(TraceParent::parse);
        let request_id = match crate::api::usable_request_id(
            headers
                .get(crate::api::REQUEST_ID_HEADER)
                .and_then(|v| v.to_str().ok()),
        ) {
            Some(id) => id.to_owned(),
            None => {
                let id = format!("{:032x}", rand::random::<u128>());
                if let Ok(value) = http::HeaderValue::from_str(&id) {
                    req.headers_mut().insert(crate::api::REQUEST_ID_HEADER, value);
                }
                id
            }
        };
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

    /// Ends the observation of a call to the metrics label `method` that
    /// ended with `code` (`None`: no status) after `elapsed`.
    pub fn finish(&self, call: Box<Observed>, method: usize, code: Option<tonic::Code>, elapsed: Duration) {
        let code_name = code.map_or("none", methods::code_name);
        let store = call.note.store_time();
        if self.access_log {
            tracing::info!(
                target: "reassigned::access",
                platform = call.platform.as_deref().unwrap_or("-"),
                method = methods::label(method),
                code = code_name,
                latency_us = elapsed.as_micros() as u64,
                request_id = %call.request_id,
                number_hmac = call.note.number_hmac().unwrap_or("-"),
                numbers = call.note.number_count(),
                store_us = store.map_or(0, |d| d.as_micros() as u64),
                trace_id = %hex::encode(call.trace_id),
                "call"
            );
        }
        let Some(spans) = &self.spans else {
            return;
        };
        // The caller decided not to sample its trace: respect it.
        if call.parent.is_some_and(|p| p.flags & 1 == 0) {
            return;
        }
        let span = span_of(&call, method, code, code_name, store, elapsed);
        if spans.try_send(span).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
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
    let start = unix_nanos(call.start);
    let failed = !matches!(code, Some(tonic::Code::Ok));
    otlp::Span {
        trace_id: call.trace_id.to_vec(),
        span_id: call.span_id.to_vec(),
        parent_span_id: call.parent.map(|p| p.parent_id.to_vec()).unwrap_or_default(),
        name: name.to_owned(),
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

/// The export task: batches from `spans` to the collector until the
/// observer (the sender) is dropped.
async fn export(
    mut client: otlp::trace_service_client::TraceServiceClient<tonic::transport::Channel>,
    mut spans: mpsc::Receiver<otlp::Span>,
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
        let Some(first) = spans.recv().await else {
            return;
        };
        batch.push(first);
        let deadline = tokio::time::Instant::now() + FLUSH_INTERVAL;
        while batch.len() < MAX_BATCH {
            match tokio::time::timeout_at(deadline, spans.recv()).await {
                Ok(Some(span)) => batch.push(span),
                Ok(None) | Err(_) => break,
            }
        }
        let count = batch.len() as u64;
        let request = otlp::ExportTraceServiceRequest {
            resource_spans: vec![otlp::ResourceSpans {
                resource: Some(resource.clone()),
                scope_spans: vec![otlp::ScopeSpans {
                    scope: Some(otlp::InstrumentationScope {
                        name: "reassigned".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                    }),
                    spans: std::mem::take(&mut batch),
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
