//! A real `reassigned` server on an ephemeral port, over mutual TLS with
//! certificates minted for this test, and clients for it.
//!
//! By default the server requires bearer tokens (a JWKS and an issuer key
//! minted per test) and the clients send a valid token with every scope for
//! their certificate; [`TestServer::start_without_tokens`] serves mTLS only.
#![allow(dead_code)]

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use reassigned::api::pb::reassigned_numbers_client::ReassignedNumbersClient;
use reassigned::api::pb::{CheckNumberRequest, GetMirrorStatusRequest, GetMirrorStatusResponse};
use reassigned::cli::certs::{ClientCertSpec, DevPki, PemPair};
use reassigned::cli::rest_client::{RestClient, RestTls};
use reassigned::cli::token::{IssuerKey, KeyAlg, claims_for_cert, jwks_json};
use reassigned::config::{ServeConfig, ServeSettings};
use reassigned::server::Handles;
use reassigned::server::token::{TokenClaims, TokenConfig, TokenVerifier, scope};
use reassigned::store::AnyStore;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// The `iss` of test tokens.
pub const ISSUER: &str = "test-issuer";
/// The `aud` of test tokens.
pub const AUDIENCE: &str = "test-audience";
/// The `kid` of the test issuer key.
pub const KID: &str = "test-key";

/// Sends `authorization: Bearer <token>` with every call (or nothing).
#[derive(Clone, Debug, Default)]
pub struct Bearer(Option<AsciiMetadataValue>);

impl Bearer {
    /// Sends `token` as a bearer token.
    pub fn new(token: &str) -> Self {
        Self(Some(
            MetadataValue::try_from(format!("Bearer {token}")).expect("token is ASCII"),
        ))
    }

    /// Sends this exact `authorization` value.
    pub fn raw(value: &str) -> Self {
        Self(Some(MetadataValue::try_from(value).expect("ASCII")))
    }

    /// Sends no token.
    pub fn none() -> Self {
        Self(None)
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            req.metadata_mut().insert("authorization", value.clone());
        }
        Ok(req)
    }
}

/// A channel of the test clients: TLS, plus a bearer token on every call.
pub type TestChannel = InterceptedService<Channel, Bearer>;

/// The token side of a test server: the issuer key, the JWKS file the
/// server reads, and the server's own verifier (to call `reload`).
pub struct Tokens {
    pub key: IssuerKey,
    pub jwks: PathBuf,
    pub verifier: Arc<TokenVerifier>,
}

impl Tokens {
    /// Valid claims (1 h, all scopes unless `scope` says otherwise) for the
    /// client certificate of `identity`.
    pub fn claims(&self, identity: &PemPair, scope: &str) -> TokenClaims {
        claims_for_cert(
            &identity.cert_pem,
            scope,
            Duration::from_secs(3600),
            ISSUER,
            AUDIENCE,
        )
        .expect("claims for the certificate")
    }

    /// A valid token with `scope` for `identity`.
    pub fn mint(&self, identity: &PemPair, scope: &str) -> String {
        self.key.mint(&self.claims(identity, scope)).expect("mint")
    }
}

/// Certificates minted for one test: a CA, a server certificate and files.
pub struct Certs {
    pub pki: DevPki,
    pub dir: TempDir,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl Certs {
    pub fn mint() -> Self {
        let pki = DevPki::new().expect("dev CA");
        let dir = tempfile::tempdir().expect("tempdir");
        let server = pki.server(&["localhost", "127.0.0.1"]).expect("server cert");
        let ca = write(dir.path(), "ca.pem", pki.ca_cert_pem());
        let server_cert = write(dir.path(), "server.pem", &server.cert_pem);
        let server_key = write(dir.path(), "server.key", &server.key_pem);
        Self {
            pki,
            dir,
            ca,
            server_cert,
            server_key,
        }
    }

    /// A valid client certificate for `platform`.
    pub fn client(&self, platform: &str) -> PemPair {
        self.pki.client(platform).expect("client cert")
    }

    /// An expired client certificate for `platform`.
    pub fn expired_client(&self, platform: &str) -> PemPair {
        self.pki
            .client_with(&ClientCertSpec::platform(platform).expired())
            .expect("client cert")
    }
}

/// An issuer key (`alg`, kid `k`) and a verifier that trusts it alone
/// (issuer `i`, audience `a`, lifetimes up to a day), its JWKS written into
/// `dir`.
pub fn key_and_verifier(dir: &Path, alg: KeyAlg) -> (IssuerKey, TokenVerifier) {
    let key = IssuerKey::generate(alg, Some("k")).expect("key");
    let jwks = write(dir, "jwks.json", &jwks_json(&[&key]));
    let verifier = TokenVerifier::load(TokenConfig {
        jwks,
        issuer: "i".into(),
        audience: "a".into(),
        max_lifetime_secs: Some(86_400),
    })
    .expect("verifier");
    (key, verifier)
}

/// Writes an audit secret into `dir` and sets it as the audit secret of
/// `settings`; returns its path (to compute the expected number HMACs).
pub fn audit_secret(settings: &mut ServeSettings, dir: &Path) -> PathBuf {
    let secret = write(dir, "audit.secret", "a test secret of enough bytes\n");
    settings.audit_secret_file = Some(secret.clone());
    secret
}

/// A Redis URL where no Redis listens (a dead audit sink).
pub fn dead_redis() -> String {
    format!("redis://127.0.0.1:{}/0", super::bin::free_port())
}

/// A `CheckNumber` request for `phone_number` since `since`, no receipt.
pub fn check_request(phone_number: &str, since: &str) -> CheckNumberRequest {
    CheckNumberRequest {
        phone_number: phone_number.into(),
        since: since.into(),
        ..Default::default()
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write pem");
    path
}

/// A TLS channel to `addr` presenting `identity` (or no client certificate)
/// and trusting `ca_pem` for the server (named `localhost`), with `timeout`
/// on the connection and on every call; `Err` describes the failure.
pub async fn tls_channel(
    addr: SocketAddr,
    identity: Option<&PemPair>,
    ca_pem: &str,
    timeout: Duration,
) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some(id) = identity {
        tls = tls.identity(Identity::from_pem(&id.cert_pem, &id.key_pem));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .map_err(|e| e.to_string())?
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))
}

