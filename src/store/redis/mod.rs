//! The production store: the mirror in Redis, shared by every server replica.
//!
//! # Key layout
//!
//! All keys start with a configurable prefix `{prefix}` (default `rn`).
//!
//! | key | type | content |
//! |---|---|---|
//! | `{prefix}:meta` | hash | the metadata (below) |
//! | `{prefix}:g{gen}:{bucket}` | string | one bucket of generation `gen`: a packed string whose header names `gen` (layout 3; see [`crate::store::packed`]) |
//! | `{prefix}:bloom:g{gen}:{chunk}` | string | the membership filter of generation `gen`, in chunks of at most 8 MiB |
//! | `{prefix}:gen_counter` | string | INCR counter: generation numbers are never reused |
//! | `{prefix}:lock` | string | the import lock: its owner (host, pid, process start, start time, random token) as JSON, PX 15 s, renewed every 3 s while importing |
//! | `{prefix}:applied` | hash | SHA-256 of applied files by `snapshot:N` / `delta:N` (the last 1,024 sequences) |
//! | `{prefix}:events` | pub/sub channel | `switched` after each snapshot switch (informational) |
//!
//! **Buckets** (layout 3). A snapshot chooses
//! `nbuckets = max(1, ceil(records / 256))` for its generation. Number `n`
//! (its E.164 digits as an integer) lives in bucket `n % nbuckets` with the
//! suffix `n / nbuckets`; `(bucket, suffix)` identifies `n` exactly. Each
//! bucket is one Redis string ([`crate::store::packed`]): an 18-byte header
//! (magic, layout, generation id, entry count, bit widths, day base) and the
//! bucket's entries sorted by suffix, each `suffix_bits + day_bits` bits
//! wide, with the narrowest widths that hold the bucket's largest suffix
//! and its range of days (about 30 bits per record for US-like numbers at
//! 10^7 records, fewer as the mirror grows). A lookup is one `GET` of about
//! 1 KB and a binary search here. Bucket keys carry no hash tag, so in a
//! cluster they spread over all slots. Deltas rewrite the buckets they
//! touch; buckets grow with them, and imports log a warning when the
//! average bucket passes 1,024 records (a new snapshot re-buckets).
//!
//! **Sentinels.** The header's generation id is the bucket's sentinel.
//! Every bucket of a generation, empty ones included, is written whole by
//! one `SET`, so a bucket is either absent or complete with its
//! generation. A missing key, a header naming another generation, or a
//! string that is no packed bucket means the read proves nothing (bucket
//! evicted or deleted, Redis lost its data, a stale replica, a switch not
//! seen yet); a packed header whose length disagrees with its body is
//! [`StoreError::Corrupt`]. A delta refuses to merge into a bucket without
//! its header (re-creating it would hide the loss).
//!
//! **Older layouts.** Layout 2 (the previous version's) stores each bucket as
//! a hash (`field = n / nbuckets`, value = days since 1970-01-01, about 128
//! fields) with the sentinel field `_g` = the generation id; it is still
//! read (`HMGET bucket field _g`, the same fail-closed rules) and deltas
//! still merge into it (a script per bucket), until the next snapshot writes
//! layout 3. Layout 1 (hashes without sentinels) is read unchecked, with a
//! warning. Which one a generation uses is the metadata's `layout`.
//!
//! **Metadata** (`{prefix}:meta`, one small hash): `generation`, `nbuckets`,
//! `sequence`, `as_of`, `coverage_start` (ISO dates), `prefixes`
//! (comma-separated, e.g. `+1,+86`), `record_count`, `last_import_unix`,
//! `layout` (`3`; `2` and `1`, hash buckets, are still read, see above), and,
//! only while needed, `pending_generation` /
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
//! (which stops when the last handle to the store is dropped), always from a
//! master. A lookup is at most one GET (HMGET on layouts 1 and 2); a batch
//! is at most one pipeline of them. If the cache has not been refreshed for `2 × meta_refresh` (Redis
//! was unreachable), a lookup first refreshes it, and fails if it cannot.
//!
//! **Fail closed.** An unproven read (bucket or sentinel missing or foreign) is
//! retried once with the metadata re-read, on the master; still unproven, it
//! is [`StoreError::Unavailable`] (or an empty mirror if the metadata is
//! gone), never "no record". A broken connection (Redis killed or restarted:
//! the client reconnects silently, maybe to an empty or older Redis) leaves
//! the cache unconfirmed: nothing, not even the membership filter, answers
//! until a metadata read made after the break. Each refresh also reads the
//! masters' `run_id` (a change unconfirms the cache the same way) and
//! `maxmemory-policy` (`allkeys-*` makes the store unsafe: lookups fail and
//! [`RedisStore::unsafe_reason`] says why; `volatile-*` and unknown, CONFIG
//! disabled, are served with one warning). Every Redis call, and every lookup as a whole, is bounded by
//! [`RedisOptions::timeout`] ([`StoreError::Timeout`]); Redis errors are
//! [`StoreError::Unavailable`].
//! On one server the connection is a
//! [`ConnectionManager`](::redis::aio::ConnectionManager), which reconnects by
//! itself when Redis comes back; if Redis stops answering on an open
//! connection (metadata refreshes time out for three `meta_refresh`
//! periods), the connection is replaced (on a cluster too).
//!
//! **Failover.** While Redis calls fail, the refresh runs every
//! `trouble_period` (at most 200 ms) instead of every `meta_refresh`. On a cluster,
//! redis-rs learns a new topology only from a MOVED reply and, while it
//! retries a dead master's address, holds every request of the connection;
//! so a probe task asks a seed for `CLUSTER SLOTS` every 100 ms
//! on a plain connection of its own and replaces the cluster connection as
//! soon as the masters changed (a replica promoted), which unconfirms the
//! cache like any broken connection. Replacements are counted
//! ([`RedisStore::replacements`]): the federation's event log sends its
//! reads that still wait on the old connection again on the new one.
//!
//! # Membership filter
//!
//! Most numbers asked have no record. Each snapshot also stores a Bloom
//! filter of its generation's numbers (about 12 bits per number, about 0.3%
//! false positives; layout and validity rules in the `bloom` module), and
//! each delta sets its numbers' bits before it moves the sequence. Each
//! process downloads the filter (on a connection of its own) whenever its
//! cached metadata shows a generation or sequence the loaded filter is not
//! for, and while the loaded filter matches the cached metadata exactly, a
//! number the filter rules out is answered "no record" without a Redis round
//! trip; everything else is a bucket read, as before. Until a new filter is
//! loaded (after a snapshot or a delta), lookups just ask Redis. The filter
//! costs about 1.5 bytes per record in Redis and in every server process
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
//! one pipeline of bucket reads per slot, all at once, snapshot and delta writes group
//! their bucket commands by slot (pipelines of one slot, 64 in flight), and a
//! replaced generation is deleted with concurrent single UNLINKs. With
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
//! into the new generation, one `SET` of the packed string built here per
//! bucket, in pipelines of about 64 Ki records, four in flight (Redis only
//! stores the bytes, so its single thread is not the bottleneck); then
//! switch in one atomic step: a
//! script on `{prefix}:meta` alone that checks sequence and pending
//! generation and sets all metadata fields. Before the switch (and before a
//! delta moves the sequence) the import waits for every replica of every
//! master (`WAIT`, [`RedisOptions::replication_timeout`]; a lagging replica
//! fails the import with the metadata unswitched). Readers
//! see the old generation or the new one, never a mix and never an empty
//! mirror. After [`RedisOptions::reclaim_grace`] (longer than any reader's
//! cache may lag) and once the replicas have the switch, the old
//! generation's keys are UNLINKed. While a snapshot is
//! written Redis holds both generations: plan memory for twice the mirror.
//!
//! *Delta*: the metadata sequence must be `delta.sequence - 1` (if it is
//! already `delta.sequence`, the delta was applied: nothing to do). The
//! buckets it touches are read (pipelined GETs), merged here (the later
//! date of old and new wins; new numbers are counted) and written back
//! (pipelined SETs); the import lock keeps every other writer out meanwhile.
//! A bucket whose header is missing or names another generation refuses
//! the delta ("import a snapshot"). On a layout-2 generation each bucket is
//! merged by a script instead, with the same rules. Then one check-and-set
//! script on `{prefix}:meta` moves the
//! sequence, `as_of`, `last_import_unix` and adds the new fields to
//! `record_count`. Applying a delta twice, or again after a crash half-way,
//! gives the same data as applying it once. `record_count` can then
//! under-count: numbers written by the crashed attempt are not new on the retry.
//!
//! Every script touches one key only, so the layout works on Redis Cluster
//! (see below).
//!
//! # Memory
//!
//! Measured on Redis 7.0 with US-like numbers (`used_memory` after a
//! snapshot, membership filter included; `bench_snapshot_memory_and_rate`
//! in `tests/redis_store.rs`, random US numbers): 6.53 bytes of `used_memory`
//! per record at 1 million records and 5.57 at 10 million (packed entries of
//! 34 and 30 bits, jemalloc's rounding of each string, about 80 bytes per
//! bucket key, and the filter's 1 byte). A `reassigned generate` register of
//! 10 million records (+1 and +86 numbers, so wider suffixes) took 6.97.
//! Layout 2 took 12.0 bytes per record (hash buckets of about 128 fields).

