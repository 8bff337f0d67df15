//! A throwaway Redis Cluster for tests: three masters (and optionally
//! replicas), each a `redis-server --cluster-enabled yes` on a free port of
//! 127.0.0.1 with its own directory, joined with `redis-cli --cluster create`;
//! every process is killed on drop.
#![allow(dead_code)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};

use super::redis::signal_pid;
use std::time::{Duration, Instant};

/// How long starting the cluster may take.
const DEADLINE: Duration = Duration::from_secs(30);

/// One node of the cluster.
struct Node {
    port: u16,
    dir: tempfile::TempDir,
    child: Child,
    extra_args: Vec<String>,
}

/// A running Redis Cluster of three masters.
pub struct RedisCluster {
    nodes: Vec<Node>,
}

impl RedisCluster {
    /// Starts three nodes, creates the cluster and waits until it reports
    /// `cluster_state:ok` on every node.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Like [`RedisCluster::start`], with more `redis-server` arguments for
    /// every node (e.g. `["--sanitize-dump-payload", "yes"]`).
    pub fn start_with(extra_args: &[&str]) -> Self {
        Self::start_full(0, extra_args)
    }

    /// Three masters with `replicas` replicas each; waits until every
    /// replica has synchronised with its master.
    pub fn start_with_replicas(replicas: usize) -> Self {
        Self::start_full(replicas, &[])
    }

    /// Like [`RedisCluster::start_with_replicas`], with more `redis-server`
    /// arguments for every node (e.g. `["--cluster-node-timeout", "2000"]`).
    pub fn start_with_replicas_and(replicas: usize, extra_args: &[&str]) -> Self {
        Self::start_full(replicas, extra_args)
    }

    /// Runs `redis-cli` against node `i` and returns its output.
    pub fn cli(&self, i: usize, args: &[&str]) -> Result<String, String> {
        cli(self.nodes[i].port, args)
    }

    /// The index of the node listening on `port`.
    pub fn index_of_port(&self, port: u16) -> Option<usize> {
        self.nodes.iter().position(|n| n.port == port)
    }

    /// The port of the master that serves `key` (asked of node 0).
    pub fn master_port_of(&self, key: &str) -> u16 {
        let slot: u16 = cli(self.nodes[0].port, &["CLUSTER", "KEYSLOT", key])
            .expect("CLUSTER KEYSLOT")
            .trim()
            .parse()
            .expect("slot");
        let nodes = cli(self.nodes[0].port, &["CLUSTER", "NODES"]).expect("CLUSTER NODES");
        for line in nodes.lines() {
            let parts: Vec<&str> = line.split_whitespace().collect();
            if parts.len() < 9 || !parts[2].contains("master") || parts[2].contains("fail") {
                continue;
            }
            for range in &parts[8..] {
                let (from, to) = match range.split_once('-') {
                    Some((a, b)) => (a.parse().unwrap_or(u16::MAX), b.parse().unwrap_or(0)),
                    None => (range.parse().unwrap_or(u16::MAX), range.parse().unwrap_or(0)),
                };
                if (from..=to).contains(&slot) {
                    let addr = parts[1].split('@').next().unwrap_or_default();
                    return addr
                        .rsplit(':')
                        .next()
                        .and_then(|p| p.parse().ok())
                        .expect("port");
                }
            }
        }
        panic!("no master serves slot {slot}:\n{nodes}")
    }

