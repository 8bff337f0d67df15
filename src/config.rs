//! Typed, layered configuration of `serve`: defaults, then a TOML file
//! (`--config`), then `REASSIGNED_*` environment variables, then flags;
//! validated in one place ([`ServeConfig::from_settings`]) before anything is
//! bound.
//!
//! Every setting is written once, in the table of `settings_table!`: its
//! name (the TOML key and the field of [`ServeSettings`]), its flag, its
//! environment variable, its default (a constant of [`defaults`] or of the
//! module that owns the value) and its doc. The clap arguments, the
//! environment lookup, the file keys, [`ServeSettings::defaults`], the help
//! text's `[default: ..]` and `serve --dump-config` all derive from it
//! ([`SETTINGS`] lists it at run time).
//!
//! The configuration is plain data: the server builds its runtime handles
//! (reload, metrics, audit counters, token verifier) from it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::quota::{QuotaConfig, QuotaFallback, QuotaSettings};

/// Defaults of the settings that belong to `serve` itself; the others are
/// the constants of the module that owns the value (named in the table).
pub mod defaults {
    use super::*;

    /// `listen`.
    pub const LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 50051);
    /// `tls_reload_interval_ms`.
    pub const TLS_RELOAD_INTERVAL_MS: u64 = 2_000;
    /// `redis_key_prefix` (also of `import`, `sync`, `audit export`, ...).
    pub const KEY_PREFIX: &str = crate::store::redis::DEFAULT_KEY_PREFIX;
    /// `redis_timeout_ms`.
    pub const REDIS_TIMEOUT_MS: u64 = crate::store::redis::DEFAULT_TIMEOUT.as_millis() as u64;
    /// `max_staleness_days`.
    pub const MAX_STALENESS_DAYS: u32 = crate::domain::DEFAULT_MAX_STALENESS_DAYS;
    /// `max_batch`.
    pub const MAX_BATCH: usize = crate::domain::DEFAULT_MAX_BATCH;
    /// `resync_interval_secs`.
    pub const RESYNC_INTERVAL_SECS: u64 = 10;
    /// `handshake_timeout_ms`.
    pub const HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
    /// `max_handshakes`.
    pub const MAX_HANDSHAKES: usize = 4096;
    /// `request_timeout_ms`.
    pub const REQUEST_TIMEOUT_MS: u64 = 5_000;
    /// `max_concurrent_streams`.
    pub const MAX_CONCURRENT_STREAMS: u32 = 256;
    /// `max_message_bytes`.
    pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;
    /// `token_max_lifetime`, in seconds.
    pub const TOKEN_MAX_LIFETIME_SECS: u64 = 24 * 3600;
    /// `audit_max_len`.
    pub const AUDIT_MAX_LEN: u64 = 10_000_000;
    /// `handshake_first_byte_timeout_ms`.
    pub const HANDSHAKE_FIRST_BYTE_TIMEOUT_MS: u64 = 2_000;
    /// `max_handshakes_per_ip`.
    pub const MAX_HANDSHAKES_PER_IP: usize = 256;
    /// `listen_backlog`.
    pub const LISTEN_BACKLOG: u32 = 4096;
    /// `max_shrink`.
    pub const MAX_SHRINK: f64 = crate::import::DEFAULT_MAX_SHRINK;
    /// `watch_retention_days`.
    pub const WATCH_RETENTION_DAYS: u32 = 30;
    /// `quota_redis_timeout_ms`.
    pub const QUOTA_REDIS_TIMEOUT_MS: u64 = crate::quota::DEFAULT_REDIS_TIMEOUT.as_millis() as u64;
    /// `quota_expected_replicas`.
    pub const QUOTA_EXPECTED_REPLICAS: u32 = 1;
}

/// One setting of `serve`, as the table writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Setting {
    /// The TOML key and the field of [`ServeSettings`].
    pub name: &'static str,
    /// The flag without `--`; `None`: config file only.
    pub flag: Option<&'static str>,
    /// The environment variable; `None`: config file only.
    pub env: Option<&'static str>,
    /// What it does.
    pub doc: &'static str,
}

impl Setting {
    /// The setting called `name` (a field of [`ServeSettings`]).
    pub fn named(name: &str) -> Option<&'static Setting> {
        SETTINGS.iter().find(|s| s.name == name)
    }

    /// The default as the config file spells it (`None`: no default).
    pub fn default_text(&self) -> Option<String> {
        let defaults = toml::Table::try_from(ServeSettings::defaults()).ok()?;
        defaults.get(self.name).map(|v| match v {
            toml::Value::String(s) => s.clone(),
            other => other.to_string(),
        })
    }

    /// The help of its flag: the doc, then the default.
    fn help(&self) -> String {
        let doc = self.doc.trim();
        match self.default_text() {
            Some(default) => format!("{doc} [default: {default}]"),
            None => doc.to_owned(),
        }
    }
}

/// The help text of the flag of setting `name` (for clap).
fn help_of(name: &str) -> String {
    Setting::named(name).map(Setting::help).unwrap_or_default()
}

