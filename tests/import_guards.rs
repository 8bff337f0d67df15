//! Imports that cannot wipe or exhaust the mirror, on both stores and with
//! the real binary: the shrink guard, row bombs, data files outside the
//! manifest's directory, re-issued sequences, a `kill -9`ed or SIGTERMed
//! import, `verify` and `gc` on a real redis-server, and the embedded
//! store's restart with bad files in its directory.

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reassigned::api::pb::{GetMirrorStatusRequest, NoDataReason, ReassignmentStatus};
use reassigned::domain::{Date, PhoneNumber};
use reassigned::import::{self, ImportError, ImportOptions, NoProgress};
use reassigned::store::packed;
use reassigned::store::redis::RedisOptions;
use reassigned::store::{AnyStore, EmbeddedStore, RedisStore, Store};
use sha2::{Digest, Sha256};
use support::bin::{Killed, bin, dev_certs, free_port, mirror_status, numbers_client, run, serve_dev};
use support::per_store_tests;
use support::poll::eventually;
use support::redis::RedisServer;
use support::register::FileSpec;
use support::server::{TestServer, check_request};

fn days_ago(n: i32) -> String {
    Date::today_utc().add_days(-n).to_string()
}

/// `count` rows `+1415555NNNN,2024-05-01` starting at `from`.
fn rows(from: u64, count: u64) -> Vec<(String, String)> {
    (from..from + count)
        .map(|i| (format!("+1415{:07}", 5_000_000 + i), "2024-05-01".to_string()))
        .collect()
}

fn as_refs(rows: &[(String, String)]) -> Vec<(&str, &str)> {
    rows.iter().map(|(n, d)| (n.as_str(), d.as_str())).collect()
}

fn snapshot(sequence: u64, rows: &[(String, String)]) -> FileSpec<'static> {
    FileSpec::snapshot(
        sequence,
        &days_ago(10 - sequence as i32),
        "2021-01-27",
        &["+1", "+86"],
        &as_refs(rows),
    )
}

/// Both stores, for the behaviours that apply to both.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Embedded,
    Redis,
}

struct Env {
    store: AnyStore,
    _redis: Option<RedisServer>,
    files: tempfile::TempDir,
}

impl Env {
    async fn new(kind: Kind) -> Self {
        let (store, redis) = match kind {
            Kind::Embedded => (AnyStore::Embedded(Arc::new(EmbeddedStore::new())), None),
            Kind::Redis => {
                let server = RedisServer::start();
                let options = RedisOptions {
                    reclaim_grace: Duration::from_millis(300),
                    ..RedisOptions::default()
                };
                let store = RedisStore::connect(&server.url(), options)
                    .await
                    .expect("connect");
                (AnyStore::Redis(store), Some(server))
            }
        };
        Self {
            store,
            _redis: redis,
            files: tempfile::tempdir().expect("tempdir"),
        }
    }

    async fn apply_with(
        &self,
        spec: FileSpec<'_>,
        name: &str,
        options: ImportOptions,
    ) -> Result<import::Applied, ImportError> {
        let path = spec.write(self.files.path(), name);
        import::apply_manifest_with(&self.store, &path, options, &mut NoProgress).await
    }

    async fn apply(&self, spec: FileSpec<'_>, name: &str) -> Result<import::Applied, ImportError> {
        self.apply_with(spec, name, ImportOptions::default()).await
    }

    fn records(&self) -> u64 {
        self.store.cached_meta().map_or(0, |m| m.record_count)
    }
}

async fn check(server: &TestServer, number: &str, since: &str) -> (i32, i32) {
    let r = server
        .client()
        .await
        .check_number(check_request(number, since))
        .await
        .expect("check")
        .into_inner();
    (r.status, r.no_data_reason)
}

async fn shrink_guard(kind: Kind) {
    let env = Env::new(kind).await;
    env.apply(snapshot(1, &rows(0, 100)), "s1")
        .await
        .expect("snapshot 1");
    assert_eq!(env.records(), 100);

    // a header-only snapshot: refused, nothing changed
    let e = env
        .apply(snapshot(2, &[]), "s2")
        .await
        .expect_err("empty snapshot");
    assert!(
        matches!(
            e,
            ImportError::Shrink {
                before: 100,
                after: 0,
                ..
            }
        ),
        "{e}"
    );
    let text = e.to_string();
    assert!(
        text.contains("from 100 to 0 records") && text.contains("--allow-shrink"),
        "{text}"
    );
    assert_eq!(env.records(), 100);

    // 20% fewer: refused at the default 10%, applied at 25%
    let e = env
        .apply(snapshot(3, &rows(0, 80)), "s3")
        .await
        .expect_err("-20%");
    assert!(e.to_string().contains("from 100 to 80 records"), "{e}");
    assert_eq!(env.store.cached_meta().map(|m| m.sequence), Some(1));
    let loose = ImportOptions {
        max_shrink: 0.25,
        allow_shrink: false,
    };
    env.apply_with(snapshot(3, &rows(0, 80)), "s3", loose)
        .await
        .expect("-20% within 25%");
    assert_eq!(env.records(), 80);
    // 5% fewer is within the default
    env.apply(snapshot(4, &rows(0, 76)), "s4").await.expect("-5%");

    // --allow-shrink applies the empty snapshot; the mirror then answers
    // NO_DATA(MIRROR_EMPTY), never NOT_REASSIGNED
    let allow = ImportOptions {
        allow_shrink: true,
        ..ImportOptions::default()
    };
    env.apply_with(snapshot(5, &[]), "s5", allow)
        .await
        .expect("allowed");
    assert_eq!(env.records(), 0);
    let server = TestServer::start_without_tokens(env.store.clone(), |_| {}).await;
    let (number, _) = &rows(0, 1)[0];
    for n in [number.as_str(), "+14155550000"] {
        assert_eq!(
            check(&server, n, "2024-01-01").await,
            (
                ReassignmentStatus::NoData as i32,
                NoDataReason::MirrorEmpty as i32
            ),
            "{n}"
        );
    }
    server.stop().await;
}

