//! Certificate-bound bearer tokens (RFC 8705): the [`TokenVerifier`] that the
//! auth layer ([`crate::server::auth::AuthLayer`]) asks about every call.
//!
//! A platform sends `authorization: Bearer <JWT>`. The token must be signed
//! by a key of the configured JWKS file (ES256 or EdDSA, chosen by the
//! header's `kid`), carry `iss`, `aud`, `exp`, `nbf` and `sub`, name the
//! platform of the client certificate in `sub`, and be bound to that very
//! certificate: `cnf["x5t#S256"]` is the base64url (no padding) SHA-256 of
//! the certificate's DER. Its `scope` claim (space separated) says which
//! methods it may call.
//!
//! The keys live in an [`ArcSwap`]: [`TokenVerifier::reload`] re-reads the
//! JWKS file and swaps them in; a reload that fails keeps the old keys.
//!
//! A verified token is remembered twice: per connection (the connection's
//! [`TokenMemo`]: the same bytes again skip any hashing, see
//! [`TokenVerifier::verify_on_connection`]) and in a shared cache by SHA-256
//! (a new connection with a known token skips the signature). Both are
//! forgotten when the keys are reloaded; expiry, the certificate binding and
//! the subject are checked on every call.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::identity::{Platform, RememberedToken, Scopes, TokenMemo, VerifiedToken};

/// Seconds of clock skew allowed on `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 30;

/// The scope names, kept here too for code written against this path; they
/// live in [`crate::identity::scope`], and which method needs which in
/// [`crate::api::methods`].
pub use crate::identity::scope;

/// Where the verifier finds its keys and what it expects of a token (plain
/// data of the configuration), and the default token lifetime.
pub use crate::config::{DEFAULT_MAX_LIFETIME_SECS, TokenConfig};

/// The `cnf` (confirmation) claim of RFC 8705.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmation {
    /// base64url (no padding) SHA-256 of the DER client certificate.
    #[serde(rename = "x5t#S256")]
    pub x5t_s256: String,
}

impl Confirmation {
    /// The confirmation for a certificate whose DER has this SHA-256.
    pub fn for_cert_sha256(sha256: &[u8; 32]) -> Self {
        Self {
            x5t_s256: crate::identity::cert_thumbprint(sha256),
        }
    }
}

/// The claims of a platform token, as the issuer writes them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenClaims {
    /// Issuer.
    pub iss: String,
    /// Audience.
    pub aud: String,
    /// Subject: the platform id of the client certificate.
    pub sub: String,
    /// Issued at (seconds since the epoch).
    pub iat: u64,
    /// Not before (seconds since the epoch).
    pub nbf: u64,
    /// Expiry (seconds since the epoch).
    pub exp: u64,
    /// Granted scopes, space separated.
    pub scope: String,
    /// The certificate binding.
    pub cnf: Confirmation,
}

/// The claims the verifier reads itself (`iss`, `aud`, `exp` and `nbf` are
/// checked by `jsonwebtoken`'s [`Validation`]).
#[derive(Deserialize)]
struct ReadClaims {
    sub: String,
    exp: f64,
    #[serde(default)]
    iat: Option<f64>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    cnf: Option<Confirmation>,
}

