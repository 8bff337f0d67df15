//! The subcommands behind `reassigned <command>`: thin wrappers that load
//! configuration, open the store and call the library.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::federation::AnyLog;
use crate::federation::log::{EmbeddedLog, RedisLog};
use crate::federation::register::{EventingStore, RegisterMark};
use tokio::net::TcpListener;

use super::generate::GenerateOptions;
use crate::config::{RedisTarget, ServeConfig, ServeSettings, StoreConfig};
use crate::import::{self, Applied, ImportOptions};
use crate::store::{AnyStore, EmbeddedStore, RedisStore, redis::RedisOptions};

/// Sets up `tracing` on stderr: `text` or `json`, levels from `REASSIGNED_LOG`
/// (default `info`).
pub fn init_tracing(format: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("REASSIGNED_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        "text" => builder.try_init(),
        "json" => builder.json().try_init(),
        other => anyhow::bail!("unknown log format {other:?} (text or json)"),
    }
    .map_err(|e| anyhow::anyhow!("cannot set up logging: {e}"))
}

/// `reassigned serve`: merge the configuration layers, validate, open the
/// store, bind, and serve until SIGTERM or SIGINT.
pub async fn serve(
    config_file: Option<PathBuf>,
    dump_config: bool,
    flags: ServeSettings,
) -> anyhow::Result<()> {
    let file = match &config_file {
        Some(path) => ServeSettings::from_file(path)?,
        None => ServeSettings::default(),
    };
    let settings = flags.or(file);
    let config = ServeConfig::from_settings(settings.clone())?;
    // The JWKS is read now, so a bad one stops `serve` before it binds.
    let tokens = crate::server::load_tokens(&config)?;
    if dump_config {
        // The settings over the defaults: `--config` reads them back.
        print!("{}", settings.to_toml()?);
        return Ok(());
    }
    let store = open_store(&config.store).await?;
    let handles = crate::server::Handles::default();
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    // SIGHUP reloads the TLS material (certificate, key, client CAs, CRLs);
    // installed here, not in `run`, so only the binary changes what SIGHUP
    // does, and before "listening", so no SIGHUP can find the default action.
    #[cfg(unix)]
    let _sighup = crate::server::reload::AbortOnDrop(
        crate::server::reload::spawn_sighup_reloader(handles.reload.clone())
            .context("cannot listen for SIGHUP")?,
    );
    tracing::info!(addr = %listener.local_addr()?, "listening");
    crate::server::run_with(listener, config, store, handles, tokens, shutdown_signal()).await
}

/// Opens the configured store: connects to Redis, or loads the embedded store
/// from its data directory and keeps it in step with new manifests.
pub async fn open_store(config: &StoreConfig) -> anyhow::Result<AnyStore> {
    match config {
        StoreConfig::Redis {
            url,
            key_prefix,
            timeout_ms,
        } => {
            let options = RedisOptions {
                key_prefix: key_prefix.clone(),
                timeout: Duration::from_millis(*timeout_ms),
                ..RedisOptions::default()
            };
            let store = RedisStore::connect(url, options)
                .await
                .context("cannot connect to Redis")?;
            Ok(AnyStore::Redis(store))
        }
        StoreConfig::RedisCluster {
            urls,
            key_prefix,
            timeout_ms,
            read_from_replicas,
        } => {
            let options = RedisOptions {
                key_prefix: key_prefix.clone(),
                timeout: Duration::from_millis(*timeout_ms),
                read_from_replicas: *read_from_replicas,
                ..RedisOptions::default()
            };
            let store = RedisStore::connect_cluster(urls, options)
                .await
                .context("cannot connect to the Redis Cluster")?;
            Ok(AnyStore::Redis(store))
        }
        StoreConfig::Embedded {
            data_dir,
            resync_interval_secs,
            max_shrink,
        } => {
            let options = import::ImportOptions {
                max_shrink: max_shrink.0,
                allow_shrink: false,
            };
            let store = open_embedded(data_dir, options, Duration::from_secs(*resync_interval_secs)).await?;
            Ok(AnyStore::Embedded(store))
        }
    }
}

