//! Accepting connections as production servers do, so that idle or slow
//! peers cannot hold the door shut: every new connection gets a bounded
//! time for its TLS handshake and first bytes, handshakes run concurrently
//! (never in the accept loop), those still handshaking are a small pool in
//! which a newcomer displaces the oldest, open connections per listener are
//! capped below the open-file limit, and a failing `accept` (out of file
//! descriptors) backs off instead of spinning.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Open files kept for everything but connections: the store, contexts and
/// blobs being written, exports being read, logs.
pub const RESERVED_FILES: u64 = 256;
/// Wait after a failed `accept`, doubled up to the maximum while it fails.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));
/// At most one warning of each kind per listener in this time.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// The bytes that open every HTTP/2 connection.
pub const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Bounds of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Open connections, those still handshaking included.
    pub max_connections: usize,
    /// Connections still in their handshake; past it the oldest is closed.
    pub max_pending: usize,
    /// Time a connection has for its TLS handshake and its first bytes.
    pub handshake_timeout: Duration,
}

impl ConnLimits {
    /// Limits for the gRPC and the HTTP listener: at most `max_connections`
    /// each, and together no more than the open-file limit leaves after
    /// [`RESERVED_FILES`] (gRPC, where agents and clients connect, gets three
    /// quarters); a quarter of each may be handshaking.
    pub fn split(max_connections: u32, open_files: u64, handshake_timeout: Duration) -> (ConnLimits, ConnLimits) {
        let spare = open_files.saturating_sub(RESERVED_FILES).max(64);
        let one = |share: u64| {
            let max = usize::try_from(share.min(u64::from(max_connections))).unwrap_or(usize::MAX).max(4);
            ConnLimits { max_connections: max, max_pending: (max / 4).max(2), handshake_timeout }
        };
        (one(spare * 3 / 4), one(spare / 4))
    }
}

/// A connection past its handshake. The bytes read to see which protocol it
/// speaks are replayed first; it holds its place under the listener's cap
/// until dropped.
pub struct Conn<S> {
    head: Vec<u8>,
    replayed: usize,
    inner: S,
    _slot: Slot,
}

