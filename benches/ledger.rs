//! Measures the quota ledger's hot path and usage extraction:
//!
//! * `ledger/reserve_settle/<threads>` — one `reserve` + `settle` on a single hot key, from 1, 2
//!   and 8 threads at once (time per reserve+settle pair; no lock on the path, contention is on
//!   one cache line).
//! * `ledger/settle_plain`, `ledger/settle_watched` — one thread's reserve + settle, without and
//!   with the alerts' threshold check at settle (the difference is what alerts cost per call).
//! * `usage/json_1k` — usage from a ~1 KB non-streaming chat completion body.
//! * `usage/sse_50_events` — a 50-event SSE stream with a final usage chunk, fed as it arrives
//!   (pass-through mode: the stream is not copied; only partial lines are carried over), and the
//!   same stream in strip mode (the usage chunk keygate asked for is removed).
//!
//! Run: `cargo bench --bench ledger -- --warm-up-time 1 --measurement-time 3`

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures_util::FutureExt;
use keygate::core::alerts::Thresholds;
use keygate::ledger::Ledger;
use keygate::usage::{usage_from_json, SseTracker};
use std::hint::black_box;
use std::time::{Duration, Instant};

fn reserve_settle(c: &mut Criterion) {
    let mut g = c.benchmark_group("ledger");
    for threads in [1usize, 2, 8] {
        g.bench_function(BenchmarkId::new("reserve_settle", threads), |b| {
            b.iter_custom(|iters| {
                let ledger = Ledger::in_memory();
                // Warm the counter so the first reserve does not create it inside the timing.
                ledger.counter(1);
                let per_thread = (iters as usize).div_ceil(threads).max(1);
                let start = Instant::now();
                std::thread::scope(|s| {
                    for _ in 0..threads {
                        let ledger = ledger.clone();
                        s.spawn(move || {
                            for _ in 0..per_thread {
                                // The in-memory ledger never waits: the future is ready at once.
                                let r = ledger
                                    .reserve(black_box(1), Some(i64::MAX / 2), black_box(9))
                                    .now_or_never()
                                    .expect("ready")
                                    .expect("granted");
                                r.settle(black_box(8));
                            }
                        });
                    }
                });
                let elapsed = start.elapsed();
                // Report time per pair across all threads' work.
                elapsed.mul_f64(iters as f64 / (per_thread * threads) as f64)
            })
        });
    }
    g.finish();
}

/// The alerts' cost at settle (SPEC §7): `reserve_settle/1` against the same pair settled with
/// `settle_observed` and the threshold compare the gate makes for each charged counter
/// (`keygate::gate` alerts.rs), on a key with a quota so the compare runs on every call.
fn settle_watched(c: &mut Criterion) {
    let mut g = c.benchmark_group("ledger");
    let thresholds = Thresholds::compile(&[0.8, 1.0]).unwrap();
    let ledger = Ledger::in_memory();
    let quota = i64::MAX / 2;
    g.bench_function("settle_plain", |b| {
        b.iter(|| {
            let r = ledger
                .reserve(black_box(2), Some(quota), black_box(9))
                .now_or_never()
                .expect("ready")
                .expect("granted");
            r.settle(black_box(8));
        })
    });
    let mut crossed = 0usize;
    g.bench_function("settle_watched", |b| {
        b.iter(|| {
            let r = ledger
                .reserve(black_box(3), Some(quota), black_box(9))
                .now_or_never()
                .expect("ready")
                .expect("granted");
            r.settle_observed(black_box(8), &mut |ch| {
                if let Some(limit) = ch.limit {
                    crossed += thresholds
                        .crossed(quota, quota - limit, ch.before, ch.after)
                        .count();
                }
            });
        })
    });
    black_box(crossed);
    g.finish();
}

fn json_response(target: usize) -> Vec<u8> {
    let content = "The quick brown fox jumps over the lazy dog. ".repeat(target / 45);
    serde_json::json!({
        "id": "chatcmpl-123", "object": "chat.completion", "created": 1700000000, "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 120, "completion_tokens": 230, "total_tokens": 350}
    })
    .to_string()
    .into_bytes()
}

fn sse_stream(events: usize) -> Vec<Bytes> {
    let mut out = Vec::new();
    for i in 0..events {
        out.push(Bytes::from(format!(
            "data: {{\"id\":\"chatcmpl-123\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-4o-mini\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"token{i} \"}},\"finish_reason\":null}}],\"usage\":null}}\n\n"
        )));
    }
    out.push(Bytes::from_static(b"data: {\"id\":\"chatcmpl-123\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":120,\"completion_tokens\":50,\"total_tokens\":170}}\n\ndata: [DONE]\n\n"));
    out
}

fn usage(c: &mut Criterion) {
    let mut g = c.benchmark_group("usage");
    let body = json_response(1024);
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("json_1k", |b| {
        b.iter(|| black_box(usage_from_json(black_box(&body))))
    });
    let stream = sse_stream(50);
    let total: usize = stream.iter().map(|c| c.len()).sum();
    g.throughput(Throughput::Bytes(total as u64));
    for strip in [false, true] {
        let name = if strip {
            "sse_50_events_strip"
        } else {
            "sse_50_events"
        };
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut t = SseTracker::new(strip);
                for chunk in &stream {
                    black_box(t.feed(chunk.clone()));
                }
                black_box(t.finish());
                black_box(t.usage())
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = reserve_settle, settle_watched, usage
}
criterion_main!(benches);
