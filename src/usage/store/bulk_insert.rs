//! The writer's multi-row insert, bound without copies.
//!
//! rusqlite binds every text with `SQLITE_TRANSIENT`: SQLite allocates and copies each one
//! (five texts a row: request id, key name, group, model, path), then frees it when the next
//! row is bound. That was about a sixth of the writer's instructions per row. Here the
//! statement is prepared through SQLite's own API on the writer's connection and the texts
//! are bound `SQLITE_STATIC`, straight from the queue's buffer. That is sound because
//! [`BulkInsert::insert`] binds, steps and then clears every binding before it returns: SQLite
//! never holds a pointer into the rows past the call that borrowed them.

use super::roll_up::int;
use super::StoreRow;
use rusqlite::{ffi, Connection};
use std::ffi::{c_int, CStr};
use std::marker::PhantomData;
use std::ptr::NonNull;

/// A prepared `INSERT` of a fixed number of call rows on one connection, finalized on drop.
pub(super) struct BulkInsert<'c> {
    stmt: NonNull<ffi::sqlite3_stmt>,
    db: *mut ffi::sqlite3,
    rows: usize,
    /// The statement must not outlive the connection it was prepared on.
    _conn: PhantomData<&'c Connection>,
}

/// The error SQLite reports for `code` on `db`, as rusqlite words its own.
fn failure(db: *mut ffi::sqlite3, code: c_int) -> rusqlite::Error {
    // SAFETY: `db` is a live connection; `sqlite3_errmsg` returns a NUL-terminated string
    // owned by SQLite that stays valid until the next call on the connection (copied here).
    let message = unsafe { CStr::from_ptr(ffi::sqlite3_errmsg(db)) }
        .to_string_lossy()
        .into_owned();
    rusqlite::Error::SqliteFailure(ffi::Error::new(code), Some(message))
}

