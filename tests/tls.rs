//! mTLS end to end: our accept loop, our rustls config and the auth layer in
//! front of a real tonic server, with certificates minted per test.

#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use reassigned::cli::certs::{ClientCertSpec, DevPki, PemPair, platform_uri};
use reassigned::identity::platform_from_cert;
use reassigned::server::accept::{AcceptOptions, incoming};
use reassigned::server::auth::AuthLayer;
use reassigned::server::tls::{TlsFiles, TlsMaterial};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use support::server::tls_channel;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

/// Generous bound for anything that should happen "soon".
const DEADLINE: Duration = Duration::from_secs(10);

struct TestServer {
    addr: SocketAddr,
    ca_pem: String,
    files: TlsFiles,
    material: TlsMaterial,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    _dir: tempfile::TempDir,
}

impl TestServer {
    /// Serve the health service behind our TLS acceptor and auth layer on
    /// 127.0.0.1:0, with a server certificate from `pki`, trusting `pki` for
    /// client certificates.
    async fn start(pki: &DevPki, opts: AcceptOptions) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let server = pki.server(&["localhost", "127.0.0.1", "::1"]).unwrap();
        let files = TlsFiles {
            cert: dir.path().join("server.pem"),
            key: dir.path().join("server.key"),
            client_ca: dir.path().join("ca.pem"),
        };
        std::fs::write(&files.cert, &server.cert_pem).unwrap();
        std::fs::write(&files.key, &server.key_pem).unwrap();
        std::fs::write(&files.client_ca, pki.ca_cert_pem()).unwrap();
        let material = TlsMaterial::load(files.clone()).unwrap();
        let config = material.server_config().unwrap();

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_reporter, health) = tonic_health::server::health_reporter();
        let (shutdown, stop) = oneshot::channel::<()>();
        let task = tokio::spawn(
            tonic::transport::Server::builder()
                .layer(AuthLayer::new())
                .add_service(health)
                .serve_with_incoming_shutdown(incoming(listener, config, opts), async {
                    let _ = stop.await;
                }),
        );
        Self {
            addr,
            ca_pem: pki.ca_cert_pem().to_owned(),
            files,
            material,
            shutdown: Some(shutdown),
            task: Some(task),
            _dir: dir,
        }
    }

    async fn channel(&self, identity: Option<&PemPair>) -> Result<Channel, String> {
        self.channel_trusting(identity, &self.ca_pem).await
    }

    async fn channel_trusting(&self, identity: Option<&PemPair>, ca_pem: &str) -> Result<Channel, String> {
        tls_channel(self.addr, identity, ca_pem, DEADLINE).await
    }

    /// Health check of the whole server; `Err` describes any failure.
    async fn health(&self, identity: Option<&PemPair>) -> Result<ServingStatus, String> {
        self.health_trusting(identity, &self.ca_pem).await
    }

    async fn health_trusting(
        &self,
        identity: Option<&PemPair>,
        ca_pem: &str,
    ) -> Result<ServingStatus, String> {
        let channel = self.channel_trusting(identity, ca_pem).await?;
        let response = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map_err(|status| format!("check: {status:?}"))?;
        Ok(response.into_inner().status())
    }

    /// A call to a method that does not exist: past the auth layer it is
    /// UNIMPLEMENTED, refused by it UNAUTHENTICATED.
    async fn unknown_method(&self, identity: &PemPair) -> tonic::Status {
        let channel = self.channel(Some(identity)).await.unwrap();
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.unwrap();
        let codec = tonic_prost::ProstCodec::<HealthCheckRequest, HealthCheckResponse>::default();
        let path = http::uri::PathAndQuery::from_static("/reassigned.test.v1.Nope/Call");
        grpc.unary(tonic::Request::new(HealthCheckRequest::default()), path, codec)
            .await
            .unwrap_err()
    }

    /// Shut down and join the server task, so its errors and panics fail the test.
    async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(DEADLINE, task)
                .await
                .expect("server did not stop")
                .expect("server task panicked")
                .expect("server failed");
        }
    }
}

fn fast_opts() -> AcceptOptions {
    AcceptOptions {
        handshake_timeout: Duration::from_millis(300),
        ..AcceptOptions::default()
    }
}

