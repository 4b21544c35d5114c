//! Rate limits across gateways (SPEC §7): on the shared ledger, rpm, tpm and concurrency hold
//! across two real gateways on a real redis-server and a real 3-node Redis Cluster, with the
//! bound the README states; without a Redis round trip per call; `on_unavailable` while Redis
//! is away; a killed gateway's concurrency slots come back.
//! Skipped (with a message) when redis-server is not installed, unless `KEYGATE_REQUIRE_REDIS`.

mod common;

use common::redis::{available, RedisCluster, RedisServer};
use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const KEY: &str = "sk-shared-limits-000000000000000000000000000000000";

fn small_call() -> String {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 20}).to_string()
}

/// The tokens one small call counts after it settled (the mock reports 1 + len/4 prompt tokens
/// and 20 completion tokens).
fn actual_tokens() -> u64 {
    1 + small_call().len() as u64 / 4 + 20
}

/// The standard sync file plus account `acme` (with `account`'s fields, unlimited quota) and
/// keys 101..=104 in it (key 101 is [`KEY`]; all with `key`'s fields, unlimited quota).
fn sync_with(account: Value, key: Value) -> Value {
    let mut s = standard_sync();
    let mut a = json!({"name": "Acme Corp", "quota": 0, "unlimited_quota": true});
    merge(&mut a, &account);
    s["accounts"] = json!({ "acme": a });
    for i in 0..4 {
        let k = if i == 0 {
            KEY.to_string()
        } else {
            format!("sk-shared-limits-{i:033}")
        };
        let mut k = json!({"id": 101 + i, "name": format!("acme {i}"), "key": k,
                           "account": "acme", "unlimited_quota": true});
        merge(&mut k, &key);
        s["keys"].as_array_mut().unwrap().push(k);
    }
    s
}

fn key_of(i: usize) -> String {
    if i == 0 {
        KEY.to_string()
    } else {
        format!("sk-shared-limits-{i:033}")
    }
}

fn merge(into: &mut Value, from: &Value) {
    if let Some(m) = from.as_object() {
        for (k, v) in m {
            into[k] = v.clone();
        }
    }
}

fn ledger_yaml(backend: &str, url: &str, on_unavailable: &str) -> String {
    format!(
        "ledger:\n  backend: {backend}\n  redis_url: \"{url}\"\n  on_unavailable: {on_unavailable}\n  lease_ttl_seconds: 3\n  redis_timeout_ms: 500\n"
    )
}

/// Two gateways on one mock upstream, sharing the ledger `ledger` says.
struct Fleet {
    gws: [Gateway; 2],
    mock: keygate::mock::MockBackend,
    _root: tempfile::TempDir,
}

/// [`Fleet`] with `sync` (each gateway in a folder of its own).
async fn two_gateways(sync: &Value, ledger: &str) -> Fleet {
    let mock = keygate::mock::MockBackend::start("127.0.0.1:0")
        .await
        .unwrap();
    let root = tempfile::tempdir().unwrap();
    let url = format!("http://{}", mock.addr());
    let opts = Opts {
        sync: sync.clone(),
        extra: ledger.to_string(),
        ..Opts::default()
    };
    let gws = ["a", "b"].map(|name| {
        let dir = root.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        start_gateway(&dir, &opts, &url)
    });
    Fleet {
        gws,
        mock,
        _root: root,
    }
}

async fn call(gw: &Gateway, key: &str) -> reqwest::Response {
    client()
        .post(format!("{}/v1/chat/completions", gw.base))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(small_call())
        .send()
        .await
        .unwrap()
}

/// The README's bound: across `gateways` gateways, in a span of `secs` seconds, at most
/// `L + L × secs / 60 + gateways × lease` tokens, with `lease = max(1, ⌈L × 2 / 60⌉)`.
fn bound(limit: u64, secs: f64, gateways: u64) -> f64 {
    let lease = (limit * 2).div_ceil(60).max(1);
    limit as f64 + limit as f64 * secs / 60.0 + (gateways * lease) as f64
}

