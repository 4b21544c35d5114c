//! The usage store (SPEC §9): every settled call as a row, queryable by key, account, model
//! and time, with hourly roll-ups per key and model kept as rows arrive. In an SQLite file
//! beside the gateway ([`sqlite`], the default), or in one PostgreSQL database that every
//! gateway of a fleet writes to and answers from ([`postgres`]).
//!
//! The request path only copies a [`StoreRow`] that borrows its texts into a bounded queue
//! ([`UsageStore::push`] never waits: a full queue drops the row and counts it): no allocation
//! per row, nothing formatted, nothing freed on another thread. A writer thread takes everything
//! queued every [`DRAIN_EVERY`] (swapping the queue's buffers for its own) and writes it in one
//! transaction per batch of at most [`BATCH_MAX`] rows, together with the roll-ups of those rows
//! (UPSERT), then removes rows older than `retention_days` in steps of [`RETENTION_STEP`]. When the database cannot be reached
//! (PostgreSQL down) the writer keeps what it took and takes no more: new rows wait in the queue
//! (and past its size are dropped and counted) until it is back. Queries ([`query`]) run on
//! their own connection, never on the writer's, the same SQL on both backends ([`db::Db`]).

mod bulk_insert;
mod csv_export;
pub mod db;
mod pg_read;
pub mod postgres;
pub mod query;
mod roll_up;
mod sqlite;

pub use self::csv_export::{CsvExport, CSV_HEADER};
pub use self::db::{Db, Param};
pub use self::pg_read::PgReader;
pub use self::query::{Bucket, CallRow, LogFilter, LogPage, StatsFilter, StatsPage, Totals};
pub use self::sqlite::{open_reader, remove_older, SCHEMA_VERSION};

use crate::core::config::{StoreBackend, UsageStoreConfig};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// One call as the store keeps it: the usage log's fields plus where it went and how it ended.
/// Its texts are `S`: `String` when owned (a query's answer), `&str` when borrowed (what the
/// request path pushes, and what the writer binds: neither allocates per row).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct StoreRow<S = String> {
    /// Unix seconds (the end of the call).
    pub created_at: i64,
    /// The request id.
    pub request_id: S,
    /// The key's id.
    pub key_id: u64,
    /// The key's name.
    pub key_name: S,
    /// The key's group.
    pub group: S,
    /// The model the request named ("" when it named none).
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
    /// The key's account, if it has one.
    pub account: Option<S>,
    /// The upstream pool that served (or was chosen for) the call.
    pub upstream: Option<S>,
    /// The pool's target of the last attempt.
    pub target: Option<S>,
    /// Attempts made (0: refused before any).
    pub attempts: u32,
    /// The request path (no query string: it may carry `key=`).
    pub path: S,
    /// keygate's error code when it refused the call or the upstream failed.
    pub error_code: Option<S>,
}

impl<S> StoreRow<S> {
    /// The same row with each of its texts passed through `f`, in field order.
    pub fn map<'a, T>(&'a self, mut f: impl FnMut(&'a S) -> T) -> StoreRow<T> {
        StoreRow {
            created_at: self.created_at,
            request_id: f(&self.request_id),
            key_id: self.key_id,
            key_name: f(&self.key_name),
            group: f(&self.group),
            model: f(&self.model),
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            quota: self.quota,
            is_stream: self.is_stream,
            status: self.status,
            duration_ms: self.duration_ms,
            first_byte_ms: self.first_byte_ms,
            account: self.account.as_ref().map(&mut f),
            upstream: self.upstream.as_ref().map(&mut f),
            target: self.target.as_ref().map(&mut f),
            attempts: self.attempts,
            path: f(&self.path),
            error_code: self.error_code.as_ref().map(&mut f),
        }
    }
}

impl<S: AsRef<str>> StoreRow<S> {
    /// The row borrowing its texts (what [`UsageStore::push`] takes).
    pub fn borrowed(&self) -> StoreRow<&str> {
        self.map(AsRef::as_ref)
    }

