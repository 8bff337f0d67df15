//! The audit trail: one record per answer, written to a Redis Stream
//! (`{prefix}:audit`, `XADD ... MAXLEN ~ N`) by a background task.
//!
//! Handlers hand records to [`Auditor::record`], which only puts them on a
//! bounded channel: a login never waits for the write. The task takes what
//! is queued, up to [`WRITE_BATCH`] records, and writes them in one
//! pipeline. When the channel is full or Redis is down, records are dropped
//! and counted ([`AuditStats::dropped`]), with a warning at most every
//! [`WARN_EVERY`]; with `mandatory`, [`Auditor::record`] refuses instead and
//! the call fails with UNAVAILABLE. A record holds a keyed hash of the
//! number (HMAC-SHA256 with the server's secret), never the number.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

/// Records queued before new ones are dropped (or refused).
pub const QUEUE: usize = 8192;
/// Most records written in one pipeline.
pub const WRITE_BATCH: usize = 512;
/// Least time between two warnings about dropped records.
pub const WARN_EVERY: Duration = Duration::from_secs(10);
/// How often a down sink is probed when no record comes.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// Bound of one write to Redis.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Where and how the audit trail is written.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct AuditConfig {
    /// Redis URL of the stream.
    pub redis_url: String,
    /// The stream key, `{prefix}:audit`.
    pub stream: String,
    /// Approximate most entries kept (`MAXLEN ~`).
    pub max_len: u64,
    /// Fail calls with UNAVAILABLE when a record cannot be queued or the
    /// sink is down, instead of dropping the record.
    pub mandatory: bool,
    /// The file holding the HMAC secret (never logged or dumped).
    pub secret_file: std::path::PathBuf,
}

/// One answer, as audited.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// When it was answered (Unix milliseconds).
    pub time_ms: i64,
    /// The request id (`x-request-id`, or generated).
    pub request_id: String,
    /// The calling platform.
    pub platform: String,
    /// Lowercase hex HMAC-SHA256 of the E.164 text, keyed with the secret.
    pub number_hmac: String,
    /// The `since` date asked about.
    pub since: String,
    /// The `ReassignmentStatus` name answered.
    pub status: String,
    /// The mirror's `as_of` (empty when it held no data).
    pub data_as_of: String,
}

/// Why a record was not accepted (only with `mandatory`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuditError {
    /// The queue is full or the sink is down.
    #[error("the audit trail is unavailable")]
    Unavailable,
}

/// Counters shared with whoever watches the trail.
#[derive(Debug, Default)]
pub struct AuditStats {
    dropped: AtomicU64,
    written: AtomicU64,
    sink_down: AtomicBool,
}

impl AuditStats {
    /// Records dropped so far (queue full or sink down).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Records written so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Whether the last write failed.
    pub fn sink_down(&self) -> bool {
        self.sink_down.load(Ordering::Relaxed)
    }
}

/// The handlers' side of the audit trail.
#[derive(Debug)]
pub struct Auditor {
    tx: mpsc::Sender<AuditRecord>,
    key: HmacKey,
    mandatory: bool,
    stats: Arc<AuditStats>,
    warn: Arc<Warner>,
}

impl Auditor {
    /// Reads the secret, and starts the writer task (it connects lazily and
    /// ends when the auditor is dropped). Must run inside a Tokio runtime.
    pub fn start(config: &AuditConfig, stats: Arc<AuditStats>) -> anyhow::Result<Self> {
        let secret = std::fs::read(&config.secret_file).map_err(|e| {
            anyhow::anyhow!(
                "cannot read the audit secret {}: {e}",
                config.secret_file.display()
            )
        })?;
        let secret = trim_secret(&secret);
        anyhow::ensure!(secret.len() >= 16, "the audit secret must hold at least 16 bytes");
        let client = redis::Client::open(config.redis_url.as_str())?;
        let manager = ConnectionManager::new_lazy_with_config(
            client,
            ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_millis(500)))
                .set_response_timeout(Some(WRITE_TIMEOUT))
                .set_max_delay(Duration::from_secs(1)),
        )?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let warn = Arc::new(Warner::default());
        tokio::spawn(write_loop(
            rx,
            manager,
            config.stream.clone(),
            config.max_len,
            stats.clone(),
            warn.clone(),
        ));
        Ok(Self {
            tx,
            key: HmacKey::new(secret),
            mandatory: config.mandatory,
            stats,
            warn,
        })
    }

    /// Lowercase hex HMAC-SHA256 of `e164` with the audit secret.
    pub fn number_hmac(&self, e164: &str) -> String {
        hex::encode(self.key.mac(e164.as_bytes()))
    }

    /// The counters.
    pub fn stats(&self) -> &AuditStats {
        &self.stats
    }

    /// Queues `record` without waiting. Dropped (and counted) if the queue
    /// is full; with `mandatory`, refused instead, and also while the sink
    /// is down.
    pub fn record(&self, record: AuditRecord) -> Result<(), AuditError> {
        if self.mandatory && self.stats.sink_down() {
            return Err(AuditError::Unavailable);
        }
        match self.tx.try_send(record) {
            Ok(()) => Ok(()),
            Err(_) if self.mandatory => Err(AuditError::Unavailable),
            Err(_) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                self.warn.maybe_warn(&self.stats);
                Ok(())
            }
        }
    }
}

/// Warns about drops at most every [`WARN_EVERY`].
#[derive(Debug, Default)]
struct Warner {
    last: std::sync::Mutex<Option<Instant>>,
}

