//! `reassigned receipt verify`: checks a receipt offline against a JWKS (as
//! served by `GetSigningKeys`, retired keys included) and the number it
//! should be about; `reassigned receipt jwks`: the public JWKS of a receipt
//! key, to keep when the key is retired.

use std::io::Read as _;
use std::path::Path;

use anyhow::Context as _;

use crate::domain::PhoneNumber;
use crate::receipt::{self, ReceiptClaims};

/// Verifies `receipt` (its text, or `-` to read it from stdin) with the keys
/// of the JWKS file `jwks`, and checks that it is about `number` (E.164).
/// Returns the claims; any mismatch is an error that says what differs.
pub fn verify_cmd(jwks: &Path, number: &str, receipt: &str) -> anyhow::Result<ReceiptClaims> {
    let text =
        std::fs::read_to_string(jwks).with_context(|| format!("cannot read the JWKS {}", jwks.display()))?;
    let keys = receipt::parse_receipt_keys(&text).with_context(|| format!("in {}", jwks.display()))?;
    let number = PhoneNumber::parse(number).map_err(|e| anyhow::anyhow!("--number: {e}"))?;
    let receipt = if receipt == "-" {
        let mut buf = String::new();
        std::io::stdin()
            .read_to_string(&mut buf)
            .context("cannot read the receipt from stdin")?;
        buf
    } else {
        receipt.to_owned()
    };
    let claims = receipt::verify_receipt(receipt.trim(), &keys).context("receipt rejected")?;
    receipt::check_number(&claims, &number.to_string()).context("receipt rejected")?;
    Ok(claims)
}

/// `reassigned receipt jwks`: the public JWKS of the receipt key `key`
/// (PKCS#8 PEM) under `kid` (default: derived as `serve` does).
pub fn jwks_cmd(key: &Path, kid: Option<String>) -> anyhow::Result<String> {
    let signer = receipt::ReceiptSigner::from_pem_file(key, kid)?;
    Ok(signer.jwks_json().to_owned())
}
