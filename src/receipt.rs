//! Signed receipts: proof that the service gave a platform a given answer.
//!
//! A receipt is a compact JWS (RFC 7515) signed with the service's own key
//! (ES256 over P-256, or EdDSA over Ed25519) whose header names the key
//! (`kid`) and whose claims are a [`ReceiptClaims`]. The public keys are
//! published as a JWKS ([`ReceiptSigner::jwks_json`], RPC `GetSigningKeys`)
//! so that anyone can check a receipt offline with [`verify`] and
//! [`check_number`]. The number itself is never in a receipt, only its
//! SHA-256 ([`number_sha256`]).
//!
//! # Key rotation
//! A new receipt key must not orphan the receipts signed before it: the
//! public halves of retired keys stay published ([`RetiredKey`],
//! [`ReceiptSigner::with_retired`]), each with the last time it signed
//! (`not_after`, Unix seconds, a member of its JWK). [`verify_receipt`]
//! accepts a receipt under a retired key only if its `iat` is not after
//! that time; the server never signs with a retired key.
//!
//! Signing is on the login path, so [`ReceiptSigner`] parses the key once,
//! encodes the constant header once, and keeps one ready signer per worker
//! thread: a receipt costs one JSON serialization, two base64 encodings and
//! one signature. Uses `jsonwebtoken` with its `rust_crypto` backend only.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::crypto::{CryptoProvider, JwtSigner};
use jsonwebtoken::jwk::{
    AlgorithmParameters, CommonParameters, EllipticCurve, EllipticCurveKeyParameters, EllipticCurveKeyType,
    Jwk, JwkSet, KeyAlgorithm, OctetKeyPairParameters, OctetKeyPairType, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The claims of a receipt: what was asked, by whom, and what was answered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiptClaims {
    /// The calling platform, as named by its client certificate.
    pub platform: String,
    /// Lowercase hex SHA-256 of the E.164 text of the number (see
    /// [`number_sha256`]); the number itself is never in a receipt.
    pub number_sha256: String,
    /// The `since` date of the question (`YYYY-MM-DD`).
    pub since: String,
    /// The answer: a `ReassignmentStatus` name, e.g.
    /// `REASSIGNMENT_STATUS_NOT_REASSIGNED`.
    pub status: String,
    /// The `NoDataReason` name when the status is NO_DATA, else absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_data_reason: Option<String>,
    /// The date the mirror's data was complete through (`YYYY-MM-DD`); empty
    /// when the mirror held no data.
    pub data_as_of: String,
    /// The sequence of the last snapshot or delta applied to the mirror that
    /// answered (0 when it held no data).
    pub sequence: u64,
    /// When the answer was given (Unix seconds).
    pub iat: i64,
    /// The request id: the client's `x-request-id` if it sent one, else a
    /// random 128-bit hex id; in a batch or a stream, suffixed with `.` and
    /// the item's index.
    pub jti: String,
}

/// Lowercase hex SHA-256 of the E.164 text of a number (`+14155550123`).
pub fn number_sha256(e164: &str) -> String {
    hex::encode(Sha256::digest(e164.as_bytes()))
}

/// A receipt could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReceiptError {
    /// The server was started without a receipt key.
    #[error("receipts are not configured on this server")]
    NotConfigured,
    /// The request reached the handler without a platform identity.
    #[error("no platform identity on the request")]
    NoPlatform,
    /// Serializing or signing failed.
    #[error("cannot sign the receipt: {0}")]
    Sign(String),
}

/// A receipt key file cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The file cannot be read.
    #[error("cannot read {0}: {1}")]
    Read(String, String),
    /// The file is not a PEM PKCS#8 private key.
    #[error("not a PEM PKCS#8 private key (`-----BEGIN PRIVATE KEY-----`): {0}")]
    Pem(String),
    /// The key is neither P-256 nor Ed25519.
    #[error("unsupported key type: use an ECDSA P-256 (ES256) or Ed25519 (EdDSA) key")]
    Unsupported,
    /// jsonwebtoken refused the key.
    #[error("unusable key: {0}")]
    Unusable(String),
}

