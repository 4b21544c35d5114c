//! Test harness: a real mock upstream and a real `keygate` process on port 0, configured from
//! files in a temporary folder. The gateway is killed when the handle drops.

#![allow(dead_code)]

use keygate::mock::MockBackend;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const OK: &str = "sk-test-ok-0000000000000000000000000000000000000000";
pub const HASHED: &str = "sk-test-hashed-000000000000000000000000000000000000";
pub const DISABLED: &str = "sk-test-disabled-0000000000000000000000000000000000";
pub const EXPIRED: &str = "sk-test-expired-00000000000000000000000000000000000";
pub const IP_LOCKED: &str = "sk-test-iplocked-0000000000000000000000000000000000";
pub const MINI_ONLY: &str = "sk-test-minionly-0000000000000000000000000000000000";
pub const LIMITED_GROUP: &str = "sk-test-limited-00000000000000000000000000000000000";
pub const LOCALHOST_ONLY: &str = "sk-test-localhost-000000000000000000000000000000000";
pub const EXHAUSTED: &str = "sk-test-exhausted-000000000000000000000000000000000";
pub const UPSTREAM_SECRET: &str = "upstream-secret-xyz";
/// The admin token every test gateway gets in `KG_TEST_ADMIN_TOKEN`.
pub const ADMIN_TOKEN: &str = "kg-admin-test-token-0123456789";

/// The standard sync file: one key per situation the checks distinguish.
pub fn standard_sync() -> Value {
    let hashed =
        keygate::core::table::digest_hex(&keygate::core::table::key_digest(HASHED.as_bytes()));
    json!({
        "revision": 7,
        "quota_per_unit": 500000,
        "groups": {
            "default": {"ratio": 1.0},
            "limited": {"ratio": 1.0, "models": ["gpt-4o*"]}
        },
        "models": {
            "gpt-4o-mini": {"ratio": 0.075, "completion_ratio": 4},
            "gpt-4o": {"ratio": 1.25, "completion_ratio": 4},
            "claude-3-5-sonnet-latest": {"ratio": 1.5},
            "text-embedding-3-small": {"ratio": 0.01},
            "*": {"ratio": 1.0}
        },
        "keys": [
            {"id": 1, "name": "ok", "key": OK, "quota": 1000000},
            {"id": 2, "name": "hashed", "key_sha256": hashed, "quota": 1000000},
            {"id": 3, "name": "disabled", "key": DISABLED, "status": "disabled", "quota": 1000000},
            {"id": 4, "name": "expired", "key": EXPIRED, "expires_at": 1, "quota": 1000000},
            {"id": 5, "name": "ip locked", "key": IP_LOCKED, "allow_ips": ["203.0.113.7"], "quota": 1000000},
            {"id": 6, "name": "mini only", "key": MINI_ONLY, "models": ["gpt-4o-mini"], "quota": 1000000},
            {"id": 7, "name": "limited group", "key": LIMITED_GROUP, "group": "limited", "quota": 1000000},
            {"id": 8, "name": "localhost only", "key": LOCALHOST_ONLY, "allow_ips": ["127.0.0.0/8"], "quota": 1000000},
            {"id": 9, "name": "exhausted", "key": EXHAUSTED, "quota": 0}
        ]
    })
}

/// The keygate binary the tests run: `KEYGATE_BIN` when set, else the one cargo built for
/// this test. Builders sharing one `CARGO_TARGET_DIR` overwrite each other's
/// `target/debug/keygate` while tests run; a copy taken right after the build is safe.
pub fn keygate_bin() -> PathBuf {
    std::env::var_os("KEYGATE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_keygate")))
}

/// Options for one gateway.
pub struct Opts {
    pub sync: Value,
    /// Extra YAML lines appended to the config.
    pub extra: String,
    pub listen: String,
    /// Upstream url; default: the mock.
    pub upstream_url: Option<String>,
    pub upstream_extra: String,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            sync: standard_sync(),
            extra: String::new(),
            listen: "127.0.0.1:0".into(),
            upstream_url: None,
            upstream_extra: String::new(),
        }
    }
}

/// A running gateway process.
pub struct Gateway {
    child: Child,
    pub addr: SocketAddr,
    pub base: String,
    pub metrics: Option<String>,
    /// The admin listener's base URL, when configured.
    pub admin: Option<String>,
    pub dir: PathBuf,
}

