//! The embedded store: the whole mirror in process memory.
//!
//! The records are kept as the importer hands them over, a [`Records`]:
//! numbers and dates packed in 5 bytes per record plus a small table of
//! runs (one per 2^24 numbers in use), looked up by two binary searches
//! (see the `store::records` module).
//!
//! In front of the records sits a [`Membership`] filter (1 byte per
//! record): a number without a record, most of those asked about, is
//! answered after one cache line instead of the records' searches. Every
//! generation (snapshot or merged delta) is published without a filter
//! and given its own once the previous generation is let go (the records
//! answer alone meanwhile), so two filters are never held at once.
//!
//! The records and the metadata describing them form one immutable `State`
//! generation behind an [`ArcSwapOption`]: a lookup loads the current
//! generation without a lock and answers from it alone, so it sees the old
//! data or the new, never a mix. Writers (imports) build a new generation
//! aside and swap it in; they are serialised by a mutex that readers never
//! touch. A snapshot's generation shares the importer's records (no copy);
//! a delta's is merged from the old one and the delta into a new buffer,
//! so the old and the new generation are both held only while it merges.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;

use super::membership::Membership;
use super::records::Builder;
use super::{APPLIED_KEEP, DeltaWrite, Kind, Lookup, Records, SnapshotWrite, Store, StoreError, applied_key};
use crate::domain::{Date, MirrorMeta, PhoneNumber};

/// One immutable generation of the mirror.
struct State {
    records: Records,
    /// Holds every number of `records`; `None` while a first load defers
    /// it ([`EmbeddedStore::defer_filter`]) and while a new generation
    /// waits for its own ([`EmbeddedStore::publish`]): the records alone
    /// then answer, as correctly and more slowly.
    filter: Option<Arc<Membership>>,
    meta: Arc<MirrorMeta>,
}

impl State {
    #[inline]
    fn get(&self, number: u64) -> Option<Date> {
        if let Some(filter) = &self.filter
            && !filter.may_contain(number)
        {
            return None;
        }
        self.records.day_of(number).map(|d| Date::from_days(i32::from(d)))
    }
}

/// A filter sized for and holding the numbers of `records`.
fn filter_of(records: &Records) -> Arc<Membership> {
    Arc::new(Membership::from_numbers(records.numbers()))
}

/// The in-process store (see the [module documentation](self)).
#[derive(Default)]
pub struct EmbeddedStore {
    state: ArcSwapOption<State>,
    /// Serialises writers (check, build, swap); never taken by readers.
    write: Mutex<()>,
    /// SHA-256 of the files applied, by (sequence, kind), the most recent
    /// [`APPLIED_KEEP`] sequences.
    applied: Mutex<std::collections::BTreeMap<(u64, Kind), String>>,
    /// Files skipped at the last load or resync (`file: reason`).
    problems: Mutex<Vec<String>>,
    /// True while a first load defers the membership filter
    /// ([`EmbeddedStore::defer_filter`]).
    filter_deferred: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("records", &self.len())
            .field("sequence", &self.cached_meta().map(|m| m.sequence))
            .finish()
    }
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

