//! Imports: the lock, snapshots (a new generation and an atomic switch) and
//! deltas (a per-bucket merge and a check-and-set of the metadata).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ::redis::{Script, ScriptInvocation, Value};
use futures_util::{StreamExt, TryStreamExt, stream};

use super::Inner;
use super::bloom::{self, Filter};
use super::conn::{Conn, key_slot};
use super::meta::{self, BloomParams, BucketLayout, Generation, StoredMeta, field};
use crate::domain::MirrorMeta;
use crate::store::{APPLIED_KEEP, DeltaWrite, Records, SnapshotWrite, StoreError, packed};

/// Target number of records per packed bucket when a snapshot chooses
/// `nbuckets` (layout 3): the key overhead (about 80 bytes) is then about
/// 0.3 bytes per record, and a lookup reads about 1 KB.
pub(super) const RECORDS_PER_BUCKET: u64 = 256;
/// Above this many records per packed bucket on average, deltas warn
/// (lookups read and search larger strings): import a snapshot.
const WARN_RECORDS_PER_BUCKET: u64 = 4 * RECORDS_PER_BUCKET;
/// Fields per bucket of the hash layouts (1 and 2) at snapshot time.
const LEGACY_FIELDS_PER_BUCKET: u64 = 128;
/// Above this many fields per hash bucket on average, deltas into a layout
/// 1 or 2 generation warn (Redis turns buckets over 512 fields into hash
/// tables, several times larger).
const WARN_FIELDS_PER_BUCKET: u64 = 384;
/// A bulk pipeline is cut after this many records...
const PIPELINE_RECORDS: usize = 64 * 1024;
/// ... or this many commands.
const PIPELINE_COMMANDS: usize = 1024;
/// Bulk pipelines in flight at once on the import connection.
const IN_FLIGHT: usize = 4;
/// On a cluster: pipelines (each inside one slot, so much smaller) or single
/// commands in flight at once, over all nodes together.
const IN_FLIGHT_CLUSTER: usize = 64;
/// Lifetime of the import lock; renewed every [`LOCK_RENEW`] while held, so
/// the lock of an importer that died on another host frees itself within
/// this time (on the same host, a dead owner is detected at once).
const LOCK_TTL_MS: u64 = 15_000;
const LOCK_RENEW: Duration = Duration::from_secs(3);
/// How long a failed import may spend removing its pending generation.
const CLEANUP_BUDGET: Duration = Duration::from_secs(20);

/// Sets each field only if it is new or its date is later; returns how many
/// fields were new. KEYS[1] = a bucket; ARGV[1] = the generation id its
/// sentinel must name ('' for a layout-1 generation without sentinels);
/// ARGV[2..] = field, day, field, day, ... Returns -1 without writing if
/// the bucket has no sentinel or another one: every bucket was written with
/// its sentinel by the snapshot, so the bucket was lost (evicted, deleted);
/// re-creating it with the delta's numbers alone would hide the loss.
static MERGE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], '_g') ~= ARGV[1] then
  return -1
end
local added = 0
for i = 2, #ARGV, 2 do
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  if not cur then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    added = added + 1
  elseif tonumber(ARGV[i + 1]) > tonumber(cur) then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
return added
",
    )
});

/// The snapshot switch. KEYS[1] = meta; ARGV[1] = the sequence replaced (''
/// for an empty mirror); ARGV[2] = our pending generation; ARGV[3..] = field,
/// value pairs. Returns 1 (switched), 0 (the sequence moved) or -1 (the
/// pending generation is not ours any more).
static SWITCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local gen = redis.call('HGET', KEYS[1], 'generation')
local seq = redis.call('HGET', KEYS[1], 'sequence')
if ARGV[1] == '' then
  if gen then return 0 end
elseif (not gen) or seq ~= ARGV[1] then
  return 0
end
if redis.call('HGET', KEYS[1], 'pending_generation') ~= ARGV[2] then return -1 end
local args = {}
for i = 3, #ARGV do args[#args + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(args))
redis.call('HDEL', KEYS[1], 'pending_generation', 'pending_nbuckets')
return 1
",
    )
});

/// The delta metadata check-and-set. KEYS[1] = meta; ARGV = expected
/// sequence, generation, new sequence, as_of, last_import_unix, new fields,
/// and '1' if the delta set its numbers' bits in the membership filter
/// (which then stays valid: `bloom_sequence` moves along, if it was current).
static DELTA_META: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('HGET', KEYS[1], 'sequence') ~= ARGV[1]
  or redis.call('HGET', KEYS[1], 'generation') ~= ARGV[2] then
  return 0
end
local bloom_current = redis.call('HGET', KEYS[1], 'bloom_sequence') == ARGV[1]
  and redis.call('HGET', KEYS[1], 'bloom_generation') == ARGV[2]
redis.call('HSET', KEYS[1], 'sequence', ARGV[3], 'as_of', ARGV[4], 'last_import_unix', ARGV[5])
redis.call('HINCRBY', KEYS[1], 'record_count', ARGV[6])
if ARGV[7] == '1' and bloom_current then
  redis.call('HSET', KEYS[1], 'bloom_sequence', ARGV[3])
end
return 1
",
    )
});

/// Replaces the lock's value if it still holds the dead owner's value
/// (compare-and-set). KEYS[1] = lock; ARGV = old value, new value, TTL ms.
static TAKEOVER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
",
    )
});

/// Deletes the lock if it still holds our token.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
",
    )
});

/// Extends the lock if it still holds our token.
static EXTEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
",
    )
});

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn rate(records: usize, elapsed: Duration) -> u64 {
    (records as f64 / elapsed.as_secs_f64().max(1e-9)) as u64
}

impl Inner {
    async fn invoke<T: ::redis::FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
        limit: Duration,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn();
        match tokio::time::timeout(limit, invocation.invoke_async(&mut conn)).await {
            Err(_) => Err(StoreError::Timeout(limit)),
            Ok(Err(e)) => Err(self.unavailable(&e)),
            Ok(Ok(v)) => Ok(v),
        }
    }
}

/// The import lock `{prefix}:lock`, renewed in the background while held.
pub(super) struct ImportLock {
    inner: Arc<Inner>,
    token: String,
    lost: Arc<AtomicBool>,
    renew: tokio::task::JoinHandle<()>,
}

impl ImportLock {
    pub(super) async fn acquire(inner: &Arc<Inner>) -> Result<Self, StoreError> {
        let owner = LockOwner::me();
        let token = owner.encode();
        let mut cmd = ::redis::cmd("SET");
        cmd.arg(&inner.keys.lock)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(LOCK_TTL_MS);
        let reply: Value = inner.query(&cmd, inner.opts.bulk_timeout).await?;
        if matches!(reply, Value::Nil) {
            take_over_stale(inner, &token).await?;
        }
        let lost = Arc::new(AtomicBool::new(false));
        let renew = tokio::spawn(renew_lock(inner.clone(), token.clone(), lost.clone()));
        Ok(Self {
            inner: inner.clone(),
            token,
            lost,
            renew,
        })
    }

