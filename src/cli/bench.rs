//! Load testing: `reassigned bench`, a load generator for a running server
//! (the bare reference server it is compared with is
//! [`crate::cli::bench_bare`]).
//!
//! [`bench()`] opens `--connections` HTTP/2 connections over mutual TLS and
//! keeps `--concurrency` calls in flight for `--warmup` then `--duration`,
//! and returns a [`BenchReport`]: calls and numbers per second, latency
//! percentiles from an HDR histogram, errors by gRPC code and the mix of
//! answers (so the hit ratio can be checked). It stops by itself: every call
//! is bounded by `--timeout`, and no call starts after the duration.
//!
//! - *Closed loop* (default): `--concurrency` workers each make one call after
//!   another; latency is measured from the start of each call.
//! - *Open loop* (`--rate R`): call *i* is scheduled at `start + i/R`, whether
//!   or not earlier calls have finished; at most `--concurrency` are in
//!   flight. When a call starts late because every worker was still busy, its
//!   latency is measured from its *scheduled* time, so a slow server cannot
//!   hide its latency by slowing the generator down (coordinated omission).
//!   A worker that was idle and woke from its timer measures from the moment
//!   it woke, so timer granularity is not counted against the server.
//!
//! Only calls that *start* (closed loop) or are *scheduled* (open loop) after
//! the warmup are measured; they are all waited for. Latency percentiles are
//! over successful calls; failed calls are counted by code.
//!
//! The queries are built before the run (no allocation beyond one clone of a
//! pre-built message per call): random `+1` numbers by default, or drawn from
//! a data set with `--data` (see [`BenchOptions::data`]) with a chosen share
//! of numbers that are in it (`--hit-ratio`); the others are numbers under the
//! same prefixes, near real ones, that are certainly not in it.
//!
//! Nothing here prints or logs a phone number.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use futures_util::StreamExt as _;
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::seq::SliceRandom as _;
use rand::{Rng as _, SeedableRng as _};
use serde::Serialize;
use tokio::task::JoinSet;
use tonic::Status;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::client::{Bearer, TlsTarget};
pub use super::loadgen::Latency;
use super::loadgen::random_us_number;
use crate::api::code_name;
use crate::api::pb;
use crate::api::pb::disconnection_feed_client::DisconnectionFeedClient;
use crate::api::pb::reassigned_numbers_client::ReassignedNumbersClient;
use crate::domain::{Date, PhoneNumber, Prefix};
use crate::import::{Kind, Manifest, NoProgress, read_records};

/// Numbers prepared for a run (at least; more when batches need them).
const POOL_NUMBERS: usize = 1 << 16;
/// Most rows read from a `queries.csv`.
const MAX_QUERY_ROWS: usize = 1 << 20;
/// Largest `--batch-size` accepted.
const MAX_BATCH_SIZE: usize = 100_000;
/// Largest `--timeout` accepted (also the top of the latency histogram).
const MAX_TIMEOUT: Duration = Duration::from_secs(60);
/// Trailing digits first randomised to make a miss from a hit.
const MISS_DIGITS: u32 = 4;
/// Tries to find a miss near one hit, widening every 8 tries.
const MISS_TRIES: u32 = 64;
/// Error key of a call that the client abandoned after `--timeout`.
pub const CLIENT_TIMEOUT: &str = "CLIENT_TIMEOUT";
/// Error key of a stream call that ended with fewer results than requests.
pub const SHORT_STREAM: &str = "SHORT_STREAM";

/// Which RPC `bench` calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// `CheckNumber`: one number per call (logins).
    Check,
    /// `BatchCheckNumbers`: `--batch-size` numbers per call.
    Batch,
    /// `StreamCheckNumbers`: one stream per call, sending `--batch-size`
    /// requests and reading all results.
    Stream,
    /// `PublishDisconnections`: `--batch-size` new events per call (unique
    /// event ids, numbers of the query pool, yesterday's date), as the
    /// operator of `--cert`, which must be authoritative for them (e.g.
    /// `+1` for the random pool). Item errors count refusals; DUPLICATE
    /// would mean ids were reused.
    Publish,
    /// Fan-out to watchers: `PublishDisconnections` as in `publish`, of
    /// numbers that every platform of `--watchers` watches, while each of
    /// them follows `WatchDisconnections`; reports delivered events/s,
    /// publish-to-watcher latency, missing and duplicate events (see
    /// [`crate::cli::bench_fanout`]).
    Fanout,
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Method::Check => "check",
            Method::Batch => "batch",
            Method::Stream => "stream",
            Method::Publish => "publish",
            Method::Fanout => "fanout",
        })
    }
}

/// Options of `reassigned bench` (flatten into the subcommand).
#[derive(Clone, Debug, clap::Args)]
pub struct BenchOptions {
    /// The server to load and the client's TLS identity.
    #[command(flatten)]
    pub tls: TlsTarget,
    /// The RPC to call: check (one number), batch (--batch-size numbers) or
    /// stream (one stream of --batch-size requests per call).
    #[arg(long, value_enum, default_value_t = Method::Check)]
    pub method: Method,
    /// Calls in flight at once (closed loop: workers; open loop: the cap).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// HTTP/2 connections; calls are spread over them round-robin.
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// How long to measure, e.g. `10s`, `2m`, `500ms`.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Load before measuring (not counted), e.g. `2s`; `0s` for none.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Open loop: start calls at this fixed rate (calls per second) and
    /// measure latency from each call's scheduled time. Without it, closed
    /// loop.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Numbers per batch call, and requests per stream call.
    #[arg(long, default_value_t = 1000)]
    pub batch_size: usize,
    /// Where the numbers come from: a register directory of manifests (the
    /// newest snapshot and the deltas after it), one manifest (`.json`), or a
    /// `queries.csv` (header `phone_number,since`, used as is). Without it,
    /// random +1 numbers.
    #[arg(long, value_name = "DIR_OR_MANIFEST")]
    pub data: Option<PathBuf>,
    /// With a register: the share of queries that are numbers in it; the
    /// others are numbers under the same prefixes that are not in it.
    #[arg(long, default_value_t = 0.04)]
    pub hit_ratio: f64,
    /// The `since` date of every query (`YYYY-MM-DD`), except those read
    /// from a queries.csv.
    #[arg(long, default_value = "2022-01-01")]
    pub since: String,
    /// A call still unanswered after this long is abandoned and counted as
    /// CLIENT_TIMEOUT (at most 60s).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Ask for a signed receipt on every answer (`want_receipt`,
    /// `want_receipts`), to measure what signing costs.
    #[arg(long)]
    pub receipts: bool,
    /// A bearer token sent with every call (`authorization: Bearer ...`), as
    /// minted by `reassigned token mint`; also from `REASSIGNED_BENCH_TOKEN`.
    #[arg(long, env = "REASSIGNED_BENCH_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Call the REST face instead of gRPC: the CAMARA check (`POST
    /// /number-recycling/v0.2/check`) over HTTP/1.1 keep-alive, one
    /// connection per worker (`--connections` is not used); `--target` is
    /// the server's `--rest-listen` address. Only `--method check`.
    #[arg(long)]
    pub rest: bool,
    /// Seed of the query generator (same seed and data, same queries).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print the report as JSON on stdout instead of text.
    #[arg(long)]
    pub json: bool,
    /// `--method fanout`: a directory with one `NAME.pem` + `NAME.key` per
    /// watching platform (and `NAME.token` when the server requires tokens:
    /// scopes `watch:write watch:read`), and no other `.pem`.
    #[arg(long, value_name = "DIR")]
    pub watchers: Option<PathBuf>,
    /// `--method fanout`: numbers on each platform's watch list: the same
    /// random +1 numbers (from `--seed`) for every platform, and the pool
    /// the published events are drawn from.
    #[arg(long, default_value_t = 10_000)]
    pub watch_numbers: usize,
    /// `--method fanout`: the lists are already loaded (an earlier run with
    /// the same `--watch-numbers` and `--seed`): no AddWatches, only the
    /// CountWatches check.
    #[arg(long)]
    pub skip_load: bool,
    /// `--method fanout`: after the last publication, how long at most to
    /// wait for every watcher to receive every acknowledged event.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub drain: Duration,
}

