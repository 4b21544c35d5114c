//! A built-in OpenAI-compatible mock LLM backend (chat, streaming chat, embeddings, Anthropic
//! messages, Gemini), for `keygate demo` and tests.
//!
//! The mock records every request it receives and answers deterministically:
//!
//! * `prompt_tokens = 1 + body_len / 4`
//! * `completion_tokens = min(max_completion_tokens | max_tokens | max_output_tokens, 20)`
//!   (first one present, in that order; 20 when none is given).
//!
//! Tests can steer it with request headers:
//!
//! * `x-mock-status: NNN` – answer with that status and an OpenAI-shaped error body.
//! * `x-mock-delay-ms: N` – sleep N ms between stream events, or before a non-stream response.
//! * `x-mock-chunks: N` – number of content pieces in a stream (default 5).
//! * `x-mock-piece-bytes: N` – pad each stream piece to N bytes (at most 64 KiB), for large streams.
//! * `x-mock-no-usage: 1` – omit usage everywhere.
//!
//! Every response carries `x-mock-backend: 1`. Failure modes of one backend (a status with
//! `Retry-After`, a delay, a cut stream, a broken body) are set through [`MockBackend::faults`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::stream;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::mock_faults::MockFaults;

/// The assistant text the mock answers with.
const CONTENT: &str = "Hello from the keygate mock backend.";
/// Default number of content pieces in a stream.
const DEFAULT_CHUNKS: usize = 5;
/// Upper bound for `x-mock-piece-bytes`.
const MAX_PIECE_BYTES: usize = 64 * 1024;
/// Upper bound for `x-mock-chunks`, so a typo cannot make the mock stream forever.
const MAX_CHUNKS: usize = 10_000;
/// Default and maximum completion tokens.
const MAX_COMPLETION_TOKENS: u64 = 20;

type MockBody = UnsyncBoxBody<Bytes, std::io::Error>;
type Recorded = Arc<Mutex<Vec<RecordedRequest>>>;

/// A running mock backend. Dropping it stops the accept loop and closes open connections.
pub struct MockBackend {
    addr: SocketAddr,
    requests: Recorded,
    faults: Arc<MockFaults>,
    shutdown: watch::Sender<bool>,
    accept_task: JoinHandle<()>,
}

/// One request as received by the mock (the full body, byte for byte).
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// HTTP method, e.g. `POST`.
    pub method: String,
    /// Path plus query string, e.g. `/v1/chat/completions?x=1`.
    pub path_and_query: String,
    /// All request headers.
    pub headers: HeaderMap,
    /// The complete request body.
    pub body: Bytes,
}

impl MockBackend {
    /// Binds `addr` (e.g. "127.0.0.1:0"), spawns the accept loop on the current tokio runtime,
    /// returns at once.
    pub async fn start(addr: &str) -> std::io::Result<MockBackend> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let requests: Recorded = Arc::new(Mutex::new(Vec::new()));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let faults = Arc::new(MockFaults::default());
        let accept_task = tokio::spawn(accept_loop(
            listener,
            requests.clone(),
            faults.clone(),
            shutdown_rx,
        ));
        log::debug!("mock backend listening on {addr}");
        Ok(MockBackend {
            addr,
            requests,
            faults,
            shutdown,
            accept_task,
        })
    }

    /// The address the mock is listening on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every request received so far, in arrival order (recorded when the full request body
    /// has been read, before responding).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.requests).clone()
    }

    /// This backend's failure modes, to switch on and off while it runs.
    pub fn faults(&self) -> &MockFaults {
        &self.faults
    }

    /// Number of requests received so far.
    pub fn request_count(&self) -> usize {
        lock(&self.requests).len()
    }
}

impl Drop for MockBackend {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        self.accept_task.abort();
    }
}

/// Locks the request log, ignoring poisoning (a panicking reader must not break the mock).
fn lock(requests: &Recorded) -> MutexGuard<'_, Vec<RecordedRequest>> {
    requests
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn accept_loop(
    listener: TcpListener,
    requests: Recorded,
    faults: Arc<MockFaults>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            res = listener.accept() => res,
            _ = shutdown.changed() => return,
        };
        let (tcp, _peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                log::warn!("mock backend: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let requests = requests.clone();
        let faults = faults.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, requests.clone(), faults.clone()));
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .keep_alive(true)
                .serve_connection(TokioIo::new(tcp), service);
            tokio::select! {
                res = conn => {
                    if let Err(e) = res {
                        log::debug!("mock backend: connection error: {e}");
                    }
                }
                _ = shutdown.changed() => {}
            }
        });
    }
}

/// Test controls parsed from the request headers.
struct Controls {
    status: Option<StatusCode>,
    delay: Duration,
    chunks: usize,
    piece_bytes: usize,
    usage: bool,
}

