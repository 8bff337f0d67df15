//! The README's examples work as written: the config-file tables of
//! "Configuration" are read (and dumped back unchanged), and the issuer
//! snippet of "Production tokens" (Python, PyJWT + cryptography) mints a
//! token that a real server accepts on the certificate it is bound to, and
//! refuses on another.

mod support;

use std::process::Command;
use std::sync::Arc;

use reassigned::api::pb::reassigned_numbers_client::ReassignedNumbersClient;
use reassigned::api::pb::{CheckNumberRequest, GetMirrorStatusRequest};
use reassigned::config::ServeSettings;
use reassigned::quota::QuotaConfig;
use reassigned::store::{AnyStore, EmbeddedStore};
use support::server::{AUDIENCE, Bearer, ISSUER, KID, TestServer};

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README")
}

/// The first fenced block of `lang` after the line containing `marker`.
fn block_after(text: &str, marker: &str, lang: &str) -> String {
    let start = text
        .find(marker)
        .unwrap_or_else(|| panic!("{marker:?} not in the README"));
    let rest = &text[start..];
    let open = format!("```{lang}\n");
    let from = rest
        .find(&open)
        .unwrap_or_else(|| panic!("no {lang} block after {marker:?}"))
        + open.len();
    let len = rest[from..].find("\n```").expect("closed block");
    rest[from..from + len + 1].to_owned()
}

#[test]
fn the_config_file_tables_of_the_readme_are_read_and_dumped_back() {
    let toml = block_after(
        &readme(),
        "Two settings are tables of the config file only",
        "toml",
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("example.toml");
    std::fs::write(&file, &toml).expect("write");
    let settings = ServeSettings::from_file(&file).expect("the README's tables are a config file");
    let quotas =
        QuotaConfig::from_settings(settings.quotas.as_ref(), None, "rn".into()).expect("valid quotas");
    let default = quotas.limits("spiffe://dev.reassigned/other");
    assert_eq!(default.numbers_per_day, Some(1_000_000));
    assert_eq!(
        default.rate.map(|r| (r.requests_per_second, r.burst)),
        Some((50.0, 100))
    );
    let a = quotas.limits("spiffe://dev.reassigned/platform-a");
    assert_eq!(a.rate.map(|r| r.requests_per_second), Some(500.0));
    assert_eq!(a.numbers_per_day, Some(1_000_000), "taken from default");
    let retired = settings.receipt_retired_keys.clone().expect("retired keys");
    assert_eq!(retired.len(), 1);
    assert_eq!(retired[0].not_after, "2026-11-30");
    // Dumped with the defaults, read back, dumped again: the same text.
    let dumped = settings.to_toml().expect("dump");
    let again = dir.path().join("dumped.toml");
    std::fs::write(&again, &dumped).expect("write");
    let reread = ServeSettings::from_file(&again).expect("the dump is a config file");
    assert_eq!(reread.to_toml().expect("dump"), dumped);
}

#[tokio::test]
async fn the_production_token_snippet_mints_a_token_the_server_accepts() {
    let python = block_after(&readme(), "### Production tokens", "python");
    let has_libs = Command::new("python3")
        .args(["-c", "import jwt, cryptography"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has_libs,
        "python3 with PyJWT and cryptography is needed: pip install pyjwt cryptography (.ci/run does)"
    );
    let store = AnyStore::Embedded(Arc::new(EmbeddedStore::new()));
    let server = TestServer::start(store, |_| {}).await;
    let tokens = server.tokens.as_ref().expect("tokens on");
    let dir = tempfile::tempdir().expect("tempdir");
    let script = dir.path().join("issue.py");
    std::fs::write(&script, &python).expect("write");
    let identity = server.certs.client("platform-a");
    let cert = dir.path().join("platform-a.pem");
    std::fs::write(&cert, &identity.cert_pem).expect("write");
    let key = dir.path().join("issuer.key");
    std::fs::write(&key, tokens.key.private_pem()).expect("write");
    let out = Command::new("python3")
        .arg(&script)
        .env("CLIENT_CERT", &cert)
        .env("ISSUER_KEY", &key)
        .env("TOKEN_ISSUER", ISSUER)
        .env("TOKEN_AUDIENCE", AUDIENCE)
        .env("KID", KID)
        .output()
        .expect("run python3");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).expect("utf-8").trim().to_owned();
    assert_eq!(token.split('.').count(), 3, "a compact JWS: {token}");

    let mut client =
        ReassignedNumbersClient::new(server.channel_bearing(&identity, Bearer::new(&token)).await);
    client
        .check_number(CheckNumberRequest {
            phone_number: "+14155550001".into(),
            since: "2024-01-01".into(),
            ..Default::default()
        })
        .await
        .expect("numbers:check granted");
    client
        .get_mirror_status(GetMirrorStatusRequest::default())
        .await
        .expect("mirror:read granted");
    let denied = client
        .batch_check_numbers(reassigned::api::pb::BatchCheckNumbersRequest::default())
        .await
        .expect_err("numbers:batch not granted");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);

    // The same token on another platform's certificate: refused (bound).
    let other = server.certs.client("platform-b");
    let mut stolen = ReassignedNumbersClient::new(server.channel_bearing(&other, Bearer::new(&token)).await);
    let refused = stolen
        .get_mirror_status(GetMirrorStatusRequest::default())
        .await
        .expect_err("bound to platform-a's certificate");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    server.stop().await;
}
