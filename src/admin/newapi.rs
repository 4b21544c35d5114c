//! new-api's token API (SPEC §8), so scripts and clients written for new-api keep working:
//! `/api/token/…` with new-api's envelope `{"success","message","data"}` and field names.
//!
//! As new-api does, a refusal of the request's content is HTTP 200 with `"success":false` (its
//! web client and scripts read `success`, and treat a 4xx as a transport failure); a missing
//! or unknown token is 401, a viewer writing 403. Unknown fields are ignored, as new-api's
//! client sends whole token objects back. The `New-Api-User` header is accepted and ignored.

use super::auth::Caller;
use super::http::{ok, ApiError, Reply, Req};
use super::keys::{self, KeyBody, KeyItem};
use super::Admin;
use crate::core::config::KeyStatus;
use crate::core::table::{digest_hex, key_digest};
use ::http::{Method, StatusCode};
use serde::Deserialize;

/// new-api's page size cap.
const MAX_SIZE: i64 = 100;

/// The routes under `/api/token` (`rest`: the segments after it).
pub async fn route(admin: &Admin, caller: &Caller, req: &Req, rest: &[&str]) -> Reply {
    let answer = match (req.method.clone(), rest) {
        (Method::GET, []) => list(admin, caller, req).await,
        (Method::POST, []) => create(admin, caller, req).await,
        (Method::PUT, []) => update(admin, caller, req).await,
        (Method::GET, ["search"]) => search(admin, caller, req).await,
        (Method::POST, ["batch"]) => batch_delete(admin, caller, req).await,
        (Method::GET, [id]) => get(admin, caller, id).await,
        (Method::DELETE, [id]) => delete(admin, caller, req, id).await,
        (Method::POST, [id, "key"]) => key(admin, caller, req, id).await,
        _ => return Err(ApiError::not_found(format!("no route {}", req.path))),
    };
    match answer {
        Ok(r) => Ok(r),
        // Who may call stays an HTTP status, as in new-api; the rest is its envelope.
        Err(e)
            if [
                StatusCode::UNAUTHORIZED,
                StatusCode::FORBIDDEN,
                StatusCode::TOO_MANY_REQUESTS,
            ]
            .contains(&e.status) =>
        {
            Err(e)
        }
        Err(e) => ok(&serde_json::json!({"success": false, "message": e.message})),
    }
}

fn success(data: serde_json::Value) -> Reply {
    ok(&serde_json::json!({"success": true, "message": "", "data": data}))
}

/// new-api's integer status: 1 enabled, 2 disabled, 3 expired, 4 exhausted.
fn status_code(state: &str) -> i64 {
    match state {
        "disabled" => 2,
        "expired" => 3,
        "exhausted" => 4,
        _ => 1,
    }
}

/// A key as new-api shows a token (its key masked and without `sk-`, as new-api does).
fn token(it: &KeyItem) -> serde_json::Value {
    let masked = it.key_hint.as_deref().map_or(String::new(), |h| {
        h.strip_prefix("sk-").unwrap_or(h).to_string()
    });
    serde_json::json!({
        "id": it.id,
        "user_id": 0,
        "key": masked,
        "status": status_code(it.state),
        "name": it.name,
        "created_time": 0,
        "accessed_time": 0,
        "expired_time": it.expires_at,
        "remain_quota": it.remaining.unwrap_or(0),
        "unlimited_quota": it.unlimited_quota,
        "model_limits_enabled": it.models.is_some(),
        "model_limits": it.models.as_ref().map(|m| m.join(",")).unwrap_or_default(),
        "allow_ips": it.allow_ips.as_ref().map(|a| a.join("\n")).unwrap_or_default(),
        "used_quota": it.used,
        "group": if it.group == "default" { String::new() } else { it.group.clone() },
        "cross_group_retry": false,
        "DeletedAt": null,
        "account": it.account,
    })
}

/// `p` from 1 (0 or absent: 1), the size from `size`, `page_size` or `ps` (default 10, ≤ 100).
fn paging(req: &Req) -> Result<(usize, usize), ApiError> {
    let p = req.query_i64("p")?.unwrap_or(1).max(1);
    let size = match req.query_i64("page_size")? {
        Some(s) => Some(s),
        None => match req.query_i64("ps")? {
            Some(s) => Some(s),
            None => req.query_i64("size")?,
        },
    }
    .unwrap_or(10);
    if !(1..=MAX_SIZE).contains(&size) {
        return Err(ApiError::field(
            "size",
            format!("size must be between 1 and {MAX_SIZE}"),
        ));
    }
    Ok((
        usize::try_from(p).unwrap_or(1),
        usize::try_from(size).unwrap_or(10),
    ))
}

