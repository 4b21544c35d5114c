//! Editing the sync file safely (`keygate keys …`, `keygate import`): every edit takes an
//! exclusive lock, re-reads the file (with its journal folded in), applies the change,
//! validates the whole result exactly as the gateway will, bumps `revision` and replaces the
//! file atomically (temp file, fsync, rename, fsync the folder), then empties the journal. A
//! running gateway picks the change up through its normal reload.
//!
//! The admin API's editor ([`SyncEditor::keeping`]) also keeps the file's parse while the file
//! and its journal on disk are the ones it wrote or read last, and appends what a batch
//! changed to the journal ([`crate::core::journal`]) instead of rewriting the file: at a
//! million keys an edit then costs one compile and a line, not a serialization of the whole
//! file, its hash and its write. It hands the table it compiled to validate an edit to the
//! gateway ([`SyncEditor::edit_publish`]), and folds the journal into the file when asked
//! ([`SyncEditor::compact`]: a second after the last write) or when the journal grows past
//! [`MAX_JOURNAL`].

use crate::core::config::{KeyEntry, KeyStatus, PreviousKey, SyncFile};
use crate::core::journal::{Before, Fingerprints};
use crate::core::table::{digest_hex, generate_key, key_digest, Digest, KeyTable};
use crate::core::vault::{key_hint, Vault};
use crate::support::fsutil::FileStamp;
use crate::support::sync_file::{append_journal, clear_journal, journal_path, Journal};
use serde::Serialize;
use sha2::Digest as _;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

/// A journal past this size is folded into the file at the next write.
pub const MAX_JOURNAL: u64 = 64 << 20;

/// A parse of the file with its journal folded in, and what tells whether they are still the
/// ones on disk: the file kept open (while it is open its inode cannot be reused by a later
/// file, so a stamp that matches is the same file, not a new one that got the old inode and
/// length) with its stamp, and the journal's stamp.
struct Parse {
    /// `None`: not to be kept (no file, or it changed while it was read).
    pin: Option<(File, FileStamp)>,
    journal_stamp: Option<FileStamp>,
    file: Arc<SyncFile>,
    /// The digest of the file's bytes and the journal's (a table's `source_digest`), to which
    /// a line appended is added.
    digest: sha2::Sha256,
    /// The journal's well-formed bytes: a torn line after them is cut before appending.
    journal_len: u64,
    /// The fingerprints of `file.keys`, once an edit has needed them.
    fingerprints: Option<Fingerprints>,
}

type Kept = Option<Parse>;

impl Parse {
    /// Whether the file and the journal at `path` are still the ones parsed.
    fn is_current(&self, path: &Path) -> bool {
        self.pin
            .as_ref()
            .is_some_and(|(_, s)| FileStamp::of(path) == Some(*s))
            && FileStamp::of(&journal_path(path)) == self.journal_stamp
    }

    /// The stamps of what was just written at `path` (under the lock: no cooperating writer
    /// changed them since).
    fn written(&mut self, path: &Path) {
        self.pin = File::open(path)
            .ok()
            .and_then(|f| Some((FileStamp::of_file(&f)?, f)))
            .map(|(s, f)| (f, s));
        self.journal_stamp = FileStamp::of(&journal_path(path));
    }
}

/// Edits one sync file. Clones share what they keep.
#[derive(Clone)]
pub struct SyncEditor {
    path: PathBuf,
    /// `None`: nothing is kept (the CLI: one edit per process, written whole).
    kept: Option<Arc<Mutex<Kept>>>,
}

impl SyncEditor {
    /// An editor for the sync file at `path`.
    pub fn new(path: &Path) -> SyncEditor {
        SyncEditor {
            path: path.to_path_buf(),
            kept: None,
        }
    }

    /// An editor that keeps the file's parse between edits and reads, for as long as the file
    /// and its journal on disk keep the stamps they had (another writer, such as
    /// `keygate keys`, changes them), and journals its edits.
    pub fn keeping(path: &Path) -> SyncEditor {
        SyncEditor {
            path: path.to_path_buf(),
            kept: Some(Arc::new(Mutex::new(None))),
        }
    }

