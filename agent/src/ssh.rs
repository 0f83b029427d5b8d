//! A job's `--ssh` sockets: one unix socket per id, in the job's private
//! secrets directory (0700; the sockets 0600), that speaks the ssh-agent
//! protocol by carrying each connection over one stream to the coordinator
//! (`SshTunnel`), which relays it to the client that submitted the build.
//! No key comes here: only the agent protocol's bytes pass, and none is
//! logged. Everything stops, and the sockets go, with the job.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use braid_shared::limits;
use braid_shared::proto::{self, agents_client::AgentsClient, ssh_frame::Kind};

use crate::jobdir::JobDir;
use crate::settings::Valid;

/// The longest socket path a `sockaddr_un` holds (108 bytes with its NUL).
const SUN_PATH_BYTES: usize = 107;

/// Bytes read from a step's connection per frame.
const READ_BYTES: usize = 64 << 10;

/// A job's running `--ssh` sockets; dropping it stops them and removes them.
pub struct SshSockets {
    sockets: Vec<(String, PathBuf)>,
    stop: CancellationToken,
    /// A short directory of our own when the job's is too deep for a socket path.
    _short: Option<tempfile::TempDir>,
}

impl SshSockets {
    /// Each `--ssh` id and its socket path, for the builder's `--ssh ID=PATH`.
    pub fn sockets(&self) -> &[(String, PathBuf)] {
        &self.sockets
    }

    /// Starts the sockets of `a`'s `--ssh` ids (none: `None`), and the
    /// tunnel that serves them.
    pub fn start(settings: &Valid, a: &proto::Assignment, dir: &JobDir) -> Result<Option<SshSockets>, String> {
        let ids = a.spec.as_ref().map(|s| s.ssh_ids.clone()).unwrap_or_default();
        if ids.is_empty() {
            return Ok(None);
        }
        let mut base = dir.secrets().join("ssh");
        crate::secrets::private_dir(&base).map_err(|e| format!("creating {}: {e}", base.display()))?;
        let mut short = None;
        // "/<index>" after the directory.
        if base.as_os_str().len() + 4 > SUN_PATH_BYTES {
            let tmp = tempfile::Builder::new()
                .prefix("braid-ssh-")
                .tempdir()
                .map_err(|e| format!("a short directory for --ssh sockets: {e}"))?;
            std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o700)).map_err(|e| e.to_string())?;
            base = tmp.path().to_owned();
            short = Some(tmp);
        }
        let stop = CancellationToken::new();
        let (accepted_tx, accepted_rx) = mpsc::channel(limits::SSH_CONNECTIONS);
        let mut sockets = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let path = base.join(i.to_string());
            if path.as_os_str().len() > SUN_PATH_BYTES {
                return Err(format!("--ssh socket path {} is too long for a unix socket", path.display()));
            }
            let listener =
                UnixListener::bind(&path).map_err(|e| format!("--ssh {id}: binding {}: {e}", path.display()))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| format!("--ssh {id}: {e}"))?;
            tokio::spawn(accept(listener, id.clone(), accepted_tx.clone(), stop.clone()));
            sockets.push((id.clone(), path));
        }
        let lease = proto::SshAgentFrame {
            job_id: a.job_id.clone(),
            attempt: a.attempt,
            lease_id: a.lease_id.clone(),
            frame: None,
        };
        let span = tracing::info_span!("ssh", job_id = %a.job_id, attempt = a.attempt);
        span.in_scope(|| {
            let paths: Vec<String> = sockets.iter().map(|(_, p)| p.display().to_string()).collect();
            tracing::info!(?paths, "ssh sockets ready");
        });
        tokio::spawn(tunnel(settings.clone(), lease, accepted_rx, stop.clone()).instrument(span));
        Ok(Some(SshSockets { sockets, stop, _short: short }))
    }
}

