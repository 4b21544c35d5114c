//! The answers keygate gives itself for an admitted key, never proxied: `/v1/models`, the
//! new-api usage endpoint and the OpenAI legacy billing endpoints (SPEC §3).

use super::{Gate, GateCtx};
use crate::core::errors::{Denial, Reason};
use crate::core::policy;
use crate::core::table::{KeyRecord, KeyTable};
use pingora::http::RequestHeader;

impl Gate {
    /// Answers keygate gives itself for an admitted key: `GET /v1/models[/{id}]`.
    pub(super) fn local_answer(&self, req: &RequestHeader, ctx: &GateCtx) -> Option<Vec<u8>> {
        if req.method != http::Method::GET {
            return None;
        }
        let path = req.uri.path();
        let (table, key) = (ctx.table.as_ref()?, ctx.key_record()?);
        if path == "/api/usage/token/detail" {
            return Some(self.detail_answer(table, key));
        }
        if is_usage_path(path) {
            return Some(self.usage_answer(path, table, key));
        }
        if path == "/v1/models" || path == "/v1/models/" {
            let data: Vec<_> = self
                .models_for(table, key)
                .into_iter()
                .map(|(id, owner)| model_object(&id, owner))
                .collect();
            let v = serde_json::json!({"object": "list", "data": data});
            return Some(v.to_string().into_bytes());
        }
        let id = path.strip_prefix("/v1/models/")?;
        if id.contains(':') || id.is_empty() {
            return None;
        }
        let owner = self
            .models_for(table, key)
            .into_iter()
            .find(|(m, _)| m == id)
            .map(|(_, owner)| owner);
        Some(match owner {
            Some(owner) => model_object(id, owner).to_string().into_bytes(),
            None => Denial::with_message(
                Reason::ModelNotFound,
                format!(
                    "The model {:?} does not exist or you do not have access to it.",
                    id
                ),
            )
            .body(ctx.shape),
        })
    }

    /// `/api/usage/token/` (byte-compatible with new-api: Go's sorted map keys, no trailing
    /// newline) and the OpenAI legacy billing answers (USD = units / quota_per_unit).
    pub(super) fn usage_answer(&self, path: &str, table: &KeyTable, key: &KeyRecord) -> Vec<u8> {
        let consumed = self.inner.ledger.consumed(key.id);
        let used = key.used.saturating_add(consumed);
        let qpu = table.quota_per_unit;
        let expires = key.expires_at.unwrap_or(0);
        if path.starts_with("/api/usage/token") {
            let limits: serde_json::Map<String, serde_json::Value> = key
                .models
                .as_ref()
                .map(|m| m.names())
                .unwrap_or_default()
                .into_iter()
                .map(|n| (n, serde_json::Value::Bool(true)))
                .collect();
            let v = serde_json::json!({
                "code": true,
                "message": "ok",
                "data": {
                    "object": "token_usage",
                    "name": &*key.name,
                    "total_granted": key.quota,
                    "total_used": used,
                    "total_available": key.quota.saturating_sub(used),
                    "unlimited_quota": key.unlimited_quota,
                    "model_limits": limits,
                    "model_limits_enabled": key.models.is_some(),
                    "expires_at": expires,
                }
            });
            return go_escape(v.to_string());
        }
        if path.ends_with("/subscription") {
            let amount = if key.unlimited_quota {
                100_000_000.0
            } else {
                key.quota as f64 / qpu
            };
            let a = go_float(amount);
            return format!(
                "{{\"object\":\"billing_subscription\",\"has_payment_method\":true,\"soft_limit_usd\":{a},\"hard_limit_usd\":{a},\"system_hard_limit_usd\":{a},\"access_until\":{expires}}}"
            )
            .into_bytes();
        }
        format!(
            "{{\"object\":\"list\",\"total_usage\":{}}}",
            go_float(used as f64 / qpu * 100.0)
        )
        .into_bytes()
    }

