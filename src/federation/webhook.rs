//! Webhooks: for platforms that cannot hold a `WatchDisconnections` stream
//! open, the server POSTs each event of their watch list to a configured
//! URL as a CloudEvents 1.0 structured JSON message
//! (`application/cloudevents+json`), signed with HMAC-SHA-256.
//!
//! # The request
//! - Body: `{"specversion":"1.0","id":..,"source":..,"type":..,"time":..,
//!   "datacontenttype":"application/json","data":{..}}` where `type` is
//!   `org.reassigned.disconnection.disconnected` or `...retracted`, `id`
//!   is `<source>/<event_id>/<kind>` (stable across retries: receivers
//!   de-duplicate on it) and `data` holds the fields of
//!   `DisconnectionEvent` (`cursor` included).
//! - Header [`SIGNATURE_HEADER`]: `t=<unix seconds>,v1=<hex HMAC-SHA-256
//!   of "<t>.<body>" under the platform's webhook secret>`.
//!
//! # Delivery
//! One sender per configured platform follows the log like a watcher (a
//! [`Feed`]) and keeps its cursor durably (Redis: a key beside the log;
//! embedded: a file in the data directory), saved after each event is
//! delivered or given up: at least once across restarts. A 2xx answer is
//! delivered; anything else (or no answer within [`REQUEST_TIMEOUT`]) is
//! retried with exponential backoff up to the configured attempts, then
//! counted as dead ([`DeliveryStats::webhook_dead`], the metric
//! `reassigned_webhook_dead_letters_total`) and skipped. With several
//! servers behind one Redis, one holds a lease per platform (renewed before
//! each event) and sends; the others wait.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::deliver::{Cursor, CursorError, DeliveryStats, Feed, Start, Tips};
use super::log::{AnyLog, EventLog};
use super::watch::WatchLists;
use super::{Event, EventKind};
use crate::domain::Date;
use crate::domain::hmac::{HmacKey, read_secret};
use crate::store::RedisStore;

/// The signature header of a webhook request.
pub const SIGNATURE_HEADER: &str = "x-reassigned-signature";

/// The bound on one webhook request (connect, send, answer).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a sender's lease lasts without renewal.
const LEASE: Duration = Duration::from_secs(15);

/// A platform's webhook, as configured.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct WebhookConfig {
    /// The platform (certificate identity) whose watch list it serves.
    pub platform: String,
    /// `http://host:port/path`.
    pub url: String,
    /// The file holding the signing secret (16+ bytes; never logged).
    pub secret_file: PathBuf,
    /// Tries per event before it counts as dead (at least 1).
    pub max_attempts: u32,
    /// The wait before the first retry, doubled each time (at most 60 s).
    pub backoff_ms: u64,
}

/// The parts of an `http://` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpUrl {
    /// Host name or address.
    pub host: String,
    /// Port (80 by default).
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl HttpUrl {
    /// Parses `http://host[:port][/path]` (HTTPS is not spoken by the
    /// sender: put a TLS-terminating proxy in front of a remote receiver;
    /// the signature protects integrity, not confidentiality).
    pub fn parse(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("{url:?}: only http:// webhook URLs are supported"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().map_err(|_| format!("{url:?}: bad port"))?),
            None => (authority, 80),
        };
        if host.is_empty() || host.contains('@') {
            return Err(format!("{url:?}: needs a host (and no user info)"));
        }
        Ok(Self {
            host: host.to_owned(),
            port,
            path: path.to_owned(),
        })
    }
}

/// Where a sender keeps its cursor.
#[derive(Clone)]
pub enum CursorStore {
    /// A key in the mirror's Redis (with a lease key beside it).
    Redis(RedisStore),
    /// A file in this directory.
    Dir(PathBuf),
}

impl CursorStore {
    fn name(platform: &str) -> String {
        hex::encode(&Sha256::digest(platform.as_bytes())[..8])
    }

    async fn load(&self, platform: &str) -> Result<Option<String>, String> {
        match self {
            CursorStore::Redis(store) => {
                let mut cmd = ::redis::cmd("GET");
                cmd.arg(format!(
                    "{}:fed:wh:{}:cursor",
                    store.key_prefix(),
                    Self::name(platform)
                ));
                query(store, &cmd).await
            }
            CursorStore::Dir(dir) => {
                let path = dir.join(format!("webhook-{}.cursor", Self::name(platform)));
                match tokio::fs::read_to_string(&path).await {
                    Ok(text) => Ok(Some(text.trim().to_owned())),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(format!("{}: {e}", path.display())),
                }
            }
        }
    }

