//! Accounts, rate limits and budget periods (SPEC §7) end to end: a real mock upstream, a real
//! gateway process, HTTP.

mod common;

use common::*;
use keygate::core::accounts::account_ledger_id;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn acct_key(i: usize) -> String {
    format!("sk-acct-{i:045}")
}

/// The standard sync file plus account `acme` (with `account`'s fields) and ten keys 101..=110
/// in it (with `key`'s fields).
fn sync_with(account: Value, key: Value) -> Value {
    let mut s = standard_sync();
    let mut a = json!({"name": "Acme Corp", "quota": 1_000_000_000});
    merge(&mut a, &account);
    s["accounts"] = json!({ "acme": a });
    for i in 0..10 {
        let mut k = json!({"id": 101 + i, "name": format!("acme {i}"), "key": acct_key(i),
                           "account": "acme", "unlimited_quota": true});
        merge(&mut k, &key);
        s["keys"].as_array_mut().unwrap().push(k);
    }
    s
}

fn merge(into: &mut Value, from: &Value) {
    if let Some(m) = from.as_object() {
        for (k, v) in m {
            into[k] = v.clone();
        }
    }
}

fn small_call() -> String {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 20}).to_string()
}

async fn post(env: &Env, key: &str, body: String) -> reqwest::Response {
    client()
        .post(env.url("/v1/chat/completions"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
}

async fn detail(env: &Env, key: &str) -> Value {
    let (status, body) = env.gw.get("/api/usage/token/detail", key).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap()
}

/// What one `small_call` reserves and is charged (the mock answers 20 completion tokens).
async fn one_call_price(env: &Env) -> i64 {
    let before = env.gw.total_used(OK).await;
    assert_eq!(post(env, OK, small_call()).await.status(), 200);
    env.gw.wait_records(1).await;
    env.gw.total_used(OK).await - before
}

#[tokio::test(flavor = "multi_thread")]
async fn unlimited_keys_in_a_limited_account_stop_when_the_account_is_spent() {
    // Find one call's price on a plain key first.
    let probe = Env::start().await;
    let price = one_call_price(&probe).await;
    drop(probe);
    let quota = 10 * price;
    let env = Env::with(Opts {
        sync: sync_with(json!({ "quota": quota }), json!({})),
        ..Opts::default()
    })
    .await;
    let c = client();
    let body = small_call();
    let calls = (0..100).map(|i| {
        c.post(env.url("/v1/chat/completions"))
            .bearer_auth(acct_key(i % 10))
            .header("x-mock-delay-ms", "200")
            .body(body.clone())
            .send()
    });
    let results = futures_util::future::join_all(calls).await;
    let mut ok = 0;
    for r in results {
        let r = r.unwrap();
        match r.status().as_u16() {
            200 => ok += 1,
            429 => {
                let v: Value = r.json().await.unwrap();
                assert_eq!(v["error"]["code"], "insufficient_quota");
                assert!(
                    v["error"]["message"].as_str().unwrap().contains("\"acme\""),
                    "{v}"
                );
            }
            s => panic!("unexpected status {s}"),
        }
    }
    assert!(
        (1..=10).contains(&ok),
        "{ok} calls admitted for room for 10"
    );
    env.gw.wait_records(ok).await;
    let d = detail(&env, &acct_key(0)).await;
    let used = d["account"]["quota"]["total_used"].as_i64().unwrap();
    assert_eq!(used, ok as i64 * price, "{d}");
    assert!(used <= quota);
    assert_eq!(env.mock.request_count(), ok);
}

#[tokio::test(flavor = "multi_thread")]
async fn account_consumption_survives_a_restart_and_never_meets_a_key_id() {
    let mut env = Env::with(Opts {
        sync: sync_with(json!({ "quota": 1_000_000 }), json!({})),
        ..Opts::default()
    })
    .await;
    for i in 0..3 {
        assert_eq!(post(&env, &acct_key(i), small_call()).await.status(), 200);
    }
    env.gw.wait_records(3).await;
    let before = detail(&env, &acct_key(0)).await["account"]["quota"]["total_used"]
        .as_i64()
        .unwrap();
    assert!(before > 0);
    assert!(env.gw.terminate().success());
    // The snapshot holds the account under its own tagged counter id.
    let snap = std::fs::read_to_string(env.dir.path().join("var/ledger.snapshot")).unwrap();
    assert!(
        snap.contains(&format!("\"{}\":{before}", account_ledger_id("acme"))),
        "{snap}"
    );
    env.gw = start_gateway(
        env.dir.path(),
        &Opts {
            sync: sync_with(json!({ "quota": 1_000_000 }), json!({})),
            ..Opts::default()
        },
        &format!("http://{}", env.mock.addr()),
    );
    let d = detail(&env, &acct_key(5)).await;
    assert_eq!(d["account"]["quota"]["total_used"], before, "{d}");
    // Key 106 never called: its own counter is untouched.
    assert_eq!(d["key"]["quota"]["total_used"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn disabled_account_refuses_its_keys_with_401() {
    let env = Env::with(Opts {
        sync: sync_with(json!({ "status": "disabled" }), json!({})),
        ..Opts::default()
    })
    .await;
    let (status, code, _) = denial(post(&env, &acct_key(0), small_call()).await).await;
    assert_eq!((status, code.as_str()), (401, "account_disabled"));
    assert_eq!(post(&env, OK, small_call()).await.status(), 200);
    assert_eq!(env.mock.request_count(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn rpm_refuses_with_retry_after_and_headers_count_down() {
    let env = Env::with(Opts {
        sync: sync_with(json!({}), json!({"limits": {"rpm": 3}})),
        ..Opts::default()
    })
    .await;
    let k = acct_key(0);
    let r = post(&env, &k, small_call()).await;
    assert_eq!(r.status(), 200);
    let h = r.headers();
    assert_eq!(h["x-ratelimit-limit-requests"], "3");
    assert_eq!(h["x-ratelimit-remaining-requests"], "2");
    assert_eq!(h["x-ratelimit-reset-requests"], "20s");
    assert_eq!(h["ratelimit-policy"], "\"requests\";q=3;w=60");
    assert_eq!(h["ratelimit"], "\"requests\";r=2;t=20");
    assert!(h.get("x-ratelimit-limit-tokens").is_none());
    for _ in 0..2 {
        assert_eq!(post(&env, &k, small_call()).await.status(), 200);
    }
    let r = post(&env, &k, small_call()).await;
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=20).contains(&retry), "{retry}");
    assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "0");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert_eq!(v["error"]["type"], "requests");
    // Another key of the same account has its own bucket; a key without limits sends none.
    assert_eq!(post(&env, &acct_key(1), small_call()).await.status(), 200);
    let r = post(&env, OK, small_call()).await;
    assert!(r.headers().get("x-ratelimit-limit-requests").is_none());
    assert!(r.headers().get("ratelimit").is_none());
}

/// Every answer to a limited key carries the headers, as its buckets stand: refusals that come
/// before its limits are taken (its model, its body) and keygate's own answers too; nothing is
/// taken for them. A key without limits gets none on the same answers.
#[tokio::test(flavor = "multi_thread")]
async fn answers_before_the_limits_are_taken_carry_the_headers_too() {
    let env = Env::with(Opts {
        sync: sync_with(
            json!({"limits": {"tpm": 100_000}}),
            json!({"limits": {"rpm": 3}}),
        ),
        ..Opts::default()
    })
    .await;
    let k = acct_key(0);
    assert_eq!(post(&env, &k, small_call()).await.status(), 200);
    let unknown_model =
        json!({"model": "no-such-model", "messages": [{"role": "user", "content": "Hi"}]});
    let no_model = json!({"messages": [{"role": "user", "content": "Hi"}]});
    for key in [k.as_str(), OK] {
        let limited = key != OK;
        let mut answers = Vec::new();
        for body in [&unknown_model, &no_model] {
            answers.push(post(&env, key, body.to_string()).await);
        }
        for path in ["/v1/models", "/api/usage/token/", "/api/usage/token/detail"] {
            let r = client()
                .get(env.url(path))
                .bearer_auth(key)
                .send()
                .await
                .unwrap();
            answers.push(r);
        }
        for r in answers {
            let (status, h) = (r.status(), r.headers());
            assert!([200, 400, 404].contains(&status.as_u16()), "{status}");
            if !limited {
                assert!(h.get("x-ratelimit-limit-requests").is_none(), "{status}");
                assert!(h.get("ratelimit-policy").is_none(), "{status}");
                continue;
            }
            // The admitted call took one request; none of these took any.
            assert_eq!(h["x-ratelimit-limit-requests"], "3", "{status}");
            assert_eq!(h["x-ratelimit-remaining-requests"], "2", "{status}");
            assert_eq!(h["x-ratelimit-limit-tokens"], "100000", "{status}");
            assert_eq!(
                h["ratelimit-policy"], "\"requests\";q=3;w=60, \"tokens\";q=100000;w=60",
                "{status}"
            );
        }
    }
    // Nothing was taken: two more calls fit in the rpm of 3, the next is refused.
    for _ in 0..2 {
        assert_eq!(post(&env, &k, small_call()).await.status(), 200);
    }
    assert_eq!(post(&env, &k, small_call()).await.status(), 429);
}

#[tokio::test(flavor = "multi_thread")]
async fn account_rpm_is_shared_by_its_keys_and_group_limits_are_defaults() {
    let mut sync = sync_with(json!({"limits": {"rpm": 4}}), json!({}));
    sync["groups"]["default"]["limits"] = json!({"rpm": 2});
    let env = Env::with(Opts {
        sync,
        ..Opts::default()
    })
    .await;
    let mut ok = 0;
    for i in 0..8 {
        if post(&env, &acct_key(i), small_call()).await.status() == 200 {
            ok += 1;
        }
    }
    assert_eq!(ok, 4, "the account's 4 rpm bound its keys");
    // The `OK` key (group default, no account) gets the group's 2 rpm.
    let statuses: Vec<u16> =
        futures_util::future::join_all((0..3).map(|_| post(&env, OK, small_call())))
            .await
            .into_iter()
            .map(|r| r.status().as_u16())
            .collect();
    assert_eq!(
        statuses.iter().filter(|&&s| s == 200).count(),
        2,
        "{statuses:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tpm_refuses_a_request_bigger_than_the_limit_without_retry_after() {
    let env = Env::with(Opts {
        sync: sync_with(json!({}), json!({"limits": {"tpm": 100}})),
        ..Opts::default()
    })
    .await;
    let k = acct_key(0);
    let big = json!({"model": "gpt-4o-mini", "messages": [], "max_tokens": 500}).to_string();
    let r = post(&env, &k, big).await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().get("retry-after").is_none());
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        (v["error"]["code"].as_str(), v["error"]["type"].as_str()),
        (Some("rate_limit_exceeded"), Some("tokens"))
    );
    // Small calls fit, until the minute's tokens are used; the headers show the tokens.
    let r = post(&env, &k, small_call()).await;
    assert_eq!(r.status(), 200);
    let left: u64 = r.headers()["x-ratelimit-remaining-tokens"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(left < 100, "{left}");
    let mut refused = None;
    for _ in 0..10 {
        let r = post(&env, &k, small_call()).await;
        if r.status() == 429 {
            refused = Some(r);
            break;
        }
    }
    let r = refused.expect("the tpm bucket ran dry");
    assert!(r.headers().get("retry-after").is_some());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "tokens");
}

#[tokio::test(flavor = "multi_thread")]
async fn spent_daily_budget_refuses_with_seconds_to_midnight() {
    let env = Env::with(Opts {
        sync: sync_with(
            json!({}),
            json!({"budget": {"period": "daily", "amount": 1}}),
        ),
        ..Opts::default()
    })
    .await;
    let k = acct_key(0);
    // The first call's reservation does not fit a budget of 1 unit.
    let r = post(&env, &k, small_call()).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert_eq!(r.status(), 429);
    let retry: i64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let to_midnight = 86_400 - now.rem_euclid(86_400);
    assert!((retry - to_midnight).abs() <= 2, "{retry} vs {to_midnight}");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "budget_exceeded");
    let d = detail(&env, &k).await;
    assert_eq!(d["key"]["budget"]["amount"], 1);
    assert_eq!(d["key"]["budget"]["spent"], 0);
    assert_eq!(
        d["key"]["budget"]["resets_at"].as_i64().unwrap(),
        now - now.rem_euclid(86_400) + 86_400
    );
    // Anthropic clients get a rate_limit_error, Gemini clients RESOURCE_EXHAUSTED.
    let r = client()
        .post(env.url("/v1/messages"))
        .header("x-api-key", &k)
        .body(
            json!({"model": "claude-3-5-sonnet-latest", "max_tokens": 20, "messages": []})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().get("retry-after").is_some());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error");
    let r = client()
        .post(env.url("/v1beta/models/gemini-1.5-pro:generateContent"))
        .header("x-goog-api-key", &k)
        .body(json!({"contents": [{"parts": [{"text": "Hi"}]}]}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().get("retry-after").is_some());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["status"], "RESOURCE_EXHAUSTED", "{v}");
    assert_eq!(v["error"]["code"], 429, "{v}");
    assert_eq!(env.mock.request_count(), 0);
}

/// The detail answer states each scope's limits as their buckets stand, what its budget
/// period spent, and an account's `used` baseline counts against its quota.
#[tokio::test(flavor = "multi_thread")]
async fn the_detail_answer_states_limits_spending_and_the_accounts_baseline() {
    let limits = json!({"rpm": 10, "tpm": 1000, "concurrency": 3});
    let budget = json!({"period": "daily", "amount": 1_000_000_000});
    let env = Env::with(Opts {
        sync: sync_with(
            json!({"quota": 1_000_000_000, "used": 400_000_000, "budget": budget}),
            json!({"limits": limits, "budget": budget}),
        ),
        ..Opts::default()
    })
    .await;
    let k = acct_key(0);
    let r = post(&env, &k, small_call()).await;
    assert_eq!(r.status(), 200);
    env.gw.wait_records(1).await;
    let charged = env.gw.usage_records()[0]["quota"].as_i64().unwrap();
    assert!(charged > 0);
    let d = detail(&env, &k).await;
    let key = &d["key"];
    assert_eq!(key["budget"]["spent"], charged, "{d}");
    assert_eq!(key["budget"]["remaining"], 1_000_000_000 - charged, "{d}");
    let rpm = &key["limits"]["rpm"];
    assert_eq!(
        (rpm["limit"].as_u64(), rpm["remaining"].as_u64()),
        (Some(10), Some(9)),
        "{d}"
    );
    // One request of 10 a minute comes back in 6 s (less the time since the call).
    assert!(
        (1..=6).contains(&rpm["reset_seconds"].as_u64().unwrap()),
        "{d}"
    );
    // The call's real tokens were taken (its estimate, a few more, corrected at settle), and
    // refill at 1000 a minute: full again within 3 s.
    let tpm = &key["limits"]["tpm"];
    let left = tpm["remaining"].as_u64().unwrap();
    let used_tokens = 1 + small_call().len() as u64 / 4 + 20;
    assert!((1000 - used_tokens..=1000).contains(&left), "{d}");
    assert!(tpm["reset_seconds"].as_u64().unwrap() <= 3, "{d}");
    assert_eq!(
        key["limits"]["concurrency"],
        json!({"limit": 3, "remaining": 3, "reset_seconds": 0})
    );
    let account = &d["account"];
    assert_eq!(account["id"], "acme");
    assert_eq!(account["budget"]["spent"], charged, "{d}");
    // The baseline plus the call.
    assert_eq!(account["quota"]["total_used"], 400_000_000 + charged, "{d}");
    assert_eq!(
        account["quota"]["total_available"],
        600_000_000 - charged,
        "{d}"
    );
    assert_eq!(account["limits"], json!({}), "{d}");

    // A baseline that leaves less than a call: the account refuses, by name.
    let env = Env::with(Opts {
        sync: sync_with(json!({"quota": 1_000_000, "used": 999_999}), json!({})),
        ..Opts::default()
    })
    .await;
    let r = post(&env, &k, small_call()).await;
    assert_eq!(r.status(), 429);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "insufficient_quota");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("The account \"acme\" has 1 "),
        "{message}"
    );
    assert_eq!(env.mock.request_count(), 0);
}

/// tpm takes the call's estimate at admission and the real count at settle: a call that asks
/// for 500 completion tokens and uses 20 leaves room for another like it under tpm 1000.
#[tokio::test(flavor = "multi_thread")]
async fn tpm_takes_the_real_count_at_settle() {
    let env = Env::with(Opts {
        sync: sync_with(json!({}), json!({"limits": {"tpm": 1000}})),
        ..Opts::default()
    })
    .await;
    let k = acct_key(0);
    let big = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}],
                     "max_tokens": 500})
    .to_string();
    for i in 0..3 {
        let r = post(&env, &k, big.clone()).await;
        assert_eq!(r.status(), 200, "call {i}");
        // Taken at admission: the estimate (over 500 tokens of 1000).
        let left: u64 = r.headers()["x-ratelimit-remaining-tokens"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(left < 500, "call {i}: {left}");
        env.gw.wait_records(i + 1).await;
    }
    // Settled at 20 completion tokens each: most of the minute's tokens are left.
    let d = detail(&env, &k).await;
    let left = d["key"]["limits"]["tpm"]["remaining"].as_u64().unwrap();
    assert!(left >= 850, "{d}");
}

