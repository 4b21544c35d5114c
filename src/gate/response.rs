//! Phases `response_filter` and `response_body_filter`: the response passes through as it
//! arrives while its usage is read (SSE events, or a JSON body's chunks kept by reference).

use super::{headers, Gate, GateCtx, X_REQUEST_ID};
use crate::core::pricing::{self, PriceRule, Usage};
use crate::core::table::{KeyRecord, KeyTable};
use crate::usage::{PartialUsage, SseTracker};
use bytes::{Bytes, BytesMut};
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;
use std::time::{Duration, Instant};

/// A JSON response larger than this is not parsed for usage (the call is charged an estimate).
pub(super) const MAX_USAGE_BODY: usize = 16 * 1024 * 1024;

impl Gate {
    /// Phase `response_filter`: the answer judged (a retryable status may end the attempt
    /// here, see [`super::attempts`]), then the request id on the response.
    pub async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut GateCtx,
    ) -> Result<()> {
        // An interim answer (103 Early Hints, 100 Continue) is not the answer: the final head
        // follows, may still be retried, and needs the request body for it.
        if resp.status.is_informational() && resp.status != http::StatusCode::SWITCHING_PROTOCOLS {
            return Ok(());
        }
        // Before anything reaches the client: a retryable status may become a retry.
        self.judge_answer(resp, ctx)?;
        ctx.answer_final = true;
        ctx.release_body();
        let draining = self.draining();
        if draining {
            session.set_keepalive(None);
        }
        // The request id, the rate-limit headers, Connection.
        let count = 1 + ctx.rate.count() + usize::from(draining);
        headers::add_to(resp, count, |h| {
            if let Some(id) = &ctx.request_id {
                h.put_value(&X_REQUEST_ID, id.clone());
            }
            ctx.rate.each(|name, value| h.put(name, value))?;
            if draining {
                h.put_static(&http::header::CONNECTION, "close");
            }
            Ok(())
        })?;
        if ctx.reservation.is_none() {
            return Ok(());
        }
        ctx.first_byte = Some(Instant::now());
        ctx.status = resp.status.as_u16();
        let content_type = resp.headers.get(http::header::CONTENT_TYPE);
        let sse = content_type.is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        ctx.json_response =
            content_type.is_some_and(|v| memchr::memmem::find(v.as_bytes(), b"json").is_some());
        if sse && ctx.status < 400 {
            let strip = ctx.strip_usage;
            if strip {
                // The body changes length when the usage chunk is removed.
                resp.remove_header(&http::header::CONTENT_LENGTH);
            }
            ctx.sse = Some(SseTracker::new(strip));
        }
        Ok(())
    }

    /// Phase `response_body_filter`: passes the body through as it arrives (never buffered),
    /// reading usage on the way: SSE events line by line, a JSON body by keeping references to
    /// its chunks (no copy until the end).
    pub fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut GateCtx,
    ) -> Result<Option<Duration>> {
        if ctx.reservation.is_none() || ctx.status >= 400 {
            return Ok(None);
        }
        if let Some(tracker) = ctx.sse.as_mut() {
            // Timed: the events are read here. A JSON body's chunks are only kept here (no
            // clock read for that); its usage is read in `logging`, after the gate time.
            let started = Instant::now();
            if let Some(chunk) = body.take() {
                *body = Some(tracker.feed(chunk));
            }
            if end_of_stream {
                let rest = tracker.finish();
                if !rest.is_empty() {
                    let mut all = BytesMut::from(&body.take().unwrap_or_default()[..]);
                    all.extend_from_slice(&rest);
                    *body = Some(all.freeze());
                }
            }
            ctx.gate_time += started.elapsed();
        } else if let Some(chunk) = body.as_ref() {
            ctx.json_len += chunk.len();
            if ctx.json_response && ctx.json_len <= MAX_USAGE_BODY {
                ctx.json_body.push(chunk.clone());
            }
        }
        Ok(None)
    }
}

/// What the call used: the usage the upstream reported, else an estimate from what was
/// streamed (one token per SSE event; a quarter of a JSON body's bytes; nothing for other
/// bodies). When the stream was `cut_short` (the client left), a reported completion count is
/// only a lower bound (Anthropic reports 1 output token at the start), so the larger of the two
/// is used. The flag says whether usage was reported.
pub(super) fn final_usage(ctx: &GateCtx, cut_short: bool) -> (Usage, bool) {
    {
        let reported = match &ctx.sse {
            Some(t) => t.usage(),
            None if ctx.json_len > 0 && ctx.json_len <= MAX_USAGE_BODY => {
                if ctx.json_body.len() == 1 {
                    crate::usage::usage_from_json(&ctx.json_body[0])
                } else {
                    crate::usage::usage_from_json(&ctx.json_body.concat())
                }
            }
            None => PartialUsage::default(),
        };
        let streamed = match &ctx.sse {
            // One token per streamed event is close for OpenAI-style streams.
            Some(t) => t.events(),
            None if ctx.json_response => (ctx.json_len as u64) / 4,
            None => 0,
        };
        if let Some(mut u) = reported.usage() {
            if cut_short {
                u.completion_tokens = u.completion_tokens.max(streamed);
            }
            return (u, true);
        }
        (
            Usage {
                prompt_tokens: ctx.estimate.prompt_tokens,
                completion_tokens: streamed,
            },
            false,
        )
    }
}

/// The price of `u` for `key` under `rule` (0 when the model has no price).
pub(super) fn price_of(
    table: &KeyTable,
    key: &KeyRecord,
    rule: Option<PriceRule>,
    u: Usage,
) -> i64 {
    rule.map_or(0, |r| {
        pricing::quota_for(r, table.group_of(key).ratio, table.quota_per_unit, u)
    })
}
