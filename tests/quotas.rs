//! Per-platform quotas over real mutual TLS: the request rate with its burst,
//! numbers per UTC day, one budget shared by two servers through one
//! `redis-server`, and the local fallback when that Redis hangs.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use reassigned::api::pb::reassigned_numbers_client::ReassignedNumbersClient;
use reassigned::api::pb::{self, BatchCheckNumbersRequest, CheckNumberRequest, batch_check_result};
use reassigned::config::{ServeConfig, ServeSettings};
use reassigned::quota::QuotaFallback;
use reassigned::store::{AnyStore, EmbeddedStore};
use support::redis::RedisServer;
use support::server::TestChannel as Channel;
use support::server::{Certs, TestServer, check_request};
use tonic::Code;
use tonic_types::StatusExt;

const PLATFORM_A: &str = "platform-a";
const PLATFORM_B: &str = "platform-b";

/// The platform id the harness certificates carry for `name`.
fn id(name: &str) -> String {
    format!("spiffe://dev.reassigned/{name}")
}

/// A server over an (empty) embedded store with `quotas` (TOML of the
/// `[quotas]` table) and, if given, a quota Redis. The Redis timeout is long
/// (1 s) so that a loaded test machine does not send calls to the local
/// limiter; [`serve_with_timeout`] sets it.
async fn serve(quotas: &str, quota_redis: Option<String>) -> TestServer {
    serve_with_timeout(quotas, quota_redis, 1_000).await
}

async fn serve_with_timeout(quotas: &str, quota_redis: Option<String>, timeout_ms: u64) -> TestServer {
    let file: ServeSettings = toml::from_str(quotas).expect("quota toml");
    let store = AnyStore::Embedded(Arc::new(EmbeddedStore::new()));
    TestServer::start(store, move |s| {
        s.quotas = file.quotas;
        s.quota_redis = quota_redis;
        s.quota_redis_timeout_ms = Some(timeout_ms);
    })
    .await
}

async fn client(server: &TestServer, platform: &str) -> ReassignedNumbersClient<Channel> {
    ReassignedNumbersClient::new(server.channel(platform).await)
}

fn req(number: &str) -> CheckNumberRequest {
    check_request(number, "2024-01-01")
}

async fn check(client: &mut ReassignedNumbersClient<Channel>) -> Result<(), tonic::Status> {
    client.check_number(req("+14155550001")).await.map(|_| ())
}

fn batch(n: usize) -> BatchCheckNumbersRequest {
    BatchCheckNumbersRequest {
        checks: (0..n).map(|i| req(&format!("+1415555{i:04}"))).collect(),
        ..Default::default()
    }
}

/// Asserts a RESOURCE_EXHAUSTED naming `limit` and returns its retry delay.
fn exhausted(result: Result<(), tonic::Status>, limit: &str) -> Duration {
    let status = result.expect_err("the quota must refuse the call");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains(limit), "{status:?}");
    let delay = status
        .get_details_retry_info()
        .and_then(|info| info.retry_delay)
        .expect("RetryInfo with a delay");
    assert!(delay > Duration::ZERO, "{delay:?}");
    delay
}

fn rate_quota(platform: &str, rps: &str, burst: u32) -> String {
    format!(
        "[quotas.\"{}\"]\nrequests_per_second = {rps}\nburst = {burst}\n",
        id(platform)
    )
}

