//! Where a build context comes from, classified as `docker buildx build`
//! does: `-` (stdin), a git URL (`https://host/repo.git#REF:SUBDIR`,
//! `git@host:repo.git`, `ssh://`, `git://`, `github.com/org/repo`, with
//! BuildKit's `?ref=`/`?tag=`/`?branch=`/`?subdir=`/`?checksum=`/
//! `?keep-git-dir=`/`?submodules=` query form), an `http(s)://` URL of a
//! tarball or a Dockerfile, or a local directory. Pure parsing: fetching is
//! the CLI's. Credentials in a URL are kept apart from it, so what is shown
//! (messages, annotations, the stored spec) never carries them.

use std::fmt;

mod sniff;
pub use sniff::{SNIFF_BYTES, Sniffed, sniff};

/// What a context argument names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `-`: a tar or a Dockerfile on stdin.
    Stdin,
    /// A local directory.
    Local(String),
    /// A git repository.
    Git(GitSource),
    /// An `http(s)://` URL that is not a git repository: a tarball or a Dockerfile.
    Http(HttpSource),
}

/// A user name and password from a URL's userinfo; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
    /// The userinfo as typed (still percent-encoded), to scrub from messages.
    pub raw: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Credentials(<redacted>)")
    }
}

/// A git context, parsed as BuildKit's `ParseGitRef`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitSource {
    /// The remote as git is given it: no fragment, query or credentials.
    pub remote: String,
    /// From `https://USER:PASSWORD@...`: handed to git by a credential helper.
    pub credentials: Option<Credentials>,
    /// Branch, tag, commit or any ref (`refs/pull/1/head`); empty: the remote's HEAD.
    pub git_ref: String,
    /// The context's directory inside the repository; empty: its root.
    pub subdir: String,
    /// `?checksum=`/`?commit=`: the commit the ref must resolve to (a prefix of its id).
    pub checksum: String,
    /// `?keep-git-dir=`: send the `.git` directory with the context.
    pub keep_git_dir: Option<bool>,
    /// `?submodules=`: fetch submodules (the default).
    pub submodules: Option<bool>,
}

/// An `http(s)://` context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpSource {
    /// The URL to fetch: no fragment, no credentials (sent as basic auth).
    pub url: String,
    /// The URL without credentials, for messages.
    pub shown: String,
    pub credentials: Option<Credentials>,
}

/// A context argument that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct SourceError(String);

fn bad(what: &str, why: impl fmt::Display) -> SourceError {
    SourceError(format!("context {}: {why}", crate::shorten(&redact(what), 200)))
}

/// Longest context argument taken.
pub const SOURCE_BYTES: usize = 4096;

/// Classifies a context argument. `is_dir` says whether a local directory
/// of that name exists: `github.com/org/repo` and `user@host:path` are local
/// when it does (buildx's deprecated forms that look like paths).
pub fn classify(arg: &str, is_dir: impl Fn(&str) -> bool) -> Result<Source, SourceError> {
    if arg == "-" {
        return Ok(Source::Stdin);
    }
    if arg.len() > SOURCE_BYTES {
        return Err(bad(arg, format!("longer than {SOURCE_BYTES} bytes")));
    }
    if arg.starts_with("./") || arg.starts_with("../") || arg.starts_with('/') {
        return Ok(Source::Local(arg.to_owned()));
    }
    if let Some((scheme, rest)) = scheme_of(arg) {
        let url = UrlParts::parse(arg, &scheme, rest)?;
        return match scheme.as_str() {
            "http" | "https" if url.path.ends_with(".git") => Ok(Source::Git(url.into_git(arg)?)),
            "http" | "https" => {
                let shown = url.shown();
                let fetched = url.without_fragment();
                Ok(Source::Http(HttpSource { url: fetched, shown, credentials: url.credentials }))
            }
            "ssh" | "git" => Ok(Source::Git(url.into_git(arg)?)),
            other => Err(bad(
                arg,
                format!("{other}:// is not a context: give a directory, -, a git URL or an http(s):// URL"),
            )),
        };
    }
    if is_dir(arg) {
        return Ok(Source::Local(arg.to_owned()));
    }
    if let Some(path) = arg.strip_prefix("github.com/") {
        let https = format!("https://github.com/{path}");
        let url = UrlParts::parse(&https, "https", &https["https://".len()..])?;
        return Ok(Source::Git(url.into_git(arg)?));
    }
    if let Some(git) = scp_like(arg)? {
        return Ok(Source::Git(git));
    }
    Ok(Source::Local(arg.to_owned()))
}

