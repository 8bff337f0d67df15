//! [`Records`]: the validated records a store is written with, packed in
//! 5 bytes each.
//!
//! # Layout
//! A number ([`PhoneNumber::value`], below 10^15 < 2^50) splits into a high
//! part (`number >> 24`) and a 24-bit low part. Records sorted by number
//! fall into *runs* of one high part each; a run is kept once in a small
//! table (high part, index of its first record: 8 bytes per run), and each
//! record as 40 bits, `low << 16 | day`, packed back to back into `u64`
//! words. A national register is dense within few ranges of 2^24
//! (16.7 M) numbers (e.g. 10 M generated US and Chinese numbers fall into
//! about 4,600 runs), so a record costs about 5.1 bytes; the worst case (every
//! number alone in its 2^24 range) is 13.1.
//!
//! A sparse index holds the full number of every 64th record (1/8 byte per
//! record). A lookup finds the run of its high part (binary search in the
//! table, which stays in cache) and its block of 64 records in the index,
//! then its low part inside both (binary search over 40-bit keys, a few
//! cache lines).
//!
//! Records built from parallel arrays ([`Records::new`]) are packed in place,
//! into the numbers' own buffer (record `i`'s 5 bytes never reach past the
//! 8 bytes of number `i` still to be read), which then shrinks: building
//! them never holds the packed and the unpacked form at once.

use std::sync::Arc;

use crate::domain::{Date, PhoneNumber};

/// Why a set of records was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordsError {
    /// The numbers and the days differ in length.
    #[error("records: {numbers} numbers but {days} days")]
    LengthMismatch {
        /// How many numbers.
        numbers: usize,
        /// How many days.
        days: usize,
    },
    /// The numbers are not strictly increasing (unsorted, or a number twice).
    #[error(
        "records must be sorted by number with one entry per number (record {index} is not above the one before)"
    )]
    NotIncreasing {
        /// The position of the first record out of order.
        index: usize,
    },
    /// A value is not a [`PhoneNumber::value`] (5 to 15 digits).
    #[error("record {index} is not a phone number of 5 to 15 digits")]
    InvalidNumber {
        /// The position of the record.
        index: usize,
    },
    /// More records than one write may hold ([`MAX_RECORDS`]).
    #[error("records: {0} in one file, more than 2^32 - 1")]
    TooMany(usize),
}

/// The most records one [`Records`] may hold.
pub const MAX_RECORDS: usize = u32::MAX as usize;

/// Bits of a number kept per record (the rest is its run's high part).
const LOW_BITS: u32 = 24;
const LOW_MASK: u64 = (1 << LOW_BITS) - 1;
/// Bits per packed record: the low part and the 16-bit day.
const RECORD_BITS: usize = 40;
const RECORD_MASK: u64 = (1 << RECORD_BITS) - 1;

/// One run: the records whose numbers share `high = number >> LOW_BITS`,
/// from index `first` to the next run's `first`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Run {
    high: u32,
    first: u32,
}

#[derive(Default)]
struct Packed {
    /// Records of [`RECORD_BITS`] each, back to back, little-endian bits.
    words: Vec<u64>,
    /// The runs, by increasing `high` (and `first`).
    runs: Vec<Run>,
    /// The number of every [`INDEX_STEP`]th record (1/8 byte per record):
    /// narrows a lookup to a few cache lines before it touches `words`.
    index: Vec<u64>,
    /// Every [`TOP_STEP`]th entry of `index` (1/512 byte per record): small
    /// enough to stay in cache, it narrows the search of `index` to one
    /// stretch of [`TOP_STEP`] entries, so a lookup touches few cold lines.
    top: Vec<u64>,
    len: usize,
}

/// Records per entry of [`Packed::index`].
const INDEX_STEP: usize = 64;
/// Entries of [`Packed::index`] per entry of [`Packed::top`].
const TOP_STEP: usize = 64;

/// The top level of the index: every [`TOP_STEP`]th entry of `index`.
fn top_of(index: &[u64]) -> Vec<u64> {
    index.iter().step_by(TOP_STEP).copied().collect()
}

/// Validated records of one file: numbers ([`PhoneNumber::value`]s,
/// strictly increasing: sorted, one entry per number) with their latest
/// disconnect date as days since 1970-01-01 (every `u16` is a date from
/// 1970-01-01 to 2149-06-06), packed in about 5 bytes per record (see the
/// `store::records` module documentation).
///
/// The invariant is checked once, when the records are built; the stores
/// rely on it. Immutable: a clone shares the data. `Debug` shows only the
/// count, so records never reach a log by accident.
#[derive(Clone, Default)]
pub struct Records {
    data: Arc<Packed>,
}

