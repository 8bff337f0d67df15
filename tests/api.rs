//! The service over real mutual TLS, against both stores: the embedded store
//! Redis (a `redis-server` this test starts on its own port) and a 3-master
//! Redis Cluster the test starts. Every test runs once per store.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use reassigned::api::pb::{
    self, BatchCheckNumbersRequest, CheckNumberRequest, NoDataReason, ReassignmentStatus, batch_check_result,
};
use reassigned::domain::Date;
use reassigned::import::{self, Applied, ImportError, NoProgress};
use reassigned::store::redis::RedisOptions;
use reassigned::store::{AnyStore, EmbeddedStore, RedisStore};
use support::per_store_tests;
use support::poll::{eventually, eventually_within};
use support::redis::RedisServer;
use support::redis_cluster::RedisCluster;
use support::register::FileSpec;
use support::server::{TestServer, check_request as req};
use tempfile::TempDir;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt;

#[derive(Clone, Copy, Debug)]
enum Kind {
    Embedded,
    Redis,
    RedisCluster,
}

/// Redis store options for tests: a short grace before a replaced
/// generation is deleted, so snapshot tests do not wait 3 s. The store
/// raises the grace to at least `3 x meta_refresh + timeout` (every reader
/// must have seen the switch), so the metadata refresh is short too: the
/// grace is 500 ms, the same store serves and imports.
fn test_redis_options() -> RedisOptions {
    RedisOptions {
        meta_refresh: Duration::from_millis(100),
        reclaim_grace: Duration::from_millis(300),
        ..RedisOptions::default()
    }
}

/// A store of one kind, and a directory for register files.
struct Env {
    store: AnyStore,
    redis: Option<RedisServer>,
    /// Kept alive while the test runs (Kind::RedisCluster).
    _cluster: Option<RedisCluster>,
    files: TempDir,
}

impl Env {
    async fn new(kind: Kind) -> Self {
        let mut cluster = None;
        let (store, redis) = match kind {
            Kind::Embedded => (AnyStore::Embedded(Arc::new(EmbeddedStore::new())), None),
            Kind::Redis => {
                let server = RedisServer::start();
                let store = RedisStore::connect(&server.url(), test_redis_options())
                    .await
                    .expect("connect to redis");
                (AnyStore::Redis(store), Some(server))
            }
            Kind::RedisCluster => {
                let nodes = RedisCluster::start();
                let store = RedisStore::connect_cluster(&nodes.urls(), test_redis_options())
                    .await
                    .expect("connect to the redis cluster");
                cluster = Some(nodes);
                (AnyStore::Redis(store), None)
            }
        };
        Self {
            store,
            redis,
            _cluster: cluster,
            files: tempfile::tempdir().expect("tempdir"),
        }
    }

    async fn apply(&self, spec: FileSpec<'_>, name: &str) -> Result<Applied, ImportError> {
        let path = spec.write(self.files.path(), name);
        import::apply_manifest(&self.store, &path, &mut NoProgress).await
    }

    async fn serve(&self) -> TestServer {
        TestServer::start(self.store.clone(), |_| {}).await
    }
}

fn days_ago(n: i32) -> String {
    Date::today_utc().add_days(-n).to_string()
}

const A: &str = "+14155550001"; // disconnected 2024-05-01
const B: &str = "+8613800000002"; // disconnected 2023-01-01
const ABSENT: &str = "+14155550099";
const FOREIGN: &str = "+442079460000";
const COVERAGE_START: &str = "2021-01-27";

fn base_snapshot<'a>() -> FileSpec<'a> {
    FileSpec::snapshot(
        1,
        &days_ago(10),
        COVERAGE_START,
        &["+1", "+86"],
        &[(A, "2024-05-01"), (B, "2023-01-01")],
    )
}

async fn check(server: &TestServer, number: &str, since: &str) -> pb::CheckNumberResponse {
    server
        .client()
        .await
        .check_number(req(number, since))
        .await
        .unwrap_or_else(|e| panic!("check failed: {e}"))
        .into_inner()
}