    /// Fails if the lock expired or was taken by someone else.
    pub(super) fn ensure_held(&self) -> Result<(), StoreError> {
        if self.lost.load(Ordering::Relaxed) {
            Err(StoreError::Conflict(
                "the redis import lock was lost during the import".into(),
            ))
        } else {
            Ok(())
        }
    }

    pub(super) async fn release(&self) {
        self.renew.abort();
        let mut invocation = RELEASE.key(&self.inner.keys.lock);
        invocation.arg(&self.token);
        if let Err(e) = self
            .inner
            .invoke::<i64>(&invocation, self.inner.opts.bulk_timeout)
            .await
        {
            tracing::warn!(error = %e, "cannot release the redis import lock; it expires by itself");
        }
    }
}

impl Drop for ImportLock {
    fn drop(&mut self) {
        self.renew.abort();
    }
}

/// Who holds the import lock: the lock's value (JSON), so that an import
/// finding the lock taken can tell a live owner from a dead one.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) struct LockOwner {
    /// The owner's host name.
    pub host: String,
    /// The owner's process id.
    pub pid: u32,
    /// The process' start time (clock ticks since boot, `/proc/<pid>/stat`),
    /// so that a reused pid is not mistaken for the owner; 0 if unknown.
    pub pid_start: u64,
    /// When the lock was taken (Unix seconds).
    pub started_unix: i64,
    /// A random token: the value is unique to one acquisition.
    pub token: String,
}

impl LockOwner {
    fn me() -> Self {
        let pid = std::process::id();
        Self {
            host: host_name(),
            pid,
            pid_start: process_start(pid).unwrap_or(0),
            started_unix: unix_now(),
            token: format!("{:032x}", rand::random::<u128>()),
        }
    }

    fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| self.token.clone())
    }

    /// Parses a lock value; `None` for a value this version did not write.
    pub(super) fn decode(value: &[u8]) -> Option<Self> {
        serde_json::from_slice(value).ok()
    }

    /// True if the owner is certainly gone: it ran on this host and its
    /// process no longer exists (or the pid now belongs to another process).
    /// An owner on another host is never declared dead here: its lock
    /// expires [`LOCK_TTL_MS`] after its last renewal.
    pub(super) fn is_dead_here(&self) -> bool {
        if self.host != host_name() {
            return false;
        }
        if self.pid == std::process::id() {
            // Our own process: a lock of an earlier import of this process
            // that was not released (the renewal stopped).
            return false;
        }
        match process_start(self.pid) {
            None => true,
            Some(start) => self.pid_start != 0 && start != self.pid_start,
        }
    }
}

/// This machine's host name (`/proc/sys/kernel/hostname`, else `$HOSTNAME`).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The start time of process `pid` (field 22 of `/proc/<pid>/stat`), or
/// `None` if there is no such process.
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// The lock is taken: take it over if its owner is gone (compare-and-set on
/// the owner's value), or fail saying who holds it.
async fn take_over_stale(inner: &Arc<Inner>, token: &str) -> Result<(), StoreError> {
    let limit = inner.opts.bulk_timeout;
    let mut get = ::redis::cmd("GET");
    get.arg(&inner.keys.lock);
    let held: Option<Vec<u8>> = inner.query(&get, limit).await?;
    let Some(held) = held else {
        // Released in the meantime: try once more.
        let mut cmd = ::redis::cmd("SET");
        cmd.arg(&inner.keys.lock)
            .arg(token)
            .arg("NX")
            .arg("PX")
            .arg(LOCK_TTL_MS);
        let reply: Value = inner.query(&cmd, limit).await?;
        if matches!(reply, Value::Nil) {
            return Err(StoreError::Conflict(
                "another import holds the redis import lock".into(),
            ));
        }
        return Ok(());
    };
    let owner = LockOwner::decode(&held);
    if let Some(owner) = owner.as_ref().filter(|o| o.is_dead_here()) {
        let mut invocation = TAKEOVER.key(&inner.keys.lock);
        invocation.arg(held.as_slice()).arg(token).arg(LOCK_TTL_MS);
        let taken: i64 = inner.invoke(&invocation, limit).await?;
        if taken == 1 {
            tracing::warn!(
                host = %owner.host,
                pid = owner.pid,
                started_unix = owner.started_unix,
                "took over the redis import lock of an import that is gone"
            );
            return Ok(());
        }
        return Err(StoreError::Conflict(
            "another import took the redis import lock first".into(),
        ));
    }
    let mut pttl = ::redis::cmd("PTTL");
    pttl.arg(&inner.keys.lock);
    let ttl: i64 = inner.query(&pttl, limit).await.unwrap_or(-1);
    Err(StoreError::Conflict(match owner {
        Some(o) => format!(
            "another import holds the redis import lock (host {}, pid {}, since unix {}; it frees itself {} ms after its last renewal, {} ms from now)",
            o.host, o.pid, o.started_unix, LOCK_TTL_MS, ttl
        ),
        None => {
            format!("another import holds the redis import lock (an older version; it expires in {ttl} ms)")
        }
    }))
}

/// Set by [`cancel_imports`]: imports of this process stop at their next
/// step (before the switch: the pending generation is deleted; after it: the
/// reclaim is finished). Process-wide on purpose: a signal stops the
/// process' imports, and one `reassigned import`/`sync` runs per process.
static CANCEL: LazyLock<tokio::sync::watch::Sender<bool>> =
    LazyLock::new(|| tokio::sync::watch::Sender::new(false));

/// Asks every import of this process to stop cleanly (see [`CANCEL`]).
pub(super) fn cancel_imports() {
    CANCEL.send_replace(true);
}

fn cancel_requested() -> bool {
    *CANCEL.borrow()
}

/// Resolves once [`cancel_imports`] was called.
async fn cancelled() {
    let mut rx = CANCEL.subscribe();
    let _ = rx.wait_for(|&c| c).await;
}

fn interrupted(what: &str) -> StoreError {
    StoreError::Conflict(format!("interrupted by a signal {what}"))
}

/// `{prefix}:applied`: SHA-256 of applied files by `kind:sequence`.
fn applied_key_name(inner: &Inner) -> String {
    format!("{}:applied", inner.keys.prefix)
}

