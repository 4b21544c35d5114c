//! Watching the sync file and swapping the table.
//!
//! Every way a file can change is covered: an atomic rename over it, an in-place rewrite, and a
//! Kubernetes ConfigMap mount (`keys.json` a symlink into `..data/`, with `..data` swapped). The
//! file's folder is watched (inotify through `notify`), events are debounced, and a cheap `stat`
//! every second plus a content hash every 5 minutes catch what events miss. SIGHUP forces a
//! reload.
//! The file's edit journal (`<file>.journal`, appended to by the admin API) is watched and read
//! with it: another gateway's admin writes to the same file are seen as they are journaled.
//! Parsing and compiling happen on the reload thread, never on the request path; a table is
//! published with one `arc-swap` store, so a request sees the whole old table or the whole new
//! one. A file that fails validation is rejected whole: the last good table stays, the error is
//! logged once per distinct content and counted.

use crate::core::table::{Digest, KeyTable, SyncFileSummary};
use crate::gate::{unix_now, Gate};
use crate::support::fsutil::FileStamp;
use crate::support::sync_file::{journal_path, Journal};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often the file is re-read and hashed even when neither an event nor `stat` shows a
/// change (a fallback for lost events and same-size rewrites within one timestamp tick). A
/// 1M-key file (207 MB) costs about a quarter of a second of CPU to read and hash.
const FULL_HASH_EVERY: Duration = Duration::from_secs(300);

/// What a check did.
#[derive(Debug, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// The content is what is loaded already.
    Unchanged,
    /// A new table is in force.
    Reloaded {
        /// Its revision.
        revision: u64,
        /// Its key count.
        keys: usize,
    },
    /// The file was rejected; the old table stays.
    Rejected(String),
}

/// The stamps of the file and of its journal.
type Stamps = (Option<FileStamp>, Option<FileStamp>);

fn stamp(path: &Path) -> Stamps {
    (FileStamp::of(path), FileStamp::of(&journal_path(path)))
}

/// Reloads one gate's table from one sync file.
pub struct Reloader {
    gate: Gate,
    path: PathBuf,
    last_stamp: Mutex<Stamps>,
    last_rejected: Mutex<Option<Digest>>,
    /// The digest of the file as compacted (its journal folded in and emptied): the same keys
    /// as the table in force, which has the digest of the file and journal it was built from.
    compacted: Mutex<Option<Digest>>,
    /// One check at a time: the watcher thread and the admin API's writes both check, and a
    /// slower check must not publish an older file after a newer one.
    checking: Mutex<()>,
}

enum Wake {
    FileEvent,
    Signal,
}

impl Reloader {
    /// A reloader for `gate`'s table from `path`.
    pub fn new(gate: Gate, path: &Path) -> Reloader {
        Reloader {
            gate,
            last_stamp: Mutex::new(stamp(path)),
            path: path.to_path_buf(),
            last_rejected: Mutex::new(None),
            compacted: Mutex::new(None),
            checking: Mutex::new(()),
        }
    }

    /// The revision of the table in force.
    pub fn gate_revision(&self) -> u64 {
        self.gate.table().revision
    }

    /// Read the file; if its content differs from the loaded table's (or `force`), validate,
    /// compile and publish it.
    pub fn check(&self, force: bool) -> ReloadOutcome {
        let one_at_a_time = self
            .checking
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let outcome = self.read_and_swap(force);
        drop(one_at_a_time);
        // The file's bytes, their parse and (usually: unless requests still hold it) the
        // previous table are all free now.
        crate::support::memory::release_free_memory();
        outcome
    }

    fn read_and_swap(&self, force: bool) -> ReloadOutcome {
        if let Ok(mut s) = self.last_stamp.lock() {
            *s = stamp(&self.path);
        }
        let started = Instant::now();
        self.gate.metrics().sync_file_reads.inc();
        let journal = match Journal::read(&self.path) {
            Ok(j) => j,
            Err(e) => return self.reject(None, e),
        };
        // One read to hash the file (never holding it whole), a second to compile it only
        // when it changed.
        let summary = match SyncFileSummary::read(&self.path, &journal) {
            Ok(s) => s,
            Err(e) => return self.reject(None, format!("sync file {}: {e}", self.path.display())),
        };
        let digest = summary.digest;
        if !force && self.holds(digest) {
            return ReloadOutcome::Unchanged;
        }
        let source = self.path.display().to_string();
        self.publish(digest, &source, started, || {
            KeyTable::load_summarized(&self.path, &summary, &journal)
        })
    }

