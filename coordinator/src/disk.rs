//! Whether the coordinator can write its data directory, and errors that
//! say so. A full disk is recognised by its error kind or code (ENOSPC and
//! EDQUOT from the OS, SQLITE_FULL from SQLite), never by message text.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::error::CoordinatorError;
use crate::metrics::Metrics;

/// How often a readiness check writes a probe file, at most.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// Bytes the probe writes and syncs: a small write that a full disk refuses.
const PROBE_BYTES: usize = 4096;

/// The data directory's health, shared by the journal, the context and
/// blob stores, and `/readyz`.
pub struct DataDir {
    path: PathBuf,
    /// The journal's last write failed and is being retried.
    journal_stuck: AtomicBool,
    /// The last write of a file (context, blob, probe) found the disk full.
    files_full: AtomicBool,
    /// When the last probe ran.
    last_probe: Mutex<Option<Instant>>,
    metrics: std::sync::Arc<Metrics>,
}

impl DataDir {
    pub fn new(path: &Path, metrics: std::sync::Arc<Metrics>) -> DataDir {
        crate::space::remember_data_dir(path);
        DataDir {
            path: path.to_owned(),
            journal_stuck: AtomicBool::new(false),
            files_full: AtomicBool::new(false),
            last_probe: Mutex::new(None),
            metrics,
        }
    }

    pub fn free_bytes(&self) -> u64 {
        crate::space::free_bytes(&self.path)
    }

    /// Turns a full disk into `DataDirFull` (with the bytes free now) and
    /// notes it; other errors pass as they are.
    pub fn check(&self, e: CoordinatorError) -> CoordinatorError {
        if !e.is_disk_full() {
            return e;
        }
        self.files_full.store(true, Ordering::Relaxed);
        Metrics::add(&self.metrics.store_write_errors, 1);
        CoordinatorError::DataDirFull { free: self.free_bytes() }
    }

    /// A file was written whole: the disk has room again.
    pub fn file_written(&self) {
        self.files_full.store(false, Ordering::Relaxed);
    }

    /// The journal failed to write (and will retry) or wrote.
    pub fn journal_failed(&self) {
        self.journal_stuck.store(true, Ordering::Relaxed);
        Metrics::add(&self.metrics.store_write_errors, 1);
    }

    pub fn journal_written(&self) {
        self.journal_stuck.store(false, Ordering::Relaxed);
    }

    /// The journal is retrying a write.
    pub fn journal_stuck(&self) -> bool {
        self.journal_stuck.load(Ordering::Relaxed)
    }

    /// Whether the data directory takes writes: the journal is not stuck
    /// and a small file can be written and synced (checked at most once a
    /// second, so an idle coordinator notices a disk filled by others, and
    /// a freed one). Blocking: call from a blocking thread.
    pub fn writable(&self) -> bool {
        let due = {
            let mut last = self.last_probe.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let due = last.is_none_or(|t| t.elapsed() >= PROBE_EVERY);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        if due {
            match self.probe() {
                Ok(()) => self.files_full.store(false, Ordering::Relaxed),
                Err(e) => {
                    if !self.files_full.swap(true, Ordering::Relaxed) {
                        tracing::error!(error = %e, free = self.free_bytes(), "the data directory takes no writes");
                    }
                }
            }
        }
        !self.journal_stuck() && !self.files_full.load(Ordering::Relaxed)
    }

    /// Failed writes counted so far.
    pub fn write_errors(&self) -> u64 {
        self.metrics.store_write_errors.load(Ordering::Relaxed)
    }

    /// The last known state, without probing.
    pub fn known_writable(&self) -> bool {
        !self.journal_stuck() && !self.files_full.load(Ordering::Relaxed)
    }

    fn probe(&self) -> std::io::Result<()> {
        use std::io::Write as _;
        let mut file = tempfile::Builder::new().prefix(".probe").tempfile_in(&self.path)?;
        file.write_all(&[0u8; PROBE_BYTES])?;
        file.as_file().sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::space::{io_is_full, sqlite_is_full};

    #[test]
    fn full_is_told_by_kind_and_code_not_by_text() {
        assert!(io_is_full(&std::io::Error::from_raw_os_error(28)), "ENOSPC");
        assert!(io_is_full(&std::io::Error::from_raw_os_error(122)), "EDQUOT");
        assert!(!io_is_full(&std::io::Error::other("No space left on device")), "text alone is not a full disk");
        let full = rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(13), None);
        assert!(sqlite_is_full(&full));
        let busy =
            rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(5), Some("database or disk is full".into()));
        assert!(!sqlite_is_full(&busy));
    }

    #[test]
    fn a_full_error_names_the_free_bytes_and_marks_the_dir() {
        let dir = tempfile::tempdir().unwrap();
        let d = DataDir::new(dir.path(), Default::default());
        assert!(d.writable());
        let e = d.check(CoordinatorError::Io(std::io::Error::from_raw_os_error(28)));
        assert!(matches!(e, CoordinatorError::DataDirFull { .. }), "{e}");
        assert!(e.to_string().starts_with("coordinator data dir full ("), "{e}");
        assert!(!d.known_writable());
        // The next probe (a second later at most) finds room again.
        *d.last_probe.lock().unwrap() = None;
        assert!(d.writable());
        d.journal_failed();
        assert!(!d.writable(), "a stuck journal is not ready");
        d.journal_written();
        assert!(d.known_writable());
        assert_eq!(d.metrics.store_write_errors.load(Ordering::Relaxed), 2);
    }
}
