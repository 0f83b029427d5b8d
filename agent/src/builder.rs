//! What this agent's builder is and what it can do, probed at start and
//! reported in the hello: the coordinator places a job only on an agent
//! whose builder has everything the build needs.
//!
//! buildah and podman: the version (`--version`) decides what their
//! Dockerfile parser understands (heredocs, `COPY --link`, RUN mounts);
//! `build --help` decides the flags (`--secret`, `--build-context`...). The
//! Docker Engine: its classic builder, or BuildKit when the agent builds
//! through it.

use braid_shared::capability::{CapSet, Capability};
use braid_shared::proto;

use crate::docker;
use crate::settings::Valid;

/// A builder version, major.minor.patch.
pub type Version = (u32, u32, u32);

/// The version in `buildah version 1.28.2 (image-spec ...)` or
/// `podman version 4.3.1` (also `4.9.0-dev`, `20.10.24`).
pub fn parse_version(output: &str) -> Option<Version> {
    let mut words = output.split_whitespace();
    let word = match words.clone().position(|w| w.eq_ignore_ascii_case("version")) {
        Some(at) => words.nth(at + 1)?,
        None => words.next()?,
    };
    let word = word.trim_start_matches('v');
    let mut parts = word.split(|c: char| !c.is_ascii_digit()).take(3).map(|p| p.parse::<u32>().ok());
    let major = parts.next()??;
    let minor = parts.next().flatten().unwrap_or(0);
    let patch = parts.next().flatten().unwrap_or(0);
    Some((major, minor, patch))
}

/// Whether `build --help` lists `flag` (`--secret`, not `--secret-x`).
pub fn help_has(help: &str, flag: &str) -> bool {
    help.lines().any(|line| line.split([' ', ',', '\t', '=']).any(|w| w == flag))
}

/// What buildah or podman (`tool`) of `version` with this `build --help`
/// can do.
pub fn containers_capabilities(tool: &str, version: Version, help: &str) -> CapSet {
    // (buildah, podman) version that brought each Dockerfile feature.
    let since =
        |buildah: Version, podman: Version| if tool == "podman" { version >= podman } else { version >= buildah };
    let mut caps = CapSet::EMPTY;
    let mut have = |yes: bool, c: Capability| {
        if yes {
            caps.insert(c);
        }
    };
    let mounts = since((1, 24, 0), (4, 0, 0));
    have(help_has(help, "--secret") && mounts, Capability::Secrets);
    have(help_has(help, "--ssh") && mounts, Capability::Ssh);
    have(mounts, Capability::CacheMounts);
    have(mounts, Capability::BindMounts);
    have(mounts, Capability::TmpfsMounts);
    have(since((1, 24, 0), (4, 0, 0)), Capability::CopyChmod);
    have(since((1, 33, 0), (4, 8, 0)), Capability::Heredocs);
    have(since((1, 31, 0), (4, 6, 0)), Capability::CopyLink);
    have(help_has(help, "--build-context"), Capability::BuildContexts);
    have(help_has(help, "--cache-from"), Capability::RegistryCacheImport);
    have(help_has(help, "--cache-to"), Capability::RegistryCacheExport);
    have(help_has(help, "--no-cache-filter"), Capability::NoCacheFilter);
    let network = help_has(help, "--network");
    have(network, Capability::NetworkNone);
    have(network, Capability::NetworkHost);
    have(help_has(help, "--add-host"), Capability::AddHosts);
    have(help_has(help, "--ulimit"), Capability::Ulimits);
    have(help_has(help, "--shm-size"), Capability::ShmSize);
    caps
}

/// What the Docker Engine's builder can do: the classic builder (the
/// Engine API without a session), or BuildKit (Docker 20.10's builtin
/// Dockerfile frontend: no heredocs, no `COPY --link`).
pub fn docker_capabilities(buildkit: bool) -> Vec<Capability> {
    use Capability::*;
    if buildkit {
        vec![
            Secrets,
            Ssh,
            CacheMounts,
            BindMounts,
            TmpfsMounts,
            CopyChmod,
            RegistryCacheImport,
            InlineCacheExport,
            NetworkNone,
            NetworkHost,
            AddHosts,
            ShmSize,
            SyntaxDirective,
        ]
    } else {
        vec![NetworkNone, NetworkHost, AddHosts, ShmSize]
    }
}

/// Takes away what this agent's settings forbid. (buildah's chroot
/// isolation, which cannot honour --network none or --shm-size, is the
/// agent's choice of isolation, not its builder's: the job refuses those.)
fn restrict(mut caps: CapSet, valid: &Valid) -> CapSet {
    if !valid.settings.allow_network_host {
        caps.remove(Capability::NetworkHost);
    }
    caps
}

fn info(name: &str, version: String, caps: CapSet) -> proto::BuilderInfo {
    proto::BuilderInfo { name: name.to_owned(), version, capabilities: caps.names() }
}

