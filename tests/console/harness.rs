//! The gateway the console tests run against: a real `keygate` with its admin listener (an
//! admin and a viewer token, a key vault) in front of the mock backend.

use super::common::*;
use keygate::mock::MockBackend;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

pub const VIEW_TOKEN: &str = "kg-console-view-token-0123456789abcdef";
/// The key vault's secret: 32 bytes as 64 hex characters.
pub const VAULT_SECRET: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
pub const XSS: &str = "<img src=x onerror=alert(1)>";

/// A gateway with its admin listener (an admin and a viewer token) in front of the mock.
pub struct Console {
    _mock: MockBackend,
    _gw: Killed,
    /// The proxy listener's base URL.
    pub base: String,
    /// The admin listener's base URL.
    pub admin: String,
    _dir: tempfile::TempDir,
}

impl Console {
    pub async fn start() -> Console {
        let mock = MockBackend::start("127.0.0.1:0").await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let opts = Opts {
            extra: "admin:\n  listen: \"127.0.0.1:0\"\n  tokens:\n    \
                    - { name: \"ops\", token_env: \"KG_TEST_ADMIN_TOKEN\", role: \"admin\" }\n    \
                    - { name: \"grafana\", token_env: \"KG_TEST_VIEW_TOKEN\", role: \"viewer\" }\n  \
                    audit_log: var/audit.jsonl\nkey_vault: { secret_env: \"KG_TEST_VAULT\" }\n"
                .into(),
            ..Opts::default()
        };
        std::fs::write(
            dir.path().join("keys.json"),
            serde_json::to_vec_pretty(&opts.sync).unwrap(),
        )
        .unwrap();
        let config = dir.path().join("keygate.yaml");
        let url = format!("http://{}", mock.addr());
        std::fs::write(&config, config_yaml(&opts, &url)).unwrap();
        let (gw, base, admin) = spawn_with_admin(dir.path(), &config);
        Console {
            _mock: mock,
            _gw: gw,
            base,
            admin,
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.admin)
    }

    /// A chat call through the gateway with `key`.
    pub async fn call(&self, key: &str) -> reqwest::Response {
        client()
            .post(format!("{}/v1/chat/completions", self.base))
            .bearer_auth(key)
            .header("content-type", "application/json")
            .body(chat_body("gpt-4o-mini"))
            .send()
            .await
            .unwrap()
    }
}

/// A child process killed when dropped.
pub struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `keygate run` with the admin tokens in its environment: the process, the proxy's and the
/// admin listener's base URLs (each listener announces itself on stdout).
fn spawn_with_admin(dir: &std::path::Path, config: &std::path::Path) -> (Killed, String, String) {
    let log = std::fs::File::create(dir.join("keygate.stderr")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["run", "-c"])
        .arg(config)
        .env("KG_TEST_UPSTREAM_KEY", UPSTREAM_SECRET)
        .env("KG_TEST_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("KG_TEST_VIEW_TOKEN", VIEW_TOKEN)
        .env("KG_TEST_VAULT", VAULT_SECRET)
        .env("RUST_LOG", "keygate=info,warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut proxy, mut metrics, mut admin) = (None, None, None);
    while proxy.is_none() || metrics.is_none() || admin.is_none() {
        let Some(Ok(line)) = lines.next() else {
            let _ = child.wait();
            panic!(
                "keygate exited before listening:\n{}",
                std::fs::read_to_string(dir.join("keygate.stderr")).unwrap_or_default()
            );
        };
        if let Some(a) = line.strip_prefix("keygate: proxy on ") {
            proxy = Some(a.to_string());
        } else if let Some(a) = line.strip_prefix("keygate: metrics on ") {
            metrics = Some(a.to_string());
        } else if let Some(a) = line.strip_prefix("keygate: admin on ") {
            admin = Some(a.trim().to_string());
        }
    }
    std::thread::spawn(move || for _ in lines {});
    let (proxy, admin) = (proxy.unwrap(), admin.unwrap());
    for base in [&proxy, &admin] {
        wait_for_port(base.split("://").nth(1).unwrap().parse().unwrap());
    }
    (Killed(child), proxy, admin)
}
