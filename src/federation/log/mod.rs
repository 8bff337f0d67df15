//! The event log: the seam between the write side of the federation
//! (publications, retractions, register imports append [`Event`]s) and the
//! read side (every server's overlay follows it; delivery fans it out).
//!
//! One trait, [`EventLog`], two backends behind [`AnyLog`] (as the stores
//! behind `AnyStore`):
//! - [`RedisLog`]: [`SHARDS`] Redis streams beside the mirror's keys; every
//!   key of one shard carries the shard's hash tag, so a publication's
//!   idempotency record and its log entry are written by one script on one
//!   slot (atomic, also on a Redis Cluster). See [`redis`] for the layout.
//! - [`EmbeddedLog`]: the append-only journal `federation.journal` in the
//!   embedded store's data directory, the events also held in memory.
//!
//! **Positions** ([`Position`]) are totally ordered within one shard and
//! stable across restarts; a reader keeps one per shard. The embedded log
//! has one shard.
//!
//! **Publications** ([`EventLog::publish`]) are idempotent by (source,
//! `event_id`): the log keeps, per publication, its number, dates, and
//! whether it was retracted. Those records are also the durable state the
//! overlay is rebuilt from at start ([`EventLog::active`]): the log itself
//! is trimmed by retention, the records are not.

pub mod embedded;
pub mod redis;

use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

pub use self::embedded::EmbeddedLog;
pub use self::redis::RedisLog;
use super::{Event, EventKind};
use crate::domain::{Date, PhoneNumber};
use crate::store::StoreError;

/// Shards of the Redis log: an event and its retraction share one (see
/// [`shard_of`]).
pub const SHARDS: u16 = 16;

/// The longest blocking wait [`EventLog::read_after`] honours.
pub const MAX_WAIT: Duration = Duration::from_secs(10);

/// A place in one shard of the log, after an entry. Totally ordered within
/// a shard; opaque to clients (its text form `ms-seq` is the Redis stream
/// id; the embedded log uses `0-n`, `n` the record's ordinal in its
/// journal).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    ms: u64,
    seq: u64,
}

impl Position {
    /// The position before every entry.
    pub const ZERO: Position = Position { ms: 0, seq: 0 };

    /// A position from its two parts.
    pub const fn new(ms: u64, seq: u64) -> Self {
        Self { ms, seq }
    }

    /// The first part (Redis: the entry's milliseconds).
    pub const fn ms(self) -> u64 {
        self.ms
    }

    /// The second part (Redis: the sequence within the millisecond).
    pub const fn seq(self) -> u64 {
        self.seq
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl FromStr for Position {
    type Err = LogError;

    fn from_str(s: &str) -> Result<Self, LogError> {
        let bad = || LogError::Corrupt(format!("not a log position: {s:?}"));
        let (ms, seq) = s.split_once('-').ok_or_else(bad)?;
        Ok(Self {
            ms: ms.parse().map_err(|_| bad())?,
            seq: seq.parse().map_err(|_| bad())?,
        })
    }
}

/// Why the log could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Redis did not answer, or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Writing now would not be durable (e.g. Redis runs without the
    /// persistence settings the README asks for); nothing was written.
    #[error("not durable: {0}")]
    NotDurable(String),
    /// The embedded journal failed.
    #[error(transparent)]
    Journal(#[from] super::journal::JournalError),
    /// An entry of the log is not what this version understands.
    #[error("corrupt log entry: {0}")]
    Corrupt(String),
}

/// The outcome of one published event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Published {
    /// New and durable, at this position of its shard.
    Accepted(u16, Position),
    /// The same (source, id, number, date) was accepted before: nothing
    /// changed.
    Duplicate,
    /// The source already used this id for another number or date.
    Conflict,
}

/// The outcome of a retraction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Retraction {
    /// The source published no such event.
    NotFound,
    /// Already retracted: nothing changed. The retraction event as it was.
    AlreadyRetracted(Event),
    /// Retracted now: the retraction event, durable at this position.
    Retracted(Event, u16, Position),
}

/// The shard of (source, event id): stable across versions and processes
/// (CRC-32 of `source`, a NUL, `event_id`, modulo [`SHARDS`]).
pub fn shard_of(source: &str, event_id: &str) -> u16 {
    let mut h = crc32fast::Hasher::new();
    h.update(source.as_bytes());
    h.update(&[0]);
    h.update(event_id.as_bytes());
    (h.finalize() % u32::from(SHARDS)) as u16
}