    async fn save(&self, platform: &str, cursor: &Cursor) -> Result<(), String> {
        match self {
            CursorStore::Redis(store) => {
                let mut cmd = ::redis::cmd("SET");
                cmd.arg(format!(
                    "{}:fed:wh:{}:cursor",
                    store.key_prefix(),
                    Self::name(platform)
                ))
                .arg(cursor.encode());
                query::<()>(store, &cmd).await
            }
            CursorStore::Dir(dir) => {
                let path = dir.join(format!("webhook-{}.cursor", Self::name(platform)));
                let tmp = path.with_extension("cursor.tmp");
                let text = cursor.encode();
                tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                    use std::io::Write;
                    let mut f = std::fs::File::create(&tmp)?;
                    f.write_all(text.as_bytes())?;
                    f.sync_data()?;
                    std::fs::rename(&tmp, &path)
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())
            }
        }
    }

    /// Takes or renews this server's lease on `platform`'s sender; false
    /// when another server holds it.
    async fn lease(&self, platform: &str, holder: &str) -> Result<bool, String> {
        let CursorStore::Redis(store) = self else {
            return Ok(true);
        };
        let script = ::redis::Script::new(
            "local v = redis.call('GET', KEYS[1]) \
             if v == false or v == ARGV[1] then \
               redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end \
             return 0",
        );
        let key = format!("{}:fed:wh:{}:lease", store.key_prefix(), Self::name(platform));
        let mut invocation = script.key(key);
        invocation.arg(holder).arg(LEASE.as_millis() as u64);
        let limit = store.options().timeout;
        store
            .within(limit, invocation.invoke_async::<i64>(&mut store.connection()))
            .await
            .map(|n| n == 1)
            .map_err(|e| format!("lease: {e}"))
    }
}

async fn query<T: ::redis::FromRedisValue>(store: &RedisStore, cmd: &::redis::Cmd) -> Result<T, String> {
    super::watch::query(store.clone(), cmd.clone())
        .await
        .map_err(|e| e.to_string())
}

/// Everything a sender needs besides its configuration.
#[derive(Clone)]
pub struct SenderParts {
    /// The event log.
    pub log: AnyLog,
    /// The watch lists.
    pub lists: WatchLists,
    /// Wakes idle feeds.
    pub tips: Tips,
    /// Where cursors (and leases) live.
    pub cursors: CursorStore,
    /// Counters.
    pub stats: Arc<DeliveryStats>,
    /// How long the log keeps events.
    pub retention: Duration,
}

/// Starts one sender per webhook; they stop when `stop` turns true.
pub fn start(
    webhooks: &[WebhookConfig],
    parts: &SenderParts,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    for config in webhooks {
        let url = HttpUrl::parse(&config.url).map_err(anyhow::Error::msg)?;
        let secret = read_secret(&config.secret_file, "webhook secret").map_err(anyhow::Error::msg)?;
        let sender = Sender {
            config: config.clone(),
            url,
            key: HmacKey::new(&secret),
            parts: parts.clone(),
            holder: format!("{:016x}", rand::random::<u64>()),
        };
        let mut stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = sender.run() => {}
                _ = stop.wait_for(|s| *s) => {}
            }
        });
    }
    Ok(())
}

struct Sender {
    config: WebhookConfig,
    url: HttpUrl,
    key: HmacKey,
    parts: SenderParts,
    /// This server's lease holder id.
    holder: String,
}

