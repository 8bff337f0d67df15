//! Process-wide figures of the store: the latency and the errors of each
//! call the server makes ([`AnyStore`](super::AnyStore) times them), and
//! the register files applied by imports in this process. Read by the
//! metrics endpoint; lock-free (see [`crate::stats`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::{Kind, StoreError};
use crate::stats::{Histogram, HistogramReading};

/// The store behind a call: the `store` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The in-process store.
    Embedded,
    /// Redis (one server or a cluster).
    Redis,
}

impl Backend {
    /// Every backend, in label order.
    pub const ALL: [Backend; 2] = [Backend::Embedded, Backend::Redis];

    /// The `store` label value.
    pub fn label(self) -> &'static str {
        match self {
            Backend::Embedded => "embedded",
            Backend::Redis => "redis",
        }
    }
}

/// A timed store call: the `op` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// One number.
    Lookup,
    /// Many numbers (batch, stream chunk).
    LookupMany,
    /// Health's reachability check.
    Ping,
    /// Reading the metadata (resync, import).
    RefreshMeta,
}

impl Op {
    /// Every op, in label order.
    pub const ALL: [Op; 4] = [Op::Lookup, Op::LookupMany, Op::Ping, Op::RefreshMeta];

    /// The `op` label value.
    pub fn label(self) -> &'static str {
        match self {
            Op::Lookup => "lookup",
            Op::LookupMany => "lookup_many",
            Op::Ping => "ping",
            Op::RefreshMeta => "refresh_meta",
        }
    }
}

/// The `kind` label of a store error.
pub const ERROR_KINDS: [&str; 4] = ["timeout", "unavailable", "conflict", "corrupt"];

fn error_column(e: &StoreError) -> usize {
    match e {
        StoreError::Timeout(_) => 0,
        StoreError::Unavailable(_) => 1,
        StoreError::Conflict(_) => 2,
        StoreError::Corrupt(_) => 3,
    }
}

const BACKENDS: usize = Backend::ALL.len();
const OPS: usize = Op::ALL.len();
const KINDS: usize = 2;

/// The figures (see [`calls`]).
#[derive(Debug)]
pub struct StoreCalls {
    latency: [[Histogram; OPS]; BACKENDS],
    errors: [[[AtomicU64; ERROR_KINDS.len()]; OPS]; BACKENDS],
    /// Register files applied (`[kind][0]`) or refused/failed (`[kind][1]`).
    imports: [[AtomicU64; 2]; KINDS],
    /// Records applied, by kind.
    records: [AtomicU64; KINDS],
}

static CALLS: StoreCalls = StoreCalls {
    latency: [const { [const { Histogram::new() }; OPS] }; BACKENDS],
    errors: [const { [const { [const { AtomicU64::new(0) }; ERROR_KINDS.len()] }; OPS] }; BACKENDS],
    imports: [const { [const { AtomicU64::new(0) }; 2] }; KINDS],
    records: [const { AtomicU64::new(0) }; KINDS],
};

/// The figures of this process.
pub fn calls() -> &'static StoreCalls {
    &CALLS
}

fn kind_row(kind: Kind) -> usize {
    match kind {
        Kind::Snapshot => 0,
        Kind::Delta => 1,
    }
}

impl StoreCalls {
    /// Counts one call of `op` on `backend` that took `elapsed`, and its
    /// error if it failed.
    pub fn observe<T>(&self, backend: Backend, op: Op, elapsed: Duration, result: &Result<T, StoreError>) {
        let (b, o) = (backend as usize, op as usize);
        self.latency[b][o].observe(elapsed);
        if let Err(e) = result {
            self.errors[b][o][error_column(e)].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The latency of `op` on `backend`.
    pub fn latency(&self, backend: Backend, op: Op) -> HistogramReading {
        self.latency[backend as usize][op as usize].read()
    }

    /// Errors of `op` on `backend` of kind `ERROR_KINDS[kind]`.
    pub fn errors(&self, backend: Backend, op: Op, kind: usize) -> u64 {
        self.errors[backend as usize][op as usize]
            .get(kind)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Counts one register file of `kind` applied with `records` records
    /// (`Ok`), or refused or failed (`Err`).
    pub fn import(&self, kind: Kind, applied: Result<u64, ()>) {
        let row = kind_row(kind);
        match applied {
            Ok(records) => {
                self.imports[row][0].fetch_add(1, Ordering::Relaxed);
                self.records[row].fetch_add(records, Ordering::Relaxed);
            }
            Err(()) => {
                self.imports[row][1].fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Register files of `kind` applied (`ok`) or refused or failed.
    pub fn imports(&self, kind: Kind, ok: bool) -> u64 {
        self.imports[kind_row(kind)][usize::from(!ok)].load(Ordering::Relaxed)
    }

    /// Records applied from register files of `kind`.
    pub fn records_applied(&self, kind: Kind) -> u64 {
        self.records[kind_row(kind)].load(Ordering::Relaxed)
    }
}
