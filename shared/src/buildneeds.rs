//! What a build needs of a builder, from its flags (the Dockerfile's part
//! comes from `dockerfile::scan`), and the flags that only this feature
//! reads: `--build-context`, `--no-cache-filter`, and buildx's attestation
//! flags (`--provenance`, `--sbom`, `--attest`), parsed once here. The
//! CLI and the coordinator check them with the same functions.

use crate::buildflags::FlagError;
use crate::capability::{CapSet, Capability};
use crate::{ImageRef, limits, proto};

fn refuse(message: String) -> FlagError {
    FlagError::new(message)
}

/// What the spec's flags need of the builder.
pub fn from_flags(spec: &proto::BuildSpec) -> CapSet {
    let mut needs = CapSet::EMPTY;
    let mut need = |yes: bool, c: Capability| {
        if yes {
            needs.insert(c);
        }
    };
    need(!spec.secrets.is_empty(), Capability::Secrets);
    need(!spec.ssh_ids.is_empty(), Capability::Ssh);
    need(spec.cache_from.iter().any(|c| c.r#type == "registry"), Capability::RegistryCacheImport);
    need(spec.cache_to.iter().any(|c| c.r#type == "registry"), Capability::RegistryCacheExport);
    need(spec.cache_to.iter().any(|c| c.r#type == "inline"), Capability::InlineCacheExport);
    need(!spec.build_contexts.is_empty(), Capability::BuildContexts);
    need(!spec.no_cache_filter.is_empty(), Capability::NoCacheFilter);
    need(spec.network == "none", Capability::NetworkNone);
    need(spec.network == "host", Capability::NetworkHost);
    need(!spec.add_hosts.is_empty(), Capability::AddHosts);
    need(!spec.ulimits.is_empty(), Capability::Ulimits);
    need(spec.shm_size_bytes != 0, Capability::ShmSize);
    needs
}

/// Where a `--build-context` comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContextSource {
    /// `docker-image://REF`.
    Image(ImageRef),
    /// `context://sha256:...`: a directory the CLI uploaded.
    Uploaded(crate::Digest),
    /// A local directory (the CLI's side only: it uploads it).
    Local(String),
    /// A git URL or an `http(s)://` URL (the CLI's side only: it fetches
    /// and uploads it, see `crate::source`).
    Remote(String),
}

/// The scheme of an uploaded named context.
pub const UPLOADED_SCHEME: &str = "context://";
/// The scheme of an image named context.
pub const IMAGE_SCHEME: &str = "docker-image://";

/// A context name as buildx takes it: a stage or image name (letters,
/// digits, `-`, `_`, `.`, `/`, `:`, `@`), at most 128 bytes.
pub fn check_context_name(name: &str) -> Result<(), FlagError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/' | ':' | '@'));
    if ok {
        return Ok(());
    }
    Err(refuse(format!(
        "--build-context {:?}: invalid name: expected letters, digits, '-', '_', '.', '/', ':' or '@', at most 128 bytes",
        crate::shorten(name, 80)
    )))
}

/// `--build-context NAME=VALUE` as the CLI reads it: VALUE is
/// `docker-image://REF` or a local directory (other sources are refused).
pub fn parse_build_context(raw: &str) -> Result<(String, ContextSource), FlagError> {
    let (name, value) = raw
        .split_once('=')
        .ok_or_else(|| refuse(format!("--build-context {:?}: expected NAME=VALUE", crate::shorten(raw, 80))))?;
    check_context_name(name)?;
    Ok((name.to_owned(), source(name, value, true)?))
}

fn source(name: &str, value: &str, local_allowed: bool) -> Result<ContextSource, FlagError> {
    if let Some(image) = value.strip_prefix(IMAGE_SCHEME) {
        let r: ImageRef = image.parse().map_err(|e| refuse(format!("--build-context {name}: {e}")))?;
        return Ok(ContextSource::Image(r));
    }
    if let Some(digest) = value.strip_prefix(UPLOADED_SCHEME) {
        let d = digest.parse().map_err(|e| refuse(format!("--build-context {name}: {e}")))?;
        return Ok(ContextSource::Uploaded(d));
    }
    let remote = match crate::source::classify(value, |d| local_allowed && std::path::Path::new(d).is_dir()) {
        Ok(crate::source::Source::Git(_) | crate::source::Source::Http(_)) => true,
        Err(e) if local_allowed && crate::source::looks_remote(value) => {
            return Err(refuse(format!("--build-context {name}: {e}")));
        }
        _ => false,
    };
    if remote && local_allowed {
        return Ok(ContextSource::Remote(value.to_owned()));
    }
    if remote {
        return Err(refuse(format!(
            "--build-context {name}={}: git and http(s) contexts are fetched by the CLI, not sent",
            crate::shorten(&crate::source::redact(value), 80)
        )));
    }
    if let Some((scheme, _)) = value.split_once("://") {
        return Err(refuse(format!(
            "--build-context {name}={}: {scheme}:// contexts are not supported; give a local directory, a git URL, \
             an http(s):// URL or docker-image://REF",
            crate::shorten(&crate::source::redact(value), 80)
        )));
    }
    if value.is_empty() || value.contains('\0') || value.len() > limits::CONTEXT_PATH_BYTES || !local_allowed {
        return Err(refuse(format!(
            "--build-context {name}={:?}: expected a local directory or docker-image://REF",
            crate::shorten(&crate::source::redact(value), 80)
        )));
    }
    Ok(ContextSource::Local(value.to_owned()))
}

/// The spec's named contexts as the coordinator and the agent take them:
/// bounded, names valid and unique, each an image or an uploaded context.
pub fn check_build_contexts(list: &[proto::NamedContext]) -> Result<Vec<ContextSource>, FlagError> {
    if list.len() > limits::BUILD_CONTEXTS {
        return Err(refuse(format!("--build-context: more than the limit of {}", limits::BUILD_CONTEXTS)));
    }
    let mut out = Vec::new();
    for (i, c) in list.iter().enumerate() {
        check_context_name(&c.name)?;
        if list[..i].iter().any(|o| o.name == c.name) {
            return Err(refuse(format!("--build-context: {} given twice", c.name)));
        }
        out.push(source(&c.name, &c.value, false)?);
    }
    Ok(out)
}

/// `--no-cache-filter STAGE` (repeatable; buildx also splits at commas).
pub fn check_no_cache_filter(stages: &[String]) -> Result<(), FlagError> {
    if stages.len() > limits::NO_CACHE_FILTER {
        return Err(refuse(format!("--no-cache-filter: more than the limit of {}", limits::NO_CACHE_FILTER)));
    }
    for s in stages {
        let ok = s.len() <= 128
            && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !ok {
            return Err(refuse(format!("--no-cache-filter {:?}: invalid stage name", crate::shorten(s, 80))));
        }
    }
    Ok(())
}

/// Go's strconv.ParseBool, which buildx reads these flags with.
fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// How much a provenance statement records (buildx's `mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProvenanceMode {
    /// The builder, the sources and the platform; no build args.
    Min,
    /// Also the build args, target and labels.
    Max,
}

/// The SLSA predicate version (buildx's `version`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlsaVersion {
    V02,
    V1,
}

/// Provenance a build makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Provenance {
    pub mode: ProvenanceMode,
    pub version: SlsaVersion,
}

impl Provenance {
    /// buildx's default: `mode=min`, version v0.2.
    pub const DEFAULT: Provenance = Provenance { mode: ProvenanceMode::Min, version: SlsaVersion::V02 };

    /// The spec's fields.
    pub fn to_spec(self) -> (String, String) {
        let mode = match self.mode {
            ProvenanceMode::Min => "min",
            ProvenanceMode::Max => "max",
        };
        let version = match self.version {
            SlsaVersion::V02 => "v0.2",
            SlsaVersion::V1 => "v1",
        };
        (mode.to_owned(), version.to_owned())
    }

    /// The spec's fields read back (None: no provenance); `validate_spec`
    /// refuses what this cannot read.
    pub fn of_spec(spec: &proto::BuildSpec) -> Option<Provenance> {
        let mode = match spec.provenance_mode.as_str() {
            "min" => ProvenanceMode::Min,
            "max" => ProvenanceMode::Max,
            _ => return None,
        };
        let version = match spec.provenance_version.as_str() {
            "v1" => SlsaVersion::V1,
            _ => SlsaVersion::V02,
        };
        Some(Provenance { mode, version })
    }
}

/// What the attestation flags asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Asked {
    /// Nothing said: buildx's default applies.
    Default,
    /// Turned off (`--provenance=false`, `disabled=true`).
    Off,
    /// Asked for, by this flag (as given, for messages).
    On(Provenance, String),
}

