//! Operator checks of the Redis mirror: per-bucket digests for `verify`,
//! and `gc`, which finds and removes orphaned generations.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use ::redis::Value;
use futures_util::{StreamExt, TryStreamExt, stream};

use super::meta::{BucketLayout, Generation};
use super::write::{ImportLock, LockOwner};
use super::{Conn, Inner, RedisStore};
use crate::store::digest::{BucketDigest, MirrorDigest};
use crate::store::{StoreError, packed};

/// Buckets read per pipeline (one server) by [`RedisStore::digest`].
const DIGEST_BATCH: u64 = 256;
/// Pipelines (one server) or single commands (cluster) in flight.
const DIGEST_IN_FLIGHT: usize = 4;
const DIGEST_IN_FLIGHT_CLUSTER: usize = 64;
/// Keys asked per SCAN step by [`RedisStore::gc`].
const SCAN_COUNT: u64 = 1000;

/// A bucket's fields and values, as HGETALL returns them.
type Fields = HashMap<Vec<u8>, Vec<u8>>;

/// Adds one bucket's fields to `digest`. Fields that are not numbers (e.g. a
/// sentinel such as `_g`) are not records and are skipped; a value that is
/// not a number spoils the digest (it can match nothing).
fn digest_bucket(digest: &mut BucketDigest, generation: Generation, bucket: u64, fields: &Fields) {
    for (field, value) in fields {
        let Some(field) = std::str::from_utf8(field)
            .ok()
            .and_then(|f| f.parse::<u64>().ok())
        else {
            continue;
        };
        let number = field
            .checked_mul(generation.nbuckets)
            .and_then(|n| n.checked_add(bucket))
            .unwrap_or(u64::MAX);
        let day = std::str::from_utf8(value)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(u64::MAX);
        digest.add(number, day);
    }
}

/// Adds one packed bucket (layout 3, the `GET` reply) to `digest`. A
/// missing bucket adds nothing (the count then differs); one that is not a
/// packed bucket of `generation` adds a record that can match nothing.
fn digest_packed(digest: &mut BucketDigest, generation: Generation, bucket: u64, value: &Value) {
    let Value::BulkString(bytes) = value else {
        if !matches!(value, Value::Nil) {
            digest.add(u64::MAX, u64::MAX);
        }
        return;
    };
    match packed::Bucket::parse(bytes) {
        Ok(b) if b.header().generation == generation.id => {
            for (suffix, day) in b.iter() {
                let number = suffix
                    .checked_mul(generation.nbuckets)
                    .and_then(|n| n.checked_add(bucket))
                    .unwrap_or(u64::MAX);
                digest.add(number, u64::from(day));
            }
        }
        _ => digest.add(u64::MAX, u64::MAX),
    }
}

/// Adds one bucket (the reply of [`bucket_dump`]) to `digest`.
fn digest_value(
    digest: &mut BucketDigest,
    layout: BucketLayout,
    generation: Generation,
    bucket: u64,
    value: Value,
) {
    if layout == BucketLayout::Packed {
        digest_packed(digest, generation, bucket, &value);
        return;
    }
    match <Fields as ::redis::FromRedisValue>::from_redis_value(value) {
        Ok(fields) => digest_bucket(digest, generation, bucket, &fields),
        Err(_) => digest.add(u64::MAX, u64::MAX),
    }
}

/// The command reading a whole bucket: `GET` (layout 3) or `HGETALL`.
fn bucket_dump(layout: BucketLayout, key: String) -> ::redis::Cmd {
    let mut cmd = ::redis::cmd(if layout == BucketLayout::Packed {
        "GET"
    } else {
        "HGETALL"
    });
    cmd.arg(key);
    cmd
}