fn answer(status: ReassignmentStatus, reason: NoDataReason) -> (i32, i32) {
    (status as i32, reason as i32)
}

fn got(r: &pb::CheckNumberResponse) -> (i32, i32) {
    (r.status, r.no_data_reason)
}

const REASSIGNED: (ReassignmentStatus, NoDataReason) =
    (ReassignmentStatus::Reassigned, NoDataReason::Unspecified);
const NOT_REASSIGNED: (ReassignmentStatus, NoDataReason) =
    (ReassignmentStatus::NotReassigned, NoDataReason::Unspecified);

async fn expect(server: &TestServer, number: &str, since: &str, want: (ReassignmentStatus, NoDataReason)) {
    let r = check(server, number, since).await;
    assert_eq!(got(&r), answer(want.0, want.1), "{number} since {since}: {r:?}");
    assert_eq!(r.phone_number, number);
}

async fn answer_table(kind: Kind) {
    let env = Env::new(kind).await;
    let server = env.serve().await;
    // empty mirror
    expect(
        &server,
        ABSENT,
        "2024-01-01",
        (ReassignmentStatus::NoData, NoDataReason::MirrorEmpty),
    )
    .await;
    let status = server.mirror_status().await;
    assert_eq!(status.data_as_of, "");

    env.apply(base_snapshot(), "s1").await.expect("snapshot");
    let as_of = days_ago(10);
    let today = Date::today_utc().to_string();
    for (number, since, want) in [
        // disconnect on X and after X
        (A, "2024-05-01", REASSIGNED),
        (A, "2024-04-30", REASSIGNED),
        (B, "2022-02-01", REASSIGNED),
        // disconnect before X
        (A, "2024-05-02", NOT_REASSIGNED),
        // absent and covered
        (ABSENT, "2022-01-01", NOT_REASSIGNED),
        // coverage start is covered; the day before is not
        (ABSENT, COVERAGE_START, NOT_REASSIGNED),
        (
            ABSENT,
            "2021-01-26",
            (ReassignmentStatus::NoData, NoDataReason::BeforeCoverage),
        ),
        // a known disconnect wins over the coverage start
        (A, "2019-06-01", REASSIGNED),
        // not under a covered prefix
        (
            FOREIGN,
            "2022-01-01",
            (ReassignmentStatus::NoData, NoDataReason::NumberNotCovered),
        ),
        // today is allowed
        (A, today.as_str(), NOT_REASSIGNED),
    ] {
        expect(&server, number, since, want).await;
    }

    let r = check(&server, A, "2024-01-01").await;
    assert_eq!(r.data_as_of, as_of);

    let status = server.mirror_status().await;
    assert_eq!(status.data_as_of, as_of);
    assert_eq!(status.coverage_start, COVERAGE_START);
    assert_eq!(status.covered_prefixes, ["+1", "+86"]);
    assert_eq!(status.record_count, 2);
    assert_eq!(status.sequence, 1);
    assert!(!status.stale);
    assert!(status.last_import_time.is_some_and(|t| t.seconds > 0));
    server.stop().await;

    // staleness: as_of is 10 days old; 10 allowed days is fresh, 9 is stale
    let fresh = TestServer::start(env.store.clone(), |s| s.max_staleness_days = Some(10)).await;
    expect(&fresh, ABSENT, "2022-01-01", NOT_REASSIGNED).await;
    fresh.stop().await;
    let stale = TestServer::start(env.store.clone(), |s| s.max_staleness_days = Some(9)).await;
    expect(
        &stale,
        ABSENT,
        "2022-01-01",
        (ReassignmentStatus::NoData, NoDataReason::MirrorStale),
    )
    .await;
    expect(&stale, A, "2022-01-01", REASSIGNED).await;
    expect(
        &stale,
        A,
        "2024-06-01",
        (ReassignmentStatus::NoData, NoDataReason::MirrorStale),
    )
    .await;
    let status = stale.mirror_status().await;
    assert!(status.stale);
    stale.stop().await;
}

