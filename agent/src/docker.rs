//! The Docker Engine backend. Builds go through the Engine API's classic
//! builder; the result is saved (`GET /images/{id}/get`) and turned into
//! the same OCI layout buildah exports, so it takes the same push path and
//! the coordinator cannot tell the backends apart.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bollard::Docker;
use bollard::auth::DockerCredentials;
use bollard::query_parameters::BuildImageOptions;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use braid_shared::beneath::{BeneathError, Root};
use braid_shared::context::{self, ContextLimits};
use braid_shared::oci::{self, Credential};
use braid_shared::{Platform, engine};

use crate::jobdir::JobDir;

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

impl From<oci::ArchiveError> for DockerError {
    fn from(e: oci::ArchiveError) -> Self {
        match e {
            oci::ArchiveError::Io { path, source } => DockerError::Io { path, source },
            other => DockerError::Archive(other.to_string()),
        }
    }
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
    /// `--network`: "", "default", "none" or "host".
    pub network: &'a str,
    pub add_hosts: &'a [braid_shared::proto::HostMapping],
    /// `--shm-size` (0: the Engine's default).
    pub shm_size_bytes: u64,
}

/// Name of the Dockerfile braid adds to the context sent to the Engine;
/// the context's `.dockerignore` lists it so `COPY .` leaves it out.
const INLINE_DOCKERFILE: &str = ".braid-inline.Dockerfile";

/// Builds `spec`, sending each output line to `log` (flushed after each
/// chunk of output); returns the image id.
pub async fn build(
    docker: &Docker,
    spec: BuildSpec<'_>,
    scratch: &JobDir,
    log: &mut crate::joblog::JobLog,
    tracker: &mut braid_shared::steps::Tracker,
) -> Result<String, DockerError> {
    // bollard takes shmsize as an i32.
    let shmsize = match spec.shm_size_bytes {
        0 => None,
        n => Some(i32::try_from(n).map_err(|_| {
            DockerError::Build(format!(
                "--shm-size {n}: the Docker Engine backend takes at most {} bytes; use a buildah or podman agent",
                i32::MAX
            ))
        })?),
    };
    let extrahosts = (!spec.add_hosts.is_empty())
        .then(|| spec.add_hosts.iter().map(|h| format!("{}:{}", h.host, h.ip)).collect::<Vec<_>>().join(","));
    let networkmode = matches!(spec.network, "none" | "host").then(|| spec.network.to_owned());
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
        // `pull` above fetches the base images already: `--pull` is honoured.
        extrahosts,
        networkmode,
        shmsize,
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
                log.push(line);
            }
            while let Some(end) = partial.find('\n') {
                let line: String = partial.drain(..=end).collect();
                let line = line.trim_end().to_owned();
                if last_lines.len() == 8 {
                    last_lines.remove(0);
                }
                last_lines.push(line.clone());
                tracker.observe(&line);
                log.push(braid_shared::shorten(&line, braid_shared::limits::LOG_LINE_BYTES));
            }
            log.flush();
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
        log.push(braid_shared::shorten(partial.trim_end(), braid_shared::limits::LOG_LINE_BYTES));
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
        .blocking(move || oci::archive_to_layout(&archive, &platform, &annotations, &layout))
        .await
        .map_err(|e| DockerError::Archive(e.to_string()))?
        .map_err(DockerError::from)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

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
}
