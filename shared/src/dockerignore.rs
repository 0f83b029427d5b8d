//! `.dockerignore` with Docker's exact rules: the file format of buildkit's
//! `dockerignore.ReadAll` and the matching of moby's `patternmatcher`
//! (`MatchesOrParentMatches`), so the same context is sent as `docker build`
//! would send.

use regex::Regex;

/// A parse error in a `.dockerignore`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IgnoreError {
    #[error("illegal exclusion pattern: \"!\" (line {line})")]
    BareExclusion { line: usize },
    #[error("syntax error in pattern {pattern:?} (line {line})")]
    BadPattern { pattern: String, line: usize },
}

#[derive(Debug, Clone)]
enum Matcher {
    Exact,
    /// `foo/**`: anything under the prefix.
    Prefix,
    /// `**/foo`: anything ending in the suffix.
    Suffix,
    Regex(Regex),
}

#[derive(Debug, Clone)]
struct Pattern {
    cleaned: String,
    exclusion: bool,
    matcher: Matcher,
}

/// The patterns of one `.dockerignore`, in order; later lines win.
#[derive(Debug, Clone, Default)]
pub struct DockerIgnore {
    patterns: Vec<Pattern>,
}

impl DockerIgnore {
    /// Parses a `.dockerignore` file's contents the way buildkit reads it.
    pub fn parse(contents: &str) -> Result<DockerIgnore, IgnoreError> {
        let contents = contents.strip_prefix('\u{feff}').unwrap_or(contents);
        let mut patterns = Vec::new();
        for (index, raw) in contents.lines().enumerate() {
            let line = index + 1;
            if raw.starts_with('#') {
                continue;
            }
            let mut pattern = raw.trim();
            if pattern.is_empty() {
                continue;
            }
            let exclusion = pattern.starts_with('!');
            if exclusion {
                pattern = pattern[1..].trim();
                if pattern.is_empty() {
                    return Err(IgnoreError::BareExclusion { line });
                }
            }
            let mut cleaned = clean(pattern);
            if cleaned.len() > 1 && cleaned.starts_with('/') {
                cleaned.remove(0);
            }
            patterns.push(Pattern::new(cleaned, exclusion, line)?);
        }
        Ok(DockerIgnore { patterns })
    }

    /// True if any pattern starts with `!`.
    pub fn has_exclusions(&self) -> bool {
        self.patterns.iter().any(|p| p.exclusion)
    }

    /// True if `path` (slash-separated, relative to the context root) is
    /// ignored: the last pattern that matches it or one of its parent
    /// directories decides.
    pub fn is_ignored(&self, path: &str) -> bool {
        let path = clean(path);
        if path == "." {
            return false;
        }
        let parents: Vec<&str> = match path.rfind('/') {
            Some(i) => path[..i].split('/').collect(),
            None => Vec::new(),
        };
        let mut matched = false;
        for pattern in &self.patterns {
            if pattern.exclusion != matched {
                continue;
            }
            let mut hit = pattern.matches(&path);
            if !hit {
                hit = (1..=parents.len()).any(|n| pattern.matches(&parents[..n].join("/")));
            }
            if hit {
                matched = !pattern.exclusion;
            }
        }
        matched
    }
}

impl Pattern {
    fn new(cleaned: String, exclusion: bool, line: usize) -> Result<Pattern, IgnoreError> {
        let bad = || IgnoreError::BadPattern { pattern: cleaned.clone(), line };
        if !valid_go_glob(&cleaned) {
            return Err(bad());
        }
        let matcher = compile(&cleaned).map_err(|_| bad())?;
        Ok(Pattern { cleaned, exclusion, matcher })
    }

    fn matches(&self, path: &str) -> bool {
        match &self.matcher {
            Matcher::Exact => path == self.cleaned,
            Matcher::Prefix => path.starts_with(&self.cleaned[..self.cleaned.len() - 2]),
            Matcher::Suffix => {
                let suffix = &self.cleaned[2..];
                path.ends_with(suffix) || suffix.strip_prefix('/') == Some(path)
            }
            Matcher::Regex(re) => re.is_match(path),
        }
    }
}

