//! Placement by what a build needs of a machine: agent labels (set by the
//! operator or detected), build requirements (`--require memory>=4GiB`),
//! per-job limits (`--memory`, `--cpus`) and sizes as people type them.
//! The CLI, the coordinator and the agent check them with these functions.

use std::collections::BTreeMap;
use std::fmt;

use crate::Platform;
use crate::buildflags::FlagError;
use crate::limits;

/// An agent's labels, by key.
pub type Labels = BTreeMap<String, String>;

/// Total memory of the host (a size, e.g. `7812MiB`).
pub const MEMORY: &str = "memory";
/// Online CPUs (a number).
pub const CPUS: &str = "cpus";
/// The kind of disk under the agent's work directory: `ssd` or `hdd`.
pub const DISK: &str = "disk";
/// The kernel release (`uname -r`).
pub const KERNEL: &str = "kernel";
/// `ID VERSION_ID` from /etc/os-release, e.g. `debian 12`.
pub const OS_RELEASE: &str = "os-release";
/// The board model from the device tree, e.g. `Raspberry Pi 4 Model B Rev 1.4`.
pub const MODEL: &str = "model";

fn refuse(message: String) -> FlagError {
    FlagError::new(message)
}

/// A label key: a lowercase letter, then lowercase letters, digits, `.`,
/// `-` or `_`; at most `LABEL_KEY_BYTES`.
pub fn check_key(key: &str) -> Result<(), String> {
    let ok = !key.is_empty()
        && key.len() <= limits::LABEL_KEY_BYTES
        && key.starts_with(|c: char| c.is_ascii_lowercase())
        && key.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'));
    if ok {
        return Ok(());
    }
    Err(format!(
        "invalid key {:?}: expected a lowercase letter, then lowercase letters, digits, '.', '-' or '_', at most {} \
         bytes",
        crate::shorten(key, 80),
        limits::LABEL_KEY_BYTES
    ))
}

/// A label value: 1 to `LABEL_VALUE_BYTES` bytes, no control characters;
/// `memory` must be a size and `cpus` a number.
pub fn check_value(key: &str, value: &str) -> Result<(), String> {
    if value.is_empty() || value.len() > limits::LABEL_VALUE_BYTES || value.chars().any(char::is_control) {
        return Err(format!(
            "{key}: invalid value {:?}: 1 to {} bytes, no control characters",
            crate::shorten(value, 80),
            limits::LABEL_VALUE_BYTES
        ));
    }
    if key == MEMORY && crate::size::parse_ram(value).is_none() {
        return Err(format!("{key}: {value:?} is not a size (e.g. 4GiB, 512MiB)"));
    }
    if key == CPUS && parse_number(value).is_none() {
        return Err(format!("{key}: {value:?} is not a number"));
    }
    Ok(())
}

/// Checks a set of labels: each key and value, and their count.
pub fn check_labels<'a>(labels: impl IntoIterator<Item = (&'a String, &'a String)>) -> Result<(), String> {
    let mut n = 0;
    for (k, v) in labels {
        n += 1;
        check_key(k)?;
        check_value(k, v)?;
    }
    if n > limits::AGENT_LABELS {
        return Err(format!("{n} labels: more than the limit of {}", limits::AGENT_LABELS));
    }
    Ok(())
}

/// `--label KEY=VALUE` of braid-agent.
pub fn parse_label(raw: &str) -> Result<(String, String), FlagError> {
    let bad = |why: String| refuse(format!("--label {:?}: {why}", crate::shorten(raw, 80)));
    let (k, v) = raw.split_once('=').ok_or_else(|| bad("expected KEY=VALUE".into()))?;
    check_key(k).map_err(bad)?;
    check_value(k, v).map_err(bad)?;
    Ok((k.to_owned(), v.to_owned()))
}

/// A plain decimal number (`2`, `1.5`), finite and not negative.
pub fn parse_number(s: &str) -> Option<f64> {
    let ok = !s.is_empty() && s.chars().all(|c| c.is_ascii_digit() || c == '.');
    let n: f64 = if ok { s.parse().ok()? } else { return None };
    (n.is_finite() && n >= 0.0).then_some(n)
}

/// Bytes in binary units with one decimal: `1.0 GiB`, `512.0 MiB`.
pub fn format_bytes(bytes: u64) -> String {
    let (value, unit) = scale(bytes, None);
    format!("{value:.1} {unit}")
}

