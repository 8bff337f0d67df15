//! Transport: the TLS acceptor and the tower layers in front of the handlers,
//! health, reflection, and [`run`], which serves until a shutdown future
//! resolves.

pub mod accept;
pub mod admin;
pub mod auth;
pub mod limits;
pub mod metrics;
pub mod reload;
pub mod rest_port;
pub mod revoke;
pub mod sync_metrics;
pub mod tls;
pub mod token;
pub mod trace;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::Server;
use tonic_health::server::HealthReporter;
use tower::layer::util::{Identity, Stack};

use crate::api::feed::FeedService;
use crate::api::pb::disconnection_feed_server::DisconnectionFeedServer;
use crate::api::pb::reassigned_numbers_server::ReassignedNumbersServer;
use crate::api::pb::watchlist_server::WatchlistServer;
use crate::api::{ReassignedService, ServiceOptions, WatchlistService, pb};
use crate::config::ServeConfig;
use crate::federation::Federation;
use crate::federation::operators::Operators;
use crate::federation::overlay::OverlayStore;
use crate::store::{AnyStore, Store};

/// The least time in-flight calls get to finish after a shutdown signal (the
/// per-call timeout, if longer, is used instead).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// HTTP/2 keepalive pings on idle connections.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// How often health re-checks the store.
const HEALTH_INTERVAL: Duration = Duration::from_millis(500);

/// Health turns NOT_SERVING for an unreachable store only after this many
/// failed checks in a row...
const HEALTH_FAILURES: u32 = 3;
/// ... spanning at least this long (one slow check, or one shard failing
/// over, must not pull every server out of a load balancer at once).
const HEALTH_GRACE: Duration = Duration::from_secs(2);

/// The runtime handles of a server: made by the caller (or by [`run`]) and
/// kept to watch or steer the server while it runs. The configuration
/// ([`ServeConfig`]) is plain data; these are the live parts.
#[derive(Clone, Default)]
pub struct Handles {
    /// Reloads the TLS material of the server (SIGHUP in `reassigned serve`).
    pub reload: reload::ReloadHandle,
    /// Request counters, handshake counters and the bound metrics address.
    pub metrics: metrics::MetricsHandle,
    /// Counters of the audit trail.
    pub audit_stats: Arc<crate::audit::AuditStats>,
    /// Counters of delivery to watchers (webhooks).
    pub delivery_stats: Arc<crate::federation::deliver::DeliveryStats>,
    /// The address of the REST face once bound (with `rest_listen`).
    pub rest: BoundAddr,
}

/// The address a listener of the server is bound to, once it is (useful
/// with port 0): published by the server, awaited by whoever needs it.
#[derive(Clone)]
pub struct BoundAddr(Arc<watch::Sender<Option<std::net::SocketAddr>>>);

impl Default for BoundAddr {
    fn default() -> Self {
        Self(Arc::new(watch::channel(None).0))
    }
}

impl std::fmt::Debug for BoundAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", *self.0.borrow())
    }
}

impl BoundAddr {
    /// Publishes the bound address.
    pub fn publish(&self, addr: std::net::SocketAddr) {
        self.0.send_replace(Some(addr));
    }

    /// The bound address, waiting until it is published (forever if the
    /// listener is off: put a timeout on it).
    pub async fn wait(&self) -> std::net::SocketAddr {
        let mut rx = self.0.subscribe();
        loop {
            if let Some(addr) = *rx.borrow_and_update() {
                return addr;
            }
            if rx.changed().await.is_err() {
                // The sender lives in `self`: unreachable, but never spin.
                std::future::pending::<()>().await;
            }
        }
    }
}

/// The token verifier of `config` (`None`: tokens off), its JWKS loaded
/// now: a bad JWKS fails here, before anything is bound.
pub fn load_tokens(config: &ServeConfig) -> anyhow::Result<Option<Arc<token::TokenVerifier>>> {
    Ok(match &config.tokens {
        Some(tokens) => Some(Arc::new(token::TokenVerifier::load(tokens.clone())?)),
        None => None,
    })
}

/// Limits of the transport: the accept loop's and tonic's. From a
/// [`ServeConfig`], or the defaults of `serve`'s settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The accept loop (handshakes).
    pub accept: accept::AcceptOptions,
    /// The per-call timeout.
    pub request_timeout: Duration,
    /// Concurrent calls per connection.
    pub max_concurrent_streams: u32,
}

