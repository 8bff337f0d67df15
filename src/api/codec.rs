//! The protobuf codec of the generated service and client code: prost's,
//! except that a request that does not decode (invalid UTF-8 in a string
//! field, a truncated field, a wrong wire type) is `INVALID_ARGUMENT` naming
//! the field, not tonic's `INTERNAL`. The wire format is unchanged: the
//! proto contract stays as written.
//!
//! Checks are answered one by one, also when their text is not UTF-8: a
//! `CheckNumberRequest` or `BatchCheckNumbersRequest` that fails to decode
//! only because a string is not UTF-8 is decoded again with its strings
//! read as bytes and made text lossily (U+FFFD for each bad sequence). Such
//! a text is never a valid E.164 number or date, so the check gets its own
//! INVALID_ARGUMENT naming the field, a batch answers its other checks, and
//! a stream goes on. The generated types (and the wire) stay as they are.
//! Any other decode error refuses the whole message.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::ProstEncoder;
use tonic_types::{ErrorDetails, StatusExt as _};

/// [`tonic_prost::ProstCodec`] with decode errors mapped to
/// `INVALID_ARGUMENT` (see the module doc).
#[derive(Debug, Clone)]
pub struct ApiCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for ApiCodec<T, U> {
    fn default() -> Self {
        Self { _pd: PhantomData }
    }
}

impl<T, U> Codec for ApiCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ApiDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ApiDecoder { _pd: PhantomData }
    }
}

/// Decodes `U` with prost; a decode error is `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct ApiDecoder<U> {
    _pd: PhantomData<U>,
}

impl<U: Message + Default + 'static> Decoder for ApiDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        use prost::bytes::Buf as _;
        let bytes = buf.copy_to_bytes(buf.remaining());
        match U::decode(bytes.clone()) {
            Ok(message) => Ok(Some(message)),
            Err(e) => match lenient::<U>(&bytes, &e) {
                Some(message) => Ok(Some(message)),
                None => Err(decode_status(&e)),
            },
        }
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// The check requests, with their strings as bytes (same wire format).
mod raw {
    /// `CheckNumberRequest`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Check {
        #[prost(bytes = "vec", tag = "1")]
        pub phone_number: Vec<u8>,
        #[prost(bytes = "vec", tag = "2")]
        pub since: Vec<u8>,
        #[prost(bool, tag = "3")]
        pub want_receipt: bool,
    }

    /// `BatchCheckNumbersRequest`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Batch {
        #[prost(message, repeated, tag = "1")]
        pub checks: Vec<Check>,
        #[prost(bool, tag = "2")]
        pub want_receipts: bool,
    }
}

impl From<raw::Check> for crate::api::pb::CheckNumberRequest {
    fn from(raw: raw::Check) -> Self {
        let text = |bytes: Vec<u8>| String::from_utf8_lossy(&bytes).into_owned();
        // Every field named: a new field in the proto must be added here.
        crate::api::pb::CheckNumberRequest {
            phone_number: text(raw.phone_number),
            since: text(raw.since),
            want_receipt: raw.want_receipt,
        }
    }
}

/// `U` decoded with its strings read lossily, when `U` is a check request
/// and `error` is about UTF-8 only; `None` otherwise.
fn lenient<U: 'static>(bytes: &[u8], error: &prost::DecodeError) -> Option<U> {
    use std::any::{Any, TypeId};

    use crate::api::pb;
    if !error.to_string().contains("not UTF-8") {
        return None;
    }
    let decoded: Box<dyn Any> = if TypeId::of::<U>() == TypeId::of::<pb::CheckNumberRequest>() {
        Box::new(pb::CheckNumberRequest::from(raw::Check::decode(bytes).ok()?))
    } else if TypeId::of::<U>() == TypeId::of::<pb::BatchCheckNumbersRequest>() {
        let raw = raw::Batch::decode(bytes).ok()?;
        Box::new(pb::BatchCheckNumbersRequest {
            checks: raw.checks.into_iter().map(pb::CheckNumberRequest::from).collect(),
            want_receipts: raw.want_receipts,
        })
    } else {
        return None;
    };
    decoded.downcast::<U>().ok().map(|message| *message)
}

