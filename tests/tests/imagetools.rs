//! `braid imagetools inspect/create` against a real registry, and the
//! metadata file's buildx keys from real builds: images built by braid and
//! the offline base image are combined across repositories, checked
//! (platform mismatch, duplicate platform), annotated, appended to and
//! read back with skopeo; an index with a BuildKit-shaped attestation
//! manifest (made here) shows its provenance summary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use braid_shared::Digest;
use braid_shared::provenance::{self, BraidMetadata};
use braid_tests::{AgentSpec, Farm, Registry, bin, dockerfile_context, require_environment, run_with_timeout};
use serde_json::{Value, json};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `braid imagetools ARGS` with an empty Docker config (no logins).
fn imagetools(docker_config: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(bin("braid"));
    cmd.arg("imagetools").args(args).env("DOCKER_CONFIG", docker_config);
    run_with_timeout(&mut cmd, Duration::from_secs(300)).unwrap()
}

fn skopeo_raw(registry: &Registry, reference: &str) -> Option<Vec<u8>> {
    let out = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false", &format!("docker://{}/{reference}", registry.addr)])
        .output()
        .unwrap();
    out.status.success().then_some(out.stdout)
}

/// Uploads a blob (a POST for an upload session, then one PUT); its digest.
fn put_blob(registry: &Registry, repository: &str, bytes: &[u8], scratch: &Path) -> String {
    let digest = Digest::of(bytes).to_string();
    let file = scratch.join(digest.replace(':', "-"));
    std::fs::write(&file, bytes).unwrap();
    let url = format!("http://{}/v2/{repository}/blobs/uploads/", registry.addr);
    let out = Command::new("curl").args(["-sS", "-o", "/dev/null", "-D", "-", "-X", "POST", &url]).output().unwrap();
    let headers = text(&out.stdout);
    let location = headers
        .lines()
        .find_map(|l| l.strip_prefix("Location: ").or_else(|| l.strip_prefix("location: ")))
        .unwrap_or_else(|| panic!("no upload location: {headers}"))
        .trim()
        .to_owned();
    let location = if location.starts_with('/') { format!("http://{}{location}", registry.addr) } else { location };
    let separator = if location.contains('?') { '&' } else { '?' };
    let out = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT", "-H"])
        .arg("Content-Type: application/octet-stream")
        .arg("--data-binary")
        .arg(format!("@{}", file.display()))
        .arg(format!("{location}{separator}digest={digest}"))
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout), "201", "blob upload: {}", text(&out.stderr));
    digest
}

fn put_manifest(
    registry: &Registry,
    repository: &str,
    reference: &str,
    bytes: &[u8],
    media_type: &str,
    scratch: &Path,
) {
    let file = scratch.join(format!("manifest-{}", Digest::of(bytes).hex()));
    std::fs::write(&file, bytes).unwrap();
    let url = format!("http://{}/v2/{repository}/manifests/{reference}", registry.addr);
    let out = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT", "-H"])
        .arg(format!("Content-Type: {media_type}"))
        .arg("--data-binary")
        .arg(format!("@{}", file.display()))
        .arg(&url)
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout), "201", "manifest upload: {}", text(&out.stderr));
}

/// The descriptor of `platform` in an index.
fn entry<'a>(index: &'a Value, arch: &str) -> &'a Value {
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["platform"]["architecture"] == arch)
        .unwrap_or_else(|| panic!("no {arch} in {index}"))
}

fn platforms(index: &Value) -> Vec<String> {
    let mut out: Vec<String> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let p = &m["platform"];
            match p["variant"].as_str() {
                Some(v) => format!("{}/{}/{v}", p["os"].as_str().unwrap(), p["architecture"].as_str().unwrap()),
                None => format!("{}/{}", p["os"].as_str().unwrap(), p["architecture"].as_str().unwrap()),
            }
        })
        .collect();
    out.sort();
    out
}

