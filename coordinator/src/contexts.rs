//! Contexts on disk, content-addressed by the sha256 of their uncompressed
//! tar and kept zstd-compressed as they arrived.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use braid_shared::Digest;
use braid_shared::compression::{StreamDecoder, ZstdError};
use braid_shared::context::HashingWriter;

use crate::disk::DataDir;
use crate::error::{CoordinatorError, Result};
use crate::model::now_ms;
use crate::remote_contexts::RemoteContexts;
use crate::stores::Store;

pub struct ContextStore {
    dir: PathBuf,
    store: Arc<Store>,
    disk: Arc<DataDir>,
    max_bytes: u64,
    store_bytes: u64,
    /// The registry repository that also keeps every context (`blob_store`).
    remote: Option<RemoteContexts>,
}

/// One upload in progress: decompressed and hashed as it arrives, written
/// compressed to a temporary file that becomes the context only if the
/// digest matches. Decoding is CPU work: call `write` and `finish` from a
/// blocking thread.
pub struct Upload {
    expected: Digest,
    temp: tempfile::NamedTempFile,
    decoder: StreamDecoder,
    hash: HashingWriter<std::io::Sink>,
    received: u64,
    max_bytes: u64,
    disk: Arc<DataDir>,
}

impl From<ZstdError> for CoordinatorError {
    fn from(e: ZstdError) -> Self {
        match e {
            ZstdError::WindowTooLarge => CoordinatorError::InvalidArgument(format!("context refused: {e}")),
            ZstdError::Setup(_) => CoordinatorError::Internal(e.to_string()),
            _ => CoordinatorError::InvalidArgument(format!("context is {e}")),
        }
    }
}

impl ContextStore {
    pub fn open(
        dir: &Path,
        store: Arc<Store>,
        disk: Arc<DataDir>,
        max_bytes: u64,
        store_bytes: u64,
    ) -> Result<ContextStore> {
        std::fs::create_dir_all(dir)?;
        Ok(ContextStore { dir: dir.to_owned(), store, disk, max_bytes, store_bytes, remote: None })
    }

    /// Keeps every context in `remote` too (the `blob_store` setting).
    pub fn with_remote(mut self, remote: Option<RemoteContexts>) -> ContextStore {
        self.remote = remote;
        self
    }

    /// Pushes a just-stored context to the `blob_store` registry; if that
    /// fails the context is forgotten here too, so the client uploads it
    /// again rather than another coordinator missing it.
    pub async fn replicate(&self, digest: &Digest) -> Result<()> {
        let Some(remote) = &self.remote else {
            return Ok(());
        };
        let pushed = match tokio::fs::read(self.path(digest)).await {
            Ok(bytes) => remote.push(digest, &bytes).await,
            Err(e) => Err(e.into()),
        };
        if let Err(e) = pushed {
            let _ = std::fs::remove_file(self.path(digest));
            let _ = self.store.context_delete(digest.as_str());
            tracing::warn!(error = %e, %digest, "could not keep a context in the blob_store registry");
            return Err(e);
        }
        Ok(())
    }

    /// Whether the context must be read from the `blob_store` registry
    /// before it can be served from here.
    pub fn is_remote_only(&self, digest: &Digest) -> bool {
        self.remote.is_some() && !self.path(digest).exists()
    }

    /// Reads a context another coordinator stored from the `blob_store`
    /// registry (compressed, bounded like an upload).
    pub async fn pull(&self, digest: &Digest) -> Result<Vec<u8>> {
        let remote = self.remote.as_ref().ok_or_else(|| CoordinatorError::Internal("no blob_store".into()))?;
        // Compressed is never much larger than the tar it holds.
        let limit = usize::try_from(self.max_bytes + self.max_bytes / 4 + (1 << 20)).unwrap_or(usize::MAX);
        remote.pull(digest, limit).await
    }

    /// Verifies a pulled context exactly as an upload and keeps it here
    /// (CPU work: call from a blocking thread).
    pub fn keep_pulled(&self, digest: &Digest, compressed: &[u8]) -> Result<()> {
        let mut upload = self.begin(digest.clone())?;
        for chunk in compressed.chunks(1 << 20) {
            upload.write(chunk)?;
        }
        self.finish_file(upload).map_err(|e| self.disk.check(e))?;
        self.disk.file_written();
        Ok(())
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
        // With a blob_store, another coordinator's upload is there too.
        Ok(size.filter(|_| self.remote.is_some() || self.path(digest).exists()))
    }

    /// Marks a context used now, for eviction; best effort (a full disk
    /// refuses it, and a use is no reason to fail a build or a fetch).
    pub fn touch(&self, digest: &Digest) {
        if let Err(e) = self.store.context_touch(digest.as_str(), now_ms()) {
            tracing::warn!(error = %e, %digest, "could not note a context's use");
        }
    }

