//! Delivery: the events of the log for the numbers on one platform's watch
//! list, from a cursor on (`WatchDisconnections`, webhooks).
//!
//! # How it works
//! Delivery reads the event log itself (fan-out on read): a [`Feed`]
//! keeps one position per log shard, reads each shard after its position,
//! asks the platform's watch list which of the numbers it watches
//! ([`WatchLists::watching`]) and hands over the matching events, each with
//! the [`Cursor`] just after it. Nothing is stored per platform besides its
//! watch list: the log is the retained, durable delivery record (trimmed by
//! retention), so a server that crashes between acknowledging a
//! publication and delivering it loses nothing, any server can serve any
//! watcher (they all read the same log), and a watcher resumes on whichever
//! server it reconnects to.
//!
//! A feed reads only when its consumer takes what it gave (a bounded batch
//! at a time): a watcher that stops reading stops its feed, and the server
//! holds at most one batch for it. [`Tips`] wakes idle feeds when a shard
//! grows (one follower task per shard and server, whatever the number of
//! watchers).
//!
//! **The recent window.** The followers of [`Tips`] read every new event of
//! their shard anyway; they keep the newest ones ([`RECENT_EVENTS`] in all,
//! shared, contiguous per shard from where the follower started) so that
//! feeds near the end of the log take their batches from memory instead
//! of each reading (and, on Redis, parsing) the same entries again: with
//! `P` watchers a server reads each event once, not `P` times. A feed whose
//! position is outside a shard's window (an old cursor, or ahead of a
//! follower that lags) reads the log itself, as before; after a second
//! with nothing to deliver a feed reads the log itself once too, so a
//! follower that cannot read (Redis failing) delays events by about a
//! second and loses none; a feed that outlives its followers (the server
//! stopping) reads the log itself each second. The log stays the delivery
//! record: the window
//! is a cache of its tail, never written to by anything but the follower
//! reading the log.
//!
//! # Cursors
//! A cursor is the position reached in every shard and the time it was
//! made, encoded as base64url (no padding) of `1 | issued ms | shards |
//! (ms, seq) per shard` (varints). Delivery is at least once: resuming with
//! the cursor of the last event received repeats nothing that came before
//! it and loses nothing after it. A cursor is out of range when it is
//! ahead of the log (not one this log issued), or older than the retention
//! and behind the oldest event still held in some shard (events it would
//! need may be gone). A cursor younger than the retention is always good:
//! retention trims only events older than it.
//!
//! Order: events of one shard arrive in log order (an event and its
//! retraction share a shard); events of different shards may interleave.

use std::collections::VecDeque;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use tokio::sync::watch;

use super::Event;
use super::log::{AnyLog, EventLog, LogError, Position};
use super::watch::WatchLists;

/// Events read from one shard at a time.
const BATCH: usize = 256;

/// The longest a cursor's text may be.
pub const MAX_CURSOR_CHARS: usize = 1024;

/// How long an idle feed waits for [`Tips`] before it looks again anyway.
const IDLE_WAIT: Duration = Duration::from_secs(1);

/// Events the [`Tips`] followers of one server keep for the feeds, all
/// shards together (each shard keeps its share, at least `BATCH` x 4).
pub const RECENT_EVENTS: usize = 131_072;

/// Counters of delivery, for metrics.
#[derive(Debug, Default)]
pub struct DeliveryStats {
    /// Events handed to `WatchDisconnections` streams.
    pub watch_events_sent: AtomicU64,
    /// Webhook events answered 2xx.
    pub webhook_delivered: AtomicU64,
    /// Webhook attempts that failed and were retried.
    pub webhook_retries: AtomicU64,
    /// Webhook events given up after the retry budget.
    pub webhook_dead: AtomicU64,
}

/// A place in the log: one position per shard, and when it was handed out
/// (see the module documentation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    /// Unix milliseconds when the cursor was made.
    issued_ms: u64,
    positions: Vec<Position>,
}

