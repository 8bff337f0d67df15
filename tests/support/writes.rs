//! Store write requests and records for the store tests (the Redis store's
//! own tests and the contract suite that runs on every store).
#![allow(dead_code)]

use rand::{Rng, SeedableRng};
use reassigned::domain::{Date, PhoneNumber, Prefix};
use reassigned::store::{DeltaWrite, Records, SnapshotWrite, Store};

/// Coverage start of the test mirrors: 2021-01-27.
pub const COVERAGE_START: i32 = 18_654;

/// A snapshot write covering +1 and +86 from [`COVERAGE_START`].
pub fn snap(sequence: u64, as_of: i32) -> SnapshotWrite {
    SnapshotWrite {
        sequence,
        as_of: Date::from_days(as_of),
        coverage_start: Date::from_days(COVERAGE_START),
        prefixes: ["+1", "+86"]
            .iter()
            .map(|p| Prefix::parse(p).expect("prefix"))
            .collect(),
        sha256: "0".repeat(64),
    }
}

/// A delta write.
pub fn delta_write(sequence: u64, as_of: i32) -> DeltaWrite {
    DeltaWrite {
        sequence,
        as_of: Date::from_days(as_of),
        sha256: "0".repeat(64),
    }
}

/// The number whose E.164 digits are `value`.
pub fn number(value: u64) -> PhoneNumber {
    PhoneNumber::from_value(value).expect("valid number")
}

/// Records from (number, day) pairs, sorted and one per number, as the
/// importer hands them over.
pub fn records(mut pairs: Vec<(u64, u16)>) -> Records {
    pairs.sort_unstable();
    pairs.dedup_by_key(|p| p.0);
    let (numbers, days) = pairs.into_iter().unzip();
    Records::new(numbers, days).expect("valid records")
}

/// `count` US numbers from `first`, `step` apart, with varying dates.
pub fn us_numbers(first: u64, step: u64, count: u64) -> Vec<(u64, u16)> {
    (0..count)
        .map(|i| (first + i * step, 19_000 + (i % 1000) as u16))
        .collect()
}

/// The disconnect day (days since the epoch) `store` has for `value`.
pub async fn lookup_day(store: &impl Store, value: u64) -> Option<i32> {
    store
        .lookup(number(value))
        .await
        .expect("lookup")
        .found
        .map(|d| d.days())
}

/// `count` random US numbers (+1, area code and exchange 200-999, any line
/// number) with random dates after [`COVERAGE_START`], sorted, one per
/// number, from `seed`.
pub fn random_us_pairs(count: u64, seed: u64) -> Vec<(u64, u16)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut pairs: Vec<(u64, u16)> = (0..count)
        .map(|_| {
            let n = 10_000_000_000u64 + rng.random_range(2_002_000_000u64..9_999_999_999);
            (n, rng.random_range(COVERAGE_START as u16..20_500))
        })
        .collect();
    pairs.sort_unstable();
    pairs.dedup_by_key(|p| p.0);
    pairs
}