impl RedisStore {
    /// Reads every bucket of the current generation and reduces it to
    /// per-bucket digests (see [`crate::store::digest`]); `None` while the
    /// mirror is empty. Reads on a connection of its own, a few hundred
    /// buckets at a time.
    pub async fn digest(&self) -> Result<Option<MirrorDigest>, StoreError> {
        let inner = &*self.inner;
        let stored = inner.read_meta(inner.opts.bulk_timeout).await?;
        let Some(current) = stored.current else {
            return Ok(None);
        };
        let generation = current.generation;
        let layout = current.layout;
        let conn = inner.bulk_conn()?;
        let mut buckets = vec![BucketDigest::default(); usize::try_from(generation.nbuckets).unwrap_or(0)];
        let limit = inner.opts.bulk_timeout;
        let read: Vec<Vec<(u64, Value)>> = if conn.is_cluster() {
            stream::iter(0..generation.nbuckets)
                .map(|bucket| {
                    let mut conn = conn.clone();
                    async move {
                        let cmd = bucket_dump(layout, inner.keys.bucket(generation.id, bucket));
                        let value: Value = inner.query_on(&mut conn, &cmd, limit).await?;
                        Ok::<_, StoreError>(vec![(bucket, value)])
                    }
                })
                .buffer_unordered(DIGEST_IN_FLIGHT_CLUSTER)
                .try_collect()
                .await?
        } else {
            stream::iter((0..generation.nbuckets.div_ceil(DIGEST_BATCH)).map(|b| b * DIGEST_BATCH))
                .map(|from| {
                    let mut conn = conn.clone();
                    async move {
                        let to = (from + DIGEST_BATCH).min(generation.nbuckets);
                        let mut pipe = ::redis::pipe();
                        for bucket in from..to {
                            pipe.add_command(bucket_dump(layout, inner.keys.bucket(generation.id, bucket)));
                        }
                        let all: Vec<Value> = inner.pipeline_on(&mut conn, &pipe, limit).await?;
                        Ok::<_, StoreError>((from..to).zip(all).collect())
                    }
                })
                .buffer_unordered(DIGEST_IN_FLIGHT)
                .try_collect()
                .await?
        };
        for (bucket, value) in read.into_iter().flatten() {
            if let Some(digest) = usize::try_from(bucket).ok().and_then(|b| buckets.get_mut(b)) {
                digest_value(digest, layout, generation, bucket, value);
            }
        }
        Ok(Some(MirrorDigest {
            sequence: current.meta.sequence,
            meta_records: current.meta.record_count,
            buckets,
            name_prefix: format!("{}:g{}:", inner.keys.prefix, generation.id),
        }))
    }

    /// Finds the keys of generations that are neither current nor in use by
    /// a live import (bucket keys and membership filter chunks) and, unless
    /// `dry_run`, removes them and clears the metadata marks that pointed to
    /// them. Removing takes the import lock (taking over a dead owner's), so
    /// no import runs meanwhile; a dry run takes no lock and counts the
    /// pending and replaced generations of a live import as in use.
    ///
    /// On a Redis Cluster, every master is scanned (`CLUSTER NODES`).
    pub async fn gc(&self, dry_run: bool) -> Result<GcReport, StoreError> {
        let inner = &self.inner;
        let lock = if dry_run {
            None
        } else {
            Some(ImportLock::acquire(inner).await?)
        };
        let result = gc_locked(inner, lock.as_ref(), dry_run).await;
        if let Some(lock) = lock {
            lock.release().await;
        }
        result
    }
}

/// What [`RedisStore::gc`] found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// True if nothing was removed (`--dry-run`).
    pub dry_run: bool,
    /// The current generation (`None`: the mirror is empty).
    pub current: Option<u64>,
    /// Generations kept because a live import uses them.
    pub in_use: Vec<u64>,
    /// Orphaned generations and how many keys each has.
    pub orphans: BTreeMap<u64, u64>,
    /// Keys removed.
    pub removed: u64,
}

impl fmt::Display for GcReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.current {
            Some(g) => write!(f, "current generation {g}")?,
            None => write!(f, "the mirror is empty")?,
        }
        if !self.in_use.is_empty() {
            write!(f, "; in use by a live import: generation(s) {:?}", self.in_use)?;
        }
        if self.orphans.is_empty() {
            return write!(f, "; no orphaned generation");
        }
        let list: Vec<String> = self
            .orphans
            .iter()
            .map(|(g, keys)| format!("generation {g} ({keys} keys)"))
            .collect();
        write!(f, "; orphaned: {}", list.join(", "))?;
        if self.dry_run {
            write!(f, "; dry run: nothing removed")
        } else {
            write!(f, "; removed {} keys", self.removed)
        }
    }
}