fn violations(status: &tonic::Status) -> Vec<(String, String)> {
    status
        .get_details_bad_request()
        .map(|b| {
            b.field_violations
                .into_iter()
                .map(|v| (v.field, v.description))
                .collect()
        })
        .unwrap_or_default()
}

async fn bad_input(kind: Kind) {
    let env = Env::new(kind).await;
    env.apply(base_snapshot(), "s1").await.expect("snapshot");
    let server = env.serve().await;
    let mut client = server.client().await;
    let tomorrow = Date::today_utc().add_days(1).to_string();
    let cases: &[(&str, &str, &[&str])] = &[
        ("4155550123", "2024-01-01", &["phone_number"]),
        ("+1 415 555 0123", "2024-01-01", &["phone_number"]),
        ("+1-415-555-0123", "2024-01-01", &["phone_number"]),
        ("+0415555012", "2024-01-01", &["phone_number"]),
        ("+1234", "2024-01-01", &["phone_number"]),
        ("+1234567890123456", "2024-01-01", &["phone_number"]),
        ("", "2024-01-01", &["phone_number"]),
        (A, "2025-02-30", &["since"]),
        (A, "2024/01/01", &["since"]),
        (A, "", &["since"]),
        (A, &tomorrow, &["since"]),
        ("nope", "never", &["phone_number", "since"]),
    ];
    for (number, since, fields) in cases {
        let e = client
            .check_number(req(number, since))
            .await
            .expect_err("must fail");
        assert_eq!(e.code(), Code::InvalidArgument, "{number:?} {since:?}: {e:?}");
        let v = violations(&e);
        assert_eq!(
            v.iter().map(|(f, _)| f.as_str()).collect::<Vec<_>>(),
            *fields,
            "{e:?}"
        );
        assert!(v.iter().all(|(_, reason)| !reason.is_empty()));
        for field in *fields {
            assert!(
                e.message().contains(field),
                "message names the field: {}",
                e.message()
            );
        }
    }
    let e = client.check_number(req(A, &tomorrow)).await.expect_err("future");
    assert!(e.message().contains("after today"), "{}", e.message());
    server.stop().await;
}

async fn batch(kind: Kind) {
    let env = Env::new(kind).await;
    env.apply(base_snapshot(), "s1").await.expect("snapshot");
    let server = TestServer::start(env.store.clone(), |s| s.max_batch = Some(5)).await;
    let mut client = server.client().await;
    let checks = vec![
        req(A, "2024-01-01"),
        req("+1 415", "2024-01-01"),
        req(ABSENT, "2024-01-01"),
        req(B, "2025-02-30"),
        req(FOREIGN, "2024-01-01"),
    ];
    let results = client
        .batch_check_numbers(BatchCheckNumbersRequest {
            checks: checks.clone(),
            ..Default::default()
        })
        .await
        .expect("batch")
        .into_inner()
        .results;
    assert_eq!(results.len(), 5);
    let answer_of = |i: usize| match &results[i].result {
        Some(batch_check_result::Result::Answer(a)) => a.clone(),
        other => panic!("item {i}: expected an answer, got {other:?}"),
    };
    let error_of = |i: usize| match &results[i].result {
        Some(batch_check_result::Result::Error(e)) => e.clone(),
        other => panic!("item {i}: expected an error, got {other:?}"),
    };
    assert_eq!(answer_of(0).phone_number, A);
    assert_eq!(got(&answer_of(0)), answer(REASSIGNED.0, REASSIGNED.1));
    assert_eq!(error_of(1).code, "INVALID_ARGUMENT");
    assert!(error_of(1).message.contains("phone_number"), "{:?}", error_of(1));
    assert_eq!(answer_of(2).phone_number, ABSENT);
    assert_eq!(got(&answer_of(2)), answer(NOT_REASSIGNED.0, NOT_REASSIGNED.1));
    assert_eq!(error_of(3).code, "INVALID_ARGUMENT");
    assert!(error_of(3).message.contains("since"), "{:?}", error_of(3));
    assert_eq!(
        got(&answer_of(4)),
        answer(ReassignmentStatus::NoData, NoDataReason::NumberNotCovered)
    );

    // limits: empty and over the configured limit fail the whole call
    for n in [0usize, 6] {
        let checks = vec![req(A, "2024-01-01"); n];
        let e = client
            .batch_check_numbers(BatchCheckNumbersRequest {
                checks,
                ..Default::default()
            })
            .await
            .expect_err("limit");
        assert_eq!(e.code(), Code::InvalidArgument);
        assert_eq!(violations(&e)[0].0, "checks", "{e:?}");
    }
    server.stop().await;
}

