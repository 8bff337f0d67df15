//! The event log in the store's Redis.
//!
//! # Keys
//! [`SHARDS`] shards; `{s}` below is the literal hash tag `{fed<s>}` (e.g.
//! `{fed7}`), so that every key of one shard is on one cluster slot and
//! the shards spread over the cluster:
//!
//! | key | type | content |
//! |---|---|---|
//! | `{prefix}:fed:{s}:log` | stream | the shard's events, fields `k s e n d q t` (see `Wire` in the parent module); ids made by Redis (`*`); trimmed by `XTRIM MINID` for retention |
//! | `{prefix}:fed:{s}:pub` | hash | one field per publication, `<source>\0<event_id>` -> `<number digits>\|<disconnect days>\|<reissue days>\|<accepted ms>\|<a or r>` (`r`: retracted): the idempotency record and the overlay's durable state |
//!
//! An event's shard is [`shard_of`]`(source, event_id)`: a publication, its
//! idempotency record and its retraction are on one slot, written together
//! by one Lua script (atomic, also on a Redis Cluster).
//!
//! # Durability
//! Acknowledged means durable: Redis must run with `appendonly yes`. On
//! Redis 7.2 or later the log then sends `WAITAOF 1 0` to the shard's
//! master after each write and answers only once the write is fsynced
//! there. Before 7.2 (no `WAITAOF`) Redis must also run with `appendfsync
//! always` (each write fsynced before Redis answers). The log checks this
//! on every master (`INFO server`, `CONFIG GET`) when it opens and, while
//! it is not so, again at most every [`RECHECK`]: until then publications
//! and retractions are refused ([`LogError::NotDurable`], FAILED_PRECONDITION
//! to the caller) and the reason is logged; reading is unaffected. Where
//! `CONFIG` is disabled (some managed Redis), the log cannot verify it and
//! refuses as well.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use ::redis::{Script, Value};
use arc_swap::ArcSwap;

use super::{EventLog, LogError, MAX_WAIT, Position, Published, Retraction, SHARDS, Wire, shard_of};
use crate::domain::{Date, PhoneNumber};
use crate::federation::{Event, EventKind};
use crate::store::redis::RedisConnection;
use crate::store::{RedisStore, StoreError};

/// How often a Redis found not durable is checked again.
pub const RECHECK: Duration = Duration::from_secs(5);

/// Bound on one write (script, WAITAOF) or bulk read.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// How many times a read is sent again because the store replaced its
/// connection while the read waited ([`RedisLog::resent`]).
const RESENDS: usize = 2;

