//! The store contract: every behaviour a [`Store`] promises, run through the
//! trait on each store the service can use: the embedded store, one
//! `redis-server` and a three-master Redis Cluster (both started by the
//! harness on free ports).
//!
//! Each test is a generic async function over a [`Backend`] (a mirror and
//! the way to open another handle onto it, as a second server replica
//! would); `per_store_tests!` instantiates it once per store. Tests of one
//! store's internals stay with that store: Redis key layout, RESTORE
//! payloads, the membership filter, faults injected into Redis and cluster
//! slots in `tests/redis_store.rs`; the embedded store's memory and merge in
//! its unit tests.

mod support;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use reassigned::domain::{Date, PhoneNumber};
use reassigned::store::redis::RedisOptions;
use reassigned::store::{EmbeddedStore, Records, RecordsError, RedisStore, SnapshotWrite, Store, StoreError};
use support::per_store_tests;
use support::poll::eventually;
use support::redis::RedisServer;
use support::redis_cluster::RedisCluster;
use support::writes::{COVERAGE_START, delta_write, lookup_day, number, records, snap, us_numbers};

/// A mirror under test.
trait Backend: Send + Sync {
    /// The handle type the tests use, through [`Store`] only.
    type Store: Store + Clone;

    /// Another handle onto the same mirror (for Redis: a new connection
    /// with its own metadata cache, like another server replica).
    fn open(&self) -> impl Future<Output = Self::Store>;
}

/// A handle onto `backend` after importing `recs` as the snapshot `write`.
async fn loaded<B: Backend>(backend: &B, write: &SnapshotWrite, recs: &Records) -> B::Store {
    let store = backend.open().await;
    store.apply_snapshot(write, recs, None).await.expect("snapshot");
    store
}

/// The embedded store: every handle is the same in-process mirror.
struct Embedded(Arc<EmbeddedStore>);

impl Embedded {
    fn start() -> Self {
        Self(Arc::new(EmbeddedStore::new()))
    }
}

impl Backend for Embedded {
    type Store = Arc<EmbeddedStore>;

    async fn open(&self) -> Arc<EmbeddedStore> {
        Arc::clone(&self.0)
    }
}

/// A Redis started for the test: one server or a cluster.
enum Redis {
    Single(RedisServer),
    Cluster(RedisCluster),
}

impl Backend for Redis {
    type Store = RedisStore;

    async fn open(&self) -> RedisStore {
        // Short periods so that a second handle sees an import quickly.
        let options = RedisOptions {
            meta_refresh: Duration::from_millis(100),
            reclaim_grace: Duration::from_millis(600),
            ..RedisOptions::default()
        };
        match self {
            Redis::Single(server) => RedisStore::connect(&server.url(), options).await,
            Redis::Cluster(cluster) => RedisStore::connect_cluster(&cluster.urls(), options).await,
        }
        .expect("connect to the test redis")
    }
}

// Runs each contract test once per store.
per_store_tests!(
    embedded => super::Embedded::start(),
    redis_single => super::Redis::Single(super::RedisServer::start()),
    redis_cluster => super::Redis::Cluster(super::RedisCluster::start());
    empty_mirror_answers_without_meta,
    lookups_hit_and_miss,
    snapshot_then_lookups,
    lookups_across_many_blocks,
    big_batches_and_deltas_over_many_buckets,
    a_snapshot_replaces_everything,
    a_snapshot_switches_atomically_for_readers,
    a_reader_keeps_its_generation,
    delta_keeps_the_latest_date,
    delta_twice_is_idempotent,
    an_empty_delta_moves_the_sequence,
    sequence_conflicts_change_nothing,
    another_handle_sees_imports,
    applied_checksums_remember_the_files,
    lookup_now_agrees_with_lookup,
);

const A: &str = "+14155550100";
const B: &str = "+14155550123";
const C: &str = "+8613800138000";

fn d(s: &str) -> Date {
    Date::parse(s).expect("date")
}

fn days(s: &str) -> i32 {
    d(s).days()
}

fn n(s: &str) -> PhoneNumber {
    PhoneNumber::parse(s).expect("number")
}

/// Records from (E.164 number, ISO date) rows.
fn rows(rows: &[(&str, &str)]) -> Records {
    records(
        rows.iter()
            .map(|(num, date)| (n(num).value(), u16::try_from(days(date)).expect("day")))
            .collect(),
    )
}

