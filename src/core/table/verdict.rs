//! What a reader of a [`KeyTable`] can see, as text, and a sync file's verdict read every way
//! the crate reads one: for the property that they all agree (the `sync_file` fuzz target and
//! the loader's tests).

use super::KeyTable;
use crate::core::config::SyncFile;
use sha2::{Digest as _, Sha256};

/// A table's content (what a reader of it can see), or the problem.
pub fn table_verdict(t: Result<KeyTable, String>) -> Result<String, String> {
    use std::fmt::Write as _;
    let t = t?;
    let mut out = format!("revision {} qpu {}\n", t.revision, t.quota_per_unit);
    for g in t.groups() {
        let models = g.models.as_ref().map(|m| m.names());
        let _ = writeln!(out, "group {} {} {models:?}", g.name, g.ratio);
    }
    let mut prices: Vec<_> = t.priced_models().map(|m| (m, t.price(m))).collect();
    prices.sort_by_key(|(m, _)| *m);
    let _ = writeln!(out, "prices {prices:?} * {:?}", t.price("*"));
    for a in t.accounts().iter() {
        let _ = writeln!(out, "account {a:?}");
    }
    for k in t.records() {
        let _ = writeln!(
            out,
            "key {} {:?} {:?} {} {} {} {:?} {:?} {:?} {} {:?}",
            k.id,
            k.name,
            k.status,
            k.unlimited_quota,
            k.quota,
            k.used,
            k.expires_at,
            k.models.as_ref().map(|m| m.names()),
            k.allow_ips,
            k.group,
            k.policy
        );
    }
    Ok(out)
}

/// The verdict on sync-file JSON `data` ([`table_verdict`]) as it is read: streamed from memory
/// ([`KeyTable::from_json`]), parsed whole and then compiled ([`KeyTable::compile`]), and from
/// a reader handing out 1 to 8 bytes at a time ([`KeyTable::from_reader`], as files are
/// read). The last is an `Err` naming the problem when its table's digest is not `data`'s.
pub fn verdicts_every_way(data: &[u8], source_name: &str) -> [Result<String, String>; 3] {
    let streamed = KeyTable::from_json(data, source_name).map_err(|e| e.to_string());
    let whole = SyncFile::parse(data)
        .map_err(|m| format!("sync file {source_name}: {m}"))
        .and_then(|f| KeyTable::compile(&f, source_name).map_err(|e| e.to_string()));
    // Pieces of 1 to 8 bytes, so that values are cut everywhere.
    let step = usize::from(data.first().copied().unwrap_or(0) % 8) + 1;
    let open = || Ok(Trickle { data, step });
    let read = KeyTable::from_reader(open, source_name, 0).map_err(|e| e.to_string());
    let digest: [u8; 32] = Sha256::digest(data).into();
    let read = match read {
        Ok(t) if t.source_digest != digest => Err("read in pieces: a wrong digest".into()),
        r => r,
    };
    [streamed, whole, read].map(table_verdict)
}

/// Hands out `data` at most `step` bytes per read.
struct Trickle<'a> {
    data: &'a [u8],
    step: usize,
}

impl std::io::Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.step.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}
