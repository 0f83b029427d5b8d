//! `--secret id=ID[,src=FILE|,source=FILE|,env=VAR][,type=file|env]`, read
//! the way buildx reads it, and the bounds the CLI (before upload) and the
//! coordinator (every submit) both check.
//!
//! buildx's rules: the value is CSV (a field in double quotes may hold a
//! comma); each field is `key=value` with a case-insensitive key; `src` and
//! `source` name a file, `env` a variable; `type=env` turns a `src` into the
//! variable's name; `id=X` alone reads the variable `X` when it is set, else
//! the file `X` (BuildKit's secrets provider); no id is an error. Where
//! buildx would quietly pick one of two sources (`src` and `env` both
//! given: the variable wins), braid refuses, so nothing a user passes is
//! silently dropped. An id given twice is refused for the same reason.
//!
//! Errors name the id and the file or variable, never the value.

use std::path::{Path, PathBuf};

use crate::{limits, proto};

/// Why a `--secret` is refused.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SecretError(String);

fn refuse(message: String) -> SecretError {
    SecretError(message)
}

/// Where a secret's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    Env(String),
    /// `id=X` alone: the variable `X` if set, else the file `X`.
    ById,
}

/// One parsed `--secret`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretFlag {
    pub id: String,
    pub source: Source,
}

/// A secret id: 1 to 128 bytes of letters, digits, `_`, `-` and `.`, not
/// starting with `.` (it is part of a builder's `--secret id=..,src=..`).
pub fn check_id(id: &str) -> Result<(), SecretError> {
    let ok = !id.is_empty()
        && id.len() <= limits::SECRET_ID_BYTES
        && !id.starts_with('.')
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
    if ok {
        return Ok(());
    }
    Err(refuse(format!(
        "--secret id {:?}: expected 1 to {} letters, digits, '_', '-' or '.' (not starting with '.')",
        crate::shorten(id, 80),
        limits::SECRET_ID_BYTES
    )))
}

/// Parses one `--secret` value as buildx does (see the module's comment).
pub fn parse(raw: &str) -> Result<SecretFlag, SecretError> {
    let shown = crate::shorten(raw, 120);
    let (mut id, mut file, mut env, mut typ) = (None, None, None, None);
    let fields =
        crate::csv::fields(raw).map_err(|e| refuse(format!("--secret {:?}: {e}", crate::shorten(raw, 120))))?;
    for field in fields {
        let (key, value) = field
            .split_once('=')
            .ok_or_else(|| refuse(format!("--secret {shown:?}: invalid field {field:?}: must be a key=value pair")))?;
        match key.to_ascii_lowercase().as_str() {
            "type" if value == "file" || value == "env" => typ = Some(value.to_owned()),
            "type" => return Err(refuse(format!("--secret {shown:?}: unsupported secret type {value:?}"))),
            "id" => id = Some(value.to_owned()),
            "src" | "source" => file = Some(value.to_owned()),
            "env" => env = Some(value.to_owned()),
            other => {
                return Err(refuse(format!(
                    "--secret {shown:?}: unexpected key {other:?} (id, src, source, env or type)"
                )));
            }
        }
    }
    if typ.as_deref() == Some("env") && env.is_none() {
        env = file.take();
    }
    let id = id
        .filter(|i| !i.is_empty())
        .ok_or_else(|| refuse(format!("--secret {shown:?}: no id (expected id=ID[,src=FILE|,env=VAR])")))?;
    check_id(&id)?;
    let source = match (file, env) {
        (Some(f), Some(e)) => {
            return Err(refuse(format!(
                "--secret id={id}: both a file ({f:?}) and a variable ({e:?}) given; name one"
            )));
        }
        (Some(f), None) if !f.is_empty() => Source::File(PathBuf::from(f)),
        (None, Some(e)) if !e.is_empty() => Source::Env(e),
        (None, None) => Source::ById,
        _ => return Err(refuse(format!("--secret id={id}: an empty src or env"))),
    };
    Ok(SecretFlag { id, source })
}