/// The event log (see the [module documentation](self)).
pub trait EventLog: Send + Sync + 'static {
    /// How many shards the log has (positions are per shard).
    fn shards(&self) -> u16;

    /// The shard an event of `source` with `event_id` lands in.
    fn shard(&self, source: &str, event_id: &str) -> u16;

    /// Publishes `events` (all `Disconnected`, all of one operator source),
    /// each idempotent by (source, `event_id`): one outcome per event, in
    /// order. Accepted events are durable when this returns `Ok`. Within
    /// one call, a later event with an id used by an earlier one is a
    /// duplicate or a conflict of it.
    fn publish(&self, events: &[Event]) -> impl Future<Output = Result<Vec<Published>, LogError>> + Send;

    /// Retracts `source`'s publication `event_id`, appending a `Retracted`
    /// event accepted at `accepted_unix_ms` (durable when this returns).
    fn retract(
        &self,
        source: &str,
        event_id: &str,
        accepted_unix_ms: i64,
    ) -> impl Future<Output = Result<Retraction, LogError>> + Send;

    /// Appends `events` without an idempotency record (the register's own
    /// events: its files are the record), durable when it returns; the
    /// shard and position of each, in order.
    fn append(&self, events: &[Event])
    -> impl Future<Output = Result<Vec<(u16, Position)>, LogError>> + Send;

    /// Up to `max` entries of `shard` after `after` (`None`: from the oldest
    /// held), oldest first; if there is none yet, waits up to `wait`
    /// (at most [`MAX_WAIT`]) for one. Entries trimmed by retention are
    /// gone: compare with [`EventLog::first_position`].
    fn read_after(
        &self,
        shard: u16,
        after: Option<Position>,
        max: usize,
        wait: Duration,
    ) -> impl Future<Output = Result<Vec<(Position, Event)>, LogError>> + Send;

    /// The oldest entry still held in `shard` (`None`: the shard is empty).
    fn first_position(&self, shard: u16) -> impl Future<Output = Result<Option<Position>, LogError>> + Send;

    /// The newest entry of `shard` (`None`: the shard is empty): where a
    /// reader that wants only what comes next starts.
    fn last_position(&self, shard: u16) -> impl Future<Output = Result<Option<Position>, LogError>> + Send;

    /// Drops the entries accepted before `older_than_unix_ms` (retention);
    /// idempotency records stay. The number of entries dropped.
    fn trim(&self, older_than_unix_ms: i64) -> impl Future<Output = Result<u64, LogError>> + Send;

    /// Every publication not retracted, as its `Disconnected` event (the
    /// overlay's durable state, read at start).
    fn active(&self) -> impl Future<Output = Result<Vec<Event>, LogError>> + Send;
}

impl<L: EventLog> EventLog for Arc<L> {
    fn shards(&self) -> u16 {
        L::shards(self)
    }

    fn shard(&self, source: &str, event_id: &str) -> u16 {
        L::shard(self, source, event_id)
    }

    fn publish(&self, events: &[Event]) -> impl Future<Output = Result<Vec<Published>, LogError>> + Send {
        L::publish(self, events)
    }

    fn retract(
        &self,
        source: &str,
        event_id: &str,
        accepted_unix_ms: i64,
    ) -> impl Future<Output = Result<Retraction, LogError>> + Send {
        L::retract(self, source, event_id, accepted_unix_ms)
    }

    fn append(
        &self,
        events: &[Event],
    ) -> impl Future<Output = Result<Vec<(u16, Position)>, LogError>> + Send {
        L::append(self, events)
    }

    fn read_after(
        &self,
        shard: u16,
        after: Option<Position>,
        max: usize,
        wait: Duration,
    ) -> impl Future<Output = Result<Vec<(Position, Event)>, LogError>> + Send {
        L::read_after(self, shard, after, max, wait)
    }

    fn first_position(&self, shard: u16) -> impl Future<Output = Result<Option<Position>, LogError>> + Send {
        L::first_position(self, shard)
    }

    fn last_position(&self, shard: u16) -> impl Future<Output = Result<Option<Position>, LogError>> + Send {
        L::last_position(self, shard)
    }

    fn trim(&self, older_than_unix_ms: i64) -> impl Future<Output = Result<u64, LogError>> + Send {
        L::trim(self, older_than_unix_ms)
    }

    fn active(&self) -> impl Future<Output = Result<Vec<Event>, LogError>> + Send {
        L::active(self)
    }
}

/// One of the two logs, as the store is one of two stores.
#[derive(Clone)]
pub enum AnyLog {
    /// The embedded store's journal.
    Embedded(Arc<EmbeddedLog>),
    /// Streams in the store's Redis.
    Redis(RedisLog),
}

macro_rules! dispatch {
    ($self:ident, $l:ident => $e:expr) => {
        match $self {
            AnyLog::Embedded($l) => $e,
            AnyLog::Redis($l) => $e,
        }
    };
}

