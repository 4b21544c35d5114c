//! A key as the admin API shows it, who sees which key, and one page of a filtered list.

use super::auth::Caller;
use super::http::{ApiError, Paging};
use crate::core::config::{BudgetEntry, KeyEntry, KeyStatus, LimitsEntry, SyncFile};
use crate::sync::spending::{budget_view, BudgetView};
use serde::Serialize;

/// A key as the API shows it: its fields (never a secret), its state and spending.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct KeyItem {
    /// Id.
    pub id: u64,
    /// Name.
    pub name: String,
    /// As stored: `enabled` or `disabled`.
    pub status: KeyStatus,
    /// `enabled`, `disabled`, `expired` or `exhausted`.
    pub state: &'static str,
    /// `sk-abcd…wxyz`, for keys created or rotated here.
    pub key_hint: Option<String>,
    /// Granted quota.
    pub quota: i64,
    /// No cap.
    pub unlimited_quota: bool,
    /// The baseline plus what the gateway charged.
    pub used: i64,
    /// `quota − used` (null for unlimited keys).
    pub remaining: Option<i64>,
    /// Unix seconds, -1 for never.
    pub expires_at: i64,
    /// Allowed models (null: any).
    pub models: Option<Vec<String>>,
    /// Allowed client IPs (null: any).
    pub allow_ips: Option<Vec<String>>,
    /// The group.
    pub group: String,
    /// The account.
    pub account: Option<String>,
    /// Rate limits.
    pub limits: Option<LimitsEntry>,
    /// Period budget.
    pub budget: Option<BudgetEntry>,
    /// What the budget's current period has spent, and when it resets.
    pub budget_status: Option<BudgetView>,
    /// Can the full key be shown again (sealed in the vault)?
    pub revealable: bool,
}

/// `k` as the API shows it, with what this gateway charged (`consumed` by counter id).
pub fn item(k: &KeyEntry, consumed: &dyn Fn(u64) -> i64, now: i64) -> KeyItem {
    let used = k.used + consumed(k.id);
    let remaining = (!k.unlimited_quota).then_some(k.quota - used);
    let state = k.state(consumed(k.id), now);
    KeyItem {
        id: k.id,
        name: k.name.clone(),
        status: k.status,
        state,
        key_hint: hint_of(k),
        quota: k.quota,
        unlimited_quota: k.unlimited_quota,
        used,
        remaining,
        expires_at: k.expires_at,
        models: k.models.clone(),
        allow_ips: k.allow_ips.clone().filter(|a| !a.is_empty()),
        group: k.group.clone(),
        account: k.account.clone(),
        limits: k.limits.clone(),
        budget: k.budget.clone(),
        budget_status: k
            .budget
            .as_ref()
            .and_then(|b| budget_view(k.id, b, consumed, now)),
        revealable: false,
    }
}

fn hint_of(k: &KeyEntry) -> Option<String> {
    k.key_hint
        .clone()
        .or_else(|| k.key.as_deref().map(crate::core::vault::key_hint))
}

/// Does `caller` see key `k`?
pub fn visible(caller: &Caller, k: &KeyEntry) -> bool {
    caller
        .account
        .as_ref()
        .is_none_or(|own| k.account.as_ref() == Some(own))
}

/// The key `id` as `caller` may see it (404 otherwise).
pub fn find<'a>(file: &'a SyncFile, caller: &Caller, id: u64) -> Result<&'a KeyEntry, ApiError> {
    file.keys
        .iter()
        .find(|k| k.id == id && visible(caller, k))
        .ok_or_else(|| ApiError::not_found(format!("no key {id}")))
}

pub(super) fn find_mut<'a>(
    file: &'a mut SyncFile,
    caller: &Caller,
    id: u64,
) -> Result<&'a mut KeyEntry, ApiError> {
    file.keys
        .iter_mut()
        .find(|k| k.id == id && visible(caller, k))
        .ok_or_else(|| ApiError::not_found(format!("no key {id}")))
}

/// A key id from a path segment.
pub fn parse_id(s: &str) -> Result<u64, ApiError> {
    s.parse()
        .map_err(|_| ApiError::not_found(format!("no key {s:?} (ids are integers)")))
}

/// The filters of a key list.
#[derive(Default)]
pub struct Filter<'a> {
    /// In the name (any case), or the id, or the hint.
    pub q: Option<&'a str>,
    /// `enabled|disabled|expired|exhausted`.
    pub state: Option<&'a str>,
    /// This account.
    pub account: Option<&'a str>,
    /// This group.
    pub group: Option<&'a str>,
}

/// One page of the keys `caller` sees that pass `filter`, newest first, and how many pass in
/// all. Only the filters that need it read the ledger; only the page's keys are built into
/// items (a page of 100 from a million keys is one pass over plain fields).
pub fn page<'a>(
    file: &'a SyncFile,
    caller: &Caller,
    filter: &Filter<'_>,
    consumed: &dyn Fn(u64) -> i64,
    now: i64,
    paging: Paging,
) -> (Vec<&'a KeyEntry>, usize) {
    let q = filter.q.map(str::to_lowercase);
    let id_q = filter.q.and_then(|q| q.parse::<u64>().ok());
    let skip = (paging.page - 1).saturating_mul(paging.size);
    let mut out = Vec::with_capacity(paging.size.min(file.keys.len()));
    let mut total = 0usize;
    for k in file.keys.iter().rev() {
        if !visible(caller, k)
            || filter.group.is_some_and(|g| g != k.group)
            || filter
                .account
                .is_some_and(|a| k.account.as_deref() != Some(a))
        {
            continue;
        }
        if let Some(q) = &q {
            let hit = id_q == Some(k.id)
                || contains_lower(&k.name, q)
                || hint_of(k).is_some_and(|h| contains_lower(&h, q));
            if !hit {
                continue;
            }
        }
        if filter
            .state
            .is_some_and(|s| s != k.state(consumed(k.id), now))
        {
            continue;
        }
        if total >= skip && out.len() < paging.size {
            out.push(k);
        }
        total += 1;
    }
    (out, total)
}

/// Does `text` contain `lower` (already lower case), in any case? No allocation for ASCII.
fn contains_lower(text: &str, lower: &str) -> bool {
    if text.is_ascii() && lower.is_ascii() {
        let (t, l) = (text.as_bytes(), lower.as_bytes());
        l.is_empty() || t.windows(l.len()).any(|w| w.eq_ignore_ascii_case(l))
    } else {
        text.to_lowercase().contains(lower)
    }
}
