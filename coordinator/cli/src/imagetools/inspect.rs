//! `braid imagetools inspect`: an image or index as `docker buildx
//! imagetools inspect` prints it, with each platform's config platform and
//! braid's provenance summary from its attestation manifest.

use std::collections::BTreeMap;
use std::io::Write as _;

use anyhow::Context as _;
use base64::Engine as _;
use clap::{Args, ValueEnum};
use serde_json::{Value, json};

use braid_shared::oci::{self, Registry};
use braid_shared::provenance::{self, BraidMetadata};
use braid_shared::{Digest, ImageRef, limits};

use super::{RegistryArgs, parse_ref, registry_for};

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The image or index: NAME[:TAG] or NAME@DIGEST
    reference: String,
    /// Print the registry's manifest or index bytes unchanged (no newline)
    #[arg(long, conflicts_with = "format")]
    raw: bool,
    /// text (buildx's layout, with sizes, config platforms and provenance)
    /// or json (one object: name, mediaType, digest, size, annotations,
    /// manifests[] with name, mediaType, digest, size, platform,
    /// configDigest, configPlatform, annotations, attestationFor,
    /// provenance)
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
    #[command(flatten)]
    registry: RegistryArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// One manifest an index lists (or the single image inspected).
struct Entry {
    name: String,
    media_type: String,
    digest: String,
    size: u64,
    /// The descriptor's platform, as the index states it.
    platform: Option<String>,
    config_digest: Option<String>,
    /// What the image's config declares, or why it declares nothing.
    config_platform: Option<Result<String, String>>,
    annotations: BTreeMap<String, String>,
    /// The image an attestation manifest is about.
    attestation_for: Option<String>,
    provenance: Option<Provenance>,
}

/// A provenance statement about one platform's image.
struct Provenance {
    predicate_type: String,
    braid: Option<BraidMetadata>,
}

pub async fn run(args: InspectArgs) -> anyhow::Result<i32> {
    let reference = parse_ref("image", &args.reference)?;
    let registry = registry_for(&[&reference], &args.registry)?;
    let (bytes, digest) = registry.fetch_manifest(&reference).await?;
    if args.raw {
        let mut out = std::io::stdout().lock();
        out.write_all(&bytes)?;
        out.flush()?;
        return Ok(0);
    }
    let doc: Value = serde_json::from_slice(&bytes).with_context(|| format!("{reference}: not JSON"))?;
    let media_type = media_type_of(&doc);
    let digest: Digest = digest.parse()?;
    let entries = if doc.get("manifests").is_some() {
        index_entries(&registry, &reference, &doc).await?
    } else {
        let self_descriptor = json!({ "mediaType": media_type, "digest": digest.as_str(), "size": bytes.len() });
        vec![entry(&registry, &reference, &self_descriptor).await?]
    };
    let annotations = string_map(&doc["annotations"]);
    match args.format {
        Format::Json => {
            let manifests: Vec<Value> = entries.iter().map(Entry::to_json).collect();
            let out = json!({
                "name": reference.to_string(),
                "mediaType": media_type,
                "digest": digest.as_str(),
                "size": bytes.len(),
                "annotations": annotations,
                "manifests": manifests,
            });
            outln!("{}", serde_json::to_string_pretty(&out)?);
        }
        Format::Text => print_text(&reference, &media_type, &digest, &doc, &entries),
    }
    Ok(0)
}

/// The document's media type, as buildx detects one that states none.
fn media_type_of(doc: &Value) -> String {
    match doc["mediaType"].as_str() {
        Some(m) if !m.is_empty() => m.to_owned(),
        _ if doc.get("manifests").is_some() => oci::OCI_INDEX.to_owned(),
        _ => oci::DOCKER_MANIFEST.to_owned(),
    }
}

fn string_map(value: &Value) -> BTreeMap<String, String> {
    value
        .as_object()
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned()))).collect())
        .unwrap_or_default()
}

fn platform_of(descriptor: &Value) -> Option<String> {
    let p = descriptor.get("platform")?;
    let (os, arch) = (p["os"].as_str()?, p["architecture"].as_str()?);
    Some(match p["variant"].as_str().filter(|v| !v.is_empty()) {
        Some(v) => format!("{os}/{arch}/{v}"),
        None => format!("{os}/{arch}"),
    })
}

