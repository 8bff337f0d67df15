//! Delivery of the federation's events to the platforms that watch the
//! numbers: `WatchDisconnections` (isolation, cursors, retention, flow
//! control, two servers behind one Redis) and webhooks to a real local HTTP
//! receiver. Events are appended to the real event log in Redis (one
//! server with AOF, and a Redis Cluster): delivery reads the log whoever
//! wrote it. (Publication through `DisconnectionFeed`, on both stores, is
//! in `tests/federation_e2e.rs`.)

mod support;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use reassigned::api::pb::watchlist_client::WatchlistClient;
use reassigned::api::pb::{self, DisconnectionEventKind};
use reassigned::domain::{Date, PhoneNumber};
use reassigned::federation::deliver::{Cursor, Feed, Start, Tips};
use reassigned::federation::log::{AnyLog, Position, RedisLog};
use reassigned::federation::watch::{RedisWatchLists, WatchKey, WatchLists};
use reassigned::federation::{Event, EventKind, EventLog};
use reassigned::store::redis::RedisOptions;
use reassigned::store::{AnyStore, RedisStore};
use support::poll::eventually;
use support::redis::RedisServer;
use support::redis_cluster::RedisCluster;
use support::server::{TestChannel, TestServer};
use tonic::Code;
use tonic_types::StatusExt;

/// Redis settings that make an acknowledged append durable on Redis 7.0.
const AOF: [&str; 4] = ["--appendonly", "yes", "--appendfsync", "always"];

const X: &str = "+12015550100";
const Y: &str = "+8613800138000";
const Z: &str = "+12015550199";

/// A Redis (one server or a cluster) and the log in it.
struct Env {
    urls: Vec<String>,
    cluster: bool,
    log: RedisLog,
    _redis: Option<RedisServer>,
    _cluster: Option<RedisCluster>,
}

impl Env {
    async fn new(cluster: bool) -> Self {
        let (urls, redis, nodes) = if cluster {
            let nodes = RedisCluster::start_with(&AOF);
            (nodes.urls(), None, Some(nodes))
        } else {
            let redis = RedisServer::start_with(&AOF);
            (vec![redis.url()], Some(redis), None)
        };
        Self {
            log: RedisLog::open(&connect(&urls, cluster).await).await,
            urls,
            cluster,
            _redis: redis,
            _cluster: nodes,
        }
    }

    async fn store(&self) -> RedisStore {
        connect(&self.urls, self.cluster).await
    }

    /// A server on this Redis with watch lists on; `tweak` changes more.
    async fn server(&self, tweak: impl FnOnce(&mut reassigned::config::ServeSettings, &Path)) -> TestServer {
        let store = AnyStore::Redis(self.store().await);
        TestServer::start_in(store, move |s, dir| {
            let key = dir.join("watch.key");
            std::fs::write(&key, "a-watch-key-shared-by-the-servers!").expect("key");
            s.watch_key_file = Some(key);
            tweak(s, dir);
        })
        .await
    }

    async fn append(&self, events: &[Event]) {
        self.log.append(events).await.expect("append to the log");
    }
}

async fn connect(urls: &[String], cluster: bool) -> RedisStore {
    let opts = RedisOptions::default();
    if cluster {
        RedisStore::connect_cluster(urls, opts).await
    } else {
        RedisStore::connect(&urls[0], opts).await
    }
    .expect("connect")
}

fn event(id: &str, number: &str, kind: EventKind) -> Event {
    let disconnect_date = Date::parse("2026-11-02").expect("date");
    Event {
        event_id: id.to_owned(),
        number: PhoneNumber::parse(number).expect("number"),
        disconnect_date,
        earliest_reissue_date: disconnect_date.add_days(90),
        source: "operator-a".to_owned(),
        kind,
        accepted_unix_ms: 1_764_000_000_000,
    }
}

async fn watchlist(server: &TestServer, platform: &str) -> WatchlistClient<TestChannel> {
    WatchlistClient::new(server.channel(platform).await)
}

async fn watch(c: &mut WatchlistClient<TestChannel>, list: &[&str]) {
    c.add_watches(pb::AddWatchesRequest {
        phone_numbers: list.iter().map(|s| (*s).to_owned()).collect(),
    })
    .await
    .expect("AddWatches");
}