/// The embedded store of the register directory `data_dir`, loaded, and
/// kept in step with new manifests by a task that runs for the life of the
/// process. The files that add or move a disconnect append the register's
/// events to the federation journal of the same directory (the log the
/// server follows: [`EmbeddedLog::shared`]); the register mark says which
/// files had theirs already (see [`crate::federation::register`]).
async fn open_embedded(
    data_dir: &Path,
    options: ImportOptions,
    resync_interval: Duration,
) -> anyhow::Result<Arc<EmbeddedStore>> {
    let log = EmbeddedLog::shared(data_dir)
        .with_context(|| format!("cannot open the federation journal in {}", data_dir.display()))?;
    let mark = Arc::new(RegisterMark::open(data_dir, &log)?);
    let through = mark.through();
    let store = Arc::new(EmbeddedStore::new());
    let layer = EventingStore::new(Arc::clone(&store), AnyLog::Embedded(log)).with_mark(Arc::clone(&mark));
    import::embedded::load_dir(
        &store,
        // No mark yet: everything loaded now is the baseline.
        through.unwrap_or(u64::MAX),
        &layer,
        data_dir,
        options,
        &mut import::StderrProgress::new(),
    )
    .await
    .with_context(|| format!("cannot load {}", data_dir.display()))?;
    if let Some(meta) = crate::store::Store::cached_meta(&*store) {
        mark.baseline(meta.sequence)
            .await
            .with_context(|| format!("cannot write the register mark in {}", data_dir.display()))?;
    }
    // Runs for the life of the process; the server's shutdown ends it.
    import::embedded::spawn_resync(
        &store,
        layer,
        data_dir.to_path_buf(),
        resync_interval,
        options,
        std::future::pending(),
    );
    Ok(store)
}

/// Resolves on SIGTERM or SIGINT, and says which.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => tracing::info!(signal = "SIGTERM", "signal received"),
            _ = tokio::signal::ctrl_c() => tracing::info!(signal = "SIGINT", "signal received"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!(signal = "ctrl-c", "signal received");
    }
}

async fn redis_store(target: &RedisTarget, key_prefix: &str) -> anyhow::Result<RedisStore> {
    let options = RedisOptions {
        key_prefix: key_prefix.to_owned(),
        ..RedisOptions::default()
    };
    match target {
        RedisTarget::Single(url) => RedisStore::connect(url, options)
            .await
            .context("cannot connect to Redis"),
        RedisTarget::Cluster(urls) => RedisStore::connect_cluster(urls, options)
            .await
            .context("cannot connect to the Redis Cluster"),
    }
}

/// `store` appending the register's events to the federation log beside it
/// (see [`crate::federation::register`]).
async fn eventing(store: RedisStore) -> EventingStore<RedisStore> {
    let log = AnyLog::Redis(RedisLog::open(&store).await);
    EventingStore::new(store, log)
}

/// `reassigned import`: applies one manifest to the Redis mirror.
pub async fn import(target: &RedisTarget, key_prefix: &str, manifest: &Path) -> anyhow::Result<()> {
    import_with(target, key_prefix, manifest, ImportOptions::default()).await
}

/// `reassigned sync`: applies every pending manifest of `dir` in order.
pub async fn sync(target: &RedisTarget, key_prefix: &str, dir: &Path) -> anyhow::Result<()> {
    sync_with(target, key_prefix, dir, ImportOptions::default()).await
}

/// The exit status of an import or sync stopped cleanly by SIGTERM or
/// SIGINT (128 + SIGTERM, as if terminated, but after cleaning up).
pub const EXIT_INTERRUPTED: u8 = 143;

/// The exit status for an error of a command: [`EXIT_INTERRUPTED`] for an
/// import stopped by a signal, 1 otherwise.
pub fn exit_code(error: &anyhow::Error) -> u8 {
    match error.downcast_ref::<import::ImportError>() {
        Some(import::ImportError::Interrupted { .. }) => EXIT_INTERRUPTED,
        _ => 1,
    }
}

/// Until dropped: on the first SIGTERM or SIGINT, asks the imports of this
/// process to stop cleanly (`interrupt` and [`RedisStore::cancel_imports`]);
/// on a second one, exits at once.
struct SignalGuard(tokio::task::JoinHandle<()>);

