//! `braid build --ssh`: the client's SSH agents, served to the build's
//! `RUN --mount=type=ssh` steps as BuildKit serves them. No key leaves this
//! machine: the agents running the build relay each connection a step opens
//! (through the coordinator, `ForwardSsh`) to a local agent, and only
//! ssh-agent protocol messages travel.
//!
//! As BuildKit's, the forwarded agent is read-only: a step may list the
//! identities and ask for signatures; adding, removing, locking and
//! extensions are answered with a failure here and never reach the agent.
//!
//! `--ssh ID=KEY[,KEY...]` starts a private `ssh-agent` (OpenSSH's, in a
//! 0700 temporary directory), loads the keys with `ssh-add` and stops it
//! when the command ends: key files need OpenSSH's client tools here.

use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use braid_shared::limits;
use braid_shared::proto::{self, ssh_frame::Kind};
use braid_shared::ssh::SshSpec;

use crate::conn::Conn;
use crate::reconnect::{self, Patience};

/// The local agent socket of each `--ssh` id, and the private agents
/// started for key files (stopped when this is dropped).
pub struct Agents {
    sockets: HashMap<String, PathBuf>,
    _private: Vec<PrivateAgent>,
}

impl Agents {
    /// Resolves every `--ssh` value before anything is uploaded: a missing
    /// `SSH_AUTH_SOCK`, socket or key file is refused by name.
    pub fn prepare(raw: &[String]) -> anyhow::Result<Option<Agents>> {
        let specs = braid_shared::ssh::parse_specs(raw).map_err(|e| anyhow::anyhow!("--ssh: {e}"))?;
        if specs.is_empty() {
            return Ok(None);
        }
        let mut agents = Agents { sockets: HashMap::new(), _private: Vec::new() };
        for spec in specs {
            let socket = match resolve(&spec)? {
                Source::Socket(path) => path,
                Source::Keys(keys) => {
                    let private = PrivateAgent::start(&spec.id, &keys)?;
                    let socket = private.socket.clone();
                    agents._private.push(private);
                    socket
                }
            };
            agents.sockets.insert(spec.id, socket);
        }
        Ok(Some(agents))
    }

    /// The ids, for the build spec.
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.sockets.keys().cloned().collect();
        ids.sort();
        ids
    }

    pub fn sockets(&self) -> Arc<HashMap<String, PathBuf>> {
        Arc::new(self.sockets.clone())
    }
}

enum Source {
    Socket(PathBuf),
    Keys(Vec<PathBuf>),
}

fn is_socket(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// As BuildKit: no path is `$SSH_AUTH_SOCK`; one socket is that agent;
/// anything else is a list of private key files.
fn resolve(spec: &SshSpec) -> anyhow::Result<Source> {
    let id = &spec.id;
    if spec.paths.is_empty() {
        let sock = std::env::var_os("SSH_AUTH_SOCK").filter(|s| !s.is_empty()).with_context(|| {
            format!(
                "--ssh {id}: SSH_AUTH_SOCK is not set; start an ssh-agent (eval $(ssh-agent); ssh-add) \
                 or give --ssh {id}=SOCKET or --ssh {id}=KEYFILE"
            )
        })?;
        let sock = PathBuf::from(sock);
        if !is_socket(&sock) {
            bail!("--ssh {id}: SSH_AUTH_SOCK {sock:?} is not a socket (is the ssh-agent still running?)");
        }
        return Ok(Source::Socket(sock));
    }
    if let [one] = &spec.paths[..]
        && is_socket(Path::new(one))
    {
        return Ok(Source::Socket(PathBuf::from(one)));
    }
    let mut keys = Vec::new();
    for path in &spec.paths {
        let meta = std::fs::metadata(path).with_context(|| format!("--ssh {id}: reading key file {path:?}"))?;
        if !meta.is_file() {
            bail!("--ssh {id}: {path:?} is neither an agent socket nor a key file");
        }
        keys.push(PathBuf::from(path));
    }
    Ok(Source::Keys(keys))
}

/// An `ssh-agent` of this command's own, holding the keys of one id.
struct PrivateAgent {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl PrivateAgent {
    fn start(id: &str, keys: &[PathBuf]) -> anyhow::Result<PrivateAgent> {
        let dir = tempfile::Builder::new().prefix("braid-ssh-").tempdir().context("--ssh: a temporary directory")?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))?;
        let socket = dir.path().join("agent.sock");
        let child = Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| missing_tool("ssh-agent", id, e))?;
        let mut agent = PrivateAgent { child, socket, _dir: dir };
        let started = std::time::Instant::now();
        while !is_socket(&agent.socket) {
            if let Ok(Some(status)) = agent.child.try_wait() {
                bail!("--ssh {id}: ssh-agent exited ({status}) before it listened");
            }
            if started.elapsed() > Duration::from_secs(10) {
                bail!("--ssh {id}: ssh-agent did not listen within 10 seconds");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // The terminal stays ssh-add's, so a key's passphrase can be typed.
        let status = Command::new("ssh-add")
            .arg("-q")
            .args(keys)
            .env("SSH_AUTH_SOCK", &agent.socket)
            .status()
            .map_err(|e| missing_tool("ssh-add", id, e))?;
        if !status.success() {
            bail!("--ssh {id}: ssh-add could not load {keys:?} ({status})");
        }
        Ok(agent)
    }
}

fn missing_tool(tool: &str, id: &str, e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        anyhow::anyhow!(
            "--ssh {id}: key files need OpenSSH's {tool} on this machine (Debian and Ubuntu: openssh-client); \
             or forward a running agent with --ssh {id}=SOCKET"
        )
    } else {
        anyhow::anyhow!("--ssh {id}: starting {tool}: {e}")
    }
}

