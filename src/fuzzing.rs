//! Entry points for the fuzz targets in `fuzz/` (and for `tests/fuzz_corpus.rs`, which replays
//! their corpora under `cargo test`): each takes arbitrary bytes, drives one parser that faces
//! untrusted input, and checks what must hold whatever the input. A panic is a finding.

use crate::core::admission::find_model;
use crate::core::credential;
use crate::core::table::KeyTable;
use crate::usage::{feed_in_pieces, usage_from_json, SseTracker};
use http::{HeaderMap, HeaderName, HeaderValue};

/// Split `data` on 0xFF bytes into at most `n` parts.
fn parts(data: &[u8], n: usize) -> Vec<&[u8]> {
    data.splitn(n, |&b| b == 0xFF).collect()
}

/// A request head and body: credential and model extraction.
/// Layout: `path 0xFF query 0xFF content-type 0xFF headers (name:value lines) 0xFF body`.
pub fn request(data: &[u8]) {
    let p = parts(data, 5);
    let get = |i: usize| p.get(i).copied().unwrap_or(b"");
    let path = String::from_utf8_lossy(get(0));
    let query = String::from_utf8_lossy(get(1));
    let content_type = String::from_utf8_lossy(get(2));
    let mut headers = HeaderMap::new();
    for line in get(3).split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(&line[colon + 1..]),
        ) {
            headers.append(n, v);
        }
    }
    if let Some(c) = credential::find_credential(&headers, Some(&query)) {
        // A credential is never empty and is one of the request's own bytes.
        assert!(!c.secret.is_empty());
        let _ = crate::core::table::key_digest(&c.secret);
    }
    let body = get(4);
    if let Ok((Some(model), _)) = find_model(&path, Some(&query), Some(&content_type), body) {
        assert!(!model.is_empty() && model.len() <= credential::MAX_MODEL_LEN);
    }
    let _ = credential::strip_query_key(&query);
    let _ = credential::strip_ws_key_protocol(get(3));
    let _ = credential::multipart_model(&content_type, body);
    let _ = credential::parse_json_fields(body);
}

/// An SSE stream cut at arbitrary places: the bytes sent and the usage found must not depend on
/// where the chunks were cut. Layout: `mode byte, cut positions (2 bytes each, until 0xFF 0xFF),
/// stream`.
pub fn sse(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let strip = mode & 1 == 1;
    let (cuts_raw, stream) = match rest.windows(2).position(|w| w == [0xFF, 0xFF]) {
        Some(i) => (&rest[..i], &rest[i + 2..]),
        None => (&rest[..0], rest),
    };
    let mut cuts: Vec<usize> = cuts_raw
        .chunks(2)
        .map(|c| usize::from(c[0]) << 8 | usize::from(*c.get(1).unwrap_or(&0)))
        .filter(|&c| c > 0 && c < stream.len())
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let run = |cuts: &[usize]| {
        let mut t = SseTracker::new(strip);
        let out = feed_in_pieces(&mut t, stream, cuts);
        (out, t.usage(), t.events())
    };
    let whole = run(&[]);
    let cut = run(&cuts);
    assert_eq!(whole, cut, "chunk boundaries changed the result");
    if !strip {
        assert_eq!(whole.0, stream, "pass-through mode changed the stream");
    }
}

/// A response body: usage extraction and request-field parsing never panic.
pub fn json_usage(data: &[u8]) {
    let u = usage_from_json(data);
    let _ = u.usage();
    // The scanning fast path must agree with the full parse on every valid document.
    if serde_json::from_slice::<serde::de::IgnoredAny>(data).is_ok() {
        assert_eq!(u, crate::usage::usage_from_json_parsed(data));
    }
    let _ = credential::parse_json_fields(data);
}

/// A sync file: accepted or rejected with a message naming the file, never a panic.
pub fn sync_file(data: &[u8]) {
    match KeyTable::from_json(data, "fuzz.json") {
        Ok(t) => {
            let _ = t.len();
        }
        Err(e) => assert!(e.to_string().starts_with("sync file fuzz.json:")),
    }
}
