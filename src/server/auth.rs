//! The authentication layer.
//!
//! The TLS acceptor ([`crate::server::tls`]) verifies the client certificate
//! during the handshake and derives the caller's [`Platform`] once per
//! connection (the rule: [`crate::identity::platform_from_cert`]). [`AuthLayer`] then turns that connection identity into a
//! [`Principal`] in each request's extensions, or answers `UNAUTHENTICATED`
//! before the request reaches a handler.
//!
//! With a [`TokenVerifier`] the layer also requires, on every call but
//! health and reflection, a bearer token bound to the connection's client
//! certificate (RFC 8705, see [`crate::server::token`]) that grants the
//! method's scope: a missing or bad token is `UNAUTHENTICATED`, a valid token
//! without the scope `PERMISSION_DENIED`. Scopes come from the one method
//! table, [`crate::api::methods`]; a path that is neither in it nor health or
//! reflection is refused with `UNIMPLEMENTED` before any handler runs (fail
//! closed: an RPC nobody listed gets no free pass).
//!
//! `UNAUTHENTICATED` ("who are you?") and `PERMISSION_DENIED` ("you may not do
//! this") stay distinct: see [`AuthError`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use futures_util::future::{Either, Ready, ready};
use http::{Request, Response};
use tonic::transport::server::TcpConnectInfo;
use tower::{Layer, Service};
use tracing::Instrument;
use tracing::instrument::Instrumented;

use crate::api::methods::{Access, Route, route};
use crate::identity::{PeerInfo, Platform, Principal, Scope, Scopes};
use crate::server::token::{TokenError, TokenVerifier};

/// Why a request is refused. Each variant maps to exactly one gRPC status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The caller is not identified: no platform identity on the connection.
    #[error("client certificate required")]
    NoCertificate,
    /// The bearer token is missing or not valid for this connection.
    #[error("{0}")]
    Token(TokenError),
    /// The token is valid but does not grant the method's scope.
    #[error("missing scope {0}")]
    MissingScope(Scope),
    /// The path is no method of this server (not in the method table, not
    /// health or reflection).
    #[error("unknown method")]
    UnknownMethod,
}

/// The `reason` label of every refusal the auth layer counts, in the
/// order of [`AuthError::label_index`].
pub const REFUSAL_REASONS: [&str; 18] = [
    "no_certificate",
    "unknown_method",
    "missing_scope",
    "token_missing",
    "token_not_bearer",
    "token_malformed",
    "token_unknown_key",
    "token_wrong_algorithm",
    "token_bad_signature",
    "token_expired",
    "token_too_long",
    "token_not_yet_valid",
    "token_wrong_issuer",
    "token_wrong_audience",
    "token_missing_claim",
    "token_unbound",
    "token_wrong_certificate",
    "token_wrong_subject",
];

impl AuthError {
    /// The index of this refusal's label in [`REFUSAL_REASONS`]
    /// (exhaustive: a new variant needs a label).
    pub fn label_index(&self) -> usize {
        match self {
            AuthError::NoCertificate => 0,
            AuthError::UnknownMethod => 1,
            AuthError::MissingScope(_) => 2,
            AuthError::Token(t) => match t {
                TokenError::Missing => 3,
                TokenError::NotBearer => 4,
                TokenError::Malformed => 5,
                TokenError::UnknownKey => 6,
                TokenError::WrongAlgorithm => 7,
                TokenError::BadSignature => 8,
                TokenError::Expired => 9,
                TokenError::TooLong(_) => 10,
                TokenError::NotYetValid => 11,
                TokenError::WrongIssuer => 12,
                TokenError::WrongAudience => 13,
                TokenError::MissingClaim(_) => 14,
                TokenError::Unbound => 15,
                TokenError::WrongCertificate => 16,
                TokenError::WrongSubject => 17,
            },
        }
    }
}

/// Calls the auth layer refused, by reason ([`REFUSAL_REASONS`]).
#[derive(Debug, Default)]
pub struct RefusalStats {
    by_reason: [AtomicU64; REFUSAL_REASONS.len()],
}