impl<S> Conn<S> {
    /// Whether it opened with the HTTP/2 preface.
    pub fn is_h2(&self) -> bool {
        self.head.as_slice() == H2_PREFACE
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Conn<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.replayed < this.head.len() {
            let n = buf.remaining().min(this.head.len() - this.replayed);
            buf.put_slice(&this.head[this.replayed..this.replayed + n]);
            this.replayed += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Conn<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The inner stream's connection info, so `Request::peer_certs` and
/// `remote_addr` work as with tonic's own TLS.
impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for Conn<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// One established connection's place under the cap.
struct Slot(Arc<Shared>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.established.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Shared {
    name: &'static str,
    limits: ConnLimits,
    established: AtomicUsize,
    /// Connections still handshaking, oldest first, each with what closes it.
    pending: Mutex<BTreeMap<u64, CancellationToken>>,
}

/// What became of a new connection.
enum Admission {
    Admitted,
    /// Admitted by closing the oldest unfinished handshake.
    Displaced,
    /// Every place is held by an established connection.
    Refused,
}

impl Shared {
    fn pending(&self) -> MutexGuard<'_, BTreeMap<u64, CancellationToken>> {
        // A map of tokens: whole after any panic.
        self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn admit(&self, id: u64, token: CancellationToken) -> Admission {
        let mut pending = self.pending();
        let mut displaced = false;
        while pending.len() >= self.limits.max_pending
            || self.established.load(Ordering::Relaxed) + pending.len() >= self.limits.max_connections
        {
            match pending.pop_first() {
                Some((_, oldest)) => {
                    oldest.cancel();
                    displaced = true;
                }
                None => return Admission::Refused,
            }
        }
        pending.insert(id, token);
        if displaced { Admission::Displaced } else { Admission::Admitted }
    }

    /// Moves a finished handshake to the established; None if it was
    /// displaced meanwhile.
    fn establish(self: &Arc<Self>, id: u64) -> Option<Slot> {
        let mut pending = self.pending();
        pending.remove(&id)?;
        self.established.fetch_add(1, Ordering::Relaxed);
        Some(Slot(self.clone()))
    }

    fn forget(&self, id: u64) {
        self.pending().remove(&id);
    }

    fn close_oldest_pending(&self) {
        if let Some((_, oldest)) = self.pending().pop_first() {
            oldest.cancel();
        }
    }
}

/// A warning at most every [`LOG_EVERY`], counting those left out.
struct Every {
    last: Option<Instant>,
    suppressed: u64,
}

impl Every {
    fn new() -> Every {
        Every { last: None, suppressed: 0 }
    }

    /// Some(number left out since the last) when a line is due.
    fn due(&mut self) -> Option<u64> {
        if self.last.is_some_and(|t| t.elapsed() < LOG_EVERY) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Reads until the bytes differ from the HTTP/2 preface or all of it came:
/// a connection is established only once it has said something.
async fn first_bytes<S: AsyncRead + Unpin>(io: &mut S) -> io::Result<Vec<u8>> {
    let mut head = vec![0u8; H2_PREFACE.len()];
    let mut n = 0;
    while n < head.len() {
        let got = io.read(&mut head[n..]).await?;
        if got == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        n += got;
        if head[..n] != H2_PREFACE[..n] {
            break;
        }
    }
    head.truncate(n);
    Ok(head)
}

/// Accepts on `listener` in a task of its own and yields each connection
/// once `handshake` (TLS, or nothing) and its first bytes are done within
/// the timeout. The task ends when the receiver is dropped.
pub fn listen<S, H, F>(
    listener: TcpListener,
    name: &'static str,
    limits: ConnLimits,
    handshake: H,
) -> mpsc::Receiver<Conn<S>>
where
    H: Fn(TcpStream) -> F + Send + Sync + 'static,
    F: Future<Output = io::Result<S>> + Send + 'static,
    S: AsyncRead + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::channel(64);
    let shared = Arc::new(Shared { name, limits, established: AtomicUsize::new(0), pending: Mutex::default() });
    tracing::info!(
        listener = name,
        max_connections = limits.max_connections,
        max_handshaking = limits.max_pending,
        handshake_timeout_seconds = limits.handshake_timeout.as_secs(),
        "connection limits"
    );
    tokio::spawn(accept_loop(listener, shared, handshake, tx));
    rx
}

async fn accept_loop<S, H, F>(listener: TcpListener, shared: Arc<Shared>, handshake: H, tx: mpsc::Sender<Conn<S>>)
where
    H: Fn(TcpStream) -> F + Send + Sync + 'static,
    F: Future<Output = io::Result<S>> + Send + 'static,
    S: AsyncRead + Unpin + Send + 'static,
{
    let name = shared.name;
    let (mut refused_log, mut displaced_log, mut error_log) = (Every::new(), Every::new(), Every::new());
    let mut backoff = ACCEPT_BACKOFF.0;
    let mut next_id = 0u64;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = tx.closed() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(conn) => {
                backoff = ACCEPT_BACKOFF.0;
                conn
            }
            Err(e) => {
                // Out of file descriptors (EMFILE, ENFILE) or memory: closing
                // the oldest handshake frees one; retrying at once would spin.
                shared.close_oldest_pending();
                if let Some(suppressed) = error_log.due() {
                    tracing::warn!(listener = name, error = %e, suppressed, "accepting a connection failed; backing off");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF.1);
                continue;
            }
        };
        let id = next_id;
        next_id += 1;
        let token = CancellationToken::new();
        match shared.admit(id, token.clone()) {
            Admission::Admitted => {}
            Admission::Displaced => {
                if let Some(suppressed) = displaced_log.due() {
                    tracing::warn!(
                        listener = name,
                        limit = shared.limits.max_pending,
                        suppressed,
                        "handshake limit reached: closing the oldest connections that have not finished their handshake"
                    );
                }
            }
            Admission::Refused => {
                if let Some(suppressed) = refused_log.due() {
                    tracing::warn!(
                        listener = name,
                        limit = shared.limits.max_connections,
                        suppressed,
                        "connection limit reached: closing new connections (max_connections, or the open-file limit)"
                    );
                }
                continue;
            }
        }
        let _ = tcp.set_nodelay(true);
        let opening = handshake(tcp);
        let (shared, tx) = (shared.clone(), tx.clone());
        tokio::spawn(async move {
            let ready = async {
                let mut stream = opening.await?;
                let head = first_bytes(&mut stream).await?;
                Ok::<_, io::Error>((stream, head))
            };
            let outcome = tokio::select! {
                () = token.cancelled() => return,
                outcome = tokio::time::timeout(shared.limits.handshake_timeout, ready) => outcome,
            };
            match outcome {
                Ok(Ok((inner, head))) => {
                    if let Some(slot) = shared.establish(id) {
                        let _ = tx.send(Conn { head, replayed: 0, inner, _slot: slot }).await;
                    }
                }
                Ok(Err(e)) => {
                    shared.forget(id);
                    tracing::debug!(listener = shared.name, %peer, error = %e, "connection closed during its handshake");
                }
                Err(_) => {
                    shared.forget(id);
                    tracing::debug!(listener = shared.name, %peer, "handshake timed out");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn limits_fit_the_open_file_limit() {
        let t = Duration::from_secs(10);
        let (grpc, http) = ConnLimits::split(4096, 1024, t);
        assert_eq!((grpc.max_connections, grpc.max_pending), (576, 144));
        assert_eq!((http.max_connections, http.max_pending), (192, 48));
        assert!(grpc.max_connections + http.max_connections + RESERVED_FILES as usize <= 1024);
        let (grpc, http) = ConnLimits::split(4096, 1 << 20, t);
        assert_eq!((grpc.max_connections, http.max_connections), (4096, 4096));
        let (grpc, _) = ConnLimits::split(4096, 10, t);
        assert!(grpc.max_connections >= 4 && grpc.max_pending >= 2);
    }

    async fn connect(addr: std::net::SocketAddr) -> TcpStream {
        TcpStream::connect(addr).await.unwrap()
    }

    /// Reads until the peer closes; true if it did within `within`.
    async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 64];
        matches!(tokio::time::timeout(within, stream.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
    }

    #[tokio::test]
    async fn idle_connections_give_way_and_established_ones_are_capped() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = ConnLimits { max_connections: 6, max_pending: 3, handshake_timeout: Duration::from_secs(30) };
        let mut rx = listen(listener, "test", limits, |tcp| async { Ok(tcp) });

        // Idle peers: only the newest three stay; the oldest were closed.
        let mut idle = Vec::new();
        for _ in 0..5 {
            idle.push(connect(addr).await);
        }
        let second = Duration::from_secs(1);
        assert!(closed_within(&mut idle[0], second).await && closed_within(&mut idle[1], second).await);
        assert!(!closed_within(&mut idle[4], Duration::from_millis(200)).await, "the newest waits");

        // A peer that speaks is established, the first bytes replayed.
        let mut talker = connect(addr).await;
        talker.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let mut conn = tokio::time::timeout(second, rx.recv()).await.unwrap().unwrap();
        assert!(!conn.is_h2());
        let mut got = [0u8; 16];
        conn.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"GET / HTTP/1.1\r\n");

        // Five more speaking peers, one after the other: the idle ones give
        // way, and the cap of six is reached.
        let mut held = vec![conn];
        let mut peers = Vec::new();
        for _ in 0..5 {
            let mut p = connect(addr).await;
            p.write_all(H2_PREFACE).await.unwrap();
            peers.push(p);
            held.push(tokio::time::timeout(second, rx.recv()).await.unwrap().unwrap());
        }
        assert!(closed_within(&mut idle[4], second).await, "the last idle one gave way");
        assert!(held[1..].iter().all(Conn::is_h2));
        let mut refused = connect(addr).await;
        assert!(closed_within(&mut refused, second).await, "past the cap, refused");
        drop(held.pop());
        let mut next = connect(addr).await;
        next.write_all(b"x").await.unwrap();
        assert!(tokio::time::timeout(second, rx.recv()).await.unwrap().is_some(), "a place freed is reused");
    }

    #[tokio::test]
    async fn a_silent_connection_is_closed_after_the_handshake_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = ConnLimits { max_connections: 10, max_pending: 5, handshake_timeout: Duration::from_millis(300) };
        let _rx = listen(listener, "test", limits, |tcp| async { Ok(tcp) });
        let mut silent = connect(addr).await;
        let start = Instant::now();
        assert!(closed_within(&mut silent, Duration::from_secs(5)).await);
        assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
    }
}
