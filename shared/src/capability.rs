//! What an agent's builder can do, and so what a build may need of it.
//!
//! An agent probes its builder at start and reports these names in its
//! hello (`BuilderInfo.capabilities`); the coordinator derives what a build
//! needs from its flags and its Dockerfile (`BuildSpec.needs`) and places a
//! job only on an agent whose builder has all of it. One vocabulary, so the
//! two sides cannot drift: a name neither side knows is refused, not ignored.

use std::fmt;
use std::str::FromStr;

/// One thing a build may need of a builder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Capability {
    /// `--secret` and `RUN --mount=type=secret`.
    Secrets,
    /// `--ssh` and `RUN --mount=type=ssh`.
    Ssh,
    /// `RUN --mount=type=cache`.
    CacheMounts,
    /// `RUN --mount=type=bind`.
    BindMounts,
    /// `RUN --mount=type=tmpfs`.
    TmpfsMounts,
    /// `RUN <<EOF` and `COPY <<EOF` (here-documents).
    Heredocs,
    /// `COPY --link` / `ADD --link`.
    CopyLink,
    /// `COPY --chmod` / `ADD --chmod`.
    CopyChmod,
    /// `--build-context NAME=VALUE`.
    BuildContexts,
    /// `--cache-from type=registry`.
    RegistryCacheImport,
    /// `--cache-to type=registry`.
    RegistryCacheExport,
    /// `--cache-to type=inline`.
    InlineCacheExport,
    /// `--no-cache-filter STAGE`.
    NoCacheFilter,
    /// `--network none`.
    NetworkNone,
    /// `--network host`.
    NetworkHost,
    /// `--add-host`.
    AddHosts,
    /// `--ulimit`.
    Ulimits,
    /// `--shm-size`.
    ShmSize,
    /// A `# syntax=` directive naming a Dockerfile frontend image.
    SyntaxDirective,
}

impl Capability {
    /// Every capability, in the order they are listed to people.
    pub const ALL: [Capability; 19] = [
        Capability::Secrets,
        Capability::Ssh,
        Capability::CacheMounts,
        Capability::BindMounts,
        Capability::TmpfsMounts,
        Capability::Heredocs,
        Capability::CopyLink,
        Capability::CopyChmod,
        Capability::BuildContexts,
        Capability::RegistryCacheImport,
        Capability::RegistryCacheExport,
        Capability::InlineCacheExport,
        Capability::NoCacheFilter,
        Capability::NetworkNone,
        Capability::NetworkHost,
        Capability::AddHosts,
        Capability::Ulimits,
        Capability::ShmSize,
        Capability::SyntaxDirective,
    ];

