//! Contexts that are not a local directory, fetched here and then packed
//! and sent like any other (content-addressed, so the same commit or
//! tarball is uploaded once): a git repository (the git CLI, with whatever
//! authentication the user's git already does; shallow where the server
//! allows), an `http(s)://` tarball or Dockerfile, and `-` (a tar or a
//! Dockerfile on stdin). What they are is `braid_shared::source`'s to say.
//! No URL with credentials is ever shown: they go to git by a credential
//! helper and to the HTTP server as basic auth, and every message is scrubbed.

use std::collections::HashMap;
use std::io::{BufRead, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use braid_shared::context::{self, ContextLimits};
use braid_shared::dockerignore::DockerIgnore;
use braid_shared::source::{self, Credentials, GitSource, HttpSource, Sniffed, Source};
use braid_shared::{limits, proto};

use crate::upload::{self, DockerfileSource, PreparedContext};

/// The main context, packed, and what the index's annotations say of it.
pub struct Resolved {
    pub prepared: PreparedContext,
    /// A local directory (whose own git checkout may annotate the index).
    pub local: bool,
    /// A git context: its URL without credentials and the commit built.
    pub git: Option<(String, String)>,
}

/// Fetches and packs the main context `arg` with `-f file` (relative to the
/// working directory for a local context; to the context's root for a git
/// or http(s) one, as buildx).
pub async fn main_context(
    arg: &Path,
    file: Option<&str>,
    build_args: &HashMap<String, String>,
    say: &impl Fn(String),
) -> anyhow::Result<Resolved> {
    let parsed = match arg.to_str() {
        Some(s) => source::classify(s, |d| Path::new(d).is_dir())?,
        None => Source::Local(String::new()),
    };
    let file = file.map(str::to_owned);
    match parsed {
        Source::Local(_) => {
            let dir = arg.to_owned();
            let prepared = tokio::task::spawn_blocking(move || upload::prepare(&dir, file.as_deref())).await??;
            Ok(Resolved { prepared, local: true, git: None })
        }
        Source::Stdin => {
            let prepared = tokio::task::spawn_blocking(move || from_stdin(file.as_deref())).await??;
            Ok(Resolved { prepared, local: false, git: None })
        }
        Source::Git(git) => {
            let keep = git.keep_git_dir.unwrap_or_else(|| {
                build_args.get("BUILDKIT_CONTEXT_KEEP_GIT_DIR").is_some_and(|v| matches!(v.as_str(), "1" | "true"))
            });
            let fetched = fetch_git(&git, keep).await?;
            say(format!(
                "#1 context: git {} {} at {}",
                git.remote,
                if git.git_ref.is_empty() { "HEAD" } else { &git.git_ref },
                fetched.commit
            ));
            let dockerfile = in_root(&fetched.root, file.as_deref())?;
            let root = fetched.root.clone();
            let prepared = tokio::task::spawn_blocking(move || upload::prepare(&root, dockerfile.as_deref())).await??;
            drop(fetched.dir);
            Ok(Resolved { prepared, local: false, git: Some((git.remote.clone(), fetched.commit)) })
        }
        Source::Http(http) => {
            let dir = tempfile::Builder::new().prefix("braid-context-").tempdir()?;
            let download = dir.path().join("download");
            let bytes = download_to(&http, &download).await?;
            let kind = head_of(&download)?;
            say(format!("#1 context: fetched {} ({bytes} bytes, {})", http.shown, kind_word(kind)));
            let prepared = if kind == Sniffed::Other {
                if let Some(f) = &file {
                    bail!("-f {f}: {} is a Dockerfile, not a tarball, so -f has nothing to name (drop it)", http.shown);
                }
                if bytes > limits::DOCKERFILE_BYTES as u64 {
                    bail!(
                        "{}: neither a tar (plain, gzip, bzip2, xz or zstd) nor a Dockerfile (over {} bytes)",
                        http.shown,
                        limits::DOCKERFILE_BYTES
                    );
                }
                let dockerfile = std::fs::read(&download)?;
                tokio::task::spawn_blocking(move || empty_with_dockerfile(dockerfile)).await??
            } else {
                let tree = dir.path().join("tree");
                std::fs::create_dir(&tree)?;
                let (from, into) = (download.clone(), tree.clone());
                tokio::task::spawn_blocking(move || {
                    let f = std::io::BufReader::new(std::fs::File::open(&from)?);
                    unpack_archive(kind, f, &into)
                })
                .await??;
                let dockerfile = in_root(&tree, file.as_deref())?;
                tokio::task::spawn_blocking(move || upload::prepare(&tree, dockerfile.as_deref())).await??
            };
            Ok(Resolved { prepared, local: false, git: None })
        }
    }
}

/// A `--build-context NAME=VALUE` whose value is a git or http(s) URL, as
/// BuildKit takes it: a repository's tree (at `#REF:SUBDIR`), or the
/// downloaded file alone, named `context`, as BuildKit's HTTP source does.
pub async fn named_context(name: &str, value: &str, say: &impl Fn(String)) -> anyhow::Result<PreparedContext> {
    let what = format!("--build-context {name}");
    match source::classify(value, |_| false).with_context(|| what.clone())? {
        Source::Git(git) => {
            let fetched = fetch_git(&git, git.keep_git_dir.unwrap_or(false)).await.with_context(|| what.clone())?;
            say(format!("#1 build context {name}: git {} at {}", git.remote, fetched.commit));
            let root = fetched.root.clone();
            let prepared = tokio::task::spawn_blocking(move || crate::needs::prepare_dir(&root)).await??;
            drop(fetched.dir);
            Ok(prepared)
        }
        Source::Http(http) => {
            let dir = tempfile::Builder::new().prefix("braid-context-").tempdir()?;
            let bytes = download_to(&http, &dir.path().join("context")).await.with_context(|| what.clone())?;
            say(format!("#1 build context {name}: fetched {} ({bytes} bytes) as the file \"context\"", http.shown));
            let root = dir.path().to_owned();
            let prepared = tokio::task::spawn_blocking(move || crate::needs::prepare_dir(&root)).await??;
            drop(dir);
            Ok(prepared)
        }
        Source::Stdin | Source::Local(_) => bail!("{what}: not a git or http(s) URL"),
    }
}

/// The index annotations buildx's defaults add, for a git context: the
/// creation time, the URL (without credentials) and the commit, unless the
/// same index annotation was given.
pub fn git_annotations(remote: &str, commit: &str, given: &[proto::Annotation]) -> Vec<proto::Annotation> {
    let created = time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).ok();
    [
        ("org.opencontainers.image.created", created),
        ("org.opencontainers.image.source", Some(source::redact(remote))),
        ("org.opencontainers.image.revision", Some(commit.to_owned())),
    ]
    .into_iter()
    .filter(|(key, _)| !given.iter().any(|a| a.level == "index" && a.key == *key))
    .filter_map(|(key, value)| {
        Some(proto::Annotation { level: "index".into(), platform: String::new(), key: key.into(), value: value? })
    })
    .collect()
}