impl SignalGuard {
    fn install(interrupt: import::Interrupt) -> Self {
        Self(tokio::spawn(async move {
            shutdown_signal().await;
            eprintln!(
                "signal received: stopping cleanly (rolling back or finishing the current step, releasing the lock); a second signal exits at once"
            );
            interrupt.raise();
            RedisStore::cancel_imports();
            shutdown_signal().await;
            eprintln!("second signal: exiting at once (the import lock frees itself)");
            std::process::exit(i32::from(EXIT_INTERRUPTED));
        }))
    }
}

impl Drop for SignalGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// [`import::StderrProgress`] that stops reading once `interrupt` is raised.
struct StoppableProgress {
    inner: import::StderrProgress,
    interrupt: import::Interrupt,
}

impl StoppableProgress {
    fn new(interrupt: &import::Interrupt) -> Self {
        Self {
            inner: import::StderrProgress::new(),
            interrupt: interrupt.clone(),
        }
    }
}

impl import::Progress for StoppableProgress {
    fn start(&mut self, file: &Path, total: u64) {
        self.inner.start(file, total);
    }

    fn advance(&mut self, read: u64) {
        self.inner.advance(read);
    }

    fn finish(&mut self, read: u64) {
        self.inner.finish(read);
    }

    fn should_stop(&self) -> bool {
        self.interrupt.is_raised()
    }
}

/// An error of an import that a signal interrupted, as
/// [`import::ImportError::Interrupted`].
fn interrupted_error(interrupt: &import::Interrupt, e: import::ImportError) -> anyhow::Error {
    const PREFIX: &str = "interrupted by a signal ";
    match e {
        e @ import::ImportError::Interrupted { .. } => e.into(),
        import::ImportError::Store(crate::store::StoreError::Conflict(m)) if m.starts_with(PREFIX) => {
            import::ImportError::Interrupted {
                done: m[PREFIX.len()..].to_owned(),
            }
            .into()
        }
        e if interrupt.is_raised() => import::ImportError::Interrupted {
            done: format!("after an error: {e}"),
        }
        .into(),
        e => e.into(),
    }
}

/// `reassigned import` with the shrink guard of `options`; stops cleanly on
/// SIGTERM/SIGINT (see [`EXIT_INTERRUPTED`]).
pub async fn import_with(
    target: &RedisTarget,
    key_prefix: &str,
    manifest: &Path,
    options: ImportOptions,
) -> anyhow::Result<()> {
    let interrupt = import::Interrupt::never();
    let _signals = SignalGuard::install(interrupt.clone());
    let store = eventing(redis_store(target, key_prefix).await?).await;
    let started = std::time::Instant::now();
    let applied =
        import::apply_manifest_with(&store, manifest, options, &mut StoppableProgress::new(&interrupt))
            .await
            .map_err(|e| interrupted_error(&interrupt, e))?;
    eprintln!("{} in {:.1?}", describe(&applied), started.elapsed());
    Ok(())
}

/// `reassigned sync` with the shrink guard of `options`; stops cleanly on
/// SIGTERM/SIGINT before the next file, or rolling back the current one.
pub async fn sync_with(
    target: &RedisTarget,
    key_prefix: &str,
    dir: &Path,
    options: ImportOptions,
) -> anyhow::Result<()> {
    let report = sync_report(target, key_prefix, dir, options).await?;
    eprintln!("{report}");
    Ok(())
}

/// One sync run (see [`sync_with`]), its report returned.
async fn sync_report(
    target: &RedisTarget,
    key_prefix: &str,
    dir: &Path,
    options: ImportOptions,
) -> anyhow::Result<import::SyncReport> {
    let interrupt = import::Interrupt::never();
    let _signals = SignalGuard::install(interrupt.clone());
    let store = eventing(redis_store(target, key_prefix).await?).await;
    import::sync_dir_with(
        &store,
        dir,
        options,
        &interrupt,
        &mut StoppableProgress::new(&interrupt),
    )
    .await
    .map_err(|e| interrupted_error(&interrupt, e))
}

