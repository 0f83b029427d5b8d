//! Image blobs of exporting builds (`--output type=oci`, `--load`), stored
//! by digest and shared between jobs and builds, so a layer every platform
//! has, or an unchanged base, is uploaded and kept once.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use oci_spec::image::ImageManifest;

use braid_shared::context::HashingWriter;
use braid_shared::oci::{self, ImageDescriptor};
use braid_shared::{Digest, Platform, limits};

use crate::error::{CoordinatorError, Result};

/// Why a stored blob or image could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// Never uploaded, or evicted since.
    #[error("blob {0} is not stored")]
    NotStored(Digest),
    #[error("layer {0} was not uploaded")]
    LayerMissing(Digest),
    #[error("index {0} is no longer stored")]
    IndexGone(Digest),
    #[error("blob {digest} is larger than {limit} bytes")]
    TooLarge { digest: Digest, limit: usize },
    #[error("blob {0} is damaged on disk")]
    Damaged(Digest),
    #[error("layer {digest} is {len} bytes, the manifest says {want}")]
    WrongSize { digest: Digest, len: u64, want: u64 },
    /// The image is not what it should be (its manifest, config or platform).
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Internal(String),
}

impl BlobError {
    /// The blob is gone: evicted, or never uploaded.
    pub fn is_missing(&self) -> bool {
        matches!(self, BlobError::NotStored(_) | BlobError::LayerMissing(_) | BlobError::IndexGone(_))
    }
}

pub struct BlobStore {
    dir: PathBuf,
    max_bytes: u64,
    /// Bytes stored; also serialises eviction.
    stored: Mutex<u64>,
}

/// One blob arriving: hashed as written to a temporary file that becomes
/// the blob only if it matches its digest and size.
pub struct BlobUpload {
    expected: Digest,
    size: u64,
    out: HashingWriter<std::io::BufWriter<std::fs::File>>,
    temp: tempfile::TempPath,
}

/// Blobs written or used this recently are never evicted: they may belong
/// to a job whose upload is under way, or a build about to be exported.
const EVICT_GRACE: Duration = Duration::from_secs(3600);

/// Whether a file in the store is a blob (its name a sha256 hex digest),
/// not an upload's temporary file.
fn is_blob_name(name: &std::ffi::OsStr) -> bool {
    name.to_str().is_some_and(|n| n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit()))
}

impl BlobStore {
    /// Opens the store; temporary files of uploads a crash cut short go.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<BlobStore> {
        std::fs::create_dir_all(dir)?;
        let mut stored = 0;
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if is_blob_name(&entry.file_name()) {
                stored += entry.metadata()?.len();
            } else {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(BlobStore { dir: dir.to_owned(), max_bytes, stored: Mutex::new(stored) })
    }

    pub fn stored_bytes(&self) -> u64 {
        *self.stored()
    }