    pub fn begin(&self, expected: Digest) -> Result<Upload> {
        let temp = tempfile::NamedTempFile::new_in(&self.dir).map_err(|e| self.disk.check(e.into()))?;
        let decoder = StreamDecoder::new()?;
        let hash = HashingWriter::new(std::io::sink());
        let disk = self.disk.clone();
        Ok(Upload { expected, temp, decoder, hash, received: 0, max_bytes: self.max_bytes, disk })
    }

    /// Keeps the upload if it is a complete zstd stream that hashes to its
    /// digest; returns (size, received). A full disk is `DataDirFull`.
    pub fn finish(&self, upload: Upload) -> Result<(u64, u64)> {
        let stored = self.finish_inner(upload).map_err(|e| self.disk.check(e))?;
        self.disk.file_written();
        Ok(stored)
    }

    fn finish_inner(&self, upload: Upload) -> Result<(u64, u64)> {
        let (expected, size, received) = self.finish_file(upload)?;
        let path = self.path(&expected);
        if let Err(e) = self.store.context_stored(expected.as_str(), size, received, now_ms()) {
            // Not recorded, so not kept: a file no row names is never evicted.
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        Ok((size, received))
    }

    /// Verifies the upload and moves it into place; returns its digest,
    /// size and compressed bytes.
    fn finish_file(&self, upload: Upload) -> Result<(Digest, u64, u64)> {
        let Upload { expected, temp, decoder, hash, received, .. } = upload;
        decoder.finish()?;
        let (digest, size, _) = hash.finish();
        if digest != expected {
            return Err(CoordinatorError::InvalidArgument(format!(
                "context digest mismatch: the upload hashes to {digest}, not {expected}"
            )));
        }
        temp.as_file().sync_all()?;
        let path = self.path(&expected);
        temp.persist(&path).map_err(|e| CoordinatorError::Io(e.error))?;
        Ok((expected, size, received))
    }
}

impl Upload {
    /// Decodes and hashes one chunk in bounded steps, stopping at the first
    /// step past the limit: a small upload that expands without bound costs
    /// no more than a context of the largest allowed size.
    pub fn write(&mut self, chunk: &[u8]) -> Result<()> {
        self.received += chunk.len() as u64;
        self.temp.write_all(chunk).map_err(|e| self.disk.check(e.into()))?;
        // The tar adds headers to the file bytes; allow for them.
        let limit = self.max_bytes + self.max_bytes / 8 + (1 << 20);
        let (hash, max_bytes) = (&mut self.hash, self.max_bytes);
        self.decoder.feed(chunk, |out| {
            hash.write_all(out)?;
            if hash.written() > limit {
                return Err(CoordinatorError::ResourceExhausted(format!(
                    "context is larger than the limit of {max_bytes} bytes (max_context_bytes)"
                )));
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compressed(data: &[u8]) -> Vec<u8> {
        zstd::encode_all(data, 3).unwrap()
    }

    fn open(dir: &Path, max: u64, keep: u64) -> ContextStore {
        let store = Arc::new(Store::open(&dir.join("db")).unwrap());
        let disk = Arc::new(DataDir::new(dir, Default::default()));
        ContextStore::open(&dir.join("contexts"), store, disk, max, keep).unwrap()
    }

    fn put(contexts: &ContextStore, data: &[u8]) -> Result<(u64, u64)> {
        let mut upload = contexts.begin(Digest::of(data))?;
        for chunk in compressed(data).chunks(7) {
            upload.write(chunk)?;
        }
        contexts.finish(upload)
    }

    #[test]
    fn verifies_the_digest_and_keeps_nothing_on_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let contexts = open(dir.path(), 1 << 20, 1 << 30);
        let (size, _) = put(&contexts, b"hello context").unwrap();
        assert_eq!(size, 13);
        assert_eq!(contexts.stat(&Digest::of(b"hello context")).unwrap(), Some(13));

        let claimed = Digest::of(b"something else");
        let mut upload = contexts.begin(claimed.clone()).unwrap();
        upload.write(&compressed(b"the real bytes")).unwrap();
        let e = contexts.finish(upload).unwrap_err().to_string();
        assert!(e.contains("context digest mismatch"), "{e}");
        assert_eq!(contexts.stat(&claimed).unwrap(), None);
        let files = std::fs::read_dir(dir.path().join("contexts")).unwrap().count();
        assert_eq!(files, 1, "no temporary file left behind");
    }

    #[test]
    fn refuses_contexts_over_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let contexts = open(dir.path(), 1000, 1 << 30);
        let big = vec![7u8; 4 << 20];
        let e = put(&contexts, &big).unwrap_err();
        assert!(matches!(e, CoordinatorError::ResourceExhausted(_)), "{e}");
        assert!(e.to_string().contains("max_context_bytes"));
    }

    /// `size` zeros as one zstd frame, compressed as they stream by.
    fn bomb(size: u64) -> Vec<u8> {
        let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..size >> 20 {
            encoder.write_all(&zeros).unwrap();
        }
        encoder.finish().unwrap()
    }

    fn put_raw(contexts: &ContextStore, digest: Digest, compressed: &[u8], piece: usize) -> Result<(u64, u64)> {
        let mut upload = contexts.begin(digest)?;
        for chunk in compressed.chunks(piece) {
            upload.write(chunk)?;
        }
        contexts.finish(upload)
    }

    #[test]
    fn a_bomb_is_refused_within_one_step_past_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let contexts = open(dir.path(), 1 << 20, 1 << 30);
        let compressed = bomb(256 << 20);
        assert!(compressed.len() < 64 << 10, "a bomb: {} bytes", compressed.len());
        // All of it in one chunk, as one gRPC message would carry it.
        let mut upload = contexts.begin(Digest::of(b"anything")).unwrap();
        let e = upload.write(&compressed).unwrap_err();
        assert!(matches!(e, CoordinatorError::ResourceExhausted(_)), "{e}");
        assert!(e.to_string().contains("limit of 1048576 bytes (max_context_bytes)"), "{e}");
        let limit = (1 << 20) + (1 << 17) + (1 << 20);
        let decoded = upload.hash.written();
        assert!(decoded <= limit + braid_shared::limits::ZSTD_STEP_BYTES as u64, "decoded {decoded} bytes");
    }

    #[test]
    fn refuses_a_window_over_the_limit_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let contexts = open(dir.path(), 1 << 30, 1 << 30);
        let data = vec![5u8; 1 << 16];
        let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        encoder.window_log(braid_shared::limits::ZSTD_WINDOW_LOG_MAX + 1).unwrap();
        encoder.write_all(&data).unwrap();
        let e = put_raw(&contexts, Digest::of(&data), &encoder.finish().unwrap(), 1000).unwrap_err();
        assert!(matches!(e, CoordinatorError::InvalidArgument(_)), "{e}");
        assert!(e.to_string().contains("needs a window larger than the limit of 16777216 bytes (2^24)"), "{e}");
    }

