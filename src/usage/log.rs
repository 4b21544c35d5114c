//! The usage log: one JSON line per settled call, formatted on the request path into a shared
//! buffer and written to the file by a background thread.

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

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
    /// The pool's target of the last attempt (its metric label, `host:port`); `null` when no
    /// target was tried. Absent from lines written before pools: read as `null`.
    #[serde(default)]
    pub target: Option<S>,
    /// Attempts made, tries of a target (0: none). Absent from lines written before pools:
    /// read as 0.
    #[serde(default)]
    pub attempts: u32,
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
    value(out, b",\"target\":", r.target)?;
    value(out, b",\"attempts\":", r.attempts)?;
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

    #[test]
    fn a_usage_line_is_what_serde_writes() {
        for (name, model, first_byte_ms, target) in [
            ("k", "gpt-4o-mini", Some(2), Some("127.0.0.1:8000#1")),
            ("quote \" back\\slash \u{1} tab\t é", "m/\"x\"", None, None),
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
                target,
                attempts: 3,
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
    fn target_and_attempts_follow_the_thirteen_fields_and_old_lines_still_read() {
        let mut out = Vec::new();
        write_record(&mut out, &sample_record("k")).unwrap();
        let line = String::from_utf8(out).unwrap();
        // The fields of SPEC §4 as they were, names and order, then the two of §11.
        let before = r#"{"created_at":1,"request_id":"r","key_id":3,"key_name":"k","group":"default","model":"m","prompt_tokens":1,"completion_tokens":2,"quota":3,"is_stream":false,"status":200,"duration_ms":4,"first_byte_ms":null"#;
        assert_eq!(
            line,
            format!(r#"{before},"target":"10.0.0.1:8000","attempts":2}}"#)
        );
        // A line written before pools reads with no target and no attempts.
        let old: UsageRecord = serde_json::from_str(&format!("{before}}}")).unwrap();
        assert_eq!((old.target, old.attempts), (None, 0));
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
            target: Some("10.0.0.1:8000"),
            attempts: 2,
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
            target: Some("10.0.0.1:8000".into()),
            attempts: 2,
        };
        for line in text.lines() {
            let back: UsageRecord = serde_json::from_str(line).unwrap();
            assert_eq!(back, expected);
        }
    }
}
