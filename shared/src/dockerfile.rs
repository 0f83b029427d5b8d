//! What a Dockerfile needs of a builder, read the way BuildKit's parser
//! reads it: parser directives at the top (`# syntax=`, `# escape=`),
//! comments, line continuations, case-insensitive instructions, the flags
//! of RUN, COPY and ADD (`--mount=type=...`, `--link`, `--chmod`,
//! `--from`), and here-documents, whose bodies are skipped so their lines
//! are never taken for instructions.
//!
//! The scan decides nothing about whether the Dockerfile is valid: the
//! builder still parses it. It only finds what a builder must be able to
//! do, so a build goes to one that can, or is refused before it runs.

use crate::capability::{CapSet, Capability};
use crate::limits;

/// One `RUN --mount=type=secret|ssh` reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountRef {
    pub id: String,
    /// `required=true`: the step fails without it.
    pub required: bool,
}

/// What a scan found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scan {
    /// What the Dockerfile needs of the builder (a `# syntax=` directive is
    /// not among them: see `syntax`).
    pub needs: CapSet,
    /// Secret ids of `--mount=type=secret` (deduplicated; required if any
    /// mount of the id requires it).
    pub secrets: Vec<MountRef>,
    /// SSH ids of `--mount=type=ssh` ("default" when none is named).
    pub ssh: Vec<MountRef>,
    /// The `# syntax=` directive's value.
    pub syntax: Option<String>,
    /// Names given to `--from=` (COPY, ADD) and `--mount=...,from=`.
    pub from_names: Vec<String>,
    /// The images FROM names, as written (not an earlier stage, not
    /// `scratch`), first use first, deduplicated; at most
    /// `limits::PROVENANCE_BASE_IMAGES`.
    pub base_images: Vec<String>,
    /// Stage names (`FROM ... AS name`), lowercased.
    pub stages: Vec<String>,
}

/// A Dockerfile larger than `limits::DOCKERFILE_BYTES`.
#[derive(Debug, thiserror::Error)]
#[error("the Dockerfile is larger than the limit of {} bytes", limits::DOCKERFILE_BYTES)]
pub struct TooLarge;

/// Scans a Dockerfile. Never panics; any bytes are read (invalid UTF-8
/// is replaced).
pub fn scan(bytes: &[u8]) -> Result<Scan, TooLarge> {
    if bytes.len() > limits::DOCKERFILE_BYTES {
        return Err(TooLarge);
    }
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l)).collect();
    let mut scan = Scan::default();
    let mut escape = '\\';
    let mut i = 0;
    // Parser directives: `# key=value` lines at the very top; the first
    // other line (a comment, a blank line, an instruction) ends them.
    while let Some(line) = lines.get(i) {
        let Some((key, value)) = directive(line) else { break };
        match key.as_str() {
            "syntax" if scan.syntax.is_none() => scan.syntax = Some(crate::shorten(&value, 256)),
            "escape" => {
                escape = match value.as_str() {
                    "`" => '`',
                    _ => '\\',
                }
            }
            _ => {}
        }
        i += 1;
    }
    while i < lines.len() {
        let (logical, next) = logical_line(&lines, i, escape);
        i = next;
        let Some(logical) = logical else { continue };
        i = instruction(&mut scan, &logical, &lines, i);
    }
    Ok(scan)
}

/// `# key=value` with a directive-shaped key, lowercased.
pub(crate) fn directive(line: &str) -> Option<(String, String)> {
    let rest = line.trim_start().strip_prefix('#')?;
    let (key, value) = rest.split_once('=')?;
    let key = key.trim();
    let ok =
        key.chars().next().is_some_and(|c| c.is_ascii_alphabetic()) && key.chars().all(|c| c.is_ascii_alphanumeric());
    ok.then(|| (key.to_ascii_lowercase(), value.trim().to_owned()))
}

/// The instruction starting at `lines[i]` with its continuations joined;
/// comment lines and blank lines inside it are dropped, as BuildKit does.
/// Returns it (None for a blank or comment line) and the next line's index.
pub(crate) fn logical_line(lines: &[&str], mut i: usize, escape: char) -> (Option<String>, usize) {
    let first = lines[i].trim_start();
    i += 1;
    if first.is_empty() || first.starts_with('#') {
        return (None, i);
    }
    let mut joined = String::new();
    let mut current = first;
    loop {
        match continued(current, escape) {
            Some(head) => {
                joined.push_str(head);
                // The next line that is not a comment or blank carries on.
                loop {
                    let Some(next) = lines.get(i) else { return (Some(joined), i) };
                    i += 1;
                    let t = next.trim_start();
                    if t.is_empty() || t.starts_with('#') {
                        continue;
                    }
                    current = next;
                    break;
                }
            }
            None => {
                joined.push_str(current);
                return (Some(joined), i);
            }
        }
    }
}

