//! Renewing the agent's certificate before it expires, as kubelet rotates
//! its client certificate: at two thirds of its life the agent sends a new
//! key's signing request over its mutual-TLS channel (`Agents.Renew`),
//! installs the answer, and reconnects with it. The coordinator records the
//! new certificate when it is first presented and revokes the old one then,
//! so an answer lost on the way locks nobody out: the old one still works
//! and the next attempt asks again.
//!
//! On disk the key and certificate are replaced together (`tlsfiles`).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

use braid_shared::pki;
use braid_shared::proto::{self, agents_client::AgentsClient};

use crate::session::Agent;
use crate::settings::{TlsFiles, Valid, tls_dir};

#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    #[error(transparent)]
    Files(#[from] crate::tlsfiles::FilesError),
    #[error("the certificate: {0}")]
    Pki(#[from] pki::PkiError),
    #[error("connecting to the coordinator: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("the coordinator refused to renew: {}", .0.message())]
    Refused(#[from] tonic::Status),
    #[error("the renewed certificate {0}")]
    Unexpected(String),
}

fn now_seconds() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// When a certificate valid from `not_before` to `not_after` is renewed:
/// at two thirds of its life.
pub fn renewal_due(not_before: i64, not_after: i64) -> i64 {
    not_before + (not_after - not_before).max(0) * 2 / 3
}

/// How long to wait before trying again after a failed renewal: a tenth of
/// what is left, between 5 seconds and 10 minutes.
fn retry_after(not_after: i64) -> Duration {
    Duration::from_secs(((not_after - now_seconds()) / 10).clamp(5, 600) as u64)
}

/// Renews the certificate whenever it is due, until `stop`.
pub async fn run(settings: Valid, agent: Arc<Agent>, stop: CancellationToken) {
    let Some(shared) = settings.tls.clone() else { return };
    loop {
        let current = shared.read().unwrap_or_else(|p| p.into_inner()).clone();
        let info = match pki::inspect_pem(&String::from_utf8_lossy(&current.cert)) {
            Ok(info) => info,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read this agent's certificate: not renewing it");
                return;
            }
        };
        let due = renewal_due(info.not_before, info.not_after);
        let wait = Duration::from_secs((due - now_seconds()).clamp(0, 3600) as u64);
        if !wait.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(wait) => continue,
                () = stop.cancelled() => return,
            }
        }
        let retry = if !current.renewable {
            tracing::warn!(
                expires = info.not_after,
                "this agent's certificate (--tls-cert) is past two thirds of its life: issue a new one (braid certs issue)"
            );
            Duration::from_secs(6 * 3600)
        } else {
            match renew_once(&settings, &current, &info.name, info.not_after).await {
                Ok(renewed) => {
                    tracing::info!(serial = %renewed.1, expires = renewed.2, "agent certificate renewed");
                    *shared.write().unwrap_or_else(|p| p.into_inner()) = renewed.0;
                    // Reconnect with it: the coordinator then records it and revokes the old one.
                    agent.reconnect_now();
                    continue;
                }
                Err(e) => {
                    let retry = retry_after(info.not_after);
                    tracing::warn!(error = %e, retry_in = ?retry, "renewing this agent's certificate failed");
                    retry
                }
            }
        };
        tokio::select! {
            () = tokio::time::sleep(retry) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// One renewal: a new key, the coordinator's signature, installed on disk.
/// Returns the new files, the new serial and its notAfter.
async fn renew_once(
    settings: &Valid,
    current: &TlsFiles,
    name: &str,
    old_not_after: i64,
) -> Result<(TlsFiles, String, i64), RenewError> {
    let (csr_pem, key_pem) = pki::new_agent_request(name)?;
    let mut client = AgentsClient::new(settings.connect().await?);
    let answer = client.renew(proto::RenewRequest { csr_pem }).await?.into_inner();
    let info = pki::inspect_pem(&answer.cert_pem)?;
    if info.name != name || info.unit != "agent" {
        return Err(RenewError::Unexpected(format!("names {:?} ({}), not agent {name:?}", info.name, info.unit)));
    }
    if info.not_after <= old_not_after {
        return Err(RenewError::Unexpected("does not outlive the current one".into()));
    }
    crate::tlsfiles::install(&tls_dir(&settings.settings.work_dir), &answer.cert_pem, &key_pem)?;
    let files = TlsFiles {
        ca: current.ca.clone(),
        cert: answer.cert_pem.into_bytes(),
        key: zeroize::Zeroizing::new(key_pem.as_bytes().to_vec()),
        renewable: true,
    };
    Ok((files, info.serial, info.not_after))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn due_at_two_thirds_of_the_life() {
        assert_eq!(renewal_due(0, 300), 200);
        assert_eq!(renewal_due(1000, 1000), 1000);
        assert_eq!(renewal_due(1000, 10), 1000, "an inverted validity is due at once");
    }
}