/// Reads a secret's value; `env` looks a variable up (a parameter, so this
/// is testable). Bounded by `SECRET_BYTES`; the error names the id and the
/// file or variable only.
pub fn read(flag: &SecretFlag, env: impl Fn(&str) -> Option<String>) -> Result<Vec<u8>, SecretError> {
    let id = &flag.id;
    let value = match &flag.source {
        Source::Env(var) => env(var).ok_or_else(|| refuse(format!("--secret id={id}: variable {var} is not set")))?,
        Source::File(path) => return read_file(id, path),
        Source::ById => match env(id) {
            Some(v) => v,
            None => return read_file(id, Path::new(id)),
        },
    }
    .into_bytes();
    check_size(id, value.len())?;
    Ok(value)
}

fn read_file(id: &str, path: &Path) -> Result<Vec<u8>, SecretError> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| refuse(format!("--secret id={id}: reading {path:?}: {e}")))?;
    let mut value = Vec::new();
    file.take(limits::SECRET_BYTES as u64 + 1)
        .read_to_end(&mut value)
        .map_err(|e| refuse(format!("--secret id={id}: reading {path:?}: {e}")))?;
    check_size(id, value.len())?;
    Ok(value)
}

fn check_size(id: &str, len: usize) -> Result<(), SecretError> {
    if len > limits::SECRET_BYTES {
        return Err(refuse(format!(
            "--secret id={id}: larger than the limit of {} KiB (BuildKit's)",
            limits::SECRET_BYTES >> 10
        )));
    }
    Ok(())
}

/// A spec's secret ids: at most `SECRETS`, each valid, none twice.
pub fn check_refs(refs: &[proto::SecretRef]) -> Result<(), SecretError> {
    if refs.len() > limits::SECRETS {
        return Err(refuse(format!("--secret: more than the limit of {} secrets", limits::SECRETS)));
    }
    let mut seen = std::collections::HashSet::new();
    for r in refs {
        check_id(&r.id)?;
        if !seen.insert(r.id.as_str()) {
            return Err(refuse(format!("--secret id={} given twice", r.id)));
        }
    }
    Ok(())
}

