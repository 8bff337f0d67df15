//! The membership filter: a Bloom filter over every number of a generation,
//! kept in Redis beside the buckets and loaded into each server, so that a
//! lookup of a number without a record (most of them) needs no Redis round
//! trip.
//!
//! **Parameters.** A generation of `nbuckets` buckets gets
//! `bits = max(1024, nbuckets × records per bucket × 12)` bits (256 records per bucket
//! in layout 3, 128 in layout 2), rounded up to a multiple of
//! 64) and [`HASHES`] = 8 hash functions: about 12 bits (1.5 bytes) per number,
//! about 0.3% false positives at snapshot time. A false positive costs a
//! round trip, and a round trip costs far more than the half byte per
//! record that took the rate down from 2.2% (8 bits, 6 hashes, the sizing of
//! generations written before): the bench's checks reached Redis for 6.2%
//! of numbers (4% hits) with 8 bits, 4.3% with 12. The sizes are read from
//! the metadata, so filters of either sizing are read alike. Number `n` sets bits
//! `(h1 + i × h2) mod bits` for `i` in `0..HASHES`, with `h1`, `h2` two SplitMix64
//! mixes of `n` (see [`positions`]; changing them is a layout change).
//!
//! **Keys.** The bits are strings `{prefix}:bloom:g{gen}:{chunk}` of at most
//! [`CHUNK_BYTES`] (8 MiB less 64 bytes, so that a chunk with Redis' string
//! header still fits jemalloc's 8 MiB size class instead of taking 10 MiB)
//! each; bit `p` is bit `p mod CHUNK_BITS` of chunk `p / CHUNK_BITS`, in Redis' `SETBIT` order (most significant bit of each byte
//! first). One key per chunk, so each chunk lives in one cluster slot.
//!
//! **Validity.** The metadata says which generation and sequence the filter
//! is complete for (`bloom_generation`, `bloom_sequence`, with `bloom_bits`
//! and `bloom_hashes`). A snapshot writes the filter before its switch and
//! sets all four in the switch; a delta sets its numbers' bits (one-key
//! script per chunk) before the metadata check-and-set, which moves
//! `bloom_sequence` with `sequence` only if the filter was valid before. An
//! import that does not maintain the filter (an older version) leaves
//! `bloom_generation`/`bloom_sequence` behind, and readers stop using it.
//!
//! **Readers** use the filter only while it was loaded for exactly the
//! generation and sequence of their cached metadata; a negative answer is
//! then certain (bits are only ever added within a generation, and they are
//! set before the sequence moves). Otherwise a lookup asks Redis.

use std::sync::LazyLock;

use ::redis::Script;

use crate::store::membership::splitmix64;
use crate::store::pages::Pages;

/// Hash functions per number.
pub(super) const HASHES: u32 = 8;
/// Bits per number the filter is sized for at snapshot time.
const BITS_PER_NUMBER: u64 = 12;
/// The largest chunk key, in bytes (just under 8 MiB, see the module doc).
pub(super) const CHUNK_BYTES: u64 = 8 * 1024 * 1024 - 64;
/// Bits per chunk key.
pub(super) const CHUNK_BITS: u64 = CHUNK_BYTES * 8;

/// Sets bits of one chunk. KEYS[1] = the chunk; ARGV = bit offsets.
pub(super) static SET_BITS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
for i = 1, #ARGV do
  redis.call('SETBIT', KEYS[1], ARGV[i], 1)
end
return #ARGV
",
    )
});

/// The filter size of a generation of `nbuckets` buckets, in bits.
pub(super) fn bits_for(nbuckets: u64, fields_per_bucket: u64) -> u64 {
    nbuckets
        .saturating_mul(fields_per_bucket)
        .saturating_mul(BITS_PER_NUMBER)
        .max(1024)
        .next_multiple_of(64)
}

/// How many chunk keys a filter of `bits` bits has.
pub(super) fn chunks(bits: u64) -> u64 {
    bits.div_ceil(CHUNK_BITS)
}

/// The bit positions of `number` in a filter of `bits` bits.
pub(super) fn positions(number: u64, bits: u64, hashes: u32) -> impl Iterator<Item = u64> {
    let h1 = splitmix64(number);
    let h2 = splitmix64(number ^ 0x5851_F42D_4C95_7F2D) | 1;
    (0..u64::from(hashes)).map(move |i| h1.wrapping_add(i.wrapping_mul(h2)) % bits)
}

/// A filter in memory, in Redis' bit order.
#[derive(Debug)]
pub(super) struct Filter {
    bits: u64,
    hashes: u32,
    /// Huge pages where offered: eight random reads per lookup would
    /// otherwise be eight TLB misses too (see [`crate::store::pages`]).
    bytes: Pages,
}

