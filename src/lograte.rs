//! Rate limiting of repeated log lines, so that a flood of failures (failed
//! handshakes, requests refused during a Redis stall) cannot become a denial
//! of service on the log pipeline.
//!
//! Each call site has a key (a `&'static str`). Per key, the first
//! [`LogRate::burst`] lines of every window are logged; the rest are counted
//! and not logged. The first line logged in a later window carries the
//! number suppressed before it, and one summary line per key
//! (`"suppressed similar log lines"`, with `key` and `suppressed`) is
//! written when a window that suppressed lines ends: at the next line of
//! that key, or at the next [`LogRate::flush`] (the server calls it every
//! second). Every event, logged or not, is still counted where it matters
//! (metrics); [`LogRate::suppressed_total`] counts the lines not written.
//!
//! ```
//! use reassigned::lograte;
//!
//! if let Some(suppressed) = lograte::global().check("example_failure") {
//!     tracing::info!(suppressed, "something failed");
//! }
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// Lines logged per key and window by [`global`].
pub const DEFAULT_BURST: u32 = 10;
/// The window of [`global`].
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(10);

/// A rate limit on log lines, per call-site key.
#[derive(Debug)]
pub struct LogRate {
    burst: u32,
    window: Duration,
    sites: Mutex<HashMap<&'static str, Site>>,
    suppressed_total: AtomicU64,
}

#[derive(Debug)]
struct Site {
    window_start: Instant,
    logged: u32,
    /// Lines not logged since the last logged line or summary.
    suppressed: u64,
}

impl LogRate {
    /// At most `burst` lines per key in every `window`.
    pub fn new(burst: u32, window: Duration) -> Self {
        Self {
            burst,
            window,
            sites: Mutex::new(HashMap::new()),
            suppressed_total: AtomicU64::new(0),
        }
    }

    /// Lines logged per key and window.
    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// The window.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Whether the line of `key` about to be written should be: `Some(k)`
    /// says log it (`k` lines of this key were suppressed since the last
    /// one logged, already reported by a summary line), `None` says drop it
    /// (it is counted).
    pub fn check(&self, key: &'static str) -> Option<u64> {
        let now = Instant::now();
        let mut sites = self.sites.lock().unwrap_or_else(PoisonError::into_inner);
        let site = sites.entry(key).or_insert(Site {
            window_start: now,
            logged: 0,
            suppressed: 0,
        });
        if now.duration_since(site.window_start) >= self.window {
            let suppressed = std::mem::take(&mut site.suppressed);
            summarise(key, suppressed);
            site.window_start = now;
            site.logged = 0;
            if site.logged < self.burst {
                site.logged += 1;
                return Some(suppressed);
            }
        }
        if site.logged < self.burst {
            site.logged += 1;
            return Some(0);
        }
        site.suppressed += 1;
        self.suppressed_total.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// Writes the summary line of every key whose window has ended with
    /// lines suppressed, so a flood that stops is still summarised.
    pub fn flush(&self) {
        let now = Instant::now();
        let mut sites = self.sites.lock().unwrap_or_else(PoisonError::into_inner);
        for (key, site) in sites.iter_mut() {
            if site.suppressed > 0 && now.duration_since(site.window_start) >= self.window {
                summarise(key, std::mem::take(&mut site.suppressed));
                site.window_start = now;
                site.logged = 0;
            }
        }
    }

    /// Lines not written since this limiter was made, all keys together.
    pub fn suppressed_total(&self) -> u64 {
        self.suppressed_total.load(Ordering::Relaxed)
    }
}

fn summarise(key: &str, suppressed: u64) {
    if suppressed > 0 {
        tracing::warn!(key, suppressed, "suppressed similar log lines");
    }
}

/// The process-wide limiter ([`DEFAULT_BURST`] lines per key every
/// [`DEFAULT_WINDOW`]): the log pipeline is one per process.
pub fn global() -> &'static LogRate {
    static GLOBAL: OnceLock<LogRate> = OnceLock::new();
    GLOBAL.get_or_init(|| LogRate::new(DEFAULT_BURST, DEFAULT_WINDOW))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_lines_of_a_window_pass_and_the_rest_are_counted() {
        let rate = LogRate::new(3, Duration::from_secs(3600));
        let passed = (0..100).filter(|_| rate.check("a").is_some()).count();
        assert_eq!(passed, 3);
        assert_eq!(rate.suppressed_total(), 97);
        // Keys are independent.
        assert_eq!(rate.check("b"), Some(0));
        assert_eq!(rate.suppressed_total(), 97);
    }

    #[test]
    fn a_new_window_logs_again_and_reports_what_was_suppressed() {
        let rate = LogRate::new(2, Duration::from_millis(30));
        for _ in 0..10 {
            rate.check("a");
        }
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(rate.check("a"), Some(8));
        assert_eq!(rate.check("a"), Some(0));
        assert_eq!(rate.check("a"), None);
        std::thread::sleep(Duration::from_millis(40));
        rate.flush();
        // The flush reported the one suppressed line and opened a window.
        assert_eq!(rate.check("a"), Some(0));
        assert_eq!(rate.suppressed_total(), 9);
    }
}