/// Concurrency slots come back on every exit path, not only a client that leaves: an upstream
/// error, an upstream that cannot be reached, an upstream timeout.
#[tokio::test(flavor = "multi_thread")]
async fn concurrency_slots_come_back_after_upstream_errors_and_timeouts() {
    let env = Env::with(Opts {
        sync: sync_with(
            json!({"limits": {"concurrency": 5}}),
            json!({"limits": {"concurrency": 1}}),
        ),
        upstream_extra: "    read_timeout_seconds: 1\n".into(),
        ..Opts::default()
    })
    .await;
    let k = acct_key(0);
    let with = |name: &'static str, value: &'static str| {
        client()
            .post(env.url("/v1/chat/completions"))
            .bearer_auth(&k)
            .header(name, value)
            .body(small_call())
            .send()
    };
    for _ in 0..3 {
        assert_eq!(with("x-mock-status", "500").await.unwrap().status(), 500);
        slots_back(&env, "after an upstream error").await;
        let (status, code, _) = denial(with("x-mock-delay-ms", "3000").await.unwrap()).await;
        assert_eq!((status, code.as_str()), (504, "upstream_timeout"));
        slots_back(&env, "after an upstream timeout").await;
    }
    assert_eq!(post(&env, &k, small_call()).await.status(), 200);
    // An upstream that is not there at all.
    let env = Env::with(Opts {
        sync: sync_with(json!({}), json!({"limits": {"concurrency": 1}})),
        upstream_url: Some(format!("http://127.0.0.1:{}", free_port())),
        ..Opts::default()
    })
    .await;
    for _ in 0..3 {
        let (status, code, _) = denial(post(&env, &k, small_call()).await).await;
        assert_eq!((status, code.as_str()), (502, "upstream_error"));
        slots_back(&env, "after an upstream that refused the connection").await;
    }
}

