//! The metadata hash `{prefix}:meta`: parsing what is stored and building
//! what is written.

use std::collections::HashMap;
use std::sync::Arc;

use crate::domain::{Date, MirrorMeta, Prefix};
use crate::store::StoreError;

/// The layout version this code writes (field `layout`): `3` stores each
/// bucket as one packed string whose header names its generation (see
/// [`crate::store::packed`]).
pub(super) const LAYOUT_VERSION: &str = "3";
/// The layout of hash buckets with a sentinel field in every bucket (see
/// [`SENTINEL`]); still read, and deltas still merge into it, so that a
/// mirror written by the previous version keeps answering until the next
/// snapshot.
pub(super) const LAYOUT_SENTINEL: &str = "2";
/// The layout before bucket sentinels; still read (without the sentinel
/// check, a warning is logged) so that a mirror written by an older importer
/// keeps answering until the next snapshot.
pub(super) const LAYOUT_LEGACY: &str = "1";

/// How a generation's buckets are stored (the metadata field `layout`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum BucketLayout {
    /// Layout 1: hashes without sentinels (read unchecked).
    Plain,
    /// Layout 2: hashes with the [`SENTINEL`] field.
    Sentinel,
    /// Layout 3: one packed string per bucket, its header naming the
    /// generation.
    Packed,
}

/// The sentinel field of every bucket hash of a layout-2 generation: its
/// value is the generation id. A lookup reads it with the number's field;
/// if it is missing (bucket evicted or deleted, Redis lost its data) or
/// names another generation (a stale replica, a switch this process has
/// not seen), the read proves nothing. Non-numeric, so it never collides
/// with a number's field.
pub(super) const SENTINEL: &str = "_g";

/// The most buckets a generation may have (records are indexed by `u32`).
pub(super) const MAX_NBUCKETS: u64 = u32::MAX as u64;

/// Field names of the metadata hash.
pub(super) mod field {
    pub const GENERATION: &str = "generation";
    pub const NBUCKETS: &str = "nbuckets";
    pub const SEQUENCE: &str = "sequence";
    pub const AS_OF: &str = "as_of";
    pub const COVERAGE_START: &str = "coverage_start";
    pub const PREFIXES: &str = "prefixes";
    pub const RECORD_COUNT: &str = "record_count";
    pub const LAST_IMPORT_UNIX: &str = "last_import_unix";
    pub const LAYOUT: &str = "layout";
    pub const PENDING_GENERATION: &str = "pending_generation";
    pub const PENDING_NBUCKETS: &str = "pending_nbuckets";
    pub const RECLAIM_GENERATION: &str = "reclaim_generation";
    pub const RECLAIM_NBUCKETS: &str = "reclaim_nbuckets";
    pub const BLOOM_GENERATION: &str = "bloom_generation";
    pub const BLOOM_SEQUENCE: &str = "bloom_sequence";
    pub const BLOOM_BITS: &str = "bloom_bits";
    pub const BLOOM_HASHES: &str = "bloom_hashes";
}

/// The membership filter of the current generation (see `bloom`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct BloomParams {
    /// Size in bits (a multiple of 8).
    pub bits: u64,
    /// Hash functions per number.
    pub hashes: u32,
}

/// One generation's keys: `{prefix}:g{generation}:{0..nbuckets}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Generation {
    /// The generation number (never reused: it comes from `{prefix}:gen_counter`).
    pub id: u64,
    /// How many bucket hashes it has (at least 1).
    pub nbuckets: u64,
}

impl Generation {
    /// The bucket and the hash field of a number.
    pub fn locate(self, number: u64) -> (u64, u64) {
        (number % self.nbuckets, number / self.nbuckets)
    }
}

/// The generation readers use, with its metadata (what the local cache holds).
#[derive(Debug)]
pub(super) struct Current {
    /// Where the numbers are.
    pub generation: Generation,
    /// What the data covers; handed to callers with every lookup.
    pub meta: Arc<MirrorMeta>,
    /// The membership filter, if one is complete for exactly this generation
    /// and sequence.
    pub bloom: Option<BloomParams>,
    /// How the buckets are stored: proven by their sentinel field (layout
    /// 2), by their packed header (layout 3), or unchecked (layout 1).
    pub layout: BucketLayout,
}

/// Everything the metadata hash says.
#[derive(Debug, Default)]
pub(super) struct StoredMeta {
    /// The generation readers use; `None` while the mirror is empty.
    pub current: Option<Current>,
    /// A generation a snapshot import is writing (or crashed while writing).
    pub pending: Option<Generation>,
    /// A replaced generation whose keys are still to be deleted.
    pub reclaim: Option<Generation>,
}

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("redis metadata: {what}"))
}

struct Fields(HashMap<Vec<u8>, Vec<u8>>);

