//! Conversions between the generated types and the domain, and the one
//! mapping of errors to gRPC status codes.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use super::methods::code_name;
use super::pb;
use crate::audit::AuditError;
use crate::domain::{self, FieldViolation, MirrorMeta};
use crate::quota::{QuotaExceeded, QuotaKind};
use crate::receipt::ReceiptError;
use crate::store::StoreError;

/// Why a call failed, before it becomes a [`tonic::Status`].
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed: one or more fields are refused.
    #[error("invalid argument")]
    InvalidArgument(Vec<FieldViolation>),
    /// The store could not answer.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The platform is over one of its quotas.
    #[error(transparent)]
    Quota(#[from] QuotaExceeded),
    /// A receipt was asked for and cannot be made.
    #[error(transparent)]
    Receipt(#[from] ReceiptError),
    /// The audit trail is mandatory and cannot take the record.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// The call has no authenticated caller (the auth layer sets one on
    /// every call it lets through: a call without is refused).
    #[error("no caller identity")]
    NoCaller,
    /// Watch lists are not configured on this server (no watch key).
    #[error("watch lists are off")]
    WatchOff,
    /// A `WatchDisconnections` cursor is older than what the server still
    /// holds: the oldest cursor still held.
    #[error("cursor out of range")]
    CursorOutOfRange(String),
}

impl ApiError {
    /// The gRPC code and a short, stable message for the client. Internal
    /// detail stays in the log.
    pub fn code_and_message(&self) -> (Code, String) {
        match self {
            ApiError::InvalidArgument(violations) => (Code::InvalidArgument, describe(violations)),
            ApiError::Store(e) => match e {
                StoreError::Timeout(_) => (
                    Code::Unavailable,
                    "the mirror did not answer in time; retry".into(),
                ),
                StoreError::Unavailable(_) => (Code::Unavailable, "the mirror is unavailable; retry".into()),
                StoreError::Conflict(_) => {
                    (Code::Aborted, "the mirror changed during the call; retry".into())
                }
                StoreError::Corrupt(_) => (Code::Internal, "the mirror data is unreadable".into()),
            },
            ApiError::Quota(e) => match e.kind {
                QuotaKind::Rate => (
                    Code::ResourceExhausted,
                    "request rate quota exceeded; retry after the delay given".into(),
                ),
                QuotaKind::Daily => (
                    Code::ResourceExhausted,
                    "daily numbers quota exceeded; retry after the UTC day ends".into(),
                ),
                QuotaKind::StoreDown => (
                    Code::Unavailable,
                    "the quota store is unavailable and quotas fail closed; retry".into(),
                ),
            },
            ApiError::Receipt(e) => match e {
                ReceiptError::NotConfigured => (
                    Code::FailedPrecondition,
                    "receipts are not configured on this server".into(),
                ),
                ReceiptError::NoPlatform | ReceiptError::Sign(_) => {
                    (Code::Internal, "cannot sign the receipt".into())
                }
            },
            ApiError::Audit(AuditError::Unavailable) => {
                (Code::Unavailable, "the audit trail is unavailable; retry".into())
            }
            ApiError::NoCaller => (Code::Unauthenticated, "no client identity".into()),
            ApiError::WatchOff => (
                Code::FailedPrecondition,
                "watch lists are not configured on this server (no watch key)".into(),
            ),
            ApiError::CursorOutOfRange(oldest) => (
                Code::OutOfRange,
                format!(
                    "cursor: unknown or expired (events older than the retention are gone); \
                     the oldest cursor still held is {oldest:?} (an empty cursor starts from now)"
                ),
            ),
        }
    }
}

/// `field: reason; field: reason`.
fn describe(violations: &[FieldViolation]) -> String {
    violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.reason))
        .collect::<Vec<_>>()
        .join("; ")
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        let (code, message) = e.code_and_message();
        match e {
            ApiError::InvalidArgument(violations) => {
                let mut details = ErrorDetails::new();
                for v in &violations {
                    details.add_bad_request_violation(v.field, v.reason.clone());
                }
                Status::with_error_details(code, message, details)
            }
            ApiError::Store(inner) => {
                // Rate-limited: a store outage fails every call (all are
                // counted in reassigned_requests_total).
                if let Some(suppressed) = crate::lograte::global().check("store_error") {
                    tracing::warn!(error = %inner, suppressed, "store error");
                }
                Status::new(code, message)
            }
            ApiError::Quota(exceeded) => {
                tracing::debug!(kind = ?exceeded.kind, retry_after = ?exceeded.retry_after, "quota exceeded");
                let details = ErrorDetails::with_retry_info(Some(exceeded.retry_after));
                Status::with_error_details(code, message, details)
            }
            ApiError::Receipt(inner) => {
                if !matches!(inner, ReceiptError::NotConfigured) {
                    tracing::error!(error = %inner, "receipt error");
                }
                Status::new(code, message)
            }
            ApiError::Audit(_) | ApiError::NoCaller | ApiError::WatchOff | ApiError::CursorOutOfRange(_) => {
                Status::new(code, message)
            }
        }
    }
}

