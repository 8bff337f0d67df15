//! An append-only journal file of the embedded store's federation state:
//! records framed as `length (u32 LE) | crc32 (u32 LE) | payload`, each
//! append written and fsynced before it returns (acknowledged means
//! durable), replayed at start.
//!
//! At open, a torn tail (a crash in the middle of the last append: a short
//! frame, or a last record whose checksum fails) is cut off with a warning;
//! a record that fails its checksum with valid records after it is
//! corruption and refuses to open, naming the offset.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Bytes of a frame header (length, checksum).
const HEADER: usize = 8;

/// The largest payload of one record (a bound on what a corrupt length can
/// make the replay allocate).
pub const MAX_RECORD: usize = 16 << 20;

/// Why a journal cannot be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Reading, writing or syncing the file failed.
    #[error("journal {path}: {source}")]
    Io {
        /// The journal file.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// A record in the middle of the file is damaged.
    #[error(
        "journal {path} is corrupt at byte offset {offset}: {reason} (valid records follow it; restore the file or move it away)"
    )]
    Corrupt {
        /// The journal file.
        path: PathBuf,
        /// Where the damaged record starts.
        offset: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// A record is larger than [`MAX_RECORD`].
    #[error("journal record of {0} bytes exceeds the limit")]
    TooLarge(usize),
}

/// An open journal, positioned at its end.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
}

impl Journal {
    /// Opens (or creates) the journal at `path` and returns it with the
    /// payloads of its records, oldest first (see the module documentation
    /// for a torn tail and for corruption).
    pub fn open(path: &Path) -> Result<(Self, Vec<Vec<u8>>), JournalError> {
        let io = |source| JournalError::Io {
            path: path.to_owned(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(io)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io)?;
        let (records, valid_end) = parse(path, &bytes)?;
        if valid_end < bytes.len() {
            tracing::warn!(
                journal = %path.display(),
                offset = valid_end,
                dropped_bytes = bytes.len() - valid_end,
                "journal: dropping a torn last record (a crash during its append; it was never acknowledged)"
            );
            file.set_len(valid_end as u64).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        sync_dir(path);
        Ok((
            Self {
                path: path.to_owned(),
                file,
            },
            records,
        ))
    }

    /// Appends `payloads` as records and fsyncs: durable when it returns.
    pub fn append<P: AsRef<[u8]>>(&mut self, payloads: &[P]) -> Result<(), JournalError> {
        let mut buf = Vec::new();
        for payload in payloads {
            let payload = payload.as_ref();
            if payload.len() > MAX_RECORD {
                return Err(JournalError::TooLarge(payload.len()));
            }
            let len = u32::try_from(payload.len()).map_err(|_| JournalError::TooLarge(payload.len()))?;
            buf.extend_from_slice(&len.to_le_bytes());
            buf.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
            buf.extend_from_slice(payload);
        }
        let io = |source| JournalError::Io {
            path: self.path.clone(),
            source,
        };
        self.file.write_all(&buf).map_err(io)?;
        self.file.sync_data().map_err(io)
    }
}

/// The payloads of `bytes` and the end of the last valid record.
fn parse(path: &Path, bytes: &[u8]) -> Result<(Vec<Vec<u8>>, usize), JournalError> {
    let mut records = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let Some(header) = bytes.get(at..at + HEADER) else {
            break; // torn header
        };
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let end = at + HEADER + len;
        let damaged = if len > MAX_RECORD {
            Some(format!("record length {len} exceeds the limit"))
        } else {
            match bytes.get(at + HEADER..end) {
                None => break, // torn payload
                Some(payload) if crc32fast::hash(payload) != crc => Some("checksum mismatch".to_owned()),
                Some(payload) => {
                    records.push(payload.to_vec());
                    None
                }
            }
        };
        if let Some(reason) = damaged {
            // The last record: torn while appended. Anything after it:
            // the file was damaged, and guessing would lose data.
            if len <= MAX_RECORD && end >= bytes.len() {
                break;
            }
            return Err(JournalError::Corrupt {
                path: path.to_owned(),
                offset: at as u64,
                reason,
            });
        }
        at = end;
    }
    Ok((records, at))
}

/// Makes a newly created journal's directory entry durable (best effort).
fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent()
        && let Ok(d) = File::open(dir)
    {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_a_reopen_and_a_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let (mut j, records) = Journal::open(&path).unwrap();
        assert!(records.is_empty());
        j.append(&[b"one".as_slice(), b"two"]).unwrap();
        drop(j);
        // A torn append: half a header, then reopen.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[9, 0, 0]).unwrap();
        drop(f);
        let (mut j, records) = Journal::open(&path).unwrap();
        assert_eq!(records, vec![b"one".to_vec(), b"two".to_vec()]);
        j.append(&[b"three"]).unwrap();
        drop(j);
        let (_, records) = Journal::open(&path).unwrap();
        assert_eq!(records.len(), 3);
        assert_eq!(records[2], b"three");
    }

    #[test]
    fn a_damaged_last_record_is_torn_but_a_damaged_middle_one_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let (mut j, _) = Journal::open(&path).unwrap();
        j.append(&[b"aaaa".as_slice(), b"bbbb", b"cccc"]).unwrap();
        drop(j);
        let mut bytes = std::fs::read(&path).unwrap();
        // Flip a payload byte of the second record (offset 12 + 8).
        bytes[12 + HEADER] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let err = Journal::open(&path).unwrap_err();
        assert!(matches!(err, JournalError::Corrupt { offset: 12, .. }), "{err}");
        assert!(err.to_string().contains("offset 12"), "{err}");
        // Damage the last one instead: cut off as torn.
        bytes[12 + HEADER] ^= 0xff;
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let (_, records) = Journal::open(&path).unwrap();
        assert_eq!(records, vec![b"aaaa".to_vec(), b"bbbb".to_vec()]);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 24);
    }
}
