//! The shared layer cache (`--cache-from`, `--cache-to`) as each builder
//! spells it, and the lines that say, in braid's words, which cache each
//! platform used.
//!
//! buildah and podman (`--layers --cache-from REPO --cache-to REPO`) push
//! the image of every step they build to REPO, tagged with the step's cache
//! key, and look a step's key up there before running it. Each platform
//! uses its own repository (`braid_shared::cache::platform_repository`):
//! buildah's key does not always tell platforms apart (a `FROM scratch`
//! step), and one place per platform keeps every platform's cache.

use braid_shared::cache::{describe, entry_repository};
use braid_shared::{Platform, proto};

/// The builder arguments for one platform's cache, and what to tell the user.
#[derive(Debug, Default)]
pub(super) struct BuildahCache {
    pub args: Vec<String>,
    /// Said before the build.
    pub lines: Vec<String>,
    from: Option<String>,
    to: Option<String>,
}

/// buildah's (and podman's) cache flags for `platform`; an entry the builder
/// cannot honour fails the job with a message naming it.
pub(super) fn buildah_cache(
    spec: &proto::BuildSpec,
    platform: &Platform,
    backend: &str,
) -> Result<BuildahCache, String> {
    let mut plan = BuildahCache::default();
    let one = |list: &[proto::CacheOption], flag: &str| -> Result<Option<(String, String)>, String> {
        let mut found = None;
        for entry in list {
            if entry.r#type != "registry" {
                let why = if entry.r#type == "inline" {
                    "an inline cache is written by BuildKit; the build needs an agent whose Docker Engine has BuildKit"
                } else {
                    "not a type this builder reads or writes"
                };
                return Err(format!("{flag} {:?}: {backend} cannot honour it: {why}", describe(entry)));
            }
            if found.is_some() {
                return Err(format!(
                    "{flag}: this agent's {backend} takes one registry cache repository; the build gives {}",
                    list.len()
                ));
            }
            let repo = entry_repository(entry, platform)?.name();
            found = Some((repo, describe(entry)));
        }
        Ok(found)
    };
    if let Some((repo, entry)) = one(&spec.cache_from, "--cache-from")? {
        plan.args.extend(["--cache-from".to_owned(), repo.clone()]);
        plan.lines.push(if spec.no_cache {
            format!("cache: {platform} does not read {repo} (--cache-from {entry}): --no-cache")
        } else {
            format!("cache: {platform} looks each step up in {repo} (--cache-from {entry})")
        });
        plan.from = Some(repo);
    }
    if let Some((repo, entry)) = one(&spec.cache_to, "--cache-to")? {
        plan.args.extend(["--cache-to".to_owned(), repo.clone()]);
        let mode = spec.cache_to.first().and_then(|e| e.attrs.get("mode")).map_or("min", String::as_str);
        let honest = if mode == "max" {
            String::new()
        } else {
            format!("; mode={mode} asked, but {backend} exports every layer it builds, as mode=max")
        };
        plan.lines
            .push(format!("cache: {platform} exports each step it builds to {repo} (--cache-to {entry}{honest})"));
        plan.to = Some(repo);
    }
    Ok(plan)
}

/// Counts what the builder said about its cache, for the closing line.
#[derive(Debug, Default)]
pub(super) struct CacheTally {
    pulled: usize,
    used: usize,
    pushed: usize,
}

impl CacheTally {
    /// One line of buildah's output.
    pub fn observe(&mut self, line: &str) {
        let line = line.trim_start();
        if line.starts_with("--> Cache pulled from remote") {
            self.pulled += 1;
        } else if line.starts_with("--> Using cache") {
            self.used += 1;
        } else if line.starts_with("--> Pushing cache") {
            self.pushed += 1;
        }
    }

