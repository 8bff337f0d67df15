//! Reading and validating a data file in one streaming pass.
//!
//! The raw bytes are hashed as they are read from disk (before gzip
//! decompression); rows are parsed by hand from a reusable buffer, with a
//! fast path for well-formed rows and a slow path that only runs on a
//! malformed row to say exactly what is wrong with it.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::Path;

use flate2::bufread::MultiGzDecoder;
use sha2::{Digest, Sha256};

use super::{ImportError, Manifest, Progress, Records};
use crate::domain::{Date, PhoneNumber};
use crate::store::RecordsError;

/// At most this many row problems are listed in an [`ImportError::Data`]
/// (the rest are counted).
pub const MAX_PROBLEMS: usize = 20;

/// The header line every data file starts with.
const HEADER: &[u8] = b"phone_number,disconnect_date";

/// Bytes handed to the parser at a time; also the longest line accepted.
const CHUNK: usize = 512 * 1024;

/// Reads, validates and sorts the records of a manifest's data file.
///
/// Streams the file once: hashes the bytes as stored, decompresses `.csv.gz`,
/// parses and checks every row (see the [module documentation](super) for the
/// rules), then checks the row count and the SHA-256 against the manifest.
/// Any problem gives [`ImportError::Data`] listing the first
/// [`MAX_PROBLEMS`] row problems (by line number, never showing a number) and
/// the file-level ones, and no records.
///
/// The result is sorted by number with one entry per number, its latest
/// date. CPU-bound: call it from a blocking context.
pub fn read_records(manifest: &Manifest, progress: &mut dyn Progress) -> Result<Records, ImportError> {
    let path = manifest.data_path();
    let io_err = |error| ImportError::Io {
        path: path.clone(),
        error,
    };
    // Open the resolved path that was checked, not the link again.
    let real = check_inside(manifest, &path)?;
    let file = File::open(&real).map_err(io_err)?;
    let mut raw = HashingReader {
        inner: file,
        hasher: Sha256::new(),
        failed: false,
    };
    progress.start(&path, manifest.records);
    let mut parser = Parser::new(&path, manifest.as_of, manifest.records);
    let mut file_problems = Vec::new();
    let read = if manifest.is_gzip() {
        let mut decoder = MultiGzDecoder::new(BufReader::with_capacity(256 * 1024, &mut raw));
        drive(&mut decoder, &mut parser, progress)
    } else {
        drive(&mut raw, &mut parser, progress)
    };
    if parser.stopped {
        return Err(ImportError::Interrupted {
            done: format!("while reading {} (nothing was written)", path.display()),
        });
    }
    if parser.overflow {
        // A row bomb (or a wrong count): stop here, neither reading nor
        // hashing the rest.
        progress.finish(parser.rows);
        let mut problems = vec![format!(
            "{}, line {}: more data rows than the manifest's records ({}); stopped reading there",
            path.display(),
            parser.line,
            manifest.records
        )];
        problems.append(&mut parser.problems);
        return Err(ImportError::Data { file: path, problems });
    }
    if let Err(e) = read {
        if raw.failed {
            return Err(io_err(e));
        }
        file_problems.push(format!(
            "{}: not a valid gzip file ({e}); stopped after line {}",
            path.display(),
            parser.line
        ));
    }
    // Hash whatever the decoder did not need (trailing bytes, or the rest
    // after a decoding error) so the checksum covers the whole file.
    io::copy(&mut raw, &mut io::sink()).map_err(io_err)?;
    progress.finish(parser.rows);

    if parser.rows != manifest.records {
        file_problems.push(format!(
            "{}: has {} data rows, but the manifest says {}",
            path.display(),
            parser.rows,
            manifest.records
        ));
    }
    let sha = hex::encode(raw.hasher.finalize());
    if sha != manifest.sha256.to_ascii_lowercase() {
        file_problems.push(format!(
            "{}: SHA-256 is {sha}, but the manifest says {} (the file is damaged or not the one the manifest describes)",
            path.display(),
            manifest.sha256
        ));
    }
    if !file_problems.is_empty() || parser.problem_total > 0 {
        let more = parser.problem_total.saturating_sub(parser.problems.len() as u64);
        let mut problems = file_problems;
        problems.append(&mut parser.problems);
        if more > 0 {
            problems.push(format!("... and {more} more row problems"));
        }
        return Err(ImportError::Data { file: path, problems });
    }
    finish(parser.numbers, parser.days, parser.non_decreasing).map_err(|e| ImportError::Data {
        file: path,
        problems: vec![e.to_string()],
    })
}