/// The line without its trailing escape (and the blanks after it), if it
/// ends with one.
fn continued(line: &str, escape: char) -> Option<&str> {
    let trimmed = line.trim_end_matches([' ', '\t']);
    trimmed.strip_suffix(escape)
}

/// `FROM [--platform=...] IMAGE [AS NAME]`: the image unless it names an
/// earlier stage or is `scratch`, and the stage name.
fn from(scan: &mut Scan, rest: &str) {
    let words: Vec<String> = shell_words(rest).iter().map(|w| unquote(w)).filter(|w| !w.starts_with("--")).collect();
    let Some(image) = words.first() else { return };
    if let (Some(kw), Some(name)) = (words.get(1), words.get(2))
        && kw.eq_ignore_ascii_case("as")
        && scan.stages.len() < limits::PROVENANCE_BASE_IMAGES
    {
        scan.stages.push(name.to_ascii_lowercase());
    }
    let stage = scan.stages.iter().rev().skip(usize::from(words.len() > 2)).any(|s| s.eq_ignore_ascii_case(image));
    let known = scan.base_images.iter().any(|b| b == image);
    if stage
        || known
        || image.eq_ignore_ascii_case("scratch")
        || scan.base_images.len() >= limits::PROVENANCE_BASE_IMAGES
    {
        return;
    }
    scan.base_images.push(crate::shorten(image, limits::PROVENANCE_REF_BYTES));
}

/// Reads one instruction; returns the index of the line after it and its
/// here-document bodies.
fn instruction(scan: &mut Scan, logical: &str, lines: &[&str], mut i: usize) -> usize {
    let (word, rest) = split_word(logical);
    let keyword = word.to_ascii_uppercase();
    if keyword == "FROM" {
        from(scan, rest);
        return i;
    }
    // ONBUILD stores its instruction for images built FROM this one: this
    // build does not run it, so it needs nothing of this builder.
    if !matches!(keyword.as_str(), "RUN" | "COPY" | "ADD") {
        return i;
    }
    let words = shell_words(rest);
    let mut at = 0;
    while let Some(w) = words.get(at) {
        if !w.starts_with("--") {
            break;
        }
        at += 1;
        let unquoted = unquote(w);
        let flag = unquoted.strip_prefix("--").unwrap_or(&unquoted);
        let (name, value) = match flag.split_once('=') {
            Some((n, v)) => (n.to_ascii_lowercase(), Some(v)),
            None => (flag.to_ascii_lowercase(), None),
        };
        match (keyword.as_str(), name.as_str()) {
            ("RUN", "mount") => mount(scan, value.unwrap_or_default()),
            ("COPY" | "ADD", "link") if value.is_none_or(|v| !v.eq_ignore_ascii_case("false")) => {
                scan.needs.insert(Capability::CopyLink)
            }
            ("COPY" | "ADD", "chmod") => scan.needs.insert(Capability::CopyChmod),
            ("COPY" | "ADD", "from") => note_from(scan, value.unwrap_or_default()),
            _ => {}
        }
    }
    // Here-documents (RUN, COPY, ADD only): each body follows the
    // instruction, in the order they were opened.
    let mut docs = Vec::new();
    for (n, w) in words[at..].iter().enumerate() {
        if let Some(doc) = heredoc(w, words.get(at + n + 1)) {
            docs.push(doc);
        }
    }
    if !docs.is_empty() {
        scan.needs.insert(Capability::Heredocs);
    }
    for (strip_tabs, end) in docs {
        while let Some(line) = lines.get(i) {
            i += 1;
            let candidate = if strip_tabs { line.trim_start_matches('\t') } else { line };
            if candidate == end {
                break;
            }
        }
    }
    i
}

/// The first blank-separated word and the rest.
pub(crate) fn split_word(s: &str) -> (&str, &str) {
    let s = s.trim_start();
    match s.find([' ', '\t']) {
        Some(at) => (&s[..at], s[at..].trim_start()),
        None => (s, ""),
    }
}

