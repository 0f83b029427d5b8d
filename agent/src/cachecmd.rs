//! The agent's side of `braid cache du` and `braid cache prune`: measures
//! its builder storages (one per platform for buildah and podman) and
//! clears them as asked, never one a running job holds (its storage lock,
//! see `prune::StorageLocks`): that storage is reported with the jobs using
//! it and left alone. The docker backend's images and BuildKit cache are
//! the Engine's: not measured, and pruned (`/build/prune`, `/images/prune`)
//! only while no job of this agent runs there.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use braid_shared::proto;

use crate::prune::{self, StorageLocks, Stored};
use crate::settings::Valid;

fn unix(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Answers a `CacheCommand`. `users` maps a storage name to the jobs
/// running on it now.
pub async fn answer(
    settings: &Valid,
    locks: &StorageLocks,
    command: proto::CacheCommand,
    users: BTreeMap<String, Vec<String>>,
) -> proto::CacheReport {
    let mut report = if settings.backend == "docker" {
        docker(settings, command, users).await
    } else {
        storages(settings, locks, command, users).await
    };
    report.request_id = command.request_id;
    report.backend = settings.backend.clone();
    report
}

async fn measure(dir: std::path::PathBuf) -> u64 {
    tokio::task::spawn_blocking(move || prune::disk_usage(&dir)).await.unwrap_or(0)
}

/// Which storages a prune clears whole: with `keep_storage_bytes`, the
/// least recently used until the rest fits; with `all`, every one old
/// enough; otherwise none (only their unused images go).
fn to_clear(found: &[Stored], command: &proto::CacheCommand, now: SystemTime) -> Vec<String> {
    let old_enough = |s: &Stored| {
        now.duration_since(s.last_used).unwrap_or(Duration::ZERO) >= Duration::from_secs(command.until_seconds)
    };
    if command.keep_storage_bytes > 0 {
        let mut total: u64 = found.iter().map(|s| s.bytes).sum();
        let mut out = Vec::new();
        for s in found.iter().filter(|s| old_enough(s)) {
            if total <= command.keep_storage_bytes {
                break;
            }
            total = total.saturating_sub(s.bytes);
            out.push(s.name.clone());
        }
        return out;
    }
    if command.all { found.iter().filter(|s| old_enough(s)).map(|s| s.name.clone()).collect() } else { Vec::new() }
}

async fn storages(
    settings: &Valid,
    locks: &StorageLocks,
    command: proto::CacheCommand,
    users: BTreeMap<String, Vec<String>>,
) -> proto::CacheReport {
    let root = settings.settings.work_dir.join("storage");
    let found = tokio::task::spawn_blocking(move || prune::storages(&root)).await.unwrap_or_default();
    let now = SystemTime::now();
    let clear: Vec<String> = if command.prune { to_clear(&found, &command, now) } else { Vec::new() };
    let mut report = proto::CacheReport::default();
    let mut errors = Vec::new();
    for s in found {
        let mut entry = proto::CacheEntry {
            name: s.name.clone(),
            bytes: s.bytes,
            last_used: unix(s.last_used),
            in_use_by: users.get(&s.name).cloned().unwrap_or_default(),
            pruned: false,
        };
        let old_enough =
            now.duration_since(s.last_used).unwrap_or(Duration::ZERO) >= Duration::from_secs(command.until_seconds);
        let whole = clear.contains(&s.name);
        let dangling = command.prune && !command.all && command.keep_storage_bytes == 0;
        if whole || (dangling && old_enough) {
            let lock = locks.for_storage(&s.name);
            match lock.try_write() {
                Err(_) => {
                    if entry.in_use_by.is_empty() {
                        entry.in_use_by.push("(a job starting or finishing)".into());
                    }
                }
                Ok(_alone) => {
                    let result =
                        if whole { prune::clear(settings, &s.dir).await } else { prune_images(settings, &s.dir).await };
                    match result {
                        Ok(()) => {
                            let after = if whole { 0 } else { measure(s.dir.clone()).await };
                            report.reclaimed_bytes += s.bytes.saturating_sub(after);
                            entry.bytes = after;
                            entry.pruned = true;
                            tracing::info!(storage = %s.name, freed = s.bytes.saturating_sub(after), whole, "builder cache pruned");
                        }
                        Err(e) => errors.push(format!("{}: {e}", s.name)),
                    }
                }
            }
        }
        report.entries.push(entry);
    }
    report.error = errors.join("; ");
    report
}

/// Removes a storage's dangling images (`buildah rmi --prune`, `podman
/// image prune --force`).
async fn prune_images(settings: &Valid, dir: &std::path::Path) -> std::io::Result<()> {
    let args: &[&str] = if settings.backend == "podman" { &["image", "prune", "--force"] } else { &["rmi", "--prune"] };
    let out = prune::storage_command(settings, dir).args(args).output().await?;
    if out.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(std::io::Error::other(format!("{} {}: {}", settings.backend, args.join(" "), stderr.trim())))
    }
}

