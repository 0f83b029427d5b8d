//! `braid imagetools create`: a new index over images and indexes already
//! in one registry, as `docker buildx imagetools create` makes it, with the
//! checks a braid build's merge makes: every image's config names the
//! platform it is listed for, one image per platform, and every manifest
//! present in each tag's repository before the tag moves (one PUT).

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::Args;
use serde_json::{Value, json};

use braid_shared::oci::{self, OciError, Registry, RegistryFailure};
use braid_shared::provenance;
use braid_shared::{Digest, ImageRef, Platform, limits};

use super::{RegistryArgs, parse_ref, registry_for};

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Push the new index under TAG (repeatable); the first tag's
    /// repository is where bare digests and -f descriptors are read
    #[arg(short = 't', long = "tag", value_name = "TAG", required_unless_present = "dry_run")]
    tags: Vec<String>,
    /// Add the manifests the first tag already points at (an index's
    /// entries, or its single image) before the sources
    #[arg(long)]
    append: bool,
    /// index:KEY=VALUE (on the index) or manifest-descriptor:KEY=VALUE /
    /// manifest-descriptor[PLATFORM]:KEY=VALUE (on each index entry, or
    /// those of PLATFORM) (repeatable); as buildx, manifest annotations and a
    /// bare KEY=VALUE are refused (the images are not rewritten), and a
    /// Docker manifest list takes none
    #[arg(long = "annotation", value_name = "TYPE:KEY=VALUE")]
    annotations: Vec<String>,
    /// Print the index JSON that would be pushed; push nothing
    #[arg(long)]
    dry_run: bool,
    /// Read a source descriptor from FILE (JSON: mediaType, digest, size,
    /// optional platform and annotations), found in the first tag's
    /// repository (repeatable)
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    files: Vec<PathBuf>,
    /// Images or indexes of the tags' registry: NAME[:TAG], NAME@DIGEST, or
    /// a bare sha256:... in the first tag's repository; an index
    /// contributes all its manifests, attestation manifests included
    #[arg(value_name = "SOURCE")]
    sources: Vec<String>,
    #[command(flatten)]
    registry: RegistryArgs,
}

/// One source as the user named it.
struct Source {
    label: String,
    reference: ImageRef,
    /// The descriptor a `-f` file gave.
    descriptor: Option<Value>,
}

/// One manifest the new index lists, and where it is.
struct Candidate {
    from: String,
    repository: ImageRef,
    descriptor: Value,
}

impl Candidate {
    fn digest(&self) -> &str {
        self.descriptor["digest"].as_str().unwrap_or_default()
    }
    fn media_type(&self) -> &str {
        self.descriptor["mediaType"].as_str().unwrap_or_default()
    }
    fn is_attestation(&self) -> bool {
        self.descriptor["annotations"][provenance::REFERENCE_TYPE_ANNOTATION].as_str()
            == Some(provenance::REFERENCE_TYPE_ATTESTATION)
    }
}

/// Annotations by level, checked as buildx's imagetools create checks them.
struct Annotations {
    index: HashMap<String, String>,
    /// (platform or every entry, key, value)
    descriptor: Vec<(Option<Platform>, String, String)>,
}

fn parse_annotations(raw: &[String]) -> anyhow::Result<Annotations> {
    let mut out = Annotations { index: HashMap::new(), descriptor: Vec::new() };
    for given in raw {
        let parsed = crate::buildspec::parse_annotations(std::slice::from_ref(given))
            .with_context(|| format!("--annotation {given:?}"))?;
        for a in parsed {
            if a.key.is_empty() {
                bail!("--annotation {given:?}: an empty key");
            }
            match a.level.as_str() {
                "index" if a.platform.is_empty() => {
                    out.index.insert(a.key, a.value);
                }
                "index" => bail!("--annotation {given:?}: an index annotation names no platform"),
                "manifest-descriptor" => {
                    let platform = match a.platform.as_str() {
                        "" => None,
                        p => Some(p.parse::<Platform>().with_context(|| format!("--annotation {given:?}"))?),
                    };
                    out.descriptor.push((platform, a.key, a.value));
                }
                "manifest" => bail!(
                    "--annotation {given:?}: imagetools create does not rewrite images, so it takes no manifest annotations (as buildx): use index:KEY=VALUE or manifest-descriptor:KEY=VALUE"
                ),
                "index-descriptor" => {
                    bail!("--annotation {given:?}: index-descriptor annotations are invalid while creating an image")
                }
                other => bail!(
                    "--annotation {given:?}: unknown type {other:?} (expected index or manifest-descriptor[PLATFORM])"
                ),
            }
        }
    }
    Ok(out)
}