/// A receipt does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The JWKS is not valid JSON of a key set.
    #[error("the JWKS is unreadable: {0}")]
    Jwks(String),
    /// The receipt is not a compact JWS with a readable header.
    #[error("the receipt is malformed: {0}")]
    Malformed(String),
    /// The header names an algorithm receipts never use.
    #[error("the receipt uses algorithm {0:?}; receipts use ES256 or EdDSA")]
    Algorithm(Algorithm),
    /// The header names no key.
    #[error("the receipt header has no kid")]
    NoKid,
    /// No key of the JWKS has the header's `kid`.
    #[error("no key with kid {0:?} in the JWKS")]
    UnknownKey(String),
    /// The key of that `kid` is for another algorithm.
    #[error("the key {0:?} is not an {1:?} key")]
    KeyMismatch(String, Algorithm),
    /// The signature is wrong or the claims are unreadable.
    #[error("the receipt signature or claims are invalid: {0}")]
    Invalid(String),
    /// The receipt is about another number.
    #[error("the receipt is for another number (number_sha256 differs)")]
    NumberMismatch,
    /// The receipt claims to be signed after its key was retired.
    #[error("the receipt's iat {iat} is after key {kid:?} was retired (not_after {not_after})")]
    KeyRetired {
        /// The retired key.
        kid: String,
        /// The last second (Unix) the key signed.
        not_after: i64,
        /// The receipt's `iat`.
        iat: i64,
    },
}

/// The JWK member that marks a retired key: the last second (Unix) at
/// which it signed receipts. Not a registered JWK member; RFC 7517 says
/// that readers ignore members they do not know.
pub const NOT_AFTER_MEMBER: &str = "not_after";

/// The public half of a receipt key that no longer signs, published so
/// that the receipts it signed stay verifiable.
#[derive(Clone, Debug, PartialEq)]
pub struct RetiredKey {
    /// The public key (its `kid` is the one in the receipts' header).
    pub jwk: Jwk,
    /// The last second (Unix) the key signed: a receipt under this key
    /// with a later `iat` is refused.
    pub not_after: i64,
}

/// Reads the retired public keys of a JWKS or JWK JSON file (as
/// `GetSigningKeys` or `reassigned receipt jwks` print them), each given
/// `not_after` (or the earlier `not_after` it already carries). Refuses
/// private keys, keys without a `kid`, and keys receipts never use.
pub fn load_retired_keys(path: &Path, not_after: i64) -> Result<Vec<RetiredKey>, KeyError> {
    let shown = path.display().to_string();
    let text = std::fs::read(path).map_err(|e| KeyError::Read(shown.clone(), e.to_string()))?;
    let bad = |why: String| KeyError::Unusable(format!("{shown}: {why}"));
    let json: serde_json::Value = serde_json::from_slice(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let members = match json.get("keys") {
        Some(serde_json::Value::Array(keys)) => keys.clone(),
        Some(_) => return Err(bad("`keys` is not an array".into())),
        None => vec![json],
    };
    if members.is_empty() {
        return Err(bad("holds no key".into()));
    }
    let mut keys = Vec::with_capacity(members.len());
    for member in members {
        if member.get("d").is_some() {
            return Err(bad("holds a private key: give the public key only".into()));
        }
        let own_not_after = member.get(NOT_AFTER_MEMBER).and_then(serde_json::Value::as_i64);
        let jwk: Jwk = serde_json::from_value(member).map_err(|e| bad(format!("not a JWK: {e}")))?;
        let kid = jwk.common.key_id.clone().unwrap_or_default();
        if kid.is_empty() {
            return Err(bad("a key has no kid".into()));
        }
        let algorithm = match &jwk.algorithm {
            AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => Algorithm::ES256,
            AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => Algorithm::EdDSA,
            _ => return Err(bad(format!("key {kid:?} is neither P-256 nor Ed25519"))),
        };
        if !key_algorithm_fits(&jwk, algorithm) {
            return Err(bad(format!("key {kid:?}: its alg does not match its curve")));
        }
        DecodingKey::from_jwk(&jwk).map_err(|e| bad(format!("key {kid:?}: {e}")))?;
        keys.push(RetiredKey {
            jwk,
            not_after: own_not_after.map_or(not_after, |own| own.min(not_after)),
        });
    }
    Ok(keys)
}

/// Receipt public keys with the retirement time of the retired ones, as
/// read from a JWKS by [`parse_receipt_keys`].
#[derive(Clone, Debug, Default)]
pub struct ReceiptKeys {
    /// The keys.
    pub set: JwkSet,
    /// `not_after` (Unix seconds) of each retired key, by `kid`.
    pub not_after: HashMap<String, i64>,
}

/// Parses a JWKS JSON text, keeping the `not_after` of retired keys.
pub fn parse_receipt_keys(json: &str) -> Result<ReceiptKeys, VerifyError> {
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| VerifyError::Jwks(e.to_string()))?;
    let mut not_after = HashMap::new();
    if let Some(keys) = value.get("keys").and_then(serde_json::Value::as_array) {
        for key in keys {
            if let (Some(kid), Some(at)) = (
                key.get("kid").and_then(serde_json::Value::as_str),
                key.get(NOT_AFTER_MEMBER).and_then(serde_json::Value::as_i64),
            ) {
                not_after.insert(kid.to_owned(), at);
            }
        }
    }
    let set = serde_json::from_value(value).map_err(|e| VerifyError::Jwks(e.to_string()))?;
    Ok(ReceiptKeys { set, not_after })
}

