//! `braid build`'s flags that become fields of the build spec, parsed as
//! buildx parses them: build args, labels, platforms and annotations (with
//! the index annotations buildx adds by default).

use std::collections::HashMap;

use anyhow::bail;
use braid_shared::Platform;
use braid_shared::proto;

/// `--build-arg KEY` takes KEY's value from the environment, and is left out
/// when KEY is unset, as docker does.
pub(crate) fn parse_build_args(raw: &[String]) -> anyhow::Result<HashMap<String, String>> {
    let mut out = HashMap::new();
    for arg in raw {
        match arg.split_once('=') {
            Some((k, v)) => {
                out.insert(k.to_owned(), v.to_owned());
            }
            None => {
                if let Ok(v) = std::env::var(arg) {
                    out.insert(arg.clone(), v);
                }
            }
        }
    }
    Ok(out)
}

pub(crate) fn parse_labels(raw: &[String]) -> anyhow::Result<HashMap<String, String>> {
    raw.iter()
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap_or((l.as_str(), ""));
            if k.is_empty() {
                bail!("invalid label {l:?}: expected KEY=VALUE");
            }
            Ok((k.to_owned(), v.to_owned()))
        })
        .collect()
}

pub(crate) fn platforms(raw: &[String]) -> anyhow::Result<Vec<String>> {
    if raw.is_empty() {
        return Ok(vec![Platform::host().to_string()]);
    }
    let mut out = Vec::new();
    for list in raw {
        for p in braid_shared::platform::parse_list(list)? {
            out.push(p.to_string());
        }
    }
    Ok(out)
}

/// buildx's `--annotation` syntax: `[level[,level][[platform]]:]key=value`.
pub(crate) fn parse_annotations(raw: &[String]) -> anyhow::Result<Vec<proto::Annotation>> {
    let mut out = Vec::new();
    for a in raw {
        let eq = a.find('=').ok_or_else(|| anyhow::anyhow!("invalid annotation {a:?}: expected KEY=VALUE"))?;
        let (head, value) = (&a[..eq], &a[eq + 1..]);
        let (levels, key) = match head.rfind(':') {
            Some(i) if head[..i].chars().all(|c| c.is_ascii_alphanumeric() || "-,[]/".contains(c)) => {
                (&head[..i], &head[i + 1..])
            }
            _ => ("manifest", head),
        };
        for level in levels.split(',') {
            let (level, platform) = match level.split_once('[') {
                Some((l, rest)) => {
                    (l, rest.strip_suffix(']').ok_or_else(|| anyhow::anyhow!("invalid annotation {a:?}"))?)
                }
                None => (level, ""),
            };
            out.push(proto::Annotation {
                level: level.to_owned(),
                platform: platform.to_owned(),
                key: key.to_owned(),
                value: value.to_owned(),
            });
        }
    }
    Ok(out)
}

/// Index annotations buildx-style defaults add: creation time, and the
/// source and revision of the context's git checkout, unless given.
pub(crate) fn default_annotations(context: &std::path::Path, given: &[proto::Annotation]) -> Vec<proto::Annotation> {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(context)
            .args(args)
            .stderr(std::process::Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .filter(|s| !s.is_empty())
    };
    let created = time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).ok();
    let source = git(&["config", "--get", "remote.origin.url"]).map(|url| strip_userinfo(&url));
    let revision = git(&["rev-parse", "HEAD"]);
    [
        ("org.opencontainers.image.created", created),
        ("org.opencontainers.image.source", source),
        ("org.opencontainers.image.revision", revision),
    ]
    .into_iter()
    .filter(|(key, _)| !given.iter().any(|a| a.level == "index" && a.key == *key))
    .filter_map(|(key, value)| {
        Some(proto::Annotation { level: "index".into(), platform: String::new(), key: key.into(), value: value? })
    })
    .collect()
}

/// A remote URL without credentials (`https://user:token@host/x` -> `https://host/x`).
fn strip_userinfo(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            if path.is_empty() { format!("{scheme}://{host}") } else { format!("{scheme}://{host}/{path}") }
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotations_parse_like_buildx() {
        let a = parse_annotations(&[
            "org.example.a=1".into(),
            "index:org.example.b=2".into(),
            "manifest[linux/arm64]:org.example.c=x=y".into(),
            "index,manifest-descriptor:org.example.d=4".into(),
        ])
        .unwrap();
        let flat: Vec<(&str, &str, &str, &str)> =
            a.iter().map(|a| (a.level.as_str(), a.platform.as_str(), a.key.as_str(), a.value.as_str())).collect();
        assert_eq!(
            flat,
            [
                ("manifest", "", "org.example.a", "1"),
                ("index", "", "org.example.b", "2"),
                ("manifest", "linux/arm64", "org.example.c", "x=y"),
                ("index", "", "org.example.d", "4"),
                ("manifest-descriptor", "", "org.example.d", "4"),
            ]
        );
        assert!(parse_annotations(&["novalue".into()]).is_err());
    }

    #[test]
    fn userinfo_is_stripped_from_git_urls() {
        assert_eq!(strip_userinfo("https://u:tok@github.com/o/r.git"), "https://github.com/o/r.git");
        assert_eq!(strip_userinfo("git@github.com:o/r.git"), "git@github.com:o/r.git");
    }
}