impl Drop for SshSockets {
    fn drop(&mut self) {
        self.stop.cancel();
        for (_, path) in &self.sockets {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Hands each connection a step makes to the tunnel, until the job stops.
async fn accept(listener: UnixListener, id: String, to: mpsc::Sender<(String, UnixStream)>, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => return,
        };
        match accepted {
            // A full queue (the bound of open connections) drops the stream: closed.
            Ok((stream, _)) => {
                let _ = to.try_send((id.clone(), stream));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepting an ssh connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

type Out = mpsc::Sender<proto::SshAgentFrame>;

fn frame(conn: u64, ssh_id: &str, kind: Kind) -> proto::SshAgentFrame {
    proto::SshAgentFrame {
        frame: Some(proto::SshFrame { conn, ssh_id: ssh_id.to_owned(), kind: Some(kind) }),
        ..Default::default()
    }
}

/// Keeps a stream to the coordinator while the job runs (reopened after a
/// break, with backoff); connections made while there is none are closed.
async fn tunnel(
    settings: Valid,
    lease: proto::SshAgentFrame,
    mut accepted: mpsc::Receiver<(String, UnixStream)>,
    stop: CancellationToken,
) {
    let mut next_conn = 0u64;
    let mut delay = Duration::from_millis(200);
    loop {
        let opened = tokio::select! {
            opened = open(&settings, lease.clone()) => opened,
            () = stop.cancelled() => return,
        };
        match opened {
            Ok((out, inbound)) => {
                delay = Duration::from_millis(200);
                let ended = serve(out, inbound, &mut accepted, &mut next_conn, &stop).await;
                match ended {
                    None => return,
                    Some(why) => tracing::info!(why, "ssh tunnel closed; reopening"),
                }
            }
            // Refusals too: after a coordinator restart the lease may be
            // known again only once this agent's session is back. The job's
            // end stops the retries.
            Err(e) => tracing::info!(code = ?e.code(), error = %e.message(), "ssh tunnel unavailable; retrying"),
        }
        // Meanwhile a step's connection finds no agent: closed at once.
        let wait = tokio::time::sleep(delay);
        tokio::pin!(wait);
        loop {
            tokio::select! {
                () = &mut wait => break,
                a = accepted.recv() => if a.is_none() { return },
                () = stop.cancelled() => return,
            }
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

async fn open(
    settings: &Valid,
    lease: proto::SshAgentFrame,
) -> Result<(Out, tonic::Streaming<proto::SshAgentFrame>), tonic::Status> {
    let channel = settings.connect().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let (out, rx) = mpsc::channel(limits::SSH_BUFFERED_FRAMES);
    out.send(lease).await.map_err(|_| tonic::Status::unavailable("ssh tunnel closed"))?;
    let inbound = AgentsClient::new(channel).ssh_tunnel(tokio_stream::wrappers::ReceiverStream::new(rx)).await?;
    Ok((out, inbound.into_inner()))
}

/// Serves one stream; `None` once the job stops, else why the stream ended.
async fn serve(
    out: Out,
    mut inbound: tonic::Streaming<proto::SshAgentFrame>,
    accepted: &mut mpsc::Receiver<(String, UnixStream)>,
    next_conn: &mut u64,
    stop: &CancellationToken,
) -> Option<String> {
    // Dropping a connection's sender ends it (its socket is closed).
    let mut conns: HashMap<u64, mpsc::Sender<Vec<u8>>> = HashMap::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => return None,
            a = accepted.recv() => {
                let (id, stream) = a?;
                conns.retain(|_, tx| !tx.is_closed());
                if conns.len() >= limits::SSH_CONNECTIONS {
                    continue;
                }
                *next_conn += 1;
                let conn = *next_conn;
                let (tx, rx) = mpsc::channel(limits::SSH_BUFFERED_FRAMES);
                conns.insert(conn, tx);
                if out.send(frame(conn, &id, Kind::Open(true))).await.is_err() {
                    return Some("the stream closed".into());
                }
                tokio::spawn(pump(conn, stream, rx, out.clone(), stop.child_token()));
            }
            m = inbound.message() => match m {
                Ok(Some(m)) => match m.frame.and_then(|f| Some((f.conn, f.kind?))) {
                    Some((conn, Kind::Data(bytes))) => {
                        if let Some(tx) = conns.get(&conn) && tx.send(bytes).await.is_err() {
                            conns.remove(&conn);
                        }
                    }
                    Some((conn, Kind::Close(_))) => {
                        conns.remove(&conn);
                    }
                    _ => {}
                },
                Ok(None) => return Some("the coordinator ended it".into()),
                Err(e) => return Some(e.message().to_owned()),
            },
        }
    }
}

/// Carries one connection's bytes both ways until either side closes it.
async fn pump(conn: u64, stream: UnixStream, mut from: mpsc::Receiver<Vec<u8>>, out: Out, stop: CancellationToken) {
    let (mut reader, mut writer) = stream.into_split();
    let mut buf = vec![0u8; READ_BYTES];
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            n = reader.read(&mut buf) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if out.send(frame(conn, "", Kind::Data(buf[..n].to_vec()))).await.is_err() {
                        return;
                    }
                }
            },
            bytes = from.recv() => match bytes {
                Some(bytes) => {
                    if writer.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
                None => break,
            },
        }
    }
    let _ = out.send(frame(conn, "", Kind::Close(true))).await;
}
