//! The attestation vocabulary braid shares between the coordinator (which
//! writes provenance into the index) and the CLI (which reads it back in
//! `braid imagetools`): the media types and annotations BuildKit uses, so
//! existing tools read braid's attestations, and the one key under which
//! braid records which machine built a platform.

use serde::{Deserialize, Serialize};

/// Media type of an in-toto statement layer.
pub const IN_TOTO_MEDIA_TYPE: &str = "application/vnd.in-toto+json";
/// Media type of a DSSE envelope layer (a signed statement).
pub const DSSE_MEDIA_TYPE: &str = "application/vnd.dsse.envelope.v1+json";
/// DSSE payload type of an in-toto statement.
pub const IN_TOTO_PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
/// Layer annotation naming the statement's predicate type.
pub const PREDICATE_TYPE_ANNOTATION: &str = "in-toto.io/predicate-type";
/// In-toto statement type.
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v0.1";
/// SLSA provenance predicate types, as BuildKit writes them.
pub const SLSA_V02: &str = "https://slsa.dev/provenance/v0.2";
pub const SLSA_V1: &str = "https://slsa.dev/provenance/v1";
/// Index descriptor annotations marking an attestation manifest and the
/// platform manifest it is about.
pub const REFERENCE_TYPE_ANNOTATION: &str = "vnd.docker.reference.type";
pub const REFERENCE_TYPE_ATTESTATION: &str = "attestation-manifest";
pub const REFERENCE_DIGEST_ANNOTATION: &str = "vnd.docker.reference.digest";

/// The key, in the predicate's metadata (`predicate.metadata` in v0.2,
/// `predicate.runDetails.metadata` in v1), of [`BraidMetadata`]; BuildKit
/// keeps its own under `https://mobyproject.org/buildkit@v1#metadata`.
pub const METADATA_KEY: &str = "https://github.com/braid-build/braid@v1#metadata";

/// Which machine built one platform, as the coordinator saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BraidMetadata {
    /// The coordinator's address or name.
    pub coordinator: String,
    pub build_id: String,
    pub job_id: String,
    /// The agent's enrolled name.
    pub agent: String,
    /// The agent's certificate identity (subject common name and serial).
    pub agent_identity: String,
    /// The builder the agent ran ("buildah", "podman", "docker").
    pub builder_name: String,
    pub builder_version: String,
    /// False when the agent emulated the platform (binfmt).
    pub native: bool,
}

/// The [`BraidMetadata`] in a provenance statement (the whole in-toto
/// statement, v0.2 or v1 predicate), if braid wrote one.
pub fn braid_metadata(statement: &serde_json::Value) -> Option<BraidMetadata> {
    let predicate = statement.get("predicate")?;
    let metadata = predicate
        .get("metadata")
        .and_then(|m| m.get(METADATA_KEY))
        .or_else(|| predicate.get("runDetails")?.get("metadata")?.get(METADATA_KEY))?;
    serde_json::from_value(metadata.clone()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_metadata_from_either_predicate_version() {
        let meta = BraidMetadata { agent: "pi-01".into(), native: true, ..BraidMetadata::default() };
        let value = serde_json::to_value(&meta).unwrap();
        let v02 = serde_json::json!({ "predicate": { "metadata": { METADATA_KEY: value.clone() } } });
        let v1 = serde_json::json!({ "predicate": { "runDetails": { "metadata": { METADATA_KEY: value } } } });
        assert_eq!(braid_metadata(&v02), Some(meta.clone()));
        assert_eq!(braid_metadata(&v1), Some(meta));
        assert_eq!(braid_metadata(&serde_json::json!({ "predicate": {} })), None);
    }
}