impl Fields {
    fn text(&self, name: &str) -> Result<Option<&str>, StoreError> {
        match self.0.get(name.as_bytes()) {
            None => Ok(None),
            Some(v) => std::str::from_utf8(v)
                .map(Some)
                .map_err(|_| corrupt(format_args!("field {name} is not UTF-8"))),
        }
    }

    fn required(&self, name: &str) -> Result<&str, StoreError> {
        self.text(name)?
            .ok_or_else(|| corrupt(format_args!("field {name} is missing")))
    }

    fn u64(&self, name: &str) -> Result<Option<u64>, StoreError> {
        self.text(name)?
            .map(|t| {
                t.parse::<u64>()
                    .map_err(|_| corrupt(format_args!("field {name} is not an unsigned integer")))
            })
            .transpose()
    }

    fn required_u64(&self, name: &str) -> Result<u64, StoreError> {
        self.u64(name)?
            .ok_or_else(|| corrupt(format_args!("field {name} is missing")))
    }

    fn date(&self, name: &str) -> Result<Date, StoreError> {
        Date::parse(self.required(name)?).map_err(|e| corrupt(format_args!("field {name} {e}")))
    }

    fn generation(&self, id: &str, nbuckets: &str) -> Result<Option<Generation>, StoreError> {
        match (self.u64(id)?, self.u64(nbuckets)?) {
            (None, None) => Ok(None),
            (Some(id), Some(nbuckets)) if (1..=MAX_NBUCKETS).contains(&nbuckets) => {
                Ok(Some(Generation { id, nbuckets }))
            }
            _ => Err(corrupt(format_args!(
                "fields {id} and {nbuckets} must be set together, with 1 <= {nbuckets} <= {MAX_NBUCKETS}"
            ))),
        }
    }
}

/// Parses the metadata hash (as returned by HGETALL; empty if the key is
/// missing). Without a `generation` field the mirror is empty.
pub(super) fn parse(raw: HashMap<Vec<u8>, Vec<u8>>) -> Result<StoredMeta, StoreError> {
    let f = Fields(raw);
    let layout = f.text(field::LAYOUT)?;
    if let Some(layout) = layout
        && layout != LAYOUT_VERSION
        && layout != LAYOUT_SENTINEL
        && layout != LAYOUT_LEGACY
    {
        return Err(corrupt(format_args!(
            "layout {layout:?} is not supported (this version reads layouts {LAYOUT_LEGACY} to {LAYOUT_VERSION})"
        )));
    }
    let bucket_layout = match layout {
        Some(LAYOUT_VERSION) => BucketLayout::Packed,
        Some(LAYOUT_SENTINEL) => BucketLayout::Sentinel,
        _ => BucketLayout::Plain,
    };
    let pending = f.generation(field::PENDING_GENERATION, field::PENDING_NBUCKETS)?;
    let reclaim = f.generation(field::RECLAIM_GENERATION, field::RECLAIM_NBUCKETS)?;
    let Some(generation) = f.generation(field::GENERATION, field::NBUCKETS)? else {
        return Ok(StoredMeta {
            current: None,
            pending,
            reclaim,
        });
    };
    if layout.is_none() {
        // Every version writes it with the generation: a hand-edited hash.
        return Err(corrupt("field layout is missing"));
    }
    let prefixes = f.required(field::PREFIXES)?;
    let prefixes = if prefixes.is_empty() {
        Vec::new()
    } else {
        prefixes
            .split(',')
            .map(|p| Prefix::parse(p).map_err(|e| corrupt(format_args!("prefix {p:?} {e}"))))
            .collect::<Result<Vec<_>, _>>()?
    };
    let last_import_unix = f
        .required(field::LAST_IMPORT_UNIX)?
        .parse::<i64>()
        .map_err(|_| corrupt("field last_import_unix is not an integer"))?;
    let meta = MirrorMeta {
        sequence: f.required_u64(field::SEQUENCE)?,
        as_of: f.date(field::AS_OF)?,
        coverage_start: f.date(field::COVERAGE_START)?,
        prefixes,
        record_count: f.required_u64(field::RECORD_COUNT)?,
        last_import_unix,
    };
    let bloom = bloom(&f, generation, meta.sequence);
    Ok(StoredMeta {
        current: Some(Current {
            generation,
            meta: Arc::new(meta),
            bloom,
            layout: bucket_layout,
        }),
        pending,
        reclaim,
    })
}

/// The membership filter's parameters if it is complete for `generation`
/// at `sequence`. The filter is an optimisation only: fields that are
/// missing, stale or garbled mean "no filter" (every lookup asks Redis),
/// never an error.
fn bloom(f: &Fields, generation: Generation, sequence: u64) -> Option<BloomParams> {
    let number = |name| f.u64(name).ok().flatten();
    if number(field::BLOOM_GENERATION)? != generation.id || number(field::BLOOM_SEQUENCE)? != sequence {
        return None;
    }
    let bits = number(field::BLOOM_BITS).filter(|&b| b > 0 && b % 8 == 0)?;
    let hashes = number(field::BLOOM_HASHES)
        .and_then(|h| u32::try_from(h).ok())
        .filter(|h| (1..=32).contains(h))?;
    Some(BloomParams { bits, hashes })
}

