//! The `Builds` service: what clients call.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::broadcast::error::RecvError;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument as _, instrument};

use braid_shared::oci::ImageDescriptor;
use braid_shared::proto::{self, builds_server::Builds};
use braid_shared::{Digest, Platform, limits};

use super::convert;
use crate::auth::Role;
use crate::blocking;
use crate::error::CoordinatorError;
use crate::metrics::Metrics;
use crate::model::BuildStatus;
use crate::state::Coordinator;
use crate::validate;

pub struct BuildsService {
    coordinator: Arc<Coordinator>,
}

impl BuildsService {
    pub fn new(coordinator: Arc<Coordinator>) -> Self {
        BuildsService { coordinator }
    }
}

fn parse_digest(field: &str, raw: &str) -> Result<Digest, Status> {
    raw.parse().map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
}

fn check_build_id(id: &str) -> Result<(), Status> {
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(Status::invalid_argument(format!(
            "build_id: {:?} is not a build id",
            braid_shared::shorten(id, 80)
        )));
    }
    Ok(())
}

type EventStream = Pin<Box<dyn Stream<Item = Result<proto::BuildEvent, Status>> + Send>>;
type SshStream = tokio_stream::wrappers::ReceiverStream<Result<proto::SshServerFrame, Status>>;
type ExportStream = Pin<Box<dyn Stream<Item = Result<proto::ExportChunk, Status>> + Send>>;

/// Events replayed from the store per read.
const REPLAY_BATCH: usize = 1000;

#[tonic::async_trait]
impl Builds for BuildsService {
    async fn stat_context(
        &self,
        req: Request<proto::StatContextRequest>,
    ) -> Result<Response<proto::StatContextResponse>, Status> {
        self.coordinator.tokens.authorize(&req, Role::Submit)?;
        let digest = parse_digest("digest", &req.get_ref().digest)?;
        let size = self.coordinator.contexts.stat(&digest)?;
        Ok(Response::new(proto::StatContextResponse { present: size.is_some(), size: size.unwrap_or(0) }))
    }

    #[instrument(skip_all, err)]
    async fn put_context(
        &self,
        req: Request<Streaming<proto::PutContextRequest>>,
    ) -> Result<Response<proto::PutContextResponse>, Status> {
        self.coordinator.tokens.authorize(&req, Role::Submit)?;
        let mut stream = req.into_inner();
        let first = stream.message().await?.ok_or_else(|| {
            Status::invalid_argument("put_context: empty stream; the first message carries the digest")
        })?;
        let digest = parse_digest("digest", &first.digest)?;
        let contexts = &self.coordinator.contexts;
        if let Some(size) = contexts.stat(&digest)? {
            // Someone uploaded it meanwhile; drain nothing more.
            return Ok(Response::new(proto::PutContextResponse { digest: digest.to_string(), size, received: 0 }));
        }
        let mut upload = contexts.begin(digest.clone())?;
        let mut chunk = first.chunk;
        // Decoding and hashing run on a blocking thread, one chunk at a time.
        loop {
            upload = blocking::run(move || upload.write(&chunk).map(|()| upload)).await?;
            match stream.message().await? {
                Some(msg) if msg.chunk.len() > limits::GRPC_MESSAGE_BYTES => {
                    return Err(Status::resource_exhausted("put_context: chunk larger than the message limit"));
                }
                Some(msg) => chunk = msg.chunk,
                None => break,
            }
        }
        let coordinator = self.coordinator.clone();
        let (size, received) = blocking::run(move || coordinator.contexts.finish(upload)).await?;
        contexts.replicate(&digest).await?;
        let metrics = &self.coordinator.metrics;
        Metrics::add(&metrics.context_uploads, 1);
        Metrics::add(&metrics.context_bytes_received, received);
        tracing::info!(digest = %digest, size, received, "context stored");
        let needed = self.coordinator.farm().needed_contexts();
        // The context is stored: a failed eviction (a full disk refuses even
        // deletions from the database) is for the operator, not the client.
        match contexts.evict(&needed) {
            Ok(evicted) => Metrics::add(&metrics.contexts_evicted, evicted),
            Err(e) => tracing::warn!(error = %e, "evicting contexts failed"),
        }
        Ok(Response::new(proto::PutContextResponse { digest: digest.to_string(), size, received }))
    }

