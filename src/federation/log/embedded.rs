//! The embedded store's event log: the journal `federation.journal` (see
//! [`crate::federation::journal`]) in the store's data directory, one
//! record per event (JSON of the stored fields, see `Wire` in the parent
//! module), and the events in memory with their positions.
//!
//! One shard; an event's position is `0-n`, `n` its record's ordinal in
//! the journal (1-based), so positions survive restarts. Publication
//! records (idempotency, retraction) are rebuilt by replaying the journal
//! at start. Retention ([`EventLog::trim`]) drops events from memory only:
//! the journal keeps them (they are replayed and trimmed again at the next
//! start), since it also is the record of every publication.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use super::{EventLog, LogError, Position, Published, Retraction, Wire};
use crate::federation::journal::Journal;
use crate::federation::{Event, EventKind, REGISTER_SOURCE};

/// The journal's file name in the data directory.
pub const JOURNAL_FILE: &str = "federation.journal";

/// What is known of one publication.
#[derive(Clone, Debug)]
struct Publication {
    event: Event,
    retracted: bool,
}

#[derive(Default)]
struct Memory {
    /// Events held (after retention), oldest first.
    events: VecDeque<(Position, Event)>,
    /// By (source, event id).
    publications: HashMap<(String, String), Publication>,
    /// The ordinal of the last record.
    last: u64,
}

impl Memory {
    /// Applies one event to the publication records.
    fn record(&mut self, event: &Event) {
        if event.source == REGISTER_SOURCE {
            return;
        }
        let key = (event.source.clone(), event.event_id.clone());
        match event.kind {
            EventKind::Disconnected => {
                self.publications.entry(key).or_insert_with(|| Publication {
                    event: event.clone(),
                    retracted: false,
                });
            }
            EventKind::Retracted => {
                if let Some(p) = self.publications.get_mut(&key) {
                    p.retracted = true;
                }
            }
        }
    }

    fn push(&mut self, event: Event) -> Position {
        self.last += 1;
        let at = Position::new(0, self.last);
        self.record(&event);
        self.events.push_back((at, event));
        at
    }
}

/// The embedded event log (see the [module documentation](self)).
pub struct EmbeddedLog {
    /// Serialises writers: check, write, fsync, then publish to memory.
    journal: tokio::sync::Mutex<Journal>,
    memory: Mutex<Memory>,
    /// The ordinal of the last record in memory: wakes waiting readers.
    tip: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for EmbeddedLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedLog").finish_non_exhaustive()
    }
}

impl EmbeddedLog {
    /// Opens (or creates) `dir/federation.journal` and replays it; a torn
    /// last record is dropped with a warning, a damaged one in the middle
    /// refuses to open with its offset.
    pub fn open(dir: &Path) -> Result<Self, LogError> {
        let opened = Journal::open(&dir.join(JOURNAL_FILE))?;
        let mut memory = Memory::default();
        for (i, record) in opened.records.iter().enumerate() {
            let wire: Wire = serde_json::from_slice(record).map_err(|e| {
                LogError::Corrupt(format!("{JOURNAL_FILE}: record {} is not an event: {e}", i + 1))
            })?;
            memory.push(wire.event()?);
        }
        let (tip, _) = tokio::sync::watch::channel(memory.last);
        tracing::info!(events = memory.last, "federation journal replayed");
        Ok(Self {
            journal: tokio::sync::Mutex::new(opened.journal),
            memory: Mutex::new(memory),
            tip,
        })
    }

    /// The log of `dir` this process has open, or [`EmbeddedLog::open`]
    /// if none: the server and the embedded store's register re-sync append
    /// to one log, and two logs on one journal would each number the
    /// records on their own. Kept while someone holds it; the next call
    /// after the last holder let go opens (and replays) the journal again.
    pub fn shared(dir: &Path) -> Result<Arc<Self>, LogError> {
        static OPEN: Mutex<Vec<(PathBuf, Weak<EmbeddedLog>)>> = Mutex::new(Vec::new());
        let key = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
        // Held while opening, so two callers cannot both open the journal.
        let mut open = OPEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        open.retain(|(_, log)| log.strong_count() > 0);
        if let Some(log) = open
            .iter()
            .find(|(path, _)| *path == key)
            .and_then(|(_, log)| log.upgrade())
        {
            return Ok(log);
        }
        let log = Arc::new(Self::open(dir)?);
        open.push((key, Arc::downgrade(&log)));
        Ok(log)
    }

    /// The newest event of `source` held in memory (every record of the
    /// journal right after [`EmbeddedLog::open`]; retention drops the
    /// older ones later).
    pub fn last_of(&self, source: &str) -> Option<Event> {
        self.memory()
            .events
            .iter()
            .rev()
            .find(|(_, e)| e.source == source)
            .map(|(_, e)| e.clone())
    }

