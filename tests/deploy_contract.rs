//! The deploy kit's contract, without a Docker engine or a cluster: every
//! service of `deploy/compose.yaml` and the containers of the Kubernetes
//! manifests (`deploy/k8s`, base and both overlays, rendered with `kubectl
//! kustomize`) run as this project's binary with their own command,
//! arguments and environment, over the image's `ENTRYPOINT`, `CMD`, `ENV`
//! and `USER` read from `deploy/Dockerfile`. Paths inside the container are
//! rewritten to a temporary directory, ports to free ports, service hosts to
//! a real redis-server (or Redis Cluster) of the harness. Each run asserts
//! that the server gets ready (its health check, its probes), answers a
//! CheckNumber with a token, and that the register was applied.
//!
//! The image's uid (10001) is used when the test runs as root; otherwise the
//! test says so and runs the processes as the current user.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use reassigned::api::pb::reassigned_numbers_client::ReassignedNumbersClient;
use reassigned::api::pb::{CheckNumberRequest, ReassignmentStatus};
use reassigned::cli::token::{IssuerKey, claims_for_cert};
use reassigned::identity::scope;
use reassigned::server::admin;
use serde_norway::Value;
use support::bin::{Killed, bin, free_port};
use support::poll::eventually;
use support::redis::RedisServer;
use support::redis_cluster::RedisCluster;
use support::server::Bearer;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// The image's binary, as the Dockerfile installs it.
const IMAGE_BIN: &str = "/usr/local/bin/reassigned";

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(path)
}

/// The strings of a YAML sequence (or one string).
fn strings(value: &Value) -> Vec<String> {
    match value {
        Value::Sequence(items) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        Value::String(s) => vec![s.clone()],
        _ => Vec::new(),
    }
}

/// A YAML scalar as a string (numbers and booleans too).
fn scalar(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => panic!("not a scalar: {other:?}"),
    }
}

/// What the runtime stage of `deploy/Dockerfile` sets.
struct Image {
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    env: Vec<(String, String)>,
    uid: u32,
    gid: u32,
    healthcheck: Vec<String>,
    /// Directories a `RUN ... chown` gives to a user (the mount points).
    owned_dirs: Vec<String>,
}

impl Image {
    fn read() -> Self {
        let text = std::fs::read_to_string(deploy("Dockerfile")).expect("read the Dockerfile");
        let joined = text.replace("\\\n", " ");
        let stage = joined
            .rsplit_once("\nFROM ")
            .map(|(_, last)| last)
            .expect("a runtime stage");
        let json = |rest: &str| -> Vec<String> {
            serde_json::from_str(rest.trim()).unwrap_or_else(|e| panic!("exec form expected: {rest}: {e}"))
        };
        let mut image = Image {
            entrypoint: Vec::new(),
            cmd: Vec::new(),
            env: Vec::new(),
            uid: 0,
            gid: 0,
            healthcheck: Vec::new(),
            owned_dirs: Vec::new(),
        };
        for line in stage.lines().map(str::trim).filter(|l| !l.starts_with('#')) {
            let (instruction, rest) = line.split_once(' ').unwrap_or((line, ""));
            match instruction {
                "ENTRYPOINT" => image.entrypoint = json(rest),
                "CMD" => image.cmd = json(rest),
                "ENV" => image.env.extend(rest.split_whitespace().map(|pair| {
                    let (k, v) = pair.split_once('=').expect("ENV KEY=VALUE");
                    (k.to_owned(), v.to_owned())
                })),
                "USER" => {
                    let (uid, gid) = rest.trim().split_once(':').expect("USER uid:gid");
                    image.uid = uid.parse().expect("numeric uid");
                    image.gid = gid.parse().expect("numeric gid");
                }
                "RUN" => {
                    for command in rest.split("&&") {
                        let words: Vec<&str> = command.split_whitespace().collect();
                        if words.first() == Some(&"chown") {
                            image
                                .owned_dirs
                                .extend(words.iter().skip(2).map(|w| (*w).to_owned()));
                        }
                    }
                }
                "HEALTHCHECK" => {
                    let (_, cmd) = rest.split_once(" CMD ").expect("HEALTHCHECK ... CMD [...]");
                    image.healthcheck = json(cmd);
                }
                _ => {}
            }
        }
        assert_eq!(image.entrypoint, [IMAGE_BIN], "the image runs the binary");
        assert_ne!(image.uid, 0, "the image runs as a non-root user");
        image
    }
}

