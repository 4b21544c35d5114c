//! `/admin/v1/keys…` (SPEC §8): list, create (shown once), read, change, enable, disable,
//! rotate, reveal, delete, batch delete. Account-scoped tokens see only their account's keys; a
//! key of another account answers 404, exactly like a key that does not exist.

use super::auth::Caller;
use super::http::{json, ok, ApiError, Paging, Reply, Req};
use super::Admin;
use crate::core::budget::Budget;
use crate::core::config::{BudgetEntry, KeyEntry, KeyStatus, LimitsEntry, SyncFile};
use crate::core::limits::Limits;
use crate::core::models::ModelSet;
use crate::core::table::{digest_hex, generate_key, key_digest, MAX_NAME_CHARS};
use crate::core::vault::Vault;
use crate::sync::edit::set_secret_fields;
use crate::sync::spending::{budget_view, BudgetView};
use http::StatusCode;
use serde::{Deserialize, Deserializer, Serialize};

/// The most keys one create makes.
pub const MAX_BATCH_CREATE: u32 = 100;

/// `Some(None)` for an explicit `null`, `None` when absent.
pub fn nullable<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// The fields a create or a change may set (SPEC §1 and §7). Absent: unchanged (or the
/// default); `null` clears `models`, `allow_ips`, `account`, `limits`, `budget`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyBody {
    /// ≤ 50 characters.
    pub name: Option<String>,
    /// `enabled` or `disabled`.
    pub status: Option<KeyStatus>,
    /// Units, ≥ 0.
    pub quota: Option<i64>,
    /// No cap.
    pub unlimited_quota: Option<bool>,
    /// Baseline already consumed elsewhere.
    pub used: Option<i64>,
    /// Unix seconds, or -1 for never.
    pub expires_at: Option<i64>,
    /// Allowed models (`null`: any).
    #[serde(default, deserialize_with = "nullable")]
    pub models: Option<Option<Vec<String>>>,
    /// Allowed client IPs and CIDRs (`null` or `[]`: any).
    #[serde(default, deserialize_with = "nullable")]
    pub allow_ips: Option<Option<Vec<String>>>,
    /// The group.
    pub group: Option<String>,
    /// The account.
    #[serde(default, deserialize_with = "nullable")]
    pub account: Option<Option<String>>,
    /// The key's own rate limits (replaced whole).
    #[serde(default, deserialize_with = "nullable")]
    pub limits: Option<Option<LimitsEntry>>,
    /// The key's period budget (replaced whole).
    #[serde(default, deserialize_with = "nullable")]
    pub budget: Option<Option<BudgetEntry>>,
    /// Create this many keys alike (create only; 1 to 100).
    pub count: Option<u32>,
}

impl KeyBody {
    /// The names of the fields it sets (for the audit log).
    pub fn fields(&self) -> Vec<String> {
        let set = [
            ("name", self.name.is_some()),
            ("status", self.status.is_some()),
            ("quota", self.quota.is_some()),
            ("unlimited_quota", self.unlimited_quota.is_some()),
            ("used", self.used.is_some()),
            ("expires_at", self.expires_at.is_some()),
            ("models", self.models.is_some()),
            ("allow_ips", self.allow_ips.is_some()),
            ("group", self.group.is_some()),
            ("account", self.account.is_some()),
            ("limits", self.limits.is_some()),
            ("budget", self.budget.is_some()),
        ];
        set.iter()
            .filter(|(_, s)| *s)
            .map(|(n, _)| n.to_string())
            .collect()
    }

