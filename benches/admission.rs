//! Measures keygate's per-request admission hot path (credential → SHA-256 → table lookup →
//! status/expiry/IP checks → key+group model policy → upstream routing) against key tables of
//! 1 000, 100 000 and 1 000 000 keys, plus the bare SHA-256 of one key for reference.
//!
//! Benchmarks (all in-process, no I/O):
//!
//! * `digest_only` — `key_digest` of one 51-byte key: the SHA-256 floor every request pays.
//! * `admission/full/<n>` — a known key in the middle of the table, `Authorization: Bearer`,
//!   peer 127.0.0.1 (inside the key's IP whitelist), model `gpt-4o-mini`: `admit_key` →
//!   `lookup` → `admit_model`. The 200 path. Because the same key is presented every iteration
//!   its table slot stays hot in cache, so this shows the CPU cost, not memory latency.
//! * `admission/full_spread/<n>` — the same, but each iteration presents the next of 1 024 keys
//!   spread evenly across the table, so with a large table the lookup misses cache the way a
//!   real mix of clients would.
//! * `admission/unknown_key/<n>` — a well-formed key that is not in the table: the 401 path.
//!
//! Each table is built once, outside the timed loop, directly from a `SyncFile` struct (much
//! faster than going through JSON for a million keys). After each build, stderr gets: build
//! time, the table's exact live heap size (from a counting global allocator, below), heap
//! allocations per admission on the hot paths (expected: 0), and the process's RSS / peak RSS
//! (VmRSS / VmHWM from /proc/self/status; RSS includes freed-but-retained malloc memory, e.g.
//! the dropped `SyncFile`, so the allocator's figure is the one to quote for the table).
//!
//! Run: `cargo bench --bench admission -- --warm-up-time 1 --measurement-time 3`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use http::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use keygate::config::{GroupEntry, KeyEntry, KeyStatus, SyncFile, UpstreamConfig};
use keygate::core::table::{digest_hex, key_digest, KeyTable};
use keygate::gate::{admit_key, admit_model, unix_now};
use keygate::upstream::Upstreams;
use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// The system allocator plus two relaxed counters: live heap bytes and allocation calls.
/// Costs one uncontended atomic add per (de)allocation, so it only shows up in a timed loop
/// that allocates — and the sanity checks below confirm the admission paths do not.
struct CountingAlloc;

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);
static ALLOC_CALLS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards to `System` unchanged; the counters have no effect on memory.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size(), Relaxed);
            ALLOC_CALLS.fetch_add(1, Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size(), Relaxed);
            ALLOC_CALLS.fetch_add(1, Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE_BYTES.fetch_sub(layout.size(), Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            LIVE_BYTES.fetch_add(new_size, Relaxed);
            LIVE_BYTES.fetch_sub(layout.size(), Relaxed);
            ALLOC_CALLS.fetch_add(1, Relaxed);
        }
        p
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Heap allocation calls made by `f` run `runs` times, per run (rounded up: any allocation at
/// all shows as at least 1).
fn allocs_per_call(runs: usize, mut f: impl FnMut()) -> usize {
    let before = ALLOC_CALLS.load(Relaxed);
    for _ in 0..runs {
        f();
    }
    (ALLOC_CALLS.load(Relaxed) - before).div_ceil(runs)
}

/// Key-table sizes the group is parameterized by.
const SIZES: [usize; 3] = [1_000, 100_000, 1_000_000];

/// `sizes`, or only the smallest when `KEYGATE_BENCH_QUICK` is set: under callgrind the
/// million-key tables take minutes to build, and the instruction counts are flat in size.
fn sizes<const N: usize>(sizes: [usize; N]) -> Vec<usize> {
    let quick = std::env::var_os("KEYGATE_BENCH_QUICK").is_some();
    sizes.into_iter().take(if quick { 1 } else { N }).collect()
}

/// How many distinct keys `full_spread` cycles through.
const SPREAD: usize = 1_024;

/// The model every request asks for: allowed by the key (`gpt-4o-mini`), by the group
/// (`gpt-*`), and routed by the single upstream (`gpt-*`).
const MODEL: &str = "gpt-4o-mini";

/// The deterministic key for table index `i`: `sk-` + 48 digits (alphanumeric, 51 bytes in
/// all, the same shape as `generate_key`'s output).
fn key_for(i: usize) -> String {
    format!("sk-{i:048}")
}

/// A sync file with `n` keys, all in group `default`, each restricted to
/// `gpt-4o-mini`/`gpt-4o*` and to `10.0.0.0/8` + `127.0.0.1`. Keys are given as
/// `key_sha256` (the production form) so the table build hashes nothing twice.
fn sync_file(n: usize) -> SyncFile {
    let mut groups = BTreeMap::new();
    groups.insert(
        "default".to_string(),
        GroupEntry {
            ratio: 1.0,
            models: Some(vec!["gpt-*".to_string()]),
            limits: None,
        },
    );
    // One model list shared by every key: the compiler dedups identical lists into one
    // `Arc<ModelSet>`, as it would for a real sync file where most keys share a policy.
    let models = vec!["gpt-4o-mini".to_string(), "gpt-4o*".to_string()];
    let allow_ips = vec!["10.0.0.0/8".to_string(), "127.0.0.1".to_string()];
    let keys = (0..n)
        .map(|i| KeyEntry {
            id: i as u64 + 1,
            name: format!("bench-{i}"),
            key_sha256: Some(digest_hex(&key_digest(key_for(i).as_bytes()))),
            key: None,
            status: KeyStatus::Enabled,
            quota: 1_000_000,
            unlimited_quota: false,
            used: 0,
            expires_at: -1,
            models: Some(models.clone()),
            allow_ips: Some(allow_ips.clone()),
            group: "default".to_string(),
            previous_keys: Vec::new(),
            account: None,
            limits: None,
            budget: None,
            key_hint: None,
            key_sealed: None,
        })
        .collect();
    SyncFile {
        revision: 1,
        quota_per_unit: 500_000.0,
        next_id: None,
        groups,
        models: BTreeMap::new(),
        keys,
        accounts: BTreeMap::new(),
    }
}

/// `VmRSS` and `VmHWM` (peak RSS) of this process, as printed by the kernel; empty off Linux.
fn rss_report() -> String {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .filter(|l| l.starts_with("VmRSS") || l.starts_with("VmHWM"))
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

/// Build the `n`-key table (untimed by criterion; timed here and reported on stderr).
fn build_table(n: usize) -> KeyTable {
    let live_start = LIVE_BYTES.load(Relaxed);
    let t0 = Instant::now();
    let file = sync_file(n);
    let t1 = Instant::now();
    // Live heap bytes with the source struct built but no table yet.
    let live_before = LIVE_BYTES.load(Relaxed);
    let file_bytes = live_before.saturating_sub(live_start);
    let table = KeyTable::compile(&file, "bench").expect("bench sync file compiles");
    let t2 = Instant::now();
    drop(file);
    // Whatever `compile` allocated and kept (the source struct is gone again): the table's
    // own heap footprint.
    let table_bytes = LIVE_BYTES.load(Relaxed).saturating_sub(live_start);
    assert_eq!(table.len(), n);
    eprintln!(
        "[admission] {n} keys: sync-file struct {:.2?} ({:.1} MB heap), KeyTable::compile {:.2?}; \
         table heap {:.1} MB ({} B/key); {}",
        t1 - t0,
        file_bytes as f64 / 1e6,
        t2 - t1,
        table_bytes as f64 / 1e6,
        table_bytes / n,
        rss_report()
    );
    table
}

/// Request headers as a client SDK sends them: a bearer key and a JSON content type.
fn headers_for(key: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {key}")).expect("valid header"),
    );
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h
}

/// The single upstream: serves `gpt-*` and `claude-*`. Nothing is ever connected to.
fn upstreams() -> Upstreams {
    Upstreams::from_config(&[UpstreamConfig {
        name: "bench".into(),
        url: "http://127.0.0.1:9".into(),
        api_key_env: None,
        models: vec!["gpt-*".into(), "claude-*".into()],
        tls_verify: true,
        connect_timeout_seconds: 10,
        read_timeout_seconds: 300,
        write_timeout_seconds: 60,
        idle_timeout_seconds: 60,
    }])
    .expect("bench upstream config")
}

/// The whole 200 path for one request: header checks, then the model checks on the record
/// the admission points at. Returns the upstream index.
#[inline(always)]
fn admit_full(
    table: &KeyTable,
    upstreams: &Upstreams,
    headers: &HeaderMap,
    peer: IpAddr,
    now: i64,
) -> usize {
    let admission = admit_key(table, headers, None, peer, &[], now).expect("key admitted");
    // As the gate does: the admission's slot, not a second hash lookup.
    let key = table
        .at_slot(admission.slot)
        .expect("admitted key is in the table");
    admit_model(table, key, upstreams, MODEL).expect("model admitted")
}

/// SHA-256 of one key with no table around it: the fixed cost inside every admission.
fn bench_digest(c: &mut Criterion) {
    let key = key_for(500);
    c.bench_function("digest_only", |b| {
        b.iter(|| key_digest(black_box(key.as_bytes())))
    });
}

/// The admission group: every bench function at every table size.
fn bench_admission(c: &mut Criterion) {
    let upstreams = upstreams();
    let peer = IpAddr::V4(Ipv4Addr::LOCALHOST);
    // Fixed for the run: no key expires, so the exact value only has to be "now-ish".
    let now = unix_now();

    let mut group = c.benchmark_group("admission");
    // Each iteration is a few hundred ns, so a few seconds of measurement already gives
    // millions of iterations; 50 samples keeps the analysis quick on a small machine.
    group.sample_size(50);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));

    for n in sizes(SIZES) {
        // One table per size, built before and dropped after that size's benches, so at most
        // one large table is alive at a time.
        let table = build_table(n);

        // --- full: one hot key from the middle of the table -------------------------------
        let hot = headers_for(&key_for(n / 2));
        // The unknown_key bench's key. `x` never appears in `key_for`'s digits-only keys, so
        // this cannot collide with a table key.
        let unknown = headers_for(&format!("sk-{}", "x".repeat(48)));
        assert!(admit_key(&table, &unknown, None, peer, &[], now).is_err());
        // Sanity check outside the timed loop: the path really admits the key.
        assert_eq!(admit_full(&table, &upstreams, &hot, peer, now), 0);
        group.bench_with_input(BenchmarkId::new("full", n), &n, |b, _| {
            b.iter(|| {
                admit_full(
                    black_box(&table),
                    black_box(&upstreams),
                    black_box(&hot),
                    black_box(peer),
                    black_box(now),
                )
            })
        });

        // --- full_spread: cycle through keys spread across the whole table ----------------
        let stride = (n / SPREAD).max(1);
        let spread: Vec<HeaderMap> = (0..SPREAD.min(n))
            .map(|j| headers_for(&key_for(j * stride)))
            .collect();
        for h in &spread {
            assert_eq!(admit_full(&table, &upstreams, h, peer, now), 0);
        }
        eprintln!(
            "[admission] {n} keys: heap allocations per admission: full {}, unknown_key {}",
            allocs_per_call(1_000, || {
                black_box(admit_full(&table, &upstreams, &hot, peer, now));
            }),
            allocs_per_call(1_000, || {
                let unknown = black_box(&unknown);
                black_box(admit_key(&table, unknown, None, peer, &[], now).is_err());
            }),
        );
        group.bench_with_input(BenchmarkId::new("full_spread", n), &n, |b, _| {
            let mut next = 0usize;
            b.iter(|| {
                let h = &spread[next];
                next = (next + 1) % spread.len();
                admit_full(
                    black_box(&table),
                    black_box(&upstreams),
                    black_box(h),
                    black_box(peer),
                    black_box(now),
                )
            })
        });

        // --- unknown_key: well-formed but absent key -> 401 invalid_api_key ---------------
        // (`unknown` is built above, next to `hot`.)
        group.bench_with_input(BenchmarkId::new("unknown_key", n), &n, |b, _| {
            b.iter(|| {
                admit_key(
                    black_box(&table),
                    black_box(&unknown),
                    None,
                    black_box(peer),
                    &[],
                    black_box(now),
                )
                .is_err()
            })
        });

        drop(table);
    }
    group.finish();
}