/// Checks a receipt against `keys` as [`verify`] does, and refuses it if
/// its key is retired and its `iat` is after the key's `not_after`.
pub fn verify_receipt(receipt: &str, keys: &ReceiptKeys) -> Result<ReceiptClaims, VerifyError> {
    let claims: ReceiptClaims = verify_with_jwks(receipt, &keys.set)?;
    let kid = jsonwebtoken::decode_header(receipt.trim())
        .map_err(|e| VerifyError::Malformed(e.to_string()))?
        .kid
        .ok_or(VerifyError::NoKid)?;
    if let Some(&not_after) = keys.not_after.get(&kid)
        && claims.iat > not_after
    {
        return Err(VerifyError::KeyRetired {
            kid,
            not_after,
            iat: claims.iat,
        });
    }
    Ok(claims)
}

fn key_algorithm_fits(jwk: &Jwk, algorithm: Algorithm) -> bool {
    matches!(
        (jwk.common.key_algorithm, algorithm),
        (None, _)
            | (Some(KeyAlgorithm::ES256), Algorithm::ES256)
            | (Some(KeyAlgorithm::EdDSA), Algorithm::EdDSA)
    )
}

/// Ids of signers, so that per-thread caches never confuse two keys.
static NEXT_SIGNER_ID: AtomicU64 = AtomicU64::new(1);

/// Ready signers per worker thread, by [`ReceiptSigner`] id. jsonwebtoken's
/// signers are not `Send`, so each thread builds its own once instead of
/// re-parsing the key (and re-deriving the public key) on every receipt.
const THREAD_SIGNER_SLOTS: usize = 4;
thread_local! {
    static THREAD_SIGNERS: RefCell<Vec<(u64, Box<dyn JwtSigner>)>> = const { RefCell::new(Vec::new()) };
}

/// The service's receipt key: signs receipts and publishes its public half.
pub struct ReceiptSigner {
    id: u64,
    algorithm: Algorithm,
    kid: String,
    key: EncodingKey,
    /// `base64url(header) + "."`, the constant start of every receipt.
    prefix: String,
    jwk: Jwk,
    jwks_json: String,
}

