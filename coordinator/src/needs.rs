//! What a submitted build needs of a builder: the names the client sent,
//! checked, completed with what its flags need (recomputed here, whatever
//! the client said) and, for an inline Dockerfile, what a scan of it finds;
//! and the refusal when no agent of a platform has it.

use braid_shared::capability::{self, CapSet, Capability};
use braid_shared::{Platform, buildneeds, dockerfile, proto};

use crate::error::CoordinatorError;
use crate::farm::AgentEntry;

fn invalid(message: String) -> CoordinatorError {
    CoordinatorError::InvalidArgument(message)
}

/// Checks the spec's `needs`, `build_contexts`, `no_cache_filter` and
/// `syntax_directive`, and stores the union of everything the build needs.
pub fn complete(spec: &mut proto::BuildSpec) -> Result<CapSet, CoordinatorError> {
    buildneeds::check_build_contexts(&spec.build_contexts).map_err(|e| invalid(format!("build_contexts: {e}")))?;
    buildneeds::check_no_cache_filter(&spec.no_cache_filter).map_err(|e| invalid(format!("no_cache_filter: {e}")))?;
    buildneeds::check_provenance_spec(spec).map_err(|e| invalid(format!("provenance_mode: {e}")))?;
    if spec.needs.len() > Capability::ALL.len() {
        return Err(invalid(format!("needs: more than the {} known capabilities", Capability::ALL.len())));
    }
    let mut needs = CapSet::parse(&spec.needs).map_err(|e| invalid(format!("needs: {e}")))?;
    needs = needs.union(buildneeds::from_flags(spec));
    if !spec.dockerfile_inline.is_empty() {
        let scan = dockerfile::scan(&spec.dockerfile_inline).map_err(|e| invalid(format!("dockerfile_inline: {e}")))?;
        needs = needs.union(scan.needs);
        spec.syntax_directive = scan.syntax.unwrap_or_default();
    }
    if spec.syntax_directive.len() > 256 || spec.syntax_directive.chars().any(char::is_control) {
        return Err(invalid("syntax_directive: at most 256 bytes, no control characters".into()));
    }
    // A frontend image is reported where it is not honoured, never needed.
    needs.remove(Capability::SyntaxDirective);
    spec.needs = needs.names();
    Ok(needs)
}

/// For each platform: if agents are known that build it (natively, or by
/// emulation where the build allows it) and none has everything the build
/// needs, why not. A platform no agent builds is left to wait as before.
pub fn unmet<'a>(
    agents: impl Iterator<Item = &'a AgentEntry> + Clone,
    platforms: &[Platform],
    allow_emulation: bool,
    needs: CapSet,
) -> Option<String> {
    if needs.is_empty() {
        return None;
    }
    let caps = |a: &AgentEntry| a.builder.as_ref().map(|b| b.capabilities).unwrap_or_default();
    let mut refusals = Vec::new();
    for platform in platforms {
        let builds = |a: &&AgentEntry| {
            a.platforms.iter().any(|p| p.matches(platform))
                || (allow_emulation && a.emulates.iter().any(|p| p.matches(platform)))
        };
        // Asked under the farm's lock at every submit: stop at the first
        // agent that has it; gather candidates only to refuse.
        if agents.clone().filter(builds).any(|a| caps(a).has_all(needs)) {
            continue;
        }
        let candidates: Vec<&AgentEntry> = agents.clone().filter(builds).collect();
        if candidates.is_empty() {
            continue;
        }
        // What none of them has; else (each has some) what the first lacks.
        let had = candidates.iter().fold(CapSet::EMPTY, |acc, a| acc.union(caps(a)));
        let mut missing = needs.missing_from(had);
        if missing.is_empty() {
            missing = needs.missing_from(caps(candidates[0]));
        }
        let named: Vec<(String, String)> = candidates
            .iter()
            .map(|a| (a.name.clone(), a.builder.as_ref().map(|b| b.label()).unwrap_or_default()))
            .collect();
        refusals.push(capability::refusal(&platform.to_string(), missing, &named));
    }
    (!refusals.is_empty()).then(|| refusals.join("\n"))
}