/// Whether processes can run as the image's user here: the test runs as
/// root, and that user can reach the binary (every parent directory
/// world-searchable, as the image's `/usr/local/bin` is).
fn can_set_uid(image: &Image) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    if !rustix::process::geteuid().is_root() {
        println!(
            "deploy contract: not root, so the processes run as the current user, not as the image's uid {} \
             (the uid part is skipped)",
            image.uid
        );
        return false;
    }
    let binary = Path::new(env!("CARGO_BIN_EXE_reassigned"));
    let hidden = binary
        .ancestors()
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o001 == 0));
    if let Some(dir) = hidden {
        println!(
            "deploy contract: uid {} cannot reach the binary ({} is not world-searchable), so the processes \
             run as the current user (the uid part is skipped)",
            image.uid,
            dir.display()
        );
        return false;
    }
    true
}

/// A container's view of the machine, mapped onto this test's: mounts onto
/// directories, ports onto free ports, service hosts onto the harness.
#[derive(Default, Clone)]
struct Sandbox {
    /// Container path -> host directory (longest first when rewriting).
    mounts: Vec<(String, PathBuf)>,
    /// Container port -> free port on 127.0.0.1.
    ports: BTreeMap<u16, u16>,
    /// `host:port` of a service -> `127.0.0.1:port` of the harness.
    hosts: BTreeMap<String, String>,
    /// Run as this uid/gid (`None`: the current user).
    user: Option<(u32, u32)>,
}

impl Sandbox {
    fn port(&mut self, container: u16) -> u16 {
        *self.ports.entry(container).or_insert_with(free_port)
    }

    /// `value` as this machine sees it.
    fn rewrite(&self, value: &str) -> String {
        if value == IMAGE_BIN {
            return env!("CARGO_BIN_EXE_reassigned").to_owned();
        }
        let mut out = value.to_owned();
        for (from, to) in &self.hosts {
            out = out.replace(&format!("//{from}"), &format!("//{to}"));
        }
        for (container, host) in &self.ports {
            for ip in ["0.0.0.0", "127.0.0.1"] {
                out = out.replace(&format!("{ip}:{container}"), &format!("127.0.0.1:{host}"));
            }
        }
        let mut mounts = self.mounts.clone();
        mounts.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
        for (path, dir) in &mounts {
            if out == *path || out.starts_with(&format!("{path}/")) {
                return format!("{}{}", dir.display(), &out[path.len()..]);
            }
        }
        out
    }

    /// The host directory of container path `path`.
    fn host_path(&self, path: &str) -> PathBuf {
        PathBuf::from(self.rewrite(path))
    }

    /// A command for `program args` with `env`, rewritten, as the image's user.
    fn command(&self, program_and_args: &[String], env: &[(String, String)]) -> Command {
        let (program, args) = program_and_args.split_first().expect("a command");
        assert_eq!(
            program, IMAGE_BIN,
            "only the image's binary runs here: {program_and_args:?}"
        );
        let mut cmd = bin();
        cmd.args(args.iter().map(|a| self.rewrite(a)));
        for (k, v) in env {
            cmd.env(k, self.rewrite(v));
        }
        if let Some((uid, gid)) = self.user {
            use std::os::unix::process::CommandExt as _;
            cmd.uid(uid).gid(gid);
        }
        cmd
    }
}

