//! `keygate demo`: a config, a sync file with demo keys and a built-in mock backend in a
//! scratch folder, the admin listener with the console, and the curl lines that show an
//! admitted call and each kind of refusal.

use crate::cli::mock::MockBackend;
use crate::core::config::Config;
use crate::core::table::{digest_hex, generate_key, key_digest};
use crate::gate::Gate;
use crate::ops::server::resolve_port_zero;
use anyhow::Context as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Where the demo listens: the gateway, its metrics and the admin listener.
pub struct DemoListen<'a> {
    /// The gateway.
    pub listen: &'a str,
    /// The metrics listener.
    pub metrics: &'a str,
    /// The admin listener (API and console).
    pub admin: &'a str,
}

/// Run the demo: the mock backend, the demo files, the admin listener (as `keygate run`
/// starts it, with a reloader so the admin API's writes take effect) and the gateway.
pub fn run(at: DemoListen<'_>) -> anyhow::Result<()> {
    let mock = start_mock_thread("127.0.0.1:0")?;
    let dir = std::env::temp_dir().join(format!("keygate-demo-{}", std::process::id()));
    let resolve = |a: &str| resolve_port_zero(a).with_context(|| format!("cannot listen on {a}"));
    let listen = resolve(at.listen)?;
    let metrics = resolve(at.metrics)?;
    let admin = resolve(at.admin)?;
    let (config_path, keys) = write_demo_files(&dir, &listen, &metrics, &admin, mock)?;
    let config = Config::load(&config_path)?;
    let vault = crate::cli::vault::check_at_start(&config).map_err(anyhow::Error::msg)?;
    let gate = Gate::from_config(&config).map_err(anyhow::Error::msg)?;
    println!(
        "keygate demo: mock backend on http://{mock}, files in {}",
        dir.display()
    );
    println!(
        "keygate demo: upstream pool \"mock\" has two targets: the mock and a dead port \
         (http://127.0.0.1:9); a call sent to the dead one fails over to the mock"
    );
    println!("keygate demo: console on http://{admin}/");
    println!(
        "keygate demo: admin token (sign in with it): {}",
        keys.admin_token
    );
    println!(
        "keygate demo: the admin API: curl -s http://{admin}/admin/v1/keys -H 'Authorization: Bearer {}'",
        keys.admin_token
    );
    println!("keygate demo: try these (the keys are new on every run):\n");
    println!("{}", curl_lines(&format!("http://{listen}"), &keys));
    let reloader = std::sync::Arc::new(crate::sync::reload::Reloader::new(
        gate.clone(),
        &config.sync_file,
    ));
    reloader.clone().spawn(config.watch_sync_file)?;
    crate::admin::start(&config, gate.clone(), reloader, vault)?;
    // Runs for the life of the process (a thread of its own).
    let _health = gate.upstreams().start_health_checks()?;
    let (server, _bound) = crate::ops::server::build(&config, gate.clone(), false)?;
    crate::ops::server::run(server, &gate);
    Ok(())
}

/// The demo's keys, by role.
pub struct DemoKeys {
    /// Admitted for every demo model.
    pub ok: String,
    /// Status `disabled`.
    pub disabled: String,
    /// Expired in 1970.
    pub expired: String,
    /// Only from 203.0.113.7.
    pub ip_locked: String,
    /// Only `gpt-4o-mini`.
    pub mini_only: String,
    /// In an account limited to 3 requests a minute.
    pub limited: String,
    /// The admin listener's token (role admin).
    pub admin_token: String,
}

