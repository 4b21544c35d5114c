//! The usage store (SPEC §9) end to end: a real gateway process, the mock backend and the
//! real SQLite file the gateway writes.

mod common;

use common::*;
use rusqlite::Connection;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

const ACME: &str = "sk-store-acme-000000000000000000000000000000000000";

/// The standard sync file plus account `acme` with key 101.
fn sync_with_account() -> Value {
    let mut s = standard_sync();
    s["accounts"] = json!({"acme": {"name": "Acme Corp", "quota": 1_000_000_000}});
    s["keys"].as_array_mut().unwrap().push(
        json!({"id": 101, "name": "acme key", "key": ACME, "account": "acme", "quota": 1_000_000}),
    );
    s
}

fn db(dir: &Path) -> Connection {
    Connection::open(dir.join("var/usage.db")).unwrap()
}

fn count(conn: &Connection, sql: &str) -> i64 {
    conn.query_row(sql, [], |r| r.get(0)).unwrap()
}

/// The rows of the `calls` table as JSON objects, oldest first.
fn rows(conn: &Connection) -> Vec<Value> {
    let mut stmt = conn
        .prepare("SELECT key_id, model, status, account, upstream, target, attempts, path, error_code, prompt_tokens, completion_tokens, quota, request_id FROM calls ORDER BY id")
        .unwrap();
    stmt.query_map([], |r| {
        Ok(json!({
            "key_id": r.get::<_, i64>(0)?, "model": r.get::<_, String>(1)?,
            "status": r.get::<_, i64>(2)?, "account": r.get::<_, Option<String>>(3)?,
            "upstream": r.get::<_, Option<String>>(4)?, "target": r.get::<_, Option<String>>(5)?,
            "attempts": r.get::<_, i64>(6)?, "path": r.get::<_, String>(7)?,
            "error_code": r.get::<_, Option<String>>(8)?, "prompt_tokens": r.get::<_, i64>(9)?,
            "completion_tokens": r.get::<_, i64>(10)?, "quota": r.get::<_, i64>(11)?,
            "request_id": r.get::<_, String>(12)?,
        }))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

/// Wait until the store holds at least `n` calls.
async fn wait_rows(dir: &Path, n: i64) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let c = db(dir)
            .query_row("SELECT count(*) FROM calls", [], |r| r.get(0))
            .unwrap_or(0);
        if c >= n || Instant::now() > deadline {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn calls_are_rows_with_account_target_attempts_and_error_code_flushed_by_sigterm() {
    // A writer that never wakes by itself: only the SIGTERM flush can write the rows.
    let mut env = Env::with(Opts {
        sync: sync_with_account(),
        extra: "usage_store: { flush_interval_ms: 60000 }".into(),
        ..Opts::default()
    })
    .await;
    assert_eq!(chat(&env, ACME, "gpt-4o-mini").await.status(), 200);
    assert_eq!(chat(&env, MINI_ONLY, "gpt-4o").await.status(), 403);
    let failed = client()
        .post(env.url("/v1/chat/completions"))
        .bearer_auth(OK)
        .header("x-mock-status", "500")
        .body(chat_body("gpt-4o"))
        .send()
        .await
        .unwrap();
    assert_eq!(failed.status(), 500);
    // keygate's own read-only answers are not calls.
    assert_eq!(env.gw.get("/api/usage/token/", OK).await.0, 200);
    assert_eq!(count(&db(env.dir.path()), "SELECT count(*) FROM calls"), 0);

    assert!(env.gw.terminate().success());
    let conn = db(env.dir.path());
    // A row is pushed in its call's logging phase, after the client has its answer: under load
    // the next call's row can be queued first. In the order the calls were made (by key):
    let mut r = rows(&conn);
    let made = [101, 6, 1];
    r.sort_by_key(|row| made.iter().position(|k| row["key_id"] == *k));
    assert_eq!(r.len(), 3, "{r:#?}");
    let mock_target = format!("{}", env.mock.addr());
    assert_eq!(r[0]["key_id"], 101);
    assert_eq!(r[0]["account"], "acme");
    assert_eq!(r[0]["status"], 200);
    assert_eq!(r[0]["upstream"], "mock");
    assert!(
        r[0]["target"].as_str().unwrap().contains(&mock_target),
        "{}",
        r[0]
    );
    assert_eq!(r[0]["attempts"], 1);
    assert_eq!(r[0]["path"], "/v1/chat/completions");
    assert_eq!(r[0]["error_code"], Value::Null);
    assert!(r[0]["completion_tokens"].as_i64().unwrap() > 0);
    assert!(r[0]["quota"].as_i64().unwrap() > 0);
    assert!(r[0]["request_id"].as_str().unwrap().starts_with("kg-"));

    assert_eq!(r[1]["key_id"], 6);
    assert_eq!(r[1]["status"], 403);
    assert_eq!(r[1]["error_code"], "model_not_allowed");
    assert_eq!(r[1]["attempts"], 0);
    assert_eq!(r[1]["account"], Value::Null);
    assert_eq!(r[1]["quota"], 0);

    assert_eq!(r[2]["key_id"], 1);
    assert_eq!(r[2]["status"], 500);
    assert_eq!(r[2]["quota"], 0);

    // The roll-ups match the rows, per key and model.
    let mismatches = count(
        &conn,
        "SELECT count(*) FROM (
            SELECT key_id, model, count(*) AS n, sum(status >= 400) AS e, sum(prompt_tokens) AS p,
                   sum(completion_tokens) AS c, sum(quota) AS q FROM calls GROUP BY key_id, model
         ) AS c FULL OUTER JOIN (
            SELECT key_id, model, sum(requests) AS n, sum(errors) AS e, sum(prompt_tokens) AS p,
                   sum(completion_tokens) AS c, sum(quota) AS q FROM hourly GROUP BY key_id, model
         ) AS h USING (key_id, model)
         WHERE c.n IS NOT h.n OR c.e IS NOT h.e OR c.p IS NOT h.p OR c.c IS NOT h.c OR c.q IS NOT h.q",
    );
    assert_eq!(mismatches, 0);
    assert_eq!(count(&conn, "SELECT sum(errors) FROM hourly"), 2);
    assert_eq!(
        count(&conn, "SELECT count(*) FROM hourly WHERE account = 'acme'"),
        1
    );
}

#[tokio::test]
async fn key_holders_read_their_calls_and_stats_and_a_disabled_key_cannot() {
    let env = Env::start().await;
    for _ in 0..3 {
        assert_eq!(chat(&env, OK, "gpt-4o-mini").await.status(), 200);
    }
    assert_eq!(chat(&env, MINI_ONLY, "gpt-4o-mini").await.status(), 200);
    assert_eq!(wait_rows(env.dir.path(), 4).await, 4);

    let (status, body) = env.gw.get("/api/log/token", OK).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["success"], true);
    assert_eq!(v["message"], "");
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 3, "only the key's own calls: {v}");
    for c in data {
        for field in [
            "created_at",
            "model_name",
            "prompt_tokens",
            "completion_tokens",
            "quota",
            "use_time",
            "is_stream",
            "token_name",
            "request_id",
        ] {
            assert!(c.get(field).is_some(), "{field} missing in {c}");
        }
        assert_eq!(c["model_name"], "gpt-4o-mini");
        assert_eq!(c["token_name"], "ok");
        assert_eq!(c["is_stream"], false);
    }
    // Newest first.
    assert!(data[0]["id"].as_i64() > data[2]["id"].as_i64());

    // new-api's clients pass the key as ?key=.
    let r = client()
        .get(env.url(&format!("/api/log/token?key={OK}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let (status, body) = env
        .gw
        .get("/api/usage/token/stats?bucket=hour&days=1", OK)
        .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let v: Value = serde_json::from_slice(&body).unwrap();
    let buckets = v["buckets"].as_array().unwrap();
    assert!(buckets.len() >= 24, "{v}");
    let requests: i64 = buckets
        .iter()
        .map(|b| b["requests"].as_i64().unwrap())
        .sum();
    assert_eq!(requests, 3);
    let quota: i64 = buckets.iter().map(|b| b["quota"].as_i64().unwrap()).sum();
    assert_eq!(quota, env.gw.total_used(OK).await);
    for field in [
        "t",
        "requests",
        "errors",
        "prompt_tokens",
        "completion_tokens",
        "quota",
    ] {
        assert!(buckets[0].get(field).is_some(), "{field}");
    }

    let (status, body) = env
        .gw
        .get("/api/usage/token/stats?bucket=day&days=9999", OK)
        .await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert!(v["notes"][0].as_str().unwrap().contains("capped"), "{v}");
    assert_eq!(v["bucket"], "day");

    let (status, body) = env.gw.get("/api/usage/token/stats?bucket=week", OK).await;
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("bucket"));

    // Expired and exhausted keys may read; a disabled one may not.
    assert_eq!(env.gw.get("/api/log/token", EXPIRED).await.0, 200);
    assert_eq!(env.gw.get("/api/usage/token/stats", EXHAUSTED).await.0, 200);
    assert_eq!(env.gw.get("/api/log/token", DISABLED).await.0, 401);
    assert_eq!(env.gw.get("/api/usage/token/stats", DISABLED).await.0, 401);
    assert_eq!(env.gw.get("/api/log/token", "sk-nobody").await.0, 401);
}

/// `keygate run` on `dir`'s config; it must fail. Returns its output.
fn run_fails(dir: &Path, extra: &str) -> String {
    let mock_url = "http://127.0.0.1:9";
    std::fs::write(
        dir.join("keys.json"),
        serde_json::to_vec(&standard_sync()).unwrap(),
    )
    .unwrap();
    let opts = Opts {
        extra: extra.into(),
        ..Opts::default()
    };
    let config = dir.join("keygate.yaml");
    std::fs::write(&config, config_yaml(&opts, mock_url)).unwrap();
    let (ok, out) = keygate_cli(&["run", "-c", config.to_str().unwrap()]);
    assert!(!ok, "keygate started: {out}");
    out
}

#[test]
fn a_corrupt_database_is_a_startup_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("var")).unwrap();
    let file = dir.path().join("var/usage.db");
    std::fs::write(&file, vec![b'x'; 8192]).unwrap();
    let out = run_fails(dir.path(), "");
    assert!(out.contains(&file.display().to_string()), "{out}");
    assert!(out.contains("not a database"), "{out}");
}

#[test]
fn an_unwritable_database_is_a_startup_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    // A folder that cannot be made (a file stands where it would be): unwritable even for root.
    std::fs::write(dir.path().join("afile"), b"").unwrap();
    let out = run_fails(dir.path(), "usage_store: { path: afile/usage.db }");
    assert!(out.contains("afile/usage.db"), "{out}");

    // A read-only file (root writes anyway, so only checked as another user).
    if unsafe_is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ro.db");
    {
        let c = Connection::open(&file).unwrap();
        c.execute_batch("CREATE TABLE t(x)").unwrap();
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o444)).unwrap();
    let out = run_fails(dir.path(), "usage_store: { path: ro.db }");
    assert!(
        out.contains("ro.db") && out.contains("not writable"),
        "{out}"
    );
}

