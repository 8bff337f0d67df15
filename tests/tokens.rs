//! Certificate-bound bearer tokens (RFC 8705) over real mutual TLS: a real
//! server with a JWKS minted per test, real signed tokens, and the refusals
//! (UNAUTHENTICATED for a missing or bad token, PERMISSION_DENIED for a
//! missing scope) with messages that name the reason and never the token.
//! Also the JWKS reload (by call and by file change) and the CLI's
//! `keys generate` + `token mint` against `serve`.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reassigned::api::pb::reassigned_numbers_client::ReassignedNumbersClient;
use reassigned::api::pb::{BatchCheckNumbersRequest, CheckNumberRequest, GetMirrorStatusRequest};
use reassigned::cli::certs::PemPair;
use reassigned::cli::token::{IssuerKey, KeyAlg, jwks_json, now_secs};
use reassigned::import::{self, NoProgress};
use reassigned::server::token::{TokenClaims, scope};
use reassigned::store::{AnyStore, EmbeddedStore};
use support::bin::{Killed, bin, connect_as_platform_a, dev_certs, dev_tls_args, free_port, run};
use support::poll::eventually;
use support::register::FileSpec;
use support::server::{Bearer, TestChannel, TestServer};
use tempfile::TempDir;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const A: &str = "+14155550001";

/// A server (tokens on) over an embedded store holding one snapshot, and the
/// client certificate of platform-a that the helpers call with.
struct Env {
    server: TestServer,
    me: PemPair,
    _files: TempDir,
}

async fn serve() -> Env {
    let store = AnyStore::Embedded(Arc::new(EmbeddedStore::new()));
    let files = tempfile::tempdir().expect("tempdir");
    let manifest = FileSpec::snapshot(1, "2025-01-01", "2021-01-27", &["+1"], &[(A, "2024-05-01")])
        .write(files.path(), "s1");
    import::apply_manifest(&store, &manifest, &mut NoProgress)
        .await
        .expect("snapshot");
    let server = TestServer::start(store, |_| {}).await;
    let me = server.certs.client("platform-a");
    Env {
        server,
        me,
        _files: files,
    }
}

fn check_req() -> CheckNumberRequest {
    CheckNumberRequest {
        phone_number: A.into(),
        since: "2024-01-01".into(),
        ..Default::default()
    }
}

/// Each method that needs a scope, and the scope.
#[derive(Clone, Copy, Debug)]
enum Method {
    Check,
    Batch,
    Stream,
    Status,
}

const METHODS: [(Method, &str); 4] = [
    (Method::Check, scope::CHECK),
    (Method::Batch, scope::BATCH),
    (Method::Stream, scope::BATCH),
    (Method::Status, scope::MIRROR_READ),
];

async fn call(channel: TestChannel, method: Method) -> Result<(), tonic::Status> {
    let mut client = ReassignedNumbersClient::new(channel);
    match method {
        Method::Check => client.check_number(check_req()).await.map(drop),
        Method::Batch => client
            .batch_check_numbers(BatchCheckNumbersRequest {
                checks: vec![check_req()],
                ..Default::default()
            })
            .await
            .map(drop),
        Method::Stream => {
            let mut results = client
                .stream_check_numbers(tokio_stream::iter(vec![check_req()]))
                .await?
                .into_inner();
            while results.message().await?.is_some() {}
            Ok(())
        }
        Method::Status => client
            .get_mirror_status(GetMirrorStatusRequest {})
            .await
            .map(drop),
    }
}

/// `CheckNumber` as platform-a, sending `bearer`.
async fn check_with(env: &Env, bearer: Bearer) -> Result<(), tonic::Status> {
    call(env.server.channel_bearing(&env.me, bearer).await, Method::Check).await
}

/// Asserts a refusal with `code` whose message contains `reason` and not
/// the token.
fn assert_refused(result: Result<(), tonic::Status>, code: Code, reason: &str, token: &str) {
    let status = result.expect_err("the call was served");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(reason),
        "{status:?} should say {reason:?}"
    );
    if !token.is_empty() {
        assert!(
            !status.message().contains(token),
            "the token leaked into the status"
        );
        let signature = token.rsplit('.').next().unwrap_or_default();
        assert!(!format!("{status:?}").contains(signature), "the token leaked");
    }
}