/// `n` concurrent calls spread over both gateways (and over `keys` keys): how many were
/// admitted, and how long the burst took. Every refusal is a 429 `rate_limit_exceeded` of
/// `kind` with a `Retry-After`.
async fn burst(gws: &[Gateway; 2], keys: usize, n: usize, kind: &str) -> (usize, f64) {
    let started = Instant::now();
    let keys: Vec<String> = (0..keys).map(key_of).collect();
    let calls = (0..n).map(|i| call(&gws[i % 2], &keys[i % keys.len()]));
    let mut admitted = 0;
    for r in futures_util::future::join_all(calls).await {
        match r.status().as_u16() {
            200 => admitted += 1,
            429 => {
                assert!(r.headers().get("retry-after").is_some());
                let v: Value = r.json().await.unwrap();
                assert_eq!(v["error"]["code"], "rate_limit_exceeded", "{v}");
                assert_eq!(v["error"]["type"], kind, "{v}");
            }
            s => panic!("unexpected status {s}: {}", r.text().await.unwrap()),
        }
    }
    (admitted, started.elapsed().as_secs_f64())
}

/// Two gateways, one key with rpm 30: a burst of 100 calls over both admits about 30, within
/// the stated bound (each gateway alone would admit 30: 60 in all).
async fn rpm_holds_across_two_gateways(url: &str, backend: &str) {
    let sync = sync_with(json!({}), json!({"limits": {"rpm": 30}}));
    let f = two_gateways(&sync, &ledger_yaml(backend, url, "lease")).await;
    let (admitted, secs) = burst(&f.gws, 1, 100, "requests").await;
    let max = bound(30, secs, 2);
    eprintln!("{backend}: admitted {admitted} of 100 in {secs:.2} s (bound {max:.1})");
    assert!(admitted as f64 <= max, "admitted {admitted} > {max}");
    assert!(
        admitted >= 26,
        "admitted only {admitted}: the bucket was not used"
    );
    assert_eq!(f.mock.request_count(), admitted);
    // Both gateways send the limit's headers.
    let r = call(&f.gws[1], KEY).await;
    assert_eq!(r.headers()["x-ratelimit-limit-requests"], "30");
}