/// Records the checksum of an applied file and keeps only the most recent
/// [`APPLIED_KEEP`] sequences (best effort: a failure only weakens the
/// re-issue check, so it is logged, not returned). `applied` is the file's
/// [`crate::store::applied_key`].
async fn record_applied(inner: &Inner, applied: String, sha256: &str) {
    let key = applied_key_name(inner);
    let limit = inner.opts.bulk_timeout;
    let mut hset = ::redis::cmd("HSET");
    hset.arg(&key).arg(applied).arg(sha256.to_ascii_lowercase());
    if let Err(e) = inner.query::<Value>(&hset, limit).await {
        tracing::warn!(error = %e, "cannot record the checksum of the applied file");
        return;
    }
    let mut hkeys = ::redis::cmd("HKEYS");
    hkeys.arg(&key);
    let Ok(fields) = inner.query::<Vec<String>>(&hkeys, limit).await else {
        return;
    };
    if fields.len() <= APPLIED_KEEP {
        return;
    }
    let mut by_sequence: Vec<(u64, &String)> = fields
        .iter()
        .map(|f| {
            let seq = f.rsplit(':').next().and_then(|s| s.parse().ok()).unwrap_or(0);
            (seq, f)
        })
        .collect();
    by_sequence.sort();
    let excess = fields.len() - APPLIED_KEEP;
    let mut hdel = ::redis::cmd("HDEL");
    hdel.arg(&key);
    for (_, f) in by_sequence.iter().take(excess) {
        hdel.arg(f.as_str());
    }
    if let Err(e) = inner.query::<Value>(&hdel, limit).await {
        tracing::debug!(error = %e, "cannot trim the applied checksums");
    }
}

/// The recorded checksums of applied files (see [`record_applied`]).
pub(super) async fn applied_checksums(
    inner: &Inner,
) -> Result<std::collections::HashMap<String, String>, StoreError> {
    let mut cmd = ::redis::cmd("HGETALL");
    cmd.arg(applied_key_name(inner));
    inner.query(&cmd, inner.opts.bulk_timeout).await
}

async fn renew_lock(inner: Arc<Inner>, token: String, lost: Arc<AtomicBool>) {
    loop {
        tokio::time::sleep(LOCK_RENEW).await;
        let mut invocation = EXTEND.key(&inner.keys.lock);
        invocation.arg(&token).arg(LOCK_TTL_MS);
        match inner.invoke::<i64>(&invocation, inner.opts.bulk_timeout).await {
            Ok(1) => {}
            Ok(_) => {
                lost.store(true, Ordering::Relaxed);
                tracing::error!("the redis import lock was lost; the import will be refused");
                return;
            }
            Err(e) => tracing::warn!(error = %e, "cannot renew the redis import lock"),
        }
    }
}

/// Replaces the mirror with a snapshot (see the module documentation).
pub(super) async fn apply_snapshot(
    inner: &Arc<Inner>,
    snapshot: &SnapshotWrite,
    records: &Records,
    expected_previous: Option<u64>,
) -> Result<(), StoreError> {
    let meta = snapshot.meta(records.len() as u64, unix_now());
    if cancel_requested() {
        return Err(interrupted("before the snapshot started"));
    }
    let lock = ImportLock::acquire(inner).await?;
    let result = snapshot_locked(inner, &lock, meta, records, expected_previous).await;
    if result.is_ok() {
        record_applied(inner, snapshot.applied_key(), &snapshot.sha256).await;
    }
    lock.release().await;
    result
}

async fn snapshot_locked(
    inner: &Arc<Inner>,
    lock: &ImportLock,
    meta: MirrorMeta,
    records: &Records,
    expected_previous: Option<u64>,
) -> Result<(), StoreError> {
    let limit = inner.opts.bulk_timeout;
    let stored = inner.read_meta(limit).await?;
    let current_sequence = stored.current.as_ref().map(|c| c.meta.sequence);
    if current_sequence != expected_previous {
        return Err(StoreError::Conflict(format!(
            "the redis mirror is at sequence {current_sequence:?}, the snapshot expected {expected_previous:?}"
        )));
    }
    let old = stored.current.as_ref().map(|c| c.generation);
    let mut bulk = inner.bulk_conn()?;
    clean_leftovers(inner, &mut bulk, &stored).await?;

    let nbuckets = (records.len() as u64).div_ceil(RECORDS_PER_BUCKET).max(1);
    let generation = Generation {
        id: next_generation_id(inner, &stored).await?,
        nbuckets,
    };
    let mut pending = ::redis::cmd("HSET");
    pending
        .arg(&inner.keys.meta)
        .arg(field::PENDING_GENERATION)
        .arg(generation.id)
        .arg(field::PENDING_NBUCKETS)
        .arg(generation.nbuckets);
    inner.query::<Value>(&pending, limit).await?;

    let started = Instant::now();
    let written = tokio::select! {
        biased;
        () = cancelled() => Err(interrupted("while writing the new generation; rolled back")),
        w = async {
            // The filter is built on a blocking thread while the buckets
            // are written (the importer's CPU goes to both at once).
            let params = BloomParams {
                bits: bloom::bits_for(generation.nbuckets, RECORDS_PER_BUCKET),
                hashes: bloom::HASHES,
            };
            let filter = tokio::task::spawn_blocking({
                let records = records.clone();
                move || build_filter(&records, params)
            });
            let numbers: Vec<u64> = records.numbers().collect();
            write_generation(inner, &mut bulk.clone(), generation, (&numbers, records)).await?;
            drop(numbers);
            let filter = filter
                .await
                .map_err(|e| StoreError::Unavailable(format!("building the membership filter failed: {e}")))?;
            write_filter(inner, &mut bulk.clone(), generation, &filter).await?;
            Ok(params)
        } => w,
    };
    let bloom_params = match written.and_then(|p| {
        lock.ensure_held()?;
        if cancel_requested() {
            return Err(interrupted("before the switch; rolled back"));
        }
        Ok(p)
    }) {
        Ok(p) => p,
        Err(e) => {
            abandon_pending(inner, &mut bulk, generation).await;
            return Err(e);
        }
    };
    let written = started.elapsed();
    // Every replica holds the new generation before any reader can be sent
    // to it; otherwise the import fails with the metadata unswitched.
    if let Err(e) = async {
        wait_replicas(inner, &mut bulk, "snapshot's writes").await?;
        lock.ensure_held()
    }
    .await
    {
        abandon_pending(inner, &mut bulk, generation).await;
        return Err(e);
    }

    let mut invocation = SWITCH.key(&inner.keys.meta);
    invocation
        .arg(expected_previous.map(|s| s.to_string()).unwrap_or_default())
        .arg(generation.id);
    for (name, value) in meta::switch_fields(generation, &meta)
        .into_iter()
        .chain(meta::bloom_fields(generation, meta.sequence, bloom_params))
    {
        invocation.arg(name).arg(value);
    }
    if let Some(old) = old {
        invocation
            .arg(field::RECLAIM_GENERATION)
            .arg(old.id)
            .arg(field::RECLAIM_NBUCKETS)
            .arg(old.nbuckets);
    }
    let switched: i64 = match invoke_on(inner, &mut bulk, &invocation).await {
        Ok(s) => s,
        Err(e) => {
            // Whether the switch happened is unknown: the cleanup looks.
            abandon_pending(inner, &mut bulk, generation).await;
            return Err(e);
        }
    };
    if switched != 1 {
        if let Err(e) = delete_generation(inner, &mut bulk, generation).await {
            tracing::warn!(error = %e, generation = generation.id, "cannot delete the refused generation");
        }
        return Err(StoreError::Conflict(if switched == 0 {
            "the redis mirror moved on during the snapshot import".into()
        } else {
            "another import took over the redis mirror during the snapshot import".into()
        }));
    }
    tracing::info!(
        records = records.len(),
        generation = generation.id,
        nbuckets = generation.nbuckets,
        sequence = meta.sequence,
        written_ms = written.as_millis() as u64,
        records_per_s = rate(records.len(), written),
        "redis snapshot switched"
    );
    let mut publish = ::redis::cmd("PUBLISH");
    publish.arg(&inner.keys.events).arg("switched");
    if let Err(e) = inner.query::<Value>(&publish, inner.opts.timeout).await {
        tracing::debug!(error = %e, "cannot publish the switch event");
    }
    if let Err(e) = inner.refresh().await {
        tracing::warn!(error = %e, "cannot refresh the metadata after the switch");
    }

    if let Some(old) = old {
        // Readers refresh their cached metadata every meta_refresh; give the
        // slowest of them time to move to the new generation.
        tokio::time::sleep(inner.opts.reclaim_grace).await;
        // And every replica has the switch: a replica still on the old
        // metadata must still find the old generation.
        let replicated = wait_replicas(inner, &mut bulk, "snapshot switch").await;
        if let Err(e) = &replicated {
            tracing::warn!(error = %e, generation = old.id, "replicas lag: the replaced generation is kept; the next import deletes it");
        }
        let reclaim = match replicated {
            Ok(()) => delete_generation(inner, &mut bulk, old).await,
            Err(e) => Err(e),
        };
        match reclaim {
            Ok(()) => {
                let mut clear = ::redis::cmd("HDEL");
                clear
                    .arg(&inner.keys.meta)
                    .arg(field::RECLAIM_GENERATION)
                    .arg(field::RECLAIM_NBUCKETS);
                if let Err(e) = inner.query::<Value>(&clear, limit).await {
                    tracing::warn!(error = %e, "cannot clear the reclaim mark; the next import does it");
                }
            }
            // The snapshot is applied; the next import deletes what is left.
            Err(e) => {
                tracing::warn!(error = %e, generation = old.id, "cannot delete the replaced generation yet")
            }
        }
    }
    Ok(())
}

