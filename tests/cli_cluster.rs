//! The binary against a Redis Cluster: `sync --redis-cluster` writes the
//! mirror, `serve --redis-cluster --redis-read-from-replicas` answers from
//! it, and `--redis` with `--redis-cluster` is refused.

mod support;

use std::path::Path;
use std::process::Stdio;

use reassigned::api::pb::GetMirrorStatusRequest;
use reassigned::api::pb::reassigned_numbers_client::ReassignedNumbersClient;
use support::bin::{Killed, bin, connect_as_platform_a, free_port, run};
use support::redis_cluster::RedisCluster;

async fn client(certs: &Path, port: u16) -> ReassignedNumbersClient<tonic::transport::Channel> {
    ReassignedNumbersClient::new(connect_as_platform_a(certs, port).await)
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