/// Start the mock backend on its own thread and runtime; returns its address.
pub fn start_mock_thread(addr: &str) -> anyhow::Result<SocketAddr> {
    let (tx, rx) = std::sync::mpsc::channel();
    let addr = addr.to_string();
    std::thread::Builder::new()
        .name("keygate-mock".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            rt.block_on(async move {
                match MockBackend::start(&addr).await {
                    Ok(mock) => {
                        let _ = tx.send(Ok(mock.addr()));
                        std::future::pending::<()>().await;
                        drop(mock);
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            });
        })?;
    Ok(rx.recv()??)
}

/// Write the demo config and sync file into `dir`; returns the config path and the keys.
pub fn write_demo_files(
    dir: &Path,
    listen: &str,
    metrics_listen: &str,
    admin_listen: &str,
    mock: SocketAddr,
) -> anyhow::Result<(PathBuf, DemoKeys)> {
    std::fs::create_dir_all(dir)?;
    let keys = DemoKeys {
        ok: generate_key()?,
        disabled: generate_key()?,
        expired: generate_key()?,
        ip_locked: generate_key()?,
        mini_only: generate_key()?,
        limited: generate_key()?,
        admin_token: format!("kga-{}", generate_key()?.trim_start_matches("sk-")),
    };
    let h = |k: &str| digest_hex(&key_digest(k.as_bytes()));
    let sync = serde_json::json!({
        "revision": 1,
        "quota_per_unit": 500000,
        "groups": {
            "default": {"ratio": 1.0, "models": ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small", "claude-3-5-sonnet-latest"]},
            "vip": {"ratio": 0.8, "models": ["*"]}
        },
        "models": {
            "gpt-4o-mini": {"ratio": 0.075, "completion_ratio": 4},
            "gpt-4o": {"ratio": 1.25, "completion_ratio": 4},
            "text-embedding-3-small": {"ratio": 0.01},
            "claude-3-5-sonnet-latest": {"ratio": 1.5, "completion_ratio": 5}
        },
        "accounts": {
            "demo-limited": {"name": "Demo: 3 requests a minute", "quota": 5000000, "limits": {"rpm": 3}}
        },
        "keys": [
            {"id": 1, "name": "Demo: everything allowed", "key_sha256": h(&keys.ok), "quota": 5000000, "group": "vip"},
            {"id": 2, "name": "Demo: disabled", "key_sha256": h(&keys.disabled), "status": "disabled", "quota": 5000000},
            {"id": 3, "name": "Demo: expired", "key_sha256": h(&keys.expired), "quota": 5000000, "expires_at": 1},
            {"id": 4, "name": "Demo: only from 203.0.113.7", "key_sha256": h(&keys.ip_locked), "quota": 5000000, "allow_ips": ["203.0.113.7/32"]},
            {"id": 5, "name": "Demo: gpt-4o-mini only", "key_sha256": h(&keys.mini_only), "quota": 5000000, "models": ["gpt-4o-mini"]},
            {"id": 6, "name": "Demo: account limited to 3 a minute", "key_sha256": h(&keys.limited), "quota": 5000000, "account": "demo-limited"}
        ]
    });
    std::fs::write(dir.join("keys.json"), serde_json::to_vec_pretty(&sync)?)?;
    // The admin listener compares the plain SHA-256 of the token (no `sk-` stripping).
    let admin_sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
        keys.admin_token.as_bytes(),
    ));
    let config = format!(
        "# written by `keygate demo`\n\
         listen: \"{listen}\"\n\
         threads: 2\n\
         metrics_listen: \"{metrics_listen}\"\n\
         sync_file: keys.json\n\
         state_dir: var\n\
         usage_log: var/usage.jsonl\n\
         max_body_bytes: 1048576\n\
         grace_period_seconds: 1\n\
         admin:\n  \
           listen: \"{admin_listen}\"\n  \
           tokens: [{{ name: demo, token_sha256: \"{admin_sha}\", role: admin }}]\n  \
           audit_log: var/audit.jsonl\n\
         upstreams:\n  \
           - name: mock\n    \
             # a pool of two: the mock and a dead port; a failed connect is retried on the other\n    \
             targets:\n      \
               - {{ url: \"http://{mock}\" }}\n      \
               - {{ url: \"http://127.0.0.1:9\" }}\n    \
             retry: {{ attempts: 2, on: [connect], budget_percent: 100 }}\n    \
             models: [\"gpt-*\", \"text-embedding-*\", \"claude-*\"]\n"
    );
    let path = dir.join("keygate.yaml");
    std::fs::write(&path, config)?;
    Ok((path, keys))
}

