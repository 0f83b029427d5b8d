//! Target platforms, parsed and normalized the way containerd does it.

use std::fmt;
use std::str::FromStr;

/// A normalized `os/arch[/variant]`: `aarch64` is `arm64`, `armhf` is `arm/v7`,
/// `x86_64` is `amd64`, and so on. Two platforms that containerd considers the
/// same compare equal.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Platform {
    os: String,
    arch: String,
    variant: Option<String>,
}

/// Why a platform string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid platform {input:?}: {reason}")]
pub struct PlatformError {
    input: String,
    reason: String,
}

/// Longest platform string accepted; real ones are under 30 characters.
const MAX_LEN: usize = 64;

impl Platform {
    /// The platform with these already-normalized parts.
    fn from_parts(os: &str, arch: &str, variant: Option<&str>) -> Self {
        Platform { os: os.to_owned(), arch: arch.to_owned(), variant: variant.map(str::to_owned) }
    }

    /// The operating system, e.g. `linux`.
    pub fn os(&self) -> &str {
        &self.os
    }

    /// The architecture in Go's naming, e.g. `arm64`.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// The variant, e.g. `v7`, if any.
    pub fn variant(&self) -> Option<&str> {
        self.variant.as_deref()
    }

    /// Whether a host of this platform runs code built for `target` without
    /// emulation: the same platform, an older ARM variant (`arm/v7` runs
    /// `arm/v6` and `arm/v5`), an older amd64 micro-architecture level, or
    /// `386` on amd64, as containerd's `platforms.Only` decides.
    ///
    /// Unlike containerd, arm64 does not imply 32-bit `arm`: many arm64 CPUs
    /// have no AArch32, so a host that has it declares `linux/arm/v7` itself.
    pub fn matches(&self, target: &Platform) -> bool {
        if self.os != target.os {
            return false;
        }
        if self == target {
            return true;
        }
        match (self.arch.as_str(), target.arch.as_str()) {
            ("amd64", "386") => true,
            ("amd64", "amd64") => amd64_level(self) >= amd64_level(target),
            ("arm", "arm") => match (arm_version(self), arm_version(target)) {
                (Some(host), Some(wanted)) => wanted >= 5 && host >= wanted,
                _ => false,
            },
            _ => false,
        }
    }

    /// The platform of the running binary: its own architecture, and on
    /// 32-bit ARM the variant read from `/proc/cpuinfo`.
    pub fn host() -> Platform {
        let arch = go_arch(std::env::consts::ARCH);
        let variant = if arch == "arm" {
            let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
            Some(arm_variant_from_cpuinfo(&cpuinfo))
        } else {
            None
        };
        let raw = match variant {
            Some(v) => format!("{}/{arch}/{v}", std::env::consts::OS),
            None => format!("{}/{arch}", std::env::consts::OS),
        };
        // Every architecture Rust targets has a valid Go-style name, so this
        // parse only fails on an unknown one, which we keep verbatim.
        raw.parse().unwrap_or_else(|_| Platform::from_parts(std::env::consts::OS, &arch, None))
    }
}

/// amd64 micro-architecture level: plain `amd64` is v1.
fn amd64_level(p: &Platform) -> u32 {
    p.variant().and_then(|v| v.strip_prefix('v')).and_then(|n| n.parse().ok()).unwrap_or(1)
}

fn arm_version(p: &Platform) -> Option<u32> {
    p.variant()?.strip_prefix('v')?.parse().ok()
}

/// Rust's name for an architecture, in Go's (and so OCI's) naming.
fn go_arch(rust_arch: &str) -> String {
    match rust_arch {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64",
        "loongarch64" => "loong64",
        "riscv64" => "riscv64",
        "s390x" => "s390x",
        other => other,
    }
    .to_owned()
}

/// The ARM variant of this CPU, from the "CPU architecture" line of
/// `/proc/cpuinfo`, as containerd reads it.
pub fn arm_variant_from_cpuinfo(cpuinfo: &str) -> String {
    let field = |name: &str| {
        cpuinfo.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            (key.trim().eq_ignore_ascii_case(name)).then(|| value.trim().to_owned())
        })
    };
    let arch = field("CPU architecture").unwrap_or_default();
    let model = field("model name").unwrap_or_default();
    let variant = match arch.to_ascii_lowercase().as_str() {
        "8" | "aarch64" => "v8",
        // Some ARMv6 kernels (the first Raspberry Pi) report 7.
        "7" if model.starts_with("ARMv6-compatible") => "v6",
        "7" | "7m" | "?(12)" | "?(13)" | "?(14)" | "?(15)" | "?(16)" | "?(17)" => "v7",
        "6" | "6tej" => "v6",
        "5" | "5t" | "5te" | "5tej" => "v5",
        "4" | "4t" => "v4",
        "3" => "v3",
        _ => "v7",
    };
    variant.to_owned()
}

