//! The in-process overlay of operators' disconnects: number -> the
//! publications in force for it (source, event id, disconnect date). A
//! lookup's answer takes the latest of the store's date and the overlay's
//! ([`OverlayStore`]): a known disconnect always wins, whatever its source,
//! and a retraction removes only its own entry, so the answer falls back
//! to what the other sources say.
//!
//! Every server keeps its own overlay and follows the event log
//! ([`follow_from`]): at start it notes each shard's last position, loads the
//! publications in force from their durable records
//! ([`EventLog::active`]), then applies every entry after the noted
//! positions as it arrives (a blocking read per shard). Applying an event
//! twice changes nothing, so the overlap between the records and the
//! followed entries is harmless. The server that accepted a publication
//! applies it at once as well.
//!
//! Fail closed: until the overlay has loaded the publications in force,
//! and while reading any shard of the log fails, a lookup cannot prove
//! that no publication names the number, so [`OverlayStore`] answers
//! `StoreError::Unavailable` (UNAVAILABLE), never the store's answer alone.
//!
//! The hot path stays cheap: a ready, empty overlay costs two atomic loads
//! per lookup; otherwise one read lock of one of [`LOCK_SHARDS`] maps.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use super::log::{AnyLog, EventLog, Position};
use super::{Event, EventKind, REGISTER_SOURCE};
use crate::domain::{Date, PhoneNumber};
use crate::store::{Lookup, Store, StoreError};

/// Maps the overlay is split into (by number), so writers and readers of
/// different numbers never meet on a lock.
pub const LOCK_SHARDS: usize = 64;

/// Entries read from the log per call while following it.
const FOLLOW_BATCH: usize = 1024;

/// How long one blocking read of the log waits.
const FOLLOW_WAIT: Duration = Duration::from_secs(1);

/// Pause after a failed read of the log before the next.
const FOLLOW_RETRY: Duration = Duration::from_millis(500);

/// One lock shard of the overlay: number -> its publications in force.
type NumberMap = RwLock<HashMap<u64, Vec<Entry>>>;

#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    source: Arc<str>,
    event_id: Box<str>,
    date: Date,
}

/// What the overlay knows of one source.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceStats {
    /// Publications in force (not retracted).
    pub in_force: u64,
    /// When its last event (publication or retraction) was accepted, Unix
    /// milliseconds; `None` if none seen.
    pub last_event_ms: Option<i64>,
}

/// The overlay (see the [module documentation](self)).
#[derive(Debug)]
pub struct Overlay {
    maps: Box<[NumberMap]>,
    /// Numbers with at least one entry.
    numbers: AtomicUsize,
    /// True once the publications in force are loaded ([`follow_from`]).
    loaded: AtomicBool,
    /// Shards of the log whose last read failed.
    failing: AtomicUsize,
    sources: Mutex<HashMap<Arc<str>, SourceStats>>,
}

impl Default for Overlay {
    fn default() -> Self {
        Self {
            maps: (0..LOCK_SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            numbers: AtomicUsize::new(0),
            loaded: AtomicBool::new(false),
            failing: AtomicUsize::new(0),
            sources: Mutex::new(HashMap::new()),
        }
    }
}

impl Overlay {
    /// An empty overlay.
    pub fn new() -> Self {
        Self::default()
    }

    fn map(&self, number: PhoneNumber) -> &NumberMap {
        // Numbers are dense in their low digits: spread by a multiplicative hash.
        let h = number.value().wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58;
        &self.maps[(h as usize) % LOCK_SHARDS]
    }

    /// Why the overlay cannot vouch for an answer right now (not loaded
    /// yet, or a shard of the log cannot be read); `None` when it can.
    pub fn unready_reason(&self) -> Option<&'static str> {
        if !self.loaded.load(Ordering::Acquire) {
            Some("the federation overlay is not loaded yet")
        } else if self.failing.load(Ordering::Acquire) > 0 {
            Some("the federation event log cannot be read")
        } else {
            None
        }
    }

