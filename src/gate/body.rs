//! Reading the request body up to the cap before the upstream is chosen, and asking a
//! streaming call's upstream for its usage chunk.

use super::{Gate, GateCtx};
use crate::core::errors::{Denial, Reason};
use bytes::{Bytes, BytesMut};
use pingora::http::RequestHeader;
use pingora::proxy::Session;
use pingora::Error;
use std::task::Poll;
use std::time::Duration;

/// Pingora's retry buffer holds this much of a request body; a body read early must reach the
/// upstream through it (see [`Gate::request_filter`]).
pub(super) const RETRY_BUFFER_LIMIT: usize = 64 * 1024;

pub(super) enum BodyError {
    Denied(Denial),
    Fault(Box<Error>),
}

impl Gate {
    /// Read the whole request body, up to `max_body_bytes`.
    ///
    /// Pingora forwards a body that was read before the upstream was chosen only through its
    /// retry buffer, which holds 64 KiB; a larger early-read body would never reach the
    /// upstream. So retry buffering is switched on just before the last 64 KiB of a body with a
    /// Content-Length: the buffer then holds that tail untruncated, Pingora replays it through
    /// `request_body_filter`, and [`Gate::request_body_filter`] swaps in the whole body. A
    /// chunked body has no known tail, so it is buffered from the start and must fit in 64 KiB
    /// (411 `length_required` above that).
    ///
    /// The time spent waiting for the body to arrive is added to `waited`.
    pub(super) async fn read_body(
        &self,
        session: &mut Session,
        waited: &mut Duration,
    ) -> std::result::Result<Bytes, BodyError> {
        let cap = self.inner.options.max_body_bytes;
        let headers = &session.req_header().headers;
        // Whether there is a body is Pingora's call (it frames the request); any
        // Transfer-Encoding means the length is unknown, whatever the Content-Length says.
        let has_te = headers.contains_key(http::header::TRANSFER_ENCODING);
        let declared = match headers.get(http::header::CONTENT_LENGTH) {
            _ if has_te => None,
            None => None,
            Some(v) => Some(
                std::str::from_utf8(v.as_bytes())
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .ok_or_else(|| {
                        BodyError::Denied(Denial::with_message(
                            Reason::InvalidJson,
                            "The Content-Length header is not a number.",
                        ))
                    })?,
            ),
        };
        if let Some(len) = declared {
            if len > cap {
                return Err(BodyError::Denied(Denial::with_message(
                    Reason::RequestTooLarge,
                    format!("The request body is {len} bytes; this gateway accepts at most {cap}."),
                )));
            }
        }
        let expects_continue = headers
            .get(http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if session.is_body_empty() {
            return Ok(Bytes::new());
        }
        if expects_continue {
            session
                .write_continue_response()
                .await
                .map_err(BodyError::Fault)?;
        }

        let capacity = declared.map_or(RETRY_BUFFER_LIMIT as u64, |l| l.min(cap));
        let mut buf = BytesMut::with_capacity(usize::try_from(capacity).unwrap_or(0));
        let mut buffering = false;
        let timeout = self.inner.options.body_read_timeout;
        // When a read first had to wait: a small body has come with the head, and its read
        // needs no timer (nor a clock read).
        let mut waiting_since: Option<tokio::time::Instant> = None;
        loop {
            let remaining = declared.map(|l| l.saturating_sub(buf.len() as u64));
            if !buffering && remaining.is_none_or(|r| r <= RETRY_BUFFER_LIMIT as u64) {
                session.enable_retry_buffering();
                buffering = true;
            }
            let read = {
                let mut read = std::pin::pin!(session.read_request_body());
                match futures_util::poll!(read.as_mut()) {
                    Poll::Ready(r) => Ok(r),
                    Poll::Pending => {
                        let since = *waiting_since.get_or_insert_with(tokio::time::Instant::now);
                        tokio::time::timeout_at(since + timeout, read).await
                    }
                }
            };
            if let Some(since) = waiting_since {
                *waited = since.elapsed();
            }
            let Ok(read) = read else {
                return Err(BodyError::Denied(Denial::with_message(
                    Reason::RequestTimeout,
                    format!(
                        "The request body was not received within {} s.",
                        timeout.as_secs_f64()
                    ),
                )));
            };
            match read {
                Ok(Some(chunk)) => {
                    if (buf.len() + chunk.len()) as u64 > cap {
                        return Err(BodyError::Denied(Denial::with_message(
                            Reason::RequestTooLarge,
                            format!("The request body is larger than {cap} bytes."),
                        )));
                    }
                    buf.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => {
                    return Err(BodyError::Denied(Denial::with_message(
                        Reason::IncompleteBody,
                        format!("The request body could not be read: {:?}", e.etype()),
                    )))
                }
            }
        }
        if session.retry_buffer_truncated() {
            return Err(BodyError::Denied(Denial::new(Reason::LengthRequired)));
        }
        if !buf.is_empty() && session.get_retry_buffer().is_none() {
            // The whole body came in one read with an oversized head, before the tail could be
            // buffered: Pingora could not forward it. Refuse rather than hang the upstream.
            return Err(BodyError::Denied(Denial::new(Reason::HeadersTooLarge)));
        }
        Ok(buf.freeze())
    }

    /// A streaming chat call whose client did not ask for the usage chunk gets
    /// `stream_options.include_usage` set, so the call can be charged exactly; the chunk is
    /// removed again from the response (see [`SseTracker`]).
    pub(super) fn maybe_ask_for_usage(
        &self,
        req: &RequestHeader,
        body: Bytes,
        ctx: &mut GateCtx,
    ) -> Bytes {
        let path = req.uri.path();
        if !ctx.facts.stream
            || !ctx.facts.is_json
            || ctx.facts.include_usage == Some(true)
            || !(path == "/v1/chat/completions" || path == "/v1/completions")
        {
            return body;
        }
        let rewritten = if ctx.facts.has_stream_options {
            // Rare: a stream_options object without include_usage:true. Re-serialize.
            serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|mut v| {
                    let so = v.get_mut("stream_options")?;
                    if !so.is_object() {
                        *so = serde_json::json!({});
                    }
                    so["include_usage"] = serde_json::Value::Bool(true);
                    serde_json::to_vec(&v).ok()
                })
        } else {
            // Splice the member in after the opening brace; the object has at least `model`.
            body.iter().position(|&b| b == b'{').map(|i| {
                let mut v = Vec::with_capacity(body.len() + 40);
                v.extend_from_slice(&body[..=i]);
                v.extend_from_slice(br#""stream_options":{"include_usage":true},"#);
                v.extend_from_slice(&body[i + 1..]);
                v
            })
        };
        match rewritten {
            Some(v) => {
                ctx.strip_usage = true;
                Bytes::from(v)
            }
            None => body,
        }
    }
}
