//! `braid build`: `docker buildx build`'s flags, one build across the farm.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context as _, bail};
use braid_shared::Platform;
use braid_shared::proto::{self, build_event::Kind};

use crate::buildspec::{default_annotations, parse_annotations, parse_build_args, parse_labels, platforms};
use crate::conn::{Builds, Conn};
use crate::describe;
use crate::output;
use crate::progress::{Mode, Printer};
use crate::reconnect::{self, Patience};
use crate::summary;
use crate::upload::{self, DockerfileSource};

#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// Target platforms, comma-separated or repeated [default: this host's]; one no agent has ever declared
    /// (natively, or by emulation with --allow-emulation) is refused at once, naming the farm's platforms
    #[arg(long = "platform", value_name = "PLATFORMS")]
    platforms: Vec<String>,
    /// Image name and tag, e.g. registry:5000/app:1 (repeatable)
    #[arg(short = 't', long = "tag", value_name = "NAME")]
    tags: Vec<String>,
    /// Dockerfile, relative to the working directory (to the context's root for a git or http(s) context); "-"
    /// reads stdin [default: PATH/Dockerfile]
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    file: Option<String>,
    /// Build-time variable KEY=VALUE, or KEY to take its value from the environment (repeatable)
    #[arg(long = "build-arg", value_name = "KEY[=VALUE]")]
    build_args: Vec<String>,
    /// Build this stage of a multi-stage Dockerfile
    #[arg(long, value_name = "STAGE")]
    target: Option<String>,
    /// Image label KEY=VALUE (repeatable)
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// Do not use the builders' caches
    #[arg(long)]
    no_cache: bool,
    /// Push every platform and the multi-platform index under the tags
    #[arg(long)]
    push: bool,
    /// Output, as buildx: type=registry (the same as --push), type=image[,push=true][,name=NAME],
    /// type=oci,dest=FILE (dest=- for stdout; dest=DIR,tar=false for a directory),
    /// type=docker (the same as --load) or type=docker,dest=FILE (one platform)
    #[arg(short = 'o', long = "output", value_name = "SPEC")]
    outputs: Vec<String>,
    /// Load the image into the local Docker Engine (DOCKER_HOST) or podman: a one-platform
    /// build's, or of several platforms this host's
    #[arg(long)]
    load: bool,
    /// Media types: oci (OCI image index and manifests) or docker (Docker manifest list and
    /// schema 2 manifests, for registries that take nothing else) [default: oci]
    #[arg(long, value_name = "FORMAT", value_parser = ["oci", "docker"])]
    format: Option<String>,
    /// Add an annotation: [index|manifest|manifest-descriptor[PLATFORM]:]KEY=VALUE (repeatable; default level manifest)
    #[arg(long = "annotation", value_name = "ANNOTATION")]
    annotations: Vec<String>,
    /// Let a platform no agent builds natively go to an agent that emulates it (QEMU, slow)
    #[arg(long)]
    allow_emulation: bool,
    /// Fail the build if it has not finished within this time, e.g. 90s, 20m, 1h30m (up to 7d); also how long
    /// braid keeps reconnecting to a coordinator that went away while following (10m without --timeout)
    #[arg(long, value_name = "DURATION", value_parser = braid_shared::duration::build_timeout)]
    timeout: Option<u32>,
    /// Submit and print the build id without following it (Ctrl-C or SIGTERM then does not cancel)
    #[arg(long)]
    detach: bool,
    /// Write the build result metadata (buildx's keys) to FILE
    #[arg(long, value_name = "FILE")]
    metadata_file: Option<PathBuf>,
    /// Progress output: auto (tty on a terminal, else plain), tty (a live view per platform), plain (log
    /// lines prefixed by platform, each step's time), rawjson (one JSON event per line) or quiet
    #[arg(long, value_name = "TYPE", default_value = "auto",
        value_parser = ["auto", "tty", "plain", "rawjson", "quiet"])]
    progress: String,
    /// Always fetch the base images, even when the agent's builder has a copy
    #[arg(long)]
    pull: bool,
    /// Networking of RUN steps: default, none or host (none needs a Docker Engine agent or buildah with
    /// isolation oci; an agent may refuse host)
    #[arg(long, value_name = "MODE", value_parser = braid_shared::buildflags::NETWORKS)]
    network: Option<String>,
    /// Add a host-to-IP mapping to /etc/hosts of RUN steps, HOST:IP (repeatable)
    #[arg(long = "add-host", value_name = "HOST:IP")]
    add_hosts: Vec<String>,
    /// Resource limit of RUN steps, TYPE=SOFT[:HARD] with docker's names (nofile, nproc, ...; repeatable;
    /// buildah and podman agents; refused at submit where only Docker Engine agents serve a platform)
    #[arg(long = "ulimit", value_name = "ULIMIT")]
    ulimits: Vec<String>,
    /// Size of /dev/shm of RUN steps, e.g. 64m or 1g (a Docker Engine agent or buildah with isolation oci)
    #[arg(long, value_name = "BYTES", value_parser = |s: &str| braid_shared::buildflags::parse_size(s).map_err(|e| e.to_string()))]
    shm_size: Option<u64>,
    /// Place jobs only on agents whose labels satisfy [PLATFORM:]KEY OP VALUE, OP one of = != >= <= > <
    /// (memory>=4GiB, disk=ssd, cpus>=4, linux/arm/v7:memory>=2GiB; see `braid agents --wide`; repeatable);
    /// refused at submit when no known agent of a platform satisfies it
    #[arg(long = "require", value_name = "REQUIREMENT", value_parser = |s: &str| braid_shared::placement::parse_requirement(s).map(|_| s.to_owned()).map_err(|e| e.to_string()))]
    requires: Vec<String>,
    /// Memory limit of each job's builder and its RUN steps, e.g. 2GiB or 512m (docker build's --memory);
    /// enforced by a cgroup where the agent can make one, or buildah/podman's own with isolation oci;
    /// otherwise the job's log says it is not
    #[arg(long, value_name = "BYTES", value_parser = |s: &str| braid_shared::placement::parse_memory_limit(s).map_err(|e| e.to_string()))]
    memory: Option<u64>,
    /// CPU limit of each job, e.g. 2 or 0.5 (docker's --cpus); enforced with cgroup v2, or buildah/podman's own
    /// with isolation oci; otherwise the job's log says it is not
    #[arg(long, value_name = "CPUS", value_parser = |s: &str| braid_shared::placement::parse_cpus(s).map_err(|e| e.to_string()))]
    cpus: Option<u32>,
    /// Write the image index's digest to FILE (braid always makes an index, as buildx for several platforms)
    #[arg(long, value_name = "FILE")]
    iidfile: Option<PathBuf>,
    /// Secret for RUN --mount=type=secret, as buildx: id=ID[,src=FILE|,env=VAR][,type=file|env]; id=ID alone
    /// reads the variable ID if set, else the file ID (repeatable; up to 64, 500 KiB each). Sent only over TLS
    /// or loopback, held in the coordinator's memory only
    #[arg(long = "secret", value_name = "SPEC")]
    secrets: Vec<String>,
    /// Print only the index digest on success (the same as --progress quiet)
    #[arg(short = 'q', long)]
    quiet: bool,
    /// SSH agent or keys for RUN --mount=type=ssh: default|ID[=SOCKET|KEY[,KEY...]] (repeatable; default and
    /// ID alone use $SSH_AUTH_SOCK; key files need OpenSSH's ssh-agent and ssh-add here). No key leaves this
    /// machine: braid build stays to answer the build's agent requests, so not with --detach
    #[arg(long = "ssh", value_name = "SPEC")]
    ssh: Vec<String>,
    #[command(flatten)]
    needs: crate::needs::NeedsArgs,
    /// Import a build cache, as buildx: REF or type=registry,ref=REF (each platform reads its own
    /// repository REF-OS-ARCH[-VARIANT]; repeatable; gha, local, s3 and azblob are refused)
    #[arg(long = "cache-from", value_name = "CACHE")]
    cache_from: Vec<String>,
    /// Export the build cache, as buildx: type=registry,ref=REF[,mode=min|max] (buildah agents; each platform
    /// to its own repository REF-OS-ARCH[-VARIANT]) or type=inline (Docker Engine agents with BuildKit)
    #[arg(long = "cache-to", value_name = "CACHE")]
    cache_to: Vec<String>,
    /// Build context, as buildx takes it: a directory; a git URL (https://host/org/repo.git#REF:SUBDIR,
    /// git@host:org/repo.git#REF, ssh://..., git://..., github.com/org/repo; BuildKit's ?ref=, ?tag=, ?branch=,
    /// ?subdir=, ?checksum=, ?keep-git-dir=, ?submodules= too) cloned here by your git with its own
    /// authentication, -f then relative to SUBDIR; an http(s):// URL of a tarball (tar, gzip, bzip2, xz, zstd) or
    /// of a Dockerfile (an empty context); or "-": a tar, or a Dockerfile, on stdin. Credentials in a URL
    /// (https://user:token@...) are used but never shown or stored
    #[arg(value_name = "PATH|URL|-")]
    path: PathBuf,
}

