//! Several gateways, one quota: the shared ledger on a real redis-server and a real 3-node
//! Redis Cluster, with real gateways and a real mock upstream. Skipped (with a message) when
//! redis-server is not installed, unless `KEYGATE_REQUIRE_REDIS` is set.

mod common;

use common::free_port;
use common::redis::{available, RedisCluster, RedisServer};
use common::*;
use keygate::core::pricing::{quota_for, PriceRule, Usage};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

const MINI: PriceRule = PriceRule::Ratio {
    ratio: 0.075,
    completion_ratio: 4.0,
};

fn small_call() -> String {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 20}).to_string()
}

/// What one small call costs (the mock reports 1 + len/4 prompt tokens and 20 completion).
fn actual() -> i64 {
    let usage = Usage {
        prompt_tokens: 1 + small_call().len() as u64 / 4,
        completion_tokens: 20,
    };
    quota_for(MINI, 1.0, 500_000.0, usage)
}

/// What keygate reserves for one small call (prompt estimate: bytes / 3).
fn reserved() -> i64 {
    let usage = Usage {
        prompt_tokens: (small_call().len() as u64).div_ceil(3),
        completion_tokens: 20,
    };
    quota_for(MINI, 1.0, 500_000.0, usage)
}

fn sync_with_quota(quota: i64) -> Value {
    let mut s = standard_sync();
    s["keys"][0]["quota"] = json!(quota);
    s
}

fn ledger_yaml(backend: &str, url: &str, on_unavailable: &str) -> String {
    format!(
        "ledger:\n  backend: {backend}\n  redis_url: \"{url}\"\n  on_unavailable: {on_unavailable}\n  lease_ttl_seconds: 3\n"
    )
}

/// Two gateways (in `root/a` and `root/b`) on one mock upstream and one ledger.
fn two_gateways(root: &Path, mock: &keygate::mock::MockBackend, opts: &Opts) -> [Gateway; 2] {
    let url = format!("http://{}", mock.addr());
    ["a", "b"].map(|name| {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        start_gateway(&dir, opts, &url)
    })
}

/// A redis-server, a mock upstream and two gateways on both (in `root/a` and `root/b`), with
/// `sync` and `on_unavailable`. Dropped in this order: gateways first.
struct Fleet {
    a: Gateway,
    b: Gateway,
    redis: RedisServer,
    mock: keygate::mock::MockBackend,
    root: tempfile::TempDir,
    _data: tempfile::TempDir,
}

/// A [`Fleet`]; `None` (the test passes, saying why) when redis-server is not installed.
async fn fleet(sync: Value, on_unavailable: &str) -> Option<Fleet> {
    if !available() {
        return None;
    }
    let data = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(data.path());
    let mock = keygate::mock::MockBackend::start("127.0.0.1:0")
        .await
        .unwrap();
    let root = tempfile::tempdir().unwrap();
    let opts = Opts {
        sync,
        extra: ledger_yaml("redis", &redis.url(), on_unavailable),
        ..Opts::default()
    };
    let [a, b] = two_gateways(root.path(), &mock, &opts);
    Some(Fleet {
        a,
        b,
        redis,
        mock,
        root,
        _data: data,
    })
}

async fn call(gw: &Gateway, delay_ms: u32) -> reqwest::Response {
    client()
        .post(format!("{}/v1/chat/completions", gw.base))
        .bearer_auth(OK)
        .header("content-type", "application/json")
        .header("x-mock-delay-ms", delay_ms.to_string())
        .body(small_call())
        .send()
        .await
        .unwrap()
}

