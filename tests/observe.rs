//! Per-call observation of a real server (mutual TLS): spans exported over
//! OTLP/gRPC to an in-test collector (a tonic `TraceService`), parented by
//! the caller's W3C `traceparent`, for gRPC and REST calls; the spans still
//! queued at SIGTERM flushed before the process exits, within a bound when
//! the collector stalls; and the access log line (`--access-log`), read
//! from a tracing subscriber of this test process. Neither carries the
//! phone number.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use prost::Message as _;
use reassigned::api::pb::CheckNumberRequest;
use reassigned::server::trace::otlp::trace_service_server::{TraceService, TraceServiceServer};
use reassigned::server::trace::{SHUTDOWN_FLUSH_TIMEOUT, otlp};
use reassigned::store::{AnyStore, EmbeddedStore};
use support::log::{assert_has_all, captured, line_where};
use support::poll::eventually;
use support::server::{TestServer, audit_secret, dead_redis};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

const NUMBER: &str = "+14155550001";
/// The number without its `+`: neither may appear in anything exported.
const DIGITS: &str = "14155550001";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

/// What the collector received: the encoded export requests.
#[derive(Clone, Default)]
struct Collector {
    received: Arc<Mutex<Vec<Vec<u8>>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<otlp::ExportTraceServiceRequest>,
    ) -> Result<Response<otlp::ExportTraceServiceResponse>, Status> {
        let bytes = request.into_inner().encode_to_vec();
        self.received.lock().expect("lock").push(bytes);
        Ok(Response::new(otlp::ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    /// Serves on 127.0.0.1:0 (plain HTTP/2, as OTLP collectors listen).
    async fn start(&self) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
        });
        addr
    }

    fn spans(&self) -> Vec<otlp::Span> {
        self.received
            .lock()
            .expect("lock")
            .iter()
            .flat_map(|b| {
                otlp::ExportTraceServiceRequest::decode(b.as_slice())
                    .expect("decodes")
                    .resource_spans
            })
            .flat_map(|r| r.scope_spans)
            .flat_map(|s| s.spans)
            .collect()
    }
}

fn attr<'a>(span: &'a otlp::Span, key: &str) -> Option<&'a otlp::any_value::Value> {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref()?.value.as_ref())
}

fn check(number: &str) -> Request<CheckNumberRequest> {
    let mut request = Request::new(CheckNumberRequest {
        phone_number: number.into(),
        since: "2024-01-01".into(),
        ..Default::default()
    });
    let traceparent = format!("00-{TRACE_ID}-{PARENT_ID}-01");
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().expect("metadata"));
    request
        .metadata_mut()
        .insert("x-request-id", "req-observe-1".parse().expect("metadata"));
    request
}

#[tokio::test]
async fn a_span_per_call_reaches_the_collector_with_the_callers_trace_id_and_no_number() {
    let collector = Collector::default();
    let endpoint = format!("http://{}", collector.start().await);
    let store = AnyStore::Embedded(Arc::new(EmbeddedStore::new()));
    let server = TestServer::start_without_tokens(store, |s| s.otlp_endpoint = Some(endpoint)).await;
    let mut client = server.client().await;
    // An empty mirror answers, with NO_DATA: the call itself is OK.
    client.check_number(check(NUMBER)).await.expect("check");
    let bad = client
        .check_number(check("not a number"))
        .await
        .expect_err("invalid");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);

    eventually("two spans exported", async || collector.spans().len() >= 2).await;
    let spans = collector.spans();
    let ok = spans
        .iter()
        .find(|s| attr(s, "reassigned.code") == Some(&otlp::any_value::Value::StringValue("OK".into())))
        .expect("the OK call's span");
    assert_eq!(hex::encode(&ok.trace_id), TRACE_ID, "the caller's trace id");
    assert_eq!(
        hex::encode(&ok.parent_span_id),
        PARENT_ID,
        "parented by the caller's span"
    );
    assert_eq!(ok.span_id.len(), 8);
    assert_eq!(ok.name, "reassigned.v1.ReassignedNumbers/CheckNumber");
    assert_eq!(ok.kind, otlp::SpanKind::Server as i32);
    assert!(ok.end_time_unix_nano >= ok.start_time_unix_nano);
    assert_eq!(
        attr(ok, "rpc.method"),
        Some(&otlp::any_value::Value::StringValue("CheckNumber".into()))
    );
    assert_eq!(
        attr(ok, "rpc.grpc.status_code"),
        Some(&otlp::any_value::Value::IntValue(0))
    );
    assert_eq!(
        attr(ok, "reassigned.platform"),
        Some(&otlp::any_value::Value::StringValue(
            "spiffe://dev.reassigned/platform-a".into()
        ))
    );
    assert!(
        matches!(attr(ok, "reassigned.store_seconds"), Some(otlp::any_value::Value::DoubleValue(s)) if *s >= 0.0),
        "{ok:?}"
    );
    let invalid = spans
        .iter()
        .find(|s| attr(s, "rpc.grpc.status_code") == Some(&otlp::any_value::Value::IntValue(3)))
        .expect("the INVALID_ARGUMENT call's span");
    assert_eq!(
        invalid.status.as_ref().map(|s| s.code),
        Some(otlp::StatusCode::Error as i32)
    );
    let bytes: Vec<u8> = collector.received.lock().expect("lock").concat();
    for needle in [NUMBER, DIGITS, "not a number"] {
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "{needle:?} in the exported bytes"
        );
    }
    let text = server.handles.metrics.clone();
    assert_eq!(
        text.requests(
            "/reassigned.v1.ReassignedNumbers/CheckNumber",
            Some(tonic::Code::Ok)
        ),
        1
    );
    server.stop().await;
}

