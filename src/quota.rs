//! Per-platform quotas: a request rate with a burst, and numbers checked per
//! UTC day.
//!
//! - [`QuotaLimits`] / [`QuotaSettings`]: the `[quotas]` TOML table, keyed by
//!   platform id (`default` applies to platforms not named).
//! - [`QuotaConfig`]: the validated limits per platform.
//! - [`Quotas`]: the limiter the handlers call with `(platform, requests,
//!   numbers)` at the start of each call.
//!
//! # Enforcement
//! With a quota Redis, every replica runs one atomic Lua script per call
//! ([`SCRIPT`]): GCRA over one key per platform for the rate, and an
//! `INCRBY` counter that expires at the end of the UTC day for the numbers.
//! A call is charged only if both limits allow it. The Redis call is bounded
//! by a short timeout.
//!
//! # When the quota Redis is down
//! A call that fails or times out marks the quota Redis down. While it is
//! down, calls do not try it (no call waits for the timeout): one
//! background probe PINGs it every [`PROBE_INTERVAL`] and marks it up when
//! it answers. Meanwhile the [`QuotaFallback`] policy decides:
//! - `fail-open` (default): an in-process limiter with the same rules. Each
//!   server then enforces the limits on its own, so N servers grant up to
//!   N x each limit, unless `expected_replicas` is set to N: each server then
//!   enforces 1/N of each limit (rounded up) while it decides alone.
//! - `fail-closed`: calls with a limit are refused with UNAVAILABLE (retry
//!   after [`PROBE_INTERVAL`]) until the quota Redis answers again.
//!
//! # What a call costs
//! A unary call or a batch is one request for the rate; a batch adds its
//! number of checks to the daily count. Opening a stream is one request; each
//! chunk of a stream adds its checks to the daily count (not to the rate, so
//! a fast stream is not cut by the request rate).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The `[quotas]` table entry naming the limits of platforms not listed.
pub const DEFAULT_ENTRY: &str = "default";

/// How long one quota call to Redis may take before the local limiter decides.
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(50);

/// How often the background probe PINGs a quota Redis that is down.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(500);

/// Bound of one probe PING.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// What the limiter does while the quota Redis cannot answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum QuotaFallback {
    /// Decide with the in-process limiter (limits hold per server).
    #[default]
    FailOpen,
    /// Refuse calls that have a limit with UNAVAILABLE.
    FailClosed,
}

const SECONDS_PER_DAY: u64 = 86_400;
const MIN_RATE: f64 = 0.001;
const MAX_RATE: f64 = 1e6;
const MAX_BURST: u32 = 1_000_000;

/// One entry of the `[quotas]` table, as written in the config file. Fields
/// left out of a platform's entry are taken from the `default` entry.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QuotaLimits {
    /// Sustained requests per second (may be fractional, e.g. `0.5`).
    pub requests_per_second: Option<f64>,
    /// Requests allowed at once above the sustained rate (default: the rate
    /// rounded up, at least 1). Needs `requests_per_second`.
    pub burst: Option<u32>,
    /// Numbers checked per UTC day.
    pub numbers_per_day: Option<u64>,
}

impl QuotaLimits {
    fn or(&self, lower: &QuotaLimits) -> QuotaLimits {
        QuotaLimits {
            requests_per_second: self.requests_per_second.or(lower.requests_per_second),
            burst: self.burst.or(lower.burst),
            numbers_per_day: self.numbers_per_day.or(lower.numbers_per_day),
        }
    }
}

/// The `[quotas]` table: `default` and one entry per platform id.
pub type QuotaSettings = BTreeMap<String, QuotaLimits>;

/// A validated request rate.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct RateLimit {
    /// Sustained requests per second.
    pub requests_per_second: f64,
    /// Requests allowed at once.
    pub burst: u32,
}