async fn outside_the_manifest_dir(kind: Kind) {
    let env = Env::new(kind).await;
    env.apply(snapshot(1, &rows(0, 10)), "s1")
        .await
        .expect("snapshot 1");
    // a valid CSV elsewhere, linked from the manifest's directory
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let csv = "phone_number,disconnect_date\n+14155550001,2024-05-01\n";
    std::fs::write(elsewhere.path().join("other.csv"), csv).expect("write");
    let manifest = |data: &str, sha: &str, records: u64| {
        serde_json::json!({
            "kind": "delta", "sequence": 2, "as_of": days_ago(9),
            "data": data, "records": records, "sha256": sha,
        })
    };
    let link = env.files.path().join("delta-2.csv");
    std::os::unix::fs::symlink(elsewhere.path().join("other.csv"), &link).expect("symlink");
    let path = env.files.path().join("delta-2.json");
    let sha = hex::encode(Sha256::digest(csv.as_bytes()));
    std::fs::write(&path, manifest("delta-2.csv", &sha, 1).to_string()).expect("manifest");
    let e = import::apply_manifest(&env.store, &path, &mut NoProgress)
        .await
        .expect_err("symlink outside");
    let text = e.to_string();
    assert!(
        text.contains("outside the manifest's directory") && text.contains("delta-2.csv"),
        "{text}"
    );

    // /etc/passwd: refused before a line of it is parsed
    let passwd = env.files.path().join("passwd.csv");
    std::os::unix::fs::symlink("/etc/passwd", &passwd).expect("symlink");
    let path = env.files.path().join("delta-2b.json");
    std::fs::write(&path, manifest("passwd.csv", &"0".repeat(64), 1).to_string()).expect("manifest");
    let e = import::apply_manifest(&env.store, &path, &mut NoProgress)
        .await
        .expect_err("passwd");
    let text = e.to_string();
    assert!(text.contains("outside the manifest's directory"), "{text}");
    assert!(!text.contains("root"), "no line of /etc/passwd is shown: {text}");
    assert_eq!(env.store.cached_meta().map(|m| m.sequence), Some(1));

    // a symlink inside the directory is fine
    let inside = env.files.path().join("real.csv");
    std::fs::write(&inside, csv).expect("write");
    let ok_link = env.files.path().join("inside.csv");
    std::os::unix::fs::symlink(&inside, &ok_link).expect("symlink");
    let path = env.files.path().join("delta-2c.json");
    std::fs::write(&path, manifest("inside.csv", &sha, 1).to_string()).expect("manifest");
    import::apply_manifest(&env.store, &path, &mut NoProgress)
        .await
        .expect("a link inside the directory");
}

async fn reissued_sequence(kind: Kind) {
    let env = Env::new(kind).await;
    env.apply(snapshot(1, &rows(0, 10)), "s1")
        .await
        .expect("snapshot 1");
    let d2 = FileSpec::delta(2, &days_ago(9), &as_refs(&rows(100, 3)));
    let first = d2.write(env.files.path(), "d2");
    import::apply_manifest(&env.store, &first, &mut NoProgress)
        .await
        .expect("delta 2");
    // the same file again: already applied
    let again = import::apply_manifest(&env.store, &first, &mut NoProgress)
        .await
        .expect("same file");
    assert_eq!(again, import::Applied::AlreadyApplied { sequence: 2 });
    // re-issued with other content: refused, naming sequence and checksums
    let reissued =
        FileSpec::delta(2, &days_ago(9), &as_refs(&rows(200, 3))).write(env.files.path(), "d2-reissued");
    let e = import::apply_manifest(&env.store, &reissued, &mut NoProgress)
        .await
        .expect_err("re-issued");
    let (old_sha, new_sha) = (sha_of(&first), sha_of(&reissued));
    assert_ne!(old_sha, new_sha);
    let text = e.to_string();
    assert!(
        text.contains("delta 2") && text.contains(&old_sha) && text.contains(&new_sha),
        "{text}"
    );
    // and a sync of a directory holding it refuses too
    let e = import::sync_dir(&env.store, env.files.path(), &mut NoProgress)
        .await
        .expect_err("sync with a re-issued file");
    assert!(matches!(e, ImportError::Reissued { sequence: 2, .. }), "{e}");
}

fn sha_of(manifest: &Path) -> String {
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(manifest).expect("read")).expect("json");
    m["sha256"].as_str().expect("sha").to_owned()
}

per_store_tests!(
    embedded => super::Kind::Embedded,
    redis => super::Kind::Redis;
    shrink_guard,
    outside_the_manifest_dir,
    reissued_sequence,
);

// ---------------------------------------------------------------- row bombs