/// Why a bearer token is refused. Every variant answers `UNAUTHENTICATED`
/// (see [`crate::server::auth::AuthError`]); the messages never contain the
/// token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// No `authorization` metadata.
    #[error("missing bearer token")]
    Missing,
    /// `authorization` is not `Bearer <token>`.
    #[error("authorization is not a bearer token")]
    NotBearer,
    /// Not a JWT, or its claims are not readable.
    #[error("malformed token")]
    Malformed,
    /// The header names no key, or a key the JWKS does not hold.
    #[error("token is signed by an unknown key")]
    UnknownKey,
    /// The header's algorithm is not the key's.
    #[error("token algorithm does not match its key")]
    WrongAlgorithm,
    /// The signature does not verify.
    #[error("token signature is invalid")]
    BadSignature,
    /// `exp` has passed.
    #[error("token expired")]
    Expired,
    /// `exp - iat` or `exp - now` is longer than the configured maximum
    /// lifetime (in seconds).
    #[error("token lifetime exceeds the maximum of {0} s")]
    TooLong(u64),
    /// `nbf` is still ahead.
    #[error("token not yet valid")]
    NotYetValid,
    /// `iss` is not the configured issuer.
    #[error("token has the wrong issuer")]
    WrongIssuer,
    /// `aud` is not the configured audience.
    #[error("token has the wrong audience")]
    WrongAudience,
    /// A required claim is absent.
    #[error("token lacks the {0} claim")]
    MissingClaim(&'static str),
    /// No `cnf` `x5t#S256` claim.
    #[error("token is not bound to a certificate")]
    Unbound,
    /// `cnf` names another certificate.
    #[error("token is bound to another certificate")]
    WrongCertificate,
    /// `sub` is not the platform of the client certificate.
    #[error("token subject does not match the client certificate")]
    WrongSubject,
}

/// Why a JWKS file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    /// The file cannot be read.
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    /// The file is not a JWKS.
    #[error("{0} is not a JWKS: {1}")]
    Parse(PathBuf, serde_json::Error),
    /// A key cannot be used.
    #[error("{path}: key {kid:?}: {why}")]
    Key {
        /// The file.
        path: PathBuf,
        /// The key's `kid` (empty if it has none).
        kid: String,
        /// What is wrong with it.
        why: String,
    },
    /// The set holds no key.
    #[error("{0} holds no key")]
    Empty(PathBuf),
}

/// One verification key and the validation rules for its family.
struct VerifyKey {
    key: DecodingKey,
    validation: Validation,
}

/// The keys of one JWKS file, by `kid`.
struct KeySet {
    keys: HashMap<String, VerifyKey>,
    /// Tells this key set from every other one loaded in the process: a
    /// connection's [`TokenMemo`] remembers it, so a reload also forgets the
    /// tokens remembered per connection.
    generation: u64,
    /// Tokens these keys verified, by SHA-256 of the token. Platforms send
    /// the same token on every call until it expires: a hit costs a hash
    /// instead of a signature check (and a connection's [`TokenMemo`] spares
    /// even the hash). It lives and dies with the key set, so a reload
    /// forgets every token verified with the old keys.
    verified: Mutex<HashMap<[u8; 32], Arc<VerifiedToken>>>,
}

/// The source of [`KeySet::generation`].
static GENERATIONS: AtomicU64 = AtomicU64::new(1);

/// Most tokens remembered per key set; past it, expired ones are dropped,
/// and if that is not enough, all.
const VERIFIED_CAPACITY: usize = 4096;

/// The checks of a verified token that depend on the time and the
/// connection: expiry (its signature, issuer, audience and `nbf` were checked
/// once), binding to the certificate, and the subject. Run on every call.
fn check(verified: &VerifiedToken, now: u64, platform: &Platform) -> Result<Scopes, TokenError> {
    if verified.exp + (LEEWAY_SECS as f64) < now as f64 {
        return Err(TokenError::Expired);
    }
    match &verified.bound {
        None => return Err(TokenError::Unbound),
        Some(bound) if bound[..] != platform.cert_sha256[..] => return Err(TokenError::WrongCertificate),
        Some(_) => {}
    }
    if verified.sub != platform.id {
        return Err(TokenError::WrongSubject);
    }
    Ok(verified.scopes.clone())
}

/// The token of an `authorization` metadata value `Bearer <token>`.
fn bearer(authorization: Option<&[u8]>) -> Result<&str, TokenError> {
    let value = authorization.ok_or(TokenError::Missing)?;
    let value = std::str::from_utf8(value).map_err(|_| TokenError::NotBearer)?;
    let (scheme, token) = value.trim().split_once(' ').ok_or(TokenError::NotBearer)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(TokenError::NotBearer);
    }
    Ok(token.trim())
}

