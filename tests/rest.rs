//! The REST face (CAMARA Number Recycling v0.2.0, the JSON batch, the OpenAPI
//! document) over real mutual TLS and HTTP/1.1 against a real server, on
//! both stores where storage matters (the embedded store and a real
//! `redis-server`): every mapping of the issue, the token and scope rules,
//! quotas shared with gRPC, and a store that goes away.

mod support;

use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use reassigned::api::pb::{CheckNumberRequest, ReassignmentStatus};
use reassigned::cli::rest_client::{RestClient, RestResponse};
use reassigned::config::ServeSettings;
use reassigned::domain::Date;
use reassigned::import::{self, NoProgress};
use reassigned::rest::{BATCH_PATH, CHECK_PATH, OPENAPI_PATH, OPENAPI_YAML};
use reassigned::store::redis::RedisOptions;
use reassigned::store::{AnyStore, EmbeddedStore, RedisStore};
use serde_json::json;
use support::log::{assert_has_all, captured, line_where};
use support::redis::RedisServer;
use support::register::FileSpec;
use support::server::{TestServer, audit_secret, dead_redis};

const A: &str = "+14155550001"; // disconnected 2024-05-01
const ABSENT: &str = "+14155550099";
const FOREIGN: &str = "+442079460000";
const COVERAGE_START: &str = "2021-01-27";

fn days_ago(n: i32) -> String {
    Date::today_utc().add_days(-n).to_string()
}

/// An empty embedded store.
fn embedded() -> AnyStore {
    AnyStore::Embedded(Arc::new(EmbeddedStore::new()))
}

/// A real `redis-server` (kept while the test runs) and a store on it.
async fn redis_store(options: RedisOptions) -> (RedisServer, AnyStore) {
    let redis = RedisServer::start();
    let store = RedisStore::connect(&redis.url(), options).await.expect("redis");
    (redis, AnyStore::Redis(store))
}

/// A server with the REST face on an ephemeral port, `tweak`ed.
async fn serve(store: AnyStore, tweak: impl FnOnce(&mut ServeSettings)) -> TestServer {
    TestServer::start(store, |s| {
        s.rest_listen = Some(([127, 0, 0, 1], 0).into());
        tweak(s);
    })
    .await
}

/// [`serve`] over an embedded store holding [`snapshot`].
async fn loaded(tweak: impl FnOnce(&mut ServeSettings)) -> TestServer {
    let store = embedded();
    apply(&store, snapshot()).await;
    serve(store, tweak).await
}

/// A REST client as `platform` with a token granting `scope` (`None`: no
/// token).
async fn client_as(server: &TestServer, platform: &str, scope: Option<&str>) -> RestClient {
    let id = server.certs.client(platform);
    let token = scope.map(|scope| server.tokens.as_ref().expect("tokens").mint(&id, scope));
    server.rest_client(&id, token.as_deref()).await
}

/// A REST client as `platform-a` with every scope.
async fn client(server: &TestServer) -> RestClient {
    client_as(server, "platform-a", Some(reassigned::identity::scope::ALL)).await
}

async fn check(client: &mut RestClient, number: &str, date: &str) -> RestResponse {
    client
        .post_json(
            CHECK_PATH,
            &json!({ "phoneNumber": number, "specifiedDate": date }),
        )
        .await
        .expect("check")
}

/// Asserts CAMARA's error body with `status` and `code`; returns the message.
fn camara_error(response: &RestResponse, status: StatusCode, code: &str) -> String {
    assert_eq!(response.status, status, "{response:?}");
    assert_eq!(response.headers["content-type"], "application/json");
    let body = response.json().expect("JSON error body");
    assert_eq!(body["status"], status.as_u16(), "{body}");
    assert_eq!(body["code"], code, "{body}");
    body["message"].as_str().expect("message").to_owned()
}

fn recycled(response: &RestResponse) -> bool {
    assert_eq!(response.status, StatusCode::OK, "{response:?}");
    let body = response.json().expect("JSON");
    body["phoneNumberRecycled"]
        .as_bool()
        .expect("a boolean phoneNumberRecycled")
}

fn snapshot<'a>() -> FileSpec<'a> {
    FileSpec::snapshot(
        1,
        &days_ago(10),
        COVERAGE_START,
        &["+1", "+86"],
        &[(A, "2024-05-01")],
    )
}

