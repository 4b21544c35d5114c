//! The admin API at scale (issue 17's goals), against a real `keygate` (release build):
//! a page of 100 keys from a table of N, create-to-in-force of one key, and 100 concurrent
//! creates (how long, how many rewrites of the sync file).
//!
//! cargo build --release && cargo run --release --example admin_bench -- 10000 100000 1000000
//!
//! `-- breakdown N…`: what one write costs at N keys, by part, in this process (no gateway):
//! reading and parsing the file (done once and kept), an edit, compiling the table (validation),
//! serializing, writing it durably, and dropping a table. The parts the API runs side by side
//! (compile and serialize) are timed apart here.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "bench-admin-token-0123456789";

fn write_sync(path: &std::path::Path, n: usize) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    write!(f, "{{\"revision\": 1, \"next_id\": {}, \"keys\": [", n + 1).unwrap();
    for i in 1..=n {
        let key = format!("sk-bench{i:043}");
        let hash =
            keygate::core::table::digest_hex(&keygate::core::table::key_digest(key.as_bytes()));
        let sep = if i == 1 { "" } else { "," };
        write!(
            f,
            "{sep}\n{{\"id\": {i}, \"name\": \"bench key {i}\", \"key_sha256\": \"{hash}\", \"quota\": 1000000}}"
        )
        .unwrap();
    }
    writeln!(f, "]}}").unwrap();
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Time `f`, printing `what` and the seconds it took.
fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let out = f();
    print!(" {what} {:.0} ms;", t.elapsed().as_secs_f64() * 1e3);
    out
}

fn breakdown(sizes: &[usize]) {
    use keygate::config::{KeyEntry, SyncFile};
    use keygate::KeyTable;
    for &n in sizes {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        write_sync(&path, n);
        print!("{n} keys:");
        let bytes = timed("read", || std::fs::read(&path).unwrap());
        let mut file = timed("parse", || SyncFile::parse(&bytes).unwrap());
        drop(bytes);
        timed("edit", || {
            let id = keygate::sync::edit::next_free_id(&file);
            file.next_id = Some(id + 1);
            file.keys.push(KeyEntry::new(id, format!("{id:064x}")));
            file.revision += 1;
        });
        let table = timed("compile", || KeyTable::compile(&file, "bench").unwrap());
        let out = timed("serialize", || serde_json::to_vec_pretty(&file).unwrap());
        timed("write+fsync", || {
            keygate::support::fsutil::write_atomic(&path, &out).unwrap()
        });
        timed("drop table", || drop(table));
        println!(" ({} MB)", out.len() >> 20);
    }
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("breakdown") {
        let sizes: Vec<usize> = std::env::args()
            .skip(2)
            .map(|a| a.parse().expect("key counts"))
            .collect();
        return breakdown(&sizes);
    }
    let bin = std::env::var("KEYGATE_BIN").unwrap_or_else(|_| "target/release/keygate".into());
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("key counts"))
        .collect();
    for n in if sizes.is_empty() {
        vec![10_000]
    } else {
        sizes
    } {
        let dir = tempfile::tempdir().unwrap();
        write_sync(&dir.path().join("keys.json"), n);
        std::fs::write(
            dir.path().join("keygate.yaml"),
            "listen: \"127.0.0.1:0\"\nsync_file: keys.json\nstate_dir: var\ngrace_period_seconds: 0\naccess_log: false\nadmin:\n  listen: \"127.0.0.1:0\"\n  tokens:\n    - { name: bench, token_env: BENCH_ADMIN_TOKEN, role: admin }\nupstreams:\n  - name: none\n    url: \"http://127.0.0.1:9\"\n    models: [\"*\"]\n",
        )
        .unwrap();
        let started = Instant::now();
        let mut child = Command::new(&bin)
            .args(["run", "-c"])
            .arg(dir.path().join("keygate.yaml"))
            .env("BENCH_ADMIN_TOKEN", TOKEN)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .expect("keygate starts");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let admin = loop {
            let line = lines.next().expect("admin line").unwrap();
            if let Some(a) = line.strip_prefix("keygate: admin on ") {
                break a.to_string();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        let c = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(600))
            .build()
            .unwrap();
        let get = |path: &str| -> Value {
            c.get(format!("{admin}{path}"))
                .bearer_auth(TOKEN)
                .send()
                .unwrap()
                .json()
                .unwrap()
        };
        // The first read parses the file (cached afterwards, until it changes).
        let first = Instant::now();
        assert_eq!(get("/admin/v1/keys?page_size=100")["total"], n);
        let first = first.elapsed();
        let list = median(
            (0..20)
                .map(|i| {
                    let t = Instant::now();
                    // Pages spread over the table, whatever its size (full pages only).
                    let page = 1 + (i * 7) % (n / 100).max(1);
                    let page = get(&format!("/admin/v1/keys?page={page}&page_size=100"));
                    assert_eq!(page["items"].as_array().unwrap().len(), 100);
                    t.elapsed()
                })
                .collect(),
        );
        let create = |i: usize| {
            let t = Instant::now();
            let r = c
                .post(format!("{admin}/admin/v1/keys"))
                .bearer_auth(TOKEN)
                .json(&json!({"name": format!("new {i}")}))
                .send()
                .unwrap();
            assert_eq!(r.status(), 201);
            t.elapsed()
        };
        let one = median((0..5).map(create).collect());
        let rev_before = get("/admin/v1/keys?page_size=1")["revision"]
            .as_u64()
            .unwrap();
        let burst = Instant::now();
        std::thread::scope(|s| {
            for i in 0..100 {
                let create = &create;
                s.spawn(move || create(1000 + i));
            }
        });
        let burst = burst.elapsed();
        let rewrites = get("/admin/v1/keys?page_size=1")["revision"]
            .as_u64()
            .unwrap()
            - rev_before;
        println!(
            "{n} keys: started+first list {:.2} s (first list {:.0} ms); page of 100: {:.2} ms; create to in force: {:.0} ms; 100 concurrent creates: {:.2} s, {rewrites} rewrites",
            started.elapsed().as_secs_f64() - burst.as_secs_f64() - one.as_secs_f64() * 5.0,
            first.as_secs_f64() * 1e3,
            list.as_secs_f64() * 1e3,
            one.as_secs_f64() * 1e3,
            burst.as_secs_f64(),
        );
        let _ = Command::new("kill").arg(child.id().to_string()).status();
        let _ = child.wait();
    }
}