/// Secret values sent for a spec's ids: each one of `refs` marked provided,
/// exactly once, within the size limits.
pub fn check_values(refs: &[proto::SecretRef], values: &[proto::SecretValue]) -> Result<(), SecretError> {
    let mut total = 0usize;
    let mut seen = std::collections::HashSet::new();
    for v in values {
        check_id(&v.id)?;
        if !refs.iter().any(|r| r.id == v.id && r.provided) {
            return Err(refuse(format!("secrets: a value for id {} that the spec does not list as provided", v.id)));
        }
        if !seen.insert(v.id.as_str()) {
            return Err(refuse(format!("secrets: id {} given twice", v.id)));
        }
        check_size(&v.id, v.value.len())?;
        total += v.value.len();
    }
    if total > limits::SECRETS_TOTAL_BYTES {
        return Err(refuse(format!(
            "--secret: the values together are larger than the limit of {} MiB",
            limits::SECRETS_TOTAL_BYTES >> 20
        )));
    }
    if let Some(missing) = refs.iter().find(|r| r.provided && !seen.contains(r.id.as_str())) {
        return Err(refuse(format!("secrets: no value for id {}, which the spec lists as provided", missing.id)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flag(raw: &str) -> Result<SecretFlag, String> {
        parse(raw).map_err(|e| e.to_string())
    }

    #[test]
    fn parses_like_buildx() {
        let f = |id: &str, source| SecretFlag { id: id.into(), source };
        assert_eq!(flag("id=tok,src=/a/b").unwrap(), f("tok", Source::File("/a/b".into())));
        assert_eq!(flag("id=tok,source=x").unwrap(), f("tok", Source::File("x".into())));
        assert_eq!(flag("ID=tok,ENV=VAR").unwrap(), f("tok", Source::Env("VAR".into())));
        assert_eq!(flag("id=tok,type=env,src=VAR").unwrap(), f("tok", Source::Env("VAR".into())));
        assert_eq!(flag("type=file,id=tok,src=x").unwrap(), f("tok", Source::File("x".into())));
        assert_eq!(flag("id=tok").unwrap(), f("tok", Source::ById));
        assert_eq!(flag("id=tok,\"src=/a,b\"").unwrap(), f("tok", Source::File("/a,b".into())));
        assert!(flag("src=/a").unwrap_err().contains("no id"));
        assert!(flag("id=").unwrap_err().contains("no id"));
        assert!(flag("id=a,foo=b").unwrap_err().contains("unexpected key \"foo\""));
        assert!(flag("id=a,src").unwrap_err().contains("key=value"));
        assert!(flag("id=a,type=ssh").unwrap_err().contains("unsupported secret type \"ssh\""));
        assert!(flag("id=a,src=f,env=V").unwrap_err().contains("both a file"));
        assert!(flag("id=a b").unwrap_err().contains("--secret id \"a b\""));
        assert!(flag("id=../x").unwrap_err().contains("not starting with"));
        assert!(flag("id=\"a").unwrap_err().contains("quote"));
    }

    #[test]
    fn reads_values_and_never_shows_them() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tok");
        std::fs::write(&file, b"s3cr3t-value").unwrap();
        let env = |k: &str| (k == "VAR").then(|| "from-env".to_owned());
        let read_ = |raw: &str| read(&parse(raw).unwrap(), env);
        assert_eq!(read_(&format!("id=a,src={}", file.display())).unwrap(), b"s3cr3t-value");
        assert_eq!(read_("id=a,env=VAR").unwrap(), b"from-env");
        assert_eq!(read_("id=VAR").unwrap(), b"from-env");
        let e = read_("id=a,env=NOPE").unwrap_err().to_string();
        assert_eq!(e, "--secret id=a: variable NOPE is not set");
        let e = read_("id=nofile").unwrap_err().to_string();
        assert!(e.contains("--secret id=nofile: reading \"nofile\""), "{e}");
        std::fs::write(&file, vec![b'x'; limits::SECRET_BYTES + 1]).unwrap();
        let e = read_(&format!("id=big,src={}", file.display())).unwrap_err().to_string();
        assert_eq!(e, "--secret id=big: larger than the limit of 500 KiB (BuildKit's)");
        std::fs::write(&file, vec![b'x'; limits::SECRET_BYTES]).unwrap();
        assert!(read_(&format!("id=big,src={}", file.display())).is_ok());
    }

    #[test]
    fn values_match_the_spec() {
        let r = |id: &str, provided| proto::SecretRef { id: id.into(), provided };
        let v = |id: &str, n: usize| proto::SecretValue { id: id.into(), value: vec![b'v'; n] };
        assert!(check_values(&[r("a", true), r("b", false)], &[v("a", 3)]).is_ok());
        let e = check_values(&[r("a", true)], &[]).unwrap_err().to_string();
        assert!(e.contains("no value for id a"), "{e}");
        assert!(check_values(&[r("a", false)], &[v("a", 1)]).unwrap_err().to_string().contains("does not list"));
        assert!(check_values(&[r("a", true)], &[v("a", 1), v("a", 1)]).unwrap_err().to_string().contains("twice"));
        let big = check_values(&[r("a", true)], &[v("a", limits::SECRET_BYTES + 1)]).unwrap_err().to_string();
        assert!(big.contains("id=a: larger than"), "{big}");
        let refs: Vec<_> = (0..10).map(|i| r(&format!("s{i}"), true)).collect();
        let values: Vec<_> = (0..10).map(|i| v(&format!("s{i}"), limits::SECRET_BYTES)).collect();
        assert!(check_values(&refs, &values).unwrap_err().to_string().contains("together"));
        let many: Vec<_> = (0..=limits::SECRETS).map(|i| r(&format!("s{i}"), true)).collect();
        assert!(check_refs(&many).unwrap_err().to_string().contains("more than the limit of 64"));
        assert!(check_refs(&[r("a", true), r("a", false)]).unwrap_err().to_string().contains("twice"));
    }
}
