//! The answer rule: has a number changed hands since date X?

use super::{Date, DateError, NumberError, PhoneNumber, Prefix};

/// What the mirror holds besides the numbers: what the data set covers and how
/// fresh it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorMeta {
    /// The sequence number of the last applied snapshot or delta.
    pub sequence: u64,
    /// The date the data is complete through.
    pub as_of: Date,
    /// The earliest disconnect date the register covers.
    pub coverage_start: Date,
    /// The numbering prefixes the data set covers.
    pub prefixes: Vec<Prefix>,
    /// How many numbers have a recorded disconnect.
    pub record_count: u64,
    /// When the last snapshot or delta was applied (Unix seconds).
    pub last_import_unix: i64,
}

impl MirrorMeta {
    /// True if `number` is under one of the covered prefixes.
    pub fn covers(&self, number: PhoneNumber) -> bool {
        self.prefixes.iter().any(|p| number.has_prefix(p))
    }

    /// True if the data is older than `max_staleness_days` on `today`.
    pub fn is_stale(&self, today: Date, max_staleness_days: u32) -> bool {
        i64::from(today.days()) - i64::from(self.as_of.days()) > i64::from(max_staleness_days)
    }
}

/// Why the mirror cannot answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoDataReason {
    /// The number is not under any covered prefix.
    NumberNotCovered,
    /// The date asked about is before the coverage start.
    BeforeCoverage,
    /// The mirror is older than its allowed staleness.
    MirrorStale,
    /// Nothing has been imported yet.
    MirrorEmpty,
}

/// The answer to one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// No permanent disconnect on or after the date asked about.
    NotReassigned,
    /// A permanent disconnect on or after the date asked about.
    Reassigned,
    /// The mirror cannot answer.
    NoData(NoDataReason),
}

/// A validated check: a strict E.164 number and a date not after today.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Check {
    /// The number asked about.
    pub number: PhoneNumber,
    /// The date since which a change of hands matters.
    pub since: Date,
}

/// One problem with one field of a check request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldViolation {
    /// The request field, as named in the API (`phone_number`, `since`).
    pub field: &'static str,
    /// Why the value is refused.
    pub reason: String,
}

/// Why `since` is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SinceError {
    /// Not a valid date.
    #[error(transparent)]
    Date(#[from] DateError),
    /// After today (UTC).
    #[error("is after today ({today}, UTC)")]
    Future {
        /// Today's date, UTC.
        today: Date,
    },
}

impl Check {
    /// Validates a request's raw fields; every problem is reported, not just
    /// the first.
    pub fn parse(phone_number: &str, since: &str, today: Date) -> Result<Self, Vec<FieldViolation>> {
        let number = PhoneNumber::parse(phone_number);
        let since = parse_since(since, today);
        match (number, since) {
            (Ok(number), Ok(since)) => Ok(Self { number, since }),
            (number, since) => {
                let mut violations = Vec::with_capacity(2);
                if let Err(e) = number {
                    violations.push(number_violation(e));
                }
                if let Err(e) = since {
                    violations.push(FieldViolation {
                        field: "since",
                        reason: e.to_string(),
                    });
                }
                Err(violations)
            }
        }
    }
}

fn number_violation(e: NumberError) -> FieldViolation {
    FieldViolation {
        field: "phone_number",
        reason: e.to_string(),
    }
}

/// Parses the `since` date and refuses a date after `today`.
pub fn parse_since(text: &str, today: Date) -> Result<Date, SinceError> {
    let date = Date::parse(text)?;
    if date > today {
        return Err(SinceError::Future { today });
    }
    Ok(date)
}

/// One check answered: the single value from which the response, the
/// receipt and the audit record of the answer are all made (none of them
/// reads another's encoding back).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The check that was answered.
    pub check: Check,
    /// The answer (see [`answer`]).
    pub status: Status,
    /// The date the mirror's data was complete through; `None` when the
    /// mirror held no data.
    pub as_of: Option<Date>,
    /// The sequence of the last snapshot or delta applied to the mirror that
    /// answered (0 when it held no data).
    pub sequence: u64,
}

