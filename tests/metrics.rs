//! The Prometheus endpoint (`--metrics-listen`) of a real server (mutual
//! TLS), read with a plain HTTP/1.1 request: request counters by method and
//! gRPC status, the mirror gauges, and audit drops with a dead sink.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use reassigned::api::pb::CheckNumberRequest;
use reassigned::api::pb::reassigned_numbers_client::ReassignedNumbersClient;
use reassigned::config::ServeSettings;
use reassigned::domain::Date;
use reassigned::import::{self, NoProgress};
use reassigned::server::metrics::MetricsHandle;
use reassigned::store::{AnyStore, EmbeddedStore};
use support::poll::eventually;
use support::register::FileSpec;
use support::server::{Bearer, TestChannel, TestServer, audit_secret, check_request, dead_redis};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Code;

const A: &str = "+14155550001";
const B: &str = "+14155550002";

fn req(phone_number: &str) -> CheckNumberRequest {
    check_request(phone_number, "2024-01-01")
}

/// A server (mTLS only) with metrics on 127.0.0.1:0.
struct Server {
    inner: TestServer,
    metrics: MetricsHandle,
}

impl Server {
    async fn start(store: AnyStore, tweak: impl FnOnce(&mut ServeSettings, &Path)) -> Self {
        let inner = TestServer::start_in(store, |s, dir| {
            s.tokens = Some(false);
            s.metrics_listen = Some("127.0.0.1:0".parse().expect("addr"));
            tweak(s, dir);
        })
        .await;
        let metrics = inner.handles.metrics.clone();
        Self { inner, metrics }
    }

    async fn client(&self) -> ReassignedNumbersClient<TestChannel> {
        self.inner.client().await
    }

    /// `GET path` on the metrics port: (status line, headers, body).
    async fn get(&self, path: &str) -> (String, String, String) {
        let addr = tokio::time::timeout(Duration::from_secs(10), self.metrics.bound_addr())
            .await
            .expect("metrics endpoint bound");
        let mut stream = TcpStream::connect(addr).await.expect("connect to metrics");
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut raw = String::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut raw))
            .await
            .expect("response in time")
            .expect("read");
        let (head, body) = raw.split_once("\r\n\r\n").expect("a header block");
        let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
        (status.to_owned(), headers.to_ascii_lowercase(), body.to_owned())
    }

    async fn metrics(&self) -> String {
        let (status, headers, body) = self.get("/metrics").await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(
            headers.contains("content-type: text/plain; version=0.0.4"),
            "{headers}"
        );
        body
    }

    async fn stop(self) {
        self.inner.stop().await;
    }
}

/// The value of the sample `name` (with its labels) in `text`.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn metrics_count_calls_by_method_and_status_and_report_the_mirror() {
    let store = EmbeddedStore::new();
    let files = tempfile::tempdir().expect("tempdir");
    let as_of = Date::today_utc().add_days(-3).to_string();
    let manifest = FileSpec::snapshot(
        7,
        &as_of,
        "2021-01-27",
        &["+1"],
        &[(A, "2024-05-01"), (B, "2023-05-01")],
    )
    .write(files.path(), "s1");
    import::apply_manifest(&store, &manifest, &mut NoProgress)
        .await
        .expect("snapshot");
    let server = Server::start(AnyStore::Embedded(Arc::new(store)), |_, _| {}).await;

    let (status, _, _) = server.get("/other").await;
    assert_eq!(status, "HTTP/1.1 404 Not Found");

    let mut client = server.client().await;
    for _ in 0..3 {
        client.check_number(req(A)).await.expect("check");
    }
    let bad = client
        .check_number(req("not a number"))
        .await
        .expect_err("bad number");
    assert_eq!(bad.code(), Code::InvalidArgument);

    let ok = r#"reassigned_requests_total{method="CheckNumber",code="OK"}"#;
    let invalid = r#"reassigned_requests_total{method="CheckNumber",code="InvalidArgument"}"#;
    let mut text = String::new();
    eventually("4 calls counted", async || {
        text = server.metrics().await;
        sample(&text, ok) == Some(3.0) && sample(&text, invalid) == Some(1.0)
    })
    .await;
    assert!(
        text.contains("# TYPE reassigned_requests_total counter"),
        "{text}"
    );
    assert!(text.contains("# HELP reassigned_mirror_sequence "), "{text}");
    assert_eq!(sample(&text, "reassigned_mirror_loaded"), Some(1.0), "{text}");
    assert_eq!(sample(&text, "reassigned_mirror_sequence"), Some(7.0), "{text}");
    assert_eq!(sample(&text, "reassigned_mirror_records"), Some(2.0), "{text}");
    assert_eq!(
        sample(&text, "reassigned_mirror_data_age_days"),
        Some(3.0),
        "{text}"
    );
    assert_eq!(sample(&text, "reassigned_mirror_stale"), Some(0.0), "{text}");
    assert_eq!(sample(&text, "reassigned_audit_records_written_total"), Some(0.0));
    assert_eq!(sample(&text, "reassigned_audit_records_dropped_total"), Some(0.0));
    assert_eq!(
        server
            .metrics
            .requests("/reassigned.v1.ReassignedNumbers/CheckNumber", Some(Code::Ok)),
        3
    );
    server.stop().await;
}

