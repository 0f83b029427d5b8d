//! `braid imagetools verify REF`: every platform of an index has a signed
//! provenance statement about exactly that platform's manifest, signed by
//! a provenance certificate of the cluster CA. Also reads the statements
//! back for `--metadata-file` (`buildx.build.provenance`).

use std::collections::HashMap;

use anyhow::{Context as _, bail};
use serde_json::Value;

use braid_shared::oci::Registry;
use braid_shared::provenance::{
    DSSE_MEDIA_TYPE, IN_TOTO_MEDIA_TYPE, IN_TOTO_PAYLOAD_TYPE, REFERENCE_DIGEST_ANNOTATION, braid_metadata,
};
use braid_shared::{Digest, ImageRef, dsse, limits, slsa};

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// The image index: REGISTRY/REPOSITORY[:TAG|@DIGEST]
    pub reference: String,
    #[command(flatten)]
    pub registry: super::RegistryArgs,
}

/// One platform's attestation as read from the registry.
pub struct Attestation {
    pub platform: String,
    pub digest: String,
    /// The statement's exact bytes and its JSON, or why there is none.
    pub statement: Result<(Vec<u8>, Value), String>,
    /// The DSSE envelope's bytes, if the manifest has one.
    pub envelope: Option<Vec<u8>>,
}

fn platform_of(descriptor: &Value) -> String {
    let p = &descriptor["platform"];
    let mut s = format!("{}/{}", p["os"].as_str().unwrap_or("?"), p["architecture"].as_str().unwrap_or("?"));
    if let Some(v) = p["variant"].as_str() {
        s = format!("{s}/{v}");
    }
    s
}

/// Every platform of the index at `reference` with its attestation.
pub async fn read(registry: &Registry, reference: &ImageRef) -> anyhow::Result<Vec<Attestation>> {
    let (bytes, _) = registry.fetch_manifest(reference).await.with_context(|| format!("reading {reference}"))?;
    let index: Value = serde_json::from_slice(&bytes).with_context(|| format!("{reference} is not JSON"))?;
    let manifests = index["manifests"].as_array().with_context(|| format!("{reference} is not an image index"))?;
    let mut attestations: HashMap<String, &Value> = HashMap::new();
    for m in manifests.iter().filter(|m| slsa::is_attestation(m)) {
        if let Some(subject) = m["annotations"][REFERENCE_DIGEST_ANNOTATION].as_str() {
            attestations.insert(subject.to_owned(), m);
        }
    }
    let mut out = Vec::new();
    for m in manifests.iter().filter(|m| !slsa::is_attestation(m)) {
        let digest = m["digest"].as_str().unwrap_or_default().to_owned();
        let (statement, envelope) = match attestations.get(&digest) {
            None => (Err("no attestation manifest refers to it".to_owned()), None),
            Some(a) => match layers(registry, reference, a).await {
                Ok(found) => found,
                Err(e) => (Err(format!("{e:#}")), None),
            },
        };
        out.push(Attestation { platform: platform_of(m), digest, statement, envelope });
    }
    Ok(out)
}

/// Fetches a blob and checks it hashes to its descriptor's digest.
async fn blob(registry: &Registry, repository: &ImageRef, descriptor: &Value) -> anyhow::Result<Vec<u8>> {
    let digest: Digest = descriptor["digest"].as_str().unwrap_or_default().parse()?;
    let bytes = registry.fetch_blob(repository, &digest, limits::ATTESTATION_BYTES).await?;
    if Digest::of(&bytes) != digest {
        bail!("blob {digest} does not match its digest");
    }
    Ok(bytes)
}

type Layers = (Result<(Vec<u8>, Value), String>, Option<Vec<u8>>);

