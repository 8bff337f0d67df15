//! Platform identity and the authentication layer.
//!
//! The TLS acceptor ([`crate::server::tls`]) verifies the client certificate
//! during the handshake and derives the caller's [`Platform`] once per
//! connection. [`AuthLayer`] then turns that connection identity into a
//! [`Principal`] in each request's extensions, or answers `UNAUTHENTICATED`
//! before the request reaches a handler.
//!
//! With a [`TokenVerifier`] the layer also requires, on every call but
//! health and reflection, a bearer token bound to the connection's client
//! certificate (RFC 8705, see [`crate::server::token`]) that grants the
//! method's scope: a missing or bad token is `UNAUTHENTICATED`, a valid token
//! without the scope `PERMISSION_DENIED`.
//!
//! `UNAUTHENTICATED` ("who are you?") and `PERMISSION_DENIED` ("you may not do
//! this") stay distinct: see [`AuthError`].

use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::{Either, Ready, ready};
use http::{Request, Response};
use sha2::{Digest, Sha256};
use tonic::transport::server::TcpConnectInfo;
use tower::{Layer, Service};
use tracing::Instrument;
use tracing::instrument::Instrumented;
use x509_parser::extensions::GeneralName;

use crate::server::tls::PeerInfo;
use crate::server::token::{Scopes, TokenError, TokenVerifier, scope};

/// gRPC path prefixes that may be called without a platform identity.
///
/// They still need a completed TLS handshake, and the handshake already
/// requires a client certificate signed by a trusted CA.
const EXEMPT_PREFIXES: &[&str] = &["/grpc.health.v1.Health/", "/grpc.reflection."];

/// The calling platform, as named by its client certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Platform {
    /// The platform identifier: the first URI SAN, else the first DNS SAN,
    /// else the subject common name of the leaf certificate.
    pub id: String,
    /// SHA-256 over the DER of the leaf certificate (for RFC 8705 token
    /// binding and for logs that must tell two certificates apart).
    pub cert_sha256: [u8; 32],
}

impl Platform {
    /// The certificate fingerprint as lowercase hex.
    pub fn cert_sha256_hex(&self) -> String {
        hex::encode(self.cert_sha256)
    }
}

/// Why no platform identity could be read from a certificate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertIdentityError {
    /// The bytes are not a DER X.509 certificate.
    #[error("cannot parse the client certificate: {0}")]
    Parse(String),
    /// The certificate has an unreadable subject alternative name extension.
    #[error("cannot read the subject alternative names: {0}")]
    SubjectAltName(String),
    /// The certificate carries no URI SAN, no DNS SAN and no subject CN.
    #[error("the certificate names no URI SAN, DNS SAN or subject common name")]
    NoIdentity,
}

/// Derive the [`Platform`] from a leaf certificate in DER.
///
/// The id is the first URI SAN, else the first DNS SAN, else the subject
/// common name. Empty names are skipped.
pub fn platform_from_cert(der: &[u8]) -> Result<Platform, CertIdentityError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|err| CertIdentityError::Parse(err.to_string()))?;

    let sans: Vec<&GeneralName<'_>> = cert
        .subject_alternative_name()
        .map_err(|err| CertIdentityError::SubjectAltName(err.to_string()))?
        .map(|ext| ext.value.general_names.iter().collect())
        .unwrap_or_default();
    let uri = sans.iter().find_map(|name| match name {
        GeneralName::URI(uri) if !uri.is_empty() => Some(*uri),
        _ => None,
    });
    let dns = || {
        sans.iter().find_map(|name| match name {
            GeneralName::DNSName(dns) if !dns.is_empty() => Some(*dns),
            _ => None,
        })
    };
    let cn = || {
        cert.subject()
            .iter_common_name()
            .find_map(|cn| cn.as_str().ok().filter(|cn| !cn.is_empty()))
    };
    let id = uri
        .or_else(dns)
        .or_else(cn)
        .ok_or(CertIdentityError::NoIdentity)?;

    Ok(Platform {
        id: id.to_owned(),
        cert_sha256: Sha256::digest(der).into(),
    })
}

