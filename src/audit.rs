//! The audit trail: one record per answer, written to a Redis Stream
//! (`{prefix}:audit`, `XADD ... MAXLEN ~ N`) by a background task.
//!
//! Handlers hand records to [`Auditor::record`], which only puts them on a
//! bounded channel: a login never waits for the write. The task takes what
//! is queued, up to [`WRITE_BATCH`] records, and writes them in one
//! script call ([`BATCH_SCRIPT`]). When the channel is full or Redis is
//! down, records are dropped and counted ([`AuditStats::dropped`]), with a
//! warning at most every [`WARN_EVERY`]; with `mandatory`,
//! [`Auditor::record`] refuses instead and the call fails with UNAVAILABLE.
//! A record holds a keyed hash of the number (HMAC-SHA256 with the server's
//! secret), never the number.
//!
//! # Exact counters
//! The counters are evidence, so a batch whose reply never came (a timeout,
//! a broken connection: Redis may still run it, e.g. after a SIGSTOP) is
//! neither written nor dropped until it is settled. Each batch carries a
//! marker key, unique to this writer and batch: the batch script refuses to
//! run if its marker exists, and sets it to the number of entries it added.
//! To settle a batch in doubt, [`FENCE_SCRIPT`] reads the marker; if it is
//! absent it sets it to `fenced`, so that the batch can never run later,
//! and counts the batch dropped. Both scripts are atomic in Redis, so
//! whichever runs first decides, and `written` is exactly what the stream
//! received. New batches are not sent while one is in doubt (they are
//! dropped, and counted). Markers expire after [`MARKER_TTL_SECS`]; a batch
//! still in doubt when its marker expired would be counted dropped: that
//! needs the audit Redis unreachable for a day after running it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::domain::hmac::{HmacKey, read_secret};

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
/// Lifetime of a batch marker (see "Exact counters").
pub const MARKER_TTL_SECS: u64 = 86_400;
/// Fields per record in [`BATCH_SCRIPT`]'s arguments (8 name/value pairs).
const FIELDS_PER_RECORD: usize = 16;

/// Writes one batch. KEYS: the stream, the batch's marker, then markers of
/// settled batches to delete. ARGV: marker TTL (s), MAXLEN, fields per
/// record, then the records' fields. Returns -1 (and writes nothing) if the
/// marker exists (the batch was fenced), else the entries added, which it
/// also stores in the marker.
pub const BATCH_SCRIPT: &str = r#"
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
redis.call('SET', KEYS[2], '0', 'EX', ARGV[1])
for i = 3, #KEYS do redis.call('UNLINK', KEYS[i]) end
local per = tonumber(ARGV[3])
local written = 0
for i = 4, #ARGV - per + 1, per do
  local r = redis.pcall('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, i, i + per - 1))
  if not (type(r) == 'table' and r.err) then written = written + 1 end
end
redis.call('SET', KEYS[2], tostring(written), 'EX', ARGV[1])
return written
"#;

/// Settles a batch in doubt. KEYS: its marker. ARGV: marker TTL (s).
/// Returns the entries the batch added (and deletes the marker), or -1 if
/// it never ran (the marker is then `fenced`: it never will).
pub const FENCE_SCRIPT: &str = r#"
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], 'fenced', 'EX', ARGV[1])
  return -1
end
if v == 'fenced' then return -1 end
redis.call('UNLINK', KEYS[1])
return tonumber(v)
"#;

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
    /// Why, for records that are not answers (an operator's retraction,
    /// `status` `RETRACTED`: its reason); empty for answers.
    #[serde(default)]
    pub reason: String,
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
    in_doubt: AtomicU64,
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

    /// Records sent in batches whose outcome is not settled yet (see
    /// "Exact counters"): neither written nor dropped so far.
    pub fn in_doubt(&self) -> u64 {
        self.in_doubt.load(Ordering::Relaxed)
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
    key: NumberKey,
    mandatory: bool,
    stats: Arc<AuditStats>,
    warn: Arc<Warner>,
}