/// The statement and envelope layers of one attestation manifest.
async fn layers(registry: &Registry, reference: &ImageRef, descriptor: &Value) -> anyhow::Result<Layers> {
    let digest: Digest = descriptor["digest"].as_str().unwrap_or_default().parse()?;
    let (bytes, _) = registry.fetch_manifest(&reference.at_digest(&digest)).await?;
    if Digest::of(&bytes) != digest {
        bail!("attestation manifest {digest} does not match its digest");
    }
    let manifest: Value = serde_json::from_slice(&bytes)?;
    let empty = Vec::new();
    let mut statement = Err("the attestation manifest has no in-toto layer".to_owned());
    let mut envelope = None;
    for layer in manifest["layers"].as_array().unwrap_or(&empty) {
        match layer["mediaType"].as_str() {
            Some(IN_TOTO_MEDIA_TYPE) => {
                let bytes = blob(registry, reference, layer).await?;
                let value: Value = serde_json::from_slice(&bytes).context("the statement is not JSON")?;
                statement = Ok((bytes, value));
            }
            Some(DSSE_MEDIA_TYPE) => envelope = Some(blob(registry, reference, layer).await?),
            _ => {}
        }
    }
    Ok((statement, envelope))
}

/// Checks one platform; the line to print, or why it fails.
fn check(a: &Attestation, ca: &str) -> Result<String, String> {
    let (bytes, statement) = a.statement.as_ref().map_err(Clone::clone)?;
    let want = a.digest.strip_prefix("sha256:").unwrap_or(&a.digest);
    let subjects = statement["subject"].as_array().cloned().unwrap_or_default();
    if subjects.is_empty() || !subjects.iter().all(|s| s["digest"]["sha256"].as_str() == Some(want)) {
        return Err(format!("the statement's subject is not {}", a.digest));
    }
    let envelope = a.envelope.as_ref().ok_or("the statement is not signed (no DSSE envelope)")?;
    let verified = dsse::verify(envelope, ca)?;
    if verified.payload_type != IN_TOTO_PAYLOAD_TYPE {
        return Err(format!("the envelope's payload type is {:?}", verified.payload_type));
    }
    if verified.payload != *bytes {
        return Err("the signed statement differs from the attached statement".into());
    }
    let meta = braid_metadata(statement).ok_or("the statement has no braid metadata")?;
    Ok(format!(
        "{:<16} {}  agent {} ({}), builder {} {}, {}, signed by {}",
        a.platform,
        a.digest,
        meta.agent,
        if meta.agent_identity.is_empty() { "no certificate" } else { &meta.agent_identity },
        meta.builder_name,
        meta.builder_version,
        if meta.native { "native" } else { "emulated" },
        verified.signer
    ))
}

pub async fn run(conn: &crate::conn::Conn, args: VerifyArgs) -> anyhow::Result<i32> {
    let Some(ca_path) = &conn.ca else {
        bail!("braid imagetools verify needs the cluster CA: --ca FILE (or BRAID_CA)");
    };
    let ca = std::fs::read_to_string(ca_path).with_context(|| format!("reading the CA {}", ca_path.display()))?;
    let reference: ImageRef =
        args.reference.parse().with_context(|| format!("invalid reference {:?}", args.reference))?;
    let registry = super::registry_for(&[&reference], &args.registry)?;
    let attestations = read(&registry, &reference).await?;
    if attestations.is_empty() {
        bail!("{reference}: the index lists no platform");
    }
    let mut failed = Vec::new();
    for a in &attestations {
        match check(a, &ca) {
            Ok(line) => outln!("{line}"),
            Err(why) => {
                errln!("{:<16} {}  FAILED: {why}", a.platform, a.digest);
                failed.push(a.platform.clone());
            }
        }
    }
    if failed.is_empty() {
        return Ok(0);
    }
    crate::diag::error(&format!("provenance does not verify for {}", failed.join(", ")));
    Ok(1)
}

/// `buildx.build.provenance` as buildx writes it: the predicate for a
/// one-platform build, else `buildx.build.provenance/<platform>` keys.
pub async fn metadata(reference: &ImageRef) -> anyhow::Result<Vec<(String, Value)>> {
    let registry = super::registry_for(&[reference], &super::RegistryArgs { insecure_registries: Vec::new() })?;
    let attestations = read(&registry, reference).await?;
    let single = attestations.len() == 1;
    let mut out = Vec::new();
    for a in attestations {
        let (_, statement) = a.statement.map_err(|e| anyhow::anyhow!("{}: {e}", a.platform))?;
        let key = if single {
            "buildx.build.provenance".to_owned()
        } else {
            format!("buildx.build.provenance/{}", a.platform)
        };
        out.push((key, statement["predicate"].clone()));
    }
    Ok(out)
}