/// `--provenance`, `--sbom` and `--attest` as buildx spells them, parsed
/// once: the CLI resolves the result, the coordinator checks the spec.
pub fn parse_attestations(provenance: Option<&str>, sbom: Option<&str>, attest: &[String]) -> Result<Asked, FlagError> {
    if let Some(v) = sbom {
        check_sbom("--sbom", v)?;
    }
    let mut asked = None;
    if let Some(v) = provenance {
        let flag = format!("--provenance={}", crate::shorten(v, 80));
        let got = match parse_bool(v) {
            Some(true) => Asked::On(Provenance::DEFAULT, flag),
            Some(false) => Asked::Off,
            None => provenance_attrs(&flag, v.split(','))?,
        };
        asked = Some(got);
    }
    for a in attest {
        let flag = format!("--attest {}", crate::shorten(a, 80));
        let mut kind = None;
        let rest: Vec<&str> = a
            .split(',')
            .filter(|f| match f.split_once('=') {
                Some(("type", t)) => {
                    kind = Some(t);
                    false
                }
                _ => true,
            })
            .collect();
        match kind {
            Some("provenance") => {
                if asked.is_some() {
                    return Err(refuse(format!("{flag}: provenance is already set by an earlier flag")));
                }
                asked = Some(provenance_attrs(&flag, rest.into_iter())?);
            }
            Some("sbom") => check_sbom(&flag, &rest.join(","))?,
            _ => return Err(refuse(format!("{flag}: expected type=provenance or type=sbom"))),
        }
    }
    Ok(asked.unwrap_or(Asked::Default))
}

