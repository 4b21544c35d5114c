//! Attempts on a pool's targets: phase `upstream_peer` chooses the target, and the failure
//! phases (`fail_to_connect`, `error_while_proxy`, and a retryable status caught in
//! `response_filter`) decide whether another target is tried. Nothing is retried once a byte
//! of the response has reached the client.
//!
//! How a status becomes a retry in Pingora 0.9: the upstream's response head goes through
//! `upstream_response_filter` and `response_filter` before anything is written downstream
//! (`proxy_h1.rs`, `process_upstream_tasks`: the filters run, then `write_response_tasks`).
//! An error returned from `response_filter` ends the attempt before the write; Pingora hands
//! it to `error_while_proxy`, and retries (calling `upstream_peer` again) when the error is
//! marked retryable. Pingora's default `error_while_proxy` refuses to retry a non-idempotent
//! request, so a host embedding [`Gate`] calls [`Gate::error_while_proxy`] and
//! [`Gate::fail_to_connect`] from its own for retries to happen; without them a failed attempt
//! ends the request with a 502, as before pools.

use super::{Gate, GateCtx};
use crate::core::config::RetryOn;
use crate::core::errors::Reason;
use crate::upstream::{now_ms, parse_retry_after, Pick, Upstream};
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::HttpPeer;
use pingora::proxy::Session;
use pingora::{Error, ErrorType, Result};
use prometheus::{IntCounter, IntGauge};
use std::time::SystemTime;

/// The error `response_filter` returns to turn an answer into a retry.
pub(super) const RETRY_STATUS: &str = "keygate: status retried on another target";
/// The error `upstream_peer` returns when every target is cooling down.
pub(super) const ALL_COOLING: &str = "keygate: every target is cooling down";

/// The series of one target, resolved once.
pub(super) struct TargetSeries {
    ok: IntCounter,
    status: IntCounter,
    connect: IntCounter,
    timeout: IntCounter,
    error: IntCounter,
    cooldowns: IntCounter,
    up: IntGauge,
}

/// The series of one pool.
pub(super) struct PoolSeries {
    targets: Vec<TargetSeries>,
    /// Retries by reason: connect, timeout, status, error.
    retries: [IntCounter; 4],
}

impl PoolSeries {
    pub(super) fn new(m: &crate::core::metrics::Metrics, u: &Upstream) -> PoolSeries {
        let name = u.name.as_str();
        let targets = u
            .targets
            .iter()
            .map(|t| {
                let a = |r: &str| m.upstream_attempts.with_label_values(&[name, &t.label, r]);
                TargetSeries {
                    ok: a("ok"),
                    status: a("status"),
                    connect: a("connect"),
                    timeout: a("timeout"),
                    error: a("error"),
                    cooldowns: m.upstream_cooldowns.with_label_values(&[name, &t.label]),
                    up: m.upstream_target_up.with_label_values(&[name, &t.label]),
                }
            })
            .collect();
        let r = |r: &str| m.upstream_retries.with_label_values(&[name, r]);
        PoolSeries {
            targets,
            retries: [r("connect"), r("timeout"), r("status"), r("error")],
        }
    }
}

/// Why an attempt failed.
#[derive(Clone, Copy)]
enum Failure {
    Connect,
    Timeout,
    Status(u16),
    Error,
}

impl Gate {
    /// Phase `upstream_peer`: the target for this attempt (by priority and weight, avoiding
    /// those already tried while others remain).
    pub fn upstream_peer(&self, ctx: &mut GateCtx) -> Result<Box<HttpPeer>> {
        let u = ctx
            .upstream
            .and_then(|i| self.inner.upstreams.get(i))
            .ok_or_else(|| {
                Error::explain(
                    ErrorType::InternalError,
                    "upstream_peer called for a request the gate did not admit",
                )
            })?;
        let i = match ctx.first_target.take() {
            Some(i) => i,
            None => match ctx.target.map_or_else(
                || u.select(ctx.tried),
                |failed| u.select_retry(ctx.tried, failed),
            ) {
                Pick::Target(i) => i,
                Pick::Cooling(until) => {
                    ctx.retry_after = Some(seconds_until(until));
                    return Err(Error::explain(ErrorType::Custom(ALL_COOLING), ALL_COOLING));
                }
            },
        };
        let t = &u.targets[i];
        ctx.target = Some(i);
        ctx.tried |= 1 << i;
        ctx.attempts += 1;
        ctx.body_sent = false;
        ctx.attempt_body = match (ctx.model.as_deref(), &ctx.body) {
            (Some(m), Some(body)) if ctx.facts.is_json => {
                t.mapped_model(m).and_then(|to| rename_model(body, to))
            }
            _ => None,
        };
        Ok(t.peer())
    }

