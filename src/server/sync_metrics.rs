//! The metrics of a `reassigned sync` process (the register's files into
//! Redis): its runs, the last success, the last error and the files it
//! applied. `sync --every` (the long-running form) serves them on
//! `--admin-listen` (`server::admin::serve_sync`: `/metrics`, `/livez`);
//! either form can write them to a file after each run
//! (`--metrics-textfile`, [`write_textfile`]) for node_exporter's textfile
//! collector, where a short-lived run (cron, a Kubernetes CronJob) leaves
//! nothing to scrape.
//!
//! A run is rare (hourly), so the state is one mutex, not atomics. Error
//! kinds are a bounded label set given by the caller (the import's error
//! kinds, plus `other`); the message, which may name files, goes to the log
//! only.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use super::metrics::{family, render_build_info, render_imports, render_process_figures};

/// The `kind` of an error outside the caller's list (e.g. Redis not
/// reachable at all).
pub const OTHER_KIND: &str = "other";

/// The state of a sync process's runs, shared by the runs, the admin
/// listener and the textfile.
#[derive(Debug)]
pub struct SyncStats {
    interval: Option<Duration>,
    kinds: &'static [&'static str],
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    runs_ok: u64,
    runs_error: u64,
    errors: BTreeMap<&'static str, u64>,
    running_since: Option<Instant>,
    last_duration: Option<Duration>,
    last_success: Option<SystemTime>,
    last_error: Option<(SystemTime, &'static str)>,
    consecutive_failures: u64,
    sequence: Option<u64>,
}

impl SyncStats {
    /// The stats of a process that syncs every `interval` (`None`: once),
    /// whose errors are of `kinds` (listed with zeros from the start) or
    /// [`OTHER_KIND`].
    pub fn new(interval: Option<Duration>, kinds: &'static [&'static str]) -> Self {
        Self {
            interval,
            kinds,
            state: Mutex::new(State::default()),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        // A panic elsewhere while holding this lock leaves plain data: use it.
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    /// A run starts.
    pub fn run_started(&self) {
        self.with(|s| s.running_since = Some(Instant::now()));
    }

    /// The run ended well; the mirror is at `sequence` (`None`: empty).
    pub fn run_succeeded(&self, sequence: Option<u64>) {
        self.with(|s| {
            s.last_duration = s.running_since.take().map(|t| t.elapsed());
            s.runs_ok += 1;
            s.consecutive_failures = 0;
            s.last_success = Some(SystemTime::now());
            s.sequence = sequence;
        });
    }

    /// The run failed with an error of `kind` (one of the kinds given to
    /// [`SyncStats::new`], else counted as [`OTHER_KIND`]).
    pub fn run_failed(&self, kind: &'static str) {
        let kind = if self.kinds.contains(&kind) {
            kind
        } else {
            OTHER_KIND
        };
        self.with(|s| {
            s.last_duration = s.running_since.take().map(|t| t.elapsed());
            s.runs_error += 1;
            s.consecutive_failures += 1;
            *s.errors.entry(kind).or_default() += 1;
            s.last_error = Some((SystemTime::now(), kind));
        });
    }

    /// Runs that ended well and runs that failed, so far.
    pub fn runs(&self) -> (u64, u64) {
        self.with(|s| (s.runs_ok, s.runs_error))
    }
}

/// Unix seconds of `t` (millisecond precision), 0 for `None`.
fn unix_seconds(t: Option<SystemTime>) -> f64 {
    t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0.0, |d| d.as_millis() as f64 / 1000.0)
}