impl Default for Limits {
    /// The defaults of `serve`'s settings.
    fn default() -> Self {
        use crate::config::defaults;
        Self {
            accept: accept::AcceptOptions::default(),
            request_timeout: Duration::from_millis(defaults::REQUEST_TIMEOUT_MS),
            max_concurrent_streams: defaults::MAX_CONCURRENT_STREAMS,
        }
    }
}

impl From<&ServeConfig> for Limits {
    fn from(config: &ServeConfig) -> Self {
        Self {
            accept: accept::AcceptOptions::from(config),
            request_timeout: config.request_timeout(),
            max_concurrent_streams: config.max_concurrent_streams,
        }
    }
}

/// The layers every call passes, outermost first: counting
/// ([`metrics::CountLayer`]), revocation tracking ([`revoke::TrackLayer`]),
/// authentication ([`auth::AuthLayer`]).
pub type Layers = Stack<auth::AuthLayer, Stack<revoke::TrackLayer, Stack<metrics::CountLayer, Identity>>>;

/// The server's transport, shared by [`run`] and the bare benchmark server
/// (`reassigned bench-bare`): TLS termination over `listener` with the
/// accept loop's limits (handshakes counted into `metrics`), and tonic's
/// server with the per-call timeout, the stream limit, keepalive and
/// [`Layers`]; `tokens` `None` serves with mTLS alone. Add the services to
/// the returned builder, then serve the returned connections.
pub fn transport(
    listener: TcpListener,
    tls: impl Into<tls::SharedServerConfig>,
    limits: Limits,
    metrics: &metrics::MetricsHandle,
    tokens: Option<Arc<token::TokenVerifier>>,
) -> (Server<Layers>, accept::TlsIncoming) {
    let incoming = accept::incoming_counted(listener, tls, limits.accept, metrics.handshakes());
    let server = Server::builder()
        .timeout(limits.request_timeout)
        .max_concurrent_streams(limits.max_concurrent_streams)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .layer(metrics::CountLayer(metrics.clone()))
        .layer(revoke::TrackLayer)
        .layer(auth::AuthLayer::with_tokens(tokens).counting(metrics.refusals()));
    (server, incoming)
}

/// Serves the API on `listener` (already bound) until `shutdown` resolves,
/// then flips health to NOT_SERVING and lets in-flight calls finish.
///
/// With `config.tokens`, every call but health and reflection needs a
/// certificate-bound bearer token verified with that JWKS (see [`token`]).
/// The handles are made here and not returned: see [`run_with`].
pub async fn run<F>(
    listener: TcpListener,
    config: ServeConfig,
    store: AnyStore,
    shutdown: F,
) -> anyhow::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let tokens = load_tokens(&config)?;
    run_with(listener, config, store, Handles::default(), tokens, shutdown).await
}

