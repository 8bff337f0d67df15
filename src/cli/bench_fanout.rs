//! `reassigned bench --method fanout`: the federation's delivery side under
//! load (issue 9 §4: delivered events per second, publish-to-watcher
//! latency), driven by [`crate::cli::bench`].
//!
//! # What a run does
//! 1. **The watched pool**: `--watch-numbers` distinct random `+1` numbers
//!    drawn from `--seed` ([`watched_numbers`]); every platform watches the
//!    whole pool, so every event published is due to every platform.
//! 2. **The watchers**: `--watchers DIR` holds one `NAME.pem` + `NAME.key`
//!    (and, when the server requires tokens, `NAME.token`, scopes
//!    `watch:write watch:read`) per platform, and nothing else
//!    ([`read_watchers`]). Each platform gets its own connection.
//! 3. **Loading** (unless `--skip-load`): each platform adds the pool to its
//!    list with AddWatches, 10,000 numbers a call, the platforms in
//!    parallel, with a progress line on stderr; then CountWatches must show
//!    at least the pool's size. Loading is idempotent: a list loaded by an
//!    earlier run with the same `--watch-numbers` and `--seed` answers
//!    `changed: false` and is left as it is (`--skip-load` saves the time).
//! 4. **The streams**: one `WatchDisconnections` per platform from the
//!    current position (empty cursor), open before the first publication.
//! 5. **Publishing** (the bench's closed or open loop, `--batch-size`
//!    events per call, as the operator of `--cert`, which must be
//!    authoritative for `+1`): numbers drawn at random from the pool, event
//!    ids `fo-<run>-<seq>-<sent>` where `seq` numbers the run's events and
//!    `sent` is the moment the call was sent (microseconds since the run's
//!    start), so a watcher computes the latency from the id alone.
//! 6. **Drain**: after the last publication the bench waits (at most
//!    `--drain`) until every watcher has received every acknowledged event,
//!    then closes the streams and counts.
//!
//! # The figures
//! - *delivered/s*: deliveries (all watchers together, duplicates aside) of
//!   the events sent inside the measured window, divided by the time from
//!   the window's start to the last such delivery (at least the window):
//!   if delivery lags behind publication, the lag is in the divisor.
//! - *latency*: from the moment the publish call was sent to the moment the
//!   watcher's stream yielded the event (same process, one monotonic
//!   clock), for the measured events.
//! - *missing*: acknowledged events (accepted, in any call of the run,
//!   warmup included) that a watcher had not received when the drain ended:
//!   must be 0 (at-least-once delivery). *duplicates*: events a watcher
//!   received twice. *unacknowledged*: events of this run delivered whose
//!   publication was never acknowledged (a call that failed or timed out
//!   on the client's side after the server made it durable). *foreign*:
//!   events of other sources or runs.
//!
//! Nothing here prints or logs a phone number, a key or a token.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use hdrhistogram::Histogram;
use rand::SeedableRng as _;
use rand::rngs::StdRng;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::client::{Bearer, TlsTarget};
use super::loadgen::{Latency, random_us_number};
use crate::api::code_name;
use crate::api::pb;
use crate::api::pb::watchlist_client::WatchlistClient;
use crate::federation::watch::MAX_WATCH_BATCH;

/// The most numbers `--watch-numbers` accepts.
pub const MAX_WATCH_NUMBERS: usize = 100_000_000;

/// The top of the delivery latency histogram (larger values are clamped).
const MAX_LATENCY: Duration = Duration::from_secs(600);

/// How often the drain looks whether every watcher has everything.
const DRAIN_POLL: Duration = Duration::from_millis(50);

/// Mixed into `--seed` for the watched pool (so that it does not follow the
/// same random sequence as the order in which numbers are published).
const POOL_SEED: u64 = 0x7761_7463_6865_6421;

