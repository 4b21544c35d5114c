//! Reloading a 1M-key sync file under load, end to end (not a criterion bench: it drives the real
//! `keygate` binary). It measures:
//!
//! * compile time and the process's peak RSS for `KeyTable::load` of the 1M-key file, in-process;
//! * with a release `keygate` serving the same file, the latency of concurrent calls from 8
//!   clients before, during and after 3 reloads of that file, and how long each reload took to
//!   come into force (revision seen on `/readyz`).
//!
//! Run: `cargo bench --bench reload_swap` (builds the release binary; about a minute here).
//! Loopback only, bounded in time; stops by itself.

use keygate::core::table::{digest_hex, key_digest, KeyTable};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const KEYS: usize = 1_000_000;

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn key(i: usize) -> String {
    format!("sk-{i:048}")
}

fn write_sync(path: &Path, revision: u64) {
    let mut out =
        std::io::BufWriter::new(std::fs::File::create(path.with_extension("tmp")).unwrap());
    write!(
        out,
        "{{\"revision\":{revision},\"groups\":{{\"default\":{{\"ratio\":1.0,\"models\":[\"gpt-*\"]}}}},\"models\":{{\"gpt-4o-mini\":{{\"ratio\":0.075,\"completion_ratio\":4}}}},\"keys\":["
    )
    .unwrap();
    for i in 0..KEYS {
        if i > 0 {
            out.write_all(b",").unwrap();
        }
        write!(
            out,
            "{{\"id\":{},\"name\":\"key {i}\",\"key_sha256\":\"{}\",\"quota\":1000000000,\"models\":[\"gpt-4o-mini\",\"gpt-4o*\"],\"allow_ips\":[\"127.0.0.1\",\"10.0.0.0/8\"]}}",
            i + 1,
            digest_hex(&key_digest(key(i).as_bytes()))
        )
        .unwrap();
    }
    out.write_all(b"]}").unwrap();
    out.flush().unwrap();
    drop(out);
    std::fs::rename(path.with_extension("tmp"), path).unwrap();
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sync = dir.path().join("keys.json");
    let t = Instant::now();
    write_sync(&sync, 1);
    let size = std::fs::metadata(&sync).unwrap().len();
    println!(
        "wrote {KEYS} keys ({} MB of JSON) in {:.1} s",
        size / 1_000_000,
        t.elapsed().as_secs_f64()
    );

    let rss_before = rss_kib("VmRSS:");
    let t = Instant::now();
    let table = KeyTable::load(&sync).unwrap();
    let compile = t.elapsed();
    println!(
        "KeyTable::load: {:.2} s; RSS {} MB before, {} MB after, peak {} MB ({} keys)",
        compile.as_secs_f64(),
        rss_before / 1024,
        rss_kib("VmRSS:") / 1024,
        rss_kib("VmHWM:") / 1024,
        table.len()
    );
    drop(table);

    // A release keygate on the file, in front of the built-in mock.
    let mock_port = keygate::ops::server::resolve_port_zero("127.0.0.1:0").unwrap();
    let mut mock = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["mock", "--listen", &mock_port])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::fs::write(
        dir.path().join("keygate.yaml"),
        format!(
            "listen: \"127.0.0.1:0\"\nthreads: 1\nmetrics_listen: \"127.0.0.1:0\"\nsync_file: keys.json\nstate_dir: var\ngrace_period_seconds: 0\naccess_log: false\nupstreams:\n  - name: mock\n    url: \"http://{mock_port}\"\n    models: [\"gpt-*\"]\n"
        ),
    )
    .unwrap();
    let mut gw = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["run", "-c"])
        .arg(dir.path().join("keygate.yaml"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(gw.stdout.take().unwrap()));
    let (mut proxy, mut metrics) = (String::new(), String::new());
    while proxy.is_empty() || metrics.is_empty() {
        let l = lines.next().unwrap().unwrap();
        if let Some(a) = l.strip_prefix("keygate: proxy on ") {
            proxy = a.to_string();
        } else if let Some(a) = l.strip_prefix("keygate: metrics on ") {
            metrics = a.to_string();
        }
    }
    std::thread::spawn(move || for _ in lines {});

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let client = reqwest::Client::new();
        let ready = |rev: u64| {
            let (client, metrics) = (client.clone(), metrics.clone());
            async move {
                let v: serde_json::Value = client.get(format!("{metrics}/readyz")).send().await.ok()?.json().await.ok()?;
                (v["revision"] == rev).then_some(())
            }
        };
        while ready(1).await.is_none() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // (elapsed since start, latency) for every call.
        let samples: Arc<Mutex<Vec<(f64, f64)>>> = Arc::default();
        let start = Instant::now();
        let run_for = Duration::from_secs(24);
        let mut tasks = Vec::new();
        for c in 0..8 {
            let (client, proxy, samples) = (client.clone(), proxy.clone(), samples.clone());
            tasks.push(tokio::spawn(async move {
                let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"max_tokens":5}"#;
                let mut i = c;
                while start.elapsed() < run_for {
                    let t = Instant::now();
                    let r = client
                        .post(format!("{proxy}/v1/chat/completions"))
                        .bearer_auth(key(i * 7919 % KEYS))
                        .body(body)
                        .send()
                        .await;
                    let ok = matches!(&r, Ok(r) if r.status() == 200);
                    if let Ok(r) = r {
                        let _ = r.bytes().await;
                    }
                    assert!(ok, "a call failed");
                    samples.lock().unwrap().push((start.elapsed().as_secs_f64(), t.elapsed().as_secs_f64() * 1000.0));
                    i += 8;
                }
            }));
        }
        let mut windows = Vec::new();
        for rev in 2..=4u64 {
            tokio::time::sleep(Duration::from_secs(4)).await;
            let path = sync.clone();
            tokio::task::spawn_blocking(move || write_sync(&path, rev)).await.unwrap();
            let written = start.elapsed().as_secs_f64();
            while ready(rev).await.is_none() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let in_force = start.elapsed().as_secs_f64();
            println!("reload to revision {rev}: in force {:.2} s after the file was written", in_force - written);
            windows.push((written, in_force));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let samples = samples.lock().unwrap().clone();
        let in_window = |t: f64| windows.iter().any(|(a, b)| t >= *a && t <= *b + 0.2);
        let (mut during, mut outside): (Vec<f64>, Vec<f64>) = (Vec::new(), Vec::new());
        for (t, ms) in samples {
            if t < 1.0 {
                continue;
            }
            if in_window(t) { during.push(ms) } else { outside.push(ms) }
        }
        let (nd, no) = (during.len(), outside.len());
        let (p50o, p99o) = (percentile(&mut outside, 0.5), percentile(&mut outside, 0.99));
        let (p50d, p99d) = (percentile(&mut during, 0.5), percentile(&mut during, 0.99));
        println!("calls outside reloads: {no}, p50 {p50o:.2} ms, p99 {p99o:.2} ms");
        println!("calls during reloads:  {nd}, p50 {p50d:.2} ms, p99 {p99d:.2} ms");
        println!("p99 during / p99 outside: {:.2}", p99d / p99o);
    });
    let _ = gw.kill();
    let _ = gw.wait();
    let _ = mock.kill();
    let _ = mock.wait();
}
