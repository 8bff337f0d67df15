//! The Redis store fails closed: when Redis loses data (restarted empty, a
//! bucket deleted, the metadata edited by hand, keys evictable, a replica
//! behind or empty, a master failing over), no number of the register is
//! ever answered NOT_REASSIGNED. Each test keeps clients asking a real server
//! (mTLS, real Redis on free ports) about known hits with `since` equal to
//! their disconnect date (the right answer is REASSIGNED) while it breaks
//! Redis, and checks EVERY answer: allowed are REASSIGNED, UNAVAILABLE (or
//! another error) and NO_DATA(MIRROR_EMPTY); anything else is a wrong
//! answer. Counts are printed (run with `--nocapture`).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use reassigned::api::pb::reassigned_numbers_client::ReassignedNumbersClient;
use reassigned::api::pb::{
    BatchCheckNumbersRequest, CheckNumberRequest, NoDataReason, ReassignmentStatus, batch_check_result,
};
use reassigned::domain::{Date, Prefix};
use reassigned::store::redis::RedisOptions;
use reassigned::store::{AnyStore, DeltaWrite, Records, RedisStore, SnapshotWrite, Store, StoreError};
use support::per_store_tests;
use support::redis::RedisServer;
use support::redis_cluster::RedisCluster;
use support::server::{TestChannel, TestServer};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const COVERAGE_START: i32 = 18_654; // 2021-01-27
/// Known hits: numbers in the register.
const HITS: u64 = 12_000;
const FIRST_HIT: u64 = 14_155_550_000;

/// The Redis a test breaks.
enum TestRedis {
    Single(RedisServer),
    Cluster(RedisCluster),
}

impl TestRedis {
    fn start(cluster: bool, args: &[&str]) -> Self {
        if cluster {
            TestRedis::Cluster(RedisCluster::start_with(args))
        } else {
            TestRedis::Single(RedisServer::start_with(args))
        }
    }

    async fn store(&self, opts: RedisOptions) -> Result<RedisStore, StoreError> {
        match self {
            TestRedis::Single(s) => RedisStore::connect(&s.url(), opts).await,
            TestRedis::Cluster(c) => RedisStore::connect_cluster(&c.urls(), opts).await,
        }
    }

    /// A connection for raw commands (on a cluster: routed by key).
    fn conn(&self) -> Box<dyn redis::ConnectionLike> {
        match self {
            TestRedis::Single(s) => Box::new(
                redis::Client::open(s.url())
                    .and_then(|c| c.get_connection())
                    .expect("connection"),
            ),
            TestRedis::Cluster(c) => Box::new(
                redis::cluster::ClusterClient::new(c.urls())
                    .and_then(|c| c.get_connection())
                    .expect("cluster connection"),
            ),
        }
    }

    /// Runs `args` on every master (one server: on it).
    fn on_masters(&self, args: &[&str]) {
        match self {
            TestRedis::Single(s) => {
                let mut con = redis::Client::open(s.url())
                    .and_then(|c| c.get_connection())
                    .expect("connection");
                let mut cmd = redis::cmd(args[0]);
                for a in &args[1..] {
                    cmd.arg(*a);
                }
                let _: redis::Value = cmd.query(&mut con).expect("command");
            }
            TestRedis::Cluster(c) => {
                for i in 0..c.ports().len() {
                    if !c.is_replica(i) {
                        c.cli(i, args).expect("command on a master");
                    }
                }
            }
        }
    }
}

fn options() -> RedisOptions {
    // Production defaults (200 ms timeout, 1 s metadata refresh): nothing
    // here relies on a fast refresh to notice lost data.
    RedisOptions {
        reclaim_grace: Duration::from_millis(300),
        ..RedisOptions::default()
    }
}

fn today() -> i32 {
    Date::today_utc().days()
}

/// A snapshot write covering +1, complete through yesterday.
fn snap(sequence: u64) -> SnapshotWrite {
    SnapshotWrite {
        sequence,
        as_of: Date::from_days(today() - 1),
        coverage_start: Date::from_days(COVERAGE_START),
        prefixes: vec![Prefix::parse("+1").expect("prefix")],
        sha256: String::new(),
    }
}

/// A delta write, complete through yesterday.
fn delta_write(sequence: u64) -> DeltaWrite {
    DeltaWrite {
        sequence,
        as_of: Date::from_days(today() - 1),
        sha256: String::new(),
    }
}

/// The register: `HITS` numbers with dates, as (number, day).
fn hits(first: u64, count: u64) -> Vec<(u64, u16)> {
    (0..count)
        .map(|i| (first + i * 3, 19_000 + (i % 1000) as u16))
        .collect()
}

