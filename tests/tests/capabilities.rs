//! Builders that say what they can do, through the real binaries, on one
//! farm with a buildah agent (linux/amd64) and a Docker Engine agent
//! (linux/arm64, the classic builder): `braid agents` shows each builder;
//! a build whose Dockerfile or flags need what no agent of a platform has
//! is refused at submit, by name; `--build-context` (a local directory and
//! docker-image://) on buildah; `--no-cache-filter` and attestations
//! refused; a `# syntax=` directive buildah ignores is reported.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use braid_tests::{AgentSpec, DockerEngine, Farm, Registry, dockerfile_context, require_environment};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn builds_go_only_where_the_builder_can_and_are_refused_by_name_where_none_can() {
    require_environment();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let registry = Registry::start(&dir.join("registry")).unwrap();
    let base = registry.push_base_image("base/busybox:latest").unwrap();
    let engine = DockerEngine::start(&dir.join("docker")).unwrap();
    let agents = [
        AgentSpec::new("buildah-amd64", &[]),
        AgentSpec::new("docker-arm64", &["linux/arm64"]).backend("docker").flag("--docker-host", &engine.host),
    ];
    let farm = Farm::start(dir, &registry, &agents).unwrap();
    farm.wait_for_agents(2).unwrap();

    // `braid agents` names each builder and its version; JSON lists what it can do.
    let out = farm.braid(&["agents"]).unwrap();
    let table = text(&out.stdout);
    assert!(out.status.success() && table.contains("BUILDER"), "{table}");
    let buildah_row = table.lines().find(|l| l.starts_with("buildah-amd64")).unwrap();
    assert!(buildah_row.contains("buildah 1.28.2"), "{table}");
    let docker_row = table.lines().find(|l| l.starts_with("docker-arm64")).unwrap();
    assert!(docker_row.contains("docker 20.10"), "{table}");
    let out = farm.braid(&["agents", "--format", "json"]).unwrap();
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let caps = |name: &str| -> Vec<String> {
        let agent = listed.as_array().unwrap().iter().find(|a| a["name"] == name).unwrap();
        assert!(agent["builder"]["version"].as_str().is_some_and(|v| !v.is_empty()), "{agent}");
        agent["builder"]["capabilities"].as_array().unwrap().iter().map(|c| c.as_str().unwrap().to_owned()).collect()
    };
    let buildah = caps("buildah-amd64");
    for c in ["secrets", "ssh", "cache-mounts", "build-contexts", "ulimits"] {
        assert!(buildah.iter().any(|x| x == c), "buildah lacks {c}: {buildah:?}");
    }
    assert!(!buildah.iter().any(|x| x == "heredocs" || x == "copy-link"), "{buildah:?}");
    assert_eq!(caps("docker-arm64"), ["network-none", "network-host", "add-hosts", "shm-size"]);
    // Health: buildah's storage is measured; a Docker Engine's own is unknown, not 0.
    let health = braid_tests::eventually(std::time::Duration::from_secs(30), "both agents' health reports", || {
        let out = farm.braid(&["agents", "--format", "json"]).ok()?;
        let listed: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let of = |name: &str| listed.as_array()?.iter().find(|a| a["name"] == name).map(|a| a["health"].clone());
        let (buildah, docker) = (of("buildah-amd64")?, of("docker-arm64")?);
        (buildah.is_object() && docker.is_object()).then_some((buildah, docker))
    })
    .unwrap();
    assert!(health.0["builder_cache_bytes"].is_u64(), "{health:?}");
    assert!(health.1["builder_cache_bytes"].is_null() && health.1["disk_free_bytes"].as_u64() > Some(0), "{health:?}");
    // The dashboard's agents carry their builders too.
    let out = std::process::Command::new("curl")
        .args(["-fsS", &format!("http://{}/api/overview", farm.http)])
        .output()
        .unwrap();
    let overview: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let amd = &overview["platforms"]["linux/amd64"][0];
    assert_eq!((amd["name"].as_str(), amd["builder"].as_str()), (Some("buildah-amd64"), Some("buildah 1.28.2")));

    // A heredoc: refused at once, naming the feature, the platform, what
    // provides it and the agents' builders; no build is made.
    let heredoc = dockerfile_context(dir, "heredoc", &format!("FROM {base}\nRUN <<EOF\necho hi > /x\nEOF\n"));
    let out = farm.braid(&["build", "--platform", "linux/amd64,linux/arm64", &heredoc]).unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains(
            "linux/amd64: heredocs (<<EOF) need buildah >= 1.33 or podman >= 4.8; agent buildah-amd64 runs buildah 1.28.2"
        ),
        "{err}"
    );
    assert!(err.contains("linux/arm64: heredocs (<<EOF) need") && err.contains("agent docker-arm64 runs docker 20.10"));
    assert!(!err.contains("submitted"), "{err}");
    let builds = farm.braid(&["builds", "--format", "json"]).unwrap();
    let builds: serde_json::Value = serde_json::from_slice(&builds.stdout).unwrap();
    assert_eq!(builds.as_array().map(Vec::len), Some(0), "no build was made: {builds}");
    // The same inline (-f outside the context): the coordinator scans it itself.
    std::fs::write(dir.join("outside.Dockerfile"), format!("FROM {base}\nCOPY --link a /a\n")).unwrap();
    let out = farm
        .braid(&[
            "build",
            "--platform",
            "linux/amd64",
            "-f",
            dir.join("outside.Dockerfile").to_str().unwrap(),
            &heredoc,
        ])
        .unwrap();
    let err = text(&out.stderr);
    assert!(!out.status.success() && err.contains("linux/amd64: COPY --link needs buildah >= 1.31"), "{err}");

    // --ulimit on a platform only the classic builder serves: refused at submit.
    let plain = dockerfile_context(dir, "plain", &format!("FROM {base}\nRUN echo ok > /ok\n"));
    let out = farm.braid(&["build", "--platform", "linux/arm64", "--ulimit", "nofile=100", &plain]).unwrap();
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("linux/arm64: --ulimit needs buildah or podman; agent docker-arm64 runs docker"), "{err}");
    assert!(!err.contains("submitted"), "{err}");

    // --no-cache-filter: no builder here has it.
    let out = farm.braid(&["build", "--platform", "linux/amd64", "--no-cache-filter", "build", &plain]).unwrap();
    let err = text(&out.stderr);
    assert!(!out.status.success() && err.contains("linux/amd64: --no-cache-filter needs"), "{err}");

    // Attestations: provenance goes only where an index can carry it (a
    // push), SBOMs nowhere (no generator); both refused before upload,
    // naming the flag. Disabled ones are accepted (below).
    for (flags, says) in [
        (vec!["--provenance"], "--provenance=true needs --push"),
        (vec!["--provenance=mode=max"], "--provenance=mode=max needs --push"),
        (vec!["--sbom=true"], "--sbom=true: no SBOM generator on the agents"),
        (vec!["--attest", "type=sbom"], "--attest type=sbom: no SBOM generator on the agents"),
    ] {
        let mut args = vec!["build", "--platform", "linux/amd64"];
        args.extend(flags.iter().copied());
        args.push(&plain);
        let out = farm.braid(&args).unwrap();
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{flags:?} accepted");
        assert!(err.contains(says), "{flags:?}: {err}");
        assert!(!err.contains("#1 context"), "refused before the upload: {err}");
    }

    // --build-context: a local directory and an image, on buildah; the
    // `# syntax=` directive buildah ignores is reported, not refused.
    let lib = dir.join("lib");
    std::fs::create_dir_all(&lib).unwrap();
    std::fs::write(lib.join("greeting"), "hello from a named context\n").unwrap();
    let named = dockerfile_context(
        dir,
        "named",
        &format!(
            "# syntax=docker/dockerfile:1\nFROM {base}\nCOPY --from=lib greeting /greeting\n\
             COPY --from=tools /bin/busybox /tools-busybox\nRUN test -x /tools-busybox && echo ok > /ok\n"
        ),
    );
    let tag = format!("{}/caps/named:1", registry.addr);
    let lib_arg = format!("lib={}", lib.display());
    let tools_arg = format!("tools=docker-image://{base}");
    let out = farm
        .braid(&[
            "build",
            "--platform",
            "linux/amd64",
            "-t",
            &tag,
            "--push",
            "--progress",
            "plain",
            "--build-context",
            &lib_arg,
            "--build-context",
            &tools_arg,
            // Disabled attestations are accepted (once per type: buildx
            // refuses a duplicate attestation type too).
            "--sbom=false",
            "--attest",
            "type=provenance,disabled=true",
            &named,
        ])
        .unwrap();
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(
            "# syntax=docker/dockerfile:1 is not honoured on linux/amd64: buildah 1.28.2 parses the Dockerfile itself"
        ),
        "{err}"
    );
    let index = registry.manifest("caps/named:1").unwrap();
    let seen = registry.per_platform("caps/named", &index, &["greeting", "ok"], &dir.join("scratch")).unwrap();
    assert_eq!(seen, ["amd64 hello from a named context ok"]);

    // --build-context needs a builder that has it: the classic builder does not.
    let out = farm.braid(&["build", "--platform", "linux/arm64", "--build-context", &lib_arg, &named]).unwrap();
    let err = text(&out.stderr);
    assert!(!out.status.success() && err.contains("linux/arm64: --build-context needs buildah >= 1.27"), "{err}");
    // Sources braid cannot send are refused by name, before the upload
    // (git and http(s) sources are fetched by the CLI: gitcontext.rs).
    let out = farm.braid(&["build", "--build-context", "x=oci-layout:///tmp/l", &plain]).unwrap();
    let err = text(&out.stderr);
    assert!(!out.status.success() && err.contains("oci-layout:// contexts are not supported"), "{err}");
    assert!(!err.contains("#1 context"), "refused before the upload: {err}");
}
