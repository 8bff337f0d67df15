//! The federation: operators publish disconnections as they happen, platforms
//! watch the numbers bound to their accounts and receive an event for each
//! (see the README's "Federation" section and `DisconnectionFeed` /
//! `Watchlist` in the proto).
//!
//! Everything flows through one event log: a publication (or a register
//! import that adds or moves a disconnect) appends [`Event`]s to it once
//! durable; every server follows the log to keep its in-process overlay of
//! operator disconnects (so CheckNumber sees a publication within a second,
//! whichever server took it), and the delivery side reads it to fan events
//! out to the platforms that watch the numbers.

pub mod deliver;
pub mod journal;
pub mod log;
pub mod operators;
pub mod overlay;
pub mod register;
pub mod watch;
pub mod webhook;

use crate::domain::{Date, PhoneNumber};

pub use self::log::{AnyLog, EventLog, LogError, Position, Published, Retraction};

/// The `source` of the national register's events (operators are named by
/// their certificate identity).
pub const REGISTER_SOURCE: &str = "register";

/// Whether an event reports a disconnection or withdraws one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// The number was permanently disconnected.
    Disconnected,
    /// The source withdrew its earlier `Disconnected` event of the same id.
    Retracted,
}

/// One event of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The source's id of the event (an operator's `event_id`; made by the
    /// server for the register).
    pub event_id: String,
    /// The number concerned.
    pub number: PhoneNumber,
    /// The day it was permanently disconnected.
    pub disconnect_date: Date,
    /// The first day it may be reissued: the disconnect plus the source's
    /// quarantine.
    pub earliest_reissue_date: Date,
    /// [`REGISTER_SOURCE`] or the operator's certificate identity.
    pub source: String,
    /// Disconnected or retracted.
    pub kind: EventKind,
    /// When the event was accepted, Unix milliseconds.
    pub accepted_unix_ms: i64,
}

/// Days between a register disconnect and the number's earliest reissue,
/// as the register's events say: the US rules' shortest quarantine (the
/// same figure as the default staleness, see
/// [`crate::domain::DEFAULT_MAX_STALENESS_DAYS`]).
pub const REGISTER_QUARANTINE_DAYS: u32 = crate::domain::DEFAULT_MAX_STALENESS_DAYS;

/// The federation's parts one server runs with: the event log, the
/// overlay that follows it, and the operators in force.
pub struct Federation {
    /// The event log (beside the store).
    pub log: AnyLog,
    /// Operators' disconnects in force, for lookups.
    pub overlay: std::sync::Arc<overlay::Overlay>,
    /// Who may publish for which numbers.
    pub operators: std::sync::Arc<operators::Operators>,
}

impl std::fmt::Debug for Federation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Federation")
            .field("overlay_numbers", &self.overlay.len())
            .finish_non_exhaustive()
    }
}

impl Federation {
    /// Opens the event log beside `store`: in its Redis, or (embedded
    /// store) the journal in `journal_dir`, which the embedded store needs
    /// (the one this process has open already, if any: see
    /// [`log::EmbeddedLog::shared`]).
    pub async fn open(
        store: &crate::store::AnyStore,
        journal_dir: Option<&std::path::Path>,
        operators: std::sync::Arc<operators::Operators>,
    ) -> Result<Self, LogError> {
        let log = match store {
            crate::store::AnyStore::Redis(redis) => AnyLog::Redis(log::RedisLog::open(redis).await),
            crate::store::AnyStore::Embedded(_) => {
                let dir = journal_dir.ok_or_else(|| {
                    LogError::Corrupt(
                        "the embedded store needs a data directory for the federation journal".into(),
                    )
                })?;
                AnyLog::Embedded(log::EmbeddedLog::shared(dir)?)
            }
        };
        Ok(Self {
            log,
            overlay: std::sync::Arc::new(overlay::Overlay::new()),
            operators,
        })
    }

    /// Milliseconds since the Unix epoch, now.
    pub fn now_ms() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    }
}