fn records(pairs: &[(u64, u16)]) -> Records {
    let mut pairs = pairs.to_vec();
    pairs.sort_unstable();
    pairs.dedup_by_key(|p| p.0);
    let (numbers, days) = pairs.into_iter().unzip();
    Records::new(numbers, days).expect("valid records")
}

fn check_of(number: u64, day: u16) -> CheckNumberRequest {
    CheckNumberRequest {
        phone_number: format!("+{number}"),
        since: Date::from_days(i32::from(day)).to_string(),
        ..Default::default()
    }
}

/// Every answer about a known hit, sorted.
#[derive(Default)]
struct Tally {
    reassigned: AtomicU64,
    unavailable: AtomicU64,
    empty: AtomicU64,
    other_errors: AtomicU64,
    wrong: AtomicU64,
    /// Misses (numbers not in the register) asked alongside, for load.
    misses: AtomicU64,
    /// The last time a hit was answered REASSIGNED (ms since `start`).
    last_ok_ms: AtomicU64,
    /// The last time a hit was not answered REASSIGNED (ms since `start`).
    last_bad_ms: AtomicU64,
    start: std::sync::OnceLock<Instant>,
}

impl Tally {
    fn ms(&self) -> u64 {
        self.start.get_or_init(Instant::now).elapsed().as_millis() as u64
    }

    /// `at` in ms since `start` (None if before it).
    fn since_start(&self, at: Instant) -> Option<u64> {
        let start = *self.start.get_or_init(Instant::now);
        at.checked_duration_since(start).map(|d| d.as_millis() as u64)
    }

    fn answer(&self, status: i32, reason: i32, what: &str) {
        if status == ReassignmentStatus::Reassigned as i32 {
            self.reassigned.fetch_add(1, Ordering::Relaxed);
            self.last_ok_ms.fetch_max(self.ms(), Ordering::Relaxed);
            return;
        }
        self.last_bad_ms.fetch_max(self.ms(), Ordering::Relaxed);
        if status == ReassignmentStatus::NoData as i32 && reason == NoDataReason::MirrorEmpty as i32 {
            self.empty.fetch_add(1, Ordering::Relaxed);
        } else {
            if self.wrong.fetch_add(1, Ordering::Relaxed) < 5 {
                eprintln!("WRONG answer for a known hit ({what}): status {status}, reason {reason}");
            }
        }
    }