fn tokens(server: &TestServer) -> &support::server::Tokens {
    server.tokens.as_ref().expect("tokens on")
}

/// Mints a token for platform-a after `edit` changed its claims, with `key`.
fn minted(env: &Env, key: &IssuerKey, edit: impl FnOnce(&mut TokenClaims)) -> String {
    let mut claims = tokens(&env.server).claims(&env.me, scope::ALL);
    edit(&mut claims);
    key.mint(&claims).expect("mint")
}

/// Expects `CheckNumber` with a token made by `edit` to be refused for `reason`.
async fn refused_for(env: &Env, reason: &str, edit: impl FnOnce(&mut TokenClaims)) {
    let token = minted(env, &tokens(&env.server).key, edit);
    assert_refused(
        check_with(env, Bearer::new(&token)).await,
        Code::Unauthenticated,
        reason,
        &token,
    );
}

#[tokio::test]
async fn valid_token_calls_every_method() {
    let env = serve().await;
    let server = &env.server;
    for (method, _) in METHODS {
        let channel = server.channel("platform-a").await;
        call(channel, method)
            .await
            .unwrap_or_else(|e| panic!("{method:?}: {e:?}"));
    }
    // and a principal for another platform works with its own token
    call(server.channel("platform-b").await, Method::Check)
        .await
        .expect("platform-b");
    env.server.stop().await;
}

#[tokio::test]
async fn expired_and_not_yet_valid_tokens_are_refused() {
    let env = serve().await;
    let server = &env.server;
    let now = now_secs();
    refused_for(&env, "token expired", |c| {
        c.iat = now - 7200;
        c.nbf = now - 7200;
        c.exp = now - 120; // beyond the 30 s leeway
    })
    .await;
    refused_for(&env, "token not yet valid", |c| {
        c.nbf = now + 600;
        c.exp = now + 3600;
    })
    .await;
    // inside the leeway both still pass
    let token = minted(&env, &tokens(server).key, |c| {
        c.nbf = now + 10;
        c.exp = now + 3600;
    });
    check_with(&env, Bearer::new(&token))
        .await
        .expect("nbf within leeway");
    env.server.stop().await;
}

/// Signs arbitrary JSON claims with the test issuer key (for claims that
/// `TokenClaims` cannot express, such as a missing `iat`).
fn minted_json(env: &Env, claims: &serde_json::Value) -> String {
    let key = &tokens(&env.server).key;
    use rustls_pki_types::pem::PemObject as _;
    let der =
        rustls_pki_types::PrivatePkcs8KeyDer::from_pem_slice(key.private_pem().as_bytes()).expect("der");
    let encoding = jsonwebtoken::EncodingKey::from_ec_der(der.secret_pkcs8_der());
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(key.kid().to_owned());
    jsonwebtoken::encode(&header, claims, &encoding).expect("sign")
}

#[tokio::test]
async fn tokens_living_longer_than_the_maximum_are_refused() {
    let env = serve().await;
    let now = now_secs();
    const YEAR: u64 = 365 * 86_400;
    // Valid for 100 years: refused by the default 24 h maximum.
    refused_for(&env, "lifetime exceeds the maximum of 86400 s", |c| {
        c.exp = now + 100 * YEAR;
    })
    .await;
    // A 25 h token, and a short-looking token whose `iat` lies in the future.
    refused_for(&env, "lifetime exceeds", |c| c.exp = now + 25 * 3600).await;
    refused_for(&env, "lifetime exceeds", |c| {
        c.iat = now + 10 * YEAR;
        c.exp = now + 10 * YEAR + 60;
    })
    .await;
    // No `iat` at all.
    let mut claims = serde_json::to_value(tokens(&env.server).claims(&env.me, scope::ALL)).expect("json");
    claims.as_object_mut().expect("object").remove("iat");
    let token = minted_json(&env, &claims);
    assert_refused(
        check_with(&env, Bearer::new(&token)).await,
        Code::Unauthenticated,
        "lacks the iat claim",
        &token,
    );
    // Exactly 24 h is fine.
    let token = minted(&env, &tokens(&env.server).key, |c| c.exp = c.iat + 86_400);
    check_with(&env, Bearer::new(&token)).await.expect("24 h token");
    env.server.stop().await;
}

