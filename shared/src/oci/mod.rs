//! OCI images in registries: push an image from an OCI layout by digest, read a
//! manifest back to verify its platform, and push a multi-platform index.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use futures::TryStreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, RegistryOperation};
use oci_spec::image::{
    Arch, Descriptor, DescriptorBuilder, ImageIndex, ImageIndexBuilder, ImageManifest, MediaType, Os, PlatformBuilder,
};

use crate::digest::Digest;
use crate::limits;
use crate::platform::Platform;
use crate::reference::ImageRef;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// What went wrong talking to a registry or reading an image.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("registry {registry}: {message}")]
    Registry { registry: String, message: String },
    #[error("reading OCI layout {path:?}: {message}")]
    Layout { path: PathBuf, message: String },
    #[error("manifest {digest} in {repository}: {message}")]
    Manifest { repository: String, digest: String, message: String },
    #[error("image {digest} is for {found}, not {wanted}")]
    WrongPlatform { digest: String, found: String, wanted: String },
}

/// Credentials for one registry. The password is wiped from memory when
/// dropped and never printed.
#[derive(Clone)]
pub struct Credential {
    /// "host[:port]" as image references name it (`docker.io` for Docker Hub).
    pub registry: String,
    pub username: String,
    pub password: zeroize::Zeroizing<String>,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("registry", &self.registry)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl From<&crate::proto::RegistryCredential> for Credential {
    fn from(c: &crate::proto::RegistryCredential) -> Self {
        Credential { registry: c.registry.clone(), username: c.username.clone(), password: c.password.clone().into() }
    }
}

impl From<&Credential> for crate::proto::RegistryCredential {
    fn from(c: &Credential) -> Self {
        crate::proto::RegistryCredential {
            registry: c.registry.clone(),
            username: c.username.clone(),
            password: c.password.to_string(),
        }
    }
}

/// One platform's image, as an index descriptor needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageDescriptor {
    pub digest: Digest,
    pub size: u64,
    pub media_type: String,
}

/// A registry client that speaks plain HTTP only to the registries named
/// insecure.
#[derive(Clone)]
pub struct Registry {
    client: Client,
    credentials: std::sync::Arc<Vec<Credential>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Registry {
    /// A client that uses `credentials` for their registries and anonymous
    /// access elsewhere.
    pub fn with_credentials(insecure_registries: &[String], credentials: Vec<Credential>) -> Registry {
        Registry { credentials: std::sync::Arc::new(credentials), ..Registry::new(insecure_registries) }
    }

    fn auth(&self, registry: &str) -> RegistryAuth {
        match self.credentials.iter().find(|c| c.registry == registry) {
            Some(c) => RegistryAuth::Basic(c.username.clone(), c.password.to_string()),
            None => RegistryAuth::Anonymous,
        }
    }

    pub fn new(insecure_registries: &[String]) -> Registry {
        let config = ClientConfig {
            protocol: ClientProtocol::HttpsExcept(insecure_registries.to_vec()),
            use_monolithic_push: true,
            ..Default::default()
        };
        Registry { client: Client::new(config), credentials: std::sync::Arc::new(Vec::new()) }
    }

    fn err(image: &ImageRef, e: impl std::fmt::Display) -> OciError {
        OciError::Registry { registry: image.registry().to_owned(), message: e.to_string() }
    }

    async fn login(&self, image: &ImageRef, op: RegistryOperation) -> Result<(), OciError> {
        self.client
            .auth(&image.to_oci(), &self.auth(image.registry()), op)
            .await
            .map(drop)
            .map_err(|e| Self::err(image, e))
    }

    /// Pushes the one image in the OCI layout at `layout` to `repository` by
    /// digest (no tag): blobs the registry lacks, then the manifest's exact
    /// bytes, so its digest is unchanged.
    pub async fn push_layout(&self, layout: &Path, repository: &ImageRef) -> Result<ImageDescriptor, OciError> {
        let image = read_layout(layout).await?;
        self.login(repository, RegistryOperation::Push).await?;
        let target = repository.at_digest(&image.descriptor.digest).to_oci();
        for blob in &image.blobs {
            let exists =
                self.client.blob_exists(&target, blob.digest.as_str()).await.map_err(|e| Self::err(repository, e))?;
            if exists {
                continue;
            }
            let path = blob_path(layout, &blob.digest);
            let file = tokio::fs::File::open(&path)
                .await
                .map_err(|e| OciError::Layout { path: path.clone(), message: e.to_string() })?;
            let stream = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20)
                .map_err(oci_client::errors::OciDistributionError::IoError);
            self.client
                .push_blob_stream(&target, stream, blob.digest.as_str(), Some(blob.size))
                .await
                .map_err(|e| Self::err(repository, e))?;
        }
        self.push_manifest_bytes(repository, &image.manifest, &image.descriptor.media_type, &target).await?;
        Ok(image.descriptor)
    }

