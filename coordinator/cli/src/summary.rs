//! What a finished `braid build` leaves behind: one line per platform and
//! the index digest, and the files buildx writes (`--metadata-file` with
//! buildx's keys, `--iidfile`).

use std::collections::BTreeMap;

use anyhow::Context as _;
use braid_shared::proto;

use crate::conn::Conn;
use crate::describe::seconds;
use crate::progress::Mode;

/// `--iidfile`: the index digest, as buildx writes for a multi-platform build.
pub fn write_iidfile(path: &std::path::Path, build: &proto::Build) -> anyhow::Result<()> {
    if build.index_digest.is_empty() {
        crate::diag::warn(&format!(
            "--iidfile {path:?} not written: the build made no image index (no --push, --output or --load)"
        ));
        return Ok(());
    }
    std::fs::write(path, &build.index_digest).with_context(|| format!("writing --iidfile {path:?}"))
}

/// The metadata file's `buildx.build.ref`: the coordinator (its URL
/// without scheme or trailing slash) and the build id, as buildx's
/// `BUILDER/NODE/REF` names where a build ran.
pub fn build_ref(conn: &Conn, build_id: &str) -> String {
    let url = conn.url.trim_end_matches('/');
    let host = url.split_once("://").map_or(url, |(_, rest)| rest);
    format!("{host}/{build_id}")
}

/// `buildx.build.provenance` keys of the metadata file, read back from the
/// registry when the build made provenance (a warning if they cannot be).
pub async fn provenance_metadata(build: &proto::Build) -> Vec<(String, serde_json::Value)> {
    let Some(spec) = build.spec.as_ref().filter(|s| !s.provenance_mode.is_empty()) else { return Vec::new() };
    let (Some(tag), Ok(digest)) = (spec.tags.first(), build.index_digest.parse::<braid_shared::Digest>()) else {
        return Vec::new();
    };
    let Ok(tag) = tag.parse::<braid_shared::ImageRef>() else { return Vec::new() };
    match crate::imagetools::verify::metadata(&tag.at_digest(&digest)).await {
        Ok(keys) => keys,
        Err(e) => {
            crate::diag::warn(&format!("--metadata-file: buildx.build.provenance not written: {e:#}"));
            Vec::new()
        }
    }
}

/// One line per platform and the index; the metadata file like buildx's.
pub fn summarize(
    build: &proto::Build,
    progress: Mode,
    metadata_file: Option<&std::path::Path>,
    stdout_taken: bool,
    build_ref: &str,
    provenance: Vec<(String, serde_json::Value)>,
) -> anyhow::Result<()> {
    if matches!(progress, Mode::Plain | Mode::Tty) {
        for job in &build.jobs {
            let digest = job.result.as_ref().map(|r| r.digest.as_str()).unwrap_or("-");
            let how = if job.emulated { "emulated" } else { "native" };
            errln!(
                "{:<16} {:<20} {:<8} {:>7.1}s  {}",
                job.platform,
                if job.agent.is_empty() { "-" } else { &job.agent },
                how,
                seconds(job),
                digest
            );
        }
    }
    if !build.index_digest.is_empty() {
        let line =
            if progress == Mode::Quiet { build.index_digest.clone() } else { format!("index {}", build.index_digest) };
        // Printed whatever became of standard output: the build's files
        // (metadata, --iidfile, a local output) are still written.
        if stdout_taken {
            errln!("{line}");
        } else {
            crate::out::try_stdout(format_args!("{line}\n"));
        }
    }
    if let Some(path) = metadata_file {
        let mut platforms = BTreeMap::new();
        for job in &build.jobs {
            platforms.insert(
                job.platform.clone(),
                serde_json::json!({
                    "digest": job.result.as_ref().map(|r| r.digest.clone()).unwrap_or_default(),
                    "agent": job.agent,
                    "seconds": (seconds(job) * 1000.0).round() / 1000.0,
                    "emulated": job.emulated,
                }),
            );
        }
        let mut meta = serde_json::Map::new();
        meta.insert("braid.build.id".into(), build.build_id.clone().into());
        meta.insert("braid.platforms".into(), serde_json::to_value(platforms)?);
        meta.insert("buildx.build.ref".into(), build_ref.into());
        // As buildx: the config digest of a one-platform build's image.
        if let [job] = build.jobs.as_slice()
            && let Some(config) = job.result.as_ref().map(|r| &r.config_digest).filter(|c| !c.is_empty())
        {
            meta.insert("containerimage.config.digest".into(), config.clone().into());
        }
        if !build.index_digest.is_empty() {
            meta.insert(
                "containerimage.descriptor".into(),
                serde_json::json!({
                    "mediaType": build.index_media_type,
                    "digest": build.index_digest,
                    "size": build.index_size,
                }),
            );
            meta.insert("containerimage.digest".into(), build.index_digest.clone().into());
        }
        if let Some(spec) = &build.spec
            && !spec.tags.is_empty()
        {
            meta.insert("image.name".into(), spec.tags.join(",").into());
        }
        meta.extend(provenance);
        std::fs::write(path, serde_json::to_vec_pretty(&meta)?)
            .with_context(|| format!("writing the metadata file {path:?}"))?;
    }
    Ok(())
}
