//! Reading usage from upstream responses (JSON bodies and SSE streams, in the OpenAI, Anthropic
//! and Gemini dialects), removing the usage chunk keygate asked for on a client's behalf, and the
//! usage log (one JSON line per settled call, formatted on the request path and written to the
//! file by a background thread).

use crate::pricing::Usage;
use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

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
pub(crate) fn canonical_u64(v: &[u8]) -> Option<u64> {
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

/// One settled call, as written to the usage log (one JSON object per line). Never holds key
/// material. `S` is `String` when reading a log back and `&str` when writing it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct UsageRecord<S = String> {
    /// Unix seconds.
    pub created_at: i64,
    /// The request id.
    pub request_id: S,
    /// The key's id.
    pub key_id: u64,
    /// The key's name.
    pub key_name: S,
    /// The key's group.
    pub group: S,
    /// The model.
    pub model: S,
    /// Prompt tokens charged.
    pub prompt_tokens: u64,
    /// Completion tokens charged.
    pub completion_tokens: u64,
    /// Quota units charged.
    pub quota: i64,
    /// Whether the response was a stream.
    pub is_stream: bool,
    /// The HTTP status the client got (499: the client went away first).
    pub status: u16,
    /// Request start to end, milliseconds.
    pub duration_ms: u64,
    /// Request start to the first response byte, milliseconds.
    pub first_byte_ms: Option<u64>,
}

/// Lines written to stderr by a background thread through a bounded channel (the access log):
/// the request path never blocks on stderr; when the channel is full a line is dropped and
/// counted.
#[derive(Clone)]
pub struct LineSink {
    tx: SyncSender<Vec<u8>>,
    dropped: Arc<AtomicU64>,
}

impl LineSink {
    /// Capacity of the channel.
    pub const CAPACITY: usize = 65_536;