impl Warner {
    fn maybe_warn(&self, stats: &AuditStats) {
        let Ok(mut last) = self.last.try_lock() else {
            return; // someone else is deciding right now
        };
        if last.is_some_and(|t| t.elapsed() < WARN_EVERY) {
            return;
        }
        *last = Some(Instant::now());
        tracing::warn!(
            dropped_total = stats.dropped(),
            sink_down = stats.sink_down(),
            "audit records dropped (queue full or sink down); answers continue"
        );
    }
}

async fn write_loop(
    mut rx: mpsc::Receiver<AuditRecord>,
    mut conn: ConnectionManager,
    stream: String,
    max_len: u64,
    stats: Arc<AuditStats>,
    warn: Arc<Warner>,
) {
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    loop {
        // While the sink is down (and, with `mandatory`, nothing is queued),
        // a PING every second notices it is back.
        let received = match tokio::time::timeout(PROBE_EVERY, rx.recv_many(&mut batch, WRITE_BATCH)).await {
            Ok(0) => return, // the auditor is gone
            Ok(n) => n,
            Err(_) => {
                if stats.sink_down() {
                    let ping = redis::cmd("PING");
                    if let Ok(Ok(())) =
                        tokio::time::timeout(WRITE_TIMEOUT, ping.query_async::<()>(&mut conn)).await
                    {
                        stats.sink_down.store(false, Ordering::Relaxed);
                        tracing::info!("audit sink back");
                    }
                }
                continue;
            }
        };
        debug_assert_eq!(received, batch.len());
        let mut pipe = redis::pipe();
        for r in &batch {
            pipe.cmd("XADD")
                .arg(&stream)
                .arg("MAXLEN")
                .arg("~")
                .arg(max_len)
                .arg("*")
                .arg("time_ms")
                .arg(r.time_ms)
                .arg("request_id")
                .arg(&r.request_id)
                .arg("platform")
                .arg(&r.platform)
                .arg("number_hmac")
                .arg(&r.number_hmac)
                .arg("since")
                .arg(&r.since)
                .arg("status")
                .arg(&r.status)
                .arg("data_as_of")
                .arg(&r.data_as_of)
                .ignore();
        }
        let result = tokio::time::timeout(WRITE_TIMEOUT, pipe.query_async::<()>(&mut conn)).await;
        let n = batch.len() as u64;
        match result {
            Ok(Ok(())) => {
                stats.written.fetch_add(n, Ordering::Relaxed);
                if stats.sink_down.swap(false, Ordering::Relaxed) {
                    tracing::info!("audit sink back");
                }
            }
            Ok(Err(e)) => {
                stats.sink_down.store(true, Ordering::Relaxed);
                stats.dropped.fetch_add(n, Ordering::Relaxed);
                tracing::debug!(error = %e, "audit write failed");
                warn.maybe_warn(&stats);
            }
            Err(_) => {
                stats.sink_down.store(true, Ordering::Relaxed);
                stats.dropped.fetch_add(n, Ordering::Relaxed);
                warn.maybe_warn(&stats);
            }
        }
        batch.clear();
    }
}

/// A secret file's bytes without a trailing newline.
fn trim_secret(bytes: &[u8]) -> &[u8] {
    let mut end = bytes.len();
    while end > 0 && matches!(bytes[end - 1], b'\n' | b'\r') {
        end -= 1;
    }
    &bytes[..end]
}

/// HMAC-SHA256 (RFC 2104) with the pads precomputed.
#[derive(Clone)]
struct HmacKey {
    inner: Sha256,
    outer: Sha256,
}

impl std::fmt::Debug for HmacKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HmacKey(<redacted>)")
    }
}

impl HmacKey {
    fn new(secret: &[u8]) -> Self {
        let mut block = [0u8; 64];
        if secret.len() > 64 {
            block[..32].copy_from_slice(&Sha256::digest(secret));
        } else {
            block[..secret.len()].copy_from_slice(secret);
        }
        let pad = |byte: u8| {
            let mut h = Sha256::new();
            h.update(block.map(|b| b ^ byte));
            h
        };
        Self {
            inner: pad(0x36),
            outer: pad(0x5c),
        }
    }

    fn mac(&self, message: &[u8]) -> [u8; 32] {
        let mut inner = self.inner.clone();
        inner.update(message);
        let mut outer = self.outer.clone();
        outer.update(inner.finalize());
        outer.finalize().into()
    }
}

/// `reassigned audit export`: the records of `platform` between `from_ms`
/// and `to_ms` (inclusive, Unix milliseconds), oldest first.
pub async fn export(
    redis_url: &str,
    stream: &str,
    platform: &str,
    from_ms: i64,
    to_ms: i64,
    mut out: impl FnMut(AuditRecord) -> anyhow::Result<()>,
) -> anyhow::Result<u64> {
    let client = redis::Client::open(redis_url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut start = format!("{from_ms}-0");
    let end = format!("{to_ms}-18446744073709551615");
    let mut count = 0;
    loop {
        let page: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
            .arg(stream)
            .arg(&start)
            .arg(&end)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await?;
        let Some((last_id, _)) = page.last() else {
            return Ok(count);
        };
        start = format!("({last_id}");
        let full = page.len() == 1000;
        for (_, fields) in page {
            let get = |name: &str| {
                fields
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            };
            if get("platform") != platform {
                continue;
            }
            out(AuditRecord {
                time_ms: get("time_ms").parse().unwrap_or_default(),
                request_id: get("request_id"),
                platform: get("platform"),
                number_hmac: get("number_hmac"),
                since: get("since"),
                status: get("status"),
                data_as_of: get("data_as_of"),
            })?;
            count += 1;
        }
        if !full {
            return Ok(count);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        let key = HmacKey::new(b"Jefe");
        assert_eq!(
            hex::encode(key.mac(b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn secrets_lose_their_newline() {
        assert_eq!(trim_secret(b"abc\r\n"), b"abc");
    }
}