    fn stored(&self) -> std::sync::MutexGuard<'_, u64> {
        // A plain counter: whole after any panic.
        self.stored.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(digest.hex())
    }

    pub fn has(&self, digest: &Digest) -> bool {
        self.path(digest).is_file()
    }

    /// Starts an upload, making room first: never by evicting a blob in
    /// `needed` (those of unfinished exporting builds' images, asked for
    /// only when something must go).
    pub fn begin(&self, expected: Digest, size: u64, needed: impl FnOnce() -> HashSet<Digest>) -> Result<BlobUpload> {
        if size > self.max_bytes {
            return Err(CoordinatorError::ResourceExhausted(format!(
                "blob {expected} of {size} bytes is larger than the store (blob_store_bytes {})",
                self.max_bytes
            )));
        }
        if !self.make_room(size, needed)? {
            return Err(CoordinatorError::ResourceExhausted(format!(
                "the blob store is full of images of unfinished or just finished builds (blob_store_bytes {}); \
                 the upload of {expected} can be retried later",
                self.max_bytes
            )));
        }
        let temp = tempfile::NamedTempFile::new_in(&self.dir)?;
        let (file, temp) = temp.into_parts();
        Ok(BlobUpload { expected, size, out: HashingWriter::new(std::io::BufWriter::new(file)), temp })
    }

    /// Keeps the upload if it hashes to its digest and has its size.
    pub fn finish(&self, upload: BlobUpload) -> Result<()> {
        let BlobUpload { expected, size, out, temp } = upload;
        let (digest, written, mut file) = out.finish();
        file.flush()?;
        if written != size {
            return Err(CoordinatorError::InvalidArgument(format!(
                "blob {expected}: {written} bytes arrived, the upload announced {size}"
            )));
        }
        if digest != expected {
            return Err(CoordinatorError::InvalidArgument(format!(
                "blob digest mismatch: the upload hashes to {digest}, not {expected}"
            )));
        }
        file.get_ref().sync_all()?;
        let mut stored = self.stored();
        if self.has(&expected) {
            // The same blob arrived meanwhile: keep that one.
            return Ok(());
        }
        temp.persist(self.path(&expected)).map_err(|e| CoordinatorError::Io(e.error))?;
        *stored += size;
        Ok(())
    }

    pub fn put_bytes(&self, bytes: &[u8], needed: impl FnOnce() -> HashSet<Digest>) -> Result<Digest> {
        let digest = Digest::of(bytes);
        if !self.has(&digest) {
            let mut upload = self.begin(digest.clone(), bytes.len() as u64, needed)?;
            upload.write(bytes)?;
            self.finish(upload)?;
        }
        Ok(digest)
    }

    /// A small blob (a manifest, index or config), at most `limit` bytes.
    pub fn read(&self, digest: &Digest, limit: usize) -> std::result::Result<Vec<u8>, BlobError> {
        let path = self.path(digest);
        let len = std::fs::metadata(&path).map_err(|_| BlobError::NotStored(digest.clone()))?.len();
        if len > limit as u64 {
            return Err(BlobError::TooLarge { digest: digest.clone(), limit });
        }
        let bytes = std::fs::read(&path).map_err(|e| BlobError::Internal(format!("blob {digest}: {e}")))?;
        if Digest::of(&bytes) != *digest {
            return Err(BlobError::Damaged(digest.clone()));
        }
        Ok(bytes)
    }

    /// Marks a blob used now, so eviction takes older ones first.
    pub fn touch(&self, digest: &Digest) {
        if let Ok(file) = std::fs::File::options().append(true).open(self.path(digest)) {
            let _ = file.set_modified(SystemTime::now());
        }
    }

    /// Checks an uploaded image: its manifest, config and every layer are
    /// stored, and its config names `platform`. Returns the manifest's
    /// descriptor and the digests of all its blobs (manifest first).
    pub fn verify_image(
        &self,
        digest: &Digest,
        platform: &Platform,
    ) -> std::result::Result<(ImageDescriptor, Vec<Digest>), BlobError> {
        let invalid = |m: String| BlobError::Invalid(m);
        let manifest = self.read(digest, limits::MANIFEST_BYTES)?;
        let parsed: ImageManifest =
            serde_json::from_slice(&manifest).map_err(|e| invalid(format!("manifest {digest}: {e}")))?;
        let config_digest: Digest =
            parsed.config().digest().to_string().parse().map_err(|e| invalid(format!("{e}")))?;
        let config = self.read(&config_digest, limits::MANIFEST_BYTES * 4)?;
        let found = oci::config_platform(&config).map_err(invalid)?;
        if found != *platform {
            return Err(invalid(format!("the image is for {found}, not {platform}")));
        }
        let mut blobs = vec![digest.clone(), config_digest];
        for layer in parsed.layers() {
            let layer_digest: Digest = layer.digest().to_string().parse().map_err(|e| invalid(format!("{e}")))?;
            let len = std::fs::metadata(self.path(&layer_digest))
                .map_err(|_| BlobError::LayerMissing(layer_digest.clone()))?
                .len();
            if len != layer.size() {
                return Err(BlobError::WrongSize { digest: layer_digest, len, want: layer.size() });
            }
            blobs.push(layer_digest);
        }
        let media_type = parsed.media_type().as_ref().map_or_else(|| oci::OCI_MANIFEST.to_owned(), ToString::to_string);
        Ok((ImageDescriptor { digest: digest.clone(), size: manifest.len() as u64, media_type }, blobs))
    }

    /// Every blob the images of `manifests` are made of (those stored).
    pub fn referenced(&self, manifests: &[Digest]) -> HashSet<Digest> {
        let mut out = HashSet::new();
        for manifest in manifests {
            let Ok(bytes) = self.read(manifest, limits::MANIFEST_BYTES) else { continue };
            let Ok(parsed) = serde_json::from_slice::<ImageManifest>(&bytes) else { continue };
            out.insert(manifest.clone());
            for d in std::iter::once(parsed.config()).chain(parsed.layers()) {
                if let Ok(digest) = d.digest().to_string().parse() {
                    out.insert(digest);
                }
            }
        }
        out
    }

    /// Evicts least recently used blobs, sparing `needed` and those used
    /// within the grace period, until `room` more bytes fit; says whether
    /// they do.
    fn make_room(&self, room: u64, needed: impl FnOnce() -> HashSet<Digest>) -> Result<bool> {
        if *self.stored() + room <= self.max_bytes {
            return Ok(true);
        }
        let needed = needed();
        let mut stored = self.stored();
        let mut blobs = Vec::new();
        for entry in std::fs::read_dir(&self.dir)?.flatten() {
            if !is_blob_name(&entry.file_name()) {
                continue;
            }
            let Ok(meta) = entry.metadata() else { continue };
            blobs.push((meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), meta.len(), entry.path()));
        }
        blobs.sort();
        let cutoff = SystemTime::now().checked_sub(EVICT_GRACE).unwrap_or(SystemTime::UNIX_EPOCH);
        for (modified, len, path) in blobs {
            if *stored + room <= self.max_bytes || modified > cutoff {
                break;
            }
            let digest = path.file_name().and_then(|n| n.to_str()).and_then(|hex| format!("sha256:{hex}").parse().ok());
            if digest.is_some_and(|d: Digest| needed.contains(&d)) {
                continue;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    *stored = stored.saturating_sub(len);
                    tracing::info!(blob = %path.display(), len, "blob evicted");
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(*stored + room <= self.max_bytes)
    }
}