/// `-f` of a remote context: a path inside its root (nothing outside it is
/// read), `-` for stdin, or the root's Dockerfile.
fn in_root(root: &Path, file: Option<&str>) -> anyhow::Result<Option<String>> {
    match file {
        None => Ok(None),
        Some("-") => Ok(Some("-".into())),
        Some(f) => {
            let rel = Path::new(f);
            if rel.is_absolute() || rel.components().any(|c| matches!(c, Component::ParentDir)) {
                bail!("-f {f}: with a remote context, -f names a file inside it (a relative path without ..)");
            }
            let path = root.join(rel);
            Ok(Some(path.to_str().context("Dockerfile path is not UTF-8")?.to_owned()))
        }
    }
}

/// `-` as the context, as `docker build -`: a tar (plain or compressed) is
/// the context and `-f` names a file in it; anything else is a Dockerfile
/// with an empty context.
fn from_stdin(dockerfile: Option<&str>) -> anyhow::Result<PreparedContext> {
    if dockerfile == Some("-") {
        bail!("the context and the Dockerfile cannot both come from stdin");
    }
    let mut stdin = std::io::BufReader::with_capacity(64 << 10, std::io::stdin().lock());
    let head = peek(&mut stdin)?;
    let kind = source::sniff(&head);
    let reader = std::io::Cursor::new(head).chain(stdin);
    if kind == Sniffed::Other {
        if let Some(f) = dockerfile {
            bail!("-f {f}: stdin holds a Dockerfile, not a tar, so there is no file to name (drop -f)");
        }
        let mut contents = Vec::new();
        reader.take(limits::DOCKERFILE_BYTES as u64 + 1).read_to_end(&mut contents)?;
        return empty_with_dockerfile(contents);
    }
    let dir = tempfile::tempdir()?;
    unpack_archive(kind, std::io::BufReader::new(reader), dir.path()).context("reading the context tar from stdin")?;
    let inside = dir.path().join(dockerfile.unwrap_or("Dockerfile"));
    let inside = inside.to_str().context("Dockerfile path is not UTF-8")?.to_owned();
    upload::prepare(dir.path(), Some(&inside))
}

