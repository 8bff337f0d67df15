//! The manifest that describes one file of the register, and the store
//! write it turns into.

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ImportError;
use crate::domain::{Date, NumberError, Prefix};
use crate::store::{DeltaWrite, Kind, SnapshotWrite};

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

    /// What a snapshot installs in a store: its sequence, `as_of`, coverage,
    /// parsed prefixes and checksum (the one place a manifest becomes store
    /// metadata). `Err` if the manifest is not a valid snapshot.
    pub fn snapshot_write(&self) -> Result<SnapshotWrite, String> {
        if self.kind != Kind::Snapshot {
            return Err(format!("sequence {} is a delta, not a snapshot", self.sequence));
        }
        let coverage_start = self
            .coverage_start
            .ok_or_else(|| "a snapshot needs coverage_start".to_string())?;
        let prefixes = self.prefixes()?;
        if prefixes.is_empty() {
            return Err("covered_prefixes must not be empty".into());
        }
        Ok(SnapshotWrite {
            sequence: self.sequence,
            as_of: self.as_of,
            coverage_start,
            prefixes,
            sha256: self.sha256.to_ascii_lowercase(),
        })
    }

    /// What a delta merges into a store: its sequence, `as_of` and checksum.
    /// `Err` if the manifest is not a delta.
    pub fn delta_write(&self) -> Result<DeltaWrite, String> {
        if self.kind != Kind::Delta {
            return Err(format!("sequence {} is a snapshot, not a delta", self.sequence));
        }
        Ok(DeltaWrite {
            sequence: self.sequence,
            as_of: self.as_of,
            sha256: self.sha256.to_ascii_lowercase(),
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
        let write = m.snapshot_write().expect("snapshot");
        assert_eq!(
            (write.sequence, write.prefixes.len(), write.sha256.as_str()),
            (1, 2, SHA.to_ascii_lowercase().as_str())
        );
        assert!(m.delta_write().is_err());
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
        assert!(m.snapshot_write().is_err());
        assert_eq!(m.delta_write().expect("delta").sequence, 2);
        let missing = Manifest::load_as_of_today(&dir.path().join("nope.json"), today()).expect_err("io");
        assert!(matches!(missing, ImportError::Io { .. }));
    }
}
