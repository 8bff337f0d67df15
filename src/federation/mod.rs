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
