//! Applying manifests to a store in sequence order.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::{ImportError, Kind, Manifest, NoProgress, Progress, applied_key, read_records};
use crate::store::Store;

/// The default of [`ImportOptions::max_shrink`]: a snapshot may remove at
/// most 10% of the mirror's records.
pub const DEFAULT_MAX_SHRINK: f64 = 0.10;

/// Guards of an import against files that would wipe the mirror.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ImportOptions {
    /// The largest share of the mirror's records (0.0 to 1.0) a snapshot may
    /// remove; a snapshot that removes more, or has no records at all, is
    /// refused ([`ImportError::Shrink`]) unless `allow_shrink`.
    pub max_shrink: f64,
    /// Apply a snapshot however much it shrinks the mirror (`--allow-shrink`).
    pub allow_shrink: bool,
}

impl Default for ImportOptions {
    fn default() -> Self {
        Self {
            max_shrink: DEFAULT_MAX_SHRINK,
            allow_shrink: false,
        }
    }
}

impl ImportOptions {
    /// Checks a snapshot of `after` records replacing a mirror of `before`
    /// (`None`: empty).
    fn check_shrink(&self, manifest: &Manifest, before: Option<u64>, after: u64) -> Result<(), ImportError> {
        if self.allow_shrink {
            return Ok(());
        }
        let before = before.unwrap_or(0);
        let floor = (before as f64 * (1.0 - self.max_shrink.clamp(0.0, 1.0))).ceil() as u64;
        if after == 0 || after < floor {
            return Err(ImportError::Shrink {
                file: manifest.path.clone(),
                sequence: manifest.sequence,
                before,
                after,
                max_shrink: self.max_shrink,
            });
        }
        Ok(())
    }
}

/// Refuses `manifest` if the store recorded a different checksum for the
/// same kind and sequence: the register re-issued a file with other content.
fn check_reissued(
    manifest: &Manifest,
    applied: &std::collections::HashMap<String, String>,
) -> Result<(), ImportError> {
    match applied.get(&applied_key(manifest.kind, manifest.sequence)) {
        Some(sha) if !sha.eq_ignore_ascii_case(&manifest.sha256) => Err(ImportError::Reissued {
            file: manifest.path.clone(),
            kind: manifest.kind,
            sequence: manifest.sequence,
            applied_sha256: sha.clone(),
            file_sha256: manifest.sha256.clone(),
        }),
        _ => Ok(()),
    }
}

/// What [`apply_manifest`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// A snapshot replaced the mirror.
    Snapshot {
        /// The snapshot's sequence.
        sequence: u64,
        /// Distinct numbers it holds.
        records: u64,
    },
    /// A delta was merged into the mirror.
    Delta {
        /// The delta's sequence.
        sequence: u64,
        /// Distinct numbers it carried.
        records: u64,
    },
    /// Nothing done: the mirror is already at or past this sequence.
    AlreadyApplied {
        /// The file's sequence.
        sequence: u64,
    },
}

impl fmt::Display for Applied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Applied::Snapshot { sequence, records } => {
                write!(f, "applied snapshot {sequence} ({records} records)")
            }
            Applied::Delta { sequence, records } => write!(f, "applied delta {sequence} ({records} records)"),
            Applied::AlreadyApplied { sequence } => {
                write!(f, "sequence {sequence} is already applied, nothing to do")
            }
        }
    }
}

/// A manifest [`sync_dir`] did not apply because the mirror already has it
/// or a newer snapshot supersedes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// The manifest file.
    pub path: PathBuf,
    /// Its kind.
    pub kind: Kind,
    /// Its sequence.
    pub sequence: u64,
}

/// What [`sync_dir`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// The files applied, in order.
    pub applied: Vec<Applied>,
    /// The manifests not needed, in sequence order.
    pub skipped: Vec<Skipped>,
    /// The mirror's sequence afterwards (`None`: still empty).
    pub sequence: Option<u64>,
}

impl SyncReport {
    /// True if nothing was applied.
    pub fn is_noop(&self) -> bool {
        self.applied
            .iter()
            .all(|a| matches!(a, Applied::AlreadyApplied { .. }))
    }
}

