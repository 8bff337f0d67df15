//! Signed receipts over a real server (mutual TLS and bearer tokens, the
//! embedded store): claims match the answer, verify against
//! `GetSigningKeys`, with the library and with `reassigned receipt verify`;
//! tampering and a wrong number are refused.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::Algorithm;
use reassigned::api::pb::{
    self, BatchCheckNumbersRequest, CheckNumberRequest, GetSigningKeysRequest, NoDataReason,
    ReassignmentStatus, batch_check_result,
};
use reassigned::cli::certs::platform_uri;
use reassigned::config::RetiredKeySetting;
use reassigned::domain::Date;
use reassigned::import::{self, NoProgress};
use reassigned::receipt::{self, ReceiptClaims, ReceiptSigner, VerifyError, number_sha256};
use reassigned::store::{AnyStore, EmbeddedStore};
use support::register::FileSpec;
use support::server::TestServer;
use tempfile::TempDir;
use tonic::Code;

const A: &str = "+14155550001"; // disconnected 2024-05-01
const ABSENT: &str = "+14155550099";
const FOREIGN: &str = "+442079460000";
const SEQUENCE: u64 = 3;

fn days_ago(n: i32) -> String {
    Date::today_utc().add_days(-n).to_string()
}

fn req(phone_number: &str, since: &str, want_receipt: bool) -> CheckNumberRequest {
    CheckNumberRequest {
        phone_number: phone_number.into(),
        since: since.into(),
        want_receipt,
    }
}

/// A loaded embedded store, a receipt key file, and the server over both.
struct Env {
    server: TestServer,
    files: TempDir,
}

impl Env {
    /// `key`: the receipt key algorithm, or `None` for a server without one.
    async fn start(key: Option<Algorithm>) -> Self {
        let files = tempfile::tempdir().expect("tempdir");
        let store = AnyStore::Embedded(Arc::new(EmbeddedStore::new()));
        let snapshot = FileSpec::snapshot(
            SEQUENCE,
            &days_ago(1),
            "2021-01-27",
            &["+1"],
            &[(A, "2024-05-01"), ("+14155550002", "2022-03-03")],
        );
        let manifest = snapshot.write(files.path(), "s3");
        import::apply_manifest(&store, &manifest, &mut NoProgress)
            .await
            .expect("snapshot");
        let key_file = key.map(|alg| {
            let path = files.path().join("receipt.key");
            std::fs::write(&path, receipt::generate_key_pem(alg).expect("key")).expect("write key");
            path
        });
        let server = TestServer::start(store, |s| s.receipt_key = key_file).await;
        Self { server, files }
    }

    async fn client(
        &self,
    ) -> pb::reassigned_numbers_client::ReassignedNumbersClient<support::server::TestChannel> {
        self.server.client().await
    }

    /// The results of `BatchCheckNumbers` as platform-a; fails the test if
    /// the call fails.
    async fn batch(
        &self,
        request: impl tonic::IntoRequest<BatchCheckNumbersRequest>,
    ) -> Vec<pb::BatchCheckResult> {
        self.client()
            .await
            .batch_check_numbers(request)
            .await
            .expect("batch")
            .into_inner()
            .results
    }

    /// The JWKS from `GetSigningKeys`, also written to a file for the CLI.
    async fn jwks(&self) -> (jsonwebtoken::jwk::JwkSet, PathBuf) {
        let jwks = self
            .client()
            .await
            .get_signing_keys(GetSigningKeysRequest {})
            .await
            .expect("GetSigningKeys")
            .into_inner()
            .jwks;
        let path = self.files.path().join("jwks.json");
        std::fs::write(&path, &jwks).expect("write jwks");
        (receipt::parse_jwks(&jwks).expect("jwks parses"), path)
    }
}