/// Whether `arg` is written as a git or http(s) source (its scheme, or
/// buildx's `github.com/` and `user@host:` forms), valid or not: what is
/// wrong with it is then `classify`'s error, not "not a directory".
pub fn looks_remote(arg: &str) -> bool {
    match scheme_of(arg) {
        Some((scheme, _)) => matches!(scheme.as_str(), "http" | "https" | "ssh" | "git"),
        None => arg.starts_with("github.com/") || matches!(scp_like(arg), Ok(Some(_)) | Err(_)),
    }
}

/// `scheme://` at the start (RFC 3986's characters, so `docker-image://` is
/// refused by name rather than taken for a path), lowercased.
fn scheme_of(arg: &str) -> Option<(String, &str)> {
    let (scheme, rest) = arg.split_once("://")?;
    (!scheme.is_empty() && scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)))
        .then(|| (scheme.to_ascii_lowercase(), rest))
}

/// A URL taken apart: `scheme://[userinfo@]host[:port]/path[?query][#fragment]`.
#[derive(Debug)]
struct UrlParts {
    scheme: String,
    credentials: Option<Credentials>,
    /// `host[:port]`, IPv6 hosts in brackets.
    hostport: String,
    path: String,
    query: Option<String>,
    fragment: Option<String>,
}

impl UrlParts {
    fn parse(arg: &str, scheme: &str, rest: &str) -> Result<Self, SourceError> {
        let (rest, fragment) = match rest.split_once('#') {
            Some((r, f)) => (r, Some(f.to_owned())),
            None => (rest, None),
        };
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q.to_owned())),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        check_hostport(arg, hostport)?;
        if arg.chars().any(|c| c.is_control() || c == ' ') {
            return Err(bad(arg, "has spaces or control characters"));
        }
        let credentials = match userinfo {
            None => None,
            Some(raw) => {
                let (u, p) = raw.split_once(':').unwrap_or((raw, ""));
                let user = percent_decode(u).ok_or_else(|| bad(arg, "bad percent-encoding in the user name"))?;
                let password = percent_decode(p).ok_or_else(|| bad(arg, "bad percent-encoding in the password"))?;
                Some(Credentials { username: user, password, raw: raw.to_owned() })
            }
        };
        Ok(UrlParts {
            scheme: scheme.to_owned(),
            credentials,
            hostport: hostport.to_owned(),
            path: path.to_owned(),
            query,
            fragment,
        })
    }

    fn base(&self) -> String {
        format!("{}://{}{}", self.scheme, self.hostport, self.path)
    }

    /// The URL without credentials (but with query and fragment), to show.
    fn shown(&self) -> String {
        let mut s = self.base();
        if let Some(q) = &self.query {
            s.push('?');
            s.push_str(q);
        }
        if let Some(f) = &self.fragment {
            s.push('#');
            s.push_str(f);
        }
        s
    }

    /// What an HTTP client fetches: the query kept, no fragment, no credentials.
    fn without_fragment(&self) -> String {
        let query = self.query.as_ref().map(|q| format!("?{q}")).unwrap_or_default();
        format!("{}{query}", self.base())
    }

    fn into_git(self, arg: &str) -> Result<GitSource, SourceError> {
        if self.path.is_empty() || self.path == "/" {
            return Err(bad(arg, "a git URL needs a repository path"));
        }
        // ssh needs its user; http(s) credentials go to git by a helper; git:// has none.
        let remote = match (&self.scheme[..], &self.credentials) {
            ("ssh", Some(c)) => {
                let user = c.raw.split(':').next().unwrap_or("");
                if user.starts_with('-') {
                    return Err(bad(arg, "invalid user name"));
                }
                format!("ssh://{user}@{}{}", self.hostport, self.path)
            }
            _ => self.base(),
        };
        let credentials = match &self.scheme[..] {
            "http" | "https" => self.credentials,
            _ => None,
        };
        let mut git = GitSource {
            remote,
            credentials,
            git_ref: String::new(),
            subdir: String::new(),
            checksum: String::new(),
            keep_git_dir: None,
            submodules: None,
        };
        apply_fragment(&mut git, self.fragment.as_deref());
        if let Some(q) = &self.query {
            apply_query(&mut git, q).map_err(|e| bad(arg, e))?;
        }
        check_git(arg, &git)?;
        Ok(git)
    }
}

