//! Requests that are not valid protobuf, sent as raw bytes over real mutual
//! TLS: invalid UTF-8 in a string field is INVALID_ARGUMENT naming the
//! field (tonic's default is INTERNAL), for a single check, a batch and a
//! stream.
//!
//! The raw messages are encoded with prost types that declare
//! `phone_number` as `bytes`: the same wire format as the API's `string`,
//! but free to carry any bytes.

mod support;

use std::sync::Arc;

use http::uri::PathAndQuery;
use reassigned::api::pb;
use reassigned::store::{AnyStore, EmbeddedStore};
use support::server::{TestChannel, TestServer};
use tonic::Code;
use tonic_prost::ProstCodec;
use tonic_types::StatusExt as _;

/// `CheckNumberRequest` with `phone_number` as raw bytes.
#[derive(Clone, PartialEq, prost::Message)]
struct RawCheck {
    #[prost(bytes = "vec", tag = "1")]
    phone_number: Vec<u8>,
    #[prost(string, tag = "2")]
    since: String,
}

/// `BatchCheckNumbersRequest` of [`RawCheck`]s.
#[derive(Clone, PartialEq, prost::Message)]
struct RawBatch {
    #[prost(message, repeated, tag = "1")]
    checks: Vec<RawCheck>,
}

fn check(number: &[u8]) -> RawCheck {
    RawCheck {
        phone_number: number.to_vec(),
        since: "2024-01-01".into(),
    }
}

const GOOD: &[u8] = b"+14155550001";
const BAD: &[u8] = b"+1415\xff\xfe0001";

fn path(method: &str) -> PathAndQuery {
    PathAndQuery::try_from(format!("/reassigned.v1.ReassignedNumbers/{method}")).expect("path")
}

async fn grpc(server: &TestServer) -> tonic::client::Grpc<TestChannel> {
    let mut grpc = tonic::client::Grpc::new(server.channel("platform-a").await);
    grpc.ready().await.expect("ready");
    grpc
}

/// Asserts INVALID_ARGUMENT whose message and BadRequest violation name `field`.
fn assert_names_field(status: &tonic::Status, field: &str) {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().starts_with(&format!("{field}: ")),
        "{:?} should name {field}",
        status.message()
    );
    assert!(status.message().contains("UTF-8"), "{:?}", status.message());
    let violations = status
        .get_details_bad_request()
        .expect("BadRequest details")
        .field_violations;
    assert_eq!(violations.len(), 1, "{violations:?}");
    assert_eq!(violations[0].field, field);
}

#[tokio::test]
async fn invalid_utf8_is_invalid_argument_naming_the_field() {
    let server = TestServer::start(AnyStore::Embedded(Arc::new(EmbeddedStore::new())), |_| {}).await;

    // A single check.
    let mut client = grpc(&server).await;
    let status = client
        .unary(
            tonic::Request::new(check(BAD)),
            path("CheckNumber"),
            ProstCodec::<RawCheck, pb::CheckNumberResponse>::default(),
        )
        .await
        .expect_err("invalid UTF-8 was accepted");
    assert_names_field(&status, "phone_number");
    // The same bytes, valid, are answered (the raw encoding itself is fine).
    let mut client = grpc(&server).await;
    let answer = client
        .unary(
            tonic::Request::new(check(GOOD)),
            path("CheckNumber"),
            ProstCodec::<RawCheck, pb::CheckNumberResponse>::default(),
        )
        .await
        .expect("valid check")
        .into_inner();
    assert_eq!(answer.phone_number, "+14155550001");

    // A batch with one bad item among good ones: the whole call is refused,
    // naming the field path.
    let mut client = grpc(&server).await;
    let batch = RawBatch {
        checks: vec![check(GOOD), check(BAD), check(GOOD)],
    };
    let status = client
        .unary(
            tonic::Request::new(batch),
            path("BatchCheckNumbers"),
            ProstCodec::<RawBatch, pb::BatchCheckNumbersResponse>::default(),
        )
        .await
        .expect_err("invalid UTF-8 in a batch was accepted");
    assert_names_field(&status, "checks.phone_number");

    // A stream: the good item before the bad one is answered; the bad one
    // ends the stream with INVALID_ARGUMENT, never INTERNAL.
    let mut client = grpc(&server).await;
    let items = tokio_stream::iter(vec![check(GOOD), check(BAD)]);
    let outcome = client
        .streaming(
            tonic::Request::new(items),
            path("StreamCheckNumbers"),
            ProstCodec::<RawCheck, pb::BatchCheckResult>::default(),
        )
        .await;
    let mut answered = 0;
    let status = match outcome {
        Err(status) => status,
        Ok(response) => {
            let mut results = response.into_inner();
            loop {
                match results.message().await {
                    Ok(Some(result)) => {
                        match result.result {
                            Some(pb::batch_check_result::Result::Answer(_)) => answered += 1,
                            Some(pb::batch_check_result::Result::Error(e)) => {
                                // A per-item error is fine too, if it is the right one.
                                assert_eq!(e.code, "INVALID_ARGUMENT", "{e:?}");
                                assert!(e.message.contains("phone_number"), "{e:?}");
                            }
                            None => panic!("empty result"),
                        }
                    }
                    Ok(None) => panic!("the stream ended without refusing the bad item"),
                    Err(status) => break status,
                }
            }
        }
    };
    assert_names_field(&status, "phone_number");
    assert!(answered <= 1, "{answered}");
    server.stop().await;
}

#[tokio::test]
async fn a_message_over_the_size_limit_is_out_of_range() {
    let server = TestServer::start(AnyStore::Embedded(Arc::new(EmbeddedStore::new())), |_| {}).await;
    let limit = server.config.max_message_bytes;
    let mut client = grpc(&server).await;
    let status = client
        .unary(
            tonic::Request::new(check(&vec![b'1'; limit + 1])),
            path("CheckNumber"),
            ProstCodec::<RawCheck, pb::CheckNumberResponse>::default(),
        )
        .await
        .expect_err("an oversized message was accepted");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("too large"), "{:?}", status.message());
    server.stop().await;
}
