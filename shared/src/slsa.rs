//! One platform's SLSA provenance statement and the attestation manifest
//! that carries it, shaped as BuildKit writes them so existing tools
//! (`docker buildx imagetools inspect --format '{{json .Provenance}}'`,
//! cosign, slsa-verifier) read braid's the same way.
//!
//! Only what the build's spec and the agent's report hold goes in: never a
//! secret (the spec carries secret ids only, never values) nor a registry
//! credential (they never enter the spec).

use std::collections::{BTreeMap, HashMap};

use serde_json::{Value, json};

use crate::buildneeds::{Provenance, ProvenanceMode, SlsaVersion};
use crate::digest::Digest;
use crate::oci::OCI_MANIFEST;
use crate::provenance::{
    BraidMetadata, METADATA_KEY, PREDICATE_TYPE_ANNOTATION, REFERENCE_DIGEST_ANNOTATION, REFERENCE_TYPE_ANNOTATION,
    REFERENCE_TYPE_ATTESTATION, SLSA_V1, SLSA_V02, STATEMENT_TYPE,
};

/// BuildKit's build type for v0.2 predicates (braid builds what a
/// Dockerfile frontend would, so a verifier's policy for it applies).
pub const BUILD_TYPE_V02: &str = "https://mobyproject.org/buildkit@v1";
/// BuildKit's build type for v1 predicates.
pub const BUILD_TYPE_V1: &str = "https://github.com/moby/buildkit/blob/master/docs/attestations/slsa-definitions.md";
/// The OCI config media type of an attestation manifest, as BuildKit's.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

/// What one platform's statement says.
#[derive(Debug, Clone)]
pub struct StatementInput {
    pub provenance: Provenance,
    /// The image names the index was pushed under ("reg/repo:tag").
    pub names: Vec<String>,
    pub platform: String,
    /// The platform's image manifest: the subject.
    pub digest: Digest,
    pub context_digest: String,
    /// The Dockerfile's path in the context ("" when it came inline).
    pub dockerfile_path: String,
    pub dockerfile_digest: String,
    /// Base images as written, with the digest they resolved to.
    pub base_images: Vec<(String, String)>,
    /// Recorded in `max` mode only.
    pub build_args: BTreeMap<String, String>,
    pub target: String,
    pub labels: BTreeMap<String, String>,
    pub started_ms: i64,
    pub finished_ms: i64,
    pub metadata: BraidMetadata,
}

/// `pkg:docker/NAME@TAG?platform=...` as BuildKit names images.
pub fn purl(reference: &str, platform: &str) -> String {
    let (name, version) = match reference.split_once('@') {
        Some((n, d)) => (n, d),
        None => match reference.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, t),
            _ => (reference, "latest"),
        },
    };
    format!("pkg:docker/{name}@{version}?platform={}", platform.replace('/', "%2F"))
}

fn sha256(digest: &str) -> Value {
    json!({ "sha256": digest.strip_prefix("sha256:").unwrap_or(digest) })
}

/// The in-toto statement (JSON value) for one platform.
pub fn statement(s: &StatementInput) -> Value {
    let subject: Vec<Value> = if s.names.is_empty() {
        vec![json!({ "name": "_", "digest": sha256(s.digest.as_str()) })]
    } else {
        s.names.iter().map(|n| json!({ "name": purl(n, &s.platform), "digest": sha256(s.digest.as_str()) })).collect()
    };
    let mut materials: Vec<Value> = s
        .base_images
        .iter()
        .map(|(r, d)| {
            let mut m = json!({ "uri": purl(r, &s.platform) });
            if !d.is_empty() {
                m["digest"] = sha256(d);
            }
            m
        })
        .collect();
    materials.push(json!({ "uri": "braid-context", "digest": sha256(&s.context_digest) }));
    let entry_point = if s.dockerfile_path.is_empty() { "Dockerfile" } else { &s.dockerfile_path };
    let mut args = serde_json::Map::new();
    if s.provenance.mode == ProvenanceMode::Max {
        for (k, v) in &s.build_args {
            args.insert(format!("build-arg:{k}"), v.clone().into());
        }
        for (k, v) in &s.labels {
            args.insert(format!("label:{k}"), v.clone().into());
        }
        if !s.target.is_empty() {
            args.insert("target".into(), s.target.clone().into());
        }
    }
    let mut request = json!({
        "frontend": "dockerfile.v0",
        "locals": [{ "name": "context" }, { "name": "dockerfile" }],
    });
    if !args.is_empty() {
        request["args"] = Value::Object(args);
    }
    let config_source =
        json!({ "uri": "braid-context", "digest": sha256(&s.context_digest), "entryPoint": entry_point });
    let dockerfile = json!({ "path": entry_point, "digest": sha256(&s.dockerfile_digest) });
    let braid = serde_json::to_value(&s.metadata).unwrap_or(Value::Null);
    let complete_materials = s.base_images.iter().all(|(_, d)| !d.is_empty());
    let invocation_id = format!("{}/{}", s.metadata.build_id, s.metadata.job_id);
    let (predicate_type, predicate) = match s.provenance.version {
        SlsaVersion::V02 => (
            SLSA_V02,
            json!({
                "builder": { "id": "" },
                "buildType": BUILD_TYPE_V02,
                "materials": materials,
                "invocation": {
                    "configSource": config_source,
                    "parameters": request,
                    "environment": { "platform": s.platform },
                },
                "buildConfig": { "dockerfile": dockerfile },
                "metadata": {
                    "buildInvocationID": invocation_id,
                    "buildStartedOn": rfc3339(s.started_ms),
                    "buildFinishedOn": rfc3339(s.finished_ms),
                    "completeness": {
                        "parameters": s.provenance.mode == ProvenanceMode::Max,
                        "environment": true,
                        "materials": complete_materials,
                    },
                    "reproducible": false,
                    METADATA_KEY: braid,
                },
            }),
        ),
        SlsaVersion::V1 => (
            SLSA_V1,
            json!({
                "buildDefinition": {
                    "buildType": BUILD_TYPE_V1,
                    "externalParameters": {
                        "configSource": { "uri": "braid-context", "digest": sha256(&s.context_digest), "path": entry_point },
                        "request": request,
                    },
                    "internalParameters": { "platform": s.platform, "dockerfile": dockerfile },
                    "resolvedDependencies": materials,
                },
                "runDetails": {
                    "builder": { "id": "" },
                    "metadata": {
                        "invocationID": invocation_id,
                        "startedOn": rfc3339(s.started_ms),
                        "finishedOn": rfc3339(s.finished_ms),
                        METADATA_KEY: braid,
                    },
                },
            }),
        ),
    };
    json!({
        "_type": STATEMENT_TYPE,
        "predicateType": predicate_type,
        "subject": subject,
        "predicate": predicate,
    })
}