/// Why a cursor cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CursorError {
    /// Not a cursor at all (not base64url, wrong layout).
    #[error("not a cursor of this service: {0}")]
    Malformed(&'static str),
    /// A cursor, but not for this log, or older than retention; the oldest
    /// cursor still held.
    #[error("cursor out of range")]
    OutOfRange(Cursor),
    /// The log failed.
    #[error(transparent)]
    Log(#[from] LogError),
}

impl Cursor {
    /// A cursor at `positions` (one per shard), made at `issued_ms` (Unix
    /// milliseconds).
    pub fn new(issued_ms: u64, positions: Vec<Position>) -> Self {
        Self { issued_ms, positions }
    }

    fn now(positions: Vec<Position>) -> Self {
        Self::new(now_ms(), positions)
    }

    /// The positions, one per shard.
    pub fn positions(&self) -> &[Position] {
        &self.positions
    }

    /// When it was made, Unix milliseconds.
    pub fn issued_ms(&self) -> u64 {
        self.issued_ms
    }

    /// The opaque text form.
    pub fn encode(&self) -> String {
        let mut bytes = vec![1u8];
        varint(self.issued_ms, &mut bytes);
        varint(self.positions.len() as u64, &mut bytes);
        for p in &self.positions {
            varint(p.ms(), &mut bytes);
            varint(p.seq(), &mut bytes);
        }
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Parses the text form, for a log of `shards` shards.
    pub fn decode(text: &str, shards: u16) -> Result<Self, CursorError> {
        if text.len() > MAX_CURSOR_CHARS {
            return Err(CursorError::Malformed("too long"));
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|_| CursorError::Malformed("not base64url"))?;
        let mut at = bytes.as_slice();
        if at.first() != Some(&1) {
            return Err(CursorError::Malformed("unknown version"));
        }
        at = &at[1..];
        let issued_ms = read_varint(&mut at).ok_or(CursorError::Malformed("truncated"))?;
        let n = read_varint(&mut at).ok_or(CursorError::Malformed("truncated"))?;
        if n != u64::from(shards) {
            return Err(CursorError::Malformed("made for another log layout"));
        }
        let mut positions = Vec::with_capacity(usize::from(shards));
        for _ in 0..shards {
            let ms = read_varint(&mut at).ok_or(CursorError::Malformed("truncated"))?;
            let seq = read_varint(&mut at).ok_or(CursorError::Malformed("truncated"))?;
            positions.push(Position::new(ms, seq));
        }
        if !at.is_empty() {
            return Err(CursorError::Malformed("trailing bytes"));
        }
        Ok(Self { issued_ms, positions })
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn read_varint(at: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = at.split_first()?;
        *at = rest;
        v |= u64::from(byte & 0x7f).checked_shl(shift)?;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// The position just before `p` (so that reading after it starts at `p`).
fn before(p: Position) -> Position {
    match (p.ms(), p.seq()) {
        (ms, 0) if ms > 0 => Position::new(ms - 1, u64::MAX),
        (ms, seq) => Position::new(ms, seq.saturating_sub(1)),
    }
}

/// The newest events of one shard as its follower read them: every event
/// after `from` up to the last one held, in log order.
struct Recent {
    /// The position just before the first event held.
    from: Position,
    events: VecDeque<(Position, Arc<Event>)>,
    /// The most events held.
    capacity: usize,
}

impl Recent {
    fn last(&self) -> Position {
        self.events.back().map_or(self.from, |(p, _)| *p)
    }

    /// Appends what the follower read, dropping the oldest beyond capacity.
    fn extend(&mut self, batch: Vec<(Position, Event)>) {
        for (position, event) in batch {
            self.events.push_back((position, Arc::new(event)));
        }
        while self.events.len() > self.capacity {
            if let Some((position, _)) = self.events.pop_front() {
                self.from = position;
            }
        }
    }

    /// Up to `max` events after `after`; `None` when `after` is outside
    /// what is held (before `from`, or after the last event held, where
    /// only the log knows what follows). Empty: `after` is the last held.
    fn after(&self, after: Position, max: usize) -> Option<Vec<(Position, Arc<Event>)>> {
        if after < self.from || after > self.last() {
            return None;
        }
        let start = self.events.partition_point(|(p, _)| *p <= after);
        Some(self.events.range(start..).take(max).cloned().collect())
    }
}

/// Wakes idle feeds when the log grows, and keeps the recent window the
/// feeds read from: one follower task per shard (see [`Tips::start`] and
/// the module documentation).
#[derive(Clone)]
pub struct Tips {
    changed: watch::Receiver<u64>,
    /// Per shard; `None` until its follower knows where it starts.
    recent: Arc<Vec<RwLock<Option<Recent>>>>,
}

impl Tips {
    /// Starts following every shard of `log` from its end; the followers
    /// stop when `stop` turns true (or every [`Tips`] is dropped).
    pub fn start(log: AnyLog, stop: watch::Receiver<bool>) -> Self {
        let per_shard = (RECENT_EVENTS / usize::from(log.shards().max(1))).max(BATCH * 4);
        Self::start_with_capacity(log, stop, per_shard)
    }

    /// As [`Tips::start`], the window holding at most `per_shard` events of
    /// each shard ([`Tips::start`] gives each shard its share of
    /// [`RECENT_EVENTS`]); 0 holds none, every feed reads the log. For
    /// tests of the window's edges.
    pub fn start_with_capacity(log: AnyLog, mut stop: watch::Receiver<bool>, per_shard: usize) -> Self {
        let (tx, rx) = watch::channel(0u64);
        let tx = Arc::new(tx);
        let shards = log.shards();
        let recent: Arc<Vec<RwLock<Option<Recent>>>> =
            Arc::new((0..shards).map(|_| RwLock::new(None)).collect());
        for shard in 0..shards {
            let (log, tx, mut stop) = (log.clone(), tx.clone(), stop.clone());
            let recent = Arc::clone(&recent);
            tokio::spawn(async move {
                let mut tip = None;
                let mut started = false;
                loop {
                    if !started {
                        match log.last_position(shard).await {
                            Ok(last) => {
                                tip = last;
                                started = true;
                                *write(&recent[usize::from(shard)]) = Some(Recent {
                                    from: last.unwrap_or(Position::ZERO),
                                    events: VecDeque::new(),
                                    capacity: per_shard,
                                });
                            }
                            Err(e) => {
                                tracing::debug!(shard, error = %e, "delivery: log tip unknown");
                                tokio::time::sleep(IDLE_WAIT).await;
                                continue;
                            }
                        }
                    }
                    let read = tokio::select! {
                        read = log.read_after(shard, tip, BATCH, IDLE_WAIT) => read,
                        _ = stop.wait_for(|s| *s) => return,
                    };
                    match read {
                        Ok(batch) => {
                            if let Some((last, _)) = batch.last() {
                                tip = Some(*last);
                                // Held before the feeds are woken: a woken
                                // feed finds what woke it.
                                if let Some(window) = write(&recent[usize::from(shard)]).as_mut() {
                                    window.extend(batch);
                                }
                                tx.send_modify(|n| *n = n.wrapping_add(1));
                            }
                        }
                        Err(e) => {
                            if let Some(suppressed) = crate::lograte::global().check("delivery_tip") {
                                tracing::warn!(shard, error = %e, suppressed, "delivery: cannot follow the log");
                            }
                            tokio::time::sleep(IDLE_WAIT).await;
                        }
                    }
                    if tx.is_closed() {
                        return;
                    }
                }
            });
        }
        let _ = stop.borrow_and_update();
        Self { changed: rx, recent }
    }

    /// Up to `max` events of `shard` after `after` from the recent window;
    /// `None` when the window cannot say (see [`Recent::after`]).
    fn recent_after(&self, shard: u16, after: Position, max: usize) -> Option<Vec<(Position, Arc<Event>)>> {
        let window = self.recent.get(usize::from(shard))?;
        read(window).as_ref()?.after(after, max)
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Where a [`Feed`] starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Start {
    /// After the newest event: only what comes next.
    Now,
    /// At the oldest event still held (the retention window).
    Oldest,
    /// After a cursor handed out earlier.
    After(Cursor),
}

/// The events of one platform's watch list, from a cursor on (see the
/// module documentation).
pub struct Feed {
    log: AnyLog,
    lists: WatchLists,
    platform: String,
    positions: Vec<Position>,
    tips: Tips,
    /// The next shard to read (shards are read in turn).
    next_shard: u16,
    /// Read the log itself, not the recent window, in the next round
    /// (after an idle wait: see the module documentation).
    from_log: bool,
}

impl Feed {
    /// A feed of `platform`'s events from `start`. Checks a cursor against
    /// what the log still holds, events being kept `retention` (see the
    /// module documentation).
    pub async fn open(
        log: AnyLog,
        lists: WatchLists,
        tips: Tips,
        platform: String,
        start: Start,
        retention: Duration,
    ) -> Result<Self, CursorError> {
        let shards = log.shards();
        let mut oldest = Vec::with_capacity(usize::from(shards));
        let mut lasts = Vec::with_capacity(usize::from(shards));
        for shard in 0..shards {
            let first = log.first_position(shard).await?;
            oldest.push(first.map_or(Position::ZERO, before));
            lasts.push(log.last_position(shard).await?.unwrap_or(Position::ZERO));
        }
        let positions = match start {
            Start::Now => lasts,
            Start::Oldest => oldest,
            Start::After(cursor) => {
                // Retention trims only what is older than it: a cursor made
                // since then lost nothing; an older one, only if the log no
                // longer holds what follows it.
                let horizon =
                    now_ms().saturating_sub(u64::try_from(retention.as_millis()).unwrap_or(u64::MAX));
                let recent = cursor.issued_ms >= horizon;
                let in_range = cursor
                    .positions
                    .iter()
                    .zip(oldest.iter().zip(&lasts))
                    .all(|(p, (oldest, last))| (recent || p >= oldest) && p <= last);
                if !in_range {
                    return Err(CursorError::OutOfRange(Cursor::now(oldest)));
                }
                cursor.positions
            }
        };
        Ok(Self {
            log,
            lists,
            platform,
            positions,
            tips,
            next_shard: 0,
            from_log: false,
        })
    }

    /// Where the feed is: what it handed over so far, and the events it
    /// skipped (not watched).
    pub fn cursor(&self) -> Cursor {
        Cursor::now(self.positions.clone())
    }

    /// The next watched events, each with the cursor just after it; waits
    /// until there is at least one (or returns an empty batch after about a
    /// second of nothing, so the caller can look whether its consumer is
    /// still there).
    pub async fn next(&mut self) -> Result<Vec<(Event, Cursor)>, LogError> {
        let shards = self.log.shards();
        loop {
            // Marked seen before reading: a growth while reading wakes the
            // next wait at once.
            self.tips.changed.borrow_and_update();
            let from_log = std::mem::take(&mut self.from_log);
            let mut read_any = false;
            for _ in 0..shards {
                let shard = self.next_shard;
                self.next_shard = (self.next_shard + 1) % shards;
                let index = usize::from(shard);
                let after = self.positions[index];
                let held = if from_log {
                    None
                } else {
                    self.tips.recent_after(shard, after, BATCH)
                };
                let batch = match held {
                    Some(batch) => batch,
                    None => self
                        .log
                        .read_after(shard, Some(after), BATCH, Duration::ZERO)
                        .await?
                        .into_iter()
                        .map(|(p, e)| (p, Arc::new(e)))
                        .collect(),
                };
                let Some((last, _)) = batch.last() else {
                    continue;
                };
                read_any = true;
                let last = *last;
                let numbers: Vec<_> = batch.iter().map(|(_, e)| e.number).collect();
                let watched = self.lists.watching(&self.platform, &numbers).await?;
                let mut out = Vec::new();
                for ((position, event), watched) in batch.into_iter().zip(watched) {
                    self.positions[index] = position;
                    if watched {
                        let event = Arc::try_unwrap(event).unwrap_or_else(|shared| (*shared).clone());
                        out.push((event, self.cursor()));
                    }
                }
                self.positions[index] = last;
                if !out.is_empty() {
                    return Ok(out);
                }
            }
            if read_any {
                continue;
            }
            let waited = tokio::time::timeout(IDLE_WAIT, self.tips.changed.changed()).await;
            if let Ok(Ok(())) = waited {
                continue;
            }
            if waited.is_ok() {
                // The followers are gone (the server stops): nothing wakes
                // the feed or grows the window any more, so it waits as if
                // idle (without this it would spin at the window's end,
                // blind to what the log holds after it).
                tokio::time::sleep(IDLE_WAIT).await;
            }
            // A second of nothing: the next round asks the log itself, in
            // case the followers cannot read it.
            self.from_log = true;
            return Ok(Vec::new());
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_garbage() {
        let c = Cursor::new(
            1_764_000_000_999,
            vec![
                Position::new(1_764_000_000_123, 0),
                Position::ZERO,
                Position::new(5, u64::MAX),
            ],
        );
        let text = c.encode();
        assert_eq!(Cursor::decode(&text, 3).unwrap(), c);
        assert!(matches!(
            Cursor::decode(&text, 16),
            Err(CursorError::Malformed(_))
        ));
        assert!(matches!(Cursor::decode("!!", 3), Err(CursorError::Malformed(_))));
        assert!(matches!(Cursor::decode("", 3), Err(CursorError::Malformed(_))));
        let mut long = text.clone();
        long.push_str("AA");
        assert!(Cursor::decode(&long, 3).is_err());
    }

    fn event(i: u64) -> Event {
        let date = crate::domain::Date::parse("2026-11-02").unwrap();
        Event {
            event_id: format!("e{i}"),
            number: crate::domain::PhoneNumber::parse(&format!("+1201555{i:04}")).unwrap(),
            disconnect_date: date,
            earliest_reissue_date: date.add_days(90),
            source: "operator-a".into(),
            kind: crate::federation::EventKind::Disconnected,
            accepted_unix_ms: 0,
        }
    }

    #[test]
    fn the_recent_window_answers_only_inside_what_it_holds() {
        let p = |seq| Position::new(7, seq);
        let mut window = Recent {
            from: p(10),
            events: VecDeque::new(),
            capacity: 4,
        };
        // Nothing read yet: caught up at the start, blind elsewhere.
        assert_eq!(window.after(p(10), 8).map(|b| b.len()), Some(0));
        assert!(window.after(p(9), 8).is_none());
        assert!(window.after(p(11), 8).is_none());
        window.extend((11..=13).map(|i| (p(i), event(i))).collect());
        let got = window.after(p(10), 8).unwrap();
        assert_eq!(got.iter().map(|(q, _)| q.seq()).collect::<Vec<_>>(), [11, 12, 13]);
        assert_eq!(got[0].1.event_id, "e11");
        assert_eq!(window.after(p(11), 1).unwrap().len(), 1);
        assert_eq!(window.after(p(12), 8).unwrap()[0].0, p(13));
        assert_eq!(window.after(p(13), 8).map(|b| b.len()), Some(0));
        assert!(window.after(p(14), 8).is_none(), "ahead of the follower");
        // Beyond capacity the oldest go, and `from` follows them: a feed
        // behind the window reads the log.
        window.extend((14..=16).map(|i| (p(i), event(i))).collect());
        assert_eq!(window.events.len(), 4);
        assert_eq!(window.from, p(12));
        assert!(window.after(p(11), 8).is_none());
        let got = window.after(p(12), 8).unwrap();
        assert_eq!(
            got.iter().map(|(q, _)| q.seq()).collect::<Vec<_>>(),
            [13, 14, 15, 16]
        );
    }

    // The window's edges, against the embedded log (one shard, positions
    // `0-n` after the n-th event): a feed behind where a follower started
    // (or restarted), a full window dropping its oldest while feeds read,
    // a feed ahead of a follower that lags. Each feed must hand over every
    // watched event, in log order, none twice.

    const PLATFORM: &str = "platform-a";

    /// A embedded log in a temporary directory, `PLATFORM`'s watch list, and
    /// the ids of the watched events appended so far, in log order.
    struct Rig {
        _dir: tempfile::TempDir,
        log: AnyLog,
        lists: WatchLists,
        watched: Vec<String>,
    }

    impl Rig {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let log = AnyLog::Embedded(Arc::new(
                super::super::log::EmbeddedLog::open(dir.path()).unwrap(),
            ));
            let key = crate::federation::watch::WatchKey::new(b"the watch key of the window tests");
            let lists = WatchLists::Embedded(Arc::new(
                crate::federation::watch::EmbeddedWatchLists::in_memory(key),
            ));
            Self {
                _dir: dir,
                log,
                lists,
                watched: Vec::new(),
            }
        }

        /// The events `ids`, every third one for a number nobody watches
        /// (never the last, so that a feed that handed over everything
        /// is at the end of the log).
        async fn events(&mut self, ids: std::ops::Range<u64>) -> Vec<Event> {
            let last = ids.end.saturating_sub(1);
            let mut watched = Vec::new();
            let events: Vec<Event> = ids
                .map(|i| {
                    let e = event(i);
                    if i % 3 != 0 || i == last {
                        watched.push(e.number);
                        self.watched.push(e.event_id.clone());
                    }
                    e
                })
                .collect();
            self.lists.add(PLATFORM, &watched).await.unwrap();
            events
        }

        /// Appends the events `ids` (see [`Rig::events`]) in one append.
        async fn append(&mut self, ids: std::ops::Range<u64>) {
            let events = self.events(ids).await;
            self.log.append(&events).await.unwrap();
        }

        async fn feed(&self, tips: &Tips, start: Start) -> Feed {
            let retention = Duration::from_secs(86_400);
            Feed::open(
                self.log.clone(),
                self.lists.clone(),
                tips.clone(),
                PLATFORM.into(),
                start,
                retention,
            )
            .await
            .unwrap()
        }

        /// `feed` hands over exactly the watched events from the `seen`-th
        /// on (in order, none twice), and `seen` moves to the end.
        async fn expect(&self, feed: &mut Feed, seen: &mut usize) {
            let want = &self.watched[*seen..];
            assert_eq!(take(feed, want.len()).await, want);
            *seen = self.watched.len();
        }
    }

    /// What `feed` hands over until it gave at least `n` events (the whole
    /// batch that reaches `n`: more would show as a repeat); checks each
    /// event's cursor is where the feed stood after it.
    async fn take(feed: &mut Feed, n: usize) -> Vec<String> {
        let mut got = Vec::new();
        let mut previous = feed.positions[0];
        while got.len() < n {
            let batch = tokio::time::timeout(Duration::from_secs(15), feed.next())
                .await
                .expect("the feed hands over the events in time")
                .unwrap();
            for (event, cursor) in batch {
                let at = cursor.positions()[0];
                assert!(
                    at > previous,
                    "{} handed over at {at}, not after {previous}",
                    event.event_id
                );
                previous = at;
                got.push(event.event_id);
            }
        }
        got
    }

    fn pos(n: u64) -> Position {
        Position::new(0, n)
    }

    /// The window of the (one) shard: where it starts and its last event.
    fn window(tips: &Tips) -> Option<(Position, Position)> {
        read(&tips.recent[0]).as_ref().map(|w| (w.from, w.last()))
    }

    /// Whether `feed`'s next read of the shard is from the window.
    fn from_window(feed: &Feed) -> bool {
        feed.tips.recent_after(0, feed.positions[0], BATCH).is_some()
    }

    /// Polls until the follower of `tips` read the whole log.
    async fn caught_up(tips: &Tips, log: &AnyLog) {
        let last = log.last_position(0).await.unwrap().unwrap_or(Position::ZERO);
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while window(tips).is_none_or(|(_, held)| held < last) {
            assert!(
                std::time::Instant::now() < deadline,
                "the follower did not reach {last}: {:?}",
                window(tips)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_feed_behind_where_a_follower_started_misses_and_repeats_nothing() {
        let mut rig = Rig::new();
        // More than two batches before any follower.
        rig.append(0..600).await;
        let (stop, stopped) = watch::channel(false);
        let tips = Tips::start_with_capacity(rig.log.clone(), stopped, 16);
        caught_up(&tips, &rig.log).await;
        assert_eq!(window(&tips), Some((pos(600), pos(600))));
        let mut feed = rig.feed(&tips, Start::Oldest).await;
        let mut seen = 0;
        assert!(!from_window(&feed), "behind the window: the log");
        rig.expect(&mut feed, &mut seen).await;
        // At the window's start now, then inside it.
        assert!(from_window(&feed));
        rig.append(600..610).await;
        caught_up(&tips, &rig.log).await;
        assert!(from_window(&feed));
        rig.expect(&mut feed, &mut seen).await;

        // A restart: the follower stops, the log grows, a new follower
        // starts at its end, and the feed resumes from its cursor, behind.
        let cursor = feed.cursor();
        drop(feed);
        stop.send_replace(true);
        drop(tips);
        rig.append(610..650).await;
        let (_stop, stopped) = watch::channel(false);
        let tips = Tips::start_with_capacity(rig.log.clone(), stopped, 16);
        caught_up(&tips, &rig.log).await;
        assert_eq!(window(&tips), Some((pos(650), pos(650))));
        let mut feed = rig.feed(&tips, Start::After(cursor)).await;
        assert_eq!(feed.positions[0], pos(610));
        assert!(!from_window(&feed));
        // More while it is behind: they reach the window, not the feed yet.
        rig.append(650..660).await;
        caught_up(&tips, &rig.log).await;
        assert!(!from_window(&feed));
        rig.expect(&mut feed, &mut seen).await;
        // Caught up, from the window; nothing twice.
        assert!(from_window(&feed));
        rig.append(660..662).await;
        rig.expect(&mut feed, &mut seen).await;
        assert_eq!(seen, rig.watched.len());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_window_dropping_its_oldest_misses_and_repeats_nothing() {
        const CAPACITY: usize = 8;
        let mut rig = Rig::new();
        rig.append(0..5).await;
        let (_stop, stopped) = watch::channel(false);
        let tips = Tips::start_with_capacity(rig.log.clone(), stopped, CAPACITY);
        caught_up(&tips, &rig.log).await;
        let mut feed = rig.feed(&tips, Start::Now).await;
        let mut seen = rig.watched.len();
        let mut next = 5;
        // Each step starts with the feed at the end of the log: it is still
        // in the window after up to CAPACITY more events, behind it after
        // more (the window dropped what follows the feed).
        for n in [1, 7, 8, 9, 3, 20, 8, 300, 2, 9] {
            let at = feed.positions[0];
            assert_eq!(Some(at), rig.log.last_position(0).await.unwrap());
            rig.append(next..next + n).await;
            next += n;
            caught_up(&tips, &rig.log).await;
            let (from, last) = window(&tips).unwrap();
            assert_eq!(last, pos(next));
            let held = usize::try_from(next - 5).unwrap().min(CAPACITY);
            assert_eq!(read(&tips.recent[0]).as_ref().unwrap().events.len(), held);
            assert_eq!(from, pos(next - held as u64));
            assert_eq!(from_window(&feed), n as usize <= CAPACITY, "after {n} events");
            rig.expect(&mut feed, &mut seen).await;
        }

        // Appends racing the feed, in appends of 1 to 13 events: the window
        // drops events under the feed while it reads, at any point.
        let start = next;
        let mut events = Vec::new();
        for n in (1..=13).cycle().take(150) {
            events.push(rig.events(next..next + n).await);
            next += n;
        }
        let log = rig.log.clone();
        let appender = tokio::spawn(async move {
            for chunk in events {
                log.append(&chunk).await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        rig.expect(&mut feed, &mut seen).await;
        appender.await.unwrap();
        assert!(next - start > 1000);
        rig.append(next..next + 2).await;
        rig.expect(&mut feed, &mut seen).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_feed_outliving_its_followers_reads_the_log() {
        let mut rig = Rig::new();
        rig.append(0..10).await;
        let (stop, stopped) = watch::channel(false);
        let tips = Tips::start_with_capacity(rig.log.clone(), stopped, 16);
        caught_up(&tips, &rig.log).await;
        let mut feed = rig.feed(&tips, Start::Now).await;
        let mut seen = rig.watched.len();
        rig.append(10..20).await;
        rig.expect(&mut feed, &mut seen).await;
        // The followers stop (the server stops) while the feed goes on, at
        // the end of their window: what comes next is only in the log.
        stop.send_replace(true);
        let gone = tips.changed.clone();
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while gone.has_changed().is_ok() {
            assert!(std::time::Instant::now() < deadline, "the followers did not stop");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(tips);
        assert!(from_window(&feed));
        rig.append(20..30).await;
        rig.expect(&mut feed, &mut seen).await;
        rig.append(30..31).await;
        rig.expect(&mut feed, &mut seen).await;
    }

    /// Tips whose window the test fills itself: a follower that lags as
    /// much as the test says. The sender wakes the feeds.
    fn lagging_tips(from: Position, capacity: usize) -> (Tips, watch::Sender<u64>) {
        let (tx, rx) = watch::channel(0);
        let window = Recent {
            from,
            events: VecDeque::new(),
            capacity,
        };
        let recent = Arc::new(vec![RwLock::new(Some(window))]);
        (Tips { changed: rx, recent }, tx)
    }

    /// The lagging follower reads the log up to `upto`, then wakes the feeds.
    async fn follow(tips: &Tips, woken: &watch::Sender<u64>, log: &AnyLog, upto: Position) {
        while let Some((_, last)) = window(tips).filter(|(_, last)| *last < upto) {
            let batch: Vec<_> = log
                .read_after(0, Some(last), BATCH, Duration::ZERO)
                .await
                .unwrap()
                .into_iter()
                .filter(|(p, _)| *p <= upto)
                .collect();
            assert!(!batch.is_empty(), "{upto} is not in the log");
            write(&tips.recent[0]).as_mut().unwrap().extend(batch);
        }
        woken.send_modify(|n| *n += 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_feed_ahead_of_a_lagging_follower_misses_and_repeats_nothing() {
        let mut rig = Rig::new();
        rig.append(0..10).await;
        let (tips, woken) = lagging_tips(pos(10), 16);
        // The follower reads none of these: a feed starting now is ahead.
        rig.append(10..40).await;
        let mut feed = rig.feed(&tips, Start::Now).await;
        let mut seen = rig.watched.len();
        assert_eq!(feed.positions[0], pos(40));
        assert!(!from_window(&feed));
        rig.append(40..60).await;
        rig.expect(&mut feed, &mut seen).await;
        // The follower catches up partly: the feed is still ahead.
        follow(&tips, &woken, &rig.log, pos(50)).await;
        assert!(!from_window(&feed));
        rig.append(60..70).await;
        rig.expect(&mut feed, &mut seen).await;
        // The follower reaches the feed: the window serves it.
        follow(&tips, &woken, &rig.log, pos(70)).await;
        assert!(from_window(&feed));
        rig.append(70..80).await;
        follow(&tips, &woken, &rig.log, pos(80)).await;
        assert!(from_window(&feed));
        rig.expect(&mut feed, &mut seen).await;
        // The follower stalls half-way through the next events: the feed
        // takes what the window holds, then (after its idle wait) the rest
        // from the log.
        rig.append(80..90).await;
        follow(&tips, &woken, &rig.log, pos(85)).await;
        rig.expect(&mut feed, &mut seen).await;
        assert_eq!(feed.positions[0], pos(90));
        assert!(!from_window(&feed), "ahead of the follower again");
        // The follower catches up late: nothing comes twice.
        follow(&tips, &woken, &rig.log, pos(90)).await;
        assert!(from_window(&feed));
        rig.append(90..93).await;
        follow(&tips, &woken, &rig.log, pos(93)).await;
        rig.expect(&mut feed, &mut seen).await;
        assert_eq!(window(&tips).unwrap().0, pos(77), "16 held");
    }

    #[test]
    fn before_is_the_previous_position() {
        assert_eq!(before(Position::new(7, 3)), Position::new(7, 2));
        assert_eq!(before(Position::new(7, 0)), Position::new(6, u64::MAX));
        assert!(before(Position::new(7, 0)) < Position::new(7, 0));
        assert_eq!(before(Position::ZERO), Position::ZERO);
    }
}
