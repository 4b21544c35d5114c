//! Connection and request limits against hostile or broken clients, at the socket level: the
//! whole-head deadline (slowloris), the head size cap, the idle keep-alive timeout, the request
//! count per connection, the body deadline and the body cap on a chunked body still arriving.
//! And the other side of each limit: what stays inside it is served, and a long answer is never
//! cut by a limit meant for the request.

mod common;

use common::*;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A gateway with short limits, so the tests take seconds.
async fn env_with(extra: &str) -> Env {
    Env::with(Opts {
        extra: extra.to_string(),
        ..Opts::default()
    })
    .await
}

/// The head of a chat call with the `OK` key, with `headers` (each ending in CRLF) added.
fn chat_head(headers: &str) -> String {
    format!("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {OK}\r\n{headers}\r\n")
}

fn chat_request(extra_headers: &str, connection_close: bool) -> String {
    let body = chat_body("gpt-4o-mini");
    let head = chat_head(&format!(
        "Content-Type: application/json\r\nContent-Length: {}\r\n{extra_headers}{}",
        body.len(),
        if connection_close {
            "Connection: close\r\n"
        } else {
            ""
        },
    ));
    head + &body
}

/// Read one HTTP/1.1 response with a Content-Length body; `None` if the peer closed first.
async fn read_response(s: &mut TcpStream, timeout: Duration) -> Option<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(head_end) = text.find("\r\n\r\n") {
            let len = text[..head_end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if got.len() >= head_end + 4 + len {
                return Some(text);
            }
        }
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("no answer within {timeout:?}; got {text:?}"),
        }
    }
}

/// Read until the peer closes; everything received. Panics if it stays open past `timeout`.
async fn read_to_close(s: &mut TcpStream, timeout: Duration) -> String {
    let mut got = Vec::new();
    let r = tokio::time::timeout(timeout, s.read_to_end(&mut got)).await;
    assert!(
        r.is_ok(),
        "connection still open after {timeout:?}; got {:?}",
        String::from_utf8_lossy(&got)
    );
    String::from_utf8_lossy(&got).into_owned()
}

/// `s`, idle from now, is closed by the gateway, and not before its keep-alive timeout of 1 s.
async fn closes_after_a_second_idle(s: &mut TcpStream) {
    let idle = Instant::now();
    let rest = read_to_close(s, Duration::from_secs(10)).await;
    assert_eq!(rest, "");
    assert!(
        idle.elapsed() >= Duration::from_millis(900),
        "closed {:?} after going idle, before the keep-alive timeout",
        idle.elapsed()
    );
}