    /// The models a key may use and that an upstream serves, with the upstream's name. Only
    /// exact names can be listed: wildcards are expanded against every name the sync file and
    /// the upstreams mention.
    pub fn models_for<'a>(
        &'a self,
        table: &'a KeyTable,
        key: &'a KeyRecord,
    ) -> Vec<(String, &'a str)> {
        let group = table.group_of(key);
        let mut names: std::collections::BTreeSet<&str> = table.priced_models().collect();
        if let Some(m) = &key.models {
            names.extend(m.exact_names());
        }
        if let Some(m) = &group.models {
            names.extend(m.exact_names());
        }
        for u in self.inner.upstreams.iter() {
            names.extend(u.exact_models());
        }
        names
            .into_iter()
            .filter(|m| policy::model_allowed(key, group, m))
            .filter_map(|m| {
                let u = self.inner.upstreams.route(m)?;
                let name = self
                    .inner
                    .upstreams
                    .get(u)
                    .map_or("keygate", |u| u.name.as_str());
                Some((m.to_string(), name))
            })
            .collect()
    }
}

/// The read-only usage endpoints (SPEC §3), answered by keygate; expired and exhausted keys may
/// read them.
pub fn is_usage_path(path: &str) -> bool {
    matches!(
        path,
        "/api/usage/token/"
            | "/api/usage/token"
            | "/v1/dashboard/billing/subscription"
            | "/v1/dashboard/billing/usage"
            | "/dashboard/billing/subscription"
            | "/dashboard/billing/usage"
            | "/api/usage/token/detail"
            | "/api/usage/token/stats"
            | "/api/log/token"
            | "/api/log/token/"
    )
}

/// A number the way Go's `encoding/json` writes a float64 (new-api's billing answers): integral
/// values without a decimal point, shortest round-trip digits, exponent form outside
/// [1e-6, 1e21).
pub fn go_float(x: f64) -> String {
    if !x.is_finite() {
        return "0".into();
    }
    let a = x.abs();
    if a == 0.0 || (1e-6..1e21).contains(&a) {
        return format!("{x}");
    }
    let e = format!("{x:e}");
    match e.split_once('e') {
        Some((m, exp)) => {
            let (sign, digits) = match exp.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', exp),
            };
            format!("{m}e{sign}{digits:0>2}")
        }
        None => e,
    }
}

/// Go's `encoding/json` escapes `<`, `>`, `&`, U+2028 and U+2029 inside strings.
pub(super) fn go_escape(json: String) -> Vec<u8> {
    if !json.contains(['<', '>', '&', '\u{2028}', '\u{2029}']) {
        return json.into_bytes();
    }
    json.replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
        .replace('\u{2028}', "\\u2028")
        .replace('\u{2029}', "\\u2029")
        .into_bytes()
}

pub(super) fn model_object(id: &str, owner: &str) -> serde_json::Value {
    serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": owner})
}

impl Gate {
    /// The key-holder routes (`/api/usage/token/`, `/detail`, `/api/log/token`,
    /// `/api/usage/token/stats`) for `key`, looked up in `table` by the caller: how the admin
    /// listener answers them (SPEC §9). `None` when `req` is none of them.
    pub async fn key_holder_answer(
        &self,
        req: &RequestHeader,
        table: &KeyTable,
        key: &KeyRecord,
    ) -> Option<(u16, Vec<u8>)> {
        if req.method != http::Method::GET {
            return None;
        }
        let path = req.uri.path();
        let known = path == "/api/usage/token/detail"
            || is_usage_path(path)
            || super::store::is_store_path(path);
        if !known {
            return None;
        }
        if !self.inner.ledger.refresh(key.id).await {
            let d = Denial::new(Reason::QuotaBackendUnavailable);
            return Some((d.status(), d.body(crate::core::errors::ErrorShape::OpenAi)));
        }
        if let Some(a) = self.store_answer(req, key).await {
            return Some(a);
        }
        if path == "/api/usage/token/detail" {
            return Some((200, self.detail_answer(table, key)));
        }
        Some((200, self.usage_answer(path, table, key)))
    }
}
