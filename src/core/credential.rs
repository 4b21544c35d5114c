//! Finding the key and the model in a request: headers, query, path and body. Pure functions
//! over plain data (a header map, a query string, body bytes); they know nothing of Pingora.

use crate::core::errors::{Denial, Reason};
use http::HeaderMap;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
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

/// Longest model name accepted, bytes.
pub const MAX_MODEL_LEN: usize = 256;

/// The `model` field as found in a body.
#[derive(Debug, Default, PartialEq, Eq)]
pub enum ModelField<'a> {
    /// Not present, or `null`.
    #[default]
    Absent,
    /// A string.
    Str(Cow<'a, str>),
    /// Present but not a string.
    NotAString,
}

/// The request fields keygate reads from a JSON body.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RequestFields<'a> {
    /// `model`.
    pub model: ModelField<'a>,
    /// `stream: true`.
    pub stream: bool,
    /// `stream_options.include_usage`, when given as a boolean.
    pub include_usage: Option<bool>,
    /// `max_completion_tokens`, else `max_tokens`, else `max_output_tokens`.
    pub max_tokens: Option<u64>,
    /// Whether the body has a top-level `stream_options` member.
    pub has_stream_options: bool,
}

/// The deepest nesting of arrays and objects accepted in a JSON request body, the top-level
/// object counting as one.
pub const MAX_JSON_DEPTH: usize = 128;

// The skipper keeps one bit per open container in a `u128`.
const _: () = assert!(MAX_JSON_DEPTH <= 128);

/// Read the fields keygate needs from a JSON request body, after checking the whole body, first
/// byte to last: one JSON object, well-formed to its end, nested at most [`MAX_JSON_DEPTH`]
/// deep, at most one `model`. Nothing is forwarded that this has not read to the end.
///
/// One pass, no allocation: the scanner walks the top-level members; the few keygate reads
/// (small values) are decoded by serde from their own bytes, every other value is checked by
/// [`Scanner::skip_value`] without being decoded. Member names match ASCII case-insensitively.
pub fn parse_json_fields(body: &[u8]) -> Result<RequestFields<'_>, Denial> {
    let mut s = Scanner {
        bytes: body,
        pos: 0,
    };
    s.skip_ws();
    match s.peek() {
        Some(b'{') => s.pos += 1,
        Some(_) => {
            return Err(Denial::with_message(
                Reason::InvalidJson,
                "The request body must be a JSON object.",
            ))
        }
        None => return Err(s.error("the body is empty")),
    }
    let mut out = RequestFields::default();
    let mut seen_model = false;
    let (mut mct, mut mt, mut mot) = (None, None, None);
    s.skip_ws();
    if !s.eat(b'}') {
        loop {
            let name_at = s.pos;
            let field = Field::from_json_name(s.member_name()?)
                .ok_or_else(|| s.error_at(name_at, "a member name that is not valid UTF-8"))?;
            s.skip_ws();
            let start = s.pos;
            s.skip_value(1)?;
            let value = &body[start..s.pos];
            match field {
                Field::Model => {
                    if std::mem::replace(&mut seen_model, true) {
                        return Err(s.error_at(name_at, "a second `model` member"));
                    }
                    out.model = decode::<ModelValue>(value, start)?.0;
                }
                Field::Stream => {
                    out.stream = decode::<Lenient<bool>>(value, start)?.0 == Some(true)
                }
                Field::StreamOptions => {
                    out.has_stream_options = true;
                    out.include_usage = decode::<StreamOptions>(value, start)?.0;
                }
                Field::MaxCompletionTokens => mct = decode::<Lenient<u64>>(value, start)?.0,
                Field::MaxTokens => mt = decode::<Lenient<u64>>(value, start)?.0,
                Field::MaxOutputTokens => mot = decode::<Lenient<u64>>(value, start)?.0,
                Field::Other => {}
            }
            s.skip_ws();
            match s.peek() {
                Some(b',') => {
                    s.pos += 1;
                    s.skip_ws();
                }
                Some(b'}') => {
                    s.pos += 1;
                    break;
                }
                Some(_) => return Err(s.error("expected ',' or '}'")),
                None => return Err(s.error("the body ends inside the object")),
            }
        }
    }
    s.skip_ws();
    if s.pos != body.len() {
        return Err(s.error("trailing characters after the object"));
    }
    out.max_tokens = mct.or(mt).or(mot);
    Ok(out)
}