/// A connection that has had one chat call answered 200 and was kept alive.
async fn kept_alive_after_one_call(env: &Env) -> TcpStream {
    let mut s = TcpStream::connect(env.gw.addr).await.unwrap();
    s.write_all(chat_request("", false).as_bytes())
        .await
        .unwrap();
    let first = read_response(&mut s, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    s
}

#[tokio::test(flavor = "multi_thread")]
async fn a_head_trickled_byte_by_byte_gets_408_and_a_close() {
    let env = env_with("header_read_timeout_seconds: 1").await;
    let mut s = TcpStream::connect(env.gw.addr).await.unwrap();
    let started = Instant::now();
    let head = chat_request("", false);
    // One byte every 100 ms: each read is quick, the whole head would take minutes.
    let mut answered = String::new();
    for b in head.as_bytes() {
        if s.write_all(&[*b]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut buf = [0u8; 4096];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await {
            answered.push_str(&String::from_utf8_lossy(&buf[..n]));
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "never cut off");
    }
    answered.push_str(&read_to_close(&mut s, Duration::from_secs(10)).await);
    assert!(answered.starts_with("HTTP/1.1 408"), "{answered:?}");
    assert!(
        answered.contains("\"code\":\"request_timeout\""),
        "{answered}"
    );
    assert!(answered.to_ascii_lowercase().contains("x-request-id: kg-"));
    assert_eq!(env.mock.request_count(), 0);
    let metrics = env.gw.metrics_text().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.contains("reason=\"request_timeout\"") && l.ends_with(" 1")),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_that_sends_nothing_is_closed_quietly() {
    let env = env_with("header_read_timeout_seconds: 1").await;
    let mut s = TcpStream::connect(env.gw.addr).await.unwrap();
    let got = read_to_close(&mut s, Duration::from_secs(10)).await;
    assert_eq!(got, "", "no answer to a request that never started");
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_time_between_requests_does_not_count_against_the_head_deadline() {
    let env = env_with("header_read_timeout_seconds: 1").await;
    let mut s = kept_alive_after_one_call(&env).await;
    // Idle for longer than the head deadline, then a normal request on the same connection.
    tokio::time::sleep(Duration::from_millis(1800)).await;
    s.write_all(chat_request("", true).as_bytes())
        .await
        .unwrap();
    let second = read_response(&mut s, Duration::from_secs(10))
        .await
        .expect("the kept-alive connection serves a second request");
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");
    assert_eq!(env.mock.request_count(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_second_head_on_a_connection_has_a_deadline_too() {
    let env = env_with("header_read_timeout_seconds: 1").await;
    let mut s = kept_alive_after_one_call(&env).await;
    // Half a head, then silence.
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let got = read_to_close(&mut s, Duration::from_secs(10)).await;
    assert!(got.starts_with("HTTP/1.1 408"), "{got:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_keep_alive_connection_is_closed_after_its_timeout() {
    let env = env_with("keepalive_timeout_seconds: 1").await;
    let mut s = kept_alive_after_one_call(&env).await;
    closes_after_a_second_idle(&mut s).await;
}

/// A head begun inside the keep-alive wait has the head deadline from its first byte, even
/// when it is finished after the keep-alive timeout would have closed an idle connection.
#[tokio::test(flavor = "multi_thread")]
async fn a_head_begun_while_idle_has_the_head_deadline_not_the_keep_alive_one() {
    let env = env_with("keepalive_timeout_seconds: 1\nheader_read_timeout_seconds: 4").await;
    let mut s = kept_alive_after_one_call(&env).await;
    let request = chat_request("", false);
    let (first, rest) = request.split_at(10);
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.write_all(first.as_bytes()).await.unwrap();
    // Past the keep-alive timeout, well inside the head deadline.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s.write_all(rest.as_bytes()).await.unwrap();
    let r = read_response(&mut s, Duration::from_secs(10))
        .await
        .expect("the call begun while idle is answered");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
}

/// The keep-alive timeout runs from the latest request, not from the first wait: a connection
/// used more often than its timeout stays open past it, and closes a timeout after its last call.
#[tokio::test(flavor = "multi_thread")]
async fn the_keep_alive_timeout_runs_from_the_latest_request() {
    let env = env_with("keepalive_timeout_seconds: 1").await;
    let mut s = kept_alive_after_one_call(&env).await;
    let opened = Instant::now();
    for i in 2..=6 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        s.write_all(chat_request("", false).as_bytes())
            .await
            .unwrap();
        let r = read_response(&mut s, Duration::from_secs(10))
            .await
            .unwrap_or_else(|| {
                panic!(
                    "call {i}, {:?} after the first, got no answer",
                    opened.elapsed()
                )
            });
        assert!(r.starts_with("HTTP/1.1 200"), "call {i}: {r}");
    }
    closes_after_a_second_idle(&mut s).await;
    assert_eq!(env.mock.request_count(), 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_serves_at_most_max_requests_per_connection() {
    let env = env_with("max_requests_per_connection: 3").await;
    let mut s = TcpStream::connect(env.gw.addr).await.unwrap();
    for i in 1..=3 {
        s.write_all(chat_request("", false).as_bytes())
            .await
            .unwrap();
        let r = read_response(&mut s, Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("request {i} got no answer"));
        assert!(r.starts_with("HTTP/1.1 200"), "request {i}: {r}");
        let closes = r.to_ascii_lowercase().contains("connection: close");
        assert_eq!(closes, i == 3, "request {i}: {r}");
    }
    // The fourth request on this connection is not served: the gateway closed it.
    let _ = s.write_all(chat_request("", false).as_bytes()).await;
    let rest = read_to_close(&mut s, Duration::from_secs(10)).await;
    assert_eq!(rest, "");
    assert_eq!(env.mock.request_count(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_head_over_max_header_bytes_gets_431_before_it_is_all_sent() {
    let env = env_with("max_header_bytes: 4096").await;
    // Inside the limit: served.
    let fits = format!("X-Pad: {}\r\n", "a".repeat(3000));
    let out = raw_exchange(
        env.gw.addr,
        chat_request(&fits, true).as_bytes(),
        false,
        Duration::from_secs(10),
    );
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");

    // Over it, and still sending: the answer comes while the head is incomplete.
    let mut s = TcpStream::connect(env.gw.addr).await.unwrap();
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let pad = format!("X-Pad: {}\r\n", "b".repeat(1000));
    let mut sent = 0;
    while sent < 8 {
        if s.write_all(pad.as_bytes()).await.is_err() {
            break;
        }
        sent += 1;
    }
    let got = read_to_close(&mut s, Duration::from_secs(10)).await;
    assert!(got.starts_with("HTTP/1.1 431"), "{got:?}");
    assert!(
        got.contains("\"code\":\"request_header_fields_too_large\""),
        "{got}"
    );

    // Far over Pingora's own 1 MiB limit: still our 431, not a 400.
    let huge = format!(
        "GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
        "c".repeat(2 * 1024 * 1024)
    );
    let out = raw_exchange(env.gw.addr, huge.as_bytes(), false, Duration::from_secs(10));
    assert!(
        out.starts_with("HTTP/1.1 431"),
        "{}",
        &out[..out.len().min(200)]
    );
    assert_eq!(env.mock.request_count(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_that_takes_too_long_gets_408_and_nothing_reaches_the_upstream() {
    let env = env_with("body_read_timeout_seconds: 1").await;
    // Content-Length body: half of it, then silence.
    let body = chat_body("gpt-4o-mini");
    let head = chat_head(&format!("Content-Length: {}\r\n", body.len()));
    let mut s = TcpStream::connect(env.gw.addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&body.as_bytes()[..body.len() / 2])
        .await
        .unwrap();
    let got = read_response(&mut s, Duration::from_secs(10))
        .await
        .expect("an answer");
    assert!(got.starts_with("HTTP/1.1 408"), "{got}");
    assert!(got.contains("\"code\":\"request_timeout\""), "{got}");

    // Chunked body: a chunk every 300 ms, each read well inside Pingora's per-read timeout.
    let mut s = TcpStream::connect(env.gw.addr).await.unwrap();
    s.write_all(chat_head("Transfer-Encoding: chunked\r\n").as_bytes())
        .await
        .unwrap();
    let mut chunks_sent = 0;
    let started = Instant::now();
    let got = loop {
        let mut buf = [0u8; 4096];
        match tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await {
            Ok(Ok(n)) => break String::from_utf8_lossy(&buf[..n]).into_owned(),
            Ok(Err(e)) => panic!("{e}"),
            Err(_) => {
                assert!(started.elapsed() < Duration::from_secs(10), "never cut off");
                if s.write_all(b"1\r\n \r\n").await.is_ok() {
                    chunks_sent += 1;
                }
            }
        }
    };
    assert!(
        got.starts_with("HTTP/1.1 408"),
        "after {chunks_sent} chunks: {got}"
    );
    assert!(chunks_sent >= 2, "{chunks_sent}");
    assert_eq!(env.mock.request_count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_body_inside_its_deadline_is_not_cut_by_the_head_deadline() {
    let env = env_with("header_read_timeout_seconds: 1\nbody_read_timeout_seconds: 10").await;
    let body = chat_body("gpt-4o-mini");
    let head = chat_head(&format!(
        "Content-Length: {}\r\nConnection: close\r\n",
        body.len()
    ));
    let mut s = TcpStream::connect(env.gw.addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    // The body over 2 s: twice the head deadline.
    let parts: Vec<&[u8]> = body.as_bytes().chunks(body.len() / 4 + 1).collect();
    for p in parts {
        tokio::time::sleep(Duration::from_millis(500)).await;
        s.write_all(p).await.unwrap();
    }
    let got = read_response(&mut s, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert_eq!(env.mock.request_count(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_stream_outlives_every_request_deadline() {
    let env = env_with("header_read_timeout_seconds: 1\nbody_read_timeout_seconds: 1").await;
    // 12 events 250 ms apart: 3 s of answer, three times each request deadline.
    let body = serde_json::json!({
        "model": "gpt-4o-mini", "stream": true,
        "messages": [{"role": "user", "content": "Hello"}]
    })
    .to_string();
    let req = chat_head(&format!(
        "Content-Length: {}\r\nx-mock-chunks: 12\r\nx-mock-delay-ms: 250\r\nConnection: close\r\n",
        body.len()
    )) + &body;
    let mut s = TcpStream::connect(env.gw.addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let got = read_to_close(&mut s, Duration::from_secs(20)).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(got.contains("data: [DONE]"), "the stream was cut: {got}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chunked_body_crossing_the_cap_gets_413_while_it_is_still_arriving() {
    let env = env_with("max_body_bytes: 16384").await;
    let mut s = TcpStream::connect(env.gw.addr).await.unwrap();
    s.write_all(chat_head("Transfer-Encoding: chunked\r\n").as_bytes())
        .await
        .unwrap();
    // 5 chunks of 4 KiB (20 KiB), and never the last chunk: the body is not finished.
    let chunk = format!("1000\r\n{}\r\n", "x".repeat(4096));
    for _ in 0..5 {
        s.write_all(chunk.as_bytes()).await.unwrap();
    }
    let got = read_response(&mut s, Duration::from_secs(10))
        .await
        .expect("an answer before the body ends");
    assert!(got.starts_with("HTTP/1.1 413"), "{got}");
    assert!(got.contains("\"code\":\"request_too_large\""), "{got}");
    assert_eq!(env.mock.request_count(), 0);
}
