//! The shared layer cache through the real binaries and a real registry:
//! agent A builds with `--cache-to type=registry`, is stopped and its
//! storage removed; a fresh agent B (another farm, empty storage) builds
//! the same with `--cache-from` and takes the RUN step from the cache.
//! A two-platform build (arm64 by QEMU) writes one cache per platform and
//! a fresh agent finds both. Every refused type says why, before upload,
//! and the coordinator refuses the same on submit. The cache registry's
//! login travels as a push registry's; podman agents share caches too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use braid_tests::{AgentSpec, Farm, Registry, dockerfile_context, require_environment};

/// A RUN step of real work: a bounded shell loop (`n` iterations), its
/// result and the machine it ran on written into the image. No ARG: buildah
/// 1.28 looks no ARG step up in a remote cache, and stops looking after it.
fn dockerfile(base: &str, n: u64) -> String {
    format!(
        "FROM {base}\n\
         RUN i=0; while [ $i -lt {n} ]; do i=$((i+1)); done; echo \"$i $(uname -m)\" > /work.txt\n"
    )
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `braid build` on `farm`: its exit status and stderr.
fn build(farm: &Farm, args: &[&str]) -> (bool, String) {
    let mut all = vec!["build", "--progress", "plain"];
    all.extend_from_slice(args);
    let out = farm.braid(&all).unwrap();
    (out.status.success(), text(&out.stderr))
}

/// The image config's layer diff ids of `tag`'s image for `arch`.
fn diff_ids(registry: &Registry, repository: &str, tag: &str, arch: &str) -> Vec<String> {
    let index = registry.manifest(&format!("{repository}:{tag}")).unwrap();
    let digest = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["platform"]["architecture"] == arch)
        .and_then(|m| m["digest"].as_str())
        .unwrap_or_else(|| panic!("no {arch} image in {index}"))
        .to_owned();
    let out = Command::new("skopeo")
        .args(["inspect", "--config", "--tls-verify=false"])
        .arg(format!("docker://{}/{repository}@{digest}", registry.addr))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let config: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    config["rootfs"]["diff_ids"].as_array().unwrap().iter().map(|d| d.as_str().unwrap().to_owned()).collect()
}

