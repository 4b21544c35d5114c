//! Helpers for the upstream pool tests: several mock backends behind one gateway whose pool
//! lists them as targets.

use super::*;
use keygate::mock::MockBackend;

/// `n` mock backends.
pub async fn mocks(n: usize) -> Vec<MockBackend> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(MockBackend::start("127.0.0.1:0").await.unwrap());
    }
    v
}

/// A gateway with one pool named `pool`: `targets` are YAML flow maps without the url
/// (`{url}` is replaced by the mock's), `extra` more keys of the pool.
pub fn gateway(dir: &Path, targets: &[String], extra: &str) -> Gateway {
    std::fs::write(
        dir.join("keys.json"),
        serde_json::to_vec_pretty(&standard_sync()).unwrap(),
    )
    .unwrap();
    let mut yaml = String::from(
        "listen: \"127.0.0.1:0\"\nthreads: 2\nmetrics_listen: \"127.0.0.1:0\"\nsync_file: keys.json\nstate_dir: var\nusage_log: var/usage.jsonl\nmax_body_bytes: 4194304\ngrace_period_seconds: 0\nupstreams:\n  - name: pool\n    models: [\"gpt-*\", \"claude-*\"]\n    targets:\n",
    );
    for t in targets {
        yaml.push_str(&format!("      - {t}\n"));
    }
    for line in extra.lines() {
        yaml.push_str(&format!("    {line}\n"));
    }
    let config = dir.join("keygate.yaml");
    std::fs::write(&config, yaml).unwrap();
    spawn_keygate(dir, &config)
}

pub fn target(m: &MockBackend, rest: &str) -> String {
    let sep = if rest.is_empty() { "" } else { ", " };
    format!(
        "{{url: \"http://{}\", api_key_env: KG_TEST_UPSTREAM_KEY{sep}{rest}}}",
        m.addr()
    )
}

pub async fn post_chat(gw: &Gateway, body: &str) -> reqwest::Response {
    client()
        .post(format!("{}/v1/chat/completions", gw.base))
        .bearer_auth(OK)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

/// The value of a series in the metrics text (0 when absent).
pub fn series(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The gateway's `/readyz` answer.
pub async fn readyz(gw: &Gateway) -> Value {
    client()
        .get(format!("{}/readyz", gw.metrics.as_ref().unwrap()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The labels `/readyz` lists as healthy for the (only) pool.
pub async fn healthy(gw: &Gateway) -> Vec<String> {
    let v = readyz(gw).await;
    v["upstreams"][0]["healthy"]
        .as_array()
        .unwrap_or_else(|| panic!("{v}"))
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect()
}

/// An address nothing listens on (bound, then closed).
pub fn dead_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Chat calls a backend received (health probes left out).
pub fn chat_calls(m: &MockBackend) -> usize {
    m.requests()
        .iter()
        .filter(|r| r.path_and_query == "/v1/chat/completions")
        .count()
}