/// A blob of an attestation manifest: its bytes, media type and layer
/// annotations.
#[derive(Debug, Clone)]
pub struct Blob {
    pub bytes: Vec<u8>,
    pub media_type: String,
    pub annotations: HashMap<String, String>,
}

impl Blob {
    pub fn digest(&self) -> Digest {
        Digest::of(&self.bytes)
    }

    fn descriptor(&self) -> Value {
        let mut d = json!({ "mediaType": self.media_type, "digest": self.digest().as_str(), "size": self.bytes.len() });
        if !self.annotations.is_empty() {
            d["annotations"] = json!(self.annotations);
        }
        d
    }
}

/// The statement layer (exact bytes) with BuildKit's annotation.
pub fn statement_layer(bytes: Vec<u8>, media_type: &str, predicate_type: &str) -> Blob {
    Blob {
        bytes,
        media_type: media_type.to_owned(),
        annotations: HashMap::from([(PREDICATE_TYPE_ANNOTATION.to_owned(), predicate_type.to_owned())]),
    }
}

/// An attestation manifest over `layers`, as BuildKit makes one: an OCI
/// image manifest whose config is `unknown/unknown` with the layers as
/// its diff ids. Returns (config, manifest bytes).
pub fn attestation_manifest(layers: &[Blob]) -> (Blob, Vec<u8>) {
    let diff_ids: Vec<String> = layers.iter().map(|l| l.digest().to_string()).collect();
    let config = json!({
        "architecture": "unknown",
        "os": "unknown",
        "config": {},
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    });
    let config = Blob {
        bytes: serde_json::to_vec(&config).unwrap_or_default(),
        media_type: OCI_CONFIG.to_owned(),
        annotations: HashMap::new(),
    };
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.descriptor(),
        "layers": layers.iter().map(Blob::descriptor).collect::<Vec<_>>(),
    });
    (config, serde_json::to_vec(&manifest).unwrap_or_default())
}

/// The index descriptor of an attestation manifest about `subject`.
pub fn index_descriptor(manifest: &[u8], subject: &Digest) -> Value {
    json!({
        "mediaType": OCI_MANIFEST,
        "digest": Digest::of(manifest).as_str(),
        "size": manifest.len(),
        "annotations": {
            REFERENCE_DIGEST_ANNOTATION: subject.as_str(),
            REFERENCE_TYPE_ANNOTATION: REFERENCE_TYPE_ATTESTATION,
        },
        "platform": { "architecture": "unknown", "os": "unknown" },
    })
}

/// Appends descriptors to an OCI index's `manifests` (its other bytes
/// keep their order).
pub fn append_to_index(index: &[u8], descriptors: Vec<Value>) -> Result<Vec<u8>, String> {
    let mut value: Value = serde_json::from_slice(index).map_err(|e| format!("index: {e}"))?;
    let manifests = value.get_mut("manifests").and_then(Value::as_array_mut).ok_or("index: no manifests")?;
    manifests.extend(descriptors);
    serde_json::to_vec(&value).map_err(|e| e.to_string())
}

/// Whether an index descriptor is an attestation manifest (not a platform).
pub fn is_attestation(descriptor: &Value) -> bool {
    descriptor
        .get("annotations")
        .and_then(|a| a.get(REFERENCE_TYPE_ANNOTATION))
        .and_then(Value::as_str)
        .is_some_and(|t| t == REFERENCE_TYPE_ATTESTATION)
}