    /// Everything that can be checked without the file.
    pub fn check(&self) -> Result<(), ApiError> {
        if let Some(n) = &self.name {
            let len = n.chars().count();
            if len > MAX_NAME_CHARS {
                return Err(ApiError::field(
                    "name",
                    format!("name is {len} characters, at most {MAX_NAME_CHARS} are allowed"),
                ));
            }
        }
        for (field, v) in [("quota", self.quota), ("used", self.used)] {
            if let Some(v) = v.filter(|v| *v < 0) {
                return Err(ApiError::field(
                    field,
                    format!("{field} is {v}; it must be >= 0"),
                ));
            }
        }
        if let Some(e) = self.expires_at.filter(|e| *e < -1) {
            return Err(ApiError::field(
                "expires_at",
                format!("expires_at {e} is neither -1 (never) nor a unix time"),
            ));
        }
        if let Some(Some(list)) = &self.models {
            ModelSet::compile(list)
                .map_err(|e| ApiError::field("models", format!("models: {e}")))?;
        }
        if let Some(Some(list)) = &self.allow_ips {
            for ip in list {
                crate::core::net::parse_cidr(ip)
                    .map_err(|e| ApiError::field("allow_ips", format!("allow_ips: {e}")))?;
            }
        }
        if let Some(Some(l)) = &self.limits {
            Limits::compile(l).map_err(|e| ApiError::field("limits", e))?;
        }
        if let Some(Some(b)) = &self.budget {
            Budget::compile(b).map_err(|e| ApiError::field("budget", e))?;
        }
        Ok(())
    }

    /// Checks against the file, then sets the fields on `k`.
    fn apply(&self, file: &SyncFile, caller: &Caller, k: &mut KeyEntry) -> Result<(), ApiError> {
        if let Some(g) = &self.group {
            if g != "default" && !file.groups.contains_key(g) {
                return Err(ApiError::field("group", format!("unknown group {g:?}")));
            }
        }
        if let Some(Some(a)) = &self.account {
            let visible = caller.account.as_ref().is_none_or(|own| own == a);
            if !visible || !file.accounts.contains_key(a) {
                return Err(ApiError::field("account", format!("unknown account {a:?}")));
            }
        }
        if let (Some(None), Some(_)) = (&self.account, &caller.account) {
            return Err(ApiError::field(
                "account",
                "an account token cannot take a key out of its account",
            ));
        }
        let b = self.clone();
        if let Some(v) = b.name {
            k.name = v;
        }
        if let Some(v) = b.status {
            k.status = v;
        }
        if let Some(v) = b.quota {
            k.quota = v;
        }
        if let Some(v) = b.unlimited_quota {
            k.unlimited_quota = v;
        }
        if let Some(v) = b.used {
            k.used = v;
        }
        if let Some(v) = b.expires_at {
            k.expires_at = if v == 0 { -1 } else { v };
        }
        if let Some(v) = b.models {
            k.models = v;
        }
        if let Some(v) = b.allow_ips {
            k.allow_ips = v.filter(|l| !l.is_empty());
        }
        if let Some(v) = b.group {
            k.group = v;
        }
        if let Some(v) = b.account {
            k.account = v;
        }
        if let Some(v) = b.limits {
            k.limits = v;
        }
        if let Some(v) = b.budget {
            k.budget = v;
        }
        Ok(())
    }
}

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
    let state = if k.status == KeyStatus::Disabled {
        "disabled"
    } else if k.expires_at > 0 && k.expires_at <= now {
        "expired"
    } else if remaining.is_some_and(|r| r <= 0) {
        "exhausted"
    } else {
        "enabled"
    };
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

/// 409 when the vault's secret is not the one the file's sealed keys were sealed with (a key
/// sealed now could never be opened together with them).
fn same_secret(file: &SyncFile, vault: Option<&Vault>) -> Result<(), ApiError> {
    match vault {
        Some(v) => crate::core::vault::check_same_secret(file, v)
            .map_err(|e| ApiError::conflict("vault_mismatch", e)),
        None => Ok(()),
    }
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

fn find_mut<'a>(
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

/// The keys `caller` sees that pass `filter`, newest first.
pub fn select<'a>(
    admin: &'a Admin,
    file: &'a SyncFile,
    caller: &'a Caller,
    filter: &'a Filter<'a>,
    now: i64,
) -> impl Iterator<Item = KeyItem> + 'a {
    let q = filter.q.map(str::to_lowercase);
    let consumed = admin.consumed_fn();
    file.keys.iter().rev().filter_map(move |k| {
        if !visible(caller, k)
            || filter.group.is_some_and(|g| g != k.group)
            || filter
                .account
                .is_some_and(|a| k.account.as_deref() != Some(a))
        {
            return None;
        }
        if let Some(q) = &q {
            let hit = k.name.to_lowercase().contains(q.as_str())
                || k.id.to_string() == *q
                || hint_of(k).is_some_and(|h| h.to_lowercase().contains(q.as_str()));
            if !hit {
                return None;
            }
        }
        let mut it = item(k, &consumed, now);
        it.revealable = admin.revealable(k);
        if filter.state.is_some_and(|s| s != it.state) {
            return None;
        }
        Some(it)
    })
}

