//! Settling a call's reservation exactly once, and its usage record.

use super::response::{final_usage, price_of};
use super::{Gate, GateCtx, Outcome};
use crate::core::metrics::model_label;
use crate::core::pricing::Usage;
use crate::usage::UsageRecord;
use pingora::{Error, ErrorType};
use std::time::Instant;

impl Gate {
    /// Settle the reservation exactly once: a refund when the upstream failed or answered with
    /// an error, otherwise the price of what was used; then the usage record and the metrics.
    pub(super) fn settle(&self, e: Option<&Error>, ctx: &mut GateCtx, finished: Instant) {
        let Some(reservation) = ctx.reservation.take() else {
            return;
        };
        // The table is shared (an `Arc`): the key and its group are borrowed from it.
        let (Some(table), Some(slot)) = (ctx.table.clone(), ctx.key.map(|k| k.slot)) else {
            return;
        };
        let Some(key) = table.at_slot(slot) else {
            return;
        };
        let client_gone = e.is_some_and(is_client_gone);
        let m = &self.inner.metrics;
        let group = &*table.group_of(key).name;
        let (usage, quota, status) = if ctx.status == 0 || ctx.status >= 400 {
            drop(reservation);
            let status = match (ctx.status, ctx.outcome) {
                (0, Outcome::Failed(r)) => r.status(),
                (0, _) if client_gone => 499,
                (0, _) => 502,
                (s, _) => s,
            };
            (Usage::default(), 0, status)
        } else {
            let (usage, reported) = final_usage(ctx, client_gone || e.is_some());
            if !reported && !client_gone && e.is_none() {
                m.usage_missing.inc();
            }
            let quota = price_of(&table, key, ctx.price, usage);
            self.charge(reservation, quota, &table, key, ctx.started_at);
            let status = if client_gone { 499 } else { ctx.status };
            (usage, quota, status)
        };
        ctx.charged = Some((usage, quota));
        ctx.settled_status = Some(status);
        if let Some(mut hold) = ctx.limit_hold.take() {
            // tpm: the estimate taken at admission becomes the real count; the concurrency
            // slots are released as the hold drops.
            hold.settle_tokens(
                usage.prompt_tokens + usage.completion_tokens,
                crate::ledger::limits::mono_ns(),
            );
        }
        let series = m.call_series(model_label(&table, ctx.model.as_deref()), group);
        series.quota.inc_by(quota.max(0) as u64);
        series.prompt_tokens.inc_by(usage.prompt_tokens);
        series.completion_tokens.inc_by(usage.completion_tokens);
        ctx.series = Some(series);
        if let Some(log) = &self.inner.usage_log {
            let created_at = ctx.unix_at(finished);
            log.record(&UsageRecord {
                created_at,
                request_id: ctx
                    .request_id
                    .as_ref()
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or(""),
                key_id: key.id,
                key_name: &key.name,
                group,
                model: ctx.model.as_deref().unwrap_or(""),
                prompt_tokens: usage.prompt_tokens,
                completion_tokens: usage.completion_tokens,
                quota,
                is_stream: ctx.sse.is_some(),
                status,
                duration_ms: ctx.ms_since_start(Some(finished)).unwrap_or(0),
                first_byte_ms: ctx.ms_since_start(ctx.first_byte),
                target: self.target_label(ctx),
                attempts: ctx.attempts,
            });
        }
    }
}

impl Gate {
    /// The label of the target of the call's last attempt (`None`: no target was tried), as
    /// the access log, the usage log and the usage store record it.
    pub(super) fn target_label(&self, ctx: &GateCtx) -> Option<&str> {
        let u = self.inner.upstreams.get(ctx.upstream?)?;
        Some(u.targets.get(ctx.target?)?.label.as_str())
    }
}

/// Whether `e` means the client went away (closed, reset, or stopped reading).
pub fn is_client_gone(e: &Error) -> bool {
    matches!(e.esource(), pingora::ErrorSource::Downstream)
        && matches!(
            e.etype(),
            ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError
        )
}
