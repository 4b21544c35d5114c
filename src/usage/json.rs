//! Reading usage from a JSON response body (OpenAI, Anthropic and Gemini dialects): a scanner
//! for the common shape, serde for everything else.

use crate::core::pricing::Usage;
use serde::Deserialize;

/// Token counts as found, field by field (a stream may report them in separate events).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PartialUsage {
    /// Prompt / input tokens.
    pub prompt: Option<u64>,
    /// Completion / output tokens.
    pub completion: Option<u64>,
}

impl PartialUsage {
    /// Later values win field by field.
    pub fn merge(&mut self, other: PartialUsage) {
        if other.prompt.is_some() {
            self.prompt = other.prompt;
        }
        if other.completion.is_some() {
            self.completion = other.completion;
        }
    }

    /// Complete usage when any field was reported (a missing field counts as 0).
    pub fn usage(&self) -> Option<Usage> {
        (self.prompt.is_some() || self.completion.is_some()).then(|| Usage {
            prompt_tokens: self.prompt.unwrap_or(0),
            completion_tokens: self.completion.unwrap_or(0),
        })
    }
}

#[derive(Deserialize, Default)]
struct UsageObject {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct GeminiUsage {
    prompt_token_count: Option<u64>,
    candidates_token_count: Option<u64>,
    thoughts_token_count: Option<u64>,
}

#[derive(Deserialize, Default)]
struct MessageObject {
    usage: Option<UsageObject>,
}

/// The fields of a response object (or an SSE event's data) that carry usage.
#[derive(Deserialize, Default)]
struct UsageCarrier {
    usage: Option<UsageObject>,
    #[serde(rename = "usageMetadata")]
    usage_metadata: Option<GeminiUsage>,
    /// Anthropic `message_start` carries the input tokens in `message.usage`.
    message: Option<MessageObject>,
    /// Responses API events carry the final object in `response.usage`.
    response: Option<MessageObject>,
}

impl UsageObject {
    fn partial(&self) -> PartialUsage {
        PartialUsage {
            prompt: self.prompt_tokens.or(self.input_tokens),
            completion: self.completion_tokens.or(self.output_tokens),
        }
    }
}

/// Usage in a JSON document (a whole response body or one SSE event's data).
///
/// Only the top-level members that can carry usage are parsed: the rest of the document (the
/// completion's text, for one) is skipped by a scanner that looks for quotes and brackets, which
/// is several times faster than parsing it. Anything the scanner does not expect (an escaped
/// member name, a repeated usage member, malformed JSON) falls back to the full parse, so the
/// answer is the same for every valid document (checked by a property test and the fuzzer).
pub fn usage_from_json(doc: &[u8]) -> PartialUsage {
    match carrier_by_scan(doc) {
        Some(c) => usage_in(c),
        None => usage_from_json_parsed(doc),
    }
}

/// [`usage_from_json`] by a full parse of the document.
pub fn usage_from_json_parsed(doc: &[u8]) -> PartialUsage {
    match serde_json::from_slice::<UsageCarrier>(doc) {
        Ok(c) => usage_in(c),
        Err(_) => PartialUsage::default(),
    }
}

/// The usage-carrying members of a JSON object, found by [`top_level_members`]; `None` when the
/// scan cannot decide alone.
fn carrier_by_scan(doc: &[u8]) -> Option<UsageCarrier> {
    fn parse<T: serde::de::DeserializeOwned>(
        slot: &mut Option<T>,
        seen: &mut bool,
        v: &[u8],
    ) -> bool {
        if std::mem::replace(seen, true) {
            return false; // a repeated member: serde refuses the document
        }
        match serde_json::from_slice::<Option<T>>(v) {
            Ok(t) => {
                *slot = t;
                true
            }
            Err(_) => false,
        }
    }
    let mut c = UsageCarrier::default();
    let mut seen = [false; 4];
    let mut ok = true;
    top_level_members(doc, |key, value| {
        ok &= match key {
            b"usage" => match usage_object_by_scan(value) {
                Some(u) if !std::mem::replace(&mut seen[0], true) => {
                    c.usage = Some(u);
                    true
                }
                Some(_) => false, // repeated
                None => parse(&mut c.usage, &mut seen[0], value),
            },
            b"usageMetadata" => parse(&mut c.usage_metadata, &mut seen[1], value),
            b"message" => parse(&mut c.message, &mut seen[2], value),
            b"response" => parse(&mut c.response, &mut seen[3], value),
            _ => true,
        };
    })?;
    ok.then_some(c)
}

/// A usage object by scanning: the counts are plain integers or `null`, the other members are
/// skipped. `None` when serde could answer otherwise (a repeated count, a count that is not a
/// canonical `u64`, not an object): the caller then parses it.
fn usage_object_by_scan(v: &[u8]) -> Option<UsageObject> {
    let mut u = UsageObject::default();
    let mut seen = [false; 4];
    let mut ok = true;
    top_level_members(v, |key, value| {
        let (slot, seen) = match key {
            b"prompt_tokens" => (&mut u.prompt_tokens, &mut seen[0]),
            b"completion_tokens" => (&mut u.completion_tokens, &mut seen[1]),
            b"input_tokens" => (&mut u.input_tokens, &mut seen[2]),
            b"output_tokens" => (&mut u.output_tokens, &mut seen[3]),
            _ => return,
        };
        ok &= !std::mem::replace(seen, true);
        match json_count(value) {
            Some(n) => *slot = n,
            None => ok = false,
        }
    })?;
    ok.then_some(u)
}

/// A JSON `null` (`Some(None)`) or a [`canonical_u64`]; `None` for anything else.
fn json_count(v: &[u8]) -> Option<Option<u64>> {
    if v == b"null" {
        return Some(None);
    }
    canonical_u64(v).map(Some)
}

/// A non-negative integer written canonically (digits only, no leading zero) that fits a `u64`,
/// as JSON counts and HTTP lengths are written; `None` for anything else.
pub fn canonical_u64(v: &[u8]) -> Option<u64> {
    if v.is_empty() || (v[0] == b'0' && v.len() > 1) {
        return None;
    }
    v.iter().try_fold(0u64, |n, &d| {
        if !d.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// Call `member(name, raw value)` for each member of the JSON object `doc`, skipping values
/// without parsing them. `None` when `doc` is not a plain object as expected (the caller then
/// parses it fully): escaped member names, trailing commas, missing separators, trailing data.
fn top_level_members<'a>(doc: &'a [u8], mut member: impl FnMut(&'a [u8], &'a [u8])) -> Option<()> {
    let ws = |i: usize| {
        let mut i = i;
        while doc
            .get(i)
            .is_some_and(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
        {
            i += 1;
        }
        i
    };
    let mut i = ws(0);
    if doc.get(i) != Some(&b'{') {
        return None;
    }
    i = ws(i + 1);
    if doc.get(i) == Some(&b'}') {
        return (ws(i + 1) == doc.len()).then_some(());
    }
    loop {
        if doc.get(i) != Some(&b'"') {
            return None;
        }
        let end = skip_string(doc, i)?;
        let key = &doc[i + 1..end - 1];
        // Escapes and invalid UTF-8 make serde decode (or refuse) the name: its call.
        if key.contains(&b'\\') || (!key.is_ascii() && std::str::from_utf8(key).is_err()) {
            return None;
        }
        i = ws(end);
        if doc.get(i) != Some(&b':') {
            return None;
        }
        let start = ws(i + 1);
        let stop = skip_value(doc, start)?;
        member(key, &doc[start..stop]);
        i = ws(stop);
        match doc.get(i) {
            Some(b',') => i = ws(i + 1),
            Some(b'}') => return (ws(i + 1) == doc.len()).then_some(()),
            _ => return None,
        }
    }
}

/// The index just past the string that starts at `doc[i]` (a quote).
fn skip_string(doc: &[u8], i: usize) -> Option<usize> {
    /// Most strings here are short (member names, ids, roles): a plain loop over their first
    /// bytes costs less than setting up `memchr`.
    const SHORT: usize = 16;
    let mut j = i + 1;
    loop {
        let rest = doc.get(j..)?;
        let k = j + match rest
            .iter()
            .take(SHORT)
            .position(|&b| b == b'"' || b == b'\\')
        {
            Some(at) => at,
            None if rest.len() <= SHORT => return None,
            None => SHORT + memchr::memchr2(b'"', b'\\', &rest[SHORT..])?,
        };
        if doc[k] == b'"' {
            return Some(k + 1);
        }
        j = k + 2;
    }
}

/// The index just past the JSON value that starts at `doc[i]`.
fn skip_value(doc: &[u8], i: usize) -> Option<usize> {
    match *doc.get(i)? {
        b'"' => skip_string(doc, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            while let Some(&b) = doc.get(j) {
                match b {
                    b'"' => {
                        j = skip_string(doc, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            None
        }
        _ => {
            // A number or a literal: up to the next separator.
            let len = doc[i..]
                .iter()
                .position(|b| matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\r' | b'\n'))
                .unwrap_or(doc.len() - i);
            (len > 0).then_some(i + len)
        }
    }
}

fn usage_in(c: UsageCarrier) -> PartialUsage {
    let mut out = PartialUsage::default();
    for m in [c.message, c.response].into_iter().flatten() {
        if let Some(u) = m.usage {
            out.merge(u.partial());
        }
    }
    if let Some(u) = c.usage {
        out.merge(u.partial());
    }
    if let Some(g) = c.usage_metadata {
        out.merge(PartialUsage {
            prompt: g.prompt_token_count,
            completion: match (g.candidates_token_count, g.thoughts_token_count) {
                (None, None) => None,
                (a, b) => Some(a.unwrap_or(0).saturating_add(b.unwrap_or(0))),
            },
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn json_usage_in_each_dialect() {
        let openai =
            br#"{"id":"x","usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17}}"#;
        assert_eq!(
            usage_from_json(openai).usage(),
            Some(Usage {
                prompt_tokens: 12,
                completion_tokens: 5
            })
        );
        let anthropic = br#"{"type":"message","usage":{"input_tokens":7,"output_tokens":3}}"#;
        assert_eq!(
            usage_from_json(anthropic).usage(),
            Some(Usage {
                prompt_tokens: 7,
                completion_tokens: 3
            })
        );
        let gemini = br#"{"candidates":[],"usageMetadata":{"promptTokenCount":4,"candidatesTokenCount":6,"thoughtsTokenCount":2}}"#;
        assert_eq!(
            usage_from_json(gemini).usage(),
            Some(Usage {
                prompt_tokens: 4,
                completion_tokens: 8
            })
        );
        assert_eq!(usage_from_json(br#"{"usage":null}"#).usage(), None);
        assert_eq!(usage_from_json(b"not json").usage(), None);
    }

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        use serde_json::Value;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<u32>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-1000i64..1000).prop_map(Value::from),
            (-1e6f64..1e6).prop_map(Value::from),
            "[a-z\\\\\"{}\\[\\],: ]{0,12}".prop_map(Value::String),
            // Around the scanner's 16-byte short-string loop, escapes included.
            "[a-z\\\\\"]{13,40}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 40, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(serde_json::Value::Array),
                prop::collection::vec(
                    (
                        prop_oneof![
                            Just("usage".to_string()),
                            Just("prompt_tokens".to_string()),
                            Just("completion_tokens".to_string()),
                            Just("input_tokens".to_string()),
                            Just("output_tokens".to_string()),
                            Just("message".to_string()),
                            Just("response".to_string()),
                            Just("usageMetadata".to_string()),
                            Just("promptTokenCount".to_string()),
                            "[a-z\\\\\"]{1,8}",
                        ],
                        inner
                    ),
                    0..6
                )
                .prop_map(|kv| serde_json::Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// The scanning fast path gives the full parse's answer on every valid document, also
        /// when written with whitespace, and with a member repeated (serde refuses those).
        #[test]
        fn scanning_agrees_with_the_full_parse(
            v in json_value(),
            pretty in any::<bool>(),
            dup in any::<bool>(),
        ) {
            let mut doc = if pretty {
                serde_json::to_vec_pretty(&v).unwrap()
            } else {
                serde_json::to_vec(&v).unwrap()
            };
            if dup && doc.first() == Some(&b'{') && doc.len() > 2 {
                let mut d = br#"{"usage":{"prompt_tokens":1},"#.to_vec();
                d.extend_from_slice(&doc[1..]);
                doc = d;
            }
            prop_assert_eq!(usage_from_json(&doc), usage_from_json_parsed(&doc));
        }
    }

    #[test]
    fn a_member_name_that_is_not_utf8_is_left_to_the_full_parse() {
        // Found by the json_usage fuzz target: serde refuses the whole document.
        let doc = b"{\"c\xff\xff\xff\xffdates\":[],\"usageMetadata\":{\"promptTokenCount\":5}}";
        assert!(carrier_by_scan(doc).is_none());
        assert_eq!(usage_from_json(doc), usage_from_json_parsed(doc));
    }

    #[test]
    fn usage_counts_serde_would_read_otherwise_are_left_to_it() {
        for (doc, scanned) in [
            (
                &br#"{"usage":{"prompt_tokens":12,"completion_tokens":null,"x":{"y":[1]}}}"#[..],
                true,
            ),
            (
                br#"{"usage":{"input_tokens":0,"output_tokens":18446744073709551615}}"#,
                true,
            ),
            (
                br#"{"usage":{"prompt_tokens":18446744073709551616}}"#,
                false,
            ),
            (br#"{"usage":{"prompt_tokens":12.0}}"#, false),
            (br#"{"usage":{"prompt_tokens":1e3}}"#, false),
            (br#"{"usage":{"prompt_tokens":-1}}"#, false),
            (br#"{"usage":{"prompt_tokens":"12"}}"#, false),
            (br#"{"usage":{"prompt_tokens":1,"prompt_tokens":2}}"#, false),
            (br#"{"usage":null}"#, false),
        ] {
            let text = String::from_utf8_lossy(doc);
            let usage = &doc[9..doc.len() - 1];
            assert_eq!(usage_object_by_scan(usage).is_some(), scanned, "{text}");
            assert_eq!(usage_from_json(doc), usage_from_json_parsed(doc), "{text}");
        }
    }

    #[test]
    fn scanning_finds_usage_past_the_text() {
        let doc = br#"{"id":"x","choices":[{"message":{"content":"a \"usage\": {\"prompt_tokens\": 99} ]}"}}],"usage":{"prompt_tokens":12,"completion_tokens":9}}"#;
        assert!(carrier_by_scan(doc).is_some());
        assert_eq!(
            usage_from_json(doc).usage(),
            Some(Usage {
                prompt_tokens: 12,
                completion_tokens: 9
            })
        );
    }

    #[test]
    fn strings_around_the_short_loop_end_where_serde_says() {
        for len in 12..20 {
            for at in 0..len {
                let text = "a".repeat(len);
                // An escaped quote or backslash at every offset, then the usage after it.
                for esc in ["\\\"", "\\\\"] {
                    let name = format!("{}{esc}{}", &text[..at], &text[at..]);
                    let doc = format!(r#"{{"x":"{name}","usage":{{"prompt_tokens":{len}}}}}"#);
                    assert_eq!(
                        usage_from_json(doc.as_bytes()),
                        usage_from_json_parsed(doc.as_bytes()),
                        "{doc}"
                    );
                    assert_eq!(
                        usage_from_json(doc.as_bytes()).prompt,
                        Some(len as u64),
                        "{doc}"
                    );
                }
            }
        }
    }
}
