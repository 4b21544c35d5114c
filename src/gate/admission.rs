//! Phase `request_filter`: the checks in the spec's order, the body read, the model, the
//! upstream and the quota reservation. A refusal is a [`Denial`] value, written by
//! [`super::answer`].

use super::body::BodyError;
use super::local::is_usage_path;
use super::response::price_of;
use super::{Gate, GateCtx, Outcome};
use crate::core::admission::{admit_key_for, find_model};
use crate::core::clock::unix_secs;
use crate::core::errors::{Denial, ErrorShape, Reason};
use crate::core::policy;
use crate::core::pricing::{self, PriceRule};
use crate::core::table::{KeyRecord, KeyTable};
use crate::ledger::ReserveError;
use crate::upstream::Upstreams;
use pingora::http::RequestHeader;
use pingora::proxy::Session;
use pingora::Result;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant, SystemTime};

/// The model checks: allowed for the key and its group, then served by an upstream.
/// Returns the upstream's index. Pure.
#[inline]
pub fn admit_model(
    table: &KeyTable,
    key: &KeyRecord,
    upstreams: &Upstreams,
    model: &str,
) -> std::result::Result<usize, Denial> {
    policy::check_model(key, table.group_of(key), model)?;
    upstreams.route(model).ok_or_else(|| {
        Denial::with_message(
            Reason::ModelNotFound,
            format!(
                "The model {:?} is not served by this gateway.",
                model.chars().take(64).collect::<String>()
            ),
        )
    })
}

impl Gate {
    /// Phase `request_filter`: every check, the body read, the model and the upstream.
    /// Returns `Ok(true)` when keygate has answered (a refusal or a local endpoint).
    pub async fn request_filter(&self, session: &mut Session, ctx: &mut GateCtx) -> Result<bool> {
        let started = Instant::now();
        let now = SystemTime::now();
        ctx.started = Some(started);
        ctx.started_at = Some(now);
        // Pingora keeps an HTTP/1.1 connection open without limit once a request is read.
        if let Some(idle) = self.inner.options.keepalive_timeout_seconds {
            if session.get_keepalive().is_some() {
                session.set_keepalive(Some(idle));
            }
        }
        let req = session.req_header();
        ctx.request_id = Some(self.request_id_for(req));
        ctx.shape = ErrorShape::for_path(req.uri.path());
        ctx.embedding = req.uri.path().ends_with("/embeddings");
        let table = self.inner.table.load_full();
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |a| a.ip());
        let req = session.req_header();
        let read_only = req.method == http::Method::GET && is_usage_path(req.uri.path());
        let admitted = admit_key_for(
            &table,
            &req.headers,
            req.uri.query(),
            peer,
            &self.inner.options.trusted_proxies,
            (!read_only).then(|| unix_secs(now)),
        );
        ctx.table = Some(table);
        match admitted {
            Ok(k) => ctx.key = Some(k),
            Err(d) => {
                ctx.gate_time += started.elapsed();
                return self.deny(session, ctx, d).await;
            }
        }

        if read_only {
            if let Some(id) = ctx.key_id() {
                if !self.inner.ledger.refresh(id).await {
                    // Usage that only this gateway knows of would be wrong, not stale.
                    let d = Denial::new(Reason::QuotaBackendUnavailable);
                    return self.deny(session, ctx, d).await;
                }
            }
        }
        if let Some(key) = ctx.key_record() {
            if let Some((status, answer)) = self.store_answer(session.req_header(), key).await {
                ctx.outcome = Outcome::Local;
                ctx.gate_time += started.elapsed();
                self.write_answer(session, ctx, status, answer).await?;
                return Ok(true);
            }
        }
        if let Some(answer) = self.local_answer(session.req_header(), ctx) {
            ctx.outcome = Outcome::Local;
            ctx.gate_time += started.elapsed();
            self.write_answer(session, ctx, 200, answer).await?;
            return Ok(true);
        }