/// `--network`, `--add-host`, `--ulimit`: refused here, before the upload,
/// as the coordinator would.
struct RunFlags {
    network: String,
    add_hosts: Vec<proto::HostMapping>,
    ulimits: Vec<proto::Ulimit>,
}

impl RunFlags {
    fn parse(args: &BuildArgs) -> anyhow::Result<Self> {
        use braid_shared::buildflags;
        let network = args.network.clone().unwrap_or_default();
        buildflags::check_network(&network)?;
        if args.add_hosts.len() > braid_shared::limits::ADD_HOSTS {
            bail!("--add-host: more than the limit of {} entries", braid_shared::limits::ADD_HOSTS);
        }
        let add_hosts = args.add_hosts.iter().map(|h| buildflags::parse_add_host(h)).collect::<Result<_, _>>()?;
        let ulimits: Vec<_> = args.ulimits.iter().map(|u| buildflags::parse_ulimit(u)).collect::<Result<_, _>>()?;
        buildflags::check_ulimits(&ulimits)?;
        Ok(Self { network, add_hosts, ulimits })
    }
}

/// `--cache-from`, `--cache-to`: buildx's syntax, refused here by entry
/// before the upload, as the coordinator would.
fn cache_flags(
    args: &BuildArgs,
    platforms: &[String],
) -> anyhow::Result<(Vec<proto::CacheOption>, Vec<proto::CacheOption>)> {
    use braid_shared::cache::{self, Direction};
    let platforms: Vec<Platform> = platforms.iter().filter_map(|p| p.parse().ok()).collect();
    Ok((
        cache::parse(Direction::From, &args.cache_from, &platforms)?,
        cache::parse(Direction::To, &args.cache_to, &platforms)?,
    ))
}