/// [`run`] with the caller's [`Handles`] and token verifier (the caller
/// keeps them, e.g. to call [`token::TokenVerifier::reload`] or read the
/// metrics); `config.tokens` is not read. `None` serves with mTLS alone.
/// The verifier re-reads its JWKS when the file changes
/// ([`token::spawn_reload`]) and on every explicit reload of the server
/// (SIGHUP in `reassigned serve`, see [`reload`]).
pub async fn run_with<F>(
    listener: TcpListener,
    config: ServeConfig,
    store: AnyStore,
    handles: Handles,
    tokens: Option<Arc<token::TokenVerifier>>,
    shutdown: F,
) -> anyhow::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let token_reload = tokens.clone().map(token::spawn_reload);
    // TLS material, reloaded for new connections on a file change, on
    // `handles.reload` and (in the binary) on SIGHUP; see [`reload`].
    let mut reloader = reload::Reloader::load(
        tls::TlsFiles {
            cert: config.tls_cert.clone(),
            key: config.tls_key.clone(),
            client_ca: config.client_ca.clone(),
        },
        config.client_crls.clone(),
    )?;
    if let Some(verifier) = tokens.clone() {
        // An explicit reload re-reads the JWKS too (its own task already
        // follows file changes).
        reloader = reloader.with_hook("jwks", move || Ok(verifier.reload()?));
    }
    let operators = Arc::new(match &config.operators {
        Some(path) => Operators::load(path)?,
        None => Operators::none(),
    });
    {
        // An explicit reload re-reads the operators file too (a task of its
        // own follows its changes).
        let operators = operators.clone();
        reloader = reloader.with_hook("operators", move || Ok(operators.reload()?));
    }
    let reloader = std::sync::Arc::new(reloader);
    let _reload_attached = handles.reload.attach(reloader.clone());
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let (stop_tx, stop_rx) = watch::channel(false);
    let _tls_watch = reload::AbortOnDrop(tokio::spawn(reload::watch_files(
        reloader.clone(),
        config.tls_reload_interval(),
        stop_rx.clone(),
    )));
    let quotas = crate::quota::Quotas::new(config.quotas.clone())?;
    let observer = trace::Observer::start_with(
        config.access_log,
        config.otlp_endpoint.as_deref(),
        match &config.audit {
            // The audit trail's key, so access log and audit hashes match.
            Some(audit) => crate::audit::NumberKey::from_secret_file(&audit.secret_file)?,
            None => crate::audit::NumberKey::random(),
        },
    )?;
    if let Some(observer) = observer {
        handles.metrics.observe_with(observer);
    }
    let readiness = admin::Readiness::default();
    let admin_task = match config.admin_listen {
        Some(addr) => Some(
            admin::serve(
                addr,
                handles.metrics.clone(),
                metrics::Sources {
                    store: store.clone(),
                    audit: handles.audit_stats.clone(),
                    delivery: handles.delivery_stats.clone(),
                    max_staleness_days: config.max_staleness_days,
                    quotas: quotas.clone(),
                    tls: Some(reloader.clone()),
                },
                readiness.clone(),
            )
            .await?,
        ),
        None => None,
    };
    let stop_rx_federation = stop_rx.clone();
    let health_task = tokio::spawn(watch_health(
        store.clone(),
        reporter.clone(),
        handles.metrics.clone(),
        readiness.clone(),
        stop_rx.clone(),
    ));

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let receipts = receipt_signer(&config)?;
    let audit = match &config.audit {
        Some(audit) => {
            let auditor = crate::audit::Auditor::start(audit, handles.audit_stats.clone())?;
            tracing::info!(stream = %audit.stream, mandatory = audit.mandatory, "audit trail: on");
            Some(std::sync::Arc::new(auditor))
        }
        None => None,
    };
    let federation = Arc::new(open_federation(&config, &store, operators).await?);
    // Load the publications in force before answering (bounded: a store
    // that cannot answer now is retried by the follower, and lookups say
    // UNAVAILABLE until it has).
    let loaded = tokio::time::timeout(
        config.request_timeout(),
        crate::federation::overlay::load(&federation.log, &federation.overlay),
    )
    .await
    .ok()
    .and_then(Result::ok);
    let _follow = reload::AbortOnDrop(tokio::spawn(crate::federation::overlay::follow_from(
        federation.log.clone(),
        federation.overlay.clone(),
        loaded,
        stop_rx_federation,
    )));
    let _operators_watch = federation.operators.path().map(|path| {
        reload::AbortOnDrop(tokio::spawn(watch_operators(
            federation.operators.clone(),
            path.to_owned(),
            config.tls_reload_interval(),
        )))
    });
    let feed = DisconnectionFeedServer::new(FeedService::new(federation.clone(), audit.clone()))
        .max_decoding_message_size(config.max_message_bytes.max(FEED_MAX_MESSAGE_BYTES));
    let event_log = federation.log.clone();
    let _retention = reload::AbortOnDrop(tokio::spawn(trim_log(
        event_log.clone(),
        config.watch_retention_days,
    )));
    let retention = Duration::from_secs(u64::from(config.watch_retention_days) * 86_400);
    let watch_lists = watch_lists(&config, &store)?;
    // Followers of the log's tips (one per shard) only when someone can watch.
    let tips = watch_lists
        .as_ref()
        .map(|_| crate::federation::deliver::Tips::start(event_log.clone(), stop_rx.clone()));
    if let (Some(lists), Some(tips)) = (&watch_lists, &tips) {
        let cursors = match (&store, &config.store) {
            (AnyStore::Redis(redis), _) => crate::federation::webhook::CursorStore::Redis(redis.clone()),
            (_, crate::config::StoreConfig::Embedded { data_dir, .. }) => {
                crate::federation::webhook::CursorStore::Dir(data_dir.clone())
            }
            (AnyStore::Embedded(_), _) => {
                anyhow::bail!("webhooks of an embedded store need a data directory")
            }
        };
        crate::federation::webhook::start(
            &config.webhooks,
            &crate::federation::webhook::SenderParts {
                log: event_log.clone(),
                lists: lists.clone(),
                tips: tips.clone(),
                cursors,
                stats: handles.delivery_stats.clone(),
                retention,
            },
            stop_rx.clone(),
        )?;
    } else if !config.webhooks.is_empty() {
        anyhow::bail!("webhooks need watch lists: set watch_key_file");
    }
    let watchlist = WatchlistServer::new(
        WatchlistService::new(
            watch_lists,
            tips.map(|tips| (event_log.clone(), tips)),
            handles.delivery_stats.clone(),
            retention,
        )
        .with_stop(stop_rx.clone()),
    )
    .max_decoding_message_size(config.max_message_bytes);
    let api = ReassignedService::new(
        OverlayStore::new(store, federation.overlay.clone()),
        ServiceOptions {
            max_batch: config.max_batch,
            max_staleness_days: config.max_staleness_days,
            quotas,
        },
    )
    .with_receipts(receipts)
    .with_audit(audit)
    .with_federation(Some(federation.clone()));
    let rest_task = match config.rest_listen {
        Some(addr) => Some(reload::AbortOnDrop(
            rest_port::serve(
                rest_port::RestPort {
                    addr,
                    tls: reloader.tls().shared_config(),
                    accept: accept::AcceptOptions::from(&config),
                    handshakes: handles.metrics.handshakes(),
                    max_concurrent_streams: config.max_concurrent_streams,
                    drain: DRAIN_TIMEOUT.max(config.request_timeout()),
                    metrics: handles.metrics.clone(),
                },
                crate::rest::RestFace::new(
                    api.clone(),
                    tokens.clone().map(|t| t as Arc<dyn crate::rest::TokenCheck>),
                    config.max_message_bytes,
                    config.request_timeout(),
                ),
                &handles.rest,
                stop_rx.clone(),
            )
            .await?,
        )),
        None => None,
    };
    let service = ReassignedNumbersServer::new(api).max_decoding_message_size(config.max_message_bytes);

    let (mut server, incoming) = transport(
        listener,
        reloader.tls().shared_config(),
        Limits::from(&config),
        &handles.metrics,
        tokens,
    );
    let _log_summaries = reload::AbortOnDrop(tokio::spawn(async {
        // Summaries of suppressed log lines, also when a flood stops.
        let mut ticks = tokio::time::interval(Duration::from_secs(1));
        loop {
            ticks.tick().await;
            crate::lograte::global().flush();
        }
    }));
    let drain_reporter = reporter.clone();
    let drain_readiness = readiness.clone();
    let (draining_tx, draining_rx) = tokio::sync::oneshot::channel::<()>();
    let on_shutdown = async move {
        shutdown.await;
        tracing::info!("shutting down: health is NOT_SERVING, draining in-flight calls");
        let _ = stop_tx.send(true);
        drain_readiness.set_draining();
        set_serving(&drain_reporter, false).await;
        let _ = draining_tx.send(());
    };
    let serve = server
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service)
        .add_service(feed)
        .add_service(watchlist)
        .serve_with_incoming_shutdown(incoming, on_shutdown);
    // The drain is bounded: a stream whose client stopped reading (or a
    // client that never hangs up) must not hold the process forever.
    let drain_limit = DRAIN_TIMEOUT.max(config.request_timeout());
    tokio::select! {
        served = serve => served?,
        () = async {
            if draining_rx.await.is_err() {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(drain_limit).await;
        } => {
            tracing::warn!(after = ?drain_limit, "drain timed out: closing the remaining connections");
        }
    }
    health_task.abort();
    if let Some(mut rest) = rest_task {
        // The REST port drains on its own (stopped with the gRPC port,
        // bounded by the same limit): let it finish, so its calls' spans
        // are queued before the flush below.
        let _ = tokio::time::timeout(drain_limit, &mut rest.0).await;
    }
    flush_traces(&handles.metrics).await;
    drop(admin_task);
    if let Some(task) = token_reload {
        task.abort();
    }
    tracing::info!("stopped");
    Ok(())
}