/// The tags of a repository in the registry (buildah's cache keys for a cache repository).
fn tags(registry: &Registry, repository: &str) -> Vec<String> {
    let out = Command::new("curl")
        .args(["-fsS", &format!("http://{}/v2/{repository}/tags/list", registry.addr)])
        .output()
        .unwrap();
    if !out.status.success() {
        return Vec::new();
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["tags"].as_array().map(|t| t.iter().map(|t| t.as_str().unwrap().to_owned()).collect()).unwrap_or_default()
}

/// One farm of one agent in `dir`, fresh storage.
fn farm(dir: &Path, registry: &Registry, agent: &'static str) -> Farm {
    let farm = Farm::start(dir, registry, &[AgentSpec::new(agent, &[])]).unwrap();
    farm.wait_for_agents(1).unwrap();
    farm
}

#[test]
fn registry_cache_moves_between_agents() {
    require_environment();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let registry = Registry::start(&dir.join("registry")).unwrap();
    let base = registry.push_base_image("base/busybox:latest").unwrap();
    // About 20 s of work on the test machine.
    let ctx = dockerfile_context(dir, "ctx", &dockerfile(&base, 8_000_000));
    let reg = registry.addr.clone();
    let cache = format!("{reg}/cache/app");

    // Agent A, cold, exports its cache.
    let a = farm(&dir.join("a"), &registry, "agent-a");
    let (ok, log) = build(
        &a,
        &[
            "--platform",
            "linux/amd64",
            "-t",
            &format!("{reg}/app/a:1"),
            "--push",
            "--cache-to",
            &format!("type=registry,ref={cache},mode=max"),
            &ctx,
        ],
    );
    assert!(ok, "{log}");
    assert!(
        log.contains(&format!("[linux/amd64] cache: linux/amd64 exports each step it builds to {cache}-linux-amd64")),
        "{log}"
    );
    assert!(log.contains(&format!("cache: linux/amd64 exported 1 step to {cache}-linux-amd64")), "{log}");
    assert_eq!(tags(&registry, "cache/app-linux-amd64").len(), 1, "the RUN step cached in the platform's repository");

    // A stops and its storage goes.
    drop(a);
    std::fs::remove_dir_all(dir.join("a")).unwrap();

    // A fresh agent B (another coordinator, empty storage) takes the step from the cache.
    let b = farm(&dir.join("b"), &registry, "agent-b");
    let (ok, log) = build(
        &b,
        &[
            "--platform",
            "linux/amd64",
            "-t",
            &format!("{reg}/app/b:1"),
            "--push",
            "--cache-from",
            &format!("type=registry,ref={cache}"),
            &ctx,
        ],
    );
    assert!(ok, "{log}");
    assert!(log.contains(&format!("cache: linux/amd64 looks each step up in {cache}-linux-amd64")), "{log}");
    assert!(log.contains("--> Using cache"), "buildah reports the step as cached: {log}");
    assert!(log.contains(&format!("cache: linux/amd64 took 1 step from {cache}-linux-amd64")), "{log}");
    let (from_a, from_b) = (diff_ids(&registry, "app/a", "1", "amd64"), diff_ids(&registry, "app/b", "1", "amd64"));
    assert_eq!(from_a.last(), from_b.last(), "B's RUN layer is A's");
    assert_eq!(from_a, from_b);

    // Two platforms (arm64 emulated) write two caches, one repository each.
    let small = dockerfile_context(dir, "small", &dockerfile(&base, 20_000));
    let multi = format!("{reg}/cache/multi");
    let two = ["--platform", "linux/amd64,linux/arm64", "--allow-emulation"];
    let mut args = two.to_vec();
    let (tag_b, to) = (format!("{reg}/app/multi-b:1"), format!("type=registry,ref={multi}:v1"));
    args.extend(["-t", &tag_b, "--push", "--cache-to", &to, &small]);
    let (ok, log) = build(&b, &args);
    assert!(ok, "{log}");
    assert!(log.contains("mode=min asked, but buildah exports every layer it builds, as mode=max"), "{log}");
    let (amd, arm) = (tags(&registry, "cache/multi-v1-linux-amd64"), tags(&registry, "cache/multi-v1-linux-arm64"));
    assert_eq!((amd.len(), arm.len()), (1, 1), "each platform has its own cache: {amd:?} {arm:?}");
    assert_ne!(amd, arm, "two distinct caches");
    drop(b);
    std::fs::remove_dir_all(dir.join("b")).unwrap();

    // A fresh agent finds both.
    let c = farm(&dir.join("c"), &registry, "agent-c");
    let mut args = two.to_vec();
    let (tag_c, from) = (format!("{reg}/app/multi-c:1"), format!("{multi}:v1"));
    args.extend(["-t", &tag_c, "--push", "--cache-from", &from, &small]);
    let (ok, log) = build(&c, &args);
    assert!(ok, "{log}");
    for platform in ["linux/amd64", "linux/arm64"] {
        let repo = format!("{multi}-v1-{}", platform.replace('/', "-"));
        assert!(log.contains(&format!("cache: {platform} took 1 step from {repo}")), "{platform}: {log}");
    }
    for arch in ["amd64", "arm64"] {
        assert_eq!(
            diff_ids(&registry, "app/multi-b", "1", arch),
            diff_ids(&registry, "app/multi-c", "1", arch),
            "{arch}"
        );
    }

    // Refused before upload, each with its reason.
    for (flag, value, says) in [
        ("--cache-to", "type=gha", "type=gha: the GitHub Actions cache needs the runner's cache service"),
        ("--cache-from", "type=gha,scope=x", "which a remote braid agent cannot reach"),
        ("--cache-to", "type=local,dest=/tmp/c", "type=local: a local cache is a directory on this machine"),
        ("--cache-from", "type=s3,region=r,bucket=b", "type=s3: an S3 cache needs BuildKit's s3 cache backend"),
        ("--cache-to", "type=azblob,name=n", "type=azblob: an Azure Blob Storage cache needs"),
        ("--cache-from", "type=inline", "type=inline is a --cache-to type"),
        ("--cache-to", "type=registry,ref=r.io/a,compression=zstd", "attribute \"compression\" is not supported"),
        ("--cache-to", "type=registry,ref=r.io/a,mode=all", "mode \"all\": expected min or max"),
        ("--cache-from", "type=registry", "ref is required"),
    ] {
        let (ok, log) = build(&c, &[flag, value, &ctx]);
        assert!(!ok, "{flag} {value} was accepted");
        assert!(log.contains(flag) && log.contains(says), "{flag} {value}: {log}");
        assert!(!log.contains("#1 context"), "refused before the upload: {log}");
    }
}

/// The cache registry's login comes from the user's Docker config, as a
/// push registry's does; it reaches the agent's auth file and nowhere else.
#[test]
fn cache_registry_credentials_travel_like_the_tags() {
    const PASSWORD: &str = "cache-S3cret-41c7";
    require_environment();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let open = Registry::start(&dir.join("open")).unwrap();
    let base = open.push_base_image("base/busybox:latest").unwrap();
    let locked = Registry::start_with_auth(&dir.join("locked"), "dev", PASSWORD).unwrap();
    let config = dir.join("coordinator.toml");
    std::fs::write(&config, format!("insecure_registries = [\"{}\", \"{}\"]\n", open.addr, locked.addr)).unwrap();
    let farm_dir = dir.join("farm");
    let farm =
        Farm::start_with(&farm_dir, None, &[AgentSpec::new("agent", &[])], &["--config", config.to_str().unwrap()])
            .unwrap();
    farm.wait_for_agents(1).unwrap();
    let ctx = dockerfile_context(dir, "ctx", &dockerfile(&base, 1000));
    let docker_config = dir.join("docker-config");
    std::fs::create_dir_all(&docker_config).unwrap();
    let auth = base64_encode(&format!("dev:{PASSWORD}"));
    std::fs::write(
        docker_config.join("config.json"),
        format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, locked.addr),
    )
    .unwrap();
    let tag = format!("{}/app/creds:1", open.addr);
    let to = format!("type=registry,ref={}/cache/app,mode=max", locked.addr);
    let args =
        ["build", "--progress", "plain", "--platform", "linux/amd64", "-t", &tag, "--push", "--cache-to", &to, &ctx];
    // Without the login, buildah cannot write the cache and the build fails.
    let without = dir.join("no-docker-config");
    std::fs::create_dir_all(&without).unwrap();
    let out = farm.braid_env(&args, &[("DOCKER_CONFIG", &without)]).unwrap();
    assert!(!out.status.success(), "the cache registry wants a login: {}", text(&out.stderr));
    let out = farm
        .braid_env(
            &[
                "build",
                "--progress",
                "plain",
                "--platform",
                "linux/amd64",
                "-t",
                &tag,
                "--push",
                "--cache-to",
                &to,
                &ctx,
            ],
            &[("DOCKER_CONFIG", &docker_config)],
        )
        .unwrap();
    let log = text(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("exported 1 step to"), "{log}");
    let listed = Command::new("curl")
        .args(["-fsS", "-u", &format!("dev:{PASSWORD}")])
        .arg(format!("http://{}/v2/cache/app-linux-amd64/tags/list", locked.addr))
        .output()
        .unwrap();
    assert!(listed.status.success() && text(&listed.stdout).contains("\"tags\":[\""), "{}", text(&listed.stderr));
    drop(farm);
    let mut leaks = Vec::new();
    scan(&farm_dir, PASSWORD, &mut leaks);
    assert!(leaks.is_empty(), "the password found in: {leaks:?}");
}

