//! Measures how fast keygate reads `model` / `stream` / `max_tokens` out of a JSON request body
//! (`gate::find_model`, which validates the whole body as one JSON object, and the
//! `credential::parse_json_fields` it calls), in bytes/second, on
//! realistic ~1 KB and ~100 KB OpenAI chat-completions bodies — against two references on the
//! same bytes: a full `serde_json::Value` parse, and `serde_json::de::IgnoredAny` (syntax
//! validation only, no allocation; it does not bound the nesting depth, which keygate must).
//!
//! The bodies put `"model"` *after* the `messages` array, as the OpenAI Python SDK serializes
//! them, so the extractor must get through every message before it sees the model. Message
//! contents mix plain prose, escaped quotes, newlines and tabs, code, raw UTF-8 (accents, CJK,
//! emoji) and `\uXXXX` escapes (including surrogate pairs, as `json.dumps(ensure_ascii=True)`
//! writes them), so both the fast no-escape string path and the unescaping path are exercised.
//!
//! Run: `cargo bench --bench extraction -- --warm-up-time 1 --measurement-time 3`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use keygate::gate::find_model;
use std::fmt::Write as _;
use std::hint::black_box;
use std::time::Duration;

/// Target body sizes: (label, minimum bytes). The generator appends whole turns until the body
/// reaches the size, so the real length is a little above it; throughput uses the real length.
const SIZES: [(&str, usize); 2] = [("1KB", 1_000), ("100KB", 100_000)];

/// Message texts cycled through to build conversations. Deliberately varied: short and long,
/// ASCII and not, with characters JSON must escape.
const TEXTS: [&str; 8] = [
    "Can you summarize the main differences between TCP and UDP? Keep it short.",
    "Sure. TCP is connection-oriented and reliable: it retransmits lost segments and delivers \
     bytes in order. UDP is connectionless, adds almost nothing to IP, and leaves reliability \
     to the application.\n\nUse TCP for \"must arrive\" data; use UDP for latency-sensitive \
     traffic such as games or VoIP.",
    "Here is my code, why does it panic?\n\n```rust\nfn main() {\n\tlet v: Vec<i32> = vec![];\n\
     \tprintln!(\"{}\", v[0]);\n}\n```",
    "Indexing an empty vector is out of bounds: `v[0]` panics with \"index out of bounds: the \
     len is 0 but the index is 0\". Use `v.first()` or `v.get(0)`, which return an `Option`.",
    "Traduis en français : « Le café est prêt » — et explique l'accent sur « prêt ».",
    "« Prêt » porte un accent circonflexe, souvenir d'un ancien « s » (prest). 日本語では\
     「準備ができた」と言います。👍",
    "What does this path mean on Windows: C:\\Users\\me\\AppData\\Local\\Temp? And what about \
     the string 'It\\'s \"quoted\"'?",
    "It is your per-user temporary folder. The second string contains a backslash-escaped \
     apostrophe and double quotes; in JSON those become \\\\ and \\\" respectively.",
];

/// Append `s` to `out` as a JSON string literal. With `ascii_only`, every non-ASCII character
/// becomes `\uXXXX` (a surrogate pair above U+FFFF), as Python's `json.dumps` does by default;
/// otherwise it stays raw UTF-8, as `json.dumps(ensure_ascii=False)` / httpx write it.
fn push_json_str(out: &mut String, s: &str, ascii_only: bool) {
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => write!(out, "\\u{:04x}", c as u32).unwrap(),
            c if ascii_only && !c.is_ascii() => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    write!(out, "\\u{u:04x}").unwrap();
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A chat-completions body of at least `min_len` bytes: a system message, then alternating
/// user/assistant turns, then `model`, `stream`, `max_tokens` and a couple of other sampling
/// fields — in the key order the OpenAI Python SDK sends (messages first).
fn chat_body(min_len: usize) -> Vec<u8> {
    // What follows the messages array; its length is known up front so the loop can stop at
    // the right size.
    const TAIL: &str = r#","model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"max_tokens":1024,"temperature":0.7,"top_p":1}"#;
    let mut body = String::with_capacity(min_len + 1024);
    body.push_str(r#"{"messages":[{"role":"system","content":"#);
    push_json_str(
        &mut body,
        "You are a helpful assistant. Answer concisely.",
        false,
    );
    body.push('}');
    let mut i = 0usize;
    while body.len() + 1 + TAIL.len() < min_len {
        let role = if i.is_multiple_of(2) {
            "user"
        } else {
            "assistant"
        };
        write!(body, r#",{{"role":"{role}","content":"#).unwrap();
        // Every third message is ASCII-escaped, the rest raw UTF-8.
        push_json_str(&mut body, TEXTS[i % TEXTS.len()], i % 3 == 2);
        body.push('}');
        i += 1;
    }
    body.push(']');
    body.push_str(TAIL);
    body.into_bytes()
}

fn bench_extraction(c: &mut Criterion) {
    let mut group = c.benchmark_group("extraction");
    group.sample_size(50);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));

    for (label, min_len) in SIZES {
        let body = chat_body(min_len);

        // Sanity checks outside the timed loop: the body is valid JSON, the extractor finds
        // the fields, and the model really comes after the messages.
        let value: serde_json::Value = serde_json::from_slice(&body).expect("valid JSON");
        let turns = value["messages"].as_array().map_or(0, Vec::len);
        let (model, facts) = find_model(
            "/v1/chat/completions",
            None,
            Some("application/json"),
            &body,
        )
        .expect("body admitted");
        assert_eq!(model.as_deref(), Some("gpt-4o-mini"));
        assert!(facts.stream);
        assert_eq!(facts.include_usage, Some(true));
        assert_eq!(facts.max_tokens, Some(1024));
        let text = std::str::from_utf8(&body).unwrap();
        assert!(text.find("\"model\"").unwrap() > text.rfind("\"content\"").unwrap());
        eprintln!(
            "[extraction] {label}: {} bytes, {} messages",
            body.len(),
            turns
        );

        group.throughput(Throughput::Bytes(body.len() as u64));

        // What the gate runs on every JSON request.
        group.bench_with_input(BenchmarkId::new("find_model", label), &body, |b, body| {
            b.iter(|| {
                find_model(
                    black_box("/v1/chat/completions"),
                    None,
                    black_box(Some("application/json")),
                    black_box(body),
                )
                .map(|(m, f)| (m.map(|m| m.len()), f))
            })
        });

        // The JSON part of find_model alone (no content-type / path handling), to separate
        // find_model's fixed per-call overhead from the per-byte cost.
        group.bench_with_input(
            BenchmarkId::new("parse_json_fields", label),
            &body,
            |b, body| {
                b.iter(|| {
                    keygate::core::credential::parse_json_fields(black_box(body))
                        .map(|f| f.max_tokens)
                        .unwrap()
                })
            },
        );

        // Reference: a full DOM parse (allocates every string, array and map).
        group.bench_with_input(BenchmarkId::new("serde_value", label), &body, |b, body| {
            b.iter(|| serde_json::from_slice::<serde_json::Value>(black_box(body)).unwrap())
        });

        // Reference floor: validate-and-skip the whole body, allocating nothing.
        group.bench_with_input(
            BenchmarkId::new("serde_ignored_any", label),
            &body,
            |b, body| {
                b.iter(|| serde_json::from_slice::<serde::de::IgnoredAny>(black_box(body)).unwrap())
            },
        );
    }
    group.finish();
}

criterion_group!(benches, bench_extraction);
criterion_main!(benches);
