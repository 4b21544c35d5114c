//! `keygate accounts …` and the limit/budget flags of `keygate keys …` driving a real gateway.

mod common;

use common::*;
use serde_json::Value;
use std::time::{Duration, Instant};

fn cli(env: &Env, args: &[&str]) -> (bool, String) {
    let conf = env
        .dir
        .path()
        .join("keygate.yaml")
        .to_string_lossy()
        .into_owned();
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["-c", &conf]);
    keygate_cli(&all)
}

fn ok(env: &Env, args: &[&str]) -> String {
    let (success, out) = cli(env, args);
    assert!(success, "keygate {args:?} failed: {out}");
    out
}

fn json_line(out: &str) -> Value {
    let start = out.find(['{', '[']).unwrap();
    serde_json::from_str(&out[start..]).unwrap()
}

/// Key `id` as `keygate keys list --json` shows it.
fn listed_key(env: &Env, id: u64) -> Value {
    let keys = json_line(&ok(env, &["keys", "list", "--json"]));
    keys.as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == id)
        .unwrap()
        .clone()
}

async fn wait_for_code(env: &Env, key: &str, code: &str) {
    let started = Instant::now();
    loop {
        let r = chat(env, key, "gpt-4o-mini").await;
        let got = if r.status() == 200 {
            "ok".to_string()
        } else {
            denial(r).await.1
        };
        if got == code {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "still {got}, want {code}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn accounts_lifecycle_against_a_running_gateway() {
    let env = Env::start().await;
    ok(
        &env,
        &[
            "accounts",
            "create",
            "acme",
            "--name",
            "Acme",
            "--quota",
            "100000000",
            "--max-keys",
            "2",
            "--rpm",
            "100",
            "--budget",
            "daily:5000000@Europe/Berlin",
        ],
    );
    let out = ok(
        &env,
        &[
            "keys",
            "create",
            "--json",
            "--account",
            "acme",
            "--unlimited",
            "--rpm",
            "2",
            "--tpm",
            "100000",
            "--concurrency",
            "3",
            "--budget",
            "daily:900000000",
        ],
    );
    let v = json_line(&out);
    let key = v["key"].as_str().unwrap().to_string();
    let id = v["id"].as_u64().unwrap();
    wait_for_code(&env, &key, "ok").await;
    // rpm 2: the second call above was the first's retry; spend what is left.
    let mut last = String::new();
    for _ in 0..3 {
        let r = chat(&env, &key, "gpt-4o-mini").await;
        if r.status() != 200 {
            last = denial(r).await.1;
        }
    }
    assert_eq!(last, "rate_limit_exceeded");

    // Bad input is refused by name, and nothing is written.
    let (good, out) = cli(&env, &["keys", "update", &id.to_string(), "--rpm", "0"]);
    assert!(!good && out.contains("limits.rpm is 0"), "{out}");
    let (good, out) = cli(
        &env,
        &["keys", "update", &id.to_string(), "--account", "nope"],
    );
    assert!(!good && out.contains("unknown account \"nope\""), "{out}");
    let (good, out) = cli(
        &env,
        &[
            "keys",
            "update",
            &id.to_string(),
            "--budget",
            "daily:5@Mars/Base",
        ],
    );
    assert!(!good && out.contains("not a known IANA time zone"), "{out}");
    ok(&env, &["keys", "create", "--account", "acme"]);
    let (good, out) = cli(&env, &["keys", "create", "--account", "acme"]);
    assert!(!good && out.contains("at most 2 keys"), "{out}");
    let (good, out) = cli(&env, &["accounts", "delete", "acme"]);
    assert!(!good && out.contains("still has 2 keys"), "{out}");

    // Listing shows limits and period spending.
    let list = json_line(&ok(&env, &["accounts", "list", "--json"]));
    let a = &list[0];
    assert_eq!(a["id"], "acme");
    assert_eq!(a["keys"], 2);
    assert_eq!(a["limits"]["rpm"], 100);
    assert_eq!(a["budget"]["budget"], "daily:5000000@Europe/Berlin");
    let k = listed_key(&env, id);
    assert_eq!(k["account"], "acme");
    assert_eq!(k["limits"]["tpm"], 100000);
    let text = ok(&env, &["keys", "list"]);
    assert!(
        text.contains("account=acme rpm=2 tpm=100000 concurrency=3"),
        "{text}"
    );
    // What the key's calls cost is spent in the current period, the key's and its account's
    // (read from the gateway's ledger, which reports its counters every second).
    let started = Instant::now();
    loop {
        let k = listed_key(&env, id);
        let account = json_line(&ok(&env, &["accounts", "list", "--json"]))[0].clone();
        let used = k["used"].as_i64().unwrap();
        if used > 0 && k["budget"]["spent"] == used && account["budget"]["spent"] == used {
            let text = ok(&env, &["keys", "list"]);
            assert!(
                text.contains(&format!("budget=daily:900000000 spent={used}")),
                "{text}"
            );
            let text = ok(&env, &["accounts", "list"]);
            assert!(
                text.contains(&format!("daily:5000000@Europe/Berlin spent {used}")),
                "{text}"
            );
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never spent: {k} {account}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    ok(&env, &["accounts", "disable", "acme"]);
    wait_for_code(&env, &key, "account_disabled").await;
    ok(&env, &["accounts", "enable", "acme"]);
    // Limits are checked before quota: lift the key's rpm to see the account's quota refuse.
    ok(&env, &["accounts", "update", "acme", "--quota", "0"]);
    ok(&env, &["keys", "update", &id.to_string(), "--rpm", "1000"]);
    wait_for_code(&env, &key, "insufficient_quota").await;
    let show = ok(&env, &["accounts", "show", "acme"]);
    assert!(show.contains("acme") && show.contains("rpm=100"), "{show}");
}
