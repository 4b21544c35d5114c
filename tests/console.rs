//! The console (SPEC §10) in a real browser: a real `keygate` with its admin listener, the mock
//! backend upstream, and headless Chromium driven over WebDriver. Set `KEYGATE_SCREENSHOTS=docs`
//! to refresh the README's screenshots from this run.

#[path = "console/browser.rs"]
mod browser;
mod common;
#[path = "console/harness.rs"]
mod harness;

use browser::Browser;
use common::*;
use harness::*;
use keygate::admin::assets::{ASSETS, SECURITY_HEADERS};
use serde_json::json;

/// Sign in with `token` and wait for the keys table.
async fn sign_in(b: &Browser, c: &Console, token: &str) {
    b.goto(&c.url("/")).await;
    b.until(
        "!document.querySelector('#signin').hidden",
        "the sign-in form",
    )
    .await;
    b.type_into("#token", token).await;
    b.click("#signin-button").await;
    b.until(
        "!document.querySelector('#shell').hidden && document.querySelector('#keys-body tr[data-key-id]')",
        "the keys table after sign-in",
    )
    .await;
}

/// The id of the row whose name is exactly `name`.
async fn row_id(b: &Browser, name: &str) -> u64 {
    let v = b
        .until(
            &format!(
                "[...document.querySelectorAll('#keys-body tr[data-key-id]')].find(r => r.querySelector('td.name strong').textContent === {})?.dataset.keyId",
                json!(name)
            ),
            "the new key's row",
        )
        .await;
    v.as_str().unwrap().parse().unwrap()
}

#[test]
fn no_asset_names_another_origin_or_runs_inline_code() {
    for (path, a) in ASSETS {
        let text = std::str::from_utf8(a.body).unwrap();
        for origin in ["http://", "https://", "//cdn", "@import"] {
            assert!(!text.contains(origin), "{path} refers to {origin}");
        }
        if path.ends_with(".js") || *path == "/" || *path == "/usage" {
            assert!(!text.contains("innerHTML"), "{path} writes markup");
            assert!(!text.contains("eval("), "{path} evaluates code");
        }
        if a.content_type.starts_with("text/html") {
            let lower = text.to_ascii_lowercase();
            assert!(!lower.contains(" style="), "{path} has an inline style");
            assert!(
                !lower.contains(" onclick=") && !lower.contains(" onload="),
                "{path} has an inline handler"
            );
            for tag in lower.split("<script").skip(1) {
                assert!(
                    tag.trim_start().starts_with("src=") || tag.contains(" src="),
                    "{path} has an inline script"
                );
                assert!(tag.contains("></script>"), "{path}: a script with a body");
            }
        }
    }
}