/// A member value keygate reads, decoded by serde from its own bytes (already checked by the
/// scanner, so serde's own limits are never the ones that bind).
fn decode<'a, T: de::Deserialize<'a>>(value: &'a [u8], at: usize) -> Result<T, Denial> {
    serde_json::from_slice(value).map_err(|e| {
        Denial::with_message(
            Reason::InvalidJson,
            format!("The request body is not valid JSON: the value at byte {at}: {e}"),
        )
    })
}

/// A strict JSON scanner over a whole body: checks the grammar (RFC 8259) and the nesting depth
/// without decoding anything. As serde_json does when it skips a value, the bytes inside a
/// skipped string are not checked to be UTF-8 and `\u` escapes are not paired.
struct Scanner<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Scanner<'a> {
    #[inline]
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    #[inline]
    fn eat(&mut self, b: u8) -> bool {
        let hit = self.peek() == Some(b);
        self.pos += usize::from(hit);
        hit
    }

    #[inline]
    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\n' | b'\r' | b'\t')) {
            self.pos += 1;
        }
    }

    #[cold]
    fn error(&self, what: &str) -> Denial {
        self.error_at(self.pos, what)
    }

    #[cold]
    fn error_at(&self, at: usize, what: &str) -> Denial {
        let what = if at >= self.bytes.len() && !what.starts_with("the body") {
            format!("{what} (the body ends at byte {at})")
        } else {
            format!("{what} at byte {at}")
        };
        Denial::with_message(
            Reason::InvalidJson,
            format!("The request body is not valid JSON: {what}."),
        )
    }

    /// `"name"` and the `:` after it; the name as written (quotes included, escapes undecoded)
    /// and whether it has escapes.
    fn member_name(&mut self) -> Result<(&'a [u8], bool), Denial> {
        if self.peek() != Some(b'"') {
            return Err(self.error(if self.pos >= self.bytes.len() {
                "the body ends where a member name should be"
            } else {
                "expected a member name"
            }));
        }
        let start = self.pos;
        let escaped = self.skip_string()?;
        let quoted = &self.bytes[start..self.pos];
        self.skip_ws();
        if !self.eat(b':') {
            return Err(self.error("expected ':'"));
        }
        Ok((quoted, escaped))
    }

    /// Skip one value, checking it; `open` containers enclose it.
    fn skip_value(&mut self, open: usize) -> Result<(), Denial> {
        // Bit `n` set: the `n`th container opened here is an object (clear: an array).
        let mut objects: u128 = 0;
        let mut n: usize = 0;
        'value: loop {
            self.skip_ws();
            match self.peek() {
                Some(c @ (b'{' | b'[')) => {
                    if open + n >= MAX_JSON_DEPTH {
                        return Err(self.error(&format!(
                            "nesting deeper than {MAX_JSON_DEPTH} arrays and objects"
                        )));
                    }
                    self.pos += 1;
                    let object = c == b'{';
                    objects = (objects & !(1 << n)) | (u128::from(object) << n);
                    n += 1;
                    self.skip_ws();
                    if !self.eat(if object { b'}' } else { b']' }) {
                        if object {
                            self.member_name()?;
                        }
                        continue 'value;
                    }
                    n -= 1;
                }
                Some(b'"') => {
                    self.skip_string()?;
                }
                Some(b't') => self.literal(b"true")?,
                Some(b'f') => self.literal(b"false")?,
                Some(b'n') => self.literal(b"null")?,
                Some(b'-' | b'0'..=b'9') => self.skip_number()?,
                Some(_) => return Err(self.error("expected a value")),
                None => return Err(self.error("the body ends where a value should be")),
            }
            // A value is complete: close containers until one continues.
            loop {
                if n == 0 {
                    return Ok(());
                }
                self.skip_ws();
                let object = objects >> (n - 1) & 1 == 1;
                match self.peek() {
                    Some(b',') => {
                        self.pos += 1;
                        if object {
                            self.skip_ws();
                            self.member_name()?;
                        }
                        continue 'value;
                    }
                    Some(b'}') if object => n -= 1,
                    Some(b']') if !object => n -= 1,
                    None => return Err(self.error("the body ends inside an array or object")),
                    Some(_) if object => return Err(self.error("expected ',' or '}'")),
                    Some(_) => return Err(self.error("expected ',' or ']'")),
                }
                self.pos += 1;
            }
        }
    }

    /// Skip the string that starts here (at its quote); whether it has escapes.
    #[inline]
    fn skip_string(&mut self) -> Result<bool, Denial> {
        let start = self.pos;
        self.pos += 1;
        let mut escaped = false;
        loop {
            self.pos += string_run(&self.bytes[self.pos..]);
            match self.peek() {
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(escaped);
                }
                Some(b'\\') => {
                    escaped = true;
                    self.pos += 1;
                    match self.peek() {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {
                            self.pos += 1
                        }
                        Some(b'u') => {
                            let hex = self.bytes.get(self.pos + 1..self.pos + 5);
                            if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                                return Err(self.error("a bad \\u escape"));
                            }
                            self.pos += 5;
                        }
                        _ => return Err(self.error("a bad escape")),
                    }
                }
                Some(_) => return Err(self.error("a control character in a string")),
                None => return Err(self.error_at(start, "a string that does not end")),
            }
        }
    }

    fn literal(&mut self, word: &[u8]) -> Result<(), Denial> {
        if !self.bytes[self.pos..].starts_with(word) {
            return Err(self.error("expected a value"));
        }
        self.pos += word.len();
        Ok(())
    }

    /// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`
    fn skip_number(&mut self) -> Result<(), Denial> {
        let digits = |s: &mut Self| {
            let from = s.pos;
            while s.peek().is_some_and(|b| b.is_ascii_digit()) {
                s.pos += 1;
            }
            s.pos > from
        };
        self.eat(b'-');
        if !self.eat(b'0') && !digits(self) {
            return Err(self.error("a bad number"));
        }
        if self.eat(b'.') && !digits(self) {
            return Err(self.error("a bad number"));
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.pos += 1;
            if !self.eat(b'+') {
                self.eat(b'-');
            }
            if !digits(self) {
                return Err(self.error("a bad number"));
            }
        }
        Ok(())
    }
}