async fn client_certificates(kind: Kind) {
    let env = Env::new(kind).await;
    env.apply(base_snapshot(), "s1").await.expect("snapshot");
    let server = env.serve().await;
    let ca = server.certs.pki.ca_cert_pem().to_owned();
    let call = |channel: support::server::TestChannel| async move {
        pb::reassigned_numbers_client::ReassignedNumbersClient::new(channel)
            .check_number(req(A, "2024-01-01"))
            .await
    };
    // a valid certificate works
    let ok = server
        .channel_with(Some(&server.certs.client("platform-b")), &ca)
        .await
        .expect("connect");
    assert!(call(ok).await.is_ok());
    // no certificate, another CA's certificate, an expired one: refused
    let other_ca = reassigned::cli::certs::DevPki::new().expect("other CA");
    let refused = [
        None,
        Some(other_ca.client("platform-a").expect("cert")),
        Some(server.certs.expired_client("platform-a")),
    ];
    for identity in refused.iter() {
        let outcome = match server.channel_with(identity.as_ref(), &ca).await {
            Err(_) => true,
            Ok(channel) => call(channel).await.is_err(),
        };
        assert!(outcome, "a bad client certificate must be refused");
    }
    server.stop().await;
}

async fn health(kind: Kind) {
    let env = Env::new(kind).await;
    let server = env.serve().await;
    let mut health = HealthClient::new(server.channel("platform-a").await);
    let status_of = |name: &'static str| {
        let mut h = health.clone();
        async move {
            h.check(HealthCheckRequest { service: name.into() })
                .await
                .map(|r| r.into_inner().status)
        }
    };
    // empty mirror: not serving
    eventually("health is NOT_SERVING on an empty mirror", || async {
        status_of("").await.ok() == Some(ServingStatus::NotServing as i32)
    })
    .await;
    env.apply(base_snapshot(), "s1").await.expect("snapshot");
    eventually("the service is SERVING after the snapshot", || async {
        status_of("reassigned.v1.ReassignedNumbers").await.ok() == Some(ServingStatus::Serving as i32)
    })
    .await;
    assert_eq!(
        health
            .check(HealthCheckRequest {
                service: String::new()
            })
            .await
            .expect("health")
            .into_inner()
            .status,
        ServingStatus::Serving as i32
    );
    server.stop().await;
}

