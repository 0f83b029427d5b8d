//! `braid build`'s flags for what a builder must be able to do:
//! `--build-context`, `--no-cache-filter`, and buildx's attestation flags;
//! and what the build needs, from its flags and a scan of its Dockerfile,
//! sent with the spec so the coordinator places it on a builder that has it.

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use anyhow::Context as _;

use braid_shared::buildneeds::{self, ContextSource};
use braid_shared::context::{self, ContextLimits};
use braid_shared::dockerignore::DockerIgnore;
use braid_shared::{dockerfile, limits, proto};

use crate::conn::Builds;
use crate::upload::{self, DockerfileSource, PreparedContext};

#[derive(Debug, clap::Args)]
pub struct NeedsArgs {
    /// Additional build context NAME=VALUE (repeatable): a local directory (uploaded as its own context), a git
    /// URL (fetched here like the main context), an http(s):// URL (its file, named "context", as BuildKit) or
    /// docker-image://REF; the Dockerfile uses it as `COPY --from=NAME` or `FROM NAME` (buildah >= 1.27, podman
    /// >= 4.2)
    #[arg(long = "build-context", value_name = "NAME=VALUE")]
    pub build_contexts: Vec<String>,
    /// Do not cache the given stages (repeatable; needs a builder that has it: none of braid's agents yet, so it is
    /// refused by name)
    #[arg(long = "no-cache-filter", value_name = "STAGE", value_delimiter = ',')]
    pub no_cache_filter: Vec<String>,
    /// SLSA provenance, as buildx: true (= mode=min), false, or mode=min|max[,version=v0.2|v1]. Default: mode=min
    /// when pushing with --format oci; none with --load, --output type=oci|docker or --format docker (Docker
    /// manifest lists cannot carry attestations, so asking for it there is refused). max adds build args, target and
    /// labels; never secrets or credentials
    #[arg(long, value_name = "VALUE", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub provenance: Option<String>,
    /// As buildx takes it, but no agent's builder makes an SBOM: only --sbom=false is accepted (anything else is
    /// refused, saying so)
    #[arg(long, value_name = "VALUE", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub sbom: Option<String>,
    /// Attestation as buildx takes it (repeatable): type=provenance[,mode=min|max][,version=v0.2|v1][,disabled=true],
    /// or type=sbom,disabled=true
    #[arg(long = "attest", value_name = "SPEC")]
    pub attest: Vec<String>,
}

/// The checked flags, before anything is uploaded.
pub struct Checked {
    contexts: Vec<(String, ContextSource)>,
    no_cache_filter: Vec<String>,
    attestations: buildneeds::Asked,
}

/// Refuses, before the upload, what the coordinator would refuse.
pub fn check(args: &NeedsArgs) -> anyhow::Result<Checked> {
    let attestations = buildneeds::parse_attestations(args.provenance.as_deref(), args.sbom.as_deref(), &args.attest)?;
    if args.build_contexts.len() > limits::BUILD_CONTEXTS {
        anyhow::bail!("--build-context: more than the limit of {}", limits::BUILD_CONTEXTS);
    }
    let mut contexts: Vec<(String, ContextSource)> = Vec::new();
    for raw in &args.build_contexts {
        let (name, source) = buildneeds::parse_build_context(raw)?;
        if contexts.iter().any(|(n, _)| *n == name) {
            anyhow::bail!("--build-context: {name} given twice");
        }
        if let ContextSource::Local(dir) = &source
            && !std::path::Path::new(dir).is_dir()
        {
            anyhow::bail!("--build-context {name}={dir}: not a directory");
        }
        contexts.push((name, source));
    }
    let no_cache_filter: Vec<String> = args.no_cache_filter.iter().filter(|s| !s.is_empty()).cloned().collect();
    buildneeds::check_no_cache_filter(&no_cache_filter)?;
    Ok(Checked { contexts, no_cache_filter, attestations })
}

impl Checked {
    /// Uploads each local directory as its own context (unless the
    /// coordinator has it) and names every context as the spec carries it.
    pub async fn upload(&self, client: &mut Builds, say: &impl Fn(String)) -> anyhow::Result<Vec<proto::NamedContext>> {
        let mut out = Vec::new();
        for (name, source) in &self.contexts {
            let value = match source {
                ContextSource::Image(r) => format!("{}{r}", buildneeds::IMAGE_SCHEME),
                ContextSource::Uploaded(d) => format!("{}{d}", buildneeds::UPLOADED_SCHEME),
                ContextSource::Local(dir) => {
                    let dir = std::path::PathBuf::from(dir);
                    let prepared = tokio::task::spawn_blocking(move || prepare_dir(&dir)).await??;
                    send_named(client, name, &prepared, say).await?
                }
                ContextSource::Remote(url) => {
                    let prepared = crate::source::named_context(name, url, say).await?;
                    send_named(client, name, &prepared, say).await?
                }
            };
            out.push(proto::NamedContext { name: name.clone(), value });
        }
        Ok(out)
    }

