//! `docker buildx build`'s run-time flags (`--network`, `--add-host`,
//! `--ulimit`, `--shm-size`), parsed and checked the same way by the CLI
//! (before upload) and the coordinator (every submitted spec).

use std::net::IpAddr;

use crate::{limits, proto};

/// Why a flag's value is refused; the message names the flag and quotes the value.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FlagError(String);

impl FlagError {
    /// A refusal with this message (it names the flag).
    pub fn new(message: String) -> FlagError {
        FlagError(message)
    }
}

fn refuse(message: String) -> FlagError {
    FlagError(message)
}

/// `--network` values buildx accepts; "" is the default.
pub const NETWORKS: [&str; 3] = ["default", "none", "host"];

/// `--network`: `default`, `none` or `host`, as buildx.
pub fn check_network(mode: &str) -> Result<(), FlagError> {
    if mode.is_empty() || NETWORKS.contains(&mode) {
        return Ok(());
    }
    Err(refuse(format!("--network {:?}: expected default, none or host", crate::shorten(mode, 80))))
}

/// The `--ulimit` names docker knows (go-units).
pub const ULIMIT_NAMES: [&str; 15] = [
    "core",
    "cpu",
    "data",
    "fsize",
    "locks",
    "memlock",
    "msgqueue",
    "nice",
    "nofile",
    "nproc",
    "rss",
    "rtprio",
    "rttime",
    "sigpending",
    "stack",
];

/// `--add-host HOST:IP` (or `HOST=IP`, and `HOST=[IPV6]`), as docker splits it:
/// at the first `=`, else at the first `:` so an IPv6 address keeps its colons.
pub fn parse_add_host(raw: &str) -> Result<proto::HostMapping, FlagError> {
    let (host, ip) = raw
        .split_once('=')
        .or_else(|| raw.split_once(':'))
        .ok_or_else(|| refuse(format!("--add-host {:?}: expected HOST:IP", crate::shorten(raw, 80))))?;
    let ip = ip.strip_prefix('[').and_then(|i| i.strip_suffix(']')).unwrap_or(ip);
    let mapping = proto::HostMapping { host: host.to_owned(), ip: ip.to_owned() };
    check_host_mapping(&mapping)?;
    Ok(mapping)
}

/// A host name safe for /etc/hosts and an IP address in its usual form.
pub fn check_host_mapping(m: &proto::HostMapping) -> Result<(), FlagError> {
    let host_ok = !m.host.is_empty()
        && m.host.len() <= 253
        && m.host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        && !m.host.starts_with(['-', '.']);
    if !host_ok {
        return Err(refuse(format!(
            "--add-host {:?}: invalid host name: expected letters, digits, '-', '.' or '_', at most 253 bytes",
            crate::shorten(&m.host, 80)
        )));
    }
    if m.ip == "host-gateway" {
        return Err(refuse(format!(
            "--add-host {}:host-gateway: host-gateway is not supported: the build runs on a remote agent; give its IP",
            m.host
        )));
    }
    if m.ip.parse::<IpAddr>().is_err() {
        return Err(refuse(format!("--add-host {}:{:?}: invalid IP address", m.host, crate::shorten(&m.ip, 80))));
    }
    Ok(())
}

/// `--ulimit NAME=SOFT[:HARD]`, as docker parses it (HARD defaults to SOFT).
pub fn parse_ulimit(raw: &str) -> Result<proto::Ulimit, FlagError> {
    let bad = |why: &str| refuse(format!("--ulimit {:?}: {why}", crate::shorten(raw, 80)));
    let (name, values) = raw.split_once('=').ok_or_else(|| bad("expected NAME=SOFT[:HARD]"))?;
    let (soft, hard) = values.split_once(':').unwrap_or((values, values));
    let number = |v: &str| v.parse::<i64>().map_err(|_| bad("limits must be integers"));
    let limit = proto::Ulimit { name: name.to_owned(), soft: number(soft)?, hard: number(hard)? };
    check_ulimit(&limit)?;
    Ok(limit)
}

/// A known name, soft at most hard, -1 the only negative value (unlimited).
pub fn check_ulimit(u: &proto::Ulimit) -> Result<(), FlagError> {
    let shown = || format!("{}={}:{}", crate::shorten(&u.name, 40), u.soft, u.hard);
    if !ULIMIT_NAMES.contains(&u.name.as_str()) {
        return Err(refuse(format!(
            "--ulimit {:?}: unknown name {:?}: expected one of {}",
            shown(),
            crate::shorten(&u.name, 40),
            ULIMIT_NAMES.join(", ")
        )));
    }
    if u.soft < -1 || u.hard < -1 {
        return Err(refuse(format!("--ulimit {:?}: a limit is -1 (unlimited) or at least 0", shown())));
    }
    let unlimited = |v: i64| if v == -1 { i64::MAX } else { v };
    if unlimited(u.soft) > unlimited(u.hard) {
        return Err(refuse(format!("--ulimit {:?}: the soft limit is above the hard limit", shown())));
    }
    Ok(())
}