/// Publishes a shard's items: KEYS pub, log; ARGV source, accepted ms,
/// then per item event id, number, disconnect days, reissue days. Per item:
/// the new entry's id, `D` (duplicate) or `C` (conflict).
const PUBLISH: &str = r"
local src, t = ARGV[1], ARGV[2]
local out = {}
for i = 3, #ARGV, 4 do
  local e, n, d, q = ARGV[i], ARGV[i+1], ARGV[i+2], ARGV[i+3]
  local f = src .. '\0' .. e
  local cur = redis.call('HGET', KEYS[1], f)
  if cur then
    local same = n .. '|' .. d .. '|'
    if string.sub(cur, 1, #same) == same then out[#out+1] = 'D' else out[#out+1] = 'C' end
  else
    local id = redis.call('XADD', KEYS[2], '*', 'k', 'd', 's', src, 'e', e, 'n', n, 'd', d, 'q', q, 't', t)
    redis.call('HSET', KEYS[1], f, n .. '|' .. d .. '|' .. q .. '|' .. t .. '|a')
    out[#out+1] = id
  end
end
return out
";

/// Retracts: KEYS pub, log; ARGV source, event id, accepted ms. Returns
/// `{N}` (not found), `{R, n, d, q}` (already retracted) or
/// `{A, n, d, q, id}`.
const RETRACT: &str = r"
local f = ARGV[1] .. '\0' .. ARGV[2]
local cur = redis.call('HGET', KEYS[1], f)
if not cur then return {'N'} end
local n, d, q, t0, st = string.match(cur, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|(%a)$')
if not st then return redis.error_reply('corrupt publication record') end
if st == 'r' then return {'R', n, d, q} end
local id = redis.call('XADD', KEYS[2], '*', 'k', 'r', 's', ARGV[1], 'e', ARGV[2], 'n', n, 'd', d, 'q', q, 't', ARGV[3])
redis.call('HSET', KEYS[1], f, n .. '|' .. d .. '|' .. q .. '|' .. t0 .. '|r')
return {'A', n, d, q, id}
";

/// How this Redis makes a write durable.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Durability {
    /// Redis 7.2+ with AOF: `WAITAOF 1 0` after each write.
    WaitAof,
    /// AOF with `appendfsync always`: durable when Redis answers.
    FsyncAlways,
    /// Neither: writes are refused, for this reason.
    No(String),
}

/// The event log in Redis (see the [module documentation](self)). Cheap to
/// clone.
#[derive(Clone)]
pub struct RedisLog {
    inner: std::sync::Arc<Inner>,
}

struct Inner {
    store: RedisStore,
    prefix: String,
    durability: ArcSwap<(Durability, Instant)>,
    /// Connections of blocking reads, returned after each, with the
    /// store's replacement count they were made at (older ones are stale).
    blocking: Mutex<Vec<(u64, RedisConnection)>>,
    /// The store's connection replacements (see [`RedisLog::resent`]).
    replaced: tokio::sync::watch::Receiver<u64>,
    publish: Script,
    retract: Script,
}

impl RedisLog {
    /// The log beside `store`'s keys; checks Redis' persistence settings
    /// now (see the module documentation).
    pub async fn open(store: &RedisStore) -> Self {
        let log = Self {
            inner: std::sync::Arc::new(Inner {
                store: store.clone(),
                prefix: store.key_prefix().to_owned(),
                durability: ArcSwap::from_pointee((Durability::No("not checked yet".into()), Instant::now())),
                blocking: Mutex::new(Vec::new()),
                replaced: store.replacements(),
                publish: Script::new(PUBLISH),
                retract: Script::new(RETRACT),
            }),
        };
        let found = log.inner.check_durability().await;
        if let Durability::No(reason) = &found {
            tracing::warn!(%reason, "redis is not durable enough for the federation: publications are refused until it is (appendonly yes, and appendfsync always before redis 7.2)");
        }
        log.inner
            .durability
            .store(std::sync::Arc::new((found, Instant::now())));
        log
    }

    /// The key of shard `s`'s stream.
    pub fn log_key(&self, shard: u16) -> String {
        format!("{}:fed:{{fed{shard}}}:log", self.inner.prefix)
    }

    /// The key of shard `s`'s publication records.
    pub fn pub_key(&self, shard: u16) -> String {
        format!("{}:fed:{{fed{shard}}}:pub", self.inner.prefix)
    }

    /// The store this log lives beside (its connections, options, errors).
    pub fn store(&self) -> &RedisStore {
        &self.inner.store
    }

    /// The durability mode, re-checked if it was insufficient and the last
    /// check is older than [`RECHECK`]; an error if writes must be refused.
    async fn durable(&self) -> Result<Durability, LogError> {
        let current = self.inner.durability.load_full();
        let mode = match &current.0 {
            Durability::No(_) if current.1.elapsed() >= RECHECK => {
                let found = self.inner.check_durability().await;
                self.inner
                    .durability
                    .store(std::sync::Arc::new((found.clone(), Instant::now())));
                found
            }
            other => other.clone(),
        };
        match mode {
            Durability::No(reason) => Err(LogError::NotDurable(reason)),
            ok => Ok(ok),
        }
    }

    /// After a write on `key`'s shard: waits for the fsync where Redis can
    /// tell (WAITAOF).
    async fn settle(&self, mode: &Durability, key: &str) -> Result<(), LogError> {
        if *mode != Durability::WaitAof {
            return Ok(());
        }
        let mut cmd = ::redis::cmd("WAITAOF");
        cmd.arg(1).arg(0).arg(WRITE_TIMEOUT.as_millis() as u64);
        let mut conn = self.inner.store.connection();
        let reply = conn
            .on_master_of(key, &cmd, WRITE_TIMEOUT + Duration::from_secs(1))
            .await
            .map_err(|e| self.inner.store.error(&e))?;
        match reply {
            Value::Array(v) if matches!(v.first(), Some(Value::Int(n)) if *n >= 1) => Ok(()),
            _ => Err(LogError::Store(StoreError::Unavailable(
                "redis did not confirm the write's fsync in time (WAITAOF)".into(),
            ))),
        }
    }

    async fn run<T: ::redis::FromRedisValue>(
        &self,
        inv: ::redis::ScriptInvocation<'_>,
    ) -> Result<T, LogError> {
        let mut conn = self.inner.store.connection();
        Ok(self
            .inner
            .store
            .within(WRITE_TIMEOUT, inv.invoke_async(&mut conn))
            .await?)
    }

    /// Sends `cmd` on the store's shared connection, sent again if the
    /// store replaces it meanwhile ([`RedisLog::resent`]): only for
    /// commands that may run twice (reads, `XTRIM`).
    async fn query<T: ::redis::FromRedisValue>(&self, cmd: &::redis::Cmd) -> Result<T, LogError> {
        self.resent(|| async {
            let mut conn = self.inner.store.connection();
            Ok(self
                .inner
                .store
                .within(WRITE_TIMEOUT, cmd.query_async(&mut conn))
                .await?)
        })
        .await
    }

    /// Runs `send` (which takes its connection when called); if the store
    /// replaces its connection while `send` waits, `send` is dropped and
    /// run again, at most [`RESENDS`] times. After a failover the old
    /// connection holds requests for the dead master until they time out
    /// (seconds): without this a follower of the log would wait that long,
    /// then fail, and every lookup would answer UNAVAILABLE meanwhile.
    async fn resent<T, F, Fut>(&self, send: F) -> Result<T, LogError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, LogError>>,
    {
        let mut replaced = self.inner.replaced.clone();
        for _ in 0..RESENDS {
            replaced.borrow_and_update();
            tokio::select! {
                r = send() => return r,
                Ok(()) = replaced.changed() => {}
            }
        }
        send().await
    }

    /// Publishes the events of one shard.
    async fn publish_shard(
        &self,
        mode: &Durability,
        shard: u16,
        events: &[&Event],
    ) -> Result<Vec<Published>, LogError> {
        let Some(first) = events.first() else {
            return Ok(Vec::new());
        };
        let pub_key = self.pub_key(shard);
        let mut inv = self.inner.publish.key(&pub_key);
        inv.key(self.log_key(shard))
            .arg(&first.source)
            .arg(first.accepted_unix_ms);
        for e in events {
            inv.arg(&e.event_id)
                .arg(e.number.value())
                .arg(e.disconnect_date.days())
                .arg(e.earliest_reissue_date.days());
        }
        let replies: Vec<String> = self.run(inv).await?;
        self.settle(mode, &pub_key).await?;
        if replies.len() != events.len() {
            return Err(LogError::Corrupt(
                "publish script answered the wrong count".into(),
            ));
        }
        replies
            .iter()
            .map(|r| match r.as_str() {
                "D" => Ok(Published::Duplicate),
                "C" => Ok(Published::Conflict),
                id => Ok(Published::Accepted(shard, id.parse()?)),
            })
            .collect()
    }

    /// Sends a blocking `cmd` on a connection of its own (one of the pool,
    /// else a new one), bounded by `limit`; the connection goes back to the
    /// pool after an answer unless the store replaced its connection since
    /// it was made (it may still point at a dead master).
    async fn blocking_query(&self, cmd: &::redis::Cmd, limit: Duration) -> Result<Value, LogError> {
        let made_at = *self.inner.replaced.borrow();
        let pooled = {
            let mut pool = self
                .inner
                .blocking
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            pool.retain(|(at, _)| *at == made_at);
            pool.pop()
        };
        let mut conn = match pooled {
            Some((_, c)) => c,
            None => self.inner.store.dedicated_connection(MAX_WAIT)?,
        };
        let reply = self
            .inner
            .store
            .within(limit, cmd.query_async::<Value>(&mut conn))
            .await?;
        let mut pool = self
            .inner
            .blocking
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if pool.len() < 64 && *self.inner.replaced.borrow() == made_at {
            pool.push((made_at, conn));
        }
        Ok(reply)
    }

    async fn range(
        &self,
        shard: u16,
        after: Option<Position>,
        max: usize,
    ) -> Result<Vec<(Position, Event)>, LogError> {
        let start = after.map_or_else(|| "-".to_owned(), |p| format!("({p}"));
        let mut cmd = ::redis::cmd("XRANGE");
        cmd.arg(self.log_key(shard))
            .arg(start)
            .arg("+")
            .arg("COUNT")
            .arg(max);
        let reply: Value = self.query(&cmd).await?;
        entries(&reply)
    }
}

impl Inner {
    async fn check_durability(&self) -> Durability {
        let mut conn = self.store.connection();
        let limit = self.store.options().timeout.max(Duration::from_secs(1));
        let mut info = ::redis::cmd("INFO");
        info.arg("server");
        let mut config = ::redis::cmd("CONFIG");
        config.arg("GET").arg("append*");
        let versions = conn.on_masters(&info, limit).await;
        let configs = conn.on_masters(&config, limit).await;
        let mut wait_aof = true;
        for (node, reply) in &versions {
            let version = reply.as_ref().ok().and_then(text).and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("redis_version:"))
                    .map(str::to_owned)
            });
            let Some(version) = version else {
                return Durability::No(format!("INFO server failed on {}", node_name(node)));
            };
            let mut parts = version.trim().split('.').map(|p| p.parse::<u32>().unwrap_or(0));
            let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
            wait_aof &= (major, minor) >= (7, 2);
        }
        for (node, reply) in &configs {
            let Ok(Value::Array(pairs) | Value::Set(pairs)) = reply else {
                if let Ok(Value::Map(map)) = reply {
                    let pairs: Vec<Value> = map.iter().flat_map(|(k, v)| [k.clone(), v.clone()]).collect();
                    if let Some(no) = check_append(node, &pairs, wait_aof) {
                        return no;
                    }
                    continue;
                }
                return Durability::No(format!(
                    "CONFIG GET failed on {}: cannot verify appendonly",
                    node_name(node)
                ));
            };
            if let Some(no) = check_append(node, pairs, wait_aof) {
                return no;
            }
        }
        if versions.is_empty() {
            return Durability::No("no redis master answered".into());
        }
        if wait_aof {
            Durability::WaitAof
        } else {
            Durability::FsyncAlways
        }
    }
}

