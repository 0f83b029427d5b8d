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
    async fn channel(&self) -> anyhow::Result<(Channel, Auth)> {
        let urls = self.urls();
        let mut targets = Vec::new();
        for url in &urls {
            let uri: tonic::codegen::http::Uri = url.parse().with_context(|| format!("coordinator URL {url:?}"))?;
            let port = uri.port_u16().unwrap_or(if url.starts_with("https://") { 443 } else { 80 });
            let host = uri.host().unwrap_or_default().trim_matches(['[', ']']).to_owned();
            targets.push((host, port));
        }
        let connector = tower::service_fn(move |_uri: tonic::codegen::http::Uri| {
            let targets = targets.clone();
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