fn base64_encode(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Every file under `dir` holding `secret`.
fn scan(dir: &Path, secret: &str, leaks: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            scan(&path, secret, leaks);
        } else if meta.is_file() && meta.len() < 512 << 20 {
            let bytes = std::fs::read(&path).unwrap_or_default();
            if bytes.windows(secret.len()).any(|w| w == secret.as_bytes()) {
                leaks.push(path.display().to_string());
            }
        }
    }
}

/// podman agents take the same flags: a fresh podman agent reads what
/// another podman agent wrote.
#[test]
fn podman_agents_share_the_cache_too() {
    require_environment();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let registry = Registry::start(&dir.join("registry")).unwrap();
    let base = registry.push_base_image("base/busybox:latest").unwrap();
    let ctx = dockerfile_context(dir, "ctx", &dockerfile(&base, 5000));
    let cache = format!("{}/cache/pod", registry.addr);
    let mut logs = Vec::new();
    for (name, flag, value) in [
        ("podman-a", "--cache-to", format!("type=registry,ref={cache},mode=max")),
        ("podman-b", "--cache-from", cache.clone()),
    ] {
        let farm_dir = dir.join(name);
        let farm = Farm::start(&farm_dir, &registry, &[AgentSpec::new(name, &[]).backend("podman")]).unwrap();
        farm.wait_for_agents(1).unwrap();
        let (ok, log) = build(&farm, &["--platform", "linux/amd64", flag, &value, &ctx]);
        assert!(ok, "{log}");
        logs.push(log);
        drop(farm);
        std::fs::remove_dir_all(&farm_dir).unwrap();
    }
    assert!(logs[0].contains(&format!("cache: linux/amd64 exported 1 step to {cache}-linux-amd64")), "{}", logs[0]);
    assert!(logs[1].contains(&format!("cache: linux/amd64 took 1 step from {cache}-linux-amd64")), "{}", logs[1]);
}

