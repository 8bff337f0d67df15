//! The national register as a source of events: a store wrapper
//! ([`EventingStore`]) that, around each snapshot or delta it applies,
//! appends an event to the log for every record that adds or moves a
//! disconnect, so watchers hear of the register's disconnects as of
//! operators'.
//!
//! - **Delta**: before applying, the delta's numbers are looked up; each
//!   record whose date is new (no record) or later than the stored one
//!   becomes an event.
//! - **Snapshot**: diffed against the previous generation the same way
//!   (every record looked up before the switch); a number whose date is
//!   unchanged or earlier produces nothing, nor does a number the snapshot
//!   drops. The **first** snapshot (no previous generation) produces no
//!   events: it is the baseline, which a platform checks with
//!   CheckNumber / BatchCheckNumbers when it starts watching.
//!
//! Event ids are `register:<sequence>:<record's position in the file's
//! sorted records>`, so re-applying the same file after a crash repeats the
//! same ids (at-least-once). The events are appended after the store
//! write succeeded; if the log refuses them (e.g. Redis not durable) the
//! import still stands and a warning says how many events were not
//! appended (the register's files remain the record).
//!
//! # A store rebuilt at every start (the embedded store)
//! Redis keeps the mirror, so each file is applied, and diffed, once. The
//! embedded store is rebuilt from its directory at every start, so it needs
//! to know which files already had their events: its [`RegisterMark`]
//! (the file [`MARK_FILE`] beside the journal) holds the last sequence
//! whose events are durable in the log. A file at or below the mark is
//! applied without a diff and without events ([`EventingStore::is_quiet`]);
//! the loader applies those straight to the store (the common restart reads
//! every file once, as before) and only the files above the mark through
//! the [`EventingStore`], so that:
//!
//! - a delta that arrived while the server was down is diffed at start
//!   against the generation before it, as the re-sync would have;
//! - a snapshot that arrived while it was down is diffed against the
//!   generation of the mark, rebuilt from the files up to the mark first
//!   (the one case that reads the register twice);
//! - nothing already in the journal is appended again: the mark moves only
//!   after a file's events are durable, and if a crash falls between the
//!   two, the journal's last register event `register:<S>:<A>` says how far
//!   the file got (events up to it are not appended again).
//!
//! Without a mark (the first start, or a directory from before marks) what
//! the start loads is the baseline: no events, and the mark is set to it.
//! If the files up to the mark can no longer all be applied (removed or
//! damaged since), a snapshot above it is diffed against the generation
//! they still reach: a disconnect whose event is in the journal already
//! may come again under the snapshot's id (at least once, bounded by what
//! the missing files moved).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::log::{AnyLog, EmbeddedLog, EventLog};
use super::{Event, EventKind, REGISTER_QUARANTINE_DAYS, REGISTER_SOURCE};
use crate::domain::{Date, PhoneNumber};
use crate::store::{DeltaWrite, Records, SnapshotWrite, Store, StoreError};

/// Numbers looked up per call while diffing.
const LOOKUP_CHUNK: usize = 10_000;

/// Events appended per call.
const APPEND_CHUNK: usize = 10_000;

/// The [`RegisterMark`]'s file in the embedded store's data directory.
pub const MARK_FILE: &str = "federation.register-mark";

/// Why a [`RegisterMark`] cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum MarkError {
    /// The mark file cannot be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The mark file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The mark file does not hold a sequence.
    #[error(
        "{} does not hold a register sequence ({text:?}); refusing to start (remove it to take the register loaded at the next start as the new baseline: files above the lost mark would then produce no events)",
        path.display()
    )]
    Corrupt {
        /// The mark file.
        path: PathBuf,
        /// What it holds (at most 40 characters).
        text: String,
    },
}

/// Which of the register's files already had their events, for a store
/// rebuilt from its directory at every start (see the
/// [module documentation](self#a-store-rebuilt-at-every-start-the-embedded-store)).
#[derive(Debug)]
pub struct RegisterMark {
    path: PathBuf,
    /// The last sequence whose events are durable; `None`: no mark yet.
    through: Mutex<Option<u64>>,
    /// The journal's last register event `(sequence, position)` when it is
    /// ahead of the mark (a crash between appending and marking).
    resume: Option<(u64, u64)>,
    /// An append failed in this process: the mark stays where it is and
    /// no later file appends, so the next start diffs (and appends) those
    /// files again.
    stuck: AtomicBool,
}