#[tokio::test]
async fn an_empty_mirror_is_reported_not_loaded_and_stale() {
    let store = AnyStore::Embedded(Arc::new(EmbeddedStore::new()));
    let server = Server::start(store, |_, _| {}).await;
    let text = server.metrics().await;
    assert_eq!(sample(&text, "reassigned_mirror_loaded"), Some(0.0), "{text}");
    assert_eq!(sample(&text, "reassigned_mirror_stale"), Some(1.0), "{text}");
    server.stop().await;
}

#[tokio::test]
async fn audit_drops_with_a_dead_sink_show_in_the_metrics() {
    let store = AnyStore::Embedded(Arc::new(EmbeddedStore::new()));
    let server = Server::start(store, |s, dir| {
        audit_secret(s, dir);
        s.audit_redis = Some(dead_redis());
    })
    .await;
    let mut client = server.client().await;
    eventually("dropped records in the metrics", async || {
        let _ = client.check_number(req(A)).await;
        let text = server.metrics().await;
        sample(&text, "reassigned_audit_records_dropped_total").is_some_and(|n| n > 0.0)
    })
    .await;
    let text = server.metrics().await;
    assert_eq!(sample(&text, "reassigned_audit_records_written_total"), Some(0.0));
    server.stop().await;
}

/// Asserts the value of each sample `name` (with its labels) in `text`.
fn assert_samples(text: &str, expected: &[(&str, f64)]) {
    for (name, value) in expected {
        assert_eq!(sample(text, name), Some(*value), "{name} in\n{text}");
    }
}

/// The lines of `text` that start with `prefix`.
fn lines<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
    text.lines().filter(|l| l.starts_with(prefix)).collect()
}