/// Refuses a data file that resolves (through symbolic links) outside the
/// manifest's directory: the manifest may only describe its own files.
/// Returns the resolved path.
fn check_inside(manifest: &Manifest, path: &Path) -> Result<std::path::PathBuf, ImportError> {
    let dir = manifest.path.parent().unwrap_or(Path::new("."));
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let io_err = |p: &Path, error| ImportError::Io {
        path: p.to_path_buf(),
        error,
    };
    let real_dir = dir.canonicalize().map_err(|e| io_err(dir, e))?;
    let real = path.canonicalize().map_err(|e| io_err(path, e))?;
    if !real.starts_with(&real_dir) {
        return Err(ImportError::Data {
            file: path.to_path_buf(),
            problems: vec![format!(
                "{}: resolves to {}, outside the manifest's directory {}; refused (a data file must be a file of the manifest's own directory)",
                path.display(),
                real.display(),
                real_dir.display()
            )],
        });
    }
    if !real.is_file() {
        return Err(ImportError::Data {
            file: path.to_path_buf(),
            problems: vec![format!("{}: is not a regular file", path.display())],
        });
    }
    Ok(real)
}

/// A reader that hashes every byte it hands out and remembers whether the
/// underlying file failed (to tell I/O errors from gzip decoding errors).
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    failed: bool,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.hasher.update(&buf[..n]);
                Ok(n)
            }
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    self.failed = true;
                }
                Err(e)
            }
        }
    }
}

/// Feeds `reader` to `parser` chunk by chunk.
fn drive(reader: &mut dyn Read, parser: &mut Parser, progress: &mut dyn Progress) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut filled = 0;
    loop {
        let n = match reader.read(&mut buf[filled..]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let eof = n == 0;
        filled += n;
        let consumed = parser.process(&buf[..filled], eof);
        if eof || parser.overflow {
            return Ok(());
        }
        if progress.should_stop() {
            parser.stopped = true;
            return Ok(());
        }
        buf.copy_within(consumed..filled, 0);
        filled -= consumed;
        if filled == buf.len() {
            parser.long_line();
            filled = 0;
        }
        progress.advance(parser.rows);
    }
}

/// Sorts by number and keeps one entry per number, the latest date.
fn finish(numbers: Vec<u64>, days: Vec<u16>, non_decreasing: bool) -> Result<Records, RecordsError> {
    // Packs in place into the numbers' buffer, which then shrinks: the
    // rows are never held twice.
    let (numbers, days) = dedup(numbers, days, non_decreasing);
    Records::new(numbers, days)
}

/// Sorts by number and keeps one entry per number, the latest date (the
/// capacity is kept, for reuse). In place: sorting the two arrays together
/// ([`sort_pairs`]) needs no third copy of the rows.
fn dedup(mut numbers: Vec<u64>, mut days: Vec<u16>, non_decreasing: bool) -> (Vec<u64>, Vec<u16>) {
    if !non_decreasing {
        sort_pairs(&mut numbers, &mut days);
    }
    // In order: drop duplicates in place, keeping the latest date.
    let mut w = 0;
    for r in 0..numbers.len() {
        if w > 0 && numbers[r] == numbers[w - 1] {
            days[w - 1] = days[w - 1].max(days[r]);
        } else {
            numbers[w] = numbers[r];
            days[w] = days[r];
            w += 1;
        }
    }
    numbers.truncate(w);
    days.truncate(w);
    (numbers, days)
}

/// Slices this short are sorted by insertion.
const INSERTION_MAX: usize = 16;

/// Sorts `keys` in increasing order and moves `vals[i]` along with
/// `keys[i]`, in place (no allocation): quicksort with a median-of-three
/// pivot, insertion sort for short slices, heap sort past a depth limit
/// (so never worse than O(n log n)). Not stable.
fn sort_pairs(keys: &mut [u64], vals: &mut [u16]) {
    debug_assert_eq!(keys.len(), vals.len());
    let n = vals.len().min(keys.len());
    let depth = 2 * (usize::BITS - n.leading_zeros());
    quicksort(&mut keys[..n], &mut vals[..n], depth);
}