/// A gzip'd data file of `rows` copies of one row, and its manifest
/// announcing `records`.
fn row_bomb(dir: &Path, rows: u64, records: u64) -> PathBuf {
    let data = dir.join("bomb.csv.gz");
    let mut gz = flate2::write::GzEncoder::new(
        std::io::BufWriter::new(std::fs::File::create(&data).expect("create")),
        flate2::Compression::fast(),
    );
    gz.write_all(b"phone_number,disconnect_date\n").expect("write");
    let line = b"+14155550123,2024-05-01\n";
    let block: Vec<u8> = line.iter().copied().cycle().take(line.len() * 4096).collect();
    let mut left = rows;
    while left > 0 {
        let n = left.min(4096);
        gz.write_all(&block[..line.len() * n as usize]).expect("write");
        left -= n;
    }
    gz.finish().expect("gzip").flush().expect("flush");
    let sha = hex::encode(Sha256::digest(std::fs::read(&data).expect("read")));
    let manifest = dir.join("bomb.json");
    let json = serde_json::json!({
        "kind": "delta", "sequence": 2, "as_of": days_ago(1),
        "data": "bomb.csv.gz", "records": records, "sha256": sha,
    });
    std::fs::write(&manifest, json.to_string()).expect("manifest");
    manifest
}

#[test]
fn a_row_bomb_stops_at_the_manifest_count() {
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = import::Manifest::load(row_bomb(dir.path(), 2_000_000, 1)).expect("manifest");
    let started = Instant::now();
    let e = import::read_records(&manifest, &mut NoProgress).expect_err("bomb");
    let took = started.elapsed();
    let text = e.to_string();
    assert!(
        text.contains("bomb.csv.gz, line 3: more data rows than the manifest's records (1)"),
        "{text}"
    );
    // generous: stopping at line 3 takes milliseconds, reading 2M rows far more
    assert!(took < Duration::from_secs(2), "took {took:?}");
}

#[test]
fn duplicates_keep_memory_by_distinct_numbers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = import::Manifest::load(row_bomb(dir.path(), 2_000_000, 2_000_000)).expect("manifest");
    let records = import::read_records(&manifest, &mut NoProgress).expect("valid, if redundant");
    assert_eq!(records.len(), 1);
    assert_eq!(
        records.get(PhoneNumber::parse("+14155550123").expect("n")),
        Some(Date::parse("2024-05-01").expect("d"))
    );
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Measurement (run alone, it reads the process' peak RSS):
/// `cargo test --release --test import_guards -- --ignored --nocapture peak_rss`
#[test]
#[ignore = "measurement: prints peak RSS"]
fn peak_rss_of_row_bombs() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (rows, records) in [(20_000_000u64, 1u64), (20_000_000, 20_000_000)] {
        let path = row_bomb(dir.path(), rows, records);
        let size = std::fs::metadata(dir.path().join("bomb.csv.gz"))
            .expect("meta")
            .len();
        let manifest = import::Manifest::load(path).expect("manifest");
        let before = peak_rss_kib();
        let started = Instant::now();
        let result = import::read_records(&manifest, &mut NoProgress);
        println!(
            "{rows} duplicate rows ({} KiB gzip), records: {records}: {} in {:.2?}; peak RSS {} MiB (before: {} MiB)",
            size / 1024,
            match &result {
                Ok(r) => format!("ok, {} distinct", r.len()),
                Err(e) => format!(
                    "refused ({})",
                    e.to_string().lines().nth(1).unwrap_or_default().trim()
                ),
            },
            started.elapsed(),
            peak_rss_kib() / 1024,
            before / 1024
        );
    }
}

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Measurement of the embedded store's memory (run alone: it reads the
/// process' RSS and peak RSS). Generates a register with `reassigned
/// generate --seed 1` (in a child process, so it does not count), then
/// loads it with `import::embedded::open_dir` as `serve --data-dir` does
/// and prints the RSS grown while loading (peak) and after, per record.
/// `MEASURE_RECORDS` sets the snapshot's size (default 10,000,000), and
/// `MEASURE_UNSORTED=1` shuffles its rows first (the importer then sorts):
/// `cargo test --release --test import_guards -- --ignored --nocapture embedded_memory`
#[test]
#[ignore = "measurement: prints RSS per record"]
fn embedded_memory_per_record() {
    let records: u64 = std::env::var("MEASURE_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000);
    let unsorted = std::env::var("MEASURE_UNSORTED").is_ok_and(|v| v == "1");
    let dir = tempfile::tempdir().expect("tempdir");
    run(bin()
        .args([
            "generate",
            "--records",
            &records.to_string(),
            "--seed",
            "1",
            "--out",
        ])
        .arg(dir.path()));
    if unsorted {
        let data = "snapshot-000001.csv.gz";
        let shuffle = format!(
            "set -e; cd '{}'; (gzip -dc {data} | head -1; gzip -dc {data} | tail -n +2 | shuf --random-source=/dev/zero) | gzip -1 > shuffled.gz; mv shuffled.gz {data}",
            dir.path().display()
        );
        let ok = std::process::Command::new("sh")
            .args(["-c", &shuffle])
            .status()
            .expect("sh");
        assert!(ok.success(), "shuffle");
        let path = dir.path().join("snapshot-000001.json");
        let mut manifest = import::Manifest::load(&path).expect("manifest");
        let bytes = std::fs::read(dir.path().join(data)).expect("data");
        manifest.sha256 = hex::encode(Sha256::digest(&bytes));
        drop(bytes);
        std::fs::write(&path, serde_json::to_vec(&manifest).expect("json")).expect("write");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let before = rss_kib("VmRSS:");
    let started = Instant::now();
    let store = rt
        .block_on(import::embedded::open_dir(
            dir.path(),
            ImportOptions::default(),
            &mut NoProgress,
        ))
        .expect("loads");
    let elapsed = started.elapsed();
    let (peak, after) = (rss_kib("VmHWM:"), rss_kib("VmRSS:"));
    assert!(
        store.import_problems().is_empty(),
        "{:?}",
        store.import_problems()
    );
    let held = store.len() as f64;
    assert!(held >= records as f64, "{held} records of {records}");
    let per = |kib: u64| kib.saturating_sub(before) as f64 * 1024.0 / held;
    println!(
        "{} records ({}) loaded in {elapsed:.2?}: RSS +{:.2} bytes/record steady, +{:.2} peak while loading; store heap {:.2} bytes/record (RSS before {before} KiB, peak {peak} KiB, after {after} KiB)",
        store.len(),
        if unsorted {
            "snapshot rows shuffled"
        } else {
            "snapshot rows sorted"
        },
        per(after),
        per(peak),
        store.memory_bytes() as f64 / held,
    );
}

// ------------------------------------------------- the binary, on real Redis

async fn redis_conn(redis: &RedisServer) -> ::redis::aio::MultiplexedConnection {
    ::redis::Client::open(redis.url())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("connect")
}

async fn keys(conn: &mut ::redis::aio::MultiplexedConnection, pattern: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, mut page): (u64, Vec<String>) = ::redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .expect("scan");
        out.append(&mut page);
        cursor = next;
        if cursor == 0 {
            return out;
        }
    }
}

