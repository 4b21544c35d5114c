//! Connection limits Pingora does not enforce by itself: a deadline for the whole request head,
//! a cap on its size, the idle keep-alive timeout and a request count per connection.
//!
//! Pingora only times each read of the head (60 s), so a client that trickles one header byte
//! every few seconds holds a connection for ever, and it buffers up to 1 MiB of head per
//! connection before answering 400. [`Limited`] wraps the HTTP application: every HTTP/1
//! connection's stream goes through a [`HeadGuard`] that watches the bytes of each request head
//! (up to the blank line that ends it) and answers, itself:
//! - 408 `request_timeout` when a head has started but is not complete within
//!   `header_read_timeout` (a new connection gets the same time for its first head; a
//!   connection that sent nothing is closed silently, as nginx does);
//! - 431 `request_header_fields_too_large` as soon as a head grows past `max_header_bytes`.
//!
//! After the answer the write side is shut and what the client still sends is read and dropped
//! for a short while (a lingering close), so the client reads the answer instead of a reset.
//! Once a head is complete the guard only passes bytes through: bodies, upgraded connections
//! and long streams are not its business (the body has its own deadline in the gate).
//!
//! HTTP/2 connections (ALPN `h2`) are passed to the application untouched.

use crate::core::errors::{Denial, Reason};
use crate::gate::Gate;
use async_trait::async_trait;
use pingora::apps::{HttpServerApp, ReusedHttpStream, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, Stream, UniqueID,
    UniqueIDType, ALPN,
};
use pingora::server::ShutdownWatch;
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The limits, from the configuration (see the README for the defaults).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnLimits {
    /// Time a request head may take from its first byte (for a new connection: from accept).
    pub header_read_timeout: Duration,
    /// Largest request head (request line and header lines), bytes.
    pub max_header_bytes: usize,
    /// Seconds an idle keep-alive connection is kept open between requests.
    pub keepalive_timeout_seconds: u64,
    /// Requests served on one connection before it is closed; `None` for no limit.
    pub max_requests_per_connection: Option<u32>,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            header_read_timeout: Duration::from_secs(15),
            max_header_bytes: 32 * 1024,
            keepalive_timeout_seconds: 60,
            max_requests_per_connection: Some(1000),
        }
    }
}

/// How long a refused connection's incoming bytes are still read and dropped, and how many.
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1024 * 1024;

/// An HTTP application behind [`ConnLimits`]. Build the Pingora service with
/// `Service::new(name, Limited::new(app, limits, gate))`.
pub struct Limited<A> {
    inner: Arc<A>,
    shared: Arc<Shared>,
}

struct Shared {
    limits: ConnLimits,
    gate: Gate,
}

impl<A> Limited<A> {
    /// Wrap `inner`; `gate` provides request ids and counts the refusals in its metrics.
    pub fn new(inner: A, limits: ConnLimits, gate: Gate) -> Self {
        Limited {
            inner: Arc::new(inner),
            shared: Arc::new(Shared { limits, gate }),
        }
    }
}

/// The future of one request on a connection, boxed by the application.
type Served<'a> = Pin<Box<dyn Future<Output = Option<ReusedHttpStream>> + Send + 'a>>;

impl<A> Limited<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    /// The first request on a new HTTP/1 connection. Not `async`: the session is built here
    /// and moved into the application's (boxed) future, so the connection's future, held for
    /// the whole life of the connection, keeps no room for a session (~1.4 KB) of its own.
    fn serve_first<'a>(&'a self, stream: Stream, shutdown: &'a ShutdownWatch) -> Served<'a> {
        let limits = &self.shared.limits;
        let guard = HeadGuard::new(stream, self.shared.clone());
        let mut session = ServerSession::new_http1(Box::new(guard));
        if *shutdown.borrow() {
            session.set_keepalive(None);
        } else {
            // Reuse without a Pingora timeout: the guard times the keep-alive wait.
            session.set_keepalive(Some(0));
        }
        // Pingora counts reuses: the first request is not one.
        session.set_keepalive_reuses_remaining(
            limits
                .max_requests_per_connection
                .map(|n| n.saturating_sub(1)),
        );
        self.inner.process_new_http(session, shutdown)
    }

    /// The next request on a kept-alive connection; `None` when the stream is not the guard
    /// it was given (cannot happen: the application hands back the stream it was given).
    fn serve_next<'a>(
        &'a self,
        reused: ReusedHttpStream,
        shutdown: &'a ShutdownWatch,
    ) -> Option<Served<'a>> {
        let (stream, settings) = reused.consume();
        let mut guard = stream.into_any().downcast::<HeadGuard>().ok()?;
        guard.next_request();
        let mut session = ServerSession::new_http1(guard);
        if let Some(settings) = settings {
            settings.apply_to_session(&mut session);
        }
        Some(self.inner.process_new_http(session, shutdown))
    }
}

