//! The binary as an operator uses it: `certs dev`, `generate`, `sync` into a
//! real Redis, `serve` over mTLS, SIGTERM; and bad configuration refused
//! before anything is bound.

mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use reassigned::api::pb::ReassignmentStatus;
use support::bin::{
    Killed, bin, dev_certs, dev_tls_args, free_port, mirror_status, numbers_client, run, serve_dev_command,
};
use support::redis::RedisServer;
use support::server::check_request;

#[test]
fn bad_configuration_is_refused_before_binding() {
    let out = bin().args(["serve"]).output().expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--tls-cert"), "{err}");

    let dir = tempfile::tempdir().expect("tempdir");
    run(bin().args(["certs", "dev", "--out"]).arg(dir.path()));
    let certs = |f: &str| dir.path().join(f);
    let out = bin()
        .args(["serve", "--redis", "http://nope"])
        .args(dev_tls_args(dir.path()))
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("redis"));

    // a config file, overridden by a flag, shown by --dump-config
    let config = dir.path().join("reassigned.toml");
    std::fs::write(
        &config,
        format!(
            "tls_cert = {:?}\ntls_key = {:?}\nclient_ca = {:?}\ndata_dir = {:?}\nmax_batch = 10\nmax_staleness_days = 30\ntokens = false\n",
            certs("server.pem"),
            certs("server.key"),
            certs("ca.pem"),
            dir.path()
        ),
    )
    .expect("write config");
    let out = run(bin()
        .args(["serve", "--dump-config", "--max-batch", "20", "--config"])
        .arg(&config));
    let dumped = String::from_utf8_lossy(&out.stdout);
    assert!(dumped.contains("max_batch = 20"), "{dumped}");
    assert!(dumped.contains("max_staleness_days = 30"), "{dumped}");
    // The dump is a config file: read back, it dumps the same, defaults
    // written out (issue 10 relies on this).
    assert!(dumped.contains("redis_key_prefix = \"rn\""), "{dumped}");
    let again = dir.path().join("dumped.toml");
    std::fs::write(&again, dumped.as_bytes()).expect("write dump");
    let out = run(bin().args(["serve", "--dump-config", "--config"]).arg(&again));
    assert_eq!(String::from_utf8_lossy(&out.stdout), dumped);
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "max_bacth = 3\n").expect("write");
    let out = bin().args(["serve", "--config"]).arg(&bad).output().expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_bacth"));
}

#[test]
fn dev_certs_never_overwrite_and_keep_keys_private() {
    let dir = tempfile::tempdir().expect("tempdir");
    run(bin().args(["certs", "dev", "--out"]).arg(dir.path()));
    for f in [
        "ca.pem",
        "server.pem",
        "server.key",
        "platform-a.pem",
        "platform-a.key",
        "platform-b.pem",
        "platform-b.key",
    ] {
        assert!(dir.path().join(f).is_file(), "{f} missing");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("server.key"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "private key readable by others: {mode:o}");
    }
    let out = bin()
        .args(["certs", "dev", "--out"])
        .arg(dir.path())
        .output()
        .expect("run");
    assert!(!out.status.success(), "must refuse to overwrite");
}

#[tokio::test]
async fn generate_sync_serve_and_stop() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let (certs, register) = (dev_certs(dir.path()), dir.path().join("register"));
    run(bin()
        .args(["generate", "--records", "20000", "--seed", "7", "--gzip", "--out"])
        .arg(&register));
    let out = run(bin()
        .arg("sync")
        .arg(&register)
        .env("REASSIGNED_REDIS", redis.url()));
    let summary = String::from_utf8_lossy(&out.stderr).to_string();
    // a second sync applies nothing
    let again = run(bin()
        .arg("sync")
        .arg(&register)
        .env("REASSIGNED_REDIS", redis.url()));
    assert_ne!(summary, String::from_utf8_lossy(&again.stderr));

    let port = free_port();
    let server = Killed(
        serve_dev_command(&certs, port)
            .args(["--redis", &redis.url()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn serve"),
    );
    let mut client = numbers_client(&certs, port).await;
    let status = mirror_status(&mut client).await;
    assert_eq!(status.sequence, 4, "snapshot 1 and deltas 2..4 applied");
    assert!(status.record_count >= 20_000);
    assert_eq!(status.covered_prefixes, ["+1", "+86"]);

    // every hit of queries.csv asked with its own "since" answers consistently
    let queries = std::fs::read_to_string(register.join("queries.csv")).expect("queries");
    let mut reassigned = 0;
    for line in queries.lines().skip(1).take(400) {
        let (number, since) = line.split_once(',').expect("csv");
        let r = client
            .check_number(check_request(number, since))
            .await
            .expect("check")
            .into_inner();
        assert_ne!(r.status, ReassignmentStatus::Unspecified as i32);
        if r.status == ReassignmentStatus::Reassigned as i32 {
            reassigned += 1;
        }
    }
    assert!(reassigned > 0, "the query mix has hits");

    // SIGTERM: graceful stop, exit code 0, no phone number in the logs
    let mut server = server;
    server.signal("TERM");
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = server.0.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "server did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status:?}");
    let mut logs = String::new();
    if let Some(mut err) = server.0.stderr.take() {
        use std::io::Read;
        err.read_to_string(&mut logs).expect("logs");
    }
    assert!(logs.contains("SIGTERM"), "{logs}");
    for line in queries.lines().skip(1).take(400) {
        let number = line.split(',').next().unwrap_or_default();
        assert!(
            !logs.contains(&number[1..]),
            "a phone number leaked into the logs"
        );
    }
}
