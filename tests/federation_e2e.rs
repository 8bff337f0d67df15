//! The federation end to end: an operator publishes through
//! `DisconnectionFeed`, CheckNumber answers REASSIGNED, the platform that
//! watches the number receives the event on `WatchDisconnections` and the
//! one that does not receives nothing; a retraction reaches the watcher
//! too. On the embedded store (journal in its data directory) and on a
//! Redis Cluster. Then the real `reassigned serve` binary killed (SIGKILL)
//! right after acknowledging publications: the watcher resuming from its
//! cursor receives every acknowledged event (embedded, and Redis with AOF).

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use reassigned::api::pb::disconnection_feed_client::DisconnectionFeedClient;
use reassigned::api::pb::publish_result::Outcome;
use reassigned::api::pb::reassigned_numbers_client::ReassignedNumbersClient;
use reassigned::api::pb::watchlist_client::WatchlistClient;
use reassigned::api::pb::{
    self, CheckNumberRequest, Disconnection, DisconnectionEventKind, PublishDisconnectionsRequest,
    ReassignmentStatus, RetractDisconnectionRequest,
};
use reassigned::domain::Date;
use reassigned::store::redis::RedisOptions;
use reassigned::store::{AnyStore, EmbeddedStore, RedisStore};
use support::bin::{Killed, connect_as, dev_certs, serve_dev};
use support::redis::RedisServer;
use support::redis_cluster::RedisCluster;
use support::server::TestServer;

/// Redis settings that make an acknowledged write durable on Redis 7.0.
const AOF: [&str; 4] = ["--appendonly", "yes", "--appendfsync", "always"];

/// Watched by platform A (under operator-a's prefix).
const WATCHED_BY_A: &str = "+12015550142";
/// Watched by platform B.
const WATCHED_BY_B: &str = "+12015550143";

const OPERATORS: &str =
    "[operators.\"spiffe://dev.reassigned/operator-a\"]\nprefixes = [\"+1201\"]\nquarantine_days = 60\n";

fn days_ago(n: i32) -> String {
    Date::today_utc().add_days(-n).to_string()
}

type Events = tonic::Streaming<pb::DisconnectionEvent>;

async fn next(stream: &mut Events) -> pb::DisconnectionEvent {
    support::poll::next_item(stream).await.expect("an event")
}