/// Sends the spans still queued for export (the last calls' spans, made
/// just before the shutdown) to the collector, waiting at most
/// [`trace::SHUTDOWN_FLUSH_TIMEOUT`]: a collector that is down or stalled
/// delays the exit by that much at most.
async fn flush_traces(metrics: &metrics::MetricsHandle) {
    let Some(observer) = metrics.observer().filter(|o| o.exports()) else {
        return;
    };
    match observer.flush(trace::SHUTDOWN_FLUSH_TIMEOUT).await {
        trace::Flushed::Done => tracing::info!(
            exported = observer.stats().exported(),
            dropped = observer.stats().dropped(),
            "traces: queued spans flushed"
        ),
        trace::Flushed::TimedOut { queued } => tracing::warn!(
            queued,
            after = ?trace::SHUTDOWN_FLUSH_TIMEOUT,
            "traces: the collector did not take the queued spans in time; they are dropped"
        ),
    }
}

/// Largest PublishDisconnections request: 10,000 items of at most a
/// 128-character event id, a number and a date, with room to spare.
pub const FEED_MAX_MESSAGE_BYTES: usize = 2 * 1024 * 1024;

/// The federation of `config`: `operators` and the event log beside
/// `store` (the embedded store's journal lives in its data directory).
async fn open_federation(
    config: &ServeConfig,
    store: &AnyStore,
    operators: Arc<Operators>,
) -> anyhow::Result<Federation> {
    let journal_dir = match &config.store {
        crate::config::StoreConfig::Embedded { data_dir, .. } => Some(data_dir.as_path()),
        _ => None,
    };
    Ok(Federation::open(store, journal_dir, operators).await?)
}