impl std::fmt::Debug for ReceiptSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiptSigner")
            .field("algorithm", &self.algorithm)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl ReceiptSigner {
    /// Reads a PEM PKCS#8 private key (P-256 or Ed25519) from `path`.
    /// Without `kid`, the key id is derived from the public key as
    /// `reassigned keys generate` does ([`derived_kid`]).
    pub fn from_pem_file(path: &Path, kid: Option<String>) -> Result<Self, KeyError> {
        let pem =
            std::fs::read(path).map_err(|e| KeyError::Read(path.display().to_string(), e.to_string()))?;
        Self::from_pem(&pem, kid)
    }

    /// From a PEM PKCS#8 private key (P-256 or Ed25519).
    pub fn from_pem(pem: &[u8], kid: Option<String>) -> Result<Self, KeyError> {
        let der = match PrivateKeyDer::from_pem_slice(pem) {
            Ok(PrivateKeyDer::Pkcs8(der)) => der,
            Ok(_) => return Err(KeyError::Pem("the key is not in PKCS#8 form".into())),
            Err(e) => return Err(KeyError::Pem(e.to_string())),
        };
        let pair = rcgen::KeyPair::try_from(&der).map_err(|_| KeyError::Unsupported)?;
        let public = pair.public_key_raw();
        let der = der.secret_pkcs8_der();
        let (algorithm, key, params) = if pair.algorithm() == &rcgen::PKCS_ED25519 {
            let params = AlgorithmParameters::OctetKeyPair(OctetKeyPairParameters {
                key_type: OctetKeyPairType::OctetKeyPair,
                curve: EllipticCurve::Ed25519,
                x: URL_SAFE_NO_PAD.encode(public),
            });
            (Algorithm::EdDSA, EncodingKey::from_ed_der(der), params)
        } else if pair.algorithm() == &rcgen::PKCS_ECDSA_P256_SHA256 {
            // Uncompressed SEC1 point: 0x04 || x || y.
            let (x, y) = match public {
                [4, rest @ ..] if rest.len() == 64 => rest.split_at(32),
                _ => return Err(KeyError::Unusable("unexpected P-256 public key form".into())),
            };
            let params = AlgorithmParameters::EllipticCurve(EllipticCurveKeyParameters {
                key_type: EllipticCurveKeyType::EC,
                curve: EllipticCurve::P256,
                x: URL_SAFE_NO_PAD.encode(x),
                y: URL_SAFE_NO_PAD.encode(y),
            });
            (Algorithm::ES256, EncodingKey::from_ec_der(der), params)
        } else {
            return Err(KeyError::Unsupported);
        };
        let mut jwk = Jwk {
            common: CommonParameters {
                public_key_use: Some(PublicKeyUse::Signature),
                key_algorithm: Some(match algorithm {
                    Algorithm::EdDSA => KeyAlgorithm::EdDSA,
                    _ => KeyAlgorithm::ES256,
                }),
                ..CommonParameters::default()
            },
            algorithm: params,
        };
        let kid = match kid {
            Some(kid) if !kid.is_empty() => kid,
            _ => derived_kid(public),
        };
        jwk.common.key_id = Some(kid.clone());

        let mut header = Header::new(algorithm);
        header.kid = Some(kid.clone());
        let header_json = serde_json::to_vec(&header).map_err(|e| KeyError::Unusable(e.to_string()))?;
        let mut prefix = URL_SAFE_NO_PAD.encode(header_json);
        prefix.push('.');
        let jwks_json = serde_json::to_string(&JwkSet {
            keys: vec![jwk.clone()],
        })
        .map_err(|e| KeyError::Unusable(e.to_string()))?;

        let signer = Self {
            id: NEXT_SIGNER_ID.fetch_add(1, Ordering::Relaxed),
            algorithm,
            kid,
            key,
            prefix,
            jwk,
            jwks_json,
        };
        // Fail now, not on the first request, if the backend refuses the key,
        // and prove that the public half published matches the private one.
        let probe = signer
            .sign_bytes(b"{}")
            .map_err(|e| KeyError::Unusable(e.to_string()))?;
        verify_with_jwks::<serde_json::Value>(&probe, &signer.jwks())
            .map_err(|e| KeyError::Unusable(format!("self-check failed: {e}")))?;
        Ok(signer)
    }

    /// The signature algorithm (ES256 or EdDSA).
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The key id in every receipt's header.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as a JWK.
    pub fn jwk(&self) -> &Jwk {
        &self.jwk
    }

    /// The public key of this signer as a key set (without retired keys;
    /// [`ReceiptSigner::jwks_json`] publishes those too).
    pub fn jwks(&self) -> JwkSet {
        JwkSet {
            keys: vec![self.jwk.clone()],
        }
    }

    /// Publishes `retired` keys beside this one (see [`RetiredKey`]): they
    /// are never used to sign. Refuses a retired key with this key's `kid`
    /// or two with the same `kid`.
    pub fn with_retired(mut self, retired: &[RetiredKey]) -> Result<Self, KeyError> {
        let mut seen = HashSet::from([self.kid.clone()]);
        let mut keys = vec![serde_json::to_value(&self.jwk).map_err(|e| KeyError::Unusable(e.to_string()))?];
        for key in retired {
            let kid = key.jwk.common.key_id.clone().unwrap_or_default();
            if !seen.insert(kid.clone()) {
                return Err(KeyError::Unusable(format!(
                    "retired key {kid:?}: its kid is the current key's or another retired key's"
                )));
            }
            let mut value = serde_json::to_value(&key.jwk).map_err(|e| KeyError::Unusable(e.to_string()))?;
            if let Some(object) = value.as_object_mut() {
                object.insert(NOT_AFTER_MEMBER.to_owned(), key.not_after.into());
            }
            keys.push(value);
        }
        self.jwks_json = serde_json::json!({ "keys": keys }).to_string();
        Ok(self)
    }

    /// The public keys as JWKS JSON (`{"keys":[...]}`): this key, then the
    /// retired ones with their `not_after`.
    pub fn jwks_json(&self) -> &str {
        &self.jwks_json
    }

    /// Signs `claims` into a compact JWS.
    pub fn sign(&self, claims: &ReceiptClaims) -> Result<String, ReceiptError> {
        let payload = serde_json::to_vec(claims).map_err(|e| ReceiptError::Sign(e.to_string()))?;
        self.sign_bytes(&payload)
    }

    fn sign_bytes(&self, payload: &[u8]) -> Result<String, ReceiptError> {
        // header, payload and an 86-character signature, base64url.
        let mut token = String::with_capacity(self.prefix.len() + payload.len().div_ceil(3) * 4 + 90);
        token.push_str(&self.prefix);
        URL_SAFE_NO_PAD.encode_string(payload, &mut token);
        let signature = self.with_thread_signer(|signer| {
            signer
                .try_sign(token.as_bytes())
                .map_err(|e| ReceiptError::Sign(e.to_string()))
        })?;
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(signature, &mut token);
        Ok(token)
    }

    /// Runs `f` with this thread's ready signer for this key, building it on
    /// first use.
    fn with_thread_signer<T>(
        &self,
        f: impl FnOnce(&dyn JwtSigner) -> Result<T, ReceiptError>,
    ) -> Result<T, ReceiptError> {
        THREAD_SIGNERS.with(|cell| {
            let mut slots = cell.borrow_mut();
            let index = match slots.iter().position(|(id, _)| *id == self.id) {
                Some(index) => index,
                None => {
                    let provider = CryptoProvider::try_get_default()
                        .ok_or_else(|| ReceiptError::Sign("no jsonwebtoken crypto provider".into()))?;
                    let signer = (provider.signer_factory)(&self.algorithm, &self.key)
                        .map_err(|e| ReceiptError::Sign(e.to_string()))?;
                    if slots.len() >= THREAD_SIGNER_SLOTS {
                        slots.remove(0);
                    }
                    slots.push((self.id, signer));
                    slots.len() - 1
                }
            };
            f(slots[index].1.as_ref())
        })
    }
}

