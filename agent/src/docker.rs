//! The Docker Engine backend. Builds go through the Engine API's classic
//! builder; the result is saved (`GET /images/{id}/get`) and turned into
//! the same OCI layout buildah exports, so it takes the same push path and
//! the coordinator cannot tell the backends apart.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bollard::Docker;
use bollard::auth::DockerCredentials;
use bollard::query_parameters::BuildImageOptions;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use braid_shared::beneath::{BeneathError, Root};
use braid_shared::context::{self, ContextLimits, HashingWriter};
use braid_shared::oci::{self, Credential};
use braid_shared::{Digest, Platform, engine};

use crate::job::JobDir;

/// A saved image's config and manifest.json are small; anything larger is
/// not an image.
const METADATA_BYTES: u64 = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("Docker Engine at {host}: {message}")]
    Engine { host: String, message: String },
    #[error("Docker Engine: {0}")]
    Api(String),
    #[error("{0}")]
    Build(String),
    #[error("the saved image: {0}")]
    Archive(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DockerError + '_ {
    move |source| DockerError::Io { path: path.to_owned(), source }
}

/// Checks the Engine answers; returns its version for the start-up log.
pub async fn check(host: &str) -> Result<String, DockerError> {
    let docker = connect(host).await?;
    let version = tokio::time::timeout(Duration::from_secs(10), docker.version())
        .await
        .map_err(|_| DockerError::Engine { host: host.to_owned(), message: "no answer within 10 s".into() })?
        .map_err(|e| DockerError::Engine { host: host.to_owned(), message: e.to_string() })?;
    Ok(version.version.unwrap_or_default())
}

pub async fn connect(host: &str) -> Result<Docker, DockerError> {
    engine::connect(host).await.map_err(|e| DockerError::Engine { host: e.host, message: e.message })
}

/// Lets builds of one platform at a time onto the Engine. The classic
/// builder resolves `FROM` by tag in the Engine's one image store, so while
/// an arm64 build pulls `busybox`, an arm/v7 build starting from the same
/// tag would get the arm64 image. Builds of the same platform share the
/// gate; platforms take turns in the order they arrived, so a stream of one
/// platform's jobs cannot starve another's.
#[derive(Default)]
pub struct PlatformGate {
    state: std::sync::Mutex<GateState>,
    changed: tokio::sync::Notify,
}

#[derive(Default)]
struct GateState {
    platform: Option<Platform>,
    inside: usize,
    /// Builds waiting for their turn, by ticket, oldest first.
    waiting: std::collections::VecDeque<(u64, Platform)>,
    next_ticket: u64,
}

impl GateState {
    fn may_enter(&self, platform: &Platform, ticket: Option<u64>) -> bool {
        let others_wait = self.waiting.iter().any(|(t, p)| p != platform && Some(*t) != ticket);
        match &self.platform {
            Some(current) => current == platform && !others_wait,
            None => self.waiting.front().is_none_or(|(_, p)| p == platform),
        }
    }
}

/// Holds the gate open for its platform until dropped.
pub struct GatePass<'a> {
    gate: &'a PlatformGate,
}

/// A place in the queue, given up if the waiting build is cancelled.
struct Ticket<'a> {
    gate: &'a PlatformGate,
    id: Option<u64>,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.gate.state().waiting.retain(|(t, _)| *t != id);
            self.gate.changed.notify_waiters();
        }
    }
}

impl PlatformGate {
    fn state(&self) -> std::sync::MutexGuard<'_, GateState> {
        // Plain fields, whole after any panic.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn is_open_for(&self, platform: &Platform) -> bool {
        self.state().may_enter(platform, None)
    }

    pub async fn enter(&self, platform: &Platform) -> GatePass<'_> {
        let mut ticket = Ticket { gate: self, id: None };
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let mut state = self.state();
                if state.may_enter(platform, ticket.id) {
                    if let Some(id) = ticket.id.take() {
                        state.waiting.retain(|(t, _)| *t != id);
                    }
                    state.platform = Some(platform.clone());
                    state.inside += 1;
                    return GatePass { gate: self };
                }
                if ticket.id.is_none() {
                    let id = state.next_ticket;
                    state.next_ticket += 1;
                    state.waiting.push_back((id, platform.clone()));
                    ticket.id = Some(id);
                }
            }
            changed.await;
        }
    }
}

impl Drop for GatePass<'_> {
    fn drop(&mut self) {
        let mut state = self.gate.state();
        state.inside = state.inside.saturating_sub(1);
        if state.inside == 0 {
            state.platform = None;
            self.gate.changed.notify_waiters();
        }
    }
}