async fn apply(store: &AnyStore, spec: FileSpec<'_>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = spec.write(dir.path(), "s1");
    import::apply_manifest(store, &path, &mut NoProgress)
        .await
        .expect("snapshot");
}

/// Every answer and client error of the issue's mapping, and the same
/// answers as gRPC CheckNumber gives.
async fn mapping(store: AnyStore) {
    let server = serve(store.clone(), |_| {}).await;
    let mut rest = client(&server).await;
    // An empty mirror cannot answer.
    camara_error(
        &check(&mut rest, ABSENT, "2024-01-01").await,
        StatusCode::SERVICE_UNAVAILABLE,
        "UNAVAILABLE",
    );

    apply(&store, snapshot()).await;
    assert!(recycled(&check(&mut rest, A, "2024-05-01").await));
    assert!(recycled(&check(&mut rest, A, "2019-06-01").await));
    assert!(!recycled(&check(&mut rest, A, "2024-05-02").await));
    assert!(!recycled(&check(&mut rest, ABSENT, "2022-01-01").await));
    // The same answers as gRPC.
    let mut grpc = server.client().await;
    for (number, date, want) in [(A, "2024-05-01", true), (ABSENT, "2022-01-01", false)] {
        let answer = grpc
            .check_number(CheckNumberRequest {
                phone_number: number.into(),
                since: date.into(),
                ..Default::default()
            })
            .await
            .expect("grpc")
            .into_inner();
        assert_eq!(answer.status() == ReassignmentStatus::Reassigned, want);
        assert_eq!(recycled(&check(&mut rest, number, date).await), want);
    }

    let message = camara_error(
        &check(&mut rest, ABSENT, "2021-01-26").await,
        StatusCode::BAD_REQUEST,
        "OUT_OF_RANGE",
    );
    assert!(message.contains(COVERAGE_START), "{message}");
    let tomorrow = Date::today_utc().add_days(1).to_string();
    camara_error(
        &check(&mut rest, ABSENT, &tomorrow).await,
        StatusCode::BAD_REQUEST,
        "OUT_OF_RANGE",
    );
    camara_error(
        &check(&mut rest, FOREIGN, "2022-01-01").await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "SERVICE_NOT_APPLICABLE",
    );
    for (number, date) in [
        ("14155550001", "2022-01-01"),
        ("+1415555000a", "2022-01-01"),
        (A, "2022-02-30"),
        (A, "01/02/2022"),
        (A, ""),
    ] {
        camara_error(
            &check(&mut rest, number, date).await,
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
        );
    }
    let no_number = rest
        .post_json(CHECK_PATH, &json!({ "specifiedDate": "2022-01-01" }))
        .await
        .expect("post");
    camara_error(&no_number, StatusCode::UNPROCESSABLE_ENTITY, "MISSING_IDENTIFIER");
    for body in [
        json!({ "phoneNumber": A }),
        json!({ "phoneNumber": 14155550001_u64, "specifiedDate": "2022-01-01" }),
        json!([1, 2]),
    ] {
        let response = rest.post_json(CHECK_PATH, &body).await.expect("post");
        camara_error(&response, StatusCode::BAD_REQUEST, "INVALID_ARGUMENT");
    }
    server.stop().await;

    // A stale mirror (as_of 10 days old, 9 allowed) cannot answer "no".
    let stale = serve(store, |s| s.max_staleness_days = Some(9)).await;
    let mut rest = client(&stale).await;
    camara_error(
        &check(&mut rest, ABSENT, "2022-01-01").await,
        StatusCode::SERVICE_UNAVAILABLE,
        "UNAVAILABLE",
    );
    assert!(
        recycled(&check(&mut rest, A, "2024-05-01").await),
        "a known disconnect still wins"
    );
    stale.stop().await;
}

#[tokio::test]
async fn mapping_embedded() {
    mapping(embedded()).await;
}

#[tokio::test]
async fn mapping_redis() {
    let (_redis, store) = redis_store(RedisOptions::default()).await;
    mapping(store).await;
}