/// After a failed snapshot import: deletes our pending generation unless it
/// became current, and clears the `pending_*` mark if it is still ours. Best
/// effort, bounded by [`CLEANUP_BUDGET`]; the next import finishes whatever
/// is left.
async fn abandon_pending(inner: &Inner, bulk: &mut Conn, generation: Generation) {
    let work = async {
        let stored = inner.read_meta(inner.opts.bulk_timeout).await?;
        if stored.current.as_ref().map(|c| c.generation.id) == Some(generation.id) {
            return Ok(false);
        }
        delete_generation(inner, bulk, generation).await?;
        if stored.pending.map(|p| p.id) == Some(generation.id) {
            let mut clear = ::redis::cmd("HDEL");
            clear
                .arg(&inner.keys.meta)
                .arg(field::PENDING_GENERATION)
                .arg(field::PENDING_NBUCKETS);
            inner.query::<Value>(&clear, inner.opts.bulk_timeout).await?;
        }
        Ok::<bool, StoreError>(true)
    };
    match tokio::time::timeout(CLEANUP_BUDGET, work).await {
        Ok(Ok(true)) => tracing::info!(
            generation = generation.id,
            "deleted the pending generation of the failed import"
        ),
        Ok(Ok(false)) => {}
        Ok(Err(e)) => tracing::warn!(
            error = %e,
            generation = generation.id,
            "cannot delete the pending generation of the failed import; the next import does"
        ),
        Err(_) => tracing::warn!(
            generation = generation.id,
            "deleting the pending generation of the failed import takes too long; the next import finishes it"
        ),
    }
}

/// Deletes what an interrupted import left: a pending generation that never
/// became current, and a replaced generation not yet deleted.
async fn clean_leftovers(inner: &Inner, bulk: &mut Conn, stored: &StoredMeta) -> Result<(), StoreError> {
    let current = stored.current.as_ref().map(|c| c.generation.id);
    let leftovers = [
        (stored.pending, field::PENDING_GENERATION, field::PENDING_NBUCKETS),
        (stored.reclaim, field::RECLAIM_GENERATION, field::RECLAIM_NBUCKETS),
    ];
    for (generation, id_field, nbuckets_field) in leftovers {
        let Some(generation) = generation else { continue };
        if Some(generation.id) != current {
            tracing::info!(
                generation = generation.id,
                nbuckets = generation.nbuckets,
                "deleting a generation left by an interrupted import"
            );
            delete_generation(inner, bulk, generation).await?;
        }
        let mut clear = ::redis::cmd("HDEL");
        clear.arg(&inner.keys.meta).arg(id_field).arg(nbuckets_field);
        inner.query::<Value>(&clear, inner.opts.bulk_timeout).await?;
    }
    Ok(())
}

/// A generation number never used before.
async fn next_generation_id(inner: &Inner, stored: &StoredMeta) -> Result<u64, StoreError> {
    let limit = inner.opts.bulk_timeout;
    let mut incr = ::redis::cmd("INCR");
    incr.arg(&inner.keys.gen_counter);
    let id: u64 = match inner.query::<Value>(&incr, limit).await? {
        Value::Int(i) => u64::try_from(i).map_err(|_| StoreError::Corrupt("negative gen_counter".into()))?,
        _ => return Err(StoreError::Corrupt("unexpected INCR reply".into())),
    };
    // If the counter was lost while the data was kept, skip past every
    // generation the metadata still knows.
    let floor = [
        stored.current.as_ref().map(|c| c.generation.id),
        stored.pending.map(|g| g.id),
        stored.reclaim.map(|g| g.id),
    ]
    .into_iter()
    .flatten()
    .max()
    .unwrap_or(0);
    if id > floor {
        return Ok(id);
    }
    let mut set = ::redis::cmd("SET");
    set.arg(&inner.keys.gen_counter).arg(floor + 1);
    inner.query::<Value>(&set, limit).await?;
    Ok(floor + 1)
}