    /// The file as it is now, its journal folded in, parsed: the kept parse when neither has
    /// changed since. One parse at a time: callers that arrive while the file is parsed (or
    /// edited) wait for that parse instead of each making their own (at a million keys, a
    /// gigabyte each).
    pub fn snapshot(&self) -> Result<Arc<SyncFile>, String> {
        let Some(kept) = &self.kept else {
            return self.read().map(Arc::new);
        };
        let mut kept = kept.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(k) = kept.as_ref().filter(|k| k.is_current(&self.path)) {
            return Ok(k.file.clone());
        }
        *kept = None; // not held while the file is parsed again
        let parse = self.read_pinned()?;
        let file = parse.file.clone();
        *kept = Some(parse).filter(|p| p.pin.is_some());
        Ok(file)
    }

    /// [`snapshot`](Self::snapshot) with the digest of the bytes it was parsed from (a
    /// table's `source_digest`); `None` from an editor that keeps no parse.
    pub fn snapshot_digest(&self) -> Result<(Arc<SyncFile>, Option<Digest>), String> {
        let Some(kept) = &self.kept else {
            return Ok((self.snapshot()?, None));
        };
        let file = self.snapshot()?;
        let kept = kept.lock().unwrap_or_else(PoisonError::into_inner);
        // The kept parse, if it is still the one just returned (an edit may have come between).
        let digest = kept
            .as_ref()
            .filter(|k| Arc::ptr_eq(&k.file, &file))
            .map(|k| k.digest.clone().finalize().into());
        Ok((file, digest))
    }

    /// Read the journal, then the file (in that order: a writer that folds the journal into
    /// the file writes the file first, so lines read before it are at or below its revision),
    /// through a handle that is kept open. Its stamp, taken when it is opened, is that of the
    /// bytes read unless the file was written in place meanwhile; then the stamp has moved on
    /// too and the parse is read again next time.
    fn read_pinned(&self) -> Result<Parse, String> {
        use std::io::Read;
        let failed = |e: std::io::Error| format!("sync file {}: {e}", self.path.display());
        let jpath = journal_path(&self.path);
        let journal_stamp = FileStamp::of(&jpath);
        let journal = Journal::read(&self.path)?;
        let (pin, bytes) = match File::open(&self.path) {
            Ok(mut f) => {
                let stamp = FileStamp::of_file(&f);
                #[cfg(test)]
                tests::PARSES.with(|n| n.set(n.get() + 1));
                let mut bytes = Vec::new();
                f.read_to_end(&mut bytes).map_err(failed)?;
                // Changed while it was read: not kept (the next look reads it again).
                let pin = stamp.filter(|s| FileStamp::of_file(&f) == Some(*s));
                (pin.map(|s| (f, s)), bytes)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (None, b"{}".to_vec()),
            Err(e) => return Err(failed(e)),
        };
        let mut file = SyncFile::parse(&bytes)
            .map_err(|e| format!("sync file {}: {e}", self.path.display()))?;
        crate::core::journal::fold(&mut file, &journal.parsed.lines);
        let pin = pin.filter(|_| FileStamp::of(&jpath) == journal_stamp);
        Ok(Parse {
            pin,
            journal_stamp,
            file: Arc::new(file),
            digest: crate::support::sync_file::content_digest(&bytes, &journal.bytes),
            journal_len: journal.parsed.good_len as u64,
            fingerprints: None,
        })
    }

    /// The file being edited.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> Result<File, String> {
        crate::support::fsutil::lock_beside(&self.path)
    }

    /// Read and parse the file, its journal folded in (an absent file is an empty one).
    pub fn read(&self) -> Result<SyncFile, String> {
        let parse = self.read_pinned()?;
        Ok(Arc::unwrap_or_clone(parse.file))
    }