    fn error(&self, code: tonic::Code) {
        self.last_bad_ms.fetch_max(self.ms(), Ordering::Relaxed);
        if code == tonic::Code::Unavailable {
            self.unavailable.fetch_add(1, Ordering::Relaxed);
        } else {
            self.other_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn checked(&self) -> u64 {
        self.reassigned.load(Ordering::Relaxed)
            + self.unavailable.load(Ordering::Relaxed)
            + self.empty.load(Ordering::Relaxed)
            + self.other_errors.load(Ordering::Relaxed)
            + self.wrong.load(Ordering::Relaxed)
    }

    fn report(&self, scenario: &str) -> String {
        format!(
            "{scenario}: {} answers about known hits checked: {} REASSIGNED, {} UNAVAILABLE, {} NO_DATA(MIRROR_EMPTY), {} other errors, {} WRONG; {} misses asked",
            self.checked(),
            self.reassigned.load(Ordering::Relaxed),
            self.unavailable.load(Ordering::Relaxed),
            self.empty.load(Ordering::Relaxed),
            self.other_errors.load(Ordering::Relaxed),
            self.wrong.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }
}

/// Clients asking `server` about `register` (single checks and batches,
/// half hits and half misses) until `stop`.
struct Load {
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    async fn start(server: &TestServer, register: &[(u64, u16)]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Tally::default());
        tally.ms();
        let register = Arc::new(register.to_vec());
        let mut tasks = Vec::new();
        for worker in 0..3u64 {
            let mut client = server.client().await;
            let (stop, tally, register) = (stop.clone(), tally.clone(), register.clone());
            tasks.push(tokio::spawn(async move {
                let mut i = worker as usize * 997;
                while !stop.load(Ordering::Relaxed) {
                    let (n, d) = register[i % register.len()];
                    i += 7;
                    let miss = check_of(16_505_550_000 + (i as u64 % 100_000) * 11, 19_000);
                    match client.check_number(check_of(n, d)).await {
                        Ok(r) => {
                            let r = r.into_inner();
                            tally.answer(r.status, r.no_data_reason, "check");
                        }
                        Err(e) => tally.error(e.code()),
                    }
                    if client.check_number(miss).await.is_ok() {
                        tally.misses.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        let mut client = server.client().await;
        let (stop2, tally2, register2) = (stop.clone(), tally.clone(), register.clone());
        tasks.push(tokio::spawn(async move {
            let mut round = 0usize;
            while !stop2.load(Ordering::Relaxed) {
                round += 1;
                let mut checks = Vec::new();
                for k in 0..100 {
                    let (n, d) = register2[(round * 131 + k * 17) % register2.len()];
                    checks.push(check_of(n, d));
                    checks.push(check_of(17_075_550_000 + (round * 100 + k) as u64, 19_000));
                }
                batch(&mut client, checks, &tally2).await;
            }
        }));
        Self { stop, tally, tasks }
    }

    /// Stops the clients; returns the tally.
    async fn stop(self) -> Arc<Tally> {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.expect("client task panicked");
        }
        self.tally
    }

    /// Waits until at least `n` more hits have been checked.
    async fn wait_checks(&self, n: u64) {
        let target = self.tally.checked() + n;
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.tally.checked() < target {
            assert!(Instant::now() < deadline, "the clients stopped making progress");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until hits are answered REASSIGNED again (a streak of
    /// answers after the last bad one).
    async fn wait_recovered(&self, within: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let (ok, bad) = (
                self.tally.last_ok_ms.load(Ordering::Relaxed),
                self.tally.last_bad_ms.load(Ordering::Relaxed),
            );
            if ok > bad + 300 {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < within,
                "hits were not answered again within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// One batch; every hit's answer is tallied (misses are every other check).
async fn batch(
    client: &mut ReassignedNumbersClient<TestChannel>,
    checks: Vec<CheckNumberRequest>,
    tally: &Tally,
) {
    match client
        .batch_check_numbers(BatchCheckNumbersRequest {
            checks,
            ..Default::default()
        })
        .await
    {
        Ok(r) => {
            for (k, result) in r.into_inner().results.into_iter().enumerate() {
                if k % 2 == 1 {
                    tally.misses.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                match result.result {
                    Some(batch_check_result::Result::Answer(a)) => {
                        tally.answer(a.status, a.no_data_reason, "batch")
                    }
                    Some(batch_check_result::Result::Error(_)) => tally.error(tonic::Code::Unavailable),
                    None => tally.error(tonic::Code::Unknown),
                }
            }
        }
        Err(e) => {
            for _ in 0..100 {
                tally.error(e.code());
            }
        }
    }
}

/// A Redis with the register loaded by a writer store, and a server on its
/// own store.
struct Env {
    redis: TestRedis,
    writer: RedisStore,
    register: Vec<(u64, u16)>,
}

impl Env {
    async fn new(redis: TestRedis) -> Self {
        let writer = redis.store(options()).await.expect("writer store");
        let register = hits(FIRST_HIT, HITS);
        writer
            .apply_snapshot(&snap(1), &records(&register), None)
            .await
            .expect("snapshot");
        Self {
            redis,
            writer,
            register,
        }
    }

    async fn serve(&self) -> (TestServer, RedisStore) {
        let store = self.redis.store(options()).await.expect("server store");
        let server = TestServer::start(AnyStore::Redis(store.clone()), |s| {
            s.metrics_listen = Some(([127, 0, 0, 1], 0).into())
        })
        .await;
        (server, store)
    }
}

async fn health(server: &TestServer) -> Option<i32> {
    let channel = server.channel("platform-a").await;
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .ok()
        .map(|r| r.into_inner().status)
}

fn assert_no_wrong(tally: &Tally, scenario: &str, at_least: u64) {
    let report = tally.report(scenario);
    println!("{report}");
    assert_eq!(tally.wrong.load(Ordering::Relaxed), 0, "{report}");
    assert!(tally.checked() >= at_least, "too few answers checked: {report}");
}

// Runs each scenario on one server and on a three-master cluster.
per_store_tests!(
    single => false,
    cluster => true;
    redis_restarted_empty_under_load,
    a_deleted_bucket_is_never_no_record,
    generation_changed_by_hand,
    evicting_policy_refuses_to_serve,
);

/// Redis loses everything under load: one server is killed (-9) and
/// restarted with no data; on the cluster every master is FLUSHALLed.
async fn redis_restarted_empty_under_load(cluster: bool) {
    let env = Env::new(TestRedis::start(cluster, &[])).await;
    let (server, _store) = env.serve().await;
    let load = Load::start(&server, &env.register).await;
    load.wait_checks(2_000).await;
    let mut redis = env.redis;
    match &mut redis {
        TestRedis::Single(s) => s.crash_and_restart_empty(),
        TestRedis::Cluster(_) => redis.on_masters(&["FLUSHALL"]),
    }
    // Keep asking well past the server's metadata refresh.
    load.wait_checks(3_000).await;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let tally = load.stop().await;
    assert!(
        tally.empty.load(Ordering::Relaxed) > 0,
        "the empty mirror was seen"
    );
    assert_no_wrong(&tally, "redis restarted empty under load", 5_000);
    // Health: the mirror is empty now.
    support::poll::eventually("health is NOT_SERVING", || async {
        health(&server).await == Some(ServingStatus::NotServing as i32)
    })
    .await;
    server.stop().await;
}

/// One bucket key deleted by hand (what eviction does): its numbers answer
/// UNAVAILABLE, never "no record"; every other number still answers.
async fn a_deleted_bucket_is_never_no_record(cluster: bool) {
    let env = Env::new(TestRedis::start(cluster, &[])).await;
    let (server, store) = env.serve().await;
    let mut con = env.redis.conn();
    let nbuckets: u64 = redis::cmd("HGET")
        .arg("rn:meta")
        .arg("nbuckets")
        .query(&mut *con)
        .expect("nbuckets");
    let bucket = 7u64;
    let in_bucket: Vec<(u64, u16)> = env
        .register
        .iter()
        .copied()
        .filter(|(n, _)| n % nbuckets == bucket)
        .collect();
    assert!(!in_bucket.is_empty());
    let generation: u64 = redis::cmd("HGET")
        .arg("rn:meta")
        .arg("generation")
        .query(&mut *con)
        .expect("generation");
    let deleted: u64 = redis::cmd("DEL")
        .arg(format!("rn:g{generation}:{bucket}"))
        .query(&mut *con)
        .expect("DEL");
    assert_eq!(deleted, 1);
    // The deleted bucket's numbers, over and over, singly and in batches.
    let load = Load::start(&server, &in_bucket).await;
    load.wait_checks(3_000).await;
    let tally = load.stop().await;
    assert_eq!(
        tally.reassigned.load(Ordering::Relaxed),
        0,
        "{}",
        tally.report("deleted bucket")
    );
    assert_no_wrong(&tally, "a deleted bucket", 3_000);
    assert!(store.unproven_reads() > 0);
    // The other buckets answer.
    let mut client = server.client().await;
    for &(n, d) in env
        .register
        .iter()
        .filter(|(n, _)| n % nbuckets != bucket)
        .step_by(97)
    {
        let r = client
            .check_number(check_of(n, d))
            .await
            .expect("other buckets answer");
        assert_eq!(r.into_inner().status, ReassignmentStatus::Reassigned as i32);
    }
    // A delta refuses to re-create the lost bucket with its own numbers.
    let delta: Vec<(u64, u16)> = vec![(in_bucket[0].0, 20_000)];
    let err = env
        .writer
        .apply_delta(&delta_write(2), &records(&delta))
        .await
        .expect_err("a delta into a lost bucket is refused");
    assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
    assert_eq!(
        env.writer
            .refresh_meta()
            .await
            .expect("meta")
            .expect("loaded")
            .sequence,
        1
    );
    server.stop().await;
}

/// The generation in the metadata changed by hand (to one that does not
/// exist, then to a replaced one): never "no record".
async fn generation_changed_by_hand(cluster: bool) {
    let env = Env::new(TestRedis::start(cluster, &[])).await;
    // A second snapshot (fewer numbers): generation 1 is replaced.
    let second: Vec<(u64, u16)> = env.register[..HITS as usize / 2].to_vec();
    let s2 = snap(2);
    env.writer
        .apply_snapshot(&s2, &records(&second), Some(1))
        .await
        .expect("second snapshot");
    let (server, _store) = env.serve().await;
    let load = Load::start(&server, &second).await;
    load.wait_checks(1_000).await;
    let mut con = env.redis.conn();
    let _: () = redis::cmd("HSET")
        .arg("rn:meta")
        .arg("generation")
        .arg(999)
        .query(&mut *con)
        .expect("HSET");
    load.wait_checks(2_000).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    // Back to the real one: answers come back.
    let real: u64 = redis::cmd("GET")
        .arg("rn:gen_counter")
        .query(&mut *con)
        .expect("counter");
    let _: () = redis::cmd("HSET")
        .arg("rn:meta")
        .arg("generation")
        .arg(real)
        .query(&mut *con)
        .expect("HSET");
    load.wait_recovered(Duration::from_secs(10)).await;
    // The replaced generation's number (1, reclaimed: gone).
    let _: () = redis::cmd("HSET")
        .arg("rn:meta")
        .arg("generation")
        .arg(real - 1)
        .query(&mut *con)
        .expect("HSET");
    load.wait_checks(2_000).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let tally = load.stop().await;
    assert_no_wrong(&tally, "generation changed by hand", 5_000);
    assert!(tally.unavailable.load(Ordering::Relaxed) > 0);
    server.stop().await;
}

fn metric(text: &str, line_start: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .and_then(|v| v.trim().parse().ok())
}

async fn scrape(server: &TestServer) -> String {
    let addr = server.handles.metrics.bound_addr().await;
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("metrics");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut text = String::new();
    stream.read_to_string(&mut text).await.expect("read");
    text
}

/// `maxmemory-policy allkeys-lru` at start and set at runtime: health
/// NOT_SERVING, lookups UNAVAILABLE, the metric says why; `noeviction`
/// serves again.
async fn evicting_policy_refuses_to_serve(cluster: bool) {
    let env = Env::new(TestRedis::start(cluster, &["--maxmemory-policy", "allkeys-lru"])).await;
    let (server, store) = env.serve().await;
    let unsafe_metric = "reassigned_store_unsafe{reason=\"maxmemory_policy\"} ";
    assert!(store.unsafe_reason().is_some_and(|r| r.contains("allkeys-lru")));
    support::poll::eventually("health is NOT_SERVING", || async {
        health(&server).await == Some(ServingStatus::NotServing as i32)
    })
    .await;
    assert_eq!(metric(&scrape(&server).await, unsafe_metric), Some(1));
    let load = Load::start(&server, &env.register).await;
    load.wait_checks(1_000).await;
    let tally = load.stop().await;
    assert_eq!(tally.reassigned.load(Ordering::Relaxed), 0);
    assert_no_wrong(&tally, "allkeys-lru at start", 1_000);

    env.redis
        .on_masters(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
    support::poll::eventually("health is SERVING", || async {
        health(&server).await == Some(ServingStatus::Serving as i32)
    })
    .await;
    assert_eq!(metric(&scrape(&server).await, unsafe_metric), Some(0));

    let load = Load::start(&server, &env.register).await;
    load.wait_checks(500).await;
    env.redis
        .on_masters(&["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"]);
    support::poll::eventually("health is NOT_SERVING", || async {
        health(&server).await == Some(ServingStatus::NotServing as i32)
    })
    .await;
    let before = load.tally.reassigned.load(Ordering::Relaxed);
    load.wait_checks(500).await;
    let tally = load.stop().await;
    // After the flip, a few in-flight answers at most.
    assert!(tally.reassigned.load(Ordering::Relaxed) <= before + 50);
    assert_no_wrong(&tally, "allkeys-lru set at runtime", 1_000);
    assert_eq!(metric(&scrape(&server).await, unsafe_metric), Some(1));
    server.stop().await;
}

/// One server killed under load and restarted from a save made before the
/// last delta (its numbers are gone, the buckets and their sentinels are
/// not): the store notices the broken connection and the sequence going
/// back, answers UNAVAILABLE (never "no record" for the lost delta's
/// numbers), health NOT_SERVING, until the delta is imported again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_from_an_older_save_under_load() {
    let env = Env::new(TestRedis::start(false, &[])).await;
    let TestRedis::Single(redis) = &env.redis else {
        unreachable!("one server")
    };
    let old_save = redis.save_rdb();
    let delta = hits(FIRST_HIT + 1, 3_000);
    env.writer
        .apply_delta(&delta_write(2), &records(&delta))
        .await
        .expect("delta");
    let (server, _store) = env.serve().await;
    let load = Load::start(&server, &delta).await;
    load.wait_checks(2_000).await;
    // Before the fault: no wrong answer, and every answer REASSIGNED but
    // for the odd timeout of a loaded machine (UNAVAILABLE is never wrong).
    assert_no_wrong(&load.tally, "before the restart from an older save", 2_000);
    let before = load.tally.checked();
    assert!(
        load.tally.reassigned.load(Ordering::Relaxed) + load.tally.unavailable.load(Ordering::Relaxed)
            >= before
            && load.tally.reassigned.load(Ordering::Relaxed) * 10 >= before * 9,
        "{}",
        load.tally.report("before the restart from an older save")
    );
    let mut env = env;
    let TestRedis::Single(redis) = &mut env.redis else {
        unreachable!("one server")
    };
    redis.crash_and_restart_from(&old_save);
    load.wait_checks(3_000).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    println!("{}", load.tally.report("after the restart from an older save"));
    support::poll::eventually("health is NOT_SERVING", || async {
        health(&server).await == Some(ServingStatus::NotServing as i32)
    })
    .await;
    assert_eq!(
        metric(
            &scrape(&server).await,
            "reassigned_store_unsafe{reason=\"data_lost\"} "
        ),
        Some(1)
    );
    // The sync runs again: the delta is applied again and answers come back.
    let writer = env.redis.store(options()).await.expect("writer");
    writer
        .apply_delta(&delta_write(2), &records(&delta))
        .await
        .expect("delta again");
    let recovered = load.wait_recovered(Duration::from_secs(15)).await;
    let tally = load.stop().await;
    println!(
        "answers again {:.2} s after the delta was re-imported",
        recovered.as_secs_f64()
    );
    assert_no_wrong(&tally, "redis restarted from an older save", 5_000);
    assert!(tally.unavailable.load(Ordering::Relaxed) > 0);
    support::poll::eventually("health is SERVING", || async {
        health(&server).await == Some(ServingStatus::Serving as i32)
    })
    .await;
    server.stop().await;
}

// ---------------------------------------------------------------------
// Replicas and failover (three masters with one replica each).

fn replica_options(read_from_replicas: bool) -> RedisOptions {
    RedisOptions {
        read_from_replicas,
        ..options()
    }
}

struct ClusterEnv {
    cluster: RedisCluster,
    writer: RedisStore,
    register: Vec<(u64, u16)>,
}

impl ClusterEnv {
    async fn new(args: &[&str], writer_opts: RedisOptions) -> Self {
        let cluster = RedisCluster::start_with_replicas_and(1, args);
        let writer = RedisStore::connect_cluster(&cluster.urls(), writer_opts)
            .await
            .expect("writer");
        let register = hits(FIRST_HIT, HITS);
        writer
            .apply_snapshot(&snap(1), &records(&register), None)
            .await
            .expect("snapshot");
        Self {
            cluster,
            writer,
            register,
        }
    }

    async fn serve(&self, read_from_replicas: bool) -> (TestServer, RedisStore) {
        let store = RedisStore::connect_cluster(&self.cluster.urls(), replica_options(read_from_replicas))
            .await
            .expect("server store");
        let server = TestServer::start(AnyStore::Redis(store.clone()), |_| {}).await;
        (server, store)
    }

    /// Some replica (node index).
    fn a_replica(&self) -> usize {
        (0..self.cluster.ports().len())
            .find(|&i| self.cluster.is_replica(i))
            .expect("a replica")
    }
}

/// A replica killed (-9) and restarted empty while reads go to replicas:
/// it serves an empty data set while it resynchronises; never "no record".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_restarted_empty_with_read_from_replicas() {
    let mut env = ClusterEnv::new(&[], options()).await;
    let (server, store) = env.serve(true).await;
    let load = Load::start(&server, &env.register).await;
    load.wait_checks(2_000).await;
    let replica = env.a_replica();
    env.cluster.restart_node_empty(replica);
    load.wait_checks(4_000).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let tally = load.stop().await;
    println!(
        "unproven replica reads retried on the master: {}",
        store.unproven_reads()
    );
    assert_no_wrong(&tally, "replica restarted empty (read from replicas)", 6_000);
    server.stop().await;
}

/// A replica paused (`CLIENT PAUSE 3000 WRITE`: it serves reads but stops
/// applying replication) while a snapshot switches with reads on replicas:
/// the switch waits for the replica; never "no record", before or after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_paused_during_a_snapshot_switch() {
    let env = ClusterEnv::new(&[], options()).await;
    let (server, _store) = env.serve(true).await;
    // The second snapshot keeps the first half and adds new numbers.
    let mut second: Vec<(u64, u16)> = env.register[..HITS as usize / 2].to_vec();
    second.extend(hits(FIRST_HIT + 1, HITS / 2));
    let load = Load::start(&server, &env.register[..HITS as usize / 2]).await;
    load.wait_checks(1_000).await;
    for i in 0..env.cluster.ports().len() {
        if env.cluster.is_replica(i) {
            env.cluster
                .cli(i, &["CLIENT", "PAUSE", "3000", "WRITE"])
                .expect("pause");
        }
    }
    let started = Instant::now();
    env.writer
        .apply_snapshot(&snap(2), &records(&second), Some(1))
        .await
        .expect("second snapshot (waits for the replicas)");
    println!(
        "snapshot with paused replicas applied after {:?}",
        started.elapsed()
    );
    // Now ask about the new numbers too.
    let tally_first = load.stop().await;
    assert_no_wrong(
        &tally_first,
        "replica paused during a switch (kept numbers)",
        1_000,
    );
    let load = Load::start(&server, &second).await;
    load.wait_checks(3_000).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let tally = load.stop().await;
    assert_no_wrong(&tally, "replica paused during a switch (after)", 3_000);
    server.stop().await;
}

/// A master killed under load (reads from masters), its replica promoted by
/// the cluster: 0 wrong answers; hits of the other shards keep answering
/// and health stays SERVING; calls succeed again within the failover time
/// plus 2 s without restarting the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_killed_replica_promoted_under_load() {
    // With RUST_LOG set (e.g. `RUST_LOG=reassigned=info`), the store's log
    // lines, with timestamps, interleave with the test's kill and promotion.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut env = ClusterEnv::new(&["--cluster-node-timeout", "2000"], options()).await;
    let (server, _store) = env.serve(false).await;
    // A master that does not hold the metadata.
    let meta_port = env.cluster.master_port_of("rn:meta");
    let victim_port = env
        .cluster
        .ports()
        .into_iter()
        .enumerate()
        .find(|&(i, p)| p != meta_port && !env.cluster.is_replica(i))
        .map(|(_, p)| p)
        .expect("another master");
    let victim = env.cluster.index_of_port(victim_port).expect("victim");
    let replica = env.cluster.replicas_of(victim_port)[0];
    let load = Load::start(&server, &env.register).await;
    load.wait_checks(2_000).await;

    let mut promoted_at = Instant::now();
    let mut promoted = Duration::ZERO;
    let seen = health_during(&server, async {
        let killed = Instant::now();
        env.cluster.kill_node(victim);
        tracing::info!("test: master killed");
        // Promotion: the replica reports role:master (polled every 5 ms,
        // each poll a redis-cli INFO of a few ms: precise to ~10 ms).
        let deadline = Instant::now() + Duration::from_secs(60);
        while env.cluster.is_replica(replica) {
            assert!(Instant::now() < deadline, "the replica was never promoted");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        promoted_at = Instant::now();
        tracing::info!("test: replica promoted");
        promoted = promoted_at - killed;
        load.wait_recovered(Duration::from_secs(30)).await;
        load.wait_checks(2_000).await;
    })
    .await;
    let tally = load.stop().await;
    // Calls succeed again from the last answer that was not REASSIGNED
    // (none after it, through a streak and 2,000 more checks).
    let recovered = tally
        .since_start(promoted_at)
        .map_or(Duration::ZERO, |promoted_ms| {
            Duration::from_millis(
                tally
                    .last_bad_ms
                    .load(Ordering::Relaxed)
                    .saturating_sub(promoted_ms),
            )
        });
    println!(
        "failover: replica promoted {:.3} s after the kill; hits answered again {:.3} s after the promotion",
        promoted.as_secs_f64(),
        recovered.as_secs_f64()
    );
    assert_no_wrong(&tally, "master killed, replica promoted", 4_000);
    assert!(
        recovered < Duration::from_secs(2),
        "calls answered again {recovered:?} after the promotion (limit: promotion + 2 s)"
    );
    assert!(!seen.is_empty());
    assert!(
        seen.iter().all(|&s| s == ServingStatus::Serving as i32),
        "health left SERVING during one shard's failover: {seen:?}"
    );
    server.stop().await;
}

/// A delta while a replica is frozen: WAIT fails the import and the
/// metadata is not moved; a rerun (replica back) applies it; the master of
/// the delta's numbers then killed, its replica promoted: every number of
/// the delta is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_waits_for_replicas_before_moving_the_sequence() {
    let mut env = ClusterEnv::new(
        &["--cluster-node-timeout", "2000"],
        RedisOptions {
            replication_timeout: Duration::from_secs(1),
            ..options()
        },
    )
    .await;
    let delta = hits(FIRST_HIT + 2, 3_000);
    let replica = env.a_replica();
    env.cluster.pause_node(replica);
    let err = env
        .writer
        .apply_delta(&delta_write(2), &records(&delta))
        .await
        .expect_err("the delta must wait for the frozen replica");
    env.cluster.resume_node(replica);
    println!("delta with a frozen replica: {err}");
    assert!(err.to_string().contains("replica"), "{err}");
    assert_eq!(
        env.writer
            .refresh_meta()
            .await
            .expect("meta")
            .expect("loaded")
            .sequence,
        1
    );
    env.writer
        .apply_delta(&delta_write(2), &records(&delta))
        .await
        .expect("the rerun applies the delta");
    assert_eq!(
        env.writer
            .refresh_meta()
            .await
            .expect("meta")
            .expect("loaded")
            .sequence,
        2
    );
    // Kill the master the frozen replica belongs to; its replica takes over.
    let info = env.cluster.cli(replica, &["INFO", "replication"]).expect("info");
    let master_port: u16 = info
        .lines()
        .find_map(|l| l.strip_prefix("master_port:"))
        .and_then(|p| p.trim().parse().ok())
        .expect("master_port");
    let master = env.cluster.index_of_port(master_port).expect("master");
    env.cluster.kill_node(master);
    let deadline = Instant::now() + Duration::from_secs(60);
    while env.cluster.is_replica(replica) {
        assert!(Instant::now() < deadline, "the replica was never promoted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Right after the promotion the cluster may still be converging: a
    // connect that times out then is retried (it answers nothing wrong).
    let deadline = Instant::now() + Duration::from_secs(30);
    let reader = loop {
        match RedisStore::connect_cluster(&env.cluster.urls(), options()).await {
            Ok(reader) => break reader,
            Err(e) => {
                assert!(Instant::now() < deadline, "reader: {e:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let mut missing = 0;
    let mut checked = 0;
    for &(n, d) in &delta {
        let number = reassigned::domain::PhoneNumber::from_value(n).expect("number");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match reader.lookup(number).await {
                Ok(found) => {
                    checked += 1;
                    if found.found.map(|f| f.days()) != Some(i32::from(d)) {
                        missing += 1;
                    }
                    break;
                }
                Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => panic!("lookup after the failover: {e}"),
            }
        }
    }
    println!("after the failover: {missing} of {checked} delta numbers missing");
    assert_eq!(missing, 0);
}

/// Samples health every 100 ms while `during` runs.
async fn health_during<F: std::future::Future<Output = ()>>(server: &TestServer, during: F) -> Vec<i32> {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let (channel, seen, watching) = (server.channel("platform-a").await, seen.clone(), watching.clone());
        tokio::spawn(async move {
            let mut client = HealthClient::new(channel);
            while watching.load(Ordering::Relaxed) {
                if let Ok(r) = client
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                {
                    seen.lock().expect("lock").push(r.into_inner().status);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    during.await;
    watching.store(false, Ordering::Relaxed);
    watcher.await.expect("health watcher");
    seen.lock().map(|s| s.clone()).expect("lock")
}

/// Health has hysteresis: one server SIGSTOPped for 1 s stays SERVING (its
/// lookups answer UNAVAILABLE meanwhile), for 5 s goes NOT_SERVING and
/// comes back; on a cluster, one master SIGSTOPped for 3 s keeps health
/// SERVING while the other shards answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_rides_out_short_stalls() {
    let mut env = Env::new(TestRedis::start(false, &[])).await;
    let (server, _store) = env.serve().await;
    // The precondition: a server that serves (on a loaded machine its first
    // store check may come after the first pause would start).
    support::poll::eventually("health is SERVING before the stall", || async {
        health(&server).await == Some(ServingStatus::Serving as i32)
    })
    .await;
    let TestRedis::Single(redis) = &mut env.redis else {
        unreachable!("one server")
    };
    redis.pause();
    let seen = health_during(&server, tokio::time::sleep(Duration::from_secs(1))).await;
    redis.resume();
    println!("one server stopped 1 s: health {seen:?}");
    assert!(
        seen.iter().all(|&s| s == ServingStatus::Serving as i32),
        "{seen:?}"
    );
    redis.pause();
    let seen = health_during(&server, tokio::time::sleep(Duration::from_secs(5))).await;
    redis.resume();
    println!("one server stopped 5 s: health {seen:?}");
    assert!(seen.contains(&(ServingStatus::NotServing as i32)), "{seen:?}");
    support::poll::eventually("health is SERVING", || async {
        health(&server).await == Some(ServingStatus::Serving as i32)
    })
    .await;
    server.stop().await;

    let env = Env::new(TestRedis::start(true, &[])).await;
    let (server, _store) = env.serve().await;
    let TestRedis::Cluster(cluster) = &env.redis else {
        unreachable!("a cluster")
    };
    let meta_port = cluster.master_port_of("rn:meta");
    let victim = (0..cluster.ports().len())
        .find(|&i| cluster.ports()[i] != meta_port)
        .expect("another master");
    let load = Load::start(&server, &env.register).await;
    load.wait_checks(1_000).await;
    cluster.pause_node(victim);
    let before = load.tally.reassigned.load(Ordering::Relaxed);
    let seen = health_during(&server, tokio::time::sleep(Duration::from_secs(3))).await;
    let answered = load.tally.reassigned.load(Ordering::Relaxed) - before;
    cluster.resume_node(victim);
    let tally = load.stop().await;
    println!("one master of three stopped 3 s: {answered} hits answered meanwhile, health {seen:?}");
    assert_no_wrong(&tally, "one master stopped 3 s", 1_000);
    assert!(answered > 0, "the other shards answered");
    assert!(
        seen.iter().all(|&s| s == ServingStatus::Serving as i32),
        "{seen:?}"
    );
    server.stop().await;
}
