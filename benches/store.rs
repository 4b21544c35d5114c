//! The usage store (SPEC §9, issue 18):
//!
//! * `store/ingest` — rows pushed through [`UsageStore`] (queue, writer thread, one transaction
//!   per batch with its roll-ups) until written: rows per second sustained by the writer. The
//!   rows are what a gateway sends: each round's are newer than the last round's (the clock runs
//!   on at the rate measured, 50,000 rows a second, 1,000 keys and 6 models), so a round's
//!   rows fall in the current hour and append at the end of the time indexes. (Each round once
//!   re-sent the same 50,000 rows spread over a whole day: every row went into the middle of the
//!   indexes and into an hour of its own roll-up, a write pattern no gateway makes, and the
//!   figure was about half of what the writer sustains: 43,600–57,300 against 88,400–115,600
//!   rows/s, same binary and run.)
//! * `store/ingest_no_account` and `store/ingest_no_account_v1_index` — the same rows with no
//!   account (a gateway that does not use accounts), into the current schema (the account
//!   index holds only calls with an account) and into schema version 1's (it held every call).
//! * `store/pg_ingest` — the same into PostgreSQL (`backend: postgres`: COPY in binary and the
//!   roll-ups' UPSERT, one transaction per batch), on a throwaway local cluster with
//!   PostgreSQL's own durability settings (fsync on). Skipped when PostgreSQL is not installed.
//! * `store_10m/newest_100` — a key's newest 100 calls, and `store_10m/hourly_30d` — a key's
//!   30-day hourly series from the roll-ups, on a database of 10M calls (1,000 keys, 6 models,
//!   10 accounts, 30 days). The database is made once under the target folder
//!   (`store-bench/usage-10m.db`, a few minutes) and reused by later runs.
//!
//! Run: `cargo bench --bench store -- --warm-up-time 1 --measurement-time 5`
//! (PostgreSQL only, without making the 10M-row database:
//! `KEYGATE_BENCH_NO_10M=1 cargo bench --bench store -- store/pg_ingest`)

#[path = "../tests/common/pg.rs"]
mod pg;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use keygate::usage::store::query::{self, Bucket, StatsFilter};
use keygate::usage::store::{StoreRow, StoreSettings, UsageStore};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const MODELS: [&str; 6] = [
    "gpt-4o-mini",
    "gpt-4o",
    "claude-3-5-sonnet-latest",
    "gemini-1.5-pro",
    "text-embedding-3-small",
    "o3-mini",
];

/// Call `i` of a 30-day history ending at `end`: keys, models and accounts spread evenly.
fn row(i: u64, end: i64, span: i64, total: u64) -> StoreRow {
    let key_id = 1 + (i * 7919) % 1000;
    StoreRow {
        created_at: end - span + (i as i64 * span) / total as i64,
        request_id: format!("kg-bench-{i:x}"),
        key_id,
        key_name: format!("key {key_id}"),
        group: "default".into(),
        model: MODELS[(i % 6) as usize].into(),
        prompt_tokens: 100 + i % 900,
        completion_tokens: 20 + i % 300,
        quota: 500 + (i % 5000) as i64,
        is_stream: i.is_multiple_of(3),
        status: if i.is_multiple_of(50) { 429 } else { 200 },
        duration_ms: 300 + i % 4000,
        first_byte_ms: Some(120 + i % 500),
        account: Some(format!("acct-{}", key_id % 10)),
        upstream: Some("openai".into()),
        target: Some("https://api.openai.com".into()),
        attempts: 1,
        path: "/v1/chat/completions".into(),
        error_code: i.is_multiple_of(50).then(|| "rate_limited".into()),
    }
}

fn settings(path: PathBuf) -> StoreSettings {
    StoreSettings {
        queue_size: 200_000,
        retention_days: 36_500,
        ..StoreSettings::new(path)
    }
}

fn ingest(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = UsageStore::open(&settings(dir.path().join("ingest.db"))).unwrap();
    ingest_into(c, "ingest", &store, true);
    // Calls of keys without an account (a gateway that does not use accounts): the account
    // index holds none of them; with schema version 1's index over every call (made again
    // here on a store of its own), each row cost one b-tree insert more.
    for (name, v1_index) in [
        ("ingest_no_account", false),
        ("ingest_no_account_v1_index", true),
    ] {
        let path = dir.path().join(format!("{name}.db"));
        let store = UsageStore::open(&settings(path.clone())).unwrap();
        if v1_index {
            rusqlite::Connection::open(&path)
                .unwrap()
                .execute_batch(
                    "DROP INDEX calls_account_time;
                     CREATE INDEX calls_account_time ON calls(account, created_at);",
                )
                .unwrap();
        }
        ingest_into(c, name, &store, false);
    }
}