/// Record indexes grouped by bucket: `order[runs[i].1..runs[i].2]` are the
/// records of bucket `runs[i].0`, in number order (so in field order).
struct Grouped {
    order: Vec<u32>,
    runs: Vec<(u64, u32, u32)>,
}

/// With `every_bucket` (a snapshot: each bucket gets its sentinel), empty
/// buckets get (empty) runs too.
fn group_by_bucket(len: usize, number: impl Fn(usize) -> u64, nbuckets: u64, every_bucket: bool) -> Grouped {
    let mut order: Vec<u32>;
    let mut runs = Vec::new();
    if every_bucket || (len as u64).saturating_mul(4) >= nbuckets {
        // Dense (snapshots): a counting sort, linear.
        let nb = nbuckets as usize;
        let mut starts = vec![0u32; nb + 1];
        for i in 0..len {
            starts[(number(i) % nbuckets) as usize + 1] += 1;
        }
        for b in 0..nb {
            starts[b + 1] += starts[b];
        }
        let mut next = starts[..nb].to_vec();
        order = vec![0u32; len];
        for i in 0..len {
            let b = (number(i) % nbuckets) as usize;
            order[next[b] as usize] = i as u32;
            next[b] += 1;
        }
        for b in 0..nb {
            if every_bucket || starts[b] < starts[b + 1] {
                runs.push((b as u64, starts[b], starts[b + 1]));
            }
        }
    } else {
        // Sparse (small deltas over many buckets): a stable sort.
        order = (0..len as u32).collect();
        order.sort_by_key(|&i| number(i as usize) % nbuckets);
        let mut start = 0usize;
        while start < len {
            let bucket = number(order[start] as usize) % nbuckets;
            let mut end = start + 1;
            while end < len && number(order[end] as usize) % nbuckets == bucket {
                end += 1;
            }
            runs.push((bucket, start as u32, end as u32));
            start = end;
        }
    }
    Grouped { order, runs }
}

/// Cuts the runs into pipelines of about [`PIPELINE_RECORDS`] records (at
/// most [`PIPELINE_COMMANDS`] commands); each pipeline is a list of indexes
/// into `runs`. With `slots` (a cluster: the slot of each run's key), runs
/// are grouped by slot and no pipeline spans two slots.
fn pipeline_batches(runs: &[(u64, u32, u32)], slots: Option<&[u16]>) -> Vec<Vec<u32>> {
    let mut order: Vec<u32> = (0..runs.len() as u32).collect();
    if let Some(slots) = slots {
        order.sort_by_key(|&i| slots[i as usize]);
    }
    let mut batches = Vec::new();
    let mut batch: Vec<u32> = Vec::new();
    let mut records = 0usize;
    for i in order {
        if let (Some(slots), Some(&first)) = (slots, batch.first())
            && slots[first as usize] != slots[i as usize]
        {
            batches.push(std::mem::take(&mut batch));
            records = 0;
        }
        let (_, from, to) = runs[i as usize];
        batch.push(i);
        records += (to - from) as usize;
        if records >= PIPELINE_RECORDS || batch.len() >= PIPELINE_COMMANDS {
            batches.push(std::mem::take(&mut batch));
            records = 0;
        }
    }
    if !batch.is_empty() {
        batches.push(batch);
    }
    batches
}

/// The pipelines of a bulk write of `runs` into `generation` on `conn`, and
/// how many to keep in flight.
fn plan(
    inner: &Inner,
    conn: &Conn,
    generation: Generation,
    runs: &[(u64, u32, u32)],
) -> (Vec<Vec<u32>>, usize) {
    if conn.is_cluster() {
        let slots: Vec<u16> = runs
            .iter()
            .map(|&(bucket, _, _)| key_slot(inner.keys.bucket(generation.id, bucket).as_bytes()))
            .collect();
        (pipeline_batches(runs, Some(&slots)), IN_FLIGHT_CLUSTER)
    } else {
        (pipeline_batches(runs, None), IN_FLIGHT)
    }
}

/// Adds the `SET` writing one packed bucket (layout 3) to `pipe`: the
/// records `indexes` (in number order, so in suffix order) of `generation`.
/// A SET replaces the key whole, so a reader finds the bucket absent or
/// complete with its generation in the header.
fn push_packed(
    pipe: &mut ::redis::Pipeline,
    scratch: &mut (Vec<(u64, u16)>, Vec<u8>),
    key: String,
    generation: Generation,
    (numbers, records): (&[u64], &Records),
    indexes: &[u32],
) {
    let (entries, payload) = scratch;
    entries.clear();
    entries.extend(indexes.iter().map(|&i| {
        let i = i as usize;
        (numbers[i] / generation.nbuckets, records.day(i))
    }));
    payload.clear();
    packed::encode(generation.id, entries, payload);
    pipe.cmd("SET").arg(key).arg(payload.as_slice()).ignore();
}

/// Writes every record into a new generation's packed buckets (every
/// bucket, empty ones included: a missing bucket is a lost one).
/// `numbers` are the records' numbers, decoded once.
async fn write_generation(
    inner: &Inner,
    bulk: &mut Conn,
    generation: Generation,
    (numbers, records): (&[u64], &Records),
) -> Result<(), StoreError> {
    let grouped = group_by_bucket(numbers.len(), |i| numbers[i], generation.nbuckets, true);
    let (batches, in_flight) = plan(inner, bulk, generation, &grouped.runs);
    let grouped = &grouped;
    let bulk = &*bulk;
    stream::iter(batches)
        .map(|batch| async move {
            let mut pipe = ::redis::pipe();
            let mut scratch = (Vec::new(), Vec::new());
            for &(bucket, from, to) in batch.iter().map(|&i| &grouped.runs[i as usize]) {
                push_packed(
                    &mut pipe,
                    &mut scratch,
                    inner.keys.bucket(generation.id, bucket),
                    generation,
                    (numbers, records),
                    &grouped.order[from as usize..to as usize],
                );
            }
            inner
                .pipeline_on::<()>(&mut bulk.clone(), &pipe, inner.opts.bulk_timeout)
                .await
        })
        .buffer_unordered(in_flight)
        .try_collect::<()>()
        .await
}

/// The membership filter of a new generation's records (CPU only: run it
/// beside the bucket writes).
fn build_filter(records: &Records, params: BloomParams) -> Filter {
    let mut filter = Filter::new(params.bits, params.hashes);
    for number in records.numbers() {
        filter.insert(number);
    }
    filter
}

