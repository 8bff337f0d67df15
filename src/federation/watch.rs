//! Platforms' watch lists: the numbers bound to each platform's accounts,
//! kept as keyed hashes, never in clear.
//!
//! # What is stored
//! For platform `p` and number `n` the server computes
//! `HMAC-SHA-256(watch key, p || 0x00 || E.164 text of n)` ([`WatchKey`]).
//! The platform is in the message, so the same number on two lists gives
//! two unrelated hashes (lists cannot be joined), and nothing in the store
//! reveals a number without the key. Of the 32 bytes, the first 2 pick one
//! of 65,536 buckets and the next 8 are the stored tag (80 bits in all: a
//! false match needs about 2^40 numbers on one list).
//!
//! # Redis layout
//! `{prefix}:w:{kid}:{platform hash}:{bucket}` is a hash whose fields are
//! the 8-byte tags (value `1`); `{prefix}:w:{kid}:{platform hash}:n` counts
//! the list. `platform hash` is the first 8 bytes (hex) of SHA-256 of the
//! platform's identity (no platform name, and no brace that would make a
//! hash tag, in key names). A list of 10^7 numbers fills each bucket with
//! about 150 fields: far under `hash-max-listpack-entries` (512), so each
//! number costs its listpack entry (about 12 bytes) plus its share of the
//! 65,536 bucket keys. The buckets have no hash tag: on a Redis Cluster they
//! spread over every slot (no hot key). 10^9 watched numbers, e.g. 100
//! platforms of 10^7, are 6.5 million bucket keys of about 150 fields each,
//! spread evenly over all 16,384 slots; the only per-list key is the count.
//! Each add or remove is one HSETNX / HDEL per number (sent concurrently:
//! pipelined on one connection), then one INCRBY of the count: a crash
//! between the two leaves the count off by that call's changes (the list
//! itself is right, and adding or removing the same numbers again does not
//! move the count).
//!
//! # Embedded layout
//! The tags in memory (per platform hash, a set), and every change appended
//! to `watchlists.journal` in the data directory (see [`super::journal`]),
//! fsynced before the call answers, replayed at start.
//!
//! # Key rotation
//! The key id ([`WatchKey::kid`], derived from the key) is part of every
//! key (Redis) and record (journal): entries made under another key are
//! never matched or counted. Rotating the key therefore starts empty lists;
//! platforms load their user base again (`reassigned watchlist add`), and
//! the old key's entries are dropped (Redis: `UNLINK` the keys matching
//! `{prefix}:w:{old kid}:*`; embedded: they are skipped at replay). The
//! server cannot re-key entries itself: it holds no clear numbers, by
//! design.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use futures_util::{StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};

use super::journal::Journal;
use crate::domain::PhoneNumber;
use crate::domain::hmac::{HmacKey, read_secret};
use crate::store::{RedisStore, StoreError};

/// The most numbers of one AddWatches or RemoveWatches call.
pub const MAX_WATCH_BATCH: usize = 10_000;

/// The journal of the embedded watch lists, in the data directory.
pub const WATCH_JOURNAL: &str = "watchlists.journal";

/// Buckets per platform list (2^16, picked by the first 2 bytes of a hash).
const BUCKETS: usize = 1 << 16;

/// Redis commands of one call in flight at once.
const CONCURRENCY: usize = 256;

/// The stored part of a number's keyed hash: bucket (2 bytes) and tag (8).
type Tag = [u8; 10];

/// The key of the watch lists' hashes (see the module documentation).
#[derive(Clone)]
pub struct WatchKey {
    key: HmacKey,
    kid: String,
}

impl std::fmt::Debug for WatchKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl WatchKey {
    /// The key of `secret` (at least 16 bytes: see [`read_secret`]).
    pub fn new(secret: &[u8]) -> Self {
        let key = HmacKey::new(secret);
        let kid = hex::encode(&key.mac(b"reassigned watch key id")[..4]);
        Self { key, kid }
    }

    /// Reads the key from a secret file.
    pub fn load(path: &Path) -> Result<Self, String> {
        read_secret(path, "watch key").map(|s| Self::new(&s))
    }

    /// The key's id: 8 hex digits derived from it (not secret).
    pub fn kid(&self) -> &str {
        &self.kid
    }

    fn tag(&self, platform: &str, number: PhoneNumber) -> Tag {
        let mut message = Vec::with_capacity(platform.len() + 17);
        message.extend_from_slice(platform.as_bytes());
        message.push(0);
        message.extend_from_slice(number.to_string().as_bytes());
        let mac = self.key.mac(&message);
        let mut tag = [0u8; 10];
        tag.copy_from_slice(&mac[..10]);
        tag
    }
}

