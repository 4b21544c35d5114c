//! `keygate demo` works as printed: every curl line it prints gives the answer its title says;
//! the console and the admin API answer with the printed token; the rate-limited key's 4th
//! call in a minute is refused; calls succeed through the two-target pool.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[test]
fn demo_curl_lines_do_what_they_say() {
    if Command::new("curl").arg("--version").output().is_err() {
        assert!(
            std::env::var("KEYGATE_REQUIRE_SDK").is_err(),
            "curl is required"
        );
        eprintln!("curl not installed; skipped");
        return;
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut cases: Vec<(String, String)> = Vec::new();
    let mut title = None;
    let (mut proxy, mut metrics, mut console, mut token) = (None, None, None, None);
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(t) = line.strip_prefix("# ") {
            title = Some(t.to_string());
        } else if line.starts_with("curl ") || line.starts_with("head ") || line.starts_with("for ")
        {
            cases.push((title.take().unwrap(), line));
        } else if let Some(a) = line.strip_prefix("keygate demo: console on ") {
            console = Some(a.to_string());
        } else if let Some(t) = line.strip_prefix("keygate demo: admin token (sign in with it): ") {
            token = Some(t.to_string());
        } else if let Some(a) = line.strip_prefix("keygate: proxy on http://") {
            proxy = Some(a.to_string());
        } else if let Some(a) = line.strip_prefix("keygate: metrics on http://") {
            metrics = Some(a.to_string());
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    let proxy = proxy.expect("demo printed its address");
    common::wait_for_port(proxy.parse().unwrap());
    assert!(cases.len() >= 13, "{cases:?}");

    // (a) The console and the admin API, with the printed token.
    let (console, token) = (console.expect("console URL"), token.expect("admin token"));
    let http = reqwest::blocking::Client::new();
    let page = http.get(&console).send().unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'self'"), "{csp}");
    let session = |t: &str| {
        http.get(format!("{console}admin/v1/session"))
            .bearer_auth(t)
            .send()
            .unwrap()
            .status()
    };
    assert_eq!(session(&token), 200);
    assert_eq!(session("kga-wrong"), 401);

    // (c) The pool: two targets, and calls succeed through it (a call sent to the dead
    // target fails over to the mock).
    let metrics = metrics.expect("demo printed its metrics address");
    common::wait_for_port(metrics.parse().unwrap());
    let ready: serde_json::Value = http
        .get(format!("http://{metrics}/readyz"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(ready["upstreams"][0]["targets"], 2, "{ready}");

    for (title, line) in &cases {
        let out = Command::new("bash").args(["-c", line]).output().unwrap();
        let body = String::from_utf8_lossy(&out.stdout);
        let first = title.split_whitespace().next().unwrap();
        if line.starts_with("for ") {
            // (b) Three admitted, then 429 (its status on the last line).
            let text = String::from_utf8_lossy(&out.stdout);
            let lines: Vec<&str> = text.lines().collect();
            assert_eq!(lines[..3], ["200", "200", "200"], "{title}: {text}");
            assert_eq!(lines.last(), Some(&"429"), "{title}: {text}");
        }
        if let Ok(_status) = first.parse::<u16>() {
            let code = title.split_whitespace().nth(1).unwrap();
            assert!(
                body.contains(&format!("\"code\":\"{code}\"")),
                "{title}: {body}"
            );
        } else {
            assert!(!body.contains("\"error\""), "{title}: {body}");
            assert!(
                body.contains("chat.completion")
                    || body.contains("\"message\"")
                    || body.contains("\"list\""),
                "{title}: {body}"
            );
        }
    }
    let ok = cases
        .iter()
        .find(|(t, _)| t == "admitted: a chat completion")
        .map(|(_, l)| l.clone())
        .unwrap();
    for _ in 0..10 {
        let out = Command::new("bash").args(["-c", &ok]).output().unwrap();
        let body = String::from_utf8_lossy(&out.stdout);
        assert!(body.contains("chat.completion"), "through the pool: {body}");
    }
    let _ = child.kill();
    let _ = child.wait();
}
