//! Where a build's result goes (`--push`, `--output`, `--load`, `--format`),
//! checked before anything is uploaded; and the local outputs, written
//! from the coordinator's Export stream once the build has succeeded.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use futures::StreamExt;

use braid_shared::oci::docker_archive;
use braid_shared::proto;
use braid_shared::{ImageRef, Platform, engine};

use crate::conn::Builds;

/// The outputs of one build.
#[derive(Debug, PartialEq)]
pub struct Outputs {
    pub push: bool,
    /// Image names from `type=image|registry,name=...`, tags like `-t`'s.
    pub names: Vec<String>,
    pub local: Option<Local>,
    /// Media types: "oci" or "docker".
    pub format: String,
}

#[derive(Debug, PartialEq)]
pub enum Local {
    /// One OCI image layout, as a tar at this path ("-": standard output).
    OciTar(PathBuf),
    /// One OCI image layout, as a directory.
    OciDir(PathBuf),
    /// A `docker load` archive of the build's one platform.
    DockerTar(PathBuf),
    /// The image for this host, loaded into the local Docker Engine or podman.
    Load { platform: Platform },
}

impl Outputs {
    /// Whether agents upload their images to the coordinator.
    pub fn exports(&self) -> bool {
        self.local.is_some()
    }
}

/// Parses the output flags as buildx reads them; refuses unsupported,
/// incomplete or conflicting ones.
pub fn parse(
    outputs: &[String],
    push_flag: bool,
    load_flag: bool,
    format_flag: Option<&str>,
    platforms: &[String],
) -> anyhow::Result<Outputs> {
    let mut push = push_flag;
    let mut names = Vec::new();
    let mut local = None;
    let mut format = format_flag.map(str::to_owned);
    let set_local = |new: Local, local: &mut Option<Local>| -> anyhow::Result<()> {
        if local.is_some() {
            bail!(
                "conflicting outputs: a braid build writes at most one local output (type=oci, type=docker or --load)"
            );
        }
        *local = Some(new);
        Ok(())
    };
    for spec in outputs {
        if !spec.contains('=') {
            bail!("invalid --output {spec:?}: type=local is not supported: use type=oci,dest={spec}");
        }
        let mut fields: HashMap<String, String> = HashMap::new();
        for part in csv_fields(spec)? {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("invalid --output {spec:?}: expected key=value pairs"))?;
            fields.insert(k.trim().to_owned(), v.trim().to_owned());
        }
        let fields: HashMap<&str, &str> = fields.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let known: Option<&[&str]> = match fields.get("type").copied() {
            Some("registry" | "image") => Some(&["type", "push", "oci-mediatypes", "name"]),
            Some("oci") => Some(&["type", "dest", "tar", "oci-mediatypes"]),
            Some("docker") => Some(&["type", "dest"]),
            _ => None,
        };
        if let (Some(known), Some(kind)) = (known, fields.get("type")) {
            let mut unknown: Vec<&str> = fields.keys().copied().filter(|k| !known.contains(k)).collect();
            unknown.sort_unstable();
            if let Some(key) = unknown.first() {
                bail!(
                    "--output type={kind}: the {key}= attribute is not supported by braid (it takes {})",
                    known.join(", ")
                );
            }
        }
        if let Some(v) = fields.get("oci-mediatypes") {
            let wanted = if *v == "false" { "docker" } else { "oci" };
            if format.as_deref().is_some_and(|f| f != wanted) {
                bail!("conflicting formats: --output oci-mediatypes={v} and --format {}", format.unwrap_or_default());
            }
            format = Some(wanted.to_owned());
        }
        let dest = fields.get("dest").filter(|d| !d.is_empty()).map(PathBuf::from);
        if let Some(list) = fields.get("name") {
            names.extend(list.split(',').map(str::trim).filter(|n| !n.is_empty()).map(str::to_owned));
        }
        match fields.get("type").copied() {
            Some("registry") => push = true,
            Some("image") => push |= fields.get("push").is_some_and(|v| *v == "true"),
            Some("oci") => {
                let dest =
                    dest.ok_or_else(|| anyhow::anyhow!("--output type=oci needs dest=FILE (or dest=DIR,tar=false)"))?;
                match fields.get("tar").copied() {
                    Some("false") => {
                        if dest.as_os_str() == "-" {
                            bail!("--output type=oci,tar=false needs a directory as dest, not \"-\"");
                        }
                        set_local(Local::OciDir(dest), &mut local)?;
                    }
                    None | Some("true") => set_local(Local::OciTar(dest), &mut local)?,
                    Some(other) => bail!("invalid --output {spec:?}: tar={other} is not true or false"),
                }
            }
            Some("docker") => match dest {
                Some(dest) => {
                    if platforms.len() != 1 {
                        bail!(
                            "--output type=docker,dest= writes one platform's image: build one --platform, \
                             or use type=oci for several"
                        );
                    }
                    set_local(Local::DockerTar(dest), &mut local)?;
                }
                None => set_local(Local::Load { platform: load_platform(platforms)? }, &mut local)?,
            },
            Some(other @ ("tar" | "local")) => {
                bail!("--output type={other} is not supported: braid builds images; use type=oci or type=docker")
            }
            Some(other) => bail!("invalid --output {spec:?}: unknown type {other:?}"),
            None => bail!("invalid --output {spec:?}: type= is required"),
        }
    }
    if load_flag {
        set_local(Local::Load { platform: load_platform(platforms)? }, &mut local)?;
    }
    let format = format.unwrap_or_else(|| "oci".to_owned());
    if !matches!(format.as_str(), "oci" | "docker") {
        bail!("invalid --format {format:?}: oci or docker");
    }
    Ok(Outputs { push, names, local, format })
}

