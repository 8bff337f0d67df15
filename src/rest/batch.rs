//! `POST /v1/numbers:batchCheck`: BatchCheckNumbers in JSON, for the
//! hygiene jobs REST users run. The bodies are the proto3 JSON mapping of
//! `BatchCheckNumbersRequest` and `BatchCheckNumbersResponse` (lowerCamelCase
//! fields, enum value names, default values left out), and the call is the
//! gRPC batch's ([`ReassignedService::check_batch`]): 1 to `max_batch`
//! checks, one result or error per check, in order.

use http::StatusCode;

use super::{Body, RestError, json_response};
use crate::api::ServedStore;
use crate::api::note::CallNote;
use crate::api::{CallInfo, ReassignedService, pb};
use crate::identity::Principal;

/// The request: `BatchCheckNumbersRequest` in JSON.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BatchBody {
    /// The checks, 1 to `max_batch`.
    pub checks: Vec<BatchItem>,
    /// Every answer gets a signed receipt.
    #[serde(default)]
    pub want_receipts: bool,
}

/// One check: `CheckNumberRequest` in JSON.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BatchItem {
    /// Strict E.164.
    #[serde(default)]
    pub phone_number: String,
    /// `YYYY-MM-DD`, not after today (UTC).
    #[serde(default)]
    pub since: String,
    /// This answer gets a signed receipt.
    #[serde(default)]
    pub want_receipt: bool,
}

/// The response: `BatchCheckNumbersResponse` in JSON.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BatchResponse {
    /// One per check, in order.
    pub results: Vec<BatchResult>,
}

/// One result: `BatchCheckResult` in JSON (exactly one of the two).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum BatchResult {
    /// The answer.
    Answer(BatchAnswer),
    /// Why this check got no answer.
    Error(BatchError),
}

/// `CheckNumberResponse` in JSON.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BatchAnswer {
    /// The number as the client wrote it.
    pub phone_number: String,
    /// `REASSIGNMENT_STATUS_REASSIGNED`, `..._NOT_REASSIGNED` or `..._NO_DATA`.
    pub status: String,
    /// The date the data is complete through.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub data_as_of: String,
    /// Why NO_DATA (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_data_reason: Option<String>,
    /// The signed receipt, when asked for.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub receipt: String,
}

/// `CheckError` in JSON.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BatchError {
    /// The gRPC code name (`INVALID_ARGUMENT`, `UNAVAILABLE`, ...).
    pub code: String,
    /// What went wrong.
    pub message: String,
}

impl From<pb::BatchCheckResult> for BatchResult {
    fn from(result: pb::BatchCheckResult) -> Self {
        match result.result {
            Some(pb::batch_check_result::Result::Answer(answer)) => {
                let status = answer.status().as_str_name().to_owned();
                let no_data_reason = match answer.no_data_reason() {
                    pb::NoDataReason::Unspecified => None,
                    reason => Some(reason.as_str_name().to_owned()),
                };
                BatchResult::Answer(BatchAnswer {
                    phone_number: answer.phone_number,
                    status,
                    data_as_of: answer.data_as_of,
                    no_data_reason,
                    receipt: answer.receipt,
                })
            }
            Some(pb::batch_check_result::Result::Error(error)) => BatchResult::Error(BatchError {
                code: error.code,
                message: error.message,
            }),
            // The service always sets one; say so rather than invent an answer.
            None => BatchResult::Error(BatchError {
                code: "INTERNAL".into(),
                message: "no result".into(),
            }),
        }
    }
}

/// Answers a JSON batch for `principal` with the gRPC batch's path.
pub(super) async fn batch(
    service: &ReassignedService<ServedStore>,
    principal: &Principal,
    call: impl FnOnce() -> CallInfo,
    json: serde_json::Value,
    note: Option<&CallNote>,
) -> Result<http::Response<Body>, RestError> {
    let body: BatchBody = serde_json::from_value(json)
        .map_err(|e| RestError::invalid(format!("the body is not a batch: {e}")))?;
    let checks = body
        .checks
        .into_iter()
        .map(|c| pb::CheckNumberRequest {
            phone_number: c.phone_number,
            since: c.since,
            want_receipt: c.want_receipt,
        })
        .collect();
    let results = service
        .check_batch(Some(principal), call, checks, body.want_receipts, note)
        .await?;
    Ok(json_response(
        StatusCode::OK,
        &BatchResponse {
            results: results.into_iter().map(BatchResult::from).collect(),
        },
    ))
}