impl BenchOptions {
    /// Checks the values that clap cannot.
    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(self.concurrency >= 1, "--concurrency must be at least 1");
        ensure!(self.connections >= 1, "--connections must be at least 1");
        ensure!(!self.duration.is_zero(), "--duration must be more than 0");
        ensure!(
            !self.timeout.is_zero() && self.timeout <= MAX_TIMEOUT,
            "--timeout must be more than 0 and at most 60s"
        );
        if let Some(rate) = self.rate {
            ensure!(
                rate.is_finite() && rate > 0.0,
                "--rate must be a positive number of calls per second"
            );
        }
        ensure!(
            (1..=MAX_BATCH_SIZE).contains(&self.batch_size),
            "--batch-size must be 1 to {MAX_BATCH_SIZE}"
        );
        ensure!(
            (0.0..=1.0).contains(&self.hit_ratio),
            "--hit-ratio must be between 0 and 1"
        );
        Date::parse(&self.since).map_err(|e| anyhow::anyhow!("--since {:?}: {e}", self.since))?;
        ensure!(
            !self.rest || (self.method == Method::Check && !self.receipts),
            "--rest measures the CAMARA check: --method check, without --receipts"
        );
        if self.method == Method::Fanout {
            ensure!(
                self.watchers.is_some(),
                "--method fanout needs --watchers DIR (one NAME.pem + NAME.key per platform)"
            );
            ensure!(
                (1..=crate::cli::bench_fanout::MAX_WATCH_NUMBERS).contains(&self.watch_numbers),
                "--watch-numbers must be 1 to {}",
                crate::cli::bench_fanout::MAX_WATCH_NUMBERS
            );
            ensure!(
                self.batch_size <= crate::api::feed::MAX_PUBLISH_ITEMS,
                "--batch-size must be at most {} for --method fanout (items per PublishDisconnections)",
                crate::api::feed::MAX_PUBLISH_ITEMS
            );
            ensure!(
                self.data.is_none(),
                "--method fanout publishes numbers of its watched pool: no --data"
            );
        }
        Ok(())
    }

    /// Numbers sent per call.
    fn numbers_per_call(&self) -> usize {
        match self.method {
            Method::Check => 1,
            Method::Batch | Method::Stream | Method::Publish | Method::Fanout => self.batch_size,
        }
    }
}

/// Parses a duration: a number followed by `ms`, `s`, `m` or `h` (`10s`,
/// `2m`, `500ms`, `1.5s`); a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let bad = || format!("{text:?} is not a duration (e.g. 10s, 2m, 500ms)");
    if number.is_empty() {
        return Err(bad());
    }
    let value: f64 = number.parse().map_err(|_| bad())?;
    let unit_secs = match unit {
        "ms" => 0.001,
        "s" | "" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(bad()),
    };
    let secs = value * unit_secs;
    if !secs.is_finite() || secs > 1e9 {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(secs))
}

// ---------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------

/// How many answers of each status came back.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StatusCounts {
    /// `REASSIGNED` answers (hits whose disconnect is on or after `since`).
    #[serde(rename = "REASSIGNED")]
    pub reassigned: u64,
    /// `NOT_REASSIGNED` answers.
    #[serde(rename = "NOT_REASSIGNED")]
    pub not_reassigned: u64,
    /// `NO_DATA` answers.
    #[serde(rename = "NO_DATA")]
    pub no_data: u64,
    /// Answers with a status this client does not know.
    #[serde(rename = "UNSPECIFIED")]
    pub unspecified: u64,
}

impl StatusCounts {
    fn count(&mut self, status: i32) {
        match pb::ReassignmentStatus::try_from(status) {
            Ok(pb::ReassignmentStatus::Reassigned) => self.reassigned += 1,
            Ok(pb::ReassignmentStatus::NotReassigned) => self.not_reassigned += 1,
            Ok(pb::ReassignmentStatus::NoData) => self.no_data += 1,
            _ => self.unspecified += 1,
        }
    }

    fn add(&mut self, other: &StatusCounts) {
        self.reassigned += other.reassigned;
        self.not_reassigned += other.not_reassigned;
        self.no_data += other.no_data;
        self.unspecified += other.unspecified;
    }

    fn total(&self) -> u64 {
        self.reassigned + self.not_reassigned + self.no_data + self.unspecified
    }
}

/// The result of a [`bench()`] run (`--json` prints it as is).
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// The RPC called.
    pub method: Method,
    /// The server, HOST:PORT.
    pub target: String,
    /// Calls in flight at most.
    pub concurrency: usize,
    /// HTTP/2 connections.
    pub connections: usize,
    /// Open loop: the offered rate in calls per second; `None`: closed loop.
    pub rate: Option<f64>,
    /// Numbers per call (1 for check).
    pub numbers_per_call: usize,
    /// Where the queries came from (a description; never a number).
    pub data: String,
    /// The requested share of hits, when drawn from a register.
    pub hit_ratio: Option<f64>,
    /// Warmup, in seconds (not measured).
    pub warmup_secs: f64,
    /// The requested measuring time, in seconds.
    pub duration_secs: f64,
    /// From the end of the warmup to the last measured answer, in seconds:
    /// the divisor of the rates.
    pub elapsed_secs: f64,
    /// Measured calls that completed, successfully or not.
    pub calls: u64,
    /// Measured calls that succeeded.
    pub ok_calls: u64,
    /// Measured calls that failed (see `errors`).
    pub failed_calls: u64,
    /// Open loop: calls scheduled inside the measured window that had not
    /// started when it closed, because the server did not keep up with
    /// `rate`. Always 0 in a closed loop.
    pub unsent_calls: u64,
    /// Numbers answered by successful calls (one per result, errors included).
    pub numbers: u64,
    /// Successful calls per second.
    pub calls_per_sec: f64,
    /// Numbers answered per second.
    pub numbers_per_sec: f64,
    /// Latency of successful calls, microseconds (per stream for `stream`;
    /// open loop: from the scheduled time when the call started late).
    pub latency_us: Latency,
    /// Failed calls by gRPC code name (`UNAVAILABLE`, ...), plus
    /// `CLIENT_TIMEOUT` and `SHORT_STREAM`.
    pub errors: BTreeMap<String, u64>,
    /// Per-item errors inside successful batch and stream calls, by code.
    pub item_errors: BTreeMap<String, u64>,
    /// Answers by status.
    pub statuses: StatusCounts,
    /// Whether receipts were asked for.
    pub receipts_requested: bool,
    /// Answers that carried a signed receipt.
    pub receipts: u64,
    /// `fanout`: the delivery side's figures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fanout: Option<crate::cli::bench_fanout::FanoutReport>,
}

