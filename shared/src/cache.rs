//! `--cache-from` / `--cache-to`: buildx's syntax parsed into
//! `proto::CacheOption`s and checked the same way by the CLI (before the
//! upload) and the coordinator (every submitted spec).
//!
//! Each platform's registry cache lives in its own repository derived from
//! the `ref` (`platform_repository`), so a multi-platform cache keeps every
//! platform (buildx's registry cache keeps only the last: docker/buildx#1044).
//! buildah tags the images of its cache with its own cache keys, so the
//! place of a platform is a repository, not a tag.

use crate::capability::Capability;
use crate::{ImageRef, Platform, limits, proto};

/// Which flag an entry came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    From,
    To,
}

impl Direction {
    /// The CLI flag.
    pub fn flag(self) -> &'static str {
        match self {
            Direction::From => "--cache-from",
            Direction::To => "--cache-to",
        }
    }

    /// The `BuildSpec` field.
    pub fn field(self) -> &'static str {
        match self {
            Direction::From => "cache_from",
            Direction::To => "cache_to",
        }
    }
}

/// Why an entry is refused; the message names the flag and the entry.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CacheError(String);

/// The types a user may name, and why each braid cannot do is refused.
fn refused_type(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "gha" => {
            "the GitHub Actions cache needs the runner's cache service (ACTIONS_CACHE_URL and its token), \
             which a remote braid agent cannot reach; use type=registry"
        }
        "local" => {
            "a local cache is a directory on this machine, but the build runs on a remote agent; \
             use type=registry"
        }
        "s3" => {
            "an S3 cache needs BuildKit's s3 cache backend, which no builder braid drives speaks; use type=registry"
        }
        "azblob" => {
            "an Azure Blob Storage cache needs BuildKit's azblob cache backend, which no builder braid drives \
             speaks; use type=registry"
        }
        _ => return None,
    })
}

