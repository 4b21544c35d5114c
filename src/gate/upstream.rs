//! Phases `upstream_request_filter` and `request_body_filter`: the client's credential swapped
//! for the target's, and the buffered body forwarded (again, whole, on a retry).

use super::{Gate, GateCtx, X_REQUEST_ID};
use crate::core::credential;
use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use pingora::http::RequestHeader;
use pingora::proxy::Session;
use pingora::{Error, ErrorType, Result};
use std::time::Instant;

impl Gate {
    /// Phase `upstream_request_filter`: remove every client credential (headers and query), set
    /// the upstream's own in the client's style, the upstream `Host`, the request id and the
    /// length of the buffered body.
    pub async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        req: &mut RequestHeader,
        ctx: &mut GateCtx,
    ) -> Result<()> {
        strip_client_credentials(req)?;
        drop_header(req, &http::header::EXPECT);
        // Usage is read from the response body: ask for it uncompressed.
        drop_header(req, &http::header::ACCEPT_ENCODING);
        let target = ctx
            .upstream
            .and_then(|i| self.inner.upstreams.get(i))
            .zip(ctx.target)
            .and_then(|(u, t)| u.targets.get(t))
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no upstream chosen"))?;
        let style = ctx.key.map(|k| k.style).unwrap_or_default();
        target.prepare_request(req, style)?;
        if let Some(id) = &ctx.request_id {
            req.insert_header(&X_REQUEST_ID, id.clone())?;
        }
        if let Some(body) = ctx.attempt_body.as_ref().or(ctx.body.as_ref()) {
            // Kept as it is only when it is the one framing header and states this body.
            let mut lengths = req.headers.get_all(http::header::CONTENT_LENGTH).iter();
            let framed = lengths
                .next()
                .is_some_and(|v| states_length(v.as_bytes(), body.len()))
                && lengths.next().is_none();
            let framed = drop_header(req, &http::header::TRANSFER_ENCODING).is_none() && framed;
            if !framed {
                req.insert_header(http::header::CONTENT_LENGTH, body.len())?;
            }
        }
        ctx.upstream_started = Some(Instant::now());
        Ok(())
    }

    /// Phase `request_body_filter`: the body was read in `request_filter`; Pingora replays only
    /// its tail (see [`Gate::read_body`]), which is replaced here by the whole body.
    pub async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut GateCtx,
    ) -> Result<()> {
        if let Some(full) = ctx.attempt_body.as_ref().or(ctx.body.as_ref()) {
            *body = Some(if end_of_stream {
                full.clone()
            } else {
                Bytes::new()
            });
        }
        if end_of_stream {
            ctx.body_sent = true;
            ctx.release_body();
        }
        Ok(())
    }
}

pub(super) static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

pub(super) static X_GOOG_API_KEY: HeaderName = HeaderName::from_static("x-goog-api-key");

pub(super) static AZURE_API_KEY: HeaderName = HeaderName::from_static("api-key");

/// Remove a header when present. Pingora's removal converts the name and updates its
/// case-preserving name map even for an absent header; most requests carry none of these, and
/// a lookup is much cheaper.
pub(super) fn drop_header(req: &mut RequestHeader, name: &HeaderName) -> Option<HeaderValue> {
    if req.headers.contains_key(name) {
        req.remove_header(name)
    } else {
        None
    }
}

/// Whether a Content-Length value states exactly `len`, written canonically (no sign, no
/// leading zero, no space): then it can be forwarded as it is.
pub(super) fn states_length(v: &[u8], len: usize) -> bool {
    crate::usage::canonical_u64(v) == Some(len as u64)
}

/// Remove every place a client credential can be: `Authorization`, `x-api-key`,
/// `x-goog-api-key`, the key part of `Sec-WebSocket-Protocol`, and `?key=`.
pub fn strip_client_credentials(req: &mut RequestHeader) -> Result<()> {
    drop_header(req, &http::header::AUTHORIZATION);
    drop_header(req, &X_API_KEY);
    drop_header(req, &X_GOOG_API_KEY);
    // Azure OpenAI's header: never a keygate credential, but a client key must not ride along.
    drop_header(req, &AZURE_API_KEY);
    if let Some(v) = drop_header(req, &http::header::SEC_WEBSOCKET_PROTOCOL) {
        if let Some(kept) = credential::strip_ws_key_protocol(v.as_bytes()) {
            req.insert_header(http::header::SEC_WEBSOCKET_PROTOCOL, kept)?;
        }
    }
    if let Some(q) = req.uri.query() {
        if let Some(stripped) = credential::strip_query_key(q) {
            let path = req.uri.path();
            let pq = if stripped.is_empty() {
                path.to_string()
            } else {
                format!("{path}?{stripped}")
            };
            let uri = pq
                .parse::<http::Uri>()
                .map_err(|_| Error::explain(ErrorType::InvalidHTTPHeader, "bad request target"))?;
            req.set_uri(uri);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_canonical_content_length_is_forwarded_as_it_is() {
        assert!(states_length(b"106", 106));
        assert!(states_length(b"0", 0));
        for (v, len) in [
            (&b"105"[..], 106),
            (b"0106", 106),
            (b"+106", 106),
            (b" 106", 106),
            (b"106 ", 106),
            (b"", 0),
            (b"99999999999999999999", 0),
        ] {
            assert!(!states_length(v, len), "{:?}", String::from_utf8_lossy(v));
        }
    }

    #[test]
    fn credentials_are_stripped_from_headers_and_query() {
        let mut req = RequestHeader::build("GET", b"/v1/x?key=sk-secret&a=1", None).unwrap();
        req.insert_header("authorization", "Bearer sk-secret")
            .unwrap();
        req.insert_header("x-api-key", "sk-secret").unwrap();
        req.insert_header("x-goog-api-key", "sk-secret").unwrap();
        req.insert_header(
            "sec-websocket-protocol",
            "realtime, openai-insecure-api-key.sk-secret",
        )
        .unwrap();
        strip_client_credentials(&mut req).unwrap();
        assert_eq!(req.uri.to_string(), "/v1/x?a=1");
        assert!(req.headers.get("authorization").is_none());
        assert!(req.headers.get("x-api-key").is_none());
        assert!(req.headers.get("x-goog-api-key").is_none());
        assert_eq!(
            req.headers.get("sec-websocket-protocol").unwrap(),
            "realtime"
        );
    }
}
