//! Index and manifest building: a multi-platform OCI index or Docker
//! manifest list over per-platform images, an OCI manifest as Docker
//! schema 2, and the platform an image config declares.

use std::collections::HashMap;
use std::str::FromStr;

use oci_spec::image::{
    Arch, Descriptor, DescriptorBuilder, ImageIndex, ImageIndexBuilder, MediaType, Os, PlatformBuilder,
};

use super::{DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, ImageDescriptor, OciError};
use crate::platform::Platform;

/// The platform an image config declares.
pub fn config_platform(config: &[u8]) -> Result<Platform, String> {
    #[derive(serde::Deserialize)]
    struct ConfigPlatform {
        os: String,
        architecture: String,
        #[serde(default)]
        variant: Option<String>,
    }
    let c: ConfigPlatform =
        serde_json::from_slice(config).map_err(|e| format!("image config without a platform: {e}"))?;
    let raw = match c.variant.as_deref().filter(|v| !v.is_empty()) {
        Some(v) => format!("{}/{}/{v}", c.os, c.architecture),
        None => format!("{}/{}", c.os, c.architecture),
    };
    raw.parse().map_err(|e: crate::platform::PlatformError| e.to_string())
}

/// One platform's entry in an index: its image and its descriptor's
/// annotations.
pub struct IndexEntry {
    pub platform: Platform,
    pub image: ImageDescriptor,
    pub annotations: HashMap<String, String>,
}

/// An image index over one manifest per platform, as its JSON bytes.
pub fn build_index(manifests: &[IndexEntry], annotations: HashMap<String, String>) -> Result<Vec<u8>, OciError> {
    let err = |e: &dyn std::fmt::Display| OciError::Manifest {
        repository: String::new(),
        digest: String::new(),
        message: format!("building the index: {e}"),
    };
    let mut descriptors: Vec<Descriptor> = Vec::with_capacity(manifests.len());
    for IndexEntry { platform, image, annotations } in manifests {
        let mut p = PlatformBuilder::default().os(Os::from(platform.os())).architecture(Arch::from(platform.arch()));
        if let Some(v) = platform.variant() {
            p = p.variant(v.to_owned());
        }
        let descriptor = DescriptorBuilder::default()
            .media_type(MediaType::from(image.media_type.as_str()))
            .digest(oci_spec::image::Digest::from_str(image.digest.as_str()).map_err(|e| err(&e))?)
            .size(image.size)
            .platform(p.build().map_err(|e| err(&e))?)
            .build()
            .map_err(|e| err(&e))?;
        let mut descriptor = descriptor;
        if !annotations.is_empty() {
            descriptor.set_annotations(Some(annotations.clone()));
        }
        descriptors.push(descriptor);
    }
    index_of(descriptors, annotations, super::OCI_INDEX)
}

/// An index of `media_type` (an OCI index, or a Docker manifest list, which
/// takes no annotations) over `descriptors` as given, as its JSON bytes.
pub fn index_of(
    descriptors: Vec<Descriptor>,
    annotations: HashMap<String, String>,
    media_type: &str,
) -> Result<Vec<u8>, OciError> {
    let err = |e: &dyn std::fmt::Display| OciError::Manifest {
        repository: String::new(),
        digest: String::new(),
        message: format!("building the index: {e}"),
    };
    if media_type == DOCKER_MANIFEST_LIST && !annotations.is_empty() {
        return Err(err(&"a Docker manifest list has no annotations"));
    }
    let mut builder = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::from(media_type))
        .manifests(descriptors);
    if !annotations.is_empty() {
        builder = builder.annotations(annotations);
    }
    let index: ImageIndex = builder.build().map_err(|e| err(&e))?;
    serde_json::to_vec(&index).map_err(|e| err(&e))
}

/// A Docker manifest list over one schema 2 manifest per platform, for
/// `--format docker`; it has no place for annotations.
pub fn build_manifest_list(manifests: &[IndexEntry]) -> Result<Vec<u8>, OciError> {
    let entries: Vec<serde_json::Value> = manifests
        .iter()
        .map(|IndexEntry { platform, image, .. }| {
            let mut p = serde_json::json!({ "architecture": platform.arch(), "os": platform.os() });
            if let Some(v) = platform.variant() {
                p["variant"] = v.into();
            }
            serde_json::json!({
                "mediaType": image.media_type,
                "digest": image.digest.as_str(),
                "size": image.size,
                "platform": p,
            })
        })
        .collect();
    let list = serde_json::json!({ "schemaVersion": 2, "mediaType": DOCKER_MANIFEST_LIST, "manifests": entries });
    serde_json::to_vec(&list).map_err(|e| OciError::Manifest {
        repository: String::new(),
        digest: String::new(),
        message: format!("building the manifest list: {e}"),
    })
}