/// The handshake was refused, with one of the TLS alerts in `alerts`.
fn assert_refused(result: Result<ServingStatus, String>, alerts: &[&str]) {
    let err = result.expect_err("the client was served");
    assert!(
        alerts.iter().any(|alert| err.contains(alert)),
        "expected one of {alerts:?}, got {err}"
    );
}

fn leaf_der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

/// Waits, up to [`DEADLINE`], until the server closes `stream`: EOF or a
/// reset, never data; fails the test with `what` if it stays open.
async fn assert_closed(stream: &mut TcpStream, what: &str) {
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(DEADLINE, stream.read(&mut buf))
        .await
        .expect(what);
    assert!(matches!(read, Ok(0) | Err(_)), "unexpected data: {read:?}");
}

#[tokio::test]
async fn valid_client_gets_serving() {
    let pki = DevPki::new().unwrap();
    let server = TestServer::start(&pki, AcceptOptions::default()).await;
    let client = pki.client("platform-a").unwrap();
    assert_eq!(server.health(Some(&client)).await, Ok(ServingStatus::Serving));
    server.stop().await;
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let pki = DevPki::new().unwrap();
    let server = TestServer::start(&pki, AcceptOptions::default()).await;
    assert_refused(server.health(None).await, &["CertificateRequired"]);
    // The refusal did not hurt the server.
    let client = pki.client("platform-a").unwrap();
    assert_eq!(server.health(Some(&client)).await, Ok(ServingStatus::Serving));
    server.stop().await;
}

#[tokio::test]
async fn client_from_another_ca_is_refused() {
    let pki = DevPki::new().unwrap();
    let other = DevPki::new().unwrap();
    let server = TestServer::start(&pki, AcceptOptions::default()).await;
    let stranger = other.client("platform-a").unwrap();
    // Both dev CAs have the same name, so webpki finds the trust anchor and
    // then fails the signature check (alert decrypt_error).
    assert_refused(
        server.health(Some(&stranger)).await,
        &["DecryptError", "UnknownCA", "BadCertificate"],
    );
    server.stop().await;
}

#[tokio::test]
async fn expired_client_certificate_is_refused() {
    let pki = DevPki::new().unwrap();
    let server = TestServer::start(&pki, AcceptOptions::default()).await;
    let expired = pki
        .client_with(&ClientCertSpec::platform("platform-a").expired())
        .unwrap();
    assert_refused(server.health(Some(&expired)).await, &["CertificateExpired"]);
    server.stop().await;
}

#[tokio::test]
async fn silent_client_does_not_block_others_and_is_dropped() {
    let pki = DevPki::new().unwrap();
    let server = TestServer::start(&pki, fast_opts()).await;

    let started = Instant::now();
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let client = pki.client("platform-a").unwrap();
    assert_eq!(server.health(Some(&client)).await, Ok(ServingStatus::Serving));

    // The server closes the silent connection once the handshake times out:
    // wait for EOF (or a reset) under a deadline.
    assert_closed(&mut silent, "silent connection was not closed").await;
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "closed before the handshake timeout"
    );
    server.stop().await;
}

#[tokio::test]
async fn at_the_handshake_cap_the_oldest_pending_handshake_is_shed() {
    let pki = DevPki::new().unwrap();
    let opts = AcceptOptions {
        max_handshakes: 1,
        handshake_timeout: Duration::from_secs(30),
        first_byte_timeout: Duration::from_secs(30),
        ..AcceptOptions::default()
    };
    let server = TestServer::start(&pki, opts).await;

    // The silent connection takes the only pending slot; the next client is
    // not made to wait for it: the silent one is shed and the client served.
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let started = Instant::now();
    let client = pki.client("platform-a").unwrap();
    assert_eq!(server.health(Some(&client)).await, Ok(ServingStatus::Serving));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the newcomer waited {:?}",
        started.elapsed()
    );
    assert_closed(&mut silent, "the oldest pending handshake was not shed").await;
    server.stop().await;
}