mod admin;
mod bloom;
mod conn;
mod meta;
mod shared;
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
use self::meta::{BloomParams, BucketLayout, Current, StoredMeta};
pub use self::shared::RedisConnection;
use super::{DeltaWrite, Lookup, Records, SnapshotWrite, Store, StoreError};
use crate::domain::{Date, MirrorMeta, PhoneNumber};
use crate::store::packed;

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
    /// replaced generation (default 3 s; raised to at least
    /// `3 × meta_refresh + timeout`). It spares readers whose cache still
    /// names the old generation a retry: a slower reader gets no wrong
    /// answer either (its reads find no sentinel, re-read the metadata and
    /// retry).
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
    /// How long an import waits for every replica to acknowledge its
    /// writes (`WAIT`) before it switches the generation or the sequence,
    /// and before it deletes a replaced generation (default 10 s). A
    /// snapshot or delta whose writes are not replicated in time fails,
    /// with the metadata unswitched.
    pub replication_timeout: Duration,
}

/// The prefix of every key of the mirror unless configured otherwise.
pub const DEFAULT_KEY_PREFIX: &str = "rn";

/// The timeout of each Redis call unless configured otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(200);

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            key_prefix: DEFAULT_KEY_PREFIX.to_owned(),
            timeout: DEFAULT_TIMEOUT,
            meta_refresh: Duration::from_secs(1),
            reclaim_grace: Duration::from_secs(3),
            bulk_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            read_from_replicas: false,
            membership_filter: true,
            replication_timeout: Duration::from_secs(10),
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
    /// With read-from-replicas on a cluster: a connection that reads from
    /// masters (metadata, and re-reads of unproven replica answers).
    masters: ArcSwapOption<Conn>,
    /// Bumped whenever a connection to Redis broke: the cached metadata is
    /// then unconfirmed until a metadata read that started after it.
    epoch: AtomicU64,
    /// Why Redis is unsafe to answer from (e.g. a maxmemory-policy that
    /// evicts keys); lookups fail while set.
    unsafe_reason: Flag,
    /// Set while the metadata is behind the latest generation and sequence
    /// this process has seen (Redis restarted from an older save, a
    /// failover lost writes): the data lost since is unknown, so lookups
    /// fail until an import brings the mirror back to (or past) that point.
    regressed: Flag,
    /// The generation and the latest sequence of it seen.
    high_water: std::sync::Mutex<Option<(u64, u64)>>,
    /// The run ids of the masters last seen (restart / failover detection).
    run_ids: std::sync::Mutex<Option<Vec<(String, String)>>>,
    /// Reads whose bucket sentinel did not prove them (counted).
    unproven_reads: AtomicU64,
    /// When a Redis call of a read last failed or timed out (ms since
    /// `started`; 0: never). While that is recent, the refresh loop checks
    /// the nodes and the metadata every [`trouble_period`] instead of every
    /// `meta_refresh`: a failover is noticed in a fraction of a second.
    trouble_ms: AtomicU64,
    /// Wakes the refresh loop at a failure (it still keeps
    /// [`trouble_period`] between two checks).
    wake: Arc<tokio::sync::Notify>,
    /// Wakes the topology probe ([`probe_loop`], clusters only) at a failure.
    probe_wake: Arc<tokio::sync::Notify>,
    /// On a cluster: the masters (`CLUSTER SLOTS` of a seed) at the last
    /// probe. Another set while reads fail makes a new connection.
    masters_at_connect: std::sync::Mutex<Option<Vec<String>>>,
    /// Masters whose appearance already replaced the read connection (by
    /// [`Inner::probe_masters`]): their first run id is not a change.
    adopted: std::sync::Mutex<Vec<String>>,
    /// Counts the replacements of the read connection
    /// ([`Inner::reset_connection`]): other rooms' reads waiting on the old
    /// connection (which may be stuck retrying a dead node) are sent again
    /// on the new one (see [`RedisStore::replacements`]).
    replaced: tokio::sync::watch::Sender<u64>,
    /// Once-only warnings (policy unknown or volatile, legacy layout).
    warned: std::sync::Mutex<std::collections::HashSet<&'static str>>,
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
        let mut opts = opts;
        opts.reclaim_grace = effective_reclaim_grace(&opts);
        let conn = tokio::time::timeout(opts.connect_timeout, target.connect(&opts))
            .await
            .map_err(|_| StoreError::Timeout(opts.connect_timeout))?
            .map_err(|e| unavailable(&secrets, &e))?;
        let (stop_tx, stop_rx) = oneshot::channel();
        let masters = target_masters(&target, &opts);
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
            masters: ArcSwapOption::from(masters),
            epoch: AtomicU64::new(0),
            unsafe_reason: Flag::default(),
            regressed: Flag::default(),
            high_water: std::sync::Mutex::new(None),
            run_ids: std::sync::Mutex::new(None),
            unproven_reads: AtomicU64::new(0),
            trouble_ms: AtomicU64::new(0),
            wake: Arc::new(tokio::sync::Notify::new()),
            probe_wake: Arc::new(tokio::sync::Notify::new()),
            masters_at_connect: std::sync::Mutex::new(None),
            adopted: std::sync::Mutex::new(Vec::new()),
            replaced: tokio::sync::watch::Sender::new(0),
            warned: std::sync::Mutex::new(std::collections::HashSet::new()),
            _stop: stop_tx,
            opts,
        });
        inner.check_nodes().await;
        inner.refresh().await?;
        inner.maybe_load_filter();
        tokio::spawn(refresh_loop(
            Arc::downgrade(&inner),
            inner.wake.clone(),
            stop_rx,
            inner.opts.meta_refresh.max(Duration::from_millis(10)),
        ));
        if matches!(inner.target, Target::Cluster { .. }) {
            tokio::spawn(probe_loop(
                Arc::downgrade(&inner),
                inner.probe_wake.clone(),
                inner.opts.meta_refresh.max(Duration::from_millis(10)),
            ));
        }
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

    /// Why this store refuses to answer from Redis right now (e.g. Redis'
    /// `maxmemory-policy` can evict the mirror's keys); `None`: safe.
    pub fn unsafe_reason(&self) -> Option<String> {
        self.inner.unsafe_now()
    }

    /// Reads so far whose bucket sentinel did not prove them (bucket
    /// missing, or of another generation); each was retried on the master
    /// with fresh metadata or answered UNAVAILABLE, never "no record".
    pub fn unproven_reads(&self) -> u64 {
        self.inner.unproven_reads.load(Ordering::Relaxed)
    }

    /// The reclaim grace this store uses (the configured one, raised to at
    /// least `3 × meta_refresh + timeout`).
    pub fn reclaim_grace(&self) -> Duration {
        self.inner.opts.reclaim_grace
    }

    /// True if this store talks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.inner.target, Target::Cluster { .. })
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
        self.bounded_call(limit, cmd.query_async(conn)).await
    }

    /// Every Redis call of the store, and of the rooms that borrow its
    /// connections ([`RedisStore::within`]), bounded by `limit`: running
    /// out of time is trouble ([`Inner::note_trouble`]) and a
    /// [`StoreError::Timeout`]; a failure is [`Inner::failed`]'s (a broken
    /// connection unconfirms the cache, whoever saw it break).
    async fn bounded_call<T>(
        &self,
        limit: Duration,
        call: impl Future<Output = ::redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(limit, call).await {
            Err(_) => {
                self.note_trouble();
                Err(StoreError::Timeout(limit))
            }
            Ok(Err(e)) => Err(self.failed(&e)),
            Ok(Ok(v)) => Ok(v),
        }
    }

    /// The error of a failed call; a broken connection also makes the
    /// cached metadata unconfirmed (see [`Inner::connection_lost`]).
    fn failed(&self, e: &RedisError) -> StoreError {
        self.note_trouble();
        if e.is_unrecoverable_error() || e.is_io_error() || e.is_connection_dropped() {
            self.connection_lost();
        }
        self.unavailable(e)
    }

    /// A Redis call failed or timed out: the refresh loop checks the nodes
    /// and the metadata faster until calls work again (a failed-over master
    /// is then replaced by its promoted replica within a fraction of a
    /// second instead of at the next `meta_refresh` tick).
    fn note_trouble(&self) {
        self.trouble_ms.store(self.now_ms().max(1), Ordering::Release);
        self.wake.notify_one();
        self.probe_wake.notify_one();
    }

    /// [`Inner::note_trouble`] for a read that ran out of time as a whole.
    fn note_timeout(&self, e: &StoreError) {
        if matches!(e, StoreError::Timeout(_)) {
            self.note_trouble();
        }
    }

    /// True if a Redis call failed within the last `within`.
    fn troubled_within(&self, within: Duration) -> bool {
        let at = self.trouble_ms.load(Ordering::Acquire);
        at != 0 && u128::from(self.now_ms().saturating_sub(at)) <= within.as_millis()
    }

    /// A connection broke: Redis may have restarted (possibly empty, or
    /// from an older save) behind it, and the client library reconnects
    /// silently. Until a metadata read that starts after this confirms the
    /// generation, no lookup is answered from the cache or the filter.
    fn connection_lost(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.refreshed_ms.store(0, Ordering::Release);
    }

    /// Sends one pipeline on `conn`, bounded by `limit`.
    async fn pipeline_on<T: FromRedisValue>(
        &self,
        conn: &mut Conn,
        pipe: &Pipeline,
        limit: Duration,
    ) -> Result<T, StoreError> {
        self.bounded_call(limit, pipe.query_async(conn)).await
    }

    /// A connection that reads from masters (on a cluster with
    /// read-from-replicas, a second one; else the read connection).
    fn master_conn(&self) -> Conn {
        match self.masters.load().as_deref() {
            Some(conn) => conn.clone(),
            None => self.conn(),
        }
    }

    /// Reads the whole metadata hash (from the master: a replica may lag).
    async fn read_meta(&self, limit: Duration) -> Result<StoredMeta, StoreError> {
        let mut cmd = ::redis::cmd("HGETALL");
        cmd.arg(&self.keys.meta);
        let raw: HashMap<Vec<u8>, Vec<u8>> = self.query_on(&mut self.master_conn(), &cmd, limit).await?;
        meta::parse(raw)
    }

    /// True the first time `key` is asked: for warnings logged once per
    /// process, not per call.
    fn warn_once(&self, key: &'static str) -> bool {
        self.warned.lock().map(|mut w| w.insert(key)).unwrap_or(false)
    }

    /// The reason the store must not be answered from, if any.
    fn unsafe_now(&self) -> Option<String> {
        self.unsafe_reason
            .load()
            .as_deref()
            .or(self.regressed.load().as_deref())
            .cloned()
    }

    /// Notes the metadata just read: a sequence behind the latest seen in
    /// the same generation means Redis lost deltas (restarted from an older
    /// save, a failover to a replica that missed writes) and makes the store
    /// unsafe until an import brings it back there: answers already given
    /// from those deltas are not taken back. Another generation (a switch,
    /// or the metadata edited by hand) and an empty mirror start over.
    fn track_progress(&self, now: Option<(u64, u64)>) {
        let Ok(mut high) = self.high_water.lock() else {
            return;
        };
        let Some(now) = now else {
            *high = None;
            self.regressed.store(None);
            return;
        };
        match *high {
            Some(seen) if now.0 == seen.0 && now.1 < seen.1 => {
                let reason = format!(
                    "the mirror went back from generation {} sequence {} to generation {} sequence {} (redis restarted from an older save or lost writes): re-run the import",
                    seen.0, seen.1, now.0, now.1
                );
                if self.regressed.load().as_deref() != Some(&reason) {
                    tracing::error!(reason = %reason, "redis lost data: lookups answer UNAVAILABLE, health is NOT_SERVING");
                    self.regressed.store(Some(Arc::new(reason)));
                }
            }
            _ => {
                *high = Some(now);
                if self.regressed.load().is_some() {
                    self.regressed.store(None);
                    tracing::info!("the redis mirror is back to the latest data seen");
                }
            }
        }
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
        let epoch = self.epoch.load(Ordering::Acquire);
        let stored = self.read_meta(self.opts.timeout).await?;
        if let Some(current) = &stored.current
            && current.layout == BucketLayout::Plain
            && self.warn_once("legacy_layout")
        {
            tracing::warn!(
                "the redis mirror was written without bucket sentinels (layout 1): lost buckets cannot be detected until the next snapshot import"
            );
        }
        let current = stored.current.map(Arc::new);
        let previous = self.current.swap(current.clone());
        let before = previous.as_ref().map(|c| (c.generation.id, c.meta.sequence));
        let after = current.as_ref().map(|c| (c.generation.id, c.meta.sequence));
        self.track_progress(after);
        if before != after {
            tracing::info!(
                generation = after.map(|a| a.0),
                sequence = after.map(|a| a.1),
                records = current.as_ref().map(|c| c.meta.record_count),
                "redis mirror metadata changed"
            );
        }
        // A connection that broke while this read was on its way leaves the
        // cache unconfirmed.
        if self.epoch.load(Ordering::Acquire) == epoch {
            self.refreshed_ms.fetch_max(read_at.max(1), Ordering::AcqRel);
        }
        Ok(current)
    }

    /// The cached generation, refreshed first if the cache is too old to be
    /// trusted (the background refresh has been failing).
    async fn current(&self) -> Result<Option<Arc<Current>>, StoreError> {
        let current = self.current_unchecked().await?;
        // Checked after the refresh too: the read that finds the data lost
        // must not be answered from it.
        if let Some(reason) = self.unsafe_now() {
            return Err(StoreError::Unavailable(format!(
                "redis is unsafe to answer from: {reason}"
            )));
        }
        Ok(current)
    }

    async fn current_unchecked(&self) -> Result<Option<Arc<Current>>, StoreError> {
        if self.cache_fresh() {
            return Ok(self.current.load_full());
        }
        let _serial = self.refresh_lock.lock().await;
        // Someone else may have refreshed while we waited.
        if self.cache_fresh() {
            return Ok(self.current.load_full());
        }
        self.refresh_locked().await
    }

    /// True if the cache was confirmed by a metadata read recently enough
    /// (and no connection broke since).
    fn cache_fresh(&self) -> bool {
        let refreshed = self.refreshed_ms.load(Ordering::Acquire);
        refreshed != 0 && self.now_ms().saturating_sub(refreshed) <= self.max_cache_age_ms()
    }

    /// The metadata to retry an unproven read with: re-read from the master
    /// unless a read that started after `since` (ms) already did.
    async fn recheck(&self, since: u64) -> Result<Option<Arc<Current>>, StoreError> {
        let _serial = self.refresh_lock.lock().await;
        let current = if self.refreshed_ms.load(Ordering::Acquire) > since {
            self.current.load_full()
        } else {
            self.refresh_locked().await?
        };
        if let Some(reason) = self.unsafe_now() {
            return Err(StoreError::Unavailable(format!(
                "redis is unsafe to answer from: {reason}"
            )));
        }
        Ok(current)
    }

    /// Reads, on every master, the run id (a restart or a failover changes
    /// it) and the `maxmemory-policy` (one that can evict the mirror's keys
    /// makes the store unsafe: lookups fail, health is NOT_SERVING). A
    /// master that does not answer keeps its last state; `CONFIG` disabled
    /// or renamed (managed Redis) is "unknown": logged once, and served
    /// (bucket sentinels still turn an evicted bucket into UNAVAILABLE).
    async fn check_nodes(&self) {
        let limit = self.opts.timeout;
        let moved = self.probe_masters(limit).await;
        let mut conn = self.master_conn();
        let mut info = ::redis::cmd("INFO");
        info.arg("server");
        let mut policy = ::redis::cmd("CONFIG");
        policy.arg("GET").arg("maxmemory-policy");
        let (infos, policies) = {
            let mut other = conn.clone();
            futures_util::join!(conn.on_masters(&info, limit), other.on_masters(&policy, limit))
        };
        let ids: Vec<(String, String)> = infos
            .into_iter()
            .filter_map(|(node, r)| Some((node, info_field(&r.ok()?, "run_id")?)))
            .collect();
        // Changed: a master answering with another run id than before, or
        // a master not seen before (a promoted replica). A master that does
        // not answer this time keeps its last entry.
        let changed = match self.run_ids.lock() {
            Ok(mut seen) => {
                let known = seen.get_or_insert_with(Vec::new);
                let first = known.is_empty();
                let mut changed = false;
                for (node, id) in ids {
                    match known.iter_mut().find(|(n, _)| *n == node) {
                        Some((_, old)) if *old == id => {}
                        Some((_, old)) => {
                            *old = id;
                            changed = true;
                        }
                        None => {
                            // A promoted replica the probe already replaced
                            // the connection for is no second change.
                            let adopted = self
                                .adopted
                                .lock()
                                .map(|mut a| {
                                    let had = a.contains(&node);
                                    a.retain(|n| *n != node);
                                    had
                                })
                                .unwrap_or(false);
                            known.push((node, id));
                            changed |= !first && !adopted;
                        }
                    }
                }
                changed
            }
            Err(_) => false,
        };
        if changed && !moved {
            tracing::warn!(
                "a redis master restarted or failed over (run id changed): re-reading the metadata before the next answer"
            );
            if matches!(self.target, Target::Cluster { .. }) {
                // A fresh cluster connection reads the new topology at once
                // instead of waiting for its own retries.
                self.reset_connection();
            } else {
                self.connection_lost();
            }
        }
        let mut unsafe_nodes = Vec::new();
        let mut answered = false;
        for (node, reply) in policies {
            match reply.as_ref().map(config_value) {
                Ok(Some(p)) => {
                    answered = true;
                    if p.starts_with("allkeys-") {
                        unsafe_nodes.push(format!(
                            "{p} on {}",
                            if node.is_empty() { "redis" } else { &node }
                        ));
                    } else if p.starts_with("volatile-") && self.warn_once("volatile_policy") {
                        tracing::warn!(
                            policy = %p,
                            "redis maxmemory-policy evicts keys with a TTL only: the mirror's keys have none, served"
                        );
                    }
                }
                Ok(None) | Err(_) => {
                    if reply.as_ref().is_err_and(|e| e.kind() == ::redis::ErrorKind::Io) {
                        continue; // node down: keep the last state
                    }
                    if self.warn_once("policy_unknown") {
                        tracing::warn!(
                            "cannot read redis' maxmemory-policy (CONFIG disabled or renamed?): make sure it is noeviction; served, lost buckets still answer UNAVAILABLE"
                        );
                    }
                }
            }
        }
        if !unsafe_nodes.is_empty() {
            let reason = format!(
                "maxmemory-policy {} can evict the mirror's keys (set noeviction)",
                unsafe_nodes.join(", ")
            );
            let changed = self.unsafe_reason.load().as_deref() != Some(&reason);
            if changed {
                tracing::error!(reason = %reason, "redis is unsafe: lookups answer UNAVAILABLE, health is NOT_SERVING");
                self.unsafe_reason.store(Some(Arc::new(reason)));
            }
        } else if answered && self.unsafe_reason.load().is_some() {
            tracing::info!("redis maxmemory-policy is safe again");
            self.unsafe_reason.store(None);
        }
    }

    fn max_cache_age_ms(&self) -> u64 {
        u64::try_from((self.opts.meta_refresh * 2).as_millis()).unwrap_or(u64::MAX)
    }

    /// On a cluster while reads fail (and once at the start): asks a seed
    /// for the masters; if they changed since the last probe (a replica
    /// promoted), replaces the read connection at once and returns true.
    /// The client library learns a new topology only from a MOVED reply
    /// and holds every request while it retries a dead master's address;
    /// a new connection reads the slots as it connects.
    async fn probe_masters(&self, limit: Duration) -> bool {
        let probe = self.troubled_within(self.opts.meta_refresh)
            || self
                .masters_at_connect
                .lock()
                .map(|m| m.is_none())
                .unwrap_or(false);
        if !probe {
            return false;
        }
        let Some(now) = self.target.seed_masters(limit).await else {
            return false;
        };
        let moved = match self.masters_at_connect.lock() {
            Ok(mut seen) => {
                let moved = seen.as_ref().is_some_and(|before| *before != now);
                if moved && let (Some(before), Ok(mut adopted)) = (seen.as_ref(), self.adopted.lock()) {
                    adopted.extend(now.iter().filter(|m| !before.contains(m)).cloned());
                }
                *seen = Some(now);
                moved
            }
            Err(_) => false,
        };
        if moved {
            tracing::warn!("the redis cluster's masters changed while reads fail: new connection");
            self.reset_connection();
        }
        moved
    }

    /// Replaces the read connection (the old one stopped answering, or the
    /// cluster's topology changed under it).
    fn reset_connection(&self) {
        self.connection_lost();
        self.masters
            .store(self.target.connect_lazy_masters(&self.opts).map(Arc::new));
        match self.target.connect_lazy(&self.opts) {
            Ok(conn) => {
                self.conn.store(Arc::new(conn));
                self.replaced.send_modify(|n| *n += 1);
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

impl LoadedFilter {
    /// Whether this filter may rule numbers out for `current`: the metadata
    /// names a filter, and this one is of exactly its generation and
    /// sequence (the one check of the fast path and the full path).
    fn is_for(&self, current: &Current) -> bool {
        current.bloom.is_some()
            && self.generation == current.generation.id
            && self.sequence == current.meta.sequence
    }
}

/// A reason that may be set (why Redis is unsafe to answer from), with a
/// flag the lookup path reads instead: one atomic load rather than a
/// guarded load of the reason on every in-process answer. The flag always
/// says whether the last reason stored is set (both are written under one
/// lock).
#[derive(Default)]
struct Flag {
    reason: ArcSwapOption<String>,
    set: AtomicBool,
    write: std::sync::Mutex<()>,
}

impl Flag {
    fn load(&self) -> arc_swap::Guard<Option<Arc<String>>> {
        self.reason.load()
    }

    fn store(&self, reason: Option<Arc<String>>) {
        let _write = self
            .write
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let set = reason.is_some();
        self.reason.store(reason);
        self.set.store(set, Ordering::SeqCst);
    }

    #[inline]
    fn is_set(&self) -> bool {
        self.set.load(Ordering::SeqCst)
    }
}

/// After a failed filter download, wait this long before the next attempt.
const FILTER_RETRY_MS: u64 = 10_000;

impl Inner {
    /// The in-process fast path of one lookup: with cached metadata that is
    /// fresh and confirmed, a store that is safe to answer from, and the
    /// membership filter of exactly that generation and sequence loaded, a
    /// number the filter rules out is certainly without a record and is
    /// answered here: no round trip, no timer, no connection handle, no
    /// reference count touched but the metadata's. Every other case (`None`)
    /// takes the full path, which makes the same checks and more.
    fn filter_miss(&self, number: PhoneNumber) -> Option<Lookup<Option<Date>>> {
        let epoch = self.epoch.load(Ordering::Acquire);
        if !self.cache_fresh() || self.unsafe_reason.is_set() || self.regressed.is_set() {
            return None;
        }
        let current = self.current.load();
        let current = current.as_ref()?;
        let filter = self.filter.load();
        let filter = filter.as_ref().filter(|f| f.is_for(current))?;
        if filter.filter.may_contain(number.value()) {
            return None;
        }
        // As on the full path: a connection that broke meanwhile leaves the
        // cache unconfirmed, and nothing is answered from it.
        (self.epoch.load(Ordering::Acquire) == epoch).then(|| Lookup {
            found: None,
            meta: Some(current.meta.clone()),
        })
    }

    /// The loaded filter if it belongs to exactly `current`.
    fn usable_filter(&self, current: &Current) -> Option<Arc<LoadedFilter>> {
        self.filter.load_full().filter(|f| f.is_for(current))
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

/// The period of the refresh loop while Redis calls fail: a fifth of
/// `meta_refresh`, between 20 and 200 ms (at most `meta_refresh`).
fn trouble_period(period: Duration) -> Duration {
    (period / 5)
        .clamp(Duration::from_millis(20), Duration::from_millis(200))
        .min(period)
}

/// How often [`probe_loop`] asks a seed for the masters while reads fail.
const PROBE_PERIOD: Duration = Duration::from_millis(100);

/// On a cluster, while reads fail: asks a seed for the masters every
/// [`PROBE_PERIOD`] (one `CLUSTER SLOTS` on a short plain connection) and
/// replaces the read connection as soon as a replica was promoted (see
/// [`Inner::probe_masters`]), independently of the refresh loop, whose
/// calls wait on the stuck cluster connection. Idle otherwise; ends within
/// `period` of the store being dropped.
async fn probe_loop(inner: Weak<Inner>, wake: Arc<tokio::sync::Notify>, period: Duration) {
    loop {
        let troubled = match inner.upgrade() {
            Some(inner) => inner.troubled_within(period),
            None => return,
        };
        if troubled {
            tokio::time::sleep(PROBE_PERIOD).await;
        } else {
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(period) => continue,
            }
        }
        let Some(inner) = inner.upgrade() else { return };
        inner.probe_masters(inner.opts.timeout).await;
    }
}

/// Checks the nodes and re-reads the metadata every `period` until the
/// store is dropped; while Redis calls fail (see [`Inner::note_trouble`]),
/// at once and then every [`trouble_period`]: one `CLUSTER SLOTS`, one
/// `INFO` and one `CONFIG GET` per master and one `HGETALL` per check,
/// never more often than that, however many lookups fail.
async fn refresh_loop(
    inner: Weak<Inner>,
    wake: Arc<tokio::sync::Notify>,
    mut stop: oneshot::Receiver<()>,
    period: Duration,
) {
    let fast = trouble_period(period);
    let mut wait = period;
    let mut stuck_since: Option<Instant> = None;
    let mut failing = false;
    loop {
        // At least `fast` between two checks, whatever wakes the loop.
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(fast) => {}
        }
        if wait > fast {
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(wait - fast) => {}
                _ = wake.notified() => {}
            }
        }
        let Some(inner) = inner.upgrade() else { return };
        inner.check_nodes().await;
        match inner.refresh().await {
            Ok(_) => {
                inner.maybe_load_filter();
                stuck_since = None;
                if failing {
                    failing = false;
                    tracing::info!("redis metadata refresh works again");
                }
            }
            Err(e) => {
                if matches!(e, StoreError::Timeout(_)) {
                    // Timing out for STUCK_REFRESHES periods in a row: Redis
                    // stopped answering on an open socket.
                    let since = *stuck_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= period * STUCK_REFRESHES {
                        stuck_since = None;
                        inner.reset_connection();
                    }
                } else {
                    stuck_since = None;
                }
                if !failing {
                    failing = true;
                    tracing::warn!(error = %e, "redis metadata refresh failed; lookups fail until it works again");
                }
            }
        }
        wait = if inner.troubled_within(period) {
            fast
        } else {
            period
        };
    }
}

/// A field of an `INFO` reply (`name:value` lines).
pub(super) fn info_field(reply: &Value, name: &str) -> Option<String> {
    let text = match reply {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::VerbatimString { text, .. } => text.clone(),
        Value::SimpleString(s) => s.clone(),
        _ => return None,
    };
    text.lines().find_map(|l| {
        l.strip_prefix(name)?
            .strip_prefix(':')
            .map(|v| v.trim().to_owned())
    })
}

/// The value of a `CONFIG GET name` reply (an array `[name, value]` or a map).
fn config_value(reply: &Value) -> Option<String> {
    let text = |v: &Value| match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    match reply {
        Value::Array(items) => items.get(1).and_then(text),
        Value::Map(pairs) => pairs.first().and_then(|(_, v)| text(v)),
        _ => None,
    }
}

/// The reclaim grace a store uses: the configured one, raised to at least
/// `3 × meta_refresh + timeout` (a reader's cache lags at most
/// `2 × meta_refresh` plus one read).
fn effective_reclaim_grace(opts: &RedisOptions) -> Duration {
    opts.reclaim_grace.max(opts.meta_refresh * 3 + opts.timeout)
}

/// The masters-only connection of a cluster with read-from-replicas.
fn target_masters(target: &Target, opts: &RedisOptions) -> Option<Arc<Conn>> {
    target.connect_lazy_masters(opts).map(Arc::new)
}

/// The command reading `number`'s bucket: `GET bucket` (layout 3, searched
/// here by [`proven_packed`]) or `HMGET bucket field _g` (layouts 1 and 2).
fn bucket_read(keys: &Keys, current: &Current, number: u64) -> Cmd {
    let (bucket, field) = current.generation.locate(number);
    let key = keys.bucket(current.generation.id, bucket);
    if current.layout == BucketLayout::Packed {
        let mut cmd = ::redis::cmd("GET");
        cmd.arg(key);
        cmd
    } else {
        let mut cmd = ::redis::cmd("HMGET");
        cmd.arg(key).arg(field).arg(meta::SENTINEL);
        cmd
    }
}

/// One answer of [`bucket_read`] for `number`: its date if the bucket's
/// sentinel (layout 2) or packed header (layout 3) proves the read
/// (`Ok(None)`: the read proves nothing).
fn proven(current: &Current, number: u64, reply: Value) -> Result<Option<Option<Date>>, StoreError> {
    if current.layout == BucketLayout::Packed {
        proven_packed(current, current.generation.locate(number).1, reply)
    } else {
        proven_day(current, reply)
    }
}

/// One answer of `GET bucket` (layout 3): the date stored for `suffix` if the
/// string is a packed bucket of the current generation. A missing key, a
/// string of another generation or one that is no packed bucket proves
/// nothing; a packed header whose body disagrees with it is corrupt.
fn proven_packed(current: &Current, suffix: u64, reply: Value) -> Result<Option<Option<Date>>, StoreError> {
    let bytes = match reply {
        Value::Nil => return Ok(None),
        Value::BulkString(b) => b,
        _ => return Err(StoreError::Unavailable("redis: unexpected GET reply".into())),
    };
    match packed::Bucket::parse(&bytes) {
        Err(packed::PackedError::Foreign) => Ok(None),
        Err(packed::PackedError::Malformed) => Err(StoreError::Corrupt(
            "a packed bucket's length disagrees with its header".into(),
        )),
        Ok(b) if b.header().generation != current.generation.id => Ok(None),
        Ok(b) => Ok(Some(b.find(suffix).map(|d| Date::from_days(i32::from(d))))),
    }
}

/// One answer of `HMGET bucket field _g`: the number's date if the bucket
/// sentinel proves the read (`Ok(None)`: the read proves nothing).
fn proven_day(current: &Current, reply: Value) -> Result<Option<Option<Date>>, StoreError> {
    let mut items = match reply {
        Value::Array(items) if items.len() == 2 => items,
        _ => return Err(StoreError::Unavailable("redis: unexpected HMGET reply".into())),
    };
    let sentinel = items.pop().unwrap_or(Value::Nil);
    let value = items.pop().unwrap_or(Value::Nil);
    if current.layout != BucketLayout::Plain {
        let id = current.generation.id;
        let names_current = match &sentinel {
            Value::BulkString(b) => {
                std::str::from_utf8(b).ok().and_then(|t| t.parse::<u64>().ok()) == Some(id)
            }
            Value::Int(i) => u64::try_from(*i).ok() == Some(id),
            _ => false,
        };
        if !names_current {
            return Ok(None);
        }
    }
    parse_day(value).map(Some)
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
        self.proven_read(
            || None,
            |mut conn, current| async move { inner.read_one(&mut conn, &current, number).await },
        )
        .await
    }

    /// See [`batch_timeout`].
    async fn lookup_many_unbounded(
        &self,
        all: &[PhoneNumber],
    ) -> Result<Lookup<Vec<Option<Date>>>, StoreError> {
        let inner = &self.inner;
        self.proven_read(
            || vec![None; all.len()],
            |conn, current| async move { inner.read_many(conn, &current, all).await },
        )
        .await
    }

    /// The one read protocol of lookups: `read` with the cached metadata on
    /// a reading connection; if the buckets' sentinels prove nothing (`None`)
    /// or a connection broke while the read was on its way (it may have been
    /// answered by a Redis that came back with other data), the metadata is
    /// re-read and `read` runs once more on the master. `empty`: the answer
    /// of a mirror without data.
    async fn proven_read<T, F>(
        &self,
        empty: impl Fn() -> T,
        read: impl Fn(Conn, Arc<Current>) -> F,
    ) -> Result<Lookup<T>, StoreError>
    where
        F: Future<Output = Result<Option<T>, StoreError>>,
    {
        let inner = &self.inner;
        let started = inner.now_ms();
        let epoch = inner.epoch.load(Ordering::Acquire);
        let Some(current) = inner.current().await? else {
            return Ok(Lookup {
                found: empty(),
                meta: None,
            });
        };
        if let Some(found) = read(inner.conn(), current.clone()).await?
            && inner.epoch.load(Ordering::Acquire) == epoch
        {
            return Ok(Lookup {
                found,
                meta: Some(current.meta.clone()),
            });
        }
        inner.unproven_reads.fetch_add(1, Ordering::Relaxed);
        let Some(current) = inner.recheck(started).await? else {
            return Ok(Lookup {
                found: empty(),
                meta: None,
            });
        };
        match read(inner.master_conn(), current.clone()).await? {
            Some(found) => Ok(Lookup {
                found,
                meta: Some(current.meta.clone()),
            }),
            None => Err(unproven(&current)),
        }
    }
}

/// The error of a read that stayed unproven on the master with fresh
/// metadata: the bucket is gone (evicted, deleted, Redis lost data).
fn unproven(current: &Current) -> StoreError {
    StoreError::Unavailable(format!(
        "redis: a bucket of generation {} has no sentinel (evicted, deleted or lost): its numbers cannot be answered",
        current.generation.id
    ))
}

impl Inner {
    /// One number: `Ok(None)` if the bucket's sentinel does not prove the
    /// read. A number the loaded filter rules out needs no round trip.
    async fn read_one(
        &self,
        conn: &mut Conn,
        current: &Current,
        number: PhoneNumber,
    ) -> Result<Option<Option<Date>>, StoreError> {
        if self
            .usable_filter(current)
            .is_some_and(|f| !f.filter.may_contain(number.value()))
        {
            // Certainly no record: no round trip.
            return Ok(Some(None));
        }
        let cmd = bucket_read(&self.keys, current, number.value());
        let reply: Value = self.query_on(conn, &cmd, self.opts.timeout).await?;
        proven(current, number.value(), reply)
    }

    /// Many numbers, in the order asked: `Ok(None)` if any bucket's
    /// sentinel does not prove its read.
    async fn read_many(
        &self,
        conn: Conn,
        current: &Current,
        all: &[PhoneNumber],
    ) -> Result<Option<Vec<Option<Date>>>, StoreError> {
        // Only the numbers the filter does not rule out go to Redis.
        let filter = self.usable_filter(current);
        let (indexes, numbers): (Vec<usize>, Vec<PhoneNumber>) = all
            .iter()
            .enumerate()
            .filter(|(_, n)| filter.as_ref().is_none_or(|f| f.filter.may_contain(n.value())))
            .map(|(i, n)| (i, *n))
            .unzip();
        let mut found = vec![None; all.len()];
        if numbers.is_empty() {
            return Ok(Some(found));
        }
        let budget = batch_timeout(self.opts.timeout, all.len());
        let values: Vec<Value> = if conn.is_cluster() {
            // A pipeline must stay inside one slot and a batch's buckets are
            // spread over all of them: one pipeline per slot, all sent at
            // once (the cluster connection multiplexes them on its node
            // connections).
            let mut by_slot: HashMap<u16, (::redis::Pipeline, Vec<usize>)> = HashMap::new();
            for (i, number) in numbers.iter().enumerate() {
                let (bucket, _) = current.generation.locate(number.value());
                let key = self.keys.bucket(current.generation.id, bucket);
                let (pipe, indexes) = by_slot
                    .entry(conn::key_slot(key.as_bytes()))
                    .or_insert_with(|| (::redis::pipe(), Vec::new()));
                pipe.add_command(bucket_read(&self.keys, current, number.value()));
                indexes.push(i);
            }
            let answers = futures_util::future::try_join_all(by_slot.into_values().map(|(pipe, indexes)| {
                let mut conn = conn.clone();
                async move {
                    let values: Vec<Value> = self.pipeline_on(&mut conn, &pipe, budget).await?;
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
                pipe.add_command(bucket_read(&self.keys, current, number.value()));
            }
            self.pipeline_on(&mut conn.clone(), &pipe, budget).await?
        };
        if values.len() != numbers.len() {
            return Err(StoreError::Unavailable(format!(
                "redis answered {} of {} lookups",
                values.len(),
                numbers.len()
            )));
        }
        for ((i, number), value) in indexes.into_iter().zip(&numbers).zip(values) {
            match proven(current, number.value(), value)? {
                Some(day) => found[i] = day,
                None => return Ok(None),
            }
        }
        Ok(Some(found))
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
    /// Most numbers asked about have no record: the membership filter
    /// answers them in process (see `filter_miss` for when it may).
    fn lookup_now(&self, number: PhoneNumber) -> Option<Result<Lookup<Option<Date>>, StoreError>> {
        self.inner.filter_miss(number).map(Ok)
    }

    async fn lookup(&self, number: PhoneNumber) -> Result<Lookup<Option<Date>>, StoreError> {
        // No `filter_miss` here: the login path asked `lookup_now` first,
        // and `read_one` asks the filter anyway (after the metadata
        // check), so a number it rules out still costs no round trip.
        bounded(self.inner.opts.timeout, self.lookup_unbounded(number))
            .await
            .inspect_err(|e| self.inner.note_timeout(e))
    }

    async fn lookup_many(&self, numbers: &[PhoneNumber]) -> Result<Lookup<Vec<Option<Date>>>, StoreError> {
        bounded(
            batch_timeout(self.inner.opts.timeout, numbers.len()),
            self.lookup_many_unbounded(numbers),
        )
        .await
        .inspect_err(|e| self.inner.note_timeout(e))
    }

    fn cached_meta(&self) -> Option<Arc<MirrorMeta>> {
        self.inner.current.load().as_ref().map(|c| c.meta.clone())
    }

    async fn refresh_meta(&self) -> Result<Option<Arc<MirrorMeta>>, StoreError> {
        Ok(self.inner.refresh().await?.map(|c| c.meta.clone()))
    }

    /// One server: PING. A cluster: PING on every master, fine as soon as
    /// one answers (the other shards answer UNAVAILABLE per call while they
    /// fail over; one shard down must not pull every server out of a load
    /// balancer).
    async fn ping(&self) -> Result<(), StoreError> {
        let inner = &self.inner;
        let reply = inner
            .conn()
            .ping_any_master(inner.opts.timeout)
            .await
            .map_err(|e| inner.unavailable(&e))?;
        match reply {
            Value::SimpleString(s) if s == "PONG" => Ok(()),
            Value::BulkString(b) if b == b"PONG" => Ok(()),
            _ => Err(StoreError::Unavailable("redis: unexpected PING reply".into())),
        }
    }

    fn unsafe_reason(&self) -> Option<String> {
        RedisStore::unsafe_reason(self)
    }

    async fn apply_snapshot(
        &self,
        snapshot: &SnapshotWrite,
        records: &Records,
        expected_previous: Option<u64>,
    ) -> Result<(), StoreError> {
        write::apply_snapshot(&self.inner, snapshot, records, expected_previous).await
    }

    async fn apply_delta(&self, delta: &DeltaWrite, records: &Records) -> Result<(), StoreError> {
        write::apply_delta(&self.inner, delta, records).await
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Prefix;

    fn current(id: u64, layout: BucketLayout) -> Current {
        Current {
            generation: meta::Generation { id, nbuckets: 3 },
            meta: Arc::new(MirrorMeta {
                sequence: 1,
                as_of: Date::from_days(20_000),
                coverage_start: Date::from_days(18_654),
                prefixes: vec![Prefix::parse("+1").expect("prefix")],
                record_count: 1,
                last_import_unix: 0,
            }),
            bloom: None,
            layout,
        }
    }

    fn reply(value: Option<&str>, sentinel: Option<&str>) -> Value {
        let v = |t: Option<&str>| t.map_or(Value::Nil, |t| Value::BulkString(t.as_bytes().to_vec()));
        Value::Array(vec![v(value), v(sentinel)])
    }

    #[test]
    fn a_read_is_proven_only_by_its_generations_sentinel() {
        let c = current(7, BucketLayout::Sentinel);
        let day = |d: i32| Some(Some(Date::from_days(d)));
        assert_eq!(
            proven_day(&c, reply(Some("19000"), Some("7"))).expect("ok"),
            day(19_000)
        );
        assert_eq!(proven_day(&c, reply(None, Some("7"))).expect("ok"), Some(None));
        // Bucket gone, or of another generation: proves nothing.
        assert_eq!(proven_day(&c, reply(None, None)).expect("ok"), None);
        assert_eq!(proven_day(&c, reply(Some("19000"), None)).expect("ok"), None);
        assert_eq!(proven_day(&c, reply(None, Some("6"))).expect("ok"), None);
        assert_eq!(proven_day(&c, reply(None, Some("7x"))).expect("ok"), None);
        // Layout 1 (no sentinels): unchecked.
        assert_eq!(
            proven_day(&current(7, BucketLayout::Plain), reply(None, None)).expect("ok"),
            Some(None)
        );
        assert!(proven_day(&c, Value::Nil).is_err());
    }

    #[test]
    fn a_packed_read_is_proven_only_by_its_generations_header() {
        let c = current(7, BucketLayout::Packed);
        let bucket = |generation: u64| {
            let mut out = Vec::new();
            packed::encode(generation, &[(3, 19_000), (9, 19_500)], &mut out);
            Value::BulkString(out)
        };
        let day = |d: i32| Some(Some(Date::from_days(d)));
        assert_eq!(proven_packed(&c, 9, bucket(7)).expect("ok"), day(19_500));
        assert_eq!(proven_packed(&c, 4, bucket(7)).expect("ok"), Some(None));
        // Missing, of another generation, or not a packed bucket: unproven.
        assert_eq!(proven_packed(&c, 9, Value::Nil).expect("ok"), None);
        assert_eq!(proven_packed(&c, 9, bucket(6)).expect("ok"), None);
        assert_eq!(
            proven_packed(&c, 9, Value::BulkString(b"19000".to_vec())).expect("ok"),
            None
        );
        // Our header with a body that disagrees: corrupt, never "no record".
        let Value::BulkString(mut cut) = bucket(7) else {
            unreachable!()
        };
        cut.pop();
        assert!(matches!(
            proven_packed(&c, 4, Value::BulkString(cut)),
            Err(StoreError::Corrupt(_))
        ));
        assert!(proven_packed(&c, 4, Value::Int(1)).is_err());
    }

    #[test]
    fn info_and_config_replies() {
        let info = Value::BulkString(b"# Server\r\nredis_version:7.0.15\r\nrun_id:abc123\r\n".to_vec());
        assert_eq!(info_field(&info, "run_id").as_deref(), Some("abc123"));
        assert_eq!(info_field(&info, "run"), None);
        let config = Value::Array(vec![
            Value::BulkString(b"maxmemory-policy".to_vec()),
            Value::BulkString(b"allkeys-lru".to_vec()),
        ]);
        assert_eq!(config_value(&config).as_deref(), Some("allkeys-lru"));
        assert_eq!(config_value(&Value::Array(vec![])), None);
    }

    #[test]
    fn reclaim_grace_covers_the_slowest_reader() {
        let opts = RedisOptions {
            timeout: Duration::from_millis(2_000),
            ..RedisOptions::default()
        };
        assert_eq!(effective_reclaim_grace(&opts), Duration::from_millis(5_000));
        assert_eq!(
            effective_reclaim_grace(&RedisOptions::default()),
            Duration::from_millis(3_200)
        );
    }
}
