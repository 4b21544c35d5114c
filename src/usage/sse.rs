//! Reading usage from an SSE stream as it passes, and removing the usage chunk keygate asked
//! for on a client's behalf.

use super::json::{usage_from_json, PartialUsage};
use bytes::{Bytes, BytesMut};
use serde::Deserialize;

/// Follows an SSE response chunk by chunk: finds usage in complete `data:` lines without copying
/// the stream (only a partial last line is carried over), counts events, and in strip mode
/// removes the usage chunk and the `"usage":null` fields that keygate's `include_usage` added.
#[derive(Default)]
pub struct SseTracker {
    strip: bool,
    carry: Vec<u8>,
    pending: BytesMut,
    usage: PartialUsage,
    events: u64,
    bytes: u64,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(hay, needle)
}

impl SseTracker {
    /// A tracker; `strip` when keygate asked for the usage chunk and the client did not.
    pub fn new(strip: bool) -> SseTracker {
        SseTracker {
            strip,
            ..SseTracker::default()
        }
    }

    /// Usage seen so far.
    pub fn usage(&self) -> PartialUsage {
        self.usage
    }

    /// `data:` events seen so far (excluding `[DONE]`).
    pub fn events(&self) -> u64 {
        self.events
    }

    /// Body bytes seen so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Process one chunk; returns what to send downstream (the same bytes unless stripping).
    pub fn feed(&mut self, chunk: Bytes) -> Bytes {
        self.bytes += chunk.len() as u64;
        if self.strip {
            self.pending.extend_from_slice(&chunk);
            return self.drain_complete_events(false);
        }
        self.scan_lines(&chunk);
        chunk
    }

    /// End of stream: whatever is still held back.
    pub fn finish(&mut self) -> Bytes {
        if self.strip {
            self.drain_complete_events(true)
        } else {
            let rest = std::mem::take(&mut self.carry);
            self.line(&rest);
            Bytes::new()
        }
    }

    fn scan_lines(&mut self, chunk: &[u8]) {
        let mut start = 0;
        for nl in memchr::memchr_iter(b'\n', chunk) {
            if self.carry.is_empty() {
                self.line(&chunk[start..nl]);
            } else {
                let mut l = std::mem::take(&mut self.carry);
                l.extend_from_slice(&chunk[start..nl]);
                self.line(&l);
            }
            start = nl + 1;
        }
        self.carry.extend_from_slice(&chunk[start..]);
    }

    /// One line: a `data:` line is counted, and parsed when it can carry usage.
    fn line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        let data = data.trim_ascii();
        if data == b"[DONE]" || data.is_empty() {
            return;
        }
        self.events += 1;
        if has_usage_object(data) {
            self.usage.merge(usage_from_json(data));
        }
    }

    /// Strip mode: emit every complete event, without the usage-only chunk and without
    /// `"usage":null`; keep an incomplete last event for the next chunk (all of it at the end).
    fn drain_complete_events(&mut self, at_end: bool) -> Bytes {
        if self.pending.len() > MAX_HELD_BACK {
            // No event boundary in sight: not an SSE stream keygate understands. Stop holding
            // back and pass everything through unchanged from here on.
            self.strip = false;
            let rest = self.pending.split().freeze();
            self.scan_lines(&rest);
            return rest;
        }
        let mut out = BytesMut::with_capacity(self.pending.len());
        loop {
            let lf = find(&self.pending, b"\n\n").map(|i| i + 2);
            let crlf = find(&self.pending, b"\r\n\r\n").map(|i| i + 4);
            let boundary = match (lf, crlf) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let end = match boundary {
                Some(e) => e,
                None if at_end && !self.pending.is_empty() => self.pending.len(),
                None => break,
            };
            let event = self.pending.split_to(end);
            let mut usage_only = false;
            for l in event[..].split(|&b| b == b'\n') {
                let before = self.usage;
                self.line(l);
                if self.usage != before {
                    let data = l.strip_suffix(b"\r").unwrap_or(l);
                    usage_only |= data.strip_prefix(b"data:").is_some_and(is_usage_only_chunk);
                }
            }
            if !usage_only {
                append_without_null_usage(&mut out, &event);
            }
        }
        out.freeze()
    }
}

/// Most of a stream held back while looking for the end of an event in strip mode.
const MAX_HELD_BACK: usize = 1024 * 1024;

/// Whether an event is the usage-only chunk `include_usage` adds: `choices` an empty array and
/// a `usage` object (decided on the parsed JSON, whatever its spacing).
fn is_usage_only_chunk(data: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Chunk {
        choices: Option<Vec<serde::de::IgnoredAny>>,
        usage: Option<serde::de::IgnoredAny>,
    }
    serde_json::from_slice::<Chunk>(data.trim_ascii())
        .is_ok_and(|c| c.choices.is_some_and(|v| v.is_empty()) && c.usage.is_some())
}

/// Whether an event's JSON has a `"usage": {` or `"usageMetadata": {` member: a cheap test that
/// skips the `"usage":null` every OpenAI chunk carries before the JSON is parsed.
fn has_usage_object(data: &[u8]) -> bool {
    let mut rest = data;
    while let Some(i) = find(rest, b"\"usage") {
        let mut tail = &rest[i + 6..];
        tail = tail.strip_prefix(b"Metadata").unwrap_or(tail);
        if let Some(t) = tail.strip_prefix(b"\"") {
            let t = t.trim_ascii_start();
            if let Some(t) = t.strip_prefix(b":") {
                if t.trim_ascii_start().first() == Some(&b'{') {
                    return true;
                }
            }
        }
        rest = &rest[i + 6..];
    }
    false
}