/// Where a sync process reports its runs (both off by default): the
/// metrics of [`crate::server::sync_metrics`].
#[derive(Clone, Debug, Default, clap::Args)]
pub struct SyncMetricsArgs {
    /// Serve `/metrics` (runs, last success, last error, files applied)
    /// and `/livez` over plain HTTP on this address while sync runs (for
    /// `--every`); like serve's admin listener, never expose it.
    #[arg(long = "admin-listen", env = "REASSIGNED_SYNC_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// After each run, write the same metrics (without process figures) to
    /// this file, replaced atomically: for node_exporter's textfile
    /// collector when a one-shot sync runs from cron.
    #[arg(long, env = "REASSIGNED_SYNC_METRICS_TEXTFILE")]
    pub metrics_textfile: Option<PathBuf>,
}

/// `reassigned sync [--every]` reporting to `metrics`: once (`every`
/// `None`, the exit status says how it went) or again `every` after each
/// run (see [`sync_every`]).
pub async fn sync_observed(
    target: &RedisTarget,
    key_prefix: &str,
    dir: &Path,
    options: ImportOptions,
    every: Option<Duration>,
    metrics: &SyncMetricsArgs,
) -> anyhow::Result<()> {
    use crate::server::sync_metrics::SyncStats;
    if let Some(every) = every {
        anyhow::ensure!(!every.is_zero(), "--every must be longer than 0s");
    }
    let stats = Arc::new(SyncStats::new(every, &import::ImportError::KINDS));
    let _admin = match metrics.admin_listen {
        Some(addr) => Some(crate::server::admin::serve_sync(addr, stats.clone()).await?),
        None => None,
    };
    let run = SyncRun {
        target,
        key_prefix,
        dir,
        options,
        stats: &stats,
        textfile: metrics.metrics_textfile.as_deref(),
    };
    let Some(every) = every else {
        return run.once().await;
    };
    // Listening from now on, across runs: a SIGTERM that lands between a
    // run's end and the next wait is not lost.
    let mut stop = Box::pin(shutdown_signal());
    if futures_util::FutureExt::now_or_never(&mut stop).is_some() {
        return Ok(());
    }
    loop {
        if let Err(e) = run.once().await {
            if exit_code(&e) == EXIT_INTERRUPTED {
                return Err(e);
            }
            tracing::warn!(error = %format!("{e:#}"), next_in = ?every, "sync failed");
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = &mut stop => return Ok(()),
        }
    }
}

/// One run of a sync process and where it reports.
struct SyncRun<'a> {
    target: &'a RedisTarget,
    key_prefix: &'a str,
    dir: &'a Path,
    options: ImportOptions,
    stats: &'a crate::server::sync_metrics::SyncStats,
    textfile: Option<&'a Path>,
}

impl SyncRun<'_> {
    /// Syncs once, prints the report, records the outcome in the stats and
    /// writes the textfile (a textfile that cannot be written is logged,
    /// and does not fail a good run).
    async fn once(&self) -> anyhow::Result<()> {
        self.stats.run_started();
        let result = sync_report(self.target, self.key_prefix, self.dir, self.options).await;
        match &result {
            Ok(report) => {
                eprintln!("{report}");
                self.stats.run_succeeded(report.sequence);
            }
            Err(e) => self.stats.run_failed(sync_error_kind(e)),
        }
        if let Some(path) = self.textfile
            && let Err(e) = crate::server::sync_metrics::write_textfile(path, self.stats)
        {
            tracing::warn!(path = %path.display(), error = %e, "sync: cannot write the metrics textfile");
        }
        result.map(|_| ())
    }
}

/// The metrics' `kind` of a failed sync run: the import's error kind, else
/// `store` for a store that failed before the import began (e.g. Redis
/// unreachable), else `other`.
fn sync_error_kind(e: &anyhow::Error) -> &'static str {
    if let Some(e) = e.downcast_ref::<import::ImportError>() {
        return e.kind();
    }
    if e.chain()
        .any(|c| c.downcast_ref::<crate::store::StoreError>().is_some())
    {
        return "store";
    }
    crate::server::sync_metrics::OTHER_KIND
}

/// `reassigned sync --every`: [`sync_with`] now and then again `every`
/// after each run, until SIGTERM or SIGINT (exit status 0 between runs,
/// [`EXIT_INTERRUPTED`] in the middle of one). A failed run is logged and
/// retried at the next (the register's files or Redis may come back).
pub async fn sync_every(
    target: &RedisTarget,
    key_prefix: &str,
    dir: &Path,
    options: ImportOptions,
    every: Duration,
) -> anyhow::Result<()> {
    sync_observed(
        target,
        key_prefix,
        dir,
        options,
        Some(every),
        &SyncMetricsArgs::default(),
    )
    .await
}