#[tokio::test]
async fn every_asset_is_served_with_the_security_headers() {
    let c = Console::start().await;
    for (path, a) in ASSETS {
        let r = client().get(c.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.headers()["content-type"], a.content_type, "{path}");
        for (name, value) in SECURITY_HEADERS {
            assert_eq!(
                r.headers().get(*name).map(|v| v.to_str().unwrap()),
                Some(*value),
                "{path}: {name}"
            );
        }
        assert_eq!(&r.bytes().await.unwrap()[..], a.body, "{path}");
    }
    // The console's pages need no token; the API behind them does.
    let r = client().get(c.url("/admin/v1/keys")).send().await.unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn an_admin_manages_a_key_through_the_console() {
    let c = Console::start().await;
    let b = Browser::start().await;

    // A bad token is refused, and is not kept.
    b.goto(&c.url("/")).await;
    b.until(
        "!document.querySelector('#signin').hidden",
        "the sign-in form",
    )
    .await;
    b.type_into("#token", "not-a-token").await;
    b.click("#signin-button").await;
    let err = b
        .until(
            "document.querySelector('#signin-form .form-error').innerText",
            "the sign-in error",
        )
        .await;
    assert!(err.as_str().unwrap().contains("401"), "{err}");
    assert_eq!(b.js("return sessionStorage.length", vec![]).await, json!(0));

    // The good one opens the console; it lives in sessionStorage only.
    b.type_into("#token", ADMIN_TOKEN).await;
    b.click("#signin-button").await;
    b.until(
        "document.querySelector('#keys-body tr[data-key-id]')",
        "the keys table",
    )
    .await;
    let stored = b.js("return [sessionStorage.getItem('keygate.admin_token'), localStorage.length, document.cookie]", vec![]).await;
    assert_eq!(stored, json!([ADMIN_TOKEN, 0, ""]));
    assert!(!b
        .js("return location.href", vec![])
        .await
        .as_str()
        .unwrap()
        .contains(ADMIN_TOKEN));

    // New key: a bad CIDR is named in the error; then the key is created and shown once.
    b.click("#new-key").await;
    b.type_into("#key-form input[name=name]", XSS).await;
    b.type_into("#key-form input[name=quota]", "1000000").await;
    b.type_into("#key-form textarea[name=allow_ips]", "10.0.0/8")
        .await;
    b.click("#key-save").await;
    let err = b
        .until(
            "document.querySelector('#key-form .form-error').innerText",
            "the CIDR error",
        )
        .await;
    assert!(
        err.as_str().unwrap().contains("10.0.0/8"),
        "the error names the CIDR: {err}"
    );
    b.type_into("#key-form textarea[name=allow_ips]", "127.0.0.0/8")
        .await;
    b.click("#key-save").await;
    let secret = b
        .until(
            "document.querySelector('#secret-list code.secret')?.textContent",
            "the new key",
        )
        .await;
    let secret = secret.as_str().unwrap().to_string();
    assert!(secret.starts_with("sk-") && secret.len() == 51, "{secret}");
    b.screenshot("console-new-key").await;
    b.click("#secret-done").await;
    b.until(
        "!document.querySelector('#secret-dialog').open",
        "the dialog to close",
    )
    .await;
    let html = b
        .js("return document.documentElement.outerHTML", vec![])
        .await;
    assert!(
        !html.as_str().unwrap().contains(&secret),
        "the shown-once key left the page"
    );

    // The name is text: no element made of it, no dialog raised.
    let id = row_id(&b, XSS).await;
    assert_eq!(b.count("#keys-body img").await, 0);
    assert!(!b.dialog_open().await, "the XSS name raised a dialog");

    // The shown key makes a real call through the gateway.
    let r = c.call(&secret).await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    // The call is settled in the gateway's logging phase, after the client has its answer:
    // wait for the charge rather than read it at once.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let used = loop {
        let used = total_used_at(&c.base, &secret).await;
        if used > 0 || std::time::Instant::now() > deadline {
            break used;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(used > 0, "the call was not charged within 10 s");

    // Edit its quota: the table shows the new remaining value.
    b.click(&format!("tr[data-key-id='{id}'] button[data-action=edit]"))
        .await;
    b.until(
        "document.querySelector('#key-dialog').open",
        "the edit dialog",
    )
    .await;
    b.type_into("#key-form input[name=quota]", "2000000").await;
    b.click("#key-save").await;
    let want = format_int(2_000_000 - used);
    b.until(
        &format!(
            "document.querySelector(\"tr[data-key-id='{id}'] .remaining\")?.textContent === {}",
            json!(want)
        ),
        "the new remaining quota",
    )
    .await;
    b.screenshot("console-keys").await;
    // Readable at 1280 px: the keys table fits without scrolling sideways.
    let wider = b
        .js("const w = document.querySelector('#keys-table').parentElement; return w.scrollWidth - w.clientWidth;", vec![])
        .await;
    assert_eq!(
        wider,
        json!(0),
        "the keys table is wider than a 1280 px window"
    );

    // Disable it: the next call is refused.
    b.goto(&c.url("/")).await;
    b.click(&format!(
        "tr[data-key-id='{id}'] button[data-action=disable]"
    ))
    .await;
    b.until(
        &format!(
            "document.querySelector(\"tr[data-key-id='{id}'] .badge\")?.textContent === 'disabled'"
        ),
        "the disabled state",
    )
    .await;
    let (status, code, _) = denial(c.call(&secret).await).await;
    assert_eq!((status, code.as_str()), (401, "key_disabled"));
    assert!(!b.dialog_open().await);
}

#[tokio::test]
async fn usage_charts_the_log_and_the_holder_page_show_the_calls_made() {
    let c = Console::start().await;
    let b = Browser::start().await;
    let mut request_ids = Vec::new();
    for _ in 0..3 {
        let r = c.call(OK).await;
        assert_eq!(r.status(), 200);
        request_ids.push(r.headers()["x-request-id"].to_str().unwrap().to_string());
    }
    let request_id = request_ids[2].clone();
    sign_in(&b, &c, ADMIN_TOKEN).await;

    // Usage for key 1: the chart and the call log show the calls.
    b.goto(&c.url("/#usage?key_id=1")).await;
    wait_with_refresh(
        &b,
        "document.querySelector('#log-body').innerText.includes(arguments[0])",
        &request_id,
    )
    .await;
    b.until(
        "document.querySelector('#chart-requests canvas')",
        "the requests chart",
    )
    .await;
    wait_with_refresh(
        &b,
        "document.querySelector('#sum-requests').textContent === arguments[0]",
        "3",
    )
    .await;
    b.screenshot("console-usage").await;
    // CSV export goes through fetch with the Bearer header and a blob URL.
    b.click("#log-export").await;
    b.until(
        "document.querySelector('#toast').innerText.includes('Exported')",
        "the CSV export",
    )
    .await;
    assert!(
        b.csp_violations().await.is_empty(),
        "{:?}",
        b.csp_violations().await
    );

    // The key holder's page lists the same calls and charts them.
    b.goto(&c.url("/usage")).await;
    b.type_into("#holder-key", OK).await;
    b.click("#holder-go").await;
    b.until(
        &format!(
            "document.querySelector('#holder-log-body').innerText.includes({})",
            json!(request_id)
        ),
        "the call in the holder's list",
    )
    .await;
    b.until(
        "document.querySelector('#holder-chart canvas')",
        "the holder's chart",
    )
    .await;
    b.screenshot("console-holder").await;
    assert!(
        b.csp_violations().await.is_empty(),
        "{:?}",
        b.csp_violations().await
    );
}

#[tokio::test]
async fn rotate_and_batch_delete_take_effect_at_once() {
    let c = Console::start().await;
    let b = Browser::start().await;
    sign_in(&b, &c, ADMIN_TOKEN).await;

    // Rotate "ok" (id 1) after confirming: the old key stops, the new one works.
    b.click("tr[data-key-id='1'] button[data-action=rotate]")
        .await;
    b.click("#confirm-yes").await;
    let secret = b
        .until(
            "document.querySelector('#secret-list code.secret')?.textContent",
            "the rotated key",
        )
        .await;
    let secret = secret.as_str().unwrap().to_string();
    b.click("#secret-done").await;
    assert_eq!(c.call(&secret).await.status(), 200);
    assert_eq!(denial(c.call(OK).await).await.1, "invalid_api_key");

    // The rotated key is sealed in the vault: "View key" asks for the token again.
    b.click("tr[data-key-id='1'] button[data-action=reveal]")
        .await;
    b.type_into("#reveal-token", "wrong-token").await;
    b.click("#reveal-go").await;
    b.until(
        "document.querySelector('#reveal-form .form-error').innerText",
        "the refusal",
    )
    .await;
    assert!(b.text("#reveal-form .form-error").await.contains("token"));
    b.type_into("#reveal-token", ADMIN_TOKEN).await;
    b.click("#reveal-go").await;
    let shown = b
        .until(
            "document.querySelector('#secret-list code.secret')?.textContent",
            "the revealed key",
        )
        .await;
    assert_eq!(shown, json!(secret));
    assert_eq!(
        b.js(
            "return document.querySelector('#reveal-token').value",
            vec![]
        )
        .await,
        json!("")
    );
    b.click("#secret-done").await;
    let html = b
        .js("return document.documentElement.outerHTML", vec![])
        .await;
    assert!(
        !html.as_str().unwrap().contains(&secret),
        "the revealed key left the page"
    );

    // Delete two keys at once, confirmed.
    b.click("tr[data-key-id='6'] input.pick").await;
    b.click("tr[data-key-id='7'] input.pick").await;
    b.click("#batch-delete").await;
    b.click("#confirm-yes").await;
    b.until("!document.querySelector(\"tr[data-key-id='6']\") && !document.querySelector(\"tr[data-key-id='7']\")", "the rows to go").await;
    assert_eq!(denial(c.call(MINI_ONLY).await).await.1, "invalid_api_key");

    // Cancelling a delete keeps the key.
    b.click("tr[data-key-id='2'] button[data-action=delete]")
        .await;
    b.click("dialog.confirm button.ghost").await;
    assert_eq!(b.count("tr[data-key-id='2']").await, 1);
}

#[tokio::test]
async fn an_admin_creates_an_account_and_gives_it_a_key() {
    let c = Console::start().await;
    let b = Browser::start().await;
    sign_in(&b, &c, ADMIN_TOKEN).await;
    b.goto(&c.url("/#accounts")).await;
    b.until(
        "document.querySelector('#accounts-body tr.empty')",
        "the empty accounts list",
    )
    .await;
    b.click("#new-account").await;
    b.type_into("#account-form input[name=id]", "acme").await;
    b.type_into("#account-form input[name=name]", "Acme <b>Corp</b>")
        .await;
    b.type_into("#account-form input[name=rpm]", "600").await;
    b.click("#account-save").await;
    b.until(
        "document.querySelector(\"#accounts-body tr[data-account-id='acme']\")",
        "the new account",
    )
    .await;
    assert_eq!(
        b.text("tr[data-account-id='acme'] td:nth-child(2)").await,
        "Acme <b>Corp</b>"
    );
    assert!(b
        .text("tr[data-account-id='acme']")
        .await
        .contains("600 rpm"));

    // A key in that account: the table names the account.
    b.goto(&c.url("/#keys")).await;
    b.click("#new-key").await;
    b.type_into("#key-form input[name=name]", "acme dev").await;
    b.type_into("#key-form input[name=account]", "acme").await;
    b.click("#key-save").await;
    let secret = b
        .until(
            "document.querySelector('#secret-list code.secret')?.textContent",
            "the new key",
        )
        .await;
    b.click("#secret-done").await;
    let id = row_id(&b, "acme dev").await;
    assert_eq!(
        b.text(&format!("tr[data-key-id='{id}'] td:nth-child(7)"))
            .await,
        "acme"
    );
    assert_eq!(c.call(secret.as_str().unwrap()).await.status(), 200);
}

#[tokio::test]
async fn a_viewer_sees_no_write_buttons_and_its_writes_are_refused() {
    let c = Console::start().await;
    let b = Browser::start().await;
    sign_in(&b, &c, VIEW_TOKEN).await;
    assert!(b.text("#whoami").await.contains("viewer"));
    b.until(
        "document.querySelector('#keys-body td.name a')",
        "the row actions",
    )
    .await;
    for css in [
        "#new-key",
        "#batch-delete",
        "#new-account",
        "input.pick",
        ".write",
        "button[data-action=edit]",
        "button[data-action=disable]",
        "button[data-action=enable]",
        "button[data-action=delete]",
        "button[data-action=rotate]",
        "button[data-action=reveal]",
    ] {
        assert_eq!(b.count(css).await, 0, "a viewer sees {css}");
    }
    // The API refuses its writes anyway.
    let api = |m: reqwest::Method, p: &str| client().request(m, c.url(p)).bearer_auth(VIEW_TOKEN);
    let r = api(reqwest::Method::POST, "/admin/v1/keys")
        .json(&json!({"name": "x", "quota": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = api(reqwest::Method::POST, "/admin/v1/keys/1/disable")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = api(reqwest::Method::DELETE, "/admin/v1/keys/1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(c.call(OK).await.status(), 200, "the key is untouched");

    // Usable on a 390 px phone: the page itself never scrolls sideways (the table does).
    b.c.set_window_size(390, 844).await.unwrap();
    b.goto(&c.url("/")).await;
    b.until(
        "document.querySelector('#keys-body tr[data-key-id]')",
        "the keys table",
    )
    .await;
    let overflow = b
        .js(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth",
            vec![],
        )
        .await;
    assert_eq!(overflow, json!(0), "the page is wider than a 390 px screen");
}

/// Click Refresh until `cond` (with `arg` as `arguments[0]`) holds: usage rows are written in
/// batches, off the request path.
async fn wait_with_refresh(b: &Browser, cond: &str, arg: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let v = b.js(&format!("return !!({cond})"), vec![json!(arg)]).await;
        if v == json!(true) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {cond} ({arg})"
        );
        b.click("#usage-refresh").await;
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    }
}

/// 1234567 → "1,234,567", as the console writes numbers.
fn format_int(n: i64) -> String {
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}