/// Verifies bearer tokens against the keys of a JWKS file.
pub struct TokenVerifier {
    config: TokenConfig,
    keys: ArcSwap<KeySet>,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier")
            .field("config", &self.config)
            .field("kids", &self.kids())
            .finish()
    }
}

impl TokenVerifier {
    /// Loads the JWKS named by `config`.
    pub fn load(config: TokenConfig) -> Result<Self, JwksError> {
        let keys = read_jwks(&config.jwks, &config)?;
        Ok(Self {
            config,
            keys: ArcSwap::from_pointee(keys),
        })
    }

    /// The configuration this verifier was loaded from.
    pub fn config(&self) -> &TokenConfig {
        &self.config
    }

    /// The `kid`s of the keys in use, sorted.
    pub fn kids(&self) -> Vec<String> {
        let mut kids: Vec<String> = self.keys.load().keys.keys().cloned().collect();
        kids.sort();
        kids
    }

    /// Re-reads the JWKS file and swaps its keys in. On error the old keys
    /// stay in use; the caller logs why.
    pub fn reload(&self) -> Result<(), JwksError> {
        let keys = read_jwks(&self.config.jwks, &self.config)?;
        self.keys.store(Arc::new(keys));
        Ok(())
    }

    /// Verifies the `authorization` metadata value of a call from `platform`
    /// and returns the granted scopes.
    pub fn verify(&self, authorization: Option<&[u8]>, platform: &Platform) -> Result<Scopes, TokenError> {
        let token = bearer(authorization)?;
        let now = jsonwebtoken::get_current_timestamp();
        let keys = self.keys.load();
        let verified = self.verified(&keys, token, now)?;
        check(&verified, now, platform)
    }

    /// [`Self::verify`] for a call on a connection whose last verified token
    /// is in `memo`: the same token again (byte for byte, verified with the
    /// current keys) skips the hash and the shared cache. Expiry, the
    /// certificate binding and the subject are checked on every call all the
    /// same.
    pub fn verify_on_connection(
        &self,
        authorization: Option<&[u8]>,
        platform: &Platform,
        memo: &TokenMemo,
    ) -> Result<Scopes, TokenError> {
        let raw = authorization.ok_or(TokenError::Missing)?;
        let now = jsonwebtoken::get_current_timestamp();
        let keys = self.keys.load();
        if let Some(remembered) = memo.get().as_ref()
            && remembered.generation == keys.generation
            && *remembered.authorization == *raw
        {
            return check(&remembered.verified, now, platform);
        }
        let token = bearer(Some(raw))?;
        let verified = self.verified(&keys, token, now)?;
        memo.set(RememberedToken {
            authorization: raw.into(),
            generation: keys.generation,
            verified: verified.clone(),
        });
        check(&verified, now, platform)
    }

    /// The verified claims of `token`: from the shared cache, else checked
    /// (signature, issuer, audience, time claims, lifetime) and cached.
    fn verified(&self, keys: &KeySet, token: &str, now: u64) -> Result<Arc<VerifiedToken>, TokenError> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let hit = keys
            .verified
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&digest)
            .cloned();
        if let Some(verified) = hit {
            return Ok(verified);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        let kid = header.kid.ok_or(TokenError::UnknownKey)?;
        let key = keys.keys.get(&kid).ok_or(TokenError::UnknownKey)?;
        let claims = jsonwebtoken::decode::<ReadClaims>(token, &key.key, &key.validation)
            .map_err(|e| map_error(e.kind()))?
            .claims;
        if let Some(max) = self.config.max_lifetime_secs {
            check_lifetime(claims.iat, claims.exp, now, max)?;
        }
        let verified = Arc::new(VerifiedToken {
            sub: claims.sub,
            bound: claims
                .cnf
                .and_then(|cnf| URL_SAFE_NO_PAD.decode(cnf.x5t_s256.as_bytes()).ok()),
            exp: claims.exp,
            scopes: Scopes::parse(claims.scope.as_deref().unwrap_or_default()),
        });
        let mut cache = keys.verified.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= VERIFIED_CAPACITY {
            cache.retain(|_, v| v.exp + (LEEWAY_SECS as f64) >= now as f64);
            if cache.len() >= VERIFIED_CAPACITY {
                cache.clear();
            }
        }
        cache.insert(digest, verified.clone());
        Ok(verified)
    }
}

