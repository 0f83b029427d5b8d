//! The result cache: a platform's image from an earlier build, reused when
//! a build asks for exactly the same thing again (a no-op rebuild), without
//! asking an agent.
//!
//! A platform's result is keyed by every spec field that can change the
//! image (the context digest, the Dockerfile path or inline bytes, build
//! args, target, labels, the manifest annotations of that platform,
//! network, hosts, ulimits, shm size, named contexts, syntax, index format
//! and any field added later: the spec is hashed whole, less the fields
//! listed in `strip` that cannot change the image), and the platform. The
//! entry also keeps the base images the agent resolved (reference and
//! digest, from its provenance report); a hit is used only when every base
//! still resolves to the same digest at its registry and the earlier image
//! is still in every repository the new build pushes to. Anything the
//! farm cannot prove identical bypasses the cache: see `bypass`.

use std::collections::BTreeMap;

use prost::Message;

use braid_shared::oci::Registry;
use braid_shared::{Digest, ImageRef, Platform, proto};

use crate::model::{Image, JobProvenance};

/// What a stored entry holds: the build that made the image, the image and
/// its provenance (with the base images' digests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub build_id: String,
    pub platform: String,
    pub image: Image,
    pub provenance: JobProvenance,
}

/// Why a build cannot reuse results (and does not store any), or None.
pub fn bypass(spec: &proto::BuildSpec) -> Option<&'static str> {
    if spec.no_cache {
        return Some("--no-cache");
    }
    if spec.pull {
        return Some("--pull");
    }
    if !spec.push {
        return Some("the image is not pushed");
    }
    if spec.export {
        return Some("an --output export");
    }
    if !spec.secrets.is_empty() {
        return Some("--secret");
    }
    if !spec.ssh_ids.is_empty() {
        return Some("--ssh");
    }
    if !spec.cache_to.is_empty() {
        return Some("--cache-to");
    }
    if !spec.no_cache_filter.is_empty() {
        return Some("--no-cache-filter");
    }
    if spec.provenance_mode.is_empty() {
        // The agent reports the base images it used only with provenance.
        return Some("no provenance (the base images are not known)");
    }
    // A local directory is uploaded and named by its digest
    // (context://sha256:...); an image, URL or git reference may have
    // changed since.
    if spec.build_contexts.iter().any(|c| c.value.contains("://") && !c.value.starts_with("context://")) {
        return Some("a remote --build-context");
    }
    None
}

/// The key of `platform`'s result for `spec`.
pub fn key(spec: &proto::BuildSpec, platform: &Platform) -> String {
    let mut s = spec.clone();
    // Fields that cannot change one platform's image.
    s.platforms.clear();
    s.tags.clear();
    s.timeout_seconds = 0;
    s.allow_emulation = false;
    s.cache_from.clear();
    s.needs.clear();
    s.provenance_mode.clear();
    s.provenance_version.clear();
    s.push = false;
    // Maps are hashed sorted (prost's encoding follows a HashMap's order).
    let args: BTreeMap<String, String> = std::mem::take(&mut s.build_args).into_iter().collect();
    let labels: BTreeMap<String, String> = std::mem::take(&mut s.labels).into_iter().collect();
    // Only the manifest's own annotations, of this platform, are in the image.
    let wanted = platform.to_string();
    let mut annotations: Vec<(String, String)> = std::mem::take(&mut s.annotations)
        .into_iter()
        .filter(|a| a.level == "manifest" && (a.platform.is_empty() || a.platform == wanted))
        .map(|a| (a.key, a.value))
        .collect();
    annotations.sort();
    annotations.dedup();
    let mut contexts: Vec<(String, String)> =
        std::mem::take(&mut s.build_contexts).into_iter().map(|c| (c.name, c.value)).collect();
    contexts.sort();
    let mut bytes = b"braid-result-v1\0".to_vec();
    let mut field = |tag: &str, v: &str| {
        bytes.extend_from_slice(tag.as_bytes());
        bytes.extend_from_slice(&(v.len() as u64).to_le_bytes());
        bytes.extend_from_slice(v.as_bytes());
    };
    field("platform", &wanted);
    for (k, v) in &args {
        field("arg", k);
        field("=", v);
    }
    for (k, v) in &labels {
        field("label", k);
        field("=", v);
    }
    for (k, v) in &annotations {
        field("annotation", k);
        field("=", v);
    }
    for (k, v) in &contexts {
        field("context", k);
        field("=", v);
    }
    bytes.extend_from_slice(b"spec\0");
    bytes.extend_from_slice(&s.encode_to_vec());
    Digest::of(&bytes).to_string()
}

