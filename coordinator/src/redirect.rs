//! A follower's gRPC port: every call is answered `UNAVAILABLE` with where
//! the leader is (`x-braid-leader: <address>` and the message), and the
//! connection is then closed, so a client or agent dials the leader next
//! instead of staying on a coordinator that cannot serve it.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::net::TcpStream;

use crate::leader::Leadership;
use crate::listener::{self, Conn, ConnLimits};
use crate::settings::Settings;

/// The metadata key naming the leader's address.
pub const LEADER_HEADER: &str = "x-braid-leader";

/// The status a follower answers every call with.
pub fn not_the_leader(state: &Leadership) -> tonic::Status {
    let leader = state.address();
    let term = state.term.load(Ordering::SeqCst);
    let named = if leader.is_empty() { "unknown (none holds the lease)".to_owned() } else { leader.clone() };
    let mut status = tonic::Status::unavailable(format!("not the leader: the leader is {named} (term {term})"));
    if let Ok(value) = leader.parse() {
        status.metadata_mut().insert(LEADER_HEADER, value);
    }
    status
}

/// Serves the gRPC port as a follower until the task is aborted; returns
/// once the listener is bound so that errors binding surface at once.
pub async fn serve(
    addr: std::net::SocketAddr,
    settings: &Settings,
    state: Arc<Leadership>,
) -> Result<tokio::task::JoinHandle<()>, crate::server::ServeError> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let open_files = braid_shared::telemetry::open_file_limit()?;
    let (limits, _) = ConnLimits::split(settings.max_connections, open_files, settings.handshake_timeout());
    tracing::info!(%addr, "follower gRPC listening: every call is sent to the leader");
    let handle = match crate::server::grpc_tls(settings)? {
        Some(acceptor) => {
            let conns = listener::listen(listener, "grpc", limits, move |tcp: TcpStream| acceptor.accept(tcp));
            tokio::spawn(answer(conns, state))
        }
        None => {
            let conns = listener::listen(listener, "grpc", limits, |tcp| async { Ok(tcp) });
            tokio::spawn(answer(conns, state))
        }
    };
    Ok(handle)
}

async fn answer<S>(mut conns: tokio::sync::mpsc::Receiver<Conn<S>>, state: Arc<Leadership>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    let mut h2 = Builder::new(TokioExecutor::new()).http2_only();
    h2.http2().timer(TokioTimer::new()).max_concurrent_streams(16);
    let h2 = Arc::new(h2);
    while let Some(conn) = conns.recv().await {
        let (h2, state) = (h2.clone(), state.clone());
        tokio::spawn(async move {
            let answered = Arc::new(tokio::sync::Notify::new());
            let service = {
                let answered = answered.clone();
                let router = axum::Router::new().fallback(move || {
                    let response = not_the_leader(&state).into_http::<axum::body::Body>();
                    answered.notify_one();
                    async move { response }
                });
                hyper_util::service::TowerToHyperService::new(router)
            };
            let served = h2.serve_connection(TokioIo::new(conn), service);
            tokio::pin!(served);
            let ended = tokio::select! {
                ended = served.as_mut() => Some(ended),
                () = answered.notified() => None,
            };
            let ended = match ended {
                Some(ended) => ended,
                None => {
                    // Answered: GOAWAY, so the client's next dial goes elsewhere.
                    served.as_mut().graceful_shutdown();
                    served.await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(error = %e, "follower gRPC connection ended");
            }
        });
    }
}
