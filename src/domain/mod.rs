//! The domain, in plain Rust (no tonic, no redis): strict E.164 numbers,
//! calendar dates and the answer rule of DOMAIN.md.

mod answer;
mod date;
mod number;

pub use answer::{
    Answer, Check, FieldViolation, MirrorMeta, NoDataReason, SinceError, Status, answer, parse_since,
};
pub use date::{Date, DateError};
pub use number::{NumberError, PhoneNumber, Prefix};