/// Copy `event` into `out` without the `"usage":null` members an `include_usage` stream adds.
fn append_without_null_usage(out: &mut BytesMut, event: &[u8]) {
    let mut rest = event;
    loop {
        let hit = [&b",\"usage\":null"[..], &b"\"usage\":null,"[..]]
            .iter()
            .filter_map(|n| find(rest, n).map(|i| (i, n.len())))
            .min();
        match hit {
            Some((i, n)) => {
                out.extend_from_slice(&rest[..i]);
                rest = &rest[i + n..];
            }
            None => {
                out.extend_from_slice(rest);
                return;
            }
        }
    }
}

/// Feed `stream` to `t` in pieces cut at `cuts` (ascending, inside the stream), then finish it;
/// everything `t` passed on. Shared by the `sse` fuzz target and the tracker's tests.
pub fn feed_in_pieces(t: &mut SseTracker, stream: &[u8], cuts: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut prev = 0;
    for &c in cuts.iter().chain(std::iter::once(&stream.len())) {
        out.extend_from_slice(&t.feed(Bytes::copy_from_slice(&stream[prev..c])));
        prev = c;
    }
    out.extend_from_slice(&t.finish());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::pricing::Usage;
    use feed_in_pieces as run;
    use proptest::prelude::*;

    const OPENAI_STREAM: &str = concat!(
        "data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\" there\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2}}\n\n",
        "data: [DONE]\n\n"
    );

    #[test]
    fn usage_object_test() {
        assert!(has_usage_object(br#"{"usage":{"prompt_tokens":1}}"#));
        assert!(has_usage_object(br#"{"usage" : {"x":1}}"#));
        assert!(has_usage_object(
            br#"{"usageMetadata":{"promptTokenCount":1}}"#
        ));
        assert!(!has_usage_object(br#"{"choices":[],"usage":null}"#));
        assert!(!has_usage_object(br#"{"text":"usage"}"#));
    }

    #[test]
    fn passthrough_mode_reads_usage_and_changes_nothing() {
        let mut t = SseTracker::new(false);
        let out = run(&mut t, OPENAI_STREAM.as_bytes(), &[10, 100]);
        assert_eq!(out, OPENAI_STREAM.as_bytes());
        assert_eq!(
            t.usage().usage(),
            Some(Usage {
                prompt_tokens: 9,
                completion_tokens: 2
            })
        );
        assert_eq!(t.events(), 3);
    }

    #[test]
    fn strip_mode_removes_what_include_usage_added() {
        let mut t = SseTracker::new(true);
        let out = run(&mut t, OPENAI_STREAM.as_bytes(), &[37, 120]);
        let want = concat!(
            "data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n",
            "data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\" there\"}}]}\n\n",
            "data: [DONE]\n\n"
        );
        assert_eq!(String::from_utf8(out).unwrap(), want);
        assert_eq!(
            t.usage().usage(),
            Some(Usage {
                prompt_tokens: 9,
                completion_tokens: 2
            })
        );
    }

    #[test]
    fn strip_mode_recognizes_the_usage_chunk_whatever_its_spacing() {
        let s = "data: {\"id\": \"c\", \"choices\": [{\"delta\": {\"content\": \"Hi\"}}]}\n\ndata: {\"id\": \"c\", \"choices\": [], \"usage\": {\"prompt_tokens\": 3, \"completion_tokens\": 1}}\n\ndata: [DONE]\n\n";
        let mut t = SseTracker::new(true);
        let out = run(&mut t, s.as_bytes(), &[]);
        let out = String::from_utf8(out).unwrap();
        assert!(!out.contains("prompt_tokens"), "{out}");
        assert!(out.contains("Hi") && out.ends_with("data: [DONE]\n\n"));
        assert_eq!(
            t.usage().usage(),
            Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 1
            })
        );
    }

    #[test]
    fn strip_mode_gives_up_on_a_stream_without_event_boundaries() {
        let blob = vec![b'x'; 3 * 1024 * 1024];
        let mut t = SseTracker::new(true);
        let mut out = Vec::new();
        for c in blob.chunks(64 * 1024) {
            out.extend_from_slice(&t.feed(Bytes::copy_from_slice(c)));
        }
        out.extend_from_slice(&t.finish());
        assert_eq!(out, blob);
    }

    #[test]
    fn anthropic_stream_usage_comes_from_two_events() {
        let s = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"usage\"}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\n\n",
        );
        let mut t = SseTracker::new(false);
        run(&mut t, s.as_bytes(), &[50]);
        assert_eq!(
            t.usage().usage(),
            Some(Usage {
                prompt_tokens: 25,
                completion_tokens: 15
            })
        );
    }

    mod props {
        use super::*;

        proptest! {
            /// Whatever the chunk boundaries, the usage found and the bytes sent are the same.
            #[test]
            fn chunk_boundaries_do_not_matter(cuts in proptest::collection::btree_set(1usize..OPENAI_STREAM.len(), 0..12), strip: bool) {
                let cuts: Vec<usize> = cuts.into_iter().collect();
                let mut whole = SseTracker::new(strip);
                let expected = run(&mut whole, OPENAI_STREAM.as_bytes(), &[]);
                let mut t = SseTracker::new(strip);
                let out = run(&mut t, OPENAI_STREAM.as_bytes(), &cuts);
                prop_assert_eq!(out, expected);
                prop_assert_eq!(t.usage(), whole.usage());
                prop_assert_eq!(t.events(), whole.events());
            }
        }
    }
}
