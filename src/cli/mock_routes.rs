//! The mock backend's routes: what each path answers (OpenAI chat, completions, embeddings,
//! Anthropic messages, Gemini), shaped by the test controls a request carries.

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use serde_json::{json, Value};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The assistant text the mock answers with.
pub(super) const CONTENT: &str = "Hello from the keygate mock backend.";

/// Default number of content pieces in a stream.
pub(super) const DEFAULT_CHUNKS: usize = 5;

/// Upper bound for `x-mock-piece-bytes`.
pub(super) const MAX_PIECE_BYTES: usize = 64 * 1024;

/// Upper bound for `x-mock-chunks`, so a typo cannot make the mock stream forever.
pub(super) const MAX_CHUNKS: usize = 10_000;

/// Default and maximum completion tokens.
pub(super) const MAX_COMPLETION_TOKENS: u64 = 20;

/// Test controls parsed from the request headers.
pub(super) struct Controls {
    pub(super) status: Option<StatusCode>,
    pub(super) delay: Duration,
    pub(super) chunks: usize,
    pub(super) piece_bytes: usize,
    pub(super) usage: bool,
}

impl Controls {
    pub(super) fn from_headers(headers: &HeaderMap) -> Controls {
        let get = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
        };
        Controls {
            status: get("x-mock-status")
                .and_then(|v| v.parse::<u16>().ok())
                .and_then(|code| StatusCode::from_u16(code).ok()),
            delay: Duration::from_millis(
                get("x-mock-delay-ms")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
            ),
            chunks: get("x-mock-chunks")
                .and_then(|v| v.parse::<usize>().ok())
                .map_or(DEFAULT_CHUNKS, |n| n.min(MAX_CHUNKS)),
            piece_bytes: get("x-mock-piece-bytes")
                .and_then(|v| v.parse::<usize>().ok())
                .map_or(0, |n| n.min(MAX_PIECE_BYTES)),
            usage: !matches!(get("x-mock-no-usage"), Some("1" | "true")),
        }
    }
}

/// What a route decided to answer, before delays and framing are applied.
pub(super) enum Reply {
    Json(StatusCode, Value),
    /// Complete SSE events (each ending in a blank line), sent one frame at a time.
    Sse(Vec<String>),
}

pub(super) fn error_json(message: &str, kind: &str, code: &str) -> Value {
    json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
}

pub(super) fn invalid_json(e: &serde_json::Error) -> Reply {
    let message = format!("We could not parse the JSON body of your request: {e}");
    Reply::Json(
        StatusCode::BAD_REQUEST,
        error_json(&message, "invalid_request_error", "invalid_json"),
    )
}

pub(super) fn sse_data(value: &Value) -> String {
    format!("data: {value}\n\n")
}

pub(super) fn sse_event(name: &str, value: &Value) -> String {
    format!("event: {name}\ndata: {value}\n\n")
}

/// Everything a generation route needs to build its answer.
pub(super) struct Gen {
    model: String,
    prompt_tokens: u64,
    completion_tokens: u64,
    created: u64,
    usage: bool,
    stream: bool,
    pieces: Vec<String>,
}

impl Gen {
    fn new(json: &Value, body_len: usize, model: Option<&str>, ctl: &Controls) -> Gen {
        let max_tokens = ["max_completion_tokens", "max_tokens", "max_output_tokens"]
            .iter()
            .find_map(|key| json.get(key).and_then(Value::as_u64))
            .or_else(|| {
                json.pointer("/generationConfig/maxOutputTokens")
                    .and_then(Value::as_u64)
            });
        let model = model
            .or_else(|| json.get("model").and_then(Value::as_str))
            .unwrap_or("unknown");
        Gen {
            model: model.to_string(),
            prompt_tokens: 1 + body_len as u64 / 4,
            completion_tokens: max_tokens
                .map_or(MAX_COMPLETION_TOKENS, |m| m.min(MAX_COMPLETION_TOKENS)),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            usage: ctl.usage,
            stream: json.get("stream").and_then(Value::as_bool) == Some(true),
            pieces: pieces(ctl.chunks, ctl.piece_bytes),
        }
    }

    fn total(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }
}