impl Drop for PrivateAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Serves `build_id`'s connections until the task is aborted (the build
/// ended) or the coordinator says the build has ended; reopens the stream
/// after a coordinator restart, for as long as `limit` allows an outage.
pub async fn serve(conn: Conn, build_id: String, sockets: Arc<HashMap<String, PathBuf>>, limit: Duration) {
    if let Err(e) = serve_until_ended(&conn, &build_id, &sockets, limit).await {
        crate::diag::warn(&format!("--ssh: no longer serving build {build_id}'s SSH connections: {e:#}"));
    }
}

async fn serve_until_ended(
    conn: &Conn,
    build_id: &str,
    sockets: &Arc<HashMap<String, PathBuf>>,
    limit: Duration,
) -> anyhow::Result<()> {
    let mut patience = Patience::new(limit);
    loop {
        let mut client = patience.connect(|| conn.builds()).await?;
        let (tx, rx) = mpsc::channel(limits::SSH_BUFFERED_FRAMES);
        let first = proto::SshClientFrame { build_id: build_id.to_owned(), ..Default::default() };
        tx.send(first).await.map_err(|_| anyhow::anyhow!("the stream closed"))?;
        let inbound = match client.forward_ssh(tokio_stream::wrappers::ReceiverStream::new(rx)).await {
            Ok(r) => r.into_inner(),
            Err(e) if reconnect::transient(&e) => {
                patience.wait(&e.message()).await?;
                continue;
            }
            Err(e) if e.code() == tonic::Code::FailedPrecondition => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        patience.recovered();
        match relay(inbound, tx, sockets).await {
            Ok(()) => patience.wait(&"the coordinator closed the --ssh stream").await?,
            Err(e) if reconnect::transient(&e) => patience.wait(&e.message()).await?,
            Err(e) => return Err(e.into()),
        }
    }
}

type Out = mpsc::Sender<proto::SshClientFrame>;

fn frame(job_id: &str, conn: u64, kind: Kind) -> proto::SshClientFrame {
    proto::SshClientFrame {
        build_id: String::new(),
        job_id: job_id.to_owned(),
        frame: Some(proto::SshFrame { conn, ssh_id: String::new(), kind: Some(kind) }),
    }
}

/// One stream's connections: each open starts a connection to the local
/// agent of its id; data goes to it, a close ends it.
async fn relay(
    mut inbound: tonic::Streaming<proto::SshServerFrame>,
    out: Out,
    sockets: &Arc<HashMap<String, PathBuf>>,
) -> Result<(), tonic::Status> {
    let mut conns: HashMap<(String, u64), mpsc::Sender<Vec<u8>>> = HashMap::new();
    while let Some(m) = inbound.message().await? {
        let Some(proto::SshFrame { conn, ssh_id, kind: Some(kind) }) = m.frame else { continue };
        let key = (m.job_id, conn);
        match kind {
            Kind::Open(_) => {
                conns.retain(|_, tx| !tx.is_closed());
                match sockets.get(&ssh_id) {
                    Some(socket) if conns.len() < limits::SSH_CONNECTIONS * 4 && !conns.contains_key(&key) => {
                        let (tx, rx) = mpsc::channel(limits::SSH_BUFFERED_FRAMES);
                        tokio::spawn(connection(socket.clone(), rx, out.clone(), key.0.clone(), conn));
                        conns.insert(key, tx);
                    }
                    _ => {
                        let _ = out.send(frame(&key.0, conn, Kind::Close(true))).await;
                    }
                }
            }
            Kind::Data(bytes) => {
                if let Some(tx) = conns.get(&key)
                    && tx.send(bytes).await.is_err()
                {
                    conns.remove(&key);
                }
            }
            Kind::Close(_) => {
                conns.remove(&key);
            }
        }
    }
    Ok(())
}

/// One connection to the local agent, ended by a close (its requests end)
/// or by the agent; either way the other side hears a close.
async fn connection(socket: PathBuf, requests: mpsc::Receiver<Vec<u8>>, out: Out, job_id: String, conn: u64) {
    let send = |bytes: Vec<u8>| frame(&job_id, conn, Kind::Data(bytes));
    let _ = read_only(&socket, requests, &out, send).await;
    let _ = out.send(frame(&job_id, conn, Kind::Close(true))).await;
}

/// The ssh-agent protocol's requests a forwarded agent answers (BuildKit's
/// read-only agent): list identities (11) and sign (13).
const ALLOWED: [u8; 2] = [11, 13];
/// `SSH_AGENT_FAILURE`, as a whole message.
const FAILURE: [u8; 5] = [0, 0, 0, 1, 5];

/// Takes one whole message (length prefix included) off the front of
/// `pending`, if it holds one; a length past the protocol's bound is refused.
fn take_message(pending: &mut Vec<u8>) -> std::io::Result<Option<Vec<u8>>> {
    let Some(head) = pending.first_chunk::<4>() else { return Ok(None) };
    let len = u32::from_be_bytes(*head) as usize;
    if len > limits::SSH_FRAME_BYTES {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "ssh-agent message too long"));
    }
    if pending.len() < 4 + len {
        return Ok(None);
    }
    let rest = pending.split_off(4 + len);
    Ok(Some(std::mem::replace(pending, rest)))
}

