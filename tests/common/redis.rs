//! Real `redis-server` processes for the shared-ledger tests: one server, or a 3-node cluster
//! made with `redis-cli --cluster create`, on free ports in a temporary folder. Killed on drop.

use super::free_port;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Whether redis-server is installed; when it is not, the tests say so and pass, unless
/// `KEYGATE_REQUIRE_REDIS` is set (CI sets it: `.ci/run` installs Redis).
pub fn available() -> bool {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os("KEYGATE_REQUIRE_REDIS").is_none(),
            "redis-server is not installed (scripts/setup-test.sh installs it)"
        );
        eprintln!("skipped: redis-server is not installed");
    }
    found
}

/// One redis-server. Its data is kept in an append-only file written on every change, so a
/// restart after `kill -9` finds it intact.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    cluster: bool,
}

impl RedisServer {
    pub fn start(dir: &Path) -> RedisServer {
        RedisServer::start_with(dir, free_port(), false)
    }

    /// A server on `port` (one picked with [`free_port`] before, say).
    pub fn start_on(dir: &Path, port: u16) -> RedisServer {
        RedisServer::start_with(dir, port, false)
    }

    fn start_with(dir: &Path, port: u16, cluster: bool) -> RedisServer {
        let dir = dir.join(format!("redis-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = RedisServer {
            child: None,
            port,
            dir,
            cluster,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let mut args: Vec<String> = [
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--daemonize",
            "no",
            "--dir",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(self.dir.display().to_string());
        if self.cluster {
            args.extend(
                [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                    "--repl-diskless-sync-delay",
                    "0",
                ]
                .map(String::from),
            );
        }
        let log = std::fs::File::create(self.dir.join("redis.log")).unwrap();
        let child = Command::new("redis-server")
            .args(&args)
            .stdout(Stdio::from(log))
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.command("PING").as_deref() != Some("+PONG") {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `redis-cli -p <port> args…`: what it printed.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Poll `redis-cli args…` until what it prints satisfies `ready`; panics with `what` past
    /// `deadline`.
    fn wait_for(&self, args: &[&str], ready: impl Fn(&str) -> bool, what: &str, deadline: Instant) {
        while !ready(&self.cli(args)) {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Send one inline command; the first line of the answer.
    pub fn command(&self, cmd: &str) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(format!("{cmd}\r\n").as_bytes()).ok()?;
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).ok()?;
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        Some(text.lines().next().unwrap_or("").to_string())
    }

    /// `kill -9` the server.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start it again on the same port and data.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// Freeze the server (SIGSTOP): connections stay open and nothing answers.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Let a paused server go on (SIGCONT).
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args([&format!("-{sig}"), &c.id().to_string()])
                .status();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.resume();
        self.kill9();
    }
}

/// A Redis Cluster of 3 primaries (and `replicas` replicas each), its slots spread by
/// `redis-cli --cluster create`.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start(dir: &Path) -> RedisCluster {
        RedisCluster::start_with_replicas(dir, 0)
    }

    pub fn start_with_replicas(dir: &Path, replicas: usize) -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..3 * (1 + replicas))
            .map(|_| RedisServer::start_with(dir, free_port(), true))
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli runs");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        for n in &nodes {
            let ok = |t: &str| t.contains("cluster_state:ok");
            n.wait_for(
                &["cluster", "info"],
                ok,
                "the cluster did not become ok",
                deadline,
            );
        }
        // Replicas that never synced cannot take over: wait for their first sync.
        for n in &nodes {
            let synced = |t: &str| t.contains("role:master") || t.contains("master_link_status:up");
            n.wait_for(
                &["info", "replication"],
                synced,
                "a replica never synced",
                deadline,
            );
        }
        RedisCluster { nodes }
    }

    /// The seed-node list for `redis_url`.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.url())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The node serving `key` as primary now (`CLUSTER KEYSLOT`, then `CLUSTER NODES`).
    pub fn primary_for(&self, key: &str) -> usize {
        let cli = |args: &[&str]| self.nodes[0].cli(args);
        let slot: u32 = cli(&["cluster", "keyslot", key]).trim().parse().unwrap();
        for line in cli(&["cluster", "nodes"]).lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 9 || !f[2].contains("master") || f[2].contains("fail") {
                continue;
            }
            let port: u16 = f[1]
                .split('@')
                .next()
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse().ok())
                .unwrap();
            let owns = f[8..].iter().any(|r| {
                let mut ends = r.split('-').map(|x| x.parse::<u32>().unwrap_or(u32::MAX));
                let lo = ends.next().unwrap_or(u32::MAX);
                let hi = ends.next().unwrap_or(lo);
                (lo..=hi).contains(&slot)
            });
            if owns {
                return self.nodes.iter().position(|n| n.port == port).unwrap();
            }
        }
        panic!("no primary serves slot {slot}");
    }
}