#[async_trait]
impl<A> ServerApp for Limited<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            return ServerApp::process_new(&self.inner, stream, shutdown).await;
        }
        let mut result = self.serve_first(stream, shutdown).await;
        while let Some(reused) = result {
            result = self.serve_next(reused, shutdown)?.await;
        }
        None
    }

    async fn cleanup(&self) {
        self.inner.http_cleanup().await;
    }
}

/// The instant `d` from now; a duration too large to add (a configured timeout of billions of
/// seconds) is a year.
fn from_now(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
}

/// Where a connection is in its current request.
#[derive(Debug)]
enum Phase {
    /// Waiting for a head (idle on a reused connection: no deadline until the first byte).
    Head,
    /// The head is complete: pass everything through.
    Done,
    /// The head broke a limit: answering and closing.
    Refusing {
        /// The whole answer (head and body).
        answer: Vec<u8>,
        /// Why.
        reason: Reason,
        progress: Refusal,
    },
}

/// Progress of a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Writing(usize),
    Flushing,
    Closing,
    Draining(usize),
    Finished,
}

/// Finds the blank line that ends a request head, across any split of the bytes.
#[derive(Debug, Default, Clone, Copy)]
struct HeadScanner {
    /// The last line break seen was followed only by `\r` so far.
    after_line_break: bool,
    /// Something other than a line break has been seen: leading blank lines, which the parser
    /// skips, do not end a head (or a client could send them first and then trickle).
    seen_text: bool,
}

impl HeadScanner {
    /// Feed the next bytes of a head; returns how many of them belong to the head once the
    /// blank line that ends it is among them.
    fn feed(&mut self, data: &[u8]) -> Option<usize> {
        let mut start = 0;
        while let Some(off) = memchr::memchr(b'\n', &data[start..]) {
            let at = start + off;
            let line = &data[start..at];
            let blank = line.iter().all(|&b| b == b'\r');
            if self.after_line_break && self.seen_text && blank {
                return Some(at + 1);
            }
            self.seen_text |= !blank;
            // A line split across reads: its first part was not blank.
            self.after_line_break = true;
            start = at + 1;
        }
        if data[start..].iter().any(|&b| b != b'\r') {
            self.after_line_break = false;
            self.seen_text = true;
        }
        None
    }
}

/// The stream wrapper that enforces the head limits (see the module docs).
pub struct HeadGuard {
    inner: Stream,
    shared: Arc<Shared>,
    phase: Phase,
    /// Head bytes seen so far in the current head.
    head_bytes: usize,
    scanner: HeadScanner,
    /// The deadline of the current head, of the keep-alive wait before it, or of the
    /// lingering close.
    deadline: Option<Instant>,
    /// `deadline` is the end of a keep-alive wait: no byte of the next head has come yet.
    idle: bool,
    /// A timer for `deadline`, made only when a read has to wait: most heads arrive in one
    /// read and never need one. It may be set earlier than `deadline` (see
    /// [`HeadGuard::deadline_passed`]).
    timer: Option<Pin<Box<Sleep>>>,
}

impl fmt::Debug for HeadGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeadGuard")
            .field("inner", &self.inner)
            .field("phase", &self.phase)
            .field("head_bytes", &self.head_bytes)
            .finish()
    }
}

impl HeadGuard {
    fn new(inner: Stream, shared: Arc<Shared>) -> Self {
        // The first head's time runs from accept.
        let deadline = from_now(shared.limits.header_read_timeout);
        HeadGuard {
            inner,
            shared,
            phase: Phase::Head,
            head_bytes: 0,
            scanner: HeadScanner::default(),
            deadline: Some(deadline),
            idle: false,
            timer: None,
        }
    }

    /// The previous request is finished and the connection is kept: the next head is awaited,
    /// for at most the keep-alive timeout (set when a read first has to wait), and then has its
    /// own deadline from its first byte.
    fn next_request(&mut self) {
        if matches!(self.phase, Phase::Refusing { .. }) {
            return;
        }
        self.phase = Phase::Head;
        self.head_bytes = 0;
        self.scanner = HeadScanner::default();
        self.deadline = None;
    }