/// How often [`spawn_reload`] looks at the JWKS file.
pub const JWKS_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// Reloads `verifier` whenever its JWKS file changes, polled every
/// [`JWKS_POLL_INTERVAL`] by modification time, size and inode (an atomic
/// rename, an in-place rewrite, a Kubernetes volume swap). A failed reload is
/// logged and the old keys stay. Abort the task to stop it.
///
/// SIGHUP is not handled here (a library should not take over a process
/// signal): [`crate::server::run`] registers [`TokenVerifier::reload`] as a
/// hook of the server's reloader, which `reassigned serve` runs on SIGHUP.
pub fn spawn_reload(verifier: Arc<TokenVerifier>) -> tokio::task::JoinHandle<()> {
    let path = verifier.config().jwks.clone();
    let mut seen = file_stamp(&path);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(JWKS_POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let stamp = file_stamp(&path);
            if stamp == seen {
                continue;
            }
            seen = stamp;
            match verifier.reload() {
                Ok(()) => tracing::info!(kids = ?verifier.kids(), "jwks file changed; reloaded"),
                Err(e) => {
                    tracing::warn!(error = %e, "jwks file changed but cannot be used; keeping the old keys")
                }
            }
        }
    })
}

/// What tells a changed file from the last look: modification time, size
/// and (on unix) inode; `None` if it cannot be read.
fn file_stamp(path: &Path) -> Option<(std::time::SystemTime, u64, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let inode = 0;
    Some((meta.modified().ok()?, meta.len(), inode))
}

/// A token's lifetime against `max` seconds: it must carry `iat`, and
/// neither `exp - iat` nor `exp - now` may exceed `max` (the latter with
/// [`LEEWAY_SECS`] for clock skew). Checked once per token: both only
/// shrink as time passes.
fn check_lifetime(iat: Option<f64>, exp: f64, now: u64, max: u64) -> Result<(), TokenError> {
    let iat = iat.ok_or(TokenError::MissingClaim("iat"))?;
    if !iat.is_finite() {
        return Err(TokenError::Malformed);
    }
    if exp - iat > max as f64 || exp - now as f64 > (max + LEEWAY_SECS) as f64 {
        return Err(TokenError::TooLong(max));
    }
    Ok(())
}

fn map_error(kind: &ErrorKind) -> TokenError {
    match kind {
        ErrorKind::ExpiredSignature => TokenError::Expired,
        ErrorKind::ImmatureSignature => TokenError::NotYetValid,
        ErrorKind::InvalidIssuer => TokenError::WrongIssuer,
        ErrorKind::InvalidAudience => TokenError::WrongAudience,
        ErrorKind::InvalidSignature => TokenError::BadSignature,
        ErrorKind::InvalidAlgorithm => TokenError::WrongAlgorithm,
        ErrorKind::MissingRequiredClaim(claim) => TokenError::MissingClaim(match claim.as_str() {
            "exp" => "exp",
            "nbf" => "nbf",
            "iss" => "iss",
            "aud" => "aud",
            "sub" => "sub",
            _ => "required",
        }),
        _ => TokenError::Malformed,
    }
}

/// The `jsonwebtoken` rules for one key: its algorithm only, issuer and
/// audience set, every time claim required and checked with [`LEEWAY_SECS`].
fn validation(alg: Algorithm, config: &TokenConfig) -> Validation {
    let mut validation = Validation::new(alg);
    validation.leeway = LEEWAY_SECS;
    validation.validate_exp = true;
    validation.validate_nbf = true;
    validation.validate_aud = true;
    validation.set_issuer(&[&config.issuer]);
    validation.set_audience(&[&config.audience]);
    validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
    validation
}