impl fmt::Display for SyncReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.sequence {
            Some(s) => write!(f, "mirror at sequence {s}")?,
            None => write!(f, "mirror empty")?,
        }
        if self.is_noop() {
            write!(f, ", up to date")?;
        }
        for a in &self.applied {
            write!(f, "; {a}")?;
        }
        if !self.skipped.is_empty() {
            write!(
                f,
                "; {} manifest(s) skipped (already applied or superseded)",
                self.skipped.len()
            )?;
        }
        Ok(())
    }
}

/// Loads the manifest at `path` and applies it to `store`.
///
/// Rules, checked against `store.refresh_meta()` before the data file is
/// read: a file at or below the mirror's sequence is
/// [`Applied::AlreadyApplied`]; a delta needs exactly the sequence after the
/// mirror's ([`ImportError::SequenceGap`] otherwise, also on an empty
/// mirror); a snapshot needs a higher sequence; `as_of` must not go backwards
/// ([`ImportError::AsOfBackwards`]). The data file is then read and checked
/// in full ([`read_records`]) before anything is written, so any error
/// leaves the store unchanged.
///
/// Reading is CPU-bound; the future does not yield while it runs.
pub async fn apply_manifest<S: Store>(
    store: &S,
    path: &Path,
    progress: &mut dyn Progress,
) -> Result<Applied, ImportError> {
    apply_manifest_with(store, path, ImportOptions::default(), progress).await
}

/// [`apply_manifest`] with explicit [`ImportOptions`].
///
/// Besides the order rules: a file at or below the mirror's sequence whose
/// SHA-256 differs from the one recorded when that kind and sequence was
/// applied is refused ([`ImportError::Reissued`]); a snapshot that shrinks
/// the mirror beyond `options` is refused ([`ImportError::Shrink`]).
pub async fn apply_manifest_with<S: Store>(
    store: &S,
    path: &Path,
    options: ImportOptions,
    progress: &mut dyn Progress,
) -> Result<Applied, ImportError> {
    let manifest = Manifest::load(path)?;
    apply_loaded(store, &manifest, options, progress).await
}

/// The store write a manifest turns into.
enum Write {
    Snapshot(crate::store::SnapshotWrite),
    Delta(crate::store::DeltaWrite),
}

/// Builds the store write of a checked manifest, once.
fn write_of(manifest: &Manifest) -> Result<Write, ImportError> {
    let write = match manifest.kind {
        Kind::Snapshot => manifest.snapshot_write().map(Write::Snapshot),
        Kind::Delta => manifest.delta_write().map(Write::Delta),
    };
    write.map_err(|reason| ImportError::Manifest(manifest.path.clone(), reason))
}

async fn apply_loaded<S: Store>(
    store: &S,
    manifest: &Manifest,
    options: ImportOptions,
    progress: &mut dyn Progress,
) -> Result<Applied, ImportError> {
    let result = apply_checked(store, manifest, options, progress).await;
    let counted = match &result {
        Ok(Applied::Snapshot { records, .. } | Applied::Delta { records, .. }) => Some(Ok(*records)),
        Ok(_) => None,
        Err(_) => Some(Err(())),
    };
    if let Some(counted) = counted {
        crate::store::calls::calls().import(manifest.kind, counted);
    }
    result
}

/// [`apply_loaded`] without counting the run.
async fn apply_checked<S: Store>(
    store: &S,
    manifest: &Manifest,
    options: ImportOptions,
    progress: &mut dyn Progress,
) -> Result<Applied, ImportError> {
    let current = store.refresh_meta().await?;
    let current_seq = current.as_ref().map(|m| m.sequence);
    if current_seq.is_some_and(|c| manifest.sequence <= c) {
        check_reissued(manifest, &store.applied_checksums().await?)?;
        return Ok(Applied::AlreadyApplied {
            sequence: manifest.sequence,
        });
    }
    if manifest.kind == Kind::Delta && current_seq.map(|c| c + 1) != Some(manifest.sequence) {
        return Err(ImportError::SequenceGap {
            current: current_seq,
            got: manifest.sequence,
        });
    }
    if let Some(meta) = &current
        && manifest.as_of < meta.as_of
    {
        return Err(ImportError::AsOfBackwards {
            current: meta.as_of,
            got: manifest.as_of,
        });
    }
    let write = write_of(manifest)?;
    let records = read_records(manifest, progress)?;
    let count = records.len() as u64;
    if manifest.kind == Kind::Snapshot {
        options.check_shrink(manifest, current.as_ref().map(|m| m.record_count), count)?;
    }
    let applied = match write {
        Write::Snapshot(snapshot) => {
            store.apply_snapshot(&snapshot, &records, current_seq).await?;
            Applied::Snapshot {
                sequence: manifest.sequence,
                records: count,
            }
        }
        Write::Delta(delta) => {
            store.apply_delta(&delta, &records).await?;
            Applied::Delta {
                sequence: manifest.sequence,
                records: count,
            }
        }
    };
    tracing::info!(
        kind = manifest.kind.as_str(),
        sequence = manifest.sequence,
        as_of = %manifest.as_of,
        records = count,
        file = %manifest.path.display(),
        "register file applied"
    );
    Ok(applied)
}

