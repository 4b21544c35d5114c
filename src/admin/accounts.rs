//! `/admin/v1/accounts…` (SPEC §8): admin-role tokens without an account scope change
//! accounts; viewers read them; account-scoped tokens get 403.

use super::auth::Caller;
use super::http::{json, ok, ApiError, Paging, Reply, Req};
use super::keys::{caller_writes, nullable};
use super::Admin;
use crate::core::accounts::account_ledger_id;
use crate::core::budget::Budget;
use crate::core::config::{AccountEntry, BudgetEntry, KeyStatus, LimitsEntry, SyncFile};
use crate::core::limits::Limits;
use crate::sync::spending::budget_view;
use http::StatusCode;
use serde::Deserialize;

/// The fields a create or change may set (SPEC §7).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountBody {
    /// The id (create only): 1 to 64 characters.
    pub id: Option<String>,
    /// Display name.
    pub name: Option<String>,
    /// `enabled` or `disabled`.
    pub status: Option<KeyStatus>,
    /// Granted quota.
    pub quota: Option<i64>,
    /// Baseline consumed elsewhere.
    pub used: Option<i64>,
    /// No lifetime cap.
    pub unlimited_quota: Option<bool>,
    /// Most keys (`null`: no limit).
    #[serde(default, deserialize_with = "nullable")]
    pub max_keys: Option<Option<i64>>,
    /// Shared rate limits.
    #[serde(default, deserialize_with = "nullable")]
    pub limits: Option<Option<LimitsEntry>>,
    /// Period budget.
    #[serde(default, deserialize_with = "nullable")]
    pub budget: Option<Option<BudgetEntry>>,
}

impl AccountBody {
    fn fields(&self) -> Vec<String> {
        [
            ("name", self.name.is_some()),
            ("status", self.status.is_some()),
            ("quota", self.quota.is_some()),
            ("used", self.used.is_some()),
            ("unlimited_quota", self.unlimited_quota.is_some()),
            ("max_keys", self.max_keys.is_some()),
            ("limits", self.limits.is_some()),
            ("budget", self.budget.is_some()),
        ]
        .iter()
        .filter(|(_, s)| *s)
        .map(|(n, _)| n.to_string())
        .collect()
    }

    fn check(&self) -> Result<(), ApiError> {
        if let Some(n) = &self.name {
            if n.chars().count() > 50 {
                return Err(ApiError::field("name", "name: at most 50 characters"));
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
        if let Some(Some(m)) = self.max_keys.filter(|m| m.is_some_and(|m| m < 0)) {
            return Err(ApiError::field(
                "max_keys",
                format!("max_keys is {m}; it must be >= 0"),
            ));
        }
        if let Some(Some(l)) = &self.limits {
            Limits::compile(l).map_err(|e| ApiError::field("limits", e))?;
        }
        if let Some(Some(b)) = &self.budget {
            Budget::compile(b).map_err(|e| ApiError::field("budget", e))?;
        }
        Ok(())
    }

    fn apply(self, a: &mut AccountEntry) {
        if let Some(v) = self.name {
            a.name = v;
        }
        if let Some(v) = self.status {
            a.status = v;
        }
        if let Some(v) = self.quota {
            a.quota = v;
        }
        if let Some(v) = self.used {
            a.used = v;
        }
        if let Some(v) = self.unlimited_quota {
            a.unlimited_quota = v;
        }
        if let Some(v) = self.max_keys {
            a.max_keys = v;
        }
        if let Some(v) = self.limits {
            a.limits = v;
        }
        if let Some(v) = self.budget {
            a.budget = v;
        }
    }
}

fn unscoped(caller: &Caller) -> Result<(), ApiError> {
    match &caller.account {
        Some(_) => Err(ApiError::forbidden(format!(
            "token {:?} is scoped to an account: accounts are managed by unscoped tokens",
            caller.name
        ))),
        None => Ok(()),
    }
}

fn view(admin: &Admin, file: &SyncFile, id: &str, a: &AccountEntry, now: i64) -> serde_json::Value {
    let consumed = admin.consumed_fn();
    let scope = account_ledger_id(id);
    let used = a.used + consumed(scope);
    serde_json::json!({
        "id": id,
        "name": a.name,
        "status": a.status,
        "quota": a.quota,
        "unlimited_quota": a.unlimited_quota,
        "used": used,
        "remaining": (!a.unlimited_quota).then_some(a.quota - used),
        "keys": file.keys.iter().filter(|k| k.account.as_deref() == Some(id)).count(),
        "max_keys": a.max_keys,
        "limits": a.limits,
        "budget": a.budget,
        "budget_status": a.budget.as_ref().and_then(|b| budget_view(scope, b, &consumed, now)),
    })
}

fn find<'a>(file: &'a SyncFile, id: &str) -> Result<&'a AccountEntry, ApiError> {
    file.accounts
        .get(id)
        .ok_or_else(|| ApiError::not_found(format!("no account {id:?}")))
}