fn read_jwks(path: &Path, config: &TokenConfig) -> Result<KeySet, JwksError> {
    let text = std::fs::read(path).map_err(|e| JwksError::Read(path.to_owned(), e))?;
    let set: JwkSet = serde_json::from_slice(&text).map_err(|e| JwksError::Parse(path.to_owned(), e))?;
    let mut keys = HashMap::new();
    let mut seen = HashSet::new();
    for jwk in &set.keys {
        let kid = jwk.common.key_id.clone().unwrap_or_default();
        let bad = |why: &str| JwksError::Key {
            path: path.to_owned(),
            kid: kid.clone(),
            why: why.to_owned(),
        };
        if kid.is_empty() {
            return Err(bad("every key needs a kid"));
        }
        if !seen.insert(kid.clone()) {
            return Err(bad("duplicate kid"));
        }
        let alg = match &jwk.algorithm {
            AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => Algorithm::ES256,
            AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => Algorithm::EdDSA,
            _ => return Err(bad("only P-256 (ES256) and Ed25519 (EdDSA) keys are supported")),
        };
        if let Some(stated) = jwk.common.key_algorithm
            && stated != KeyAlgorithm::from(alg)
        {
            return Err(bad("its alg does not match its curve"));
        }
        let key = DecodingKey::from_jwk(jwk).map_err(|e| bad(&e.to_string()))?;
        keys.insert(
            kid,
            VerifyKey {
                key,
                validation: validation(alg, config),
            },
        );
    }
    if keys.is_empty() {
        return Err(JwksError::Empty(path.to_owned()));
    }
    Ok(KeySet {
        keys,
        generation: GENERATIONS.fetch_add(1, Ordering::Relaxed),
        verified: Mutex::new(HashMap::new()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_tokens_still_expire_and_stay_bound() {
        let platform = Platform {
            id: "p".into(),
            cert_sha256: [7; 32],
        };
        let verified = VerifiedToken {
            sub: "p".into(),
            bound: Some(vec![7; 32]),
            exp: 1000.0,
            scopes: Scopes::parse(scope::ALL),
        };
        assert!(check(&verified, 1000 + LEEWAY_SECS, &platform).is_ok());
        assert_eq!(
            check(&verified, 1001 + LEEWAY_SECS, &platform),
            Err(TokenError::Expired)
        );
        let other_cert = Platform {
            id: "p".into(),
            cert_sha256: [8; 32],
        };
        assert_eq!(
            check(&verified, 900, &other_cert),
            Err(TokenError::WrongCertificate)
        );
        let other_sub = Platform {
            id: "q".into(),
            cert_sha256: [7; 32],
        };
        assert_eq!(check(&verified, 900, &other_sub), Err(TokenError::WrongSubject));
        let unbound = VerifiedToken {
            bound: None,
            ..verified
        };
        assert_eq!(check(&unbound, 900, &platform), Err(TokenError::Unbound));
    }

    #[test]
    fn lifetimes_are_bounded_by_iat_and_now() {
        let day = DEFAULT_MAX_LIFETIME_SECS;
        let now = 1_000_000;
        let ok = |iat: Option<f64>, exp: u64| check_lifetime(iat, exp as f64, now, day);
        assert_eq!(ok(Some(now as f64), now + day), Ok(()));
        assert_eq!(ok(Some(now as f64), now + day + 1), Err(TokenError::TooLong(day)));
        // A token issued in the past for 100 years.
        assert_eq!(
            ok(Some((now - 10) as f64), now + 100 * 365 * day),
            Err(TokenError::TooLong(day))
        );
        // An `iat` set in the future to hide a long `exp`.
        assert_eq!(
            ok(Some((now + 10 * day) as f64), now + 11 * day),
            Err(TokenError::TooLong(day))
        );
        assert_eq!(ok(None, now + 60), Err(TokenError::MissingClaim("iat")));
        assert_eq!(ok(Some(f64::NAN), now + 60), Err(TokenError::Malformed));
    }
}
