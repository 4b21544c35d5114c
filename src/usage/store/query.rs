//! Queries over the usage store, as plain functions on a database ([`Db`]: the SQLite file or
//! PostgreSQL, the same SQL on both): a page of calls, stats buckets from the hourly roll-ups,
//! a key's newest calls, totals (and, in [`super::csv_export`], a CSV export read in chunks).
//! The admin routes, the key-holder routes and the CLI are each a few lines over them.
//!
//! Times are unix seconds. A range with no end ends now; with no start it spans the query's
//! default; a reversed range is swapped and one longer than [`MAX_SPAN`] is cut to its last
//! [`MAX_SPAN`] seconds; each change is said in the answer's `notes`.

use super::db::{Db, Param, Row};
use super::{StoreError, StoreRow};
use serde::Serialize;

/// The longest time range a query covers (366 days).
pub const MAX_SPAN: i64 = 366 * 86_400;
/// Page size when none is asked for.
pub const DEFAULT_PAGE_SIZE: u64 = 50;
/// The largest page.
pub const MAX_PAGE_SIZE: u64 = 1000;
/// Rows skipped at most by paging (past it, narrow the time range instead).
pub const MAX_OFFSET: u64 = 1_000_000;
/// Rows counted at most for a page's `total`.
pub const COUNT_AT_MOST: u64 = 100_000;

/// Filters of a calls query (`/admin/v1/logs`, the CSV export).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LogFilter {
    /// One key's calls.
    pub key_id: Option<u64>,
    /// One account's calls.
    pub account: Option<String>,
    /// One model's calls.
    pub model: Option<String>,
    /// One status's calls.
    pub status: Option<u16>,
    /// From (unix seconds, inclusive).
    pub start: Option<i64>,
    /// To (unix seconds, inclusive).
    pub end: Option<i64>,
    /// Page, from 1.
    pub page: Option<u64>,
    /// Rows per page (default 50, at most 1000).
    pub page_size: Option<u64>,
}

/// Bucket width of a stats query.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Bucket {
    /// One bucket per hour (UTC).
    #[default]
    Hour,
    /// One bucket per day (UTC).
    Day,
}

impl Bucket {
    /// Seconds in a bucket.
    pub fn seconds(self) -> i64 {
        match self {
            Bucket::Hour => 3600,
            Bucket::Day => 86_400,
        }
    }

    /// `hour` or `day`.
    pub fn parse(s: &str) -> Result<Bucket, String> {
        match s {
            "hour" => Ok(Bucket::Hour),
            "day" => Ok(Bucket::Day),
            _ => Err(format!("bucket: {s:?} is not hour or day")),
        }
    }
}

/// Filters of a stats query (`/admin/v1/stats`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StatsFilter {
    /// One key.
    pub key_id: Option<u64>,
    /// One account.
    pub account: Option<String>,
    /// One model.
    pub model: Option<String>,
    /// From (unix seconds).
    pub start: Option<i64>,
    /// To (unix seconds).
    pub end: Option<i64>,
    /// Bucket width.
    pub bucket: Bucket,
}

fn number<T: std::str::FromStr>(name: &str, v: &str) -> Result<T, String> {
    v.trim()
        .parse()
        .map_err(|_| format!("{name}: {v:?} is not a valid number"))
}

fn text(v: &str) -> Option<String> {
    (!v.is_empty()).then(|| v.to_string())
}

impl LogFilter {
    /// From a query string (`key_id=&account=&model=&status=&start=&end=&page=&page_size=`);
    /// other parameters are ignored, a malformed number is an error naming it.
    pub fn from_query(query: &str) -> Result<LogFilter, String> {
        let mut f = LogFilter::default();
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            match &*k {
                "key_id" => f.key_id = Some(number(&k, &v)?),
                "account" => f.account = text(&v),
                "model" => f.model = text(&v),
                "status" => f.status = Some(number(&k, &v)?),
                "start" => f.start = Some(number(&k, &v)?),
                "end" => f.end = Some(number(&k, &v)?),
                "page" => f.page = Some(number(&k, &v)?),
                "page_size" => f.page_size = Some(number(&k, &v)?),
                _ => {}
            }
        }
        Ok(f)
    }
}