/// `GET /admin/v1/accounts`
pub async fn list(admin: &Admin, caller: &Caller, req: &Req) -> Reply {
    unscoped(caller)?;
    let paging = Paging::read(req, "page", "page_size")?;
    let file = admin.file().await?;
    let now = crate::core::clock::unix_now();
    let q = req.query_str("q").map(str::to_lowercase);
    let all: Vec<_> = file
        .accounts
        .iter()
        .filter(|(id, a)| {
            q.as_ref().is_none_or(|q| {
                id.to_lowercase().contains(q.as_str()) || a.name.to_lowercase().contains(q.as_str())
            })
        })
        .collect();
    let total = all.len();
    let items: Vec<_> = paging
        .slice(all.into_iter())
        .into_iter()
        .map(|(id, a)| view(admin, &file, id, a, now))
        .collect();
    ok(
        &serde_json::json!({"items": items, "total": total, "page": paging.page, "page_size": paging.size}),
    )
}

/// `GET /admin/v1/accounts/{id}`
pub async fn get(admin: &Admin, caller: &Caller, id: &str) -> Reply {
    unscoped(caller)?;
    let file = admin.file().await?;
    let a = find(&file, id)?;
    ok(&view(admin, &file, id, a, crate::core::clock::unix_now()))
}

/// `POST /admin/v1/accounts` → 201
pub async fn create(admin: &Admin, caller: &Caller, req: &Req) -> Reply {
    unscoped(caller)?;
    caller_writes(caller)?;
    let body: AccountBody = req.json()?;
    body.check()?;
    let id = body
        .id
        .clone()
        .ok_or_else(|| ApiError::field("id", "id is needed"))?;
    if id.is_empty() || id.chars().count() > 64 || id.chars().any(char::is_control) {
        return Err(ApiError::field("id", "id: 1 to 64 printable characters"));
    }
    let fields = body.fields();
    let new_id = id.clone();
    admin
        .write(
            req.if_match()?,
            Box::new(move |file| {
                if file.accounts.contains_key(&new_id) {
                    return Err(ApiError::conflict(
                        "exists",
                        format!("account {new_id:?} exists already"),
                    ));
                }
                let mut a = AccountEntry::default();
                body.clone().apply(&mut a);
                file.accounts.insert(new_id.clone(), a);
                Ok(serde_json::Value::Null)
            }),
        )
        .await?;
    admin.audit(
        caller,
        req,
        "account.create",
        format!("account:{id}"),
        fields,
    );
    let file = admin.file().await?;
    let a = find(&file, &id)?;
    Ok(json(
        StatusCode::CREATED,
        &view(admin, &file, &id, a, crate::core::clock::unix_now()),
    ))
}

/// `PATCH /admin/v1/accounts/{id}`
pub async fn patch(admin: &Admin, caller: &Caller, req: &Req, id: &str) -> Reply {
    unscoped(caller)?;
    caller_writes(caller)?;
    let body: AccountBody = req.json()?;
    if body.id.is_some() {
        return Err(ApiError::field("id", "an account's id cannot change"));
    }
    body.check()?;
    let fields = body.fields();
    let target = id.to_string();
    admin
        .write(
            req.if_match()?,
            Box::new(move |file| {
                let a = file
                    .accounts
                    .get_mut(&target)
                    .ok_or_else(|| ApiError::not_found(format!("no account {target:?}")))?;
                body.clone().apply(a);
                Ok(serde_json::Value::Null)
            }),
        )
        .await?;
    admin.audit(
        caller,
        req,
        "account.update",
        format!("account:{id}"),
        fields,
    );
    get(admin, caller, id).await
}

/// `DELETE /admin/v1/accounts/{id}`: 409 while keys name it.
pub async fn delete(admin: &Admin, caller: &Caller, req: &Req, id: &str) -> Reply {
    unscoped(caller)?;
    caller_writes(caller)?;
    let target = id.to_string();
    admin
        .write(
            req.if_match()?,
            Box::new(move |file| {
                find(file, &target)?;
                let keys = file
                    .keys
                    .iter()
                    .filter(|k| k.account.as_deref() == Some(target.as_str()))
                    .count();
                if keys > 0 {
                    return Err(ApiError::conflict(
                        "account_in_use",
                        format!(
                            "account {target:?} still has {keys} keys; move or delete them first"
                        ),
                    ));
                }
                file.accounts.remove(&target);
                Ok(serde_json::Value::Null)
            }),
        )
        .await?;
    admin.audit(
        caller,
        req,
        "account.delete",
        format!("account:{id}"),
        Vec::new(),
    );
    ok(&serde_json::json!({"deleted": id}))
}