impl std::fmt::Debug for Records {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Records")
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

impl PartialEq for Records {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.pairs().eq(other.pairs())
    }
}

impl Eq for Records {}

/// The smallest and the largest [`PhoneNumber::value`] + 1.
const VALUES: std::ops::Range<u64> = 10_000..1_000_000_000_000_000;

#[inline]
fn read(words: &[u64], i: usize) -> u64 {
    let bit = i * RECORD_BITS;
    let (w, s) = (bit / 64, bit % 64);
    let mut v = words[w] >> s;
    if s > 64 - RECORD_BITS {
        v |= words[w + 1] << (64 - s);
    }
    v & RECORD_MASK
}

#[inline]
fn write(words: &mut [u64], i: usize, v: u64) {
    let bit = i * RECORD_BITS;
    let (w, s) = (bit / 64, bit % 64);
    words[w] = (words[w] & !(RECORD_MASK << s)) | (v << s);
    if s > 64 - RECORD_BITS {
        let spill = 64 - s;
        words[w + 1] = (words[w + 1] & !(RECORD_MASK >> spill)) | (v >> spill);
    }
}

/// Words needed for `len` records.
fn words_for(len: usize) -> usize {
    (len * RECORD_BITS).div_ceil(64)
}

/// Appends records in increasing order, checking the invariant as it goes.
pub(super) struct Builder {
    words: Vec<u64>,
    runs: Vec<Run>,
    index: Vec<u64>,
    len: usize,
    last: Option<u64>,
}

impl Builder {
    /// A builder with room for `capacity` records.
    pub(super) fn with_capacity(capacity: usize) -> Self {
        Self {
            words: Vec::with_capacity(words_for(capacity)),
            runs: Vec::new(),
            index: Vec::with_capacity(capacity.div_ceil(INDEX_STEP)),
            len: 0,
            last: None,
        }
    }

    /// Appends `number` with `day`; refused unless `number` is a phone
    /// number value above the last one.
    pub(super) fn push(&mut self, number: u64, day: u16) -> Result<(), RecordsError> {
        let index = self.len;
        if !VALUES.contains(&number) {
            return Err(RecordsError::InvalidNumber { index });
        }
        if self.last.is_some_and(|l| l >= number) {
            return Err(RecordsError::NotIncreasing { index });
        }
        if index >= MAX_RECORDS {
            return Err(RecordsError::TooMany(index + 1));
        }
        let high = (number >> LOW_BITS) as u32;
        if self.last.is_none_or(|l| (l >> LOW_BITS) as u32 != high) {
            self.runs.push(Run {
                high,
                first: index as u32,
            });
        }
        self.last = Some(number);
        if index.is_multiple_of(INDEX_STEP) {
            self.index.push(number);
        }
        let need = words_for(index + 1);
        if self.words.len() < need {
            self.words.resize(need, 0);
        }
        write(&mut self.words, index, (number & LOW_MASK) << 16 | u64::from(day));
        self.len += 1;
        Ok(())
    }

    /// The records appended.
    pub(super) fn finish(self) -> Records {
        let Self {
            words,
            runs,
            mut index,
            len,
            ..
        } = self;
        index.shrink_to_fit();
        Records::from_parts(words, runs, index, len)
    }
}