/// The first bytes of `r` (up to `SNIFF_BYTES`), without consuming them from
/// the caller's view: they are returned to be chained back.
fn peek(r: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(source::SNIFF_BYTES);
    r.take(source::SNIFF_BYTES as u64).read_to_end(&mut head)?;
    Ok(head)
}

fn head_of(path: &Path) -> anyhow::Result<Sniffed> {
    let mut f = std::fs::File::open(path)?;
    Ok(source::sniff(&peek(&mut f)?))
}

fn kind_word(kind: Sniffed) -> &'static str {
    match kind {
        Sniffed::Gzip => "gzip tarball",
        Sniffed::Bzip2 => "bzip2 tarball",
        Sniffed::Xz => "xz tarball",
        Sniffed::Zstd => "zstd tarball",
        Sniffed::Tar => "tarball",
        Sniffed::Other => "a Dockerfile",
    }
}

/// An empty context with `contents` as its Dockerfile.
fn empty_with_dockerfile(contents: Vec<u8>) -> anyhow::Result<PreparedContext> {
    if contents.len() > limits::DOCKERFILE_BYTES {
        bail!("Dockerfile larger than {} bytes", limits::DOCKERFILE_BYTES);
    }
    if contents.iter().all(u8::is_ascii_whitespace) {
        bail!("the Dockerfile is empty (expected a Dockerfile or a tar)");
    }
    let empty = tempfile::tempdir()?;
    let mut tar = tempfile::NamedTempFile::new()?;
    let summary = {
        let writer = std::io::BufWriter::new(tar.as_file_mut());
        context::write_tar(empty.path(), &DockerIgnore::default(), ContextLimits::default(), writer)?
    };
    Ok(PreparedContext { tar, summary, dockerfile: DockerfileSource::Inline(contents) })
}

/// A reader that fails past `limit` bytes: a decompression bomb stops there.
struct Bounded<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.left = self.left.checked_sub(n as u64).ok_or_else(|| {
            std::io::Error::other(format!("the context unpacks to more than {} bytes", decompressed_limit()))
        })?;
        Ok(n)
    }
}

/// Tar headers and padding come on top of the contents' limit.
fn decompressed_limit() -> u64 {
    limits::CONTEXT_BYTES + limits::CONTEXT_ENTRIES * 1024
}