/// Bodies that are not JSON, wrong content types, too large bodies, bad
/// correlators, unknown paths and methods: clear 4xx errors, never 500.
#[tokio::test]
async fn bad_requests_are_client_errors() {
    let server = loaded(|s| s.max_message_bytes = Some(4096)).await;
    let mut rest = client(&server).await;
    let valid = json!({ "phoneNumber": A, "specifiedDate": "2024-05-01" }).to_string();

    let not_json = rest
        .send(Method::POST, CHECK_PATH, &[], "{not json")
        .await
        .expect("post");
    camara_error(&not_json, StatusCode::BAD_REQUEST, "INVALID_ARGUMENT");
    for content_type in ["text/plain", "application/x-www-form-urlencoded"] {
        let response = rest
            .send(
                Method::POST,
                CHECK_PATH,
                &[("content-type", content_type)],
                valid.clone(),
            )
            .await
            .expect("post");
        camara_error(&response, StatusCode::BAD_REQUEST, "INVALID_ARGUMENT");
    }
    // A charset parameter is fine.
    let response = rest
        .send(
            Method::POST,
            CHECK_PATH,
            &[("content-type", "application/json; charset=utf-8")],
            valid.clone(),
        )
        .await
        .expect("post");
    assert!(recycled(&response));

    // Bodies over the limit are refused from their declared length.
    let huge = format!(
        "{{\"phoneNumber\":\"{A}\",\"specifiedDate\":\"2024-05-01\",\"pad\":\"{}\"}}",
        "x".repeat(8192)
    );
    let response = rest
        .send(Method::POST, CHECK_PATH, &[], huge)
        .await
        .expect("post");
    camara_error(&response, StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE");
    // ... and the connection still serves.
    assert!(recycled(&check(&mut rest, A, "2024-05-01").await));

    // x-correlator: echoed when valid, 400 when not.
    let response = rest
        .send(
            Method::POST,
            CHECK_PATH,
            &[("x-correlator", "b4333c46-49c0-4f62")],
            valid.clone(),
        )
        .await
        .expect("post");
    assert!(recycled(&response));
    assert_eq!(response.headers["x-correlator"], "b4333c46-49c0-4f62");
    let response = rest
        .send(
            Method::POST,
            CHECK_PATH,
            &[("x-correlator", "bad value!")],
            valid.clone(),
        )
        .await
        .expect("post");
    let message = camara_error(&response, StatusCode::BAD_REQUEST, "INVALID_ARGUMENT");
    assert!(message.contains("x-correlator"), "{message}");

    let response = rest.send(Method::GET, CHECK_PATH, &[], "").await.expect("get");
    camara_error(&response, StatusCode::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED");
    assert_eq!(response.headers["allow"], "POST");
    let response = rest
        .send(Method::POST, "/number-recycling/v0.1/check", &[], valid)
        .await
        .expect("post");
    camara_error(&response, StatusCode::NOT_FOUND, "NOT_FOUND");

    // The OpenAPI document, as shipped.
    let response = rest.send(Method::GET, OPENAPI_PATH, &[], "").await.expect("get");
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.body, OPENAPI_YAML.as_bytes());
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/proto/openapi/reassigned-rest.yaml"
    ))
    .expect("the document");
    assert_eq!(shipped, OPENAPI_YAML);
    server.stop().await;
}

/// The JSON batch: per-item results as BatchCheckNumbers gives them, and
/// the same 1..=max_batch rule.
async fn batch(store: AnyStore) {
    apply(&store, snapshot()).await;
    let server = serve(store, |s| s.max_batch = Some(3)).await;
    let mut rest = client(&server).await;
    let body = json!({ "checks": [
        { "phoneNumber": A, "since": "2024-05-01" },
        { "phoneNumber": ABSENT, "since": "2022-01-01" },
        { "phoneNumber": "nope", "since": "2022-01-01" },
    ]});
    let response = rest.post_json(BATCH_PATH, &body).await.expect("batch");
    assert_eq!(response.status, StatusCode::OK, "{response:?}");
    let results = response.json().expect("json")["results"].clone();
    assert_eq!(results[0]["answer"]["phoneNumber"], A);
    assert_eq!(results[0]["answer"]["status"], "REASSIGNMENT_STATUS_REASSIGNED");
    assert_eq!(results[0]["answer"]["dataAsOf"], days_ago(10));
    assert_eq!(
        results[1]["answer"]["status"],
        "REASSIGNMENT_STATUS_NOT_REASSIGNED"
    );
    assert_eq!(results[2]["error"]["code"], "INVALID_ARGUMENT");
    assert!(results[2].get("answer").is_none());

    for checks in [json!([]), json!([{}, {}, {}, {}])] {
        let response = rest
            .post_json(BATCH_PATH, &json!({ "checks": checks }))
            .await
            .expect("batch");
        let message = camara_error(&response, StatusCode::BAD_REQUEST, "INVALID_ARGUMENT");
        assert!(message.contains("1 to 3"), "{message}");
    }
    let response = rest
        .post_json(BATCH_PATH, &json!({ "checks": "all" }))
        .await
        .expect("batch");
    camara_error(&response, StatusCode::BAD_REQUEST, "INVALID_ARGUMENT");
    // Receipts asked of a server without a receipt key: refused as gRPC does.
    let response = rest
        .post_json(
            BATCH_PATH,
            &json!({ "checks": [{ "phoneNumber": A, "since": "2024-05-01", "wantReceipt": true }] }),
        )
        .await
        .expect("batch");
    camara_error(&response, StatusCode::BAD_REQUEST, "FAILED_PRECONDITION");
    server.stop().await;
}

