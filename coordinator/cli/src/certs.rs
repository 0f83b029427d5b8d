//! `braid certs`: the cluster CA and certificates for the coordinator,
//! agents and clients. Private keys are written 0600.

use std::path::Path;

use anyhow::{Context as _, bail};

use braid_shared::pki::{self, Kind, Pem};

/// Years of validity are not a default anyone should rely on: rotate.
const CA_DAYS: i64 = 3650;

pub fn init(dir: &Path, hosts: &[String], days: i64) -> anyhow::Result<i32> {
    std::fs::create_dir_all(dir)?;
    if dir.join("ca.pem").exists() {
        bail!("{}/ca.pem exists: refusing to replace the cluster CA (delete it to start over)", dir.display());
    }
    let mut hosts = hosts.to_vec();
    for default in ["localhost", "127.0.0.1"] {
        if !hosts.iter().any(|h| h == default) {
            hosts.push(default.to_owned());
        }
    }
    let cluster = hosts.first().cloned().unwrap_or_default();
    let ca = pki::new_ca(&cluster, CA_DAYS)?;
    pki::write_public(&dir.join("ca.pem"), &ca.cert)?;
    pki::write_private(&dir.join("ca-key.pem"), &ca.key)?;
    let server = pki::issue_server(&ca, &hosts, days)?;
    pki::write_public(&dir.join("coordinator.pem"), &server.cert)?;
    pki::write_private(&dir.join("coordinator-key.pem"), &server.key)?;
    outln!("wrote {0}/ca.pem, {0}/ca-key.pem, {0}/coordinator.pem, {0}/coordinator-key.pem", dir.display());
    outln!("coordinator certificate valid for: {}", hosts.join(", "));
    Ok(0)
}

pub fn issue(dir: &Path, name: &str, kind: &str, days: i64) -> anyhow::Result<i32> {
    let kind = match kind {
        "agent" => Some(Kind::Agent),
        "client" => Some(Kind::Client),
        "provenance" => None,
        other => bail!("invalid kind {other:?}: agent, client or provenance"),
    };
    if name.is_empty() || name.len() > 128 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
        bail!("invalid name {name:?}: 1 to 128 letters, digits, '.', '_' or '-'");
    }
    let ca = Pem {
        cert: pki::read(&dir.join("ca.pem")).context("the cluster CA (run braid certs init first)")?,
        key: pki::read(&dir.join("ca-key.pem"))?.into(),
    };
    let issued = match kind {
        Some(kind) => pki::issue_client(&ca, kind, name, days)?,
        None => pki::issue_provenance(&ca, name, days)?,
    };
    pki::write_public(&dir.join(format!("{name}.pem")), &issued.cert)?;
    pki::write_private(&dir.join(format!("{name}-key.pem")), &issued.key)?;
    outln!("wrote {0}/{name}.pem and {0}/{name}-key.pem", dir.display());
    Ok(0)
}