/// Burst 3, 2 requests/s: three calls pass, the fourth is refused with a
/// retry delay, a call passes again after that delay, and another platform
/// is never affected.
async fn burst_then_retry(quota_redis: Option<String>) {
    let server = serve(&rate_quota(PLATFORM_A, "2", 3), quota_redis).await;
    let mut a = client(&server, PLATFORM_A).await;
    let mut b = client(&server, PLATFORM_B).await;
    for i in 0..3 {
        check(&mut a).await.unwrap_or_else(|e| panic!("call {i}: {e:?}"));
    }
    let delay = exhausted(check(&mut a).await, "rate");
    assert!(delay <= Duration::from_millis(500), "{delay:?}");
    for _ in 0..5 {
        check(&mut b).await.expect("platform-b has no quota");
    }
    // Wait the delay the server asked for, then poll with a deadline (the
    // delay is rounded to whole microseconds; clocks may differ slightly).
    tokio::time::sleep(delay).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match check(&mut a).await {
            Ok(()) => break,
            Err(status) if Instant::now() < deadline => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => panic!("platform-a did not recover: {status:?}"),
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn burst_then_retry_info_then_recovery_per_process() {
    burst_then_retry(None).await;
}

#[tokio::test]
async fn burst_then_retry_info_then_recovery_with_redis() {
    let redis = RedisServer::start();
    burst_then_retry(Some(redis.url())).await;
}

#[tokio::test]
async fn two_servers_share_one_budget_through_redis() {
    let redis = RedisServer::start();
    // One request per 10 s: no refill during the test.
    let quotas = rate_quota(PLATFORM_A, "0.1", 4);
    let one = serve(&quotas, Some(redis.url())).await;
    let two = serve(&quotas, Some(redis.url())).await;
    let mut a1 = client(&one, PLATFORM_A).await;
    let mut a2 = client(&two, PLATFORM_A).await;
    for i in 0..2 {
        check(&mut a1)
            .await
            .unwrap_or_else(|e| panic!("server one, call {i}: {e:?}"));
        check(&mut a2)
            .await
            .unwrap_or_else(|e| panic!("server two, call {i}: {e:?}"));
    }
    // Each server has seen only 2 calls, but the shared budget of 4 is spent.
    exhausted(check(&mut a1).await, "rate");
    exhausted(check(&mut a2).await, "rate");
    // Another platform is unaffected on both.
    check(&mut client(&one, PLATFORM_B).await)
        .await
        .expect("platform-b on one");
    check(&mut client(&two, PLATFORM_B).await)
        .await
        .expect("platform-b on two");
    one.stop().await;
    two.stop().await;
}

#[tokio::test]
async fn a_batch_counts_its_checks_against_the_daily_limit() {
    let redis = RedisServer::start();
    let quotas = format!("[quotas.\"{}\"]\nnumbers_per_day = 15\n", id(PLATFORM_A));
    let server = serve(&quotas, Some(redis.url())).await;
    let mut a = client(&server, PLATFORM_A).await;
    let results = a
        .batch_check_numbers(batch(10))
        .await
        .expect("first batch")
        .into_inner()
        .results;
    assert_eq!(results.len(), 10);
    let delay = exhausted(a.batch_check_numbers(batch(10)).await.map(|_| ()), "daily");
    assert!(delay <= Duration::from_secs(86_400), "{delay:?}");
    // The refused batch was not charged: 5 numbers are left today.
    a.batch_check_numbers(batch(5))
        .await
        .expect("the last 5 numbers of the day");
    exhausted(check(&mut a).await, "daily");
    // Another platform is unaffected.
    let mut b = client(&server, PLATFORM_B).await;
    b.batch_check_numbers(batch(10))
        .await
        .expect("platform-b has no quota");
    server.stop().await;

    // The count is one key per platform that expires at the end of the UTC day.
    let mut con = redis::Client::open(redis.url())
        .expect("client")
        .get_connection()
        .expect("connect");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("rn:quota:*")
        .query(&mut con)
        .expect("KEYS");
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(keys[0].ends_with(":day"), "{keys:?}");
    let used: u64 = redis::cmd("GET").arg(&keys[0]).query(&mut con).expect("GET");
    assert_eq!(used, 15);
    let ttl: i64 = redis::cmd("TTL").arg(&keys[0]).query(&mut con).expect("TTL");
    assert!((1..=86_400).contains(&ttl), "ttl {ttl}");
}

#[tokio::test]
async fn a_stream_is_cut_when_its_numbers_pass_the_daily_limit() {
    let quotas = format!("[quotas.\"{}\"]\nnumbers_per_day = 15\n", id(PLATFORM_A));
    let server = serve(&quotas, None).await;
    let mut a = client(&server, PLATFORM_A).await;
    let requests: Vec<_> = batch(40).checks;
    let mut stream = a
        .stream_check_numbers(tokio_stream::iter(requests))
        .await
        .expect("stream opens")
        .into_inner();
    let mut answered = 0;
    let status = loop {
        match stream.message().await {
            Ok(Some(pb::BatchCheckResult {
                result: Some(batch_check_result::Result::Answer(_)),
            })) => answered += 1,
            Ok(other) => panic!("unexpected stream item {other:?}"),
            Err(status) => break status,
        }
    };
    assert!(answered <= 15, "{answered} answered");
    exhausted(Err(status), "daily");
    server.stop().await;
}

#[tokio::test]
async fn a_hung_quota_redis_falls_back_to_the_local_limiter() {
    let mut redis = RedisServer::start();
    // A short Redis timeout, as in production (default 50 ms; a little more
    // here so that the first call surely goes through Redis on a busy machine).
    let server = serve_with_timeout(&rate_quota(PLATFORM_A, "0.1", 3), Some(redis.url()), 200).await;
    let mut a = client(&server, PLATFORM_A).await;
    // Through Redis: the connection is up and one request of the budget spent.
    check(&mut a).await.expect("first call through redis");
    redis.pause();
    // Every call is answered in bounded time; the local limiter (fresh: it
    // only decides while Redis fails) allows its own burst of 3, then refuses.
    let bound = Duration::from_secs(2);
    for i in 0..3 {
        let started = Instant::now();
        tokio::time::timeout(bound, check(&mut a))
            .await
            .unwrap_or_else(|_| panic!("call {i} not answered within {bound:?}"))
            .unwrap_or_else(|e| panic!("call {i}: {e:?}"));
        assert!(started.elapsed() < bound);
    }
    let refused = tokio::time::timeout(bound, check(&mut a))
        .await
        .expect("answered while redis hangs");
    exhausted(refused, "rate");
    redis.resume();
    server.stop().await;
}

#[test]
fn quotas_come_from_the_config_file_and_are_validated() {
    let certs = Certs::mint();
    let base = format!(
        "tls_cert = {:?}\ntls_key = {:?}\nclient_ca = {:?}\nredis = \"redis://127.0.0.1:1/\"\ntokens = false\n",
        certs.server_cert, certs.server_key, certs.ca
    );
    let good = format!(
        "{base}[quotas.default]\nrequests_per_second = 1000\nburst = 2000\nnumbers_per_day = 10000000\n\
         [quotas.\"{}\"]\nrequests_per_second = 5\nburst = 5\n",
        id(PLATFORM_B)
    );
    let settings: ServeSettings = toml::from_str(&good).expect("toml");
    let config = ServeConfig::from_settings(settings).expect("valid");
    // The quota Redis defaults to the store's.
    assert_eq!(config.quotas.redis.as_deref(), Some("redis://127.0.0.1:1/"));
    let b = config.quotas.limits(&id(PLATFORM_B));
    assert_eq!(b.rate.map(|r| r.burst), Some(5));
    assert_eq!(b.numbers_per_day, Some(10_000_000), "inherited from default");
    assert_eq!(config.quotas.limits("anyone").rate.map(|r| r.burst), Some(2000));

    let bad = format!("{base}[quotas.default]\nrequests_per_second = 5\nburst = 0\n");
    let settings: ServeSettings = toml::from_str(&bad).expect("toml");
    let err = ServeConfig::from_settings(settings).expect_err("burst 0");
    assert!(err.to_string().contains("burst"), "{err}");
}

/// Calls `CheckNumber` from `concurrency` tasks on `client` until `for_`
/// has passed; returns every call's latency. Every call must be answered
/// with `expect` (`None`: OK, or the code).
async fn hammer(
    client: &ReassignedNumbersClient<Channel>,
    concurrency: usize,
    for_: Duration,
    expect: Option<Code>,
) -> Vec<Duration> {
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let mut c = client.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while started.elapsed() < for_ {
                    let t = Instant::now();
                    let result = check(&mut c).await;
                    latencies.push(t.elapsed());
                    match (expect, result) {
                        (None, Ok(())) => {}
                        (Some(code), Err(status)) if status.code() == code => {}
                        (_, other) => panic!("expected {expect:?}, got {other:?}"),
                    }
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("caller task"));
    }
    all.sort();
    all
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// The quota keys in `redis` (the shared limiter writes them).
async fn quota_keys(url: &str) -> Vec<String> {
    let client = redis::Client::open(url).expect("client");
    let mut conn = client.get_multiplexed_async_connection().await.expect("connect");
    redis::cmd("KEYS")
        .arg("rn:quota:*")
        .query_async(&mut conn)
        .await
        .expect("KEYS")
}

async fn flush(url: &str) {
    let client = redis::Client::open(url).expect("client");
    let mut conn = client.get_multiplexed_async_connection().await.expect("connect");
    let () = redis::cmd("FLUSHALL")
        .query_async(&mut conn)
        .await
        .expect("FLUSHALL");
}

const OUTAGE_TIMEOUT_MS: u64 = 500;
const CONCURRENCY: usize = 8;

#[tokio::test]
async fn calls_do_not_each_wait_for_a_quota_redis_known_to_be_down() {
    let mut redis = RedisServer::start();
    // A generous limit: this test is about time, not refusals. A long quota
    // timeout, so that a call that waited for it is unmistakable.
    // (The daily count's key lives until midnight: it shows that the shared
    // limiter is used.)
    let quotas = format!(
        "{}numbers_per_day = 1000000000\n",
        rate_quota(PLATFORM_A, "100000", 100_000)
    );
    let server = serve_with_timeout(&quotas, Some(redis.url()), OUTAGE_TIMEOUT_MS).await;
    let a = client(&server, PLATFORM_A).await;
    check(&mut a.clone()).await.expect("first call through redis");
    assert!(
        !quota_keys(&redis.url()).await.is_empty(),
        "the shared limiter is used"
    );
    redis.pause();
    let outage = Duration::from_secs(4);
    let latencies = hammer(&a, CONCURRENCY, outage, None).await;
    let waited = latencies
        .iter()
        .filter(|l| **l >= Duration::from_millis(OUTAGE_TIMEOUT_MS * 9 / 10))
        .count();
    println!(
        "fail-open outage of {outage:?}, {CONCURRENCY} callers: {} calls, {waited} waited the {OUTAGE_TIMEOUT_MS} ms quota timeout, p50 {:?}, p99 {:?}, max {:?}",
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().expect("calls")
    );
    // Only the calls in flight when the outage was noticed wait for the
    // timeout; after that the server knows Redis is down and decides
    // locally at once (before: every caller waited again once a second).
    // (A margin of half a wave for a loaded machine; before the probe, 24
    // of 8 callers' calls waited in 4 s.)
    assert!(
        waited <= CONCURRENCY + CONCURRENCY / 2,
        "{waited} calls waited the quota timeout during the outage"
    );
    assert!(
        percentile(&latencies, 0.99) < Duration::from_millis(OUTAGE_TIMEOUT_MS),
        "p99"
    );
    // Back: the shared limiter is used again (its keys reappear).
    redis.resume();
    flush(&redis.url()).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut c = a.clone();
    while quota_keys(&redis.url()).await.is_empty() {
        assert!(Instant::now() < deadline, "the shared limiter is not used again");
        check(&mut c).await.expect("answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await;
}

/// A server with a quota Redis and an explicit fallback policy.
async fn serve_policy(
    quotas: &str,
    quota_redis: String,
    timeout_ms: u64,
    fallback: QuotaFallback,
    expected_replicas: Option<u32>,
) -> TestServer {
    let file: ServeSettings = toml::from_str(quotas).expect("quota toml");
    let store = AnyStore::Embedded(Arc::new(EmbeddedStore::new()));
    TestServer::start(store, move |s| {
        s.quotas = file.quotas;
        s.quota_redis = Some(quota_redis);
        s.quota_redis_timeout_ms = Some(timeout_ms);
        s.quota_fallback = Some(fallback);
        s.quota_expected_replicas = expected_replicas;
    })
    .await
}

#[tokio::test]
async fn fail_closed_refuses_limited_calls_while_the_quota_redis_is_down() {
    let mut redis = RedisServer::start();
    let server = serve_policy(
        &rate_quota(PLATFORM_A, "100000", 100_000),
        redis.url(),
        OUTAGE_TIMEOUT_MS,
        QuotaFallback::FailClosed,
        None,
    )
    .await;
    let a = client(&server, PLATFORM_A).await;
    let mut b = client(&server, PLATFORM_B).await;
    check(&mut a.clone()).await.expect("served while redis is up");

    // Stopped: every call of the limited platform is UNAVAILABLE, and none
    // but the first wave waits for the timeout.
    redis.stop();
    let latencies = hammer(&a, CONCURRENCY, Duration::from_secs(2), Some(Code::Unavailable)).await;
    let waited = latencies
        .iter()
        .filter(|l| **l >= Duration::from_millis(OUTAGE_TIMEOUT_MS * 9 / 10))
        .count();
    println!(
        "fail-closed, redis stopped: {} calls all UNAVAILABLE, {waited} waited the timeout, p99 {:?}",
        latencies.len(),
        percentile(&latencies, 0.99)
    );
    assert!(
        waited <= CONCURRENCY + CONCURRENCY / 2,
        "{waited} calls waited the quota timeout"
    );
    let status = check(&mut a.clone()).await.expect_err("fail closed");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("quota store is unavailable"),
        "{status:?}"
    );
    assert!(status.get_details_retry_info().is_some(), "RetryInfo");
    // A platform without limits needs no quota store.
    check(&mut b).await.expect("platform-b has no quota");

    // Paused (calls would hang): still refused, in bounded time.
    redis.restart();
    let mut c = a.clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(status) = check(&mut c).await {
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(Instant::now() < deadline, "not served again after the restart");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    redis.pause();
    let latencies = hammer(&a, CONCURRENCY, Duration::from_secs(2), Some(Code::Unavailable)).await;
    assert!(
        *latencies.last().expect("calls") < Duration::from_millis(OUTAGE_TIMEOUT_MS * 3),
        "{:?}",
        latencies.last()
    );
    redis.resume();
    let deadline = Instant::now() + Duration::from_secs(10);
    while check(&mut c).await.is_err() {
        assert!(Instant::now() < deadline, "not served again after the pause");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn fail_open_with_expected_replicas_grants_this_servers_share() {
    let mut redis = RedisServer::start();
    // Burst 4 shared by 2 expected servers: alone, this one allows 2.
    let server = serve_policy(
        &rate_quota(PLATFORM_A, "0.1", 4),
        redis.url(),
        OUTAGE_TIMEOUT_MS,
        QuotaFallback::FailOpen,
        Some(2),
    )
    .await;
    let mut a = client(&server, PLATFORM_A).await;
    check(&mut a).await.expect("first call through redis");
    redis.pause();
    for i in 0..2 {
        check(&mut a)
            .await
            .unwrap_or_else(|e| panic!("local call {i}: {e:?}"));
    }
    exhausted(check(&mut a).await, "rate");
    redis.resume();
    server.stop().await;
}