/// The default key id: the first 16 characters of base64url(SHA-256(raw
/// public key)), the same as `reassigned keys generate` writes in its
/// `jwks.json`, so a key made there can sign receipts unchanged.
pub fn derived_kid(public_raw: &[u8]) -> String {
    let mut kid = URL_SAFE_NO_PAD.encode(Sha256::digest(public_raw));
    kid.truncate(16);
    kid
}

/// Parses a JWKS JSON text (`{"keys":[...]}`).
pub fn parse_jwks(json: &str) -> Result<JwkSet, VerifyError> {
    serde_json::from_str(json).map_err(|e| VerifyError::Jwks(e.to_string()))
}

/// Checks a receipt's signature against the key its `kid` names in `jwks`,
/// and returns its claims. Does not check which number it is about: see
/// [`check_number`].
pub fn verify(receipt: &str, jwks: &JwkSet) -> Result<ReceiptClaims, VerifyError> {
    verify_with_jwks(receipt, jwks)
}

/// Checks that `claims` are about `e164` (the number's text, as sent).
pub fn check_number(claims: &ReceiptClaims, e164: &str) -> Result<(), VerifyError> {
    if claims.number_sha256.eq_ignore_ascii_case(&number_sha256(e164)) {
        Ok(())
    } else {
        Err(VerifyError::NumberMismatch)
    }
}

fn verify_with_jwks<T: serde::de::DeserializeOwned>(receipt: &str, jwks: &JwkSet) -> Result<T, VerifyError> {
    let receipt = receipt.trim();
    let header = jsonwebtoken::decode_header(receipt).map_err(|e| VerifyError::Malformed(e.to_string()))?;
    let algorithm = header.alg;
    if !matches!(algorithm, Algorithm::ES256 | Algorithm::EdDSA) {
        return Err(VerifyError::Algorithm(algorithm));
    }
    let kid = header.kid.ok_or(VerifyError::NoKid)?;
    let jwk = jwks
        .find(&kid)
        .ok_or_else(|| VerifyError::UnknownKey(kid.clone()))?;
    let key_fits = match (&jwk.algorithm, algorithm) {
        (AlgorithmParameters::EllipticCurve(p), Algorithm::ES256) => p.curve == EllipticCurve::P256,
        (AlgorithmParameters::OctetKeyPair(p), Algorithm::EdDSA) => p.curve == EllipticCurve::Ed25519,
        _ => false,
    };
    let alg_fits = key_algorithm_fits(jwk, algorithm);
    if !(key_fits && alg_fits) {
        return Err(VerifyError::KeyMismatch(kid, algorithm));
    }
    let key = DecodingKey::from_jwk(jwk).map_err(|e| VerifyError::Jwks(e.to_string()))?;
    // Receipts do not expire and have no audience: they prove a past answer.
    let mut validation = Validation::new(algorithm);
    validation.required_spec_claims = HashSet::new();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    jsonwebtoken::decode::<T>(receipt, &key, &validation)
        .map(|data| data.claims)
        .map_err(|e| VerifyError::Invalid(e.to_string()))
}

