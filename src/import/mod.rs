//! Importing the national register's files: manifests, CSV data files
//! (optionally gzip-compressed), their checks, and applying snapshots and
//! deltas to a [`crate::store::Store`] in sequence order.
//!
//! # The file format (public contract)
//!
//! The register is published as a directory of *manifests* (`*.json`), each
//! describing one *data file*. A snapshot replaces the whole mirror; a delta
//! adds disconnects to it.
//!
//! ## Manifest
//!
//! A JSON object with exactly these fields (unknown fields are refused):
//!
//! | field | type | meaning |
//! |---|---|---|
//! | `kind` | `"snapshot"` or `"delta"` | replace the mirror, or add to it |
//! | `sequence` | integer ≥ 1 | position in the register's history; each delta is the previous sequence + 1 |
//! | `as_of` | `YYYY-MM-DD` | the data is complete through this date; never after today (UTC) |
//! | `coverage_start` | `YYYY-MM-DD` | snapshots only (required there, refused on deltas): earliest disconnect date covered; not after `as_of` |
//! | `covered_prefixes` | array of strings | snapshots only (required, non-empty; refused on deltas): E.164 prefixes covered, e.g. `["+1", "+86"]` |
//! | `data` | string | the data file, relative to the manifest's directory (no `..`), ending `.csv` or `.csv.gz` |
//! | `records` | integer | the number of data rows (header excluded) |
//! | `sha256` | 64 hex characters | SHA-256 of the data file's bytes as stored (i.e. of the compressed bytes for `.csv.gz`) |
//!
//! ```json
//! {"kind": "snapshot", "sequence": 1, "as_of": "2026-11-26",
//!  "coverage_start": "2021-01-27", "covered_prefixes": ["+1", "+86"],
//!  "data": "snapshot-000001.csv.gz", "records": 1000000,
//!  "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"}
//! ```
//!
//! ## Data file
//!
//! CSV, UTF-8, gzip-compressed when the name ends `.csv.gz`. The first line is
//! exactly `phone_number,disconnect_date`; every other line is one record,
//! e.g. `+14155550123,2024-05-01`:
//!
//! - `phone_number`: strict E.164 (`+`, 5 to 15 digits, the first not `0`);
//! - `disconnect_date`: `YYYY-MM-DD`, a real date, from 1970-01-01 to the
//!   manifest's `as_of` (and before 2149-06-07, as dates are kept as 16-bit day
//!   counts).
//!
//! Lines end with LF or CRLF; a final newline is optional; empty lines,
//! quotes and extra columns are refused. A number may appear more than once:
//! its latest date is kept. Rows need not be sorted (sorted files load
//! faster).
//!
//! ## Checks
//!
//! A file is applied only if every row is valid, the row count equals
//! `records` and the SHA-256 matches; otherwise nothing changes and the error
//! lists the first 20 problems with their line numbers. Messages never show a
//! phone number.
//!
//! Guards against files that would wipe or exhaust the mirror:
//!
//! - reading stops at the first row beyond `records` (a row bomb is refused
//!   at once), and duplicate numbers are folded while reading, so memory
//!   follows the distinct numbers;
//! - `data` must resolve (links followed) to a regular file inside the
//!   manifest's directory;
//! - a snapshot that removes more than [`ImportOptions::max_shrink`] of the
//!   mirror's records, or has none, is refused ([`ImportError::Shrink`])
//!   unless [`ImportOptions::allow_shrink`];
//! - a file of an already-applied kind and sequence whose SHA-256 differs
//!   from the one recorded when it was applied is refused
//!   ([`ImportError::Reissued`]).
//!
//! [`verify`] compares a mirror with its source files.
//!
//! ## Order
//!
//! [`apply_manifest`] applies one file: a delta needs `sequence` = the
//! mirror's sequence + 1, a snapshot any sequence above the mirror's, and
//! `as_of` never goes backwards; a file at or below the mirror's sequence is
//! reported as already applied. [`sync_dir`] brings a mirror up to date from a
//! directory: the newest snapshot above the mirror's sequence (if any), then
//! the consecutive deltas after it. Running it again applies nothing.

mod apply;
pub mod embedded;
mod manifest;
mod progress;
mod read;
pub mod verify;

use std::io;
use std::path::PathBuf;

pub use apply::{
    Applied, DEFAULT_MAX_SHRINK, ImportOptions, Interrupt, Skipped, SyncReport, apply_manifest,
    apply_manifest_with, spawn_resync, spawn_resync_with, sync_dir, sync_dir_lenient, sync_dir_lenient_split,
    sync_dir_with,
};
pub use manifest::Manifest;
pub use progress::{NoProgress, Progress, StderrProgress};
pub use read::{MAX_PROBLEMS, read_records};

use crate::domain::Date;
use crate::store::StoreError;
pub use crate::store::{APPLIED_KEEP, Kind, Records, applied_key};

