//! Token issuing for development and tests: `reassigned keys generate` (an
//! issuer key pair and its JWKS) and `reassigned token mint` (a
//! certificate-bound bearer token, RFC 8705).
//!
//! [`IssuerKey`] holds one ES256 or EdDSA signing key; [`IssuerKey::mint`]
//! signs [`TokenClaims`] with it, and [`jwks_json`] publishes the public
//! halves for the server's `--jwks`. Defaults: issuer [`DEFAULT_ISSUER`],
//! audience [`DEFAULT_AUDIENCE`].

use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail, ensure};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ED25519};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use sha2::{Digest as _, Sha256};

use crate::cli::certs::platform_uri;
use crate::identity::platform_from_cert;
use crate::server::token::{Confirmation, TokenClaims};

/// The issuer (`iss`) of development tokens, and of `token mint` by default.
pub const DEFAULT_ISSUER: &str = "reassigned-dev";
/// The audience (`aud`) of development tokens, and of `token mint` by default.
pub const DEFAULT_AUDIENCE: &str = "reassigned";
/// File name of the issuer's private key in `keys generate --out DIR`.
pub const ISSUER_KEY_FILE: &str = "issuer.key";
/// File name of the JWKS in `keys generate --out DIR`.
pub const JWKS_FILE: &str = "jwks.json";

/// The signature algorithm of an issuer key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyAlg {
    /// ECDSA over P-256 with SHA-256.
    #[value(name = "ES256")]
    Es256,
    /// Ed25519.
    #[value(name = "EdDSA")]
    EdDsa,
}

/// A token issuer's signing key and its key id.
pub struct IssuerKey {
    alg: KeyAlg,
    kid: String,
    pair: KeyPair,
}

impl fmt::Debug for IssuerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuerKey")
            .field("alg", &self.alg)
            .field("kid", &self.kid)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl IssuerKey {
    /// A new random key; `kid` defaults to [`crate::receipt::derived_kid`].
    pub fn generate(alg: KeyAlg, kid: Option<&str>) -> anyhow::Result<Self> {
        let pair = match alg {
            KeyAlg::Es256 => KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256),
            KeyAlg::EdDsa => KeyPair::generate_for(&PKCS_ED25519),
        }
        .context("cannot generate an issuer key")?;
        Ok(Self::with_kid(alg, pair, kid))
    }

    /// A key from its PKCS#8 PEM (as written by `keys generate`); the
    /// algorithm follows from the key.
    pub fn from_pem(pem: &str, kid: Option<&str>) -> anyhow::Result<Self> {
        let pair = KeyPair::from_pem(pem).context("not a PKCS#8 PEM private key")?;
        let alg = if pair.algorithm() == &PKCS_ECDSA_P256_SHA256 {
            KeyAlg::Es256
        } else if pair.algorithm() == &PKCS_ED25519 {
            KeyAlg::EdDsa
        } else {
            bail!("the issuer key must be a P-256 (ES256) or Ed25519 (EdDSA) key");
        };
        Ok(Self::with_kid(alg, pair, kid))
    }

    fn with_kid(alg: KeyAlg, pair: KeyPair, kid: Option<&str>) -> Self {
        let kid = kid
            .map(str::to_owned)
            .unwrap_or_else(|| Self::derive_kid(pair.public_key_raw()));
        Self { alg, kid, pair }
    }

    /// The default key id: the first 16 characters of the base64url SHA-256
    /// of the raw public key.
    fn derive_kid(public_raw: &[u8]) -> String {
        let mut kid = URL_SAFE_NO_PAD.encode(Sha256::digest(public_raw));
        kid.truncate(16);
        kid
    }

    /// The key id (`kid`) tokens are signed under.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The algorithm.
    pub fn alg(&self) -> KeyAlg {
        self.alg
    }

    /// The private key as PKCS#8 PEM.
    pub fn private_pem(&self) -> String {
        self.pair.serialize_pem()
    }

    /// The public key as a JWK.
    pub fn public_jwk(&self) -> serde_json::Value {
        let raw = self.pair.public_key_raw();
        match self.alg {
            // SEC1 uncompressed point: 0x04 || x || y.
            KeyAlg::Es256 => serde_json::json!({
                "kty": "EC",
                "crv": "P-256",
                "x": URL_SAFE_NO_PAD.encode(raw.get(1..33).unwrap_or_default()),
                "y": URL_SAFE_NO_PAD.encode(raw.get(33..65).unwrap_or_default()),
                "kid": self.kid,
                "alg": "ES256",
                "use": "sig",
            }),
            KeyAlg::EdDsa => serde_json::json!({
                "kty": "OKP",
                "crv": "Ed25519",
                "x": URL_SAFE_NO_PAD.encode(raw),
                "kid": self.kid,
                "alg": "EdDSA",
                "use": "sig",
            }),
        }
    }

    /// Signs `claims` into a compact JWT with this key's `kid`.
    pub fn mint(&self, claims: &TokenClaims) -> anyhow::Result<String> {
        let der = self.pair.serialize_der();
        let (alg, key) = match self.alg {
            KeyAlg::Es256 => (Algorithm::ES256, EncodingKey::from_ec_der(&der)),
            KeyAlg::EdDsa => (Algorithm::EdDSA, EncodingKey::from_ed_der(&der)),
        };
        let mut header = Header::new(alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &key).context("cannot sign the token")
    }
}