/// `n` distinct random `+1` numbers ([`PhoneNumber::value`]s), the same for
/// the same `n` and `seed`, in the order they were drawn.
///
/// [`PhoneNumber::value`]: crate::domain::PhoneNumber::value
pub fn watched_numbers(n: usize, seed: u64) -> Vec<u64> {
    let mut rng = StdRng::seed_from_u64(seed ^ POOL_SEED);
    let mut seen = HashSet::with_capacity(n);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let value = random_us_number(&mut rng);
        if seen.insert(value) {
            out.push(value);
        }
    }
    out
}

/// One watching platform's files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatcherFiles {
    /// The file stem (`NAME` of `NAME.pem`): how the report names it.
    pub name: String,
    /// Its client certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// Its bearer token (`NAME.token`), if any.
    pub token: Option<PathBuf>,
}

/// The watchers of `dir`: every `NAME.pem`, with the `NAME.key` that must
/// be beside it and the `NAME.token` that may be; sorted by name.
pub fn read_watchers(dir: &Path) -> anyhow::Result<Vec<WatcherFiles>> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("--watchers: cannot read {}", dir.display()))?;
    let mut out = Vec::new();
    for entry in entries {
        let path = entry
            .with_context(|| format!("--watchers: cannot read {}", dir.display()))?
            .path();
        if path.extension().is_none_or(|e| e != "pem") || !path.is_file() {
            continue;
        }
        let Some(name) = path.file_stem().and_then(|s| s.to_str()).map(str::to_owned) else {
            continue;
        };
        let key = dir.join(format!("{name}.key"));
        ensure!(
            key.is_file(),
            "--watchers: {} has no key {} beside it",
            path.display(),
            key.display()
        );
        let token = Some(dir.join(format!("{name}.token"))).filter(|t| t.is_file());
        out.push(WatcherFiles {
            name,
            cert: path,
            key,
            token,
        });
    }
    ensure!(
        !out.is_empty(),
        "--watchers: {} holds no NAME.pem (one NAME.pem + NAME.key, and NAME.token when tokens are on, per platform)",
        dir.display()
    );
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

// ---------------------------------------------------------------------------
// The publishing side's state, shared with the bench's workers
// ---------------------------------------------------------------------------

/// What the publishing workers share with the watchers: the run's event
/// ids and the events acknowledged.
pub(crate) struct Publisher {
    /// The clock of `sent` in the event ids.
    base: Instant,
    /// `fo-<run>-`: the ids of this run start with it.
    id_prefix: String,
    /// The next event's sequence number.
    next_seq: AtomicU64,
    /// Sequence numbers of the events accepted (any order).
    acked: Mutex<Vec<u64>>,
}

impl Publisher {
    fn new() -> Self {
        Self {
            base: Instant::now(),
            id_prefix: format!("fo-{:08x}-", rand::random::<u32>()),
            next_seq: AtomicU64::new(0),
            acked: Mutex::new(Vec::new()),
        }
    }

    /// Reserves `n` sequence numbers; the first.
    pub(crate) fn reserve(&self, n: usize) -> u64 {
        self.next_seq.fetch_add(n as u64, Ordering::Relaxed)
    }

