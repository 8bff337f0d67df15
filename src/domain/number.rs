//! Strict E.164 phone numbers.

use std::fmt;
use std::str::FromStr;

/// A phone number in strict E.164 form (`^\+[1-9][0-9]{4,14}$`).
///
/// Stored as the integer value of its digits: the first digit is never zero, so
/// the value identifies the number exactly and costs 8 bytes. `Display` gives
/// back the E.164 text; `Debug` is redacted so a number never reaches a log by
/// accident.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PhoneNumber(u64);

/// Why a text is not a strict E.164 number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NumberError {
    /// The text is empty.
    #[error("is empty")]
    Empty,
    /// The text does not start with `+`.
    #[error("must start with '+' (E.164, e.g. +14155550123)")]
    MissingPlus,
    /// A character other than a digit follows the `+`.
    #[error("must contain only digits after '+' (no spaces, dashes or brackets)")]
    NotDigits,
    /// The first digit (of the country code) is zero.
    #[error("country code must not start with 0")]
    LeadingZero,
    /// Fewer than 5 or more than 15 digits.
    #[error("must have 5 to 15 digits after '+', found {0}")]
    Length(usize),
}

impl PhoneNumber {
    /// The smallest number of digits E.164 allows here.
    pub const MIN_DIGITS: usize = 5;
    /// The largest number of digits E.164 allows.
    pub const MAX_DIGITS: usize = 15;

    /// Parses strict E.164 text.
    pub fn parse(text: &str) -> Result<Self, NumberError> {
        let digits = match text.as_bytes() {
            [] => return Err(NumberError::Empty),
            [b'+', rest @ ..] => rest,
            _ => return Err(NumberError::MissingPlus),
        };
        if !digits.iter().all(u8::is_ascii_digit) {
            return Err(NumberError::NotDigits);
        }
        if !(Self::MIN_DIGITS..=Self::MAX_DIGITS).contains(&digits.len()) {
            return Err(NumberError::Length(digits.len()));
        }
        if digits[0] == b'0' {
            return Err(NumberError::LeadingZero);
        }
        let value = digits.iter().fold(0u64, |acc, d| acc * 10 + u64::from(d - b'0'));
        Ok(Self(value))
    }

    /// Rebuilds a number from [`PhoneNumber::value`]; `None` if the value has
    /// fewer than 5 or more than 15 digits.
    pub fn from_value(value: u64) -> Option<Self> {
        let digits = digit_count(value);
        (Self::MIN_DIGITS..=Self::MAX_DIGITS)
            .contains(&digits)
            .then_some(Self(value))
    }

    /// The digits as an integer (the compact storage form).
    pub fn value(self) -> u64 {
        self.0
    }

    /// How many digits the number has.
    pub fn digits(self) -> usize {
        digit_count(self.0)
    }

    /// True if the number starts with the E.164 prefix `prefix` (e.g. `+1`).
    pub fn has_prefix(self, prefix: &Prefix) -> bool {
        let digits = self.digits();
        if prefix.digits > digits {
            return false;
        }
        self.0 / 10u64.pow((digits - prefix.digits) as u32) == prefix.value
    }
}

fn digit_count(mut value: u64) -> usize {
    let mut count = 1;
    while value >= 10 {
        value /= 10;
        count += 1;
    }
    count
}

impl FromStr for PhoneNumber {
    type Err = NumberError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for PhoneNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "+{}", self.0)
    }
}

impl fmt::Debug for PhoneNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PhoneNumber(<redacted>)")
    }
}

/// A numbering prefix a data set covers, in E.164 form: `+` and 1 to 15 digits
/// (e.g. `+1`, `+86`, `+4420`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Prefix {
    value: u64,
    digits: usize,
}

impl Prefix {
    /// Parses `+` followed by 1 to 15 digits, the first not zero.
    pub fn parse(text: &str) -> Result<Self, NumberError> {
        let digits = match text.as_bytes() {
            [] => return Err(NumberError::Empty),
            [b'+', rest @ ..] => rest,
            _ => return Err(NumberError::MissingPlus),
        };
        if !digits.iter().all(u8::is_ascii_digit) {
            return Err(NumberError::NotDigits);
        }
        if !(1..=PhoneNumber::MAX_DIGITS).contains(&digits.len()) {
            return Err(NumberError::Length(digits.len()));
        }
        if digits[0] == b'0' {
            return Err(NumberError::LeadingZero);
        }
        let value = digits.iter().fold(0u64, |acc, d| acc * 10 + u64::from(d - b'0'));
        Ok(Self {
            value,
            digits: digits.len(),
        })
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "+{:0width$}", self.value, width = self.digits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_strict_e164() {
        let n = PhoneNumber::parse("+14155550123").expect("valid");
        assert_eq!(n.value(), 14155550123);
        assert_eq!(n.to_string(), "+14155550123");
        assert_eq!(n.digits(), 11);
        assert_eq!(PhoneNumber::parse("+12345").map(|n| n.digits()), Ok(5));
        assert!(PhoneNumber::parse("+123456789012345").is_ok());
    }

    #[test]
    fn rejects_everything_else() {
        assert_eq!(PhoneNumber::parse(""), Err(NumberError::Empty));
        assert_eq!(PhoneNumber::parse("14155550123"), Err(NumberError::MissingPlus));
        assert_eq!(PhoneNumber::parse("+1 415 555"), Err(NumberError::NotDigits));
        assert_eq!(PhoneNumber::parse("+1-415-5550"), Err(NumberError::NotDigits));
        assert_eq!(PhoneNumber::parse("+04155550123"), Err(NumberError::LeadingZero));
        assert_eq!(PhoneNumber::parse("+1234"), Err(NumberError::Length(4)));
        assert_eq!(
            PhoneNumber::parse("+1234567890123456"),
            Err(NumberError::Length(16))
        );
        assert_eq!(PhoneNumber::parse("+"), Err(NumberError::Length(0)));
        assert_eq!(PhoneNumber::parse("+١٢٣٤٥٦"), Err(NumberError::NotDigits));
    }

    #[test]
    fn debug_is_redacted() {
        let n = PhoneNumber::parse("+14155550123").expect("valid");
        assert!(!format!("{n:?}").contains("4155550123"));
    }

    #[test]
    fn prefixes() {
        let n = PhoneNumber::parse("+8613800138000").expect("valid");
        assert!(n.has_prefix(&Prefix::parse("+86").expect("p")));
        assert!(n.has_prefix(&Prefix::parse("+8613800138000").expect("p")));
        assert!(!n.has_prefix(&Prefix::parse("+1").expect("p")));
        assert!(!n.has_prefix(&Prefix::parse("+861380013800011").expect("p")));
        assert_eq!(Prefix::parse("+44").expect("p").to_string(), "+44");
        assert!(Prefix::parse("+0").is_err());
        assert!(Prefix::parse("1").is_err());
        assert_eq!(PhoneNumber::from_value(1234), None);
        assert_eq!(
            PhoneNumber::from_value(12345).map(|n| n.to_string()),
            Some("+12345".into())
        );
    }
}
