//! The coordinator process: state, background loops and the gRPC server.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Server;

use braid_shared::oci::{ImageDescriptor, Registry};
use braid_shared::pki::{self, Pem};
use braid_shared::proto::admin_server::AdminServer;
use braid_shared::proto::agents_server::AgentsServer;
use braid_shared::proto::builds_server::BuildsServer;
use braid_shared::{Digest, ImageRef, Platform, limits, proto};

use crate::auth::Tokens;
use crate::blobs::BlobError;
use crate::blobs::BlobStore;
use crate::contexts::ContextStore;
use crate::error::{CoordinatorError, Result};
use crate::farm::{Farm, FollowUp, VerifyIn};
use crate::listener::{self, ConnLimits};
use crate::merge;
use crate::metrics::Metrics;
use crate::settings::Settings;
use crate::store::Store;

/// Everything the services share.
pub struct Coordinator {
    farm: Mutex<Farm>,
    pub contexts: ContextStore,
    pub blobs: Arc<BlobStore>,
    pub store: Arc<Store>,
    pub settings: Settings,
    /// Wakes the scheduler after anything that may let a job be placed.
    pub wake: Notify,
    pub metrics: Arc<Metrics>,
    pub tokens: Tokens,
    /// The cluster CA and its key, when this coordinator signs joining agents.
    pub ca: Option<Pem>,
}

impl Coordinator {
    pub fn open(settings: Settings) -> Result<Arc<Coordinator>> {
        std::fs::create_dir_all(&settings.data_dir)?;
        let store = Arc::new(Store::open(&settings.data_dir.join("braid.db"))?);
        let contexts = ContextStore::open(
            &settings.data_dir.join("contexts"),
            store.clone(),
            settings.max_context_bytes,
            settings.context_store_bytes,
        )?;
        let blobs = Arc::new(BlobStore::open(&settings.data_dir.join("blobs/sha256"), settings.blob_store_bytes)?);
        let metrics = Arc::new(Metrics::default());
        let mut farm =
            Farm::load(store.clone(), settings.max_attempts, settings.insecure_registries.clone(), metrics.clone())?;
        farm.adopt_orphans();
        farm.set_configured_credentials(settings.credentials());
        let tokens = Tokens::new(store.clone(), settings.tls());
        let ca = match (&settings.tls_ca, &settings.tls_ca_key) {
            (Some(cert), Some(key)) => Some(Pem {
                cert: pki::read(cert).map_err(|e| CoordinatorError::Internal(e.to_string()))?,
                key: pki::read(key).map_err(|e| CoordinatorError::Internal(e.to_string()))?.into(),
            }),
            _ => None,
        };
        Ok(Arc::new(Coordinator {
            farm: Mutex::new(farm),
            contexts,
            blobs,
            store,
            settings,
            wake: Notify::new(),
            metrics,
            tokens,
            ca,
        }))
    }

    /// The farm, locked. Never held across an await.
    pub fn farm(&self) -> MutexGuard<'_, Farm> {
        // A panic while holding the lock leaves the farm as the last
        // completed change wrote it; keep serving rather than fail forever.
        self.farm.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs work a state change asked for, in the background.
    pub fn follow_up(self: &Arc<Self>, follow: Option<FollowUp>) {
        let Some(follow) = follow else { return };
        let this = self.clone();
        tokio::spawn(async move {
            let mut next = Some(follow);
            while let Some(step) = next.take() {
                next = this.run_follow_up(step).await;
            }
        });
    }

    async fn run_follow_up(self: &Arc<Self>, step: FollowUp) -> Option<FollowUp> {
        match step {
            FollowUp::Verify { build_id, job_id, at, digest, platform } => {
                let outcome = match at {
                    VerifyIn::Registry(repository) => {
                        self.verify_pushed(&build_id, &repository, &digest, &platform).await
                    }
                    VerifyIn::Blobs => self.verify_uploaded(digest, platform).await,
                    VerifyIn::RegistryAndBlobs(repository) => {
                        match self.verify_pushed(&build_id, &repository, &digest, &platform).await {
                            Ok(_) => self.verify_uploaded(digest, platform).await,
                            Err(e) => Err(e),
                        }
                    }
                };
                let result = self.farm().verified(&build_id, &job_id, outcome);
                result.unwrap_or_else(|e| {
                    tracing::error!(build_id, job_id, error = %e, "recording the verification failed");
                    None
                })
            }
            FollowUp::Merge { build_id } => {
                let inputs = self.farm().merge_inputs(&build_id);
                let outcome = match inputs {
                    Some(m) => self.merge(&build_id, &m).await,
                    None => Err("a platform has no image".to_owned()),
                };
                if let Err(e) = self.farm().merged(&build_id, outcome) {
                    tracing::error!(build_id, error = %e, "recording the merge failed");
                }
                None
            }
        }
    }