/// An `--output` value's comma-separated fields, as buildx reads them (CSV:
/// `"name=a,b"` in double quotes is one field).
fn csv_fields(spec: &str) -> anyhow::Result<Vec<String>> {
    braid_shared::csv::fields(spec).map_err(|e| anyhow::anyhow!("invalid --output {spec:?}: {e}"))
}

/// The platform `--load` loads: a one-platform build's, else this host's,
/// or one it runs (containerd's rules).
fn load_platform(platforms: &[String]) -> anyhow::Result<Platform> {
    let host = Platform::host();
    let parsed: Vec<Platform> = platforms.iter().filter_map(|p| p.parse().ok()).collect();
    // One platform is loaded whatever it is, as buildx does (the Engine
    // keeps images of any architecture).
    if let [only] = parsed.as_slice() {
        return Ok(only.clone());
    }
    parsed.iter().find(|p| **p == host).or_else(|| parsed.iter().find(|p| host.matches(p))).cloned().ok_or_else(|| {
        anyhow::anyhow!(
            "--load loads the image for this host ({host}), and the build has none it runs ({}): add --platform {host}",
            platforms.join(",")
        )
    })
}

/// Where `--load` puts the image.
#[derive(Debug)]
pub enum Store {
    Engine(String),
    Podman,
}

/// Finds the local image store before the build starts, so a missing one
/// fails first: the Docker Engine (`DOCKER_HOST` or the default socket),
/// else podman.
pub async fn find_store() -> anyhow::Result<Store> {
    let host = engine::resolve_host("");
    let engine_error = match engine::connect(&host).await {
        Ok(_) => return Ok(Store::Engine(host)),
        Err(e) => e,
    };
    let podman = std::process::Command::new("podman").arg("--version").output();
    if podman.is_ok_and(|o| o.status.success()) {
        crate::diag::warn(&format!("--load: {engine_error}; loading into podman's store instead"));
        return Ok(Store::Podman);
    }
    bail!("--load needs a local Docker Engine or podman: {engine_error}, and podman is not installed")
}

/// Streams the build's layout (or one platform's) into `out`.
async fn export(
    client: &mut Builds,
    build_id: &str,
    platform: Option<&Platform>,
    out: &mut impl Write,
) -> anyhow::Result<u64> {
    let request = proto::ExportRequest {
        build_id: build_id.to_owned(),
        platform: platform.map(ToString::to_string).unwrap_or_default(),
    };
    let mut stream = client.export(request).await?.into_inner();
    let mut bytes = 0;
    while let Some(chunk) = stream.message().await? {
        bytes += chunk.chunk.len() as u64;
        out.write_all(&chunk.chunk)?;
    }
    out.flush()?;
    Ok(bytes)
}

/// Export attempts: a coordinator restart mid-stream is retried from the
/// start (the images are on its disk and survive it).
const EXPORT_ATTEMPTS: u32 = 5;

