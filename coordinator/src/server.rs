//! The coordinator's servers assembled: gRPC with its TLS, and the HTTP port.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use tokio::net::TcpStream;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Server;

use braid_shared::proto::admin_server::AdminServer;
use braid_shared::proto::agents_server::AgentsServer;
use braid_shared::proto::builds_server::BuildsServer;
use braid_shared::{limits, proto};

use crate::listener::{self, ConnLimits};
use crate::settings::Settings;
pub use crate::state::Coordinator;

/// Serves until `shutdown` resolves.
pub async fn serve(
    coordinator: Arc<Coordinator>,
    addr: SocketAddr,
    http_addr: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let listener = bind_again(addr).await?;
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

/// Binds `addr`, waiting up to 3 s for a follower's own listener on it
/// (redirect.rs) to be closed once this coordinator leads.
async fn bind_again(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            bound => return bound,
        }
    }
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
    {
        let farm = coordinator.farm();
        coordinator.perform(&farm, farm.interrupted());
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
    // The signal starts tonic's graceful shutdown; agent sessions and
    // followers never end by themselves, so past the grace they are closed
    // and the server is not waited for any longer.
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn({
        let stop = stop.clone();
        async move {
            shutdown.await;
            stop.cancel();
        }
    });
    let served = async {
        match tls {
            Some(acceptor) => {
                let conns = listener::listen(listener, "grpc", conn_limits, tls_handshake(acceptor));
                tracing::info!(addr = %local, "coordinator listening");
                let incoming = ReceiverStream::new(conns).map(Ok::<_, std::io::Error>);
                router.serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned()).await
            }
            None => {
                let conns = listener::listen(listener, "grpc", conn_limits, |tcp| async { Ok(tcp) });
                tracing::info!(addr = %local, "coordinator listening");
                let incoming = ReceiverStream::new(conns).map(Ok::<_, std::io::Error>);
                router.serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned()).await
            }
        }
    };
    let grace = coordinator.settings.shutdown_grace();
    let served = tokio::select! {
        served = served => served,
        () = async { stop.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(?grace, "open calls outlasted the shutdown grace; closing agent sessions and streams");
            coordinator.close_all_sessions();
            Ok(())
        }
    };
    // What the farm changed last is stored before the process goes.
    coordinator.flush().await;
    Ok(served?)
}

/// TLS for gRPC, as tonic would set it up: the coordinator's certificate,
/// ALPN h2, and client certificates checked against the cluster CA when
/// presented (agents must present one; clients may use a bearer token).
pub(crate) fn grpc_tls(settings: &Settings) -> Result<Option<tokio_rustls::TlsAcceptor>, ServeError> {
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
