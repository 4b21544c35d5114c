//! `GET /api/usage/token/detail` (SPEC §7): keygate's own view of a key, next to the
//! new-api-compatible `/api/usage/token/`: the key's and its account's lifetime quota, period
//! budget and each rate limit.

use super::Gate;
use crate::core::accounts::budget_ledger_id;
use crate::core::budget::Budget;
use crate::core::clock::unix_now;
use crate::core::limits::{retry_after_secs, Limits};
use crate::core::table::{KeyRecord, KeyTable};
use crate::ledger::limits::mono_ns;
use serde_json::{json, Value};

impl Gate {
    /// The detail answer for `key`.
    pub(super) fn detail_answer(&self, table: &KeyTable, key: &KeyRecord) -> Vec<u8> {
        let now = unix_now();
        let policy = key.policy.as_deref();
        let key_part = json!({
            "id": key.id,
            "name": &*key.name,
            "quota": self.quota_json(key.id, key.unlimited_quota, key.quota, key.used),
            "budget": policy
                .and_then(|p| p.budget.as_ref())
                .map(|b| self.budget_json(key.id, b, now)),
            "limits": self.limits_json(key.id, policy.map(|p| p.limits).unwrap_or_default()),
        });
        let account = table.account_of(key).map(|a| {
            json!({
                "id": &*a.id,
                "name": &*a.name,
                "status": if a.status == crate::core::config::KeyStatus::Enabled { "enabled" } else { "disabled" },
                "quota": self.quota_json(a.ledger_id, a.unlimited_quota, a.quota, a.used),
                "budget": a.budget.as_ref().map(|b| self.budget_json(a.ledger_id, b, now)),
                "limits": self.limits_json(a.ledger_id, a.limits),
            })
        });
        json!({"object": "token_usage_detail", "key": key_part, "account": account})
            .to_string()
            .into_bytes()
    }

    fn quota_json(&self, id: u64, unlimited: bool, quota: i64, used: i64) -> Value {
        let used = used.saturating_add(self.inner.ledger.consumed(id));
        json!({
            "unlimited": unlimited,
            "total_granted": quota,
            "total_used": used,
            "total_available": if unlimited { Value::Null } else { json!(quota.saturating_sub(used)) },
        })
    }

    fn budget_json(&self, scope: u64, b: &Budget, now: i64) -> Value {
        let w = b.window(now);
        let spent: i64 = std::iter::once(w.current)
            .chain(w.earlier.iter().copied())
            .map(|start| self.inner.ledger.consumed(budget_ledger_id(scope, start)))
            .sum();
        json!({
            "period": b.describe().split(':').next().unwrap_or(""),
            "timezone": &*b.timezone,
            "amount": b.amount,
            "spent": spent,
            "remaining": b.amount.saturating_sub(spent).max(0),
            "resets_at": w.resets_at,
        })
    }

    fn limits_json(&self, id: u64, l: Limits) -> Value {
        let now = mono_ns();
        let live = self.inner.limits.peek(id);
        let mut out = serde_json::Map::new();
        if let Some(rpm) = l.rpm {
            let (left, reset) = live
                .as_ref()
                .map_or((u64::from(rpm), 0), |s| s.requests(rpm, now));
            out.insert("rpm".into(), one(rpm, left, reset));
        }
        if let Some(tpm) = l.tpm {
            let (left, reset) = live
                .as_ref()
                .map_or((u64::from(tpm), 0), |s| s.tokens(tpm, now));
            out.insert("tpm".into(), one(tpm, left, reset));
        }
        if let Some(c) = l.concurrency {
            let inflight = live.as_ref().map_or(0, |s| s.inflight());
            out.insert(
                "concurrency".into(),
                json!({"limit": c, "remaining": (i64::from(c) - inflight).max(0), "reset_seconds": 0}),
            );
        }
        Value::Object(out)
    }
}

fn one(limit: u32, left: u64, reset_ns: i64) -> Value {
    let reset = if reset_ns > 0 {
        retry_after_secs(reset_ns)
    } else {
        0
    };
    json!({"limit": limit, "remaining": left, "reset_seconds": reset})
}