async fn docker(
    settings: &Valid,
    command: proto::CacheCommand,
    users: BTreeMap<String, Vec<String>>,
) -> proto::CacheReport {
    let mut report = proto::CacheReport { unknown: true, ..Default::default() };
    if !command.prune {
        return report;
    }
    if command.keep_storage_bytes > 0 {
        report.error =
            "keep_storage_bytes: the docker backend's images are the Engine's own; prune them with --all or --filter until"
                .into();
        return report;
    }
    let busy: Vec<String> = users.into_values().flatten().collect();
    if !busy.is_empty() {
        report.error =
            format!("the Docker Engine is building this agent's jobs {}: prune when they end", busy.join(", "));
        return report;
    }
    let docker = match crate::docker::connect(&settings.docker_host).await {
        Ok(d) => d,
        Err(e) => {
            report.error = e.to_string();
            return report;
        }
    };
    let mut filters = HashMap::new();
    if command.until_seconds > 0 {
        filters.insert("until".to_owned(), vec![format!("{}s", command.until_seconds)]);
    }
    // BuildKit's cache (what the Engine's BuildKit builds keep), then images.
    let build = bollard::query_parameters::PruneBuildOptions {
        all: Some(command.all),
        filters: Some(filters.clone()),
        ..Default::default()
    };
    match docker.prune_build(Some(build)).await {
        Ok(r) => {
            report.reclaimed_bytes += r.space_reclaimed.unwrap_or(0).max(0) as u64;
            report.entries.push(proto::CacheEntry {
                name: "docker build cache".into(),
                pruned: true,
                ..Default::default()
            });
        }
        Err(e) => {
            report.error = format!("Docker Engine build cache prune: {e}");
            return report;
        }
    }
    filters.insert("dangling".to_owned(), vec![(!command.all).to_string()]);
    let options = bollard::query_parameters::PruneImagesOptions { filters: Some(filters) };
    match docker.prune_images(Some(options)).await {
        Ok(r) => {
            report.reclaimed_bytes += r.space_reclaimed.unwrap_or(0).max(0) as u64;
            report.entries.push(proto::CacheEntry { name: "docker images".into(), pruned: true, ..Default::default() });
        }
        Err(e) => report.error = format!("Docker Engine image prune: {e}"),
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(name: &str, bytes: u64, age_secs: u64, now: SystemTime) -> Stored {
        Stored { name: name.into(), dir: name.into(), bytes, last_used: now - Duration::from_secs(age_secs) }
    }

    #[test]
    fn keep_storage_clears_least_recently_used_until_the_rest_fits() {
        let now = SystemTime::now();
        // Least recently used first, as prune::storages orders them.
        let found = [stored("old", 300, 7200, now), stored("mid", 200, 3600, now), stored("new", 100, 10, now)];
        let cmd = |keep, all, until| proto::CacheCommand {
            prune: true,
            keep_storage_bytes: keep,
            all,
            until_seconds: until,
            ..Default::default()
        };
        assert_eq!(to_clear(&found, &cmd(300, false, 0), now), ["old"]);
        assert_eq!(to_clear(&found, &cmd(299, false, 0), now), ["old", "mid"]);
        assert_eq!(to_clear(&found, &cmd(600, false, 0), now), Vec::<String>::new());
        assert_eq!(to_clear(&found, &cmd(0, true, 0), now), ["old", "mid", "new"]);
        assert_eq!(to_clear(&found, &cmd(0, true, 3000), now), ["old", "mid"]);
        // Too young to go, even to reach the target.
        assert_eq!(to_clear(&found, &cmd(1, false, 5000), now), ["old"]);
        assert!(to_clear(&found, &cmd(0, false, 0), now).is_empty());
    }
}