/// A new receipt key in PEM PKCS#8: Ed25519 (`eddsa`) or P-256 (`es256`).
pub fn generate_key_pem(algorithm: Algorithm) -> Result<String, KeyError> {
    let alg = match algorithm {
        Algorithm::EdDSA => &rcgen::PKCS_ED25519,
        Algorithm::ES256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        _ => return Err(KeyError::Unsupported),
    };
    let pair = rcgen::KeyPair::generate_for(alg).map_err(|e| KeyError::Unusable(e.to_string()))?;
    Ok(pair.serialize_pem())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn claims() -> ReceiptClaims {
        ReceiptClaims {
            platform: "spiffe://platform-a".into(),
            number_sha256: number_sha256("+14155550123"),
            since: "2024-01-01".into(),
            status: "REASSIGNMENT_STATUS_NOT_REASSIGNED".into(),
            no_data_reason: None,
            data_as_of: "2026-11-01".into(),
            sequence: 7,
            iat: 1_800_000_000,
            jti: "req-1".into(),
        }
    }

    #[test]
    fn sign_and_verify_both_algorithms() {
        for alg in [Algorithm::EdDSA, Algorithm::ES256] {
            let pem = generate_key_pem(alg).unwrap();
            let signer = ReceiptSigner::from_pem(pem.as_bytes(), None).unwrap();
            assert_eq!(signer.algorithm(), alg);
            let receipt = signer.sign(&claims()).unwrap();
            let jwks = parse_jwks(signer.jwks_json()).unwrap();
            let got = verify(&receipt, &jwks).unwrap();
            assert_eq!(got, claims());
            check_number(&got, "+14155550123").unwrap();
            assert_eq!(
                check_number(&got, "+14155550124"),
                Err(VerifyError::NumberMismatch)
            );
            let header = jsonwebtoken::decode_header(&receipt).unwrap();
            assert_eq!(header.kid.as_deref(), Some(signer.kid()));
            assert!(!signer.jwks_json().contains("\"d\""), "no private part");
        }
    }

    #[test]
    fn tampering_and_unknown_keys_fail() {
        let signer =
            ReceiptSigner::from_pem(generate_key_pem(Algorithm::EdDSA).unwrap().as_bytes(), None).unwrap();
        let other = ReceiptSigner::from_pem(
            generate_key_pem(Algorithm::EdDSA).unwrap().as_bytes(),
            Some(signer.kid().to_owned()),
        )
        .unwrap();
        let receipt = signer.sign(&claims()).unwrap();
        // Same kid, other key: the signature does not verify.
        assert!(matches!(
            verify(&receipt, &other.jwks()),
            Err(VerifyError::Invalid(_))
        ));
        // One changed byte in the payload.
        let mut bytes = receipt.clone().into_bytes();
        let dot = receipt.find('.').unwrap();
        bytes[dot + 5] = if bytes[dot + 5] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(bytes).unwrap();
        assert!(verify(&tampered, &signer.jwks()).is_err());
        assert!(matches!(
            verify(&receipt, &JwkSet::default()),
            Err(VerifyError::UnknownKey(_))
        ));
    }

    #[test]
    fn explicit_kid_and_unsupported_keys() {
        let pem = generate_key_pem(Algorithm::ES256).unwrap();
        let signer = ReceiptSigner::from_pem(pem.as_bytes(), Some("k1".into())).unwrap();
        assert_eq!(signer.kid(), "k1");
        let rsa_like = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        assert_eq!(
            ReceiptSigner::from_pem(rsa_like.serialize_pem().as_bytes(), None).unwrap_err(),
            KeyError::Unsupported
        );
        assert!(matches!(
            ReceiptSigner::from_pem(b"nothing", None),
            Err(KeyError::Pem(_))
        ));
    }
}