/// `bytes` in the unit `format_bytes(like)` uses, with two decimals below
/// one (`peak 0.98 GiB` beside `1.0 GiB`).
pub fn format_bytes_like(bytes: u64, like: u64) -> String {
    let (_, unit) = scale(like, None);
    let (value, unit) = scale(bytes, Some(unit));
    if value < 1.0 { format!("{value:.2} {unit}") } else { format!("{value:.1} {unit}") }
}

fn scale(bytes: u64, fixed: Option<&'static str>) -> (f64, &'static str) {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    for unit in UNITS {
        if fixed == Some(unit) || (fixed.is_none() && value < 1024.0) || unit == "PiB" {
            return (value, unit);
        }
        value /= 1024.0;
    }
    (value, "PiB")
}

/// A comparison in a requirement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Eq,
    Ne,
    Ge,
    Le,
    Gt,
    Lt,
}

impl Op {
    const ALL: [(&'static str, Op); 6] =
        [("!=", Op::Ne), (">=", Op::Ge), ("<=", Op::Le), ("=", Op::Eq), (">", Op::Gt), ("<", Op::Lt)];

    fn as_str(self) -> &'static str {
        Op::ALL.iter().find(|(_, o)| *o == self).map_or("=", |(s, _)| s)
    }

    fn orders(self) -> bool {
        !matches!(self, Op::Eq | Op::Ne)
    }
}

/// `--require [PLATFORM:]KEY OP VALUE`: what an agent's labels must
/// satisfy to take the build's jobs (of that platform only, with a prefix).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Requirement {
    pub platform: Option<String>,
    pub key: String,
    op: OpOrd,
    pub value: String,
}

/// `Op` in an order, so requirement lists sort and compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct OpOrd(u8);

impl Requirement {
    pub fn op(&self) -> Op {
        Op::ALL[usize::from(self.op.0)].1
    }

    /// Whether it applies to jobs of `platform`.
    pub fn applies_to(&self, platform: &Platform) -> bool {
        self.platform.as_ref().is_none_or(|p| p.parse::<Platform>().is_ok_and(|p| p.matches(platform)))
    }

    /// Whether labels satisfy it: sizes and numbers compare as quantities,
    /// other values as text (`=`, `!=` only). A missing label satisfies
    /// only `!=`.
    pub fn satisfied_by(&self, labels: &Labels) -> bool {
        let op = self.op();
        let Some(have) = labels.get(&self.key) else { return op == Op::Ne };
        let ordering = match (quantity(have), quantity(&self.value)) {
            (Some(h), Some(w)) => h.partial_cmp(&w),
            _ if op.orders() => return false,
            _ => Some(have.as_str().cmp(self.value.as_str())),
        };
        let Some(o) = ordering else { return false };
        match op {
            Op::Eq => o.is_eq(),
            Op::Ne => o.is_ne(),
            Op::Ge => o.is_ge(),
            Op::Le => o.is_le(),
            Op::Gt => o.is_gt(),
            Op::Lt => o.is_lt(),
        }
    }

    /// What an agent has of it, for a refusal: `has 1.0 GiB`, `has no memory label`.
    pub fn what_has(&self, labels: &Labels) -> String {
        match labels.get(&self.key) {
            None => format!("has no {} label", self.key),
            Some(v) if self.key == MEMORY => {
                format!("has {}", crate::size::parse_ram(v).map_or_else(|| v.clone(), format_bytes))
            }
            Some(v) => format!("has {} {v}", self.key),
        }
    }

    /// The memory it asks for at least (`memory>=`, `>`, `=`), if any.
    pub fn memory_floor(&self) -> Option<u64> {
        (self.key == MEMORY && matches!(self.op(), Op::Ge | Op::Gt | Op::Eq))
            .then(|| crate::size::parse_ram(&self.value))?
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(p) = &self.platform {
            write!(f, "{p}:")?;
        }
        write!(f, "{}{}{}", self.key, self.op().as_str(), self.value)
    }
}

/// A value as a quantity: a number, or a size with a unit.
fn quantity(s: &str) -> Option<f64> {
    parse_number(s).or_else(|| crate::size::parse_ram(s).map(|b| b as f64))
}