/// What one classic-builder build needs.
pub struct BuildSpec<'a> {
    pub context_dir: &'a Path,
    /// The Dockerfile's text: inline, or read by the agent beneath the
    /// context, so the Engine is never asked to resolve a path in it.
    pub dockerfile: &'a [u8],
    pub platform: &'a Platform,
    pub build_args: HashMap<String, String>,
    pub labels: HashMap<String, String>,
    pub target: &'a str,
    pub no_cache: bool,
    pub credentials: &'a [Credential],
}

/// Name of the Dockerfile braid adds to the context sent to the Engine;
/// the context's `.dockerignore` lists it so `COPY .` leaves it out.
const INLINE_DOCKERFILE: &str = ".braid-inline.Dockerfile";

/// Builds `spec`, sending each output line to `log`; returns the image id.
pub async fn build(
    docker: &Docker,
    spec: BuildSpec<'_>,
    scratch: &JobDir,
    mut log: impl FnMut(String),
) -> Result<String, DockerError> {
    let tar_path = scratch.path().join("context.tar");
    write_context_tar(scratch, spec.context_dir, spec.dockerfile, &tar_path).await?;
    let options = BuildImageOptions {
        dockerfile: INLINE_DOCKERFILE.to_owned(),
        // FROM images for the requested platform, not a local one of
        // another platform under the same tag.
        pull: Some("1".into()),
        nocache: spec.no_cache,
        rm: true,
        forcerm: true,
        buildargs: Some(spec.build_args),
        labels: Some(spec.labels),
        platform: spec.platform.to_string(),
        target: spec.target.to_owned(),
        ..Default::default()
    };
    let file = tokio::fs::File::open(&tar_path).await.map_err(io_err(&tar_path))?;
    let body = tokio_util::io::ReaderStream::new(file);
    let mut stream =
        docker.build_image(options, Some(registry_auths(spec.credentials)), Some(bollard::body_try_stream(body)));
    let mut image_id = None;
    let mut partial = String::new();
    let mut last_lines: Vec<String> = Vec::new();
    while let Some(item) = stream.next().await {
        let info = match item {
            Ok(info) => info,
            Err(bollard::errors::Error::DockerStreamError { error }) => return Err(DockerError::Build(error)),
            Err(e) => return Err(DockerError::Api(e.to_string())),
        };
        if let Some(text) = info.stream {
            partial.push_str(&text);
            // Output without newlines is cut into lines of the log's limit.
            while partial.len() > braid_shared::limits::LOG_LINE_BYTES && !partial.contains('\n') {
                let mut cut = braid_shared::limits::LOG_LINE_BYTES;
                while !partial.is_char_boundary(cut) {
                    cut -= 1;
                }
                let line: String = partial.drain(..cut).collect();
                log(line);
            }
            while let Some(end) = partial.find('\n') {
                let line: String = partial.drain(..=end).collect();
                let line = line.trim_end().to_owned();
                if last_lines.len() == 8 {
                    last_lines.remove(0);
                }
                last_lines.push(line.clone());
                log(line);
            }
        }
        if let Some(detail) = info.error_detail {
            return Err(DockerError::Build(detail.message.unwrap_or_else(|| last_lines.join(" | "))));
        }
        if let Some(aux) = info.aux
            && let Some(id) = aux.id
        {
            image_id = Some(id);
        }
    }
    if !partial.trim().is_empty() {
        log(partial.trim_end().to_owned());
    }
    image_id.ok_or_else(|| DockerError::Build(format!("the Engine reported no image: {}", last_lines.join(" | "))))
}

/// Docker's `X-Registry-Config`: logins for the FROM pulls, keyed by host
/// (Docker Hub under its legacy index address).
fn registry_auths(credentials: &[Credential]) -> HashMap<String, DockerCredentials> {
    credentials
        .iter()
        .map(|c| {
            let key =
                if c.registry == "docker.io" { "https://index.docker.io/v1/".to_owned() } else { c.registry.clone() };
            let login = DockerCredentials {
                username: Some(c.username.clone()),
                password: Some(c.password.as_str().to_owned()),
                serveraddress: Some(key.clone()),
                ..Default::default()
            };
            (key, login)
        })
        .collect()
}

async fn write_context_tar(scratch: &JobDir, dir: &Path, dockerfile: &[u8], out: &Path) -> Result<(), DockerError> {
    let (dir, dockerfile, out) = (dir.to_owned(), dockerfile.to_vec(), out.to_owned());
    scratch
        .blocking(move || {
            prepare_context(&dir, &dockerfile)?;
            let file = beneath_new_file(&out)?;
            let nothing_ignored = braid_shared::dockerignore::DockerIgnore::default();
            context::write_tar(&dir, &nothing_ignored, ContextLimits::default(), std::io::BufWriter::new(file))
                .map_err(|e| DockerError::Build(format!("packing the context: {e}")))?;
            Ok(())
        })
        .await
        .map_err(|e| DockerError::Build(e.to_string()))?
}