#[tokio::test]
async fn the_maximum_token_lifetime_is_configurable() {
    let store = AnyStore::Embedded(Arc::new(EmbeddedStore::new()));
    let server = TestServer::start(store, |s| s.token_max_lifetime = Some("2h".into())).await;
    let me = server.certs.client("platform-a");
    let keys = tokens(&server);
    let now = now_secs();
    let mut long = keys.claims(&me, scope::ALL);
    long.exp = now + 3 * 3600;
    let token = keys.key.mint(&long).expect("mint");
    let channel = server.channel_bearing(&me, Bearer::new(&token)).await;
    assert_refused(
        call(channel, Method::Check).await,
        Code::Unauthenticated,
        "maximum of 7200 s",
        &token,
    );
    server.stop().await;

    // `off`: no limit, and `iat` is optional.
    let store = AnyStore::Embedded(Arc::new(EmbeddedStore::new()));
    let server = TestServer::start(store, |s| s.token_max_lifetime = Some("off".into())).await;
    let keys = tokens(&server);
    let me = server.certs.client("platform-a");
    let mut long = keys.claims(&me, scope::ALL);
    long.exp = now + 100 * 365 * 86_400;
    let token = keys.key.mint(&long).expect("mint");
    let channel = server.channel_bearing(&me, Bearer::new(&token)).await;
    call(channel, Method::Check).await.expect("no maximum");
    server.stop().await;
}

#[tokio::test]
async fn wrong_issuer_or_audience_is_refused() {
    let env = serve().await;
    refused_for(&env, "wrong audience", |c| c.aud = "someone-else".into()).await;
    refused_for(&env, "wrong issuer", |c| c.iss = "evil-issuer".into()).await;
    env.server.stop().await;
}

#[tokio::test]
async fn unknown_kid_and_foreign_signature_are_refused() {
    let env = serve().await;
    for (alg, kid, reason) in [
        (KeyAlg::Es256, "not-in-the-jwks", "unknown key"),
        // another key that claims the server's kid
        (KeyAlg::Es256, support::server::KID, "signature is invalid"),
        // an EdDSA key under the server's kid: the algorithm does not match the key
        (KeyAlg::EdDsa, support::server::KID, "algorithm"),
    ] {
        let key = IssuerKey::generate(alg, Some(kid)).expect("key");
        let token = minted(&env, &key, |_| {});
        assert_refused(
            check_with(&env, Bearer::new(&token)).await,
            Code::Unauthenticated,
            reason,
            &token,
        );
    }
    env.server.stop().await;
}

#[tokio::test]
async fn token_bound_to_another_certificate_or_subject_is_refused() {
    let env = serve().await;
    let server = &env.server;
    let first = server.certs.client("platform-a");
    let second = server.certs.client("platform-a"); // same platform, new certificate
    let token = tokens(server).mint(&first, scope::ALL);
    // the token works on its own certificate, not on the other one
    call(
        server.channel_bearing(&first, Bearer::new(&token)).await,
        Method::Check,
    )
    .await
    .expect("own certificate");
    assert_refused(
        call(
            server.channel_bearing(&second, Bearer::new(&token)).await,
            Method::Check,
        )
        .await,
        Code::Unauthenticated,
        "token is bound to another certificate",
        &token,
    );
    // nor with a cnf naming some other hash
    let token = minted(&env, &tokens(server).key, |c| {
        c.cnf.x5t_s256 = "bm90LWEtaGFzaA".into()
    });
    assert_refused(
        check_with(&env, Bearer::new(&token)).await,
        Code::Unauthenticated,
        "bound to another certificate",
        &token,
    );
    // the sub must be the certificate's platform
    let b = server.certs.client("platform-b");
    let b_id = tokens(server).claims(&b, scope::ALL).sub;
    refused_for(&env, "subject does not match", |c| c.sub = b_id).await;
    env.server.stop().await;
}