/// Unpacks a tar, plain or compressed as BuildKit and docker take it, into
/// `dest`, within the context limits.
fn unpack_archive(kind: Sniffed, input: impl BufRead, dest: &Path) -> anyhow::Result<()> {
    let limit = decompressed_limit();
    let reader: Box<dyn Read> = match kind {
        Sniffed::Tar => Box::new(input),
        Sniffed::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(input)),
        Sniffed::Bzip2 => Box::new(bzip2::bufread::MultiBzDecoder::new(input)),
        Sniffed::Zstd => {
            let mut d = zstd::stream::read::Decoder::with_buffer(input)?;
            d.window_log_max(limits::ZSTD_WINDOW_LOG_MAX)?;
            Box::new(d)
        }
        Sniffed::Xz => {
            // lzma-rs decodes into a writer: a bounded temporary file, then read back.
            let mut tmp = tempfile::tempfile()?;
            {
                let mut w = BoundedWriter { inner: std::io::BufWriter::new(&mut tmp), left: limit };
                let mut input = input;
                lzma_rs::xz_decompress(&mut input, &mut w).map_err(|e| anyhow::anyhow!("decompressing xz: {e}"))?;
                w.inner.flush()?;
            }
            use std::io::Seek as _;
            tmp.rewind()?;
            Box::new(std::io::BufReader::new(tmp))
        }
        Sniffed::Other => bail!("not a tar archive"),
    };
    context::unpack(Bounded { inner: reader, left: limit }, dest, ContextLimits::default())?;
    Ok(())
}

struct BoundedWriter<W> {
    inner: W,
    left: u64,
}

impl<W: Write> Write for BoundedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.left = self.left.checked_sub(buf.len() as u64).ok_or_else(|| {
            std::io::Error::other(format!("the context unpacks to more than {} bytes", decompressed_limit()))
        })?;
        self.inner.write(buf).inspect(|&n| self.left += (buf.len() - n) as u64)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Downloads `http` into `dest`, bounded in size and time; returns its size.
async fn download_to(http: &HttpSource, dest: &Path) -> anyhow::Result<u64> {
    let scrub = Scrub::new(http.credentials.as_ref());
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(30))
        .timeout(Duration::from_secs(limits::REMOTE_CONTEXT_SECONDS))
        .build()
        .map_err(|e| anyhow::anyhow!("HTTP client: {e}"))?;
    let mut request = client.get(&http.url);
    if let Some(c) = &http.credentials {
        request = request.basic_auth(&c.username, Some(&c.password));
    }
    let failed =
        |e: reqwest::Error| anyhow::anyhow!("fetching {}: {}", http.shown, scrub.apply(&e.without_url().to_string()));
    let mut response = request.send().await.map_err(failed)?;
    if !response.status().is_success() {
        bail!("fetching {}: HTTP {}", http.shown, response.status());
    }
    let mut file = tokio::fs::File::create(dest).await?;
    let mut total = 0u64;
    while let Some(chunk) = response.chunk().await.map_err(failed)? {
        total += chunk.len() as u64;
        if total > limits::CONTEXT_BYTES {
            bail!("fetching {}: larger than the context limit of {} bytes", http.shown, limits::CONTEXT_BYTES);
        }
        tokio::io::AsyncWriteExt::write_all(&mut file, &chunk).await?;
    }
    tokio::io::AsyncWriteExt::flush(&mut file).await?;
    Ok(total)
}

/// Removes credentials from text a tool printed.
struct Scrub {
    secrets: Vec<String>,
}

impl Scrub {
    fn new(credentials: Option<&Credentials>) -> Self {
        let mut secrets = Vec::new();
        if let Some(c) = credentials {
            secrets.push(c.raw.clone());
            // Short passwords would blank out ordinary words; the userinfo is scrubbed whole anyway.
            for s in [&c.password, &c.username] {
                if s.len() >= 4 {
                    secrets.push(s.clone());
                }
            }
        }
        Scrub { secrets }
    }

    fn apply(&self, text: &str) -> String {
        let mut out = source::redact(text);
        for s in &self.secrets {
            out = out.replace(s.as_str(), "***");
        }
        out
    }
}

/// A checked-out repository in a temporary directory (removed on drop).
struct Fetched {
    dir: tempfile::TempDir,
    /// The context's root: the checkout, or its subdir.
    root: PathBuf,
    commit: String,
}