/// The generation a key of ours belongs to: `{prefix}:g{id}:{bucket}` or
/// `{prefix}:bloom:g{id}:{chunk}`; `None` for every other key.
fn key_generation(prefix: &str, key: &[u8]) -> Option<u64> {
    let rest = key.strip_prefix(prefix.as_bytes())?.strip_prefix(b":")?;
    let rest = rest.strip_prefix(b"bloom:").unwrap_or(rest);
    let rest = rest.strip_prefix(b"g")?;
    let colon = rest.iter().position(|&b| b == b':')?;
    let (id, index) = (&rest[..colon], &rest[colon + 1..]);
    let digits = |s: &[u8]| !s.is_empty() && s.iter().all(u8::is_ascii_digit);
    if !digits(id) || !digits(index) {
        return None;
    }
    std::str::from_utf8(id).ok()?.parse().ok()
}

/// `text` with Redis glob characters escaped.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Where one SCAN goes: the one server, or one master of a cluster.
enum ScanNode {
    Single,
    Master(String, u16),
}

/// The masters of a cluster, from `CLUSTER NODES` (failed nodes skipped).
fn masters(nodes: &str) -> Vec<ScanNode> {
    nodes
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let address = fields.nth(1)?;
            let flags = fields.next()?;
            let flags: Vec<&str> = flags.split(',').collect();
            if !flags.contains(&"master")
                || flags
                    .iter()
                    .any(|f| matches!(*f, "fail" | "noaddr" | "handshake"))
            {
                return None;
            }
            let address = address.split(['@', ',']).next()?;
            let (host, port) = address.rsplit_once(':')?;
            Some(ScanNode::Master(host.to_owned(), port.parse().ok()?))
        })
        .collect()
}

impl Inner {
    /// The nodes whose SCANs together cover every key.
    async fn scan_nodes(&self, conn: &Conn) -> Result<Vec<ScanNode>, StoreError> {
        if !conn.is_cluster() {
            return Ok(vec![ScanNode::Single]);
        }
        let mut cmd = ::redis::cmd("CLUSTER");
        cmd.arg("NODES");
        let text: String = self
            .query_on(&mut conn.clone(), &cmd, self.opts.bulk_timeout)
            .await?;
        let masters = masters(&text);
        if masters.is_empty() {
            return Err(StoreError::Unavailable(
                "redis cluster: CLUSTER NODES lists no master".into(),
            ));
        }
        Ok(masters)
    }

    /// One SCAN step on `node`: the next cursor and the keys.
    async fn scan_step(
        &self,
        conn: &Conn,
        node: &ScanNode,
        cmd: &::redis::Cmd,
    ) -> Result<(u64, Vec<Vec<u8>>), StoreError> {
        let limit = self.opts.bulk_timeout;
        match (conn, node) {
            (Conn::Cluster(cluster), ScanNode::Master(host, port)) => {
                use ::redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port: *port,
                });
                let mut cluster = cluster.clone();
                let value =
                    match tokio::time::timeout(limit, cluster.route_command(cmd.clone(), routing)).await {
                        Err(_) => return Err(StoreError::Timeout(limit)),
                        Ok(Err(e)) => return Err(self.unavailable(&e)),
                        Ok(Ok(v)) => v,
                    };
                ::redis::FromRedisValue::from_redis_value(value)
                    .map_err(|_| StoreError::Unavailable("redis: unexpected SCAN reply".into()))
            }
            _ => self.query_on(&mut conn.clone(), cmd, limit).await,
        }
    }
}

