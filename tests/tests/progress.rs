//! `braid build --progress` and what a failed build says, through the real
//! binaries, on a farm with a buildah agent (linux/amd64) and a Docker
//! Engine agent driving its BuildKit (linux/arm64): the live view under a
//! real pseudo-terminal (`script` from util-linux), plain's step times,
//! rawjson's events, a failed step's Dockerfile lines said once (buildah
//! and BuildKit numbering), the automatic platform ARGs without buildah's
//! "not consumed" warning, and closed pipes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use braid_tests::{AgentSpec, DockerEngine, Farm, Registry, bin, dockerfile_context, require, require_environment};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Lines 1-12; the failing RUN is line 11, after a continuation and a
/// comment, in the second stage.
const FAILING: &str = "ARG BASE=BASE_IMAGE
FROM $BASE AS first
ARG TARGETARCH
RUN echo one $TARGETARCH > /one

FROM $BASE
# build
RUN echo \\
  two
COPY --from=first /one /one
RUN echo failing; exit 2
RUN echo never
";

const EXCERPT: &str = "Dockerfile:11
--------------------
   9 |       two
  10 |     COPY --from=first /one /one
  11 | >>> RUN echo failing; exit 2
  12 |     RUN echo never
  13 |     
--------------------";

/// The ARGs reach RUN; a FROM line uses BUILDPLATFORM undeclared, as
/// BuildKit allows; 20000 lines of output (more than a pipe holds) for the pipes to close on.
const ARGS: &str = "FROM --platform=$BUILDPLATFORM BASE_IMAGE AS tools
RUN echo tools > /tools
FROM BASE_IMAGE
ARG TARGETARCH
ARG TARGETPLATFORM
COPY --from=tools /tools /tools
RUN echo \"arch=$TARGETARCH platform=$TARGETPLATFORM\" && seq 1 20000
";

fn farm(dir: &std::path::Path, registry: &Registry, engine: &DockerEngine) -> Farm {
    let agents = [
        AgentSpec::new("buildah-amd64", &[]),
        AgentSpec::new("docker-arm64", &["linux/arm64"])
            .backend("docker")
            .flag("--docker-host", &engine.host)
            .flag("--docker-cli", "/usr/bin/docker"),
    ];
    let farm = Farm::start(dir, registry, &agents).unwrap();
    farm.wait_for_agents(2).unwrap();
    farm
}

