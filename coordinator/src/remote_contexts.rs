//! Contexts kept in one registry repository (the `blob_store` setting), so
//! several coordinators on PostgreSQL need no shared disk: each upload is
//! pushed there as it was received (a zstd tar, an OCI layer) under the tag
//! `context-<hex of the context digest>`, and a coordinator that lacks the
//! file fetches it back and verifies it like an upload before serving it.
//! The registry has no delete by default: eviction forgets the context in
//! the store and the local file; its registry space is reclaimed by the
//! registry's own retention and garbage collection.

use braid_shared::Digest;
use braid_shared::oci::{Credential, OCI_MANIFEST, Registry};
use braid_shared::reference::ImageRef;

use crate::error::{CoordinatorError, Result};

/// The tar+zstd media type: a context is exactly such a layer.
const LAYER: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// The annotation naming the uncompressed context digest on the layer.
const CONTEXT_ANNOTATION: &str = "build.braid.context.digest";

pub struct RemoteContexts {
    registry: Registry,
    repository: ImageRef,
}

/// Parses `registry://HOST[:PORT]/REPO` (or `oci://`), naming the key.
pub fn parse(value: &str) -> std::result::Result<ImageRef, String> {
    let rest = value
        .strip_prefix("registry://")
        .or_else(|| value.strip_prefix("oci://"))
        .ok_or_else(|| format!("{value:?} is not registry://HOST[:PORT]/REPOSITORY"))?;
    let repository: ImageRef = rest.parse().map_err(|e| format!("{value:?}: {e}"))?;
    if repository.tag().is_some() || repository.digest().is_some() || !rest.contains('/') {
        return Err(format!("{value:?} is not registry://HOST[:PORT]/REPOSITORY (no tag or digest)"));
    }
    Ok(repository)
}

/// The `blob_store` registry repository that keeps contexts, if set.
pub fn from_settings(settings: &crate::settings::Settings) -> Result<Option<RemoteContexts>> {
    let repository = settings.blob_store_repository().map_err(|e| CoordinatorError::InvalidArgument(e.to_string()))?;
    Ok(repository.map(|r| RemoteContexts::new(r, &settings.insecure_registries, settings.credentials())))
}

fn failed(what: &str, e: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::Internal(format!("blob_store: {what}: {e}"))
}

impl RemoteContexts {
    pub fn new(repository: ImageRef, insecure: &[String], credentials: Vec<Credential>) -> RemoteContexts {
        RemoteContexts { registry: Registry::with_credentials(insecure, credentials), repository }
    }

    fn tag(&self, digest: &Digest) -> Result<ImageRef> {
        format!("{}:context-{}", self.repository.name(), digest.hex()).parse().map_err(|e| failed("tag", e))
    }

    /// Pushes the compressed context under its tag.
    pub async fn push(&self, digest: &Digest, compressed: &[u8]) -> Result<()> {
        let repo = &self.repository;
        self.registry.push_blob(repo, compressed).await.map_err(|e| failed("pushing a context", e))?;
        let config = b"{}";
        self.registry.push_blob(repo, config).await.map_err(|e| failed("pushing a context", e))?;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": { "mediaType": CONFIG, "digest": Digest::of(config).to_string(), "size": config.len() },
            "layers": [{
                "mediaType": LAYER,
                "digest": Digest::of(compressed).to_string(),
                "size": compressed.len(),
                "annotations": { CONTEXT_ANNOTATION: digest.to_string() },
            }],
        });
        let bytes = serde_json::to_vec(&manifest).map_err(|e| failed("manifest", e))?;
        self.registry
            .push_index(&self.tag(digest)?, &bytes, OCI_MANIFEST)
            .await
            .map_err(|e| failed("pushing a context's manifest", e))
    }

    /// Reads the compressed context back (at most `limit` bytes); the
    /// caller verifies it against `digest` before keeping it.
    pub async fn pull(&self, digest: &Digest, limit: usize) -> Result<Vec<u8>> {
        let (manifest, _) =
            self.registry.fetch_manifest(&self.tag(digest)?).await.map_err(|e| failed("reading a context", e))?;
        let manifest: serde_json::Value = serde_json::from_slice(&manifest).map_err(|e| failed("manifest", e))?;
        let layer = manifest["layers"][0]["digest"]
            .as_str()
            .and_then(|d| d.parse::<Digest>().ok())
            .ok_or_else(|| failed("manifest", format!("the manifest for context {digest} names no layer")))?;
        let bytes = self
            .registry
            .fetch_blob(&self.repository, &layer, limit)
            .await
            .map_err(|e| failed("reading a context", e))?;
        if Digest::of(&bytes) != layer {
            return Err(failed("reading a context", format!("blob {layer} does not match its digest")));
        }
        Ok(bytes)
    }
}

impl RemoteContexts {
    /// Pushes an export blob under its own digest (no tag: the registry
    /// checks the digest on upload).
    pub async fn push_blob(&self, bytes: &[u8]) -> Result<()> {
        self.registry.push_blob(&self.repository, bytes).await.map_err(|e| failed("pushing a blob", e))?;
        Ok(())
    }

    /// Reads an export blob back (at most `limit` bytes), verified.
    pub async fn pull_blob(&self, digest: &Digest, limit: usize) -> Result<Vec<u8>> {
        let bytes =
            self.registry.fetch_blob(&self.repository, digest, limit).await.map_err(|e| failed("reading a blob", e))?;
        if Digest::of(&bytes) != *digest {
            return Err(failed("reading a blob", format!("blob {digest} does not match its digest")));
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_the_setting_naming_what_is_wrong() {
        let r = super::parse("registry://127.0.0.1:5000/braid/contexts").unwrap();
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.repository(), "braid/contexts");
        assert!(super::parse("oci://reg.example/ctx").is_ok());
        for bad in ["127.0.0.1:5000/x", "registry://host:5000", "registry://host/x:tag", "s3://b/x"] {
            let e = super::parse(bad).unwrap_err();
            assert!(e.contains("registry://HOST[:PORT]/REPOSITORY") || e.contains(bad), "{bad}: {e}");
        }
    }
}
