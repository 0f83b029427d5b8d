//! The `braid builds` table: narrow by default (a platform count and the
//! first tag, shortened), every platform and tag whole with `--wide`.

use braid_shared::proto;

use crate::describe::build_state_name;

/// Characters of a tag the narrow table shows.
const TAG_CHARS: usize = 26;

/// The table `braid builds` prints, header first, one line per build.
pub fn builds_table(builds: &[proto::Build], wide: bool) -> String {
    let mut out = if wide {
        format!("{:<32} {:<10} {:<30} TAGS\n", "BUILD", "STATE", "PLATFORMS")
    } else {
        format!("{:<32} {:<10} {:<9} TAG\n", "BUILD", "STATE", "PLATFORMS")
    };
    for b in builds {
        let spec = b.spec.clone().unwrap_or_default();
        let state = build_state_name(b.state);
        let line = if wide {
            let tags = if spec.tags.is_empty() { "-".to_owned() } else { spec.tags.join(",") };
            format!("{:<32} {:<10} {:<30} {}", b.build_id, state, spec.platforms.join(","), tags)
        } else {
            let mut tag = spec.tags.first().map_or_else(|| "-".to_owned(), |t| tail(t, TAG_CHARS));
            if spec.tags.len() > 1 {
                tag.push_str(&format!(" (+{})", spec.tags.len() - 1));
            }
            format!("{:<32} {:<10} {:<9} {}", b.build_id, state, spec.platforms.len(), tag)
        };
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The last `max` characters of `s`, after "…" if it was cut.
fn tail(s: &str, max: usize) -> String {
    let count = s.chars().count();
    if count <= max {
        return s.to_owned();
    }
    let kept: String = s.chars().skip(count - (max - 1)).collect();
    format!("…{kept}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(id: &str, platforms: &[&str], tags: &[&str]) -> proto::Build {
        proto::Build {
            build_id: id.into(),
            state: proto::BuildState::Running as i32,
            spec: Some(proto::BuildSpec {
                platforms: platforms.iter().map(|p| (*p).to_owned()).collect(),
                tags: tags.iter().map(|t| (*t).to_owned()).collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    const LONG_TAG: &str = "registry.example.com:5000/team/some-long-repository/app:2026-12-02";

    #[test]
    fn the_narrow_table_counts_platforms_and_shortens_the_first_tag() {
        let builds = [
            build("b1", &["linux/amd64", "linux/arm64", "linux/arm/v7"], &[LONG_TAG, "r/app:latest"]),
            build("b2", &["linux/amd64"], &[]),
            build("b3", &["linux/amd64"], &["r/é:1".repeat(8).as_str()]),
        ];
        let table = builds_table(&builds, false);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("BUILD") && lines[0].ends_with("TAG"), "{table}");
        assert!(lines[1].contains(" 3 ") && lines[1].ends_with("…repository/app:2026-12-02 (+1)"), "{table}");
        assert!(lines[2].ends_with(" -"), "{table}");
        assert!(lines[3].contains('…'), "a multi-byte tag is cut on a character: {table}");
    }

    #[test]
    fn the_wide_table_shows_every_platform_and_tag_whole() {
        let builds = [build("b1", &["linux/amd64", "linux/arm64", "linux/arm/v7"], &[LONG_TAG, "r/app:latest"])];
        let table = builds_table(&builds, true);
        let line = table.lines().nth(1).unwrap();
        assert!(table.lines().next().unwrap().ends_with("TAGS"), "{table}");
        assert!(line.contains("linux/amd64,linux/arm64,linux/arm/v7"), "{table}");
        assert!(line.ends_with(&format!("{LONG_TAG},r/app:latest")), "{table}");
        assert!(!line.contains('…'), "{table}");
    }
}