/// Splits the answer into `n` stream pieces (cycling through its words when `n` is large),
/// each padded with dots to `min_bytes`.
pub(super) fn pieces(n: usize, min_bytes: usize) -> Vec<String> {
    CONTENT
        .split(' ')
        .cycle()
        .take(n)
        .enumerate()
        .map(|(i, word)| {
            let sep = if i + 1 < n { " " } else { "" };
            let pad = min_bytes.saturating_sub(word.len() + sep.len());
            format!("{word}{}{sep}", ".".repeat(pad))
        })
        .collect()
}

pub(super) fn route(method: &Method, path: &str, body: &Bytes, ctl: &Controls) -> Reply {
    let post = method == Method::POST;
    match path {
        "/v1/chat/completions" if post => with_json(body, ctl, None, chat),
        "/v1/completions" if post => with_json(body, ctl, None, completions),
        "/v1/embeddings" if post => with_json(body, ctl, None, embeddings),
        "/v1/messages" if post => with_json(body, ctl, None, anthropic),
        "/v1/audio/transcriptions" if post => {
            Reply::Json(StatusCode::OK, json!({"text": "hello from the mock"}))
        }
        "/v1/models" if method == Method::GET => Reply::Json(StatusCode::OK, models()),
        _ => match gemini_target(path) {
            Some((model, stream)) if post => {
                with_json(body, ctl, Some(model), |g, _| gemini(g, stream))
            }
            _ => Reply::Json(
                StatusCode::OK,
                json!({"object": "mock.echo", "method": method.as_str(), "path": path, "body_bytes": body.len()}),
            ),
        },
    }
}

/// Parses the JSON body and hands it to a generation route; malformed JSON becomes a 400.
pub(super) fn with_json(
    body: &Bytes,
    ctl: &Controls,
    model: Option<&str>,
    f: impl FnOnce(&Gen, &Value) -> Reply,
) -> Reply {
    match serde_json::from_slice::<Value>(body) {
        Ok(json) => f(&Gen::new(&json, body.len(), model, ctl), &json),
        Err(e) => invalid_json(&e),
    }
}

/// `/v1beta/models/{model}:generateContent` → `(model, false)`; `:streamGenerateContent` →
/// `(model, true)`. Also accepts the `/v1/models/` prefix.
pub(super) fn gemini_target(path: &str) -> Option<(&str, bool)> {
    let rest = path
        .strip_prefix("/v1beta/models/")
        .or_else(|| path.strip_prefix("/v1/models/"))?;
    let (model, action) = rest.rsplit_once(':')?;
    match action {
        "generateContent" => Some((model, false)),
        "streamGenerateContent" => Some((model, true)),
        _ => None,
    }
}

pub(super) fn models() -> Value {
    let data: Vec<Value> = [
        "gpt-4o-mini",
        "gpt-4o",
        "text-embedding-3-small",
        "claude-3-5-sonnet-latest",
    ]
    .iter()
    .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "mock"}))
    .collect();
    json!({"object": "list", "data": data})
}

