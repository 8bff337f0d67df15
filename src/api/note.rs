//! What a handler tells the server's per-call observation (access log,
//! trace span) that only the handler knows: the keyed hash of the number
//! asked, how many numbers, and the time spent waiting on the store. The
//! server puts a [`CallNote`] in the request's extensions only when the
//! access log or trace export is on, so a plain check does none of this
//! work.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::audit::NumberKey;
use crate::domain::PhoneNumber;

/// The note of one call, shared between the handler and the server's
/// observation (cheap to clone).
#[derive(Clone, Debug)]
pub struct CallNote(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    key: Arc<NumberKey>,
    number_hmac: OnceLock<String>,
    numbers: AtomicU64,
    store_calls: AtomicU64,
    store_nanos: AtomicU64,
}

impl CallNote {
    /// An empty note; numbers are hashed with `key`.
    pub fn new(key: Arc<NumberKey>) -> Self {
        Self(Arc::new(Inner {
            key,
            number_hmac: OnceLock::new(),
            numbers: AtomicU64::new(0),
            store_calls: AtomicU64::new(0),
            store_nanos: AtomicU64::new(0),
        }))
    }

    /// Notes the number a single check asked about (its keyed hash only).
    pub fn number(&self, number: &PhoneNumber) {
        let _ = self.0.number_hmac.set(self.0.key.hmac_hex(&number.to_string()));
        self.0.numbers.fetch_add(1, Ordering::Relaxed);
    }

    /// Notes `n` numbers asked about (batch, stream chunk) without hashing
    /// them.
    pub fn numbers(&self, n: u64) {
        self.0.numbers.fetch_add(n, Ordering::Relaxed);
    }

    /// Notes one store call that took `elapsed`.
    pub fn store_call(&self, elapsed: Duration) {
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.0.store_calls.fetch_add(1, Ordering::Relaxed);
        self.0.store_nanos.fetch_add(ns, Ordering::Relaxed);
    }

    /// The keyed hash (hex HMAC-SHA256) of the single number asked, if any.
    pub fn number_hmac(&self) -> Option<&str> {
        self.0.number_hmac.get().map(String::as_str)
    }

    /// Numbers asked so far.
    pub fn number_count(&self) -> u64 {
        self.0.numbers.load(Ordering::Relaxed)
    }

    /// Time spent in store calls so far (`None`: no store call).
    pub fn store_time(&self) -> Option<Duration> {
        (self.0.store_calls.load(Ordering::Relaxed) > 0)
            .then(|| Duration::from_nanos(self.0.store_nanos.load(Ordering::Relaxed)))
    }
}

/// Runs the in-process store answer `call` (see `Store::lookup_now`),
/// noting its time in `note` if there is one and it answered.
pub(crate) fn timed_now<T>(note: Option<&CallNote>, call: impl FnOnce() -> Option<T>) -> Option<T> {
    match note {
        None => call(),
        Some(note) => {
            let started = std::time::Instant::now();
            let out = call()?;
            note.store_call(started.elapsed());
            Some(out)
        }
    }
}

/// Runs the store call `call`, noting its time in `note` if there is one.
pub(crate) async fn timed<T>(note: Option<&CallNote>, call: impl Future<Output = T>) -> T {
    match note {
        None => call.await,
        Some(note) => {
            let started = std::time::Instant::now();
            let out = call.await;
            note.store_call(started.elapsed());
            out
        }
    }
}