/// `GET key`: the bytes of a packed bucket.
async fn get_bytes(conn: &mut ::redis::aio::MultiplexedConnection, key: &str) -> Vec<u8> {
    ::redis::cmd("GET").arg(key).query_async(conn).await.expect("get")
}

/// `SET key value`.
async fn set_key(
    conn: &mut ::redis::aio::MultiplexedConnection,
    key: &str,
    value: impl ::redis::ToRedisArgs,
) {
    let _: () = ::redis::cmd("SET")
        .arg(key)
        .arg(value)
        .query_async(conn)
        .await
        .expect("set");
}

async fn meta(conn: &mut ::redis::aio::MultiplexedConnection) -> std::collections::HashMap<String, String> {
    ::redis::cmd("HGETALL")
        .arg("rn:meta")
        .query_async(conn)
        .await
        .expect("meta")
}

/// Bucket keys and filter chunks of generations other than the current.
async fn foreign_generation_keys(conn: &mut ::redis::aio::MultiplexedConnection) -> Vec<String> {
    let m = meta(conn).await;
    let current = m.get("generation").cloned().unwrap_or_default();
    let mine = |k: &str| {
        k.starts_with(&format!("rn:g{current}:")) || k.starts_with(&format!("rn:bloom:g{current}:"))
    };
    let mut all = keys(conn, "rn:g*").await;
    all.extend(keys(conn, "rn:bloom:*").await);
    all.into_iter()
        .filter(|k| k != "rn:gen_counter" && !mine(k))
        .collect()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn generate(dir: &Path, records: u64, deltas: u32) -> PathBuf {
    let register = dir.join("register");
    run(bin()
        .args(["generate", "--seed", "11", "--records", &records.to_string()])
        .args(["--deltas", &deltas.to_string(), "--out"])
        .arg(&register));
    register
}

/// Waits until the import child has started writing its pending generation.
/// The import lock's value, if any.
async fn lock_value(conn: &mut ::redis::aio::MultiplexedConnection) -> Option<String> {
    ::redis::cmd("GET")
        .arg("rn:lock")
        .query_async(conn)
        .await
        .expect("GET rn:lock")
}

/// The binary's `command path` against `redis`, running in the background.
fn spawn_against(redis: &RedisServer, command: &str, path: &Path, stderr: Stdio) -> Killed {
    Killed(
        bin()
            .arg(command)
            .arg(path)
            .env("REASSIGNED_REDIS", redis.url())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {command}: {e}")),
    )
}

async fn until_writing(conn: &mut ::redis::aio::MultiplexedConnection, child: &mut Killed) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            child.0.try_wait().expect("wait").is_none(),
            "the import ended too early"
        );
        let m = meta(conn).await;
        if let Some(pending) = m.get("pending_generation") {
            let written = keys(conn, &format!("rn:g{pending}:*")).await.len();
            if written > 500 {
                return;
            }
        }
        assert!(Instant::now() < deadline, "the import did not start writing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_an_import_then_an_immediate_rerun_succeeds() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let register = generate(dir.path(), 1_000_000, 0);
    let manifest = register.join("snapshot-000001.json");
    let mut conn = redis_conn(&redis).await;

    let mut child = spawn_against(&redis, "import", &manifest, Stdio::null());
    until_writing(&mut conn, &mut child).await;
    child.signal("KILL");
    let _ = child.0.wait();
    let lock = lock_value(&mut conn).await;
    assert!(lock.is_some(), "the killed import left its lock");
    assert!(!keys(&mut conn, "rn:g*:*").await.is_empty(), "and pending keys");

    // at once: the dead owner's lock is taken over, its keys are removed
    let started = Instant::now();
    let out = run(bin()
        .arg("import")
        .arg(&manifest)
        .env("REASSIGNED_REDIS", redis.url()));
    let log = stderr(&out);
    assert!(log.contains("applied snapshot 1"), "{log}");
    assert!(log.contains("took over the redis import lock"), "{log}");
    println!("rerun after kill -9 took {:.1?}", started.elapsed());

    let m = meta(&mut conn).await;
    assert!(!m.contains_key("pending_generation"), "{m:?}");
    assert_eq!(
        foreign_generation_keys(&mut conn).await,
        Vec::<String>::new(),
        "no pending keys left"
    );
    let nbuckets: usize = m["nbuckets"].parse().expect("nbuckets");
    assert_eq!(
        keys(&mut conn, &format!("rn:g{}:*", m["generation"])).await.len(),
        nbuckets
    );
    let lock = lock_value(&mut conn).await;
    assert_eq!(lock, None, "released");

    // every record is there, with its date
    let out = run(bin()
        .arg("verify")
        .arg(&register)
        .env("REASSIGNED_REDIS", redis.url()));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("1000000 records expected") && text.contains("every bucket matches"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_of_sync_rolls_back_and_releases_the_lock() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let register = generate(dir.path(), 1_000_000, 1);
    let mut conn = redis_conn(&redis).await;

    // before the switch: the pending generation is rolled back
    let mut child = spawn_against(&redis, "sync", &register, Stdio::piped());
    until_writing(&mut conn, &mut child).await;
    child.signal("TERM");
    let out = wait_out(child).await;
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(143), "{log}");
    assert!(
        log.contains("interrupted by a signal") && log.contains("rolled back"),
        "{log}"
    );
    let lock = lock_value(&mut conn).await;
    assert_eq!(lock, None, "lock released");
    let m = meta(&mut conn).await;
    assert!(
        !m.contains_key("pending_generation") && !m.contains_key("generation"),
        "{m:?}"
    );
    assert_eq!(
        keys(&mut conn, "rn:g*:*").await,
        Vec::<String>::new(),
        "no orphaned generation"
    );
    assert_eq!(keys(&mut conn, "rn:bloom:*").await, Vec::<String>::new());

    // a rerun applies everything
    run(bin()
        .arg("sync")
        .arg(&register)
        .env("REASSIGNED_REDIS", redis.url()));
    assert_eq!(meta(&mut conn).await["sequence"], "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_after_the_switch_finishes_the_reclaim() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let files = dir.path();
    let s1 = snapshot(1, &rows(0, 2000)).write(files, "s1");
    run(bin().arg("import").arg(&s1).env("REASSIGNED_REDIS", redis.url()));
    let mut conn = redis_conn(&redis).await;
    let old = meta(&mut conn).await["generation"].clone();
    // snapshot 2 and a delta 3 in the directory
    std::fs::remove_file(&s1).expect("rm");
    snapshot(2, &rows(0, 2100)).write(files, "s2");
    FileSpec::delta(3, &days_ago(5), &as_refs(&rows(5000, 5))).write(files, "d3");
    let mut child = Killed(
        bin()
            .arg("sync")
            .arg(files)
            .env("REASSIGNED_REDIS", redis.url())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sync"),
    );
    // the switch done, the replaced generation still waits for its grace
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = meta(&mut conn).await;
        if m.get("reclaim_generation") == Some(&old) {
            break;
        }
        assert!(
            Instant::now() < deadline && child.0.try_wait().expect("wait").is_none(),
            "{m:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.signal("TERM");
    let out = wait_out(child).await;
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(143), "{log}");
    assert!(log.contains("applied snapshot 2"), "{log}");
    let m = meta(&mut conn).await;
    assert_eq!(m["sequence"], "2", "stopped before the delta: {m:?}");
    assert!(!m.contains_key("reclaim_generation"), "reclaim finished: {m:?}");
    assert_eq!(foreign_generation_keys(&mut conn).await, Vec::<String>::new());
    let lock = lock_value(&mut conn).await;
    assert_eq!(lock, None, "lock released");
}

async fn wait_out(mut child: Killed) -> Output {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.0.try_wait().expect("wait") {
            let mut stderr = Vec::new();
            if let Some(mut e) = child.0.stderr.take() {
                use std::io::Read;
                e.read_to_end(&mut stderr).expect("stderr");
            }
            return Output {
                status,
                stdout: Vec::new(),
                stderr,
            };
        }
        assert!(Instant::now() < deadline, "the child did not stop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_refuses_shrink_and_reissued_files_loudly() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let files = dir.path();
    let import = |manifest: &Path, extra: &[&str]| {
        bin()
            .arg("import")
            .args(extra)
            .arg(manifest)
            .env("REASSIGNED_REDIS", redis.url())
            .output()
            .expect("run")
    };
    let s1 = snapshot(1, &rows(0, 50)).write(files, "s1");
    assert!(import(&s1, &[]).status.success());
    let d2 = FileSpec::delta(2, &days_ago(9), &as_refs(&rows(100, 2))).write(files, "d2");
    assert!(import(&d2, &[]).status.success());

    // a header-only snapshot: exit 1, counts in the message, nothing changed
    let s3 = snapshot(3, &[]).write(files, "s3");
    let out = import(&s3, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("from 52 to 0 records"), "{}", stderr(&out));
    let out = import(&s3, &["--max-shrink", "0.5"]);
    assert!(!out.status.success(), "empty is refused at any --max-shrink");

    // the same delta 2 re-issued with other content: exit 1, both checksums
    let d2b = FileSpec::delta(2, &days_ago(9), &as_refs(&rows(300, 2))).write(files, "d2b");
    let out = import(&d2b, &[]);
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(
        log.contains("delta 2") && log.contains(&sha_of(&d2)) && log.contains(&sha_of(&d2b)),
        "{log}"
    );
    // the original again: already applied, exit 0
    let out = import(&d2, &[]);
    assert!(
        out.status.success() && stderr(&out).contains("already applied"),
        "{}",
        stderr(&out)
    );

    // --allow-shrink applies the empty snapshot
    let out = import(&s3, &["--allow-shrink"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_damage_and_gc_removes_orphans() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let register = generate(dir.path(), 20_000, 2);
    run(bin()
        .arg("sync")
        .arg(&register)
        .env("REASSIGNED_REDIS", redis.url()));
    let verify = || {
        bin()
            .arg("verify")
            .arg(&register)
            .env("REASSIGNED_REDIS", redis.url())
            .output()
            .expect("run")
    };
    let out = verify();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("every bucket matches"));

    let mut conn = redis_conn(&redis).await;
    let m = meta(&mut conn).await;
    let generation = m["generation"].clone();
    // a bucket whose header names another generation (a stale copy): its
    // records do not count
    let bucket7 = format!("rn:g{generation}:7");
    let saved7 = get_bytes(&mut conn, &bucket7).await;
    let entries: Vec<(u64, u16)> = packed::Bucket::parse(&saved7)
        .expect("a packed bucket")
        .iter()
        .collect();
    assert!(!entries.is_empty());
    let mut foreign = Vec::new();
    packed::encode(generation.parse::<u64>().expect("id") + 1, &entries, &mut foreign);
    set_key(&mut conn, &bucket7, foreign).await;
    let out = verify();
    let log = stderr(&out);
    assert!(!out.status.success());
    assert!(log.contains(&format!("bucket 7 ({bucket7})")), "{log}");
    set_key(&mut conn, &bucket7, saved7).await;
    assert!(verify().status.success());

    // a deleted bucket
    let bucket3 = format!("rn:g{generation}:3");
    let saved: Vec<u8> = ::redis::cmd("DUMP")
        .arg(&bucket3)
        .query_async(&mut conn)
        .await
        .expect("dump");
    let _: i64 = ::redis::cmd("DEL")
        .arg(&bucket3)
        .query_async(&mut conn)
        .await
        .expect("del");
    let out = verify();
    let log = stderr(&out);
    assert!(!out.status.success());
    assert!(
        log.contains(&format!("bucket 3 ({bucket3})")) && log.contains("found 0"),
        "{log}"
    );
    let _: () = ::redis::cmd("RESTORE")
        .arg(&bucket3)
        .arg(0)
        .arg(saved)
        .query_async(&mut conn)
        .await
        .expect("restore");
    assert!(verify().status.success());

    // a bogus record in a bucket
    let bucket5 = format!("rn:g{generation}:5");
    let saved5 = get_bytes(&mut conn, &bucket5).await;
    let old = packed::Bucket::parse(&saved5).expect("a packed bucket");
    let (bogus, added) = packed::merge(&old, &[(999_999_999, 19_000)]);
    assert_eq!(added, 1);
    let mut damaged = Vec::new();
    packed::encode(old.header().generation, &bogus, &mut damaged);
    set_key(&mut conn, &bucket5, damaged).await;
    let out = verify();
    let log = stderr(&out);
    assert!(!out.status.success());
    assert!(log.contains(&format!("bucket 5 ({bucket5})")), "{log}");
    assert!(!log.contains("bucket 3 ("), "only the damaged bucket: {log}");
    set_key(&mut conn, &bucket5, saved5).await;

    // an orphaned generation: reported by a dry run, removed by gc
    let current_keys = keys(&mut conn, &format!("rn:g{generation}:*")).await.len();
    for i in 0..50 {
        let _: i64 = ::redis::cmd("HSET")
            .arg(format!("rn:g9999:{i}"))
            .arg("1")
            .arg("1")
            .query_async(&mut conn)
            .await
            .expect("hset");
    }
    set_key(&mut conn, "rn:bloom:g9999:0", "x").await;
    let out = run(bin()
        .args(["gc", "--dry-run"])
        .env("REASSIGNED_REDIS", redis.url()));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("generation 9999 (51 keys)") && text.contains("dry run"),
        "{text}"
    );
    assert_eq!(keys(&mut conn, "rn:g9999:*").await.len(), 50);
    let out = run(bin().arg("gc").env("REASSIGNED_REDIS", redis.url()));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("removed 51 keys") && text.contains(&format!("current generation {generation}")),
        "{text}"
    );
    assert_eq!(foreign_generation_keys(&mut conn).await, Vec::<String>::new());
    assert_eq!(
        keys(&mut conn, &format!("rn:g{generation}:*")).await.len(),
        current_keys,
        "current kept"
    );
    assert!(verify().status.success());
    let out = run(bin().arg("gc").env("REASSIGNED_REDIS", redis.url()));
    assert!(String::from_utf8_lossy(&out.stdout).contains("no orphaned generation"));
}

// ------------------------------------------------ embedded store restarts

/// Writes S1 (rows 0..100), D2, D3, D4 (5 rows each) into `dir`.
fn good_register(dir: &Path) {
    snapshot(1, &rows(0, 100)).write(dir, "snapshot-000001");
    for seq in 2..=4u64 {
        FileSpec::delta(seq, &days_ago(10 - seq as i32), &as_refs(&rows(1000 * seq, 5)))
            .write(dir, &format!("delta-{seq:06}"));
    }
}

async fn open(dir: &Path) -> EmbeddedStore {
    import::embedded::open_dir(dir, ImportOptions::default(), &mut NoProgress)
        .await
        .expect("starts")
}

#[tokio::test]
async fn embedded_restart_keeps_the_longest_valid_prefix() {
    let seq = |s: &EmbeddedStore| s.cached_meta().map(|m| m.sequence);

    // a garbage manifest besides the good files
    let dir = tempfile::tempdir().expect("tempdir");
    good_register(dir.path());
    std::fs::write(dir.path().join("delta-000005.json"), "{ not json").expect("write");
    let store = open(dir.path()).await;
    assert_eq!(seq(&store), Some(4));
    let p = store.import_problems();
    assert!(
        p.len() == 1 && p[0].starts_with("delta-000005.json: ") && p[0].contains("not a valid manifest"),
        "{p:?}"
    );
    // and it matches its files
    let digest = store.digest().expect("not empty");
    let report = import::verify::verify(dir.path(), &digest).await.expect("verify");
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.expected_records, 115);

    // a half-written data file in the middle
    let dir = tempfile::tempdir().expect("tempdir");
    good_register(dir.path());
    let d3 = dir.path().join("delta-000003.csv");
    let text = std::fs::read(&d3).expect("read");
    std::fs::write(&d3, &text[..text.len() / 2]).expect("truncate");
    let store = open(dir.path()).await;
    assert_eq!(seq(&store), Some(2));
    let p = store.import_problems();
    assert!(
        p.iter()
            .any(|l| l.starts_with("delta-000003.json: ") && l.contains("SHA-256")),
        "{p:?}"
    );
    assert!(p.iter().any(|l| l.starts_with("delta-000004.json: ")), "{p:?}");

    // a gap
    let dir = tempfile::tempdir().expect("tempdir");
    good_register(dir.path());
    std::fs::remove_file(dir.path().join("delta-000003.json")).expect("rm");
    let store = open(dir.path()).await;
    assert_eq!(seq(&store), Some(2));
    assert!(
        store.import_problems().iter().any(|l| l.contains("sequence gap")),
        "{:?}",
        store.import_problems()
    );

    // a missing data file
    let dir = tempfile::tempdir().expect("tempdir");
    good_register(dir.path());
    std::fs::remove_file(dir.path().join("delta-000002.csv")).expect("rm");
    let store = open(dir.path()).await;
    assert_eq!(seq(&store), Some(1));
    assert!(
        store.import_problems()[0].starts_with("delta-000002.json: "),
        "{:?}",
        store.import_problems()
    );

    // a half-written newer snapshot: the older one and its deltas
    let dir = tempfile::tempdir().expect("tempdir");
    good_register(dir.path());
    snapshot(5, &rows(0, 200)).write(dir.path(), "snapshot-000005");
    std::fs::write(
        dir.path().join("snapshot-000005.csv"),
        "phone_number,disconnect_date\n+1415",
    )
    .expect("truncate");
    let store = open(dir.path()).await;
    assert_eq!(seq(&store), Some(4));
    assert_eq!(store.len(), 115);
    assert!(
        store.import_problems()[0].starts_with("snapshot-000005.json: "),
        "{:?}",
        store.import_problems()
    );
}

