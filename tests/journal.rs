//! The sync file's edit journal (README "Admin API"): admin writes are appended to
//! `keys.json.journal` and folded into the file a second after the last one. A journaled write
//! survives `kill -9`; a compacted one a restart; a torn last line is ignored and a bad middle
//! line stops the gateway with the file and the line named; a second gateway on the same files
//! sees journaled writes; `keygate keys` editing while the journal has lines loses nothing.

mod common;

use common::*;
use keygate::mock::MockBackend;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::time::{Duration, Instant};

fn sha(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

fn admin_extra() -> String {
    "admin:\n  listen: \"127.0.0.1:0\"\n  tokens:\n    - { name: ops, token_env: KG_TEST_ADMIN_TOKEN, role: admin }\n".into()
}

async fn env() -> Env {
    Env::with(Opts {
        extra: admin_extra(),
        ..Opts::default()
    })
    .await
}

/// Create a key over the admin API of `gw`; its secret.
async fn create(gw: &Gateway, name: &str) -> String {
    let r = client()
        .post(format!("{}/admin/v1/keys", gw.admin.as_ref().unwrap()))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"name": name, "quota": 1000000}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    v["secret"].as_str().unwrap().to_string()
}

async fn status(gw: &Gateway, key: &str) -> u16 {
    chat_status(&gw.base, key).await
}

fn journal(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("keys.json.journal")).unwrap_or_default()
}

fn file(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("keys.json")).unwrap()
}