/// The short, non-reversible name of a platform in keys and records.
fn platform_hash(platform: &str) -> [u8; 8] {
    let digest = Sha256::digest(platform.as_bytes());
    let mut out = [0u8; 8];
    out.copy_from_slice(&digest[..8]);
    out
}

/// The watch lists of every platform, on the mirror's store.
#[derive(Clone)]
pub enum WatchLists {
    /// In process, journaled in the data directory.
    Embedded(Arc<EmbeddedWatchLists>),
    /// In the mirror's Redis (one server or a cluster).
    Redis(RedisWatchLists),
}

impl std::fmt::Debug for WatchLists {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WatchLists::Embedded(_) => f.write_str("WatchLists::Embedded"),
            WatchLists::Redis(r) => write!(f, "WatchLists::Redis({:?})", r.key),
        }
    }
}

impl WatchLists {
    /// Adds `numbers` to `platform`'s list; per number, true when it was
    /// not on it yet.
    pub async fn add(&self, platform: &str, numbers: &[PhoneNumber]) -> Result<Vec<bool>, StoreError> {
        match self {
            WatchLists::Embedded(e) => e.change(platform, numbers, Op::Add).await,
            WatchLists::Redis(r) => r.change(platform, numbers, Op::Add).await,
        }
    }

    /// Removes `numbers` from `platform`'s list; per number, true when it
    /// was on it.
    pub async fn remove(&self, platform: &str, numbers: &[PhoneNumber]) -> Result<Vec<bool>, StoreError> {
        match self {
            WatchLists::Embedded(e) => e.change(platform, numbers, Op::Remove).await,
            WatchLists::Redis(r) => r.change(platform, numbers, Op::Remove).await,
        }
    }

    /// How many numbers `platform`'s list holds.
    pub async fn count(&self, platform: &str) -> Result<u64, StoreError> {
        match self {
            WatchLists::Embedded(e) => Ok(e.count(platform).await),
            WatchLists::Redis(r) => r.count(platform).await,
        }
    }

