//! The production store: the mirror in Redis, shared by every server replica.
//!
//! # Key layout
//!
//! All keys start with a configurable prefix `{prefix}` (default `rn`).
//!
//! | key | type | content |
//! |---|---|---|
//! | `{prefix}:meta` | hash | the metadata (below) |
//! | `{prefix}:g{gen}:{bucket}` | hash | one bucket of generation `gen` |
//! | `{prefix}:bloom:g{gen}:{chunk}` | string | the membership filter of generation `gen`, in chunks of at most 8 MiB |
//! | `{prefix}:gen_counter` | string | INCR counter: generation numbers are never reused |
//! | `{prefix}:lock` | string | the import lock: its owner (host, pid, process start, start time, random token) as JSON, PX 15 s, renewed every 3 s while importing |
//! | `{prefix}:applied` | hash | SHA-256 of applied files by `snapshot:N` / `delta:N` (the last 1,024 sequences) |
//! | `{prefix}:events` | pub/sub channel | `switched` after each snapshot switch (informational) |
//!
//! **Buckets.** A snapshot chooses `nbuckets = max(1, ceil(records / 128))`
//! for its generation. Number `n` (its E.164 digits as an integer) lives in
//! bucket `n % nbuckets`, hash field `n / nbuckets`, and the value is its
//! latest disconnect date as days since 1970-01-01. Both field and value are
//! small integers, so each bucket (about 128 fields, well under Redis'
//! `hash-max-listpack-entries` of 512) is a compact listpack; `(bucket, field)`
//! identifies `n` exactly. Bucket keys carry no hash tag, so in a cluster they
//! spread over all slots. Deltas add fields to the existing buckets: after the
//! register has grown about 4-fold since the last snapshot, buckets pass 512
//! fields and Redis converts them to (much larger) hash tables; a new
//! snapshot re-buckets. Imports log a warning when the average bucket passes
//! 384 fields.
//!
//! **Metadata** (`{prefix}:meta`, one small hash): `generation`, `nbuckets`,
//! `sequence`, `as_of`, `coverage_start` (ISO dates), `prefixes`
//! (comma-separated, e.g. `+1,+86`), `record_count`, `last_import_unix`,
//! `layout` (`1`), and, only while needed, `pending_generation` /
//! `pending_nbuckets` (a snapshot being written, or left by a crashed import)
//! and `reclaim_generation` / `reclaim_nbuckets` (a replaced generation not yet
//! deleted), and `bloom_generation` / `bloom_sequence` / `bloom_bits` /
//! `bloom_hashes` (the membership filter and the generation and sequence it
//! is complete for; see below). Without `generation` the mirror is empty. A
//! field this version cannot parse makes every read fail with
//! [`StoreError::Corrupt`] (the `bloom_*` fields excepted: a garbled or
//! stale filter is just not used).
//!
//! # Reads
//!
//! Each process caches the metadata (generation, buckets, coverage) and
//! refreshes it every [`RedisOptions::meta_refresh`] in a background task
//! (which stops when the last handle to the store is dropped). A lookup is
//! at most one HGET; a batch is at most one pipeline of HGETs. If the cache has not
//! been refreshed for `2 × meta_refresh` (Redis was unreachable), a lookup
//! first refreshes it, and fails if it cannot: a replaced generation is deleted
//! [`RedisOptions::reclaim_grace`] after a switch, so an old cache must not be
//! trusted. Every Redis call, and every lookup as a whole, is bounded by
//! [`RedisOptions::timeout`] ([`StoreError::Timeout`]); Redis errors are
//! [`StoreError::Unavailable`].
//! On one server the connection is a
//! [`ConnectionManager`](::redis::aio::ConnectionManager), which reconnects by
//! itself when Redis comes back; if Redis stops answering on an open
//! connection (three metadata refreshes in a row time out), the connection is
//! replaced (on a cluster too).
//!
//! # Membership filter
//!
//! Most numbers asked have no record. Each snapshot also stores a Bloom
//! filter of its generation's numbers (about 10 bits per number, under 1%
//! false positives; layout and validity rules in the `bloom` module), and
//! each delta sets its numbers' bits before it moves the sequence. Each
//! process downloads the filter (on a connection of its own) whenever its
//! cached metadata shows a generation or sequence the loaded filter is not
//! for, and while the loaded filter matches the cached metadata exactly, a
//! number the filter rules out is answered "no record" without a Redis round
//! trip; everything else is an HGET, as before. Until a new filter is
//! loaded (after a snapshot or a delta), lookups just ask Redis. The filter
//! costs about 1.25 bytes per record in Redis and in every server process
//! (off with [`RedisOptions::membership_filter`]).
//!
//! # Redis Cluster
//!
//! [`RedisStore::connect_cluster`] uses a
//! [`ClusterConnection`](::redis::cluster_async::ClusterConnection) (one
//! multiplexed connection per node, following MOVED/ASK and topology changes)
//! with the same layout, timeouts and scripts. Bucket keys carry no hash tag,
//! so they spread over all slots and masters; the metadata is one key, so the
//! snapshot switch and the delta check-and-set (one-key scripts) stay atomic.
//! A pipeline must stay inside one slot, so on a cluster a batch lookup sends
//! its HGETs as concurrent single commands, snapshot and delta writes group
//! their bucket commands by slot (pipelines of one slot, 64 in flight), and a
//! replaced generation is deleted with concurrent single UNLINKs. RESTORE
//! works per key, so the fast bulk load works on a cluster too. With
//! [`RedisOptions::read_from_replicas`] reads go to replicas; replication is
//! asynchronous, so right after an import a replica can briefly answer from
//! before it (a lookup may then miss a number a delta has just added).
//!
//! # Writes
//!
//! Imports take the lock `{prefix}:lock` (SET NX PX, renewed every 3 s,
//! released with a check-and-delete script) and use their own connection, so
//! bulk writes never queue in front of lookups. A lock whose owner ran on
//! this host and is gone is taken over at once (compare-and-set on its
//! value); a failed snapshot deletes its pending generation before it
//! returns. See `write` for the details and `admin` for `verify`/`gc`.
//!
//! *Snapshot*: re-check the sequence; delete what a crashed import left
//! (`pending_*`, `reclaim_*`); take a new generation number from
//! `{prefix}:gen_counter` and record it as `pending_*`; write every record
//! into the new generation, one command per bucket in pipelines of about
//! 64 Ki records, four in flight: `RESTORE key 0 <payload> REPLACE` with the
//! bucket's listpack built here (byte-identical to what HSET would build;
//! Redis only copies it, so Redis' single thread is no longer the
//! bottleneck), or per-bucket HSETs if this Redis refuses such payloads
//! (older than 7.0, RESTORE disabled); then switch in one atomic step: a
//! script on `{prefix}:meta` alone that checks sequence and pending
//! generation and sets all metadata fields. Readers
//! see the old generation or the new one, never a mix and never an empty
//! mirror. After [`RedisOptions::reclaim_grace`] (longer than any reader's
//! cache may lag) the old generation's keys are UNLINKed. While a snapshot is
//! written Redis holds both generations: plan memory for twice the mirror.
//!
//! *Delta*: the metadata sequence must be `manifest.sequence - 1` (if it is
//! already `manifest.sequence`, the delta was applied: nothing to do). Each
//! bucket is merged by a script that keeps the later date of old and new and
//! counts new fields; then one check-and-set script on `{prefix}:meta` moves the
//! sequence, `as_of`, `last_import_unix` and adds the new fields to
//! `record_count`. Applying a delta twice, or again after a crash half-way,
//! gives the same data as applying it once. `record_count` can then
//! under-count: fields written by the crashed attempt are not new on the retry.
//!
//! Every script touches one key only, so the layout works on Redis Cluster
//! (see below).
//!
//! # Memory
//!
//! Measured on Redis 7.0 with US-like numbers, before the membership filter:
//! 10.9 bytes of `used_memory` per record at 1 million records, 10.7 at 10
//! million (listpack entries of 5 + 4 bytes, plus about 80 bytes per bucket
//! key). The filter adds 1.25 bytes per record (10 bits).