/// Brings `store` up to date from the manifests (`*.json`) in `dir`.
///
/// Every `*.json` file must be a valid manifest (else
/// [`ImportError::Manifest`] naming it). Relative to the mirror's current
/// sequence: if a snapshot with a higher sequence exists, the newest one is
/// applied first; then the deltas after that point are applied in sequence
/// order, which must be consecutive ([`ImportError::SequenceGap`] stops at the
/// first gap, after applying what came before it). Everything older is
/// skipped, so running it again applies nothing.
///
/// Each file is applied atomically; an error stops the sync, leaving the files
/// already applied in place.
pub async fn sync_dir<S: Store>(
    store: &S,
    dir: &Path,
    progress: &mut dyn Progress,
) -> Result<SyncReport, ImportError> {
    sync_dir_with(
        store,
        dir,
        ImportOptions::default(),
        &Interrupt::never(),
        progress,
    )
    .await
}

/// Tells a long [`sync_dir_with`] to stop before its next file (e.g. on
/// SIGTERM). Cheap to clone; clones share the flag.
#[derive(Clone, Debug, Default)]
pub struct Interrupt(Arc<std::sync::atomic::AtomicBool>);

impl Interrupt {
    /// A flag that is never raised unless [`Interrupt::raise`] is called.
    pub fn never() -> Self {
        Self::default()
    }