impl StatsFilter {
    /// From a query string (`key_id=&account=&model=&start=&end=&bucket=hour|day`).
    pub fn from_query(query: &str) -> Result<StatsFilter, String> {
        let mut f = StatsFilter::default();
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            match &*k {
                "key_id" => f.key_id = Some(number(&k, &v)?),
                "account" => f.account = text(&v),
                "model" => f.model = text(&v),
                "start" => f.start = Some(number(&k, &v)?),
                "end" => f.end = Some(number(&k, &v)?),
                "bucket" => f.bucket = Bucket::parse(&v)?,
                _ => {}
            }
        }
        Ok(f)
    }
}

/// `start..=end` from what was asked, `now` and the query's default span; notes say what was
/// changed.
pub fn resolve_range(
    start: Option<i64>,
    end: Option<i64>,
    now: i64,
    default_span: i64,
    notes: &mut Vec<String>,
) -> (i64, i64) {
    let mut end = end.unwrap_or(now);
    let mut start = start.unwrap_or(end.saturating_sub(default_span));
    if start > end {
        std::mem::swap(&mut start, &mut end);
        notes.push(format!(
            "start was after end: the range was swapped to {start}..{end}"
        ));
    }
    if end.saturating_sub(start) > MAX_SPAN {
        start = end - MAX_SPAN;
        notes.push(format!(
            "the range was longer than {} days: start moved to {start}",
            MAX_SPAN / 86_400
        ));
    }
    (start, end)
}

/// One stored call, with its row id.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CallRow {
    /// The row id (newer calls have larger ids on one gateway).
    pub id: i64,
    /// The call.
    #[serde(flatten)]
    pub row: StoreRow,
}

/// A page of calls, newest first.
#[derive(Clone, Debug, Serialize)]
pub struct LogPage {
    /// The calls.
    pub items: Vec<CallRow>,
    /// Calls matching the filters (counted up to [`COUNT_AT_MOST`]).
    pub total: u64,
    /// `total` stopped counting at [`COUNT_AT_MOST`].
    pub total_capped: bool,
    /// The page (from 1).
    pub page: u64,
    /// The page size used.
    pub page_size: u64,
    /// The time range used.
    pub start: i64,
    /// The time range used.
    pub end: i64,
    /// What was changed in the request (a capped page size, a swapped range, …).
    pub notes: Vec<String>,
}

/// One stats bucket.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Totals {
    /// The bucket's start (unix seconds, UTC); 0 for totals over a range.
    pub t: i64,
    /// Calls.
    pub requests: i64,
    /// Calls answered with a status of 400 or more.
    pub errors: i64,
    /// Prompt tokens.
    pub prompt_tokens: i64,
    /// Completion tokens.
    pub completion_tokens: i64,
    /// Quota units.
    pub quota: i64,
}

/// Stats buckets over a range, every bucket present (zero when no call fell in it).
#[derive(Clone, Debug, Serialize)]
pub struct StatsPage {
    /// The buckets, oldest first.
    pub buckets: Vec<Totals>,
    /// `hour` or `day`.
    pub bucket: Bucket,
    /// The range used (`start` rounded down to its bucket).
    pub start: i64,
    /// The range used.
    pub end: i64,
    /// What was changed in the request.
    pub notes: Vec<String>,
}

pub(super) const COLUMNS: &str =
    "id, created_at, request_id, key_id, key_name, grp, model, prompt_tokens,
    completion_tokens, quota, is_stream, status, duration_ms, first_byte_ms, account, upstream,
    target, attempts, path, error_code";

pub(super) fn call_row(r: &dyn Row) -> Result<CallRow, StoreError> {
    let int = |i: usize| -> Result<i64, StoreError> { Ok(r.int(i)?.unwrap_or(0)) };
    let u = |i: usize| -> Result<u64, StoreError> { Ok(int(i)?.max(0) as u64) };
    let text = |i: usize| -> Result<String, StoreError> { Ok(r.text(i)?.unwrap_or_default()) };
    Ok(CallRow {
        id: int(0)?,
        row: StoreRow {
            created_at: int(1)?,
            request_id: text(2)?,
            key_id: u(3)?,
            key_name: text(4)?,
            group: text(5)?,
            model: text(6)?,
            prompt_tokens: u(7)?,
            completion_tokens: u(8)?,
            quota: int(9)?,
            is_stream: r.flag(10)?,
            status: u16::try_from(int(11)?).unwrap_or(0),
            duration_ms: u(12)?,
            first_byte_ms: r.int(13)?.map(|v| v.max(0) as u64),
            account: r.text(14)?,
            upstream: r.text(15)?,
            target: r.text(16)?,
            attempts: u32::try_from(int(17)?).unwrap_or(0),
            path: text(18)?,
            error_code: r.text(19)?,
        },
    })
}

