//! The manifest that describes one file of the register, and the validated
//! records read from its data file.

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ImportError;
use crate::domain::{Date, MirrorMeta, NumberError, PhoneNumber, Prefix};

/// Whether a file replaces the mirror or adds to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Replaces the whole mirror.
    Snapshot,
    /// Adds disconnects to the current mirror; needs `sequence == current + 1`.
    Delta,
}

impl Kind {
    /// `snapshot` or `delta`, as written in the manifest.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Snapshot => "snapshot",
            Kind::Delta => "delta",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A manifest: one JSON file describing one data file of the register.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// `snapshot` or `delta`.
    pub kind: Kind,
    /// Position in the register's history: deltas follow one by one.
    pub sequence: u64,
    /// The date the data is complete through.
    pub as_of: Date,
    /// Snapshots only: the earliest disconnect date the register covers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coverage_start: Option<Date>,
    /// Snapshots only: the numbering prefixes covered (`+1`, `+86`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub covered_prefixes: Option<Vec<String>>,
    /// The data file, relative to the manifest's directory.
    pub data: String,
    /// The number of data rows (header excluded).
    pub records: u64,
    /// Lowercase hex SHA-256 of the data file as stored (compressed or not).
    pub sha256: String,
    /// Where the manifest was read from (not part of the JSON).
    #[serde(skip)]
    pub path: PathBuf,
}

impl Manifest {
    /// Reads and validates a manifest (see the [module documentation](super)
    /// for the rules) and records where it was read from in `path`.
    ///
    /// `sha256` is normalised to lowercase. Today is taken from the system
    /// clock (UTC).
    pub fn load(path: impl AsRef<Path>) -> Result<Manifest, ImportError> {
        Self::load_as_of_today(path.as_ref(), Date::today_utc())
    }

    /// [`Manifest::load`] with an explicit "today" (for tests and tools).
    pub fn load_as_of_today(path: &Path, today: Date) -> Result<Manifest, ImportError> {
        let bytes = std::fs::read(path).map_err(|error| ImportError::Io {
            path: path.to_path_buf(),
            error,
        })?;
        let mut manifest: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| ImportError::Manifest(path.to_path_buf(), format!("not a valid manifest: {e}")))?;
        manifest.path = path.to_path_buf();
        manifest.sha256.make_ascii_lowercase();
        manifest
            .validate(today)
            .map_err(|reason| ImportError::Manifest(path.to_path_buf(), reason))?;
        Ok(manifest)
    }

    /// Checks the rules a manifest must follow, `today` being the current
    /// date (UTC). Returns the first rule broken, in words.
    pub fn validate(&self, today: Date) -> Result<(), String> {
        if self.sequence == 0 {
            return Err("sequence must be 1 or more".into());
        }
        match self.kind {
            Kind::Snapshot => {
                let Some(start) = self.coverage_start else {
                    return Err("a snapshot needs coverage_start".into());
                };
                if start > self.as_of {
                    return Err(format!(
                        "coverage_start ({start}) must not be after as_of ({})",
                        self.as_of
                    ));
                }
                match &self.covered_prefixes {
                    None => return Err("a snapshot needs covered_prefixes".into()),
                    Some(p) if p.is_empty() => return Err("covered_prefixes must not be empty".into()),
                    Some(_) => {}
                }
                self.prefixes()?;
            }
            Kind::Delta => {
                if self.coverage_start.is_some() {
                    return Err(
                        "a delta must not have coverage_start (only snapshots set the coverage)".into(),
                    );
                }
                if self.covered_prefixes.is_some() {
                    return Err(
                        "a delta must not have covered_prefixes (only snapshots set the coverage)".into(),
                    );
                }
            }
        }
        if self.as_of > today {
            return Err(format!("as_of ({}) is after today ({today}, UTC)", self.as_of));
        }
        if self.sha256.len() != 64 || !self.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("sha256 must be 64 hexadecimal characters".into());
        }
        check_data_name(&self.data)
    }

    /// The data file's path: `data` relative to the manifest's directory.
    pub fn data_path(&self) -> PathBuf {
        let dir = self.path.parent().unwrap_or(Path::new(""));
        dir.join(&self.data)
    }

    /// True if the data file is gzip-compressed (its name ends `.csv.gz`).
    pub fn is_gzip(&self) -> bool {
        self.data.ends_with(".csv.gz")
    }

    /// The covered prefixes, parsed (empty for a delta).
    pub fn prefixes(&self) -> Result<Vec<Prefix>, String> {
        self.covered_prefixes
            .iter()
            .flatten()
            .map(|p| Prefix::parse(p).map_err(|e: NumberError| format!("covered_prefixes: {p:?} {e}")))
            .collect()
    }

    /// The mirror metadata a snapshot sets up: its sequence, `as_of`,
    /// coverage and prefixes, with `record_count` and `last_import_unix`
    /// given. `Err` if the manifest is not a valid snapshot.
    pub fn snapshot_meta(&self, record_count: u64, last_import_unix: i64) -> Result<MirrorMeta, String> {
        if self.kind != Kind::Snapshot {
            return Err(format!("sequence {} is a delta, not a snapshot", self.sequence));
        }
        let coverage_start = self
            .coverage_start
            .ok_or_else(|| "a snapshot needs coverage_start".to_string())?;
        Ok(MirrorMeta {
            sequence: self.sequence,
            as_of: self.as_of,
            coverage_start,
            prefixes: self.prefixes()?,
            record_count,
            last_import_unix,
        })
    }

    /// A short description for logs and messages, e.g. `delta 7 (delta-000007.json)`.
    /// Holds no personal data.
    pub fn describe(&self) -> String {
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        format!("{} {} ({name})", self.kind, self.sequence)
    }
}

