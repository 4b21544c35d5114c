//! Key hints and the key vault (SPEC §8, "View full key") through real `keygate` processes and
//! real files: `keygate keys create|rotate|list|show|reveal`, `keygate vault rekey`, and what
//! `keygate run` and `keygate check` say about the vault secret at start.

mod common;

use common::*;
use keygate::mock::MockBackend;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const VAR: &str = "KG_TEST_VAULT";
const SECRET_A: &str = "5f0e3c1a9b7d2e4f6a8c0b1d3e5f7a9c2b4d6e8f0a1c3e5b7d9f1a3c5e7b9d0f";
const SECRET_B: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";
const VAULT_YAML: &str = "key_vault: { secret_env: \"KG_TEST_VAULT\" }";

/// Config and the standard sync file in a new folder; with `vault`, the config names one.
fn files(upstream: &str, vault: bool) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let opts = Opts {
        extra: if vault {
            VAULT_YAML.into()
        } else {
            String::new()
        },
        ..Opts::default()
    };
    std::fs::write(
        dir.path().join("keys.json"),
        serde_json::to_vec_pretty(&opts.sync).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("keygate.yaml"),
        config_yaml(&opts, upstream),
    )
    .unwrap();
    dir
}

/// A mock and a gateway whose config names the vault, started with `secret`.
async fn start(secret: &str) -> Env {
    let mock = MockBackend::start("127.0.0.1:0").await.unwrap();
    let dir = files(&format!("http://{}", mock.addr()), true);
    let gw = spawn_keygate_env(
        dir.path(),
        &dir.path().join("keygate.yaml"),
        &[],
        &[(VAR, secret)],
    );
    Env { mock, gw, dir }
}

fn conf(dir: &Path) -> String {
    dir.join("keygate.yaml").to_string_lossy().into_owned()
}

/// `keygate ARGS -c CONF` with the vault secret `secret` (or none).
fn cli(dir: &Path, secret: Option<&str>, args: &[&str]) -> (bool, String) {
    let conf = conf(dir);
    let mut all = args.to_vec();
    all.extend(["-c", &conf]);
    match secret {
        Some(s) => keygate_cli_env(&all, &[(VAR, s)]),
        None => keygate_cli(&all),
    }
}

fn ok(dir: &Path, secret: Option<&str>, args: &[&str]) -> String {
    let (success, out) = cli(dir, secret, args);
    assert!(success, "keygate {args:?} failed: {out}");
    out
}

fn fails(dir: &Path, secret: Option<&str>, args: &[&str]) -> String {
    let (success, out) = cli(dir, secret, args);
    assert!(!success, "keygate {args:?} succeeded: {out}");
    out
}

fn created(out: &str) -> (u64, String) {
    let v: Value = serde_json::from_str(out.lines().find(|l| l.starts_with('{')).unwrap()).unwrap();
    (
        v["id"].as_u64().unwrap(),
        v["key"].as_str().unwrap().to_string(),
    )
}

fn revealed(out: &str) -> String {
    created(out).1
}

fn sync_file(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("keys.json")).unwrap()).unwrap()
}

