//! Where the mirror lives: the [`Store`] trait, the Redis store (production)
//! and the embedded in-process store (the default without Redis).
//!
//! Both implement the same contract and pass the same test suite
//! (`tests/store_contract.rs`, also on a Redis Cluster): lookups
//! never read metadata per request (it is cached in the process), a snapshot
//! switches atomically (a reader sees the old data or the new, never a mix),
//! and a delta keeps each number's latest disconnect date, so applying it twice
//! is the same as applying it once.

pub mod calls;
pub mod digest;
pub mod embedded;
mod input;
pub mod membership;
pub mod packed;
pub mod pages;
mod records;
pub mod redis;

use std::future::Future;
use std::sync::Arc;

use crate::domain::{Date, MirrorMeta, PhoneNumber};

pub use self::embedded::EmbeddedStore;
pub use self::input::{APPLIED_KEEP, DeltaWrite, Kind, SnapshotWrite, applied_key};
pub use self::records::{MAX_RECORDS, Records, RecordsError};
pub use self::redis::RedisStore;

/// Why a store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store did not answer within its timeout.
    #[error("store timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// The store could not be reached or failed to answer.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A write was refused because the mirror moved on (e.g. another importer
    /// applied the same sequence first).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The stored data is not what this version understands.
    #[error("corrupt store data: {0}")]
    Corrupt(String),
}

/// The answer of a lookup: the disconnect dates found and the metadata of the
/// very generation they were read from.
#[derive(Clone, Debug)]
pub struct Lookup<T> {
    /// The latest disconnect date per number asked (`None`: no record).
    pub found: T,
    /// The metadata the data belongs to; `None` while the mirror is empty.
    pub meta: Option<Arc<MirrorMeta>>,
}