mod admin;
mod bloom;
mod conn;
mod dump;
mod meta;
mod write;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use ::redis::{Cmd, FromRedisValue, Pipeline, RedisError, Value};
use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::sync::oneshot;

pub use self::admin::GcReport;
use self::conn::{Conn, Target};
use self::meta::{BloomParams, Current, StoredMeta};
use super::{Lookup, Store, StoreError};
use crate::domain::{Date, MirrorMeta, PhoneNumber};
use crate::import::{Manifest, Records};

/// Settings of a [`RedisStore`].
#[derive(Clone, Debug)]
pub struct RedisOptions {
    /// Prefix of every key (default `rn`); lets several mirrors share a Redis.
    pub key_prefix: String,
    /// Bound on every Redis call of a read or a health check (default 200 ms).
    pub timeout: Duration,
    /// How often the cached metadata is re-read (default 1 s).
    pub meta_refresh: Duration,
    /// How long a snapshot import waits after its switch before it deletes the
    /// replaced generation (default 3 s). Must exceed every reader's
    /// `2 × meta_refresh + timeout`.
    pub reclaim_grace: Duration,
    /// Bound on each call of an import: a bulk pipeline, the lock, the
    /// metadata switch (default 30 s).
    pub bulk_timeout: Duration,
    /// Bound on [`RedisStore::connect`] (default 5 s).
    pub connect_timeout: Duration,
    /// On a cluster ([`RedisStore::connect_cluster`]): send reads (lookups
    /// and metadata refreshes) to a random replica of the key's shard instead
    /// of its primary (default false). Replication is asynchronous, so a
    /// replica can briefly miss the last writes of an import.
    pub read_from_replicas: bool,
    /// Load the membership filter of the current generation into this
    /// process and answer lookups of numbers it rules out without asking
    /// Redis (default true; costs about 1.25 bytes of memory per record).
    pub membership_filter: bool,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            key_prefix: "rn".to_owned(),
            timeout: Duration::from_millis(200),
            meta_refresh: Duration::from_secs(1),
            reclaim_grace: Duration::from_secs(3),
            bulk_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            read_from_replicas: false,
            membership_filter: true,
        }
    }
}

