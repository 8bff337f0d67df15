//! The federation's write side through the real server (mTLS, tokens):
//! operators publish and retract over `DisconnectionFeed`, CheckNumber sees
//! it, GetMirrorStatus lists the sources; on the embedded store (journal in
//! its data directory), one `redis-server` (AOF) and a Redis Cluster (AOF).
//! Also: out-of-authority and bad items refused per item, bad requests with
//! field violations, two servers behind one Redis, and a restart that
//! rebuilds the overlay from durable state.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use reassigned::api::pb::disconnection_feed_client::DisconnectionFeedClient;
use reassigned::api::pb::publish_result::Outcome;
use reassigned::api::pb::{
    CheckNumberRequest, Disconnection, PublishDisconnectionsRequest, ReassignmentStatus,
    RetractDisconnectionRequest, SourceKind,
};
use reassigned::domain::Date;
use reassigned::store::redis::RedisOptions;
use reassigned::store::{AnyStore, EmbeddedStore, Records, RedisStore, Store};
use support::per_store_tests;
use support::poll::eventually;
use support::redis::RedisServer;
use support::redis_cluster::RedisCluster;
use support::server::{TestChannel, TestServer};
use support::writes::snap;
use tonic_types::StatusExt;

/// Redis settings that make an acknowledged write durable on Redis 7.0.
const AOF: [&str; 4] = ["--appendonly", "yes", "--appendfsync", "always"];

/// The number the register knows (disconnected 100 days ago), under
/// operator-a's prefix.
const KNOWN: &str = "+12015550100";

#[derive(Clone, Copy, Debug)]
enum Kind {
    Embedded,
    Redis,
    Cluster,
}

/// Where the mirror lives, and how to open another store onto it (another
/// server replica, or the same one after a restart).
struct Env {
    kind: Kind,
    redis: Option<RedisServer>,
    cluster: Option<RedisCluster>,
    embedded: Option<AnyStore>,
    dir: tempfile::TempDir,
}

impl Env {
    async fn new(kind: Kind) -> Self {
        let mut env = Self {
            kind,
            redis: None,
            cluster: None,
            embedded: None,
            dir: tempfile::tempdir().expect("tempdir"),
        };
        match kind {
            Kind::Embedded => env.embedded = Some(AnyStore::Embedded(Arc::new(EmbeddedStore::new()))),
            Kind::Redis => env.redis = Some(RedisServer::start_with(&AOF)),
            Kind::Cluster => env.cluster = Some(RedisCluster::start_with(&AOF)),
        }
        let store = env.store().await;
        let today = Date::today_utc().days();
        let known = Records::from_unsorted([(12_015_550_100u64, u16::try_from(today - 100).expect("days"))])
            .expect("records");
        store
            .apply_snapshot(&snap(1, today - 1), &known, None)
            .await
            .expect("snapshot");
        env
    }

    async fn store(&self) -> AnyStore {
        match self.kind {
            Kind::Embedded => self.embedded.clone().expect("embedded"),
            Kind::Redis => AnyStore::Redis(
                RedisStore::connect(
                    &self.redis.as_ref().expect("redis").url(),
                    RedisOptions::default(),
                )
                .await
                .expect("connect"),
            ),
            Kind::Cluster => AnyStore::Redis(
                RedisStore::connect_cluster(
                    &self.cluster.as_ref().expect("cluster").urls(),
                    RedisOptions::default(),
                )
                .await
                .expect("connect"),
            ),
        }
    }

    /// A server over a new store handle, with operator-a authoritative for
    /// `+1201` (quarantine 60 days); the embedded journal in this env's
    /// directory.
    async fn serve(&self) -> TestServer {
        let operators = operators_file(
            self.dir.path(),
            "[operators.\"spiffe://dev.reassigned/operator-a\"]\nprefixes = [\"+1201\"]\nquarantine_days = 60\n",
        );
        let data = self.dir.path().to_owned();
        TestServer::start(self.store().await, move |s| {
            s.operators = Some(operators);
            s.data_dir = Some(data);
        })
        .await
    }
}

fn operators_file(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("operators.toml");
    std::fs::write(&path, text).expect("write operators");
    path
}

fn days_ago(n: i32) -> String {
    Date::today_utc().add_days(-n).to_string()
}

fn item(id: &str, number: &str, date: &str) -> Disconnection {
    Disconnection {
        event_id: id.into(),
        phone_number: number.into(),
        disconnect_date: date.into(),
    }
}

async fn feed(server: &TestServer, who: &str) -> DisconnectionFeedClient<TestChannel> {
    DisconnectionFeedClient::new(server.channel(who).await)
}