    /// Choose the first attempt's target while admitting the request: every target cooling
    /// down is refused here (429 `upstream_rate_limited`), before any quota is reserved.
    pub(super) fn choose_first_target(&self, ctx: &mut GateCtx) -> std::result::Result<(), u64> {
        let Some(u) = ctx.upstream.and_then(|i| self.inner.upstreams.get(i)) else {
            return Ok(());
        };
        u.retry.note_request();
        match u.select(0) {
            Pick::Target(i) => {
                ctx.first_target = Some(i);
                Ok(())
            }
            Pick::Cooling(until) => {
                let secs = seconds_until(until);
                ctx.retry_after = Some(secs);
                Err(secs)
            }
        }
    }

    /// Phase `fail_to_connect`: the target could not be reached; marks the error retryable
    /// when the pool's policy and budget allow another attempt.
    pub fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut GateCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let failure = match e.etype() {
            ErrorType::ConnectTimedout => Failure::Timeout,
            _ => Failure::Connect,
        };
        let retry = self.attempt_failed(ctx, failure);
        e.set_retry(retry);
        e
    }

    /// Phase `error_while_proxy`: an attempt failed after connecting. Retried (on another
    /// target) only while nothing of the response has reached the client; the whole body is
    /// sent again ([`Gate::request_body_filter`]).
    pub fn error_while_proxy(
        &self,
        _peer: &HttpPeer,
        session: &mut Session,
        mut e: Box<Error>,
        ctx: &mut GateCtx,
        _client_reused: bool,
    ) -> Box<Error> {
        if matches!(e.etype(), ErrorType::Custom(RETRY_STATUS)) {
            return e; // decided in `response_filter`
        }
        // `answer_final`: the head was taken (and the request body may be gone).
        let answered =
            session.response_written().is_some() || ctx.first_byte.is_some() || ctx.answer_final;
        if answered || matches!(e.esource(), pingora::ErrorSource::Downstream) {
            if answered && matches!(e.esource(), pingora::ErrorSource::Upstream) {
                self.count_failure(ctx, Failure::Error);
            }
            e.set_retry(false);
            return e;
        }
        let failure = match e.etype() {
            ErrorType::ReadTimedout | ErrorType::WriteTimedout | ErrorType::ConnectTimedout => {
                Failure::Timeout
            }
            // Closed or reset before the response head: as good as not connected.
            ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError => {
                Failure::Connect
            }
            _ => Failure::Error,
        };
        let retry = self.attempt_failed(ctx, failure);
        e.set_retry(retry);
        e
    }

    /// In `response_filter`, before anything is written downstream: count the answer, take a
    /// `Retry-After` as a cooldown, and turn a retryable status into a retry when another
    /// attempt is allowed.
    pub(super) fn judge_answer(&self, resp: &ResponseHeader, ctx: &mut GateCtx) -> Result<()> {
        let (Some(ui), Some(ti)) = (ctx.upstream, ctx.target) else {
            return Ok(());
        };
        let (Some(u), Some(series)) =
            (self.inner.upstreams.get(ui), self.inner.pool_series.get(ui))
        else {
            return Ok(());
        };
        let (t, s) = (&u.targets[ti], &series.targets[ti]);
        let status = resp.status.as_u16();
        if status != 429 && status < 500 {
            t.state.succeeded();
            s.ok.inc();
            return Ok(());
        }
        if matches!(status, 429 | 503) {
            let after = resp
                .headers
                .get(http::header::RETRY_AFTER)
                .and_then(|v| parse_retry_after(v.as_bytes(), SystemTime::now()));
            if let Some(d) = after {
                if t.state.cool_down(d) {
                    s.cooldowns.inc();
                }
            }
        }
        if self.attempt_failed(ctx, Failure::Status(status)) {
            let mut e = Error::explain(ErrorType::Custom(RETRY_STATUS), RETRY_STATUS).into_up();
            e.set_retry(true);
            return Err(e);
        }
        Ok(())
    }

    /// Count a failed attempt on its target and decide whether another one is made.
    fn attempt_failed(&self, ctx: &mut GateCtx, failure: Failure) -> bool {
        self.count_failure(ctx, failure);
        let (Some(u), Some(series)) = (
            ctx.upstream.and_then(|i| self.inner.upstreams.get(i)),
            ctx.upstream.and_then(|i| self.inner.pool_series.get(i)),
        ) else {
            return false;
        };
        let (on, reason) = match failure {
            Failure::Connect => (Some(RetryOn::Connect), 0),
            Failure::Timeout => (Some(RetryOn::Timeout), 1),
            Failure::Status(s) => (Some(RetryOn::Status(s)), 2),
            Failure::Error => (None, 3),
        };
        let retry = on.is_some_and(|on| u.retry.covers(on))
            && ctx.attempts < u.retry.attempts
            && ctx.target.is_some_and(|t| u.has_other(1 << t))
            && u.retry.take_retry();
        if retry {
            series.retries[reason].inc();
        }
        retry
    }

    /// The attempt counted on its target, and its health told.
    fn count_failure(&self, ctx: &GateCtx, failure: Failure) {
        let (Some(ui), Some(ti)) = (ctx.upstream, ctx.target) else {
            return;
        };
        let (Some(u), Some(series)) =
            (self.inner.upstreams.get(ui), self.inner.pool_series.get(ui))
        else {
            return;
        };
        let s = &series.targets[ti];
        match failure {
            Failure::Connect => s.connect.inc(),
            Failure::Timeout => s.timeout.inc(),
            Failure::Status(_) => s.status.inc(),
            Failure::Error => s.error.inc(),
        }
        // A 429 says the target is busy, not broken: only its cooldown keeps it away.
        if !matches!(failure, Failure::Status(429)) {
            u.targets[ti].state.failed(u.eject_after);
        }
    }

    /// Bring `keygate_upstream_target_up` up to date (at scrape time).
    pub fn observe_targets(&self) {
        for (u, series) in self.inner.upstreams.iter().zip(&self.inner.pool_series) {
            for (t, s) in u.targets.iter().zip(&series.targets) {
                s.up.set(i64::from(t.state.in_service()));
            }
        }
    }
}

