//! An append-only journal file: the embedded store's durable record of the
//! federation (the event log; watch lists use the same framing).
//!
//! # Format
//! A sequence of records, each framed as
//!
//! | bytes | content |
//! |---|---|
//! | 4 | payload length `n`, little-endian `u32` (at most [`MAX_RECORD`]) |
//! | 4 | CRC-32 (IEEE) of the payload, little-endian |
//! | `n` | the payload |
//!
//! An append writes whole records and fsyncs (`sync_data`) before it
//! returns: a record is durable once acknowledged. A failed write is cut
//! off again (the file is truncated back to its last whole record), so a
//! later append never lands after a half record.
//!
//! At open ([`Journal::open`]) every record is read back and checked. A
//! damaged **last** record (a header or payload cut short, or a checksum
//! that does not match with nothing after it) is what a crash in the
//! middle of an append leaves: it was never acknowledged, so it is dropped
//! with a warning and the file truncated to the last whole record. A
//! damaged record **with records after it** is not a torn write but
//! corruption: the journal refuses to open and names the byte offset, and
//! nothing is truncated (an operator must look).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The largest payload of one record (1 MiB).
pub const MAX_RECORD: usize = 1 << 20;

/// Bytes of a record's header (length and checksum).
const HEADER: usize = 8;

/// Why a journal cannot be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Reading, writing or syncing the file failed.
    #[error("journal {path}: {source}")]
    Io {
        /// The journal file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A record in the middle of the file is damaged.
    #[error(
        "journal {path} is corrupt at byte offset {offset}: {reason}; refusing to start (move the file aside or restore it)"
    )]
    Corrupt {
        /// The journal file.
        path: PathBuf,
        /// Where the damaged record starts.
        offset: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// A record to append is larger than [`MAX_RECORD`].
    #[error("journal record of {0} bytes is larger than the limit")]
    TooLarge(usize),
    /// An earlier write failed and could not be cut off: the journal takes
    /// no more writes until restarted.
    #[error("journal {0} is unusable after a failed write; restart to recover")]
    Broken(PathBuf),
}

/// What [`Journal::open`] found.
#[derive(Debug)]
pub struct Opened {
    /// The journal, ready for appends after the last whole record.
    pub journal: Journal,
    /// Every whole record's payload, in order.
    pub records: Vec<Vec<u8>>,
    /// Bytes of a torn last record that were dropped (0: none).
    pub dropped_tail: u64,
}

/// An open journal file (see the [module documentation](self)). Appends
/// take `&mut self`: the owner serialises them.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: Arc<File>,
    len: u64,
    broken: bool,
}

