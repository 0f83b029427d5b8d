//! The `Agents` service: one session per agent, and context downloads.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, instrument};

use braid_shared::proto::{self, agent_message::Kind as FromAgent, agents_server::Agents};
use braid_shared::{Digest, Platform, limits, pki};

use crate::blocking;
use crate::enroll::{self, AgentCert};
use crate::metrics::Metrics;
use crate::model::{Delivery, valid_agent_name};
use crate::state::Coordinator;

pub struct AgentsService {
    coordinator: Arc<Coordinator>,
}

impl AgentsService {
    pub fn new(coordinator: Arc<Coordinator>) -> Self {
        AgentsService { coordinator }
    }

    /// The agent in the caller's certificate; None in plaintext mode. The
    /// one place every agent call is authenticated: a revoked serial, or an
    /// offline certificate older than the name's current one, is refused
    /// here (`enroll::check_certificate`).
    fn agent_identity<T>(&self, req: &Request<T>) -> Result<Option<AgentCert>, Status> {
        if !self.coordinator.settings.tls() {
            return Ok(None);
        }
        let missing = || Status::unauthenticated("agents must present a client certificate from the cluster CA");
        let certs = req.peer_certs().ok_or_else(missing)?;
        let first = certs.first().ok_or_else(missing)?;
        let info = pki::inspect(first.as_ref()).map_err(|e| Status::unauthenticated(e.to_string()))?;
        if info.unit != "agent" {
            return Err(Status::permission_denied(format!(
                "the certificate for {:?} is not an agent certificate",
                info.name
            )));
        }
        if !valid_agent_name(&info.name) {
            return Err(Status::permission_denied(format!(
                "the certificate names agent {:?}, not a valid agent name",
                braid_shared::shorten(&info.name, 80)
            )));
        }
        let cert = enroll::check_certificate(&self.coordinator.store, &info)?;
        if cert.superseded {
            self.coordinator.change(|farm| ((), farm.close_superseded_session(&cert.name, &cert.stamp.serial)));
        }
        Ok(Some(cert))
    }
}

impl AgentsService {
    /// Blobs are taken only from the agent holding the lease of a job of
    /// an exporting build.
    fn check_upload_lease(
        &self,
        identity: Option<AgentCert>,
        job_id: &str,
        attempt: u32,
        lease: &str,
    ) -> Result<(), Status> {
        let holder = self.coordinator.farm().exporting_lease_holder(job_id, attempt, lease).ok_or_else(|| {
            Status::failed_precondition(format!(
                "job {job_id} attempt {attempt}: no such lease of an exporting build (cancelled or re-queued?)"
            ))
        })?;
        match identity.map(|c| c.name) {
            Some(name) if name != holder => {
                Err(Status::permission_denied(format!("job {job_id} is leased to agent {holder:?}, not {name:?}")))
            }
            _ => Ok(()),
        }
    }
}

/// `Hello.incarnation`, at most.
const INCARNATION_BYTES: usize = 64;

