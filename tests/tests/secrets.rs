//! `--secret` through the real binaries: a `RUN --mount=type=secret` step
//! sees the value on a buildah agent and on a Docker Engine agent (the
//! Engine's BuildKit, driven through the docker CLI), and the value is
//! nowhere else: not in the coordinator's data dir, a log, `braid inspect`,
//! `braid logs`, /metrics or the image. A restarted coordinator gets the
//! values again from the `braid build` that follows the build; a detached
//! build whose values are lost fails saying so.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use braid_tests::{
    AgentSpec, DockerEngine, Farm, Registry, RunningBuild, dockerfile_context, eventually, output_text,
    require_environment,
};

const FILE_VALUE: &str = "braid-test-secret-from-a-file-7d1c";
const ENV_VALUE: &str = "braid-test-secret-from-the-env-42af";

fn sha256_hex(bytes: &[u8]) -> String {
    braid_shared::Digest::of(bytes).hex().to_owned()
}

/// A tmpfs directory of this test's own, made the agents' `XDG_RUNTIME_DIR`,
/// so their secrets directories are where the test can look.
struct RuntimeDir(PathBuf);

impl RuntimeDir {
    fn new() -> RuntimeDir {
        let dir = Path::new("/dev/shm").join(format!("braid-secrets-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        RuntimeDir(dir)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }

    /// Every file under it (the agents' per-job secrets).
    fn files(&self) -> Vec<PathBuf> {
        let out = std::process::Command::new("find").arg(&self.0).args(["-type", "f"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).lines().map(PathBuf::from).collect()
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Paths of the files under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &str) -> Vec<String> {
    let out = std::process::Command::new("grep").args(["-rlaF", needle]).arg(dir).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
}

/// Whether any blob of an image (decompressed) holds `needle`.
fn image_holds(registry: &Registry, repository: &str, digest: &str, scratch: &Path, needle: &str) -> bool {
    registry.list_files(repository, digest, scratch).unwrap();
    let dir = scratch.join(digest.replace(':', "-"));
    std::fs::read_dir(&dir).unwrap().flatten().any(|blob| {
        let out = std::process::Command::new("zcat").arg("-f").arg(blob.path()).output().unwrap();
        out.stdout.windows(needle.len()).any(|w| w == needle.as_bytes())
    })
}

const MOUNTS: &str = "RUN --mount=type=secret,id=tok sha256sum /run/secrets/tok | cut -d' ' -f1 > /tok.sum && sleep 2\n\
    RUN --mount=type=secret,id=tok2,target=/tok2 sha256sum /tok2 | cut -d' ' -f1 > /tok2.sum\n\
    RUN --mount=type=secret,id=absent (cat /run/secrets/absent 2>/dev/null || echo none) > /absent\n";

#[test]
fn a_secret_reaches_run_steps_on_buildah_and_the_engine_and_nothing_else() {
    require_environment();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let runtime = RuntimeDir::new();
    let registry = Registry::start(&dir.join("registry")).unwrap();
    let base = registry.push_base_image("base/busybox:latest").unwrap();
    let engine = DockerEngine::start(&dir.join("docker")).unwrap();
    let agents = [
        AgentSpec::new("buildah-amd64", &[]).env("XDG_RUNTIME_DIR", runtime.path()),
        AgentSpec::new("docker-arm64", &["linux/arm64"])
            .backend("docker")
            .flag("--docker-host", &engine.host)
            .flag("--docker-cli", "/usr/bin/docker")
            .env("XDG_RUNTIME_DIR", runtime.path()),
    ];
    let farm = Farm::start(dir, &registry, &agents).unwrap();
    farm.wait_for_agents(2).unwrap();
    let secret_file = dir.join("tok.txt");
    std::fs::write(&secret_file, FILE_VALUE).unwrap();
    let src = format!("id=tok,src={}", secret_file.display());

    let ctx = dockerfile_context(dir, "ctx", &format!("FROM {base}\n{MOUNTS}"));
    let tag = format!("{}/secrets/app:1", registry.addr);
    let args = [
        "build",
        "--platform",
        "linux/amd64,linux/arm64",
        "-t",
        &tag,
        "--push",
        "--progress",
        "plain",
        "--secret",
        &src,
        "--secret",
        "id=tok2,env=BRAID_TEST_TOK2",
        &ctx,
    ];
    let (child, _) = {
        let mut cmd = std::process::Command::new(braid_tests::bin("braid"));
        cmd.arg("--coordinator").arg(&farm.url).args(args).env("BRAID_TEST_TOK2", ENV_VALUE);
        cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
        (cmd.spawn().unwrap(), ())
    };
    // Mid-build: each job's values are 0600 files on the tmpfs.
    let during = eventually(Duration::from_secs(120), "a job's secret files", || {
        let files = runtime.files().into_iter().filter(|f| f.to_string_lossy().contains("secret-")).collect::<Vec<_>>();
        (!files.is_empty()).then_some(files)
    })
    .unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    for f in &during {
        if let Ok(meta) = std::fs::metadata(f) {
            assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{}", f.display());
        }
    }
    let out = child.wait_with_output().unwrap();
    let said = output_text(&out);
    assert!(out.status.success(), "{said}");

    let index = registry.manifest("secrets/app:1").unwrap();
    let seen =
        registry.per_platform("secrets/app", &index, &["tok.sum", "tok2.sum", "absent"], &dir.join("s")).unwrap();
    let (a, b) = (sha256_hex(FILE_VALUE.as_bytes()), sha256_hex(ENV_VALUE.as_bytes()));
    assert_eq!(seen, [format!("amd64 {a} {b} none"), format!("arm64 {a} {b} none")], "buildah, then the Engine");
    assert_eq!(runtime.files(), Vec::<PathBuf>::new(), "every job's secrets directory went with the job");

    // Nowhere else.
    let build_id = said.lines().find_map(|l| l.strip_prefix("#2 build ")?.split_whitespace().next()).unwrap();
    let inspect = output_text(&farm.braid(&["inspect", build_id, "--format", "json"]).unwrap());
    assert!(inspect.contains(build_id), "{inspect}");
    let logs = output_text(&farm.braid(&["logs", build_id, "--format", "json"]).unwrap());
    let metrics = std::process::Command::new("curl").args(["-fsS", &format!("http://{}/metrics", farm.http)]).output();
    let metrics = String::from_utf8_lossy(&metrics.unwrap().stdout).into_owned();
    let dashboard = std::process::Command::new("curl").args(["-fsS", &format!("http://{}/", farm.http)]).output();
    let dashboard = String::from_utf8_lossy(&dashboard.unwrap().stdout).into_owned();
    for value in [FILE_VALUE, ENV_VALUE] {
        for (what, text) in [("build output", &said), ("inspect", &inspect), ("logs", &logs), ("metrics", &metrics)] {
            assert!(!text.contains(value), "the value is in the {what}");
        }
        assert!(!dashboard.contains(value), "the value is on the dashboard");
        for place in ["coordinator", "buildah-amd64", "docker-arm64", "docker"] {
            let held = files_containing(&dir.join(place), value);
            assert!(held.is_empty(), "{place}'s directory holds the value: {held:?}");
        }
        for log in ["coordinator.log", "buildah-amd64.log", "docker-arm64.log"] {
            assert!(!farm.log(log.trim_end_matches(".log")).contains(value), "the value is in {log}");
        }
        for m in &braid_tests::platform_manifests(&index) {
            let digest = m["digest"].as_str().unwrap();
            assert!(!image_holds(&registry, "secrets/app", digest, &dir.join("s2"), value), "the image holds it");
        }
    }

    // required=true with no --secret fails, as BuildKit fails it, on both.
    let ctx = dockerfile_context(
        dir,
        "required",
        &format!("FROM {base}\nRUN --mount=type=secret,id=needed,required=true cat /run/secrets/needed\n"),
    );
    for platform in ["linux/amd64", "linux/arm64"] {
        let out = farm.braid(&["build", "--platform", platform, &ctx]).unwrap();
        assert!(!out.status.success(), "{platform}: a required secret that is absent fails the build");
        let err = output_text(&out);
        assert!(err.contains("needed"), "{platform}: the failure names the secret: {err}");
    }
}

#[test]
fn secrets_are_refused_by_name_before_upload() {
    require_environment();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let registry = Registry::start(&dir.join("registry")).unwrap();
    let farm = Farm::start(dir, &registry, &[]).unwrap();
    let ctx = dockerfile_context(dir, "ctx", "FROM scratch\n");
    let big = dir.join("big");
    std::fs::write(&big, vec![b'x'; (500 << 10) + 1]).unwrap();
    let big = format!("id=big,src={}", big.display());
    let many: Vec<String> = (0..65).flat_map(|i| ["--secret".to_owned(), format!("id=s{i},env=HOME")]).collect();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--secret".into(), "src=/etc/hostname".into()], "no id"),
        (vec!["--secret".into(), "id=a,mode=0400".into()], "unexpected key \"mode\""),
        (vec!["--secret".into(), "id=a,src=/etc/hostname,env=HOME".into()], "both a file"),
        (vec!["--secret".into(), "id=a,type=ssh".into()], "unsupported secret type \"ssh\""),
        (vec!["--secret".into(), "id=a b".into()], "--secret id \"a b\""),
        (vec!["--secret".into(), "id=a,env=BRAID_TEST_UNSET_VAR".into()], "variable BRAID_TEST_UNSET_VAR is not set"),
        (vec!["--secret".into(), "id=nofile,src=/nonexistent/x".into()], "--secret id=nofile: reading"),
        (vec!["--secret".into(), big], "--secret id=big: larger than the limit of 500 KiB"),
        (many, "more than the limit of 64 secrets"),
    ];
    for (flags, says) in cases {
        let mut args = vec!["build"];
        args.extend(flags.iter().map(String::as_str));
        args.push(&ctx);
        let out = farm.braid(&args).unwrap();
        let err = output_text(&out);
        assert!(!out.status.success() && err.contains(says), "{flags:?}: {err}");
        assert!(!err.contains("#1 context"), "refused before upload: {err}");
    }
}

#[test]
fn a_restarted_coordinator_gets_the_values_again_and_a_detached_build_fails_saying_so() {
    require_environment();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let registry = Registry::start(&dir.join("registry")).unwrap();
    let base = registry.push_base_image("base/busybox:latest").unwrap();
    let mut farm =
        Farm::start_with(dir, Some(&registry.addr), &[AgentSpec::new("amd", &[])], &["--secrets-grace", "10"]).unwrap();
    farm.wait_for_agents(1).unwrap();
    let secret_file = dir.join("tok.txt");
    std::fs::write(&secret_file, FILE_VALUE).unwrap();
    let src = format!("id=tok,src={}", secret_file.display());

    // A build that keeps the only agent busy, so the next two wait in the queue.
    let busy = dockerfile_context(dir, "busy", &format!("FROM {base}\nRUN echo started && sleep 12\n"));
    let mut blocker = RunningBuild::start(&farm, &["build", "--platform", "linux/amd64", "--progress", "plain", &busy]);
    blocker.wait_for("started", Duration::from_secs(120));
    let ctx = dockerfile_context(
        dir,
        "ctx",
        &format!("FROM {base}\nRUN --mount=type=secret,id=tok,required=true sha256sum /run/secrets/tok > /tok.sum\n"),
    );
    let tag = format!("{}/secrets/restart:1", registry.addr);
    let mut followed = RunningBuild::start(
        &farm,
        &["build", "--platform", "linux/amd64", "-t", &tag, "--push", "--secret", &src, "--progress", "plain", &ctx],
    );
    followed.build_id();
    let out = farm.braid(&["build", "--platform", "linux/amd64", "--detach", "--secret", &src, &ctx]).unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    let detached = String::from_utf8_lossy(&out.stdout).trim().to_owned();

    farm.crash_coordinator();
    farm.start_coordinator().unwrap();

    let (code, said) = followed.finish(Duration::from_secs(180));
    assert_eq!(code, Some(0), "the followed build succeeds with the values sent again: {said}");
    let index = registry.manifest("secrets/restart:1").unwrap();
    let digest = index["manifests"][0]["digest"].as_str().unwrap();
    let sum = registry.read_file("secrets/restart", digest, "tok.sum", &dir.join("s")).unwrap();
    assert!(sum.starts_with(&sha256_hex(FILE_VALUE.as_bytes())), "{sum}");
    assert!(blocker.finish(Duration::from_secs(120)).0 == Some(0));

    let failed = eventually(Duration::from_secs(60), "the detached build to fail", || {
        let out = farm.braid(&["inspect", &detached]).unwrap();
        let text = output_text(&out);
        text.contains("failed").then_some(text)
    })
    .unwrap();
    assert!(
        failed.contains("--secret values (tok) were lost when the coordinator restarted")
            && failed.contains("submit the build again"),
        "{failed}"
    );
    assert!(files_containing(&dir.join("coordinator"), FILE_VALUE).is_empty(), "never in the data dir");
}
