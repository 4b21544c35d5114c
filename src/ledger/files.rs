//! The ledger's files in `state_dir`: the journal and snapshot of ceilings, the handoff to the
//! next binary of an upgrade, the consumed report, and the exact values a clean shutdown writes.

use super::*;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader};

pub(super) const JOURNAL: &str = "ledger.journal";

pub(super) const SNAPSHOT: &str = "ledger.snapshot";

pub(super) const CONSUMED: &str = "ledger.consumed";

pub(super) const HANDOFF: &str = "ledger.handoff";

pub(super) const LOCK: &str = "ledger.lock";

pub(super) const COMPACT_AFTER_BYTES: u64 = 4 * 1024 * 1024;

impl Ledger {
    pub(super) fn with_lock<T>(
        &self,
        exclusive: bool,
        f: impl FnOnce() -> std::io::Result<T>,
    ) -> std::io::Result<T> {
        let Some(lock) = &self.shared.lock else {
            return f();
        };
        if exclusive {
            lock.lock()?;
        } else {
            lock.lock_shared()?;
        }
        let out = f();
        lock.unlock()?;
        out
    }

    /// Write every key's ceiling (`exact`: its committed value, for a clean shutdown) and the
    /// `until` of the counters that have one to the snapshot: temp file, fsync, rename, fsync
    /// the folder. A compaction (not `exact`) keeps the highest of its own and what is on disk,
    /// which another process may have written, except the counters this process `dropped`
    /// and those whose `until` on disk passed at `now`. Counters ended at `now` that hold no
    /// reservation are not written.
    pub(super) fn write_snapshot(
        &self,
        dir: &Path,
        exact: bool,
        now: i64,
        dropped: &HashSet<u64>,
    ) -> std::io::Result<()> {
        let DiskState {
            mut ceilings,
            until: on_disk,
        } = if exact {
            DiskState::default()
        } else {
            load_state(dir)?
        };
        ceilings.retain(|id, _| {
            !dropped.contains(id) && on_disk.get(id).is_none_or(|&u| u == 0 || u > now)
        });
        let mut until: HashMap<u64, i64> = ceilings
            .keys()
            .map(|&id| {
                let u = on_disk.get(&id).copied();
                (id, u.unwrap_or_else(|| unknown_until(id, now)))
            })
            .collect();
        for entry in self.shared.counters.iter() {
            let c = entry.value();
            if super::expiry::ended(c, now) {
                continue;
            }
            let ends = c.until();
            let v = if exact {
                c.committed()
            } else {
                c.durable.load(Ordering::Acquire).max(c.committed())
            };
            let e = ceilings.entry(*entry.key()).or_insert(v);
            *e = (*e).max(v);
            until.insert(*entry.key(), ends);
        }
        until.retain(|_, u| *u != 0);
        let out = format!(
            "{{\"version\":1,{},{}}}\n",
            id_map("ceilings", ceilings),
            id_map("until", until)
        );
        crate::support::fsutil::write_atomic(&dir.join(SNAPSHOT), out.as_bytes())
    }

    /// Rewrite the snapshot (see [`Ledger::write_snapshot`]) and empty the journal, under the
    /// folder's lock and this process's.
    pub(super) fn compact(
        &self,
        dir: &Path,
        now: i64,
        dropped: &HashSet<u64>,
    ) -> std::io::Result<()> {
        let _disk = self.shared.disk.lock().map_err(|_| poisoned())?;
        self.with_lock(true, || {
            self.write_snapshot(dir, false, now, dropped)?;
            truncate_journal(dir)
        })
    }

    /// The old process of a binary upgrade, after it stopped serving: hand its exact values to
    /// the successor (which started from this process's ceilings) instead of rewriting the
    /// shared snapshot and journal.
    pub fn handoff(&self) -> std::io::Result<()> {
        if self.lease.is_some() {
            // Nothing to hand off: Redis holds the counters, and the leases go back to it.
            return self.shutdown();
        }
        self.stop_writer();
        let Some(dir) = self.shared.dir.clone() else {
            return Ok(());
        };
        let values = self
            .shared
            .counters
            .iter()
            .map(|e| (*e.key(), e.value().committed()));
        let out = id_map_json(&written_at(), "committed", values);
        crate::support::fsutil::write_atomic(&dir.join(HANDOFF), out.as_bytes())
    }