/// The exposition text of a sync process: its own families, the import
/// counters (`reassigned_import_*`, as a server's re-sync reports them),
/// build info, and with `process` the `process_*` figures (left out of a
/// textfile: they would describe a process that has exited).
pub fn render_sync(stats: &SyncStats, process: bool) -> String {
    let mut out = String::new();
    let out_ref = &mut out;
    stats.with(|s| {
        family(
            out_ref,
            "reassigned_sync_runs_total",
            "counter",
            "Sync runs of this process (every pending register file applied, or a failure), by result.",
        );
        let _ = writeln!(
            out_ref,
            "reassigned_sync_runs_total{{result=\"ok\"}} {}",
            s.runs_ok
        );
        let _ = writeln!(
            out_ref,
            "reassigned_sync_runs_total{{result=\"error\"}} {}",
            s.runs_error
        );
        family(
            out_ref,
            "reassigned_sync_errors_total",
            "counter",
            "Failed sync runs by kind of error (the message is in the log).",
        );
        for kind in stats.kinds.iter().chain(std::iter::once(&OTHER_KIND)) {
            let n = s.errors.get(kind).copied().unwrap_or(0);
            let _ = writeln!(out_ref, "reassigned_sync_errors_total{{kind=\"{kind}\"}} {n}");
        }
        let mut gauge = |name: &str, help: &str, value: String| {
            family(out_ref, name, "gauge", help);
            let _ = writeln!(out_ref, "{name} {value}");
        };
        gauge(
            "reassigned_sync_last_success_timestamp_seconds",
            "End of the last sync run that succeeded, Unix seconds (0: none yet).",
            unix_seconds(s.last_success).to_string(),
        );
        gauge(
            "reassigned_sync_last_error_timestamp_seconds",
            "End of the last sync run that failed, Unix seconds (0: none yet).",
            unix_seconds(s.last_error.map(|(t, _)| t)).to_string(),
        );
        gauge(
            "reassigned_sync_consecutive_failures",
            "Sync runs failed in a row (0 after a success).",
            s.consecutive_failures.to_string(),
        );
        gauge(
            "reassigned_sync_running",
            "1 while a sync run is in progress.",
            u64::from(s.running_since.is_some()).to_string(),
        );
        gauge(
            "reassigned_sync_last_run_duration_seconds",
            "Duration of the last finished sync run, seconds (0: none yet).",
            s.last_duration.map_or(0.0, |d| d.as_secs_f64()).to_string(),
        );
        gauge(
            "reassigned_sync_mirror_sequence",
            "Sequence of the Redis mirror after the last successful sync run (0: empty or none yet).",
            s.sequence.unwrap_or(0).to_string(),
        );
        gauge(
            "reassigned_sync_interval_seconds",
            "The --every interval of this sync process, seconds (0: a one-shot sync).",
            stats.interval.map_or(0.0, |d| d.as_secs_f64()).to_string(),
        );
        if let Some((_, kind)) = s.last_error {
            family(
                out_ref,
                "reassigned_sync_last_error_info",
                "gauge",
                "Always 1; the label names the kind of error of the last failed sync run.",
            );
            let _ = writeln!(out_ref, "reassigned_sync_last_error_info{{kind=\"{kind}\"}} 1");
        }
    });
    render_imports(&mut out);
    render_build_info(&mut out);
    if process {
        render_process_figures(&mut out);
    }
    out
}

/// Writes [`render_sync`] (without process figures) to `path`, replacing it
/// atomically (a temporary file beside it, then a rename), as node_exporter's
/// textfile collector wants.
pub fn write_textfile(path: &Path, stats: &SyncStats) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, render_sync(stats, false))?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KINDS: &[&str] = &["data", "store"];

    fn sample(text: &str, name: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn runs_successes_and_errors_are_reported() {
        let stats = SyncStats::new(Some(Duration::from_secs(3600)), KINDS);
        let text = render_sync(&stats, false);
        assert_eq!(
            sample(&text, "reassigned_sync_last_success_timestamp_seconds"),
            Some(0.0)
        );
        assert_eq!(
            sample(&text, r#"reassigned_sync_errors_total{kind="other"}"#),
            Some(0.0)
        );
        assert_eq!(sample(&text, "reassigned_sync_interval_seconds"), Some(3600.0));
        assert!(!text.contains("reassigned_sync_last_error_info"), "{text}");
        assert!(!text.contains("process_cpu_seconds_total"), "{text}");

        stats.run_started();
        assert_eq!(
            sample(&render_sync(&stats, false), "reassigned_sync_running"),
            Some(1.0)
        );
        stats.run_failed("store");
        stats.run_started();
        stats.run_failed("no such kind");
        let text = render_sync(&stats, true);
        assert_eq!(
            sample(&text, r#"reassigned_sync_runs_total{result="error"}"#),
            Some(2.0)
        );
        assert_eq!(
            sample(&text, r#"reassigned_sync_errors_total{kind="store"}"#),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, r#"reassigned_sync_errors_total{kind="other"}"#),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, r#"reassigned_sync_last_error_info{kind="other"}"#),
            Some(1.0)
        );
        assert_eq!(sample(&text, "reassigned_sync_consecutive_failures"), Some(2.0));
        assert!(sample(&text, "reassigned_sync_last_error_timestamp_seconds").is_some_and(|t| t > 1e9));
        assert!(text.contains("process_cpu_seconds_total"), "{text}");

        stats.run_started();
        stats.run_succeeded(Some(7));
        let text = render_sync(&stats, false);
        assert_eq!(
            sample(&text, r#"reassigned_sync_runs_total{result="ok"}"#),
            Some(1.0)
        );
        assert_eq!(sample(&text, "reassigned_sync_consecutive_failures"), Some(0.0));
        assert_eq!(sample(&text, "reassigned_sync_mirror_sequence"), Some(7.0));
        assert_eq!(sample(&text, "reassigned_sync_running"), Some(0.0));
        assert!(sample(&text, "reassigned_sync_last_success_timestamp_seconds").is_some_and(|t| t > 1e9));
        // The last error stays reported, with its time, after a success.
        assert_eq!(
            sample(&text, r#"reassigned_sync_last_error_info{kind="other"}"#),
            Some(1.0)
        );
        assert_eq!(stats.runs(), (1, 2));
    }

    #[test]
    fn the_textfile_is_replaced_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("reassigned_sync.prom");
        let stats = SyncStats::new(None, KINDS);
        stats.run_started();
        stats.run_succeeded(Some(3));
        write_textfile(&path, &stats).expect("write");
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(sample(&text, "reassigned_sync_mirror_sequence"), Some(3.0));
        assert_eq!(sample(&text, "reassigned_sync_interval_seconds"), Some(0.0));
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
    }
}
