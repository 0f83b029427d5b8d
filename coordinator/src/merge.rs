//! After every platform is verified: one OCI image index, pushed under every
//! tag, with every platform's manifest present in each tag's repository.

use std::collections::HashMap;

use braid_shared::oci::{self, ImageDescriptor, IndexEntry, Registry};
use braid_shared::proto;
use braid_shared::{Digest, ImageRef, Platform};

use crate::farm::ImageRecord;

/// Checks a pushed image: its manifest exists in the registry and its config
/// names the platform the job was for.
pub async fn verify(
    registry: &Registry,
    repository: &ImageRef,
    digest: &str,
    platform: &Platform,
) -> Result<ImageDescriptor, String> {
    let digest: Digest = digest.parse().map_err(|e| format!("{e}"))?;
    registry.verify_image(repository, &digest, platform).await.map(|(d, _)| d).map_err(|e| e.to_string())
}

/// Writes the index and pushes it under every tag.
pub async fn merge(
    registry: &Registry,
    tags: &[ImageRef],
    pushed_to: &[ImageRef],
    images: &[(Platform, ImageRecord)],
    annotations: &[proto::Annotation],
) -> Result<ImageDescriptor, String> {
    let applies = |a: &proto::Annotation, level: &str, platform: Option<&Platform>| {
        a.level == level
            && (a.platform.is_empty()
                || platform.is_some_and(|p| a.platform.parse::<Platform>().ok().as_ref() == Some(p)))
    };
    let mut manifests = Vec::with_capacity(images.len());
    for (platform, image) in images {
        let digest: Digest = image.digest.parse().map_err(|e| format!("{e}"))?;
        let annotations = annotations
            .iter()
            .filter(|a| applies(a, "manifest-descriptor", Some(platform)))
            .map(|a| (a.key.clone(), a.value.clone()))
            .collect();
        manifests.push(IndexEntry {
            platform: platform.clone(),
            image: ImageDescriptor { digest, size: image.size, media_type: image.media_type.clone() },
            annotations,
        });
    }
    let index_annotations: HashMap<String, String> =
        annotations.iter().filter(|a| applies(a, "index", None)).map(|a| (a.key.clone(), a.value.clone())).collect();
    let index = oci::build_index(&manifests, index_annotations).map_err(|e| e.to_string())?;
    let index_digest = Digest::of(&index);
    for tag in tags {
        let Some(source) = pushed_to.iter().find(|r| r.registry() == tag.registry()) else {
            return Err(format!("no agent pushed to registry {}", tag.registry()));
        };
        if source.repository() != tag.repository() {
            for IndexEntry { image, .. } in &manifests {
                let (bytes, _) =
                    registry.fetch_manifest(&source.at_digest(&image.digest)).await.map_err(|e| e.to_string())?;
                registry
                    .copy_manifest(source, tag, &bytes, &image.media_type)
                    .await
                    .map_err(|e| format!("copying {} to {}: {e}", image.digest, tag.name()))?;
            }
        }
        let tag = tag.clone().with_default_tag();
        registry.push_index(&tag, &index, oci::OCI_INDEX).await.map_err(|e| format!("{tag}: {e}"))?;
        tracing::info!(%tag, index = %index_digest, "index pushed");
    }
    Ok(ImageDescriptor { digest: index_digest, size: index.len() as u64, media_type: oci::OCI_INDEX.to_owned() })
}
