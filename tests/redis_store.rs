//! The Redis store against a real `redis-server` that each test starts on a
//! free port (see `support::redis`).

mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use reassigned::domain::{Date, PhoneNumber};
use reassigned::import::{Kind, Manifest, Records};
use reassigned::store::redis::RedisOptions;
use reassigned::store::{RedisStore, Store, StoreError};
use support::redis::RedisServer;

const COVERAGE_START: i32 = 18_654; // 2021-01-27

fn manifest(kind: Kind, sequence: u64, as_of: i32) -> Manifest {
    let snapshot = kind == Kind::Snapshot;
    Manifest {
        kind,
        sequence,
        as_of: Date::from_days(as_of),
        coverage_start: snapshot.then(|| Date::from_days(COVERAGE_START)),
        covered_prefixes: snapshot.then(|| vec!["+1".to_owned(), "+86".to_owned()]),
        data: "data.csv".to_owned(),
        records: 0,
        sha256: String::new(),
        path: PathBuf::new(),
    }
}

/// Records from (number, day) pairs, sorted as the importer hands them over.
fn records(mut pairs: Vec<(u64, u16)>) -> Records {
    pairs.sort_unstable();
    pairs.dedup_by_key(|p| p.0);
    Records {
        numbers: pairs.iter().map(|p| p.0).collect(),
        days: pairs.iter().map(|p| p.1).collect(),
    }
}

/// `count` US numbers from `first`, `step` apart, with varying dates.
fn us_numbers(first: u64, step: u64, count: u64) -> Vec<(u64, u16)> {
    (0..count)
        .map(|i| (first + i * step, 19_000 + (i % 1000) as u16))
        .collect()
}

fn number(value: u64) -> PhoneNumber {
    PhoneNumber::from_value(value).expect("valid number")
}

fn test_options() -> RedisOptions {
    RedisOptions {
        meta_refresh: Duration::from_millis(100),
        reclaim_grace: Duration::from_millis(600),
        ..RedisOptions::default()
    }
}

async fn connect(server: &RedisServer) -> RedisStore {
    RedisStore::connect(&server.url(), test_options())
        .await
        .expect("connect to the test redis")
}

fn redis_conn(server: &RedisServer) -> redis::Connection {
    redis::Client::open(server.url())
        .and_then(|c| c.get_connection())
        .expect("test connection")
}

/// Every key matching `pattern` (SCAN).
fn keys(server: &RedisServer, pattern: &str) -> Vec<String> {
    let mut con = redis_conn(server);
    let mut found: Vec<String> = redis::cmd("KEYS").arg(pattern).query(&mut con).expect("KEYS");
    found.sort();
    found
}

async fn lookup_day(store: &RedisStore, value: u64) -> Option<i32> {
    store
        .lookup(number(value))
        .await
        .expect("lookup")
        .found
        .map(|d| d.days())
}

