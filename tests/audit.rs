//! The audit trail over a real server (mutual TLS) and a real
//! `redis-server`: records land in `{prefix}:audit` without clear numbers;
//! a dead sink never stops answers (drops are counted) unless the trail is
//! mandatory, which turns calls into UNAVAILABLE.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use reassigned::api::pb::reassigned_numbers_client::ReassignedNumbersClient;
use reassigned::api::pb::{BatchCheckNumbersRequest, CheckNumberRequest};
use reassigned::audit::{AuditRecord, AuditStats};
use reassigned::cli::certs::platform_uri;
use reassigned::config::ServeSettings;
use reassigned::domain::Date;
use reassigned::import::{self, NoProgress};
use reassigned::store::redis::RedisOptions;
use reassigned::store::{AnyStore, EmbeddedStore, RedisStore};
use support::poll::{eventually, eventually_within};
use support::redis::RedisServer;
use support::register::FileSpec;
use support::server::{TestChannel, TestServer, audit_secret, check_request, dead_redis};
use tonic::Code;

const A: &str = "+14155550001";
const B: &str = "+14155550002";

fn req(phone_number: &str) -> CheckNumberRequest {
    check_request(phone_number, "2024-01-01")
}

/// A server with the audit trail on (mTLS only).
struct Server {
    inner: TestServer,
    stats: Arc<AuditStats>,
}

impl Server {
    /// `tweak` must choose the store's settings (`redis` or `data_dir`).
    async fn start(store: AnyStore, tweak: impl FnOnce(&mut ServeSettings, &Path)) -> Self {
        let inner = TestServer::start_in(store, |s, dir| {
            audit_secret(s, dir);
            s.tokens = Some(false);
            s.data_dir = None;
            tweak(s, dir);
        })
        .await;
        let stats = inner.handles.audit_stats.clone();
        Self { inner, stats }
    }

    async fn client(&self) -> ReassignedNumbersClient<TestChannel> {
        self.inner.client().await
    }

    async fn stop(self) {
        self.inner.stop().await;
    }
}

#[tokio::test]
async fn every_answer_is_recorded_without_the_number() {
    let redis = RedisServer::start();
    let store = RedisStore::connect(&redis.url(), RedisOptions::default())
        .await
        .expect("connect");
    let store = AnyStore::Redis(store);
    let files = tempfile::tempdir().expect("tempdir");
    let today = Date::today_utc().to_string();
    let manifest =
        FileSpec::snapshot(1, &today, "2021-01-27", &["+1"], &[(A, "2024-05-01")]).write(files.path(), "s1");
    import::apply_manifest(&store, &manifest, &mut NoProgress)
        .await
        .expect("snapshot");
    let url = redis.url();
    let server = Server::start(store, |s, _| s.redis = Some(url.clone())).await;
    let mut client = server.client().await;
    let mut request = tonic::Request::new(req(A));
    request
        .metadata_mut()
        .insert("x-request-id", "login-1".parse().expect("ascii"));
    client.check_number(request).await.expect("check");
    client
        .batch_check_numbers(BatchCheckNumbersRequest {
            checks: vec![req(A), req(B)],
            ..Default::default()
        })
        .await
        .expect("batch");
    let stats = server.stats.clone();
    eventually("3 records written", async || stats.written() >= 3).await;
    assert_eq!(stats.dropped(), 0);

    // The raw stream holds no number, in any form.
    let raw = Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "XRANGE", "rn:audit", "-", "+"])
        .output()
        .expect("redis-cli");
    let raw = String::from_utf8_lossy(&raw.stdout);
    assert!(raw.contains("number_hmac"), "{raw}");
    for number in [A, B] {
        assert!(!raw.contains(&number[2..]), "clear number in the audit stream");
    }

    // The export, as JSON lines.
    let out = Command::new(env!("CARGO_BIN_EXE_reassigned"))
        .args(["audit", "export", "--redis", &redis.url(), "--platform"])
        .arg(platform_uri("platform-a"))
        .args(["--from", &today, "--to", &today])
        .output()
        .expect("run reassigned");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let records: Vec<AuditRecord> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON record per line"))
        .collect();
    assert_eq!(records.len(), 3);
    assert_eq!(records[0].request_id, "login-1");
    assert_eq!(records[0].status, "REASSIGNMENT_STATUS_REASSIGNED");
    assert_eq!(records[0].since, "2024-01-01");
    assert_eq!(records[0].data_as_of, today);
    assert_eq!(records[2].status, "REASSIGNMENT_STATUS_NOT_REASSIGNED");
    assert_eq!(records[1].request_id, records[2].request_id, "one id per call");
    assert_eq!(
        records[0].number_hmac, records[1].number_hmac,
        "same number, same hash"
    );
    assert_ne!(records[1].number_hmac, records[2].number_hmac);
    assert_eq!(records[0].number_hmac.len(), 64);
    for r in &records {
        assert_eq!(r.platform, platform_uri("platform-a"));
    }
    // Another platform, or another day, has nothing.
    let out = Command::new(env!("CARGO_BIN_EXE_reassigned"))
        .args([
            "audit",
            "export",
            "--redis",
            &redis.url(),
            "--platform",
            "someone-else",
        ])
        .args(["--from", &today, "--to", &today])
        .output()
        .expect("run reassigned");
    assert!(out.status.success());
    assert!(out.stdout.is_empty());
    server.stop().await;
}

