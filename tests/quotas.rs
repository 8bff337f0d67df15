//! Per-platform quotas over real mutual TLS: the request rate with its burst,
//! numbers per UTC day, one budget shared by two servers through one
//! `redis-server`, and the local fallback when that Redis hangs.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use reassigned::api::pb::reassigned_numbers_client::ReassignedNumbersClient;
use reassigned::api::pb::{self, BatchCheckNumbersRequest, CheckNumberRequest, batch_check_result};
use reassigned::config::{ServeConfig, ServeSettings};
use reassigned::store::{AnyStore, EmbeddedStore};
use support::redis::RedisServer;
use support::server::TestChannel as Channel;
use support::server::{Certs, TestServer};
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
    CheckNumberRequest {
        phone_number: number.into(),
        since: "2024-01-01".into(),
        ..Default::default()
    }
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