/// `--require [PLATFORM:]KEY OP VALUE`, OP one of `=`, `!=`, `>=`, `<=`,
/// `>`, `<`; an ordering needs a number or a size.
pub fn parse_requirement(raw: &str) -> Result<Requirement, FlagError> {
    let bad = |why: String| refuse(format!("--require {:?}: {why}", crate::shorten(raw, 80)));
    if raw.len() > limits::REQUIREMENT_BYTES {
        return Err(bad(format!("more than {} bytes", limits::REQUIREMENT_BYTES)));
    }
    let at = raw
        .find(['=', '!', '<', '>'])
        .ok_or_else(|| bad("expected KEY OP VALUE, OP one of =, !=, >=, <=, >, <".into()))?;
    let (left, rest) = raw.split_at(at);
    let (i, (sym, _)) = Op::ALL
        .iter()
        .enumerate()
        .find(|(_, (s, _))| rest.starts_with(s))
        .ok_or_else(|| bad("expected an operator =, !=, >=, <=, > or <".into()))?;
    let value = rest[sym.len()..].trim();
    let (platform, key) = match left.split_once(':') {
        Some((p, k)) => {
            let p: Platform = p.trim().parse().map_err(|e| bad(format!("{e}")))?;
            (Some(p.to_string()), k.trim())
        }
        None => (None, left.trim()),
    };
    check_key(key).map_err(bad)?;
    if value.is_empty() || value.len() > limits::LABEL_VALUE_BYTES || value.chars().any(char::is_control) {
        return Err(bad(format!("expected a value of 1 to {} bytes", limits::LABEL_VALUE_BYTES)));
    }
    let op = Op::ALL[i].1;
    if (op.orders() || key == MEMORY || key == CPUS) && quantity(value).is_none() {
        return Err(bad(format!("{value:?} is not a number or a size (e.g. 2, 4GiB)")));
    }
    let op = OpOrd(u8::try_from(i).unwrap_or(0));
    Ok(Requirement { platform, key: key.to_owned(), op, value: value.to_owned() })
}