    /// Validate `bytes` (a whole sync file from `source`) exactly as a reload of the file does
    /// and, when it differs from the table in force, publish it; a file that fails is rejected
    /// whole (logged, counted) and the last good table stays.
    pub fn apply(&self, bytes: &[u8], source: &str) -> ReloadOutcome {
        let one_at_a_time = self
            .checking
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let digest: Digest = <sha2::Sha256 as sha2::Digest>::digest(bytes).into();
        let outcome = if digest == self.gate.table().source_digest {
            ReloadOutcome::Unchanged
        } else {
            self.publish(digest, source, Instant::now(), || {
                KeyTable::from_json(bytes, source)
            })
        };
        drop(one_at_a_time);
        crate::support::memory::release_free_memory();
        outcome
    }

    /// Put `table`, compiled from the file (and journal) just written at this reloader's path
    /// (the admin API's writes: [`crate::sync::edit::SyncEditor::edit_publish`]), in force
    /// without reading them again. Its `source_digest` must be that of the file's bytes and the
    /// journal's, so that the watcher's next look finds them unchanged.
    pub fn publish_table(&self, table: KeyTable) -> ReloadOutcome {
        let one_at_a_time = self
            .checking
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Ok(mut s) = self.last_stamp.lock() {
            *s = stamp(&self.path);
        }
        let source = self.path.display().to_string();
        let outcome = if table.source_digest == self.gate.table().source_digest {
            // The watcher read the written file first and put it in force already.
            ReloadOutcome::Reloaded {
                revision: table.revision,
                keys: table.len(),
            }
        } else {
            self.publish(table.source_digest, &source, Instant::now(), || Ok(table))
        };
        drop(one_at_a_time);
        crate::support::memory::release_free_memory();
        outcome
    }

    /// Whether the file or parse of `digest` holds the table in force: it is the one compiled,
    /// or this gateway's compaction of it.
    pub fn holds(&self, digest: Digest) -> bool {
        digest == self.gate.table().source_digest
            || self.compacted.lock().is_ok_and(|c| *c == Some(digest))
    }

    /// The file at this reloader's path was just compacted by this gateway's admin API (under
    /// the writers' lock): it reads as `digest` now, and holds the table in force.
    pub fn compacted(&self, digest: Digest) {
        let _one_at_a_time = self
            .checking
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Ok(mut s) = self.last_stamp.lock() {
            *s = stamp(&self.path);
        }
        if let Ok(mut c) = self.compacted.lock() {
            *c = Some(digest);
        }
    }

    fn publish(
        &self,
        digest: Digest,
        source: &str,
        started: Instant,
        load: impl FnOnce() -> Result<KeyTable, crate::core::table::TableError>,
    ) -> ReloadOutcome {
        match load() {
            Ok(table) => {
                let (revision, keys) = (table.revision, table.len());
                self.gate.swap_table(table);
                if let Ok(mut c) = self.compacted.lock() {
                    *c = None;
                }
                let m = self.gate.metrics();
                m.reloads.with_label_values(&["ok"]).inc();
                m.loaded_at.set(unix_now());
                if let Ok(mut r) = self.last_rejected.lock() {
                    *r = None;
                }
                log::info!(
                    "reloaded {source} (revision {revision}, {keys} keys) in {} ms",
                    started.elapsed().as_millis()
                );
                ReloadOutcome::Reloaded { revision, keys }
            }
            Err(e) => self.reject(Some(digest), e.to_string()),
        }
    }

    fn reject(&self, digest: Option<Digest>, message: String) -> ReloadOutcome {
        self.gate
            .metrics()
            .reloads
            .with_label_values(&["error"])
            .inc();
        let first_time = match self.last_rejected.lock() {
            Ok(mut last) => {
                let first = digest.is_none() || *last != digest;
                *last = digest;
                first
            }
            Err(_) => true,
        };
        if first_time {
            log::error!("{message}; keeping the table in force");
        }
        ReloadOutcome::Rejected(message)
    }