/// A component as containerd's specifier grammar accepts it before
/// normalization (`[a-z0-9_.-]+` once lowercased): `x86-64` and `v8.2` are
/// written with `-` and `.`.
fn is_specifier_component(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
}

/// What a normalized os or arch must look like: `[a-z0-9_]+`. Such a value
/// is safe as a path component, a metric label and a builder argument.
fn is_word(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// A normalized variant: words joined by single dots (`v7`, `v8.2`).
fn is_variant(s: &str) -> bool {
    s.split('.').all(is_word)
}

fn normalize_os(os: &str) -> String {
    match os {
        "macos" => "darwin".to_owned(),
        other => other.to_owned(),
    }
}

/// Containerd's architecture normalization (`normalizeArch`), plus `i686`;
/// variants of the architectures whose variants are known (amd64, arm,
/// arm64) are checked, where containerd would keep any.
fn normalize_arch(arch: &str, variant: Option<&str>) -> Result<(String, Option<String>), &'static str> {
    let v = variant.map(str::to_owned);
    let out = match arch {
        // containerd drops an i386 variant; a `386` one is kept (e.g. sse2).
        "i386" | "i686" => ("386".to_owned(), None),
        "386" => ("386".to_owned(), v),
        "x86_64" | "x86-64" | "amd64" => match v.as_deref() {
            None | Some("v1") => ("amd64".to_owned(), None),
            Some(level @ ("v2" | "v3" | "v4")) => ("amd64".to_owned(), Some(level.to_owned())),
            Some(_) => return Err("unknown amd64 variant (expected v1 to v4)"),
        },
        "aarch64" | "arm64" => match v.as_deref().map(arm64_version) {
            // v8 is arm64's baseline and, as containerd writes it, no variant.
            None | Some(Some((8, 0))) => ("arm64".to_owned(), None),
            Some(Some((major, 0))) => ("arm64".to_owned(), Some(format!("v{major}"))),
            Some(Some((major, minor))) => ("arm64".to_owned(), Some(format!("v{major}.{minor}"))),
            Some(None) => return Err("unknown arm64 variant (expected v8 or later, e.g. v8.2, v9)"),
        },
        "armhf" => match v.as_deref() {
            None | Some("v7") | Some("7") => ("arm".to_owned(), Some("v7".to_owned())),
            Some(_) => return Err("armhf is arm/v7 and takes no other variant"),
        },
        "armel" => match v.as_deref() {
            None | Some("v6") | Some("6") => ("arm".to_owned(), Some("v6".to_owned())),
            Some(_) => return Err("armel is arm/v6 and takes no other variant"),
        },
        "arm" => match v.as_deref() {
            None => ("arm".to_owned(), Some("v7".to_owned())),
            Some(n @ ("5" | "6" | "7" | "8")) => ("arm".to_owned(), Some(format!("v{n}"))),
            Some(n @ ("v5" | "v6" | "v7" | "v8")) => ("arm".to_owned(), Some(n.to_owned())),
            Some(_) => return Err("unknown arm variant (expected v5, v6, v7 or v8)"),
        },
        _ => (arch.to_owned(), v),
    };
    Ok(out)
}

/// `v8`, `8`, `v8.0` … `v8.9`, `v9`, `9.0` … as Go's GOARM64: (major, minor).
fn arm64_version(v: &str) -> Option<(u8, u8)> {
    let rest = v.strip_prefix('v').unwrap_or(v);
    let (major, minor) = rest.split_once('.').unwrap_or((rest, "0"));
    let major = match major {
        "8" => 8,
        "9" => 9,
        _ => return None,
    };
    let minor = match minor.as_bytes() {
        [d] if d.is_ascii_digit() => d - b'0',
        _ => return None,
    };
    Some((major, minor))
}

/// Architectures Go knows (`go tool dist list`), with the aliases containerd
/// normalizes; a bare `arm64` means `linux/arm64`.
fn is_known_arch(arch: &str) -> bool {
    matches!(
        arch,
        "386"
            | "i386"
            | "i686"
            | "amd64"
            | "x86_64"
            | "x86-64"
            | "arm"
            | "armhf"
            | "armel"
            | "arm64"
            | "aarch64"
            | "ppc64"
            | "ppc64le"
            | "riscv64"
            | "s390x"
            | "mips"
            | "mipsle"
            | "mips64"
            | "mips64le"
            | "loong64"
            | "wasm"
    )
}

impl FromStr for Platform {
    type Err = PlatformError;