/// How many consecutive metadata refresh timeouts make the read connection
/// be replaced (Redis stopped answering on an open socket).
const STUCK_REFRESHES: u32 = 3;

/// The mirror in Redis (see the module documentation for the layout).
///
/// Cheap to clone: clones share one connection and one metadata cache.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("key_prefix", &self.inner.opts.key_prefix)
            .finish_non_exhaustive()
    }
}

/// Key names.
struct Keys {
    prefix: String,
    meta: String,
    lock: String,
    gen_counter: String,
    events: String,
}

impl Keys {
    fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            meta: format!("{prefix}:meta"),
            lock: format!("{prefix}:lock"),
            gen_counter: format!("{prefix}:gen_counter"),
            events: format!("{prefix}:events"),
        }
    }

    fn bucket(&self, generation: u64, bucket: u64) -> String {
        format!("{}:g{generation}:{bucket}", self.prefix)
    }

    /// One chunk of a generation's membership filter.
    fn bloom(&self, generation: u64, chunk: u64) -> String {
        format!("{}:bloom:g{generation}:{chunk}", self.prefix)
    }
}

struct Inner {
    target: Target,
    /// The connection of reads, metadata and import control (lock, switch).
    conn: ArcSwap<Conn>,
    opts: RedisOptions,
    keys: Keys,
    /// Texts removed from every error message (the URL's password).
    secrets: Vec<String>,
    /// The cached metadata; `None` while the mirror is empty.
    current: ArcSwapOption<Current>,
    /// When `current` was last read from Redis (ms since `started`).
    refreshed_ms: AtomicU64,
    started: Instant,
    /// Serialises metadata reads, so an older read never overwrites a newer.
    refresh_lock: tokio::sync::Mutex<()>,
    /// The membership filter loaded into this process, if any.
    filter: ArcSwapOption<LoadedFilter>,
    /// True while a filter download runs.
    filter_loading: AtomicBool,
    /// When the last filter download failed (ms since `started`; 0: never).
    filter_failed_ms: AtomicU64,
    /// Dropped with the store: stops the refresh task.
    _stop: oneshot::Sender<()>,
}

impl RedisStore {
    /// Connects to Redis at `url` (`redis://[:password@]host:port[/db]`),
    /// reads the metadata and starts the background metadata refresh.
    ///
    /// Fails with [`StoreError::Timeout`] if Redis does not answer within
    /// [`RedisOptions::connect_timeout`]. Once connected, the store recovers by
    /// itself from Redis restarts.
    pub async fn connect(url: &str, opts: RedisOptions) -> Result<Self, StoreError> {
        let secrets = Target::secrets(&[url]);
        let target = Target::single(url)
            .map_err(|e| StoreError::Unavailable(format!("invalid redis URL ({:?})", e.kind())))?;
        Self::connect_to(target, secrets, opts).await
    }