/// A file of the agent's own, new (`O_EXCL`, `O_NOFOLLOW`).
fn beneath_new_file(path: &Path) -> Result<std::fs::File, DockerError> {
    braid_shared::beneath::create_new(path, 0o644).map_err(io_err(path))
}

/// The client filtered the context already; the classic builder only
/// leaves out the Dockerfile and `.dockerignore` when `.dockerignore`
/// lists them. The Dockerfile is added to the context under a name of
/// braid's and listed there, so `COPY .` leaves it out; when the context
/// had no `.dockerignore`, the one made for this lists itself too. Both
/// go through a handle on the context: the old `.dockerignore` is read
/// beneath it, and each file is replaced (a link there is replaced, never
/// written through).
fn prepare_context(dir: &Path, dockerfile: &[u8]) -> Result<(), DockerError> {
    let root = Root::open(dir).map_err(io_err(dir))?;
    // What is in the way is the context's doing: a build failure.
    let replace = |name: &str, bytes: &[u8]| {
        root.replace_file(name, bytes, 0o644)
            .map_err(|e| DockerError::Build(format!("writing {name:?} into the context: {e}")))
    };
    replace(INLINE_DOCKERFILE, dockerfile)?;
    let rules = match root.read_file(".dockerignore", braid_shared::limits::DOCKERFILE_BYTES as u64) {
        Ok(rules) => {
            let mut rules = String::from_utf8_lossy(&rules).into_owned();
            if !rules.is_empty() && !rules.ends_with('\n') {
                rules.push('\n');
            }
            rules.push_str(INLINE_DOCKERFILE);
            rules.push('\n');
            rules
        }
        Err(BeneathError::NotFound { .. }) => format!(".dockerignore\n{INLINE_DOCKERFILE}\n"),
        Err(e) => return Err(DockerError::Build(format!("the context's .dockerignore: {e}"))),
    };
    replace(".dockerignore", rules.as_bytes())
}

