//! Conversions between an OCI image layout and a `docker save` archive:
//! the agent's docker backend turns the Engine's saved image into a layout,
//! and `braid build --load` / `--output type=docker` turn a layout into an
//! archive `docker load` takes. Pure file work; the Engine API calls stay
//! with their callers.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::context::HashingWriter;
use crate::digest::Digest;
use crate::oci;
use crate::platform::Platform;

/// A saved image's config and manifest.json are small; anything larger is
/// not an image.
const METADATA_BYTES: u64 = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("writing the archive: {0}")]
    Write(std::io::Error),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ArchiveError + '_ {
    move |source| ArchiveError::Io { path: path.to_owned(), source }
}

#[derive(serde::Deserialize)]
struct SavedImage {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

/// A layer written into the layout.
struct LayerBlob {
    digest: Digest,
    size: u64,
    media_type: &'static str,
    /// The uncompressed tar's digest, to check against the config's diff_ids.
    diff_id: Option<Digest>,
}

/// Converts a `docker save` archive holding one image into an OCI layout:
/// layers gzip-compressed, config stamped with `platform` (as BuildKit
/// does) when the Engine recorded another, manifest carrying `annotations`.
pub fn archive_to_layout(
    archive: &Path,
    platform: &Platform,
    annotations: &BTreeMap<String, String>,
    layout: &Path,
) -> Result<(), ArchiveError> {
    let bad = |m: String| ArchiveError::Invalid(m);
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).map_err(io_err(&blobs))?;

    // Pass 1: manifest.json, and where symlinked entries point.
    let mut links: HashMap<String, String> = HashMap::new();
    let mut manifest: Option<Vec<SavedImage>> = None;
    for_each_entry(archive, |path, entry| {
        if entry.header().entry_type().is_symlink() {
            if let Ok(Some(target)) = entry.link_name() {
                links.insert(path.clone(), resolve_link(&path, &target.to_string_lossy()));
            }
        } else if path == "manifest.json" {
            manifest = Some(
                serde_json::from_slice(&read_limited(entry, METADATA_BYTES)?)
                    .map_err(|e| bad(format!("manifest.json: {e}")))?,
            );
        }
        Ok(())
    })?;
    let Some(mut images) = manifest else {
        return Err(bad("no manifest.json: not a docker save archive".into()));
    };
    if images.len() != 1 {
        return Err(bad(format!("expected one image, found {}", images.len())));
    }
    let image = images.remove(0);
    let follow = |p: &str| {
        let mut p = p.to_owned();
        for _ in 0..8 {
            match links.get(&p) {
                Some(next) => p = next.clone(),
                None => break,
            }
        }
        p
    };
    let config_path = follow(&image.config);
    let layer_paths: Vec<String> = image.layers.iter().map(|l| follow(l)).collect();

