//! A throwaway `redis-server` for tests: its own free port on 127.0.0.1 and
//! its own data directory, never the Redis on 6379; killed on drop.
//!
//! `stop()` shuts it down with `SHUTDOWN SAVE` and `restart()` starts it again
//! on the same port with the same directory, so the data survives a restart.
//! `pause()` / `resume()` send SIGSTOP / SIGCONT (a Redis that hangs).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::bin::free_port;

/// How long a start or a stop may take.
const DEADLINE: Duration = Duration::from_secs(15);

/// A `redis-server` child process.
pub struct RedisServer {
    /// The TCP port (on 127.0.0.1).
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    paused: bool,
    extra_args: Vec<String>,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers PING.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Like [`RedisServer::start`], with more `redis-server` arguments
    /// (e.g. `["--maxmemory", "10mb"]`); they are kept for `restart()`.
    pub fn start_with(extra_args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir for redis");
        let mut server = Self {
            port: 0,
            dir,
            child: None,
            paused: false,
            extra_args: extra_args.iter().map(|a| (*a).to_owned()).collect(),
        };
        // The port is free when asked, but another process may take it
        // before redis binds it: try a few.
        for _ in 0..5 {
            server.port = free_port();
            if server.spawn() {
                return server;
            }
        }
        panic!("redis-server did not start; log:\n{}", server.log());
    }

    /// `redis://127.0.0.1:{port}/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The process id while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// True while the process runs (paused or not).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Saves the data and stops the server (`SHUTDOWN SAVE`); waits until
    /// the process has exited.
    pub fn stop(&mut self) {
        if self.paused {
            self.resume();
        }
        let Some(mut child) = self.child.take() else {
            return;
        };
        // The server closes the connection without a reply when it exits.
        let _ = send_inline(self.port, "SHUTDOWN SAVE");
        let deadline = Instant::now() + DEADLINE;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("redis-server did not shut down in time; log:\n{}", self.log());
                }
            }
        }
    }

    /// Starts the server again on the same port and directory (stopping it
    /// first if it runs); the data saved by `stop()` is loaded back.
    pub fn restart(&mut self) {
        self.stop();
        self.respawn();
    }

    /// Starts the process again on the same port (the port may linger
    /// briefly: retried until the deadline).
    fn respawn(&mut self) {
        let deadline = Instant::now() + DEADLINE;
        while !self.spawn() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not restart on port {}; log:\n{}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the process (SIGKILL, no save) and starts it again on the same
    /// port and directory, its files as the crash left them: what survives
    /// is what Redis had made durable (AOF with `appendfsync always`).
    pub fn crash_and_restart(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.paused = false;
        self.respawn();
    }

    /// Kills the process (SIGKILL, no save) and starts it again on the same
    /// port with its data files removed: a Redis that came back empty.
    pub fn crash_and_restart_empty(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.paused = false;
        for file in ["dump.rdb", "appendonly.aof"] {
            let _ = std::fs::remove_file(self.dir.path().join(file));
        }
        let _ = std::fs::remove_dir_all(self.dir.path().join("appendonlydir"));
        self.respawn();
    }

    /// Saves the data now (`SAVE`) and returns the RDB file's bytes.
    pub fn save_rdb(&self) -> Vec<u8> {
        let reply = send_inline(self.port, "SAVE").expect("SAVE");
        assert!(reply.starts_with("+OK"), "SAVE: {reply}");
        std::fs::read(self.dir.path().join("dump.rdb")).expect("read dump.rdb")
    }

    /// Kills the process (SIGKILL) and starts it again from `rdb` (a file
    /// [`RedisServer::save_rdb`] returned earlier): a Redis that came back
    /// from an older save.
    pub fn crash_and_restart_from(&mut self, rdb: &[u8]) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.paused = false;
        std::fs::write(self.dir.path().join("dump.rdb"), rdb).expect("write dump.rdb");
        self.respawn();
    }

    /// Freezes the process (SIGSTOP): connections stay open, nothing answers.
    pub fn pause(&mut self) {
        self.signal("-STOP");
        self.paused = true;
    }

    /// Thaws the process (SIGCONT).
    pub fn resume(&mut self) {
        self.signal("-CONT");
        self.paused = false;
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    fn signal(&self, signal: &str) {
        signal_pid(self.pid().expect("redis-server is running"), signal);
    }

    /// Starts the process and waits until it answers; false if it exited
    /// (e.g. the port was taken).
    fn spawn(&mut self) -> bool {
        let dir = self.dir.path();
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .args(["--dbfilename", "dump.rdb"])
            .arg("--logfile")
            .arg(dir.join("redis.log"))
            .args(["--daemonize", "no"])
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed to run these tests");
        self.child = Some(child);
        let deadline = Instant::now() + DEADLINE;
        loop {
            if !self.is_running() {
                self.child = None;
                return false;
            }
            if send_inline(self.port, "PING").is_ok_and(|r| r.starts_with("+PONG")) {
                return true;
            }
            if Instant::now() > deadline {
                if let Some(mut c) = self.child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL works on a stopped process too.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Sends `signal` (e.g. `-STOP`) to process `pid`; fails the test if it
/// cannot be sent.
pub fn signal_pid(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(signal)
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {signal} {pid} failed");
}

/// Sends one inline command and returns the first chunk of the reply.
fn send_inline(port: u16, command: &str) -> std::io::Result<String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
    stream.set_read_timeout(Some(Duration::from_millis(500)))?;
    stream.set_write_timeout(Some(Duration::from_millis(500)))?;
    stream.write_all(format!("{command}\r\n").as_bytes())?;
    let mut buf = [0u8; 256];
    let n = stream.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}
