//! The Redis store's own tests against a real Redis that each test starts on
//! free ports: key layout, packed buckets, the membership filter, faults
//! injected into Redis, cluster slots. Each runs twice, against one
//! `redis-server` (`support::redis`) and against a three-master Redis
//! Cluster (`support::redis_cluster`); the few that only make sense on one
//! topology say why. What every store promises (lookups, snapshots,
//! deltas, conflicts) is tested on every store in `tests/store_contract.rs`.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use reassigned::domain::{Date, PhoneNumber};
use reassigned::store::packed;
use reassigned::store::redis::RedisOptions;
use reassigned::store::{Records, RedisStore, SnapshotWrite, Store, StoreError};
use support::per_store_tests;
use support::poll::eventually_within;
use support::redis::RedisServer;
use support::redis_cluster::RedisCluster;
use support::writes::{COVERAGE_START, delta_write, lookup_day, number, records, snap, us_numbers};

/// The Redis a test runs against: the factory of its stores and the way to
/// look at what they wrote.
enum TestRedis {
    Single(RedisServer),
    Cluster(RedisCluster),
}

#[derive(Clone, Copy, Debug)]
enum Topology {
    Single,
    Cluster,
}

impl TestRedis {
    fn start(topology: Topology) -> Self {
        Self::start_with(topology, &[])
    }

    fn start_with(topology: Topology, extra_args: &[&str]) -> Self {
        match topology {
            Topology::Single => TestRedis::Single(RedisServer::start_with(extra_args)),
            Topology::Cluster => TestRedis::Cluster(RedisCluster::start_with(extra_args)),
        }
    }

    /// A new store on this Redis.
    async fn connect_with(&self, options: RedisOptions) -> Result<RedisStore, StoreError> {
        match self {
            TestRedis::Single(server) => RedisStore::connect(&server.url(), options).await,
            TestRedis::Cluster(cluster) => RedisStore::connect_cluster(&cluster.urls(), options).await,
        }
    }

    /// A connection for raw commands (on a cluster: routed by key).
    fn conn(&self) -> Box<dyn redis::ConnectionLike> {
        match self {
            TestRedis::Single(server) => Box::new(
                redis::Client::open(server.url())
                    .and_then(|c| c.get_connection())
                    .expect("test connection"),
            ),
            TestRedis::Cluster(cluster) => Box::new(
                redis::cluster::ClusterClient::new(cluster.urls())
                    .and_then(|c| c.get_connection())
                    .expect("test cluster connection"),
            ),
        }
    }

    /// One plain connection per server (every master of a cluster).
    fn node_conns(&self) -> Vec<redis::Connection> {
        let urls = match self {
            TestRedis::Single(server) => vec![server.url()],
            TestRedis::Cluster(cluster) => cluster.urls(),
        };
        urls.into_iter()
            .map(|url| {
                redis::Client::open(url)
                    .and_then(|c| c.get_connection())
                    .expect("node connection")
            })
            .collect()
    }

    fn pause(&mut self) {
        match self {
            TestRedis::Single(server) => server.pause(),
            TestRedis::Cluster(cluster) => cluster.pause(),
        }
    }

    fn resume(&mut self) {
        match self {
            TestRedis::Single(server) => server.resume(),
            TestRedis::Cluster(cluster) => cluster.resume(),
        }
    }

    fn single(&mut self) -> &mut RedisServer {
        match self {
            TestRedis::Single(server) => server,
            TestRedis::Cluster(_) => panic!("this test needs a single redis-server"),
        }
    }
}

// Runs each test function once on one server and once on a cluster.
per_store_tests!(
    single => super::TestRedis::start(super::Topology::Single),
    cluster => super::TestRedis::start(super::Topology::Cluster);
    snapshot_key_layout,
    a_snapshot_reclaims_the_old_generations_keys,
    a_delta_retried_after_a_crash_before_the_metadata,
    a_held_import_lock_refuses_imports,
    crashed_snapshot_leftovers_are_deleted,
    garbled_meta_is_corrupt,
    lookups_fail_fast_while_redis_hangs_and_recover,
    a_long_hang_replaces_the_connection_and_recovers,
    dropping_the_store_closes_its_connection,
    membership_filter_answers_misses_without_redis,
    a_layout_2_mirror_is_read_until_the_next_snapshot,
    a_bucket_of_another_generation_is_never_no_record,
);

/// Runs each test function once on one server and once on a cluster, each
/// started with these extra `redis-server` arguments.
macro_rules! on_both_with {
    ($($name:ident: $args:expr),* $(,)?) => {
        mod single_with_args {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name(super::TestRedis::start_with(super::Topology::Single, $args)).await
            })*
        }
        mod cluster_with_args {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name(super::TestRedis::start_with(super::Topology::Cluster, $args)).await
            })*
        }
    };
}

on_both_with!(
    // RESTORE and HSET are not needed to write a mirror (layout 3).
    snapshot_buckets_are_packed_strings: &["--rename-command", "RESTORE", ""],
);

fn test_options() -> RedisOptions {
    RedisOptions {
        meta_refresh: Duration::from_millis(100),
        reclaim_grace: Duration::from_millis(600),
        ..RedisOptions::default()
    }
}

async fn connect(server: &TestRedis) -> RedisStore {
    server
        .connect_with(test_options())
        .await
        .expect("connect to the test redis")
}

/// A store on `server` ([`connect`]) holding `recs` as the snapshot `write`.
async fn loaded(server: &TestRedis, write: &SnapshotWrite, recs: &Records) -> RedisStore {
    let store = connect(server).await;
    store.apply_snapshot(write, recs, None).await.expect("snapshot");
    store
}

fn redis_conn(server: &TestRedis) -> Box<dyn redis::ConnectionLike> {
    server.conn()
}

