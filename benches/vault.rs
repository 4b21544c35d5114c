//! The key vault's costs: sealing and opening one key, and the vault check of a sync file (every
//! sealed key opened, as `keygate check` does, or a sample of 64, as `keygate run` does) beside
//! `KeyTable::load` of the same file, at 10k and 100k keys, so what the check adds to a
//! gateway's start reads as a ratio.
//!
//! Run: `cargo bench --bench vault`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use keygate::core::table::{digest_hex, key_digest, KeyTable};
use keygate::core::vault::{key_hint, Vault};
use keygate::sync::vault::{check_file, Coverage};
use std::io::Write;
use std::path::Path;

fn key(i: usize) -> String {
    format!("sk-{i:048}")
}

/// A sync file of `n` keys as `keygate keys create` writes them with a vault.
fn write_sync(path: &Path, n: usize, vault: &Vault) {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    write!(out, "{{\"revision\":1,\"keys\":[").unwrap();
    for i in 0..n {
        if i > 0 {
            out.write_all(b",").unwrap();
        }
        let id = i as u64 + 1;
        let k = key(i);
        write!(
            out,
            "{{\"id\":{id},\"name\":\"key {i}\",\"key_sha256\":\"{}\",\"quota\":1000000000,\"models\":[\"gpt-4o-mini\",\"gpt-4o*\"],\"allow_ips\":[\"127.0.0.1\",\"10.0.0.0/8\"],\"key_hint\":\"{}\",\"key_sealed\":\"{}\"}}",
            digest_hex(&key_digest(k.as_bytes())),
            key_hint(&k),
            vault.seal(id, &k).unwrap()
        )
        .unwrap();
    }
    out.write_all(b"]}").unwrap();
    out.flush().unwrap();
}

fn one_key(c: &mut Criterion) {
    let vault = Vault::from_bytes(&[7; 32]);
    let k = key(17);
    let sealed = vault.seal(17, &k).unwrap();
    let mut g = c.benchmark_group("vault_one_key");
    g.bench_function("seal", |b| b.iter(|| vault.seal(17, &k).unwrap()));
    g.bench_function("open", |b| b.iter(|| vault.open(17, &sealed).unwrap()));
    g.finish();
}

fn startup(c: &mut Criterion) {
    let vault = Vault::from_bytes(&[7; 32]);
    let dir = tempfile::tempdir().unwrap();
    let mut g = c.benchmark_group("vault_startup");
    g.sample_size(10);
    for n in [10_000usize, 100_000] {
        let path = dir.path().join(format!("keys-{n}.json"));
        write_sync(&path, n, &vault);
        g.throughput(Throughput::Elements(n as u64));
        for (name, coverage) in [
            ("check_file_all", Coverage::All),
            ("check_file_sample64", Coverage::Sample(64)),
        ] {
            g.bench_with_input(BenchmarkId::new(name, n), &path, |b, p| {
                b.iter(|| assert_eq!(check_file(p, &vault, coverage).unwrap().sealed, n))
            });
        }
        g.bench_with_input(BenchmarkId::new("table_load", n), &path, |b, p| {
            b.iter(|| assert_eq!(KeyTable::load(p).unwrap().len(), n))
        });
    }
    g.finish();
}

criterion_group!(benches, one_key, startup);
criterion_main!(benches);