async fn snapshot_switch_is_atomic(kind: Kind) {
    let env = Env::new(kind).await;
    let set = |base: u64| -> Vec<String> { (0..40).map(|i| format!("+1415556{:04}", base + i)).collect() };
    let (xs, ys) = (set(0), set(1000));
    let rows = |numbers: &[String]| -> Vec<(String, String)> {
        numbers
            .iter()
            .map(|n| (n.clone(), "2024-05-01".to_string()))
            .collect()
    };
    let write_snapshot = |seq: u64, numbers: &[String]| {
        let rows = rows(numbers);
        let rows: Vec<(&str, &str)> = rows.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        FileSpec::snapshot(seq, &days_ago(10), COVERAGE_START, &["+1"], &rows)
    };
    env.apply(write_snapshot(1, &xs), "s1").await.expect("s1");
    let server = env.serve().await;
    let checks: Vec<_> = xs.iter().chain(&ys).map(|n| req(n, "2024-01-01")).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for _ in 0..3 {
        let mut client = server.client().await;
        let (checks, stop) = (checks.clone(), stop.clone());
        readers.push(tokio::spawn(async move {
            let mut seen = (0u32, 0u32);
            while !stop.load(Ordering::Relaxed) {
                let results = client
                    .batch_check_numbers(BatchCheckNumbersRequest {
                        checks: checks.clone(),
                        ..Default::default()
                    })
                    .await
                    .expect("batch")
                    .into_inner()
                    .results;
                let reassigned: Vec<bool> = results
                    .iter()
                    .map(|r| match &r.result {
                        Some(batch_check_result::Result::Answer(a)) => {
                            assert_ne!(
                                a.no_data_reason,
                                NoDataReason::MirrorEmpty as i32,
                                "empty mirror seen"
                            );
                            a.status == ReassignmentStatus::Reassigned as i32
                        }
                        other => panic!("unexpected {other:?}"),
                    })
                    .collect();
                let (x, y) = reassigned.split_at(40);
                let old = x.iter().all(|b| *b) && y.iter().all(|b| !*b);
                let new = x.iter().all(|b| !*b) && y.iter().all(|b| *b);
                assert!(old || new, "a batch saw a mix of two snapshots");
                if old { seen.0 += 1 } else { seen.1 += 1 }
            }
            seen
        }));
    }
    for seq in 2..=5u64 {
        let numbers = if seq % 2 == 0 { &ys } else { &xs };
        env.apply(write_snapshot(seq, numbers), &format!("s{seq}"))
            .await
            .expect("snapshot");
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = (0, 0);
    for r in readers {
        let (a, b) = r.await.expect("reader");
        total = (total.0 + a, total.1 + b);
    }
    assert!(total.0 + total.1 > 0, "readers made no calls");
    // the last snapshot (5) holds xs
    expect(&server, &xs[0], "2024-01-01", REASSIGNED).await;
    expect(&server, &ys[0], "2024-01-01", NOT_REASSIGNED).await;
    server.stop().await;
}

async fn deltas(kind: Kind) {
    let env = Env::new(kind).await;
    env.apply(base_snapshot(), "s1").await.expect("snapshot");
    let c = "+14155550003";
    let delta = || {
        FileSpec::delta(
            2,
            &days_ago(9),
            &[(A, "2024-06-01"), (B, "2022-01-01"), (c, "2024-07-01")],
        )
    };
    let applied = env.apply(delta(), "d2").await.expect("delta");
    assert!(
        matches!(applied, Applied::Delta { sequence: 2, .. }),
        "{applied:?}"
    );
    // the same delta again is a no-op that says so
    let again = env.apply(delta(), "d2").await.expect("again");
    assert!(
        matches!(again, Applied::AlreadyApplied { sequence: 2 }),
        "{again:?}"
    );
    let server = env.serve().await;
    expect(&server, A, "2024-05-15", REASSIGNED).await; // later date taken
    expect(&server, B, "2022-06-01", REASSIGNED).await; // older date did not lower it
    expect(&server, c, "2024-07-01", REASSIGNED).await; // new number
    let status = server.mirror_status().await;
    assert_eq!((status.sequence, status.record_count), (2, 3));
    assert_eq!(status.data_as_of, days_ago(9));

    // a gap is an error and changes nothing
    let gap = env
        .apply(FileSpec::delta(4, &days_ago(8), &[(ABSENT, "2024-08-01")]), "d4")
        .await;
    assert!(matches!(gap, Err(ImportError::SequenceGap { .. })), "{gap:?}");
    // as_of going backwards is refused
    let back = env
        .apply(FileSpec::delta(3, &days_ago(20), &[(ABSENT, "2024-08-01")]), "d3")
        .await;
    assert!(matches!(back, Err(ImportError::AsOfBackwards { .. })), "{back:?}");
    expect(&server, ABSENT, "2024-07-01", NOT_REASSIGNED).await;
    let status = server.mirror_status().await;
    assert_eq!(status.sequence, 2);
    server.stop().await;
}

async fn corrupt_files_change_nothing(kind: Kind) {
    let env = Env::new(kind).await;
    env.apply(base_snapshot(), "s1").await.expect("snapshot");
    let server = env.serve().await;
    let good = "+14155550777";
    // a bad row among good ones
    let mut bad_row = FileSpec::delta(2, &days_ago(9), &[(good, "2024-08-01")]);
    bad_row
        .body
        .push_str("+1-415-555-0000,2024-08-01\n+14155550778,2024-02-30\n");
    let e = env.apply(bad_row, "bad_row").await.expect_err("bad rows");
    let text = e.to_string();
    assert!(text.contains("bad_row.csv"), "names the file: {text}");
    assert!(
        text.contains("line 3") && text.contains("line 4"),
        "names the lines: {text}"
    );
    assert!(!text.contains("4155550778"), "no clear number in errors: {text}");
    // a checksum mismatch
    let mut bad_sum = FileSpec::delta(2, &days_ago(9), &[(good, "2024-08-01")]);
    bad_sum.sha256 = Some("0".repeat(64));
    let e = env.apply(bad_sum, "bad_sum").await.expect_err("checksum");
    assert!(e.to_string().contains("SHA-256"), "{e}");
    // a count mismatch
    let mut bad_count = FileSpec::delta(2, &days_ago(9), &[(good, "2024-08-01")]);
    bad_count.records = Some(7);
    let e = env.apply(bad_count, "bad_count").await.expect_err("count");
    assert!(e.to_string().contains('7'), "{e}");
    // a corrupt snapshot
    let mut bad_snapshot =
        FileSpec::snapshot(5, &days_ago(5), COVERAGE_START, &["+1"], &[(good, "2024-08-01")]);
    bad_snapshot.body.push_str("not a row\n");
    env.apply(bad_snapshot, "bad_snapshot")
        .await
        .expect_err("bad snapshot");
    // nothing changed
    expect(&server, good, "2024-01-01", NOT_REASSIGNED).await;
    expect(&server, A, "2024-01-01", REASSIGNED).await;
    let status = server.mirror_status().await;
    assert_eq!((status.sequence, status.record_count), (1, 2));
    server.stop().await;
}

async fn stream(kind: Kind) {
    let env = Env::new(kind).await;
    env.apply(base_snapshot(), "s1").await.expect("snapshot");
    let server = env.serve().await;
    let mut client = server.client().await;
    // 3,000 requests: every 7th is malformed, every 5th is a hit; results in order
    let requests: Vec<CheckNumberRequest> = (0..3000u32)
        .map(|i| match i {
            i if i % 7 == 3 => req("+1 415", "2024-01-01"),
            i if i.is_multiple_of(5) => req(A, "2024-01-01"),
            i => req(&format!("+1415557{i:04}"), "2024-01-01"),
        })
        .collect();
    let response = client
        .stream_check_numbers(tokio_stream::iter(requests.clone()))
        .await
        .expect("stream");
    let mut results = response.into_inner();
    let mut n = 0usize;
    while let Some(item) = results.message().await.expect("stream item") {
        let i = n;
        n += 1;
        match (&item.result, i % 7 == 3) {
            (Some(batch_check_result::Result::Error(e)), true) => assert_eq!(e.code, "INVALID_ARGUMENT"),
            (Some(batch_check_result::Result::Answer(a)), false) => {
                assert_eq!(a.phone_number, requests[i].phone_number, "item {i} out of order");
                let want = if i.is_multiple_of(5) {
                    REASSIGNED
                } else {
                    NOT_REASSIGNED
                };
                assert_eq!(got(a), answer(want.0, want.1), "item {i}");
            }
            other => panic!("item {i}: unexpected {other:?}"),
        }
    }
    assert_eq!(n, requests.len(), "one result per request");
    server.stop().await;
}

per_store_tests!(
    embedded => super::Kind::Embedded,
    redis => super::Kind::Redis,
    redis_cluster => super::Kind::RedisCluster;
    answer_table,
    bad_input,
    batch,
    client_certificates,
    health,
    snapshot_switch_is_atomic,
    deltas,
    corrupt_files_change_nothing,
    stream,
);

/// Redis stops mid-run: calls fail fast with UNAVAILABLE and health says
/// NOT_SERVING; when Redis is back the same server answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_and_recovery() {
    let mut env = Env::new(Kind::Redis).await;
    env.apply(base_snapshot(), "s1").await.expect("snapshot");
    let server = env.serve().await;
    let mut client = server.client().await;
    let health = HealthClient::new(server.channel("platform-a").await);
    expect(&server, A, "2024-01-01", REASSIGNED).await;

    let redis = env.redis.as_mut().expect("redis");
    redis.stop();
    let started = Instant::now();
    let e = client
        .check_number(req(A, "2024-01-01"))
        .await
        .expect_err("redis is down");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    let e = client
        .batch_check_numbers(BatchCheckNumbersRequest {
            checks: vec![req(A, "2024-01-01")],
            ..Default::default()
        })
        .await
        .expect_err("redis is down");
    assert_eq!(e.code(), Code::Unavailable);
    let h = health.clone();
    eventually("health is NOT_SERVING while redis is down", move || {
        let mut h = h.clone();
        async move {
            h.check(HealthCheckRequest::default())
                .await
                .ok()
                .map(|r| r.into_inner().status)
                == Some(ServingStatus::NotServing as i32)
        }
    })
    .await;

    redis.restart();
    let c = client.clone();
    eventually("lookups answer again after redis restarts", move || {
        let mut c = c.clone();
        async move { c.check_number(req(A, "2024-01-01")).await.is_ok() }
    })
    .await;
    let r = client
        .check_number(req(A, "2024-01-01"))
        .await
        .expect("answers again")
        .into_inner();
    assert_eq!(r.status, ReassignmentStatus::Reassigned as i32);
    eventually("health is SERVING again", move || {
        let mut h = health.clone();
        async move {
            h.check(HealthCheckRequest::default())
                .await
                .ok()
                .map(|r| r.into_inner().status)
                == Some(ServingStatus::Serving as i32)
        }
    })
    .await;
    server.stop().await;
}

