//! Provenance on the merged index: one SLSA statement per platform, from
//! the build's spec and what each job's agent reported, attached as
//! BuildKit attaches it (an attestation manifest per platform, listed in
//! the index as `unknown/unknown`), and signed as a DSSE envelope when the
//! coordinator has a provenance key.
//!
//! The statement is made of the spec (never a secret's value: the spec
//! holds secret ids only) and the job records; credentials never enter it.

use std::collections::BTreeMap;

use futures::{TryStreamExt, stream};

use braid_shared::buildneeds::Provenance;
use braid_shared::dsse::Signer;
use braid_shared::oci::Registry;
use braid_shared::provenance::{BraidMetadata, DSSE_MEDIA_TYPE, IN_TOTO_MEDIA_TYPE, IN_TOTO_PAYLOAD_TYPE};
use braid_shared::slsa::{self, StatementInput};
use braid_shared::{Digest, ImageRef, proto};

use crate::farm::BuildEntry;

/// Registry requests a merge keeps in flight at once.
const PUSHES_AT_ONCE: usize = 8;

/// Where a push goes: registry, repository, and the blob or platform.
type Destination<'a, K> = (&'a str, &'a str, K);

/// A push: the tag naming the repository, the bytes, and the platform
/// (for the error).
type Push<'a, B> = (&'a ImageRef, B, &'a str);

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
    // Built first, pushed after: blobs, then the manifests that name them,
    // each phase concurrently (a merge waits on every round trip). A blob
    // is pushed once per repository: two uploads of one blob into one
    // repository at once can lose it in some registries.
    let mut descriptors = Vec::with_capacity(inputs.len());
    let mut manifests = Vec::with_capacity(inputs.len());
    let mut blobs: BTreeMap<Destination<Digest>, Push<Vec<u8>>> = BTreeMap::new();
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
                blobs
                    .entry((tag.registry(), tag.repository(), blob.digest()))
                    .or_insert_with(|| (tag, blob.bytes.clone(), input.platform.as_str()));
            }
        }
        descriptors.push(slsa::index_descriptor(&manifest, &input.digest));
        manifests.push((input.platform.as_str(), manifest));
    }
    stream::iter(blobs.into_values().map(Ok))
        .try_for_each_concurrent(PUSHES_AT_ONCE, |(tag, bytes, platform)| async move {
            registry
                .push_blob(tag, &bytes)
                .await
                .map_err(|e| format!("pushing the provenance of {platform} to {}: {e}", tag.name()))
        })
        .await?;
    // Once per repository, whatever the number of its tags.
    let manifest_pushes: BTreeMap<Destination<&str>, Push<&Vec<u8>>> = manifests
        .iter()
        .flat_map(|(platform, manifest)| {
            tags.iter().map(move |tag| ((tag.registry(), tag.repository(), *platform), (tag, manifest, *platform)))
        })
        .collect();
    stream::iter(manifest_pushes.into_values().map(Ok))
        .try_for_each_concurrent(PUSHES_AT_ONCE, |(tag, manifest, platform)| async move {
            registry
                .push_manifest(tag, manifest, braid_shared::oci::OCI_MANIFEST)
                .await
                .map_err(|e| format!("pushing the attestation of {platform} to {}: {e}", tag.name()))
        })
        .await?;
    slsa::append_to_index(index, descriptors)
}
