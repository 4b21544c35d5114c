//! Finding the key and the model in a request: headers, query, path and body. Pure functions
//! over plain data (a header map, a query string, body bytes); they know nothing of Pingora.

use crate::core::errors::{Denial, Reason};
pub use crate::core::request_json::{
    parse_json_fields, ModelField, RequestFields, MAX_JSON_DEPTH, MAX_MODEL_LEN,
};
use http::HeaderMap;
use std::borrow::Cow;
use std::fmt;

/// Where the client put its key; the upstream credential is sent in the same style.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CredentialStyle {
    /// `Sec-WebSocket-Protocol: openai-insecure-api-key.<key>` (OpenAI realtime in browsers).
    WebSocketProtocol,
    /// `x-api-key` (Anthropic).
    XApiKey,
    /// `x-goog-api-key` (Gemini).
    XGoogApiKey,
    /// `?key=` (Gemini).
    QueryKey,
    /// `Authorization: Bearer <key>` or the raw key.
    #[default]
    Bearer,
}

/// A presented credential. `secret` borrows from the request where it can.
pub struct Credential<'a> {
    /// The key bytes as presented (with or without `sk-`).
    pub secret: Cow<'a, [u8]>,
    /// Where it was found.
    pub style: CredentialStyle,
}

impl fmt::Debug for Credential<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print a key: a prefix is enough to tell two apart in a log.
        let shown: String = self
            .secret
            .iter()
            .take(6)
            .map(|&b| if b.is_ascii_graphic() { b as char } else { '?' })
            .collect();
        write!(f, "Credential({:?}, {shown}…)", self.style)
    }
}

/// The WebSocket sub-protocol prefix that carries a key.
pub const WS_KEY_PREFIX: &str = "openai-insecure-api-key.";

/// Find the credential, first match wins: Sec-WebSocket-Protocol, x-api-key, x-goog-api-key,
/// `?key=`, Authorization (Bearer or raw). Empty values count as absent.
pub fn find_credential<'a>(
    headers: &'a HeaderMap,
    query: Option<&'a str>,
) -> Option<Credential<'a>> {
    if let Some(v) = headers.get(http::header::SEC_WEBSOCKET_PROTOCOL) {
        for part in v.as_bytes().split(|&b| b == b',') {
            let part = part.trim_ascii();
            if let Some(k) = part.strip_prefix(WS_KEY_PREFIX.as_bytes()) {
                if !k.is_empty() {
                    return Some(Credential {
                        secret: Cow::Borrowed(k),
                        style: CredentialStyle::WebSocketProtocol,
                    });
                }
            }
        }
    }
    for (name, style) in [
        ("x-api-key", CredentialStyle::XApiKey),
        ("x-goog-api-key", CredentialStyle::XGoogApiKey),
    ] {
        if let Some(v) = headers.get(name) {
            let k = v.as_bytes().trim_ascii();
            if !k.is_empty() {
                return Some(Credential {
                    secret: Cow::Borrowed(k),
                    style,
                });
            }
        }
    }
    if let Some(k) = query.and_then(|q| query_param(q, "key")) {
        if !k.is_empty() {
            let secret = match k {
                Cow::Borrowed(s) => Cow::Borrowed(s.as_bytes()),
                Cow::Owned(s) => Cow::Owned(s.into_bytes()),
            };
            return Some(Credential {
                secret,
                style: CredentialStyle::QueryKey,
            });
        }
    }
    if let Some(v) = headers.get(http::header::AUTHORIZATION) {
        let v = v.as_bytes().trim_ascii();
        let k = match v.get(..7) {
            Some(scheme) if scheme.eq_ignore_ascii_case(b"bearer ") => v[7..].trim_ascii(),
            _ if v.eq_ignore_ascii_case(b"bearer") => b"",
            _ => v,
        };
        if !k.is_empty() {
            return Some(Credential {
                secret: Cow::Borrowed(k),
                style: CredentialStyle::Bearer,
            });
        }
    }
    None
}