/// How long a new session may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Checks a hello; returns the platforms the agent builds natively and
/// those it emulates.
fn check_hello(hello: &proto::Hello) -> Result<(Vec<Platform>, Vec<Platform>), Status> {
    if !valid_agent_name(&hello.name) {
        return Err(Status::invalid_argument(format!(
            "hello.name: {:?} must be 1 to {} letters, digits, '.', '_' or '-'",
            braid_shared::shorten(&hello.name, 80),
            limits::AGENT_NAME_BYTES
        )));
    }
    if hello.platforms.is_empty() || hello.platforms.len() > limits::PLATFORMS {
        return Err(Status::invalid_argument(format!("hello.platforms: 1 to {} platforms", limits::PLATFORMS)));
    }
    let platforms = hello
        .platforms
        .iter()
        .map(|p| p.parse::<Platform>().map_err(|e| Status::invalid_argument(format!("hello.platforms: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    if hello.slots == 0 || hello.slots > u64::from(limits::AGENT_SLOTS) {
        return Err(Status::invalid_argument(format!(
            "hello.slots: {} is not 1 to {}",
            hello.slots,
            limits::AGENT_SLOTS
        )));
    }
    if hello.running.len() > limits::AGENT_SLOTS as usize {
        return Err(Status::invalid_argument("hello.running: more jobs than slots allow"));
    }
    if hello.incarnation.len() > INCARNATION_BYTES {
        return Err(Status::invalid_argument(format!("hello.incarnation: at most {INCARNATION_BYTES} bytes")));
    }
    if hello.emulated_platforms.len() > limits::PLATFORMS {
        return Err(Status::invalid_argument(format!("hello.emulated_platforms: at most {}", limits::PLATFORMS)));
    }
    crate::model::Builder::from_hello(hello.builder.as_ref()).map_err(Status::invalid_argument)?;
    braid_shared::placement::check_labels(&hello.labels)
        .map_err(|e| Status::invalid_argument(format!("hello.labels: {e}")))?;
    let emulates = hello
        .emulated_platforms
        .iter()
        .map(|p| p.parse::<Platform>().map_err(|e| Status::invalid_argument(format!("hello.emulated_platforms: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((platforms, emulates))
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<proto::CoordinatorMessage, Status>> + Send>>;
type ContextStream = Pin<Box<dyn Stream<Item = Result<proto::ContextChunk, Status>> + Send>>;
type SshStream = tokio_stream::wrappers::ReceiverStream<Result<proto::SshAgentFrame, Status>>;

#[tonic::async_trait]
impl Agents for AgentsService {
    type SessionStream = SessionStream;

    async fn session(&self, req: Request<Streaming<proto::AgentMessage>>) -> Result<Response<SessionStream>, Status> {
        let identity = self.agent_identity(&req)?;
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 10 seconds"))??;
        let Some(proto::AgentMessage { kind: Some(FromAgent::Hello(hello)), .. }) = first else {
            return Err(Status::invalid_argument("the first message of a session must be a hello"));
        };
        let (platforms, emulates) = check_hello(&hello)?;
        braid_shared::compat::check_agent(&hello.version, braid_shared::VERSION).map_err(|why| {
            tracing::warn!(agent = %braid_shared::shorten(&hello.name, 80), "{why}");
            Status::failed_precondition(why)
        })?;
        if let Some(certified) = &identity
            && certified.name != hello.name
        {
            return Err(Status::permission_denied(format!(
                "hello names agent {:?} but the certificate is for {:?}",
                hello.name, certified.name
            )));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(Ok(proto::CoordinatorMessage {
            kind: Some(proto::coordinator_message::Kind::Welcome(proto::Welcome {
                heartbeat_seconds: self.coordinator.settings.heartbeat_seconds,
                coordinator_version: braid_shared::VERSION.to_owned(),
            })),
        }));
        let name = hello.name.clone();
        let stamp = identity.map(|c| c.stamp);
        let connected = {
            let mut farm = self.coordinator.farm();
            let (connected, effects) = farm.agent_connected(&hello, platforms.clone(), emulates.clone(), stamp)?;
            // Registered first: the effects may already send on it.
            self.coordinator.open_session(&farm, connected.session, tx);
            self.coordinator.perform(&farm, effects);
            connected
        };
        let session = connected.session;
        let span = tracing::info_span!("agent_session", agent = %name, session);
        span.in_scope(|| {
            tracing::info!(
                platforms = ?platforms.iter().map(ToString::to_string).collect::<Vec<_>>(),
                emulates = ?emulates.iter().map(ToString::to_string).collect::<Vec<_>>(),
                slots = hello.slots,
                backend = %hello.backend,
                version = %hello.version,
                claimed = connected.claimed,
                readopted = connected.readopted,
                "agent connected"
            );
        });
        self.coordinator.wake.notify_one();
        let coordinator = self.coordinator.clone();
        tokio::spawn(
            async move {
                let end = read_session(&coordinator, &name, session, &mut inbound).await;
                match end {
                    Ok(()) => tracing::info!("agent disconnected"),
                    Err(e) => tracing::warn!(error = %e, "agent session ended"),
                }
                {
                    let mut farm = coordinator.farm();
                    let effects = farm.agent_disconnected(&name, session);
                    coordinator.perform(&farm, effects);
                }
                coordinator.close_session(session);
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(rx))))
    }

    #[instrument(skip_all, err, fields(agent = %req.get_ref().name))]
    async fn join(&self, req: Request<proto::JoinRequest>) -> Result<Response<proto::JoinResponse>, Status> {
        let r = req.into_inner();
        if !valid_agent_name(&r.name) {
            return Err(Status::invalid_argument(format!(
                "name: {:?} must be 1 to {} letters, digits, '.', '_' or '-'",
                braid_shared::shorten(&r.name, 80),
                limits::AGENT_NAME_BYTES
            )));
        }
        if r.csr_pem.len() > 16 << 10 {
            return Err(Status::invalid_argument("csr_pem: larger than 16 KiB"));
        }
        let ca = self.coordinator.ca.as_ref().ok_or_else(|| {
            Status::failed_precondition(
                "this coordinator signs no certificates (no tls_ca_key); issue one with braid certs issue",
            )
        })?;
        let token = self.coordinator.tokens.join_token(&r.token, &r.name)?;
        let in_farm = self.coordinator.farm().agents.contains_key(&r.name);
        enroll::check_not_enrolled(&self.coordinator.store, &token, &r.name, in_farm)?;
        let lifetime = i64::from(self.coordinator.settings.agent_cert_seconds);
        let cert_pem = pki::sign_agent_request(ca, &r.csr_pem, &r.name, lifetime)
            .map_err(|e| Status::invalid_argument(format!("csr_pem: {e}")))?;
        let info = pki::inspect_pem(&cert_pem)
            .map_err(|e| Status::internal(format!("reading the signed certificate: {e}")))?;
        // Atomic: the name is checked again, the token spent and the serial
        // recorded together, so two Joins cannot both enroll one name.
        let revoked = enroll::record_join(&self.coordinator.store, &token, &info)?;
        if revoked > 0 {
            self.coordinator.change(|farm| ((), farm.close_superseded_session(&r.name, &info.serial)));
        }
        tracing::info!(token_id = %token.id, serial = %info.serial, replaced = revoked, "agent enrolled");
        Ok(Response::new(proto::JoinResponse { cert_pem, ca_pem: ca.cert.clone() }))
    }

    #[instrument(skip_all, err, fields(agent))]
    async fn renew(&self, req: Request<proto::RenewRequest>) -> Result<Response<proto::JoinResponse>, Status> {
        // Who is renewing comes from the certificate the call presents
        // (checked against the CA and the revocations), never from the request.
        let cert = self
            .agent_identity(&req)?
            .ok_or_else(|| Status::failed_precondition("certificates are renewed over TLS only"))?;
        tracing::Span::current().record("agent", cert.name.as_str());
        let r = req.into_inner();
        if r.csr_pem.len() > 16 << 10 {
            return Err(Status::invalid_argument("csr_pem: larger than 16 KiB"));
        }
        let ca = self.coordinator.ca.as_ref().ok_or_else(|| {
            Status::failed_precondition(
                "this coordinator signs no certificates (no tls_ca_key): renew with braid certs issue",
            )
        })?;
        let lifetime = i64::from(self.coordinator.settings.agent_cert_seconds);
        let cert_pem = pki::sign_agent_request(ca, &r.csr_pem, &cert.name, lifetime)
            .map_err(|e| Status::invalid_argument(format!("csr_pem: {e}")))?;
        tracing::info!(old_serial = %cert.stamp.serial, "agent certificate renewed");
        Ok(Response::new(proto::JoinResponse { cert_pem, ca_pem: ca.cert.clone() }))
    }

    #[instrument(skip_all, err, fields(job_id = %req.get_ref().job_id))]
    async fn missing_blobs(
        &self,
        req: Request<proto::MissingBlobsRequest>,
    ) -> Result<Response<proto::MissingBlobsResponse>, Status> {
        let identity = self.agent_identity(&req)?;
        let r = req.into_inner();
        self.check_upload_lease(identity, &r.job_id, r.attempt, &r.lease_id)?;
        if r.digests.len() > limits::BLOBS_PER_IMAGE {
            return Err(Status::invalid_argument(format!("digests: at most {}", limits::BLOBS_PER_IMAGE)));
        }
        let mut missing = Vec::new();
        for raw in &r.digests {
            let digest: Digest = raw.parse().map_err(|e| Status::invalid_argument(format!("digests: {e}")))?;
            if self.coordinator.blobs.has(&digest) {
                self.coordinator.blobs.touch(&digest);
            } else if !crate::remote_blobs::pull(&self.coordinator, &digest).await {
                missing.push(digest.to_string());
            }
        }
        Ok(Response::new(proto::MissingBlobsResponse { missing }))
    }

    #[instrument(skip_all, err, fields(job_id, digest))]
    async fn put_blob(
        &self,
        req: Request<Streaming<proto::PutBlobRequest>>,
    ) -> Result<Response<proto::PutBlobResponse>, Status> {
        let identity = self.agent_identity(&req)?;
        let mut stream = req.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("put_blob: empty stream; the first message names the blob"))?;
        tracing::Span::current().record("job_id", first.job_id.as_str()).record("digest", first.digest.as_str());
        self.check_upload_lease(identity, &first.job_id, first.attempt, &first.lease_id)?;
        let digest: Digest = first.digest.parse().map_err(|e| Status::invalid_argument(format!("digest: {e}")))?;
        let blobs = &self.coordinator.blobs;
        if blobs.has(&digest) {
            blobs.touch(&digest);
            return Ok(Response::new(proto::PutBlobResponse { digest: digest.to_string(), size: first.size }));
        }
        // Making room reads manifests back and hashing is CPU work: both on
        // a blocking thread, one chunk at a time.
        let coordinator = self.coordinator.clone();
        let (expected, size) = (digest.clone(), first.size);
        // A full disk is told as such (`DataDir::check`).
        let disk = &self.coordinator.disk;
        let mut upload = blocking::run(move || {
            let needed = || coordinator.blobs.referenced(&coordinator.farm().exporting_images());
            coordinator.blobs.begin(expected, size, needed)
        })
        .await
        .map_err(|e| disk.check(e))?;
        let mut chunk = first.chunk;
        loop {
            upload = blocking::run(move || upload.write(&chunk).map(|()| upload)).await.map_err(|e| disk.check(e))?;
            match stream.message().await? {
                Some(msg) => chunk = msg.chunk,
                None => break,
            }
        }
        let store = blobs.clone();
        blocking::run(move || store.finish(upload)).await.map_err(|e| disk.check(e))?;
        disk.file_written();
        crate::remote_blobs::push(&self.coordinator, &digest).await.map_err(Status::from)?;
        Metrics::add(&self.coordinator.metrics.blob_bytes_received, first.size);
        Ok(Response::new(proto::PutBlobResponse { digest: digest.to_string(), size: first.size }))
    }

    type SshTunnelStream = SshStream;

    #[instrument(skip_all, err, fields(job_id))]
    async fn ssh_tunnel(&self, req: Request<Streaming<proto::SshAgentFrame>>) -> Result<Response<SshStream>, Status> {
        let identity = self.agent_identity(&req)?;
        let mut inbound = req.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("ssh_tunnel: empty stream; the first frame names the lease"))?;
        let job_id = first.job_id;
        tracing::Span::current().record("job_id", braid_shared::shorten(&job_id, 80).as_str());
        let (holder, build_id, ssh_ids) =
            self.coordinator.farm().ssh_lease(&job_id, first.attempt, &first.lease_id).ok_or_else(|| {
                Status::failed_precondition(format!(
                    "job {} attempt {}: no such lease (cancelled or re-queued?)",
                    braid_shared::shorten(&job_id, 80),
                    first.attempt
                ))
            })?;
        if let Some(name) = identity.map(|c| c.name)
            && name != holder
        {
            return Err(Status::permission_denied(format!("job {job_id} is leased to agent {holder:?}, not {name:?}")));
        }
        if ssh_ids.is_empty() {
            return Err(Status::failed_precondition(format!("job {job_id}'s build was submitted without --ssh")));
        }
        let (tx, rx) = mpsc::channel(limits::SSH_BUFFERED_FRAMES);
        let errors = tx.clone();
        let (attached, replaced) = self.coordinator.ssh.attach_tunnel(&job_id, &build_id, ssh_ids, tx);
        tracing::info!(build_id, "ssh tunnel attached");
        let relay = self.coordinator.ssh.clone();
        tokio::spawn(
            async move {
                let end =
                    crate::ssh::pump(&mut inbound, replaced, &errors, |m| relay.from_agent(&job_id, m.frame)).await;
                drop((attached, errors));
                tracing::info!(error = end.as_deref().unwrap_or(""), "ssh tunnel detached");
            }
            .instrument(tracing::Span::current()),
        );
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    type FetchContextStream = ContextStream;

    #[instrument(
        skip_all,
        err,
        fields(digest = %braid_shared::shorten(&req.get_ref().digest, 80), job_id = %braid_shared::shorten(&req.get_ref().job_id, 80))
    )]
    async fn fetch_context(&self, req: Request<proto::FetchContextRequest>) -> Result<Response<ContextStream>, Status> {
        let identity = self.agent_identity(&req)?;
        let digest: Digest =
            req.get_ref().digest.parse().map_err(|e| Status::invalid_argument(format!("digest: {e}")))?;
        let r = req.get_ref();
        let caller = identity.as_ref().map(|c| c.name.as_str());
        self.coordinator.farm().check_context_lease(caller, &r.job_id, r.attempt, &r.lease_id, &digest)?;
        if self.coordinator.contexts.stat(&digest)?.is_none() {
            return Err(Status::not_found(format!("context {digest} is not stored")));
        }
        if self.coordinator.contexts.is_remote_only(&digest) {
            let compressed = self.coordinator.contexts.pull(&digest).await?;
            let (coordinator, wanted) = (self.coordinator.clone(), digest.clone());
            blocking::run(move || coordinator.contexts.keep_pulled(&wanted, &compressed)).await?;
            tracing::info!(%digest, "context read from the blob_store registry");
        }
        let mut file = tokio::fs::File::open(self.coordinator.contexts.path(&digest)).await?;
        self.coordinator.contexts.touch(&digest);
        let coordinator = self.coordinator.clone();
        Metrics::add(&coordinator.metrics.context_fetches, 1);
        let stream = async_stream::try_stream! {
            loop {
                let mut buf = vec![0u8; limits::CONTEXT_CHUNK_BYTES];
                let n = file.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                buf.truncate(n);
                Metrics::add(&coordinator.metrics.context_bytes_served, n as u64);
                yield proto::ContextChunk { chunk: buf };
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }
}

/// A heartbeat's health report if it is within bounds. A bad one is
/// dropped with a warning naming the field (the agent shows no health
/// until a good one comes): it says nothing about the agent's jobs, so it
/// does not end the session.
fn checked_health(agent: &str, health: Option<proto::AgentHealth>) -> Option<proto::AgentHealth> {
    let health = health?;
    match braid_shared::health::check(&health) {
        Ok(()) => Some(health),
        Err(e) => {
            tracing::warn!(agent, error = %e, "health report refused");
            None
        }
    }
}

async fn read_session(
    coordinator: &Arc<Coordinator>,
    name: &str,
    session: u64,
    inbound: &mut Streaming<proto::AgentMessage>,
) -> Result<(), Status> {
    while let Some(message) = inbound.message().await? {
        let Some(kind) = message.kind else { continue };
        let seq = message.seq;
        {
            let mut farm = coordinator.farm();
            // Logs, progress and results are numbered; hellos and heartbeats not.
            let numbered = !matches!(kind, FromAgent::Hello(_) | FromAgent::Heartbeat(_) | FromAgent::CacheReport(_));
            let delivery = if numbered { farm.accept(name, session, seq) } else { Delivery::Apply };
            let effects = match (kind, delivery) {
                (FromAgent::Hello(_), _) => {
                    return Err(Status::invalid_argument("a second hello in one session"));
                }
                (FromAgent::Heartbeat(beat), _) => {
                    farm.heartbeat(name, session);
                    farm.set_draining(name, session, beat.draining);
                    farm.set_health(name, session, checked_health(name, beat.health));
                    Vec::new()
                }
                (FromAgent::CacheReport(report), _) => {
                    coordinator.cache_requests.answer(name, report);
                    Vec::new()
                }
                (_, Delivery::Duplicate | Delivery::Stale) => Vec::new(),
                (FromAgent::Log(log), Delivery::Apply) => {
                    farm.heartbeat(name, session);
                    farm.job_log(name, session, log)
                }
                (FromAgent::Progress(progress), Delivery::Apply) => farm.job_progress(name, session, progress),
                (FromAgent::Result(result), Delivery::Apply) => {
                    tracing::info!(job_id = %result.job_id, attempt = result.attempt, "job result");
                    farm.job_result(name, session, result)
                }
            };
            coordinator.perform(&farm, effects);
            // After its effects are queued to the journal, so the ack
            // goes out once they are stored.
            if numbered && seq > 0 && delivery != Delivery::Stale {
                coordinator.ack(session, seq);
            }
        }
        coordinator.wake.notify_one();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hostile_health_report_is_dropped_and_a_good_one_kept() {
        let good = proto::AgentHealth { disk_free_bytes: 1 << 30, load1: 0.5, ..Default::default() };
        assert_eq!(checked_health("a", Some(good)), Some(good));
        assert_eq!(checked_health("a", None), None);
        for bad in [
            proto::AgentHealth { load1: f64::NAN, ..good },
            proto::AgentHealth { disk_free_bytes: u64::MAX, ..good },
            proto::AgentHealth { memory_available_bytes: 1, ..good },
            proto::AgentHealth { certificate_not_after: i64::MIN, ..good },
        ] {
            assert_eq!(checked_health("a", Some(bad)), None, "{bad:?}");
        }
    }

    #[test]
    fn a_hellos_labels_are_checked() {
        let hello = |k: &str, v: &str| proto::Hello {
            name: "pi-01".into(),
            platforms: vec!["linux/arm/v7".into()],
            slots: 1,
            labels: [(k.to_owned(), v.to_owned())].into_iter().collect(),
            ..Default::default()
        };
        assert!(check_hello(&hello("memory", "1GiB")).is_ok());
        for (k, v, why) in [
            ("Memory", "1GiB", "invalid key"),
            ("memory", "lots", "is not a size"),
            ("zone", "a\nb", "no control characters"),
        ] {
            let e = check_hello(&hello(k, v)).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().starts_with("hello.labels: ") && e.message().contains(why), "{e:?}");
        }
        let mut many = hello("memory", "1GiB");
        many.labels.extend((0..limits::AGENT_LABELS).map(|i| (format!("k{i}"), "v".to_owned())));
        assert!(check_hello(&many).unwrap_err().message().contains("more than the limit of 64"));
    }
}
