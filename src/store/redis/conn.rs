//! The connection to Redis: one server (a [`ConnectionManager`]) or a Redis
//! Cluster (a [`ClusterConnection`]), behind one type so the rest of the
//! store is shared; and the cluster slot of a key, to keep each pipeline
//! inside one slot.

use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster::{ClusterClient, ClusterClientBuilder, ClusterConfig};
use ::redis::cluster_async::ClusterConnection;
use ::redis::cluster_read_routing::RandomReplicaStrategy;
use ::redis::cluster_routing::{MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo, SingleNodeRoutingInfo};
use ::redis::{
    Client, Cmd, ErrorKind, IntoConnectionInfo, Pipeline, RedisError, RedisFuture, RedisResult, Value,
};

use super::RedisOptions;

/// The node name of [`Conn::on_masters`]' only entry when `CLUSTER SLOTS`
/// failed.
const CLUSTER_SLOTS_FAILED: &str = "cluster slots";

/// Number of hash slots of a Redis Cluster.
pub(super) const SLOTS: u16 = 16_384;

/// Where the store connects: one server or a cluster.
#[derive(Clone)]
pub(super) enum Target {
    /// One Redis server (possibly with replicas behind a failover proxy).
    Single(Client),
    /// A Redis Cluster, reached through any of its nodes (boxed: much larger
    /// than a single-server client), and with read-from-replicas a second
    /// client that reads from the masters only (metadata, and the re-read of
    /// a replica answer that cannot be proven current).
    Cluster {
        /// Reads go where the options say.
        client: Box<ClusterClient>,
        /// Only with read-from-replicas: reads from masters.
        masters: Option<Box<ClusterClient>>,
        /// One plain client per seed URL: topology probes that do not go
        /// through the cluster connection (see [`Target::seed_masters`]).
        seeds: Arc<[Client]>,
    },
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

impl Conn {
    /// Sends `cmd` to every master (one server: to it), each bounded by
    /// `limit`; one `(address, result)` per master. On a cluster the masters
    /// are read from `CLUSTER SLOTS` first (an error there is the only
    /// entry). A master that fails does not fail the others.
    pub async fn on_masters(&mut self, cmd: &Cmd, limit: Duration) -> Vec<(String, RedisResult<Value>)> {
        let bounded = |r: Result<RedisResult<Value>, tokio::time::error::Elapsed>| {
            r.unwrap_or_else(|_| Err(RedisError::from((ErrorKind::Io, "timed out"))))
        };
        let cluster = match self {
            Conn::Single(c) => {
                let r = tokio::time::timeout(limit, cmd.query_async::<Value>(c)).await;
                return vec![(String::new(), bounded(r))];
            }
            Conn::Cluster(c) => c,
        };
        // Asked of every node, the first answer wins: a random node (the
        // library's default for CLUSTER SLOTS) may be the one that is down.
        let all = RoutingInfo::MultiNode((
            MultipleNodeRoutingInfo::AllNodes,
            Some(ResponsePolicy::OneSucceeded),
        ));
        let mut slots_cmd = ::redis::cmd("CLUSTER");
        slots_cmd.arg("SLOTS");
        let slots = tokio::time::timeout(limit, cluster.route_command(slots_cmd, all)).await;
        let masters = match bounded(slots) {
            Ok(v) => cluster_masters(&v),
            Err(e) => return vec![(CLUSTER_SLOTS_FAILED.to_owned(), Err(e))],
        };
        let asks = masters.into_iter().map(|(host, port)| {
            let mut conn = cluster.clone();
            let cmd = cmd.clone();
            async move {
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port,
                });
                let r = tokio::time::timeout(limit, conn.route_command(cmd, route)).await;
                (format!("{host}:{port}"), bounded(r))
            }
        });
        futures_util::future::join_all(asks).await
    }
}

impl Conn {
    /// PING, bounded by `limit`; on a cluster sent to every master and
    /// answered by the first that answers.
    pub async fn ping_any_master(&mut self, limit: Duration) -> RedisResult<Value> {
        let ping = ::redis::cmd("PING");
        let sent = match self {
            Conn::Single(c) => tokio::time::timeout(limit, ping.query_async::<Value>(c)).await,
            Conn::Cluster(c) => {
                let route = RoutingInfo::MultiNode((
                    MultipleNodeRoutingInfo::AllMasters,
                    Some(ResponsePolicy::OneSucceeded),
                ));
                tokio::time::timeout(limit, c.route_command(ping, route)).await
            }
        };
        sent.unwrap_or_else(|_| Err(RedisError::from((ErrorKind::Io, "timed out"))))
    }

    /// Sends `cmd` to the master `node` (an address from
    /// [`Conn::on_masters`]; ignored on one server), bounded by `limit`.
    pub async fn on_node(&mut self, node: &str, cmd: &Cmd, limit: Duration) -> RedisResult<Value> {
        let sent = match self {
            Conn::Single(c) => tokio::time::timeout(limit, cmd.query_async::<Value>(c)).await,
            Conn::Cluster(c) => {
                let (host, port) = node
                    .rsplit_once(':')
                    .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)))
                    .ok_or_else(|| RedisError::from((ErrorKind::Client, "not a node address")))?;
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port });
                tokio::time::timeout(limit, c.route_command(cmd.clone(), route)).await
            }
        };
        sent.unwrap_or_else(|_| Err(RedisError::from((ErrorKind::Io, "timed out"))))
    }
}