/// Words as a shell splits them: quotes and backslashes keep blanks inside
/// a word; the quotes stay in the word (the heredoc reader needs them).
pub(crate) fn shell_words(s: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quote: Option<char> = None;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, ' ' | '\t') => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            (None, '\'' | '"') => {
                quote = Some(c);
                word.push(c);
            }
            (Some(q), _) if c == q => {
                quote = None;
                word.push(c);
            }
            (None | Some('"'), '\\') => {
                word.push(c);
                if let Some(n) = chars.next() {
                    word.push(n);
                }
            }
            _ => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

/// A word without its shell quotes and backslashes, as BuildKit reads a
/// flag.
fn unquote(word: &str) -> String {
    let mut out = String::new();
    let mut quote: Option<char> = None;
    let mut chars = word.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), _) if c == q => quote = None,
            (None | Some('"'), '\\') => out.extend(chars.next()),
            _ => out.push(c),
        }
    }
    out
}

/// `<<EOF`, `<<-EOF`, `<<"EOF"`, `<<'EOF'` (also `<<` then the word):
/// whether tabs are stripped, and the terminator.
pub(crate) fn heredoc(word: &str, next: Option<&String>) -> Option<(bool, String)> {
    let rest = word.strip_prefix("<<")?;
    if rest.starts_with('<') {
        return None; // a here-string
    }
    let (strip_tabs, rest) = match rest.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, rest),
    };
    let rest = if rest.is_empty() { next.map(String::as_str).unwrap_or_default() } else { rest };
    let name: String = match rest.chars().next() {
        Some(q @ ('"' | '\'')) => rest[1..].chars().take_while(|c| *c != q).collect(),
        _ => rest.chars().take_while(|c| !matches!(c, '>' | '<' | '|' | ';' | '&' | ')' | '(' | ' ')).collect(),
    };
    (!name.is_empty()).then_some((strip_tabs, name))
}

/// `--mount=type=...,id=...,target=...,required=...,from=...`
/// (type defaults to bind, as BuildKit's).
fn mount(scan: &mut Scan, value: &str) {
    let mut kind = "bind".to_owned();
    let mut id = String::new();
    let mut target = String::new();
    let mut required = false;
    for field in csv_fields(value) {
        let (key, val) = match field.split_once('=') {
            Some((k, v)) => (k.trim().to_ascii_lowercase(), v.to_owned()),
            None => (field.trim().to_ascii_lowercase(), String::new()),
        };
        match key.as_str() {
            "type" => kind = val.to_ascii_lowercase(),
            "id" => id = val,
            "target" | "dst" | "destination" => target = val,
            "required" => required = val.is_empty() || val.eq_ignore_ascii_case("true") || val == "1",
            "from" => note_from(scan, &val),
            _ => {}
        }
    }
    match kind.as_str() {
        "secret" => {
            scan.needs.insert(Capability::Secrets);
            // BuildKit: the id defaults to the target's file name.
            if id.is_empty() {
                id = target.rsplit('/').next().unwrap_or_default().to_owned();
            }
            if !id.is_empty() {
                note_mount(&mut scan.secrets, id, required);
            }
        }
        "ssh" => {
            scan.needs.insert(Capability::Ssh);
            if id.is_empty() {
                id = "default".into();
            }
            note_mount(&mut scan.ssh, id, required);
        }
        "cache" => scan.needs.insert(Capability::CacheMounts),
        "bind" => scan.needs.insert(Capability::BindMounts),
        "tmpfs" => scan.needs.insert(Capability::TmpfsMounts),
        _ => {}
    }
}

fn note_mount(list: &mut Vec<MountRef>, id: String, required: bool) {
    let id = crate::shorten(&id, 256);
    if let Some(m) = list.iter_mut().find(|m| m.id == id) {
        m.required |= required;
    } else if list.len() < limits::DOCKERFILE_MOUNT_IDS {
        list.push(MountRef { id, required });
    }
}

fn note_from(scan: &mut Scan, name: &str) {
    let name = crate::shorten(name, 256);
    if !name.is_empty() && !scan.from_names.contains(&name) && scan.from_names.len() < limits::DOCKERFILE_MOUNT_IDS {
        scan.from_names.push(name);
    }
}

