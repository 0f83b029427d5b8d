//! Registry credentials: from the coordinator's settings and forwarded from
//! the user's Docker config; used to pull and push; never written anywhere.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;

use braid_tests::{AgentSpec, Farm, Registry, require_environment, run_with_timeout};

const CONFIGURED_PASSWORD: &str = "configured-S3cret-5d1f";
const FORWARDED_PASSWORD: &str = "forwarded-S3cret-9a7c";

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn skopeo_inspect(reference: &str, creds: &str) -> bool {
    Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false", "--creds", creds, &format!("docker://{reference}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn credentials_pull_and_push_and_leak_nowhere() {
    require_environment();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let open = Registry::start(&dir.join("open")).unwrap();
    let base = open.push_base_image("base/busybox:latest").unwrap();
    let configured = Registry::start_with_auth(&dir.join("configured"), "farm", CONFIGURED_PASSWORD).unwrap();
    let forwarded = Registry::start_with_auth(&dir.join("forwarded"), "dev", FORWARDED_PASSWORD).unwrap();

    // The base image also lives behind the configured registry's login.
    let private_base = format!("{}/base/busybox:latest", configured.addr);
    let copy = run_with_timeout(
        Command::new("skopeo").args([
            "copy",
            "--all",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            "--dest-creds",
            &format!("farm:{CONFIGURED_PASSWORD}"),
            &format!("docker://{base}"),
            &format!("docker://{private_base}"),
        ]),
        Duration::from_secs(120),
    )
    .unwrap();
    assert!(copy.status.success(), "{}", text(&copy));

    let config = dir.join("coordinator.toml");
    std::fs::write(
        &config,
        format!(
            "insecure_registries = [\"{}\", \"{}\", \"{}\"]\n[registry_credentials.\"{}\"]\nusername = \"farm\"\npassword = \"{CONFIGURED_PASSWORD}\"\n",
            open.addr, configured.addr, forwarded.addr, configured.addr
        ),
    )
    .unwrap();
    let farm = Farm::start_with(
        dir,
        None,
        &[AgentSpec::new("amd64-agent", &[]), AgentSpec::new("arm64-agent", &["linux/arm64"])],
        &["--config", config.to_str().unwrap()],
    )
    .unwrap();
    farm.wait_for_agents(2).unwrap();

    // Pull from and push to the registry the coordinator has credentials for.
    let ctx = dir.join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), format!("FROM {private_base}\nRUN uname -m > /arch\n")).unwrap();
    let tag = format!("{}/private/app:1", configured.addr);
    let out = farm
        .braid(&["build", "--platform", "linux/amd64,linux/arm64", "-t", &tag, "--push", ctx.to_str().unwrap()])
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(skopeo_inspect(&tag, &format!("farm:{CONFIGURED_PASSWORD}")));

    // Push to a registry only the user's Docker config knows.
    let ctx2 = dir.join("ctx2");
    std::fs::create_dir_all(&ctx2).unwrap();
    std::fs::write(ctx2.join("Dockerfile"), format!("FROM {base}\nRUN echo forwarded > /f\n")).unwrap();
    let tag2 = format!("{}/dev/app:1", forwarded.addr);
    let without = dir.join("no-docker-config");
    std::fs::create_dir_all(&without).unwrap();
    let out = farm
        .braid_env(
            &["build", "--platform", "linux/amd64", "-t", &tag2, "--push", ctx2.to_str().unwrap()],
            &[("DOCKER_CONFIG", &without)],
        )
        .unwrap();
    assert!(!out.status.success(), "no credentials, no push");
    assert!(text(&out).contains(&forwarded.addr), "the failure names the registry: {}", text(&out));

    let docker_config = dir.join("docker-config");
    std::fs::create_dir_all(&docker_config).unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("dev:{FORWARDED_PASSWORD}"));
    std::fs::write(
        docker_config.join("config.json"),
        format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, forwarded.addr),
    )
    .unwrap();
    let out = farm
        .braid_env(
            &["build", "--platform", "linux/amd64", "-t", &tag2, "--push", ctx2.to_str().unwrap()],
            &[("DOCKER_CONFIG", &docker_config)],
        )
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(skopeo_inspect(&tag2, &format!("dev:{FORWARDED_PASSWORD}")));

    // Neither password is in any log, job directory or the database.
    drop(farm);
    let mut leaks = Vec::new();
    scan(dir, &mut leaks);
    assert!(leaks.is_empty(), "secrets found in: {leaks:?}");
}

/// Every file under `dir` (but the registries' own storage and the test's
/// own inputs) that holds a password.
fn scan(dir: &Path, leaks: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if ["open", "configured", "forwarded", "docker-config", "coordinator.toml"].contains(&name.as_str()) {
            continue;
        }
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            scan(&path, leaks);
        } else if meta.is_file() && meta.len() < 512 << 20 {
            let bytes = std::fs::read(&path).unwrap_or_default();
            for secret in [CONFIGURED_PASSWORD, FORWARDED_PASSWORD] {
                if bytes.windows(secret.len()).any(|w| w == secret.as_bytes()) {
                    leaks.push(path.display().to_string());
                }
            }
        }
    }
}