    /// What the cache did for this platform, in braid's words; nothing
    /// when the build had no cache flags.
    pub fn summary(&self, plan: &BuildahCache, platform: &Platform) -> Vec<String> {
        let mut out = Vec::new();
        let local = self.used.saturating_sub(self.pulled);
        if let Some(repo) = &plan.from {
            out.push(match self.pulled {
                0 => format!(
                    "cache: {platform} took no step from {repo} (none cached there yet, or the steps changed); \
                     {local} from this agent's own cache"
                ),
                n => format!(
                    "cache: {platform} took {n} step{} from {repo}; {local} from this agent's own cache",
                    if n == 1 { "" } else { "s" }
                ),
            });
        }
        if let Some(repo) = &plan.to {
            out.push(format!("cache: {platform} exported {} step{} to {repo}", self.pushed, plural(self.pushed)));
        }
        out
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// `docker build` (BuildKit) arguments for the cache, for the Docker Engine
/// backend: each `--cache-from` registry ref as is (BuildKit reads an image's
/// inline cache and picks the platform's manifest from an index itself, so
/// the ref is the same for every platform), and `--cache-to type=inline` as
/// `BUILDKIT_INLINE_CACHE=1`. Call `docker_cache_refusal` first: `docker
/// build` cannot export a registry cache.
pub fn docker_cache_args(spec: &proto::BuildSpec, _platform: &Platform) -> Vec<String> {
    let mut args = Vec::new();
    for entry in spec.cache_from.iter().filter(|e| e.r#type == "registry") {
        if let Some(reference) = entry.attrs.get("ref") {
            args.extend(["--cache-from".to_owned(), reference.clone()]);
        }
    }
    if spec.cache_to.iter().any(|e| e.r#type == "inline") {
        args.extend(["--build-arg".to_owned(), "BUILDKIT_INLINE_CACHE=1".to_owned()]);
    }
    args
}

/// What the Docker Engine backend says, in braid's words, before the
/// build: which caches this platform reads and what it writes.
pub fn docker_cache_lines(spec: &proto::BuildSpec, platform: &Platform) -> Vec<String> {
    let mut out = Vec::new();
    for entry in spec.cache_from.iter().filter(|e| e.r#type == "registry") {
        if let Some(reference) = entry.attrs.get("ref") {
            let no_cache = if spec.no_cache { " (not read: --no-cache)" } else { "" };
            out.push(format!("cache: {platform} reads the inline cache of {reference}{no_cache}"));
        }
    }
    if spec.cache_to.iter().any(|e| e.r#type == "inline") {
        out.push(format!("cache: {platform} writes an inline cache into its image (--cache-to type=inline)"));
    }
    out
}

/// Why the Docker Engine backend cannot honour a build's cache entries, if
/// it cannot: `docker build` has no `--cache-to` (buildx has).
pub fn docker_cache_refusal(spec: &proto::BuildSpec) -> Option<String> {
    let entries =
        spec.cache_from.iter().map(|e| ("--cache-from", e)).chain(spec.cache_to.iter().map(|e| ("--cache-to", e)));
    for (flag, entry) in entries {
        let ok = match flag {
            "--cache-from" => entry.r#type == "registry",
            _ => entry.r#type == "inline",
        };
        if !ok {
            return Some(format!(
                "{flag} {:?}: the Docker Engine backend builds with `docker build`, which reads registry caches \
                 and writes only an inline one; use a buildah or podman agent for --cache-to type=registry",
                describe(entry)
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use braid_shared::cache::{Direction, parse};

    fn spec(from: &[&str], to: &[&str]) -> proto::BuildSpec {
        let own = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        proto::BuildSpec {
            cache_from: parse(Direction::From, &own(from), &[]).unwrap(),
            cache_to: parse(Direction::To, &own(to), &[]).unwrap(),
            ..Default::default()
        }
    }

    fn arm() -> Platform {
        "linux/arm/v7".parse().unwrap()
    }

    #[test]
    fn buildah_gets_the_platforms_repository() {
        let s = spec(&["r.io/cache/app"], &["type=registry,ref=r.io/cache/app,mode=max"]);
        let plan = buildah_cache(&s, &arm(), "buildah").unwrap();
        assert_eq!(
            plan.args,
            ["--cache-from", "r.io/cache/app-linux-arm-v7", "--cache-to", "r.io/cache/app-linux-arm-v7"]
        );
        assert!(plan.lines[0].contains("linux/arm/v7 looks each step up in r.io/cache/app-linux-arm-v7"));
        assert!(!plan.lines[1].contains("mode=min asked"), "{}", plan.lines[1]);
        let min = buildah_cache(&spec(&[], &["type=registry,ref=r.io/a"]), &arm(), "buildah").unwrap();
        assert!(min.lines[0].contains("mode=min asked, but buildah exports every layer"), "{}", min.lines[0]);
        assert!(buildah_cache(&spec(&[], &[]), &arm(), "buildah").unwrap().args.is_empty());
    }

    #[test]
    fn buildah_refuses_what_it_cannot_do() {
        let e = buildah_cache(&spec(&[], &["type=inline"]), &arm(), "podman").unwrap_err();
        assert!(e.contains("--cache-to \"type=inline\": podman cannot honour it"), "{e}");
        let e = buildah_cache(&spec(&["r.io/a,r.io/b"], &[]), &arm(), "buildah").unwrap_err();
        assert!(e.contains("takes one registry cache repository; the build gives 2"), "{e}");
    }

    #[test]
    fn tally_reports_the_source() {
        let s = spec(&["r.io/cache/app"], &[]);
        let plan = buildah_cache(&s, &arm(), "buildah").unwrap();
        let mut tally = CacheTally::default();
        for line in [
            "STEP 2/3: RUN work",
            "--> Cache pulled from remote r.io/cache/app-linux-arm-v7:6b58",
            "--> Using cache 4b52",
            "--> Using cache 57d7",
        ] {
            tally.observe(line);
        }
        assert_eq!(
            tally.summary(&plan, &arm()),
            ["cache: linux/arm/v7 took 1 step from r.io/cache/app-linux-arm-v7; 1 from this agent's own cache"]
        );
    }

    #[test]
    fn docker_args_merge() {
        let s = spec(&["r.io/app:1", "type=registry,ref=r.io/app:2"], &["type=inline"]);
        assert_eq!(docker_cache_refusal(&s), None);
        assert_eq!(
            docker_cache_args(&s, &arm()),
            ["--cache-from", "r.io/app:1", "--cache-from", "r.io/app:2", "--build-arg", "BUILDKIT_INLINE_CACHE=1"]
        );
        assert!(docker_cache_args(&spec(&[], &[]), &arm()).is_empty());
        assert_eq!(
            docker_cache_lines(&s, &arm()),
            [
                "cache: linux/arm/v7 reads the inline cache of r.io/app:1",
                "cache: linux/arm/v7 reads the inline cache of r.io/app:2",
                "cache: linux/arm/v7 writes an inline cache into its image (--cache-to type=inline)",
            ]
        );
        let e = docker_cache_refusal(&spec(&[], &["type=registry,ref=r.io/c"])).unwrap();
        assert!(e.starts_with("--cache-to \"type=registry,ref=r.io/c\": the Docker Engine backend"), "{e}");
    }
}