/// How many bytes from the start of `s` are plain string content: up to the first quote,
/// backslash or control character (or the end). Eight bytes at a time.
#[inline]
fn string_run(s: &[u8]) -> usize {
    const ONES: u64 = u64::MAX / 255;
    const HIGH: u64 = ONES << 7;
    let mut i = 0;
    while let Some(chunk) = s.get(i..i + 8) {
        let w = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
        // The "has a zero byte" trick: the lowest flagged byte is always a true match.
        let control = w.wrapping_sub(ONES * 0x20) & !w;
        let q = w ^ (ONES * u64::from(b'"'));
        let quote = q.wrapping_sub(ONES) & !q;
        let b = w ^ (ONES * u64::from(b'\\'));
        let backslash = b.wrapping_sub(ONES) & !b;
        let hits = (control | quote | backslash) & HIGH;
        if hits != 0 {
            return i + (hits.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while s
        .get(i)
        .is_some_and(|&b| b != b'"' && b != b'\\' && b >= 0x20)
    {
        i += 1;
    }
    i
}

/// A top-level member name keygate reads, recognized without allocating.
enum Field {
    Model,
    Stream,
    StreamOptions,
    MaxCompletionTokens,
    MaxTokens,
    MaxOutputTokens,
    Other,
}

impl Field {
    /// The field a member name means. Case-insensitive, as Go's encoding/json matches keys
    /// (Ollama, new-api and one-api relays): `MODEL` must not slip past a check on `model`.
    fn named(v: &[u8]) -> Field {
        let is = |name: &str| v.eq_ignore_ascii_case(name.as_bytes());
        if is("model") {
            Field::Model
        } else if is("stream") {
            Field::Stream
        } else if is("stream_options") {
            Field::StreamOptions
        } else if is("max_completion_tokens") {
            Field::MaxCompletionTokens
        } else if is("max_tokens") {
            Field::MaxTokens
        } else if is("max_output_tokens") {
            Field::MaxOutputTokens
        } else {
            Field::Other
        }
    }

    /// The field a member name means, given as the scanner found it (`quoted`, quotes
    /// included); `None` when the name is not valid UTF-8 once its escapes are decoded.
    fn from_json_name((quoted, escaped): (&[u8], bool)) -> Option<Field> {
        if escaped {
            // Rare: let serde decode the escapes (and check the surrogate pairs).
            return serde_json::from_slice::<Cow<str>>(quoted)
                .ok()
                .map(|name| Field::named(name.as_bytes()));
        }
        let name = &quoted[1..quoted.len() - 1];
        (name.is_ascii() || std::str::from_utf8(name).is_ok()).then(|| Field::named(name))
    }
}

/// A `stream_options` member name: whether it is `include_usage`.
struct IncludeUsageKey(bool);

impl<'de> de::Deserialize<'de> for IncludeUsageKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = IncludeUsageKey;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_str<E>(self, v: &str) -> Result<IncludeUsageKey, E> {
                Ok(IncludeUsageKey(v.eq_ignore_ascii_case("include_usage")))
            }
        }
        d.deserialize_identifier(V)
    }
}

