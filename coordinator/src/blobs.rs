//! Image blobs of exporting builds (`--output type=oci`, `--load`), stored
//! by digest and shared between jobs and builds, so a layer every platform
//! has, or an unchanged base, is uploaded and kept once.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use oci_spec::image::ImageManifest;

use braid_shared::context::HashingWriter;
use braid_shared::oci::{self, ImageDescriptor};
use braid_shared::{Digest, Platform, limits};

use crate::error::{CoordinatorError, Result};

pub struct BlobStore {
    dir: PathBuf,
    max_bytes: u64,
}

/// One blob arriving: hashed as written to a temporary file that becomes
/// the blob only if it matches its digest and size.
pub struct BlobUpload {
    expected: Digest,
    size: u64,
    out: HashingWriter<std::io::BufWriter<std::fs::File>>,
    temp: tempfile::TempPath,
}

/// Blobs written this recently are never evicted: they may belong to a
/// build still assembling its image.
const EVICT_GRACE: Duration = Duration::from_secs(3600);

impl BlobStore {
    pub fn open(dir: &Path, max_bytes: u64) -> Result<BlobStore> {
        std::fs::create_dir_all(dir)?;
        Ok(BlobStore { dir: dir.to_owned(), max_bytes })
    }

    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(digest.hex())
    }

    pub fn has(&self, digest: &Digest) -> bool {
        self.path(digest).is_file()
    }

    pub fn begin(&self, expected: Digest, size: u64) -> Result<BlobUpload> {
        if size > self.max_bytes {
            return Err(CoordinatorError::ResourceExhausted(format!(
                "blob {expected} of {size} bytes is larger than the store (blob_store_bytes {})",
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
        temp.persist(self.path(&expected)).map_err(|e| CoordinatorError::Io(e.error))?;
        self.evict()?;
        Ok(())
    }

    pub fn put_bytes(&self, bytes: &[u8]) -> Result<Digest> {
        let digest = Digest::of(bytes);
        if !self.has(&digest) {
            let mut upload = self.begin(digest.clone(), bytes.len() as u64)?;
            upload.write(bytes)?;
            self.finish(upload)?;
        }
        Ok(digest)
    }

    /// A small blob (a manifest, index or config), at most `limit` bytes.
    pub fn read(&self, digest: &Digest, limit: usize) -> std::result::Result<Vec<u8>, String> {
        let path = self.path(digest);
        let len = std::fs::metadata(&path).map_err(|_| format!("blob {digest} is not stored"))?.len();
        if len > limit as u64 {
            return Err(format!("blob {digest} is larger than {limit} bytes"));
        }
        let bytes = std::fs::read(&path).map_err(|e| format!("blob {digest}: {e}"))?;
        if Digest::of(&bytes) != *digest {
            return Err(format!("blob {digest} is damaged on disk"));
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
    ) -> std::result::Result<(ImageDescriptor, Vec<Digest>), String> {
        let manifest = self.read(digest, limits::MANIFEST_BYTES)?;
        let parsed: ImageManifest = serde_json::from_slice(&manifest).map_err(|e| format!("manifest {digest}: {e}"))?;
        let config_digest: Digest = parsed.config().digest().to_string().parse().map_err(|e| format!("{e}"))?;
        let config = self.read(&config_digest, limits::MANIFEST_BYTES * 4)?;
        let found = oci::config_platform(&config)?;
        if found != *platform {
            return Err(format!("the image is for {found}, not {platform}"));
        }
        let mut blobs = vec![digest.clone(), config_digest];
        for layer in parsed.layers() {
            let layer_digest: Digest = layer.digest().to_string().parse().map_err(|e| format!("{e}"))?;
            let len = std::fs::metadata(self.path(&layer_digest))
                .map_err(|_| format!("layer {layer_digest} was not uploaded"))?
                .len();
            if len != layer.size() {
                return Err(format!("layer {layer_digest} is {len} bytes, the manifest says {}", layer.size()));
            }
            blobs.push(layer_digest);
        }
        let media_type = parsed.media_type().as_ref().map_or_else(|| oci::OCI_MANIFEST.to_owned(), ToString::to_string);
        Ok((ImageDescriptor { digest: digest.clone(), size: manifest.len() as u64, media_type }, blobs))
    }

    /// Removes the least recently used blobs until the store fits
    /// `blob_store_bytes`, sparing those written within the grace period.
    fn evict(&self) -> Result<()> {
        let mut blobs = Vec::new();
        let mut total = 0u64;
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if !meta.is_file() || entry.file_name().len() != 64 {
                continue;
            }
            total += meta.len();
            blobs.push((meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), meta.len(), entry.path()));
        }
        if total <= self.max_bytes {
            return Ok(());
        }
        blobs.sort();
        let cutoff = SystemTime::now().checked_sub(EVICT_GRACE).unwrap_or(SystemTime::UNIX_EPOCH);
        for (modified, len, path) in blobs {
            if total <= self.max_bytes || modified > cutoff {
                break;
            }
            std::fs::remove_file(&path)?;
            total -= len;
            tracing::info!(blob = %path.display(), len, "blob evicted");
        }
        Ok(())
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
        let digest = blobs.put_bytes(b"layer bytes").unwrap();
        assert!(blobs.has(&digest));
        assert_eq!(blobs.read(&digest, 100).unwrap(), b"layer bytes");

        let claimed = Digest::of(b"other");
        let mut upload = blobs.begin(claimed.clone(), 5).unwrap();
        upload.write(b"wrong").unwrap();
        let e = blobs.finish(upload).unwrap_err().to_string();
        assert!(e.contains("digest mismatch"), "{e}");
        assert!(!blobs.has(&claimed));

        let mut upload = blobs.begin(Digest::of(b"abc"), 2).unwrap();
        let e = upload.write(b"abc").unwrap_err().to_string();
        assert!(e.contains("more bytes than the 2 announced"), "{e}");
        drop(upload);
        let mut upload = blobs.begin(Digest::of(b"abc"), 4).unwrap();
        upload.write(b"abc").unwrap();
        let e = blobs.finish(upload).unwrap_err().to_string();
        assert!(e.contains("3 bytes arrived"), "{e}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left behind");
    }

    #[test]
    fn refuses_a_blob_larger_than_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path(), 10).unwrap();
        let e = blobs.begin(Digest::of(b"x"), 11).err().unwrap();
        assert!(matches!(e, CoordinatorError::ResourceExhausted(_)), "{e}");
    }

    #[test]
    fn verifies_an_image_and_its_platform() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path(), 1 << 20).unwrap();
        let config = blobs
            .put_bytes(br#"{"architecture":"arm64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#)
            .unwrap();
        let layer = blobs.put_bytes(b"gzip bytes").unwrap();
        let manifest = serde_json::json!({
            "schemaVersion": 2, "mediaType": oci::OCI_MANIFEST,
            "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.as_str(), "size": 80 },
            "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer.as_str(), "size": 10 }],
        });
        let manifest = blobs.put_bytes(manifest.to_string().as_bytes()).unwrap();
        let (descriptor, all) = blobs.verify_image(&manifest, &"linux/arm64".parse().unwrap()).unwrap();
        assert_eq!(descriptor.digest, manifest);
        assert_eq!(all, [manifest.clone(), config, layer.clone()]);
        let e = blobs.verify_image(&manifest, &"linux/amd64".parse().unwrap()).unwrap_err();
        assert!(e.contains("not linux/amd64"), "{e}");
        std::fs::remove_file(blobs.path(&layer)).unwrap();
        let e = blobs.verify_image(&manifest, &"linux/arm64".parse().unwrap()).unwrap_err();
        assert!(e.contains("was not uploaded"), "{e}");
    }
}