    /// The wire and display name.
    pub fn name(self) -> &'static str {
        match self {
            Capability::Secrets => "secrets",
            Capability::Ssh => "ssh",
            Capability::CacheMounts => "cache-mounts",
            Capability::BindMounts => "bind-mounts",
            Capability::TmpfsMounts => "tmpfs-mounts",
            Capability::Heredocs => "heredocs",
            Capability::CopyLink => "copy-link",
            Capability::CopyChmod => "copy-chmod",
            Capability::BuildContexts => "build-contexts",
            Capability::RegistryCacheImport => "registry-cache-import",
            Capability::RegistryCacheExport => "registry-cache-export",
            Capability::InlineCacheExport => "inline-cache-export",
            Capability::NoCacheFilter => "no-cache-filter",
            Capability::NetworkNone => "network-none",
            Capability::NetworkHost => "network-host",
            Capability::AddHosts => "add-hosts",
            Capability::Ulimits => "ulimits",
            Capability::ShmSize => "shm-size",
            Capability::SyntaxDirective => "syntax-directive",
        }
    }

    /// What a user wrote that needs it, for messages.
    pub fn feature(self) -> &'static str {
        match self {
            Capability::Secrets => "build secrets (--secret, RUN --mount=type=secret)",
            Capability::Ssh => "SSH forwarding (--ssh, RUN --mount=type=ssh)",
            Capability::CacheMounts => "RUN --mount=type=cache",
            Capability::BindMounts => "RUN --mount=type=bind",
            Capability::TmpfsMounts => "RUN --mount=type=tmpfs",
            Capability::Heredocs => "heredocs (<<EOF)",
            Capability::CopyLink => "COPY --link",
            Capability::CopyChmod => "COPY --chmod",
            Capability::BuildContexts => "--build-context",
            Capability::RegistryCacheImport => "--cache-from type=registry",
            Capability::RegistryCacheExport => "--cache-to type=registry",
            Capability::InlineCacheExport => "--cache-to type=inline",
            Capability::NoCacheFilter => "--no-cache-filter",
            Capability::NetworkNone => "--network none",
            Capability::NetworkHost => "--network host",
            Capability::AddHosts => "--add-host",
            Capability::Ulimits => "--ulimit",
            Capability::ShmSize => "--shm-size",
            Capability::SyntaxDirective => "a # syntax= frontend image",
        }
    }

    /// Which builders provide it, for the hint in a refusal.
    pub fn provided_by(self) -> &'static str {
        match self {
            Capability::Secrets | Capability::Ssh | Capability::CacheMounts | Capability::BindMounts => {
                "buildah >= 1.24, podman >= 4.0, or a Docker Engine with BuildKit"
            }
            Capability::TmpfsMounts => "buildah >= 1.24, podman >= 4.0, or a Docker Engine with BuildKit",
            Capability::Heredocs => "buildah >= 1.33 or podman >= 4.8",
            Capability::CopyLink => "buildah >= 1.31 or podman >= 4.6",
            Capability::CopyChmod => "buildah >= 1.24, podman >= 4.0, or a Docker Engine with BuildKit",
            Capability::BuildContexts => "buildah >= 1.27 or podman >= 4.2",
            Capability::RegistryCacheImport | Capability::RegistryCacheExport => "buildah >= 1.27 or podman >= 4.2",
            Capability::InlineCacheExport => "a Docker Engine with BuildKit",
            Capability::NoCacheFilter => "a BuildKit with a docker-container driver (buildx); no agent builder here",
            Capability::NetworkNone | Capability::AddHosts | Capability::ShmSize => "every builder",
            Capability::NetworkHost => "an agent with allow_network_host = true",
            Capability::Ulimits => "buildah or podman",
            Capability::SyntaxDirective => "a BuildKit that can pull the frontend image",
        }
    }
}

/// Why no agent of `platform` can build what needs `missing`: each
/// feature with what would provide it, then the agents' builders, grouped
/// (`agents`: name and builder, e.g. "buildah 1.28.2"). Like
/// `linux/arm/v7: heredocs (<<EOF) need buildah >= 1.33 or podman >= 4.8;
/// agents pi-01, pi-02 run buildah 1.28.2`.
pub fn refusal(platform: &str, missing: CapSet, agents: &[(String, String)]) -> String {
    let mut parts: Vec<String> = missing
        .iter()
        .map(|c| {
            let verb = if matches!(c, Capability::Heredocs | Capability::Secrets) { "need" } else { "needs" };
            format!("{} {verb} {}", c.feature(), c.provided_by())
        })
        .collect();
    let mut builders: Vec<(&str, Vec<&str>)> = Vec::new();
    for (name, builder) in agents {
        match builders.iter_mut().find(|(b, _)| b == builder) {
            Some((_, names)) => names.push(name),
            None => builders.push((builder, vec![name])),
        }
    }
    for (builder, names) in builders {
        const SHOWN: usize = 8;
        let mut list = names.iter().take(SHOWN).copied().collect::<Vec<_>>().join(", ");
        if names.len() > SHOWN {
            list.push_str(&format!(" and {} more", names.len() - SHOWN));
        }
        let builder = if builder.is_empty() { "no reported builder" } else { builder };
        parts.push(if names.len() == 1 {
            format!("agent {list} runs {builder}")
        } else {
            format!("agents {list} run {builder}")
        });
    }
    format!("{platform}: {}", parts.join("; "))
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A capability name neither side knows.
#[derive(Debug, thiserror::Error)]
#[error("unknown builder capability {0:?}")]
pub struct UnknownCapability(pub String);

impl FromStr for Capability {
    type Err = UnknownCapability;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Capability::ALL.into_iter().find(|c| c.name() == s).ok_or_else(|| UnknownCapability(crate::shorten(s, 64)))
    }
}

/// A set of capabilities, one bit each: cheap to copy and compare in the
/// scheduler's inner loop.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CapSet(u32);

