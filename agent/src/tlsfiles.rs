//! The agent's key and certificate files, replaced together: both are
//! written beside the old ones (`*.new`), a marker says they are complete,
//! then each is renamed over its old file. A crash in between is finished at
//! the next start (`finish_pending`): with the marker both are installed,
//! without it the half-written files are dropped.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

const CERT: &str = "agent.pem";
const KEY: &str = "agent-key.pem";
const READY: &str = "renew.ready";

/// A file that could not be written, renamed or synced.
#[derive(Debug, thiserror::Error)]
#[error("{0}: {1}")]
pub struct FilesError(String, std::io::Error);

fn io(what: &Path) -> impl FnOnce(std::io::Error) -> FilesError + '_ {
    move |e| FilesError(what.display().to_string(), e)
}

fn new_name(file: &str) -> String {
    format!("{file}.new")
}

/// Completes or undoes a replacement of the key and certificate in `dir`
/// that a crash interrupted.
pub fn finish_pending(dir: &Path) -> Result<(), FilesError> {
    let ready = dir.join(READY);
    if ready.exists() {
        for file in [KEY, CERT] {
            let pending = dir.join(new_name(file));
            if pending.exists() {
                std::fs::rename(&pending, dir.join(file)).map_err(io(&pending))?;
            }
        }
        std::fs::remove_file(&ready).map_err(io(&ready))?;
    } else {
        for file in [KEY, CERT] {
            let _ = std::fs::remove_file(dir.join(new_name(file)));
        }
    }
    Ok(())
}

fn write_synced(path: &Path, contents: &[u8], mode: u32) -> Result<(), FilesError> {
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(io(path))?;
    file.write_all(contents).map_err(io(path))?;
    file.sync_all().map_err(io(path))
}

fn sync_dir(dir: &Path) -> Result<(), FilesError> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// Replaces the key and certificate in `dir` as one step (see the module).
pub fn install(dir: &Path, cert_pem: &str, key_pem: &str) -> Result<(), FilesError> {
    write_synced(&dir.join(new_name(KEY)), key_pem.as_bytes(), 0o600)?;
    write_synced(&dir.join(new_name(CERT)), cert_pem.as_bytes(), 0o644)?;
    write_synced(&dir.join(READY), b"", 0o600)?;
    sync_dir(dir)?;
    finish_pending(dir)?;
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn an_interrupted_install_is_finished_with_the_marker_and_undone_without() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join(CERT), "old cert").unwrap();
        std::fs::write(d.join(KEY), "old key").unwrap();

        // Crashed while writing the new files: no marker, the old pair stays.
        std::fs::write(d.join(new_name(KEY)), "half").unwrap();
        finish_pending(d).unwrap();
        assert_eq!(std::fs::read_to_string(d.join(KEY)).unwrap(), "old key");
        assert!(!d.join(new_name(KEY)).exists());

        // Crashed after the key was renamed: the marker finishes the cert too.
        std::fs::write(d.join(KEY), "new key").unwrap();
        std::fs::write(d.join(new_name(CERT)), "new cert").unwrap();
        std::fs::write(d.join(READY), "").unwrap();
        finish_pending(d).unwrap();
        assert_eq!(std::fs::read_to_string(d.join(CERT)).unwrap(), "new cert");
        assert!(!d.join(READY).exists());

        install(d, "third cert", "third key").unwrap();
        assert_eq!(std::fs::read_to_string(d.join(CERT)).unwrap(), "third cert");
        assert_eq!(std::fs::read_to_string(d.join(KEY)).unwrap(), "third key");
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(d.join(KEY)).unwrap().permissions().mode() & 0o777, 0o600);
        let left: Vec<_> = std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left.len(), 2, "{left:?}");
    }
}
