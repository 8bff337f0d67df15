//! Typed, layered configuration of `serve`: defaults, then a TOML file
//! (`--config`), then `REASSIGNED_*` environment variables, then flags; validated
//! before anything is bound.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::quota::{QuotaConfig, QuotaSettings};

/// Settings that can come from a file, the environment or flags; every field
/// optional so the layers can be merged.
#[derive(Clone, Debug, Default, Deserialize, Serialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct ServeSettings {
    /// Address to listen on (default 127.0.0.1:50051).
    #[arg(long, env = "REASSIGNED_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Server certificate chain (PEM).
    #[arg(long, env = "REASSIGNED_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, env = "REASSIGNED_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// CA bundle (PEM) that client certificates must chain to.
    #[arg(long, env = "REASSIGNED_CLIENT_CA")]
    pub client_ca: Option<PathBuf>,
    /// Certificate revocation list for client certificates (PEM or DER);
    /// repeat the flag, or comma-separate in the environment, for several.
    #[arg(long = "client-crl", env = "REASSIGNED_CLIENT_CRLS", value_delimiter = ',')]
    pub client_crls: Option<Vec<PathBuf>>,
    /// Milliseconds between looks at the TLS files (certificate, key, client
    /// CA, CRLs) for changes to reload (default 2000).
    #[arg(long, env = "REASSIGNED_TLS_RELOAD_INTERVAL_MS")]
    pub tls_reload_interval_ms: Option<u64>,
    /// Redis URL (`redis://host:6379/0`); without it the embedded store is used.
    #[arg(long, env = "REASSIGNED_REDIS")]
    pub redis: Option<String>,
    /// Redis Cluster seed nodes, comma-separated
    /// (`redis://10.0.0.1:6379,redis://10.0.0.2:6379`); instead of `redis`.
    #[arg(long, env = "REASSIGNED_REDIS_CLUSTER")]
    pub redis_cluster: Option<String>,
    /// With `redis_cluster`: send reads to replicas (default false).
    #[arg(
        long,
        env = "REASSIGNED_REDIS_READ_FROM_REPLICAS",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub redis_read_from_replicas: Option<bool>,
    /// Directory of manifests for the embedded store.
    #[arg(long, env = "REASSIGNED_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Prefix of every Redis key (default `rn`).
    #[arg(long, env = "REASSIGNED_REDIS_KEY_PREFIX")]
    pub redis_key_prefix: Option<String>,
    /// Timeout of each Redis call in milliseconds (default 200).
    #[arg(long, env = "REASSIGNED_REDIS_TIMEOUT_MS")]
    pub redis_timeout_ms: Option<u64>,
    /// Days after `as_of` before the mirror counts as stale (default 45).
    #[arg(long, env = "REASSIGNED_MAX_STALENESS_DAYS")]
    pub max_staleness_days: Option<u32>,
    /// Most checks in one batch call (default 1000).
    #[arg(long, env = "REASSIGNED_MAX_BATCH")]
    pub max_batch: Option<usize>,
    /// Seconds between re-syncs of the embedded store's data directory (default 10).
    #[arg(long, env = "REASSIGNED_RESYNC_INTERVAL_SECS")]
    pub resync_interval_secs: Option<u64>,
    /// TLS handshake timeout in milliseconds (default 10000).
    #[arg(long, env = "REASSIGNED_HANDSHAKE_TIMEOUT_MS")]
    pub handshake_timeout_ms: Option<u64>,
    /// Most TLS handshakes in progress at once (default 256).
    #[arg(long, env = "REASSIGNED_MAX_HANDSHAKES")]
    pub max_handshakes: Option<usize>,
    /// Timeout of each call in milliseconds (default 5000).
    #[arg(long, env = "REASSIGNED_REQUEST_TIMEOUT_MS")]
    pub request_timeout_ms: Option<u64>,
    /// Most concurrent calls (HTTP/2 streams) per connection (default 256).
    #[arg(long, env = "REASSIGNED_MAX_CONCURRENT_STREAMS")]
    pub max_concurrent_streams: Option<u32>,
    /// Largest request message in bytes (default 262144).
    #[arg(long, env = "REASSIGNED_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Require certificate-bound bearer tokens (default true). `--no-tokens`
    /// (`REASSIGNED_TOKENS=false`, `tokens = false`) serves with mTLS alone.
    #[arg(
        long = "no-tokens",
        env = "REASSIGNED_TOKENS",
        num_args = 0,
        default_missing_value = "false",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub tokens: Option<bool>,
    /// JWKS file (public keys, ES256 or EdDSA) that bearer tokens are verified with.
    #[arg(long, env = "REASSIGNED_JWKS")]
    pub jwks: Option<PathBuf>,
    /// The `iss` every bearer token must carry.
    #[arg(long, env = "REASSIGNED_TOKEN_ISSUER")]
    pub token_issuer: Option<String>,
    /// The `aud` every bearer token must carry.
    #[arg(long, env = "REASSIGNED_TOKEN_AUDIENCE")]
    pub token_audience: Option<String>,
    /// Longest lifetime of a bearer token: `exp - iat` and `exp - now` may
    /// not exceed it, and tokens without `iat` are refused (`90s`, `15m`,
    /// `24h`, `7d`, plain seconds, or `off` for no limit; default `24h`).
    #[arg(long, env = "REASSIGNED_TOKEN_MAX_LIFETIME")]
    pub token_max_lifetime: Option<String>,
    /// Redis shared by all replicas for per-platform quotas (default: the
    /// store's Redis when the store is one Redis server; otherwise quotas
    /// hold per process).
    #[arg(long, env = "REASSIGNED_QUOTA_REDIS")]
    pub quota_redis: Option<String>,
    /// Timeout of each quota call to Redis in milliseconds, after which the
    /// local limiter decides (default 50).
    #[arg(long, env = "REASSIGNED_QUOTA_REDIS_TIMEOUT_MS")]
    pub quota_redis_timeout_ms: Option<u64>,
    /// While the quota Redis is down: `fail-open` (default; each server
    /// limits on its own, so N servers grant up to N x the limits unless
    /// `quota_expected_replicas` says N) or `fail-closed` (calls that have a
    /// limit are refused with UNAVAILABLE).
    #[arg(long, env = "REASSIGNED_QUOTA_FALLBACK", value_enum)]
    pub quota_fallback: Option<crate::quota::QuotaFallback>,
    /// Servers sharing the quotas: a server deciding alone (no quota Redis,
    /// or it is down with `fail-open`) enforces 1/N of each limit (default 1).
    #[arg(long, env = "REASSIGNED_QUOTA_EXPECTED_REPLICAS")]
    pub quota_expected_replicas: Option<u32>,
    /// Per-platform quotas (config file only): the `[quotas]` table with a
    /// `default` entry and entries keyed by platform id. None: unlimited.
    #[arg(skip)]
    pub quotas: Option<QuotaSettings>,
    /// Private key (PEM PKCS#8, ECDSA P-256 or Ed25519) that signs receipts
    /// (`want_receipt`). Without it, asking for a receipt is
    /// FAILED_PRECONDITION. Make one with `reassigned keys generate --out
    /// DIR` (it is `DIR/issuer.key`; use a key of its own, not the token
    /// issuer's).
    #[arg(long, env = "REASSIGNED_RECEIPT_KEY")]
    pub receipt_key: Option<PathBuf>,
    /// Key id (`kid`) of the receipt key (default: derived from the public
    /// key, as `keys generate` does).
    #[arg(long, env = "REASSIGNED_RECEIPT_KID")]
    pub receipt_kid: Option<String>,
    /// Retired receipt public keys that stay published (GetSigningKeys) so
    /// that the receipts they signed still verify: `PATH@NOT_AFTER`, PATH a
    /// JWKS or JWK JSON file of public keys (as `reassigned receipt jwks`
    /// prints), NOT_AFTER the last time the key signed (`YYYY-MM-DD`, through
    /// the end of that UTC day, or `YYYY-MM-DDTHH:MM:SSZ`). Repeat the flag,
    /// or comma-separate in the environment; in the file,
    /// `[[receipt_retired_keys]]` tables with `path` and `not_after`.
    #[arg(
        long = "receipt-retired-key",
        env = "REASSIGNED_RECEIPT_RETIRED_KEYS",
        value_delimiter = ',',
        value_parser = parse_retired_key
    )]
    pub receipt_retired_keys: Option<Vec<RetiredKeySetting>>,
    /// File holding the secret (at least 16 bytes) that keys the number
    /// hashes of the audit trail; setting it turns the audit trail on.
    #[arg(long, env = "REASSIGNED_AUDIT_SECRET_FILE")]
    pub audit_secret_file: Option<PathBuf>,
    /// Redis URL of the audit stream (default: the store's Redis).
    #[arg(long, env = "REASSIGNED_AUDIT_REDIS")]
    pub audit_redis: Option<String>,
    /// Approximate most entries kept in the audit stream (default 10000000).
    #[arg(long, env = "REASSIGNED_AUDIT_MAX_LEN")]
    pub audit_max_len: Option<u64>,
    /// Fail calls with UNAVAILABLE when their audit record cannot be queued
    /// or the audit sink is down (default: answer, and count the drop).
    #[arg(
        long,
        env = "REASSIGNED_AUDIT_MANDATORY",
        num_args = 0,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub audit_mandatory: Option<bool>,
    /// Address of the plain-HTTP Prometheus endpoint `GET /metrics` (default:
    /// off). Not authenticated: bind it to a private interface only.
    #[arg(long, env = "REASSIGNED_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Milliseconds a new connection gets to send its first byte before it
    /// is closed (default 2000; at most the handshake timeout).
    #[arg(long, env = "REASSIGNED_HANDSHAKE_FIRST_BYTE_TIMEOUT_MS")]
    pub handshake_first_byte_timeout_ms: Option<u64>,
    /// Most pending TLS handshakes per client IP address; at the cap the
    /// oldest of that address is shed (default 256).
    #[arg(long, env = "REASSIGNED_MAX_HANDSHAKES_PER_IP")]
    pub max_handshakes_per_ip: Option<usize>,
    /// Listen backlog of the server socket, capped by the kernel's
    /// `net.core.somaxconn` (default 4096).
    #[arg(long, env = "REASSIGNED_LISTEN_BACKLOG")]
    pub listen_backlog: Option<u32>,
    /// Embedded store: the largest share (0.0 to 1.0) of the mirror's
    /// records a snapshot found by the background resync may remove; a
    /// snapshot removing more, or empty, is skipped and reported (default 0.10).
    #[arg(long, env = "REASSIGNED_MAX_SHRINK")]
    pub max_shrink: Option<f64>,
}

