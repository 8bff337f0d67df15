//! The national register as a source of events on the embedded store: the
//! real `reassigned serve` on a register directory. A delta and a snapshot
//! dropped into the directory while it runs reach the platform that
//! watches the number, and no other; files dropped while it is down (a
//! delta, then a snapshot diffed against the generation before it) produce
//! their events at the next start; no start appends again what the journal
//! has. Then the register mark at the library level: the journal's last
//! register event resumes a file whose events were cut short by a crash,
//! and a log that refuses the events holds the mark (and later files'
//! events) for the next start.

mod support;

use std::path::Path;
use std::sync::Arc;

use reassigned::api::pb::watchlist_client::WatchlistClient;
use reassigned::api::pb::{self, DisconnectionEventKind};
use reassigned::domain::{Date, PhoneNumber};
use reassigned::federation::log::EmbeddedLog;
use reassigned::federation::register::{EventingStore, MARK_FILE, RegisterMark};
use reassigned::federation::{AnyLog, Event, EventKind, EventLog, REGISTER_SOURCE};
use reassigned::store::{EmbeddedStore, Records, Store};
use support::bin::{Killed, connect_as, dev_certs, serve_dev};
use support::register::FileSpec;
use support::writes::{delta_write, snap};

/// Watched by platform A; its disconnect moves with every file.
const X: &str = "+12015550142";
/// Watched by platform B; in the register, never moved.
const Y: &str = "+12015550143";
/// Watched by platform B; new in the last snapshot.
const Z: &str = "+12015550144";
/// Watched by nobody.
const W: &str = "+12015550199";

/// `n` days before the day the test started (read once, so that a run
/// across midnight writes and expects the same dates).
fn days_ago(n: i32) -> String {
    static TODAY: std::sync::OnceLock<Date> = std::sync::OnceLock::new();
    TODAY.get_or_init(Date::today_utc).add_days(-n).to_string()
}

type Events = tonic::Streaming<pb::DisconnectionEvent>;

async fn next(stream: &mut Events) -> pb::DisconnectionEvent {
    support::poll::next_item(stream).await.expect("an event")
}

/// `serve` on the register directory `register`, re-syncing every second,
/// watch lists on.
fn serve(dir: &Path, register: &Path) -> (Killed, u16) {
    let key = dir.join("watch.key");
    serve_dev(
        dir,
        &[
            "--data-dir".into(),
            register.display().to_string(),
            "--resync-interval-secs".into(),
            "1".into(),
        ],
        &["--watch-key-file".as_ref(), key.as_os_str()],
    )
}

async fn watchlist(certs: &Path, who: &str, port: u16) -> WatchlistClient<tonic::transport::Channel> {
    WatchlistClient::new(connect_as(certs, who, port).await)
}

async fn watch(client: &mut WatchlistClient<tonic::transport::Channel>, cursor: &str) -> Events {
    client
        .watch_disconnections(pb::WatchDisconnectionsRequest {
            cursor: cursor.to_owned(),
        })
        .await
        .expect("watch")
        .into_inner()
}

fn snapshot(sequence: u64, rows: &[(&str, String)]) -> FileSpec<'static> {
    let rows: Vec<(&str, &str)> = rows.iter().map(|(n, d)| (*n, d.as_str())).collect();
    FileSpec::snapshot(sequence, &days_ago(0), "2021-01-27", &["+1"], &rows)
}

fn delta(sequence: u64, rows: &[(&str, String)]) -> FileSpec<'static> {
    let rows: Vec<(&str, &str)> = rows.iter().map(|(n, d)| (*n, d.as_str())).collect();
    FileSpec::delta(sequence, &days_ago(0), &rows)
}

/// Asserts `event` is the register's `id` for `number` disconnected
/// `disconnected` days ago (reissue 45 days later).
fn assert_register_event(event: &pb::DisconnectionEvent, id: &str, number: &str, disconnected: i32) {
    assert_eq!(
        (event.event_id.as_str(), event.phone_number.as_str()),
        (id, number)
    );
    assert_eq!(event.source, REGISTER_SOURCE);
    assert_eq!(event.kind, DisconnectionEventKind::Disconnected as i32);
    assert_eq!(event.disconnect_date, days_ago(disconnected));
    assert_eq!(
        event.earliest_reissue_date,
        days_ago(disconnected - 45),
        "the register's 45 days of quarantine"
    );
}