async fn gc_locked(inner: &Inner, lock: Option<&ImportLock>, dry_run: bool) -> Result<GcReport, StoreError> {
    let limit = inner.opts.bulk_timeout;
    let stored = inner.read_meta(limit).await?;
    let current = stored.current.as_ref().map(|c| c.generation.id);
    let mut report = GcReport {
        dry_run,
        current,
        ..GcReport::default()
    };
    if lock.is_none() {
        let mut get = ::redis::cmd("GET");
        get.arg(&inner.keys.lock);
        let held: Option<Vec<u8>> = inner.query(&get, limit).await?;
        let live = held.is_some_and(|v| LockOwner::decode(&v).is_none_or(|o| !o.is_dead_here()));
        if live {
            report.in_use = [stored.pending, stored.reclaim]
                .into_iter()
                .flatten()
                .map(|g| g.id)
                .filter(|&id| Some(id) != current)
                .collect();
        }
    }
    let pattern = format!("{}:*", glob_escape(&inner.keys.prefix));
    let conn = inner.bulk_conn()?;
    for node in inner.scan_nodes(&conn).await? {
        let mut cursor: u64 = 0;
        loop {
            let mut scan = ::redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT);
            let (next, keys) = inner.scan_step(&conn, &node, &scan).await?;
            let orphans: Vec<(u64, Vec<u8>)> = keys
                .into_iter()
                .filter_map(|k| key_generation(&inner.keys.prefix, &k).map(|g| (g, k)))
                .filter(|(g, _)| Some(*g) != current && !report.in_use.contains(g))
                .collect();
            for (g, _) in &orphans {
                *report.orphans.entry(*g).or_default() += 1;
            }
            if let Some(lock) = lock
                && !orphans.is_empty()
            {
                lock.ensure_held()?;
                let unlinks = orphans.into_iter().map(|(_, key)| {
                    let mut conn = conn.clone();
                    async move {
                        let mut unlink = ::redis::cmd("UNLINK");
                        unlink.arg(key);
                        inner.query_on::<i64>(&mut conn, &unlink, limit).await
                    }
                });
                let removed: Vec<i64> = stream::iter(unlinks).buffer_unordered(64).try_collect().await?;
                report.removed += removed.iter().map(|&r| r.max(0) as u64).sum::<u64>();
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
    }
    if lock.is_some() {
        use super::meta::field;
        let marks = [
            (stored.pending, field::PENDING_GENERATION, field::PENDING_NBUCKETS),
            (stored.reclaim, field::RECLAIM_GENERATION, field::RECLAIM_NBUCKETS),
        ];
        for (generation, id_field, nbuckets_field) in marks {
            if generation.is_some_and(|g| Some(g.id) != current) {
                let mut clear = ::redis::cmd("HDEL");
                clear.arg(&inner.keys.meta).arg(id_field).arg(nbuckets_field);
                inner.query::<Value>(&clear, limit).await?;
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_generations_only() {
        assert_eq!(key_generation("rn", b"rn:g7:123"), Some(7));
        assert_eq!(key_generation("rn", b"rn:bloom:g12:0"), Some(12));
        for other in [
            &b"rn:meta"[..],
            b"rn:gen_counter",
            b"rn:lock",
            b"rn:applied",
            b"rn:g7:",
            b"rn:g:1",
            b"rn:g7:x",
            b"other:g7:1",
            b"rnx:g7:1",
        ] {
            assert_eq!(
                key_generation("rn", other),
                None,
                "{}",
                String::from_utf8_lossy(other)
            );
        }
        assert_eq!(glob_escape("a*b?[c]"), "a\\*b\\?\\[c\\]");
        let nodes = "a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460\n\
                     b2 127.0.0.1:7001@17001,host master - 0 0 2 connected 5461-10922\n\
                     c3 127.0.0.1:7002@17002 slave a1 0 0 1 connected\n\
                     d4 127.0.0.1:7003@17003 master,fail - 0 0 3 disconnected\n";
        let found: Vec<(String, u16)> = masters(nodes)
            .into_iter()
            .filter_map(|n| match n {
                ScanNode::Master(h, p) => Some((h, p)),
                ScanNode::Single => None,
            })
            .collect();
        assert_eq!(
            found,
            vec![("127.0.0.1".into(), 7000), ("127.0.0.1".into(), 7001)]
        );
    }
}