type Events = tonic::Streaming<pb::DisconnectionEvent>;

async fn open(c: &mut WatchlistClient<TestChannel>, cursor: &str) -> Result<Events, tonic::Status> {
    c.watch_disconnections(pb::WatchDisconnectionsRequest {
        cursor: cursor.to_owned(),
    })
    .await
    .map(tonic::Response::into_inner)
}

/// The next event of `stream` (fails after the polling deadline).
async fn next(stream: &mut Events) -> pb::DisconnectionEvent {
    support::poll::next_item(stream).await.expect("an event")
}

/// Nothing arrives on `stream` for a while (the time is what is tested:
/// an event for another platform would have arrived by then).
async fn nothing_within(stream: &mut Events, wait: Duration) {
    if let Ok(item) = tokio::time::timeout(wait, stream.next()).await {
        panic!("expected nothing, got {item:?}");
    }
}

async fn platforms_receive_only_their_own_numbers(cluster: bool) {
    let env = Env::new(cluster).await;
    let server = env.server(|_, _| {}).await;
    let mut a = watchlist(&server, "platform-a").await;
    let mut b = watchlist(&server, "platform-b").await;
    watch(&mut a, &[X]).await;
    watch(&mut b, &[Y]).await;
    let mut a_events = open(&mut a, "").await.expect("watch A");
    let mut b_events = open(&mut b, "").await.expect("watch B");

    env.append(&[
        event("e1", X, EventKind::Disconnected),
        event("e2", Z, EventKind::Disconnected),
    ])
    .await;
    env.append(&[event("e3", Y, EventKind::Disconnected)]).await;
    let got = next(&mut a_events).await;
    assert_eq!(
        (
            got.event_id.as_str(),
            got.phone_number.as_str(),
            got.source.as_str()
        ),
        ("e1", X, "operator-a")
    );
    assert_eq!(got.disconnect_date, "2026-11-02");
    assert_eq!(got.earliest_reissue_date, "2027-01-31");
    assert_eq!(got.kind, DisconnectionEventKind::Disconnected as i32);
    assert!(!got.cursor.is_empty());
    let got_b = next(&mut b_events).await;
    assert_eq!((got_b.event_id.as_str(), got_b.phone_number.as_str()), ("e3", Y));
    nothing_within(&mut a_events, Duration::from_millis(500)).await;

    // A retraction reaches the watcher, also when it resumes from a cursor
    // on another connection; what came before the cursor is not repeated.
    drop(a_events);
    env.append(&[event("e1", X, EventKind::Retracted)]).await;
    let mut resumed = open(&mut a, &got.cursor).await.expect("resume");
    let retracted = next(&mut resumed).await;
    assert_eq!(retracted.event_id, "e1");
    assert_eq!(retracted.kind, DisconnectionEventKind::Retracted as i32);
    nothing_within(&mut resumed, Duration::from_millis(300)).await;
    // From the first cursor again: the same, at least once.
    let mut again = open(&mut a, &got.cursor).await.expect("resume again");
    let repeated = next(&mut again).await;
    assert_eq!(
        (repeated.event_id, repeated.kind),
        (retracted.event_id, retracted.kind)
    );
    let at = |c: &str| {
        Cursor::decode(c, env.log.shards())
            .expect("cursor")
            .positions()
            .to_vec()
    };
    assert_eq!(at(&repeated.cursor), at(&retracted.cursor));
    // Closed first: an open watch stream holds the server's drain (10 s).
    drop((b_events, resumed, again));
    server.stop().await;
}

