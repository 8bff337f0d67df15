//! Polling with a deadline: the one `eventually` of the test suite. Tests
//! wait for a condition, never for a fixed time, unless the time itself is
//! what they test (and then they say so).
#![allow(dead_code)]

use std::time::{Duration, Instant};

/// How long [`eventually`] waits: generous, because the machine running the
/// tests may be loaded.
pub const DEADLINE: Duration = Duration::from_secs(15);

/// How often a condition is checked.
const PERIOD: Duration = Duration::from_millis(20);

/// Polls `check` until it is true; fails the test, naming `what`, after
/// [`DEADLINE`].
pub async fn eventually(what: &str, check: impl AsyncFnMut() -> bool) {
    eventually_within(what, DEADLINE, check).await;
}

/// Polls `check` until it is true; fails the test, naming `what`, after
/// `within` (for waits whose bound is itself asserted).
pub async fn eventually_within(what: &str, within: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting until {what}"
        );
        tokio::time::sleep(PERIOD).await;
    }
}

/// The next item of `stream`; fails the test if none comes within
/// [`DEADLINE`] or the stream ends.
pub async fn next_item<S: futures_util::Stream + Unpin>(stream: &mut S) -> S::Item {
    use futures_util::StreamExt;
    tokio::time::timeout(DEADLINE, stream.next())
        .await
        .expect("an item in time")
        .expect("the stream goes on")
}
