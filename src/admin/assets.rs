//! The console's assets (SPEC §10): plain HTML, CSS and ES modules embedded in the binary, and
//! the security headers every console response carries.
//!
//! Nothing here is built: the files under `src/admin/console/` are served as they are, so
//! `cargo build` needs no Node.js. uPlot is vendored from the npm registry with its licence.

use super::http::{full, Body};
use ::http::{header, Response, StatusCode};

/// One embedded file, ready to answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asset {
    /// The `Content-Type` header value.
    pub content_type: &'static str,
    /// The body.
    pub body: &'static [u8],
    /// The `Cache-Control` header value.
    pub cache_control: &'static str,
}

/// The Content-Security-Policy of every console response. No inline script and no inline
/// style: uPlot sizes and places its elements through the CSSOM (`el.style.left = …`), which
/// `style-src` does not govern, so `'self'` is enough. `img-src data:` lets uPlot's canvas
/// export work; nothing is loaded from another origin.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
img-src 'self' data:; connect-src 'self'; font-src 'self'; object-src 'none'; \
frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// The headers every console response carries (assets and the console's 404 alike).
pub const SECURITY_HEADERS: &[(&str, &str)] = &[
    ("content-security-policy", CSP),
    ("x-frame-options", "DENY"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("cross-origin-opener-policy", "same-origin"),
    ("cross-origin-resource-policy", "same-origin"),
];

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
/// Our own files change with the binary: the browser revalidates each time.
const REVALIDATE: &str = "no-cache";
/// The vendored library has its version in its name.
const IMMUTABLE: &str = "public, max-age=31536000, immutable";

macro_rules! file {
    ($path:literal, $file:literal, $type:expr, $cache:expr) => {
        (
            $path,
            Asset {
                content_type: $type,
                body: include_bytes!(concat!("console/", $file)),
                cache_control: $cache,
            },
        )
    };
}

/// Every asset, by the path it is served at.
pub const ASSETS: &[(&str, Asset)] = &[
    file!("/", "index.html", HTML, REVALIDATE),
    file!("/usage", "usage.html", HTML, REVALIDATE),
    file!("/console/style.css", "style.css", CSS, REVALIDATE),
    file!("/console/app.js", "app.js", JS, REVALIDATE),
    file!("/console/api.js", "api.js", JS, REVALIDATE),
    file!("/console/ui.js", "ui.js", JS, REVALIDATE),
    file!("/console/keys.js", "keys.js", JS, REVALIDATE),
    file!("/console/key_form.js", "key_form.js", JS, REVALIDATE),
    file!("/console/usage.js", "usage.js", JS, REVALIDATE),
    file!("/console/accounts.js", "accounts.js", JS, REVALIDATE),
    file!("/console/chart.js", "chart.js", JS, REVALIDATE),
    file!("/console/holder.js", "holder.js", JS, REVALIDATE),
    file!(
        "/console/vendor/uPlot-1.6.32.iife.min.js",
        "vendor/uPlot-1.6.32.iife.min.js",
        JS,
        IMMUTABLE
    ),
    file!(
        "/console/vendor/uPlot-1.6.32.min.css",
        "vendor/uPlot-1.6.32.min.css",
        CSS,
        IMMUTABLE
    ),
];

/// The asset served at `path` (the request path without its query), if any. `/index.html`
/// and `/usage/` are accepted as the pages they name.
pub fn asset(path: &str) -> Option<Asset> {
    let path = match path {
        "/index.html" => "/",
        "/usage/" | "/usage.html" => "/usage",
        p => p,
    };
    ASSETS.iter().find(|(p, _)| *p == path).map(|(_, a)| *a)
}

/// Whether `path` belongs to the console (so its 404 also carries [`SECURITY_HEADERS`]).
pub fn is_console_path(path: &str) -> bool {
    path == "/" || path.starts_with("/console/") || path.starts_with("/usage")
}

/// The answer to `GET`/`HEAD` of a console path: the asset, or a plain 404; both carry
/// [`SECURITY_HEADERS`]. No token is needed: the files hold no data.
pub fn response(path: &str, head: bool) -> Response<Body> {
    let (status, content_type, cache, body): (_, _, _, &'static [u8]) = match asset(path) {
        Some(a) => (StatusCode::OK, a.content_type, a.cache_control, a.body),
        None => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "no-store",
            b"not found\n",
        ),
    };
    let mut r = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, cache)
        .header(header::CONTENT_LENGTH, body.len());
    for (name, value) in SECURITY_HEADERS {
        r = r.header(*name, *value);
    }
    r.body(full(if head { &b""[..] } else { body }))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_and_modules_are_found_and_unknown_paths_are_not() {
        assert_eq!(asset("/").unwrap().content_type, HTML);
        assert_eq!(asset("/index.html"), asset("/"));
        assert_eq!(asset("/usage/"), asset("/usage"));
        assert_eq!(asset("/console/app.js").unwrap().content_type, JS);
        assert!(asset("/console/../Cargo.toml").is_none());
        assert!(asset("/console/nope.js").is_none());
        assert!(asset("/admin/v1/keys").is_none());
    }

    #[test]
    fn every_module_a_page_or_module_imports_is_embedded() {
        for (path, a) in ASSETS {
            let text = std::str::from_utf8(a.body).unwrap();
            for cap in text.split(['"', '\'']).filter(|s| {
                (s.starts_with("./") || s.starts_with("/console/"))
                    && (s.ends_with(".js") || s.ends_with(".css"))
            }) {
                let target = cap.replacen("./", "/console/", 1);
                assert!(
                    asset(&target).is_some(),
                    "{path} refers to {cap}, not embedded"
                );
            }
        }
    }
}
