//! `--ssh` relay: the connections a job's steps open on the agent's socket
//! (`SshTunnel`, one stream per job) go to the client that submitted the
//! build (`ForwardSsh`, one stream per build), and back.
//!
//! Memory only, and bounded: each stream has a queue of
//! `limits::SSH_BUFFERED_FRAMES` frames of at most `limits::SSH_FRAME_BYTES`
//! (a full queue holds back the sender's stream), and a job has at most
//! `limits::SSH_CONNECTIONS` connections open. A connection opened while no
//! client serves the build, for an id the build was not given, or past the
//! bound is closed at once (the step then fails as ssh does without an
//! agent). A frame for a connection the relay does not know is dropped. The
//! bytes are never logged: only ids and counts are.
//!
//! The routing is decided under one lock and returned as `Deliver`s; the
//! services send them (awaiting room) off the lock.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::mpsc;

use braid_shared::limits;
use braid_shared::proto::{self, ssh_frame::Kind};

pub type ClientTx = mpsc::Sender<Result<proto::SshServerFrame, tonic::Status>>;
pub type AgentTx = mpsc::Sender<Result<proto::SshAgentFrame, tonic::Status>>;

/// A frame to send, decided by the relay, sent by the caller.
#[derive(Debug)]
pub enum Deliver {
    ToClient(ClientTx, proto::SshServerFrame),
    ToAgent(AgentTx, proto::SshAgentFrame),
}

impl Deliver {
    /// Sends, waiting for room in the receiver's queue; a receiver that is
    /// gone has been detached already.
    pub async fn deliver(self) {
        match self {
            Deliver::ToClient(tx, frame) => {
                let _ = tx.send(Ok(frame)).await;
            }
            Deliver::ToAgent(tx, frame) => {
                let _ = tx.send(Ok(frame)).await;
            }
        }
    }
}

/// Reads one side's stream (an agent's tunnel or a client's) until it ends,
/// first sending what attaching it decided (`replaced`), then routing each
/// message with `route` and sending what that decides. A malformed frame
/// ends the stream with InvalidArgument on `errors`. Returns why it ended
/// (None: closed by the other side).
pub async fn pump<M, T>(
    inbound: &mut tonic::Streaming<M>,
    replaced: Vec<Deliver>,
    errors: &mpsc::Sender<Result<T, tonic::Status>>,
    mut route: impl FnMut(M) -> Result<Option<Deliver>, FrameError>,
) -> Option<String> {
    for send in replaced {
        send.deliver().await;
    }
    loop {
        match inbound.message().await {
            Ok(Some(m)) => match route(m) {
                Ok(Some(send)) => send.deliver().await,
                Ok(None) => {}
                Err(e) => {
                    let _ = errors.send(Err(tonic::Status::invalid_argument(e.to_string()))).await;
                    return Some(e.to_string());
                }
            },
            Ok(None) => return None,
            Err(e) => return Some(e.message().to_owned()),
        }
    }
}

/// A malformed frame: ends the stream that sent it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame: required")]
    Missing,
    #[error("frame.kind: required (open, data or close)")]
    NoKind,
    #[error("frame.data: {0} bytes is more than the limit of {max}", max = limits::SSH_FRAME_BYTES)]
    TooLarge(usize),
}

struct Client {
    id: u64,
    tx: ClientTx,
}

struct Tunnel {
    id: u64,
    build_id: String,
    ssh_ids: Vec<String>,
    tx: AgentTx,
    conns: HashSet<u64>,
}

#[derive(Default)]
struct Relay {
    next_id: u64,
    /// The client serving each build.
    clients: HashMap<String, Client>,
    /// The agent's tunnel of each running job.
    tunnels: HashMap<String, Tunnel>,
}

/// Every live `--ssh` stream of the coordinator.
#[derive(Default, Clone)]
pub struct SshRelay(Arc<Mutex<Relay>>);

fn close(conn: u64) -> proto::SshFrame {
    proto::SshFrame { conn, ssh_id: String::new(), kind: Some(Kind::Close(true)) }
}

fn to_agent(tx: &AgentTx, frame: proto::SshFrame) -> Deliver {
    Deliver::ToAgent(tx.clone(), proto::SshAgentFrame { frame: Some(frame), ..Default::default() })
}

fn to_client(tx: &ClientTx, job_id: &str, frame: proto::SshFrame) -> Deliver {
    Deliver::ToClient(tx.clone(), proto::SshServerFrame { job_id: job_id.to_owned(), frame: Some(frame) })
}