async fn bad_and_expired_cursors(cluster: bool) {
    let env = Env::new(cluster).await;
    let server = env.server(|_, _| {}).await;
    let mut a = watchlist(&server, "platform-a").await;
    watch(&mut a, &[X]).await;

    for bad in ["not a cursor!", "AQ", &"A".repeat(2000)] {
        let status = open(&mut a, bad).await.expect_err("malformed");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        let violations = status
            .get_details_bad_request()
            .expect("BadRequest")
            .field_violations;
        assert_eq!(violations[0].field, "cursor");
    }

    let mut stream = open(&mut a, "").await.expect("watch");
    env.append(&[event("old", X, EventKind::Disconnected)]).await;
    let old = next(&mut stream).await;
    drop(stream);
    // Retention drops everything so far; a newer event follows.
    let far_future = 4_000_000_000_000;
    env.log.trim(far_future).await.expect("trim");
    env.append(&[event("new", X, EventKind::Disconnected)]).await;
    // The same place, as a cursor handed out 31 days ago (retention: 30).
    let shards = env.log.shards();
    let decoded = Cursor::decode(&old.cursor, shards).expect("a cursor of ours");
    let month_ago = decoded.issued_ms() - 31 * 86_400_000;
    let expired = Cursor::new(month_ago, decoded.positions().to_vec()).encode();
    let status = open(&mut a, &expired).await.expect_err("expired");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    let oldest = status
        .message()
        .split('"')
        .nth(1)
        .expect("the message names the oldest cursor")
        .to_owned();
    let mut stream = open(&mut a, &oldest).await.expect("the oldest cursor works");
    assert_eq!(next(&mut stream).await.event_id, "new");
    drop(stream);
    server.stop().await;
}

async fn an_event_reaches_a_watcher_on_another_server(cluster: bool) {
    let env = Env::new(cluster).await;
    let one = env.server(|_, _| {}).await;
    let two = env.server(|_, _| {}).await;
    // Watched through server one, watching on server two.
    watch(&mut watchlist(&one, "platform-a").await, &[X]).await;
    let mut on_two = watchlist(&two, "platform-a").await;
    let count = on_two
        .count_watches(pb::CountWatchesRequest {})
        .await
        .expect("count")
        .into_inner()
        .count;
    assert_eq!(count, 1, "one list behind both servers");
    let mut stream = open(&mut on_two, "").await.expect("watch");
    env.append(&[event("e1", X, EventKind::Disconnected)]).await;
    assert_eq!(next(&mut stream).await.event_id, "e1");
    drop(stream);
    one.stop().await;
    two.stop().await;
}

