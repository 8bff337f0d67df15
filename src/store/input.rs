//! What a write to a store is made of, besides its [`Records`](super::Records):
//! the file's kind, sequence and checksum, and for a snapshot the metadata
//! it installs. The importer builds these once from a checked manifest;
//! stores never see a manifest.

use serde::{Deserialize, Serialize};

use crate::domain::{Date, MirrorMeta, Prefix};

/// Whether a file replaces the mirror or adds to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Replaces the whole mirror.
    Snapshot,
    /// Adds disconnects to the current mirror; needs `sequence == current + 1`.
    Delta,
}

impl Kind {
    /// `snapshot` or `delta`, as written in a manifest.
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

/// The key under which a store records the checksum of an applied file:
/// `snapshot:7`, `delta:8`.
pub fn applied_key(kind: Kind, sequence: u64) -> String {
    format!("{kind}:{sequence}")
}

/// How many applied files' checksums a store keeps (the most recent
/// sequences).
pub const APPLIED_KEEP: usize = 1024;

/// A snapshot to install: the metadata it sets up and the checksum of its
/// file. Built by the importer from a checked manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotWrite {
    /// The snapshot's sequence.
    pub sequence: u64,
    /// The date its data is complete through.
    pub as_of: Date,
    /// The earliest disconnect date it covers.
    pub coverage_start: Date,
    /// The numbering prefixes it covers.
    pub prefixes: Vec<Prefix>,
    /// Lowercase hex SHA-256 of the data file.
    pub sha256: String,
}

impl SnapshotWrite {
    /// The mirror metadata this snapshot installs, holding `record_count`
    /// records, applied at `last_import_unix`.
    pub fn meta(&self, record_count: u64, last_import_unix: i64) -> MirrorMeta {
        MirrorMeta {
            sequence: self.sequence,
            as_of: self.as_of,
            coverage_start: self.coverage_start,
            prefixes: self.prefixes.clone(),
            record_count,
            last_import_unix,
        }
    }

    /// [`applied_key`] of this file.
    pub fn applied_key(&self) -> String {
        applied_key(Kind::Snapshot, self.sequence)
    }
}

/// A delta to merge: its sequence (the mirror's + 1), its `as_of` and the
/// checksum of its file. Built by the importer from a checked manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeltaWrite {
    /// The delta's sequence.
    pub sequence: u64,
    /// The date its data is complete through.
    pub as_of: Date,
    /// Lowercase hex SHA-256 of the data file.
    pub sha256: String,
}

impl DeltaWrite {
    /// [`applied_key`] of this file.
    pub fn applied_key(&self) -> String {
        applied_key(Kind::Delta, self.sequence)
    }
}
