//! What the agent reports for a build's provenance statement: the digest
//! of the Dockerfile it built and each base image (FROM) with the digest
//! its registry gives for the reference, read with the job's credentials
//! after the build. One way for every backend: buildah, podman and the
//! Docker Engine all resolve FROM the same way (the reference at its
//! registry), and the registry is what the statement's reader can check.

use std::time::Duration;

use braid_shared::oci::Registry;
use braid_shared::{Digest, ImageRef, dockerfile, proto};

/// How long one base image's registry answer may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(30);

/// The report for a built job (only asked for when the build makes
/// provenance). A base image that cannot be resolved is reported without
/// a digest: the statement then says its materials are incomplete.
pub(super) async fn report(
    spec: &proto::BuildSpec,
    dockerfile_text: &[u8],
    registry: &Registry,
) -> proto::JobProvenance {
    let bases = dockerfile::scan(dockerfile_text).map(|s| s.base_images).unwrap_or_default();
    let mut base_images = Vec::with_capacity(bases.len());
    for written in bases {
        // A FROM a named context names that context, not an image.
        if spec.build_contexts.iter().any(|c| c.name == written) {
            continue;
        }
        let reference = substitute(&written, spec);
        let digest = resolve(registry, &reference).await.map(|d| d.to_string()).unwrap_or_default();
        base_images.push(proto::BaseImage { reference, digest });
    }
    proto::JobProvenance { dockerfile_digest: Digest::of(dockerfile_text).to_string(), base_images }
}

/// `$NAME` and `${NAME}` from the build args (a FROM's ARGs); others stay.
fn substitute(written: &str, spec: &proto::BuildSpec) -> String {
    let mut out = written.to_owned();
    for (k, v) in &spec.build_args {
        out = out.replace(&format!("${{{k}}}"), v).replace(&format!("${k}"), v);
    }
    out
}

async fn resolve(registry: &Registry, reference: &str) -> Option<Digest> {
    let r: ImageRef = reference.parse().ok()?;
    if let Some(d) = r.digest() {
        return d.to_string().parse().ok();
    }
    let fetched = tokio::time::timeout(RESOLVE_TIMEOUT, registry.fetch_manifest(&r.with_default_tag())).await;
    match fetched {
        Ok(Ok((bytes, _))) => Some(Digest::of(&bytes)),
        Ok(Err(e)) => {
            tracing::info!(reference, error = %e, "base image not resolved for provenance");
            None
        }
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_args_fill_in_from_references() {
        let spec = proto::BuildSpec {
            build_args: [("TAG".to_owned(), "3.19".to_owned())].into_iter().collect(),
            ..Default::default()
        };
        assert_eq!(substitute("alpine:${TAG}", &spec), "alpine:3.19");
        assert_eq!(substitute("alpine:$TAG", &spec), "alpine:3.19");
        assert_eq!(substitute("alpine:$OTHER", &spec), "alpine:$OTHER");
    }
}
