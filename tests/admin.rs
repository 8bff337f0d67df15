//! The admin listener (`--admin-listen`) of a real server: `/readyz` 503
//! with its reason before the mirror loads, when redis-server is killed and
//! while draining, 200 when ready, on both stores; `/livez`; and the exit
//! status of `reassigned health` (admin and gRPC over mTLS). And the metrics
//! of a `reassigned sync` process: its admin listener (`sync --every
//! --admin-listen`) and its textfile (`--metrics-textfile`).

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use reassigned::api::pb::CheckNumberRequest;
use reassigned::api::pb::reassigned_numbers_client::ReassignedNumbersClient;
use reassigned::domain::Date;
use reassigned::import::{self, NoProgress};
use reassigned::server::admin;
use reassigned::store::{AnyStore, EmbeddedStore, RedisStore, redis::RedisOptions};
use support::bin::bin;
use support::poll::eventually;
use support::redis::RedisServer;
use support::register::FileSpec;
use support::server::TestServer;

/// A snapshot of one number, as of three days ago, in `dir`.
fn snapshot(dir: &Path) -> std::path::PathBuf {
    let as_of = Date::today_utc().add_days(-3).to_string();
    FileSpec::snapshot(
        1,
        &as_of,
        "2021-01-27",
        &["+1"],
        &[("+14155550001", "2024-05-01")],
    )
    .write(dir, "s1")
}

/// A check of the snapshot's number.
fn check() -> CheckNumberRequest {
    CheckNumberRequest {
        phone_number: "+14155550001".into(),
        since: "2024-01-01".into(),
        ..Default::default()
    }
}

/// A server with the admin listener on 127.0.0.1:0.
async fn serve(store: AnyStore) -> TestServer {
    TestServer::start(store, |s| {
        s.admin_listen = Some("127.0.0.1:0".parse().expect("addr"));
    })
    .await
}

/// `GET path` on the admin listener of `server`: (status, body).
async fn get(server: &TestServer, path: &str) -> (u16, String) {
    let addr = tokio::time::timeout(Duration::from_secs(10), server.handles.metrics.bound_addr())
        .await
        .expect("admin listener bound");
    admin::get(&addr.to_string(), path, Duration::from_secs(10))
        .await
        .expect("admin answers")
}

/// Waits until `/readyz` answers `status` with a body containing `reason`.
async fn readyz_becomes(server: &TestServer, status: u16, reason: &str) {
    let mut last = (0, String::new());
    eventually(&format!("/readyz is {status} ({reason})"), async || {
        last = get(server, "/readyz").await;
        last.0 == status && last.1.contains(reason)
    })
    .await;
}

async fn redis_store(redis: &RedisServer) -> RedisStore {
    RedisStore::connect(&redis.url(), RedisOptions::default())
        .await
        .expect("redis store")
}

#[tokio::test]
async fn readyz_on_redis_waits_for_the_mirror_and_fails_when_redis_is_killed() {
    let redis = RedisServer::start();
    let server = serve(AnyStore::Redis(redis_store(&redis).await)).await;
    let (live, body) = get(&server, "/livez").await;
    assert_eq!((live, body.as_str()), (200, "ok"));
    // Nothing imported yet: not ready, and it says why.
    readyz_becomes(&server, 503, "mirror empty").await;

    let files = tempfile::tempdir().expect("tempdir");
    let writer = redis_store(&redis).await;
    import::apply_manifest(&writer, &snapshot(files.path()), &mut NoProgress)
        .await
        .expect("snapshot into redis");
    readyz_becomes(&server, 200, "ready").await;

    drop(redis); // SIGKILL: the store is gone.
    readyz_becomes(&server, 503, "store unreachable").await;
    // Liveness is about the process, not its store: no restart loop.
    assert_eq!(get(&server, "/livez").await.0, 200);
    server.stop().await;
}