#[tokio::test]
async fn grpc_histograms_in_flight_refusals_and_process_figures_after_real_calls() {
    let store = EmbeddedStore::new();
    let files = tempfile::tempdir().expect("tempdir");
    let as_of = Date::today_utc().add_days(-1).to_string();
    let manifest =
        FileSpec::snapshot(1, &as_of, "2021-01-27", &["+1"], &[(A, "2024-05-01")]).write(files.path(), "s1");
    import::apply_manifest(&store, &manifest, &mut NoProgress)
        .await
        .expect("snapshot");
    let server = Server::start(AnyStore::Embedded(Arc::new(store)), |_, _| {}).await;
    let mut client = server.client().await;
    for _ in 0..5 {
        client.check_number(req(A)).await.expect("check");
    }
    client.check_number(req("+1 bad")).await.expect_err("bad number");

    // A real handshake with a certificate from another CA, and one with an
    // expired certificate: both refused at the handshake, counted by reason.
    let stranger = reassigned::cli::certs::DevPki::new()
        .expect("other CA")
        .client("platform-a")
        .expect("client cert");
    let refused = server
        .inner
        .raw_channel(Some(&stranger), server.inner.certs.pki.ca_cert_pem())
        .await;
    let expired = server.inner.certs.expired_client("platform-a");
    let refused_expired = server
        .inner
        .raw_channel(Some(&expired), server.inner.certs.pki.ca_cert_pem())
        .await;
    // tonic connects lazily at the first call on some versions: make a call.
    for channel in [refused, refused_expired].into_iter().flatten() {
        let mut c = ReassignedNumbersClient::new(channel);
        c.check_number(req(A))
            .await
            .expect_err("refused at the handshake");
    }

    let labels =
        r#"grpc_type="unary",grpc_service="reassigned.v1.ReassignedNumbers",grpc_method="CheckNumber""#;
    let count = format!("grpc_server_handling_seconds_count{{{labels}}}");
    let mut text = String::new();
    eventually("6 calls and 2 refused handshakes counted", async || {
        text = server.metrics().await;
        sample(&text, &count) == Some(6.0)
            && sample(
                &text,
                r#"reassigned_handshake_failures_total{reason="tls_error"}"#,
            ) == Some(2.0)
    })
    .await;
    assert!(
        text.contains("# TYPE grpc_server_handling_seconds histogram"),
        "{text}"
    );
    // ... and by what the TLS layer refused: the client certificate's
    // issuer (another CA) and its expiry.
    assert_eq!(
        sample(
            &text,
            r#"reassigned_handshake_tls_errors_total{kind="cert_untrusted"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"reassigned_handshake_tls_errors_total{kind="cert_expired"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, &format!("grpc_server_started_total{{{labels}}}")),
        Some(6.0)
    );
    assert_eq!(
        sample(
            &text,
            &format!("grpc_server_handled_total{{{labels},grpc_code=\"OK\"}}")
        ),
        Some(5.0)
    );
    assert_eq!(
        sample(
            &text,
            &format!("grpc_server_handled_total{{{labels},grpc_code=\"InvalidArgument\"}}")
        ),
        Some(1.0)
    );
    // Buckets: cumulative, non-decreasing, ending at the count.
    let buckets = lines(&text, &format!("grpc_server_handling_seconds_bucket{{{labels},"));
    assert_eq!(buckets.len(), reassigned::stats::BUCKETS, "{buckets:?}");
    let values: Vec<f64> = buckets
        .iter()
        .map(|l| l.rsplit(' ').next().and_then(|v| v.parse().ok()).expect("value"))
        .collect();
    assert!(values.windows(2).all(|w| w[0] <= w[1]), "{values:?}");
    assert_eq!(values.last(), Some(&6.0));
    assert!(buckets[0].contains("le=\"0.00005\""), "{}", buckets[0]);
    assert!(buckets.last().is_some_and(|l| l.contains("le=\"+Inf\"")));
    let sum = sample(&text, &format!("grpc_server_handling_seconds_sum{{{labels}}}")).expect("sum");
    assert!(sum > 0.0, "{sum}");
    // Every API method is listed before its first call.
    assert_eq!(
        sample(
            &text,
            r#"grpc_server_started_total{grpc_type="server_stream",grpc_service="reassigned.v1.Watchlist",grpc_method="WatchDisconnections"}"#
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(&text, &format!("reassigned_requests_in_flight{{{labels}}}")),
        Some(0.0)
    );
    // The store's latency: the embedded store answered 5 lookups.
    let lookups = sample(
        &text,
        r#"reassigned_store_call_seconds_count{store="embedded",op="lookup"}"#,
    )
    .expect("store histogram");
    assert!(lookups >= 5.0, "{lookups}");
    assert!(
        sample(
            &text,
            r#"reassigned_import_runs_total{kind="snapshot",result="ok"}"#
        )
        .is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "reassigned_build_info{{version=\"{}\",git_sha=\"",
            env!("CARGO_PKG_VERSION")
        )),
        "{text}"
    );
    let not_after =
        sample(&text, "reassigned_tls_certificate_not_after_timestamp_seconds").expect("cert expiry");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    assert!(
        not_after > now,
        "the test server's certificate is valid: {not_after} vs {now}"
    );
    assert!(
        sample(&text, "process_resident_memory_bytes").is_some_and(|n| n > 1e6),
        "{text}"
    );
    assert!(
        sample(&text, "process_open_fds").is_some_and(|n| n >= 3.0),
        "{text}"
    );
    assert!(
        sample(&text, "process_cpu_seconds_total").is_some_and(|n| n > 0.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "reassigned_mirror_as_of_timestamp_seconds"),
        Some(f64::from(Date::today_utc().add_days(-1).days()) * 86_400.0)
    );
    server.stop().await;
}