fn quicksort(mut keys: &mut [u64], mut vals: &mut [u16], mut depth: u32) {
    loop {
        let n = keys.len();
        if n <= INSERTION_MAX {
            insertion_sort(keys, vals);
            return;
        }
        if depth == 0 {
            heapsort(keys, vals);
            return;
        }
        depth -= 1;
        let mid = n / 2;
        let swap = |keys: &mut [u64], vals: &mut [u16], a: usize, b: usize| {
            keys.swap(a, b);
            vals.swap(a, b);
        };
        if keys[mid] < keys[0] {
            swap(keys, vals, 0, mid);
        }
        if keys[n - 1] < keys[0] {
            swap(keys, vals, 0, n - 1);
        }
        if keys[n - 1] < keys[mid] {
            swap(keys, vals, mid, n - 1);
        }
        // Hoare's partition around the median: keys[..=j] <= pivot <= keys[j + 1..],
        // with 0 <= j < n - 1 (keys[0] <= pivot <= keys[n - 1] stop both scans).
        let pivot = keys[mid];
        let (mut i, mut j) = (0, n - 1);
        loop {
            while keys[i] < pivot {
                i += 1;
            }
            while keys[j] > pivot {
                j -= 1;
            }
            if i >= j {
                break;
            }
            swap(keys, vals, i, j);
            i += 1;
            j -= 1;
        }
        let (left_keys, right_keys) = keys.split_at_mut(j + 1);
        let (left_vals, right_vals) = vals.split_at_mut(j + 1);
        // Recurse into the smaller side, loop on the larger: O(log n) stack.
        if left_keys.len() < right_keys.len() {
            quicksort(left_keys, left_vals, depth);
            (keys, vals) = (right_keys, right_vals);
        } else {
            quicksort(right_keys, right_vals, depth);
            (keys, vals) = (left_keys, left_vals);
        }
    }
}

fn insertion_sort(keys: &mut [u64], vals: &mut [u16]) {
    for i in 1..keys.len() {
        let (k, v) = (keys[i], vals[i]);
        let mut j = i;
        while j > 0 && keys[j - 1] > k {
            keys[j] = keys[j - 1];
            vals[j] = vals[j - 1];
            j -= 1;
        }
        keys[j] = k;
        vals[j] = v;
    }
}

fn heapsort(keys: &mut [u64], vals: &mut [u16]) {
    fn sift_down(keys: &mut [u64], vals: &mut [u16], mut root: usize, end: usize) {
        loop {
            let mut child = 2 * root + 1;
            if child >= end {
                return;
            }
            if child + 1 < end && keys[child] < keys[child + 1] {
                child += 1;
            }
            if keys[root] >= keys[child] {
                return;
            }
            keys.swap(root, child);
            vals.swap(root, child);
            root = child;
        }
    }
    let n = keys.len();
    for root in (0..n / 2).rev() {
        sift_down(keys, vals, root, n);
    }
    for end in (1..n).rev() {
        keys.swap(0, end);
        vals.swap(0, end);
        sift_down(keys, vals, 0, end);
    }
}

/// The state of one streaming parse.
struct Parser {
    file: String,
    as_of: Date,
    /// The latest day a row may carry: `as_of`, capped to what fits a `u16`.
    max_days: i32,
    /// The number of the last line seen (the header is line 1).
    line: u64,
    header_done: bool,
    /// Inside a line too long for the buffer: skip to its end.
    skipping: bool,
    rows: u64,
    numbers: Vec<u64>,
    days: Vec<u16>,
    last: u64,
    non_decreasing: bool,
    problems: Vec<String>,
    problem_total: u64,
    /// The manifest's `records`: reading stops at the first row beyond it.
    expected: u64,
    /// True once a row beyond `expected` was seen.
    overflow: bool,
    /// Rows kept before duplicates are folded ([`Parser::compact`]): memory
    /// is bounded by the distinct numbers, not by the rows.
    compact_at: usize,
    /// The least `compact_at` ([`COMPACT_MIN`]; smaller in tests).
    compact_min: usize,
    /// True if the read was stopped ([`Progress::should_stop`]).
    stopped: bool,
}

/// Rows kept before the first fold of duplicates (40 MiB of rows).
const COMPACT_MIN: usize = 1 << 22;
/// After a fold, the next comes when the kept rows have grown this many
/// times (few folds for a file of distinct numbers: the extra sorting stays
/// under one final sort).
const COMPACT_GROWTH: usize = 4;

impl Parser {
    fn new(file: &Path, as_of: Date, expected: u64) -> Self {
        // Trust the announced count for the first allocation, within reason.
        let capacity = expected.min(1 << 26) as usize;
        Self {
            file: file.display().to_string(),
            as_of,
            max_days: as_of.days().min(i32::from(u16::MAX)),
            line: 0,
            header_done: false,
            skipping: false,
            rows: 0,
            numbers: Vec::with_capacity(capacity),
            days: Vec::with_capacity(capacity),
            last: 0,
            non_decreasing: true,
            problems: Vec::new(),
            problem_total: 0,
            expected,
            overflow: false,
            compact_at: COMPACT_MIN,
            compact_min: COMPACT_MIN,
            stopped: false,
        }
    }