/// `GET /admin/v1/keys`
pub async fn list(admin: &Admin, caller: &Caller, req: &Req) -> Reply {
    let paging = Paging::read(req, "page", "page_size")?;
    let state = req.query_str("state");
    if let Some(s) = state.filter(|s| !["enabled", "disabled", "expired", "exhausted"].contains(s))
    {
        return Err(ApiError::field(
            "state",
            format!("state {s:?}: one of enabled, disabled, expired, exhausted"),
        ));
    }
    let filter = Filter {
        q: req.query_str("q"),
        state,
        account: req.query_str("account"),
        group: req.query_str("group"),
    };
    let file = admin.file().await?;
    let now = crate::core::clock::unix_now();
    let mut total = 0usize;
    let skip = (paging.page - 1).saturating_mul(paging.size);
    let mut items = Vec::with_capacity(paging.size);
    for it in select(admin, &file, caller, &filter, now) {
        if total >= skip && items.len() < paging.size {
            items.push(it);
        }
        total += 1;
    }
    ok(&serde_json::json!({
        "items": items, "total": total, "page": paging.page, "page_size": paging.size,
        "revision": file.revision,
    }))
}

/// `GET /admin/v1/keys/{id}`
pub async fn get(admin: &Admin, caller: &Caller, id: u64) -> Reply {
    let file = admin.file().await?;
    let k = find(&file, caller, id)?;
    let mut it = item(k, &admin.consumed_fn(), crate::core::clock::unix_now());
    it.revealable = admin.revealable(k);
    ok(&it)
}

/// `POST /admin/v1/keys`: 201 with the key(s) and their secrets, shown this once.
pub async fn create(admin: &Admin, caller: &Caller, req: &Req) -> Reply {
    let body: KeyBody = req.json()?;
    let one = body.count.is_none();
    let created = create_many(admin, caller, req, body).await?;
    let mut out: Vec<serde_json::Value> = created
        .into_iter()
        .map(|(it, secret)| {
            let mut v = serde_json::to_value(it).unwrap_or_default();
            v["secret"] = secret.into();
            v
        })
        .collect();
    let body = if one && out.len() == 1 {
        out.remove(0)
    } else {
        serde_json::json!({ "items": out })
    };
    Ok(json(StatusCode::CREATED, &body))
}

/// Create `body.count` keys (default 1) alike; returns each with its secret (shown once).
pub async fn create_many(
    admin: &Admin,
    caller: &Caller,
    req: &Req,
    body: KeyBody,
) -> Result<Vec<(KeyItem, String)>, ApiError> {
    caller_writes(caller)?;
    body.check()?;
    let count = body.count.unwrap_or(1);
    if !(1..=MAX_BATCH_CREATE).contains(&count) {
        return Err(ApiError::field(
            "count",
            format!("count must be between 1 and {MAX_BATCH_CREATE}"),
        ));
    }
    let mut secrets = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let key = generate_key()
            .map_err(|e| ApiError::internal(format!("cannot generate a key: {e}")))?;
        secrets.push(key);
    }
    let hashes: Vec<String> = secrets
        .iter()
        .map(|k| digest_hex(&key_digest(k.as_bytes())))
        .collect();
    let fields = body.fields();
    let scope = caller.clone();
    let vault = admin.vault();
    let kept = secrets.clone();
    let (created, _rev) = admin
        .write(
            req.if_match()?,
            Box::new(move |file| {
                let secrets = &kept;
                same_secret(file, vault.as_deref())?;
                let first = crate::sync::edit::next_free_id(file);
                let mut entries = Vec::with_capacity(hashes.len());
                for (i, hash) in hashes.iter().enumerate() {
                    let mut k = KeyEntry {
                        id: first + i as u64,
                        name: String::new(),
                        key_sha256: Some(hash.clone()),
                        key: None,
                        status: KeyStatus::Enabled,
                        quota: 0,
                        unlimited_quota: false,
                        used: 0,
                        expires_at: -1,
                        models: None,
                        allow_ips: None,
                        group: "default".into(),
                        previous_keys: Vec::new(),
                        account: scope.account.clone(),
                        limits: None,
                        budget: None,
                        key_hint: None,
                        key_sealed: None,
                    };
                    set_secret_fields(&mut k, &secrets[i], vault.as_deref())
                        .map_err(ApiError::internal)?;
                    body.apply(file, &scope, &mut k)?;
                    entries.push(k);
                }
                let ids: Vec<u64> = entries.iter().map(|k| k.id).collect();
                file.next_id = Some(first + hashes.len() as u64);
                file.keys.extend(entries);
                Ok(serde_json::json!(ids))
            }),
        )
        .await?;
    let ids: Vec<u64> = serde_json::from_value(created).unwrap_or_default();
    let file = admin.file().await?;
    let consumed = admin.consumed_fn();
    let now = crate::core::clock::unix_now();
    let mut out = Vec::with_capacity(ids.len());
    for (id, secret) in ids.iter().zip(secrets) {
        admin.audit(
            caller,
            req,
            "key.create",
            format!("key:{id}"),
            fields.clone(),
        );
        if let Ok(k) = find(&file, caller, *id) {
            out.push((item(k, &consumed, now), secret));
        }
    }
    Ok(out)
}