impl RegisterMark {
    /// Reads `dir`'s mark (none yet: [`RegisterMark::through`] is `None`)
    /// and, from `log` (the journal of `dir`, just opened), where the last
    /// register events appended stand.
    pub fn open(dir: &Path, log: &EmbeddedLog) -> Result<Self, MarkError> {
        let path = dir.join(MARK_FILE);
        let through = match std::fs::read_to_string(&path) {
            Ok(text) => Some(text.trim().parse::<u64>().map_err(|_| MarkError::Corrupt {
                text: text.chars().take(40).collect(),
                path: path.clone(),
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => return Err(MarkError::Io { path, source }),
        };
        let last = log.last_of(REGISTER_SOURCE).and_then(|e| parse_id(&e.event_id));
        // Without a mark the directory starts over from a baseline: older
        // events in the journal say nothing about its files.
        let resume = last.filter(|&(sequence, _)| through.is_some_and(|m| sequence > m));
        Ok(Self {
            path,
            through: Mutex::new(through),
            resume,
            stuck: AtomicBool::new(false),
        })
    }

    /// The last sequence whose events are durable in the log (`None`: no
    /// mark yet; the loaded register becomes the baseline).
    pub fn through(&self) -> Option<u64> {
        *self.through.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes the register loaded at a start without a mark the baseline:
    /// sets the mark to `sequence` unless there is one.
    pub async fn baseline(&self, sequence: u64) -> std::io::Result<()> {
        if self.through().is_some() {
            return Ok(());
        }
        self.advance(sequence).await
    }

    /// Records (durably) that the events of every file up to `sequence`
    /// are in the log; never moves back, nor after a failed append.
    async fn advance(&self, sequence: u64) -> std::io::Result<()> {
        if self.stuck.load(Ordering::Acquire) || self.through().is_some_and(|m| m >= sequence) {
            return Ok(());
        }
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || write_durably(&path, &format!("{sequence}\n")))
            .await
            .map_err(std::io::Error::other)??;
        let mut through = self.through.lock().unwrap_or_else(PoisonError::into_inner);
        *through = (*through).max(Some(sequence));
        Ok(())
    }

    /// Positions of `sequence`'s records whose events are in the log
    /// already: all of them, some, or none (`None`).
    fn appended(&self, sequence: u64) -> Option<Appended> {
        let (s, at) = self.resume?;
        match sequence.cmp(&s) {
            std::cmp::Ordering::Less => Some(Appended::All),
            std::cmp::Ordering::Equal => Some(Appended::Through(at)),
            std::cmp::Ordering::Greater => None,
        }
    }
}

/// The events of one file already in the log (see [`RegisterMark::appended`]).
enum Appended {
    All,
    /// Those of the records at or before this position.
    Through(u64),
}

/// `register:<sequence>:<position>` -> `(sequence, position)`.
fn parse_id(id: &str) -> Option<(u64, u64)> {
    let rest = id.strip_prefix(REGISTER_SOURCE)?.strip_prefix(':')?;
    let (sequence, at) = rest.split_once(':')?;
    Some((sequence.parse().ok()?, at.parse().ok()?))
}

/// Replaces `path` with `text`: a temporary file written and synced, renamed
/// over it, the directory synced.
fn write_durably(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(text.as_bytes())?;
    file.sync_data()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// A store that appends the register's events to `log` (see the
/// [module documentation](self)).
#[derive(Clone)]
pub struct EventingStore<S> {
    inner: S,
    log: AnyLog,
    mark: Option<Arc<RegisterMark>>,
}

impl<S: Store> EventingStore<S> {
    /// `inner`, appending to `log`.
    pub fn new(inner: S, log: AnyLog) -> Self {
        Self {
            inner,
            log,
            mark: None,
        }
    }

    /// Keeps `mark` (a store rebuilt at every start, see the
    /// [module documentation](self#a-store-rebuilt-at-every-start-the-embedded-store)):
    /// files at or below it are applied quietly, and it moves on after the
    /// events of each file above it are durable.
    pub fn with_mark(mut self, mark: Arc<RegisterMark>) -> Self {
        self.mark = Some(mark);
        self
    }

    /// The store underneath.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// True if the file of `sequence` had its events already (at or below
    /// the mark): it is applied without a diff and without events.
    pub fn is_quiet(&self, sequence: u64) -> bool {
        self.mark
            .as_ref()
            .and_then(|m| m.through())
            .is_some_and(|m| sequence <= m)
    }

    /// Positions in `records` whose date is new or later than the store's.
    async fn changed(&self, records: &Records) -> Result<Vec<usize>, StoreError> {
        let mut changed = Vec::new();
        let mut chunk = Vec::with_capacity(LOOKUP_CHUNK.min(records.len()));
        let mut numbers = records.iter().map(|(n, _)| n).peekable();
        let mut at = 0;
        while numbers.peek().is_some() {
            chunk.clear();
            chunk.extend(numbers.by_ref().take(LOOKUP_CHUNK));
            let found = self.inner.lookup_many(&chunk).await?.found;
            for before in found {
                let date = Date::from_days(i32::from(records.day(at)));
                if before.is_none_or(|b| date > b) {
                    changed.push(at);
                }
                at += 1;
            }
        }
        Ok(changed)
    }

    /// Appends the events of `changed` records of `sequence` (but those
    /// the log has already, see [`RegisterMark`]), then moves the mark;
    /// failures are logged, not returned (the import stands).
    async fn append(&self, sequence: u64, records: &Records, changed: &[usize]) {
        if let Some(mark) = &self.mark
            && mark.stuck.load(Ordering::Acquire)
        {
            // The journal's register events stay a prefix of the files'
            // (what the next start resumes from): none after a gap.
            tracing::warn!(
                sequence,
                not_appended = changed.len(),
                "register events not appended since an earlier append failed; the next start appends them"
            );
            return;
        }
        let changed = match self.mark.as_ref().and_then(|m| m.appended(sequence)) {
            None => changed,
            Some(Appended::All) => &[],
            Some(Appended::Through(at)) => {
                let after = changed.partition_point(|&p| p as u64 <= at);
                &changed[after..]
            }
        };
        let now = super::Federation::now_ms();
        let quarantine = i32::try_from(REGISTER_QUARANTINE_DAYS).unwrap_or(i32::MAX);
        let mut appended = 0usize;
        for chunk in changed.chunks(APPEND_CHUNK) {
            let events: Vec<Event> = chunk
                .iter()
                .filter_map(|&at| {
                    let number = PhoneNumber::from_value(records.number(at))?;
                    let date = Date::from_days(i32::from(records.day(at)));
                    Some(Event {
                        event_id: format!("{REGISTER_SOURCE}:{sequence}:{at}"),
                        number,
                        disconnect_date: date,
                        earliest_reissue_date: date.add_days(quarantine),
                        source: REGISTER_SOURCE.to_owned(),
                        kind: EventKind::Disconnected,
                        accepted_unix_ms: now,
                    })
                })
                .collect();
            if let Err(e) = self.log.append(&events).await {
                tracing::warn!(
                    error = %e,
                    sequence,
                    appended,
                    not_appended = changed.len() - appended,
                    "register events not appended to the federation log; watchers will not hear of these disconnects"
                );
                if let Some(mark) = &self.mark {
                    mark.stuck.store(true, Ordering::Release);
                }
                return;
            }
            appended += events.len();
        }
        tracing::info!(
            sequence,
            events = appended,
            "register events appended to the federation log"
        );
        if let Some(mark) = &self.mark
            && let Err(e) = mark.advance(sequence).await
        {
            // The next start diffs this file again; the journal's last
            // register event keeps it from appending them twice.
            tracing::warn!(error = %e, sequence, "register events: cannot move the mark");
        }
    }
}

impl<S: Store> Store for EventingStore<S> {
    crate::store::pass_through!(Self::inner => answers, rest);

    async fn apply_snapshot(
        &self,
        snapshot: &SnapshotWrite,
        records: &Records,
        expected_previous: Option<u64>,
    ) -> Result<(), StoreError> {
        if self.is_quiet(snapshot.sequence) {
            return self
                .inner
                .apply_snapshot(snapshot, records, expected_previous)
                .await;
        }
        let previous = self.inner.refresh_meta().await?;
        let changed = match previous {
            Some(_) => self.changed(records).await?,
            None => Vec::new(),
        };
        self.inner
            .apply_snapshot(snapshot, records, expected_previous)
            .await?;
        self.append(snapshot.sequence, records, &changed).await;
        Ok(())
    }

    async fn apply_delta(&self, delta: &DeltaWrite, records: &Records) -> Result<(), StoreError> {
        if self.is_quiet(delta.sequence) {
            return self.inner.apply_delta(delta, records).await;
        }
        let changed = self.changed(records).await?;
        self.inner.apply_delta(delta, records).await?;
        self.append(delta.sequence, records, &changed).await;
        Ok(())
    }
}
