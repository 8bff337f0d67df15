//! `reassigned generate`: writes a realistic synthetic register (a snapshot,
//! a few deltas and a benchmark query file) in the import format of
//! [`crate::import`].
//!
//! The numbers are made up but shaped like real ones: about 70% North
//! American (`+1`, area code and exchange 2xx-9xx without N11 codes, 4-digit
//! line) and 30% Chinese mobile (`+86 13x`-`19x`, 11 digits). Disconnect dates
//! spread over the coverage window (from 2021-01-27). Each delta is about 1%
//! of the snapshot: mostly new numbers, some re-disconnects of numbers
//! already in the register, with later dates.
//!
//! `queries.csv` (`phone_number,since`, at most 100,000 lines, shuffled) mixes
//! about 4% numbers present in the register with 96% absent ones, as a
//! platform sees at login. Most present numbers are asked with a `since`
//! before their disconnect (REASSIGNED), some after; a few absent numbers
//! are outside the covered prefixes (`+44`) or asked with a `since` before
//! the coverage start (NO_DATA).
//!
//! Every data set also holds the [`SANDBOX`] numbers (fixed numbers that
//! always give one documented answer, like a payment provider's test card
//! numbers), and writes them with their answers to `sandbox.csv`;
//! `--sandbox` writes a data set of just them. The random numbers never use
//! the exchange `555` under `+1`, so they never collide with a sandbox
//! number.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use flate2::Compression;
use flate2::write::GzEncoder;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

use crate::api::pb;
use crate::domain::{Date, NoDataReason, Status};
use crate::import::{Kind, Manifest};

/// The coverage start of the generated register (the US RND's).
const COVERAGE_START: (i32, u32, u32) = (2021, 1, 27);
/// The most lines `queries.csv` gets.
const MAX_QUERIES: u64 = 100_000;
/// Share of queries whose number is in the register.
const HIT_SHARE: f64 = 0.04;

/// The disconnect date of the sandbox numbers that are in the register.
pub const SANDBOX_DISCONNECT: &str = "2024-06-15";

/// A number that always gives one documented answer for its `since`, in
/// every data set that `generate` writes (while the mirror is fresh: on a
/// stale mirror the NOT_REASSIGNED ones answer NO_DATA / MIRROR_STALE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SandboxNumber {
    /// The number, E.164. `+1 202 555 01xx` (numbers reserved for fiction)
    /// and `+44 7700 900xxx` (a UK range reserved for drama).
    pub number: &'static str,
    /// The `since` to ask with, `YYYY-MM-DD`.
    pub since: &'static str,
    /// Whether the register holds a disconnect ([`SANDBOX_DISCONNECT`]) for
    /// the number.
    pub disconnected: bool,
    /// The answer.
    pub status: Status,
    /// Why, in a few words (the README's table).
    pub why: &'static str,
}

/// The sandbox numbers, one for each answer a single number can give
/// (MIRROR_STALE and MIRROR_EMPTY are states of the whole mirror, not of a
/// number: serve a set generated with an old `--as-of`, or an empty data
/// directory).
pub const SANDBOX: [SandboxNumber; 6] = [
    SandboxNumber {
        number: "+12025550100",
        since: "2024-06-01",
        disconnected: true,
        status: Status::Reassigned,
        why: "disconnected 2024-06-15, on or after since",
    },
    SandboxNumber {
        number: "+12025550101",
        since: "2024-07-01",
        disconnected: true,
        status: Status::NotReassigned,
        why: "disconnected 2024-06-15, before since",
    },
    SandboxNumber {
        number: "+12025550102",
        since: "2024-01-01",
        disconnected: false,
        status: Status::NotReassigned,
        why: "never disconnected, covered prefix +1",
    },
    SandboxNumber {
        number: "+12025550103",
        since: "2020-06-01",
        disconnected: false,
        status: Status::NoData(NoDataReason::BeforeCoverage),
        why: "never disconnected, since before the coverage start 2021-01-27",
    },
    SandboxNumber {
        number: "+447700900100",
        since: "2024-01-01",
        disconnected: false,
        status: Status::NoData(NoDataReason::NumberNotCovered),
        why: "+44 is not a covered prefix",
    },
    SandboxNumber {
        number: "+12025550104",
        since: "2020-06-01",
        disconnected: true,
        status: Status::Reassigned,
        why: "disconnected 2024-06-15: a known disconnect wins even before the coverage start",
    },
];