#[tokio::test]
async fn per_address_cap_sheds_that_address_oldest_first() {
    let pki = DevPki::new().unwrap();
    let opts = AcceptOptions {
        max_handshakes_per_ip: 2,
        handshake_timeout: Duration::from_secs(30),
        first_byte_timeout: Duration::from_secs(30),
        ..AcceptOptions::default()
    };
    let server = TestServer::start(&pki, opts).await;
    let mut oldest = TcpStream::connect(server.addr).await.unwrap();
    let mut second = TcpStream::connect(server.addr).await.unwrap();
    // The third connection from 127.0.0.1 sheds the oldest, not the second.
    let client = pki.client("platform-a").unwrap();
    assert_eq!(server.health(Some(&client)).await, Ok(ServingStatus::Serving));
    assert_closed(&mut oldest, "the oldest was not shed").await;
    let mut buf = [0u8; 16];
    let second_read = tokio::time::timeout(Duration::from_millis(300), second.read(&mut buf)).await;
    assert!(second_read.is_err(), "the second was closed too: {second_read:?}");
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_sends_nothing_is_dropped_at_the_first_byte_deadline() {
    let pki = DevPki::new().unwrap();
    let opts = AcceptOptions {
        handshake_timeout: Duration::from_secs(30),
        first_byte_timeout: Duration::from_millis(300),
        ..AcceptOptions::default()
    };
    let server = TestServer::start(&pki, opts).await;
    let started = Instant::now();
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    assert_closed(&mut silent, "the silent connection was not closed").await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(10),
        "closed after {waited:?}, not at the first-byte deadline"
    );
    server.stop().await;
}

#[tokio::test]
async fn certificate_without_identity_is_unauthenticated_but_health_passes() {
    let pki = DevPki::new().unwrap();
    let server = TestServer::start(&pki, AcceptOptions::default()).await;

    let nameless = pki
        .client_with(&ClientCertSpec {
            common_name: String::new(),
            ..ClientCertSpec::platform("platform-a").without_san()
        })
        .unwrap();
    assert_eq!(server.health(Some(&nameless)).await, Ok(ServingStatus::Serving));
    assert_eq!(
        server.unknown_method(&nameless).await.code(),
        tonic::Code::Unauthenticated
    );

    let named = pki.client("platform-a").unwrap();
    assert_eq!(
        server.unknown_method(&named).await.code(),
        tonic::Code::Unimplemented
    );
    server.stop().await;
}

#[tokio::test]
async fn reloaded_server_certificate_is_served_without_restart() {
    let pki = DevPki::new().unwrap();
    let server = TestServer::start(&pki, AcceptOptions::default()).await;
    let client = pki.client("platform-a").unwrap();

    // A client that trusts only a new server CA is refused before the reload...
    let next_ca = DevPki::new().unwrap();
    let next = next_ca.server(&["localhost"]).unwrap();
    let result = server.health_trusting(Some(&client), next_ca.ca_cert_pem()).await;
    assert!(result.is_err(), "served with the old certificate: {result:?}");

    // ...and served after it, by the same running server.
    std::fs::write(&server.files.cert, &next.cert_pem).unwrap();
    std::fs::write(&server.files.key, &next.key_pem).unwrap();
    server.material.reload().unwrap();
    assert_eq!(
        server.health_trusting(Some(&client), next_ca.ca_cert_pem()).await,
        Ok(ServingStatus::Serving)
    );
    server.stop().await;
}

#[test]
fn platform_is_the_uri_san() {
    let pki = DevPki::new().unwrap();
    let client = pki.client("platform-a").unwrap();
    let der = leaf_der(&client.cert_pem);
    let platform = platform_from_cert(&der).unwrap();
    assert_eq!(platform.id, platform_uri("platform-a"));
    assert_eq!(platform.id, "spiffe://dev.reassigned/platform-a");
    let expected: [u8; 32] = {
        use sha2::Digest;
        sha2::Sha256::digest(der.as_ref()).into()
    };
    assert_eq!(platform.cert_sha256, expected);
}

#[test]
fn platform_is_the_common_name_without_san() {
    let pki = DevPki::new().unwrap();
    let client = pki
        .client_with(&ClientCertSpec::platform("platform-b").without_san())
        .unwrap();
    let platform = platform_from_cert(&leaf_der(&client.cert_pem)).unwrap();
    assert_eq!(platform.id, "platform-b");
}

#[test]
fn platform_prefers_dns_san_over_common_name() {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["dns.example".to_owned()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "cn-name");
    let cert = params.self_signed(&key).unwrap();
    assert_eq!(platform_from_cert(cert.der()).unwrap().id, "dns.example");
}