/// Writes the settings: [`ServeSettings`] (every field an `Option`, so the
/// layers merge), its clap arguments and serde keys, [`ServeSettings::or`],
/// [`ServeSettings::defaults`] and [`SETTINGS`]. Each entry:
/// `/// doc`, `name: Type = default, flag "flag", env "ENV" (, clap(extra
/// attributes))?;` then, after `file only:`, settings without flag or
/// environment variable.
macro_rules! settings_table {
    (
        $(
            $(#[doc = $doc:literal])+
            $name:ident: $ty:ty $(= $default:expr)?, flag $flag:literal, env $env:literal
                $(, clap($($arg:tt)*))?;
        )*
        file only:
        $(
            $(#[doc = $fdoc:literal])+
            $fname:ident: $fty:ty;
        )*
    ) => {
        /// Settings that can come from a file, the environment or flags;
        /// every field optional so the layers can be merged (see
        /// [`ServeSettings::or`]). Written by `settings_table!`.
        #[derive(Clone, Debug, Default, Deserialize, Serialize, clap::Args)]
        #[serde(deny_unknown_fields)]
        pub struct ServeSettings {
            $(
                $(#[doc = $doc])+
                #[arg(long = $flag, env = $env, help = help_of(stringify!($name)) $(, $($arg)*)?)]
                #[serde(default, skip_serializing_if = "Option::is_none")]
                pub $name: Option<$ty>,
            )*
            $(
                $(#[doc = $fdoc])+
                #[arg(skip)]
                #[serde(default, skip_serializing_if = "Option::is_none")]
                pub $fname: Option<$fty>,
            )*
        }

        impl ServeSettings {
            /// Fills every field still unset from `lower`.
            pub fn or(self, lower: ServeSettings) -> ServeSettings {
                ServeSettings {
                    $($name: self.$name.or(lower.$name),)*
                    $($fname: self.$fname.or(lower.$fname),)*
                }
            }

            /// The defaults: the lowest layer.
            pub fn defaults() -> ServeSettings {
                ServeSettings {
                    $($name: settings_table!(@default $($default)?),)*
                    $($fname: None,)*
                }
            }
        }

        /// Every setting of `serve`, in the order of the table.
        pub const SETTINGS: &[Setting] = &[
            $(Setting {
                name: stringify!($name),
                flag: Some($flag),
                env: Some($env),
                doc: concat!($($doc, "\n"),+),
            },)*
            $(Setting {
                name: stringify!($fname),
                flag: None,
                env: None,
                doc: concat!($($fdoc, "\n"),+),
            },)*
        ];
    };
    (@default) => { None };
    (@default $default:expr) => { Some($default.into()) };
}

settings_table! {
    /// Address to listen on.
    listen: SocketAddr = defaults::LISTEN, flag "listen", env "REASSIGNED_LISTEN";
    /// Server certificate chain (PEM).
    tls_cert: PathBuf, flag "tls-cert", env "REASSIGNED_TLS_CERT";
    /// Server private key (PEM).
    tls_key: PathBuf, flag "tls-key", env "REASSIGNED_TLS_KEY";
    /// CA bundle (PEM) that client certificates must chain to.
    client_ca: PathBuf, flag "client-ca", env "REASSIGNED_CLIENT_CA";
    /// Certificate revocation list for client certificates (PEM or DER);
    /// repeat the flag, or comma-separate in the environment, for several.
    client_crls: Vec<PathBuf>, flag "client-crl", env "REASSIGNED_CLIENT_CRLS",
        clap(value_delimiter = ',');
    /// Milliseconds between looks at the TLS files (certificate, key, client
    /// CA, CRLs) for changes to reload.
    tls_reload_interval_ms: u64 = defaults::TLS_RELOAD_INTERVAL_MS,
        flag "tls-reload-interval-ms", env "REASSIGNED_TLS_RELOAD_INTERVAL_MS";
    /// Redis URL (`redis://host:6379/0`); without it the embedded store is used.
    redis: String, flag "redis", env "REASSIGNED_REDIS";
    /// Redis Cluster seed nodes, comma-separated
    /// (`redis://10.0.0.1:6379,redis://10.0.0.2:6379`); instead of `redis`.
    redis_cluster: String, flag "redis-cluster", env "REASSIGNED_REDIS_CLUSTER";
    /// With `redis_cluster`: send reads to replicas.
    redis_read_from_replicas: bool = false,
        flag "redis-read-from-replicas", env "REASSIGNED_REDIS_READ_FROM_REPLICAS",
        clap(num_args = 0..=1, default_missing_value = "true");
    /// Directory of manifests for the embedded store.
    data_dir: PathBuf, flag "data-dir", env "REASSIGNED_DATA_DIR";
    /// Prefix of every Redis key.
    redis_key_prefix: String = defaults::KEY_PREFIX,
        flag "redis-key-prefix", env "REASSIGNED_REDIS_KEY_PREFIX";
    /// Timeout of each Redis call in milliseconds.
    redis_timeout_ms: u64 = defaults::REDIS_TIMEOUT_MS,
        flag "redis-timeout-ms", env "REASSIGNED_REDIS_TIMEOUT_MS";
    /// Days after `as_of` before the mirror counts as stale.
    max_staleness_days: u32 = defaults::MAX_STALENESS_DAYS,
        flag "max-staleness-days", env "REASSIGNED_MAX_STALENESS_DAYS";
    /// Most checks in one batch call (1 to 100000).
    max_batch: usize = defaults::MAX_BATCH, flag "max-batch", env "REASSIGNED_MAX_BATCH";
    /// Seconds between re-syncs of the embedded store's data directory.
    resync_interval_secs: u64 = defaults::RESYNC_INTERVAL_SECS,
        flag "resync-interval-secs", env "REASSIGNED_RESYNC_INTERVAL_SECS";
    /// TLS handshake timeout in milliseconds (from accept to completion).
    handshake_timeout_ms: u64 = defaults::HANDSHAKE_TIMEOUT_MS,
        flag "handshake-timeout-ms", env "REASSIGNED_HANDSHAKE_TIMEOUT_MS";
    /// Most TLS handshakes in progress at once; at the cap the oldest
    /// pending one is shed for each new connection.
    max_handshakes: usize = defaults::MAX_HANDSHAKES,
        flag "max-handshakes", env "REASSIGNED_MAX_HANDSHAKES";
    /// Timeout of each call in milliseconds.
    request_timeout_ms: u64 = defaults::REQUEST_TIMEOUT_MS,
        flag "request-timeout-ms", env "REASSIGNED_REQUEST_TIMEOUT_MS";
    /// Most concurrent calls (HTTP/2 streams) per connection.
    max_concurrent_streams: u32 = defaults::MAX_CONCURRENT_STREAMS,
        flag "max-concurrent-streams", env "REASSIGNED_MAX_CONCURRENT_STREAMS";
    /// Largest request message in bytes.
    max_message_bytes: usize = defaults::MAX_MESSAGE_BYTES,
        flag "max-message-bytes", env "REASSIGNED_MAX_MESSAGE_BYTES";
    /// Require certificate-bound bearer tokens. `--no-tokens`
    /// (`REASSIGNED_TOKENS=false`, `tokens = false`) serves with mTLS alone.
    tokens: bool = true, flag "no-tokens", env "REASSIGNED_TOKENS",
        clap(
            num_args = 0,
            default_missing_value = "false",
            value_parser = clap::builder::BoolishValueParser::new()
        );
    /// JWKS file (public keys, ES256 or EdDSA) that bearer tokens are verified with.
    jwks: PathBuf, flag "jwks", env "REASSIGNED_JWKS";
    /// The `iss` every bearer token must carry.
    token_issuer: String, flag "token-issuer", env "REASSIGNED_TOKEN_ISSUER";
    /// The `aud` every bearer token must carry.
    token_audience: String, flag "token-audience", env "REASSIGNED_TOKEN_AUDIENCE";
    /// Longest lifetime of a bearer token: `exp - iat` and `exp - now` may
    /// not exceed it, and tokens without `iat` are refused (`90s`, `15m`,
    /// `24h`, `7d`, plain seconds, or `off` for no limit).
    token_max_lifetime: String = span_text(defaults::TOKEN_MAX_LIFETIME_SECS),
        flag "token-max-lifetime", env "REASSIGNED_TOKEN_MAX_LIFETIME";
    /// Redis shared by all replicas for per-platform quotas (default: the
    /// store's Redis when the store is one Redis server; otherwise quotas
    /// hold per process).
    quota_redis: String, flag "quota-redis", env "REASSIGNED_QUOTA_REDIS";
    /// Timeout of each quota call to Redis in milliseconds, after which the
    /// local limiter decides.
    quota_redis_timeout_ms: u64 = defaults::QUOTA_REDIS_TIMEOUT_MS,
        flag "quota-redis-timeout-ms", env "REASSIGNED_QUOTA_REDIS_TIMEOUT_MS";
    /// While the quota Redis is down: `fail-open` (each server limits on its
    /// own, so N servers grant up to N x the limits unless
    /// `quota_expected_replicas` says N) or `fail-closed` (calls that have a
    /// limit are refused with UNAVAILABLE).
    quota_fallback: QuotaFallback = QuotaFallback::default(),
        flag "quota-fallback", env "REASSIGNED_QUOTA_FALLBACK", clap(value_enum);
    /// Servers sharing the quotas: a server deciding alone (no quota Redis,
    /// or it is down with `fail-open`) enforces 1/N of each limit.
    quota_expected_replicas: u32 = defaults::QUOTA_EXPECTED_REPLICAS,
        flag "quota-expected-replicas", env "REASSIGNED_QUOTA_EXPECTED_REPLICAS";
    /// Private key (PEM PKCS#8, ECDSA P-256 or Ed25519) that signs receipts
    /// (`want_receipt`). Without it, asking for a receipt is
    /// FAILED_PRECONDITION. Make one with `reassigned keys generate --out
    /// DIR` (it is `DIR/issuer.key`; use a key of its own, not the token
    /// issuer's).
    receipt_key: PathBuf, flag "receipt-key", env "REASSIGNED_RECEIPT_KEY";
    /// Key id (`kid`) of the receipt key (default: derived from the public
    /// key, as `keys generate` does).
    receipt_kid: String, flag "receipt-kid", env "REASSIGNED_RECEIPT_KID";
    /// Retired receipt public keys that stay published (GetSigningKeys) so
    /// that the receipts they signed still verify: `PATH@NOT_AFTER`, PATH a
    /// JWKS or JWK JSON file of public keys (as `reassigned receipt jwks`
    /// prints), NOT_AFTER the last time the key signed (`YYYY-MM-DD`, through
    /// the end of that UTC day, or `YYYY-MM-DDTHH:MM:SSZ`). Repeat the flag,
    /// or comma-separate in the environment; in the file,
    /// `[[receipt_retired_keys]]` tables with `path` and `not_after`.
    receipt_retired_keys: Vec<RetiredKeySetting>,
        flag "receipt-retired-key", env "REASSIGNED_RECEIPT_RETIRED_KEYS",
        clap(value_delimiter = ',', value_parser = parse_retired_key);
    /// File holding the secret (at least 16 bytes) that keys the number
    /// hashes of the audit trail; setting it turns the audit trail on.
    audit_secret_file: PathBuf, flag "audit-secret-file", env "REASSIGNED_AUDIT_SECRET_FILE";
    /// Redis URL of the audit stream (default: the store's Redis).
    audit_redis: String, flag "audit-redis", env "REASSIGNED_AUDIT_REDIS";
    /// Approximate most entries kept in the audit stream.
    audit_max_len: u64 = defaults::AUDIT_MAX_LEN, flag "audit-max-len", env "REASSIGNED_AUDIT_MAX_LEN";
    /// Fail calls with UNAVAILABLE when their audit record cannot be queued
    /// or the audit sink is down (false: answer, and count the drop).
    audit_mandatory: bool = false, flag "audit-mandatory", env "REASSIGNED_AUDIT_MANDATORY",
        clap(
            num_args = 0,
            default_missing_value = "true",
            value_parser = clap::builder::BoolishValueParser::new()
        );
    /// Address of the plain-HTTP admin listener (default: off): `GET
    /// /metrics` (Prometheus), `/livez` and `/readyz` (probes). Not
    /// authenticated: never expose it outside the pod or host.
    admin_listen: SocketAddr, flag "admin-listen", env "REASSIGNED_ADMIN_LISTEN";
    /// Alias of `admin_listen` (its former name, when it served only
    /// `/metrics`); if both are given they must be the same address.
    metrics_listen: SocketAddr, flag "metrics-listen", env "REASSIGNED_METRICS_LISTEN";
    /// Write one `info` line per call (log target `reassigned::access`):
    /// platform, method, code, latency, request id and a keyed hash of the
    /// number (the audit secret's key if set, else a key of this process);
    /// never the number or the token.
    access_log: bool = false, flag "access-log", env "REASSIGNED_ACCESS_LOG",
        clap(
            num_args = 0,
            default_missing_value = "true",
            value_parser = clap::builder::BoolishValueParser::new()
        );
    /// OTLP/gRPC endpoint of a trace collector (`http://127.0.0.1:4317`:
    /// plain HTTP/2 to a collector in the same pod or network; default:
    /// off): a span per call, parented by the caller's W3C `traceparent`,
    /// exported in batches in the background.
    otlp_endpoint: String, flag "otlp-endpoint", env "REASSIGNED_OTLP_ENDPOINT";
    /// Address of the REST face (CAMARA Number Recycling `POST
    /// /number-recycling/v0.2/check`, `POST /v1/numbers:batchCheck`, `GET
    /// /openapi.yaml`; default: off): HTTP/1.1 and HTTP/2 over the same
    /// mutual TLS, client CA and bearer tokens as the gRPC port.
    rest_listen: SocketAddr, flag "rest-listen", env "REASSIGNED_REST_LISTEN";
    /// Milliseconds a new connection gets to send its first byte before it
    /// is closed (at most the handshake timeout).
    handshake_first_byte_timeout_ms: u64 = defaults::HANDSHAKE_FIRST_BYTE_TIMEOUT_MS,
        flag "handshake-first-byte-timeout-ms", env "REASSIGNED_HANDSHAKE_FIRST_BYTE_TIMEOUT_MS";
    /// Most pending TLS handshakes per client IP address; at the cap the
    /// oldest of that address is shed.
    max_handshakes_per_ip: usize = defaults::MAX_HANDSHAKES_PER_IP,
        flag "max-handshakes-per-ip", env "REASSIGNED_MAX_HANDSHAKES_PER_IP";
    /// Listen backlog of the server socket, capped by the kernel's
    /// `net.core.somaxconn`.
    listen_backlog: u32 = defaults::LISTEN_BACKLOG, flag "listen-backlog", env "REASSIGNED_LISTEN_BACKLOG";
    /// Embedded store: the largest share (0.0 to 1.0) of the mirror's
    /// records a snapshot found by the background resync (or at a start,
    /// one that arrived since the last run) may remove; a snapshot
    /// removing more, or empty, is skipped and reported.
    max_shrink: f64 = defaults::MAX_SHRINK, flag "max-shrink", env "REASSIGNED_MAX_SHRINK";
    /// File holding the secret (at least 16 bytes) that keys the platforms'
    /// watch lists (HMAC-SHA-256: numbers are never stored in clear).
    /// Without it the `Watchlist` service answers FAILED_PRECONDITION.
    /// Changing it starts empty lists (see the README's "Federation").
    watch_key_file: PathBuf, flag "watch-key-file", env "REASSIGNED_WATCH_KEY_FILE";
    /// Days the events for watchers are kept: a `WatchDisconnections`
    /// cursor older than that is OUT_OF_RANGE.
    watch_retention_days: u32 = defaults::WATCH_RETENTION_DAYS,
        flag "watch-retention-days", env "REASSIGNED_WATCH_RETENTION_DAYS";
    /// Operators file (TOML): the operators that may publish
    /// disconnections, by certificate identity, with the prefixes each is
    /// authoritative for and its quarantine days (see the README's
    /// "Federation"). Reloaded when it changes. Without it every
    /// publication is refused.
    operators: PathBuf, flag "operators", env "REASSIGNED_OPERATORS";
    file only:
    /// Per-platform quotas (config file only): the `[quotas]` table with a
    /// `default` entry and entries keyed by platform id. None: unlimited.
    quotas: QuotaSettings;
    /// Webhooks (config file only): `[webhooks."<platform id>"]` tables with
    /// `url` (`http://host:port/path`), `secret_file` (16+ bytes, signs each
    /// request), optional `max_attempts` (default 6) and `backoff_ms`
    /// (default 500, doubled per retry). Needs `watch_key_file`.
    webhooks: std::collections::BTreeMap<String, WebhookSetting>;
}

impl ServeSettings {
    /// Reads a TOML file of settings (same names as the flags, with `_`).
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::File(path.to_owned(), e.to_string()))?;
        toml::from_str(&text).map_err(|e| ConfigError::File(path.to_owned(), e.to_string()))
    }

    /// These settings over the defaults, as a TOML file that `--config`
    /// reads back unchanged (`serve --dump-config`).
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        toml::to_string_pretty(&self.clone().or(ServeSettings::defaults()))
            .map_err(|e| ConfigError::Invalid("settings", e.to_string()))
    }
}

/// `secs` as a time span of [`parse_span`]: whole days, hours or minutes
/// where they fit, else seconds (`86400` is `24h`).
fn span_text(secs: u64) -> String {
    match secs {
        0 => "0s".into(),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// Parses a time span: `90s`, `15m`, `1h`, `7d`, or plain seconds.
pub fn parse_span(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 90s, 15m, 1h or 7d"))?;
    let unit_secs: u64 = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (s, m, h or d)")),
    };
    let secs = n
        .checked_mul(unit_secs)
        .ok_or_else(|| format!("{text:?} is too long"))?;
    if secs == 0 {
        return Err("the ttl must be more than 0 seconds".into());
    }
    Ok(Duration::from_secs(secs))
}

/// One platform's webhook as configured (see the `webhooks` setting).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WebhookSetting {
    /// `http://host:port/path`.
    pub url: String,
    /// The file holding the signing secret.
    pub secret_file: PathBuf,
    /// Tries per event before it counts as dead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// The first retry's wait in milliseconds, doubled per retry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_ms: Option<u64>,
}

/// The webhooks of the settings, checked (URL, secret file).
fn webhooks_config(s: &ServeSettings) -> Result<Vec<crate::federation::webhook::WebhookConfig>, ConfigError> {
    let Some(hooks) = &s.webhooks else {
        return Ok(Vec::new());
    };
    if s.watch_key_file.is_none() && !hooks.is_empty() {
        return Err(ConfigError::Invalid(
            "webhooks",
            "need watch_key_file (watch lists)".into(),
        ));
    }
    hooks
        .iter()
        .map(|(platform, hook)| {
            crate::federation::webhook::HttpUrl::parse(&hook.url)
                .map_err(|e| ConfigError::Invalid("webhooks", e))?;
            let secret_file = readable_file(hook.secret_file.clone(), "webhooks")?;
            crate::domain::hmac::read_secret(&secret_file, "webhook secret")
                .map_err(|e| ConfigError::Invalid("webhooks", format!("{platform}: {e}")))?;
            let max_attempts = hook.max_attempts.unwrap_or(6);
            if max_attempts == 0 {
                return Err(ConfigError::Invalid(
                    "webhooks",
                    format!("{platform}: max_attempts must be at least 1"),
                ));
            }
            Ok(crate::federation::webhook::WebhookConfig {
                platform: platform.clone(),
                url: hook.url.clone(),
                secret_file,
                max_attempts,
                backoff_ms: hook.backoff_ms.unwrap_or(500).max(1),
            })
        })
        .collect()
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

/// Where the bearer-token verifier finds its keys and what it expects of a
/// token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TokenConfig {
    /// The JWKS file (public keys only).
    pub jwks: PathBuf,
    /// The required `iss`.
    pub issuer: String,
    /// The required `aud`.
    pub audience: String,
    /// The longest lifetime a token may have, in seconds: `exp - iat` and
    /// `exp - now` must not exceed it (plus the verifier's leeway for the
    /// latter), and a token without `iat` is refused. `None`: no limit (and
    /// `iat` is optional).
    pub max_lifetime_secs: Option<u64>,
}

/// The default of [`TokenConfig::max_lifetime_secs`]: 24 hours.
pub const DEFAULT_MAX_LIFETIME_SECS: u64 = defaults::TOKEN_MAX_LIFETIME_SECS;

/// The validated configuration of `serve`: plain data, no runtime handles
/// (the server makes those: see `server::Handles`).
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
    pub tokens: Option<TokenConfig>,
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
    /// Address of the admin listener (`/metrics`, `/livez`, `/readyz`), from
    /// `admin_listen` or its alias `metrics_listen`; `None`: off.
    pub admin_listen: Option<SocketAddr>,
    /// One log line per call (see the `access_log` setting).
    pub access_log: bool,
    /// The OTLP/gRPC trace collector (`None`: no trace export).
    pub otlp_endpoint: Option<String>,
    /// Address of the REST face; `None`: off.
    pub rest_listen: Option<SocketAddr>,
    /// The operators file; `None`: no operator may publish.
    pub operators: Option<PathBuf>,
    /// Time a new connection gets to send its first byte, in milliseconds.
    pub handshake_first_byte_timeout_ms: u64,
    /// Pending handshake limit per client IP address.
    pub max_handshakes_per_ip: usize,
    /// Listen backlog of the server socket.
    pub listen_backlog: u32,
    /// The watch lists' key file; `None`: the `Watchlist` service is off.
    pub watch_key_file: Option<PathBuf>,
    /// Days the events for watchers are kept.
    pub watch_retention_days: u32,
    /// Platforms' webhooks.
    pub webhooks: Vec<crate::federation::webhook::WebhookConfig>,
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

/// The value of a setting after the defaults, or that it is missing (naming
/// its flag and environment variable from the table).
fn required<T>(value: Option<T>, name: &'static str) -> Result<T, ConfigError> {
    value.ok_or_else(|| match Setting::named(name) {
        Some(Setting {
            name,
            flag: Some(flag),
            env: Some(env),
            ..
        }) => ConfigError::Missing(name, flag, env),
        _ => ConfigError::Invalid(name, "missing (config file only)".into()),
    })
}

/// `take!(s.field)`: the setting `field` of `s`, or [`ConfigError::Missing`].
macro_rules! take {
    ($s:ident . $field:ident) => {
        required($s.$field.clone(), stringify!($field))
    };
}

/// `positive!(s.field)`: the setting `field` of `s`, which must be above 0.
macro_rules! positive {
    ($s:ident . $field:ident) => {
        required($s.$field.clone(), stringify!($field)).and_then(|v| {
            if v == 0 {
                Err(ConfigError::Invalid(
                    stringify!($field),
                    "must be greater than 0".into(),
                ))
            } else {
                Ok(v)
            }
        })
    };
}

/// A readable file named by setting `name`.
fn readable_file(path: PathBuf, name: &'static str) -> Result<PathBuf, ConfigError> {
    if !path.is_file() {
        return Err(ConfigError::Invalid(
            name,
            format!("{} is not a readable file", path.display()),
        ));
    }
    Ok(path)
}

/// A Redis URL (`redis://`, `rediss://` or `unix://`) of setting `name`.
fn redis_url(url: String, name: &'static str) -> Result<String, ConfigError> {
    if !(url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("unix://")) {
        return Err(ConfigError::Invalid(
            name,
            "must be a redis://, rediss:// or unix:// URL".into(),
        ));
    }
    Ok(url)
}

/// The OTLP endpoint, checked: an `http://` URL with a host (plain HTTP/2
/// to a collector in the same pod or network; it forwards with TLS).
fn otlp_endpoint(endpoint: Option<String>) -> Result<Option<String>, ConfigError> {
    let Some(endpoint) = endpoint.filter(|e| !e.trim().is_empty()) else {
        return Ok(None);
    };
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|e| ConfigError::Invalid("otlp_endpoint", format!("not a URL: {e}")))?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err(ConfigError::Invalid(
            "otlp_endpoint",
            "must be an http:// URL with a host (e.g. http://127.0.0.1:4317): a collector in the same \
             pod or network, which forwards with TLS"
                .into(),
        ));
    }
    Ok(Some(endpoint))
}