#[tokio::test]
async fn batch_embedded() {
    batch(embedded()).await;
}

#[tokio::test]
async fn batch_redis() {
    let (_redis, store) = redis_store(RedisOptions::default()).await;
    batch(store).await;
}

/// The same certificate-bound tokens and scopes as gRPC: no or bad token
/// 401, a token without the scope 403; CAMARA's scope name works for the
/// check (not for the batch).
#[tokio::test]
async fn tokens_and_scopes() {
    let server = loaded(|_| {}).await;

    let mut none = client_as(&server, "platform-a", None).await;
    let message = camara_error(
        &check(&mut none, A, "2024-05-01").await,
        StatusCode::UNAUTHORIZED,
        "UNAUTHENTICATED",
    );
    assert!(message.contains("bearer token"), "{message}");
    let mut garbage = none;
    let response = garbage
        .send(
            Method::POST,
            CHECK_PATH,
            &[("authorization", "Bearer not.a.token")],
            json!({ "phoneNumber": A, "specifiedDate": "2024-05-01" }).to_string(),
        )
        .await
        .expect("post");
    camara_error(&response, StatusCode::UNAUTHORIZED, "UNAUTHENTICATED");

    // A token minted for another certificate is not this caller's.
    let other = server.certs.client("platform-b");
    let stolen = server
        .tokens
        .as_ref()
        .expect("tokens")
        .mint(&other, "numbers:check");
    let response = garbage
        .send(
            Method::POST,
            CHECK_PATH,
            &[("authorization", &format!("Bearer {stolen}"))],
            json!({ "phoneNumber": A, "specifiedDate": "2024-05-01" }).to_string(),
        )
        .await
        .expect("post");
    camara_error(&response, StatusCode::UNAUTHORIZED, "UNAUTHENTICATED");

    let mut mirror_only = client_as(&server, "platform-a", Some("mirror:read")).await;
    camara_error(
        &check(&mut mirror_only, A, "2024-05-01").await,
        StatusCode::FORBIDDEN,
        "PERMISSION_DENIED",
    );

    let mut camara = client_as(&server, "platform-a", Some("number-recycling:check")).await;
    assert!(recycled(&check(&mut camara, A, "2024-05-01").await));
    let response = camara
        .post_json(
            BATCH_PATH,
            &json!({ "checks": [{ "phoneNumber": A, "since": "2024-05-01" }] }),
        )
        .await
        .expect("batch");
    camara_error(&response, StatusCode::FORBIDDEN, "PERMISSION_DENIED");

    let mut grpc_scope = client_as(&server, "platform-a", Some("numbers:check")).await;
    assert!(recycled(&check(&mut grpc_scope, A, "2024-05-01").await));
    // The OpenAPI document needs the client certificate only.
    let mut no_token = client_as(&server, "platform-a", None).await;
    let response = no_token
        .send(Method::GET, OPENAPI_PATH, &[], "")
        .await
        .expect("get");
    assert_eq!(response.status, StatusCode::OK);
    server.stop().await;
}

