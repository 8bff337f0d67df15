//! Revocation and rotation without restarts: CRLs enforced at the handshake,
//! and the server certificate, client CA bundle and CRLs reloaded for new
//! connections (on a file change, on the programmatic trigger, on SIGHUP in
//! the binary) while open connections keep working, except those whose
//! client certificate a reload revoked or no longer trusts. Real TLS, real servers
//! on 127.0.0.1:0, certificates minted per test.

#![allow(clippy::unwrap_used)]

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reassigned::cli::certs::{DevPki, PemPair};
use reassigned::config::{ServeConfig, ServeSettings};
use reassigned::server::reload::{ReloadError, ReloadHandle};
use reassigned::store::{AnyStore, EmbeddedStore};
use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use support::bin::Killed;
use support::poll::eventually;
use support::server::tls_channel;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// Generous bound for anything that should happen "soon".
const DEADLINE: Duration = Duration::from_secs(15);
/// Polling interval of the server's file watcher in these tests.
const WATCH_MS: u64 = 50;

/// Replace `path` atomically, as operators (and `reassigned certs revoke`)
/// should, so the watcher never reads half a file.
fn replace(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn leaf(cert_pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// Server TLS files in a temporary directory.
struct Files {
    dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
    crl: PathBuf,
}

impl Files {
    /// A server certificate from `server_pki`, trusting the CAs in
    /// `client_cas` for clients, with the CRL `crl`.
    fn new(server_pki: &DevPki, client_cas: &[&DevPki], crl: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let files = Self {
            cert: dir.path().join("server.pem"),
            key: dir.path().join("server.key"),
            ca: dir.path().join("clients-ca.pem"),
            crl: dir.path().join("clients.crl"),
            dir,
        };
        files.set_server(&server_pki.server(&["localhost", "127.0.0.1"]).unwrap());
        files.set_client_cas(client_cas);
        replace(&files.crl, crl);
        files
    }

    fn set_server(&self, server: &PemPair) {
        replace(&self.cert, &server.cert_pem);
        replace(&self.key, &server.key_pem);
    }

    fn set_client_cas(&self, cas: &[&DevPki]) {
        let bundle: String = cas.iter().map(|pki| pki.ca_cert_pem()).collect();
        replace(&self.ca, &bundle);
    }
}

/// `reassigned::server::run_with` on 127.0.0.1:0 with the embedded store, mTLS only.
struct Server {
    addr: SocketAddr,
    reload: ReloadHandle,
    metrics: reassigned::server::metrics::MetricsHandle,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    _data: tempfile::TempDir,
}

impl Server {
    async fn start(files: &Files) -> Self {
        let data = tempfile::tempdir().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = ServeConfig::from_settings(ServeSettings {
            listen: Some(addr),
            tls_cert: Some(files.cert.clone()),
            tls_key: Some(files.key.clone()),
            client_ca: Some(files.ca.clone()),
            client_crls: Some(vec![files.crl.clone()]),
            tls_reload_interval_ms: Some(WATCH_MS),
            data_dir: Some(data.path().to_owned()),
            tokens: Some(false),
            ..ServeSettings::default()
        })
        .unwrap();
        let handles = reassigned::server::Handles::default();
        let reload = handles.reload.clone();
        let metrics = handles.metrics.clone();
        let store = AnyStore::Embedded(Arc::new(EmbeddedStore::new()));
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(reassigned::server::run_with(
            listener,
            config,
            store,
            handles,
            None,
            async move {
                let _ = rx.await;
            },
        ));
        Self {
            addr,
            reload,
            metrics,
            shutdown: Some(tx),
            task: Some(task),
            _data: data,
        }
    }

    async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// A TLS channel to `addr` as `client`, trusting `server_ca` for the server.
async fn connect(addr: SocketAddr, client: &PemPair, server_ca: &DevPki) -> Result<Channel, String> {
    tls_channel(addr, Some(client), server_ca.ca_cert_pem(), DEADLINE).await
}

/// One health call on `channel` (exempt from tokens, not from mTLS). With
/// TLS 1.3 a refused client certificate shows here, not at connect.
async fn call(channel: &Channel) -> Result<(), String> {
    HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(|_| ())
        .map_err(|status| format!("{status:?}"))
}

/// A health call on a new connection.
async fn fresh_call(addr: SocketAddr, client: &PemPair, server_ca: &DevPki) -> Result<(), String> {
    let channel = connect(addr, client, server_ca).await?;
    call(&channel).await
}

/// Issue 7 §5: a revoked certificate must not keep working on a connection
/// opened before the revocation. After the CRL reload, the revoked client's
/// idle connection is closed within a few seconds (a call on it has to
/// reconnect, and the new handshake is refused), a call in flight on another
/// of its connections is not cut at once (it gets until its grace), and the
/// connections of clients still trusted keep working.
#[tokio::test]
async fn revoked_client_is_refused_and_its_open_connections_are_closed() {
    let ca = DevPki::named("ca one").unwrap();
    let other_ca = DevPki::named("ca two").unwrap();
    // The bundle trusts two CAs; only `ca` publishes a CRL.
    let files = Files::new(&ca, &[&ca, &other_ca], &ca.crl(&[]).unwrap());
    let server = Server::start(&files).await;
    let revoked = ca.client("platform-a").unwrap();
    let sibling = ca.client("platform-b").unwrap();
    let foreign = other_ca.client("platform-c").unwrap();

    let open = connect(server.addr, &revoked, &ca).await.unwrap();
    call(&open).await.unwrap();
    // A call in flight on another connection of the revoked client: a
    // health Watch, which streams until it is cut.
    let watching = connect(server.addr, &revoked, &ca).await.unwrap();
    let mut watch = HealthClient::new(watching.clone())
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    watch.message().await.unwrap().expect("first health status");
    let sibling_open = connect(server.addr, &sibling, &ca).await.unwrap();
    call(&sibling_open).await.unwrap();
    let foreign_open = connect(server.addr, &foreign, &ca).await.unwrap();
    call(&foreign_open).await.unwrap();

    let revoked_at = Instant::now();
    replace(&files.crl, &ca.crl(&[&revoked.cert_pem]).unwrap());
    eventually("the revoked client's open connection is closed", || async {
        call(&open).await.is_err()
    })
    .await;
    let closed_after = revoked_at.elapsed();
    // The call failed because the connection closed and the reconnect was
    // refused, not because of a glitch: it keeps failing.
    let refused = call(&open).await.unwrap_err();
    assert!(refused.contains("CertificateRevoked"), "{refused}");
    let refused = fresh_call(server.addr, &revoked, &ca).await.unwrap_err();
    assert!(refused.contains("CertificateRevoked"), "{refused}");
    // The watch in flight was not cut with the idle connection; it ends
    // at its grace (the request timeout, 5 s by default).
    let cut = tokio::time::timeout(DEADLINE, async {
        loop {
            match watch.message().await {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return Instant::now(),
            }
        }
    })
    .await
    .expect("the call in flight on a revoked connection was never cut");
    let cut_after = cut - revoked_at;
    eprintln!(
        "revoked: idle connection closed after {closed_after:?}, call in flight cut after {cut_after:?}"
    );
    assert!(
        closed_after < Duration::from_secs(5),
        "the idle revoked connection stayed open {closed_after:?}"
    );
    assert!(
        cut_after > closed_after,
        "the call in flight was cut ({cut_after:?}) no later than the idle connection ({closed_after:?})"
    );
    // Both of the revoked client's connections were closed for it, and counted.
    assert_eq!(server.metrics.handshakes().closed_revoked(), 2);
    // Trusted clients' connections were left alone, and new ones are served.
    call(&sibling_open).await.unwrap();
    call(&foreign_open).await.unwrap();
    fresh_call(server.addr, &sibling, &ca).await.unwrap();
    fresh_call(server.addr, &foreign, &ca).await.unwrap();
    drop((open, watching, sibling_open, foreign_open));
    server.stop().await;
}

#[tokio::test]
async fn crl_in_der_is_enforced_from_the_start() {
    let ca = DevPki::new().unwrap();
    let revoked = ca.client("platform-a").unwrap();
    let files = Files::new(&ca, &[&ca], "");
    let pem = ca.crl(&[&revoked.cert_pem]).unwrap();
    let der = rustls_pki_types::CertificateRevocationListDer::from_pem_slice(pem.as_bytes()).unwrap();
    std::fs::write(&files.crl, der.as_ref()).unwrap();
    let server = Server::start(&files).await;

    assert!(fresh_call(server.addr, &revoked, &ca).await.is_err());
    fresh_call(server.addr, &ca.client("platform-b").unwrap(), &ca)
        .await
        .unwrap();
    server.stop().await;
}

/// Accepts any server certificate and remembers the leaf it was shown.
#[derive(Debug)]
struct RecordLeaf {
    provider: Arc<CryptoProvider>,
    leaf: Mutex<Option<Vec<u8>>>,
}

impl ServerCertVerifier for RecordLeaf {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.leaf.lock().unwrap() = Some(end_entity.to_vec());
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The leaf certificate (DER) the server presents to a new connection.
async fn served_leaf(addr: SocketAddr, client: &PemPair) -> Result<Vec<u8>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let recorder = Arc::new(RecordLeaf {
        provider: provider.clone(),
        leaf: Mutex::new(None),
    });
    let chain = vec![CertificateDer::from_pem_slice(client.cert_pem.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(client.key_pem.as_bytes()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(recorder.clone())
        .with_client_auth_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let leaf = recorder.leaf.lock().unwrap().take();
    leaf.ok_or_else(|| "no server certificate seen".to_owned())
}

#[tokio::test]
async fn rotated_server_certificate_is_served_and_a_broken_one_is_not() {
    let ca = DevPki::new().unwrap();
    let files = Files::new(&ca, &[&ca], &ca.crl(&[]).unwrap());
    let first = std::fs::read_to_string(&files.cert).unwrap();
    let server = Server::start(&files).await;
    let client = ca.client("platform-a").unwrap();
    assert_eq!(served_leaf(server.addr, &client).await.unwrap(), leaf(&first));
    let open = connect(server.addr, &client, &ca).await.unwrap();

    // A new certificate (new key, new serial) from the same CA: picked up
    // from the files.
    let second = ca.server(&["localhost", "127.0.0.1"]).unwrap();
    files.set_server(&second);
    eventually("the new certificate is served", || async {
        served_leaf(server.addr, &client).await.ok() == Some(leaf(&second.cert_pem))
    })
    .await;
    fresh_call(server.addr, &client, &ca).await.unwrap();
    call(&open).await.unwrap();

    // A broken certificate file: the reload fails, names the file, and the
    // second certificate stays in service.
    replace(
        &files.cert,
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    );
    let err = server.reload.reload().await.unwrap_err();
    assert!(matches!(err, ReloadError::Tls(_)), "{err}");
    assert!(err.to_string().contains("server.pem"), "{err}");
    assert_eq!(
        served_leaf(server.addr, &client).await.unwrap(),
        leaf(&second.cert_pem)
    );
    fresh_call(server.addr, &client, &ca).await.unwrap();

    // A key that does not match the certificate: refused the same way.
    let third = ca.server(&["localhost"]).unwrap();
    replace(&files.cert, &third.cert_pem);
    let err = server.reload.reload().await.unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");
    assert!(!err.to_string().contains("PRIVATE KEY"), "{err}");
    assert_eq!(
        served_leaf(server.addr, &client).await.unwrap(),
        leaf(&second.cert_pem)
    );

    // Completing the pair and triggering: served at once.
    replace(&files.key, &third.key_pem);
    let summary = server.reload.reload().await.unwrap();
    assert!(summary.subject.contains("localhost"), "{summary:?}");
    assert_eq!(
        served_leaf(server.addr, &client).await.unwrap(),
        leaf(&third.cert_pem)
    );
    call(&open).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn replaced_client_ca_bundle_refuses_the_old_ca_and_accepts_the_new() {
    let old_ca = DevPki::named("old ca").unwrap();
    let new_ca = DevPki::named("new ca").unwrap();
    let files = Files::new(&old_ca, &[&old_ca], &old_ca.crl(&[]).unwrap());
    let server = Server::start(&files).await;
    let old_client = old_ca.client("platform-a").unwrap();
    let new_client = new_ca.client("platform-a").unwrap();

    let open = connect(server.addr, &old_client, &old_ca).await.unwrap();
    call(&open).await.unwrap();
    assert!(fresh_call(server.addr, &new_client, &old_ca).await.is_err());

    // The old CA's CRL no longer matches any CA: logged, kept, harmless.
    files.set_client_cas(&[&new_ca]);
    eventually("the new CA's client is accepted", || async {
        fresh_call(server.addr, &new_client, &old_ca).await.is_ok()
    })
    .await;
    assert!(fresh_call(server.addr, &old_client, &old_ca).await.is_err());
    // The old CA's client is no longer trusted: its open connection closes
    // too (issue 7 §5), and the call has to reconnect, which is refused.
    eventually("the old CA's open connection is closed", || async {
        call(&open).await.is_err()
    })
    .await;
    let accepted = connect(server.addr, &new_client, &old_ca).await.unwrap();
    call(&accepted).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn reload_without_a_running_server_says_so() {
    let handle = ReloadHandle::new();
    assert!(matches!(handle.reload().await, Err(ReloadError::NotRunning)));

    let ca = DevPki::new().unwrap();
    let files = Files::new(&ca, &[&ca], &ca.crl(&[]).unwrap());
    let server = Server::start(&files).await;
    let reload = server.reload.clone();
    eventually("the server attaches", || async { reload.reload().await.is_ok() }).await;
    server.stop().await;
    assert!(matches!(reload.reload().await, Err(ReloadError::NotRunning)));
}

#[tokio::test]
async fn sighup_reloads_the_binary_without_dropping_connections() {
    let ca = DevPki::new().unwrap();
    let files = Files::new(&ca, &[&ca], &ca.crl(&[]).unwrap());
    let data = files.dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let mut child = Killed(
        Command::new(env!("CARGO_BIN_EXE_reassigned"))
            .args([
                "--log-format",
                "json",
                "serve",
                "--no-tokens",
                "--listen",
                "127.0.0.1:0",
            ])
            .arg("--tls-cert")
            .arg(&files.cert)
            .arg("--tls-key")
            .arg(&files.key)
            .arg("--client-ca")
            .arg(&files.ca)
            .arg("--client-crl")
            .arg(&files.crl)
            .arg("--data-dir")
            .arg(&data)
            // Only SIGHUP may reload in this test.
            .args(["--tls-reload-interval-ms", "3600000"])
            .env("REASSIGNED_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );

    // Read the log on a thread (so the pipe never fills) and find the address.
    let stderr = child.0.stderr.take().unwrap();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel::<SocketAddr>();
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let log_writer = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let addr = serde_json::from_str::<serde_json::Value>(&line)
                .ok()
                .filter(|json| json["fields"]["message"] == "listening")
                .and_then(|json| json["fields"]["addr"].as_str().and_then(|a| a.parse().ok()));
            if let Some(addr) = addr {
                let _ = addr_tx.send(addr);
            }
            log_writer.lock().unwrap().push(line);
        }
    });
    let addr = tokio::task::spawn_blocking(move || addr_rx.recv_timeout(DEADLINE))
        .await
        .unwrap()
        .unwrap_or_else(|_| panic!("serve did not say where it listens: {:?}", log.lock().unwrap()));

    let client = ca.client("platform-a").unwrap();
    let first = std::fs::read_to_string(&files.cert).unwrap();
    assert_eq!(served_leaf(addr, &client).await.unwrap(), leaf(&first));
    let open = connect(addr, &client, &ca).await.unwrap();
    call(&open).await.unwrap();

    let second = ca.server(&["localhost", "127.0.0.1"]).unwrap();
    files.set_server(&second);
    child.signal("HUP");
    eventually("the new certificate is served after SIGHUP", || async {
        served_leaf(addr, &client).await.ok() == Some(leaf(&second.cert_pem))
    })
    .await;
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "SIGHUP ended the server: {:?}",
        log.lock().unwrap()
    );
    call(&open).await.unwrap();
    assert!(
        log.lock()
            .unwrap()
            .iter()
            .any(|line| line.contains("tls material reloaded") && line.contains("sighup")),
        "{:?}",
        log.lock().unwrap()
    );
}

fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_reassigned"));
    cmd.stdin(Stdio::null());
    cmd
}

#[tokio::test]
async fn certs_revoke_makes_a_crl_the_server_enforces() {
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .args(["certs", "dev", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let path = |name: &str| dir.path().join(name);
    let out = bin()
        .args(["certs", "revoke", "--ca-cert"])
        .arg(path("ca.pem"))
        .arg("--ca-key")
        .arg(path("ca.key"))
        .arg("--cert")
        .arg(path("platform-a.pem"))
        .arg("--out")
        .arg(path("clients.crl"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let files = Files {
        cert: path("server.pem"),
        key: path("server.key"),
        ca: path("ca.pem"),
        crl: path("clients.crl"),
        dir,
    };
    let server = Server::start(&files).await;
    let read = |name: &str| std::fs::read_to_string(path_in(&files, name)).unwrap();
    let pair = |name: &str| PemPair {
        cert_pem: read(&format!("{name}.pem")),
        key_pem: read(&format!("{name}.key")),
    };
    let ca = DevPki::from_pem(&read("ca.pem"), &read("ca.key")).unwrap();
    let refused = fresh_call(server.addr, &pair("platform-a"), &ca)
        .await
        .unwrap_err();
    assert!(refused.contains("CertificateRevoked"), "{refused}");
    fresh_call(server.addr, &pair("platform-b"), &ca).await.unwrap();
    server.stop().await;
}

fn path_in(files: &Files, name: &str) -> PathBuf {
    files.dir.path().join(name)
}

#[test]
fn crls_come_from_flags_environment_and_file() {
    let ca = DevPki::named("config ca").unwrap();
    let files = Files::new(&ca, &[&ca], &ca.crl(&[]).unwrap());
    let second = files.dir.path().join("second.crl");
    std::fs::write(&second, ca.crl(&[]).unwrap()).unwrap();
    let data = files.dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let serve = || {
        let mut cmd = bin();
        cmd.args(["serve", "--dump-config", "--no-tokens", "--tls-cert"])
            .arg(&files.cert)
            .arg("--tls-key")
            .arg(&files.key)
            .arg("--client-ca")
            .arg(&files.ca)
            .arg("--data-dir")
            .arg(&data)
            .env_remove("REASSIGNED_CLIENT_CRLS");
        cmd
    };
    let dumped = |mut cmd: Command| {
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let config: toml::Value = toml::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap();
        config["client_crls"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| PathBuf::from(v.as_str().unwrap()))
            .collect::<Vec<_>>()
    };
    let both = vec![files.crl.clone(), second.clone()];

    let mut flags = serve();
    flags
        .arg("--client-crl")
        .arg(&files.crl)
        .arg("--client-crl")
        .arg(&second);
    assert_eq!(dumped(flags), both);

    let mut env = serve();
    env.env(
        "REASSIGNED_CLIENT_CRLS",
        format!("{},{}", files.crl.display(), second.display()),
    );
    assert_eq!(dumped(env), both);

    let toml_file = files.dir.path().join("serve.toml");
    std::fs::write(
        &toml_file,
        format!("client_crls = [{:?}, {:?}]\n", files.crl, second),
    )
    .unwrap();
    let mut file = serve();
    file.arg("--config").arg(&toml_file);
    assert_eq!(dumped(file), both);

    let mut missing = serve();
    missing.arg("--client-crl").arg(files.dir.path().join("nope.crl"));
    let out = missing.output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("client_crls") && err.contains("nope.crl"), "{err}");
}

/// A directory laid out as Kubernetes mounts a Secret: each file is a
/// symlink `NAME -> ..data/NAME`, `..data` a symlink to a timestamped
/// directory; an update writes a new timestamped directory and swaps
/// `..data` with one rename (as the kubelet's atomic writer does).
struct SecretDir {
    dir: tempfile::TempDir,
    version: std::cell::Cell<u32>,
}

impl SecretDir {
    fn new(files: &[(&str, &str)]) -> Self {
        let secret = Self {
            dir: tempfile::tempdir().unwrap(),
            version: std::cell::Cell::new(0),
        };
        secret.update(files);
        for (name, _) in files {
            std::os::unix::fs::symlink(format!("..data/{name}"), secret.path(name)).unwrap();
        }
        secret
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The kubelet's update: new files in a new directory, then `..data`
    /// swapped atomically; the old directory removed.
    fn update(&self, files: &[(&str, &str)]) {
        let old = self.version.get();
        let version = old + 1;
        self.version.set(version);
        let stamped = format!("..2026_11_30_00_00_{version:02}.000000001");
        std::fs::create_dir(self.path(&stamped)).unwrap();
        for (name, contents) in files {
            std::fs::write(self.path(&stamped).join(name), contents).unwrap();
        }
        std::os::unix::fs::symlink(&stamped, self.path("..data_tmp")).unwrap();
        std::fs::rename(self.path("..data_tmp"), self.path("..data")).unwrap();
        if old > 0 {
            let _ = std::fs::remove_dir_all(self.path(&format!("..2026_11_30_00_00_{old:02}.000000001")));
        }
    }
}

/// README "Deploying": a Secret updated in Kubernetes reaches a running pod
/// as a swap of the `..data` symlink; the file watcher follows it (the
/// certificate files' contents) without SIGHUP or restart.
#[tokio::test]
async fn a_kubernetes_secret_update_swapping_data_is_reloaded() {
    let ca = DevPki::new().unwrap();
    let first = ca.server(&["localhost", "127.0.0.1"]).unwrap();
    let crl = ca.crl(&[]).unwrap();
    let secret = SecretDir::new(&[
        ("server.pem", &first.cert_pem),
        ("server.key", &first.key_pem),
        ("ca.pem", ca.ca_cert_pem()),
        ("clients.crl", &crl),
    ]);
    let files = Files {
        cert: secret.path("server.pem"),
        key: secret.path("server.key"),
        ca: secret.path("ca.pem"),
        crl: secret.path("clients.crl"),
        dir: tempfile::tempdir().unwrap(),
    };
    let server = Server::start(&files).await;
    let client = ca.client("platform-a").unwrap();
    assert_eq!(
        served_leaf(server.addr, &client).await.unwrap(),
        leaf(&first.cert_pem)
    );

    let second = ca.server(&["localhost", "127.0.0.1"]).unwrap();
    secret.update(&[
        ("server.pem", &second.cert_pem),
        ("server.key", &second.key_pem),
        ("ca.pem", ca.ca_cert_pem()),
        ("clients.crl", &crl),
    ]);
    eventually("the certificate of the updated Secret is served", || async {
        served_leaf(server.addr, &client).await.ok() == Some(leaf(&second.cert_pem))
    })
    .await;
    fresh_call(server.addr, &client, &ca).await.unwrap();
    server.stop().await;
}

/// The same for the token issuer's JWKS: the verifier's watcher (modification
/// time, size and inode, through the symlinks) picks up the new key set.
#[tokio::test]
async fn a_kubernetes_secret_update_of_the_jwks_is_reloaded() {
    use reassigned::cli::token::{IssuerKey, KeyAlg, jwks_json};
    use reassigned::config::TokenConfig;
    use reassigned::server::token::{TokenVerifier, spawn_reload};
    let old = IssuerKey::generate(KeyAlg::Es256, Some("old")).unwrap();
    let new = IssuerKey::generate(KeyAlg::Es256, Some("new")).unwrap();
    let secret = SecretDir::new(&[("jwks.json", &jwks_json(&[&old]))]);
    let verifier = Arc::new(
        TokenVerifier::load(TokenConfig {
            jwks: secret.path("jwks.json"),
            issuer: "i".into(),
            audience: "a".into(),
            max_lifetime_secs: None,
        })
        .unwrap(),
    );
    assert_eq!(verifier.kids(), ["old"]);
    let watcher = spawn_reload(verifier.clone());
    secret.update(&[("jwks.json", &jwks_json(&[&old, &new]))]);
    eventually("the JWKS of the updated Secret is loaded", || async {
        let mut kids = verifier.kids();
        kids.sort();
        kids == ["new", "old"]
    })
    .await;
    watcher.abort();
}