/// A directory for a volume, owned by the image's user where it can be set
/// (as the Dockerfile's mount points are, which new volumes copy).
fn volume_dir(root: &Path, name: &str, user: Option<(u32, u32)>) -> PathBuf {
    let dir = root.join("volumes").join(name);
    std::fs::create_dir_all(&dir).expect("volume dir");
    if let Some((uid, gid)) = user {
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).expect("chown volume");
    }
    dir
}

/// A temporary root that the image's user can traverse.
fn temp_root() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt as _;
    let root = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    root
}

/// Runs `cmd` to completion; fails the test with its output unless it succeeded.
fn run_ok(what: &str, cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({cmd:?}):\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A number of the register in `dir` (its snapshot) and its disconnect date:
/// asked with that date, a mirror that applied the register says REASSIGNED.
fn sample_hit(dir: &Path) -> (String, String) {
    for entry in std::fs::read_dir(dir).expect("register dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let manifest = reassigned::import::Manifest::load(&path).expect("manifest");
        if manifest.kind != reassigned::import::Kind::Snapshot {
            continue;
        }
        let records = reassigned::import::read_records(&manifest, &mut reassigned::import::NoProgress)
            .expect("records");
        let (number, date) = records.iter().next().expect("a record");
        return (number.to_string(), date.to_string());
    }
    panic!("no snapshot in {}", dir.display())
}

/// What a client needs to call the running server.
struct Client<'a> {
    grpc_port: u16,
    server_name: &'a str,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    issuer_key: PathBuf,
    issuer: String,
    audience: String,
    /// A token made elsewhere (e.g. by the compose file's documented
    /// command); `None`: minted here with `issuer_key`.
    token: Option<String>,
}

impl Client<'_> {
    /// Asserts that the server answers `number` (disconnected on `date`) as
    /// REASSIGNED to a platform-a call with a certificate-bound token.
    async fn assert_reassigned(&self, number: &str, date: &str) {
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let cert_pem = read(&self.cert);
        let token = self.token.clone().unwrap_or_else(|| {
            let key = IssuerKey::from_pem(&read(&self.issuer_key), None).expect("issuer key");
            let claims = claims_for_cert(
                &cert_pem,
                scope::ALL,
                Duration::from_secs(600),
                &self.issuer,
                &self.audience,
            )
            .expect("claims");
            key.mint(&claims).expect("mint")
        });
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&self.ca)))
            .identity(Identity::from_pem(cert_pem, read(&self.key)))
            .domain_name(self.server_name);
        let channel = Endpoint::from_shared(format!("https://127.0.0.1:{}", self.grpc_port))
            .expect("endpoint")
            .tls_config(tls)
            .expect("tls")
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connect as {}: {e:?}", self.server_name));
        let mut client = ReassignedNumbersClient::new(InterceptedService::new(channel, Bearer::new(&token)));
        let answer = client
            .check_number(CheckNumberRequest {
                phone_number: number.to_owned(),
                since: date.to_owned(),
                ..Default::default()
            })
            .await
            .expect("CheckNumber with a token")
            .into_inner();
        assert_eq!(
            answer.status,
            ReassignmentStatus::Reassigned as i32,
            "the register was applied: {answer:?}"
        );
    }
}

/// The value of `key` in `env` (the last one wins, as in a container);
/// fails the test, naming `what`, if it is not set.
fn env_value(env: &[(String, String)], key: &str, what: &str) -> String {
    env.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("{what} sets {key}"))
}

/// Waits until `GET path` on 127.0.0.1:`port` answers 200.
async fn http_ok(port: u16, path: &str) {
    let mut last = (0, String::new());
    eventually(&format!("GET {path} on port {port} is 200"), async || {
        last = admin::get(&format!("127.0.0.1:{port}"), path, Duration::from_secs(3))
            .await
            .unwrap_or_default();
        last.0 == 200
    })
    .await;
}

