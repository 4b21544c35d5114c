//! Reading a sync file from the disk into a [`KeyTable`]: the file is opened here and streamed
//! through the pure loader ([`KeyTable::from_reader`]), so `core` never touches the disk and
//! the file is never held whole. Its edit journal (`<file>.journal`, [`crate::core::journal`])
//! is read, appended to and emptied here too; a file with journal lines is read whole, folded
//! and compiled (the journal is compacted a second after the last write, so that is rare).
//!
//! The content's digest (`source_digest`, how a reload tells a change) is that of the file's
//! bytes followed by the journal's: with no journal, the file's alone, as it always was.

use crate::core::config::SyncFile;
use crate::core::journal;
use crate::core::table::{KeyTable, SyncFileSummary, TableError};
use crate::support::fsutil::{sync_dir_of, ReplaceError};
use sha2::Digest as _;
use std::io::{Seek, Write};
use std::path::{Path, PathBuf};

impl KeyTable {
    /// Read, validate and compile a sync file and its journal (streaming the file when the
    /// journal is empty, see [`KeyTable::from_reader`]).
    pub fn load(path: &Path) -> Result<KeyTable, TableError> {
        let journal = Journal::read(path).map_err(|m| table_error(path, m))?;
        let summary =
            SyncFileSummary::read(path, &journal).map_err(|e| table_error(path, e.to_string()))?;
        Self::load_summarized(path, &summary, &journal)
    }

    /// [`KeyTable::load`] of a file [`SyncFileSummary::read`] has just read with `journal`
    /// (the reloader reads it first, to tell whether it changed): its key count sizes the
    /// table once. The table's `source_digest` is that of the bytes it was compiled from,
    /// read again here.
    pub fn load_summarized(
        path: &Path,
        summary: &SyncFileSummary,
        journal: &Journal,
    ) -> Result<KeyTable, TableError> {
        if !journal.bytes.is_empty() {
            return load_folded(path, journal);
        }
        Self::from_reader(
            || std::fs::File::open(path),
            &path.display().to_string(),
            summary.keys_hint,
        )
    }
}

fn table_error(path: &Path, message: String) -> TableError {
    TableError {
        source_name: path.display().to_string(),
        message,
    }
}

/// The file read whole, parsed, the journal folded in, compiled.
fn load_folded(path: &Path, journal: &Journal) -> Result<KeyTable, TableError> {
    let bytes = std::fs::read(path).map_err(|e| table_error(path, e.to_string()))?;
    let mut file = SyncFile::parse(&bytes).map_err(|m| table_error(path, m))?;
    journal::fold(&mut file, &journal.parsed.lines);
    let mut table = KeyTable::compile(&file, &path.display().to_string())?;
    table.source_digest = content_digest(&bytes, &journal.bytes).finalize().into();
    Ok(table)
}

/// The digest of a file's bytes and its journal's, as a hasher that more journal lines can be
/// added to.
pub fn content_digest(file: &[u8], journal: &[u8]) -> sha2::Sha256 {
    let mut sha = sha2::Sha256::new();
    sha.update(file);
    sha.update(journal);
    sha
}

impl SyncFileSummary {
    /// Read the file once, in pieces: hash it (followed by `journal`'s bytes) and estimate
    /// its key count.
    pub fn read(path: &Path, journal: &Journal) -> std::io::Result<SyncFileSummary> {
        let file = std::fs::File::open(path)?;
        SyncFileSummary::of_reader(std::io::Read::chain(file, journal.bytes.as_slice()))
    }
}

/// The journal beside the sync file at `path`: `keys.json.journal`.
pub fn journal_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".journal");
    path.with_file_name(name)
}

/// A sync file's journal as read.
#[derive(Debug, Default)]
pub struct Journal {
    /// Its bytes (none: no journal).
    pub bytes: Vec<u8>,
    /// Its lines.
    pub parsed: journal::Parsed,
}

impl Journal {
    /// Read the journal of the sync file at `path` (none is an empty one). A torn last line is
    /// logged and ignored; a bad line before it is an error naming the file and the line.
    pub fn read(path: &Path) -> Result<Journal, String> {
        let jpath = journal_path(path);
        let bytes = match std::fs::read(&jpath) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(format!("sync journal {}: {e}", jpath.display())),
        };
        let parsed =
            journal::parse(&bytes).map_err(|e| format!("sync journal {}: {e}", jpath.display()))?;
        if let Some(torn) = &parsed.torn {
            log::warn!("sync journal {}: {torn}", jpath.display());
        }
        Ok(Journal { bytes, parsed })
    }
}

/// Append `line` (one JSON line, with its newline) to the journal of the sync file at `path`
/// and fsync it; the journal is first cut to `good_len` bytes when it is longer (a torn last
/// line, which would otherwise become a bad middle line). The error tells whether the line
/// was written whole (only its durability is in doubt: readers see it).
pub fn append_journal(path: &Path, good_len: u64, line: &[u8]) -> Result<(), ReplaceError> {
    let jpath = journal_path(path);
    let not_written = |error| ReplaceError {
        error,
        replaced: false,
    };
    let created = !jpath.exists();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&jpath)
        .map_err(not_written)?;
    (|| {
        if f.metadata()?.len() != good_len {
            f.set_len(good_len)?;
        }
        f.seek(std::io::SeekFrom::Start(good_len))?;
        f.write_all(line)
    })()
    .map_err(not_written)?;
    let durable = f.sync_data().and_then(|()| {
        // A new journal's name must be durable too, or a crash loses the file.
        if created {
            sync_dir_of(&jpath)
        } else {
            Ok(())
        }
    });
    durable.map_err(|error| ReplaceError {
        error,
        replaced: true,
    })
}

/// Empty the journal of the sync file at `path` (once the file holds everything in it).
pub fn clear_journal(path: &Path) -> std::io::Result<()> {
    match std::fs::OpenOptions::new()
        .write(true)
        .open(journal_path(path))
    {
        Ok(f) if f.metadata()?.len() > 0 => {
            f.set_len(0)?;
            f.sync_all()
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}
