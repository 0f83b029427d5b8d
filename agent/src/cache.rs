//! Contexts fetched from the coordinator, kept by digest so a context is
//! fetched once per agent, verified before use, bounded and evicted LRU.

use std::io::Write;
use std::path::{Path, PathBuf};

use tokio::sync::Mutex;

use braid_shared::Digest;
use braid_shared::context::HashingWriter;
use braid_shared::proto::{self, agents_client::AgentsClient};

use crate::settings::Valid;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("coordinator: {0}")]
    Fetch(#[from] tonic::Status),
    #[error("connecting: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("the fetched context hashes to {got}, not {want}")]
    Mismatch { got: Digest, want: Digest },
}

pub struct ContextCache {
    dir: PathBuf,
    settings: Valid,
    max_bytes: u64,
    /// One fetch at a time, so two jobs of one context fetch it once.
    lock: Mutex<()>,
}

/// Attempts per fetch; a fetch cut midway is retried from the start.
const FETCH_ATTEMPTS: u32 = 3;

impl ContextCache {
    pub fn new(dir: PathBuf, settings: Valid, max_bytes: u64) -> std::io::Result<ContextCache> {
        std::fs::create_dir_all(&dir)?;
        Ok(ContextCache { dir, settings, max_bytes, lock: Mutex::new(()) })
    }

    fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(format!("{}.tar.zst", digest.hex()))
    }

    /// The path of the compressed context, fetched if not cached; the
    /// coordinator serves it only under the lease of `job`, whose build uses it.
    pub async fn get(&self, digest: &Digest, job: &proto::Assignment) -> Result<PathBuf, CacheError> {
        let _one_at_a_time = self.lock.lock().await;
        let path = self.path(digest);
        if path.exists() {
            // Touch for LRU.
            let _ = std::fs::File::open(&path).and_then(|f| f.set_modified(std::time::SystemTime::now()));
            return Ok(path);
        }
        let mut last = None;
        for attempt in 1..=FETCH_ATTEMPTS {
            match self.fetch(digest, job, &path).await {
                Ok(()) => {
                    self.evict(&path);
                    return Ok(path);
                }
                Err(e) => {
                    tracing::warn!(%digest, attempt, error = %e, "context fetch failed");
                    last = Some(e);
                    tokio::time::sleep(std::time::Duration::from_millis(300 * u64::from(attempt))).await;
                }
            }
        }
        Err(last.unwrap_or(CacheError::Mismatch { got: digest.clone(), want: digest.clone() }))
    }

    /// Streams to a temporary file, verifies the digest, then renames, so an
    /// interrupted fetch never leaves a corrupt entry.
    async fn fetch(&self, digest: &Digest, job: &proto::Assignment, path: &Path) -> Result<(), CacheError> {
        let mut client = AgentsClient::new(self.settings.connect().await?)
            .max_decoding_message_size(braid_shared::limits::GRPC_MESSAGE_BYTES);
        let request = proto::FetchContextRequest {
            digest: digest.to_string(),
            job_id: job.job_id.clone(),
            attempt: job.attempt,
            lease_id: job.lease_id.clone(),
        };
        let mut stream = client.fetch_context(request).await?.into_inner();
        let mut temp = tempfile::NamedTempFile::new_in(&self.dir)?;
        while let Some(chunk) = stream.message().await? {
            temp.write_all(&chunk.chunk)?;
        }
        temp.flush()?;
        // Decoding and hashing on a blocking thread, with the window bounded
        // and a cut stream refused.
        let (got, temp) = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
            let mut hash = HashingWriter::new(std::io::sink());
            std::io::copy(&mut braid_shared::compression::zstd_reader(temp.reopen()?)?, &mut hash)?;
            Ok((hash.finish().0, temp))
        })
        .await
        .map_err(std::io::Error::other)??;
        if got != *digest {
            return Err(CacheError::Mismatch { got, want: digest.clone() });
        }
        temp.as_file().sync_all()?;
        temp.persist(path).map_err(|e| CacheError::Io(e.error))?;
        Ok(())
    }

    /// Removes the least recently used contexts past the size bound, never
    /// the one just fetched.
    fn evict(&self, keep: &Path) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let meta = e.metadata().ok()?;
                let cached = e.file_name().to_str()?.ends_with(".tar.zst");
                let modified = meta.modified().ok()?;
                cached.then(|| (modified, meta.len(), e.path()))
            })
            .collect();
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        files.sort();
        for (_, size, path) in files {
            if total <= self.max_bytes {
                break;
            }
            if path != keep && std::fs::remove_file(&path).is_ok() {
                total -= size;
            }
        }
    }
}