/// Every row of `sql` read by `read`.
fn collect<T>(
    db: &mut (impl Db + ?Sized),
    sql: &str,
    params: &[Param],
    read: impl Fn(&dyn Row) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let mut out = Vec::new();
    db.select(sql, params, &mut |r| {
        out.push(read(r)?);
        Ok(())
    })?;
    Ok(out)
}

/// The `WHERE` clause of a calls query and its values.
pub(super) fn calls_where(f: &LogFilter, start: i64, end: i64) -> (String, Vec<Param>) {
    let mut sql = String::from("created_at >= ? AND created_at <= ?");
    let mut values = vec![Param::Int(start), Param::Int(end)];
    if let Some(k) = f.key_id {
        sql.push_str(" AND key_id = ?");
        values.push(Param::Int(k as i64));
    }
    if let Some(a) = &f.account {
        sql.push_str(" AND account = ?");
        values.push(Param::Text(a.clone()));
    }
    if let Some(m) = &f.model {
        sql.push_str(" AND model = ?");
        values.push(Param::Text(m.clone()));
    }
    if let Some(s) = f.status {
        sql.push_str(" AND status = ?");
        values.push(Param::Int(i64::from(s)));
    }
    (sql, values)
}

/// A page of calls matching `f`, newest first. With no `start` the range is the last
/// [`MAX_SPAN`].
pub fn logs(db: &mut (impl Db + ?Sized), f: &LogFilter, now: i64) -> Result<LogPage, StoreError> {
    let mut notes = Vec::new();
    let (start, end) = resolve_range(f.start, f.end, now, MAX_SPAN, &mut notes);
    let page = match f.page {
        Some(0) => {
            notes.push("page 0: pages start at 1".into());
            1
        }
        p => p.unwrap_or(1),
    };
    let page_size = match f.page_size {
        None => DEFAULT_PAGE_SIZE,
        Some(0) => {
            notes.push(format!("page_size 0: {DEFAULT_PAGE_SIZE} used"));
            DEFAULT_PAGE_SIZE
        }
        Some(s) if s > MAX_PAGE_SIZE => {
            notes.push(format!("page_size {s}: capped at {MAX_PAGE_SIZE}"));
            MAX_PAGE_SIZE
        }
        Some(s) => s,
    };
    let (clause, values) = calls_where(f, start, end);
    let counted = collect(
        db,
        &format!(
            "SELECT count(*) FROM (SELECT 1 FROM calls WHERE {clause} LIMIT {}) AS matching",
            COUNT_AT_MOST + 1
        ),
        &values,
        |r| r.int(0),
    )?;
    let total = counted.first().copied().flatten().unwrap_or(0).max(0) as u64;
    let offset = (page - 1).saturating_mul(page_size);
    let items = if offset > MAX_OFFSET {
        notes.push(format!(
            "page {page} starts past {MAX_OFFSET} rows: narrow the time range instead"
        ));
        Vec::new()
    } else {
        collect(
            db,
            &format!(
                "SELECT {COLUMNS} FROM calls WHERE {clause}
                 ORDER BY created_at DESC, id DESC LIMIT {page_size} OFFSET {offset}"
            ),
            &values,
            call_row,
        )?
    };
    Ok(LogPage {
        items,
        total: total.min(COUNT_AT_MOST),
        total_capped: total > COUNT_AT_MOST,
        page,
        page_size,
        start,
        end,
        notes,
    })
}

/// A key's newest `n` calls, newest first.
pub fn recent(
    db: &mut (impl Db + ?Sized),
    key_id: u64,
    n: usize,
) -> Result<Vec<CallRow>, StoreError> {
    collect(
        db,
        &format!(
            "SELECT {COLUMNS} FROM calls WHERE key_id = ? ORDER BY created_at DESC, id DESC LIMIT ?"
        ),
        &[Param::Int(key_id as i64), Param::Int(n as i64)],
        call_row,
    )
}