    /// Connects to a Redis Cluster through `urls` (some or all of its nodes,
    /// `redis://[:password@]host:port`), reads the metadata and starts the
    /// background metadata refresh. The layout is the same as on one server:
    /// bucket keys spread over all slots, every script touches one key, and
    /// batches are split by slot (see the module documentation).
    pub async fn connect_cluster(urls: &[String], opts: RedisOptions) -> Result<Self, StoreError> {
        if urls.is_empty() {
            return Err(StoreError::Unavailable("no redis cluster node given".into()));
        }
        let secrets = Target::secrets(&urls.iter().map(String::as_str).collect::<Vec<_>>());
        let target = Target::cluster(urls, &opts)
            .map_err(|e| StoreError::Unavailable(format!("invalid redis cluster URLs ({:?})", e.kind())))?;
        Self::connect_to(target, secrets, opts).await
    }

    async fn connect_to(
        target: Target,
        secrets: Vec<String>,
        opts: RedisOptions,
    ) -> Result<Self, StoreError> {
        let slowest_reader = opts.meta_refresh * 2 + opts.timeout;
        if opts.reclaim_grace <= slowest_reader {
            tracing::warn!(
                reclaim_grace = ?opts.reclaim_grace,
                meta_refresh = ?opts.meta_refresh,
                "reclaim_grace should exceed 2 x meta_refresh + timeout: a lagging reader could miss a replaced generation"
            );
        }
        let conn = tokio::time::timeout(opts.connect_timeout, target.connect(&opts))
            .await
            .map_err(|_| StoreError::Timeout(opts.connect_timeout))?
            .map_err(|e| unavailable(&secrets, &e))?;
        let (stop_tx, stop_rx) = oneshot::channel();
        let inner = Arc::new(Inner {
            target,
            conn: ArcSwap::from_pointee(conn),
            keys: Keys::new(&opts.key_prefix),
            secrets,
            current: ArcSwapOption::empty(),
            refreshed_ms: AtomicU64::new(0),
            started: Instant::now(),
            refresh_lock: tokio::sync::Mutex::new(()),
            filter: ArcSwapOption::empty(),
            filter_loading: AtomicBool::new(false),
            filter_failed_ms: AtomicU64::new(0),
            _stop: stop_tx,
            opts,
        });
        inner.refresh().await?;
        inner.maybe_load_filter();
        tokio::spawn(refresh_loop(
            Arc::downgrade(&inner),
            stop_rx,
            inner.opts.meta_refresh.max(Duration::from_millis(10)),
        ));
        Ok(Self { inner })
    }

    /// The generation and sequence the membership filter loaded into this
    /// process belongs to (`None`: no filter loaded; lookups ask Redis).
    pub fn membership_filter_loaded(&self) -> Option<(u64, u64)> {
        self.inner
            .filter
            .load()
            .as_ref()
            .map(|f| (f.generation, f.sequence))
    }

    /// True if this store talks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.inner.target, Target::Cluster(_))
    }

    /// Redis' `used_memory` (INFO memory), in bytes: for benchmarks. On a
    /// cluster, the sum over the nodes that answer INFO.
    pub async fn used_memory(&self) -> Result<u64, StoreError> {
        let mut cmd = ::redis::cmd("INFO");
        cmd.arg("memory");
        let info: Value = self.inner.query(&cmd, self.inner.opts.timeout).await?;
        fn used(value: Value) -> Option<u64> {
            let text = match value {
                Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
                Value::VerbatimString { text, .. } => text,
                Value::SimpleString(s) => s,
                Value::Map(nodes) => return nodes.into_iter().map(|(_, v)| used(v)).sum(),
                _ => return None,
            };
            text.lines()
                .find_map(|l| l.strip_prefix("used_memory:"))
                .and_then(|v| v.trim().parse().ok())
        }
        used(info).ok_or_else(|| StoreError::Corrupt("INFO memory has no used_memory".into()))
    }
}

/// The redis error as a [`StoreError::Unavailable`] (or
/// [`StoreError::Corrupt`] if a key of the mirror has the wrong type), without
/// secrets and without unbounded detail.
fn unavailable(secrets: &[String], e: &RedisError) -> StoreError {
    if e.code() == Some("WRONGTYPE") {
        return StoreError::Corrupt("a key of the redis mirror holds the wrong type".into());
    }
    let mut text = e.to_string();
    for secret in secrets {
        text = text.replace(secret.as_str(), "***");
    }
    if text.len() > 300 {
        let mut cut = 300;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("...");
    }
    StoreError::Unavailable(format!("redis: {text}"))
}

