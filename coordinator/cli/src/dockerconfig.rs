//! Registry credentials from the user's Docker config (`auths` and
//! credential helpers), forwarded for the registries a build pushes to.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::Context as _;
use base64::Engine as _;
use serde_json::Value;

use braid_shared::proto::RegistryCredential;

fn config_path() -> Option<PathBuf> {
    match std::env::var_os("DOCKER_CONFIG") {
        Some(dir) => Some(PathBuf::from(dir).join("config.json")),
        None => std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json")),
    }
}

/// The names Docker may have stored a registry's entry under.
fn keys(registry: &str) -> Vec<String> {
    if registry == "docker.io" {
        return ["https://index.docker.io/v1/", "index.docker.io", "docker.io", "registry-1.docker.io"]
            .map(str::to_owned)
            .to_vec();
    }
    vec![registry.to_owned(), format!("https://{registry}"), format!("http://{registry}")]
}

fn from_helper(helper: &str, registry: &str) -> anyhow::Result<Option<(String, String)>> {
    let server = if registry == "docker.io" { "https://index.docker.io/v1/".to_owned() } else { registry.to_owned() };
    let program = format!("docker-credential-{helper}");
    let mut child = Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("running the credential helper {program}"))?;
    child.stdin.take().context("helper stdin")?.write_all(server.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        // "credentials not found" is an ordinary answer.
        return Ok(None);
    }
    let v: Value = serde_json::from_slice(&out.stdout).with_context(|| format!("{program} printed no JSON"))?;
    let user = v["Username"].as_str().unwrap_or_default().to_owned();
    let secret = v["Secret"].as_str().unwrap_or_default().to_owned();
    Ok((!secret.is_empty()).then_some((user, secret)))
}

fn from_auths(config: &Value, registry: &str) -> anyhow::Result<Option<(String, String)>> {
    for key in keys(registry) {
        let entry = &config["auths"][&key];
        if let Some(encoded) = entry["auth"].as_str().filter(|s| !s.is_empty()) {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .with_context(|| format!("the auth of {key} in the Docker config is not base64"))?;
            let text = String::from_utf8(decoded).with_context(|| format!("the auth of {key} is not UTF-8"))?;
            let (user, pass) =
                text.split_once(':').with_context(|| format!("the auth of {key} is not user:password"))?;
            return Ok(Some((user.to_owned(), pass.to_owned())));
        }
        if let (Some(user), Some(pass)) = (entry["username"].as_str(), entry["password"].as_str()) {
            return Ok(Some((user.to_owned(), pass.to_owned())));
        }
    }
    Ok(None)
}

/// Credentials for each of `registries` the Docker config knows.
pub fn credentials_for(registries: &[String]) -> anyhow::Result<Vec<RegistryCredential>> {
    let Some(path) = config_path() else { return Ok(Vec::new()) };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let config: Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let mut out = Vec::new();
    for registry in registries {
        let helper = config["credHelpers"][registry].as_str().or_else(|| config["credsStore"].as_str());
        let found = match helper {
            Some(h) => from_helper(h, registry)?,
            None => from_auths(&config, registry)?,
        };
        if let Some((username, password)) = found {
            out.push(RegistryCredential { registry: registry.clone(), username, password });
        }
    }
    Ok(out)
}
