//! Phase `logging`: settle, then the metrics and the access-log line.

use super::settle::is_client_gone;
use super::{Gate, GateCtx, Outcome};
use crate::core::errors::Reason;
use crate::core::metrics::model_label;
use pingora::http::RequestHeader;
use pingora::proxy::Session;
use pingora::Error;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

impl Gate {
    /// Phase `logging`: settles the reservation, writes the usage record, the metrics and the
    /// access-log line.
    pub async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut GateCtx) {
        let finished = Instant::now();
        self.settle(e, ctx, finished);
        if let (Some(id), Some(_)) = (ctx.key_id(), ctx.charged) {
            self.inner.ledger.make_committed_durable(id).await;
        }
        let m = &self.inner.metrics;
        m.gate_duration.observe(ctx.gate_time.as_secs_f64());
        if let (Some(started), Some(timer)) = (
            ctx.upstream_started,
            ctx.upstream
                .and_then(|i| self.inner.upstream_durations.get(i)),
        ) {
            timer.observe(finished.saturating_duration_since(started).as_secs_f64());
        }
        if ctx.outcome == Outcome::Admitted && e.is_some_and(|e| !is_client_gone(e)) {
            ctx.outcome = Outcome::Failed(Reason::UpstreamError);
        }
        let upstream = ctx.upstream.and_then(|i| self.inner.upstreams.get(i));
        if let Some(u) = upstream {
            let kind = match (ctx.outcome, ctx.status) {
                (Outcome::Failed(Reason::UpstreamTimeout), _) => Some("timeout"),
                (Outcome::Failed(_), 0) => Some("connect"),
                (Outcome::Failed(_), _) => Some("broken"),
                (_, s) if s >= 500 => Some("status_5xx"),
                _ => None,
            };
            if let Some(kind) = kind {
                m.upstream_errors
                    .with_label_values(&[u.name.as_str(), kind])
                    .inc();
            }
        }
        self.store_call(session, ctx, finished);
        let (outcome, reason) = ctx.outcome.label();
        match (&ctx.series, ctx.outcome) {
            (Some(series), Outcome::Admitted) => series.admitted.inc(),
            _ => {
                let (model, group) = match ctx.table.as_ref() {
                    Some(t) => (
                        model_label(t, ctx.model.as_deref()),
                        ctx.key_record().map_or("", |k| &*t.group_of(k).name),
                    ),
                    None => ("", ""),
                };
                m.count_request(outcome, reason, model, group);
            }
        }
        if self.inner.options.per_key_metrics {
            if let Some(k) = ctx.key_record() {
                let id = k.id.to_string();
                m.key_requests
                    .with_label_values(&[id.as_str(), &*k.name, outcome])
                    .inc();
                if let Some((_, quota)) = ctx.charged {
                    m.key_quota
                        .with_label_values(&[id.as_str(), &*k.name])
                        .inc_by(quota.max(0) as u64);
                }
                if let Some(a) = ctx.table.as_ref().and_then(|t| t.account_of(k)) {
                    m.account_requests
                        .with_label_values(&[&*a.id, outcome])
                        .inc();
                    if let Some((_, quota)) = ctx.charged {
                        m.account_quota
                            .with_label_values(&[&*a.id])
                            .inc_by(quota.max(0) as u64);
                    }
                }
            }
        }
        if let Some(sink) = &self.inner.access_log {
            let status = session.response_written().map_or(0, |r| r.status.as_u16());
            let ms = |t: Option<Instant>| t.map(|t| t.elapsed().as_secs_f64() * 1000.0);
            let line = serde_json::json!({
                "time": SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()),
                "request_id": ctx.request_id(),
                "method": session.req_header().method.as_str(),
                "path": session.req_header().uri.path(),
                "client_ip": ctx.client_ip().map(|ip| ip.to_string()),
                "key_id": ctx.key_id(),
                "model": ctx.model.as_deref(),
                "upstream": upstream.map(|u| u.name.as_str()),
                "target": self.target_label(ctx),
                "attempts": ctx.attempts,
                "status": status,
                "outcome": outcome,
                "reason": reason.map(|r| r.code()),
                "quota": ctx.charged.map(|(_, q)| q),
                "duration_ms": ms(ctx.started),
                "upstream_ms": ms(ctx.upstream_started),
                "gate_us": ctx.gate_time.as_secs_f64() * 1e6,
            });
            let mut bytes = b"keygate::access ".to_vec();
            if serde_json::to_writer(&mut bytes, &line).is_ok() {
                sink.line(bytes);
            }
        }
    }
}

/// A request's summary for Pingora's error and retry logs without any credential: method and
/// path only (the query may hold `key=`). Hosts embedding [`Gate`] should return this from
/// `ProxyHttp::request_summary`.
pub fn request_summary(req: &RequestHeader) -> String {
    format!("{} {}", req.method, req.uri.path())
}
