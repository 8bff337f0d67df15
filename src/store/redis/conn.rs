//! The connection to Redis: one server (a [`ConnectionManager`]) or a Redis
//! Cluster (a [`ClusterConnection`]), behind one type so the rest of the
//! store is shared; and the cluster slot of a key, to keep each pipeline
//! inside one slot.

use std::time::Duration;

use ::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster::{ClusterClient, ClusterClientBuilder, ClusterConfig};
use ::redis::cluster_async::ClusterConnection;
use ::redis::cluster_read_routing::RandomReplicaStrategy;
use ::redis::{Client, Cmd, IntoConnectionInfo, Pipeline, RedisFuture, RedisResult, Value};

use super::RedisOptions;

/// Number of hash slots of a Redis Cluster.
pub(super) const SLOTS: u16 = 16_384;

/// Where the store connects: one server or a cluster.
#[derive(Clone)]
pub(super) enum Target {
    /// One Redis server (possibly with replicas behind a failover proxy).
    Single(Client),
    /// A Redis Cluster, reached through any of its nodes (boxed: much larger
    /// than a single-server client).
    Cluster(Box<ClusterClient>),
}

/// A connection of either kind. Cheap to clone: clones share the sockets.
#[derive(Clone)]
pub(super) enum Conn {
    /// To one server; reconnects by itself.
    Single(ConnectionManager),
    /// To every node of a cluster; follows MOVED/ASK and topology changes.
    Cluster(ClusterConnection),
}

impl Conn {
    /// True on a cluster: pipelines must then stay inside one slot.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

fn manager_config(opts: &RedisOptions) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        // Each connection attempt; the outer bounds are ours.
        .set_connection_timeout(Some(connect_attempt(opts)))
        // A last resort only: every call has its own (shorter) timeout, and
        // bulk pipelines must not be cut by a read-sized bound.
        .set_response_timeout(Some(opts.bulk_timeout))
        .set_max_delay(Duration::from_secs(1))
}

/// Per-connection settings of a cluster connection (they replace the
/// client's timeouts, so both are set again here).
fn cluster_config(opts: &RedisOptions) -> ClusterConfig {
    ClusterConfig::new()
        .set_connection_timeout(connect_attempt(opts))
        .set_response_timeout(opts.bulk_timeout)
}

fn connect_attempt(opts: &RedisOptions) -> Duration {
    opts.timeout.max(Duration::from_secs(1))
}

impl Target {
    /// A single-server target for `url`.
    pub fn single(url: &str) -> RedisResult<Self> {
        Client::open(url).map(Target::Single)
    }

    /// A cluster target reached through `urls` (any subset of its nodes).
    pub fn cluster(urls: &[String], opts: &RedisOptions) -> RedisResult<Self> {
        let mut builder = ClusterClientBuilder::new(urls.iter().map(String::as_str))
            .connection_timeout(connect_attempt(opts))
            // As for one server: a last resort; every call has its own bound.
            .response_timeout(opts.bulk_timeout)
            .max_retry_wait(1_000);
        if opts.read_from_replicas {
            builder = builder.read_routing_strategy(RandomReplicaStrategy);
        }
        builder.build().map(|c| Target::Cluster(Box::new(c)))
    }

    /// The passwords of the target's URLs (removed from error messages).
    pub fn secrets(urls: &[&str]) -> Vec<String> {
        urls.iter()
            .filter_map(|u| u.into_connection_info().ok())
            .filter_map(|info| info.redis_settings().password().map(str::to_owned))
            .filter(|p| !p.is_empty())
            .collect()
    }

    /// Connects now (the caller bounds the time).
    pub async fn connect(&self, opts: &RedisOptions) -> RedisResult<Conn> {
        match self {
            Target::Single(client) => {
                ConnectionManager::new_with_config(client.clone(), manager_config(opts))
                    .await
                    .map(Conn::Single)
            }
            Target::Cluster(client) => client
                .get_async_connection_with_config(cluster_config(opts))
                .await
                .map(Conn::Cluster),
        }
    }

    /// A connection that connects on first use.
    pub fn connect_lazy(&self, opts: &RedisOptions) -> RedisResult<Conn> {
        match self {
            Target::Single(client) => {
                ConnectionManager::new_lazy_with_config(client.clone(), manager_config(opts))
                    .map(Conn::Single)
            }
            Target::Cluster(client) => Ok(Conn::Cluster(
                client.get_pending_async_connection_with_config(cluster_config(opts)),
            )),
        }
    }
}

/// The cluster hash slot of `key` (CRC16/XMODEM of the key, or of its hash
/// tag `{...}` if it has a non-empty one, modulo 16384), as Redis computes it.
pub(super) fn key_slot(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    crc16_xmodem(hashed) % SLOTS
}

fn crc16_xmodem(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from CLUSTER KEYSLOT.
        assert_eq!(key_slot(b"foo"), 12_182);
        assert_eq!(key_slot(b"bar"), 5_061);
        assert_eq!(key_slot(b"123456789"), 0x31C3 % SLOTS);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{}{bar}"), crc16_xmodem(b"foo{}{bar}") % SLOTS);
        assert_eq!(key_slot(b"{}foo"), crc16_xmodem(b"{}foo") % SLOTS);
    }
}
