//! Reading the fields keygate needs from a JSON request body (`model`, `stream`,
//! `stream_options.include_usage`, `max_tokens`), after the whole body has been checked by
//! [`crate::core::json_scan`]. Pure.

use crate::core::errors::{Denial, Reason};
use crate::core::json_scan::Scanner;
pub use crate::core::json_scan::MAX_JSON_DEPTH;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use std::borrow::Cow;
use std::fmt;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