/// Quotas are the gRPC face's: REST calls spend the same budget, and over
/// it the answer is 429 TOO_MANY_REQUESTS with Retry-After.
#[tokio::test]
async fn quotas_are_shared_and_429() {
    let file: ServeSettings = toml::from_str(
        "[quotas.\"spiffe://dev.reassigned/platform-a\"]\nrequests_per_second = 0.05\nburst = 2\n",
    )
    .expect("toml");
    let server = loaded(move |s| s.quotas = file.quotas).await;
    let mut rest = client(&server).await;
    assert!(recycled(&check(&mut rest, A, "2024-05-01").await));
    let mut grpc = server.client().await;
    grpc.check_number(CheckNumberRequest {
        phone_number: A.into(),
        since: "2024-05-01".into(),
        ..Default::default()
    })
    .await
    .expect("the second call of the burst");
    let response = check(&mut rest, A, "2024-05-01").await;
    camara_error(&response, StatusCode::TOO_MANY_REQUESTS, "TOO_MANY_REQUESTS");
    let after: u64 = response.headers["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=21).contains(&after), "{after}");
    server.stop().await;
}

/// A Redis store that dies: 503 UNAVAILABLE, not 500; answers again once
/// it is back.
#[tokio::test]
async fn store_down_is_503() {
    let (mut redis, store) = redis_store(RedisOptions {
        timeout: Duration::from_millis(300),
        ..RedisOptions::default()
    })
    .await;
    apply(&store, snapshot()).await;
    let server = serve(store, |_| {}).await;
    let mut rest = client(&server).await;
    assert!(recycled(&check(&mut rest, A, "2024-05-01").await));
    redis.pause();
    camara_error(
        &check(&mut rest, A, "2024-05-01").await,
        StatusCode::SERVICE_UNAVAILABLE,
        "UNAVAILABLE",
    );
    redis.resume();
    support::poll::eventually("the REST check answers again", async || {
        check(&mut rest, A, "2024-05-01").await.status == StatusCode::OK
    })
    .await;
    server.stop().await;
}

/// `reassigned bench --rest` drives the REST face: every call answered,
/// the answers counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_rest_mode() {
    use reassigned::cli::bench::{BenchOptions, Method as BenchMethod, bench};
    use reassigned::cli::client::TlsTarget;
    let server = loaded(|_| {}).await;
    let id = server.certs.client("platform-a");
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = dir.path().join("a.pem");
    let key = dir.path().join("a.key");
    std::fs::write(&cert, &id.cert_pem).expect("cert");
    std::fs::write(&key, &id.key_pem).expect("key");
    let addr = server.handles.rest.wait().await;
    let opts = BenchOptions {
        tls: TlsTarget {
            target: addr.to_string(),
            server_name: "localhost".into(),
            ca: server.certs.ca.clone(),
            cert,
            key,
        },
        method: BenchMethod::Check,
        concurrency: 4,
        connections: 1,
        duration: Duration::from_millis(300),
        warmup: Duration::from_millis(100),
        rate: None,
        batch_size: 1,
        data: None,
        hit_ratio: 0.04,
        since: "2022-01-01".into(),
        timeout: Duration::from_secs(5),
        receipts: false,
        token: Some(
            server
                .tokens
                .as_ref()
                .expect("tokens")
                .mint(&id, "number-recycling:check"),
        ),
        rest: true,
        seed: 1,
        json: false,
        watchers: None,
        watch_numbers: 10_000,
        skip_load: false,
        drain: Duration::from_secs(30),
    };
    let report = bench(&opts).await.expect("bench");
    assert!(report.ok_calls > 0, "{report:?}");
    assert_eq!(report.failed_calls, 0, "{report:?}");
    assert_eq!(
        report.statuses.not_reassigned, report.ok_calls,
        "random +1 numbers are not in the register"
    );
    server.stop().await;
}