impl EmbeddedStore {
    /// An empty store (every answer is NO_DATA until a snapshot is applied).
    /// To load one from a register directory, see
    /// `crate::import::embedded::open_dir`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Register files skipped at the last load or resync, one
    /// `file: reason` line each (empty when every file applied).
    pub fn import_problems(&self) -> Vec<String> {
        self.problems.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the list of [`EmbeddedStore::import_problems`] (by the
    /// importer that loads and re-syncs the store's directory).
    pub fn set_import_problems(&self, problems: Vec<String>) {
        *self.problems.lock().unwrap_or_else(|p| p.into_inner()) = problems;
    }

    fn record_applied(&self, sequence: u64, kind: Kind, sha256: &str) {
        let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        applied.insert((sequence, kind), sha256.to_ascii_lowercase());
        while applied.len() > APPLIED_KEEP {
            applied.pop_first();
        }
    }

    /// The latest disconnect date of `number` and the metadata of the
    /// generation it was read from (synchronous; no lock, no I/O).
    pub fn get(&self, number: PhoneNumber) -> Lookup<Option<Date>> {
        let guard = self.state.load();
        match guard.as_ref() {
            Some(state) => Lookup {
                found: state.get(number.value()),
                meta: Some(Arc::clone(&state.meta)),
            },
            None => Lookup {
                found: None,
                meta: None,
            },
        }
    }

    /// The latest disconnect dates of `numbers` (in order), all read from the
    /// same generation.
    pub fn get_many(&self, numbers: &[PhoneNumber]) -> Lookup<Vec<Option<Date>>> {
        let guard = self.state.load();
        match guard.as_ref() {
            Some(state) => Lookup {
                found: numbers.iter().map(|n| state.get(n.value())).collect(),
                meta: Some(Arc::clone(&state.meta)),
            },
            None => Lookup {
                found: vec![None; numbers.len()],
                meta: None,
            },
        }
    }

    /// The number of records held.
    pub fn len(&self) -> usize {
        self.state.load().as_ref().map_or(0, |s| s.records.len())
    }

    /// The current generation's records (shared, not copied); `None`
    /// while the mirror is empty.
    pub fn records(&self) -> Option<Records> {
        self.state.load().as_ref().map(|s| s.records.clone())
    }

    /// True if no records are held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Per-bucket digests of the records, bucketed as `number % nbuckets`
    /// (see [`super::digest`]).
    pub fn bucket_digests(&self, nbuckets: u64) -> Vec<super::digest::BucketDigest> {
        let nbuckets = nbuckets.max(1);
        let mut out = vec![super::digest::BucketDigest::default(); nbuckets as usize];
        if let Some(state) = self.state.load().as_ref() {
            for (n, d) in state.records.pairs() {
                out[(n % nbuckets) as usize].add(n, u64::from(d));
            }
        }
        out
    }

    /// What `crate::import::verify::verify` compares, with buckets of
    /// about 128 records; `None` while the mirror is empty.
    pub fn digest(&self) -> Option<super::digest::MirrorDigest> {
        let meta = self.cached_meta()?;
        let nbuckets = (self.len() as u64).div_ceil(128).max(1);
        Some(super::digest::MirrorDigest {
            sequence: meta.sequence,
            meta_records: meta.record_count,
            buckets: self.bucket_digests(nbuckets),
            name_prefix: "bucket ".into(),
        })
    }

    /// Defers the membership filter while a register directory is first
    /// loaded (a snapshot and its deltas into an empty store): the
    /// generations are swapped in without one, so merging a delta holds
    /// two generations' records but no filter, and the filter is built
    /// once, for the loaded records, when the returned guard is dropped.
    /// The filter only makes lookups faster: without it the records answer
    /// the same.
    pub fn defer_filter(&self) -> FilterDeferred<'_> {
        self.filter_deferred.store(true, Ordering::Release);
        FilterDeferred { store: self }
    }

    /// Builds the current generation's filter if it has none.
    fn complete_filter(&self) {
        let writer = self.write.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(state) = self.state.load_full()
            && state.filter.is_none()
        {
            self.add_filter(&writer, state.records.clone(), Arc::clone(&state.meta));
        }
    }

    /// Publishes the generation of `records` and `meta` without a filter
    /// (the records alone answer, the same); the caller then lets the
    /// generation it replaced go and calls [`Self::add_filter`], so two
    /// generations' filters are never held at once. `_writer`: the
    /// writers' lock, held.
    fn publish(&self, _writer: &MutexGuard<'_, ()>, records: Records, meta: Arc<MirrorMeta>) {
        self.state.store(Some(Arc::new(State {
            records,
            filter: None,
            meta,
        })));
    }

    /// Publishes the generation of `records` and `meta` again with its
    /// filter, unless a first load defers it ([`Self::defer_filter`]).
    fn add_filter(&self, _writer: &MutexGuard<'_, ()>, records: Records, meta: Arc<MirrorMeta>) {
        if self.filter_deferred.load(Ordering::Acquire) {
            return;
        }
        let filter = Some(filter_of(&records));
        self.state.store(Some(Arc::new(State {
            records,
            filter,
            meta,
        })));
    }

    /// The heap bytes held by the current generation's records and its
    /// membership filter.
    pub fn memory_bytes(&self) -> usize {
        self.state.load().as_ref().map_or(0, |s| {
            s.records.memory_bytes() + s.filter.as_ref().map_or(0, |f| f.memory_bytes())
        })
    }

    fn swap_snapshot(
        &self,
        snapshot: &SnapshotWrite,
        records: &Records,
        expected_previous: Option<u64>,
    ) -> Result<(), StoreError> {
        let meta = Arc::new(snapshot.meta(records.len() as u64, now_unix()));
        let writer = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.state.load().as_ref().map(|s| s.meta.sequence);
        if current != expected_previous {
            return Err(StoreError::Conflict(format!(
                "snapshot {} expected the mirror at {}, but it is at {}",
                snapshot.sequence,
                describe_seq(expected_previous),
                describe_seq(current)
            )));
        }
        // Shares the importer's records: no copy.
        self.publish(&writer, records.clone(), Arc::clone(&meta));
        self.record_applied(snapshot.sequence, Kind::Snapshot, &snapshot.sha256);
        self.add_filter(&writer, records.clone(), meta);
        Ok(())
    }

    fn merge_delta(&self, delta: &DeltaWrite, records: &Records) -> Result<(), StoreError> {
        let writer = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.state.load_full();
        let Some(old) = current else {
            return Err(StoreError::Conflict(format!(
                "delta {} cannot apply to an empty mirror",
                delta.sequence
            )));
        };
        if old.meta.sequence == delta.sequence {
            // Already applied: merging again would change nothing.
            return Ok(());
        }
        if old.meta.sequence.checked_add(1) != Some(delta.sequence) {
            return Err(StoreError::Conflict(format!(
                "delta {} needs the mirror at {}, but it is at {}",
                delta.sequence,
                delta.sequence.saturating_sub(1),
                old.meta.sequence
            )));
        }
        let merged = merge(&old.records, records)?;
        let meta = MirrorMeta {
            sequence: delta.sequence,
            as_of: delta.as_of.max(old.meta.as_of),
            record_count: merged.len() as u64,
            last_import_unix: now_unix(),
            ..(*old.meta).clone()
        };
        let meta = Arc::new(meta);
        self.publish(&writer, merged.clone(), Arc::clone(&meta));
        self.record_applied(delta.sequence, Kind::Delta, &delta.sha256);
        drop(old);
        self.add_filter(&writer, merged, meta);
        Ok(())
    }
}

/// See [`EmbeddedStore::defer_filter`]: builds the filter when dropped.
#[must_use = "the filter is built when the guard is dropped"]
pub struct FilterDeferred<'a> {
    store: &'a EmbeddedStore,
}

