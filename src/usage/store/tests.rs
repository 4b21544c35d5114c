//! The store's queries and its writer on real SQLite files.

use super::query::{self, Bucket, LogFilter, StatsFilter};
use super::sqlite::{insert_many_sql, open_writer, Writer, CHECKPOINT_PAGES, WRITER_CACHE_KIB};
use super::*;
use super::{CsvExport, CSV_HEADER};
use std::sync::atomic::Ordering;

fn row(key_id: u64, created_at: i64, model: &str, status: u16) -> StoreRow {
    StoreRow {
        created_at,
        request_id: format!("r-{created_at}"),
        key_id,
        key_name: "k".into(),
        group: "default".into(),
        model: model.into(),
        prompt_tokens: 10,
        completion_tokens: 5,
        quota: 7,
        status,
        attempts: 1,
        path: "/v1/chat/completions".into(),
        ..StoreRow::default()
    }
}

/// A store in a temp dir with `rows` written (flushed).
fn store_with(rows: Vec<StoreRow>) -> (tempfile::TempDir, UsageStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = UsageStore::open(&StoreSettings::new(dir.path().join("usage.db"))).unwrap();
    for r in &rows {
        store.push(&r.borrowed());
    }
    store.flush(Duration::from_secs(10));
    (dir, store)
}

const NOW: i64 = 1_750_000_000;

#[test]
fn logs_page_newest_first_with_filters_and_capped_paging() {
    let rows = (0..30)
        .map(|i| {
            row(
                1 + i % 2,
                NOW - 100 + i as i64,
                "m",
                if i == 5 { 500 } else { 200 },
            )
        })
        .collect();
    let (_dir, store) = store_with(rows);
    store.read(|c| {
        let f = LogFilter {
            key_id: Some(1),
            page_size: Some(10),
            ..LogFilter::default()
        };
        let p = query::logs(c, &f, NOW).unwrap();
        assert_eq!(p.total, 15);
        assert_eq!(p.items.len(), 10);
        assert!(p
            .items
            .windows(2)
            .all(|w| w[0].row.created_at > w[1].row.created_at));
        assert!(p.items.iter().all(|i| i.row.key_id == 1));
        let p2 = query::logs(
            c,
            &LogFilter {
                page: Some(2),
                ..f.clone()
            },
            NOW,
        )
        .unwrap();
        assert_eq!(p2.items.len(), 5);

        let p = query::logs(
            c,
            &LogFilter {
                status: Some(500),
                ..LogFilter::default()
            },
            NOW,
        )
        .unwrap();
        assert_eq!(p.total, 1);

        let p = query::logs(
            c,
            &LogFilter {
                page: Some(0),
                page_size: Some(10_000),
                ..LogFilter::default()
            },
            NOW,
        )
        .unwrap();
        assert_eq!((p.page, p.page_size, p.items.len()), (1, 1000, 30));
        assert_eq!(p.notes.len(), 2, "{:?}", p.notes);

        let p = query::logs(
            c,
            &LogFilter {
                page_size: Some(0),
                ..LogFilter::default()
            },
            NOW,
        )
        .unwrap();
        assert_eq!(p.page_size, 50);

        // Reversed: swapped and said so.
        let p = query::logs(
            c,
            &LogFilter {
                start: Some(NOW),
                end: Some(NOW - 1000),
                ..LogFilter::default()
            },
            NOW,
        )
        .unwrap();
        assert_eq!(p.items.len(), 30);
        assert!(p.notes[0].contains("swapped"), "{:?}", p.notes);

        // Unbounded: cut to the last 366 days and said so.
        let p = query::logs(
            c,
            &LogFilter {
                start: Some(0),
                end: Some(NOW),
                ..LogFilter::default()
            },
            NOW,
        )
        .unwrap();
        assert_eq!(p.start, NOW - query::MAX_SPAN);
        assert!(p.notes[0].contains("366 days"), "{:?}", p.notes);
    });
}

