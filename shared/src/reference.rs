//! Image references in Docker's grammar (distribution/reference), normalized
//! the way `docker` does it: `busybox` is `docker.io/library/busybox:latest`.

use std::fmt;
use std::str::FromStr;

use crate::digest::Digest;

/// A normalized image reference.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ImageRef {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

/// Why an image reference was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid image reference {input:?}: {reason}")]
pub struct ReferenceError {
    input: String,
    reason: &'static str,
}

const DEFAULT_REGISTRY: &str = "docker.io";
const MAX_NAME_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;

impl ImageRef {
    /// The registry host, with its port if any (`docker.io`, `127.0.0.1:5000`).
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository path inside the registry (`library/busybox`).
    pub fn repository(&self) -> &str {
        &self.repository
    }

    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// `registry/repository`, without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The same repository at `digest`, without a tag.
    pub fn at_digest(&self, digest: &Digest) -> ImageRef {
        ImageRef { tag: None, digest: Some(digest.clone()), ..self.clone() }
    }

    /// This reference with `latest` as its tag if it has neither tag nor digest,
    /// as `docker push` reads it.
    pub fn with_default_tag(mut self) -> ImageRef {
        if self.tag.is_none() && self.digest.is_none() {
            self.tag = Some("latest".to_owned());
        }
        self
    }

    /// The reference oci-client wants for registry calls.
    pub fn to_oci(&self) -> oci_client::Reference {
        match (&self.digest, &self.tag) {
            (Some(d), _) => {
                oci_client::Reference::with_digest(self.registry.clone(), self.repository.clone(), d.to_string())
            }
            (None, tag) => oci_client::Reference::with_tag(
                self.registry.clone(),
                self.repository.clone(),
                tag.clone().unwrap_or_else(|| "latest".to_owned()),
            ),
        }
    }
}

fn is_domain_component(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
}

/// A registry host as an image reference names it: `host[:port]` or
/// `[ipv6][:port]`, the port 1 to 65535.
pub fn is_registry_host(s: &str) -> bool {
    is_domain(s)
}

fn is_domain(s: &str) -> bool {
    if let Some(rest) = s.strip_prefix('[') {
        // [IPv6]:port
        let Some((addr, after)) = rest.split_once(']') else {
            return false;
        };
        let port_ok = after.is_empty() || after.strip_prefix(':').is_some_and(is_port);
        return addr.parse::<std::net::Ipv6Addr>().is_ok() && port_ok;
    }
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    };
    port.is_none_or(is_port) && host.split('.').all(is_domain_component)
}

/// A TCP port, 1 to 65535 (distribution's grammar takes any digits; a
/// registry cannot listen on the others).
fn is_port(p: &str) -> bool {
    p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok_and(|n| n != 0)
}

/// `[a-z0-9]+` joined by `.`, `_`, `__` or runs of `-`.
fn is_path_component(s: &str) -> bool {
    let b = s.as_bytes();
    if b.is_empty() || !b[0].is_ascii_alphanumeric() || !b[b.len() - 1].is_ascii_alphanumeric() {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && matches!(b[i], b'.' | b'_' | b'-') {
            i += 1;
        }
        let sep = &s[start..i];
        let ok = matches!(sep, "." | "_" | "__") || sep.bytes().all(|c| c == b'-');
        if sep.is_empty() || !ok {
            return false;
        }
    }
    true
}

fn is_tag(t: &str) -> bool {
    let b = t.as_bytes();
    let word = |c: &u8| c.is_ascii_alphanumeric() || *c == b'_';
    !b.is_empty() && b.len() <= MAX_TAG_LEN && word(&b[0]) && b.iter().all(|c| word(c) || *c == b'.' || *c == b'-')
}