    async fn push_manifest_bytes(
        &self,
        repository: &ImageRef,
        bytes: &[u8],
        media_type: &str,
        target: &oci_client::Reference,
    ) -> Result<(), OciError> {
        let content_type = media_type.parse().map_err(|e| Self::err(repository, e))?;
        self.client
            .push_manifest_raw(target, bytes.to_vec(), content_type)
            .await
            .map(drop)
            .map_err(|e| Self::err(repository, e))
    }

    /// Reads a manifest by digest, checks its bytes hash to it and its
    /// config names `platform`; returns its descriptor and raw bytes.
    pub async fn verify_image(
        &self,
        repository: &ImageRef,
        digest: &Digest,
        platform: &Platform,
    ) -> Result<(ImageDescriptor, Vec<u8>), OciError> {
        self.login(repository, RegistryOperation::Pull).await?;
        let at = repository.at_digest(digest);
        let manifest_err =
            |message: String| OciError::Manifest { repository: repository.name(), digest: digest.to_string(), message };
        let (bytes, _) = self
            .client
            .pull_manifest_raw(&at.to_oci(), &self.auth(repository.registry()), &[OCI_MANIFEST, DOCKER_MANIFEST])
            .await
            .map_err(|e| manifest_err(e.to_string()))?;
        if bytes.len() > limits::MANIFEST_BYTES {
            return Err(manifest_err(format!("larger than {} bytes", limits::MANIFEST_BYTES)));
        }
        if Digest::of(&bytes) != *digest {
            return Err(manifest_err("content does not match its digest".to_owned()));
        }
        let manifest: ImageManifest =
            serde_json::from_slice(&bytes).map_err(|e| manifest_err(format!("not an image manifest: {e}")))?;
        let media_type =
            manifest.media_type().as_ref().map(ToString::to_string).unwrap_or_else(|| OCI_MANIFEST.to_owned());
        let config = manifest.config();
        if config.size() > limits::MANIFEST_BYTES as u64 {
            return Err(manifest_err(format!("config larger than {} bytes", limits::MANIFEST_BYTES)));
        }
        let config_digest: Digest = config.digest().to_string().parse().map_err(|e| manifest_err(format!("{e}")))?;
        let config_bytes = self
            .fetch_blob(repository, &config_digest, limits::MANIFEST_BYTES)
            .await
            .map_err(|e| manifest_err(format!("reading its config: {e}")))?;
        let found = config_platform(&config_bytes).map_err(manifest_err)?;
        if found != *platform {
            return Err(OciError::WrongPlatform {
                digest: digest.to_string(),
                found: found.to_string(),
                wanted: platform.to_string(),
            });
        }
        let descriptor = ImageDescriptor { digest: digest.clone(), size: bytes.len() as u64, media_type };
        Ok((descriptor, bytes.to_vec()))
    }