impl Drop for FilterDeferred<'_> {
    fn drop(&mut self) {
        self.store.filter_deferred.store(false, Ordering::Release);
        self.store.complete_filter();
    }
}

fn describe_seq(seq: Option<u64>) -> String {
    seq.map_or_else(|| "empty".to_string(), |s| format!("sequence {s}"))
}

/// Merges two record sets; a number in both keeps the later date.
fn merge(a: &Records, b: &Records) -> Result<Records, StoreError> {
    let mut out = Builder::with_capacity(a.len() + b.len());
    let (mut a, mut b) = (a.pairs().peekable(), b.pairs().peekable());
    loop {
        let next = match (a.peek().copied(), b.peek().copied()) {
            (None, None) => break,
            (Some(x), None) => {
                a.next();
                x
            }
            (None, Some(y)) => {
                b.next();
                y
            }
            (Some(x), Some(y)) if x.0 < y.0 => {
                a.next();
                x
            }
            (Some(x), Some(y)) if y.0 < x.0 => {
                b.next();
                y
            }
            (Some(x), Some(y)) => {
                a.next();
                b.next();
                (x.0, x.1.max(y.1))
            }
        };
        // Both inputs hold the invariant, so the merge does too.
        out.push(next.0, next.1)
            .map_err(|e| StoreError::Corrupt(format!("merging a delta: {e}")))?;
    }
    Ok(out.finish())
}

impl Store for EmbeddedStore {
    fn lookup_now(&self, number: PhoneNumber) -> Option<Result<Lookup<Option<Date>>, StoreError>> {
        Some(Ok(self.get(number)))
    }

    async fn lookup(&self, number: PhoneNumber) -> Result<Lookup<Option<Date>>, StoreError> {
        Ok(self.get(number))
    }