struct ModelValue<'a>(ModelField<'a>);

impl<'de> de::Deserialize<'de> for ModelValue<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ModelValue<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a model name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(ModelValue(ModelField::Str(Cow::Borrowed(v))))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(ModelValue(ModelField::Str(Cow::Owned(v.to_owned()))))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(ModelValue(ModelField::Absent))
            }
            fn visit_none<E>(self) -> Result<Self::Value, E> {
                Ok(ModelValue(ModelField::Absent))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(ModelValue(ModelField::NotAString))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(ModelValue(ModelField::NotAString))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(ModelValue(ModelField::NotAString))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(ModelValue(ModelField::NotAString))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut s: A) -> Result<Self::Value, A::Error> {
                while s.next_element::<IgnoredAny>()?.is_some() {}
                Ok(ModelValue(ModelField::NotAString))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
                while m.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(ModelValue(ModelField::NotAString))
            }
        }
        d.deserialize_any(V)
    }
}

/// A value of type `T` if the JSON has one there, `None` (never an error) for anything else.
struct Lenient<T>(Option<T>);

macro_rules! lenient_visitor_common {
    () => {
        fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
            Ok(Lenient(None))
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(Lenient(None))
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut s: A) -> Result<Self::Value, A::Error> {
            while s.next_element::<IgnoredAny>()?.is_some() {}
            Ok(Lenient(None))
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
            while m.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(Lenient(None))
        }
    };
}

impl<'de> de::Deserialize<'de> for Lenient<bool> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Lenient<bool>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
                Ok(Lenient(Some(v)))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            lenient_visitor_common!();
        }
        d.deserialize_any(V)
    }
}

impl<'de> de::Deserialize<'de> for Lenient<u64> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Lenient<u64>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
                Ok(Lenient(u64::try_from(v).ok()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Lenient(Some(v)))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
                let ok = v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v < 1e15;
                Ok(Lenient(ok.then_some(v as u64)))
            }
            lenient_visitor_common!();
        }
        d.deserialize_any(V)
    }
}