    /// Microseconds since the run's clock started: the `sent` of an id.
    pub(crate) fn now_us(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// The event id of event `seq` sent at `sent_us`.
    pub(crate) fn event_id(&self, seq: u64, sent_us: u64) -> String {
        format!("{}{seq}-{sent_us}", self.id_prefix)
    }

    /// `(seq, sent_us)` of one of this run's ids; `None` for any other id.
    fn parse(&self, event_id: &str) -> Option<(u64, u64)> {
        let rest = event_id.strip_prefix(&self.id_prefix)?;
        let (seq, sent) = rest.split_once('-')?;
        let seq: u64 = seq.parse().ok()?;
        if seq >= self.next_seq.load(Ordering::Relaxed) {
            return None;
        }
        Some((seq, sent.parse().ok()?))
    }

    /// Records the events accepted by one call.
    pub(crate) fn acked(&self, seqs: &[u64]) {
        self.acked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(seqs);
    }

    fn acked_count(&self) -> u64 {
        self.acked.lock().unwrap_or_else(PoisonError::into_inner).len() as u64
    }
}

/// Which events' deliveries are measured: those sent inside the bench's
/// measured window (microseconds on the [`Publisher`]'s clock).
struct Window {
    start_us: AtomicU64,
    end_us: AtomicU64,
}

impl Window {
    fn contains(&self, sent_us: u64) -> bool {
        sent_us >= self.start_us.load(Ordering::Relaxed) && sent_us < self.end_us.load(Ordering::Relaxed)
    }
}

// ---------------------------------------------------------------------------
// The watchers
// ---------------------------------------------------------------------------

type WatchClient = WatchlistClient<InterceptedService<Channel, Bearer>>;

/// What one watcher's stream received.
struct Received {
    /// Bit `seq` set: event `seq` of this run received.
    seen: Vec<u64>,
    duplicates: u64,
    foreign: u64,
    /// Deliveries of events sent inside the window.
    measured: u64,
    last_measured: Option<Instant>,
    hist: Histogram<u64>,
    /// Why the stream ended before the bench closed it.
    error: Option<String>,
}

impl Received {
    fn new() -> anyhow::Result<Self> {
        let top = u64::try_from(MAX_LATENCY.as_micros()).unwrap_or(u64::MAX);
        Ok(Self {
            seen: Vec::new(),
            duplicates: 0,
            foreign: 0,
            measured: 0,
            last_measured: None,
            hist: Histogram::new_with_bounds(1, top, 3).context("cannot make a latency histogram")?,
            error: None,
        })
    }

    fn has(&self, seq: u64) -> bool {
        self.seen
            .get((seq / 64) as usize)
            .is_some_and(|w| w & (1 << (seq % 64)) != 0)
    }

