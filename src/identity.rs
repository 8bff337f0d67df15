//! Who is calling: the [`Platform`] named by a client certificate (the
//! certificate-identity rule), the connection's [`PeerInfo`], the [`Scopes`]
//! a bearer token grants, and the [`Principal`] of one request.
//!
//! Plain data and one rule, no transport: the TLS acceptor (`server::tls`)
//! computes a [`PeerInfo`] per connection, the token verifier
//! (`server::token`) checks tokens against it, the auth layer
//! (`server::auth`) turns it into a [`Principal`], and the handlers (`api`)
//! read the [`Principal`]. This module imports nothing else of the crate.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};
use x509_parser::extensions::GeneralName;

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

    /// The RFC 8705 thumbprint of the client certificate: base64url (no
    /// padding) SHA-256 of its DER, as in a token's `cnf["x5t#S256"]`.
    pub fn cert_thumbprint(&self) -> String {
        cert_thumbprint(&self.cert_sha256)
    }
}

/// The RFC 8705 thumbprint (`x5t#S256`) of a certificate whose DER has this
/// SHA-256: base64url without padding.
pub fn cert_thumbprint(sha256: &[u8; 32]) -> String {
    URL_SAFE_NO_PAD.encode(sha256)
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

/// A permission a bearer token can grant, named in its `scope` claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// `numbers:check`: single checks.
    NumbersCheck,
    /// `numbers:batch`: batches and streams of checks.
    NumbersBatch,
    /// `mirror:read`: the mirror's status.
    MirrorRead,
    /// `register:write`: an operator publishes and retracts disconnections.
    RegisterWrite,
    /// `watch:write`: a platform adds numbers to and removes them from its
    /// watch list.
    WatchWrite,
    /// `watch:read`: a platform counts its watch list and streams its events.
    WatchRead,
}

impl Scope {
    /// Every scope.
    pub const ALL: [Scope; 6] = [
        Scope::NumbersCheck,
        Scope::NumbersBatch,
        Scope::MirrorRead,
        Scope::RegisterWrite,
        Scope::WatchWrite,
        Scope::WatchRead,
    ];