/// A client certificate written to files, for the binary's client commands
/// (`publish`, `watch`, `health`, ...) against a [`TestServer`].
pub struct ClientFiles {
    /// The certificate and key.
    pub identity: PemPair,
    /// The CA that signed the server's certificate.
    pub ca: PathBuf,
    /// The certificate file.
    pub cert: PathBuf,
    /// The key file.
    pub key: PathBuf,
}

impl ClientFiles {
    /// `--ca`, `--cert` and `--key` for this client.
    pub fn args(&self) -> [OsString; 6] {
        [
            "--ca".into(),
            self.ca.clone().into(),
            "--cert".into(),
            self.cert.clone().into(),
            "--key".into(),
            self.key.clone().into(),
        ]
    }
}

/// A running server; stop it with [`TestServer::stop`] so its errors and
/// panics fail the test.
pub struct TestServer {
    pub addr: SocketAddr,
    pub certs: Certs,
    /// `None` when the server runs without tokens.
    pub tokens: Option<Tokens>,
    /// The configuration it runs with.
    pub config: ServeConfig,
    /// Its runtime handles (metrics, audit stats, reload).
    pub handles: Handles,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
    _data: TempDir,
}

impl TestServer {
    /// Serves `store` over mTLS without bearer tokens.
    pub async fn start_without_tokens(store: AnyStore, tweak: impl FnOnce(&mut ServeSettings)) -> Self {
        Self::start(store, |s| {
            s.tokens = Some(false);
            tweak(s);
        })
        .await
    }

    /// Serves `store` with default settings (tokens on, with a JWKS minted for
    /// this test) changed by `tweak`.
    pub async fn start(store: AnyStore, tweak: impl FnOnce(&mut ServeSettings)) -> Self {
        Self::start_in(store, |s, _| tweak(s)).await
    }

    /// Like [`TestServer::start`]; `tweak` also gets a directory of this
    /// test's own (the default `data_dir`) for files it wants to configure.
    pub async fn start_in(store: AnyStore, tweak: impl FnOnce(&mut ServeSettings, &Path)) -> Self {
        let certs = Certs::mint();
        let key = IssuerKey::generate(KeyAlg::Es256, Some(KID)).expect("issuer key");
        let jwks = write(certs.dir.path(), "jwks.json", &jwks_json(&[&key]));
        let data = tempfile::tempdir().expect("tempdir");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut settings = ServeSettings {
            listen: Some(addr),
            tls_cert: Some(certs.server_cert.clone()),
            tls_key: Some(certs.server_key.clone()),
            client_ca: Some(certs.ca.clone()),
            data_dir: Some(data.path().to_owned()),
            jwks: Some(jwks.clone()),
            token_issuer: Some(ISSUER.into()),
            token_audience: Some(AUDIENCE.into()),
            ..ServeSettings::default()
        };
        tweak(&mut settings, data.path());
        let config = ServeConfig::from_settings(settings).expect("config");
        let tokens = config.tokens.clone().map(|config| Tokens {
            key,
            jwks,
            verifier: Arc::new(TokenVerifier::load(config).expect("JWKS")),
        });
        let verifier = tokens.as_ref().map(|t| t.verifier.clone());
        let (tx, rx) = oneshot::channel::<()>();
        let handles = Handles::default();
        let handle = tokio::spawn(reassigned::server::run_with(
            listener,
            config.clone(),
            store,
            handles.clone(),
            verifier,
            async move {
                let _ = rx.await;
            },
        ));
        Self {
            addr,
            certs,
            tokens,
            config,
            handles,
            shutdown: Some(tx),
            handle: Some(handle),
            _data: data,
        }
    }

