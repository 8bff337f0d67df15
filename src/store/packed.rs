//! Packed buckets (Redis layout 3): one bucket of a generation as one
//! binary string, its entries sorted by suffix and bit-packed at a fixed
//! width, searched by binary search after one `GET`.
//!
//! # Format
//!
//! | bytes | content |
//! |---|---|
//! | 0 | [`MAGIC`] (`b'P'`) |
//! | 1 | [`LAYOUT`] (`3`) |
//! | 2..10 | the generation id (u64, little-endian): the bucket's sentinel |
//! | 10..14 | the entry count (u32, little-endian) |
//! | 14 | suffix width in bits (0..=64) |
//! | 15 | day width in bits (0..=16) |
//! | 16..18 | the day base (u16, little-endian; days since 1970-01-01) |
//! | 18.. | the entries, then zero bits up to the next byte |
//!
//! Entry `i` starts at bit `i × (suffix_bits + day_bits)` of the entry area
//! (bit `k` is bit `k % 8` of byte `k / 8`, least significant first): first
//! the suffix (`suffix_bits` bits), then `day - day_base` (`day_bits` bits).
//! Suffixes are strictly increasing. A snapshot picks the narrowest widths
//! that hold its bucket's largest suffix and its day range, so a record
//! costs about `log2(suffix range) + log2(day range)` bits: for US-like
//! numbers about 30 bits at 10^7 records, 23 at 10^9.
//!
//! A string is either a complete bucket of the generation its header names
//! or it is not ours: readers treat a missing key, another generation or a
//! string without [`MAGIC`] as an unproven read, and a string with
//! [`MAGIC`] whose length disagrees with its header as corrupt.

/// First byte of every packed bucket.
pub const MAGIC: u8 = b'P';
/// Second byte: the Redis layout version of packed buckets.
pub const LAYOUT: u8 = 3;
/// Bytes before the entries.
pub const HEADER_LEN: usize = 18;

/// Why a string is not a packed bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PackedError {
    /// Too short for a header, or another magic/layout: not a packed bucket
    /// (a read of it proves nothing).
    #[error("not a packed bucket")]
    Foreign,
    /// The header is ours but the rest disagrees with it (length, widths).
    #[error("a packed bucket is malformed")]
    Malformed,
}

/// The header of a packed bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The generation the bucket belongs to (its sentinel).
    pub generation: u64,
    /// How many entries follow.
    pub count: u32,
    /// Bits per suffix (0..=64).
    pub suffix_bits: u8,
    /// Bits per day offset (0..=16).
    pub day_bits: u8,
    /// The day every offset is added to.
    pub day_base: u16,
}

/// Bits needed to hold `v` (0 for 0).
fn width(v: u64) -> u8 {
    (64 - v.leading_zeros()) as u8
}

/// Bytes the entry area of `count` entries of `bits` bits each takes.
fn area_len(count: u64, bits: u64) -> usize {
    usize::try_from(count.saturating_mul(bits).div_ceil(8)).unwrap_or(usize::MAX)
}

/// Appends to `out` the bucket of `generation` holding `entries`
/// (`(suffix, day)`, suffixes strictly increasing; the caller guarantees
/// the order and at most `u32::MAX` entries).
pub fn encode(generation: u64, entries: &[(u64, u16)], out: &mut Vec<u8>) {
    let max_suffix = entries.last().map_or(0, |e| e.0);
    let (lo, hi) = entries
        .iter()
        .fold((u16::MAX, 0u16), |(lo, hi), e| (lo.min(e.1), hi.max(e.1)));
    let day_base = if entries.is_empty() { 0 } else { lo };
    let header = Header {
        generation,
        count: u32::try_from(entries.len()).unwrap_or(u32::MAX),
        suffix_bits: width(max_suffix),
        day_bits: width(u64::from(hi.saturating_sub(day_base))),
        day_base,
    };
    out.reserve(HEADER_LEN + area_len(entries.len() as u64, entry_bits(&header)));
    out.push(MAGIC);
    out.push(LAYOUT);
    out.extend_from_slice(&header.generation.to_le_bytes());
    out.extend_from_slice(&header.count.to_le_bytes());
    out.push(header.suffix_bits);
    out.push(header.day_bits);
    out.extend_from_slice(&header.day_base.to_le_bytes());
    let mut acc: u128 = 0;
    let mut filled: u32 = 0;
    for &(suffix, day) in entries {
        for (value, bits) in [
            (suffix, header.suffix_bits),
            (u64::from(day - day_base), header.day_bits),
        ] {
            if bits == 0 {
                continue;
            }
            acc |= u128::from(value) << filled;
            filled += u32::from(bits);
            while filled >= 8 {
                out.push(acc as u8);
                acc >>= 8;
                filled -= 8;
            }
        }
    }
    if filled > 0 {
        out.push(acc as u8);
    }
}