impl CapSet {
    pub const EMPTY: CapSet = CapSet(0);

    fn bit(c: Capability) -> u32 {
        // ALL lists every variant once; the position is below 32.
        let i = Capability::ALL.iter().position(|x| *x == c).unwrap_or(0);
        1 << i
    }

    pub fn insert(&mut self, c: Capability) {
        self.0 |= Self::bit(c);
    }

    pub fn remove(&mut self, c: Capability) {
        self.0 &= !Self::bit(c);
    }

    pub fn contains(self, c: Capability) -> bool {
        self.0 & Self::bit(c) != 0
    }

    /// Every capability of `other` is in `self`.
    pub fn has_all(self, other: CapSet) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn union(self, other: CapSet) -> CapSet {
        CapSet(self.0 | other.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Those of `self` that `have` lacks.
    pub fn missing_from(self, have: CapSet) -> CapSet {
        CapSet(self.0 & !have.0)
    }

    /// The members, in `Capability::ALL` order.
    pub fn iter(self) -> impl Iterator<Item = Capability> {
        Capability::ALL.into_iter().filter(move |c| self.contains(*c))
    }

    /// The wire names, in `Capability::ALL` order.
    pub fn names(self) -> Vec<String> {
        self.iter().map(|c| c.name().to_owned()).collect()
    }

    /// Parses wire names; the first unknown one is the error.
    pub fn parse<S: AsRef<str>>(names: &[S]) -> Result<CapSet, UnknownCapability> {
        let mut set = CapSet::EMPTY;
        for n in names {
            set.insert(n.as_ref().parse()?);
        }
        Ok(set)
    }
}

impl FromIterator<Capability> for CapSet {
    fn from_iter<I: IntoIterator<Item = Capability>>(iter: I) -> Self {
        let mut set = CapSet::EMPTY;
        for c in iter {
            set.insert(c);
        }
        set
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_name_parses_back_and_names_are_unique() {
        let mut names: Vec<&str> = Capability::ALL.iter().map(|c| c.name()).collect();
        for c in Capability::ALL {
            assert_eq!(c.name().parse::<Capability>().unwrap(), c);
        }
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Capability::ALL.len());
        assert!("nope".parse::<Capability>().is_err());
    }

    #[test]
    fn refusals_name_feature_provider_and_builders() {
        let missing: CapSet = [Capability::Heredocs].into_iter().collect();
        let agents =
            [("pi-01".to_owned(), "buildah 1.28.2".to_owned()), ("pi-02".to_owned(), "buildah 1.28.2".to_owned())];
        assert_eq!(
            refusal("linux/arm/v7", missing, &agents),
            "linux/arm/v7: heredocs (<<EOF) need buildah >= 1.33 or podman >= 4.8; agents pi-01, pi-02 run buildah 1.28.2"
        );
        let missing: CapSet = [Capability::Ulimits, Capability::CopyLink].into_iter().collect();
        let agents = [("d".to_owned(), "docker 20.10.24".to_owned()), ("b".to_owned(), "buildah 1.28.2".to_owned())];
        assert_eq!(
            refusal("linux/arm64", missing, &agents),
            "linux/arm64: COPY --link needs buildah >= 1.31 or podman >= 4.6; --ulimit needs buildah or podman; \
             agent d runs docker 20.10.24; agent b runs buildah 1.28.2"
        );
    }

    #[test]
    fn sets_hold_each_capability_apart() {
        let mut s = CapSet::EMPTY;
        for c in Capability::ALL {
            assert!(!s.contains(c));
            s.insert(c);
            assert!(s.contains(c));
        }
        assert_eq!(s.iter().count(), Capability::ALL.len());
        let needs: CapSet = [Capability::Heredocs, Capability::Secrets].into_iter().collect();
        let have: CapSet = [Capability::Secrets].into_iter().collect();
        assert!(!have.has_all(needs) && s.has_all(needs));
        assert_eq!(needs.missing_from(have).names(), ["heredocs"]);
        assert_eq!(CapSet::parse(&["ssh", "heredocs"]).unwrap().names(), ["ssh", "heredocs"]);
        assert!(CapSet::parse(&["ssh", "warp"]).unwrap_err().to_string().contains("\"warp\""));
    }
}