    #[instrument(skip_all, err, fields(build_id))]
    async fn submit(&self, req: Request<proto::SubmitRequest>) -> Result<Response<proto::SubmitResponse>, Status> {
        let caller = self.coordinator.tokens.authorize(&req, Role::Submit)?;
        let request = req.into_inner();
        let credentials = validate::credentials(&request.credentials)?;
        let spec = request.spec.ok_or_else(|| Status::invalid_argument("spec: required"))?;
        let valid = validate::spec(spec)?;
        validate::secret_values(&valid.spec, &request.secrets)?;
        let digest: Digest = valid.spec.context_digest.parse().map_err(|_| Status::internal("validated digest"))?;
        if self.coordinator.contexts.stat(&digest)?.is_none() {
            return Err(CoordinatorError::FailedPrecondition(format!(
                "context_digest: context {digest} has not been uploaded (PutContext first)"
            ))
            .into());
        }
        let unmet = {
            let farm = self.coordinator.farm();
            // A platform no agent ever declared would wait for nothing.
            if let Some(why) = farm.undeclared(&valid.platforms, valid.spec.allow_emulation) {
                return Err(CoordinatorError::FailedPrecondition(why).into());
            }
            let requirements = crate::farm::placement_requirements(&valid.spec);
            crate::needs::unmet(farm.agents.values(), &valid.platforms, valid.spec.allow_emulation, valid.needs)
                .or_else(|| farm.unmet_requirements(&valid.platforms, valid.spec.allow_emulation, &requirements))
        };
        if let Some(why) = unmet {
            return Err(CoordinatorError::FailedPrecondition(why).into());
        }
        self.coordinator.contexts.touch(&digest);
        // Made only when the result cache finds an entry to check: a client
        // with credentials per submission cost more than the rest of Submit
        // (scale benchmark).
        let registry_credentials = credentials.clone();
        let registry = || self.coordinator.registry_with(registry_credentials.clone());
        let mut new = self.coordinator.farm().new_build(
            valid.spec,
            valid.platforms,
            valid.tags,
            caller.token_id,
            credentials,
            request.secrets,
        );
        // A platform built before with the same inputs is answered here.
        crate::resultcache::lookup(&self.coordinator.store, registry, &mut new).await;
        // Stored before its id is handed out: a restart keeps every build a
        // client knows of, and a full disk refuses the build.
        let build_id = self.coordinator.submit(new).await?;
        tracing::Span::current().record("build_id", build_id.as_str());
        Metrics::add(&self.coordinator.metrics.builds_submitted, 1);
        tracing::info!(build_id, "build submitted");
        self.coordinator.wake.notify_one();
        Ok(Response::new(proto::SubmitResponse { build_id }))
    }

    #[instrument(skip_all, err, fields(build_id = %req.get_ref().build_id))]
    async fn provide_secrets(
        &self,
        req: Request<proto::ProvideSecretsRequest>,
    ) -> Result<Response<proto::ProvideSecretsResponse>, Status> {
        let caller = self.coordinator.tokens.authorize(&req, Role::Submit)?;
        let req = req.into_inner();
        check_build_id(&req.build_id)?;
        let mut farm = self.coordinator.farm();
        let spec = farm.build_for(&req.build_id, &caller)?.spec.clone();
        validate::secret_values(&spec, &req.secrets)?;
        let held = farm.provide_secrets(&req.build_id, req.secrets)?;
        drop(farm);
        self.coordinator.wake.notify_one();
        Ok(Response::new(proto::ProvideSecretsResponse { held }))
    }

    type WatchStream = EventStream;