/// Wait until `what` holds (at most 10 s).
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let started = Instant::now();
    while !cond() {
        assert!(started.elapsed() < Duration::from_secs(10), "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The write is on a journal line, not in the file, as it answers.
fn assert_journaled(dir: &Path, secret: &str) {
    assert!(
        journal(dir).contains(&sha(secret)),
        "the write is in the journal"
    );
    assert!(
        !file(dir).contains(&sha(secret)),
        "the file was not rewritten"
    );
}

#[tokio::test]
async fn a_journaled_write_survives_kill_9_before_compaction() {
    let mut env = env().await;
    let secret = create(&env.gw, "survivor").await;
    assert_journaled(env.dir.path(), &secret);
    env.gw.kill9();
    assert_journaled(env.dir.path(), &secret);
    env.gw = spawn_keygate(env.dir.path(), &env.dir.path().join("keygate.yaml"));
    assert_eq!(status(&env.gw, &secret).await, 200);
    assert_eq!(status(&env.gw, OK).await, 200, "the file's keys too");
}

#[tokio::test]
async fn compaction_folds_the_journal_into_the_file_and_a_restart_keeps_it() {
    let mut env = env().await;
    let secret = create(&env.gw, "compacted").await;
    assert_journaled(env.dir.path(), &secret);
    let dir = env.dir.path().to_path_buf();
    until("the journal is folded into the file", || {
        journal(&dir).is_empty() && file(&dir).contains(&sha(&secret))
    })
    .await;
    let folded: Value = serde_json::from_str(&file(&dir)).unwrap();
    assert_eq!(folded["revision"], 8);
    // Put in force once, by the write: the gateway does not read back its own compaction.
    assert_eq!(
        env.gw.log().matches("(revision 8, 10 keys)").count(),
        1,
        "{}",
        env.gw.log()
    );
    assert_eq!(status(&env.gw, &secret).await, 200);
    env.gw.kill9();
    env.gw = spawn_keygate(&dir, &dir.join("keygate.yaml"));
    assert_eq!(status(&env.gw, &secret).await, 200);
}

/// A line that adds key 30 (`secret`) at revision 8, above `standard_sync`'s 7.
fn line_adding(secret: &str) -> String {
    format!(
        "{}\n",
        json!({"revision": 8, "next_id": 31, "keys": [{"id": 30, "name": "from the journal", "key_sha256": sha(secret), "quota": 1000000}]})
    )
}

#[tokio::test]
async fn a_torn_last_line_is_ignored_and_a_bad_middle_line_stops_the_gateway() {
    let mock = MockBackend::start("127.0.0.1:0").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secret = "sk-journal-0000000000000000000000000000000000000000";
    std::fs::write(
        dir.path().join("keys.json.journal"),
        format!(
            "{}{{\"revision\": 9, \"keys\": [{{\"id\"",
            line_adding(secret)
        ),
    )
    .unwrap();
    let gw = start_gateway(
        dir.path(),
        &Opts::default(),
        &format!("http://{}", mock.addr()),
    );
    assert_eq!(status(&gw, secret).await, 200, "the whole line is in force");
    assert_eq!(status(&gw, OK).await, 200);
    assert!(gw.log().contains("line 2 is incomplete"), "{}", gw.log());
    drop(gw);
    let config = dir.path().join("keygate.yaml");
    let (ok, out) = keygate_cli(&["check", "-c", config.to_str().unwrap()]);
    assert!(ok, "{out}");
    // The same torn line with a line after it: damage, not a crash.
    std::fs::write(
        dir.path().join("keys.json.journal"),
        format!(
            "{}{{\"revision\": 9, \"keys\": [{{\"id\"\n{{\"revision\": 10}}\n",
            line_adding(secret)
        ),
    )
    .unwrap();
    let (ok, out) = keygate_cli(&["check", "-c", config.to_str().unwrap()]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("keys.json.journal: line 2:"),
        "names the file and the line: {out}"
    );
    let (ok, out) = keygate_cli(&["run", "-c", config.to_str().unwrap()]);
    assert!(!ok && out.contains("keys.json.journal: line 2:"), "{out}");
}

#[tokio::test]
async fn a_second_gateway_on_the_same_files_sees_journaled_writes() {
    let env = env().await;
    // The second gateway reads the first one's files, from a folder of its own.
    let other = tempfile::tempdir().unwrap();
    let sync = env.dir.path().join("keys.json");
    let yaml = config_yaml(&Opts::default(), &format!("http://{}", env.mock.addr())).replace(
        "sync_file: keys.json",
        &format!("sync_file: {}", sync.display()),
    );
    std::fs::write(other.path().join("keygate.yaml"), yaml).unwrap();
    let second = spawn_keygate(other.path(), &other.path().join("keygate.yaml"));
    let secret = create(&env.gw, "seen elsewhere").await;
    assert_journaled(env.dir.path(), &secret);
    // Writes keep coming, so the journal is not folded into the file meanwhile.
    let started = Instant::now();
    let mut n = 0;
    while status(&second, &secret).await != 200 {
        assert!(started.elapsed() < Duration::from_secs(5), "never served");
        n += 1;
        create(&env.gw, &format!("filler {n}")).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !file(env.dir.path()).contains(&sha(&secret)),
        "seen from the journal, not a rewritten file"
    );
}

#[tokio::test]
async fn a_cli_edit_while_the_journal_has_lines_loses_nothing() {
    let env = env().await;
    let dir = env.dir.path();
    let from_api = create(&env.gw, "api").await;
    assert_journaled(dir, &from_api);
    let config = dir.join("keygate.yaml");
    let (ok, out) = keygate_cli(&[
        "keys",
        "create",
        "-c",
        config.to_str().unwrap(),
        "--name",
        "cli",
        "--quota",
        "1000000",
    ]);
    assert!(ok, "{out}");
    let from_cli = out
        .split_whitespace()
        .find(|w| w.starts_with("sk-"))
        .expect("the new key")
        .to_string();
    assert!(journal(dir).is_empty(), "the CLI folded the journal in");
    let folded: Value = serde_json::from_str(&file(dir)).unwrap();
    assert_eq!(folded["revision"], 9, "one revision each");
    assert!(file(dir).contains(&sha(&from_api)));
    until_ok(&env.gw, &from_cli).await;
    assert_eq!(status(&env.gw, &from_api).await, 200);
    // And the API goes on from the CLI's file.
    let after = create(&env.gw, "after").await;
    for key in [&from_api, &from_cli, &after] {
        assert_eq!(status(&env.gw, key).await, 200);
    }
}

async fn until_ok(gw: &Gateway, key: &str) {
    let started = Instant::now();
    while status(gw, key).await != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never served: {}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