impl Journal {
    /// Opens (or creates) the journal at `path`, reads back every record,
    /// drops a torn last record (with a warning) and refuses a damaged
    /// record in the middle ([`JournalError::Corrupt`]).
    pub fn open(path: &Path) -> Result<Opened, JournalError> {
        let io = |source| JournalError::Io {
            path: path.to_owned(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io)?;
        let (records, whole) = parse(path, &bytes)?;
        let dropped_tail = bytes.len() as u64 - whole;
        if dropped_tail > 0 {
            tracing::warn!(
                journal = %path.display(),
                offset = whole,
                dropped_bytes = dropped_tail,
                "dropping a torn last record of the journal (a write cut short by a crash; it was never acknowledged)"
            );
            file.set_len(whole).map_err(io)?;
            file.sync_data().map_err(io)?;
        }
        // A new file's directory entry must be durable too.
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        Ok(Opened {
            journal: Journal {
                path: path.to_owned(),
                file: Arc::new(file),
                len: whole,
                broken: false,
            },
            records,
            dropped_tail,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The length of the file: its whole records.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when the journal holds no record.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `payloads` as records and fsyncs; durable when it returns
    /// `Ok`. On error nothing of them is in the file (it is cut back), or
    /// the journal is [`JournalError::Broken`] if even that failed.
    pub async fn append(&mut self, payloads: &[Vec<u8>]) -> Result<(), JournalError> {
        if self.broken {
            return Err(JournalError::Broken(self.path.clone()));
        }
        let mut buf = Vec::with_capacity(payloads.iter().map(|p| p.len() + HEADER).sum());
        for payload in payloads {
            if payload.len() > MAX_RECORD {
                return Err(JournalError::TooLarge(payload.len()));
            }
            frame(payload, &mut buf);
        }
        let file = Arc::clone(&self.file);
        let before = self.len;
        let added = buf.len() as u64;
        let written = tokio::task::spawn_blocking(move || -> Result<(), (std::io::Error, bool)> {
            let mut f: &File = &file;
            if let Err(e) = f.write_all(&buf).and_then(|()| file.sync_data()) {
                // Cut off what part of it reached the file.
                let cut = file.set_len(before).and_then(|()| file.sync_data()).is_ok();
                return Err((e, cut));
            }
            Ok(())
        })
        .await;
        match written {
            Ok(Ok(())) => {
                self.len = before + added;
                Ok(())
            }
            Ok(Err((source, cut))) => {
                self.broken = !cut;
                Err(JournalError::Io {
                    path: self.path.clone(),
                    source,
                })
            }
            Err(join) => {
                self.broken = true;
                Err(JournalError::Io {
                    path: self.path.clone(),
                    source: std::io::Error::other(join.to_string()),
                })
            }
        }
    }
}

/// Appends `payload`, framed, to `out`.
pub fn frame(payload: &[u8], out: &mut Vec<u8>) {
    // MAX_RECORD fits a u32; the caller checked the length.
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// The whole records of `bytes` and the length they span; a damaged
/// record with more bytes after it is an error.
fn parse(path: &Path, bytes: &[u8]) -> Result<(Vec<Vec<u8>>, u64), JournalError> {
    let mut records = Vec::new();
    let mut at = 0usize;
    let corrupt = |offset: usize, reason: String| JournalError::Corrupt {
        path: path.to_owned(),
        offset: offset as u64,
        reason,
    };
    while at < bytes.len() {
        let rest = &bytes[at..];
        let Some((header, body)) = rest.split_at_checked(HEADER) else {
            break; // torn header
        };
        let mut word = [0u8; 4];
        word.copy_from_slice(&header[..4]);
        let len = u32::from_le_bytes(word) as usize;
        word.copy_from_slice(&header[4..]);
        let crc = u32::from_le_bytes(word);
        if len > MAX_RECORD {
            if body.len() <= len {
                break; // a garbage length in a torn last header
            }
            return Err(corrupt(at, format!("record length {len} over the limit")));
        }
        let Some(payload) = body.get(..len) else {
            break; // torn payload
        };
        if crc32fast::hash(payload) != crc {
            if body.len() == len {
                break; // the last record, half written
            }
            return Err(corrupt(at, "checksum mismatch".into()));
        }
        records.push(payload.to_vec());
        at += HEADER + len;
    }
    Ok((records, at as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(payloads: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in payloads {
            frame(p, &mut out);
        }
        out
    }

    #[test]
    fn whole_records_parse_back() {
        let bytes = framed(&[b"one", b"", b"three"]);
        let (records, len) = parse(Path::new("j"), &bytes).expect("parse");
        assert_eq!(records, vec![b"one".to_vec(), Vec::new(), b"three".to_vec()]);
        assert_eq!(len, bytes.len() as u64);
    }

    #[test]
    fn torn_tails_are_dropped() {
        let whole = framed(&[b"one", b"two"]);
        let first = framed(&[b"one"]).len() as u64;
        for cut in 1..(whole.len() - first as usize) {
            let bytes = &whole[..whole.len() - cut];
            let (records, len) = parse(Path::new("j"), bytes).expect("torn tail is not corruption");
            assert_eq!(records, vec![b"one".to_vec()], "cut {cut}");
            assert_eq!(len, first);
        }
        // A last record whose payload is garbage (written length, lost data).
        let mut bad = whole.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        let (records, len) = parse(Path::new("j"), &bad).expect("torn tail");
        assert_eq!((records.len(), len), (1, first));
    }

    #[test]
    fn corrupt_middle_names_the_offset() {
        let mut bytes = framed(&[b"one", b"two", b"three"]);
        let second = framed(&[b"one"]).len();
        bytes[second + HEADER] ^= 0xff;
        match parse(Path::new("j"), &bytes) {
            Err(JournalError::Corrupt { offset, .. }) => assert_eq!(offset, second as u64),
            other => panic!("expected corruption, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn appends_survive_reopen_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("federation.journal");
        let mut opened = Journal::open(&path).expect("open");
        assert!(opened.records.is_empty());
        opened
            .journal
            .append(&[b"a".to_vec(), b"bb".to_vec()])
            .await
            .expect("append");
        drop(opened);
        // A crash in the middle of the next append.
        let mut torn = Vec::new();
        frame(b"never acknowledged", &mut torn);
        torn.truncate(torn.len() - 3);
        let mut f = OpenOptions::new().append(true).open(&path).expect("open raw");
        f.write_all(&torn).expect("write torn");
        drop(f);
        let mut opened = Journal::open(&path).expect("reopen");
        assert_eq!(opened.records, vec![b"a".to_vec(), b"bb".to_vec()]);
        assert_eq!(opened.dropped_tail, torn.len() as u64);
        opened
            .journal
            .append(&[b"c".to_vec()])
            .await
            .expect("append after cut");
        drop(opened);
        let opened = Journal::open(&path).expect("reopen again");
        assert_eq!(opened.records, vec![b"a".to_vec(), b"bb".to_vec(), b"c".to_vec()]);
        assert_eq!(opened.dropped_tail, 0);
    }
}