fn is_index(media_type: &str) -> bool {
    media_type == oci::OCI_INDEX || media_type == oci::DOCKER_MANIFEST_LIST
}

fn platform_of(descriptor: &Value) -> Option<String> {
    let p = descriptor.get("platform").filter(|p| !p.is_null())?;
    let (os, arch) = (p["os"].as_str().unwrap_or_default(), p["architecture"].as_str().unwrap_or_default());
    Some(match p["variant"].as_str().filter(|v| !v.is_empty()) {
        Some(v) => format!("{os}/{arch}/{v}"),
        None => format!("{os}/{arch}"),
    })
}

fn platform_json(p: &Platform) -> Value {
    let mut v = json!({ "architecture": p.arch(), "os": p.os() });
    if let Some(variant) = p.variant() {
        v["variant"] = variant.into();
    }
    v
}

fn is_not_found(e: &OciError) -> bool {
    matches!(e, OciError::Registry { failure: RegistryFailure::Status(404), .. })
}

pub async fn run(args: CreateArgs) -> anyhow::Result<i32> {
    if args.tags.len() > limits::TAGS {
        bail!("--tag: at most {} tags", limits::TAGS);
    }
    if args.sources.len() + args.files.len() > limits::IMAGETOOLS_SOURCES {
        bail!("at most {} sources (arguments and --file)", limits::IMAGETOOLS_SOURCES);
    }
    if args.annotations.len() > limits::INDEX_MANIFESTS {
        bail!("--annotation: at most {} annotations", limits::INDEX_MANIFESTS);
    }
    let tags: Vec<ImageRef> = args
        .tags
        .iter()
        .map(|t| parse_ref("--tag", t).map(ImageRef::with_default_tag))
        .collect::<anyhow::Result<_>>()?;
    if let Some(t) = tags.iter().find(|t| t.digest().is_some()) {
        bail!("--tag {t}: a tag, not a digest");
    }
    let annotations = parse_annotations(&args.annotations)?;
    let home = tags.first();
    let in_home = |what: &str, digest: &str| -> anyhow::Result<ImageRef> {
        let Some(home) = home else { bail!("{what}: a bare digest needs a --tag to name its repository") };
        let digest: Digest = digest.parse().with_context(|| what.to_owned())?;
        Ok(home.at_digest(&digest))
    };
    let mut sources = Vec::new();
    if args.append {
        let Some(home) = home else { bail!("--append needs a --tag") };
        sources.push(Source { label: format!("{home} (--append)"), reference: home.clone(), descriptor: None });
    }
    for path in &args.files {
        let what = format!("--file {}", path.display());
        let meta = std::fs::metadata(path).with_context(|| what.clone())?;
        if meta.len() > limits::MANIFEST_BYTES as u64 {
            bail!("{what}: larger than {} bytes", limits::MANIFEST_BYTES);
        }
        let text = std::fs::read(path).with_context(|| what.clone())?;
        let descriptor: Value = serde_json::from_slice(&text).with_context(|| format!("{what}: not JSON"))?;
        let digest = descriptor["digest"].as_str().with_context(|| format!("{what}: a descriptor without a digest"))?;
        let reference = in_home(&what, digest)?;
        sources.push(Source { label: what, reference, descriptor: Some(descriptor) });
    }
    for raw in &args.sources {
        let reference = if raw.starts_with("sha256:") {
            in_home(&format!("source {raw}"), raw)?
        } else {
            parse_ref("source", raw)?
        };
        sources.push(Source { label: raw.clone(), reference, descriptor: None });
    }
    if sources.is_empty() {
        bail!("no source: name images or indexes (or --file, --append)");
    }
    // Manifests are mounted across repositories, which one registry does.
    let registry_host = home.map_or(sources[0].reference.registry(), |t| t.registry()).to_owned();
    for (what, r) in tags.iter().map(|t| ("--tag", t)).chain(sources.iter().map(|s| ("source", &s.reference))) {
        if r.registry() != registry_host {
            bail!(
                "{what} {r} is on registry {}, not {registry_host}: imagetools create combines images of one registry",
                r.registry()
            );
        }
    }
    let refs: Vec<&ImageRef> = tags.iter().chain(sources.iter().map(|s| &s.reference)).collect();
    let registry = registry_for(&refs, &args.registry)?;

    let mut candidates: Vec<Candidate> = Vec::new();
    let mut single_index: Option<(Vec<u8>, String)> = None;
    let source_count = sources.len();
    for source in &sources {
        let (bytes, digest) = match registry.fetch_manifest(&source.reference).await {
            Ok(found) => found,
            Err(e) if args.append && source.label.ends_with("(--append)") && is_not_found(&e) => {
                errln!("{}: nothing to append (the tag does not exist yet)", source.reference);
                continue;
            }
            Err(e) => return Err(anyhow::anyhow!("source {}: {e}", source.label)),
        };
        let doc: Value =
            serde_json::from_slice(&bytes).with_context(|| format!("source {}: not JSON", source.label))?;
        let media_type = match doc["mediaType"].as_str() {
            Some(m) if !m.is_empty() => m.to_owned(),
            _ if doc.get("manifests").is_some() => oci::OCI_INDEX.to_owned(),
            _ => oci::DOCKER_MANIFEST.to_owned(),
        };
        if let Some(d) = &source.descriptor
            && d["digest"].as_str() != Some(digest.as_str())
        {
            bail!("source {}: the registry's manifest is {digest}", source.label);
        }
        if is_index(&media_type) {
            if source_count == 1 {
                single_index = Some((bytes.clone(), media_type.clone()));
            }
            let listed = doc["manifests"].as_array().map(Vec::as_slice).unwrap_or_default();
            if listed.len() > limits::INDEX_MANIFESTS {
                bail!("source {}: more than {} manifests", source.label, limits::INDEX_MANIFESTS);
            }
            for d in listed {
                let child = d["mediaType"].as_str().unwrap_or_default();
                if is_index(child) {
                    bail!("source {}: lists another index ({}); name it as a source itself", source.label, d["digest"]);
                }
                candidates.push(Candidate {
                    from: source.label.clone(),
                    repository: source.reference.clone(),
                    descriptor: d.clone(),
                });
            }
        } else if media_type == oci::OCI_MANIFEST || media_type == oci::DOCKER_MANIFEST {
            let mut descriptor = json!({ "mediaType": media_type, "digest": digest, "size": bytes.len() });
            if let Some(given) = &source.descriptor {
                for key in ["platform", "annotations"] {
                    if let Some(v) = given.get(key).filter(|v| !v.is_null()) {
                        descriptor[key] = v.clone();
                    }
                }
            }
            candidates.push(Candidate { from: source.label.clone(), repository: source.reference.clone(), descriptor });
        } else {
            bail!("source {}: a {media_type} is neither an image nor an index", source.label);
        }
    }
    if candidates.len() > limits::INDEX_MANIFESTS {
        bail!("more than {} manifests in all", limits::INDEX_MANIFESTS);
    }

    // Each image's config must name the platform it is listed for; one
    // listed without a platform takes its config's (as buildx).
    for c in &mut candidates {
        if c.is_attestation() {
            continue;
        }
        let digest: Digest = c.digest().parse().with_context(|| format!("source {}", c.from))?;
        let image = registry
            .image_config(&c.repository, &digest)
            .await
            .map_err(|e| anyhow::anyhow!("source {}: {e}", c.from))?;
        let declared =
            image.platform.map_err(|why| anyhow::anyhow!("source {}: image {digest} is refused: {why}", c.from))?;
        match platform_of(&c.descriptor) {
            None => c.descriptor["platform"] = platform_json(&declared),
            Some(listed) => {
                let parsed = listed.parse::<Platform>().ok();
                if parsed.as_ref() != Some(&declared) {
                    bail!("source {}: image {digest} is listed as {listed} but its config declares {declared}", c.from);
                }
            }
        }
    }

    // One entry per digest (descriptors merged, as buildx), one image per platform.
    let mut merged: Vec<Candidate> = Vec::new();
    for c in candidates {
        if let Some(old) = merged.iter_mut().find(|m| m.digest() == c.digest()) {
            if let Some(new) = c.descriptor["annotations"].as_object() {
                let mut target = old.descriptor["annotations"].as_object().cloned().unwrap_or_default();
                target.extend(new.clone());
                old.descriptor["annotations"] = Value::Object(target);
            }
            continue;
        }
        let platform = platform_of(&c.descriptor).and_then(|p| p.parse::<Platform>().ok());
        if !c.is_attestation()
            && platform.is_some()
            && let Some(other) = merged.iter().find(|m| {
                !m.is_attestation() && platform_of(&m.descriptor).and_then(|p| p.parse::<Platform>().ok()) == platform
            })
        {
            bail!(
                "platform {} twice: {} from {} and {} from {}; an index holds one image per platform",
                platform.map(|p| p.to_string()).unwrap_or_default(),
                other.digest(),
                other.from,
                c.digest(),
                c.from
            );
        }
        merged.push(c);
    }

    let docker = merged.iter().all(|c| c.media_type().starts_with("application/vnd.docker."));
    let media_type = if docker { oci::DOCKER_MANIFEST_LIST } else { oci::OCI_INDEX };
    if docker && (!annotations.index.is_empty() || !annotations.descriptor.is_empty()) {
        bail!(
            "--annotation: every source is a Docker schema 2 image, so the new index is a Docker manifest list, which has no annotations"
        );
    }
    for (platform, key, value) in &annotations.descriptor {
        for c in &mut merged {
            let listed = platform_of(&c.descriptor).and_then(|p| p.parse::<Platform>().ok());
            if platform.is_none() || listed.as_ref() == platform.as_ref() {
                if !c.descriptor["annotations"].is_object() {
                    c.descriptor["annotations"] = json!({});
                }
                c.descriptor["annotations"][key] = value.clone().into();
            }
        }
    }
    // A single index source without annotations keeps its exact bytes (as buildx).
    let (index, media_type) = match single_index {
        Some((bytes, m)) if args.annotations.is_empty() => (bytes, m),
        _ => {
            let descriptors: Vec<Value> = merged.iter().map(|c| c.descriptor.clone()).collect();
            (oci::index_from_json(&descriptors, annotations.index.clone(), media_type)?, media_type.to_owned())
        }
    };
    let digest = Digest::of(&index);
    if args.dry_run {
        outln!("{}", String::from_utf8_lossy(&index));
        return Ok(0);
    }
    push(&registry, &tags, &merged, &index, &media_type, &digest).await?;
    outln!("{digest}");
    Ok(0)
}