impl ServeSettings {
    /// Fills every field still unset from `lower`.
    pub fn or(self, lower: ServeSettings) -> ServeSettings {
        macro_rules! merge {
            ($($f:ident),*) => { ServeSettings { $($f: self.$f.or(lower.$f)),* } };
        }
        merge!(
            listen,
            tls_cert,
            tls_key,
            client_ca,
            client_crls,
            tls_reload_interval_ms,
            redis,
            redis_cluster,
            redis_read_from_replicas,
            data_dir,
            redis_key_prefix,
            redis_timeout_ms,
            max_staleness_days,
            max_batch,
            resync_interval_secs,
            handshake_timeout_ms,
            max_handshakes,
            request_timeout_ms,
            max_concurrent_streams,
            max_message_bytes,
            tokens,
            jwks,
            token_issuer,
            token_audience,
            quota_redis,
            quota_redis_timeout_ms,
            quotas,
            receipt_key,
            receipt_kid,
            audit_secret_file,
            audit_redis,
            audit_max_len,
            audit_mandatory,
            metrics_listen,
            handshake_first_byte_timeout_ms,
            max_handshakes_per_ip,
            listen_backlog,
            token_max_lifetime,
            receipt_retired_keys,
            max_shrink,
            quota_fallback,
            quota_expected_replicas
        )
    }