impl RefusalStats {
    fn count(&self, err: &AuthError) {
        self.by_reason[err.label_index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Refusals with the label `REFUSAL_REASONS[index]`.
    pub fn refused(&self, index: usize) -> u64 {
        self.by_reason.get(index).map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

impl From<AuthError> for tonic::Status {
    fn from(err: AuthError) -> Self {
        let message = err.to_string();
        match err {
            AuthError::NoCertificate | AuthError::Token(_) => tonic::Status::unauthenticated(message),
            AuthError::MissingScope(_) => tonic::Status::permission_denied(message),
            AuthError::UnknownMethod => tonic::Status::unimplemented(message),
        }
    }
}

/// Tower layer that authenticates every request from the connection's
/// [`PeerInfo`] and, when it has a [`TokenVerifier`], the call's bearer
/// token. See [`Auth`].
#[derive(Debug, Clone, Default)]
pub struct AuthLayer {
    tokens: Option<Arc<TokenVerifier>>,
    refusals: Arc<RefusalStats>,
}

impl AuthLayer {
    /// An authentication layer without tokens: the client certificate alone
    /// identifies the caller (mTLS only).
    pub fn new() -> Self {
        Self::default()
    }

    /// An authentication layer that also requires bearer tokens when
    /// `tokens` is `Some`.
    pub fn with_tokens(tokens: Option<Arc<TokenVerifier>>) -> Self {
        Self {
            tokens,
            refusals: Arc::default(),
        }
    }

    /// Counts the refusals into `refusals` (the metrics' handle).
    pub fn counting(mut self, refusals: Arc<RefusalStats>) -> Self {
        self.refusals = refusals;
        self
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            tokens: self.tokens.clone(),
            refusals: self.refusals.clone(),
        }
    }
}

/// The service made by [`AuthLayer`].
///
/// For each request it reads the [`PeerInfo`] that the TLS acceptor attached
/// to the connection. With a platform identity it inserts a [`Principal`]
/// (and a [`TcpConnectInfo`], so `tonic::Request::remote_addr` keeps working)
/// and runs the inner call inside a `request` span carrying the platform id
/// and the gRPC method. Without one it answers `UNAUTHENTICATED` at once,
/// except for the health and reflection services. With a [`TokenVerifier`]
/// it checks the bearer token and the method's scope before the handler
/// runs; the refusal names the reason, never the token.
#[derive(Debug, Clone)]
pub struct Auth<S> {
    inner: S,
    tokens: Option<Arc<TokenVerifier>>,
    refusals: Arc<RefusalStats>,
}

impl<S> Auth<S> {
    /// The scopes of the call, or why it is refused.
    fn authorize<B>(
        &self,
        req: &Request<B>,
        peer: &PeerInfo,
        platform: &Platform,
        access: Access,
    ) -> Result<Option<Scopes>, AuthError> {
        let Some(tokens) = &self.tokens else {
            return Ok(None);
        };
        let header = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        let scopes = tokens
            .verify_on_connection(header, platform, &peer.token_memo)
            .map_err(AuthError::Token)?;
        match access {
            Access::Scope(needed) if !scopes.grants(needed) => Err(AuthError::MissingScope(needed)),
            Access::Scope(_) | Access::AnyToken => Ok(Some(scopes)),
        }
    }
}

impl<S, B, ResBody> Service<Request<B>> for Auth<S>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    ResBody: Default,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = Either<Instrumented<S::Future>, Ready<Result<Response<ResBody>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let path = req.uri().path();
        let span = tracing::info_span!(
            "request",
            platform = tracing::field::Empty,
            method = %path
        );
        let route = route(path);
        let exempt = route == Route::Exempt;

        // Read from the connection's PeerInfo in place (no clone of its
        // shared handles per call): its addresses, and the platform with
        // the call's scopes or the reason to refuse it.
        let (addrs, identified) = match req.extensions().get::<PeerInfo>() {
            Some(peer) => {
                let addrs = TcpConnectInfo {
                    local_addr: peer.local_addr,
                    remote_addr: peer.remote_addr,
                };
                let identified = peer.platform.as_ref().map(|platform| {
                    let authorized = match route {
                        Route::Exempt => Ok(None),
                        Route::Unknown => Err(AuthError::UnknownMethod),
                        Route::Api(method) => self.authorize(&req, peer, platform, method.access),
                    };
                    (platform.clone(), authorized)
                });
                (Some(addrs), identified)
            }
            None => (None, None),
        };
        if let Some(addrs) = addrs {
            req.extensions_mut().insert(addrs);
        }
        match identified {
            Some((platform, authorized)) => {
                span.record("platform", tracing::field::display(&platform.id));
                let scopes = match authorized {
                    Ok(scopes) => scopes,
                    Err(err) => {
                        self.refusals.count(&err);
                        if let Some(suppressed) = crate::lograte::global().check("request_refused") {
                            span.in_scope(|| tracing::info!(reason = %err, suppressed, "request refused"));
                        }
                        return Either::Right(ready(Ok(tonic::Status::from(err).into_http())));
                    }
                };
                req.extensions_mut().insert(Principal { platform, scopes });
            }
            None if exempt => {}
            None => {
                span.in_scope(|| {
                    tracing::debug!("rejected request without a client platform identity");
                });
                self.refusals.count(&AuthError::NoCertificate);
                let status = tonic::Status::from(AuthError::NoCertificate);
                return Either::Right(ready(Ok(status.into_http())));
            }
        }
        Either::Left(self.inner.call(req).instrument(span))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn statuses_stay_distinct() {
        assert_eq!(
            tonic::Status::from(AuthError::NoCertificate).code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            tonic::Status::from(AuthError::Token(TokenError::Expired)).code(),
            tonic::Code::Unauthenticated
        );
        let denied = tonic::Status::from(AuthError::MissingScope(Scope::NumbersBatch));
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert_eq!(denied.message(), "missing scope numbers:batch");
        assert_eq!(
            tonic::Status::from(AuthError::UnknownMethod).code(),
            tonic::Code::Unimplemented
        );
    }

    use std::convert::Infallible;

    use tower::ServiceExt as _;

    /// Inner service answering 200 with the caller's platform id in a header.
    async fn echo_principal(req: Request<()>) -> Result<Response<tonic::body::Body>, Infallible> {
        let mut response = Response::new(tonic::body::Body::default());
        if let Some(principal) = req.extensions().get::<Principal>() {
            let id = http::HeaderValue::from_str(&principal.platform.id).unwrap();
            response.headers_mut().insert("x-platform", id);
        }
        Ok(response)
    }

    fn request(path: &str, peer: Option<PeerInfo>) -> Request<()> {
        let mut req = Request::builder().uri(path).body(()).unwrap();
        if let Some(peer) = peer {
            req.extensions_mut().insert(peer);
        }
        req
    }

    fn peer(platform: Option<&str>) -> PeerInfo {
        PeerInfo {
            remote_addr: Some(([127, 0, 0, 1], 40000).into()),
            local_addr: None,
            platform: platform.map(|id| {
                Arc::new(Platform {
                    id: id.to_owned(),
                    cert_sha256: [7; 32],
                })
            }),
            token_memo: Arc::default(),
            calls: None,
        }
    }

    fn grpc_status(response: &Response<tonic::body::Body>) -> Option<&str> {
        response
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
    }

    #[tokio::test]
    async fn platform_becomes_principal() {
        let svc = AuthLayer::new().layer(tower::service_fn(echo_principal));
        let response = svc
            .oneshot(request(
                "/reassigned.v1.ReassignedNumbers/CheckNumber",
                Some(peer(Some("platform-a"))),
            ))
            .await
            .unwrap();
        assert_eq!(response.headers()["x-platform"], "platform-a");
        assert_eq!(grpc_status(&response), None);
    }

    #[tokio::test]
    async fn no_platform_is_unauthenticated() {
        for peer in [None, Some(peer(None))] {
            let svc = AuthLayer::new().layer(tower::service_fn(echo_principal));
            let response = svc
                .oneshot(request("/reassigned.v1.ReassignedNumbers/CheckNumber", peer))
                .await
                .unwrap();
            assert_eq!(grpc_status(&response), Some("16"));
            assert!(response.headers().get("x-platform").is_none());
        }
    }

    #[tokio::test]
    async fn health_and_reflection_are_exempt() {
        for path in [
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ] {
            let svc = AuthLayer::new().layer(tower::service_fn(echo_principal));
            let response = svc.oneshot(request(path, None)).await.unwrap();
            assert_eq!(grpc_status(&response), None, "{path}");
        }
        // A look-alike path is not exempt.
        let svc = AuthLayer::new().layer(tower::service_fn(echo_principal));
        let response = svc
            .oneshot(request("/grpc.health.v1.HealthX/Check", None))
            .await
            .unwrap();
        assert_eq!(grpc_status(&response), Some("16"));
    }

    /// A path outside the method table (say a new RPC nobody gave a scope)
    /// is refused by the layer itself: the inner service never runs, with
    /// or without tokens. Health and reflection stay open.
    #[tokio::test]
    async fn unknown_methods_are_refused_before_the_handler() {
        for path in [
            "/reassigned.v1.ReassignedNumbers/DeleteEverything",
            "/reassigned.v1.Admin/Wipe",
            "/other.Service/Method",
            "/",
        ] {
            let svc = AuthLayer::new().layer(tower::service_fn(echo_principal));
            let response = svc
                .oneshot(request(path, Some(peer(Some("platform-a")))))
                .await
                .unwrap();
            assert_eq!(grpc_status(&response), Some("12"), "{path}");
            assert!(
                response.headers().get("x-platform").is_none(),
                "{path} reached the handler"
            );
        }
        for method in &crate::api::methods::METHODS {
            let svc = AuthLayer::new().layer(tower::service_fn(echo_principal));
            let response = svc
                .oneshot(request(method.path, Some(peer(Some("platform-a")))))
                .await
                .unwrap();
            assert_eq!(grpc_status(&response), None, "{}", method.path);
        }
    }
}