/// The frame of a message, checked.
fn checked(frame: Option<proto::SshFrame>) -> Result<(proto::SshFrame, Kind), FrameError> {
    let mut frame = frame.ok_or(FrameError::Missing)?;
    let kind = frame.kind.take().ok_or(FrameError::NoKind)?;
    if let Kind::Data(bytes) = &kind
        && bytes.len() > limits::SSH_FRAME_BYTES
    {
        return Err(FrameError::TooLarge(bytes.len()));
    }
    Ok((frame, kind))
}

/// Removes the stream it stands for from the relay when dropped, closing
/// its connections on the other side.
pub struct Attached {
    relay: SshRelay,
    key: Key,
}

enum Key {
    Client { build_id: String, id: u64 },
    Tunnel { job_id: String, id: u64 },
}

impl Drop for Attached {
    fn drop(&mut self) {
        let sends = match &self.key {
            Key::Client { build_id, id } => self.relay.detach_client(build_id, *id),
            Key::Tunnel { job_id, id } => self.relay.detach_tunnel(job_id, *id),
        };
        // Closes only, at most one per open connection: sent in the
        // background, since a drop cannot wait for room.
        if !sends.is_empty() && tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(async move {
                for send in sends {
                    send.deliver().await;
                }
            });
        }
    }
}

impl SshRelay {
    fn lock(&self) -> MutexGuard<'_, Relay> {
        // Every change below leaves the maps whole.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `tx` the client serving `build_id` (a newer stream replaces an
    /// older one, whose connections are closed).
    pub fn attach_client(&self, build_id: &str, tx: ClientTx) -> (Attached, Vec<Deliver>) {
        let mut relay = self.lock();
        relay.next_id += 1;
        let id = relay.next_id;
        let replaced = relay.clients.insert(build_id.to_owned(), Client { id, tx }).is_some();
        let sends = if replaced { close_build_conns(&mut relay, build_id) } else { Vec::new() };
        drop(relay);
        (Attached { relay: self.clone(), key: Key::Client { build_id: build_id.to_owned(), id } }, sends)
    }

    /// Makes `tx` the tunnel of `job_id` (a newer one replaces an older one,
    /// whose connections are closed on the client).
    pub fn attach_tunnel(
        &self,
        job_id: &str,
        build_id: &str,
        ssh_ids: Vec<String>,
        tx: AgentTx,
    ) -> (Attached, Vec<Deliver>) {
        let mut relay = self.lock();
        relay.next_id += 1;
        let id = relay.next_id;
        let tunnel = Tunnel { id, build_id: build_id.to_owned(), ssh_ids, tx, conns: HashSet::new() };
        let sends = match relay.tunnels.insert(job_id.to_owned(), tunnel) {
            Some(old) => closes_to_client(&relay, job_id, &old),
            None => Vec::new(),
        };
        drop(relay);
        (Attached { relay: self.clone(), key: Key::Tunnel { job_id: job_id.to_owned(), id } }, sends)
    }

    fn detach_client(&self, build_id: &str, id: u64) -> Vec<Deliver> {
        let mut relay = self.lock();
        if relay.clients.get(build_id).is_none_or(|c| c.id != id) {
            return Vec::new();
        }
        relay.clients.remove(build_id);
        close_build_conns(&mut relay, build_id)
    }

    fn detach_tunnel(&self, job_id: &str, id: u64) -> Vec<Deliver> {
        let mut relay = self.lock();
        if relay.tunnels.get(job_id).is_none_or(|t| t.id != id) {
            return Vec::new();
        }
        match relay.tunnels.remove(job_id) {
            Some(old) => closes_to_client(&relay, job_id, &old),
            None => Vec::new(),
        }
    }