impl Answer {
    /// Answers `check` by the rule of [`answer`], from the number's latest
    /// disconnect date (if any) and the mirror's metadata (`None`: empty).
    pub fn new(
        check: Check,
        disconnect: Option<Date>,
        meta: Option<&MirrorMeta>,
        today: Date,
        max_staleness_days: u32,
    ) -> Self {
        Self {
            check,
            status: answer(check, disconnect, meta, today, max_staleness_days),
            as_of: meta.map(|m| m.as_of),
            sequence: meta.map_or(0, |m| m.sequence),
        }
    }
}

/// The answer rule (see DOMAIN.md): a known disconnect on or after `since`
/// always wins; only a "no" needs the coverage to back it.
///
/// `disconnect` is the number's latest permanent-disconnect date, if the mirror
/// has one; `meta` is `None` while the mirror is empty. When several reasons
/// for NO_DATA apply, the first of empty, not covered, before coverage, stale
/// is given.
pub fn answer(
    check: Check,
    disconnect: Option<Date>,
    meta: Option<&MirrorMeta>,
    today: Date,
    max_staleness_days: u32,
) -> Status {
    if disconnect.is_some_and(|d| d >= check.since) {
        return Status::Reassigned;
    }
    // A mirror without a single record cannot back a "no" (e.g. after a
    // snapshot applied with --allow-shrink that had no rows).
    let Some(meta) = meta.filter(|m| m.record_count > 0) else {
        return Status::NoData(NoDataReason::MirrorEmpty);
    };
    if !meta.covers(check.number) {
        Status::NoData(NoDataReason::NumberNotCovered)
    } else if check.since < meta.coverage_start {
        Status::NoData(NoDataReason::BeforeCoverage)
    } else if meta.is_stale(today, max_staleness_days) {
        Status::NoData(NoDataReason::MirrorStale)
    } else {
        Status::NotReassigned
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Date {
        Date::parse(s).expect("date")
    }

    fn meta() -> MirrorMeta {
        MirrorMeta {
            sequence: 1,
            as_of: d("2026-11-01"),
            coverage_start: d("2021-01-27"),
            prefixes: vec![Prefix::parse("+1").expect("p"), Prefix::parse("+86").expect("p")],
            record_count: 1,
            last_import_unix: 0,
        }
    }

    fn check(n: &str, since: &str) -> Check {
        Check {
            number: PhoneNumber::parse(n).expect("number"),
            since: d(since),
        }
    }

    const TODAY: &str = "2026-11-29";
    const US: &str = "+14155550123";

    fn ask(n: &str, since: &str, disconnect: Option<&str>, m: Option<&MirrorMeta>, max: u32) -> Status {
        answer(check(n, since), disconnect.map(d), m, d(TODAY), max)
    }

    #[test]
    fn disconnect_on_or_after_since_is_reassigned() {
        let m = meta();
        assert_eq!(
            ask(US, "2024-05-01", Some("2024-05-01"), Some(&m), 45),
            Status::Reassigned
        );
        assert_eq!(
            ask(US, "2024-04-30", Some("2024-05-01"), Some(&m), 45),
            Status::Reassigned
        );
        assert_eq!(
            ask(US, "2024-05-02", Some("2024-05-01"), Some(&m), 45),
            Status::NotReassigned
        );
    }

    #[test]
    fn a_known_disconnect_wins_over_every_no_data_reason() {
        let m = meta();
        // not covered
        assert_eq!(
            ask("+4420794600", "2024-01-01", Some("2024-05-01"), Some(&m), 45),
            Status::Reassigned
        );
        // before coverage
        assert_eq!(
            ask(US, "2019-01-01", Some("2024-05-01"), Some(&m), 45),
            Status::Reassigned
        );
        // stale
        assert_eq!(
            ask(US, "2024-01-01", Some("2024-05-01"), Some(&m), 0),
            Status::Reassigned
        );
        // empty mirror (a store answering without metadata)
        assert_eq!(
            ask(US, "2024-01-01", Some("2024-05-01"), None, 45),
            Status::Reassigned
        );
    }

    #[test]
    fn not_covered_prefix_is_no_data() {
        let m = meta();
        assert_eq!(
            ask("+4420794600", "2024-01-01", None, Some(&m), 45),
            Status::NoData(NoDataReason::NumberNotCovered)
        );
        // an old disconnect does not make the number covered
        assert_eq!(
            ask("+4420794600", "2024-01-01", Some("2023-01-01"), Some(&m), 45),
            Status::NoData(NoDataReason::NumberNotCovered)
        );
    }

    #[test]
    fn coverage_start_boundary() {
        let m = meta();
        assert_eq!(ask(US, "2021-01-27", None, Some(&m), 45), Status::NotReassigned);
        assert_eq!(
            ask(US, "2021-01-26", None, Some(&m), 45),
            Status::NoData(NoDataReason::BeforeCoverage)
        );
        assert_eq!(
            ask(US, "2021-01-26", Some("2020-01-01"), Some(&m), 45),
            Status::NoData(NoDataReason::BeforeCoverage)
        );
    }

    #[test]
    fn staleness_boundary() {
        let m = meta(); // as_of is 28 days before TODAY
        assert_eq!(ask(US, "2024-01-01", None, Some(&m), 28), Status::NotReassigned);
        assert_eq!(
            ask(US, "2024-01-01", None, Some(&m), 27),
            Status::NoData(NoDataReason::MirrorStale)
        );
        assert_eq!(
            ask(US, "2024-01-01", Some("2023-12-31"), Some(&m), 27),
            Status::NoData(NoDataReason::MirrorStale)
        );
    }

    #[test]
    fn an_answer_carries_the_mirror_it_came_from() {
        let m = meta();
        let a = Answer::new(check(US, "2024-01-01"), None, Some(&m), d(TODAY), 45);
        assert_eq!(a.status, Status::NotReassigned);
        assert_eq!(a.as_of, Some(d("2026-11-01")));
        assert_eq!(a.sequence, 1);
        assert_eq!(a.check, check(US, "2024-01-01"));
        let empty = Answer::new(check(US, "2024-01-01"), Some(d("2024-02-01")), None, d(TODAY), 45);
        assert_eq!(empty.status, Status::Reassigned);
        assert_eq!((empty.as_of, empty.sequence), (None, 0));
    }

    #[test]
    fn empty_mirror_is_no_data() {
        assert_eq!(
            ask(US, "2024-01-01", None, None, 45),
            Status::NoData(NoDataReason::MirrorEmpty)
        );
        // metadata but not one record: still empty, never NOT_REASSIGNED
        let m = MirrorMeta {
            record_count: 0,
            ..meta()
        };
        assert_eq!(
            ask(US, "2024-01-01", None, Some(&m), 45),
            Status::NoData(NoDataReason::MirrorEmpty)
        );
    }

    #[test]
    fn otherwise_not_reassigned() {
        let m = meta();
        assert_eq!(ask(US, "2024-01-01", None, Some(&m), 45), Status::NotReassigned);
        assert_eq!(
            ask("+8613800138000", "2024-01-01", None, Some(&m), 45),
            Status::NotReassigned
        );
        assert_eq!(
            ask(US, TODAY, Some("2026-10-01"), Some(&m), 45),
            Status::NotReassigned
        );
    }

    #[test]
    fn parse_reports_every_field() {
        let today = d(TODAY);
        assert_eq!(Check::parse(US, TODAY, today), Ok(check(US, TODAY)));
        let v = Check::parse("4155550123", "2025-02-30", today).expect_err("bad");
        assert_eq!(
            v.iter().map(|v| v.field).collect::<Vec<_>>(),
            ["phone_number", "since"]
        );
        let v = Check::parse(US, "2026-11-30", today).expect_err("future");
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].field, "since");
        assert!(v[0].reason.contains("after today"));
        assert!(Check::parse(US, "", today).is_err());
    }
}