    /// Counts one more data row; past the manifest's count, marks the
    /// overflow (the caller stops reading).
    #[inline]
    fn count_row(&mut self) {
        self.rows += 1;
        if self.rows > self.expected {
            self.overflow = true;
        }
    }

    /// Folds duplicate numbers (keeping the latest date) so that memory
    /// follows the distinct numbers; the next fold comes when the kept rows
    /// have grown [`COMPACT_GROWTH`] times.
    fn compact(&mut self) {
        let numbers = std::mem::take(&mut self.numbers);
        let days = std::mem::take(&mut self.days);
        let (numbers, days) = dedup(numbers, days, self.non_decreasing);
        self.non_decreasing = true;
        self.last = numbers.last().copied().unwrap_or(0);
        self.compact_at = self.compact_min.max(numbers.len().saturating_mul(COMPACT_GROWTH));
        self.numbers = numbers;
        self.days = days;
    }

    fn problem(&mut self, reason: impl FnOnce() -> String) {
        self.problem_total += 1;
        if self.problems.len() < MAX_PROBLEMS {
            let text = format!("{}, line {}: {}", self.file, self.line, reason());
            self.problems.push(text);
        }
    }

    /// Parses the complete lines of `data` (and, at `eof`, the unterminated
    /// last one); returns how many bytes were consumed.
    fn process(&mut self, data: &[u8], eof: bool) -> usize {
        let mut pos = 0;
        if self.skipping {
            match find_newline(data) {
                Some(nl) => {
                    pos = nl + 1;
                    self.skipping = false;
                }
                None => return data.len(),
            }
        }
        if !self.header_done {
            match find_newline(&data[pos..]) {
                Some(nl) => {
                    self.header(&data[pos..pos + nl]);
                    pos += nl + 1;
                }
                None if eof => {
                    self.header(&data[pos..]);
                    return data.len();
                }
                None => return pos,
            }
        }
        while pos < data.len() && !self.overflow {
            if let Some((number, (y, m, d), len)) = fast_row(&data[pos..])
                && let Some(days) = self.day_of(y, m, d)
            {
                self.line += 1;
                self.push(number, days);
                pos += len;
                continue;
            }
            match find_newline(&data[pos..]) {
                Some(nl) => {
                    self.slow_row(&data[pos..pos + nl]);
                    pos += nl + 1;
                }
                None => {
                    if eof {
                        self.slow_row(&data[pos..]);
                        pos = data.len();
                    }
                    break;
                }
            }
        }
        pos
    }

    /// The day count of a valid date within range, or `None`.
    #[inline]
    fn day_of(&self, y: u32, m: u32, d: u32) -> Option<u16> {
        let date = Date::from_ymd(y as i32, m, d)?;
        let days = date.days();
        if (0..=self.max_days).contains(&days) {
            u16::try_from(days).ok()
        } else {
            None
        }
    }

    #[inline]
    fn push(&mut self, number: u64, days: u16) {
        self.count_row();
        if self.overflow {
            return;
        }
        if self.numbers.len() >= self.compact_at {
            self.compact();
        }
        if number < self.last {
            self.non_decreasing = false;
        }
        self.last = number;
        self.numbers.push(number);
        self.days.push(days);
    }

    fn header(&mut self, line: &[u8]) {
        self.header_done = true;
        self.line = 1;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line == HEADER {
            return;
        }
        let header = String::from_utf8_lossy(HEADER);
        if line.is_empty() {
            self.problem(|| format!("the header is missing (expected exactly `{header}`)"));
        } else if line.starts_with(b"\xEF\xBB\xBF") {
            self.problem(|| {
                format!("the header starts with a UTF-8 byte-order mark (expected exactly `{header}`)")
            });
        } else {
            self.problem(|| format!("the header must be exactly `{header}`"));
        }
    }

    fn long_line(&mut self) {
        self.line += 1;
        if self.header_done {
            self.count_row();
        } else {
            self.header_done = true;
        }
        self.skipping = true;
        self.problem(|| format!("line longer than {} KiB", CHUNK / 1024));
    }