fn share(part: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        100.0 * part as f64 / total as f64
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = match self.rate {
            Some(rate) => format!("open loop at {rate} calls/s"),
            None => "closed loop".to_owned(),
        };
        writeln!(
            f,
            "bench {} -> {}: {} in flight, {} connection(s), {mode}, {:.1}s measured after {:.1}s warmup",
            self.method, self.target, self.concurrency, self.connections, self.elapsed_secs, self.warmup_secs
        )?;
        match self.hit_ratio {
            Some(ratio) => writeln!(f, "queries      {} (hit ratio {ratio})", self.data)?,
            None => writeln!(f, "queries      {}", self.data)?,
        }
        writeln!(
            f,
            "calls        {} ({} ok, {} failed), {} numbers per call",
            self.calls, self.ok_calls, self.failed_calls, self.numbers_per_call
        )?;
        writeln!(f, "numbers      {}", self.numbers)?;
        writeln!(f, "calls/s      {:.1} (successful)", self.calls_per_sec)?;
        writeln!(f, "numbers/s    {:.1}", self.numbers_per_sec)?;
        writeln!(f, "latency ms   {}", self.latency_us)?;
        let s = &self.statuses;
        let total = s.total();
        write!(
            f,
            "statuses     REASSIGNED {} ({:.2}%)  NOT_REASSIGNED {} ({:.2}%)  NO_DATA {} ({:.2}%)",
            s.reassigned,
            share(s.reassigned, total),
            s.not_reassigned,
            share(s.not_reassigned, total),
            s.no_data,
            share(s.no_data, total)
        )?;
        if s.unspecified > 0 {
            write!(f, "  UNSPECIFIED {}", s.unspecified)?;
        }
        writeln!(f)?;
        writeln!(f, "errors       {}", counts(&self.errors))?;
        if self.unsent_calls > 0 {
            writeln!(
                f,
                "unsent       {} calls scheduled in the window never started: the server did not keep up with --rate",
                self.unsent_calls
            )?;
        }
        if !self.item_errors.is_empty() {
            writeln!(f, "item errors  {}", counts(&self.item_errors))?;
        }
        if self.receipts_requested || self.receipts > 0 {
            writeln!(f, "receipts     {} answers carried one", self.receipts)?;
        }
        if let Some(fanout) = &self.fanout {
            write!(f, "{fanout}")?;
        }
        Ok(())
    }
}

fn counts(map: &BTreeMap<String, u64>) -> String {
    if map.is_empty() {
        return "none".to_owned();
    }
    map.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------
// Queries
// ---------------------------------------------------------------------------

/// Where the queries come from.
enum Source {
    /// Random `+1` numbers.
    Random,
    /// Numbers of a register: `numbers` sorted and unique
    /// ([`PhoneNumber::value`]s), with the covered prefixes and their lengths.
    Register {
        numbers: Vec<u64>,
        prefixes: Vec<(Prefix, usize)>,
        description: String,
    },
    /// Queries listed in a file, used as they are.
    Listed {
        rows: Vec<pb::CheckNumberRequest>,
        description: String,
    },
    /// Numbers drawn at random (with repeats) from a pool of
    /// [`PhoneNumber::value`]s: the numbers the fan-out's platforms watch.
    Pool {
        numbers: Arc<Vec<u64>>,
        description: String,
    },
}

impl Source {
    fn description(&self) -> String {
        match self {
            Source::Random => "random +1 numbers".to_owned(),
            Source::Register { description, .. }
            | Source::Listed { description, .. }
            | Source::Pool { description, .. } => description.clone(),
        }
    }
}

/// Loads `--data`: a register directory, one manifest, or a queries.csv.
fn load_source(path: &Path) -> anyhow::Result<Source> {
    if path.is_dir() {
        let mut manifests = Vec::new();
        for entry in std::fs::read_dir(path).with_context(|| format!("cannot read {}", path.display()))? {
            let file = entry
                .with_context(|| format!("cannot read {}", path.display()))?
                .path();
            if file.extension().is_some_and(|e| e == "json") && file.is_file() {
                manifests.push(Manifest::load(&file)?);
            }
        }
        if manifests.is_empty() {
            let queries = path.join("queries.csv");
            if queries.is_file() {
                return load_queries(&queries);
            }
            bail!("{} holds no manifest (*.json) and no queries.csv", path.display());
        }
        return load_register(manifests, path);
    }
    let name = path.to_string_lossy();
    if name.ends_with(".json") {
        let manifest = Manifest::load(path)?;
        load_register(vec![manifest], path)
    } else if name.ends_with(".csv") {
        load_queries(path)
    } else {
        bail!(
            "--data {}: expected a directory of manifests, a manifest (.json) or a queries.csv",
            path.display()
        )
    }
}

/// The newest snapshot and the deltas after it (or, without a snapshot, all
/// the files given): their numbers, merged.
fn load_register(mut manifests: Vec<Manifest>, path: &Path) -> anyhow::Result<Source> {
    manifests.sort_by_key(|m| m.sequence);
    let base = manifests
        .iter()
        .filter(|m| m.kind == Kind::Snapshot)
        .map(|m| m.sequence)
        .max();
    let chosen: Vec<&Manifest> = manifests
        .iter()
        .filter(|m| base.is_none_or(|b| m.sequence >= b))
        .collect();
    let mut prefixes = Vec::new();
    let mut numbers = Vec::new();
    for manifest in &chosen {
        if manifest.kind == Kind::Snapshot {
            prefixes = manifest
                .prefixes()
                .map_err(|e| anyhow::anyhow!("{}: {e}", manifest.describe()))?
                .into_iter()
                .map(|p| (p, p.to_string().len().saturating_sub(1)))
                .collect();
        }
        let records = read_records(manifest, &mut NoProgress)?;
        numbers.extend(records.numbers());
    }
    numbers.sort_unstable();
    numbers.dedup();
    ensure!(
        !numbers.is_empty(),
        "{}: the data set holds no numbers",
        path.display()
    );
    let description = format!(
        "register {} ({} file(s), {} numbers)",
        path.display(),
        chosen.len(),
        numbers.len()
    );
    Ok(Source::Register {
        numbers,
        prefixes,
        description,
    })
}

/// Reads a `queries.csv`: header `phone_number,since` (further columns are
/// ignored), then one query per line.
fn load_queries(path: &Path) -> anyhow::Result<Source> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let rows = parse_queries(&text).with_context(|| format!("{}", path.display()))?;
    let description = format!("queries {} ({} rows)", path.display(), rows.len());
    Ok(Source::Listed { rows, description })
}

fn parse_queries(text: &str) -> anyhow::Result<Vec<pb::CheckNumberRequest>> {
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default().trim_end_matches('\r');
    ensure!(
        header == "phone_number,since" || header.starts_with("phone_number,since,"),
        "the first line must be the header `phone_number,since`"
    );
    let mut rows = Vec::new();
    for (i, line) in lines.enumerate() {
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            continue;
        }
        let mut fields = line.split(',');
        let (Some(number), Some(since)) = (fields.next(), fields.next()) else {
            bail!("line {}: expected phone_number,since", i + 2);
        };
        // The messages name the line, never the number.
        PhoneNumber::parse(number).map_err(|e| anyhow::anyhow!("line {}: phone_number {e}", i + 2))?;
        Date::parse(since).map_err(|e| anyhow::anyhow!("line {}: since {e}", i + 2))?;
        rows.push(pb::CheckNumberRequest {
            phone_number: number.to_owned(),
            since: since.to_owned(),
            ..Default::default()
        });
        if rows.len() >= MAX_QUERY_ROWS {
            break;
        }
    }
    ensure!(!rows.is_empty(), "no queries after the header");
    Ok(rows)
}

