//! The SQLite side of the usage store: the schema, opening the file (with the startup checks),
//! and the writer's batch, roll-up and retention statements.

use super::bulk_insert::BulkInsert;
use super::db::{Db, Param, Row};
use super::roll_up::{int, roll_up};
use super::{Sink, StoreError, StoreRow, StoreStats, RETENTION_STEP};
use rusqlite::{params, Connection, OpenFlags};
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The schema's version, kept in `PRAGMA user_version`. 2: the account index holds only the
/// calls that have an account (1 held every call; [`open_writer`] moves a store from 1 to 2).
pub const SCHEMA_VERSION: i64 = 2;

/// The writer connection's page cache, KiB (SQLite's default is 2,000 KiB).
pub(super) const WRITER_CACHE_KIB: i64 = 16 * 1024;
/// WAL pages written between two automatic checkpoints (SQLite's default is 1,000): at 4 KiB a
/// page, ~40 MB of WAL, all of which a power loss may lose (`synchronous=NORMAL` syncs the WAL
/// only at checkpoints).
pub(super) const CHECKPOINT_PAGES: i64 = 10_000;

/// The tables and the indexes the queries use, from day one: a key's calls by time, an
/// account's calls by time, every call by time; the roll-ups by key, account and hour.
/// The account index is partial: a call of a key without an account (most of them where
/// accounts are not used) costs the writer three b-tree inserts, not four; every query of an
/// account's calls says `account = ?`, which the planner knows implies `IS NOT NULL`.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS calls (
    id INTEGER PRIMARY KEY,
    created_at INTEGER NOT NULL,
    request_id TEXT NOT NULL,
    key_id INTEGER NOT NULL,
    key_name TEXT NOT NULL,
    grp TEXT NOT NULL,
    model TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    quota INTEGER NOT NULL,
    is_stream INTEGER NOT NULL,
    status INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL,
    first_byte_ms INTEGER,
    account TEXT,
    upstream TEXT,
    target TEXT,
    attempts INTEGER NOT NULL,
    path TEXT NOT NULL,
    error_code TEXT
);
CREATE INDEX IF NOT EXISTS calls_key_time ON calls(key_id, created_at);
CREATE INDEX IF NOT EXISTS calls_account_time ON calls(account, created_at)
    WHERE account IS NOT NULL;
CREATE INDEX IF NOT EXISTS calls_time ON calls(created_at);
CREATE TABLE IF NOT EXISTS hourly (
    hour INTEGER NOT NULL,
    key_id INTEGER NOT NULL,
    model TEXT NOT NULL,
    account TEXT NOT NULL,
    requests INTEGER NOT NULL,
    errors INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    quota INTEGER NOT NULL,
    UNIQUE (key_id, hour, model, account)
);
CREATE INDEX IF NOT EXISTS hourly_account_hour ON hourly(account, hour);
CREATE INDEX IF NOT EXISTS hourly_hour ON hourly(hour);
";

fn open_error(path: &Path, message: impl std::fmt::Display) -> StoreError {
    StoreError::Open {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// Open the writer's connection: create the file and the schema, WAL mode, and prove the file
/// can be written (a write lock taken and released), so a corrupt or read-only database is a
/// startup error naming the file, not a silent loss later.
pub(super) fn open_writer(path: &Path) -> Result<Connection, StoreError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| open_error(path, format!("its folder: {e}")))?;
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| open_error(path, e))?;
    if conn.is_readonly(rusqlite::MAIN_DB).unwrap_or(true) {
        return Err(open_error(path, "the file is not writable"));
    }
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(|e| open_error(path, e))?;
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| open_error(path, e))?;
    if version > SCHEMA_VERSION {
        return Err(open_error(
            path,
            format!("schema version {version} is newer than this keygate's ({SCHEMA_VERSION})"),
        ));
    }
    let setup = || -> rusqlite::Result<()> {
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            log::warn!(
                "usage_store {}: journal mode {mode}, not WAL",
                path.display()
            );
        }
        // A committed batch survives the process being killed; only a power loss may lose
        // what was committed since the last checkpoint (WAL with NORMAL syncs at checkpoints).
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // The pages a batch touches (the ends of the time indexes, the roll-ups of the hour,
        // the inner pages) stay in memory between batches: SQLite's default, 2 MB, had the
        // writer read them back from the file.
        conn.pragma_update(None, "cache_size", -WRITER_CACHE_KIB)?;
        // A checkpoint copies every page the WAL holds back into the database and syncs both;
        // a page written by many batches (the end of an index) is copied once per checkpoint,
        // so fewer of them copy far fewer pages. The WAL grows to ~40 MB between two.
        conn.pragma_update(None, "wal_autocheckpoint", CHECKPOINT_PAGES)?;
        conn.execute_batch("BEGIN IMMEDIATE")?;
        if version == 1 {
            // Version 1's account index held every call: made again, partial (one pass over
            // the table, once).
            conn.execute_batch("DROP INDEX IF EXISTS calls_account_time")?;
        }
        conn.execute_batch(SCHEMA)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        conn.execute_batch("COMMIT")?;
        Ok(())
    };
    if let Err(e) = setup() {
        let _ = conn.execute_batch("ROLLBACK");
        return Err(open_error(path, e));
    }
    Ok(conn)
}