pub async fn run(conn: &Conn, args: BuildArgs) -> anyhow::Result<i32> {
    let platforms = platforms(&args.platforms)?;
    let outputs = output::parse(&args.outputs, args.push, args.load, args.format.as_deref(), &platforms)?;
    let tags: Vec<String> = args.tags.iter().chain(&outputs.names).cloned().collect();
    if args.detach && outputs.exports() {
        bail!(
            "--detach returns before the build ends, so it cannot write a local output (type=oci, type=docker, --load)"
        );
    }
    let mut annotations = parse_annotations(&args.annotations)?;
    if outputs.format == "docker" && !annotations.is_empty() {
        bail!("--annotation needs --format oci: Docker manifest lists and schema 2 manifests have no annotations");
    }
    let store = match outputs.local {
        Some(output::Local::Load { .. }) => Some(output::find_store().await?),
        _ => None,
    };
    let progress = Mode::choose(&args.progress, args.quiet, std::io::stderr().is_terminal());
    if args.detach && args.iidfile.is_some() {
        bail!("--detach returns before the build ends, so it cannot write --iidfile");
    }
    let run_flags = RunFlags::parse(&args)?;
    if args.detach && args.ssh.iter().any(|s| !s.is_empty()) {
        bail!("--ssh needs braid build to stay and answer the build's SSH agent requests, so not with --detach");
    }
    if !conn.may_carry_secrets() && args.ssh.iter().any(|s| !s.is_empty()) {
        bail!("--ssh: agent requests travel only over TLS (https://) or to a coordinator on this host");
    }
    // Resolved before the upload; private agents stop when this is dropped.
    let ssh_agents = crate::ssh::Agents::prepare(&args.ssh)?;
    let (secret_refs, secrets) = crate::secrets::read(&args.secrets, conn)?;
    let checked = crate::needs::check(&args.needs)?;
    let (provenance_mode, provenance_version) = checked.provenance(outputs.push, outputs.exports(), &outputs.format)?;
    let (cache_from, cache_to) = cache_flags(&args, &platforms)?;
    // As buildx: a build that fails leaves no stale image id behind.
    if let Some(path) = &args.iidfile {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing the old --iidfile {path:?}"));
            }
            _ => {}
        }
    }
    let say = |line: String| crate::progress::say(progress, &line);
    let build_args = parse_build_args(&args.build_args)?;
    let labels = parse_labels(&args.labels)?;
    let mut patience = Patience::new(reconnect::limit(args.timeout));
    let mut client = patience.connect(|| conn.builds()).await?;

    let resolved = crate::source::main_context(&args.path, args.file.as_deref(), &build_args, &say).await?;
    let prepared = resolved.prepared;
    say(format!(
        "#1 context {} ({} bytes, {} entries)",
        prepared.summary.digest, prepared.summary.size, prepared.summary.entries
    ));
    let counter = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let ticker = (progress == Mode::Tty && std::io::stderr().is_terminal())
        .then(|| tokio::spawn(show_upload_progress(counter.clone(), started)));
    let sent = upload::ensure_uploaded(&mut client, &prepared, counter).await;
    if let Some(t) = ticker {
        t.abort();
        err!("\r\x1b[K");
    }
    let sent = sent?;
    if sent == 0 {
        say("#1 context already on the coordinator: nothing uploaded".into());
    } else {
        let secs = started.elapsed().as_secs_f64().max(1e-3);
        say(format!("#1 context uploaded ({sent} bytes compressed, {:.1}s, {})", secs, rate(sent as f64 / secs)));
    }
    if outputs.format == "oci" {
        if let Some((remote, commit)) = &resolved.git {
            annotations.extend(crate::source::git_annotations(remote, commit, &annotations.clone()));
        } else if resolved.local {
            annotations.extend(default_annotations(&args.path, &annotations.clone()));
        }
    }
    if !outputs.push && !outputs.exports() {
        say(
            "WARNING: no output: the images are built on the agents but not pushed anywhere (--push, --output, --load)"
                .into(),
        );
    }
    let build_contexts = checked.upload(&mut client, &say).await?;
    let dockerfile = crate::needs::dockerfile_bytes(&prepared)?;
    let (dockerfile_path, dockerfile_inline) = match prepared.dockerfile {
        DockerfileSource::InContext(p) => (p, Vec::new()),
        DockerfileSource::Inline(c) => (String::new(), c),
    };
    let mut spec = proto::BuildSpec {
        platforms,
        tags: tags.clone(),
        context_digest: prepared.summary.digest.to_string(),
        dockerfile_path,
        dockerfile_inline,
        build_args,
        target: args.target.clone().unwrap_or_default(),
        labels,
        no_cache: args.no_cache,
        push: outputs.push,
        annotations,
        allow_emulation: args.allow_emulation,
        timeout_seconds: args.timeout.unwrap_or(0).into(),
        export: outputs.exports(),
        format: outputs.format.clone(),
        pull: args.pull,
        network: run_flags.network,
        add_hosts: run_flags.add_hosts,
        ulimits: run_flags.ulimits,
        shm_size_bytes: args.shm_size.unwrap_or(0),
        requirements: args.requires.clone(),
        memory_limit_bytes: args.memory.unwrap_or(0),
        cpu_millis: args.cpus.unwrap_or(0),
        ssh_ids: ssh_agents.as_ref().map(crate::ssh::Agents::ids).unwrap_or_default(),
        secrets: secret_refs,
        build_contexts,
        no_cache_filter: checked.no_cache_filter(),
        cache_from,
        cache_to,
        provenance_mode,
        provenance_version,
        ..Default::default()
    };
    (spec.needs, spec.syntax_directive) = crate::needs::of_build(&spec, &dockerfile)?;
    // docker-image:// build contexts are pulled with the client's logins, as the tags are pushed.
    let pulled_from = [tags.clone(), checked.image_refs()].concat();
    let credentials = if conn.may_carry_secrets() {
        forwarded_credentials(&pulled_from, &braid_shared::cache::registries(&spec))?
    } else {
        Vec::new()
    };
    // Listening from before the submit: a signal during it still cancels.
    let mut stop = if args.detach { None } else { Some(StopSignals::listen()?) };
    let build_id = client
        .submit(proto::SubmitRequest { spec: Some(spec), credentials, secrets: secrets.clone() })
        .await?
        .into_inner()
        .build_id;
    say(format!("#2 build {build_id} submitted"));
    if args.detach {
        outln!("{build_id}");
        return Ok(0);
    }

    let ssh_task = ssh_agents.as_ref().map(|agents| {
        let limit = reconnect::limit(args.timeout);
        tokio::spawn(crate::ssh::serve(conn.clone(), build_id.clone(), agents.sockets(), limit))
    });
    let _stop_ssh = AbortOnDrop(ssh_task);
    let mut printer = Printer::new(progress);
    let followed = tokio::select! {
        outcome = follow(&mut client, &build_id, &secrets, &mut printer, &mut patience) => Ok(outcome?),
        code = StopSignals::recv(&mut stop) => Err(code),
    };
    // Interrupted (Ctrl-C, or SIGTERM from a CI runner's cancel), or no one
    // reads the progress any more (a closed pipe): the build is cancelled,
    // as buildx's ends with its client.
    let outcome = match followed {
        Ok(Followed::Ended(state)) => state,
        interrupted => {
            printer.finish();
            let (why, code) = match interrupted {
                Ok(_) => ("the progress output was closed", 141),
                Err(code) => ("interrupted", code),
            };
            crate::diag::warn(&format!("{why}: cancelling build {build_id}"));
            let mut patience = Patience::new(reconnect::limit(args.timeout));
            let c = patience.connect(|| conn.builds()).await?;
            let request = proto::CancelBuildRequest { build_id: build_id.clone() };
            patience
                .retry(|| {
                    let (mut c, r) = (c.clone(), request.clone());
                    async move { c.cancel(r).await }
                })
                .await?;
            return Ok(code);
        }
    };
    printer.finish();
    let request = proto::GetBuildRequest { build_id: build_id.clone() };
    let build = patience
        .retry(|| {
            let (mut c, r) = (client.clone(), request.clone());
            async move { c.get(r).await }
        })
        .await?
        .into_inner();
    // `-o type=oci,dest=-` writes the layout to stdout: the summary then goes to stderr.
    let stdout_taken = matches!(&outputs.local, Some(output::Local::OciTar(dest)) if dest.as_os_str() == "-");
    let provenance = match &args.metadata_file {
        Some(_) => summary::provenance_metadata(&build).await,
        None => Vec::new(),
    };
    summary::summarize(
        &build,
        progress,
        args.metadata_file.as_deref(),
        stdout_taken,
        &summary::build_ref(conn, &build.build_id),
        provenance,
    )?;
    if progress != Mode::RawJson {
        for step in build.jobs.iter().filter_map(|j| j.failed_step.as_ref()) {
            for line in describe::excerpt(step) {
                errln!("{line}");
            }
        }
    }
    match outcome {
        proto::BuildState::Succeeded => {
            if let Some(path) = &args.iidfile {
                summary::write_iidfile(path, &build)?;
            }
            if let Some(local) = &outputs.local {
                output::write_local(&mut client, &build, local, store.as_ref(), &say).await?;
            }
            Ok(0)
        }
        state => {
            let why = if build.message.is_empty() { "no reason given".to_owned() } else { build.message.clone() };
            crate::diag::error(&format!("build {build_id} {}: {why}", state_word(state)));
            Ok(1)
        }
    }
}