    #[test]
    fn refuses_a_truncated_frame_whose_prefix_matches_the_digest() {
        let dir = tempfile::tempdir().unwrap();
        let contexts = open(dir.path(), 1 << 20, 1 << 30);
        let data = b"a context tar, more or less".repeat(100);
        let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        encoder.include_checksum(true).unwrap();
        encoder.write_all(&data).unwrap();
        let whole = encoder.finish().unwrap();
        // Without its 4-byte checksum every byte of `data` still decodes.
        let cut = &whole[..whole.len() - 4];
        let e = put_raw(&contexts, Digest::of(&data), cut, 7).unwrap_err();
        assert!(matches!(e, CoordinatorError::InvalidArgument(_)), "{e}");
        assert!(e.to_string().contains("context is not a complete zstd stream"), "{e}");
        // The first bytes of a second frame after a whole one.
        let two = [whole.as_slice(), &whole[..5]].concat();
        let e = put_raw(&contexts, Digest::of(&data), &two, 7).unwrap_err();
        assert!(e.to_string().contains("not a complete zstd stream"), "{e}");
        assert_eq!(contexts.stat(&Digest::of(&data)).unwrap(), None);
        assert_eq!(put_raw(&contexts, Digest::of(&data), &whole, 7).unwrap().0, data.len() as u64);
    }

    #[test]
    fn refuses_trailing_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let contexts = open(dir.path(), 1 << 20, 1 << 30);
        let data = b"hello context";
        for garbage in [&b"trailing garbage"[..], b"\0\0\0\0\0\0\0\0"] {
            let upload = [compressed(data), garbage.to_vec()].concat();
            let e = put_raw(&contexts, Digest::of(data), &upload, 3).unwrap_err();
            assert!(matches!(e, CoordinatorError::InvalidArgument(_)), "{e}");
            assert!(e.to_string().contains("context is not valid zstd"), "{e}");
        }
        assert_eq!(std::fs::read_dir(dir.path().join("contexts")).unwrap().count(), 0, "nothing kept");
    }

    #[test]
    fn evicts_least_recently_used_but_never_a_needed_one() {
        let dir = tempfile::tempdir().unwrap();
        let contexts = open(dir.path(), 1 << 20, 1);
        let a: Vec<u8> = (0..5000u32).flat_map(|i| i.to_le_bytes()).collect();
        let b: Vec<u8> = a.iter().rev().copied().collect();
        let c: Vec<u8> = a.iter().map(|x| x ^ 0x55).collect();
        for data in [&a, &b, &c] {
            put(&contexts, data).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let needed = HashSet::from([Digest::of(&a).to_string()]);
        assert_eq!(contexts.evict(&needed).unwrap(), 2);
        assert!(contexts.stat(&Digest::of(&a)).unwrap().is_some(), "needed by an unfinished build");
        assert!(contexts.stat(&Digest::of(&b)).unwrap().is_none());
        assert!(contexts.stat(&Digest::of(&c)).unwrap().is_none());
    }
}