    /// Checks a pushed image in the registry.
    async fn verify_pushed(
        &self,
        build_id: &str,
        repository: &ImageRef,
        digest: &Digest,
        platform: &Platform,
    ) -> std::result::Result<ImageDescriptor, String> {
        merge::verify(&self.registry_for(build_id), repository, digest, platform).await
    }

    /// Checks an uploaded image in the blob store; reading and hashing the
    /// manifest and config is blocking work.
    async fn verify_uploaded(
        &self,
        digest: Digest,
        platform: Platform,
    ) -> std::result::Result<ImageDescriptor, String> {
        let blobs = self.blobs.clone();
        let check = tokio::task::spawn_blocking(move || blobs.verify_image(&digest, &platform).map(|(d, _)| d));
        check
            .await
            .unwrap_or_else(|e| Err(BlobError::Internal(e.to_string())))
            .map_err(|e| format!("uploaded image: {e}"))
    }

    /// Writes the index: into the blob store for an exporting build, and
    /// to the registry under every tag for a pushing one.
    async fn merge(
        self: &Arc<Self>,
        build_id: &str,
        m: &crate::farm::MergeInputs,
    ) -> std::result::Result<ImageDescriptor, String> {
        let (index, descriptor) = merge::index(&m.images, &m.annotations, m.format)?;
        if m.export {
            let (this, bytes) = (self.clone(), index.clone());
            crate::blocking::run(move || {
                let needed = || this.blobs.referenced(&this.farm().exporting_images());
                this.blobs.put_bytes(&bytes, needed)
            })
            .await
            .map_err(|e| format!("storing the index: {e}"))?;
        }
        if m.push {
            merge::push(&self.registry_for(build_id), &m.tags, &m.pushed_to, &m.images, &index, &descriptor).await?;
        }
        Ok(descriptor)
    }

    /// A registry client with the build's credentials.
    fn registry_for(&self, build_id: &str) -> Registry {
        let credentials = self.farm().credentials_for(build_id);
        Registry::with_credentials(&self.settings.insecure_registries, credentials)
    }

    /// Places queued jobs whenever woken, and at least every second; looks
    /// for lost agents and timed-out builds a few times a second (each
    /// looks at every agent or build, too much for every wake-up).
    async fn schedule_loop(self: Arc<Self>) {
        let mut last_sweep = std::time::Instant::now();
        loop {
            let _ = tokio::time::timeout(Duration::from_secs(1), self.wake.notified()).await;
            let sweep = last_sweep.elapsed() >= Duration::from_millis(200);
            let result = {
                let mut farm = self.farm();
                let swept = if sweep {
                    last_sweep = std::time::Instant::now();
                    farm.reap(self.settings.agent_lost_after())
                        .and_then(|()| farm.check_timeouts(self.settings.queue_timeout()))
                } else {
                    Ok(())
                };
                swept.and_then(|()| farm.schedule())
            };
            if let Err(e) = result {
                tracing::error!(error = %e, "scheduling failed");
            }
        }
    }
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    coordinator: Arc<Coordinator>,
    addr: SocketAddr,
    http_addr: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let http_listener = tokio::net::TcpListener::bind(http_addr).await?;
    let settings = &coordinator.settings;
    let open_files = braid_shared::telemetry::open_file_limit()?;
    let (grpc_limits, http_limits) =
        ConnLimits::split(settings.max_connections, open_files, settings.handshake_timeout());
    tracing::info!(addr = %http_listener.local_addr()?, "http listening");
    let http = crate::http::router(coordinator.clone());
    let header_timeout = settings.header_timeout();
    match http_tls(settings)? {
        Some(acceptor) => {
            let conns = listener::listen(http_listener, "http", http_limits, tls_handshake(acceptor));
            tokio::spawn(crate::http::serve_conns(conns, http, header_timeout));
        }
        None => {
            let conns = listener::listen(http_listener, "http", http_limits, |tcp| async { Ok(tcp) });
            tokio::spawn(crate::http::serve_conns(conns, http, header_timeout));
        }
    }
    serve_on(coordinator, listener, grpc_limits, shutdown).await
}

/// A TLS handshake on a new connection, run by the listener under its timeout.
fn tls_handshake(
    acceptor: tokio_rustls::TlsAcceptor,
) -> impl Fn(TcpStream) -> tokio_rustls::Accept<TcpStream> + Send + Sync + 'static {
    move |tcp| acceptor.accept(tcp)
}

