//! Live reload of the sync file: every way it can change, rejection of bad files with the old
//! table still serving, SIGHUP, reloads under load, and consumed quota kept across reloads.

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

const NEW_KEY: &str = "sk-test-reloaded-000000000000000000000000000000000";

fn with_new_key(revision: u64) -> Value {
    let mut s = standard_sync();
    s["revision"] = json!(revision);
    s["keys"]
        .as_array_mut()
        .unwrap()
        .push(json!({"id": 100, "name": "new", "key": NEW_KEY, "quota": 1000000}));
    s
}

fn write_atomic(path: &Path, v: &Value) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(v).unwrap()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn write_in_place(path: &Path, bytes: &[u8]) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.write_all(bytes).unwrap();
}

/// Poll until `key` gets `status` on a chat call; returns how long that took.
async fn wait_for_status(env: &Env, key: &str, status: u16) -> Duration {
    let started = Instant::now();
    loop {
        if chat(env, key, "gpt-4o-mini").await.status() == status {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "change never took effect"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn readyz(env: &Env) -> Value {
    let m = env.gw.metrics.clone().unwrap();
    client()
        .get(format!("{m}/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn reload_errors(env: &Env) -> u64 {
    let text = env.gw.metrics_text().await;
    text.lines()
        .find(|l| l.starts_with("keygate_config_reloads_total{result=\"error\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn atomic_rename_and_in_place_rewrite_are_picked_up() {
    let env = Env::start().await;
    let path = env.dir.path().join("keys.json");
    assert_eq!(chat(&env, NEW_KEY, "gpt-4o-mini").await.status(), 401);
    write_atomic(&path, &with_new_key(8));
    let t1 = wait_for_status(&env, NEW_KEY, 200).await;
    assert_eq!(readyz(&env).await["revision"], 8);
    write_in_place(&path, &serde_json::to_vec(&standard_sync()).unwrap());
    let t2 = wait_for_status(&env, NEW_KEY, 401).await;
    eprintln!("change in force after: rename {t1:?}, in-place rewrite {t2:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn kubernetes_configmap_symlink_swap_is_picked_up() {
    // The layout a ConfigMap volume has: keys.json -> ..data/keys.json, ..data -> ..v1.
    let mock = keygate::mock::MockBackend::start("127.0.0.1:0")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    std::fs::create_dir(d.join("..v1")).unwrap();
    std::fs::write(
        d.join("..v1/keys.json"),
        serde_json::to_vec(&standard_sync()).unwrap(),
    )
    .unwrap();
    std::os::unix::fs::symlink("..v1", d.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/keys.json", d.join("keys.json")).unwrap();
    let opts = Opts::default();
    std::fs::write(
        d.join("keygate.yaml"),
        config_yaml(&opts, &format!("http://{}", mock.addr())),
    )
    .unwrap();
    let gw = spawn_keygate(&d, &d.join("keygate.yaml"));
    let env = Env { mock, gw, dir };
    assert_eq!(chat(&env, NEW_KEY, "gpt-4o-mini").await.status(), 401);

    std::fs::create_dir(d.join("..v2")).unwrap();
    std::fs::write(
        d.join("..v2/keys.json"),
        serde_json::to_vec(&with_new_key(9)).unwrap(),
    )
    .unwrap();
    std::os::unix::fs::symlink("..v2", d.join("..data_tmp")).unwrap();
    std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
    let t = wait_for_status(&env, NEW_KEY, 200).await;
    eprintln!("configmap swap in force after {t:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_sync_files_are_rejected_and_the_old_table_keeps_serving() {
    let env = Env::start().await;
    let path = env.dir.path().join("keys.json");
    let mut bad_cidr = with_new_key(20);
    bad_cidr["keys"][0]["allow_ips"] = json!(["10.0.0/8"]);
    let mut dup = with_new_key(21);
    dup["keys"][1]["key"] = json!(OK);
    dup["keys"][1].as_object_mut().unwrap().remove("key_sha256");
    let mut unknown = with_new_key(22);
    unknown["keys"][0]["alow_ips"] = json!([]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("broken json", b"{\"keys\": [".to_vec()),
        ("bad CIDR", serde_json::to_vec(&bad_cidr).unwrap()),
        ("duplicate key", serde_json::to_vec(&dup).unwrap()),
        ("unknown field", serde_json::to_vec(&unknown).unwrap()),
    ];
    for (what, bytes) in cases {
        let before = reload_errors(&env).await;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, &bytes).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        let started = Instant::now();
        while reload_errors(&env).await == before {
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "{what}: never rejected"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(chat(&env, OK, "gpt-4o-mini").await.status(), 200, "{what}");
        assert_eq!(
            chat(&env, NEW_KEY, "gpt-4o-mini").await.status(),
            401,
            "{what}"
        );
        assert_eq!(readyz(&env).await["revision"], 7, "{what}");
    }
    // A good file afterwards is taken.
    write_atomic(&path, &with_new_key(23));
    wait_for_status(&env, NEW_KEY, 200).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_forces_a_reload() {
    let env = Env::with(Opts {
        extra: "watch_sync_file: false".into(),
        ..Opts::default()
    })
    .await;
    write_atomic(&env.dir.path().join("keys.json"), &with_new_key(30));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        chat(&env, NEW_KEY, "gpt-4o-mini").await.status(),
        401,
        "not watching"
    );
    env.gw.signal("HUP");
    wait_for_status(&env, NEW_KEY, 200).await;
    assert_eq!(readyz(&env).await["revision"], 30);
}

#[tokio::test(flavor = "multi_thread")]
async fn reloads_under_load_fail_no_call() {
    let env = Env::start().await;
    let path = env.dir.path().join("keys.json");
    let base = env.gw.base.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (base, stop) = (base.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let c = client();
            let (mut ok, mut failed) = (0u64, Vec::new());
            for _ in 0..100_000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let r = c
                    .post(format!("{base}/v1/chat/completions"))
                    .bearer_auth(OK)
                    .body(chat_body("gpt-4o-mini"))
                    .send()
                    .await;
                match r {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        if status == 200 && r.bytes().await.is_ok() {
                            ok += 1;
                        } else {
                            failed.push(status);
                        }
                    }
                    Err(e) => failed.push(if e.is_timeout() { 1 } else { 0 }),
                }
            }
            (ok, failed)
        }));
    }
    for rev in 100..125u64 {
        let mut s = with_new_key(rev);
        s["keys"][99 % 8]["name"] = json!(format!("renamed {rev}"));
        write_atomic(&path, &s);
        tokio::time::sleep(Duration::from_millis(80)).await;
    }
    let started = Instant::now();
    while readyz(&env).await["revision"] != 124 {
        assert!(started.elapsed() < Duration::from_secs(15));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed) = (0, Vec::new());
    for c in clients {
        let (o, f) = c.await.unwrap();
        ok += o;
        failed.extend(f);
    }
    let text = env.gw.metrics_text().await;
    let reloads = text
        .lines()
        .find(|l| l.starts_with("keygate_config_reloads_total{result=\"ok\"}"))
        .unwrap()
        .to_string();
    eprintln!("{ok} calls during 25 reloads; {reloads}");
    assert!(failed.is_empty(), "failed calls: {failed:?}");
    assert!(ok > 100, "{ok}");
    let n: u64 = reloads.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= 21, "only {n} reloads");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_never_resets_consumed_quota() {
    let env = Env::start().await;
    for _ in 0..3 {
        assert_eq!(chat(&env, OK, "gpt-4o-mini").await.status(), 200);
    }
    env.gw.wait_records(3).await;
    let used = env.gw.total_used(OK).await;
    assert!(used > 0);
    // Top up key 1 and reload.
    let mut s = with_new_key(40);
    s["keys"][0]["quota"] = json!(5_000_000);
    write_atomic(&env.dir.path().join("keys.json"), &s);
    wait_for_status(&env, NEW_KEY, 200).await;
    let (_, body) = env.gw.get("/api/usage/token/", OK).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["data"]["total_used"], used);
    assert_eq!(v["data"]["total_granted"], 5_000_000);
    assert_eq!(v["data"]["total_available"], 5_000_000 - used);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_running_request_keeps_the_table_it_started_with() {
    let env = Env::start().await;
    let r = slow_stream(&env.gw.base, 200, 8).await;
    assert_eq!(r.status(), 200);
    // Disable the key mid-stream.
    let mut s = standard_sync();
    s["revision"] = json!(50);
    s["keys"][0]["status"] = json!("disabled");
    write_atomic(&env.dir.path().join("keys.json"), &s);
    let body = r.text().await.unwrap();
    assert!(body.contains("[DONE]"), "{body}");
    wait_for_status(&env, OK, 401).await;
    let recs = env.gw.wait_records(1).await;
    assert!(
        recs[0]["quota"].as_i64().unwrap() > 0,
        "the stream was still charged"
    );
}

fn sync_file_reads(metrics: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("keygate_sync_file_reads_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("keygate_sync_file_reads_total exported")
}

#[tokio::test(flavor = "multi_thread")]
async fn reading_the_sync_file_or_writing_other_files_does_not_reread_it() {
    let env = Env::start().await;
    let path = env.dir.path().join("keys.json");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = sync_file_reads(&env.gw.metrics_text().await);
    // Readers of the file (the keys CLI, backups, `cat`) and other files in its folder: no
    // change to the sync file, so no re-read. (Opening a file fires a watch event; reacting to
    // it made the gateway re-read its own file for ever.)
    for i in 0..10 {
        let _ = std::fs::read(&path).unwrap();
        std::fs::write(env.dir.path().join("notes.txt"), format!("{i}")).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = sync_file_reads(&env.gw.metrics_text().await);
    assert_eq!(after, before, "the sync file was re-read without a change");
    // A real change is still seen (and counted).
    write_atomic(&path, &with_new_key(8));
    wait_for_status(&env, NEW_KEY, 200).await;
    assert!(sync_file_reads(&env.gw.metrics_text().await) > after);
}