    /// Marks `seq`; false if it was already.
    fn mark(&mut self, seq: u64) -> bool {
        let word = (seq / 64) as usize;
        if word >= self.seen.len() {
            self.seen.resize(word + 1, 0);
        }
        let bit = 1u64 << (seq % 64);
        let new = self.seen[word] & bit == 0;
        self.seen[word] |= bit;
        new
    }
}

/// What the receiving tasks share.
struct Shared {
    publisher: Arc<Publisher>,
    window: Window,
    /// Unique deliveries of this run's events, all watchers (progress).
    delivered: Arc<AtomicU64>,
    /// Unique deliveries per watcher (the drain's test).
    unique: Vec<AtomicU64>,
    /// Streams that ended before the bench closed them.
    ended: AtomicU64,
}

/// Reads one watcher's stream until `stop` turns true or the stream ends.
async fn receive(
    index: usize,
    mut stream: tonic::Streaming<pb::DisconnectionEvent>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<Received> {
    let mut r = Received::new()?;
    loop {
        let message = tokio::select! {
            message = stream.message() => message,
            _ = stop.wait_for(|s| *s) => break,
        };
        let event = match message {
            Ok(Some(event)) => event,
            Ok(None) => {
                r.error = Some("the stream ended".to_owned());
                shared.ended.fetch_add(1, Ordering::Relaxed);
                break;
            }
            Err(status) => {
                r.error = Some(format!("{}: {}", code_name(status.code()), status.message()));
                shared.ended.fetch_add(1, Ordering::Relaxed);
                break;
            }
        };
        let now = Instant::now();
        let Some((seq, sent_us)) = shared.publisher.parse(&event.event_id) else {
            r.foreign += 1;
            continue;
        };
        if !r.mark(seq) {
            r.duplicates += 1;
            continue;
        }
        shared.unique[index].fetch_add(1, Ordering::Relaxed);
        shared.delivered.fetch_add(1, Ordering::Relaxed);
        if shared.window.contains(sent_us) {
            r.measured += 1;
            r.last_measured = Some(now);
            let sent = shared.publisher.base + Duration::from_micros(sent_us);
            let micros = u64::try_from(now.saturating_duration_since(sent).as_micros()).unwrap_or(u64::MAX);
            r.hist.saturating_record(micros.max(1));
        }
    }
    Ok(r)
}

/// How the watch lists were loaded.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LoadReport {
    /// Numbers sent with AddWatches, all platforms.
    pub numbers: u64,
    /// Of those, newly added.
    pub added: u64,
    /// Of those, already on the list.
    pub already: u64,
    /// Wall time of the loading, seconds.
    pub secs: f64,
    /// `numbers / secs`.
    pub numbers_per_sec: f64,
}

/// The fan-out figures of a run (see the module documentation).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FanoutReport {
    /// Watching platforms (one stream each).
    pub platforms: usize,
    /// The names of the platforms (file stems of `--watchers`).
    pub platform_names: Vec<String>,
    /// Numbers on each platform's list (the pool every platform watches).
    pub watch_numbers: usize,
    /// The loading, or `None` with `--skip-load`.
    pub load: Option<LoadReport>,
    /// The smallest CountWatches of the platforms before the run.
    pub min_list_count: u64,
    /// Events acknowledged in the whole run (warmup included).
    pub published: u64,
    /// Acknowledged events per second in the measured window.
    pub published_per_sec: f64,
    /// Deliveries due: `published` times `platforms`.
    pub expected_deliveries: u64,
    /// Acknowledged events received, all watchers together (each counted
    /// once per watcher).
    pub delivered: u64,
    /// Deliveries of the events sent in the measured window.
    pub measured_deliveries: u64,
    /// From the window's start to the last measured delivery (at least the
    /// window), seconds: the divisor of `delivered_per_sec`.
    pub delivery_secs: f64,
    /// Measured deliveries per second, all watchers together.
    pub delivered_per_sec: f64,
    /// Publish-to-watcher latency of the measured deliveries, microseconds.
    pub latency_us: Latency,
    /// Acknowledged events a watcher had not received at the end of the
    /// drain (summed over watchers): must be 0.
    pub missing: u64,
    /// Events a watcher received more than once.
    pub duplicates: u64,
    /// This run's events delivered though never acknowledged.
    pub unacknowledged: u64,
    /// Events of other sources or runs.
    pub foreign: u64,
    /// How long the drain waited, seconds.
    pub drain_secs: f64,
    /// The drain ended at `--drain` before every watcher had every
    /// acknowledged event: `missing` then counts events still on their way
    /// (delivery fell behind publication), not necessarily lost ones.
    pub drain_timed_out: bool,
    /// Streams that ended before the bench closed them: `name: reason`.
    pub stream_errors: Vec<String>,
}

impl fmt::Display for FanoutReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "fan-out      {} platform(s) watching the same {} numbers (smallest list {})",
            self.platforms, self.watch_numbers, self.min_list_count
        )?;
        match &self.load {
            Some(load) => writeln!(
                f,
                "; loaded {} numbers ({} new) in {:.1}s, {:.0} numbers/s",
                load.numbers, load.added, load.secs, load.numbers_per_sec
            )?,
            None => writeln!(f, "; not loaded (--skip-load)")?,
        }
        writeln!(
            f,
            "published    {} events acknowledged, {:.1} events/s in the window",
            self.published, self.published_per_sec
        )?;
        writeln!(
            f,
            "delivered    {} of {} due ({} measured over {:.1}s): {:.1} events/s to all watchers together",
            self.delivered,
            self.expected_deliveries,
            self.measured_deliveries,
            self.delivery_secs,
            self.delivered_per_sec
        )?;
        writeln!(
            f,
            "delivery ms  {} (publish sent -> watcher received)",
            self.latency_us
        )?;
        writeln!(
            f,
            "missing      {} after a drain of {:.1}s{}; duplicates {}, unacknowledged {}, foreign {}",
            self.missing,
            self.drain_secs,
            if self.drain_timed_out {
                " (the drain ended before every watcher caught up: raise --drain, or publish at a --rate they keep up with)"
            } else {
                ""
            },
            self.duplicates,
            self.unacknowledged,
            self.foreign
        )?;
        if !self.stream_errors.is_empty() {
            writeln!(f, "streams      ended early: {}", self.stream_errors.join("; "))?;
        }
        Ok(())
    }
}

