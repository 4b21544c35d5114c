//! Replacing a file atomically and durably: temp file, fsync, rename, fsync the folder.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::SystemTime;

/// What tells cheaply whether a file changed: its length, modification time, device and inode
/// (a file replaced by a rename, as [`write_atomic`] does, has a new inode). Not proof: a file
/// replaced twice within one tick of a coarse clock (1–2 s on some file systems), whose inode
/// came back, with the same length, has the stamp it had.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct FileStamp {
    len: u64,
    modified: Option<SystemTime>,
    device: u64,
    inode: u64,
}

impl FileStamp {
    /// The stamp of the file at `path` (following symlinks, so a swapped Kubernetes ConfigMap
    /// `..data` shows as a new inode); `None` when it cannot be read.
    pub fn of(path: &Path) -> Option<FileStamp> {
        Some(FileStamp::from_metadata(&std::fs::metadata(path).ok()?))
    }

    /// The stamp of an open file. Whoever keeps `file` open also keeps its inode from being
    /// given to another file, so a stamp taken this way cannot match a later file by reuse.
    pub fn of_file(file: &File) -> Option<FileStamp> {
        Some(FileStamp::from_metadata(&file.metadata().ok()?))
    }

    fn from_metadata(m: &std::fs::Metadata) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        FileStamp {
            len: m.len(),
            modified: m.modified().ok(),
            device: m.dev(),
            inode: m.ino(),
        }
    }
}

/// Take the exclusive lock that writers of `path` hold while they edit it (a lock file beside
/// it, `.NAME.lock`, made if missing); released when the returned file is dropped. Blocks
/// while another holder (in any process) has it.
pub fn lock_beside(path: &Path) -> Result<File, String> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let lock_path = path.with_file_name(format!(".{name}.lock"));
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| format!("{}: {e}", lock_path.display()))?;
    f.lock()
        .map_err(|e| format!("{}: cannot lock: {e}", lock_path.display()))?;
    Ok(f)
}

/// A [`replace`] that failed, and whether `path` holds the new bytes already (the rename was
/// done, only the folder's fsync failed: readers see the new file, a crash may bring back the
/// old one).
#[derive(Debug)]
pub struct ReplaceError {
    /// What failed.
    pub error: std::io::Error,
    /// The new bytes are in place.
    pub replaced: bool,
}

impl std::fmt::Display for ReplaceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.replaced {
            write!(
                f,
                "replaced, but its folder could not be synced: {}",
                self.error
            )
        } else {
            self.error.fmt(f)
        }
    }
}

/// Write `bytes` to `path` so that a reader (or a crash) sees the old content or the new, never a
/// mix: write a temp file beside it, fsync it, rename it over `path`, fsync the folder.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    replace(path, bytes).map_err(|e| e.error)
}

/// [`write_atomic`], telling a failure before the rename (the old file stays) from one after
/// it (the new file is in place, not known to be durable): a caller that must not apply the
/// same change twice needs the difference.
pub fn replace(path: &Path, bytes: &[u8]) -> Result<(), ReplaceError> {
    let dir = dir_of(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Unique per call: two threads (or processes) replacing the same file never share a temp.
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.tmp-{}-{n}", std::process::id()));
    let written = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if let Err(error) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(ReplaceError {
            error,
            replaced: false,
        });
    }
    sync_dir_of(path).map_err(|error| ReplaceError {
        error,
        replaced: true,
    })
}

/// The folder `path` is in: a bare file name's parent is "", which cannot be opened, so ".".
fn dir_of(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// fsync the folder `path` is in, so that a file created or renamed there survives a crash.
pub fn sync_dir_of(path: &Path) -> std::io::Result<()> {
    File::open(dir_of(path))?.sync_all()
}

#[cfg(test)]
mod tests {
    #[test]
    fn replaces_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.json");
        super::write_atomic(&p, b"one").unwrap();
        super::write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_failure_before_the_rename_leaves_the_old_file_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        // A path whose folder does not exist: the temp file cannot be made.
        let p = dir.path().join("missing").join("x.json");
        let e = super::replace(&p, b"one").unwrap_err();
        assert!(!e.replaced, "{e}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn an_open_file_keeps_its_stamp_from_matching_a_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.json");
        super::write_atomic(&p, b"one").unwrap();
        let pinned = std::fs::File::open(&p).unwrap();
        let stamp = super::FileStamp::of_file(&pinned);
        assert_eq!(stamp, super::FileStamp::of(&p));
        // Same length, replaced: the new file cannot have the pinned inode.
        super::write_atomic(&p, b"two").unwrap();
        assert_ne!(stamp, super::FileStamp::of(&p));
    }
}
