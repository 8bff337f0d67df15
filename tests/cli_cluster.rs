//! The binary against a Redis Cluster: `sync --redis-cluster` writes the
//! mirror, `serve --redis-cluster --redis-read-from-replicas` answers from
//! it, and `--redis` with `--redis-cluster` is refused.

mod support;

use support::bin::{bin, dev_certs, mirror_status, numbers_client, run, serve_dev};
use support::redis_cluster::RedisCluster;

#[tokio::test]
async fn sync_and_serve_on_a_cluster() {
    let cluster = RedisCluster::start();
    let nodes = cluster.urls().join(",");
    let dir = tempfile::tempdir().expect("tempdir");
    let (certs, register) = (dev_certs(dir.path()), dir.path().join("register"));
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

    let (_server, port) = serve_dev(
        dir.path(),
        &[
            "--redis-cluster".into(),
            nodes,
            "--redis-read-from-replicas".into(),
        ],
        &[],
    );
    let mut client = numbers_client(&certs, port).await;
    let status = mirror_status(&mut client).await;
    assert_eq!(status.sequence, 4, "snapshot 1 and deltas 2..4 applied");
    assert!(status.record_count >= 20_000);
}