impl Inner {
    fn unavailable(&self, e: &RedisError) -> StoreError {
        unavailable(&self.secrets, e)
    }

    /// A handle on the read connection (cheap: an `Arc` clone).
    fn conn(&self) -> Conn {
        Conn::clone(&self.conn.load())
    }

    /// A new connection for one import: bulk pipelines there never delay
    /// lookups. Connects on first use.
    fn bulk_conn(&self) -> Result<Conn, StoreError> {
        self.target
            .connect_lazy(&self.opts)
            .map_err(|e| self.unavailable(&e))
    }

    /// Sends one command on the read connection, bounded by `limit`.
    async fn query<T: FromRedisValue>(&self, cmd: &Cmd, limit: Duration) -> Result<T, StoreError> {
        self.query_on(&mut self.conn(), cmd, limit).await
    }

    /// Sends one command on `conn`, bounded by `limit`.
    async fn query_on<T: FromRedisValue>(
        &self,
        conn: &mut Conn,
        cmd: &Cmd,
        limit: Duration,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(limit, cmd.query_async(conn)).await {
            Err(_) => Err(StoreError::Timeout(limit)),
            Ok(Err(e)) => Err(self.unavailable(&e)),
            Ok(Ok(v)) => Ok(v),
        }
    }

    /// Sends one pipeline on `conn`, bounded by `limit`.
    async fn pipeline_on<T: FromRedisValue>(
        &self,
        conn: &mut Conn,
        pipe: &Pipeline,
        limit: Duration,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(limit, pipe.query_async(conn)).await {
            Err(_) => Err(StoreError::Timeout(limit)),
            Ok(Err(e)) => Err(self.unavailable(&e)),
            Ok(Ok(v)) => Ok(v),
        }
    }

    /// Reads the whole metadata hash.
    async fn read_meta(&self, limit: Duration) -> Result<StoredMeta, StoreError> {
        let mut cmd = ::redis::cmd("HGETALL");
        cmd.arg(&self.keys.meta);
        let raw: HashMap<Vec<u8>, Vec<u8>> = self.query(&cmd, limit).await?;
        meta::parse(raw)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Reads the metadata now and replaces the cache with it.
    async fn refresh(&self) -> Result<Option<Arc<Current>>, StoreError> {
        let _serial = self.refresh_lock.lock().await;
        self.refresh_locked().await
    }

    async fn refresh_locked(&self) -> Result<Option<Arc<Current>>, StoreError> {
        let read_at = self.now_ms();
        let stored = self.read_meta(self.opts.timeout).await?;
        let current = stored.current.map(Arc::new);
        let previous = self.current.swap(current.clone());
        let before = previous.as_ref().map(|c| (c.generation.id, c.meta.sequence));
        let after = current.as_ref().map(|c| (c.generation.id, c.meta.sequence));
        if before != after {
            tracing::info!(
                generation = after.map(|a| a.0),
                sequence = after.map(|a| a.1),
                records = current.as_ref().map(|c| c.meta.record_count),
                "redis mirror metadata changed"
            );
        }
        self.refreshed_ms.fetch_max(read_at.max(1), Ordering::Relaxed);
        Ok(current)
    }

    /// The cached generation, refreshed first if the cache is too old to be
    /// trusted (the background refresh has been failing).
    async fn current(&self) -> Result<Option<Arc<Current>>, StoreError> {
        let max_age = self.max_cache_age_ms();
        if self
            .now_ms()
            .saturating_sub(self.refreshed_ms.load(Ordering::Relaxed))
            <= max_age
        {
            return Ok(self.current.load_full());
        }
        let _serial = self.refresh_lock.lock().await;
        // Someone else may have refreshed while we waited.
        if self
            .now_ms()
            .saturating_sub(self.refreshed_ms.load(Ordering::Relaxed))
            <= max_age
        {
            return Ok(self.current.load_full());
        }
        self.refresh_locked().await
    }

    fn max_cache_age_ms(&self) -> u64 {
        u64::try_from((self.opts.meta_refresh * 2).as_millis()).unwrap_or(u64::MAX)
    }

    /// Replaces the read connection (the old one stopped answering).
    fn reset_connection(&self) {
        match self.target.connect_lazy(&self.opts) {
            Ok(conn) => {
                self.conn.store(Arc::new(conn));
                tracing::warn!("redis stopped answering on its connection: replaced it");
            }
            Err(e) => tracing::warn!(error = %self.unavailable(&e), "cannot replace the redis connection"),
        }
    }
}

/// A membership filter in this process, complete for one generation at one
/// sequence.
struct LoadedFilter {
    generation: u64,
    sequence: u64,
    filter: bloom::Filter,
}

/// After a failed filter download, wait this long before the next attempt.
const FILTER_RETRY_MS: u64 = 10_000;

impl Inner {
    /// The loaded filter if it belongs to exactly `current`.
    fn usable_filter(&self, current: &Current) -> Option<Arc<LoadedFilter>> {
        current.bloom?;
        self.filter
            .load_full()
            .filter(|f| f.generation == current.generation.id && f.sequence == current.meta.sequence)
    }