/// `data` must be a plain relative path (no `..`, not absolute) ending in
/// `.csv` or `.csv.gz`.
fn check_data_name(data: &str) -> Result<(), String> {
    if data.is_empty() {
        return Err("data must name the data file".into());
    }
    let plain = Path::new(data)
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if !plain {
        return Err(format!(
            "data ({data:?}) must be a path relative to the manifest's directory, without '..'"
        ));
    }
    if !(data.ends_with(".csv") || data.ends_with(".csv.gz")) {
        return Err(format!("data ({data:?}) must end with .csv or .csv.gz"));
    }
    Ok(())
}

/// Validated records of one data file: sorted by number, one entry per number
/// (the latest date wins), as parallel arrays (10 bytes per record).
///
/// `Debug` shows only the count, so records never reach a log by accident.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Records {
    /// [`PhoneNumber::value`] of each number, strictly increasing.
    pub numbers: Vec<u64>,
    /// The disconnect date of `numbers[i]`, as days since 1970-01-01.
    pub days: Vec<u16>,
}

impl std::fmt::Debug for Records {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Records")
            .field("len", &self.numbers.len())
            .finish_non_exhaustive()
    }
}

impl Records {
    /// The number of records.
    pub fn len(&self) -> usize {
        self.numbers.len()
    }

    /// True if there are no records.
    pub fn is_empty(&self) -> bool {
        self.numbers.is_empty()
    }