/// The value of query parameter `name`, percent-decoded (`+` as space).
pub fn query_param<'a>(query: &'a str, name: &str) -> Option<Cow<'a, str>> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| decode_component(v))
    })
}

fn decode_component(v: &str) -> Cow<'_, str> {
    if !v.contains(['%', '+']) {
        return Cow::Borrowed(v);
    }
    let spaced = v.replace('+', " ");
    Cow::Owned(
        percent_encoding::percent_decode_str(&spaced)
            .decode_utf8_lossy()
            .into_owned(),
    )
}

/// `query` without any `key=` parameter; `None` when there was none to remove.
pub fn strip_query_key(query: &str) -> Option<String> {
    let mut removed = false;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let k = pair.split_once('=').map_or(*pair, |(k, _)| k);
            let drop = k == "key";
            removed |= drop;
            !drop
        })
        .collect();
    removed.then(|| kept.join("&"))
}

/// `Sec-WebSocket-Protocol` without the key part; `None` when nothing else remains.
pub fn strip_ws_key_protocol(value: &[u8]) -> Option<Vec<u8>> {
    let kept: Vec<&[u8]> = value
        .split(|&b| b == b',')
        .map(|p| p.trim_ascii())
        .filter(|p| !p.is_empty() && !p.starts_with(WS_KEY_PREFIX.as_bytes()))
        .collect();
    (!kept.is_empty()).then(|| kept.join(&b", "[..]))
}

/// The model in a Gemini path: `/v1beta/models/{model}:{method}` (also `/v1/…`, `/v1alpha/…`).
pub fn gemini_model(path: &str) -> Option<&str> {
    let rest = path
        .strip_prefix("/v1beta/models/")
        .or_else(|| path.strip_prefix("/v1/models/"))
        .or_else(|| path.strip_prefix("/v1alpha/models/"))?;
    let (model, _method) = rest.split_once(':')?;
    (!model.is_empty() && !model.contains('/')).then_some(model)
}

/// The value of the `model` field of a `multipart/form-data` body; two `model` fields are an
/// error (servers disagree on which one wins).
pub fn multipart_model(content_type: &str, body: &[u8]) -> Result<Option<String>, Denial> {
    let boundary = content_type.split(';').find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| v.trim().trim_matches('"'))
    });
    let Some(boundary) = boundary.filter(|b| !b.is_empty()) else {
        return Ok(None);
    };
    let delim = format!("--{boundary}");
    let next_delim = format!("\r\n{delim}");
    let Some(first) = memchr::memmem::find(body, delim.as_bytes()) else {
        return Ok(None);
    };
    let mut pos = first + delim.len();
    let mut found: Option<String> = None;
    loop {
        let Some(rest) = body.get(pos..) else {
            return Ok(found);
        };
        if rest.starts_with(b"--") {
            return Ok(found);
        }
        let Some(head_end) = memchr::memmem::find(rest, b"\r\n\r\n") else {
            return Ok(found);
        };
        let value_start = head_end + 4;
        let Some(value_len) = memchr::memmem::find(&rest[value_start..], next_delim.as_bytes())
        else {
            return Ok(found);
        };
        if is_model_part(&rest[..head_end]) {
            if found.is_some() {
                return Err(Denial::with_message(
                    Reason::InvalidModel,
                    "The form has more than one model field.",
                ));
            }
            let v = &rest[value_start..value_start + value_len];
            found = Some(String::from_utf8_lossy(v).trim().to_string());
        }
        pos += value_start + value_len + 2 + delim.len();
    }
}

fn is_model_part(head: &[u8]) -> bool {
    head.split(|&b| b == b'\n').any(|line| {
        let line = String::from_utf8_lossy(line).to_ascii_lowercase();
        line.starts_with("content-disposition:")
            && line
                .split(';')
                .any(|p| matches!(p.trim(), "name=\"model\"" | "name=model"))
    })
}

