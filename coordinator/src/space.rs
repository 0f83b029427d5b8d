//! Whether an error means a full disk, and how much room the data
//! directory has left: by error kind or code (ENOSPC and EDQUOT from the OS,
//! SQLITE_FULL from SQLite), never by message text.

use std::path::{Path, PathBuf};

/// Whether an I/O error means the disk (or the user's quota) is full.
pub fn io_is_full(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded)
}

/// Whether a SQLite error means the disk is full.
pub fn sqlite_is_full(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::DiskFull)
}

/// Bytes an unprivileged writer may still use on the file system of `path`;
/// 0 when that cannot be read.
pub fn free_bytes(path: &Path) -> u64 {
    match rustix::fs::statvfs(path) {
        Ok(s) => s.f_bavail.saturating_mul(s.f_frsize),
        Err(_) => 0,
    }
}

/// The first data directory opened in this process: for the free bytes of
/// a full disk met where no `DataDir` is at hand (`error.rs`).
static FIRST: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Notes the data directory, for [`data_dir_free_bytes`].
pub fn remember_data_dir(path: &Path) {
    let _ = FIRST.set(path.to_owned());
}

/// The free bytes of the data directory, if one was opened.
pub fn data_dir_free_bytes() -> Option<u64> {
    FIRST.get().map(|p| free_bytes(p))
}