    /// Apply `change` under the lock; nothing is written unless it succeeds and the result
    /// validates.
    pub fn edit<T>(
        &self,
        change: impl FnOnce(&mut SyncFile) -> Result<T, String>,
    ) -> Result<T, String> {
        let mut failed = None;
        let change = |file: &mut SyncFile| match change(file) {
            Ok(out) => (Some(out), true),
            Err(e) => {
                failed = Some(e);
                (None, false)
            }
        };
        // A change that fails may have touched the file before it failed.
        let (out, _) = self.edit_kept(change, drop, false)?;
        match (out, failed) {
            (Some(out), _) => Ok(out),
            (None, e) => Err(e.unwrap_or_default()),
        }
    }

    /// Apply `change` under the lock; it returns what it did and whether it changed the file.
    /// When it did, the result is validated, `revision` bumped and the edit written; returns
    /// the outcome and the new revision (`None`: nothing written). An `Err` is the whole
    /// edit's failure (the file unreadable, the result invalid): nothing was written.
    /// A change that says it changed nothing must have left the file untouched: the editor
    /// goes on with that parse.
    pub fn edit_some<T>(
        &self,
        change: impl FnOnce(&mut SyncFile) -> (T, bool),
    ) -> Result<(T, Option<u64>), String> {
        self.edit_publish(change, drop)
    }

    /// [`edit_some`](Self::edit_some), and `publish` gets the table compiled from the edited
    /// file (its `source_digest` that of the file and journal written) before the lock is
    /// released, so that no other writer's file can be put in force before it.
    pub fn edit_publish<T>(
        &self,
        change: impl FnOnce(&mut SyncFile) -> (T, bool),
        publish: impl FnOnce(KeyTable),
    ) -> Result<(T, Option<u64>), String> {
        self.edit_kept(change, publish, true)
    }

    /// The edit; `untouched_if_unchanged`: the change promises to leave the file as it found
    /// it when it says it changed nothing (so the parse is kept).
    fn edit_kept<T>(
        &self,
        change: impl FnOnce(&mut SyncFile) -> (T, bool),
        publish: impl FnOnce(KeyTable),
        untouched_if_unchanged: bool,
    ) -> Result<(T, Option<u64>), String> {
        let _lock = self.lock()?;
        let mut clock = PhaseClock::start();
        // Held through the edit: readers wait for the edited parse rather than parse the file
        // being replaced.
        let mut kept = self
            .kept
            .as_ref()
            .map(|k| k.lock().unwrap_or_else(PoisonError::into_inner));
        let mut parse = match kept.as_mut().and_then(|k| k.take()) {
            Some(k) if k.is_current(&self.path) => k,
            stale => {
                // Not held while the file is parsed again: two parses at once are a gigabyte
                // each at a million keys.
                drop(stale);
                self.read_pinned()?
            }
        };
        clock.lap("read");
        // Journaled: the admin API's edits of a file that exists.
        let before = (kept.is_some() && parse.pin.is_some()).then(|| {
            let keys = parse
                .fingerprints
                .take()
                .unwrap_or_else(|| Fingerprints::of(&parse.file.keys));
            Before::new(&parse.file, keys)
        });
        // Edited in place unless a reader still holds this parse (then it is copied).
        let file = Arc::make_mut(&mut parse.file);
        let (out, changed) = change(file);
        clock.lap("edit");
        if !changed {
            // Kept only when the change promises it did not touch it (one that failed
            // half-way may have).
            if let (Some(kept), true) = (kept.as_mut(), untouched_if_unchanged) {
                parse.fingerprints = before.map(Before::into_keys);
                **kept = Some(parse).filter(|p| p.pin.is_some());
            }
            return Ok((out, None));
        }
        file.revision += 1;
        // What was edited is not kept unless it is written: a failure below drops it.
        let (table, written) = self.compile_and_prepare(file, before.as_ref());
        let mut table = table?;
        clock.lap("compile");
        match written? {
            Written::Line(line, keys) => {
                self.append(parse.journal_len, &line)?;
                parse.digest.update(&line);
                parse.journal_len += line.len() as u64;
                parse.fingerprints = Some(keys);
                clock.lap("append");
            }
            Written::Whole(bytes) => {
                self.write_whole(&bytes)?;
                parse.digest = sha2::Sha256::new_with_prefix(&bytes);
                parse.journal_len = 0;
                clock.lap("write");
            }
        }
        let revision = file.revision;
        table.source_digest = parse.digest.clone().finalize().into();
        parse.written(&self.path);
        publish(table);
        clock.lap("publish");
        if let Some(kept) = kept.as_mut() {
            **kept = Some(parse).filter(|p| p.pin.is_some());
        }
        log::debug!("sync file {} edited:{}", self.path.display(), clock.laps);
        if let Some(kept) = kept.as_deref_mut() {
            // The edit is done and in force: a compaction that fails is not its failure
            // (reporting it would have the edit applied again); the next one folds it.
            if let Err(e) = self.compact_if(kept, |k| k.journal_len > MAX_JOURNAL, drop) {
                log::error!("{e}");
            }
        }
        Ok((out, Some(revision)))
    }