#[test]
fn filters_parse_from_a_query_string_with_precise_errors() {
    let f = LogFilter::from_query(
        "key_id=3&account=acme&model=gpt-4o&status=200&start=1&end=2&page=3&page_size=4&p=9",
    )
    .unwrap();
    assert_eq!(f.key_id, Some(3));
    assert_eq!(f.account.as_deref(), Some("acme"));
    assert_eq!(f.page_size, Some(4));
    let e = LogFilter::from_query("key_id=abc").unwrap_err();
    assert!(e.contains("key_id") && e.contains("abc"), "{e}");
    let e = StatsFilter::from_query("bucket=week").unwrap_err();
    assert!(e.contains("bucket"), "{e}");
    assert_eq!(
        StatsFilter::from_query("bucket=day").unwrap().bucket,
        Bucket::Day
    );
}

#[test]
fn a_range_that_ends_at_the_last_representable_second_is_answered() {
    // Found by the API fuzzer: `end=9223372036854775807` overflowed the bucket walk.
    let (_dir, store) = store_with(vec![row(1, NOW, "a", 200)]);
    store.read(|c| {
        for bucket in [Bucket::Hour, Bucket::Day] {
            let f = StatsFilter {
                key_id: Some(1),
                start: Some(390),
                end: Some(i64::MAX),
                bucket,
                ..StatsFilter::default()
            };
            let s = query::stats(c, &f, NOW).unwrap();
            assert!(!s.buckets.is_empty());
            assert!(!s.notes.is_empty(), "the capped range is said");
        }
    });
}

#[test]
fn a_range_at_the_first_representable_second_is_answered() {
    // Found by the API fuzzer: `end=-9223372036854775807` (no start: 30 days before it,
    // saturated at i64::MIN) overflowed the first bucket's start.
    let (_dir, store) = store_with(vec![row(1, NOW, "a", 200)]);
    store.read(|c| {
        for bucket in [Bucket::Hour, Bucket::Day] {
            for (start, end) in [(None, Some(i64::MIN + 1)), (Some(i64::MIN), Some(i64::MIN))] {
                let f = StatsFilter {
                    start,
                    end,
                    bucket,
                    ..StatsFilter::default()
                };
                let s = query::stats(c, &f, NOW).unwrap();
                assert_eq!(s.buckets.len(), 1, "{bucket:?} {start:?} {end:?}");
                assert_eq!(s.buckets[0].requests, 0);
            }
        }
    });
}

#[test]
fn stats_come_from_the_roll_ups_in_buckets_with_every_bucket_present() {
    let hour = NOW - NOW % 3600;
    let rows = vec![
        row(1, hour - 7200 + 5, "a", 200),
        row(1, hour - 7200 + 6, "b", 429),
        row(1, hour + 1, "a", 200),
        row(2, hour + 2, "a", 200),
    ];
    let (_dir, store) = store_with(rows);
    store.read(|c| {
        let f = StatsFilter {
            key_id: Some(1),
            start: Some(hour - 3 * 3600),
            end: Some(hour + 10),
            ..StatsFilter::default()
        };
        let s = query::stats(c, &f, NOW).unwrap();
        let reqs: Vec<i64> = s.buckets.iter().map(|b| b.requests).collect();
        assert_eq!(reqs, vec![0, 2, 0, 1]);
        assert_eq!(s.buckets[1].errors, 1);
        assert_eq!(s.buckets[1].quota, 14);
        assert_eq!(s.buckets[1].prompt_tokens, 20);
        let by_model = StatsFilter {
            model: Some("b".into()),
            ..f.clone()
        };
        let s = query::stats(c, &by_model, NOW).unwrap();
        assert_eq!(s.buckets.iter().map(|b| b.requests).sum::<i64>(), 1);
        let day = StatsFilter {
            key_id: None,
            bucket: Bucket::Day,
            ..f
        };
        let s = query::stats(c, &day, NOW).unwrap();
        assert_eq!(s.buckets.iter().map(|b| b.requests).sum::<i64>(), 4);
        assert!(s.buckets.iter().all(|b| b.t % 86_400 == 0));

        let t = query::totals_by_model(c, Some(1), None, hour - 86_400, hour + 3600).unwrap();
        assert_eq!(t[0].0, "");
        assert_eq!(t[0].1.requests, 3);
        assert_eq!(t.len(), 3);
    });
}