/// The curl lines the demo prints for a gateway at `base` (e.g. `http://127.0.0.1:8080`).
pub fn curl_lines(base: &str, k: &DemoKeys) -> String {
    let chat = |key: &str, model: &str| {
        format!(
            "curl -s {base}/v1/chat/completions -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' -d '{{\"model\":\"{model}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}]}}'"
        )
    };
    let mut out = String::new();
    let mut add = |title: &str, line: String| {
        out.push_str(&format!("# {title}\n{line}\n\n"));
    };
    add("admitted: a chat completion", chat(&k.ok, "gpt-4o-mini"));
    add(
        "admitted: a streaming chat completion",
        format!(
            "curl -sN {base}/v1/chat/completions -H 'Authorization: Bearer {}' -H 'Content-Type: application/json' -d '{{\"model\":\"gpt-4o-mini\",\"stream\":true,\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}]}}'",
            k.ok
        ),
    );
    add(
        "admitted: Anthropic style (x-api-key)",
        format!(
            "curl -s {base}/v1/messages -H 'x-api-key: {}' -H 'anthropic-version: 2023-06-01' -H 'Content-Type: application/json' -d '{{\"model\":\"claude-3-5-sonnet-latest\",\"max_tokens\":64,\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}]}}'",
            k.ok
        ),
    );
    add(
        "local: the models this key may use",
        format!(
            "curl -s {base}/v1/models -H 'Authorization: Bearer {}'",
            k.mini_only
        ),
    );
    add(
        "429 rate_limit_exceeded (a key in an account limited to 3 requests a minute: 3 admitted, the 4th refused)",
        format!(
            "for i in 1 2 3; do curl -s -o /dev/null -w '%{{http_code}}\\n' {base}/v1/chat/completions -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' -d '{body}'; done; curl -s -w '\\n%{{http_code}}\\n' {base}/v1/chat/completions -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' -d '{body}'",
            key = k.limited,
            body = "{\"model\":\"gpt-4o-mini\",\"messages\":[{\"role\":\"user\",\"content\":\"Hello\"}]}"
        ),
    );
    add(
        "401 missing_api_key",
        format!("curl -s {base}/v1/chat/completions -d '{{\"model\":\"gpt-4o-mini\"}}'"),
    );
    add(
        "401 invalid_api_key",
        chat("sk-this-key-does-not-exist", "gpt-4o-mini"),
    );
    add("401 key_disabled", chat(&k.disabled, "gpt-4o-mini"));
    add("401 key_expired", chat(&k.expired, "gpt-4o-mini"));
    add("403 ip_not_allowed", chat(&k.ip_locked, "gpt-4o-mini"));
    add(
        "403 model_not_allowed (key limited to gpt-4o-mini)",
        chat(&k.mini_only, "gpt-4o"),
    );
    add(
        "404 model_not_found (no upstream serves it)",
        chat(&k.ok, "llama-3-70b"),
    );
    add(
        "400 model_required",
        format!(
            "curl -s {base}/v1/chat/completions -H 'Authorization: Bearer {}' -H 'Content-Type: application/json' -d '{{\"messages\":[]}}'",
            k.ok
        ),
    );
    add(
        "400 invalid_json",
        format!(
            "curl -s {base}/v1/chat/completions -H 'Authorization: Bearer {}' -H 'Content-Type: application/json' -d '{{\"model\":'",
            k.ok
        ),
    );
    add(
        "413 request_too_large (the demo caps bodies at 1 MiB)",
        format!(
            "head -c 2000000 /dev/zero | curl -s {base}/v1/chat/completions -H 'Authorization: Bearer {}' -H 'Content-Type: application/json' --data-binary @-",
            k.ok
        ),
    );
    out
}