impl BlobUpload {
    pub fn write(&mut self, chunk: &[u8]) -> Result<()> {
        if self.out.written() + chunk.len() as u64 > self.size {
            return Err(CoordinatorError::InvalidArgument(format!(
                "blob {}: more bytes than the {} announced",
                self.expected, self.size
            )));
        }
        self.out.write_all(chunk)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_a_blob_only_when_digest_and_size_match() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path(), 1 << 20).unwrap();
        let digest = blobs.put_bytes(b"layer bytes", HashSet::new).unwrap();
        assert!(blobs.has(&digest));
        assert_eq!(blobs.read(&digest, 100).unwrap(), b"layer bytes");

        let claimed = Digest::of(b"other");
        let mut upload = blobs.begin(claimed.clone(), 5, HashSet::new).unwrap();
        upload.write(b"wrong").unwrap();
        let e = blobs.finish(upload).unwrap_err().to_string();
        assert!(e.contains("digest mismatch"), "{e}");
        assert!(!blobs.has(&claimed));

        let mut upload = blobs.begin(Digest::of(b"abc"), 2, HashSet::new).unwrap();
        let e = upload.write(b"abc").unwrap_err().to_string();
        assert!(e.contains("more bytes than the 2 announced"), "{e}");
        drop(upload);
        let mut upload = blobs.begin(Digest::of(b"abc"), 4, HashSet::new).unwrap();
        upload.write(b"abc").unwrap();
        let e = blobs.finish(upload).unwrap_err().to_string();
        assert!(e.contains("3 bytes arrived"), "{e}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left behind");
    }

    #[test]
    fn refuses_a_blob_larger_than_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path(), 10).unwrap();
        let e = blobs.begin(Digest::of(b"x"), 11, HashSet::new).err().unwrap();
        assert!(matches!(e, CoordinatorError::ResourceExhausted(_)), "{e}");
    }

    #[test]
    fn eviction_spares_needed_and_recent_blobs_and_says_when_nothing_fits() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(".tmpLeftOver"), b"cut short").unwrap();
        let blobs = BlobStore::open(dir.path(), 100).unwrap();
        assert!(!dir.path().join(".tmpLeftOver").exists(), "a crash's temporary file is removed");
        let old = |bytes: &[u8]| {
            let d = blobs.put_bytes(bytes, HashSet::new).unwrap();
            let file = std::fs::File::options().append(true).open(blobs.path(&d)).unwrap();
            file.set_modified(SystemTime::now() - Duration::from_secs(7200)).unwrap();
            d
        };
        let needed = old(&[1u8; 40]);
        let evictable = old(&[2u8; 40]);
        let recent = blobs.put_bytes(&[3u8; 10], HashSet::new).unwrap();
        let keep = HashSet::from([needed.clone()]);
        let upload = blobs.begin(Digest::of(&[4u8; 30]), 30, || keep.clone()).unwrap();
        drop(upload);
        assert!(blobs.has(&needed) && blobs.has(&recent), "needed and recent blobs stay");
        assert!(!blobs.has(&evictable), "the old one made room");
        let e = blobs.begin(Digest::of(&[5u8; 60]), 60, || keep.clone()).err().unwrap();
        assert!(e.to_string().contains("the blob store is full"), "{e}");
    }

    #[test]
    fn verifies_an_image_and_its_platform() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path(), 1 << 20).unwrap();
        let config = blobs
            .put_bytes(
                br#"{"architecture":"arm64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#,
                HashSet::new,
            )
            .unwrap();
        let layer = blobs.put_bytes(b"gzip bytes", HashSet::new).unwrap();
        let manifest = serde_json::json!({
            "schemaVersion": 2, "mediaType": oci::OCI_MANIFEST,
            "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.as_str(), "size": 80 },
            "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer.as_str(), "size": 10 }],
        });
        let manifest = blobs.put_bytes(manifest.to_string().as_bytes(), HashSet::new).unwrap();
        let (descriptor, all) = blobs.verify_image(&manifest, &"linux/arm64".parse().unwrap()).unwrap();
        assert_eq!(descriptor.digest, manifest);
        assert_eq!(all, [manifest.clone(), config, layer.clone()]);
        let e = blobs.verify_image(&manifest, &"linux/amd64".parse().unwrap()).unwrap_err();
        assert!(e.to_string().contains("not linux/amd64"), "{e}");
        std::fs::remove_file(blobs.path(&layer)).unwrap();
        let e = blobs.verify_image(&manifest, &"linux/arm64".parse().unwrap()).unwrap_err();
        assert!(e.to_string().contains("was not uploaded"), "{e}");
    }
}