/// The `WHERE` clause of a roll-up query and its values (`hour` between `start` and `end`).
fn hourly_where(
    key_id: Option<u64>,
    account: Option<&str>,
    model: Option<&str>,
    start: i64,
    end: i64,
) -> (String, Vec<Param>) {
    let mut sql = String::from("hour >= ? AND hour <= ?");
    let mut values = vec![Param::Int(start), Param::Int(end)];
    if let Some(k) = key_id {
        sql.push_str(" AND key_id = ?");
        values.push(Param::Int(k as i64));
    }
    if let Some(a) = account {
        sql.push_str(" AND account = ?");
        values.push(Param::Text(a.to_string()));
    }
    if let Some(m) = model {
        sql.push_str(" AND model = ?");
        values.push(Param::Text(m.to_string()));
    }
    (sql, values)
}

/// Stats buckets from the hourly roll-ups. With no `start` the range is the last 30 days.
pub fn stats(
    db: &mut (impl Db + ?Sized),
    f: &StatsFilter,
    now: i64,
) -> Result<StatsPage, StoreError> {
    let mut notes = Vec::new();
    let (start, end) = resolve_range(f.start, f.end, now, 30 * 86_400, &mut notes);
    let width = f.bucket.seconds();
    let first = bucket_start(start, width);
    let last = bucket_start(end, width);
    let (clause, values) = hourly_where(
        f.key_id,
        f.account.as_deref(),
        f.model.as_deref(),
        first,
        end,
    );
    let found = collect(
        db,
        &format!(
            "SELECT (hour / {width}) * {width} AS t, {SUMS} FROM hourly WHERE {clause}
             GROUP BY t ORDER BY t"
        ),
        &values,
        totals_row,
    )?;
    // Every bucket of the range, zero where no call fell.
    let mut buckets = Vec::with_capacity(((last - first) / width + 1) as usize);
    let mut found = found.into_iter().peekable();
    let mut t = first;
    while t <= last {
        match found.next_if(|b| b.t == t) {
            Some(b) => buckets.push(b),
            None => buckets.push(Totals {
                t,
                ..Totals::default()
            }),
        }
        // A range that ends at the clock's last bucket (`end` near i64::MAX) ends here.
        let Some(next) = t.checked_add(width) else {
            break;
        };
        t = next;
    }
    Ok(StatsPage {
        buckets,
        bucket: f.bucket,
        start: first,
        end,
        notes,
    })
}

/// The start of the bucket of `width` seconds that holds `t`; for the first seconds of the
/// clock, whose bucket starts before `i64::MIN`, the first bucket that can be written.
fn bucket_start(t: i64, width: i64) -> i64 {
    t.div_euclid(width)
        .checked_mul(width)
        .unwrap_or(i64::MIN / width * width)
}

/// The roll-ups' sums, as 64-bit integers on both backends (PostgreSQL's `sum` of a `bigint`
/// is a `numeric`).
const SUMS: &str = "CAST(sum(requests) AS BIGINT), CAST(sum(errors) AS BIGINT),
    CAST(sum(prompt_tokens) AS BIGINT), CAST(sum(completion_tokens) AS BIGINT),
    CAST(sum(quota) AS BIGINT)";

fn totals_row(r: &dyn Row) -> Result<Totals, StoreError> {
    let int = |i: usize| -> Result<i64, StoreError> { Ok(r.int(i)?.unwrap_or(0)) };
    Ok(Totals {
        t: int(0)?,
        requests: int(1)?,
        errors: int(2)?,
        prompt_tokens: int(3)?,
        completion_tokens: int(4)?,
        quota: int(5)?,
    })
}

/// Totals per model over `start..=end` (whole hours) for a key or an account (or everything),
/// from the roll-ups; the model "" sums them all, first.
pub fn totals_by_model(
    db: &mut (impl Db + ?Sized),
    key_id: Option<u64>,
    account: Option<&str>,
    start: i64,
    end: i64,
) -> Result<Vec<(String, Totals)>, StoreError> {
    let (clause, values) = hourly_where(key_id, account, None, start.div_euclid(3600) * 3600, end);
    let per_model = collect(
        db,
        &format!(
            "SELECT CAST(0 AS BIGINT), {SUMS}, model FROM hourly WHERE {clause}
             GROUP BY model ORDER BY sum(quota) DESC, model"
        ),
        &values,
        |r| Ok((r.text(6)?.unwrap_or_default(), totals_row(r)?)),
    )?;
    let mut all = Totals::default();
    for (_, t) in &per_model {
        all.requests += t.requests;
        all.errors += t.errors;
        all.prompt_tokens += t.prompt_tokens;
        all.completion_tokens += t.completion_tokens;
        all.quota += t.quota;
    }
    let mut out = vec![(String::new(), all)];
    out.extend(per_model);
    Ok(out)
}
