//! [`Records`]: the validated records a store is written with.

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
    /// More records than one write may hold (2^32 - 1).
    #[error("records: {0} in one file, more than 2^32 - 1")]
    TooMany(usize),
}

/// Validated records of one file: numbers ([`PhoneNumber::value`]s,
/// strictly increasing: sorted, one entry per number) with their latest
/// disconnect date as days since 1970-01-01 (every `u16` is a date from
/// 1970-01-01 to 2149-06-06).
///
/// The invariant is checked once, when the records are built; the stores
/// rely on it. `Debug` shows only the count, so records never reach a log
/// by accident.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Records {
    numbers: Vec<u64>,
    days: Vec<u16>,
}

impl std::fmt::Debug for Records {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Records")
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

/// The most records one [`Records`] may hold.
pub const MAX_RECORDS: usize = u32::MAX as usize;

impl Records {
    /// Records from parallel arrays: `days[i]` is the date of `numbers[i]`.
    /// Refused unless the lengths match, the numbers are valid phone number
    /// values in strictly increasing order, and there are at most
    /// [`MAX_RECORDS`].
    pub fn new(numbers: Vec<u64>, days: Vec<u16>) -> Result<Self, RecordsError> {
        check(&numbers, &days)?;
        Ok(Self { numbers, days })
    }

    /// Records from (number, day) pairs in any order; a number given more
    /// than once keeps its latest day. Refused if a value is not a phone
    /// number or there are more than [`MAX_RECORDS`] distinct numbers.
    pub fn from_unsorted(pairs: impl IntoIterator<Item = (u64, u16)>) -> Result<Self, RecordsError> {
        let mut pairs: Vec<(u64, u16)> = pairs.into_iter().collect();
        pairs.sort_unstable();
        let mut numbers: Vec<u64> = Vec::with_capacity(pairs.len());
        let mut days: Vec<u16> = Vec::with_capacity(pairs.len());
        for (n, d) in pairs {
            // Sorted by (number, day): the last of a run has the latest day.
            if numbers.last() == Some(&n) {
                if let Some(last) = days.last_mut() {
                    *last = d;
                }
            } else {
                numbers.push(n);
                days.push(d);
            }
        }
        Self::new(numbers, days)
    }

    /// The number of records.
    pub fn len(&self) -> usize {
        self.numbers.len()
    }

    /// True if there are no records.
    pub fn is_empty(&self) -> bool {
        self.numbers.is_empty()
    }

    /// The number ([`PhoneNumber::value`]) of record `i`.
    ///
    /// # Panics
    /// If `i >= self.len()`.
    #[inline]
    pub fn number(&self, i: usize) -> u64 {
        self.numbers[i]
    }

    /// The day (since 1970-01-01) of record `i`.
    ///
    /// # Panics
    /// If `i >= self.len()`.
    #[inline]
    pub fn day(&self, i: usize) -> u16 {
        self.days[i]
    }

    /// The numbers ([`PhoneNumber::value`]s), in increasing order.
    pub fn numbers(&self) -> impl ExactSizeIterator<Item = u64> + Clone + '_ {
        self.numbers.iter().copied()
    }

    /// The parallel arrays (for the stores of this module).
    pub(super) fn parts(&self) -> (&[u64], &[u16]) {
        (&self.numbers, &self.days)
    }

    /// The records as (number value, day) pairs, in number order.
    pub fn pairs(&self) -> impl ExactSizeIterator<Item = (u64, u16)> + Clone + '_ {
        self.numbers.iter().copied().zip(self.days.iter().copied())
    }

    /// The records as (number, date) pairs, in number order.
    pub fn iter(&self) -> impl Iterator<Item = (PhoneNumber, Date)> + '_ {
        self.pairs()
            .filter_map(|(n, d)| PhoneNumber::from_value(n).map(|n| (n, Date::from_days(i32::from(d)))))
    }

    /// The date recorded for `number`, by binary search.
    pub fn get(&self, number: PhoneNumber) -> Option<Date> {
        let i = self.numbers.binary_search(&number.value()).ok()?;
        self.days.get(i).map(|&d| Date::from_days(i32::from(d)))
    }
}

/// The invariant of [`Records`].
fn check(numbers: &[u64], days: &[u16]) -> Result<(), RecordsError> {
    if numbers.len() != days.len() {
        return Err(RecordsError::LengthMismatch {
            numbers: numbers.len(),
            days: days.len(),
        });
    }
    if numbers.len() > MAX_RECORDS {
        return Err(RecordsError::TooMany(numbers.len()));
    }
    let mut previous = None;
    for (index, &n) in numbers.iter().enumerate() {
        if PhoneNumber::from_value(n).is_none() {
            return Err(RecordsError::InvalidNumber { index });
        }
        if previous.is_some_and(|p| p >= n) {
            return Err(RecordsError::NotIncreasing { index });
        }
        previous = Some(n);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
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
    }
}
