//! `verify`: compares a mirror with the register files it was built from.
//!
//! The expected mirror at sequence `S` is rebuilt from the source directory
//! (the newest snapshot at or below `S`, then its deltas up to `S`). Both
//! sides are reduced to per-bucket digests over the same bucketing
//! (`number % nbuckets`, the mirror's own): a record count and an
//! order-independent checksum of the (number, date) pairs. Any difference
//! names the bucket. Digests never hold a phone number.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use super::{ImportError, Kind, Manifest, NoProgress, read_records};
use crate::store::{EmbeddedStore, Store};

pub use crate::store::digest::{BucketDigest, MirrorDigest, record_hash};

/// A bucket whose content differs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BucketMismatch {
    /// The bucket index.
    pub bucket: u64,
    /// Its name (e.g. the Redis key).
    pub name: String,
    /// Records expected from the source files.
    pub expected: u64,
    /// Records found in the mirror.
    pub found: u64,
}

/// The outcome of [`verify`].
#[derive(Clone, Debug)]
pub struct VerifyReport {
    /// The mirror's sequence.
    pub sequence: u64,
    /// Buckets compared.
    pub nbuckets: u64,
    /// Distinct numbers the source files give at that sequence.
    pub expected_records: u64,
    /// Records found in the mirror's buckets.
    pub found_records: u64,
    /// `record_count` of the mirror's metadata.
    pub meta_records: u64,
    /// How many buckets differ.
    pub mismatch_count: u64,
    /// The first [`MAX_LISTED`] of them.
    pub mismatches: Vec<BucketMismatch>,
}

/// At most this many mismatching buckets are listed.
pub const MAX_LISTED: usize = 20;

impl VerifyReport {
    /// True if the mirror's data matches its sources. The metadata's
    /// `record_count` is informational (a delta retried after a crash can
    /// under-count it) and is reported, not judged.
    pub fn is_ok(&self) -> bool {
        self.mismatch_count == 0 && self.expected_records == self.found_records
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "mirror at sequence {}: {} records expected from the source files, {} found in {} buckets, metadata record_count {}",
            self.sequence, self.expected_records, self.found_records, self.nbuckets, self.meta_records
        )?;
        if self.meta_records != self.expected_records {
            write!(
                f,
                "\n  - note: the metadata's record_count differs from the source files (a delta retried after a crash under-counts it; answers read the buckets, not this count)"
            )?;
        }
        if self.is_ok() {
            return write!(f, "\n  every bucket matches");
        }
        if self.mismatch_count > 0 {
            write!(f, "\n  - {} bucket(s) differ:", self.mismatch_count)?;
            for m in &self.mismatches {
                write!(
                    f,
                    "\n  - bucket {} ({}): expected {} records, found {} (or different dates)",
                    m.bucket, m.name, m.expected, m.found
                )?;
            }
            if self.mismatch_count > self.mismatches.len() as u64 {
                write!(
                    f,
                    "\n  - ... and {} more",
                    self.mismatch_count - self.mismatches.len() as u64
                )?;
            }
        }
        Ok(())
    }
}