impl From<ApiError> for pb::CheckError {
    fn from(e: ApiError) -> Self {
        let (code, message) = e.code_and_message();
        pb::CheckError {
            code: code_name(code).to_owned(),
            message,
        }
    }
}

impl From<domain::Status> for (pb::ReassignmentStatus, pb::NoDataReason) {
    fn from(status: domain::Status) -> Self {
        use domain::NoDataReason as R;
        use pb::NoDataReason as P;
        match status {
            domain::Status::NotReassigned => (pb::ReassignmentStatus::NotReassigned, P::Unspecified),
            domain::Status::Reassigned => (pb::ReassignmentStatus::Reassigned, P::Unspecified),
            domain::Status::NoData(reason) => (
                pb::ReassignmentStatus::NoData,
                match reason {
                    R::NumberNotCovered => P::NumberNotCovered,
                    R::BeforeCoverage => P::BeforeCoverage,
                    R::MirrorStale => P::MirrorStale,
                    R::MirrorEmpty => P::MirrorEmpty,
                },
            ),
        }
    }
}

/// The wire names of an answer: the `ReassignmentStatus` name and, for
/// NO_DATA, the `NoDataReason` name (as receipts and audit records carry
/// them).
pub fn status_names(status: domain::Status) -> (&'static str, Option<&'static str>) {
    let (status, reason): (pb::ReassignmentStatus, pb::NoDataReason) = status.into();
    let reason = match reason {
        pb::NoDataReason::Unspecified => None,
        reason => Some(reason.as_str_name()),
    };
    (status.as_str_name(), reason)
}

/// The response message of one answer, to the number as the client wrote
/// it, with its receipt (empty: none).
pub fn answer_message(
    phone_number: String,
    answer: &domain::Answer,
    receipt: String,
) -> pb::CheckNumberResponse {
    let (status, reason) = answer.status.into();
    pb::CheckNumberResponse {
        phone_number,
        status: status as i32,
        data_as_of: answer.as_of.map(|d| d.to_string()).unwrap_or_default(),
        no_data_reason: reason as i32,
        receipt,
    }
}

/// The mirror status message.
pub fn status_message(
    meta: Option<&MirrorMeta>,
    today: domain::Date,
    max_staleness_days: u32,
) -> pb::GetMirrorStatusResponse {
    let Some(meta) = meta else {
        return pb::GetMirrorStatusResponse {
            max_staleness_days,
            ..Default::default()
        };
    };
    pb::GetMirrorStatusResponse {
        data_as_of: meta.as_of.to_string(),
        coverage_start: meta.coverage_start.to_string(),
        covered_prefixes: meta.prefixes.iter().map(ToString::to_string).collect(),
        record_count: meta.record_count,
        sequence: meta.sequence,
        last_import_time: Some(prost_types::Timestamp {
            seconds: meta.last_import_unix,
            nanos: 0,
        }),
        stale: meta.is_stale(today, max_staleness_days),
        max_staleness_days,
        skipped_files: Vec::new(),
        sources: Vec::new(),
    }
}
