//! After every platform is verified: one OCI image index, pushed under every
//! tag, with every platform's manifest present in each tag's repository.

use std::collections::HashMap;

use braid_shared::oci::{self, ImageDescriptor, IndexEntry, Registry};
use braid_shared::proto;
use braid_shared::{Digest, ImageRef, Platform};

use crate::model::{AnnotationLevel, Image, IndexFormat};

/// Checks a pushed image: its manifest exists in the registry and its config
/// names the platform the job was for.
pub async fn verify(
    registry: &Registry,
    repository: &ImageRef,
    digest: &Digest,
    platform: &Platform,
) -> Result<ImageDescriptor, String> {
    registry.verify_image(repository, digest, platform).await.map(|(d, _)| d).map_err(|e| e.to_string())
}

/// The index over every platform's image, as bytes and descriptor: an OCI
/// image index, or a Docker manifest list for `--format docker` (which
/// has no annotations).
pub fn index(
    images: &[(Platform, Image)],
    annotations: &[proto::Annotation],
    format: IndexFormat,
) -> Result<(Vec<u8>, ImageDescriptor), String> {
    let applies = |a: &proto::Annotation, level: AnnotationLevel, platform: Option<&Platform>| {
        AnnotationLevel::parse(&a.level) == Some(level)
            && (a.platform.is_empty()
                || platform.is_some_and(|p| a.platform.parse::<Platform>().ok().as_ref() == Some(p)))
    };
    let mut manifests = Vec::with_capacity(images.len());
    for (platform, image) in images {
        let annotations = annotations
            .iter()
            .filter(|a| applies(a, AnnotationLevel::ManifestDescriptor, Some(platform)))
            .map(|a| (a.key.clone(), a.value.clone()))
            .collect();
        manifests.push(IndexEntry { platform: platform.clone(), image: ImageDescriptor::from(image), annotations });
    }
    let (index, media_type) = if format == IndexFormat::Docker {
        (oci::build_manifest_list(&manifests).map_err(|e| e.to_string())?, oci::DOCKER_MANIFEST_LIST)
    } else {
        let index_annotations: HashMap<String, String> = annotations
            .iter()
            .filter(|a| applies(a, AnnotationLevel::Index, None))
            .map(|a| (a.key.clone(), a.value.clone()))
            .collect();
        (oci::build_index(&manifests, index_annotations).map_err(|e| e.to_string())?, oci::OCI_INDEX)
    };
    let descriptor =
        ImageDescriptor { digest: Digest::of(&index), size: index.len() as u64, media_type: media_type.into() };
    Ok((index, descriptor))
}

/// Pushes the index under every tag, first copying each platform's
/// manifest into any tag's repository that agents did not push to.
pub async fn push(
    registry: &Registry,
    tags: &[ImageRef],
    pushed_to: &[ImageRef],
    images: &[(Platform, Image)],
    index: &[u8],
    descriptor: &ImageDescriptor,
) -> Result<(), String> {
    for tag in tags {
        let Some(source) = pushed_to.iter().find(|r| r.registry() == tag.registry()) else {
            return Err(format!("no agent pushed to registry {}", tag.registry()));
        };
        if source.repository() != tag.repository() {
            for (_, image) in images {
                let digest = &image.digest;
                registry
                    .copy_by_digest(source, tag, digest, &image.media_type)
                    .await
                    .map_err(|e| format!("copying {digest} to {}: {e}", tag.name()))?;
            }
        }
        let tag = tag.clone().with_default_tag();
        registry.push_index(&tag, index, &descriptor.media_type).await.map_err(|e| format!("{tag}: {e}"))?;
        tracing::info!(%tag, index = %descriptor.digest, "index pushed");
    }
    Ok(())
}