/// Checks a list of ulimits: bounded, each name once.
pub fn check_ulimits(list: &[proto::Ulimit]) -> Result<(), FlagError> {
    if list.len() > ULIMIT_NAMES.len() {
        return Err(refuse(format!("--ulimit: more than {} values", ULIMIT_NAMES.len())));
    }
    for (i, u) in list.iter().enumerate() {
        check_ulimit(u)?;
        if list[..i].iter().any(|o| o.name == u.name) {
            return Err(refuse(format!("--ulimit: {} given twice", u.name)));
        }
    }
    Ok(())
}

/// `--shm-size` as docker reads it (`RAMInBytes`): a number, optionally
/// decimal, then an optional unit b, k, m, g, t, p (powers of 1024, with an
/// optional `i`/`b`, any case); more than 0 and at most the limit.
pub fn parse_size(raw: &str) -> Result<u64, FlagError> {
    let bad = |why: &str| refuse(format!("--shm-size {:?}: {why}", crate::shorten(raw, 40)));
    let bytes = crate::size::parse_ram(raw).ok_or_else(|| bad("expected a size like 64m or 1g"))?;
    check_shm_size(bytes).map_err(|e| bad(&e.0))
}

/// More than 0 bytes and at most `limits::SHM_SIZE_BYTES`.
pub fn check_shm_size(bytes: u64) -> Result<u64, FlagError> {
    if bytes == 0 {
        return Err(refuse("must be more than 0 bytes".into()));
    }
    if bytes > limits::SHM_SIZE_BYTES {
        return Err(refuse(format!("more than the limit of {} bytes (64 GiB)", limits::SHM_SIZE_BYTES)));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn add_host_splits_like_docker() {
        let m = parse_add_host("db:10.0.0.2").unwrap();
        assert_eq!((m.host.as_str(), m.ip.as_str()), ("db", "10.0.0.2"));
        assert_eq!(parse_add_host("v6:::1").unwrap().ip, "::1");
        assert_eq!(parse_add_host("v6=[fe80::1]").unwrap().ip, "fe80::1");
        for bad in ["nohost", "a b:1.2.3.4", ":1.2.3.4", "x:1.2.3", "x:host-gateway", "x\n1.2.3.4:1.2.3.4", "x:"] {
            assert!(parse_add_host(bad).unwrap_err().to_string().starts_with("--add-host"), "{bad}");
        }
    }

    #[test]
    fn ulimits_are_checked_like_docker() {
        let u = parse_ulimit("nofile=1024:2048").unwrap();
        assert_eq!((u.name.as_str(), u.soft, u.hard), ("nofile", 1024, 2048));
        assert_eq!(parse_ulimit("nproc=77").unwrap().hard, 77);
        assert_eq!(parse_ulimit("core=-1").unwrap().soft, -1);
        assert!(parse_ulimit("nofile=10:-1").is_ok());
        for bad in ["nofile", "files=1", "nofile=2:1", "nofile=x", "nofile=-2", "nofile=-1:5", "nofile=1:2:3"] {
            assert!(parse_ulimit(bad).unwrap_err().to_string().starts_with("--ulimit"), "{bad}");
        }
        let twice = [parse_ulimit("nofile=1").unwrap(), parse_ulimit("nofile=2").unwrap()];
        assert!(check_ulimits(&twice).unwrap_err().to_string().contains("given twice"));
    }

    #[test]
    fn sizes_read_like_docker() {
        assert_eq!(parse_size("64m").unwrap(), 64 << 20);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("2 kb").unwrap(), 2048);
        assert_eq!(parse_size("64g").unwrap(), 64 << 30);
        for bad in ["", "0", "m", "1x", "65g", "1e3", "-1m", "99999999999999999999p"] {
            assert!(parse_size(bad).unwrap_err().to_string().starts_with("--shm-size"), "{bad}");
        }
    }

    #[test]
    fn networks_are_those_of_buildx() {
        for ok in ["", "default", "none", "host"] {
            assert!(check_network(ok).is_ok());
        }
        assert!(check_network("bridge").unwrap_err().to_string().contains("--network \"bridge\""));
    }
}
