//! `POST /number-recycling/v0.2/check`: CAMARA Number Recycling v0.2.0's
//! request (`{ phoneNumber, specifiedDate }`) and response
//! (`{ phoneNumberRecycled }`), answered by the gRPC CheckNumber's path.

use http::StatusCode;

use super::{Body, RestError, json_response, string_field};
use crate::api::ServedStore;
use crate::api::note::CallNote;
use crate::api::{CallInfo, ReassignedService};
use crate::domain::{Check, Date, NoDataReason, PhoneNumber, SinceError, Status, parse_since};
use crate::identity::Principal;

/// CAMARA's request body (`CreateCheckNumRecycling`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckBody {
    /// E.164 with a leading `+`; required here (two-legged tokens only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phone_number: Option<String>,
    /// `YYYY-MM-DD`: has the number changed hands after this date?
    pub specified_date: String,
}

/// CAMARA's response body (`CheckNumRecyclingInfo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckResult {
    /// True when the number changed hands since `specifiedDate`.
    pub phone_number_recycled: bool,
}

/// Answers one CAMARA check for `principal`: charged like CheckNumber,
/// validated, then answered by [`ReassignedService::check_one`].
pub(super) async fn check(
    service: &ReassignedService<ServedStore>,
    principal: &Principal,
    call: impl FnOnce() -> CallInfo,
    json: serde_json::Value,
    note: Option<&CallNote>,
) -> Result<http::Response<Body>, RestError> {
    service.charge(Some(principal), 1, 1).await?;
    if !json.is_object() {
        return Err(RestError::invalid("the body must be a JSON object"));
    }
    let date = string_field(&json, "specifiedDate")?;
    let phone = string_field(&json, "phoneNumber")?;
    let Some(phone) = phone else {
        return Err(RestError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "MISSING_IDENTIFIER",
            "phoneNumber is required: the phone number cannot be identified from the access token",
        ));
    };
    let Some(date) = date else {
        return Err(RestError::invalid("specifiedDate is required"));
    };
    let today = Date::today_utc();
    let number = PhoneNumber::parse(&phone).map_err(|e| RestError::invalid(format!("phoneNumber: {e}")))?;
    let since = parse_since(&date, today).map_err(|e| match e {
        SinceError::Future { .. } => RestError::out_of_range(format!("specifiedDate: {e}")),
        SinceError::Date(_) => RestError::invalid(format!("specifiedDate: {e}")),
    })?;
    let plan = service.receipt_plan(service.call_info_with(call), false, false)?;
    let answered = service
        .check_one(&plan, Check { number, since }, phone, false, today, note)
        .await?;
    let recycled = match answered.answer.status {
        Status::Reassigned => true,
        Status::NotReassigned => false,
        Status::NoData(NoDataReason::NumberNotCovered) => {
            return Err(RestError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "SERVICE_NOT_APPLICABLE",
                "the register covers no numbering prefix of this phoneNumber",
            ));
        }
        Status::NoData(NoDataReason::BeforeCoverage) => {
            let start = answered
                .meta
                .as_ref()
                .map_or_else(String::new, |m| m.coverage_start.to_string());
            return Err(RestError::out_of_range(format!(
                "specifiedDate is before the coverage start of the register ({start})"
            )));
        }
        Status::NoData(NoDataReason::MirrorStale) => {
            return Err(RestError::unavailable(
                "the mirror is older than its allowed staleness; retry later",
            ));
        }
        Status::NoData(NoDataReason::MirrorEmpty) => {
            return Err(RestError::unavailable(
                "the mirror holds no data yet; retry later",
            ));
        }
    };
    Ok(json_response(
        StatusCode::OK,
        &CheckResult {
            phone_number_recycled: recycled,
        },
    ))
}
