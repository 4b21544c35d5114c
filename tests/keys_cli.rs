//! `keygate keys …` and `keygate import new-api` driving a real gateway: each edit is an atomic
//! replace of the sync file that the running gateway picks up through its normal reload.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn cli(env: &Env, args: &[&str]) -> (bool, String) {
    let conf = env.dir.path().join("keygate.yaml");
    let mut all: Vec<&str> = args.to_vec();
    let conf = conf.to_string_lossy().into_owned();
    all.extend(["-c", &conf]);
    keygate_cli(&all)
}

/// Run a CLI command that must succeed and return its stdout+stderr.
fn ok(env: &Env, args: &[&str]) -> String {
    let (success, out) = cli(env, args);
    assert!(success, "keygate {args:?} failed: {out}");
    out
}

fn created(out: &str) -> (u64, String) {
    let v: Value = serde_json::from_str(out.lines().find(|l| l.starts_with('{')).unwrap()).unwrap();
    (
        v["id"].as_u64().unwrap(),
        v["key"].as_str().unwrap().to_string(),
    )
}

async fn wait_for(env: &Env, key: &str, model: &str, status: u16) {
    let started = Instant::now();
    loop {
        let r = chat(env, key, model).await;
        if r.status() == status {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{key} {model}: still {}",
            r.status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn code_for(env: &Env, key: &str, model: &str) -> String {
    denial(chat(env, key, model).await).await.1
}

#[tokio::test(flavor = "multi_thread")]
async fn key_lifecycle_against_a_running_gateway() {
    let env = Env::start().await;
    let out = ok(
        &env,
        &[
            "keys", "create", "--name", "CI key", "--quota", "1000000", "--json",
        ],
    );
    let (id, key) = created(&out);
    assert!(key.starts_with("sk-") && key.len() == 51, "{key}");
    let sync = std::fs::read_to_string(env.dir.path().join("keys.json")).unwrap();
    assert!(!sync.contains(&key), "only the hash is stored");

    wait_for(&env, &key, "gpt-4o-mini", 200).await;

    ok(&env, &["keys", "disable", &id.to_string()]);
    wait_for(&env, &key, "gpt-4o-mini", 401).await;
    assert_eq!(code_for(&env, &key, "gpt-4o-mini").await, "key_disabled");
    ok(&env, &["keys", "enable", &id.to_string()]);
    wait_for(&env, &key, "gpt-4o-mini", 200).await;

    ok(
        &env,
        &["keys", "update", &id.to_string(), "--models", "gpt-4o-mini"],
    );
    wait_for(&env, &key, "gpt-4o", 403).await;
    assert_eq!(code_for(&env, &key, "gpt-4o").await, "model_not_allowed");
    assert_eq!(chat(&env, &key, "gpt-4o-mini").await.status(), 200);

    let out = ok(&env, &["keys", "rotate", &id.to_string(), "--json"]);
    let (_, new_key) = created(&out);
    wait_for(&env, &new_key, "gpt-4o-mini", 200).await;
    assert_eq!(code_for(&env, &key, "gpt-4o-mini").await, "invalid_api_key");

    // With a grace period the old key keeps working, then stops.
    let out = ok(
        &env,
        &["keys", "rotate", &id.to_string(), "--grace", "2", "--json"],
    );
    let (_, newest) = created(&out);
    wait_for(&env, &newest, "gpt-4o-mini", 200).await;
    assert_eq!(
        chat(&env, &new_key, "gpt-4o-mini").await.status(),
        200,
        "in grace"
    );
    wait_for(&env, &new_key, "gpt-4o-mini", 401).await;

    ok(&env, &["keys", "delete", &id.to_string()]);
    wait_for(&env, &newest, "gpt-4o-mini", 401).await;
    assert_eq!(
        code_for(&env, &newest, "gpt-4o-mini").await,
        "invalid_api_key"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn list_and_usage_show_the_gateways_numbers_and_never_a_key() {
    let env = Env::start().await;
    for _ in 0..3 {
        assert_eq!(chat(&env, OK, "gpt-4o-mini").await.status(), 200);
    }
    env.gw.wait_records(3).await;
    let used = env.gw.total_used(OK).await;
    // The gateway refreshes its consumed report every second.
    let started = Instant::now();
    let listed = loop {
        let out = ok(&env, &["keys", "list", "--json"]);
        let list: Vec<Value> = serde_json::from_str(&out).unwrap();
        let k = list.into_iter().find(|k| k["id"] == 1).unwrap();
        if k["used"] == used || started.elapsed() > Duration::from_secs(10) {
            break k;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(listed["used"], used);
    assert_eq!(listed["remaining"], 1_000_000 - used);
    assert_eq!(listed["status"], "enabled");
    let out = ok(&env, &["keys", "list", "--json"]);
    let list: Vec<Value> = serde_json::from_str(&out).unwrap();
    let status = |id: u64| list.iter().find(|k| k["id"] == id).unwrap()["status"].clone();
    assert_eq!(status(3), "disabled");
    assert_eq!(status(4), "expired");
    assert_eq!(status(9), "exhausted");
    for text in [out, ok(&env, &["keys", "list"])] {
        for k in [OK, DISABLED, MINI_ONLY] {
            assert!(
                !text.contains(k) && !text.contains(&k[3..]),
                "a key leaked into the listing"
            );
        }
    }
    let usage = ok(&env, &["keys", "usage", "1", "--json"]);
    let v: Value = serde_json::from_str(usage.lines().last().unwrap()).unwrap();
    assert_eq!(v["used"], used);
    assert_eq!(v["calls"].as_array().unwrap().len(), 3);
    let human = ok(&env, &["keys", "usage", "1"]);
    assert!(human.contains(&format!("used {used}")), "{human}");
    let show = ok(&env, &["keys", "show", "6", "--json"]);
    let v: Value = serde_json::from_str(&show).unwrap();
    assert_eq!(v["models"], json!(["gpt-4o-mini"]));
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_refused_before_anything_is_written() {
    let env = Env::start().await;
    let path = env.dir.path().join("keys.json");
    let before = std::fs::read(&path).unwrap();
    let long = "n".repeat(51);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["keys", "create", "--name", "x", "--allow-ips", "10.0.0/8"],
            "10.0.0/8",
        ),
        (vec!["keys", "create", "--name", &long], "51 characters"),
        (
            vec!["keys", "create", "--name", "x", "--group", "gold"],
            "unknown group \"gold\"",
        ),
        (
            vec!["keys", "update", "4242", "--quota", "5"],
            "unknown id 4242",
        ),
        (vec!["keys", "disable", "4242"], "unknown id 4242"),
        (
            vec!["keys", "create", "--name", "x", "--quota", "-5"],
            "negative quota -5",
        ),
        (
            vec!["keys", "create", "--name", "x", "--models", "g*x"],
            "g*x",
        ),
    ];
    for (args, want) in cases {
        let (success, out) = cli(&env, &args);
        assert!(!success, "{args:?} was accepted");
        assert!(out.contains(want), "{args:?}: {out}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            before,
            "{args:?} wrote the file"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_creates_lose_nothing() {
    let env = Env::start().await;
    let conf = env.dir.path().join("keygate.yaml");
    let handles: Vec<_> = (0..10)
        .map(|i| {
            let conf = conf.clone();
            std::thread::spawn(move || {
                let name = format!("parallel {i}");
                keygate_cli(&[
                    "keys",
                    "create",
                    "--name",
                    &name,
                    "--quota",
                    "1000000",
                    "--json",
                    "-c",
                    &conf.to_string_lossy(),
                ])
            })
        })
        .collect();
    let mut keys = Vec::new();
    for h in handles {
        let (success, out) = h.join().unwrap();
        assert!(success, "{out}");
        keys.push(created(&out));
    }
    let ids: std::collections::BTreeSet<u64> = keys.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids.len(), 10, "{keys:?}");
    let sync: Value =
        serde_json::from_slice(&std::fs::read(env.dir.path().join("keys.json")).unwrap()).unwrap();
    assert_eq!(sync["keys"].as_array().unwrap().len(), 9 + 10);
    assert_eq!(sync["revision"], 7 + 10);
    for (_, key) in &keys {
        wait_for(&env, key, "gpt-4o-mini", 200).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn new_api_export_is_imported_and_served() {
    let env = Env::start().await;
    let export = json!([
        {"id": 41, "user_id": 1, "key": "NEWAPIKEYaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "status": 1, "name": "from new-api",
         "created_time": 1700000000, "accessed_time": 1700000000, "expired_time": -1,
         "remain_quota": 400000, "unlimited_quota": false, "model_limits_enabled": true,
         "model_limits": "gpt-4o-mini,gpt-4o", "allow_ips": "127.0.0.1\n10.0.0.0/8", "used_quota": 100000, "group": ""},
        {"id": 42, "key": "NEWAPIKEYbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb", "status": 2, "name": "was disabled", "group": "default"},
        {"id": 43, "key": "NEWAPIKEYcccccccccccccccccccccccccccccccccccccccc", "status": 1, "name": "vip", "group": "svip"},
        {"id": 44, "key": "", "status": 1, "name": "no key"}
    ]);
    let file = env.dir.path().join("export.json");
    std::fs::write(&file, serde_json::to_vec(&export).unwrap()).unwrap();
    let out = ok(
        &env,
        &["import", "new-api", "--json", &file.to_string_lossy()],
    );
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        report["imported"],
        json!([[41, "from new-api"], [42, "was disabled"]])
    );
    let skipped = report["skipped"].to_string();
    assert!(
        skipped.contains("unknown group \\\"svip\\\"") && skipped.contains("no usable key"),
        "{skipped}"
    );

    // new-api keys are presented with or without sk-.
    wait_for(
        &env,
        "sk-NEWAPIKEYaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "gpt-4o-mini",
        200,
    )
    .await;
    assert_eq!(
        chat(
            &env,
            "NEWAPIKEYaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "gpt-4o-mini"
        )
        .await
        .status(),
        200
    );
    assert_eq!(
        code_for(
            &env,
            "sk-NEWAPIKEYaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "claude-3-5-sonnet-latest"
        )
        .await,
        "model_not_allowed"
    );
    assert_eq!(
        code_for(
            &env,
            "sk-NEWAPIKEYbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
            "gpt-4o-mini"
        )
        .await,
        "key_disabled"
    );
    let (_, body) = env
        .gw
        .get(
            "/api/usage/token/",
            "sk-NEWAPIKEYaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        )
        .await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["data"]["total_granted"], 500000);
    assert!(v["data"]["total_used"].as_i64().unwrap() >= 100000);
    let sync = std::fs::read_to_string(env.dir.path().join("keys.json")).unwrap();
    assert!(
        !sync.contains("NEWAPIKEY"),
        "imported keys are stored hashed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_config_named_from_its_own_folder_is_edited() {
    // `-c keygate.yaml` in the working folder: the sync file's folder is "" (bare name).
    let env = Env::start().await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args([
            "keys",
            "create",
            "--quota",
            "1000000",
            "--json",
            "-c",
            "keygate.yaml",
        ])
        .current_dir(env.dir.path())
        .env("KG_TEST_UPSTREAM_KEY", UPSTREAM_SECRET)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    let (_, key) = created(&text);
    wait_for(&env, &key, "gpt-4o-mini", 200).await;
}
