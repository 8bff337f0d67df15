//! Writes register files (manifest + CSV data) for tests, with correct (or
//! deliberately wrong) checksums and counts.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// One file of the register to write.
pub struct FileSpec<'a> {
    pub kind: &'a str,
    pub sequence: u64,
    pub as_of: String,
    /// Snapshots: coverage start and covered prefixes.
    pub coverage: Option<(String, Vec<&'a str>)>,
    /// The CSV body after the header (`+1...,2024-01-01\n` lines).
    pub body: String,
    /// Declared record count; `None`: the real one.
    pub records: Option<u64>,
    /// Declared checksum; `None`: the real one.
    pub sha256: Option<String>,
}

impl<'a> FileSpec<'a> {
    /// A snapshot covering `prefixes` from `coverage_start`.
    pub fn snapshot(
        sequence: u64,
        as_of: &str,
        coverage_start: &str,
        prefixes: &[&'a str],
        rows: &[(&str, &str)],
    ) -> Self {
        Self {
            kind: "snapshot",
            sequence,
            as_of: as_of.to_owned(),
            coverage: Some((coverage_start.to_owned(), prefixes.to_vec())),
            body: body(rows),
            records: None,
            sha256: None,
        }
    }

    /// A delta.
    pub fn delta(sequence: u64, as_of: &str, rows: &[(&str, &str)]) -> Self {
        Self {
            kind: "delta",
            sequence,
            as_of: as_of.to_owned(),
            coverage: None,
            body: body(rows),
            records: None,
            sha256: None,
        }
    }

    /// Writes `<name>.csv` and `<name>.json` into `dir`; returns the manifest path.
    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let csv = format!("phone_number,disconnect_date\n{}", self.body);
        let data_name = format!("{name}.csv");
        std::fs::write(dir.join(&data_name), &csv).expect("write csv");
        let rows = self.body.lines().filter(|l| !l.is_empty()).count() as u64;
        let sha = self
            .sha256
            .clone()
            .unwrap_or_else(|| hex::encode(Sha256::digest(csv.as_bytes())));
        let mut manifest = serde_json::json!({
            "kind": self.kind,
            "sequence": self.sequence,
            "as_of": self.as_of,
            "data": data_name,
            "records": self.records.unwrap_or(rows),
            "sha256": sha,
        });
        if let Some((start, prefixes)) = &self.coverage {
            manifest["coverage_start"] = serde_json::json!(start);
            manifest["covered_prefixes"] = serde_json::json!(prefixes);
        }
        let path = dir.join(format!("{name}.json"));
        std::fs::write(&path, serde_json::to_vec_pretty(&manifest).expect("json")).expect("write manifest");
        path
    }
}

fn body(rows: &[(&str, &str)]) -> String {
    rows.iter().map(|(n, d)| format!("{n},{d}\n")).collect()
}