fn is_image_manifest(media_type: &str) -> bool {
    media_type == oci::OCI_MANIFEST || media_type == oci::DOCKER_MANIFEST
}

/// One descriptor: for an image manifest, its config's digest and platform.
async fn entry(registry: &Registry, reference: &ImageRef, descriptor: &Value) -> anyhow::Result<Entry> {
    let digest: Digest = descriptor["digest"]
        .as_str()
        .unwrap_or_default()
        .parse()
        .with_context(|| format!("{reference}: a descriptor's digest"))?;
    let media_type = descriptor["mediaType"].as_str().unwrap_or_default().to_owned();
    let annotations = string_map(&descriptor["annotations"]);
    let attestation = annotations.get(provenance::REFERENCE_TYPE_ANNOTATION).map(String::as_str)
        == Some(provenance::REFERENCE_TYPE_ATTESTATION);
    let mut e = Entry {
        name: reference.at_digest(&digest).to_string(),
        media_type,
        digest: digest.to_string(),
        size: descriptor["size"].as_u64().unwrap_or_default(),
        platform: platform_of(descriptor),
        config_digest: None,
        config_platform: None,
        attestation_for: attestation
            .then(|| annotations.get(provenance::REFERENCE_DIGEST_ANNOTATION).cloned())
            .flatten(),
        annotations,
        provenance: None,
    };
    if !attestation && is_image_manifest(&e.media_type) {
        let image = registry.image_config(reference, &digest).await?;
        e.config_digest = Some(image.config_digest.to_string());
        e.config_platform = Some(image.platform.map(|p| p.to_string()));
    }
    Ok(e)
}

/// Every descriptor of an index, each image with the provenance its
/// attestation manifest holds.
async fn index_entries(registry: &Registry, reference: &ImageRef, doc: &Value) -> anyhow::Result<Vec<Entry>> {
    let descriptors = doc["manifests"].as_array().map(Vec::as_slice).unwrap_or_default();
    if descriptors.len() > limits::INDEX_MANIFESTS {
        anyhow::bail!("{reference}: the index lists more than {} manifests", limits::INDEX_MANIFESTS);
    }
    let mut entries = Vec::with_capacity(descriptors.len());
    for d in descriptors {
        entries.push(entry(registry, reference, d).await?);
    }
    let attestations: Vec<(String, String)> =
        entries.iter().filter_map(|e| Some((e.attestation_for.clone()?, e.digest.clone()))).collect();
    for (subject, attestation) in attestations {
        let found = provenance_in(registry, reference, &attestation.parse()?).await?;
        if let Some(e) = entries.iter_mut().find(|e| e.digest == subject && e.attestation_for.is_none()) {
            e.provenance = found;
        }
    }
    Ok(entries)
}

/// The first SLSA provenance statement of an attestation manifest, as an
/// in-toto layer or a DSSE envelope around one.
async fn provenance_in(
    registry: &Registry,
    reference: &ImageRef,
    digest: &Digest,
) -> anyhow::Result<Option<Provenance>> {
    let (bytes, _) = registry.fetch_manifest(&reference.at_digest(digest)).await?;
    let manifest: Value = serde_json::from_slice(&bytes).with_context(|| format!("attestation manifest {digest}"))?;
    for layer in manifest["layers"].as_array().map(Vec::as_slice).unwrap_or_default() {
        let predicate_type =
            layer["annotations"][provenance::PREDICATE_TYPE_ANNOTATION].as_str().unwrap_or_default().to_owned();
        if predicate_type != provenance::SLSA_V02 && predicate_type != provenance::SLSA_V1 {
            continue;
        }
        let media_type = layer["mediaType"].as_str().unwrap_or_default();
        if media_type != provenance::IN_TOTO_MEDIA_TYPE && media_type != provenance::DSSE_MEDIA_TYPE {
            continue;
        }
        let blob_digest: Digest =
            layer["digest"].as_str().unwrap_or_default().parse().with_context(|| format!("a layer of {digest}"))?;
        let blob = registry.fetch_blob(reference, &blob_digest, limits::MANIFEST_BYTES).await?;
        if Digest::of(&blob) != blob_digest {
            anyhow::bail!("{reference}: attestation layer {blob_digest} does not match its digest");
        }
        let mut statement: Value = serde_json::from_slice(&blob).with_context(|| format!("statement {blob_digest}"))?;
        if media_type == provenance::DSSE_MEDIA_TYPE {
            let payload = statement["payload"].as_str().unwrap_or_default();
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(payload)
                .with_context(|| format!("the DSSE payload of {blob_digest}"))?;
            statement = serde_json::from_slice(&decoded).with_context(|| format!("the statement in {blob_digest}"))?;
        }
        return Ok(Some(Provenance { predicate_type, braid: provenance::braid_metadata(&statement) }));
    }
    Ok(None)
}