/// REST answers are audited like gRPC's (same stream, keyed number hash),
/// with the `x-correlator` as the request id.
#[tokio::test]
async fn rest_answers_are_audited() {
    let (redis, store) = redis_store(RedisOptions::default()).await;
    apply(&store, snapshot()).await;
    let url = redis.url();
    let server = TestServer::start_in(store, |s, dir| {
        audit_secret(s, dir);
        s.data_dir = None;
        s.redis = Some(url);
        s.rest_listen = Some(([127, 0, 0, 1], 0).into());
    })
    .await;
    let mut rest = client(&server).await;
    let body = json!({ "phoneNumber": A, "specifiedDate": "2024-05-01" }).to_string();
    let response = rest
        .send(Method::POST, CHECK_PATH, &[("x-correlator", "login-7")], body)
        .await
        .expect("check");
    assert!(recycled(&response));
    let stats = server.handles.audit_stats.clone();
    support::poll::eventually("the REST answer is audited", async || stats.written() >= 1).await;
    let raw = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "XRANGE", "rn:audit", "-", "+"])
        .output()
        .expect("redis-cli");
    let raw = String::from_utf8_lossy(&raw.stdout);
    assert!(raw.contains("login-7"), "{raw}");
    assert!(raw.contains("REASSIGNMENT_STATUS_REASSIGNED"), "{raw}");
    assert!(!raw.contains(&A[2..]), "clear number in the audit stream");
    server.stop().await;
}

/// The REST port follows the gRPC port's TLS reloads: a client CA bundle
/// that no longer trusts a client closes its open REST connection, and
/// refuses it on a new one.
#[tokio::test]
async fn a_reload_that_distrusts_the_client_closes_its_rest_connection() {
    let server = loaded(|_| {}).await;
    let mut open = client(&server).await;
    assert!(recycled(&check(&mut open, A, "2024-05-01").await));

    let other = reassigned::cli::certs::DevPki::named("another ca").expect("ca");
    std::fs::write(&server.certs.ca, other.ca_cert_pem()).expect("replace the client CA bundle");
    server.handles.reload.reload().await.expect("reload");
    support::poll::eventually("the distrusted client's REST connection is closed", async || {
        open.post_json(
            CHECK_PATH,
            &json!({ "phoneNumber": A, "specifiedDate": "2024-05-01" }),
        )
        .await
        .is_err()
    })
    .await;
    let tls = server.rest_tls(&server.certs.client("platform-a"));
    let addr = server.handles.rest.wait().await.to_string();
    // TLS 1.3: the refusal of the client certificate may come with the
    // first request rather than the handshake.
    match RestClient::connect(&addr, &tls, None).await {
        Err(_) => {}
        Ok(mut fresh) => assert!(fresh.send(Method::GET, OPENAPI_PATH, &[], "").await.is_err()),
    }
    server.stop().await;
}

/// The access line of the call with `request_id`, once written.
async fn access_line(request_id: &str) -> String {
    line_where("the REST access line", |l| {
        l.contains("reassigned::access") && l.contains(&format!("request_id={request_id}"))
    })
    .await
}