/// A mirror of A (2024-01-01) and B (2024-05-01) at sequence 1.
async fn base<S: Store>(store: &S) {
    store
        .apply_snapshot(
            &snap(1, days("2026-11-01")),
            &rows(&[(A, "2024-01-01"), (B, "2024-05-01")]),
            None,
        )
        .await
        .expect("snapshot");
}

async fn empty_mirror_answers_without_meta(backend: impl Backend) {
    let store = backend.open().await;
    store.ping().await.expect("ping");
    let one = store.lookup(n(A)).await.expect("lookup");
    assert_eq!(one.found, None);
    assert!(one.meta.is_none());
    let many = store.lookup_many(&[n(A), n(C)]).await.expect("lookup_many");
    assert_eq!(many.found, vec![None, None]);
    assert!(many.meta.is_none());
    assert!(store.cached_meta().is_none());
    assert!(store.refresh_meta().await.expect("refresh").is_none());
}

async fn lookups_hit_and_miss(backend: impl Backend) {
    let store = backend.open().await;
    base(&store).await;
    let hit = store.lookup(n(B)).await.expect("lookup");
    assert_eq!(hit.found, Some(d("2024-05-01")));
    let meta = hit.meta.expect("meta");
    assert_eq!((meta.sequence, meta.record_count), (1, 2));
    assert_eq!(meta.as_of, d("2026-11-01"));
    assert_eq!(meta.coverage_start, d("2021-01-27"));
    assert_eq!(
        meta.prefixes.iter().map(ToString::to_string).collect::<Vec<_>>(),
        ["+1", "+86"]
    );
    assert!(meta.last_import_unix > 0);
    assert_eq!(store.lookup(n(C)).await.expect("lookup").found, None);
    // The shortest and the longest numbers E.164 allows.
    assert_eq!(store.lookup(n("+10000")).await.expect("lookup").found, None);
    assert_eq!(
        store.lookup(n("+999999999999999")).await.expect("lookup").found,
        None
    );
    // A batch answers in the order asked.
    let many = store.lookup_many(&[n(C), n(A), n(B)]).await.expect("many");
    assert_eq!(
        many.found,
        vec![None, Some(d("2024-01-01")), Some(d("2024-05-01"))]
    );
    assert_eq!(many.meta.expect("meta").sequence, 1);
}

async fn snapshot_then_lookups(backend: impl Backend) {
    let data = us_numbers(14_155_550_000, 3, 1000);
    let store = loaded(&backend, &snap(1, 20_100), &records(data.clone())).await;

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
    for (num, day) in &data {
        assert_eq!(lookup_day(&store, *num).await, Some(i32::from(*day)));
    }
}

/// Enough records for many blocks of the embedded index and many Redis
/// buckets: every number is found, the next number (absent) is not.
async fn lookups_across_many_blocks(backend: impl Backend) {
    let data: Vec<(u64, u16)> = (0..10_000u64)
        .map(|i| (14_155_550_000 + i * 3, (i % 20_000) as u16))
        .collect();
    let store = loaded(&backend, &snap(1, 20_100), &records(data.clone())).await;
    for &(num, day) in &data {
        assert_eq!(lookup_day(&store, num).await, Some(i32::from(day)), "{num}");
        assert_eq!(lookup_day(&store, num + 1).await, None, "{}", num + 1);
    }
}

