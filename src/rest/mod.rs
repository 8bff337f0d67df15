//! The REST face: CAMARA Number Recycling v0.2.0 (`POST
//! /number-recycling/v0.2/check`), a JSON batch route for hygiene jobs
//! (`POST /v1/numbers:batchCheck`) and the OpenAPI document of both (`GET
//! /openapi.yaml`, the file `proto/openapi/reassigned-rest.yaml`).
//!
//! The handlers call the service paths the gRPC handlers call
//! ([`ReassignedService::check_one`], [`ReassignedService::check_batch`]):
//! the same answer rule, quotas, receipts and audit trail. Transport (the
//! listener, mutual TLS, HTTP/1.1 and HTTP/2) is the server's
//! (`server::rest_port`); it puts the connection's [`PeerInfo`] in every
//! request's extensions and hands the request to [`RestFace::handle`].
//! Identity comes from that peer (the same certificate-identity rule as
//! gRPC), tokens from a [`TokenCheck`] (the server's verifier).

mod batch;
mod check;
pub mod error;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use http_body_util::BodyExt as _;

pub use batch::{BatchAnswer, BatchBody, BatchError, BatchItem, BatchResponse, BatchResult};
pub use check::{CheckBody, CheckResult};
pub use error::{ErrorBody, RestError};

use crate::api::ServedStore;
use crate::api::note::CallNote;
use crate::api::{CallInfo, ReassignedService};
use crate::identity::{PeerInfo, Platform, Principal, Scope, Scopes};

/// The CAMARA check.
pub const CHECK_PATH: &str = "/number-recycling/v0.2/check";
/// The JSON batch (BatchCheckNumbers in JSON).
pub const BATCH_PATH: &str = "/v1/numbers:batchCheck";
/// The OpenAPI document.
pub const OPENAPI_PATH: &str = "/openapi.yaml";
/// The OpenAPI 3 document of everything this face serves.
pub const OPENAPI_YAML: &str = include_str!("../../proto/openapi/reassigned-rest.yaml");
/// CAMARA's scope of the check, granted as `numbers:check` is.
pub const CAMARA_CHECK_SCOPE: &str = "number-recycling:check";
/// CAMARA's correlation header, echoed on every response.
pub const CORRELATOR_HEADER: &str = "x-correlator";
/// Longest `x-correlator` (CAMARA's pattern `^[a-zA-Z0-9-_:;.\/<>{}]{0,256}$`).
const MAX_CORRELATOR: usize = 256;

/// The routes of this face, as metrics and the access log name them (the
/// path templates); any other path is [`OTHER_ROUTE`].
pub const ROUTES: [&str; 3] = [CHECK_PATH, BATCH_PATH, OPENAPI_PATH];
/// The route label of a path this face does not serve (404).
pub const OTHER_ROUTE: &str = "other";

/// The index in [`ROUTES`] of `path`, or `ROUTES.len()` for any other path
/// (a bounded label set whatever clients send).
pub fn route_index(path: &str) -> usize {
    ROUTES.iter().position(|r| *r == path).unwrap_or(ROUTES.len())
}

/// The route label of [`route_index`]'s `index`.
pub fn route_label(index: usize) -> &'static str {
    ROUTES.get(index).copied().unwrap_or(OTHER_ROUTE)
}

/// The body type of every response of this face.
pub type Body = http_body_util::Full<Bytes>;

/// How the REST face checks bearer tokens: the server's verifier (the same
/// certificate-bound tokens as gRPC).
pub trait TokenCheck: Send + Sync {
    /// The scopes granted by the `authorization` header to `platform` on
    /// the connection of `peer`, or why not (a message naming no token).
    fn scopes(
        &self,
        authorization: Option<&[u8]>,
        peer: &PeerInfo,
        platform: &Platform,
    ) -> Result<Scopes, String>;
}

/// The REST face over a [`ReassignedService`].
#[derive(Clone)]
pub struct RestFace {
    service: ReassignedService<ServedStore>,
    tokens: Option<Arc<dyn TokenCheck>>,
    max_body: usize,
    timeout: Duration,
}

/// The routes that need a caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Check,
    Batch,
}