fn digit_count(mut value: u64) -> u32 {
    let mut count = 1;
    while value >= 10 {
        value /= 10;
        count += 1;
    }
    count
}

/// A number that is not in `set` (sorted): a random member with its last
/// digits replaced, keeping its covered prefix (the longest of `prefixes`
/// it starts with, else its first digit). Starts with the last
/// [`MISS_DIGITS`] digits and widens when the neighbourhood is full. `None`
/// only if every try was a member.
fn miss_number(rng: &mut StdRng, set: &[u64], prefixes: &[(Prefix, usize)]) -> Option<u64> {
    let base = *set.get(rng.random_range(0..set.len().max(1)))?;
    let digits = digit_count(base);
    let kept = PhoneNumber::from_value(base)
        .and_then(|n| {
            prefixes
                .iter()
                .filter(|(p, _)| n.has_prefix(p))
                .map(|&(_, len)| len as u32)
                .max()
        })
        .unwrap_or(1)
        .clamp(1, digits);
    let free = digits - kept;
    if free == 0 {
        return None;
    }
    for attempt in 0..MISS_TRIES {
        let replaced = (MISS_DIGITS + attempt / 8).min(free);
        let span = 10u64.pow(replaced);
        let candidate = base - base % span + rng.random_range(0..span);
        if set.binary_search(&candidate).is_err() {
            return Some(candidate);
        }
    }
    None
}

/// `len` queries from `source`; with a register, exactly
/// `round(len * hit_ratio)` of them are members, in random order.
fn build_queries(
    source: &Source,
    len: usize,
    hit_ratio: f64,
    since: &str,
    seed: u64,
) -> anyhow::Result<Vec<pb::CheckNumberRequest>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let request = |value: u64| pb::CheckNumberRequest {
        phone_number: format!("+{value}"),
        since: since.to_owned(),
        ..Default::default()
    };
    match source {
        Source::Random => Ok((0..len).map(|_| request(random_us_number(&mut rng))).collect()),
        Source::Listed { rows, .. } => Ok(rows.iter().cycle().take(len.max(rows.len())).cloned().collect()),
        Source::Pool { numbers, .. } => {
            ensure!(!numbers.is_empty(), "the pool of numbers is empty");
            Ok((0..len)
                .map(|_| request(numbers[rng.random_range(0..numbers.len())]))
                .collect())
        }
        Source::Register {
            numbers, prefixes, ..
        } => {
            let hits = ((len as f64) * hit_ratio).round() as usize;
            let mut out = Vec::with_capacity(len);
            for _ in 0..hits.min(len) {
                let value = numbers[rng.random_range(0..numbers.len())];
                out.push(request(value));
            }
            while out.len() < len {
                let value = miss_number(&mut rng, numbers, prefixes).context(
                    "cannot find numbers that are not in the data set near its numbers (is it saturated?)",
                )?;
                out.push(request(value));
            }
            out.shuffle(&mut rng);
            Ok(out)
        }
    }
}

/// The pre-built messages of a run.
struct Workload {
    /// `check`: one request per call.
    checks: Vec<pb::CheckNumberRequest>,
    /// `check` over REST: the JSON body of each of `checks`.
    rest_bodies: Vec<bytes::Bytes>,
    /// `batch`, `stream` and `publish`: one batch per call.
    batches: Vec<pb::BatchCheckNumbersRequest>,
    /// `publish`: calls made so far (event ids are unique per call).
    publish_calls: AtomicU64,
    /// `publish`: this run's random part of the event ids.
    run_id: u32,
    /// `publish`: the disconnect date sent.
    yesterday: String,
    /// `fanout`: the event ids and the acknowledged events, shared with
    /// the watchers.
    fanout: Option<Arc<crate::cli::bench_fanout::Publisher>>,
}

impl Workload {
    fn build(opts: &BenchOptions, source: &Source) -> anyhow::Result<Self> {
        let per_call = opts.numbers_per_call();
        let wanted = POOL_NUMBERS.max(per_call * 8);
        let wanted = match source {
            Source::Listed { rows, .. } => wanted.max(rows.len()),
            _ => wanted,
        };
        let len = wanted.div_ceil(per_call) * per_call;
        let mut queries = build_queries(source, len, opts.hit_ratio, &opts.since, opts.seed)?;
        // A batch asks for receipts once, for all its checks.
        if opts.receipts && opts.method != Method::Batch {
            for query in &mut queries {
                query.want_receipt = true;
            }
        }
        Ok(match opts.method {
            Method::Check => Self {
                rest_bodies: if opts.rest {
                    queries
                        .iter()
                        .map(|q| {
                            let body = crate::rest::CheckBody {
                                phone_number: Some(q.phone_number.clone()),
                                specified_date: q.since.clone(),
                            };
                            serde_json::to_vec(&body).map(bytes::Bytes::from)
                        })
                        .collect::<Result<_, _>>()?
                } else {
                    Vec::new()
                },
                checks: queries,
                batches: Vec::new(),
                publish_calls: AtomicU64::new(0),
                run_id: rand::random(),
                yesterday: Date::today_utc().add_days(-1).to_string(),
                fanout: None,
            },
            Method::Batch | Method::Stream | Method::Publish | Method::Fanout => {
                let mut batches = Vec::with_capacity(len / per_call);
                let mut queries = queries.into_iter();
                loop {
                    let checks: Vec<_> = queries.by_ref().take(per_call).collect();
                    if checks.len() < per_call {
                        break;
                    }
                    batches.push(pb::BatchCheckNumbersRequest {
                        checks,
                        want_receipts: opts.receipts,
                    });
                }
                Self {
                    checks: Vec::new(),
                    rest_bodies: Vec::new(),
                    batches,
                    publish_calls: AtomicU64::new(0),
                    run_id: rand::random(),
                    yesterday: Date::today_utc().add_days(-1).to_string(),
                    fanout: None,
                }
            }
        })
    }

    fn len(&self) -> usize {
        self.checks.len().max(self.batches.len())
    }
}

// ---------------------------------------------------------------------------
// The load loop
// ---------------------------------------------------------------------------

/// What all workers share.
struct Shared {
    method: Method,
    started: Instant,
    measure_start: Instant,
    end: Instant,
    rate: Option<f64>,
    call_timeout: Duration,
    /// Open loop: the index of the next call to schedule.
    next_call: AtomicU64,
    /// All completed calls, for the progress line.
    done: AtomicU64,
    /// All failed calls, for the progress line.
    failed: AtomicU64,
    first_error_shown: AtomicBool,
    /// `fanout`: events delivered to the watchers so far, for the progress
    /// line.
    delivered: Option<Arc<AtomicU64>>,
}

/// Answers and per-item errors of successful calls.
#[derive(Default)]
struct Tally {
    statuses: StatusCounts,
    receipts: u64,
    item_errors: BTreeMap<String, u64>,
    numbers: u64,
}

impl Tally {
    fn result(&mut self, result: &pb::BatchCheckResult) {
        self.numbers += 1;
        match &result.result {
            Some(pb::batch_check_result::Result::Answer(answer)) => self.answer(answer),
            Some(pb::batch_check_result::Result::Error(error)) => {
                if let Some(n) = self.item_errors.get_mut(error.code.as_str()) {
                    *n += 1;
                } else {
                    self.item_errors.insert(error.code.clone(), 1);
                }
            }
            None => self.statuses.unspecified += 1,
        }
    }