/// Waits until the health check command `check` exits 0.
async fn healthy(check: Command) {
    let check = std::sync::Arc::new(std::sync::Mutex::new(check));
    eventually("the health check passes", async || {
        let check = check.clone();
        tokio::task::spawn_blocking(move || {
            let mut cmd = check.lock().unwrap_or_else(|p| p.into_inner());
            cmd.stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .await
        .unwrap_or(false)
    })
    .await;
}

/// Spawns a long-running service.
fn spawn(what: &str, mut cmd: Command) -> Killed {
    Killed(
        cmd.stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{what}: cannot start: {e}")),
    )
}

// ---------------------------------------------------------------- compose

fn compose_env(service: &Value) -> Vec<(String, String)> {
    match service.get("environment") {
        Some(Value::Mapping(map)) => map.iter().map(|(k, v)| (scalar(k), scalar(v))).collect(),
        Some(Value::Sequence(list)) => list
            .iter()
            .map(|item| {
                let s = scalar(item);
                let (k, v) = s.split_once('=').unwrap_or((&s, ""));
                (k.to_owned(), v.to_owned())
            })
            .collect(),
        _ => Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_file_starts_syncs_and_answers() {
    let image = Image::read();
    let compose: Value =
        serde_norway::from_str(&std::fs::read_to_string(deploy("compose.yaml")).expect("read compose.yaml"))
            .expect("compose.yaml is YAML");
    let services = compose["services"].as_mapping().expect("services");
    let root = temp_root();
    let user = can_set_uid(&image).then_some((image.uid, image.gid));

    // Redis: the harness's, with the compose file's arguments.
    let redis_service = &compose["services"]["redis"];
    let redis_args = strings(&redis_service["command"]);
    assert_eq!(redis_args.first().map(String::as_str), Some("redis-server"));
    let redis_extra: Vec<&str> = redis_args[1..].iter().map(String::as_str).collect();
    assert!(
        redis_extra.windows(2).any(|w| w == ["--appendonly", "yes"]),
        "Redis keeps an AOF"
    );
    let redis = RedisServer::start_with(&redis_extra);

    let mut base = Sandbox {
        user,
        ..Sandbox::default()
    };
    base.hosts
        .insert("redis:6379".into(), format!("127.0.0.1:{}", redis.port));
    // Every named volume gets a directory; each service mounts its own.
    let sandbox_of = |service: &Value, base: &Sandbox| {
        let mut sandbox = base.clone();
        for volume in strings(&service["volumes"]) {
            let mut parts = volume.split(':');
            let (name, path) = (parts.next().expect("source"), parts.next().expect("target"));
            assert!(
                !name.starts_with('.'),
                "bind mounts need host files: use named volumes ({volume})"
            );
            // A new named volume copies its mount point: owned by the
            // image's user only where the Dockerfile chowns it.
            let owner = user.filter(|_| image.owned_dirs.iter().any(|d| d == path));
            sandbox
                .mounts
                .push((path.to_owned(), volume_dir(root.path(), name, owner)));
        }
        sandbox
    };
    let ours = |service: &Value| service.get("build").is_some();
    let command_of = |service: &Value| -> Vec<String> {
        let entrypoint = service
            .get("entrypoint")
            .map(strings)
            .unwrap_or_else(|| image.entrypoint.clone());
        let args = service
            .get("command")
            .map(strings)
            .unwrap_or_else(|| image.cmd.clone());
        [entrypoint, args].concat()
    };
    let env_of = |service: &Value| [image.env.clone(), compose_env(service)].concat();

    // One-shot services first (others wait for them to complete), in order.
    let one_shot = |name: &str| {
        services
            .values()
            .any(|s| s["depends_on"][name]["condition"].as_str() == Some("service_completed_successfully"))
    };
    let mut long_running = Vec::new();
    for (name, service) in services {
        let name = name.as_str().expect("service name");
        if !ours(service) {
            continue;
        }
        if one_shot(name) {
            let sandbox = sandbox_of(service, &base);
            run_ok(name, &mut sandbox.command(&command_of(service), &env_of(service)));
            // Idempotent: it runs again on every `up`.
            run_ok(
                &format!("{name} (again)"),
                &mut sandbox.command(&command_of(service), &env_of(service)),
            );
        } else {
            long_running.push((name, service));
        }
    }

    let mut children = Vec::new();
    let mut server = None;
    let mut sync_admin = Vec::new();
    for (name, service) in long_running {
        let mut sandbox = sandbox_of(service, &base);
        for port in strings(&service["ports"]) {
            let container: u16 = port
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .expect("port");
            sandbox.port(container);
        }
        let env = env_of(service);
        let command = command_of(service);
        if command.get(1).map(String::as_str) == Some("serve") {
            for (_, value) in &env {
                if let Some(container) = value.strip_prefix("0.0.0.0:").and_then(|p| p.parse().ok()) {
                    sandbox.port(container);
                }
            }
            server = Some((name, service, sandbox.clone(), env.clone()));
        }
        if command.get(1).map(String::as_str) == Some("sync")
            && let Some((_, listen)) = env.iter().find(|(k, _)| k == "REASSIGNED_SYNC_ADMIN_LISTEN")
        {
            let container: u16 = listen
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .expect("the sync's admin port");
            sync_admin.push((name, sandbox.port(container)));
        }
        children.push((
            name,
            command.clone(),
            spawn(name, sandbox.command(&command, &env)),
        ));
    }
    let (name, service, sandbox, env) = server.expect("a service runs `serve`");
    let lookup = |key: &str| env_value(&env, key, name);

    // Ready: the compose health check (and the image's) exits 0.
    let health = strings(&service["healthcheck"]["test"]);
    assert_eq!(
        health.first().map(String::as_str),
        Some("CMD"),
        "exec-form health check"
    );
    assert_eq!(
        health[1..],
        image.healthcheck[..],
        "compose and image check health alike"
    );
    healthy(sandbox.command(&health[1..], &[])).await;
    let admin_port = sandbox.ports[&9090];
    http_ok(admin_port, "/readyz").await;

    // A platform calls `server` by its service name, with a token.
    let keys = sandbox.host_path(&lookup("REASSIGNED_JWKS"));
    let certs = sandbox.host_path(&lookup("REASSIGNED_CLIENT_CA"));
    let certs = certs.parent().expect("certs dir");
    let register = base_register(&root);
    let (number, date) = sample_hit(&register);
    // The header's token command, run as written in the server's container.
    let header = std::fs::read_to_string(deploy("compose.yaml")).expect("read compose.yaml");
    let marker = format!("run --rm --no-deps {name} ");
    let token_line = header
        .lines()
        .take_while(|l| l.starts_with('#'))
        .find(|l| l.contains("TOKEN=$(") && l.contains(&marker))
        .expect("the header says how to mint a token");
    let args: Vec<String> = token_line
        .split_once(&marker)
        .map(|(_, rest)| rest.trim_end().trim_end_matches(')'))
        .expect("args")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let out = sandbox
        .command(&[image.entrypoint.clone(), args].concat(), &env)
        .output()
        .expect("run the header's token command");
    assert!(out.status.success(), "{token_line}: {out:?}");
    let token = String::from_utf8(out.stdout).expect("utf-8").trim().to_owned();
    Client {
        grpc_port: sandbox.ports[&50051],
        server_name: name,
        ca: certs.join("ca.pem"),
        cert: certs.join("platform-a.pem"),
        key: certs.join("platform-a.key"),
        issuer_key: keys.with_file_name("issuer.key"),
        issuer: lookup("REASSIGNED_TOKEN_ISSUER"),
        audience: lookup("REASSIGNED_TOKEN_AUDIENCE"),
        token: Some(token),
    }
    .assert_reassigned(&number, &date)
    .await;
    // The periodic sync's own admin listener: alive, and its metrics say it
    // applied the register.
    for (name, port) in sync_admin {
        http_ok(port, "/livez").await;
        let addr = format!("127.0.0.1:{port}");
        eventually(&format!("{name}'s metrics report a good run"), async || {
            let (status, text) = admin::get(&addr, "/metrics", Duration::from_secs(3))
                .await
                .unwrap_or_default();
            status == 200
                && text
                    .lines()
                    .filter_map(|l| l.strip_prefix("reassigned_sync_runs_total{result=\"ok\"} "))
                    .any(|n| n.parse::<f64>().is_ok_and(|n| n >= 1.0))
        })
        .await;
    }
    // A periodic sync waiting for its next run stops cleanly on SIGTERM
    // (`docker compose stop`), exit status 0.
    for (name, command, mut child) in children {
        if !command.iter().any(|a| a == "--every") {
            continue;
        }
        child.signal("TERM");
        let mut status = None;
        eventually(&format!("{name} exits after SIGTERM"), async || {
            status = child.0.try_wait().expect("wait");
            status.is_some()
        })
        .await;
        assert!(status.is_some_and(|s| s.success()), "{name}: {status:?}");
    }
}

/// The `register` volume of the compose run.
fn base_register(root: &tempfile::TempDir) -> PathBuf {
    root.path().join("volumes").join("register")
}

// ------------------------------------------------------------- kubernetes

/// The objects of a kustomization, rendered by `kubectl kustomize`; `None`
/// (with a message) when kubectl is not installed.
fn render(kustomization: &str) -> Option<Vec<Value>> {
    let out = match Command::new("kubectl")
        .args(["kustomize"])
        .arg(deploy(kustomization))
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            println!(
                "deploy contract: kubectl not available ({e}): {kustomization} not run (CI installs it)"
            );
            return None;
        }
    };
    assert!(
        out.status.success(),
        "kubectl kustomize {kustomization}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    Some(
        serde_norway::Deserializer::from_str(&text)
            .map(|doc| Value::deserialize(doc).expect("a YAML object"))
            .collect(),
    )
}

use serde::Deserialize as _;

fn object<'a>(objects: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    objects
        .iter()
        .find(|o| o["kind"].as_str() == Some(kind) && o["metadata"]["name"].as_str() == Some(name))
}

fn of_kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects
        .iter()
        .filter(|o| o["kind"].as_str() == Some(kind))
        .collect()
}