    /// Reads a TOML file of settings (same names as the flags, with `_`).
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::File(path.to_owned(), e.to_string()))?;
        toml::from_str(&text).map_err(|e| ConfigError::File(path.to_owned(), e.to_string()))
    }
}

/// A retired receipt key as configured: its public key file and the last
/// time it signed.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RetiredKeySetting {
    /// JWKS or JWK JSON file of the retired public key(s).
    pub path: PathBuf,
    /// `YYYY-MM-DD` (through the end of that UTC day) or
    /// `YYYY-MM-DDTHH:MM:SSZ`.
    pub not_after: String,
}

/// Parses `--receipt-retired-key PATH@NOT_AFTER`.
fn parse_retired_key(text: &str) -> Result<RetiredKeySetting, String> {
    let (path, not_after) = text.rsplit_once('@').ok_or_else(|| {
        format!("{text:?}: expected PATH@NOT_AFTER, e.g. old-receipts.jwks.json@2026-11-30")
    })?;
    if path.is_empty() {
        return Err(format!("{text:?}: the path is empty"));
    }
    parse_not_after(not_after)?;
    Ok(RetiredKeySetting {
        path: PathBuf::from(path),
        not_after: not_after.to_owned(),
    })
}

/// `YYYY-MM-DD` (the last second of that UTC day) or `YYYY-MM-DDTHH:MM:SSZ`,
/// as Unix seconds.
pub fn parse_not_after(text: &str) -> Result<i64, String> {
    let bad = || format!("{text:?}: not_after must be YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ (UTC)");
    let (date, time) = match text.split_once('T') {
        Some((date, time)) => (date, Some(time)),
        None => (text, None),
    };
    let day = crate::domain::Date::parse(date).map_err(|_| bad())?;
    let start = i64::from(day.days()) * 86_400;
    let Some(time) = time else {
        return Ok(start + 86_399);
    };
    let time = time.strip_suffix('Z').ok_or_else(bad)?;
    let parts: Vec<&str> = time.split(':').collect();
    let [h, m, s] = parts[..] else {
        return Err(bad());
    };
    let num = |v: &str, max: i64| -> Result<i64, String> {
        if v.len() != 2 || !v.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        v.parse::<i64>().ok().filter(|n| *n <= max).ok_or_else(bad)
    };
    Ok(start + num(h, 23)? * 3600 + num(m, 59)? * 60 + num(s, 59)?)
}

/// Where the mirror lives.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StoreConfig {
    /// Redis at this URL.
    Redis {
        /// `redis://...` or `rediss://...`.
        url: String,
        /// Prefix of every key.
        key_prefix: String,
        /// Timeout of each call.
        timeout_ms: u64,
    },
    /// A Redis Cluster reached through these nodes.
    RedisCluster {
        /// Seed nodes (`redis://...` or `rediss://...`), at least one.
        urls: Vec<String>,
        /// Prefix of every key.
        key_prefix: String,
        /// Timeout of each call.
        timeout_ms: u64,
        /// Send reads to replicas.
        read_from_replicas: bool,
    },
    /// The in-process store, loaded from this directory of manifests.
    Embedded {
        /// The directory of manifests and data files.
        data_dir: PathBuf,
        /// Seconds between re-syncs.
        resync_interval_secs: u64,
        /// The largest share of the records a snapshot may remove.
        max_shrink: ShrinkLimit,
    },
}