    /// One item of a publish call: accepted items count as numbers;
    /// refusals (and duplicates) as item errors by code.
    fn published(&mut self, result: &pb::PublishResult) {
        self.numbers += 1;
        let code = match &result.outcome {
            Some(pb::publish_result::Outcome::Accepted(_)) => return,
            Some(pb::publish_result::Outcome::Duplicate(_)) => "DUPLICATE",
            Some(pb::publish_result::Outcome::Error(e)) => e.code.as_str(),
            None => "NO_OUTCOME",
        };
        *self.item_errors.entry(code.to_owned()).or_default() += 1;
    }

    fn answer(&mut self, answer: &pb::CheckNumberResponse) {
        self.statuses.count(answer.status);
        if !answer.receipt.is_empty() {
            self.receipts += 1;
        }
    }

    fn add(&mut self, other: &Tally) {
        self.statuses.add(&other.statuses);
        self.receipts += other.receipts;
        for (code, n) in &other.item_errors {
            *self.item_errors.entry(code.clone()).or_default() += n;
        }
        self.numbers += other.numbers;
    }
}

/// One worker's measurements.
struct Stats {
    hist: Histogram<u64>,
    ok: u64,
    errors: BTreeMap<&'static str, u64>,
    tally: Tally,
    last_done: Option<Instant>,
}

impl Stats {
    fn new() -> anyhow::Result<Self> {
        let top = u64::try_from(MAX_TIMEOUT.as_micros()).unwrap_or(u64::MAX);
        Ok(Self {
            hist: Histogram::new_with_bounds(1, top, 3).context("cannot make a latency histogram")?,
            ok: 0,
            errors: BTreeMap::new(),
            tally: Tally::default(),
            last_done: None,
        })
    }

    fn add(&mut self, other: &Stats) -> anyhow::Result<()> {
        self.hist
            .add(&other.hist)
            .map_err(|e| anyhow::anyhow!("cannot merge latency histograms: {e:?}"))?;
        self.ok += other.ok;
        for (code, n) in &other.errors {
            *self.errors.entry(code).or_default() += n;
        }
        self.tally.add(&other.tally);
        self.last_done = self.last_done.max(other.last_done);
        Ok(())
    }
}

/// Why a call failed.
enum Failure {
    Status(Status),
    Timeout,
    ShortStream,
    /// A REST answer other than 200: its status and body.
    Http(http::StatusCode, String),
    /// A REST call that got no answer (connection or protocol error).
    Transport(String),
}

impl Failure {
    fn key(&self) -> &'static str {
        match self {
            Failure::Status(status) => code_name(status.code()),
            Failure::Timeout => CLIENT_TIMEOUT,
            Failure::ShortStream => SHORT_STREAM,
            Failure::Http(status, _) => status.canonical_reason().unwrap_or("HTTP_ERROR"),
            Failure::Transport(_) => "TRANSPORT",
        }
    }

    fn describe(&self) -> String {
        match self {
            Failure::Status(status) => format!("{}: {}", code_name(status.code()), status.message()),
            Failure::Timeout => format!("{CLIENT_TIMEOUT}: no answer within --timeout"),
            Failure::ShortStream => {
                format!("{SHORT_STREAM}: the stream ended before every request was answered")
            }
            Failure::Http(status, body) => format!("HTTP {status}: {body}"),
            Failure::Transport(e) => format!("TRANSPORT: {e}"),
        }
    }
}

impl From<Status> for Failure {
    fn from(status: Status) -> Self {
        Failure::Status(status)
    }
}

/// Makes one call with the pre-built message at `index`, counting its
/// answers into `tally`.
async fn call(
    client: &mut Caller,
    workload: &Arc<Workload>,
    method: Method,
    index: usize,
    tally: &mut Tally,
) -> Result<(), Failure> {
    let client = match client {
        Caller::Grpc(client) => client,
        Caller::Rest(client) => return rest_call(client, workload, index, tally).await,
    };
    match method {
        Method::Check => {
            let response = client
                .numbers
                .check_number(workload.checks[index].clone())
                .await?;
            tally.numbers += 1;
            tally.answer(response.get_ref());
        }
        Method::Batch => {
            let response = client
                .numbers
                .batch_check_numbers(workload.batches[index].clone())
                .await?;
            for result in &response.get_ref().results {
                tally.result(result);
            }
        }
        Method::Publish => {
            let call = workload.publish_calls.fetch_add(1, Ordering::Relaxed);
            let items = workload.batches[index]
                .checks
                .iter()
                .enumerate()
                .map(|(i, check)| pb::Disconnection {
                    event_id: format!("bench-{}-{call}-{i}", workload.run_id),
                    phone_number: check.phone_number.clone(),
                    disconnect_date: workload.yesterday.clone(),
                })
                .collect();
            let response = client
                .feed
                .publish_disconnections(pb::PublishDisconnectionsRequest { items })
                .await?;
            for result in &response.get_ref().results {
                tally.published(result);
            }
        }
        Method::Fanout => {
            let Some(publisher) = &workload.fanout else {
                return Err(Failure::Transport("the fan-out's watchers are not ready".into()));
            };
            let checks = &workload.batches[index].checks;
            let first = publisher.reserve(checks.len());
            let sent_us = publisher.now_us();
            let items = checks
                .iter()
                .zip(first..)
                .map(|(check, seq)| pb::Disconnection {
                    event_id: publisher.event_id(seq, sent_us),
                    phone_number: check.phone_number.clone(),
                    disconnect_date: workload.yesterday.clone(),
                })
                .collect();
            let response = client
                .feed
                .publish_disconnections(pb::PublishDisconnectionsRequest { items })
                .await?;
            let mut acked = Vec::with_capacity(checks.len());
            for (result, seq) in response.get_ref().results.iter().zip(first..) {
                tally.published(result);
                if matches!(result.outcome, Some(pb::publish_result::Outcome::Accepted(_))) {
                    acked.push(seq);
                }
            }
            publisher.acked(&acked);
        }
        Method::Stream => {
            let sent = workload.batches[index].checks.len();
            let source = Arc::clone(workload);
            let requests =
                futures_util::stream::iter(0..sent).map(move |i| source.batches[index].checks[i].clone());
            let mut results = client.numbers.stream_check_numbers(requests).await?.into_inner();
            let mut received = 0;
            while let Some(result) = results.message().await? {
                tally.result(&result);
                received += 1;
            }
            if received != sent {
                return Err(Failure::ShortStream);
            }
        }
    }
    Ok(())
}

/// One CAMARA check over REST with the pre-built body at `index`.
async fn rest_call(
    client: &mut crate::cli::rest_client::RestClient,
    workload: &Workload,
    index: usize,
    tally: &mut Tally,
) -> Result<(), Failure> {
    let response = client
        .send(
            http::Method::POST,
            crate::rest::CHECK_PATH,
            &[],
            workload.rest_bodies[index].clone(),
        )
        .await
        .map_err(|e| Failure::Transport(format!("{e:#}")))?;
    if response.status != http::StatusCode::OK {
        let body = String::from_utf8_lossy(&response.body).into_owned();
        return Err(Failure::Http(response.status, body));
    }
    let result: crate::rest::CheckResult = serde_json::from_slice(&response.body)
        .map_err(|e| Failure::Transport(format!("the answer is not CAMARA's: {e}")))?;
    tally.numbers += 1;
    tally.statuses.count(if result.phone_number_recycled {
        pb::ReassignmentStatus::Reassigned as i32
    } else {
        pb::ReassignmentStatus::NotReassigned as i32
    });
    Ok(())
}