/// Milliseconds since the epoch as RFC 3339 UTC, seconds precision.
pub fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::provenance::{IN_TOTO_MEDIA_TYPE, braid_metadata};

    fn input(mode: ProvenanceMode, version: SlsaVersion) -> StatementInput {
        StatementInput {
            provenance: Provenance { mode, version },
            names: vec!["127.0.0.1:5000/app:1".into()],
            platform: "linux/arm64".into(),
            digest: format!("sha256:{}", "a".repeat(64)).parse().unwrap(),
            context_digest: format!("sha256:{}", "c".repeat(64)),
            dockerfile_path: "build/Dockerfile".into(),
            dockerfile_digest: format!("sha256:{}", "d".repeat(64)),
            base_images: vec![("127.0.0.1:5000/base:latest".into(), format!("sha256:{}", "b".repeat(64)))],
            build_args: BTreeMap::from([("VERSION".into(), "1.2".into())]),
            target: "prod".into(),
            labels: BTreeMap::from([("team".into(), "infra".into())]),
            started_ms: 1_767_225_600_000,
            finished_ms: 1_767_225_661_000,
            metadata: BraidMetadata { agent: "pi-01".into(), native: false, ..BraidMetadata::default() },
        }
    }

    #[test]
    fn v02_statement_is_shaped_as_buildkit_writes_it() {
        let min = statement(&input(ProvenanceMode::Min, SlsaVersion::V02));
        assert_eq!(min["_type"], STATEMENT_TYPE);
        assert_eq!(min["predicateType"], SLSA_V02);
        assert_eq!(min["subject"][0]["name"], "pkg:docker/127.0.0.1:5000/app@1?platform=linux%2Farm64");
        assert_eq!(min["subject"][0]["digest"]["sha256"], "a".repeat(64));
        let p = &min["predicate"];
        assert_eq!(p["buildType"], BUILD_TYPE_V02);
        assert_eq!(p["invocation"]["configSource"]["entryPoint"], "build/Dockerfile");
        assert_eq!(p["invocation"]["environment"]["platform"], "linux/arm64");
        assert_eq!(p["materials"][0]["digest"]["sha256"], "b".repeat(64));
        assert_eq!(p["materials"][1]["digest"]["sha256"], "c".repeat(64));
        assert_eq!(p["metadata"]["buildStartedOn"], "2026-01-01T00:00:00Z");
        assert_eq!(p["metadata"]["buildFinishedOn"], "2026-01-01T00:01:01Z");
        assert!(p["invocation"]["parameters"].get("args").is_none(), "min mode has no build args");
        assert_eq!(braid_metadata(&min).unwrap().agent, "pi-01");
        let max = statement(&input(ProvenanceMode::Max, SlsaVersion::V02));
        let args = &max["predicate"]["invocation"]["parameters"]["args"];
        assert_eq!(args["build-arg:VERSION"], "1.2");
        assert_eq!(args["label:team"], "infra");
        assert_eq!(args["target"], "prod");
    }

    #[test]
    fn v1_statement_and_the_manifest_that_carries_it() {
        let v1 = statement(&input(ProvenanceMode::Max, SlsaVersion::V1));
        assert_eq!(v1["predicateType"], SLSA_V1);
        let p = &v1["predicate"];
        assert_eq!(p["buildDefinition"]["externalParameters"]["request"]["args"]["build-arg:VERSION"], "1.2");
        assert_eq!(p["buildDefinition"]["resolvedDependencies"][0]["digest"]["sha256"], "b".repeat(64));
        assert_eq!(p["runDetails"]["metadata"]["startedOn"], "2026-01-01T00:00:00Z");
        assert_eq!(braid_metadata(&v1).unwrap().agent, "pi-01");

        let layer = statement_layer(serde_json::to_vec(&v1).unwrap(), IN_TOTO_MEDIA_TYPE, SLSA_V1);
        let (config, manifest) = attestation_manifest(std::slice::from_ref(&layer));
        let m: Value = serde_json::from_slice(&manifest).unwrap();
        assert_eq!(m["config"]["digest"], config.digest().as_str());
        assert_eq!(m["layers"][0]["mediaType"], IN_TOTO_MEDIA_TYPE);
        assert_eq!(m["layers"][0]["annotations"][PREDICATE_TYPE_ANNOTATION], SLSA_V1);
        let subject: Digest = format!("sha256:{}", "a".repeat(64)).parse().unwrap();
        let d = index_descriptor(&manifest, &subject);
        assert!(is_attestation(&d));
        assert_eq!(d["platform"]["os"], "unknown");
        let index = append_to_index(br#"{"schemaVersion":2,"manifests":[{"digest":"x"}]}"#, vec![d]).unwrap();
        let index: Value = serde_json::from_slice(&index).unwrap();
        assert_eq!(index["manifests"].as_array().unwrap().len(), 2);
        assert_eq!(index["manifests"][1]["annotations"][REFERENCE_DIGEST_ANNOTATION], subject.as_str());
    }

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_767_225_599_999), "2025-12-31T23:59:59Z");
    }
}