/// The authenticated caller of one request, found in the request extensions
/// of every request that passed [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct Principal {
    /// The platform named by the client certificate of the connection.
    pub platform: Arc<Platform>,
    /// The scopes granted by the call's bearer token; `None` when the server
    /// runs without tokens (mTLS only) or for an exempt (health, reflection)
    /// call.
    pub scopes: Option<Scopes>,
}

impl Principal {
    /// The RFC 8705 thumbprint of the client certificate: base64url (no
    /// padding) SHA-256 of its DER, as in a token's `cnf["x5t#S256"]`.
    pub fn cert_thumbprint(&self) -> String {
        crate::server::token::Confirmation::for_cert_sha256(&self.platform.cert_sha256).x5t_s256
    }
}

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
    MissingScope(&'static str),
}

impl From<AuthError> for tonic::Status {
    fn from(err: AuthError) -> Self {
        let message = err.to_string();
        match err {
            AuthError::NoCertificate | AuthError::Token(_) => tonic::Status::unauthenticated(message),
            AuthError::MissingScope(_) => tonic::Status::permission_denied(message),
        }
    }
}

/// Tower layer that authenticates every request from the connection's
/// [`PeerInfo`] and, when it has a [`TokenVerifier`], the call's bearer
/// token. See [`Auth`].
#[derive(Debug, Clone, Default)]
pub struct AuthLayer {
    tokens: Option<Arc<TokenVerifier>>,
}

impl AuthLayer {
    /// An authentication layer without tokens: the client certificate alone
    /// identifies the caller (mTLS only).
    pub fn new() -> Self {
        Self { tokens: None }
    }

    /// An authentication layer that also requires bearer tokens when
    /// `tokens` is `Some`.
    pub fn with_tokens(tokens: Option<Arc<TokenVerifier>>) -> Self {
        Self { tokens }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            tokens: self.tokens.clone(),
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
}

impl<S> Auth<S> {
    /// The scopes of the call, or why it is refused.
    fn authorize<B>(
        &self,
        req: &Request<B>,
        platform: &Platform,
        needed: Option<&'static str>,
    ) -> Result<Option<Scopes>, AuthError> {
        let Some(tokens) = &self.tokens else {
            return Ok(None);
        };
        let header = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        let scopes = tokens.verify(header, platform).map_err(AuthError::Token)?;
        if let Some(needed) = needed
            && !scopes.contains(needed)
        {
            return Err(AuthError::MissingScope(needed));
        }
        Ok(Some(scopes))
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
        let exempt = EXEMPT_PREFIXES.iter().any(|prefix| path.starts_with(prefix));
        let needed = scope::required(path);

        let peer = req.extensions().get::<PeerInfo>().cloned();
        if let Some(peer) = &peer {
            req.extensions_mut().insert(TcpConnectInfo {
                local_addr: peer.local_addr,
                remote_addr: peer.remote_addr,
            });
        }
        match peer.and_then(|peer| peer.platform) {
            Some(platform) => {
                span.record("platform", tracing::field::display(&platform.id));
                let scopes = if exempt {
                    None
                } else {
                    match self.authorize(&req, &platform, needed) {
                        Ok(scopes) => scopes,
                        Err(err) => {
                            if let Some(suppressed) =
                                crate::server::lograte::global().check("request_refused")
                            {
                                span.in_scope(
                                    || tracing::info!(reason = %err, suppressed, "request refused"),
                                );
                            }
                            return Either::Right(ready(Ok(tonic::Status::from(err).into_http())));
                        }
                    }
                };
                req.extensions_mut().insert(Principal { platform, scopes });
            }
            None if exempt => {}
            None => {
                span.in_scope(|| {
                    tracing::debug!("rejected request without a client platform identity");
                });
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
        let denied = tonic::Status::from(AuthError::MissingScope(scope::BATCH));
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert_eq!(denied.message(), "missing scope numbers:batch");
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
                "/reassigned.v1.Lookup/Check",
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
                .oneshot(request("/reassigned.v1.Lookup/Check", peer))
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

    #[test]
    fn garbage_is_not_a_certificate() {
        assert!(matches!(
            platform_from_cert(b"not a certificate"),
            Err(CertIdentityError::Parse(_))
        ));
    }
}