/// A build's `--require` list: bounded, each parsed, each platform one of
/// the build's (a requirement for a platform not built would be dropped).
pub fn check_requirements(raw: &[String], platforms: &[Platform]) -> Result<Vec<Requirement>, FlagError> {
    if raw.len() > limits::REQUIREMENTS {
        return Err(refuse(format!("--require: {} given, more than the limit of {}", raw.len(), limits::REQUIREMENTS)));
    }
    let mut out = Vec::new();
    for r in raw {
        let req = parse_requirement(r)?;
        if !platforms.is_empty() && !platforms.iter().any(|p| req.applies_to(p)) {
            return Err(refuse(format!(
                "--require {r:?}: the build has no platform {}",
                req.platform.unwrap_or_default()
            )));
        }
        out.push(req);
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// `--memory` of a job: a size from `JOB_MEMORY_MIN_BYTES` to `JOB_MEMORY_BYTES`.
pub fn parse_memory_limit(raw: &str) -> Result<u64, FlagError> {
    let bytes = crate::size::parse_ram(raw)
        .ok_or_else(|| refuse(format!("--memory {:?}: expected a size like 2GiB or 512m", crate::shorten(raw, 40))))?;
    check_memory_limit(bytes).map_err(|e| refuse(format!("--memory {:?}: {e}", crate::shorten(raw, 40))))
}

/// `memory_limit_bytes`: 0 (none) or within the bounds.
pub fn check_memory_limit(bytes: u64) -> Result<u64, FlagError> {
    if bytes != 0 && !(limits::JOB_MEMORY_MIN_BYTES..=limits::JOB_MEMORY_BYTES).contains(&bytes) {
        return Err(refuse(format!(
            "{bytes} bytes: expected from {} to {}",
            format_bytes(limits::JOB_MEMORY_MIN_BYTES),
            format_bytes(limits::JOB_MEMORY_BYTES)
        )));
    }
    Ok(bytes)
}

/// `--cpus` of a job as thousandths of a CPU (`1.5` is 1500).
pub fn parse_cpus(raw: &str) -> Result<u32, FlagError> {
    let bad = || refuse(format!("--cpus {:?}: expected a number of CPUs like 2 or 0.5", crate::shorten(raw, 40)));
    let n = parse_number(raw.trim()).ok_or_else(bad)?;
    let millis = (n * 1000.0).round();
    if millis < 1.0 || millis > f64::from(limits::JOB_CPU_MILLIS) {
        return Err(bad());
    }
    check_cpus(millis as u32)
}

/// `cpu_millis`: 0 (none) or within the bound.
pub fn check_cpus(millis: u32) -> Result<u32, FlagError> {
    if millis > limits::JOB_CPU_MILLIS {
        return Err(refuse(format!("--cpus: more than {} CPUs", limits::JOB_CPU_MILLIS / 1000)));
    }
    Ok(millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn sizes_parse_as_docker_reads_them_and_print_in_binary() {
        assert_eq!(crate::size::parse_ram("4GiB"), Some(4 << 30));
        assert_eq!(crate::size::parse_ram("4g"), Some(4 << 30));
        assert_eq!(crate::size::parse_ram("4GB"), Some(4 << 30), "docker's reading: binary");
        assert_eq!(crate::size::parse_ram("1.5 MiB"), Some(3 << 19));
        assert_eq!(crate::size::parse_ram("512"), Some(512));
        for bad in ["", "GiB", "4XB", "-1G", "4GiBs", "1e3"] {
            assert_eq!(crate::size::parse_ram(bad), None, "{bad}");
        }
        assert_eq!(format_bytes(1 << 30), "1.0 GiB");
        assert_eq!(format_bytes(2 << 29), "1.0 GiB");
        assert_eq!(format_bytes_like(1_052_266_987, 1 << 30), "0.98 GiB");
    }

    #[test]
    fn requirements_parse_compare_and_name_themselves() {
        let r = parse_requirement("linux/arm/v7:memory>=2GiB").unwrap();
        assert_eq!(r.to_string(), "linux/arm/v7:memory>=2GiB");
        assert!(r.applies_to(&"linux/arm/v7".parse().unwrap()));
        assert!(!r.applies_to(&"linux/amd64".parse().unwrap()));
        assert!(r.satisfied_by(&labels(&[("memory", "2048MiB")])));
        assert!(!r.satisfied_by(&labels(&[("memory", "1GiB")])));
        assert!(!r.satisfied_by(&labels(&[])));
        assert_eq!(r.what_has(&labels(&[("memory", "1GiB")])), "has 1.0 GiB");
        assert_eq!(r.memory_floor(), Some(2 << 30));
        let ssd = parse_requirement("disk=ssd").unwrap();
        assert!(ssd.satisfied_by(&labels(&[("disk", "ssd")])));
        assert!(!ssd.satisfied_by(&labels(&[("disk", "hdd")])));
        let not = parse_requirement("disk!=hdd").unwrap();
        assert!(not.satisfied_by(&labels(&[])));
        let cpus = parse_requirement("cpus>2").unwrap();
        assert!(cpus.satisfied_by(&labels(&[("cpus", "4")])));
        assert!(!cpus.satisfied_by(&labels(&[("cpus", "2")])));
        for bad in
            ["memory", "Memory>=1G", "memory>=lots", "disk>ssd", "linux/arm/v9:memory>=1G", "x=\u{7}", "k=", ":k=v"]
        {
            assert!(parse_requirement(bad).unwrap_err().to_string().starts_with("--require"), "{bad}");
        }
        let p: Vec<Platform> = vec!["linux/amd64".parse().unwrap()];
        let e = check_requirements(&["linux/arm64:memory>=1G".into()], &p).unwrap_err().to_string();
        assert!(e.contains("the build has no platform linux/arm64"), "{e}");
        let many: Vec<String> = (0..=limits::REQUIREMENTS).map(|i| format!("k{i}=v")).collect();
        assert!(check_requirements(&many, &p).is_err());
    }

    #[test]
    fn labels_and_limits_are_checked() {
        assert_eq!(parse_label("memory=1GiB").unwrap(), ("memory".into(), "1GiB".into()));
        assert_eq!(parse_label("model=Raspberry Pi 4").unwrap().1, "Raspberry Pi 4");
        for bad in ["memory", "memory=big", "cpus=two", "Zone=a", "zone=", &format!("{}=v", "k".repeat(64))] {
            assert!(parse_label(bad).unwrap_err().to_string().starts_with("--label"), "{bad}");
        }
        let many: Labels = (0..=limits::AGENT_LABELS).map(|i| (format!("k{i}"), "v".to_owned())).collect();
        assert!(check_labels(&many).is_err());
        assert_eq!(parse_memory_limit("2GiB").unwrap(), 2 << 30);
        assert!(parse_memory_limit("1k").is_err());
        assert_eq!(parse_cpus("1.5").unwrap(), 1500);
        assert!(parse_cpus("0").is_err());
        assert!(parse_cpus("abc").is_err());
    }
}