impl RateLimit {
    /// The GCRA emission interval (time per request), in microseconds.
    fn interval_us(&self) -> u64 {
        ((1e6 / self.requests_per_second).ceil() as u64).max(1)
    }
}

/// The validated limits of one platform; `None` is unlimited.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct PlatformLimits {
    /// The request rate.
    pub rate: Option<RateLimit>,
    /// Numbers checked per UTC day.
    pub numbers_per_day: Option<u64>,
}

impl PlatformLimits {
    fn is_unlimited(&self) -> bool {
        self.rate.is_none() && self.numbers_per_day.is_none()
    }
}

/// The validated quota configuration.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct QuotaConfig {
    /// Limits of platforms not listed in `platforms`.
    pub default: PlatformLimits,
    /// Limits per platform id (already completed from `default`).
    pub platforms: BTreeMap<String, PlatformLimits>,
    /// Redis shared by all replicas; `None`: limits hold per process.
    pub redis: Option<String>,
    /// Prefix of the quota keys in Redis.
    pub key_prefix: String,
    /// Timeout of each quota call to Redis, in milliseconds.
    pub redis_timeout_ms: u64,
    /// What happens while the quota Redis is down.
    pub fallback: QuotaFallback,
    /// Servers expected to share the limits: whenever a server decides
    /// alone (no quota Redis, or it is down with `fail-open`), it enforces
    /// 1/`expected_replicas` of each limit. At least 1.
    pub expected_replicas: u32,
}

/// Why a `[quotas]` table is refused: the entry and the reason.
#[derive(Debug, thiserror::Error)]
#[error("quotas.\"{entry}\": {reason}")]
pub struct QuotaConfigError {
    /// The table entry (`default` or a platform id).
    pub entry: String,
    /// What is wrong with it.
    pub reason: String,
}

impl QuotaConfig {
    /// Validates the `[quotas]` table (absent: unlimited).
    pub fn from_settings(
        settings: Option<&QuotaSettings>,
        redis: Option<String>,
        key_prefix: String,
    ) -> Result<Self, QuotaConfigError> {
        let empty = QuotaSettings::new();
        let settings = settings.unwrap_or(&empty);
        let default_entry = settings.get(DEFAULT_ENTRY).cloned().unwrap_or_default();
        let default = validate(DEFAULT_ENTRY, &default_entry)?;
        let mut platforms = BTreeMap::new();
        for (id, limits) in settings {
            if id == DEFAULT_ENTRY {
                continue;
            }
            if id.is_empty() {
                return Err(QuotaConfigError {
                    entry: id.clone(),
                    reason: "the platform id is empty".into(),
                });
            }
            platforms.insert(id.clone(), validate(id, &limits.or(&default_entry))?);
        }
        Ok(Self {
            default,
            platforms,
            redis,
            key_prefix,
            redis_timeout_ms: DEFAULT_REDIS_TIMEOUT.as_millis() as u64,
            fallback: QuotaFallback::FailOpen,
            expected_replicas: 1,
        })
    }

    /// True if no platform has any limit.
    pub fn is_unlimited(&self) -> bool {
        self.default.is_unlimited() && self.platforms.values().all(PlatformLimits::is_unlimited)
    }

    /// The limits of `platform`.
    pub fn limits(&self, platform: &str) -> &PlatformLimits {
        self.platforms.get(platform).unwrap_or(&self.default)
    }
}