/// `mode=`, `version=`, `disabled=` of a provenance attestation.
fn provenance_attrs<'a>(flag: &str, fields: impl Iterator<Item = &'a str>) -> Result<Asked, FlagError> {
    let mut p = Provenance::DEFAULT;
    for field in fields.filter(|f| !f.is_empty()) {
        match field.split_once('=') {
            Some(("mode", "min")) => p.mode = ProvenanceMode::Min,
            Some(("mode", "max")) => p.mode = ProvenanceMode::Max,
            Some(("version", "v0.2")) => p.version = SlsaVersion::V02,
            Some(("version", "v1")) => p.version = SlsaVersion::V1,
            Some(("disabled", d)) => match parse_bool(d) {
                Some(true) => return Ok(Asked::Off),
                Some(false) => {}
                None => return Err(refuse(format!("{flag}: disabled={d:?}: expected true or false"))),
            },
            Some((key @ ("mode" | "version"), value)) => {
                let want = if key == "mode" { "min or max" } else { "v0.2 or v1" };
                return Err(refuse(format!("{flag}: {key}={:?}: expected {want}", crate::shorten(value, 40))));
            }
            _ => {
                return Err(refuse(format!(
                    "{flag}: {:?} is not supported (mode=min|max, version=v0.2|v1, disabled=true)",
                    crate::shorten(field, 40)
                )));
            }
        }
    }
    Ok(Asked::On(p, flag.to_owned()))
}