/// Translates a pattern to a matcher exactly as patternmatcher's `compile`.
fn compile(pattern: &str) -> Result<Matcher, regex::Error> {
    #[derive(PartialEq)]
    enum Kind {
        Exact,
        Prefix,
        Suffix,
        Regex,
    }
    let mut re = String::from("^");
    let mut kind = Kind::Exact;
    let mut chars = pattern.chars().peekable();
    let mut index = 0;
    while let Some(ch) = chars.next() {
        match ch {
            '*' if chars.peek() == Some(&'*') => {
                chars.next();
                if chars.peek() == Some(&'/') {
                    chars.next();
                }
                if chars.peek().is_none() {
                    if kind == Kind::Exact {
                        kind = Kind::Prefix;
                    } else {
                        re.push_str(".*");
                        kind = Kind::Regex;
                    }
                } else {
                    re.push_str("(.*/)?");
                    kind = Kind::Regex;
                }
                if index == 0 {
                    kind = Kind::Suffix;
                }
            }
            '*' => {
                re.push_str("[^/]*");
                kind = Kind::Regex;
            }
            '?' => {
                re.push_str("[^/]");
                kind = Kind::Regex;
            }
            '.' | '+' | '(' | ')' | '|' | '{' | '}' | '$' => {
                re.push('\\');
                re.push(ch);
            }
            '\\' => match chars.next() {
                Some(next) => {
                    re.push_str(&regex::escape(&next.to_string()));
                    kind = Kind::Regex;
                }
                None => re.push_str("\\\\"),
            },
            '[' | ']' => {
                re.push(ch);
                kind = Kind::Regex;
            }
            // Literal in Go's regexp, special in Rust's character classes.
            '&' | '~' => re.push_str(&regex::escape(&ch.to_string())),
            _ => re.push(ch),
        }
        index += 1;
    }
    Ok(match kind {
        Kind::Exact => Matcher::Exact,
        Kind::Prefix => Matcher::Prefix,
        Kind::Suffix => Matcher::Suffix,
        Kind::Regex => {
            re.push('$');
            Matcher::Regex(Regex::new(&re)?)
        }
    })
}

/// The syntax check of Go's `filepath.Match(pattern, ".")`: character classes
/// closed and non-empty, ranges well formed, no trailing backslash.
fn valid_go_glob(pattern: &str) -> bool {
    let mut chars = pattern.chars().peekable();
    while let Some(ch) = chars.next() {
        match ch {
            '\\' if chars.next().is_none() => return false,
            '[' => {
                if chars.peek() == Some(&'^') {
                    chars.next();
                }
                let mut count = 0;
                loop {
                    let lo = match chars.next() {
                        None => return false,
                        Some(']') if count > 0 => break,
                        Some('\\') => match chars.next() {
                            Some(c) => c,
                            None => return false,
                        },
                        Some('-') if count == 0 => return false,
                        Some(c) => c,
                    };
                    if chars.peek() == Some(&'-') {
                        chars.next();
                        let hi = match chars.next() {
                            None | Some(']') => return false,
                            Some('\\') => match chars.next() {
                                Some(c) => c,
                                None => return false,
                            },
                            Some(c) => c,
                        };
                        if hi < lo {
                            return false;
                        }
                    }
                    count += 1;
                }
            }
            _ => {}
        }
    }
    true
}