async fn fetch_git(git: &GitSource, keep_git_dir: bool) -> anyhow::Result<Fetched> {
    let limit = Duration::from_secs(limits::REMOTE_CONTEXT_SECONDS);
    tokio::time::timeout(limit, fetch_git_inner(git, keep_git_dir)).await.unwrap_or_else(|_| {
        bail!("fetching {}: not done within {}s (the limit for a remote context)", git.remote, limit.as_secs())
    })
}

async fn fetch_git_inner(git: &GitSource, keep_git_dir: bool) -> anyhow::Result<Fetched> {
    let dir = tempfile::Builder::new().prefix("braid-git-").tempdir()?;
    let repo = dir.path().join("repo");
    let runner = Git {
        repo: repo.clone(),
        remote: git.remote.clone(),
        credentials: git.credentials.clone(),
        scrub: Scrub::new(git.credentials.as_ref()),
    };
    runner.run_in(dir.path(), &["init", "-q", "repo"]).await?;
    // An origin (without credentials), so that relative submodule URLs resolve against it.
    let remote = git.remote.as_str();
    runner.run(&["remote", "add", "origin", remote]).await?;
    let want = if git.git_ref.is_empty() { "HEAD" } else { git.git_ref.as_str() };
    let commit = match runner.run(&["fetch", "-q", "--depth", "1", "--no-tags", "origin", want]).await {
        Ok(_) => runner.run(&["rev-parse", "--verify", "FETCH_HEAD^{commit}"]).await?,
        Err(shallow) => {
            let hex = want.len() >= 4 && want.chars().all(|c| c.is_ascii_hexdigit());
            if hex {
                // A commit the server would not send alone: everything, then that commit.
                runner
                    .run(&["fetch", "-q", "origin", "+refs/heads/*:refs/remotes/origin/*", "+refs/tags/*:refs/tags/*"])
                    .await
                    .map_err(|e| after(e, &shallow))?;
                let spec = format!("{want}^{{commit}}");
                runner
                    .run(&["rev-parse", "--verify", "-q", &spec])
                    .await
                    .map_err(|_| anyhow::anyhow!("fetching {remote}: no commit {want} in the repository"))?
            } else {
                // A server that refuses shallow fetches.
                runner.run(&["fetch", "-q", "--no-tags", "origin", want]).await.map_err(|e| after(e, &shallow))?;
                runner.run(&["rev-parse", "--verify", "FETCH_HEAD^{commit}"]).await?
            }
        }
    };
    let commit = commit.trim().to_owned();
    if !git.checksum.is_empty() && !commit.starts_with(&git.checksum.to_ascii_lowercase()) {
        bail!("fetching {remote}: {want} is commit {commit}, not the checksum {} given", git.checksum);
    }
    runner.run(&["-c", "advice.detachedHead=false", "checkout", "-q", "--detach", &commit]).await?;
    if git.submodules != Some(false) && repo.join(".gitmodules").is_file() {
        runner.run(&["submodule", "update", "-q", "--init", "--recursive", "--depth", "1"]).await?;
    }
    let time = runner.run(&["show", "-s", "--format=%ct", &commit]).await?.trim().parse::<i64>().unwrap_or(0);
    let sub = git.subdir.trim_start_matches('/');
    let root = if sub.is_empty() { repo.clone() } else { repo.join(sub) };
    let canonical_repo = repo.canonicalize()?;
    let root = match root.canonicalize() {
        Ok(r) if r.starts_with(&canonical_repo) && r.is_dir() => r,
        _ => bail!("fetching {remote}: no directory {:?} at {want} ({commit})", git.subdir),
    };
    if !keep_git_dir {
        std::fs::remove_dir_all(repo.join(".git")).context("removing the clone's .git")?;
    }
    // A checkout's times are the clock's: the commit's time instead, so the
    // same commit packs to the same context and is uploaded once.
    let walk_root = repo.clone();
    tokio::task::spawn_blocking(move || set_times(&walk_root, time)).await??;
    Ok(Fetched { dir, root, commit })
}