impl Gateway {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory, KiB (`VmRSS`).
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Send a signal (`"HUP"`, `"TERM"`, …) to the gateway process.
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status();
    }

    /// The metrics exposition text.
    pub async fn metrics_text(&self) -> String {
        let m = self.metrics.clone().unwrap();
        client()
            .get(format!("{m}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Wait for the process to exit by itself.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        self.child.wait().unwrap()
    }

    /// SIGTERM, then wait for the process to exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().unwrap()
    }

    /// The gateway's stderr so far (its log and access log).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("keygate.stderr")).unwrap_or_default()
    }

    /// The usage log's records so far.
    pub fn usage_records(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.join("var/usage.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Wait until the usage log has at least `n` records.
    pub async fn wait_records(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let r = self.usage_records();
            if r.len() >= n || Instant::now() > deadline {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// GET `path` on the gateway with `key` as Bearer; status and body bytes.
    pub async fn get(&self, path: &str, key: &str) -> (u16, Vec<u8>) {
        let r = client()
            .get(format!("{}{path}", self.base))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.bytes().await.unwrap().to_vec())
    }

    /// `total_used` from `/api/usage/token/`.
    pub async fn total_used(&self, key: &str) -> i64 {
        total_used_at(&self.base, key).await
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A mock upstream plus a gateway in front of it.
pub struct Env {
    pub mock: MockBackend,
    pub gw: Gateway,
    pub dir: tempfile::TempDir,
}

impl Env {
    pub async fn start() -> Env {
        Env::with(Opts::default()).await
    }

    pub async fn with(opts: Opts) -> Env {
        let mock = MockBackend::start("127.0.0.1:0")
            .await
            .expect("mock starts");
        let dir = tempfile::tempdir().expect("tempdir");
        let url = opts
            .upstream_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", mock.addr()));
        let gw = start_gateway(dir.path(), &opts, &url);
        Env { mock, gw, dir }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.gw.base, path)
    }
}

/// The config YAML for `opts` (relative paths: they resolve against the config's folder).
pub fn config_yaml(opts: &Opts, upstream_url: &str) -> String {
    format!(
        "listen: \"{listen}\"\nthreads: 2\nmetrics_listen: \"127.0.0.1:0\"\nsync_file: keys.json\nstate_dir: var\nusage_log: var/usage.jsonl\n{body_cap}grace_period_seconds: 0\n{extra}\nupstreams:\n  - name: mock\n    url: \"{upstream_url}\"\n    api_key_env: KG_TEST_UPSTREAM_KEY\n    models: [\"gpt-*\", \"claude-*\", \"gemini-*\", \"text-embedding-*\", \"whisper-*\"]\n{uextra}",
        listen = opts.listen,
        body_cap = if opts.extra.contains("max_body_bytes:") {
            ""
        } else {
            "max_body_bytes: 2097152\n"
        },
        extra = opts.extra,
        uextra = opts.upstream_extra,
    )
}

/// Write config and sync file into `dir` and start `keygate run` on them.
pub fn start_gateway(dir: &Path, opts: &Opts, upstream_url: &str) -> Gateway {
    std::fs::write(
        dir.join("keys.json"),
        serde_json::to_vec_pretty(&opts.sync).unwrap(),
    )
    .unwrap();
    let config = dir.join("keygate.yaml");
    std::fs::write(&config, config_yaml(opts, upstream_url)).unwrap();
    spawn_keygate(dir, &config)
}

/// Start `keygate run -c config` and wait until its proxy port accepts connections.
pub fn spawn_keygate(dir: &Path, config: &Path) -> Gateway {
    spawn_keygate_with(dir, config, &[])
}

/// [`spawn_keygate`] with extra arguments to `keygate run`.
pub fn spawn_keygate_with(dir: &Path, config: &Path, extra: &[&str]) -> Gateway {
    spawn_keygate_env(dir, config, extra, &[])
}

/// [`spawn_keygate_with`] with extra environment variables (the key vault's secret).
pub fn spawn_keygate_env(
    dir: &Path,
    config: &Path,
    extra: &[&str],
    envs: &[(&str, &str)],
) -> Gateway {
    // The gateway's log (access log included) goes to a file beside its config.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("keygate.stderr"))
        .unwrap();
    let mut child = Command::new(keygate_bin())
        .arg("run")
        .arg("-c")
        .arg(config)
        .args(extra)
        .env("KG_TEST_UPSTREAM_KEY", UPSTREAM_SECRET)
        .env("KG_TEST_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("RUST_LOG", "keygate=info,warn")
        .envs(envs.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .spawn()
        .expect("keygate starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let (mut proxy, mut metrics, mut admin) = (None, None, None);
    while proxy.is_none() || metrics.is_none() {
        let Some(Ok(line)) = lines.next() else {
            let status = child.wait();
            let log = std::fs::read_to_string(dir.join("keygate.stderr")).unwrap_or_default();
            panic!("keygate exited before listening: {status:?}\n{log}");
        };
        if let Some(a) = line.strip_prefix("keygate: proxy on ") {
            proxy = Some(a.to_string());
        } else if let Some(a) = line.strip_prefix("keygate: metrics on ") {
            metrics = Some(a.to_string());
        } else if let Some(a) = line.strip_prefix("keygate: admin on ") {
            admin = Some(a.to_string());
        }
    }
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    let base = proxy.unwrap();
    let addr: SocketAddr = base
        .split("://")
        .nth(1)
        .unwrap()
        .parse()
        .expect("proxy address");
    wait_for_port(addr);
    let metrics_addr: SocketAddr = metrics.as_ref().unwrap()[7..].parse().unwrap();
    wait_for_port(metrics_addr);
    Gateway {
        child,
        addr,
        base,
        metrics,
        admin,
        dir: dir.to_path_buf(),
    }
}

pub fn wait_for_port(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

pub fn chat_body(model: &str) -> String {
    json!({"model": model, "messages": [{"role": "user", "content": "Hello"}]}).to_string()
}

/// The status of a chat completion (`gpt-4o-mini`) with `key` at the gateway at `base`.
pub async fn chat_status(base: &str, key: &str) -> u16 {
    client()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(chat_body("gpt-4o-mini"))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// `total_used` of `key` from `/api/usage/token/` on the listener at `base`.
pub async fn total_used_at(base: &str, key: &str) -> i64 {
    let r = client()
        .get(format!("{base}/api/usage/token/"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body = r.bytes().await.unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let v: Value = serde_json::from_slice(&body).unwrap();
    v["data"]["total_used"].as_i64().unwrap()
}

/// POST a chat completion with `Authorization: Bearer key`.
pub async fn chat(env: &Env, key: &str, model: &str) -> reqwest::Response {
    client()
        .post(env.url("/v1/chat/completions"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(chat_body(model))
        .send()
        .await
        .unwrap()
}

/// POST a streaming chat call with the `OK` key to the gateway at `base`, the mock sending
/// `chunks` events `delay_ms` apart.
pub async fn slow_stream(base: &str, delay_ms: u32, chunks: u32) -> reqwest::Response {
    client()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(OK)
        .header("x-mock-delay-ms", delay_ms.to_string())
        .header("x-mock-chunks", chunks.to_string())
        .body(json!({"model": "gpt-4o-mini", "stream": true, "messages": []}).to_string())
        .send()
        .await
        .unwrap()
}

/// Status, `error.code` (OpenAI shape) and the x-request-id of a response.
pub async fn denial(resp: reqwest::Response) -> (u16, String, Option<String>) {
    let status = resp.status().as_u16();
    let id = resp
        .headers()
        .get("x-request-id")
        .map(|v| v.to_str().unwrap().to_string());
    let v: Value = resp.json().await.unwrap();
    let code = v["error"]["code"].as_str().unwrap_or("").to_string();
    (status, code, id)
}

/// Send raw bytes on a new TCP connection and read until the peer closes or `timeout`.
pub fn raw_exchange(addr: SocketAddr, bytes: &[u8], half_close: bool, timeout: Duration) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    s.write_all(bytes).unwrap();
    if half_close {
        s.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Run the keygate binary with `args`; returns (success, stdout + stderr).
pub fn keygate_cli(args: &[&str]) -> (bool, String) {
    keygate_cli_env(args, &[])
}

/// [`keygate_cli`] with extra environment variables.
pub fn keygate_cli_env(args: &[&str], envs: &[(&str, &str)]) -> (bool, String) {
    let out = Command::new(keygate_bin())
        .args(args)
        .env("KG_TEST_UPSTREAM_KEY", UPSTREAM_SECRET)
        .envs(envs.iter().copied())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

pub mod pg;
pub mod pools;
pub mod redis;

/// Defined in `pg.rs`, which `benches/store.rs` includes on its own.
pub use pg::free_port;