async fn status_of(server: &TestServer, number: &str, since: &str) -> ReassignmentStatus {
    let answer = server
        .client()
        .await
        .check_number(CheckNumberRequest {
            phone_number: number.into(),
            since: since.into(),
            want_receipt: false,
        })
        .await
        .expect("check")
        .into_inner();
    ReassignmentStatus::try_from(answer.status).expect("status")
}

fn code(outcome: &Option<Outcome>) -> String {
    match outcome {
        Some(Outcome::Accepted(true)) => "accepted".into(),
        Some(Outcome::Duplicate(true)) => "duplicate".into(),
        Some(Outcome::Error(e)) => e.code.clone(),
        other => format!("{other:?}"),
    }
}

async fn publish_check_and_retract(kind: Kind) {
    let env = Env::new(kind).await;
    let server = env.serve().await;
    let since = days_ago(12);
    assert_eq!(
        status_of(&server, KNOWN, &since).await,
        ReassignmentStatus::NotReassigned
    );

    let mut op = feed(&server, "operator-a").await;
    let results = op
        .publish_disconnections(PublishDisconnectionsRequest {
            items: vec![
                item("e-1", KNOWN, &days_ago(10)),
                item("e-2", "+12025550100", &days_ago(10)),
                item("e-3", "+1201-555-0103", &days_ago(10)),
                item("e 4", "+12015550104", "2026-02-30"),
                item("e-1", KNOWN, &days_ago(9)),
                item("e-1", KNOWN, &days_ago(10)),
                item("e-5", "+12015550105", &Date::today_utc().add_days(1).to_string()),
            ],
        })
        .await
        .expect("publish")
        .into_inner()
        .results;
    let codes: Vec<String> = results.iter().map(|r| code(&r.outcome)).collect();
    assert_eq!(
        codes,
        [
            "accepted",
            "PERMISSION_DENIED",
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
            "ALREADY_EXISTS",
            "duplicate",
            "INVALID_ARGUMENT"
        ]
    );
    let ids: Vec<&str> = results.iter().map(|r| r.event_id.as_str()).collect();
    assert_eq!(ids, ["e-1", "e-2", "e-3", "e 4", "e-1", "e-1", "e-5"]);
    let message = |i: usize| match &results[i].outcome {
        Some(Outcome::Error(e)) => e.message.clone(),
        _ => String::new(),
    };
    assert!(
        message(1).contains("items[1].phone_number") && message(1).contains("operator-a"),
        "{}",
        message(1)
    );
    assert!(message(2).contains("items[2].phone_number"), "{}", message(2));
    assert!(
        message(3).contains("items[3].event_id") && message(3).contains("items[3].disconnect_date"),
        "{}",
        message(3)
    );
    assert!(message(6).contains("items[6].disconnect_date"), "{}", message(6));

    // The publication wins over the register's older date...
    assert_eq!(
        status_of(&server, KNOWN, &since).await,
        ReassignmentStatus::Reassigned
    );
    assert_eq!(
        status_of(&server, KNOWN, &days_ago(5)).await,
        ReassignmentStatus::NotReassigned
    );
    // ... and GetMirrorStatus lists both sources.
    let status = server.mirror_status().await;
    let names: Vec<(&str, i32)> = status.sources.iter().map(|s| (s.name.as_str(), s.kind)).collect();
    assert_eq!(
        names,
        [
            ("register", SourceKind::Register as i32),
            ("spiffe://dev.reassigned/operator-a", SourceKind::Operator as i32)
        ]
    );
    let operator = &status.sources[1];
    assert_eq!(
        (
            operator.prefixes.clone(),
            operator.record_count,
            operator.quarantine_days
        ),
        (vec!["+1201".to_owned()], 1, 60)
    );
    assert!(operator.last_event_time.is_some());
    assert_eq!(status.sources[0].record_count, 1);

    // Retraction: the answer falls back to the register; twice is a no-op.
    let retract = |id: &str, reason: &str| RetractDisconnectionRequest {
        event_id: id.into(),
        reason: reason.into(),
    };
    let r = op
        .retract_disconnection(retract("e-1", "wrong number keyed"))
        .await
        .expect("retract")
        .into_inner();
    assert_eq!((r.phone_number.as_str(), r.retracted), (KNOWN, true));
    assert_eq!(
        status_of(&server, KNOWN, &since).await,
        ReassignmentStatus::NotReassigned
    );
    assert_eq!(
        status_of(&server, KNOWN, &days_ago(100)).await,
        ReassignmentStatus::Reassigned
    );
    let r = op
        .retract_disconnection(retract("e-1", "again"))
        .await
        .expect("retract again")
        .into_inner();
    assert!(!r.retracted);
    let missing = op
        .retract_disconnection(retract("e-9", "never published"))
        .await
        .expect_err("not found");
    assert_eq!(missing.code(), tonic::Code::NotFound);

    // Another operator cannot retract operator-a's event; a platform that
    // is no operator cannot publish at all.
    let stranger = op_err(&server, "platform-a").await;
    assert_eq!(stranger.code(), tonic::Code::PermissionDenied, "{stranger:?}");
    let mut b = feed(&server, "operator-b").await;
    let other = b
        .retract_disconnection(retract("e-1", "not mine"))
        .await
        .expect_err("not found");
    assert_eq!(other.code(), tonic::Code::NotFound);
    server.stop().await;
}

