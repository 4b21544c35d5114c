//! The admin API (SPEC §8) over HTTP against a real gateway: tokens and roles, the native key
//! and account routes, writes in force before they answer, If-Match, bad input refused with
//! nothing changed, the audit log, and new-api's token routes.

mod common;

use common::*;
use keygate::mock::MockBackend;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::time::{Duration, Instant};

const VIEWER: &str = "kg-viewer-token-abcdefghijklmnop";
const ACME_LEAD: &str = "kg-acme-lead-token-abcdefghijkl";

fn sha(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

fn admin_extra() -> String {
    format!(
        "admin:\n  listen: \"127.0.0.1:0\"\n  audit_log: var/audit.jsonl\n  tokens:\n    - {{ name: ops, token_env: KG_TEST_ADMIN_TOKEN, role: admin }}\n    - {{ name: grafana, token_sha256: \"{}\", role: viewer }}\n    - {{ name: acme-lead, token_sha256: \"{}\", role: admin, account: acme }}\n",
        sha(VIEWER),
        sha(ACME_LEAD)
    )
}

fn sync_with_accounts() -> Value {
    let mut s = standard_sync();
    s["accounts"] = json!({
        "acme": {"name": "Acme", "quota": 10000000, "max_keys": 3},
        "globex": {"name": "Globex", "quota": 10000000}
    });
    s["keys"]
        .as_array_mut()
        .unwrap()
        .push(json!({"id": 20, "name": "globex key", "key": "sk-test-globex-0000000000000000000000000000000000000", "quota": 1000, "account": "globex"}));
    s
}

async fn env() -> Env {
    Env::with(Opts {
        sync: sync_with_accounts(),
        extra: admin_extra(),
        ..Opts::default()
    })
    .await
}

struct Api<'a> {
    env: &'a Env,
}

impl Api<'_> {
    fn url(&self, path: &str) -> String {
        format!(
            "{}{path}",
            self.env.gw.admin.as_ref().expect("admin listener")
        )
    }

    async fn call(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let c = client();
        let mut r = c.request(method.parse().unwrap(), self.url(path));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn admin(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call(Some(ADMIN_TOKEN), method, path, body).await
    }
}