/// The access line of the call with `request_id`, once it is written.
async fn access_line(request_id: &str) -> String {
    line_where("the access line", |l| {
        l.contains(request_id) && l.contains("reassigned::access")
    })
    .await
}

#[tokio::test]
async fn the_access_log_has_one_line_per_call_with_the_audit_keyed_hash_and_no_number() {
    let log = captured();
    let store = AnyStore::Embedded(Arc::new(EmbeddedStore::new()));
    let mut secret_path = None;
    let server = TestServer::start_in(store, |s, dir| {
        s.tokens = Some(false);
        s.access_log = Some(true);
        secret_path = Some(audit_secret(s, dir));
        // No audit sink listens: records are dropped, the answers go on.
        s.audit_redis = Some(dead_redis());
    })
    .await;
    let mut client = server.client().await;
    client.check_number(check(NUMBER)).await.expect("check");
    let hmac = reassigned::audit::NumberKey::from_secret_file(&secret_path.expect("secret"))
        .expect("key")
        .hmac_hex(NUMBER);
    let line = access_line("req-observe-1").await;
    assert_has_all(
        &line,
        &[
            " INFO ",
            "platform=\"spiffe://dev.reassigned/platform-a\"",
            "method=\"CheckNumber\"",
            "code=\"OK\"",
            "request_id=req-observe-1",
            &format!("number_hmac=\"{hmac}\""),
            "numbers=1",
            "latency_us=",
            "store_us=",
            &format!("trace_id={TRACE_ID}"),
        ],
    );
    // A stream of 3 checks: one line when it ends, its numbers counted, no hash.
    let checks: Vec<CheckNumberRequest> = ["+14155550002", "+14155550003", NUMBER]
        .iter()
        .map(|n| check(n).into_inner())
        .collect();
    let mut stream = Request::new(tokio_stream::iter(checks));
    stream
        .metadata_mut()
        .insert("x-request-id", "req-observe-2".parse().expect("metadata"));
    let mut answers = client
        .stream_check_numbers(stream)
        .await
        .expect("stream")
        .into_inner();
    let mut answered = 0;
    while let Some(item) = answers.message().await.expect("item") {
        assert!(item.result.is_some());
        answered += 1;
    }
    assert_eq!(answered, 3);
    let stream_line = access_line("req-observe-2").await;
    assert_has_all(
        &stream_line,
        &[
            "method=\"StreamCheckNumbers\"",
            "code=\"OK\"",
            "numbers=3",
            "number_hmac=\"-\"",
        ],
    );
    let all = String::from_utf8_lossy(&log.lock().expect("lock")).into_owned();
    for digits in [DIGITS, "14155550002", "14155550003"] {
        assert!(!all.contains(digits), "a number appears in the log:\n{all}");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_collector_that_is_down_or_stalled_never_holds_a_call_and_its_spans_are_counted_dropped() {
    // One address where nothing listens, one that accepts and never answers.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let stalled = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let stalled_addr = stalled.local_addr().expect("addr");
    for endpoint in [format!("http://{stalled_addr}"), format!("http://{dead}")] {
        let store = AnyStore::Embedded(Arc::new(EmbeddedStore::new()));
        let server =
            TestServer::start_without_tokens(store, |s| s.otlp_endpoint = Some(endpoint.clone())).await;
        let mut client = server.client().await;
        for _ in 0..3 {
            tokio::time::timeout(
                std::time::Duration::from_secs(3),
                client.check_number(check(NUMBER)),
            )
            .await
            .expect("answered while the collector is unusable")
            .expect("check");
        }
        if endpoint.ends_with(&dead.port().to_string()) {
            let observer = server.handles.metrics.observer().expect("observer");
            eventually("spans counted as dropped", async || {
                observer.stats().dropped() >= 3
            })
            .await;
            assert_eq!(observer.stats().exported(), 0);
        }
        // The shutdown flushes the queue, bounded: a stalled collector
        // delays the stop by the flush timeout at most (plus the stalled
        // export's own timeout, which the flush waits behind), never forever.
        drop(client);
        let stopping = std::time::Instant::now();
        server.stop().await;
        let bound = SHUTDOWN_FLUSH_TIMEOUT + std::time::Duration::from_secs(10);
        assert!(
            stopping.elapsed() < bound,
            "{endpoint}: stopped after {:?}, over {bound:?}",
            stopping.elapsed()
        );
    }
    drop(stalled);
}

/// A REST call (`--rest-listen`, mutual TLS, HTTP/1.1) gets its span too:
/// the caller's `traceparent` header parents it, OpenTelemetry's HTTP
/// names and attributes, no number.
#[tokio::test]
async fn a_rest_call_gets_a_span_parented_by_its_traceparent_header() {
    let collector = Collector::default();
    let endpoint = format!("http://{}", collector.start().await);
    let store = AnyStore::Embedded(Arc::new(EmbeddedStore::new()));
    let server = TestServer::start_without_tokens(store, |s| {
        s.otlp_endpoint = Some(endpoint);
        s.rest_listen = Some(([127, 0, 0, 1], 0).into());
    })
    .await;
    let mut rest = server.rest_client(&server.certs.client("platform-a"), None).await;
    let traceparent = format!("00-{TRACE_ID}-{PARENT_ID}-01");
    let body = serde_json::json!({ "phoneNumber": NUMBER, "specifiedDate": "2024-01-01" }).to_string();
    let response = rest
        .send(
            http::Method::POST,
            reassigned::rest::CHECK_PATH,
            &[("traceparent", &traceparent), ("x-correlator", "rest-span-1")],
            body,
        )
        .await
        .expect("check");
    // An empty mirror cannot answer: 503, a server-side failure.
    assert_eq!(
        response.status,
        http::StatusCode::SERVICE_UNAVAILABLE,
        "{response:?}"
    );

    eventually("the REST call's span", async || !collector.spans().is_empty()).await;
    let spans = collector.spans();
    let span = spans
        .iter()
        .find(|s| s.name == "POST /number-recycling/v0.2/check")
        .unwrap_or_else(|| panic!("the REST span in {spans:?}"));
    assert_eq!(hex::encode(&span.trace_id), TRACE_ID, "the caller's trace id");
    assert_eq!(hex::encode(&span.parent_span_id), PARENT_ID);
    assert_eq!(span.kind, otlp::SpanKind::Server as i32);
    use otlp::any_value::Value;
    assert_eq!(
        attr(span, "http.route"),
        Some(&Value::StringValue("/number-recycling/v0.2/check".into()))
    );
    assert_eq!(
        attr(span, "http.request.method"),
        Some(&Value::StringValue("POST".into()))
    );
    assert_eq!(
        attr(span, "http.response.status_code"),
        Some(&Value::IntValue(503))
    );
    assert_eq!(
        attr(span, "reassigned.request_id"),
        Some(&Value::StringValue("rest-span-1".into()))
    );
    assert_eq!(
        attr(span, "reassigned.platform"),
        Some(&Value::StringValue("spiffe://dev.reassigned/platform-a".into()))
    );
    assert_eq!(
        span.status.as_ref().map(|s| s.code),
        Some(otlp::StatusCode::Error as i32)
    );
    let bytes: Vec<u8> = collector.received.lock().expect("lock").concat();
    for needle in [NUMBER, DIGITS] {
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "{needle:?} in the exported bytes"
        );
    }
    server.stop().await;
}

/// The span of a call made just before SIGTERM is still in the export
/// queue (batches leave every second) when the signal arrives: `reassigned
/// serve` flushes it to the collector before it exits. Checked when the
/// process has exited, without waiting any longer: it arrived before the
/// exit, or never.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_span_of_a_call_just_before_sigterm_reaches_the_collector_before_exit() {
    use support::bin::{Killed, dev_certs, free_port, numbers_client, serve_dev_command};
    const LAST_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
    let collector = Collector::default();
    let endpoint = format!("http://{}", collector.start().await);
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = dev_certs(dir.path());
    let data = dir.path().join("data");
    std::fs::create_dir(&data).expect("data dir");
    let log = dir.path().join("serve.log");
    let port = free_port();
    let mut child = Killed(
        serve_dev_command(&certs, port)
            .arg("--data-dir")
            .arg(&data)
            .args(["--otlp-endpoint", &endpoint])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn serve"),
    );
    let mut client = numbers_client(&certs, port).await;
    let mut request = check(NUMBER);
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{LAST_TRACE}-{PARENT_ID}-01")
            .parse()
            .expect("metadata"),
    );
    client.check_number(request).await.expect("check");
    drop(client);
    child.signal("TERM");
    let mut status = None;
    eventually("serve exits on SIGTERM", async || {
        status = child.0.try_wait().expect("try_wait");
        status.is_some()
    })
    .await;
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{log}");
    let spans = collector.spans();
    assert!(
        spans.iter().any(|s| hex::encode(&s.trace_id) == LAST_TRACE),
        "the last call's span did not reach the collector before the exit: {spans:?}\n{log}"
    );
    assert!(log.contains("traces: queued spans flushed"), "{log}");
}