async fn op_err(server: &TestServer, who: &str) -> tonic::Status {
    feed(server, who)
        .await
        .publish_disconnections(PublishDisconnectionsRequest {
            items: vec![item("x-1", KNOWN, &days_ago(1))],
        })
        .await
        .expect_err("refused")
}

async fn restart_rebuilds_from_durable_state(kind: Kind) {
    let env = Env::new(kind).await;
    let server = env.serve().await;
    let mut op = feed(&server, "operator-a").await;
    let items = vec![
        item("r-1", "+12015550201", &days_ago(3)),
        item("r-2", "+12015550202", &days_ago(3)),
    ];
    let results = op
        .publish_disconnections(PublishDisconnectionsRequest { items: items.clone() })
        .await
        .expect("publish")
        .into_inner()
        .results;
    assert!(results.iter().all(|r| code(&r.outcome) == "accepted"));
    op.retract_disconnection(RetractDisconnectionRequest {
        event_id: "r-2".into(),
        reason: "mistake".into(),
    })
    .await
    .expect("retract");
    server.stop().await;

    // A new server (new process state: an empty overlay) over the same data.
    let server = env.serve().await;
    eventually("the overlay is rebuilt", async || {
        status_of(&server, "+12015550201", &days_ago(4)).await == ReassignmentStatus::Reassigned
    })
    .await;
    assert_eq!(
        status_of(&server, "+12015550202", &days_ago(4)).await,
        ReassignmentStatus::NotReassigned
    );
    let again = feed(&server, "operator-a")
        .await
        .publish_disconnections(PublishDisconnectionsRequest { items })
        .await
        .expect("publish again")
        .into_inner()
        .results;
    assert!(again.iter().all(|r| code(&r.outcome) == "duplicate"));
    server.stop().await;
}

async fn two_servers_behind_one_redis(kind: Kind) {
    let env = Env::new(kind).await;
    let one = env.serve().await;
    let two = env.serve().await;
    let since = days_ago(12);
    assert_eq!(
        status_of(&two, KNOWN, &since).await,
        ReassignmentStatus::NotReassigned
    );
    let results = feed(&one, "operator-a")
        .await
        .publish_disconnections(PublishDisconnectionsRequest {
            items: vec![item("t-1", KNOWN, &days_ago(10))],
        })
        .await
        .expect("publish")
        .into_inner()
        .results;
    assert_eq!(code(&results[0].outcome), "accepted");
    eventually("the other server answers REASSIGNED", async || {
        status_of(&two, KNOWN, &since).await == ReassignmentStatus::Reassigned
    })
    .await;
    feed(&two, "operator-a")
        .await
        .retract_disconnection(RetractDisconnectionRequest {
            event_id: "t-1".into(),
            reason: "mistake".into(),
        })
        .await
        .expect("retract on the other server");
    eventually("the first server falls back", async || {
        status_of(&one, KNOWN, &since).await == ReassignmentStatus::NotReassigned
    })
    .await;
    one.stop().await;
    two.stop().await;
}

