//! What the load generators (`bench` and its fan-out method) share: the
//! latency report and the random numbers they ask about. Both import it;
//! it imports neither.

use std::fmt;

use hdrhistogram::Histogram;
use rand::Rng as _;
use rand::rngs::StdRng;
use serde::Serialize;

/// Latency percentiles in microseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Latency {
    /// Calls in the histogram (the successful measured calls).
    pub count: u64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest recorded.
    pub max: u64,
}

/// The percentiles in milliseconds, on one line of the text reports.
impl fmt::Display for Latency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  mean {:.3}",
            ms(self.p50),
            ms(self.p90),
            ms(self.p99),
            ms(self.p999),
            ms(self.max),
            self.mean / 1000.0
        )
    }
}

impl Latency {
    /// The percentiles of a histogram of microseconds.
    pub fn from_histogram(hist: &Histogram<u64>) -> Self {
        if hist.is_empty() {
            return Self::default();
        }
        Self {
            count: hist.len(),
            mean: hist.mean(),
            p50: hist.value_at_quantile(0.5),
            p90: hist.value_at_quantile(0.9),
            p99: hist.value_at_quantile(0.99),
            p999: hist.value_at_quantile(0.999),
            max: hist.max(),
        }
    }
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// A random North American number: `+1`, area code and exchange 200 to 999,
/// line 0000 to 9999.
pub(crate) fn random_us_number(rng: &mut StdRng) -> u64 {
    let area = rng.random_range(200..1000u64);
    let exchange = rng.random_range(200..1000u64);
    let line = rng.random_range(0..10_000u64);
    10_000_000_000 + area * 10_000_000 + exchange * 10_000 + line
}