#[tokio::test]
async fn token_refusals_are_counted_by_reason() {
    let store = AnyStore::Embedded(Arc::new(EmbeddedStore::new()));
    let inner = TestServer::start(store, |s| {
        s.metrics_listen = Some("127.0.0.1:0".parse().expect("addr"));
    })
    .await;
    let metrics = inner.handles.metrics.clone();
    let server = Server { inner, metrics };
    let id = server.inner.certs.client("platform-a");
    let mut none = ReassignedNumbersClient::new(server.inner.channel_bearing(&id, Bearer::none()).await);
    let mut junk = ReassignedNumbersClient::new(
        server
            .inner
            .channel_bearing(&id, Bearer::raw("Bearer not.a.jwt"))
            .await,
    );
    for _ in 0..2 {
        let e = none.check_number(req(A)).await.expect_err("no token");
        assert_eq!(e.code(), Code::Unauthenticated);
    }
    let e = junk.check_number(req(A)).await.expect_err("junk token");
    assert_eq!(e.code(), Code::Unauthenticated);
    let text = server.metrics().await;
    assert_samples(
        &text,
        &[
            (r#"reassigned_auth_refusals_total{reason="token_missing"}"#, 2.0),
            (r#"reassigned_auth_refusals_total{reason="token_malformed"}"#, 1.0),
            (r#"reassigned_auth_refusals_total{reason="token_expired"}"#, 0.0),
            (r#"reassigned_quota_refusals_total{kind="rate"}"#, 0.0),
        ],
    );
    server.stop().await;
}

/// The metric names in a PromQL expression: identifiers of this server's
/// families (`reassigned_*`, `grpc_server_*`, `http_server_*`, `process_*`).
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut word = String::new();
    let mut in_quotes = false;
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c == '"' {
            in_quotes = !in_quotes;
        }
        if !in_quotes && (c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            word.push(c);
            continue;
        }
        if ["reassigned_", "grpc_server_", "http_server_", "process_"]
            .iter()
            .any(|p| word.starts_with(p))
        {
            names.push(std::mem::take(&mut word));
        }
        word.clear();
    }
    names
}

/// The `expr:` of every rule in an alert rules file (one line, or a `|`
/// block), with the rule's name.
fn alert_exprs(yaml: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut name = String::new();
    let mut lines = yaml.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        if let Some(n) = trimmed.strip_prefix("- alert:") {
            name = n.trim().to_owned();
        } else if let Some(e) = trimmed.strip_prefix("expr:") {
            let e = e.trim();
            if e == "|" {
                let indent = line.len() - trimmed.len();
                let mut block = String::new();
                while let Some(next) = lines.peek() {
                    if !next.trim().is_empty() && next.len() - next.trim_start().len() <= indent {
                        break;
                    }
                    block.push_str(next.trim());
                    block.push(' ');
                    lines.next();
                }
                out.push((name.clone(), block));
            } else {
                out.push((name.clone(), e.to_owned()));
            }
        }
    }
    out
}

/// Every metric the alert rules and the Grafana dashboard in `deploy/` use is
/// one this server (with its REST face) or a sync process exports (scraped
/// from a real server after real calls; a sync's exposition after a good
/// and a failed run, as `tests/admin.rs` scrapes it from a real `sync`),
/// and the rules pass `promtool check rules` when promtool is installed
/// (`.ci/run` installs it and also runs it).
#[tokio::test]
async fn deploy_alerts_and_dashboard_use_only_exported_metrics() {
    use reassigned::server::sync_metrics::{SyncStats, render_sync};
    let server = Server::start(AnyStore::Embedded(Arc::new(EmbeddedStore::new())), |s, _| {
        s.rest_listen = Some(([127, 0, 0, 1], 0).into());
    })
    .await;
    let mut client = server.client().await;
    let _ = client.check_number(req(A)).await;
    let mut text = server.metrics().await;
    server.stop().await;
    let sync = SyncStats::new(
        Some(Duration::from_secs(3600)),
        &reassigned::import::ImportError::KINDS,
    );
    sync.run_started();
    sync.run_failed("store");
    sync.run_started();
    sync.run_succeeded(Some(1));
    text.push_str(&render_sync(&sync, true));
    let exported: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let rules = std::fs::read_to_string(root.join("prometheus/alerts.yaml")).expect("alerts.yaml");
    let exprs = alert_exprs(&rules);
    assert!(exprs.len() >= 4, "{exprs:?}");
    let mut covered = Vec::new();
    for (alert, expr) in &exprs {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{alert}: no metric of this server in {expr}");
        for name in names {
            assert!(
                exported.contains(name.as_str()),
                "{alert} uses {name}, which the server does not export"
            );
            covered.push(name);
        }
    }
    for needed in [
        "reassigned_mirror_stale",
        "reassigned_store_errors_total",
        "grpc_server_handling_seconds_bucket",
        "reassigned_tls_certificate_not_after_timestamp_seconds",
        "http_server_requests_total",
        "reassigned_sync_consecutive_failures",
    ] {
        assert!(covered.iter().any(|n| n == needed), "no alert on {needed}");
    }

    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("grafana/reassigned.json")).expect("dashboard"),
    )
    .expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10);
    for panel in panels {
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{panel}");
        for target in targets {
            let expr = target["expr"].as_str().expect("expr");
            let names = metric_names(expr);
            assert!(!names.is_empty(), "{}: {expr}", panel["title"]);
            for name in names {
                assert!(
                    exported.contains(name.as_str()),
                    "panel {} uses {name}, which the server does not export",
                    panel["title"]
                );
            }
        }
    }

    for (command, file) in [("check", "alerts.yaml"), ("test", "alerts_test.yaml")] {
        match std::process::Command::new("promtool")
            .args([command, "rules"])
            .arg(root.join("prometheus").join(file))
            .output()
        {
            Ok(out) => assert!(
                out.status.success(),
                "promtool {command} rules {file}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => {
                eprintln!(
                    "promtool not installed ({e}): rules checked by name only here; .ci/run runs promtool"
                );
            }
        }
    }
}

#[tokio::test]
async fn quota_refusals_are_counted_by_kind() {
    let store = AnyStore::Embedded(Arc::new(EmbeddedStore::new()));
    let server = Server::start(store, |s, _| {
        let one_per_thousand_seconds = reassigned::quota::QuotaLimits {
            requests_per_second: Some(0.001),
            burst: Some(1),
            numbers_per_day: None,
        };
        s.quotas = Some([("default".to_owned(), one_per_thousand_seconds)].into());
    })
    .await;
    let mut client = server.client().await;
    client.check_number(req(A)).await.expect("the burst of one");
    for _ in 0..2 {
        let refused = client.check_number(req(A)).await.expect_err("over the rate");
        assert_eq!(refused.code(), Code::ResourceExhausted);
    }
    let text = server.metrics().await;
    assert_samples(
        &text,
        &[
            (r#"reassigned_quota_refusals_total{kind="rate"}"#, 2.0),
            (r#"reassigned_quota_refusals_total{kind="daily"}"#, 0.0),
        ],
    );
    server.stop().await;
}