/// What a registry says of a reference's manifest: the digest of its bytes
/// (as the agent computed it for its provenance report).
async fn resolve(registry: &Registry, reference: &str) -> Result<String, String> {
    let r: ImageRef = reference.parse().map_err(|e| format!("{reference}: {e}"))?;
    if let Some(d) = r.digest() {
        return Ok(d.to_string());
    }
    let (bytes, _) = registry.fetch_manifest(&r.with_default_tag()).await.map_err(|e| e.to_string())?;
    Ok(Digest::of(&bytes).to_string())
}

/// Whether `entry` still holds: every base image resolves to the digest
/// the earlier build used, and its image is in each of `repositories`.
/// Returns why not.
pub async fn still_valid(registry: &Registry, entry: &Entry, repositories: &[ImageRef]) -> Result<(), String> {
    for (reference, digest) in &entry.provenance.base_images {
        if digest.is_empty() {
            return Err(format!("base image {reference} was not resolved"));
        }
        let now = resolve(registry, reference).await?;
        if &now != digest {
            return Err(format!("base image {reference} changed ({digest} -> {now})"));
        }
    }
    for repository in repositories {
        let at = repository.at_digest(&entry.image.digest);
        registry
            .fetch_manifest(&at)
            .await
            .map_err(|e| format!("{} is no longer in {}: {e}", entry.image.digest, repository.name()))?;
    }
    Ok(())
}

/// How long the registry checks of one submission may take before the
/// build is given to agents as usual.
const CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Keys a new build's jobs and answers those whose earlier result still
/// holds (see `NewBuild::reuse`); a build that bypasses the cache is left
/// as it is. A failed lookup or check only means the agents build it.
pub async fn lookup(
    store: &std::sync::Arc<crate::stores::Store>,
    make_registry: impl Fn() -> Registry,
    new: &mut crate::farm::NewBuild,
) {
    if let Some(why) = bypass(new.spec()) {
        tracing::debug!(why, "result cache bypassed");
        return;
    }
    let keys: std::collections::HashMap<String, String> =
        new.jobs().into_iter().map(|(job_id, platform)| (job_id, key(new.spec(), &platform))).collect();
    new.set_result_keys(keys.clone());
    let repositories = new.push_repositories();
    // Made when the first entry needs checking (see Submit).
    let mut registry: Option<Registry> = None;
    for (job_id, key) in keys {
        let store = store.clone();
        let lookup_key = key.clone();
        let found = crate::blocking::run(move || store.result_get(&lookup_key)).await;
        let entry = match found {
            Ok(Some(entry)) => entry,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "result cache lookup failed");
                continue;
            }
        };
        let registry = registry.get_or_insert_with(&make_registry);
        match tokio::time::timeout(CHECK_TIMEOUT, still_valid(registry, &entry, &repositories)).await {
            Ok(Ok(())) => new.reuse(&job_id, entry),
            Ok(Err(why)) => tracing::info!(job_id, from = entry.build_id, why, "earlier result not reused"),
            Err(_) => tracing::info!(job_id, from = entry.build_id, "earlier result not reused: the registry is slow"),
        }
    }
}