/// A client that skips the CLI's checks meets the coordinator's: the same
/// checker, InvalidArgument naming the field and the entry.
#[test]
fn the_coordinator_refuses_what_the_cli_would() {
    use braid_shared::proto;
    let tmp = tempfile::tempdir().unwrap();
    let farm = Farm::start_with(tmp.path(), None, &[], &[]).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let option = |kind: &str, attrs: &[(&str, &str)]| proto::CacheOption {
        r#type: kind.into(),
        attrs: attrs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
    };
    let cases = [
        (
            vec![],
            vec![option("gha", &[("token", "ghs_T0KEN")])],
            "cache_to: --cache-to \"type=gha,token=...\": type=gha",
        ),
        (
            vec![option("local", &[("src", "/c")])],
            vec![],
            "cache_from: --cache-from \"type=local,src=...\": type=local",
        ),
        (vec![option("registry", &[])], vec![], "cache_from: --cache-from \"type=registry\": ref is required"),
    ];
    for (cache_from, cache_to, want) in cases {
        let spec = proto::BuildSpec {
            platforms: vec!["linux/amd64".into()],
            context_digest: format!("sha256:{}", "0".repeat(64)),
            cache_from,
            cache_to,
            ..Default::default()
        };
        let status = runtime
            .block_on(async {
                let mut client = proto::builds_client::BuildsClient::connect(farm.url.clone()).await.unwrap();
                client.submit(proto::SubmitRequest { spec: Some(spec), ..Default::default() }).await
            })
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(want) && !status.message().contains("T0KEN"), "{}", status.message());
    }
}

/// The Docker backend's BuildKit path: one Engine writes an inline cache
/// into the pushed image (`--cache-to type=inline`); an agent on a second,
/// empty Engine reads it (`--cache-from REF`) and BuildKit reports the RUN
/// step cached; `--cache-to type=registry`, which `docker build` cannot
/// write, is refused at submit by capability.
#[test]
fn docker_engine_agents_write_and_read_an_inline_cache() {
    require_environment();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let registry = Registry::start(&dir.join("registry")).unwrap();
    let base = registry.push_base_image("base/busybox:latest").unwrap();
    let ctx = dockerfile_context(dir, "ctx", &dockerfile(&base, 5000));
    let image = format!("{}/cache/engine:1", registry.addr);
    let mut logs = Vec::new();
    for (name, args) in [
        ("docker-a", vec!["--cache-to", "type=inline", "-t", image.as_str(), "--push"]),
        ("docker-b", vec!["--cache-from", image.as_str()]),
    ] {
        let farm_dir = dir.join(name);
        let engine = braid_tests::DockerEngine::start(&farm_dir.join("docker")).unwrap();
        let agent = AgentSpec::new(name, &["linux/amd64"])
            .backend("docker")
            .flag("--docker-host", &engine.host)
            .flag("--docker-cli", "/usr/bin/docker");
        let farm = Farm::start(&farm_dir, &registry, &[agent]).unwrap();
        farm.wait_for_agents(1).unwrap();
        let mut all = vec!["--platform", "linux/amd64"];
        all.extend(args);
        all.push(&ctx);
        let (ok, log) = build(&farm, &all);
        assert!(ok, "{log}");
        if name == "docker-a" {
            let (ok, refused) =
                build(&farm, &["--platform", "linux/amd64", "--cache-to", &format!("type=registry,ref={image}"), &ctx]);
            assert!(!ok && refused.contains("--cache-to type=registry needs buildah"), "{refused}");
        }
        logs.push(log);
        drop(farm);
        drop(engine);
    }
    assert!(logs[0].contains("writes an inline cache into its image"), "{}", logs[0]);
    assert!(logs[1].contains(&format!("reads the inline cache of {image}")), "{}", logs[1]);
    // BuildKit's plain progress: "#N [2/2] RUN ..." then "#N CACHED" for the same N.
    let step = logs[1]
        .lines()
        .find_map(|l| l.split("] #").nth(1).filter(|rest| rest.contains("[2/2] RUN")))
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_owned);
    let cached = step.is_some_and(|n| logs[1].lines().any(|l| l.ends_with(&format!("#{n} CACHED"))));
    assert!(cached, "the RUN step was not taken from the cache:\n{}", logs[1]);
}