fn entry_bits(h: &Header) -> u64 {
    u64::from(h.suffix_bits) + u64::from(h.day_bits)
}

/// A packed bucket, parsed (borrowing the string).
#[derive(Clone, Copy, Debug)]
pub struct Bucket<'a> {
    header: Header,
    area: &'a [u8],
}

impl<'a> Bucket<'a> {
    /// Parses `bytes`; checks the magic, the widths and the exact length.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, PackedError> {
        if bytes.len() < HEADER_LEN || bytes[0] != MAGIC || bytes[1] != LAYOUT {
            return Err(PackedError::Foreign);
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let header = Header {
            generation: u64_at(2),
            count: u32::from_le_bytes([bytes[10], bytes[11], bytes[12], bytes[13]]),
            suffix_bits: bytes[14],
            day_bits: bytes[15],
            day_base: u16::from_le_bytes([bytes[16], bytes[17]]),
        };
        if header.suffix_bits > 64 || header.day_bits > 16 {
            return Err(PackedError::Malformed);
        }
        let area = &bytes[HEADER_LEN..];
        if area.len() != area_len(u64::from(header.count), entry_bits(&header)) {
            return Err(PackedError::Malformed);
        }
        Ok(Self { header, area })
    }

    /// The header.
    pub fn header(&self) -> Header {
        self.header
    }

    /// How many entries the bucket holds.
    pub fn len(&self) -> usize {
        self.header.count as usize
    }

    /// True if the bucket holds no entry.
    pub fn is_empty(&self) -> bool {
        self.header.count == 0
    }

    /// `bits` bits (at most 64) at bit `at` of the entry area.
    fn bits(&self, at: u64, bits: u8) -> u64 {
        if bits == 0 {
            return 0;
        }
        let byte = (at / 8) as usize;
        let shift = (at % 8) as u32;
        let mut window = [0u8; 16];
        let end = (byte + 16).min(self.area.len());
        window[..end - byte].copy_from_slice(&self.area[byte..end]);
        let v = u128::from_le_bytes(window) >> shift;
        let mask = if bits == 64 { u64::MAX } else { (1u64 << bits) - 1 };
        (v as u64) & mask
    }

    fn suffix(&self, i: usize) -> u64 {
        self.bits(i as u64 * entry_bits(&self.header), self.header.suffix_bits)
    }

    /// Entry `i` (`(suffix, day)`); `i` must be below [`Bucket::len`].
    pub fn get(&self, i: usize) -> (u64, u16) {
        let at = i as u64 * entry_bits(&self.header);
        let offset = self.bits(at + u64::from(self.header.suffix_bits), self.header.day_bits);
        (self.suffix(i), self.header.day_base.wrapping_add(offset as u16))
    }

    /// The day stored for `suffix` (binary search).
    pub fn find(&self, suffix: u64) -> Option<u16> {
        let (mut lo, mut hi) = (0usize, self.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.suffix(mid).cmp(&suffix) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Some(self.get(mid).1),
            }
        }
        None
    }

    /// Every entry, in suffix order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u16)> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }
}

