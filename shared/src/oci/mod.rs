//! OCI images: the registry client (`registry`), index and manifest
//! building (`index`), OCI image layouts on disk (`layout`), and the
//! conversions between a layout and a `docker save` archive (`archive`).
//! Everything public is re-exported here (`oci::Registry`, ...).

mod archive;
mod index;
mod layout;
mod registry;

pub use archive::{ArchiveError, archive_to_layout, docker_archive};
pub use index::{
    DOCKER_CONFIG, DOCKER_LAYER_GZIP, IndexEntry, build_index, build_manifest_list, config_platform, index_from_json,
    index_of, to_docker_manifest,
};
pub use layout::{
    LAYOUT_VERSION_FILE, layout_blobs, layout_config_digest, layout_config_platform, layout_descriptor, layout_index,
    layout_to_docker,
};
pub use registry::{ImageConfig, Registry};

use std::path::PathBuf;

use crate::digest::Digest;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// What went wrong talking to a registry or reading an image.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("registry {registry}: {message}")]
    Registry { registry: String, failure: RegistryFailure, message: String },
    #[error("reading OCI layout {path:?}: {message}")]
    Layout { path: PathBuf, message: String },
    #[error("manifest {digest} in {repository}: {message}")]
    Manifest { repository: String, digest: String, message: String },
    #[error("image {digest} is for {found}, not {wanted}")]
    WrongPlatform { digest: String, found: String, wanted: String },
}

/// How a registry call failed, as far as trying again is concerned: typed
/// from the client's error, never read from its message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegistryFailure {
    /// No answer: the connection was refused, reset or timed out.
    Unreachable,
    /// An answer with this HTTP status (a refused token or login is 401).
    Status(u16),
    /// The registry lost track of a blob a push had just sent (a manifest
    /// naming an unknown blob, an upload whose content "did not match"):
    /// what a registry answers when two agents push one shared layer into
    /// one repository at once. Pushing again re-sends what is missing.
    BlobRace,
    /// Anything else: an answer that breaks the protocol, a local error.
    Other,
}

impl OciError {
    /// Whether the same call may succeed later: the registry was not
    /// reached, or answered 5xx, 408 (timeout) or 429 (too many requests).
    /// 401, 403 and other 4xx answers will not change by waiting; a
    /// [`RegistryFailure::BlobRace`] does.
    pub fn is_transient(&self) -> bool {
        match self {
            OciError::Registry { failure: RegistryFailure::Unreachable | RegistryFailure::BlobRace, .. } => true,
            OciError::Registry { failure: RegistryFailure::Status(code), .. } => {
                matches!(code, 408 | 429) || !(400..500).contains(code)
            }
            _ => false,
        }
    }
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
