//! Where a job's secrets live on the agent.
//!
//! Registry logins (`auth.json`) and the build's `--secret` values (each in
//! a 0600 file of its own, `secret-N`) go to a per-job directory on a tmpfs
//! (`$XDG_RUNTIME_DIR`, `/run` or `/dev/shm`, the first that is one), under a
//! directory of this agent's own named after its work directory, so two
//! agents on a host never sweep each other's. A crash leaves them in memory,
//! never on disk, and a reboot clears them; the next start removes them.

use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

/// Directory names under the tmpfs and under the work directory.
const SECRETS: &str = "braid-agent-secrets";

/// The secrets directory of the agent whose work directory is `work_dir`:
/// on the first tmpfs of the candidates that this user may own, else (no
/// tmpfs) `WORK_DIR/secrets`, on disk, swept at start like the rest.
pub fn secrets_root(work_dir: &Path) -> PathBuf {
    let work_dir = std::path::absolute(work_dir).unwrap_or_else(|_| work_dir.to_owned());
    let digest = braid_shared::Digest::of(work_dir.as_os_str().as_encoded_bytes());
    let name = &digest.hex()[..16];
    let candidates = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .into_iter()
        .chain([PathBuf::from("/run"), PathBuf::from("/dev/shm")]);
    for base in candidates {
        if is_tmpfs(&base) && private_dir(&base.join(SECRETS)).is_ok() {
            return base.join(SECRETS).join(name);
        }
    }
    work_dir.join("secrets")
}

/// Whether secrets under `root` stay off disk.
pub fn in_memory(root: &Path) -> bool {
    root.parent().is_some_and(is_tmpfs)
}

fn is_tmpfs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
}

/// Makes `path` a directory only this user can enter (0700), or checks
/// that it is one: a directory someone else made (in a world-writable
/// /dev/shm) or a link is refused.
pub fn private_dir(path: &Path) -> std::io::Result<()> {
    match std::fs::DirBuilder::new().mode(0o700).create(path) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    let meta = std::fs::symlink_metadata(path)?;
    if !meta.is_dir() || meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("{} is not a directory of this user", path.display()),
        ));
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Writes a build's `--secret` values into the job's secrets directory,
/// each new (`O_EXCL`, no link followed) and 0600 in a file named by its
/// position, not its id. Returns each id with its file. Synchronous: no
/// await between writing and using them.
pub fn write_build_secrets(
    dir: &Path,
    secrets: &[braid_shared::proto::SecretValue],
) -> Result<Vec<(String, PathBuf)>, String> {
    let mut files = Vec::with_capacity(secrets.len());
    for (i, s) in secrets.iter().enumerate() {
        braid_shared::secrets::check_id(&s.id).map_err(|e| e.to_string())?;
        let file = dir.join(format!("secret-{i}"));
        braid_shared::beneath::create_new_file(&file, &s.value, 0o600)
            .map_err(|e| format!("writing --secret id={} into {}: {e}", s.id, dir.display()))?;
        files.push((s.id.clone(), file));
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_private_dir_is_made_0700_and_a_link_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("s");
        private_dir(&dir).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&dir).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700, "widened modes are narrowed");
        let link = tmp.path().join("l");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(private_dir(&link).is_err());
    }

    #[test]
    fn build_secrets_are_written_0600_one_file_each() {
        let tmp = tempfile::tempdir().unwrap();
        let v = |id: &str, value: &[u8]| braid_shared::proto::SecretValue { id: id.into(), value: value.to_vec() };
        let files = write_build_secrets(tmp.path(), &[v("tok", b"abc"), v("npmrc", b"")]).unwrap();
        assert_eq!(files.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(), ["tok", "npmrc"]);
        assert_eq!(std::fs::read(&files[0].1).unwrap(), b"abc");
        assert_eq!(std::fs::metadata(&files[1].1).unwrap().mode() & 0o777, 0o600);
        let e = write_build_secrets(tmp.path(), &[v("tok", b"again")]).unwrap_err();
        assert!(e.contains("id=tok") && !e.contains("again"), "{e}");
        assert!(write_build_secrets(tmp.path(), &[v("../x", b"")]).is_err());
    }

    #[test]
    fn two_work_dirs_get_two_secrets_dirs() {
        let a = secrets_root(Path::new("/srv/a"));
        let b = secrets_root(Path::new("/srv/b"));
        assert_ne!(a, b);
    }
}
