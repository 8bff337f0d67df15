//! CAMARA's error body (`{ status, code, message }`) and the one mapping of
//! the service's errors to it: an [`ApiError`] becomes the gRPC status the
//! gRPC face answers (one mapping, [`ApiError`]'s), and that status's code
//! becomes the HTTP status and CAMARA code ([`http_of`], exhaustive).

use std::time::Duration;

use http::{HeaderValue, StatusCode};
use tonic::Code;
use tonic_types::StatusExt as _;

use crate::api::ApiError;

/// One refused REST call: the HTTP status, CAMARA's code, a message for the
/// client (never a number, key or token) and, when throttled, when to retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestError {
    /// The HTTP status.
    pub status: StatusCode,
    /// CAMARA's error code (`INVALID_ARGUMENT`, `OUT_OF_RANGE`, ...).
    pub code: &'static str,
    /// What went wrong.
    pub message: String,
    /// `Retry-After`, for 429 (and 503 where the service knows).
    pub retry_after: Option<Duration>,
}

/// The error body of CAMARA's Commonalities.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ErrorBody {
    /// The HTTP status, again.
    pub status: u16,
    /// CAMARA's error code.
    pub code: String,
    /// What went wrong.
    pub message: String,
}

impl RestError {
    /// An error with `status`, `code` and `message`.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// 400 INVALID_ARGUMENT.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", message)
    }

    /// 400 OUT_OF_RANGE.
    pub fn out_of_range(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "OUT_OF_RANGE", message)
    }

    /// 503 UNAVAILABLE.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", message)
    }

    /// The error of a gRPC status (code and message; the retry delay of its
    /// `RetryInfo` detail, if any).
    pub fn from_status(status: &tonic::Status) -> Self {
        let (http, code) = http_of(status.code());
        Self {
            status: http,
            code,
            message: status.message().to_owned(),
            retry_after: status.get_details_retry_info().and_then(|r| r.retry_delay),
        }
    }

    /// The response: the JSON body, and `Retry-After` (whole seconds,
    /// rounded up) when known.
    pub fn response(&self) -> http::Response<super::Body> {
        let body = ErrorBody {
            status: self.status.as_u16(),
            code: self.code.to_owned(),
            message: self.message.clone(),
        };
        let mut response = super::json_response(self.status, &body);
        if let Some(after) = self.retry_after {
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        response
    }
}

impl From<ApiError> for RestError {
    /// Through the gRPC status, so that both faces answer (and log) alike.
    fn from(e: ApiError) -> Self {
        Self::from_status(&tonic::Status::from(e))
    }
}

/// The HTTP status and CAMARA code of a gRPC code (CAMARA's Commonalities
/// name its codes after gRPC's).
pub fn http_of(code: Code) -> (StatusCode, &'static str) {
    match code {
        Code::InvalidArgument => (StatusCode::BAD_REQUEST, "INVALID_ARGUMENT"),
        Code::OutOfRange => (StatusCode::BAD_REQUEST, "OUT_OF_RANGE"),
        Code::FailedPrecondition => (StatusCode::BAD_REQUEST, "FAILED_PRECONDITION"),
        Code::Unauthenticated => (StatusCode::UNAUTHORIZED, "UNAUTHENTICATED"),
        Code::PermissionDenied => (StatusCode::FORBIDDEN, "PERMISSION_DENIED"),
        Code::NotFound => (StatusCode::NOT_FOUND, "NOT_FOUND"),
        Code::Aborted => (StatusCode::CONFLICT, "ABORTED"),
        Code::AlreadyExists => (StatusCode::CONFLICT, "ALREADY_EXISTS"),
        Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "TOO_MANY_REQUESTS"),
        Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
        Code::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "TIMEOUT"),
        Code::Unimplemented => (StatusCode::NOT_IMPLEMENTED, "NOT_IMPLEMENTED"),
        Code::Ok | Code::Cancelled | Code::Unknown | Code::Internal | Code::DataLoss => {
            (StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_errors_carry_retry_after() {
        let exceeded = crate::quota::QuotaExceeded {
            kind: crate::quota::QuotaKind::Rate,
            retry_after: Duration::from_millis(1200),
        };
        let e = RestError::from(ApiError::Quota(exceeded));
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(e.code, "TOO_MANY_REQUESTS");
        let response = e.response();
        assert_eq!(response.headers()[http::header::RETRY_AFTER], "2");
    }

    #[test]
    fn client_codes_are_never_500() {
        for code in [
            Code::InvalidArgument,
            Code::OutOfRange,
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::ResourceExhausted,
            Code::Unavailable,
        ] {
            assert!(http_of(code).0.is_client_error() || http_of(code).0 == StatusCode::SERVICE_UNAVAILABLE);
        }
    }
}