    /// The images of `docker-image://` contexts, whose registries' logins
    /// are forwarded like the tags'.
    pub fn image_refs(&self) -> Vec<String> {
        self.contexts
            .iter()
            .filter_map(|(_, s)| match s {
                ContextSource::Image(r) => Some(r.to_string()),
                _ => None,
            })
            .collect()
    }

    /// The spec's provenance fields, buildx's default applied; refused
    /// where the outputs cannot carry attestations.
    pub fn provenance(&self, push: bool, exports: bool, format: &str) -> anyhow::Result<(String, String)> {
        let resolved = self.attestations.resolve(push, exports, format)?;
        Ok(resolved.map(buildneeds::Provenance::to_spec).unwrap_or_default())
    }

    pub fn no_cache_filter(&self) -> Vec<String> {
        self.no_cache_filter.clone()
    }
}

/// Uploads a named context (unless the coordinator has it); its spec value.
async fn send_named(
    client: &mut Builds,
    name: &str,
    prepared: &PreparedContext,
    say: &impl Fn(String),
) -> anyhow::Result<String> {
    let sent = upload::ensure_uploaded(client, prepared, Arc::new(AtomicU64::new(0))).await?;
    say(format!(
        "#1 build context {name}: {} ({} bytes, {} entries, {sent} bytes uploaded)",
        prepared.summary.digest, prepared.summary.size, prepared.summary.entries
    ));
    Ok(format!("{}{}", buildneeds::UPLOADED_SCHEME, prepared.summary.digest))
}

/// A named context directory as a context tar, filtered by its own
/// `.dockerignore` as buildx does.
pub(crate) fn prepare_dir(dir: &std::path::Path) -> anyhow::Result<PreparedContext> {
    let root = dir.canonicalize().with_context(|| format!("reading --build-context {dir:?}"))?;
    let ignore_file = root.join(".dockerignore");
    let ignore = match std::fs::read_to_string(&ignore_file) {
        Ok(text) => DockerIgnore::parse(&text).with_context(|| format!("in {ignore_file:?}"))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => DockerIgnore::default(),
        Err(e) => return Err(e).with_context(|| format!("reading {ignore_file:?}")),
    };
    let mut tar = tempfile::NamedTempFile::new()?;
    let summary = {
        let writer = std::io::BufWriter::new(tar.as_file_mut());
        context::write_tar(&root, &ignore, ContextLimits::default(), writer)?
    };
    Ok(PreparedContext { tar, summary, dockerfile: DockerfileSource::Inline(Vec::new()) })
}

/// The Dockerfile the build will use: inline, or read back from the
/// context tar (so a context from stdin is read too).
pub fn dockerfile_bytes(prepared: &PreparedContext) -> anyhow::Result<Vec<u8>> {
    let rel = match &prepared.dockerfile {
        DockerfileSource::Inline(bytes) => return Ok(bytes.clone()),
        DockerfileSource::InContext(rel) => rel,
    };
    let file = std::fs::File::open(prepared.tar.path())?;
    let mut archive = tar::Archive::new(file);
    for entry in archive.entries()? {
        let entry = entry?;
        let path = entry.path()?.to_string_lossy().trim_start_matches("./").to_owned();
        if path == *rel {
            let mut buf = Vec::new();
            entry.take(limits::DOCKERFILE_BYTES as u64 + 1).read_to_end(&mut buf)?;
            return Ok(buf);
        }
    }
    // Not a regular file in the context (a link, say): the agent reads it
    // and checks again.
    Ok(Vec::new())
}

/// What the build needs (capability names) and its `# syntax=`, from the
/// spec's flags and the Dockerfile.
pub fn of_build(spec: &proto::BuildSpec, dockerfile: &[u8]) -> anyhow::Result<(Vec<String>, String)> {
    let scan = dockerfile::scan(dockerfile)?;
    let needs = buildneeds::from_flags(spec).union(scan.needs);
    Ok((needs.names(), scan.syntax.unwrap_or_default()))
}