fn validate(entry: &str, limits: &QuotaLimits) -> Result<PlatformLimits, QuotaConfigError> {
    let err = |reason: &str| QuotaConfigError {
        entry: entry.to_owned(),
        reason: reason.to_owned(),
    };
    let rate = match (limits.requests_per_second, limits.burst) {
        (None, None) => None,
        (None, Some(_)) => return Err(err("burst needs requests_per_second")),
        (Some(rps), burst) => {
            // Bounds keep every GCRA time (interval x burst) far from
            // overflow, in Rust and in Lua's doubles.
            if !(rps.is_finite() && (MIN_RATE..=MAX_RATE).contains(&rps)) {
                return Err(err("requests_per_second must be from 0.001 to 1000000"));
            }
            let burst = burst.unwrap_or_else(|| (rps.ceil() as u32).max(1));
            if !(1..=MAX_BURST).contains(&burst) {
                return Err(err("burst must be from 1 to 1000000"));
            }
            Some(RateLimit {
                requests_per_second: rps,
                burst,
            })
        }
    };
    if limits.numbers_per_day == Some(0) {
        return Err(err("numbers_per_day must be greater than 0"));
    }
    Ok(PlatformLimits {
        rate,
        numbers_per_day: limits.numbers_per_day,
    })
}

/// Which limit refused a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuotaKind {
    /// The request rate (requests per second with a burst).
    Rate,
    /// The numbers checked per UTC day.
    Daily,
    /// No limit refused it: the quota Redis is down and the policy is
    /// `fail-closed` (UNAVAILABLE, not RESOURCE_EXHAUSTED).
    StoreDown,
}

impl QuotaKind {
    /// Every kind, in the order of their counters.
    pub const ALL: [QuotaKind; 3] = [QuotaKind::Rate, QuotaKind::Daily, QuotaKind::StoreDown];

    /// The `kind` label of the refusal metrics.
    pub fn label(self) -> &'static str {
        match self {
            QuotaKind::Rate => "rate",
            QuotaKind::Daily => "daily",
            QuotaKind::StoreDown => "quota_store_down",
        }
    }
}

/// A call refused by a quota, and when to retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind:?} quota exceeded; retry after {retry_after:?}")]
pub struct QuotaExceeded {
    /// The limit that refused the call.
    pub kind: QuotaKind,
    /// How long until the call would be allowed.
    pub retry_after: Duration,
}

/// The limiter of all platforms. Cheap to share behind an [`Arc`].
pub struct Quotas {
    config: QuotaConfig,
    local: LocalLimiter,
    remote: Option<RemoteLimiter>,
    /// Calls refused, by [`QuotaKind`] (for the metrics).
    refused: [std::sync::atomic::AtomicU64; 3],
}

impl std::fmt::Debug for Quotas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quotas")
            .field("config", &self.config)
            .field("shared", &self.remote.is_some())
            .finish_non_exhaustive()
    }
}

impl Quotas {
    /// A limiter for `config`; `None` if nothing is limited. Connects to the
    /// quota Redis lazily (on the first call), so a Redis that is down at
    /// start does not stop the server.
    pub fn new(config: QuotaConfig) -> Result<Option<Arc<Self>>, redis::RedisError> {
        if config.is_unlimited() {
            return Ok(None);
        }
        let remote = match &config.redis {
            Some(url) => Some(RemoteLimiter::new(
                url,
                &config.key_prefix,
                Duration::from_millis(config.redis_timeout_ms),
            )?),
            None => None,
        };
        Ok(Some(Arc::new(Self {
            config,
            local: LocalLimiter::default(),
            remote,
            refused: Default::default(),
        })))
    }