/// How a worker calls: a gRPC client (shared channel) or its own REST
/// connection.
enum Caller {
    Grpc(Box<BenchClient>),
    Rest(crate::cli::rest_client::RestClient),
}

/// The bench's clients of one connection, adding the bearer token, if any.
#[derive(Clone)]
struct BenchClient {
    numbers: ReassignedNumbersClient<InterceptedService<Channel, Bearer>>,
    feed: DisconnectionFeedClient<InterceptedService<Channel, Bearer>>,
}

/// One worker: calls until the end of the run, one at a time.
async fn worker(
    mut client: Caller,
    workload: Arc<Workload>,
    shared: Arc<Shared>,
    mut index: usize,
) -> anyhow::Result<Stats> {
    let mut stats = Stats::new()?;
    let mut warmup = Tally::default();
    let len = workload.len();
    loop {
        // `slot`: when the call belongs (start, or scheduled time) and so
        // whether it is measured; `intended`: where its latency starts.
        let (slot, intended) = match shared.rate {
            None => {
                let now = Instant::now();
                if now >= shared.end {
                    break;
                }
                (now, now)
            }
            Some(rate) => {
                let i = shared.next_call.fetch_add(1, Ordering::Relaxed);
                let scheduled = shared.started + Duration::from_secs_f64(i as f64 / rate);
                let now = Instant::now();
                // Past the end, calls still scheduled inside the window are
                // not started (counted as unsent), so the run stays bounded.
                if scheduled >= shared.end || now >= shared.end {
                    break;
                }
                if scheduled > now {
                    // Idle until the schedule: the timer's lateness is ours,
                    // not the server's.
                    tokio::time::sleep_until(scheduled.into()).await;
                    (scheduled, Instant::now())
                } else {
                    // Behind schedule because every worker was busy: the
                    // wait counts.
                    (scheduled, scheduled)
                }
            }
        };
        let measured = slot >= shared.measure_start;
        let tally = if measured { &mut stats.tally } else { &mut warmup };
        let outcome = match tokio::time::timeout(
            shared.call_timeout,
            call(&mut client, &workload, shared.method, index, tally),
        )
        .await
        {
            Ok(outcome) => outcome,
            Err(_elapsed) => Err(Failure::Timeout),
        };
        let done = Instant::now();
        index = (index + 1) % len;
        shared.done.fetch_add(1, Ordering::Relaxed);
        if let Err(failure) = &outcome {
            shared.failed.fetch_add(1, Ordering::Relaxed);
            if !shared.first_error_shown.swap(true, Ordering::Relaxed) {
                eprintln!("bench: first error: {}", failure.describe());
            }
        }
        if !measured {
            continue;
        }
        stats.last_done = Some(done);
        match outcome {
            Ok(()) => {
                stats.ok += 1;
                let micros = u64::try_from(done.duration_since(intended).as_micros()).unwrap_or(u64::MAX);
                stats.hist.saturating_record(micros.max(1));
            }
            Err(failure) => *stats.errors.entry(failure.key()).or_default() += 1,
        }
    }
    Ok(stats)
}

/// Open loop: how many calls are scheduled before `offset` from the start
/// (call `i` at `i / rate`).
fn scheduled_before(offset: Duration, rate: f64) -> u64 {
    (offset.as_secs_f64() * rate).ceil() as u64
}

/// Prints a progress line on stderr about once per second.
async fn progress(shared: Arc<Shared>) {
    let period = Duration::from_secs(1);
    let mut ticker = tokio::time::interval_at((shared.started + period).into(), period);
    let (mut last_done, mut last_at, mut last_delivered) = (0u64, shared.started, 0u64);
    loop {
        ticker.tick().await;
        let now = Instant::now();
        let done = shared.done.load(Ordering::Relaxed);
        let failed = shared.failed.load(Ordering::Relaxed);
        let secs = now.duration_since(last_at).as_secs_f64();
        let rate = if secs > 0.0 {
            (done - last_done) as f64 / secs
        } else {
            0.0
        };
        let phase = if now < shared.measure_start {
            "warmup"
        } else if now < shared.end {
            "run"
        } else {
            "drain"
        };
        let delivered = shared.delivered.as_ref().map(|d| d.load(Ordering::Relaxed));
        let delivered_line = match delivered {
            Some(n) if secs > 0.0 => format!(" {:>10.0} delivered/s", (n - last_delivered) as f64 / secs),
            _ => String::new(),
        };
        eprintln!(
            "bench: {phase:<6} {:>6.1}s {rate:>10.0} calls/s {failed:>8} errors{delivered_line}",
            now.duration_since(shared.started).as_secs_f64()
        );
        (last_done, last_at, last_delivered) = (done, now, delivered.unwrap_or(0));
    }
}

/// Opens `opts.connections` HTTP/2 connections over mutual TLS.
async fn connect(opts: &BenchOptions) -> anyhow::Result<Vec<Channel>> {
    let endpoint = opts
        .tls
        .endpoint()?
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .buffer_size(opts.concurrency.max(1024));
    let mut channels = Vec::with_capacity(opts.connections);
    for _ in 0..opts.connections {
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("cannot connect to {} over TLS", opts.tls.target))?;
        channels.push(channel);
    }
    Ok(channels)
}

