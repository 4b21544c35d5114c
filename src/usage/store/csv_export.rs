//! The CSV export of the usage store (`/admin/v1/logs.csv`): the calls a [`LogFilter`] matches,
//! read a chunk of rows at a time, so the file is never whole in memory.

use super::db::{Db, Param};
use super::query::{call_row, calls_where, resolve_range, LogFilter, COLUMNS, MAX_SPAN};
use super::StoreError;

/// The CSV export of the calls matching `f` (paging ignored), newest first, as an iterator
/// of chunks: each chunk is one query of at most [`CsvExport::ROWS_PER_CHUNK`] rows, resumed
/// after the last row sent, so the whole file is never in memory and no statement stays open
/// between chunks.
pub struct CsvExport<'c> {
    db: &'c mut dyn Db,
    filter: LogFilter,
    start: i64,
    end: i64,
    /// `(created_at, id)` of the last row sent.
    after: Option<(i64, i64)>,
    header_sent: bool,
    done: bool,
}

/// The CSV header.
pub const CSV_HEADER: [&str; 20] = [
    "id",
    "created_at",
    "request_id",
    "key_id",
    "key_name",
    "group",
    "account",
    "model",
    "status",
    "error_code",
    "prompt_tokens",
    "completion_tokens",
    "quota",
    "is_stream",
    "duration_ms",
    "first_byte_ms",
    "upstream",
    "target",
    "attempts",
    "path",
];

impl<'c> CsvExport<'c> {
    /// Rows per chunk.
    pub const ROWS_PER_CHUNK: usize = 1000;

    /// The export of `f` over `db`; the range is resolved as [`super::query::logs`] does, its notes
    /// returned.
    pub fn new(db: &'c mut dyn Db, f: &LogFilter, now: i64) -> (CsvExport<'c>, Vec<String>) {
        let mut notes = Vec::new();
        let (start, end) = resolve_range(f.start, f.end, now, MAX_SPAN, &mut notes);
        let export = CsvExport {
            db,
            filter: f.clone(),
            start,
            end,
            after: None,
            header_sent: false,
            done: false,
        };
        (export, notes)
    }

    fn chunk(&mut self) -> Result<Vec<u8>, StoreError> {
        let mut out = csv::Writer::from_writer(Vec::with_capacity(64 * 1024));
        let csv_err = |e: csv::Error| StoreError::Other(format!("csv: {e}"));
        if !self.header_sent {
            out.write_record(CSV_HEADER).map_err(csv_err)?;
            self.header_sent = true;
        }
        let (mut clause, mut values) = calls_where(&self.filter, self.start, self.end);
        if let Some((t, id)) = self.after {
            clause.push_str(" AND (created_at < ? OR (created_at = ? AND id < ?))");
            values.extend([Param::Int(t), Param::Int(t), Param::Int(id)]);
        }
        let sql = format!(
            "SELECT {COLUMNS} FROM calls WHERE {clause}
             ORDER BY created_at DESC, id DESC LIMIT {}",
            Self::ROWS_PER_CHUNK
        );
        let mut n = 0;
        let mut after = self.after;
        self.db.select(&sql, &values, &mut |r| {
            let c = call_row(r)?;
            let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
            let row = &c.row;
            out.write_record([
                c.id.to_string(),
                row.created_at.to_string(),
                row.request_id.clone(),
                row.key_id.to_string(),
                row.key_name.clone(),
                row.group.clone(),
                row.account.clone().unwrap_or_default(),
                row.model.clone(),
                row.status.to_string(),
                row.error_code.clone().unwrap_or_default(),
                row.prompt_tokens.to_string(),
                row.completion_tokens.to_string(),
                row.quota.to_string(),
                row.is_stream.to_string(),
                row.duration_ms.to_string(),
                opt(row.first_byte_ms),
                row.upstream.clone().unwrap_or_default(),
                row.target.clone().unwrap_or_default(),
                row.attempts.to_string(),
                row.path.clone(),
            ])
            .map_err(csv_err)?;
            after = Some((row.created_at, c.id));
            n += 1;
            Ok(())
        })?;
        self.after = after;
        if n < Self::ROWS_PER_CHUNK {
            self.done = true;
        }
        out.into_inner()
            .map_err(|e| StoreError::Other(format!("csv: {}", e.error())))
    }
}

impl Iterator for CsvExport<'_> {
    type Item = Result<Vec<u8>, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let chunk = self.chunk();
        if chunk.is_err() {
            self.done = true;
        }
        match chunk {
            Ok(c) if c.is_empty() => None,
            other => Some(other),
        }
    }
}
