//! `--ssh`: buildx's flag syntax, the ids both ends accept, and which
//! `RUN --mount=type=ssh` steps of a Dockerfile insist on an agent.
//!
//! As BuildKit: `--ssh default|ID[=SOCKET|KEY[,KEY...]]`, repeatable; an
//! empty id is `default`; no path means `$SSH_AUTH_SOCK`; one id given twice
//! is refused. A step's mount without `required=true` runs without a socket
//! when its id was not forwarded; with it, the step fails.

use crate::limits;

/// The id BuildKit gives an `--ssh` value without one, and a mount without `id=`.
pub const DEFAULT_ID: &str = "default";

/// One `--ssh` value: an id and what serves it on the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SshSpec {
    pub id: String,
    /// Empty: `$SSH_AUTH_SOCK`. One socket, or key files.
    pub paths: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SshError {
    #[error("invalid id {0:?}: 1 to 64 letters, digits, '.', '_' or '-'")]
    InvalidId(String),
    #[error("id {0:?} given twice")]
    Duplicate(String),
    #[error("more than the limit of {} ids", limits::SSH_IDS)]
    TooMany,
    #[error("{0:?}: an empty path in the list")]
    EmptyPath(String),
}

/// Whether `id` may name an `--ssh` agent: it becomes part of builder flags
/// (`--ssh ID=PATH`), so no '=', ',' or space.
pub fn check_id(id: &str) -> Result<(), SshError> {
    let ok = !id.is_empty()
        && id.len() <= limits::SSH_ID_BYTES
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok { Ok(()) } else { Err(SshError::InvalidId(crate::shorten(id, 80))) }
}

/// Checks a list of ids (the spec's `ssh_ids`): each valid, none twice, at
/// most `limits::SSH_IDS`.
pub fn check_ids<'a>(ids: impl IntoIterator<Item = &'a str>) -> Result<(), SshError> {
    let mut seen: Vec<&str> = Vec::new();
    for id in ids {
        check_id(id)?;
        if seen.contains(&id) {
            return Err(SshError::Duplicate(id.to_owned()));
        }
        seen.push(id);
        if seen.len() > limits::SSH_IDS {
            return Err(SshError::TooMany);
        }
    }
    Ok(())
}

/// Parses `--ssh` values as buildx does: `ID[=PATH[,PATH...]]`, empty
/// values skipped, an empty id is `default`.
pub fn parse_specs(raw: &[String]) -> Result<Vec<SshSpec>, SshError> {
    let mut out = Vec::new();
    for value in raw.iter().filter(|v| !v.is_empty()) {
        let (id, paths) = match value.split_once('=') {
            Some((id, "")) => (id, Vec::new()),
            Some((id, list)) => {
                let paths: Vec<String> = list.split(',').map(str::to_owned).collect();
                if paths.iter().any(String::is_empty) {
                    return Err(SshError::EmptyPath(crate::shorten(value, 200)));
                }
                (id, paths)
            }
            None => (value.as_str(), Vec::new()),
        };
        let id = if id.is_empty() { DEFAULT_ID } else { id };
        out.push(SshSpec { id: id.to_owned(), paths });
    }
    check_ids(out.iter().map(|s| s.id.as_str()))?;
    Ok(out)
}

/// A `RUN --mount=type=ssh,required=true` whose id the build was not given,
/// with BuildKit's own words for it: `None` when every such mount is served.
/// A mount without `required` runs without a socket, as BuildKit's does.
pub fn unserved_required_mount(dockerfile: &str, ids: &[String]) -> Option<String> {
    for instruction in instructions(dockerfile) {
        let mut words = instruction.split_whitespace();
        if !words.next().is_some_and(|w| w.eq_ignore_ascii_case("RUN")) {
            continue;
        }
        for word in words.take_while(|w| w.starts_with("--")) {
            let Some(mount) = word.strip_prefix("--mount=") else { continue };
            let (mut is_ssh, mut id, mut required) = (false, DEFAULT_ID, false);
            for field in mount.split(',') {
                let (key, value) = field.split_once('=').unwrap_or((field, "true"));
                match key.to_ascii_lowercase().as_str() {
                    "type" => is_ssh = value == "ssh",
                    "id" => id = value,
                    "required" => required = matches!(value, "1" | "t" | "T" | "true" | "TRUE" | "True"),
                    _ => {}
                }
            }
            if is_ssh && required && !ids.iter().any(|i| i == id) {
                // BuildKit's messages: none forwarded at all, or not this one.
                return Some(if ids.is_empty() {
                    format!("no SSH key {id:?} forwarded from the client")
                } else {
                    format!("unset ssh forward key {id}")
                });
            }
        }
    }
    None
}

/// The Dockerfile's instructions, continuation lines joined, comments dropped.
fn instructions(dockerfile: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in dockerfile.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.starts_with('#') || trimmed.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                out.push(std::mem::take(&mut current));
            }
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn specs(raw: &[&str]) -> Result<Vec<SshSpec>, SshError> {
        parse_specs(&raw.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    fn spec(id: &str, paths: &[&str]) -> SshSpec {
        SshSpec { id: id.into(), paths: paths.iter().map(|p| p.to_string()).collect() }
    }

    #[test]
    fn values_parse_as_buildx_parses_them() {
        assert_eq!(
            specs(&["", "gh=/run/agent.sock", "keys=/k/a,/k/b", "=/x", "plain="]).unwrap(),
            [
                spec("gh", &["/run/agent.sock"]),
                spec("keys", &["/k/a", "/k/b"]),
                spec("default", &["/x"]),
                spec("plain", &[]),
            ]
        );
        assert_eq!(specs(&["default"]).unwrap(), [spec("default", &[])]);
        assert_eq!(specs(&["a", "a=/x"]), Err(SshError::Duplicate("a".into())));
        assert_eq!(specs(&["default", "=/x"]), Err(SshError::Duplicate("default".into())));
        assert!(matches!(specs(&["a b=/x"]), Err(SshError::InvalidId(_))));
        assert!(matches!(specs(&["a,b"]), Err(SshError::InvalidId(_))));
        assert!(matches!(specs(&["k=/a,,/b"]), Err(SshError::EmptyPath(_))));
        let many: Vec<String> = (0..=limits::SSH_IDS).map(|i| format!("id{i}")).collect();
        assert_eq!(parse_specs(&many), Err(SshError::TooMany));
        assert!(check_id(&"x".repeat(limits::SSH_ID_BYTES + 1)).is_err());
    }

    #[test]
    fn only_a_required_mount_without_its_id_is_refused_in_buildkits_words() {
        let file = "FROM x\n# RUN --mount=type=ssh,required=true a\nRUN --mount=type=ssh ssh-add -l\n\
                    RUN --mount=type=cache,target=/c \\\n  --mount=type=ssh,id=gh,required \\\n  git clone\n";
        assert_eq!(unserved_required_mount(file, &["gh".into()]), None);
        assert_eq!(unserved_required_mount(file, &[]).as_deref(), Some("no SSH key \"gh\" forwarded from the client"));
        assert_eq!(unserved_required_mount(file, &["default".into()]).as_deref(), Some("unset ssh forward key gh"));
        assert_eq!(unserved_required_mount("RUN --mount=type=ssh,required=false true\n", &[]), None);
        assert_eq!(unserved_required_mount("run echo --mount=type=ssh,required=true\n", &[]), None);
    }
}