    /// Marks the publications in force as loaded (see [`follow_from`]).
    pub fn mark_loaded(&self) {
        self.loaded.store(true, Ordering::Release);
    }

    /// Notes whether one follower's last read of the log failed; `failing`
    /// is that follower's own state, kept in step.
    fn note_read(&self, failing: &mut bool, failed: bool) {
        if failed != *failing {
            *failing = failed;
            if failed {
                self.failing.fetch_add(1, Ordering::AcqRel);
            } else {
                self.failing.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    /// True while no number has an entry (the lookup fast path).
    pub fn is_empty(&self) -> bool {
        self.numbers.load(Ordering::Acquire) == 0
    }

    /// Numbers with at least one publication in force.
    pub fn len(&self) -> usize {
        self.numbers.load(Ordering::Acquire)
    }

    /// The latest disconnect date in force for `number`.
    pub fn date_of(&self, number: PhoneNumber) -> Option<Date> {
        if self.is_empty() {
            return None;
        }
        let map = self.map(number).read().unwrap_or_else(PoisonError::into_inner);
        map.get(&number.value())?.iter().map(|e| e.date).max()
    }

    /// Applies one event (idempotent): a publication adds its entry, a
    /// retraction removes it. The register's events are ignored (the
    /// store holds the register).
    pub fn apply(&self, event: &Event) {
        if event.source == REGISTER_SOURCE {
            return;
        }
        let changed = {
            let mut map = self
                .map(event.number)
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            let key = event.number.value();
            let found = map.get(&key).and_then(|v| {
                v.iter()
                    .position(|e| *e.source == *event.source && *e.event_id == *event.event_id)
            });
            match (event.kind, found) {
                (EventKind::Disconnected, None) => {
                    let entries = map.entry(key).or_default();
                    if entries.is_empty() {
                        self.numbers.fetch_add(1, Ordering::AcqRel);
                    }
                    entries.push(Entry {
                        source: event.source.as_str().into(),
                        event_id: event.event_id.as_str().into(),
                        date: event.disconnect_date,
                    });
                    Some(1i64)
                }
                (EventKind::Retracted, Some(at)) => {
                    if let Some(entries) = map.get_mut(&key) {
                        entries.swap_remove(at);
                        if entries.is_empty() {
                            map.remove(&key);
                            self.numbers.fetch_sub(1, Ordering::AcqRel);
                        }
                    }
                    Some(-1)
                }
                _ => None,
            }
        };
        let mut sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        let stats = match sources.get_mut(event.source.as_str()) {
            Some(s) => s,
            None => sources.entry(event.source.as_str().into()).or_default(),
        };
        stats.last_event_ms = stats.last_event_ms.max(Some(event.accepted_unix_ms));
        match changed {
            Some(1) => stats.in_force += 1,
            Some(_) => stats.in_force = stats.in_force.saturating_sub(1),
            None => {}
        }
    }

    /// What is known of `source`.
    pub fn source_stats(&self, source: &str) -> SourceStats {
        self.sources
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(source)
            .cloned()
            .unwrap_or_default()
    }
}

/// Loads the publications in force into `overlay` once (the server does
/// it before it listens, so its first answers need not wait), returning
/// the positions to follow from; on error the overlay stays unloaded and
/// [`follow_from`] retries.
pub async fn load(log: &AnyLog, overlay: &Overlay) -> Result<Vec<Option<Position>>, super::LogError> {
    let positions = start_positions(log, overlay).await?;
    overlay.mark_loaded();
    Ok(positions)
}

/// Keeps `overlay` in step with `log` until `stop` turns true (see the
/// module documentation), from `loaded` (the positions [`load`]
/// returned) if given, else loading first. Errors are logged (rate-limited) and retried.
pub async fn follow_from(
    log: AnyLog,
    overlay: Arc<Overlay>,
    loaded: Option<Vec<Option<Position>>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let start = async {
        if let Some(positions) = loaded {
            return positions;
        }
        loop {
            match start_positions(&log, &overlay).await {
                Ok(p) => return p,
                Err(e) => {
                    if let Some(suppressed) = crate::lograte::global().check("overlay_start") {
                        tracing::warn!(error = %e, suppressed, "cannot load the federation overlay yet; retrying");
                    }
                    tokio::time::sleep(FOLLOW_RETRY).await;
                }
            }
        }
    };
    let positions = tokio::select! {
        p = start => p,
        _ = stop.wait_for(|s| *s) => return,
    };
    overlay.mark_loaded();
    tracing::info!(
        numbers = overlay.len(),
        "federation overlay loaded; following the event log"
    );
    let followers = positions.into_iter().enumerate().map(|(shard, at)| {
        let log = log.clone();
        let overlay = Arc::clone(&overlay);
        // Shards fit a u16 (the log says how many).
        let shard = u16::try_from(shard).unwrap_or(u16::MAX);
        async move {
            let mut at = at;
            let mut failing = false;
            loop {
                let read = log.read_after(shard, at, FOLLOW_BATCH, FOLLOW_WAIT).await;
                overlay.note_read(&mut failing, read.is_err());
                match read {
                    Ok(entries) => {
                        for (p, e) in &entries {
                            overlay.apply(e);
                            at = Some(*p);
                        }
                    }
                    Err(e) => {
                        if let Some(suppressed) = crate::lograte::global().check("overlay_follow") {
                            tracing::warn!(error = %e, shard, suppressed, "cannot read the event log; retrying");
                        }
                        tokio::time::sleep(FOLLOW_RETRY).await;
                    }
                }
            }
        }
    });
    tokio::select! {
        _ = futures_util::future::join_all(followers) => {}
        _ = stop.wait_for(|s| *s) => {}
    }
}

/// Notes each shard's last position, then loads the publications in force.
async fn start_positions(log: &AnyLog, overlay: &Overlay) -> Result<Vec<Option<Position>>, super::LogError> {
    let mut positions = Vec::with_capacity(usize::from(log.shards()));
    for shard in 0..log.shards() {
        positions.push(log.last_position(shard).await?);
    }
    for event in log.active().await? {
        overlay.apply(&event);
    }
    Ok(positions)
}

/// A store whose answers include the overlay's disconnects (see the
/// [module documentation](self)).
#[derive(Clone)]
pub struct OverlayStore<S> {
    inner: S,
    overlay: Arc<Overlay>,
}

impl<S> OverlayStore<S> {
    /// `inner`'s answers combined with `overlay`'s.
    pub fn new(inner: S, overlay: Arc<Overlay>) -> Self {
        Self { inner, overlay }
    }

    /// The store underneath.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Fails closed while the overlay cannot vouch for an answer.
    fn ready(&self) -> Result<(), StoreError> {
        match self.overlay.unready_reason() {
            None => Ok(()),
            Some(reason) => Err(StoreError::Unavailable(reason.into())),
        }
    }
}

fn latest(a: Option<Date>, b: Option<Date>) -> Option<Date> {
    a.max(b)
}

impl<S: Store> Store for OverlayStore<S> {
    fn lookup_now(&self, number: PhoneNumber) -> Option<Result<Lookup<Option<Date>>, StoreError>> {
        if let Err(unready) = self.ready() {
            return Some(Err(unready));
        }
        let mut found = match self.inner.lookup_now(number)? {
            Ok(found) => found,
            Err(e) => return Some(Err(e)),
        };
        if !self.overlay.is_empty() {
            found.found = latest(found.found, self.overlay.date_of(number));
        }
        Some(Ok(found))
    }

    crate::store::pass_through!(Self::inner => writes, rest);

    async fn lookup(&self, number: PhoneNumber) -> Result<Lookup<Option<Date>>, StoreError> {
        self.ready()?;
        let mut found = self.inner.lookup(number).await?;
        if !self.overlay.is_empty() {
            found.found = latest(found.found, self.overlay.date_of(number));
        }
        Ok(found)
    }

    async fn lookup_many(&self, numbers: &[PhoneNumber]) -> Result<Lookup<Vec<Option<Date>>>, StoreError> {
        self.ready()?;
        let mut found = self.inner.lookup_many(numbers).await?;
        if !self.overlay.is_empty() {
            for (date, number) in found.found.iter_mut().zip(numbers) {
                *date = latest(*date, self.overlay.date_of(*number));
            }
        }
        Ok(found)
    }

    fn unsafe_reason(&self) -> Option<String> {
        self.inner
            .unsafe_reason()
            .or_else(|| self.overlay.unready_reason().map(str::to_owned))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(source: &str, id: &str, date: i32, kind: EventKind) -> Event {
        Event {
            event_id: id.into(),
            number: PhoneNumber::parse("+12015550123").expect("n"),
            disconnect_date: Date::from_days(date),
            earliest_reissue_date: Date::from_days(date + 90),
            source: source.into(),
            kind,
            accepted_unix_ms: 1000,
        }
    }

    #[tokio::test]
    async fn lookups_fail_closed_until_loaded_and_while_the_log_cannot_be_read() {
        let overlay = Arc::new(Overlay::new());
        let store = OverlayStore::new(Arc::new(crate::store::EmbeddedStore::new()), overlay.clone());
        let n = PhoneNumber::parse("+12015550123").expect("n");
        let unavailable = |r: Result<(), StoreError>| matches!(r, Err(StoreError::Unavailable(_)));
        assert!(
            unavailable(store.lookup(n).await.map(drop)),
            "not loaded: no answer"
        );
        assert!(unavailable(store.lookup_many(&[n]).await.map(drop)));
        let now = |store: &OverlayStore<Arc<crate::store::EmbeddedStore>>| {
            store
                .lookup_now(n)
                .expect("the embedded store answers in process")
                .map(drop)
        };
        assert!(
            unavailable(now(&store)),
            "not loaded: no in-process answer either"
        );
        overlay.mark_loaded();
        assert!(store.lookup(n).await.is_ok());
        assert!(now(&store).is_ok());
        let (mut a, mut b) = (false, false);
        overlay.note_read(&mut a, true);
        overlay.note_read(&mut b, true);
        overlay.note_read(&mut a, false);
        assert!(
            unavailable(store.lookup(n).await.map(drop)),
            "one shard still failing"
        );
        assert!(unavailable(store.lookup_many(&[n]).await.map(drop)));
        assert!(unavailable(now(&store)));
        overlay.note_read(&mut b, false);
        overlay.note_read(&mut b, false);
        assert!(store.lookup_many(&[n]).await.is_ok());
        assert_eq!(overlay.unready_reason(), None);
    }

    #[test]
    fn latest_in_force_wins_and_retraction_falls_back() {
        let o = Overlay::new();
        let n = PhoneNumber::parse("+12015550123").expect("n");
        assert!(o.is_empty() && o.date_of(n).is_none());
        o.apply(&ev("op-a", "1", 100, EventKind::Disconnected));
        o.apply(&ev("op-b", "1", 200, EventKind::Disconnected));
        o.apply(&ev("op-b", "1", 200, EventKind::Disconnected)); // twice: no change
        o.apply(&ev(REGISTER_SOURCE, "r", 300, EventKind::Disconnected)); // ignored
        assert_eq!(o.date_of(n), Some(Date::from_days(200)));
        assert_eq!(o.source_stats("op-b").in_force, 1);
        o.apply(&ev("op-b", "1", 200, EventKind::Retracted));
        o.apply(&ev("op-b", "1", 200, EventKind::Retracted));
        assert_eq!(o.date_of(n), Some(Date::from_days(100)));
        assert_eq!(o.source_stats("op-b").in_force, 0);
        assert_eq!(o.source_stats("op-b").last_event_ms, Some(1000));
        o.apply(&ev("op-a", "1", 100, EventKind::Retracted));
        assert!(o.is_empty() && o.date_of(n).is_none());
    }
}