/// Stores a new generation's membership filter in chunk keys (see `bloom`).
async fn write_filter(
    inner: &Inner,
    bulk: &mut Conn,
    generation: Generation,
    filter: &Filter,
) -> Result<(), StoreError> {
    for (i, chunk) in filter.chunks().enumerate() {
        let mut cmd = ::redis::cmd("SET");
        cmd.arg(inner.keys.bloom(generation.id, i as u64)).arg(chunk);
        inner
            .query_on::<Value>(bulk, &cmd, inner.opts.bulk_timeout)
            .await?;
    }
    Ok(())
}

/// Waits until every replica of every master has acknowledged the writes
/// sent on `bulk` so far (`WAIT n timeout` on each master with `n` its
/// `connected_slaves`; a master without replicas is skipped, so one Redis
/// without replicas costs one INFO). Fails if a master does not answer or
/// a replica lags beyond [`RedisOptions::replication_timeout`]: a master
/// killed after the switch could otherwise leave a promoted replica without
/// part of the data the metadata says is applied.
///
/// [`RedisOptions::replication_timeout`]: super::RedisOptions::replication_timeout
async fn wait_replicas(inner: &Inner, bulk: &mut Conn, what: &str) -> Result<(), StoreError> {
    let timeout = inner.opts.replication_timeout;
    let mut info = ::redis::cmd("INFO");
    info.arg("replication");
    let nodes = bulk.on_masters(&info, inner.opts.bulk_timeout).await;
    let waits = nodes.into_iter().map(|(node, reply)| {
        let mut conn = bulk.clone();
        async move {
            let reply = reply.map_err(|e| inner.unavailable(&e))?;
            let replicas: i64 = super::info_field(&reply, "connected_slaves")
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            if replicas == 0 {
                return Ok(());
            }
            let mut wait = ::redis::cmd("WAIT");
            wait.arg(replicas)
                .arg(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
            let acked = match conn.on_node(&node, &wait, timeout + inner.opts.bulk_timeout).await {
                Ok(Value::Int(n)) => n,
                Ok(_) => 0,
                Err(e) => return Err(inner.unavailable(&e)),
            };
            if acked < replicas {
                let at = if node.is_empty() { "redis".to_owned() } else { node };
                return Err(StoreError::Unavailable(format!(
                    "replication: {acked} of {replicas} replicas of {at} acknowledged the {what} within {timeout:?}"
                )));
            }
            Ok(())
        }
    });
    futures_util::future::try_join_all(waits).await.map(drop)
}

/// Runs a one-key script on `bulk` (the import's connection, so that a
/// following [`wait_replicas`] covers it).
async fn invoke_on<T: ::redis::FromRedisValue>(
    inner: &Inner,
    bulk: &mut Conn,
    invocation: &ScriptInvocation<'_>,
) -> Result<T, StoreError> {
    let limit = inner.opts.bulk_timeout;
    match tokio::time::timeout(limit, invocation.invoke_async(bulk)).await {
        Err(_) => Err(StoreError::Timeout(limit)),
        Ok(Err(e)) => Err(inner.unavailable(&e)),
        Ok(Ok(v)) => Ok(v),
    }
}

/// Bit offsets set per script call when a delta updates the filter.
const BITS_PER_CALL: usize = 16 * 1024;

/// Sets the filter bits of a delta's numbers, chunk by chunk (one-key
/// scripts, so each call stays in one cluster slot).
async fn set_filter_bits(
    inner: &Inner,
    bulk: &mut Conn,
    generation: Generation,
    params: BloomParams,
    records: &Records,
) -> Result<(), StoreError> {
    let mut by_chunk: std::collections::BTreeMap<u64, Vec<u64>> = std::collections::BTreeMap::new();
    for number in records.numbers() {
        for p in bloom::positions(number, params.bits, params.hashes) {
            by_chunk
                .entry(p / bloom::CHUNK_BITS)
                .or_default()
                .push(p % bloom::CHUNK_BITS);
        }
    }
    let limit = inner.opts.bulk_timeout;
    for (chunk, mut offsets) in by_chunk {
        offsets.sort_unstable();
        offsets.dedup();
        let key = inner.keys.bloom(generation.id, chunk);
        for part in offsets.chunks(BITS_PER_CALL) {
            let mut invocation = bloom::SET_BITS.key(&key);
            for offset in part {
                invocation.arg(*offset);
            }
            match tokio::time::timeout(limit, invocation.invoke_async::<i64>(bulk)).await {
                Err(_) => return Err(StoreError::Timeout(limit)),
                Ok(Err(e)) => return Err(inner.unavailable(&e)),
                Ok(Ok(_)) => {}
            }
        }
    }
    Ok(())
}

/// Merges records into a generation, keeping each number's latest date;
/// returns how many numbers were new.
async fn merge_generation(
    inner: &Inner,
    bulk: &mut Conn,
    generation: Generation,
    sentinel: bool,
    records: &Records,
) -> Result<u64, StoreError> {
    let expected = if sentinel {
        generation.id.to_string()
    } else {
        String::new()
    };
    let expected = expected.as_str();
    let limit = inner.opts.bulk_timeout;
    let sha = match tokio::time::timeout(limit, MERGE.load_async(bulk)).await {
        Err(_) => return Err(StoreError::Timeout(limit)),
        Ok(Err(e)) => return Err(inner.unavailable(&e)),
        Ok(Ok(sha)) => sha,
    };
    let numbers: Vec<u64> = records.numbers().collect();
    let numbers = numbers.as_slice();
    let grouped = group_by_bucket(numbers.len(), |i| numbers[i], generation.nbuckets, false);
    let (batches, in_flight) = plan(inner, bulk, generation, &grouped.runs);
    let (grouped, sha, bulk) = (&grouped, sha.as_str(), &*bulk);
    stream::iter(batches)
        .map(|batch| async move {
            let mut pipe = ::redis::pipe();
            for &(bucket, from, to) in batch.iter().map(|&i| &grouped.runs[i as usize]) {
                pipe.cmd("EVALSHA")
                    .arg(sha)
                    .arg(1)
                    .arg(inner.keys.bucket(generation.id, bucket))
                    .arg(expected);
                for &i in &grouped.order[from as usize..to as usize] {
                    let i = i as usize;
                    pipe.arg(numbers[i] / generation.nbuckets).arg(records.day(i));
                }
            }
            let added: Vec<i64> = inner.pipeline_on(&mut bulk.clone(), &pipe, limit).await?;
            if added.iter().any(|&a| a < 0) {
                return Err(lost_bucket());
            }
            Ok::<u64, StoreError>(added.iter().map(|&a| a.max(0) as u64).sum())
        })
        .buffer_unordered(in_flight)
        .try_fold(0u64, |total, added| async move { Ok(total + added) })
        .await
}

/// The error of a delta that finds a bucket of its generation missing or
/// foreign: every bucket was written whole by the snapshot, so it was lost
/// (evicted, deleted); re-creating it with the delta's numbers alone would
/// hide the loss.
fn lost_bucket() -> StoreError {
    StoreError::Corrupt(
        "a bucket of the redis mirror has no sentinel (evicted, deleted or lost): the delta is refused; import a snapshot".into(),
    )
}

/// Merges records into a packed generation (layout 3), keeping each
/// number's latest date; returns how many numbers were new. Per pipeline
/// of buckets: one pipelined GET, the merge here, one pipelined SET of the
/// new strings. The importer holds the import lock, so nothing else writes
/// the buckets in between; each bucket is in one pipeline only.
async fn merge_packed(
    inner: &Inner,
    bulk: &mut Conn,
    generation: Generation,
    records: &Records,
) -> Result<u64, StoreError> {
    let limit = inner.opts.bulk_timeout;
    let numbers: Vec<u64> = records.numbers().collect();
    let numbers = numbers.as_slice();
    let grouped = group_by_bucket(numbers.len(), |i| numbers[i], generation.nbuckets, false);
    let (batches, in_flight) = plan(inner, bulk, generation, &grouped.runs);
    let (grouped, bulk) = (&grouped, &*bulk);
    stream::iter(batches)
        .map(|batch| async move {
            let runs: Vec<(u64, u32, u32)> = batch.iter().map(|&i| grouped.runs[i as usize]).collect();
            let mut get = ::redis::pipe();
            for &(bucket, _, _) in &runs {
                get.cmd("GET").arg(inner.keys.bucket(generation.id, bucket));
            }
            let olds: Vec<Value> = inner.pipeline_on(&mut bulk.clone(), &get, limit).await?;
            if olds.len() != runs.len() {
                return Err(StoreError::Unavailable(format!(
                    "redis answered {} of {} bucket reads",
                    olds.len(),
                    runs.len()
                )));
            }
            let mut set = ::redis::pipe();
            let mut added = 0u64;
            let mut new = Vec::new();
            let mut payload = Vec::new();
            for (&(bucket, from, to), old) in runs.iter().zip(olds) {
                let Value::BulkString(bytes) = old else {
                    return Err(match old {
                        Value::Nil => lost_bucket(),
                        _ => StoreError::Unavailable("redis: unexpected GET reply".into()),
                    });
                };
                let old = match packed::Bucket::parse(&bytes) {
                    Ok(b) if b.header().generation == generation.id => b,
                    Ok(_) | Err(packed::PackedError::Foreign) => return Err(lost_bucket()),
                    Err(packed::PackedError::Malformed) => {
                        return Err(StoreError::Corrupt(
                            "a packed bucket's length disagrees with its header: the delta is refused; import a snapshot".into(),
                        ));
                    }
                };
                new.clear();
                new.extend(grouped.order[from as usize..to as usize].iter().map(|&i| {
                    let i = i as usize;
                    (numbers[i] / generation.nbuckets, records.day(i))
                }));
                let (merged, fresh) = packed::merge(&old, &new);
                if u32::try_from(merged.len()).is_err() {
                    return Err(StoreError::Corrupt(
                        "a packed bucket would hold more than 2^32 records: import a snapshot".into(),
                    ));
                }
                added += fresh;
                payload.clear();
                packed::encode(generation.id, &merged, &mut payload);
                set.cmd("SET")
                    .arg(inner.keys.bucket(generation.id, bucket))
                    .arg(payload.as_slice())
                    .ignore();
            }
            inner.pipeline_on::<()>(&mut bulk.clone(), &set, limit).await?;
            Ok::<u64, StoreError>(added)
        })
        .buffer_unordered(in_flight)
        .try_fold(0u64, |total, added| async move { Ok(total + added) })
        .await
}

/// UNLINKs every bucket and filter chunk of a generation.
async fn delete_generation(inner: &Inner, bulk: &mut Conn, generation: Generation) -> Result<(), StoreError> {
    // Sized for the larger of the layouts' buckets: a chunk that does not
    // exist costs one UNLINK of nothing.
    let chunks = bloom::chunks(bloom::bits_for(
        generation.nbuckets,
        RECORDS_PER_BUCKET.max(LEGACY_FIELDS_PER_BUCKET),
    ));
    for chunk in 0..chunks {
        let mut cmd = ::redis::cmd("UNLINK");
        cmd.arg(inner.keys.bloom(generation.id, chunk));
        inner
            .query_on::<Value>(bulk, &cmd, inner.opts.bulk_timeout)
            .await?;
    }
    let bulk = &*bulk;
    if bulk.is_cluster() {
        // Consecutive buckets lie in different slots: concurrent single
        // UNLINKs (streamed, so no list of every bucket is built).
        return stream::iter(0..generation.nbuckets)
            .map(|bucket| async move {
                let mut cmd = ::redis::cmd("UNLINK");
                cmd.arg(inner.keys.bucket(generation.id, bucket));
                inner
                    .query_on::<Value>(&mut bulk.clone(), &cmd, inner.opts.bulk_timeout)
                    .await
                    .map(drop)
            })
            .buffer_unordered(IN_FLIGHT_CLUSTER)
            .try_collect::<()>()
            .await;
    }
    let chunk = PIPELINE_COMMANDS as u64;
    stream::iter((0..generation.nbuckets.div_ceil(chunk)).map(|c| c * chunk))
        .map(|from| async move {
            let mut pipe = ::redis::pipe();
            for bucket in from..(from + chunk).min(generation.nbuckets) {
                pipe.cmd("UNLINK")
                    .arg(inner.keys.bucket(generation.id, bucket))
                    .ignore();
            }
            inner
                .pipeline_on::<()>(&mut bulk.clone(), &pipe, inner.opts.bulk_timeout)
                .await
        })
        .buffer_unordered(IN_FLIGHT)
        .try_collect::<()>()
        .await
}

/// Merges a delta (see the module documentation).
pub(super) async fn apply_delta(
    inner: &Arc<Inner>,
    delta: &DeltaWrite,
    records: &Records,
) -> Result<(), StoreError> {
    if cancel_requested() {
        return Err(interrupted("before the delta started"));
    }
    let lock = ImportLock::acquire(inner).await?;
    let result = delta_locked(inner, &lock, delta, records).await;
    if result.is_ok() {
        record_applied(inner, delta.applied_key(), &delta.sha256).await;
    }
    lock.release().await;
    result
}

async fn delta_locked(
    inner: &Arc<Inner>,
    lock: &ImportLock,
    delta: &DeltaWrite,
    records: &Records,
) -> Result<(), StoreError> {
    let limit = inner.opts.bulk_timeout;
    let stored = inner.read_meta(limit).await?;
    let Some(current) = stored.current.as_ref() else {
        return Err(StoreError::Conflict(
            "the redis mirror is empty: a delta needs a snapshot first".into(),
        ));
    };
    let sequence = current.meta.sequence;
    if sequence == delta.sequence {
        tracing::info!(sequence, "delta already applied to the redis mirror");
        return Ok(());
    }
    if delta.sequence.checked_sub(1) != Some(sequence) {
        return Err(StoreError::Conflict(format!(
            "the redis mirror is at sequence {sequence}, the delta needs {}",
            delta.sequence.saturating_sub(1)
        )));
    }
    let generation = current.generation;
    let mut bulk = inner.bulk_conn()?;
    clean_leftovers(inner, &mut bulk, &stored).await?;

    let started = Instant::now();
    // Interrupted before the metadata moves, a delta leaves the mirror at the
    // previous sequence (merging again later gives the same data).
    let added = tokio::select! {
        biased;
        () = cancelled() => Err(interrupted("while merging the delta; the sequence did not move")),
        added = async {
            // The filter first: a reader that sees the new sequence must find
            // every new number's bits set.
            if let Some(params) = current.bloom
                && !records.is_empty()
            {
                set_filter_bits(inner, &mut bulk.clone(), generation, params, records).await?;
            }
            if records.is_empty() {
                Ok(0)
            } else {
                match current.layout {
                    BucketLayout::Packed => merge_packed(inner, &mut bulk.clone(), generation, records).await,
                    BucketLayout::Sentinel => merge_generation(inner, &mut bulk.clone(), generation, true, records).await,
                    BucketLayout::Plain => merge_generation(inner, &mut bulk.clone(), generation, false, records).await,
                }
            }
        } => added,
    }?;
    let written = started.elapsed();
    // The sequence moves only once every replica has the delta's data.
    wait_replicas(inner, &mut bulk, "delta's writes").await?;
    lock.ensure_held()?;
    if cancel_requested() {
        return Err(interrupted(
            "before the delta's switch; the sequence did not move",
        ));
    }

    let mut invocation = DELTA_META.key(&inner.keys.meta);
    invocation
        .arg(sequence)
        .arg(generation.id)
        .arg(delta.sequence)
        .arg(delta.as_of.to_string())
        .arg(unix_now())
        .arg(added)
        .arg(if current.bloom.is_some() { "1" } else { "0" });
    let updated: i64 = inner.invoke(&invocation, limit).await?;
    if updated != 1 {
        return Err(StoreError::Conflict(
            "the redis mirror moved on during the delta import".into(),
        ));
    }
    let total = current.meta.record_count + added;
    tracing::info!(
        records = records.len(),
        new_numbers = added,
        sequence = delta.sequence,
        written_ms = written.as_millis() as u64,
        records_per_s = rate(records.len(), written),
        "redis delta applied"
    );
    if current.layout == BucketLayout::Packed {
        if total / generation.nbuckets > WARN_RECORDS_PER_BUCKET {
            tracing::warn!(
                records_per_bucket = total / generation.nbuckets,
                "redis buckets are filling up (each lookup reads and searches a larger string): import a snapshot to re-bucket"
            );
        }
    } else if total / generation.nbuckets > WARN_FIELDS_PER_BUCKET {
        tracing::warn!(
            fields_per_bucket = total / generation.nbuckets,
            "redis buckets are filling up (Redis converts buckets over 512 fields to larger hash tables): import a snapshot to re-bucket"
        );
    }
    if let Err(e) = inner.refresh().await {
        tracing::warn!(error = %e, "cannot refresh the metadata after the delta");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_owner_alive_or_dead() {
        let me = LockOwner::me();
        assert_eq!(LockOwner::decode(me.encode().as_bytes()), Some(me.clone()));
        assert!(!me.is_dead_here(), "this process is alive");
        assert_eq!(
            LockOwner::decode(b"0123456789abcdef"),
            None,
            "an old random token"
        );
        // a process that has exited
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let pid = child.id();
        child.wait().expect("wait");
        let gone = LockOwner {
            pid,
            pid_start: 1,
            ..me.clone()
        };
        assert!(gone.is_dead_here());
        // a live pid that is another process now (its start time differs)
        let reused = LockOwner {
            pid: 1,
            pid_start: process_start(1).unwrap_or(0) + 1,
            ..me.clone()
        };
        assert!(reused.is_dead_here());
        // another host: never declared dead here (its lock expires instead)
        let remote = LockOwner {
            host: format!("{}-elsewhere", me.host),
            ..gone
        };
        assert!(!remote.is_dead_here());
    }

    #[test]
    fn grouping_dense_and_sparse_agree() {
        let numbers: Vec<u64> = (0..5000u64).map(|i| 14_155_550_000 + i * 7).collect();
        for nbuckets in [1, 3, 40, 1000, 100_000] {
            let g = group_by_bucket(numbers.len(), |i| numbers[i], nbuckets, false);
            let mut seen = vec![false; numbers.len()];
            let mut last_bucket = None;
            for &(bucket, from, to) in &g.runs {
                assert!(last_bucket < Some(bucket));
                last_bucket = Some(bucket);
                let idx = &g.order[from as usize..to as usize];
                assert!(idx.windows(2).all(|w| w[0] < w[1]), "field order");
                for &i in idx {
                    assert_eq!(numbers[i as usize] % nbuckets, bucket);
                    seen[i as usize] = true;
                }
            }
            assert!(seen.iter().all(|&s| s));
        }
    }

    #[test]
    fn pipelines_cover_all_runs() {
        let runs: Vec<(u64, u32, u32)> = (0..5000u64)
            .map(|b| (b, (b * 100) as u32, (b * 100 + 100) as u32))
            .collect();
        let batches = pipeline_batches(&runs, None);
        let flat: Vec<u32> = batches.iter().flatten().copied().collect();
        assert_eq!(flat, (0..runs.len() as u32).collect::<Vec<_>>());
        assert!(batches.iter().all(|b| b.len() <= PIPELINE_COMMANDS));
        assert!(batches.len() > 1);
    }

    #[test]
    fn cluster_pipelines_stay_in_one_slot() {
        let runs: Vec<(u64, u32, u32)> = (0..20_000u64)
            .map(|b| (b, (b * 10) as u32, (b * 10 + 10) as u32))
            .collect();
        let slots: Vec<u16> = runs
            .iter()
            .map(|&(b, _, _)| key_slot(format!("rn:g1:{b}").as_bytes()))
            .collect();
        let batches = pipeline_batches(&runs, Some(&slots));
        let mut flat: Vec<u32> = batches.iter().flatten().copied().collect();
        flat.sort_unstable();
        assert_eq!(flat, (0..runs.len() as u32).collect::<Vec<_>>());
        for batch in &batches {
            assert!(
                batch
                    .iter()
                    .all(|&i| slots[i as usize] == slots[batch[0] as usize])
            );
        }
    }
}
