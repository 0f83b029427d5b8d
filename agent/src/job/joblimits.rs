//! Per-job limits (`--memory`, `--cpus`) and footprints: each job's builder
//! runs in a cgroup of its own under the agent's, made when the job starts
//! and removed when it ends; its peak memory, CPU time and OOM kills are
//! read from it. cgroup v2 (delegated to the agent, as systemd's
//! `Delegate=yes` does) enforces memory and CPU; on a v1 host the memory
//! controller only. With `isolation = "oci"`, buildah and podman are also
//! given their own `--memory`/`--cpus`, which their RUN containers get
//! (their runtime makes cgroups of its own). What is not enforced is said
//! in the job's log, never silently left out.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use braid_shared::placement::format_bytes;
use braid_shared::proto;

tokio::task_local! {
    /// The job's cgroup, for `process::run_logged` to put the builder in.
    pub(super) static CGROUP: Option<Arc<JobCgroup>>;
}

const V2_ROOT: &str = "/sys/fs/cgroup";
const V1_MEMORY: &str = "/sys/fs/cgroup/memory";
/// The leaf the agent moves itself into under cgroup v2, so its own
/// cgroup may hand controllers to the jobs' ("no internal processes").
const AGENT_LEAF: &str = "braid-agent";

/// One job's cgroup.
#[derive(Debug)]
pub(super) struct JobCgroup {
    dir: PathBuf,
    v2: bool,
    memory_limit: u64,
}

/// The job's cgroup (if one could be made) and what to say of the limits.
pub(super) fn start(name: &str, limits: Limits, isolation: &str, agent: &str) -> (Option<JobCgroup>, Vec<String>) {
    let Limits { memory, cpus, memory_from } = limits;
    let wanted = memory != 0 || cpus != 0;
    let mut say = Vec::new();
    let cgroup = match JobCgroup::create(name, memory, cpus) {
        Ok(c) => Some(c),
        Err(why) => {
            if wanted && isolation != "oci" {
                say.push(format!("braid: limits not enforced on agent {agent}: {why}"));
            }
            tracing::debug!(%why, "no job cgroup: no footprint measured");
            None
        }
    };
    if !wanted {
        return (cgroup, say);
    }
    let oci = isolation == "oci";
    let v1 = cgroup.as_ref().is_some_and(|c| !c.v2);
    let mut by = Vec::new();
    if oci {
        by.push("the builder's own --memory/--cpus (isolation oci)".to_owned());
    }
    if let Some(c) = &cgroup {
        by.push(if c.v2 { "a cgroup v2".to_owned() } else { "a cgroup v1 (memory only)".to_owned() });
    }
    // What is enforced: on a v1 host without oci, memory only.
    let cpus_enforced = cpus != 0 && (oci || (cgroup.is_some() && !v1));
    if cpus != 0 && !cpus_enforced && cgroup.is_some() {
        say.push(format!("braid: --cpus not enforced on agent {agent}: cgroup v1 hosts limit memory only"));
    }
    let mut what = Vec::new();
    if memory != 0 {
        what.push(format!("{memory_from} {}", format_bytes(memory)));
    }
    if cpus_enforced {
        what.push(format!("--cpus {}", f64::from(cpus) / 1000.0));
    }
    if !by.is_empty() && !what.is_empty() {
        say.push(format!("braid: limits {} on agent {agent}, enforced by {}", what.join(" "), by.join(" and ")));
    }
    (cgroup, say)
}

/// A job's limits: the build's `--memory` (else the agent's declared
/// memory) and `--cpus`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub memory: u64,
    pub cpus: u32,
    /// Where the memory limit comes from, as the job's log names it.
    pub memory_from: &'static str,
}

impl Limits {
    pub(super) fn of(spec: &proto::BuildSpec, memory_cap: u64) -> Limits {
        let (memory, memory_from) = if spec.memory_limit_bytes != 0 {
            (spec.memory_limit_bytes, "--memory")
        } else {
            (memory_cap, "memory (the agent's memory label)")
        };
        Limits { memory, cpus: spec.cpu_millis, memory_from }
    }
}

/// buildah's and podman's `--memory`/`--cpus`, for RUN containers under
/// `isolation = "oci"` (with chroot isolation they do not apply).
pub(super) fn builder_flags(cmd: &mut tokio::process::Command, limits: Limits, isolation: &str) {
    if isolation != "oci" {
        return;
    }
    if limits.memory != 0 {
        cmd.arg("--memory").arg(format!("{}b", limits.memory));
    }
    if limits.cpus != 0 {
        cmd.arg("--cpus").arg(format!("{:.3}", f64::from(limits.cpus) / 1000.0));
    }
}

/// The agent's own cgroup directory: v2 (unified) or v1's memory one.
fn own_cgroup() -> Result<(PathBuf, bool), String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| format!("/proc/self/cgroup: {e}"))?;
    let v2 = Path::new(V2_ROOT).join("cgroup.controllers").exists();
    let (mount, wanted) = if v2 { (V2_ROOT, "") } else { (V1_MEMORY, "memory") };
    let path = text
        .lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            parts.next();
            parts.next().zip(parts.next())
        })
        .find(|(ctl, _)| if v2 { ctl.is_empty() } else { ctl.split(',').any(|c| c == wanted) })
        .map(|(_, p)| p.trim_start_matches('/').to_owned())
        .ok_or_else(|| "no memory cgroup".to_owned())?;
    let mut dir = Path::new(mount).join(&path);
    if !dir.exists() {
        // The hierarchy is mounted at this process's own cgroup (a container).
        dir = PathBuf::from(mount);
    }
    if v2 && dir.file_name().is_some_and(|n| n == AGENT_LEAF) {
        dir.pop();
    }
    Ok((dir, v2))
}

