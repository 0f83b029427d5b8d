//! Outputs without a registry and for old registries: `--output type=oci`
//! (an OCI archive or directory checked with skopeo), `--load` into a real
//! Docker Engine and into podman, and `--format docker`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use braid_tests::{AgentSpec, DockerEngine, Farm, Registry, dockerfile_context, require_environment, run_with_timeout};

const THREE: &str = "linux/amd64,linux/arm64,linux/arm/v7";

fn dockerfile(base: &str) -> String {
    format!("FROM {base}\nARG TARGETARCH\nRUN uname -m > /arch && echo \"$TARGETARCH\" > /targetarch\n")
}

fn three_agents() -> [AgentSpec; 3] {
    [
        AgentSpec::new("out-amd64", &[]),
        AgentSpec::new("out-arm64", &["linux/arm64"]),
        AgentSpec::new("out-armv7", &["linux/arm/v7"]),
    ]
}

/// A registry with the base image, a farm of `agents` and the context of
/// `dockerfile`: what every test here starts from.
fn farm_of(dir: &Path, agents: &[AgentSpec]) -> (Registry, Farm, String) {
    require_environment();
    let registry = Registry::start(&dir.join("registry")).unwrap();
    let base = registry.push_base_image("base/busybox:latest").unwrap();
    let farm = Farm::start(dir, &registry, agents).unwrap();
    farm.wait_for_agents(agents.len()).unwrap();
    let ctx = dockerfile_context(dir, "ctx", &dockerfile(&base));
    (registry, farm, ctx)
}