/// Ctrl-C (SIGINT) or SIGTERM, which a CI runner sends when a job is
/// cancelled (GitHub Actions: SIGINT, then SIGTERM); either cancels the build
/// on the farm. Once listened for, neither ends the process by itself.
struct StopSignals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn listen() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            interrupt: signal(SignalKind::interrupt()).context("listening for SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("listening for SIGTERM")?,
        })
    }

    /// The shell's exit code for the signal that came (130, 143); never
    /// returns without one (`None`: --detach, nothing listened for).
    async fn recv(stop: &mut Option<Self>) -> i32 {
        let Some(s) = stop else { return std::future::pending().await };
        tokio::select! {
            _ = s.interrupt.recv() => 130,
            _ = s.terminate.recv() => 143,
        }
    }
}

/// Stops a background task when the command is done with it.
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}

/// Prints events until the build ends. A dropped stream is watched again
/// after the last event printed (no gap, no line twice), for as long as
/// `patience` allows; the build's `--secret` values are sent again first,
/// since a coordinator that restarted has lost them (they live only in its
/// memory).
async fn follow(
    client: &mut Builds,
    build_id: &str,
    secrets: &[proto::SecretValue],
    printer: &mut Printer,
    patience: &mut Patience,
) -> anyhow::Result<Followed> {
    let mut after = 0;
    let mut reconnected = false;
    loop {
        let request = proto::WatchRequest { build_id: build_id.to_owned(), after_seq: after, history_only: false };
        let attempts = std::cell::Cell::new(0u32);
        let mut stream = patience
            .retry(|| {
                attempts.set(attempts.get() + 1);
                let (mut c, r) = (client.clone(), request.clone());
                async move { c.watch(r).await }
            })
            .await?
            .into_inner();
        // Back after an outage (a dropped stream, or a first watch that had
        // to wait): the coordinator may have restarted.
        if (reconnected || attempts.get() > 1) && !secrets.is_empty() {
            provide_secrets(client, build_id, secrets, patience).await;
        }
        reconnected = true;
        let mut frames = tokio::time::interval(crate::progress::FRAME);
        loop {
            let message = tokio::select! {
                message = stream.message() => message,
                _ = frames.tick() => {
                    printer.tick();
                    if crate::out::stderr_gone() {
                        return Ok(Followed::Gone);
                    }
                    continue;
                }
            };
            match message {
                Ok(Some(event)) => {
                    // Only later events: a resumed stream never repeats one.
                    if event.seq <= after {
                        continue;
                    }
                    after = event.seq;
                    if let Some(state) = print_event(&event, printer) {
                        return Ok(Followed::Ended(state));
                    }
                    if crate::out::stderr_gone() {
                        return Ok(Followed::Gone);
                    }
                }
                Ok(None) => {
                    patience.wait(&"the event stream ended before the build did").await?;
                    break;
                }
                Err(e) if reconnect::transient(&e) => {
                    patience.wait(&e.message()).await?;
                    break;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Sends the build's `--secret` values again; a failure is only a warning
/// (a build that ended needs them no more, and the watch says how it ended).
async fn provide_secrets(client: &Builds, build_id: &str, secrets: &[proto::SecretValue], patience: &mut Patience) {
    let request = proto::ProvideSecretsRequest { build_id: build_id.to_owned(), secrets: secrets.to_vec() };
    let provided = patience
        .retry(|| {
            let (mut c, r) = (client.clone(), request.clone());
            async move { c.provide_secrets(r).await }
        })
        .await;
    if let Err(e) = provided {
        crate::diag::warn(&format!("sending the --secret values again: {e:#}"));
    }
}

pub fn state_word(state: proto::BuildState) -> &'static str {
    match state {
        proto::BuildState::Succeeded => "succeeded",
        proto::BuildState::Failed => "failed",
        proto::BuildState::Cancelled => "was cancelled",
        _ => "ended",
    }
}

/// How following a build ended.
enum Followed {
    Ended(proto::BuildState),
    /// Standard error's reader went away.
    Gone,
}

/// Prints one event; returns the final state when the build has ended.
fn print_event(event: &proto::BuildEvent, printer: &mut Printer) -> Option<proto::BuildState> {
    if let Some(Kind::Build(b)) = &event.kind {
        let state = proto::BuildState::try_from(b.state).unwrap_or_default();
        let ended =
            matches!(state, proto::BuildState::Succeeded | proto::BuildState::Failed | proto::BuildState::Cancelled);
        // rawjson and the live view show every event; plain, the build's
        // end in its summary.
        if ended && printer.mode == Mode::Plain {
            return Some(state);
        }
        printer.event(event);
        return ended.then_some(state);
    }
    printer.event(event);
    None
}

/// Docker-config credentials for the registries the tags push to, and
/// those the cache entries read and write (`cache_registries`).
fn forwarded_credentials(
    tags: &[String],
    cache_registries: &[String],
) -> anyhow::Result<Vec<proto::RegistryCredential>> {
    let mut registries: Vec<String> = Vec::new();
    for tag in tags {
        if let Ok(r) = tag.parse::<braid_shared::ImageRef>()
            && !registries.iter().any(|x| x == r.registry())
        {
            registries.push(r.registry().to_owned());
        }
    }
    for r in cache_registries {
        if !registries.contains(r) {
            registries.push(r.clone());
        }
    }
    crate::dockerconfig::credentials_for(&registries)
}

fn rate(bytes_per_second: f64) -> String {
    format!("{:.1} MiB/s", bytes_per_second / f64::from(1 << 20))
}

/// A live upload line on a terminal: bytes so far and the rate.
async fn show_upload_progress(sent: Arc<AtomicU64>, started: Instant) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(200));
    loop {
        tick.tick().await;
        let bytes = sent.load(Ordering::Relaxed);
        let secs = started.elapsed().as_secs_f64().max(1e-3);
        err!(
            "\r\x1b[K#1 uploading context: {:.1} MiB ({})",
            bytes as f64 / f64::from(1 << 20),
            rate(bytes as f64 / secs)
        );
    }
}

/// `braid cancel`: asks the coordinator to cancel a build.
pub async fn cancel(conn: &Conn, build_id: &str) -> anyhow::Result<i32> {
    let mut client = conn.builds().await?;
    let build = client.cancel(proto::CancelBuildRequest { build_id: build_id.to_owned() }).await?.into_inner();
    let state = proto::BuildState::try_from(build.state).unwrap_or_default();
    outln!("build {} {}", build.build_id, state_word(state));
    Ok(0)
}