/// An SBOM is refused unless off: no agent's builder can make one.
fn check_sbom(flag: &str, value: &str) -> Result<(), FlagError> {
    let off = parse_bool(value) == Some(false)
        || value
            .split(',')
            .any(|f| f.split_once('=').is_some_and(|(k, v)| k == "disabled" && parse_bool(v) == Some(true)));
    if off {
        return Ok(());
    }
    let shown = if flag == "--sbom" { format!("--sbom={}", crate::shorten(value, 80)) } else { flag.to_owned() };
    Err(refuse(format!(
        "{shown}: no SBOM generator on the agents (buildah, podman and the Docker Engine builders make none); drop it \
         or pass --sbom=false"
    )))
}

impl Asked {
    /// The provenance a build makes: buildx's default is `mode=min` when
    /// pushing and none for `--load`/exports; `--format docker` cannot
    /// carry attestations, so its default is none and asking is refused.
    /// A build that both pushes and exports makes none by default (the
    /// exported index would lack what the pushed one lists).
    pub fn resolve(&self, push: bool, exports: bool, format: &str) -> Result<Option<Provenance>, FlagError> {
        let docker = format == "docker";
        match self {
            Asked::Off => Ok(None),
            Asked::Default => Ok((push && !exports && !docker).then_some(Provenance::DEFAULT)),
            Asked::On(p, flag) => {
                if docker {
                    return Err(refuse(format!(
                        "{flag} with --format docker: Docker manifest lists cannot carry attestations (use --format \
                         oci, or --provenance=false)"
                    )));
                }
                if !push {
                    return Err(refuse(format!(
                        "{flag} needs --push: attestations are attached to the index in the registry, and an \
                         exported or loaded image carries none"
                    )));
                }
                if exports {
                    return Err(refuse(format!(
                        "{flag} with --load or --output type=oci|docker: attestations go only to the registry's \
                         index; push and export in two builds, or pass --provenance=false"
                    )));
                }
                Ok(Some(*p))
            }
        }
    }
}

