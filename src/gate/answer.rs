//! Writing keygate's own answers: a refusal, a local answer, or the error for an upstream that
//! failed before answering (phase `fail_to_proxy`).

use super::{headers, Gate, GateCtx, Outcome, X_REQUEST_ID};
use crate::core::errors::{Denial, Reason};
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::{FailToProxy, Session};
use pingora::{Error, ErrorType, Result};
use std::time::Duration;

/// A refused request whose unread body is at most this large is drained so the connection can
/// be kept alive; a larger one closes the connection.
pub(super) const DRAIN_LIMIT: u64 = 64 * 1024;
/// How long that drain may take.
pub(super) const DRAIN_TIME: Duration = Duration::from_secs(1);

impl Gate {
    pub(super) async fn deny(
        &self,
        session: &mut Session,
        ctx: &mut GateCtx,
        d: Denial,
    ) -> Result<bool> {
        log::debug!("request {} denied: {d}", ctx.request_id().unwrap_or("-"));
        ctx.outcome = Outcome::Denied(d.reason);
        ctx.denial_retry_after = d.retry_after;
        self.write_answer(session, ctx, d.status(), d.body(ctx.shape))
            .await?;
        Ok(true)
    }

    /// Write a JSON answer. An unread request body of up to 64 KiB is drained first so the
    /// connection stays usable; a larger or unbounded one closes it.
    pub(super) async fn write_answer(
        &self,
        session: &mut Session,
        ctx: &GateCtx,
        status: u16,
        body: Vec<u8>,
    ) -> Result<()> {
        let mut keep_alive = true;
        if !session.is_body_done() {
            let declared = session
                .req_header()
                .headers
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| {
                    std::str::from_utf8(v.as_bytes())
                        .ok()?
                        .trim()
                        .parse::<u64>()
                        .ok()
                });
            // A client that stalls its body does not hold the answer back.
            keep_alive = match declared {
                Some(len) if len <= DRAIN_LIMIT => matches!(
                    tokio::time::timeout(DRAIN_TIME, session.drain_request_body()).await,
                    Ok(Ok(()))
                ),
                _ => false,
            };
        }
        if self.draining() {
            keep_alive = false;
        }
        if !keep_alive {
            session.set_keepalive(None);
        }
        // A refusal's own Retry-After; else an upstream cooling down's, on keygate's 429.
        let retry_after = ctx
            .denial_retry_after
            .or(ctx.retry_after.filter(|_| status == 429));
        // Taken at admission or refusal; an answer that came before either has them as the
        // key's buckets stand.
        let rate = if ctx.rate.is_empty() {
            self.rate_as_it_stands(ctx)
        } else {
            ctx.rate
        };
        // Content-Type, Content-Length, the request id, Retry-After, Connection: at most five.
        let count = 5 + rate.count();
        let mut resp = ResponseHeader::build_no_case(status, Some(count))?;
        headers::add_to(&mut resp, count, |h| {
            h.put_static(&http::header::CONTENT_TYPE, "application/json");
            let mut digits = itoa::Buffer::new();
            h.put(
                &http::header::CONTENT_LENGTH,
                digits.format(body.len()).as_bytes(),
            )?;
            if let Some(id) = &ctx.request_id {
                h.put_value(&X_REQUEST_ID, id.clone());
            }
            if let Some(secs) = retry_after {
                h.put(&http::header::RETRY_AFTER, digits.format(secs).as_bytes())?;
            }
            rate.each(|name, value| h.put(name, value))?;
            if !keep_alive {
                h.put_static(&http::header::CONNECTION, "close");
            }
            Ok(())
        })?;
        session.write_response_header(Box::new(resp), false).await?;
        session
            .write_response_body(Some(Bytes::from(body)), true)
            .await?;
        if !keep_alive {
            linger(session).await;
        }
        Ok(())
    }

    /// Phase `fail_to_proxy`: an upstream that cannot be reached or fails before answering gets
    /// a 502 (504 on a timeout) in the client's error shape, with the request id.
    pub async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut GateCtx,
    ) -> FailToProxy {
        let reason = match e.etype() {
            _ if super::attempts::cooling_reason(e).is_some() => super::attempts::cooling_reason(e),
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
                Some(Reason::UpstreamTimeout)
            }
            _ if matches!(e.esource(), pingora::ErrorSource::Upstream) => {
                Some(Reason::UpstreamError)
            }
            _ => None,
        };
        let code = match (reason, e.etype()) {
            (Some(r), _) => {
                ctx.outcome = Outcome::Failed(r);
                if session.response_written().is_some() && ctx.sse.is_some() {
                    // A stream cut after its first byte: an in-band error event, in the
                    // client's stream format, then the end of the stream.
                    let event = Denial::new(r).stream_event(ctx.shape);
                    if session
                        .write_response_body(Some(Bytes::from(event)), true)
                        .await
                        .is_err()
                    {
                        log::debug!("could not send the stream error event downstream");
                    }
                } else if session.response_written().is_none() {
                    let d = Denial::new(r);
                    if self
                        .write_answer(session, ctx, d.status(), d.body(ctx.shape))
                        .await
                        .is_err()
                    {
                        log::debug!("could not send the error answer downstream");
                    }
                }
                r.status()
            }
            (None, ErrorType::HTTPStatus(code)) => {
                let _ = session.respond_error(*code).await;
                *code
            }
            (None, ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed) => 0,
            (None, _) => {
                let status = if matches!(e.esource(), pingora::ErrorSource::Downstream) {
                    400
                } else {
                    500
                };
                if session.response_written().is_none() {
                    let _ = session.respond_error(status).await;
                }
                status
            }
        };
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }
}

/// After refusing a request whose body is still arriving, read and discard it for a bounded
/// time before the connection is closed (a lingering close, as nginx does): closing with unread
/// data makes the kernel reset the connection, and a client still sending would see a broken
/// pipe instead of the answer.
pub(super) async fn linger(session: &mut Session) {
    const LINGER_TIME: Duration = Duration::from_secs(2);
    const LINGER_BYTES: usize = 64 * 1024 * 1024;
    let deadline = tokio::time::Instant::now() + LINGER_TIME;
    let mut discarded = 0usize;
    while discarded < LINGER_BYTES && !session.is_body_done() {
        match tokio::time::timeout_at(deadline, session.read_request_body()).await {
            Ok(Ok(Some(chunk))) => discarded += chunk.len(),
            _ => break,
        }
    }
}
