//! What a build needs of a builder, from its flags (the Dockerfile's part
//! comes from `dockerfile::scan`), and the flags that only this feature
//! reads: `--build-context`, `--no-cache-filter`, and buildx's attestation
//! flags (`--provenance`, `--sbom`, `--attest`). The CLI and the
//! coordinator check them with the same functions.

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

fn not_produced(flag: &str, given: &str, off: &str) -> FlagError {
    refuse(format!(
        "attestations are not produced yet: {flag}{given} asks for one (drop it or pass {off})",
        given = if given.is_empty() { String::new() } else { format!("={}", crate::shorten(given, 80)) }
    ))
}

/// `--provenance[=VALUE]` (`--provenance` alone is `true`, as in buildx):
/// only a false value is accepted, and it changes nothing.
pub fn check_provenance(value: &str) -> Result<(), FlagError> {
    match parse_bool(value) {
        Some(false) => Ok(()),
        _ => Err(not_produced("--provenance", value, "--provenance=false")),
    }
}

/// `--sbom[=VALUE]`, as `--provenance`.
pub fn check_sbom(value: &str) -> Result<(), FlagError> {
    match parse_bool(value) {
        Some(false) => Ok(()),
        _ => Err(not_produced("--sbom", value, "--sbom=false")),
    }
}

/// `--attest type=provenance|sbom[,disabled=true][,...]`: only a
/// disabled attestation is accepted.
pub fn check_attest(value: &str) -> Result<(), FlagError> {
    let mut kind = "";
    let mut disabled = false;
    for field in value.split(',') {
        match field.split_once('=') {
            Some(("type", t)) => kind = t,
            Some(("disabled", d)) => disabled = parse_bool(d) == Some(true),
            _ => {}
        }
    }
    if !matches!(kind, "provenance" | "sbom") {
        return Err(refuse(format!("--attest {:?}: expected type=provenance or type=sbom", crate::shorten(value, 80))));
    }
    if disabled {
        return Ok(());
    }
    Err(refuse(format!(
        "attestations are not produced yet: --attest {} asks for one (drop it or pass --attest type={kind},disabled=true)",
        crate::shorten(value, 80)
    )))
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
    fn attestations_are_refused_unless_off() {
        for off in ["false", "0", "False"] {
            assert!(check_provenance(off).is_ok() && check_sbom(off).is_ok());
        }
        for on in ["true", "mode=max", "1", "builder-id=x"] {
            let e = check_provenance(on).unwrap_err().to_string();
            assert!(e.starts_with("attestations are not produced yet: --provenance"), "{e}");
            assert!(e.contains("pass --provenance=false"), "{e}");
            assert!(check_sbom(on).unwrap_err().to_string().contains("--sbom=false"));
        }
        assert!(check_attest("type=provenance,disabled=true").is_ok());
        assert!(check_attest("type=sbom,disabled=true").is_ok());
        let e = check_attest("type=sbom").unwrap_err().to_string();
        assert!(e.contains("--attest type=sbom asks for one") && e.contains("type=sbom,disabled=true"), "{e}");
        assert!(check_attest("type=provenance,mode=max").is_err());
        assert!(check_attest("type=vex").unwrap_err().to_string().contains("expected type=provenance or type=sbom"));
    }

    #[test]
    fn no_cache_filter_names_stages() {
        assert!(check_no_cache_filter(&["build".into(), "test-1".into()]).is_ok());
        assert!(check_no_cache_filter(&["a b".into()]).unwrap_err().to_string().contains("invalid stage name"));
        let many = vec!["s".to_owned(); 65];
        assert!(check_no_cache_filter(&many).is_err());
    }
}