/// [`index_of`] over descriptors as JSON objects (`mediaType`, `digest`,
/// `size`, optional `platform` and `annotations`), as an index lists them.
pub fn index_from_json(
    descriptors: &[serde_json::Value],
    annotations: HashMap<String, String>,
    media_type: &str,
) -> Result<Vec<u8>, OciError> {
    let parsed = descriptors
        .iter()
        .map(|d| {
            serde_json::from_value::<Descriptor>(d.clone()).map_err(|e| OciError::Manifest {
                repository: String::new(),
                digest: d["digest"].as_str().unwrap_or_default().to_owned(),
                message: format!("not a descriptor: {e}"),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    index_of(parsed, annotations, media_type)
}

pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// An OCI image manifest as a Docker schema 2 manifest over the same
/// blobs: the config and gzip layers only change media type; annotations,
/// which schema 2 has no place for, are dropped.
pub fn to_docker_manifest(manifest: &[u8]) -> Result<Vec<u8>, String> {
    let mut value: serde_json::Value = serde_json::from_slice(manifest).map_err(|e| format!("manifest: {e}"))?;
    let object = value.as_object_mut().ok_or("manifest: not a JSON object")?;
    object.insert("mediaType".into(), DOCKER_MANIFEST.into());
    object.remove("annotations");
    object.remove("artifactType");
    object.remove("subject");
    let config = object.get_mut("config").and_then(|c| c.as_object_mut()).ok_or("manifest: no config")?;
    config.insert("mediaType".into(), DOCKER_CONFIG.into());
    config.remove("annotations");
    let layers = object.get_mut("layers").and_then(|l| l.as_array_mut()).ok_or("manifest: no layers")?;
    for layer in layers {
        let layer = layer.as_object_mut().ok_or("manifest: a layer is not an object")?;
        let media_type = layer.get("mediaType").and_then(|m| m.as_str()).unwrap_or_default();
        if !matches!(media_type, "application/vnd.oci.image.layer.v1.tar+gzip" | DOCKER_LAYER_GZIP) {
            return Err(format!("a {media_type} layer has no Docker schema 2 media type: use --format oci"));
        }
        layer.insert("mediaType".into(), DOCKER_LAYER_GZIP.into());
        layer.remove("annotations");
    }
    serde_json::to_vec(&value).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::{OCI_INDEX, OCI_MANIFEST};

    #[test]
    fn index_has_one_descriptor_per_platform() {
        let image = |c: char| ImageDescriptor {
            digest: format!("sha256:{}", c.to_string().repeat(64)).parse().unwrap(),
            size: 500,
            media_type: OCI_MANIFEST.to_owned(),
        };
        let entry =
            |p: &str, c| IndexEntry { platform: p.parse().unwrap(), image: image(c), annotations: HashMap::new() };
        let mut arm = entry("linux/arm/v7", 'b');
        arm.annotations.insert("org.example.note".into(), "arm".into());
        let bytes = build_index(
            &[entry("linux/amd64", 'a'), arm],
            HashMap::from([("org.opencontainers.image.created".to_owned(), "2026-01-01T00:00:00Z".to_owned())]),
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["schemaVersion"], 2);
        assert_eq!(v["mediaType"], OCI_INDEX);
        assert_eq!(v["manifests"][0]["platform"]["architecture"], "amd64");
        assert_eq!(v["manifests"][1]["platform"]["variant"], "v7");
        assert_eq!(v["manifests"][1]["mediaType"], OCI_MANIFEST);
        assert_eq!(v["manifests"].as_array().unwrap().len(), 2);
        assert_eq!(v["manifests"][1]["annotations"]["org.example.note"], "arm");
        assert_eq!(v["annotations"]["org.opencontainers.image.created"], "2026-01-01T00:00:00Z");
    }

    #[test]
    fn config_platform_normalizes() {
        let p = config_platform(br#"{"os":"linux","architecture":"arm64","variant":"v8"}"#).unwrap();
        assert_eq!(p.to_string(), "linux/arm64");
        assert!(config_platform(b"{}").is_err());
    }
}