/// Batches and deltas that touch many buckets: on a cluster they span every
/// node and many slots.
async fn big_batches_and_deltas_over_many_buckets(backend: impl Backend) {
    let data = us_numbers(12_015_550_000, 7, 20_000);
    let store = loaded(&backend, &snap(1, 20_000), &records(data.clone())).await;
    // A batch of 2000: every 20th number, and the number after each (absent).
    let asked: Vec<PhoneNumber> = data
        .iter()
        .step_by(20)
        .flat_map(|&(num, _)| [number(num), number(num + 1)])
        .collect();
    assert_eq!(asked.len(), 2000);
    let many = store.lookup_many(&asked).await.expect("lookup_many");
    let expected: Vec<Option<Date>> = data
        .iter()
        .step_by(20)
        .flat_map(|&(_, day)| [Some(Date::from_days(i32::from(day))), None])
        .collect();
    assert_eq!(many.found, expected);
    assert_eq!(many.meta.expect("meta").sequence, 1);

    // A delta over most buckets: 3000 new numbers and 3000 later dates.
    let mut delta: Vec<(u64, u16)> = data
        .iter()
        .step_by(5)
        .map(|&(num, _)| (num + 1, 20_001))
        .take(3000)
        .collect();
    delta.extend(
        data.iter()
            .skip(2)
            .step_by(6)
            .map(|&(num, day)| (num, day + 1500))
            .take(3000),
    );
    let delta = records(delta);
    store
        .apply_delta(&delta_write(2, 20_001), &delta)
        .await
        .expect("delta");
    let meta = store.refresh_meta().await.expect("refresh").expect("meta");
    assert_eq!((meta.sequence, meta.record_count), (2, 23_000));
    let asked: Vec<PhoneNumber> = delta.numbers().map(number).collect();
    let many = store
        .lookup_many(&asked)
        .await
        .expect("lookup_many after the delta");
    let expected: Vec<Option<Date>> = delta
        .pairs()
        .map(|(_, day)| Some(Date::from_days(i32::from(day))))
        .collect();
    assert_eq!(many.found, expected);

    // A second snapshot of 500 of them replaces all of it.
    store
        .apply_snapshot(&snap(3, 20_002), &records(data[..500].to_vec()), Some(2))
        .await
        .expect("second snapshot");
    let asked: Vec<PhoneNumber> = data[495..505].iter().map(|&(num, _)| number(num)).collect();
    let many = store
        .lookup_many(&asked)
        .await
        .expect("lookup_many after the snapshot");
    let expected: Vec<Option<Date>> = (495..505)
        .map(|i| (i < 500).then(|| Date::from_days(i32::from(data[i].1))))
        .collect();
    assert_eq!(many.found, expected);
    let meta = many.meta.expect("meta");
    assert_eq!((meta.sequence, meta.record_count), (3, 500));
}

async fn a_snapshot_replaces_everything(backend: impl Backend) {
    let store = backend.open().await;
    base(&store).await;
    store
        .apply_snapshot(&snap(7, days("2026-11-02")), &rows(&[(C, "2025-01-01")]), Some(1))
        .await
        .expect("snapshot");
    assert_eq!(store.lookup(n(A)).await.expect("lookup").found, None);
    assert_eq!(store.lookup(n(B)).await.expect("lookup").found, None);
    let l = store.lookup(n(C)).await.expect("lookup");
    assert_eq!(l.found, Some(d("2025-01-01")));
    let meta = l.meta.expect("meta");
    assert_eq!((meta.sequence, meta.record_count), (7, 1));
    assert_eq!(meta.as_of, d("2026-11-02"));
    let meta = store.refresh_meta().await.expect("refresh").expect("meta");
    assert_eq!((meta.sequence, meta.record_count), (7, 1));
}