    /// A TLS channel presenting `identity` (or no client certificate) that
    /// sends a valid token with every scope for `identity` when the server
    /// requires tokens.
    pub async fn channel_with(
        &self,
        identity: Option<&PemPair>,
        ca_pem: &str,
    ) -> Result<TestChannel, tonic::transport::Error> {
        let bearer = match (&self.tokens, identity) {
            (Some(tokens), Some(id)) => claims_for_cert(
                &id.cert_pem,
                scope::ALL,
                Duration::from_secs(3600),
                ISSUER,
                AUDIENCE,
            )
            .ok()
            .map(|claims| Bearer::new(&tokens.key.mint(&claims).expect("mint")))
            .unwrap_or_default(),
            _ => Bearer::none(),
        };
        let channel = self.raw_channel(identity, ca_pem).await?;
        Ok(InterceptedService::new(channel, bearer))
    }

    /// A channel presenting `identity` that sends what `bearer` says.
    pub async fn channel_bearing(&self, identity: &PemPair, bearer: Bearer) -> TestChannel {
        let channel = self
            .raw_channel(Some(identity), self.certs.pki.ca_cert_pem())
            .await
            .expect("connect");
        InterceptedService::new(channel, bearer)
    }

    /// A TLS channel presenting `identity` (or no client certificate), no token.
    pub async fn raw_channel(
        &self,
        identity: Option<&PemPair>,
        ca_pem: &str,
    ) -> Result<Channel, tonic::transport::Error> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca_pem))
            .domain_name("localhost");
        if let Some(id) = identity {
            tls = tls.identity(Identity::from_pem(&id.cert_pem, &id.key_pem));
        }
        Endpoint::from_shared(format!("https://127.0.0.1:{}", self.addr.port()))
            .expect("endpoint")
            .tls_config(tls)?
            .connect()
            .await
    }

    /// A channel as `platform`, with a valid certificate (and token).
    pub async fn channel(&self, platform: &str) -> TestChannel {
        let id = self.certs.client(platform);
        self.channel_with(Some(&id), self.certs.pki.ca_cert_pem())
            .await
            .expect("connect")
    }

    /// A valid client certificate for `platform`, written into `dir` as
    /// `<platform>.pem` and `<platform>.key`.
    pub fn client_files(&self, platform: &str, dir: &Path) -> ClientFiles {
        let identity = self.certs.client(platform);
        let cert = write(dir, &format!("{platform}.pem"), &identity.cert_pem);
        let key = write(dir, &format!("{platform}.key"), &identity.key_pem);
        ClientFiles {
            identity,
            ca: self.certs.ca.clone(),
            cert,
            key,
        }
    }

    /// A `ReassignedNumbers` client as `platform-a`.
    pub async fn client(&self) -> ReassignedNumbersClient<TestChannel> {
        ReassignedNumbersClient::new(self.channel("platform-a").await)
    }

    /// Client TLS for the REST face: presenting `identity`, trusting this
    /// server's CA.
    pub fn rest_tls(&self, identity: &PemPair) -> RestTls {
        RestTls::new(
            self.certs.pki.ca_cert_pem().as_bytes(),
            identity.cert_pem.as_bytes(),
            identity.key_pem.as_bytes(),
            "localhost",
        )
        .expect("client TLS")
    }

    /// A REST client presenting `identity` and sending `token` (if any) as
    /// a bearer token; waits up to 10 s for the REST port to be bound.
    pub async fn rest_client(&self, identity: &PemPair, token: Option<&str>) -> RestClient {
        let addr = tokio::time::timeout(Duration::from_secs(10), self.handles.rest.wait())
            .await
            .expect("the REST port is bound");
        RestClient::connect(&addr.to_string(), &self.rest_tls(identity), token)
            .await
            .expect("connect")
    }

    /// `GetMirrorStatus` as `platform-a`; fails the test if the call fails.
    pub async fn mirror_status(&self) -> GetMirrorStatusResponse {
        self.client()
            .await
            .get_mirror_status(GetMirrorStatusRequest {})
            .await
            .expect("status")
            .into_inner()
    }

    /// Signals shutdown and waits for the server to stop; fails the test if it
    /// returned an error or panicked.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(handle) = self.handle.take() {
            handle
                .await
                .expect("server task panicked")
                .expect("server returned an error");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(handle) = &self.handle {
            handle.abort();
        }
    }
}