#[tokio::test]
async fn missing_scope_is_permission_denied() {
    let env = serve().await;
    let server = &env.server;
    let identity = server.certs.client("platform-a");
    for (method, needed) in METHODS {
        let others: Vec<&str> = scope::ALL.split(' ').filter(|s| *s != needed).collect();
        let token = tokens(server).mint(&identity, &others.join(" "));
        assert_refused(
            call(
                server.channel_bearing(&identity, Bearer::new(&token)).await,
                method,
            )
            .await,
            Code::PermissionDenied,
            &format!("missing scope {needed}"),
            &token,
        );
        // the scope alone is enough
        let token = tokens(server).mint(&identity, needed);
        call(
            server.channel_bearing(&identity, Bearer::new(&token)).await,
            method,
        )
        .await
        .unwrap_or_else(|e| panic!("{method:?} with {needed}: {e:?}"));
    }
    env.server.stop().await;
}

#[tokio::test]
async fn missing_or_malformed_token_is_unauthenticated() {
    let env = serve().await;
    assert_refused(
        check_with(&env, Bearer::none()).await,
        Code::Unauthenticated,
        "missing bearer token",
        "",
    );
    assert_refused(
        check_with(&env, Bearer::raw("Basic cGxhdGZvcm0tYTpzZWNyZXQ=")).await,
        Code::Unauthenticated,
        "not a bearer token",
        "cGxhdGZvcm0tYTpzZWNyZXQ=",
    );
    assert_refused(
        check_with(&env, Bearer::new("not.a-jwt.at-all")).await,
        Code::Unauthenticated,
        "malformed token",
        "not.a-jwt.at-all",
    );
    env.server.stop().await;
}

#[tokio::test]
async fn health_and_reflection_need_no_token() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::{ServerReflectionRequest, server_reflection_response::MessageResponse};

    let env = serve().await;
    let server = &env.server;
    let identity = server.certs.client("platform-a");
    let mut health = HealthClient::new(server.channel_bearing(&identity, Bearer::none()).await);
    health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health without a token");
    let mut reflection = ServerReflectionClient::new(server.channel_bearing(&identity, Bearer::none()).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .expect("reflection without a token")
        .into_inner();
    let response = responses
        .message()
        .await
        .expect("reflection")
        .expect("a response");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer {response:?}");
    };
    assert!(
        list.service
            .iter()
            .any(|s| s.name == "reassigned.v1.ReassignedNumbers"),
        "{list:?}"
    );
    env.server.stop().await;
}

/// Writes a JWKS holding `keys` over the server's JWKS file (atomically).
fn write_jwks(path: &Path, keys: &[&IssuerKey]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, jwks_json(keys)).expect("write jwks");
    std::fs::rename(&tmp, path).expect("rename jwks");
}

#[tokio::test]
async fn removed_key_stops_working_after_reload() {
    let env = serve().await;
    let server = &env.server;
    let t = tokens(server);
    let second = IssuerKey::generate(KeyAlg::EdDsa, Some("second")).expect("key");
    write_jwks(&t.jwks, &[&t.key, &second]);
    t.verifier.reload().expect("reload with both keys");
    let token = minted(&env, &second, |_| {});
    check_with(&env, Bearer::new(&token))
        .await
        .expect("EdDSA key in the JWKS");

    // a broken JWKS: reload fails and the old keys stay
    std::fs::write(&t.jwks, "{ not json").expect("write");
    assert!(t.verifier.reload().is_err());
    check_with(&env, Bearer::new(&token))
        .await
        .expect("old keys kept");

    write_jwks(&t.jwks, &[&t.key]);
    t.verifier.reload().expect("reload");
    assert_refused(
        check_with(&env, Bearer::new(&token)).await,
        Code::Unauthenticated,
        "unknown key",
        &token,
    );
    // the remaining key still works
    call(server.channel("platform-a").await, Method::Check)
        .await
        .expect("first key");
    env.server.stop().await;
}

#[tokio::test]
async fn jwks_file_change_is_picked_up() {
    let env = serve().await;
    let server = &env.server;
    let t = tokens(server);
    let second = IssuerKey::generate(KeyAlg::Es256, Some("second")).expect("key");
    let token = minted(&env, &second, |_| {});
    assert!(check_with(&env, Bearer::new(&token)).await.is_err());
    // added by file change alone, no reload call
    write_jwks(&t.jwks, &[&t.key, &second]);
    eventually("the token is accepted", || async {
        check_with(&env, Bearer::new(&token)).await.is_ok()
    })
    .await;
    // and removed again
    write_jwks(&t.jwks, &[&t.key]);
    eventually("the token is refused", || async {
        check_with(&env, Bearer::new(&token)).await.is_err()
    })
    .await;
    env.server.stop().await;
}