/// Under cgroup v2, hands the memory and cpu controllers to the agent's
/// children, first moving its own processes into a leaf.
fn delegate_v2(own: &Path) -> Result<(), String> {
    let control = std::fs::read_to_string(own.join("cgroup.subtree_control")).unwrap_or_default();
    if control.contains("memory") && control.contains("cpu") {
        return Ok(());
    }
    let leaf = own.join(AGENT_LEAF);
    std::fs::create_dir_all(&leaf).map_err(|e| format!("{}: {e}", leaf.display()))?;
    let procs = std::fs::read_to_string(own.join("cgroup.procs")).unwrap_or_default();
    for pid in procs.lines() {
        // A process that ended meanwhile is not an error.
        let _ = std::fs::write(leaf.join("cgroup.procs"), pid);
    }
    std::fs::write(own.join("cgroup.subtree_control"), "+memory +cpu")
        .map_err(|e| format!("enabling memory and cpu controllers in {}: {e}", own.display()))
}

/// Removes the empty `braid-job-*` cgroups under the agent's own (an
/// earlier run that stopped mid-job); a busy one is left alone.
pub(super) fn sweep() {
    let Ok((own, _)) = own_cgroup() else { return };
    let Ok(entries) = std::fs::read_dir(&own) else { return };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with("braid-job-") && std::fs::remove_dir(e.path()).is_ok() {
            tracing::info!(cgroup = %e.path().display(), "removed a job cgroup an earlier run left");
        }
    }
}

impl JobCgroup {
    fn create(name: &str, memory: u64, cpus: u32) -> Result<JobCgroup, String> {
        let (own, v2) = own_cgroup()?;
        if v2 {
            delegate_v2(&own)?;
        }
        let dir = own.join(format!("braid-job-{name}"));
        std::fs::create_dir(&dir).map_err(|e| format!("making {}: {e}", dir.display()))?;
        let cgroup = JobCgroup { dir, v2, memory_limit: memory };
        let write = |file: &str, value: String| {
            std::fs::write(cgroup.dir.join(file), value).map_err(|e| format!("{file}: {e}"))
        };
        if memory != 0 {
            if v2 {
                write("memory.max", memory.to_string())?;
                write("memory.swap.max", "0".into()).ok();
            } else {
                write("memory.limit_in_bytes", memory.to_string())?;
                write("memory.memsw.limit_in_bytes", memory.to_string()).ok();
            }
        }
        if cpus != 0 && v2 {
            write("cpu.max", format!("{} 100000", u64::from(cpus) * 100))?;
        }
        Ok(cgroup)
    }

    /// Puts a process (the builder, before it starts RUN steps) in it.
    pub(super) fn add(&self, pid: u32) {
        if let Err(e) = std::fs::write(self.dir.join("cgroup.procs"), pid.to_string()) {
            tracing::warn!(error = %e, "could not put the builder in the job's cgroup");
        }
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.join(file)).unwrap_or_default()
    }

    fn field(&self, file: &str, key: &str) -> u64 {
        self.read(file)
            .lines()
            .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// What the job used so far.
    pub(super) fn footprint(&self) -> proto::JobFootprint {
        let number = |file: &str| self.read(file).trim().parse::<u64>().unwrap_or(0);
        let (peak, cpu_millis, oom) = if self.v2 {
            (
                number("memory.peak"),
                self.field("cpu.stat", "usage_usec") / 1000,
                self.field("memory.events", "oom_kill"),
            )
        } else {
            let peak = number("memory.max_usage_in_bytes");
            // Kernels before 4.13 count no OOM kills: the limit was hit
            // and the peak reached it.
            let oom = if self.read("memory.oom_control").contains("oom_kill ") {
                self.field("memory.oom_control", "oom_kill")
            } else {
                u64::from(
                    self.memory_limit != 0 && number("memory.failcnt") > 0 && peak >= self.memory_limit / 100 * 95,
                )
            };
            (peak, 0, oom)
        };
        proto::JobFootprint {
            peak_memory_bytes: peak,
            cpu_millis,
            out_of_memory: oom > 0,
            memory_limit_bytes: self.memory_limit,
            agent: String::new(),
        }
    }
}

impl Drop for JobCgroup {
    fn drop(&mut self) {
        // Anything left in it (a builder that outlived its job) is killed
        // with the job's process group; a busy cgroup is left to the next
        // start's sweep rather than waited for here.
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            tracing::debug!(error = %e, dir = %self.dir.display(), "job cgroup not removed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs a cgroup the test may write (root in a container, or a
    /// delegated v2 subtree): the footprint and the OOM kill are the
    /// kernel's.
    #[test]
    fn a_process_over_the_limit_is_oom_killed_and_measured() {
        let limits = Limits { memory: 64 << 20, cpus: 0, memory_from: "--memory" };
        let (cgroup, said) = start("unit-test-oom", limits, "chroot", "a1");
        let cgroup = cgroup.unwrap_or_else(|| panic!("no cgroup on this host: {said:?}"));
        assert!(said[0].contains("--memory 64.0 MiB"), "{said:?}");
        let mut child = std::process::Command::new("sh")
            .args(["-c", "read x < /dev/stdin; head -c 200m /dev/zero | tail > /dev/null"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        cgroup.add(child.id());
        drop(child.stdin.take());
        let status = child.wait().unwrap();
        assert!(!status.success());
        let f = cgroup.footprint();
        assert!(f.out_of_memory, "{f:?}");
        assert!(f.peak_memory_bytes > 32 << 20 && f.peak_memory_bytes <= 64 << 20, "{f:?}");
    }
}
