//! Running the `reassigned` binary in tests: a command with a clean
//! environment, a runner that fails the test with the output, a child that
//! is killed when dropped (polling with a deadline is [`super::poll`]).
#![allow(dead_code)]

use std::process::{Child, Command, Output};
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

/// Starts `reassigned serve` (mTLS only, no tokens) on a free port with the
/// dev certificates of `dir/certs` (`reassigned certs dev`), `store_args`
/// (e.g. `--data-dir D` or `--redis URL`) and `extra` flags; its output
/// discarded.
pub fn serve_dev(dir: &std::path::Path, store_args: &[String], extra: &[&std::ffi::OsStr]) -> (Killed, u16) {
    let port = free_port();
    let certs = dir.join("certs");
    let child = bin()
        .args(["serve", "--no-tokens", "--listen", &format!("127.0.0.1:{port}")])
        .args(store_args)
        .args(extra)
        .arg("--tls-cert")
        .arg(certs.join("server.pem"))
        .arg("--tls-key")
        .arg(certs.join("server.key"))
        .arg("--client-ca")
        .arg(certs.join("ca.pem"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn serve");
    (Killed(child), port)
}

/// A mutual-TLS channel to a `reassigned serve` child on 127.0.0.1:`port`, as
/// `platform-a` of the dev certificates in `certs` (`reassigned certs dev`);
/// retried until the child listens, failing after 30 s.
pub async fn connect_as_platform_a(certs: &std::path::Path, port: u16) -> tonic::transport::Channel {
    connect_as(certs, "platform-a", port).await
}

/// Like [`connect_as_platform_a`], as `who` (`<who>.pem`/`.key` in `certs`,
/// e.g. `operator-a`).
pub async fn connect_as(certs: &std::path::Path, who: &str, port: u16) -> tonic::transport::Channel {
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