/// Runs a load test as `opts` says and reports on it. Prints a progress line
/// on stderr about once per second; prints nothing else. Stops by itself
/// after the warmup, the duration and at most `--timeout` for the last calls.
pub async fn bench(opts: &BenchOptions) -> anyhow::Result<BenchReport> {
    opts.validate()?;
    let mut pool = None;
    let source = match &opts.data {
        None if opts.method == Method::Fanout => {
            let (n, seed) = (opts.watch_numbers, opts.seed);
            let numbers = Arc::new(
                tokio::task::spawn_blocking(move || crate::cli::bench_fanout::watched_numbers(n, seed))
                    .await
                    .context("the pool builder panicked")?,
            );
            pool = Some(Arc::clone(&numbers));
            Source::Pool {
                numbers,
                description: format!("{n} random +1 numbers watched by every platform (seed {seed})"),
            }
        }
        Some(path) => {
            let path = path.clone();
            tokio::task::spawn_blocking(move || load_source(&path))
                .await
                .context("the data loader panicked")??
        }
        None => Source::Random,
    };
    let from_register = matches!(source, Source::Register { .. });
    let description = source.description();
    let mut workload = {
        let opts = opts.clone();
        tokio::task::spawn_blocking(move || Workload::build(&opts, &source))
            .await
            .context("the query builder panicked")??
    };
    eprintln!("bench: {} pre-built calls from {description}", workload.len());
    // Fan-out: the watchers load their lists and open their streams before
    // the first publication.
    let fanout = match &pool {
        Some(pool) => Some(
            crate::cli::bench_fanout::Fanout::prepare(
                &crate::cli::bench_fanout::FanoutSetup {
                    watchers: opts.watchers.as_deref(),
                    tls: &opts.tls,
                    skip_load: opts.skip_load,
                },
                pool,
            )
            .await?,
        ),
        None => None,
    };
    workload.fanout = fanout.as_ref().map(|f| f.publisher());
    let workload = Arc::new(workload);
    let bearer = Bearer::new(opts.token.as_deref())?;
    let mut callers = Vec::with_capacity(opts.concurrency);
    if opts.rest {
        let tls = opts.tls.rest_tls()?;
        for _ in 0..opts.concurrency {
            let client =
                crate::cli::rest_client::RestClient::connect(&opts.tls.target, &tls, opts.token.as_deref())
                    .await?;
            callers.push(Caller::Rest(client));
        }
    } else {
        let clients: Vec<_> = connect(opts)
            .await?
            .into_iter()
            .map(|channel| BenchClient {
                numbers: ReassignedNumbersClient::with_interceptor(channel.clone(), bearer.clone())
                    .max_decoding_message_size(64 << 20),
                feed: DisconnectionFeedClient::with_interceptor(channel, bearer.clone())
                    .max_encoding_message_size(crate::server::FEED_MAX_MESSAGE_BYTES)
                    .max_decoding_message_size(64 << 20),
            })
            .collect();
        for id in 0..opts.concurrency {
            callers.push(Caller::Grpc(Box::new(clients[id % clients.len()].clone())));
        }
    }

    let started = Instant::now();
    let measure_start = started + opts.warmup;
    let shared = Arc::new(Shared {
        method: opts.method,
        started,
        measure_start,
        end: measure_start + opts.duration,
        rate: opts.rate,
        call_timeout: opts.timeout,
        next_call: AtomicU64::new(0),
        done: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        first_error_shown: AtomicBool::new(false),
        delivered: fanout.as_ref().map(|f| f.delivered()),
    });
    if let Some(fanout) = &fanout {
        fanout.arm(measure_start, measure_start + opts.duration);
    }
    let progress = tokio::spawn(progress(Arc::clone(&shared)));
    let mut workers = JoinSet::new();
    let len = workload.len();
    for (id, client) in callers.into_iter().enumerate() {
        let start_index = id * len / opts.concurrency;
        workers.spawn(worker(
            client,
            Arc::clone(&workload),
            Arc::clone(&shared),
            start_index,
        ));
    }
    let mut total = Stats::new()?;
    let mut failure = None;
    while let Some(joined) = workers.join_next().await {
        match joined.context("a bench worker panicked").and_then(|stats| stats) {
            Ok(stats) => total.add(&stats)?,
            Err(e) => failure = Some(e),
        }
    }
    progress.abort();
    if let Some(e) = failure {
        return Err(e);
    }

    let end = shared.end;
    let elapsed = total
        .last_done
        .map_or(end, |last| last.max(end))
        .duration_since(measure_start);
    let elapsed_secs = elapsed.as_secs_f64();
    let failed: u64 = total.errors.values().sum();
    let unsent = opts.rate.map_or(0, |rate| {
        let first = scheduled_before(opts.warmup, rate);
        let last = scheduled_before(opts.warmup + opts.duration, rate);
        last.saturating_sub(first).saturating_sub(total.ok + failed)
    });
    let per_sec = |n: u64| {
        if elapsed_secs > 0.0 {
            n as f64 / elapsed_secs
        } else {
            0.0
        }
    };
    let fanout = match fanout {
        Some(fanout) => {
            let refused: u64 = total.tally.item_errors.values().sum();
            let accepted = total.tally.numbers.saturating_sub(refused);
            Some(
                fanout
                    .finish(opts.drain, measure_start, end, per_sec(accepted))
                    .await?,
            )
        }
        None => None,
    };
    Ok(BenchReport {
        method: opts.method,
        target: opts.tls.target.clone(),
        concurrency: opts.concurrency,
        connections: opts.connections,
        rate: opts.rate,
        numbers_per_call: opts.numbers_per_call(),
        hit_ratio: from_register.then_some(opts.hit_ratio),
        data: description,
        warmup_secs: opts.warmup.as_secs_f64(),
        duration_secs: opts.duration.as_secs_f64(),
        elapsed_secs,
        calls: total.ok + failed,
        ok_calls: total.ok,
        failed_calls: failed,
        unsent_calls: unsent,
        numbers: total.tally.numbers,
        calls_per_sec: per_sec(total.ok),
        numbers_per_sec: per_sec(total.tally.numbers),
        latency_us: Latency::from_histogram(&total.hist),
        errors: total.errors.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        item_errors: total.tally.item_errors,
        statuses: total.tally.statuses,
        receipts_requested: opts.receipts,
        receipts: total.tally.receipts,
        fanout,
    })
}