/// A share of the mirror's records (0.0 to 1.0, validated: never NaN).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(transparent)]
pub struct ShrinkLimit(pub f64);

impl Eq for ShrinkLimit {}

impl ShrinkLimit {
    /// Checks `value` is a share from 0.0 to 1.0.
    pub fn new(value: f64) -> Result<Self, ConfigError> {
        if (0.0..=1.0).contains(&value) {
            Ok(Self(value))
        } else {
            Err(ConfigError::Invalid(
                "max_shrink",
                format!("{value} must be a share from 0.0 to 1.0 (e.g. 0.10 for 10%)"),
            ))
        }
    }
}

/// Where `reassigned import` and `reassigned sync` write: one Redis server
/// (`--redis`) or a Redis Cluster (`--redis-cluster`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedisTarget {
    /// One server at this URL.
    Single(String),
    /// A cluster reached through these seed nodes.
    Cluster(Vec<String>),
}

impl RedisTarget {
    /// From the `--redis` / `--redis-cluster` flags: exactly one must be given.
    pub fn from_flags(redis: Option<String>, redis_cluster: Option<String>) -> Result<Self, ConfigError> {
        match (redis, redis_cluster) {
            (Some(url), None) => Ok(RedisTarget::Single(url)),
            (None, Some(list)) => Ok(RedisTarget::Cluster(parse_cluster_urls(&list)?)),
            (Some(_), Some(_)) => Err(ConfigError::Invalid(
                "redis",
                "give either --redis or --redis-cluster, not both".into(),
            )),
            (None, None) => Err(ConfigError::Missing(
                "redis or redis_cluster",
                "redis or --redis-cluster",
                "REASSIGNED_REDIS or REASSIGNED_REDIS_CLUSTER",
            )),
        }
    }
}

