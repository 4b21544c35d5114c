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
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::mock_faults::MockFaults;
use super::mock_routes::{error_json, route, Controls, Reply};

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

/// Bind `addr` with a long accept queue: `benches/concurrency.sh` opens thousands of upstream
/// connections in the same second, and with tokio's default backlog (1,024) the kernel reset
/// some of them (502s that were the rig's, not the proxy's). The kernel caps it at somaxconn.
async fn listen(addr: &str) -> std::io::Result<TcpListener> {
    let mut last = std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address");
    for a in tokio::net::lookup_host(addr).await? {
        let socket = if a.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        match socket.bind(a) {
            Ok(()) => return socket.listen(16 * 1024),
            Err(e) => last = e,
        }
    }
    Err(last)
}

impl MockBackend {
    /// Binds `addr` (e.g. "127.0.0.1:0"), spawns the accept loop on the current tokio runtime,
    /// returns at once.
    pub async fn start(addr: &str) -> std::io::Result<MockBackend> {
        let listener = listen(addr).await?;
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