/// A mirror of the register: read by the server, written by imports.
pub trait Store: Send + Sync + 'static {
    /// [`Store::lookup`] answered at once in process, without I/O, when the
    /// store can (the embedded store always; Redis when its membership
    /// filter proves the number has no record). `None`: call
    /// [`Store::lookup`]. An answer here is exactly the one
    /// [`Store::lookup`] would give; it exists so the login path does not
    /// build and move a store future for the calls that need none.
    fn lookup_now(&self, number: PhoneNumber) -> Option<Result<Lookup<Option<Date>>, StoreError>> {
        let _ = number;
        None
    }

    /// The latest disconnect date of one number.
    fn lookup(
        &self,
        number: PhoneNumber,
    ) -> impl Future<Output = Result<Lookup<Option<Date>>, StoreError>> + Send;

    /// The latest disconnect dates of many numbers, in the order asked.
    fn lookup_many(
        &self,
        numbers: &[PhoneNumber],
    ) -> impl Future<Output = Result<Lookup<Vec<Option<Date>>>, StoreError>> + Send;

    /// The cached metadata (no I/O); `None` while the mirror is empty.
    fn cached_meta(&self) -> Option<Arc<MirrorMeta>>;

    /// Reads the metadata from the store itself (not the cache) and refreshes
    /// the cache with it.
    fn refresh_meta(&self) -> impl Future<Output = Result<Option<Arc<MirrorMeta>>, StoreError>> + Send;

    /// Checks that the store answers (for health).
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Why the store must not be answered from right now, even though it
    /// answers (e.g. Redis' `maxmemory-policy` can evict the mirror's keys):
    /// health is then NOT_SERVING at once. `None`: nothing known against it.
    fn unsafe_reason(&self) -> Option<String> {
        None
    }

    /// Replaces the whole mirror with a snapshot's records, atomically.
    /// ([`Records`] are sorted by number, one per number, by construction.)
    /// Sequence and `as_of` checks are done by the caller
    /// ([`crate::import`]); the store re-checks that the sequence it
    /// replaces is still `expected_previous`.
    fn apply_snapshot(
        &self,
        snapshot: &SnapshotWrite,
        records: &Records,
        expected_previous: Option<u64>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Merges a delta's records (each number keeps its latest date) and moves
    /// the sequence from `delta.sequence - 1` to `delta.sequence`.
    /// Idempotent: after a crash half-way, applying it again gives the same
    /// result as applying it once.
    fn apply_delta(
        &self,
        delta: &DeltaWrite,
        records: &Records,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The SHA-256 of the files applied, by [`applied_key`]
    /// (`snapshot:7`), for the most recent [`APPLIED_KEEP`] sequences: lets an import refuse a
    /// re-issued file whose content differs from what was applied.
    fn applied_checksums(
        &self,
    ) -> impl Future<Output = Result<std::collections::HashMap<String, String>, StoreError>> + Send;

    /// Register files this store skipped when it last loaded or re-synced
    /// its data directory, one `file: reason` line each (only the embedded
    /// store loads files itself; empty otherwise).
    fn import_problems(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Writes, inside an `impl Store for ..`, the [`Store`] methods of the named
/// groups as calls passed straight to the store that `$inner(self)` returns
/// (a path to a function from `&Self` to a `&impl Store`, e.g.
/// `Self::inner`), so a store that wraps another writes only the methods it
/// changes. The groups, by what a wrapper may want to change:
///
/// - `answers`: [`Store::lookup_now`], [`Store::lookup`], [`Store::lookup_many`],
///   [`Store::unsafe_reason`] (what is answered, and whether);
/// - `writes`: [`Store::apply_snapshot`], [`Store::apply_delta`];
/// - `rest`: every other method.
///
/// A new method of [`Store`] is added here once, to its group (`rest`
/// unless wrappers change it): every wrapper that passes the group on gets
/// it, and one that writes the group itself fails to compile until it
/// decides.
///
/// ```ignore
/// impl<S: Store> Store for Logged<S> {
///     crate::store::pass_through!(Self::inner => answers, rest);
///     // apply_snapshot and apply_delta written here
/// }
/// ```
macro_rules! pass_through {
    ($inner:path => $($group:ident),+ $(,)?) => {
        $( $crate::store::pass_through!(@$group $inner); )+
    };
    (@answers $inner:path) => {
        fn lookup_now(
            &self,
            number: $crate::domain::PhoneNumber,
        ) -> ::std::option::Option<
            ::std::result::Result<
                $crate::store::Lookup<::std::option::Option<$crate::domain::Date>>,
                $crate::store::StoreError,
            >,
        > {
            $crate::store::Store::lookup_now($inner(self), number)
        }

        fn lookup(
            &self,
            number: $crate::domain::PhoneNumber,
        ) -> impl ::std::future::Future<
            Output = ::std::result::Result<
                $crate::store::Lookup<::std::option::Option<$crate::domain::Date>>,
                $crate::store::StoreError,
            >,
        > + Send {
            $crate::store::Store::lookup($inner(self), number)
        }

        fn lookup_many(
            &self,
            numbers: &[$crate::domain::PhoneNumber],
        ) -> impl ::std::future::Future<
            Output = ::std::result::Result<
                $crate::store::Lookup<::std::vec::Vec<::std::option::Option<$crate::domain::Date>>>,
                $crate::store::StoreError,
            >,
        > + Send {
            $crate::store::Store::lookup_many($inner(self), numbers)
        }

        fn unsafe_reason(&self) -> ::std::option::Option<::std::string::String> {
            $crate::store::Store::unsafe_reason($inner(self))
        }
    };
    (@writes $inner:path) => {
        fn apply_snapshot(
            &self,
            snapshot: &$crate::store::SnapshotWrite,
            records: &$crate::store::Records,
            expected_previous: ::std::option::Option<u64>,
        ) -> impl ::std::future::Future<
            Output = ::std::result::Result<(), $crate::store::StoreError>,
        > + Send {
            $crate::store::Store::apply_snapshot($inner(self), snapshot, records, expected_previous)
        }

        fn apply_delta(
            &self,
            delta: &$crate::store::DeltaWrite,
            records: &$crate::store::Records,
        ) -> impl ::std::future::Future<
            Output = ::std::result::Result<(), $crate::store::StoreError>,
        > + Send {
            $crate::store::Store::apply_delta($inner(self), delta, records)
        }
    };
    (@rest $inner:path) => {
        fn cached_meta(&self) -> ::std::option::Option<::std::sync::Arc<$crate::domain::MirrorMeta>> {
            $crate::store::Store::cached_meta($inner(self))
        }

        fn refresh_meta(
            &self,
        ) -> impl ::std::future::Future<
            Output = ::std::result::Result<
                ::std::option::Option<::std::sync::Arc<$crate::domain::MirrorMeta>>,
                $crate::store::StoreError,
            >,
        > + Send {
            $crate::store::Store::refresh_meta($inner(self))
        }

        fn ping(
            &self,
        ) -> impl ::std::future::Future<
            Output = ::std::result::Result<(), $crate::store::StoreError>,
        > + Send {
            $crate::store::Store::ping($inner(self))
        }

        fn applied_checksums(
            &self,
        ) -> impl ::std::future::Future<
            Output = ::std::result::Result<
                ::std::collections::HashMap<::std::string::String, ::std::string::String>,
                $crate::store::StoreError,
            >,
        > + Send {
            $crate::store::Store::applied_checksums($inner(self))
        }

        fn import_problems(&self) -> ::std::vec::Vec<::std::string::String> {
            $crate::store::Store::import_problems($inner(self))
        }
    };
}
pub(crate) use pass_through;

/// One of the two stores, chosen by configuration.
#[derive(Clone)]
pub enum AnyStore {
    /// The in-process store.
    Embedded(Arc<EmbeddedStore>),
    /// The Redis store.
    Redis(RedisStore),
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            AnyStore::Embedded($s) => $e,
            AnyStore::Redis($s) => $e,
        }
    };
}

impl AnyStore {
    /// The `store` label of this store's figures.
    pub fn backend(&self) -> calls::Backend {
        match self {
            AnyStore::Embedded(_) => calls::Backend::Embedded,
            AnyStore::Redis(_) => calls::Backend::Redis,
        }
    }

    /// Runs `call`, counting its latency and error into [`calls::calls`].
    async fn timed<T>(
        &self,
        op: calls::Op,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let started = std::time::Instant::now();
        let result = call.await;
        calls::calls().observe(self.backend(), op, started.elapsed(), &result);
        result
    }
}

impl Store for AnyStore {
    /// Counted, not timed: an answer in process takes a fraction of a
    /// microsecond (about 125 ns at 10 M records, `examples/embedded_lookup`),
    /// about what the two clock reads of timing it would add to every
    /// call; it is observed as 0 s (the histogram's lowest bucket).
    fn lookup_now(&self, number: PhoneNumber) -> Option<Result<Lookup<Option<Date>>, StoreError>> {
        let result = dispatch!(self, s => s.lookup_now(number))?;
        calls::calls().observe(
            self.backend(),
            calls::Op::Lookup,
            std::time::Duration::ZERO,
            &result,
        );
        Some(result)
    }

    async fn lookup(&self, number: PhoneNumber) -> Result<Lookup<Option<Date>>, StoreError> {
        self.timed(calls::Op::Lookup, async {
            dispatch!(self, s => s.lookup(number).await)
        })
        .await
    }

    async fn lookup_many(&self, numbers: &[PhoneNumber]) -> Result<Lookup<Vec<Option<Date>>>, StoreError> {
        self.timed(calls::Op::LookupMany, async {
            dispatch!(self, s => s.lookup_many(numbers).await)
        })
        .await
    }

    fn cached_meta(&self) -> Option<Arc<MirrorMeta>> {
        dispatch!(self, s => s.cached_meta())
    }

    async fn refresh_meta(&self) -> Result<Option<Arc<MirrorMeta>>, StoreError> {
        self.timed(calls::Op::RefreshMeta, async {
            dispatch!(self, s => s.refresh_meta().await)
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.timed(calls::Op::Ping, async { dispatch!(self, s => s.ping().await) })
            .await
    }

    fn unsafe_reason(&self) -> Option<String> {
        dispatch!(self, s => s.unsafe_reason())
    }

    async fn apply_snapshot(
        &self,
        snapshot: &SnapshotWrite,
        records: &Records,
        expected_previous: Option<u64>,
    ) -> Result<(), StoreError> {
        dispatch!(self, s => s.apply_snapshot(snapshot, records, expected_previous).await)
    }

    async fn apply_delta(&self, delta: &DeltaWrite, records: &Records) -> Result<(), StoreError> {
        dispatch!(self, s => s.apply_delta(delta, records).await)
    }

    async fn applied_checksums(&self) -> Result<std::collections::HashMap<String, String>, StoreError> {
        dispatch!(self, s => s.applied_checksums().await)
    }

    fn import_problems(&self) -> Vec<String> {
        dispatch!(self, s => s.import_problems())
    }
}

impl<S: Store> Store for Arc<S> {
    pass_through!(std::ops::Deref::deref => answers, writes, rest);
}
