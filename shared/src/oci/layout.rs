//! OCI image layouts on disk: reading the one image of a layout, writing
//! its `index.json` and `oci-layout`, and rewriting it as Docker schema 2.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use oci_spec::image::{ImageIndex, ImageManifest};

use super::index::to_docker_manifest;
use super::{DOCKER_MANIFEST, ImageDescriptor, OCI_INDEX, OciError};
use crate::digest::Digest;

/// The descriptor of the single image in an OCI layout, without pushing it.
pub async fn layout_descriptor(layout: &Path) -> Result<ImageDescriptor, OciError> {
    read_layout(layout).await.map(|image| image.descriptor)
}

/// The digest of the config of the single image in an OCI layout directory
/// (buildx's `containerimage.config.digest`).
pub async fn layout_config_digest(layout: &Path) -> Result<Digest, OciError> {
    let image = read_layout(layout).await?;
    match image.blobs.first() {
        Some(config) => Ok(config.digest.clone()),
        None => Err(OciError::Layout { path: layout.to_owned(), message: "a manifest without a config".into() }),
    }
}

/// The platform the config of the single image in an OCI layout declares.
pub async fn layout_config_platform(layout: &Path) -> Result<crate::platform::Platform, OciError> {
    let err = |message: String| OciError::Layout { path: layout.to_owned(), message };
    let digest = layout_config_digest(layout).await?;
    let config = tokio::fs::read(blob_path(layout, &digest)).await.map_err(|e| err(e.to_string()))?;
    if Digest::of(&config) != digest {
        return Err(err(format!("config {digest} does not match its digest")));
    }
    super::index::config_platform(&config).map_err(err)
}

/// The `oci-layout` file of an OCI image layout.
pub const LAYOUT_VERSION_FILE: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// A layout's `index.json` naming one root (an image or an index), with
/// the root descriptor's annotations.
pub fn layout_index(root: &ImageDescriptor, annotations: &BTreeMap<String, String>) -> Vec<u8> {
    let mut descriptor = serde_json::json!({
        "mediaType": root.media_type,
        "digest": root.digest.as_str(),
        "size": root.size,
    });
    if !annotations.is_empty() {
        descriptor["annotations"] = serde_json::json!(annotations);
    }
    serde_json::json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [descriptor] })
        .to_string()
        .into_bytes()
}

/// Rewrites a one-image OCI layout's manifest as Docker schema 2.
pub async fn layout_to_docker(layout: &Path) -> Result<(), OciError> {
    let err = |message: String| OciError::Layout { path: layout.to_owned(), message };
    let image = read_layout(layout).await?;
    let manifest = to_docker_manifest(&image.manifest).map_err(err)?;
    let digest = Digest::of(&manifest);
    tokio::fs::write(blob_path(layout, &digest), &manifest).await.map_err(|e| err(e.to_string()))?;
    let root = ImageDescriptor { digest, size: manifest.len() as u64, media_type: DOCKER_MANIFEST.to_owned() };
    let index = layout_index(&root, &BTreeMap::new());
    tokio::fs::write(layout.join("index.json"), index).await.map_err(|e| err(e.to_string()))
}

/// The digests of every blob of a one-image layout, manifest first.
pub async fn layout_blobs(layout: &Path) -> Result<Vec<(Digest, u64, PathBuf)>, OciError> {
    let image = read_layout(layout).await?;
    let mut out =
        vec![(image.descriptor.digest.clone(), image.descriptor.size, blob_path(layout, &image.descriptor.digest))];
    for b in image.blobs {
        let path = blob_path(layout, &b.digest);
        out.push((b.digest, b.size, path));
    }
    Ok(out)
}

pub(super) struct LayoutImage {
    pub(super) descriptor: ImageDescriptor,
    pub(super) manifest: Vec<u8>,
    pub(super) blobs: Vec<Blob>,
}

pub(super) struct Blob {
    pub(super) digest: Digest,
    pub(super) size: u64,
}

pub(super) fn blob_path(layout: &Path, digest: &Digest) -> PathBuf {
    layout.join("blobs/sha256").join(digest.hex())
}

/// The single image in an OCI layout directory.
pub(super) async fn read_layout(layout: &Path) -> Result<LayoutImage, OciError> {
    let err = |message: String| OciError::Layout { path: layout.to_owned(), message };
    let index_bytes = tokio::fs::read(layout.join("index.json")).await.map_err(|e| err(e.to_string()))?;
    let index: ImageIndex = serde_json::from_slice(&index_bytes).map_err(|e| err(format!("index.json: {e}")))?;
    let [entry] = index.manifests().as_slice() else {
        return Err(err(format!("expected one image, found {}", index.manifests().len())));
    };
    let digest: Digest = entry.digest().to_string().parse().map_err(|e| err(format!("{e}")))?;
    let manifest = tokio::fs::read(blob_path(layout, &digest)).await.map_err(|e| err(e.to_string()))?;
    if Digest::of(&manifest) != digest {
        return Err(err(format!("manifest {digest} does not match its digest")));
    }
    let parsed: ImageManifest = serde_json::from_slice(&manifest).map_err(|e| err(format!("manifest: {e}")))?;
    let mut blobs = Vec::new();
    for d in std::iter::once(parsed.config()).chain(parsed.layers()) {
        let digest = d.digest().to_string().parse().map_err(|e| err(format!("{e}")))?;
        blobs.push(Blob { digest, size: d.size() });
    }
    let media_type =
        parsed.media_type().as_ref().map(ToString::to_string).unwrap_or_else(|| entry.media_type().to_string());
    Ok(LayoutImage { descriptor: ImageDescriptor { digest, size: manifest.len() as u64, media_type }, manifest, blobs })
}