/// Stores a succeeded build's results (see `Farm::result_entries`).
pub async fn store_results(store: &std::sync::Arc<crate::stores::Store>, entries: Vec<Entry>, now_ms: i64) {
    if entries.is_empty() {
        return;
    }
    let store = store.clone();
    if let Err(e) = crate::blocking::run(move || store.result_put(&entries, now_ms)).await {
        tracing::warn!(error = %e, "storing results for the result cache failed");
    }
}

/// Whether a built job's result may be stored: its provenance names every
/// base image with a digest.
pub fn storable(provenance: Option<&JobProvenance>) -> bool {
    provenance.is_some_and(|p| p.base_images.iter().all(|(_, d)| !d.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    type Change = Box<dyn Fn(&mut proto::BuildSpec)>;

    fn spec() -> proto::BuildSpec {
        proto::BuildSpec {
            platforms: vec!["linux/amd64".into(), "linux/arm64".into()],
            tags: vec!["127.0.0.1:5000/app:1".into()],
            context_digest: format!("sha256:{}", "a".repeat(64)),
            dockerfile_path: "Dockerfile".into(),
            build_args: [("A".to_owned(), "1".to_owned()), ("B".to_owned(), "2".to_owned())].into(),
            labels: [("l1".to_owned(), "x".to_owned()), ("l2".to_owned(), "y".to_owned())].into(),
            push: true,
            provenance_mode: "min".into(),
            ..Default::default()
        }
    }

    fn amd() -> Platform {
        "linux/amd64".parse().unwrap()
    }

    #[test]
    fn every_field_that_changes_the_image_changes_the_key() {
        let base = key(&spec(), &amd());
        let changes: Vec<(&str, Change)> = vec![
            ("context", Box::new(|s| s.context_digest = format!("sha256:{}", "b".repeat(64)))),
            ("dockerfile path", Box::new(|s| s.dockerfile_path = "other/Dockerfile".into())),
            ("inline dockerfile", Box::new(|s| s.dockerfile_inline = b"FROM x".to_vec())),
            ("build arg value", Box::new(|s| _ = s.build_args.insert("A".into(), "9".into()))),
            ("build arg added", Box::new(|s| _ = s.build_args.insert("C".into(), "1".into()))),
            ("target", Box::new(|s| s.target = "final".into())),
            ("label", Box::new(|s| _ = s.labels.insert("l1".into(), "z".into()))),
            ("network", Box::new(|s| s.network = "host".into())),
            ("shm size", Box::new(|s| s.shm_size_bytes = 1 << 20)),
            ("syntax", Box::new(|s| s.syntax_directive = "docker/dockerfile:1".into())),
            ("format", Box::new(|s| s.format = "docker".into())),
            (
                "add host",
                Box::new(|s| s.add_hosts.push(proto::HostMapping { host: "h".into(), ip: "10.0.0.1".into() })),
            ),
            (
                "named context",
                Box::new(|s| {
                    s.build_contexts.push(proto::NamedContext { name: "n".into(), value: "context://sha256:1".into() })
                }),
            ),
            (
                "manifest annotation",
                Box::new(|s| {
                    s.annotations.push(proto::Annotation {
                        level: "manifest".into(),
                        platform: String::new(),
                        key: "k".into(),
                        value: "v".into(),
                    })
                }),
            ),
        ];
        for (what, change) in changes {
            let mut s = spec();
            change(&mut s);
            assert_ne!(key(&s, &amd()), base, "{what} must change the key");
        }
        assert_ne!(key(&spec(), &"linux/arm64".parse().unwrap()), base, "the platform changes the key");
    }

    #[test]
    fn fields_that_cannot_change_the_image_leave_the_key() {
        let base = key(&spec(), &amd());
        let mut s = spec();
        s.tags = vec!["127.0.0.1:5000/other:2".into()];
        s.platforms = vec!["linux/amd64".into()];
        s.timeout_seconds = 60;
        s.allow_emulation = true;
        s.cache_from.push(proto::CacheOption::default());
        s.annotations.push(proto::Annotation {
            level: "index".into(),
            platform: String::new(),
            key: "k".into(),
            value: "v".into(),
        });
        s.annotations.push(proto::Annotation {
            level: "manifest".into(),
            platform: "linux/arm64".into(),
            key: "k".into(),
            value: "v".into(),
        });
        assert_eq!(key(&s, &amd()), base);
    }

    #[test]
    fn maps_are_order_insensitive() {
        let a = spec();
        let mut b = spec();
        b.build_args = [("B".to_owned(), "2".to_owned()), ("A".to_owned(), "1".to_owned())].into_iter().collect();
        b.labels = [("l2".to_owned(), "y".to_owned()), ("l1".to_owned(), "x".to_owned())].into_iter().collect();
        for _ in 0..8 {
            assert_eq!(key(&a, &amd()), key(&b, &amd()));
        }
        // A value moved to another key is another build.
        let mut c = spec();
        c.build_args = [("A".to_owned(), "2".to_owned()), ("B".to_owned(), "1".to_owned())].into();
        assert_ne!(key(&a, &amd()), key(&c, &amd()));
    }

    #[test]
    fn what_cannot_be_proven_identical_bypasses() {
        assert_eq!(bypass(&spec()), None);
        let cases: Vec<(&str, Change)> = vec![
            ("--no-cache", Box::new(|s| s.no_cache = true)),
            ("--pull", Box::new(|s| s.pull = true)),
            ("not pushed", Box::new(|s| s.push = false)),
            ("export", Box::new(|s| s.export = true)),
            ("--secret", Box::new(|s| s.secrets.push(proto::SecretRef::default()))),
            ("--ssh", Box::new(|s| s.ssh_ids.push("default".into()))),
            ("--cache-to", Box::new(|s| s.cache_to.push(proto::CacheOption::default()))),
            ("--no-cache-filter", Box::new(|s| s.no_cache_filter.push("a".into()))),
            ("no provenance", Box::new(|s| s.provenance_mode.clear())),
            (
                "remote context",
                Box::new(|s| {
                    s.build_contexts
                        .push(proto::NamedContext { name: "b".into(), value: "docker-image://alpine".into() })
                }),
            ),
        ];
        for (what, change) in cases {
            let mut s = spec();
            change(&mut s);
            assert!(bypass(&s).is_some(), "{what} must bypass the cache");
        }
    }

    #[test]
    fn only_fully_resolved_provenance_is_stored() {
        let mut p = JobProvenance { base_images: vec![("a".into(), "sha256:1".into())], ..Default::default() };
        assert!(storable(Some(&p)));
        p.base_images.push(("b".into(), String::new()));
        assert!(!storable(Some(&p)));
        assert!(!storable(None));
    }

    #[test]
    fn entries_round_trip_through_the_store_and_a_later_build_replaces_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(crate::stores::Store::open(&dir.path().join("db.sqlite")).unwrap());
        let image = Image {
            digest: format!("sha256:{}", "c".repeat(64)).parse().unwrap(),
            size: 10,
            media_type: braid_shared::oci::OCI_MANIFEST.into(),
            config_digest: None,
        };
        let provenance = JobProvenance { base_images: vec![("b:1".into(), "sha256:1".into())], ..Default::default() };
        let entry = Entry { key: "k".into(), build_id: "b1".into(), platform: "linux/amd64".into(), image, provenance };
        assert_eq!(store.result_get("k").unwrap(), None);
        store.result_put(std::slice::from_ref(&entry), 1).unwrap();
        assert_eq!(store.result_get("k").unwrap(), Some(entry.clone()));
        let later = Entry { build_id: "b2".into(), ..entry };
        store.result_put(std::slice::from_ref(&later), 2).unwrap();
        assert_eq!(store.result_get("k").unwrap(), Some(later));
    }
}