impl<'c> BulkInsert<'c> {
    /// Prepare `sql`, an insert of `rows` rows of `columns` parameters each, on `conn`.
    pub(super) fn prepare(
        conn: &'c Connection,
        sql: &str,
        rows: usize,
        columns: usize,
    ) -> rusqlite::Result<BulkInsert<'c>> {
        // SAFETY: the handle is the live connection `conn` borrows for `'c`; it is used on this
        // thread only, as the connection itself is.
        let db = unsafe { conn.handle() };
        let len = c_int::try_from(sql.len()).map_err(|_| rusqlite::Error::InvalidQuery)?;
        let mut stmt = std::ptr::null_mut();
        // SAFETY: `sql` is valid for `len` bytes; `stmt` receives the statement or null.
        let rc = unsafe {
            ffi::sqlite3_prepare_v2(
                db,
                sql.as_ptr().cast(),
                len,
                &mut stmt,
                std::ptr::null_mut(),
            )
        };
        if rc != ffi::SQLITE_OK {
            return Err(failure(db, rc));
        }
        let stmt = NonNull::new(stmt).ok_or(rusqlite::Error::InvalidQuery)?;
        let insert = BulkInsert {
            stmt,
            db,
            rows,
            _conn: PhantomData,
        };
        // SAFETY: `stmt` is the statement just prepared.
        let params = unsafe { ffi::sqlite3_bind_parameter_count(stmt.as_ptr()) };
        if usize::try_from(params).ok() != Some(rows * columns) {
            return Err(rusqlite::Error::InvalidParameterCount(
                rows * columns,
                usize::try_from(params).unwrap_or(0),
            ));
        }
        Ok(insert)
    }

    /// Insert `rows` (exactly as many as the statement was prepared for).
    pub(super) fn insert(&mut self, rows: &[StoreRow<&str>]) -> rusqlite::Result<()> {
        if rows.len() != self.rows {
            return Err(rusqlite::Error::InvalidParameterCount(
                rows.len(),
                self.rows,
            ));
        }
        let mut at = 0;
        // SAFETY: the bindings are cleared below, before `rows` can go away.
        let bound = rows
            .iter()
            .try_for_each(|r| unsafe { self.bind_row(&mut at, r) });
        let stepped = bound.and_then(|()| {
            // SAFETY: every parameter is bound, the texts to `rows`, which outlive this call.
            let rc = unsafe { ffi::sqlite3_step(self.stmt.as_ptr()) };
            if rc == ffi::SQLITE_DONE {
                Ok(())
            } else {
                Err(failure(self.db, rc))
            }
        });
        // SAFETY: the statement is live. After these two, SQLite holds no pointer into `rows`.
        unsafe {
            ffi::sqlite3_reset(self.stmt.as_ptr());
            ffi::sqlite3_clear_bindings(self.stmt.as_ptr());
        }
        stepped
    }

    /// Bind call `r` to the next 19 parameters (`at` counts them).
    ///
    /// # Safety
    /// The statement then points into `r`'s texts: it must be stepped and its bindings
    /// cleared while they live (as [`BulkInsert::insert`] does).
    unsafe fn bind_row(&self, at: &mut c_int, r: &StoreRow<&str>) -> rusqlite::Result<()> {
        self.int(at, r.created_at)?;
        self.text(at, Some(r.request_id))?;
        self.int(at, int(r.key_id))?;
        self.text(at, Some(r.key_name))?;
        self.text(at, Some(r.group))?;
        self.text(at, Some(r.model))?;
        self.int(at, int(r.prompt_tokens))?;
        self.int(at, int(r.completion_tokens))?;
        self.int(at, r.quota)?;
        self.int(at, i64::from(r.is_stream))?;
        self.int(at, i64::from(r.status))?;
        self.int(at, int(r.duration_ms))?;
        match r.first_byte_ms {
            Some(ms) => self.int(at, int(ms))?,
            None => self.null(at)?,
        }
        self.text(at, r.account)?;
        self.text(at, r.upstream)?;
        self.text(at, r.target)?;
        self.int(at, i64::from(r.attempts))?;
        self.text(at, Some(r.path))?;
        self.text(at, r.error_code)
    }

    fn check(&self, rc: c_int) -> rusqlite::Result<()> {
        if rc == ffi::SQLITE_OK {
            Ok(())
        } else {
            Err(failure(self.db, rc))
        }
    }

    fn int(&self, at: &mut c_int, v: i64) -> rusqlite::Result<()> {
        *at += 1;
        // SAFETY: a live statement; SQLite checks the index.
        self.check(unsafe { ffi::sqlite3_bind_int64(self.stmt.as_ptr(), *at, v) })
    }

    fn null(&self, at: &mut c_int) -> rusqlite::Result<()> {
        *at += 1;
        // SAFETY: as above.
        self.check(unsafe { ffi::sqlite3_bind_null(self.stmt.as_ptr(), *at) })
    }

    /// Bind `v` without a copy (`SQLITE_STATIC`).
    ///
    /// # Safety
    /// As [`BulkInsert::bind_row`]: the binding must be cleared before `v` goes away.
    unsafe fn text(&self, at: &mut c_int, v: Option<&str>) -> rusqlite::Result<()> {
        let Some(v) = v else {
            return self.null(at);
        };
        *at += 1;
        // An empty text of an empty buffer is a dangling (if never read) pointer: give SQLite
        // a real one.
        let ptr = if v.is_empty() {
            "".as_ptr()
        } else {
            v.as_ptr()
        };
        // SAFETY: `ptr` is valid UTF-8 for `v.len()` bytes, which the caller keeps alive until
        // the binding is cleared; SQLite copies nothing and frees nothing (`SQLITE_STATIC`).
        self.check(unsafe {
            ffi::sqlite3_bind_text64(
                self.stmt.as_ptr(),
                *at,
                ptr.cast(),
                v.len() as u64,
                ffi::SQLITE_STATIC(),
                ffi::SQLITE_UTF8 as u8,
            )
        })
    }
}

impl Drop for BulkInsert<'_> {
    fn drop(&mut self) {
        // SAFETY: the statement is live and finalized once; the connection outlives it ('c).
        unsafe { ffi::sqlite3_finalize(self.stmt.as_ptr()) };
    }
}