    fn memory(&self) -> std::sync::MutexGuard<'_, Memory> {
        // A panic while holding it leaves plain data: keep using it.
        self.memory
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes `events` durably, then makes them visible; their positions.
    async fn write(&self, journal: &mut Journal, events: Vec<Event>) -> Result<Vec<Position>, LogError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let records = events
            .iter()
            .map(|e| serde_json::to_vec(&Wire::of(e)).map_err(|e| LogError::Corrupt(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        journal.append(&records).await?;
        let (positions, last) = {
            let mut memory = self.memory();
            let positions: Vec<Position> = events.into_iter().map(|e| memory.push(e)).collect();
            (positions, memory.last)
        };
        self.tip.send_replace(last);
        Ok(positions)
    }
}

impl EventLog for EmbeddedLog {
    fn shards(&self) -> u16 {
        1
    }

    fn shard(&self, _source: &str, _event_id: &str) -> u16 {
        0
    }

    async fn publish(&self, events: &[Event]) -> Result<Vec<Published>, LogError> {
        let mut journal = self.journal.lock().await;
        let mut outcomes = Vec::with_capacity(events.len());
        let mut new = Vec::new();
        {
            let memory = self.memory();
            let mut seen: HashMap<(&str, &str), &Event> = HashMap::new();
            for event in events {
                let key = (event.source.clone(), event.event_id.clone());
                let before = memory.publications.get(&key).map(|p| &p.event).or_else(|| {
                    seen.get(&(event.source.as_str(), event.event_id.as_str()))
                        .copied()
                });
                outcomes.push(match before {
                    Some(b) if same_content(b, event) => Some(Published::Duplicate),
                    Some(_) => Some(Published::Conflict),
                    None => {
                        seen.insert((&event.source, &event.event_id), event);
                        new.push(event.clone());
                        None
                    }
                });
            }
        }
        let mut positions = self.write(&mut journal, new).await?.into_iter();
        Ok(outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Published::Accepted(0, positions.next().unwrap_or(Position::ZERO))))
            .collect())
    }

    async fn retract(
        &self,
        source: &str,
        event_id: &str,
        accepted_unix_ms: i64,
    ) -> Result<Retraction, LogError> {
        let mut journal = self.journal.lock().await;
        let found = self
            .memory()
            .publications
            .get(&(source.to_owned(), event_id.to_owned()))
            .cloned();
        let Some(publication) = found else {
            return Ok(Retraction::NotFound);
        };
        let retraction = Event {
            kind: EventKind::Retracted,
            accepted_unix_ms,
            ..publication.event
        };
        if publication.retracted {
            return Ok(Retraction::AlreadyRetracted(retraction));
        }
        let at = self.write(&mut journal, vec![retraction.clone()]).await?;
        Ok(Retraction::Retracted(
            retraction,
            0,
            at.first().copied().unwrap_or(Position::ZERO),
        ))
    }

    async fn append(&self, events: &[Event]) -> Result<Vec<(u16, Position)>, LogError> {
        let mut journal = self.journal.lock().await;
        let positions = self.write(&mut journal, events.to_vec()).await?;
        Ok(positions.into_iter().map(|p| (0, p)).collect())
    }

    async fn read_after(
        &self,
        shard: u16,
        after: Option<Position>,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<(Position, Event)>, LogError> {
        if shard != 0 || max == 0 {
            return Ok(Vec::new());
        }
        let after = after.unwrap_or(Position::ZERO);
        let mut tip = self.tip.subscribe();
        let deadline = tokio::time::Instant::now() + wait.min(super::MAX_WAIT);
        loop {
            {
                let memory = self.memory();
                // Positions are `0-n` with n increasing by one: find the
                // first held after `after` by arithmetic.
                let first = memory.events.front().map_or(1, |(p, _)| p.seq());
                let skip = after.seq().saturating_add(1).saturating_sub(first);
                let found: Vec<(Position, Event)> = memory
                    .events
                    .iter()
                    .skip(usize::try_from(skip).unwrap_or(usize::MAX))
                    .take(max)
                    .cloned()
                    .collect();
                if !found.is_empty() {
                    return Ok(found);
                }
                tip.mark_unchanged();
            }
            if tokio::time::timeout_at(deadline, tip.changed()).await.is_err() {
                return Ok(Vec::new());
            }
        }
    }

    async fn first_position(&self, shard: u16) -> Result<Option<Position>, LogError> {
        Ok((shard == 0)
            .then(|| self.memory().events.front().map(|(p, _)| *p))
            .flatten())
    }

    async fn last_position(&self, shard: u16) -> Result<Option<Position>, LogError> {
        Ok((shard == 0)
            .then(|| self.memory().events.back().map(|(p, _)| *p))
            .flatten())
    }

    async fn trim(&self, older_than_unix_ms: i64) -> Result<u64, LogError> {
        let mut memory = self.memory();
        let mut dropped = 0;
        while memory
            .events
            .front()
            .is_some_and(|(_, e)| e.accepted_unix_ms < older_than_unix_ms)
        {
            memory.events.pop_front();
            dropped += 1;
        }
        Ok(dropped)
    }

    async fn active(&self) -> Result<Vec<Event>, LogError> {
        Ok(self
            .memory()
            .publications
            .values()
            .filter(|p| !p.retracted)
            .map(|p| p.event.clone())
            .collect())
    }
}

/// True if `b` republishes `a` (same number and disconnect date).
pub(super) fn same_content(a: &Event, b: &Event) -> bool {
    a.number == b.number && a.disconnect_date == b.disconnect_date
}
