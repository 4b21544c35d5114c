//! Calls in flight: a slow reader is held back by backpressure, not buffered by keygate.

mod common;

use common::*;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A client that reads a 10 MB stream a few bytes at a time: keygate passes the upstream's
/// stream on only as fast as the client takes it (its resident memory stays flat, far below
/// the stream's size), and meanwhile serves other calls.
#[tokio::test]
async fn a_slow_reader_is_held_back_not_buffered() {
    let env = Env::start().await;
    // Warm up before the baseline: calls on both worker threads (each grows its allocator
    // arena once), and the usage store's writer has written their rows (its SQLite page
    // cache). Without this the baseline missed up to ~5 MB of one-off growth and the test
    // failed in CI though nothing was buffered.
    const WARM: usize = 16;
    let calls = (0..WARM).map(|_| chat(&env, OK, "gpt-4o-mini"));
    for r in futures_util::future::join_all(calls).await {
        assert_eq!(r.status(), 200);
    }
    wait_rows_written(&env, WARM).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = env.gw.rss_kib();

    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = socket.connect(env.gw.addr).await.unwrap();
    let body =
        r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {OK}\r\nContent-Type: application/json\r\nx-mock-chunks: 10000\r\nx-mock-piece-bytes: 1000\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");

    // Read one byte every 50 ms for 3 s, watching the gateway's memory.
    let mut peak = before;
    let mut read = 12usize;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        read += 1;
        peak = peak.max(env.gw.rss_kib());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Another call goes through while the slow one is held.
    assert_eq!(chat(&env, OK, "gpt-4o-mini").await.status(), 200);
    let grown_kib = peak.saturating_sub(before);
    eprintln!("keygate grew by {grown_kib} KiB while a client read {read} bytes slowly");
    assert!(
        grown_kib < 4 * 1024,
        "keygate grew by {grown_kib} KiB while a client read {read} bytes of a 10 MB stream"
    );

    // The stream goes on once the client reads (another megabyte of it, then hang up).
    let mut more = vec![0u8; 1 << 20];
    s.read_exact(&mut more).await.unwrap();
    assert!(
        String::from_utf8_lossy(&more).contains("data: {"),
        "the stream did not go on"
    );
}

/// Wait until the usage store has written at least `n` rows.
async fn wait_rows_written(env: &Env, n: usize) {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let text = env.gw.metrics_text().await;
        let written = text
            .lines()
            .find_map(|l| l.strip_prefix("keygate_usage_store_rows_written_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        if written >= n as f64 {
            return;
        }
        assert!(
            Instant::now() < until,
            "the store wrote {written} of {n} rows"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