/// The validated configuration of `serve`.
#[derive(Clone, Debug, Serialize)]
pub struct ServeConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Server certificate chain.
    pub tls_cert: PathBuf,
    /// Server private key.
    pub tls_key: PathBuf,
    /// Client CA bundle.
    pub client_ca: PathBuf,
    /// Client certificate revocation lists, enforced at the handshake.
    pub client_crls: Vec<PathBuf>,
    /// Milliseconds between looks at the TLS files for changes.
    pub tls_reload_interval_ms: u64,
    /// Reloads the TLS material of the server running with this config;
    /// clone it before calling [`crate::run`].
    #[serde(skip)]
    pub reload: crate::server::reload::ReloadHandle,
    /// The store.
    pub store: StoreConfig,
    /// Staleness limit in days.
    pub max_staleness_days: u32,
    /// Batch limit.
    pub max_batch: usize,
    /// TLS handshake timeout in milliseconds.
    pub handshake_timeout_ms: u64,
    /// Concurrent handshake limit.
    pub max_handshakes: usize,
    /// Per-call timeout in milliseconds.
    pub request_timeout_ms: u64,
    /// Concurrent streams per connection.
    pub max_concurrent_streams: u32,
    /// Largest request message in bytes.
    pub max_message_bytes: usize,
    /// Bearer tokens: `None` when turned off (mTLS only).
    pub tokens: Option<crate::server::token::TokenConfig>,
    /// Per-platform quotas.
    pub quotas: QuotaConfig,
    /// The receipt signing key file; `None`: receipts are refused.
    pub receipt_key: Option<PathBuf>,
    /// The receipt key id; `None`: the key's JWK thumbprint.
    pub receipt_kid: Option<String>,
    /// Retired receipt keys still published: (file, not_after Unix seconds).
    pub receipt_retired_keys: Vec<(PathBuf, i64)>,
    /// The audit trail; `None`: off.
    pub audit: Option<crate::audit::AuditConfig>,
    /// Counters of the audit trail of the server running with this config.
    #[serde(skip)]
    pub audit_stats: std::sync::Arc<crate::audit::AuditStats>,
    /// Address of the Prometheus endpoint; `None`: off.
    pub metrics_listen: Option<SocketAddr>,
    /// Request counters and the bound metrics address of the server running
    /// with this config.
    #[serde(skip)]
    pub metrics: crate::server::metrics::MetricsHandle,
    /// Time a new connection gets to send its first byte, in milliseconds.
    pub handshake_first_byte_timeout_ms: u64,
    /// Pending handshake limit per client IP address.
    pub max_handshakes_per_ip: usize,
    /// Listen backlog of the server socket.
    pub listen_backlog: u32,
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A required setting is missing.
    #[error("missing setting {0} (flag --{1}, environment {2})")]
    Missing(&'static str, &'static str, &'static str),
    /// A setting is out of range or contradicts another.
    #[error("invalid setting {0}: {1}")]
    Invalid(&'static str, String),
    /// The config file cannot be read or parsed.
    #[error("config file {0}: {1}")]
    File(PathBuf, String),
}

impl ServeConfig {
    /// The default listen address.
    pub const DEFAULT_LISTEN: &'static str = "127.0.0.1:50051";

    /// Validates merged settings and fills in defaults.
    pub fn from_settings(s: ServeSettings) -> Result<Self, ConfigError> {
        let quotas = quota_config(&s)?;
        let need = |v: Option<PathBuf>, name, flag, env| -> Result<PathBuf, ConfigError> {
            let path = v.ok_or(ConfigError::Missing(name, flag, env))?;
            if !path.is_file() {
                return Err(ConfigError::Invalid(
                    name,
                    format!("{} is not a readable file", path.display()),
                ));
            }
            Ok(path)
        };
        let tls_cert = need(s.tls_cert, "tls_cert", "tls-cert", "REASSIGNED_TLS_CERT")?;
        let tls_key = need(s.tls_key, "tls_key", "tls-key", "REASSIGNED_TLS_KEY")?;
        let client_ca = need(s.client_ca, "client_ca", "client-ca", "REASSIGNED_CLIENT_CA")?;
        let client_crls = s
            .client_crls
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|crl| need(Some(crl), "client_crls", "client-crl", "REASSIGNED_CLIENT_CRLS"))
            .collect::<Result<Vec<_>, _>>()?;
        let tls_reload_interval_ms = positive(
            "tls_reload_interval_ms",
            s.tls_reload_interval_ms.unwrap_or(2_000),
        )?;
        let given = [s.redis.is_some(), s.redis_cluster.is_some(), s.data_dir.is_some()];
        if given.iter().filter(|&&g| g).count() > 1 {
            return Err(ConfigError::Invalid(
                "redis",
                "give only one of redis, redis_cluster and data_dir".into(),
            ));
        }
        if s.redis_read_from_replicas.is_some() && s.redis_cluster.is_none() {
            return Err(ConfigError::Invalid(
                "redis_read_from_replicas",
                "applies to redis_cluster only".into(),
            ));
        }
        let store = match (s.redis, s.data_dir) {
            (None, None) if s.redis_cluster.is_some() => StoreConfig::RedisCluster {
                urls: parse_cluster_urls(s.redis_cluster.as_deref().unwrap_or_default())?,
                key_prefix: s.redis_key_prefix.unwrap_or_else(|| "rn".into()),
                timeout_ms: positive("redis_timeout_ms", s.redis_timeout_ms.unwrap_or(200))?,
                read_from_replicas: s.redis_read_from_replicas.unwrap_or(false),
            },
            (Some(_), Some(_)) => {
                return Err(ConfigError::Invalid(
                    "redis",
                    "give either redis or data_dir, not both".into(),
                ));
            }
            (Some(url), None) => {
                if !(url.starts_with("redis://")
                    || url.starts_with("rediss://")
                    || url.starts_with("unix://"))
                {
                    return Err(ConfigError::Invalid(
                        "redis",
                        "must be a redis://, rediss:// or unix:// URL".into(),
                    ));
                }
                StoreConfig::Redis {
                    url,
                    key_prefix: s.redis_key_prefix.unwrap_or_else(|| "rn".into()),
                    timeout_ms: positive("redis_timeout_ms", s.redis_timeout_ms.unwrap_or(200))?,
                }
            }
            (None, data_dir) => {
                let data_dir = data_dir.ok_or(ConfigError::Missing(
                    "redis, redis_cluster or data_dir",
                    "redis, --redis-cluster or --data-dir",
                    "REASSIGNED_REDIS, REASSIGNED_REDIS_CLUSTER or REASSIGNED_DATA_DIR",
                ))?;
                if !data_dir.is_dir() {
                    return Err(ConfigError::Invalid(
                        "data_dir",
                        format!("{} is not a directory", data_dir.display()),
                    ));
                }
                StoreConfig::Embedded {
                    data_dir,
                    resync_interval_secs: positive(
                        "resync_interval_secs",
                        s.resync_interval_secs.unwrap_or(10),
                    )?,
                    max_shrink: ShrinkLimit::new(s.max_shrink.unwrap_or(crate::import::DEFAULT_MAX_SHRINK))?,
                }
            }
        };
        let listen = match s.listen {
            Some(addr) => addr,
            None => Self::DEFAULT_LISTEN
                .parse()
                .map_err(|e| ConfigError::Invalid("listen", format!("{e}")))?,
        };
        let max_lifetime = token_max_lifetime(s.token_max_lifetime.as_deref())?;
        let tokens = token_config(s.tokens, s.jwks, s.token_issuer, s.token_audience, max_lifetime)?;
        let receipt_retired_keys = retired_keys_config(
            s.receipt_retired_keys.unwrap_or_default(),
            &s.receipt_key,
            &s.receipt_kid,
        )?;
        let (receipt_key, receipt_kid) = receipt_config(s.receipt_key, s.receipt_kid)?;
        let audit = match s.audit_secret_file {
            None => None,
            Some(secret_file) => {
                if !secret_file.is_file() {
                    return Err(ConfigError::Invalid(
                        "audit_secret_file",
                        format!("{} is not a readable file", secret_file.display()),
                    ));
                }
                let (store_url, prefix) = match &store {
                    StoreConfig::Redis { url, key_prefix, .. } => (Some(url.clone()), key_prefix.clone()),
                    // The writer speaks to one server: a cluster needs --audit-redis.
                    StoreConfig::RedisCluster { key_prefix, .. } => (None, key_prefix.clone()),
                    _ => (None, "rn".to_owned()),
                };
                let redis_url = s.audit_redis.or(store_url).ok_or(ConfigError::Missing(
                    "audit_redis",
                    "audit-redis",
                    "REASSIGNED_AUDIT_REDIS",
                ))?;
                Some(crate::audit::AuditConfig {
                    redis_url,
                    stream: format!("{prefix}:audit"),
                    max_len: positive("audit_max_len", s.audit_max_len.unwrap_or(10_000_000))?,
                    mandatory: s.audit_mandatory.unwrap_or(false),
                    secret_file,
                })
            }
        };
        let first_byte_ms = positive(
            "handshake_first_byte_timeout_ms",
            s.handshake_first_byte_timeout_ms.unwrap_or(2_000),
        )?;
        if first_byte_ms > s.handshake_timeout_ms.unwrap_or(10_000) {
            return Err(ConfigError::Invalid(
                "handshake_first_byte_timeout_ms",
                "must not exceed handshake_timeout_ms".into(),
            ));
        }
        let max_batch = s.max_batch.unwrap_or(1000);
        if !(1..=100_000).contains(&max_batch) {
            return Err(ConfigError::Invalid("max_batch", "must be 1 to 100000".into()));
        }
        Ok(Self {
            quotas,
            listen,
            tls_cert,
            tls_key,
            client_ca,
            client_crls,
            tls_reload_interval_ms,
            reload: crate::server::reload::ReloadHandle::new(),
            store,
            max_staleness_days: s.max_staleness_days.unwrap_or(45),
            max_batch,
            handshake_timeout_ms: positive("handshake_timeout_ms", s.handshake_timeout_ms.unwrap_or(10_000))?,
            max_handshakes: positive("max_handshakes", s.max_handshakes.unwrap_or(4096) as u64)? as usize,
            request_timeout_ms: positive("request_timeout_ms", s.request_timeout_ms.unwrap_or(5_000))?,
            max_concurrent_streams: positive(
                "max_concurrent_streams",
                u64::from(s.max_concurrent_streams.unwrap_or(256)),
            )? as u32,
            max_message_bytes: positive(
                "max_message_bytes",
                s.max_message_bytes.unwrap_or(256 * 1024) as u64,
            )? as usize,
            tokens,
            receipt_key,
            receipt_kid,
            receipt_retired_keys,
            audit,
            audit_stats: Default::default(),
            metrics_listen: s.metrics_listen,
            metrics: Default::default(),
            handshake_first_byte_timeout_ms: first_byte_ms,
            max_handshakes_per_ip: positive(
                "max_handshakes_per_ip",
                s.max_handshakes_per_ip.unwrap_or(256) as u64,
            )? as usize,
            listen_backlog: positive("listen_backlog", u64::from(s.listen_backlog.unwrap_or(4096)))? as u32,
        })
    }

    /// The per-call timeout.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// Time between looks at the TLS files for changes.
    pub fn tls_reload_interval(&self) -> Duration {
        Duration::from_millis(self.tls_reload_interval_ms)
    }
}

