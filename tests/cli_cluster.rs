//! The binary against a Redis Cluster: `sync --redis-cluster` writes the
//! mirror, `serve --redis-cluster --redis-read-from-replicas` answers from
//! it, and `--redis` with `--redis-cluster` is refused.

mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use reassigned::api::pb::GetMirrorStatusRequest;
use reassigned::api::pb::reassigned_numbers_client::ReassignedNumbersClient;
use support::bin::{Killed, bin, free_port, run};
use support::redis_cluster::RedisCluster;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

async fn client(certs: &Path, port: u16) -> ReassignedNumbersClient<tonic::transport::Channel> {
    let read = |f: &str| std::fs::read_to_string(certs.join(f)).expect("read pem");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")))
        .identity(Identity::from_pem(read("platform-a.pem"), read("platform-a.key")))
        .domain_name("localhost");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let endpoint = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
            .expect("endpoint")
            .tls_config(tls.clone())
            .expect("tls");
        match endpoint.connect().await {
            Ok(channel) => return ReassignedNumbersClient::new(channel),
            Err(e) => {
                assert!(Instant::now() < deadline, "server did not come up: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test]
async fn sync_and_serve_on_a_cluster() {
    let cluster = RedisCluster::start();
    let nodes = cluster.urls().join(",");
    let dir = tempfile::tempdir().expect("tempdir");
    let (certs, register) = (dir.path().join("certs"), dir.path().join("register"));
    run(bin().args(["certs", "dev", "--out"]).arg(&certs));
    run(bin()
        .args(["generate", "--records", "20000", "--seed", "7", "--out"])
        .arg(&register));

    // Both targets at once are refused.
    let out = bin()
        .args(["sync", "--redis", &cluster.node_url(0), "--redis-cluster", &nodes])
        .arg(&register)
        .output()
        .expect("run");
    assert!(
        !out.status.success(),
        "--redis with --redis-cluster must be refused"
    );

    run(bin()
        .arg("sync")
        .arg(&register)
        .env("REASSIGNED_REDIS_CLUSTER", &nodes));
    // One seed node is enough.
    run(bin()
        .args(["sync", "--redis-cluster", &cluster.node_url(1)])
        .arg(&register));

    let port = free_port();
    let _server = Killed(
        bin()
            .args([
                "serve",
                "--no-tokens",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--redis-cluster",
                &nodes,
                "--redis-read-from-replicas",
            ])
            .arg("--tls-cert")
            .arg(certs.join("server.pem"))
            .arg("--tls-key")
            .arg(certs.join("server.key"))
            .arg("--client-ca")
            .arg(certs.join("ca.pem"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn serve"),
    );
    let mut client = client(&certs, port).await;
    let status = client
        .get_mirror_status(GetMirrorStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.sequence, 4, "snapshot 1 and deltas 2..4 applied");
    assert!(status.record_count >= 20_000);
}