    /// Parses `os/arch[/variant]` (or a bare known arch, meaning Linux).
    /// Unknown but well-formed os and arch values are accepted, as buildx
    /// (containerd's parser) accepts them: no agent declares them, so such a
    /// build fails with "no agent builds it"; metrics count them as `other`.
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| PlatformError { input: crate::shorten(input, 80), reason };
        if input.len() > MAX_LEN {
            return Err(err("longer than 64 characters".into()));
        }
        let lower = input.trim().to_ascii_lowercase();
        if lower.is_empty() {
            return Err(err("empty".into()));
        }
        let parts: Vec<&str> = lower.split('/').collect();
        if let Some(bad) = parts.iter().find(|p| !is_specifier_component(p)) {
            return Err(err(format!(
                "component {bad:?}: expected os/arch[/variant] of lowercase letters, digits, '_' (and '.' or '-' in an alias)"
            )));
        }
        let (os, arch, variant) = match parts.as_slice() {
            [arch] if is_known_arch(arch) => ("linux", *arch, None),
            [_] => return Err(err("expected os/arch[/variant]".into())),
            [os, arch] => (*os, *arch, None),
            [os, arch, variant] => (*os, *arch, Some(*variant)),
            _ => return Err(err("too many components (expected os/arch[/variant])".into())),
        };
        let os = normalize_os(os);
        if is_known_arch(&os) {
            return Err(err("the operating system comes first, e.g. linux/arm64".into()));
        }
        if !is_word(&os) {
            return Err(err(format!("os {os:?}: expected lowercase letters, digits and '_'")));
        }
        let (arch, variant) = normalize_arch(arch, variant).map_err(|e| err(e.into()))?;
        if !is_word(&arch) {
            return Err(err(format!("arch {arch:?}: expected lowercase letters, digits and '_'")));
        }
        if let Some(v) = variant.as_deref().filter(|v| !is_variant(v)) {
            return Err(err(format!("variant {v:?}: expected lowercase letters, digits and '_', with single dots")));
        }
        Ok(Platform { os, arch, variant })
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl serde::Serialize for Platform {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Platform {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Parses a comma-separated list (`--platform a,b`), refusing empty entries.
pub fn parse_list(list: &str) -> Result<Vec<Platform>, PlatformError> {
    list.split(',').map(|p| p.trim().parse()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(s: &str) -> Platform {
        s.parse().unwrap()
    }

    #[test]
    fn normalizes_like_containerd() {
        let cases = [
            ("linux/amd64", "linux/amd64"),
            ("linux/x86_64", "linux/amd64"),
            ("linux/x86-64", "linux/amd64"),
            ("Linux/AMD64", "linux/amd64"),
            ("linux/amd64/v1", "linux/amd64"),
            ("linux/amd64/v3", "linux/amd64/v3"),
            ("linux/aarch64", "linux/arm64"),
            ("linux/arm64/v8", "linux/arm64"),
            ("linux/arm64/8", "linux/arm64"),
            ("linux/arm64/v9", "linux/arm64/v9"),
            ("linux/armhf", "linux/arm/v7"),
            ("linux/armel", "linux/arm/v6"),
            ("linux/arm", "linux/arm/v7"),
            ("linux/arm/7", "linux/arm/v7"),
            ("linux/arm/v6", "linux/arm/v6"),
            ("linux/i386", "linux/386"),
            ("linux/i686", "linux/386"),
            ("arm64", "linux/arm64"),
            ("macos/arm64", "darwin/arm64"),
            ("linux/riscv64", "linux/riscv64"),
            (" linux/ppc64le ", "linux/ppc64le"),
            // containerd's own TestParseSelector cases (os given: braid has
            // no default os but linux for a bare arch).
            ("Linux/x86_64", "linux/amd64"),
            ("Aarch64", "linux/arm64"),
            ("x86_64", "linux/amd64"),
            ("armel", "linux/arm/v6"),
            ("armhf", "linux/arm/v7"),
            ("i386", "linux/386"),
            ("s390x", "linux/s390x"),
            ("linux/s390x", "linux/s390x"),
            ("MacOS/arm64", "darwin/arm64"),
            // containerd's normalizeArch.
            ("linux/arm64/v8.0", "linux/arm64"),
            ("linux/arm64/9", "linux/arm64/v9"),
            ("linux/arm64/v9.0", "linux/arm64/v9"),
            ("linux/arm64/v8.2", "linux/arm64/v8.2"),
            ("linux/i386/sse2", "linux/386"),
            ("linux/arm/5", "linux/arm/v5"),
            // Well-formed but unknown to Go: accepted, as buildx does.
            ("plan9/mips", "plan9/mips"),
            ("linux/new_arch", "linux/new_arch"),
            ("myos/myarch/v2.1", "myos/myarch/v2.1"),
        ];
        for (input, want) in cases {
            assert_eq!(p(input).to_string(), want, "{input}");
        }
        assert_eq!(p("linux/arm64/v8"), p("linux/aarch64"));
    }

    #[test]
    fn refuses_garbage_and_quotes_it() {
        for bad in [
            "",
            "linux",
            "linux/",
            "/amd64",
            "linux/arm/v9",
            "linux/amd64/v7",
            "linux/a b",
            "linux/arm64/v8/x",
            "arm64/linux",
            "linux/armhf/v6",
            "linux/arm64/v7",
            // The shape: containerd's TestParseSelectorInvalid, and paths.
            "/linux/arm",
            "linux/arm/",
            "linux /arm",
            "linux/&arm",
            "linux/arm/foo/bar",
            "../../etc",
            "linux/../etc",
            "linux/..",
            "linux/riscv64/..",
            "linux/riscv64/.v1",
            "linux/riscv64/v1.",
            "linux/foo-bar",
            "foo.bar/amd64",
            "linux/amd\n64",
            "linux/amd\u{0}64",
            "linux/arm64/v10",
            "linux/arm64/v8.10",
        ] {
            let e = bad.parse::<Platform>().unwrap_err();
            assert!(e.to_string().starts_with(&format!("invalid platform {bad:?}")), "{e}");
        }
        let e = "linux/arm/v9".parse::<Platform>().unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"invalid platform "linux/arm/v9": unknown arm variant (expected v5, v6, v7 or v8)"#
        );
        let e = "../../etc".parse::<Platform>().unwrap_err().to_string();
        assert!(e.contains(r#"os "..""#), "{e}");
        let e = "linux/x.y".parse::<Platform>().unwrap_err().to_string();
        assert!(e.contains(r#"arch "x.y""#), "{e}");
    }

    #[test]
    fn native_matching() {
        assert!(p("linux/amd64").matches(&p("linux/amd64")));
        assert!(p("linux/amd64").matches(&p("linux/386")));
        assert!(p("linux/amd64/v3").matches(&p("linux/amd64/v2")));
        assert!(!p("linux/amd64").matches(&p("linux/amd64/v3")));
        assert!(p("linux/arm64").matches(&p("linux/arm64/v8")));
        assert!(!p("linux/arm64").matches(&p("linux/arm/v7")));
        assert!(p("linux/arm/v7").matches(&p("linux/arm/v6")));
        assert!(!p("linux/arm/v6").matches(&p("linux/arm/v7")));
        assert!(!p("linux/amd64").matches(&p("linux/arm64")));
        assert!(!p("linux/amd64").matches(&p("windows/amd64")));
    }

    #[test]
    fn cpuinfo_variants() {
        assert_eq!(arm_variant_from_cpuinfo("CPU architecture: 7\n"), "v7");
        assert_eq!(arm_variant_from_cpuinfo("CPU architecture\t: 6TEJ\n"), "v6");
        assert_eq!(
            arm_variant_from_cpuinfo("model name : ARMv6-compatible processor rev 7 (v6l)\nCPU architecture: 7\n"),
            "v6"
        );
        assert_eq!(arm_variant_from_cpuinfo("CPU architecture: 8\n"), "v8");
    }

    #[test]
    fn host_is_a_valid_platform() {
        let host = Platform::host();
        assert_eq!(host.to_string().parse::<Platform>().unwrap(), host);
        #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
        assert_eq!(host.to_string(), "linux/amd64");
    }

    proptest! {
        #[test]
        fn parse_never_panics_and_display_round_trips(s in "\\PC{0,80}") {
            if let Ok(platform) = s.parse::<Platform>() {
                let again: Platform = platform.to_string().parse().unwrap();
                prop_assert_eq!(&again, &platform);
                // What is accepted is safe as a path component and a label.
                prop_assert!(is_word(platform.os()) && is_word(platform.arch()));
                prop_assert!(platform.variant().is_none_or(is_variant));
            }
        }

        #[test]
        fn shaped_inputs_are_words_after_normalization(s in "[a-zA-Z0-9_.-]{1,12}/[a-zA-Z0-9_.-]{1,12}(/[a-zA-Z0-9_.-]{1,8})?") {
            if let Ok(platform) = s.parse::<Platform>() {
                prop_assert!(is_word(platform.os()) && is_word(platform.arch()), "{platform}");
                prop_assert!(!platform.to_string().contains(".."), "{platform}");
            }
        }

        #[test]
        fn matching_is_reflexive(s in "(linux|windows)/(amd64|arm64|arm|386|riscv64)(/v[5-8])?") {
            if let Ok(platform) = s.parse::<Platform>() {
                prop_assert!(platform.matches(&platform));
            }
        }
    }
}