fn unsafe_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

#[tokio::test]
async fn a_full_queue_drops_and_counts_and_the_gateway_keeps_serving() {
    let mut env = Env::with(Opts {
        extra: "usage_store: { queue_size: 1, flush_interval_ms: 60000 }".into(),
        ..Opts::default()
    })
    .await;
    for _ in 0..5 {
        assert_eq!(chat(&env, OK, "gpt-4o-mini").await.status(), 200);
    }
    // A call's row is pushed in its logging phase, after the client has its answer: wait for
    // the fifth. One slot, no drain for a minute: the first row waits, the other four drop.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = env.gw.metrics_text().await;
        let dropped = text
            .lines()
            .find_map(|l| l.strip_prefix("keygate_usage_store_dropped_total "))
            .unwrap_or_else(|| panic!("no dropped series:\n{text}"))
            .trim()
            .to_string();
        if dropped == "4" {
            break;
        }
        assert!(Instant::now() < deadline, "dropped {dropped}, not 4");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(env.gw.terminate().success());
    assert_eq!(count(&db(env.dir.path()), "SELECT count(*) FROM calls"), 1);
}

#[tokio::test]
async fn retention_removes_old_rows_and_roll_ups_in_steps() {
    let mut env = Env::start().await;
    assert_eq!(chat(&env, OK, "gpt-4o-mini").await.status(), 200);
    assert!(env.gw.terminate().success());
    let now = keygate::core::clock::unix_now();
    let old = now - 100 * 86_400;
    {
        let mut conn = db(env.dir.path());
        let tx = conn.transaction().unwrap();
        for i in 0..12_000i64 {
            tx.execute(
                "INSERT INTO calls (created_at, request_id, key_id, key_name, grp, model,
                 prompt_tokens, completion_tokens, quota, is_stream, status, duration_ms, attempts, path)
                 VALUES (?1, 'old', 1, 'ok', 'default', 'gpt-4o-mini', 1, 1, 1, 0, 200, 1, 1, '/v1/chat/completions')",
                [old + i],
            )
            .unwrap();
        }
        for h in 0..10i64 {
            tx.execute(
                "INSERT INTO hourly VALUES (?1, 1, 'gpt-4o-mini', '', 1, 0, 1, 1, 1)",
                [(old / 3600 + h) * 3600],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }
    let config = env.dir.path().join("keygate.yaml");
    let mut gw = spawn_keygate(env.dir.path(), &config);
    let deadline = Instant::now() + Duration::from_secs(20);
    let conn = db(env.dir.path());
    loop {
        let left = count(&conn, "SELECT count(*) FROM calls WHERE request_id = 'old'")
            + count(
                &conn,
                &format!("SELECT count(*) FROM hourly WHERE hour < {}", now - 86_400),
            );
        if left == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{left} old rows left");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The recent call and its roll-up stay.
    assert_eq!(count(&conn, "SELECT count(*) FROM calls"), 1);
    assert_eq!(count(&conn, "SELECT sum(requests) FROM hourly"), 1);
    assert!(gw.terminate().success());
}

#[tokio::test]
async fn the_cli_reads_the_store() {
    let mut env = Env::with(Opts {
        sync: sync_with_account(),
        ..Opts::default()
    })
    .await;
    for _ in 0..2 {
        assert_eq!(chat(&env, ACME, "gpt-4o-mini").await.status(), 200);
    }
    assert_eq!(chat(&env, OK, "gpt-4o").await.status(), 200);
    assert!(env.gw.terminate().success());
    let config = env.dir.path().join("keygate.yaml");
    let config = config.to_str().unwrap();

    let (ok, out) = keygate_cli(&["keys", "usage", "101", "-c", config]);
    assert!(ok, "{out}");
    assert!(out.contains("granted"), "{out}");
    assert!(
        out.contains("usage store (last 366 days): 2 calls, 0 errors"),
        "{out}"
    );

    let (ok, out) = keygate_cli(&["usage", "--account", "acme", "-c", config, "--json"]);
    assert!(ok, "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["totals"]["requests"], 2);
    assert_eq!(v["models"][0]["model"], "gpt-4o-mini");
    assert_eq!(v["hourly"].as_array().unwrap().len(), 1);

    let (ok, out) = keygate_cli(&["usage", "--key", "1", "--since", "2h", "-c", config]);
    assert!(ok, "{out}");
    assert!(out.contains("gpt-4o"), "{out}");
    assert!(out.contains("TOTAL"), "{out}");

    let (ok, out) = keygate_cli(&["usage", "--since", "yesterday-ish", "-c", config]);
    assert!(!ok);
    assert!(out.contains("--since"), "{out}");
}
