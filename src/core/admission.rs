//! The pure admission checks: the header-only key checks (credential, lookup, status, expiry,
//! IP) and finding the model a request names. Plain data in (a header map, a query, a body, an
//! `IpAddr`, a time), a value or a [`Denial`] out; nothing of Pingora.

use crate::core::credential::{self, CredentialStyle, ModelField};
use crate::core::errors::{Denial, Reason};
use crate::core::policy;
use crate::core::table::{key_digest, Digest, KeyTable};
use http::HeaderMap;
use ipnet::IpNet;
use std::borrow::Cow;
use std::net::IpAddr;

/// A key that passed the header-only checks (credential, lookup, status, expiry, IP).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeyAdmission {
    /// The key's digest in the table snapshot.
    pub digest: Digest,
    /// Its slot in that snapshot ([`KeyTable::at_slot`]).
    pub slot: u32,
    /// The key's id.
    pub key_id: u64,
    /// Where the client put the key.
    pub style: CredentialStyle,
    /// The client IP the checks used.
    pub client_ip: IpAddr,
}

impl std::fmt::Debug for KeyAdmission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyAdmission")
            .field("key_id", &self.key_id)
            .field("style", &self.style)
            .field("client_ip", &self.client_ip)
            .finish()
    }
}

/// The header-only checks, in the spec's order: credential, lookup, status, expiry, IP.
/// Pure: no I/O, no Pingora types.
#[inline]
pub fn admit_key(
    table: &KeyTable,
    headers: &HeaderMap,
    query: Option<&str>,
    peer: IpAddr,
    trusted_proxies: &[IpNet],
    now_unix: i64,
) -> std::result::Result<KeyAdmission, Denial> {
    admit_key_for(table, headers, query, peer, trusted_proxies, Some(now_unix))
}

/// [`admit_key`], with the expiry check skipped when `now_unix` is `None` (the read-only usage
/// endpoints, which expired keys may still read).
pub fn admit_key_for(
    table: &KeyTable,
    headers: &HeaderMap,
    query: Option<&str>,
    peer: IpAddr,
    trusted_proxies: &[IpNet],
    now_unix: Option<i64>,
) -> std::result::Result<KeyAdmission, Denial> {
    let cred = credential::find_credential(headers, query).ok_or(Reason::MissingApiKey)?;
    let digest = key_digest(&cred.secret);
    let (slot, key) = table.lookup_slot(&digest).ok_or(Reason::InvalidApiKey)?;
    policy::check_key_state(key, now_unix.unwrap_or(i64::MIN))?;
    if let Some(account) = table.account_of(key) {
        if account.status == crate::core::config::KeyStatus::Disabled {
            return Err(Denial::with_message(
                Reason::AccountDisabled,
                format!(
                    "The account {:?} of this API key has been disabled.",
                    &*account.id
                ),
            ));
        }
    }
    let client_ip = if trusted_proxies.is_empty() {
        policy::canonical_ip(peer)
    } else {
        let xff: Vec<&[u8]> = headers
            .get_all("x-forwarded-for")
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        policy::client_ip(peer, &xff, trusted_proxies)
    };
    policy::check_ip(key, client_ip)?;
    Ok(KeyAdmission {
        digest,
        slot,
        key_id: key.id,
        style: cred.style,
        client_ip,
    })
}