/// A read-only connection to an existing store (the queries', and the CLI's).
pub fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    if !path.exists() {
        return Err(open_error(path, "no such file"));
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| open_error(path, e))?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(|e| open_error(path, e))?;
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| open_error(path, e))?;
    // Version 1 differs only in an index: its queries work as they are.
    if !(1..=SCHEMA_VERSION).contains(&version) {
        return Err(open_error(
            path,
            format!("schema version {version}, this keygate reads 1 to {SCHEMA_VERSION}"),
        ));
    }
    Ok(conn)
}

/// The writer's state: its connection and the retention schedule.
pub(super) struct Writer {
    conn: Connection,
    path: PathBuf,
    retention_days: u32,
    stats: Arc<StoreStats>,
    /// When the next retention pass starts; while one is under way, every round takes a step.
    retention: super::RetentionSchedule,
    last_error_logged: Option<Instant>,
    /// The insert of [`ROWS_PER_INSERT`] rows.
    insert_many: String,
}

/// `OR FAIL`: a failing row ends the statement without undoing the rows it inserted before,
/// so SQLite keeps no statement journal for a multi-row insert (with the default `ABORT` it
/// wrote every page the statement touched to a temporary file first, to undo just that
/// statement). A failure still rolls the whole batch back: [`Writer::write_batch`] does.
const INSERT_CALLS: &str =
    "INSERT OR FAIL INTO calls (created_at, request_id, key_id, key_name, grp, model,
    prompt_tokens, completion_tokens, quota, is_stream, status, duration_ms, first_byte_ms,
    account, upstream, target, attempts, path, error_code) ";

const UPSERT_HOUR: &str = "INSERT INTO hourly (hour, key_id, model, account, requests, errors,
    prompt_tokens, completion_tokens, quota) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
    ON CONFLICT (key_id, hour, model, account) DO UPDATE SET
    requests = requests + excluded.requests, errors = errors + excluded.errors,
    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    completion_tokens = completion_tokens + excluded.completion_tokens,
    quota = quota + excluded.quota";

/// Columns of a call row as inserted.
const CALL_COLUMNS: usize = 19;
/// Rows per multi-row insert (19 values each, far under SQLite's 32,766 variables).
const ROWS_PER_INSERT: usize = 32;

/// `INSERT INTO calls … VALUES (…), (…), …` for `n` rows.
pub(super) fn insert_many_sql(n: usize) -> String {
    let one = format!("({})", vec!["?"; CALL_COLUMNS].join(", "));
    format!("{INSERT_CALLS}VALUES {}", vec![one; n].join(", "))
}

impl Writer {
    pub(super) fn new(
        conn: Connection,
        path: PathBuf,
        retention_days: u32,
        stats: Arc<StoreStats>,
    ) -> Writer {
        Writer {
            conn,
            path,
            retention_days,
            stats,
            retention: super::RetentionSchedule::new(),
            last_error_logged: None,
            insert_many: insert_many_sql(ROWS_PER_INSERT),
        }
    }

    /// Write `batch` in one transaction with its roll-ups. On failure (a full disk) the rows
    /// are counted as dropped; the gateway goes on serving.
    pub(super) fn write_batch(&mut self, batch: &[StoreRow<&str>]) {
        if batch.is_empty() {
            return;
        }
        let started = Instant::now();
        let n = batch.len() as u64;
        match self.insert(batch) {
            Ok(()) => {
                self.stats.batch_written(n, started);
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                self.stats.dropped.fetch_add(n, Ordering::Relaxed);
                self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                self.log_error(&format!("{n} rows dropped: {e}"));
            }
        }
    }