    /// Routes a frame from the agent's tunnel of `job_id`.
    pub fn from_agent(&self, job_id: &str, frame: Option<proto::SshFrame>) -> Result<Option<Deliver>, FrameError> {
        let (frame, kind) = checked(frame)?;
        let mut relay = self.lock();
        let relay = &mut *relay;
        let Some(tunnel) = relay.tunnels.get_mut(job_id) else { return Ok(None) };
        let client = relay.clients.get(&tunnel.build_id);
        let conn = frame.conn;
        Ok(match (kind, client) {
            (Kind::Open(_), _) if tunnel.conns.contains(&conn) => None,
            (Kind::Open(_), Some(client))
                if tunnel.conns.len() < limits::SSH_CONNECTIONS && tunnel.ssh_ids.contains(&frame.ssh_id) =>
            {
                tunnel.conns.insert(conn);
                tracing::debug!(job_id, conn, ssh_id = %frame.ssh_id, "ssh connection opened");
                Some(to_client(&client.tx, job_id, proto::SshFrame { kind: Some(Kind::Open(true)), ..frame }))
            }
            (Kind::Open(_), _) => Some(to_agent(&tunnel.tx, close(conn))),
            (_, _) if !tunnel.conns.contains(&conn) => None,
            (Kind::Data(bytes), Some(client)) => Some(to_client(
                &client.tx,
                job_id,
                proto::SshFrame { conn, ssh_id: String::new(), kind: Some(Kind::Data(bytes)) },
            )),
            (Kind::Data(_), None) => {
                tunnel.conns.remove(&conn);
                Some(to_agent(&tunnel.tx, close(conn)))
            }
            (Kind::Close(_), client) => {
                tunnel.conns.remove(&conn);
                client.map(|c| to_client(&c.tx, job_id, close(conn)))
            }
        })
    }

    /// Routes a frame from the client serving `build_id`, for a connection
    /// of `job_id`.
    pub fn from_client(
        &self,
        build_id: &str,
        job_id: &str,
        frame: Option<proto::SshFrame>,
    ) -> Result<Option<Deliver>, FrameError> {
        let (frame, kind) = checked(frame)?;
        let mut relay = self.lock();
        let conn = frame.conn;
        let known = relay.tunnels.get(job_id).filter(|t| t.build_id == build_id && t.conns.contains(&conn)).is_some();
        if !known {
            // Tell a client that still sends that the connection is gone.
            return Ok(match kind {
                Kind::Data(_) => relay.clients.get(build_id).map(|c| to_client(&c.tx, job_id, close(conn))),
                Kind::Open(_) | Kind::Close(_) => None,
            });
        }
        let Some(tunnel) = relay.tunnels.get_mut(job_id) else { return Ok(None) };
        Ok(match kind {
            Kind::Open(_) => None,
            Kind::Data(bytes) => Some(to_agent(
                &tunnel.tx,
                proto::SshFrame { conn, ssh_id: String::new(), kind: Some(Kind::Data(bytes)) },
            )),
            Kind::Close(_) => {
                tunnel.conns.remove(&conn);
                Some(to_agent(&tunnel.tx, close(conn)))
            }
        })
    }

    /// Connections open now, over all jobs (for tests and metrics).
    pub fn open_connections(&self) -> usize {
        self.lock().tunnels.values().map(|t| t.conns.len()).sum()
    }
}

/// Closes every connection of `build_id`'s tunnels on the agents' side.
fn close_build_conns(relay: &mut Relay, build_id: &str) -> Vec<Deliver> {
    let mut sends = Vec::new();
    for tunnel in relay.tunnels.values_mut().filter(|t| t.build_id == build_id) {
        for conn in tunnel.conns.drain() {
            sends.push(to_agent(&tunnel.tx, close(conn)));
        }
    }
    sends
}

