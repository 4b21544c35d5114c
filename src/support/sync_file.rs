//! Reading a sync file from the disk into a [`KeyTable`]: the file is opened here and streamed
//! through the pure loader ([`KeyTable::from_reader`]), so `core` never touches the disk and
//! the file is never held whole.

use crate::core::table::{KeyTable, SyncFileSummary, TableError};
use std::path::Path;

impl KeyTable {
    /// Read, validate and compile a sync file, streaming it (see [`KeyTable::from_reader`]).
    pub fn load(path: &Path) -> Result<KeyTable, TableError> {
        let summary = SyncFileSummary::read(path).map_err(|e| TableError {
            source_name: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::load_summarized(path, &summary)
    }

    /// [`KeyTable::load`] of a file [`SyncFileSummary::read`] has just read (the reloader reads
    /// it first, to tell whether it changed): its key count sizes the table once. The table's
    /// `source_digest` is that of the bytes it was compiled from, read again here.
    pub fn load_summarized(path: &Path, summary: &SyncFileSummary) -> Result<KeyTable, TableError> {
        Self::from_reader(
            || std::fs::File::open(path),
            &path.display().to_string(),
            summary.keys_hint,
        )
    }
}

impl SyncFileSummary {
    /// Read the file once, in pieces: hash it and estimate its key count.
    pub fn read(path: &Path) -> std::io::Result<SyncFileSummary> {
        SyncFileSummary::of_reader(std::fs::File::open(path)?)
    }
}