        // Time spent waiting for the body is not keygate's: it is taken out of the gate time.
        let mut waited = Duration::ZERO;
        let body = match self.read_body(session, &mut waited).await {
            Ok(b) => b,
            Err(e) => {
                ctx.gate_time += started.elapsed().saturating_sub(waited);
                match e {
                    BodyError::Denied(d) => return self.deny(session, ctx, d).await,
                    BodyError::Fault(e) => return Err(e),
                }
            }
        };
        let decided = self.admit_call(session.req_header(), &body, ctx);
        if let Err(d) = decided {
            ctx.gate_time += started.elapsed().saturating_sub(waited);
            return self.deny(session, ctx, d).await;
        }
        if let Err(secs) = self.choose_first_target(ctx) {
            ctx.gate_time += started.elapsed().saturating_sub(waited);
            let d = Denial::with_message(
                Reason::UpstreamRateLimited,
                format!("Every upstream for this model is rate limited; retry in {secs} s."),
            );
            return self.deny(session, ctx, d).await;
        }
        let body = self.maybe_ask_for_usage(session.req_header(), body, ctx);
        if !body.is_empty() {
            ctx.body = Some(body);
        }
        ctx.gate_time += started.elapsed().saturating_sub(waited);
        match self.reserve(ctx).await {
            Ok(()) => {
                ctx.outcome = Outcome::Admitted;
                Ok(false)
            }
            Err(d) => self.deny(session, ctx, d).await,
        }
    }

    /// Price the call and reserve its estimate on the key's counter (one atomic operation).
    pub(super) async fn reserve(&self, ctx: &mut GateCtx) -> std::result::Result<(), Denial> {
        // The table is shared (an `Arc`): the key is borrowed from it, not copied.
        let (Some(table), Some(slot), Some(model)) = (
            ctx.table.clone(),
            ctx.key.map(|k| k.slot),
            ctx.model.as_deref(),
        ) else {
            return Err(Denial::new(Reason::InvalidApiKey));
        };
        let Some(key) = table.at_slot(slot) else {
            return Err(Denial::new(Reason::InvalidApiKey));
        };
        let rule = table.price(model).and_then(PriceRule::from_entry);
        if rule.is_none() && !key.unlimited_quota {
            return Err(Denial::with_message(
                Reason::ModelNotPriced,
                format!(
                    "The model {:?} has no price on this gateway.",
                    model.chars().take(64).collect::<String>()
                ),
            ));
        }
        ctx.price = rule;
        let default_completion = if ctx.path_hint() {
            0
        } else {
            self.inner.options.default_max_tokens
        };
        let body_len = ctx.body.as_ref().map_or(0, |b| b.len());
        ctx.estimate = pricing::estimate(
            body_len,
            ctx.facts.is_json,
            ctx.facts.max_tokens,
            default_completion,
        );
        let amount = price_of(&table, key, ctx.price, ctx.estimate);
        if key.policy.is_some() {
            // An account, limits or a budget (SPEC §7): see `accounts.rs`.
            return self.reserve_with_policy(ctx, &table, key, amount).await;
        }
        let limit = (!key.unlimited_quota).then(|| key.quota.saturating_sub(key.used));
        match self.inner.ledger.reserve(key.id, limit, amount).await {
            Ok(r) => {
                ctx.reservation = Some(r);
                Ok(())
            }
            Err(ReserveError::Insufficient { remaining }) => Err(Denial::with_message(
                Reason::InsufficientQuota,
                format!(
                    "This API key has {} quota units left; this call needs up to {amount}.",
                    remaining.max(0)
                ),
            )),
            Err(ReserveError::NotDurable | ReserveError::BackendUnavailable) => {
                Err(Denial::new(Reason::QuotaBackendUnavailable))
            }
        }
    }

    /// Model, key/group policy and routing for a request whose body has been read.
    pub(super) fn admit_call(
        &self,
        req: &RequestHeader,
        body: &[u8],
        ctx: &mut GateCtx,
    ) -> std::result::Result<(), Denial> {
        let content_type = req
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        let (model, facts) = find_model(req.uri.path(), req.uri.query(), content_type, body)?;
        ctx.facts = facts;
        let model = model.ok_or(Reason::ModelRequired)?;
        // Kept even when refused below, for the metrics (folded to `other` when unknown).
        ctx.model = Some(model.clone().into_owned());
        let (Some(table), Some(key)) = (ctx.table.as_ref(), ctx.key_record()) else {
            return Err(Denial::new(Reason::InvalidApiKey));
        };
        let upstream = admit_model(table, key, &self.inner.upstreams, &model)?;
        ctx.upstream = Some(upstream);
        Ok(())
    }
}