/// Saves image `id` from the Engine and writes it to `layout` as a
/// one-image OCI layout for `platform`.
pub async fn export_layout(
    docker: &Docker,
    id: &str,
    platform: &Platform,
    annotations: BTreeMap<String, String>,
    scratch: &JobDir,
    layout: &Path,
) -> Result<(), DockerError> {
    let archive = scratch.path().join("image.tar");
    // Made without an await: a cancel cannot leave it behind the job.
    let mut file = tokio::fs::File::from_std(beneath_new_file(&archive)?);
    let mut stream = docker.export_image(id);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| DockerError::Api(e.to_string()))?;
        file.write_all(&chunk).await.map_err(io_err(&archive))?;
    }
    file.flush().await.map_err(io_err(&archive))?;
    drop(file);
    let (platform, layout) = (platform.clone(), layout.to_owned());
    scratch
        .blocking(move || archive_to_layout(&archive, &platform, &annotations, &layout))
        .await
        .map_err(|e| DockerError::Archive(e.to_string()))?
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
) -> Result<(), DockerError> {
    let bad = |m: String| DockerError::Archive(m);
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
    mut visit: impl FnMut(String, &mut tar::Entry<'_, std::fs::File>) -> Result<(), DockerError>,
) -> Result<(), DockerError> {
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

fn read_limited(entry: &mut impl Read, limit: u64) -> Result<Vec<u8>, DockerError> {
    let mut bytes = Vec::new();
    entry.take(limit + 1).read_to_end(&mut bytes).map_err(|e| DockerError::Archive(format!("reading: {e}")))?;
    if bytes.len() as u64 > limit {
        return Err(DockerError::Archive(format!("an entry larger than {limit} bytes where metadata was expected")));
    }
    Ok(bytes)
}

/// Writes one layer as a gzip blob (or as it is, when it is gzip already).
fn write_layer(entry: &mut impl Read, blobs: &Path) -> Result<LayerBlob, DockerError> {
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
    tmp.persist(&path).map_err(|e| DockerError::Io { path: path.clone(), source: e.error })?;
    Ok(LayerBlob { digest, size, media_type, diff_id })
}

fn write_blob(blobs: &Path, digest: &Digest, bytes: &[u8]) -> Result<(), DockerError> {
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

    fn convert(bytes: &[u8], platform: &str) -> Result<(serde_json::Value, serde_json::Value, PathBuf), DockerError> {
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
    fn the_dockerfile_is_listed_in_the_ignore_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        prepare_context(d, b"FROM scratch\n").unwrap();
        let made = std::fs::read_to_string(d.join(".dockerignore")).unwrap();
        assert_eq!(made, format!(".dockerignore\n{INLINE_DOCKERFILE}\n"), "made for this: lists itself");
        std::fs::write(d.join(".dockerignore"), "*.log").unwrap();
        prepare_context(d, b"FROM scratch\n").unwrap();
        assert_eq!(std::fs::read_to_string(d.join(".dockerignore")).unwrap(), format!("*.log\n{INLINE_DOCKERFILE}\n"));
        assert_eq!(std::fs::read_to_string(d.join(INLINE_DOCKERFILE)).unwrap(), "FROM scratch\n");
    }

    #[test]
    fn links_in_the_context_are_replaced_never_written_through() {
        let outer = tempfile::tempdir().unwrap();
        let context = outer.path().join("job/context");
        std::fs::create_dir_all(&context).unwrap();
        std::fs::write(outer.path().join("canary"), "keep").unwrap();
        std::os::unix::fs::symlink("../../canary", context.join(INLINE_DOCKERFILE)).unwrap();
        std::os::unix::fs::symlink("../../made-here", context.join(".dockerignore")).unwrap();
        let e = prepare_context(&context, b"FROM scratch\n").unwrap_err().to_string();
        assert!(e.contains(".dockerignore") && e.contains("refused"), "{e}");
        assert_eq!(std::fs::read_to_string(outer.path().join("canary")).unwrap(), "keep");
        assert!(!outer.path().join("made-here").exists());
        // A link inside is read through, then replaced by a file.
        std::fs::write(context.join("rules"), "*.log").unwrap();
        std::fs::remove_file(context.join(".dockerignore")).unwrap();
        std::os::unix::fs::symlink("rules", context.join(".dockerignore")).unwrap();
        prepare_context(&context, b"FROM scratch\n").unwrap();
        assert_eq!(std::fs::read_to_string(context.join("rules")).unwrap(), "*.log", "the target is untouched");
        assert!(std::fs::symlink_metadata(context.join(".dockerignore")).unwrap().is_file());
        assert!(std::fs::symlink_metadata(context.join(INLINE_DOCKERFILE)).unwrap().is_file());
        assert_eq!(std::fs::read_to_string(outer.path().join("canary")).unwrap(), "keep");
    }

    #[tokio::test]
    async fn a_waiting_platform_goes_before_later_builds_of_the_current_one() {
        let gate = std::sync::Arc::new(PlatformGate::default());
        let arm64: Platform = "linux/arm64".parse().unwrap();
        let armv7: Platform = "linux/arm/v7".parse().unwrap();
        let first = gate.enter(&arm64).await;
        let spawn_enter = |p: Platform| {
            let gate = gate.clone();
            tokio::spawn(async move {
                let _pass = gate.enter(&p).await;
                tokio::time::sleep(std::time::Duration::from_millis(30)).await;
            })
        };
        let v7 = spawn_enter(armv7.clone());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let later_arm64 = spawn_enter(arm64.clone());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!later_arm64.is_finished(), "a later arm64 build waits behind the waiting arm/v7 one");
        drop(first);
        tokio::time::timeout(std::time::Duration::from_secs(2), v7).await.unwrap().unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(2), later_arm64).await.unwrap().unwrap();

        // A cancelled waiter gives its place up.
        let held = gate.enter(&arm64).await;
        let cancelled = spawn_enter(armv7.clone());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        cancelled.abort();
        let _ = cancelled.await;
        let same = tokio::time::timeout(std::time::Duration::from_millis(200), gate.enter(&arm64)).await;
        assert!(same.is_ok(), "nothing waits any more");
        drop(held);
    }

    #[tokio::test]
    async fn the_gate_keeps_platforms_apart_and_lets_one_platform_share() {
        let gate = std::sync::Arc::new(PlatformGate::default());
        let arm64: Platform = "linux/arm64".parse().unwrap();
        let armv7: Platform = "linux/arm/v7".parse().unwrap();
        let first = gate.enter(&arm64).await;
        let second = tokio::time::timeout(std::time::Duration::from_millis(50), gate.enter(&arm64)).await;
        assert!(second.is_ok(), "the same platform shares the gate");
        assert!(!gate.is_open_for(&armv7));
        let waiting = {
            let gate = gate.clone();
            let armv7 = armv7.clone();
            tokio::spawn(async move {
                let _pass = gate.enter(&armv7).await;
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "another platform waits");
        drop(first);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "until every build of the first has left");
        drop(second);
        tokio::time::timeout(std::time::Duration::from_secs(2), waiting).await.unwrap().unwrap();
        assert!(gate.is_open_for(&arm64));
    }

    #[test]
    fn links_resolve_relative_to_their_directory() {
        assert_eq!(resolve_link("a/layer.tar", "../blobs/sha256/x"), "blobs/sha256/x");
        assert_eq!(resolve_link("layer.tar", "./b"), "b");
    }
}