    fn log_error(&mut self, what: &str) {
        // At most one line a minute: a full disk fails every batch.
        if self
            .last_error_logged
            .is_none_or(|t| t.elapsed() > Duration::from_secs(60))
        {
            log::error!("usage_store {}: {what}", self.path.display());
            self.last_error_logged = Some(Instant::now());
        }
    }

    fn insert(&mut self, batch: &[StoreRow<&str>]) -> rusqlite::Result<()> {
        let tx = self.conn.transaction()?;
        {
            // Several rows per statement: a statement's step, reset and bind cost more than
            // the row's own b-tree work. Prepared once a batch (a batch is thousands of rows
            // under load), its texts bound without copies (`bulk_insert.rs`).
            let mut chunks = batch.chunks_exact(ROWS_PER_INSERT);
            if batch.len() >= ROWS_PER_INSERT {
                let mut many =
                    BulkInsert::prepare(&tx, &self.insert_many, ROWS_PER_INSERT, CALL_COLUMNS)?;
                for chunk in &mut chunks {
                    many.insert(chunk)?;
                }
            }
            let rest = chunks.remainder();
            if !rest.is_empty() {
                BulkInsert::prepare(&tx, &insert_many_sql(rest.len()), rest.len(), CALL_COLUMNS)?
                    .insert(rest)?;
            }
            let mut upsert = tx.prepare_cached(UPSERT_HOUR)?;
            for ((key, hour, model, account), s) in roll_up(batch, Cow::Borrowed) {
                upsert.execute(params![
                    hour,
                    int(key),
                    model,
                    account,
                    s.requests,
                    s.errors,
                    s.prompt_tokens,
                    s.completion_tokens,
                    s.quota,
                ])?;
            }
        }
        tx.commit()
    }

    /// One bounded retention step when a pass is due or under way: at most
    /// [`RETENTION_STEP`] old rows and as many old roll-ups, each its own short statement, so
    /// batches never wait long behind it.
    pub(super) fn retention_step(&mut self) {
        if !self.retention.step_due() {
            return;
        }
        let cutoff = crate::core::clock::unix_now() - i64::from(self.retention_days) * 86_400;
        match remove_older(&self.conn, cutoff) {
            Ok(removed) => self.retention.stepped(removed > 0),
            Err(e) => {
                self.retention.stepped(false);
                self.log_error(&format!("retention: {e}"));
            }
        }
    }
}

impl Sink for Writer {
    fn write_batch(&mut self, batch: &[StoreRow<&str>]) -> bool {
        Writer::write_batch(self, batch);
        true
    }

    fn retention_step(&mut self) {
        Writer::retention_step(self);
    }
}

impl rusqlite::ToSql for Param {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        match self {
            Param::Int(v) => v.to_sql(),
            Param::Text(v) => v.to_sql(),
        }
    }
}

impl Row for rusqlite::Row<'_> {
    fn int(&self, i: usize) -> Result<Option<i64>, StoreError> {
        Ok(self.get(i)?)
    }

    fn text(&self, i: usize) -> Result<Option<String>, StoreError> {
        Ok(self.get(i)?)
    }

    fn flag(&self, i: usize) -> Result<bool, StoreError> {
        Ok(self.get(i)?)
    }
}

impl Db for Connection {
    fn select(
        &mut self,
        sql: &str,
        params: &[Param],
        each: &mut dyn FnMut(&dyn Row) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut stmt = self.prepare_cached(sql)?;
        let mut rows = stmt.query(rusqlite::params_from_iter(params.iter()))?;
        while let Some(r) = rows.next()? {
            each(r)?;
        }
        Ok(())
    }

    fn describe(&self) -> String {
        self.path().unwrap_or("").to_string()
    }
}

/// Remove at most [`RETENTION_STEP`] calls and as many roll-up hours older than `cutoff`
/// (unix seconds); returns how many went.
pub fn remove_older(conn: &Connection, cutoff: i64) -> rusqlite::Result<usize> {
    let step = RETENTION_STEP as i64;
    let calls = conn.execute(
        "DELETE FROM calls WHERE id IN
            (SELECT id FROM calls WHERE created_at < ?1 ORDER BY created_at LIMIT ?2)",
        params![cutoff, step],
    )?;
    // An hour is removed once all of it is older than the cutoff.
    let hours = conn.execute(
        "DELETE FROM hourly WHERE rowid IN
            (SELECT rowid FROM hourly WHERE hour <= ?1 LIMIT ?2)",
        params![cutoff - 3600, step],
    )?;
    Ok(calls + hours)
}