/// Runs `script` in bash (with pipefail): its exit status, stdout, stderr.
fn shell(script: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let mut cmd = Command::new("bash");
    cmd.arg("-c").arg(format!("set -o pipefail\n{script}")).arg("bash").args(args);
    let out = braid_tests::run_with_timeout(&mut cmd, Duration::from_secs(600)).unwrap();
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

#[test]
fn a_failed_step_shows_its_dockerfile_lines_once_and_pipes_close_quietly() {
    require_environment();
    require("script", "util-linux's script (Debian: bsdutils)");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let registry = Registry::start(&dir.join("registry")).unwrap();
    let base = registry.push_base_image("base/busybox:latest").unwrap();
    let engine = DockerEngine::start(&dir.join("docker")).unwrap();
    let farm = farm(dir, &registry, &engine);

    // --- buildah: the excerpt once, no message twice, no platform prefix
    // repeated; plain mode says each step's time.
    let failing = dockerfile_context(dir, "failing", &FAILING.replace("BASE_IMAGE", &base));
    let out = farm.braid(&["build", "--progress", "plain", "--platform", "linux/amd64", &failing]).unwrap();
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(EXCERPT), "the failing RUN's lines, as BuildKit shows them:\n{err}");
    assert_eq!(err.matches("Dockerfile:11").count(), 1, "{err}");
    assert_eq!(err.matches("subprocess exited with status 2").count(), 1, "buildah says it twice:\n{err}");
    assert_eq!(err.matches("building at STEP").count(), 1, "the message once, in the error:\n{err}");
    assert!(!err.contains("linux/amd64: linux/amd64"), "{err}");
    assert!(err.contains("#  linux/amd64 failed on buildah-amd64\n"), "{err}");
    assert!(err.contains("[linux/amd64] [stage-1 4/5] RUN echo failing; exit 2  ERROR "), "{err}");
    let excerpt_at = err.find(EXCERPT).unwrap();
    let error_at = err.find("error: build ").unwrap();
    assert!(excerpt_at < error_at, "the excerpt comes right before the error:\n{err}");
    assert!(
        err.contains("[linux/amd64] [stage-0 3/3] RUN echo one $TARGETARCH > /one  DONE "),
        "plain says a step's time when it ends:\n{err}"
    );
    let id = err.lines().find_map(|l| l.strip_prefix("#2 build ")).unwrap().split_whitespace().next().unwrap();

    // braid logs and braid inspect show the same excerpt.
    let logs = text(&farm.braid(&["logs", id]).unwrap().stdout);
    assert!(logs.contains(&format!("#  linux/amd64 failed on buildah-amd64: building at STEP \"RUN echo failing; exit 2\": exit status 2\n{EXCERPT}")), "{logs}");
    let inspect = text(&farm.braid(&["inspect", id]).unwrap().stdout);
    assert!(
        inspect.contains(&format!("linux/amd64 failed at [stage-1 4/5] RUN echo failing; exit 2\n{EXCERPT}")),
        "{inspect}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&farm.braid(&["inspect", id, "--format", "json"]).unwrap().stdout).unwrap();
    let step = &json["jobs"][0]["failed_step"];
    assert_eq!((step["line"].as_u64(), step["end_line"].as_u64()), (Some(11), Some(11)), "{json}");
    assert_eq!(step["dockerfile"], "Dockerfile");

    // --- BuildKit numbers its steps its own way; same lines.
    let out = farm.braid(&["build", "--progress", "plain", "--platform", "linux/arm64", &failing]).unwrap();
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(EXCERPT), "{err}");
    assert_eq!(err.matches("executor failed running").count(), 1, "BuildKit's closing report is not repeated:\n{err}");

    // --- The platform ARGs: declared ones reach RUN, buildah's warning
    // names only the user's unused argument.
    let args = dockerfile_context(dir, "args", &ARGS.replace("BASE_IMAGE", &base));
    let out = farm
        .braid(&["build", "--progress", "plain", "--platform", "linux/amd64", "--build-arg", "UNUSED=1", &args])
        .unwrap();
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("[linux/amd64] arch=amd64 platform=linux/amd64"), "{err}");
    assert!(err.contains("[linux/amd64] [Warning] one or more build args were not consumed: [UNUSED]\n"), "{err}");
    assert_eq!(err.matches("not consumed").count(), 1, "{err}");
    assert!(!err.contains("missing \\\"BUILD"), "no undeclared BUILD* args are asked for:\n{err}");
    let id =
        err.lines().find_map(|l| l.strip_prefix("#2 build ")).unwrap().split_whitespace().next().unwrap().to_owned();

    // --- Closed pipes end every command quietly: status 0, nothing on
    // stderr (a panic would say "panicked" and exit 101).
    let braid = bin("braid");
    let braid = braid.to_str().unwrap();
    for (what, script) in [
        ("logs", r#""$1" --coordinator "$2" logs "$3" | head -1 >/dev/null"#),
        ("logs json", r#""$1" --coordinator "$2" logs "$3" --format json | head -c1 >/dev/null"#),
        ("builds", r#""$1" --coordinator "$2" builds | head -1 >/dev/null"#),
        ("agents", r#""$1" --coordinator "$2" agents | head -c1 >/dev/null"#),
    ] {
        let runs = if what == "logs" { 10 } else { 3 };
        for run in 0..runs {
            let (status, _, stderr) = shell(script, &[braid, &farm.url, &id]);
            assert_eq!(status, Some(0), "{what} run {run}: {stderr}");
            assert!(stderr.is_empty(), "{what} run {run}: {stderr}");
        }
    }

    // --- tty under a real terminal: a block per platform, the steps, the
    // redraws; auto picks it on a terminal.
    for progress in ["tty", "auto"] {
        let command = format!(
            "{braid} --coordinator {} build --progress {progress} --platform linux/amd64,linux/arm64 {args}",
            farm.url
        );
        let out = braid_tests::run_with_timeout(
            Command::new("script").args(["-q", "-e", "-c", &command, "/dev/null"]),
            Duration::from_secs(600),
        )
        .unwrap();
        let screen = text(&out.stdout);
        assert!(out.status.success(), "{screen}");
        for part in [
            "[+] Building ",
            " => linux/amd64 on buildah-amd64 (native)",
            " => linux/arm64 on docker-arm64 (native)",
            "[+] Succeeded ",
            "\x1b[J",
        ] {
            assert!(screen.contains(part), "--progress {progress}: {part:?} in:\n{screen}");
        }
        assert!(screen.contains("] RUN echo \"arch=$TARGETARCH"), "the running step's text:\n{screen}");
    }
    // Not on a terminal, auto is plain.
    let out = farm.braid(&["build", "--platform", "linux/amd64", &args]).unwrap();
    let err = text(&out.stderr);
    assert!(out.status.success() && !err.contains("\x1b[") && !err.contains("[+]"), "{err}");

    // --- rawjson: one JSON object per line.
    let out = farm.braid(&["build", "--progress", "rawjson", "--platform", "linux/amd64", &args]).unwrap();
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    let types: Vec<String> = err
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}"));
            v["type"].as_str().unwrap().to_owned()
        })
        .collect();
    for kind in ["client", "job", "log", "build"] {
        assert!(types.iter().any(|t| t == kind), "no {kind} event in {types:?}");
    }

    // --- A build whose progress reader goes away is cancelled, quietly.
    let slow = dockerfile_context(dir, "slow", &format!("FROM {base}\nRUN sleep 30\n"));
    let (status, _, stderr) = shell(
        r#""$1" --coordinator "$2" build --progress plain --platform linux/amd64 "$3" 2>&1 | head -1 >/dev/null; echo "${PIPESTATUS[0]}" >&2"#,
        &[braid, &farm.url, &slow],
    );
    assert_eq!(status, Some(0), "{stderr}");
    assert_eq!(stderr.trim(), "141", "braid build exits as SIGPIPE would, silently");
    let builds: serde_json::Value =
        serde_json::from_slice(&farm.braid(&["builds", "--format", "json", "--limit", "1"]).unwrap().stdout).unwrap();
    assert_eq!(builds[0]["state"], "cancelled", "{builds}");
}
