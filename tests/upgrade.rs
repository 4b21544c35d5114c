//! Zero-downtime binary upgrade under load: a new `keygate run --upgrade` takes the listening
//! sockets over from the running one (SIGQUIT), no call fails, and the quota both processes
//! charged adds up exactly once the old one has handed its final values over.

mod common;

use common::*;
use keygate::core::pricing::{quota_for, PriceRule, Usage};
use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread")]
async fn binary_upgrade_under_load_fails_no_call_and_loses_no_quota() {
    let mock = keygate::mock::MockBackend::start("127.0.0.1:0")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Both processes must name the same addresses: pick them now (held until exit).
    let proxy = keygate::ops::server::resolve_port_zero("127.0.0.1:0").unwrap();
    let metrics = keygate::ops::server::resolve_port_zero("127.0.0.1:0").unwrap();
    let opts = Opts {
        listen: proxy.clone(),
        ..Opts::default()
    };
    let yaml = config_yaml(&opts, &format!("http://{}", mock.addr()))
        .replace(
            "metrics_listen: \"127.0.0.1:0\"",
            &format!("metrics_listen: \"{metrics}\""),
        )
        .replace("grace_period_seconds: 0", "grace_period_seconds: 2");
    std::fs::write(
        dir.path().join("keys.json"),
        serde_json::to_vec(&opts.sync).unwrap(),
    )
    .unwrap();
    let config = dir.path().join("keygate.yaml");
    std::fs::write(&config, yaml).unwrap();
    let mut old = spawn_keygate(dir.path(), &config);

    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 20}).to_string();
    let actual = quota_for(
        PriceRule::Ratio {
            ratio: 0.075,
            completion_ratio: 4.0,
        },
        1.0,
        500_000.0,
        Usage {
            prompt_tokens: 1 + body.len() as u64 / 4,
            completion_tokens: 20,
        },
    );
    let base = old.base.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let ok_calls = Arc::new(AtomicI64::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut load = Vec::new();
    for _ in 0..8 {
        let (base, body, stop, ok_calls, failures) = (
            base.clone(),
            body.clone(),
            stop.clone(),
            ok_calls.clone(),
            failures.clone(),
        );
        load.push(tokio::spawn(async move {
            let c = client();
            while !stop.load(Ordering::Relaxed) {
                let r = c
                    .post(format!("{base}/v1/chat/completions"))
                    .bearer_auth(OK)
                    .header("x-mock-delay-ms", "20")
                    .body(body.clone())
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 200 => match r.bytes().await {
                        Ok(_) => {
                            ok_calls.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => failures.lock().unwrap().push(format!("body: {e}")),
                    },
                    Ok(r) => failures
                        .lock()
                        .unwrap()
                        .push(format!("status {}", r.status())),
                    Err(e) => failures.lock().unwrap().push(format!("{e:?}")),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let before = ok_calls.load(Ordering::Relaxed);

    // The new binary waits on the upgrade socket until the old one gets SIGQUIT.
    let new_dir = dir.path().to_path_buf();
    let new_config = config.clone();
    let new = std::thread::spawn(move || spawn_keygate_with(&new_dir, &new_config, &["--upgrade"]));
    tokio::time::sleep(Duration::from_millis(500)).await;
    old.signal("QUIT");
    let new = tokio::task::spawn_blocking(move || new.join().unwrap())
        .await
        .unwrap();
    let exit = tokio::task::spawn_blocking(move || old.wait_exit())
        .await
        .unwrap();
    assert!(exit.success(), "the old process exited with {exit:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    let total = ok_calls.load(Ordering::Relaxed);
    eprintln!(
        "upgrade under load: {total} calls ({before} before the upgrade), {} failed",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "failed calls across the upgrade: {failures:?}"
    );
    assert!(total > before, "the new process served calls");

    // Every call was charged exactly once, whichever process served it.
    let started = Instant::now();
    loop {
        let used = new.total_used(OK).await;
        if used == total * actual {
            break;
        }
        assert!(
            used > total * actual || started.elapsed() < Duration::from_secs(10),
            "after the upgrade {used} units are charged for {total} calls × {actual}"
        );
        if started.elapsed() > Duration::from_secs(10) {
            panic!("after the upgrade {used} units are charged for {total} calls × {actual}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