/// Options of `reassigned generate`.
#[derive(Clone, Debug, clap::Args)]
pub struct GenerateOptions {
    /// Number of records in the snapshot, the disconnected sandbox numbers
    /// among them (so never fewer than those).
    #[arg(long, default_value_t = 1_000_000)]
    pub records: u64,
    /// Directory to write into (created if missing; must not already hold
    /// manifests).
    #[arg(long)]
    pub out: PathBuf,
    /// Number of deltas after the snapshot (each about 1% of its size).
    #[arg(long, default_value_t = 3)]
    pub deltas: u32,
    /// Seed of the random generator, for reproducible output (random if
    /// absent).
    #[arg(long)]
    pub seed: Option<u64>,
    /// `as_of` of the last delta, YYYY-MM-DD (default: today, UTC).
    #[arg(long)]
    pub as_of: Option<Date>,
    /// Write the data files gzip-compressed (`.csv.gz`).
    #[arg(long)]
    pub gzip: bool,
    /// If `--out` already holds manifests, keep them and succeed without
    /// writing (a setup step that runs on every start).
    #[arg(long)]
    pub keep_existing: bool,
    /// Write only the sandbox numbers (one snapshot, no deltas, an empty
    /// `queries.csv`), for client developers' tests.
    #[arg(long, conflicts_with_all = ["records", "deltas"])]
    pub sandbox: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            records: 1_000_000,
            out: PathBuf::from("register"),
            deltas: 3,
            seed: None,
            as_of: None,
            gzip: false,
            keep_existing: false,
            sandbox: false,
        }
    }
}

/// What [`generate`] wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateReport {
    /// The output directory.
    pub out: PathBuf,
    /// The manifests written: the snapshot, then the deltas in order.
    pub manifests: Vec<PathBuf>,
    /// Rows of the snapshot.
    pub snapshot_records: u64,
    /// Rows of each delta.
    pub delta_records: Vec<u64>,
    /// Distinct numbers in the register once every delta is applied.
    pub final_records: u64,
    /// The sandbox numbers and their answers ([`SANDBOX`], as CSV).
    pub sandbox_file: PathBuf,
    /// The query file.
    pub queries_file: PathBuf,
    /// Lines of the query file (header excluded).
    pub queries: u64,
    /// Of those, the lines whose number is in the register.
    pub query_hits: u64,
    /// `as_of` of the snapshot.
    pub snapshot_as_of: Date,
    /// `as_of` of the last file.
    pub as_of: Date,
    /// The seed used (pass it again to get the same output).
    pub seed: u64,
    /// Wall-clock seconds taken.
    pub seconds: f64,
}

impl fmt::Display for GenerateReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "wrote {} in {:.1} s (seed {}):",
            self.out.display(),
            self.seconds,
            self.seed
        )?;
        writeln!(
            f,
            "  snapshot 1: {} records, as_of {}",
            self.snapshot_records, self.snapshot_as_of
        )?;
        for (i, n) in self.delta_records.iter().enumerate() {
            writeln!(f, "  delta {}: {n} records", i + 2)?;
        }
        writeln!(
            f,
            "  {} distinct numbers after all deltas, as_of {}",
            self.final_records, self.as_of
        )?;
        writeln!(
            f,
            "  {}: {} queries, {} of them in the register",
            self.queries_file.display(),
            self.queries,
            self.query_hits
        )?;
        write!(
            f,
            "  {}: the {} sandbox numbers and their answers",
            self.sandbox_file.display(),
            SANDBOX.len()
        )
    }
}