#[tokio::test]
async fn the_server_starts_with_a_bad_file_and_reports_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    good_register(dir.path());
    std::fs::write(dir.path().join("delta-000005.json"), "garbage").expect("write");
    let certs = dev_certs(dir.path());
    let metrics_port = free_port();
    let metrics_listen = format!("127.0.0.1:{metrics_port}");
    let (_server, port) = serve_dev(
        dir.path(),
        &["--data-dir".into(), dir.path().display().to_string()],
        &[
            "--metrics-listen".as_ref(),
            metrics_listen.as_ref(),
            "--resync-interval-secs".as_ref(),
            "1".as_ref(),
        ],
    );
    let mut client = numbers_client(&certs, port).await;
    let status = mirror_status(&mut client).await;
    assert_eq!(status.sequence, 4);
    assert_eq!(status.skipped_files.len(), 1, "{:?}", status.skipped_files);
    assert!(status.skipped_files[0].starts_with("delta-000005.json: "));

    // the metric counts it
    let body = http_get(metrics_port, "/metrics").await;
    assert!(body.contains("reassigned_import_skipped_files 1"), "{body}");

    // a later valid file is picked up by the resync; the bad one stays reported
    FileSpec::delta(5, &days_ago(5), &as_refs(&rows(9000, 1))).write(dir.path(), "delta-000005b");
    eventually("the resync applies delta 5", || {
        let mut client = client.clone();
        async move {
            client
                .get_mirror_status(GetMirrorStatusRequest {})
                .await
                .is_ok_and(|s| s.into_inner().sequence == 5)
        }
    })
    .await;
}