/// Splits a comma-separated list of Redis Cluster node URLs and checks each.
pub fn parse_cluster_urls(list: &str) -> Result<Vec<String>, ConfigError> {
    let urls: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect();
    if urls.is_empty() {
        return Err(ConfigError::Invalid(
            "redis_cluster",
            "give at least one node URL".into(),
        ));
    }
    if let Some(bad) = urls
        .iter()
        .find(|u| !(u.starts_with("redis://") || u.starts_with("rediss://")))
    {
        // Only the scheme: the URL may hold a password.
        let scheme = bad.split("://").next().unwrap_or_default();
        return Err(ConfigError::Invalid(
            "redis_cluster",
            format!("each node must be a redis:// or rediss:// URL (got scheme {scheme:?})"),
        ));
    }
    Ok(urls)
}

/// The `[quotas]` table, validated; the quota Redis defaults to the store's.
fn quota_config(s: &ServeSettings) -> Result<QuotaConfig, ConfigError> {
    let redis = s.quota_redis.clone().or_else(|| s.redis.clone());
    if let Some(url) = &redis
        && !(url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("unix://"))
    {
        return Err(ConfigError::Invalid(
            "quota_redis",
            "must be a redis://, rediss:// or unix:// URL".into(),
        ));
    }
    let prefix = s.redis_key_prefix.clone().unwrap_or_else(|| "rn".into());
    let mut config = QuotaConfig::from_settings(s.quotas.as_ref(), redis, prefix)
        .map_err(|e| ConfigError::Invalid("quotas", e.to_string()))?;
    if let Some(ms) = s.quota_redis_timeout_ms {
        config.redis_timeout_ms = positive("quota_redis_timeout_ms", ms)?;
    }
    if let Some(fallback) = s.quota_fallback {
        config.fallback = fallback;
    }
    if let Some(n) = s.quota_expected_replicas {
        config.expected_replicas = positive("quota_expected_replicas", u64::from(n))? as u32;
    }
    Ok(config)
}

