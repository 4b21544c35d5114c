//! A load client for `benches/concurrency.sh`: opens N connections at once, sends one chat call
//! on each, and holds them until their answers are complete. Prints one line of JSON: how many
//! calls finished with 200, how many failed, the first-byte latency p50/p99 (ms), the SSE events
//! read, and the wall time.
//!
//! Usage: hold ADDR N BODY_FILE [HEADER...]   (each HEADER as `Name: value`)

use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Call {
    ok: bool,
    first_byte: Option<Duration>,
    events: u64,
}

async fn call(addr: String, request: std::sync::Arc<Vec<u8>>) -> Call {
    let started = Instant::now();
    let mut failed = Call {
        ok: false,
        first_byte: None,
        events: 0,
    };
    let Ok(mut s) = TcpStream::connect(&addr).await else {
        return failed;
    };
    if s.write_all(&request).await.is_err() {
        return failed;
    }
    let mut buf = vec![0u8; 16 * 1024];
    let mut head = Vec::new();
    let mut events = 0u64;
    let mut tail = [0u8; 6];
    loop {
        let n = match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if failed.first_byte.is_none() {
            failed.first_byte = Some(started.elapsed());
        }
        if head.len() < 16 {
            head.extend_from_slice(&buf[..n.min(16)]);
        }
        // Count `data:` at line starts, across reads (the last bytes of a read carried over).
        let mut joined = tail.to_vec();
        joined.extend_from_slice(&buf[..n]);
        events += joined.windows(6).filter(|w| w == b"\ndata:").count() as u64;
        let keep = joined.len().min(5);
        tail = [0u8; 6];
        tail[..keep].copy_from_slice(&joined[joined.len() - keep..]);
    }
    failed.ok = head.starts_with(b"HTTP/1.1 200");
    failed.events = events;
    failed
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: hold ADDR N BODY_FILE [HEADER...]");
        std::process::exit(2);
    }
    let addr = args[1].clone();
    let n: usize = args[2].parse().expect("N");
    let body = std::fs::read(&args[3]).expect("BODY_FILE");
    let mut req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for h in &args[4..] {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    let mut request = req.into_bytes();
    request.extend_from_slice(&body);
    let request = std::sync::Arc::new(request);
    let started = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|_| tokio::spawn(call(addr.clone(), request.clone())))
        .collect();
    let mut ok = 0;
    let mut errors = 0;
    let mut events = 0;
    let mut first: Vec<Duration> = Vec::with_capacity(n);
    for t in tasks {
        match t.await {
            Ok(c) => {
                if c.ok {
                    ok += 1;
                } else {
                    errors += 1;
                }
                events += c.events;
                first.extend(c.first_byte);
            }
            Err(_) => errors += 1,
        }
    }
    first.sort();
    println!(
        "{{\"ok\":{ok},\"errors\":{errors},\"first_byte_p50_ms\":{:.1},\"first_byte_p99_ms\":{:.1},\"events\":{events},\"wall_s\":{:.2}}}",
        percentile(&first, 0.5),
        percentile(&first, 0.99),
        started.elapsed().as_secs_f64()
    );
}