fn embedded(s: &mut ServeSettings, dir: &Path) -> PathBuf {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    s.data_dir = Some(data.clone());
    data
}

#[tokio::test]
async fn a_dead_sink_drops_records_but_answers_go_on() {
    let store = AnyStore::Embedded(Arc::new(EmbeddedStore::new()));
    let server = Server::start(store, |s, dir| {
        embedded(s, dir);
        s.audit_redis = Some(dead_redis());
    })
    .await;
    let mut client = server.client().await;
    let stats = server.stats.clone();
    eventually("dropped records", async || {
        client.check_number(req(A)).await.expect("still answered");
        stats.dropped() > 0
    })
    .await;
    assert_eq!(stats.written(), 0);
    server.stop().await;
}

#[tokio::test]
async fn a_mandatory_trail_turns_calls_unavailable() {
    let store = AnyStore::Embedded(Arc::new(EmbeddedStore::new()));
    let server = Server::start(store, |s, dir| {
        embedded(s, dir);
        s.audit_redis = Some(dead_redis());
        s.audit_mandatory = Some(true);
    })
    .await;
    let mut client = server.client().await;
    eventually("UNAVAILABLE", async || match client.check_number(req(A)).await {
        Ok(_) => false,
        Err(e) => {
            assert_eq!(e.code(), Code::Unavailable, "{e:?}");
            assert_eq!(e.message(), "the audit trail is unavailable; retry");
            true
        }
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn a_mandatory_trail_recovers_with_its_sink() {
    let mut redis = RedisServer::start();
    let store = AnyStore::Embedded(Arc::new(EmbeddedStore::new()));
    let url = redis.url();
    let server = Server::start(store, |s, dir| {
        embedded(s, dir);
        s.audit_redis = Some(url.clone());
        s.audit_mandatory = Some(true);
    })
    .await;
    let mut client = server.client().await;
    client.check_number(req(A)).await.expect("sink up");
    redis.stop();
    eventually("UNAVAILABLE", async || client.check_number(req(A)).await.is_err()).await;
    redis.restart();
    eventually("answers again", async || {
        client.check_number(req(A)).await.is_ok()
    })
    .await;
    let stats = server.stats.clone();
    eventually("records written again", async || stats.written() >= 2).await;
    server.stop().await;
}

#[tokio::test]
async fn the_stream_is_capped_near_audit_max_len() {
    let redis = RedisServer::start();
    let store = AnyStore::Embedded(Arc::new(EmbeddedStore::new()));
    let url = redis.url();
    let server = Server::start(store, |s, dir| {
        embedded(s, dir);
        s.audit_redis = Some(url.clone());
        s.audit_max_len = Some(10);
    })
    .await;
    let mut client = server.client().await;
    client
        .batch_check_numbers(BatchCheckNumbersRequest {
            checks: (0..1000).map(|i| req(&format!("+1415555{i:04}"))).collect(),
            ..Default::default()
        })
        .await
        .expect("batch");
    let stats = server.stats.clone();
    eventually("1000 records written", async || stats.written() >= 1000).await;
    let len = Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "XLEN", "rn:audit"])
        .output()
        .expect("redis-cli");
    let len: u64 = String::from_utf8_lossy(&len.stdout).trim().parse().expect("XLEN");
    // `MAXLEN ~` trims whole stream nodes (100 entries by default).
    assert!((10..=110).contains(&len), "XLEN {len}");
    server.stop().await;
}

/// `XLEN rn:audit` on the Redis at `port`.
fn xlen(port: u16) -> u64 {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "XLEN", "rn:audit"])
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).trim().parse().expect("XLEN")
}