/// A `# syntax=` directive the agent's builder does not honour, as a
/// notice on the build (not a refusal: the builder parses the Dockerfile
/// with its own parser, which reads the same instructions).
pub fn syntax_notice(syntax: &str, platform: &str, agent: Option<&AgentEntry>) -> Option<proto::build_event::Kind> {
    if syntax.is_empty() {
        return None;
    }
    let builder = agent.and_then(|a| a.builder.as_ref());
    if builder.is_some_and(|b| b.capabilities.contains(Capability::SyntaxDirective)) {
        return None;
    }
    let who = builder.map_or_else(|| "the agent's builder".to_owned(), |b| b.label());
    Some(proto::build_event::Kind::Notice(proto::Notice {
        platform: platform.to_owned(),
        text: format!("# syntax={syntax} is not honoured on {platform}: {who} parses the Dockerfile itself"),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(name: &str, platforms: &[&str], builder: Option<(&str, &[Capability])>) -> AgentEntry {
        AgentEntry {
            name: name.into(),
            platforms: platforms.iter().map(|p| p.parse().unwrap()).collect(),
            slots: 1,
            backend: String::new(),
            version: String::new(),
            running: Default::default(),
            session: 0,
            connected: true,
            last_seen_ms: 0,
            cordoned: false,
            emulates: vec!["linux/arm64".parse().unwrap()],
            draining: false,
            lost: false,
            cert: None,
            builder: builder.map(|(label, caps)| {
                let (name, version) = label.split_once(' ').unwrap();
                crate::model::Builder {
                    name: name.into(),
                    version: version.into(),
                    capabilities: caps.iter().copied().collect(),
                }
            }),
            health: None,
            labels: Default::default(),
            memory_label: None,
        }
    }

    #[test]
    fn a_platform_whose_known_agents_all_lack_a_need_is_refused() {
        let old: &[Capability] = &[Capability::Secrets];
        let new: &[Capability] = &[Capability::Secrets, Capability::Heredocs];
        let agents = [
            agent("pi-01", &["linux/arm/v7"], Some(("buildah 1.28.2", old))),
            agent("pi-02", &["linux/arm/v7"], Some(("buildah 1.28.2", old))),
            agent("amd", &["linux/amd64"], Some(("buildah 1.33.0", new))),
            agent("bare", &["linux/riscv64"], None),
        ];
        let p = |s: &str| -> Platform { s.parse().unwrap() };
        let heredocs: CapSet = [Capability::Heredocs].into_iter().collect();
        let why = unmet(agents.iter(), &[p("linux/amd64"), p("linux/arm/v7")], false, heredocs).unwrap();
        assert_eq!(
            why,
            "linux/arm/v7: heredocs (<<EOF) need buildah >= 1.33 or podman >= 4.8; agents pi-01, pi-02 run buildah 1.28.2"
        );
        // A platform no agent builds waits as before; nothing needed, nothing refused.
        assert_eq!(unmet(agents.iter(), &[p("linux/s390x")], false, heredocs), None);
        assert_eq!(unmet(agents.iter(), &[p("linux/arm/v7")], false, CapSet::EMPTY), None);
        // An agent that reports no builder has nothing.
        let why = unmet(agents.iter(), &[p("linux/riscv64")], false, heredocs).unwrap();
        assert!(why.ends_with("agent bare runs no reported builder"), "{why}");
        // With emulation, an agent that emulates the platform and can counts.
        assert_eq!(unmet(agents.iter(), &[p("linux/arm64")], true, heredocs), None);
        assert_eq!(unmet(agents.iter(), &[p("linux/arm64")], false, heredocs), None, "no native agent: waits");
    }

    /// Agents' builders are stored, so agents known from before a restart
    /// still show theirs until they reconnect; a forgotten agent's goes.
    #[test]
    fn builders_are_stored_and_forgotten() {
        use crate::store::Write;
        use crate::stores::Store;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("braid.db")).unwrap();
        let b = crate::model::Builder {
            name: "buildah".into(),
            version: "1.28.2".into(),
            capabilities: [Capability::Secrets, Capability::Ulimits].into_iter().collect(),
        };
        store.write(&[Write::Builder("pi-01", Some(&b)), Write::Builder("pi-02", Some(&b))]).unwrap();
        let newer = crate::model::Builder { version: "1.33.0".into(), ..b.clone() };
        store.write(&[Write::Builder("pi-01", Some(&newer)), Write::Builder("pi-02", None)]).unwrap();
        drop(store);
        let store = Store::open(&dir.path().join("braid.db")).unwrap();
        assert_eq!(store.builders().unwrap(), [("pi-01".to_owned(), newer)]);
    }

    #[test]
    fn flags_and_inline_dockerfiles_are_recomputed() {
        let mut spec = proto::BuildSpec {
            needs: vec!["copy-link".into()],
            ulimits: vec![proto::Ulimit { name: "nofile".into(), soft: 1, hard: 1 }],
            dockerfile_inline: b"# syntax=docker/dockerfile:1\nFROM a\nRUN <<EOF\nx\nEOF\n".to_vec(),
            ..Default::default()
        };
        complete(&mut spec).unwrap();
        assert_eq!(spec.needs, ["heredocs", "copy-link", "ulimits"]);
        assert_eq!(spec.syntax_directive, "docker/dockerfile:1");
        let mut bad = proto::BuildSpec { needs: vec!["warp-drive".into()], ..Default::default() };
        let e = complete(&mut bad).unwrap_err().to_string();
        assert!(e.contains("needs: unknown builder capability \"warp-drive\""), "{e}");
        let mut bad = proto::BuildSpec { no_cache_filter: vec!["a b".into()], ..Default::default() };
        assert!(complete(&mut bad).unwrap_err().to_string().contains("no_cache_filter: --no-cache-filter"));
        let mut bad = proto::BuildSpec {
            build_contexts: vec![proto::NamedContext { name: "x".into(), value: "/etc".into() }],
            ..Default::default()
        };
        assert!(complete(&mut bad).unwrap_err().to_string().contains("build_contexts: --build-context x="));
    }
}