    /// Wait until no writer (`keygate keys`, the admin API) is editing the file, and keep them
    /// out while the file is looked at: the admin API puts what it wrote in force itself and
    /// records its stamp, so a look after it finds nothing to read (a look during it read and
    /// compiled the file a second time: seconds at a million keys). `None` where no lock file
    /// can be made (a read-only folder, such as a mounted ConfigMap: nobody edits there).
    fn wait_for_writers(&self) -> Option<std::fs::File> {
        crate::support::fsutil::lock_beside(&self.path).ok()
    }

    fn stamp_changed(&self) -> bool {
        let now = stamp(&self.path);
        self.last_stamp.lock().map_or(true, |s| *s != now)
    }

    /// Start the reload thread: folder watch (when `watch`), periodic checks, and SIGHUP.
    pub fn spawn(self: std::sync::Arc<Self>, watch: bool) -> std::io::Result<()> {
        let (tx, rx) = channel::<Wake>();
        let _watcher = if watch { self.watch(tx.clone()) } else { None };
        spawn_sighup(tx)?;
        std::thread::Builder::new()
            .name("keygate-reload".into())
            .spawn(move || {
                // Keep the watcher alive as long as this thread runs.
                let _watcher = _watcher;
                let mut last_hash_check = Instant::now();
                loop {
                    match rx.recv_timeout(Duration::from_secs(1)) {
                        Ok(Wake::Signal) => {
                            log::info!("SIGHUP: reloading {}", self.path.display());
                            let _writers = self.wait_for_writers();
                            self.check(true);
                        }
                        Ok(Wake::FileEvent) => {
                            // Debounce: a writer may touch the file several times.
                            std::thread::sleep(Duration::from_millis(50));
                            while rx.try_recv().is_ok() {}
                            // A file this gateway wrote itself (the admin API) is in force
                            // already, under the stamp recorded when it was published: not
                            // read again (at a million keys, a second of CPU per write). Any
                            // other writer changes the stamp (a new inode, length or time);
                            // what one tick of a coarse clock hides, the periodic hash finds.
                            let _writers = self.wait_for_writers();
                            if self.stamp_changed() {
                                self.check(false);
                            }
                        }
                        Err(RecvTimeoutError::Timeout) if watch => {
                            let _writers = self.wait_for_writers();
                            if self.stamp_changed() || last_hash_check.elapsed() >= FULL_HASH_EVERY
                            {
                                last_hash_check = Instant::now();
                                self.check(false);
                            }
                        }
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                }
            })?;
        Ok(())
    }

    fn watch(&self, tx: Sender<Wake>) -> Option<notify::RecommendedWatcher> {
        use notify::{RecursiveMode, Watcher};
        let dir = self
            .path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let names = [
            self.path.file_name().map(|n| n.to_os_string()),
            journal_path(&self.path)
                .file_name()
                .map(|n| n.to_os_string()),
        ];
        let handler = move |res: notify::Result<notify::Event>| {
            if let Ok(event) = res {
                if concerns_sync_file(&event, &names) {
                    let _ = tx.send(Wake::FileEvent);
                }
            }
        };
        match notify::recommended_watcher(handler) {
            Ok(mut w) => match w.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => Some(w),
                Err(e) => {
                    log::warn!("cannot watch {}: {e}; polling instead", dir.display());
                    None
                }
            },
            Err(e) => {
                log::warn!("cannot watch {}: {e}; polling instead", dir.display());
                None
            }
        }
    }
}

/// Whether a folder event can mean the sync file (or its journal, `names`) changed. Opening or
/// reading a file is not a change: without this filter, reading the file to check it fires an
/// event that checks it again, for ever (a 1M-key file is re-read and hashed several times a
/// second). Events about other files in the folder are not either, except a Kubernetes
/// ConfigMap's `..data` swap.
fn concerns_sync_file(event: &notify::Event, names: &[Option<std::ffi::OsString>]) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {}
        EventKind::Access(_) => return false,
        _ => {}
    }
    // Without paths (an overflow, say) the event may concern anything.
    event.paths.is_empty()
        || event.paths.iter().any(|p| {
            p.file_name().is_some_and(|f| {
                names.iter().any(|n| n.as_deref() == Some(f))
                    || f.as_encoded_bytes().starts_with(b"..")
            })
        })
}

fn spawn_sighup(tx: Sender<Wake>) -> std::io::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGHUP])?;
    std::thread::Builder::new()
        .name("keygate-sighup".into())
        .spawn(move || {
            for _ in signals.forever() {
                if tx.send(Wake::Signal).is_err() {
                    return;
                }
            }
        })?;
    Ok(())
}
