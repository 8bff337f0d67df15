//! The domain, in plain Rust (no tonic, no redis): strict E.164 numbers,
//! calendar dates and the answer rule of DOMAIN.md.

mod answer;
mod date;
pub mod hmac;
mod number;

/// The most checks of one batch call, unless configured otherwise: the US
/// RND's bulk limit (1,000 numbers per API call).
pub const DEFAULT_MAX_BATCH: usize = 1000;

/// Days after `as_of` before a mirror counts as stale, unless configured
/// otherwise: the US rules' shortest quarantine of a disconnected number.
pub const DEFAULT_MAX_STALENESS_DAYS: u32 = 45;

pub use answer::{
    Answer, Check, FieldViolation, MirrorMeta, NoDataReason, SinceError, Status, answer, parse_since,
};
pub use date::{Date, DateError};
pub use number::{NumberError, PhoneNumber, Prefix};