    /// Fold the journal into the file (write the file whole, then empty the journal), when it
    /// has lines; `noted` gets the digest of the file written, before the lock is released
    /// (the reloader, so that the file it finds changed reads as the table in force). A
    /// journaling editor only.
    pub fn compact(&self, noted: impl FnOnce(Digest)) -> Result<(), String> {
        let Some(kept) = &self.kept else {
            return Ok(());
        };
        let _lock = self.lock()?;
        let mut kept = kept.lock().unwrap_or_else(PoisonError::into_inner);
        if kept.as_ref().is_some_and(|k| k.is_current(&self.path)) {
            return self.compact_if(&mut kept, |k| k.journal_stamp.is_some(), noted);
        }
        // Changed by another writer since this gateway's last edit (another gateway's journal
        // lines, a CLI edit cut short): what is folded now is not the table in force here, so
        // the reloader is not told it is; its watcher loads the compacted file.
        *kept = None;
        let parse = self.read_pinned()?;
        *kept = Some(parse).filter(|p| p.pin.is_some());
        self.compact_if(&mut kept, |k| k.journal_stamp.is_some(), drop)
    }

    /// [`compact`](Self::compact) of the kept parse when `due` says so, under the lock.
    fn compact_if(
        &self,
        kept: &mut Kept,
        due: impl Fn(&Parse) -> bool,
        noted: impl FnOnce(Digest),
    ) -> Result<(), String> {
        let Some(parse) = kept.as_mut().filter(|p| due(p) && p.journal_len > 0) else {
            return Ok(());
        };
        let mut clock = PhaseClock::start();
        let bytes = serialize(&parse.file)?;
        // A failure leaves the journal as it was: nothing is lost, the next try folds it.
        let written = self.write_whole(&bytes);
        let fresh = sha2::Sha256::new_with_prefix(&bytes);
        drop(bytes);
        if let Err(e) = written {
            *kept = None;
            return Err(e);
        }
        parse.digest = fresh;
        parse.journal_len = 0;
        parse.written(&self.path);
        noted(parse.digest.clone().finalize().into());
        clock.lap("compacted");
        log::debug!("sync file {}:{}", self.path.display(), clock.laps);
        Ok(())
    }

    /// Append one journal line; an error when it is not written.
    fn append(&self, good_len: u64, line: &[u8]) -> Result<(), String> {
        let jpath = journal_path(&self.path);
        done_unless_unwritten(
            append_journal(&self.path, good_len, line),
            format_args!("sync journal {}", jpath.display()),
        )
    }

    /// Replace the file with `bytes`, then empty the journal (the file holds all it held: a
    /// crash between the two leaves lines at or below the file's revision, which are skipped).
    fn write_whole(&self, bytes: &[u8]) -> Result<(), String> {
        done_unless_unwritten(
            crate::support::fsutil::replace(&self.path, bytes),
            format_args!("sync file {}", self.path.display()),
        )?;
        // Not emptied: its lines are at or below the new file's revision, so every reader
        // skips them, and the next append cuts them off. The write is done all the same.
        if let Err(e) = clear_journal(&self.path) {
            log::error!(
                "sync journal {}: cannot empty it after writing the file: {e}",
                journal_path(&self.path).display()
            );
        }
        Ok(())
    }

