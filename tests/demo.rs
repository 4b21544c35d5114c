//! `keygate demo` works as printed: every curl line it prints gives the answer its title says.

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
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut cases: Vec<(String, String)> = Vec::new();
    let mut title = None;
    let mut proxy = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(t) = line.strip_prefix("# ") {
            title = Some(t.to_string());
        } else if line.starts_with("curl ") || line.starts_with("head ") {
            cases.push((title.take().unwrap(), line));
        } else if let Some(a) = line.strip_prefix("keygate: proxy on http://") {
            proxy = Some(a.to_string());
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    common::wait_for_port(proxy.expect("demo printed its address").parse().unwrap());
    assert!(cases.len() >= 12, "{cases:?}");

    for (title, line) in &cases {
        let out = Command::new("bash").args(["-c", line]).output().unwrap();
        let body = String::from_utf8_lossy(&out.stdout);
        let first = title.split_whitespace().next().unwrap();
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
    let _ = child.kill();
    let _ = child.wait();
}
