//! A real `reassigned` server on an ephemeral port, over mutual TLS with
//! certificates minted for this test, and clients for it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use reassigned::api::pb::reassigned_numbers_client::ReassignedNumbersClient;
use reassigned::cli::certs::{ClientCertSpec, DevPki, PemPair};
use reassigned::config::{ServeConfig, ServeSettings};
use reassigned::store::AnyStore;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

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

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write pem");
    path
}

/// A running server; stop it with [`TestServer::stop`] so its errors and
/// panics fail the test.
pub struct TestServer {
    pub addr: SocketAddr,
    pub certs: Certs,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
    _data: TempDir,
}

impl TestServer {
    /// Serves `store` with default settings changed by `tweak`.
    pub async fn start(store: AnyStore, tweak: impl FnOnce(&mut ServeSettings)) -> Self {
        let certs = Certs::mint();
        let data = tempfile::tempdir().expect("tempdir");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut settings = ServeSettings {
            listen: Some(addr),
            tls_cert: Some(certs.server_cert.clone()),
            tls_key: Some(certs.server_key.clone()),
            client_ca: Some(certs.ca.clone()),
            data_dir: Some(data.path().to_owned()),
            ..ServeSettings::default()
        };
        tweak(&mut settings);
        let config = ServeConfig::from_settings(settings).expect("config");
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(reassigned::run(listener, config, store, async move {
            let _ = rx.await;
        }));
        Self {
            addr,
            certs,
            shutdown: Some(tx),
            handle: Some(handle),
            _data: data,
        }
    }

    /// A TLS channel presenting `identity` (or no client certificate).
    pub async fn channel_with(
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

    /// A channel as `platform`, with a valid certificate.
    pub async fn channel(&self, platform: &str) -> Channel {
        let id = self.certs.client(platform);
        self.channel_with(Some(&id), self.certs.pki.ca_cert_pem())
            .await
            .expect("connect")
    }

    /// A `ReassignedNumbers` client as `platform-a`.
    pub async fn client(&self) -> ReassignedNumbersClient<Channel> {
        ReassignedNumbersClient::new(self.channel("platform-a").await)
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
