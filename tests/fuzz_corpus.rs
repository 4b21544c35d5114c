//! Replays every fuzz corpus (`fuzz/corpus/<target>/*`) through the same entry points the fuzz
//! targets use, so an input that once crashed a target stays a regression test.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let data = std::fs::read(&path).unwrap();
            let name = path.display().to_string();
            std::panic::catch_unwind(|| run(&data)).unwrap_or_else(|_| panic!("{name} crashes"));
            n += 1;
        }
    }
    assert!(n >= 3, "{target}: only {n} corpus files");
}

#[test]
fn request_corpus() {
    replay("request", keygate::fuzzing::request);
}

#[test]
fn sse_corpus() {
    replay("sse", keygate::fuzzing::sse);
}

#[test]
fn json_usage_corpus() {
    replay("json_usage", keygate::fuzzing::json_usage);
}

#[test]
fn sync_file_corpus() {
    replay("sync_file", keygate::fuzzing::sync_file);
}