/// The model a request names: a Gemini path, the JSON body's `model`, a multipart `model`
/// field, or `?model=`, in that order. `Ok(None)` when there is none.
pub fn find_model<'a>(
    path: &'a str,
    query: Option<&'a str>,
    content_type: Option<&str>,
    body: &'a [u8],
) -> std::result::Result<(Option<Cow<'a, str>>, BodyFacts), Denial> {
    let mut facts = BodyFacts::default();
    let ct = content_type.unwrap_or("").trim_start().to_ascii_lowercase();
    // Percent-decoded, as the upstream will read it (`gemini-1.5-pr%6F` is `gemini-1.5-pro`).
    let mut model = credential::gemini_model(path)
        .map(|m| percent_encoding::percent_decode_str(m).decode_utf8_lossy());
    if model.is_some() {
        // The model is in the path; the body is the upstream's business.
    } else if ct.starts_with("multipart/form-data") {
        model = credential::multipart_model(content_type.unwrap_or(""), body)?.map(Cow::Owned);
    } else if ct.contains("json") || body.trim_ascii_start().first() == Some(&b'{') {
        let fields = credential::parse_json_fields(body)?;
        facts = BodyFacts {
            stream: fields.stream,
            include_usage: fields.include_usage,
            max_tokens: fields.max_tokens,
            has_stream_options: fields.has_stream_options,
            is_json: true,
        };
        match fields.model {
            ModelField::Str(s) => model = Some(s),
            ModelField::NotAString => return Err(Denial::new(Reason::InvalidModel)),
            ModelField::Absent => {}
        }
    } else if !body.is_empty() && ct.is_empty() {
        // A body with no content type that is not a JSON object.
        credential::parse_json_fields(body)?;
    }
    if model.is_none() && body.is_empty() {
        // `?model=` names the model only for requests without a body (realtime): a body that
        // names none must not be routed and priced by the query while it says otherwise.
        model = query.and_then(|q| credential::query_param(q, "model"));
    }
    match model {
        Some(m) if m.len() > credential::MAX_MODEL_LEN => Err(Denial::with_message(
            Reason::InvalidModel,
            format!(
                "The model name is longer than {} bytes.",
                credential::MAX_MODEL_LEN
            ),
        )),
        Some(m) if m.is_empty() => Ok((None, facts)),
        m => Ok((m, facts)),
    }
}

/// What the body says about the call, for the quota reservation and usage accounting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BodyFacts {
    /// `stream: true`.
    pub stream: bool,
    /// `stream_options.include_usage` as the client sent it.
    pub include_usage: Option<bool>,
    /// The completion budget the client asked for.
    pub max_tokens: Option<u64>,
    /// The body has a top-level `stream_options`.
    pub has_stream_options: bool,
    /// The body was read as JSON.
    pub is_json: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_sources_in_order() {
        let (m, _) = find_model(
            "/v1beta/models/gemini-pro:generateContent",
            None,
            None,
            b"{\"model\":\"x\"}",
        )
        .unwrap();
        assert_eq!(m.as_deref(), Some("gemini-pro"));
        let (m, f) = find_model(
            "/v1/chat/completions",
            None,
            Some("application/json"),
            br#"{"model":"gpt-4o","stream":true}"#,
        )
        .unwrap();
        assert_eq!(m.as_deref(), Some("gpt-4o"));
        assert!(f.stream);
        let (m, _) = find_model("/v1/realtime", Some("model=gpt-4o-realtime"), None, b"").unwrap();
        assert_eq!(m.as_deref(), Some("gpt-4o-realtime"));
        let (m, _) = find_model(
            "/v1/chat/completions",
            None,
            Some("application/json"),
            b"{}",
        )
        .unwrap();
        assert_eq!(m, None);
        let long = format!("{{\"model\":\"{}\"}}", "x".repeat(100_000));
        assert_eq!(
            find_model(
                "/v1/chat/completions",
                None,
                Some("application/json"),
                long.as_bytes()
            )
            .unwrap_err()
            .reason,
            Reason::InvalidModel
        );
        // Found by fuzzing: the path is bounded like the body.
        let path = format!("/v1beta/models/{}:generateContent", "g".repeat(300));
        assert_eq!(
            find_model(&path, None, None, b"{}").unwrap_err().reason,
            Reason::InvalidModel
        );
        assert_eq!(
            find_model("/v1/x", None, Some("application/json"), b"[\"gpt-4o\"]")
                .unwrap_err()
                .reason,
            Reason::InvalidJson
        );
    }
}