impl ServeConfig {
    /// The default listen address.
    pub const DEFAULT_LISTEN: SocketAddr = defaults::LISTEN;

    /// Validates settings over the defaults: the one place that checks
    /// them; each error names the setting.
    pub fn from_settings(s: ServeSettings) -> Result<Self, ConfigError> {
        let s = s.or(ServeSettings::defaults());
        let quotas = quota_config(&s)?;
        let tls_cert = readable_file(take!(s.tls_cert)?, "tls_cert")?;
        let tls_key = readable_file(take!(s.tls_key)?, "tls_key")?;
        let client_ca = readable_file(take!(s.client_ca)?, "client_ca")?;
        let client_crls = s
            .client_crls
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|crl| readable_file(crl, "client_crls"))
            .collect::<Result<Vec<_>, _>>()?;
        let store = store_config(&s)?;
        let tokens = token_config(&s)?;
        let receipt_retired_keys = retired_keys_config(
            s.receipt_retired_keys.clone().unwrap_or_default(),
            &s.receipt_key,
            &s.receipt_kid,
        )?;
        let (receipt_key, receipt_kid) = receipt_config(s.receipt_key.clone(), s.receipt_kid.clone())?;
        let audit = audit_config(&s, &store)?;
        let operators = s
            .operators
            .clone()
            .map(|p| readable_file(p, "operators"))
            .transpose()?;
        let handshake_timeout_ms = positive!(s.handshake_timeout_ms)?;
        let handshake_first_byte_timeout_ms = positive!(s.handshake_first_byte_timeout_ms)?;
        if handshake_first_byte_timeout_ms > handshake_timeout_ms {
            return Err(ConfigError::Invalid(
                "handshake_first_byte_timeout_ms",
                "must not exceed handshake_timeout_ms".into(),
            ));
        }
        let max_batch = take!(s.max_batch)?;
        if !(1..=100_000).contains(&max_batch) {
            return Err(ConfigError::Invalid("max_batch", "must be 1 to 100000".into()));
        }
        Ok(Self {
            quotas,
            listen: take!(s.listen)?,
            tls_cert,
            tls_key,
            client_ca,
            client_crls,
            tls_reload_interval_ms: positive!(s.tls_reload_interval_ms)?,
            store,
            max_staleness_days: take!(s.max_staleness_days)?,
            max_batch,
            handshake_timeout_ms,
            max_handshakes: positive!(s.max_handshakes)?,
            request_timeout_ms: positive!(s.request_timeout_ms)?,
            max_concurrent_streams: positive!(s.max_concurrent_streams)?,
            max_message_bytes: positive!(s.max_message_bytes)?,
            tokens,
            receipt_key,
            receipt_kid,
            receipt_retired_keys,
            audit,
            admin_listen: admin_listen(&s)?,
            access_log: take!(s.access_log)?,
            otlp_endpoint: otlp_endpoint(s.otlp_endpoint.clone())?,
            rest_listen: s.rest_listen,
            operators,
            handshake_first_byte_timeout_ms,
            max_handshakes_per_ip: positive!(s.max_handshakes_per_ip)?,
            listen_backlog: positive!(s.listen_backlog)?,
            watch_key_file: watch_key_config(s.watch_key_file.clone())?,
            watch_retention_days: positive!(s.watch_retention_days)?,
            webhooks: webhooks_config(&s)?,
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

/// The admin listener's address: `admin_listen`, or its alias
/// `metrics_listen`; both given and different is an error.
fn admin_listen(s: &ServeSettings) -> Result<Option<SocketAddr>, ConfigError> {
    match (s.admin_listen, s.metrics_listen) {
        (Some(admin), Some(metrics)) if admin != metrics => Err(ConfigError::Invalid(
            "admin_listen",
            format!(
                "{admin} differs from metrics_listen {metrics}, its alias: one admin listener serves \
                 /metrics, /livez and /readyz; give one address (or the same in both)"
            ),
        )),
        (admin, metrics) => Ok(admin.or(metrics)),
    }
}

/// Exactly one store: `redis`, `redis_cluster` or `data_dir`.
fn store_config(s: &ServeSettings) -> Result<StoreConfig, ConfigError> {
    let given = [s.redis.is_some(), s.redis_cluster.is_some(), s.data_dir.is_some()];
    if given.iter().filter(|&&g| g).count() > 1 {
        return Err(ConfigError::Invalid(
            "redis",
            "give only one of redis, redis_cluster and data_dir".into(),
        ));
    }
    // `false` is the default (and what --dump-config writes): only `true`
    // needs a cluster.
    if s.redis_read_from_replicas == Some(true) && s.redis_cluster.is_none() {
        return Err(ConfigError::Invalid(
            "redis_read_from_replicas",
            "applies to redis_cluster only".into(),
        ));
    }
    if let Some(list) = &s.redis_cluster {
        return Ok(StoreConfig::RedisCluster {
            urls: parse_cluster_urls(list)?,
            key_prefix: take!(s.redis_key_prefix)?,
            timeout_ms: positive!(s.redis_timeout_ms)?,
            read_from_replicas: take!(s.redis_read_from_replicas)?,
        });
    }
    if let Some(url) = s.redis.clone() {
        return Ok(StoreConfig::Redis {
            url: redis_url(url, "redis")?,
            key_prefix: take!(s.redis_key_prefix)?,
            timeout_ms: positive!(s.redis_timeout_ms)?,
        });
    }
    let data_dir = s.data_dir.clone().ok_or(ConfigError::Missing(
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
    Ok(StoreConfig::Embedded {
        data_dir,
        resync_interval_secs: positive!(s.resync_interval_secs)?,
        max_shrink: ShrinkLimit::new(take!(s.max_shrink)?)?,
    })
}

/// The audit trail, when `audit_secret_file` is set; the stream lives in the
/// store's Redis unless `audit_redis` says otherwise.
fn audit_config(
    s: &ServeSettings,
    store: &StoreConfig,
) -> Result<Option<crate::audit::AuditConfig>, ConfigError> {
    let Some(secret_file) = s.audit_secret_file.clone() else {
        return Ok(None);
    };
    let secret_file = readable_file(secret_file, "audit_secret_file")?;
    let store_url = match store {
        StoreConfig::Redis { url, .. } => Some(url.clone()),
        // The writer speaks to one server: a cluster needs --audit-redis.
        StoreConfig::RedisCluster { .. } | StoreConfig::Embedded { .. } => None,
    };
    let redis_url = required(s.audit_redis.clone().or(store_url), "audit_redis")?;
    Ok(Some(crate::audit::AuditConfig {
        redis_url,
        stream: format!("{}:audit", take!(s.redis_key_prefix)?),
        max_len: positive!(s.audit_max_len)?,
        mandatory: take!(s.audit_mandatory)?,
        secret_file,
    }))
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
    let redis = match s.quota_redis.clone().or_else(|| s.redis.clone()) {
        Some(url) => Some(redis_url(url, "quota_redis")?),
        None => None,
    };
    let mut config = QuotaConfig::from_settings(s.quotas.as_ref(), redis, take!(s.redis_key_prefix)?)
        .map_err(|e| ConfigError::Invalid("quotas", e.to_string()))?;
    config.redis_timeout_ms = positive!(s.quota_redis_timeout_ms)?;
    config.fallback = take!(s.quota_fallback)?;
    config.expected_replicas = positive!(s.quota_expected_replicas)?;
    Ok(config)
}

/// Tokens are on unless turned off explicitly; then the JWKS, issuer and
/// audience are required. (The JWKS itself is loaded by the server's
/// verifier, which `serve` builds before it binds.)
fn token_config(s: &ServeSettings) -> Result<Option<TokenConfig>, ConfigError> {
    if !take!(s.tokens)? {
        return Ok(None);
    }
    let max_lifetime_secs = token_max_lifetime(&take!(s.token_max_lifetime)?)?;
    let hint = |name: &'static str| -> ConfigError {
        let (flag, env) = Setting::named(name)
            .map(|s| (s.flag.unwrap_or_default(), s.env.unwrap_or_default()))
            .unwrap_or_default();
        ConfigError::Invalid(
            name,
            format!(
                "missing (flag --{flag}, environment {env}): bearer tokens are on by default; \
                 --no-tokens serves with mTLS alone"
            ),
        )
    };
    let jwks = s.jwks.clone().ok_or_else(|| hint("jwks"))?;
    let jwks = readable_file(jwks, "jwks")?;
    let issuer = s
        .token_issuer
        .clone()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| hint("token_issuer"))?;
    let audience = s
        .token_audience
        .clone()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| hint("token_audience"))?;
    Ok(Some(TokenConfig {
        jwks,
        issuer,
        audience,
        max_lifetime_secs,
    }))
}

/// `token_max_lifetime`: a time span (`24h`), or `off`.
fn token_max_lifetime(text: &str) -> Result<Option<u64>, ConfigError> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    parse_span(text)
        .map(|d| Some(d.as_secs()))
        .map_err(|e| ConfigError::Invalid("token_max_lifetime", format!("{e}, or off")))
}

/// Checks the watch key now (readable, long enough), so a bad key stops
/// `serve` before it binds.
fn watch_key_config(path: Option<PathBuf>) -> Result<Option<PathBuf>, ConfigError> {
    let Some(path) = path else {
        return Ok(None);
    };
    let path = readable_file(path, "watch_key_file")?;
    crate::domain::hmac::read_secret(&path, "watch key")
        .map_err(|e| ConfigError::Invalid("watch_key_file", e))?;
    Ok(Some(path))
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
    fn otlp_endpoints_are_plain_http_urls_with_a_host() {
        assert_eq!(otlp_endpoint(None).expect("off"), None);
        assert_eq!(otlp_endpoint(Some(" ".into())).expect("off"), None);
        assert_eq!(
            otlp_endpoint(Some("http://collector:4317".into()))
                .expect("ok")
                .as_deref(),
            Some("http://collector:4317")
        );
        for bad in ["https://collector:4317", "collector:4317", "http://", "not a url"] {
            let e = otlp_endpoint(Some(bad.into())).expect_err(bad);
            assert!(e.to_string().contains("otlp_endpoint"), "{e}");
        }
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
        let base = with_tls_files(dir.path());
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
        let default = ServeSettings::defaults().token_max_lifetime.expect("a default");
        assert_eq!(default, "24h");
        assert_eq!(token_max_lifetime(&default).expect("default"), Some(86_400));
        assert_eq!(token_max_lifetime("2h").expect("2h"), Some(7_200));
        assert_eq!(token_max_lifetime("off").expect("off"), None);
        let e = token_max_lifetime("1y").expect_err("1y");
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

    #[test]
    fn the_table_names_every_setting_once() {
        let mut names = std::collections::BTreeSet::new();
        let mut flags = std::collections::BTreeSet::new();
        let mut envs = std::collections::BTreeSet::new();
        for setting in SETTINGS {
            assert!(names.insert(setting.name), "{} twice", setting.name);
            assert!(!setting.doc.trim().is_empty(), "{} has no doc", setting.name);
            if let Some(flag) = setting.flag {
                assert!(flags.insert(flag), "flag {flag} twice");
            }
            if let Some(env) = setting.env {
                assert!(env.starts_with("REASSIGNED_"), "{env}");
                assert!(envs.insert(env), "env {env} twice");
            }
        }
        // Every field of the settings is in the table: a file naming all
        // of them (as the defaults spell them) is read.
        let all = toml::Table::try_from(ServeSettings::defaults()).expect("defaults as toml");
        for key in all.keys() {
            assert!(Setting::named(key).is_some(), "{key} is not in SETTINGS");
        }
        assert_eq!(
            Setting::named("max_batch")
                .and_then(Setting::default_text)
                .as_deref(),
            Some("1000")
        );
        assert_eq!(
            Setting::named("redis_key_prefix")
                .and_then(Setting::default_text)
                .as_deref(),
            Some("rn")
        );
        assert_eq!(Setting::named("tls_cert").and_then(Setting::default_text), None);
    }

    #[test]
    fn help_shows_the_default_from_the_table() {
        use clap::CommandFactory as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            settings: ServeSettings,
        }
        let mut command = Cli::command();
        let help = command.render_help().to_string();
        assert!(help.contains("--max-batch"), "{help}");
        assert!(help.contains("[default: 1000]"), "{help}");
        assert!(help.contains("[default: 127.0.0.1:50051]"), "{help}");
        assert!(help.contains("--no-tokens"), "{help}");
    }

    #[test]
    fn the_dump_reads_back_unchanged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("f.pem");
        std::fs::write(&file, "x").expect("write");
        let quotas: ServeSettings =
            toml::from_str("[quotas.default]\nrequests_per_second = 5\n").expect("quotas");
        let settings = ServeSettings {
            tls_cert: Some(file.clone()),
            tls_key: Some(file.clone()),
            client_ca: Some(file),
            data_dir: Some(dir.path().to_owned()),
            tokens: Some(false),
            max_batch: Some(20),
            receipt_retired_keys: Some(vec![RetiredKeySetting {
                path: "old.json".into(),
                not_after: "2026-11-30".into(),
            }]),
            ..quotas
        };
        let dumped = settings.to_toml().expect("dump");
        let read: ServeSettings = toml::from_str(&dumped).expect("the dump is a valid config file");
        assert_eq!(read.to_toml().expect("dump again"), dumped);
        assert_eq!(read.max_batch, Some(20));
        assert_eq!(read.max_staleness_days, Some(defaults::MAX_STALENESS_DAYS));
        assert_eq!(read.redis_read_from_replicas, Some(false));
        assert!(dumped.contains("requests_per_second = 5"), "{dumped}");
    }