impl Controls {
    fn from_headers(headers: &HeaderMap) -> Controls {
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
enum Reply {
    Json(StatusCode, Value),
    /// Complete SSE events (each ending in a blank line), sent one frame at a time.
    Sse(Vec<String>),
}

async fn handle(
    req: Request<Incoming>,
    requests: Recorded,
    faults: Arc<MockFaults>,
) -> Result<Response<MockBody>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            let reply = error_json(
                &format!("could not read request body: {e}"),
                "invalid_request_error",
                "bad_body",
            );
            return Ok(finish(json_response(StatusCode::BAD_REQUEST, &reply)));
        }
    };
    lock(&requests).push(RecordedRequest {
        method: parts.method.to_string(),
        path_and_query: parts.uri.path_and_query().map_or_else(
            || parts.uri.path().to_string(),
            |pq| pq.as_str().to_string(),
        ),
        headers: parts.headers.clone(),
        body: body.clone(),
    });

    let ctl = Controls::from_headers(&parts.headers);
    let delay = faults.first_byte_delay();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let fixed = faults.status();
    if fixed != 0 {
        let status = StatusCode::from_u16(fixed).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = json_response(
            status,
            &error_json("mock fault", "server_error", "mock_fault"),
        );
        if let Some(v) = faults
            .retry_after()
            .and_then(|v| HeaderValue::from_str(&v).ok())
        {
            r.headers_mut().insert(http::header::RETRY_AFTER, v);
        }
        return Ok(finish(r));
    }
    if faults.broken_body() {
        let body = r#"{"id":"chatcmpl-broken","object":"chat.completion","choices":[{"message":{"content":"Hel"#;
        let mut r = Response::new(
            Full::new(Bytes::from_static(body.as_bytes()))
                .map_err(|e| match e {})
                .boxed_unsync(),
        );
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        return Ok(finish(r));
    }
    let reply = match ctl.status {
        Some(status) => Reply::Json(
            status,
            error_json("mock error", "server_error", "mock_error"),
        ),
        None => route(&parts.method, parts.uri.path(), &body, &ctl),
    };
    let response = match reply {
        Reply::Json(status, value) => {
            if !ctl.delay.is_zero() {
                tokio::time::sleep(ctl.delay).await;
            }
            json_response(status, &value)
        }
        Reply::Sse(events) => sse_response(events, ctl.delay, faults.cut_after()),
    };
    Ok(finish(response))
}

fn finish(mut response: Response<MockBody>) -> Response<MockBody> {
    response
        .headers_mut()
        .insert("x-mock-backend", HeaderValue::from_static("1"));
    response
}

fn json_response(status: StatusCode, value: &Value) -> Response<MockBody> {
    let body = Full::new(Bytes::from(value.to_string()))
        .map_err(|e| match e {})
        .boxed_unsync();
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// A real streaming body: each event is its own frame, with `delay` slept between frames;
/// after `cut_after` events (when not 0) the connection is cut.
fn sse_response(events: Vec<String>, delay: Duration, cut_after: usize) -> Response<MockBody> {
    let total = events.len();
    let frames = stream::unfold(
        (events.into_iter(), true),
        move |(mut events, first)| async move {
            if cut_after > 0 && total - events.len() == cut_after {
                let cut = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "mock cut");
                // Once: the stream ends after the error.
                events.by_ref().for_each(drop);
                return Some((Err(cut), (events, false)));
            }
            let event = events.next()?;
            if !first && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Some((
                Ok::<_, std::io::Error>(Frame::data(Bytes::from(event))),
                (events, false),
            ))
        },
    );
    let mut response = Response::new(StreamBody::new(frames).boxed_unsync());
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert("cache-control", HeaderValue::from_static("no-cache"));
    response
}

fn error_json(message: &str, kind: &str, code: &str) -> Value {
    json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
}

fn invalid_json(e: &serde_json::Error) -> Reply {
    let message = format!("We could not parse the JSON body of your request: {e}");
    Reply::Json(
        StatusCode::BAD_REQUEST,
        error_json(&message, "invalid_request_error", "invalid_json"),
    )
}

fn sse_data(value: &Value) -> String {
    format!("data: {value}\n\n")
}

fn sse_event(name: &str, value: &Value) -> String {
    format!("event: {name}\ndata: {value}\n\n")
}

/// Everything a generation route needs to build its answer.
struct Gen {
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
fn pieces(n: usize, min_bytes: usize) -> Vec<String> {
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

fn route(method: &Method, path: &str, body: &Bytes, ctl: &Controls) -> Reply {
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
fn with_json(
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
fn gemini_target(path: &str) -> Option<(&str, bool)> {
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

fn models() -> Value {
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

fn openai_usage(g: &Gen) -> Value {
    json!({"prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens, "total_tokens": g.total()})
}

fn chat(g: &Gen, json: &Value) -> Reply {
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

fn completions(g: &Gen, _json: &Value) -> Reply {
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

fn embeddings(g: &Gen, json: &Value) -> Reply {
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

fn anthropic(g: &Gen, _json: &Value) -> Reply {
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

fn gemini(g: &Gen, stream: bool) -> Reply {
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