async fn http_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
            if s.write_all(req.as_bytes()).await.is_ok() {
                let mut body = String::new();
                if s.read_to_string(&mut body).await.is_ok() && !body.is_empty() {
                    return body;
                }
            }
        }
        assert!(Instant::now() < deadline, "metrics endpoint did not answer");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_that_hits_maxmemory_removes_its_pending_keys() {
    let redis = RedisServer::start_with(&["--maxmemory", "6mb", "--maxmemory-policy", "noeviction"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let register = generate(dir.path(), 1_000_000, 0);
    let out = bin()
        .arg("import")
        .arg(register.join("snapshot-000001.json"))
        .env("REASSIGNED_REDIS", redis.url())
        .output()
        .expect("run");
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(log.contains("OOM") || log.contains("maxmemory"), "{log}");
    let mut conn = redis_conn(&redis).await;
    // removed on failure, not left for the next import
    assert_eq!(keys(&mut conn, "rn:g*:*").await, Vec::<String>::new());
    assert_eq!(keys(&mut conn, "rn:bloom:*").await, Vec::<String>::new());
    let m = meta(&mut conn).await;
    assert!(!m.contains_key("pending_generation"), "{m:?}");
    let lock = lock_value(&mut conn).await;
    assert_eq!(lock, None, "lock released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_and_gc_on_a_cluster() {
    let cluster = support::redis_cluster::RedisCluster::start();
    let nodes = cluster.urls().join(",");
    let dir = tempfile::tempdir().expect("tempdir");
    let register = generate(dir.path(), 20_000, 1);
    let env = |cmd: &mut std::process::Command| {
        cmd.env("REASSIGNED_REDIS_CLUSTER", &nodes);
    };
    let mut sync = bin();
    env(sync.arg("sync").arg(&register));
    run(&mut sync);
    let verify = || {
        let mut cmd = bin();
        env(cmd.arg("verify").arg(&register));
        cmd.output().expect("run")
    };
    let out = verify();
    assert!(out.status.success(), "{}", stderr(&out));

    let client = ::redis::cluster::ClusterClient::new(cluster.urls()).expect("client");
    let mut conn = client.get_async_connection().await.expect("connect");
    let generation: String = ::redis::cmd("HGET")
        .arg("rn:meta")
        .arg("generation")
        .query_async(&mut conn)
        .await
        .expect("meta");
    let bucket = format!("rn:g{generation}:11");
    let _: i64 = ::redis::cmd("DEL")
        .arg(&bucket)
        .query_async(&mut conn)
        .await
        .expect("del");
    let out = verify();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&format!("bucket 11 ({bucket})")),
        "{}",
        stderr(&out)
    );

    // orphans spread over the slots of every master
    for i in 0..30 {
        let _: i64 = ::redis::cmd("HSET")
            .arg(format!("rn:g777:{i}"))
            .arg("1")
            .arg("1")
            .query_async(&mut conn)
            .await
            .expect("hset");
    }
    let mut gc = bin();
    env(gc.arg("gc"));
    let out = run(&mut gc);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("generation 777 (30 keys)") && text.contains("removed 30 keys"),
        "{text}"
    );
    for i in 0..30 {
        let exists: i64 = ::redis::cmd("EXISTS")
            .arg(format!("rn:g777:{i}"))
            .query_async(&mut conn)
            .await
            .expect("exists");
        assert_eq!(exists, 0);
    }
    let exists: i64 = ::redis::cmd("EXISTS")
        .arg(format!("rn:g{generation}:12"))
        .query_async(&mut conn)
        .await
        .expect("exists");
    assert_eq!(exists, 1, "the current generation is kept");
}

