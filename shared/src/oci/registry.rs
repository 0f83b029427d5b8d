//! The registry client: push an image from an OCI layout by digest, read a
//! manifest back to verify its platform, copy manifests across repositories
//! and push a multi-platform index.

use std::path::Path;

use futures::TryStreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, RegistryOperation};
use oci_spec::image::ImageManifest;

use super::index::config_platform;
use super::layout::{blob_path, read_layout};
use super::{
    Credential, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, ImageDescriptor, OCI_INDEX, OCI_MANIFEST, OciError,
    RegistryFailure,
};
use crate::digest::Digest;
use crate::limits;
use crate::platform::Platform;
use crate::reference::ImageRef;

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

    /// A failure that is not the registry's answer (a malformed value).
    fn err(image: &ImageRef, e: impl std::fmt::Display) -> OciError {
        OciError::Registry {
            registry: image.registry().to_owned(),
            failure: RegistryFailure::Other,
            message: e.to_string(),
        }
    }

    /// A failed registry call, with what it says about retrying and the
    /// whole chain of causes (a refused connection is only in a source).
    fn failed(image: &ImageRef, e: OciDistributionError) -> OciError {
        let failure = failure_of(&e);
        let mut message = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            let text = cause.to_string();
            if !message.contains(&text) {
                message.push_str(": ");
                message.push_str(&text);
            }
            source = cause.source();
        }
        OciError::Registry { registry: image.registry().to_owned(), failure, message }
    }

    async fn login(&self, image: &ImageRef, op: RegistryOperation) -> Result<(), OciError> {
        self.client
            .auth(&image.to_oci(), &self.auth(image.registry()), op)
            .await
            .map(drop)
            .map_err(|e| Self::failed(image, e))
    }

    /// Pushes the one image in the OCI layout at `layout` to `repository` by
    /// digest (no tag): blobs the registry lacks, then the manifest's exact
    /// bytes, so its digest is unchanged.
    pub async fn push_layout(&self, layout: &Path, repository: &ImageRef) -> Result<ImageDescriptor, OciError> {
        let image = read_layout(layout).await?;
        self.login(repository, RegistryOperation::Push).await?;
        let target = repository.at_digest(&image.descriptor.digest).to_oci();
        for blob in &image.blobs {
            let exists = self
                .client
                .blob_exists(&target, blob.digest.as_str())
                .await
                .map_err(|e| Self::failed(repository, e))?;
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
                .map_err(|e| Self::failed(repository, e))?;
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
            .map_err(|e| Self::failed(repository, e))
    }

    /// Reads a manifest by digest, checks its bytes hash to it and its
    /// config names `platform`; returns its descriptor and raw bytes.
    pub async fn verify_image(
        &self,
        repository: &ImageRef,
        digest: &Digest,
        platform: &Platform,
    ) -> Result<(ImageDescriptor, Vec<u8>), OciError> {
        let image = self.image_config(repository, digest).await?;
        let found = image.platform.map_err(|message| OciError::Manifest {
            repository: repository.name(),
            digest: digest.to_string(),
            message,
        })?;
        if found != *platform {
            return Err(OciError::WrongPlatform {
                digest: digest.to_string(),
                found: found.to_string(),
                wanted: platform.to_string(),
            });
        }
        Ok((image.descriptor, image.manifest))
    }

    /// Reads an image manifest by digest (checking its bytes hash to it)
    /// and its config: the descriptor, both documents and the platform the
    /// config declares (or why it declares none).
    pub async fn image_config(&self, repository: &ImageRef, digest: &Digest) -> Result<ImageConfig, OciError> {
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
        if Digest::of(&config_bytes) != config_digest {
            return Err(manifest_err(format!("config {config_digest} does not match its digest")));
        }
        let platform = config_platform(&config_bytes);
        let descriptor = ImageDescriptor { digest: digest.clone(), size: bytes.len() as u64, media_type };
        Ok(ImageConfig { descriptor, manifest: bytes.to_vec(), config_digest, config: config_bytes, platform })
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
            if self.client.blob_exists(&target, &blob_digest).await.map_err(|e| Self::failed(to, e))? {
                continue;
            }
            self.client
                .mount_blob(&target, &source, &blob_digest)
                .await
                .map_err(|e| Self::err(to, format!("mounting {blob_digest} from {}: {e}", from.name())))?;
        }
        self.push_manifest_bytes(to, bytes, media_type, &target).await
    }

    /// Makes the manifest `digest` of `from` available in `to`: reads it
    /// from `from`, then [`Registry::copy_manifest`].
    pub async fn copy_by_digest(
        &self,
        from: &ImageRef,
        to: &ImageRef,
        digest: &Digest,
        media_type: &str,
    ) -> Result<(), OciError> {
        let (bytes, _) = self.fetch_manifest(&from.at_digest(digest)).await?;
        self.copy_manifest(from, to, &bytes, media_type).await
    }

    /// Pushes one blob into `repository` unless it is there already.
    pub async fn push_blob(&self, repository: &ImageRef, bytes: &[u8]) -> Result<(), OciError> {
        self.login(repository, RegistryOperation::Push).await?;
        let digest = Digest::of(bytes);
        let target = repository.at_digest(&digest).to_oci();
        if self.client.blob_exists(&target, digest.as_str()).await.map_err(|e| Self::failed(repository, e))? {
            return Ok(());
        }
        self.client
            .push_blob(&target, bytes.to_vec(), digest.as_str())
            .await
            .map(drop)
            .map_err(|e| Self::failed(repository, e))
    }

    /// Pushes manifest bytes into `repository` by their digest (no tag).
    pub async fn push_manifest(&self, repository: &ImageRef, bytes: &[u8], media_type: &str) -> Result<(), OciError> {
        self.login(repository, RegistryOperation::Push).await?;
        let target = repository.at_digest(&Digest::of(bytes)).to_oci();
        self.push_manifest_bytes(repository, bytes, media_type, &target).await
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
            .map_err(|e| Self::failed(reference, e))?;
        if bytes.len() > limits::MANIFEST_BYTES {
            return Err(Self::err(
                reference,
                format!("manifest {digest} is larger than {} bytes", limits::MANIFEST_BYTES),
            ));
        }
        let actual = Digest::of(&bytes);
        if reference.digest().is_some_and(|wanted| *wanted != actual) {
            return Err(Self::err(reference, format!("the manifest of {reference} does not match its digest")));
        }
        Ok((bytes.to_vec(), actual.to_string()))
    }

    /// Reads one blob fully (bounded by `limit` bytes).
    pub async fn fetch_blob(&self, repository: &ImageRef, digest: &Digest, limit: usize) -> Result<Vec<u8>, OciError> {
        self.login(repository, RegistryOperation::Pull).await?;
        let at = repository.at_digest(digest).to_oci();
        let mut out = Vec::new();
        let descriptor = oci_client::manifest::OciDescriptor { digest: digest.to_string(), ..Default::default() };
        self.client.pull_blob(&at, &descriptor, &mut out).await.map_err(|e| Self::failed(repository, e))?;
        if out.len() > limit {
            return Err(Self::err(repository, format!("blob {digest} is larger than {limit} bytes")));
        }
        Ok(out)
    }
}