fn entry(dir: &Path, id: u64) -> Value {
    sync_file(dir)["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == id)
        .unwrap()
        .clone()
}

/// Change key `id`'s entry in the sync file by hand (as an operator with an editor would).
fn hand_edit(dir: &Path, id: u64, change: impl FnOnce(&mut Value)) {
    let mut file = sync_file(dir);
    let k = file["keys"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|k| k["id"] == id)
        .unwrap();
    change(k);
    std::fs::write(
        dir.join("keys.json"),
        serde_json::to_vec_pretty(&file).unwrap(),
    )
    .unwrap();
}

fn hint_of(key: &str) -> String {
    let body = &key[3..];
    format!("sk-{}**********{}", &body[..4], &body[body.len() - 4..])
}

async fn wait_for_status(env: &Env, key: &str, status: u16) {
    let started = Instant::now();
    loop {
        let got = chat(env, key, "gpt-4o-mini").await.status();
        if got == status {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "still {got}, not {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `keygate run` that must exit on its own (a startup error): its exit success and stderr.
fn run_must_exit(dir: &Path, secret: Option<&str>) -> (bool, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keygate"));
    cmd.args(["run", "-c", &conf(dir)])
        .env("KG_TEST_UPSTREAM_KEY", UPSTREAM_SECRET)
        .env_remove(VAR)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(s) = secret {
        cmd.env(VAR, s);
    }
    let mut child = cmd.spawn().unwrap();
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            return (status.success(), text);
        }
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("keygate run started instead of refusing to");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn hints_are_stored_and_listed_never_the_key() {
    let env = Env::start().await;
    let dir = env.dir.path();
    let (id, key) = created(&ok(dir, None, &["keys", "create", "--name", "h", "--json"]));
    let k = entry(dir, id);
    assert_eq!(k["key_hint"], hint_of(&key));
    assert!(k.get("key_sealed").is_none(), "no vault, nothing sealed");

    let list: Vec<Value> =
        serde_json::from_str(&ok(dir, None, &["keys", "list", "--json"])).unwrap();
    let item = |id: u64| list.iter().find(|k| k["id"] == id).unwrap().clone();
    assert_eq!(item(id)["key_hint"], hint_of(&key));
    assert_eq!(item(id)["sealed"], false);
    // A key given in clear gets its hint computed; a bare hash has none.
    assert_eq!(item(1)["key_hint"], hint_of(OK));
    assert_eq!(item(2)["key_hint"], Value::Null);

    let human = ok(dir, None, &["keys", "list"]);
    assert!(human.contains(&hint_of(&key)), "{human}");
    let show: Value =
        serde_json::from_str(&ok(dir, None, &["keys", "show", &id.to_string(), "--json"])).unwrap();
    assert_eq!(show["key_hint"], hint_of(&key));
    assert!(ok(dir, None, &["keys", "show", &id.to_string()]).contains(&hint_of(&key)));

    let new = revealed(&ok(
        dir,
        None,
        &["keys", "rotate", &id.to_string(), "--json"],
    ));
    assert_eq!(entry(dir, id)["key_hint"], hint_of(&new));
    let everything = format!(
        "{human}{}{}",
        ok(dir, None, &["keys", "list", "--json"]),
        std::fs::read_to_string(dir.join("keys.json")).unwrap()
    );
    for k in [&key, &new] {
        assert!(!everything.contains(&k[3..]), "a key leaked");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_created_with_the_vault_is_revealed_and_serves() {
    let env = start(SECRET_A).await;
    let dir = env.dir.path();
    let s = Some(SECRET_A);
    let (id, key) = created(&ok(
        dir,
        s,
        &["keys", "create", "--quota", "1000000", "--json"],
    ));
    let k = entry(dir, id);
    let sealed = k["key_sealed"].as_str().unwrap();
    assert!(sealed.starts_with("v1:"), "{sealed}");
    assert!(!std::fs::read_to_string(dir.join("keys.json"))
        .unwrap()
        .contains(&key[3..]));

    let shown = ok(dir, s, &["keys", "reveal", &id.to_string()]);
    assert_eq!(shown.trim(), key);
    let again = revealed(&ok(dir, s, &["keys", "reveal", &id.to_string(), "--json"]));
    assert_eq!(again, key);
    wait_for_status(&env, &again, 200).await;

    // A rotated key is sealed anew; the revealed key is the one that now works.
    let new = revealed(&ok(dir, s, &["keys", "rotate", &id.to_string(), "--json"]));
    let shown = revealed(&ok(dir, s, &["keys", "reveal", &id.to_string(), "--json"]));
    assert_eq!(shown, new);
    wait_for_status(&env, &shown, 200).await;
    wait_for_status(&env, &key, 401).await;

    // Creating keys when the vault is configured needs its secret.
    let e = fails(dir, None, &["keys", "create"]);
    assert!(e.contains(VAR) && e.contains("not set"), "{e}");
    // Keys imported while the vault is configured are sealed too.
    let export = dir.join("export.json");
    std::fs::write(
        &export,
        r#"[{"id": 90, "key": "IMPORTEDkeyaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "name": "imp"}]"#,
    )
    .unwrap();
    ok(dir, s, &["import", "new-api", &export.to_string_lossy()]);
    let shown = ok(dir, s, &["keys", "reveal", "90"]);
    assert_eq!(
        shown.trim(),
        "sk-IMPORTEDkeyaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
    );
    assert_eq!(entry(dir, 90)["key_hint"], "sk-IMPO**********aaaa");

    let log = env.gw.log();
    assert!(
        !log.contains(SECRET_A),
        "the secret is in the gateway's log"
    );
    assert!(
        log.contains("key vault: the secret opens the 0 sealed keys tried of 0"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn reveal_without_a_vault_or_of_a_hashed_key_is_not_recoverable() {
    // Created without a vault: only the hash is stored.
    let env = Env::start().await;
    let dir = env.dir.path();
    let (id, _) = created(&ok(dir, None, &["keys", "create", "--json"]));
    let e = fails(dir, Some(SECRET_A), &["keys", "reveal", &id.to_string()]);
    assert!(
        e.contains(&format!(
            "not_recoverable: key {id}: it is stored only as a hash"
        )) && e.contains("rotate"),
        "{e}"
    );

    let tmp = files("http://127.0.0.1:1", true);
    let dir = tmp.path();
    let e = fails(dir, Some(SECRET_A), &["keys", "reveal", "2"]);
    assert!(
        e.contains("not_recoverable: key 2: it is stored only as a hash") && e.contains("rotate"),
        "{e}"
    );
    let e = fails(dir, Some(SECRET_A), &["keys", "reveal", "4242"]);
    assert!(e.contains("unknown id 4242"), "{e}");

    // A sealed key, but the config names no vault.
    let (id, _) = created(&ok(dir, Some(SECRET_A), &["keys", "create", "--json"]));
    let yaml = std::fs::read_to_string(dir.join("keygate.yaml")).unwrap();
    std::fs::write(dir.join("keygate.yaml"), yaml.replace(VAULT_YAML, "")).unwrap();
    let e = fails(dir, Some(SECRET_A), &["keys", "reveal", &id.to_string()]);
    assert!(
        e.contains(&format!(
            "not_recoverable: key {id}: no key_vault is configured"
        )) && e.contains("rotate"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_edited_or_moved_sealed_value_is_refused() {
    let dir = files("http://127.0.0.1:1", true);
    let dir = dir.path();
    let s = Some(SECRET_A);
    let (a, key_a) = created(&ok(dir, s, &["keys", "create", "--json"]));
    let (b, key_b) = created(&ok(dir, s, &["keys", "create", "--json"]));
    let sealed_a = entry(dir, a)["key_sealed"].as_str().unwrap().to_string();

    // One character of the base64 changed by hand.
    let i = sealed_a.len() / 2;
    let c = if &sealed_a[i..=i] == "A" { "B" } else { "A" };
    let tampered = format!("{}{c}{}", &sealed_a[..i], &sealed_a[i + 1..]);
    hand_edit(dir, a, |k| k["key_sealed"] = tampered.clone().into());
    let e = fails(dir, s, &["keys", "reveal", &a.to_string()]);
    assert!(
        e.contains(&format!("key {a}: sealed value fails authentication")),
        "{e}"
    );
    assert!(!e.contains(&key_a[3..]), "{e}");
    // keygate check names it, and says the secret opens the other one.
    let e = fails(dir, s, &["check"]);
    assert!(
        e.contains(&format!(
            "vault secret does not open key {a}'s sealed value"
        )) && e.contains("1 of 2"),
        "{e}"
    );

    // Key a's (intact) sealed value copied onto key b.
    hand_edit(dir, a, |k| k["key_sealed"] = sealed_a.clone().into());
    hand_edit(dir, b, |k| k["key_sealed"] = sealed_a.clone().into());
    let e = fails(dir, s, &["keys", "reveal", &b.to_string()]);
    assert!(
        e.contains(&format!("key {b}: sealed value fails authentication")),
        "{e}"
    );
    assert!(!e.contains(&key_a[3..]) && !e.contains(&key_b[3..]), "{e}");
    assert_eq!(
        ok(dir, s, &["keys", "reveal", &a.to_string()]).trim(),
        key_a
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rekey_moves_every_key_to_the_new_secret() {
    let dir = files("http://127.0.0.1:1", true);
    let dir = dir.path();
    let (a, key_a) = created(&ok(dir, Some(SECRET_A), &["keys", "create", "--json"]));
    let (b, key_b) = created(&ok(dir, Some(SECRET_A), &["keys", "create", "--json"]));
    let conf = conf(dir);
    let rekey = |from: &str, to: &str| {
        keygate_cli_env(
            &[
                "vault",
                "rekey",
                "--to-env",
                "KG_TEST_NEW_SECRET",
                "-c",
                &conf,
            ],
            &[(VAR, from), ("KG_TEST_NEW_SECRET", to)],
        )
    };

    // The wrong old secret: refused, nothing written.
    let before = std::fs::read(dir.join("keys.json")).unwrap();
    let (success, e) = rekey(SECRET_B, SECRET_B);
    assert!(!success && e.contains("fails authentication"), "{e}");
    assert_eq!(std::fs::read(dir.join("keys.json")).unwrap(), before);
    // A malformed new secret: refused before anything is read.
    let (success, e) = rekey(SECRET_A, "not-hex");
    assert!(
        !success && e.contains("KG_TEST_NEW_SECRET") && e.contains("64 hex"),
        "{e}"
    );
    assert!(!e.contains(SECRET_A), "{e}");

    let (success, out) = rekey(SECRET_A, SECRET_B);
    assert!(success, "{out}");
    assert!(out.contains("re-sealed 2 keys"), "{out}");
    for (id, key) in [(a, &key_a), (b, &key_b)] {
        let shown = ok(dir, Some(SECRET_B), &["keys", "reveal", &id.to_string()]);
        assert_eq!(shown.trim(), key);
        let e = fails(dir, Some(SECRET_A), &["keys", "reveal", &id.to_string()]);
        assert!(e.contains("fails authentication"), "{e}");
    }
    let e = fails(dir, Some(SECRET_A), &["keys", "create"]);
    assert!(e.contains("another secret"), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_malformed_or_wrong_secret_stops_the_gateway() {
    let mock = MockBackend::start("127.0.0.1:0").await.unwrap();
    let tmp = files(&format!("http://{}", mock.addr()), true);
    let dir: PathBuf = tmp.path().to_path_buf();

    let (success, e) = run_must_exit(&dir, None);
    assert!(
        !success && e.contains(&format!("environment variable {VAR} is not set")),
        "{e}"
    );
    for bad in ["abc", &SECRET_A[..63], &format!("{}z", &SECRET_A[..63])] {
        let (success, e) = run_must_exit(&dir, Some(bad));
        assert!(
            !success && e.contains(VAR) && e.contains("64 hex characters"),
            "{bad}: {e}"
        );
        assert!(!e.contains(bad), "the secret is in the error: {e}");
        let e = fails(&dir, Some(bad), &["check"]);
        assert!(e.contains(VAR) && e.contains("64 hex characters"), "{e}");
    }

    let (id, _) = created(&ok(&dir, Some(SECRET_A), &["keys", "create", "--json"]));
    let (success, e) = run_must_exit(&dir, Some(SECRET_B));
    assert!(
        !success
            && e.contains(&format!(
                "vault secret does not open key {id}'s sealed value"
            ))
            && e.contains("none of the 1"),
        "{e}"
    );
    for text in [&e, &fails(&dir, Some(SECRET_B), &["check"])] {
        assert!(text.contains("does not open key"), "{text}");
        assert!(
            !text.contains(SECRET_A) && !text.contains(SECRET_B),
            "{text}"
        );
    }
    let out = ok(&dir, Some(SECRET_A), &["check"]);
    assert!(out.contains("the secret opens all 1 sealed keys"), "{out}");
    let out = ok(&dir, None, &["check", "--no-env"]);
    assert!(
        out.contains(&format!(
            "not checked (--no-env): key_vault: environment variable {VAR}"
        )),
        "{out}"
    );
}