/// `reassigned verify`: compares the Redis mirror with the manifests and
/// data files of `dir` (record count and per-bucket checksums); an error
/// listing the differing buckets if they differ.
pub async fn verify(target: &RedisTarget, key_prefix: &str, dir: &Path) -> anyhow::Result<()> {
    let store = redis_store(target, key_prefix).await?;
    let Some(digest) = store.digest().await.context("cannot read the mirror")? else {
        anyhow::bail!("the redis mirror is empty: nothing to verify");
    };
    let report = import::verify::verify(dir, &digest).await?;
    if report.is_ok() {
        println!("verify: ok: {report}");
        Ok(())
    } else {
        anyhow::bail!("verify: the mirror does not match its source files: {report}")
    }
}

/// `reassigned gc`: reports (and unless `dry_run` removes) the keys of
/// orphaned generations.
pub async fn gc(target: &RedisTarget, key_prefix: &str, dry_run: bool) -> anyhow::Result<()> {
    let store = redis_store(target, key_prefix).await?;
    let report = store.gc(dry_run).await.context("gc")?;
    println!("gc: {report}");
    Ok(())
}

fn describe(applied: &Applied) -> String {
    applied.to_string()
}

/// `reassigned certs dev`: the dev PKI in `out`, the server certificate also
/// naming `sans`. With `keep_existing`, a directory that already holds a
/// CA (`ca.pem`) is left as it is (a setup step that runs on every start).
pub fn certs_dev(out: &Path, force: bool, sans: &[String], keep_existing: bool) -> anyhow::Result<()> {
    if keep_existing && !force && out.join("ca.pem").exists() {
        eprintln!("kept the existing dev certificates in {}", out.display());
        return Ok(());
    }
    super::certs::dev_certs_for(out, force, sans)?;
    eprintln!("wrote dev certificates to {}", out.display());
    Ok(())
}

/// `reassigned generate`. With `options.keep_existing`, a directory that
/// already holds manifests is left as it is.
pub fn generate_cmd(options: &GenerateOptions) -> anyhow::Result<()> {
    if options.keep_existing && super::generate::holds_manifests(&options.out)? {
        eprintln!("kept the existing register in {}", options.out.display());
        return Ok(());
    }
    let report = super::generate::generate(options)?;
    eprintln!("{report}");
    Ok(())
}