    async fn lookup_many(&self, numbers: &[PhoneNumber]) -> Result<Lookup<Vec<Option<Date>>>, StoreError> {
        Ok(self.get_many(numbers))
    }

    fn cached_meta(&self) -> Option<Arc<MirrorMeta>> {
        self.state.load().as_ref().map(|s| Arc::clone(&s.meta))
    }

    async fn refresh_meta(&self) -> Result<Option<Arc<MirrorMeta>>, StoreError> {
        Ok(self.cached_meta())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn apply_snapshot(
        &self,
        snapshot: &SnapshotWrite,
        records: &Records,
        expected_previous: Option<u64>,
    ) -> Result<(), StoreError> {
        self.swap_snapshot(snapshot, records, expected_previous)
    }

    async fn apply_delta(&self, delta: &DeltaWrite, records: &Records) -> Result<(), StoreError> {
        self.merge_delta(delta, records)
    }

    async fn applied_checksums(&self) -> Result<std::collections::HashMap<String, String>, StoreError> {
        let applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        Ok(applied
            .iter()
            .map(|(&(sequence, kind), sha)| (applied_key(kind, sequence), sha.clone()))
            .collect())
    }

    fn import_problems(&self) -> Vec<String> {
        EmbeddedStore::import_problems(self)
    }
}

#[cfg(test)]
mod tests {
    //! The embedded store's internals. Its behaviour as a [`Store`] (lookups,
    //! snapshots, deltas, conflicts, checksums) is tested with the other
    //! stores' in `tests/store_contract.rs`.
    use super::*;
    use crate::domain::Prefix;

    fn snapshot(sequence: u64) -> SnapshotWrite {
        SnapshotWrite {
            sequence,
            as_of: Date::parse("2026-11-01").expect("date"),
            coverage_start: Date::parse("2021-01-27").expect("date"),
            prefixes: vec![Prefix::parse("+1").expect("prefix")],
            sha256: "0".repeat(64),
        }
    }

    fn delta(sequence: u64) -> DeltaWrite {
        DeltaWrite {
            sequence,
            as_of: Date::parse("2026-11-01").expect("date"),
            sha256: "0".repeat(64),
        }
    }

    /// Snapshot 1: `base + 10 i` for i in 0..100, on day 20,000.
    async fn hundred_records(store: &EmbeddedStore, base: u64) {
        let snap =
            Records::new((0..100).map(|i| base + i * 10).collect(), vec![20_000; 100]).expect("records");
        store
            .apply_snapshot(&snapshot(1), &snap, None)
            .await
            .expect("snapshot");
    }

    /// Each delta's merged generation gets a filter of its own, for all
    /// its records: every record is found and the numbers without one are
    /// not.
    #[tokio::test]
    async fn each_delta_gets_a_filter_for_the_merged_records() {
        let store = EmbeddedStore::new();
        let base = 14_155_550_000u64;
        hundred_records(&store, base).await;
        let capacity = |store: &EmbeddedStore| {
            let state = store.state.load_full().expect("state");
            state.filter.as_ref().expect("a filter").capacity()
        };
        assert_eq!(capacity(&store), 100);
        let small = Records::new(vec![base + 1, base + 3], vec![20_001; 2]).expect("records");
        store.apply_delta(&delta(2), &small).await.expect("delta 2");
        assert_eq!(capacity(&store), 102);
        let large = Records::new((0..1000).map(|i| base + 5 + i * 10).collect(), vec![20_002; 1000])
            .expect("records");
        store.apply_delta(&delta(3), &large).await.expect("delta 3");
        assert_eq!(capacity(&store), 1102);
        let found = |n: u64| store.get(PhoneNumber::from_value(n).expect("n")).found;
        let day = |d| Some(Date::from_days(d));
        assert!((0..100).all(|i| found(base + i * 10) == day(20_000)));
        assert!([base + 1, base + 3].iter().all(|&n| found(n) == day(20_001)));
        assert!((0..1000).all(|i| found(base + 5 + i * 10) == day(20_002)));
        assert!(
            (0..1000).all(|i| found(base + 7 + i * 10).is_none()),
            "no record: not found"
        );
    }

