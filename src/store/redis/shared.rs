//! The store's Redis connection lent to other rooms that keep their own
//! keys beside the mirror's (the federation's event log): the same target,
//! options, key prefix and secret-free errors, without the mirror's logic.

use std::time::Duration;

use ::redis::aio::ConnectionLike;
use ::redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use ::redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult, Value};

use super::conn::{Conn, key_slot};
use super::{RedisOptions, RedisStore};
use crate::store::StoreError;

/// A connection to the store's Redis (one server or a cluster), usable
/// with any redis-rs command, pipeline or script. Cheap to clone: clones
/// share the socket(s).
#[derive(Clone)]
pub struct RedisConnection(Conn);

impl RedisConnection {
    /// True on a Redis Cluster (a pipeline or script must then stay inside
    /// one slot).
    pub fn is_cluster(&self) -> bool {
        self.0.is_cluster()
    }

    /// Sends `cmd` to the master holding `key`'s slot (on one server: to
    /// it), bounded by `limit`: for commands without a key that must reach
    /// that very node (e.g. `WAITAOF` after a script on `key`).
    pub async fn on_master_of(&mut self, key: &str, cmd: &Cmd, limit: Duration) -> RedisResult<Value> {
        let sent = match &mut self.0 {
            Conn::Single(c) => tokio::time::timeout(limit, cmd.query_async::<Value>(c)).await,
            Conn::Cluster(c) => {
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::new(
                    key_slot(key.as_bytes()),
                    SlotAddr::Master,
                )));
                tokio::time::timeout(limit, c.route_command(cmd.clone(), route)).await
            }
        };
        sent.unwrap_or_else(|_| Err(RedisError::from((ErrorKind::Io, "timed out"))))
    }

    /// Sends `cmd` to every master (one server: to it), each bounded by
    /// `limit`: one `(address, result)` per master.
    pub async fn on_masters(&mut self, cmd: &Cmd, limit: Duration) -> Vec<(String, RedisResult<Value>)> {
        self.0.on_masters(cmd, limit).await
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        self.0.req_packed_command(cmd)
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        self.0.req_packed_commands(pipeline, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.0.get_db()
    }
}

impl RedisStore {
    /// The store's shared connection (the one of lookups): for short
    /// commands only, never a blocking one.
    pub fn connection(&self) -> RedisConnection {
        RedisConnection(self.inner.conn())
    }

    /// Counts the replacements of the shared connection (after a failover,
    /// or when Redis stopped answering on it): a read still waiting when
    /// the count moves may be stuck on a dead node and should be sent
    /// again on a new connection ([`RedisStore::connection`] then gives
    /// the new one; a [`RedisStore::dedicated_connection`] made before is
    /// stale too).
    pub fn replacements(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.replaced.subscribe()
    }

    /// A connection of its own (connects on first use): for blocking
    /// commands (`XREAD BLOCK`), which would hold every other request of a
    /// shared connection behind them. Its response timeout is the store's
    /// plus `block`, the longest a command of it may block: a blocking read
    /// that waits for nothing is not a timeout.
    pub fn dedicated_connection(&self, block: Duration) -> Result<RedisConnection, StoreError> {
        let opts = RedisOptions {
            timeout: self.inner.opts.timeout + block,
            ..self.inner.opts.clone()
        };
        self.inner
            .target
            .connect_lazy(&opts)
            .map(RedisConnection)
            .map_err(|e| self.error(&e))
    }

    /// The prefix of every key of this store.
    pub fn key_prefix(&self) -> &str {
        &self.inner.opts.key_prefix
    }

    /// The store's options (timeouts).
    pub fn options(&self) -> &RedisOptions {
        &self.inner.opts
    }

    /// `e` as a [`StoreError`], without the URL's password and without
    /// unbounded detail.
    pub fn error(&self, e: &RedisError) -> StoreError {
        self.inner.unavailable(e)
    }

    /// `call` (a command, pipeline or script on one of the store's
    /// connections) bounded by `limit`, as the store bounds its own calls:
    /// running out of time is [`StoreError::Timeout`], a Redis error is
    /// [`RedisStore::error`]'s, and both tell the store, which then checks
    /// the nodes sooner and, if the connection broke, confirms its cached
    /// metadata again before it answers lookups from it (Redis may have come
    /// back without the data).
    pub async fn within<T>(
        &self,
        limit: Duration,
        call: impl std::future::Future<Output = RedisResult<T>>,
    ) -> Result<T, StoreError> {
        self.inner.bounded_call(limit, call).await
    }
}