/// A client that sends a long stream but never reads the results: the server
/// stops taking requests once its bounded buffer and the HTTP/2 windows are
/// full, instead of buffering without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_is_not_read_stops_the_server_reading() {
    let env = Env::new(Kind::Embedded).await;
    env.apply(base_snapshot(), "s1").await.expect("snapshot");
    let server = env.serve().await;
    let mut client = server.client().await;
    const TOTAL: u64 = 400_000;
    let taken = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = taken.clone();
    let requests = futures_util::stream::iter(0..TOTAL).map(move |i| {
        counter.fetch_add(1, Ordering::Relaxed);
        req(&format!("+1415{:07}", i % 10_000_000), "2024-01-01")
    });
    // The response headers arrive; the results are never read.
    let results = client.stream_check_numbers(requests).await.expect("stream");
    // Wait until the client has stopped handing over requests, then check
    // that it stopped far short of the whole stream. A stop can only be seen
    // as no progress for a while: the 1 s quiet window is the subject here,
    // the condition is polled.
    let quiet = Duration::from_secs(1);
    let (mut last, mut since) = (u64::MAX, Instant::now());
    eventually_within(
        "the client stops handing over requests",
        Duration::from_secs(60),
        || {
            let now = taken.load(Ordering::Relaxed);
            if now != last {
                (last, since) = (now, Instant::now());
            }
            let stopped = now == TOTAL || since.elapsed() >= quiet;
            async move { stopped }
        },
    )
    .await;
    let now = taken.load(Ordering::Relaxed);
    assert!(
        now < TOTAL / 2,
        "the server took {now} of {TOTAL} requests without its results being read"
    );
    eprintln!("the server took {now} of {TOTAL} requests before pushing back");
    // Hang up, so that the graceful stop has no call left to wait for.
    drop(results);
    drop(client);
    server.stop().await;
}
