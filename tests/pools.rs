//! Upstream pools (SPEC §11), end to end: several real mock backends on port 0 behind the real
//! gateway binary; failures switched on per backend through its faults.

mod common;

use common::pools::*;
use common::*;
use keygate::mock::MockBackend;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::path::Path;

#[tokio::test(flavor = "multi_thread")]
async fn the_split_over_1000_calls_follows_the_weights_and_readyz_lists_the_targets() {
    let m = mocks(2).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(
        dir.path(),
        &[target(&m[0], "weight: 3"), target(&m[1], "weight: 1")],
        "",
    );
    let body = chat_body("gpt-4o-mini");
    for _ in 0..1000 {
        assert_eq!(post_chat(&gw, &body).await.status(), 200);
    }
    let (a, b) = (m[0].request_count(), m[1].request_count());
    eprintln!("observed split over 1000 calls: {a} / {b} (weights 3 / 1)");
    assert_eq!(a + b, 1000);
    assert!((720..=780).contains(&a), "{a} / {b}");
    let ready: Value = client()
        .get(format!("{}/readyz", gw.metrics.as_ref().unwrap()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["upstreams"][0]["name"], "pool");
    assert_eq!(
        ready["upstreams"][0]["healthy"].as_array().unwrap().len(),
        2
    );
    let text = gw.metrics_text().await;
    let ok = format!(
        "keygate_upstream_attempts_total{{result=\"ok\",target=\"{}\",upstream=\"pool\"}}",
        m[0].addr()
    );
    assert_eq!(series(&text, &ok), a as f64, "{text}");
    assert!(text.contains("keygate_upstream_target_up{"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_status_is_retried_on_another_target_with_the_whole_body_and_charged_once() {
    let m = mocks(2).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(
        dir.path(),
        &[target(&m[0], ""), target(&m[1], "priority: 1")],
        "retry: {attempts: 3, on: [connect, timeout, 502, 503], budget_percent: 20}",
    );
    m[0].faults().set_status(503);
    // A 1 MiB body: the retry must send all of it again.
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x".repeat(1 << 20)}]})
        .to_string();
    let before = gw.total_used(OK).await;
    let r = post_chat(&gw, &body).await;
    assert_eq!(r.status(), 200);
    let want = Sha256::digest(body.as_bytes());
    let (a, b) = (m[0].requests(), m[1].requests());
    assert_eq!((a.len(), b.len()), (1, 1));
    assert_eq!(Sha256::digest(&a[0].body), want, "first attempt's body");
    assert_eq!(Sha256::digest(&b[0].body), want, "the retry's body");
    // One settlement, for the attempt that answered.
    let records = gw.wait_records(1).await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["status"], 200);
    let quota = records[0]["quota"].as_i64().unwrap();
    assert!(quota > 0);
    assert_eq!(gw.total_used(OK).await - before, quota);
    let text = gw.metrics_text().await;
    assert_eq!(
        series(
            &text,
            "keygate_upstream_retries_total{reason=\"status\",upstream=\"pool\"}"
        ),
        1.0,
        "{text}"
    );
    // The access log, the usage log and the usage store all name the target that answered
    // and count both attempts.
    let second = m[1].addr().to_string();
    assert_eq!(records[0]["target"], second.as_str(), "{records:?}");
    assert_eq!(records[0]["attempts"], 2, "{records:?}");
    let log = gw.log();
    let access = log
        .lines()
        .find(|l| l.contains("keygate::access") && l.contains("/v1/chat/completions"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        access.contains(&format!("\"target\":\"{second}\"")),
        "{access}"
    );
    assert!(access.contains("\"attempts\":2"), "{access}");
    let row = store_rows(dir.path(), 1).await;
    assert_eq!(row[0], (Some(second), 2, 200), "{row:?}");
    // One attempt: one counted, its target named.
    m[0].faults().set_status(0);
    let ok = post_chat(&gw, &chat_body("gpt-4o-mini")).await;
    assert_eq!(ok.status(), 200);
    let records = gw.wait_records(2).await;
    assert_eq!(records[1]["target"], m[0].addr().to_string().as_str());
    assert_eq!(records[1]["attempts"], 1);
    let rows = store_rows(dir.path(), 2).await;
    assert_eq!(rows[1], (Some(m[0].addr().to_string()), 1, 200), "{rows:?}");
}

/// `(target, attempts, status)` of the usage store's rows, oldest first, once there are `n`.
async fn store_rows(dir: &Path, n: usize) -> Vec<(Option<String>, i64, i64)> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let rows = rusqlite::Connection::open(dir.join("var/usage.db"))
            .and_then(|c| {
                c.prepare("SELECT target, attempts, status FROM calls ORDER BY id")?
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect::<Result<Vec<_>, _>>()
            })
            .unwrap_or_default();
        if rows.len() >= n || std::time::Instant::now() > deadline {
            return rows;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_connection_and_a_slow_first_byte_move_on_to_another_target() {
    let m = mocks(2).await;
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = closed.local_addr().unwrap();
    drop(closed);
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(
        dir.path(),
        &[
            format!("{{url: \"http://{dead}\"}}"),
            target(&m[0], "priority: 1"),
            target(&m[1], "priority: 2"),
        ],
        "retry: {attempts: 3, on: [connect, timeout], budget_percent: 50}\nfirst_byte_timeout_seconds: 1",
    );
    m[0].faults()
        .set_first_byte_delay(std::time::Duration::from_secs(3));
    let r = post_chat(&gw, &chat_body("gpt-4o-mini")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(m[1].request_count(), 1, "the third target answered");
    let text = gw.metrics_text().await;
    assert_eq!(
        series(
            &text,
            "keygate_upstream_retries_total{reason=\"connect\",upstream=\"pool\"}"
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        series(
            &text,
            "keygate_upstream_retries_total{reason=\"timeout\",upstream=\"pool\"}"
        ),
        1.0,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn retry_after_cools_targets_down_and_all_cooling_gets_429_upstream_rate_limited() {
    let m = mocks(2).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(
        dir.path(),
        &[target(&m[0], ""), target(&m[1], "")],
        "retry: {attempts: 2, on: [429], budget_percent: 100}",
    );
    m[0].faults().set_status(429);
    m[0].faults().set_retry_after(Some("30"));
    m[1].faults().set_status(429);
    m[1].faults().set_retry_after(Some("20"));
    let before = gw.total_used(OK).await;
    // Both tried; the second's 429 passes through as it is.
    let r = post_chat(&gw, &chat_body("gpt-4o-mini")).await;
    assert_eq!(r.status(), 429);
    assert_eq!(m[0].request_count() + m[1].request_count(), 2);
    // Now every target cools down: keygate answers itself, with the soonest end.
    let r = post_chat(&gw, &chat_body("gpt-4o-mini")).await;
    assert_eq!(r.status(), 429);
    let after: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((18..=20).contains(&after), "{after}");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "upstream_rate_limited");
    assert_eq!(
        m[0].request_count() + m[1].request_count(),
        2,
        "nothing sent"
    );
    // Anthropic's shape on its path.
    let r = client()
        .post(format!("{}/v1/messages", gw.base))
        .header("x-api-key", OK)
        .body(
            json!({"model": "claude-3-5-sonnet-latest", "max_tokens": 5, "messages": []})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error");
    assert_eq!(gw.total_used(OK).await, before, "failed calls cost nothing");
    let text = gw.metrics_text().await;
    let cooled = format!(
        "keygate_upstream_cooldowns_total{{target=\"{}\",upstream=\"pool\"}}",
        m[0].addr()
    );
    assert_eq!(series(&text, &cooled), 1.0, "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn when_every_target_fails_retries_stay_within_the_budget_and_nothing_is_charged() {
    let m = mocks(2).await;
    let dir = tempfile::tempdir().unwrap();
    // A high `unhealthy_after` keeps the targets from being ejected (ejection would stop the
    // retries on its own); the health check itself runs once an hour.
    let gw = gateway(
        dir.path(),
        &[target(&m[0], ""), target(&m[1], "")],
        "retry: {attempts: 3, on: [502], budget_percent: 20}\nhealth: {interval_seconds: 3600, unhealthy_after: 1000, healthy_after: 1}",
    );
    m[0].faults().set_status(502);
    m[1].faults().set_status(502);
    let before = gw.total_used(OK).await;
    let n = 40;
    for _ in 0..n {
        let r = post_chat(&gw, &chat_body("gpt-4o-mini")).await;
        assert_eq!(r.status(), 502);
    }
    let text = gw.metrics_text().await;
    let retries = series(
        &text,
        "keygate_upstream_retries_total{reason=\"status\",upstream=\"pool\"}",
    ) as usize;
    eprintln!("{n} requests, every target failing: {retries} retries");
    // Without a budget: 2 retries each (80). With 20 %: 20 % of 40 plus the 3 a pool starts with.
    assert!((3..=3 + n / 5 + 1).contains(&retries), "{retries}");
    // The health check's one probe of each target is not a chat call.
    let chat_calls = |m: &MockBackend| {
        m.requests()
            .iter()
            .filter(|r| r.path_and_query == "/v1/chat/completions")
            .count()
    };
    assert_eq!(chat_calls(&m[0]) + chat_calls(&m[1]), n + retries);
    assert_eq!(gw.total_used(OK).await, before);
}

#[tokio::test(flavor = "multi_thread")]
async fn model_map_renames_the_model_for_that_target_only() {
    let m = mocks(2).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(
        dir.path(),
        &[
            target(&m[0], "model_map: {gpt-4o-mini: qwen2.5-7b-instruct}"),
            target(&m[1], "priority: 1"),
        ],
        "retry: {attempts: 2, on: [500], budget_percent: 100}",
    );
    let r = post_chat(&gw, &chat_body("gpt-4o-mini")).await;
    assert_eq!(r.status(), 200);
    let seen: Value = serde_json::from_slice(&m[0].requests()[0].body).unwrap();
    assert_eq!(seen["model"], "qwen2.5-7b-instruct");
    assert_eq!(seen["messages"][0]["content"], "Hello");
    // The other target gets the client's name on a retry.
    m[0].faults().set_status(500);
    assert_eq!(
        post_chat(&gw, &chat_body("gpt-4o-mini")).await.status(),
        200
    );
    let seen: Value = serde_json::from_slice(&m[1].requests()[0].body).unwrap();
    assert_eq!(seen["model"], "gpt-4o-mini");
    // Pricing and logs keep the client's name.
    let records = gw.wait_records(2).await;
    assert!(
        records.iter().all(|r| r["model"] == "gpt-4o-mini"),
        "{records:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_cut_after_its_first_byte_ends_with_an_error_event_and_is_charged() {
    let m = mocks(2).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(
        dir.path(),
        &[target(&m[0], ""), target(&m[1], "priority: 1")],
        "retry: {attempts: 2, on: [connect, timeout, 502], budget_percent: 100}",
    );
    m[0].faults().set_cut_after(3);
    let body = json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "Hello"}]}).to_string();
    let r = client()
        .post(format!("{}/v1/chat/completions", gw.base))
        .bearer_auth(OK)
        .header("x-mock-chunks", "20")
        // Events apart, so the head and the first events reach the client before the cut (a
        // cut before anything was written is retried on the other target).
        .header("x-mock-delay-ms", "50")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = String::from_utf8_lossy(&r.bytes().await.unwrap_or_default()).to_string();
    assert!(text.contains("data: {\"error\":"), "{text}");
    assert_eq!(m[1].request_count(), 0, "never re-sent once streaming");
    let records = gw.wait_records(1).await;
    assert!(records[0]["quota"].as_i64().unwrap() > 0, "{records:?}");
    assert!(
        records[0]["completion_tokens"].as_u64().unwrap() >= 1,
        "{records:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_200_with_a_broken_body_is_charged_an_estimate() {
    let m = mocks(1).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(dir.path(), &[target(&m[0], "")], "");
    m[0].faults().set_broken_body(true);
    let before = gw.total_used(OK).await;
    let r = post_chat(&gw, &chat_body("gpt-4o-mini")).await;
    assert_eq!(r.status(), 200);
    let records = gw.wait_records(1).await;
    let quota = records[0]["quota"].as_i64().unwrap();
    assert!(quota > 0, "{records:?}");
    assert_eq!(gw.total_used(OK).await - before, quota);
    // Still serving.
    m[0].faults().set_broken_body(false);
    assert_eq!(
        post_chat(&gw, &chat_body("gpt-4o-mini")).await.status(),
        200
    );
}

#[test]
fn keygate_check_names_what_is_wrong_with_a_pool() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("keys.json"),
        serde_json::to_vec(&standard_sync()).unwrap(),
    )
    .unwrap();
    let head = "listen: \"127.0.0.1:0\"\nsync_file: keys.json\nupstreams:\n  - name: chat\n    models: [\"*\"]\n";
    for (pool, says) in [
        ("    targets: []\n", "upstream \"chat\": no targets"),
        (
            "    targets:\n      - {url: \"http://127.0.0.1:1\", weight: 0}\n",
            "every target has weight 0",
        ),
        (
            "    targets:\n      - {url: \"http://127.0.0.1:1\", model_map: {a: b, b: a}}\n",
            "model_map: a loop",
        ),
        (
            "    targets:\n      - {url: \"http://127.0.0.1:1\", model_map: {fast: \"\"}}\n",
            "maps to an empty name",
        ),
        (
            "    url: \"http://127.0.0.1:1\"\n    retry: {on: [connect, 404]}\n",
            "retry.on: unknown value 404",
        ),
    ] {
        let config = dir.path().join("keygate.yaml");
        std::fs::write(
            &config,
            format!("{head}{pool}grace_period_seconds: 0\nstate_dir: var\n"),
        )
        .unwrap();
        // `keygate check`, and startup: both refuse, naming the upstream and the field.
        for command in ["check", "run"] {
            let mut child = std::process::Command::new(keygate_bin())
                .args([command, "-c"])
                .arg(&config)
                .env("KG_TEST_UPSTREAM_KEY", UPSTREAM_SECRET)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            let status = loop {
                if let Some(status) = child.try_wait().unwrap() {
                    break status;
                }
                if std::time::Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("keygate {command} started with {pool}");
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            };
            let mut stderr = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
            assert!(!status.success(), "{command}: {pool}");
            assert!(stderr.contains(says), "{command}: {pool}: {stderr}");
        }
    }
}