/// The watchers of a fan-out run, connected, loaded and streaming.
pub(crate) struct Fanout {
    names: Vec<String>,
    watch_numbers: usize,
    load: Option<LoadReport>,
    min_list_count: u64,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    receivers: JoinSet<(usize, anyhow::Result<Received>)>,
}

/// What `bench --method fanout` hands over from its options.
pub(crate) struct FanoutSetup<'a> {
    /// `--watchers`: the directory of the watchers' certificates and tokens.
    pub watchers: Option<&'a Path>,
    /// `--target` and the TLS material to reach it with.
    pub tls: &'a TlsTarget,
    /// `--skip-load`: the watchers' lists are loaded already.
    pub skip_load: bool,
}

/// Connects one channel per watcher, as that watcher.
async fn connect(opts: &FanoutSetup<'_>, watchers: &[WatcherFiles]) -> anyhow::Result<Vec<WatchClient>> {
    let mut clients = Vec::with_capacity(watchers.len());
    for w in watchers {
        let token = match &w.token {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read {}", path.display()))?
                    .trim()
                    .to_owned(),
            ),
            None => None,
        };
        let channel = opts
            .tls
            .endpoint_as(&w.cert, &w.key)?
            .initial_stream_window_size(4 << 20)
            .initial_connection_window_size(8 << 20)
            .connect()
            .await
            .with_context(|| format!("cannot connect to {} as watcher {}", opts.tls.target, w.name))?;
        clients.push(WatchlistClient::with_interceptor(
            channel,
            Bearer::new(token.as_deref())?,
        ));
    }
    Ok(clients)
}