    /// Settings naming a (dummy) TLS file in `dir` for cert, key and CA.
    fn with_tls_files(dir: &std::path::Path) -> ServeSettings {
        let file = dir.join("f.pem");
        std::fs::write(&file, "x").expect("write");
        ServeSettings {
            tls_cert: Some(file.clone()),
            tls_key: Some(file.clone()),
            client_ca: Some(file),
            ..Default::default()
        }
    }

    #[test]
    fn metrics_listen_is_an_alias_of_admin_listen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = ServeSettings {
            data_dir: Some(dir.path().to_owned()),
            tokens: Some(false),
            ..with_tls_files(dir.path())
        };
        let a: SocketAddr = "127.0.0.1:9100".parse().expect("addr");
        let b: SocketAddr = "127.0.0.1:9101".parse().expect("addr");
        let with = |admin, metrics| {
            ServeConfig::from_settings(ServeSettings {
                admin_listen: admin,
                metrics_listen: metrics,
                ..base.clone()
            })
        };
        assert_eq!(with(None, None).expect("off").admin_listen, None);
        assert_eq!(with(Some(a), None).expect("admin").admin_listen, Some(a));
        assert_eq!(with(None, Some(a)).expect("alias").admin_listen, Some(a));
        assert_eq!(with(Some(a), Some(a)).expect("same").admin_listen, Some(a));
        let e = with(Some(a), Some(b)).expect_err("two addresses");
        assert!(e.to_string().contains("metrics_listen"), "{e}");
    }

    #[test]
    fn missing_settings_name_their_flag_and_environment() {
        let e = required::<u32>(None, "max_batch").expect_err("missing");
        assert_eq!(
            e.to_string(),
            "missing setting max_batch (flag --max-batch, environment REASSIGNED_MAX_BATCH)"
        );
    }
}