    /// Starts a download of the current generation's filter in the
    /// background if the loaded one (if any) is not for the current
    /// generation and sequence. Lookups ask Redis until it is loaded.
    fn maybe_load_filter(self: &Arc<Self>) {
        if !self.opts.membership_filter {
            return;
        }
        let Some(current) = self.current.load_full() else {
            self.filter.store(None);
            return;
        };
        let Some(params) = current.bloom else {
            self.filter.store(None);
            return;
        };
        if self.usable_filter(&current).is_some() {
            return;
        }
        let failed = self.filter_failed_ms.load(Ordering::Relaxed);
        if failed != 0 && self.now_ms().saturating_sub(failed) < FILTER_RETRY_MS {
            return;
        }
        if self.filter_loading.swap(true, Ordering::AcqRel) {
            return;
        }
        let inner = Arc::downgrade(self);
        tokio::spawn(async move {
            let Some(inner) = inner.upgrade() else { return };
            let started = Instant::now();
            let result = inner.load_filter(&current, params).await;
            match result {
                Ok(filter) => {
                    tracing::info!(
                        generation = filter.generation,
                        sequence = filter.sequence,
                        bytes = filter.filter.len_bytes(),
                        took_ms = started.elapsed().as_millis() as u64,
                        "membership filter loaded"
                    );
                    inner.filter_failed_ms.store(0, Ordering::Relaxed);
                    inner.filter.store(Some(Arc::new(filter)));
                }
                Err(e) => {
                    inner
                        .filter_failed_ms
                        .store(inner.now_ms().max(1), Ordering::Relaxed);
                    tracing::warn!(error = %e, "cannot load the membership filter; lookups ask redis");
                }
            }
            inner.filter_loading.store(false, Ordering::Release);
        });
    }

    /// Downloads the filter chunks on a connection of its own (large replies
    /// must not delay lookups). The bits read include at least every number
    /// up to `current`'s sequence: deltas set them before moving it.
    async fn load_filter(&self, current: &Current, params: BloomParams) -> Result<LoadedFilter, StoreError> {
        let mut conn = self.bulk_conn()?;
        let chunks = bloom::chunks(params.bits);
        let mut bytes = Vec::with_capacity(usize::try_from(params.bits.div_ceil(8)).unwrap_or(0));
        for chunk in 0..chunks {
            let mut cmd = ::redis::cmd("GET");
            cmd.arg(self.keys.bloom(current.generation.id, chunk));
            let part: Option<Vec<u8>> = self.query_on(&mut conn, &cmd, self.opts.bulk_timeout).await?;
            let part = part
                .ok_or_else(|| StoreError::Corrupt(format!("membership filter chunk {chunk} is missing")))?;
            bytes.extend_from_slice(&part);
        }
        let filter = bloom::Filter::from_bytes(params.bits, params.hashes, bytes)
            .ok_or_else(|| StoreError::Corrupt("the membership filter has the wrong size".into()))?;
        Ok(LoadedFilter {
            generation: current.generation.id,
            sequence: current.meta.sequence,
            filter,
        })
    }
}

/// Re-reads the metadata every `period` until the store is dropped.
async fn refresh_loop(inner: Weak<Inner>, mut stop: oneshot::Receiver<()>, period: Duration) {
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    let mut timeouts = 0u32;
    let mut failing = false;
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = ticks.tick() => {}
        }
        let Some(inner) = inner.upgrade() else { return };
        match inner.refresh().await {
            Ok(_) => {
                inner.maybe_load_filter();
                timeouts = 0;
                if failing {
                    failing = false;
                    tracing::info!("redis metadata refresh works again");
                }
            }
            Err(e) => {
                if matches!(e, StoreError::Timeout(_)) {
                    timeouts += 1;
                    if timeouts >= STUCK_REFRESHES {
                        timeouts = 0;
                        inner.reset_connection();
                    }
                }
                if !failing {
                    failing = true;
                    tracing::warn!(error = %e, "redis metadata refresh failed; lookups fail until it works again");
                }
            }
        }
    }
}

