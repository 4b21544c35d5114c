//! `GET /admin/v1/openapi.json`: the OpenAPI 3 document of every admin route
//! (`openapi.json` beside this file; CI runs a property-based fuzzer against it).

use super::http::{full, Reply, Req};

/// The document, as served.
pub const DOCUMENT: &str = include_str!("openapi.json");

/// Serve it (no token needed: it holds no data).
pub fn document(_req: &Req) -> Reply {
    Ok(http::Response::builder()
        .status(200)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(full(DOCUMENT))
        .unwrap_or_default())
}
