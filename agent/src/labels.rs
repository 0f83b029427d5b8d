//! Labels the agent detects about its host: `memory` (total, MiB),
//! `cpus` (online), `disk` (`ssd` or `hdd` under the work directory, from
//! the block device's `queue/rotational`; absent where the device is not
//! a block device, e.g. an overlay or tmpfs), `kernel` (release),
//! `os-release` (`ID VERSION_ID`) and `model` (the device tree's board
//! model, where there is one). Anything not readable is left out; the
//! operator's `--label` of the same key wins.

use std::path::Path;

use braid_shared::placement::{self, Labels};

pub fn detect(work_dir: &Path) -> Labels {
    let mut labels = Labels::new();
    let mut put = |k: &str, v: Option<String>| {
        if let Some(v) = v.map(|v| v.trim().to_owned())
            && placement::check_value(k, &v).is_ok()
        {
            labels.insert(k.to_owned(), v);
        }
    };
    put(placement::MEMORY, memory_mib().map(|m| format!("{m}MiB")));
    put(placement::CPUS, std::thread::available_parallelism().ok().map(|n| n.to_string()));
    put(placement::DISK, disk_kind(work_dir));
    put(placement::KERNEL, std::fs::read_to_string("/proc/sys/kernel/osrelease").ok());
    put(placement::OS_RELEASE, std::fs::read_to_string("/etc/os-release").ok().and_then(|t| os_release(&t)));
    let model = ["/proc/device-tree/model", "/sys/firmware/devicetree/base/model"]
        .iter()
        .find_map(|p| std::fs::read(p).ok())
        .map(|b| String::from_utf8_lossy(&b).trim_end_matches('\0').to_owned());
    put(placement::MODEL, model);
    labels
}

/// MemTotal from /proc/meminfo, in MiB.
fn memory_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// `ID VERSION_ID` of an os-release file (`debian 12`); ID alone without
/// a version (rolling distributions).
fn os_release(text: &str) -> Option<String> {
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
            .map(|v| v.trim().trim_matches('"').to_owned())
    };
    let id = field("ID")?;
    Some(match field("VERSION_ID") {
        Some(v) => format!("{id} {v}"),
        None => id,
    })
}

/// `ssd` or `hdd` for the block device holding `dir` (a partition's
/// rotational flag is its disk's).
fn disk_kind(dir: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let dir = if dir.exists() { dir.to_path_buf() } else { dir.parent()?.to_path_buf() };
    let dev = std::fs::metadata(if dir.as_os_str().is_empty() { Path::new(".") } else { &dir }).ok()?.dev();
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    if major == 0 {
        return None;
    }
    let base = format!("/sys/dev/block/{major}:{minor}");
    let flag = std::fs::read_to_string(format!("{base}/queue/rotational"))
        .or_else(|_| std::fs::read_to_string(format!("{base}/../queue/rotational")))
        .ok()?;
    match flag.trim() {
        "0" => Some("ssd".into()),
        "1" => Some("hdd".into()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_what_the_host_has_and_parses_os_release() {
        let labels = detect(Path::new("."));
        assert!(braid_shared::size::parse_ram(&labels["memory"]).is_some_and(|b| b > 0), "{labels:?}");
        assert!(labels["cpus"].parse::<u32>().is_ok_and(|n| n > 0));
        assert!(!labels["kernel"].is_empty());
        assert_eq!(os_release("NAME=\"Debian\"\nID=debian\nVERSION_ID=\"12\"\n").as_deref(), Some("debian 12"));
        assert_eq!(os_release("ID=arch\n").as_deref(), Some("arch"));
        assert_eq!(os_release("NAME=x\n"), None);
    }
}