impl EventLog for AnyLog {
    fn shards(&self) -> u16 {
        dispatch!(self, l => l.shards())
    }

    fn shard(&self, source: &str, event_id: &str) -> u16 {
        dispatch!(self, l => l.shard(source, event_id))
    }

    async fn publish(&self, events: &[Event]) -> Result<Vec<Published>, LogError> {
        dispatch!(self, l => l.publish(events).await)
    }

    async fn retract(
        &self,
        source: &str,
        event_id: &str,
        accepted_unix_ms: i64,
    ) -> Result<Retraction, LogError> {
        dispatch!(self, l => l.retract(source, event_id, accepted_unix_ms).await)
    }

    async fn append(&self, events: &[Event]) -> Result<Vec<(u16, Position)>, LogError> {
        dispatch!(self, l => l.append(events).await)
    }

    async fn read_after(
        &self,
        shard: u16,
        after: Option<Position>,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<(Position, Event)>, LogError> {
        dispatch!(self, l => l.read_after(shard, after, max, wait).await)
    }

    async fn first_position(&self, shard: u16) -> Result<Option<Position>, LogError> {
        dispatch!(self, l => l.first_position(shard).await)
    }

    async fn last_position(&self, shard: u16) -> Result<Option<Position>, LogError> {
        dispatch!(self, l => l.last_position(shard).await)
    }

    async fn trim(&self, older_than_unix_ms: i64) -> Result<u64, LogError> {
        dispatch!(self, l => l.trim(older_than_unix_ms).await)
    }

    async fn active(&self) -> Result<Vec<Event>, LogError> {
        dispatch!(self, l => l.active().await)
    }
}

/// An event's fields as stored (stream entry fields, journal records): the
/// names are part of the Redis layout (see [`redis`]).
///
/// | field | content |
/// |---|---|
/// | `k` | `d` (disconnected) or `r` (retracted) |
/// | `s` | the source |
/// | `e` | the event id |
/// | `n` | the number's digits (E.164 without `+`) |
/// | `d` | the disconnect date, days since 1970-01-01 |
/// | `q` | the earliest reissue date, days since 1970-01-01 |
/// | `t` | when it was accepted, Unix milliseconds |
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Wire {
    pub k: String,
    pub s: String,
    pub e: String,
    pub n: u64,
    pub d: i32,
    pub q: i32,
    pub t: i64,
}

impl Wire {
    /// The stored form of `event`.
    pub fn of(event: &Event) -> Self {
        Self {
            k: kind_code(event.kind).to_owned(),
            s: event.source.clone(),
            e: event.event_id.clone(),
            n: event.number.value(),
            d: event.disconnect_date.days(),
            q: event.earliest_reissue_date.days(),
            t: event.accepted_unix_ms,
        }
    }

    /// The event it stores.
    pub fn event(self) -> Result<Event, LogError> {
        let kind = match self.k.as_str() {
            "d" => EventKind::Disconnected,
            "r" => EventKind::Retracted,
            other => return Err(LogError::Corrupt(format!("unknown event kind {other:?}"))),
        };
        let number = PhoneNumber::from_value(self.n)
            .ok_or_else(|| LogError::Corrupt("an entry's number is not E.164".into()))?;
        Ok(Event {
            event_id: self.e,
            number,
            disconnect_date: Date::from_days(self.d),
            earliest_reissue_date: Date::from_days(self.q),
            source: self.s,
            kind,
            accepted_unix_ms: self.t,
        })
    }
}

fn kind_code(kind: EventKind) -> &'static str {
    match kind {
        EventKind::Disconnected => "d",
        EventKind::Retracted => "r",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_order_and_round_trip() {
        let a = Position::new(5, 9);
        let b = Position::new(6, 0);
        assert!(a < b && Position::ZERO < a);
        assert_eq!("5-9".parse::<Position>().expect("parse"), a);
        assert_eq!(a.to_string(), "5-9");
        assert!("5".parse::<Position>().is_err());
        assert!("x-1".parse::<Position>().is_err());
    }

    #[test]
    fn shards_are_stable_and_spread() {
        // Fixed values: the shard of an event must never change between
        // versions (its retraction must land in the same shard).
        assert_eq!(shard_of("operator-a", "e1"), shard_of("operator-a", "e1"));
        let used: std::collections::HashSet<u16> = (0..1000)
            .map(|i| shard_of("operator-a", &format!("e{i}")))
            .collect();
        assert_eq!(used.len(), usize::from(SHARDS));
        assert!(used.iter().all(|s| *s < SHARDS));
    }
}