impl RestFace {
    /// A face answering with `service`; `tokens` `None` serves with mTLS
    /// alone; request bodies over `max_body` bytes are refused (413) without
    /// being read whole; a call taking longer than `timeout` answers 504.
    pub fn new(
        service: ReassignedService<ServedStore>,
        tokens: Option<Arc<dyn TokenCheck>>,
        max_body: usize,
        timeout: Duration,
    ) -> Self {
        Self {
            service,
            tokens,
            max_body,
            timeout,
        }
    }

    /// Answers one request: the connection's [`PeerInfo`] is in its
    /// extensions. Never fails: every refusal is a CAMARA error body, and
    /// the `x-correlator` (if valid) is echoed.
    pub async fn handle<B>(&self, req: http::Request<B>) -> http::Response<Body>
    where
        B: http_body::Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let correlator = match correlator(req.headers()) {
            Ok(correlator) => correlator,
            Err(e) => return e.response(),
        };
        let answered = tokio::time::timeout(self.timeout, self.route(req, correlator.as_ref())).await;
        let mut response = match answered {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => e.response(),
            Err(_) => RestError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "TIMEOUT",
                "the call timed out; retry",
            )
            .response(),
        };
        if let Some(correlator) = correlator {
            response.headers_mut().insert(CORRELATOR_HEADER, correlator);
        }
        response
    }

    async fn route<B>(
        &self,
        req: http::Request<B>,
        correlator: Option<&HeaderValue>,
    ) -> Result<http::Response<Body>, RestError>
    where
        B: http_body::Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let route = match (req.method(), req.uri().path()) {
            (&Method::POST, CHECK_PATH) => Route::Check,
            (&Method::POST, BATCH_PATH) => Route::Batch,
            (&Method::GET, OPENAPI_PATH) => {
                let mut response = http::Response::new(Body::from(OPENAPI_YAML));
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/yaml"),
                );
                return Ok(response);
            }
            (_, path @ (CHECK_PATH | BATCH_PATH | OPENAPI_PATH)) => {
                let allow = if path == OPENAPI_PATH { "GET" } else { "POST" };
                let mut response = RestError::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "METHOD_NOT_ALLOWED",
                    format!("this path allows {allow} only"),
                )
                .response();
                response
                    .headers_mut()
                    .insert(http::header::ALLOW, HeaderValue::from_static(allow));
                return Ok(response);
            }
            _ => {
                return Err(RestError::new(
                    StatusCode::NOT_FOUND,
                    "NOT_FOUND",
                    "no such resource",
                ));
            }
        };
        let principal = self.authorize(&req, route).inspect_err(|e| {
            if let Some(suppressed) = crate::lograte::global().check("rest_request_refused") {
                tracing::info!(status = e.status.as_u16(), reason = %e.message, suppressed, "rest request refused");
            }
        })?;
        // The server's observation (access log, trace), when it is on.
        let note = req.extensions().get::<CallNote>().cloned();
        let json = read_json(req, self.max_body).await?;
        let request_id = correlator.and_then(|c| c.to_str().ok());
        let call = || CallInfo::new(Some(&principal), request_id);
        let note = note.as_ref();
        match route {
            Route::Check => check::check(&self.service, &principal, call, json, note).await,
            Route::Batch => batch::batch(&self.service, &principal, call, json, note).await,
        }
    }

    /// The caller of `req`, or 401/403 as the gRPC auth layer decides
    /// (`server::auth`): a platform identity from the client certificate,
    /// and with tokens a bearer token bound to it granting the route's scope.
    fn authorize<B>(&self, req: &http::Request<B>, route: Route) -> Result<Principal, RestError> {
        let unauthenticated =
            |message: String| RestError::new(StatusCode::UNAUTHORIZED, "UNAUTHENTICATED", message);
        let peer = req.extensions().get::<PeerInfo>();
        let Some((peer, platform)) = peer.and_then(|p| Some((p, p.platform.clone()?))) else {
            return Err(unauthenticated("client certificate required".into()));
        };
        let Some(tokens) = &self.tokens else {
            return Ok(Principal {
                platform,
                scopes: None,
            });
        };
        let header = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .map(HeaderValue::as_bytes);
        let scopes = tokens.scopes(header, peer, &platform).map_err(unauthenticated)?;
        let granted = match route {
            Route::Check => scopes.grants(Scope::NumbersCheck) || scopes.contains(CAMARA_CHECK_SCOPE),
            Route::Batch => scopes.grants(Scope::NumbersBatch),
        };
        if !granted {
            let needed = match route {
                Route::Check => format!("missing scope {} (or {CAMARA_CHECK_SCOPE})", Scope::NumbersCheck),
                Route::Batch => format!("missing scope {}", Scope::NumbersBatch),
            };
            return Err(RestError::new(StatusCode::FORBIDDEN, "PERMISSION_DENIED", needed));
        }
        Ok(Principal {
            platform,
            scopes: Some(scopes),
        })
    }
}

