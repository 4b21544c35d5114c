//! Choosing a pool's target (`Upstream::select`): the per-attempt cost of pools, with 1, 4
//! and 16 targets in one priority while all are clear, and with 16 where the attempt avoids
//! tried ones or one target cools down (the full choice).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use keygate::config::PoolConfig;
use keygate::upstream::Upstream;
use std::hint::black_box;

fn pool(n: usize) -> Upstream {
    let mut yaml = String::from("name: bench\nmodels: ['*']\ntargets:\n");
    for i in 0..n {
        yaml.push_str(&format!(
            "  - {{url: 'http://127.0.0.1:{}', weight: {}}}\n",
            1000 + i,
            1 + i % 4
        ));
    }
    let c: PoolConfig = serde_norway::from_str(&yaml).unwrap();
    Upstream::from_pool(&c).unwrap()
}

fn select(c: &mut Criterion) {
    let mut g = c.benchmark_group("select");
    for n in [1usize, 4, 16] {
        let u = pool(n);
        g.bench_with_input(BenchmarkId::new("first_attempt", n), &u, |b, u| {
            b.iter(|| black_box(u.select(black_box(0))))
        });
    }
    let u = pool(16);
    g.bench_function(BenchmarkId::new("retry_avoiding_3", 16), |b| {
        b.iter(|| black_box(u.select_retry(black_box(0b1011), black_box(3))))
    });
    // One target cooling down: every choice reads the clock and the targets' states.
    let u = pool(16);
    u.targets[15]
        .state
        .cool_down(std::time::Duration::from_secs(3600));
    g.bench_function(BenchmarkId::new("first_attempt_one_cooling", 16), |b| {
        b.iter(|| black_box(u.select(black_box(0))))
    });
    g.finish();
}

criterion_group!(benches, select);
criterion_main!(benches);
