//! Micro-benchmark of the embedded store's lookup: loads a register directory
//! and times single lookups of the numbers of its `queries.csv` (the realistic
//! hit/miss mix written by `reassigned generate`).
//!
//! ```sh
//! reassigned generate --records 10000000 --out /tmp/reg
//! cargo run --release --example embedded_lookup -- /tmp/reg
//! ```

use std::time::Instant;

use reassigned::domain::PhoneNumber;
use reassigned::import::{ImportOptions, NoProgress, embedded};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: embedded_lookup DIR"))?;
    let dir = std::path::Path::new(&dir);
    let started = Instant::now();
    let store = embedded::open_dir(dir, ImportOptions::default(), &mut NoProgress).await?;
    println!("loaded {} records in {:.2?}", store.len(), started.elapsed());
    let queries = std::fs::read_to_string(dir.join("queries.csv"))?;
    let numbers: Vec<PhoneNumber> = queries
        .lines()
        .skip(1)
        .filter_map(|l| l.split(',').next())
        .filter_map(|n| PhoneNumber::parse(n).ok())
        .collect();
    let rounds = 20;
    let started = Instant::now();
    let mut hits = 0usize;
    for _ in 0..rounds {
        for &n in &numbers {
            hits += usize::from(store.get(n).found.is_some());
        }
    }
    let per = started.elapsed() / (rounds * numbers.len()) as u32;
    println!(
        "{} lookups, {:.1}% hits, {per:?} per lookup",
        rounds * numbers.len(),
        100.0 * hits as f64 / (rounds * numbers.len()) as f64
    );
    Ok(())
}