/// A stored date (days since 1970-01-01); `Nil` is no record.
fn parse_day(value: Value) -> Result<Option<Date>, StoreError> {
    let days = match value {
        Value::Nil => return Ok(None),
        Value::Int(i) => i32::try_from(i).ok(),
        Value::BulkString(b) => std::str::from_utf8(&b).ok().and_then(|t| t.parse::<i32>().ok()),
        _ => None,
    };
    days.map(|d| Some(Date::from_days(d)))
        .ok_or_else(|| StoreError::Corrupt("a bucket holds a value that is not a day number".into()))
}

impl RedisStore {
    async fn lookup_unbounded(&self, number: PhoneNumber) -> Result<Lookup<Option<Date>>, StoreError> {
        let inner = &self.inner;
        let Some(current) = inner.current().await? else {
            return Ok(Lookup {
                found: None,
                meta: None,
            });
        };
        if inner
            .usable_filter(&current)
            .is_some_and(|f| !f.filter.may_contain(number.value()))
        {
            // Certainly no record: no round trip.
            return Ok(Lookup {
                found: None,
                meta: Some(current.meta.clone()),
            });
        }
        let (bucket, field) = current.generation.locate(number.value());
        let mut cmd = ::redis::cmd("HGET");
        cmd.arg(inner.keys.bucket(current.generation.id, bucket))
            .arg(field);
        let value: Value = inner.query(&cmd, inner.opts.timeout).await?;
        Ok(Lookup {
            found: parse_day(value)?,
            meta: Some(current.meta.clone()),
        })
    }

    /// See [`batch_timeout`].
    async fn lookup_many_unbounded(
        &self,
        all: &[PhoneNumber],
    ) -> Result<Lookup<Vec<Option<Date>>>, StoreError> {
        let inner = &self.inner;
        let Some(current) = inner.current().await? else {
            return Ok(Lookup {
                found: vec![None; all.len()],
                meta: None,
            });
        };
        // Only the numbers the filter does not rule out go to Redis.
        let filter = inner.usable_filter(&current);
        let (indexes, numbers): (Vec<usize>, Vec<PhoneNumber>) = all
            .iter()
            .enumerate()
            .filter(|(_, n)| filter.as_ref().is_none_or(|f| f.filter.may_contain(n.value())))
            .map(|(i, n)| (i, *n))
            .unzip();
        let mut found = vec![None; all.len()];
        if numbers.is_empty() {
            return Ok(Lookup {
                found,
                meta: Some(current.meta.clone()),
            });
        }
        let conn = inner.conn();
        let budget = batch_timeout(inner.opts.timeout, all.len());
        let values: Vec<Value> = if conn.is_cluster() {
            // A pipeline must stay inside one slot and a batch's buckets are
            // spread over all of them: one pipeline per slot, all sent at
            // once (the cluster connection multiplexes them on its node
            // connections).
            let mut by_slot: HashMap<u16, (::redis::Pipeline, Vec<usize>)> = HashMap::new();
            for (i, number) in numbers.iter().enumerate() {
                let (bucket, field) = current.generation.locate(number.value());
                let key = inner.keys.bucket(current.generation.id, bucket);
                let (pipe, indexes) = by_slot
                    .entry(conn::key_slot(key.as_bytes()))
                    .or_insert_with(|| (::redis::pipe(), Vec::new()));
                pipe.cmd("HGET").arg(key).arg(field);
                indexes.push(i);
            }
            let answers = futures_util::future::try_join_all(by_slot.into_values().map(|(pipe, indexes)| {
                let mut conn = conn.clone();
                async move {
                    let values: Vec<Value> = inner.pipeline_on(&mut conn, &pipe, budget).await?;
                    Ok::<_, StoreError>((indexes, values))
                }
            }))
            .await?;
            let mut values = vec![Value::Nil; numbers.len()];
            let mut answered = 0;
            for (indexes, got) in answers {
                if got.len() != indexes.len() {
                    return Err(StoreError::Unavailable(format!(
                        "redis answered {} of {} lookups",
                        got.len(),
                        indexes.len()
                    )));
                }
                answered += got.len();
                for (i, value) in indexes.into_iter().zip(got) {
                    values[i] = value;
                }
            }
            values.truncate(answered);
            values
        } else {
            let mut pipe = ::redis::pipe();
            for number in &numbers {
                let (bucket, field) = current.generation.locate(number.value());
                pipe.cmd("HGET")
                    .arg(inner.keys.bucket(current.generation.id, bucket))
                    .arg(field);
            }
            inner.pipeline_on(&mut conn.clone(), &pipe, budget).await?
        };
        if values.len() != numbers.len() {
            return Err(StoreError::Unavailable(format!(
                "redis answered {} of {} lookups",
                values.len(),
                numbers.len()
            )));
        }
        for (i, value) in indexes.into_iter().zip(values) {
            found[i] = parse_day(value)?;
        }
        Ok(Lookup {
            found,
            meta: Some(current.meta.clone()),
        })
    }
}