    /// A row the fast path refused: find out why (or accept it, if it is
    /// merely unusual, e.g. the last line without a newline).
    fn slow_row(&mut self, line: &[u8]) {
        self.line += 1;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        match self.check_row(line) {
            Ok((number, days)) => self.push(number, days),
            Err(reason) => {
                self.count_row();
                self.problem(|| reason);
            }
        }
    }

    fn check_row(&self, line: &[u8]) -> Result<(u64, u16), String> {
        if line.is_empty() {
            return Err("empty line".into());
        }
        if line.contains(&b'"') {
            return Err("contains a quote character (quoting is not supported)".into());
        }
        let columns = line.iter().filter(|&&b| b == b',').count() + 1;
        if columns != 2 {
            return Err(format!(
                "expected 2 columns (phone_number,disconnect_date), found {columns}"
            ));
        }
        let comma = line.iter().position(|&b| b == b',').unwrap_or(line.len());
        let (number, date) = (&line[..comma], &line[comma + 1..]);
        let number = match std::str::from_utf8(number) {
            Ok(text) => PhoneNumber::parse(text).map_err(|e| format!("phone_number: {e}")),
            Err(_) => Err("phone_number: is not valid UTF-8".to_string()),
        };
        let date = match std::str::from_utf8(date) {
            Ok(text) => Date::parse(text)
                .map_err(|e| format!("disconnect_date: {e}"))
                .and_then(|d| self.check_date(d)),
            Err(_) => Err("disconnect_date: is not valid UTF-8".to_string()),
        };
        match (number, date) {
            (Ok(n), Ok(d)) => Ok((n.value(), d)),
            (Err(a), Err(b)) => Err(format!("{a}; {b}")),
            (Err(e), _) | (_, Err(e)) => Err(e),
        }
    }

    fn check_date(&self, date: Date) -> Result<u16, String> {
        if date < Date::EPOCH {
            return Err("disconnect_date: is before 1970-01-01".into());
        }
        if date > self.as_of {
            return Err(format!(
                "disconnect_date: is after the manifest's as_of ({})",
                self.as_of
            ));
        }
        u16::try_from(date.days()).map_err(|_| {
            format!(
                "disconnect_date: is after {}, the latest date supported",
                Date::from_days(i32::from(u16::MAX))
            )
        })
    }
}

#[inline]
fn find_newline(data: &[u8]) -> Option<usize> {
    data.iter().position(|&b| b == b'\n')
}