fn sync_bytes(env: &Env) -> Vec<u8> {
    std::fs::read(env.dir.path().join("keys.json")).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_created_key_works_in_the_next_request_and_its_secret_is_shown_once() {
    let env = env().await;
    let api = Api { env: &env };
    let (s, k) = api
        .admin(
            "POST",
            "/admin/v1/keys",
            Some(json!({"name": "Project A", "quota": 500000, "models": ["gpt-4o-mini"]})),
        )
        .await;
    assert_eq!(s, 201, "{k}");
    let secret = k["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("sk-") && secret.len() == 51, "{secret}");
    let id = k["id"].as_u64().unwrap();
    assert_eq!(k["state"], "enabled");
    // In force before the answer: no sleep, no retry.
    assert_eq!(chat_status(&env.gw.base, &secret).await, 200);
    // Never shown again.
    let (s, got) = api
        .admin("GET", &format!("/admin/v1/keys/{id}"), None)
        .await;
    assert_eq!(s, 200);
    assert!(!got.to_string().contains(&secret[3..]), "{got}");
    assert_eq!(got["name"], "Project A");
    let (_, list) = api
        .admin("GET", "/admin/v1/keys?page=1&page_size=100", None)
        .await;
    assert!(!list.to_string().contains(&secret[3..]));
    assert!(!std::fs::read_to_string(env.dir.path().join("keys.json"))
        .unwrap()
        .contains(&secret));

    // Edit the quota: the new remaining value shows.
    let (s, got) = api
        .admin(
            "PATCH",
            &format!("/admin/v1/keys/{id}"),
            Some(json!({"quota": 900000})),
        )
        .await;
    assert_eq!(s, 200, "{got}");
    assert_eq!(got["quota"], 900000);
    assert_eq!(
        got["remaining"].as_i64().unwrap(),
        900000 - got["used"].as_i64().unwrap()
    );
    assert!(
        got["used"].as_i64().unwrap() > 0,
        "the call above was charged: {got}"
    );

    // Disable: the next call is refused; enable: it works again.
    let (s, got) = api
        .admin("POST", &format!("/admin/v1/keys/{id}/disable"), None)
        .await;
    assert_eq!((s, got["state"].as_str()), (200, Some("disabled")));
    assert_eq!(chat_status(&env.gw.base, &secret).await, 401);
    api.admin("POST", &format!("/admin/v1/keys/{id}/enable"), None)
        .await;
    assert_eq!(chat_status(&env.gw.base, &secret).await, 200);

    // Rotate: the new secret works at once, the old one no longer.
    let (s, rot) = api
        .admin(
            "POST",
            &format!("/admin/v1/keys/{id}/rotate"),
            Some(json!({})),
        )
        .await;
    assert_eq!(s, 200, "{rot}");
    let new = rot["secret"].as_str().unwrap();
    assert_eq!(chat_status(&env.gw.base, new).await, 200);
    assert_eq!(chat_status(&env.gw.base, &secret).await, 401);

    // Reveal without a vault: 409 not_recoverable.
    let (s, r) = api
        .admin("POST", &format!("/admin/v1/keys/{id}/reveal"), None)
        .await;
    assert_eq!(
        (s, r["error"]["code"].as_str()),
        (409, Some("not_recoverable"))
    );

    // Delete: gone, and refused.
    let (s, _) = api
        .admin("DELETE", &format!("/admin/v1/keys/{id}"), None)
        .await;
    assert_eq!(s, 200);
    assert_eq!(chat_status(&env.gw.base, new).await, 401);
    let (s, _) = api
        .admin("GET", &format!("/admin/v1/keys/{id}"), None)
        .await;
    assert_eq!(s, 404);

    // The audit log has each write, names fields, and holds no secret.
    let audit = std::fs::read_to_string(env.dir.path().join("var/audit.jsonl")).unwrap();
    let actions: Vec<String> = audit
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|v| {
            assert_eq!(v["token_name"], "ops");
            assert_eq!(v["client_ip"], "127.0.0.1");
            assert!(v["time"].as_i64().unwrap() > 0);
            v["action"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(
        actions,
        [
            "key.create",
            "key.update",
            "key.disable",
            "key.enable",
            "key.rotate",
            "key.delete"
        ]
    );
    assert!(audit.contains(r#""changed":["quota"]"#), "{audit}");
    for s in [&secret[3..], &new[3..], ADMIN_TOKEN] {
        assert!(!audit.contains(s), "secret in the audit log");
        assert!(!env.gw.log().contains(s), "secret in the gateway's log");
    }
}

/// `keygate_sync_file_reads_total`.
async fn sync_file_reads(env: &Env) -> u64 {
    env.gw
        .metrics_text()
        .await
        .lines()
        .find_map(|l| l.strip_prefix("keygate_sync_file_reads_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("keygate_sync_file_reads_total exported")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_gateway_does_not_read_back_the_file_its_api_wrote() {
    let env = env().await;
    let api = Api { env: &env };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = sync_file_reads(&env).await;
    for i in 0..5 {
        let body = json!({"name": format!("k{i}")});
        let (s, k) = api.admin("POST", "/admin/v1/keys", Some(body)).await;
        assert_eq!(s, 201, "{k}");
    }
    // The watcher has seen the renames (and the periodic stat) by now.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        sync_file_reads(&env).await,
        before,
        "the watcher read the file the API had written and put in force"
    );
    // Another writer's change is still read.
    let conf = env.dir.path().join("keygate.yaml");
    let (ok, out) = keygate_cli(&[
        "keys",
        "create",
        "--name",
        "from the cli",
        "-c",
        conf.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    let until = Instant::now() + Duration::from_secs(10);
    while sync_file_reads(&env).await == before {
        assert!(Instant::now() < until, "the CLI's write was not read");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_and_roles_are_enforced() {
    let env = env().await;
    let api = Api { env: &env };
    let (s, body) = api.call(None, "GET", "/admin/v1/keys", None).await;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let (s, _) = api.call(Some("wrong"), "GET", "/admin/v1/keys", None).await;
    assert_eq!(s, 401);
    // A viewer reads, and cannot write.
    let (s, list) = api.call(Some(VIEWER), "GET", "/admin/v1/keys", None).await;
    assert_eq!(s, 200);
    assert_eq!(list["total"], 10);
    let before = sync_bytes(&env);
    let (s, e) = api
        .call(
            Some(VIEWER),
            "POST",
            "/admin/v1/keys",
            Some(json!({"name": "x"})),
        )
        .await;
    assert_eq!((s, e["error"]["code"].as_str()), (403, Some("forbidden")));
    let (s, _) = api
        .call(Some(VIEWER), "POST", "/admin/v1/keys/1/disable", None)
        .await;
    assert_eq!(s, 403);
    let (s, _) = api
        .call(
            Some(VIEWER),
            "POST",
            "/api/token/",
            Some(json!({"name": "x"})),
        )
        .await;
    assert_eq!(s, 403);
    assert_eq!(sync_bytes(&env), before);
    let (s, who) = api
        .call(Some(VIEWER), "GET", "/admin/v1/session", None)
        .await;
    assert_eq!((s, who["role"].as_str()), (200, Some("viewer")));

    // Failed sign-ins are counted and logged (without the token), and slowed down.
    let m = env.gw.metrics_text().await;
    assert!(m.contains("keygate_admin_auth_failures_total 2"), "{m}");
    assert!(env
        .gw
        .log()
        .contains("admin: refused GET /admin/v1/keys from 127.0.0.1"));
    assert!(!env.gw.log().contains("wrong"));
    for _ in 0..3 {
        api.call(Some("wrong-again"), "GET", "/admin/v1/keys", None)
            .await;
    }
    let started = Instant::now();
    let (s, _) = api
        .call(Some("wrong-again"), "GET", "/admin/v1/keys", None)
        .await;
    assert_eq!(s, 401);
    assert!(
        started.elapsed() >= Duration::from_millis(100),
        "the 6th failure in a minute waits"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_account_token_sees_only_its_account() {
    let env = env().await;
    let api = Api { env: &env };
    let lead = |m: &'static str, p: String, b: Option<Value>| {
        let api = &api;
        async move { api.call(Some(ACME_LEAD), m, &p, b).await }
    };
    let (s, k) = lead(
        "POST",
        "/admin/v1/keys".into(),
        Some(json!({"name": "acme 1", "quota": 100})),
    )
    .await;
    assert_eq!(s, 201, "{k}");
    assert_eq!(k["account"], "acme", "created in its own account");
    let (_, list) = lead("GET", "/admin/v1/keys".into(), None).await;
    assert_eq!(list["total"], 1, "{list}");
    // Another account's key: 404, as for a key that does not exist.
    for (m, p) in [
        ("GET", "/admin/v1/keys/20"),
        ("PATCH", "/admin/v1/keys/20"),
        ("DELETE", "/admin/v1/keys/20"),
        ("POST", "/admin/v1/keys/20/disable"),
    ] {
        let (s, e) = lead(
            m,
            p.into(),
            if m == "PATCH" {
                Some(json!({"name": "x"}))
            } else {
                None
            },
        )
        .await;
        assert_eq!(s, 404, "{m} {p}: {e}");
        let (s2, e2) = lead(
            m,
            p.replace("20", "999"),
            if m == "PATCH" {
                Some(json!({"name": "x"}))
            } else {
                None
            },
        )
        .await;
        assert_eq!((s2, &e2["error"]["code"]), (404, &e["error"]["code"]));
    }
    let (s, _) = lead(
        "POST",
        "/admin/v1/keys".into(),
        Some(json!({"account": "globex"})),
    )
    .await;
    assert_eq!(s, 400);
    // Accounts are for unscoped tokens.
    let (s, _) = lead("GET", "/admin/v1/accounts".into(), None).await;
    assert_eq!(s, 403);
    let (s, _) = lead(
        "PATCH",
        "/admin/v1/accounts/acme".into(),
        Some(json!({"max_keys": 100})),
    )
    .await;
    assert_eq!(s, 403);
    // max_keys (3) holds: two more fit, the fourth is refused naming the limit.
    let (s, _) = lead("POST", "/admin/v1/keys".into(), Some(json!({"count": 2}))).await;
    assert_eq!(s, 201);
    let (s, e) = lead(
        "POST",
        "/admin/v1/keys".into(),
        Some(json!({"name": "one too many"})),
    )
    .await;
    assert_eq!(s, 400, "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("max_keys"),
        "{e}"
    );

    // The unscoped admin manages accounts.
    let (s, a) = api
        .admin(
            "POST",
            "/admin/v1/accounts",
            Some(json!({"id": "initech", "name": "Initech", "quota": 5})),
        )
        .await;
    assert_eq!((s, a["id"].as_str()), (201, Some("initech")));
    let (s, _) = api
        .admin("POST", "/admin/v1/accounts", Some(json!({"id": "initech"})))
        .await;
    assert_eq!(s, 409);
    let (s, a) = api
        .admin(
            "PATCH",
            "/admin/v1/accounts/initech",
            Some(json!({"quota": 50})),
        )
        .await;
    assert_eq!((s, a["quota"].as_i64()), (200, Some(50)));
    let (s, e) = api.admin("DELETE", "/admin/v1/accounts/acme", None).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (409, Some("account_in_use"))
    );
    let (s, _) = api
        .admin("DELETE", "/admin/v1/accounts/initech", None)
        .await;
    assert_eq!(s, 200);
    let (s, _) = api.admin("GET", "/admin/v1/accounts/initech", None).await;
    assert_eq!(s, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_a_precise_answer_and_changes_nothing() {
    let env = env().await;
    let api = Api { env: &env };
    let before = sync_bytes(&env);
    let cases: Vec<(&str, &str, Value, u16, Option<&str>)> = vec![
        (
            "POST",
            "/admin/v1/keys",
            json!({"nmae": "typo"}),
            400,
            Some("nmae"),
        ),
        (
            "POST",
            "/admin/v1/keys",
            json!({"name": "x".repeat(51)}),
            400,
            Some("name"),
        ),
        (
            "POST",
            "/admin/v1/keys",
            json!({"allow_ips": ["10.0.0/8"]}),
            400,
            Some("allow_ips"),
        ),
        (
            "POST",
            "/admin/v1/keys",
            json!({"group": "nope"}),
            400,
            Some("group"),
        ),
        (
            "POST",
            "/admin/v1/keys",
            json!({"account": "nope"}),
            400,
            Some("account"),
        ),
        (
            "POST",
            "/admin/v1/keys",
            json!({"quota": -1}),
            400,
            Some("quota"),
        ),
        (
            "POST",
            "/admin/v1/keys",
            json!({"count": 101}),
            400,
            Some("count"),
        ),
        (
            "POST",
            "/admin/v1/keys",
            json!({"limits": {"rpm": 0}}),
            400,
            Some("limits"),
        ),
        (
            "POST",
            "/admin/v1/keys",
            json!({"budget": {"period": "daily", "amount": 5, "timezone": "Mars/Base"}}),
            400,
            Some("budget"),
        ),
        (
            "PATCH",
            "/admin/v1/keys/999",
            json!({"name": "x"}),
            404,
            None,
        ),
        (
            "PATCH",
            "/admin/v1/keys/abc",
            json!({"name": "x"}),
            404,
            None,
        ),
        (
            "POST",
            "/admin/v1/keys/batch-delete",
            json!({"ids": []}),
            400,
            Some("ids"),
        ),
        ("PUT", "/admin/v1/keys", json!({}), 405, None),
    ];
    for (m, p, b, status, field) in cases {
        let (s, e) = api.admin(m, p, Some(b.clone())).await;
        assert_eq!(s, status, "{m} {p} {b}: {e}");
        if let Some(f) = field {
            assert_eq!(e["error"]["field"], f, "{m} {p} {b}: {e}");
        }
    }
    let (_, e) = api
        .admin(
            "POST",
            "/admin/v1/keys",
            Some(json!({"allow_ips": ["10.0.0/8"]})),
        )
        .await;
    assert!(
        e["error"]["message"].as_str().unwrap().contains("10.0.0/8"),
        "{e}"
    );
    // Malformed JSON, a body over 1 MiB, paging out of range.
    let c = client();
    let r = c
        .post(api.url("/admin/v1/keys"))
        .bearer_auth(ADMIN_TOKEN)
        .body("{\"name\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = c
        .post(api.url("/admin/v1/keys"))
        .bearer_auth(ADMIN_TOKEN)
        .body(vec![b' '; 1024 * 1024 + 1])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    // Well over the limit, declared or streamed: the client still reads the 413 (the rest of
    // the body is read first), not a connection reset under its upload.
    // (Three times each: a reset is a race the client wins now and then.)
    let big = vec![b' '; 7 * 1024 * 1024];
    for streamed in [false, true, false, true, false, true] {
        let body = if streamed {
            let chunks: Vec<_> = big
                .chunks(64 * 1024)
                .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
                .collect();
            reqwest::Body::wrap_stream(futures_util::stream::iter(chunks))
        } else {
            reqwest::Body::from(big.clone())
        };
        let r = c
            .post(api.url("/admin/v1/keys"))
            .bearer_auth(ADMIN_TOKEN)
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("streamed {streamed}: {e}"));
        assert_eq!(r.status(), 413, "streamed {streamed}");
    }
    // Exactly the limit is read (and is not JSON); a declared 2 MiB that never comes gets its
    // 413 once the 2 s of reading run out, not a connection held open.
    let r = c
        .post(api.url("/admin/v1/keys"))
        .bearer_auth(ADMIN_TOKEN)
        .body(vec![b' '; 1024 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let admin = env.gw.admin.as_ref().unwrap();
    let addr = admin.trim_start_matches("http://").parse().unwrap();
    let head = format!(
        "POST /admin/v1/keys HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\
         Content-Length: {}\r\n\r\n",
        2 * 1024 * 1024
    );
    let started = std::time::Instant::now();
    let got = tokio::task::spawn_blocking(move || {
        raw_exchange(addr, head.as_bytes(), false, Duration::from_secs(20))
    })
    .await
    .unwrap();
    assert!(got.starts_with("HTTP/1.1 413"), "{got}");
    assert!(started.elapsed() < Duration::from_secs(15), "{got}");
    // A client that waits for `100 Continue` before sending is refused before it sends.
    let head = format!(
        "POST /admin/v1/keys HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\
         Expect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        2 * 1024 * 1024
    );
    let got = tokio::task::spawn_blocking(move || {
        raw_exchange(addr, head.as_bytes(), false, Duration::from_secs(20))
    })
    .await
    .unwrap();
    assert!(got.starts_with("HTTP/1.1 413"), "{got}");
    for q in [
        "page_size=0",
        "page_size=10000",
        "page=0",
        "page=x",
        "state=weird",
    ] {
        let (s, _) = api.admin("GET", &format!("/admin/v1/keys?{q}"), None).await;
        assert_eq!(s, 400, "{q}");
    }
    assert_eq!(sync_bytes(&env), before, "nothing was written");
}

#[tokio::test(flavor = "multi_thread")]
async fn if_match_refuses_a_stale_revision() {
    let env = env().await;
    let api = Api { env: &env };
    let (_, list) = api.admin("GET", "/admin/v1/keys", None).await;
    let rev = list["revision"].as_u64().unwrap();
    let c = client();
    let patch = |rev: u64| {
        c.patch(api.url("/admin/v1/keys/1"))
            .bearer_auth(ADMIN_TOKEN)
            .header("if-match", format!("\"{rev}\""))
            .json(&json!({"name": "renamed"}))
            .send()
    };
    assert_eq!(patch(rev).await.unwrap().status(), 200);
    let r = patch(rev).await.unwrap();
    assert_eq!(r.status(), 412);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "revision_mismatch");
    assert_eq!(patch(rev + 1).await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_and_the_api_editing_at_once_lose_nothing() {
    let env = env().await;
    let api = Api { env: &env };
    let (_, before) = api.admin("GET", "/admin/v1/keys", None).await;
    let start_rev = before["revision"].as_u64().unwrap();
    let conf = env
        .dir
        .path()
        .join("keygate.yaml")
        .to_string_lossy()
        .into_owned();
    let cli = std::thread::spawn(move || {
        for i in 0..20 {
            let (ok, out) =
                keygate_cli(&["keys", "create", "--name", &format!("cli {i}"), "-c", &conf]);
            assert!(ok, "{out}");
        }
    });
    let mut calls = Vec::new();
    for i in 0..100 {
        let url = api.url("/admin/v1/keys");
        calls.push(tokio::spawn(async move {
            let r = client()
                .post(url)
                .bearer_auth(ADMIN_TOKEN)
                .json(&json!({"name": format!("api {i}")}))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }));
    }
    for c in calls {
        let (status, body) = c.await.unwrap();
        assert_eq!(status, 201, "{body}");
    }
    cli.join().unwrap();
    let file: Value = serde_json::from_slice(&sync_bytes(&env)).unwrap();
    let names: Vec<&str> = file["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.iter().filter(|n| n.starts_with("api ")).count(), 100);
    assert_eq!(names.iter().filter(|n| n.starts_with("cli ")).count(), 20);
    // Concurrent creates were coalesced: fewer rewrites than writes.
    let rewrites = file["revision"].as_u64().unwrap() - start_rev;
    assert!(rewrites < 120, "{rewrites} rewrites for 120 writes");
}

#[tokio::test(flavor = "multi_thread")]
async fn new_api_token_routes_keep_new_api_shapes() {
    let env = env().await;
    let api = Api { env: &env };
    // Create as new-api's web client does.
    let (s, r) = api
        .admin(
            "POST",
            "/api/token/",
            Some(json!({"name": "from new-api", "remain_quota": 5000, "expired_time": -1, "unlimited_quota": false,
                        "model_limits_enabled": true, "model_limits": "gpt-4o-mini,gpt-4o", "allow_ips": "127.0.0.1\n10.0.0.0/8",
                        "group": "", "cross_group_retry": false})),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(r["success"], true, "{r}");
    let id = r["data"]["id"].as_u64().unwrap();
    let key = format!("sk-{}", r["data"]["key"].as_str().unwrap());
    assert_eq!(chat_status(&env.gw.base, &key).await, 200);
    // List: new-api's page envelope, masked keys without sk-.
    let (s, r) = api.admin("GET", "/api/token/?p=1&size=5", None).await;
    assert_eq!((s, r["success"].as_bool()), (200, Some(true)));
    assert_eq!(r["data"]["page"], 1);
    assert_eq!(r["data"]["page_size"], 5);
    assert_eq!(r["data"]["total"], 11);
    let first = &r["data"]["items"][0];
    assert_eq!(first["id"], id, "newest first");
    assert_eq!(first["model_limits"], "gpt-4o-mini,gpt-4o");
    assert_eq!(first["allow_ips"], "127.0.0.1\n10.0.0.0/8");
    assert_eq!(first["status"], 1);
    assert!(
        first["key"].as_str().unwrap().contains("**********"),
        "{first}"
    );
    assert!(!first["key"].as_str().unwrap().starts_with("sk-"));
    assert!(
        first["remain_quota"].as_i64().unwrap() < 5000,
        "the call was charged"
    );
    // Search by name and by the full key.
    let (_, r) = api
        .admin("GET", "/api/token/search?keyword=NEW-API", None)
        .await;
    assert_eq!(r["data"]["items"][0]["id"], id);
    let (_, r) = api
        .admin("GET", &format!("/api/token/search?token={key}"), None)
        .await;
    assert_eq!(r["data"]["total"], 1);
    // Get, update, status-only update.
    let (_, r) = api.admin("GET", &format!("/api/token/{id}"), None).await;
    assert_eq!(r["data"]["name"], "from new-api");
    let mut t = r["data"].clone();
    t["remain_quota"] = json!(100000);
    t["name"] = json!("renamed");
    let (_, r) = api
        .call(Some(ADMIN_TOKEN), "PUT", "/api/token/", Some(t))
        .await;
    assert_eq!(r["success"], true, "{r}");
    assert_eq!(r["data"]["remain_quota"], 100000);
    assert_eq!(r["data"]["name"], "renamed");
    let (_, r) = api
        .admin(
            "PUT",
            "/api/token/?status_only=true",
            Some(json!({"id": id, "status": 2})),
        )
        .await;
    assert_eq!(r["data"]["status"], 2, "{r}");
    assert_eq!(chat_status(&env.gw.base, &key).await, 401);
    // A refusal is new-api's envelope: HTTP 200, success false, a message.
    let (s, r) = api
        .admin("POST", "/api/token/", Some(json!({"name": "x".repeat(51)})))
        .await;
    assert_eq!((s, r["success"].as_bool()), (200, Some(false)));
    assert!(r["message"].as_str().unwrap().contains("50"));
    let (_, r) = api.admin("GET", "/api/token/999", None).await;
    assert_eq!(r["success"], false);
    // The key route: not recoverable without a vault.
    let (_, r) = api
        .admin("POST", &format!("/api/token/{id}/key"), None)
        .await;
    assert_eq!(r["success"], false);
    assert!(r["message"].as_str().unwrap().contains("rotate"), "{r}");
    // Delete and batch delete; the New-Api-User header is accepted.
    let r = client()
        .delete(api.url(&format!("/api/token/{id}/")))
        .bearer_auth(ADMIN_TOKEN)
        .header("New-Api-User", "1")
        .send()
        .await
        .unwrap();
    let r: Value = r.json().await.unwrap();
    assert_eq!(r["success"], true);
    let (_, r) = api
        .admin(
            "POST",
            "/api/token/batch",
            Some(json!({"ids": [1, 2, 999]})),
        )
        .await;
    assert_eq!(
        (r["success"].as_bool(), r["data"].as_u64()),
        (Some(true), Some(2))
    );
    let (_, r) = api.admin("GET", "/api/token/?p=1&size=100", None).await;
    assert_eq!(r["data"]["total"], 8);
}

/// The OpenAPI document matches what the server does: schemathesis (a property-based API
/// fuzzer, installed by scripts/setup-test.sh) finds no 5xx, no undocumented status, no
/// response that breaks its schema.
#[tokio::test(flavor = "multi_thread")]
async fn the_openapi_document_matches_the_server_under_a_fuzzer() {
    let Some(st) = ["schemathesis", "st"].into_iter().find(|b| {
        std::process::Command::new(b)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    }) else {
        assert!(
            std::env::var_os("KEYGATE_REQUIRE_SDK").is_none(),
            "schemathesis is not installed (scripts/setup-test.sh installs it)"
        );
        eprintln!("skipped: schemathesis is not installed");
        return;
    };
    let env = env().await;
    let base = env.gw.admin.clone().unwrap();
    let (s, doc) = Api { env: &env }
        .call(None, "GET", "/admin/v1/openapi.json", None)
        .await;
    assert_eq!(s, 200);
    assert_eq!(doc["openapi"], "3.0.3");
    let reports = env.dir.path().join("st");
    // Run from the test's own folder: schemathesis keeps a cache in its working directory.
    let cwd = env.dir.path().to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(st)
            .current_dir(cwd)
            .args(["run", &format!("{base}/admin/v1/openapi.json")])
            .args(["--url", &base])
            .args(["-H", &format!("Authorization: Bearer {ADMIN_TOKEN}")])
            .args([
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
            ])
            .args(["--max-examples", "15", "--seed", "1", "--workers", "2", "--max-time", "60"])
            .args(["--phases", "examples,fuzzing"])
            // Long-polls up to 30 s by design; tested in tests/fleet.rs.
            .args(["--exclude-operation-id", "sync"])
            .args(["--report-dir", &reports.to_string_lossy()])
            .arg("--no-color")
            .env("SCHEMATHESIS_HOOKS", "")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(out.status.success(), "schemathesis found failures:\n{text}");
    assert!(!env.gw.log().contains("panicked"), "{}", env.gw.log());
}

const VAULT_SECRET: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

#[tokio::test(flavor = "multi_thread")]
async fn with_a_vault_the_api_reveals_keys_it_created_ten_a_minute() {
    let mock = MockBackend::start("127.0.0.1:0").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let opts = Opts {
        sync: sync_with_accounts(),
        extra: format!(
            "{}key_vault: {{ secret_env: KG_TEST_VAULT }}\n",
            admin_extra()
        ),
        ..Opts::default()
    };
    std::fs::write(
        dir.path().join("keys.json"),
        serde_json::to_vec_pretty(&opts.sync).unwrap(),
    )
    .unwrap();
    let config = dir.path().join("keygate.yaml");
    std::fs::write(
        &config,
        config_yaml(&opts, &format!("http://{}", mock.addr())),
    )
    .unwrap();
    let gw = spawn_keygate_env(dir.path(), &config, &[], &[("KG_TEST_VAULT", VAULT_SECRET)]);
    let env = Env { mock, gw, dir };
    let api = Api { env: &env };
    let (_, who) = api.admin("GET", "/admin/v1/session", None).await;
    assert_eq!(who["vault"], true);
    let (s, k) = api
        .admin(
            "POST",
            "/admin/v1/keys",
            Some(json!({"name": "sealed", "quota": 1000000})),
        )
        .await;
    assert_eq!(s, 201);
    let (id, secret) = (
        k["id"].as_u64().unwrap(),
        k["secret"].as_str().unwrap().to_string(),
    );
    assert_eq!(
        k["key_hint"].as_str().unwrap(),
        format!("{}**********{}", &secret[..7], &secret[secret.len() - 4..])
    );
    // Stored sealed, in the file or its journal.
    let stored = ["keys.json", "keys.json.journal"]
        .map(|f| std::fs::read_to_string(env.dir.path().join(f)).unwrap_or_default())
        .concat();
    assert!(stored.contains("key_sealed") && !stored.contains(&secret[3..]));
    let (_, got) = api
        .admin("GET", &format!("/admin/v1/keys/{id}"), None)
        .await;
    assert_eq!(got["revealable"], true);
    // Reveal gives back the key that serves; a viewer may not.
    let (s, r) = api
        .admin("POST", &format!("/admin/v1/keys/{id}/reveal"), None)
        .await;
    assert_eq!((s, r["secret"].as_str()), (200, Some(secret.as_str())));
    assert_eq!(chat_status(&env.gw.base, &secret).await, 200);
    let (s, _) = api
        .call(
            Some(VIEWER),
            "POST",
            &format!("/admin/v1/keys/{id}/reveal"),
            None,
        )
        .await;
    assert_eq!(s, 403);
    // new-api's key route: the key without sk-.
    let (_, r) = api
        .admin("POST", &format!("/api/token/{id}/key"), None)
        .await;
    assert_eq!(r["data"]["key"].as_str(), Some(&secret[3..]), "{r}");
    // A rotated key is sealed too.
    let (_, rot) = api
        .admin("POST", &format!("/admin/v1/keys/{id}/rotate"), None)
        .await;
    let new = rot["secret"].as_str().unwrap().to_string();
    let (_, r) = api
        .admin("POST", &format!("/admin/v1/keys/{id}/reveal"), None)
        .await;
    assert_eq!(r["secret"].as_str(), Some(new.as_str()));
    // A sealed value edited by hand is refused, not decrypted to garbage. A hand edit waits
    // for the journal to be folded into the file (README, "Admin API").
    let journal = env.dir.path().join("keys.json.journal");
    let started = Instant::now();
    while std::fs::metadata(&journal).is_ok_and(|m| m.len() > 0) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never compacted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let path = env.dir.path().join("keys.json");
    let mut file: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let rev = file["revision"].as_u64().unwrap();
    file["revision"] = json!(rev + 1);
    for k in file["keys"].as_array_mut().unwrap() {
        if k["id"] == id {
            let sealed = k["key_sealed"].as_str().unwrap();
            let mut chars: Vec<char> = sealed.chars().collect();
            let at = chars.len() - 3;
            chars[at] = if chars[at] == 'A' { 'B' } else { 'A' };
            k["key_sealed"] = json!(chars.into_iter().collect::<String>());
        }
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&file).unwrap()).unwrap();
    let (s, e) = api
        .admin("POST", &format!("/admin/v1/keys/{id}/reveal"), None)
        .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (409, Some("sealed_value_invalid")),
        "{e}"
    );
    assert!(!e.to_string().contains(&new[3..]));
    // Ten a minute per token: four were made above, six more pass the limit, the 11th is 429.
    for _ in 0..6 {
        let (s, _) = api
            .admin("POST", &format!("/admin/v1/keys/{id}/reveal"), None)
            .await;
        assert_eq!(s, 409);
    }
    let (s, e) = api
        .admin("POST", &format!("/admin/v1/keys/{id}/reveal"), None)
        .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (429, Some("rate_limited"))
    );
    // Audited (the three that gave a key), never the key.
    let audit = std::fs::read_to_string(env.dir.path().join("var/audit.jsonl")).unwrap();
    assert_eq!(audit.matches("\"key.reveal\"").count(), 3, "{audit}");
    for s in [&secret[3..], &new[3..]] {
        assert!(!audit.contains(s));
        assert!(!env.gw.log().contains(s));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_usage_store_is_queried_on_the_admin_listener() {
    let env = env().await;
    let api = Api { env: &env };
    for _ in 0..3 {
        assert_eq!(chat_status(&env.gw.base, OK).await, 200);
    }
    let globex = "sk-test-globex-0000000000000000000000000000000000000";
    assert_eq!(chat_status(&env.gw.base, globex).await, 200);
    // Rows are written off the request path: wait for them.
    let deadline = Instant::now() + Duration::from_secs(10);
    let logs = loop {
        let (s, logs) = api.admin("GET", "/admin/v1/logs?page_size=10", None).await;
        assert_eq!(s, 200, "{logs}");
        if logs["items"].as_array().unwrap().len() >= 4 || Instant::now() > deadline {
            break logs;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(logs["total"], 4, "{logs}");
    assert_eq!(logs["items"][0]["key_id"], 20, "newest first");
    let (_, mine) = api.admin("GET", "/admin/v1/logs?key_id=1", None).await;
    assert_eq!(mine["total"], 3);
    let (s, e) = api
        .admin("GET", "/admin/v1/logs?start=yesterday", None)
        .await;
    assert_eq!(s, 400, "{e}");
    // Stats from the roll-ups.
    let (s, stats) = api
        .admin("GET", "/admin/v1/stats?key_id=1&bucket=day", None)
        .await;
    assert_eq!(s, 200);
    let requests: i64 = stats["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["requests"].as_i64().unwrap())
        .sum();
    assert_eq!(requests, 3, "{stats}");
    // CSV, streamed.
    let r = client()
        .get(api.url("/admin/v1/logs.csv?key_id=1"))
        .bearer_auth(VIEWER)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/csv"));
    let csv = r.text().await.unwrap();
    assert_eq!(csv.lines().count(), 4, "a header and three rows:\n{csv}");
    // An account-scoped token sees its account's calls only (acme has none).
    let (_, scoped) = api
        .call(Some(ACME_LEAD), "GET", "/admin/v1/logs?key_id=20", None)
        .await;
    assert_eq!(scoped["total"], 0, "{scoped}");
    // Key holders on the admin listener, by their key.
    let r = client()
        .get(api.url("/api/log/token"))
        .bearer_auth(OK)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        (v["success"].as_bool(), v["data"].as_array().map(Vec::len)),
        (Some(true), Some(3))
    );
    let r = client()
        .get(api.url("/api/usage/token/"))
        .bearer_auth(OK)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(v["data"]["total_used"].as_i64().unwrap() > 0, "{v}");
    let r = client()
        .get(api.url("/api/usage/token/stats?bucket=hour&days=1"))
        .bearer_auth(OK)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client()
        .get(api.url("/api/log/token"))
        .bearer_auth(DISABLED)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client()
        .get(api.url("/api/log/token"))
        .bearer_auth("sk-nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}