    /// A successor applies its predecessor's handoff once it appears: each key's counters move
    /// by (predecessor's exact final value − the ceiling this process started from).
    pub(super) fn apply_handoff(&self, dir: &Path) {
        let Ok(mut pending) = self.shared.successor.lock() else {
            return;
        };
        let Some((started, initial)) = pending.as_ref() else {
            return;
        };
        #[derive(serde::Deserialize)]
        struct Handoff {
            written_at: i64,
            committed: HashMap<String, i64>,
        }
        let path = dir.join(HANDOFF);
        let Ok(bytes) = std::fs::read(&path) else {
            return;
        };
        let Ok(h) = serde_json::from_slice::<Handoff>(&bytes) else {
            return;
        };
        if h.written_at < *started {
            return;
        }
        let mut ids: std::collections::HashSet<u64> = initial.keys().copied().collect();
        let finals: HashMap<u64, i64> = h
            .committed
            .iter()
            .filter_map(|(k, v)| Some((k.parse().ok()?, *v)))
            .collect();
        ids.extend(finals.keys().copied());
        for id in ids {
            let delta =
                finals.get(&id).copied().unwrap_or(0) - initial.get(&id).copied().unwrap_or(0);
            if delta == 0 {
                continue;
            }
            let c = self.counter(id);
            // A counter the predecessor made (its `until` is not in the handoff) still ends.
            let _ = c.until.compare_exchange(
                0,
                unknown_until(id, *started),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            c.committed.fetch_add(delta, Ordering::AcqRel);
            c.consumed.fetch_add(delta, Ordering::AcqRel);
            // What the predecessor spent is not this key's rate here.
            c.rate_mark.fetch_add(delta, Ordering::Relaxed);
            if delta > 0 {
                request_ceiling(&self.shared, id, &c, c.committed());
            }
        }
        let _ = std::fs::remove_file(&path);
        *pending = None;
        log::info!("ledger: applied the predecessor's final values");
    }

    /// Write every key's exact consumed value to `ledger.consumed` (what `keygate keys list`
    /// reads), when any changed since the last write (or `always`).
    pub(super) fn write_consumed_report(&self, dir: &Path, always: bool) -> std::io::Result<()> {
        let mut changed = always;
        for e in self.shared.counters.iter() {
            let c = e.value();
            let now = c.consumed();
            if c.reported.swap(now, Ordering::AcqRel) != now {
                changed = true;
            }
        }
        if !changed {
            return Ok(());
        }
        let values = self
            .shared
            .counters
            .iter()
            .map(|e| (*e.key(), e.value().consumed()));
        let out = id_map_json(&written_at(), "consumed", values);
        crate::support::fsutil::write_atomic(&dir.join(CONSUMED), out.as_bytes())
    }

    /// Clean shutdown: write exact values to the snapshot and empty the journal, so nothing is
    /// stranded. Call after the server has stopped serving.
    pub fn shutdown(&self) -> std::io::Result<()> {
        if let Some(r) = &self.rates {
            r.shutdown(Duration::from_secs(1));
        }
        if let Some(l) = &self.lease {
            l.shutdown(Duration::from_secs(3));
            return Ok(());
        }
        self.stop_writer();
        let Some(dir) = self.shared.dir.clone() else {
            return Ok(());
        };
        let now = crate::core::clock::unix_now();
        self.with_lock(true, || {
            self.write_snapshot(&dir, true, now, &HashSet::new())?;
            self.write_consumed_report(&dir, true)?;
            truncate_journal(&dir)
        })
    }

    /// What a gateway has charged each key id, as persisted in `dir` (for the CLI): the
    /// consumed report a running gateway refreshes every second, else the durable ceilings.
    pub fn read_consumed(dir: &Path) -> std::io::Result<HashMap<u64, i64>> {
        Ok(Ledger::read_history(dir)?
            .into_iter()
            .map(|(id, (v, _))| (id, v))
            .collect())
    }

    /// [`Ledger::read_consumed`], with when each counter ends (unix seconds; 0: never; a
    /// budget counter written without one ends as [`UNKNOWN_KEEP`] from now).
    pub(crate) fn read_history(dir: &Path) -> std::io::Result<HashMap<u64, (i64, i64)>> {
        let DiskState { ceilings, until } = load_state(dir)?;
        let now = crate::core::clock::unix_now();
        let mut out = ceilings;
        let report = dir.join(CONSUMED);
        if report.exists() {
            #[derive(serde::Deserialize)]
            struct Report {
                consumed: HashMap<String, i64>,
            }
            let r: Report = serde_json::from_slice(&std::fs::read(&report)?).map_err(|e| {
                std::io::Error::other(format!("ledger report {}: {e}", report.display()))
            })?;
            for (k, v) in r.consumed {
                if let Ok(id) = k.parse::<u64>() {
                    out.insert(id, v);
                }
            }
        }
        Ok(out
            .into_iter()
            .map(|(id, v)| {
                let ends = until.get(&id).copied();
                (id, (v, ends.unwrap_or_else(|| unknown_until(id, now))))
            })
            .collect())
    }
}

/// `"written_at":<unix seconds>`, the header of the handoff and consumed files.
pub(super) fn written_at() -> String {
    format!("\"written_at\":{}", crate::core::clock::unix_now())
}

/// `{<header>,"<name>":{"<id>":<value>,…}}` plus a newline: the shape of the ledger's files
/// (the snapshot has a second map).
pub(super) fn id_map_json(
    header: &str,
    name: &str,
    values: impl IntoIterator<Item = (u64, i64)>,
) -> String {
    format!("{{{header},{}}}\n", id_map(name, values))
}

/// `"<name>":{"<id>":<value>,…}`.
fn id_map(name: &str, values: impl IntoIterator<Item = (u64, i64)>) -> String {
    use std::fmt::Write as _;
    let mut out = format!("\"{name}\":{{");
    for (i, (id, v)) in values.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "\"{id}\":{v}");
    }
    out.push('}');
    out
}