impl Sender {
    /// Runs until stopped: (re)opens the feed after any failure.
    async fn run(self) {
        loop {
            if let Err(e) = self.follow().await
                && let Some(suppressed) = crate::lograte::global().check("webhook_sender")
            {
                tracing::warn!(error = %e, suppressed, "webhook: sender failed; retrying");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn follow(&self) -> Result<(), String> {
        let platform = &self.config.platform;
        let cursors = &self.parts.cursors;
        while !cursors.lease(platform, &self.holder).await? {
            tokio::time::sleep(LEASE / 3).await;
        }
        let saved = cursors.load(platform).await?;
        let cursor = match &saved {
            Some(text) => Some(Cursor::decode(text, self.parts.log.shards()).map_err(|e| e.to_string())?),
            None => None,
        };
        let open = |start| {
            Feed::open(
                self.parts.log.clone(),
                self.parts.lists.clone(),
                self.parts.tips.clone(),
                platform.clone(),
                start,
                self.parts.retention,
            )
        };
        let mut feed = match open(cursor.map_or(Start::Now, Start::After)).await {
            Err(CursorError::OutOfRange(_)) => {
                tracing::error!(
                    "webhook: the saved cursor is older than retention; resuming from the oldest event held"
                );
                open(Start::Oldest).await.map_err(|e| e.to_string())?
            }
            other => other.map_err(|e| e.to_string())?,
        };
        if saved.is_none() {
            cursors.save(platform, &feed.cursor()).await?;
        }
        loop {
            // Renewed at least every second or so while idle, and before
            // each event.
            if !cursors.lease(platform, &self.holder).await? {
                return Err("lost the lease".into());
            }
            let batch = feed.next().await.map_err(|e| e.to_string())?;
            for (event, cursor) in batch {
                if !cursors.lease(platform, &self.holder).await? {
                    return Err("lost the lease".into());
                }
                self.deliver(&event, &cursor).await;
                cursors.save(platform, &cursor).await?;
            }
        }
    }

    /// Sends one event until it is answered 2xx or the budget is spent.
    async fn deliver(&self, event: &Event, cursor: &Cursor) {
        let body = cloudevent(event, cursor);
        let mut backoff = Duration::from_millis(self.config.backoff_ms.max(1));
        for attempt in 1..=self.config.max_attempts.max(1) {
            match self.post(&body).await {
                Ok(status) if (200..300).contains(&status) => {
                    self.parts.stats.webhook_delivered.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                outcome => {
                    tracing::debug!(attempt, outcome = ?outcome, "webhook: attempt failed");
                    if attempt < self.config.max_attempts {
                        self.parts.stats.webhook_retries.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(60));
                    }
                }
            }
        }
        self.parts.stats.webhook_dead.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            attempts = self.config.max_attempts,
            "webhook: event given up after the retry budget (dead letter)"
        );
    }

    /// One POST; the answer's status code.
    async fn post(&self, body: &[u8]) -> Result<u16, String> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let signature = signature(&self.key, now, body);
        let request = http::Request::post(&self.url.path)
            .header(http::header::HOST, format!("{}:{}", self.url.host, self.url.port))
            .header(http::header::CONTENT_TYPE, "application/cloudevents+json")
            .header(SIGNATURE_HEADER, signature)
            .body(Full::new(bytes::Bytes::copy_from_slice(body)))
            .map_err(|e| e.to_string())?;
        let exchange = async {
            let stream = tokio::net::TcpStream::connect((self.url.host.as_str(), self.url.port))
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let _ = stream.set_nodelay(true);
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            let conn = tokio::spawn(conn);
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| format!("send: {e}"))?;
            let status = response.status().as_u16();
            // Read (and drop) the body so the connection ends cleanly.
            let _ = response.into_body().collect().await;
            conn.abort();
            Ok::<u16, String>(status)
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| "timed out".to_owned())?
    }
}

/// The signature header's value for `body` sent at `unix_secs`.
pub fn signature(key: &HmacKey, unix_secs: u64, body: &[u8]) -> String {
    let mut message = format!("{unix_secs}.").into_bytes();
    message.extend_from_slice(body);
    format!("t={unix_secs},v1={}", hex::encode(key.mac(&message)))
}

/// The CloudEvents 1.0 structured JSON of `event`.
pub fn cloudevent(event: &Event, cursor: &Cursor) -> Vec<u8> {
    let kind = match event.kind {
        EventKind::Disconnected => "disconnected",
        EventKind::Retracted => "retracted",
    };
    let secs = event.accepted_unix_ms.div_euclid(1000);
    let day = Date::from_days(i32::try_from(secs.div_euclid(86_400)).unwrap_or(0));
    let in_day = secs.rem_euclid(86_400);
    let time = format!(
        "{day}T{:02}:{:02}:{:02}.{:03}Z",
        in_day / 3600,
        in_day % 3600 / 60,
        in_day % 60,
        event.accepted_unix_ms.rem_euclid(1000)
    );
    let body = serde_json::json!({
        "specversion": "1.0",
        "id": format!("{}/{}/{kind}", event.source, event.event_id),
        "source": format!("reassigned/{}", event.source),
        "type": format!("org.reassigned.disconnection.{kind}"),
        "time": time,
        "datacontenttype": "application/json",
        "data": {
            "cursor": cursor.encode(),
            "event_id": event.event_id,
            "phone_number": event.number.to_string(),
            "disconnect_date": event.disconnect_date.to_string(),
            "earliest_reissue_date": event.earliest_reissue_date.to_string(),
            "source": event.source,
            "kind": kind.to_uppercase(),
        },
    });
    serde_json::to_vec(&body).unwrap_or_default()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_http_only() {
        assert_eq!(
            HttpUrl::parse("http://127.0.0.1:8080/hook?x=1").unwrap(),
            HttpUrl {
                host: "127.0.0.1".into(),
                port: 8080,
                path: "/hook?x=1".into()
            }
        );
        assert_eq!(HttpUrl::parse("http://example.com").unwrap().port, 80);
        assert!(HttpUrl::parse("https://example.com/").is_err());
        assert!(HttpUrl::parse("http://:80/").is_err());
        assert!(HttpUrl::parse("http://u:p@h/").is_err());
    }

    #[test]
    fn signatures_cover_time_and_body() {
        let key = HmacKey::new(b"0123456789abcdef");
        let a = signature(&key, 1, b"{}");
        assert!(a.starts_with("t=1,v1="));
        assert_ne!(a, signature(&key, 2, b"{}"));
        assert_ne!(a, signature(&key, 1, b"{ }"));
    }
}
