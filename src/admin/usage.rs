//! The usage store on the admin listener (SPEC §9): `/admin/v1/logs`, `/admin/v1/stats`,
//! `/admin/v1/logs.csv` for admin tokens (account-scoped ones see their account's calls), and
//! the key-holder routes (`/api/usage/token/…`, `/api/log/token`) authenticated by the key
//! itself, answered exactly as on the proxy listener.

use super::auth::Caller;
use super::http::{full, json, ApiError, Body, Reply, Req};
use super::Admin;
use crate::core::config::KeyStatus;
use crate::core::table::key_digest;
use crate::usage::store::query::{self, LogFilter, StatsFilter};
use crate::usage::store::UsageStore;
use bytes::Bytes;
use http::StatusCode;
use http_body_util::BodyExt;

fn store(admin: &Admin) -> Result<UsageStore, ApiError> {
    admin.gate().usage_store().cloned().ok_or_else(|| {
        ApiError::conflict("usage_store_off", "the usage store is off on this gateway")
    })
}

fn raw_query(req: &Req) -> String {
    req.query
        .iter()
        .map(|(k, v)| {
            format!(
                "{}={}",
                percent_encoding::utf8_percent_encode(k, percent_encoding::NON_ALPHANUMERIC),
                percent_encoding::utf8_percent_encode(v, percent_encoding::NON_ALPHANUMERIC)
            )
        })
        .collect::<Vec<_>>()
        .join("&")
}

fn failed(e: impl std::fmt::Display) -> ApiError {
    ApiError::unavailable(format!("the usage store could not be read: {e}"))
}

fn log_filter(caller: &Caller, req: &Req) -> Result<LogFilter, ApiError> {
    let mut f = LogFilter::from_query(&raw_query(req)).map_err(ApiError::bad)?;
    if let Some(own) = &caller.account {
        f.account = Some(own.clone());
    }
    Ok(f)
}

/// `GET /admin/v1/logs`: calls, newest first.
pub async fn logs(admin: &Admin, caller: &Caller, req: &Req) -> Reply {
    let f = log_filter(caller, req)?;
    let store = store(admin)?;
    let now = crate::core::clock::unix_now();
    let page = tokio::task::spawn_blocking(move || store.read(|c| query::logs(c, &f, now)))
        .await
        .map_err(|e| ApiError::crashed("the usage store query", e))?
        .map_err(failed)?;
    Ok(json(StatusCode::OK, &page))
}

/// `GET /admin/v1/stats`: buckets by hour or day from the roll-ups.
pub async fn stats(admin: &Admin, caller: &Caller, req: &Req) -> Reply {
    let mut f = StatsFilter::from_query(&raw_query(req)).map_err(ApiError::bad)?;
    if let Some(own) = &caller.account {
        f.account = Some(own.clone());
    }
    let store = store(admin)?;
    let now = crate::core::clock::unix_now();
    let page = tokio::task::spawn_blocking(move || store.read(|c| query::stats(c, &f, now)))
        .await
        .map_err(|e| ApiError::crashed("the usage store query", e))?
        .map_err(failed)?;
    Ok(json(StatusCode::OK, &page))
}

/// `GET /admin/v1/logs.csv`: the same filters, streamed a chunk of rows at a time (the file is
/// never whole in memory); an error after the first chunk ends the stream early.
pub async fn csv(admin: &Admin, caller: &Caller, req: &Req) -> Reply {
    let f = log_filter(caller, req)?;
    let store = store(admin)?;
    let now = crate::core::clock::unix_now();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(2);
    tokio::task::spawn_blocking(move || {
        store.read(|c| {
            let (export, _notes) = crate::usage::store::CsvExport::new(c, &f, now);
            for chunk in export {
                let item = chunk
                    .map(Bytes::from)
                    .map_err(|e| std::io::Error::other(e.to_string()));
                let stop = item.is_err();
                if tx.blocking_send(item).is_err() || stop {
                    return;
                }
            }
        });
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|item| (item.map(hyper::body::Frame::data), rx))
    });
    let body: Body = http_body_util::StreamBody::new(stream).boxed();
    Ok(http::Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, "text/csv; charset=utf-8")
        .header(
            http::header::CONTENT_DISPOSITION,
            "attachment; filename=\"keygate-calls.csv\"",
        )
        .header(http::header::CACHE_CONTROL, "no-store")
        .body(body)
        .unwrap_or_default())
}

/// The key-holder routes, authenticated by the key (`Authorization: Bearer sk-…`): expired and
/// exhausted keys may read; a disabled or unknown key gets 401.
pub async fn key_holder(admin: &Admin, req: &Req) -> Reply {
    let refuse = |code: &'static str, message: &str| {
        Ok(json(
            StatusCode::UNAUTHORIZED,
            &serde_json::json!({"error": {"message": message, "type": "invalid_request_error", "code": code}}),
        ))
    };
    let presented = req
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.strip_prefix("Bearer ").unwrap_or(v).trim().to_string())
        .filter(|v| !v.is_empty());
    let Some(key) = presented else {
        return refuse(
            "missing_api_key",
            "an API key is needed: Authorization: Bearer sk-…",
        );
    };
    let table = admin.gate().table();
    let Some(record) = table.lookup(&key_digest(key.as_bytes())) else {
        return refuse("invalid_api_key", "invalid API key");
    };
    if record.status == KeyStatus::Disabled {
        return refuse("key_disabled", "this API key is disabled");
    }
    let path_and_query = match req.query.is_empty() {
        true => req.path.clone(),
        false => format!("{}?{}", req.path, raw_query(req)),
    };
    let head =
        pingora::http::RequestHeader::build(req.method.clone(), path_and_query.as_bytes(), None)
            .map_err(|e| ApiError::bad(format!("{e}")))?;
    match admin.gate().key_holder_answer(&head, &table, record).await {
        Some((status, body)) => Ok(http::Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::CACHE_CONTROL, "no-store")
            .body(full(body))
            .unwrap_or_default()),
        None => Err(ApiError::not_found(format!("no route {}", req.path))),
    }
}
