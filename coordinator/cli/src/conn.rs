//! How the CLI reaches the coordinator: plaintext on loopback, or TLS
//! verified against the cluster CA, with a bearer token on every call.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use braid_shared::limits;
use braid_shared::proto::{admin_client::AdminClient, builds_client::BuildsClient};

#[derive(Debug, Clone)]
pub struct Conn {
    pub url: String,
    pub token: Option<String>,
    pub ca: Option<PathBuf>,
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Auth(Option<MetadataValue<Ascii>>);

impl Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            req.metadata_mut().insert("authorization", value.clone());
        }
        Ok(req)
    }
}

pub type Builds = BuildsClient<InterceptedService<Channel, Auth>>;
pub type Admin = AdminClient<InterceptedService<Channel, Auth>>;

impl Conn {
    /// Secrets travel only over TLS, or plaintext to this same host.
    pub fn may_carry_secrets(&self) -> bool {
        self.urls().iter().all(|url| {
            if url.starts_with("https://") {
                return true;
            }
            let host = url.trim_start_matches("http://").split(['/', ':']).next().unwrap_or_default();
            host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
        })
    }

    /// The coordinators given (comma-separated: several on one database,
    /// of which only the leader listens for gRPC).
    fn urls(&self) -> Vec<&str> {
        let urls: Vec<&str> = self.url.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
        if urls.is_empty() { vec![self.url.as_str()] } else { urls }
    }

    /// A channel that dials the first coordinator that answers, at every
    /// (re)connection: every address given, and every address a name
    /// resolves to, in turn (only the leader listens for gRPC), so a call
    /// retried after the leader went away reaches the next one.
    async fn channel_here(&self) -> anyhow::Result<(Channel, Auth)> {
        let urls = self.urls();
        let mut targets = Vec::new();
        for url in &urls {
            targets.push(target(url)?);
        }
        let connector = tower::service_fn(move |_uri: tonic::codegen::http::Uri| {
            let mut targets = targets.clone();
            // The leader a follower named is dialed first.
            if let Some(leader) = leader_hint().and_then(|url| target(&url).ok()) {
                targets.retain(|t| *t != leader);
                targets.insert(0, leader);
            }
            async move {
                let mut last = std::io::Error::other("no coordinator address given");
                for (host, port) in &targets {
                    let addrs = match tokio::net::lookup_host((host.as_str(), *port)).await {
                        Ok(addrs) => addrs,
                        Err(e) => {
                            last = e;
                            continue;
                        }
                    };
                    for addr in addrs {
                        match tokio::net::TcpStream::connect(addr).await {
                            Ok(tcp) => {
                                let _ = tcp.set_nodelay(true);
                                return Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tcp));
                            }
                            Err(e) => last = e,
                        }
                    }
                }
                Err(last)
            }
        });
        let url = urls.first().copied().unwrap_or_default();
        let mut endpoint = Endpoint::from_shared(url.to_owned()).with_context(|| format!("coordinator URL {url:?}"))?;
        if url.starts_with("https://") {
            let mut tls = ClientTlsConfig::new();
            if let Some(ca) = &self.ca {
                let pem = std::fs::read(ca).with_context(|| format!("reading the cluster CA {ca:?}"))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            } else {
                bail!("https coordinator: give the cluster CA with --ca or BRAID_CA");
            }
            endpoint = endpoint.tls_config(tls)?;
        } else if !self.url.starts_with("http://") {
            bail!("coordinator URL {url:?} must start with https:// (or http:// on loopback)");
        }
        let channel = endpoint
            .connect_with_connector(connector)
            .await
            .with_context(|| format!("connecting to the coordinator at {}", self.url))?;
        let auth = match &self.token {
            Some(t) => Some(format!("Bearer {t}").parse().context("the token has characters a header cannot carry")?),
            None => None,
        };
        Ok((channel, Auth(auth)))
    }

    /// A channel to the leader: a follower answers every call with where
    /// the leader is (redirect.rs in the coordinator), so a first call asks,
    /// and the channel is dialed again with that leader first.
    async fn channel(&self) -> anyhow::Result<(Channel, Auth)> {
        for _ in 0..MAX_REDIRECTS {
            let (channel, auth) = self.channel_here().await?;
            let mut probe = AdminClient::with_interceptor(channel.clone(), auth.clone());
            match probe.coordinator_status(braid_shared::proto::CoordinatorStatusRequest {}).await {
                Err(status) if note_leader(&status) => continue,
                _ => return Ok((channel, auth)),
            }
        }
        self.channel_here().await
    }

    /// An admin client of the one coordinator given, leader or follower
    /// (`braid status`); of the leader when several are given.
    pub async fn admin_here(&self) -> anyhow::Result<Admin> {
        if self.urls().len() > 1 {
            return self.admin().await;
        }
        let (channel, auth) = self.channel_here().await?;
        Ok(AdminClient::with_interceptor(channel, auth))
    }

    pub async fn builds(&self) -> anyhow::Result<Builds> {
        let (channel, auth) = self.channel().await?;
        Ok(BuildsClient::with_interceptor(channel, auth)
            .max_decoding_message_size(limits::GRPC_MESSAGE_BYTES)
            .max_encoding_message_size(limits::GRPC_MESSAGE_BYTES))
    }

    pub async fn admin(&self) -> anyhow::Result<Admin> {
        let (channel, auth) = self.channel().await?;
        Ok(AdminClient::with_interceptor(channel, auth))
    }
}

/// How many followers in a row may send a connection on.
const MAX_REDIRECTS: usize = 4;

/// The metadata key a follower names the leader in.
pub const LEADER_HEADER: &str = "x-braid-leader";

static LEADER: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

fn leader_hint() -> Option<String> {
    LEADER.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
}

/// The leader `status` names when a follower answered; None otherwise.
pub fn named_leader(status: &tonic::Status) -> Option<String> {
    if status.code() != tonic::Code::Unavailable {
        return None;
    }
    let leader = status.metadata().get(LEADER_HEADER)?.to_str().ok()?.trim();
    let valid = (leader.starts_with("http://") || leader.starts_with("https://")) && leader.len() <= 512;
    valid.then(|| leader.to_owned())
}

/// Remembers the leader a follower named, to be dialed first from now on;
/// whether `status` named one.
pub fn note_leader(status: &tonic::Status) -> bool {
    match named_leader(status) {
        Some(leader) => {
            *LEADER.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(leader);
            true
        }
        None => false,
    }
}

/// Host and port of a coordinator URL.
fn target(url: &str) -> anyhow::Result<(String, u16)> {
    let uri: tonic::codegen::http::Uri = url.parse().with_context(|| format!("coordinator URL {url:?}"))?;
    let port = uri.port_u16().unwrap_or(if url.starts_with("https://") { 443 } else { 80 });
    let host = uri.host().unwrap_or_default().trim_matches(['[', ']']).to_owned();
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_follower_status_names_the_leader() {
        let mut status = tonic::Status::unavailable("not the leader: the leader is http://10.0.0.2:7000 (term 3)");
        assert_eq!(named_leader(&status), None);
        status.metadata_mut().insert(LEADER_HEADER, "http://10.0.0.2:7000".parse().unwrap());
        assert_eq!(named_leader(&status).as_deref(), Some("http://10.0.0.2:7000"));
        let mut other = tonic::Status::not_found("x");
        other.metadata_mut().insert(LEADER_HEADER, "http://10.0.0.2:7000".parse().unwrap());
        assert_eq!(named_leader(&other), None);
        assert_eq!(target("http://10.0.0.2:7000").unwrap(), ("10.0.0.2".to_owned(), 7000));
    }
}