/// Closes an ended tunnel's connections on the client.
fn closes_to_client(relay: &Relay, job_id: &str, old: &Tunnel) -> Vec<Deliver> {
    match relay.clients.get(&old.build_id) {
        Some(client) => old.conns.iter().map(|&conn| to_client(&client.tx, job_id, close(conn))).collect(),
        None => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn open(conn: u64, id: &str) -> Option<proto::SshFrame> {
        Some(proto::SshFrame { conn, ssh_id: id.into(), kind: Some(Kind::Open(true)) })
    }

    fn data(conn: u64, bytes: &[u8]) -> Option<proto::SshFrame> {
        Some(proto::SshFrame { conn, ssh_id: String::new(), kind: Some(Kind::Data(bytes.to_vec())) })
    }

    fn kind_of(send: Option<Deliver>) -> (&'static str, Option<Kind>) {
        match send {
            None => ("dropped", None),
            Some(Deliver::ToClient(_, f)) => ("client", f.frame.and_then(|f| f.kind)),
            Some(Deliver::ToAgent(_, f)) => ("agent", f.frame.and_then(|f| f.kind)),
        }
    }

    #[tokio::test]
    async fn frames_are_relayed_both_ways_within_the_limits() {
        let relay = SshRelay::default();
        let (agent_tx, _agent_rx) = mpsc::channel(limits::SSH_BUFFERED_FRAMES);
        let (_tunnel, _) = relay.attach_tunnel("j1", "b1", vec!["default".into()], agent_tx);

        // No client yet: the connection is closed at once.
        assert_eq!(kind_of(relay.from_agent("j1", open(1, "default")).unwrap()), ("agent", Some(Kind::Close(true))));
        let (client_tx, _client_rx) = mpsc::channel(limits::SSH_BUFFERED_FRAMES);
        let (client, _) = relay.attach_client("b1", client_tx);
        // An id the build was not given is closed too.
        assert_eq!(kind_of(relay.from_agent("j1", open(2, "other")).unwrap()), ("agent", Some(Kind::Close(true))));
        assert_eq!(kind_of(relay.from_agent("j1", open(3, "default")).unwrap()), ("client", Some(Kind::Open(true))));
        assert_eq!(
            kind_of(relay.from_agent("j1", data(3, b"req")).unwrap()),
            ("client", Some(Kind::Data(b"req".to_vec())))
        );
        assert_eq!(
            kind_of(relay.from_client("b1", "j1", data(3, b"ans")).unwrap()),
            ("agent", Some(Kind::Data(b"ans".to_vec())))
        );
        // Unknown connections, and other builds' clients, go nowhere.
        assert_eq!(kind_of(relay.from_agent("j1", data(9, b"x")).unwrap()).0, "dropped");
        assert_eq!(kind_of(relay.from_client("b2", "j1", data(3, b"x")).unwrap()).0, "dropped");
        assert_eq!(kind_of(relay.from_client("b1", "j1", data(9, b"x")).unwrap()), ("client", Some(Kind::Close(true))));
        // Oversized and empty frames are refused.
        let big = vec![0u8; limits::SSH_FRAME_BYTES + 1];
        assert_eq!(relay.from_agent("j1", data(3, &big)).unwrap_err(), FrameError::TooLarge(big.len()));
        assert_eq!(relay.from_client("b1", "j1", None).unwrap_err(), FrameError::Missing);
        assert_eq!(relay.from_agent("j1", Some(proto::SshFrame::default())).unwrap_err(), FrameError::NoKind);

        // At most SSH_CONNECTIONS per job.
        for conn in 100..100 + limits::SSH_CONNECTIONS as u64 - 1 {
            assert_eq!(kind_of(relay.from_agent("j1", open(conn, "default")).unwrap()).0, "client");
        }
        assert_eq!(relay.open_connections(), limits::SSH_CONNECTIONS);
        assert_eq!(kind_of(relay.from_agent("j1", open(999, "default")).unwrap()), ("agent", Some(Kind::Close(true))));

        // The client leaves: every connection is closed on the agent.
        drop(client);
        assert_eq!(relay.open_connections(), 0);
        assert_eq!(kind_of(relay.from_agent("j1", data(3, b"x")).unwrap()).0, "dropped");
    }

    #[tokio::test]
    async fn a_closed_connection_and_an_ended_tunnel_are_forgotten() {
        let relay = SshRelay::default();
        let (agent_tx, _a) = mpsc::channel(4);
        let (client_tx, mut client_rx) = mpsc::channel(4);
        let (_client, _) = relay.attach_client("b", client_tx);
        let (tunnel, _) = relay.attach_tunnel("j", "b", vec!["k".into()], agent_tx);
        relay.from_agent("j", open(1, "k")).unwrap();
        relay.from_agent("j", open(2, "k")).unwrap();
        let closed = Some(proto::SshFrame { conn: 1, ssh_id: String::new(), kind: Some(Kind::Close(true)) });
        assert_eq!(kind_of(relay.from_client("b", "j", closed).unwrap()), ("agent", Some(Kind::Close(true))));
        assert_eq!(relay.open_connections(), 1);
        drop(tunnel);
        assert_eq!(relay.open_connections(), 0);
        // The client hears that connection 2 is closed.
        let frame = client_rx.recv().await.unwrap().unwrap();
        assert_eq!((frame.job_id.as_str(), frame.frame.unwrap().conn), ("j", 2));
        assert_eq!(kind_of(relay.from_client("b", "j", data(2, b"x")).unwrap()), ("client", Some(Kind::Close(true))));
    }
}