    /// Charges `platform` with `requests` requests (rate) and `numbers`
    /// numbers (daily count), or refuses without charging anything.
    pub async fn check(&self, platform: &str, requests: u32, numbers: u64) -> Result<(), QuotaExceeded> {
        let verdict = self.decide(platform, requests, numbers).await;
        if let Err(refusal) = &verdict {
            self.refused[refusal.kind as usize].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        verdict
    }

    /// Calls refused so far by `kind`.
    pub fn refused(&self, kind: QuotaKind) -> u64 {
        self.refused[kind as usize].load(std::sync::atomic::Ordering::Relaxed)
    }

    /// [`Quotas::check`] without counting refusals.
    async fn decide(&self, platform: &str, requests: u32, numbers: u64) -> Result<(), QuotaExceeded> {
        let limits = self.config.limits(platform);
        let rate = limits.rate.filter(|_| requests > 0);
        let daily = limits.numbers_per_day.filter(|_| numbers > 0);
        if rate.is_none() && daily.is_none() {
            return Ok(());
        }
        let charge = Charge {
            rate,
            requests,
            daily,
            numbers,
        };
        if let Some(remote) = &self.remote {
            if let Some(verdict) = remote.check(platform, &charge).await {
                return verdict;
            }
            if self.config.fallback == QuotaFallback::FailClosed {
                return Err(QuotaExceeded {
                    kind: QuotaKind::StoreDown,
                    retry_after: PROBE_INTERVAL,
                });
            }
        }
        let charge = charge.share(self.config.expected_replicas);
        self.local
            .check(platform, &charge, Instant::now(), SystemTime::now())
    }

    /// Whether the quota Redis is known to be down (calls are decided by
    /// the fallback without trying it). False without a quota Redis.
    pub fn shared_store_down(&self) -> bool {
        self.remote
            .as_ref()
            .is_some_and(|r| r.health.down.load(Ordering::Relaxed))
    }
}

/// What one call asks of one platform's limits.
#[derive(Clone, Copy, Debug)]
struct Charge {
    rate: Option<RateLimit>,
    requests: u32,
    daily: Option<u64>,
    numbers: u64,
}

impl Charge {
    /// The charge against this server's share of the limits when `replicas`
    /// servers decide alone: each limit divided by `replicas`, rounded up.
    fn share(self, replicas: u32) -> Charge {
        if replicas <= 1 {
            return self;
        }
        Charge {
            rate: self.rate.map(|r| RateLimit {
                requests_per_second: (r.requests_per_second / f64::from(replicas)).max(MIN_RATE),
                burst: r.burst.div_ceil(replicas).max(1),
            }),
            daily: self.daily.map(|d| d.div_ceil(u64::from(replicas)).max(1)),
            ..self
        }
    }
}

/// Seconds since the epoch of `now`, and the time left until the next UTC
/// midnight.
fn day_and_rest(now: SystemTime) -> (u64, Duration) {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let day = since.as_secs() / SECONDS_PER_DAY;
    let end = Duration::from_secs((day + 1) * SECONDS_PER_DAY);
    (day, end.saturating_sub(since))
}

/// The in-process limiter: the same GCRA and daily count as [`SCRIPT`].
#[derive(Default)]
struct LocalLimiter {
    state: Mutex<HashMap<String, LocalState>>,
}

#[derive(Clone, Copy, Debug, Default)]
struct LocalState {
    /// GCRA theoretical arrival time.
    tat: Option<Instant>,
    /// The UTC day `used` counts for.
    day: u64,
    /// Numbers checked on `day`.
    used: u64,
}

impl LocalLimiter {
    fn check(
        &self,
        platform: &str,
        charge: &Charge,
        now: Instant,
        wall: SystemTime,
    ) -> Result<(), QuotaExceeded> {
        let mut map = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // No allocation on the hot path: the id is copied only once.
        if !map.contains_key(platform) {
            map.insert(platform.to_owned(), LocalState::default());
        }
        let Some(state) = map.get_mut(platform) else {
            return Ok(());
        };
        let mut refusal: Option<QuotaExceeded> = None;
        let mut refuse = |kind, retry_after: Duration| {
            if refusal.is_none_or(|r| r.retry_after < retry_after) {
                refusal = Some(QuotaExceeded { kind, retry_after });
            }
        };

        let mut new_tat = None;
        if let Some(rate) = charge.rate {
            let interval = Duration::from_micros(rate.interval_us());
            let tat = state.tat.map_or(now, |t| t.max(now));
            let next = tat + interval * charge.requests;
            let allow_at = next.checked_sub(interval * rate.burst).unwrap_or(now);
            if allow_at > now {
                refuse(QuotaKind::Rate, allow_at - now);
            }
            new_tat = Some(next);
        }
        let (day, rest) = day_and_rest(wall);
        if state.day != day {
            state.day = day;
            state.used = 0;
        }
        if let Some(limit) = charge.daily
            && state.used.saturating_add(charge.numbers) > limit
        {
            refuse(QuotaKind::Daily, rest);
        }
        if let Some(refusal) = refusal {
            return Err(refusal);
        }
        if new_tat.is_some() {
            state.tat = new_tat;
        }
        if charge.daily.is_some() {
            state.used += charge.numbers;
        }
        Ok(())
    }
}

/// The quota script. KEYS: the rate key, the daily key (same hash tag).
/// ARGV: emission interval in µs (0: no rate limit), burst, requests charged,
/// daily limit (-1: none), numbers charged. Returns `{verdict, retry_µs}`:
/// 0 allowed (and charged), 1 refused by the rate, 2 refused by the daily
/// limit (when both refuse, the longer wait wins). Times come from the Redis
/// clock (`TIME`), so all replicas agree.
pub const SCRIPT: &str = r#"
local t = redis.call('TIME')
local sec = tonumber(t[1])
local now = sec * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local requests = tonumber(ARGV[3])
local day_limit = tonumber(ARGV[4])
local numbers = tonumber(ARGV[5])
local verdict, wait = 0, 0
local new_tat = nil
if interval > 0 and requests > 0 then
  local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
  if tat < now then tat = now end
  new_tat = tat + interval * requests
  local allow_at = new_tat - interval * burst
  if allow_at > now then
    verdict, wait = 1, allow_at - now
  end
end
local day_end = (math.floor(sec / 86400) + 1) * 86400
if day_limit >= 0 and numbers > 0 then
  local used = tonumber(redis.call('GET', KEYS[2]) or '0')
  if used + numbers > day_limit then
    local until_midnight = (day_end - sec) * 1000000 - tonumber(t[2])
    if until_midnight > wait then
      verdict, wait = 2, until_midnight
    end
  end
end
if verdict ~= 0 then
  return {verdict, string.format('%.0f', wait)}
end
if new_tat then
  local ttl_ms = math.ceil((new_tat - now) / 1000) + 1
  redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', string.format('%.0f', ttl_ms))
end
if day_limit >= 0 and numbers > 0 then
  redis.call('INCRBY', KEYS[2], numbers)
  redis.call('EXPIREAT', KEYS[2], string.format('%.0f', day_end))
end
return {0, '0'}
"#;

/// The shared limiter: [`SCRIPT`] on the quota Redis, under a timeout.
struct RemoteLimiter {
    conn: ConnectionManager,
    script: redis::Script,
    prefix: String,
    timeout: Duration,
    health: Arc<Health>,
    /// The background probe (aborted on drop); `None` outside a runtime.
    probe: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for RemoteLimiter {
    fn drop(&mut self) {
        if let Some(probe) = &self.probe {
            probe.abort();
        }
    }
}

/// Whether the quota Redis is known to be down.
#[derive(Debug, Default)]
struct Health {
    down: AtomicBool,
}

/// While the quota Redis is down, PINGs it every [`PROBE_INTERVAL`] (one
/// probe at a time) and marks it up when it answers. Ends when the limiter
/// is gone.
async fn probe_loop(health: std::sync::Weak<Health>, mut conn: ConnectionManager) {
    let mut tick = tokio::time::interval(PROBE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(health) = health.upgrade() else {
            return;
        };
        if !health.down.load(Ordering::Relaxed) {
            continue;
        }
        let ping = redis::cmd("PING");
        if let Ok(Ok(())) = tokio::time::timeout(PROBE_TIMEOUT, ping.query_async::<()>(&mut conn)).await {
            health.down.store(false, Ordering::Relaxed);
            tracing::info!("quota redis answers again; quotas are shared again");
        }
    }
}

impl RemoteLimiter {
    fn new(url: &str, prefix: &str, timeout: Duration) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(1)))
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_lazy_with_config(client, config)?;
        let script = redis::Script::new(SCRIPT);
        // Connect and load the script now, so the first calls fit in the
        // short timeout (EVALSHA, NOSCRIPT, LOAD, EVALSHA would not).
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (mut conn, script) = (conn.clone(), script.clone());
            runtime.spawn(async move {
                if let Err(e) = script.load_async(&mut conn).await {
                    tracing::warn!(error = %e, "quota redis: cannot load the quota script yet");
                }
            });
        }
        let health = Arc::new(Health::default());
        let probe = tokio::runtime::Handle::try_current()
            .ok()
            .map(|runtime| runtime.spawn(probe_loop(Arc::downgrade(&health), conn.clone())));
        Ok(Self {
            conn,
            script,
            prefix: prefix.to_owned(),
            timeout,
            health,
            probe,
        })
    }

    /// The verdict of Redis, or `None` if Redis failed or was too slow.
    async fn check(&self, platform: &str, charge: &Charge) -> Option<Result<(), QuotaExceeded>> {
        if self.health.down.load(Ordering::Relaxed) {
            return None;
        }
        // The platform id is hashed: keys stay short and free of odd bytes.
        // The hash tag keeps both keys in one cluster slot.
        let tag = hex::encode(&Sha256::digest(platform.as_bytes())[..12]);
        let mut invocation = self.script.key(format!("{}:quota:{{{tag}}}:rate", self.prefix));
        invocation
            .key(format!("{}:quota:{{{tag}}}:day", self.prefix))
            .arg(charge.rate.map_or(0, |r| r.interval_us()))
            .arg(charge.rate.map_or(0, |r| r.burst))
            .arg(charge.requests)
            .arg(charge.daily.map_or(-1, |d| i64::try_from(d).unwrap_or(i64::MAX)))
            .arg(charge.numbers);
        let mut conn = self.conn.clone();
        let result =
            tokio::time::timeout(self.timeout, invocation.invoke_async::<(i64, i64)>(&mut conn)).await;
        let failure = match result {
            Ok(Ok((0, _))) => return Some(Ok(())),
            Ok(Ok((verdict, wait_us))) if verdict == 1 || verdict == 2 => {
                let kind = if verdict == 1 {
                    QuotaKind::Rate
                } else {
                    QuotaKind::Daily
                };
                let retry_after = Duration::from_micros(u64::try_from(wait_us).unwrap_or(0).max(1));
                return Some(Err(QuotaExceeded { kind, retry_after }));
            }
            Ok(Ok((verdict, _))) => format!("unexpected script verdict {verdict}"),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {:?}", self.timeout),
        };
        // Without a probe (no runtime) nobody would mark it up again: then
        // each call keeps trying Redis.
        if self.probe.is_some() && !self.health.down.swap(true, Ordering::Relaxed) {
            tracing::warn!(error = %failure, "quota redis failed; the fallback policy decides until it answers again");
        }
        None
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn config(toml_text: &str) -> Result<QuotaConfig, QuotaConfigError> {
        #[derive(Deserialize)]
        struct File {
            quotas: QuotaSettings,
        }
        let file: File = toml::from_str(toml_text).unwrap();
        QuotaConfig::from_settings(Some(&file.quotas), None, "rn".into())
    }

    #[test]
    fn platform_entries_inherit_from_default() {
        let c = config(
            r#"
            [quotas.default]
            requests_per_second = 1000
            burst = 2000
            numbers_per_day = 10000000
            [quotas."spiffe://dev.reassigned/platform-b"]
            requests_per_second = 5
            burst = 5
            "#,
        )
        .unwrap();
        let b = c.limits("spiffe://dev.reassigned/platform-b");
        assert_eq!(b.rate.unwrap().burst, 5);
        assert_eq!(b.numbers_per_day, Some(10_000_000));
        assert_eq!(c.limits("other").rate.unwrap().burst, 2000);
    }

    #[test]
    fn bad_limits_are_refused() {
        for bad in [
            "[quotas.a]\nrequests_per_second = 0\n",
            "[quotas.a]\nrequests_per_second = -1\n",
            "[quotas.a]\nrequests_per_second = 0.0001\n",
            "[quotas.a]\nrequests_per_second = 1\nburst = 1000001\n",
            "[quotas.a]\nburst = 3\n",
            "[quotas.a]\nrequests_per_second = 1\nburst = 0\n",
            "[quotas.a]\nnumbers_per_day = 0\n",
        ] {
            let e = config(bad).expect_err(bad);
            assert!(e.to_string().contains("quotas.\"a\""), "{e}");
        }
        let unknown: Result<QuotaSettings, _> = toml::from_str("[a]\nrequests_per_secnd = 1\n");
        assert!(unknown.is_err());
    }

    #[test]
    fn no_table_is_unlimited() {
        let c = QuotaConfig::from_settings(None, None, "rn".into()).unwrap();
        assert!(c.is_unlimited());
        assert!(Quotas::new(c).unwrap().is_none());
    }

    #[test]
    fn local_gcra_allows_the_burst_then_refuses_until_the_interval() {
        let limiter = LocalLimiter::default();
        let charge = Charge {
            rate: Some(RateLimit {
                requests_per_second: 2.0,
                burst: 3,
            }),
            requests: 1,
            daily: None,
            numbers: 1,
        };
        let t0 = Instant::now();
        let wall = SystemTime::now();
        for _ in 0..3 {
            limiter.check("p", &charge, t0, wall).unwrap();
        }
        let refused = limiter.check("p", &charge, t0, wall).unwrap_err();
        assert_eq!(refused.kind, QuotaKind::Rate);
        assert_eq!(refused.retry_after, Duration::from_millis(500));
        // Another platform has its own budget.
        limiter.check("q", &charge, t0, wall).unwrap();
        // After the retry delay, one more request fits.
        let later = t0 + refused.retry_after;
        limiter.check("p", &charge, later, wall).unwrap();
        assert!(limiter.check("p", &charge, later, wall).is_err());
    }

    #[test]
    fn a_share_divides_each_limit_rounding_up() {
        let charge = Charge {
            rate: Some(RateLimit {
                requests_per_second: 10.0,
                burst: 5,
            }),
            requests: 1,
            daily: Some(7),
            numbers: 1,
        };
        let half = charge.share(2);
        let rate = half.rate.unwrap();
        assert_eq!((rate.requests_per_second, rate.burst), (5.0, 3));
        assert_eq!(half.daily, Some(4));
        assert_eq!(charge.share(100).rate.unwrap().burst, 1);
        assert_eq!(charge.share(1).daily, Some(7));
    }

    #[test]
    fn local_daily_count_refuses_without_charging_and_resets_at_midnight() {
        let limiter = LocalLimiter::default();
        let charge = Charge {
            rate: None,
            requests: 1,
            daily: Some(15),
            numbers: 10,
        };
        let now = Instant::now();
        let wall = UNIX_EPOCH + Duration::from_secs(20_000 * SECONDS_PER_DAY + 3600);
        limiter.check("p", &charge, now, wall).unwrap();
        let refused = limiter.check("p", &charge, now, wall).unwrap_err();
        assert_eq!(refused.kind, QuotaKind::Daily);
        assert_eq!(refused.retry_after, Duration::from_secs(SECONDS_PER_DAY - 3600));
        let small = Charge { numbers: 5, ..charge };
        limiter.check("p", &small, now, wall).unwrap();
        let tomorrow = wall + Duration::from_secs(SECONDS_PER_DAY);
        limiter.check("p", &charge, now, tomorrow).unwrap();
    }
}