/// Whole seconds from now to `until` (a [`now_ms`] time), at least 1.
fn seconds_until(until: u64) -> u64 {
    until.saturating_sub(now_ms()).div_ceil(1000).max(1)
}

/// `body` with its top-level `model` set to `to`; `None` when it is not a JSON object.
fn rename_model(body: &[u8], to: &str) -> Option<Bytes> {
    let mut v: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(body).ok()?;
    v.insert("model".into(), serde_json::Value::String(to.to_string()));
    serde_json::to_vec(&v).ok().map(Bytes::from)
}

/// The reason keygate's own answer gives when `e` is the "every target cooling" error.
pub(super) fn cooling_reason(e: &Error) -> Option<Reason> {
    matches!(e.etype(), ErrorType::Custom(ALL_COOLING)).then_some(Reason::UpstreamRateLimited)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_is_renamed_and_the_rest_kept() {
        let b = rename_model(
            br#"{"model":"fast","messages":[{"role":"user","content":"hi"}],"stream":true}"#,
            "qwen2.5-7b-instruct",
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["model"], "qwen2.5-7b-instruct");
        assert_eq!(v["messages"][0]["content"], "hi");
        assert_eq!(v["stream"], true);
        assert!(rename_model(b"[1,2]", "x").is_none());
    }
}