/// Parses the values of one flag as buildx's `ParseCacheEntry`: a value
/// without `=` is a list of image references, each a registry cache
/// (`user/app` is `type=registry,ref=user/app`); otherwise one entry of
/// `key=value` fields, keys lowercased, `type` required. Empty values are
/// skipped and identical entries kept once, as buildx. Each entry is then
/// checked (`check`).
pub fn parse(
    direction: Direction,
    raw: &[String],
    platforms: &[Platform],
) -> Result<Vec<proto::CacheOption>, CacheError> {
    let flag = direction.flag();
    let mut out: Vec<proto::CacheOption> = Vec::new();
    for value in raw.iter().filter(|v| !v.is_empty()) {
        let shown = || crate::shorten(value, 200);
        if value.len() > limits::CACHE_FLAG_BYTES {
            return Err(CacheError(format!(
                "{flag} {:?}: longer than the limit of {} bytes",
                shown(),
                limits::CACHE_FLAG_BYTES
            )));
        }
        let fields = crate::csv::fields(value).map_err(|e| CacheError(format!("{flag} {:?}: {e}", shown())))?;
        let mut entries = Vec::new();
        if !value.contains('=') {
            for field in fields {
                let attrs = [("ref".to_owned(), field)].into_iter().collect();
                entries.push(proto::CacheOption { r#type: "registry".into(), attrs });
            }
        } else {
            let mut entry = proto::CacheOption::default();
            for field in fields {
                let (key, v) = field
                    .split_once('=')
                    .ok_or_else(|| CacheError(format!("{flag} {:?}: invalid value {field:?}", shown())))?;
                match key.to_ascii_lowercase().as_str() {
                    "type" => entry.r#type = v.to_owned(),
                    key => {
                        entry.attrs.insert(key.to_owned(), v.to_owned());
                    }
                }
            }
            if entry.r#type.is_empty() {
                return Err(CacheError(format!("{flag} {:?}: type required", shown())));
            }
            entries.push(entry);
        }
        for entry in entries {
            if !out.contains(&entry) {
                out.push(entry);
            }
        }
    }
    check(direction, &out, platforms)?;
    Ok(out)
}

/// An entry as a message names it: its type, and for a registry cache its
/// ref and mode; other attributes by key only (a refused type's attributes
/// may hold a token).
pub fn describe(entry: &proto::CacheOption) -> String {
    let mut out = format!("type={}", crate::shorten(&entry.r#type, 40));
    let mut keys: Vec<&String> = entry.attrs.keys().collect();
    keys.sort();
    for key in keys {
        let key_shown = crate::shorten(key, 40);
        if entry.r#type == "registry" && matches!(key.as_str(), "ref" | "mode") {
            out.push_str(&format!(",{key_shown}={}", crate::shorten(&entry.attrs[key], 300)));
        } else {
            out.push_str(&format!(",{key_shown}=..."));
        }
    }
    out
}

/// Checks a flag's entries: bounded in number and size, a type braid can
/// honour on a remote agent, its attributes, a registry cache's ref an
/// image reference whose per-platform repositories (for `platforms`) are
/// valid names.
pub fn check(direction: Direction, entries: &[proto::CacheOption], platforms: &[Platform]) -> Result<(), CacheError> {
    let flag = direction.flag();
    if entries.len() > limits::CACHE_ENTRIES {
        return Err(CacheError(format!("{flag}: more than the limit of {} entries", limits::CACHE_ENTRIES)));
    }
    for entry in entries {
        let refuse = |why: String| CacheError(format!("{flag} {:?}: {why}", describe(entry)));
        if entry.attrs.len() > limits::CACHE_ATTRS {
            return Err(refuse(format!("more than the limit of {} attributes", limits::CACHE_ATTRS)));
        }
        for (k, v) in &entry.attrs {
            if k.is_empty() || k.len() > limits::CACHE_ATTR_KEY_BYTES || v.len() > limits::CACHE_ATTR_VALUE_BYTES {
                return Err(refuse(format!(
                    "an attribute's key is 1 to {} bytes and its value at most {} bytes",
                    limits::CACHE_ATTR_KEY_BYTES,
                    limits::CACHE_ATTR_VALUE_BYTES
                )));
            }
            if k.chars().chain(v.chars()).any(char::is_control) {
                return Err(refuse(format!("attribute {:?} contains a control character", crate::shorten(k, 40))));
            }
        }
        match (entry.r#type.as_str(), direction) {
            ("registry", _) => check_registry(direction, entry, platforms).map_err(refuse)?,
            ("inline", Direction::To) => {
                if let Some(key) = entry.attrs.keys().next() {
                    return Err(refuse(format!("type=inline takes no attributes, got {:?}", crate::shorten(key, 40))));
                }
            }
            ("inline", Direction::From) => {
                return Err(refuse(
                    "type=inline is a --cache-to type: to use an image's inline cache, give --cache-from \
                     type=registry,ref=IMAGE (or just IMAGE)"
                        .into(),
                ));
            }
            (kind, _) => {
                let why = refused_type(kind).map(str::to_owned).unwrap_or_else(|| {
                    format!(
                        "unknown cache type {:?}: braid supports registry (and inline for --cache-to); \
                         gha, local, s3 and azblob cannot work on a remote agent",
                        crate::shorten(kind, 40)
                    )
                });
                return Err(refuse(format!("type={}: {why}", crate::shorten(kind, 40))));
            }
        }
    }
    Ok(())
}

fn check_registry(direction: Direction, entry: &proto::CacheOption, platforms: &[Platform]) -> Result<(), String> {
    for key in entry.attrs.keys() {
        if !matches!(key.as_str(), "ref" | "mode") {
            return Err(format!(
                "attribute {:?} is not supported: the registry cache is written and read by the agent's builder \
                 (buildah's --cache-to/--cache-from take a repository only); braid accepts ref and mode",
                crate::shorten(key, 40)
            ));
        }
    }
    let Some(raw) = entry.attrs.get("ref") else {
        return Err("ref is required (type=registry,ref=REGISTRY/REPOSITORY[:TAG])".into());
    };
    let reference: ImageRef = raw.parse().map_err(|e| format!("ref: {e}"))?;
    if reference.digest().is_some() {
        return Err("ref: a cache ref names a repository (and tag), not a digest".into());
    }
    if let Some(mode) = entry.attrs.get("mode")
        && !matches!(mode.as_str(), "min" | "max")
    {
        let hint = if direction == Direction::From { " (it has no effect on import, as in buildx)" } else { "" };
        return Err(format!("mode {:?}: expected min or max{hint}", crate::shorten(mode, 40)));
    }
    for platform in platforms {
        platform_repository(&reference, platform)?;
    }
    Ok(())
}

/// Where a platform's registry cache lives: the ref's repository with
/// `-TAG` (unless the tag is absent or `latest`) and `-OS-ARCH[-VARIANT]`
/// appended: `reg/cache/app` for linux/arm/v7 is `reg/cache/app-linux-arm-v7`,
/// `reg/app:buildcache` for linux/amd64 is `reg/app-buildcache-linux-amd64`.
/// buildah tags each cached step's image there with its cache key.
pub fn platform_repository(reference: &ImageRef, platform: &Platform) -> Result<ImageRef, String> {
    let mut name = reference.name();
    if let Some(tag) = reference.tag().filter(|t| *t != "latest") {
        name.push('-');
        name.push_str(tag);
    }
    name.push_str(&format!("-{}", platform.to_string().replace('/', "-")));
    name.parse::<ImageRef>().map_err(|e| {
        format!(
            "ref {reference}: braid keeps each platform's cache in its own repository, REPOSITORY[-TAG]-OS-ARCH[-VARIANT], \
             and for {platform} that is no valid name ({e}); use a lowercase tag of letters and digits"
        )
    })
}

/// The per-platform repository of a registry entry, as the agent uses it.
pub fn entry_repository(entry: &proto::CacheOption, platform: &Platform) -> Result<ImageRef, String> {
    let raw = entry.attrs.get("ref").ok_or("a registry cache entry without a ref")?;
    let reference: ImageRef = raw.parse().map_err(|e| format!("{e}"))?;
    platform_repository(&reference, platform)
}

/// The registries a build's cache entries read or write, for credentials.
pub fn registries(spec: &proto::BuildSpec) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for entry in spec.cache_from.iter().chain(&spec.cache_to).filter(|e| e.r#type == "registry") {
        if let Some(r) = entry.attrs.get("ref").and_then(|r| r.parse::<ImageRef>().ok())
            && !out.iter().any(|x| x == r.registry())
        {
            out.push(r.registry().to_owned());
        }
    }
    out
}

/// What a build's cache entries need of an agent's builder.
pub fn needs(spec: &proto::BuildSpec) -> Vec<Capability> {
    let mut out = Vec::new();
    let mut add = |c: Capability| {
        if !out.contains(&c) {
            out.push(c);
        }
    };
    for entry in &spec.cache_from {
        if entry.r#type == "registry" {
            add(Capability::RegistryCacheImport);
        }
    }
    for entry in &spec.cache_to {
        match entry.r#type.as_str() {
            "registry" => add(Capability::RegistryCacheExport),
            "inline" => add(Capability::InlineCacheExport),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn plat(list: &[&str]) -> Vec<Platform> {
        list.iter().map(|p| p.parse().unwrap()).collect()
    }

    fn one(direction: Direction, raw: &str) -> Result<Vec<proto::CacheOption>, CacheError> {
        parse(direction, &[raw.to_owned()], &plat(&["linux/amd64", "linux/arm/v7"]))
    }

    fn pairs(e: &proto::CacheOption) -> Vec<(String, String)> {
        let mut v: Vec<_> = e.attrs.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort();
        v
    }

    #[test]
    fn parses_like_buildx() {
        let e = one(Direction::From, "reg.io/cache/app").unwrap();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].r#type, "registry");
        assert_eq!(pairs(&e[0]), [("ref".to_owned(), "reg.io/cache/app".to_owned())]);
        // A list of refs is one entry each.
        assert_eq!(one(Direction::From, "reg.io/a,reg.io/b:c").unwrap().len(), 2);
        let e = one(Direction::To, "type=registry,REF=reg.io/a:buildcache,mode=max").unwrap();
        assert_eq!(
            pairs(&e[0]),
            [("mode".to_owned(), "max".to_owned()), ("ref".to_owned(), "reg.io/a:buildcache".to_owned())]
        );
        let e = one(Direction::To, "\"type=registry\",\"ref=reg.io/a\"").unwrap();
        assert_eq!(e[0].r#type, "registry");
        assert_eq!(one(Direction::To, "type=inline").unwrap()[0].r#type, "inline");
        // Repeated and identical entries are kept once; empty values skipped.
        let e = parse(
            Direction::From,
            &["reg.io/a".into(), "type=registry,ref=reg.io/a".into(), String::new()],
            &plat(&["linux/amd64"]),
        )
        .unwrap();
        assert_eq!(e.len(), 1);
    }

    #[test]
    fn refuses_by_name() {
        let cases = [
            (Direction::From, "type=gha", "--cache-from \"type=gha\": type=gha: the GitHub Actions cache needs"),
            (Direction::To, "type=gha,token=SECRET", "--cache-to \"type=gha,token=...\": type=gha"),
            (Direction::To, "type=local,dest=/tmp/c", "type=local: a local cache is a directory on this machine"),
            (Direction::From, "type=s3,region=x,bucket=b", "type=s3: an S3 cache needs"),
            (Direction::To, "type=azblob,name=n", "type=azblob: an Azure Blob Storage cache"),
            (Direction::To, "type=floppy", "unknown cache type \"floppy\""),
            (Direction::From, "type=inline", "type=inline is a --cache-to type"),
            (Direction::To, "type=inline,mode=max", "type=inline takes no attributes"),
            (Direction::To, "mode=max", "type required"),
            (Direction::To, "type=registry,novalue", "invalid value \"novalue\""),
            (Direction::To, "type=registry", "ref is required"),
            (Direction::To, "type=registry,ref=Bad/Ref", "ref: invalid image reference"),
            (Direction::To, "type=registry,ref=r.io/a,mode=all", "mode \"all\": expected min or max"),
            (Direction::To, "type=registry,ref=r.io/a,compression=zstd", "attribute \"compression\" is not supported"),
            (Direction::From, "type=registry,ref=r.io/a:Cache", "for linux/amd64 that is no valid name"),
            (Direction::From, "type=registry,ref=r.io/a:c_", "is no valid name"),
            (Direction::From, &format!("r.io/a@sha256:{}", "a".repeat(64)), "not a digest"),
            (Direction::From, "a\"b", "bare \""),
        ];
        for (direction, raw, want) in cases {
            let e = one(direction, raw).unwrap_err().to_string();
            assert!(e.contains(want), "{raw}: {e}");
            assert!(!e.contains("SECRET"), "{e}");
        }
        let many: Vec<String> = (0..17).map(|i| format!("r.io/a{i}")).collect();
        let e = parse(Direction::From, &many, &[]).unwrap_err().to_string();
        assert!(e.contains("--cache-from: more than the limit of 16 entries"), "{e}");
        let long = format!("type=registry,ref=r.io/a,x={}", "v".repeat(5000));
        assert!(one(Direction::To, &long).unwrap_err().to_string().contains("longer than the limit"));
        let big_attr = proto::CacheOption {
            r#type: "registry".into(),
            attrs: [("ref".to_owned(), "r".repeat(2000))].into_iter().collect(),
        };
        assert!(check(Direction::To, &[big_attr], &[]).unwrap_err().to_string().contains("at most 1024 bytes"));
    }

    #[test]
    fn each_platform_has_its_own_repository() {
        let r: ImageRef = "127.0.0.1:5000/cache/app".parse().unwrap();
        let p = |s: &str| platform_repository(&r, &s.parse().unwrap()).unwrap().to_string();
        assert_eq!(p("linux/amd64"), "127.0.0.1:5000/cache/app-linux-amd64");
        assert_eq!(p("linux/arm/v7"), "127.0.0.1:5000/cache/app-linux-arm-v7");
        assert_eq!(p("linux/arm64"), "127.0.0.1:5000/cache/app-linux-arm64");
        let tagged: ImageRef = "ghcr.io/o/app:buildcache".parse().unwrap();
        let got = platform_repository(&tagged, &"linux/amd64".parse().unwrap()).unwrap().to_string();
        assert_eq!(got, "ghcr.io/o/app-buildcache-linux-amd64");
        let latest: ImageRef = "ghcr.io/o/app:latest".parse().unwrap();
        let got = platform_repository(&latest, &"linux/amd64".parse().unwrap()).unwrap().to_string();
        assert_eq!(got, "ghcr.io/o/app-linux-amd64", "app and app:latest are one cache, as in buildx");
    }

    #[test]
    fn needs_and_registries() {
        let spec = proto::BuildSpec {
            cache_from: one(Direction::From, "r1.io/a").unwrap(),
            cache_to: [
                one(Direction::To, "type=registry,ref=r2.io/a").unwrap(),
                one(Direction::To, "type=inline").unwrap(),
            ]
            .concat(),
            ..Default::default()
        };
        assert_eq!(
            needs(&spec),
            [Capability::RegistryCacheImport, Capability::RegistryCacheExport, Capability::InlineCacheExport]
        );
        assert_eq!(registries(&spec), ["r1.io", "r2.io"]);
    }
}