/// `INVALID_ARGUMENT` for a message that does not decode, with a
/// `google.rpc.BadRequest` violation on the field when prost names one.
pub fn decode_status(error: &prost::DecodeError) -> Status {
    let (field, reason) = split_decode_error(&error.to_string());
    let message = match &field {
        Some(field) => format!("{field}: {reason}"),
        None => format!("the message is not valid protobuf: {reason}"),
    };
    let mut details = ErrorDetails::new();
    details.add_bad_request_violation(field.unwrap_or_else(|| "request".into()), reason);
    Status::with_error_details(tonic::Code::InvalidArgument, message, details)
}

/// Splits prost's rendering of a decode error, `failed to decode Protobuf
/// message: Inner.field: Outer.field: reason` (innermost first), into the
/// field path as the API names it (`checks.phone_number`) and the reason.
fn split_decode_error(text: &str) -> (Option<String>, String) {
    let mut rest = text
        .strip_prefix("failed to decode Protobuf message: ")
        .unwrap_or(text);
    let mut fields = Vec::new();
    while let Some((segment, tail)) = rest.split_once(": ") {
        let Some((message, field)) = segment.split_once('.') else {
            break;
        };
        let ident = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !(ident(message) && ident(field)) {
            break;
        }
        fields.push(field);
        rest = tail;
    }
    fields.reverse();
    let field = (!fields.is_empty()).then(|| fields.join("."));
    (field, rest.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prost_errors_name_the_field_outermost_first() {
        let (field, reason) = split_decode_error(
            "failed to decode Protobuf message: CheckNumberRequest.phone_number: \
             BatchCheckNumbersRequest.checks: invalid string value: data is not UTF-8 encoded",
        );
        assert_eq!(field.as_deref(), Some("checks.phone_number"));
        assert_eq!(reason, "invalid string value: data is not UTF-8 encoded");
        let (field, reason) = split_decode_error("failed to decode Protobuf message: buffer underflow");
        assert_eq!(field, None);
        assert_eq!(reason, "buffer underflow");
    }

    #[test]
    fn check_requests_with_bad_utf8_decode_lossily() {
        use crate::api::pb;
        // checks[0].phone_number = 0xff 0xfe, checks[1] valid, want_receipts.
        let mut bytes = vec![0x0a, 0x04, 0x0a, 0x02, 0xff, 0xfe];
        let good = pb::CheckNumberRequest {
            phone_number: "+14155550001".into(),
            since: "2024-01-01".into(),
            want_receipt: true,
        };
        let good_bytes = good.encode_to_vec();
        bytes.push(0x0a);
        bytes.push(good_bytes.len() as u8);
        bytes.extend_from_slice(&good_bytes);
        bytes.extend_from_slice(&[0x10, 0x01]);
        let error = pb::BatchCheckNumbersRequest::decode(&bytes[..]).expect_err("not UTF-8");
        let batch: pb::BatchCheckNumbersRequest = lenient(&bytes, &error).expect("lenient");
        assert_eq!(batch.checks.len(), 2);
        assert_eq!(batch.checks[0].phone_number, "\u{fffd}\u{fffd}");
        assert_eq!(batch.checks[1], good);
        assert!(batch.want_receipts);
        // Other message types, and other errors, are not decoded leniently.
        assert!(lenient::<pb::GetMirrorStatusRequest>(&bytes, &error).is_none());
        let truncated = pb::CheckNumberRequest::decode(&[0x0a, 0x05, b'+'][..]).expect_err("short");
        assert!(lenient::<pb::CheckNumberRequest>(&[0x0a, 0x05, b'+'], &truncated).is_none());
    }

    #[test]
    fn invalid_utf8_is_invalid_argument() {
        // field 1 (phone_number), length-delimited, 2 bytes: 0xff 0xfe.
        let bytes: &[u8] = &[0x0a, 0x02, 0xff, 0xfe];
        let error = crate::api::pb::CheckNumberRequest::decode(bytes).expect_err("not UTF-8");
        let status = decode_status(&error);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().starts_with("phone_number: "),
            "{}",
            status.message()
        );
    }
}