/// Adds `pool` to every watcher's list, the watchers in parallel, with a
/// progress line on stderr about once per second.
async fn load(names: &[String], clients: &[WatchClient], pool: &Arc<Vec<u64>>) -> anyhow::Result<LoadReport> {
    let began = Instant::now();
    let sent = Arc::new(AtomicU64::new(0));
    let total = (pool.len() * clients.len()) as u64;
    let progress = {
        let sent = Arc::clone(&sent);
        tokio::spawn(async move {
            let period = Duration::from_secs(1);
            let mut ticker = tokio::time::interval_at((began + period).into(), period);
            loop {
                ticker.tick().await;
                let done = sent.load(Ordering::Relaxed);
                let secs = began.elapsed().as_secs_f64();
                eprintln!(
                    "bench: loading watch lists {done}/{total} numbers ({:.0} numbers/s)",
                    done as f64 / secs.max(1e-9)
                );
            }
        })
    };
    let mut tasks = JoinSet::new();
    for (name, client) in names.iter().zip(clients) {
        let (name, mut client, pool, sent) =
            (name.clone(), client.clone(), Arc::clone(pool), Arc::clone(&sent));
        tasks.spawn(async move {
            let (mut added, mut already) = (0u64, 0u64);
            for chunk in pool.chunks(MAX_WATCH_BATCH) {
                let phone_numbers: Vec<String> = chunk.iter().map(|v| format!("+{v}")).collect();
                let results = client
                    .add_watches(pb::AddWatchesRequest { phone_numbers })
                    .await
                    .map_err(|s| anyhow::anyhow!("{}: {}", code_name(s.code()), s.message()))
                    .with_context(|| format!("AddWatches as {name}"))?
                    .into_inner()
                    .results;
                ensure!(
                    results.len() == chunk.len(),
                    "AddWatches as {name}: {} results for {} numbers",
                    results.len(),
                    chunk.len()
                );
                for result in results {
                    match result.outcome {
                        Some(pb::watch_result::Outcome::Changed(true)) => added += 1,
                        Some(pb::watch_result::Outcome::Changed(false)) => already += 1,
                        Some(pb::watch_result::Outcome::Error(e)) => {
                            bail!(
                                "AddWatches as {name}: a number was refused: {}: {}",
                                e.code,
                                e.message
                            )
                        }
                        None => bail!("AddWatches as {name}: a result without an outcome"),
                    }
                }
                sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
            Ok((added, already))
        });
    }
    let mut report = LoadReport {
        numbers: 0,
        added: 0,
        already: 0,
        secs: 0.0,
        numbers_per_sec: 0.0,
    };
    let mut failure = None;
    while let Some(joined) = tasks.join_next().await {
        match joined.context("a loading task panicked").and_then(|r| r) {
            Ok((added, already)) => {
                report.added += added;
                report.already += already;
            }
            Err(e) => {
                failure.get_or_insert(e);
                tasks.abort_all();
            }
        }
    }
    progress.abort();
    if let Some(e) = failure {
        return Err(e);
    }
    report.numbers = report.added + report.already;
    report.secs = began.elapsed().as_secs_f64();
    report.numbers_per_sec = report.numbers as f64 / report.secs.max(1e-9);
    eprintln!(
        "bench: loaded {} numbers ({} new) in {:.1}s",
        report.numbers, report.added, report.secs
    );
    Ok(report)
}

impl Fanout {
    /// Connects the watchers of `--watchers`, loads their lists with `pool`
    /// (unless `--skip-load`), checks their sizes and opens their streams.
    pub(crate) async fn prepare(opts: &FanoutSetup<'_>, pool: &Arc<Vec<u64>>) -> anyhow::Result<Self> {
        let dir = opts.watchers.context("--method fanout needs --watchers DIR")?;
        let watchers = read_watchers(dir)?;
        let names: Vec<String> = watchers.iter().map(|w| w.name.clone()).collect();
        let clients = connect(opts, &watchers).await?;
        let load = if opts.skip_load {
            None
        } else {
            Some(load(&names, &clients, pool).await?)
        };
        let mut min_list_count = u64::MAX;
        for (name, client) in names.iter().zip(&clients) {
            let count = client
                .clone()
                .count_watches(pb::CountWatchesRequest {})
                .await
                .map_err(|s| {
                    anyhow::anyhow!("CountWatches as {name}: {}: {}", code_name(s.code()), s.message())
                })?
                .into_inner()
                .count;
            ensure!(
                count >= pool.len() as u64,
                "{name} watches {count} numbers, fewer than --watch-numbers {}{}",
                pool.len(),
                if opts.skip_load {
                    " (load them: run without --skip-load)"
                } else {
                    ""
                }
            );
            min_list_count = min_list_count.min(count);
        }
        let shared = Arc::new(Shared {
            publisher: Arc::new(Publisher::new()),
            window: Window {
                start_us: AtomicU64::new(u64::MAX),
                end_us: AtomicU64::new(u64::MAX),
            },
            delivered: Arc::new(AtomicU64::new(0)),
            unique: names.iter().map(|_| AtomicU64::new(0)).collect(),
            ended: AtomicU64::new(0),
        });
        let (stop, stopped) = watch::channel(false);
        let mut receivers = JoinSet::new();
        for (index, (name, client)) in names.iter().zip(clients).enumerate() {
            // The call returns once the server opened the feed at the log's
            // current end: nothing published after this can be missed.
            let stream = client
                .clone()
                .watch_disconnections(pb::WatchDisconnectionsRequest {
                    cursor: String::new(),
                })
                .await
                .map_err(|s| {
                    anyhow::anyhow!(
                        "WatchDisconnections as {name}: {}: {}",
                        code_name(s.code()),
                        s.message()
                    )
                })?
                .into_inner();
            let (shared, stopped) = (Arc::clone(&shared), stopped.clone());
            receivers.spawn(async move { (index, receive(index, stream, shared, stopped).await) });
        }
        eprintln!(
            "bench: {} watcher stream(s) open, {} numbers on each list",
            names.len(),
            pool.len()
        );
        Ok(Self {
            names,
            watch_numbers: pool.len(),
            load,
            min_list_count,
            shared,
            stop,
            receivers,
        })
    }

    /// The state the publishing workers share.
    pub(crate) fn publisher(&self) -> Arc<Publisher> {
        Arc::clone(&self.shared.publisher)
    }

    /// Unique deliveries so far, all watchers (for the progress line).
    pub(crate) fn delivered(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.shared.delivered)
    }

    /// Sets the measured window: events sent from `start` to `end`.
    pub(crate) fn arm(&self, start: Instant, end: Instant) {
        let base = self.shared.publisher.base;
        let us =
            |t: Instant| u64::try_from(t.saturating_duration_since(base).as_micros()).unwrap_or(u64::MAX);
        self.shared.window.start_us.store(us(start), Ordering::Relaxed);
        self.shared.window.end_us.store(us(end), Ordering::Relaxed);
    }

    /// Waits (at most `drain`) until every watcher received every
    /// acknowledged event, closes the streams and counts. `window_start`
    /// and `window_end` are the ones given to [`Fanout::arm`];
    /// `published_per_sec` is the publishing side's figure.
    pub(crate) async fn finish(
        mut self,
        drain: Duration,
        window_start: Instant,
        window_end: Instant,
        published_per_sec: f64,
    ) -> anyhow::Result<FanoutReport> {
        let began = Instant::now();
        let deadline = began + drain;
        let due = self.shared.publisher.acked_count();
        let mut next_line = began + Duration::from_secs(1);
        let mut drain_timed_out = false;
        loop {
            let slowest = self
                .shared
                .unique
                .iter()
                .map(|u| u.load(Ordering::Relaxed))
                .min()
                .unwrap_or(0);
            let now = Instant::now();
            // A stream that ended will not catch up: count now.
            let ended = self.shared.ended.load(Ordering::Relaxed) > 0;
            if slowest >= due || ended {
                break;
            }
            if now >= deadline {
                drain_timed_out = true;
                break;
            }
            if now >= next_line {
                eprintln!("bench: drain  the slowest watcher has {slowest} of {due} events");
                next_line = now + Duration::from_secs(1);
            }
            tokio::time::sleep(DRAIN_POLL).await;
        }
        let drain_secs = began.elapsed().as_secs_f64();
        let _ = self.stop.send(true);
        let mut received: Vec<Option<Received>> = self.names.iter().map(|_| None).collect();
        while let Some(joined) = self.receivers.join_next().await {
            let (index, r) = joined.context("a watcher task panicked")?;
            received[index] = Some(r?);
        }
        let received: Vec<Received> = received
            .into_iter()
            .enumerate()
            .map(|(i, r)| r.with_context(|| format!("no result from watcher {}", self.names[i])))
            .collect::<anyhow::Result<_>>()?;

        let acked = std::mem::take(
            &mut *self
                .shared
                .publisher
                .acked
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        let mut acked_set = Received::new()?;
        for &seq in &acked {
            acked_set.mark(seq);
        }
        let top = u64::try_from(MAX_LATENCY.as_micros()).unwrap_or(u64::MAX);
        let mut hist =
            Histogram::<u64>::new_with_bounds(1, top, 3).context("cannot make a latency histogram")?;
        let mut report = FanoutReport {
            platforms: self.names.len(),
            platform_names: self.names.clone(),
            watch_numbers: self.watch_numbers,
            load: self.load.clone(),
            min_list_count: self.min_list_count,
            published: acked.len() as u64,
            published_per_sec,
            expected_deliveries: acked.len() as u64 * self.names.len() as u64,
            delivered: 0,
            measured_deliveries: 0,
            delivery_secs: 0.0,
            delivered_per_sec: 0.0,
            latency_us: Latency::default(),
            missing: 0,
            duplicates: 0,
            unacknowledged: 0,
            foreign: 0,
            drain_secs,
            drain_timed_out,
            stream_errors: Vec::new(),
        };
        let mut last_measured = window_end;
        for (name, r) in self.names.iter().zip(&received) {
            let got = acked.iter().filter(|&&seq| r.has(seq)).count() as u64;
            report.delivered += got;
            report.missing += acked.len() as u64 - got;
            let all: u64 = r.seen.iter().map(|w| u64::from(w.count_ones())).sum();
            report.unacknowledged += all - got;
            report.duplicates += r.duplicates;
            report.foreign += r.foreign;
            report.measured_deliveries += r.measured;
            last_measured = last_measured.max(r.last_measured.unwrap_or(window_end));
            hist.add(&r.hist)
                .map_err(|e| anyhow::anyhow!("cannot merge latency histograms: {e:?}"))?;
            if let Some(error) = &r.error {
                report.stream_errors.push(format!("{name}: {error}"));
            }
        }
        report.delivery_secs = last_measured
            .saturating_duration_since(window_start)
            .as_secs_f64();
        if report.delivery_secs > 0.0 {
            report.delivered_per_sec = report.measured_deliveries as f64 / report.delivery_secs;
        }
        report.latency_us = Latency::from_histogram(&hist);
        Ok(report)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::domain::{PhoneNumber, Prefix};

    #[test]
    fn the_pool_is_distinct_valid_and_the_same_for_a_seed() {
        let pool = watched_numbers(20_000, 7);
        assert_eq!(pool.len(), 20_000);
        assert_eq!(pool.iter().collect::<HashSet<_>>().len(), 20_000);
        let one = Prefix::parse("+1").unwrap();
        assert!(pool.iter().all(|v| {
            let n = PhoneNumber::parse(&format!("+{v}")).unwrap();
            n.has_prefix(&one) && n.digits() == 11
        }));
        assert_eq!(watched_numbers(20_000, 7), pool);
        assert_ne!(watched_numbers(20_000, 8), pool);
        // A longer pool of the same seed starts with the shorter one.
        assert_eq!(watched_numbers(30_000, 7)[..20_000], pool[..]);
    }

    #[test]
    fn event_ids_carry_the_sequence_and_the_send_time() {
        let p = Publisher::new();
        let first = p.reserve(3);
        assert_eq!(first, 0);
        let id = p.event_id(2, 1_234_567);
        assert!(id.len() <= 128 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
        assert_eq!(p.parse(&id), Some((2, 1_234_567)));
        // Not reserved yet, another run, or not an id of ours at all.
        assert_eq!(p.parse(&p.event_id(3, 1)), None);
        assert_eq!(Publisher::new().parse(&id), None);
        for other in ["demo-1", "register:1:2", "", "fo-", "fo-00000000-x-1"] {
            assert_eq!(p.parse(other), None, "{other:?}");
        }
    }

    #[test]
    fn marks_count_each_event_once() {
        let mut r = Received::new().unwrap();
        assert!(r.mark(0) && r.mark(64) && r.mark(1000));
        assert!(!r.mark(64));
        assert!(r.has(0) && r.has(64) && r.has(1000));
        assert!(!r.has(1) && !r.has(5000));
    }

    #[test]
    fn reads_the_watchers_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_watchers(dir.path()).is_err(), "empty");
        for name in ["p2", "p1"] {
            std::fs::write(dir.path().join(format!("{name}.pem")), "cert").unwrap();
            std::fs::write(dir.path().join(format!("{name}.key")), "key").unwrap();
        }
        std::fs::write(dir.path().join("p1.token"), "token").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let watchers = read_watchers(dir.path()).unwrap();
        assert_eq!(
            watchers.iter().map(|w| w.name.as_str()).collect::<Vec<_>>(),
            ["p1", "p2"]
        );
        assert!(watchers[0].token.is_some() && watchers[1].token.is_none());
        std::fs::write(dir.path().join("p3.pem"), "cert").unwrap();
        let err = read_watchers(dir.path()).unwrap_err().to_string();
        assert!(err.contains("p3.pem") && err.contains("no key"), "{err}");
    }
}