async fn page_of(
    admin: &Admin,
    caller: &Caller,
    req: &Req,
    keep: impl Fn(&crate::core::config::KeyEntry) -> bool,
) -> Reply {
    let (p, size) = paging(req)?;
    let file = admin.file().await?;
    let now = crate::core::clock::unix_now();
    let consumed = admin.consumed_fn();
    let all: Vec<_> = file
        .keys
        .iter()
        .rev()
        .filter(|k| keys::visible(caller, k) && keep(k))
        .collect();
    let items: Vec<_> = all
        .iter()
        .skip((p - 1).saturating_mul(size))
        .take(size)
        .map(|k| token(&keys::item(k, &consumed, now)))
        .collect();
    success(serde_json::json!({"page": p, "page_size": size, "total": all.len(), "items": items}))
}

/// `GET /api/token/?p=&size=`
async fn list(admin: &Admin, caller: &Caller, req: &Req) -> Reply {
    page_of(admin, caller, req, |_| true).await
}

/// `GET /api/token/search?keyword=&token=`: the name contains `keyword` (any case); `token`
/// is a full key (with or without `sk-`) or a part of its hint.
async fn search(admin: &Admin, caller: &Caller, req: &Req) -> Reply {
    let keyword = req.query_str("keyword").map(str::to_lowercase);
    let token = req
        .query_str("token")
        .map(|t| t.strip_prefix("sk-").unwrap_or(t).to_string());
    let digest = token
        .as_ref()
        .map(|t| digest_hex(&key_digest(format!("sk-{t}").as_bytes())));
    page_of(admin, caller, req, |k| {
        let name_ok = keyword
            .as_ref()
            .is_none_or(|w| k.name.to_lowercase().contains(w.as_str()));
        let token_ok = match (&token, &digest) {
            (Some(t), Some(d)) => {
                k.key_sha256.as_deref() == Some(d.as_str())
                    || keys::item(k, &|_| 0, 0)
                        .key_hint
                        .is_some_and(|h| t.len() >= 4 && h.contains(t.as_str()))
            }
            _ => true,
        };
        name_ok && token_ok
    })
    .await
}

fn parse_id(s: &str) -> Result<u64, ApiError> {
    s.parse()
        .map_err(|_| ApiError::bad(format!("strconv.Atoi: parsing {s:?}: invalid syntax")))
}

/// `GET /api/token/{id}`
async fn get(admin: &Admin, caller: &Caller, id: &str) -> Reply {
    let id = parse_id(id)?;
    let file = admin.file().await?;
    let k = keys::find(&file, caller, id).map_err(|_| ApiError::not_found("record not found"))?;
    success(token(&keys::item(
        k,
        &admin.consumed_fn(),
        crate::core::clock::unix_now(),
    )))
}

/// A token as new-api's client sends it (unknown fields ignored).
#[derive(Deserialize, Default)]
#[serde(default)]
struct TokenBody {
    id: Option<u64>,
    name: Option<String>,
    status: Option<i64>,
    remain_quota: Option<i64>,
    unlimited_quota: Option<bool>,
    expired_time: Option<i64>,
    model_limits_enabled: Option<bool>,
    model_limits: Option<String>,
    allow_ips: Option<String>,
    group: Option<String>,
}

impl TokenBody {
    /// The keygate fields; `used` is what the key has used (a `remain_quota` sets the quota
    /// to `used + remain_quota`, so what remains is what was asked).
    fn key_body(&self, used: i64) -> KeyBody {
        let list = |s: &str, sep: char| -> Vec<String> {
            s.split(sep)
                .map(str::trim)
                .filter(|x| !x.is_empty())
                .map(String::from)
                .collect()
        };
        KeyBody {
            name: self.name.clone(),
            quota: self
                .remain_quota
                .map(|r| if r < 0 { r } else { r.saturating_add(used) }),
            unlimited_quota: self.unlimited_quota,
            expires_at: self.expired_time,
            models: self
                .model_limits_enabled
                .map(|on| on.then(|| list(self.model_limits.as_deref().unwrap_or(""), ','))),
            allow_ips: self.allow_ips.as_ref().map(|a| {
                let l = list(a, '\n');
                (!l.is_empty()).then_some(l)
            }),
            group: self
                .group
                .clone()
                .map(|g| if g.is_empty() { "default".into() } else { g }),
            ..KeyBody::default()
        }
    }
}

fn token_body(req: &Req) -> Result<TokenBody, ApiError> {
    serde_json::from_slice(&req.body).map_err(|e| ApiError::bad(format!("json: {e}")))
}

