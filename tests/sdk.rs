//! The official openai and anthropic Python SDKs against a real keygate: each refusal raises the
//! SDK's own exception class. Needs python3 with `openai` and `anthropic` (scripts/test.sh
//! installs them and sets KEYGATE_REQUIRE_SDK=1 so a missing SDK fails instead of skipping).

mod common;

use common::*;

const RPM_OA: &str = "sk-sdk-rpm-openai-00000000000000000000000000000000";
const RPM_AN: &str = "sk-sdk-rpm-anthropic-0000000000000000000000000000";
const BUDGET: &str = "sk-sdk-budget-00000000000000000000000000000000000";
const ACCOUNT_OFF: &str = "sk-sdk-account-off-000000000000000000000000000000";

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
    let mut sync = standard_sync();
    sync["accounts"] = serde_json::json!({"off": {"status": "disabled", "quota": 1000000}});
    let extra = [
        (201, RPM_OA, serde_json::json!({"limits": {"rpm": 1}})),
        (202, RPM_AN, serde_json::json!({"limits": {"rpm": 1}})),
        (
            203,
            BUDGET,
            serde_json::json!({"budget": {"period": "weekly", "amount": 1}}),
        ),
        (204, ACCOUNT_OFF, serde_json::json!({"account": "off"})),
    ];
    for (id, key, more) in extra {
        let mut k = serde_json::json!({"id": id, "key": key, "quota": 1000000});
        for (f, v) in more.as_object().unwrap() {
            k[f] = v.clone();
        }
        sync["keys"].as_array_mut().unwrap().push(k);
    }
    let env = Env::with(Opts {
        sync,
        ..Opts::default()
    })
    .await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/sdk_errors.py");
    let out = tokio::process::Command::new("python3")
        .arg(script)
        .env("KG_BASE", &env.gw.base)
        .env("KG_OK", OK)
        .env("KG_MINI_ONLY", MINI_ONLY)
        .env("KG_EXHAUSTED", EXHAUSTED)
        .env("KG_RPM_OA", RPM_OA)
        .env("KG_RPM_AN", RPM_AN)
        .env("KG_BUDGET", BUDGET)
        .env("KG_ACCOUNT_OFF", ACCOUNT_OFF)
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
