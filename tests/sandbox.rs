//! The sandbox numbers (README "Sandbox numbers"): a data set written by the
//! real binary's `generate --sandbox`, imported into the embedded store and
//! into a `redis-server` this test starts, served over mTLS with tokens;
//! every listed number gives its documented answer, in a single check and in
//! a batch. Also the mirror-wide reasons (stale, empty) and the README's
//! table against the code's, and the interop test's judge (examples/interop_check.py).

mod support;

use std::path::Path;
use std::sync::Arc;

use reassigned::api::pb::{BatchCheckNumbersRequest, CheckNumberRequest, batch_check_result};
use reassigned::cli::generate::{SANDBOX, SANDBOX_DISCONNECT, proto_names};
use reassigned::domain::{Date, NoDataReason, Status};
use reassigned::import::{self, NoProgress};
use reassigned::store::redis::RedisOptions;
use reassigned::store::{AnyStore, EmbeddedStore, RedisStore};
use support::bin::{bin, run};
use support::redis::RedisServer;
use support::server::TestServer;

/// `reassigned generate --sandbox --out DIR` (and `extra` flags).
fn generate_sandbox(dir: &Path, extra: &[&str]) {
    run(bin()
        .args(["generate", "--sandbox", "--out"])
        .arg(dir)
        .args(extra));
}

/// Asks every sandbox number, one by one and in one batch, and returns the
/// answers as proto names `(status, no_data_reason)`.
async fn ask_all(server: &TestServer) -> Vec<(String, String)> {
    let mut client = server.client().await;
    let mut single = Vec::new();
    for sb in SANDBOX {
        let answer = client
            .check_number(CheckNumberRequest {
                phone_number: sb.number.into(),
                since: sb.since.into(),
                want_receipt: false,
            })
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", sb.number))
            .into_inner();
        assert_eq!(answer.phone_number, sb.number);
        single.push((
            answer.status().as_str_name().to_owned(),
            answer.no_data_reason().as_str_name().to_owned(),
        ));
    }
    let batch = client
        .batch_check_numbers(BatchCheckNumbersRequest {
            checks: SANDBOX
                .iter()
                .map(|sb| CheckNumberRequest {
                    phone_number: sb.number.into(),
                    since: sb.since.into(),
                    want_receipt: false,
                })
                .collect(),
            want_receipts: false,
        })
        .await
        .expect("batch")
        .into_inner();
    let batched: Vec<(String, String)> = batch
        .results
        .into_iter()
        .map(|r| match r.result {
            Some(batch_check_result::Result::Answer(a)) => (
                a.status().as_str_name().to_owned(),
                a.no_data_reason().as_str_name().to_owned(),
            ),
            other => panic!("no answer: {other:?}"),
        })
        .collect();
    assert_eq!(single, batched, "a batch answers as single checks do");
    single
}

