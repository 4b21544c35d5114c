//! The usage store's two ends in the gate: the row each finished call pushes (phase
//! `logging`), and the key-holder routes answered from the store (`GET /api/log/token`,
//! `GET /api/usage/token/stats`), whose queries run on a blocking thread, never on a
//! Pingora worker.

use super::{Gate, GateCtx, Outcome};
use crate::core::clock::unix_now;
use crate::core::table::KeyRecord;
use crate::usage::store::query::{self, Bucket, StatsFilter};
use crate::usage::store::{StoreRow, UsageStore};
use pingora::http::RequestHeader;
use pingora::proxy::Session;
use serde_json::json;
use std::time::Instant;

/// The key-holder routes answered from the usage store.
pub(super) fn is_store_path(path: &str) -> bool {
    matches!(
        path,
        "/api/log/token" | "/api/log/token/" | "/api/usage/token/stats"
    )
}

/// Days a key-holder's stats cover when `days` is not given, and at most.
const DEFAULT_DAYS: i64 = 7;
const MAX_DAYS: i64 = 366;
/// Calls `/api/log/token` returns (new-api's answer holds a key's newest 100).
const LOG_TOKEN_CALLS: usize = 100;

impl Gate {
    /// The usage store, when it is on.
    pub fn usage_store(&self) -> Option<&UsageStore> {
        self.inner.usage_store.as_ref()
    }

    /// Push the finished call's row to the store: every call of a known key that was
    /// forwarded or refused (not keygate's own read-only answers). The row borrows its texts
    /// from the call and the key table; the store copies them into its queue.
    pub(super) fn store_call(&self, session: &Session, ctx: &GateCtx, finished: Instant) {
        let Some(store) = &self.inner.usage_store else {
            return;
        };
        if !matches!(
            ctx.outcome,
            Outcome::Admitted | Outcome::Failed(_) | Outcome::Denied(_)
        ) {
            return;
        }
        let (Some(table), Some(key)) = (ctx.table.as_ref(), ctx.key_record()) else {
            return;
        };
        let created_at = ctx.unix_at(finished);
        let status = ctx.settled_status.unwrap_or_else(|| {
            session
                .response_written()
                .map_or(ctx.status, |r| r.status.as_u16())
        });
        let upstream = ctx.upstream.and_then(|i| self.inner.upstreams.get(i));
        let (usage, quota) = ctx.charged.unwrap_or_default();
        store.push(&StoreRow {
            created_at,
            request_id: ctx.request_id().unwrap_or(""),
            key_id: key.id,
            key_name: &key.name,
            group: &table.group_of(key).name,
            model: ctx.model.as_deref().unwrap_or(""),
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            quota,
            is_stream: ctx.sse.is_some(),
            status,
            duration_ms: ctx.ms_since_start(Some(finished)).unwrap_or(0),
            first_byte_ms: ctx.ms_since_start(ctx.first_byte),
            account: table.account_of(key).map(|a| &*a.id),
            upstream: upstream.map(|u| u.name.as_str()),
            target: self.target_label(ctx),
            attempts: ctx.attempts,
            path: session.req_header().uri.path(),
            error_code: ctx.outcome.label().1.map(|r| r.code()),
        });
    }

    /// The answer to a key-holder store route, `None` for other paths. Without a store
    /// both answer 404 `usage_store_off`.
    pub(super) async fn store_answer(
        &self,
        req: &RequestHeader,
        key: &KeyRecord,
    ) -> Option<(u16, Vec<u8>)> {
        let path = req.uri.path();
        if req.method != http::Method::GET || !is_store_path(path) {
            return None;
        }
        let Some(store) = self.inner.usage_store.clone() else {
            let body = json!({"success": false, "message": "the usage store is off on this gateway",
                "error": {"code": "usage_store_off"}});
            return Some((404, body.to_string().into_bytes()));
        };
        let key_id = key.id;
        if path.starts_with("/api/log/token") {
            let rows = tokio::task::spawn_blocking(move || {
                store.read(|c| query::recent(c, key_id, LOG_TOKEN_CALLS))
            })
            .await;
            return Some(match rows {
                Ok(Ok(rows)) => {
                    let data: Vec<_> = rows.iter().map(new_api_log).collect();
                    (
                        200,
                        json!({"success": true, "message": "", "data": data})
                            .to_string()
                            .into_bytes(),
                    )
                }
                Ok(Err(e)) => query_failed(&e.to_string()),
                Err(e) => query_failed(&e.to_string()),
            });
        }
        let (bucket, days) = match stats_params(req.uri.query().unwrap_or("")) {
            Ok(p) => p,
            Err(message) => {
                let body = json!({"error": {"message": message, "type": "invalid_request_error",
                    "code": "invalid_query"}});
                return Some((400, body.to_string().into_bytes()));
            }
        };
        let now = unix_now();
        let stats = tokio::task::spawn_blocking(move || {
            let filter = StatsFilter {
                key_id: Some(key_id),
                start: Some(now - days.0 * 86_400),
                end: Some(now),
                bucket,
                ..StatsFilter::default()
            };
            store.read(|c| query::stats(c, &filter, now))
        })
        .await;
        Some(match stats {
            Ok(Ok(mut page)) => {
                page.notes.extend(days.1);
                (200, serde_json::to_vec(&page).unwrap_or_default())
            }
            Ok(Err(e)) => query_failed(&e.to_string()),
            Err(e) => query_failed(&e.to_string()),
        })
    }
}

/// `bucket` and `days` of `/api/usage/token/stats`: the days used and a note when capped.
fn stats_params(q: &str) -> Result<(Bucket, (i64, Option<String>)), String> {
    let mut bucket = Bucket::Hour;
    let mut days = (DEFAULT_DAYS, None);
    for (k, v) in form_urlencoded::parse(q.as_bytes()) {
        match &*k {
            "bucket" => bucket = Bucket::parse(&v)?,
            "days" => {
                let n: i64 = v
                    .trim()
                    .parse()
                    .map_err(|_| format!("days: {v:?} is not a whole number"))?;
                days = match n {
                    n if n < 1 => (1, Some(format!("days {n}: 1 used"))),
                    n if n > MAX_DAYS => {
                        (MAX_DAYS, Some(format!("days {n}: capped at {MAX_DAYS}")))
                    }
                    n => (n, None),
                };
            }
            _ => {}
        }
    }
    Ok((bucket, days))
}

fn query_failed(e: &str) -> (u16, Vec<u8>) {
    log::error!("usage store query: {e}");
    let body = json!({"success": false, "message": "the usage store could not be read",
        "error": {"code": "usage_store_error"}});
    (503, body.to_string().into_bytes())
}

/// A call in new-api's log shape (`model.Log`): type 2 is a consumption, 5 an error;
/// `use_time` in whole seconds.
fn new_api_log(c: &query::CallRow) -> serde_json::Value {
    let r = &c.row;
    json!({
        "id": c.id,
        "type": if r.status >= 400 { 5 } else { 2 },
        "content": r.error_code.as_deref().unwrap_or(""),
        "created_at": r.created_at,
        "model_name": r.model,
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "quota": r.quota,
        "use_time": r.duration_ms / 1000,
        "is_stream": r.is_stream,
        "token_name": r.key_name,
        "token_id": r.key_id,
        "group": r.group,
        "request_id": r.request_id,
    })
}
