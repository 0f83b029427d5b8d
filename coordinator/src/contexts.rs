//! Contexts on disk, content-addressed by the sha256 of their uncompressed
//! tar and kept zstd-compressed as they arrived.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use braid_shared::Digest;
use braid_shared::context::HashingWriter;

use crate::error::{CoordinatorError, Result};
use crate::farm::now_ms;
use crate::store::Store;

pub struct ContextStore {
    dir: PathBuf,
    store: Arc<Store>,
    max_bytes: u64,
    store_bytes: u64,
}

/// One upload in progress: decompressed and hashed as it arrives, written
/// compressed to a temporary file that becomes the context only if the
/// digest matches.
pub struct Upload {
    expected: Digest,
    temp: tempfile::NamedTempFile,
    decoder: zstd::stream::write::Decoder<'static, HashingWriter<std::io::Sink>>,
    received: u64,
    max_bytes: u64,
}

impl ContextStore {
    pub fn open(dir: &Path, store: Arc<Store>, max_bytes: u64, store_bytes: u64) -> Result<ContextStore> {
        std::fs::create_dir_all(dir)?;
        Ok(ContextStore { dir: dir.to_owned(), store, max_bytes, store_bytes })
    }

    /// Removes least recently used contexts until the store fits
    /// `context_store_bytes`, never one in `needed`; returns how many.
    pub fn evict(&self, needed: &HashSet<String>) -> Result<u64> {
        let contexts = self.store.contexts_by_age()?;
        let mut total: u64 = contexts.iter().map(|(_, stored)| stored).sum();
        let mut evicted = 0;
        for (digest, stored) in contexts {
            if total <= self.store_bytes {
                break;
            }
            if needed.contains(&digest) {
                continue;
            }
            if let Ok(parsed) = digest.parse::<Digest>() {
                match std::fs::remove_file(self.path(&parsed)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e.into()),
                }
            }
            self.store.context_delete(&digest)?;
            total -= stored;
            evicted += 1;
            tracing::info!(%digest, stored, "context evicted");
        }
        Ok(evicted)
    }

    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(format!("{}.tar.zst", digest.hex()))
    }

    /// The uncompressed size, if the context is here.
    pub fn stat(&self, digest: &Digest) -> Result<Option<u64>> {
        let size = self.store.context_size(digest.as_str())?;
        Ok(size.filter(|_| self.path(digest).exists()))
    }

    pub fn touch(&self, digest: &Digest) -> Result<()> {
        self.store.context_touch(digest.as_str(), now_ms())
    }

    pub fn begin(&self, expected: Digest) -> Result<Upload> {
        let temp = tempfile::NamedTempFile::new_in(&self.dir)?;
        let decoder = zstd::stream::write::Decoder::new(HashingWriter::new(std::io::sink()))?;
        Ok(Upload { expected, temp, decoder, received: 0, max_bytes: self.max_bytes })
    }

    /// Keeps the upload if it hashes to its digest; returns (size, received).
    pub fn finish(&self, upload: Upload) -> Result<(u64, u64)> {
        let Upload { expected, temp, mut decoder, received, .. } = upload;
        decoder.flush()?;
        let (digest, size, _) = decoder.into_inner().finish();
        if digest != expected {
            return Err(CoordinatorError::InvalidArgument(format!(
                "context digest mismatch: the upload hashes to {digest}, not {expected}"
            )));
        }
        temp.as_file().sync_all()?;
        temp.persist(self.path(&expected)).map_err(|e| CoordinatorError::Io(e.error))?;
        self.store.context_stored(expected.as_str(), size, received, now_ms())?;
        Ok((size, received))
    }
}

impl Upload {
    pub fn write(&mut self, chunk: &[u8]) -> Result<()> {
        self.received += chunk.len() as u64;
        self.temp.write_all(chunk)?;
        self.decoder
            .write_all(chunk)
            .map_err(|e| CoordinatorError::InvalidArgument(format!("context is not valid zstd: {e}")))?;
        // The tar adds headers to the file bytes; allow for them.
        let limit = self.max_bytes + self.max_bytes / 8 + (1 << 20);
        if self.decoder.get_ref().written() > limit {
            return Err(CoordinatorError::ResourceExhausted(format!(
                "context is larger than the limit of {} bytes (max_context_bytes)",
                self.max_bytes
            )));
        }
        Ok(())
    }
}