/// `reassigned demo`: dev certificates and a demo register if missing, served
/// with the embedded store; prints grpcurl commands that work when pasted.
pub async fn demo(
    dir: &Path,
    listen: SocketAddr,
    rest_listen: SocketAddr,
    records: u64,
) -> anyhow::Result<()> {
    let certs = dir.join("certs");
    let data = dir.join("register");
    if !certs.join("ca.pem").exists() {
        super::certs::dev_certs(&certs, false)?;
        eprintln!("made dev certificates in {}", certs.display());
    }
    if !data.exists() {
        generate_cmd(&GenerateOptions {
            records,
            out: data.clone(),
            seed: Some(1),
            ..GenerateOptions::default()
        })?;
    }
    for operator in super::certs::DEV_OPERATORS {
        // A demo directory made before operators existed gets them now.
        if !certs.join(format!("{operator}.pem")).exists() {
            super::certs::mint_client_cert(
                &std::fs::read_to_string(certs.join("ca.pem"))?,
                &std::fs::read_to_string(certs.join("ca.key"))?,
                operator,
                &certs,
            )?;
        }
    }
    let operators = dir.join("operators.toml");
    if !operators.exists() {
        std::fs::write(&operators, demo_operators(&data)?)?;
        eprintln!(
            "made {} (operator-a authoritative for the demo register's prefixes)",
            operators.display()
        );
    }
    let watch_key = dir.join("watch.key");
    if !watch_key.exists() {
        // The key of the platforms' watch lists (HMAC of the numbers).
        std::fs::write(&watch_key, hex::encode(rand::random::<[u8; 32]>()))?;
        eprintln!("made a watch list key in {}", watch_key.display());
    }
    let keys = dir.join("keys");
    if !keys.join(super::token::JWKS_FILE).exists() {
        let key = super::token::generate_keys(&keys, super::token::KeyAlg::Es256, None)?;
        eprintln!(
            "made a token issuer key (kid {}) in {}",
            key.kid(),
            keys.display()
        );
    }
    let settings = ServeSettings {
        jwks: Some(keys.join(super::token::JWKS_FILE)),
        token_issuer: Some(super::token::DEFAULT_ISSUER.into()),
        token_audience: Some(super::token::DEFAULT_AUDIENCE.into()),
        listen: Some(listen),
        rest_listen: Some(rest_listen),
        tls_cert: Some(certs.join("server.pem")),
        tls_key: Some(certs.join("server.key")),
        client_ca: Some(certs.join("ca.pem")),
        data_dir: Some(data.clone()),
        operators: Some(operators),
        watch_key_file: Some(watch_key),
        ..ServeSettings::default()
    };
    let config = ServeConfig::from_settings(settings)?;
    let store = open_store(&config.store).await?;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let mint = |who: &str, scope: &str| {
        super::token::mint_cmd(&super::token::MintOptions {
            issuer_key: keys.join(super::token::ISSUER_KEY_FILE),
            kid: None,
            platform: who.into(),
            cert: certs.join(format!("{who}.pem")),
            scope: scope.into(),
            ttl: Duration::from_secs(24 * 60 * 60),
            issuer: super::token::DEFAULT_ISSUER.into(),
            audience: super::token::DEFAULT_AUDIENCE.into(),
        })
    };
    let token = mint("platform-a", crate::identity::scope::ALL)?;
    let operator_token = mint("operator-a", crate::identity::scope::REGISTER_WRITE)?;
    print_demo_commands(&certs, listen, &data, &token)?;
    print_watch_commands(&certs, listen);
    print_publish_commands(&certs, listen, &operator_token);
    println!("The REST face (CAMARA Number Recycling) with curl:\n");
    println!(
        "  curl --cacert {c}/ca.pem --cert {c}/platform-a.pem --key {c}/platform-a.key \\\n    \
         -H \"authorization: Bearer $TOKEN\" -H 'content-type: application/json' \\\n    \
         -d '{{\"phoneNumber\":\"+14155550123\",\"specifiedDate\":\"2024-01-01\"}}' \\\n    \
         https://localhost:{port}/number-recycling/v0.2/check\n",
        c = certs.display(),
        port = rest_listen.port()
    );
    crate::run(listener, config, store, shutdown_signal()).await
}

fn print_demo_commands(certs: &Path, listen: SocketAddr, data: &Path, token: &str) -> anyhow::Result<()> {
    let (hit, hit_since) = sample_hit(data)?;
    let mtls = format!(
        "-cacert {c}/ca.pem -cert {c}/platform-a.pem -key {c}/platform-a.key",
        c = certs.display()
    );
    let tls = format!("{mtls} -H \"authorization: Bearer $TOKEN\"");
    let target = format!("localhost:{}", listen.port());
    let svc = "reassigned.v1.ReassignedNumbers";
    println!(
        "reassigned demo is serving on {listen} (embedded store, data in {}).",
        data.display()
    );
    println!(
        "Try it with grpcurl (mutual TLS as platform-a, with a bearer token bound to its certificate, \
         all scopes, valid 24 h):\n"
    );
    println!("  export TOKEN={token}\n");
    println!("  grpcurl {mtls} {target} list");
    println!("  grpcurl {tls} {target} {svc}/GetMirrorStatus");
    println!(
        "  grpcurl {tls} -d '{{\"phone_number\":\"{hit}\",\"since\":\"{hit_since}\"}}' {target} {svc}/CheckNumber"
    );
    println!(
        "  grpcurl {tls} -d '{{\"phone_number\":\"+14155550123\",\"since\":\"2024-01-01\"}}' {target} {svc}/CheckNumber"
    );
    println!(
        "  grpcurl {tls} -d '{{\"checks\":[{{\"phone_number\":\"{hit}\",\"since\":\"{hit_since}\"}},{{\"phone_number\":\"+44 20\",\"since\":\"2024-01-01\"}}]}}' {target} {svc}/BatchCheckNumbers"
    );
    println!("  grpcurl {mtls} {target} grpc.health.v1.Health/Check\n");
    println!("Stop with Ctrl-C.");
    Ok(())
}