#[test]
fn csv_export_streams_every_row_in_chunks_with_quoting() {
    let mut rows: Vec<StoreRow> = (0..2500)
        .map(|i| row(1, NOW - 5000 + i, "m", 200))
        .collect();
    rows[2499].key_name = "comma, \"quote\"\nnewline".into();
    rows[2499].account = Some("acme".into());
    rows.push(row(2, NOW - 1, "m", 200));
    let (_dir, store) = store_with(rows);
    store.read(|c| {
        let f = LogFilter {
            key_id: Some(1),
            ..LogFilter::default()
        };
        let (export, notes) = CsvExport::new(c, &f, NOW);
        assert!(notes.is_empty());
        let chunks: Vec<Vec<u8>> = export.map(Result::unwrap).collect();
        assert_eq!(chunks.len(), 3, "1000 rows a chunk");
        let all: Vec<u8> = chunks.concat();
        let mut reader = csv::Reader::from_reader(&all[..]);
        assert_eq!(
            reader.headers().unwrap().iter().collect::<Vec<_>>(),
            CSV_HEADER.to_vec()
        );
        let records: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
        assert_eq!(records.len(), 2500);
        // Newest first; the odd name comes back whole.
        assert_eq!(&records[0][4], "comma, \"quote\"\nnewline");
        assert_eq!(&records[0][6], "acme");
        assert_eq!(&records[0][1], (NOW - 5000 + 2499).to_string());
        assert_eq!(&records[2499][1], (NOW - 5000).to_string());
        let ids: std::collections::HashSet<&str> =
            records.iter().map(|r| r.get(0).unwrap()).collect();
        assert_eq!(ids.len(), 2500, "no row twice across chunks");
    });
}

#[test]
fn a_full_disk_drops_and_counts_and_the_writer_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("usage.db");
    let conn = open_writer(&path).unwrap();
    // SQLITE_FULL, as a full disk gives it: the file may not grow past a few pages.
    let pages: i64 = conn
        .query_row("PRAGMA page_count", [], |r| r.get(0))
        .unwrap();
    conn.pragma_update(None, "max_page_count", pages + 2)
        .unwrap();
    let stats = Arc::new(StoreStats::default());
    let mut w = Writer::new(conn, path, 90, stats.clone());
    for round in 0..20 {
        let batch: Vec<StoreRow> = (0..500)
            .map(|i| row(1, NOW + round * 1000 + i, "m", 200))
            .collect();
        let batch: Vec<_> = batch.iter().map(StoreRow::borrowed).collect();
        w.write_batch(&batch);
    }
    let (written, dropped) = (
        stats.written.load(Ordering::Relaxed),
        stats.dropped.load(Ordering::Relaxed),
    );
    assert_eq!(written + dropped, 10_000);
    assert!(dropped > 0);
    assert!(stats.write_errors.load(Ordering::Relaxed) > 0);
    // What was committed is whole: rows and roll-ups agree.
    let reader = open_reader(&dir.path().join("usage.db")).unwrap();
    let rows: i64 = reader
        .query_row("SELECT count(*) FROM calls", [], |r| r.get(0))
        .unwrap();
    let rolled: i64 = reader
        .query_row("SELECT coalesce(sum(requests), 0) FROM hourly", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(rows as u64, written);
    assert_eq!(rolled, rows);
}

#[test]
fn retention_removes_in_bounded_steps() {
    let old = NOW - 200 * 86_400;
    let rows: Vec<StoreRow> = (0..12_000).map(|i| row(1, old + i, "m", 200)).collect();
    let (dir, store) = store_with(rows);
    drop(store);
    let conn = open_writer(&dir.path().join("usage.db")).unwrap();
    let first = super::sqlite::remove_older(&conn, NOW).unwrap();
    assert!(first <= 2 * RETENTION_STEP, "{first}");
    let mut total = first;
    loop {
        let n = super::sqlite::remove_older(&conn, NOW).unwrap();
        if n == 0 {
            break;
        }
        total += n;
    }
    let hours = 12_000usize.div_ceil(3600) + 1;
    assert!(total >= 12_000 && total <= 12_000 + hours, "{total}");
}

#[test]
fn a_corrupt_file_names_itself() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("usage.db");
    std::fs::write(&path, vec![7u8; 4096]).unwrap();
    let e = UsageStore::open(&StoreSettings::new(path.clone()))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains(&path.display().to_string()) && e.contains("not a database"),
        "{e}"
    );
}