#[tokio::test]
async fn readyz_on_the_embedded_store_and_while_draining() {
    let store = EmbeddedStore::new();
    let files = tempfile::tempdir().expect("tempdir");
    import::apply_manifest(&store, &snapshot(files.path()), &mut NoProgress)
        .await
        .expect("snapshot");
    let server = serve(AnyStore::Embedded(Arc::new(store))).await;
    readyz_becomes(&server, 200, "ready").await;
    let (status, metrics) = get(&server, "/metrics").await;
    assert_eq!(status, 200);
    assert!(metrics.contains("reassigned_mirror_loaded 1"), "{metrics}");
    assert_eq!(get(&server, "/other").await.0, 404);

    // A stream left open holds the drain: /readyz must say so meanwhile.
    let mut client = server.client().await;
    let (tx, rx) = tokio::sync::mpsc::channel::<CheckNumberRequest>(1);
    let mut answers = client
        .stream_check_numbers(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("stream opened")
        .into_inner();
    tx.send(check()).await.expect("send");
    let first = answers.message().await.expect("stream answer");
    assert!(first.is_some(), "the stream answers before the drain");

    let addr = server.handles.metrics.bound_addr().await;
    let stopping = tokio::spawn(server.stop());
    let mut last = (0, String::new());
    eventually("/readyz says draining", async || {
        last = admin::get(&addr.to_string(), "/readyz", Duration::from_secs(5))
            .await
            .unwrap_or_default();
        last.0 == 503 && last.1.contains("draining")
    })
    .await;
    drop(tx);
    drop(answers);
    drop(client);
    stopping.await.expect("server stopped cleanly");
}

// Multi-threaded: the probes run as child processes while this test blocks
// on them, and the server in this process must still answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_exits_0_when_ready_and_1_otherwise() {
    let store = Arc::new(EmbeddedStore::new());
    let server = serve(AnyStore::Embedded(store.clone())).await;
    let admin_addr = server.handles.metrics.bound_addr().await.to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let client = server.client_files("platform-a", dir.path());
    let grpc_addr = server.addr.to_string();
    let health = |admin_mode: bool| {
        let mut cmd = bin();
        cmd.arg("health");
        if admin_mode {
            cmd.args(["--admin", "--addr", &admin_addr]);
        } else {
            cmd.args(["--addr", &grpc_addr]).args(client.args());
        }
        cmd.output().expect("run reassigned health")
    };

    // Empty mirror: not ready on either path, exit 1 with the reason.
    readyz_becomes(&server, 503, "mirror empty").await;
    let out = health(true);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("mirror empty"),
        "{out:?}"
    );
    let out = health(false);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("NOT_SERVING"),
        "{out:?}"
    );

    let files = tempfile::tempdir().expect("tempdir");
    import::apply_manifest(&*store, &snapshot(files.path()), &mut NoProgress)
        .await
        .expect("snapshot");
    readyz_becomes(&server, 200, "ready").await;
    for admin_mode in [true, false] {
        let out = health(admin_mode);
        assert_eq!(out.status.code(), Some(0), "admin {admin_mode}: {out:?}");
    }
    let mut api = ReassignedNumbersClient::new(server.channel("platform-a").await);
    api.check_number(check()).await.expect("the server answers");

    // Nothing listening: exit 1.
    let addr = server.handles.metrics.bound_addr().await;
    server.stop().await;
    let out = bin()
        .args([
            "health",
            "--admin",
            "--addr",
            &addr.to_string(),
            "--timeout",
            "2s",
        ])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

/// The value of the sample `name` (with its labels) in `text`.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// The address the admin listener of a child process bound (`--admin-listen
/// 127.0.0.1:0`), read from its log in `log`.
async fn admin_bound_in(log: &Path) -> String {
    let mut bound = String::new();
    eventually("the child's admin listener is bound", async || {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        match text
            .lines()
            .filter(|l| l.contains("admin: serving"))
            .find_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("bound=")))
        {
            Some(addr) => {
                bound = addr.to_owned();
                true
            }
            None => false,
        }
    })
    .await;
    bound
}

/// `reassigned sync` against a real redis-server, with `args` before the
/// register directory; its stderr in `log`.
fn sync_cmd(
    redis: &RedisServer,
    args: &[&std::ffi::OsStr],
    register: &Path,
    log: &Path,
) -> std::process::Command {
    let mut cmd = bin();
    cmd.arg("sync")
        .args(args)
        .arg(register)
        .env("REASSIGNED_REDIS", redis.url())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).expect("log file"));
    cmd
}