/// Every key matching `pattern` (KEYS on every server).
fn keys(server: &TestRedis, pattern: &str) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    for mut con in server.node_conns() {
        let mut on_node: Vec<String> = redis::cmd("KEYS").arg(pattern).query(&mut con).expect("KEYS");
        found.append(&mut on_node);
    }
    found.sort();
    found
}

/// DBSIZE of every server.
fn dbsizes(server: &TestRedis) -> Vec<u64> {
    server
        .node_conns()
        .iter_mut()
        .map(|con| redis::cmd("DBSIZE").query(con).expect("DBSIZE"))
        .collect()
}

/// Where a snapshot puts the records: one packed string per bucket (layout
/// 3), written with SET, number `n` at (bucket, suffix) = (n % nbuckets,
/// n / nbuckets). (What lookups answer is in the store contract suite.)
async fn snapshot_key_layout(server: TestRedis) {
    let data = us_numbers(14_155_550_000, 3, 1000);
    let _store = loaded(&server, &snap(1, 20_100), &records(data.clone())).await;
    // Layout: ceil(1000 / 256) = 4 string buckets, no hash tag, lock released.
    let buckets = keys(&server, "rn:g[0-9]*");
    assert_eq!(buckets.len(), 4, "{buckets:?}");
    assert!(buckets.iter().all(|k| k.starts_with("rn:g1:")));
    assert!(keys(&server, "rn:lock").is_empty());
    // Each bucket written once, with SET (plus the filter chunk and the lock).
    assert!(command_calls(&server, "set") >= 4 && command_calls(&server, "set") <= 4 + 3);
    assert_eq!(command_calls(&server, "restore"), 0);
    let mut con = redis_conn(&server);
    let layout: String = redis::cmd("HGET")
        .arg("rn:meta")
        .arg("layout")
        .query(&mut *con)
        .expect("HGET");
    assert_eq!(layout, "3");
    // A number is (bucket, suffix) = (n % 4, n / 4), found in its bucket.
    let n = data[5].0;
    let raw: Vec<u8> = redis::cmd("GET")
        .arg(format!("rn:g1:{}", n % 4))
        .query(&mut *con)
        .expect("GET");
    let bucket = packed::Bucket::parse(&raw).expect("a packed bucket");
    assert_eq!(bucket.header().generation, 1);
    assert_eq!(bucket.find(n / 4), Some(data[5].1));
    assert_eq!(bucket.find(n / 4 + 1), None);
}

/// A snapshot returns after the generation it replaced (deltas merged into
/// it included) is deleted: only the new generation's buckets remain.
async fn a_snapshot_reclaims_the_old_generations_keys(server: TestRedis) {
    let first = us_numbers(12_125_550_000, 7, 3000);
    let store = loaded(&server, &snap(1, 20_000), &records(first.clone())).await;
    let delta: Vec<(u64, u16)> = first.iter().step_by(3).map(|&(n, _)| (n + 1, 20_001)).collect();
    store
        .apply_delta(&delta_write(2, 20_001), &records(delta))
        .await
        .expect("delta");
    let mut second = us_numbers(13_105_550_000, 11, 1500);
    second.push(first[0]);
    store
        .apply_snapshot(&snap(3, 20_030), &records(second), Some(2))
        .await
        .expect("second snapshot");
    // Only the new generation's ceil(1501 / 256) = 6 buckets remain.
    assert!(keys(&server, "rn:g1:*").is_empty());
    let buckets = keys(&server, "rn:g[0-9]*");
    assert_eq!(buckets.len(), 6, "{buckets:?}");
    assert!(buckets.iter().all(|k| k.starts_with("rn:g2:")), "{buckets:?}");
    let dbsize: u64 = dbsizes(&server).iter().sum();
    assert_eq!(
        dbsize,
        6 + 4,
        "buckets, filter, meta, gen_counter and the applied checksums"
    );
    let mut con = redis_conn(&server);
    let reclaim: Option<String> = redis::cmd("HGET")
        .arg("rn:meta")
        .arg("reclaim_generation")
        .query(&mut *con)
        .expect("HGET");
    assert_eq!(reclaim, None);
    // And again: ceil(500 / 256) = 2 buckets of generation 3.
    store
        .apply_snapshot(&snap(4, 20_031), &records(first[..500].to_vec()), Some(3))
        .await
        .expect("third snapshot");
    assert!(keys(&server, "rn:g2:*").is_empty());
    assert_eq!(keys(&server, "rn:g3:*").len(), 2);
}

/// A delta whose import crashed after writing the data, before moving the
/// metadata (simulated by rewinding `rn:meta`), applied again gives the same
/// data (`record_count` may under-count, as documented), in the same
/// generation.
async fn a_delta_retried_after_a_crash_before_the_metadata(server: TestRedis) {
    let base = us_numbers(14_155_550_000, 13, 2000);
    let store = loaded(&server, &snap(1, 20_000), &records(base.clone())).await;
    let a = base[3];
    let new_number = 14_155_550_001;
    store
        .apply_delta(
            &delta_write(2, 20_001),
            &records(vec![(a.0, a.1 + 100), (new_number, 20_001)]),
        )
        .await
        .expect("delta 2");
    let m3 = delta_write(3, 20_002);
    let delta3 = records(vec![(a.0, a.1 + 200), (new_number + 2, 20_002)]);
    store.apply_delta(&m3, &delta3).await.expect("delta 3");
    let mut con = redis_conn(&server);
    let _: () = redis::cmd("HSET")
        .arg("rn:meta")
        .arg("sequence")
        .arg(2)
        .arg("as_of")
        .arg(Date::from_days(20_001).to_string())
        .query(&mut *con)
        .expect("rewind meta");
    store.apply_delta(&m3, &delta3).await.expect("delta 3 retried");
    assert_eq!(lookup_day(&store, a.0).await, Some(i32::from(a.1) + 200));
    assert_eq!(lookup_day(&store, new_number + 2).await, Some(20_002));
    let meta = store.refresh_meta().await.expect("refresh").expect("meta");
    assert_eq!(meta.sequence, 3);
    assert!(meta.record_count == 2001 || meta.record_count == 2002);
    // Still one generation: deltas merge into the snapshot's buckets.
    assert!(
        keys(&server, "rn:g[0-9]*")
            .iter()
            .all(|k| k.starts_with("rn:g1:"))
    );
}