    /// Validate `file` (compile it, exactly as the gateway will) and, side by side, prepare
    /// what to write: the journal line that takes `before` to it when there is one (a
    /// journaling editor's key- and account-shaped edits), else the whole file.
    fn compile_and_prepare(
        &self,
        file: &SyncFile,
        before: Option<&Before>,
    ) -> (Result<KeyTable, String>, Result<Written, String>) {
        std::thread::scope(|s| {
            let written = s.spawn(|| {
                if let Some(before) = before {
                    let keys = Fingerprints::of(&file.keys);
                    if let Some(line) = before.line_to(file, &keys) {
                        let mut bytes = serde_json::to_vec(&line).map_err(|e| e.to_string())?;
                        bytes.push(b'\n');
                        return Ok(Written::Line(bytes, keys));
                    }
                }
                serialize(file).map(Written::Whole)
            });
            let table = KeyTable::compile(file, &self.path.display().to_string())
                .map_err(|e| e.to_string());
            let written = written
                .join()
                .unwrap_or_else(|_| Err("writing the sync file failed".into()));
            (table, written)
        })
    }
}

/// What an edit writes.
/// A write's result as an edit sees it: an error only when nothing was written. One in place
/// but not known to be durable is what everyone reads now, so the edit is done (reporting it
/// failed would have it applied again) and only its durability is in doubt: logged, naming
/// `what`.
fn done_unless_unwritten(
    written: Result<(), crate::support::fsutil::ReplaceError>,
    what: std::fmt::Arguments<'_>,
) -> Result<(), String> {
    match written {
        Ok(()) => Ok(()),
        Err(e) if e.replaced => {
            log::error!("{what}: {e}");
            Ok(())
        }
        Err(e) => Err(format!("{what}: {e}")),
    }
}

enum Written {
    /// A journal line, and the fingerprints of the edited file's keys.
    Line(Vec<u8>, Fingerprints),
    /// The whole file.
    Whole(Vec<u8>),
}