/// `reassigned bench`: runs [`bench()`] and prints the report on stdout, as
/// text or (`--json`) as one JSON object.
pub async fn run(opts: &BenchOptions) -> anyhow::Result<()> {
    let report = bench(opts).await?;
    if opts.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::server::tls::TlsFiles;
    use tokio::net::TcpListener;

    #[test]
    fn schedules_calls_at_the_rate() {
        assert_eq!(scheduled_before(Duration::ZERO, 100.0), 0);
        assert_eq!(scheduled_before(Duration::from_secs(2), 100.0), 200);
        assert_eq!(scheduled_before(Duration::from_millis(2005), 100.0), 201);
    }

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        for bad in ["", "s", "10x", "-1s", "1..2s", "ten", "10 s", "1e3s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    fn set_of(values: impl IntoIterator<Item = u64>) -> Vec<u64> {
        let mut v: Vec<u64> = values.into_iter().collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    #[test]
    fn misses_are_never_in_the_set_and_keep_the_prefix() {
        // A dense neighbourhood: every other number of +1415555xxxx is taken,
        // and the whole 0000-0999 block.
        let set = set_of(
            (14_155_550_000..14_155_560_000)
                .step_by(2)
                .chain(14_155_550_000..14_155_551_000),
        );
        let prefixes = vec![(Prefix::parse("+1").unwrap(), 1)];
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..20_000 {
            let miss = miss_number(&mut rng, &set, &prefixes).unwrap();
            assert!(set.binary_search(&miss).is_err());
            let number = PhoneNumber::from_value(miss).unwrap();
            assert!(number.has_prefix(&prefixes[0].0));
            assert_eq!(number.digits(), 11);
            assert!(PhoneNumber::parse(&format!("+{miss}")).is_ok());
        }
    }

    #[test]
    fn misses_widen_when_the_neighbourhood_is_full() {
        // Every number with the same first 7 digits is taken: the last 4
        // digits alone cannot make a miss.
        let set = set_of(14_155_550_000..14_155_560_000);
        let prefixes = vec![(Prefix::parse("+1").unwrap(), 1)];
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..1000 {
            let miss = miss_number(&mut rng, &set, &prefixes).unwrap();
            assert!(set.binary_search(&miss).is_err());
            assert!(PhoneNumber::from_value(miss).unwrap().has_prefix(&prefixes[0].0));
        }
        // A number that is all prefix leaves nothing to change.
        let prefix = Prefix::parse("+44207").unwrap();
        assert_eq!(miss_number(&mut rng, &[44_207], &[(prefix, 5)]), None);
    }

    #[test]
    fn random_numbers_are_valid_e164() {
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..10_000 {
            let n = random_us_number(&mut rng);
            let number = PhoneNumber::parse(&format!("+{n}")).unwrap();
            assert_eq!(number.digits(), 11);
            assert!(number.has_prefix(&Prefix::parse("+1").unwrap()));
        }
    }

    #[test]
    fn register_queries_have_the_exact_hit_ratio() {
        let numbers = set_of((0..5000u64).map(|i| 8_613_800_000_000 + i * 37));
        let source = Source::Register {
            numbers: numbers.clone(),
            prefixes: vec![(Prefix::parse("+86").unwrap(), 2)],
            description: "test".into(),
        };
        let queries = build_queries(&source, 10_000, 0.04, "2022-01-01", 9).unwrap();
        assert_eq!(queries.len(), 10_000);
        let hits = queries
            .iter()
            .filter(|q| {
                let value = PhoneNumber::parse(&q.phone_number).unwrap().value();
                numbers.binary_search(&value).is_ok()
            })
            .count();
        assert_eq!(hits, 400);
        assert!(
            queries
                .iter()
                .all(|q| q.since == "2022-01-01" && q.phone_number.starts_with("+86"))
        );
        // Same seed, same queries.
        assert_eq!(
            build_queries(&source, 10_000, 0.04, "2022-01-01", 9).unwrap(),
            queries
        );
    }

    #[test]
    fn reads_queries_csv() {
        let rows =
            parse_queries("phone_number,since\r\n+14155550123,2024-01-01\r\n+8613800000000,2023-05-06\n")
                .unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].since, "2023-05-06");
        assert!(parse_queries("phone_number,since,expected\n+14155550123,2024-01-01,yes\n").is_ok());
        assert!(parse_queries("number,date\n+14155550123,2024-01-01\n").is_err());
        let err = parse_queries("phone_number,since\n+1415 555,2024-01-01\n").unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("line 2") && !msg.contains("1415"), "{msg}");
        assert!(parse_queries("phone_number,since\n+14155550123,2024-02-30\n").is_err());
        assert!(parse_queries("phone_number,since\n").is_err());
    }

    #[test]
    fn percentiles_come_from_the_histogram() {
        let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        for v in 1..=10_000u64 {
            hist.record(v).unwrap();
        }
        let l = Latency::from_histogram(&hist);
        assert_eq!(l.count, 10_000);
        let near = |got: u64, want: u64| got.abs_diff(want) <= want / 500 + 1;
        assert!(near(l.p50, 5_000), "{l:?}");
        assert!(near(l.p90, 9_000), "{l:?}");
        assert!(near(l.p99, 9_900), "{l:?}");
        assert!(near(l.p999, 9_990), "{l:?}");
        assert!(near(l.max, 10_000), "{l:?}");
        assert!((l.mean - 5_000.5).abs() < 10.0, "{l:?}");
        let empty = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        assert_eq!(Latency::from_histogram(&empty), Latency::default());
    }

    #[test]
    fn batches_are_full() {
        let opts = options(Method::Batch, 1000);
        let workload = Workload::build(&opts, &Source::Random).unwrap();
        assert!(workload.batches.len() >= 8);
        assert!(workload.batches.iter().all(|b| b.checks.len() == 1000));
        let opts = options(Method::Check, 1000);
        let workload = Workload::build(&opts, &Source::Random).unwrap();
        assert_eq!(workload.checks.len(), POOL_NUMBERS);
    }

    #[test]
    fn validates_options() {
        assert!(options(Method::Check, 1).validate().is_ok());
        let mut bad = options(Method::Check, 1);
        bad.hit_ratio = 1.5;
        assert!(bad.validate().is_err());
        let mut bad = options(Method::Check, 1);
        bad.since = "2022-13-01".into();
        assert!(bad.validate().is_err());
        let mut bad = options(Method::Check, 1);
        bad.rate = Some(0.0);
        assert!(bad.validate().is_err());
        let mut bad = options(Method::Batch, 0);
        bad.batch_size = 0;
        assert!(bad.validate().is_err());
    }

    fn options(method: Method, batch_size: usize) -> BenchOptions {
        BenchOptions {
            tls: TlsTarget {
                target: "127.0.0.1:1".into(),
                server_name: "localhost".into(),
                ca: PathBuf::new(),
                cert: PathBuf::new(),
                key: PathBuf::new(),
            },
            method,
            concurrency: 4,
            connections: 1,
            duration: Duration::from_millis(300),
            warmup: Duration::from_millis(100),
            rate: None,
            batch_size,
            data: None,
            hit_ratio: 0.04,
            since: "2022-01-01".into(),
            timeout: Duration::from_secs(5),
            receipts: false,
            token: None,
            rest: false,
            seed: 1,
            json: false,
            watchers: None,
            watch_numbers: 10_000,
            skip_load: false,
            drain: Duration::from_secs(30),
        }
    }

    /// The whole loop against the bare server, in process: every method,
    /// closed and open loop.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn benches_the_bare_server() {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        crate::cli::certs::dev_certs(&certs, false).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let files = TlsFiles {
            cert: certs.join("server.pem"),
            key: certs.join("server.key"),
            client_ca: certs.join("ca.pem"),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(crate::cli::bench_bare::serve_bare(listener, files, async move {
            let _ = stopped.await;
        }));
        for (method, rate, batch_size) in [
            (Method::Check, None, 1),
            (Method::Check, Some(500.0), 1),
            (Method::Batch, None, 50),
            (Method::Stream, None, 50),
        ] {
            let mut opts = options(method, batch_size);
            opts.tls.target = format!("127.0.0.1:{}", addr.port());
            opts.tls.ca = certs.join("ca.pem");
            opts.tls.cert = certs.join("platform-a.pem");
            opts.tls.key = certs.join("platform-a.key");
            opts.rate = rate;
            opts.connections = 2;
            let report = bench(&opts).await.unwrap();
            assert!(report.ok_calls > 0, "{report}");
            assert_eq!(report.failed_calls, 0, "{report}");
            assert_eq!(report.numbers, report.ok_calls * batch_size as u64, "{report}");
            assert_eq!(report.statuses.not_reassigned, report.numbers, "{report}");
            assert_eq!(report.latency_us.count, report.ok_calls, "{report}");
            assert!(report.latency_us.p50 > 0 && report.latency_us.max >= report.latency_us.p99);
            if let Some(rate) = rate {
                // Never more than rate * duration calls (a busy machine may
                // start fewer: those are reported as unsent, not sent late).
                let expected = rate * opts.duration.as_secs_f64();
                assert!((report.calls as f64) <= expected + 2.0, "{report}");
                assert!(
                    report.calls + report.unsent_calls + 2 >= expected as u64,
                    "{report}"
                );
            } else {
                assert_eq!(report.unsent_calls, 0, "{report}");
            }
            let json = serde_json::to_value(&report).unwrap();
            assert!(json["latency_us"]["p99"].is_u64());
            assert!(json["statuses"]["NOT_REASSIGNED"].is_u64());
        }
        // Offered far more than the server can take: the run still ends on
        // time, and the calls it could not start are reported.
        let mut opts = options(Method::Check, 1);
        opts.tls.target = format!("127.0.0.1:{}", addr.port());
        opts.tls.ca = certs.join("ca.pem");
        opts.tls.cert = certs.join("platform-a.pem");
        opts.tls.key = certs.join("platform-a.key");
        opts.rate = Some(1_000_000.0);
        let began = Instant::now();
        let report = bench(&opts).await.unwrap();
        assert!(began.elapsed() < opts.warmup + opts.duration + Duration::from_secs(3));
        assert!(report.unsent_calls > 0, "{report}");
        assert_eq!(report.calls + report.unsent_calls, 300_000, "{report}");
        assert!(report.to_string().contains("did not keep up"));

        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }
}