/// 403 for a viewer.
pub fn caller_writes(caller: &Caller) -> Result<(), ApiError> {
    if caller.can_write() {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "token {:?} is a viewer: it may only read",
            caller.name
        )))
    }
}

/// `PATCH /admin/v1/keys/{id}`
pub async fn patch(admin: &Admin, caller: &Caller, req: &Req, id: u64) -> Reply {
    let body: KeyBody = req.json()?;
    update_one(admin, caller, req, id, body).await?;
    get(admin, caller, id).await
}

/// Set `body`'s fields on key `id`.
pub async fn update_one(
    admin: &Admin,
    caller: &Caller,
    req: &Req,
    id: u64,
    body: KeyBody,
) -> Result<(), ApiError> {
    caller_writes(caller)?;
    if body.count.is_some() {
        return Err(ApiError::field("count", "count is for creating keys only"));
    }
    body.check()?;
    let fields = body.fields();
    let scope = caller.clone();
    admin
        .write(
            req.if_match()?,
            Box::new(move |file| {
                let mut k = find(file, &scope, id)?.clone();
                body.apply(file, &scope, &mut k)?;
                *find_mut(file, &scope, id)? = k;
                Ok(serde_json::Value::Null)
            }),
        )
        .await?;
    admin.audit(caller, req, "key.update", format!("key:{id}"), fields);
    Ok(())
}

/// `POST /admin/v1/keys/{id}/enable|disable`
pub async fn set_status(
    admin: &Admin,
    caller: &Caller,
    req: &Req,
    id: u64,
    status: KeyStatus,
) -> Reply {
    caller_writes(caller)?;
    let scope = caller.clone();
    admin
        .write(
            req.if_match()?,
            Box::new(move |file| {
                find_mut(file, &scope, id)?.status = status;
                Ok(serde_json::Value::Null)
            }),
        )
        .await?;
    let action = match status {
        KeyStatus::Enabled => "key.enable",
        KeyStatus::Disabled => "key.disable",
    };
    admin.audit(
        caller,
        req,
        action,
        format!("key:{id}"),
        vec!["status".into()],
    );
    get(admin, caller, id).await
}

/// `DELETE /admin/v1/keys/{id}`
pub async fn delete(admin: &Admin, caller: &Caller, req: &Req, id: u64) -> Reply {
    caller_writes(caller)?;
    delete_ids(admin, caller, req, vec![id], true).await?;
    Ok(json(StatusCode::OK, &serde_json::json!({"deleted": [id]})))
}

