//! Turning PATH into a context the way Docker does, and sending it once.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context as _, bail};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use braid_shared::context::{self, ContextLimits, ContextSummary};
use braid_shared::dockerignore::DockerIgnore;
use braid_shared::limits;
use braid_shared::proto;

use crate::conn::Builds;

/// Where the Dockerfile comes from.
#[derive(Debug)]
pub enum DockerfileSource {
    /// A path inside the context.
    InContext(String),
    /// Contents sent beside the context (outside it, ignored, or stdin).
    Inline(Vec<u8>),
}

/// A context written to a temporary file, with its digest.
pub struct PreparedContext {
    pub tar: tempfile::NamedTempFile,
    pub summary: ContextSummary,
    pub dockerfile: DockerfileSource,
}

/// Writes the context tar for `context_dir` with `dockerfile` (as given to
/// `-f`, relative to the working directory; `-` for stdin).
pub fn prepare(context_dir: &Path, dockerfile: Option<&str>) -> anyhow::Result<PreparedContext> {
    if !context_dir.is_dir() {
        bail!("context {:?} is not a directory", context_dir);
    }
    let root = context_dir.canonicalize().with_context(|| format!("reading context {context_dir:?}"))?;
    let (dockerfile_path, stdin_contents) = match dockerfile {
        Some("-") => {
            let mut buf = Vec::new();
            std::io::stdin().take(limits::DOCKERFILE_BYTES as u64 + 1).read_to_end(&mut buf)?;
            (None, Some(buf))
        }
        Some(path) => (Some(PathBuf::from(path)), None),
        None => (Some(root.join("Dockerfile")), None),
    };
    // A Dockerfile-specific ignore file wins over the context's own.
    let mut ignore_file = root.join(".dockerignore");
    if let Some(df) = &dockerfile_path {
        let specific = PathBuf::from(format!("{}.dockerignore", df.display()));
        if specific.is_file() {
            ignore_file = specific;
        }
    }
    let ignore = match std::fs::read_to_string(&ignore_file) {
        Ok(text) => DockerIgnore::parse(&text).with_context(|| format!("in {ignore_file:?}"))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => DockerIgnore::default(),
        Err(e) => return Err(e).with_context(|| format!("reading {ignore_file:?}")),
    };
    let dockerfile = match (dockerfile_path, stdin_contents) {
        (_, Some(contents)) => DockerfileSource::Inline(contents),
        (Some(path), None) => {
            let abs = path.canonicalize().with_context(|| format!("Dockerfile {path:?} not found"))?;
            match abs.strip_prefix(&root).ok().and_then(|r| r.to_str()).map(str::to_owned) {
                Some(rel) if !ignore.is_ignored(&rel) => DockerfileSource::InContext(rel),
                // Outside the context, or ignored: sent beside it, as Docker does.
                _ => DockerfileSource::Inline(std::fs::read(&abs).with_context(|| format!("reading {abs:?}"))?),
            }
        }
        (None, None) => bail!("no Dockerfile"),
    };
    if let DockerfileSource::Inline(c) = &dockerfile
        && c.len() > limits::DOCKERFILE_BYTES
    {
        bail!("Dockerfile larger than {} bytes", limits::DOCKERFILE_BYTES);
    }
    let mut tar = tempfile::NamedTempFile::new()?;
    let summary = {
        let writer = std::io::BufWriter::new(tar.as_file_mut());
        context::write_tar(&root, &ignore, ContextLimits::default(), writer)?
    };
    Ok(PreparedContext { tar, summary, dockerfile })
}

/// Uploads the context unless the coordinator has it; returns the
/// compressed bytes sent (0 when it was already there).
pub async fn ensure_uploaded(
    client: &mut Builds,
    prepared: &PreparedContext,
    sent: Arc<AtomicU64>,
) -> anyhow::Result<u64> {
    let digest = prepared.summary.digest.to_string();
    let stat = client.stat_context(proto::StatContextRequest { digest: digest.clone() }).await?.into_inner();
    if stat.present {
        return Ok(0);
    }
    let (tx, rx) = mpsc::channel::<proto::PutContextRequest>(4);
    let path = prepared.tar.path().to_owned();
    let producer = tokio::task::spawn_blocking(move || compress_chunks(&path, digest, tx, sent));
    let response = client.put_context(ReceiverStream::new(rx)).await;
    let produced = producer.await?;
    // The coordinator's refusal explains more than our broken pipe.
    let received = response?.into_inner().received;
    produced?;
    Ok(received)
}

/// Streams the tar through zstd in bounded chunks: never all in memory.
fn compress_chunks(
    path: &Path,
    digest: String,
    tx: mpsc::Sender<proto::PutContextRequest>,
    sent: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    struct ChunkSender {
        tx: mpsc::Sender<proto::PutContextRequest>,
        digest: Option<String>,
        buf: Vec<u8>,
        sent: Arc<AtomicU64>,
    }
    impl ChunkSender {
        fn flush_chunk(&mut self) -> std::io::Result<()> {
            let chunk = std::mem::take(&mut self.buf);
            self.sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            let digest = self.digest.take().unwrap_or_default();
            self.tx
                .blocking_send(proto::PutContextRequest { digest, chunk })
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "upload stream closed"))
        }
    }
    impl Write for ChunkSender {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.buf.extend_from_slice(data);
            if self.buf.len() >= limits::CONTEXT_CHUNK_BYTES {
                self.flush_chunk()?;
            }
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut file = std::fs::File::open(path)?;
    let sender = ChunkSender { tx, digest: Some(digest), buf: Vec::new(), sent };
    let mut encoder = zstd::stream::write::Encoder::new(sender, 3)?;
    std::io::copy(&mut file, &mut encoder)?;
    let mut sender = encoder.finish()?;
    sender.flush_chunk()?;
    Ok(())
}