impl Auditor {
    /// Reads the secret, and starts the writer task (it connects lazily and
    /// ends when the auditor is dropped). Must run inside a Tokio runtime.
    pub fn start(config: &AuditConfig, stats: Arc<AuditStats>) -> anyhow::Result<Self> {
        let key = NumberKey::from_secret_file(&config.secret_file)?;
        let client = redis::Client::open(config.redis_url.as_str())?;
        let manager = ConnectionManager::new_lazy_with_config(
            client,
            ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_millis(500)))
                .set_response_timeout(Some(WRITE_TIMEOUT))
                .set_max_delay(Duration::from_secs(1)),
        )?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let warn = Arc::new(Warner {
            mandatory: config.mandatory,
            ..Warner::default()
        });
        let writer = Writer {
            conn: manager,
            stream: config.stream.clone(),
            max_len: config.max_len,
            marker_prefix: format!("{}:batch:{:016x}", config.stream, rand::random::<u64>()),
            next_batch: 0,
            batch_script: redis::Script::new(BATCH_SCRIPT),
            fence_script: redis::Script::new(FENCE_SCRIPT),
            in_doubt: Vec::new(),
            confirmed: Vec::new(),
            stats: stats.clone(),
            warn: warn.clone(),
        };
        tokio::spawn(writer.run(rx));
        Ok(Self {
            tx,
            key,
            mandatory: config.mandatory,
            stats,
            warn,
        })
    }

    /// Lowercase hex HMAC-SHA256 of `e164` with the audit secret.
    pub fn number_hmac(&self, e164: &str) -> String {
        self.key.hmac_hex(e164)
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
    /// Calls are refused while the sink is down (the warning says so).
    mandatory: bool,
}

/// The drop warning: what happens to calls depends on `mandatory`.
fn drop_warning(mandatory: bool) -> &'static str {
    if mandatory {
        "audit records lost (queued or in flight when the sink failed); calls are refused with UNAVAILABLE while the audit sink is down"
    } else {
        "audit records dropped (queue full or sink down); answers continue"
    }
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
            in_doubt = stats.in_doubt(),
            sink_down = stats.sink_down(),
            "{}",
            drop_warning(self.mandatory)
        );
    }
}

