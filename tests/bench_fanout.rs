//! `reassigned bench --method fanout` end to end, at small scale, against a
//! real server (mTLS, tokens on) on both stores: three platforms load the
//! same 1,000 numbers, follow `WatchDisconnections`, an operator publishes
//! numbers of that pool, and every acknowledged event reaches every
//! platform once (delivered = published x platforms, nothing missing, no
//! duplicates). A second run with `--skip-load` finds the lists loaded.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use reassigned::cli::bench::{BenchOptions, BenchReport, Method, bench};
use reassigned::cli::client::TlsTarget;
use reassigned::store::redis::RedisOptions;
use reassigned::store::{AnyStore, EmbeddedStore, RedisStore};
use support::redis::RedisServer;
use support::server::TestServer;

/// Redis settings that make an acknowledged write durable on Redis 7.0.
const AOF: [&str; 4] = ["--appendonly", "yes", "--appendfsync", "always"];

const PLATFORMS: [&str; 3] = ["watcher-1", "watcher-2", "watcher-3"];
const NUMBERS: usize = 1_000;

async fn server(store: AnyStore) -> TestServer {
    TestServer::start_in(store, |s, dir| {
        let operators = dir.join("operators.toml");
        std::fs::write(
            &operators,
            "[operators.\"spiffe://dev.reassigned/operator-a\"]\nprefixes = [\"+1\"]\n",
        )
        .expect("operators");
        let key = dir.join("watch.key");
        std::fs::write(&key, "the-watch-key-of-the-fanout-bench").expect("key");
        s.operators = Some(operators);
        s.watch_key_file = Some(key);
    })
    .await
}

/// Writes `NAME.pem`, `NAME.key` and `NAME.token` of `name` (scopes
/// `scope`) into `dir`.
fn identity(server: &TestServer, dir: &Path, name: &str, scope: &str) {
    let id = server.certs.client(name);
    let token = server.tokens.as_ref().expect("tokens").mint(&id, scope);
    std::fs::write(dir.join(format!("{name}.pem")), &id.cert_pem).expect("cert");
    std::fs::write(dir.join(format!("{name}.key")), &id.key_pem).expect("key");
    std::fs::write(dir.join(format!("{name}.token")), token).expect("token");
}

fn options(server: &TestServer, operator: &Path, watchers: &Path, skip_load: bool) -> BenchOptions {
    BenchOptions {
        tls: TlsTarget {
            target: server.addr.to_string(),
            server_name: "localhost".into(),
            ca: server.certs.ca.clone(),
            cert: operator.join("operator-a.pem"),
            key: operator.join("operator-a.key"),
        },
        method: Method::Fanout,
        concurrency: 2,
        connections: 1,
        duration: Duration::from_secs(1),
        warmup: Duration::from_millis(300),
        rate: None,
        batch_size: 100,
        data: None,
        hit_ratio: 0.04,
        since: "2022-01-01".into(),
        timeout: Duration::from_secs(10),
        receipts: false,
        token: Some(std::fs::read_to_string(operator.join("operator-a.token")).expect("token")),
        rest: false,
        seed: 1,
        json: false,
        watchers: Some(watchers.to_owned()),
        watch_numbers: NUMBERS,
        skip_load,
        drain: Duration::from_secs(30),
    }
}

fn assert_complete(report: &BenchReport) {
    let f = report.fanout.as_ref().expect("a fan-out report");
    assert_eq!(report.failed_calls, 0, "{report}");
    assert!(report.item_errors.is_empty(), "{report}");
    assert_eq!(f.platforms, PLATFORMS.len(), "{report}");
    assert!(f.published > 0, "{report}");
    assert_eq!(
        f.expected_deliveries,
        f.published * PLATFORMS.len() as u64,
        "{report}"
    );
    assert_eq!(f.delivered, f.expected_deliveries, "{report}");
    assert_eq!(f.missing, 0, "{report}");
    assert!(!f.drain_timed_out, "{report}");
    assert_eq!(f.duplicates, 0, "{report}");
    assert_eq!(f.unacknowledged, 0, "{report}");
    assert!(f.stream_errors.is_empty(), "{report}");
    assert!(f.measured_deliveries > 0 && f.delivered_per_sec > 0.0, "{report}");
    assert_eq!(f.latency_us.count, f.measured_deliveries, "{report}");
    assert!(
        f.latency_us.p50 > 0 && f.latency_us.max >= f.latency_us.p99,
        "{report}"
    );
    assert!(f.min_list_count >= NUMBERS as u64, "{report}");
    let json = serde_json::to_value(report).expect("json");
    assert_eq!(json["method"], "fanout");
    assert!(json["fanout"]["delivered_per_sec"].is_f64());
    assert!(json["fanout"]["latency_us"]["p99"].is_u64());
    let text = report.to_string();
    assert!(
        text.contains("delivered") && text.contains("missing      0"),
        "{text}"
    );
}

async fn fanout_delivers_everything(store: AnyStore) {
    let server = server(store).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (operator, watchers) = (dir.path().join("operator"), dir.path().join("watchers"));
    std::fs::create_dir_all(&operator).expect("dir");
    std::fs::create_dir_all(&watchers).expect("dir");
    identity(&server, &operator, "operator-a", "register:write");
    for name in PLATFORMS {
        identity(&server, &watchers, name, "watch:write watch:read");
    }

    let first = bench(&options(&server, &operator, &watchers, false))
        .await
        .expect("bench");
    assert_complete(&first);
    let load = first
        .fanout
        .as_ref()
        .and_then(|f| f.load.clone())
        .expect("loaded");
    assert_eq!(load.added, (NUMBERS * PLATFORMS.len()) as u64, "{first}");

    // The lists stay loaded: a run that skips loading delivers as well.
    let second = bench(&options(&server, &operator, &watchers, true))
        .await
        .expect("bench");
    assert_complete(&second);
    assert!(second.fanout.as_ref().is_some_and(|f| f.load.is_none()));

    // Without loading, lists too short are refused before publishing.
    let mut short = options(&server, &operator, &watchers, true);
    short.watch_numbers = NUMBERS + 1;
    let err = bench(&short).await.expect_err("lists too short").to_string();
    assert!(err.contains("fewer than --watch-numbers"), "{err}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_fanout_delivers_every_event_to_every_watcher() {
    fanout_delivers_everything(AnyStore::Embedded(Arc::new(EmbeddedStore::new()))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_fanout_delivers_every_event_to_every_watcher() {
    let redis = RedisServer::start_with(&AOF);
    let store = RedisStore::connect(&redis.url(), RedisOptions::default())
        .await
        .expect("connect");
    fanout_delivers_everything(AnyStore::Redis(store)).await;
}
