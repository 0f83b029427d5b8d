//! What a killed agent leaves behind.
//!
//! At start, before any job runs, the agent sweeps what a killed agent left:
//! builders still running on its storage, mounts under its job directories
//! and builder storage, the job directories and the secrets directory.

use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

/// Clears what a killed agent with this work directory left behind. Runs
/// at start, before any job: nothing of this agent runs yet.
pub fn sweep(given: &Path, secrets: &Path) {
    let work_dir = std::fs::canonicalize(given).unwrap_or_else(|_| given.to_owned());
    let storages = storage_dirs(&work_dir);
    // Builders were given the storage path as the agent was (maybe relative).
    let named: Vec<PathBuf> = storage_dirs(given).into_iter().chain(storages.iter().cloned()).collect();
    kill_builders(&named);
    let runroots: Vec<PathBuf> = named.iter().map(|s| crate::prune::runroot(s)).collect();
    unmount_leftovers(&work_dir, &runroots);
    for dir in [work_dir.join("jobs"), secrets.to_owned()] {
        if let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %dir.display(), error = %e, "cannot clear what a stopped agent left");
        }
    }
    if let Some(parent) = secrets.parent()
        && let Err(e) = crate::secrets::private_dir(parent).and_then(|()| crate::secrets::private_dir(secrets))
    {
        tracing::warn!(path = %secrets.display(), error = %e, "cannot make the secrets directory");
    }
}

/// The builder storage directories (one per platform) under `work_dir`.
fn storage_dirs(work_dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(work_dir.join("storage")) else { return Vec::new() };
    entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()).collect()
}

/// Kills builders a killed agent started on these storages (their own
/// process groups outlive the agent), found by the storage root on their
/// command line, and waits a little for them to go.
fn kill_builders(storages: &[PathBuf]) {
    use nix::sys::signal::{Signal, kill, killpg};
    use nix::unistd::{Pid, getpgid};
    let roots: Vec<std::ffi::OsString> = storages.iter().map(|s| s.join("root").into_os_string()).collect();
    if roots.is_empty() {
        return;
    }
    let me = std::process::id();
    let mut killed = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        if pid as u32 == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let ours = cmdline.split(|&b| b == 0).any(|arg| roots.iter().any(|r| r.as_encoded_bytes() == arg));
        if !ours {
            continue;
        }
        let pid = Pid::from_raw(pid);
        // The agent starts each builder as the leader of its own group.
        if getpgid(Some(pid)).is_ok_and(|g| g == pid) {
            let _ = killpg(pid, Signal::SIGKILL);
        }
        let _ = kill(pid, Signal::SIGKILL);
        tracing::warn!(pid = pid.as_raw(), "killed a builder a stopped agent left running");
        killed.push(entry.path());
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while killed.iter().any(|p| p.exists()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Lazily unmounts every mount a builder or job may have left: below
/// `WORK_DIR/jobs`, inside a platform's storage (`WORK_DIR/storage/P/...`,
/// not the storage directories themselves, which an operator may mount), and
/// below the storages' run directories. Deepest first; a few passes for
/// mounts stacked on one another.
fn unmount_leftovers(work_dir: &Path, runroots: &[PathBuf]) {
    for _ in 0..8 {
        let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else { return };
        let mut leftovers: Vec<PathBuf> =
            mount_points(&table).into_iter().filter(|m| is_leftover(m, work_dir, runroots)).collect();
        if leftovers.is_empty() {
            return;
        }
        leftovers.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
        leftovers.dedup();
        for mount in &leftovers {
            match nix::mount::umount2(mount, nix::mount::MntFlags::MNT_DETACH) {
                Ok(()) => tracing::info!(mount = %mount.display(), "unmounted what a stopped agent left"),
                Err(e) => tracing::warn!(mount = %mount.display(), error = %e, "cannot unmount a leftover mount"),
            }
        }
    }
}

fn is_leftover(mount: &Path, work_dir: &Path, runroots: &[PathBuf]) -> bool {
    let below = |dir: &Path, depth: usize| {
        mount
            .strip_prefix(dir)
            .is_ok_and(|rest| rest.components().filter(|c| matches!(c, Component::Normal(_))).count() >= depth)
    };
    below(&work_dir.join("jobs"), 1) || below(&work_dir.join("storage"), 2) || runroots.iter().any(|r| below(r, 1))
}

/// The mount points in a `/proc/self/mountinfo` table (its fifth field,
/// with the kernel's octal escapes for space, tab, newline, backslash).
fn mount_points(table: &str) -> Vec<PathBuf> {
    table.lines().filter_map(|line| line.split(' ').nth(4)).map(unescape).collect()
}

fn unescape(field: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt as _;
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(code) = bytes.get(i + 1..i + 4).and_then(|o| std::str::from_utf8(o).ok())
            && let Ok(b) = u8::from_str_radix(code, 8)
        {
            out.push(b);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn mount_points_are_unescaped() {
        let table = "36 35 98:0 / /mnt/a\\040b rw - ext3 /dev/root rw\n37 35 0:5 / /proc rw - proc proc rw\n";
        assert_eq!(mount_points(table), vec![PathBuf::from("/mnt/a b"), PathBuf::from("/proc")]);
    }

    #[test]
    fn only_what_jobs_and_builders_mount_is_a_leftover() {
        let work = Path::new("/srv/agent");
        let runroots = [PathBuf::from("/tmp/braid-run/abc")];
        let leftover = |m: &str| is_leftover(Path::new(m), work, &runroots);
        assert!(leftover("/srv/agent/jobs/j-1/context"));
        assert!(leftover("/srv/agent/storage/linux-amd64/root/overlay/x/merged"));
        assert!(leftover("/tmp/braid-run/abc/overlay-containers/x/userdata/shm"));
        // The operator's own mounts: the work dir, its storage, a storage.
        assert!(!leftover("/srv/agent"));
        assert!(!leftover("/srv/agent/storage"));
        assert!(!leftover("/srv/agent/storage/linux-amd64"));
        assert!(!leftover("/srv/agent/jobs"));
        assert!(!leftover("/srv/agent-2/jobs/j-1"));
        assert!(!leftover("/tmp/braid-run/abcd/x"));
    }
}