/// Writes a synthetic register into `opts.out`: `snapshot-000001.json` and
/// its data file (sequence 1, `as_of` = `opts.as_of` minus one day per
/// delta, covering `+1` and `+86` from 2021-01-27; `opts.records` records,
/// the disconnected [`SANDBOX`] numbers and random ones), `delta-000002.json`...
/// (one day apart, the last at `opts.as_of`), `queries.csv` and
/// `sandbox.csv`. With `opts.sandbox`, only the sandbox numbers, in one
/// snapshot.
///
/// Each data file is written before its manifest (the manifest through a
/// rename), so a concurrent import never sees a manifest without its data.
pub fn generate(opts: &GenerateOptions) -> anyhow::Result<GenerateReport> {
    let started = Instant::now();
    let today = Date::today_utc();
    let as_of = opts.as_of.unwrap_or(today);
    ensure!(
        as_of <= today,
        "as_of ({as_of}) must not be after today ({today}, UTC)"
    );
    let (y, m, d) = COVERAGE_START;
    let coverage_start = Date::from_ymd(y, m, d).context("coverage start")?;
    let (records, deltas) = if opts.sandbox {
        (0, 0)
    } else {
        (opts.records, opts.deltas)
    };
    let deltas = i32::try_from(deltas).context("too many deltas")?;
    let snapshot_as_of = as_of.add_days(-deltas);
    ensure!(
        snapshot_as_of >= coverage_start,
        "as_of ({as_of}) minus {deltas} deltas is before the coverage start ({coverage_start})"
    );
    let sandbox_day = Date::parse(SANDBOX_DISCONNECT).context("sandbox date")?;
    ensure!(
        snapshot_as_of >= sandbox_day,
        "as_of ({as_of}) minus {deltas} deltas is before {sandbox_day}, the disconnect date of the \
         sandbox numbers that every data set holds"
    );
    let seed = opts.seed.unwrap_or_else(|| rand::rng().random());
    let mut rng = SmallRng::seed_from_u64(seed);

    prepare_dir(&opts.out)?;
    let ext = if opts.gzip { "csv.gz" } else { "csv" };
    let count = usize::try_from(records).context("too many records")?;

    // The snapshot: the sandbox numbers that are in the register, and unique
    // random numbers, sorted, dates over the coverage window.
    let sandbox_records = SANDBOX.iter().filter(|sb| sb.disconnected).count();
    let random = unique_numbers(&mut rng, count.saturating_sub(sandbox_records));
    let (lo, hi) = (coverage_start.days(), snapshot_as_of.days());
    let mut rows: Vec<(u64, u16)> = random
        .iter()
        .map(|&n| Ok((n, day_u16(rng.random_range(lo..=hi))?)))
        .collect::<anyhow::Result<_>>()?;
    let sandbox = sandbox_values()?;
    for (n, sb) in sandbox.iter().zip(SANDBOX) {
        if sb.disconnected {
            rows.push((*n, day_u16(sandbox_day.days())?));
        }
    }
    rows.sort_unstable();
    let (numbers, days): (Vec<u64>, Vec<u16>) = rows.into_iter().unzip();
    let snapshot = Manifest {
        kind: Kind::Snapshot,
        sequence: 1,
        as_of: snapshot_as_of,
        coverage_start: Some(coverage_start),
        covered_prefixes: Some(vec!["+1".into(), "+86".into()]),
        data: format!("snapshot-000001.{ext}"),
        records: 0,
        sha256: String::new(),
        path: PathBuf::new(),
    };
    let rows = numbers.iter().copied().zip(days.iter().copied());
    let snapshot = write_register_file(&opts.out, "snapshot-000001.json", snapshot, rows)?;
    let mut manifests = vec![snapshot.path.clone()];

    // The deltas: ~1% each, 80% new numbers, 20% re-disconnects.
    let per_delta = count.div_ceil(100);
    let mut updates: HashMap<u64, u16> = HashMap::new();
    let mut added: Vec<u64> = Vec::new();
    let mut delta_records = Vec::new();
    for k in 1..=deltas {
        let sequence = 1 + k as u64;
        let delta_as_of = snapshot_as_of.add_days(k);
        let mut chosen: HashSet<u64> = HashSet::with_capacity(per_delta);
        let mut rows: Vec<(u64, u16)> = Vec::with_capacity(per_delta);
        let redisconnects = if random.is_empty() { 0 } else { per_delta / 5 };
        while rows.len() < redisconnects {
            // Never a sandbox number: their answers are fixed.
            let n = random[rng.random_range(0..random.len())];
            if chosen.insert(n) {
                rows.push((n, day_u16(delta_as_of.days())?));
            }
        }
        while rows.len() < per_delta {
            let n = random_covered(&mut rng);
            if numbers.binary_search(&n).is_err() && !updates.contains_key(&n) && chosen.insert(n) {
                // Reported a few days late, sometimes.
                let late = rng.random_range(0..=7).min(delta_as_of.days() - lo);
                rows.push((n, day_u16(delta_as_of.days() - late)?));
                added.push(n);
            }
        }
        rows.sort_unstable();
        for &(n, d) in &rows {
            let e = updates.entry(n).or_insert(d);
            *e = (*e).max(d);
        }
        let delta = Manifest {
            kind: Kind::Delta,
            sequence,
            as_of: delta_as_of,
            coverage_start: None,
            covered_prefixes: None,
            data: format!("delta-{sequence:06}.{ext}"),
            records: 0,
            sha256: String::new(),
            path: PathBuf::new(),
        };
        let name = format!("delta-{sequence:06}.json");
        let m = write_register_file(&opts.out, &name, delta, rows.iter().copied())?;
        delta_records.push(m.records);
        manifests.push(m.path);
    }
    let final_records = (numbers.len() + added.len()) as u64;

    // The queries: ~4% present, ~96% absent, shuffled.
    let final_date = |n: u64| -> Option<i32> {
        let old = numbers.binary_search(&n).ok().map(|i| days[i]);
        let new = updates.get(&n).copied();
        old.max(new).map(i32::from)
    };
    let total = if count == 0 {
        0
    } else {
        (count as u64).clamp(100, MAX_QUERIES)
    };
    let hits = if final_records == 0 {
        0
    } else {
        (total as f64 * HIT_SHARE).round() as u64
    };
    let mut queries: Vec<(u64, i32)> = Vec::with_capacity(total as usize);
    for _ in 0..hits {
        let pick = rng.random_range(0..final_records as usize);
        let n = numbers
            .get(pick)
            .copied()
            .unwrap_or_else(|| added[pick - numbers.len()]);
        let disconnect = final_date(n).context("a hit must be in the register")?;
        let since = if rng.random_bool(0.9) {
            disconnect - rng.random_range(0..=720)
        } else {
            rng.random_range(disconnect..=as_of.days())
        };
        queries.push((n, since));
    }
    while (queries.len() as u64) < total {
        let n = if rng.random_bool(0.01) {
            random_uk_mobile(&mut rng)
        } else {
            random_covered(&mut rng)
        };
        if final_date(n).is_some() {
            continue;
        }
        let since = if rng.random_bool(0.02) {
            rng.random_range(lo - 365..lo)
        } else {
            rng.random_range(lo..=as_of.days())
        };
        queries.push((n, since));
    }
    queries.shuffle(&mut rng);
    let queries_file = opts.out.join("queries.csv");
    write_queries(&queries_file, &queries)?;
    let sandbox_file = opts.out.join("sandbox.csv");
    write_sandbox(&sandbox_file)?;

    Ok(GenerateReport {
        out: opts.out.clone(),
        manifests,
        snapshot_records: snapshot.records,
        delta_records,
        final_records,
        sandbox_file,
        queries_file,
        queries: total,
        query_hits: hits,
        snapshot_as_of,
        as_of,
        seed,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The [`SANDBOX`] numbers as values, in the table's order.
fn sandbox_values() -> anyhow::Result<Vec<u64>> {
    SANDBOX
        .iter()
        .map(|sb| {
            crate::domain::PhoneNumber::parse(sb.number)
                .map(|n| n.value())
                .with_context(|| format!("sandbox number {}", sb.number))
        })
        .collect()
}

/// The proto names of an answer (`REASSIGNMENT_STATUS_...`,
/// `NO_DATA_REASON_...`), as clients print them.
pub fn proto_names(status: Status) -> (&'static str, &'static str) {
    let (status, reason) = <(pb::ReassignmentStatus, pb::NoDataReason)>::from(status);
    (status.as_str_name(), reason.as_str_name())
}

/// Writes `sandbox.csv`: `phone_number,since,status,no_data_reason` (proto
/// enum names), one line per [`SANDBOX`] number, the answers a fresh
/// mirror gives.
fn write_sandbox(path: &Path) -> anyhow::Result<()> {
    let mut text = String::from("phone_number,since,status,no_data_reason\n");
    for sb in SANDBOX {
        let (status, reason) = proto_names(sb.status);
        text.push_str(&format!("{},{},{status},{reason}\n", sb.number, sb.since));
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Creates `dir` if needed and refuses one that already holds manifests
/// (their sequences would mix with the new ones).
fn prepare_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if let Some(path) = first_manifest(dir)? {
        bail!(
            "{} already holds manifests ({}); choose an empty directory",
            dir.display(),
            path.display()
        );
    }
    Ok(())
}

/// Whether `dir` exists and holds a manifest (a `.json` file).
pub fn holds_manifests(dir: &Path) -> anyhow::Result<bool> {
    Ok(dir.is_dir() && first_manifest(dir)?.is_some())
}

fn first_manifest(dir: &Path) -> anyhow::Result<Option<PathBuf>> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

fn day_u16(days: i32) -> anyhow::Result<u16> {
    u16::try_from(days)
        .with_context(|| format!("date {} is outside 1970-01-01..2149-06-06", Date::from_days(days)))
}

/// `count` distinct numbers, sorted: ~70% NANP, ~30% Chinese mobile.
fn unique_numbers(rng: &mut SmallRng, count: usize) -> Vec<u64> {
    let mut numbers = Vec::with_capacity(count);
    // Collisions are rare (a few per ten thousand): top up until full.
    while numbers.len() < count {
        let missing = count - numbers.len();
        numbers.extend((0..missing).map(|_| random_covered(rng)));
        numbers.sort_unstable();
        numbers.dedup();
    }
    numbers
}

/// A random number under `+1` (70%) or `+86` (30%).
fn random_covered(rng: &mut SmallRng) -> u64 {
    if rng.random_bool(0.7) {
        random_nanp(rng)
    } else {
        random_cn_mobile(rng)
    }
}

/// `+1 NPA NXX XXXX`: NPA 2xx-9xx with a middle digit 0-8, NXX 2xx-9xx, no
/// N11 service codes in either, and no NXX 555 (the sandbox numbers').
fn random_nanp(rng: &mut SmallRng) -> u64 {
    let npa = loop {
        let v = rng.random_range(2..=9) * 100 + rng.random_range(0..=8) * 10 + rng.random_range(0..=9);
        if v % 100 != 11 {
            break v;
        }
    };
    // Never 555: the sandbox numbers' exchange.
    let nxx = loop {
        let v = rng.random_range(200..=999);
        if v % 100 != 11 && v != 555 {
            break v;
        }
    };
    let line = rng.random_range(0..10_000);
    10_000_000_000 + npa * 10_000_000 + nxx * 10_000 + line
}

/// `+86 1[3-9]X XXXX XXXX`: an 11-digit Chinese mobile number.
fn random_cn_mobile(rng: &mut SmallRng) -> u64 {
    let second: u64 = rng.random_range(3..=9);
    8_600_000_000_000 + (10 + second) * 1_000_000_000 + rng.random_range(0..1_000_000_000)
}

/// `+44 7XXX XXXXXX`: a UK mobile number (not covered by the register).
fn random_uk_mobile(rng: &mut SmallRng) -> u64 {
    447_000_000_000 + rng.random_range(0..1_000_000_000)
}

/// Writes the data file `manifest.data` into `dir` from `rows` (number
/// values and days since 1970-01-01, written in the order given), then the
/// manifest as `dir/manifest_name` with `records` and `sha256` filled in
/// (through a temporary file and a rename). Gzip-compresses when the data
/// name ends `.csv.gz`. Returns the manifest with `path` set.
///
/// The building block of [`generate`], also handy for tests of importers.
pub fn write_register_file(
    dir: &Path,
    manifest_name: &str,
    mut manifest: Manifest,
    rows: impl IntoIterator<Item = (u64, u16)>,
) -> anyhow::Result<Manifest> {
    let data_path = dir.join(&manifest.data);
    let file = File::create(&data_path).with_context(|| format!("creating {}", data_path.display()))?;
    let hashing = HashingWriter {
        inner: BufWriter::with_capacity(1 << 20, file),
        hasher: Sha256::new(),
    };
    let write = |out: &mut dyn Write| -> io::Result<u64> {
        let mut buf = Vec::with_capacity(1 << 20);
        buf.extend_from_slice(b"phone_number,disconnect_date\n");
        let mut count = 0u64;
        for (number, days) in rows {
            buf.push(b'+');
            push_u64(&mut buf, number);
            buf.push(b',');
            push_date(&mut buf, Date::from_days(i32::from(days)));
            buf.push(b'\n');
            count += 1;
            if buf.len() >= (1 << 20) - 64 {
                out.write_all(&buf)?;
                buf.clear();
            }
        }
        out.write_all(&buf)?;
        Ok(count)
    };
    let context = || format!("writing {}", data_path.display());
    let (count, mut hashing) = if manifest.is_gzip() {
        let mut gz = GzEncoder::new(hashing, Compression::fast());
        let count = write(&mut gz).with_context(context)?;
        (count, gz.finish().with_context(context)?)
    } else {
        let mut hashing = hashing;
        let count = write(&mut hashing).with_context(context)?;
        (count, hashing)
    };
    hashing.inner.flush().with_context(context)?;
    let file = hashing
        .inner
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(context)?;
    file.sync_all().with_context(context)?;
    manifest.records = count;
    manifest.sha256 = hex::encode(hashing.hasher.finalize());

    let path = dir.join(manifest_name);
    let tmp = dir.join(format!("{manifest_name}.tmp"));
    let mut json = serde_json::to_vec_pretty(&manifest)?;
    json.push(b'\n');
    std::fs::write(&tmp, &json).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming {}", tmp.display()))?;
    manifest.path = path;
    Ok(manifest)
}

fn write_queries(path: &Path, queries: &[(u64, i32)]) -> anyhow::Result<()> {
    let context = || format!("writing {}", path.display());
    let file = File::create(path).with_context(context)?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut line = Vec::with_capacity(32);
    out.write_all(b"phone_number,since\n").with_context(context)?;
    for &(number, since) in queries {
        line.clear();
        line.push(b'+');
        push_u64(&mut line, number);
        line.push(b',');
        push_date(&mut line, Date::from_days(since));
        line.push(b'\n');
        out.write_all(&line).with_context(context)?;
    }
    out.flush().with_context(context)?;
    Ok(())
}

/// Appends the decimal digits of `v`.
fn push_u64(buf: &mut Vec<u8>, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[i..]);
}

/// Appends `YYYY-MM-DD`.
fn push_date(buf: &mut Vec<u8>, date: Date) {
    let (y, m, d) = date.ymd();
    let (y, m, d) = (y.unsigned_abs(), m, d);
    buf.extend_from_slice(&[
        b'0' + (y / 1000 % 10) as u8,
        b'0' + (y / 100 % 10) as u8,
        b'0' + (y / 10 % 10) as u8,
        b'0' + (y % 10) as u8,
        b'-',
        b'0' + (m / 10) as u8,
        b'0' + (m % 10) as u8,
        b'-',
        b'0' + (d / 10) as u8,
        b'0' + (d % 10) as u8,
    ]);
}

/// A writer that hashes every byte written through it.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::PhoneNumber;
    use crate::import::{NoProgress, read_records, sync_dir};
    use crate::store::{EmbeddedStore, Store};

    fn opts(dir: &Path, gzip: bool) -> GenerateOptions {
        GenerateOptions {
            records: 1_000,
            out: dir.to_path_buf(),
            deltas: 3,
            seed: Some(42),
            as_of: Some(Date::today_utc().add_days(-10)),
            gzip,
            keep_existing: false,
            sandbox: false,
        }
    }

    /// The sandbox numbers that are in the register.
    const SANDBOX_RECORDS: u64 = 3;

    #[test]
    fn formats_digits_and_dates() {
        let mut buf = Vec::new();
        push_u64(&mut buf, 0);
        buf.push(b' ');
        push_u64(&mut buf, 8_613_800_138_000);
        buf.push(b' ');
        push_date(&mut buf, Date::parse("2021-01-07").expect("date"));
        assert_eq!(
            String::from_utf8(buf).expect("utf8"),
            "0 8613800138000 2021-01-07"
        );
    }

    #[test]
    fn numbers_are_valid_unique_and_mixed() {
        let mut rng = SmallRng::seed_from_u64(7);
        let numbers = unique_numbers(&mut rng, 20_000);
        assert_eq!(numbers.len(), 20_000);
        assert!(numbers.windows(2).all(|w| w[0] < w[1]));
        let mut us = 0;
        for &n in &numbers {
            let text = PhoneNumber::from_value(n).expect("valid").to_string();
            if let Some(rest) = text.strip_prefix("+1") {
                us += 1;
                assert_eq!(rest.len(), 10);
                let b = rest.as_bytes();
                assert!(b[0] >= b'2' && b[1] != b'9' && b[3] >= b'2', "{text}");
                assert!(&rest[1..3] != "11" && &rest[4..6] != "11", "{text}");
                assert!(&rest[3..6] != "555", "{text} could be a sandbox number");
            } else {
                let rest = text.strip_prefix("+861").expect("+86 mobile");
                assert_eq!(rest.len(), 10);
                assert!((b'3'..=b'9').contains(&rest.as_bytes()[0]), "{text}");
            }
        }
        let share = f64::from(us) / 20_000.0;
        assert!((0.67..0.73).contains(&share), "{share}");
    }

    #[tokio::test]
    async fn generated_register_loads_back() {
        for gzip in [false, true] {
            let dir = tempfile::tempdir().expect("tempdir");
            let report = generate(&opts(dir.path(), gzip)).expect("generate");
            assert_eq!(report.snapshot_records, 1_000);
            assert_eq!(report.delta_records, vec![10, 10, 10]);
            assert_eq!(report.manifests.len(), 4);
            assert_eq!(report.snapshot_as_of, Date::today_utc().add_days(-13));

            let snapshot = Manifest::load(&report.manifests[0]).expect("manifest");
            assert_eq!(snapshot.is_gzip(), gzip);
            let records = read_records(&snapshot, &mut NoProgress).expect("records");
            assert_eq!(records.len(), 1_000);

            let store = EmbeddedStore::new();
            let sync = sync_dir(&store, dir.path(), &mut NoProgress).await.expect("sync");
            assert_eq!(sync.applied.len(), 4);
            assert_eq!(sync.sequence, Some(4));
            let meta = store.cached_meta().expect("meta");
            assert_eq!(meta.record_count, report.final_records);
            assert_eq!(meta.as_of, Date::today_utc().add_days(-10));
            assert_eq!(store.len() as u64, report.final_records);
            assert!(report.final_records > 1_000);
            // the sandbox numbers hold their fixed date, untouched by deltas
            let sandbox_day = Date::parse(SANDBOX_DISCONNECT).expect("date");
            for sb in SANDBOX {
                let number = PhoneNumber::parse(sb.number).expect("number");
                let found = store.lookup(number).await.expect("lookup").found;
                assert_eq!(found, sb.disconnected.then_some(sandbox_day), "{}", sb.number);
            }

            let text = std::fs::read_to_string(&report.queries_file).expect("queries");
            let mut lines = text.lines();
            assert_eq!(lines.next(), Some("phone_number,since"));
            let mut found = 0;
            let mut total = 0;
            for line in lines {
                let (number, since) = line.split_once(',').expect("two columns");
                let number = PhoneNumber::parse(number).expect("number");
                Date::parse(since).expect("since");
                total += 1;
                if store.lookup(number).await.expect("lookup").found.is_some() {
                    found += 1;
                }
            }
            assert_eq!(total, report.queries);
            assert_eq!(total, 1_000);
            assert_eq!(found, report.query_hits);
            assert_eq!(found, 40);

            // a second run refuses to mix into the same directory
            assert!(generate(&opts(dir.path(), gzip)).is_err());
        }
    }

    #[test]
    fn same_seed_same_output() {
        let (a, b) = (tempfile::tempdir().expect("a"), tempfile::tempdir().expect("b"));
        let ra = generate(&opts(a.path(), false)).expect("a");
        let rb = generate(&opts(b.path(), false)).expect("b");
        for name in ["snapshot-000001.csv", "delta-000004.csv", "queries.csv"] {
            let fa = std::fs::read(a.path().join(name)).expect("a");
            let fb = std::fs::read(b.path().join(name)).expect("b");
            assert!(fa == fb, "{name} differs");
        }
        assert_eq!(ra.query_hits, rb.query_hits);
    }

    #[tokio::test]
    async fn sandbox_set_holds_only_the_sandbox_numbers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let o = GenerateOptions {
            sandbox: true,
            ..opts(dir.path(), false)
        };
        let report = generate(&o).expect("generate");
        assert_eq!(report.snapshot_records, SANDBOX_RECORDS);
        assert_eq!(report.manifests.len(), 1);
        assert_eq!(report.queries, 0);
        let store = EmbeddedStore::new();
        sync_dir(&store, dir.path(), &mut NoProgress).await.expect("sync");
        assert_eq!(store.len() as u64, SANDBOX_RECORDS);
        let csv = std::fs::read_to_string(&report.sandbox_file).expect("sandbox.csv");
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], "phone_number,since,status,no_data_reason");
        assert_eq!(lines.len(), SANDBOX.len() + 1);
        assert_eq!(
            lines[4],
            "+12025550103,2020-06-01,REASSIGNMENT_STATUS_NO_DATA,NO_DATA_REASON_BEFORE_COVERAGE"
        );
        // an as_of before the sandbox disconnect date cannot hold them
        let later = tempfile::tempdir().expect("tempdir");
        let o = GenerateOptions {
            as_of: Some(Date::parse("2024-06-14").expect("date")),
            ..GenerateOptions {
                sandbox: true,
                ..opts(later.path(), false)
            }
        };
        let e = generate(&o).expect_err("too early");
        assert!(e.to_string().contains("sandbox"), "{e}");
    }

    #[test]
    fn refuses_future_and_too_early_as_of() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut o = opts(dir.path(), false);
        o.as_of = Some(Date::today_utc().add_days(1));
        assert!(generate(&o).is_err());
        o.as_of = Some(Date::parse("2021-01-28").expect("date"));
        assert!(generate(&o).is_err());
    }
}