    /// The node indexes of the replicas of the master on `port`.
    pub fn replicas_of(&self, port: u16) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| {
                cli(self.nodes[i].port, &["INFO", "replication"]).is_ok_and(|info| {
                    info.contains("role:slave") && info.contains(&format!("master_port:{port}"))
                })
            })
            .collect()
    }

    /// Freezes node `i` (SIGSTOP).
    pub fn pause_node(&self, i: usize) {
        signal_pid(self.nodes[i].child.id(), "-STOP");
    }

    /// Thaws node `i` (SIGCONT).
    pub fn resume_node(&self, i: usize) {
        signal_pid(self.nodes[i].child.id(), "-CONT");
    }

    /// Kills node `i` (SIGKILL, no save); it stays down.
    pub fn kill_node(&mut self, i: usize) {
        let _ = self.nodes[i].child.kill();
        let _ = self.nodes[i].child.wait();
    }

    /// Kills node `i` and starts it again on the same port and cluster
    /// config with its data files removed (it comes back empty, with its
    /// cluster identity); waits until it answers PING.
    pub fn restart_node_empty(&mut self, i: usize) {
        self.kill_node(i);
        let node = &mut self.nodes[i];
        for file in ["dump.rdb", "appendonly.aof"] {
            let _ = std::fs::remove_file(node.dir.path().join(file));
        }
        let args: Vec<&str> = node.extra_args.iter().map(String::as_str).collect();
        let deadline = Instant::now() + DEADLINE;
        loop {
            match spawn_in(node.port, &node.dir, &args) {
                Ok(child) => {
                    node.child = child;
                    if wait_until(Instant::now() + Duration::from_secs(5), || {
                        cli(node.port, &["PING"]).is_ok_and(|r| r.trim() == "PONG")
                    })
                    .is_ok()
                    {
                        return;
                    }
                }
                Err(e) => panic!("{e}"),
            }
            assert!(Instant::now() < deadline, "node {} did not restart", node.port);
        }
    }

    fn start_full(replicas: usize, extra_args: &[&str]) -> Self {
        // A port may be taken between asking and binding: try a few times.
        for attempt in 0..3 {
            match Self::try_start(replicas, extra_args) {
                Ok(cluster) => return cluster,
                Err(e) if attempt < 2 => eprintln!("redis cluster did not start ({e}); retrying"),
                Err(e) => panic!("redis cluster did not start: {e}"),
            }
        }
        unreachable!("the last attempt panics")
    }

    fn try_start(replicas: usize, extra_args: &[&str]) -> Result<Self, String> {
        let mut cluster = Self { nodes: Vec::new() };
        let ports = free_ports(3 * (1 + replicas));
        for port in ports {
            cluster.nodes.push(spawn_node(port, extra_args)?);
        }
        let deadline = Instant::now() + DEADLINE;
        for node in &cluster.nodes {
            wait_until(deadline, || {
                cli(node.port, &["PING"]).is_ok_and(|r| r.trim() == "PONG")
            })
            .map_err(|_| format!("node {} does not answer PING; log:\n{}", node.port, node.log()))?;
        }
        let addrs: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let output = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("run redis-cli --cluster create: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        for node in &cluster.nodes {
            wait_until(deadline, || {
                cli(node.port, &["CLUSTER", "INFO"]).is_ok_and(|info| info.contains("cluster_state:ok"))
            })
            .map_err(|_| format!("node {} never reported cluster_state:ok", node.port))?;
        }
        for node in &cluster.nodes {
            wait_until(deadline, || {
                cli(node.port, &["INFO", "replication"])
                    .is_ok_and(|info| info.contains("role:master") || info.contains("master_link_status:up"))
            })
            .map_err(|_| format!("replica {} never synchronised", node.port))?;
        }
        // Every node must know every slot's owner and replicas before
        // clients connect (they read the topology from one node, once).
        // A node lists a replica only once it has heard, from the replica
        // itself, of a replication offset above 0. An idle master moves
        // the offset only by its pings to its replicas (every 10 s by
        // default), and a node may go half the node timeout (7.5 s by
        // default) without a word from another. Both are shortened while
        // the topology settles (seconds saved on every start; 2 s stays
        // well above a loaded machine's pauses), and each
        // node gets its configured values back afterwards.
        let settling = [("repl-ping-replica-period", 1u64), ("cluster-node-timeout", 2000)];
        let mut configured = Vec::new();
        for node in &cluster.nodes {
            for (name, short) in settling {
                let got = cli(node.port, &["CONFIG", "GET", name])?;
                let value = got.lines().nth(1).unwrap_or_default().trim().to_owned();
                let Ok(current) = value.parse::<u64>() else {
                    return Err(format!("CONFIG GET {name}: {got:?}"));
                };
                cli(
                    node.port,
                    &["CONFIG", "SET", name, &short.min(current).to_string()],
                )?;
                configured.push((node.port, name, value));
            }
        }
        for node in &cluster.nodes {
            wait_until(deadline, || {
                cli(node.port, &["CLUSTER", "SLOTS"])
                    .is_ok_and(|s| cluster.nodes.iter().all(|n| s.contains(&n.port.to_string())))
            })
            .map_err(|_| format!("node {} does not see the whole topology", node.port))?;
        }
        for (port, name, value) in &configured {
            cli(*port, &["CONFIG", "SET", name, value])?;
        }
        Ok(cluster)
    }

    /// True if the node `i` (in [`RedisCluster::urls`] order) is a replica.
    pub fn is_replica(&self, i: usize) -> bool {
        cli(self.nodes[i].port, &["INFO", "replication"]).is_ok_and(|info| info.contains("role:slave"))
    }

    /// The node ports (masters and replicas).
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// `redis://127.0.0.1:{port}/` of every node (seed URLs for clients).
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}/", n.port))
            .collect()
    }

    /// `redis://` URL of one node (for per-node commands such as DBSIZE).
    pub fn node_url(&self, i: usize) -> String {
        format!("redis://127.0.0.1:{}/", self.nodes[i].port)
    }

    /// Freezes every node (SIGSTOP): connections stay open, nothing answers.
    pub fn pause(&mut self) {
        self.signal("-STOP");
    }

    /// Thaws every node (SIGCONT).
    pub fn resume(&mut self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        for node in &self.nodes {
            signal_pid(node.child.id(), signal);
        }
    }

    /// The logs of every node.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("--- node {} ---\n{}", n.port, n.log()))
            .collect()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            let _ = node.child.kill();
            let _ = node.child.wait();
        }
    }
}