/// Runs `reassigned receipt verify`.
fn cli_verify(jwks: &Path, number: &str, receipt: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_reassigned"))
        .args(["receipt", "verify", "--jwks"])
        .arg(jwks)
        .args(["--number", number, receipt])
        .output()
        .expect("run reassigned")
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

#[tokio::test]
async fn receipt_matches_the_answer_and_verifies() {
    let env = Env::start(Some(Algorithm::EdDSA)).await;
    let mut request = tonic::Request::new(req(A, "2024-01-01", true));
    request
        .metadata_mut()
        .insert("x-request-id", "login-42".parse().expect("ascii"));
    let before = now_unix();
    let answer = env
        .client()
        .await
        .check_number(request)
        .await
        .expect("check")
        .into_inner();
    assert_eq!(answer.status(), ReassignmentStatus::Reassigned);
    assert!(!answer.receipt.is_empty());

    let (jwks, jwks_path) = env.jwks().await;
    let claims = receipt::verify(&answer.receipt, &jwks).expect("verifies");
    receipt::check_number(&claims, A).expect("about A");
    assert_eq!(claims.platform, platform_uri("platform-a"));
    assert_eq!(claims.number_sha256, number_sha256(A));
    assert_eq!(claims.since, "2024-01-01");
    assert_eq!(claims.status, "REASSIGNMENT_STATUS_REASSIGNED");
    assert_eq!(claims.no_data_reason, None);
    assert_eq!(claims.data_as_of, answer.data_as_of);
    assert_eq!(claims.sequence, SEQUENCE);
    assert_eq!(claims.jti, "login-42");
    assert!((before..=now_unix()).contains(&claims.iat), "iat {}", claims.iat);
    assert!(
        !answer.receipt.contains(&A[1..]),
        "the number is not in the receipt"
    );
    let header = jsonwebtoken::decode_header(&answer.receipt).expect("header");
    assert_eq!(header.alg, Algorithm::EdDSA);
    assert!(jwks.find(header.kid.as_deref().expect("kid")).is_some());

    // The same with the binary.
    let out = cli_verify(&jwks_path, A, &answer.receipt);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: ReceiptClaims = serde_json::from_slice(&out.stdout).expect("claims JSON on stdout");
    assert_eq!(printed, claims);

    // Without x-request-id, the id is generated (128-bit hex), fresh per call.
    let mut client = env.client().await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let answer = client
            .check_number(req(ABSENT, "2024-01-01", true))
            .await
            .expect("check")
            .into_inner();
        let claims = receipt::verify(&answer.receipt, &jwks).expect("verifies");
        assert_eq!(claims.status, "REASSIGNMENT_STATUS_NOT_REASSIGNED");
        assert_eq!(claims.jti.len(), 32);
        assert!(claims.jti.bytes().all(|b| b.is_ascii_hexdigit()));
        ids.push(claims.jti);
    }
    assert_ne!(ids[0], ids[1]);
    env.server.stop().await;
}

#[tokio::test]
async fn tampered_or_misdirected_receipts_are_refused() {
    let env = Env::start(Some(Algorithm::ES256)).await;
    let answer = env
        .client()
        .await
        .check_number(req(ABSENT, "2024-01-01", true))
        .await
        .expect("check")
        .into_inner();
    let (jwks, jwks_path) = env.jwks().await;
    assert_eq!(
        jsonwebtoken::decode_header(&answer.receipt).expect("header").alg,
        Algorithm::ES256
    );
    receipt::verify(&answer.receipt, &jwks).expect("the original verifies");

    // One changed byte, in the payload and in the signature.
    let payload_at = answer.receipt.find('.').expect("dot") + 3;
    let signature_at = answer.receipt.rfind('.').expect("dot") + 3;
    for at in [payload_at, signature_at] {
        let mut bytes = answer.receipt.clone().into_bytes();
        bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(bytes).expect("ascii");
        assert!(receipt::verify(&tampered, &jwks).is_err());
        let out = cli_verify(&jwks_path, ABSENT, &tampered);
        assert!(!out.status.success(), "tampered receipt accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("receipt rejected"), "{stderr}");
        assert!(out.stdout.is_empty());
    }

    // A genuine receipt for another number.
    let claims = receipt::verify(&answer.receipt, &jwks).expect("verifies");
    assert_eq!(
        receipt::check_number(&claims, A),
        Err(VerifyError::NumberMismatch)
    );
    let out = cli_verify(&jwks_path, A, &answer.receipt);
    assert!(!out.status.success(), "receipt for another number accepted");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("another number"), "{stderr}");
    assert!(!stderr.contains(&A[1..]), "the number is not echoed");

    // Keys of another server do not verify it.
    let other = ReceiptSigner::from_pem(
        receipt::generate_key_pem(Algorithm::ES256)
            .expect("key")
            .as_bytes(),
        jsonwebtoken::decode_header(&answer.receipt).expect("header").kid,
    )
    .expect("signer");
    assert!(matches!(
        receipt::verify(&answer.receipt, &other.jwks()),
        Err(VerifyError::Invalid(_))
    ));
    env.server.stop().await;
}