/// Merges `new` (`(suffix, day)`, suffixes strictly increasing) into the
/// entries of `old`, keeping the later day of a suffix in both; returns the
/// merged entries and how many suffixes were new.
pub fn merge(old: &Bucket<'_>, new: &[(u64, u16)]) -> (Vec<(u64, u16)>, u64) {
    let mut out = Vec::with_capacity(old.len() + new.len());
    let mut added = 0;
    let mut a = old.iter().peekable();
    let mut b = new.iter().copied().peekable();
    loop {
        match (a.peek().copied(), b.peek().copied()) {
            (Some(x), Some(y)) if x.0 == y.0 => {
                out.push((x.0, x.1.max(y.1)));
                a.next();
                b.next();
            }
            (Some(x), Some(y)) if x.0 < y.0 => {
                out.push(x);
                a.next();
            }
            (_, Some(y)) => {
                out.push(y);
                added += 1;
                b.next();
            }
            (Some(x), None) => {
                out.push(x);
                a.next();
            }
            (None, None) => break,
        }
    }
    (out, added)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn packed(generation: u64, entries: &[(u64, u16)]) -> Vec<u8> {
        let mut out = Vec::new();
        encode(generation, entries, &mut out);
        out
    }

    #[test]
    fn empty_bucket_is_a_header() {
        let bytes = packed(7, &[]);
        assert_eq!(bytes.len(), HEADER_LEN);
        let b = Bucket::parse(&bytes).expect("parses");
        assert_eq!(b.header().generation, 7);
        assert!(b.is_empty());
        assert_eq!(b.find(0), None);
        assert_eq!(b.iter().count(), 0);
    }

    #[test]
    fn widths_are_the_narrowest() {
        // US numbers in 40,000 buckets: suffixes below 2^19, days within 2^11.
        let entries = [(3u64, 18_654u16), (400_000, 20_599), (500_000, 19_000)];
        let bytes = packed(1, &entries);
        let b = Bucket::parse(&bytes).expect("parses");
        assert_eq!(b.header().suffix_bits, 19);
        assert_eq!(b.header().day_bits, 11);
        assert_eq!(bytes.len(), HEADER_LEN + (3 * 30usize).div_ceil(8));
        assert_eq!(b.iter().collect::<Vec<_>>(), entries);
        assert_eq!(b.find(400_000), Some(20_599));
        assert_eq!(b.find(400_001), None);
    }

    #[test]
    fn foreign_and_malformed() {
        assert_eq!(Bucket::parse(b"").err(), Some(PackedError::Foreign));
        assert_eq!(Bucket::parse(b"19000").err(), Some(PackedError::Foreign));
        let mut bytes = packed(1, &[(5, 19_000), (9, 19_001)]);
        let mut other = bytes.clone();
        other[1] = 2;
        assert_eq!(Bucket::parse(&other).err(), Some(PackedError::Foreign));
        bytes.push(0);
        assert_eq!(Bucket::parse(&bytes).err(), Some(PackedError::Malformed));
        bytes.truncate(bytes.len() - 2);
        assert_eq!(Bucket::parse(&bytes).err(), Some(PackedError::Malformed));
        let mut wide = packed(1, &[]);
        wide[14] = 65;
        assert_eq!(Bucket::parse(&wide).err(), Some(PackedError::Malformed));
    }

    #[test]
    fn merge_keeps_the_later_day_and_counts_new() {
        let bytes = packed(1, &[(1, 100), (5, 200), (9, 300)]);
        let old = Bucket::parse(&bytes).expect("parses");
        let (merged, added) = merge(&old, &[(0, 50), (5, 150), (9, 400), (12, 1)]);
        assert_eq!(merged, vec![(0, 50), (1, 100), (5, 200), (9, 400), (12, 1)]);
        assert_eq!(added, 2);
    }

    fn entries() -> impl Strategy<Value = Vec<(u64, u16)>> {
        // Any suffix width (up to full u64) and any day range.
        (0u32..=64, any::<u16>(), 0u16..=u16::MAX).prop_flat_map(|(bits, base, span)| {
            let max = if bits == 64 { u64::MAX } else { (1u64 << bits) - 1 };
            let hi = base.saturating_add(span);
            proptest::collection::btree_map(0..=max, base..=hi, 0..300)
                .prop_map(|m| m.into_iter().collect::<Vec<_>>())
        })
    }

    proptest! {
        #[test]
        fn round_trip_and_search(entries in entries(), generation in any::<u64>(), probes in proptest::collection::vec(any::<u64>(), 0..20)) {
            let bytes = packed(generation, &entries);
            let b = Bucket::parse(&bytes).expect("parses");
            prop_assert_eq!(b.header().generation, generation);
            prop_assert_eq!(b.len(), entries.len());
            prop_assert_eq!(b.iter().collect::<Vec<_>>(), entries.clone());
            for &(s, d) in &entries {
                prop_assert_eq!(b.find(s), Some(d));
            }
            for p in probes {
                let want = entries.iter().find(|e| e.0 == p).map(|e| e.1);
                prop_assert_eq!(b.find(p), want);
            }
        }

        #[test]
        fn merge_is_a_union_with_the_later_day(old in entries(), new in entries()) {
            let bytes = packed(1, &old);
            let b = Bucket::parse(&bytes).expect("parses");
            let (merged, added) = merge(&b, &new);
            let mut want: std::collections::BTreeMap<u64, u16> = old.iter().copied().collect();
            let mut fresh = 0;
            for &(s, d) in &new {
                match want.get_mut(&s) {
                    Some(cur) => *cur = (*cur).max(d),
                    None => { want.insert(s, d); fresh += 1; }
                }
            }
            prop_assert_eq!(merged, want.into_iter().collect::<Vec<_>>());
            prop_assert_eq!(added, fresh);
        }
    }
}