/// Refusals of SPEC §7 count by reason, and with `metrics.per_key` each account has its
/// series.
#[tokio::test(flavor = "multi_thread")]
async fn limit_refusals_count_by_reason_and_accounts_have_series() {
    let mut sync = sync_with(json!({}), json!({"limits": {"rpm": 1}}));
    sync["accounts"]["off"] = json!({"name": "Off", "quota": 1000, "status": "disabled"});
    sync["accounts"]["poor"] = json!({"name": "Poor", "quota": 1});
    // acct_key(i) is the sync file's key 9 + i.
    let keys = sync["keys"].as_array_mut().unwrap();
    keys[10]["account"] = json!("off");
    keys[11]["account"] = json!("poor");
    keys[11]["limits"] = json!(null);
    keys[12]["limits"] = json!(null);
    keys[12]["budget"] = json!({"period": "daily", "amount": 1});
    let env = Env::with(Opts {
        sync,
        extra: "metrics: { per_key: true }".into(),
        ..Opts::default()
    })
    .await;
    assert_eq!(post(&env, &acct_key(0), small_call()).await.status(), 200);
    for (key, code) in [
        (0, "rate_limit_exceeded"),
        (1, "account_disabled"),
        (2, "insufficient_quota"),
        (3, "budget_exceeded"),
    ] {
        let (_, got, _) = denial(post(&env, &acct_key(key), small_call()).await).await;
        assert_eq!(got, code, "key {key}");
    }
    env.gw.wait_records(1).await;
    let charged = env.gw.usage_records()[0]["quota"].as_f64().unwrap();
    // Counted in the logging phase, after the answer was sent: waited for (at most 10 s).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = env.gw.metrics_text().await;
        let value = |prefix: &str, labels: &[&str]| -> f64 {
            text.lines()
                .filter(|l| l.starts_with(prefix) && labels.iter().all(|x| l.contains(x)))
                .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
                .sum()
        };
        let denied = |reason: &str| {
            let label = format!("reason=\"{reason}\"");
            value("keygate_requests_total{", &["outcome=\"denied\"", &label])
        };
        // Per account: acme's admitted call and two refusals (key 0's rpm, key 3's budget),
        // poor's refusal. (A refusal in the key's own checks, as a disabled account's, names no
        // key.)
        let (acme, requests) = ("account=\"acme\"", "keygate_account_requests_total{");
        let seen = [
            denied("rate_limit_exceeded"),
            denied("account_disabled"),
            denied("insufficient_quota"),
            denied("budget_exceeded"),
            value(requests, &[acme, "outcome=\"admitted\""]),
            value(requests, &[acme, "outcome=\"denied\""]),
            value(requests, &["account=\"poor\"", "outcome=\"denied\""]),
            value("keygate_account_quota_consumed_total{", &[acme]),
        ];
        let want = [1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 1.0, charged];
        if seen == want {
            break;
        }
        assert!(Instant::now() < deadline, "{seen:?} != {want:?}\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn inflight(env: &Env, scope: &str) -> i64 {
    let text = env.gw.metrics_text().await;
    let line = format!("keygate_limit_inflight{{scope=\"{scope}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&line))
        .unwrap_or_else(|| panic!("no {line} in metrics"))
        .trim()
        .parse()
        .unwrap()
}

async fn stream(env: &Env, key: &str) -> reqwest::Response {
    client()
        .post(env.url("/v1/chat/completions"))
        .bearer_auth(key)
        .header("x-mock-delay-ms", "100")
        .header("x-mock-chunks", "50")
        .body(json!({"model": "gpt-4o-mini", "stream": true, "messages": []}).to_string())
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrency_slots_come_back_after_100_clients_leave_mid_stream() {
    let env = Env::with(Opts {
        sync: sync_with(
            json!({"limits": {"concurrency": 10}}),
            json!({"limits": {"concurrency": 2}}),
        ),
        ..Opts::default()
    })
    .await;
    let k = acct_key(0);
    let mut a = stream(&env, &k).await;
    assert_eq!(a.status(), 200);
    a.chunk().await.unwrap();
    let _b = stream(&env, &k).await;
    let r = stream(&env, &k).await;
    assert_eq!(r.status(), 429);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "concurrency");
    assert_eq!(inflight(&env, "key").await, 2);
    assert_eq!(inflight(&env, "account").await, 2);
    drop((a, _b));
    // 100 clients, ten at a time, each reading one chunk and going away. A round starts once
    // the last one's slots are back: the gateway sees a client gone at its next write (the
    // stream's next chunk), so a round started at once could find them still held.
    for round in 0..10 {
        slots_back(&env, &format!("before round {round}")).await;
        let batch = (0..10).map(|i| {
            let env = &env;
            async move {
                let mut r = stream(env, &acct_key(i)).await;
                assert_eq!(r.status(), 200, "round {round}");
                r.chunk().await.unwrap();
            }
        });
        futures_util::future::join_all(batch).await;
    }
    slots_back(&env, "after the last round").await;
    assert_eq!(stream(&env, &k).await.status(), 200);
}

/// Wait (at most 10 s) until no call holds a key's or an account's concurrency slot.
async fn slots_back(env: &Env, when: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while inflight(env, "key").await != 0 || inflight(env, "account").await != 0 {
        assert!(Instant::now() < deadline, "slots leaked ({when})");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_call_in_flight_settles_against_the_account_it_was_admitted_under() {
    let mut sync = sync_with(json!({}), json!({}));
    sync["accounts"]["other"] = json!({"name": "Other", "quota": 1_000_000_000});
    let env = Env::with(Opts {
        sync: sync.clone(),
        ..Opts::default()
    })
    .await;
    let k = acct_key(0);
    let slow = {
        let url = env.url("/v1/chat/completions");
        let k = k.clone();
        tokio::spawn(async move {
            client()
                .post(url)
                .bearer_auth(k)
                .header("x-mock-delay-ms", "1500")
                .body(small_call())
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Move key 101 to `other` while its call is upstream.
    sync["keys"][9]["account"] = json!("other");
    sync["revision"] = json!(8);
    let path = env.dir.path().join("keys.json");
    std::fs::write(
        path.with_extension("tmp"),
        serde_json::to_vec(&sync).unwrap(),
    )
    .unwrap();
    std::fs::rename(path.with_extension("tmp"), &path).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while detail(&env, &k).await["account"]["id"] != "other" {
        assert!(Instant::now() < deadline, "no reload");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(slow.await.unwrap(), 200);
    env.gw.wait_records(1).await;
    let now_other = detail(&env, &k).await;
    assert_eq!(
        now_other["account"]["quota"]["total_used"], 0,
        "{now_other}"
    );
    let acme = detail(&env, &acct_key(1)).await;
    assert!(
        acme["account"]["quota"]["total_used"].as_i64().unwrap() > 0,
        "{acme}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_account_input_is_refused_with_a_precise_message() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(Value, &str)> = vec![
        (
            sync_with(json!({}), json!({"limits": {"rpm": 0}})),
            "limits.rpm is 0",
        ),
        (
            sync_with(json!({"limits": {"tpm": -3}}), json!({})),
            "account \"acme\": limits.tpm is -3",
        ),
        (
            {
                let mut s = sync_with(json!({}), json!({}));
                s["keys"][9]["account"] = json!("acmee");
                s
            },
            "unknown account \"acmee\"",
        ),
        (
            sync_with(
                json!({}),
                json!({"budget": {"period": "daily", "amount": 5, "timezone": "Mars/Olympus"}}),
            ),
            "\"Mars/Olympus\" is not a known IANA time zone",
        ),
        (
            sync_with(json!({"max_keys": 9}), json!({})),
            "allows at most 9 keys",
        ),
    ];
    for (sync, want) in cases {
        std::fs::write(
            dir.path().join("keys.json"),
            serde_json::to_vec(&sync).unwrap(),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("keygate.yaml"),
            config_yaml(&Opts::default(), "http://127.0.0.1:9"),
        )
        .unwrap();
        let cfg = dir.path().join("keygate.yaml");
        let (ok, out) = keygate_cli(&["check", "-c", cfg.to_str().unwrap()]);
        assert!(!ok, "{want}: accepted");
        assert!(out.contains(want), "{want}: {out}");
    }
    // A budget above the lifetime quota is allowed, and `check` says so.
    let sync = sync_with(
        json!({"quota": 1000, "budget": {"period": "monthly", "amount": 5000}}),
        json!({}),
    );
    std::fs::write(
        dir.path().join("keys.json"),
        serde_json::to_vec(&sync).unwrap(),
    )
    .unwrap();
    let cfg = dir.path().join("keygate.yaml");
    let (ok, out) = keygate_cli(&["check", "-c", cfg.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(out.contains("account \"acme\": budget 5000 per period is larger than its lifetime quota left (1000)"), "{out}");
}

/// An upstream on a raw socket that answers every call on a connection with `answer`.
fn raw_upstream(answer: &'static str) -> std::net::SocketAddr {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            // A connection it cannot read ends quietly: the gateway then answers 502, which
            // the test reports.
            std::thread::spawn(move || {
                let Ok(read_half) = conn.try_clone() else {
                    return;
                };
                let (mut reader, mut out) = (BufReader::new(read_half), conn);
                loop {
                    let mut len = 0;
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let lower = line.to_ascii_lowercase();
                        if let Some(v) = lower.strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let mut body = vec![0; len];
                    if reader.read_exact(&mut body).is_err()
                        || out.write_all(answer.as_bytes()).is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// keygate writes its headers into the upstream's answer without Pingora's case map (see
/// `gate::headers`): the answer must still reach the client whole: its reason phrase, a header
/// sent twice, its own headers, its body; only a rate-limit header it sent for a limited key is
/// replaced by the gateway's.
#[tokio::test(flavor = "multi_thread")]
async fn an_upstreams_answer_reaches_the_client_whole_beside_the_rate_headers() {
    const BODY: &str = r#"{"id":"c1","object":"chat.completion","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":20,"total_tokens":25}}"#;
    let answer: &'static str = Box::leak(
        format!(
            "HTTP/1.1 200 Fine Thanks\r\nContent-Type: application/json\r\nX-Upstream-Note: kept\r\n\
             Set-Cookie: a=1\r\nSet-Cookie: b=2\r\nx-ratelimit-limit-requests: 999\r\n\
             Content-Length: {}\r\n\r\n{BODY}",
            BODY.len()
        )
        .into_boxed_str(),
    );
    let upstream = raw_upstream(answer);
    let env = Env::with(Opts {
        sync: sync_with(json!({}), json!({"limits": {"rpm": 3}})),
        upstream_url: Some(format!("http://{upstream}")),
        ..Opts::default()
    })
    .await;
    let call = |key: &str| {
        let body = small_call();
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        raw_exchange(env.gw.addr, head.as_bytes(), false, Duration::from_secs(10))
    };
    let values = |answer: &str, name: &str| -> Vec<String> {
        let head = answer.split("\r\n\r\n").next().unwrap();
        head.lines()
            .skip(1)
            .filter_map(|l| l.split_once(": "))
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.to_string())
            .collect()
    };
    for (key, limit) in [(acct_key(0), "3"), (OK.to_string(), "999")] {
        let got = call(&key);
        assert!(got.starts_with("HTTP/1.1 200 Fine Thanks\r\n"), "{got}");
        assert!(got.ends_with(BODY), "{got}");
        assert_eq!(values(&got, "x-upstream-note"), ["kept"], "{got}");
        assert_eq!(values(&got, "set-cookie"), ["a=1", "b=2"], "{got}");
        assert_eq!(values(&got, "content-type"), ["application/json"], "{got}");
        assert_eq!(values(&got, "x-request-id").len(), 1, "{got}");
        assert_eq!(values(&got, "x-ratelimit-limit-requests"), [limit], "{got}");
        // The standard names keep their title case, as Pingora writes them.
        assert!(
            got.contains("\r\nContent-Type: application/json\r\n"),
            "{got}"
        );
        let limited = key != OK;
        assert_eq!(
            values(&got, "ratelimit").len(),
            usize::from(limited),
            "{got}"
        );
        let resets = values(&got, "x-ratelimit-reset-requests");
        assert_eq!(resets.len(), usize::from(limited), "{got}");
    }
}
