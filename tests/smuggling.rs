//! Request smuggling and protocol abuse at the socket level (raw TCP, not an HTTP client): each
//! gets a 4xx or a clean close, and no second request ever reaches the backend from one client
//! request (asserted on what the mock backend received).

mod common;

use common::*;
use std::time::Duration;

fn body() -> String {
    chat_body("gpt-4o-mini")
}

/// What the backend received that the client did not mean to send as its own request.
fn smuggled(env: &Env) -> Vec<String> {
    env.mock
        .requests()
        .into_iter()
        .map(|r| r.path_and_query)
        .filter(|p| p.contains("smuggled"))
        .collect()
}

fn statuses(out: &str) -> Vec<u16> {
    out.match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| out.get(i + 9..i + 12)?.parse().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn content_length_plus_transfer_encoding_is_refused() {
    let env = Env::start().await;
    let smuggle = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let chunked = format!("{:x}\r\n{}\r\n0\r\n\r\n", body().len(), body());
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {OK}\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{chunked}{smuggle}",
        chunked.len()
    );
    let out = raw_exchange(env.gw.addr, req.as_bytes(), true, Duration::from_secs(5));
    let s = statuses(&out);
    assert!(s.is_empty() || s[0] >= 400 || s.len() == 1, "{out}");
    assert!(smuggled(&env).is_empty(), "{:?}", env.mock.requests());
    assert!(env.mock.request_count() <= 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn duplicate_differing_content_length_is_refused() {
    let env = Env::start().await;
    let b = body();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {OK}\r\nContent-Length: {}\r\nContent-Length: {}\r\n\r\n{b}GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        b.len(),
        b.len() + 5
    );
    let out = raw_exchange(env.gw.addr, req.as_bytes(), true, Duration::from_secs(5));
    let s = statuses(&out);
    assert!(s.first().is_none_or(|&c| c >= 400), "{out}");
    assert_eq!(env.mock.request_count(), 0, "{:?}", env.mock.requests());
}

#[tokio::test(flavor = "multi_thread")]
async fn chunked_body_with_bad_sizes_is_refused() {
    let env = Env::start().await;
    for bad in [
        "zz\r\nabc\r\n0\r\n\r\n",
        "-5\r\nabcde\r\n0\r\n\r\n",
        "ffffffffffffffffffff\r\na\r\n0\r\n\r\n",
        "5\r\nabcdefgh\r\n0\r\n\r\n",
    ] {
        let req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {OK}\r\nTransfer-Encoding: chunked\r\n\r\n{bad}GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
        );
        let out = raw_exchange(env.gw.addr, req.as_bytes(), true, Duration::from_secs(5));
        let s = statuses(&out);
        assert!(s.first().is_none_or(|&c| c >= 400), "{bad:?}: {out}");
    }
    assert_eq!(env.mock.request_count(), 0, "{:?}", env.mock.requests());
}

#[tokio::test(flavor = "multi_thread")]
async fn http10_body_without_length_is_not_a_body() {
    let env = Env::start().await;
    // No Content-Length and no chunking: the request has no body (RFC 9112 §6.3); what follows
    // is not forwarded as one.
    let req = format!(
        "POST /v1/chat/completions HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer {OK}\r\n\r\n{}",
        body()
    );
    let out = raw_exchange(env.gw.addr, req.as_bytes(), true, Duration::from_secs(5));
    let s = statuses(&out)
        .first()
        .copied()
        .or_else(|| out.get(9..12)?.parse().ok());
    assert!(s.is_none_or(|c| c >= 400), "{out}");
    assert_eq!(env.mock.request_count(), 0, "{:?}", env.mock.requests());
}

#[tokio::test(flavor = "multi_thread")]
async fn upgrade_without_the_backends_101_forwards_nothing_more() {
    let env = Env::start().await;
    let req = format!(
        "GET /v1/realtime?model=gpt-4o-realtime HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {OK}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    );
    let out = raw_exchange(env.gw.addr, req.as_bytes(), true, Duration::from_secs(5));
    assert!(!out.starts_with("HTTP/1.1 101"), "{out}");
    assert!(smuggled(&env).is_empty(), "{:?}", env.mock.requests());
    assert!(env.mock.request_count() <= 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn pipelined_request_after_a_denial() {
    let env = Env::start().await;
    let b = body();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-unknown\r\nContent-Length: {}\r\n\r\n{b}POST /v1/chat/completions?smuggled=1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {OK}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
        b.len(),
        b.len()
    );
    let out = raw_exchange(env.gw.addr, req.as_bytes(), true, Duration::from_secs(5));
    let s = statuses(&out);
    assert_eq!(s.first(), Some(&401), "{out}");
    // The second request is either served as its own request or dropped with the connection;
    // it never rides along with the first.
    assert!(env.mock.request_count() <= 1, "{:?}", env.mock.requests());
    if s.len() > 1 {
        assert_eq!(s[1], 200, "{out}");
        assert_eq!(env.mock.request_count(), 1);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_content_length_reaches_the_backend_once() {
    let env = Env::start().await;
    let b = body();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {OK}\r\nContent-Length: {0}\r\nContent-Length: {0}\r\nConnection: close\r\n\r\n{b}",
        b.len()
    );
    let out = raw_exchange(env.gw.addr, req.as_bytes(), true, Duration::from_secs(5));
    let s = statuses(&out);
    // Refused, or forwarded with one length header.
    if s.first().is_some_and(|&c| c < 400) {
        let got = env.mock.requests();
        assert_eq!(got.len(), 1, "{out}");
        let lengths: Vec<_> = got[0].headers.get_all("content-length").iter().collect();
        assert_eq!(lengths, [b.len().to_string().as_str()], "{out}");
    } else {
        assert_eq!(env.mock.request_count(), 0, "{out}");
    }
}
