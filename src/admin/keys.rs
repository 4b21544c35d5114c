//! `/admin/v1/keys…` (SPEC §8): list, create (shown once), read, change, enable, disable,
//! rotate, reveal, delete, batch delete. Account-scoped tokens see only their account's keys; a
//! key of another account answers 404, exactly like a key that does not exist.

use super::auth::Caller;
use super::http::{json, ok, ApiError, Paging, Reply, Req};
pub use super::key_body::{nullable, KeyBody};
use super::key_view::find_mut;
pub use super::key_view::{find, item, page, parse_id, visible, Filter, KeyItem};
use super::Admin;
use crate::core::config::{KeyEntry, KeyStatus, SyncFile};
use crate::core::table::{digest_hex, generate_key, key_digest};
use crate::core::vault::Vault;
use crate::sync::edit::set_secret_fields;
use http::StatusCode;
use serde::Deserialize;

/// The most keys one create makes.
pub const MAX_BATCH_CREATE: u32 = 100;

/// 409 when the vault's secret is not the one the file's sealed keys were sealed with (a key
/// sealed now could never be opened together with them).
fn same_secret(file: &SyncFile, vault: Option<&Vault>) -> Result<(), ApiError> {
    match vault {
        Some(v) => crate::core::vault::check_same_secret(file, v)
            .map_err(|e| ApiError::conflict("vault_mismatch", e)),
        None => Ok(()),
    }
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
    let consumed = admin.consumed_fn();
    let (keys, total) = page(&file, caller, &filter, &consumed, now, paging);
    let items: Vec<KeyItem> = keys
        .into_iter()
        .map(|k| {
            let mut it = item(k, &consumed, now);
            it.revealable = admin.revealable(k);
            it
        })
        .collect();
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
                        account: scope.account.clone(),
                        ..KeyEntry::new(first + i as u64, hash.clone())
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