#[test]
fn the_writer_keeps_a_16_mib_cache_and_checkpoints_every_10000_pages() {
    let dir = tempfile::tempdir().unwrap();
    let conn = open_writer(&dir.path().join("usage.db")).unwrap();
    let pragma = |name: &str| -> i64 {
        conn.query_row(&format!("PRAGMA {name}"), [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(WRITER_CACHE_KIB, 16 * 1024);
    assert_eq!(pragma("cache_size"), -16 * 1024, "negative: KiB, not pages");
    assert_eq!(CHECKPOINT_PAGES, 10_000);
    assert_eq!(pragma("wal_autocheckpoint"), 10_000);
    assert_eq!(pragma("synchronous"), 1, "NORMAL");
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    // The queries' connection keeps SQLite's defaults.
    let reader = open_reader(&dir.path().join("usage.db")).unwrap();
    let cache: i64 = reader
        .query_row("PRAGMA cache_size", [], |r| r.get(0))
        .unwrap();
    assert_eq!(cache, -2000);
}

#[test]
fn a_failing_row_does_not_undo_its_statement_so_no_statement_journal_is_kept() {
    // The writer's multi-row insert is OR FAIL: a row that fails ends the statement and keeps
    // the rows before it (the batch's transaction is what gets rolled back). With the default
    // ABORT, SQLite undoes the statement itself, from a statement journal written as it goes.
    let dir = tempfile::tempdir().unwrap();
    let conn = open_writer(&dir.path().join("usage.db")).unwrap();
    let sql = insert_many_sql(2);
    assert!(sql.starts_with("INSERT OR FAIL INTO calls"), "{sql}");
    conn.execute_batch("BEGIN").unwrap();
    let mut values: Vec<rusqlite::types::Value> = Vec::new();
    for i in 0..2 {
        values.extend([
            NOW.into(),
            // The second row's request id is NULL: a NOT NULL constraint fails.
            if i == 0 {
                "r-1".to_string().into()
            } else {
                rusqlite::types::Value::Null
            },
            1i64.into(),
            "k".to_string().into(),
            "default".to_string().into(),
            "m".to_string().into(),
            1i64.into(),
            1i64.into(),
            1i64.into(),
            0i64.into(),
            200i64.into(),
            1i64.into(),
            rusqlite::types::Value::Null,
            rusqlite::types::Value::Null,
            rusqlite::types::Value::Null,
            rusqlite::types::Value::Null,
            1i64.into(),
            "/v1/chat/completions".to_string().into(),
            rusqlite::types::Value::Null,
        ]);
    }
    let e = conn
        .execute(&sql, rusqlite::params_from_iter(values))
        .unwrap_err();
    assert!(e.to_string().contains("NOT NULL"), "{e}");
    let kept: i64 = conn
        .query_row("SELECT count(*) FROM calls", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        kept, 1,
        "the statement's first row stays until the transaction rolls back"
    );
    conn.execute_batch("ROLLBACK").unwrap();
    let after: i64 = conn
        .query_row("SELECT count(*) FROM calls", [], |r| r.get(0))
        .unwrap();
    assert_eq!(after, 0);
}

#[test]
fn rows_read_back_as_pushed_texts_and_absent_fields_alike() {
    // The queue keeps every row's texts one after another in one string: each row must get
    // back exactly its own, present or absent, whatever their lengths.
    let rows = vec![
        StoreRow {
            key_name: "ключ «one»".into(),
            account: Some("acme".into()),
            upstream: Some("openai".into()),
            target: Some("https://a.example".into()),
            error_code: None,
            first_byte_ms: Some(12),
            is_stream: true,
            ..row(1, NOW - 3, "gpt-4o", 200)
        },
        StoreRow {
            key_name: String::new(),
            group: String::new(),
            account: None,
            upstream: None,
            error_code: Some("quota_exhausted".into()),
            ..row(1, NOW - 2, "", 429)
        },
        StoreRow {
            model: "m".repeat(300),
            account: Some(String::new()),
            target: Some("t".into()),
            ..row(1, NOW - 1, "x", 502)
        },
    ];
    let (_dir, store) = store_with(rows.clone());
    let got = store.read(|c| query::recent(c, 1, 10)).unwrap();
    let got: Vec<StoreRow> = got.into_iter().rev().map(|c| c.row).collect();
    assert_eq!(got, rows);
}

#[test]
fn rows_of_full_statements_and_of_the_rest_read_back_exactly() {
    // The writer inserts 32 rows a statement and the batch's rest in one more, its texts bound
    // without copies straight from the queue's buffer: every row of both, with texts of every
    // length (a NUL, non-ASCII, empty), present or absent, comes back as it was pushed.
    let rows: Vec<StoreRow> = (0..69i64)
        .map(|i| {
            let text = |tag: &str| format!("{tag}-{}", "ü\0x".repeat(i as usize % 7));
            StoreRow {
                key_name: text("name"),
                group: if i % 5 == 0 { String::new() } else { text("g") },
                account: (i % 3 == 0).then(|| text("acct")),
                upstream: (i % 2 == 0).then(|| text("up")),
                target: (i % 4 == 1).then(|| text("t")),
                error_code: (i % 6 == 5).then(|| text("code")),
                first_byte_ms: (i % 2 == 1).then_some(i as u64),
                is_stream: i % 2 == 0,
                duration_ms: i as u64 * 3,
                attempts: i as u32 % 4,
                quota: -i,
                ..row(1, NOW - 100 + i, &text("model"), 200 + i as u16)
            }
        })
        .collect();
    let (_dir, store) = store_with(rows.clone());
    let got = store.read(|c| query::recent(c, 1, 100)).unwrap();
    let got: Vec<StoreRow> = got.into_iter().rev().map(|c| c.row).collect();
    assert_eq!(got.len(), rows.len());
    assert_eq!(got, rows);
}

/// The account index's `CREATE` statement, and the plan of an account's newest calls.
fn account_index_and_plan(path: &std::path::Path) -> (String, String) {
    let conn = rusqlite::Connection::open(path).unwrap();
    let sql: String = conn
        .query_row(
            "SELECT sql FROM sqlite_master WHERE name = 'calls_account_time'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let (clause, _) = query::calls_where(
        &LogFilter {
            account: Some("acme".into()),
            ..LogFilter::default()
        },
        0,
        NOW,
    );
    let plan = conn
        .prepare(&format!(
            "EXPLAIN QUERY PLAN SELECT id FROM calls WHERE {clause} ORDER BY created_at DESC"
        ))
        .unwrap()
        .query_map(rusqlite::params![0, NOW, "acme"], |r| r.get::<_, String>(3))
        .unwrap()
        .map(Result::unwrap)
        .collect::<Vec<_>>()
        .join("; ");
    (sql, plan)
}

#[test]
fn a_version_1_store_gets_the_partial_account_index_and_keeps_its_rows() {
    // Version 1 as it was: the account index over every call.
    let rows = [
        row(1, NOW - 20, "gpt-4o", 200),
        StoreRow {
            account: Some("acme".into()),
            ..row(2, NOW - 10, "gpt-4o", 200)
        },
    ];
    let (dir, store) = store_with(rows.to_vec());
    drop(store);
    let path = dir.path().join("usage.db");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "DROP INDEX calls_account_time;
             CREATE INDEX calls_account_time ON calls(account, created_at);
             PRAGMA user_version = 1;",
        )
        .unwrap();
    }
    let store = UsageStore::open(&StoreSettings::new(path.clone())).unwrap();
    let (sql, plan) = account_index_and_plan(&path);
    assert!(sql.contains("WHERE account IS NOT NULL"), "{sql}");
    assert!(plan.contains("calls_account_time"), "{plan}");
    let conn = open_reader(&path).unwrap();
    let (calls, with_account): (i64, i64) = conn
        .query_row("SELECT count(*), count(account) FROM calls", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!((calls, with_account), (2, 1));
    drop(store);
}

#[test]
fn a_store_of_a_newer_keygate_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("usage.db");
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch("PRAGMA user_version = 9;")
        .unwrap();
    let e = UsageStore::open(&StoreSettings::new(path.clone()))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains(&path.display().to_string()) && e.contains("schema version 9 is newer"),
        "{e}"
    );
}