pub(super) fn openai_usage(g: &Gen) -> Value {
    json!({"prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens, "total_tokens": g.total()})
}

pub(super) fn chat(g: &Gen, json: &Value) -> Reply {
    if !g.stream {
        let mut out = json!({
            "id": "chatcmpl-mock",
            "object": "chat.completion",
            "created": g.created,
            "model": g.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": CONTENT}, "finish_reason": "stop"}],
        });
        if g.usage {
            out["usage"] = openai_usage(g);
        }
        return Reply::Json(StatusCode::OK, out);
    }

    let include_usage = json
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        == Some(true);
    // Like OpenAI: with include_usage, every chunk carries `"usage": null` until the last one.
    let chunk = |choices: Value| {
        let mut c = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": g.created, "model": g.model, "choices": choices});
        if include_usage {
            c["usage"] = Value::Null;
        }
        c
    };
    let mut events: Vec<String> = g
        .pieces
        .iter()
        .enumerate()
        .map(|(i, piece)| {
            let delta = if i == 0 {
                json!({"role": "assistant", "content": piece})
            } else {
                json!({"content": piece})
            };
            sse_data(&chunk(
                json!([{"index": 0, "delta": delta, "finish_reason": null}]),
            ))
        })
        .collect();
    events.push(sse_data(&chunk(
        json!([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
    )));
    if include_usage && g.usage {
        let mut last = chunk(json!([]));
        last["usage"] = openai_usage(g);
        events.push(sse_data(&last));
    }
    events.push("data: [DONE]\n\n".to_string());
    Reply::Sse(events)
}

pub(super) fn completions(g: &Gen, _json: &Value) -> Reply {
    let mut out = json!({
        "id": "cmpl-mock",
        "object": "text_completion",
        "created": g.created,
        "model": g.model,
        "choices": [{"text": CONTENT, "index": 0, "finish_reason": "stop"}],
    });
    if g.usage {
        out["usage"] = openai_usage(g);
    }
    Reply::Json(StatusCode::OK, out)
}

pub(super) fn embeddings(g: &Gen, json: &Value) -> Reply {
    // One embedding per input when "input" is a list of strings (or of token lists).
    let inputs = match json.get("input") {
        Some(Value::Array(items))
            if items.first().is_some_and(|v| v.is_string() || v.is_array()) =>
        {
            items.len()
        }
        _ => 1,
    };
    let data: Vec<Value> = (0..inputs)
        .map(|i| json!({"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}))
        .collect();
    let mut out = json!({"object": "list", "data": data, "model": g.model});
    if g.usage {
        out["usage"] = json!({"prompt_tokens": g.prompt_tokens, "total_tokens": g.prompt_tokens});
    }
    Reply::Json(StatusCode::OK, out)
}

pub(super) fn anthropic(g: &Gen, _json: &Value) -> Reply {
    if !g.stream {
        let mut out = json!({
            "id": "msg_mock",
            "type": "message",
            "role": "assistant",
            "model": g.model,
            "content": [{"type": "text", "text": CONTENT}],
            "stop_reason": "end_turn",
            "stop_sequence": null,
        });
        if g.usage {
            out["usage"] =
                json!({"input_tokens": g.prompt_tokens, "output_tokens": g.completion_tokens});
        }
        return Reply::Json(StatusCode::OK, out);
    }

    let mut message = json!({
        "id": "msg_mock",
        "type": "message",
        "role": "assistant",
        "model": g.model,
        "content": [],
        "stop_reason": null,
        "stop_sequence": null,
    });
    if g.usage {
        message["usage"] = json!({"input_tokens": g.prompt_tokens, "output_tokens": 1});
    }
    let mut events = vec![
        sse_event(
            "message_start",
            &json!({"type": "message_start", "message": message}),
        ),
        sse_event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
    ];
    events.extend(g.pieces.iter().map(|piece| {
        sse_event(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}),
        )
    }));
    events.push(sse_event(
        "content_block_stop",
        &json!({"type": "content_block_stop", "index": 0}),
    ));
    let mut delta = json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}});
    if g.usage {
        delta["usage"] = json!({"output_tokens": g.completion_tokens});
    }
    events.push(sse_event("message_delta", &delta));
    events.push(sse_event("message_stop", &json!({"type": "message_stop"})));
    Reply::Sse(events)
}

pub(super) fn gemini(g: &Gen, stream: bool) -> Reply {
    let usage = json!({"promptTokenCount": g.prompt_tokens, "candidatesTokenCount": g.completion_tokens, "totalTokenCount": g.total()});
    if !stream {
        let mut out = json!({
            "candidates": [{"content": {"parts": [{"text": CONTENT}], "role": "model"}, "finishReason": "STOP", "index": 0}],
            "modelVersion": g.model,
        });
        if g.usage {
            out["usageMetadata"] = usage;
        }
        return Reply::Json(StatusCode::OK, out);
    }

    let pieces = if g.pieces.is_empty() {
        vec![String::new()]
    } else {
        g.pieces.clone()
    };
    let last = pieces.len() - 1;
    let events = pieces
        .iter()
        .enumerate()
        .map(|(i, piece)| {
            let mut candidate =
                json!({"content": {"parts": [{"text": piece}], "role": "model"}, "index": 0});
            let mut event = json!({"modelVersion": g.model});
            if i == last {
                candidate["finishReason"] = json!("STOP");
                if g.usage {
                    event["usageMetadata"] = usage.clone();
                }
            }
            event["candidates"] = json!([candidate]);
            sse_data(&event)
        })
        .collect();
    Reply::Sse(events)
}