/// SPEC §7: every key in account `acme`, with key and account quota, a daily budget on both,
/// and rpm, tpm and concurrency on both (all far from their limits, so nothing refuses).
/// `with_limits/base/<n>` is the plain admission on that table; `with_limits/policy/<n>` adds
/// the limits, the joint key+account+budget reservation and its settle (in-memory ledger):
/// the difference is what accounts, budgets and limits add per call.
/// `with_limits/policy_admit_only/<n>` times the same admission without its settle (64 calls
/// under the clock, then settled off it): what the request waits for before it goes upstream.
fn bench_policy(c: &mut Criterion) {
    use keygate::config::{AccountEntry, BudgetEntry, LimitsEntry};
    use keygate::gate::accounts::PolicyCall;
    use keygate::ledger::limits::{mono_ns, LimitBook, LimitHold};
    use keygate::ledger::{Ledger, Reservation};
    let upstreams = upstreams();
    let peer = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let now = unix_now();
    let limits = LimitsEntry {
        rpm: Some(1_000_000_000),
        tpm: Some(1_000_000_000),
        concurrency: Some(1_000_000),
    };
    let budget = BudgetEntry {
        period: Some("daily".into()),
        amount: i64::MAX / 4,
        timezone: Some("Europe/Berlin".into()),
        rolling_days: None,
    };
    // Tokens a call takes of the tpm buckets: 1, since a loop of admissions faster than the
    // bucket refills (60 s / tpm a token: 6 µs for 100 tokens) would empty it after some
    // millions of calls and be refused. The work of a take does not depend on the count.
    const TOKENS: u64 = 1;
    let mut group = c.benchmark_group("with_limits");
    group.sample_size(50);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    for n in sizes([1usize, 1_000_000]) {
        let mut file = sync_file(n);
        file.accounts.insert(
            "acme".into(),
            AccountEntry {
                name: "Acme".into(),
                status: KeyStatus::Enabled,
                quota: i64::MAX / 4,
                used: 0,
                unlimited_quota: false,
                max_keys: None,
                limits: Some(limits.clone()),
                budget: Some(budget.clone()),
            },
        );
        for k in &mut file.keys {
            k.quota = i64::MAX / 4;
            k.account = Some("acme".into());
            k.limits = Some(limits.clone());
            k.budget = Some(budget.clone());
        }
        let table = KeyTable::compile(&file, "bench").expect("compiles");
        drop(file);
        let ledger = Ledger::in_memory();
        let book = LimitBook::new();
        let hot = headers_for(&key_for(n / 2));
        group.bench_with_input(BenchmarkId::new("base", n), &n, |b, _| {
            b.iter(|| admit_full(black_box(&table), &upstreams, black_box(&hot), peer, now))
        });
        // As the gate does on this process's ledger: the hold and the reservation are built
        // in the call's own slots (here a slot of the bench's), where they stay until settled.
        type Slot = (Option<Reservation>, Option<LimitHold>);
        let admit = |slot: &mut Slot| {
            let a = admit_key(black_box(&table), black_box(&hot), None, peer, &[], now)
                .expect("admitted");
            let key = table.at_slot(a.slot).expect("in table");
            admit_model(&table, key, &upstreams, MODEL).expect("model admitted");
            let behind = PolicyCall::new(&table, key, now)
                .admit_here(
                    &ledger,
                    &book,
                    TOKENS,
                    10,
                    mono_ns(),
                    &mut slot.0,
                    &mut slot.1,
                )
                .expect("admitted");
            assert!(behind.is_empty(), "an in-memory ledger is always durable");
        };
        let settle = |slot: &mut Slot| {
            if let Some(mut h) = slot.1.take() {
                h.settle_tokens(TOKENS, mono_ns());
            }
            if let Some(r) = slot.0.take() {
                r.settle(10);
            }
        };
        group.bench_with_input(BenchmarkId::new("policy", n), &n, |b, _| {
            let mut slot = (None, None);
            b.iter(|| {
                admit(&mut slot);
                settle(&mut slot)
            })
        });
        // The admission alone: calls admitted 64 at a time under the clock, settled after it.
        group.bench_with_input(BenchmarkId::new("policy_admit_only", n), &n, |b, _| {
            let mut held: Vec<Slot> = (0..64).map(|_| (None, None)).collect();
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let batch = usize::try_from(left.min(64)).unwrap_or(64);
                    let t = Instant::now();
                    for slot in &mut held[..batch] {
                        admit(slot);
                    }
                    timed += t.elapsed();
                    held[..batch].iter_mut().for_each(settle);
                    left -= batch as u64;
                }
                timed
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_digest, bench_admission, bench_policy);
criterion_main!(benches);