impl Records {
    /// Records from parallel arrays: `days[i]` is the date of `numbers[i]`.
    /// Refused unless the lengths match, the numbers are valid phone number
    /// values in strictly increasing order, and there are at most
    /// [`MAX_RECORDS`].
    ///
    /// Packs in place: the buffer of `numbers` becomes the packed records
    /// (and shrinks), so this needs no memory beyond its arguments.
    pub fn new(numbers: Vec<u64>, days: Vec<u16>) -> Result<Self, RecordsError> {
        if numbers.len() != days.len() {
            return Err(RecordsError::LengthMismatch {
                numbers: numbers.len(),
                days: days.len(),
            });
        }
        if numbers.len() > MAX_RECORDS {
            return Err(RecordsError::TooMany(numbers.len()));
        }
        let len = numbers.len();
        let mut words = numbers;
        let mut runs = Vec::new();
        let mut index = Vec::with_capacity(len.div_ceil(INDEX_STEP));
        let mut last: Option<u64> = None;
        for (i, &day) in days.iter().enumerate() {
            // Read number `i` before writing record `i`: the record's bits
            // end at bit 40i + 40 <= 64i + 64, inside words already read.
            let number = words[i];
            if !VALUES.contains(&number) {
                return Err(RecordsError::InvalidNumber { index: i });
            }
            if last.is_some_and(|l| l >= number) {
                return Err(RecordsError::NotIncreasing { index: i });
            }
            let high = (number >> LOW_BITS) as u32;
            if last.is_none_or(|l| (l >> LOW_BITS) as u32 != high) {
                runs.push(Run {
                    high,
                    first: i as u32,
                });
            }
            last = Some(number);
            if i.is_multiple_of(INDEX_STEP) {
                index.push(number);
            }
            write(&mut words, i, (number & LOW_MASK) << 16 | u64::from(day));
        }
        drop(days);
        let used = words_for(len);
        words.truncate(used);
        // Clear what is left of the last number above the last record.
        let tail = (len * RECORD_BITS) % 64;
        if tail != 0
            && let Some(w) = words.last_mut()
        {
            *w &= (1u64 << tail) - 1;
        }
        Ok(Self::from_parts(words, runs, index, len))
    }

    /// Records from their packed parts, trimmed to size, with the top level
    /// of the index.
    fn from_parts(mut words: Vec<u64>, mut runs: Vec<Run>, index: Vec<u64>, len: usize) -> Self {
        words.shrink_to_fit();
        runs.shrink_to_fit();
        Self {
            data: Arc::new(Packed {
                words,
                runs,
                top: top_of(&index),
                index,
                len,
            }),
        }
    }

    /// Records from (number, day) pairs in any order; a number given more
    /// than once keeps its latest day. Refused if a value is not a phone
    /// number or there are more than [`MAX_RECORDS`] distinct numbers.
    pub fn from_unsorted(pairs: impl IntoIterator<Item = (u64, u16)>) -> Result<Self, RecordsError> {
        let mut pairs: Vec<(u64, u16)> = pairs.into_iter().collect();
        // By (number, day): the last of a run of one number has its latest day.
        pairs.sort_unstable();
        let mut builder = Builder::with_capacity(pairs.len());
        let mut iter = pairs.into_iter().peekable();
        while let Some((n, d)) = iter.next() {
            if iter.peek().is_some_and(|&(next, _)| next == n) {
                continue;
            }
            builder.push(n, d)?;
        }
        Ok(builder.finish())
    }

    /// The number of records.
    pub fn len(&self) -> usize {
        self.data.len
    }

    /// True if there are no records.
    pub fn is_empty(&self) -> bool {
        self.data.len == 0
    }

    /// The heap bytes held (packed records and the run table).
    pub fn memory_bytes(&self) -> usize {
        self.data.words.capacity() * 8
            + self.data.runs.capacity() * std::mem::size_of::<Run>()
            + self.data.index.capacity() * 8
            + self.data.top.capacity() * 8
    }

    /// The number ([`PhoneNumber::value`]) of record `i`.
    ///
    /// # Panics
    /// If `i >= self.len()`.
    #[inline]
    pub fn number(&self, i: usize) -> u64 {
        assert!(i < self.data.len, "record {i} of {}", self.data.len);
        let run = self.data.runs.partition_point(|r| r.first as usize <= i) - 1;
        u64::from(self.data.runs[run].high) << LOW_BITS | read(&self.data.words, i) >> 16
    }

    /// The day (since 1970-01-01) of record `i`.
    ///
    /// # Panics
    /// If `i >= self.len()`.
    #[inline]
    pub fn day(&self, i: usize) -> u16 {
        assert!(i < self.data.len, "record {i} of {}", self.data.len);
        (read(&self.data.words, i) & 0xFFFF) as u16
    }