/// Answers whole requests one at a time: allowed ones by the local agent,
/// others with a failure of our own.
async fn read_only(
    socket: &Path,
    mut requests: mpsc::Receiver<Vec<u8>>,
    out: &Out,
    data: impl Fn(Vec<u8>) -> proto::SshClientFrame,
) -> std::io::Result<()> {
    let mut agent = UnixStream::connect(socket).await?;
    let mut pending = Vec::new();
    loop {
        let request = loop {
            if let Some(message) = take_message(&mut pending)? {
                break message;
            }
            match requests.recv().await {
                Some(bytes) => pending.extend_from_slice(&bytes),
                None => return Ok(()),
            }
        };
        let answer = if request.get(4).is_some_and(|t| ALLOWED.contains(t)) {
            agent.write_all(&request).await?;
            let mut head = [0u8; 4];
            agent.read_exact(&mut head).await?;
            let len = u32::from_be_bytes(head) as usize;
            if len > limits::SSH_FRAME_BYTES {
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "ssh-agent answer too long"));
            }
            let mut answer = vec![0u8; 4 + len];
            answer[..4].copy_from_slice(&head);
            agent.read_exact(&mut answer[4..]).await?;
            answer
        } else {
            FAILURE.to_vec()
        };
        for chunk in answer.chunks(limits::SSH_FRAME_BYTES) {
            if out.send(data(chunk.to_vec())).await.is_err() {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn message(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut m = ((body.len() + 1) as u32).to_be_bytes().to_vec();
        m.push(kind);
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn messages_are_taken_whole_and_bounded() {
        let mut pending = message(11, b"");
        pending.extend_from_slice(&message(13, b"abc")[..5]);
        assert_eq!(take_message(&mut pending).unwrap(), Some(message(11, b"")));
        assert_eq!(take_message(&mut pending).unwrap(), None, "half a message waits");
        pending.extend_from_slice(&message(13, b"abc")[5..]);
        assert_eq!(take_message(&mut pending).unwrap(), Some(message(13, b"abc")));
        assert!(pending.is_empty());
        let mut huge = ((limits::SSH_FRAME_BYTES + 1) as u32).to_be_bytes().to_vec();
        assert!(take_message(&mut huge).is_err());
    }

    /// A fake agent that records what reaches it and answers each request
    /// with an identities answer.
    async fn fake_agent(socket: PathBuf) -> mpsc::UnboundedReceiver<u8> {
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let (seen, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            loop {
                let mut head = [0u8; 4];
                if s.read_exact(&mut head).await.is_err() {
                    return;
                }
                let mut body = vec![0u8; u32::from_be_bytes(head) as usize];
                s.read_exact(&mut body).await.unwrap();
                seen.send(body[0]).unwrap();
                s.write_all(&message(12, &[0, 0, 0, 0])).await.unwrap();
            }
        });
        rx
    }

    #[tokio::test]
    async fn the_forwarded_agent_is_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let mut seen = fake_agent(socket.clone()).await;
        let (req_tx, req_rx) = mpsc::channel(4);
        let (out_tx, mut out_rx) = mpsc::channel(16);
        tokio::spawn(connection(socket, req_rx, out_tx, "job".into(), 7));
        let answer = |f: proto::SshClientFrame| match f.frame.unwrap().kind.unwrap() {
            Kind::Data(b) => b,
            other => panic!("{other:?}"),
        };
        // Remove-all (19), split over two frames: refused here.
        let remove_all = message(19, b"");
        req_tx.send(remove_all[..2].to_vec()).await.unwrap();
        req_tx.send(remove_all[2..].to_vec()).await.unwrap();
        assert_eq!(answer(out_rx.recv().await.unwrap()), FAILURE);
        // List identities (11): the agent answers.
        req_tx.send(message(11, b"")).await.unwrap();
        assert_eq!(answer(out_rx.recv().await.unwrap()), message(12, &[0, 0, 0, 0]));
        assert_eq!(seen.recv().await, Some(11));
        // Add identity (17) and lock (22) never reach it either.
        req_tx.send([message(17, b"key"), message(22, b"pw")].concat()).await.unwrap();
        assert_eq!(answer(out_rx.recv().await.unwrap()), FAILURE);
        assert_eq!(answer(out_rx.recv().await.unwrap()), FAILURE);
        drop(req_tx);
        let last = out_rx.recv().await.unwrap();
        assert_eq!(last.frame.as_ref().map(|f| (f.conn, f.kind.clone())), Some((7, Some(Kind::Close(true)))));
        assert!(seen.try_recv().is_err(), "only the listing reached the agent");
    }

    #[test]
    fn ssh_auth_sock_missing_is_refused_before_anything_by_name() {
        let spec = SshSpec { id: "default".into(), paths: vec![] };
        // The test process's own environment: set or not, a missing path
        // or a non-socket is refused with the id named.
        let dir = tempfile::tempdir().unwrap();
        let not_socket = dir.path().join("file");
        std::fs::write(&not_socket, "x").unwrap();
        let key_spec = SshSpec { id: "k".into(), paths: vec![dir.path().join("absent").display().to_string()] };
        let err = resolve(&key_spec).err().unwrap().to_string();
        assert!(err.contains("--ssh k: reading key file"), "{err}");
        let dir_spec = SshSpec { id: "d".into(), paths: vec![dir.path().display().to_string()] };
        assert!(resolve(&dir_spec).err().unwrap().to_string().contains("neither an agent socket nor a key file"));
        assert!(matches!(
            resolve(&SshSpec { id: "f".into(), paths: vec![not_socket.display().to_string()] }),
            Ok(Source::Keys(_))
        ));
        if std::env::var_os("SSH_AUTH_SOCK").is_none() {
            assert!(resolve(&spec).err().unwrap().to_string().contains("SSH_AUTH_SOCK is not set"));
        }
    }
}