/// Tokens are on unless turned off explicitly; then the JWKS, issuer and
/// audience are required, and the JWKS must load.
fn token_config(
    on: Option<bool>,
    jwks: Option<PathBuf>,
    issuer: Option<String>,
    audience: Option<String>,
    max_lifetime_secs: Option<u64>,
) -> Result<Option<crate::server::token::TokenConfig>, ConfigError> {
    if on == Some(false) {
        return Ok(None);
    }
    const HINT: &str = "bearer tokens are on by default; --no-tokens serves with mTLS alone";
    let jwks = jwks.ok_or(ConfigError::Invalid(
        "jwks",
        format!("missing (flag --jwks, environment REASSIGNED_JWKS): {HINT}"),
    ))?;
    let issuer = issuer.filter(|s| !s.is_empty()).ok_or(ConfigError::Invalid(
        "token_issuer",
        format!("missing (flag --token-issuer, environment REASSIGNED_TOKEN_ISSUER): {HINT}"),
    ))?;
    let audience = audience.filter(|s| !s.is_empty()).ok_or(ConfigError::Invalid(
        "token_audience",
        format!("missing (flag --token-audience, environment REASSIGNED_TOKEN_AUDIENCE): {HINT}"),
    ))?;
    let config = crate::server::token::TokenConfig {
        jwks,
        issuer,
        audience,
        max_lifetime_secs,
    };
    crate::server::token::TokenVerifier::load(config.clone())
        .map_err(|e| ConfigError::Invalid("jwks", e.to_string()))?;
    Ok(Some(config))
}

/// `token_max_lifetime`: a time span (`24h`), or `off`; unset is 24 h.
fn token_max_lifetime(text: Option<&str>) -> Result<Option<u64>, ConfigError> {
    match text.map(str::trim) {
        None => Ok(Some(crate::server::token::DEFAULT_MAX_LIFETIME_SECS)),
        Some(off) if off.eq_ignore_ascii_case("off") => Ok(None),
        Some(span) => crate::cli::token::parse_ttl(span)
            .map(|d| Some(d.as_secs()))
            .map_err(|e| ConfigError::Invalid("token_max_lifetime", format!("{e}, or off"))),
    }
}

/// Checks the receipt key now (it must parse), so a bad key stops `serve`
/// before it binds.
fn receipt_config(
    key: Option<PathBuf>,
    kid: Option<String>,
) -> Result<(Option<PathBuf>, Option<String>), ConfigError> {
    let Some(key) = key else {
        if kid.is_some() {
            return Err(ConfigError::Invalid(
                "receipt_kid",
                "needs receipt_key (--receipt-key)".into(),
            ));
        }
        return Ok((None, None));
    };
    if let Some(kid) = &kid
        && (kid.is_empty() || kid.len() > 128 || !kid.bytes().all(|b| b.is_ascii_graphic()))
    {
        return Err(ConfigError::Invalid(
            "receipt_kid",
            "must be 1 to 128 printable ASCII characters".into(),
        ));
    }
    crate::receipt::ReceiptSigner::from_pem_file(&key, kid.clone())
        .map_err(|e| ConfigError::Invalid("receipt_key", e.to_string()))?;
    Ok((Some(key), kid))
}

/// The retired receipt keys: each file must hold usable public keys, and
/// no `kid` may be the current key's or repeat.
fn retired_keys_config(
    retired: Vec<RetiredKeySetting>,
    key: &Option<PathBuf>,
    kid: &Option<String>,
) -> Result<Vec<(PathBuf, i64)>, ConfigError> {
    if retired.is_empty() {
        return Ok(Vec::new());
    }
    let invalid = |why: String| ConfigError::Invalid("receipt_retired_keys", why);
    let key = key
        .as_ref()
        .ok_or_else(|| invalid("needs receipt_key (--receipt-key), the key that signs now".into()))?;
    let mut all = Vec::new();
    let mut out = Vec::new();
    for setting in retired {
        let not_after = parse_not_after(&setting.not_after).map_err(invalid)?;
        let keys = crate::receipt::load_retired_keys(&setting.path, not_after)
            .map_err(|e| invalid(e.to_string()))?;
        all.extend(keys);
        out.push((setting.path, not_after));
    }
    // The signer itself is checked by `receipt_config`; here only whether
    // the retired keys fit beside it.
    if let Ok(signer) = crate::receipt::ReceiptSigner::from_pem_file(key, kid.clone()) {
        signer.with_retired(&all).map_err(|e| invalid(e.to_string()))?;
    }
    Ok(out)
}

