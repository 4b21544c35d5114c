//! `keygate check` and `keygate run` on good and broken files: a precise message naming the file
//! and the problem, and a non-zero exit.

mod common;

use common::*;
use serde_json::json;

fn write(dir: &std::path::Path, config: &str, sync: &[u8]) -> String {
    std::fs::write(dir.join("keygate.yaml"), config).unwrap();
    std::fs::write(dir.join("keys.json"), sync).unwrap();
    dir.join("keygate.yaml").to_string_lossy().into_owned()
}

fn good_config() -> String {
    config_yaml(&Opts::default(), "http://127.0.0.1:9")
}

fn good_sync() -> Vec<u8> {
    serde_json::to_vec(&standard_sync()).unwrap()
}

#[test]
fn shipped_example_config_passes_check() {
    let conf = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/keygate.yaml");
    let (ok, out) = keygate_cli(&["check", "-c", conf]);
    assert!(ok, "{out}");
    assert!(out.contains("3 keys"), "{out}");
}

#[test]
fn relative_paths_resolve_against_the_config_folder() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), &good_config(), &good_sync());
    // The test's working directory is the crate root, not `dir`.
    let (ok, out) = keygate_cli(&["check", "-c", &path]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&dir.path().join("keys.json").to_string_lossy().to_string()),
        "{out}"
    );
}

#[test]
fn unknown_config_key_names_the_file_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        &format!("{}\nmax_body_byte: 5\n", good_config()),
        &good_sync(),
    );
    let (ok, out) = keygate_cli(&["check", "-c", &path]);
    assert!(!ok);
    assert!(
        out.contains(&path) && out.contains("max_body_byte"),
        "{out}"
    );
}

#[test]
fn broken_sync_files_are_named_with_their_problem() {
    let mut with_bad_cidr = standard_sync();
    with_bad_cidr["keys"][0]["allow_ips"] = json!(["10.0.0/8"]);
    let mut with_dup = standard_sync();
    with_dup["keys"][1]["key"] = with_dup["keys"][0]["key"].clone();
    with_dup["keys"][1]
        .as_object_mut()
        .unwrap()
        .remove("key_sha256");
    let mut with_unknown_field = standard_sync();
    with_unknown_field["keys"][0]["allowed_ips"] = json!([]);
    let mut with_unknown_group = standard_sync();
    with_unknown_group["keys"][0]["group"] = json!("gold");
    let mut with_negative = standard_sync();
    with_negative["keys"][0]["quota"] = json!(-1);
    let mut trailing = good_sync();
    trailing.extend_from_slice(b"\n}garbage");
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            serde_json::to_vec(&with_bad_cidr).unwrap(),
            "bad CIDR \"10.0.0/8\"",
        ),
        (serde_json::to_vec(&with_dup).unwrap(), "duplicate key"),
        (
            serde_json::to_vec(&with_unknown_field).unwrap(),
            "allowed_ips",
        ),
        (
            serde_json::to_vec(&with_unknown_group).unwrap(),
            "unknown group \"gold\"",
        ),
        (
            serde_json::to_vec(&with_negative).unwrap(),
            "negative quota",
        ),
        (trailing, "trailing characters"),
    ];
    for (sync, want) in cases {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), &good_config(), &sync);
        let (ok, out) = keygate_cli(&["check", "-c", &path]);
        assert!(!ok, "accepted a sync file with {want}");
        assert!(
            out.contains("keys.json") && out.contains(want),
            "{want}: {out}"
        );
        // `run` refuses to start on it too.
        let (ok, out) = keygate_cli(&["run", "-c", &path]);
        assert!(!ok && out.contains(want), "{want}: {out}");
    }
}

#[test]
fn missing_upstream_credential_variable_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let config = good_config().replace("KG_TEST_UPSTREAM_KEY", "KG_SURELY_UNSET_VARIABLE");
    let path = write(dir.path(), &config, &good_sync());
    let (ok, out) = keygate_cli(&["check", "-c", &path]);
    assert!(!ok);
    assert!(out.contains("KG_SURELY_UNSET_VARIABLE"), "{out}");
}

#[test]
fn missing_config_file_is_named() {
    let (ok, out) = keygate_cli(&["check", "-c", "/nonexistent/keygate.yaml"]);
    assert!(!ok);
    assert!(out.contains("/nonexistent/keygate.yaml"), "{out}");
}

#[test]
fn out_of_range_limits_are_refused_with_the_key_named() {
    let dir = tempfile::tempdir().unwrap();
    for (line, expect) in [
        (
            "header_read_timeout_seconds: 0",
            "header_read_timeout_seconds: must be at least 1",
        ),
        (
            "body_read_timeout_seconds: 0",
            "body_read_timeout_seconds: must be at least 1",
        ),
        (
            "keepalive_timeout_seconds: 0",
            "keepalive_timeout_seconds: must be at least 1",
        ),
        ("max_header_bytes: 100", "max_header_bytes: must be between"),
        (
            "max_header_bytes: 2000000",
            "max_header_bytes: must be between",
        ),
        (
            "max_requests_per_connection: -1",
            "max_requests_per_connection",
        ),
    ] {
        let path = write(
            dir.path(),
            &format!("{}\n{line}\n", good_config()),
            &good_sync(),
        );
        let (ok, out) = keygate_cli(&["check", "-c", &path]);
        assert!(!ok, "{line} accepted");
        assert!(out.contains(expect), "{line}: {out}");
    }
}

/// A config whose upstream reads its credential from a variable that is not set.
fn config_without_its_credential() -> String {
    good_config().replace("KG_TEST_UPSTREAM_KEY", "KG_SURELY_UNSET_VARIABLE")
}

#[test]
fn check_without_the_credential_variable_names_it_and_its_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), &config_without_its_credential(), &good_sync());
    let (ok, out) = keygate_cli(&["check", "-c", &path]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("KG_SURELY_UNSET_VARIABLE") && out.contains("upstream \"mock\""),
        "{out}"
    );
    assert!(out.contains("--no-env"), "{out}");
}

#[test]
fn check_no_env_passes_without_the_credential_variable() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), &config_without_its_credential(), &good_sync());
    let (ok, out) = keygate_cli(&["check", "--no-env", "-c", &path]);
    assert!(ok, "{out}");
    assert!(out.contains("ok: ") && out.contains("keys"), "{out}");
    // What was left unchecked is said.
    assert!(
        out.contains("not checked (--no-env)") && out.contains("KG_SURELY_UNSET_VARIABLE"),
        "{out}"
    );
}

#[test]
fn check_no_env_still_fails_on_every_other_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut bad_cidr = standard_sync();
    bad_cidr["keys"][0]["allow_ips"] = json!(["10.0.0/8"]);
    let cases: Vec<(String, Vec<u8>, &str)> = vec![
        (
            config_without_its_credential(),
            serde_json::to_vec(&bad_cidr).unwrap(),
            "bad CIDR \"10.0.0/8\"",
        ),
        (
            format!("{}\nmax_body_byte: 5\n", config_without_its_credential()),
            good_sync(),
            "max_body_byte",
        ),
        (
            config_without_its_credential().replace("http://127.0.0.1:9", "ftp://127.0.0.1:9"),
            good_sync(),
            "ftp://",
        ),
    ];
    for (config, sync, want) in cases {
        let path = write(dir.path(), &config, &sync);
        let (ok, out) = keygate_cli(&["check", "--no-env", "-c", &path]);
        assert!(!ok, "{want}: accepted");
        assert!(out.contains(want), "{want}: {out}");
    }
}
