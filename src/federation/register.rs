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

use super::log::{AnyLog, EventLog};
use super::{Event, EventKind, REGISTER_QUARANTINE_DAYS, REGISTER_SOURCE};
use crate::domain::{Date, PhoneNumber};
use crate::store::{DeltaWrite, Records, SnapshotWrite, Store, StoreError};

/// Numbers looked up per call while diffing.
const LOOKUP_CHUNK: usize = 10_000;

/// Events appended per call.
const APPEND_CHUNK: usize = 10_000;

/// A store that appends the register's events to `log` (see the
/// [module documentation](self)).
#[derive(Clone)]
pub struct EventingStore<S> {
    inner: S,
    log: AnyLog,
}

impl<S: Store> EventingStore<S> {
    /// `inner`, appending to `log`.
    pub fn new(inner: S, log: AnyLog) -> Self {
        Self { inner, log }
    }

    /// The store underneath.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Positions in `records` whose date is new or later than the store's.
    async fn changed(&self, records: &Records) -> Result<Vec<usize>, StoreError> {
        let mut changed = Vec::new();
        let numbers: Vec<PhoneNumber> = records.iter().map(|(n, _)| n).collect();
        for (c, chunk) in numbers.chunks(LOOKUP_CHUNK).enumerate() {
            let found = self.inner.lookup_many(chunk).await?.found;
            for (i, before) in found.into_iter().enumerate() {
                let at = c * LOOKUP_CHUNK + i;
                let date = Date::from_days(i32::from(records.day(at)));
                if before.is_none_or(|b| date > b) {
                    changed.push(at);
                }
            }
        }
        Ok(changed)
    }

    /// Appends the events of `changed` records of `sequence`; failures are
    /// logged, not returned (the import stands).
    async fn append(&self, sequence: u64, records: &Records, changed: &[usize]) {
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
                return;
            }
            appended += events.len();
        }
        tracing::info!(
            sequence,
            events = appended,
            "register events appended to the federation log"
        );
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
        let changed = self.changed(records).await?;
        self.inner.apply_delta(delta, records).await?;
        self.append(delta.sequence, records, &changed).await;
        Ok(())
    }
}
