//! Progress reports while a data file is read.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

/// Receives progress while records are read. Called once per file with
/// [`Progress::start`], then every few tens of thousands of rows with
/// [`Progress::advance`], then once with [`Progress::finish`].
pub trait Progress: Send {
    /// A data file is about to be read; `total` is the row count its manifest
    /// announces.
    fn start(&mut self, file: &Path, total: u64);
    /// `read` rows of the current file have been read so far.
    fn advance(&mut self, read: u64);
    /// The current file has been read completely (`read` rows, valid or not).
    fn finish(&mut self, read: u64);
    /// Asked between chunks: `true` stops the read at once with
    /// [`super::ImportError::Interrupted`] (e.g. after SIGTERM). Default: never.
    fn should_stop(&self) -> bool {
        false
    }
}

/// Reports nothing (tests, the server's background resync).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&mut self, _file: &Path, _total: u64) {}
    fn advance(&mut self, _read: u64) {}
    fn finish(&mut self, _read: u64) {}
}

/// Prints a line to stderr at most about once per second (rows read, percent,
/// rows per second) and a summary line per file. Prints file names and
/// counts only, never data.
#[derive(Debug)]
pub struct StderrProgress {
    label: String,
    total: u64,
    started: Instant,
    last_print: Instant,
    interval: Duration,
}

impl StderrProgress {
    /// A reporter printing at most once per second.
    pub fn new() -> Self {
        let now = Instant::now();
        Self {
            label: String::new(),
            total: 0,
            started: now,
            last_print: now,
            interval: Duration::from_secs(1),
        }
    }

    fn rate(&self, read: u64) -> f64 {
        let secs = self.started.elapsed().as_secs_f64();
        if secs > 0.0 { read as f64 / secs } else { 0.0 }
    }
}

impl Default for StderrProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress for StderrProgress {
    fn start(&mut self, file: &Path, total: u64) {
        self.label = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| file.display().to_string());
        self.total = total;
        self.started = Instant::now();
        self.last_print = self.started;
    }

    fn advance(&mut self, read: u64) {
        let now = Instant::now();
        if now.duration_since(self.last_print) < self.interval {
            return;
        }
        self.last_print = now;
        let percent = if self.total > 0 {
            (read as f64 * 100.0 / self.total as f64).min(100.0)
        } else {
            100.0
        };
        let _ = writeln!(
            std::io::stderr(),
            "{}: {read}/{} records ({percent:.1}%), {:.0} records/s",
            self.label,
            self.total,
            self.rate(read)
        );
    }

    fn finish(&mut self, read: u64) {
        let _ = writeln!(
            std::io::stderr(),
            "{}: {read} records read in {:.2} s ({:.0} records/s)",
            self.label,
            self.started.elapsed().as_secs_f64(),
            self.rate(read)
        );
    }
}