/// Re-reads the operators file whenever its content changes (looked at
/// every `interval`); a bad file keeps the operators in force and is
/// logged once per change.
async fn watch_operators(operators: Arc<Operators>, path: std::path::PathBuf, interval: Duration) {
    let mut seen = std::fs::read(&path).ok();
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let now = std::fs::read(&path).ok();
        if now == seen {
            continue;
        }
        seen = now;
        if let Err(e) = operators.reload() {
            tracing::warn!(error = %e, "operators file changed but cannot be used; keeping the operators in force");
        }
    }
}

/// How often the log is trimmed to the retention.
const TRIM_INTERVAL: Duration = Duration::from_secs(3600);

/// Trims the log to `retention_days` now and every [`TRIM_INTERVAL`]
/// (every server does: trimming is idempotent).
async fn trim_log(log: crate::federation::AnyLog, retention_days: u32) {
    use crate::federation::EventLog;
    loop {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let older_than = now_ms - i64::from(retention_days) * 86_400_000;
        match log.trim(older_than).await {
            Ok(0) => {}
            Ok(dropped) => tracing::info!(dropped, retention_days, "federation log trimmed"),
            Err(e) => tracing::warn!(error = %e, "federation log: trim failed"),
        }
        tokio::time::sleep(TRIM_INTERVAL).await;
    }
}

/// The platforms' watch lists of `config` beside `store` (`None`: no watch
/// key, the `Watchlist` service is off). The embedded store keeps them in
/// its data directory's journal, Redis beside the mirror.
fn watch_lists(
    config: &ServeConfig,
    store: &AnyStore,
) -> anyhow::Result<Option<crate::federation::watch::WatchLists>> {
    use crate::federation::watch::{EmbeddedWatchLists, RedisWatchLists, WatchKey, WatchLists};
    let Some(path) = &config.watch_key_file else {
        tracing::info!("watch lists: off (no watch key)");
        return Ok(None);
    };
    let key = WatchKey::load(path).map_err(anyhow::Error::msg)?;
    let lists = match (store, &config.store) {
        (AnyStore::Redis(redis), _) => {
            WatchLists::Redis(Arc::new(RedisWatchLists::new(redis.clone(), key.clone())))
        }
        (AnyStore::Embedded(_), crate::config::StoreConfig::Embedded { data_dir, .. }) => {
            WatchLists::Embedded(Arc::new(EmbeddedWatchLists::open(key.clone(), data_dir)?))
        }
        (AnyStore::Embedded(_), _) => {
            anyhow::bail!(
                "watch lists: an embedded store needs a data directory (data_dir) for their journal"
            )
        }
    };
    tracing::info!(kid = key.kid(), "watch lists: on");
    Ok(Some(lists))
}

/// The receipt signer of `config`, if it names a receipt key.
fn receipt_signer(
    config: &ServeConfig,
) -> anyhow::Result<Option<std::sync::Arc<crate::receipt::ReceiptSigner>>> {
    let Some(path) = &config.receipt_key else {
        tracing::info!("receipts: off (no receipt key)");
        return Ok(None);
    };
    let mut retired = Vec::new();
    for (file, not_after) in &config.receipt_retired_keys {
        retired.extend(crate::receipt::load_retired_keys(file, *not_after)?);
    }
    let signer = crate::receipt::ReceiptSigner::from_pem_file(path, config.receipt_kid.clone())?
        .with_retired(&retired)?;
    let retired_kids: Vec<&str> = retired
        .iter()
        .filter_map(|k| k.jwk.common.key_id.as_deref())
        .collect();
    tracing::info!(kid = signer.kid(), alg = ?signer.algorithm(), retired = ?retired_kids, "receipts: on");
    Ok(Some(std::sync::Arc::new(signer)))
}

