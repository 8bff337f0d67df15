//! The federation's read side over real mutual TLS and tokens: platforms'
//! watch lists (`AddWatches`, `RemoveWatches`, `CountWatches`) on the
//! embedded store (journaled in its data directory), on a real
//! `redis-server` and on a Redis Cluster the test starts.

mod support;

use std::path::Path;
use std::sync::Arc;

use reassigned::api::pb::watchlist_client::WatchlistClient;
use reassigned::api::pb::{self, watch_result};
use reassigned::federation::watch::{RedisWatchLists, WatchKey, WatchLists};
use reassigned::store::redis::RedisOptions;
use reassigned::store::{AnyStore, EmbeddedStore, RedisStore};
use support::per_store_tests;
use support::redis::RedisServer;
use support::redis_cluster::RedisCluster;
use support::server::{TestChannel, TestServer};
use tonic::Code;
use tonic_types::StatusExt;

const X: &str = "+12015550100";
const Y: &str = "+8613800138000";

#[derive(Clone, Copy, Debug)]
enum Kind {
    Embedded,
    Redis,
    RedisCluster,
}

/// A store of one kind and what keeps it alive.
struct Env {
    store: AnyStore,
    _redis: Option<RedisServer>,
    _cluster: Option<RedisCluster>,
}

impl Env {
    async fn new(kind: Kind) -> Self {
        match kind {
            Kind::Embedded => Self {
                store: AnyStore::Embedded(Arc::new(EmbeddedStore::new())),
                _redis: None,
                _cluster: None,
            },
            Kind::Redis => {
                let server = RedisServer::start();
                let store = RedisStore::connect(&server.url(), RedisOptions::default())
                    .await
                    .expect("connect to redis");
                Self {
                    store: AnyStore::Redis(store),
                    _redis: Some(server),
                    _cluster: None,
                }
            }
            Kind::RedisCluster => {
                let nodes = RedisCluster::start();
                let store = RedisStore::connect_cluster(&nodes.urls(), RedisOptions::default())
                    .await
                    .expect("connect to the cluster");
                Self {
                    store: AnyStore::Redis(store),
                    _redis: None,
                    _cluster: Some(nodes),
                }
            }
        }
    }
}

/// Writes a watch key into `dir` and returns its path.
fn watch_key(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("watch.key");
    std::fs::write(&path, "a-watch-key-of-this-test-0123456789\n").expect("write key");
    path
}

/// A server over `store` with watch lists on, its data directory `data`.
async fn start(store: AnyStore, data: &Path) -> TestServer {
    let data = data.to_owned();
    TestServer::start_in(store, move |s, dir| {
        s.watch_key_file = Some(watch_key(dir));
        s.data_dir = Some(data);
    })
    .await
}

async fn client(server: &TestServer, platform: &str) -> WatchlistClient<TestChannel> {
    WatchlistClient::new(server.channel(platform).await)
}