fn positive(name: &'static str, v: u64) -> Result<u64, ConfigError> {
    if v == 0 {
        return Err(ConfigError::Invalid(name, "must be greater than 0".into()));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_file() {
        let flags = ServeSettings {
            max_batch: Some(10),
            ..Default::default()
        };
        let file: ServeSettings = toml::from_str("max_batch = 20\nmax_staleness_days = 30\n").expect("toml");
        let merged = flags.or(file);
        assert_eq!(merged.max_batch, Some(10));
        assert_eq!(merged.max_staleness_days, Some(30));
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        assert!(toml::from_str::<ServeSettings>("max_bacth = 20\n").is_err());
    }

    #[test]
    fn cluster_urls_are_split_and_checked() {
        let urls = parse_cluster_urls("redis://a:1, redis://b:2,,").expect("urls");
        assert_eq!(urls, ["redis://a:1", "redis://b:2"]);
        assert!(parse_cluster_urls(" , ").is_err());
        let e = parse_cluster_urls("redis://a:1,http://user:secret@b").expect_err("scheme");
        assert!(!e.to_string().contains("secret"), "{e}");
    }

    #[test]
    fn cluster_excludes_redis_and_data_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("f.pem");
        std::fs::write(&file, "x").expect("write");
        let base = ServeSettings {
            tls_cert: Some(file.clone()),
            tls_key: Some(file.clone()),
            client_ca: Some(file),
            ..Default::default()
        };
        let both = ServeSettings {
            redis: Some("redis://a:1".into()),
            redis_cluster: Some("redis://b:1".into()),
            ..base.clone()
        };
        assert!(ServeConfig::from_settings(both).is_err());
        let with_dir = ServeSettings {
            data_dir: Some(dir.path().to_owned()),
            redis_cluster: Some("redis://b:1".into()),
            ..base.clone()
        };
        assert!(ServeConfig::from_settings(with_dir).is_err());
        let replicas_alone = ServeSettings {
            redis: Some("redis://a:1".into()),
            redis_read_from_replicas: Some(true),
            ..base.clone()
        };
        assert!(ServeConfig::from_settings(replicas_alone).is_err());
        let cluster = ServeSettings {
            redis_cluster: Some("redis://b:1,redis://c:2".into()),
            redis_read_from_replicas: Some(true),
            ..base
        };
        // Settings checked after the store (e.g. bearer tokens) may still
        // be missing here: only the store part must be accepted.
        match ServeConfig::from_settings(cluster) {
            Ok(config) => assert_eq!(
                config.store,
                StoreConfig::RedisCluster {
                    urls: vec!["redis://b:1".into(), "redis://c:2".into()],
                    key_prefix: "rn".into(),
                    timeout_ms: 200,
                    read_from_replicas: true,
                }
            ),
            Err(ConfigError::Invalid(name, _) | ConfigError::Missing(name, _, _)) => {
                assert!(!name.starts_with("redis") && name != "data_dir", "{name}")
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn token_max_lifetime_defaults_to_a_day_and_can_be_off() {
        assert_eq!(token_max_lifetime(None).expect("default"), Some(86_400));
        assert_eq!(token_max_lifetime(Some("2h")).expect("2h"), Some(7_200));
        assert_eq!(token_max_lifetime(Some("off")).expect("off"), None);
        let e = token_max_lifetime(Some("1y")).expect_err("1y");
        assert!(e.to_string().contains("token_max_lifetime"), "{e}");
    }

    #[test]
    fn retired_key_windows_parse() {
        assert_eq!(parse_not_after("1970-01-01"), Ok(86_399));
        assert_eq!(parse_not_after("1970-01-02T00:00:10Z"), Ok(86_410));
        for bad in [
            "1970-01-01T24:00:00Z",
            "1970-01-01T00:00:00",
            "1970-02-30",
            "yesterday",
            "",
        ] {
            assert!(parse_not_after(bad).is_err(), "{bad}");
        }
        let setting = parse_retired_key("keys/old@x.json@2026-11-30").expect("setting");
        assert_eq!(setting.path, PathBuf::from("keys/old@x.json"));
        assert!(parse_retired_key("keys/old.json").is_err());
        let file: ServeSettings =
            toml::from_str("[[receipt_retired_keys]]\npath = \"a.json\"\nnot_after = \"2026-11-30\"\n")
                .expect("toml");
        assert_eq!(
            file.receipt_retired_keys.expect("keys")[0].not_after,
            "2026-11-30"
        );
    }

    #[test]
    fn missing_tls_is_a_clear_error() {
        let e = ServeConfig::from_settings(ServeSettings::default()).expect_err("missing");
        assert!(e.to_string().contains("--tls-cert"), "{e}");
    }
}
