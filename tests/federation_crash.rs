//! An acknowledged publication survives a SIGKILL of the real server
//! process (the `reassigned serve` binary), on the embedded store (its
//! journal) and on Redis with AOF: after a restart the number still answers
//! REASSIGNED and publishing again answers DUPLICATE.

mod support;

use std::path::Path;

use reassigned::api::pb::disconnection_feed_client::DisconnectionFeedClient;
use reassigned::api::pb::publish_result::Outcome;
use reassigned::api::pb::reassigned_numbers_client::ReassignedNumbersClient;
use reassigned::api::pb::{
    CheckNumberRequest, Disconnection, PublishDisconnectionsRequest, ReassignmentStatus,
};
use reassigned::domain::Date;
use support::bin::{Killed, connect_as, dev_certs, serve_dev};
use support::redis::RedisServer;

/// Starts `serve` (mTLS only) on a free port with `store_args`.
fn serve(dir: &Path, store_args: &[String]) -> (Killed, u16) {
    let operators = dir.join("operators.toml");
    serve_dev(dir, store_args, &["--operators".as_ref(), operators.as_os_str()])
}

fn items() -> Vec<Disconnection> {
    let date = Date::today_utc().add_days(-1).to_string();
    (0..50)
        .map(|i| Disconnection {
            event_id: format!("k-{i}"),
            phone_number: format!("+1201558{i:04}"),
            disconnect_date: date.clone(),
        })
        .collect()
}

async fn outcomes(certs: &Path, port: u16) -> Vec<Option<Outcome>> {
    DisconnectionFeedClient::new(connect_as(certs, "operator-a", port).await)
        .publish_disconnections(PublishDisconnectionsRequest { items: items() })
        .await
        .expect("publish")
        .into_inner()
        .results
        .into_iter()
        .map(|r| r.outcome)
        .collect()
}

async fn survives_sigkill(store_args: Vec<String>, dir: &Path) {
    let certs = dev_certs(dir);
    std::fs::write(
        dir.join("operators.toml"),
        "[operators.\"spiffe://dev.reassigned/operator-a\"]\nprefixes = [\"+1\"]\n",
    )
    .expect("operators");
    let (server, port) = serve(dir, &store_args);
    let first = outcomes(&certs, port).await;
    assert!(
        first.iter().all(|o| *o == Some(Outcome::Accepted(true))),
        "{first:?}"
    );
    // Acknowledged: now kill the server without any chance to flush.
    server.signal("KILL");
    drop(server);

    let (_server, port) = serve(dir, &store_args);
    let again = outcomes(&certs, port).await;
    assert!(
        again.iter().all(|o| *o == Some(Outcome::Duplicate(true))),
        "{again:?}"
    );
    let mut client = ReassignedNumbersClient::new(connect_as(&certs, "platform-a", port).await);
    let since = Date::today_utc().add_days(-2).to_string();
    for i in [0, 17, 49] {
        let answer = client
            .check_number(CheckNumberRequest {
                phone_number: format!("+1201558{i:04}"),
                since: since.clone(),
                want_receipt: false,
            })
            .await
            .expect("check")
            .into_inner();
        assert_eq!(
            answer.status,
            ReassignmentStatus::Reassigned as i32,
            "+1201558{i:04}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_publication_survives_sigkill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("register");
    std::fs::create_dir(&data).expect("data dir");
    survives_sigkill(vec!["--data-dir".into(), data.display().to_string()], dir.path()).await;
    assert!(data.join("federation.journal").is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_publication_survives_server_sigkill() {
    let redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let dir = tempfile::tempdir().expect("tempdir");
    survives_sigkill(vec!["--redis".into(), redis.url()], dir.path()).await;
}