    /// The numbers ([`PhoneNumber::value`]s), in increasing order.
    pub fn numbers(&self) -> impl ExactSizeIterator<Item = u64> + Clone + '_ {
        self.pairs().map(|(n, _)| n)
    }

    /// The records as (number value, day) pairs, in number order.
    pub fn pairs(&self) -> Pairs<'_> {
        Pairs {
            data: &self.data,
            next: 0,
            run: 0,
        }
    }

    /// The records as (number, date) pairs, in number order.
    pub fn iter(&self) -> impl Iterator<Item = (PhoneNumber, Date)> + '_ {
        self.pairs()
            .filter_map(|(n, d)| PhoneNumber::from_value(n).map(|n| (n, Date::from_days(i32::from(d)))))
    }

    /// The day recorded for the number value `number`: a binary search for
    /// its run, then for its low part inside the run.
    #[inline]
    pub fn day_of(&self, number: u64) -> Option<u16> {
        let data = &*self.data;
        let high = u32::try_from(number >> LOW_BITS).ok()?;
        let run = data.runs.binary_search_by_key(&high, |r| r.high).ok()?;
        // The block of the last indexed number <= `number`, within the run.
        // First the stretch of the index under the last top entry <= `number`.
        let stretch = data.top.partition_point(|&n| n <= number).checked_sub(1)? * TOP_STEP;
        let stretch_end = (stretch + TOP_STEP).min(data.index.len());
        let block = stretch
            + data.index[stretch..stretch_end]
                .partition_point(|&n| n <= number)
                .checked_sub(1)?;
        let (mut lo, mut hi) = (
            (data.runs[run].first as usize).max(block * INDEX_STEP),
            data.runs
                .get(run + 1)
                .map_or(data.len, |r| r.first as usize)
                .min(block * INDEX_STEP + INDEX_STEP),
        );
        let low = number & LOW_MASK;
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let v = read(&data.words, mid);
            match (v >> 16).cmp(&low) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Some((v & 0xFFFF) as u16),
            }
        }
        None
    }

    /// The date recorded for `number`.
    pub fn get(&self, number: PhoneNumber) -> Option<Date> {
        self.day_of(number.value()).map(|d| Date::from_days(i32::from(d)))
    }
}

/// The records of a [`Records`] as (number value, day) pairs, in order.
#[derive(Clone)]
pub struct Pairs<'a> {
    data: &'a Packed,
    next: usize,
    run: usize,
}

impl Iterator for Pairs<'_> {
    type Item = (u64, u16);

    #[inline]
    fn next(&mut self) -> Option<(u64, u16)> {
        let i = self.next;
        if i >= self.data.len {
            return None;
        }
        while self
            .data
            .runs
            .get(self.run + 1)
            .is_some_and(|r| r.first as usize <= i)
        {
            self.run += 1;
        }
        self.next += 1;
        let v = read(&self.data.words, i);
        let high = u64::from(self.data.runs[self.run].high);
        Some((high << LOW_BITS | v >> 16, (v & 0xFFFF) as u16))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.data.len - self.next;
        (left, Some(left))
    }
}

impl ExactSizeIterator for Pairs<'_> {}

#[cfg(test)]
mod tests {
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    #[test]
    fn the_invariant_is_checked_once_when_built() {
        let ok = Records::new(vec![12_345, 14_155_550_123], vec![1, 2]).expect("valid");
        assert_eq!(ok.len(), 2);
        assert_eq!(
            ok.pairs().collect::<Vec<_>>(),
            vec![(12_345, 1), (14_155_550_123, 2)]
        );
        assert_eq!(
            Records::new(vec![2_000_000, 1_000_000], vec![1, 2]),
            Err(RecordsError::NotIncreasing { index: 1 })
        );
        assert_eq!(
            Records::new(vec![1_000_000, 1_000_000], vec![1, 2]),
            Err(RecordsError::NotIncreasing { index: 1 })
        );
        assert_eq!(
            Records::new(vec![1_000_000], vec![]),
            Err(RecordsError::LengthMismatch { numbers: 1, days: 0 })
        );
        assert_eq!(
            Records::new(vec![1_000_000, 1_000_000_000_000_000], vec![1, 2]),
            Err(RecordsError::InvalidNumber { index: 1 })
        );
        assert_eq!(
            Records::new(vec![1234], vec![1]),
            Err(RecordsError::InvalidNumber { index: 0 })
        );
        assert!(Records::new(Vec::new(), Vec::new()).expect("empty").is_empty());
    }

    #[test]
    fn from_unsorted_keeps_the_latest_day() {
        let r = Records::from_unsorted([(3_000_000, 5), (1_000_000, 9), (3_000_000, 7), (3_000_000, 1)])
            .expect("valid");
        assert_eq!(
            r.pairs().collect::<Vec<_>>(),
            vec![(1_000_000, 9), (3_000_000, 7)]
        );
        let n = PhoneNumber::from_value(3_000_000).expect("number");
        assert_eq!(r.get(n), Some(Date::from_days(7)));
        assert_eq!(format!("{r:?}"), "Records { len: 2, .. }");
        assert_eq!(
            Records::from_unsorted([(3_000_000, 5), (99, 1)]),
            Err(RecordsError::InvalidNumber { index: 0 })
        );
    }