/// Streams the layout into `file`, from the start again after a dropped
/// connection; leaves the file positioned at its start.
async fn export_to_file(
    client: &mut Builds,
    build_id: &str,
    platform: Option<&Platform>,
    file: &mut std::fs::File,
) -> anyhow::Result<u64> {
    use std::io::Seek;
    let mut attempt = 1;
    loop {
        file.set_len(0)?;
        file.rewind()?;
        let exported = export(client, build_id, platform, &mut std::io::BufWriter::new(&mut *file)).await;
        match exported {
            Ok(bytes) => {
                file.rewind()?;
                return Ok(bytes);
            }
            Err(e) if attempt < EXPORT_ATTEMPTS && retryable(&e) => {
                crate::diag::warn(&format!("export interrupted ({e}); retrying"));
                tokio::time::sleep(std::time::Duration::from_secs(u64::from(attempt))).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

fn retryable(e: &anyhow::Error) -> bool {
    e.downcast_ref::<tonic::Status>()
        .is_some_and(|s| matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal))
}

/// A file written whole or not at all: to a temporary file beside it,
/// renamed into place once complete, readable by others as a plain file
/// would be (temporary files start private).
fn temp_beside(dest: &Path) -> anyhow::Result<tempfile::NamedTempFile> {
    use std::os::unix::fs::PermissionsExt;
    let dir = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let temp = tempfile::NamedTempFile::new_in(dir).with_context(|| format!("creating a file in {}", dir.display()))?;
    temp.as_file().set_permissions(std::fs::Permissions::from_mode(0o644))?;
    Ok(temp)
}

/// Writes the local output of a succeeded build.
pub async fn write_local(
    client: &mut Builds,
    build: &proto::Build,
    local: &Local,
    store: Option<&Store>,
    say: &impl Fn(String),
) -> anyhow::Result<()> {
    let id = &build.build_id;
    match local {
        Local::OciTar(dest) if dest.as_os_str() == "-" => {
            let mut temp = tempfile::tempfile()?;
            export_to_file(client, id, None, &mut temp).await?;
            let mut stdout = std::io::stdout().lock();
            std::io::copy(&mut temp, &mut stdout)?;
            stdout.flush()?;
        }
        Local::OciTar(dest) => {
            let mut temp = temp_beside(dest)?;
            let bytes = export_to_file(client, id, None, temp.as_file_mut()).await?;
            temp.persist(dest).with_context(|| format!("writing {}", dest.display()))?;
            say(format!("#3 wrote the OCI layout to {} ({bytes} bytes)", dest.display()));
        }
        Local::OciDir(dest) => {
            let mut temp = tempfile::tempfile()?;
            export_to_file(client, id, None, &mut temp).await?;
            unpack(temp, dest)?;
            say(format!("#3 wrote the OCI layout to {}/", dest.display()));
        }
        Local::DockerTar(dest) => {
            let platform: Platform = build.jobs.first().map(|j| j.platform.as_str()).unwrap_or_default().parse()?;
            let mut temp = temp_beside(dest)?;
            docker_archive_of(client, build, &platform, temp.as_file_mut()).await?;
            temp.persist(dest).with_context(|| format!("writing {}", dest.display()))?;
            say(format!("#3 wrote the {platform} image for docker load to {}", dest.display()));
        }
        Local::Load { platform } => {
            let mut archive = tempfile::NamedTempFile::new()?;
            docker_archive_of(client, build, platform, archive.as_file_mut()).await?;
            let loaded = match store {
                Some(Store::Engine(host)) => load_into_engine(host, archive.path()).await?,
                Some(Store::Podman) => load_into_podman(archive.path())?,
                None => bail!("no local image store was found"),
            };
            say(format!("#3 loaded the {platform} image: {loaded}"));
        }
    }
    Ok(())
}

/// Unpacks a layout tar (positioned at its start) into `dest`.
fn unpack(tar: std::fs::File, dest: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    let mut archive = tar::Archive::new(tar);
    archive.set_overwrite(true);
    archive.unpack(dest).with_context(|| format!("writing the layout to {}", dest.display()))
}

/// One platform's image as a `docker load` archive with the build's tags.
async fn docker_archive_of(
    client: &mut Builds,
    build: &proto::Build,
    platform: &Platform,
    out: &mut std::fs::File,
) -> anyhow::Result<()> {
    let mut layout_tar = tempfile::tempfile()?;
    export_to_file(client, &build.build_id, Some(platform), &mut layout_tar).await?;
    let layout = tempfile::tempdir()?;
    unpack(layout_tar, layout.path())?;
    let tags: Vec<String> = build
        .spec
        .as_ref()
        .map(|s| {
            s.tags.iter().filter_map(|t| t.parse::<ImageRef>().ok()).map(|t| t.with_default_tag().to_string()).collect()
        })
        .unwrap_or_default();
    Ok(docker_archive(layout.path(), &tags, out)?)
}

async fn load_into_engine(host: &str, archive: &Path) -> anyhow::Result<String> {
    let docker = engine::connect(host).await?;
    let file = tokio::fs::File::open(archive).await?;
    let body = bollard::body_try_stream(tokio_util::io::ReaderStream::new(file));
    let options = bollard::query_parameters::ImportImageOptions { quiet: true, ..Default::default() };
    let mut stream = docker.import_image(options, body, None);
    let mut said = Vec::new();
    while let Some(item) = stream.next().await {
        let info = item.map_err(|e| anyhow::anyhow!("loading into the Docker Engine at {host}: {e}"))?;
        if let Some(detail) = info.error_detail {
            bail!("loading into the Docker Engine at {host}: {}", detail.message.unwrap_or_default());
        }
        if let Some(line) = info.stream.filter(|l| !l.trim().is_empty()) {
            said.push(line.trim().to_owned());
        }
    }
    Ok(said.join("; "))
}

fn load_into_podman(archive: &Path) -> anyhow::Result<String> {
    let out = std::process::Command::new("podman")
        .arg("load")
        .arg("--input")
        .arg(archive)
        .output()
        .context("running podman load")?;
    if !out.status.success() {
        bail!("podman load failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().replace('\n', "; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(
        outputs: &[&str],
        push: bool,
        load: bool,
        format: Option<&str>,
        platforms: &[&str],
    ) -> anyhow::Result<Outputs> {
        let outputs: Vec<String> = outputs.iter().map(|s| s.to_string()).collect();
        let platforms: Vec<String> = platforms.iter().map(|s| s.to_string()).collect();
        parse(&outputs, push, load, format, &platforms)
    }

    #[test]
    fn reads_buildx_output_specs() {
        let all = ["linux/amd64", "linux/arm64"];
        assert!(p(&["type=registry"], false, false, None, &all).unwrap().push);
        let o = p(&["type=image,\"name=r.io/a:1,r.io/a:latest\",push=true"], false, false, None, &all).unwrap();
        assert_eq!(o.names, ["r.io/a:1", "r.io/a:latest"], "names in quotes, as buildx takes them");
        assert!(o.push);
        assert!(p(&["type=image,push=true"], false, false, None, &all).unwrap().push);
        assert!(!p(&["type=image"], false, false, None, &all).unwrap().push);
        let o = p(&["type=oci,dest=out.tar"], false, false, None, &all).unwrap();
        assert_eq!(o.local, Some(Local::OciTar("out.tar".into())));
        assert!(!o.push && o.exports() && o.format == "oci");
        let o = p(&["type=oci,dest=out,tar=false"], true, false, None, &all).unwrap();
        assert_eq!(o.local, Some(Local::OciDir("out".into())));
        assert!(o.push, "--push and a local output together");
        let o = p(&["type=registry,oci-mediatypes=false"], false, false, None, &all).unwrap();
        assert_eq!(o.format, "docker");
        assert_eq!(p(&[], true, false, Some("docker"), &all).unwrap().format, "docker");
        let o = p(&[], false, true, None, &[&Platform::host().to_string(), "linux/riscv64"]).unwrap();
        assert_eq!(o.local, Some(Local::Load { platform: Platform::host() }));
        let o = p(&[], false, true, None, &["linux/riscv64"]).unwrap();
        assert_eq!(
            o.local,
            Some(Local::Load { platform: "linux/riscv64".parse().unwrap() }),
            "one platform, whatever it is"
        );
        let o = p(&["type=docker,dest=img.tar"], false, false, None, &["linux/arm64"]).unwrap();
        assert_eq!(o.local, Some(Local::DockerTar("img.tar".into())));
    }

    #[test]
    fn refuses_incomplete_and_conflicting_outputs() {
        let all = ["linux/amd64", "linux/arm64"];
        let cases: Vec<(anyhow::Result<Outputs>, &str)> = vec![
            (p(&["type=oci"], false, false, None, &all), "needs dest=FILE"),
            (p(&["type=oci,dest=-,tar=false"], false, false, None, &all), "needs a directory"),
            (p(&["type=oci,dest=a", "type=oci,dest=b"], false, false, None, &all), "at most one local output"),
            (p(&["type=oci,dest=a"], false, true, None, &all), "at most one local output"),
            (p(&["type=docker,dest=a"], false, false, None, &all), "one platform's image"),
            (p(&[], false, true, None, &["linux/riscv64", "linux/s390x"]), "--load loads the image for this host"),
            (p(&["type=local,dest=x"], false, false, None, &all), "type=local is not supported"),
            (p(&["out"], false, false, None, &all), "type=local is not supported"),
            (p(&["type=tar,dest=x"], false, false, None, &all), "type=tar is not supported"),
            (p(&["type=cacheonly"], false, false, None, &all), "unknown type"),
            (p(&["dest=x"], false, false, None, &all), "type= is required"),
            (p(&["type=oci,dest=a,tar=maybe"], false, false, None, &all), "tar=maybe"),
            (p(&[], false, false, Some("v2s1"), &all), "invalid --format"),
            (p(&["type=registry,oci-mediatypes=false"], false, false, Some("oci"), &all), "conflicting formats"),
            (p(&["type=image,\"name=x"], false, false, None, &all), "extraneous or missing \" in quoted-field"),
            (
                p(&["type=oci,dest=a,compression=zstd"], false, false, None, &all),
                "compression= attribute is not supported",
            ),
            (
                p(&["type=docker,dest=a,push=true"], false, false, None, &["linux/amd64"]),
                "push= attribute is not supported",
            ),
        ];
        for (result, want) in cases {
            let e = result.unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} does not say {want:?}");
        }
    }
}
