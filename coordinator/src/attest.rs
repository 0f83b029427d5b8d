//! Provenance on the merged index: one SLSA statement per platform, from
//! the build's spec and what each job's agent reported, attached as
//! BuildKit attaches it (an attestation manifest per platform, listed in
//! the index as `unknown/unknown`), and signed as a DSSE envelope when the
//! coordinator has a provenance key.
//!
//! The statement is made of the spec (never a secret's value: the spec
//! holds secret ids only) and the job records; credentials never enter it.

use braid_shared::buildneeds::Provenance;
use braid_shared::dsse::Signer;
use braid_shared::oci::Registry;
use braid_shared::provenance::{BraidMetadata, DSSE_MEDIA_TYPE, IN_TOTO_MEDIA_TYPE, IN_TOTO_PAYLOAD_TYPE};
use braid_shared::slsa::{self, StatementInput};
use braid_shared::{ImageRef, proto};

use crate::farm::BuildEntry;

/// Each platform's statement input, when the build asked for provenance
/// (`coordinator` is filled in by the caller).
pub fn statements(b: &BuildEntry) -> Vec<StatementInput> {
    let Some(provenance) = Provenance::of_spec(&b.spec) else { return Vec::new() };
    b.record.jobs.iter().filter_map(|job| statement_input(b, job, provenance)).collect()
}

fn statement_input(b: &BuildEntry, job: &crate::model::JobRecord, provenance: Provenance) -> Option<StatementInput> {
    let image = job.result.as_ref()?;
    let reported = job.provenance.clone().unwrap_or_default();
    let spec: &proto::BuildSpec = &b.spec;
    Some(StatementInput {
        provenance,
        names: b.tags.iter().map(|t| t.clone().with_default_tag().to_string()).collect(),
        platform: job.platform.to_string(),
        digest: image.digest.clone(),
        context_digest: spec.context_digest.clone(),
        dockerfile_path: spec.dockerfile_path.clone(),
        dockerfile_digest: reported.dockerfile_digest,
        base_images: reported.base_images,
        build_args: spec.build_args.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        target: spec.target.clone(),
        labels: spec.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        started_ms: job.started_ms.unwrap_or(b.record.created_ms),
        finished_ms: job.result_ms.or(job.finished_ms).unwrap_or(b.record.created_ms),
        metadata: BraidMetadata {
            coordinator: String::new(),
            build_id: b.record.id.clone(),
            job_id: job.id.clone(),
            agent: job.shown_agent().to_owned(),
            agent_identity: reported.agent_identity,
            builder_name: reported.builder_name,
            builder_version: reported.builder_version,
            native: !job.emulated,
        },
    })
}

/// Pushes every platform's attestation manifest (by digest) to each tag's
/// repository and returns the index with their descriptors added.
pub async fn attach(
    registry: &Registry,
    signer: Option<&Signer>,
    tags: &[ImageRef],
    inputs: &[StatementInput],
    index: &[u8],
) -> Result<Vec<u8>, String> {
    let mut descriptors = Vec::with_capacity(inputs.len());
    for input in inputs {
        let statement = slsa::statement(input);
        let predicate_type = statement["predicateType"].as_str().unwrap_or_default().to_owned();
        let bytes = serde_json::to_vec(&statement).map_err(|e| e.to_string())?;
        let mut layers = Vec::with_capacity(2);
        if let Some(signer) = signer {
            let envelope = signer
                .sign(IN_TOTO_PAYLOAD_TYPE, &bytes)
                .map_err(|e| format!("signing the provenance of {}: {e}", input.platform))?;
            layers.push(slsa::statement_layer(bytes, IN_TOTO_MEDIA_TYPE, &predicate_type));
            layers.push(slsa::statement_layer(envelope, DSSE_MEDIA_TYPE, &predicate_type));
        } else {
            layers.push(slsa::statement_layer(bytes, IN_TOTO_MEDIA_TYPE, &predicate_type));
        }
        let (config, manifest) = slsa::attestation_manifest(&layers);
        for tag in tags {
            for blob in std::iter::once(&config).chain(&layers) {
                registry
                    .push_blob(tag, &blob.bytes)
                    .await
                    .map_err(|e| format!("pushing the provenance of {} to {}: {e}", input.platform, tag.name()))?;
            }
            registry
                .push_manifest(tag, &manifest, braid_shared::oci::OCI_MANIFEST)
                .await
                .map_err(|e| format!("pushing the attestation of {} to {}: {e}", input.platform, tag.name()))?;
        }
        descriptors.push(slsa::index_descriptor(&manifest, &input.digest));
    }
    slsa::append_to_index(index, descriptors)
}