#[tokio::test]
async fn without_tokens_the_certificate_is_enough() {
    let store = AnyStore::Embedded(Arc::new(EmbeddedStore::new()));
    let server = TestServer::start_without_tokens(store, |_| {}).await;
    assert!(server.tokens.is_none());
    let identity = server.certs.client("platform-a");
    call(
        server.channel_bearing(&identity, Bearer::none()).await,
        Method::Status,
    )
    .await
    .expect("mTLS only");
    server.stop().await;
}

// ---- the binary: keys generate + token mint + serve ----

#[tokio::test]
async fn cli_keys_generate_and_token_mint_are_accepted_by_serve() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (keys, data) = (dir.path().join("keys"), dir.path().join("data"));
    std::fs::create_dir_all(&data).expect("data dir");
    let certs = dev_certs(dir.path());
    run(bin()
        .args(["keys", "generate", "--alg", "EdDSA", "--kid", "cli-key", "--out"])
        .arg(&keys));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(keys.join("issuer.key"))
            .expect("issuer.key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "issuer key readable by others: {mode:o}");
    }
    let jwks = std::fs::read_to_string(keys.join("jwks.json")).expect("jwks");
    assert!(
        jwks.contains("\"kid\": \"cli-key\"") && !jwks.contains("\"d\""),
        "{jwks}"
    );
    // never overwrites
    assert!(
        !bin()
            .args(["keys", "generate", "--out"])
            .arg(&keys)
            .output()
            .expect("run")
            .status
            .success()
    );

    // tokens are on by default: serve refuses without a JWKS
    let out = serve_command(&certs, &data).output().expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--jwks") && err.contains("--no-tokens"), "{err}");

    let token = run(bin()
        .args([
            "token",
            "mint",
            "--kid",
            "cli-key",
            "--platform",
            "platform-a",
            "--ttl",
            "10m",
        ])
        .arg("--issuer-key")
        .arg(keys.join("issuer.key"))
        .arg("--cert")
        .arg(certs.join("platform-a.pem")));
    let token = String::from_utf8(token.stdout).expect("utf8").trim().to_owned();
    assert_eq!(token.split('.').count(), 3, "{token}");
    // a token for the wrong platform is refused by mint itself
    assert!(
        !bin()
            .args(["token", "mint", "--platform", "platform-b"])
            .arg("--issuer-key")
            .arg(keys.join("issuer.key"))
            .arg("--cert")
            .arg(certs.join("platform-a.pem"))
            .output()
            .expect("run")
            .status
            .success()
    );

    let (_server, channel) = spawn_serve(serve_command(&certs, &data), &certs, &keys.join("jwks.json")).await;
    let status = call(
        tonic::service::interceptor::InterceptedService::new(channel.clone(), Bearer::new(&token)),
        Method::Status,
    )
    .await;
    status.expect("the minted token is accepted");
    assert_refused(
        call(
            tonic::service::interceptor::InterceptedService::new(channel, Bearer::none()),
            Method::Status,
        )
        .await,
        Code::Unauthenticated,
        "missing bearer token",
        "",
    );
}

/// `reassigned serve` (tokens on by default) with the dev certificates in
/// `certs` and the embedded store in `data`.
fn serve_command(certs: &Path, data: &Path) -> Command {
    let mut cmd = bin();
    cmd.arg("serve")
        .args(dev_tls_args(certs))
        .arg("--data-dir")
        .arg(data);
    cmd
}