    /// The row with texts of its own.
    pub fn owned(&self) -> StoreRow<String> {
        self.map(|s| s.as_ref().to_string())
    }
}

/// Where a queued row's text is in its queue's [`Queued::text`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Span {
    start: u32,
    end: u32,
}

/// Rows waiting for the writer: their fixed parts in one vector, their texts one after another
/// in one string. Pushing a row copies it in (no allocation once the buffers have grown), and
/// the writer takes both buffers whole, so no row's memory is allocated on one thread and
/// freed on another.
#[derive(Default)]
struct Queued {
    rows: Vec<StoreRow<Span>>,
    text: String,
    /// Rows the writer holds from an earlier take and has not written yet (PostgreSQL down):
    /// they count against the queue's size.
    in_hand: usize,
}

/// Text past this many bytes is not queued (its spans are `u32`): the row is dropped.
const QUEUED_TEXT_MAX: usize = 1 << 31;

impl Queued {
    fn push(&mut self, row: &StoreRow<&str>) {
        let text = &mut self.text;
        self.rows.push(row.map(|s| {
            let start = text.len() as u32;
            text.push_str(s);
            Span {
                start,
                end: text.len() as u32,
            }
        }));
    }

    /// The rows, their texts borrowed.
    fn view(&self) -> Vec<StoreRow<&str>> {
        self.rows
            .iter()
            .map(|r| {
                r.map(|s| {
                    self.text
                        .get(s.start as usize..s.end as usize)
                        .unwrap_or("")
                })
            })
            .collect()
    }

    fn clear(&mut self) {
        self.rows.clear();
        self.text.clear();
    }
}

/// Errors of the store: opening it (naming the file or the database) and querying it.
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
    /// The PostgreSQL settings cannot be used (a bad `url`).
    #[error("usage_store url: {0}")]
    Config(String),
    /// A query failed (SQLite).
    #[error("usage store query: {0}")]
    Query(#[from] rusqlite::Error),
    /// A query failed, or PostgreSQL could not be reached.
    #[error("usage store (PostgreSQL {at}): {source}")]
    Postgres {
        /// The database, without its password.
        at: String,
        /// What failed.
        source: ::postgres::Error,
    },
    /// Anything else (writing the CSV).
    #[error("usage store: {0}")]
    Other(String),
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

impl StoreStats {
    /// A batch of `rows` rows was written, its transaction begun at `started`.
    pub(super) fn batch_written(&self, rows: u64, started: std::time::Instant) {
        self.written.fetch_add(rows, Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.batch_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
    }
}

/// Messages to the writer besides rows.
enum Control {
    /// Write everything queued, then answer.
    Flush(SyncSender<()>),
}

/// Where a store is kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    /// An SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL database: its `postgres://…` URL.
    Postgres(String),
}

/// Settings of a store.
#[derive(Clone, Debug)]
pub struct StoreSettings {
    /// The database.
    pub backend: Backend,
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
            backend: Backend::Sqlite(path),
            retention_days: 90,
            queue_size: 65_536,
            flush_every: DRAIN_EVERY,
        }
    }

    /// The defaults for a PostgreSQL database given by its URL.
    pub fn postgres(url: &str) -> StoreSettings {
        StoreSettings {
            backend: Backend::Postgres(url.to_string()),
            ..StoreSettings::new(PathBuf::new())
        }
    }

    /// The settings `usage_store:` asks for; `None` when the store is off.
    pub fn from_config(c: &UsageStoreConfig, state_dir: &Path) -> Option<StoreSettings> {
        if !c.enabled {
            return None;
        }
        let backend = match c.backend {
            StoreBackend::Sqlite => Backend::Sqlite(c.sqlite_path(state_dir)),
            StoreBackend::Postgres => Backend::Postgres(c.url.clone().unwrap_or_default()),
        };
        Some(StoreSettings {
            backend,
            retention_days: c.retention_days,
            queue_size: c.queue_size,
            flush_every: Duration::from_millis(c.flush_interval_ms),
        })
    }

    /// The file, or the database without its password.
    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::Sqlite(p) => p.display().to_string(),
            Backend::Postgres(url) => postgres::describe_url(url),
        }
    }
}