/// Waits until the register mark of `register` says `sequence` (it moves
/// right after the file's events are durable).
async fn marked(register: &Path, sequence: u64) {
    let path = register.join(MARK_FILE);
    let want = format!("{sequence}\n");
    support::poll::eventually(&format!("the mark is at {sequence}"), async || {
        std::fs::read_to_string(&path).is_ok_and(|text| text == want)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_register_files_reach_the_watching_platform_only_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = dev_certs(dir.path());
    std::fs::write(dir.path().join("watch.key"), "the-watch-key-of-the-register-test").expect("key");
    let register = dir.path().join("register");
    std::fs::create_dir(&register).expect("register dir");
    // The first snapshot is the baseline: no events.
    snapshot(1, &[(X, days_ago(100)), (Y, days_ago(100))]).write(&register, "snapshot-000001");

    let (server, port) = serve(dir.path(), &register);
    let mut a = watchlist(&certs, "platform-a", port).await;
    marked(&register, 1).await;
    let mut b = watchlist(&certs, "platform-b", port).await;
    for (client, numbers) in [(&mut a, vec![X]), (&mut b, vec![Y, Z])] {
        client
            .add_watches(pb::AddWatchesRequest {
                phone_numbers: numbers.into_iter().map(str::to_owned).collect(),
            })
            .await
            .expect("AddWatches");
    }
    let mut a_events = watch(&mut a, "").await;

    // A delta while it runs: X moves later (position 0 of the sorted
    // records), W (unwatched) is new.
    delta(2, &[(X, days_ago(10)), (W, days_ago(10))]).write(&register, "delta-000002");
    assert_register_event(&next(&mut a_events).await, "register:2:0", X, 10);
    // A snapshot while it runs: X moves again, Y (B's) unchanged.
    snapshot(3, &[(X, days_ago(5)), (Y, days_ago(100)), (W, days_ago(10))])
        .write(&register, "snapshot-000003");
    let moved = next(&mut a_events).await;
    assert_register_event(&moved, "register:3:0", X, 5);
    marked(&register, 3).await;

    // Down (SIGKILL); a delta arrives meanwhile: the start diffs it.
    server.signal("KILL");
    drop((server, a_events));
    delta(4, &[(X, days_ago(2))]).write(&register, "delta-000004");
    let (server, port) = serve(dir.path(), &register);
    let mut a = watchlist(&certs, "platform-a", port).await;
    let mut a_events = watch(&mut a, &moved.cursor).await;
    let resumed = next(&mut a_events).await;
    assert_register_event(&resumed, "register:4:0", X, 2);
    marked(&register, 4).await;

    // Down again (SIGTERM); a snapshot arrives meanwhile: the start
    // rebuilds the generation of the last run (snapshot 3, delta 4) and
    // diffs the snapshot against it. X moves, Z (B's) is new, Y and W stay.
    let mut server = server;
    server.signal("TERM");
    server.0.wait().expect("serve exits on SIGTERM");
    drop((server, a_events));
    snapshot(
        5,
        &[
            (X, days_ago(1)),
            (Y, days_ago(100)),
            (Z, days_ago(1)),
            (W, days_ago(10)),
        ],
    )
    .write(&register, "snapshot-000005");
    let (_server, port) = serve(dir.path(), &register);
    let mut a = watchlist(&certs, "platform-a", port).await;
    let mut a_events = watch(&mut a, &resumed.cursor).await;
    assert_register_event(&next(&mut a_events).await, "register:5:0", X, 1);
    marked(&register, 5).await;

    // From the oldest event held: each file's event once, whatever the
    // restarts (none appended again by a start).
    let mut everything = watch(&mut a, "oldest").await;
    let mut ids = Vec::new();
    while ids.last().map(String::as_str) != Some("register:5:0") {
        ids.push(next(&mut everything).await.event_id);
    }
    assert_eq!(
        ids,
        ["register:2:0", "register:3:0", "register:4:0", "register:5:0"]
    );
    // Platform B heard of nothing before Z: not X, W (not on its list), nor
    // Y (on its list, never moved).
    let mut b = watchlist(&certs, "platform-b", port).await;
    let mut b_events = watch(&mut b, "oldest").await;
    assert_register_event(&next(&mut b_events).await, "register:5:2", Z, 1);
}

fn event(id: &str, number: u64, day: u16) -> Event {
    let date = Date::from_days(i32::from(day));
    Event {
        event_id: id.to_owned(),
        number: PhoneNumber::from_value(number).expect("number"),
        disconnect_date: date,
        earliest_reissue_date: date.add_days(45),
        source: REGISTER_SOURCE.to_owned(),
        kind: EventKind::Disconnected,
        accepted_unix_ms: 1,
    }
}

/// Every register event id in `log`, oldest first.
async fn register_ids(log: &EmbeddedLog) -> Vec<String> {
    let got = log
        .read_after(0, None, 1000, std::time::Duration::ZERO)
        .await
        .expect("read");
    got.into_iter()
        .filter(|(_, e)| e.source == REGISTER_SOURCE)
        .map(|(_, e)| e.event_id)
        .collect()
}

/// A store rebuilt from snapshot 1 (quietly), appending through a mark
/// opened on `dir`'s journal.
async fn restart(
    dir: &Path,
) -> (
    Arc<EmbeddedLog>,
    Arc<RegisterMark>,
    EventingStore<Arc<EmbeddedStore>>,
) {
    let log = Arc::new(EmbeddedLog::open(dir).expect("journal"));
    let mark = Arc::new(RegisterMark::open(dir, &log).expect("mark"));
    let store = Arc::new(EmbeddedStore::new());
    let first = Records::from_unsorted([(12_015_550_001, 20_000)]).expect("records");
    store
        .apply_snapshot(&snap(1, 20_100), &first, None)
        .await
        .expect("snapshot 1");
    let eventing = EventingStore::new(store, AnyLog::Embedded(log.clone())).with_mark(mark.clone());
    (log, mark, eventing)
}

#[tokio::test]
async fn the_mark_resumes_a_file_cut_short_and_skips_what_it_covers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mark_file = dir.path().join(MARK_FILE);
    // Delta 2: three records that each add or move a disconnect.
    let two = Records::from_unsorted([
        (12_015_550_001, 20_005),
        (12_015_550_002, 20_001),
        (12_015_550_003, 20_002),
    ])
    .expect("records");
    // The last run: snapshot 1 marked, delta 2's first event appended,
    // then a crash before the rest and before the mark moved.
    std::fs::write(&mark_file, "1\n").expect("mark");
    EmbeddedLog::open(dir.path())
        .expect("journal")
        .append(&[event("register:2:0", 12_015_550_001, 20_005)])
        .await
        .expect("append");

    let (log, mark, store) = restart(dir.path()).await;
    assert_eq!(mark.through(), Some(1));
    assert!(store.is_quiet(1) && !store.is_quiet(2));
    store
        .apply_delta(&delta_write(2, 20_101), &two)
        .await
        .expect("delta 2");
    assert_eq!(
        register_ids(&log).await,
        ["register:2:0", "register:2:1", "register:2:2"],
        "the rest of delta 2, nothing twice"
    );
    assert_eq!(mark.through(), Some(2));
    assert_eq!(std::fs::read_to_string(&mark_file).expect("mark"), "2\n");
    drop((log, mark, store));

    // The next start: delta 2 is under the mark (applied without events),
    // delta 3 is new.
    let (log, mark, store) = restart(dir.path()).await;
    store
        .apply_delta(&delta_write(2, 20_101), &two)
        .await
        .expect("delta 2 again");
    let three = Records::from_unsorted([(12_015_550_002, 20_009)]).expect("records");
    store
        .apply_delta(&delta_write(3, 20_102), &three)
        .await
        .expect("delta 3");
    assert_eq!(
        register_ids(&log).await,
        ["register:2:0", "register:2:1", "register:2:2", "register:3:0"]
    );
    assert_eq!(mark.through(), Some(3));
    drop((log, mark, store));

    // Without a mark (removed: a new baseline), the journal's old register
    // events hold nothing back, and a bad mark refuses to open.
    std::fs::remove_file(&mark_file).expect("remove mark");
    let log = EmbeddedLog::open(dir.path()).expect("journal");
    let mark = RegisterMark::open(dir.path(), &log).expect("mark");
    assert_eq!(mark.through(), None);
    mark.baseline(7).await.expect("baseline");
    assert_eq!(mark.through(), Some(7));
    mark.baseline(9).await.expect("baseline again");
    assert_eq!(mark.through(), Some(7), "a baseline never moves a mark");
    std::fs::write(&mark_file, "seven").expect("bad mark");
    let err = RegisterMark::open(dir.path(), &log).expect_err("a bad mark");
    assert!(
        err.to_string().contains("does not hold a register sequence"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_append_holds_the_mark_and_the_next_start_appends() {
    use reassigned::federation::log::RedisLog;
    use reassigned::store::RedisStore;
    use reassigned::store::redis::RedisOptions;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join(MARK_FILE), "1\n").expect("mark");
    // A log that refuses every append: Redis without AOF (not durable).
    let redis = support::redis::RedisServer::start();
    let refusing = RedisLog::open(
        &RedisStore::connect(&redis.url(), RedisOptions::default())
            .await
            .expect("connect"),
    )
    .await;
    let (log, mark, store) = restart(dir.path()).await;
    let store =
        EventingStore::new(Arc::clone(store.inner()), AnyLog::Redis(refusing)).with_mark(mark.clone());
    let two = Records::from_unsorted([(12_015_550_002, 20_001)]).expect("records");
    let three = Records::from_unsorted([(12_015_550_003, 20_002)]).expect("records");
    store
        .apply_delta(&delta_write(2, 20_101), &two)
        .await
        .expect("the import stands");
    store
        .apply_delta(&delta_write(3, 20_102), &three)
        .await
        .expect("the import stands");
    assert_eq!(store.inner().cached_meta().map(|m| m.sequence), Some(3));
    assert_eq!(mark.through(), Some(1), "no events, no mark");
    assert!(register_ids(&log).await.is_empty());
    drop((log, mark, store));

    // The next start appends both files' events.
    let (log, mark, store) = restart(dir.path()).await;
    for (sequence, as_of, records) in [(2, 20_101, &two), (3, 20_102, &three)] {
        store
            .apply_delta(&delta_write(sequence, as_of), records)
            .await
            .expect("delta");
    }
    assert_eq!(register_ids(&log).await, ["register:2:0", "register:3:0"]);
    assert_eq!(mark.through(), Some(3));
}