    /// A deferred first load swaps its generations in without a filter
    /// (answers unchanged) and builds one when the guard goes.
    #[tokio::test]
    async fn a_deferred_load_builds_the_filter_once_at_the_end() {
        let store = EmbeddedStore::new();
        let base = 14_155_550_000u64;
        let found = |store: &EmbeddedStore, n: u64| store.get(PhoneNumber::from_value(n).expect("n")).found;
        let has_filter = |store: &EmbeddedStore| store.state.load_full().expect("state").filter.is_some();
        {
            let _deferred = store.defer_filter();
            hundred_records(&store, base).await;
            assert!(!has_filter(&store));
            let more = Records::new(vec![base + 1], vec![20_001]).expect("records");
            store.apply_delta(&delta(2), &more).await.expect("delta");
            assert!(!has_filter(&store));
            assert_eq!(found(&store, base + 1), Some(Date::from_days(20_001)));
            assert_eq!(found(&store, base + 2), None);
        }
        assert!(has_filter(&store), "built when the guard went");
        assert_eq!(found(&store, base + 1), Some(Date::from_days(20_001)));
        assert_eq!(found(&store, base + 990), Some(Date::from_days(20_000)));
        assert_eq!(found(&store, base + 2), None);
        // Later snapshots build theirs at once.
        let snap = Records::new(vec![base + 7], vec![20_003]).expect("records");
        store
            .apply_snapshot(&snapshot(3), &snap, Some(2))
            .await
            .expect("snapshot 3");
        assert!(has_filter(&store));
        assert_eq!(found(&store, base + 7), Some(Date::from_days(20_003)));
    }

    /// `len` counts the records held, and the memory stays at about 6
    /// bytes per record (packed records, the table of runs, the
    /// membership filter's byte).
    #[tokio::test]
    async fn len_and_memory_follow_the_records() {
        let store = EmbeddedStore::new();
        assert_eq!(
            (store.len(), store.is_empty(), store.memory_bytes()),
            (0, true, 0)
        );
        let numbers: Vec<u64> = (0..10_000u64).map(|i| 14_155_550_000 + i * 3).collect();
        let days: Vec<u16> = (0..10_000u64).map(|i| (i % 20_000) as u16).collect();
        let r = Records::new(numbers, days).expect("records");
        store
            .apply_snapshot(&snapshot(1), &r, None)
            .await
            .expect("snapshot");
        assert_eq!(store.len(), 10_000);
        assert!(
            store.memory_bytes() <= 10_000 * 6 + 10_000 / 64 * 8 + 128,
            "{}",
            store.memory_bytes()
        );
        // A delta of one new number and one known: one more record.
        let records =
            Records::new(vec![14_155_550_000, 14_155_550_001], vec![30_000, 30_000]).expect("records");
        store.apply_delta(&delta(2), &records).await.expect("delta");
        assert_eq!(store.len(), 10_001);
        store.apply_delta(&delta(2), &records).await.expect("delta again");
        assert_eq!(store.len(), 10_001);
        // A snapshot of one record replaces them all.
        let one = Records::new(vec![8_613_800_138_000], vec![20_000]).expect("records");
        store
            .apply_snapshot(&snapshot(7), &one, Some(2))
            .await
            .expect("snapshot");
        assert_eq!((store.len(), store.is_empty()), (1, false));
    }

    #[test]
    fn merge_interleaves() {
        let r = |pairs: &[(u64, u16)]| Records::from_unsorted(pairs.iter().copied()).expect("records");
        let pairs = |r: &Records| r.pairs().collect::<Vec<_>>();
        let m = merge(
            &r(&[(100_001, 1), (100_003, 3), (100_005, 5)]),
            &r(&[(100_002, 2), (100_003, 9), (100_006, 6)]),
        )
        .expect("merge");
        assert_eq!(
            pairs(&m),
            vec![
                (100_001, 1),
                (100_002, 2),
                (100_003, 9),
                (100_005, 5),
                (100_006, 6)
            ]
        );
        let m = merge(&r(&[(100_003, 9)]), &r(&[(100_003, 2)])).expect("merge");
        assert_eq!(pairs(&m), vec![(100_003, 9)]);
        let m = merge(&Records::default(), &r(&[(100_004, 4)])).expect("merge");
        assert_eq!(pairs(&m), vec![(100_004, 4)]);
    }
}