/// Whether a client-supplied request id is sane enough to keep: 1–128 of `[A-Za-z0-9._:-]`.
pub fn sane_request_id(v: &[u8]) -> bool {
    (1..=128).contains(&v.len())
        && v.iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn credential_order_is_the_specs() {
        let h = headers(&[
            ("authorization", "Bearer sk-bearer"),
            ("x-goog-api-key", "sk-goog"),
            ("x-api-key", "sk-anthropic"),
            (
                "sec-websocket-protocol",
                "realtime, openai-insecure-api-key.sk-ws",
            ),
        ]);
        let c = find_credential(&h, Some("key=sk-query")).unwrap();
        assert_eq!(&*c.secret, b"sk-ws");
        let h = headers(&[
            ("authorization", "Bearer sk-bearer"),
            ("x-goog-api-key", "sk-goog"),
        ]);
        assert_eq!(
            find_credential(&h, Some("key=q")).unwrap().style,
            CredentialStyle::XGoogApiKey
        );
        let h = headers(&[("authorization", "Bearer sk-bearer")]);
        let c = find_credential(&h, Some("a=1&key=sk-q")).unwrap();
        assert_eq!(
            (&*c.secret, c.style),
            (&b"sk-q"[..], CredentialStyle::QueryKey)
        );
        let c = find_credential(&h, None).unwrap();
        assert_eq!(&*c.secret, b"sk-bearer");
    }

    #[test]
    fn raw_key_and_empty_bearer() {
        let h = headers(&[("authorization", "sk-raw")]);
        assert_eq!(&*find_credential(&h, None).unwrap().secret, b"sk-raw");
        for v in ["Bearer", "Bearer ", "bearer   "] {
            let h = headers(&[("authorization", v)]);
            assert!(find_credential(&h, None).is_none(), "{v:?}");
        }
    }

    #[test]
    fn credential_debug_shows_a_prefix_only() {
        let h = headers(&[("authorization", "Bearer sk-abcdefghijklmnop")]);
        let s = format!("{:?}", find_credential(&h, None).unwrap());
        assert!(!s.contains("ghijkl"), "{s}");
    }

    #[test]
    fn stripping_query_and_ws_protocol() {
        assert_eq!(strip_query_key("a=1&key=x&b=2").as_deref(), Some("a=1&b=2"));
        assert_eq!(strip_query_key("a=1"), None);
        assert_eq!(
            strip_ws_key_protocol(b"realtime, openai-insecure-api-key.sk-x").as_deref(),
            Some(&b"realtime"[..])
        );
        assert_eq!(strip_ws_key_protocol(b"openai-insecure-api-key.sk-x"), None);
    }

    #[test]
    fn gemini_paths() {
        assert_eq!(
            gemini_model("/v1beta/models/gemini-1.5-pro:generateContent"),
            Some("gemini-1.5-pro")
        );
        assert_eq!(gemini_model("/v1beta/models"), None);
        assert_eq!(gemini_model("/v1/chat/completions"), None);
    }

    #[test]
    fn multipart() {
        let body = b"--XX\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\nRIFF\r\n--XX\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--XX--\r\n";
        let m = |ct: &str, b: &[u8]| multipart_model(ct, b).map_err(|d| d.reason);
        assert_eq!(
            m("multipart/form-data; boundary=XX", body),
            Ok(Some("whisper-1".into()))
        );
        assert_eq!(
            m("multipart/form-data; Boundary=XX", body),
            Ok(Some("whisper-1".into()))
        );
        assert_eq!(m("multipart/form-data; boundary=YY", body), Ok(None));
        assert_eq!(m("multipart/form-data", body), Ok(None));
        let twice = b"--XX\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\na\r\n--XX\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nb\r\n--XX--\r\n";
        assert_eq!(
            m("multipart/form-data; boundary=XX", twice),
            Err(Reason::InvalidModel)
        );
    }

    #[test]
    fn request_ids() {
        assert!(sane_request_id(b"req-123_abc.def:1"));
        assert!(!sane_request_id(b""));
        assert!(!sane_request_id(b"a b"));
        assert!(!sane_request_id(&[b'a'; 129]));
    }
}
