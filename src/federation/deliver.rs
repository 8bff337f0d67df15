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

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
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

/// Wakes idle feeds when the log grows: one follower task per shard (see
/// [`Tips::start`]).
#[derive(Clone)]
pub struct Tips {
    changed: watch::Receiver<u64>,
}

impl Tips {
    /// Starts following every shard of `log` from its end; the followers
    /// stop when `stop` turns true (or every [`Tips`] is dropped).
    pub fn start(log: AnyLog, mut stop: watch::Receiver<bool>) -> Self {
        let (tx, rx) = watch::channel(0u64);
        let tx = Arc::new(tx);
        for shard in 0..log.shards() {
            let (log, tx, mut stop) = (log.clone(), tx.clone(), stop.clone());
            tokio::spawn(async move {
                let mut tip = None;
                let mut started = false;
                loop {
                    if !started {
                        match log.last_position(shard).await {
                            Ok(last) => {
                                tip = last;
                                started = true;
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
        Self { changed: rx }
    }
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
            let mut read_any = false;
            for _ in 0..shards {
                let shard = self.next_shard;
                self.next_shard = (self.next_shard + 1) % shards;
                let index = usize::from(shard);
                let batch = self
                    .log
                    .read_after(shard, Some(self.positions[index]), BATCH, Duration::ZERO)
                    .await?;
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
            if tokio::time::timeout(IDLE_WAIT, self.tips.changed.changed())
                .await
                .is_err()
            {
                return Ok(Vec::new());
            }
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

    #[test]
    fn before_is_the_previous_position() {
        assert_eq!(before(Position::new(7, 3)), Position::new(7, 2));
        assert_eq!(before(Position::new(7, 0)), Position::new(6, u64::MAX));
        assert!(before(Position::new(7, 0)) < Position::new(7, 0));
        assert_eq!(before(Position::ZERO), Position::ZERO);
    }
}