/// An image manifest and its config, as [`Registry::image_config`] read
/// them.
#[derive(Debug, Clone)]
pub struct ImageConfig {
    pub descriptor: ImageDescriptor,
    pub manifest: Vec<u8>,
    pub config_digest: Digest,
    pub config: Vec<u8>,
    /// The platform the config declares, or why it declares none.
    pub platform: Result<Platform, String>,
}

/// What a client error says about the registry's answer.
fn failure_of(e: &OciDistributionError) -> RegistryFailure {
    match e {
        OciDistributionError::RequestError(e) => match e.status() {
            Some(status) => RegistryFailure::Status(status.as_u16()),
            None => RegistryFailure::Unreachable,
        },
        // A 4xx the client did not parse: its body is the error envelope.
        OciDistributionError::ServerError { code, message, .. } => {
            match serde_json::from_str::<oci_client::errors::OciEnvelope>(message) {
                Ok(envelope) if (400..500).contains(code) && is_blob_race(&envelope) => RegistryFailure::BlobRace,
                _ => RegistryFailure::Status(*code),
            }
        }
        OciDistributionError::UnauthorizedError { .. } | OciDistributionError::AuthenticationFailure(_) => {
            RegistryFailure::Status(401)
        }
        // Only a 4xx answer carries an error envelope; its code names which.
        OciDistributionError::RegistryError { envelope, .. } if is_blob_race(envelope) => RegistryFailure::BlobRace,
        OciDistributionError::RegistryError { envelope, .. } => {
            RegistryFailure::Status(envelope.errors.first().map_or(400, |e| envelope_status(&e.code)))
        }
        _ => RegistryFailure::Other,
    }
}