/// `host[:port]` of a `scheme://host[:port]/path` remote, as git's credential
/// protocol names it.
fn host_of(remote: &str) -> &str {
    let rest = remote.split_once("://").map_or(remote, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest)
}

/// The error of a second attempt, with the first's when it said something else.
fn after(second: anyhow::Error, first: &anyhow::Error) -> anyhow::Error {
    let (a, b) = (format!("{first:#}"), format!("{second:#}"));
    if a == b { second } else { anyhow::anyhow!("{b} (a shallow fetch first: {a})") }
}

/// Sets the modification (and access) time of everything under `dir`,
/// links themselves included, to `seconds` since the epoch.
fn set_times(dir: &Path, seconds: i64) -> anyhow::Result<()> {
    use rustix::fs::{AtFlags, CWD, Timespec, Timestamps, utimensat};
    let at = Timespec { tv_sec: seconds, tv_nsec: 0 };
    let times = Timestamps { last_access: at, last_modification: at };
    let mut stack = vec![dir.to_owned()];
    let mut dirs = Vec::new();
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("reading {d:?}"))? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                stack.push(path.clone());
                dirs.push(path);
            } else {
                utimensat(CWD, &path, &times, AtFlags::SYMLINK_NOFOLLOW)
                    .with_context(|| format!("setting the time of {path:?}"))?;
            }
        }
    }
    // Directories last (deepest first), since writing in one changes its time.
    for d in dirs.iter().rev().chain(std::iter::once(&dir.to_owned())) {
        utimensat(CWD, d, &times, AtFlags::SYMLINK_NOFOLLOW).with_context(|| format!("setting the time of {d:?}"))?;
    }
    Ok(())
}

/// Runs the user's git (their configuration, ssh agent and credential
/// helpers apply); credentials from the URL come from a helper of our own,
/// through the environment, never the command line.
struct Git {
    repo: PathBuf,
    /// The remote (no credentials), for messages.
    remote: String,
    credentials: Option<Credentials>,
    scrub: Scrub,
}

/// Answers `get` for the URL's own host only (never a submodule's elsewhere).
const CREDENTIAL_HELPER: &str = "!f() { test \"$1\" = get || exit 0; h=; while IFS= read -r l; do case \"$l\" in \
     host=*) h=\"${l#host=}\";; esac; done; test \"$h\" = \"$BRAID_GIT_HOST\" && printf 'username=%s\\npassword=%s\\n' \
     \"$BRAID_GIT_USERNAME\" \"$BRAID_GIT_PASSWORD\"; }; f";

