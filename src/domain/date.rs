//! Calendar dates (proleptic Gregorian, UTC) as days since 1970-01-01.

use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

/// A calendar date, held as the number of days since 1970-01-01.
///
/// Parsed only from strict ISO `YYYY-MM-DD` (years 0001 to 9999); impossible
/// dates such as `2025-02-30` are rejected.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Date(i32);

/// Why a text is not a valid `YYYY-MM-DD` date.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DateError {
    /// The text is empty.
    #[error("is empty (expected YYYY-MM-DD)")]
    Empty,
    /// The text is not shaped `YYYY-MM-DD`.
    #[error("must be an ISO date YYYY-MM-DD")]
    Format,
    /// The shape is right but the day does not exist (e.g. `2025-02-30`).
    #[error("is not a real calendar date")]
    Impossible,
}

impl Date {
    /// 1970-01-01.
    pub const EPOCH: Date = Date(0);

    /// The date `days` days after 1970-01-01 (negative: before).
    pub const fn from_days(days: i32) -> Self {
        Self(days)
    }

    /// Days since 1970-01-01.
    pub const fn days(self) -> i32 {
        self.0
    }

    /// Today in UTC, from the system clock.
    pub fn today_utc() -> Self {
        let secs = match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_secs() as i64,
            Err(e) => -(e.duration().as_secs() as i64) - 1,
        };
        Self(secs.div_euclid(86_400) as i32)
    }

    /// The date of a Unix timestamp (seconds), in UTC.
    pub fn from_unix_seconds(secs: i64) -> Self {
        Self(secs.div_euclid(86_400) as i32)
    }

    /// The date from a year, month (1-12) and day (1-31), if it exists.
    pub fn from_ymd(year: i32, month: u32, day: u32) -> Option<Self> {
        if !(1..=9999).contains(&year) || !(1..=12).contains(&month) {
            return None;
        }
        if day == 0 || day > days_in_month(year, month) {
            return None;
        }
        Some(Self(days_from_civil(year, month, day)))
    }

    /// The year, month and day.
    pub fn ymd(self) -> (i32, u32, u32) {
        civil_from_days(self.0)
    }

    /// This date moved by `days` (negative: earlier).
    pub fn add_days(self, days: i32) -> Self {
        Self(self.0 + days)
    }

    /// Parses strict `YYYY-MM-DD`.
    pub fn parse(text: &str) -> Result<Self, DateError> {
        let b = text.as_bytes();
        if b.is_empty() {
            return Err(DateError::Empty);
        }
        if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
            return Err(DateError::Format);
        }
        let num = |r: std::ops::Range<usize>| -> Result<u32, DateError> {
            b[r].iter().try_fold(0u32, |acc, c| {
                if c.is_ascii_digit() {
                    Ok(acc * 10 + u32::from(c - b'0'))
                } else {
                    Err(DateError::Format)
                }
            })
        };
        let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
        Self::from_ymd(y as i32, m, d).ok_or(DateError::Impossible)
    }
}

fn is_leap(y: i32) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i32, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if is_leap(y) => 29,
        _ => 28,
    }
}

// Howard Hinnant's days_from_civil / civil_from_days algorithms.
fn days_from_civil(y: i32, m: u32, d: u32) -> i32 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = m as i32;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i32 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i32) -> (i32, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

impl FromStr for Date {
    type Err = DateError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for Date {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (y, m, d) = self.ymd();
        // Every answer carries a date: the usual years are written digit by
        // digit in one piece, without the formatting machinery.
        let (Ok(y @ 0..=9999), Ok(m), Ok(d)) = (u16::try_from(y), u8::try_from(m), u8::try_from(d)) else {
            return write!(f, "{y:04}-{m:02}-{d:02}");
        };
        let digit = |v: u16| b'0' + (v % 10) as u8;
        let text = [
            digit(y / 1000),
            digit(y / 100),
            digit(y / 10),
            digit(y),
            b'-',
            digit(u16::from(m) / 10),
            digit(u16::from(m)),
            b'-',
            digit(u16::from(d) / 10),
            digit(u16::from(d)),
        ];
        match std::str::from_utf8(&text) {
            // `pad` only when a width is asked for: plain `to_string()` and
            // `{}` write the ten bytes straight through.
            Ok(text) if f.width().is_none() && f.precision().is_none() => f.write_str(text),
            Ok(text) => f.pad(text),
            Err(_) => write!(f, "{y:04}-{m:02}-{d:02}"),
        }
    }
}

impl serde::Serialize for Date {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Date {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Date::parse(&text).map_err(|e| serde::de::Error::custom(format!("date {text:?} {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        assert_eq!(Date::parse("1970-01-01"), Ok(Date::EPOCH));
        assert_eq!(Date::parse("2021-01-27").map(|d| d.days()), Ok(18654));
        for days in [-700_000, -1, 0, 1, 18_654, 20_000, 60_000, 2_900_000] {
            let d = Date::from_days(days);
            assert_eq!(Date::parse(&d.to_string()), Ok(d), "{d}");
        }
        assert_eq!(
            Date::parse("2024-02-29").map(|d| d.to_string()),
            Ok("2024-02-29".into())
        );
    }

    #[test]
    fn writes_every_date_as_the_formatting_machinery_would() {
        // Year 0 to 9999 (the fast path) and beyond it on both sides.
        for days in (-720_000..=2_933_000)
            .step_by(997)
            .chain([-719_528, -719_529, 2_932_896, 2_932_897])
        {
            let d = Date::from_days(days);
            let (y, m, day) = d.ymd();
            assert_eq!(d.to_string(), format!("{y:04}-{m:02}-{day:02}"), "{days}");
        }
        assert_eq!(Date::EPOCH.to_string(), "1970-01-01");
        assert_eq!(format!("{:>12}", Date::EPOCH), "  1970-01-01");
    }

    #[test]
    fn rejects_bad_dates() {
        assert_eq!(Date::parse(""), Err(DateError::Empty));
        assert_eq!(Date::parse("2025-2-3"), Err(DateError::Format));
        assert_eq!(Date::parse("2025/02/03"), Err(DateError::Format));
        assert_eq!(Date::parse("2025-02-03T00:00"), Err(DateError::Format));
        assert_eq!(Date::parse("+025-02-03"), Err(DateError::Format));
        assert_eq!(Date::parse("2025-02-30"), Err(DateError::Impossible));
        assert_eq!(Date::parse("2023-02-29"), Err(DateError::Impossible));
        assert_eq!(Date::parse("1900-02-29"), Err(DateError::Impossible));
        assert_eq!(Date::parse("2025-13-01"), Err(DateError::Impossible));
        assert_eq!(Date::parse("2025-00-10"), Err(DateError::Impossible));
        assert_eq!(Date::parse("0000-01-01"), Err(DateError::Impossible));
    }
}