/// The background writer (see "Exact counters" in the module doc).
struct Writer {
    conn: ConnectionManager,
    stream: String,
    max_len: u64,
    /// `{stream}:batch:{random writer id}`; a batch's marker adds `:{n}`.
    marker_prefix: String,
    next_batch: u64,
    batch_script: redis::Script,
    fence_script: redis::Script,
    /// Batches sent without a reply: (marker, records).
    in_doubt: Vec<(String, u64)>,
    /// Markers of batches whose reply came: deleted with the next batch.
    confirmed: Vec<String>,
    stats: Arc<AuditStats>,
    warn: Arc<Warner>,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<AuditRecord>) {
        let mut batch = Vec::with_capacity(WRITE_BATCH);
        loop {
            // While the sink is down (and, with `mandatory`, nothing is
            // queued), settling the batches in doubt (or a PING) every
            // second notices it is back.
            match tokio::time::timeout(PROBE_EVERY, rx.recv_many(&mut batch, WRITE_BATCH)).await {
                Ok(0) => return, // the auditor is gone
                Ok(_) => {}
                Err(_) => {
                    self.idle().await;
                    continue;
                }
            }
            self.settle().await;
            if self.in_doubt.is_empty() {
                self.write(&batch).await;
            } else {
                // Still unsettled: the sink is down; sending more would only
                // put more in doubt.
                self.drop_records(batch.len() as u64);
            }
            batch.clear();
        }
    }

    fn drop_records(&self, n: u64) {
        self.stats.dropped.fetch_add(n, Ordering::Relaxed);
        self.warn.maybe_warn(&self.stats);
    }

    fn mark_up(&self) {
        if self.in_doubt.is_empty() && self.stats.sink_down.swap(false, Ordering::Relaxed) {
            tracing::info!("audit sink back");
        }
    }

    /// Nothing queued for a while: settle what is in doubt, or probe a
    /// down sink, or delete the markers of settled batches.
    async fn idle(&mut self) {
        if !self.in_doubt.is_empty() {
            self.settle().await;
        } else if self.stats.sink_down() {
            let ping = redis::cmd("PING");
            if let Ok(Ok(())) =
                tokio::time::timeout(WRITE_TIMEOUT, ping.query_async::<()>(&mut self.conn)).await
            {
                self.mark_up();
            }
        } else if !self.confirmed.is_empty() {
            let mut unlink = redis::cmd("UNLINK");
            unlink.arg(&self.confirmed);
            if let Ok(Ok(())) =
                tokio::time::timeout(WRITE_TIMEOUT, unlink.query_async::<()>(&mut self.conn)).await
            {
                self.confirmed.clear();
            }
        }
    }

    /// Settles the batches in doubt, oldest first, until one cannot be.
    async fn settle(&mut self) {
        while let Some((marker, n)) = self.in_doubt.first().cloned() {
            let mut fence = self.fence_script.key(&marker);
            fence.arg(MARKER_TTL_SECS);
            let settled =
                tokio::time::timeout(WRITE_TIMEOUT, fence.invoke_async::<i64>(&mut self.conn)).await;
            let Ok(Ok(added)) = settled else {
                return; // still down
            };
            self.in_doubt.remove(0);
            self.stats.in_doubt.fetch_sub(n, Ordering::Relaxed);
            let added = u64::try_from(added).unwrap_or(0).min(n);
            self.stats.written.fetch_add(added, Ordering::Relaxed);
            if added < n {
                self.drop_records(n - added);
            }
            tracing::info!(records = n, written = added, "audit batch in doubt settled");
        }
        self.mark_up();
    }

    async fn write(&mut self, batch: &[AuditRecord]) {
        let n = batch.len() as u64;
        let marker = format!("{}:{}", self.marker_prefix, self.next_batch);
        self.next_batch += 1;
        let mut call = self.batch_script.key(&self.stream);
        call.key(&marker);
        for old in &self.confirmed {
            call.key(old);
        }
        call.arg(MARKER_TTL_SECS).arg(self.max_len).arg(FIELDS_PER_RECORD);
        for r in batch {
            call.arg("time_ms")
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
                .arg("reason")
                .arg(&r.reason);
        }
        let result = tokio::time::timeout(WRITE_TIMEOUT, call.invoke_async::<i64>(&mut self.conn)).await;
        match result {
            Ok(Ok(added)) if added >= 0 => {
                // The script deleted the markers it was given; this one
                // goes with the next batch (or when idle).
                self.confirmed.clear();
                self.confirmed.push(marker);
                let added = u64::try_from(added).unwrap_or(0).min(n);
                self.stats.written.fetch_add(added, Ordering::Relaxed);
                if added < n {
                    self.drop_records(n - added);
                }
                self.mark_up();
            }
            Ok(Ok(_fenced)) => {
                // Cannot happen for a fresh marker; never count it written.
                self.drop_records(n);
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "audit write failed; settling it later");
                self.doubt(marker, n);
            }
            Err(_) => {
                tracing::debug!(timeout = ?WRITE_TIMEOUT, "audit write timed out; settling it later");
                self.doubt(marker, n);
            }
        }
    }

    /// A batch without a reply: it may still run. Settled by [`Writer::settle`].
    fn doubt(&mut self, marker: String, n: u64) {
        self.in_doubt.push((marker, n));
        self.stats.in_doubt.fetch_add(n, Ordering::Relaxed);
        self.stats.sink_down.store(true, Ordering::Relaxed);
        self.warn.maybe_warn(&self.stats);
    }
}

/// The key of the number hashes (HMAC-SHA256): the audit trail's, and the
/// access log's (the same key when the audit secret is set, so their
/// hashes match).
#[derive(Clone, Debug)]
pub struct NumberKey(HmacKey);

impl NumberKey {
    /// The key of the secret in `path` (trimmed of one trailing newline; at
    /// least 16 bytes).
    pub fn from_secret_file(path: &std::path::Path) -> anyhow::Result<Self> {
        let secret = read_secret(path, "audit secret").map_err(anyhow::Error::msg)?;
        Ok(Self(HmacKey::new(&secret)))
    }

    /// A random key of this process: its hashes match only each other.
    pub fn random() -> Self {
        Self(HmacKey::new(&rand::random::<[u8; 32]>()))
    }

    /// Lowercase hex HMAC-SHA256 of `e164` with this key.
    pub fn hmac_hex(&self, e164: &str) -> String {
        hex::encode(self.0.mac(e164.as_bytes()))
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
                reason: get("reason"),
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
    fn the_mandatory_warning_does_not_say_answers_continue() {
        assert!(drop_warning(false).contains("answers continue"));
        assert!(!drop_warning(true).contains("answers continue"));
        assert!(drop_warning(true).contains("refused"));
    }
}