/// A JWKS document holding the public keys of `keys`.
pub fn jwks_json(keys: &[&IssuerKey]) -> String {
    let keys: Vec<serde_json::Value> = keys.iter().map(|k| k.public_jwk()).collect();
    let mut text = serde_json::to_string_pretty(&serde_json::json!({ "keys": keys })).unwrap_or_default();
    text.push('\n');
    text
}

/// Seconds since the Unix epoch, now.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// The claims of a token for the client certificate `cert_pem` (leaf first):
/// `sub` is the certificate's platform id, `cnf` binds the token to it, valid
/// from now for `ttl`.
pub fn claims_for_cert(
    cert_pem: &str,
    scope: &str,
    ttl: Duration,
    issuer: &str,
    audience: &str,
) -> anyhow::Result<TokenClaims> {
    let der = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .next()
        .context("no certificate in the PEM")?
        .context("cannot read the certificate PEM")?;
    let platform = platform_from_cert(&der).context("cannot read the platform from the certificate")?;
    let now = now_secs();
    Ok(TokenClaims {
        iss: issuer.to_owned(),
        aud: audience.to_owned(),
        sub: platform.id,
        iat: now,
        nbf: now,
        exp: now + ttl.as_secs(),
        scope: scope.to_owned(),
        cnf: Confirmation::for_cert_sha256(&platform.cert_sha256),
    })
}

/// Parses a time span: `90s`, `15m`, `1h`, `7d`, or plain seconds (the
/// same spans as `serve --token-max-lifetime`).
pub use crate::config::parse_span as parse_ttl;

/// What `reassigned token mint` needs.
#[derive(Clone, Debug, clap::Args)]
pub struct MintOptions {
    /// The issuer's private key (PKCS#8 PEM, as written by `keys generate`).
    #[arg(long)]
    pub issuer_key: PathBuf,
    /// The key id to sign under (default: the id `keys generate` derives from the key).
    #[arg(long)]
    pub kid: Option<String>,
    /// The platform: its name (e.g. `platform-a`) or its full id; it must be
    /// the platform named by `--cert`, which becomes the token's `sub`.
    #[arg(long)]
    pub platform: String,
    /// The platform's client certificate (PEM); the token is bound to it.
    #[arg(long)]
    pub cert: PathBuf,
    /// Scopes, space separated (`numbers:check numbers:batch mirror:read`).
    #[arg(long, default_value = crate::identity::scope::ALL)]
    pub scope: String,
    /// Lifetime: `90s`, `15m`, `1h`, `7d`. `serve` refuses tokens that live
    /// longer than its `--token-max-lifetime` (default 24h).
    #[arg(long, default_value = "1h", value_parser = parse_ttl)]
    pub ttl: Duration,
    /// The `iss` claim.
    #[arg(long, default_value = DEFAULT_ISSUER)]
    pub issuer: String,
    /// The `aud` claim.
    #[arg(long, default_value = DEFAULT_AUDIENCE)]
    pub audience: String,
}

/// `reassigned token mint`: a bearer token bound to `--cert`.
pub fn mint_cmd(options: &MintOptions) -> anyhow::Result<String> {
    let pem = std::fs::read_to_string(&options.issuer_key)
        .with_context(|| format!("cannot read {}", options.issuer_key.display()))?;
    let key = IssuerKey::from_pem(&pem, options.kid.as_deref())?;
    let cert = std::fs::read_to_string(&options.cert)
        .with_context(|| format!("cannot read {}", options.cert.display()))?;
    let claims = claims_for_cert(
        &cert,
        &options.scope,
        options.ttl,
        &options.issuer,
        &options.audience,
    )?;
    ensure!(
        claims.sub == options.platform || claims.sub == platform_uri(&options.platform),
        "the certificate names platform {:?}, not {:?}",
        claims.sub,
        options.platform
    );
    key.mint(&claims)
}

/// `reassigned keys generate`: writes `issuer.key` (mode 0600) and
/// `jwks.json` (its public key) into `out`. Never overwrites.
pub fn generate_keys(out: &Path, alg: KeyAlg, kid: Option<&str>) -> anyhow::Result<IssuerKey> {
    let key = IssuerKey::generate(alg, kid)?;
    let (key_path, jwks_path) = (out.join(ISSUER_KEY_FILE), out.join(JWKS_FILE));
    for path in [&key_path, &jwks_path] {
        ensure!(!path.exists(), "refusing to overwrite {}", path.display());
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    write_file(&key_path, &key.private_pem(), true)?;
    write_file(&jwks_path, &jwks_json(&[&key]), false)?;
    Ok(key)
}

fn write_file(path: &Path, text: &str, secret: bool) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    if secret {
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ttls() {
        assert_eq!(parse_ttl("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_ttl("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_ttl("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_ttl("2d"), Ok(Duration::from_secs(172_800)));
        assert_eq!(parse_ttl("30"), Ok(Duration::from_secs(30)));
        assert!(parse_ttl("1w").is_err());
        assert!(parse_ttl("0s").is_err());
        assert!(parse_ttl("h").is_err());
    }

    #[test]
    fn keys_round_trip_through_pem() {
        for alg in [KeyAlg::Es256, KeyAlg::EdDsa] {
            let key = IssuerKey::generate(alg, None).unwrap();
            let again = IssuerKey::from_pem(&key.private_pem(), None).unwrap();
            assert_eq!(again.alg(), alg);
            assert_eq!(again.kid(), key.kid());
        }
    }
}
