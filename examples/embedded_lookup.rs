//! Micro-benchmark of the embedded store's lookup: loads a register directory
//! and times single lookups of the numbers of its `queries.csv` (the realistic
//! hit/miss mix written by `reassigned generate`).
//!
//! For an A/B on the same machine at the same moment, it also times the
//! layout the store used before its records were packed (a sorted `Vec<u64>`
//! of numbers, a parallel `Vec<u16>` of days and a sparse index of every
//! 32nd number: 10.25 bytes per record), built from the same records, in
//! alternated rounds.
//!
//! ```sh
//! reassigned generate --records 10000000 --out /tmp/reg
//! cargo run --release --example embedded_lookup -- /tmp/reg
//! ```

use std::hint::black_box;
use std::time::{Duration, Instant};

use reassigned::domain::PhoneNumber;
use reassigned::import::{ImportOptions, NoProgress, embedded};
use reassigned::store::EmbeddedStore;

/// The previous layout, for comparison.
struct Unpacked {
    numbers: Vec<u64>,
    days: Vec<u16>,
    index: Vec<u64>,
}

const BLOCK: usize = 32;

impl Unpacked {
    fn get(&self, number: u64) -> Option<u16> {
        let block = self
            .index
            .partition_point(|&first| first <= number)
            .checked_sub(1)?;
        let start = block * BLOCK;
        let end = (start + BLOCK).min(self.numbers.len());
        let i = self.numbers[start..end].binary_search(&number).ok()?;
        Some(self.days[start + i])
    }
}

fn time(rounds: usize, numbers: &[PhoneNumber], mut f: impl FnMut(PhoneNumber) -> bool) -> (Duration, usize) {
    let started = Instant::now();
    let mut hits = 0usize;
    for _ in 0..rounds {
        for &n in numbers {
            hits += usize::from(f(black_box(n)));
        }
    }
    (started.elapsed() / (rounds * numbers.len()) as u32, hits)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: embedded_lookup DIR"))?;
    let dir = std::path::Path::new(&dir);
    let started = Instant::now();
    let store: EmbeddedStore = embedded::open_dir(dir, ImportOptions::default(), &mut NoProgress).await?;
    println!(
        "loaded {} records in {:.2?} ({:.2} bytes/record of heap)",
        store.len(),
        started.elapsed(),
        store.memory_bytes() as f64 / store.len().max(1) as f64
    );
    let queries = std::fs::read_to_string(dir.join("queries.csv"))?;
    let numbers: Vec<PhoneNumber> = queries
        .lines()
        .skip(1)
        .filter_map(|l| l.split(',').next())
        .filter_map(|n| PhoneNumber::parse(n).ok())
        .collect();

    // The same records in the previous layout.
    let records = store.records().unwrap_or_default();
    let old_numbers: Vec<u64> = records.numbers().collect();
    let old_days: Vec<u16> = records.pairs().map(|(_, d)| d).collect();
    let index = old_numbers.iter().step_by(BLOCK).copied().collect();
    let unpacked = Unpacked {
        numbers: old_numbers,
        days: old_days,
        index,
    };

    let rounds = 10;
    for round in 1..=3 {
        let (old, old_hits) = time(rounds, &numbers, |n| unpacked.get(n.value()).is_some());
        let (new, new_hits) = time(rounds, &numbers, |n| store.get(n).found.is_some());
        let (bare, bare_hits) = time(rounds, &numbers, |n| records.day_of(n.value()).is_some());
        anyhow::ensure!(
            old_hits == new_hits && bare_hits == new_hits,
            "the layouts disagree"
        );
        println!(
            "round {round}: {} lookups, {:.1}% hits: store {new:?} per lookup (its packed records alone {bare:?}), previous layout alone {old:?}",
            rounds * numbers.len(),
            100.0 * new_hits as f64 / (rounds * numbers.len()) as f64,
        );
    }
    Ok(())
}