fn numbers(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// `changed` per result, or the error's code and message.
fn outcomes(results: &[pb::WatchResult]) -> Vec<Result<bool, (String, String)>> {
    results
        .iter()
        .map(|r| match r.outcome.as_ref().expect("an outcome") {
            watch_result::Outcome::Changed(c) => Ok(*c),
            watch_result::Outcome::Error(e) => Err((e.code.clone(), e.message.clone())),
        })
        .collect()
}

async fn add(c: &mut WatchlistClient<TestChannel>, list: &[&str]) -> Vec<Result<bool, (String, String)>> {
    let r = c
        .add_watches(pb::AddWatchesRequest {
            phone_numbers: numbers(list),
        })
        .await
        .expect("AddWatches")
        .into_inner();
    assert_eq!(r.results.len(), list.len());
    for (result, number) in r.results.iter().zip(list) {
        assert_eq!(&result.phone_number, number, "results follow the request order");
    }
    outcomes(&r.results)
}

async fn remove(c: &mut WatchlistClient<TestChannel>, list: &[&str]) -> Vec<Result<bool, (String, String)>> {
    let r = c
        .remove_watches(pb::RemoveWatchesRequest {
            phone_numbers: numbers(list),
        })
        .await
        .expect("RemoveWatches")
        .into_inner();
    outcomes(&r.results)
}

async fn count(c: &mut WatchlistClient<TestChannel>) -> u64 {
    c.count_watches(pb::CountWatchesRequest {})
        .await
        .expect("CountWatches")
        .into_inner()
        .count
}

per_store_tests!(
    embedded => super::Kind::Embedded,
    redis_single => super::Kind::Redis,
    redis_cluster => super::Kind::RedisCluster;
    lists_are_per_platform_and_per_item,
);

async fn lists_are_per_platform_and_per_item(kind: Kind) {
    let env = Env::new(kind).await;
    let data = tempfile::tempdir().expect("tempdir");
    let server = start(env.store.clone(), data.path()).await;
    let mut a = client(&server, "platform-a").await;
    let mut b = client(&server, "platform-b").await;

    let got = add(&mut a, &[X, Y, X, "+120", "12015550100"]).await;
    assert_eq!(
        got[..3],
        [Ok(true), Ok(true), Ok(false)],
        "a repeat in one call changes once"
    );
    for (i, item) in got.iter().enumerate().skip(3) {
        let (code, message) = item.clone().expect_err("a malformed number is refused per item");
        assert_eq!(code, "INVALID_ARGUMENT");
        assert!(message.starts_with(&format!("phone_numbers[{i}]: ")), "{message}");
    }
    assert_eq!(add(&mut a, &[X]).await, [Ok(false)], "already watched");
    assert_eq!(count(&mut a).await, 2);

    // Platform B sees, counts and changes only its own list.
    assert_eq!(count(&mut b).await, 0);
    assert_eq!(remove(&mut b, &[X]).await, [Ok(false)], "B does not watch X");
    assert_eq!(count(&mut a).await, 2, "B's removal left A's list alone");
    assert_eq!(add(&mut b, &[X]).await, [Ok(true)], "B's list is its own");
    assert_eq!(count(&mut b).await, 1);
    assert_eq!(remove(&mut a, &[Y, Y]).await, [Ok(true), Ok(false)]);
    assert_eq!(count(&mut a).await, 1);
    assert_eq!(count(&mut b).await, 1);

    // The server's own view agrees (this is what delivery asks).
    if let AnyStore::Redis(redis) = &env.store {
        let key = WatchKey::load(&server.config.watch_key_file.clone().expect("key")).expect("key");
        let lists = WatchLists::Redis(Arc::new(RedisWatchLists::new(redis.clone(), key)));
        let (x, y) = (X.parse().expect("X"), Y.parse().expect("Y"));
        let platform = |name| reassigned::cli::certs::platform_uri(name);
        assert_eq!(
            lists
                .watching(&platform("platform-a"), &[x, y])
                .await
                .expect("watching"),
            [true, false]
        );
        assert_eq!(
            lists
                .watching(&platform("platform-c"), &[x, y])
                .await
                .expect("watching"),
            [false, false]
        );
        // No number in clear anywhere in Redis.
        let mut conn = redis.connection();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("*")
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        for k in &keys {
            assert!(!k.contains("2015550100") && !k.contains("platform"), "{k}");
        }
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_list_sizes_are_invalid_argument_with_a_field_violation() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = start(AnyStore::Embedded(Arc::new(EmbeddedStore::new())), data.path()).await;
    let mut a = client(&server, "platform-a").await;
    for size in [0usize, 10_001] {
        let list = vec![X.to_owned(); size];
        let add = a
            .add_watches(pb::AddWatchesRequest {
                phone_numbers: list.clone(),
            })
            .await
            .expect_err("refused");
        let remove = a
            .remove_watches(pb::RemoveWatchesRequest { phone_numbers: list })
            .await
            .expect_err("refused");
        for status in [add, remove] {
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
            let violations = status
                .get_details_bad_request()
                .expect("BadRequest")
                .field_violations;
            assert_eq!(violations.len(), 1);
            assert_eq!(violations[0].field, "phone_numbers");
            assert!(violations[0].description.contains("1 to 10000"), "{violations:?}");
        }
    }
    // 10,000 is allowed.
    let r = add(&mut a, &vec![X; 10_000]).await;
    assert_eq!(r.iter().filter(|o| **o == Ok(true)).count(), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_watch_key_the_service_is_failed_precondition() {
    let server = TestServer::start(AnyStore::Embedded(Arc::new(EmbeddedStore::new())), |_| {}).await;
    let mut a = client(&server, "platform-a").await;
    let status = a
        .count_watches(pb::CountWatchesRequest {})
        .await
        .expect_err("off");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("watch key"), "{status:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_lists_survive_a_restart_and_a_torn_journal_tail() {
    let data = tempfile::tempdir().expect("tempdir");
    let store = || AnyStore::Embedded(Arc::new(EmbeddedStore::new()));
    let server = start(store(), data.path()).await;
    let mut a = client(&server, "platform-a").await;
    add(&mut a, &[X, Y]).await;
    remove(&mut a, &[Y]).await;
    server.stop().await;
    // A crash in the middle of an append leaves a torn record: dropped.
    let journal = data.path().join(reassigned::federation::watch::WATCH_JOURNAL);
    let mut bytes = std::fs::read(&journal).expect("journal");
    bytes.extend_from_slice(&[40, 0, 0, 0, 1, 2]);
    std::fs::write(&journal, &bytes).expect("tear");

    let server = start(store(), data.path()).await;
    let mut a = client(&server, "platform-a").await;
    assert_eq!(count(&mut a).await, 1);
    assert_eq!(add(&mut a, &[X, Y]).await, [Ok(false), Ok(true)]);
    server.stop().await;

    // A damaged record in the middle refuses to start, naming the offset.
    let mut bytes = std::fs::read(&journal).expect("journal");
    bytes[10] ^= 0xff;
    std::fs::write(&journal, &bytes).expect("corrupt");
    let key_dir = tempfile::tempdir().expect("tempdir");
    let err = reassigned::federation::watch::EmbeddedWatchLists::open(
        WatchKey::load(&watch_key(key_dir.path())).expect("key"),
        data.path(),
    )
    .err()
    .expect("a corrupt journal refuses to open");
    assert!(err.to_string().contains("offset 0"), "{err}");
}

/// The memory figure of the README: bytes per watched number in Redis
/// (INFO memory), 10^7 numbers on one platform's list. Heavy: run with
/// `cargo test --test federation_watch -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: 10^7 numbers into a real redis-server"]
async fn redis_bytes_per_watched_number() {
    let total: u64 = std::env::var("WATCH_MEMORY_NUMBERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000);
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url(), RedisOptions::default())
        .await
        .expect("connect");
    let before = store.used_memory().await.expect("INFO memory");
    let lists = WatchLists::Redis(Arc::new(RedisWatchLists::new(
        store.clone(),
        WatchKey::new(b"a-watch-key-of-this-test-0123456789"),
    )));
    let first = 12_015_550_000u64;
    let mut added = 0u64;
    let started = std::time::Instant::now();
    while added < total {
        let batch: Vec<_> = (added..(added + 10_000).min(total))
            .map(|i| reassigned::domain::PhoneNumber::from_value(first + i).expect("number"))
            .collect();
        let changed = lists.add("platform-a", &batch).await.expect("add");
        assert!(changed.iter().all(|c| *c));
        added += batch.len() as u64;
    }
    let after = store.used_memory().await.expect("INFO memory");
    assert_eq!(lists.count("platform-a").await.expect("count"), total);
    let per = (after - before) as f64 / total as f64;
    println!(
        "watched numbers: {total}; used_memory grew {} bytes: {per:.1} bytes per number; loaded in {:?}",
        after - before,
        started.elapsed()
    );
    assert!(per <= 24.0, "{per:.1} bytes per number");
}

/// The platform's CLI against a real server: `watchlist add --file` loads a
/// list (a bad line refused, non-zero exit), `watchlist count` counts it,
/// and `watch --cursor-file` prints events as JSON lines and resumes after
/// the last one it printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_loads_a_list_and_follows_events_with_a_cursor_file() {
    use reassigned::federation::log::RedisLog;
    use reassigned::federation::{Event, EventKind, EventLog};
    use support::bin::bin;

    let redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let store = RedisStore::connect(&redis.url(), RedisOptions::default())
        .await
        .expect("connect");
    let log = RedisLog::open(&store).await;
    let data = tempfile::tempdir().expect("tempdir");
    let server = start(AnyStore::Redis(store), data.path()).await;
    let files = tempfile::tempdir().expect("tempdir");
    let client = server.client_files("platform-a", files.path());
    let token = server
        .tokens
        .as_ref()
        .expect("tokens")
        .mint(&client.identity, "watch:read watch:write");
    let port = server.addr.port().to_string();
    let client_args = |cmd: &mut std::process::Command| {
        cmd.args(["--target", &format!("127.0.0.1:{port}")])
            .args(client.args())
            .args(["--token", &token]);
    };
    let run = |args: &[&str]| {
        let mut cmd = bin();
        cmd.args(args);
        client_args(&mut cmd);
        cmd
    };
    let numbers = files.path().join("numbers.txt");
    std::fs::write(&numbers, format!("{X}\n# a comment\n\n{Y}\n+12\n")).expect("numbers");
    let mut add = run(&["watchlist", "add"]);
    add.arg("--file").arg(&numbers);
    let out = tokio::task::spawn_blocking(move || add.output().expect("run"))
        .await
        .expect("join");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        !out.status.success(),
        "a refused line fails the command: {stdout} {stderr}"
    );
    assert!(
        stdout.contains("added: 2, already watched: 0, refused: 1"),
        "{stdout}"
    );
    assert!(stderr.contains("line 5: refused: INVALID_ARGUMENT"), "{stderr}");
    let mut count = run(&["watchlist", "count"]);
    let out = tokio::task::spawn_blocking(move || support::bin::run(&mut count))
        .await
        .expect("join");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "2");

    let event = |id: &str, number: &str| {
        let day = reassigned::domain::Date::parse("2026-11-02").expect("date");
        Event {
            event_id: id.to_owned(),
            number: number.parse().expect("number"),
            disconnect_date: day,
            earliest_reissue_date: day.add_days(90),
            source: "operator-a".into(),
            kind: EventKind::Disconnected,
            accepted_unix_ms: 1_764_000_000_000,
        }
    };
    // Before the first run: a missing cursor file starts at the oldest
    // event held, so nothing between loading the list and cron is lost.
    log.append(&[event("e1", X), event("e0", "+12015550199")])
        .await
        .expect("append");
    let cursor_file = files.path().join("cursor");
    let watch = || {
        let mut cmd = run(&["watch", "--idle-exit-secs", "2"]);
        cmd.arg("--cursor-file").arg(&cursor_file);
        cmd
    };
    let mut first = watch();
    let out = tokio::task::spawn_blocking(move || support::bin::run(&mut first))
        .await
        .expect("join");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["event_id"], "e1");
    assert_eq!(lines[0]["phone_number"], X);
    assert_eq!(lines[0]["kind"], "DISCONNECTED");
    assert_eq!(lines[0]["earliest_reissue_date"], "2027-01-31");
    let saved = std::fs::read_to_string(&cursor_file).expect("cursor saved");
    assert_eq!(saved, lines[0]["cursor"].as_str().expect("cursor"));

    log.append(&[event("e2", Y)]).await.expect("append");
    let mut second = watch();
    let out = tokio::task::spawn_blocking(move || support::bin::run(&mut second))
        .await
        .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(
        stdout.contains("\"e2\"") && !stdout.contains("\"e1\""),
        "{stdout}"
    );
    server.stop().await;
}