/// The file as written: pretty JSON, one member a line.
fn serialize(file: &SyncFile) -> Result<Vec<u8>, String> {
    let mut bytes = serde_json::to_vec_pretty(file).map_err(|e| e.to_string())?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// How long each part of an edit took (logged at debug level).
struct PhaseClock {
    at: std::time::Instant,
    laps: String,
}

impl PhaseClock {
    fn start() -> PhaseClock {
        PhaseClock {
            at: std::time::Instant::now(),
            laps: String::new(),
        }
    }

    fn lap(&mut self, what: &str) {
        use std::fmt::Write;
        let now = std::time::Instant::now();
        let _ = write!(self.laps, " {what} {} ms", (now - self.at).as_millis());
        self.at = now;
    }
}

/// The fields `create` and `update` take; `None` leaves a field as it is (or at its default).
#[derive(Clone, Debug, Default)]
pub struct KeySpec {
    /// Display name (≤ 50 characters).
    pub name: Option<String>,
    /// Granted quota, units.
    pub quota: Option<i64>,
    /// No cap.
    pub unlimited: Option<bool>,
    /// Unix seconds, -1 for never.
    pub expires_at: Option<i64>,
    /// `Some(None)`: no model restriction; `Some(Some(list))`: only these.
    pub models: Option<Option<Vec<String>>>,
    /// `Some(None)`: any IP; `Some(Some(list))`: only these.
    pub allow_ips: Option<Option<Vec<String>>>,
    /// The group.
    pub group: Option<String>,
    /// `Some(None)`: no account; `Some(Some(id))`: this account.
    pub account: Option<Option<String>>,
    /// Rate limits to set (each given one replaces the key's).
    pub limits: crate::core::config::LimitsEntry,
    /// `Some(None)`: no budget; `Some(Some(b))`: this budget.
    pub budget: Option<Option<crate::core::config::BudgetEntry>>,
}

impl KeySpec {
    fn apply(&self, k: &mut KeyEntry) {
        if let Some(n) = &self.name {
            k.name = n.clone();
        }
        if let Some(q) = self.quota {
            k.quota = q;
        }
        if let Some(u) = self.unlimited {
            k.unlimited_quota = u;
        }
        if let Some(e) = self.expires_at {
            k.expires_at = e;
        }
        if let Some(m) = &self.models {
            k.models = m.clone();
        }
        if let Some(a) = &self.allow_ips {
            k.allow_ips = a.clone();
        }
        if let Some(g) = &self.group {
            k.group = g.clone();
        }
        if let Some(a) = &self.account {
            k.account = a.clone();
        }
        crate::sync::spending::merge_limits(&mut k.limits, &self.limits);
        if let Some(b) = &self.budget {
            k.budget = b.clone();
        }
    }
}

/// The lowest id above every id in use or ever handed out.
pub fn next_free_id(file: &SyncFile) -> u64 {
    let above_used = file.keys.iter().map(|k| k.id).max().unwrap_or(0) + 1;
    above_used.max(file.next_id.unwrap_or(1))
}

fn entry_mut(file: &mut SyncFile, id: u64) -> Result<&mut KeyEntry, String> {
    file.keys
        .iter_mut()
        .find(|k| k.id == id)
        .ok_or_else(|| format!("unknown id {id}"))
}

/// Create a key; returns its id and the key itself (shown once). The file stores its hash and
/// its hint, and with a `vault` the key sealed (see [`crate::sync::vault`]).
pub fn create(
    editor: &SyncEditor,
    spec: &KeySpec,
    vault: Option<&Vault>,
) -> Result<(u64, String), String> {
    let key = generate_key().map_err(|e| format!("cannot generate a key: {e}"))?;
    let hash = digest_hex(&key_digest(key.as_bytes()));
    let id = editor.edit(|file| {
        if let Some(v) = vault {
            crate::core::vault::check_same_secret(file, v)?;
        }
        let id = next_free_id(file);
        file.next_id = Some(id + 1);
        let mut entry = KeyEntry::new(id, hash);
        set_secret_fields(&mut entry, &key, vault)?;
        spec.apply(&mut entry);
        file.keys.push(entry);
        Ok(id)
    })?;
    Ok((id, key))
}

/// Store `key`'s hint in `k`, and its sealed value with a vault (else none: an older sealed
/// value would be stale).
pub fn set_secret_fields(k: &mut KeyEntry, key: &str, vault: Option<&Vault>) -> Result<(), String> {
    k.key_hint = Some(key_hint(key));
    k.key_sealed = vault
        .map(|v| v.seal(k.id, key))
        .transpose()
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Change some fields of key `id`.
pub fn update(editor: &SyncEditor, id: u64, spec: &KeySpec) -> Result<(), String> {
    editor.edit(|file| {
        spec.apply(entry_mut(file, id)?);
        Ok(())
    })
}

/// Enable or disable key `id`.
pub fn set_status(editor: &SyncEditor, id: u64, status: KeyStatus) -> Result<(), String> {
    editor.edit(|file| {
        entry_mut(file, id)?.status = status;
        Ok(())
    })
}

/// Delete key `id` (its consumed counter stays in the ledger under its id).
pub fn delete(editor: &SyncEditor, id: u64) -> Result<(), String> {
    editor.edit(|file| {
        // Remember the highest id so it is never handed out again.
        file.next_id = Some(next_free_id(file));
        let before = file.keys.len();
        file.keys.retain(|k| k.id != id);
        if file.keys.len() == before {
            return Err(format!("unknown id {id}"));
        }
        Ok(())
    })
}

/// Give key `id` a new key string; the old one stops working at once, or `grace_seconds` from
/// `now` when given. Returns the new key.
pub fn rotate(
    editor: &SyncEditor,
    id: u64,
    grace_seconds: Option<u64>,
    now: i64,
    vault: Option<&Vault>,
) -> Result<String, String> {
    let key = generate_key().map_err(|e| format!("cannot generate a key: {e}"))?;
    let hash = digest_hex(&key_digest(key.as_bytes()));
    editor.edit(|file| {
        if let Some(v) = vault {
            crate::core::vault::check_same_secret(file, v)?;
        }
        let k = entry_mut(file, id)?;
        let old = match (k.key_sha256.take(), k.key.take()) {
            (Some(h), _) => h,
            (None, Some(plain)) => digest_hex(&key_digest(plain.as_bytes())),
            (None, None) => return Err(format!("key {id} has no key to rotate")),
        };
        k.previous_keys.retain(|p| p.until > now);
        if let Some(g) = grace_seconds.filter(|g| *g > 0) {
            k.previous_keys.push(PreviousKey {
                key_sha256: old,
                until: now.saturating_add(i64::try_from(g).unwrap_or(i64::MAX)),
            });
        }
        k.key_sha256 = Some(hash);
        set_secret_fields(k, &key, vault)
    })?;
    Ok(key)
}

/// One key as `keygate keys list` shows it. Never holds a key.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct KeyView {
    /// Id.
    pub id: u64,
    /// Name.
    pub name: String,
    /// `enabled`, `disabled`, `expired` or `exhausted`.
    pub status: &'static str,
    /// Group.
    pub group: String,
    /// Granted quota.
    pub quota: i64,
    /// No cap.
    pub unlimited_quota: bool,
    /// `used` baseline plus what the gateway charged.
    pub used: i64,
    /// `quota − used` (null for unlimited keys).
    pub remaining: Option<i64>,
    /// Unix seconds, -1 for never.
    pub expires_at: i64,
    /// Allowed models (null: any).
    pub models: Option<Vec<String>>,
    /// Allowed IPs (null: any).
    pub allow_ips: Option<Vec<String>>,
    /// The account (SPEC §7).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// The key's own rate limits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limits: Option<crate::core::config::LimitsEntry>,
    /// The budget and what was spent in the current period.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<crate::sync::spending::BudgetView>,
    /// The masked key (`sk-abcd**********wxyz`): stored, or computed from a key given in
    /// clear; null for a key imported as a bare hash.
    pub key_hint: Option<String>,
    /// A sealed copy of the key is stored (`reveal` can give it back with the vault secret).
    pub sealed: bool,
}

/// The keys of `file` with what the gateway charged them (`consumed`, by id) at time `now`.
pub fn views(file: &SyncFile, consumed: &HashMap<u64, i64>, now: i64) -> Vec<KeyView> {
    file.keys
        .iter()
        .map(|k| {
            let charged = consumed.get(&k.id).copied().unwrap_or(0);
            let used = k.used + charged;
            let remaining = (!k.unlimited_quota).then_some(k.quota - used);
            let status = k.state(charged, now);
            KeyView {
                id: k.id,
                name: k.name.clone(),
                status,
                group: k.group.clone(),
                quota: k.quota,
                unlimited_quota: k.unlimited_quota,
                used,
                remaining,
                expires_at: k.expires_at,
                models: k.models.clone(),
                allow_ips: k.allow_ips.clone().filter(|a| !a.is_empty()),
                account: k.account.clone(),
                limits: k.limits.clone(),
                budget: k.budget.as_ref().and_then(|b| {
                    crate::sync::spending::budget_view(
                        k.id,
                        b,
                        &|id| consumed.get(&id).copied().unwrap_or(0),
                        now,
                    )
                }),
                key_hint: k
                    .key_hint
                    .clone()
                    .or_else(|| k.key.as_deref().map(key_hint)),
                sealed: k.key_sealed.is_some(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edits_validate_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        let ed = SyncEditor::new(&path);
        let (id, key) = create(
            &ed,
            &KeySpec {
                name: Some("a".into()),
                quota: Some(10),
                ..KeySpec::default()
            },
            None,
        )
        .unwrap();
        assert_eq!(id, 1);
        let before = std::fs::read(&path).unwrap();
        assert!(!String::from_utf8_lossy(&before).contains(&key));
        let bad = KeySpec {
            allow_ips: Some(Some(vec!["10.0.0/8".into()])),
            ..KeySpec::default()
        };
        assert!(update(&ed, 1, &bad).unwrap_err().contains("10.0.0/8"));
        assert!(update(&ed, 9, &KeySpec::default())
            .unwrap_err()
            .contains("unknown id 9"));
        assert_eq!(std::fs::read(&path).unwrap(), before, "nothing written");
        let t = KeyTable::load(&path).unwrap();
        assert!(t.lookup(&key_digest(key.as_bytes())).is_some());
        assert_eq!(t.revision, 1);
    }

    thread_local! {
        /// Parses made by a keeping editor on this thread.
        pub(super) static PARSES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    #[test]
    fn a_keeping_editor_parses_again_only_when_the_file_may_differ() {
        let parses = || PARSES.with(|n| n.get());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        let ed = SyncEditor::keeping(&path);
        create(&ed, &KeySpec::default(), None).unwrap();
        ed.snapshot().unwrap();
        let start = parses();
        ed.snapshot().unwrap();
        // A change that changed nothing (a 404 of the admin API) keeps the parse.
        let (_, written) = ed.edit_some(|_| ((), false)).unwrap();
        assert_eq!(written, None);
        ed.snapshot().unwrap();
        // So does a write.
        ed.edit_some(|f| (f.keys[0].name = "renamed".into(), true))
            .unwrap();
        assert_eq!(ed.snapshot().unwrap().keys[0].name, "renamed");
        assert_eq!(parses(), start, "no parse after the first");
        // A change that failed may have touched it: parsed again.
        let failed: Result<(), String> = ed.edit(|f| {
            f.revision = 99;
            Err("half-way".into())
        });
        assert!(failed.is_err());
        assert_eq!(
            ed.snapshot().unwrap().revision,
            2,
            "what failed is not seen"
        );
        assert_eq!(parses(), start + 1);
        // Writes were journaled; a compaction folds them into the file and keeps the parse.
        assert!(!std::fs::read(journal_path(&path)).unwrap().is_empty());
        ed.compact(drop).unwrap();
        assert!(std::fs::read(journal_path(&path)).unwrap().is_empty());
        assert_eq!(ed.snapshot().unwrap().keys[0].name, "renamed");
        assert_eq!(parses(), start + 1);
        // Another writer replaces the file with one of the same length: seen at once.
        let bytes = std::fs::read(&path).unwrap();
        let other = String::from_utf8(bytes)
            .unwrap()
            .replace("\"revision\": 2", "\"revision\": 7");
        crate::support::fsutil::write_atomic(&path, other.as_bytes()).unwrap();
        assert_eq!(ed.snapshot().unwrap().revision, 7);
    }

    #[test]
    fn ids_are_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let ed = SyncEditor::new(&dir.path().join("keys.json"));
        create(&ed, &KeySpec::default(), None).unwrap();
        let (two, _) = create(&ed, &KeySpec::default(), None).unwrap();
        delete(&ed, two).unwrap();
        let (next, _) = create(&ed, &KeySpec::default(), None).unwrap();
        assert_eq!((two, next), (2, 3));
    }

    #[test]
    fn rotation_with_grace_keeps_the_old_key_until_then() {
        let dir = tempfile::tempdir().unwrap();
        let ed = SyncEditor::new(&dir.path().join("keys.json"));
        let (id, old) = create(&ed, &KeySpec::default(), None).unwrap();
        let new = rotate(&ed, id, Some(60), 1000, None).unwrap();
        let t = KeyTable::load(ed.path()).unwrap();
        let o = t.lookup(&key_digest(old.as_bytes())).unwrap();
        assert_eq!(o.expires_at, Some(1060));
        assert!(t.lookup(&key_digest(new.as_bytes())).is_some());
        rotate(&ed, id, None, 2000, None).unwrap();
        let t = KeyTable::load(ed.path()).unwrap();
        assert!(t.lookup(&key_digest(old.as_bytes())).is_none());
        assert!(t.lookup(&key_digest(new.as_bytes())).is_none());
    }
}