/// Polls `f` until it returns true or the deadline passes.
async fn eventually<F, Fut>(what: &str, deadline: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + deadline;
    while !f().await {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn empty_mirror_answers_without_meta() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    store.ping().await.expect("ping");
    let one = store.lookup(number(14_155_550_123)).await.expect("lookup");
    assert!(one.found.is_none() && one.meta.is_none());
    let many = store
        .lookup_many(&[number(14_155_550_123), number(8_613_800_138_000)])
        .await
        .expect("lookup_many");
    assert_eq!(many.found, vec![None, None]);
    assert!(many.meta.is_none());
    assert!(store.refresh_meta().await.expect("refresh").is_none());
}

#[tokio::test]
async fn snapshot_then_lookups() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    let data = us_numbers(14_155_550_000, 3, 1000);
    let recs = records(data.clone());
    store
        .apply_snapshot(&manifest(Kind::Snapshot, 1, 20_100), &recs, None)
        .await
        .expect("snapshot");

    // Hits and misses, with the metadata they were read under.
    let hit = store.lookup(number(data[10].0)).await.expect("lookup");
    assert_eq!(hit.found, Some(Date::from_days(i32::from(data[10].1))));
    let meta = hit.meta.expect("meta");
    assert_eq!(meta.sequence, 1);
    assert_eq!(meta.record_count, 1000);
    assert_eq!(meta.as_of, Date::from_days(20_100));
    assert_eq!(meta.coverage_start, Date::from_days(COVERAGE_START));
    assert_eq!(
        meta.prefixes.iter().map(ToString::to_string).collect::<Vec<_>>(),
        ["+1", "+86"]
    );
    assert!(lookup_day(&store, data[10].0 + 1).await.is_none());
    assert!(lookup_day(&store, 8_613_800_138_000).await.is_none());

    let asked: Vec<PhoneNumber> = [data[999].0, data[0].0 + 1, data[0].0, 8_613_800_138_000]
        .into_iter()
        .map(number)
        .collect();
    let many = store.lookup_many(&asked).await.expect("lookup_many");
    assert_eq!(
        many.found,
        vec![
            Some(Date::from_days(i32::from(data[999].1))),
            None,
            Some(Date::from_days(i32::from(data[0].1))),
            None
        ]
    );
    assert_eq!(many.meta.expect("meta").sequence, 1);
    assert_eq!(store.cached_meta().expect("cached").sequence, 1);
    for (n, d) in &data {
        assert_eq!(lookup_day(&store, *n).await, Some(i32::from(*d)));
    }

    // Layout: ceil(1000 / 128) = 8 listpack buckets, no hash tag, lock released.
    let buckets = keys(&server, "rn:g[0-9]*");
    assert_eq!(buckets.len(), 8, "{buckets:?}");
    assert!(buckets.iter().all(|k| k.starts_with("rn:g1:")));
    assert!(keys(&server, "rn:lock").is_empty());
    let mut con = redis_conn(&server);
    let encoding: String = redis::cmd("OBJECT")
        .arg("ENCODING")
        .arg(&buckets[0])
        .query(&mut con)
        .expect("OBJECT ENCODING");
    assert_eq!(encoding, "listpack");
    // A number is (bucket, field) = (n % 8, n / 8).
    let n = data[5].0;
    let stored: Option<u16> = redis::cmd("HGET")
        .arg(format!("rn:g1:{}", n % 8))
        .arg(n / 8)
        .query(&mut con)
        .expect("HGET");
    assert_eq!(stored, Some(data[5].1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_snapshot_replaces_everything_and_reclaims_old_keys() {
    let server = RedisServer::start();
    let writer = connect(&server).await;
    let reader = connect(&server).await;
    let first = us_numbers(12_125_550_000, 7, 3000);
    // Shares one number (same date) with the first, the rest is new.
    let mut second = us_numbers(13_105_550_000, 11, 1500);
    second.push(first[0]);
    writer
        .apply_snapshot(
            &manifest(Kind::Snapshot, 1, 20_000),
            &records(first.clone()),
            None,
        )
        .await
        .expect("first snapshot");
    eventually(
        "the reader sees the first snapshot",
        Duration::from_secs(5),
        || async { reader.cached_meta().is_some() },
    )
    .await;

    // A reader keeps asking for the shared number during the switch: it must
    // always find it (old or new generation, never an empty mirror).
    let stop = Arc::new(AtomicBool::new(false));
    let asked = Arc::new(AtomicU64::new(0));
    let watcher = tokio::spawn({
        let (reader, stop, asked) = (reader.clone(), stop.clone(), asked.clone());
        let (shared, only_first) = (first[0], first[1]);
        async move {
            while !stop.load(Ordering::Relaxed) {
                let got = reader
                    .lookup(number(shared.0))
                    .await
                    .expect("lookup during switch");
                assert_eq!(got.found.map(|d| d.days()), Some(i32::from(shared.1)));
                let seq = got.meta.expect("meta").sequence;
                let many = reader
                    .lookup_many(&[number(shared.0), number(only_first.0)])
                    .await
                    .expect("lookup_many during switch");
                // first[1] is only in the first snapshot.
                let meta = many.meta.expect("meta");
                assert_eq!(many.found[0].map(|d| d.days()), Some(i32::from(shared.1)));
                assert_eq!(
                    many.found[1].is_some(),
                    meta.sequence == 1,
                    "no mix of generations"
                );
                assert!(seq == 1 || seq == 2);
                asked.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    writer
        .apply_snapshot(
            &manifest(Kind::Snapshot, 2, 20_030),
            &records(second.clone()),
            Some(1),
        )
        .await
        .expect("second snapshot");
    eventually(
        "the reader sees the second snapshot",
        Duration::from_secs(5),
        || async { reader.cached_meta().is_some_and(|m| m.sequence == 2) },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    watcher.await.expect("watcher");
    assert!(asked.load(Ordering::Relaxed) > 10);

    // Old numbers are gone, new ones present.
    for (n, _) in &first[1..] {
        assert_eq!(lookup_day(&reader, *n).await, None);
    }
    for (n, d) in &second {
        assert_eq!(lookup_day(&reader, *n).await, Some(i32::from(*d)));
    }
    let meta = reader.cached_meta().expect("meta");
    assert_eq!((meta.sequence, meta.record_count), (2, 1501));

    // apply_snapshot returns after the old generation is deleted:
    // only the new one's ceil(1501 / 128) = 12 buckets remain.
    let buckets = keys(&server, "rn:g[0-9]*");
    assert_eq!(buckets.len(), 12, "{buckets:?}");
    assert!(buckets.iter().all(|k| k.starts_with("rn:g2:")), "{buckets:?}");
    let mut con = redis_conn(&server);
    let dbsize: u64 = redis::cmd("DBSIZE").query(&mut con).expect("DBSIZE");
    assert_eq!(dbsize, 12 + 2, "buckets, meta and gen_counter");
    let reclaim: Option<String> = redis::cmd("HGET")
        .arg("rn:meta")
        .arg("reclaim_generation")
        .query(&mut con)
        .expect("HGET");
    assert_eq!(reclaim, None);
}

#[tokio::test]
async fn delta_keeps_latest_date_and_is_idempotent() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    let base = us_numbers(14_155_550_000, 13, 2000);
    store
        .apply_snapshot(&manifest(Kind::Snapshot, 1, 20_000), &records(base.clone()), None)
        .await
        .expect("snapshot");
    let (a, b, c) = (base[3], base[4], base[5]);
    let new_number = 14_155_550_001;
    let delta = records(vec![
        (a.0, a.1 + 100), // later: raised
        (b.0, b.1 - 100), // earlier: ignored
        (new_number, 20_001),
    ]);
    let m2 = manifest(Kind::Delta, 2, 20_001);
    store.apply_delta(&m2, &delta).await.expect("delta");
    let check = |store: RedisStore| async move {
        assert_eq!(lookup_day(&store, a.0).await, Some(i32::from(a.1) + 100));
        assert_eq!(lookup_day(&store, b.0).await, Some(i32::from(b.1)));
        assert_eq!(lookup_day(&store, new_number).await, Some(20_001));
        assert_eq!(lookup_day(&store, c.0).await, Some(i32::from(c.1)));
    };
    check(store.clone()).await;
    let meta = store.cached_meta().expect("meta");
    assert_eq!(
        (meta.sequence, meta.record_count, meta.as_of.days()),
        (2, 2001, 20_001)
    );
    assert_eq!(
        meta.coverage_start,
        Date::from_days(COVERAGE_START),
        "kept from the snapshot"
    );

    // Twice = once.
    store.apply_delta(&m2, &delta).await.expect("delta again");
    check(store.clone()).await;
    let again = store.refresh_meta().await.expect("refresh").expect("meta");
    assert_eq!((again.sequence, again.record_count), (2, 2001));

    // A crash after the data, before the metadata: the retry gives the same
    // data (record_count may under-count, as documented).
    let m3 = manifest(Kind::Delta, 3, 20_002);
    let delta3 = records(vec![(a.0, a.1 + 200), (new_number + 2, 20_002)]);
    store.apply_delta(&m3, &delta3).await.expect("delta 3");
    let mut con = redis_conn(&server);
    let _: () = redis::cmd("HSET")
        .arg("rn:meta")
        .arg("sequence")
        .arg(2)
        .arg("as_of")
        .arg(Date::from_days(20_001).to_string())
        .query(&mut con)
        .expect("rewind meta");
    store.apply_delta(&m3, &delta3).await.expect("delta 3 retried");
    assert_eq!(lookup_day(&store, a.0).await, Some(i32::from(a.1) + 200));
    assert_eq!(lookup_day(&store, new_number + 2).await, Some(20_002));
    let meta = store.refresh_meta().await.expect("refresh").expect("meta");
    assert_eq!(meta.sequence, 3);
    assert!(meta.record_count == 2001 || meta.record_count == 2002);

    // Still one generation, listpack buckets only.
    assert!(
        keys(&server, "rn:g[0-9]*")
            .iter()
            .all(|k| k.starts_with("rn:g1:"))
    );
    // An empty delta moves the sequence too.
    store
        .apply_delta(&manifest(Kind::Delta, 4, 20_003), &Records::default())
        .await
        .expect("empty delta");
    assert_eq!(store.refresh_meta().await.expect("r").expect("m").sequence, 4);
}

#[tokio::test]
async fn sequence_and_lock_conflicts() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    let recs = records(us_numbers(14_155_550_000, 1, 100));
    let conflict = |r: Result<(), StoreError>| matches!(r, Err(StoreError::Conflict(_)));

    // A delta needs a snapshot first.
    assert!(conflict(
        store.apply_delta(&manifest(Kind::Delta, 1, 20_000), &recs).await
    ));
    // A snapshot expecting a sequence the mirror does not have.
    assert!(conflict(
        store
            .apply_snapshot(&manifest(Kind::Snapshot, 5, 20_000), &recs, Some(4))
            .await
    ));
    store
        .apply_snapshot(&manifest(Kind::Snapshot, 5, 20_000), &recs, None)
        .await
        .expect("snapshot");
    assert!(conflict(
        store
            .apply_snapshot(&manifest(Kind::Snapshot, 6, 20_001), &recs, None)
            .await
    ));
    assert!(conflict(
        store
            .apply_snapshot(&manifest(Kind::Snapshot, 6, 20_001), &recs, Some(4))
            .await
    ));
    // A delta out of order.
    assert!(conflict(
        store.apply_delta(&manifest(Kind::Delta, 7, 20_001), &recs).await
    ));
    assert!(conflict(
        store.apply_delta(&manifest(Kind::Delta, 4, 20_001), &recs).await
    ));
    // Someone else holds the import lock.
    let mut con = redis_conn(&server);
    let _: () = redis::cmd("SET")
        .arg("rn:lock")
        .arg("someone-else")
        .arg("PX")
        .arg(60_000)
        .query(&mut con)
        .expect("SET lock");
    assert!(conflict(
        store.apply_delta(&manifest(Kind::Delta, 6, 20_001), &recs).await
    ));
    let holder: String = redis::cmd("GET").arg("rn:lock").query(&mut con).expect("GET");
    assert_eq!(holder, "someone-else", "a refused import leaves the lock alone");
    let _: () = redis::cmd("DEL").arg("rn:lock").query(&mut con).expect("DEL");
    store
        .apply_delta(&manifest(Kind::Delta, 6, 20_001), &recs)
        .await
        .expect("delta after the lock is free");
    assert_eq!(store.cached_meta().expect("meta").sequence, 6);
}

#[tokio::test]
async fn crashed_snapshot_leftovers_are_deleted() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    let recs = records(us_numbers(14_155_550_000, 1, 300));
    store
        .apply_snapshot(&manifest(Kind::Snapshot, 1, 20_000), &recs, None)
        .await
        .expect("snapshot");
    // What a snapshot import that crashed half-way leaves behind.
    let mut con = redis_conn(&server);
    let _: () = redis::cmd("HSET")
        .arg("rn:meta")
        .arg("pending_generation")
        .arg(9)
        .arg("pending_nbuckets")
        .arg(3)
        .query(&mut con)
        .expect("HSET");
    for b in 0..3 {
        let _: () = redis::cmd("HSET")
            .arg(format!("rn:g9:{b}"))
            .arg(1)
            .arg(1)
            .query(&mut con)
            .expect("HSET");
    }
    // Readers ignore it.
    assert_eq!(
        lookup_day(&store, recs.numbers[0]).await,
        Some(i32::from(recs.days[0]))
    );
    store
        .apply_snapshot(&manifest(Kind::Snapshot, 2, 20_001), &recs, Some(1))
        .await
        .expect("next snapshot");
    let left = keys(&server, "rn:g[0-9]*");
    assert!(
        !left
            .iter()
            .any(|k| k.starts_with("rn:g9:") || k.starts_with("rn:g1:")),
        "{left:?}"
    );
    // The generation counter skipped the crashed one.
    assert!(left.iter().all(|k| k.starts_with("rn:g10:")), "{left:?}");
}

#[tokio::test]
async fn garbled_meta_is_corrupt() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    let mut con = redis_conn(&server);
    let _: () = redis::cmd("HSET")
        .arg("rn:meta")
        .arg("generation")
        .arg("one")
        .arg("nbuckets")
        .arg(1)
        .query(&mut con)
        .expect("HSET");
    assert!(matches!(store.refresh_meta().await, Err(StoreError::Corrupt(_))));
    assert!(matches!(
        RedisStore::connect(&server.url(), test_options()).await,
        Err(StoreError::Corrupt(_))
    ));
    // Not a hash at all.
    let _: () = redis::cmd("SET")
        .arg("rn:meta")
        .arg("x")
        .query(&mut con)
        .expect("SET");
    assert!(matches!(store.refresh_meta().await, Err(StoreError::Corrupt(_))));
    // A bucket value that is not a day number.
    let _: () = redis::cmd("DEL").arg("rn:meta").query(&mut con).expect("DEL");
    store
        .apply_snapshot(
            &manifest(Kind::Snapshot, 1, 20_000),
            &records(vec![(14_155_550_123, 19_000)]),
            None,
        )
        .await
        .expect("snapshot");
    let _: () = redis::cmd("HSET")
        .arg("rn:g1:0")
        .arg(14_155_550_123u64)
        .arg("garbage")
        .query(&mut con)
        .expect("HSET");
    assert!(matches!(
        store.lookup(number(14_155_550_123)).await,
        Err(StoreError::Corrupt(_))
    ));
}

/// How many times Redis ran `command` (INFO commandstats).
fn command_calls(server: &RedisServer, command: &str) -> u64 {
    let mut con = redis_conn(server);
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut con)
        .expect("INFO commandstats");
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

/// Numbers whose bucket fields need every listpack integer encoding.
fn mixed_numbers() -> Vec<(u64, u16)> {
    let mut pairs = us_numbers(10_000, 1, 3000); // shortest numbers: tiny fields
    pairs.extend(us_numbers(14_155_550_000, 17, 3000));
    pairs.extend(us_numbers(861_380_013_800, 1_000_003, 3000));
    pairs.extend(us_numbers(999_999_000_000_000, 99_991, 3000)); // 15 digits
    pairs
}

#[tokio::test]
async fn snapshot_buckets_equal_what_hset_builds() {
    // No compression, so DUMP shows the listpack bytes as stored.
    let server = RedisServer::start_with(&["--rdbcompression", "no"]);
    let store = connect(&server).await;
    let data = mixed_numbers();
    store
        .apply_snapshot(&manifest(Kind::Snapshot, 1, 20_000), &records(data.clone()), None)
        .await
        .expect("snapshot");
    // Every bucket once, the first twice (the probe); HSET only on the metadata.
    assert_eq!(command_calls(&server, "restore"), 12_000u64.div_ceil(128) + 1);
    assert!(command_calls(&server, "hset") < 5);
    for (n, d) in data.iter().step_by(7) {
        assert_eq!(lookup_day(&store, *n).await, Some(i32::from(*d)));
    }
    let mut con = redis_conn(&server);
    let buckets = keys(&server, "rn:g[0-9]*");
    assert_eq!(buckets.len(), 12_000usize.div_ceil(128));
    for key in buckets.iter().step_by(5) {
        let encoding: String = redis::cmd("OBJECT")
            .arg("ENCODING")
            .arg(key)
            .query(&mut con)
            .expect("OBJECT");
        assert_eq!(encoding, "listpack", "{key}");
        // The same fields HSET one by one, in the same order.
        let pairs: Vec<(String, String)> = redis::cmd("HGETALL").arg(key).query(&mut con).expect("HGETALL");
        let copy = format!("copy:{key}");
        for (f, v) in &pairs {
            let _: () = redis::cmd("HSET")
                .arg(&copy)
                .arg(f)
                .arg(v)
                .query(&mut con)
                .expect("HSET");
        }
        let ours: Vec<u8> = redis::cmd("DUMP").arg(key).query(&mut con).expect("DUMP");
        let theirs: Vec<u8> = redis::cmd("DUMP").arg(&copy).query(&mut con).expect("DUMP");
        assert_eq!(ours, theirs, "{key}");
    }
}

#[tokio::test]
async fn snapshot_passes_deep_payload_sanitization() {
    let server = RedisServer::start_with(&["--sanitize-dump-payload", "yes"]);
    let store = connect(&server).await;
    let data = mixed_numbers();
    store
        .apply_snapshot(&manifest(Kind::Snapshot, 1, 20_000), &records(data.clone()), None)
        .await
        .expect("snapshot");
    assert_eq!(command_calls(&server, "restore"), 12_000u64.div_ceil(128) + 1);
    assert!(command_calls(&server, "hset") < 5, "no fallback to HSET");
    for (n, d) in data.iter().step_by(3) {
        assert_eq!(lookup_day(&store, *n).await, Some(i32::from(*d)));
    }
}

#[tokio::test]
async fn snapshot_falls_back_to_hset_without_restore() {
    let server = RedisServer::start_with(&["--rename-command", "RESTORE", ""]);
    let store = connect(&server).await;
    let data = mixed_numbers();
    store
        .apply_snapshot(&manifest(Kind::Snapshot, 1, 20_000), &records(data.clone()), None)
        .await
        .expect("snapshot");
    assert!(
        command_calls(&server, "hset") >= 12_000u64.div_ceil(128),
        "written with HSET"
    );
    for (n, d) in data.iter().step_by(3) {
        assert_eq!(lookup_day(&store, *n).await, Some(i32::from(*d)));
    }
    assert_eq!(store.cached_meta().expect("meta").record_count, data.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_fail_fast_while_redis_hangs_and_recover() {
    let mut server = RedisServer::start();
    let store = connect(&server).await;
    let data = us_numbers(14_155_550_000, 5, 500);
    store
        .apply_snapshot(&manifest(Kind::Snapshot, 1, 20_000), &records(data.clone()), None)
        .await
        .expect("snapshot");
    assert!(lookup_day(&store, data[0].0).await.is_some());

    server.pause();
    // Before and after the cached metadata goes stale (2 x 100 ms).
    for _ in 0..4 {
        let started = Instant::now();
        let one = store.lookup(number(data[0].0)).await;
        assert!(matches!(one, Err(StoreError::Timeout(_))), "{one:?}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        let started = Instant::now();
        let many = store.lookup_many(&[number(data[0].0), number(data[1].0)]).await;
        assert!(matches!(many, Err(StoreError::Timeout(_))), "{many:?}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        let started = Instant::now();
        assert!(store.ping().await.is_err());
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }
    server.resume();
    eventually(
        "lookups answer again after SIGCONT",
        Duration::from_secs(10),
        || async { matches!(store.lookup(number(data[0].0)).await, Ok(l) if l.found.is_some()) },
    )
    .await;
    assert!(store.ping().await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_hang_replaces_the_connection_and_recovers() {
    let mut server = RedisServer::start();
    let store = connect(&server).await;
    let data = us_numbers(14_155_550_000, 5, 500);
    store
        .apply_snapshot(&manifest(Kind::Snapshot, 1, 20_000), &records(data.clone()), None)
        .await
        .expect("snapshot");
    server.pause();
    // Long enough for three refreshes in a row to time out (100 ms period,
    // 200 ms timeout): the store replaces its connection.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let started = Instant::now();
    assert!(store.lookup(number(data[0].0)).await.is_err());
    assert!(started.elapsed() < Duration::from_secs(1));
    server.resume();
    eventually(
        "lookups answer again after a long hang",
        Duration::from_secs(10),
        || async { matches!(store.lookup(number(data[0].0)).await, Ok(l) if l.found.is_some()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_recovers_after_redis_restarts() {
    let mut server = RedisServer::start();
    let store = connect(&server).await;
    let data = us_numbers(14_155_550_000, 5, 500);
    store
        .apply_snapshot(&manifest(Kind::Snapshot, 1, 20_000), &records(data.clone()), None)
        .await
        .expect("snapshot");
    server.stop();
    let started = Instant::now();
    assert!(store.lookup(number(data[0].0)).await.is_err());
    assert!(store.ping().await.is_err());
    assert!(started.elapsed() < Duration::from_secs(1));
    server.restart();
    eventually(
        "lookups answer again after a restart",
        Duration::from_secs(15),
        || async { matches!(store.lookup(number(data[0].0)).await, Ok(l) if l.found.is_some()) },
    )
    .await;
    for (n, d) in &data[..50] {
        assert_eq!(lookup_day(&store, *n).await, Some(i32::from(*d)));
    }
    assert_eq!(
        store
            .refresh_meta()
            .await
            .expect("refresh")
            .expect("meta")
            .sequence,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_store_closes_its_connection() {
    let server = RedisServer::start();
    let mut con = redis_conn(&server);
    let clients = |con: &mut redis::Connection| -> u64 {
        let info: String = redis::cmd("INFO").arg("clients").query(con).expect("INFO");
        info.lines()
            .find_map(|l| l.strip_prefix("connected_clients:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("connected_clients")
    };
    let before = clients(&mut con);
    let store = connect(&server).await;
    let copy = store.clone();
    assert!(clients(&mut con) > before);
    drop(store);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(clients(&mut con) > before, "a clone keeps it alive");
    drop(copy);
    eventually("the store's connection closes", Duration::from_secs(5), || {
        let n = clients(&mut con);
        async move { n == before }
    })
    .await;
}

/// CPU seconds (user + system) the Redis server has used so far.
fn redis_cpu_seconds(con: &mut redis::Connection) -> f64 {
    let info: String = redis::cmd("INFO").arg("cpu").query(con).expect("INFO cpu");
    info.lines()
        .filter(|l| l.starts_with("used_cpu_user:") || l.starts_with("used_cpu_sys:"))
        .filter_map(|l| l.split(':').nth(1)?.trim().parse::<f64>().ok())
        .sum()
}

/// Bytes per record and import rate. Run with
/// `RN_BENCH_RECORDS=1000000 cargo test --release --test redis_store -- --ignored --nocapture bench`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn bench_snapshot_memory_and_rate() {
    use rand::{Rng, SeedableRng};
    let count: usize = std::env::var("RN_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url(), RedisOptions::default())
        .await
        .expect("connect");
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // US numbers: +1, area code and exchange 200-999, any line number.
    let mut pairs: Vec<(u64, u16)> = (0..count)
        .map(|_| {
            let n = 10_000_000_000u64 + rng.random_range(2_002_000_000u64..9_999_999_999);
            (n, rng.random_range(18_654u16..20_500))
        })
        .collect();
    pairs.sort_unstable();
    pairs.dedup_by_key(|p| p.0);
    let recs = records(pairs);
    let before = store.used_memory().await.expect("used_memory");
    let mut con = redis_conn(&server);
    let cpu_before = redis_cpu_seconds(&mut con);
    let started = Instant::now();
    store
        .apply_snapshot(&manifest(Kind::Snapshot, 1, 20_500), &recs, None)
        .await
        .expect("snapshot");
    let took = started.elapsed();
    let after = store.used_memory().await.expect("used_memory");
    let cpu = redis_cpu_seconds(&mut con) - cpu_before;
    println!(
        "records={} import={:.2?} (redis cpu {:.2}s) rate={:.0}/s used_memory_delta={} bytes_per_record={:.2}",
        recs.len(),
        took,
        cpu,
        recs.len() as f64 / took.as_secs_f64(),
        after - before,
        (after - before) as f64 / recs.len() as f64
    );
    // A delta of 1% of the mirror: half new numbers, half later dates.
    let delta_len = (recs.len() / 100).max(2);
    let mut delta_pairs: Vec<(u64, u16)> = (0..delta_len)
        .map(|i| {
            if i % 2 == 0 {
                (recs.numbers[(i * 7919) % recs.len()], 20_600)
            } else {
                (
                    10_000_000_000u64 + rng.random_range(2_002_000_000u64..9_999_999_999),
                    20_600,
                )
            }
        })
        .collect();
    delta_pairs.sort_unstable();
    delta_pairs.dedup_by_key(|p| p.0);
    let delta = records(delta_pairs);
    let started = Instant::now();
    store
        .apply_delta(&manifest(Kind::Delta, 2, 20_600), &delta)
        .await
        .expect("delta");
    let took = started.elapsed();
    println!(
        "delta_records={} took={:.2?} rate={:.0}/s",
        delta.len(),
        took,
        delta.len() as f64 / took.as_secs_f64()
    );
    // Lookup throughput with a realistic mix (about 4% hits), 64 at a time.
    let asked: Vec<PhoneNumber> = (0..200_000usize)
        .map(|i| {
            if i % 25 == 0 {
                number(recs.numbers[(i * 7919) % recs.len()])
            } else {
                number(10_000_000_000u64 + rng.random_range(2_002_000_000u64..9_999_999_999))
            }
        })
        .collect();
    let started = Instant::now();
    let hits = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for chunk in asked.chunks(asked.len() / 64) {
        let (store, chunk, hits) = (store.clone(), chunk.to_vec(), hits.clone());
        tasks.push(tokio::spawn(async move {
            for n in chunk {
                if store.lookup(n).await.expect("lookup").found.is_some() {
                    hits.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let took = started.elapsed();
    println!(
        "lookups={} took={:.2?} rate={:.0}/s hits={}",
        asked.len(),
        took,
        asked.len() as f64 / took.as_secs_f64(),
        hits.load(Ordering::Relaxed)
    );
}