/// An attestation manifest as BuildKit writes one: an in-toto SLSA v0.2
/// statement about `subject` carrying braid's metadata; its descriptor.
fn push_attestation(
    registry: &Registry,
    repository: &str,
    subject: &str,
    meta: &BraidMetadata,
    scratch: &Path,
) -> Value {
    let statement = json!({
        "_type": provenance::STATEMENT_TYPE,
        "predicateType": provenance::SLSA_V02,
        "subject": [{ "name": "pkg:docker/app", "digest": { "sha256": subject.trim_start_matches("sha256:") } }],
        "predicate": { "builder": { "id": "" }, "metadata": { provenance::METADATA_KEY: meta } },
    });
    let layer = serde_json::to_vec(&statement).unwrap();
    let layer_digest = put_blob(registry, repository, &layer, scratch);
    let config = serde_json::to_vec(&json!({
        "architecture": "unknown", "os": "unknown", "config": {},
        "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
    }))
    .unwrap();
    let config_digest = put_blob(registry, repository, &config, scratch);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len() },
        "layers": [{
            "mediaType": provenance::IN_TOTO_MEDIA_TYPE, "digest": layer_digest, "size": layer.len(),
            "annotations": { provenance::PREDICATE_TYPE_ANNOTATION: provenance::SLSA_V02 },
        }],
    }))
    .unwrap();
    let digest = Digest::of(&manifest).to_string();
    put_manifest(registry, repository, &digest, &manifest, "application/vnd.oci.image.manifest.v1+json", scratch);
    json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": digest,
        "size": manifest.len(),
        "platform": { "architecture": "unknown", "os": "unknown" },
        "annotations": {
            provenance::REFERENCE_DIGEST_ANNOTATION: subject,
            provenance::REFERENCE_TYPE_ANNOTATION: provenance::REFERENCE_TYPE_ATTESTATION,
        },
    })
}