    fn refuse(&mut self, reason: Reason) {
        let limits = &self.shared.limits;
        let message = match reason {
            Reason::HeadersTooLarge => format!(
                "The request head is larger than {} bytes.",
                limits.max_header_bytes
            ),
            _ => format!(
                "The request head was not received within {} s.",
                limits.header_read_timeout.as_secs_f64()
            ),
        };
        let body = Denial::with_message(reason, message).body(Default::default());
        let id = self.shared.gate.new_request_id();
        let status = reason.status();
        let phrase = http::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("");
        let mut answer = format!(
            "HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nx-request-id: {}\r\nconnection: close\r\n\r\n",
            body.len(),
            String::from_utf8_lossy(id.as_bytes()),
        )
        .into_bytes();
        answer.extend_from_slice(&body);
        self.phase = Phase::Refusing {
            answer,
            reason,
            progress: Refusal::Writing(0),
        };
        self.deadline = Some(from_now(LINGER_TIME));
        self.shared
            .gate
            .metrics()
            .count_request("denied", Some(reason), "", "");
        // Counted in the metrics; a flood of these must not flood the log.
        log::debug!("closing connection from {}: {}", self.peer(), reason.code());
    }

    fn peer(&self) -> String {
        self.inner
            .get_socket_digest()
            .and_then(|d| d.peer_addr().map(|a| a.to_string()))
            .unwrap_or_else(|| "?".into())
    }

    /// Whether the deadline has passed; if not, the task is woken when it does.
    ///
    /// The timer is moved only when it would fire too late. One that fires before the deadline
    /// is moved on then: a busy keep-alive connection's deadline moves with every request, and
    /// this moves its timer once per keep-alive timeout instead of once per request (Pingora's
    /// own keep-alive timeout registers a timer for every request).
    fn deadline_passed(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(deadline) = self.deadline else {
            return false;
        };
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() > deadline {
            timer.as_mut().reset(deadline);
        }
        loop {
            if timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            if timer.deadline() >= deadline {
                return true;
            }
            timer.as_mut().reset(deadline);
        }
    }

    /// Drive the refusal: write the answer, shut the write side, drain, then fail the read.
    fn poll_refusal(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let finished = matches!(
                self.phase,
                Phase::Refusing {
                    progress: Refusal::Finished,
                    ..
                }
            );
            let expired = !finished && self.deadline_passed(cx);
            let Phase::Refusing {
                answer,
                reason,
                progress,
            } = &mut self.phase
            else {
                return Poll::Ready(Ok(()));
            };
            if expired {
                *progress = Refusal::Finished;
            }
            let inner = Pin::new(&mut self.inner);
            *progress = match *progress {
                Refusal::Writing(done) if done >= answer.len() => Refusal::Flushing,
                Refusal::Writing(done) => match ready!(inner.poll_write(cx, &answer[done..])) {
                    Ok(0) | Err(_) => Refusal::Finished,
                    Ok(n) => Refusal::Writing(done + n),
                },
                Refusal::Flushing => match ready!(inner.poll_flush(cx)) {
                    Ok(()) => Refusal::Closing,
                    Err(_) => Refusal::Finished,
                },
                Refusal::Closing => match ready!(inner.poll_shutdown(cx)) {
                    Ok(()) => Refusal::Draining(0),
                    Err(_) => Refusal::Finished,
                },
                Refusal::Draining(dropped) if dropped >= LINGER_BYTES => Refusal::Finished,
                Refusal::Draining(dropped) => {
                    let mut scratch = [0u8; 4096];
                    let mut sink = ReadBuf::new(&mut scratch);
                    match ready!(inner.poll_read(cx, &mut sink)) {
                        Ok(()) if !sink.filled().is_empty() => {
                            Refusal::Draining(dropped + sink.filled().len())
                        }
                        _ => Refusal::Finished,
                    }
                }
                Refusal::Finished => {
                    let what = match reason {
                        Reason::HeadersTooLarge => "request head too large (answered 431)",
                        _ => "request head not received in time (answered 408)",
                    };
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, what)));
                }
            };
        }
    }
}