/// Why an import failed. Nothing in the store has changed when one is
/// returned by [`apply_manifest`]; [`sync_dir`] may have applied earlier files
/// before failing on a later one (each file is applied atomically).
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The manifest at this path is not valid; the reason says why.
    #[error("manifest {}: {}", .0.display(), .1)]
    Manifest(PathBuf, String),
    /// The data file is not valid: the first problems found (row problems
    /// carry their line numbers), count or checksum mismatches.
    #[error("{}", data_message(file, problems))]
    Data {
        /// The data file.
        file: PathBuf,
        /// One human-readable line per problem.
        problems: Vec<String>,
    },
    /// A delta does not follow the mirror's sequence (or the mirror is empty
    /// and needs a snapshot first).
    #[error("{}", gap_message(*current, *got))]
    SequenceGap {
        /// The mirror's sequence (`None`: the mirror is empty).
        current: Option<u64>,
        /// The sequence that was offered instead of the next one.
        got: u64,
    },
    /// The file's `as_of` is earlier than the mirror's.
    #[error(
        "as_of would go backwards: the mirror is complete through {current}, the file only through {got}"
    )]
    AsOfBackwards {
        /// The mirror's `as_of`.
        current: Date,
        /// The file's `as_of`.
        got: Date,
    },
    /// The store failed or refused the write. (Transparent: the store's
    /// own message already says "store ...", and a prefix plus a source
    /// would print the cause twice in an error chain.)
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A snapshot would shrink the mirror by more than allowed, or leave it
    /// empty (see [`ImportOptions`]).
    #[error(
        "{}: snapshot {sequence} would shrink the mirror from {before} to {after} records ({}), more than the allowed {:.1}%; refused (pass --allow-shrink if this is intended)",
        file.display(), shrink_text(*before, *after), max_shrink * 100.0
    )]
    Shrink {
        /// The manifest.
        file: PathBuf,
        /// Its sequence.
        sequence: u64,
        /// Records in the mirror now.
        before: u64,
        /// Records in the snapshot.
        after: u64,
        /// The largest share allowed to go.
        max_shrink: f64,
    },
    /// A file of a sequence already applied has other content than the file
    /// that was applied: the register re-issued it. Nothing was changed.
    #[error(
        "{}: {kind} {sequence} was already applied with SHA-256 {applied_sha256}, but this file has SHA-256 {file_sha256}: a re-issued file with different content is refused (the mirror is unchanged; resolve with the register, then import a new snapshot)",
        file.display()
    )]
    Reissued {
        /// The manifest.
        file: PathBuf,
        /// Its kind.
        kind: Kind,
        /// Its sequence.
        sequence: u64,
        /// The checksum recorded when the sequence was applied.
        applied_sha256: String,
        /// The checksum of the file offered now.
        file_sha256: String,
    },
    /// The import was asked to stop (SIGTERM or SIGINT) and stopped cleanly:
    /// the file being applied was finished or rolled back, the lock released.
    #[error("interrupted by a signal {done}; the import lock is released")]
    Interrupted {
        /// Where it stopped and what had been done (e.g. `before the next
        /// file (mirror at sequence 2; applied snapshot 2 (100 records))`).
        done: String,
    },
    /// A file or directory could not be read.
    #[error("{}: {error}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error, in the message (not a `source`: a chain
        /// would print it twice).
        error: io::Error,
    },
}

impl ImportError {
    /// Every [`ImportError::kind`], in declaration order (a bounded label
    /// set for metrics).
    pub const KINDS: [&'static str; 9] = [
        "manifest",
        "data",
        "sequence_gap",
        "as_of_backwards",
        "store",
        "shrink",
        "reissued",
        "interrupted",
        "io",
    ];

    /// A short, stable name of what went wrong (the metrics' `kind` label:
    /// no path, no number, no message).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Manifest(..) => "manifest",
            Self::Data { .. } => "data",
            Self::SequenceGap { .. } => "sequence_gap",
            Self::AsOfBackwards { .. } => "as_of_backwards",
            Self::Store(_) => "store",
            Self::Shrink { .. } => "shrink",
            Self::Reissued { .. } => "reissued",
            Self::Interrupted { .. } => "interrupted",
            Self::Io { .. } => "io",
        }
    }
}

fn data_message(file: &std::path::Path, problems: &[String]) -> String {
    let mut out = format!("data file {} rejected:", file.display());
    for p in problems {
        out.push_str("\n  - ");
        out.push_str(p);
    }
    out
}

fn shrink_text(before: u64, after: u64) -> String {
    if after == 0 {
        "it would leave the mirror empty".to_string()
    } else if before == 0 {
        "none".to_string()
    } else {
        format!(
            "-{:.1}%",
            (before.saturating_sub(after)) as f64 * 100.0 / before as f64
        )
    }
}

fn gap_message(current: Option<u64>, got: u64) -> String {
    match current {
        None => format!(
            "sequence gap: the mirror is empty and needs a snapshot first, but the next file is delta {got}"
        ),
        Some(c) => format!(
            "sequence gap: the mirror is at sequence {c}, so the next delta must be {}, but got {got}",
            c.saturating_add(1)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_human() {
        let e = ImportError::SequenceGap {
            current: Some(3),
            got: 5,
        };
        assert_eq!(
            e.to_string(),
            "sequence gap: the mirror is at sequence 3, so the next delta must be 4, but got 5"
        );
        let e = ImportError::SequenceGap {
            current: None,
            got: 2,
        };
        assert!(e.to_string().contains("needs a snapshot first"));
        let e = ImportError::Data {
            file: "d.csv".into(),
            problems: vec!["a".into(), "b".into()],
        };
        assert_eq!(e.to_string(), "data file d.csv rejected:\n  - a\n  - b");
        let e = ImportError::Manifest("m.json".into(), "bad".into());
        assert_eq!(e.to_string(), "manifest m.json: bad");
        assert_eq!(e.kind(), "manifest");
        assert!(
            ImportError::KINDS.contains(
                &ImportError::SequenceGap {
                    current: None,
                    got: 1
                }
                .kind()
            )
        );
    }
}