per_store_tests!(
    embedded => super::Kind::Embedded,
    redis => super::Kind::Redis,
    cluster => super::Kind::Cluster;
    publish_check_and_retract,
    restart_rebuilds_from_durable_state,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_behind_one_redis_server() {
    two_servers_behind_one_redis(Kind::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_behind_one_redis_cluster() {
    two_servers_behind_one_redis(Kind::Cluster).await;
}

fn violations(status: &tonic::Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_field_violations() {
    let env = Env::new(Kind::Embedded).await;
    let server = env.serve().await;
    let mut op = feed(&server, "operator-a").await;
    let empty = op
        .publish_disconnections(PublishDisconnectionsRequest { items: vec![] })
        .await
        .expect_err("empty");
    assert_eq!(
        (empty.code(), violations(&empty)),
        (tonic::Code::InvalidArgument, vec!["items".to_owned()])
    );
    let too_many = op
        .publish_disconnections(PublishDisconnectionsRequest {
            items: (0..10_001)
                .map(|i| item(&format!("m-{i}"), KNOWN, &days_ago(1)))
                .collect(),
        })
        .await
        .expect_err("too many");
    assert_eq!(violations(&too_many), ["items"]);
    // 10,000 items is the limit, and fits the message size.
    let full = op
        .publish_disconnections(PublishDisconnectionsRequest {
            items: (0..10_000)
                .map(|i| item(&format!("m-{i}"), &format!("+1201556{i:04}"), &days_ago(1)))
                .collect(),
        })
        .await
        .expect("10,000 items")
        .into_inner()
        .results;
    assert_eq!(full.len(), 10_000);
    assert!(full.iter().all(|r| code(&r.outcome) == "accepted"));

    let bad = op
        .retract_disconnection(RetractDisconnectionRequest {
            event_id: "no spaces".into(),
            reason: " ".into(),
        })
        .await
        .expect_err("bad retraction");
    assert_eq!(
        (bad.code(), violations(&bad)),
        (
            tonic::Code::InvalidArgument,
            vec!["event_id".to_owned(), "reason".to_owned()]
        )
    );
    let long = op
        .retract_disconnection(RetractDisconnectionRequest {
            event_id: "x".repeat(129),
            reason: "r".repeat(501),
        })
        .await
        .expect_err("too long");
    assert_eq!(violations(&long), ["event_id", "reason"]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_file_reloads_without_restart() {
    let env = Env::new(Kind::Embedded).await;
    let server = env.serve().await;
    assert_eq!(
        op_err(&server, "operator-b").await.code(),
        tonic::Code::PermissionDenied
    );
    operators_file(
        env.dir.path(),
        "[operators.\"spiffe://dev.reassigned/operator-a\"]\nprefixes = [\"+1201\"]\n[operators.\"spiffe://dev.reassigned/operator-b\"]\nprefixes = [\"+1\"]\n",
    );
    eventually("operator-b may publish", async || {
        feed(&server, "operator-b")
            .await
            .publish_disconnections(PublishDisconnectionsRequest {
                items: vec![item("b-1", "+12125550100", &days_ago(1))],
            })
            .await
            .is_ok_and(|r| code(&r.into_inner().results[0].outcome) == "accepted")
    })
    .await;
    // A broken file keeps the operators in force.
    operators_file(
        env.dir.path(),
        "[operators.\"spiffe://dev.reassigned/operator-b\"]\nprefixes = []\n",
    );
    server
        .handles
        .reload
        .reload()
        .await
        .expect("tls reload still works");
    let results = feed(&server, "operator-b")
        .await
        .publish_disconnections(PublishDisconnectionsRequest {
            items: vec![item("b-2", "+12125550101", &days_ago(1))],
        })
        .await
        .expect("still an operator")
        .into_inner()
        .results;
    assert_eq!(code(&results[0].outcome), "accepted");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_cli_sends_batches_and_fails_on_refusals() {
    let env = Env::new(Kind::Embedded).await;
    let server = env.serve().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let operator = server.client_files("operator-a", dir.path());
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path
    };
    let token = server
        .tokens
        .as_ref()
        .expect("tokens")
        .mint(&operator.identity, "register:write");
    let mut csv = String::from("event_id,phone_number,disconnect_date\n");
    for i in 0..25 {
        csv.push_str(&format!("c-{i},+1201557{i:04},{}\n", days_ago(2)));
    }
    let good = write("good.csv", &csv);
    let publish = |file: &Path| {
        let mut cmd = support::bin::bin();
        cmd.args(["publish", "--batch-size", "10", "--target"])
            .arg(server.addr.to_string())
            .args(operator.args())
            .arg("--file")
            .arg(file)
            .env("REASSIGNED_TOKEN", &token);
        cmd
    };
    let out = tokio::task::spawn_blocking({
        let mut cmd = publish(&good);
        move || support::bin::run(&mut cmd)
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("accepted 25, duplicate 0, refused 0"), "{stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("published 25 items"));
    assert_eq!(
        status_of(&server, "+12015570007", &days_ago(3)).await,
        ReassignmentStatus::Reassigned
    );

    // Again, plus an out-of-authority line and a broken one: non-zero exit,
    // each refusal listed with its line.
    csv.push_str(&format!("c-x,+12125550100,{}\nbroken line\n", days_ago(2)));
    let mixed = write("mixed.csv", &csv);
    let out = tokio::task::spawn_blocking({
        let mut cmd = publish(&mixed);
        move || cmd.output().expect("run")
    })
    .await
    .expect("join");
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("accepted 0, duplicate 25, refused 2"), "{stdout}");
    assert!(
        stdout.contains("line 27: event \"c-x\": PERMISSION_DENIED"),
        "{stdout}"
    );
    assert!(
        stdout.contains("line 28: event \"broken line\": INVALID_ARGUMENT"),
        "{stdout}"
    );
    server.stop().await;
}