/// A connection for queries on the store `settings` names (the CLI's): the SQLite file
/// read-only (an error when it does not exist yet), or PostgreSQL (connected at the first
/// query).
pub fn open_query(settings: &StoreSettings) -> Result<Box<dyn Db + Send>, StoreError> {
    Ok(match &settings.backend {
        Backend::Sqlite(path) => Box::new(sqlite::open_reader(path)?),
        Backend::Postgres(url) => Box::new(PgReader::new(url)?),
    })
}

/// The store's handle: cheap to clone; the writer exits (after writing what is queued) when
/// the last handle is dropped.
#[derive(Clone)]
pub struct UsageStore {
    queue: Arc<Queue>,
    control: SyncSender<Control>,
    stats: Arc<StoreStats>,
    reader: Arc<Mutex<Box<dyn Db + Send>>>,
    describe: Arc<str>,
}

/// The queue between the request path and the writer: at most `size` rows, queued and in the
/// writer's hand together.
struct Queue {
    queued: Mutex<Queued>,
    size: usize,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queued> {
        self.queued.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The writer's side of a backend: write a batch with its roll-ups, take a retention step.
pub(crate) trait Sink: Send {
    /// Write `batch`: rows that cannot be written are counted as dropped (true). When the
    /// database cannot be reached the batch is kept instead (false): the writer tries it again
    /// later and takes no more rows until then.
    fn write_batch(&mut self, batch: &[StoreRow<&str>]) -> bool;
    /// One bounded retention step, when one is due.
    fn retention_step(&mut self);
}

/// How often the writer collects what was queued (the default of `flush_interval_ms`).
pub const DRAIN_EVERY: Duration = Duration::from_millis(500);
/// Rows per transaction at most.
pub const BATCH_MAX: usize = 10_000;
/// How often a retention pass starts (one runs at start too).
const RETENTION_EVERY: Duration = Duration::from_secs(600);

/// When a writer removes old rows: a pass every [`RETENTION_EVERY`] (one at start), and while a
/// pass is under way every round takes a step, until a step removes nothing.
pub(super) struct RetentionSchedule {
    next: std::time::Instant,
    under_way: bool,
}

impl RetentionSchedule {
    pub(super) fn new() -> RetentionSchedule {
        RetentionSchedule {
            next: std::time::Instant::now(),
            under_way: false,
        }
    }

    /// Whether a step is due now (a pass starts when one is due).
    pub(super) fn step_due(&mut self) -> bool {
        if !self.under_way {
            let now = std::time::Instant::now();
            if now < self.next {
                return false;
            }
            self.under_way = true;
            self.next = now + RETENTION_EVERY;
        }
        true
    }

    /// After a step: the pass goes on while steps remove something (a failed step ends it).
    pub(super) fn stepped(&mut self, removed_some: bool) {
        self.under_way = removed_some;
    }
}

/// Rows (or roll-ups) removed by one retention statement at most.
pub const RETENTION_STEP: usize = 5_000;

impl UsageStore {
    /// Open (or create) the database, check it can be written, and start the writer. SQLite's
    /// errors name the file: a corrupt database, a file or folder that cannot be written.
    /// PostgreSQL is reached by the writer (and the queries) once started: a gateway starts
    /// while it is down; only a bad URL is an error here.
    pub fn open(settings: &StoreSettings) -> Result<UsageStore, StoreError> {
        let stats = Arc::new(StoreStats::default());
        let (writer, reader): (Box<dyn Sink>, Box<dyn Db + Send>) = match &settings.backend {
            Backend::Sqlite(path) => {
                let conn = sqlite::open_writer(path)?;
                let reader = sqlite::open_reader(path)?;
                let writer =
                    sqlite::Writer::new(conn, path.clone(), settings.retention_days, stats.clone());
                (Box::new(writer), Box::new(reader))
            }
            Backend::Postgres(url) => {
                let writer = postgres::PgWriter::new(url, settings.retention_days, stats.clone())?;
                (Box::new(writer), Box::new(PgReader::new(url)?))
            }
        };
        let queue = Arc::new(Queue {
            queued: Mutex::default(),
            size: settings.queue_size.max(1),
        });
        let (control, control_rx) = std::sync::mpsc::sync_channel(16);
        let every = settings.flush_every;
        let describe = settings.describe();
        std::thread::Builder::new()
            .name("keygate-usage-store".into())
            .spawn({
                let (stats, queue) = (stats.clone(), queue.clone());
                move || run_writer(writer, &stats, every, &queue, &control_rx)
            })
            .map_err(|e| StoreError::Other(format!("{describe}: starting the writer: {e}")))?;
        Ok(UsageStore {
            queue,
            control,
            stats,
            reader: Arc::new(Mutex::new(reader)),
            describe: settings.describe().into(),
        })
    }

    /// Queue a copy of a row for the writer. Never waits (but for the queue's lock, held
    /// while the row is copied in): when the queue is full the row is dropped and counted.
    pub fn push(&self, row: &StoreRow<&str>) {
        let mut q = self.queue.lock();
        if q.rows.len() + q.in_hand >= self.queue.size || q.text.len() >= QUEUED_TEXT_MAX {
            drop(q);
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        q.push(row);
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

    /// The database file, or the PostgreSQL database without its password.
    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// Run `f` on the store's query connection (blocking: call it off the async workers,
    /// e.g. in `spawn_blocking`).
    pub fn read<T>(&self, f: impl FnOnce(&mut dyn Db) -> T) -> T {
        let mut conn = self.reader.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut **conn)
    }
}

/// The writer's loop: every `every` (or at once when asked to flush) it writes what
/// was queued, then takes a retention step when one is due. While the database cannot be
/// reached it keeps the rows in hand and leaves the rest queued, trying again every round.
/// It exits once every handle is gone.
fn run_writer(
    mut writer: Box<dyn Sink>,
    stats: &StoreStats,
    every: Duration,
    queue: &Queue,
    control: &Receiver<Control>,
) {
    use std::sync::mpsc::RecvTimeoutError;
    // The buffers swapped with the queue's: each side keeps its capacity.
    let mut hand = Queued::default();
    loop {
        let asked = control.recv_timeout(every);
        let up = write_round(&mut *writer, queue, &mut hand);
        match asked {
            Ok(Control::Flush(done)) => {
                let _ = done.send(());
            }
            Err(RecvTimeoutError::Timeout) if up => writer.retention_step(),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                // What raced in after the last round; what cannot be written now is dropped.
                if !(up && write_round(&mut *writer, queue, &mut hand)) {
                    let q = queue.lock();
                    stats
                        .dropped
                        .fetch_add((hand.rows.len() + q.rows.len()) as u64, Ordering::Relaxed);
                }
                return;
            }
        }
    }
}

/// One round of the writer: the rows in hand (kept from an earlier round) or, when there are
/// none, everything queued, written in batches of at most [`BATCH_MAX`]. False when the
/// database cannot be reached: what was not written stays in hand.
fn write_round(writer: &mut dyn Sink, queue: &Queue, hand: &mut Queued) -> bool {
    if hand.rows.is_empty() {
        hand.clear();
        let mut q = queue.lock();
        std::mem::swap(&mut q.rows, &mut hand.rows);
        std::mem::swap(&mut q.text, &mut hand.text);
        q.in_hand = hand.rows.len();
    }
    if hand.rows.is_empty() {
        return true;
    }
    let view = hand.view();
    let mut done = 0;
    for batch in view.chunks(BATCH_MAX) {
        if !writer.write_batch(batch) {
            break;
        }
        done += batch.len();
    }
    let all = done == view.len();
    drop(view);
    if all {
        hand.clear();
    } else {
        hand.rows.drain(..done);
    }
    queue.lock().in_hand = hand.rows.len();
    all
}

#[cfg(test)]
mod tests;