impl Git {
    async fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        self.run_in(&self.repo, args).await
    }

    async fn run_in(&self, dir: &Path, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = tokio::process::Command::new("git");
        cmd.arg("-C").arg(dir);
        if let Some(c) = &self.credentials {
            cmd.args(["-c", "credential.helper=", "-c"])
                .arg(format!("credential.helper={CREDENTIAL_HELPER}"))
                .env("BRAID_GIT_HOST", host_of(&self.remote))
                .env("BRAID_GIT_USERNAME", &c.username)
                .env("BRAID_GIT_PASSWORD", &c.password);
        }
        if !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
            cmd.env("GIT_TERMINAL_PROMPT", "0");
        }
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        let out = match cmd.output().await {
            Ok(out) => out,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!(
                    "a git context needs git, which is not installed here: install the git package (apt-get install git)"
                )
            }
            Err(e) => bail!("running git: {e}"),
        };
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let stderr = braid_shared::shorten(stderr.trim(), 2000);
            let what = args.iter().find(|a| !a.starts_with('-') && !a.contains('=')).unwrap_or(&"");
            bail!("fetching {}: git {what} failed ({}): {}", self.remote, out.status, self.scrub.apply(&stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn scrub_removes_every_form_of_the_credentials() {
        let c = Credentials { username: "alice".into(), password: "s3cr3t!".into(), raw: "alice:s3cr3t%21".into() };
        let s = Scrub::new(Some(&c));
        let out = s.apply("fatal: https://alice:s3cr3t%21@h/r.git said s3cr3t! to alice");
        assert_eq!(out, "fatal: https://h/r.git said *** to ***");
    }

    #[test]
    fn the_credential_helper_answers_for_the_urls_host() {
        assert_eq!(host_of("https://h.example:8443/o/r.git"), "h.example:8443");
        assert_eq!(host_of("http://[::1]:9/r.git"), "[::1]:9");
        let helper = CREDENTIAL_HELPER.trim_start_matches('!');
        let ask = |host: &str| {
            let mut child = std::process::Command::new("sh")
                .args(["-c", &format!("{helper} get"), "sh"])
                .env("BRAID_GIT_HOST", "h.example:8443")
                .env("BRAID_GIT_USERNAME", "u")
                .env("BRAID_GIT_PASSWORD", "p w")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let input = format!("protocol=https\nhost={host}\n\n");
            child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
            String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap()
        };
        assert_eq!(ask("h.example:8443"), "username=u\npassword=p w\n");
        assert_eq!(ask("elsewhere.example"), "");
    }

    #[test]
    fn dockerfile_paths_stay_inside_a_remote_context() {
        let root = Path::new("/tmp/ctx");
        assert_eq!(in_root(root, None).unwrap(), None);
        assert_eq!(in_root(root, Some("sub/Dockerfile")).unwrap().unwrap(), "/tmp/ctx/sub/Dockerfile");
        assert!(in_root(root, Some("../etc/passwd")).is_err());
        assert!(in_root(root, Some("/etc/passwd")).is_err());
    }

    #[test]
    fn compressed_tars_unpack_and_bombs_stop() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(5);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "hello.txt", &b"hello"[..]).unwrap();
        let plain = b.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&plain).unwrap();
        let gz = gz.finish().unwrap();
        let mut bz = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
        bz.write_all(&plain).unwrap();
        let bz = bz.finish().unwrap();
        let mut xz = Vec::new();
        lzma_rs::xz_compress(&mut &plain[..], &mut xz).unwrap();
        let zst = zstd::encode_all(&plain[..], 3).unwrap();
        for (want, bytes) in
            [(Sniffed::Tar, plain), (Sniffed::Gzip, gz), (Sniffed::Bzip2, bz), (Sniffed::Xz, xz), (Sniffed::Zstd, zst)]
        {
            assert_eq!(source::sniff(&bytes), want);
            let dir = tempfile::tempdir().unwrap();
            unpack_archive(want, &bytes[..], dir.path()).unwrap();
            assert_eq!(std::fs::read(dir.path().join("hello.txt")).unwrap(), b"hello", "{want:?}");
        }
        assert!(empty_with_dockerfile(b" \n".to_vec()).err().unwrap().to_string().contains("empty"));
        let p = empty_with_dockerfile(b"FROM scratch\n".to_vec()).unwrap();
        assert!(matches!(p.dockerfile, DockerfileSource::Inline(ref d) if d == b"FROM scratch\n"));
        assert_eq!(p.summary.entries, 0);
        let mut bounded = Bounded { inner: &[0u8; 100][..], left: 10 };
        assert!(std::io::copy(&mut bounded, &mut std::io::sink()).is_err());
    }

    #[test]
    fn git_annotations_yield_to_given_ones() {
        let given = [proto::Annotation {
            level: "index".into(),
            platform: String::new(),
            key: "org.opencontainers.image.source".into(),
            value: "mine".into(),
        }];
        let a = git_annotations("https://h/r.git", "abc", &given);
        let keys: Vec<_> = a.iter().map(|a| (a.key.as_str(), a.value.as_str())).collect();
        assert!(keys.contains(&("org.opencontainers.image.revision", "abc")));
        assert!(!keys.iter().any(|(k, _)| *k == "org.opencontainers.image.source"));
    }
}
