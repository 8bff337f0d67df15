//! HMAC-SHA-256 (RFC 2104) and the secret files that key it: the audit
//! trail's number hashes, the platforms' watch lists and the webhook
//! signatures all use it.

use sha2::{Digest, Sha256};

/// HMAC-SHA256 (RFC 2104) with the pads precomputed.
#[derive(Clone)]
pub struct HmacKey {
    inner: Sha256,
    outer: Sha256,
}

impl std::fmt::Debug for HmacKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HmacKey(<redacted>)")
    }
}

impl HmacKey {
    /// The key of `secret` (any length; longer than a block is hashed first).
    pub fn new(secret: &[u8]) -> Self {
        let mut block = [0u8; 64];
        if secret.len() > 64 {
            block[..32].copy_from_slice(&Sha256::digest(secret));
        } else {
            block[..secret.len()].copy_from_slice(secret);
        }
        let pad = |byte: u8| {
            let mut h = Sha256::new();
            h.update(block.map(|b| b ^ byte));
            h
        };
        Self {
            inner: pad(0x36),
            outer: pad(0x5c),
        }
    }

    /// The MAC of `message`.
    pub fn mac(&self, message: &[u8]) -> [u8; 32] {
        let mut inner = self.inner.clone();
        inner.update(message);
        let mut outer = self.outer.clone();
        outer.update(inner.finalize());
        outer.finalize().into()
    }
}

/// The least length of a secret read by [`read_secret`].
pub const MIN_SECRET_BYTES: usize = 16;

/// Reads the secret in `path` (its bytes without a trailing newline), at
/// least [`MIN_SECRET_BYTES`] long; `what` names it in errors (the secret
/// itself never appears in them).
pub fn read_secret(path: &std::path::Path, what: &str) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read the {what} {}: {e}", path.display()))?;
    let secret = trim_secret(&bytes);
    if secret.len() < MIN_SECRET_BYTES {
        return Err(format!("the {what} must hold at least {MIN_SECRET_BYTES} bytes"));
    }
    Ok(secret.to_vec())
}

/// A secret file's bytes without a trailing newline.
fn trim_secret(bytes: &[u8]) -> &[u8] {
    let mut end = bytes.len();
    while end > 0 && matches!(bytes[end - 1], b'\n' | b'\r') {
        end -= 1;
    }
    &bytes[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        let key = HmacKey::new(b"Jefe");
        assert_eq!(
            hex::encode(key.mac(b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn secrets_lose_their_newline() {
        assert_eq!(trim_secret(b"abc\r\n"), b"abc");
    }
}