async fn publish_receive_retract(store: AnyStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().to_owned();
    let server = TestServer::start_in(store, move |s, own| {
        let operators = own.join("operators.toml");
        std::fs::write(&operators, OPERATORS).expect("operators");
        let key = own.join("watch.key");
        std::fs::write(&key, "the-watch-key-of-the-e2e-test").expect("key");
        s.operators = Some(operators);
        s.watch_key_file = Some(key);
        s.data_dir = Some(data);
    })
    .await;
    let mut a = WatchlistClient::new(server.channel("platform-a").await);
    let mut b = WatchlistClient::new(server.channel("platform-b").await);
    for (client, number) in [(&mut a, WATCHED_BY_A), (&mut b, WATCHED_BY_B)] {
        client
            .add_watches(pb::AddWatchesRequest {
                phone_numbers: vec![number.to_owned()],
            })
            .await
            .expect("AddWatches");
    }
    let open = async |c: &mut WatchlistClient<_>| -> Events {
        c.watch_disconnections(pb::WatchDisconnectionsRequest {
            cursor: String::new(),
        })
        .await
        .expect("watch")
        .into_inner()
    };
    let mut a_events = open(&mut a).await;
    let mut b_events = open(&mut b).await;

    let mut feed = DisconnectionFeedClient::new(server.channel("operator-a").await);
    let published = feed
        .publish_disconnections(PublishDisconnectionsRequest {
            items: vec![Disconnection {
                event_id: "op-a-1".into(),
                phone_number: WATCHED_BY_A.into(),
                disconnect_date: days_ago(1),
            }],
        })
        .await
        .expect("publish")
        .into_inner();
    assert_eq!(published.results[0].outcome, Some(Outcome::Accepted(true)));

    // CheckNumber flips at once...
    let mut check = ReassignedNumbersClient::new(server.channel("platform-a").await);
    let answer = check
        .check_number(CheckNumberRequest {
            phone_number: WATCHED_BY_A.into(),
            since: days_ago(2),
            want_receipt: false,
        })
        .await
        .expect("check")
        .into_inner();
    assert_eq!(answer.status, ReassignmentStatus::Reassigned as i32);
    // ... and the watcher hears of it, with the reissue date.
    let event = next(&mut a_events).await;
    assert_eq!(event.event_id, "op-a-1");
    assert_eq!(event.phone_number, WATCHED_BY_A);
    assert_eq!(event.disconnect_date, days_ago(1));
    assert_eq!(
        event.earliest_reissue_date,
        Date::today_utc().add_days(59).to_string(),
        "disconnect + operator-a's 60 days"
    );
    assert_eq!(event.source, "spiffe://dev.reassigned/operator-a");
    assert_eq!(event.kind, DisconnectionEventKind::Disconnected as i32);

    feed.retract_disconnection(RetractDisconnectionRequest {
        event_id: "op-a-1".into(),
        reason: "published for the wrong line".into(),
    })
    .await
    .expect("retract");
    let retracted = next(&mut a_events).await;
    assert_eq!(
        (retracted.event_id.as_str(), retracted.kind),
        ("op-a-1", DisconnectionEventKind::Retracted as i32)
    );
    // Platform B, which does not watch the number, received nothing (the
    // wait is what is tested: A's events arrived well within it).
    if let Ok(item) = tokio::time::timeout(Duration::from_millis(500), b_events.next()).await {
        panic!("platform B received {item:?}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_publish_reaches_the_watching_platform_only() {
    publish_receive_retract(AnyStore::Embedded(Arc::new(EmbeddedStore::new()))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_publish_reaches_the_watching_platform_only() {
    let cluster = RedisCluster::start_with(&AOF);
    let store = RedisStore::connect_cluster(&cluster.urls(), RedisOptions::default())
        .await
        .expect("connect");
    publish_receive_retract(AnyStore::Redis(store)).await;
}

/// Starts `serve` (mTLS only) on a free port with `store_args`, operators
/// and watch lists on.
fn serve(dir: &Path, store_args: &[String]) -> (Killed, u16) {
    let (operators, key) = (dir.join("operators.toml"), dir.join("watch.key"));
    serve_dev(
        dir,
        store_args,
        &[
            "--operators".as_ref(),
            operators.as_os_str(),
            "--watch-key-file".as_ref(),
            key.as_os_str(),
        ],
    )
}

async fn publish(certs: &Path, port: u16, ids: std::ops::Range<u32>) {
    let items = ids
        .map(|i| Disconnection {
            event_id: format!("k-{i}"),
            phone_number: format!("+1201559{i:04}"),
            disconnect_date: days_ago(1),
        })
        .collect();
    let results = DisconnectionFeedClient::new(connect_as(certs, "operator-a", port).await)
        .publish_disconnections(PublishDisconnectionsRequest { items })
        .await
        .expect("publish")
        .into_inner()
        .results;
    assert!(
        results.iter().all(|r| r.outcome == Some(Outcome::Accepted(true))),
        "{results:?}"
    );
}

async fn watcher_resumes_after_sigkill(store_args: Vec<String>, dir: &Path) {
    const EVENTS: u32 = 40;
    let certs = dev_certs(dir);
    std::fs::write(dir.join("operators.toml"), OPERATORS).expect("operators");
    std::fs::write(dir.join("watch.key"), "the-watch-key-of-the-crash-test").expect("key");
    let (server, port) = serve(dir, &store_args);
    let mut watchlist = WatchlistClient::new(connect_as(&certs, "platform-a", port).await);
    watchlist
        .add_watches(pb::AddWatchesRequest {
            phone_numbers: (0..EVENTS).map(|i| format!("+1201559{i:04}")).collect(),
        })
        .await
        .expect("AddWatches");
    let mut stream = watchlist
        .watch_disconnections(pb::WatchDisconnectionsRequest {
            cursor: String::new(),
        })
        .await
        .expect("watch")
        .into_inner();
    publish(&certs, port, 0..1).await;
    let first = next(&mut stream).await;
    assert_eq!(first.event_id, "k-0");
    drop(stream);
    // Acknowledged, then the server dies before it could deliver them.
    publish(&certs, port, 1..EVENTS).await;
    server.signal("KILL");
    drop(server);

    let (_server, port) = serve(dir, &store_args);
    let mut watchlist = WatchlistClient::new(connect_as(&certs, "platform-a", port).await);
    let mut stream = watchlist
        .watch_disconnections(pb::WatchDisconnectionsRequest {
            cursor: first.cursor.clone(),
        })
        .await
        .expect("resume after the crash")
        .into_inner();
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < (EVENTS - 1) as usize {
        let event = next(&mut stream).await;
        assert_ne!(event.event_id, "k-0", "nothing before the cursor again");
        seen.insert(event.event_id);
    }
    let expected: std::collections::BTreeSet<String> = (1..EVENTS).map(|i| format!("k-{i}")).collect();
    assert_eq!(seen, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_watcher_resumes_after_a_server_sigkill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("register");
    std::fs::create_dir(&data).expect("data dir");
    watcher_resumes_after_sigkill(vec!["--data-dir".into(), data.display().to_string()], dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_watcher_resumes_after_a_server_sigkill() {
    let redis = RedisServer::start_with(&AOF);
    let dir = tempfile::tempdir().expect("tempdir");
    watcher_resumes_after_sigkill(vec!["--redis".into(), redis.url()], dir.path()).await;
}