/// The coordinator's check of the spec's provenance fields: known values,
/// and only where the index can carry attestations.
pub fn check_provenance_spec(spec: &proto::BuildSpec) -> Result<(), FlagError> {
    if !matches!(spec.provenance_mode.as_str(), "" | "min" | "max") {
        return Err(refuse(format!(
            "--provenance mode={:?}: expected min or max",
            crate::shorten(&spec.provenance_mode, 40)
        )));
    }
    if !matches!(spec.provenance_version.as_str(), "" | "v0.2" | "v1") {
        return Err(refuse(format!(
            "--provenance version={:?}: expected v0.2 or v1",
            crate::shorten(&spec.provenance_version, 40)
        )));
    }
    match Provenance::of_spec(spec) {
        None if !spec.provenance_version.is_empty() => {
            Err(refuse("--provenance: a version without a mode (provenance_version without provenance_mode)".into()))
        }
        None => Ok(()),
        Some(p) => {
            let asked = Asked::On(p, format!("--provenance=mode={}", spec.provenance_mode));
            asked.resolve(spec.push, spec.export, &spec.format).map(drop)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn flags_say_what_they_need() {
        let spec = proto::BuildSpec {
            secrets: vec![proto::SecretRef { id: "a".into(), provided: true }],
            cache_from: vec![proto::CacheOption { r#type: "registry".into(), ..Default::default() }],
            cache_to: vec![proto::CacheOption { r#type: "inline".into(), ..Default::default() }],
            network: "host".into(),
            ulimits: vec![proto::Ulimit { name: "nofile".into(), soft: 1, hard: 1 }],
            no_cache_filter: vec!["build".into()],
            ..Default::default()
        };
        assert_eq!(
            from_flags(&spec).names(),
            ["secrets", "registry-cache-import", "inline-cache-export", "no-cache-filter", "network-host", "ulimits"]
        );
        assert!(from_flags(&proto::BuildSpec::default()).is_empty());
    }

    #[test]
    fn build_contexts_parse_like_buildx() {
        let (name, src) = parse_build_context("base=docker-image://alpine:3.18").unwrap();
        assert_eq!(name, "base");
        assert!(matches!(src, ContextSource::Image(_)));
        assert_eq!(parse_build_context("src=./lib").unwrap().1, ContextSource::Local("./lib".into()));
        assert_eq!(parse_build_context("a=b=c").unwrap().1, ContextSource::Local("b=c".into()));
        for remote in ["https://github.com/a/b.git#main", "git@h:o/r.git", "https://h/ctx.tar.gz", "git://h/r"] {
            let value = format!("x={remote}");
            assert_eq!(parse_build_context(&value).unwrap().1, ContextSource::Remote(remote.into()));
        }
        // The coordinator and the agent never take one: the CLI sends it as an upload.
        let e = check_build_contexts(&[proto::NamedContext { name: "x".into(), value: "https://u:pw@h/r.git".into() }])
            .unwrap_err()
            .to_string();
        assert!(e.contains("fetched by the CLI") && !e.contains("pw"), "{e}");
        for (bad, want) in [
            ("noequals", "expected NAME=VALUE"),
            ("-x=dir", "invalid name"),
            ("x=", "expected a local directory"),
            ("x=ftp://u:hidden@h/a/b.git", "ftp:// contexts are not supported"),
            ("x=https://h/r.git?tag=a&branch=b", "branch conflicts with tag"),
            ("x=oci-layout:///tmp/l", "oci-layout:// contexts are not supported"),
            ("x=docker-image://Bad", "invalid image reference"),
        ] {
            let e = parse_build_context(bad).unwrap_err().to_string();
            assert!(e.starts_with("--build-context") && e.contains(want), "{bad}: {e}");
        }
        let named = |n: &str, v: &str| proto::NamedContext { name: n.into(), value: v.into() };
        let digest = format!("context://sha256:{}", "a".repeat(64));
        assert!(check_build_contexts(&[named("a", &digest), named("b", "docker-image://alpine")]).is_ok());
        let e = check_build_contexts(&[named("a", "./dir")]).unwrap_err().to_string();
        assert!(e.contains("expected a local directory or docker-image://REF"), "{e}");
        let e = check_build_contexts(&[named("a", &digest), named("a", &digest)]).unwrap_err().to_string();
        assert!(e.contains("a given twice"), "{e}");
        let many: Vec<_> = (0..17).map(|i| named(&format!("c{i}"), &digest)).collect();
        assert!(check_build_contexts(&many).unwrap_err().to_string().contains("more than the limit of 16"));
    }

    #[test]
    fn attestation_flags_parse_like_buildx() {
        let p = |v: Option<&str>, a: &[&str]| {
            parse_attestations(v, None, &a.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        };
        let on = |mode, version| Provenance { mode, version };
        assert_eq!(p(None, &[]).unwrap(), Asked::Default);
        for off in ["false", "0", "False"] {
            assert_eq!(p(Some(off), &[]).unwrap(), Asked::Off);
            assert!(parse_attestations(None, Some(off), &[]).is_ok());
        }
        assert!(matches!(p(Some("true"), &[]).unwrap(), Asked::On(x, _) if x == Provenance::DEFAULT));
        assert!(matches!(p(Some("mode=max"), &[]).unwrap(),
            Asked::On(x, _) if x == on(ProvenanceMode::Max, SlsaVersion::V02)));
        assert!(matches!(p(Some("mode=min,version=v1"), &[]).unwrap(),
            Asked::On(x, _) if x == on(ProvenanceMode::Min, SlsaVersion::V1)));
        assert!(matches!(p(None, &["type=provenance,mode=max,version=v1"]).unwrap(),
            Asked::On(x, f) if x == on(ProvenanceMode::Max, SlsaVersion::V1) && f.starts_with("--attest")));
        assert_eq!(p(None, &["type=provenance,disabled=true"]).unwrap(), Asked::Off);
        assert_eq!(p(None, &["type=sbom,disabled=true"]).unwrap(), Asked::Default);
        for (v, a, want) in [
            (Some("mode=full"), vec![], "--provenance=mode=full: mode=\"full\": expected min or max"),
            (Some("version=v2"), vec![], "expected v0.2 or v1"),
            (Some("builder-id=x"), vec![], "\"builder-id=x\" is not supported"),
            (Some("true"), vec!["type=provenance"], "already set by an earlier flag"),
            (None, vec!["type=vex"], "expected type=provenance or type=sbom"),
            (None, vec!["type=sbom"], "--attest type=sbom: no SBOM generator on the agents"),
            (None, vec!["type=sbom,generator=docker/scout"], "no SBOM generator"),
        ] {
            let e = p(v, &a).unwrap_err().to_string();
            assert!(e.contains(want), "{v:?} {a:?}: {e}");
        }
        for sbom in ["true", "generator=x"] {
            let e = parse_attestations(None, Some(sbom), &[]).unwrap_err().to_string();
            assert!(e.starts_with(&format!("--sbom={sbom}: no SBOM generator on the agents")), "{e}");
        }
    }

    #[test]
    fn provenance_defaults_like_buildx_and_refuses_where_it_cannot_go() {
        assert_eq!(Asked::Default.resolve(true, false, "oci").unwrap(), Some(Provenance::DEFAULT));
        assert_eq!(Asked::Default.resolve(false, true, "oci").unwrap(), None, "--load and exports: none");
        assert_eq!(Asked::Default.resolve(true, true, "oci").unwrap(), None, "push and export: none");
        assert_eq!(Asked::Default.resolve(true, false, "docker").unwrap(), None, "--format docker: none");
        assert_eq!(Asked::Off.resolve(true, false, "oci").unwrap(), None);
        let asked = parse_attestations(Some("true"), None, &[]).unwrap();
        let e = asked.resolve(true, false, "docker").unwrap_err().to_string();
        assert!(e.contains("--provenance=true with --format docker"), "{e}");
        assert!(asked.resolve(false, true, "oci").unwrap_err().to_string().contains("needs --push"));
        assert!(asked.resolve(true, true, "oci").unwrap_err().to_string().contains("with --load or --output"));
        let mut spec = proto::BuildSpec { push: true, ..Default::default() };
        assert!(check_provenance_spec(&spec).is_ok());
        (spec.provenance_mode, spec.provenance_version) = Provenance::DEFAULT.to_spec();
        assert!(check_provenance_spec(&spec).is_ok());
        assert_eq!(Provenance::of_spec(&spec), Some(Provenance::DEFAULT));
        spec.format = "docker".into();
        assert!(check_provenance_spec(&spec).unwrap_err().to_string().contains("--format docker"));
        spec.format = String::new();
        spec.provenance_version = "v9".into();
        assert!(check_provenance_spec(&spec).unwrap_err().to_string().contains("expected v0.2 or v1"));
        spec.provenance_mode = String::new();
        spec.provenance_version = "v1".into();
        assert!(check_provenance_spec(&spec).is_err());
    }

    #[test]
    fn no_cache_filter_names_stages() {
        assert!(check_no_cache_filter(&["build".into(), "test-1".into()]).is_ok());
        assert!(check_no_cache_filter(&["a b".into()]).unwrap_err().to_string().contains("invalid stage name"));
        let many = vec!["s".to_owned(); 65];
        assert!(check_no_cache_filter(&many).is_err());
    }
}