impl Node {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_node(port: u16, extra_args: &[&str]) -> Result<Node, String> {
    let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
    let child = spawn_in(port, &dir, extra_args)?;
    Ok(Node {
        port,
        dir,
        child,
        extra_args: extra_args.iter().map(|a| (*a).to_owned()).collect(),
    })
}

fn spawn_in(port: u16, dir: &tempfile::TempDir, extra_args: &[&str]) -> Result<Child, String> {
    let path = dir.path();
    Command::new("redis-server")
        .args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1"])
        .args(["--cluster-enabled", "yes"])
        .arg("--cluster-config-file")
        .arg(path.join(format!("nodes-{port}.conf")))
        .args(["--save", ""])
        .args(["--appendonly", "no"])
        // A replica's full sync starts at once, not after Redis 7.0's 5 s
        // wait for more replicas to share a diskless transfer.
        .args(["--repl-diskless-sync-delay", "0"])
        .arg("--dir")
        .arg(path)
        .arg("--logfile")
        .arg(path.join("redis.log"))
        .args(["--daemonize", "no"])
        .args(extra_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("redis-server must be installed to run these tests: {e}"))
}

/// Runs `redis-cli -p port args...` and returns its output.
fn cli(port: u16, args: &[&str]) -> Result<String, String> {
    let output = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

fn wait_until(deadline: Instant, mut ready: impl FnMut() -> bool) -> Result<(), ()> {
    while !ready() {
        if Instant::now() > deadline {
            return Err(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Distinct free ports; a cluster node also binds `port + 10000` (the
/// cluster bus), so both must be free.
fn free_ports(count: usize) -> Vec<u16> {
    let mut ports: Vec<u16> = Vec::new();
    while ports.len() < count {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let bus_free = port
            .checked_add(10_000)
            .is_some_and(|bus| TcpListener::bind(("127.0.0.1", bus)).is_ok());
        if bus_free && !ports.contains(&port) {
            ports.push(port);
        }
    }
    ports
}
