//! Operations: the access log, metrics (names, bounded labels, per-key opt-in, upstream errors,
//! `promtool check metrics`), the Grafana dashboard, and graceful shutdown on SIGTERM.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

async fn wait_for_metric(gw: &Gateway, needle: &str) -> String {
    let started = Instant::now();
    loop {
        let text = gw.metrics_text().await;
        if text.contains(needle) || started.elapsed() > Duration::from_secs(10) {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn access_log_has_one_structured_line_per_request_and_never_a_key() {
    let env = Env::start().await;
    let r = client()
        .post(env.url("/v1/chat/completions"))
        .bearer_auth(OK)
        .header("x-request-id", "access-log-1")
        .body(chat_body("gpt-4o-mini"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    chat(&env, DISABLED, "gpt-4o-mini").await;
    let started = Instant::now();
    let lines: Vec<Value> = loop {
        let lines: Vec<Value> = env
            .gw
            .log()
            .lines()
            .filter(|l| l.contains("keygate::access"))
            .filter_map(|l| serde_json::from_str(&l[l.find('{')?..]).ok())
            .collect();
        if lines.len() >= 2 || started.elapsed() > Duration::from_secs(10) {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(lines.len(), 2, "{lines:?}");
    // The first call's line is written when its answer is done, which may be after the
    // second (refused at once) call's.
    let ok = lines
        .iter()
        .find(|l| l["status"] == 200)
        .unwrap_or_else(|| panic!("no line for the admitted call: {lines:?}"));
    assert_eq!(ok["request_id"], "access-log-1");
    assert_eq!(
        (ok["key_id"].clone(), ok["model"].clone()),
        (json!(1), json!("gpt-4o-mini"))
    );
    assert_eq!(
        (ok["status"].clone(), ok["outcome"].clone()),
        (json!(200), json!("admitted"))
    );
    assert!(ok["duration_ms"].as_f64().unwrap() > 0.0);
    assert!(ok["quota"].as_i64().unwrap() > 0);
    let denied = lines
        .iter()
        .find(|l| l["status"] != 200)
        .unwrap_or_else(|| panic!("no line for the refused call: {lines:?}"));
    assert_eq!(
        (denied["status"].clone(), denied["reason"].clone()),
        (json!(401), json!("key_disabled"))
    );
    let log = env.gw.log();
    assert!(
        !log.contains(OK) && !log.contains(DISABLED),
        "a key reached the log"
    );

    // Opt-out.
    let quiet = Env::with(Opts {
        extra: "access_log: false".into(),
        ..Opts::default()
    })
    .await;
    chat(&quiet, OK, "gpt-4o-mini").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!quiet.gw.log().contains("keygate::access"));
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_cover_the_spec_with_bounded_labels() {
    let env = Env::start().await;
    // Twice: the second call counts in series the first one resolved.
    chat(&env, OK, "gpt-4o-mini").await;
    chat(&env, OK, "gpt-4o-mini").await;
    chat(&env, OK, "totally-unknown-model-1").await;
    chat(&env, "sk-unknown", "gpt-4o").await;
    let text = wait_for_metric(&env.gw, "keygate_gate_duration_seconds_count 4").await;
    // The mock reports 1 + body/4 prompt tokens and 20 completion tokens.
    let prompt = 1 + chat_body("gpt-4o-mini").len() / 4;
    for line in [
        r#"keygate_requests_total{group="default",model="gpt-4o-mini",outcome="admitted",reason=""} 2"#.to_string(),
        format!(r#"keygate_tokens_total{{group="default",kind="prompt",model="gpt-4o-mini"}} {}"#, 2 * prompt),
        r#"keygate_tokens_total{group="default",kind="completion",model="gpt-4o-mini"} 40"#.to_string(),
        r#"keygate_requests_total{group="",model="",outcome="denied",reason="invalid_api_key"} 1"#.to_string(),
        r#"keygate_requests_total{group="default",model="other",outcome="denied",reason="model_not_found"} 1"#.to_string(),
        r#"keygate_upstream_duration_seconds_count{upstream="mock"} 2"#.to_string(),
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line}:\n{text}");
    }
    for name in [
        "keygate_requests_total{",
        "keygate_quota_consumed_total{",
        "keygate_tokens_total{",
        "keygate_gate_duration_seconds_bucket",
        "keygate_upstream_duration_seconds_bucket",
        "keygate_keys{state=\"enabled\"}",
        "keygate_config_reloads_total{result=\"ok\"}",
        "keygate_config_revision 7",
        "keygate_config_loaded_timestamp_seconds",
        "keygate_reservations_outstanding 0",
        "keygate_usage_log_dropped_total 0",
    ] {
        assert!(text.contains(name), "missing {name}:\n{text}");
    }
    assert!(
        text.contains(r#"model="other""#),
        "unknown models are folded to other"
    );
    assert!(!text.contains("totally-unknown-model-1"));
    assert!(
        !text.contains("keygate_key_requests_total{"),
        "per-key series are opt-in"
    );
    assert!(!text.contains(OK));
}

#[tokio::test(flavor = "multi_thread")]
async fn per_key_series_and_upstream_errors() {
    let env = Env::with(Opts {
        extra: "metrics: { per_key: true }".into(),
        ..Opts::default()
    })
    .await;
    chat(&env, OK, "gpt-4o-mini").await;
    let r = client()
        .post(env.url("/v1/chat/completions"))
        .bearer_auth(OK)
        .header("x-mock-status", "503")
        .body(chat_body("gpt-4o-mini"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let text = wait_for_metric(
        &env.gw,
        r#"keygate_upstream_errors_total{kind="status_5xx",upstream="mock"} 1"#,
    )
    .await;
    assert!(
        text.contains(
            r#"keygate_key_requests_total{key_id="1",key_name="ok",outcome="admitted"} 2"#
        ),
        "{text}"
    );
    assert!(
        text.contains(r#"keygate_key_quota_consumed_total{key_id="1",key_name="ok"}"#),
        "{text}"
    );
    assert!(
        text.contains(r#"keygate_upstream_errors_total{kind="status_5xx",upstream="mock"} 1"#),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn exposition_passes_promtool() {
    let promtool = std::process::Command::new("promtool")
        .arg("--version")
        .output();
    if promtool.is_err() {
        assert!(
            std::env::var("KEYGATE_REQUIRE_SDK").is_err(),
            "promtool is required (apt-get install prometheus)"
        );
        eprintln!("promtool not installed; skipped");
        return;
    }
    let env = Env::with(Opts {
        extra: "metrics: { per_key: true }".into(),
        ..Opts::default()
    })
    .await;
    chat(&env, OK, "gpt-4o-mini").await;
    chat(&env, "sk-unknown", "gpt-4o-mini").await;
    let text = wait_for_metric(&env.gw, "keygate_gate_duration_seconds_count 2").await;
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn grafana_dashboard_uses_only_exported_series() {
    let dash: Value = serde_json::from_slice(
        &std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/conf/grafana-dashboard.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let env = Env::with(Opts {
        extra: "metrics: { per_key: true }".into(),
        ..Opts::default()
    })
    .await;
    chat(&env, OK, "gpt-4o-mini").await;
    let text = wait_for_metric(&env.gw, "keygate_gate_duration_seconds_count 1").await;
    let exported: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| l.starts_with("# TYPE "))
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    let mut exprs = Vec::new();
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    assert!(exprs.len() >= 8, "{exprs:?}");
    for e in &exprs {
        for word in e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if let Some(base) = word.strip_prefix("keygate_") {
                let base = format!("keygate_{base}");
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| base.strip_suffix(s))
                    .unwrap_or(&base);
                assert!(
                    exported.contains(family),
                    "dashboard uses {base}, not exported"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_in_flight_streams_finish_and_flushes_usage() {
    let mock = keygate::mock::MockBackend::start("127.0.0.1:0")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let opts = Opts {
        extra: "grace_period_seconds: 10".into(),
        ..Opts::default()
    };
    let yaml = config_yaml(&opts, &format!("http://{}", mock.addr()))
        .replace("grace_period_seconds: 0\n", "");
    std::fs::write(
        dir.path().join("keys.json"),
        serde_json::to_vec(&opts.sync).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.path().join("keygate.yaml"), yaml).unwrap();
    let mut gw = spawn_keygate(dir.path(), &dir.path().join("keygate.yaml"));
    let r = slow_stream(&gw.base, 250, 8).await;
    assert_eq!(r.status(), 200);
    gw.signal("TERM");
    let body = r.text().await.unwrap();
    assert!(body.contains("[DONE]"), "the stream was cut: {body}");
    let status = gw.terminate();
    assert!(status.success(), "{status:?}");
    let records = gw.usage_records();
    assert_eq!(records.len(), 1, "the usage record was flushed");
    assert!(records[0]["quota"].as_i64().unwrap() > 0);
}