impl Provenance {
    fn summary(&self) -> String {
        match &self.braid {
            Some(m) => format!(
                "agent {}, {} {}, {}, build {}",
                m.agent,
                m.builder_name,
                m.builder_version,
                if m.native { "native" } else { "emulated" },
                m.build_id
            ),
            None => format!("{} (no braid metadata)", self.predicate_type),
        }
    }
}

impl Entry {
    fn config_platform_text(&self) -> Option<String> {
        self.config_platform.as_ref().map(|p| match p {
            Ok(p) => p.clone(),
            Err(why) => format!("none ({why})"),
        })
    }

    fn to_json(&self) -> Value {
        let provenance = self.provenance.as_ref().map(|p| {
            let mut v = serde_json::to_value(p.braid.clone().unwrap_or_default()).unwrap_or_default();
            if p.braid.is_none() {
                v = json!({});
            }
            v["predicateType"] = p.predicate_type.clone().into();
            v
        });
        json!({
            "name": self.name,
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
            "platform": self.platform,
            "configDigest": self.config_digest,
            "configPlatform": self.config_platform.as_ref().and_then(|p| p.as_ref().ok()),
            "annotations": self.annotations,
            "attestationFor": self.attestation_for,
            "provenance": provenance,
        })
    }

    /// The "Key:" / value lines of this entry, in print order.
    fn lines(&self) -> Vec<(&'static str, String)> {
        let mut lines = vec![("Name:", self.name.clone()), ("MediaType:", self.media_type.clone())];
        if let Some(p) = &self.platform {
            lines.push(("Platform:", p.clone()));
        }
        lines.push(("Size:", self.size.to_string()));
        if let Some(c) = &self.config_digest {
            lines.push(("ConfigDigest:", c.clone()));
        }
        if let Some(p) = self.config_platform_text() {
            lines.push(("ConfigPlatform:", p));
        }
        if let Some(p) = &self.provenance {
            lines.push(("Provenance:", p.summary()));
        }
        lines
    }
}

/// Key/value lines with the values aligned, as buildx's tabwriter does.
fn print_block(prefix: &str, lines: &[(&str, String)], width: usize) {
    for (key, value) in lines {
        outln!("{prefix}{key:<width$}{value}");
    }
}

fn print_annotations(prefix: &str, annotations: &BTreeMap<String, String>) {
    let width = annotations.keys().map(|k| k.len() + 2).max().unwrap_or_default();
    for (k, v) in annotations {
        let key = format!("{k}:");
        outln!("{prefix}{key:<width$}{v}");
    }
}

fn print_text(reference: &ImageRef, media_type: &str, digest: &Digest, doc: &Value, entries: &[Entry]) {
    let mut head = vec![("Name:", reference.to_string()), ("MediaType:", media_type.to_owned())];
    head.push(("Digest:", digest.to_string()));
    if doc.get("manifests").is_none() {
        // A single image: what its config says, under the header.
        for (key, value) in entries.iter().flat_map(Entry::lines).skip(2) {
            head.push((key, value));
        }
    }
    let width = head.iter().map(|(k, _)| k.len() + 1).max().unwrap_or_default();
    print_block("", &head, width);
    if doc.get("manifests").is_none() {
        return;
    }
    let annotations = string_map(&doc["annotations"]);
    if !annotations.is_empty() {
        outln!("Annotations:");
        print_annotations("  ", &annotations);
    }
    outln!();
    outln!("Manifests:");
    let blocks: Vec<Vec<(&str, String)>> = entries.iter().map(Entry::lines).collect();
    let width = blocks.iter().flatten().map(|(k, _)| k.len() + 1).chain([13]).max().unwrap_or_default();
    for (i, (e, lines)) in entries.iter().zip(&blocks).enumerate() {
        if i > 0 {
            outln!();
        }
        print_block("  ", lines, width);
        if !e.annotations.is_empty() {
            outln!("  Annotations:");
            print_annotations("    ", &e.annotations);
        }
    }
}