/// The distinct master addresses of a `CLUSTER SLOTS` reply, in order.
fn cluster_masters(reply: &Value) -> Vec<(String, u16)> {
    let mut masters: Vec<(String, u16)> = Vec::new();
    let Value::Array(ranges) = reply else {
        return masters;
    };
    for range in ranges {
        let Value::Array(parts) = range else { continue };
        let Some(Value::Array(node)) = parts.get(2) else {
            continue;
        };
        let host = match node.first() {
            Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            Some(Value::SimpleString(s)) => s.clone(),
            _ => continue,
        };
        let Some(Value::Int(port)) = node.get(1) else {
            continue;
        };
        let Ok(port) = u16::try_from(*port) else { continue };
        if !masters.iter().any(|(h, p)| *h == host && *p == port) {
            masters.push((host, port));
        }
    }
    masters
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
        let builder = || {
            ClusterClientBuilder::new(urls.iter().map(String::as_str))
                .connection_timeout(connect_attempt(opts))
                // As for one server: a last resort; every call has its own bound.
                .response_timeout(opts.bulk_timeout)
                .max_retry_wait(1_000)
        };
        let seeds: Arc<[Client]> = urls
            .iter()
            .map(|u| Client::open(u.as_str()))
            .collect::<RedisResult<Vec<_>>>()?
            .into();
        if opts.read_from_replicas {
            Ok(Target::Cluster {
                client: Box::new(builder().read_routing_strategy(RandomReplicaStrategy).build()?),
                masters: Some(Box::new(builder().build()?)),
                seeds,
            })
        } else {
            Ok(Target::Cluster {
                client: Box::new(builder().build()?),
                masters: None,
                seeds,
            })
        }
    }

    /// On a cluster: the masters (`host:port`, sorted) named by `CLUSTER
    /// SLOTS`, asked of the seed nodes one after the other over a plain
    /// connection of its own (each attempt bounded by `limit`), the first
    /// answer wins; `None` on one server or if no seed answered. It does not
    /// go through the cluster connection, which holds every request while
    /// the client library recovers from a dead node (and, until a MOVED
    /// reply, keeps a failed-over master's slots on the dead address).
    pub async fn seed_masters(&self, limit: Duration) -> Option<Vec<String>> {
        let Target::Cluster { seeds, .. } = self else {
            return None;
        };
        for seed in seeds.iter() {
            let ask = async {
                let mut conn = seed.get_multiplexed_async_connection().await?;
                ::redis::cmd("CLUSTER")
                    .arg("SLOTS")
                    .query_async::<Value>(&mut conn)
                    .await
            };
            if let Ok(Ok(reply)) = tokio::time::timeout(limit, ask).await {
                let mut masters: Vec<String> = cluster_masters(&reply)
                    .into_iter()
                    .map(|(host, port)| format!("{host}:{port}"))
                    .collect();
                if masters.is_empty() {
                    continue;
                }
                masters.sort();
                return Some(masters);
            }
        }
        None
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
            Target::Cluster { client, .. } => client
                .get_async_connection_with_config(cluster_config(opts))
                .await
                .map(Conn::Cluster),
        }
    }

    /// A connection that reads from masters only, connecting on first use;
    /// `None` if reads already go to masters (use the read connection).
    pub fn connect_lazy_masters(&self, opts: &RedisOptions) -> Option<Conn> {
        match self {
            Target::Cluster {
                masters: Some(client),
                ..
            } => Some(Conn::Cluster(
                client.get_pending_async_connection_with_config(cluster_config(opts)),
            )),
            _ => None,
        }
    }

    /// A connection that connects on first use.
    pub fn connect_lazy(&self, opts: &RedisOptions) -> RedisResult<Conn> {
        match self {
            Target::Single(client) => {
                ConnectionManager::new_lazy_with_config(client.clone(), manager_config(opts))
                    .map(Conn::Single)
            }
            Target::Cluster { client, .. } => Ok(Conn::Cluster(
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
    fn masters_of_cluster_slots() {
        let node = |host: &str, port: i64| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let range = |from: i64, to: i64, master: Value, replica: Value| {
            Value::Array(vec![Value::Int(from), Value::Int(to), master, replica])
        };
        let reply = Value::Array(vec![
            range(0, 100, node("127.0.0.1", 7000), node("127.0.0.1", 7003)),
            range(101, 200, node("127.0.0.1", 7001), node("127.0.0.1", 7004)),
            range(201, 300, node("127.0.0.1", 7000), node("127.0.0.1", 7003)),
        ]);
        assert_eq!(
            cluster_masters(&reply),
            vec![("127.0.0.1".to_owned(), 7000), ("127.0.0.1".to_owned(), 7001)]
        );
        assert!(cluster_masters(&Value::Nil).is_empty());
    }

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