/// `POST /api/token/`: creates the token. new-api answers without data; keygate adds the
/// token with its full key (`key`, without `sk-`, as new-api stores keys) in `data`, since
/// without a vault it can never be shown again.
async fn create(admin: &Admin, caller: &Caller, req: &Req) -> Reply {
    let body = token_body(req)?.key_body(0);
    let mut created = keys::create_many(admin, caller, req, body).await?;
    let (it, secret) = created
        .pop()
        .ok_or_else(|| ApiError::internal("no key was created"))?;
    let mut t = token(&it);
    t["key"] = secret.strip_prefix("sk-").unwrap_or(&secret).into();
    success(t)
}

/// `PUT /api/token/` (and `?status_only=true`): `id` in the body.
async fn update(admin: &Admin, caller: &Caller, req: &Req) -> Reply {
    let body = token_body(req)?;
    let id = body
        .id
        .filter(|id| *id > 0)
        .ok_or_else(|| ApiError::bad("id 或 userId 为空！ (id is missing)"))?;
    let file = admin.file().await?;
    let k = keys::find(&file, caller, id).map_err(|_| ApiError::not_found("record not found"))?;
    let now = crate::core::clock::unix_now();
    let current = keys::item(k, &admin.consumed_fn(), now);
    let status_only = req.query_str("status_only").is_some();
    let mut change = if status_only {
        KeyBody::default()
    } else {
        body.key_body(current.used)
    };
    if status_only || body.status.is_some() {
        match body.status {
            Some(1) => {
                if current.state == "expired" {
                    return Err(ApiError::bad("Token has expired and cannot be enabled. Please modify the expiration time or set it to never expire"));
                }
                if current.state == "exhausted" {
                    return Err(ApiError::bad("Token quota is exhausted and cannot be enabled. Please modify the remaining quota or set it to unlimited"));
                }
                change.status = Some(KeyStatus::Enabled);
            }
            Some(2) => change.status = Some(KeyStatus::Disabled),
            // 3 and 4 are derived here, not stored; a full update sending them back keeps the
            // stored status.
            Some(3 | 4) if !status_only => {}
            other => {
                return Err(ApiError::bad(format!(
                    "status {}: 1 (enabled) or 2 (disabled)",
                    other.map_or("missing".into(), |s| s.to_string())
                )))
            }
        }
    }
    drop(file);
    keys::update_one(admin, caller, req, id, change).await?;
    let file = admin.file().await?;
    let k = keys::find(&file, caller, id)?;
    success(token(&keys::item(k, &admin.consumed_fn(), now)))
}

/// `DELETE /api/token/{id}`
async fn delete(admin: &Admin, caller: &Caller, req: &Req, id: &str) -> Reply {
    keys::caller_writes(caller)?;
    let id = parse_id(id)?;
    keys::delete_ids(admin, caller, req, vec![id], true)
        .await
        .map_err(|e| {
            if e.status == StatusCode::NOT_FOUND {
                ApiError::not_found("record not found")
            } else {
                e
            }
        })?;
    ok(&serde_json::json!({"success": true, "message": ""}))
}

/// `POST /api/token/batch` `{"ids":[…]}` → the number deleted.
async fn batch_delete(admin: &Admin, caller: &Caller, req: &Req) -> Reply {
    keys::caller_writes(caller)?;
    #[derive(Deserialize)]
    struct Ids {
        ids: Vec<u64>,
    }
    let body: Ids =
        serde_json::from_slice(&req.body).map_err(|e| ApiError::bad(format!("json: {e}")))?;
    if body.ids.is_empty() {
        return Err(ApiError::bad("无效的参数 (no ids)"));
    }
    if body.ids.len() > 100 {
        return Err(ApiError::bad(
            "批量请求数量过多，最多 100 条 (at most 100 ids)",
        ));
    }
    let deleted = keys::delete_ids(admin, caller, req, body.ids, false).await?;
    success(serde_json::json!(deleted.len()))
}

/// `POST /api/token/{id}/key`: the full key (without `sk-`), from the vault.
async fn key(admin: &Admin, caller: &Caller, req: &Req, id: &str) -> Reply {
    keys::caller_writes(caller)?;
    admin.reveal_allowed(caller)?;
    let id = parse_id(id)?;
    let file = admin.file().await?;
    let k = keys::find(&file, caller, id).map_err(|_| ApiError::not_found("record not found"))?;
    let secret = admin.reveal_key(k)?;
    admin.audit(caller, req, "key.reveal", format!("key:{id}"), Vec::new());
    success(serde_json::json!({"key": secret.strip_prefix("sk-").unwrap_or(&secret)}))
}