/// Delete `ids` (those `caller` sees); with `strict`, an unknown id fails the whole call.
pub async fn delete_ids(
    admin: &Admin,
    caller: &Caller,
    req: &Req,
    ids: Vec<u64>,
    strict: bool,
) -> Result<Vec<u64>, ApiError> {
    let scope = caller.clone();
    let (deleted, _) = admin
        .write(
            req.if_match()?,
            Box::new(move |file| {
                let mut gone = Vec::new();
                for id in &ids {
                    match find(file, &scope, *id) {
                        Ok(_) => gone.push(*id),
                        Err(e) if strict => return Err(e),
                        Err(_) => {}
                    }
                }
                if gone.is_empty() {
                    return Ok(serde_json::json!([]));
                }
                file.next_id = Some(crate::sync::edit::next_free_id(file));
                file.keys.retain(|k| !gone.contains(&k.id));
                Ok(serde_json::json!(gone))
            }),
        )
        .await?;
    let deleted: Vec<u64> = serde_json::from_value(deleted).unwrap_or_default();
    for id in &deleted {
        admin.audit(caller, req, "key.delete", format!("key:{id}"), Vec::new());
    }
    Ok(deleted)
}

/// `POST /admin/v1/keys/batch-delete` `{"ids":[…]}`: ids the caller cannot see are skipped.
pub async fn batch_delete(admin: &Admin, caller: &Caller, req: &Req) -> Reply {
    caller_writes(caller)?;
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Ids {
        ids: Vec<u64>,
    }
    let body: Ids = req.json()?;
    if body.ids.is_empty() || body.ids.len() > 1000 {
        return Err(ApiError::field("ids", "ids: between 1 and 1000 ids"));
    }
    let deleted = delete_ids(admin, caller, req, body.ids, false).await?;
    ok(&serde_json::json!({ "deleted": deleted, "count": deleted.len() }))
}

/// `POST /admin/v1/keys/{id}/rotate` `{"grace_seconds":N}`: the new secret, shown once.
pub async fn rotate(admin: &Admin, caller: &Caller, req: &Req, id: u64) -> Reply {
    caller_writes(caller)?;
    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    struct Rotate {
        grace_seconds: Option<u64>,
    }
    let body: Rotate = if req.body.is_empty() {
        Rotate::default()
    } else {
        req.json()?
    };
    let key =
        generate_key().map_err(|e| ApiError::internal(format!("cannot generate a key: {e}")))?;
    let hash = digest_hex(&key_digest(key.as_bytes()));
    let now = crate::core::clock::unix_now();
    let scope = caller.clone();
    let vault = admin.vault();
    let secret = key.clone();
    admin
        .write(
            req.if_match()?,
            Box::new(move |file| {
                same_secret(file, vault.as_deref())?;
                let k = find_mut(file, &scope, id)?;
                let old = match (&k.key_sha256, &k.key) {
                    (Some(h), _) => h.clone(),
                    (None, Some(plain)) => digest_hex(&key_digest(plain.as_bytes())),
                    (None, None) => {
                        return Err(ApiError::conflict(
                            "no_key",
                            format!("key {id} has no key to rotate"),
                        ))
                    }
                };
                k.key = None;
                k.previous_keys.retain(|p| p.until > now);
                if let Some(g) = body.grace_seconds.filter(|g| *g > 0) {
                    k.previous_keys.push(crate::core::config::PreviousKey {
                        key_sha256: old,
                        until: now.saturating_add(i64::try_from(g).unwrap_or(i64::MAX)),
                    });
                }
                k.key_sha256 = Some(hash.clone());
                set_secret_fields(k, &secret, vault.as_deref()).map_err(ApiError::internal)?;
                Ok(serde_json::Value::Null)
            }),
        )
        .await?;
    admin.audit(
        caller,
        req,
        "key.rotate",
        format!("key:{id}"),
        vec!["key".into()],
    );
    let file = admin.file().await?;
    let k = find(&file, caller, id)?;
    let mut v = serde_json::to_value(item(k, &admin.consumed_fn(), now)).unwrap_or_default();
    v["secret"] = key.into();
    ok(&v)
}

/// `POST /admin/v1/keys/{id}/reveal`: the full key, from the vault (admin role, 10 a minute per
/// token, audited); 409 `not_recoverable` without one.
pub async fn reveal(admin: &Admin, caller: &Caller, req: &Req, id: u64) -> Reply {
    caller_writes(caller)?;
    admin.reveal_allowed(caller)?;
    let file = admin.file().await?;
    let k = find(&file, caller, id)?;
    let secret = admin.reveal_key(k)?;
    admin.audit(caller, req, "key.reveal", format!("key:{id}"), Vec::new());
    ok(&serde_json::json!({ "id": id, "secret": secret }))
}