    // Pass 2: the config and each layer, streamed into blobs.
    let mut config: Option<Vec<u8>> = None;
    let mut layers: HashMap<String, LayerBlob> = HashMap::new();
    for_each_entry(archive, |path, entry| {
        if path == config_path {
            config = Some(read_limited(entry, METADATA_BYTES)?);
        } else if layer_paths.contains(&path) && !layers.contains_key(&path) {
            layers.insert(path.clone(), write_layer(entry, &blobs)?);
        }
        Ok(())
    })?;
    let config = config.ok_or_else(|| bad(format!("config {} missing", image.config)))?;
    let config = stamp_config(&config, platform).map_err(bad)?;
    let diff_ids = config_diff_ids(&config).map_err(bad)?;
    if diff_ids.len() != layer_paths.len() {
        return Err(bad(format!("{} layers, but the config lists {} diff_ids", layer_paths.len(), diff_ids.len())));
    }
    let mut descriptors = Vec::with_capacity(layer_paths.len());
    for (i, path) in layer_paths.iter().enumerate() {
        let layer = layers.get(path).ok_or_else(|| bad(format!("layer {path} missing")))?;
        if let (Some(found), Some(expected)) = (&layer.diff_id, diff_ids.get(i))
            && found.as_str() != expected
        {
            return Err(bad(format!("layer {path} is {found}, the config says {expected}")));
        }
        descriptors.push(serde_json::json!({
            "mediaType": layer.media_type,
            "digest": layer.digest.as_str(),
            "size": layer.size,
        }));
    }
    let config_digest = Digest::of(&config);
    write_blob(&blobs, &config_digest, &config)?;
    let mut manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": oci::OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest.as_str(),
            "size": config.len(),
        },
        "layers": descriptors,
    });
    if !annotations.is_empty() {
        manifest["annotations"] = serde_json::json!(annotations);
    }
    let manifest = serde_json::to_vec(&manifest).map_err(|e| bad(e.to_string()))?;
    let manifest_digest = Digest::of(&manifest);
    write_blob(&blobs, &manifest_digest, &manifest)?;
    let root = oci::ImageDescriptor {
        digest: manifest_digest,
        size: manifest.len() as u64,
        media_type: oci::OCI_MANIFEST.to_owned(),
    };
    let write = |name: &str, bytes: &[u8]| std::fs::write(layout.join(name), bytes).map_err(io_err(layout));
    write("oci-layout", oci::LAYOUT_VERSION_FILE)?;
    write("index.json", &oci::layout_index(&root, &BTreeMap::new()))
}