/// Parses a well-formed row at the start of `d`, newline included:
/// `+` and 5 to 15 digits (the first not 0), `,`, `YYYY-MM-DD`, optional
/// `\r`, `\n`. Returns the number, the date's parts and the bytes consumed;
/// `None` for anything else (the slow path then explains).
#[inline]
fn fast_row(d: &[u8]) -> Option<(u64, (u32, u32, u32), usize)> {
    if d.len() < 18 || d[0] != b'+' || !(b'1'..=b'9').contains(&d[1]) {
        return None;
    }
    let mut value = 0u64;
    let mut i = 1;
    while i <= PhoneNumber::MAX_DIGITS + 1 && i < d.len() {
        let c = d[i].wrapping_sub(b'0');
        if c > 9 {
            break;
        }
        value = value * 10 + u64::from(c);
        i += 1;
    }
    let digits = i - 1;
    if !(PhoneNumber::MIN_DIGITS..=PhoneNumber::MAX_DIGITS).contains(&digits) || d.get(i) != Some(&b',') {
        return None;
    }
    let date = d.get(i + 1..i + 11)?;
    if date[4] != b'-' || date[7] != b'-' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        date[r].iter().try_fold(0u32, |acc, &b| {
            let c = b.wrapping_sub(b'0');
            (c <= 9).then_some(acc * 10 + u32::from(c))
        })
    };
    let (y, m, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let mut end = i + 11;
    if d.get(end) == Some(&b'\r') {
        end += 1;
    }
    if d.get(end) != Some(&b'\n') {
        return None;
    }
    Some((value, (y, m, day), end + 1))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use flate2::Compression;
    use flate2::write::GzEncoder;

    use super::*;
    use crate::import::{Kind, NoProgress};

    const AS_OF: &str = "2026-11-01";

    /// Writes `bytes` as the data file `name` with a matching manifest (rows
    /// counted as lines after the header unless `records` is given).
    fn setup(dir: &Path, name: &str, bytes: &[u8], records: Option<u64>) -> Manifest {
        std::fs::write(dir.join(name), bytes).expect("write");
        let rows = || {
            let text = if name.ends_with(".gz") {
                let mut s = String::new();
                flate2::read::MultiGzDecoder::new(bytes)
                    .read_to_string(&mut s)
                    .expect("gunzip");
                s
            } else {
                String::from_utf8_lossy(bytes).into_owned()
            };
            text.lines().count().saturating_sub(1) as u64
        };
        Manifest {
            kind: Kind::Delta,
            sequence: 2,
            as_of: Date::parse(AS_OF).expect("date"),
            coverage_start: None,
            covered_prefixes: None,
            data: name.to_string(),
            records: records.unwrap_or_else(rows),
            sha256: hex::encode(Sha256::digest(bytes)),
            path: dir.join("m.json"),
        }
    }

    fn read(m: &Manifest) -> Result<Records, ImportError> {
        read_records(m, &mut NoProgress)
    }

    fn problems(r: Result<Records, ImportError>) -> Vec<String> {
        match r {
            Err(ImportError::Data { problems, .. }) => problems,
            other => panic!("expected a data error, got {other:?}"),
        }
    }

    fn days(s: &str) -> u16 {
        Date::parse(s).expect("date").days() as u16
    }

    #[test]
    fn reads_valid_rows_sorted_and_deduplicated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let csv = "phone_number,disconnect_date\n\
                   +8613800138000,2024-05-01\n\
                   +14155550123,2023-01-01\n\
                   +14155550123,2024-06-30\n\
                   +14155550123,2022-01-01\n\
                   +12345,1970-01-01\n";
        let m = setup(dir.path(), "d.csv", csv.as_bytes(), None);
        let r = read(&m).expect("valid");
        assert_eq!(
            r.pairs().collect::<Vec<_>>(),
            vec![
                (12345, 0),
                (14155550123, days("2024-06-30")),
                (8613800138000, days("2024-05-01"))
            ]
        );
    }

    #[test]
    fn sorted_input_with_duplicates_keeps_latest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let csv = "phone_number,disconnect_date\n\
                   +14155550100,2024-01-01\n\
                   +14155550123,2024-06-30\n\
                   +14155550123,2023-01-01\n\
                   +14155550124,2024-01-02\n";
        let m = setup(dir.path(), "d.csv", csv.as_bytes(), None);
        let r = read(&m).expect("valid");
        assert_eq!(
            r.numbers().collect::<Vec<_>>(),
            vec![14155550100, 14155550123, 14155550124]
        );
        assert_eq!(r.day(1), days("2024-06-30"));
    }

    #[test]
    fn accepts_crlf_and_missing_final_newline() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (i, csv) in [
            "phone_number,disconnect_date\r\n+14155550123,2024-05-01\r\n+14155550124,2024-05-02\r\n",
            "phone_number,disconnect_date\r\n+14155550123,2024-05-01\r\n+14155550124,2024-05-02",
            "phone_number,disconnect_date\n+14155550123,2024-05-01\n+14155550124,2024-05-02\r",
        ]
        .iter()
        .enumerate()
        {
            let m = setup(dir.path(), &format!("d{i}.csv"), csv.as_bytes(), None);
            let r = read(&m).unwrap_or_else(|e| panic!("case {i}: {e}"));
            assert_eq!(r.len(), 2, "case {i}");
        }
        let m = setup(dir.path(), "h.csv", b"phone_number,disconnect_date", Some(0));
        assert!(read(&m).expect("header only").is_empty());
    }

    #[test]
    fn reads_gzip_and_hashes_the_compressed_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut csv = String::from("phone_number,disconnect_date\n");
        for i in 0..50_000u64 {
            csv.push_str(&format!("+1415{:07},2024-05-01\n", i * 7 % 10_000_000));
        }
        let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
        gz.write_all(csv.as_bytes()).expect("gzip");
        let gz = gz.finish().expect("gzip");
        let m = setup(dir.path(), "d.csv.gz", &gz, None);
        assert_eq!(read(&m).expect("valid").len(), 50_000);

        // the checksum of the uncompressed text is not the file's
        let mut wrong = m.clone();
        wrong.sha256 = hex::encode(Sha256::digest(csv.as_bytes()));
        let p = problems(read(&wrong));
        assert_eq!(p.len(), 1);
        assert!(p[0].contains("SHA-256"), "{p:?}");

        // a truncated gzip file is a data problem, not a crash
        let m = setup(dir.path(), "t.csv.gz", &gz[..gz.len() / 2], Some(50_000));
        let p = problems(read(&m));
        assert!(p.iter().any(|p| p.contains("not a valid gzip file")), "{p:?}");
    }

    #[test]
    fn checksum_and_count_mismatch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let csv = b"phone_number,disconnect_date\n+14155550123,2024-05-01\n";
        let mut m = setup(dir.path(), "d.csv", csv, Some(2));
        let p = problems(read(&m));
        assert_eq!(p.len(), 1);
        assert!(p[0].contains("has 1 data rows, but the manifest says 2"), "{p:?}");
        m.records = 1;
        m.sha256 = "0".repeat(64);
        let p = problems(read(&m));
        assert_eq!(p.len(), 1);
        assert!(p[0].contains("SHA-256 is "), "{p:?}");
        assert!(p[0].contains("d.csv"), "{p:?}");
    }

    #[test]
    fn reports_bad_rows_by_line_without_the_number() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rows = [
            ("13125550147,2024-05-01", "phone_number: must start with '+'"),
            ("+03125550147,2024-05-01", "country code must not start with 0"),
            ("+1312555014745678,2024-05-01", "5 to 15 digits"),
            ("+1415 5550123,2024-05-01", "only digits"),
            (
                "+13125550147,2024-02-30",
                "disconnect_date: is not a real calendar date",
            ),
            ("+13125550147,2024/05/01", "disconnect_date: must be an ISO date"),
            ("+13125550147,1969-12-31", "before 1970-01-01"),
            (
                "+13125550147,2026-11-02",
                "after the manifest's as_of (2026-11-01)",
            ),
            ("+13125550147,2024-05-01,x", "expected 2 columns"),
            ("+13125550147", "expected 2 columns"),
            ("\"+13125550147\",2024-05-01", "quote"),
            ("", "empty line"),
            ("+13125550147,", "disconnect_date: is empty"),
            ("312555,x", "; disconnect_date: must be an ISO date"),
        ];
        let mut csv = String::from("phone_number,disconnect_date\n+13125550100,2024-05-01\n");
        for (row, _) in &rows {
            csv.push_str(row);
            csv.push('\n');
        }
        let m = setup(dir.path(), "d.csv", csv.as_bytes(), Some(rows.len() as u64 + 1));
        let p = problems(read(&m));
        assert_eq!(p.len(), rows.len(), "{p:#?}");
        for (i, ((_, want), got)) in rows.iter().zip(&p).enumerate() {
            let line = i + 3;
            assert!(got.contains(&format!("line {line}: ")), "{got:?}");
            assert!(got.contains(want), "{got:?} should contain {want:?}");
            assert!(got.contains("d.csv"), "{got:?}");
            for secret in ["3125550147", "312555,"] {
                assert!(!got.contains(secret), "{got:?} shows a number");
            }
        }
    }

    #[test]
    fn bad_headers() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (i, (csv, want)) in [
            ("", "header is missing"),
            ("phone,date\n", "header must be exactly"),
            ("\u{feff}phone_number,disconnect_date\n", "byte-order mark"),
            ("phone_number,disconnect_date,extra\n", "header must be exactly"),
        ]
        .iter()
        .enumerate()
        {
            let m = setup(dir.path(), &format!("d{i}.csv"), csv.as_bytes(), Some(0));
            let p = problems(read(&m));
            assert_eq!(p.len(), 1, "{p:?}");
            assert!(p[0].contains("line 1: ") && p[0].contains(want), "{p:?}");
        }
    }

    #[test]
    fn lists_at_most_twenty_row_problems() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut csv = String::from("phone_number,disconnect_date\n");
        for _ in 0..25 {
            csv.push_str("+1415555012x,2024-05-01\n");
        }
        let m = setup(dir.path(), "d.csv", csv.as_bytes(), Some(26));
        let p = problems(read(&m));
        assert_eq!(p.len(), 1 + MAX_PROBLEMS + 1, "{p:#?}");
        assert!(p[0].contains("has 25 data rows, but the manifest says 26"));
        assert!(p[1].contains("line 2: "));
        assert!(p[MAX_PROBLEMS].contains("line 21: "));
        assert_eq!(p[MAX_PROBLEMS + 1], "... and 5 more row problems");
    }

    #[test]
    fn rows_spanning_chunks_and_overlong_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        // enough rows to cross several chunk boundaries at odd offsets
        let mut csv = String::from("phone_number,disconnect_date\r\n");
        let n = 3 * CHUNK / 20;
        for i in 0..n {
            csv.push_str(&format!("+86138{:08},2024-05-{:02}\r\n", i, i % 28 + 1));
        }
        let m = setup(dir.path(), "big.csv", csv.as_bytes(), None);
        let r = read(&m).expect("valid");
        assert_eq!(r.len(), n);
        assert_eq!(r.day(27), days("2024-05-28"));

        let mut csv = String::from("phone_number,disconnect_date\n+14155550123,2024-05-01\n");
        csv.push_str(&"9".repeat(CHUNK + 10));
        csv.push_str("\n+14155550124,2024-05-01\n");
        let m = setup(dir.path(), "long.csv", csv.as_bytes(), Some(3));
        let p = problems(read(&m));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("line 3: line longer than"), "{p:?}");
        assert!(!p[0].contains("999999"));
    }

    #[test]
    fn folding_duplicates_keeps_the_latest_date() {
        // a tiny fold threshold, unsorted rows, duplicates across folds
        let mut parser = Parser::new(Path::new("d.csv"), Date::parse(AS_OF).expect("date"), 1000);
        (parser.compact_at, parser.compact_min) = (4, 4);
        let mut csv = String::from("phone_number,disconnect_date\n");
        for round in 0..10u32 {
            for n in [5u64, 3, 9, 1] {
                csv.push_str(&format!(
                    "+1415555000{n},2024-05-{:02}\n",
                    1 + (round * n as u32) % 28
                ));
            }
        }
        let consumed = parser.process(csv.as_bytes(), true);
        assert_eq!(consumed, csv.len());
        assert!(parser.numbers.len() <= 16, "folded: {}", parser.numbers.len());
        assert_eq!(parser.rows, 40);
        let r = finish(parser.numbers, parser.days, parser.non_decreasing).expect("records");
        let latest = |n: u32| {
            days(&format!(
                "2024-05-{:02}",
                1 + (0..10).map(|round| (round * n) % 28).max().unwrap_or(0)
            ))
        };
        assert_eq!(
            r.numbers().collect::<Vec<_>>(),
            vec![14155550001, 14155550003, 14155550005, 14155550009]
        );
        assert_eq!(
            r.pairs().map(|(_, d)| d).collect::<Vec<_>>(),
            vec![latest(1), latest(3), latest(5), latest(9)]
        );
    }

    /// The in-place sort of the parallel arrays sorts like the standard
    /// sort of the pairs (random, many duplicates, sorted, reversed, and
    /// the heap sort fallback), keeping each number with its own days.
    #[test]
    fn sort_pairs_sorts_like_the_standard_sort() {
        use rand::rngs::SmallRng;
        use rand::{Rng, SeedableRng};
        let mut rng = SmallRng::seed_from_u64(11);
        let mut cases: Vec<Vec<(u64, u16)>> = Vec::new();
        for n in [0usize, 1, 2, 3, 15, 16, 17, 100, 1000, 50_000] {
            cases.push((0..n).map(|_| (rng.random(), rng.random())).collect());
            cases.push((0..n).map(|_| (rng.random_range(0..8), rng.random())).collect());
            cases.push((0..n as u64).map(|i| (i, i as u16)).collect());
            cases.push((0..n as u64).rev().map(|i| (i / 3, i as u16)).collect());
        }
        for (c, pairs) in cases.iter().enumerate() {
            let (mut keys, mut vals): (Vec<u64>, Vec<u16>) = pairs.iter().copied().unzip();
            sort_pairs(&mut keys, &mut vals);
            let mut got: Vec<(u64, u16)> = keys.iter().copied().zip(vals.iter().copied()).collect();
            assert!(keys.windows(2).all(|w| w[0] <= w[1]), "case {c}: not sorted");
            // Same multiset of pairs: each key kept its own values.
            got.sort_unstable();
            let mut want = pairs.clone();
            want.sort_unstable();
            assert_eq!(got, want, "case {c}");
        }
        let (mut keys, mut vals): (Vec<u64>, Vec<u16>) =
            (0..1000u64).map(|i| ((i * 7919) % 1000, i as u16)).unzip();
        heapsort(&mut keys, &mut vals);
        assert_eq!(keys, (0..1000).collect::<Vec<_>>());
        assert!(
            keys.iter()
                .zip(&vals)
                .all(|(&k, &v)| (u64::from(v) * 7919) % 1000 == k)
        );
    }

    #[test]
    fn missing_data_file_is_io() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut m = setup(dir.path(), "d.csv", b"phone_number,disconnect_date\n", None);
        m.data = "other.csv".into();
        let e = read(&m).expect_err("missing");
        assert!(matches!(e, ImportError::Io { ref path, .. } if *path == dir.path().join("other.csv")));
    }
}