/// The documented answers, as proto names, with `f` applied to each status.
fn expected(f: impl Fn(Status) -> Status) -> Vec<(String, String)> {
    SANDBOX
        .iter()
        .map(|sb| {
            let (s, r) = proto_names(f(sb.status));
            (s.to_owned(), r.to_owned())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_numbers_give_their_documented_answers_on_both_stores() {
    let files = tempfile::tempdir().expect("tempdir");
    generate_sandbox(files.path(), &[]);

    // sandbox.csv says the same as the table in the code
    let csv = std::fs::read_to_string(files.path().join("sandbox.csv")).expect("sandbox.csv");
    let rows: Vec<Vec<&str>> = csv.lines().skip(1).map(|l| l.split(',').collect()).collect();
    let want = expected(|s| s);
    assert_eq!(rows.len(), SANDBOX.len());
    for ((row, sb), (status, reason)) in rows.iter().zip(SANDBOX).zip(&want) {
        assert_eq!(row, &[sb.number, sb.since, status, reason]);
    }
    // every answer a single number can give is there
    for status in [
        Status::Reassigned,
        Status::NotReassigned,
        Status::NoData(NoDataReason::NumberNotCovered),
        Status::NoData(NoDataReason::BeforeCoverage),
    ] {
        assert!(SANDBOX.iter().any(|sb| sb.status == status), "{status:?}");
    }

    let redis = RedisServer::start();
    let stores = [
        ("embedded", AnyStore::Embedded(Arc::new(EmbeddedStore::new()))),
        (
            "redis",
            AnyStore::Redis(
                RedisStore::connect(&redis.url(), RedisOptions::default())
                    .await
                    .expect("connect to redis"),
            ),
        ),
    ];
    for (name, store) in stores {
        let sync = import::sync_dir(&store, files.path(), &mut NoProgress)
            .await
            .expect("import the sandbox set");
        assert_eq!(sync.sequence, Some(1), "{name}");
        let server = TestServer::start(store, |_| {}).await;
        assert_eq!(ask_all(&server).await, want, "{name}");
        server.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_or_empty_mirror_answers_the_mirror_wide_reasons() {
    // generated with an as_of past the allowed staleness (45 days): the
    // NOT_REASSIGNED numbers turn MIRROR_STALE, the rest keep their answer
    let files = tempfile::tempdir().expect("tempdir");
    let old = Date::today_utc().add_days(-60).to_string();
    generate_sandbox(files.path(), &["--as-of", &old]);
    let store = AnyStore::Embedded(Arc::new(EmbeddedStore::new()));
    import::sync_dir(&store, files.path(), &mut NoProgress)
        .await
        .expect("import");
    let server = TestServer::start(store, |_| {}).await;
    let stale = expected(|s| match s {
        Status::NotReassigned => Status::NoData(NoDataReason::MirrorStale),
        other => other,
    });
    assert_eq!(ask_all(&server).await, stale);
    assert!(stale.iter().any(|(_, r)| r == "NO_DATA_REASON_MIRROR_STALE"));
    server.stop().await;

    // nothing imported: every number is MIRROR_EMPTY
    let server = TestServer::start(AnyStore::Embedded(Arc::new(EmbeddedStore::new())), |_| {}).await;
    let empty = expected(|_| Status::NoData(NoDataReason::MirrorEmpty));
    assert_eq!(ask_all(&server).await, empty);
    server.stop().await;
}

/// The README's "Sandbox numbers" table lists exactly [`SANDBOX`], with the
/// same `since` and answer.
#[test]
fn readme_lists_the_sandbox_numbers() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README");
    let section = readme
        .split("\n## Sandbox numbers\n")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("a README section \"Sandbox numbers\"");
    assert!(section.contains(SANDBOX_DISCONNECT));
    let rows: Vec<Vec<String>> = section
        .lines()
        .filter(|l| l.starts_with("| `+"))
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().trim_matches('`').to_owned())
                .collect()
        })
        .collect();
    assert_eq!(rows.len(), SANDBOX.len(), "{rows:?}");
    for (row, sb) in rows.iter().zip(SANDBOX) {
        let (status, reason) = proto_names(sb.status);
        let answer = match sb.status {
            Status::NoData(_) => format!("NO_DATA / {}", reason.trim_start_matches("NO_DATA_REASON_")),
            _ => status.trim_start_matches("REASSIGNMENT_STATUS_").to_owned(),
        };
        assert_eq!(
            row[..3],
            [sb.number.to_owned(), sb.since.to_owned(), answer],
            "{row:?}"
        );
    }
}

#[test]
fn sandbox_refuses_records_and_deltas() {
    let dir = tempfile::tempdir().expect("tempdir");
    for flag in ["--records", "--deltas"] {
        let out = bin()
            .args(["generate", "--sandbox", flag, "5", "--out"])
            .arg(dir.path())
            .output()
            .expect("run");
        assert!(!out.status.success(), "{flag} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("cannot be used with"), "{stderr}");
    }
    assert!(!dir.path().join("snapshot-000001.json").exists());
}

/// `examples/interop_check.py` (the interop test's judge) passes a client
/// output that answers as the data set says and fails one that does not.
#[test]
fn interop_check_compares_answers_with_the_data_set() {
    let dir = tempfile::tempdir().expect("tempdir");
    let register = dir.path().join("register");
    generate_sandbox(&register, &[]);
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(register.join("snapshot-000001.json")).expect("manifest"),
    )
    .expect("json");
    let mut lines = Vec::new();
    for call in ["CheckNumber", "BatchCheckNumbers", "StreamCheckNumbers"] {
        for sb in SANDBOX {
            let (status, reason) = proto_names(sb.status);
            lines.push(
                serde_json::json!({"call": call, "phone_number": sb.number, "since": sb.since,
                "status": status, "no_data_reason": reason}),
            );
        }
    }
    lines.push(
        serde_json::json!({"call": "GetMirrorStatus", "data_as_of": manifest["as_of"],
        "coverage_start": manifest["coverage_start"], "covered_prefixes": manifest["covered_prefixes"],
        "record_count": manifest["records"], "stale": false}),
    );
    lines.push(
        serde_json::json!({"call": "CheckNumber", "provoked": "bad_request", "code": "INVALID_ARGUMENT",
        "field_violations": [{"field": "phone_number"}, {"field": "since"}]}),
    );
    lines.push(
        serde_json::json!({"call": "BatchCheckNumbers", "provoked": "retry_info",
        "code": "RESOURCE_EXHAUSTED", "retry_delay_seconds": 3600.0}),
    );
    let check = |lines: &[serde_json::Value]| {
        let output = dir.path().join("client.jsonl");
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(&output, text).expect("write");
        std::process::Command::new("python3")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/interop_check.py"))
            .arg("test")
            .arg(&output)
            .arg(&register)
            .output()
            .expect("python3")
    };
    let good = check(&lines);
    assert!(good.status.success(), "{}", String::from_utf8_lossy(&good.stdout));

    // one answer wrong, the RetryInfo missing, the record count wrong: each fails
    let mut wrong = lines.clone();
    wrong[0]["status"] = "REASSIGNMENT_STATUS_NOT_REASSIGNED".into();
    let mut no_retry = lines.clone();
    no_retry.pop();
    let mut count = lines.clone();
    count[3 * SANDBOX.len()]["record_count"] = 99.into();
    for (what, bad) in [
        ("a wrong answer", wrong),
        ("no RetryInfo", no_retry),
        ("a wrong count", count),
    ] {
        let out = check(&bad);
        assert!(!out.status.success(), "{what} passed");
        assert!(String::from_utf8_lossy(&out.stdout).contains("FAILED"), "{what}");
    }
}