/// `host[:port]`, `[v6]` or `[v6]:port`.
fn check_hostport(arg: &str, hostport: &str) -> Result<(), SourceError> {
    let (host, port) = if let Some(rest) = hostport.strip_prefix('[') {
        let (v6, after) = rest.split_once(']').ok_or_else(|| bad(arg, "unclosed '[' in the host"))?;
        if v6.is_empty() || !v6.chars().all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.' || c == '%') {
            return Err(bad(arg, "invalid IPv6 host"));
        }
        match after {
            "" => (v6, None),
            p => (v6, Some(p.strip_prefix(':').ok_or_else(|| bad(arg, "invalid text after the IPv6 host"))?)),
        }
    } else {
        match hostport.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    if host.is_empty() {
        return Err(bad(arg, "no host"));
    }
    if host.starts_with('-') || !host.chars().all(|c| c.is_ascii_alphanumeric() || "-._:%[]".contains(c)) {
        return Err(bad(arg, "invalid host"));
    }
    if let Some(p) = port
        && !p.is_empty()
        && p.parse::<u16>().is_err()
    {
        return Err(bad(arg, "invalid port"));
    }
    Ok(())
}

/// `#REF:SUBDIR`, either part may be empty.
fn apply_fragment(git: &mut GitSource, fragment: Option<&str>) {
    if let Some(f) = fragment {
        let (r, s) = f.split_once(':').unwrap_or((f, ""));
        git.git_ref = r.to_owned();
        git.subdir = s.to_owned();
    }
}

/// BuildKit's query form, with its rules: one value per key, `tag=` and
/// `branch=` become `refs/tags/`/`refs/heads/` refs, a conflict with the
/// fragment is refused, unknown keys too.
fn apply_query(git: &mut GitSource, query: &str) -> Result<(), String> {
    let mut seen: Vec<String> = Vec::new();
    let (mut tag, mut branch) = (String::new(), String::new());
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').map_or((pair, None), |(k, v)| (k, Some(v)));
        let k = percent_decode(k).ok_or("bad percent-encoding in the query")?;
        let v =
            v.map(|v| percent_decode(&v.replace('+', " ")).ok_or("bad percent-encoding in the query")).transpose()?;
        if seen.contains(&k) {
            return Err(format!("query {k:?} has multiple values"));
        }
        seen.push(k.clone());
        let v = match v.filter(|v| !v.is_empty()) {
            Some(v) => Some(v),
            None if k == "submodules" || k == "keep-git-dir" => None,
            None => return Err(format!("query {k:?} has no value")),
        };
        let flag = |v: Option<String>| match v.as_deref() {
            None => Ok(true),
            Some(s) => parse_bool(s).ok_or_else(|| format!("invalid {k} value: {s:?}")),
        };
        match k.as_str() {
            "ref" => {
                let v = v.unwrap_or_default();
                if !git.git_ref.is_empty() && git.git_ref != v {
                    return Err(format!("ref conflicts: {:?} vs {v:?}", git.git_ref));
                }
                git.git_ref = v;
            }
            "tag" => tag = v.unwrap_or_default(),
            "branch" => branch = v.unwrap_or_default(),
            "subdir" => {
                let v = v.unwrap_or_default();
                if !git.subdir.is_empty() && git.subdir != v {
                    return Err(format!("subdir conflicts: {:?} vs {v:?}", git.subdir));
                }
                git.subdir = v;
            }
            "checksum" | "commit" => git.checksum = v.unwrap_or_default(),
            "keep-git-dir" => git.keep_git_dir = Some(flag(v)?),
            "submodules" => git.submodules = Some(flag(v)?),
            other => {
                return Err(format!(
                    "unexpected query {other:?} (known: ref, tag, branch, subdir, checksum, commit, keep-git-dir, submodules)"
                ));
            }
        }
    }
    for (value, prefix) in [(tag.clone(), "refs/tags/"), (branch.clone(), "refs/heads/")] {
        if value.is_empty() {
            continue;
        }
        if prefix == "refs/heads/" && !tag.is_empty() {
            return Err("branch conflicts with tag".into());
        }
        let full = if value.starts_with(prefix) { value } else { format!("{prefix}{value}") };
        if !git.git_ref.is_empty() && git.git_ref != full {
            return Err(format!("ref conflicts: {:?} vs {full:?}", git.git_ref));
        }
        git.git_ref = full;
    }
    if !git.checksum.is_empty() && git.git_ref.is_empty() {
        git.git_ref = git.checksum.clone();
    }
    Ok(())
}