/// A reader asking during a snapshot switch sees the old generation or the
/// new one, never a mix and never an empty mirror.
async fn a_snapshot_switches_atomically_for_readers(backend: impl Backend) {
    let writer = backend.open().await;
    let reader = backend.open().await;
    let first = us_numbers(12_125_550_000, 7, 3000);
    // Shares one number (same date) with the first, the rest is new.
    let mut second = us_numbers(13_105_550_000, 11, 1500);
    second.push(first[0]);
    writer
        .apply_snapshot(&snap(1, 20_000), &records(first.clone()), None)
        .await
        .expect("first snapshot");
    eventually("the reader sees the first snapshot", async || {
        reader.cached_meta().is_some()
    })
    .await;

    // Answers seen, by the sequence they were read under.
    let seen = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = tokio::spawn({
        let (reader, stop, seen) = (reader.clone(), stop.clone(), seen.clone());
        let (shared, only_first) = (first[0], first[1]);
        async move {
            while !stop.load(Ordering::Relaxed) {
                let got = reader
                    .lookup(number(shared.0))
                    .await
                    .expect("lookup during switch");
                assert_eq!(got.found.map(|d| d.days()), Some(i32::from(shared.1)));
                let seq = got.meta.expect("meta").sequence;
                assert!(seq == 1 || seq == 2, "sequence {seq}");
                let many = reader
                    .lookup_many(&[number(shared.0), number(only_first.0)])
                    .await
                    .expect("lookup_many during switch");
                let meta = many.meta.expect("meta");
                assert_eq!(many.found[0].map(|d| d.days()), Some(i32::from(shared.1)));
                // first[1] is only in the first snapshot.
                assert_eq!(
                    many.found[1].is_some(),
                    meta.sequence == 1,
                    "no mix of generations"
                );
                assert_eq!(
                    meta.record_count,
                    if meta.sequence == 1 { 3000 } else { 1501 },
                    "data and metadata of one generation"
                );
                seen[usize::from(meta.sequence == 2)].fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
        }
    });
    eventually("the reader asks before the switch", async || {
        seen[0].load(Ordering::Relaxed) >= 10 || watcher.is_finished()
    })
    .await;
    writer
        .apply_snapshot(&snap(2, 20_030), &records(second.clone()), Some(1))
        .await
        .expect("second snapshot");
    eventually("the reader asks after the switch", async || {
        seen[1].load(Ordering::Relaxed) >= 10 || watcher.is_finished()
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    watcher.await.expect("watcher");
    assert!(seen[0].load(Ordering::Relaxed) >= 10);
    assert!(seen[1].load(Ordering::Relaxed) >= 10);

    // Old numbers are gone, new ones present.
    for (num, _) in &first[1..] {
        assert_eq!(lookup_day(&reader, *num).await, None);
    }
    for (num, day) in &second {
        assert_eq!(lookup_day(&reader, *num).await, Some(i32::from(*day)));
    }
    let meta = reader.cached_meta().expect("meta");
    assert_eq!((meta.sequence, meta.record_count), (2, 1501));
}

/// An answer read before a switch keeps the metadata it was read under.
async fn a_reader_keeps_its_generation(backend: impl Backend) {
    let store = backend.open().await;
    base(&store).await;
    let before = store.lookup(n(A)).await.expect("lookup");
    store
        .apply_snapshot(&snap(2, days("2026-11-02")), &Records::default(), Some(1))
        .await
        .expect("empty snapshot");
    assert_eq!(before.found, Some(d("2024-01-01")));
    assert_eq!(before.meta.expect("meta").sequence, 1);
    let after = store.lookup(n(A)).await.expect("lookup");
    assert_eq!(after.found, None);
    let meta = after
        .meta
        .expect("an empty snapshot is data, not an empty mirror");
    assert_eq!((meta.sequence, meta.record_count), (2, 0));
}

async fn delta_keeps_the_latest_date(backend: impl Backend) {
    let store = backend.open().await;
    base(&store).await;
    let delta = rows(&[
        (A, "2023-01-01"),              // earlier than stored: ignored
        (B, "2026-10-30"),              // later: raised
        (C, "2026-10-31"),              // new
        ("+15005550006", "2026-10-29"), // new
    ]);
    store
        .apply_delta(&delta_write(2, days("2026-11-02")), &delta)
        .await
        .expect("delta");
    let asked = [n(A), n(B), n(C), n("+15005550006"), n("+15005550007")];
    let l = store.lookup_many(&asked).await.expect("many");
    assert_eq!(
        l.found,
        vec![
            Some(d("2024-01-01")),
            Some(d("2026-10-30")),
            Some(d("2026-10-31")),
            Some(d("2026-10-29")),
            None
        ]
    );
    let meta = l.meta.expect("meta");
    assert_eq!(
        (meta.sequence, meta.record_count, meta.as_of),
        (2, 4, d("2026-11-02"))
    );
    // Coverage is the snapshot's.
    assert_eq!(meta.coverage_start, d("2021-01-27"));
    assert_eq!(
        meta.prefixes.iter().map(ToString::to_string).collect::<Vec<_>>(),
        ["+1", "+86"]
    );
    assert_eq!(store.cached_meta().as_deref(), Some(&*meta));
    let refreshed = store.refresh_meta().await.expect("refresh").expect("meta");
    assert_eq!((refreshed.sequence, refreshed.record_count), (2, 4));
}

async fn delta_twice_is_idempotent(backend: impl Backend) {
    let store = backend.open().await;
    base(&store).await;
    let m = delta_write(2, days("2026-11-02"));
    let delta = rows(&[(B, "2026-10-30"), (C, "2026-10-31")]);
    store.apply_delta(&m, &delta).await.expect("delta");
    let once = store.lookup_many(&[n(A), n(B), n(C)]).await.expect("many");
    store.apply_delta(&m, &delta).await.expect("again");
    let twice = store.lookup_many(&[n(A), n(B), n(C)]).await.expect("many");
    assert_eq!(
        once.found,
        vec![
            Some(d("2024-01-01")),
            Some(d("2026-10-30")),
            Some(d("2026-10-31"))
        ]
    );
    assert_eq!(once.found, twice.found);
    assert_eq!(once.meta, twice.meta);
    let meta = store.refresh_meta().await.expect("refresh").expect("meta");
    assert_eq!((meta.sequence, meta.record_count), (2, 3));
}

async fn an_empty_delta_moves_the_sequence(backend: impl Backend) {
    let store = backend.open().await;
    base(&store).await;
    store
        .apply_delta(&delta_write(2, days("2026-11-03")), &Records::default())
        .await
        .expect("empty delta");
    let meta = store.refresh_meta().await.expect("refresh").expect("meta");
    assert_eq!(
        (meta.sequence, meta.record_count, meta.as_of),
        (2, 2, d("2026-11-03"))
    );
    assert_eq!(
        store.lookup(n(B)).await.expect("lookup").found,
        Some(d("2024-05-01"))
    );
}

/// Imports that do not follow the mirror's sequence are conflicts and leave
/// the mirror as it was.
async fn sequence_conflicts_change_nothing(backend: impl Backend) {
    let store = backend.open().await;
    let delta = rows(&[(C, "2026-10-31")]);
    let conflict = |r: Result<(), StoreError>| matches!(r, Err(StoreError::Conflict(_)));

    // A delta needs a snapshot first.
    let e = store
        .apply_delta(&delta_write(1, days("2026-11-02")), &delta)
        .await;
    assert!(conflict(e), "delta on an empty mirror");
    // A snapshot expecting a sequence the (empty) mirror does not have.
    let e = store
        .apply_snapshot(&snap(5, days("2026-11-02")), &delta, Some(4))
        .await;
    assert!(conflict(e), "snapshot expecting 4 on an empty mirror");
    assert!(store.refresh_meta().await.expect("refresh").is_none());

    base(&store).await;
    // Deltas out of order: a gap, an older one.
    for sequence in [3, 7, 0] {
        let e = store
            .apply_delta(&delta_write(sequence, days("2026-11-02")), &delta)
            .await;
        assert!(conflict(e), "delta {sequence} at sequence 1");
    }
    // A snapshot expecting anything but the current sequence.
    let snap = snap(5, days("2026-11-02"));
    for expected in [None, Some(0), Some(2), Some(4)] {
        let e = store.apply_snapshot(&snap, &delta, expected).await;
        assert!(conflict(e), "snapshot expecting {expected:?} at sequence 1");
    }
    // Nothing changed.
    let meta = store.refresh_meta().await.expect("refresh").expect("meta");
    assert_eq!((meta.sequence, meta.record_count), (1, 2));
    let l = store.lookup_many(&[n(A), n(B), n(C)]).await.expect("many");
    assert_eq!(l.found, vec![Some(d("2024-01-01")), Some(d("2024-05-01")), None]);
    // The next delta in order applies.
    store
        .apply_delta(&delta_write(2, days("2026-11-02")), &delta)
        .await
        .expect("delta 2 after the refused ones");
    assert_eq!(store.cached_meta().expect("meta").sequence, 2);
    assert_eq!(
        store.lookup(n(C)).await.expect("lookup").found,
        Some(d("2026-10-31"))
    );
}

/// Records must be sorted by number with one entry per number, of valid
/// numbers: anything else cannot even be built, so no store ever receives
/// it (the stores rely on the invariant instead of re-checking it).
#[test]
fn malformed_records_cannot_be_built() {
    let malformed = [
        (
            "unsorted",
            vec![14_155_550_200, 14_155_550_199],
            vec![19_000, 19_000],
            RecordsError::NotIncreasing { index: 1 },
        ),
        (
            "duplicate",
            vec![14_155_550_200, 14_155_550_200],
            vec![19_000, 19_001],
            RecordsError::NotIncreasing { index: 1 },
        ),
        (
            "lengths differ",
            vec![14_155_550_200, 14_155_550_201],
            vec![19_000],
            RecordsError::LengthMismatch { numbers: 2, days: 1 },
        ),
        (
            "not a number",
            vec![1234, 14_155_550_201],
            vec![19_000, 19_000],
            RecordsError::InvalidNumber { index: 0 },
        ),
    ];
    for (what, numbers, days, want) in malformed {
        assert_eq!(Records::new(numbers, days), Err(want), "{what}");
    }
}

/// A handle opened before or after an import (another server replica) sees
/// it: `refresh_meta` reads the store itself, and the cached metadata
/// follows.
async fn another_handle_sees_imports(backend: impl Backend) {
    let writer = backend.open().await;
    let early = backend.open().await;
    base(&writer).await;
    let meta = early.refresh_meta().await.expect("refresh").expect("meta");
    assert_eq!((meta.sequence, meta.record_count), (1, 2));
    assert_eq!(early.cached_meta().expect("cached").sequence, 1);
    assert_eq!(
        early.lookup(n(A)).await.expect("lookup").found,
        Some(d("2024-01-01"))
    );

    writer
        .apply_delta(&delta_write(2, days("2026-11-02")), &rows(&[(C, "2026-10-31")]))
        .await
        .expect("delta");
    // Without an explicit refresh, the cache follows by itself.
    eventually("the early handle sees the delta", async || {
        early.cached_meta().is_some_and(|m| m.sequence == 2)
    })
    .await;
    assert_eq!(
        early.lookup(n(C)).await.expect("lookup").found,
        Some(d("2026-10-31"))
    );

    let late = backend.open().await;
    let meta = late.refresh_meta().await.expect("refresh").expect("meta");
    assert_eq!((meta.sequence, meta.record_count), (2, 3));
    let l = late.lookup_many(&[n(A), n(B), n(C)]).await.expect("many");
    assert_eq!(
        l.found,
        vec![
            Some(d("2024-01-01")),
            Some(d("2024-05-01")),
            Some(d("2026-10-31"))
        ]
    );
}

/// The checksums of the files applied, by `snapshot:N` / `delta:N`, in
/// lowercase; a refused import records nothing.
async fn applied_checksums_remember_the_files(backend: impl Backend) {
    let store = backend.open().await;
    assert!(store.applied_checksums().await.expect("checksums").is_empty());
    let mut snapshot = snap(1, days("2026-11-01"));
    snapshot.sha256 = "AB".repeat(32);
    store
        .apply_snapshot(&snapshot, &rows(&[(A, "2024-01-01")]), None)
        .await
        .expect("snapshot");
    let mut delta = delta_write(2, days("2026-11-02"));
    delta.sha256 = "cd".repeat(32);
    store
        .apply_delta(&delta, &rows(&[(B, "2024-05-01")]))
        .await
        .expect("delta");
    let mut refused = delta_write(4, days("2026-11-03"));
    refused.sha256 = "ef".repeat(32);
    assert!(matches!(
        store.apply_delta(&refused, &Records::default()).await,
        Err(StoreError::Conflict(_))
    ));
    let applied = store.applied_checksums().await.expect("checksums");
    let mut applied: Vec<(String, String)> = applied.into_iter().collect();
    applied.sort();
    assert_eq!(
        applied,
        vec![
            ("delta:2".to_owned(), "cd".repeat(32)),
            ("snapshot:1".to_owned(), "ab".repeat(32)),
        ]
    );
}

/// `lookup_now` (the in-process answer of the login path) never answers
/// otherwise than `lookup`: on hits, their neighbours and far misses, it
/// either declines (`None`) or gives the same date under the same
/// generation; and it does answer misses once the store can prove them
/// (the embedded store always, Redis once its membership filter is loaded).
async fn lookup_now_agrees_with_lookup(backend: impl Backend) {
    let data = us_numbers(14_155_550_000, 3, 1000);
    let store = loaded(&backend, &snap(1, 20_100), &records(data.clone())).await;
    let miss = number(14_155_550_001);
    eventually("a miss is answered in process", async || {
        store.lookup_now(miss).is_some()
    })
    .await;
    let (mut now_hits, mut now_misses) = (0, 0);
    for value in (14_155_549_990..14_155_553_010).chain([10_000, 999_999_999_999_999]) {
        let full = store.lookup(number(value)).await.expect("lookup");
        let Some(now) = store.lookup_now(number(value)) else {
            continue;
        };
        let now = now.expect("lookup_now");
        assert_eq!(now.found, full.found, "number {value}");
        assert_eq!(
            now.meta.as_ref().map(|m| m.sequence),
            full.meta.as_ref().map(|m| m.sequence),
            "number {value}"
        );
        match now.found {
            Some(_) => now_hits += 1,
            None => now_misses += 1,
        }
    }
    assert!(now_misses > 1000, "only {now_misses} misses answered in process");
    // Only a store holding the records answers hits in process.
    assert!(
        now_hits == 0 || now_hits == data.len(),
        "{now_hits} hits answered in process"
    );
}