    /// Lookups through both index levels find every record and nothing
    /// else, at sizes around the block and stretch boundaries.
    #[test]
    fn lookups_at_every_index_boundary() {
        let stretch = INDEX_STEP * TOP_STEP;
        for len in [
            1,
            INDEX_STEP - 1,
            INDEX_STEP,
            INDEX_STEP + 1,
            stretch - 1,
            stretch,
            stretch + 1,
            3 * stretch + 7,
        ] {
            // Every third value, so misses fall between, before and after.
            let numbers: Vec<u64> = (0..len as u64).map(|i| 12_000_000_000 + 3 * i).collect();
            let days: Vec<u16> = (0..len).map(|i| (i % 60_000) as u16).collect();
            let records = Records::new(numbers.clone(), days.clone()).expect("valid");
            for probe in (12_000_000_000 - 4)..(12_000_000_000 + 3 * len as u64 + 4) {
                let want = numbers.binary_search(&probe).ok().map(|i| days[i]);
                assert_eq!(records.day_of(probe), want, "len {len}, probe {probe}");
            }
        }
    }
    /// Packed in place and through the builder, records read back exactly:
    /// every number and day (extremes included), lookups of each and of
    /// neighbours that are absent, across many runs.
    #[test]
    fn packing_round_trips() {
        let mut rng = SmallRng::seed_from_u64(7);
        let mut numbers: Vec<u64> = (0..20_000)
            .map(|i| match i % 4 {
                0 => rng.random_range(12_000_000_000..20_000_000_000u64),
                1 => rng.random_range(8_613_000_000_000..8_619_999_999_999u64),
                2 => rng.random_range(VALUES),
                _ => rng.random_range(14_155_550_000..14_155_560_000u64),
            })
            .collect();
        numbers.extend([VALUES.start, VALUES.end - 1, (1 << 24) * 3, (1 << 24) * 3 - 1]);
        numbers.sort_unstable();
        numbers.dedup();
        let days: Vec<u16> = numbers
            .iter()
            .enumerate()
            .map(|(i, _)| match i % 3 {
                0 => 0,
                1 => u16::MAX,
                _ => rng.random(),
            })
            .collect();
        let packed = Records::new(numbers.clone(), days.clone()).expect("valid");
        let mut builder = Builder::with_capacity(0);
        for (&n, &d) in numbers.iter().zip(&days) {
            builder.push(n, d).expect("push");
        }
        let built = builder.finish();
        assert_eq!(packed, built);
        assert_eq!(packed.len(), numbers.len());
        assert!(
            packed.memory_bytes()
                <= numbers.len() * 5
                    + packed.data.runs.len() * 8
                    + numbers.len().div_ceil(64) * 8
                    + numbers.len().div_ceil(64 * 64) * 8
                    + 8
        );
        let expected: Vec<(u64, u16)> = numbers.iter().copied().zip(days.iter().copied()).collect();
        assert_eq!(packed.pairs().collect::<Vec<_>>(), expected);
        assert_eq!(packed.pairs().len(), expected.len());
        for (i, &(n, d)) in expected.iter().enumerate() {
            assert_eq!((packed.number(i), packed.day(i)), (n, d), "record {i}");
            assert_eq!(packed.day_of(n), Some(d), "lookup {n}");
            for near in [n - 1, n + 1] {
                if numbers.binary_search(&near).is_err() {
                    assert_eq!(packed.day_of(near), None, "absent {near}");
                }
            }
        }
        assert_eq!(packed.day_of(u64::MAX), None);
        assert_eq!(packed.day_of(0), None);
    }

    #[test]
    fn the_builder_refuses_what_new_refuses() {
        let mut b = Builder::with_capacity(2);
        b.push(2_000_000, 1).expect("first");
        assert_eq!(
            b.push(2_000_000, 1),
            Err(RecordsError::NotIncreasing { index: 1 })
        );
        assert_eq!(b.push(99, 1), Err(RecordsError::InvalidNumber { index: 1 }));
        assert_eq!(b.finish().len(), 1);
        assert!(Records::default().pairs().next().is_none());
        assert_eq!(Records::default().day_of(2_000_000), None);
    }
}
