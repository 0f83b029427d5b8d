//! What the job needs of this agent's builder, checked again against the
//! Dockerfile it actually builds; and the build's `--build-context`
//! entries, fetched and unpacked beneath the job directory like the main
//! context.

use braid_shared::buildneeds::{self, ContextSource};
use braid_shared::capability::{self, CapSet};
use braid_shared::context::{self, ContextLimits};
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
    let builder = &env.settings.builder;
    if builder.name.is_empty() {
        return Ok(());
    }
    let scan = dockerfile::scan(dockerfile_text).map_err(build_failure)?;
    let needs = buildneeds::from_flags(spec).union(scan.needs);
    let have = CapSet::parse(&builder.capabilities).unwrap_or_default();
    let missing = needs.missing_from(have);
    if missing.is_empty() {
        return Ok(());
    }
    let label = format!("{} {}", builder.name, builder.version);
    Err(build_failure(capability::refusal(
        &platform.to_string(),
        missing,
        &[(env.settings.settings.name.clone(), label)],
    )))
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
            ContextSource::Image(_) | ContextSource::Local(_) => named.value.clone(),
            ContextSource::Uploaded(digest) => {
                let compressed = env
                    .cache
                    .get(&digest, a)
                    .await
                    .map_err(|e| infra(format!("fetching build context {} ({digest}): {e}", named.name)))?;
                let dir = job_dir.path().join("contexts").join(i.to_string());
                let unpack_dir = dir.clone();
                let unpacked = job_dir
                    .blocking(move || -> Result<_, String> {
                        std::fs::create_dir_all(&unpack_dir).map_err(|e| e.to_string())?;
                        let file = std::fs::File::open(&compressed).map_err(|e| e.to_string())?;
                        let decoder = braid_shared::compression::zstd_reader(file).map_err(|e| e.to_string())?;
                        context::unpack(decoder, &unpack_dir, ContextLimits::default()).map_err(|e| e.to_string())
                    })
                    .await;
                match unpacked {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(build_failure(format!("unpacking build context {}: {e}", named.name))),
                    Err(e) => return Err(infra(format!("unpacking build context {}: {e}", named.name))),
                }
                dir.display().to_string()
            }
        };
        out.push((named.name.clone(), value));
    }
    Ok(out)
}
