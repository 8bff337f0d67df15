//! Running the `reassigned` binary in tests: a command with a clean
//! environment, a runner that fails the test with the output, a child that
//! is killed when dropped (polling with a deadline is [`super::poll`]).
#![allow(dead_code)]

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `reassigned` with none of the `REASSIGNED_*` settings of the caller's
/// environment that would change what a test means, and logs at info.
pub fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_reassigned"));
    for var in [
        "REASSIGNED_REDIS",
        "REASSIGNED_REDIS_CLUSTER",
        "REASSIGNED_JWKS",
        "REASSIGNED_TOKENS",
        "REASSIGNED_TOKEN_ISSUER",
        "REASSIGNED_TOKEN_AUDIENCE",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("REASSIGNED_LOG", "info");
    cmd
}

/// Runs `cmd` to completion; fails the test with its output unless it succeeded.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("run reassigned");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A child process killed (and reaped) when dropped.
pub struct Killed(pub Child);

impl Killed {
    /// Sends signal `name` (e.g. `TERM`, `HUP`) to the child; fails the test
    /// if it cannot be sent.
    pub fn signal(&self, name: &str) {
        let sent = Command::new("kill")
            .args([format!("-{name}"), self.0.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -{name} failed");
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port that was free a moment ago, for a child process that binds it
/// itself (the child cannot be handed a bound listener).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port")
}

/// `--tls-cert`, `--tls-key` and `--client-ca` with the dev certificates in
/// `certs` (`reassigned certs dev`): `server.pem`, `server.key`, `ca.pem`.
pub fn dev_tls_args(certs: &Path) -> [OsString; 6] {
    [
        "--tls-cert".into(),
        certs.join("server.pem").into(),
        "--tls-key".into(),
        certs.join("server.key").into(),
        "--client-ca".into(),
        certs.join("ca.pem").into(),
    ]
}

/// Runs `reassigned certs dev --out <dir>/certs`; returns that directory.
pub fn dev_certs(dir: &Path) -> PathBuf {
    let certs = dir.join("certs");
    run(bin().args(["certs", "dev", "--out"]).arg(&certs));
    certs
}

/// `reassigned serve` (mTLS only, no tokens) listening on 127.0.0.1:`port`
/// with the dev certificates in `certs` ([`dev_tls_args`]); the caller adds
/// the store and other flags and says where the output goes.
pub fn serve_dev_command(certs: &Path, port: u16) -> Command {
    let mut cmd = bin();
    cmd.args(["serve", "--no-tokens", "--listen", &format!("127.0.0.1:{port}")])
        .args(dev_tls_args(certs));
    cmd
}

/// Starts `reassigned serve` (mTLS only, no tokens) on a free port with the
/// dev certificates of `dir/certs` (`reassigned certs dev`), `store_args`
/// (e.g. `--data-dir D` or `--redis URL`) and `extra` flags; its output
/// discarded.
pub fn serve_dev(dir: &Path, store_args: &[String], extra: &[&OsStr]) -> (Killed, u16) {
    let port = free_port();
    let child = serve_dev_command(&dir.join("certs"), port)
        .args(store_args)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn serve");
    (Killed(child), port)
}

/// A mutual-TLS channel to a `reassigned serve` child on 127.0.0.1:`port`, as
/// `platform-a` of the dev certificates in `certs` (`reassigned certs dev`);
/// retried until the child listens, failing after 30 s.
pub async fn connect_as_platform_a(certs: &Path, port: u16) -> tonic::transport::Channel {
    connect_as(certs, "platform-a", port).await
}

/// A `ReassignedNumbers` client over [`connect_as_platform_a`].
pub async fn numbers_client(
    certs: &Path,
    port: u16,
) -> reassigned::api::pb::reassigned_numbers_client::ReassignedNumbersClient<tonic::transport::Channel> {
    reassigned::api::pb::reassigned_numbers_client::ReassignedNumbersClient::new(
        connect_as_platform_a(certs, port).await,
    )
}

/// `GetMirrorStatus` on `client`; fails the test if the call fails.
pub async fn mirror_status(
    client: &mut reassigned::api::pb::reassigned_numbers_client::ReassignedNumbersClient<
        tonic::transport::Channel,
    >,
) -> reassigned::api::pb::GetMirrorStatusResponse {
    client
        .get_mirror_status(reassigned::api::pb::GetMirrorStatusRequest {})
        .await
        .expect("status")
        .into_inner()
}

/// Like [`connect_as_platform_a`], as `who` (`<who>.pem`/`.key` in `certs`,
/// e.g. `operator-a`).
pub async fn connect_as(certs: &Path, who: &str, port: u16) -> tonic::transport::Channel {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let read = |f: &str| std::fs::read_to_string(certs.join(f)).expect("read pem");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")))
        .identity(Identity::from_pem(
            read(&format!("{who}.pem")),
            read(&format!("{who}.key")),
        ))
        .domain_name("localhost");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let endpoint = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
            .expect("endpoint")
            .tls_config(tls.clone())
            .expect("tls");
        match endpoint.connect().await {
            Ok(channel) => return channel,
            Err(e) => {
                assert!(Instant::now() < deadline, "server did not come up: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