    /// Asks the sync to stop before its next file.
    pub fn raise(&self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// True once raised.
    pub fn is_raised(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// [`sync_dir`] with explicit [`ImportOptions`]; stops with
/// [`ImportError::Interrupted`] before the next file once `interrupt` is
/// raised. Manifests the mirror already has are checked against the
/// checksums recorded when they were applied ([`ImportError::Reissued`]).
pub async fn sync_dir_with<S: Store>(
    store: &S,
    dir: &Path,
    options: ImportOptions,
    interrupt: &Interrupt,
    progress: &mut dyn Progress,
) -> Result<SyncReport, ImportError> {
    let manifests = load_dir(dir)?;
    let current = store.refresh_meta().await?.map(|m| m.sequence);
    if let Some(c) = current
        && manifests.iter().any(|m| m.sequence <= c)
    {
        let applied = store.applied_checksums().await?;
        for m in manifests.iter().filter(|m| m.sequence <= c) {
            check_reissued(m, &applied)?;
        }
    }

    let mut snapshots: BTreeMap<u64, Manifest> = BTreeMap::new();
    let mut deltas: BTreeMap<u64, Manifest> = BTreeMap::new();
    for m in manifests {
        let map = match m.kind {
            Kind::Snapshot => &mut snapshots,
            Kind::Delta => &mut deltas,
        };
        if let Some(other) = map.get(&m.sequence) {
            return Err(ImportError::Manifest(
                m.path.clone(),
                format!(
                    "{} {} is also described by {}",
                    m.kind,
                    m.sequence,
                    other.path.display()
                ),
            ));
        }
        map.insert(m.sequence, m);
    }

    let mut report = SyncReport {
        sequence: current,
        ..SyncReport::default()
    };
    let above_current = |seq: u64| current.is_none_or(|c| seq > c);
    let start = snapshots.keys().copied().rfind(|&s| above_current(s));
    let mut position = current;
    if let Some(snapshot) = start.and_then(|seq| snapshots.remove(&seq)) {
        let applied = apply_loaded(store, &snapshot, options, progress).await?;
        report.applied.push(applied);
        position = Some(snapshot.sequence);
        report.sequence = position;
    }
    report.skipped.extend(snapshots.into_values().map(skipped));

    for (seq, delta) in deltas {
        if position.is_some_and(|p| seq <= p) {
            report.skipped.push(skipped(delta));
            continue;
        }
        if position.map(|p| p + 1) != Some(seq) {
            return Err(ImportError::SequenceGap {
                current: position,
                got: seq,
            });
        }
        if interrupt.is_raised() {
            return Err(ImportError::Interrupted {
                done: format!("before the next file ({report})"),
            });
        }
        let applied = apply_loaded(store, &delta, options, progress).await?;
        report.applied.push(applied);
        position = Some(seq);
        report.sequence = position;
    }
    report.skipped.sort_by_key(|s| s.sequence);
    Ok(report)
}

fn skipped(m: Manifest) -> Skipped {
    Skipped {
        path: m.path,
        kind: m.kind,
        sequence: m.sequence,
    }
}

/// The most problems [`sync_dir_lenient`] reports.
const MAX_REPORTED: usize = 100;

/// One line `file: reason` (the first line of the reason only).
fn problem_line(path: &Path, e: &ImportError) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    let text = e.to_string();
    let first = text.lines().next().unwrap_or_default();
    let rest = text.lines().skip(1).map(str::trim).collect::<Vec<_>>().join(" ");
    let reason = if rest.is_empty() {
        first.to_string()
    } else {
        format!("{} {rest}", first.trim_end_matches(':'))
    };
    let mut line = format!("{name}: {reason}");
    if line.len() > 400 {
        let mut cut = 400;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
        line.push_str("...");
    }
    line
}

/// Like [`sync_dir_with`], but never gives up on the whole directory because
/// of one bad file: brings `store` to the longest valid sequence it can
/// reach and returns, with the report, one `file: reason` line per file it
/// skipped (invalid or unreadable manifests, bad or missing data files, a
/// gap, a refused snapshot).
///
/// Snapshots above the mirror's sequence are tried newest first until one
/// applies (a half-written newest snapshot falls back to an older one and
/// its deltas); then the deltas after it in order, up to the first that
/// fails or is missing. Only an unreadable directory is an error.
pub async fn sync_dir_lenient<S: Store>(
    store: &S,
    dir: &Path,
    options: ImportOptions,
    progress: &mut dyn Progress,
) -> Result<(SyncReport, Vec<String>), ImportError> {
    let mut problems = Vec::new();
    let manifests = load_dir_lenient(dir, &mut problems)?;
    let report = sync_lenient(store, manifests, options, progress, &mut problems).await?;
    Ok((report, problems))
}

/// [`sync_dir_lenient`] in two steps over one reading of `dir`'s manifests:
/// the files up to sequence `through` are applied to `first`, then those
/// above it to `then`, which must be the same store (e.g. `first` wrapped:
/// `crate::federation::register`'s `EventingStore` over a store rebuilt at
/// every start). One report of both.
pub async fn sync_dir_lenient_split<A: Store, B: Store>(
    first: &A,
    through: u64,
    then: &B,
    dir: &Path,
    options: ImportOptions,
    progress: &mut dyn Progress,
) -> Result<(SyncReport, Vec<String>), ImportError> {
    let mut problems = Vec::new();
    let (early, late): (Vec<Manifest>, Vec<Manifest>) = load_dir_lenient(dir, &mut problems)?
        .into_iter()
        .partition(|m| m.sequence <= through);
    let mut report = sync_lenient(first, early, options, progress, &mut problems).await?;
    if late.is_empty() {
        return Ok((report, problems));
    }
    // A file up to `through` that `first` could not apply would fail again.
    let then_report = sync_lenient(then, late, options, progress, &mut problems).await?;
    report.applied.extend(then_report.applied);
    report.skipped.extend(then_report.skipped);
    report.skipped.sort_by_key(|s| s.sequence);
    report.sequence = then_report.sequence;
    Ok((report, problems))
}

/// Notes a skipped file: logged, and kept in `problems` up to [`MAX_REPORTED`].
fn note(problems: &mut Vec<String>, line: String) {
    tracing::warn!(problem = %line, "register file skipped");
    if problems.len() < MAX_REPORTED {
        problems.push(line);
    }
}

/// The manifests of `dir` that load; a `file: reason` line in `problems`
/// for each that does not.
fn load_dir_lenient(dir: &Path, problems: &mut Vec<String>) -> Result<Vec<Manifest>, ImportError> {
    let mut manifests = Vec::new();
    for path in list_dir(dir)? {
        match Manifest::load(&path) {
            Ok(m) => manifests.push(m),
            Err(e) => note(problems, problem_line(&path, &e)),
        }
    }
    Ok(manifests)
}

/// The work of [`sync_dir_lenient`] on manifests already loaded.
async fn sync_lenient<S: Store>(
    store: &S,
    manifests: Vec<Manifest>,
    options: ImportOptions,
    progress: &mut dyn Progress,
    problems: &mut Vec<String>,
) -> Result<SyncReport, ImportError> {
    let current = store.refresh_meta().await?.map(|m| m.sequence);
    let applied = match current {
        Some(_) => store.applied_checksums().await?,
        None => Default::default(),
    };
    let mut snapshots: BTreeMap<u64, Manifest> = BTreeMap::new();
    let mut deltas: BTreeMap<u64, Manifest> = BTreeMap::new();
    let mut report = SyncReport {
        sequence: current,
        ..SyncReport::default()
    };
    for m in manifests {
        if current.is_some_and(|c| m.sequence <= c) {
            if let Err(e) = check_reissued(&m, &applied) {
                note(problems, problem_line(&m.path, &e));
            } else {
                report.skipped.push(skipped(m));
            }
            continue;
        }
        let map = match m.kind {
            Kind::Snapshot => &mut snapshots,
            Kind::Delta => &mut deltas,
        };
        if let Some(other) = map.get(&m.sequence) {
            let e = ImportError::Manifest(
                m.path.clone(),
                format!(
                    "{} {} is also described by {}",
                    m.kind,
                    m.sequence,
                    other.path.display()
                ),
            );
            note(problems, problem_line(&m.path, &e));
            continue;
        }
        map.insert(m.sequence, m);
    }
    let mut position = current;
    while let Some((_, snapshot)) = snapshots.pop_last() {
        match apply_loaded(store, &snapshot, options, progress).await {
            Ok(applied) => {
                report.applied.push(applied);
                position = Some(snapshot.sequence);
                report.sequence = position;
                break;
            }
            Err(e) => note(problems, problem_line(&snapshot.path, &e)),
        }
    }
    report.skipped.extend(snapshots.into_values().map(skipped));
    let mut stopped = false;
    for (seq, delta) in deltas {
        if position.is_some_and(|p| seq <= p) {
            report.skipped.push(skipped(delta));
            continue;
        }
        if stopped {
            let e = ImportError::Manifest(
                delta.path.clone(),
                "not applied: an earlier file of the sequence could not be applied".into(),
            );
            note(problems, problem_line(&delta.path, &e));
            continue;
        }
        if position.map(|p| p + 1) != Some(seq) {
            let e = ImportError::SequenceGap {
                current: position,
                got: seq,
            };
            note(problems, problem_line(&delta.path, &e));
            stopped = true;
            continue;
        }
        match apply_loaded(store, &delta, options, progress).await {
            Ok(applied) => {
                report.applied.push(applied);
                position = Some(seq);
                report.sequence = position;
            }
            Err(e) => {
                note(problems, problem_line(&delta.path, &e));
                stopped = true;
            }
        }
    }
    report.skipped.sort_by_key(|s| s.sequence);
    Ok(report)
}

/// The `*.json` files of `dir`, in name order.
fn list_dir(dir: &Path) -> Result<Vec<PathBuf>, ImportError> {
    let io_err = |error| ImportError::Io {
        path: dir.to_path_buf(),
        error,
    };
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err)? {
        let path = entry.map_err(io_err)?.path();
        if path.extension().is_some_and(|e| e == "json") && path.is_file() {
            paths.push(path);
        }
    }
    paths.sort();
    Ok(paths)
}

/// The `*.json` files of `dir`, in name order.
pub(super) fn list_manifests(dir: &Path) -> Result<Vec<PathBuf>, ImportError> {
    list_dir(dir)
}

/// Loads every `*.json` file of `dir` as a manifest, in name order.
fn load_dir(dir: &Path) -> Result<Vec<Manifest>, ImportError> {
    list_dir(dir)?.iter().map(Manifest::load).collect()
}

/// Starts a background task that runs [`sync_dir`] on `dir` every `interval`
/// (the first run one interval from now) until `shutdown` completes.
///
/// Each run happens on a blocking thread (reading a file is CPU-bound), so
/// request handling is not held up. Errors are logged with `tracing` and the
/// store keeps serving what it has; the next run tries again.
///
/// Must be called inside a Tokio runtime.
pub fn spawn_resync<S>(
    store: S,
    dir: PathBuf,
    interval: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()>
where
    S: Store + Clone,
{
    spawn_resync_with(store, dir, interval, ImportOptions::default(), |_| {}, shutdown)
}

/// [`spawn_resync`] with explicit [`ImportOptions`], running
/// [`sync_dir_lenient`] (a bad file does not hold back the valid ones before
/// it) and handing each run's skipped files to `on_problems`.
pub fn spawn_resync_with<S, F>(
    store: S,
    dir: PathBuf,
    interval: Duration,
    options: ImportOptions,
    on_problems: F,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()>
where
    S: Store + Clone,
    F: Fn(Vec<String>) + Send + Sync + 'static,
{
    let interval = interval.max(Duration::from_millis(10));
    let dir = Arc::new(dir);
    tokio::spawn(async move {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                _ = ticker.tick() => {}
            }
            let (store, dir) = (store.clone(), Arc::clone(&dir));
            let handle = tokio::runtime::Handle::current();
            let run = tokio::task::spawn_blocking(move || {
                handle.block_on(sync_dir_lenient(&store, &dir, options, &mut NoProgress))
            });
            match run.await {
                Ok(Ok((report, problems))) => {
                    if report.is_noop() {
                        tracing::debug!(%report, "register resync: up to date");
                    } else {
                        tracing::info!(%report, "register resync");
                    }
                    on_problems(problems);
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "register resync failed; still serving the previous data")
                }
                Err(e) => tracing::error!(error = %e, "register resync task failed"),
            }
        }
        tracing::debug!("register resync stopped");
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::generate::write_register_file;
    use crate::domain::{Date, PhoneNumber};
    use crate::store::EmbeddedStore;

    /// A day `n` days before today (manifests may not be in the future).
    fn day(n: i32) -> Date {
        Date::today_utc().add_days(-n)
    }

    fn num(i: u64) -> u64 {
        14_155_550_000 + i
    }

    /// Writes `snapshot-NNNNNN.json` or `delta-NNNNNN.json` with `rows`
    /// (number index, days before today).
    fn write(dir: &Path, kind: Kind, sequence: u64, as_of: i32, rows: &[(u64, i32)]) -> PathBuf {
        let stem = format!("{kind}-{sequence:06}");
        let snapshot = kind == Kind::Snapshot;
        let manifest = Manifest {
            kind,
            sequence,
            as_of: day(as_of),
            coverage_start: snapshot.then(|| Date::parse("2021-01-27").expect("date")),
            covered_prefixes: snapshot.then(|| vec!["+1".to_string()]),
            data: format!("{stem}.csv"),
            records: 0,
            sha256: String::new(),
            path: PathBuf::new(),
        };
        let rows = rows.iter().map(|&(i, d)| (num(i), day(d).days() as u16));
        write_register_file(dir, &format!("{stem}.json"), manifest, rows)
            .expect("write")
            .path
    }

    async fn date_of(store: &EmbeddedStore, i: u64) -> Option<Date> {
        let n = PhoneNumber::from_value(num(i)).expect("number");
        store.lookup(n).await.expect("lookup").found
    }

    fn seq(store: &EmbeddedStore) -> Option<u64> {
        store.cached_meta().map(|m| m.sequence)
    }

    #[tokio::test]
    async fn applies_in_order_and_reports_already_applied() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s1 = write(dir.path(), Kind::Snapshot, 1, 10, &[(1, 100), (2, 50)]);
        let d2 = write(dir.path(), Kind::Delta, 2, 9, &[(2, 9), (3, 9)]);
        let store = EmbeddedStore::new();
        let p = &mut NoProgress;

        let e = apply_manifest(&store, &d2, p).await.expect_err("delta on empty");
        assert!(
            matches!(
                e,
                ImportError::SequenceGap {
                    current: None,
                    got: 2
                }
            ),
            "{e}"
        );

        let a = apply_manifest(&store, &s1, p).await.expect("snapshot");
        assert_eq!(
            a,
            Applied::Snapshot {
                sequence: 1,
                records: 2
            }
        );
        let a = apply_manifest(&store, &s1, p).await.expect("again");
        assert_eq!(a, Applied::AlreadyApplied { sequence: 1 });

        let a = apply_manifest(&store, &d2, p).await.expect("delta");
        assert_eq!(
            a,
            Applied::Delta {
                sequence: 2,
                records: 2
            }
        );
        assert_eq!(date_of(&store, 2).await, Some(day(9)));
        assert_eq!(date_of(&store, 3).await, Some(day(9)));
        let a = apply_manifest(&store, &d2, p).await.expect("again");
        assert_eq!(a, Applied::AlreadyApplied { sequence: 2 });
        assert_eq!(store.len(), 3);
    }

    #[tokio::test]
    async fn order_checks_come_before_the_data_and_change_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s1 = write(dir.path(), Kind::Snapshot, 1, 10, &[(1, 100)]);
        let d3 = write(dir.path(), Kind::Delta, 3, 8, &[(3, 8)]);
        let d2_old = write(dir.path(), Kind::Delta, 2, 11, &[(2, 11)]);
        let s5_old = write(dir.path(), Kind::Snapshot, 5, 20, &[(5, 20)]);
        // the order checks must not even open the data files
        for f in ["delta-000003.csv", "delta-000002.csv", "snapshot-000005.csv"] {
            std::fs::remove_file(dir.path().join(f)).expect("remove");
        }
        let store = EmbeddedStore::new();
        let p = &mut NoProgress;
        apply_manifest(&store, &s1, p).await.expect("snapshot");

        let e = apply_manifest(&store, &d3, p).await.expect_err("gap");
        assert!(
            matches!(
                e,
                ImportError::SequenceGap {
                    current: Some(1),
                    got: 3
                }
            ),
            "{e}"
        );
        let e = apply_manifest(&store, &d2_old, p).await.expect_err("backwards");
        assert!(matches!(e, ImportError::AsOfBackwards { .. }), "{e}");
        let e = apply_manifest(&store, &s5_old, p).await.expect_err("backwards");
        assert!(e.to_string().contains("as_of would go backwards"), "{e}");

        // a bad data file changes nothing either
        let d2 = write(dir.path(), Kind::Delta, 2, 9, &[(2, 9)]);
        std::fs::write(
            dir.path().join("delta-000002.csv"),
            "phone_number,disconnect_date\n+1x,2024-01-01\n",
        )
        .expect("corrupt");
        let e = apply_manifest(&store, &d2, p).await.expect_err("bad data");
        assert!(matches!(e, ImportError::Data { .. }), "{e}");
        assert_eq!(seq(&store), Some(1));
        assert_eq!(store.len(), 1);
    }