#[tokio::test]
async fn the_embedded_resync_skips_a_shrinking_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    good_register(dir.path());
    let store = Arc::new(open(dir.path()).await);
    assert_eq!(store.len(), 115);
    snapshot(5, &[]).write(dir.path(), "snapshot-000005");
    let (report, problems) =
        import::sync_dir_lenient(&store, dir.path(), ImportOptions::default(), &mut NoProgress)
            .await
            .expect("sync");
    assert!(report.applied.is_empty(), "{report}");
    assert!(
        problems.len() == 1
            && problems[0].starts_with("snapshot-000005.json: ")
            && problems[0].contains("from 115 to 0 records"),
        "{problems:?}"
    );
    assert_eq!(store.len(), 115);
    assert_eq!(store.cached_meta().map(|m| m.sequence), Some(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_reading_stops_at_once() {
    use std::io::BufRead;
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let register = generate(dir.path(), 2_000_000, 0);
    let mut child = Killed(
        bin()
            .arg("import")
            .arg(register.join("snapshot-000001.json"))
            .env("REASSIGNED_REDIS", redis.url())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn import"),
    );
    // progress lines ("N/2000000 records") show that it is reading
    let stderr = child.0.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut log = Vec::new();
    loop {
        let line = rx.recv_timeout(Duration::from_secs(60)).expect("a progress line");
        let reading = line.contains("/2000000 records");
        log.push(line);
        if reading {
            break;
        }
    }
    let signalled = Instant::now();
    child.signal("TERM");
    let status = child.0.wait().expect("wait");
    let stopped = signalled.elapsed();
    reader.join().expect("reader");
    log.extend(rx.try_iter());
    let log = log.join("\n");
    assert_eq!(status.code(), Some(143), "{log}");
    assert!(log.contains("interrupted by a signal while reading"), "{log}");
    // generous: a chunk, not the rest of the file
    assert!(
        stopped < Duration::from_secs(3),
        "stopped {stopped:?} after the signal"
    );
    let mut conn = redis_conn(&redis).await;
    assert_eq!(
        keys(&mut conn, "rn:*").await,
        Vec::<String>::new(),
        "nothing written"
    );
}