#[tokio::test]
async fn a_batch_gets_one_receipt_per_answer() {
    let env = Env::start(Some(Algorithm::EdDSA)).await;
    let (jwks, _) = env.jwks().await;
    let checks = vec![
        req(A, "2024-01-01", false),
        req(ABSENT, "2024-01-01", false),
        req("not a number", "2024-01-01", false),
        req(FOREIGN, "2024-01-01", false),
    ];
    let mut request = tonic::Request::new(BatchCheckNumbersRequest {
        checks,
        want_receipts: true,
    });
    request
        .metadata_mut()
        .insert("x-request-id", "hygiene-7".parse().expect("ascii"));
    let results = env.batch(request).await;
    assert_eq!(results.len(), 4);
    let expected = [
        (A, "REASSIGNMENT_STATUS_REASSIGNED", None),
        (ABSENT, "REASSIGNMENT_STATUS_NOT_REASSIGNED", None),
        ("", "", None),
        (
            FOREIGN,
            "REASSIGNMENT_STATUS_NO_DATA",
            Some(NoDataReason::NumberNotCovered.as_str_name().to_owned()),
        ),
    ];
    for (i, (result, (number, status, reason))) in results.iter().zip(expected).enumerate() {
        match &result.result {
            Some(batch_check_result::Result::Answer(answer)) => {
                let claims = receipt::verify(&answer.receipt, &jwks).expect("verifies");
                receipt::check_number(&claims, number).expect("right number");
                assert_eq!(claims.status, status, "item {i}");
                assert_eq!(claims.no_data_reason, reason, "item {i}");
                assert_eq!(claims.jti, format!("hygiene-7.{i}"));
                assert_eq!(claims.platform, platform_uri("platform-a"));
            }
            Some(batch_check_result::Result::Error(e)) => {
                assert_eq!(i, 2, "only the malformed item fails");
                assert_eq!(e.code, "INVALID_ARGUMENT");
            }
            None => panic!("item {i} empty"),
        }
    }

    // Without want_receipts only the checks that ask get one.
    let results = env
        .batch(BatchCheckNumbersRequest {
            checks: vec![req(A, "2024-01-01", false), req(ABSENT, "2024-01-01", true)],
            want_receipts: false,
        })
        .await;
    let receipts: Vec<_> = results
        .iter()
        .map(|r| match &r.result {
            Some(batch_check_result::Result::Answer(a)) => a.receipt.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert!(receipts[0].is_empty());
    let claims = receipt::verify(&receipts[1], &jwks).expect("verifies");
    receipt::check_number(&claims, ABSENT).expect("right number");
    env.server.stop().await;
}

#[tokio::test]
async fn streams_sign_the_checks_that_ask() {
    let env = Env::start(Some(Algorithm::EdDSA)).await;
    let (jwks, _) = env.jwks().await;
    let checks = vec![
        req(A, "2024-01-01", true),
        req(ABSENT, "2024-01-01", false),
        req(ABSENT, "2024-01-01", true),
    ];
    let mut stream = env
        .client()
        .await
        .stream_check_numbers(tokio_stream::iter(checks))
        .await
        .expect("stream")
        .into_inner();
    let mut receipts = Vec::new();
    while let Some(item) = stream.message().await.expect("item") {
        match item.result {
            Some(batch_check_result::Result::Answer(a)) => receipts.push(a.receipt),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(receipts.len(), 3);
    assert!(receipts[1].is_empty());
    for (i, number) in [(0, A), (2, ABSENT)] {
        let claims = receipt::verify(&receipts[i], &jwks).expect("verifies");
        receipt::check_number(&claims, number).expect("right number");
        assert!(claims.jti.ends_with(&format!(".{i}")), "{}", claims.jti);
    }
    env.server.stop().await;
}

#[tokio::test]
async fn no_receipt_unless_asked() {
    let env = Env::start(Some(Algorithm::EdDSA)).await;
    let mut client = env.client().await;
    let answer = client
        .check_number(req(A, "2024-01-01", false))
        .await
        .expect("check")
        .into_inner();
    assert_eq!(answer.status(), ReassignmentStatus::Reassigned);
    assert!(answer.receipt.is_empty());
    let results = client
        .batch_check_numbers(BatchCheckNumbersRequest {
            checks: vec![req(A, "2024-01-01", false), req(ABSENT, "2024-01-01", false)],
            want_receipts: false,
        })
        .await
        .expect("batch")
        .into_inner()
        .results;
    for r in results {
        match r.result {
            Some(batch_check_result::Result::Answer(a)) => assert!(a.receipt.is_empty()),
            other => panic!("{other:?}"),
        }
    }
    env.server.stop().await;
}

#[tokio::test]
async fn without_a_key_receipts_are_a_failed_precondition() {
    let env = Env::start(None).await;
    let mut client = env.client().await;
    let e = client
        .check_number(req(A, "2024-01-01", true))
        .await
        .expect_err("no key");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(e.message(), "receipts are not configured on this server");
    let e = client
        .batch_check_numbers(BatchCheckNumbersRequest {
            checks: vec![req(A, "2024-01-01", false)],
            want_receipts: true,
        })
        .await
        .expect_err("no key");
    assert_eq!(e.code(), Code::FailedPrecondition);
    let e = client
        .get_signing_keys(GetSigningKeysRequest {})
        .await
        .expect_err("no key");
    assert_eq!(e.code(), Code::FailedPrecondition);
    // Answers without receipts are unaffected.
    let answer = client
        .check_number(req(A, "2024-01-01", false))
        .await
        .expect("check")
        .into_inner();
    assert_eq!(answer.status(), ReassignmentStatus::Reassigned);
    env.server.stop().await;
}

/// `reassigned keys generate` makes keys usable for receipts, and the `kid`
/// of its `jwks.json` is the one receipts carry.
#[test]
fn keys_generate_makes_receipt_keys() {
    for alg in [
        reassigned::cli::token::KeyAlg::EdDsa,
        reassigned::cli::token::KeyAlg::Es256,
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = reassigned::cli::token::generate_keys(dir.path(), alg, None).expect("keys generate");
        let signer =
            ReceiptSigner::from_pem_file(&dir.path().join(reassigned::cli::token::ISSUER_KEY_FILE), None)
                .expect("usable as a receipt key");
        assert_eq!(signer.kid(), key.kid());
        let jwks = std::fs::read_to_string(dir.path().join(reassigned::cli::token::JWKS_FILE)).expect("jwks");
        let jwks = receipt::parse_jwks(&jwks).expect("jwks parses");
        let claims = ReceiptClaims {
            platform: "p".into(),
            number_sha256: number_sha256(A),
            since: "2024-01-01".into(),
            status: "REASSIGNMENT_STATUS_NOT_REASSIGNED".into(),
            no_data_reason: None,
            data_as_of: "2026-01-01".into(),
            sequence: 1,
            iat: 0,
            jti: "x".into(),
        };
        let signed = signer.sign(&claims).expect("sign");
        assert_eq!(
            receipt::verify(&signed, &jwks).expect("verifies with keys generate's jwks.json"),
            claims
        );
    }
}

/// What one receipt costs to sign, per algorithm, on one core. A
/// measurement, not a check: run it in release,
/// `cargo test --release --test receipts signing_cost -- --ignored --nocapture`.
#[test]
#[ignore = "measurement; run in release with --ignored --nocapture"]
fn signing_cost() {
    const N: u32 = 20_000;
    for alg in [Algorithm::EdDSA, Algorithm::ES256] {
        let signer = ReceiptSigner::from_pem(receipt::generate_key_pem(alg).expect("key").as_bytes(), None)
            .expect("signer");
        let mut claims = ReceiptClaims {
            platform: platform_uri("platform-a"),
            number_sha256: number_sha256(A),
            since: "2024-01-01".into(),
            status: "REASSIGNMENT_STATUS_NOT_REASSIGNED".into(),
            no_data_reason: None,
            data_as_of: "2026-11-28".into(),
            sequence: 42,
            iat: now_unix(),
            jti: "0123456789abcdef0123456789abcdef".into(),
        };
        signer.sign(&claims).expect("warm up");
        let started = std::time::Instant::now();
        let mut bytes = 0;
        for i in 0..N {
            claims.sequence = u64::from(i);
            bytes += signer.sign(&claims).expect("sign").len();
        }
        let per = started.elapsed() / N;
        println!(
            "{alg:?}: {per:?} per receipt ({:.0}/s on one core), {} bytes each",
            1.0 / per.as_secs_f64(),
            bytes / N as usize
        );
    }
}

/// A bad receipt key stops `serve` at config time, before it binds.
#[test]
fn bad_receipt_settings_are_refused_at_start() {
    let certs = support::server::Certs::mint();
    let data = tempfile::tempdir().expect("tempdir");
    let settings = |key: Option<PathBuf>, kid: Option<&str>| reassigned::config::ServeSettings {
        tls_cert: Some(certs.server_cert.clone()),
        tls_key: Some(certs.server_key.clone()),
        client_ca: Some(certs.ca.clone()),
        data_dir: Some(data.path().to_owned()),
        tokens: Some(false),
        receipt_key: key,
        receipt_kid: kid.map(str::to_owned),
        ..Default::default()
    };
    let from = reassigned::config::ServeConfig::from_settings;
    // A certificate is not a key.
    let e = from(settings(Some(certs.server_cert.clone()), None)).expect_err("not a key");
    assert!(e.to_string().contains("receipt_key"), "{e}");
    let e = from(settings(Some(data.path().join("missing.key")), None)).expect_err("missing");
    assert!(e.to_string().contains("receipt_key"), "{e}");
    let e = from(settings(None, Some("k1"))).expect_err("kid without key");
    assert!(e.to_string().contains("receipt_kid"), "{e}");
    let key = data.path().join("receipt.key");
    std::fs::write(&key, receipt::generate_key_pem(Algorithm::EdDSA).expect("key")).expect("write");
    let config = from(settings(Some(key.clone()), Some("k1"))).expect("valid");
    assert_eq!(config.receipt_key, Some(key));
    assert_eq!(config.receipt_kid.as_deref(), Some("k1"));
}

/// A store loaded with the test snapshot.
async fn loaded_store(dir: &Path) -> AnyStore {
    let store = AnyStore::Embedded(Arc::new(EmbeddedStore::new()));
    let snapshot = FileSpec::snapshot(
        SEQUENCE,
        &days_ago(1),
        "2021-01-27",
        &["+1"],
        &[(A, "2024-05-01"), ("+14155550002", "2022-03-03")],
    );
    let manifest = snapshot.write(dir, "s3");
    import::apply_manifest(&store, &manifest, &mut NoProgress)
        .await
        .expect("snapshot");
    store
}

/// A server signing with `key`, publishing `retired` (`(file, not_after)`).
async fn serve_rotated(dir: &Path, key: &Path, retired: &[(&Path, &str)]) -> TestServer {
    let store = loaded_store(dir).await;
    let retired: Vec<RetiredKeySetting> = retired
        .iter()
        .map(|(path, not_after)| RetiredKeySetting {
            path: path.to_path_buf(),
            not_after: (*not_after).to_owned(),
        })
        .collect();
    let key = key.to_path_buf();
    TestServer::start(store, move |s| {
        s.receipt_key = Some(key);
        s.receipt_retired_keys = (!retired.is_empty()).then_some(retired);
    })
    .await
}

async fn receipt_from(server: &TestServer) -> String {
    let answer = server
        .client()
        .await
        .check_number(req(A, "2024-01-01", true))
        .await
        .expect("check")
        .into_inner();
    assert!(!answer.receipt.is_empty());
    answer.receipt
}

async fn signing_keys(server: &TestServer) -> String {
    server
        .client()
        .await
        .get_signing_keys(GetSigningKeysRequest {})
        .await
        .expect("GetSigningKeys")
        .into_inner()
        .jwks
}

fn kid_of(receipt: &str) -> String {
    jsonwebtoken::decode_header(receipt)
        .expect("header")
        .kid
        .expect("kid")
}

#[tokio::test]
async fn receipts_signed_before_a_key_rotation_still_verify() {
    let dir = tempfile::tempdir().expect("tempdir");
    let old_key = dir.path().join("old.key");
    let new_key = dir.path().join("new.key");
    std::fs::write(
        &old_key,
        receipt::generate_key_pem(Algorithm::EdDSA).expect("key"),
    )
    .expect("write");
    std::fs::write(
        &new_key,
        receipt::generate_key_pem(Algorithm::ES256).expect("key"),
    )
    .expect("write");

    // Before the rotation: a receipt under the old key.
    let before = serve_rotated(dir.path(), &old_key, &[]).await;
    let old_receipt = receipt_from(&before).await;
    let old_kid = kid_of(&old_receipt);
    before.stop().await;

    // The operator keeps the old public key (`receipt jwks`) ...
    let out = Command::new(env!("CARGO_BIN_EXE_reassigned"))
        .args(["receipt", "jwks", "--key"])
        .arg(&old_key)
        .output()
        .expect("run reassigned");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let old_jwks = dir.path().join("old.jwks.json");
    std::fs::write(&old_jwks, &out.stdout).expect("write");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("\"d\""),
        "no private part"
    );

    // Without it (as before this fix), the new server's keys cannot verify
    // the old receipt.
    let forgetful = serve_rotated(dir.path(), &new_key, &[]).await;
    let keys = receipt::parse_receipt_keys(&signing_keys(&forgetful).await).expect("jwks");
    assert_eq!(
        receipt::verify_receipt(&old_receipt, &keys),
        Err(VerifyError::UnknownKey(old_kid.clone()))
    );
    forgetful.stop().await;

    // ... and publishes it as retired on the rotated server.
    let today = Date::today_utc().to_string();
    let after = serve_rotated(dir.path(), &new_key, &[(&old_jwks, &today)]).await;
    let jwks_text = signing_keys(&after).await;
    let jwks_file = dir.path().join("published.jwks.json");
    std::fs::write(&jwks_file, &jwks_text).expect("write");
    let keys = receipt::parse_receipt_keys(&jwks_text).expect("jwks");
    assert_eq!(keys.set.keys.len(), 2, "{jwks_text}");
    assert!(keys.not_after.contains_key(&old_kid), "{jwks_text}");
    assert!(!jwks_text.contains("\"d\""), "no private part");
    // The old receipt verifies, with the library and with the CLI.
    let claims = receipt::verify_receipt(&old_receipt, &keys).expect("old receipt verifies");
    receipt::check_number(&claims, A).expect("same number");
    let out = cli_verify(&jwks_file, A, &old_receipt);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // New receipts are signed with the new key only, and verify too.
    let new_receipt = receipt_from(&after).await;
    assert_ne!(kid_of(&new_receipt), old_kid);
    receipt::verify_receipt(&new_receipt, &keys).expect("new receipt verifies");
    assert!(cli_verify(&jwks_file, A, &new_receipt).status.success());
    after.stop().await;

    // A receipt claiming a time after its key's window is refused.
    let early = serve_rotated(dir.path(), &new_key, &[(&old_jwks, "2020-01-01")]).await;
    let jwks_text = signing_keys(&early).await;
    let keys = receipt::parse_receipt_keys(&jwks_text).expect("jwks");
    assert!(matches!(
        receipt::verify_receipt(&old_receipt, &keys),
        Err(VerifyError::KeyRetired { ref kid, .. }) if *kid == old_kid
    ));
    std::fs::write(&jwks_file, &jwks_text).expect("write");
    let out = cli_verify(&jwks_file, A, &old_receipt);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("retired"),
        "{out:?}"
    );
    early.stop().await;
}

#[tokio::test]
async fn bad_retired_keys_are_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("receipt.key");
    let pem = receipt::generate_key_pem(Algorithm::EdDSA).expect("key");
    std::fs::write(&key, &pem).expect("write");
    let signer = ReceiptSigner::from_pem(pem.as_bytes(), None).expect("signer");
    let own = dir.path().join("own.jwks.json");
    std::fs::write(&own, signer.jwks_json()).expect("write");
    let private = dir.path().join("private.json");
    std::fs::write(
        &private,
        r#"{"kty":"OKP","crv":"Ed25519","x":"AAAA","d":"BBBB","kid":"k"}"#,
    )
    .expect("write");
    let certs = support::server::Certs::mint();
    for (retired, why) in [
        (own.clone(), "kid"),                        // the current key again
        (private, "private"),                        // private key material
        (dir.path().join("nope.json"), "nope.json"), // missing
    ] {
        let settings = reassigned::config::ServeSettings {
            tls_cert: Some(certs.server_cert.clone()),
            tls_key: Some(certs.server_key.clone()),
            client_ca: Some(certs.ca.clone()),
            data_dir: Some(dir.path().to_owned()),
            tokens: Some(false),
            receipt_key: Some(key.clone()),
            receipt_retired_keys: Some(vec![RetiredKeySetting {
                path: retired,
                not_after: "2026-01-01".into(),
            }]),
            ..Default::default()
        };
        let e = reassigned::config::ServeConfig::from_settings(settings).expect_err(why);
        assert!(e.to_string().contains("receipt_retired_keys"), "{e}");
        assert!(e.to_string().contains(why), "{e} should say {why}");
    }
}
