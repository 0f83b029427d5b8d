//! An exporting build's result as a tar of one OCI image layout, streamed
//! to the client: `oci-layout`, `index.json` naming the build's index (or
//! one platform's manifest), and every blob they reach.

use std::io::Write;

use tokio::sync::mpsc;

use braid_shared::oci::ImageDescriptor;
use braid_shared::{Digest, ImageRef, Platform};

use crate::blobs::{BlobError, BlobStore};

/// What goes into one layout: its root descriptor and blobs, in order.
#[derive(Debug)]
pub struct LayoutPlan {
    pub root: ImageDescriptor,
    /// `org.opencontainers.image.ref.name` and `io.containerd.image.name`
    /// for the root, from the build's first tag.
    pub name: Option<ImageRef>,
    pub blobs: Vec<Digest>,
}

/// The blobs of the build's index and of every image it lists, or of one
/// platform's image; fails if any is gone from the store.
pub fn plan(
    blobs: &BlobStore,
    index: Option<&ImageDescriptor>,
    images: &[(Platform, ImageDescriptor)],
    name: Option<ImageRef>,
) -> Result<LayoutPlan, BlobError> {
    let mut all = Vec::new();
    let root = match index {
        Some(index) => {
            if !blobs.has(&index.digest) {
                return Err(BlobError::IndexGone(index.digest.clone()));
            }
            all.push(index.digest.clone());
            index.clone()
        }
        None => match images {
            [(_, only)] => only.clone(),
            _ => return Err(BlobError::Internal("one image, or an index over several".into())),
        },
    };
    for (platform, image) in images {
        let (_, image_blobs) = blobs.verify_image(&image.digest, platform)?;
        for digest in image_blobs {
            if !all.contains(&digest) {
                all.push(digest);
            }
        }
    }
    Ok(LayoutPlan { root, name, blobs: all })
}

/// `index.json` of the layout.
fn index_json(plan: &LayoutPlan) -> Vec<u8> {
    let mut annotations = std::collections::BTreeMap::new();
    if let Some(name) = &plan.name {
        let tagged = name.clone().with_default_tag();
        annotations.insert("io.containerd.image.name".to_owned(), tagged.to_string());
        let tag = tagged.tag().unwrap_or("latest").to_owned();
        annotations.insert("org.opencontainers.image.ref.name".to_owned(), tag);
    }
    braid_shared::oci::layout_index(&plan.root, &annotations)
}

/// Bytes per streamed chunk.
const CHUNK: usize = 1 << 20;

/// Sends what is written as chunks on a channel; a closed channel (the
/// client went away) ends the writing.
struct ChannelWriter {
    tx: mpsc::Sender<Vec<u8>>,
    buf: Vec<u8>,
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx.blocking_send(chunk).map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))
    }
}

/// Writes the layout's tar to `tx` (call from a blocking thread).
pub fn write_tar(blobs: &BlobStore, plan: &LayoutPlan, tx: mpsc::Sender<Vec<u8>>) -> std::io::Result<()> {
    let mut tar = tar::Builder::new(ChannelWriter { tx, buf: Vec::with_capacity(CHUNK) });
    let header = |size: u64, mode: u32, kind: tar::EntryType| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_mtime(0);
        h
    };
    for dir in ["blobs/", "blobs/sha256/"] {
        let mut h = header(0, 0o755, tar::EntryType::Directory);
        tar.append_data(&mut h, dir, std::io::empty())?;
    }
    for digest in &plan.blobs {
        let file = std::fs::File::open(blobs.path(digest))?;
        let len = file.metadata()?.len();
        let mut h = header(len, 0o644, tar::EntryType::Regular);
        tar.append_data(&mut h, format!("blobs/sha256/{}", digest.hex()), file)?;
        blobs.touch(digest);
    }
    let layout = braid_shared::oci::LAYOUT_VERSION_FILE;
    tar.append_data(&mut header(layout.len() as u64, 0o644, tar::EntryType::Regular), "oci-layout", layout)?;
    let index = index_json(plan);
    tar.append_data(&mut header(index.len() as u64, 0o644, tar::EntryType::Regular), "index.json", index.as_slice())?;
    let mut writer = tar.into_inner()?;
    writer.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_names_its_root_and_holds_every_blob_once() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path(), 1 << 20).unwrap();
        let config = blobs.put_bytes(br#"{"architecture":"amd64","os":"linux"}"#, Default::default).unwrap();
        let layer = blobs.put_bytes(b"layer", Default::default).unwrap();
        let manifest = serde_json::json!({
            "schemaVersion": 2, "mediaType": braid_shared::oci::OCI_MANIFEST,
            "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.as_str(), "size": 37 },
            "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer.as_str(), "size": 5 }],
        })
        .to_string();
        let manifest_digest = blobs.put_bytes(manifest.as_bytes(), Default::default).unwrap();
        let image = ImageDescriptor {
            digest: manifest_digest.clone(),
            size: manifest.len() as u64,
            media_type: braid_shared::oci::OCI_MANIFEST.into(),
        };
        let name: ImageRef = "127.0.0.1:5000/app:1".parse().unwrap();
        let plan = plan(&blobs, None, &[("linux/amd64".parse().unwrap(), image)], Some(name)).unwrap();
        assert_eq!(plan.blobs, [manifest_digest.clone(), config, layer]);

        let (tx, mut rx) = mpsc::channel(16);
        let writer = std::thread::spawn({
            let plan_blobs = BlobStore::open(dir.path(), 1 << 20).unwrap();
            move || write_tar(&plan_blobs, &plan, tx)
        });
        let mut bytes = Vec::new();
        while let Some(chunk) = rx.blocking_recv() {
            bytes.extend(chunk);
        }
        writer.join().unwrap().unwrap();
        let mut archive = tar::Archive::new(bytes.as_slice());
        let mut names = Vec::new();
        let mut index = String::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().display().to_string();
            if path == "index.json" {
                std::io::Read::read_to_string(&mut entry, &mut index).unwrap();
            }
            names.push(path);
        }
        assert_eq!(names.len(), 7, "{names:?}");
        assert!(names.contains(&"oci-layout".to_owned()));
        let index: serde_json::Value = serde_json::from_str(&index).unwrap();
        assert_eq!(index["manifests"][0]["digest"], manifest_digest.as_str());
        assert_eq!(index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"], "1");
    }

    #[test]
    fn a_missing_blob_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path(), 1 << 20).unwrap();
        let image = ImageDescriptor {
            digest: Digest::of(b"gone"),
            size: 4,
            media_type: braid_shared::oci::OCI_MANIFEST.into(),
        };
        let e = plan(&blobs, None, &[("linux/amd64".parse().unwrap(), image)], None).unwrap_err();
        assert!(e.to_string().contains("not stored"), "{e}");
    }
}