fn for_each_entry(
    archive: &Path,
    mut visit: impl FnMut(String, &mut tar::Entry<'_, std::fs::File>) -> Result<(), ArchiveError>,
) -> Result<(), ArchiveError> {
    let file = std::fs::File::open(archive).map_err(io_err(archive))?;
    let mut tar = tar::Archive::new(file);
    for entry in tar.entries().map_err(io_err(archive))? {
        let mut entry = entry.map_err(io_err(archive))?;
        let path = entry.path().map_err(io_err(archive))?.to_string_lossy().trim_start_matches("./").to_owned();
        visit(path, &mut entry)?;
    }
    Ok(())
}

/// A symlink's target as an archive path (targets are relative to the
/// link's directory, e.g. `../blobs/sha256/...`).
fn resolve_link(link: &str, target: &str) -> String {
    let mut parts: Vec<&str> = link.split('/').collect();
    parts.pop();
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    parts.join("/")
}

fn read_limited(entry: &mut impl Read, limit: u64) -> Result<Vec<u8>, ArchiveError> {
    let mut bytes = Vec::new();
    entry.take(limit + 1).read_to_end(&mut bytes).map_err(|e| ArchiveError::Invalid(format!("reading: {e}")))?;
    if bytes.len() as u64 > limit {
        return Err(ArchiveError::Invalid(format!("an entry larger than {limit} bytes where metadata was expected")));
    }
    Ok(bytes)
}

/// Writes one layer as a gzip blob (or as it is, when it is gzip already).
fn write_layer(entry: &mut impl Read, blobs: &Path) -> Result<LayerBlob, ArchiveError> {
    let tmp = tempfile::NamedTempFile::new_in(blobs).map_err(io_err(blobs))?;
    let mut head = [0u8; 2];
    let mut filled = 0;
    while filled < 2 {
        let n = entry.read(&mut head[filled..]).map_err(io_err(blobs))?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    let mut reader = (&head[..filled]).chain(entry);
    let out = HashingWriter::new(std::io::BufWriter::new(tmp.reopen().map_err(io_err(blobs))?));
    let gzipped = head == [0x1f, 0x8b];
    let (digest, size, diff_id, media_type) = if gzipped {
        let mut out = out;
        std::io::copy(&mut reader, &mut out).map_err(io_err(blobs))?;
        let (digest, size, mut inner) = out.finish();
        inner.flush().map_err(io_err(blobs))?;
        (digest, size, None, "application/vnd.oci.image.layer.v1.tar+gzip")
    } else {
        let mut gz = HashingWriter::new(flate2::write::GzEncoder::new(out, flate2::Compression::default()));
        std::io::copy(&mut reader, &mut gz).map_err(io_err(blobs))?;
        let (diff_id, _, encoder) = gz.finish();
        let out = encoder.finish().map_err(io_err(blobs))?;
        let (digest, size, mut inner) = out.finish();
        inner.flush().map_err(io_err(blobs))?;
        (digest, size, Some(diff_id), "application/vnd.oci.image.layer.v1.tar+gzip")
    };
    let path = blobs.join(digest.hex());
    tmp.persist(&path).map_err(|e| ArchiveError::Io { path: path.clone(), source: e.error })?;
    Ok(LayerBlob { digest, size, media_type, diff_id })
}

fn write_blob(blobs: &Path, digest: &Digest, bytes: &[u8]) -> Result<(), ArchiveError> {
    let path = blobs.join(digest.hex());
    std::fs::write(&path, bytes).map_err(io_err(&path))
}

/// The config as saved when it names `platform`; else rewritten to name it.
fn stamp_config(config: &[u8], platform: &Platform) -> Result<Vec<u8>, String> {
    if oci::config_platform(config).is_ok_and(|p| p == *platform) {
        return Ok(config.to_vec());
    }
    let mut value: serde_json::Value = serde_json::from_slice(config).map_err(|e| format!("config: {e}"))?;
    let object = value.as_object_mut().ok_or("config: not a JSON object")?;
    object.insert("os".into(), platform.os().into());
    object.insert("architecture".into(), platform.arch().into());
    match platform.variant() {
        Some(v) => object.insert("variant".into(), v.into()),
        None => object.remove("variant"),
    };
    serde_json::to_vec(&value).map_err(|e| e.to_string())
}

fn config_diff_ids(config: &[u8]) -> Result<Vec<String>, String> {
    let value: serde_json::Value = serde_json::from_slice(config).map_err(|e| format!("config: {e}"))?;
    Ok(value["rootfs"]["diff_ids"]
        .as_array()
        .map(|ids| ids.iter().filter_map(|d| d.as_str().map(str::to_owned)).collect())
        .unwrap_or_default())
}

/// Writes the one image of an OCI layout as a `docker save` archive:
/// `manifest.json` naming its config, layers and tags, and those blobs.
pub fn docker_archive(layout: &Path, tags: &[String], out: impl Write) -> Result<(), ArchiveError> {
    let bad = |m: &str| ArchiveError::Invalid(m.to_owned());
    let read_json = |path: PathBuf| -> Result<serde_json::Value, ArchiveError> {
        let file = std::fs::File::open(&path).map_err(io_err(&path))?;
        let bytes = read_limited(&mut std::io::BufReader::new(file), METADATA_BYTES)?;
        serde_json::from_slice(&bytes).map_err(|e| ArchiveError::Invalid(format!("{}: {e}", path.display())))
    };
    let blob = |digest: &str| -> Result<PathBuf, ArchiveError> {
        let digest: Digest = digest.parse().map_err(|e| ArchiveError::Invalid(format!("{e}")))?;
        Ok(PathBuf::from("blobs/sha256").join(digest.hex()))
    };
    let index = read_json(layout.join("index.json"))?;
    let root = index["manifests"][0]["digest"].as_str().ok_or_else(|| bad("index.json names no image"))?;
    let manifest = read_json(layout.join(blob(root)?))?;
    let config = blob(manifest["config"]["digest"].as_str().ok_or_else(|| bad("the manifest has no config"))?)?;
    let mut layers = Vec::new();
    for layer in manifest["layers"].as_array().ok_or_else(|| bad("the manifest has no layers"))? {
        layers.push(blob(layer["digest"].as_str().ok_or_else(|| bad("a layer without a digest"))?)?);
    }
    let entry = serde_json::json!([{
        "Config": config,
        "RepoTags": tags,
        "Layers": layers,
    }]);
    let mut tar = tar::Builder::new(out);
    let mut written = std::collections::HashSet::new();
    for path in std::iter::once(&config).chain(&layers) {
        if written.insert(path.clone()) {
            let source = layout.join(path);
            tar.append_path_with_name(&source, path).map_err(io_err(&source))?;
        }
    }
    let manifest_json = serde_json::to_vec(&entry).map_err(|e| ArchiveError::Invalid(e.to_string()))?;
    let mut header = tar::Header::new_ustar();
    header.set_size(manifest_json.len() as u64);
    header.set_mode(0o644);
    tar.append_data(&mut header, "manifest.json", manifest_json.as_slice()).map_err(ArchiveError::Write)?;
    tar.into_inner().and_then(|mut out| out.flush()).map_err(ArchiveError::Write)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn layer_tar(file: &str, body: &[u8]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, file, body).unwrap();
        b.into_inner().unwrap()
    }

    fn archive(entries: &[(&str, Vec<u8>)], symlinks: &[(&str, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, body) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(body.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, path, body.as_slice()).unwrap();
        }
        for (path, target) in symlinks {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            b.append_link(&mut h, path, target).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn convert(bytes: &[u8], platform: &str) -> Result<(serde_json::Value, serde_json::Value, PathBuf), ArchiveError> {
        let dir = tempfile::tempdir().unwrap().keep();
        std::fs::write(dir.join("image.tar"), bytes).unwrap();
        let layout = dir.join("layout");
        let notes = BTreeMap::from([("org.example.note".to_owned(), "hi".to_owned())]);
        archive_to_layout(&dir.join("image.tar"), &platform.parse().unwrap(), &notes, &layout)?;
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
        let digest: Digest = index["manifests"][0]["digest"].as_str().unwrap().parse().unwrap();
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(digest.hex())).unwrap()).unwrap();
        Ok((index, manifest, layout))
    }

    fn saved(layer: &[u8], config: serde_json::Value) -> Vec<u8> {
        let config = serde_json::to_vec(&config).unwrap();
        let manifest = serde_json::json!([{ "Config": "c.json", "RepoTags": null, "Layers": ["l1/layer.tar"] }]);
        archive(
            &[("l1/layer.tar", layer.to_vec()), ("c.json", config), ("manifest.json", manifest.to_string().into())],
            &[],
        )
    }

    #[test]
    fn a_saved_image_becomes_an_oci_layout_with_gzip_layers() {
        let layer = layer_tar("hello", b"world");
        let config = serde_json::json!({
            "architecture": "arm64", "variant": "v8", "os": "linux",
            "rootfs": { "type": "layers", "diff_ids": [Digest::of(&layer).as_str()] },
        });
        let (index, manifest, layout) = convert(&saved(&layer, config), "linux/arm64").unwrap();
        assert_eq!(index["manifests"].as_array().unwrap().len(), 1);
        assert_eq!(manifest["mediaType"], oci::OCI_MANIFEST);
        assert_eq!(manifest["annotations"]["org.example.note"], "hi");
        let l = &manifest["layers"][0];
        assert_eq!(l["mediaType"], "application/vnd.oci.image.layer.v1.tar+gzip");
        let blob: Digest = l["digest"].as_str().unwrap().parse().unwrap();
        let gz = std::fs::read(layout.join("blobs/sha256").join(blob.hex())).unwrap();
        assert_eq!(Digest::of(&gz), blob, "the blob is stored under its own digest");
        let mut plain = Vec::new();
        flate2::read::GzDecoder::new(gz.as_slice()).read_to_end(&mut plain).unwrap();
        assert_eq!(plain, layer);
        let config_digest: Digest = manifest["config"]["digest"].as_str().unwrap().parse().unwrap();
        let config = std::fs::read(layout.join("blobs/sha256").join(config_digest.hex())).unwrap();
        assert_eq!(oci::config_platform(&config).unwrap().to_string(), "linux/arm64");
    }

    #[test]
    fn the_config_is_stamped_with_the_requested_platform() {
        let layer = layer_tar("f", b"x");
        let config = serde_json::json!({
            "architecture": "arm", "variant": "v7", "os": "linux",
            "rootfs": { "type": "layers", "diff_ids": [Digest::of(&layer).as_str()] },
        });
        let (_, manifest, layout) = convert(&saved(&layer, config), "linux/arm/v6").unwrap();
        let digest: Digest = manifest["config"]["digest"].as_str().unwrap().parse().unwrap();
        let config = std::fs::read(layout.join("blobs/sha256").join(digest.hex())).unwrap();
        assert_eq!(oci::config_platform(&config).unwrap().to_string(), "linux/arm/v6");
    }

    #[test]
    fn a_layer_that_does_not_match_its_diff_id_is_refused() {
        let layer = layer_tar("f", b"x");
        let config = serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "rootfs": { "type": "layers", "diff_ids": [Digest::of(b"other").as_str()] },
        });
        let e = convert(&saved(&layer, config), "linux/amd64").unwrap_err().to_string();
        assert!(e.contains("the config says"), "{e}");
    }

    #[test]
    fn symlinked_layers_of_newer_engines_are_followed() {
        let layer = layer_tar("f", b"x");
        let d = Digest::of(&layer);
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "rootfs": { "type": "layers", "diff_ids": [d.as_str()] },
        }))
        .unwrap();
        let blob = format!("blobs/sha256/{}", d.hex());
        let manifest = serde_json::json!([{ "Config": "c.json", "Layers": ["l1/layer.tar"] }]);
        let bytes = archive(
            &[(blob.as_str(), layer.clone()), ("c.json", config), ("manifest.json", manifest.to_string().into())],
            &[("l1/layer.tar", &format!("../{blob}"))],
        );
        let (_, manifest, _) = convert(&bytes, "linux/amd64").unwrap();
        assert_eq!(manifest["layers"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn not_an_image_archive_is_a_clear_error() {
        let e = convert(&archive(&[("hello", b"x".to_vec())], &[]), "linux/amd64").unwrap_err().to_string();
        assert!(e.contains("no manifest.json"), "{e}");
    }

    #[test]
    fn links_resolve_relative_to_their_directory() {
        assert_eq!(resolve_link("a/layer.tar", "../blobs/sha256/x"), "blobs/sha256/x");
        assert_eq!(resolve_link("layer.tar", "./b"), "b");
    }

    #[test]
    fn a_layout_becomes_a_docker_load_archive() {
        let layout = tempfile::tempdir().unwrap();
        let blobs = layout.path().join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        let put = |bytes: &[u8]| {
            let d = Digest::of(bytes);
            std::fs::write(blobs.join(d.hex()), bytes).unwrap();
            d
        };
        let config = put(br#"{"architecture":"amd64","os":"linux"}"#);
        let layer = put(b"gzip");
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "config": { "digest": config.as_str(), "size": 37 },
            "layers": [{ "digest": layer.as_str(), "size": 4 }],
        });
        let manifest = put(manifest.to_string().as_bytes());
        let index = serde_json::json!({ "manifests": [{ "digest": manifest.as_str() }] });
        std::fs::write(layout.path().join("index.json"), index.to_string()).unwrap();
        let mut out = Vec::new();
        docker_archive(layout.path(), &["reg.io/app:1".into()], &mut out).unwrap();
        let mut archive = tar::Archive::new(out.as_slice());
        let mut names = Vec::new();
        let mut manifest_json = String::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let name = entry.path().unwrap().display().to_string();
            if name == "manifest.json" {
                std::io::Read::read_to_string(&mut entry, &mut manifest_json).unwrap();
            }
            names.push(name);
        }
        assert_eq!(names.len(), 3, "{names:?}");
        let m: serde_json::Value = serde_json::from_str(&manifest_json).unwrap();
        assert_eq!(m[0]["RepoTags"][0], "reg.io/app:1");
        assert_eq!(m[0]["Config"], format!("blobs/sha256/{}", config.hex()));
        assert_eq!(m[0]["Layers"][0], format!("blobs/sha256/{}", layer.hex()));
    }
}
