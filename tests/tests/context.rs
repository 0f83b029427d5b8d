//! The build context end to end: filtered exactly like Docker, sent once,
//! reused on resubmission, and one upload for a five-platform build.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use braid_tests::{AgentSpec, Farm, Registry, require_environment};

fn write(root: &Path, path: &str, contents: &str) {
    let p = root.join(path);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, contents).unwrap();
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The files under `ctx/` in the one image a single-platform build pushed.
fn image_files(registry: &Registry, repo: &str, scratch: &Path) -> Vec<String> {
    let index = registry.manifest(&format!("{repo}:1")).expect("index pushed");
    let digest = index["manifests"][0]["digest"].as_str().unwrap().to_owned();
    registry
        .list_files(repo, &digest, scratch)
        .unwrap()
        .into_iter()
        .filter_map(|f| f.strip_prefix("ctx/").map(str::to_owned))
        .collect()
}

#[test]
fn context_is_filtered_like_docker_and_sent_once() {
    require_environment();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let registry = Registry::start(&dir.join("registry")).unwrap();
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
    let scratch = dir.join("scratch");
    let reg = &registry.addr;

    // --- .dockerignore with exceptions; the Dockerfile itself is ignored but still used.
    let ctx = dir.join("ctx");
    write(&ctx, "Dockerfile", "FROM scratch\nCOPY . /ctx/\n");
    write(
        &ctx,
        ".dockerignore",
        "# comment\n*.log\nsecrets/\n!secrets/public.txt\n**/*.tmp\ndocs\n!docs/README.md\nDockerfile\n",
    );
    for f in [
        "keep.txt",
        "app.log",
        "sub/deep/x.tmp",
        "sub/deep/y.txt",
        "secrets/key.pem",
        "secrets/public.txt",
        "docs/a.md",
        "docs/README.md",
        "x.tmp",
    ] {
        write(&ctx, f, f);
    }
    let uploads_before = farm.metric("braid_context_uploads_total");
    let out = farm
        .braid(&[
            "build",
            "--platform",
            "linux/amd64",
            "-t",
            &format!("{reg}/ctx/filtered:1"),
            "--push",
            "--progress",
            "plain",
            ctx.to_str().unwrap(),
        ])
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        image_files(&registry, "ctx/filtered", &scratch),
        [".dockerignore", "docs/README.md", "keep.txt", "secrets/public.txt", "sub/deep/y.txt"],
        "exactly what Docker would send"
    );
    assert_eq!(farm.metric("braid_context_uploads_total"), uploads_before + 1.0);
    let bytes = farm.metric("braid_context_bytes_received_total");
    assert!(bytes > 0.0);

    // --- The same context again, for another tag: no context bytes move.
    let out = farm
        .braid(&[
            "build",
            "--platform",
            "linux/amd64",
            "-t",
            &format!("{reg}/ctx/again:1"),
            "--push",
            ctx.to_str().unwrap(),
        ])
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("nothing uploaded"), "{}", stderr(&out));
    assert_eq!(farm.metric("braid_context_bytes_received_total"), bytes, "resubmission transfers no context bytes");
    assert_eq!(farm.metric("braid_context_uploads_total"), uploads_before + 1.0);

    // --- A Dockerfile-specific ignore file wins over the context's.
    write(&ctx, "build/app.Dockerfile", "FROM scratch\nCOPY . /ctx/\n");
    write(&ctx, "build/app.Dockerfile.dockerignore", "keep.txt\nsecrets\ndocs\nsub\nbuild\n*.tmp\n.dockerignore\n");
    let out = farm
        .braid(&[
            "build",
            "--platform",
            "linux/amd64",
            "-f",
            ctx.join("build/app.Dockerfile").to_str().unwrap(),
            "-t",
            &format!("{reg}/ctx/specific:1"),
            "--push",
            ctx.to_str().unwrap(),
        ])
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(image_files(&registry, "ctx/specific", &scratch), ["Dockerfile", "app.log"]);

    // --- A Dockerfile outside the context, and a context tar on stdin.
    let outside = dir.join("outside.Dockerfile");
    std::fs::write(&outside, "FROM scratch\nCOPY keep.txt /ctx/\n").unwrap();
    let out = farm
        .braid(&[
            "build",
            "--platform",
            "linux/amd64",
            "-f",
            outside.to_str().unwrap(),
            "-t",
            &format!("{reg}/ctx/outside:1"),
            "--push",
            ctx.to_str().unwrap(),
        ])
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(image_files(&registry, "ctx/outside", &scratch), ["keep.txt"]);

    let stdin_ctx = dir.join("stdin-ctx");
    write(&stdin_ctx, "Dockerfile", "FROM scratch\nCOPY . /ctx/\n");
    write(&stdin_ctx, "from-stdin.txt", "hello");
    write(&stdin_ctx, ".dockerignore", "ignored.txt\n");
    write(&stdin_ctx, "ignored.txt", "no");
    let tar =
        std::process::Command::new("tar").arg("-C").arg(&stdin_ctx).args(["-cf", "-", "."]).output().unwrap().stdout;
    let out = farm
        .braid_with_stdin(
            &["build", "--platform", "linux/amd64", "-t", &format!("{reg}/ctx/stdin:1"), "--push", "-"],
            tar,
        )
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(image_files(&registry, "ctx/stdin", &scratch), [".dockerignore", "Dockerfile", "from-stdin.txt"]);

    // --- A Dockerfile on stdin (-f -) with a directory context.
    let out = farm
        .braid_with_stdin(
            &[
                "build",
                "--platform",
                "linux/amd64",
                "-f",
                "-",
                "-t",
                &format!("{reg}/ctx/stdin-dockerfile:1"),
                "--push",
                ctx.to_str().unwrap(),
            ],
            b"FROM scratch\nCOPY keep.txt /ctx/from-stdin-dockerfile.txt\n".to_vec(),
        )
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(image_files(&registry, "ctx/stdin-dockerfile", &scratch), ["from-stdin-dockerfile.txt"]);

    // --- Five platforms over three agents: the context is uploaded once and
    // fetched once per agent.
    let five = dir.join("five");
    write(&five, "Dockerfile", "FROM scratch\nCOPY five.txt /five.txt\n");
    write(&five, "five.txt", "five platforms");
    let uploads = farm.metric("braid_context_uploads_total");
    let fetches = farm.metric("braid_context_fetches_total");
    let out = farm
        .braid(&[
            "build",
            "--platform",
            "linux/amd64,linux/386,linux/arm64,linux/arm/v7,linux/arm/v6",
            "-t",
            &format!("{reg}/ctx/five:1"),
            "--push",
            five.to_str().unwrap(),
        ])
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(farm.metric("braid_context_uploads_total"), uploads + 1.0, "one upload for five platforms");
    assert_eq!(
        farm.metric("braid_context_fetches_total"),
        fetches + 3.0,
        "one fetch per agent, whatever its job count"
    );
    let index = registry.manifest("ctx/five:1").unwrap();
    assert_eq!(braid_tests::platform_manifests(&index).len(), 5);
}