/// Spawns `serve` (TLS settings already given) with `jwks` on a free port and
/// connects to it as platform-a.
async fn spawn_serve(mut serve: Command, certs: &Path, jwks: &Path) -> (Killed, tonic::transport::Channel) {
    let port = free_port();
    let server = Killed(
        serve
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--jwks")
            .arg(jwks)
            .args([
                "--token-issuer",
                "reassigned-dev",
                "--token-audience",
                "reassigned",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn serve"),
    );
    let channel = connect_as_platform_a(certs, port).await;
    (server, channel)
}

/// SIGHUP to `reassigned serve` (its reloader runs the JWKS hook) reloads
/// the JWKS even when the file looks unchanged to the poll (same size, inode
/// and modification time).
#[cfg(unix)]
#[tokio::test]
async fn sighup_reloads_the_jwks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    let certs = dev_certs(dir.path());
    let one = IssuerKey::generate(KeyAlg::Es256, Some("key-one")).expect("key");
    let two = IssuerKey::generate(KeyAlg::Es256, Some("key-two")).expect("key");
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, jwks_json(&[&one])).expect("jwks");
    let cert = std::fs::read_to_string(certs.join("platform-a.pem")).expect("cert");
    let mint = |key: &IssuerKey| {
        let claims = reassigned::cli::token::claims_for_cert(
            &cert,
            scope::ALL,
            Duration::from_secs(600),
            "reassigned-dev",
            "reassigned",
        )
        .expect("claims");
        key.mint(&claims).expect("mint")
    };
    let (token_one, token_two) = (mint(&one), mint(&two));

    let (server, channel) = spawn_serve(serve_command(&certs, &data), &certs, &jwks).await;
    let with = |token: &str| {
        tonic::service::interceptor::InterceptedService::new(channel.clone(), Bearer::new(token))
    };
    call(with(&token_one), Method::Status).await.expect("key-one");
    assert!(call(with(&token_two), Method::Status).await.is_err());

    // Swap key-one for key-two in place, keeping size, inode and mtime.
    let before = std::fs::metadata(&jwks).expect("meta");
    let text = jwks_json(&[&two]);
    assert_eq!(text.len() as u64, before.len(), "same-size JWKS");
    {
        use std::io::Write as _;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(&jwks)
            .expect("open jwks");
        file.write_all(text.as_bytes()).expect("write");
        file.set_modified(before.modified().expect("mtime"))
            .expect("set mtime");
    }
    server.signal("HUP");
    eventually("the second token is accepted", || async {
        call(with(&token_two), Method::Status).await.is_ok()
    })
    .await;
    assert_refused(
        call(with(&token_one), Method::Status).await,
        Code::Unauthenticated,
        "unknown key",
        &token_one,
    );
}