fn skopeo(args: &[&str]) -> std::process::Output {
    let out = run_with_timeout(Command::new("skopeo").args(args), std::time::Duration::from_secs(180)).unwrap();
    assert!(out.status.success(), "skopeo {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// "arch[/variant] uname targetarch" for each image an index lists.
fn platforms_in(registry: &Registry, repository: &str, index: &serde_json::Value, scratch: &Path) -> Vec<String> {
    registry.per_platform(repository, index, &["arch", "targetarch"], scratch).unwrap()
}

#[test]
fn oci_archive_and_directory_outputs_hold_every_platform() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (registry, farm, ctx) = farm_of(dir, &three_agents());
    let archive = dir.join("app.tar");
    let tag = format!("{}/oci/app:1", registry.addr);
    let dest = format!("type=oci,dest={}", archive.display());
    let out = farm.braid(&["build", "--platform", THREE, "-t", &tag, "--output", &dest, &ctx]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(registry.manifest("oci/app:1").is_none(), "an oci output pushes nothing");
    let uploaded = farm.metric("braid_blob_bytes_received_total");
    assert!(uploaded > 0.0);
    assert!(farm.metric("braid_blob_store_bytes") >= uploaded, "the store holds what was uploaded, and the index");

    let raw = skopeo(&["inspect", "--raw", &format!("oci-archive:{}", archive.display())]);
    let index: serde_json::Value = serde_json::from_slice(&raw.stdout).unwrap();
    assert_eq!(index["mediaType"], "application/vnd.oci.image.index.v1+json");
    assert_eq!(index["manifests"].as_array().unwrap().len(), 3, "{index}");
    assert!(index["annotations"]["org.opencontainers.image.created"].is_string(), "{index}");

    let copied = format!("docker://{}/copied/app:1", registry.addr);
    skopeo(&["copy", "--all", "--dest-tls-verify=false", &format!("oci-archive:{}", archive.display()), &copied]);
    let pushed = registry.manifest("copied/app:1").unwrap();
    assert_eq!(pushed["manifests"], index["manifests"], "skopeo copied the index as it was");
    assert_eq!(
        platforms_in(&registry, "copied/app", &pushed, &dir.join("scratch")),
        ["amd64 x86_64 amd64", "arm/v7 armv7l arm", "arm64 aarch64 arm64"]
    );

    // The same build again, as a directory: the layers are cached and the
    // coordinator holds their blobs, so nothing new is uploaded.
    let layout = dir.join("layout");
    let dest = format!("type=oci,dest={},tar=false", layout.display());
    let out = farm.braid(&["build", "--platform", THREE, "--output", &dest, &ctx]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(layout.join("oci-layout").is_file() && layout.join("index.json").is_file());
    let raw = skopeo(&["inspect", "--raw", &format!("oci:{}", layout.display())]);
    let again: serde_json::Value = serde_json::from_slice(&raw.stdout).unwrap();
    assert_eq!(again["manifests"], index["manifests"], "the same images");
    assert_eq!(farm.metric("braid_blob_bytes_received_total"), uploaded, "blobs are kept once");

    // To standard output, with the summary on standard error.
    let out = farm.braid(&["build", "--platform", THREE, "--output", "type=oci,dest=-", &ctx]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("index sha256:"));
    let piped = dir.join("piped.tar");
    std::fs::write(&piped, &out.stdout).unwrap();
    let raw = skopeo(&["inspect", "--raw", &format!("oci-archive:{}", piped.display())]);
    let piped: serde_json::Value = serde_json::from_slice(&raw.stdout).unwrap();
    assert_eq!(piped["manifests"], index["manifests"]);

    let out = farm.braid(&["build", "--platform", THREE, "--output", &dest, "--detach", &ctx]).unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot write a local output"));
}

#[test]
fn docker_format_pushes_a_manifest_list_of_schema2_manifests() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (registry, farm, ctx) = farm_of(dir, &three_agents());
    let tag = format!("{}/docker/app:1", registry.addr);
    let out = farm.braid(&["build", "--platform", THREE, "-t", &tag, "--push", "--format", "docker", &ctx]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let list = registry.manifest("docker/app:1").unwrap();
    assert_eq!(list["mediaType"], "application/vnd.docker.distribution.manifest.list.v2+json");
    assert!(list.get("annotations").is_none(), "{list}");
    for m in list["manifests"].as_array().unwrap() {
        assert_eq!(m["mediaType"], "application/vnd.docker.distribution.manifest.v2+json");
        let manifest = registry.manifest(&format!("docker/app@{}", m["digest"].as_str().unwrap())).unwrap();
        assert_eq!(manifest["config"]["mediaType"], "application/vnd.docker.container.image.v1+json");
        for layer in manifest["layers"].as_array().unwrap() {
            assert_eq!(layer["mediaType"], "application/vnd.docker.image.rootfs.diff.tar.gzip");
        }
    }
    assert_eq!(
        platforms_in(&registry, "docker/app", &list, &dir.join("scratch")),
        ["amd64 x86_64 amd64", "arm/v7 armv7l arm", "arm64 aarch64 arm64"]
    );

    // The same images as an OCI layout holding a Docker manifest list.
    let archive = dir.join("docker-format.tar");
    let dest = format!("type=oci,dest={}", archive.display());
    let out = farm.braid(&["build", "--platform", THREE, "--format", "docker", "--output", &dest, &ctx]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let raw = skopeo(&["inspect", "--raw", &format!("oci-archive:{}", archive.display())]);
    let local: serde_json::Value = serde_json::from_slice(&raw.stdout).unwrap();
    assert_eq!(local, list, "the same manifest list as pushed");
    let copied = format!("docker://{}/docker/copied:1", registry.addr);
    skopeo(&["copy", "--all", "--dest-tls-verify=false", &format!("oci-archive:{}", archive.display()), &copied]);
    assert_eq!(registry.manifest("docker/copied:1").unwrap(), list);

    // buildx's other spelling: the names and the push in the output.
    let named = format!("type=image,\"name={0}/named/app:1,{0}/named/app:2\",push=true", registry.addr);
    let out = farm.braid(&["build", "--platform", "linux/amd64", "--output", &named, &ctx]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(registry.digest_of("named/app:1"), registry.digest_of("named/app:2"));
    assert!(registry.manifest("named/app:2").is_some());

    let out = farm
        .braid(&["build", "--platform", THREE, "-t", &tag, "--push", "--format", "docker", "--annotation", "a=b", &ctx])
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--annotation needs --format oci"));
}

#[test]
fn load_puts_this_hosts_image_into_docker_or_podman() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let engine = DockerEngine::start(&dir.join("docker")).unwrap();
    let agents = [AgentSpec::new("load-amd64", &[]), AgentSpec::new("load-arm64", &["linux/arm64"])];
    let (registry, farm, ctx) = farm_of(dir, &agents);

    // Refused before anything is uploaded: of several platforms, --load
    // takes the host's, and it is missing.
    let out = farm.braid(&["build", "--platform", "linux/arm64,linux/arm/v7", "--load", &ctx]).unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--load loads the image for this host"));
    assert_eq!(farm.metric("braid_context_uploads_total"), 0.0);

    let tag = format!("{}/load/app:1", registry.addr);
    let docker_host = Path::new(&engine.host);
    let out = farm
        .braid_env(
            &["build", "--platform", "linux/amd64,linux/arm64", "-t", &tag, "--load", &ctx],
            &[("DOCKER_HOST", docker_host)],
        )
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let docker = |args: &[&str]| {
        let out = Command::new("docker").arg("--host").arg(&engine.host).args(args).output().unwrap();
        assert!(out.status.success(), "docker {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(docker(&["image", "inspect", "--format", "{{.Os}}/{{.Architecture}}", &tag]), "linux/amd64");
    assert_eq!(docker(&["run", "--rm", "--network", "none", &tag, "cat", "/arch"]), "x86_64");
    assert!(registry.manifest("load/app:1").is_none(), "--load alone pushes nothing");

    // One platform as a `docker load` archive.
    let archive = dir.join("arm64.tar");
    let arm_tag = format!("{}/load/arm:1", registry.addr);
    let dest = format!("type=docker,dest={}", archive.display());
    let out = farm.braid(&["build", "--platform", "linux/arm64", "-t", &arm_tag, "--output", &dest, &ctx]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    docker(&["load", "--input", archive.to_str().unwrap()]);
    assert_eq!(docker(&["image", "inspect", "--format", "{{.Os}}/{{.Architecture}}", &arm_tag]), "linux/arm64");

    // A one-platform build is loaded whatever its platform, as buildx does.
    let foreign = format!("{}/load/foreign:1", registry.addr);
    let out = farm
        .braid_env(
            &["build", "--platform", "linux/arm64", "-t", &foreign, "--load", &ctx],
            &[("DOCKER_HOST", docker_host)],
        )
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(docker(&["image", "inspect", "--format", "{{.Os}}/{{.Architecture}}", &foreign]), "linux/arm64");

    // --push and --load together; then a real `docker pull` of the pushed
    // index picks this host's image.
    let both = format!("{}/load/both:1", registry.addr);
    let out = farm
        .braid_env(
            &["build", "--platform", "linux/amd64,linux/arm64", "-t", &both, "--push", "--load", &ctx],
            &[("DOCKER_HOST", docker_host)],
        )
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let loaded_id = docker(&["image", "inspect", "--format", "{{.Id}}", &both]);
    docker(&["rmi", &both]);
    docker(&["pull", &both]);
    assert_eq!(docker(&["image", "inspect", "--format", "{{.Id}}", &both]), loaded_id, "the same image either way");
    assert_eq!(docker(&["run", "--rm", "--network", "none", &both, "cat", "/arch"]), "x86_64");

    // No Engine answers: the image goes to podman's store instead.
    let storage = dir.join("podman");
    let conf = dir.join("storage.conf");
    std::fs::write(
        &conf,
        format!(
            "[storage]\ndriver = \"vfs\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
            storage.join("root").display(),
            storage.join("run").display()
        ),
    )
    .unwrap();
    let nowhere = dir.join("no-engine.sock");
    let out = farm
        .braid_env(
            &["build", "--platform", "linux/amd64,linux/arm64", "-t", &tag, "--load", &ctx],
            &[("DOCKER_HOST", Path::new(&format!("unix://{}", nowhere.display()))), ("CONTAINERS_STORAGE_CONF", &conf)],
        )
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let inspect = Command::new("podman")
        .env("CONTAINERS_STORAGE_CONF", &conf)
        .args(["image", "inspect", "--format", "{{.Os}}/{{.Architecture}}", &tag])
        .output()
        .unwrap();
    assert!(inspect.status.success(), "{}", String::from_utf8_lossy(&inspect.stderr));
    assert_eq!(String::from_utf8_lossy(&inspect.stdout).trim(), "linux/amd64");
}