fn poisoned() -> std::io::Error {
    std::io::Error::other("ledger: a thread panicked while writing the ledger's files")
}

pub(super) fn open_journal(dir: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(JOURNAL))
}

/// Empty the journal (its entries are in the snapshot). A handle opened to append keeps
/// appending, at the new end.
pub(super) fn truncate_journal(dir: &Path) -> std::io::Result<()> {
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(dir.join(JOURNAL))?;
    f.sync_all()
}

/// What the ledger's files hold: each counter's ceiling and, for the counters that end, when
/// (unix seconds).
#[derive(Debug, Default)]
pub(super) struct DiskState {
    pub(super) ceilings: HashMap<u64, i64>,
    pub(super) until: HashMap<u64, i64>,
}

/// Read the snapshot, then replay the journal, keeping the highest ceiling per id and the
/// last `until`. A torn last journal line (a crash mid-write) holds a digit prefix of its
/// value, so it is smaller than the value being written; that write was never fsynced, so no
/// admission relied on it. A torn `until` would be too early and drop a counter still read,
/// so an `until` line counts only when its newline is there.
///
/// Journal lines are `<id> <ceiling>` and `until <id> <unix seconds>`; a binary older than
/// `until` skips the second kind (it reads only lines of two fields).
pub(super) fn load_state(dir: &Path) -> std::io::Result<DiskState> {
    let mut state = DiskState::default();
    let snap = dir.join(SNAPSHOT);
    if snap.exists() {
        #[derive(serde::Deserialize)]
        struct Snapshot {
            ceilings: HashMap<String, i64>,
            #[serde(default)]
            until: HashMap<String, i64>,
        }
        let bytes = std::fs::read(&snap)?;
        let s: Snapshot = serde_json::from_slice(&bytes).map_err(|e| {
            std::io::Error::other(format!("ledger snapshot {}: {e}", snap.display()))
        })?;
        let id = |k: &str| {
            k.parse::<u64>().map_err(|_| {
                std::io::Error::other(format!("ledger snapshot {}: bad id {k:?}", snap.display()))
            })
        };
        for (k, v) in s.ceilings {
            state.ceilings.insert(id(&k)?, v);
        }
        for (k, v) in s.until {
            state.until.insert(id(&k)?, v);
        }
    }
    let journal = dir.join(JOURNAL);
    if journal.exists() {
        let mut reader = BufReader::new(File::open(&journal)?);
        let mut line = String::new();
        while reader.read_line(&mut line)? > 0 {
            let whole = line.ends_with('\n');
            let mut parts = line.split_ascii_whitespace();
            match (parts.next(), parts.next(), parts.next(), parts.next()) {
                (Some("until"), Some(id), Some(u), None) if whole => {
                    if let (Ok(id), Ok(u)) = (id.parse::<u64>(), u.parse::<i64>()) {
                        state.until.insert(id, u);
                    }
                }
                (Some(id), Some(v), None, None) => {
                    if let (Ok(id), Ok(v)) = (id.parse::<u64>(), v.parse::<i64>()) {
                        let e = state.ceilings.entry(id).or_insert(v);
                        *e = (*e).max(v);
                    }
                }
                _ => {}
            }
            line.clear();
        }
    }
    Ok(state)
}
