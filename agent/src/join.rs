//! `braid-agent join`: enroll once with a join token, keep the certificate.

use std::path::Path;

use anyhow::{Context as _, bail};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use braid_shared::pki;
use braid_shared::proto::{self, agents_client::AgentsClient};

use crate::settings::{Settings, tls_dir};

pub async fn run(settings: &Settings, token: &str, ca: &Path) -> anyhow::Result<()> {
    let dir = tls_dir(&settings.work_dir);
    if dir.join("agent.pem").exists() && dir.join("agent-key.pem").exists() {
        println!("already enrolled: {} holds this agent's certificate", dir.display());
        return Ok(());
    }
    if !settings.coordinator.starts_with("https://") {
        bail!("join needs an https:// coordinator (the token must not travel in plaintext)");
    }
    let name = if settings.name.is_empty() {
        std::fs::read_to_string("/etc/hostname").map(|s| s.trim().to_owned()).unwrap_or_default()
    } else {
        settings.name.clone()
    };
    let ca_pem = std::fs::read(ca).with_context(|| format!("reading the cluster CA {ca:?}"))?;
    let channel = Endpoint::from_shared(settings.coordinator.clone())?
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca_pem)))?
        .connect()
        .await
        .with_context(|| format!("connecting to {}", settings.coordinator))?;
    let (csr_pem, key_pem) = pki::new_agent_request(&name)?;
    let response = AgentsClient::new(channel)
        .join(proto::JoinRequest { token: token.to_owned(), name: name.clone(), csr_pem })
        .await
        .map_err(|s| anyhow::anyhow!("the coordinator refused to enroll {name:?}: {}", s.message()))?
        .into_inner();
    std::fs::create_dir_all(&dir)?;
    pki::write_private(&dir.join("agent-key.pem"), &key_pem)?;
    pki::write_public(&dir.join("agent.pem"), &response.cert_pem)?;
    pki::write_public(&dir.join("ca.pem"), &response.ca_pem)?;
    println!("enrolled as {name}; certificate in {}", dir.display());
    println!(
        "run: braid-agent --coordinator {} --name {name} --work-dir {}",
        settings.coordinator,
        settings.work_dir.display()
    );
    Ok(())
}