/// Copies every manifest into each tag's repository, moves each tag to the
/// index, and reads each tag back.
async fn push(
    registry: &Registry,
    tags: &[ImageRef],
    manifests: &[Candidate],
    index: &[u8],
    media_type: &str,
    digest: &Digest,
) -> anyhow::Result<()> {
    for tag in tags {
        for c in manifests.iter().filter(|c| c.repository.repository() != tag.repository()) {
            let d: Digest = c.digest().parse()?;
            registry
                .copy_by_digest(&c.repository, tag, &d, c.media_type())
                .await
                .with_context(|| format!("copying {d} from {} to {}", c.repository.name(), tag.name()))?;
        }
        registry.push_index(tag, index, media_type).await.with_context(|| format!("pushing {tag}"))?;
        let (_, now) = registry.fetch_manifest(tag).await.with_context(|| format!("reading {tag} back"))?;
        if now != digest.as_str() {
            bail!("{tag} points at {now} after the push, not the index {digest}");
        }
        errln!("{tag}: index {digest} ({} manifests)", manifests.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(raw: &[&str]) -> Vec<String> {
        raw.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn annotations_take_buildx_imagetools_levels() {
        let a = parse_annotations(&strings(&[
            "index:org.example.a=1",
            "manifest-descriptor:org.example.b=2",
            "manifest-descriptor[linux/arm64]:org.example.c=3",
        ]))
        .unwrap();
        assert_eq!(a.index.get("org.example.a").map(String::as_str), Some("1"));
        assert_eq!(a.descriptor.len(), 2);
        assert_eq!(a.descriptor[1].0, Some("linux/arm64".parse().unwrap()));
        for (raw, says) in [
            ("org.example.x=1", "takes no manifest annotations"),
            ("manifest:org.example.x=1", "takes no manifest annotations"),
            ("index-descriptor:org.example.x=1", "invalid while creating an image"),
            ("index[linux/amd64]:org.example.x=1", "names no platform"),
            ("manifest-descriptor[linux/nope/x/y]:k=v", "manifest-descriptor[linux/nope/x/y]:k=v"),
            ("index:=1", "an empty key"),
        ] {
            let e = parse_annotations(&strings(&[raw])).err().map(|e| format!("{e:#}")).unwrap_or_default();
            assert!(e.contains(says), "{raw}: {e}");
        }
    }

    #[test]
    fn descriptor_platforms_print_as_buildx() {
        let d = json!({ "platform": { "os": "linux", "architecture": "arm", "variant": "v7" } });
        assert_eq!(platform_of(&d).as_deref(), Some("linux/arm/v7"));
        assert_eq!(platform_of(&json!({})), None);
        assert_eq!(platform_json(&"linux/arm64".parse().unwrap()), json!({ "architecture": "arm64", "os": "linux" }));
    }
}