/// Wait until every gateway's `/api/usage/token/` shows `expected` (they agree within the
/// report interval); the last values seen.
async fn wait_total_used(gws: &[&Gateway], expected: i64) -> Vec<i64> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut seen = Vec::new();
        for g in gws {
            seen.push(g.total_used(OK).await);
        }
        if seen.iter().all(|v| *v == expected) || Instant::now() > deadline {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn readyz(gw: &Gateway) -> (u16, Value) {
    let r = client()
        .get(format!("{}/readyz", gw.metrics.as_ref().unwrap()))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

/// Wait until `/readyz` reports the ledger `state` ("ok" or "degraded").
async fn wait_ledger_state(gw: &Gateway, state: &str) -> (u16, Value) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = readyz(gw).await;
        if body["ledger"]["state"] == state {
            return (status, body);
        }
        assert!(Instant::now() < deadline, "ledger never {state}: {body}");
        // A call makes the gateway talk to Redis (a refill or a report) and so notice.
        let _ = call(gw, 0).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// 100 concurrent calls split across two gateways on a key with room for 10.
async fn quota_holds_across_two_gateways(url: &str, backend: &str) {
    let sync = sync_with_quota(10 * actual());
    limit_holds_across_two_gateways(url, backend, sync, "insufficient_quota").await;
}

/// 100 calls of key `OK` at once, over two gateways, where `sync` leaves room for 10 of them
/// (in the key's quota, its account's or a budget): at most 10 are admitted, the rest refused
/// with `refused`, and both gateways count what was admitted.
async fn limit_holds_across_two_gateways(url: &str, backend: &str, sync: Value, refused: &str) {
    let quota = 10 * actual();
    let mock = keygate::mock::MockBackend::start("127.0.0.1:0")
        .await
        .unwrap();
    let root = tempfile::tempdir().unwrap();
    let opts = Opts {
        sync,
        extra: ledger_yaml(backend, url, "lease"),
        ..Opts::default()
    };
    let [a, b] = two_gateways(root.path(), &mock, &opts);
    let calls = (0..100).map(|i| call(if i % 2 == 0 { &a } else { &b }, 200));
    let mut admitted = 0;
    for r in futures_util::future::join_all(calls).await {
        match r.status().as_u16() {
            200 => admitted += 1,
            429 => assert_eq!(denial(r).await.1, refused),
            s => panic!("unexpected status {s}"),
        }
    }
    // The stated bound (README): leases never pass the limit; only a call costing more than it
    // reserved can, by that difference, per call in flight when the key ran out.
    let bound = (actual() - reserved()).max(0);
    assert!(
        admitted as i64 * actual() <= quota + 10 * bound,
        "admitted {admitted}"
    );
    assert!(
        (5..=10).contains(&admitted),
        "admitted {admitted} of 100 with room for 10"
    );
    assert_eq!(mock.request_count(), admitted);
    // Both gateways show the consumption made through both.
    let expected = admitted as i64 * actual();
    let seen = wait_total_used(&[&a, &b], expected).await;
    assert_eq!(seen, vec![expected, expected]);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_gateways_on_one_redis_share_one_quota() {
    if !available() {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(data.path());
    quota_holds_across_two_gateways(&redis.url(), "redis").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_gateways_on_a_redis_cluster_share_one_quota() {
    if !available() {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let cluster = RedisCluster::start(data.path());
    quota_holds_across_two_gateways(&cluster.url(), "redis-cluster").await;
}

/// An account's quota and a budget period hold across gateways as a key's quota does: their
/// counters take leases in Redis the same way.
#[tokio::test(flavor = "multi_thread")]
async fn an_accounts_quota_and_a_budget_hold_across_two_gateways() {
    if !available() {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(data.path());
    // An unlimited key in an account with room for 10 calls.
    let mut sync = sync_with_quota(0);
    sync["accounts"] = json!({"acme": {"name": "Acme", "quota": 10 * actual()}});
    sync["keys"][0]["account"] = json!("acme");
    sync["keys"][0]["unlimited_quota"] = json!(true);
    limit_holds_across_two_gateways(&redis.url(), "redis", sync, "insufficient_quota").await;
    // A key whose daily budget has room for 10 calls (a fresh Redis: key 1's counters are
    // new).
    let data = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(data.path());
    let mut sync = sync_with_quota(1_000_000_000);
    sync["keys"][0]["budget"] = json!({"period": "daily", "amount": 10 * actual()});
    limit_holds_across_two_gateways(&redis.url(), "redis", sync, "budget_exceeded").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn consumption_survives_kill_9_of_a_gateway() {
    let Some(mut f) = fleet(sync_with_quota(1_000_000), "lease").await else {
        return;
    };
    let (a, b, root) = (&mut f.a, &f.b, f.root.path().to_path_buf());
    for _ in 0..4 {
        assert_eq!(call(b, 0).await.status(), 200);
    }
    // A steady load on `a`, killed with -9 in the middle of it: its last calls are not
    // reported yet, and calls are in flight.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
    let load = {
        let (base, done) = (a.base.clone(), done.clone());
        tokio::spawn(async move {
            let c = client();
            for _ in 0..2000 {
                let r = c
                    .post(format!("{base}/v1/chat/completions"))
                    .bearer_auth(OK)
                    .body(small_call())
                    .send()
                    .await;
                let Ok(r) = r else { break };
                if r.status() != 200 || r.bytes().await.is_err() {
                    break;
                }
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    a.kill9();
    let _ = load.await;
    let completed = done.load(std::sync::atomic::Ordering::Relaxed) + 4;
    assert!(completed > 10, "the load ran ({completed} calls)");
    *a = spawn_keygate(&root.join("a"), &root.join("a/keygate.yaml"));
    // Once the dead gateway's lease record expires (lease_ttl_seconds: 3), what it held
    // counts as spent: nothing it charged is lost, on either gateway.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = [a.total_used(OK).await, b.total_used(OK).await];
    assert_eq!(after[0], after[1], "the gateways disagree");
    assert!(
        after[0] >= completed * actual(),
        "after the kill {} < {completed} calls × {}",
        after[0],
        actual()
    );
    // What the kill stranded is bounded by the lease it held: sized to 2 s of the key's
    // recent spending and topped up at half, so about 3 s of it. The load ran 1.5 s: about
    // twice the calls made, at their reservation (three times, for a load that sped up).
    let stranded = after[0] - completed * actual();
    assert!(
        stranded <= 3 * completed * reserved(),
        "stranded {stranded} for {completed} calls"
    );
    eprintln!("kill -9 stranded {stranded} units ({completed} calls made)");
    // It still serves, and counts on from there.
    assert_eq!(call(a, 0).await.status(), 200);
}

/// A Redis that loses a key's state (here `FLUSHALL`; in life a failover before the writes
/// reached the replica, or a restart without persistence) loses the grants of the leases two
/// gateways are spending: neither is trusted on its word for them (each wrote its record within
/// the day), and each commits what it spent again, so every call is counted. Here `committed`
/// is then raised above what either was granted (as another gateway's grants would keep it), so
/// that comparing the two cannot tell a lost record from one removed for age.
#[tokio::test(flavor = "multi_thread")]
async fn spending_from_leases_whose_grants_redis_lost_is_counted() {
    let Some(f) = fleet(standard_sync(), "lease").await else {
        return;
    };
    let (a, b) = (&f.a, &f.b);
    for gw in [a, b, a, b, a] {
        assert_eq!(call(gw, 0).await.status(), 200);
    }
    let before = 5 * actual();
    assert_eq!(wait_total_used(&[a, b], before).await, vec![before, before]);
    f.redis.cli(&["flushall"]);
    let others = 10_000;
    f.redis
        .cli(&["hincrby", "keygate:{1}", "committed", &others.to_string()]);
    for gw in [b, a, b] {
        assert_eq!(call(gw, 0).await.status(), 200);
    }
    // The five calls before the loss are in the leases' spending too: all eight count.
    let expected = others + 8 * actual();
    assert_eq!(
        wait_total_used(&[a, b], expected).await,
        vec![expected, expected]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_outage_with_lease_spends_what_is_held_then_503() {
    if !available() {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(data.path());
    let env = Env::with(Opts {
        extra: ledger_yaml("redis", &redis.url(), "lease"),
        ..Opts::default()
    })
    .await;
    assert_eq!(call(&env.gw, 0).await.status(), 200);
    assert_eq!(readyz(&env.gw).await.1["ledger"]["state"], "ok");
    // Redis hangs (SIGSTOP): calls are answered within the Redis timeout, never hang.
    redis.pause();
    let mut statuses = Vec::new();
    for _ in 0..40 {
        let started = Instant::now();
        let r = call(&env.gw, 0).await;
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "a call took {:?} while Redis hung",
            started.elapsed()
        );
        let status = r.status().as_u16();
        if status == 503 {
            assert_eq!(denial(r).await.1, "quota_backend_unavailable");
            statuses.push(503);
            break;
        }
        statuses.push(status);
    }
    assert_eq!(statuses.last(), Some(&503), "{statuses:?}");
    // The lease it held (four calls' worth after the first call, at least) was spent first.
    assert!(
        statuses.iter().filter(|s| **s == 200).count() >= 3,
        "{statuses:?}"
    );
    assert!(statuses[..statuses.len() - 1].iter().all(|s| *s == 200));
    let (status, body) = wait_ledger_state(&env.gw, "degraded").await;
    assert_eq!((status, body["ready"].as_bool()), (200, Some(true)));
    assert!(env
        .gw
        .metrics_text()
        .await
        .contains("keygate_ledger_backend_up 0"));
    redis.resume();
    wait_until_admitted(&env.gw).await;
    assert_eq!(readyz(&env.gw).await.1["ledger"]["state"], "ok");
    assert!(env
        .gw
        .metrics_text()
        .await
        .contains("keygate_ledger_backend_up 1"));
}

/// Calls are admitted again (Redis is back): poll for a 200.
async fn wait_until_admitted(gw: &Gateway) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = call(gw, 0).await;
        if r.status() == 200 {
            return;
        }
        assert_eq!(denial(r).await.1, "quota_backend_unavailable");
        assert!(Instant::now() < deadline, "never admitted again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_outage_with_deny_refuses_at_once() {
    if !available() {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let mut redis = RedisServer::start(data.path());
    let env = Env::with(Opts {
        extra: ledger_yaml("redis", &redis.url(), "deny"),
        ..Opts::default()
    })
    .await;
    assert_eq!(call(&env.gw, 0).await.status(), 200);
    redis.kill9();
    let (status, body) = wait_ledger_state(&env.gw, "degraded").await;
    assert_eq!((status, body["ready"].as_bool()), (503, Some(false)));
    // It holds a lease, and still refuses.
    let started = Instant::now();
    let (status, code, _) = denial(call(&env.gw, 0).await).await;
    assert_eq!((status, code.as_str()), (503, "quota_backend_unavailable"));
    assert!(started.elapsed() < Duration::from_secs(1));
    // Unknown keys are still told so: the ledger is not consulted for them.
    let r = client()
        .post(env.url("/v1/chat/completions"))
        .bearer_auth("sk-nope")
        .body(small_call())
        .send()
        .await
        .unwrap();
    assert_eq!(denial(r).await.1, "invalid_api_key");
    redis.restart();
    wait_until_admitted(&env.gw).await;
    assert_eq!(readyz(&env.gw).await.0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_outage_with_allow_admits_and_reconciles() {
    let Some(mut f) = fleet(standard_sync(), "allow").await else {
        return;
    };
    let (a, b, redis, mock) = (&f.a, &f.b, &mut f.redis, &f.mock);
    assert_eq!(call(a, 0).await.status(), 200);
    redis.kill9();
    wait_ledger_state(a, "degraded").await;
    // Far more than any lease: all admitted, counted locally.
    for _ in 0..20 {
        assert_eq!(call(a, 0).await.status(), 200);
    }
    redis.restart();
    wait_ledger_state(a, "ok").await;
    // Reconciled: both gateways show every call `a` made, the outage's included (each call
    // that reached the upstream was admitted and charged).
    let expected = mock.request_count() as i64 * actual();
    let seen = wait_total_used(&[a, b], expected).await;
    assert_eq!(seen, vec![expected, expected]);
}

#[tokio::test(flavor = "multi_thread")]
async fn local_history_is_seeded_into_redis_once() {
    if !available() {
        return;
    }
    // A gateway on the local ledger charges 3 calls and stops cleanly.
    let env = Env::start().await;
    for _ in 0..3 {
        assert_eq!(call(&env.gw, 0).await.status(), 200);
    }
    let Env { mock, mut gw, dir } = env;
    gw.terminate();
    // Two gateways start at once on copies of that state, both on one Redis: the history is
    // added once, not twice.
    let data = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(data.path());
    let root = tempfile::tempdir().unwrap();
    let url = format!("http://{}", mock.addr());
    let opts = Opts {
        extra: ledger_yaml("redis", &redis.url(), "lease"),
        ..Opts::default()
    };
    let mut children = Vec::new();
    for name in ["a", "b"] {
        let d = root.path().join(name);
        std::fs::create_dir_all(d.join("var")).unwrap();
        for f in std::fs::read_dir(dir.path().join("var")).unwrap() {
            let f = f.unwrap();
            if f.file_type().unwrap().is_file() {
                std::fs::copy(f.path(), d.join("var").join(f.file_name())).unwrap();
            }
        }
        let (o, url) = (
            Opts {
                extra: opts.extra.clone(),
                ..Opts::default()
            },
            url.clone(),
        );
        children.push(std::thread::spawn(move || start_gateway(&d, &o, &url)));
    }
    let gws: Vec<Gateway> = children.into_iter().map(|c| c.join().unwrap()).collect();
    let expected = 3 * actual();
    let seen = wait_total_used(&[&gws[0], &gws[1]], expected).await;
    assert_eq!(seen, vec![expected, expected]);
}

#[test]
fn ledger_config_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("keys.json"),
        serde_json::to_vec(&standard_sync()).unwrap(),
    )
    .unwrap();
    for (ledger, message) in [
        (
            "ledger:\n  backend: redis\n",
            "ledger: redis_url is needed for a redis backend",
        ),
        (
            "ledger:\n  backend: redis\n  redis_url: \"http://x\"\n",
            "is not a redis:// address",
        ),
        (
            "ledger:\n  backend: redis\n  redis_url: \"redis://a:1\"\n  on_unavailable: maybe\n",
            "on_unavailable",
        ),
        (
            "ledger:\n  backend: redis\n  redis_url: \"redis://a:1,redis://b:1\"\n",
            "a list is for redis-cluster",
        ),
    ] {
        let opts = Opts {
            extra: ledger.to_string(),
            ..Opts::default()
        };
        let config = dir.path().join("keygate.yaml");
        std::fs::write(&config, config_yaml(&opts, "http://127.0.0.1:1")).unwrap();
        let (ok, out) = keygate_cli(&["check", "-c", config.to_str().unwrap()]);
        assert!(!ok, "accepted {ledger:?}");
        assert!(out.contains(message), "{ledger:?}: {out}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_clean_stop_gives_the_lease_back() {
    let Some(mut f) = fleet(sync_with_quota(1_000_000), "lease").await else {
        return;
    };
    let (a, b) = (&mut f.a, &f.b);
    // `a` takes a lease of several calls and spends one.
    assert_eq!(call(a, 0).await.status(), 200);
    a.terminate();
    // Past the lease TTL (3 s) a dead gateway's lease would count as spent; a stopped one
    // gave it back, so only the call shows.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(b.total_used(OK).await, actual());
}

#[tokio::test(flavor = "multi_thread")]
async fn unlimited_keys_are_counted_across_gateways() {
    let mut sync = standard_sync();
    sync["keys"][0]["unlimited_quota"] = json!(true);
    sync["keys"][0]["quota"] = json!(0);
    let Some(f) = fleet(sync, "lease").await else {
        return;
    };
    let (a, b) = (&f.a, &f.b);
    for i in 0..10 {
        assert_eq!(call(if i % 2 == 0 { a } else { b }, 0).await.status(), 200);
    }
    let expected = 10 * actual();
    let seen = wait_total_used(&[a, b], expected).await;
    assert_eq!(seen, vec![expected, expected]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_failover_is_followed() {
    if !available() {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let mut cluster = RedisCluster::start_with_replicas(data.path(), 1);
    let env = Env::with(Opts {
        extra: ledger_yaml("redis-cluster", &cluster.url(), "lease"),
        ..Opts::default()
    })
    .await;
    for _ in 0..3 {
        assert_eq!(call(&env.gw, 0).await.status(), 200);
    }
    let before = env.gw.total_used(OK).await;
    assert_eq!(before, 3 * actual());
    // The primary holding key 1's slot dies; its replica takes over (cluster-node-timeout 2 s),
    // and the client library finds it.
    let primary = cluster.primary_for("keygate:{1}");
    cluster.nodes[primary].kill9();
    let started = Instant::now();
    let mut made = 3;
    loop {
        let r = call(&env.gw, 0).await;
        if r.status() == 200 {
            made += 1;
            if started.elapsed() > Duration::from_secs(2)
                && readyz(&env.gw).await.1["ledger"]["state"] == "ok"
            {
                break;
            }
        } else {
            assert_eq!(denial(r).await.1, "quota_backend_unavailable");
        }
        if started.elapsed() > Duration::from_secs(30) {
            let log = env.gw.log();
            let nodes = cluster.nodes[(primary + 1) % 6].cli(&["cluster", "nodes"]);
            panic!(
                "never served again after the failover ({made} calls)\n{}\n{nodes}",
                &log[log.len().saturating_sub(3000)..],
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Served again, and counting on the new primary, every call: Redis replicates
    // asynchronously, and the kill can come before the lease's grant reached the replica (it
    // did in CI once, and this counted 3 instead of 48); the gateway then commits its spending
    // again (see `spending_from_leases_whose_grants_redis_lost_is_counted`).
    let new_primary = cluster.primary_for("keygate:{1}");
    assert_ne!(new_primary, primary);
    let expected = made * actual();
    let seen = wait_total_used(&[&env.gw], expected).await;
    assert_eq!(seen, vec![expected]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gateway_started_before_redis_refuses_then_serves() {
    if !available() {
        return;
    }
    let port = free_port();
    let env = Env::with(Opts {
        extra: ledger_yaml("redis", &format!("redis://127.0.0.1:{port}"), "lease"),
        ..Opts::default()
    })
    .await;
    // It starts and answers, without Redis: quickly, and never "ok".
    let started = Instant::now();
    let (status, code, _) = denial(call(&env.gw, 0).await).await;
    assert_eq!((status, code.as_str()), (503, "quota_backend_unavailable"));
    assert!(started.elapsed() < Duration::from_secs(3));
    let (status, body) = readyz(&env.gw).await;
    assert_eq!(status, 200);
    assert_eq!(body["ledger"]["state"], "degraded");
    assert!(env
        .gw
        .metrics_text()
        .await
        .contains("keygate_ledger_backend_up 0"));
    // Its usage endpoint cannot know what other gateways charged: it says so.
    let (status, body) = env.gw.get("/api/usage/token/", OK).await;
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    // Redis comes up: calls are admitted.
    let data = tempfile::tempdir().unwrap();
    let _redis = RedisServer::start_on(data.path(), port);
    wait_until_admitted(&env.gw).await;
    assert_eq!(readyz(&env.gw).await.1["ledger"]["state"], "ok");
    // The call that was admitted settles after its answer is sent: wait for it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut used = env.gw.total_used(OK).await;
    while used != actual() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        used = env.gw.total_used(OK).await;
    }
    assert_eq!(used, actual());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_key_gives_its_lease_back() {
    let Some(mut f) = fleet(sync_with_quota(1_000_000), "lease").await else {
        return;
    };
    let (a, b) = (&mut f.a, &f.b);
    // `a` takes a lease of several calls and spends one; then the key is idle past the lease
    // TTL (3 s), and `a` gives the lease back by itself.
    assert_eq!(call(a, 0).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(4500)).await;
    // So a kill -9 now strands nothing: past the TTL, only the call shows.
    a.kill9();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(b.total_used(OK).await, actual());
}

/// A key with a daily budget, on Redis: the budget period's counter expires a day after the
/// period ends (its two Redis keys carry the time), the key's lifetime counter never.
#[tokio::test]
async fn a_budget_periods_redis_keys_expire_the_keys_lifetime_counter_never() {
    let mut sync = standard_sync();
    sync["keys"][0]["budget"] = json!({"period": "daily", "amount": 1_000_000_000});
    let Some(f) = fleet(sync, "lease").await else {
        return;
    };
    assert_eq!(call(&f.a, 0).await.status(), 200);
    let now = keygate::core::clock::unix_now();
    let today = now.div_euclid(86_400) * 86_400;
    let budget = keygate::core::accounts::budget_ledger_id(1, today);
    let until = today + 86_400 + keygate::core::budget::KEEP_ENDED;
    let ttl = |key: String| f.redis.cli(&["TTL", &key]).trim().parse::<i64>().unwrap();
    // Granted at admission (the first call waits for a lease), reported within a second.
    let deadline = Instant::now() + Duration::from_secs(5);
    while ttl(format!("keygate:{{{budget}}}")) == -2 {
        assert!(
            Instant::now() < deadline,
            "the budget's counter never reached Redis"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let near = |t: i64| (until - now - 10..=until - now).contains(&t);
    for key in [
        format!("keygate:{{{budget}}}"),
        format!("keygate:{{{budget}}}:leases"),
    ] {
        let t = ttl(key.clone());
        assert!(near(t), "{key}: TTL {t}, expected about {}", until - now);
    }
    assert_eq!(ttl("keygate:{1}".into()), -1);
    assert_eq!(ttl("keygate:{1}:leases".into()), -1);
}