    async fn watch(&self, req: Request<proto::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let caller = self.coordinator.tokens.authorize(&req, Role::Submit)?;
        let req = req.into_inner();
        check_build_id(&req.build_id)?;
        let sub = {
            let farm = self.coordinator.farm();
            farm.build_for(&req.build_id, &caller)?;
            farm.subscribe(&req.build_id)?
        };
        let coordinator = self.coordinator.clone();
        let build_id = req.build_id;
        let stream = async_stream::try_stream! {
            // Events the farm made before the subscription are stored or
            // queued to be; once written, the replay finds them all. A
            // history while the journal waits for disk space is what is
            // stored now, rather than a wait until there is room.
            if !(req.history_only && coordinator.disk.journal_stuck()) {
                coordinator.flush().await;
            }
            let mut live = sub.live;
            let mut sent = req.after_seq;
            let mut done = false;
            // Replay what is stored, then follow live events; a lagging
            // receiver goes back to the store for what it missed.
            loop {
                let replay = coordinator.store.events_after(&build_id, sent, REPLAY_BATCH).map_err(Status::from)?;
                let replayed = replay.len();
                for event in replay {
                    sent = event.seq;
                    done = is_final(&event);
                    yield event;
                }
                // A history ends with what is stored, not at the next live event.
                if done || (replayed < REPLAY_BATCH && req.history_only) || (replayed == 0 && sub.terminal) {
                    break;
                }
                if replayed == REPLAY_BATCH {
                    continue;
                }
                match live.recv().await {
                    Ok(event) if event.seq <= sent => continue,
                    Ok(event) if event.seq == sent + 1 => {
                        sent = event.seq;
                        let last = is_final(&event);
                        yield event;
                        if last { break; }
                    }
                    Ok(_) | Err(RecvError::Lagged(_)) => continue,
                    Err(RecvError::Closed) => break,
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }

    type ExportStream = ExportStream;

    #[instrument(skip_all, err, fields(build_id = %req.get_ref().build_id))]
    async fn export(&self, req: Request<proto::ExportRequest>) -> Result<Response<ExportStream>, Status> {
        let caller = self.coordinator.tokens.authorize(&req, Role::Submit)?;
        let r = req.into_inner();
        check_build_id(&r.build_id)?;
        let only: Option<Platform> = if r.platform.is_empty() {
            None
        } else {
            Some(r.platform.parse().map_err(|e| Status::invalid_argument(format!("platform: {e}")))?)
        };
        // The farm's own typed records: nothing is turned into text and back.
        let (images, index, name) = {
            let farm = self.coordinator.farm();
            let b = farm.build_for(&r.build_id, &caller)?;
            if !b.spec.export {
                return Err(Status::failed_precondition(format!(
                    "build {} has no local output: submit it with --output type=oci or --load",
                    r.build_id
                )));
            }
            if b.record.status != BuildStatus::Succeeded {
                return Err(Status::failed_precondition(format!("build {} has not succeeded", r.build_id)));
            }
            let mut images = Vec::new();
            for job in b.record.jobs.iter().filter(|j| only.as_ref().is_none_or(|p| *p == j.platform)) {
                let image = job.result.as_ref().ok_or_else(|| Status::internal("a succeeded job without an image"))?;
                images.push((job.platform.clone(), ImageDescriptor::from(image)));
            }
            let index = b.record.index.as_ref().map(ImageDescriptor::from);
            (images, index, b.tags.first().cloned())
        };
        if let Some(p) = &only
            && images.is_empty()
        {
            return Err(Status::not_found(format!("build {} has no image for {p}", r.build_id)));
        }
        let index = index.ok_or_else(|| Status::internal("a succeeded exporting build without an index"))?;
        let mut roots: Vec<Digest> = images.iter().map(|(_, i)| i.digest.clone()).collect();
        roots.push(index.digest.clone());
        crate::remote_blobs::fill(&self.coordinator, &roots).await.map_err(Status::from)?;
        let blobs = self.coordinator.blobs.clone();
        let reader = blobs.clone();
        // Reading the manifests back hashes them: a blocking thread's work.
        let plan = tokio::task::spawn_blocking(move || {
            crate::export::plan(&reader, only.is_none().then_some(&index), &images, name)
        })
        .await
        .map_err(|e| Status::internal(format!("planning the export: {e}")))?
        .map_err(|e| {
            let hint = if e.is_missing() { "; evicted to stay under blob_store_bytes: build it again" } else { "" };
            Status::failed_precondition(format!("build {}: {e}{hint}", r.build_id))
        })?;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
        let writer = tokio::task::spawn_blocking(move || crate::export::write_tar(&blobs, &plan, tx));
        let metrics = self.coordinator.metrics.clone();
        let stream = async_stream::try_stream! {
            while let Some(chunk) = rx.recv().await {
                Metrics::add(&metrics.export_bytes_served, chunk.len() as u64);
                yield proto::ExportChunk { chunk };
            }
            match writer.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => Err(Status::internal(format!("writing the layout: {e}")))?,
                Err(e) => Err(Status::internal(format!("writing the layout: {e}")))?,
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get(&self, req: Request<proto::GetBuildRequest>) -> Result<Response<proto::Build>, Status> {
        let caller = self.coordinator.tokens.authorize(&req, Role::Submit)?;
        check_build_id(&req.get_ref().build_id)?;
        let farm = self.coordinator.farm();
        let b = farm.build_for(&req.get_ref().build_id, &caller)?;
        // As stored: memory may be ahead while the disk is full.
        let stored = self.coordinator.stored.lock();
        let build = convert::build_as(b, stored.get(&b.record.id).unwrap_or(&b.record));
        Ok(Response::new(build))
    }

    async fn list(
        &self,
        req: Request<proto::ListBuildsRequest>,
    ) -> Result<Response<proto::ListBuildsResponse>, Status> {
        let caller = self.coordinator.tokens.authorize(&req, Role::Submit)?;
        let limit = match req.get_ref().limit {
            0 => 20,
            n => match usize::try_from(n) {
                Ok(n) if n <= limits::LIST_BUILDS as usize => n,
                _ => {
                    return Err(Status::invalid_argument(format!(
                        "limit: {n} is more than the limit of {}",
                        limits::LIST_BUILDS
                    )));
                }
            },
        };
        let farm = self.coordinator.farm();
        let state = req.get_ref().state;
        if proto::BuildState::try_from(state).is_err() {
            return Err(Status::invalid_argument(format!("state: unknown build state {state}")));
        }
        let state = BuildStatus::from_proto(state);
        // As stored: memory may be ahead while the disk is full.
        let stored = self.coordinator.stored.lock();
        let mut builds: Vec<_> = farm
            .builds
            .values()
            .map(|b| (b, stored.get(&b.record.id).unwrap_or(&b.record)))
            .filter(|(_, r)| state.is_none_or(|s| r.status == s))
            .filter(|(b, _)| caller.owns(b.record.owner.as_deref()))
            .collect();
        builds.sort_by_key(|(b, _)| std::cmp::Reverse(b.record.order));
        let builds = builds.into_iter().take(limit).map(|(b, r)| convert::build_as(b, r)).collect();
        Ok(Response::new(proto::ListBuildsResponse { builds }))
    }

    type ForwardSshStream = SshStream;

    #[instrument(skip_all, err, fields(build_id))]
    async fn forward_ssh(&self, req: Request<Streaming<proto::SshClientFrame>>) -> Result<Response<SshStream>, Status> {
        let caller = self.coordinator.tokens.authorize(&req, Role::Submit)?;
        let mut inbound = req.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("forward_ssh: empty stream; the first frame names the build"))?;
        check_build_id(&first.build_id)?;
        let build_id = first.build_id;
        tracing::Span::current().record("build_id", build_id.as_str());
        {
            let farm = self.coordinator.farm();
            let b = farm.build_for(&build_id, &caller)?;
            if b.spec.ssh_ids.is_empty() {
                return Err(Status::failed_precondition(format!("build {build_id} was submitted without --ssh")));
            }
            if b.record.status.is_terminal() {
                return Err(Status::failed_precondition(format!("build {build_id} has ended")));
            }
        }
        let (tx, rx) = tokio::sync::mpsc::channel(limits::SSH_BUFFERED_FRAMES);
        let errors = tx.clone();
        let (attached, replaced) = self.coordinator.ssh.attach_client(&build_id, tx);
        tracing::info!("ssh client attached");
        let relay = self.coordinator.ssh.clone();
        tokio::spawn(
            async move {
                let end = crate::ssh::pump(&mut inbound, replaced, &errors, |m| {
                    relay.from_client(&build_id, &m.job_id, m.frame)
                })
                .await;
                drop((attached, errors));
                tracing::info!(error = end.as_deref().unwrap_or(""), "ssh client detached");
            }
            .instrument(tracing::Span::current()),
        );
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    #[instrument(skip_all, err, fields(build_id = %req.get_ref().build_id))]
    async fn cancel(&self, req: Request<proto::CancelBuildRequest>) -> Result<Response<proto::Build>, Status> {
        let caller = self.coordinator.tokens.authorize(&req, Role::Submit)?;
        check_build_id(&req.get_ref().build_id)?;
        let build = {
            let mut farm = self.coordinator.farm();
            farm.build_for(&req.get_ref().build_id, &caller)?;
            let effects = farm.cancel(&req.get_ref().build_id, "cancelled by request")?;
            self.coordinator.perform(&farm, effects);
            farm.build(&req.get_ref().build_id).map(convert::build)?
        };
        self.coordinator.wake.notify_one();
        // Stored before it is acknowledged: a restart keeps the cancel.
        self.coordinator.stored().await?;
        Ok(Response::new(build))
    }
}

/// The event that ends a build.
fn is_final(event: &proto::BuildEvent) -> bool {
    matches!(
        &event.kind,
        Some(proto::build_event::Kind::Build(b)) if BuildStatus::from_proto(b.state).is_some_and(BuildStatus::is_terminal)
    )
}
