//! The alerts webhook (SPEC §7) end to end: a real mock upstream, a real gateway process and a
//! real receiver (an HTTP server in the test, on port 0).

mod common;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const ALERTED: &str = "sk-alerts-key-000000000000000000000000000000000000";

/// The webhook receiver: records every event as it arrives, then (after `delay`) answers
/// `status` (200 unless started with [`Receiver::answering`]).
struct Receiver {
    url: String,
    events: Arc<Mutex<Vec<Value>>>,
    answered: Arc<AtomicUsize>,
}

impl Receiver {
    async fn start(delay: Duration) -> Receiver {
        Receiver::answering(delay, 200).await
    }

    async fn answering(delay: Duration, status: u16) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hooks/keygate", listener.local_addr().unwrap());
        let events = Arc::new(Mutex::new(Vec::new()));
        let answered = Arc::new(AtomicUsize::new(0));
        let (ev, ans) = (events.clone(), answered.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (ev, ans) = (ev.clone(), ans.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (ev, ans) = (ev.clone(), ans.clone());
                        async move {
                            let ct = req.headers().get("content-type").cloned();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let mut v: Value = serde_json::from_slice(&body).unwrap();
                            v["_content_type"] =
                                json!(ct.and_then(|c| c.to_str().ok().map(String::from)));
                            ev.lock().unwrap().push(v);
                            tokio::time::sleep(delay).await;
                            ans.fetch_add(1, Ordering::SeqCst);
                            let mut r = Response::new(Full::new(Bytes::new()));
                            *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                            Ok::<_, Infallible>(r)
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Receiver {
            url,
            events,
            answered,
        }
    }

    fn events(&self, kind: &str) -> Vec<Value> {
        let all = self.events.lock().unwrap().clone();
        all.into_iter().filter(|e| e["event"] == kind).collect()
    }

    /// Wait until `n` events of `kind` arrived; then a moment more, so that a duplicate
    /// would show.
    async fn wait(&self, kind: &str, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.events(kind).len() < n {
            assert!(
                Instant::now() < deadline,
                "waited for {n} {kind} events: {:?}",
                self.events(kind)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.events(kind)
    }
}

fn alerts_yaml(url: &str, more: &str) -> String {
    format!("alerts:\n  webhook_url: \"{url}\"\n  thresholds: [1.0, 0.8]\n{more}")
}

fn body() -> String {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 20}).to_string()
}

/// One call; the mock reports no usage, so the call is charged exactly what it reserved
/// (the estimate): calls are the same price, and a quota of ten of them is spent exactly.
async fn call(base: &str, key: &str) -> u16 {
    client()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .header("x-mock-no-usage", "1")
        .body(body())
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// What one call is charged, measured on a gateway of its own.
async fn price() -> i64 {
    let env = Env::start().await;
    let before = env.gw.total_used(OK).await;
    assert_eq!(call(&env.gw.base, OK).await, 200);
    env.gw.wait_records(1).await;
    let p = env.gw.total_used(OK).await - before;
    assert!(p > 0);
    p
}

fn with_keys(keys: Value, accounts: Value) -> Value {
    let mut s = standard_sync();
    for k in keys.as_array().unwrap() {
        s["keys"].as_array_mut().unwrap().push(k.clone());
    }
    s["accounts"] = accounts;
    s
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

async fn wait_metric(gw: &Gateway, series: &str, at_least: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = gw.metrics_text().await;
        if metric(&text, series) >= at_least {
            return text;
        }
        assert!(Instant::now() < deadline, "{series} < {at_least}\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Rewrite the sync file as `sync` (a new revision), reload it, and wait until it is in force.
async fn reload(gw: &Gateway, dir: &Path, mut sync: Value, revision: u64) {
    sync["revision"] = json!(revision);
    std::fs::write(dir.join("keys.json"), serde_json::to_vec(&sync).unwrap()).unwrap();
    let before = metric(
        &gw.metrics_text().await,
        "keygate_config_reloads_total{result=\"ok\"}",
    );
    gw.signal("HUP");
    wait_metric(
        gw,
        "keygate_config_reloads_total{result=\"ok\"}",
        before + 1.0,
    )
    .await;
    let text = gw.metrics_text().await;
    assert_eq!(metric(&text, "keygate_config_revision"), revision as f64);
}

#[tokio::test(flavor = "multi_thread")]
async fn crossing_80_and_100_percent_of_a_key_quota_sends_one_event_each_even_across_a_reload() {
    let p = price().await;
    let rx = Receiver::start(Duration::ZERO).await;
    let sync = with_keys(
        json!([{"id": 50, "name": "alerted key", "key": ALERTED, "quota": 10 * p}]),
        json!({}),
    );
    let env = Env::with(Opts {
        sync: sync.clone(),
        extra: alerts_yaml(&rx.url, ""),
        ..Opts::default()
    })
    .await;
    for i in 1..=7 {
        assert_eq!(call(&env.gw.base, ALERTED).await, 200, "call {i}");
    }
    assert!(rx.events("quota_threshold").is_empty());
    assert_eq!(call(&env.gw.base, ALERTED).await, 200);
    let events = rx.wait("quota_threshold", 1).await;
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(e["scope"], "key");
    assert_eq!(e["id"], 50);
    assert_eq!(e["name"], "alerted key");
    assert_eq!(e["threshold"], 0.8);
    assert_eq!(e["used"], 8 * p);
    assert_eq!(e["limit"], 10 * p);
    assert!(e["period"].is_null(), "{e}");
    assert_eq!(e["_content_type"], "application/json");

    // A reload keeps the counters: nothing is crossed again.
    reload(&env.gw, env.dir.path(), sync, 8).await;
    assert_eq!(call(&env.gw.base, ALERTED).await, 200);
    assert_eq!(call(&env.gw.base, ALERTED).await, 200);
    let events = rx.wait("quota_threshold", 2).await;
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[1]["threshold"], 1.0);
    assert_eq!(events[1]["used"], 10 * p);
    // Spent: refused, and no more events.
    assert_eq!(call(&env.gw.base, ALERTED).await, 429);
    let text = wait_metric(
        &env.gw,
        "keygate_alerts_sent_total{event=\"quota_threshold\"}",
        2.0,
    )
    .await;
    assert_eq!(
        metric(
            &text,
            "keygate_alerts_sent_total{event=\"quota_threshold\"}"
        ),
        2.0
    );
    assert_eq!(rx.events("quota_threshold").len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_account_crossing_its_thresholds_sends_account_events() {
    let p = price().await;
    let rx = Receiver::start(Duration::ZERO).await;
    let sync = with_keys(
        json!([
            {"id": 61, "name": "acme one", "key": ALERTED, "account": "acme", "unlimited_quota": true}
        ]),
        json!({"acme": {"name": "Acme Corp", "quota": 10 * p}}),
    );
    let env = Env::with(Opts {
        sync,
        extra: alerts_yaml(&rx.url, ""),
        ..Opts::default()
    })
    .await;
    for i in 1..=10 {
        assert_eq!(call(&env.gw.base, ALERTED).await, 200, "call {i}");
    }
    let mut events = rx.wait("quota_threshold", 2).await;
    assert_eq!(events.len(), 2, "{events:?}");
    // Delivered concurrently: in either order.
    events.sort_by(|a, b| a["used"].as_i64().cmp(&b["used"].as_i64()));
    for (e, (t, used)) in events.iter().zip([(0.8, 8 * p), (1.0, 10 * p)]) {
        assert_eq!(e["scope"], "account", "{e}");
        assert_eq!(e["id"], "acme");
        assert_eq!(e["name"], "Acme Corp");
        assert_eq!(e["threshold"], t);
        assert_eq!(e["used"], used);
        assert_eq!(e["limit"], 10 * p);
        assert!(e["period"].is_null());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_budget_period_threshold_names_its_period() {
    let p = price().await;
    let rx = Receiver::start(Duration::ZERO).await;
    let sync = with_keys(
        json!([{"id": 70, "name": "budgeted", "key": ALERTED, "unlimited_quota": true,
                "budget": {"period": "daily", "amount": 10 * p}}]),
        json!({}),
    );
    let env = Env::with(Opts {
        sync,
        extra: alerts_yaml(&rx.url, ""),
        ..Opts::default()
    })
    .await;
    for i in 1..=8 {
        assert_eq!(call(&env.gw.base, ALERTED).await, 200, "call {i}");
    }
    let events = rx.wait("quota_threshold", 1).await;
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(
        (e["scope"].clone(), e["id"].clone()),
        (json!("key"), json!(70))
    );
    assert_eq!(e["threshold"], 0.8);
    assert_eq!(e["used"], 8 * p);
    assert_eq!(e["limit"], 10 * p);
    assert_eq!(e["period"], "daily");
    let (start, end, at) = (
        e["period_start"].as_i64().unwrap(),
        e["period_end"].as_i64().unwrap(),
        e["at"].as_i64().unwrap(),
    );
    assert_eq!(start % 86_400, 0, "a UTC day starts at midnight: {e}");
    assert_eq!(end - start, 86_400);
    assert!(start <= at && at < end, "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_expiring_within_seven_days_is_announced_once_across_reloads_and_restarts() {
    let rx = Receiver::start(Duration::ZERO).await;
    let now = keygate::gate::unix_now();
    let key = |id: u64, secret: &str, expires_at: i64| json!({"id": id, "name": format!("key {id}"), "key": secret, "quota": 1000, "expires_at": expires_at});
    let soon = key(80, ALERTED, now + 3 * 86_400);
    let later = key(
        81,
        "sk-alerts-later-0000000000000000000000000000000000",
        now + 30 * 86_400,
    );
    let sync = with_keys(json!([soon, later]), json!({}));
    let env = Env::with(Opts {
        sync: sync.clone(),
        extra: alerts_yaml(&rx.url, ""),
        ..Opts::default()
    })
    .await;
    let events = rx.wait("key_expiring", 1).await;
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(
        (e["scope"].clone(), e["id"].clone()),
        (json!("key"), json!(80))
    );
    assert_eq!(e["name"], "key 80");
    assert_eq!(e["expires_at"], now + 3 * 86_400);
    let left = e["expires_in_seconds"].as_i64().unwrap();
    assert!(left > 0 && left <= 3 * 86_400, "{e}");

    // A reload that adds a key expiring in two days announces that key only.
    let other = key(
        82,
        "sk-alerts-other-0000000000000000000000000000000000",
        now + 2 * 86_400,
    );
    let sync = with_keys(json!([soon, later, other]), json!({}));
    reload(&env.gw, env.dir.path(), sync.clone(), 8).await;
    let events = rx.wait("key_expiring", 2).await;
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[1]["id"], 82);

    // A restart remembers what was announced (state_dir): only the new key 83 is.
    let mut gw = env.gw;
    gw.terminate();
    let fresh = key(
        83,
        "sk-alerts-fresh-0000000000000000000000000000000000",
        now + 86_400,
    );
    let mut sync = with_keys(json!([soon, later, other, fresh]), json!({}));
    sync["revision"] = json!(9);
    std::fs::write(
        env.dir.path().join("keys.json"),
        serde_json::to_vec(&sync).unwrap(),
    )
    .unwrap();
    let _gw = spawn_keygate(env.dir.path(), &env.dir.path().join("keygate.yaml"));
    let events = rx.wait("key_expiring", 3).await;
    assert_eq!(events.len(), 3, "{events:?}");
    assert_eq!(events[2]["id"], 83);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_receiver_that_is_down_never_stops_calls_and_its_events_are_retried_then_dropped() {
    let p = price().await;
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", closed.local_addr().unwrap());
    drop(closed);
    let sync = with_keys(
        json!([{"id": 50, "name": "alerted key", "key": ALERTED, "quota": 10 * p}]),
        json!({}),
    );
    let env = Env::with(Opts {
        sync,
        extra: alerts_yaml(&url, "  max_attempts: 3\n"),
        ..Opts::default()
    })
    .await;
    for i in 1..=10 {
        assert_eq!(call(&env.gw.base, ALERTED).await, 200, "call {i}");
    }
    // Two events, three attempts each: two retries each, then dropped.
    let text = wait_metric(
        &env.gw,
        "keygate_alerts_dropped_total{reason=\"failed\"}",
        2.0,
    )
    .await;
    assert_eq!(
        metric(&text, "keygate_alerts_dropped_total{reason=\"failed\"}"),
        2.0
    );
    assert_eq!(metric(&text, "keygate_alerts_retries_total"), 4.0);
    assert_eq!(
        metric(
            &text,
            "keygate_alerts_sent_total{event=\"quota_threshold\"}"
        ),
        0.0
    );
    assert_eq!(
        metric(&text, "keygate_alerts_dropped_total{reason=\"queue_full\"}"),
        0.0
    );
    // Still serving.
    assert_eq!(call(&env.gw.base, OK).await, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_receiver_does_not_delay_calls() {
    let p = price().await;
    let rx = Receiver::start(Duration::from_secs(10)).await;
    let sync = with_keys(
        json!([{"id": 50, "name": "alerted key", "key": ALERTED, "quota": 10 * p}]),
        json!({}),
    );
    let env = Env::with(Opts {
        sync,
        extra: alerts_yaml(&rx.url, "  timeout_seconds: 60\n"),
        ..Opts::default()
    })
    .await;
    for i in 1..=8 {
        assert_eq!(call(&env.gw.base, ALERTED).await, 200, "call {i}");
    }
    // The 80% event has reached the receiver, which holds it for ten seconds.
    rx.wait("quota_threshold", 1).await;
    // Meanwhile: the calls that cross 100% (another event for the held receiver) and more.
    assert_eq!(call(&env.gw.base, ALERTED).await, 200);
    assert_eq!(call(&env.gw.base, ALERTED).await, 200);
    for _ in 0..10 {
        assert_eq!(call(&env.gw.base, OK).await, 200);
    }
    // Every call was answered while the receiver still held the first event.
    assert_eq!(
        rx.answered.load(Ordering::SeqCst),
        0,
        "the receiver answered before the calls were done"
    );
    let events = rx.wait("quota_threshold", 2).await;
    assert_eq!(events.len(), 2, "{events:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_receiver_that_refuses_an_event_with_4xx_is_not_retried() {
    let p = price().await;
    let rx = Receiver::answering(Duration::ZERO, 400).await;
    let sync = with_keys(
        json!([{"id": 50, "name": "alerted key", "key": ALERTED, "quota": 10 * p}]),
        json!({}),
    );
    let env = Env::with(Opts {
        sync,
        extra: alerts_yaml(&rx.url, ""),
        ..Opts::default()
    })
    .await;
    for i in 1..=8 {
        assert_eq!(call(&env.gw.base, ALERTED).await, 200, "call {i}");
    }
    let text = wait_metric(
        &env.gw,
        "keygate_alerts_dropped_total{reason=\"rejected\"}",
        1.0,
    )
    .await;
    assert_eq!(metric(&text, "keygate_alerts_retries_total"), 0.0);
    assert_eq!(rx.events("quota_threshold").len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn events_beyond_the_queue_are_dropped_and_counted_while_calls_go_on() {
    let p = price().await;
    let rx = Receiver::start(Duration::from_secs(10)).await;
    // Sixteen thresholds, all crossed by one call of a key whose quota is one call: sixteen
    // events per key at once.
    let thresholds: Vec<String> = (1..=16).map(|i| format!("{}", i as f64 / 16.0)).collect();
    let keys: Vec<Value> = (0..3)
        .map(|i| {
            json!({"id": 90 + i, "name": format!("one call {i}"),
                        "key": format!("sk-alerts-one-call-{i:032}"), "quota": p})
        })
        .collect();
    let env = Env::with(Opts {
        sync: with_keys(json!(keys), json!({})),
        extra: format!(
            "alerts:\n  webhook_url: \"{}\"\n  thresholds: [{}]\n  timeout_seconds: 60\n  queue_size: 2\n",
            rx.url,
            thresholds.join(", ")
        ),
        ..Opts::default()
    })
    .await;
    for i in 0..3 {
        let key = format!("sk-alerts-one-call-{i:032}");
        assert_eq!(call(&env.gw.base, &key).await, 200);
    }
    // 48 events; at most 16 in delivery (held by the receiver), one waiting for a slot and
    // two in the queue: the rest were dropped at once, and the calls were not held up.
    let text = wait_metric(
        &env.gw,
        "keygate_alerts_dropped_total{reason=\"queue_full\"}",
        1.0,
    )
    .await;
    let dropped = metric(&text, "keygate_alerts_dropped_total{reason=\"queue_full\"}");
    assert!(dropped >= 48.0 - 19.0, "{dropped}");
    assert_eq!(call(&env.gw.base, OK).await, 200);
    assert_eq!(rx.answered.load(Ordering::SeqCst), 0);
}