    /// Makes the manifest `bytes` (already in `from`) available in `to` too,
    /// mounting its blobs across repositories of one registry.
    pub async fn copy_manifest(
        &self,
        from: &ImageRef,
        to: &ImageRef,
        bytes: &[u8],
        media_type: &str,
    ) -> Result<(), OciError> {
        self.login(to, RegistryOperation::Push).await?;
        let manifest: ImageManifest = serde_json::from_slice(bytes).map_err(|e| Self::err(from, e))?;
        let digest = Digest::of(bytes);
        let target = to.at_digest(&digest).to_oci();
        let source = from.at_digest(&digest).to_oci();
        for blob in std::iter::once(manifest.config()).chain(manifest.layers()) {
            let blob_digest = blob.digest().to_string();
            if self.client.blob_exists(&target, &blob_digest).await.map_err(|e| Self::err(to, e))? {
                continue;
            }
            self.client
                .mount_blob(&target, &source, &blob_digest)
                .await
                .map_err(|e| Self::err(to, format!("mounting {blob_digest} from {}: {e}", from.name())))?;
        }
        self.push_manifest_bytes(to, bytes, media_type, &target).await
    }

    /// Pushes an index under `tag`.
    pub async fn push_index(&self, tag: &ImageRef, index: &[u8], media_type: &str) -> Result<(), OciError> {
        self.login(tag, RegistryOperation::Push).await?;
        self.push_manifest_bytes(tag, index, media_type, &tag.to_oci()).await
    }

    /// Reads raw manifest bytes by tag or digest (index or image).
    pub async fn fetch_manifest(&self, reference: &ImageRef) -> Result<(Vec<u8>, String), OciError> {
        self.login(reference, RegistryOperation::Pull).await?;
        let (bytes, digest) = self
            .client
            .pull_manifest_raw(
                &reference.to_oci(),
                &self.auth(reference.registry()),
                &[OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST],
            )
            .await
            .map_err(|e| Self::err(reference, e))?;
        Ok((bytes.to_vec(), digest))
    }

    /// Reads one blob fully (bounded by `limit` bytes).
    pub async fn fetch_blob(&self, repository: &ImageRef, digest: &Digest, limit: usize) -> Result<Vec<u8>, OciError> {
        self.login(repository, RegistryOperation::Pull).await?;
        let at = repository.at_digest(digest).to_oci();
        let mut out = Vec::new();
        let descriptor = oci_client::manifest::OciDescriptor { digest: digest.to_string(), ..Default::default() };
        self.client.pull_blob(&at, &descriptor, &mut out).await.map_err(|e| Self::err(repository, e))?;
        if out.len() > limit {
            return Err(Self::err(repository, format!("blob {digest} is larger than {limit} bytes")));
        }
        Ok(out)
    }
}

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

/// The descriptor of the single image in an OCI layout, without pushing it.
pub async fn layout_descriptor(layout: &Path) -> Result<ImageDescriptor, OciError> {
    read_layout(layout).await.map(|image| image.descriptor)
}

/// An image index over one manifest per platform, as its JSON bytes.
/// One platform's entry in an index: its image and its descriptor's
/// annotations.
pub struct IndexEntry {
    pub platform: Platform,
    pub image: ImageDescriptor,
    pub annotations: HashMap<String, String>,
}

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
    let mut builder =
        ImageIndexBuilder::default().schema_version(2u32).media_type(MediaType::ImageIndex).manifests(descriptors);
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

struct LayoutImage {
    descriptor: ImageDescriptor,
    manifest: Vec<u8>,
    blobs: Vec<Blob>,
}

struct Blob {
    digest: Digest,
    size: u64,
}

fn blob_path(layout: &Path, digest: &Digest) -> PathBuf {
    layout.join("blobs/sha256").join(digest.hex())
}

/// The single image in an OCI layout directory.
async fn read_layout(layout: &Path) -> Result<LayoutImage, OciError> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
