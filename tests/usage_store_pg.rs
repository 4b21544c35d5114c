//! The usage store on PostgreSQL (`usage_store.backend: postgres`, SPEC §9): real gateway
//! processes, the mock upstream and a real PostgreSQL server (Debian's package, a throwaway
//! cluster per test). Skipped (with a message) when PostgreSQL is not installed, unless
//! `KEYGATE_REQUIRE_PG` is set.

mod common;

use common::pg::{available, PgServer};
use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// The config lines of a gateway on `url`, with an admin listener (`more`: further
/// `usage_store` options; a batch every 50 ms unless they say).
fn store_config(url: &str, more: &str) -> String {
    let every = if more.contains("flush_interval_ms") {
        ""
    } else {
        ", flush_interval_ms: 50"
    };
    format!(
        "usage_store: {{ backend: postgres, url: \"{url}\"{every}{more} }}\n\
         admin:\n  listen: \"127.0.0.1:0\"\n  tokens:\n    - {{ name: ops, token_env: KG_TEST_ADMIN_TOKEN, role: admin }}\n"
    )
}

fn gateway(root: &Path, name: &str, mock: &keygate::mock::MockBackend, extra: &str) -> Gateway {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let opts = Opts {
        extra: extra.into(),
        ..Opts::default()
    };
    start_gateway(&dir, &opts, &format!("http://{}", mock.addr()))
}

