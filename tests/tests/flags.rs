//! buildx's run-time flags through the real binaries, on one farm with a
//! buildah agent (linux/amd64), a Docker Engine agent (linux/arm64) and an
//! agent that refuses `--network host` (linux/arm/v7, which it alone serves):
//! `--pull`, `--network`, `--add-host`, `--shm-size`, `--ulimit`,
//! `--iidfile`, `-q`, and the refusals before upload.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use braid_tests::{AgentSpec, DockerEngine, Farm, Registry, dockerfile_context, require_environment};

/// What a RUN step sees, written into the image.
const PROBE: &str = "RUN grep db.example /etc/hosts | tr -s ' \\t' ' ' > /hosts; \
    df -k /dev/shm | tail -n 1 | awk '{print $2}' > /shm; \
    ip -o link | awk -F': ' '{print $2}' | sort | tr '\\n' ' ' > /links; \
    ulimit -n > /nofile\n";

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn run_flags_reach_buildah_and_the_docker_engine() {
    require_environment();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let registry = Registry::start(&dir.join("registry")).unwrap();
    let base = registry.push_base_image("base/busybox:latest").unwrap();
    let engine = DockerEngine::start(&dir.join("docker")).unwrap();
    let agents = [
        AgentSpec::new("buildah-amd64", &[]),
        AgentSpec::new("docker-arm64", &["linux/arm64"])
            .backend("docker")
            .flag("--docker-host", &engine.host)
            .flag("--docker-cli", "/usr/bin/docker"),
        // An operator's refusal of --network host (BuildKit's network.host entitlement).
        AgentSpec::new("no-host-net", &["linux/arm/v7"]).env("BRAID_ALLOW_NETWORK_HOST", "false"),
    ];
    let farm = Farm::start(dir, &registry, &agents).unwrap();
    farm.wait_for_agents(3).unwrap();

    // Invalid values are refused by the CLI before anything is uploaded.
    let ctx = dockerfile_context(dir, "ctx", &format!("FROM {base}\n{PROBE}"));
    for (flag, value, says) in [
        ("--network", "bridge", "invalid value 'bridge' for '--network"),
        ("--add-host", "db:300.1.1.1", "--add-host db:\"300.1.1.1\": invalid IP address"),
        ("--add-host", "db:host-gateway", "host-gateway is not supported"),
        ("--ulimit", "files=1", "--ulimit \"files=1:1\": unknown name"),
        ("--shm-size", "64x", "--shm-size \"64x\": expected a size like 64m or 1g"),
    ] {
        let out = farm.braid(&["build", flag, value, &ctx]).unwrap();
        assert!(!out.status.success(), "{flag} {value} was accepted");
        let err = text(&out.stderr);
        assert!(err.contains(says) && !err.contains("context"), "{flag} {value}: {err}");
    }

    // Every flag at once, one platform per backend.
    let tag = format!("{}/flags/app:1", registry.addr);
    let iid = dir.join("iid");
    let out = farm
        .braid(&[
            "build",
            "--platform",
            "linux/amd64,linux/arm64",
            "-t",
            &tag,
            "--push",
            "--pull",
            "--network",
            "host",
            "--add-host",
            "db.example:10.1.2.3",
            "--iidfile",
            iid.to_str().unwrap(),
            "-q",
            &ctx,
        ])
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let digest = registry.digest_of("flags/app:1").unwrap();
    assert_eq!(text(&out.stdout), format!("{digest}\n"), "-q prints only the index digest");
    assert!(!text(&out.stderr).contains("#1 context"), "-q keeps progress quiet: {}", text(&out.stderr));
    assert_eq!(std::fs::read_to_string(&iid).unwrap(), digest, "--iidfile holds the index digest");
    let index = registry.manifest("flags/app:1").unwrap();
    let seen = registry.per_platform("flags/app", &index, &["hosts"], &dir.join("scratch")).unwrap();
    assert_eq!(
        seen,
        ["amd64 10.1.2.3 db.example", "arm64 10.1.2.3 db.example"],
        "add-host on buildah (amd64) and the Engine (arm64)"
    );

    let out = farm.braid(&["build", "--platform", "linux/arm/v7", "--network", "host", &ctx]).unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    // Refused at submit: the agent's builder reports no network-host.
    assert!(
        err.contains(
            "linux/arm/v7: --network host needs an agent with allow_network_host = true; agent no-host-net runs"
        ),
        "{err}"
    );

    // --network none and --shm-size: the Engine's RUN steps see only the
    // loopback and a /dev/shm of that size; buildah with chroot isolation
    // (these agents) shares the host's and says so instead of building.
    // --no-cache: the classic builder's cache does not key on either.
    let tag = format!("{}/flags/none:1", registry.addr);
    let isolated = |platform: &str, flag: &str, value: &str| {
        farm.braid(&[
            "build",
            "--platform",
            platform,
            "-t",
            &tag,
            "--push",
            "--no-cache",
            "--network",
            "none",
            flag,
            value,
            &ctx,
        ])
        .unwrap()
    };
    let out = isolated("linux/arm64", "--shm-size", "96m");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let index = registry.manifest("flags/none:1").unwrap();
    let seen = registry.per_platform("flags/none", &index, &["links", "shm"], &dir.join("scratch3")).unwrap();
    assert_eq!(seen, ["arm64 lo 98304"]);
    let out = isolated("linux/amd64", "--label", "x=y");
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("--network none: this agent's buildah runs RUN steps with --isolation chroot"), "{err}");
    let out = farm.braid(&["build", "--platform", "linux/amd64", "--shm-size", "1g", &ctx]).unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("--shm-size: this agent's buildah runs RUN steps with --isolation chroot"), "{err}");

    // --ulimit: buildah applies it; the Engine's classic builder cannot,
    // and the build is refused at submit instead of built without it. (--no-cache: buildah's
    // layer cache does not key on it.)
    let ulimit = ["--ulimit", "nofile=777:888", "--no-cache"];
    let tag = format!("{}/flags/ulimit:1", registry.addr);
    let mut args = vec!["build", "--platform", "linux/amd64", "-t", &tag, "--push"];
    args.extend(ulimit);
    args.push(&ctx);
    let out = farm.braid(&args).unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let index = registry.manifest("flags/ulimit:1").unwrap();
    let seen = registry.per_platform("flags/ulimit", &index, &["nofile"], &dir.join("scratch2")).unwrap();
    assert_eq!(seen, ["amd64 777"]);
    let mut args = vec!["build", "--platform", "linux/arm64", "-t", &tag, "--push", "--iidfile", iid.to_str().unwrap()];
    args.extend(ulimit);
    args.push(&ctx);
    let out = farm.braid(&args).unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("linux/arm64: --ulimit needs buildah or podman; agent docker-arm64 runs docker"), "{err}");
    assert!(!iid.exists(), "a failed build leaves no stale --iidfile, as buildx");

    // --pull: the base tag moves to a new image while the agents hold the
    // old one. buildah (pull if newer) and the Engine (braid always asks it
    // to pull) see the new one anyway; with --pull buildah fetches the base
    // even when its copy is current, as buildx does.
    let v2 = dockerfile_context(dir, "v2", &format!("FROM {base}\nRUN echo v2 > /base-version\n"));
    let out = farm.braid(&["build", "--platform", "linux/amd64,linux/arm64", "-t", &base, "--push", &v2]).unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let seen =
        dockerfile_context(dir, "seen", &format!("FROM {base}\nRUN cat /base-version > /seen || echo v1 > /seen\n"));
    let tag = format!("{}/flags/pull:1", registry.addr);
    let build = |extra: &[&str]| {
        let mut args = vec!["build", "--progress", "plain", "-t", &tag, "--push"];
        args.extend(extra);
        args.push(&seen);
        let out = farm.braid(&args).unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        let index = registry.manifest("flags/pull:1").unwrap();
        let scratch = dir.join(format!("pull{}", extra.len()));
        (registry.per_platform("flags/pull", &index, &["seen"], &scratch).unwrap(), text(&out.stderr))
    };
    let (seen1, log1) = build(&["--platform", "linux/amd64"]);
    let (seen2, log2) = build(&["--platform", "linux/amd64", "--no-cache"]);
    let (seen3, log3) = build(&["--platform", "linux/amd64,linux/arm64", "--pull", "--no-cache"]);
    assert_eq!((seen1, seen2), (vec!["amd64 v2".to_owned()], vec!["amd64 v2".to_owned()]), "{log1}");
    assert!(!log2.contains("Trying to pull"), "without --pull buildah uses its up-to-date copy:\n{log2}");
    assert!(log3.contains("[linux/amd64] Trying to pull"), "--pull fetches the base again:\n{log3}");
    assert_eq!(seen3, ["amd64 v2", "arm64 v2"]);
}
