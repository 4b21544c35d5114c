//! The quota ledger end to end: reserve before, settle exactly once after, never overspend,
//! survive kill -9; the usage log and the usage endpoints. Real mock upstream, real gateway.

mod common;

use common::*;
use futures_util::StreamExt;
use keygate::core::pricing::{quota_for, PriceRule, Usage};
use serde_json::{json, Value};
use std::time::Duration;

const MINI: PriceRule = PriceRule::Ratio {
    ratio: 0.075,
    completion_ratio: 4.0,
};

/// What the mock reports for a request body of `len` bytes with `max_tokens` (see src/mock.rs).
fn mock_usage(len: usize, max_tokens: u64) -> Usage {
    Usage {
        prompt_tokens: 1 + len as u64 / 4,
        completion_tokens: max_tokens.min(20),
    }
}

fn small_call() -> String {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 20}).to_string()
}

/// The standard sync file with key 1 (`OK`) given `quota` units.
fn sync_with_quota(quota: i64) -> Value {
    let mut s = standard_sync();
    s["keys"][0]["quota"] = json!(quota);
    s
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

#[tokio::test(flavor = "multi_thread")]
async fn exhausted_key_gets_429_and_can_still_read_its_usage() {
    let actual = quota_for(MINI, 1.0, 500_000.0, mock_usage(small_call().len(), 20));
    let env = Env::with(Opts {
        sync: sync_with_quota(2 * actual + actual / 2),
        ..Opts::default()
    })
    .await;
    assert_eq!(post(&env, OK, small_call()).await.status(), 200);
    assert_eq!(post(&env, OK, small_call()).await.status(), 200);
    let (status, code, _) = denial(post(&env, OK, small_call()).await).await;
    assert_eq!((status, code.as_str()), (429, "insufficient_quota"));
    assert_eq!(env.mock.request_count(), 2);
    env.gw.wait_records(2).await;
    assert_eq!(env.gw.total_used(OK).await, 2 * actual);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_calls_never_overspend() {
    let body = small_call();
    let actual = quota_for(MINI, 1.0, 500_000.0, mock_usage(body.len(), 20));
    let quota = 10 * actual;
    let env = Env::with(Opts {
        sync: sync_with_quota(quota),
        ..Opts::default()
    })
    .await;
    let c = client();
    let calls = (0..100).map(|_| {
        c.post(env.url("/v1/chat/completions"))
            .bearer_auth(OK)
            .header("x-mock-delay-ms", "200")
            .body(body.clone())
            .send()
    });
    let results = futures_util::future::join_all(calls).await;
    let mut admitted = 0;
    for r in results {
        let r = r.unwrap();
        match r.status().as_u16() {
            200 => admitted += 1,
            429 => assert_eq!(denial(r).await.1, "insufficient_quota"),
            s => panic!("unexpected status {s}"),
        }
    }
    let records = env.gw.wait_records(admitted).await;
    let used = env.gw.total_used(OK).await;
    let reserved = records
        .first()
        .map(|_| {
            quota_for(
                MINI,
                1.0,
                500_000.0,
                Usage {
                    prompt_tokens: (body.len() as u64).div_ceil(3),
                    completion_tokens: 20,
                },
            )
        })
        .unwrap();
    // The guarantee: consumption ≤ quota + (one call's actual − its reservation).
    assert!(
        used <= quota + (actual - reserved).max(0),
        "used {used} of {quota}"
    );
    // The estimate is tight enough that the key's last calls are not refused needlessly.
    assert!(
        (5..=10).contains(&admitted),
        "admitted {admitted} of 100 with room for 10"
    );
    assert_eq!(used, admitted as i64 * actual);
    assert_eq!(env.mock.request_count(), admitted);
}

#[tokio::test(flavor = "multi_thread")]
async fn unlimited_keys_are_never_refused_but_counted() {
    let mut sync = standard_sync();
    sync["keys"][0]["unlimited_quota"] = json!(true);
    sync["keys"][0]["quota"] = json!(0);
    let env = Env::with(Opts {
        sync,
        ..Opts::default()
    })
    .await;
    let body = small_call();
    for _ in 0..5 {
        assert_eq!(post(&env, OK, body.clone()).await.status(), 200);
    }
    env.gw.wait_records(5).await;
    let actual = quota_for(MINI, 1.0, 500_000.0, mock_usage(body.len(), 20));
    assert_eq!(env.gw.total_used(OK).await, 5 * actual);
}

fn events_without_created(text: &str) -> Vec<Value> {
    text.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(|d| {
            let mut v: Value = serde_json::from_str(d).unwrap_or(json!(d));
            if let Some(o) = v.as_object_mut() {
                o.remove("created");
            }
            v
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn stream_is_charged_exactly_and_the_client_sees_what_it_asked_for() {
    let env = Env::start().await;
    let body = json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 15}).to_string();
    let through = post(&env, OK, body.clone()).await;
    assert_eq!(through.status(), 200);
    let through = through.text().await.unwrap();
    let direct = client()
        .post(format!("http://{}/v1/chat/completions", env.mock.addr()))
        .body(body.clone())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // keygate asked the upstream for usage...
    let upstream = env.mock.requests()[0].clone();
    let sent: Value = serde_json::from_slice(&upstream.body).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    assert!(String::from_utf8_lossy(&upstream.body).contains("\"include_usage\":true"));
    // ...and the client saw exactly what it would have seen without keygate.
    assert!(!through.contains("usage"), "{through}");
    assert_eq!(
        events_without_created(&through),
        events_without_created(&direct)
    );
    // Charged the usage the upstream reported for the body it received.
    let rec = env.gw.wait_records(1).await.pop().unwrap();
    let u = mock_usage(upstream.body.len(), 15);
    assert_eq!(rec["prompt_tokens"], u.prompt_tokens);
    assert_eq!(rec["completion_tokens"], u.completion_tokens);
    assert_eq!(rec["quota"], quota_for(MINI, 1.0, 500_000.0, u));
    assert_eq!(rec["is_stream"], true);
    assert_eq!(
        env.gw.total_used(OK).await,
        quota_for(MINI, 1.0, 500_000.0, u)
    );

    // A client that asked for the usage chunk gets it, untouched.
    let asked = json!({"model": "gpt-4o-mini", "stream": true, "stream_options": {"include_usage": true}, "messages": []}).to_string();
    let text = post(&env, OK, asked).await.text().await.unwrap();
    let events = events_without_created(&text);
    assert!(
        events.iter().any(|e| e["usage"]["prompt_tokens"].is_u64()),
        "{text}"
    );
    assert!(text.contains("\"usage\":null"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_errors_and_connection_failures_refund_in_full() {
    let env = Env::start().await;
    let r = client()
        .post(env.url("/v1/chat/completions"))
        .bearer_auth(OK)
        .header("x-mock-status", "500")
        .body(small_call())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    let recs = env.gw.wait_records(1).await;
    assert_eq!(
        (recs[0]["quota"].clone(), recs[0]["status"].clone()),
        (json!(0), json!(500))
    );
    assert_eq!(env.gw.total_used(OK).await, 0);
    assert_eq!(env.gw.get("/api/usage/token/", OK).await.0, 200);

    // Nothing listens on port 1 (a privileged port no test binds), so connecting is refused.
    let addr = "127.0.0.1:1";
    let env = Env::with(Opts {
        upstream_url: Some(format!("http://{addr}")),
        ..Opts::default()
    })
    .await;
    assert_eq!(post(&env, OK, small_call()).await.status(), 502);
    let recs = env.gw.wait_records(1).await;
    assert_eq!(recs[0]["quota"], 0);
    assert_eq!(env.gw.total_used(OK).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn client_disconnect_mid_stream_charges_what_was_streamed() {
    let env = Env::start().await;
    let body = json!({"model": "gpt-4o-mini", "stream": true, "messages": [], "max_tokens": 500})
        .to_string();
    let r = client()
        .post(env.url("/v1/chat/completions"))
        .bearer_auth(OK)
        .header("x-mock-delay-ms", "300")
        .header("x-mock-chunks", "20")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    let mut stream = r.bytes_stream();
    let mut seen = 0;
    while seen < 2 {
        let chunk = stream.next().await.unwrap().unwrap();
        seen += String::from_utf8_lossy(&chunk).matches("data: ").count();
    }
    drop(stream);
    let rec = env.gw.wait_records(1).await.pop().expect("a usage record");
    assert_eq!(rec["status"], 499);
    let completion = rec["completion_tokens"].as_u64().unwrap();
    assert!((2..20).contains(&completion), "{rec}");
    let quota = rec["quota"].as_i64().unwrap();
    let reserved = quota_for(
        MINI,
        1.0,
        500_000.0,
        Usage {
            prompt_tokens: (body.len() as u64 + 40).div_ceil(3),
            completion_tokens: 500,
        },
    );
    assert!(
        quota > 0 && quota < reserved,
        "charged {quota}, reserved about {reserved}"
    );
    assert_eq!(env.gw.total_used(OK).await, quota);
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_usage_is_charged_an_estimate_and_counted() {
    let env = Env::start().await;
    let r = client()
        .post(env.url("/v1/chat/completions"))
        .bearer_auth(OK)
        .header("x-mock-no-usage", "1")
        .body(small_call())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rec = env.gw.wait_records(1).await.pop().unwrap();
    assert!(rec["quota"].as_i64().unwrap() > 0, "{rec}");
    let m = env.gw.metrics.clone().unwrap();
    let text = client()
        .get(format!("{m}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("keygate_usage_missing_total 1"), "{text}");
    assert!(
        text.contains("keygate_reservations_outstanding 0"),
        "{text}"
    );
    assert!(
        text.contains("keygate_quota_consumed_total{group=\"default\",model=\"gpt-4o-mini\"}"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn anthropic_and_gemini_usage_is_charged() {
    let env = Env::start().await;
    let body = json!({"model": "claude-3-5-sonnet-latest", "max_tokens": 12, "stream": true, "messages": [{"role": "user", "content": "Hi"}]}).to_string();
    let r = client()
        .post(env.url("/v1/messages"))
        .header("x-api-key", OK)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.text().await.unwrap();
    let rec = env.gw.wait_records(1).await.pop().unwrap();
    let u = mock_usage(body.len(), 12);
    assert_eq!(
        (
            rec["prompt_tokens"].as_u64(),
            rec["completion_tokens"].as_u64()
        ),
        (Some(u.prompt_tokens), Some(12))
    );
    let claude = PriceRule::Ratio {
        ratio: 1.5,
        completion_ratio: 1.0,
    };
    assert_eq!(rec["quota"], quota_for(claude, 1.0, 500_000.0, u));

    let gbody = json!({"contents": [{"parts": [{"text": "Hi"}]}], "generationConfig": {"maxOutputTokens": 9}}).to_string();
    let r = client()
        .post(env.url("/v1beta/models/gemini-1.5-pro:generateContent"))
        .header("x-goog-api-key", OK)
        .body(gbody.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rec = env.gw.wait_records(2).await.pop().unwrap();
    assert_eq!(rec["model"], "gemini-1.5-pro");
    assert_eq!(rec["prompt_tokens"], 1 + gbody.len() as u64 / 4);
    assert_eq!(rec["completion_tokens"], 9);
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_log_records_every_settled_call_without_key_material() {
    let env = Env::start().await;
    let r = client()
        .post(env.url("/v1/chat/completions"))
        .bearer_auth(OK)
        .header("x-request-id", "usage-log-test-1")
        .body(small_call())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rec = env.gw.wait_records(1).await.pop().unwrap();
    for field in [
        "created_at",
        "request_id",
        "key_id",
        "key_name",
        "group",
        "model",
        "prompt_tokens",
        "completion_tokens",
        "quota",
        "is_stream",
        "status",
        "duration_ms",
        "first_byte_ms",
        "target",
        "attempts",
    ] {
        assert!(rec.get(field).is_some(), "missing {field}: {rec}");
    }
    assert_eq!(rec["request_id"], "usage-log-test-1");
    // A single `url` is a pool of one: its target, one attempt.
    assert_eq!(rec["target"], env.mock.addr().to_string().as_str());
    assert_eq!(rec["attempts"], 1);
    assert_eq!(
        (rec["key_id"].clone(), rec["key_name"].clone()),
        (json!(1), json!("ok"))
    );
    assert_eq!(rec["status"], 200);
    let text = std::fs::read_to_string(env.gw.dir.join("var/usage.jsonl")).unwrap();
    assert!(!text.contains(OK) && !text.contains(&OK[3..]));
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_endpoint_is_byte_compatible_with_new_api() {
    let env = Env::start().await;
    let (status, body) = env.gw.get("/api/usage/token/", MINI_ONLY).await;
    assert_eq!(status, 200);
    assert_eq!(
        String::from_utf8(body).unwrap(),
        r#"{"code":true,"data":{"expires_at":0,"model_limits":{"gpt-4o-mini":true},"model_limits_enabled":true,"name":"mini only","object":"token_usage","total_available":1000000,"total_granted":1000000,"total_used":0,"unlimited_quota":false},"message":"ok"}"#
    );
    // Expired keys may read it; disabled and unknown keys may not.
    let (status, body) = env.gw.get("/api/usage/token/", EXPIRED).await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["data"]["expires_at"], 1);
    let (status, body) = env.gw.get("/api/usage/token/", DISABLED).await;
    assert_eq!(status, 401);
    assert!(String::from_utf8_lossy(&body).contains("key_disabled"));
    assert_eq!(env.gw.get("/api/usage/token/", "sk-unknown").await.0, 401);
    // And it moves with consumption.
    assert_eq!(post(&env, MINI_ONLY, small_call()).await.status(), 200);
    env.gw.wait_records(1).await;
    let actual = quota_for(MINI, 1.0, 500_000.0, mock_usage(small_call().len(), 20));
    let (_, body) = env.gw.get("/api/usage/token/", MINI_ONLY).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["data"]["total_used"], actual);
    assert_eq!(v["data"]["total_available"], 1_000_000 - actual);
    assert_eq!(
        env.mock.request_count(),
        1,
        "usage endpoints are answered locally"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn billing_endpoints_answer_in_the_openai_legacy_shape() {
    let mut sync = standard_sync();
    sync["keys"][1]["unlimited_quota"] = json!(true);
    let env = Env::with(Opts {
        sync,
        ..Opts::default()
    })
    .await;
    let (s, body) = env.gw.get("/v1/dashboard/billing/subscription", OK).await;
    assert_eq!(s, 200);
    assert_eq!(
        String::from_utf8(body).unwrap(),
        r#"{"object":"billing_subscription","has_payment_method":true,"soft_limit_usd":2,"hard_limit_usd":2,"system_hard_limit_usd":2,"access_until":0}"#
    );
    let (_, body) = env
        .gw
        .get("/v1/dashboard/billing/subscription", HASHED)
        .await;
    assert!(String::from_utf8_lossy(&body).contains(r#""hard_limit_usd":100000000,"#));
    assert_eq!(post(&env, OK, small_call()).await.status(), 200);
    env.gw.wait_records(1).await;
    let actual = quota_for(MINI, 1.0, 500_000.0, mock_usage(small_call().len(), 20));
    let (_, body) = env.gw.get("/v1/dashboard/billing/usage", OK).await;
    assert_eq!(
        String::from_utf8(body).unwrap(),
        format!(
            r#"{{"object":"list","total_usage":{}}}"#,
            keygate::gate::go_float(actual as f64 / 500_000.0 * 100.0)
        )
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unpriced_model_is_refused_for_limited_keys_only() {
    let mut sync = standard_sync();
    sync["models"].as_object_mut().unwrap().remove("*");
    sync["keys"][1]["unlimited_quota"] = json!(true);
    let env = Env::with(Opts {
        sync,
        ..Opts::default()
    })
    .await;
    let body = json!({"model": "gpt-3.5-turbo", "messages": []}).to_string();
    let (s, code, _) = denial(post(&env, OK, body.clone()).await).await;
    assert_eq!((s, code.as_str()), (403, "model_not_priced"));
    assert_eq!(post(&env, HASHED, body).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn consumption_survives_kill_9_and_restart_under_load() {
    let mock = keygate::mock::MockBackend::start("127.0.0.1:0")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let opts = Opts::default();
    let url = format!("http://{}", mock.addr());
    let mut gw = start_gateway(dir.path(), &opts, &url);
    let body = small_call();
    let actual = quota_for(MINI, 1.0, 500_000.0, mock_usage(body.len(), 20));

    // Load from 8 clients; kill -9 while it runs.
    let base = gw.base.clone();
    let ok_calls = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..8 {
        let (base, body, ok_calls, stop) =
            (base.clone(), body.clone(), ok_calls.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let c = client();
            for _ in 0..2000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let r = c
                    .post(format!("{base}/v1/chat/completions"))
                    .bearer_auth(OK)
                    .body(body.clone())
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 200 => {
                        if r.bytes().await.is_ok() {
                            ok_calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    _ => break,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let seen_before = gw.total_used(OK).await;
    gw.kill9();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for l in load {
        let _ = l.await;
    }
    let completed = ok_calls.load(std::sync::atomic::Ordering::Relaxed);
    assert!(completed > 10, "the load ran ({completed} calls)");

    let gw2 = spawn_keygate(dir.path(), &dir.path().join("keygate.yaml"));
    let after = gw2.total_used(OK).await;
    // Never gives quota back: everything answered before the kill is still charged...
    assert!(
        after >= completed * actual,
        "after restart {after} < {completed} calls × {actual}"
    );
    assert!(after >= seen_before);
    // ...and what a crash strands is bounded by one chunk plus the calls in flight.
    let chunk = keygate::ledger::max_headroom(Some(1_000_000));
    let reserve = quota_for(
        MINI,
        1.0,
        500_000.0,
        Usage {
            prompt_tokens: (body.len() as u64).div_ceil(3),
            completion_tokens: 20,
        },
    );
    assert!(
        after <= completed * actual + 2 * chunk + 8 * reserve,
        "stranded too much: {after}"
    );
    eprintln!(
        "kill -9: {completed} calls completed ({} units), {after} units after restart",
        completed * actual
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn graceful_restart_keeps_exact_consumption() {
    let mock = keygate::mock::MockBackend::start("127.0.0.1:0")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("http://{}", mock.addr());
    let mut gw = start_gateway(dir.path(), &Opts::default(), &url);
    let c = client();
    for _ in 0..7 {
        let r = c
            .post(format!("{}/v1/chat/completions", gw.base))
            .bearer_auth(OK)
            .body(small_call())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    gw.wait_records(7).await;
    let before = gw.total_used(OK).await;
    let status = gw.terminate();
    assert!(status.success(), "{status:?}");
    let gw2 = spawn_keygate(dir.path(), &dir.path().join("keygate.yaml"));
    assert_eq!(gw2.total_used(OK).await, before);
}
