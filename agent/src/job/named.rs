//! What the job needs of this agent's builder, checked again against the
//! Dockerfile it actually builds; and the build's `--build-context`
//! entries, fetched and unpacked beneath the job directory like the main
//! context.

use braid_shared::buildneeds::{self, ContextSource};
use braid_shared::capability::{self, CapSet};
use braid_shared::{Platform, dockerfile, proto};

use super::{JobEnv, Outcome, build_failure, infra};
use crate::jobdir::JobDir;

/// The coordinator placed the job on a builder that has what it needs;
/// this checks again (the Dockerfile read here is the one built), with
/// the coordinator's message.
pub(super) fn check_needs(
    env: &JobEnv,
    spec: &proto::BuildSpec,
    platform: &Platform,
    dockerfile_text: &[u8],
) -> Result<(), Outcome> {
    match unmet(&env.settings.builder, &env.settings.settings.name, spec, platform, dockerfile_text) {
        Some(why) => Err(build_failure(why)),
        None => Ok(()),
    }
}

/// Why `builder` (on agent `agent`) cannot build this, if it cannot.
fn unmet(
    builder: &proto::BuilderInfo,
    agent: &str,
    spec: &proto::BuildSpec,
    platform: &Platform,
    dockerfile_text: &[u8],
) -> Option<String> {
    if builder.name.is_empty() {
        return None;
    }
    let scan = match dockerfile::scan(dockerfile_text) {
        Ok(scan) => scan,
        Err(e) => return Some(e.to_string()),
    };
    let needs = buildneeds::from_flags(spec).union(scan.needs);
    let have = CapSet::parse(&builder.capabilities).unwrap_or_default();
    let missing = needs.missing_from(have);
    if missing.is_empty() {
        return None;
    }
    let label = format!("{} {}", builder.name, builder.version);
    Some(capability::refusal(&platform.to_string(), missing, &[(agent.to_owned(), label)]))
}

/// Each `--build-context` as the builder takes it: `NAME=docker-image://REF`
/// as given, an uploaded directory fetched, unpacked under
/// `contexts/N` in the job directory, and named by that path.
pub(super) async fn fetch_build_contexts(
    env: &JobEnv,
    a: &proto::Assignment,
    spec: &proto::BuildSpec,
    job_dir: &JobDir,
) -> Result<Vec<(String, String)>, Outcome> {
    let sources = buildneeds::check_build_contexts(&spec.build_contexts).map_err(build_failure)?;
    let mut out = Vec::new();
    for (i, (named, source)) in spec.build_contexts.iter().zip(sources).enumerate() {
        let value = match source {
            ContextSource::Image(_) | ContextSource::Local(_) | ContextSource::Remote(_) => named.value.clone(),
            ContextSource::Uploaded(digest) => {
                let compressed = env
                    .cache
                    .get(&digest, a)
                    .await
                    .map_err(|e| infra(format!("fetching build context {} ({digest}): {e}", named.name)))?;
                let dir = job_dir.path().join("contexts").join(i.to_string());
                let what = format!("build context {}", named.name);
                super::unpack_context(job_dir, compressed, dir.clone(), &what).await?;
                dir.display().to_string()
            }
        };
        out.push((named.name.clone(), value));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_dockerfile_built_is_checked_again() {
        let buildah = proto::BuilderInfo {
            name: "buildah".into(),
            version: "1.28.2".into(),
            capabilities: vec!["secrets".into(), "ulimits".into()],
        };
        let amd64: Platform = "linux/amd64".parse().unwrap();
        let spec = proto::BuildSpec::default();
        let heredoc = b"FROM a\nRUN <<EOF\ntrue\nEOF\n";
        assert_eq!(
            unmet(&buildah, "x86-01", &spec, &amd64, heredoc).unwrap(),
            "linux/amd64: heredocs (<<EOF) need buildah >= 1.33 or podman >= 4.8; agent x86-01 runs buildah 1.28.2"
        );
        assert_eq!(unmet(&buildah, "x86-01", &spec, &amd64, b"FROM a\nRUN --mount=type=secret,id=s true\n"), None);
        let network = proto::BuildSpec { network: "host".into(), ..Default::default() };
        assert!(unmet(&buildah, "x86-01", &network, &amd64, b"FROM a\n").unwrap().contains("--network host needs"));
        // An agent that did not probe (no name) leaves it to the builder.
        assert_eq!(unmet(&proto::BuilderInfo::default(), "x", &network, &amd64, heredoc), None);
    }
}