/// The value of the sample `name` (with its labels) in `text`.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// REST calls over real mutual TLS are counted in the `http_server_*`
/// families (route, HTTP method, status; the gRPC families untouched) and
/// written to the access log like gRPC calls: platform, route, status,
/// latency, the `x-correlator` as request id (one generated and echoed when
/// the client sends none), the audit-keyed HMAC of the number, never the
/// number or the token.
#[tokio::test]
async fn rest_calls_are_counted_and_access_logged_with_the_number_hashed() {
    let log = captured();
    let mut secret_path = None;
    let store = embedded();
    apply(&store, snapshot()).await;
    let server = TestServer::start_in(store, |s, dir| {
        s.rest_listen = Some(([127, 0, 0, 1], 0).into());
        s.admin_listen = Some(([127, 0, 0, 1], 0).into());
        s.access_log = Some(true);
        secret_path = Some(audit_secret(s, dir));
        // No audit sink listens: records are dropped, the answers go on.
        s.audit_redis = Some(dead_redis());
    })
    .await;
    let mut rest = client(&server).await;
    let body = json!({ "phoneNumber": A, "specifiedDate": "2024-05-01" }).to_string();
    let response = rest
        .send(
            Method::POST,
            CHECK_PATH,
            &[("x-correlator", "rest-obs-1")],
            body.clone(),
        )
        .await
        .expect("check");
    assert!(recycled(&response));
    let bad = json!({ "phoneNumber": "+1 415", "specifiedDate": "2024-05-01" }).to_string();
    let response = rest
        .send(Method::POST, CHECK_PATH, &[("x-correlator", "rest-obs-2")], bad)
        .await
        .expect("bad check");
    camara_error(&response, StatusCode::BAD_REQUEST, "INVALID_ARGUMENT");
    let response = rest.send(Method::GET, CHECK_PATH, &[], "").await.expect("get");
    assert_eq!(response.status, StatusCode::METHOD_NOT_ALLOWED);
    let response = rest
        .send(Method::GET, "/no/such/path?n=+14155550001", &[], "")
        .await
        .expect("get");
    assert_eq!(response.status, StatusCode::NOT_FOUND);
    // No x-correlator: one is generated, logged, echoed.
    let response = rest
        .send(Method::POST, BATCH_PATH, &[], json!({ "checks": [{ "phoneNumber": A, "since": "2024-05-01" }, { "phoneNumber": ABSENT, "since": "2024-05-01" }] }).to_string())
        .await
        .expect("batch");
    assert_eq!(response.status, StatusCode::OK, "{response:?}");
    let generated = response.headers["x-correlator"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(
        generated.len() == 32 && generated.bytes().all(|b| b.is_ascii_hexdigit()),
        "{generated}"
    );

    let admin = tokio::time::timeout(Duration::from_secs(10), server.handles.metrics.bound_addr())
        .await
        .expect("admin bound")
        .to_string();
    let (status, text) = reassigned::server::admin::get(&admin, "/metrics", Duration::from_secs(10))
        .await
        .expect("metrics");
    assert_eq!(status, 200);
    let check = r#"route="/number-recycling/v0.2/check""#;
    for (name, value) in [
        (format!(r#"http_server_requests_total{{{check},method="POST",code="200"}}"#), 1.0),
        (format!(r#"http_server_requests_total{{{check},method="POST",code="400"}}"#), 1.0),
        (format!(r#"http_server_requests_total{{{check},method="GET",code="405"}}"#), 1.0),
        (r#"http_server_requests_total{route="other",method="GET",code="404"}"#.to_owned(), 1.0),
        (r#"http_server_requests_total{route="/v1/numbers:batchCheck",method="POST",code="200"}"#.to_owned(), 1.0),
        // Listed before its first call.
        (r#"http_server_requests_total{route="/openapi.yaml",method="GET",code="200"}"#.to_owned(), 0.0),
        (format!(r#"http_server_request_duration_seconds_count{{{check}}}"#), 3.0),
        (format!(r#"http_server_request_duration_seconds_bucket{{{check},le="+Inf"}}"#), 3.0),
        (format!(r#"http_server_requests_in_flight{{{check}}}"#), 0.0),
        // Not gRPC calls.
        (
            r#"grpc_server_handled_total{grpc_type="unary",grpc_service="reassigned.v1.ReassignedNumbers",grpc_method="CheckNumber",grpc_code="OK"}"#.to_owned(),
            0.0,
        ),
    ] {
        assert_eq!(sample(&text, &name), Some(value), "{name} in\n{text}");
    }
    assert_eq!(
        server
            .handles
            .metrics
            .rest_requests(CHECK_PATH, &Method::POST, Some(200)),
        1
    );
    assert!(
        !text.contains("14155550001"),
        "the 404's query string in the metrics"
    );

    let hmac = reassigned::audit::NumberKey::from_secret_file(&secret_path.expect("secret"))
        .expect("key")
        .hmac_hex(A);
    let line = access_line("rest-obs-1").await;
    assert_has_all(
        &line,
        &[
            " INFO ",
            "protocol=\"rest\"",
            "platform=\"spiffe://dev.reassigned/platform-a\"",
            "method=\"POST\"",
            "route=\"/number-recycling/v0.2/check\"",
            "code=200",
            &format!("number_hmac=\"{hmac}\""),
            "numbers=1",
            "latency_us=",
            "store_us=",
            "trace_id=",
        ],
    );
    let line = access_line("rest-obs-2").await;
    assert!(line.contains("code=400"), "{line}");
    let line = access_line(&generated).await;
    assert_has_all(
        &line,
        &[
            "route=\"/v1/numbers:batchCheck\"",
            "code=200",
            "numbers=2",
            "number_hmac=\"-\"",
        ],
    );
    let all = String::from_utf8_lossy(&log.lock().expect("lock")).into_owned();
    for digits in [&A[1..], &ABSENT[1..]] {
        assert!(!all.contains(digits), "a number appears in the log:\n{all}");
    }
    assert!(!all.contains("Bearer"), "a token in the log");
    server.stop().await;
}