/// `stream_options` → its `include_usage` when that is a boolean.
struct StreamOptions(Option<bool>);

impl<'de> de::Deserialize<'de> for StreamOptions {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StreamOptions;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
                let mut include = None;
                while let Some(IncludeUsageKey(is_it)) = m.next_key()? {
                    if is_it {
                        include = m.next_value::<Lenient<bool>>()?.0;
                    } else {
                        m.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(StreamOptions(include))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut s: A) -> Result<Self::Value, A::Error> {
                while s.next_element::<IgnoredAny>()?.is_some() {}
                Ok(StreamOptions(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(StreamOptions(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(StreamOptions(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(StreamOptions(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(StreamOptions(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(StreamOptions(None))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(StreamOptions(None))
            }
        }
        d.deserialize_any(V)
    }
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
    fn json_fields() {
        let f = parse_json_fields(
            br#"{"messages":[{"role":"user","content":"hi \"model\""}],"model":"gpt-4o","stream":true,"stream_options":{"include_usage":false},"max_tokens":7}"#,
        )
        .unwrap();
        assert_eq!(f.model, ModelField::Str(Cow::Borrowed("gpt-4o")));
        assert!(f.stream);
        assert_eq!(f.include_usage, Some(false));
        assert_eq!(f.max_tokens, Some(7));
    }

    #[test]
    fn json_bad_shapes() {
        assert_eq!(
            parse_json_fields(b"[1]").unwrap_err().reason,
            Reason::InvalidJson
        );
        assert_eq!(
            parse_json_fields(b"{").unwrap_err().reason,
            Reason::InvalidJson
        );
        assert_eq!(
            parse_json_fields(b"{} x").unwrap_err().reason,
            Reason::InvalidJson
        );
        let deep = "[".repeat(10_000);
        let body = format!("{{\"a\":{deep}");
        assert_eq!(
            parse_json_fields(body.as_bytes()).unwrap_err().reason,
            Reason::InvalidJson
        );
        assert_eq!(
            parse_json_fields(br#"{"model":5}"#).unwrap().model,
            ModelField::NotAString
        );
        assert_eq!(
            parse_json_fields(br#"{"model":null}"#).unwrap().model,
            ModelField::Absent
        );
        assert!(parse_json_fields(br#"{"model":"a","model":"b"}"#).is_err());
        assert!(parse_json_fields(br#"{"model":"a","MODEL":"b"}"#).is_err());
        let f = parse_json_fields(br#"{"model":"m","stream":"yes","max_tokens":-3}"#).unwrap();
        assert!(!f.stream);
        assert_eq!(f.max_tokens, None);
    }

    /// `{"model":"m","x":[[…1…]]}`, `levels` deep in all (the body's own object counting).
    fn arrays(levels: usize) -> String {
        let n = levels - 1;
        format!(r#"{{"model":"m","x":{}1{}}}"#, "[".repeat(n), "]".repeat(n))
    }

    /// `{"model":"m","x":{"a":{"a":…1…}}}`, `levels` deep in all.
    fn objects(levels: usize) -> String {
        let n = levels - 1;
        format!(
            r#"{{"model":"m","x":{}1{}}}"#,
            r#"{"a":"#.repeat(n),
            "}".repeat(n)
        )
    }

    #[test]
    fn json_nesting_is_limited_to_128_levels_wherever_it_is() {
        let reason = |b: &str| {
            parse_json_fields(b.as_bytes())
                .map(|_| ())
                .map_err(|d| d.reason)
        };
        assert_eq!(reason(&arrays(MAX_JSON_DEPTH)), Ok(()));
        assert_eq!(reason(&objects(MAX_JSON_DEPTH)), Ok(()));
        assert_eq!(
            reason(&arrays(MAX_JSON_DEPTH + 1)),
            Err(Reason::InvalidJson)
        );
        assert_eq!(
            reason(&objects(MAX_JSON_DEPTH + 1)),
            Err(Reason::InvalidJson)
        );
        // The issue's case: a well-formed body, 5,000 arrays deep, after the model.
        let deep = format!(
            r#"{{"model":"gpt-4o-mini","messages":{}{}}}"#,
            "[".repeat(5_000),
            "]".repeat(5_000)
        );
        let d = parse_json_fields(deep.as_bytes()).unwrap_err();
        assert_eq!(d.reason, Reason::InvalidJson);
        assert!(d.message.contains("deeper than 128"), "{}", d.message);
        // Before the model, and in the members keygate reads.
        let before = format!(
            r#"{{"messages":{}{},"model":"m"}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        assert_eq!(reason(&before), Err(Reason::InvalidJson));
        for member in ["model", "stream", "stream_options", "max_tokens"] {
            let b = format!(r#"{{"{member}":{}{}}}"#, "[".repeat(200), "]".repeat(200));
            assert_eq!(reason(&b), Err(Reason::InvalidJson), "{member}");
        }
    }

    #[test]
    fn json_is_checked_to_its_end_after_the_model() {
        let ok = br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"a \"q\" \u00e9\n"}],"temperature":0.7,"n":1,"stop":null,"logprobs":false,"x":[-1.5e+3,0,{}]}"#;
        assert!(parse_json_fields(ok).is_ok());
        for bad in [
            // Truncated after the model, anywhere.
            &br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]"#[..],
            br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}"#,
            br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"#,
            br#"{"model":"gpt-4o-mini","messages":[{"role":"user","#,
            br#"{"model":"gpt-4o-mini","messages":"#,
            br#"{"model":"gpt-4o-mini","#,
            br#"{"model":"gpt-4o-mini""#,
            // Trailing garbage.
            br#"{"model":"gpt-4o-mini","messages":[]} x"#,
            br#"{"model":"gpt-4o-mini","messages":[]}}"#,
            br#"{"model":"gpt-4o-mini","messages":[]}{}"#,
            // Broken inside a member keygate does not read.
            br#"{"model":"gpt-4o-mini","messages":[}"#,
            br#"{"model":"gpt-4o-mini","messages":[1,]}"#,
            br#"{"model":"gpt-4o-mini","messages":[{"a" 1}]}"#,
            br#"{"model":"gpt-4o-mini","messages":[{"a":1,}]}"#,
            br#"{"model":"gpt-4o-mini","messages":[{1:1}]}"#,
            br#"{"model":"gpt-4o-mini","messages":[tru]}"#,
            br#"{"model":"gpt-4o-mini","messages":[01]}"#,
            br#"{"model":"gpt-4o-mini","messages":[1.]}"#,
            br#"{"model":"gpt-4o-mini","messages":[1e]}"#,
            br#"{"model":"gpt-4o-mini","messages":[-]}"#,
            br#"{"model":"gpt-4o-mini","messages":["\x"]}"#,
            br#"{"model":"gpt-4o-mini","messages":["\u12g4"]}"#,
            b"{\"model\":\"gpt-4o-mini\",\"messages\":[\"a\tb\"]}",
            br#"{"model":"gpt-4o-mini",,"messages":[]}"#,
            br#"{"model":"gpt-4o-mini" "messages":[]}"#,
        ] {
            let d = parse_json_fields(bad).unwrap_err();
            assert_eq!(
                d.reason,
                Reason::InvalidJson,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn escaped_member_names_are_decoded() {
        let f = parse_json_fields(br#"{"mod\u0065l":"a","\u0073tream":true}"#).unwrap();
        assert_eq!(f.model, ModelField::Str(Cow::Borrowed("a")));
        assert!(f.stream);
        assert!(parse_json_fields(br#"{"model":"a","MOD\u0045L":"b"}"#).is_err());
        assert!(parse_json_fields(br#"{"\ud800":1}"#).is_err());
        assert!(parse_json_fields(b"{\"\xff\":1}").is_err());
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