    /// Per number, whether it is on `platform`'s list.
    pub async fn watching(&self, platform: &str, numbers: &[PhoneNumber]) -> Result<Vec<bool>, StoreError> {
        match self {
            WatchLists::Embedded(e) => Ok(e.watching(platform, numbers).await),
            WatchLists::Redis(r) => r.watching(platform, numbers).await,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Add = 1,
    Remove = 2,
}

/// The embedded watch lists (see the module documentation).
pub struct EmbeddedWatchLists {
    key: WatchKey,
    /// Held across a journal append (the fsync): changes are serialised.
    state: tokio::sync::Mutex<EmbeddedState>,
}

struct EmbeddedState {
    lists: HashMap<[u8; 8], HashSet<Tag>>,
    /// `None`: in memory only (tests of other parts).
    journal: Option<Journal>,
}

impl EmbeddedWatchLists {
    /// Lists kept in memory only (lost at exit).
    pub fn in_memory(key: WatchKey) -> Self {
        Self {
            key,
            state: tokio::sync::Mutex::new(EmbeddedState {
                lists: HashMap::new(),
                journal: None,
            }),
        }
    }

    /// Opens the journal [`WATCH_JOURNAL`] in `dir` and replays it (records
    /// of another key are skipped: see "Key rotation").
    pub fn open(key: WatchKey, dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join(WATCH_JOURNAL);
        let opened = Journal::open(&path).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let (journal, records) = (opened.journal, opened.records);
        let kid = kid_bytes(&key);
        let mut lists: HashMap<[u8; 8], HashSet<Tag>> = HashMap::new();
        let mut skipped = 0_u64;
        for (i, record) in records.iter().enumerate() {
            let bad = || {
                StoreError::Corrupt(format!(
                    "{}: record {i} is not a watch list change",
                    path.display()
                ))
            };
            let (head, tags) = record.split_at_checked(13).ok_or_else(bad)?;
            if tags.len() % 10 != 0 {
                return Err(bad());
            }
            if head[1..5] != kid {
                skipped += 1;
                continue;
            }
            let mut platform = [0u8; 8];
            platform.copy_from_slice(&head[5..13]);
            let list = lists.entry(platform).or_default();
            for chunk in tags.chunks_exact(10) {
                let mut tag = [0u8; 10];
                tag.copy_from_slice(chunk);
                match head[0] {
                    1 => list.insert(tag),
                    2 => list.remove(&tag),
                    _ => return Err(bad()),
                };
            }
        }
        if skipped > 0 {
            tracing::warn!(
                records = skipped,
                kid = key.kid(),
                "watch lists: skipped records of another watch key"
            );
        }
        Ok(Self {
            key,
            state: tokio::sync::Mutex::new(EmbeddedState {
                lists,
                journal: Some(journal),
            }),
        })
    }

    async fn change(&self, platform: &str, numbers: &[PhoneNumber], op: Op) -> Result<Vec<bool>, StoreError> {
        let platform_id = platform_hash(platform);
        let tags: Vec<Tag> = numbers.iter().map(|n| self.key.tag(platform, *n)).collect();
        let mut state = self.state.lock().await;
        let list = state.lists.get(&platform_id);
        // What changes, decided before anything is written (a number twice in
        // one call changes once).
        let mut seen = HashSet::new();
        let changed: Vec<bool> = tags
            .iter()
            .map(|t| {
                let on = list.is_some_and(|l| l.contains(t));
                seen.insert(*t) && (on != (op == Op::Add))
            })
            .collect();
        let changes: Vec<Tag> = tags
            .iter()
            .zip(&changed)
            .filter(|(_, c)| **c)
            .map(|(t, _)| *t)
            .collect();
        if changes.is_empty() {
            return Ok(changed);
        }
        if let Some(journal) = &mut state.journal {
            let mut record = Vec::with_capacity(13 + changes.len() * 10);
            record.push(op as u8);
            record.extend_from_slice(&kid_bytes(&self.key));
            record.extend_from_slice(&platform_id);
            for t in &changes {
                record.extend_from_slice(t);
            }
            journal
                .append(&[record])
                .await
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        }
        let list = state.lists.entry(platform_id).or_default();
        for t in changes {
            match op {
                Op::Add => list.insert(t),
                Op::Remove => list.remove(&t),
            };
        }
        Ok(changed)
    }

    async fn count(&self, platform: &str) -> u64 {
        let state = self.state.lock().await;
        state
            .lists
            .get(&platform_hash(platform))
            .map_or(0, |l| l.len() as u64)
    }

    async fn watching(&self, platform: &str, numbers: &[PhoneNumber]) -> Vec<bool> {
        let state = self.state.lock().await;
        let Some(list) = state.lists.get(&platform_hash(platform)) else {
            return vec![false; numbers.len()];
        };
        numbers
            .iter()
            .map(|n| list.contains(&self.key.tag(platform, *n)))
            .collect()
    }
}

fn kid_bytes(key: &WatchKey) -> [u8; 4] {
    let mut out = [0u8; 4];
    if let Ok(bytes) = hex::decode(key.kid())
        && bytes.len() == 4
    {
        out.copy_from_slice(&bytes);
    }
    out
}

/// The watch lists in the mirror's Redis (see the module documentation).
#[derive(Clone)]
pub struct RedisWatchLists {
    store: RedisStore,
    key: WatchKey,
}

impl RedisWatchLists {
    /// Watch lists beside the mirror in `store`'s Redis.
    pub fn new(store: RedisStore, key: WatchKey) -> Self {
        Self { store, key }
    }

    async fn query<T: ::redis::FromRedisValue>(&self, cmd: &::redis::Cmd) -> Result<T, StoreError> {
        query(self.store.clone(), cmd.clone()).await
    }

    fn list_key(&self, platform: &str) -> String {
        format!(
            "{}:w:{}:{}",
            self.store.key_prefix(),
            self.key.kid(),
            hex::encode(platform_hash(platform))
        )
    }

    fn bucket_key(list: &str, tag: &Tag) -> String {
        format!(
            "{list}:{:04x}",
            u16::from_be_bytes([tag[0], tag[1]]) as usize % BUCKETS
        )
    }

    /// One command per tag, sent concurrently; their integer replies.
    async fn per_tag(&self, list: &str, tags: &[Tag], command: &'static str) -> Result<Vec<i64>, StoreError> {
        let commands: Vec<::redis::Cmd> = tags
            .iter()
            .map(|tag| {
                let mut cmd = ::redis::cmd(command);
                cmd.arg(Self::bucket_key(list, tag)).arg(&tag[2..]);
                if command == "HSETNX" {
                    cmd.arg(1);
                }
                cmd
            })
            .collect();
        let store = self.store.clone();
        futures_util::stream::iter(commands)
            .map(move |cmd| query::<i64>(store.clone(), cmd))
            .buffered(CONCURRENCY)
            .try_collect()
            .await
    }

    async fn change(&self, platform: &str, numbers: &[PhoneNumber], op: Op) -> Result<Vec<bool>, StoreError> {
        let list = self.list_key(platform);
        let tags: Vec<Tag> = numbers.iter().map(|n| self.key.tag(platform, *n)).collect();
        // A number twice in one call: sent once, the repeat answers false.
        let mut seen = HashSet::new();
        let firsts: Vec<bool> = tags.iter().map(|t| seen.insert(*t)).collect();
        let unique: Vec<Tag> = tags
            .iter()
            .zip(&firsts)
            .filter(|(_, f)| **f)
            .map(|(t, _)| *t)
            .collect();
        let command = match op {
            Op::Add => "HSETNX",
            Op::Remove => "HDEL",
        };
        let replies = self.per_tag(&list, &unique, command).await?;
        let moved: i64 = replies.iter().sum();
        if moved != 0 {
            let mut incr = ::redis::cmd("INCRBY");
            incr.arg(format!("{list}:n"))
                .arg(if op == Op::Add { moved } else { -moved });
            self.query::<i64>(&incr).await?;
        }
        let mut replies = replies.into_iter();
        Ok(firsts
            .into_iter()
            .map(|first| first && replies.next().is_some_and(|r| r > 0))
            .collect())
    }

    async fn count(&self, platform: &str) -> Result<u64, StoreError> {
        let mut get = ::redis::cmd("GET");
        get.arg(format!("{}:n", self.list_key(platform)));
        let n: Option<i64> = self.query(&get).await?;
        Ok(n.unwrap_or(0).max(0) as u64)
    }

    async fn watching(&self, platform: &str, numbers: &[PhoneNumber]) -> Result<Vec<bool>, StoreError> {
        let list = self.list_key(platform);
        let tags: Vec<Tag> = numbers.iter().map(|n| self.key.tag(platform, *n)).collect();
        Ok(self
            .per_tag(&list, &tags, "HEXISTS")
            .await?
            .into_iter()
            .map(|r| r > 0)
            .collect())
    }
}

/// Sends `cmd` on `store`'s shared connection, bounded by its timeout.
async fn query<T: ::redis::FromRedisValue>(store: RedisStore, cmd: ::redis::Cmd) -> Result<T, StoreError> {
    let limit = store.options().timeout;
    match tokio::time::timeout(limit, cmd.query_async(&mut store.connection())).await {
        Err(_) => Err(StoreError::Timeout(limit)),
        Ok(Err(e)) => Err(store.error(&e)),
        Ok(Ok(v)) => Ok(v),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn n(text: &str) -> PhoneNumber {
        PhoneNumber::parse(text).unwrap()
    }

    #[test]
    fn tags_depend_on_platform_and_key() {
        let a = WatchKey::new(b"0123456789abcdef");
        let b = WatchKey::new(b"0123456789abcdeX");
        let x = n("+12015550100");
        assert_ne!(a.tag("platform-a", x), a.tag("platform-b", x));
        assert_ne!(a.tag("platform-a", x), b.tag("platform-a", x));
        assert_eq!(a.tag("platform-a", x), a.tag("platform-a", x));
        assert_ne!(a.kid(), b.kid());
        assert_eq!(a.kid().len(), 8);
    }

    #[tokio::test]
    async fn embedded_lists_survive_a_reopen_and_ignore_another_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = WatchKey::new(b"0123456789abcdef");
        let lists = WatchLists::Embedded(Arc::new(
            EmbeddedWatchLists::open(key.clone(), dir.path()).unwrap(),
        ));
        let (x, y) = (n("+12015550100"), n("+12015550101"));
        assert_eq!(lists.add("p", &[x, y, x]).await.unwrap(), vec![true, true, false]);
        assert_eq!(lists.remove("p", &[y, y]).await.unwrap(), vec![true, false]);
        drop(lists);
        let lists = WatchLists::Embedded(Arc::new(EmbeddedWatchLists::open(key, dir.path()).unwrap()));
        assert_eq!(lists.count("p").await.unwrap(), 1);
        assert_eq!(lists.watching("p", &[x, y]).await.unwrap(), vec![true, false]);
        assert_eq!(lists.count("q").await.unwrap(), 0);
        let other = WatchKey::new(b"another-secret-key!");
        let lists = WatchLists::Embedded(Arc::new(EmbeddedWatchLists::open(other, dir.path()).unwrap()));
        assert_eq!(lists.count("p").await.unwrap(), 0);
    }
}
