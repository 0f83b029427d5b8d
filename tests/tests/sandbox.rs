//! The context sandbox end to end, on a buildah agent and a Docker Engine
//! agent: hostile contexts (links that lead out of the job directory, each
//! one lexically inside) are refused with the entry named, and no file
//! outside the job directory is read, created or changed; contexts with
//! links inside still build.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use braid_shared::proto::{self, builds_client::BuildsClient};
use braid_tests::{AgentSpec, DockerEngine, Farm, Registry, eventually, require_environment};

/// The buildah agent builds amd64, the Engine agent arm64: a build's
/// platform picks its backend.
const BACKENDS: [(&str, &str); 2] = [("buildah", "linux/amd64"), ("docker", "linux/arm64")];

/// A Dockerfile that would build, from the context below, if the agent
/// took it from outside the job directory.
const CANARY_DOCKERFILE: &str = "FROM scratch\nCOPY marker /canary-was-used\n";

/// Every file under `dir` with its contents and mtime.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (Vec<u8>, std::time::SystemTime)> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        files.insert(path.clone(), (std::fs::read(&path).unwrap_or_default(), meta.modified().unwrap()));
    }
    files
}

/// A tar holding `entries`: (path, link target or none for a file, hard link?).
fn tar_of(entries: &[(&str, Option<&str>, bool)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, link, hard) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        match link {
            None => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(6);
                b.append_data(&mut h, path, &b"marker"[..]).unwrap();
            }
            Some(target) => {
                h.set_entry_type(if *hard { tar::EntryType::Link } else { tar::EntryType::Symlink });
                h.set_size(0);
                b.append_link(&mut h, path, target).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

/// `l0 -> .`, `l1 -> l0/..`, ... `l6 -> l5/..`: each lexically inside the
/// context, `l4` physically the farm's directory (context, job, jobs,
/// agent work dir, farm dir).
fn chain() -> Vec<(String, Option<String>, bool)> {
    let mut entries = vec![("l0".to_owned(), Some(".".to_owned()), false)];
    for i in 1..7 {
        entries.push((format!("l{i}"), Some(format!("l{}/..", i - 1)), false));
    }
    entries
}

fn as_refs(entries: &[(String, Option<String>, bool)]) -> Vec<(&str, Option<&str>, bool)> {
    entries.iter().map(|(p, l, h)| (p.as_str(), l.as_deref(), *h)).collect()
}

type Client = BuildsClient<tonic::transport::Channel>;

/// Uploads `tar` as a context and submits a build of it; its id.
async fn submit_tar(client: &mut Client, tar: Vec<u8>, platform: &str, dockerfile_path: &str) -> String {
    let digest = braid_shared::Digest::of(&tar).to_string();
    let chunk = zstd::encode_all(&tar[..], 3).unwrap();
    client
        .put_context(tokio_stream::iter(vec![proto::PutContextRequest { digest: digest.clone(), chunk }]))
        .await
        .unwrap();
    let spec = proto::BuildSpec {
        platforms: vec![platform.into()],
        context_digest: digest,
        dockerfile_path: dockerfile_path.into(),
        ..Default::default()
    };
    client
        .submit(proto::SubmitRequest { spec: Some(spec), credentials: vec![], secrets: vec![] })
        .await
        .unwrap()
        .into_inner()
        .build_id
}

/// Polls build `id` until `done` says so (at most five minutes).
async fn wait_build(client: &mut Client, id: &str, done: impl Fn(&proto::Build) -> bool) -> proto::Build {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let build = client.get(proto::GetBuildRequest { build_id: id.to_owned() }).await.unwrap().into_inner();
        if done(&build) {
            return build;
        }
        assert!(Instant::now() < deadline, "build {id} did not get there: {build:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn ended(build: &proto::Build) -> bool {
    [proto::BuildState::Succeeded, proto::BuildState::Failed, proto::BuildState::Cancelled]
        .iter()
        .any(|s| *s as i32 == build.state)
}

/// Submits a build of `tar` and waits for it to end.
async fn build_tar(client: &mut Client, tar: Vec<u8>, platform: &str, dockerfile_path: &str) -> proto::Build {
    let id = submit_tar(client, tar, platform, dockerfile_path).await;
    wait_build(client, &id, ended).await
}

/// The one job's failure message of a failed build.
fn failure(build: &proto::Build) -> String {
    assert_eq!(build.state, proto::BuildState::Failed as i32, "{build:?}");
    build.jobs[0].message.clone()
}

#[test]
fn hostile_contexts_never_reach_outside_the_job_directory() {
    require_environment();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let registry = Registry::start(&dir.join("registry")).unwrap();
    let engine = DockerEngine::start(&dir.join("docker")).unwrap();
    let agents = [
        AgentSpec::new("buildah", &["linux/amd64"]),
        AgentSpec::new("docker", &["linux/arm64"])
            .backend("docker")
            .flag("--docker-host", &engine.host)
            .flag("--docker-cli", "/usr/bin/docker"),
    ];
    let farm = Farm::start(dir, &registry, &agents).unwrap();
    farm.wait_for_agents(2).unwrap();

    // Canaries beside the agents' work directories, where `l4` leads.
    let canary = dir.join("canary");
    std::fs::create_dir_all(&canary).unwrap();
    std::fs::write(canary.join("evil.Dockerfile"), CANARY_DOCKERFILE).unwrap();
    std::fs::write(canary.join("existing"), "keep me\n").unwrap();
    let before = snapshot(&canary);
    let untouched = |case: &str| {
        assert_eq!(snapshot(&canary), before, "{case}: a file outside the job directory was created or changed");
    };

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let mut client = BuildsClient::connect(farm.url.clone()).await.unwrap();
        for (backend, platform) in BACKENDS {
            // The chain, and a Dockerfile path through it to a host file
            // that is a Dockerfile this context would build.
            let mut entries = chain();
            entries.push(("marker".into(), None, false));
            let tar = tar_of(&as_refs(&entries));
            let build = build_tar(&mut client, tar.clone(), platform, "l4/canary/evil.Dockerfile").await;
            let message = failure(&build);
            assert!(message.contains("refused context entry \"l1\": symlink leads out"), "{backend}: {message}");
            untouched(backend);
            // A missing host file answers exactly as an existing one.
            let mut missing = entries.clone();
            missing.push(("other".into(), None, false));
            let build = build_tar(&mut client, tar_of(&as_refs(&missing)), platform, "l4/canary/missing").await;
            assert_eq!(failure(&build), message, "{backend}: the answer depends on the context alone");

            // A hard link to the chain's end.
            let mut hard = chain();
            hard.push(("h".into(), Some("l6".into()), true));
            let build = build_tar(&mut client, tar_of(&as_refs(&hard)), platform, "h/tmp/x").await;
            let message = failure(&build);
            assert!(message.contains("refused context entry \"h\": hard link to a symlink"), "{backend}: {message}");

            // Order-dependent: `a -> x/..` is lexically `.` while `x` is
            // missing; `x -> .` then makes `a` the job directory.
            let tar = tar_of(&[("a", Some("x/.."), false), ("x", Some("."), false), ("marker", None, false)]);
            let build = build_tar(&mut client, tar, platform, "a/a/a/a/canary/evil.Dockerfile").await;
            let message = failure(&build);
            assert!(message.contains("refused context entry \"a\": symlink leads out"), "{backend}: {message}");

            // A directory re-sent as a link out, then a file through it.
            let tar = tar_of(&[("d/f", None, false), ("d", Some("."), false)]);
            let build = build_tar(&mut client, tar, platform, "d/f").await;
            let message = failure(&build);
            assert!(message.contains("refused context entry \"d\": a symlink replaces a directory"), "{message}");

            // Inside the context, a missing Dockerfile and a directory.
            let tar = tar_of(&[("sub/f", None, false)]);
            let build = build_tar(&mut client, tar.clone(), platform, "nothing/Dockerfile").await;
            let message = failure(&build);
            assert!(message.contains("Dockerfile \"nothing/Dockerfile\" not found in the context"), "{message}");
            let build = build_tar(&mut client, tar, platform, "sub").await;
            let message = failure(&build);
            assert!(message.contains("Dockerfile \"sub\" refused: it is not a regular file"), "{message}");
            untouched(backend);

            // Cancelled as soon as it is assigned: the agent keeps no job
            // directory (checked for every job at the end).
            for i in 0..3 {
                let tar = tar_of(&[(&format!("cancel-{i}"), None, false), ("Dockerfile", None, false)]);
                let id = submit_tar(&mut client, tar, platform, "Dockerfile").await;
                let pending = proto::JobState::Pending as i32;
                wait_build(&mut client, &id, |b| ended(b) || b.jobs.iter().any(|j| j.state > pending)).await;
                // It may have failed already ("marker" is no Dockerfile).
                let _ = client.cancel(proto::CancelBuildRequest { build_id: id.clone() }).await;
                wait_build(&mut client, &id, ended).await;
            }
        }
    });

    // Through the CLI, a directory context whose links are packed as they
    // are: the agent's own files in the context lead out, the Dockerfile
    // comes from stdin.
    let hostile = dir.join("hostile-ctx");
    std::fs::create_dir_all(&hostile).unwrap();
    std::fs::write(hostile.join("marker"), "marker").unwrap();
    symlink(".", hostile.join("l0")).unwrap();
    for i in 1..7 {
        symlink(format!("l{}/..", i - 1), hostile.join(format!("l{i}"))).unwrap();
    }
    symlink("l4/canary/x", hostile.join(".braid-inline.Dockerfile")).unwrap();
    symlink("l4/canary/existing", hostile.join(".dockerignore")).unwrap();
    for (backend, platform) in BACKENDS {
        let out = farm
            .braid_with_stdin(
                &["build", "--platform", platform, "-f", "-", hostile.to_str().unwrap()],
                b"FROM scratch\nCOPY marker /m\n".to_vec(),
            )
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{backend}: {stderr}");
        // Entries come sorted: the agent's own file name is the first link.
        let named = "refused context entry \".braid-inline.Dockerfile\": symlink leads out of the context";
        assert!(stderr.contains(named), "{backend}: {stderr}");
        untouched(backend);
        assert!(!canary.join("x").exists(), "{backend}: the inline Dockerfile was written through its link");
    }

    // Links inside still build, on both backends: a link to a file in a
    // directory, a link to a directory, and a `.dockerignore` that is a link
    // (the Engine agent replaces it, never writing through it).
    let fine = dir.join("fine-ctx");
    std::fs::create_dir_all(fine.join("sub")).unwrap();
    std::fs::create_dir_all(fine.join("rules")).unwrap();
    std::fs::write(fine.join("sub/file"), "inside\n").unwrap();
    std::fs::write(fine.join("rules/ignore"), "secret.txt\n").unwrap();
    std::fs::write(fine.join("secret.txt"), "no\n").unwrap();
    symlink("sub/file", fine.join("to-file")).unwrap();
    symlink("sub", fine.join("to-dir")).unwrap();
    symlink("rules/ignore", fine.join(".dockerignore")).unwrap();
    for (backend, platform) in BACKENDS {
        let tag = format!("{}/sandbox/{backend}:1", registry.addr);
        let out = farm
            .braid_with_stdin(
                &["build", "--platform", platform, "-t", &tag, "--push", "-f", "-", fine.to_str().unwrap()],
                b"FROM scratch\nCOPY . /ctx/\nCOPY to-dir/file /via-dir\n".to_vec(),
            )
            .unwrap();
        assert!(out.status.success(), "{backend}: {}", String::from_utf8_lossy(&out.stderr));
        let index = registry.manifest(&format!("sandbox/{backend}:1")).unwrap();
        let digest = index["manifests"][0]["digest"].as_str().unwrap();
        let scratch = dir.join(format!("scratch-{backend}"));
        let repo = format!("sandbox/{backend}");
        assert_eq!(registry.read_file(&repo, digest, "via-dir", &scratch).unwrap(), "inside\n", "{backend}");
        let rules = registry.read_file(&repo, digest, "ctx/rules/ignore", &scratch).unwrap();
        assert_eq!(rules, "secret.txt\n", "{backend}: the link's target is left as it was");
        let files = registry.list_files(&repo, digest, &scratch).unwrap();
        assert!(!files.iter().any(|f| f.contains("secret.txt") || f.contains("braid-inline")), "{backend}: {files:?}");
    }
    untouched("the builds that succeed");
    assert_eq!(std::fs::read_to_string(fine.join("rules/ignore")).unwrap(), "secret.txt\n");

    // No job left a directory behind, on either agent.
    for (backend, _) in BACKENDS {
        let jobs = dir.join(backend).join("jobs");
        eventually(Duration::from_secs(30), "the job directories to be removed", || {
            let left = std::fs::read_dir(&jobs).map(|d| d.count()).unwrap_or(0);
            (left == 0).then_some(())
        })
        .unwrap();
    }
}