/// Whether an error envelope says a push lost one of its own blobs
/// ([`RegistryFailure::BlobRace`]).
fn is_blob_race(envelope: &oci_client::errors::OciEnvelope) -> bool {
    envelope.errors.iter().any(|e| matches!(e.code, OciErrorCode::ManifestBlobUnknown | OciErrorCode::DigestInvalid))
}

/// The status the distribution spec gives each error code.
fn envelope_status(code: &OciErrorCode) -> u16 {
    match code {
        OciErrorCode::Unauthorized => 401,
        OciErrorCode::Denied => 403,
        OciErrorCode::BlobUnknown
        | OciErrorCode::BlobUploadUnknown
        | OciErrorCode::ManifestUnknown
        | OciErrorCode::NameUnknown
        | OciErrorCode::NotFound => 404,
        OciErrorCode::Unsupported => 415,
        OciErrorCode::Toomanyrequests => 429,
        _ => 400,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(failure: RegistryFailure) -> OciError {
        OciError::Registry { registry: "r".into(), failure, message: String::new() }
    }

    #[test]
    fn only_outages_and_busy_answers_are_retried() {
        assert!(error(RegistryFailure::Unreachable).is_transient());
        for code in [500, 502, 503, 408, 429] {
            assert!(error(RegistryFailure::Status(code)).is_transient(), "{code}");
        }
        for code in [400, 401, 403, 404, 413] {
            assert!(!error(RegistryFailure::Status(code)).is_transient(), "{code}");
        }
        assert!(!error(RegistryFailure::Other).is_transient());
    }

    #[test]
    fn client_errors_carry_their_status() {
        let server = OciDistributionError::ServerError { code: 503, url: "u".into(), message: "busy".into() };
        assert_eq!(failure_of(&server), RegistryFailure::Status(503));
        let unauthorized = OciDistributionError::UnauthorizedError { url: "u".into() };
        assert_eq!(failure_of(&unauthorized), RegistryFailure::Status(401));
        assert_eq!(envelope_status(&OciErrorCode::Denied), 403);
        assert_eq!(envelope_status(&OciErrorCode::Toomanyrequests), 429);
        assert_eq!(failure_of(&OciDistributionError::PushNoDataError), RegistryFailure::Other);
    }

    #[test]
    fn a_push_that_lost_its_own_blob_is_tried_again() {
        // docker-registry's answer when two agents pushed one layer into one
        // repository at once (seen under load in tests/reliability.rs).
        let message = r#"{"errors":[{"code":"DIGEST_INVALID","message":"provided digest did not match uploaded content"},{"code":"MANIFEST_BLOB_UNKNOWN","message":"blob unknown to registry","detail":"sha256:4bc4"}]}"#;
        let race = OciDistributionError::ServerError { code: 400, url: "u".into(), message: message.into() };
        assert_eq!(failure_of(&race), RegistryFailure::BlobRace);
        assert!(error(RegistryFailure::BlobRace).is_transient());
        let other = r#"{"errors":[{"code":"MANIFEST_INVALID","message":"manifest invalid"}]}"#;
        let invalid = OciDistributionError::ServerError { code: 400, url: "u".into(), message: other.into() };
        assert_eq!(failure_of(&invalid), RegistryFailure::Status(400));
        let text = OciDistributionError::ServerError { code: 400, url: "u".into(), message: "bad request".into() };
        assert_eq!(failure_of(&text), RegistryFailure::Status(400));
    }
}