#[test]
fn imagetools_combines_checks_and_inspects_images() {
    require_environment();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let scratch = dir.join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let docker_config = dir.join("docker-config");
    std::fs::create_dir_all(&docker_config).unwrap();
    let registry = Registry::start(&dir.join("registry")).unwrap();
    let base = registry.push_base_image("base/busybox:latest").unwrap();
    let reg = registry.addr.clone();
    let base_index = registry.manifest("base/busybox:latest").unwrap();
    let base_amd64 = entry(&base_index, "amd64")["digest"].as_str().unwrap().to_owned();
    let base_arm64 = entry(&base_index, "arm64")["digest"].as_str().unwrap().to_owned();
    let base_arm = entry(&base_index, "arm")["digest"].as_str().unwrap().to_owned();

    // A one-platform build by braid, with the metadata file's buildx keys.
    let farm = Farm::start(dir, &registry, &[AgentSpec::new("amd64", &[])]).unwrap();
    farm.wait_for_agents(1).unwrap();
    let ctx = dockerfile_context(dir, "ctx", &format!("FROM {base}\nRUN echo built > /built\n"));
    let meta = dir.join("meta.json");
    let built = format!("{reg}/built/one:1");
    let out = farm
        .braid(&[
            "build",
            "--platform",
            "linux/amd64",
            "-t",
            &built,
            "--push",
            "--metadata-file",
            meta.to_str().unwrap(),
            &ctx,
        ])
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let metadata: Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    let built_index = registry.manifest("built/one:1").unwrap();
    let built_amd64 = entry(&built_index, "amd64")["digest"].as_str().unwrap().to_owned();
    let built_manifest = registry.manifest(&format!("built/one@{built_amd64}")).unwrap();
    assert_eq!(metadata["containerimage.config.digest"], built_manifest["config"]["digest"], "{metadata}");
    let build_id = metadata["braid.build.id"].as_str().unwrap();
    let coordinator = farm.url.trim_start_matches("http://");
    assert_eq!(metadata["buildx.build.ref"], format!("{coordinator}/{build_id}"));
    assert_eq!(metadata["braid.platforms"]["linux/amd64"]["digest"], built_amd64.as_str());

    // The same key for an exported image (--output type=oci): the layout's config.
    let meta_oci = dir.join("meta-oci.json");
    let layout_tar = dir.join("out.tar");
    let out = farm
        .braid(&[
            "build",
            "--platform",
            "linux/amd64",
            "--output",
            &format!("type=oci,dest={}", layout_tar.display()),
            "--metadata-file",
            meta_oci.to_str().unwrap(),
            &ctx,
        ])
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let layout = dir.join("layout");
    std::fs::create_dir_all(&layout).unwrap();
    assert!(Command::new("tar").arg("-xf").arg(&layout_tar).arg("-C").arg(&layout).status().unwrap().success());
    let blob = |digest: &str| -> Value {
        let path = layout.join("blobs/sha256").join(digest.trim_start_matches("sha256:"));
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    };
    let layout_index: Value = serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let mut root = blob(layout_index["manifests"][0]["digest"].as_str().unwrap());
    if root.get("manifests").is_some() {
        root = blob(root["manifests"][0]["digest"].as_str().unwrap());
    }
    let exported: Value = serde_json::from_slice(&std::fs::read(&meta_oci).unwrap()).unwrap();
    assert_eq!(exported["containerimage.config.digest"], root["config"]["digest"], "{exported}");

    // create: braid's amd64 image and the base's arm64 one, in a new repository.
    let combined = format!("{reg}/combined/app:1");
    let arm64_source = format!("{reg}/base/busybox@{base_arm64}");
    let out = imagetools(
        &docker_config,
        &[
            "create",
            "-t",
            &combined,
            "--annotation",
            "index:org.example.team=braid",
            "--annotation",
            "manifest-descriptor[linux/arm64]:org.example.note=arm",
            &built,
            &arm64_source,
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let raw = skopeo_raw(&registry, "combined/app:1").expect("the new tag exists");
    assert_eq!(text(&out.stdout).trim(), Digest::of(&raw).to_string(), "stdout is the index digest");
    let index: Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(index["mediaType"], "application/vnd.oci.image.index.v1+json");
    // braid's build pushed provenance (buildx's default): its attestation
    // manifest comes along with the image it is about.
    assert_eq!(platforms(&index), ["linux/amd64", "linux/arm64", "unknown/unknown"]);
    let attestation = index["manifests"].as_array().unwrap().iter().find(|m| m["platform"]["os"] == "unknown").unwrap();
    assert_eq!(attestation["annotations"]["vnd.docker.reference.digest"], built_amd64.as_str());
    assert_eq!(entry(&index, "amd64")["digest"], built_amd64.as_str());
    assert_eq!(entry(&index, "arm64")["digest"], base_arm64.as_str());
    assert_eq!(index["annotations"]["org.example.team"], "braid");
    assert_eq!(entry(&index, "arm64")["annotations"]["org.example.note"], "arm");
    assert!(entry(&index, "amd64")["annotations"]["org.example.note"].is_null());
    for digest in [&built_amd64, &base_arm64] {
        assert!(skopeo_raw(&registry, &format!("combined/app@{digest}")).is_some(), "{digest} copied");
    }

    // --dry-run prints the index and pushes nothing.
    let out =
        imagetools(&docker_config, &["create", "--dry-run", "-t", &format!("{reg}/dry/app:1"), &built, &arm64_source]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(platforms(&printed), ["linux/amd64", "linux/arm64", "unknown/unknown"]);
    assert!(skopeo_raw(&registry, "dry/app:1").is_none(), "--dry-run pushed");
    assert!(skopeo_raw(&registry, &format!("dry/app@{base_arm64}")).is_none(), "--dry-run copied");

    // --append adds the tag's manifests to the sources.
    let arm_source = format!("{reg}/base/busybox@{base_arm}");
    let out = imagetools(&docker_config, &["create", "--append", "-t", &combined, &arm_source]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let appended = registry.manifest("combined/app:1").unwrap();
    assert_eq!(platforms(&appended), ["linux/amd64", "linux/arm/v7", "linux/arm64", "unknown/unknown"]);
    assert_eq!(entry(&appended, "arm64")["annotations"]["org.example.note"], "arm", "kept from the old index");

    // --append to a tag that does not exist yet appends nothing.
    let out = imagetools(&docker_config, &["create", "--append", "-t", &format!("{reg}/fresh/app:1"), &arm_source]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("nothing to append"), "{}", text(&out.stderr));
    assert_eq!(platforms(&registry.manifest("fresh/app:1").unwrap()), ["linux/arm/v7"]);

    // A descriptor whose platform contradicts the image's config is refused, naming it.
    let liar = dir.join("liar.json");
    let amd64_manifest = skopeo_raw(&registry, &format!("base/busybox@{base_amd64}")).unwrap();
    std::fs::write(
        &liar,
        serde_json::to_vec(&json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": base_amd64,
            "size": amd64_manifest.len(),
            "platform": { "os": "linux", "architecture": "arm64" },
        }))
        .unwrap(),
    )
    .unwrap();
    let out = imagetools(
        &docker_config,
        &["create", "-t", &format!("{reg}/base/busybox:liar"), "-f", liar.to_str().unwrap()],
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("--file {}", liar.display()))
            && err
                .contains(&format!("image {base_amd64} is listed as linux/arm64 but its config declares linux/amd64")),
        "{err}"
    );
    assert!(skopeo_raw(&registry, "base/busybox:liar").is_none());

    // Two images for one platform are refused, naming both sources.
    let amd64_source = format!("{reg}/base/busybox@{base_amd64}");
    let out = imagetools(&docker_config, &["create", "-t", &format!("{reg}/dup/app:1"), &built, &amd64_source]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("platform linux/amd64 twice") && err.contains(&built) && err.contains(&amd64_source), "{err}");
    assert!(skopeo_raw(&registry, "dup/app:1").is_none());

    // Manifest-level and bare annotations are refused before anything is read.
    let out = imagetools(&docker_config, &["create", "-t", &combined, "--annotation", "org.example.x=1", &built]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("--annotation \"org.example.x=1\": imagetools create does not rewrite images"));

    // An index with a provenance attestation for amd64, as BuildKit shapes it.
    let meta = BraidMetadata {
        coordinator: "farm.example:7700".into(),
        build_id: "b-123".into(),
        job_id: "j-1".into(),
        agent: "pi-01".into(),
        agent_identity: "pi-01 #7".into(),
        builder_name: "buildah".into(),
        builder_version: "1.28.2".into(),
        native: true,
    };
    let attestation = push_attestation(&registry, "base/busybox", &base_amd64, &meta, &scratch);
    let attestation_digest = attestation["digest"].as_str().unwrap().to_owned();
    let mut attested = base_index.clone();
    attested["manifests"].as_array_mut().unwrap().push(attestation);
    let attested_bytes = serde_json::to_vec(&attested).unwrap();
    put_manifest(
        &registry,
        "base/busybox",
        "attested",
        &attested_bytes,
        "application/vnd.oci.image.index.v1+json",
        &scratch,
    );
    let attested_ref = format!("{reg}/base/busybox:attested");

    // inspect --raw: the registry's bytes.
    let out = imagetools(&docker_config, &["inspect", "--raw", &attested_ref]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(out.stdout, skopeo_raw(&registry, "base/busybox:attested").unwrap());

    // inspect: each platform's digest, size and config platform; the provenance summary.
    let out = imagetools(&docker_config, &["inspect", &attested_ref]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(
        shown.starts_with(&format!(
            "Name:      {attested_ref}\nMediaType: application/vnd.oci.image.index.v1+json\nDigest:    {}\n",
            Digest::of(&attested_bytes)
        )),
        "{shown}"
    );
    assert!(shown.contains("\nManifests:\n"), "{shown}");
    for m in base_index["manifests"].as_array().unwrap() {
        let digest = m["digest"].as_str().unwrap();
        let block = shown
            .split("\n\n")
            .find(|b| b.contains(&format!("@{digest}\n")))
            .unwrap_or_else(|| panic!("{digest}: {shown}"));
        let p = &m["platform"];
        let platform = match p["variant"].as_str() {
            Some(v) => format!("linux/{}/{v}", p["architecture"].as_str().unwrap()),
            None => format!("linux/{}", p["architecture"].as_str().unwrap()),
        };
        assert!(block.contains(&format!("  Size:           {}\n", m["size"])), "{block}");
        // The config's normalized platform (arm64's v8 variant is implied).
        let config_platform = platform.trim_end_matches("/v8");
        assert!(block.contains(&format!("  ConfigPlatform: {config_platform}")), "{block}");
        assert!(block.contains(&format!("  Platform:       {platform}\n")), "{block}");
        let has_provenance = block.contains("  Provenance:     agent pi-01, buildah 1.28.2, native, build b-123");
        assert_eq!(has_provenance, digest == base_amd64, "{block}");
    }
    let attestation_block = shown.split("\n\n").find(|b| b.contains(&format!("@{attestation_digest}\n"))).unwrap();
    assert!(attestation_block.contains("  Platform:       unknown/unknown\n"), "{attestation_block}");
    assert!(
        attestation_block.contains("    vnd.docker.reference.type:   attestation-manifest\n"),
        "{attestation_block}"
    );
    assert!(
        attestation_block.contains(&format!("    vnd.docker.reference.digest: {base_amd64}\n")),
        "{attestation_block}"
    );

    // A single image: its size and config under the header.
    let out = imagetools(&docker_config, &["inspect", &format!("{reg}/base/busybox@{base_arm}")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(shown.contains(&format!("\nDigest:         {base_arm}\n")), "{shown}");
    assert!(shown.contains("\nConfigPlatform: linux/arm/v7\n") && !shown.contains("Manifests:"), "{shown}");

    // --raw and --format json together are refused.
    let out = imagetools(&docker_config, &["inspect", "--raw", "--format", "json", &attested_ref]);
    assert!(!out.status.success() && text(&out.stderr).contains("--raw"), "{}", text(&out.stderr));

    // inspect --format json: the same, as one object.
    let out = imagetools(&docker_config, &["inspect", "--format", "json", &attested_ref]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["digest"], Digest::of(&attested_bytes).to_string());
    assert_eq!(v["size"], attested_bytes.len());
    let manifests = v["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 4);
    let amd64 = manifests.iter().find(|m| m["digest"] == base_amd64.as_str()).unwrap();
    assert_eq!(amd64["configPlatform"], "linux/amd64");
    assert_eq!(amd64["size"], entry(&base_index, "amd64")["size"]);
    assert_eq!(amd64["provenance"]["agent"], "pi-01");
    assert_eq!(amd64["provenance"]["builderVersion"], "1.28.2");
    assert_eq!(amd64["provenance"]["native"], true);
    assert_eq!(amd64["provenance"]["predicateType"], provenance::SLSA_V02);
    let att = manifests.iter().find(|m| m["digest"] == attestation_digest.as_str()).unwrap();
    assert_eq!(
        (att["platform"].as_str(), att["attestationFor"].as_str()),
        (Some("unknown/unknown"), Some(base_amd64.as_str()))
    );
    let arm = manifests.iter().find(|m| m["digest"] == base_arm.as_str()).unwrap();
    assert_eq!((arm["configPlatform"].as_str(), arm["provenance"].is_null()), (Some("linux/arm/v7"), true));

    // An index source brings its attestation manifests along to the new repository.
    let out = imagetools(
        &docker_config,
        &["create", "-t", &format!("{reg}/copied/app:1"), "--annotation", "index:org.example.copy=yes", &attested_ref],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let copied = registry.manifest("copied/app:1").unwrap();
    assert_eq!(copied["manifests"].as_array().unwrap().len(), 4);
    assert!(skopeo_raw(&registry, &format!("copied/app@{attestation_digest}")).is_some(), "attestation copied");
    let out = imagetools(&docker_config, &["inspect", "--format", "json", &format!("{reg}/copied/app:1")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let amd64 = v["manifests"].as_array().unwrap().iter().find(|m| m["digest"] == base_amd64.as_str()).unwrap();
    assert_eq!(amd64["provenance"]["agent"], "pi-01", "the copy keeps its provenance");
}