/// Serves gRPC on an already-bound listener.
pub async fn serve_on(
    coordinator: Arc<Coordinator>,
    listener: tokio::net::TcpListener,
    conn_limits: ConnLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<BuildsServer<crate::api::builds::BuildsService>>().await;
    health_reporter.set_serving::<AgentsServer<crate::api::agents::AgentsService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    tokio::spawn(coordinator.clone().schedule_loop());
    let interrupted = coordinator.farm().interrupted_follow_ups();
    for follow in interrupted {
        coordinator.follow_up(Some(follow));
    }

    let builds = BuildsServer::new(crate::api::builds::BuildsService::new(coordinator.clone()))
        .max_decoding_message_size(limits::GRPC_MESSAGE_BYTES)
        .max_encoding_message_size(limits::GRPC_MESSAGE_BYTES);
    let agents = AgentsServer::new(crate::api::agents::AgentsService::new(coordinator.clone()))
        .max_decoding_message_size(limits::GRPC_MESSAGE_BYTES)
        .max_encoding_message_size(limits::GRPC_MESSAGE_BYTES);
    let admin = AdminServer::new(crate::api::admin::AdminService::new(coordinator.clone()));
    // TLS is done by the listener (handshakes concurrent and bounded in
    // time and number), so tonic gets established streams; it reads the
    // client certificate from them as from its own TLS.
    let tls = grpc_tls(&coordinator.settings)?;
    let local = listener.local_addr()?;
    let router = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(crate::decode_status::InvalidArgumentOnDecode(health_service))
        .add_service(reflection)
        .add_service(builds)
        .add_service(agents)
        .add_service(admin);
    match tls {
        Some(acceptor) => {
            let conns = listener::listen(listener, "grpc", conn_limits, tls_handshake(acceptor));
            tracing::info!(addr = %local, "coordinator listening");
            router
                .serve_with_incoming_shutdown(ReceiverStream::new(conns).map(Ok::<_, std::io::Error>), shutdown)
                .await?;
        }
        None => {
            let conns = listener::listen(listener, "grpc", conn_limits, |tcp| async { Ok(tcp) });
            tracing::info!(addr = %local, "coordinator listening");
            router
                .serve_with_incoming_shutdown(ReceiverStream::new(conns).map(Ok::<_, std::io::Error>), shutdown)
                .await?;
        }
    }
    Ok(())
}

/// TLS for gRPC, as tonic would set it up: the coordinator's certificate,
/// ALPN h2, and client certificates checked against the cluster CA when
/// presented (agents must present one; clients may use a bearer token).
fn grpc_tls(settings: &Settings) -> Result<Option<tokio_rustls::TlsAcceptor>, ServeError> {
    let (Some(cert), Some(key), Some(ca)) = (&settings.tls_cert, &settings.tls_key, &settings.tls_ca) else {
        return Ok(None);
    };
    let tls_err = |e: &dyn std::fmt::Display| ServeError::Tls(e.to_string());
    let mut roots = rustls::RootCertStore::empty();
    for ca_cert in read_certs(ca)? {
        roots.add(ca_cert).map_err(|e| tls_err(&e))?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| tls_err(&e))?;
    let key =
        rustls_pki_types::PrivateKeyDer::from_pem_file(key).map_err(|e| tls_err(&format!("{}: {e}", key.display())))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(&e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(read_certs(cert)?, key)
        .map_err(|e| tls_err(&e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))))
}

/// Every certificate in a PEM file.
fn read_certs(path: &std::path::Path) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, ServeError> {
    let tls_err = |e: &dyn std::fmt::Display| ServeError::Tls(format!("{}: {e}", path.display()));
    rustls_pki_types::CertificateDer::pem_file_iter(path)
        .map_err(|e| tls_err(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_err(&e))
}

/// TLS for the HTTP port (metrics, health), with the same certificate as gRPC.
fn http_tls(settings: &Settings) -> Result<Option<tokio_rustls::TlsAcceptor>, ServeError> {
    let (Some(cert), Some(key)) = (&settings.tls_cert, &settings.tls_key) else {
        return Ok(None);
    };
    let tls_err = |e: &dyn std::fmt::Display| ServeError::Tls(e.to_string());
    let certs = read_certs(cert)?;
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(key).map_err(|e| tls_err(&e))?;
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(&e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| tls_err(&e))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config))))
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("TLS: {0}")]
    Tls(String),
    #[error("binding the listener: {0}")]
    Io(#[from] std::io::Error),
    #[error("serving gRPC: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}