    /// The records as (number, date) pairs, in number order.
    pub fn iter(&self) -> impl Iterator<Item = (PhoneNumber, Date)> + '_ {
        self.numbers
            .iter()
            .zip(&self.days)
            .filter_map(|(&n, &d)| PhoneNumber::from_value(n).map(|n| (n, Date::from_days(i32::from(d)))))
    }

    /// The date recorded for `number`, by binary search.
    pub fn get(&self, number: PhoneNumber) -> Option<Date> {
        let i = self.numbers.binary_search(&number.value()).ok()?;
        self.days.get(i).map(|&d| Date::from_days(i32::from(d)))
    }

    /// True if the arrays have the same length and the numbers are strictly
    /// increasing (the invariant every producer of `Records` keeps).
    pub fn is_well_formed(&self) -> bool {
        self.numbers.len() == self.days.len() && self.numbers.windows(2).all(|w| w[0] < w[1])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn today() -> Date {
        Date::parse("2026-11-29").expect("date")
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    const SHA: &str = "E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855";

    fn snapshot_json(extra: &str) -> String {
        format!(
            r#"{{"kind":"snapshot","sequence":1,"as_of":"2026-11-01","coverage_start":"2021-01-27",
               "covered_prefixes":["+1","+86"],"data":"s.csv","records":0,"sha256":"{SHA}"{extra}}}"#
        )
    }

    #[test]
    fn loads_a_snapshot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = write(dir.path(), "s.json", &snapshot_json(""));
        let m = Manifest::load_as_of_today(&p, today()).expect("valid");
        assert_eq!(m.kind, Kind::Snapshot);
        assert_eq!(m.path, p);
        assert_eq!(m.sha256, SHA.to_ascii_lowercase());
        assert_eq!(m.data_path(), dir.path().join("s.csv"));
        assert!(!m.is_gzip());
        assert_eq!(m.prefixes().expect("prefixes").len(), 2);
        let meta = m.snapshot_meta(5, 7).expect("meta");
        assert_eq!(
            (meta.sequence, meta.record_count, meta.last_import_unix),
            (1, 5, 7)
        );
        assert_eq!(m.describe(), "snapshot 1 (s.json)");
    }

    #[test]
    fn rejects_bad_manifests() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cases = [
            (snapshot_json(r#","extra":1"#), "unknown field"),
            (
                snapshot_json("").replace(r#""coverage_start":"2021-01-27","#, ""),
                "needs coverage_start",
            ),
            (
                snapshot_json("").replace(r#""+1","+86""#, ""),
                "must not be empty",
            ),
            (
                snapshot_json("").replace(r#""+86""#, r#""+086""#),
                "covered_prefixes",
            ),
            (
                snapshot_json("").replace("2021-01-27", "2026-11-02"),
                "must not be after as_of",
            ),
            (
                snapshot_json("").replace("2026-11-01", "2026-11-30"),
                "after today",
            ),
            (snapshot_json("").replace(SHA, "abc"), "64 hexadecimal"),
            (snapshot_json("").replace("s.csv", "../s.csv"), "without '..'"),
            (
                snapshot_json("").replace("s.csv", "/etc/s.csv"),
                "relative to the manifest's directory",
            ),
            (
                snapshot_json("").replace("s.csv", "a/../../s.csv"),
                "without '..'",
            ),
            (snapshot_json("").replace("s.csv", "s.txt"), ".csv or .csv.gz"),
            (
                snapshot_json("").replace(r#""sequence":1"#, r#""sequence":0"#),
                "1 or more",
            ),
            (
                snapshot_json("").replace("2026-11-01", "2026-02-30"),
                "not a valid manifest",
            ),
            (
                snapshot_json("").replace("snapshot", "delta"),
                "must not have coverage_start",
            ),
            ("{".to_string(), "not a valid manifest"),
        ];
        for (i, (json, want)) in cases.iter().enumerate() {
            let p = write(dir.path(), &format!("m{i}.json"), json);
            let err = Manifest::load_as_of_today(&p, today()).expect_err(want);
            let msg = err.to_string();
            assert!(msg.contains(want), "case {i}: {msg:?} should contain {want:?}");
            assert!(
                msg.contains(&format!("m{i}.json")),
                "case {i}: {msg:?} should name the file"
            );
        }
    }

    #[test]
    fn loads_a_delta() {
        let dir = tempfile::tempdir().expect("tempdir");
        let json = format!(
            r#"{{"kind":"delta","sequence":2,"as_of":"2026-11-02","data":"sub/d.csv.gz","records":3,"sha256":"{SHA}"}}"#
        );
        let p = write(dir.path(), "d.json", &json);
        let m = Manifest::load_as_of_today(&p, today()).expect("valid");
        assert!(m.is_gzip());
        assert_eq!(m.data_path(), dir.path().join("sub/d.csv.gz"));
        assert!(m.prefixes().expect("none").is_empty());
        assert!(m.snapshot_meta(0, 0).is_err());
        let r = Records {
            numbers: vec![14_155_550_123],
            days: vec![1],
        };
        assert_eq!(format!("{r:?}"), "Records { len: 1, .. }");
        let missing = Manifest::load_as_of_today(&dir.path().join("nope.json"), today()).expect_err("io");
        assert!(matches!(missing, ImportError::Io { .. }));
    }
}
