//! Requests that are not what the proto says, sent as raw bytes over real
//! mutual TLS. Invalid UTF-8 in a string field (tonic's default: INTERNAL
//! for the whole call) is INVALID_ARGUMENT naming the field, for that check
//! alone: a batch answers its other checks, a stream goes on. Any other
//! malformed message is INVALID_ARGUMENT for the call; one over the size
//! limit is OUT_OF_RANGE.
//!
//! The raw messages are encoded with prost types that declare the strings
//! as `bytes`: the same wire format as the API's `string`, but free to carry
//! any bytes.

mod support;

use std::sync::Arc;

use http::uri::PathAndQuery;
use reassigned::api::pb;
use reassigned::store::{AnyStore, EmbeddedStore};
use support::server::{TestChannel, TestServer};
use tonic::Code;
use tonic_prost::ProstCodec;
use tonic_types::StatusExt as _;

/// `CheckNumberRequest` with its strings as raw bytes.
#[derive(Clone, PartialEq, prost::Message)]
struct RawCheck {
    #[prost(bytes = "vec", tag = "1")]
    phone_number: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    since: Vec<u8>,
}

/// `BatchCheckNumbersRequest` of [`RawCheck`]s.
#[derive(Clone, PartialEq, prost::Message)]
struct RawBatch {
    #[prost(message, repeated, tag = "1")]
    checks: Vec<RawCheck>,
}

/// `CheckNumberRequest` with `phone_number` on the wrong wire type.
#[derive(Clone, PartialEq, prost::Message)]
struct WrongWireType {
    #[prost(uint64, tag = "1")]
    phone_number: u64,
}

fn check(number: &[u8]) -> RawCheck {
    RawCheck {
        phone_number: number.to_vec(),
        since: b"2024-01-01".to_vec(),
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
    let violations = status
        .get_details_bad_request()
        .expect("BadRequest details")
        .field_violations;
    assert!(violations.iter().any(|v| v.field == field), "{violations:?}");
}

/// Asserts a per-item INVALID_ARGUMENT naming `field`.
fn assert_item_error(result: &pb::BatchCheckResult, field: &str) {
    match &result.result {
        Some(pb::batch_check_result::Result::Error(e)) => {
            assert_eq!(e.code, "INVALID_ARGUMENT", "{e:?}");
            assert!(e.message.starts_with(&format!("{field}: ")), "{e:?}");
        }
        other => panic!("expected an error for {field}, got {other:?}"),
    }
}

fn assert_answer(result: &pb::BatchCheckResult) {
    assert!(
        matches!(result.result, Some(pb::batch_check_result::Result::Answer(_))),
        "{result:?}"
    );
}

#[tokio::test]
async fn invalid_utf8_is_invalid_argument_for_that_check_only() {
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
    let mut bad_date = check(GOOD);
    bad_date.since = b"2024-\xc3\x28-01".to_vec();
    let mut client = grpc(&server).await;
    let status = client
        .unary(
            tonic::Request::new(bad_date.clone()),
            path("CheckNumber"),
            ProstCodec::<RawCheck, pb::CheckNumberResponse>::default(),
        )
        .await
        .expect_err("invalid UTF-8 was accepted");
    assert_names_field(&status, "since");
    // The same encoding, valid, is answered.
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

    // A batch with bad items among good ones: each bad item gets its own
    // error, the others are answered.
    let mut client = grpc(&server).await;
    let batch = RawBatch {
        checks: vec![check(GOOD), check(BAD), check(GOOD), bad_date.clone()],
    };
    let results = client
        .unary(
            tonic::Request::new(batch),
            path("BatchCheckNumbers"),
            ProstCodec::<RawBatch, pb::BatchCheckNumbersResponse>::default(),
        )
        .await
        .expect("the batch is answered")
        .into_inner()
        .results;
    assert_eq!(results.len(), 4);
    assert_answer(&results[0]);
    assert_item_error(&results[1], "phone_number");
    assert_answer(&results[2]);
    assert_item_error(&results[3], "since");

    // A stream: the bad item is answered with its error and the stream goes on.
    let mut client = grpc(&server).await;
    let items = tokio_stream::iter(vec![check(GOOD), check(BAD), check(GOOD)]);
    let mut stream = client
        .streaming(
            tonic::Request::new(items),
            path("StreamCheckNumbers"),
            ProstCodec::<RawCheck, pb::BatchCheckResult>::default(),
        )
        .await
        .expect("stream")
        .into_inner();
    let mut results = Vec::new();
    while let Some(result) = stream.message().await.expect("the stream goes on") {
        results.push(result);
    }
    assert_eq!(results.len(), 3);
    assert_answer(&results[0]);
    assert_item_error(&results[1], "phone_number");
    assert_answer(&results[2]);
    server.stop().await;
}

#[tokio::test]
async fn other_malformed_messages_are_invalid_argument_for_the_call() {
    let server = TestServer::start(AnyStore::Embedded(Arc::new(EmbeddedStore::new())), |_| {}).await;
    let mut client = grpc(&server).await;
    let status = client
        .unary(
            tonic::Request::new(WrongWireType { phone_number: 7 }),
            path("CheckNumber"),
            ProstCodec::<WrongWireType, pb::CheckNumberResponse>::default(),
        )
        .await
        .expect_err("a wrong wire type was accepted");
    assert_names_field(&status, "phone_number");
    assert!(status.message().contains("wire type"), "{:?}", status.message());
    // In a stream, such a message ends the stream with that status, after
    // the answers to the messages before it.
    let mut client = grpc(&server).await;
    let items = tokio_stream::iter(vec![WrongWireType { phone_number: 7 }]);
    let outcome = client
        .streaming(
            tonic::Request::new(items),
            path("StreamCheckNumbers"),
            ProstCodec::<WrongWireType, pb::BatchCheckResult>::default(),
        )
        .await;
    let status = match outcome {
        Err(status) => status,
        Ok(response) => match response.into_inner().message().await {
            Ok(Some(result)) => panic!("unexpected result {result:?}"),
            Ok(None) => panic!("the stream ended OK without refusing the message"),
            Err(status) => status,
        },
    };
    assert_names_field(&status, "phone_number");
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