impl AsyncRead for HeadGuard {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.phase {
            Phase::Done => return Pin::new(&mut this.inner).poll_read(cx, buf),
            Phase::Refusing { .. } => return this.poll_refusal(cx),
            Phase::Head => {}
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {
                // Waiting for a head, or for the rest of one.
                if this.deadline.is_none() {
                    // Between requests: the keep-alive wait starts.
                    let idle = Duration::from_secs(this.shared.limits.keepalive_timeout_seconds);
                    this.deadline = Some(from_now(idle));
                    this.idle = true;
                }
                if !this.deadline_passed(cx) {
                    return Poll::Pending;
                }
                if this.head_bytes == 0 {
                    // Nothing of a request arrived: close quietly.
                    return Poll::Ready(Ok(()));
                }
                this.refuse(Reason::RequestTimeout);
                return this.poll_refusal(cx);
            }
        }
        let filled = buf.filled().len();
        if filled == before {
            return Poll::Ready(Ok(()));
        }
        let end = this.scanner.feed(&buf.filled()[before..filled]);
        this.head_bytes += end.unwrap_or(filled - before);
        if this.head_bytes > this.shared.limits.max_header_bytes {
            buf.set_filled(before);
            this.refuse(Reason::HeadersTooLarge);
            return this.poll_refusal(cx);
        }
        if end.is_some() {
            this.phase = Phase::Done;
            this.deadline = None;
        } else if this.deadline.is_none() || this.idle {
            // The first bytes of a head on a reused connection, and not the whole of it.
            this.deadline = Some(from_now(this.shared.limits.header_read_timeout));
        }
        this.idle = false;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for HeadGuard {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for HeadGuard {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for HeadGuard {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for HeadGuard {
    fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }
    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for HeadGuard {
    fn get_timing_digest(&self) -> Vec<Option<pingora::protocols::TimingDigest>> {
        self.inner.get_timing_digest()
    }
    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for HeadGuard {
    fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
    fn set_proxy_digest(&mut self, digest: pingora::protocols::raw_connect::ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for HeadGuard {
    fn get_socket_digest(&self) -> Option<Arc<pingora::protocols::SocketDigest>> {
        self.inner.get_socket_digest()
    }
    fn set_socket_digest(&mut self, digest: pingora::protocols::SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for HeadGuard {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_timeout_too_large_to_add_is_a_year() {
        let year = Duration::from_secs(365 * 24 * 3600);
        let at = from_now(Duration::from_secs(u64::MAX));
        assert!(at > Instant::now() + year - Duration::from_secs(60));
        assert!(from_now(Duration::from_secs(1)) < Instant::now() + Duration::from_secs(2));
    }

    fn end_of(parts: &[&[u8]]) -> Option<usize> {
        let mut scanner = HeadScanner::default();
        let mut offset = 0;
        for p in parts {
            if let Some(end) = scanner.feed(p) {
                return Some(offset + end);
            }
            offset += p.len();
        }
        None
    }

    #[test]
    fn finds_the_blank_line() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody";
        assert_eq!(end_of(&[head]), Some(head.len() - 4));
        assert_eq!(end_of(&[b"GET / HTTP/1.1\nHost: a\n\nrest"]), Some(24));
        assert_eq!(end_of(&[b"GET / HTTP/1.1\r\nHost: a\r\n"]), None);
    }

    #[test]
    fn leading_blank_lines_do_not_end_a_head() {
        assert_eq!(end_of(&[b"\r\n\r\n\r\n", b"GET / HTTP/1.1\r\n"]), None);
        assert_eq!(
            end_of(&[b"\r\n\r\n", b"GET / HTTP/1.1\r\n\r\n"]),
            Some(4 + 18)
        );
    }

    #[test]
    fn a_line_split_across_reads_is_not_blank() {
        assert_eq!(
            end_of(&[b"GET / HTTP/1.1\r\nHo", b"st: a\r\n", b"\r\n"]),
            Some(27)
        );
        assert_eq!(
            end_of(&[b"GET / HTTP/1.1\r\nX: y\r", b"\n\r", b"\n"]),
            Some(24)
        );
    }

    proptest! {
        /// Wherever the reads split a head, the end is found at the same place.
        #[test]
        fn any_split_finds_the_same_end(
            lines in prop::collection::vec("[a-zA-Z0-9:; -]{1,40}", 1..12),
            lf_only in any::<bool>(),
            cuts in prop::collection::vec(0usize..2000, 0..8),
        ) {
            let eol = if lf_only { "\n" } else { "\r\n" };
            let mut head = String::from("POST /v1/chat/completions HTTP/1.1");
            head.push_str(eol);
            for l in &lines {
                head.push_str(l);
                head.push_str(eol);
            }
            head.push_str(eol);
            let want = head.len();
            head.push_str("{\"model\":\"x\"}\r\n\r\n");
            let bytes = head.as_bytes();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % bytes.len()).collect();
            cuts.sort_unstable();
            cuts.dedup();
            let mut parts = Vec::new();
            let mut at = 0;
            for c in cuts {
                parts.push(&bytes[at..c]);
                at = c;
            }
            parts.push(&bytes[at..]);
            prop_assert_eq!(end_of(&parts), Some(want));
        }
    }
}