/// Go's `filepath.Clean` for slash-separated paths.
pub fn clean(path: &str) -> String {
    if path.is_empty() {
        return ".".to_owned();
    }
    let rooted = path.starts_with('/');
    let mut out: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if out.last().is_some_and(|last| *last != "..") {
                    out.pop();
                } else if !rooted {
                    out.push("..");
                }
            }
            other => out.push(other),
        }
    }
    let joined = out.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".to_owned(),
        (false, false) => joined,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ignored(rules: &str, path: &str) -> bool {
        DockerIgnore::parse(rules).unwrap().is_ignored(path)
    }

    /// (rules, path, ignored?) from Docker's documentation and moby's
    /// patternmatcher tests.
    #[test]
    fn docker_rules_table() {
        let cases: &[(&str, &str, bool)] = &[
            // Plain names match at the root only, and whole directories.
            ("foo", "foo", true),
            ("foo", "foo/bar", true),
            ("foo", "a/foo", false),
            ("foo", "foobar", false),
            // Leading / and ./ are cleaned away; trailing / too.
            ("/foo", "foo", true),
            ("./foo", "foo/x", true),
            ("foo/", "foo/x", true),
            ("foo/../bar", "bar", true),
            // * and ? do not cross /.
            ("*.md", "README.md", true),
            ("*.md", "docs/a.md", false),
            ("*/temp*", "somedir/temporary.txt", true),
            ("*/temp*", "somedir/sub/temp.txt", false),
            ("*/*/temp*", "somedir/subdir/temporary.txt", true),
            ("temp?", "temp1", true),
            ("temp?", "temp12", false),
            ("temp?", "temp/", false),
            // ** crosses any number of directories, including none.
            ("**/*.go", "a.go", true),
            ("**/*.go", "x/y/z/a.go", true),
            ("**/foo", "foo", true),
            ("**/foo", "x/foo", true),
            ("**/foo", "xfoo", false),
            ("**", "anything/at/all", true),
            ("dir/**", "dir/x/y", true),
            ("dir/**", "dirx", false),
            ("a/**/b", "a/b", true),
            ("a/**/b", "a/x/y/b", true),
            ("a/**/b", "a/x/y/c", false),
            ("a/**", "a", false),
            // Character classes and escapes.
            ("[a-c].txt", "b.txt", true),
            ("[a-c].txt", "d.txt", false),
            ("[^a].txt", "a.txt", false),
            ("[^a].txt", "b.txt", true),
            ("file\\*", "file*", true),
            ("file\\*", "filex", false),
            // Regexp metacharacters are literal.
            ("a+b(c)", "a+b(c)", true),
            ("a.b", "axb", false),
            // ! re-includes; later lines win.
            ("*.md\n!README.md", "README.md", false),
            ("*.md\n!README.md", "CHANGES.md", true),
            ("!README.md\n*.md", "README.md", true),
            ("*.md\n!README*.md\nREADME-secret.md", "README-secret.md", true),
            ("*.md\n!README*.md\nREADME-secret.md", "README-public.md", false),
            // An ignored directory ignores what is in it unless re-included.
            ("build\n!build/keep", "build/keep", false),
            ("build\n!build/keep", "build/other", true),
            ("build\n!build/keep", "build/keep/deep", false),
            // Comments and blank lines.
            ("# a comment\n\n   \nfoo", "foo", true),
            ("#foo", "#foo", false),
            (" # not a comment", "# not a comment", true),
            // Whitespace around patterns and after ! is trimmed.
            ("  foo  ", "foo", true),
            ("*\n!  keep", "keep", false),
            // The root itself is never ignored.
            ("*", ".", false),
        ];
        for (rules, path, want) in cases {
            assert_eq!(ignored(rules, path), *want, "rules {rules:?} path {path:?}");
        }
    }

    #[test]
    fn refuses_bad_patterns() {
        assert_eq!(DockerIgnore::parse("a\n!").unwrap_err(), IgnoreError::BareExclusion { line: 2 });
        for bad in ["[", "a[", "[]", "[z-a]", "x\\"] {
            assert!(matches!(DockerIgnore::parse(bad), Err(IgnoreError::BadPattern { .. })), "{bad}");
        }
        assert!(DockerIgnore::parse("\u{feff}foo").unwrap().is_ignored("foo"));
    }

    #[test]
    fn clean_matches_go() {
        for (input, want) in
            [("", "."), ("./a/./b/", "a/b"), ("a/../../b", "../b"), ("/../a", "/a"), ("//a//b", "/a/b"), ("a/..", ".")]
        {
            assert_eq!(clean(input), want, "{input}");
        }
    }

    proptest! {
        #[test]
        fn never_panics(rules in "\\PC{0,60}", path in "[a-z/.*]{0,20}") {
            if let Ok(ignore) = DockerIgnore::parse(&rules) {
                let _ = ignore.is_ignored(&path);
            }
        }
    }
}
