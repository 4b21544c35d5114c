//! Memory and time of loading a large sync file the way the `keygate` binary does it: mimalloc,
//! with free memory handed back to the system after each load (`keygate::support::memory`).
//!
//! Writes a sync file of `KEYS` keys (default 1,000,000; the shape of `benches/reload_swap.rs`:
//! a name, a hash, a quota, a model list and two allow_ips entries per key), then:
//! 1. the first load (`keygate run` at startup): VmRSS before and after, the peak (VmHWM) during
//!    it, and the time;
//! 2. a reload while the first table is still held, as the gateway holds the table in force
//!    until the new one is swapped in (`keygate::sync::reload`): the same figures.
//!
//! With `accounts` as the second argument, every tenth key names one of 100 accounts, written
//! after the keys as `keygate keys` writes them (such a file is read twice: the keys are
//! compiled on the second read, once the accounts are known).
//!
//! The peak is reset before each load (`/proc/self/clear_refs`), so each is the load's own.
//! "table" is what the load left resident (VmRSS after minus before). Wall and CPU time are
//! both printed: on a shared machine the CPU time is the steadier of the two. Only
//! `KeyTable::load` is called, so the same file measures older versions too.
//!
//! Run: `cargo run --release --example reload_memory [KEYS] [accounts]`

use keygate::core::table::{digest_hex, key_digest, KeyTable};
use std::io::Write;
use std::path::Path;
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn release_free_memory() {
    // SAFETY: `mi_collect` only walks mimalloc's own heaps; any thread may call it.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// A `/proc/self/status` field, MiB.
fn status_mib(field: &str) -> f64 {
    let kib: u64 = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    kib as f64 / 1024.0
}

/// CPU time this process has used (user + system), seconds.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let field = |n: usize| -> f64 {
        rest.split_whitespace()
            .nth(n)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    // utime and stime (fields 14 and 15 of the line) in clock ticks, 100 per second on Linux.
    (field(11) + field(12)) / 100.0
}

fn reset_peak() {
    // "5" resets VmHWM to the current RSS (Linux >= 4.0).
    std::fs::write("/proc/self/clear_refs", "5").expect("reset VmHWM");
}

fn write_sync(path: &Path, keys: usize, revision: u64, accounts: bool) {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    write!(
        out,
        "{{\"revision\":{revision},\"groups\":{{\"default\":{{\"ratio\":1.0,\"models\":[\"gpt-*\"]}}}},\"models\":{{\"gpt-4o-mini\":{{\"ratio\":0.075,\"completion_ratio\":4}}}},\"keys\":["
    )
    .unwrap();
    for i in 0..keys {
        if i > 0 {
            out.write_all(b",").unwrap();
        }
        let account = if accounts && i % 10 == 0 {
            format!(",\"account\":\"acct-{}\"", i % 100)
        } else {
            String::new()
        };
        write!(
            out,
            "{{\"id\":{},\"name\":\"key {i}\",\"key_sha256\":\"{}\",\"quota\":1000000000,\"models\":[\"gpt-4o-mini\",\"gpt-4o*\"],\"allow_ips\":[\"127.0.0.1\",\"10.0.0.0/8\"]{account}}}",
            i + 1,
            digest_hex(&key_digest(format!("sk-{i:048}").as_bytes()))
        )
        .unwrap();
    }
    out.write_all(b"]").unwrap();
    if accounts {
        out.write_all(b",\"accounts\":{").unwrap();
        for a in 0..100 {
            let comma = if a > 0 { "," } else { "" };
            write!(out, "{comma}\"acct-{a}\":{{\"quota\":1000000}}").unwrap();
        }
        out.write_all(b"}").unwrap();
    }
    out.write_all(b"}").unwrap();
    out.flush().unwrap();
}

/// Load `path` as the gateway would; prints and returns the table.
fn measured(what: &str, path: &Path) -> KeyTable {
    release_free_memory();
    let before = status_mib("VmRSS:");
    reset_peak();
    let (t, cpu) = (Instant::now(), cpu_seconds());
    let table = KeyTable::load(path).unwrap();
    let (took, cpu) = (t.elapsed(), cpu_seconds() - cpu);
    let peak = status_mib("VmHWM:");
    let after = status_mib("VmRSS:");
    println!(
        "{what}: {:.2} s ({cpu:.2} s CPU); VmRSS {before:.0} MiB before, {after:.0} MiB after \
         (table {:.0} MiB); peak VmHWM {peak:.0} MiB = {:.0} MiB above before = {:.2}x the \
         table ({} keys)",
        took.as_secs_f64(),
        after - before,
        peak - before,
        (peak - before) / (after - before),
        table.len()
    );
    table
}

fn main() {
    keygate::support::memory::set_release_hook(release_free_memory);
    let mut args = std::env::args().skip(1);
    let keys: usize = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let accounts = args.next().is_some_and(|a| a == "accounts");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    write_sync(&path, keys, 1, accounts);
    println!(
        "{keys} keys{}, {:.0} MB of JSON",
        if accounts {
            " (accounts after them)"
        } else {
            ""
        },
        std::fs::metadata(&path).unwrap().len() as f64 / 1e6
    );
    let first = measured("first load", &path);
    write_sync(&path, keys, 2, accounts);
    let second = measured("reload, old table held", &path);
    assert_eq!((first.revision, second.revision), (1, 2));
}
