//! Lock-free latency histograms for the rooms that measure (the server's
//! calls, the store's calls), read by the metrics endpoint
//! (`server::metrics`). Observing is a bucket search over a dozen integers
//! and two relaxed atomic adds: no lock, no allocation.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the latency buckets: fine below a millisecond,
/// where answers from the membership filter or the embedded store land,
/// and up to the per-call timeout's range.
pub const LATENCY_BOUNDS: [f64; 16] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0,
];

/// [`LATENCY_BOUNDS`] in nanoseconds (compared without floating point).
const BOUNDS_NS: [u64; 16] = [
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
];

/// Buckets of a [`Histogram`]: one per bound, then `+Inf`.
pub const BUCKETS: usize = LATENCY_BOUNDS.len() + 1;

/// A latency histogram over [`LATENCY_BOUNDS`] (Prometheus style: read
/// cumulatively with [`Histogram::read`]).
#[derive(Debug)]
pub struct Histogram {
    /// Observations per bucket (not cumulative).
    buckets: [AtomicU64; BUCKETS],
    /// Sum of the observations in nanoseconds.
    sum_ns: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

/// A reading of a [`Histogram`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HistogramReading {
    /// Observations at or below each bound of [`LATENCY_BOUNDS`], then all
    /// of them (`+Inf`).
    pub cumulative: [u64; BUCKETS],
    /// Sum of the observations in seconds.
    pub sum_seconds: f64,
}

impl HistogramReading {
    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.cumulative[BUCKETS - 1]
    }
}

impl Histogram {
    /// An empty histogram (usable in a `static`).
    pub const fn new() -> Self {
        Self {
            buckets: [const { AtomicU64::new(0) }; BUCKETS],
            sum_ns: AtomicU64::new(0),
        }
    }

    /// Counts one observation of `elapsed`.
    pub fn observe(&self, elapsed: Duration) {
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let bucket = BOUNDS_NS.iter().position(|&b| ns <= b).unwrap_or(BUCKETS - 1);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// The current counts, cumulative.
    pub fn read(&self) -> HistogramReading {
        let mut cumulative = [0u64; BUCKETS];
        let mut total = 0u64;
        for (slot, bucket) in cumulative.iter_mut().zip(&self.buckets) {
            total = total.saturating_add(bucket.load(Ordering::Relaxed));
            *slot = total;
        }
        HistogramReading {
            cumulative,
            sum_seconds: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_agree_and_observations_land_in_their_bucket() {
        for (s, ns) in LATENCY_BOUNDS.iter().zip(BOUNDS_NS) {
            assert_eq!((s * 1e9).round() as u64, ns);
        }
        let h = Histogram::new();
        h.observe(Duration::from_micros(30));
        h.observe(Duration::from_micros(100));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let r = h.read();
        assert_eq!(r.cumulative[0], 1, "30 us <= 50 us");
        assert_eq!(r.cumulative[1], 2, "100 us is at its bound, inclusive");
        assert_eq!(r.cumulative[5], 2, "3 ms > 2.5 ms");
        assert_eq!(r.cumulative[6], 3, "3 ms <= 5 ms");
        assert_eq!(r.cumulative[BUCKETS - 2], 3, "60 s beyond the last bound");
        assert_eq!(r.count(), 4);
        assert!((r.sum_seconds - 60.00313).abs() < 1e-9, "{}", r.sum_seconds);
    }
}