/// `sync --every --admin-listen` (the long-running form compose runs):
/// `/metrics` reports a good run (files applied, the mirror's sequence, the
/// last success), then failing runs with their kind and the last error;
/// `/livez` answers; SIGTERM between runs exits 0. A one-shot sync with
/// `--metrics-textfile` (cron) leaves its run's figures in the file, and its
/// exit status says whether it failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_serves_its_metrics_and_writes_a_textfile() {
    use std::ffi::OsStr;
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let register = dir.path().join("register");
    std::fs::create_dir(&register).expect("register dir");
    snapshot(&register);
    let log = dir.path().join("sync-every.log");
    let mut child = support::bin::Killed(
        sync_cmd(
            &redis,
            &[
                OsStr::new("--every"),
                OsStr::new("200ms"),
                OsStr::new("--admin-listen"),
                OsStr::new("127.0.0.1:0"),
            ],
            &register,
            &log,
        )
        .spawn()
        .expect("spawn sync --every"),
    );
    let addr = admin_bound_in(&log).await;
    let metrics = async || {
        admin::get(&addr, "/metrics", Duration::from_secs(5))
            .await
            .ok()
            .filter(|(status, _)| *status == 200)
            .map(|(_, body)| body)
            .unwrap_or_default()
    };
    let mut text = String::new();
    eventually("a good run in the sync's metrics", async || {
        text = metrics().await;
        sample(&text, r#"reassigned_sync_runs_total{result="ok"}"#).is_some_and(|n| n >= 1.0)
    })
    .await;
    for (name, value) in [
        (
            r#"reassigned_import_runs_total{kind="snapshot",result="ok"}"#,
            1.0,
        ),
        (r#"reassigned_import_records_applied_total{kind="snapshot"}"#, 1.0),
        ("reassigned_sync_mirror_sequence", 1.0),
        ("reassigned_sync_consecutive_failures", 0.0),
        ("reassigned_sync_interval_seconds", 0.2),
        (r#"reassigned_sync_errors_total{kind="sequence_gap"}"#, 0.0),
    ] {
        assert_eq!(sample(&text, name), Some(value), "{name} in\n{text}");
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let last_success = sample(&text, "reassigned_sync_last_success_timestamp_seconds").expect("last success");
    assert!((now - last_success).abs() < 300.0, "{last_success} vs {now}");
    assert!(text.contains("reassigned_build_info{"), "{text}");
    assert!(text.contains("process_resident_memory_bytes "), "{text}");
    assert!(!text.contains("reassigned_sync_last_error_info"), "{text}");
    assert_eq!(
        admin::get(&addr, "/livez", Duration::from_secs(5))
            .await
            .expect("livez"),
        (200, "ok".to_owned())
    );
    assert_eq!(
        admin::get(&addr, "/readyz", Duration::from_secs(5))
            .await
            .expect("404")
            .0,
        404
    );

    // A delta that skips sequence 2: every run from now on fails.
    let as_of = Date::today_utc().add_days(-1).to_string();
    FileSpec::delta(3, &as_of, &[("+14155550002", "2024-06-01")]).write(&register, "d3");
    eventually("failed runs in the sync's metrics", async || {
        text = metrics().await;
        sample(&text, r#"reassigned_sync_errors_total{kind="sequence_gap"}"#).is_some_and(|n| n >= 1.0)
    })
    .await;
    assert_eq!(
        sample(&text, r#"reassigned_sync_last_error_info{kind="sequence_gap"}"#),
        Some(1.0),
        "{text}"
    );
    assert!(sample(&text, "reassigned_sync_consecutive_failures").is_some_and(|n| n >= 1.0));
    assert!(sample(&text, r#"reassigned_sync_runs_total{result="error"}"#).is_some_and(|n| n >= 1.0));
    assert!(sample(&text, "reassigned_sync_last_error_timestamp_seconds").is_some_and(|t| t >= last_success));
    assert_eq!(
        sample(&text, "reassigned_sync_mirror_sequence"),
        Some(1.0),
        "{text}"
    );

    child.signal("TERM");
    let mut status = None;
    eventually("sync --every exits on SIGTERM", async || {
        status = child.0.try_wait().expect("try_wait");
        status.is_some()
    })
    .await;
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );

    // One-shot with a textfile: the missing delta 2 arrives, the run applies 2 and 3.
    FileSpec::delta(2, &as_of, &[("+14155550003", "2024-06-01")]).write(&register, "d2");
    let textfile = dir.path().join("reassigned_sync.prom");
    let once_log = dir.path().join("sync-once.log");
    let textfile_arg = [OsStr::new("--metrics-textfile"), textfile.as_os_str()];
    let out = sync_cmd(&redis, &textfile_arg, &register, &once_log)
        .status()
        .expect("run sync");
    assert!(
        out.success(),
        "{}",
        std::fs::read_to_string(&once_log).unwrap_or_default()
    );
    let text = std::fs::read_to_string(&textfile).expect("the textfile");
    for (name, value) in [
        (r#"reassigned_sync_runs_total{result="ok"}"#, 1.0),
        (r#"reassigned_sync_runs_total{result="error"}"#, 0.0),
        ("reassigned_sync_mirror_sequence", 3.0),
        ("reassigned_sync_interval_seconds", 0.0),
        (r#"reassigned_import_runs_total{kind="delta",result="ok"}"#, 2.0),
    ] {
        assert_eq!(sample(&text, name), Some(value), "{name} in\n{text}");
    }
    assert!(
        !text.contains("process_cpu_seconds_total"),
        "no figures of an exited process: {text}"
    );

    // A failing one-shot run: exit 1, and the file says why.
    FileSpec::delta(5, &as_of, &[("+14155550004", "2024-06-01")]).write(&register, "d5");
    let out = sync_cmd(&redis, &textfile_arg, &register, &once_log)
        .status()
        .expect("run sync");
    assert_eq!(out.code(), Some(1));
    let text = std::fs::read_to_string(&textfile).expect("the textfile");
    assert_eq!(
        sample(&text, r#"reassigned_sync_runs_total{result="error"}"#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, r#"reassigned_sync_last_error_info{kind="sequence_gap"}"#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "reassigned_sync_last_success_timestamp_seconds"),
        Some(0.0),
        "{text}"
    );
}
