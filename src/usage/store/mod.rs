//! The usage store (SPEC §9): every settled call as a row in SQLite, queryable by key, account,
//! model and time, with hourly roll-ups per key and model kept as rows arrive.
//!
//! The request path only pushes a [`StoreRow`] into a bounded queue ([`UsageStore::push`]
//! never waits: a full queue drops the row and counts it). A writer thread takes what was queued
//! every [`DRAIN_EVERY`] and writes it in one transaction per batch of at most [`BATCH_MAX`]
//! rows, together with the roll-ups of those rows (UPSERT), then removes rows older than
//! `retention_days` in steps of [`RETENTION_STEP`]. Queries ([`query`]) run on their own
//! read-only connection, never on the writer's.

pub mod query;
mod sqlite;

pub use self::query::{
    Bucket, CallRow, CsvExport, LogFilter, LogPage, StatsFilter, StatsPage, Totals,
};
pub use self::sqlite::{open_reader, remove_older, SCHEMA_VERSION};

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// One call as the store keeps it: the usage log's fields plus where it went and how it ended.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct StoreRow {
    /// Unix seconds (the end of the call).
    pub created_at: i64,
    /// The request id.
    pub request_id: String,
    /// The key's id.
    pub key_id: u64,
    /// The key's name.
    pub key_name: String,
    /// The key's group.
    pub group: String,
    /// The model the request named ("" when it named none).
    pub model: String,
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
    /// The key's account, if it has one.
    pub account: Option<String>,
    /// The upstream pool that served (or was chosen for) the call.
    pub upstream: Option<String>,
    /// The pool's target of the last attempt.
    pub target: Option<String>,
    /// Attempts made (0: refused before any).
    pub attempts: u32,
    /// The request path (no query string: it may carry `key=`).
    pub path: String,
    /// keygate's error code when it refused the call or the upstream failed.
    pub error_code: Option<String>,
}

/// Errors of the store: opening it (naming the file) and querying it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database file cannot be used.
    #[error("usage_store {path}: {message}")]
    Open {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A query failed.
    #[error("usage store query: {0}")]
    Query(#[from] rusqlite::Error),
}

/// Counters of the store, read at scrape time.
#[derive(Debug, Default)]
pub struct StoreStats {
    /// Rows dropped: the queue was full, or their batch could not be written.
    pub dropped: AtomicU64,
    /// Rows written.
    pub written: AtomicU64,
    /// Batches whose transaction failed (a full disk, an I/O error).
    pub write_errors: AtomicU64,
    /// Batches written.
    pub batches: AtomicU64,
    /// Time spent writing batches, microseconds.
    pub batch_micros: AtomicU64,
}

/// Messages to the writer besides rows.
enum Control {
    /// Write everything queued, then answer.
    Flush(SyncSender<()>),
}

/// Settings of a store.
#[derive(Clone, Debug)]
pub struct StoreSettings {
    /// The SQLite file.
    pub path: PathBuf,
    /// Rows older than this many days are removed.
    pub retention_days: u32,
    /// Rows waiting for the writer at most.
    pub queue_size: usize,
    /// How often the writer writes what was queued ([`DRAIN_EVERY`] by default).
    pub flush_every: Duration,
}

impl StoreSettings {
    /// The defaults for a file: 90 days, 65,536 rows queued, a batch every [`DRAIN_EVERY`].
    pub fn new(path: PathBuf) -> StoreSettings {
        StoreSettings {
            path,
            retention_days: 90,
            queue_size: 65_536,
            flush_every: DRAIN_EVERY,
        }
    }
}

/// The store's handle: cheap to clone; the writer exits (after writing what is queued) when
/// the last handle is dropped.
#[derive(Clone)]
pub struct UsageStore {
    rows: SyncSender<StoreRow>,
    control: SyncSender<Control>,
    stats: Arc<StoreStats>,
    reader: Arc<Mutex<rusqlite::Connection>>,
    path: Arc<Path>,
}

/// How often the writer collects what was queued.
pub const DRAIN_EVERY: Duration = Duration::from_millis(100);
/// Rows per transaction at most.
pub const BATCH_MAX: usize = 10_000;
/// Rows (or roll-ups) removed by one retention statement at most.
pub const RETENTION_STEP: usize = 5_000;

impl UsageStore {
    /// Open (or create) the database, check it can be written, and start the writer. Errors
    /// name the file: a corrupt database, a file or folder that cannot be written.
    pub fn open(settings: &StoreSettings) -> Result<UsageStore, StoreError> {
        let conn = sqlite::open_writer(&settings.path)?;
        let reader = sqlite::open_reader(&settings.path)?;
        let (rows, rows_rx) = std::sync::mpsc::sync_channel(settings.queue_size.max(1));
        let (control, control_rx) = std::sync::mpsc::sync_channel(16);
        let stats = Arc::new(StoreStats::default());
        let writer = sqlite::Writer::new(
            conn,
            settings.path.clone(),
            settings.retention_days,
            stats.clone(),
        );
        let every = settings.flush_every;
        std::thread::Builder::new()
            .name("keygate-usage-store".into())
            .spawn(move || run_writer(writer, every, &rows_rx, &control_rx))
            .map_err(|e| StoreError::Open {
                path: settings.path.clone(),
                message: format!("starting the writer: {e}"),
            })?;
        Ok(UsageStore {
            rows,
            control,
            stats,
            reader: Arc::new(Mutex::new(reader)),
            path: settings.path.as_path().into(),
        })
    }

    /// Queue a row for the writer. Never waits: when the queue is full the row is dropped
    /// and counted.
    pub fn push(&self, row: StoreRow) {
        match self.rows.try_send(row) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Wait until every row queued so far is written (at most `timeout`).
    pub fn flush(&self, timeout: Duration) {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        if self.control.send(Control::Flush(tx)).is_ok() {
            let _ = rx.recv_timeout(timeout);
        }
    }

    /// The store's counters.
    pub fn stats(&self) -> &StoreStats {
        &self.stats
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Run `f` on the store's read-only connection (blocking: call it off the async
    /// workers, e.g. in `spawn_blocking`).
    pub fn read<T>(&self, f: impl FnOnce(&rusqlite::Connection) -> T) -> T {
        let conn = self.reader.lock().unwrap_or_else(PoisonError::into_inner);
        f(&conn)
    }
}

/// The writer's loop: every `every` (or at once when asked to flush) it writes what
/// was queued, then takes a retention step when one is due. It exits once every handle is gone.
fn run_writer(
    mut writer: sqlite::Writer,
    every: Duration,
    rows: &Receiver<StoreRow>,
    control: &Receiver<Control>,
) {
    use std::sync::mpsc::{RecvTimeoutError, TryRecvError};
    let mut batch: Vec<StoreRow> = Vec::with_capacity(1024);
    loop {
        let asked = control.recv_timeout(every);
        let mut gone = false;
        loop {
            match rows.try_recv() {
                Ok(r) => {
                    batch.push(r);
                    if batch.len() >= BATCH_MAX {
                        writer.write_batch(&mut batch);
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    gone = true;
                    break;
                }
            }
        }
        writer.write_batch(&mut batch);
        match asked {
            Ok(Control::Flush(done)) => {
                let _ = done.send(());
            }
            Err(RecvTimeoutError::Timeout) => writer.retention_step(),
            Err(RecvTimeoutError::Disconnected) => gone = true,
        }
        if gone {
            // What raced in after the last drain.
            while let Ok(r) = rows.try_recv() {
                batch.push(r);
            }
            writer.write_batch(&mut batch);
            return;
        }
    }
}

#[cfg(test)]
mod tests;