/// While another importer holds `rn:lock`, imports are refused and leave
/// the lock alone; once it is free they apply.
async fn a_held_import_lock_refuses_imports(server: TestRedis) {
    let recs = records(us_numbers(14_155_550_000, 1, 100));
    let store = loaded(&server, &snap(5, 20_000), &recs).await;
    let mut con = redis_conn(&server);
    let _: () = redis::cmd("SET")
        .arg("rn:lock")
        .arg("someone-else")
        .arg("PX")
        .arg(60_000)
        .query(&mut *con)
        .expect("SET lock");
    assert!(matches!(
        store.apply_delta(&delta_write(6, 20_001), &recs).await,
        Err(StoreError::Conflict(_))
    ));
    let holder: String = redis::cmd("GET").arg("rn:lock").query(&mut *con).expect("GET");
    assert_eq!(holder, "someone-else", "a refused import leaves the lock alone");
    let _: () = redis::cmd("DEL").arg("rn:lock").query(&mut *con).expect("DEL");
    store
        .apply_delta(&delta_write(6, 20_001), &recs)
        .await
        .expect("delta after the lock is free");
    assert_eq!(store.cached_meta().expect("meta").sequence, 6);
}

async fn crashed_snapshot_leftovers_are_deleted(server: TestRedis) {
    let recs = records(us_numbers(14_155_550_000, 1, 300));
    let store = loaded(&server, &snap(1, 20_000), &recs).await;
    // What a snapshot import that crashed half-way leaves behind.
    let mut con = redis_conn(&server);
    let _: () = redis::cmd("HSET")
        .arg("rn:meta")
        .arg("pending_generation")
        .arg(9)
        .arg("pending_nbuckets")
        .arg(3)
        .query(&mut *con)
        .expect("HSET");
    for b in 0..3 {
        let _: () = redis::cmd("HSET")
            .arg(format!("rn:g9:{b}"))
            .arg(1)
            .arg(1)
            .query(&mut *con)
            .expect("HSET");
    }
    // Readers ignore it.
    assert_eq!(
        lookup_day(&store, recs.number(0)).await,
        Some(i32::from(recs.day(0)))
    );
    store
        .apply_snapshot(&snap(2, 20_001), &recs, Some(1))
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

async fn garbled_meta_is_corrupt(server: TestRedis) {
    let store = connect(&server).await;
    let mut con = redis_conn(&server);
    let _: () = redis::cmd("HSET")
        .arg("rn:meta")
        .arg("generation")
        .arg("one")
        .arg("nbuckets")
        .arg(1)
        .query(&mut *con)
        .expect("HSET");
    assert!(matches!(store.refresh_meta().await, Err(StoreError::Corrupt(_))));
    assert!(matches!(
        server.connect_with(test_options()).await,
        Err(StoreError::Corrupt(_))
    ));
    // Not a hash at all.
    let _: () = redis::cmd("SET")
        .arg("rn:meta")
        .arg("x")
        .query(&mut *con)
        .expect("SET");
    assert!(matches!(store.refresh_meta().await, Err(StoreError::Corrupt(_))));
    // A bucket value that is not a day number.
    let _: () = redis::cmd("DEL").arg("rn:meta").query(&mut *con).expect("DEL");
    store
        .apply_snapshot(&snap(1, 20_000), &records(vec![(14_155_550_123, 19_000)]), None)
        .await
        .expect("snapshot");
    // Our header (generation 1) with a body one byte short of it.
    let mut cut = Vec::new();
    packed::encode(1, &[(14_155_550_123, 19_000)], &mut cut);
    cut.pop();
    let _: () = redis::cmd("SET")
        .arg("rn:g1:0")
        .arg(cut)
        .query(&mut *con)
        .expect("SET");
    assert!(matches!(
        store.lookup(number(14_155_550_123)).await,
        Err(StoreError::Corrupt(_))
    ));
    // A hash where a packed bucket belongs: corrupt too.
    let _: () = redis::cmd("DEL").arg("rn:g1:0").query(&mut *con).expect("DEL");
    let _: () = redis::cmd("HSET")
        .arg("rn:g1:0")
        .arg(14_155_550_123u64)
        .arg(19_000)
        .query(&mut *con)
        .expect("HSET");
    assert!(matches!(
        store.lookup(number(14_155_550_123)).await,
        Err(StoreError::Corrupt(_))
    ));
}

/// How many times Redis ran `command` (INFO commandstats), over all servers.
fn command_calls(server: &TestRedis, command: &str) -> u64 {
    command_calls_per_node(server, command).iter().sum()
}

/// How many times each server ran `command` (INFO commandstats).
fn command_calls_per_node(server: &TestRedis, command: &str) -> Vec<u64> {
    let prefix = format!("cmdstat_{command}:calls=");
    server
        .node_conns()
        .iter_mut()
        .map(|con| {
            let info: String = redis::cmd("INFO")
                .arg("commandstats")
                .query(con)
                .expect("INFO commandstats");
            info.lines()
                .find_map(|l| l.strip_prefix(prefix.as_str()))
                .and_then(|rest| rest.split(',').next()?.parse().ok())
                .unwrap_or(0)
        })
        .collect()
}

/// Numbers of every length (suffix widths from a few bits to 50).
fn mixed_numbers() -> Vec<(u64, u16)> {
    let mut pairs = us_numbers(10_000, 1, 3000); // shortest numbers: tiny suffixes
    pairs.extend(us_numbers(14_155_550_000, 17, 3000));
    pairs.extend(us_numbers(861_380_013_800, 1_000_003, 3000));
    pairs.extend(us_numbers(999_999_000_000_000, 99_991, 3000)); // 15 digits
    pairs
}

/// Every bucket is one packed string of its generation, holding exactly its
/// numbers (suffix = n / nbuckets) in suffix order; written with SET alone
/// (this Redis has no RESTORE), looked up with GET.
async fn snapshot_buckets_are_packed_strings(server: TestRedis) {
    let data = mixed_numbers();
    let store = loaded(&server, &snap(1, 20_000), &records(data.clone())).await;
    let nbuckets = 12_000u64.div_ceil(256);
    assert!(command_calls(&server, "hset") < 5, "HSET only on the metadata");
    for (n, d) in data.iter().step_by(7) {
        assert_eq!(lookup_day(&store, *n).await, Some(i32::from(*d)));
    }
    assert!(command_calls(&server, "get") > 0, "lookups GET their bucket");
    assert_eq!(command_calls(&server, "hmget"), 0);
    let mut con = redis_conn(&server);
    let buckets = keys(&server, "rn:g[0-9]*");
    assert_eq!(buckets.len() as u64, nbuckets);
    let mut seen: Vec<(u64, u16)> = Vec::new();
    for key in &buckets {
        let index: u64 = key
            .rsplit(':')
            .next()
            .and_then(|b| b.parse().ok())
            .expect("bucket index");
        let raw: Vec<u8> = redis::cmd("GET").arg(key).query(&mut *con).expect("GET");
        let bucket = packed::Bucket::parse(&raw).expect("a packed bucket");
        assert_eq!(bucket.header().generation, 1, "{key}");
        let entries: Vec<(u64, u16)> = bucket.iter().collect();
        assert!(
            entries.windows(2).all(|w| w[0].0 < w[1].0),
            "suffix order in {key}"
        );
        seen.extend(
            entries
                .iter()
                .map(|&(suffix, day)| (suffix * nbuckets + index, day)),
        );
    }
    seen.sort_unstable();
    let mut want = data.clone();
    want.sort_unstable();
    assert_eq!(seen, want);
}

/// Writes a layout-2 mirror (hash buckets with the `_g` sentinel, what the
/// previous version wrote) of `data` as generation 5 by hand.
fn write_layout_2(con: &mut dyn redis::ConnectionLike, data: &[(u64, u16)], nbuckets: u64) {
    write_layout_2_at(con, "rn", data, nbuckets);
}

/// [`write_layout_2`] under the key prefix `prefix`.
fn write_layout_2_at(con: &mut dyn redis::ConnectionLike, prefix: &str, data: &[(u64, u16)], nbuckets: u64) {
    let mut by_bucket: Vec<Vec<(u64, u16)>> = vec![Vec::new(); nbuckets as usize];
    for &(n, d) in data {
        by_bucket[(n % nbuckets) as usize].push((n / nbuckets, d));
    }
    for (bucket, fields) in by_bucket.iter().enumerate() {
        let mut hset = redis::cmd("HSET");
        hset.arg(format!("{prefix}:g5:{bucket}"));
        for &(field, d) in fields {
            hset.arg(field).arg(d);
        }
        hset.arg("_g").arg(5);
        let _: () = hset.query(con).expect("HSET bucket");
    }
    let _: () = redis::cmd("SET")
        .arg(format!("{prefix}:gen_counter"))
        .arg(5)
        .query(con)
        .expect("SET");
    let _: () = redis::cmd("HSET")
        .arg(format!("{prefix}:meta"))
        .arg("generation")
        .arg(5)
        .arg("nbuckets")
        .arg(nbuckets)
        .arg("sequence")
        .arg(1)
        .arg("as_of")
        .arg(Date::from_days(20_000).to_string())
        .arg("coverage_start")
        .arg(Date::from_days(COVERAGE_START).to_string())
        .arg("prefixes")
        .arg("+1,+86")
        .arg("record_count")
        .arg(data.len())
        .arg("last_import_unix")
        .arg(1_700_000_000)
        .arg("layout")
        .arg(2)
        .query(con)
        .expect("HSET meta");
}

/// A mirror written by the previous version (layout 2: hash buckets with
/// sentinels) keeps answering, fail-closed, with HMGET; a delta merges into
/// it; the next snapshot switches it to layout 3.
async fn a_layout_2_mirror_is_read_until_the_next_snapshot(server: TestRedis) {
    let data = us_numbers(14_155_550_000, 3, 600);
    let nbuckets = 5;
    {
        let mut con = redis_conn(&server);
        write_layout_2(&mut *con, &data, nbuckets);
    }
    let store = connect(&server).await;
    for &(n, d) in data.iter().step_by(11) {
        assert_eq!(lookup_day(&store, n).await, Some(i32::from(d)));
    }
    assert_eq!(lookup_day(&store, data[0].0 + 1).await, None);
    let batch: Vec<PhoneNumber> = data.iter().take(50).map(|&(n, _)| number(n)).collect();
    let found = store.lookup_many(&batch).await.expect("batch").found;
    assert!(found.iter().all(Option::is_some));
    assert!(command_calls(&server, "hmget") > 0);
    // A delta merges into the hash buckets (later date wins, new number added).
    let delta = vec![(data[1].0, 20_050u16), (data[0].0 + 1, 20_050)];
    store
        .apply_delta(&delta_write(2, 20_050), &records(delta))
        .await
        .expect("delta into layout 2");
    assert_eq!(lookup_day(&store, data[1].0).await, Some(20_050));
    assert_eq!(lookup_day(&store, data[0].0 + 1).await, Some(20_050));
    // A lost hash bucket: never "no record".
    let lost = data[2].0;
    {
        let mut con = redis_conn(&server);
        let _: () = redis::cmd("DEL")
            .arg(format!("rn:g5:{}", lost % nbuckets))
            .query(&mut *con)
            .expect("DEL");
    }
    assert!(matches!(
        store.lookup(number(lost)).await,
        Err(StoreError::Unavailable(_))
    ));
    // The next snapshot writes layout 3 and deletes the hash buckets.
    store
        .apply_snapshot(&snap(3, 20_060), &records(data.clone()), Some(2))
        .await
        .expect("snapshot");
    let mut con = redis_conn(&server);
    let layout: String = redis::cmd("HGET")
        .arg("rn:meta")
        .arg("layout")
        .query(&mut *con)
        .expect("HGET");
    assert_eq!(layout, "3");
    assert!(keys(&server, "rn:g5:*").is_empty());
    for &(n, d) in data.iter().step_by(7) {
        assert_eq!(lookup_day(&store, n).await, Some(i32::from(d)));
    }
}

/// A packed bucket replaced by one of another generation (a stale copy, a
/// restore from an old backup) or by a string that is no bucket: its numbers
/// answer UNAVAILABLE, never "no record", singly and in batches; a delta
/// refuses to merge into it.
async fn a_bucket_of_another_generation_is_never_no_record(server: TestRedis) {
    let data = us_numbers(14_155_550_000, 3, 1000);
    let store = loaded(&server, &snap(1, 20_000), &records(data.clone())).await;
    let nbuckets = 4;
    let (n, _) = data[9];
    let key = format!("rn:g1:{}", n % nbuckets);
    let in_bucket: Vec<PhoneNumber> = data
        .iter()
        .filter(|(m, _)| m % nbuckets == n % nbuckets)
        .map(|&(m, _)| number(m))
        .collect();
    let mut con = redis_conn(&server);
    let mut stale = Vec::new();
    packed::encode(2, &[], &mut stale);
    for value in [stale, b"not a bucket".to_vec()] {
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg(value)
            .query(&mut *con)
            .expect("SET");
        let before = store.unproven_reads();
        assert!(matches!(
            store.lookup(number(n)).await,
            Err(StoreError::Unavailable(_))
        ));
        assert!(matches!(
            store.lookup_many(&in_bucket).await,
            Err(StoreError::Unavailable(_))
        ));
        assert!(store.unproven_reads() > before);
        assert!(matches!(
            store
                .apply_delta(&delta_write(2, 20_001), &records(vec![(n, 20_001)]))
                .await,
            Err(StoreError::Corrupt(_))
        ));
    }
    // Other buckets answer.
    let other = data
        .iter()
        .find(|(m, _)| m % nbuckets != n % nbuckets)
        .expect("other");
    assert_eq!(lookup_day(&store, other.0).await, Some(i32::from(other.1)));
}

async fn lookups_fail_fast_while_redis_hangs_and_recover(mut server: TestRedis) {
    let data = us_numbers(14_155_550_000, 5, 500);
    let store = loaded(&server, &snap(1, 20_000), &records(data.clone())).await;
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
    eventually_within(
        "lookups answer again after SIGCONT",
        Duration::from_secs(10),
        || async { matches!(store.lookup(number(data[0].0)).await, Ok(l) if l.found.is_some()) },
    )
    .await;
    assert!(store.ping().await.is_ok());
}

async fn a_long_hang_replaces_the_connection_and_recovers(mut server: TestRedis) {
    let data = us_numbers(14_155_550_000, 5, 500);
    let store = loaded(&server, &snap(1, 20_000), &records(data.clone())).await;
    server.pause();
    // The fault is a hang of 1.5 s, long enough for three refreshes in a
    // row to time out (100 ms period, 200 ms timeout): the store replaces
    // its connection. The hang's length is this test's subject, so it is a
    // fixed sleep, not a wait for a condition.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let started = Instant::now();
    assert!(store.lookup(number(data[0].0)).await.is_err());
    assert!(started.elapsed() < Duration::from_secs(1));
    server.resume();
    eventually_within(
        "lookups answer again after a long hang",
        Duration::from_secs(10),
        || async { matches!(store.lookup(number(data[0].0)).await, Ok(l) if l.found.is_some()) },
    )
    .await;
}

/// Single server only: restarting every node of a cluster with its data
/// needs persisted cluster configuration and data files (this harness runs
/// nodes without persistence); a cluster survives the loss of a node through
/// its replicas instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_recovers_after_redis_restarts() {
    let mut server = TestRedis::start(Topology::Single);
    let data = us_numbers(14_155_550_000, 5, 500);
    let store = loaded(&server, &snap(1, 20_000), &records(data.clone())).await;
    server.single().stop();
    let started = Instant::now();
    assert!(store.lookup(number(data[0].0)).await.is_err());
    assert!(store.ping().await.is_err());
    assert!(started.elapsed() < Duration::from_secs(1));
    server.single().restart();
    eventually_within(
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

async fn dropping_the_store_closes_its_connection(server: TestRedis) {
    let mut cons = server.node_conns();
    // Connected clients over all servers.
    let clients = |cons: &mut Vec<redis::Connection>| -> u64 {
        cons.iter_mut()
            .map(|con| {
                let info: String = redis::cmd("INFO").arg("clients").query(con).expect("INFO");
                info.lines()
                    .find_map(|l| l.strip_prefix("connected_clients:"))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .expect("connected_clients")
            })
            .sum()
    };
    let before = clients(&mut cons);
    let store = connect(&server).await;
    let copy = store.clone();
    assert!(clients(&mut cons) > before);
    drop(store);
    // The metadata refresh (HGETALL every 100 ms) stops when the last
    // handle goes: it keeps running, so the clone keeps the store alive...
    // (Read on the connections held, so that the count of clients is not
    // disturbed by connections of the test's own.)
    let refreshes = |cons: &mut Vec<redis::Connection>| -> u64 {
        cons.iter_mut()
            .map(|con| {
                let info: String = redis::cmd("INFO").arg("commandstats").query(con).expect("INFO");
                info.lines()
                    .find_map(|l| l.strip_prefix("cmdstat_hgetall:calls="))
                    .and_then(|rest| rest.split(',').next()?.parse::<u64>().ok())
                    .unwrap_or(0)
            })
            .sum()
    };
    let dropped_at = refreshes(&mut cons);
    eventually_within(
        "the store refreshes its metadata after a clone is dropped",
        Duration::from_secs(10),
        || {
            let n = refreshes(&mut cons);
            async move { n >= dropped_at + 3 }
        },
    )
    .await;
    // ... and its connection.
    assert!(clients(&mut cons) > before, "a clone keeps it alive");
    drop(copy);
    eventually_within("the store's connection closes", Duration::from_secs(5), || {
        let n = clients(&mut cons);
        async move { n == before }
    })
    .await;
}

/// Bucket keys carry no hash tag, so a snapshot spreads them over every
/// master of a cluster (three here: each gets a third, give or take).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_keys_spread_evenly_over_masters() {
    let server = TestRedis::start(Topology::Cluster);
    let data = us_numbers(14_155_550_000, 3, 20_000);
    let _store = loaded(&server, &snap(1, 20_000), &records(data)).await;
    let per_node: Vec<usize> = server
        .node_conns()
        .iter_mut()
        .map(|con| {
            let found: Vec<String> = redis::cmd("KEYS").arg("rn:g[0-9]*").query(con).expect("KEYS");
            found.len()
        })
        .collect();
    let total: usize = per_node.iter().sum();
    assert_eq!(total, 20_000usize.div_ceil(256));
    let dbsize = dbsizes(&server);
    println!("bucket keys per master: {per_node:?} of {total}; DBSIZE per master: {dbsize:?}");
    for keys in &per_node {
        let share = *keys as f64 / total as f64;
        assert!((0.20..=0.47).contains(&share), "{per_node:?}");
    }
}

/// CPU seconds (user + system) the Redis servers have used so far.
fn redis_cpu_seconds(server: &TestRedis) -> f64 {
    let mut total = 0.0;
    for mut con in server.node_conns() {
        let info: String = redis::cmd("INFO").arg("cpu").query(&mut con).expect("INFO cpu");
        total += info
            .lines()
            .filter(|l| l.starts_with("used_cpu_user:") || l.starts_with("used_cpu_sys:"))
            .filter_map(|l| l.split(':').nth(1)?.trim().parse::<f64>().ok())
            .sum::<f64>();
    }
    total
}

/// `used_memory` of the Redis servers together, in bytes.
fn used_memory(server: &TestRedis) -> u64 {
    let mut total = 0;
    for mut con in server.node_conns() {
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .query(&mut con)
            .expect("INFO memory");
        total += info
            .lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .expect("used_memory");
    }
    total
}

/// Bytes per record and import rate. Run with
/// `RN_BENCH_RECORDS=1000000 cargo test --release --test redis_store -- --ignored --nocapture bench`
/// (with `RN_BENCH_CLUSTER=1`: on a three-master cluster; with
/// `RN_BENCH_NO_FILTER=1`: without the membership filter).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn bench_snapshot_memory_and_rate() {
    use rand::{Rng, SeedableRng};
    let count: usize = std::env::var("RN_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let topology = if std::env::var_os("RN_BENCH_CLUSTER").is_some() {
        Topology::Cluster
    } else {
        Topology::Single
    };
    let server = TestRedis::start(topology);
    // RN_BENCH_NO_FILTER=1: every lookup asks Redis.
    let membership_filter = std::env::var_os("RN_BENCH_NO_FILTER").is_none();
    let store = server
        .connect_with(RedisOptions {
            membership_filter,
            ..RedisOptions::default()
        })
        .await
        .expect("connect");
    let pairs = support::writes::random_us_pairs(count as u64, 7);
    let mut rng = rand::rngs::StdRng::seed_from_u64(77);
    let recs = records(pairs);
    let before = used_memory(&server);
    let cpu_before = redis_cpu_seconds(&server);
    let started = Instant::now();
    store
        .apply_snapshot(&snap(1, 20_500), &recs, None)
        .await
        .expect("snapshot");
    let took = started.elapsed();
    let after = used_memory(&server);
    let cpu = redis_cpu_seconds(&server) - cpu_before;
    println!(
        "topology={topology:?} filter={membership_filter} records={} import={:.2?} (redis cpu {:.2}s) rate={:.0}/s used_memory_delta={} bytes_per_record={:.2}",
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
                (recs.number((i * 7919) % recs.len()), 20_600)
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
        .apply_delta(&delta_write(2, 20_600), &delta)
        .await
        .expect("delta");
    let took = started.elapsed();
    println!(
        "delta_records={} took={:.2?} rate={:.0}/s",
        delta.len(),
        took,
        delta.len() as f64 / took.as_secs_f64()
    );
    if membership_filter {
        let started = Instant::now();
        eventually_within(
            "the filter of sequence 2 is loaded",
            Duration::from_secs(30),
            || async { store.membership_filter_loaded() == Some((1, 2)) },
        )
        .await;
        println!("filter loaded {:.2?} after the delta", started.elapsed());
    }
    // Lookup throughput with a realistic mix (about 4% hits), 64 at a time.
    let asked: Vec<PhoneNumber> = (0..200_000usize)
        .map(|i| {
            if i % 25 == 0 {
                number(recs.number((i * 7919) % recs.len()))
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

/// With `read_from_replicas`, lookups on a cluster with one replica per
/// master are answered by the replicas; imports still write to the masters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_reads_from_replicas() {
    let cluster = RedisCluster::start_with_replicas(1);
    let replica: Vec<bool> = (0..cluster.urls().len()).map(|i| cluster.is_replica(i)).collect();
    assert_eq!(replica.iter().filter(|&&r| r).count(), 3, "{replica:?}");
    let server = TestRedis::Cluster(cluster);
    let store = server
        .connect_with(RedisOptions {
            read_from_replicas: true,
            ..test_options()
        })
        .await
        .expect("connect");
    let data = us_numbers(14_155_550_000, 3, 2000);
    store
        .apply_snapshot(&snap(1, 20_000), &records(data.clone()), None)
        .await
        .expect("snapshot");
    // Replication is asynchronous: wait until the replicas have it all.
    eventually_within("the replicas have the snapshot", Duration::from_secs(10), || {
        let (store, data) = (store.clone(), data.clone());
        async move {
            let asked: Vec<PhoneNumber> = data.iter().map(|&(n, _)| number(n)).collect();
            store
                .lookup_many(&asked)
                .await
                .is_ok_and(|l| l.found.iter().all(Option::is_some))
        }
    })
    .await;
    let hgets = |server: &TestRedis| -> (u64, u64) {
        let per_node = command_calls_per_node(server, "get");
        let on = |want: bool| {
            per_node
                .iter()
                .zip(&replica)
                .filter(|&(_, &r)| r == want)
                .map(|(n, _)| n)
                .sum::<u64>()
        };
        (on(false), on(true))
    };
    let (masters_before, replicas_before) = hgets(&server);
    for (n, d) in data.iter().step_by(4) {
        assert_eq!(lookup_day(&store, *n).await, Some(i32::from(*d)));
    }
    let (masters_after, replicas_after) = hgets(&server);
    assert_eq!(masters_after, masters_before, "no lookup on a master");
    assert!(
        replicas_after - replicas_before >= 500,
        "{replicas_before} -> {replicas_after}"
    );
}

/// Most numbers asked have no record: once the membership filter of the
/// current generation and sequence is loaded, they are answered without a
/// round trip (GET calls stay flat); a number a delta adds is found as soon
/// as the reader sees the delta's sequence; an import that does not keep the
/// filter up to date makes readers stop using it.
async fn membership_filter_answers_misses_without_redis(server: TestRedis) {
    let writer = connect(&server).await;
    let reader = connect(&server).await;
    let data = us_numbers(14_155_550_000, 3, 2000);
    writer
        .apply_snapshot(&snap(1, 20_000), &records(data.clone()), None)
        .await
        .expect("snapshot");
    eventually_within("the reader loads the filter", Duration::from_secs(5), || async {
        reader.membership_filter_loaded() == Some((1, 1))
    })
    .await;
    // In the filter's generation: every stored number is found...
    for (n, d) in data.iter().step_by(10) {
        assert_eq!(lookup_day(&reader, *n).await, Some(i32::from(*d)));
    }
    // ... and absent numbers (one after each stored one) rarely reach Redis.
    let absent: Vec<u64> = data.iter().map(|&(n, _)| n + 1).collect();
    let before = command_calls(&server, "get");
    for &n in &absent[..1000] {
        assert_eq!(lookup_day(&reader, n).await, None);
    }
    let asked: Vec<PhoneNumber> = absent[1000..].iter().copied().map(number).collect();
    let many = reader.lookup_many(&asked).await.expect("lookup_many");
    assert!(many.found.iter().all(Option::is_none));
    let reached = command_calls(&server, "get") - before;
    // 12 bits and 8 hashes per number: about 0.3% false positives (6 of 2000).
    assert!(
        reached <= 25,
        "{reached} of 2000 absent numbers reached redis (false positives)"
    );

    // A delta adds a number (not one of `absent`): found once the reader
    // sees sequence 2.
    let new_number = 14_155_550_002;
    assert_eq!(lookup_day(&reader, new_number).await, None);
    writer
        .apply_delta(&delta_write(2, 20_001), &records(vec![(new_number, 20_001)]))
        .await
        .expect("delta");
    eventually_within("the reader sees sequence 2", Duration::from_secs(5), || async {
        reader.cached_meta().is_some_and(|m| m.sequence == 2)
    })
    .await;
    assert_eq!(lookup_day(&reader, new_number).await, Some(20_001));
    eventually_within(
        "the reader reloads the filter",
        Duration::from_secs(5),
        || async { reader.membership_filter_loaded() == Some((1, 2)) },
    )
    .await;
    assert_eq!(lookup_day(&reader, new_number).await, Some(20_001));
    let before = command_calls(&server, "get");
    for &n in &absent[..500] {
        assert_eq!(lookup_day(&reader, n).await, None);
    }
    assert!(command_calls(&server, "get") - before <= 20);

    // An import that moves the sequence without the filter (an older
    // version): readers ask Redis again.
    let mut con = redis_conn(&server);
    let _: () = redis::cmd("HSET")
        .arg("rn:meta")
        .arg("sequence")
        .arg(3)
        .query(&mut *con)
        .expect("HSET");
    eventually_within("the reader sees sequence 3", Duration::from_secs(5), || async {
        reader.cached_meta().is_some_and(|m| m.sequence == 3)
    })
    .await;
    let before = command_calls(&server, "get");
    for &n in &absent[..100] {
        assert_eq!(lookup_day(&reader, n).await, None);
    }
    assert_eq!(command_calls(&server, "get") - before, 100, "no stale filter");
}

/// Lookup cost of layout 3 (GET of a packed bucket, searched here) against
/// layout 2 (HMGET of a listpack hash): the same records in both layouts
/// on one Redis (layout 2 written by hand under prefix `l2`, layout 3 by a
/// snapshot under `l3`), the membership filter off so every lookup goes to
/// Redis, 64 concurrent lookups of a mix of hits and misses, rounds
/// alternated. Prints lookups/s and Redis CPU per lookup of each. Run with
/// `RN_BENCH_RECORDS=1000000 cargo test --release --test redis_store -- --ignored --nocapture bench_lookup_layouts`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn bench_lookup_layouts() {
    use rand::{Rng, SeedableRng};
    let count: u64 = std::env::var("RN_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let server = TestRedis::start(Topology::Single);
    let pairs = support::writes::random_us_pairs(count, 11);
    let mut rng = rand::rngs::StdRng::seed_from_u64(1111);
    {
        let mut con = redis_conn(&server);
        write_layout_2_at(&mut *con, "l2", &pairs, (pairs.len() as u64).div_ceil(128));
    }
    let options = |prefix: &str| RedisOptions {
        key_prefix: prefix.to_owned(),
        membership_filter: false,
        // A benchmark on a shared machine: slow calls are measured, not failed.
        timeout: Duration::from_secs(5),
        ..RedisOptions::default()
    };
    let l2 = server.connect_with(options("l2")).await.expect("connect l2");
    let l3 = server.connect_with(options("l3")).await.expect("connect l3");
    l3.apply_snapshot(&snap(1, 20_500), &records(pairs.clone()), None)
        .await
        .expect("snapshot");
    // 1 in 4 asked numbers has a record (the filter is off: misses cost the
    // same round trip as hits).
    let asked: Vec<PhoneNumber> = (0..200_000)
        .map(|i| {
            if i % 4 == 0 {
                number(pairs[rng.random_range(0..pairs.len())].0)
            } else {
                number(10_000_000_000u64 + rng.random_range(2_002_000_000u64..9_999_999_999))
            }
        })
        .collect();
    let asked = Arc::new(asked);
    let round = |store: RedisStore, asked: Arc<Vec<PhoneNumber>>, from: usize, len: usize| async move {
        let next = Arc::new(AtomicU64::new(from as u64));
        let end = (from + len) as u64;
        let started = Instant::now();
        let workers: Vec<_> = (0..64)
            .map(|_| {
                let (store, asked, next) = (store.clone(), asked.clone(), next.clone());
                tokio::spawn(async move {
                    let mut found = 0u64;
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= end {
                            return found;
                        }
                        let n = asked[i as usize % asked.len()];
                        if store.lookup(n).await.expect("lookup").found.is_some() {
                            found += 1;
                        }
                    }
                })
            })
            .collect();
        let mut found = 0;
        for w in workers {
            found += w.await.expect("worker");
        }
        (started.elapsed(), found)
    };
    let per_round = 40_000;
    let (mut t2, mut t3, mut c2, mut c3) = (Duration::ZERO, Duration::ZERO, 0.0, 0.0);
    for r in 0..6 {
        let from = r * per_round;
        let cpu = redis_cpu_seconds(&server);
        let (took, found2) = round(l2.clone(), asked.clone(), from, per_round).await;
        t2 += took;
        c2 += redis_cpu_seconds(&server) - cpu;
        let cpu = redis_cpu_seconds(&server);
        let (took, found3) = round(l3.clone(), asked.clone(), from, per_round).await;
        t3 += took;
        c3 += redis_cpu_seconds(&server) - cpu;
        assert_eq!(found2, found3, "both layouts give the same answers");
    }
    let total = 6.0 * per_round as f64;
    println!(
        "records={} lookups_per_layout={} layout2_hmget={:.0}/s ({:.2} us redis cpu/lookup) layout3_get={:.0}/s ({:.2} us redis cpu/lookup)",
        pairs.len(),
        total,
        total / t2.as_secs_f64(),
        c2 / total * 1e6,
        total / t3.as_secs_f64(),
        c3 / total * 1e6,
    );
}

/// A call of another room on the store's shared connection (the federation
/// log, the watch lists and the webhook lease send theirs through
/// [`RedisStore::within`]) that sees the connection break unconfirms the
/// cached metadata as the store's own calls do: Redis may have come back
/// without the data behind the connection's back, so no number is answered
/// from the membership filter until a metadata read confirms the generation
/// again. The metadata refresh is slowed to 30 s so that only that call can
/// have seen the break.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_break_seen_by_another_rooms_call_unconfirms_the_cache() {
    let server = TestRedis::start(Topology::Single);
    let data = us_numbers(14_155_550_000, 3, 2000);
    loaded(&server, &snap(1, 20_000), &records(data.clone())).await;
    // Connected after the snapshot, it loads the filter as it connects.
    let store = server
        .connect_with(RedisOptions {
            meta_refresh: Duration::from_secs(30),
            ..test_options()
        })
        .await
        .expect("connect to the test redis");
    eventually_within("the store loads the filter", Duration::from_secs(5), || async {
        store.membership_filter_loaded() == Some((1, 1))
    })
    .await;
    // A number the filter rules out (one of the first 200 after a stored one).
    let absent = data
        .iter()
        .take(200)
        .map(|&(n, _)| number(n + 1))
        .find(|&n| store.lookup_now(n).is_some())
        .expect("some absent number is answered in process");

    // Every client connection but this one is closed by the server.
    let mut con = redis_conn(&server);
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .query(&mut *con)
        .expect("CLIENT KILL");
    assert!(
        killed >= 1,
        "the store's connection was killed ({killed} clients)"
    );
    let ping = store
        .within(
            Duration::from_secs(2),
            redis::cmd("PING").query_async::<String>(&mut store.connection()),
        )
        .await;
    assert!(
        ping.is_err(),
        "the call on the killed connection failed (got {ping:?}): nothing else here could see the break"
    );
    assert!(
        store.lookup_now(absent).is_none(),
        "answered from the filter after a call saw the connection break"
    );
    // A lookup re-reads the metadata; then the filter answers again.
    assert_eq!(lookup_day(&store, absent.value()).await, None);
    assert!(
        store.lookup_now(absent).is_some(),
        "the filter answers once confirmed"
    );
}
