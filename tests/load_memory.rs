//! Loading a large sync file peaks near the size of the table it builds: the file is read in
//! pieces and each key compiled as it is read, never held whole together with its parsed form
//! (which peaked at 4.4 times the table's size). Measured in a child process of its own (this
//! test binary run again for one test), with mimalloc and free memory handed back after each
//! load, as the `keygate` binary does, so that nothing else's memory is counted.

use keygate::core::table::{digest_hex, key_digest, KeyTable};
use std::io::Write;
use std::path::Path;
use std::process::Command;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const KEYS: usize = 100_000;
/// Where the child finds the file to load.
const FILE_ENV: &str = "KG_LOAD_MEMORY_FILE";

fn release_free_memory() {
    // SAFETY: `mi_collect` only walks mimalloc's own heaps; any thread may call it.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// A `/proc/self/status` field, KiB.
fn status_kib(field: &str) -> i64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap()
}

/// Peak memory above the start, and memory left resident, of loading `path`, KiB.
fn measure(path: &Path) -> (i64, i64, KeyTable) {
    release_free_memory();
    let before = status_kib("VmRSS:");
    // Reset VmHWM to the current size.
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let table = KeyTable::load(path).unwrap();
    let (peak, after) = (status_kib("VmHWM:"), status_kib("VmRSS:"));
    (peak - before, after - before, table)
}

fn write_sync(path: &Path, accounts: bool) {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    out.write_all(br#"{"revision":1,"groups":{"default":{"models":["gpt-*"]}},"keys":["#)
        .unwrap();
    for i in 0..KEYS {
        let account = if accounts && i % 10 == 0 {
            r#","account":"acme""#
        } else {
            ""
        };
        write!(
            out,
            r#"{}{{"id":{},"name":"key {i}","key_sha256":"{}","quota":1000000000,"models":["gpt-4o-mini","gpt-4o*"],"allow_ips":["127.0.0.1","10.0.0.0/8"]{account}}}"#,
            if i == 0 { "" } else { "," },
            i + 1,
            digest_hex(&key_digest(format!("sk-{i:048}").as_bytes()))
        )
        .unwrap();
    }
    out.write_all(b"]").unwrap();
    if accounts {
        // After the keys, where `keygate keys` writes them.
        out.write_all(br#","accounts":{"acme":{"quota":5}}"#)
            .unwrap();
    }
    out.write_all(b"}").unwrap();
}

/// Runs in the child: a first load, then a reload with the first table still held (as the
/// gateway holds the table in force until the new one is swapped in). Prints what it measured.
#[test]
#[ignore = "run by the tests below, in a process of its own"]
fn child_loads_the_file_twice() {
    let Some(path) = std::env::var_os(FILE_ENV) else {
        return;
    };
    keygate::support::memory::set_release_hook(release_free_memory);
    let (peak, table, first) = measure(Path::new(&path));
    assert_eq!(first.len(), KEYS);
    println!("MEASURED first {peak} {table}");
    let (peak, table, second) = measure(Path::new(&path));
    assert_eq!(second.len(), KEYS);
    println!("MEASURED reload {peak} {table}");
}

/// Loads a file in a child process: (what, peak KiB above the start, table KiB) per load.
fn loads_in_a_child(accounts: bool) -> Vec<(String, i64, i64)> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    write_sync(&path, accounts);
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_loads_the_file_twice",
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(FILE_ENV, &path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let loads: Vec<(String, i64, i64)> = stdout
        .lines()
        .filter_map(|l| {
            // libtest may print the test's name on the same line first.
            let mut f = l[l.find("MEASURED ")? + 9..].split(' ');
            Some((
                f.next()?.to_string(),
                f.next()?.parse().ok()?,
                f.next()?.parse().ok()?,
            ))
        })
        .collect();
    assert_eq!(loads.len(), 2, "child: {stdout}");
    loads
}

fn assert_peaks_near_the_table(loads: &[(String, i64, i64)]) {
    for (what, peak, table) in loads {
        eprintln!("{what}: peak {peak} KiB above the start, table {table} KiB");
        assert!(*table > 10_000, "{what}: a table of {table} KiB");
        assert!(
            peak * 2 <= table * 3,
            "{what}: peak {peak} KiB above the start for a table of {table} KiB (more than 1.5x)"
        );
    }
}

#[test]
fn loading_a_large_sync_file_peaks_near_the_tables_own_size() {
    assert_peaks_near_the_table(&loads_in_a_child(false));
}

/// Accounts after the keys (as `keygate keys` writes a file with accounts): the keys are
/// compiled on a second read of the file, not held until the accounts are known.
#[test]
fn a_file_with_accounts_after_its_keys_peaks_near_the_table_too() {
    assert_peaks_near_the_table(&loads_in_a_child(true));
}