    /// The scope's name in a token's `scope` claim.
    pub const fn as_str(self) -> &'static str {
        match self {
            Scope::NumbersCheck => "numbers:check",
            Scope::NumbersBatch => "numbers:batch",
            Scope::MirrorRead => "mirror:read",
            Scope::RegisterWrite => "register:write",
            Scope::WatchWrite => "watch:write",
            Scope::WatchRead => "watch:read",
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The scope names as strings (as written in a token's `scope` claim).
/// Which method needs which scope: `api::methods`.
pub mod scope {
    use super::Scope;

    /// `CheckNumber`.
    pub const CHECK: &str = Scope::NumbersCheck.as_str();
    /// `BatchCheckNumbers` and `StreamCheckNumbers`.
    pub const BATCH: &str = Scope::NumbersBatch.as_str();
    /// `GetMirrorStatus`.
    pub const MIRROR_READ: &str = Scope::MirrorRead.as_str();
    /// `PublishDisconnections` and `RetractDisconnection`.
    pub const REGISTER_WRITE: &str = Scope::RegisterWrite.as_str();
    /// `AddWatches` and `RemoveWatches`.
    pub const WATCH_WRITE: &str = Scope::WatchWrite.as_str();
    /// `CountWatches` and `WatchDisconnections`.
    pub const WATCH_READ: &str = Scope::WatchRead.as_str();
    /// Every scope, space separated (as in a token's `scope` claim).
    pub const ALL: &str = "numbers:check numbers:batch mirror:read register:write watch:write watch:read";
}

/// The scopes granted by a verified token.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scopes(Arc<[Box<str>]>);

impl Scopes {
    /// Parses a space-separated `scope` claim.
    pub fn parse(claim: &str) -> Self {
        Self(claim.split_ascii_whitespace().map(Box::from).collect())
    }

    /// Whether `scope` is granted.
    pub fn contains(&self, scope: &str) -> bool {
        self.0.iter().any(|s| &**s == scope)
    }

    /// Whether `scope` is granted.
    pub fn grants(&self, scope: Scope) -> bool {
        self.contains(scope.as_str())
    }

    /// The granted scopes.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|s| &**s)
    }
}

/// What a verified bearer token says about its caller, minus what must be
/// checked again on every call (expiry, certificate binding, subject: see
/// `server::token`).
#[derive(Debug)]
pub struct VerifiedToken {
    /// `sub`: the platform the token was issued to.
    pub sub: String,
    /// `cnf` `x5t#S256`, decoded; `None` if absent or not base64url.
    pub bound: Option<Vec<u8>>,
    /// `exp`, seconds since the epoch.
    pub exp: f64,
    /// `scope`.
    pub scopes: Scopes,
}

/// The last bearer token verified on one connection: its bytes, the
/// generation of the key set that verified it, and what it says.
#[derive(Debug)]
pub struct RememberedToken {
    /// The `authorization` value as sent (`Bearer <token>`), byte for byte:
    /// the same value again needs no parsing, no UTF-8 check, no hash.
    pub authorization: Box<[u8]>,
    /// The key set generation it was verified with (a key reload forgets it).
    pub generation: u64,
    /// Its verified claims.
    pub verified: Arc<VerifiedToken>,
}

/// Per-connection memory of the last verified token. Platforms send the same
/// token on every call of a connection: comparing its bytes is cheaper than
/// hashing it for the verifier's shared cache.
#[derive(Debug, Default)]
pub struct TokenMemo(ArcSwapOption<RememberedToken>);

impl TokenMemo {
    /// The remembered token, if any: a guard, so that the calls of one
    /// connection read it without touching its reference count.
    pub fn get(&self) -> arc_swap::Guard<Option<Arc<RememberedToken>>> {
        self.0.load()
    }

    /// Remembers `token` (replacing the one before).
    pub fn set(&self, token: RememberedToken) {
        self.0.store(Some(Arc::new(token)));
    }
}

/// Who is on the other end of a connection, computed once at handshake time.
///
/// Tonic inserts a clone into every request's extensions (see
/// `tonic::transport::server::Connected`); the auth layer reads it from there.
/// Clones share the connection's [`TokenMemo`].
#[derive(Debug, Clone, Default)]
pub struct PeerInfo {
    /// The client's address.
    pub remote_addr: Option<SocketAddr>,
    /// Our address on this connection.
    pub local_addr: Option<SocketAddr>,
    /// The platform named by the client certificate, if it names one.
    pub platform: Option<Arc<Platform>>,
    /// The last bearer token verified on this connection.
    pub token_memo: Arc<TokenMemo>,
    /// Told when a call starts and ends on this connection (the server's
    /// revocation tracking); `None` when nothing tracks the connection.
    pub calls: Option<Arc<dyn CallHook>>,
}

/// Per-connection bookkeeping of calls in flight, set once at handshake
/// time so that each call reaches it without a shared lookup.
pub trait CallHook: Send + Sync + std::fmt::Debug {
    /// A call started on the connection.
    fn call_started(&self);
    /// A call on the connection ended (its response body ended or was
    /// dropped).
    fn call_ended(&self);
}

/// The authenticated caller of one request, found in the request extensions
/// of every request that passed the auth layer.
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
        self.platform.cert_thumbprint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_not_a_certificate() {
        assert!(matches!(
            platform_from_cert(b"not a certificate"),
            Err(CertIdentityError::Parse(_))
        ));
    }

    #[test]
    fn scope_names() {
        let all = Scopes::parse(scope::ALL);
        for s in Scope::ALL {
            assert!(all.grants(s), "{s}");
        }
        assert_eq!(Scope::ALL.map(Scope::as_str).join(" "), scope::ALL);
        assert!(!Scopes::parse("numbers:checks").grants(Scope::NumbersCheck));
    }
}
