//! Entry points for the fuzz targets in `fuzz/` (and for `tests/fuzz_corpus.rs`, which replays
//! their corpora under `cargo test`): each takes arbitrary bytes, drives one parser that faces
//! untrusted input, and checks what must hold whatever the input. A panic is a finding.

use crate::core::admission::find_model;
use crate::core::credential;
use crate::core::table::verdict::verdicts_every_way;
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
    if let Ok((model, facts)) = find_model(&path, Some(&query), Some(&content_type), body) {
        if let Some(model) = model {
            assert!(!model.is_empty() && model.len() <= credential::MAX_MODEL_LEN);
        }
        if facts.is_json {
            // A body read as JSON goes upstream only if all of it is.
            assert_whole_json_object(body);
        }
    }
    let _ = credential::strip_query_key(&query);
    let _ = credential::strip_ws_key_protocol(get(3));
    let _ = credential::multipart_model(&content_type, body);
    json_fields(body);
}

/// `parse_json_fields` accepts a body exactly when all of it is one JSON object nested at most
/// `MAX_JSON_DEPTH` deep, whatever it found first; and it finds serde's `model`.
fn json_fields(body: &[u8]) {
    let fields = credential::parse_json_fields(body);
    if fields.is_ok() {
        assert_whole_json_object(body);
    }
    // The other way, where serde can be the judge: a body serde reads whole into values (which
    // also checks every string's UTF-8 and escapes) within its own depth limit (127), with at
    // most one `model`, is accepted, with serde's model.
    let Ok(members) = serde_json::from_slice::<Members>(body) else {
        return;
    };
    let models: Vec<&serde_json::Value> = members
        .0
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("model"))
        .map(|(_, v)| v)
        .collect();
    if models.len() > 1 {
        assert!(fields.is_err(), "accepted two `model` members");
        return;
    }
    let fields = fields.unwrap_or_else(|d| panic!("refused a valid body: {}", d.message));
    let want = match models.first() {
        None | Some(serde_json::Value::Null) => credential::ModelField::Absent,
        Some(serde_json::Value::String(s)) => credential::ModelField::Str(s.as_str().into()),
        Some(_) => credential::ModelField::NotAString,
    };
    assert_eq!(fields.model, want);
}

/// Panics unless `body` is one well-formed JSON object (by serde_json's own checker, which has
/// no depth limit when it skips) nested at most `MAX_JSON_DEPTH` deep.
fn assert_whole_json_object(body: &[u8]) {
    assert!(
        serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok(),
        "accepted a body that is not one whole JSON value"
    );
    assert_eq!(
        body.trim_ascii_start().first(),
        Some(&b'{'),
        "not an object"
    );
    let depth = json_depth(body);
    assert!(
        depth <= credential::MAX_JSON_DEPTH,
        "accepted a body nested {depth} deep"
    );
}

/// The deepest nesting of arrays and objects in a well-formed JSON text.
fn json_depth(json: &[u8]) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in json {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// A JSON object's members in order, repeats kept.
struct Members(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for Members {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Members;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<Members, A::Error> {
                let mut out = Vec::new();
                while let Some(kv) = m.next_entry()? {
                    out.push(kv);
                }
                Ok(Members(out))
            }
        }
        d.deserialize_map(V)
    }
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
    json_fields(data);
}

/// A sync file: accepted or rejected with a message naming the file, never a panic; and the
/// same verdict (the same table, or the same message) however it is read: streamed from
/// memory, parsed whole and then compiled (as before the streaming loader), and from a reader
/// handing out a few bytes at a time, as files are read (`KeyTable::from_reader`).
pub fn sync_file(data: &[u8]) {
    let [streamed, whole, read] = verdicts_every_way(data, "fuzz.json");
    if let Err(e) = &streamed {
        assert!(e.starts_with("sync file fuzz.json:"), "{e}");
    }
    assert_eq!(streamed, whole, "streamed vs parsed whole");
    assert_eq!(streamed, read, "streamed vs read in pieces");
}