#[tokio::test(flavor = "multi_thread")]
async fn rpm_holds_across_two_gateways_on_redis() {
    if !available() {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(data.path());
    rpm_holds_across_two_gateways(&redis.url(), "redis").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rpm_holds_across_two_gateways_on_a_redis_cluster() {
    if !available() {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let cluster = RedisCluster::start(data.path());
    rpm_holds_across_two_gateways(&cluster.url(), "redis-cluster").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tpm_holds_across_two_gateways() {
    if !available() {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(data.path());
    let tpm = 2_000;
    let sync = sync_with(json!({}), json!({"limits": {"tpm": tpm}}));
    let ledger = ledger_yaml("redis", &redis.url(), "lease");
    let f = two_gateways(&sync, &ledger).await;
    let (admitted, secs) = burst(&f.gws, 1, 120, "tokens").await;
    // The tokens the calls really counted (their estimates were corrected at settle).
    let used = admitted as u64 * actual_tokens();
    let max = bound(tpm, secs, 2);
    eprintln!("tpm: admitted {admitted} ({used} tokens) in {secs:.2} s (bound {max:.0})");
    assert!(used as f64 <= max, "{used} tokens > {max}");
    assert!(
        used as f64 >= 0.8 * tpm as f64,
        "{used} tokens: the bucket was not used"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_accounts_rpm_holds_across_its_keys_and_two_gateways() {
    if !available() {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(data.path());
    let sync = sync_with(json!({"limits": {"rpm": 20}}), json!({}));
    let ledger = ledger_yaml("redis", &redis.url(), "lease");
    let f = two_gateways(&sync, &ledger).await;
    let (admitted, secs) = burst(&f.gws, 4, 80, "requests").await;
    let max = bound(20, secs, 2);
    eprintln!("account: admitted {admitted} of 80 in {secs:.2} s (bound {max:.1})");
    assert!(admitted as f64 <= max, "admitted {admitted} > {max}");
    assert!(admitted >= 16, "admitted only {admitted}");
}

/// Ops on Redis so far, quota and rate limits together.
async fn redis_ops(gw: &Gateway) -> u64 {
    let text = gw.metrics_text().await;
    text.lines()
        .find_map(|l| l.strip_prefix("keygate_ledger_backend_operations_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap() as u64
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_do_not_each_ask_redis() {
    if !available() {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(data.path());
    let env = Env::with(Opts {
        sync: sync_with(
            json!({"limits": {"rpm": 60_000, "tpm": 100_000_000, "concurrency": 500}}),
            json!({"limits": {"rpm": 6_000, "tpm": 10_000_000, "concurrency": 50}}),
        ),
        extra: ledger_yaml("redis", &redis.url(), "lease"),
        ..Opts::default()
    })
    .await;
    assert_eq!(call(&env.gw, KEY).await.status(), 200);
    let before = redis_ops(&env.gw).await;
    let started = Instant::now();
    for _ in 0..200 {
        assert_eq!(call(&env.gw, KEY).await.status(), 200);
    }
    // Past the next report, which the count includes.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let ops = redis_ops(&env.gw).await - before;
    let secs = started.elapsed().as_secs_f64();
    eprintln!("200 calls in {secs:.2} s: {ops} Redis calls");
    // Leases (quota, rates and spare concurrency slots) are topped up in the background (a
    // key's rpm lease here is 6 000 × 2 / 60 = 200 calls, its spare slots 50 / 8 = 6) and
    // reported once a second: a few calls per second of the run, not one per call.
    assert!(
        (ops as f64) < 20.0 + 4.0 * secs,
        "{ops} Redis calls for 200 calls"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn on_unavailable_applies_to_shared_limits() {
    if !available() {
        return;
    }
    // `lease`: the rates held are spent, then 503 (not this gateway's own 600 rpm).
    let data = tempfile::tempdir().unwrap();
    let mut redis = RedisServer::start(data.path());
    let sync = sync_with(json!({}), json!({"limits": {"rpm": 600}}));
    let env = Env::with(Opts {
        sync: sync.clone(),
        extra: ledger_yaml("redis", &redis.url(), "lease"),
        ..Opts::default()
    })
    .await;
    assert_eq!(call(&env.gw, KEY).await.status(), 200);
    redis.kill9();
    let mut statuses = Vec::new();
    for _ in 0..100 {
        let started = Instant::now();
        let r = call(&env.gw, KEY).await;
        assert!(started.elapsed() < Duration::from_secs(3));
        let status = r.status().as_u16();
        statuses.push(status);
        if status != 200 {
            let (status, code, _) = denial(r).await;
            assert_eq!((status, code.as_str()), (503, "quota_backend_unavailable"));
            break;
        }
    }
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    // One lease: 600 × 2 / 60 = 20 tokens, topped up at half.
    assert!(
        statuses.last() == Some(&503) && admitted <= 21,
        "{admitted} admitted without Redis: {statuses:?}"
    );
    // Redis back: admitted again.
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(15);
    while call(&env.gw, KEY).await.status() != 200 {
        assert!(Instant::now() < deadline, "never admitted again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(env);

    // `allow`: this gateway's own bucket (rpm 5) decides while Redis is away.
    let sync = sync_with(json!({}), json!({"limits": {"rpm": 5}}));
    let env = Env::with(Opts {
        sync,
        extra: ledger_yaml("redis", &redis.url(), "allow"),
        ..Opts::default()
    })
    .await;
    redis.kill9();
    let mut admitted = 0;
    for _ in 0..12 {
        match call(&env.gw, KEY).await.status().as_u16() {
            200 => admitted += 1,
            429 => {}
            s => panic!("status {s} with on_unavailable: allow"),
        }
    }
    assert!(
        (4..=6).contains(&admitted),
        "{admitted} admitted with rpm 5"
    );
}

/// `deny` with a gateway that found Redis away: nothing asks Redis for tokens while it refuses,
/// so the worker's own probe must notice Redis is back (it did not: limited keys got 503 until
/// a restart).
#[tokio::test(flavor = "multi_thread")]
async fn deny_admits_again_once_redis_is_back() {
    if !available() {
        return;
    }
    let port = common::free_port();
    let sync = sync_with(json!({}), json!({"limits": {"rpm": 600}}));
    let env = Env::with(Opts {
        sync,
        extra: ledger_yaml("redis", &format!("redis://127.0.0.1:{port}"), "deny"),
        ..Opts::default()
    })
    .await;
    let (status, code, _) = denial(call(&env.gw, KEY).await).await;
    assert_eq!((status, code.as_str()), (503, "quota_backend_unavailable"));
    let data = tempfile::tempdir().unwrap();
    let _redis = RedisServer::start_on(data.path(), port);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = call(&env.gw, KEY).await;
        if r.status() == 200 {
            break;
        }
        let (status, code, _) = denial(r).await;
        assert_eq!((status, code.as_str()), (503, "quota_backend_unavailable"));
        assert!(Instant::now() < deadline, "never admitted again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A call the mock answers after `delay_ms`.
async fn slow_call(gw: &Gateway, key: &str, delay_ms: u64) -> reqwest::Response {
    client()
        .post(format!("{}/v1/chat/completions", gw.base))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .header("x-mock-delay-ms", delay_ms.to_string())
        .body(small_call())
        .send()
        .await
        .unwrap()
}

/// `n` slow calls at once, spread over both gateways: how many were admitted (each refusal a
/// 429 `rate_limit_exceeded` of type `concurrency`). Every admitted call is still at the mock
/// when the last one is admitted (they are all sent together and take `delay_ms`), so this is
/// also the most calls in flight at the mock at once.
async fn slow_burst(gws: &[Gateway; 2], n: usize, delay_ms: u64) -> usize {
    let calls = (0..n).map(|i| slow_call(&gws[i % 2], KEY, delay_ms));
    let mut admitted = 0;
    for r in futures_util::future::join_all(calls).await {
        match r.status().as_u16() {
            200 => admitted += 1,
            429 => {
                assert!(r.headers().get("retry-after").is_some());
                let v: Value = r.json().await.unwrap();
                assert_eq!(v["error"]["code"], "rate_limit_exceeded", "{v}");
                assert_eq!(v["error"]["type"], "concurrency", "{v}");
            }
            s => panic!("unexpected status {s}: {}", r.text().await.unwrap()),
        }
    }
    admitted
}

/// Two gateways, one key with concurrency 4, a slow upstream: of 20 calls at once over both,
/// 4 are admitted (each gateway alone would admit 4: 8 in all). With a limit below 8 no slot
/// is kept spare, so none is stranded either.
async fn concurrency_holds_across_two_gateways(url: &str, backend: &str) {
    let sync = sync_with(json!({}), json!({"limits": {"concurrency": 4}}));
    let f = two_gateways(&sync, &ledger_yaml(backend, url, "lease")).await;
    let admitted = slow_burst(&f.gws, 20, 1_500).await;
    eprintln!("{backend}: admitted {admitted} of 20 with concurrency 4");
    assert_eq!(admitted, 4, "calls in flight across both gateways");
    assert_eq!(f.mock.request_count(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrency_holds_across_two_gateways_on_redis() {
    if !available() {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(data.path());
    concurrency_holds_across_two_gateways(&redis.url(), "redis").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrency_holds_across_two_gateways_on_a_redis_cluster() {
    if !available() {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let cluster = RedisCluster::start(data.path());
    concurrency_holds_across_two_gateways(&cluster.url(), "redis-cluster").await;
}

/// Slots come back when calls end: 100 calls in sequence, alternating gateways, are all
/// admitted with concurrency 2; then a burst still admits exactly 2.
#[tokio::test(flavor = "multi_thread")]
async fn shared_slots_come_back_when_calls_end() {
    if !available() {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(data.path());
    let sync = sync_with(json!({}), json!({"limits": {"concurrency": 2}}));
    let f = two_gateways(&sync, &ledger_yaml("redis", &redis.url(), "lease")).await;
    for i in 0..100 {
        let r = call(&f.gws[i % 2], KEY).await;
        assert_eq!(r.status(), 200, "call {i}");
    }
    assert_eq!(slow_burst(&f.gws, 10, 1_000).await, 2);
}

/// `n` calls of [`KEY`] on the first gateway that the mock answers only after 25 s, once they
/// all reached it (each holds a concurrency slot meanwhile); abort them to end them.
async fn hold_slots(f: &Fleet, n: usize) -> Vec<tokio::task::JoinHandle<()>> {
    let slow = (0..n)
        .map(|_| {
            let base = f.gws[0].base.clone();
            tokio::spawn(async move {
                let _ = client()
                    .post(format!("{base}/v1/chat/completions"))
                    .bearer_auth(KEY)
                    .header("content-type", "application/json")
                    .header("x-mock-delay-ms", "25000")
                    .body(small_call())
                    .send()
                    .await;
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while f.mock.request_count() < n {
        assert!(
            Instant::now() < deadline,
            "the slow calls never reached the mock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    slow
}

/// A gateway killed with -9 while its calls hold every slot: the other gateway refuses, then
/// admits again once the dead gateway's record lapsed (`lease_ttl_seconds`, 3 s here).
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_gateways_slots_come_back_within_the_lease_ttl() {
    if !available() {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(data.path());
    let sync = sync_with(json!({}), json!({"limits": {"concurrency": 2}}));
    let mut f = two_gateways(&sync, &ledger_yaml("redis", &redis.url(), "lease")).await;
    let slow = hold_slots(&f, 2).await;
    let r = call(&f.gws[1], KEY).await;
    assert_eq!(r.status(), 429, "gateway b admitted a third call");
    f.gws[0].kill9();
    let killed = Instant::now();
    loop {
        let r = call(&f.gws[1], KEY).await;
        if r.status() == 200 {
            break;
        }
        assert_eq!(r.status(), 429);
        assert!(
            killed.elapsed() < Duration::from_millis(4_500),
            "not admitted {:?} after the kill (lease_ttl 3 s)",
            killed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("admitted again {:?} after the kill", killed.elapsed());
    for s in slow {
        s.abort();
    }
}

/// A gateway stopped (SIGTERM) while its calls hold every slot gives them back as it stops,
/// not a lease TTL later: the other gateway admits again at once (the TTL here is 30 s).
#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_gateways_slots_come_back_as_it_stops() {
    if !available() {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(data.path());
    let sync = sync_with(json!({}), json!({"limits": {"concurrency": 2}}));
    let ledger = ledger_yaml("redis", &redis.url(), "lease");
    assert!(ledger.contains("lease_ttl_seconds: 3\n"));
    let ledger = ledger.replace("lease_ttl_seconds: 3\n", "lease_ttl_seconds: 30\n");
    let mut f = two_gateways(&sync, &ledger).await;
    let slow = hold_slots(&f, 2).await;
    assert_eq!(call(&f.gws[1], KEY).await.status(), 429);
    f.gws[0].terminate();
    let stopped = Instant::now();
    // Both slots, well before the dead record's 30 s TTL would free them.
    let b = &f.gws[1];
    loop {
        let both = futures_util::future::join_all((0..2).map(|_| slow_call(b, KEY, 500))).await;
        if both.iter().all(|r| r.status() == 200) {
            break;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(15),
            "not admitted {:?} after the stop (lease_ttl 30 s)",
            stopped.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("admitted again {:?} after the stop", stopped.elapsed());
    for s in slow {
        s.abort();
    }
}

/// A call longer than `lease_ttl_seconds` keeps its slot: its gateway renews the record, so the
/// other gateway still refuses after the TTL (a lapsed record would let it admit a second).
#[tokio::test(flavor = "multi_thread")]
async fn a_long_calls_slot_outlives_the_lease_ttl() {
    if !available() {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(data.path());
    let sync = sync_with(json!({}), json!({"limits": {"concurrency": 1}}));
    let f = two_gateways(&sync, &ledger_yaml("redis", &redis.url(), "lease")).await;
    let long = slow_call(&f.gws[0], KEY, 6_000);
    let probe = async {
        let deadline = Instant::now() + Duration::from_secs(10);
        while f.mock.request_count() < 1 {
            assert!(
                Instant::now() < deadline,
                "the long call never reached the mock"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Past the 3 s TTL of the record the grant wrote (renewed since, every second).
        tokio::time::sleep(Duration::from_millis(4_500)).await;
        call(&f.gws[1], KEY).await.status().as_u16()
    };
    let (long, probe) = tokio::join!(long, probe);
    assert_eq!(long.status(), 200);
    assert_eq!(
        probe, 429,
        "the long call's slot was given to the other gateway"
    );
    // Once it ended, the slot is free again (handed back in gateway a's next Redis call).
    let deadline = Instant::now() + Duration::from_secs(2);
    while call(&f.gws[1], KEY).await.status() != 200 {
        assert!(Instant::now() < deadline, "the slot did not come back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `on_unavailable` for shared concurrency: with Redis gone, `allow` falls back to this
/// gateway's own count (2 of 5 slow calls at once admitted), `lease` admits only from spare
/// slots held (none below a limit of 8) and then answers 503.
#[tokio::test(flavor = "multi_thread")]
async fn on_unavailable_applies_to_shared_concurrency() {
    if !available() {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let mut redis = RedisServer::start(data.path());
    let sync = sync_with(json!({}), json!({"limits": {"concurrency": 2}}));
    let env = Env::with(Opts {
        sync: sync.clone(),
        extra: ledger_yaml("redis", &redis.url(), "allow"),
        ..Opts::default()
    })
    .await;
    assert_eq!(call(&env.gw, KEY).await.status(), 200);
    redis.kill9();
    let calls = (0..5).map(|_| slow_call(&env.gw, KEY, 1_000));
    let statuses: Vec<u16> = futures_util::future::join_all(calls)
        .await
        .iter()
        .map(|r| r.status().as_u16())
        .collect();
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(admitted, 2, "{statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    drop(env);

    redis.restart();
    let env = Env::with(Opts {
        sync,
        extra: ledger_yaml("redis", &redis.url(), "lease"),
        ..Opts::default()
    })
    .await;
    assert_eq!(call(&env.gw, KEY).await.status(), 200);
    // The slot went back to Redis with the call's end.
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.kill9();
    let (status, code, _) = denial(call(&env.gw, KEY).await).await;
    assert_eq!((status, code.as_str()), (503, "quota_backend_unavailable"));
}