/// The demo's operators file: `operator-a` authoritative for the prefixes
/// the demo register covers.
fn demo_operators(data: &Path) -> anyhow::Result<String> {
    let mut prefixes = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(data)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            let manifest = import::Manifest::load(&path)?;
            prefixes.extend(manifest.covered_prefixes.unwrap_or_default());
        }
    }
    let list: Vec<String> = prefixes.iter().map(|p| format!("{p:?}")).collect();
    Ok(format!(
        "# Operators that may publish disconnections (see the README's \"Federation\").\n\
         [operators.{:?}]\nprefixes = [{}]\nquarantine_days = 90\n",
        super::certs::platform_uri("operator-a"),
        list.join(", ")
    ))
}

/// The platform's side of the demo: watch a number as platform-a (with
/// `$TOKEN`), and follow the events (in a second terminal, before
/// publishing).
fn print_watch_commands(certs: &Path, listen: SocketAddr) {
    let c = certs.display();
    let target = format!("localhost:{}", listen.port());
    let tls = format!(
        "-cacert {c}/ca.pem -cert {c}/platform-a.pem -key {c}/platform-a.key -H \"authorization: Bearer $TOKEN\""
    );
    let svc = "reassigned.v1.Watchlist";
    println!(
        "\nWatch a number as platform-a, and follow its events (keep this one running in a second terminal):\n"
    );
    println!("  grpcurl {tls} -d '{{\"phone_numbers\":[\"+14155550123\"]}}' {target} {svc}/AddWatches");
    println!("  grpcurl {tls} -d '{{}}' {target} {svc}/WatchDisconnections");
    println!(
        "  (or as JSON lines with a resumable cursor: reassigned watch --cursor-file cursor.txt \\
         --ca {c}/ca.pem --cert {c}/platform-a.pem --key {c}/platform-a.key --token \"$TOKEN\" --target {target})"
    );
}

/// The operator's side of the demo: publish a disconnection as operator-a,
/// then see CheckNumber flip (as platform-a, with `$TOKEN`).
fn print_publish_commands(certs: &Path, listen: SocketAddr, operator_token: &str) {
    let c = certs.display();
    let target = format!("localhost:{}", listen.port());
    let today = crate::domain::Date::today_utc();
    println!(
        "\nPublish a disconnection as operator-a (mutual TLS as operator-a, token with scope register:write):\n"
    );
    println!("  export OPERATOR_TOKEN={operator_token}\n");
    println!(
        "  grpcurl -cacert {c}/ca.pem -cert {c}/operator-a.pem -key {c}/operator-a.key -H \"authorization: Bearer $OPERATOR_TOKEN\" \
         -d '{{\"items\":[{{\"event_id\":\"demo-1\",\"phone_number\":\"+14155550123\",\"disconnect_date\":\"{today}\"}}]}}' \
         {target} reassigned.v1.DisconnectionFeed/PublishDisconnections"
    );
    println!(
        "  grpcurl -cacert {c}/ca.pem -cert {c}/platform-a.pem -key {c}/platform-a.key -H \"authorization: Bearer $TOKEN\" \
         -d '{{\"phone_number\":\"+14155550123\",\"since\":\"{today}\"}}' {target} reassigned.v1.ReassignedNumbers/CheckNumber"
    );
    println!(
        "  (or from a CSV of event_id,phone_number,disconnect_date lines: reassigned publish --file disconnections.csv \\
         --ca {c}/ca.pem --cert {c}/operator-a.pem --key {c}/operator-a.key --token \"$OPERATOR_TOKEN\" --target {target})\n"
    );
}

/// A number of the demo register and its disconnect date, for an example
/// that answers REASSIGNED.
fn sample_hit(dir: &Path) -> anyhow::Result<(String, String)> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let manifest = import::Manifest::load(&path)?;
        if manifest.kind != import::Kind::Snapshot {
            continue;
        }
        let records = import::read_records(&manifest, &mut import::NoProgress)?;
        if let Some((number, date)) = records.iter().next() {
            return Ok((number.to_string(), date.to_string()));
        }
    }
    anyhow::bail!("no snapshot with records in {}", dir.display())
}