fn node_name(node: &str) -> &str {
    if node.is_empty() { "redis" } else { node }
}

/// `None` if the `CONFIG GET append*` pairs of `node` make writes durable.
fn check_append(node: &str, pairs: &[Value], wait_aof: bool) -> Option<Durability> {
    let get = |name: &str| {
        pairs
            .chunks(2)
            .find(|kv| kv.first().and_then(text).as_deref() == Some(name))
            .and_then(|kv| kv.get(1).and_then(text))
    };
    if get("appendonly").as_deref() != Some("yes") {
        return Some(Durability::No(format!(
            "appendonly is not yes on {}",
            node_name(node)
        )));
    }
    if !wait_aof && get("appendfsync").as_deref() != Some("always") {
        return Some(Durability::No(format!(
            "appendfsync is not always on {} (needed before redis 7.2, which has no WAITAOF)",
            node_name(node)
        )));
    }
    None
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

/// The entries of an XRANGE reply (or of one stream of an XREAD reply).
fn entries(reply: &Value) -> Result<Vec<(Position, Event)>, LogError> {
    let Value::Array(items) = reply else {
        return Ok(Vec::new());
    };
    items.iter().map(entry).collect()
}

fn entry(item: &Value) -> Result<(Position, Event), LogError> {
    let bad = |what: &str| LogError::Corrupt(format!("stream entry: {what}"));
    let Value::Array(parts) = item else {
        return Err(bad("not an array"));
    };
    let id: Position = parts
        .first()
        .and_then(text_ref)
        .ok_or_else(|| bad("no id"))?
        .parse()?;
    // The fields read in place (every server reads every entry: no map,
    // no copies but the two strings kept); an unknown field is skipped.
    const NAMES: [&str; 7] = ["k", "s", "e", "n", "d", "q", "t"];
    let mut fields: [Option<&str>; 7] = [None; 7];
    let pairs: Vec<(&Value, &Value)> = match parts.get(1) {
        Some(Value::Array(kv)) => kv.chunks_exact(2).map(|p| (&p[0], &p[1])).collect(),
        Some(Value::Map(kv)) => kv.iter().map(|(k, v)| (k, v)).collect(),
        _ => return Err(bad("no fields")),
    };
    for (k, v) in pairs {
        if let Some(slot) = text_ref(k).and_then(|k| NAMES.iter().position(|n| *n == k)) {
            fields[slot] = text_ref(v);
        }
    }
    let field = |i: usize| fields[i].ok_or_else(|| bad(&format!("no field {}", NAMES[i])));
    let num = |i: usize| -> Result<i64, LogError> { field(i)?.parse().map_err(|_| bad(NAMES[i])) };
    let wire = Wire {
        k: field(0)?.to_owned(),
        s: field(1)?.to_owned(),
        e: field(2)?.to_owned(),
        n: field(3)?.parse().map_err(|_| bad("n"))?,
        d: i32::try_from(num(4)?).map_err(|_| bad("d"))?,
        q: i32::try_from(num(5)?).map_err(|_| bad("q"))?,
        t: num(6)?,
    };
    Ok((id, wire.event()?))
}

/// The text of a reply without copying it; `None` if it is not text (or
/// not UTF-8: the log writes only UTF-8).
fn text_ref(v: &Value) -> Option<&str> {
    match v {
        Value::BulkString(b) => std::str::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        Value::VerbatimString { text, .. } => Some(text),
        _ => None,
    }
}

/// The event of a publication record (`n|d|q|t|a`) of `field`
/// (`source\0event_id`); `None` if retracted.
fn active_record(field: &str, value: &str) -> Result<Option<Event>, LogError> {
    let bad = || LogError::Corrupt("publication record".into());
    let (source, event_id) = field.split_once('\0').ok_or_else(bad)?;
    let parts: Vec<&str> = value.split('|').collect();
    let [n, d, q, t, state] = parts.as_slice() else {
        return Err(bad());
    };
    if *state != "a" {
        return Ok(None);
    }
    Ok(Some(Event {
        event_id: event_id.to_owned(),
        number: n.parse().ok().and_then(PhoneNumber::from_value).ok_or_else(bad)?,
        disconnect_date: Date::from_days(d.parse().map_err(|_| bad())?),
        earliest_reissue_date: Date::from_days(q.parse().map_err(|_| bad())?),
        source: source.to_owned(),
        kind: EventKind::Disconnected,
        accepted_unix_ms: t.parse().map_err(|_| bad())?,
    }))
}

impl EventLog for RedisLog {
    fn shards(&self) -> u16 {
        SHARDS
    }

    fn shard(&self, source: &str, event_id: &str) -> u16 {
        shard_of(source, event_id)
    }

    async fn publish(&self, events: &[Event]) -> Result<Vec<Published>, LogError> {
        let mode = self.durable().await?;
        let mut by_shard: Vec<Vec<(usize, &Event)>> = vec![Vec::new(); usize::from(SHARDS)];
        for (i, e) in events.iter().enumerate() {
            by_shard[usize::from(shard_of(&e.source, &e.event_id))].push((i, e));
        }
        let calls = by_shard
            .iter()
            .enumerate()
            .filter(|(_, v)| !v.is_empty())
            .map(|(s, v)| {
                let mode = &mode;
                async move {
                    let evs: Vec<&Event> = v.iter().map(|(_, e)| *e).collect();
                    // SHARDS fits a u16.
                    let shard = u16::try_from(s).unwrap_or(0);
                    self.publish_shard(mode, shard, &evs).await.map(|r| (v, r))
                }
            });
        let mut out = vec![Published::Duplicate; events.len()];
        for done in futures_util::future::join_all(calls).await {
            let (items, results) = done?;
            for ((i, _), r) in items.iter().zip(results) {
                out[*i] = r;
            }
        }
        // Within one call, an event whose id an earlier one of the same
        // call used is in the same shard's script, after it: the script
        // answers it as a duplicate or a conflict of the earlier one.
        Ok(out)
    }

    async fn retract(
        &self,
        source: &str,
        event_id: &str,
        accepted_unix_ms: i64,
    ) -> Result<Retraction, LogError> {
        let mode = self.durable().await?;
        let shard = shard_of(source, event_id);
        let pub_key = self.pub_key(shard);
        let mut inv = self.inner.retract.key(&pub_key);
        inv.key(self.log_key(shard))
            .arg(source)
            .arg(event_id)
            .arg(accepted_unix_ms);
        let reply: Vec<String> = self.run(inv).await?;
        let bad = || LogError::Corrupt("retract script answer".into());
        let event = |r: &[String]| -> Result<Event, LogError> {
            Ok(Event {
                event_id: event_id.to_owned(),
                number: r
                    .get(1)
                    .and_then(|n| n.parse().ok())
                    .and_then(PhoneNumber::from_value)
                    .ok_or_else(bad)?,
                disconnect_date: Date::from_days(r.get(2).and_then(|d| d.parse().ok()).ok_or_else(bad)?),
                earliest_reissue_date: Date::from_days(
                    r.get(3).and_then(|d| d.parse().ok()).ok_or_else(bad)?,
                ),
                source: source.to_owned(),
                kind: EventKind::Retracted,
                accepted_unix_ms,
            })
        };
        match reply.first().map(String::as_str) {
            Some("N") => Ok(Retraction::NotFound),
            Some("R") => Ok(Retraction::AlreadyRetracted(event(&reply)?)),
            Some("A") => {
                self.settle(&mode, &pub_key).await?;
                let at: Position = reply.get(4).ok_or_else(bad)?.parse()?;
                Ok(Retraction::Retracted(event(&reply)?, shard, at))
            }
            _ => Err(bad()),
        }
    }

    async fn append(&self, events: &[Event]) -> Result<Vec<(u16, Position)>, LogError> {
        let mode = self.durable().await?;
        let mut by_shard: Vec<Vec<usize>> = vec![Vec::new(); usize::from(SHARDS)];
        for (i, e) in events.iter().enumerate() {
            by_shard[usize::from(shard_of(&e.source, &e.event_id))].push(i);
        }
        let calls = by_shard
            .iter()
            .enumerate()
            .filter(|(_, v)| !v.is_empty())
            .map(|(s, idx)| {
                let mode = &mode;
                async move {
                    let shard = u16::try_from(s).unwrap_or(0);
                    let key = self.log_key(shard);
                    let mut pipe = ::redis::pipe();
                    for &i in idx {
                        let w = Wire::of(&events[i]);
                        pipe.cmd("XADD")
                            .arg(&key)
                            .arg("*")
                            .arg("k")
                            .arg(&w.k)
                            .arg("s")
                            .arg(&w.s)
                            .arg("e")
                            .arg(&w.e)
                            .arg("n")
                            .arg(w.n)
                            .arg("d")
                            .arg(w.d)
                            .arg("q")
                            .arg(w.q)
                            .arg("t")
                            .arg(w.t);
                    }
                    let mut conn = self.inner.store.connection();
                    let ids: Vec<String> = self
                        .inner
                        .store
                        .within(WRITE_TIMEOUT, pipe.query_async(&mut conn))
                        .await?;
                    self.settle(mode, &key).await?;
                    let positions = ids
                        .iter()
                        .map(|id| id.parse())
                        .collect::<Result<Vec<Position>, _>>()?;
                    Ok::<_, LogError>((shard, idx, positions))
                }
            });
        let mut out = vec![(0u16, Position::ZERO); events.len()];
        for done in futures_util::future::join_all(calls).await {
            let (shard, idx, positions) = done?;
            for (&i, p) in idx.iter().zip(positions) {
                out[i] = (shard, p);
            }
        }
        Ok(out)
    }

    async fn read_after(
        &self,
        shard: u16,
        after: Option<Position>,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<(Position, Event)>, LogError> {
        if shard >= SHARDS || max == 0 {
            return Ok(Vec::new());
        }
        let found = self.range(shard, after, max).await?;
        let wait = wait.min(MAX_WAIT);
        if !found.is_empty() || wait.is_zero() {
            return Ok(found);
        }
        let mut cmd = ::redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(max)
            .arg("BLOCK")
            .arg(wait.as_millis().max(1) as u64)
            .arg("STREAMS")
            .arg(self.log_key(shard))
            .arg(after.unwrap_or(Position::ZERO).to_string());
        let reply = self
            .resent(|| self.blocking_query(&cmd, wait + WRITE_TIMEOUT))
            .await?;
        // [[key, [entries]]] (RESP2) or {key: [entries]} (RESP3); nil on
        // timeout.
        match reply {
            Value::Array(streams) => match streams.first() {
                Some(Value::Array(kv)) => kv.get(1).map_or(Ok(Vec::new()), entries),
                _ => Ok(Vec::new()),
            },
            Value::Map(streams) => streams.first().map_or(Ok(Vec::new()), |(_, v)| entries(v)),
            _ => Ok(Vec::new()),
        }
    }

    async fn first_position(&self, shard: u16) -> Result<Option<Position>, LogError> {
        Ok(self.range(shard, None, 1).await?.first().map(|(p, _)| *p))
    }

    async fn last_position(&self, shard: u16) -> Result<Option<Position>, LogError> {
        let mut cmd = ::redis::cmd("XREVRANGE");
        cmd.arg(self.log_key(shard)).arg("+").arg("-").arg("COUNT").arg(1);
        let reply: Value = self.query(&cmd).await?;
        Ok(entries(&reply)?.first().map(|(p, _)| *p))
    }

    async fn trim(&self, older_than_unix_ms: i64) -> Result<u64, LogError> {
        let mut dropped = 0u64;
        for shard in 0..SHARDS {
            let mut cmd = ::redis::cmd("XTRIM");
            cmd.arg(self.log_key(shard))
                .arg("MINID")
                .arg(older_than_unix_ms.max(0));
            let n: u64 = self.query(&cmd).await?;
            dropped += n;
        }
        Ok(dropped)
    }

    async fn active(&self) -> Result<Vec<Event>, LogError> {
        let mut out = Vec::new();
        for shard in 0..SHARDS {
            let key = self.pub_key(shard);
            let mut cursor = "0".to_owned();
            loop {
                let mut cmd = ::redis::cmd("HSCAN");
                cmd.arg(&key).arg(&cursor).arg("COUNT").arg(1000);
                let (next, kv): (String, Vec<String>) = self.query(&cmd).await?;
                for pair in kv.chunks(2) {
                    if let [field, value] = pair
                        && let Some(e) = active_record(field, value)?
                    {
                        out.push(e);
                    }
                }
                if next == "0" {
                    break;
                }
                cursor = next;
            }
        }
        Ok(out)
    }
}
