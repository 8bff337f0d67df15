//! The protobuf codec of the generated service and client code: prost's,
//! except that a request that does not decode (invalid UTF-8 in a string
//! field, a truncated field, a wrong wire type) is `INVALID_ARGUMENT` naming
//! the field, not tonic's `INTERNAL`. The wire format is unchanged: the
//! proto contract stays as written.
//!
//! A message that fails to decode is refused as a whole (a batch with one
//! bad number fails entirely): prost decodes a message in one piece, and
//! declaring the string fields as bytes to answer per item would change the
//! generated types every handler uses.

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

impl<U: Message + Default> Decoder for ApiDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|e| decode_status(&e))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
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