/// Go's `strconv.ParseBool`.
fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// Refs, subdirectories and checksums that git and the context can take:
/// nothing git would read as an option, no way out of the checkout.
fn check_git(arg: &str, git: &GitSource) -> Result<(), SourceError> {
    let r = &git.git_ref;
    if r.starts_with('-')
        || r.contains("..")
        || r.len() > 1024
        || r.chars().any(|c| c.is_control() || " ~^:?*[\\".contains(c))
    {
        return Err(bad(arg, format!("invalid git ref {:?}", crate::shorten(r, 100))));
    }
    let hex = git.checksum.len() <= 64 && git.checksum.chars().all(|c| c.is_ascii_hexdigit());
    if !hex {
        return Err(bad(arg, "checksum: expected a commit id (hexadecimal)"));
    }
    if git.subdir.contains('\0') || git.subdir.split('/').any(|c| c == "..") {
        return Err(bad(arg, format!("subdir {:?} leaves the repository", crate::shorten(&git.subdir, 100))));
    }
    Ok(())
}

/// `user@host:path` (git's scp-like syntax; BuildKit needs the user part).
fn scp_like(arg: &str) -> Result<Option<GitSource>, SourceError> {
    let Some((user, rest)) = arg.split_once('@') else { return Ok(None) };
    if user.is_empty()
        || user.starts_with('-')
        || !user.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Ok(None);
    }
    let (host, path) = if let Some(r) = rest.strip_prefix('[') {
        let Some((v6, after)) = r.split_once(']') else { return Ok(None) };
        let Some(path) = after.strip_prefix(':') else { return Ok(None) };
        (format!("[{v6}]"), path)
    } else {
        let Some((h, p)) = rest.split_once(':') else { return Ok(None) };
        if h.is_empty() || !h.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.') {
            return Ok(None);
        }
        (h.to_owned(), p)
    };
    check_hostport(arg, &host)?;
    let (path, fragment) = match path.split_once('#') {
        Some((p, f)) => (p, Some(f)),
        None => (path, None),
    };
    let (path, query) = match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    };
    if path.is_empty() || arg.chars().any(|c| c.is_control() || c == ' ') {
        return Err(bad(arg, "a git URL needs a repository path"));
    }
    let mut git = GitSource {
        remote: format!("{user}@{host}:{path}"),
        credentials: None,
        git_ref: String::new(),
        subdir: String::new(),
        checksum: String::new(),
        keep_git_dir: None,
        submodules: None,
    };
    apply_fragment(&mut git, fragment);
    if let Some(q) = query {
        apply_query(&mut git, q).map_err(|e| bad(arg, e))?;
    }
    check_git(arg, &git)?;
    Ok(Some(git))
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `text` with the userinfo of any `scheme://user:password@` URL in it
/// removed (an ssh URL keeps its user name, which is no secret), so that no
/// message shows a credential.
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let scheme_start = rest[..i].rfind(|c: char| !c.is_ascii_alphanumeric()).map_or(0, |j| j + 1);
        let scheme = rest[scheme_start..i].to_ascii_lowercase();
        out.push_str(&rest[..i + 3]);
        let after = &rest[i + 3..];
        let end = after.find(|c: char| c == '/' || c == '?' || c == '#' || c.is_whitespace() || c == '\'' || c == '"');
        let authority = &after[..end.unwrap_or(after.len())];
        match authority.rfind('@') {
            Some(at) if scheme == "ssh" => {
                let user = authority[..at].split(':').next().unwrap_or("");
                out.push_str(user);
                out.push_str(&authority[at..]);
            }
            Some(at) => out.push_str(&authority[at + 1..]),
            None => out.push_str(authority),
        }
        rest = &after[authority.len()..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn git(arg: &str) -> GitSource {
        match classify(arg, |_| false).unwrap() {
            Source::Git(g) => g,
            other => panic!("{arg}: {other:?}"),
        }
    }

    fn kind(arg: &str) -> &'static str {
        match classify(arg, |_| false) {
            Ok(Source::Stdin) => "stdin",
            Ok(Source::Local(_)) => "local",
            Ok(Source::Git(_)) => "git",
            Ok(Source::Http(_)) => "http",
            Err(_) => "error",
        }
    }

    #[test]
    fn classification_follows_buildkit() {
        let table = [
            ("-", "stdin"),
            (".", "local"),
            ("./app", "local"),
            ("../app", "local"),
            ("/abs/dir", "local"),
            ("app", "local"),
            ("./.git", "local"),
            ("https://example.com/foo.git", "git"),
            ("https://example.com/foo.git#deadbeef", "git"),
            ("https://example.com/foo.git#release/1.2", "git"),
            ("http://example.com/foo.git", "git"),
            ("https://example.com/foo", "http"),
            ("https://example.com/", "http"),
            ("https://example.com/foo.git/", "http"),
            ("https://example.com/foo.git.bar", "http"),
            ("https://example.com/ctx.tar.gz", "http"),
            ("HTTPS://example.com/foo.git", "git"),
            ("git://example.com/foo", "git"),
            ("ssh://git@example.com/foo", "git"),
            ("ssh://git@example.com:2222/foo.git#v1", "git"),
            ("github.com/moby/buildkit", "git"),
            ("github.com/moby/buildkit#master", "git"),
            ("custom.xyz/moby/buildkit.git", "local"),
            ("git@github.com:moby/buildkit", "git"),
            ("git@github.com:moby/buildkit.git", "git"),
            ("git@bitbucket.org:atlassianlabs/atlassian-docker.git", "git"),
            ("git@[::1]:repo.git", "git"),
            ("https://[::1]:8080/repo.git", "git"),
            ("https://[::1]/ctx.tar", "http"),
            ("ftp://example.com/foo.git", "error"),
            ("docker-image://alpine", "error"),
            ("https://-host/x.git", "error"),
            ("https://host:notaport/x.git", "error"),
            ("ssh://-oProxyCommand@host/x.git", "error"),
            ("-oProxyCommand@host:x.git", "local"),
            ("https://[zz]/x.git", "error"),
        ];
        for (arg, want) in table {
            assert_eq!(kind(arg), want, "{arg}");
        }
        assert_eq!(kind("https://host/repo.git#:../../etc"), "error");
        assert_eq!(kind("https://host/repo.git#-upload-pack=x"), "error");
        assert!(looks_remote("https://h/x.git?bad=1") && looks_remote("git@h:r") && !looks_remote("./dir"));
        assert!(!looks_remote("oci-layout:///x") && !looks_remote("dir"));
        // A local directory named like buildx's path-looking git forms wins.
        assert!(matches!(classify("github.com/o/r", |_| true).unwrap(), Source::Local(_)));
    }

    #[test]
    fn fragments_and_queries_parse_like_buildkit() {
        let g = git("https://github.com/foo/bar.git#baz/qux:quux/quuz");
        assert_eq!(
            (g.remote.as_str(), g.git_ref.as_str(), g.subdir.as_str()),
            ("https://github.com/foo/bar.git", "baz/qux", "quux/quuz")
        );
        let g = git("https://github.com/docker/docker.git#:myfolder");
        assert_eq!((g.git_ref.as_str(), g.subdir.as_str()), ("", "myfolder"));
        let g = git("https://h/r.git#");
        assert_eq!((g.git_ref.as_str(), g.subdir.as_str()), ("", ""));
        let g = git("https://h/r.git#main:");
        assert_eq!((g.git_ref.as_str(), g.subdir.as_str()), ("main", ""));
        let g = git("https://github.com/docker/docker.git?ref=v1.0.0&subdir=/subdir");
        assert_eq!(
            (g.remote.as_str(), g.git_ref.as_str(), g.subdir.as_str()),
            ("https://github.com/docker/docker.git", "v1.0.0", "/subdir")
        );
        let g = git("https://github.com/moby/buildkit.git?subdir=/subdir#v1.0.0");
        assert_eq!((g.git_ref.as_str(), g.subdir.as_str()), ("v1.0.0", "/subdir"));
        assert_eq!(git("https://github.com/moby/buildkit.git?tag=v1.0.0").git_ref, "refs/tags/v1.0.0");
        assert_eq!(git("github.com/moby/buildkit?tag=v1.0.0").git_ref, "refs/tags/v1.0.0");
        assert_eq!(git("https://github.com/moby/buildkit.git?branch=v1.0").git_ref, "refs/heads/v1.0");
        let g = git("git@github.com:moby/buildkit.git?subdir=/subdir#v1.0.0");
        assert_eq!(
            (g.remote.as_str(), g.git_ref.as_str(), g.subdir.as_str()),
            ("git@github.com:moby/buildkit.git", "v1.0.0", "/subdir")
        );
        let g = git("https://h/r.git?checksum=abc123&keep-git-dir&submodules=false");
        assert_eq!(
            (g.git_ref.as_str(), g.checksum.as_str(), g.keep_git_dir, g.submodules),
            ("abc123", "abc123", Some(true), Some(false))
        );
        assert_eq!(git("github.com/moby/buildkit").remote, "https://github.com/moby/buildkit");
        assert_eq!(git("ssh://git@example.com:2222/foo.git#v1").remote, "ssh://git@example.com:2222/foo.git");
        assert_eq!(git("git@[::1]:repo.git#main").remote, "git@[::1]:repo.git");
        assert_eq!(git("https://[::1]:8080/repo.git").remote, "https://[::1]:8080/repo.git");
        for (arg, err) in [
            ("https://github.com/moby/buildkit.git?ref=v1.0.0#v1.2.3", "ref conflicts"),
            ("https://github.com/moby/buildkit.git?ref=v1.0.0&tag=v1.2.3", "ref conflicts"),
            ("https://github.com/moby/buildkit.git?tag=v1.0.0&branch=v1.0", "branch conflicts with tag"),
            ("https://github.com/moby/buildkit.git?invalid=123", "unexpected query \"invalid\""),
            ("https://h/r.git?ref=", "has no value"),
            ("https://h/r.git?ref=a&ref=b", "multiple values"),
            ("https://h/r.git?keep-git-dir=maybe", "invalid keep-git-dir"),
            ("https://h/r.git?checksum=xyz", "checksum"),
            ("https://h/", "http"),
        ] {
            match classify(arg, |_| false) {
                Err(e) => assert!(e.to_string().contains(err), "{arg}: {e}"),
                Ok(Source::Http(_)) if err == "http" => {}
                Ok(other) => panic!("{arg}: {other:?}"),
            }
        }
    }

    #[test]
    fn credentials_are_kept_apart_and_never_shown() {
        let g = git("https://user:s%40cret@example.com/o/r.git#main");
        assert_eq!(g.remote, "https://example.com/o/r.git");
        let c = g.credentials.clone().unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("user", "s@cret"));
        assert!(!format!("{g:?}").contains("cret"));
        let g = git("https://tok@example.com/o/r.git");
        assert_eq!(g.credentials.unwrap().password, "");
        // git:// takes no credentials; ssh keeps the user only.
        assert!(git("git://u:p@example.com/r").credentials.is_none());
        assert_eq!(git("git://u:p@example.com/r").remote, "git://example.com/r");
        assert_eq!(git("ssh://git:pw@example.com/r.git").remote, "ssh://git@example.com/r.git");
        match classify("https://u:pw@example.com/ctx.tar.gz#frag", |_| false).unwrap() {
            Source::Http(h) => {
                assert_eq!(h.url, "https://example.com/ctx.tar.gz");
                assert_eq!(h.credentials.unwrap().password, "pw");
                assert_eq!(h.shown, "https://example.com/ctx.tar.gz#frag");
            }
            other => panic!("{other:?}"),
        }
        let e = classify("ftp://u:topsecret@h/x", |_| false).unwrap_err().to_string();
        assert!(!e.contains("topsecret"), "{e}");
        assert_eq!(
            redact("fatal: https://u:p@h/x.git and http://t@h2:80/y"),
            "fatal: https://h/x.git and http://h2:80/y"
        );
        assert_eq!(redact("ssh://git:pw@h/r and git@h:r"), "ssh://git@h/r and git@h:r");
        assert_eq!(redact("no url here"), "no url here");
        assert_eq!(redact("'https://a:b@[::1]:9/r.git'"), "'https://[::1]:9/r.git'");
    }
}