async fn call(gw: &Gateway, key: &str, model: &str) -> u16 {
    client()
        .post(format!("{}/v1/chat/completions", gw.base))
        .bearer_auth(key)
        .body(chat_body(model))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// GET an admin route: status and JSON (or text as a JSON string).
async fn admin(gw: &Gateway, path: &str) -> (u16, Value) {
    let r = client()
        .get(format!("{}{path}", gw.admin.as_ref().unwrap()))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Wait until `/admin/v1/logs` of `gw` counts at least `n` calls; the last page seen.
async fn wait_logs(gw: &Gateway, n: u64, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let (s, v) = admin(gw, "/admin/v1/logs?page_size=1000").await;
        if (s == 200 && v["total"].as_u64().unwrap_or(0) >= n) || Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name}:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn two_gateways_write_to_and_answer_from_one_database() {
    if !available() {
        return;
    }
    let pg = PgServer::start_new();
    let mock = keygate::mock::MockBackend::start("127.0.0.1:0")
        .await
        .unwrap();
    let root = tempfile::tempdir().unwrap();
    let conf = store_config(&pg.url("keygate"), "");
    let a = gateway(root.path(), "a", &mock, &conf);
    let b = gateway(root.path(), "b", &mock, &conf);
    for _ in 0..3 {
        assert_eq!(call(&a, OK, "gpt-4o-mini").await, 200);
    }
    assert_eq!(call(&b, MINI_ONLY, "gpt-4o-mini").await, 200);
    assert_eq!(call(&b, MINI_ONLY, "gpt-4o").await, 403);
    // Either gateway answers with the calls of both, newest first.
    let from_a = wait_logs(&a, 5, Duration::from_secs(20)).await;
    assert_eq!(from_a["total"], 5, "{from_a}");
    let (s, from_b) = admin(&b, "/admin/v1/logs?page_size=1000").await;
    assert_eq!(s, 200, "{from_b}");
    assert_eq!(from_b["items"], from_a["items"]);
    let items = from_b["items"].as_array().unwrap();
    assert!(items.windows(2).all(|w| {
        (w[0]["created_at"].as_i64(), w[0]["id"].as_i64())
            > (w[1]["created_at"].as_i64(), w[1]["id"].as_i64())
    }));
    // (Within one second, calls of two gateways are ordered as they were written.)
    let denied: Vec<&Value> = items.iter().filter(|i| i["status"] == 403).collect();
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0]["key_id"], 6);
    assert_eq!(denied[0]["error_code"], "model_not_allowed");
    assert_eq!(denied[0]["attempts"], 0);
    let served = items.iter().find(|i| i["key_id"] == 1).unwrap();
    assert_eq!(served["upstream"], "mock");
    assert_eq!(served["attempts"], 1);
    assert_eq!(served["path"], "/v1/chat/completions");
    assert!(served["request_id"].as_str().unwrap().starts_with("kg-"));

    // Filters and paging.
    let (_, ok_only) = admin(&b, "/admin/v1/logs?key_id=1").await;
    assert_eq!(ok_only["total"], 3);
    let (_, errors) = admin(&a, "/admin/v1/logs?status=403").await;
    assert_eq!(errors["total"], 1);
    let (_, page2) = admin(&a, "/admin/v1/logs?page=2&page_size=2").await;
    assert_eq!(page2["items"].as_array().unwrap().len(), 2);
    assert_eq!(page2["items"][0], items[2]);
    let (_, capped) = admin(&a, "/admin/v1/logs?page_size=10000").await;
    assert_eq!(capped["page_size"], 1000);

    // Stats buckets from the roll-ups: each call counted in its hour and in its day.
    let mut per_hour: BTreeMap<i64, (i64, i64, i64)> = BTreeMap::new();
    for i in items {
        let t = i["created_at"].as_i64().unwrap() / 3600 * 3600;
        let e = per_hour.entry(t).or_default();
        e.0 += 1;
        e.1 += i64::from(i["status"].as_i64().unwrap() >= 400);
        e.2 += i["quota"].as_i64().unwrap();
    }
    let (s, stats) = admin(&b, "/admin/v1/stats?bucket=hour").await;
    assert_eq!(s, 200, "{stats}");
    let got: BTreeMap<i64, (i64, i64, i64)> = stats["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["requests"].as_i64() > Some(0))
        .map(|b| {
            let n = |f: &str| b[f].as_i64().unwrap();
            (n("t"), (n("requests"), n("errors"), n("quota")))
        })
        .collect();
    assert_eq!(got, per_hour);
    assert!(
        stats["buckets"].as_array().unwrap().len() >= 720,
        "30 days of hours"
    );
    let (_, days) = admin(&a, "/admin/v1/stats?bucket=day&key_id=1").await;
    let day_sum: i64 = days["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["requests"].as_i64().unwrap())
        .sum();
    assert_eq!(day_sum, 3);
    assert!(days["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .all(|b| b["t"].as_i64().unwrap() % 86_400 == 0));
    let quota_a: i64 = days["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["quota"].as_i64().unwrap())
        .sum();
    assert_eq!(quota_a, a.total_used(OK).await);

    // The key holder's routes on the other gateway see the calls made through the first.
    let (s, body) = b.get("/api/log/token", OK).await;
    assert_eq!(s, 200);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["success"], true);
    assert_eq!(v["data"].as_array().unwrap().len(), 3, "{v}");
    assert_eq!(v["data"][0]["model_name"], "gpt-4o-mini");
    let (s, body) = b.get("/api/usage/token/stats?bucket=day&days=2", OK).await;
    assert_eq!(s, 200);
    let v: Value = serde_json::from_slice(&body).unwrap();
    let n: i64 = v["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["requests"].as_i64().unwrap())
        .sum();
    assert_eq!(n, 3, "{v}");

    // The CSV export, streamed: a header and a line per call.
    let r = client()
        .get(format!("{}/admin/v1/logs.csv", a.admin.as_ref().unwrap()))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let mut rd = csv::Reader::from_reader(text.as_bytes());
    let header: Vec<String> = rd.headers().unwrap().iter().map(String::from).collect();
    assert_eq!(header[..4], ["id", "created_at", "request_id", "key_id"]);
    let mut keys: Vec<String> = rd.records().map(|r| r.unwrap()[3].to_string()).collect();
    keys.sort();
    assert_eq!(keys, ["1", "1", "1", "6", "6"], "{text}");

    // The CLI reads the same database.
    let conf_b = b.dir.join("keygate.yaml");
    let conf_b = conf_b.to_str().unwrap();
    let (ok, out) = keygate_cli(&["usage", "-c", conf_b, "--key", "1", "--json"]);
    assert!(ok, "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["totals"]["requests"], 3, "{v}");
    assert_eq!(v["totals"]["quota"], quota_a);
    let (ok, out) = keygate_cli(&["usage", "-c", conf_b]);
    assert!(
        ok && out.contains("TOTAL") && out.contains("gpt-4o-mini"),
        "{out}"
    );
    assert!(
        out.contains(&format!("127.0.0.1:{}/keygate", pg.port)),
        "{out}"
    );
    let (ok, out) = keygate_cli(&["keys", "usage", "1", "--json", "-c", conf_b]);
    assert!(ok, "{out}");
    let v: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(v["store"]["requests"], 3, "{v}");

    // A model name with a NUL (PostgreSQL text cannot hold one) is stored with U+FFFD, and
    // the batch with it.
    let _status = call(&b, OK, "gpt-4o-mini\0").await;
    assert_eq!(call(&b, OK, "gpt-4o-mini").await, 200);
    assert_eq!(wait_logs(&a, 7, Duration::from_secs(20)).await["total"], 7);
    let (_, nul) = admin(&a, "/admin/v1/logs?model=gpt-4o-mini%EF%BF%BD").await;
    assert_eq!(nul["total"], 1, "{nul}");
    let m = b.metrics_text().await;
    assert_eq!(metric(&m, "keygate_usage_store_dropped_total"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gateway_serves_while_postgres_is_down_and_catches_up_when_it_returns() {
    if !available() {
        return;
    }
    let mut pg = PgServer::start_new();
    pg.stop();
    let mock = keygate::mock::MockBackend::start("127.0.0.1:0")
        .await
        .unwrap();
    let root = tempfile::tempdir().unwrap();
    // Started while PostgreSQL is down: it serves, rows wait in the queue.
    let gw = gateway(
        root.path(),
        "a",
        &mock,
        &store_config(&pg.url("keygate"), ""),
    );
    for _ in 0..3 {
        assert_eq!(call(&gw, OK, "gpt-4o-mini").await, 200);
    }
    let (s, v) = admin(&gw, "/admin/v1/logs").await;
    assert_eq!(s, 503, "{v}");
    let (s, _) = gw.get("/api/log/token", OK).await;
    assert_eq!(s, 503);

    pg.start();
    let v = wait_logs(&gw, 3, Duration::from_secs(20)).await;
    assert_eq!(v["total"], 3, "the queued rows were written: {v}");

    // A short outage while running: the rows made during it arrive after it.
    pg.stop();
    for _ in 0..2 {
        assert_eq!(call(&gw, OK, "gpt-4o-mini").await, 200);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    pg.start();
    let v = wait_logs(&gw, 5, Duration::from_secs(20)).await;
    assert_eq!(v["total"], 5, "{v}");
    let (_, stats) = admin(&gw, "/admin/v1/stats?bucket=day").await;
    let n: i64 = stats["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["requests"].as_i64().unwrap())
        .sum();
    assert_eq!(n, 5, "the roll-ups caught up too: {stats}");
    let m = gw.metrics_text().await;
    assert_eq!(metric(&m, "keygate_usage_store_dropped_total"), 0);
    assert_eq!(metric(&m, "keygate_usage_store_rows_written_total"), 5);
    assert!(gw.log().contains("connected again"), "{}", gw.log());

    // SIGTERM writes what is queued (a writer that would otherwise wait a minute).
    drop(gw);
    let mut gw = gateway(
        root.path(),
        "b",
        &mock,
        &store_config(&pg.url("keygate"), ", flush_interval_ms: 60000"),
    );
    // The call waits in the queue until SIGTERM.
    assert_eq!(call(&gw, MINI_ONLY, "gpt-4o-mini").await, 200);
    assert!(gw.terminate().success());
    let n = pg.number(
        "keygate",
        "SELECT count(*) FROM keygate_usage.calls WHERE key_id = 6",
    );
    assert_eq!(n, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_outage_drops_and_counts_past_the_queue() {
    if !available() {
        return;
    }
    let mut pg = PgServer::start_new();
    let mock = keygate::mock::MockBackend::start("127.0.0.1:0")
        .await
        .unwrap();
    let root = tempfile::tempdir().unwrap();
    let gw = gateway(
        root.path(),
        "a",
        &mock,
        &store_config(&pg.url("keygate"), ", queue_size: 4"),
    );
    assert_eq!(call(&gw, OK, "gpt-4o-mini").await, 200);
    assert_eq!(wait_logs(&gw, 1, Duration::from_secs(20)).await["total"], 1);
    pg.stop();
    const CALLS: u64 = 12;
    for _ in 0..CALLS {
        assert_eq!(call(&gw, OK, "gpt-4o-mini").await, 200, "it keeps serving");
    }
    let dropped = metric(
        &gw.metrics_text().await,
        "keygate_usage_store_dropped_total",
    );
    assert!(dropped >= 1, "past the queue, rows are dropped and counted");
    pg.start();
    // What was kept arrives; kept and dropped add up to every call.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = gw.metrics_text().await;
        let written = metric(&m, "keygate_usage_store_rows_written_total");
        if written + metric(&m, "keygate_usage_store_dropped_total") == 1 + CALLS {
            break;
        }
        assert!(Instant::now() < deadline, "{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = gw.metrics_text().await;
    let written = metric(&m, "keygate_usage_store_rows_written_total");
    assert!(written > 1, "the queued rows were written after the outage");
    let v = wait_logs(&gw, written, Duration::from_secs(5)).await;
    assert_eq!(v["total"].as_u64(), Some(written));
    assert!(metric(&m, "keygate_usage_store_write_errors_total") >= 1);
}

#[test]
fn a_bad_url_is_a_config_error_that_hides_the_password() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("keys.json"),
        serde_json::to_vec(&standard_sync()).unwrap(),
    )
    .unwrap();
    for (url, says) in [
        (
            "postgres://kg:hunter2@db:notaport/usage",
            "not a valid PostgreSQL URL",
        ),
        ("mysql://kg:hunter2@db/usage", "must start with postgres://"),
    ] {
        let opts = Opts {
            extra: format!("usage_store: {{ backend: postgres, url: \"{url}\" }}"),
            ..Opts::default()
        };
        let config = dir.path().join("keygate.yaml");
        std::fs::write(&config, config_yaml(&opts, "http://127.0.0.1:9")).unwrap();
        let (ok, out) = keygate_cli(&["run", "-c", config.to_str().unwrap()]);
        assert!(!ok, "keygate started: {out}");
        assert!(
            out.contains("usage_store: url: ") && out.contains(says),
            "{out}"
        );
        assert!(!out.contains("hunter2"), "{out}");
    }
}
