//! The official openai and anthropic Python SDKs against a real keygate: each refusal raises the
//! SDK's own exception class. Needs python3 with `openai` and `anthropic` (scripts/test.sh
//! installs them and sets KEYGATE_REQUIRE_SDK=1 so a missing SDK fails instead of skipping).

mod common;

use common::*;

fn sdks_available() -> bool {
    std::process::Command::new("python3")
        .args(["-c", "import openai, anthropic"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[tokio::test(flavor = "multi_thread")]
async fn client_sdks_raise_their_own_exception_classes() {
    if !sdks_available() {
        assert!(
            std::env::var("KEYGATE_REQUIRE_SDK").is_err(),
            "python3 with openai and anthropic is required (pip install openai anthropic)"
        );
        eprintln!("python SDKs not installed; skipped");
        return;
    }
    let env = Env::start().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/sdk_errors.py");
    let out = tokio::process::Command::new("python3")
        .arg(script)
        .env("KG_BASE", &env.gw.base)
        .env("KG_OK", OK)
        .env("KG_MINI_ONLY", MINI_ONLY)
        .env("KG_EXHAUSTED", EXHAUSTED)
        .output()
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
}