fn pg_ingest(c: &mut Criterion) {
    if pg::bin_dir().is_none() {
        eprintln!("store/pg_ingest skipped: PostgreSQL is not installed");
        return;
    }
    let mut server = pg::PgServer::init_with(true);
    server.start();
    server.create_db("bench");
    let store = UsageStore::open(&StoreSettings {
        queue_size: 200_000,
        retention_days: 36_500,
        ..StoreSettings::postgres(&server.url("bench"))
    })
    .unwrap();
    ingest_into(c, "pg_ingest", &store, true);
    let written = store
        .stats()
        .written
        .load(std::sync::atomic::Ordering::Relaxed);
    // Nothing written (the bench filtered out): the table may not exist yet.
    if written > 0 {
        let rows = server.number("bench", "SELECT count(*) FROM keygate_usage.calls");
        assert_eq!(rows as u64, written, "every row written is in the table");
    }
    drop(store);
    server.stop();
}

/// Push 50,000 rows and wait until the writer has written them, per iteration. The rows of
/// each iteration follow the last iteration's in time, 50,000 to a second (a gateway's
/// rows arrive in time order, within the current hour).
/// `accounts`: the rows' keys are in accounts (else none is).
fn ingest_into(c: &mut Criterion, name: &str, store: &UsageStore, accounts: bool) {
    const N: u64 = 50_000;
    let start = keygate::core::clock::unix_now();
    let mut round = 0u64;
    let mut g = c.benchmark_group("store");
    g.throughput(Throughput::Elements(N));
    g.sample_size(10);
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                let first = round * N;
                round += 1;
                // 50,000 rows in the second after the last round's.
                let batch: Vec<StoreRow> = (first..first + N)
                    .map(|i| {
                        let r = StoreRow {
                            created_at: start + (i / N) as i64,
                            ..row(i, start, 1, N)
                        };
                        StoreRow {
                            account: r.account.filter(|_| accounts),
                            ..r
                        }
                    })
                    .collect();
                let began = Instant::now();
                for r in &batch {
                    store.push(&r.borrowed());
                }
                store.flush(Duration::from_secs(60));
                spent += began.elapsed();
            }
            spent
        })
    });
    g.finish();
    assert_eq!(
        store
            .stats()
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed),
        0,
        "rows were dropped: the queue is too small for one round"
    );
}

/// The 10M-row database, made once.
fn big_db() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"));
    let dir = target.join("store-bench");
    let path = dir.join("usage-10m.db");
    if path.exists() {
        return path;
    }
    std::fs::create_dir_all(&dir).unwrap();
    let building = dir.join("usage-10m.building.db");
    let _ = std::fs::remove_file(&building);
    const TOTAL: u64 = 10_000_000;
    let end = keygate::core::clock::unix_now();
    let started = Instant::now();
    {
        let store = UsageStore::open(&settings(building.clone())).unwrap();
        let mut i = 0;
        while i < TOTAL {
            for _ in 0..100_000 {
                store.push(&row(i, end, 30 * 86_400, TOTAL).borrowed());
                i += 1;
            }
            store.flush(Duration::from_secs(120));
        }
        let dropped = store
            .stats()
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(dropped, 0);
    }
    eprintln!(
        "store bench: 10M rows written in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    for ext in ["-wal", "-shm"] {
        let _ = std::fs::rename(
            format!("{}{ext}", building.display()),
            format!("{}{ext}", path.display()),
        );
    }
    std::fs::rename(&building, &path).unwrap();
    path
}

fn queries(c: &mut Criterion) {
    if std::env::var_os("KEYGATE_BENCH_NO_10M").is_some() {
        eprintln!("store_10m skipped: KEYGATE_BENCH_NO_10M is set");
        return;
    }
    let path = big_db();
    let mut conn = keygate::usage::store::open_reader(&path).unwrap();
    let now = keygate::core::clock::unix_now();
    let mut g = c.benchmark_group("store_10m");
    let mut key = 0u64;
    g.bench_function("newest_100", |b| {
        b.iter(|| {
            key = key % 1000 + 1;
            let rows = query::recent(&mut conn, key, 100).unwrap();
            assert_eq!(rows.len(), 100);
            rows
        })
    });
    g.bench_function("hourly_30d", |b| {
        b.iter(|| {
            key = key % 1000 + 1;
            let f = StatsFilter {
                key_id: Some(key),
                start: Some(now - 30 * 86_400),
                end: Some(now),
                bucket: Bucket::Hour,
                ..StatsFilter::default()
            };
            let s = query::stats(&mut conn, &f, now).unwrap();
            assert!(s.buckets.len() >= 720);
            s
        })
    });
    g.bench_function("account_logs_page", |b| {
        b.iter(|| {
            key = key % 10 + 1;
            let f = query::LogFilter {
                account: Some(format!("acct-{}", key % 10)),
                ..query::LogFilter::default()
            };
            query::logs(&mut conn, &f, now).unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, ingest, pg_ingest, queries);
criterion_main!(benches);
