//! The core flow, end to end on real parts: one build split across three
//! agents (amd64 detected, arm64 and arm/v7 declared and run through
//! qemu-user-static binfmt), pushed to a real registry, read back from it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use braid_tests::{AgentSpec, Farm, Registry, require_environment};

const MULTIARCH: &str = r#"
FROM BASE AS final
ARG TARGETARCH
ARG TARGETPLATFORM
ARG GREETING=unset
RUN case "$TARGETARCH" in amd64) m=amd64;; arm64) m=aarch64;; arm) m=arm;; *) m=unknown;; esac; \
    echo "$m" > /mapped && uname -m > /arch && echo "$GREETING" > /greeting && echo "$TARGETPLATFORM" > /platform
COPY message.txt /message.txt

FROM final AS broken
RUN echo "this stage must not be built with --target final" && exit 9
"#;

const FAILING: &str = r#"
FROM BASE
ARG TARGETARCH
RUN if [ "$TARGETARCH" = arm64 ]; then echo "boom on $TARGETARCH" >&2; exit 3; fi
"#;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn one_build_three_native_agents_one_index() {
    require_environment();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let registry = Registry::start(&dir.join("registry")).unwrap();
    let base = registry.push_base_image("base/busybox:latest").unwrap();
    let farm = Farm::start(
        dir,
        &registry,
        &[
            AgentSpec::new("amd64-agent", &[]),
            AgentSpec::new("arm64-agent", &["linux/arm64"]),
            AgentSpec::new("armv7-agent", &["linux/arm/v7"]),
        ],
    )
    .unwrap();
    farm.wait_for_agents(3).unwrap();

    // --- A multi-arch build with build args, --target and two tags in two repositories.
    let ctx = dir.join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), MULTIARCH.replace("BASE", &base)).unwrap();
    std::fs::write(ctx.join("message.txt"), "from the context\n").unwrap();
    // A git checkout: the index records its source (without credentials) and revision.
    let git = |args: &[&str]| {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(&ctx)
            .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    git(&["init", "-q"]);
    git(&["remote", "add", "origin", "https://builder:s3cret@git.example.com/team/app.git"]);
    git(&["add", "."]);
    git(&["commit", "-qm", "init"]);
    let revision = git(&["rev-parse", "HEAD"]);
    let meta = dir.join("meta.json");
    let tag1 = format!("{}/demo/app:1", registry.addr);
    let tag2 = format!("{}/mirror/app:v1", registry.addr);
    let out = farm
        .braid(&[
            "build",
            "--platform",
            "linux/amd64,linux/arm64",
            "--platform",
            "linux/arm/v7",
            "-t",
            &tag1,
            "-t",
            &tag2,
            "--build-arg",
            "GREETING=hello-braid",
            "--target",
            "final",
            "--output",
            "type=registry",
            "--annotation",
            "index:org.example.team=braid",
            "--annotation",
            "manifest[linux/arm64]:org.example.arch=arm64-only",
            "--annotation",
            "manifest-descriptor:org.example.descriptor=yes",
            "--progress",
            "plain",
            "--metadata-file",
            meta.to_str().unwrap(),
            ctx.to_str().unwrap(),
        ])
        .unwrap();
    let err = stderr(&out);
    assert!(out.status.success(), "build failed: {err}");
    assert!(err.contains("[linux/arm64] STEP"), "plain progress prefixes log lines with the platform: {err}");
    let stdout = String::from_utf8_lossy(&out.stdout);

    let index = registry.manifest("demo/app:1").expect("the index is in the registry under the first tag");
    assert_eq!(index["mediaType"], "application/vnd.oci.image.index.v1+json");
    let manifests = braid_tests::platform_manifests(&index);
    let mut platforms: Vec<String> = manifests
        .iter()
        .map(|m| {
            let p = &m["platform"];
            match p["variant"].as_str() {
                Some(v) => format!("{}/{}/{v}", p["os"].as_str().unwrap(), p["architecture"].as_str().unwrap()),
                None => format!("{}/{}", p["os"].as_str().unwrap(), p["architecture"].as_str().unwrap()),
            }
        })
        .collect();
    platforms.sort();
    assert_eq!(platforms, ["linux/amd64", "linux/arm/v7", "linux/arm64"], "exactly the three platforms");

    let annotations = &index["annotations"];
    assert_eq!(annotations["org.example.team"], "braid");
    assert_eq!(annotations["org.opencontainers.image.source"], "https://git.example.com/team/app.git");
    assert_eq!(annotations["org.opencontainers.image.revision"], revision.as_str());
    let created = annotations["org.opencontainers.image.created"].as_str().unwrap();
    assert!(created.len() >= 20 && created.contains('T') && created.ends_with('Z'), "RFC 3339: {created}");
    for m in &manifests {
        assert_eq!(m["annotations"]["org.example.descriptor"], "yes");
        let manifest = registry.manifest(&format!("demo/app@{}", m["digest"].as_str().unwrap())).unwrap();
        let arch = m["platform"]["architecture"].as_str().unwrap();
        let wanted = if arch == "arm64" { serde_json::json!("arm64-only") } else { serde_json::Value::Null };
        assert_eq!(manifest["annotations"]["org.example.arch"], wanted, "{arch} manifest annotations");
    }
    let index_digest = registry.digest_of("demo/app:1").unwrap();
    assert_eq!(registry.digest_of("mirror/app:v1").as_deref(), Some(index_digest.as_str()), "both tags, one index");
    assert!(stdout.contains(&format!("index {index_digest}")), "the CLI prints the index digest: {stdout}");

    let scratch = dir.join("scratch");
    for m in &manifests {
        let digest = m["digest"].as_str().unwrap();
        let arch = m["platform"]["architecture"].as_str().unwrap();
        let (uname, mapped, platform) = match arch {
            "amd64" => ("x86_64", "amd64", "linux/amd64"),
            "arm64" => ("aarch64", "aarch64", "linux/arm64"),
            "arm" => ("armv7l", "arm", "linux/arm/v7"),
            other => panic!("unexpected architecture {other}"),
        };
        // Read from the second repository too: the manifests were copied there.
        for repo in ["demo/app", "mirror/app"] {
            assert_eq!(registry.read_file(repo, digest, "arch", &scratch).unwrap().trim(), uname, "{repo} {arch}");
        }
        assert_eq!(registry.read_file("demo/app", digest, "mapped", &scratch).unwrap().trim(), mapped);
        assert_eq!(registry.read_file("demo/app", digest, "platform", &scratch).unwrap().trim(), platform);
        assert_eq!(registry.read_file("demo/app", digest, "greeting", &scratch).unwrap().trim(), "hello-braid");
        assert_eq!(registry.read_file("demo/app", digest, "message.txt", &scratch).unwrap(), "from the context\n");
        let config = registry.manifest(&format!("demo/app@{digest}")).unwrap();
        assert_eq!(config["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    }

    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    assert_eq!(meta["containerimage.digest"], index_digest.as_str());
    assert_eq!(meta["containerimage.descriptor"]["digest"], index_digest.as_str());
    assert_eq!(meta["containerimage.descriptor"]["mediaType"], "application/vnd.oci.image.index.v1+json");
    assert_eq!(meta["image.name"], format!("{tag1},{tag2}"));
    for (platform, agent) in
        [("linux/amd64", "amd64-agent"), ("linux/arm64", "arm64-agent"), ("linux/arm/v7", "armv7-agent")]
    {
        assert_eq!(meta["braid.platforms"][platform]["agent"], agent, "{platform} built by its own agent");
        assert!(meta["braid.platforms"][platform]["digest"].as_str().unwrap().starts_with("sha256:"));
    }

    // --- The same context again: nothing uploaded.
    let again =
        farm.braid(&["build", "--platform", "linux/amd64", ctx.to_str().unwrap(), "--target", "final"]).unwrap();
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(stderr(&again).contains("nothing uploaded"), "{}", stderr(&again));

    // --- A failing RUN on one platform: the build fails, names it, writes no tag.
    let bad = dir.join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("Dockerfile"), FAILING.replace("BASE", &base)).unwrap();
    let fail_tag = format!("{}/demo/failing:1", registry.addr);
    let out = farm
        .braid(&[
            "build",
            "--platform",
            "linux/amd64,linux/arm64,linux/arm/v7",
            "-t",
            &fail_tag,
            "--push",
            bad.to_str().unwrap(),
        ])
        .unwrap();
    let err = stderr(&out);
    assert!(!out.status.success(), "a failing RUN fails the build");
    assert!(err.contains("failed: linux/arm64:"), "the error names the platform: {err}");
    assert!(err.contains("exit status 3"), "the error carries the builder's message: {err}");
    assert!(registry.manifest("demo/failing:1").is_none(), "no tag is written for a failed build");

    // --- A platform no agent ever declared is refused at once, naming it.
    let out = farm.braid(&["build", "--platform", "linux/riscv64", ctx.to_str().unwrap()]).unwrap();
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains("platform linux/riscv64: no agent has ever declared it"), "{err}");
    assert!(err.contains("the farm has linux/amd64") && err.contains("linux/arm64"), "{err}");

    // --- A platform whose agents take nothing (cordoned): the build waits,
    // says so, and can be cancelled.
    assert!(farm.braid(&["cordon", "armv7-agent"]).unwrap().status.success());
    let (mut child, lines) = farm
        .braid_spawn(&[
            "build",
            "--platform",
            "linux/arm/v7",
            "-t",
            &format!("{}/demo/riscv:1", registry.addr),
            "--push",
            ctx.to_str().unwrap(),
        ])
        .unwrap();
    let mut build_id = None;
    let mut waiting = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline && !(waiting && build_id.is_some()) {
        if let Ok(line) = lines.recv_timeout(Duration::from_secs(1)) {
            if let Some(rest) = line.strip_prefix("#2 build ") {
                build_id = rest.split_whitespace().next().map(str::to_owned);
            }
            waiting |= line
                .contains("waiting for an agent for linux/arm/v7: 1 agent is known for it: armv7-agent (connected)");
        }
    }
    assert!(waiting, "the build says it waits for an agent for linux/arm/v7");
    let build_id = build_id.expect("the CLI printed the build id");
    let cancel = farm.braid(&["cancel", &build_id]).unwrap();
    assert!(cancel.status.success(), "{}", stderr(&cancel));
    let status = braid_tests::eventually(Duration::from_secs(30), "the build command to exit", || {
        child.try_wait().ok().flatten()
    })
    .unwrap();
    assert!(!status.success(), "a cancelled build exits non-zero");
    let rest: Vec<String> = lines.try_iter().collect();
    assert!(rest.iter().any(|l| l.contains("was cancelled")), "{rest:?}");
    assert!(registry.manifest("demo/riscv:1").is_none());
    assert!(farm.braid(&["uncordon", "armv7-agent"]).unwrap().status.success());
}