/// What happens to the audit Redis in the middle of the load.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// SIGSTOP for 3 s (longer than the writer's 2 s timeout), then SIGCONT.
    Pause,
    /// `SHUTDOWN SAVE`, then started again on the same port with its data.
    Restart,
}

#[tokio::test]
async fn counters_stay_exact_when_the_sink_pauses_under_load() {
    counters_stay_exact(Fault::Pause).await;
}

#[tokio::test]
async fn counters_stay_exact_when_the_sink_restarts_under_load() {
    counters_stay_exact(Fault::Restart).await;
}

async fn counters_stay_exact(fault: Fault) {
    let mut redis = RedisServer::start();
    let store = AnyStore::Embedded(Arc::new(EmbeddedStore::new()));
    let url = redis.url();
    let server = Server::start(store, |s, dir| {
        embedded(s, dir);
        s.audit_redis = Some(url.clone());
    })
    .await;
    let client = server.client().await;
    let stats = server.stats.clone();
    // Load: 4 callers sending batches of 50 checks, for the whole test.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let mut client = client.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut answered = 0_u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let results = client
                        .batch_check_numbers(BatchCheckNumbersRequest {
                            checks: (0..50).map(|i| req(&format!("+1415555{i:04}"))).collect(),
                            ..Default::default()
                        })
                        .await
                        .expect("answered while the sink pauses")
                        .into_inner()
                        .results;
                    answered += results.len() as u64;
                }
                answered
            })
        })
        .collect();
    eventually("records written", async || stats.written() > 500).await;
    // Paused longer than the writer's 2 s write timeout: pipelines time out
    // in flight, and Redis runs them when it resumes.
    match fault {
        Fault::Pause => {
            redis.pause();
            tokio::time::sleep(Duration::from_secs(3)).await;
            redis.resume();
        }
        Fault::Restart => {
            redis.stop();
            tokio::time::sleep(Duration::from_secs(1)).await;
            redis.restart();
        }
    }
    let written_at_resume = stats.written();
    eventually("writes after the pause", async || {
        stats.written() > written_at_resume + 500
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut answered = 0;
    for caller in callers {
        answered += caller.await.expect("caller");
    }
    // Every answer is either written or counted dropped, exactly once, and
    // `written` is exactly what the stream holds.
    eventually_within(
        "every answer is written or counted dropped",
        Duration::from_secs(20),
        async || stats.written() + stats.dropped() == answered,
    )
    .await;
    assert_eq!(
        stats.written() + stats.dropped(),
        answered,
        "written {} + dropped {} != answered {answered}",
        stats.written(),
        stats.dropped()
    );
    let in_stream = xlen(redis.port);
    println!(
        "{fault:?}: answered {answered}, written {}, dropped {}, in the stream {in_stream}",
        stats.written(),
        stats.dropped()
    );
    assert_eq!(
        stats.written(),
        in_stream,
        "written must equal the stream's length"
    );
    server.stop().await;
}