/// Bounds a whole read (a metadata refresh it may need included) by `limit`.
async fn bounded<T>(
    limit: Duration,
    read: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(limit, read)
        .await
        .unwrap_or(Err(StoreError::Timeout(limit)))
}

impl Store for RedisStore {
    async fn lookup(&self, number: PhoneNumber) -> Result<Lookup<Option<Date>>, StoreError> {
        bounded(self.inner.opts.timeout, self.lookup_unbounded(number)).await
    }

    async fn lookup_many(&self, numbers: &[PhoneNumber]) -> Result<Lookup<Vec<Option<Date>>>, StoreError> {
        bounded(
            batch_timeout(self.inner.opts.timeout, numbers.len()),
            self.lookup_many_unbounded(numbers),
        )
        .await
    }

    fn cached_meta(&self) -> Option<Arc<MirrorMeta>> {
        self.inner.current.load().as_ref().map(|c| c.meta.clone())
    }

    async fn refresh_meta(&self) -> Result<Option<Arc<MirrorMeta>>, StoreError> {
        Ok(self.inner.refresh().await?.map(|c| c.meta.clone()))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let inner = &self.inner;
        let reply: Value = inner.query(&::redis::cmd("PING"), inner.opts.timeout).await?;
        match reply {
            Value::SimpleString(s) if s == "PONG" => Ok(()),
            Value::BulkString(b) if b == b"PONG" => Ok(()),
            _ => Err(StoreError::Unavailable("redis: unexpected PING reply".into())),
        }
    }

    async fn apply_snapshot(
        &self,
        manifest: &Manifest,
        records: &Records,
        expected_previous: Option<u64>,
    ) -> Result<(), StoreError> {
        write::apply_snapshot(&self.inner, manifest, records, expected_previous).await
    }

    async fn apply_delta(&self, manifest: &Manifest, records: &Records) -> Result<(), StoreError> {
        write::apply_delta(&self.inner, manifest, records).await
    }

    async fn applied_checksums(&self) -> Result<HashMap<String, String>, StoreError> {
        write::applied_checksums(&self.inner).await
    }
}

impl RedisStore {
    /// Asks the imports of this process to stop cleanly at their next step
    /// (on SIGTERM): a snapshot not yet switched deletes its pending
    /// generation, one already switched finishes deleting the replaced
    /// generation; a delta stops before moving the sequence; the lock is
    /// released. Process-wide: every store of the process is affected.
    pub fn cancel_imports() {
        write::cancel_imports();
    }
}

/// The time a batch lookup of `n` numbers may take: the per-call timeout
/// detects a dead Redis; a big batch of real work gets 0.2 ms more per number
/// (a 1,000-number batch: 200 ms + 200 ms), so that many concurrent batches
/// queued behind each other are not mistaken for an outage.
fn batch_timeout(timeout: Duration, n: usize) -> Duration {
    timeout + Duration::from_micros(200).saturating_mul(u32::try_from(n).unwrap_or(u32::MAX))
}