/// A connection remembers its last verified token (issue 8 §3: bytes
/// compared instead of a hash per call), yet every call on it still checks
/// expiry, the certificate binding and the current keys. All on ONE
/// connection: a token that expires while it is open, tokens switched back
/// and forth, and a key removed by a reload.
#[tokio::test]
async fn one_connection_remembers_its_token_but_checks_it_on_every_call() {
    use reassigned::server::token::LEEWAY_SECS;
    use tonic::service::interceptor::InterceptedService;

    let env = serve().await;
    let server = &env.server;
    let t = tokens(server);
    let conn = server
        .raw_channel(Some(&env.me), server.certs.pki.ca_cert_pem())
        .await
        .expect("connect");
    let on_conn = |token: &str| {
        call(
            InterceptedService::new(conn.clone(), Bearer::new(token)),
            Method::Check,
        )
    };

    // Switching tokens on the connection: another certificate's token is
    // refused every time, whatever was accepted before or after it.
    let mine = t.mint(&env.me, scope::ALL);
    let foreign = t.mint(&server.certs.client("platform-a"), scope::ALL);
    let narrow = t.mint(&env.me, scope::MIRROR_READ);
    for _ in 0..3 {
        on_conn(&mine).await.expect("own token");
        on_conn(&mine).await.expect("own token, remembered");
        assert_refused(
            on_conn(&foreign).await,
            Code::Unauthenticated,
            "bound to another certificate",
            &foreign,
        );
        assert_refused(
            on_conn(&foreign).await,
            Code::Unauthenticated,
            "bound to another certificate",
            &foreign,
        );
        assert_refused(
            on_conn(&narrow).await,
            Code::PermissionDenied,
            "missing scope numbers:check",
            &narrow,
        );
    }

    // Expiry: a token whose `exp` passed less than the leeway ago is
    // accepted, then refused on the same connection once the leeway is over.
    let start = now_secs();
    let exp = start + 3 - LEEWAY_SECS;
    let expiring = minted(&env, &t.key, |c| {
        c.iat = start - 60;
        c.nbf = start - 60;
        c.exp = exp;
    });
    on_conn(&expiring).await.expect("within the leeway");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut accepted = 1;
    loop {
        let before = now_secs();
        let result = on_conn(&expiring).await;
        let after = now_secs();
        match result {
            Ok(()) => {
                assert!(
                    before <= exp + LEEWAY_SECS,
                    "accepted at {before}, expired at {exp} + leeway"
                );
                accepted += 1;
            }
            Err(status) => {
                assert_refused(Err(status), Code::Unauthenticated, "token expired", &expiring);
                assert!(after > exp + LEEWAY_SECS, "refused at {after} before its expiry");
                break;
            }
        }
        assert!(Instant::now() < deadline, "never refused after expiry");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(accepted > 1, "the remembered token was used before it expired");
    assert_refused(
        on_conn(&expiring).await,
        Code::Unauthenticated,
        "token expired",
        &expiring,
    );

    // A key removed by a reload stops working on the connection that
    // remembers a token it signed.
    let second = IssuerKey::generate(KeyAlg::EdDsa, Some("second")).expect("key");
    write_jwks(&t.jwks, &[&t.key, &second]);
    t.verifier.reload().expect("reload with both keys");
    let by_second = minted(&env, &second, |_| {});
    on_conn(&by_second).await.expect("second key");
    on_conn(&by_second).await.expect("second key, remembered");
    write_jwks(&t.jwks, &[&t.key]);
    t.verifier.reload().expect("reload");
    assert_refused(
        on_conn(&by_second).await,
        Code::Unauthenticated,
        "unknown key",
        &by_second,
    );
    on_conn(&mine).await.expect("the remaining key still works");
    env.server.stop().await;
}

/// What a token check costs, first sight (signature) against a remembered
/// token. A measurement, not a check: run it with
/// `cargo test --release --test tokens verify_cost -- --ignored --nocapture`.
#[test]
#[ignore]
fn verify_cost() {
    use rustls_pki_types::pem::PemObject as _;
    let pki = reassigned::cli::certs::DevPki::new().expect("ca");
    let me = pki.client("platform-a").expect("cert");
    let der = rustls_pki_types::CertificateDer::from_pem_slice(me.cert_pem.as_bytes()).expect("der");
    let platform = reassigned::identity::platform_from_cert(&der).expect("platform");
    let dir = tempfile::tempdir().expect("tempdir");
    for alg in [KeyAlg::Es256, KeyAlg::EdDsa] {
        let (key, verifier) = support::server::key_and_verifier(dir.path(), alg);
        let tokens: Vec<String> = (0..500)
            .map(|n| {
                let mut claims = reassigned::cli::token::claims_for_cert(
                    &me.cert_pem,
                    scope::ALL,
                    Duration::from_secs(3600 + n),
                    "i",
                    "a",
                )
                .expect("claims");
                claims.iat -= n;
                format!("Bearer {}", key.mint(&claims).expect("mint"))
            })
            .collect();
        let started = Instant::now();
        for token in &tokens {
            verifier.verify(Some(token.as_bytes()), &platform).expect("valid");
        }
        let first = started.elapsed() / tokens.len() as u32;
        let rounds = 20_000;
        let started = Instant::now();
        for n in 0..rounds {
            verifier
                .verify(Some(tokens[n % tokens.len()].as_bytes()), &platform)
                .expect("valid");
        }
        let again = started.elapsed() / rounds as u32;
        // One connection sending one token: the connection's memo.
        let memo = reassigned::identity::TokenMemo::default();
        let started = Instant::now();
        for _ in 0..rounds {
            verifier
                .verify_on_connection(Some(tokens[0].as_bytes()), &platform, &memo)
                .expect("valid");
        }
        let memo_hit = started.elapsed() / rounds as u32;
        println!(
            "{alg:?}: first sight {first:?} per token, remembered (shared cache) {again:?} per call, \
             same token on one connection {memo_hit:?} per call"
        );
    }
}