/// A container's environment: the image's, its `envFrom` ConfigMaps, its `env`.
fn container_env(objects: &[Value], container: &Value, image: &Image) -> Vec<(String, String)> {
    let mut env = image.env.clone();
    if let Value::Sequence(sources) = &container["envFrom"] {
        for source in sources {
            let name = source["configMapRef"]["name"]
                .as_str()
                .expect("envFrom a ConfigMap");
            let map = object(objects, "ConfigMap", name).unwrap_or_else(|| panic!("ConfigMap {name}"));
            for (k, v) in map["data"].as_mapping().expect("data") {
                env.push((scalar(k), scalar(v)));
            }
        }
    }
    if let Value::Sequence(vars) = &container["env"] {
        for var in vars {
            env.push((scalar(&var["name"]), scalar(&var["value"])));
        }
    }
    env
}

/// The pod's user (if it can be set here) and the mounts of `container`:
/// Secrets and PVCs as directories of `root`, filled by `fill(kind, name, dir)`.
fn pod_sandbox(pod: &Value, container: &Value, base: &Sandbox, root: &Path) -> Sandbox {
    let mut sandbox = base.clone();
    let security = &pod["securityContext"];
    assert_eq!(
        security["runAsNonRoot"].as_bool(),
        Some(true),
        "pods run as non-root"
    );
    assert_eq!(
        security["seccompProfile"]["type"].as_str(),
        Some("RuntimeDefault"),
        "seccomp RuntimeDefault"
    );
    let csec = &container["securityContext"];
    assert_eq!(
        csec["readOnlyRootFilesystem"].as_bool(),
        Some(true),
        "read-only root fs"
    );
    assert_eq!(csec["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(strings(&csec["capabilities"]["drop"]), ["ALL"]);
    if let Some((_, gid)) = sandbox.user {
        let uid = security["runAsUser"].as_u64().expect("runAsUser") as u32;
        sandbox.user = Some((uid, gid));
    }
    let volumes = pod["volumes"].as_sequence().cloned().unwrap_or_default();
    for mount in container["volumeMounts"]
        .as_sequence()
        .cloned()
        .unwrap_or_default()
    {
        let name = mount["name"].as_str().expect("mount name");
        let volume = volumes
            .iter()
            .find(|v| v["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("volume {name}"));
        let source = volume["secret"]["secretName"]
            .as_str()
            .or_else(|| volume["persistentVolumeClaim"]["claimName"].as_str())
            .unwrap_or_else(|| panic!("volume {name}: a Secret or a PVC"));
        sandbox.mounts.push((
            mount["mountPath"].as_str().expect("mountPath").to_owned(),
            root.join("volumes").join(source),
        ));
    }
    sandbox
}

/// Runs one rendering of the manifests (`kustomization`), with `hosts`
/// mapping the Redis hosts its ConfigMap names onto the harness.
async fn kubernetes_contract(kustomization: &str, hosts: &[(String, String)]) {
    let Some(objects) = render(kustomization) else {
        return;
    };
    let image = Image::read();
    let root = temp_root();
    let user = can_set_uid(&image).then_some((image.uid, image.gid));
    let mut base = Sandbox {
        user,
        ..Sandbox::default()
    };
    base.hosts.extend(hosts.iter().cloned());

    let deployment = object(&objects, "Deployment", "reassigned").expect("the Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let service = object(&objects, "Service", "reassigned").expect("the Service");

    // The Secrets and the register PVC, made as the README says.
    let tls = volume_dir(root.path(), "reassigned-tls", None);
    let service_name = service["metadata"]["name"].as_str().expect("name");
    run_ok(
        "certs dev",
        bin()
            .args(["certs", "dev", "--out"])
            .arg(&tls)
            .args(["--san", service_name]),
    );
    let issuer = root.path().join("issuer");
    run_ok(
        "keys generate",
        bin().args(["keys", "generate", "--out"]).arg(&issuer),
    );
    let jwks = volume_dir(root.path(), "reassigned-jwks", None);
    std::fs::copy(issuer.join("jwks.json"), jwks.join("jwks.json")).expect("copy jwks");
    let register = volume_dir(root.path(), "reassigned-register", None);
    run_ok(
        "generate",
        bin()
            .args(["generate", "--records", "5000", "--seed", "3", "--out"])
            .arg(&register),
    );
    if let Some((uid, gid)) = user {
        // defaultMode 0440 and fsGroup: readable by the pod's group.
        use std::os::unix::fs::PermissionsExt as _;
        for dir in [&tls, &jwks] {
            for entry in std::fs::read_dir(dir).expect("secret dir") {
                let path = entry.expect("entry").path();
                std::os::unix::fs::chown(&path, Some(0), Some(gid)).expect("chown");
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o440)).expect("chmod");
            }
        }
        for entry in std::fs::read_dir(&register).expect("register") {
            std::os::unix::fs::chown(entry.expect("entry").path(), Some(uid), Some(gid)).expect("chown");
        }
        // fsGroup on a writable PVC: the volume's root belongs to the pod's
        // group, group-writable with setgid (the embedded store writes its
        // federation journals there).
        std::os::unix::fs::chown(&register, Some(0), Some(gid)).expect("chown register");
        std::fs::set_permissions(&register, std::fs::Permissions::from_mode(0o2775)).expect("chmod register");
    }

    // The sync CronJob (when there is one) applies the register.
    for cronjob in of_kind(&objects, "CronJob") {
        let job_pod = &cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"];
        let job = &job_pod["containers"][0];
        let sandbox = pod_sandbox(job_pod, job, &base, root.path());
        let args = [image.entrypoint.clone(), strings(&job["args"])].concat();
        run_ok(
            &format!("{kustomization}: CronJob"),
            &mut sandbox.command(&args, &container_env(&objects, job, &image)),
        );
    }

    // The server, with its ports mapped by name.
    let mut sandbox = pod_sandbox(pod, container, &base, root.path());
    let mut named = BTreeMap::new();
    for port in container["ports"].as_sequence().expect("ports") {
        let number = port["containerPort"].as_u64().expect("containerPort") as u16;
        named.insert(scalar(&port["name"]), sandbox.port(number));
    }
    let env = container_env(&objects, container, &image);
    let args = [image.entrypoint.clone(), strings(&container["args"])].concat();
    let _server = spawn(kustomization, sandbox.command(&args, &env));
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        let get = &container[probe]["httpGet"];
        let port = named[&scalar(&get["port"])];
        http_ok(port, get["path"].as_str().expect("path")).await;
    }

    // The Service, ServiceMonitor and NetworkPolicy name real ports.
    for port in service["spec"]["ports"].as_sequence().expect("service ports") {
        assert!(named.contains_key(&scalar(&port["targetPort"])), "{port:?}");
    }
    for monitor in of_kind(&objects, "ServiceMonitor") {
        let selector = monitor["spec"]["selector"]["matchLabels"]
            .as_mapping()
            .expect("selector");
        for (k, v) in selector {
            assert_eq!(
                &service["metadata"]["labels"][k], v,
                "the ServiceMonitor selects the Service"
            );
        }
        for endpoint in monitor["spec"]["endpoints"].as_sequence().expect("endpoints") {
            let name = scalar(&endpoint["port"]);
            assert!(
                service["spec"]["ports"]
                    .as_sequence()
                    .expect("ports")
                    .iter()
                    .any(|p| scalar(&p["name"]) == name),
                "ServiceMonitor port {name} is a Service port"
            );
            http_ok(named[&name], endpoint["path"].as_str().expect("path")).await;
        }
    }
    for policy in of_kind(&objects, "NetworkPolicy") {
        for rule in policy["spec"]["ingress"].as_sequence().expect("ingress") {
            for port in rule["ports"].as_sequence().expect("ports") {
                assert!(named.contains_key(&scalar(&port["port"])), "{port:?}");
            }
        }
    }

    let lookup = |key: &str| env_value(&env, key, kustomization);
    let (number, date) = sample_hit(&register);
    Client {
        grpc_port: named["grpc"],
        server_name: service_name,
        ca: tls.join("ca.pem"),
        cert: tls.join("platform-a.pem"),
        key: tls.join("platform-a.key"),
        issuer_key: issuer.join("issuer.key"),
        issuer: lookup("REASSIGNED_TOKEN_ISSUER"),
        audience: lookup("REASSIGNED_TOKEN_AUDIENCE"),
        token: None,
    }
    .assert_reassigned(&number, &date)
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_base_starts_syncs_and_answers() {
    let redis = RedisServer::start();
    kubernetes_contract(
        "k8s/base",
        &[("redis:6379".into(), format!("127.0.0.1:{}", redis.port))],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_redis_cluster_overlay_starts_syncs_and_answers() {
    let cluster = RedisCluster::start();
    let hosts: Vec<(String, String)> = cluster
        .ports()
        .iter()
        .enumerate()
        .map(|(i, port)| {
            (
                format!("redis-cluster-{i}.redis-cluster:6379"),
                format!("127.0.0.1:{port}"),
            )
        })
        .collect();
    kubernetes_contract("k8s/overlays/redis-cluster", &hosts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_embedded_overlay_loads_the_register_and_answers() {
    kubernetes_contract("k8s/overlays/embedded", &[]).await;
}