/// Rebuilds the mirror the files of `dir` give at `sequence`: the newest
/// snapshot at or below it, then every delta after that snapshot up to it
/// (which must all be there). Every file is checked as on import; a
/// manifest that cannot be loaded is named in the error only if a file it
/// could have been is missing.
pub async fn expected_mirror(dir: &Path, sequence: u64) -> Result<EmbeddedStore, ImportError> {
    let mut manifests = Vec::new();
    let mut unreadable = Vec::new();
    for path in super::apply::list_manifests(dir)? {
        match Manifest::load(&path) {
            Ok(m) => manifests.push(m),
            Err(e) => unreadable.push(e.to_string()),
        }
    }
    let unreadable = if unreadable.is_empty() {
        String::new()
    } else {
        format!(" (unreadable manifests: {})", unreadable.join("; "))
    };
    let mut snapshots: BTreeMap<u64, Manifest> = BTreeMap::new();
    let mut deltas: BTreeMap<u64, Manifest> = BTreeMap::new();
    for m in manifests.into_iter().filter(|m| m.sequence <= sequence) {
        match m.kind {
            Kind::Snapshot => snapshots.insert(m.sequence, m),
            Kind::Delta => deltas.insert(m.sequence, m),
        };
    }
    let Some((_, snapshot)) = snapshots.pop_last() else {
        return Err(ImportError::Manifest(
            dir.to_path_buf(),
            format!("no snapshot at or below sequence {sequence}: cannot rebuild the mirror{unreadable}"),
        ));
    };
    let store = EmbeddedStore::new();
    let records = read_records(&snapshot, &mut NoProgress)?;
    let write = snapshot
        .snapshot_write()
        .map_err(|reason| ImportError::Manifest(snapshot.path.clone(), reason))?;
    store.apply_snapshot(&write, &records, None).await?;
    drop(records);
    for next in snapshot.sequence + 1..=sequence {
        let Some(delta) = deltas.get(&next) else {
            return Err(ImportError::Manifest(
                dir.to_path_buf(),
                format!(
                    "delta {next} is missing: the files reach sequence {}, the mirror is at {sequence}{unreadable}",
                    next - 1
                ),
            ));
        };
        let records = read_records(delta, &mut NoProgress)?;
        let write = delta
            .delta_write()
            .map_err(|reason| ImportError::Manifest(delta.path.clone(), reason))?;
        store.apply_delta(&write, &records).await?;
    }
    Ok(store)
}

/// Compares `mirror` with what the files of `dir` give at its sequence.
pub async fn verify(dir: &Path, mirror: &MirrorDigest) -> Result<VerifyReport, ImportError> {
    let expected = expected_mirror(dir, mirror.sequence).await?;
    let nbuckets = mirror.buckets.len() as u64;
    let want = expected.bucket_digests(nbuckets.max(1));
    let mut report = VerifyReport {
        sequence: mirror.sequence,
        nbuckets,
        expected_records: expected.len() as u64,
        found_records: mirror.buckets.iter().map(|b| b.count).sum(),
        meta_records: mirror.meta_records,
        mismatch_count: 0,
        mismatches: Vec::new(),
    };
    for (bucket, (want, got)) in want.iter().zip(&mirror.buckets).enumerate() {
        if want != got {
            report.mismatch_count += 1;
            if report.mismatches.len() < MAX_LISTED {
                report.mismatches.push(BucketMismatch {
                    bucket: bucket as u64,
                    name: format!("{}{bucket}", mirror.name_prefix),
                    expected: want.count,
                    found: got.count,
                });
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_is_order_independent_and_sensitive() {
        let mut a = BucketDigest::default();
        a.add(14_155_550_123, 19_000);
        a.add(14_155_550_124, 19_001);
        let mut b = BucketDigest::default();
        b.add(14_155_550_124, 19_001);
        b.add(14_155_550_123, 19_000);
        assert_eq!(a, b);
        let mut c = BucketDigest::default();
        c.add(14_155_550_123, 19_001);
        c.add(14_155_550_124, 19_000);
        assert_eq!(a.count, c.count);
        assert_ne!(a, c, "swapped dates must differ");
    }

    fn report(meta_records: u64, mismatch_count: u64) -> VerifyReport {
        VerifyReport {
            sequence: 3,
            nbuckets: 8,
            expected_records: 100,
            found_records: 100,
            meta_records,
            mismatch_count,
            mismatches: Vec::new(),
        }
    }

    #[test]
    fn an_under_counted_record_count_is_noted_not_failed() {
        let r = report(97, 0);
        assert!(r.is_ok(), "the data matches: {r}");
        let text = r.to_string();
        assert!(text.contains("record_count differs"), "{text}");
        assert!(text.contains("every bucket matches"), "{text}");
        let bad = report(100, 1);
        assert!(!bad.is_ok());
        assert!(!bad.to_string().contains("every bucket matches"));
    }
}
