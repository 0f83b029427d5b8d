//! Keeps the builder storage (buildah's and podman's layer cache, one
//! storage per platform) within `builder_cache_bytes`: after a job, while
//! it is over, the least recently used platform's storage is cleared,
//! never one a job is using. A Docker Engine's images are the Engine's own,
//! shared with whatever else runs there, and left to its own tools.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::RwLock;

use braid_shared::Platform;

use crate::settings::Valid;

/// File touched when a job starts on a storage; its age orders eviction.
const LAST_USED: &str = "last-used";

/// One lock per platform storage: jobs share it, clearing takes it alone.
#[derive(Default)]
pub struct StorageLocks {
    locks: Mutex<HashMap<String, Arc<RwLock<()>>>>,
}

impl StorageLocks {
    pub fn for_storage(&self, name: &str) -> Arc<RwLock<()>> {
        // The map only gains entries; it is whole after any panic.
        let mut locks = self.locks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        locks.entry(name.to_owned()).or_default().clone()
    }
}

/// The directory name of a platform's storage, e.g. `linux-arm-v7`.
pub fn storage_name(platform: &Platform) -> String {
    platform.to_string().replace('/', "-")
}

pub fn storage_dir(work_dir: &Path, platform: &Platform) -> PathBuf {
    work_dir.join("storage").join(storage_name(platform))
}

/// A short run directory for a storage root: podman refuses a runroot
/// longer than 50 characters, and work directories are often deeper.
pub fn runroot(storage: &Path) -> PathBuf {
    let digest = braid_shared::Digest::of(storage.as_os_str().as_encoded_bytes());
    std::env::temp_dir().join("braid-run").join(&digest.hex()[..16])
}

/// Marks a platform's storage as used now.
pub fn touch(storage: &Path) {
    let _ = std::fs::create_dir_all(storage);
    let _ = std::fs::File::create(storage.join(LAST_USED));
}

/// Bytes on disk under `dir` (links not followed, blocks actually used).
pub fn disk_usage(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for entry in entries.flatten() {
            let Ok(meta) = entry.path().symlink_metadata() else { continue };
            total += meta.blocks() * 512;
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    total
}

/// Bytes of every platform storage under `work_dir` (walks them all: call
/// it seldom, off the async threads).
pub fn storage_bytes(work_dir: &Path) -> u64 {
    disk_usage(&work_dir.join("storage"))
}

pub struct Stored {
    pub name: String,
    pub dir: PathBuf,
    pub bytes: u64,
    pub last_used: SystemTime,
}

/// The platform storages under `root`, least recently used first.
pub fn storages(root: &Path) -> Vec<Stored> {
    let Ok(entries) = std::fs::read_dir(root) else { return Vec::new() };
    let mut out: Vec<Stored> = entries
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| {
            let dir = e.path();
            let last_used = std::fs::metadata(dir.join(LAST_USED))
                .or_else(|_| std::fs::metadata(&dir))
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            Stored { name: e.file_name().to_string_lossy().into_owned(), bytes: disk_usage(&dir), dir, last_used }
        })
        .collect();
    out.sort_by_key(|s| s.last_used);
    out
}

/// Clears least recently used storages until the total fits `limit`;
/// returns the names cleared.
pub async fn enforce(settings: &Valid, locks: &StorageLocks) -> Vec<String> {
    if settings.backend == "docker" {
        return Vec::new();
    }
    let root = settings.settings.work_dir.join("storage");
    let limit = settings.settings.builder_cache_bytes;
    let found = {
        let root = root.clone();
        tokio::task::spawn_blocking(move || storages(&root)).await.unwrap_or_default()
    };
    let mut total: u64 = found.iter().map(|s| s.bytes).sum();
    let mut cleared = Vec::new();
    for stored in found {
        if total <= limit {
            break;
        }
        let lock = locks.for_storage(&stored.name);
        let Ok(_alone) = lock.try_write() else { continue };
        let removed = clear(settings, &stored.dir).await;
        match removed {
            Ok(()) => {
                total = total.saturating_sub(stored.bytes);
                tracing::info!(storage = %stored.name, bytes = stored.bytes, limit, "builder cache cleared");
                cleared.push(stored.name);
            }
            Err(e) => tracing::warn!(storage = %stored.name, error = %e, "clearing the builder cache failed"),
        }
    }
    cleared
}

/// The builder's command on one platform storage: `backend --root ...
/// --runroot ... --storage-driver ... ARGS`.
pub fn storage_command(settings: &Valid, dir: &Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(&settings.backend);
    cmd.arg("--root")
        .arg(dir.join("root"))
        .arg("--runroot")
        .arg(runroot(dir))
        .arg("--storage-driver")
        .arg(&settings.settings.storage_driver);
    cmd
}

/// Clears one platform storage: unmounts and forgets what the builder
/// holds there, then removes the files. The caller holds its lock alone.
pub async fn clear(settings: &Valid, dir: &Path) -> std::io::Result<()> {
    let rmi = storage_command(settings, dir).args(["rmi", "--all", "--force"]).output().await;
    if let Ok(out) = &rmi
        && !out.status.success()
    {
        tracing::debug!(storage = %dir.display(), stderr = %String::from_utf8_lossy(&out.stderr).trim(), "rmi");
    }
    let removed = tokio::fs::remove_dir_all(dir).await;
    let _ = tokio::fs::remove_dir_all(runroot(dir)).await;
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storages_come_least_recently_used_first_with_their_size() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for (name, bytes) in [("linux-arm64", 10_000usize), ("linux-amd64", 50_000)] {
            let d = root.join(name);
            std::fs::create_dir_all(d.join("root/overlay")).unwrap();
            std::fs::write(d.join("root/overlay/layer"), vec![1u8; bytes]).unwrap();
            touch(&d);
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let found = storages(root);
        let names: Vec<&str> = found.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["linux-arm64", "linux-amd64"]);
        assert!(
            found[0].bytes >= 10_000 && found[1].bytes >= 50_000,
            "{:?}",
            found.iter().map(|s| s.bytes).collect::<Vec<_>>()
        );
    }

    #[test]
    fn storage_names_are_one_path_component() {
        assert_eq!(storage_name(&"linux/arm/v7".parse().unwrap()), "linux-arm-v7");
    }
}