    /// Start the stderr writer.
    pub fn stderr() -> std::io::Result<LineSink> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(Self::CAPACITY);
        std::thread::Builder::new()
            .name("keygate-access-log".into())
            .spawn(move || {
                drain_on_timer(
                    rx,
                    |line, batch| {
                        batch.extend_from_slice(&line);
                        None
                    },
                    // The stderr lock is taken per write only: the rest of the log writes to
                    // stderr too.
                    |batch| {
                        let _ = std::io::stderr().lock().write_all(batch);
                    },
                )
            })?;
        Ok(LineSink {
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Queue one line (a newline is added). Never blocks.
    pub fn line(&self, mut line: Vec<u8>) {
        line.push(b'\n');
        if self.tx.try_send(line).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Lines dropped because the writer could not keep up.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// The usage log. A record is formatted on the request's thread and appended to a shared
/// buffer (a lock held for a copy); a writer thread takes the buffer every 50 ms and appends
/// it to the file in whole lines. So the request path never waits on the disk, and
/// nothing it allocates is freed by another thread (a cross-thread free costs the allocator
/// more than the allocation). Past [`UsageLog::MAX_PENDING`] bytes waiting, records are dropped
/// and counted.
#[derive(Clone)]
pub struct UsageLog {
    shared: Arc<LogBuffer>,
    /// Flush requests to the writer; it exits when every handle (and so this sender) is gone.
    flushes: SyncSender<SyncSender<()>>,
}

struct LogBuffer {
    pending: Mutex<Vec<u8>>,
    max_pending: usize,
    dropped: AtomicU64,
}

thread_local! {
    /// Where a record is formatted before it is appended (kept, so no allocation per record).
    static LINE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl UsageLog {
    /// Most bytes waiting for the writer (about 60,000 records).
    pub const MAX_PENDING: usize = 16 * 1024 * 1024;

    /// Open `path` for appending and start the writer.
    pub fn open(path: &Path) -> std::io::Result<UsageLog> {
        Self::open_bounded(path, Self::MAX_PENDING)
    }

    /// [`UsageLog::open`] with at most `max_pending` bytes waiting for the writer.
    fn open_bounded(path: &Path, max_pending: usize) -> std::io::Result<UsageLog> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let shared = Arc::new(LogBuffer {
            pending: Mutex::new(Vec::new()),
            max_pending,
            dropped: AtomicU64::new(0),
        });
        let (flushes, rx) = std::sync::mpsc::sync_channel(16);
        let name = path.display().to_string();
        let buffer = shared.clone();
        std::thread::Builder::new()
            .name("keygate-usage-log".into())
            .spawn(move || writer(&buffer, &rx, file, &name))?;
        Ok(UsageLog { shared, flushes })
    }

    /// Add a record (never waits on the disk).
    pub fn record(&self, r: &UsageRecord<&str>) {
        LINE.with_borrow_mut(|line| {
            line.clear();
            if write_record(line, r).is_err() {
                return;
            }
            line.push(b'\n');
            let mut pending = self
                .shared
                .pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if pending.len() + line.len() > self.shared.max_pending {
                drop(pending);
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            } else {
                pending.extend_from_slice(line);
            }
        });
    }

    /// Records dropped because the writer could not keep up.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Wait until everything recorded so far is written (at most `timeout`).
    pub fn flush(&self, timeout: Duration) {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        if self.flushes.send(tx).is_ok() {
            let _ = rx.recv_timeout(timeout);
        }
    }
}

/// `r` as serde writes it (member order, escaping, `null`), with the member names written as
/// they are: serde escapes every name byte by byte, most of the cost of a line.
fn write_record(out: &mut Vec<u8>, r: &UsageRecord<&str>) -> serde_json::Result<()> {
    fn value(out: &mut Vec<u8>, name: &[u8], v: impl Serialize) -> serde_json::Result<()> {
        out.extend_from_slice(name);
        serde_json::to_writer(&mut *out, &v)
    }
    value(out, b"{\"created_at\":", r.created_at)?;
    value(out, b",\"request_id\":", r.request_id)?;
    value(out, b",\"key_id\":", r.key_id)?;
    value(out, b",\"key_name\":", r.key_name)?;
    value(out, b",\"group\":", r.group)?;
    value(out, b",\"model\":", r.model)?;
    value(out, b",\"prompt_tokens\":", r.prompt_tokens)?;
    value(out, b",\"completion_tokens\":", r.completion_tokens)?;
    value(out, b",\"quota\":", r.quota)?;
    value(out, b",\"is_stream\":", r.is_stream)?;
    value(out, b",\"status\":", r.status)?;
    value(out, b",\"duration_ms\":", r.duration_ms)?;
    value(out, b",\"first_byte_ms\":", r.first_byte_ms)?;
    out.push(b'}');
    Ok(())
}

/// The largest `write` the usage log's writer makes.
const WRITE_AT_MOST: usize = 64 * 1024;

/// The most buffer capacity the usage log's writer keeps between rounds.
const KEEP_AT_MOST: usize = 4 * 1024 * 1024;

/// The usage log's writer: every [`DRAIN_EVERY`], or at once when asked to flush, it swaps the
/// shared buffer for its own empty one and writes what it took in whole lines, at most
/// [`WRITE_AT_MOST`] bytes per `write` on an `O_APPEND` file, so lines from two processes (old
/// and new binary during an upgrade) do not interleave.
fn writer(
    buffer: &LogBuffer,
    flushes: &Receiver<SyncSender<()>>,
    mut file: std::fs::File,
    name: &str,
) {
    let mut taken = Vec::new();
    loop {
        let asked = flushes.recv_timeout(DRAIN_EVERY);
        std::mem::swap(
            &mut taken,
            &mut buffer
                .pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        // Whole lines, at most 64 KiB per `write`: a partial write (a full disk, a signal) is
        // the one way two processes' lines could interleave.
        let mut rest = &taken[..];
        while !rest.is_empty() {
            let cut = if rest.len() <= WRITE_AT_MOST {
                rest.len()
            } else {
                memchr::memrchr(b'\n', &rest[..WRITE_AT_MOST]).map_or(rest.len(), |i| i + 1)
            };
            if let Err(e) = file.write_all(&rest[..cut]) {
                log::error!("usage log {name}: {e}");
                break;
            }
            rest = &rest[cut..];
        }
        taken.clear();
        // A burst's buffer is not kept for good; a steady rate's is (at 100k calls a second,
        // a round is ~1.3 MiB), or the shared buffer would grow again, by copies and fresh
        // pages, under the request threads' lock every round.
        if taken.capacity() > KEEP_AT_MOST {
            taken.shrink_to(KEEP_AT_MOST);
        }
        match asked {
            Ok(done) => {
                let _ = done.send(());
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// How often the log writers collect what was queued.
const DRAIN_EVERY: Duration = Duration::from_millis(50);

/// The access log writer's loop. Every [`DRAIN_EVERY`] it takes what was queued on `rx`: `add`
/// appends each item to a buffer, which goes to `write` at 64 KiB, at the end of each round,
/// when `add` returns a flush request (answered once written) and when the senders are gone.
/// Woken by a timer, not by each item: a wake-up per request would cost the request thread a
/// futex call and the core two context switches.
fn drain_on_timer<T>(
    rx: Receiver<T>,
    mut add: impl FnMut(T, &mut Vec<u8>) -> Option<SyncSender<()>>,
    mut write: impl FnMut(&[u8]),
) {
    const FLUSH_AT: usize = 64 * 1024;
    let mut buf: Vec<u8> = Vec::with_capacity(FLUSH_AT + 1024);
    let mut flush = |buf: &mut Vec<u8>| {
        if !buf.is_empty() {
            write(buf);
            buf.clear();
        }
    };
    loop {
        std::thread::sleep(DRAIN_EVERY);
        loop {
            match rx.try_recv() {
                Ok(item) => {
                    let ack = add(item, &mut buf);
                    if ack.is_some() || buf.len() >= FLUSH_AT {
                        flush(&mut buf);
                    }
                    if let Some(ack) = ack {
                        let _ = ack.send(());
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    flush(&mut buf);
                    return;
                }
            }
        }
        flush(&mut buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzzing::feed_in_pieces as run;
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
    fn a_usage_line_is_what_serde_writes() {
        for (name, model, first_byte_ms) in [
            ("k", "gpt-4o-mini", Some(2)),
            ("quote \" back\\slash \u{1} tab\t é", "m/\"x\"", None),
        ] {
            let r = UsageRecord {
                created_at: -1,
                request_id: "kg-1",
                key_id: u64::MAX,
                key_name: name,
                group: "default",
                model,
                prompt_tokens: 0,
                completion_tokens: 7,
                quota: i64::MIN,
                is_stream: true,
                status: 499,
                duration_ms: 12,
                first_byte_ms,
            };
            let mut out = Vec::new();
            write_record(&mut out, &r).unwrap();
            assert_eq!(
                String::from_utf8(out).unwrap(),
                serde_json::to_string(&r).unwrap()
            );
        }
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

    /// A usage record with fixed values and `key_name`.
    fn sample_record(key_name: &str) -> UsageRecord<&str> {
        UsageRecord {
            created_at: 1,
            request_id: "r",
            key_id: 3,
            key_name,
            group: "default",
            model: "m",
            prompt_tokens: 1,
            completion_tokens: 2,
            quota: 3,
            is_stream: false,
            status: 200,
            duration_ms: 4,
            first_byte_ms: None,
        }
    }

    #[test]
    fn usage_log_keeps_lines_whole_past_one_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.jsonl");
        let log = UsageLog::open(&path).unwrap();
        let long = "n".repeat(300);
        let r = sample_record(&long);
        // About 800 KiB in one round of the writer: several writes of at most 64 KiB.
        for _ in 0..2000 {
            log.record(&r);
        }
        log.flush(Duration::from_secs(5));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2000);
        for line in text.lines() {
            let back: UsageRecord = serde_json::from_str(line).unwrap();
            assert_eq!(back.key_name, long);
        }
        assert_eq!(log.dropped(), 0);
    }

    #[test]
    fn usage_log_drops_and_counts_what_the_writer_cannot_keep_up_with() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.jsonl");
        let log = UsageLog::open_bounded(&path, 1024).unwrap();
        let r = sample_record("k");
        // Far more than 1 KiB within one of the writer's rounds.
        for _ in 0..100 {
            log.record(&r);
        }
        log.flush(Duration::from_secs(5));
        let written = std::fs::read_to_string(&path).unwrap().lines().count() as u64;
        assert!(log.dropped() > 0);
        assert_eq!(written + log.dropped(), 100);
    }

    #[test]
    fn usage_log_writes_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.jsonl");
        let log = UsageLog::open(&path).unwrap();
        let r = UsageRecord {
            first_byte_ms: Some(2),
            ..sample_record("k")
        };
        log.record(&r);
        log.record(&r);
        log.flush(Duration::from_secs(5));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        let expected = UsageRecord::<String> {
            created_at: 1,
            request_id: "r".into(),
            key_id: 3,
            key_name: "k".into(),
            group: "default".into(),
            model: "m".into(),
            prompt_tokens: 1,
            completion_tokens: 2,
            quota: 3,
            is_stream: false,
            status: 200,
            duration_ms: 4,
            first_byte_ms: Some(2),
        };
        for line in text.lines() {
            let back: UsageRecord = serde_json::from_str(line).unwrap();
            assert_eq!(back, expected);
        }
    }
}