async fn set_serving(reporter: &HealthReporter, serving: bool) {
    if serving {
        reporter
            .set_serving::<ReassignedNumbersServer<ReassignedService<OverlayStore<AnyStore>>>>()
            .await;
        reporter
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
    } else {
        reporter
            .set_not_serving::<ReassignedNumbersServer<ReassignedService<OverlayStore<AnyStore>>>>()
            .await;
        reporter
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
    }
}

/// Whether this server can answer, and if not, why.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Health {
    Serving,
    NotServing(String),
}

/// The health of `store` from its state and the recent store checks:
/// an unsafe store or an empty mirror is NOT_SERVING at once; an
/// unreachable store only after [`HEALTH_FAILURES`] failed checks in a row
/// over at least [`HEALTH_GRACE`] (hysteresis); one good check serves again.
fn judge(unsafe_reason: Option<String>, has_meta: bool, failures: u32, failing_for: Duration) -> Health {
    if let Some(reason) = unsafe_reason {
        return Health::NotServing(format!("store unsafe: {reason}"));
    }
    if !has_meta {
        return Health::NotServing("mirror empty".into());
    }
    if failures >= HEALTH_FAILURES && failing_for >= HEALTH_GRACE {
        return Health::NotServing("store unreachable".into());
    }
    Health::Serving
}

/// Lookups this server answered so far (calls that finished OK).
fn answered(metrics: &metrics::MetricsHandle) -> u64 {
    [
        "/reassigned.v1.ReassignedNumbers/CheckNumber",
        "/reassigned.v1.ReassignedNumbers/BatchCheckNumbers",
    ]
    .iter()
    .map(|path| metrics.requests(path, Some(tonic::Code::Ok)))
    .sum()
}

/// SERVING while this server can answer (see [`judge`]): a store check
/// counts as good if the store answers a ping or if this server answered
/// a lookup since the last check (on a cluster, one shard failing over
/// makes pings flaky while the other shards answer).
async fn watch_health(
    store: AnyStore,
    reporter: HealthReporter,
    metrics: metrics::MetricsHandle,
    readiness: admin::Readiness,
    mut stop: watch::Receiver<bool>,
) {
    let mut last = None;
    let mut failures = 0u32;
    let mut failing_since = std::time::Instant::now();
    let mut answered_before = answered(&metrics);
    loop {
        let answered_now = answered(&metrics);
        let answering = answered_now > answered_before;
        answered_before = answered_now;
        match store.ping().await {
            Ok(()) => failures = 0,
            Err(_) if answering => failures = 0,
            Err(e) => {
                if failures == 0 {
                    failing_since = std::time::Instant::now();
                    tracing::debug!(error = %e, "health: store check failed");
                }
                failures = failures.saturating_add(1);
            }
        }
        let health = judge(
            store.unsafe_reason(),
            store.cached_meta().is_some(),
            failures,
            failing_since.elapsed(),
        );
        readiness.set_store(match &health {
            Health::Serving => None,
            Health::NotServing(reason) => Some(reason.clone()),
        });
        if last.as_ref() != Some(&health) {
            match &health {
                Health::Serving => tracing::info!("health: serving"),
                Health::NotServing(reason) => tracing::warn!(reason = %reason, "health: not serving"),
            }
            set_serving(&reporter, health == Health::Serving).await;
            last = Some(health);
        }
        tokio::select! {
            _ = tokio::time::sleep(HEALTH_INTERVAL) => {}
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_has_hysteresis_for_reachability_only() {
        let serving = |h: Health| h == Health::Serving;
        assert!(serving(judge(None, true, 0, Duration::ZERO)));
        // One slow check, or many within the grace: still serving.
        assert!(serving(judge(None, true, 1, Duration::from_secs(5))));
        assert!(serving(judge(None, true, 10, Duration::from_millis(1500))));
        assert!(!serving(judge(None, true, 3, Duration::from_secs(2))));
        // Unsafe or empty: at once.
        assert!(!serving(judge(Some("policy".into()), true, 0, Duration::ZERO)));
        assert!(!serving(judge(None, false, 0, Duration::ZERO)));
    }
}
