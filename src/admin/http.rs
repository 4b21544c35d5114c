//! The admin API's plumbing: a request read whole (at most 1 MiB), typed errors that become
//! `{"error":{…}}` answers, and the paging every list shares.

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::HashMap;
use std::net::IpAddr;

/// The largest request body the admin API reads.
pub const MAX_BODY: usize = 1024 * 1024;

/// A response body: whole, or streamed (CSV exports).
pub type Body = BoxBody<Bytes, std::io::Error>;

/// A request, read whole.
pub struct Req {
    /// The method.
    pub method: Method,
    /// The path, without the query.
    pub path: String,
    /// The query parameters (the last of a repeated name wins).
    pub query: HashMap<String, String>,
    /// The headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
    /// The client's address.
    pub ip: IpAddr,
}

/// A refusal: status, a stable code, a message for people and the offending field.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable, machine-readable.
    pub code: &'static str,
    /// For people; never holds a secret.
    pub message: String,
    /// The request field at fault.
    pub field: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }
    /// 400 naming `field`.
    pub fn field(field: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            field: Some(field.to_string()),
            ..ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
        }
    }
    /// 400 about the request as a whole.
    pub fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
    /// 401.
    pub fn unauthorized() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "an admin token is needed: Authorization: Bearer <token>",
        )
    }
    /// 403.
    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
    /// 404.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    /// 405.
    pub fn method(allowed: &str) -> ApiError {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("allowed: {allowed}"),
        )
    }
    /// 409 with a code of its own.
    pub fn conflict(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, code, message)
    }
    /// 412: `If-Match` named a revision the file has moved on from.
    pub fn stale(expected: u64, current: u64) -> ApiError {
        ApiError::new(
            StatusCode::PRECONDITION_FAILED,
            "revision_mismatch",
            format!("If-Match: revision {expected}, the sync file is at revision {current}"),
        )
    }
    /// 413.
    pub fn too_large() -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the body is over {MAX_BODY} bytes"),
        )
    }
    /// 429.
    pub fn too_many(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message)
    }
    /// 500 (logged by the caller).
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
    /// 500 for a blocking task that panicked or was cancelled: what it said goes to the log,
    /// not to the caller (a panic's text is an internal detail).
    pub fn crashed(what: &str, e: tokio::task::JoinError) -> ApiError {
        log::error!("admin: {what}: {e}");
        ApiError::internal(format!("{what} failed; see the gateway's log"))
    }
    /// 503.
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    /// The answer: `{"error":{"code","message","field"}}`.
    pub fn into_response(self) -> http::Response<Body> {
        let mut e = serde_json::json!({"code": self.code, "message": self.message});
        if let Some(f) = self.field {
            e["field"] = f.into();
        }
        let mut r = json(self.status, &serde_json::json!({ "error": e }));
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer"),
            );
        }
        r
    }
}

/// What a handler answers.
pub type Reply = Result<http::Response<Body>, ApiError>;

/// A whole body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A JSON answer.
pub fn json<T: Serialize>(status: StatusCode, value: &T) -> http::Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    http::Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::CACHE_CONTROL, "no-store")
        .body(full(body))
        .unwrap_or_default()
}

/// 200 with `value`.
pub fn ok<T: Serialize>(value: &T) -> Reply {
    Ok(json(StatusCode::OK, value))
}

/// The field serde named in an error message (`unknown field \`nmae\``).
fn field_in(message: &str) -> Option<String> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(message[start..start + len].to_string())
}

impl Req {
    /// The body as `T` (strict: unknown fields are errors naming the field).
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        if self.body.is_empty() {
            return Err(ApiError::bad("a JSON body is needed"));
        }
        serde_json::from_slice(&self.body).map_err(|e| {
            let message = format!("body: {e}");
            match field_in(&message) {
                Some(f)
                    if message.contains("unknown field") || message.contains("missing field") =>
                {
                    ApiError::field(&f, message)
                }
                _ => ApiError::bad(message),
            }
        })
    }

    /// A query parameter as an integer; absent or empty is `None`.
    pub fn query_i64(&self, name: &str) -> Result<Option<i64>, ApiError> {
        match self.query.get(name).map(String::as_str) {
            None | Some("") => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| ApiError::field(name, format!("{name}: {v:?} is not an integer"))),
        }
    }

    /// A query parameter as text; absent or empty is `None`.
    pub fn query_str(&self, name: &str) -> Option<&str> {
        self.query
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// `If-Match: <revision>` (quotes allowed, as for an ETag).
    pub fn if_match(&self) -> Result<Option<u64>, ApiError> {
        let Some(v) = self.headers.get(http::header::IF_MATCH) else {
            return Ok(None);
        };
        let text = v.to_str().unwrap_or("").trim();
        let text = text.strip_prefix("W/").unwrap_or(text).trim_matches('"');
        text.parse().map(Some).map_err(|_| {
            ApiError::field(
                "If-Match",
                "If-Match: a sync-file revision (an integer) is expected",
            )
        })
    }
}

/// Paging shared by every list (SPEC §9): `page` from 1, `page_size` 1..=1000, default 50.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Paging {
    /// From 1.
    pub page: usize,
    /// Items per page.
    pub size: usize,
}

/// The largest page.
pub const MAX_PAGE_SIZE: usize = 1000;

impl Paging {
    /// Read `page` and `size_name` (`page_size`, or new-api's `size`) from `req`; `page_name`
    /// likewise.
    pub fn read(req: &Req, page_name: &str, size_name: &str) -> Result<Paging, ApiError> {
        let page = req.query_i64(page_name)?.unwrap_or(1);
        let size = req.query_i64(size_name)?.unwrap_or(50);
        if page < 1 {
            return Err(ApiError::field(
                page_name,
                format!("{page_name} starts at 1"),
            ));
        }
        if !(1..=MAX_PAGE_SIZE as i64).contains(&size) {
            return Err(ApiError::field(
                size_name,
                format!("{size_name} must be between 1 and {MAX_PAGE_SIZE} (got {size})"),
            ));
        }
        Ok(Paging {
            page: usize::try_from(page).unwrap_or(usize::MAX),
            size: usize::try_from(size).unwrap_or(MAX_PAGE_SIZE),
        })
    }

    /// The items of this page out of `items`.
    pub fn slice<T>(&self, items: impl Iterator<Item = T>) -> Vec<T> {
        items
            .skip(self.page.saturating_sub(1).saturating_mul(self.size))
            .take(self.size)
            .collect()
    }
}

/// Parse a query string (`a=1&b=x%20y`).
pub fn parse_query(q: Option<&str>) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let dec = |s: &str| {
            percent_encoding::percent_decode_str(&s.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        };
        out.insert(dec(k), dec(v));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_decode() {
        let q = parse_query(Some("q=a%20b&x=1+2&flag"));
        assert_eq!(q["q"], "a b");
        assert_eq!(q["x"], "1 2");
        assert_eq!(q["flag"], "");
    }

    #[test]
    fn serde_names_the_field() {
        assert_eq!(
            field_in("body: unknown field `nmae`, expected one of"),
            Some("nmae".into())
        );
    }
}