/// The request's `x-correlator`, if any, checked against CAMARA's pattern.
fn correlator(headers: &HeaderMap) -> Result<Option<HeaderValue>, RestError> {
    let Some(value) = headers.get(CORRELATOR_HEADER) else {
        return Ok(None);
    };
    let ok = value.len() <= MAX_CORRELATOR
        && value
            .as_bytes()
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_:;./<>{}".contains(b));
    if ok {
        Ok(Some(value.clone()))
    } else {
        Err(RestError::invalid(
            "x-correlator must match ^[a-zA-Z0-9-_:;.\\/<>{}]{0,256}$",
        ))
    }
}

/// The JSON body of `req`: `content-type: application/json` required, at
/// most `max` bytes (a larger `content-length` is refused before reading;
/// a body that grows past it while read is refused there).
async fn read_json<B>(req: http::Request<B>, max: usize) -> Result<serde_json::Value, RestError>
where
    B: http_body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let content_type = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    if !essence.eq_ignore_ascii_case("application/json") {
        return Err(RestError::invalid("content-type must be application/json"));
    }
    let too_large = || {
        RestError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
            format!("the request body exceeds {max} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max as u64) {
        return Err(too_large());
    }
    let body = http_body_util::Limited::new(req.into_body(), max)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                too_large()
            } else {
                RestError::invalid(format!("cannot read the request body: {e}"))
            }
        })?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| RestError::invalid(format!("the body is not valid JSON: {e}")))
}

/// A JSON response with `status`.
pub(crate) fn json_response(status: StatusCode, body: &impl serde::Serialize) -> http::Response<Body> {
    // Serialising these plain structs cannot fail; an empty object if it did.
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = http::Response::new(Body::from(bytes));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// The body's `field` as a string: `Ok(None)` if absent or null, an error
/// if another type.
fn string_field(json: &serde_json::Value, field: &str) -> Result<Option<String>, RestError> {
    match json.get(field) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(RestError::invalid(format!("{field} must be a string"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn correlators_follow_camaras_pattern() {
        let mut headers = HeaderMap::new();
        assert_eq!(correlator(&headers), Ok(None));
        headers.insert(
            CORRELATOR_HEADER,
            HeaderValue::from_static("b4333c46-49c0:x;y/z<{}>._"),
        );
        assert!(correlator(&headers).expect("valid").is_some());
        for bad in ["has space", "a,b", "q?", &"x".repeat(257)] {
            headers.insert(CORRELATOR_HEADER, HeaderValue::from_str(bad).expect("header"));
            let e = correlator(&headers).expect_err(bad);
            assert_eq!((e.status, e.code), (StatusCode::BAD_REQUEST, "INVALID_ARGUMENT"));
        }
    }

    #[test]
    fn routes_are_a_bounded_label_set() {
        assert_eq!(route_label(route_index(CHECK_PATH)), CHECK_PATH);
        assert_eq!(route_label(route_index(BATCH_PATH)), BATCH_PATH);
        assert_eq!(route_index("/number-recycling/v0.2/check/"), ROUTES.len());
        assert_eq!(route_label(route_index("/anything/else")), OTHER_ROUTE);
    }

    #[test]
    fn the_openapi_document_names_every_route() {
        for path in [CHECK_PATH, BATCH_PATH, OPENAPI_PATH] {
            assert!(OPENAPI_YAML.contains(&format!("  {path}:")), "{path}");
        }
    }
}