/// A server that stops ends its open watch streams with UNAVAILABLE at
/// once (the watcher resumes with its cursor elsewhere) instead of holding
/// the stop for its whole drain (10 s) while they stay open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_server_ends_its_watch_streams_with_unavailable() {
    let env = Env::new(false).await;
    let server = env.server(|_, _| {}).await;
    let mut c = watchlist(&server, "platform-a").await;
    watch(&mut c, &[X]).await;
    let mut stream = open(&mut c, "").await.expect("watch");
    env.append(&[event("e1", X, EventKind::Disconnected)]).await;
    assert_eq!(next(&mut stream).await.event_id, "e1");
    // Well under the drain: the stop does not wait for the open stream.
    tokio::time::timeout(Duration::from_secs(5), server.stop())
        .await
        .expect("the server stopped without waiting out its drain");
    let end = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("the stream ended");
    let status = end.expect_err("ended with a status, not cleanly");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("shutting down"), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_platforms_receive_only_their_own_numbers() {
    platforms_receive_only_their_own_numbers(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_bad_and_expired_cursors() {
    bad_and_expired_cursors(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_an_event_reaches_a_watcher_on_another_server() {
    an_event_reaches_a_watcher_on_another_server(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_an_event_reaches_a_watcher_on_another_server() {
    an_event_reaches_a_watcher_on_another_server(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_never_reads_holds_a_bounded_backlog() {
    const EVENTS: usize = 12_000;
    let env = Env::new(false).await;
    let server = env.server(|s, _| s.tokens = Some(false)).await;
    watch(&mut watchlist(&server, "platform-a").await, &[X]).await;
    // A client with HTTP/2's smallest windows (64 KiB), so what the server
    // holds is not hidden in a large client window.
    let id = server.certs.client("platform-a");
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(
            server.certs.pki.ca_cert_pem(),
        ))
        .domain_name("localhost")
        .identity(tonic::transport::Identity::from_pem(&id.cert_pem, &id.key_pem));
    let channel =
        tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{}", server.addr.port()))
            .expect("endpoint")
            .tls_config(tls)
            .expect("tls")
            .initial_stream_window_size(65_535)
            .initial_connection_window_size(65_535)
            .connect()
            .await
            .expect("connect");
    let mut stream = WatchlistClient::new(channel)
        .watch_disconnections(pb::WatchDisconnectionsRequest {
            cursor: String::new(),
        })
        .await
        .expect("watch")
        .into_inner();
    let events: Vec<Event> = (0..EVENTS)
        .map(|i| event(&format!("e{i}"), X, EventKind::Disconnected))
        .collect();
    for chunk in events.chunks(2000) {
        env.append(chunk).await;
    }
    let sent = || {
        server
            .handles
            .delivery_stats
            .watch_events_sent
            .load(Ordering::Relaxed)
    };
    eventually("the server sent the first events", async || sent() > 0).await;
    // The client reads nothing for a while (this wait is what is tested):
    // the server must stop reading the log for it, not buffer everything.
    // What it may hold: the client's 64 KiB window, HTTP/2's send buffer
    // (400 KiB), the stream's channel (64) and one feed batch (256).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held = sent();
    assert!(
        held < (EVENTS / 3) as u64,
        "{held} of {EVENTS} events taken from the log for a watcher that reads nothing"
    );
    // Reading resumes delivery: every event arrives.
    let mut seen = std::collections::HashSet::new();
    while seen.len() < EVENTS {
        seen.insert(next(&mut stream).await.event_id);
    }
    // Closed first: an open watch stream holds the server's drain.
    drop(stream);
    server.stop().await;
}

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Received {
    signature: String,
    content_type: String,
    body: Vec<u8>,
}

/// A real HTTP receiver on an ephemeral port: answers 500 to the first
/// `fail_first` requests (all if `None`), then 200.
async fn receiver(fail_first: Option<usize>) -> (String, Arc<Mutex<Vec<Received>>>) {
    let got: Arc<Mutex<Vec<Received>>> = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/hooks/reassigned", listener.local_addr().expect("addr"));
    let store = got.clone();
    let app = axum::Router::new().route(
        "/hooks/reassigned",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
            let store = store.clone();
            async move {
                let header = |name: &str| {
                    headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned()
                };
                let mut all = store.lock().expect("lock");
                all.push(Received {
                    signature: header("x-reassigned-signature"),
                    content_type: header("content-type"),
                    body: body.to_vec(),
                });
                if fail_first.is_none_or(|n| all.len() <= n) {
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    axum::http::StatusCode::OK
                }
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, got)
}

/// Waits until `n` webhook senders saved their first cursor.
async fn senders_started(env: &Env, n: usize) {
    let mut conn = env.store().await.connection();
    eventually("the webhook senders started", async || {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("*:fed:wh:*:cursor")
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        keys.len() == n
    })
    .await;
}

const WEBHOOK_SECRET: &str = "the-webhook-secret-of-platform-a";

async fn webhook_server(env: &Env, platform: &str, url: String, attempts: u32) -> TestServer {
    let platform = reassigned::cli::certs::platform_uri(platform);
    env.server(move |s, dir| {
        let secret = dir.join("webhook.secret");
        std::fs::write(&secret, WEBHOOK_SECRET).expect("secret");
        let mut hooks = std::collections::BTreeMap::new();
        hooks.insert(
            platform,
            reassigned::config::WebhookSetting {
                url,
                secret_file: secret,
                max_attempts: Some(attempts),
                backoff_ms: Some(20),
            },
        );
        s.webhooks = Some(hooks);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_signed_cloudevents_retried_then_dead_lettered() {
    let env = Env::new(false).await;
    let (url, got) = receiver(Some(2)).await;
    let server = webhook_server(&env, "platform-a", url, 3).await;
    watch(&mut watchlist(&server, "platform-a").await, &[X]).await;
    let stats = server.handles.delivery_stats.clone();
    // The sender starts from the end of the log: wait until it saved its
    // cursor (its first lease), then publish.
    senders_started(&env, 1).await;
    env.append(&[
        event("e1", X, EventKind::Disconnected),
        event("e2", Z, EventKind::Disconnected),
    ])
    .await;
    eventually("delivered after two failures", async || {
        stats.webhook_delivered.load(Ordering::Relaxed) == 1
    })
    .await;
    assert_eq!(stats.webhook_retries.load(Ordering::Relaxed), 2);
    assert_eq!(stats.webhook_dead.load(Ordering::Relaxed), 0);
    let received = got.lock().expect("lock").clone();
    assert_eq!(
        received.len(),
        3,
        "three tries of one event (the unwatched one is not sent)"
    );
    let last = &received[2];
    assert_eq!(last.content_type, "application/cloudevents+json");
    let body: serde_json::Value = serde_json::from_slice(&last.body).expect("JSON");
    assert_eq!(body["specversion"], "1.0");
    assert_eq!(body["type"], "org.reassigned.disconnection.disconnected");
    assert_eq!(body["id"], "operator-a/e1/disconnected");
    assert_eq!(body["data"]["phone_number"], X);
    assert_eq!(body["data"]["earliest_reissue_date"], "2027-01-31");
    // The signature: HMAC-SHA-256 of "<t>.<body>" with the secret.
    let (t, v1) = last
        .signature
        .strip_prefix("t=")
        .and_then(|s| s.split_once(",v1="))
        .expect("t=..,v1=..");
    let key = reassigned::domain::hmac::HmacKey::new(WEBHOOK_SECRET.as_bytes());
    let mut message = format!("{t}.").into_bytes();
    message.extend_from_slice(&last.body);
    assert_eq!(v1, hex::encode(key.mac(&message)));
    server.stop().await;

    // A receiver that always fails (platform B's): the event is dead after
    // 3 attempts.
    let (url, got) = receiver(None).await;
    let server = webhook_server(&env, "platform-b", url, 3).await;
    watch(&mut watchlist(&server, "platform-b").await, &[X]).await;
    let stats = server.handles.delivery_stats.clone();
    senders_started(&env, 2).await;
    env.append(&[event("e3", X, EventKind::Disconnected)]).await;
    eventually("dead-lettered", async || {
        stats.webhook_dead.load(Ordering::Relaxed) == 1
    })
    .await;
    assert_eq!(got.lock().expect("lock").len(), 3);
    assert_eq!(stats.webhook_delivered.load(Ordering::Relaxed), 0);
    server.stop().await;
}

/// Takes from `feed` until `want` events came (the whole batch that reaches
/// it: more would show as a repeat); their ids and the cursor after the
/// last.
async fn take_from(feed: &mut Feed, want: usize, got: &mut Vec<String>) -> Option<Cursor> {
    let mut cursor = None;
    let until = got.len() + want;
    while got.len() < until {
        let batch = tokio::time::timeout(support::poll::DEADLINE, feed.next())
            .await
            .expect("the feed hands over the events in time")
            .expect("the log answers");
        for (event, after) in batch {
            got.push(event.event_id);
            cursor = Some(after);
        }
    }
    cursor
}

/// `got` is every watched event of `appended` ((shard, position, id) in
/// append order) from `first` on, in log order per shard, none twice.
fn every_one_once(
    appended: &[(u16, Position, String)],
    first: usize,
    got: &[String],
    shard_of: impl Fn(&str) -> u16,
) {
    let mut unique = std::collections::HashSet::new();
    let repeated: Vec<_> = got.iter().filter(|id| !unique.insert(id.as_str())).collect();
    assert!(repeated.is_empty(), "repeated: {repeated:?}");
    let want: Vec<_> = appended[first..]
        .iter()
        .filter(|(_, _, id)| watched(id))
        .collect();
    assert_eq!(got.len(), want.len(), "every watched event");
    for shard in 0..16 {
        let mut log_order: Vec<_> = want.iter().filter(|(s, _, _)| *s == shard).collect();
        log_order.sort_by_key(|(_, p, _)| *p);
        let log_order: Vec<&str> = log_order.iter().map(|(_, _, id)| id.as_str()).collect();
        let delivered: Vec<&str> = got
            .iter()
            .map(String::as_str)
            .filter(|id| shard_of(id) == shard)
            .collect();
        assert_eq!(delivered, log_order, "shard {shard}");
    }
}

/// Appends `chunk` to `log`, noting where each event went in `into`.
async fn append_noted(log: &AnyLog, chunk: &[Event], into: &mut Vec<(u16, Position, String)>) {
    let at = log.append(chunk).await.expect("append");
    into.extend(
        at.into_iter()
            .zip(chunk)
            .map(|((shard, p), e)| (shard, p, e.event_id.clone())),
    );
}

/// The window's events: `w<i>` for the number `+1201555<i>`, every third
/// one not watched.
fn window_event(i: usize) -> Event {
    event(
        &format!("w{i}"),
        &format!("+1201555{i:04}"),
        EventKind::Disconnected,
    )
}

fn watched(id: &str) -> bool {
    id.trim_start_matches('w')
        .parse::<usize>()
        .is_ok_and(|i| i % 3 != 0)
}

/// The recent window's edges on the Redis log (16 shards, a window of 4
/// events per shard): feeds that start behind where the followers started,
/// a feed that starts at the end while they may lag, appends racing the
/// feeds while every shard's window drops its oldest, and a restart (new
/// followers, the feed resuming from its cursor, behind them). Each feed
/// hands over every watched event, in log order per shard, none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feeds_around_a_small_recent_window_miss_and_repeat_nothing() {
    const BEFORE: usize = 300;
    const TOTAL: usize = 1500;
    let env = Env::new(false).await;
    let log = AnyLog::Redis(env.log.clone());
    let key = WatchKey::new(b"a-watch-key-of-the-window-test!!");
    let lists = WatchLists::Redis(Arc::new(RedisWatchLists::new(env.store().await, key)));
    let events: Vec<Event> = (0..TOTAL).map(window_event).collect();
    let numbers: Vec<_> = events
        .iter()
        .filter(|e| watched(&e.event_id))
        .map(|e| e.number)
        .collect();
    lists.add("platform-a", &numbers).await.expect("watch");
    let feed = async |tips: &Tips, start: Start| {
        Feed::open(
            log.clone(),
            lists.clone(),
            tips.clone(),
            "platform-a".to_owned(),
            start,
            Duration::from_secs(30 * 86_400),
        )
        .await
        .expect("open a feed")
    };
    let mut appended = Vec::new();
    for chunk in events[..BEFORE].chunks(50) {
        append_noted(&log, chunk, &mut appended).await;
    }
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let tips = Tips::start_with_capacity(log.clone(), stopped, 4);
    let mut oldest = feed(&tips, Start::Oldest).await;
    let mut now = feed(&tips, Start::Now).await;
    // Appends of 1 to 17 events racing the feeds.
    let racing = {
        let log = log.clone();
        let events = events[BEFORE..].to_vec();
        tokio::spawn(async move {
            let mut appended = Vec::new();
            let mut rest = events.as_slice();
            for n in (1..=17).cycle() {
                if rest.is_empty() {
                    break;
                }
                let (chunk, more) = rest.split_at(n.min(rest.len()));
                append_noted(&log, chunk, &mut appended).await;
                rest = more;
            }
            appended
        })
    };
    let shard_of = |id: &str| env.log.shard("operator-a", id);
    let watched_total = (0..TOTAL).filter(|i| i % 3 != 0).count();
    let watched_before = (0..BEFORE).filter(|i| i % 3 != 0).count();
    // Half of it, then a restart: the followers stop, new ones start at
    // the end of the log, and the feed resumes from its cursor.
    let mut from_oldest = Vec::new();
    let cursor = take_from(&mut oldest, watched_total / 2, &mut from_oldest)
        .await
        .expect("a cursor");
    drop(oldest);
    stop.send_replace(true);
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    let restarted = Tips::start_with_capacity(log.clone(), stopped, 4);
    let mut resumed = feed(&restarted, Start::After(cursor)).await;
    let rest = watched_total - from_oldest.len();
    take_from(&mut resumed, rest, &mut from_oldest).await;
    let mut from_now = Vec::new();
    take_from(&mut now, watched_total - watched_before, &mut from_now).await;
    appended.extend(racing.await.expect("the appends"));
    every_one_once(&appended, 0, &from_oldest, shard_of);
    every_one_once(&appended, BEFORE, &from_now, shard_of);
    // Nothing more: the next event is the next one appended.
    let last = event("last", X, EventKind::Disconnected);
    lists.add("platform-a", &[last.number]).await.expect("watch");
    env.append(&[last]).await;
    for watcher in [&mut resumed, &mut now] {
        let mut got = Vec::new();
        take_from(watcher, 1, &mut got).await;
        assert_eq!(got, ["last"]);
    }
}