/// Probes the builder; fails early, with how to fix it, when it is missing
/// or broken.
pub async fn probe(valid: &Valid) -> anyhow::Result<proto::BuilderInfo> {
    let backend = valid.backend.as_str();
    if backend == "docker" {
        let version = match docker::check(&valid.docker_host).await {
            Ok(version) => version,
            Err(e) if valid.backend_detected => anyhow::bail!(
                "no builder found: buildah and podman are not installed, and {e}; \
                 install one (apt-get install buildah) or start a Docker Engine"
            ),
            Err(e) => anyhow::bail!("the docker backend cannot reach the Engine: {e}; is dockerd running?"),
        };
        // What the start-up probe found: BuildKit through the docker CLI, or the classic builder.
        let caps: CapSet = docker_capabilities(valid.docker_buildkit.is_some()).into_iter().collect();
        return Ok(info("docker", version, restrict(caps, valid)));
    }
    let output = tokio::process::Command::new(backend).arg("--version").output().await;
    let text = match output {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        Ok(o) => anyhow::bail!("{backend} --version failed: {}", String::from_utf8_lossy(&o.stderr).trim()),
        Err(e) => anyhow::bail!("{backend} not found ({e}); install it, e.g. apt-get install {backend}"),
    };
    let version = parse_version(&text).ok_or_else(|| anyhow::anyhow!("{backend} --version: no version in {text:?}"))?;
    let help = tokio::process::Command::new(backend).args(["build", "--help"]).output().await;
    // Without the help text the flags' capabilities are not claimed: builds
    // that need them go elsewhere or are refused, never run without them.
    let help = match help {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        Ok(o) => {
            let stderr = String::from_utf8_lossy(&o.stderr);
            tracing::warn!(error = %stderr.trim(), "{backend} build --help failed: reporting no flag capabilities");
            String::new()
        }
        Err(e) => {
            tracing::warn!(error = %e, "{backend} build --help failed: reporting no flag capabilities");
            String::new()
        }
    };
    let caps = containers_capabilities(backend, version, &help);
    let (a, b, c) = version;
    Ok(info(backend, format!("{a}.{b}.{c}"), restrict(caps, valid)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// `buildah build --help` of buildah 1.28.2, the lines that matter.
    const BUILDAH_1_28_HELP: &str = "\
Build an image using instructions in a Containerfile

Usage:
  buildah build [flags]

Flags:
      --add-host host:ip                             add a custom host-to-IP mapping (host:ip) (default [])
      --build-context argument=value                 argument=value to supply additional build context to the builder
      --cache-from string                            remote repository to utilise as potential cache source.
      --cache-to string                              remote repository to utilise as potential cache destination.
  -f, --file pathname                                pathname or URL of a Dockerfile
      --network string                               'private', 'none', 'ns:path' of network namespace to join, or 'host'
      --no-cache                                     do not use existing cached images for the container build. Build from the start with a new set of cached layers.
      --secret stringArray                           secret file to expose to the build
      --shm-size <number><unit>                      size of '/dev/shm'. The format is <number><unit>. (default \"65536k\")
      --ssh stringArray                              SSH agent socket or keys to expose to the build. (format: default|<id>[=<socket>|<key>[,<key>]])
      --ulimit strings                               ulimit options (default [nproc=32768:32768])
";

    #[test]
    fn versions_parse_from_real_output() {
        let buildah = "buildah version 1.28.2 (image-spec 1.1.0-rc2, runtime-spec 1.0.2-dev)";
        assert_eq!(parse_version(buildah), Some((1, 28, 2)));
        assert_eq!(parse_version("podman version 4.3.1"), Some((4, 3, 1)));
        assert_eq!(parse_version("podman version 4.9.0-dev"), Some((4, 9, 0)));
        assert_eq!(parse_version("buildah version 1.33"), Some((1, 33, 0)));
        assert_eq!(parse_version("20.10.24"), Some((20, 10, 24)));
        assert_eq!(parse_version("buildah version"), None);
        assert_eq!(parse_version(""), None);
    }

    #[test]
    fn buildah_1_28_has_mounts_and_contexts_but_no_heredocs() {
        let caps = containers_capabilities("buildah", (1, 28, 2), BUILDAH_1_28_HELP);
        for c in ["secrets", "ssh", "cache-mounts", "build-contexts", "registry-cache-import", "registry-cache-export"]
        {
            assert!(caps.names().iter().any(|n| n == c), "{c}");
        }
        for c in [Capability::Heredocs, Capability::CopyLink, Capability::NoCacheFilter, Capability::SyntaxDirective] {
            assert!(!caps.contains(c), "{c}");
        }
        assert!(caps.contains(Capability::Ulimits) && caps.contains(Capability::NetworkHost));
        // A newer buildah parses heredocs and COPY --link.
        let new = containers_capabilities("buildah", (1, 33, 0), BUILDAH_1_28_HELP);
        assert!(new.contains(Capability::Heredocs) && new.contains(Capability::CopyLink));
        // podman counts in its own versions.
        let podman = containers_capabilities("podman", (4, 3, 1), BUILDAH_1_28_HELP);
        assert!(!podman.contains(Capability::Heredocs) && podman.contains(Capability::CopyChmod));
        assert!(containers_capabilities("podman", (4, 8, 0), BUILDAH_1_28_HELP).contains(Capability::Heredocs));
        // A flag the help does not list is not had.
        let bare = containers_capabilities("buildah", (1, 28, 2), "Flags:\n      --secret-file x\n");
        assert!(!bare.contains(Capability::Secrets) && !bare.contains(Capability::BuildContexts));
    }

    #[test]
    fn docker_sets() {
        let classic: CapSet = docker_capabilities(false).into_iter().collect();
        assert_eq!(classic.names(), ["network-none", "network-host", "add-hosts", "shm-size"]);
        let buildkit: CapSet = docker_capabilities(true).into_iter().collect();
        assert!(buildkit.contains(Capability::Secrets) && buildkit.contains(Capability::SyntaxDirective));
        assert!(!buildkit.contains(Capability::Heredocs) && !buildkit.contains(Capability::Ulimits));
    }
}