impl FromStr for ImageRef {
    type Err = ReferenceError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason| ReferenceError { input: crate::shorten(input, 300), reason };
        if input.is_empty() {
            return Err(err("empty"));
        }
        if input.len() > MAX_NAME_LEN + MAX_TAG_LEN + 80 {
            return Err(err("too long"));
        }
        let (rest, digest) = match input.split_once('@') {
            Some((name, d)) => {
                (name, Some(d.parse::<Digest>().map_err(|_| err("invalid digest (expected sha256:<64 hex>)"))?))
            }
            None => (input, None),
        };
        let (name, tag) = match rest.rfind(':') {
            Some(i) if !rest[i + 1..].contains('/') => (&rest[..i], Some(&rest[i + 1..])),
            _ => (rest, None),
        };
        if let Some(t) = tag
            && !is_tag(t)
        {
            return Err(err("invalid tag (letters, digits, '_', '.', '-', at most 128, not starting with '.' or '-')"));
        }
        if name.len() == 64 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(err("cannot specify 64-byte hexadecimal strings"));
        }
        let (registry, remote) = match name.split_once('/') {
            Some((first, remainder))
                if first.contains(['.', ':']) || first == "localhost" || first.to_ascii_lowercase() != first =>
            {
                (first.to_owned(), remainder.to_owned())
            }
            _ => (DEFAULT_REGISTRY.to_owned(), name.to_owned()),
        };
        let registry = if registry == "index.docker.io" { DEFAULT_REGISTRY.to_owned() } else { registry };
        if !is_domain(&registry) {
            return Err(err("invalid registry host"));
        }
        let repository =
            if registry == DEFAULT_REGISTRY && !remote.contains('/') { format!("library/{remote}") } else { remote };
        if repository.to_ascii_lowercase() != repository {
            return Err(err("repository name must be lowercase"));
        }
        if !repository.split('/').all(is_path_component) {
            return Err(err(
                "invalid repository name (lowercase letters and digits, separated by '.', '_', '__', '-' or '/')",
            ));
        }
        if registry.len() + 1 + repository.len() > MAX_NAME_LEN {
            return Err(err("repository name longer than 255 characters"));
        }
        Ok(ImageRef { registry, repository, tag: tag.map(str::to_owned), digest })
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(s: &str) -> String {
        s.parse::<ImageRef>().unwrap().to_string()
    }

    #[test]
    fn normalizes_like_docker() {
        assert_eq!(r("busybox"), "docker.io/library/busybox");
        assert_eq!(r("busybox:1.36"), "docker.io/library/busybox:1.36");
        assert_eq!(r("user/app:v1"), "docker.io/user/app:v1");
        assert_eq!(r("index.docker.io/user/app"), "docker.io/user/app");
        assert_eq!(r("localhost/app"), "localhost/app");
        assert_eq!(r("localhost:5000/a/b/c:t"), "localhost:5000/a/b/c:t");
        assert_eq!(r("127.0.0.1:5000/app:1"), "127.0.0.1:5000/app:1");
        assert_eq!(r("ghcr.io/o/app-x_y.z__w:1"), "ghcr.io/o/app-x_y.z__w:1");
        assert_eq!(r("[::1]:5000/app"), "[::1]:5000/app");
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(r(&format!("reg.io/app:1@{d}")), format!("reg.io/app:1@{d}"));
        let parsed: ImageRef = "Registry.Example/app".parse().unwrap();
        assert_eq!(parsed.registry(), "Registry.Example");
        let parsed: ImageRef = "app".parse().unwrap();
        assert_eq!(parsed.with_default_tag().tag(), Some("latest"));
    }

    #[test]
    fn refuses_what_docker_refuses() {
        for (bad, why) in [
            ("", "empty"),
            ("App", "repository name must be lowercase"),
            ("reg.io/App", "repository name must be lowercase"),
            ("app:", "invalid tag"),
            ("app:-x", "invalid tag"),
            ("app@sha256:123", "invalid digest"),
            ("a//b", "invalid repository name"),
            ("app_", "invalid repository name"),
            ("a___b", "invalid repository name"),
            ("-reg.io/app", "invalid registry host"),
            ("reg.io:99x/app", "invalid"),
            ("host:0/app", "invalid registry host"),
            ("host:99999/app", "invalid registry host"),
            ("host:65536/app", "invalid registry host"),
            ("localhost:00000/app", "invalid registry host"),
            ("host:/app", "invalid registry host"),
            ("host:+80/app", "invalid registry host"),
            ("[::1]:0/app", "invalid registry host"),
            ("[::1]:70000/app", "invalid registry host"),
            ("reg..io/app", "invalid registry host"),
            ("reg.io./app", "invalid registry host"),
            ("re_g.io/app", "invalid registry host"),
            ("reg.io/app/", "invalid repository name"),
            ("reg.io/app:t@sha256:xyz", "invalid digest"),
            ("reg.io/app:t:u", "invalid"),
            ("reg.io/a b", "invalid"),
        ] {
            let e = bad.parse::<ImageRef>().unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
            assert!(e.starts_with(&format!("invalid image reference {bad:?}")), "{e}");
        }
        assert!(format!("app:{}", "t".repeat(129)).parse::<ImageRef>().is_err());
        for port in ["1", "80", "5000", "65535", "065535"] {
            let input = format!("host:{port}/app:1");
            assert!(input.parse::<ImageRef>().is_ok(), "{input}");
        }
        assert!("[::1]:65535/app".parse::<ImageRef>().is_ok());
        assert!("a".repeat(64).parse::<ImageRef>().is_err());
    }

    proptest! {
        #[test]
        fn parse_never_panics_and_round_trips(s in "\\PC{0,120}") {
            if let Ok(reference) = s.parse::<ImageRef>() {
                let again: ImageRef = reference.to_string().parse().unwrap();
                prop_assert_eq!(again, reference);
            }
        }

        #[test]
        fn ports_are_one_to_65535(port in 0u64..200_000) {
            let parsed = format!("host:{port}/app").parse::<ImageRef>();
            prop_assert_eq!(parsed.is_ok(), (1..=65535).contains(&port));
        }
    }
}