    #[tokio::test]
    async fn sync_dir_applies_pending_and_is_idempotent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::new();
        let p = &mut NoProgress;
        let r = sync_dir(&store, dir.path(), p).await.expect("empty dir");
        assert_eq!(r, SyncReport::default());

        write(dir.path(), Kind::Snapshot, 1, 10, &[(1, 100), (2, 50)]);
        write(dir.path(), Kind::Delta, 2, 9, &[(2, 9)]);
        write(dir.path(), Kind::Delta, 3, 8, &[(3, 8)]);
        std::fs::write(dir.path().join("notes.txt"), "not a manifest").expect("write");
        let r = sync_dir(&store, dir.path(), p).await.expect("sync");
        assert_eq!(r.applied.len(), 3);
        assert_eq!(r.sequence, Some(3));
        assert!(r.skipped.is_empty());
        assert_eq!(store.len(), 3);

        let r = sync_dir(&store, dir.path(), p).await.expect("again");
        assert!(r.applied.is_empty() && r.is_noop());
        assert_eq!(r.skipped.len(), 3);
        assert_eq!(r.sequence, Some(3));
        assert!(r.to_string().contains("up to date"), "{r}");

        write(dir.path(), Kind::Delta, 4, 7, &[(4, 7)]);
        let r = sync_dir(&store, dir.path(), p).await.expect("one more");
        assert_eq!(
            r.applied,
            vec![Applied::Delta {
                sequence: 4,
                records: 1
            }]
        );
    }

    #[tokio::test]
    async fn sync_dir_starts_from_the_newest_snapshot() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), Kind::Snapshot, 1, 10, &[(1, 100)]);
        write(dir.path(), Kind::Delta, 2, 9, &[(2, 9)]);
        write(dir.path(), Kind::Delta, 3, 8, &[(3, 8)]);
        write(
            dir.path(),
            Kind::Snapshot,
            3,
            8,
            &[(1, 100), (2, 9), (3, 8), (30, 8)],
        );
        write(dir.path(), Kind::Delta, 4, 7, &[(4, 7)]);
        let store = EmbeddedStore::new();
        let r = sync_dir(&store, dir.path(), &mut NoProgress).await.expect("sync");
        assert_eq!(
            r.applied,
            vec![
                Applied::Snapshot {
                    sequence: 3,
                    records: 4
                },
                Applied::Delta {
                    sequence: 4,
                    records: 1
                }
            ]
        );
        let skipped: Vec<_> = r.skipped.iter().map(|s| (s.kind, s.sequence)).collect();
        assert_eq!(
            skipped,
            vec![(Kind::Snapshot, 1), (Kind::Delta, 2), (Kind::Delta, 3)]
        );
        assert_eq!(store.len(), 5);
        assert!(date_of(&store, 30).await.is_some());
    }

    #[tokio::test]
    async fn sync_dir_stops_at_a_gap() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), Kind::Snapshot, 1, 10, &[(1, 100)]);
        write(dir.path(), Kind::Delta, 2, 9, &[(2, 9)]);
        write(dir.path(), Kind::Delta, 4, 7, &[(4, 7)]);
        let store = EmbeddedStore::new();
        let e = sync_dir(&store, dir.path(), &mut NoProgress)
            .await
            .expect_err("gap");
        assert!(
            matches!(
                e,
                ImportError::SequenceGap {
                    current: Some(2),
                    got: 4
                }
            ),
            "{e}"
        );
        assert_eq!(seq(&store), Some(2));

        // only deltas and an empty mirror: a gap too
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), Kind::Delta, 2, 9, &[(2, 9)]);
        let e = sync_dir(&EmbeddedStore::new(), dir.path(), &mut NoProgress)
            .await
            .expect_err("gap");
        assert!(
            matches!(
                e,
                ImportError::SequenceGap {
                    current: None,
                    got: 2
                }
            ),
            "{e}"
        );
    }

    #[tokio::test]
    async fn sync_dir_names_a_bad_manifest() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), Kind::Snapshot, 1, 10, &[(1, 100)]);
        std::fs::write(dir.path().join("broken.json"), "{}").expect("write");
        let e = sync_dir(&EmbeddedStore::new(), dir.path(), &mut NoProgress)
            .await
            .expect_err("bad");
        assert!(
            matches!(&e, ImportError::Manifest(p, _) if p.ends_with("broken.json")),
            "{e}"
        );

        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), Kind::Snapshot, 1, 10, &[(1, 100)]);
        let copy = std::fs::read(dir.path().join("snapshot-000001.json")).expect("read");
        std::fs::write(dir.path().join("copy.json"), copy).expect("write");
        let e = sync_dir(&EmbeddedStore::new(), dir.path(), &mut NoProgress)
            .await
            .expect_err("dup");
        assert!(e.to_string().contains("is also described by"), "{e}");

        let e = sync_dir(
            &EmbeddedStore::new(),
            &dir.path().join("missing"),
            &mut NoProgress,
        )
        .await
        .expect_err("missing dir");
        assert!(matches!(e, ImportError::Io { .. }), "{e}");
    }

    #[tokio::test]
    async fn open_and_background_resync() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), Kind::Snapshot, 1, 10, &[(1, 100)]);
        let store = Arc::new(
            super::super::embedded::open_dir(dir.path(), ImportOptions::default(), &mut NoProgress)
                .await
                .expect("open"),
        );
        assert_eq!(seq(&store), Some(1));

        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = super::super::embedded::spawn_resync(
            &store,
            Arc::clone(&store),
            dir.path().to_path_buf(),
            Duration::from_millis(20),
            ImportOptions::default(),
            async move {
                let _ = stopped.await;
            },
        );
        // a broken file is logged (a resync ran and saw it) and the old data kept
        std::fs::write(dir.path().join("delta-000002.json"), "{").expect("write");
        let saw_it = || {
            store
                .import_problems()
                .iter()
                .any(|p| p.starts_with("delta-000002.json: "))
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !saw_it() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(saw_it(), "{:?}", store.import_problems());
        assert_eq!(seq(&store), Some(1));
        write(dir.path(), Kind::Delta, 2, 9, &[(2, 9)]);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while seq(&store) != Some(2) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(seq(&store), Some(2));
        assert!(
            store.import_problems().is_empty(),
            "{:?}",
            store.import_problems()
        );
        stop.send(()).expect("stop");
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("stops")
            .expect("joins");
    }
}