impl Filter {
    /// An empty filter of `bits` bits (a multiple of 8).
    pub fn new(bits: u64, hashes: u32) -> Self {
        Self {
            bits,
            hashes,
            bytes: Pages::zeroed(bits.div_ceil(8) as usize),
        }
    }

    /// A filter from the concatenated chunk strings; `None` if they do not
    /// have the size the parameters say (Redis trims nothing, but a missing
    /// chunk or a short one means the filter is unusable).
    pub fn from_bytes(bits: u64, hashes: u32, bytes: Vec<u8>) -> Option<Self> {
        (bytes.len() as u64 == bits.div_ceil(8) && bits > 0 && hashes > 0).then(|| Self {
            bits,
            hashes,
            bytes: Pages::copy_of(&bytes),
        })
    }

    /// Adds a number.
    pub fn insert(&mut self, number: u64) {
        for p in positions(number, self.bits, self.hashes) {
            self.bytes[(p / 8) as usize] |= 0x80 >> (p % 8);
        }
    }

    /// False: certainly not in the set. True: possibly.
    ///
    /// Every probe is read, without stopping at the first clear bit: the
    /// reads do not depend on each other, so their cache misses overlap
    /// (about one miss's wait instead of two in a row for a number not in
    /// the set, with no mispredicted branch between them).
    pub fn may_contain(&self, number: u64) -> bool {
        let mut all = true;
        for p in positions(number, self.bits, self.hashes) {
            all &= self
                .bytes
                .get((p / 8) as usize)
                .is_some_and(|b| b & (0x80 >> (p % 8)) != 0);
        }
        all
    }

    /// The chunk strings to store, in order.
    pub fn chunks(&self) -> impl Iterator<Item = &[u8]> {
        self.bytes.chunks(CHUNK_BYTES as usize)
    }

    /// Size in bytes.
    pub fn len_bytes(&self) -> usize {
        self.bytes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_false_negatives_and_few_false_positives() {
        let numbers: Vec<u64> = (0..20_000u64).map(|i| 14_155_550_000 + i * 7).collect();
        let bits = bits_for(numbers.len().div_ceil(128) as u64, 128);
        let mut filter = Filter::new(bits, HASHES);
        for &n in &numbers {
            filter.insert(n);
        }
        assert!(numbers.iter().all(|&n| filter.may_contain(n)));
        let false_positives = (0..100_000u64)
            .map(|i| 16_505_550_000 + i * 3)
            .filter(|&n| filter.may_contain(n))
            .count();
        // 12 bits and 8 hashes per number: about 0.31% in theory.
        assert!(false_positives < 600, "{false_positives} of 100000");
    }

    /// Generations written before kept 8 bits and 6 hashes per number; the
    /// metadata carries the sizing, and a filter of either is read alike.
    #[test]
    fn a_filter_of_the_earlier_sizing_reads_alike() {
        let numbers: Vec<u64> = (0..20_000u64).map(|i| 14_155_550_000 + i * 7).collect();
        for (bits_per_number, hashes, most) in [(8, 6, 3_000), (12, 8, 600)] {
            let bits = (numbers.len() as u64 * bits_per_number).next_multiple_of(64);
            let mut written = Filter::new(bits, hashes);
            for &n in &numbers {
                written.insert(n);
            }
            let bytes: Vec<u8> = written.chunks().flatten().copied().collect();
            let read = Filter::from_bytes(bits, hashes, bytes).expect("the sizes agree");
            assert!(numbers.iter().all(|&n| read.may_contain(n)));
            let false_positives = (0..100_000u64)
                .map(|i| 16_505_550_000 + i * 3)
                .filter(|&n| read.may_contain(n))
                .count();
            assert!(
                false_positives < most,
                "{bits_per_number} bits: {false_positives} of 100000"
            );
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(bits_for(3, 128), 3 * 128 * 12);
        assert_eq!(bits_for(1, 128), 128 * 12);
        assert_eq!(bits_for(1, 64), 1024);
        assert_eq!(bits_for(0, 128), 1024);
        assert_eq!(chunks(3072), 1);
        assert_eq!(chunks(CHUNK_BITS), 1);
        assert_eq!(chunks(CHUNK_BITS + 1), 2);
        let filter = Filter::new(CHUNK_BITS + 64, HASHES);
        let sizes: Vec<usize> = filter.chunks().map(<[u8]>::len).collect();
        assert_eq!(sizes, [CHUNK_BYTES as usize, 8]);
    }

    #[test]
    fn bit_order_is_redis_setbit_order() {
        let mut filter = Filter::new(1024, 1);
        let p = positions(42, 1024, 1).next().unwrap_or(0);
        filter.insert(42);
        // SETBIT key p 1 sets bit 7 - p % 8 of byte p / 8.
        assert_eq!(filter.bytes[(p / 8) as usize], 1 << (7 - p % 8));
    }
}