/// A mount's comma-separated options as BuildKit reads them (Go's
/// encoding/csv); a malformed record, which BuildKit would refuse, is
/// still scanned field by field rather than dropped.
fn csv_fields(s: &str) -> Vec<String> {
    crate::csv::fields(s).unwrap_or_else(|_| s.split(',').map(str::to_owned).collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn needs(text: &str) -> Vec<String> {
        scan(text.as_bytes()).unwrap().needs.names()
    }

    #[test]
    fn base_images_are_the_froms_that_are_not_stages() {
        let s = scan(
            b"FROM --platform=$BUILDPLATFORM reg/base:1 AS build\nFROM build AS test\nfrom scratch\n\
              FROM reg/base:1\nFROM \"reg/run@sha256:ab\" as final\n",
        )
        .unwrap();
        assert_eq!(s.base_images, ["reg/base:1", "reg/run@sha256:ab"]);
        assert_eq!(s.stages, ["build", "test", "final"]);
    }

    #[test]
    fn tricky_inputs() {
        let cases: &[(&str, &[&str])] = &[
            ("FROM scratch\nCOPY a b\n", &[]),
            ("from alpine\nrun --mount=type=secret,id=tok cat /run/secrets/tok\n", &["secrets"]),
            ("FROM a\nRUN --mount=target=/src make\n", &["bind-mounts"]),
            (
                "FROM a\nRUN --mount=type=cache,target=/root/.cache --mount=type=tmpfs,target=/t true\n",
                &["cache-mounts", "tmpfs-mounts"],
            ),
            ("FROM a\nRUN <<EOF\necho hi\nEOF\n", &["heredocs"]),
            ("FROM a\nCOPY --link --chmod=755 a /b\n", &["copy-link", "copy-chmod"]),
            ("FROM a\nCOPY --link=false a /b\n", &[]),
            ("FROM a\nADD --chmod=644 x /y\n", &["copy-chmod"]),
            // A comment or a heredoc body is not an instruction.
            ("FROM a\n# RUN --mount=type=ssh true\n", &[]),
            ("FROM a\nRUN <<EOF\nRUN --mount=type=ssh true\nCOPY --link a b\nEOF\nCOPY x y\n", &["heredocs"]),
            (
                "FROM a\nRUN <<-EOF\n\tRUN --mount=type=ssh x\n\tEOF\nRUN --mount=type=cache,target=/c x\n",
                &["cache-mounts", "heredocs"],
            ),
            ("FROM a\nCOPY <<\"A\" <<'B' /dst/\nRUN --mount=type=ssh x\nA\nCOPY --link q r\nB\n", &["heredocs"]),
            // Several heredocs on one line: both bodies are skipped, in order.
            (
                "FROM a\nRUN <<A cat /dev/stdin && cat <<B\nA-body\nA\nB-body --mount\nB\nRUN --mount=type=ssh x\n",
                &["ssh", "heredocs"],
            ),
            // `<<` inside quotes, a here-string and `<<` on other instructions are not heredocs.
            ("FROM a\nRUN echo '<<EOF'\nRUN cat <<<word\nLABEL x=<<EOF\n", &[]),
            // Continuations, with a comment and a blank line inside.
            ("FROM a\nRUN \\\n# note\n\n  --mount=type=secret,id=a \\\n  true\n", &["secrets"]),
            // Instructions are case-insensitive; so are flags.
            ("FROM a\nrUn --MOUNT=type=ssh true\ncopy --LINK a b\n", &["ssh", "copy-link"]),
            // ONBUILD's instruction runs in later builds, not this one.
            ("FROM a\nONBUILD RUN --mount=type=cache,target=/x true\nONBUILD COPY --link a b\n", &[]),
            // Flags end at the first word that is not one.
            ("FROM a\nRUN echo --mount=type=secret,id=x\n", &[]),
            ("FROM a\nRUN [\"sh\", \"-c\", \"--mount=type=ssh\"]\n", &[]),
            // CRLF line ends.
            ("FROM a\r\nRUN --mount=type=ssh \\\r\n  true\r\n", &["ssh"]),
        ];
        for (text, want) in cases {
            assert_eq!(needs(text), *want, "{text:?}");
        }
    }

    #[test]
    fn directives_only_at_the_top() {
        let s = scan(b"# syntax=docker/dockerfile:1.4\n# escape=`\nFROM a\nRUN --mount=type=ssh `\n  true\n").unwrap();
        assert_eq!(s.syntax.as_deref(), Some("docker/dockerfile:1.4"));
        assert_eq!(s.needs.names(), ["ssh"]);
        assert_eq!(s.ssh, [MountRef { id: "default".into(), required: false }]);
        // After a backtick escape, a backslash continues nothing.
        let s = scan(b"# escape=`\nFROM a\nRUN echo \\\nRUN --mount=type=cache,target=/c x\n").unwrap();
        assert_eq!(s.needs.names(), ["cache-mounts"]);
        // SYNTAX in any case, spaces around.
        assert_eq!(scan(b"#  SYNTAX = x/y:1 \nFROM a\n").unwrap().syntax.as_deref(), Some("x/y:1"));
        // Not a directive after a comment, a blank line or an instruction.
        for text in ["# hello\n# syntax=x\nFROM a\n", "\n# syntax=x\nFROM a\n", "FROM a\n# syntax=x\n"] {
            assert_eq!(scan(text.as_bytes()).unwrap().syntax, None, "{text:?}");
        }
    }

    #[test]
    fn secret_and_ssh_ids() {
        let text = "FROM a\n\
            RUN --mount=type=secret,id=npm,required=true --mount=type=secret,target=/run/secrets/pip x\n\
            RUN --mount=type=secret,id=npm --mount=type=ssh,id=gh,required x\n\
            RUN --mount=\"type=secret,id=q\" --mount=type=secret,id=dup,required=false x\n\
            COPY --from=build /a /b\n\
            RUN --mount=type=bind,from=tools,target=/t x\n";
        let s = scan(text.as_bytes()).unwrap();
        let ids: Vec<(&str, bool)> = s.secrets.iter().map(|m| (m.id.as_str(), m.required)).collect();
        assert_eq!(ids, [("npm", true), ("pip", false), ("q", false), ("dup", false)]);
        assert_eq!(s.ssh, [MountRef { id: "gh".into(), required: true }]);
        assert_eq!(s.from_names, ["build", "tools"]);
        assert_eq!(s.needs.names(), ["secrets", "ssh", "bind-mounts"]);
    }

    #[test]
    fn an_unterminated_heredoc_swallows_the_rest() {
        assert_eq!(needs("FROM a\nRUN <<EOF\nRUN --mount=type=ssh x\n"), ["heredocs"]);
        assert_eq!(needs("FROM a\nRUN <<\n"), Vec::<String>::new());
    }

    #[test]
    fn bounded() {
        assert!(scan(&vec![b'#'; limits::DOCKERFILE_BYTES + 1]).is_err());
        let many: String = (0..10_000).map(|i| format!("RUN --mount=type=secret,id=s{i} x\n")).collect();
        assert_eq!(scan(many.as_bytes()).unwrap().secrets.len(), limits::DOCKERFILE_MOUNT_IDS);
    }

    proptest! {
        #[test]
        fn never_panics_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = scan(&bytes);
        }

        /// Whatever a here-document holds, it is never read as instructions.
        #[test]
        fn heredoc_bodies_need_nothing(body in proptest::collection::vec(
            proptest::sample::select(vec![
                "RUN --mount=type=ssh x", "COPY --link a b", "ADD --chmod=7 a b", "RUN <<INNER", "INNER", "\\",
                "# syntax=x", "EOF ", " EOF", "\tEOF", "run --mount=type=secret,id=s x", "",
            ]),
            0..20,
        ), dash in any::<bool>()) {
            let open = if dash { "<<-\"EOF\"" } else { "<<EOF" };
            let body: Vec<&str> = body.into_iter().filter(|l| !(dash && l.trim_start_matches('\t') == "EOF")).collect();
            let text = format!("FROM a\nRUN {open}\n{}\nEOF\n", body.join("\n"));
            prop_assert_eq!(scan(text.as_bytes()).unwrap().needs.names(), ["heredocs"]);
        }

        #[test]
        fn never_panics_on_dockerfile_like_lines(lines in proptest::collection::vec(
            proptest::sample::select(vec![
                "FROM a", "RUN <<EOF", "EOF", "RUN <<-\"X\" <<'Y'", "\tX", "Y", "RUN --mount=type=secret,id=\"a,b\" \\",
                "# syntax=x", "# escape=`", "COPY --link --chmod=7 <<", "ONBUILD", "RUN --mount=", "  `", "\\", "",
                "RUN \"unterminated", "ADD --from= a", "rUn --mount=type=ssh,required", "é<<ü",
            ]),
            0..40,
        )) {
            let text = lines.join("\n");
            let _ = scan(text.as_bytes());
        }
    }
}