/// The field/value pairs that declare a filter complete for `generation` at
/// `sequence`.
pub(super) fn bloom_fields(
    generation: Generation,
    sequence: u64,
    params: BloomParams,
) -> Vec<(&'static str, String)> {
    vec![
        (field::BLOOM_GENERATION, generation.id.to_string()),
        (field::BLOOM_SEQUENCE, sequence.to_string()),
        (field::BLOOM_BITS, params.bits.to_string()),
        (field::BLOOM_HASHES, params.hashes.to_string()),
    ]
}

/// The field/value pairs a snapshot switch writes (everything readers need).
pub(super) fn switch_fields(generation: Generation, meta: &MirrorMeta) -> Vec<(&'static str, String)> {
    let prefixes: Vec<String> = meta.prefixes.iter().map(ToString::to_string).collect();
    vec![
        (field::GENERATION, generation.id.to_string()),
        (field::NBUCKETS, generation.nbuckets.to_string()),
        (field::SEQUENCE, meta.sequence.to_string()),
        (field::AS_OF, meta.as_of.to_string()),
        (field::COVERAGE_START, meta.coverage_start.to_string()),
        (field::PREFIXES, prefixes.join(",")),
        (field::RECORD_COUNT, meta.record_count.to_string()),
        (field::LAST_IMPORT_UNIX, meta.last_import_unix.to_string()),
        (field::LAYOUT, LAYOUT_VERSION.to_owned()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(pairs: &[(&str, &str)]) -> HashMap<Vec<u8>, Vec<u8>> {
        pairs
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    fn sample() -> MirrorMeta {
        MirrorMeta {
            sequence: 7,
            as_of: Date::from_days(20_000),
            coverage_start: Date::from_days(18_654),
            prefixes: vec![Prefix::parse("+1").expect("p"), Prefix::parse("+86").expect("p")],
            record_count: 42,
            last_import_unix: 1_700_000_000,
        }
    }

    #[test]
    fn round_trips() {
        let g = Generation { id: 3, nbuckets: 9 };
        let fields = switch_fields(g, &sample());
        let map = fields
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect();
        let stored = parse(map).expect("parses");
        let current = stored.current.expect("current");
        assert_eq!(current.generation, g);
        assert_eq!(*current.meta, sample());
        assert!(current.bloom.is_none());
        assert_eq!(current.layout, BucketLayout::Packed, "new generations are packed");
        assert!(stored.pending.is_none() && stored.reclaim.is_none());
    }

    #[test]
    fn bloom_only_for_its_generation_and_sequence() {
        let g = Generation { id: 3, nbuckets: 9 };
        let params = BloomParams {
            bits: 1280,
            hashes: 7,
        };
        let with = |generation: Generation, sequence: u64| {
            let mut fields = switch_fields(g, &sample());
            fields.extend(bloom_fields(generation, sequence, params));
            let map = fields
                .iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect();
            parse(map).expect("parses").current.expect("current").bloom
        };
        assert_eq!(with(g, 7), Some(params));
        assert_eq!(with(g, 6), None, "stale sequence");
        assert_eq!(
            with(Generation { id: 2, nbuckets: 9 }, 7),
            None,
            "other generation"
        );
    }

    #[test]
    fn empty_and_pending_only() {
        let stored = parse(HashMap::new()).expect("empty");
        assert!(stored.current.is_none());
        let stored = parse(raw(&[("pending_generation", "4"), ("pending_nbuckets", "2")])).expect("pending");
        assert!(stored.current.is_none());
        assert_eq!(stored.pending, Some(Generation { id: 4, nbuckets: 2 }));
    }

    #[test]
    fn garbled_is_corrupt() {
        for bad in [
            raw(&[("generation", "x"), ("nbuckets", "1")]),
            raw(&[("generation", "1")]),
            raw(&[("generation", "1"), ("nbuckets", "0")]),
            raw(&[("layout", "4")]),
            raw(&[("generation", "1"), ("nbuckets", "1")]),
            raw(&[("generation", "1"), ("nbuckets", "1"), ("sequence", "1")]),
        ] {
            assert!(matches!(parse(bad), Err(StoreError::Corrupt(_))));
        }
    }

    #[test]
    fn locate_is_exact() {
        let g = Generation {
            id: 1,
            nbuckets: 7813,
        };
        let n = 14_155_550_123;
        let (bucket, field) = g.locate(n);
        assert_eq!(field * g.nbuckets + bucket, n);
    }
}
