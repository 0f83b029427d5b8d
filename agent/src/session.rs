//! The agent's one session with the coordinator: dial out, say hello,
//! heartbeat, take jobs, report; reconnect with backoff if the link drops,
//! keeping running jobs and undelivered results.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;

use braid_shared::proto::{
    self, agent_message::Kind as ToCoordinator, agents_client::AgentsClient,
    coordinator_message::Kind as FromCoordinator,
};

use crate::cache::ContextCache;
use crate::job::{self, JobEnv};
use crate::outbox::Outbox;
use crate::settings::Valid;

struct Running {
    attempt: u32,
    lease_id: String,
    cancel: CancellationToken,
    /// Cancelled because the agent is stopping: report it as an
    /// infrastructure failure so the coordinator runs it elsewhere.
    hand_back: Arc<AtomicBool>,
    /// The job's platform storage (`prune::storage_name`).
    storage: String,
}

/// State that outlives one connection.
pub struct Agent {
    settings: Valid,
    running: Mutex<HashMap<String, Running>>,
    /// Everything jobs say (logs, progress, results) goes here and stays
    /// until the coordinator acknowledges it; whichever session is live
    /// sends it, so nothing a job reports is tied to the connection it
    /// started under, and nothing is lost with one (see `outbox`).
    /// Log lines enter it only against `log_budget` (see `joblog`), so what
    /// it holds is bounded; results and progress enter freely.
    outbox: Arc<Outbox>,
    log_budget: Arc<tokio::sync::Semaphore>,
    /// This process's id: the outbox's numbers count within it.
    incarnation: String,
    draining: AtomicBool,
    /// Sends a heartbeat now (the drain state changed).
    beat_now: Notify,
    /// Ends the session so the next one dials with a renewed certificate.
    reconnect: Notify,
    /// Keeps docker-backend builds of different platforms apart; outlives
    /// sessions, as jobs do.
    engine_gate: Arc<crate::docker::PlatformGate>,
    storage_locks: Arc<crate::prune::StorageLocks>,
    /// One cache clearing at a time.
    pruning: tokio::sync::Mutex<()>,
    /// What each heartbeat reports of the host.
    health: Arc<crate::health::Health>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing here leaves the maps half-written on a panic.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

type SessionError = Box<dyn std::error::Error + Send + Sync>;

/// How long an agent whose certificate or token is refused waits before
/// trying again, doubling up to the most (an operator may re-admit it
/// meanwhile).
const REFUSED_RETRY_FIRST: Duration = Duration::from_secs(10);
const REFUSED_RETRY_MAX: Duration = Duration::from_secs(300);

/// Whether the coordinator refused who this agent is (revoked or unknown
/// certificate, bad token), as opposed to a link that failed.
fn is_refused_identity(e: &SessionError) -> bool {
    e.downcast_ref::<tonic::Status>()
        .is_some_and(|s| matches!(s.code(), tonic::Code::Unauthenticated | tonic::Code::PermissionDenied))
}

/// Whether the coordinator refused this agent's version (see
/// `braid_shared::compat`).
fn is_refused_version(e: &SessionError) -> bool {
    e.downcast_ref::<tonic::Status>()
        .is_some_and(|s| s.code() == tonic::Code::FailedPrecondition && s.message().starts_with("agent version "))
}

impl Agent {
    pub fn new(settings: Valid) -> Arc<Agent> {
        Arc::new(Agent {
            settings,
            outbox: Arc::default(),
            log_budget: crate::joblog::budget(),
            incarnation: uuid::Uuid::new_v4().simple().to_string(),
            running: Mutex::new(HashMap::new()),
            draining: AtomicBool::new(false),
            beat_now: Notify::new(),
            reconnect: Notify::new(),
            engine_gate: Arc::default(),
            storage_locks: Arc::default(),
            pruning: tokio::sync::Mutex::new(()),
            health: Arc::default(),
        })
    }

    /// Jobs running now and jobs whose results wait for a session: the
    /// coordinator keeps their leases.
    fn claimed(&self) -> Vec<proto::RunningJob> {
        let mut jobs: Vec<proto::RunningJob> = lock(&self.running)
            .iter()
            .map(|(job_id, r)| proto::RunningJob {
                job_id: job_id.clone(),
                attempt: r.attempt,
                lease_id: r.lease_id.clone(),
            })
            .collect();
        // Read after `running`: a job queues its result before it leaves
        // `running`, so it is in one or the other.
        jobs.extend(self.outbox.unacknowledged_results());
        jobs
    }

    fn hello(&self) -> proto::AgentMessage {
        let s = &self.settings;
        proto::AgentMessage {
            kind: Some(ToCoordinator::Hello(proto::Hello {
                name: s.settings.name.clone(),
                platforms: s.platforms.iter().map(ToString::to_string).collect(),
                slots: s.settings.slots.into(),
                backend: s.backend.clone(),
                version: braid_shared::VERSION.to_owned(),
                running: self.claimed(),
                emulated_platforms: s.emulates.iter().map(ToString::to_string).collect(),
                incarnation: self.incarnation.clone(),
                builder: Some(s.builder.clone()),
                labels: s.labels.clone().into_iter().collect(),
            })),
            seq: 0,
        }
    }

    fn heartbeat(&self) -> proto::AgentMessage {
        let running: Vec<proto::RunningJob> = lock(&self.running)
            .iter()
            .map(|(job_id, r)| proto::RunningJob {
                job_id: job_id.clone(),
                attempt: r.attempt,
                lease_id: r.lease_id.clone(),
            })
            .collect();
        let health = self.health.report(&self.settings, running.len());
        proto::AgentMessage {
            kind: Some(ToCoordinator::Heartbeat(proto::Heartbeat {
                running,
                draining: self.draining.load(Ordering::Relaxed),
                health: Some(health),
            })),
            seq: 0,
        }
    }

    /// Takes no new jobs from now on.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.beat_now.notify_one();
    }

    /// Cancels every running job and hands it back to the coordinator.
    pub fn hand_back_all(&self) {
        for r in lock(&self.running).values() {
            r.hand_back.store(true, Ordering::Relaxed);
            r.cancel.cancel();
        }
    }

    /// No job running and nothing the coordinator has not acknowledged.
    pub fn idle(&self) -> bool {
        lock(&self.running).is_empty() && self.outbox.len() == 0
    }

    pub fn running_jobs(&self) -> usize {
        lock(&self.running).len()
    }

    /// Keeps a session up until `stop` is cancelled.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        // Measured before the first heartbeat needs it.
        self.health.refresh(&self.settings);
        let cache = match ContextCache::new(
            self.settings.settings.work_dir.join("contexts"),
            self.settings.clone(),
            self.settings.settings.context_cache_bytes,
        ) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                tracing::error!(error = %e, "cannot create the context cache");
                return;
            }
        };
        let mut backoff = Duration::from_millis(250);
        let mut refused_backoff = REFUSED_RETRY_FIRST;
        while !stop.is_cancelled() {
            let mut wait = backoff;
            match self.clone().connect_once(cache.clone(), &stop).await {
                Ok(()) => {
                    backoff = Duration::from_millis(250);
                    refused_backoff = REFUSED_RETRY_FIRST;
                }
                // A revoked or unknown identity does not heal by itself: say
                // what to do, and stop knocking every few seconds.
                Err(e) if is_refused_identity(&e) => {
                    wait = refused_backoff;
                    refused_backoff = (refused_backoff * 2).min(REFUSED_RETRY_MAX);
                    tracing::error!(
                        error = %e,
                        retry_in = ?wait,
                        "coordinator session ended: it refuses this agent's identity; enroll it again (braid-agent join with a new token)"
                    );
                }
                // A version the coordinator does not support heals only by an
                // upgrade of one side: the same slow retries.
                Err(e) if is_refused_version(&e) => {
                    wait = refused_backoff;
                    refused_backoff = (refused_backoff * 2).min(REFUSED_RETRY_MAX);
                    tracing::error!(
                        error = %e,
                        retry_in = ?wait,
                        "the coordinator does not support this agent's version: install a version in the range it names"
                    );
                }
                Err(e) => tracing::warn!(error = %e, retry_in = ?backoff, "coordinator session ended"),
            }
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = stop.cancelled() => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    async fn connect_once(
        self: Arc<Self>,
        cache: Arc<ContextCache>,
        stop: &CancellationToken,
    ) -> Result<(), SessionError> {
        let mut client = AgentsClient::new(self.settings.connect().await?)
            .max_decoding_message_size(braid_shared::limits::GRPC_MESSAGE_BYTES);
        let (out_tx, out_rx) = mpsc::unbounded_channel::<proto::AgentMessage>();
        out_tx.send(self.hello())?;
        let mut inbound = match client.session(UnboundedReceiverStream::new(out_rx)).await {
            Ok(inbound) => inbound.into_inner(),
            Err(status) => {
                if crate::settings::note_leader(&status) {
                    tracing::info!(answer = %status.message(), "a follower answered: dialing the leader it named");
                }
                return Err(status.into());
            }
        };
        let first = inbound.message().await?;
        let heartbeat = match first.and_then(|m| m.kind) {
            Some(FromCoordinator::Welcome(w)) => {
                if !w.coordinator_version.is_empty() && w.coordinator_version != braid_shared::VERSION {
                    tracing::info!(
                        coordinator = %braid_shared::shorten(&w.coordinator_version, 64),
                        agent = braid_shared::VERSION,
                        "the coordinator runs another version of braid"
                    );
                }
                Duration::from_secs(w.heartbeat_seconds.clamp(1, 3600).into())
            }
            _ => return Err("the coordinator did not welcome this agent".into()),
        };
        tracing::info!(coordinator = %self.settings.settings.coordinator, "connected");
        if self.draining.load(Ordering::Relaxed) {
            out_tx.send(self.heartbeat())?;
        }
        let env = Arc::new(JobEnv {
            settings: self.settings.clone(),
            cache,
            outbox: self.outbox.clone(),
            log_budget: self.log_budget.clone(),
            engine_gate: self.engine_gate.clone(),
            storage_locks: self.storage_locks.clone(),
        });
        let mut tick = tokio::time::interval(heartbeat);
        // The highest number this connection has sent: it starts over with
        // everything not acknowledged, which the coordinator applies once.
        let mut sent = 0;
        loop {
            for message in self.outbox.after(sent) {
                sent = message.seq;
                out_tx.send(message)?;
            }
            tokio::select! {
                () = self.outbox.pushed() => {}
                message = inbound.message() => {
                    let Some(message) = message? else { return Ok(()) };
                    match message.kind {
                        Some(FromCoordinator::Assign(a)) => self.clone().start(env.clone(), a),
                        Some(FromCoordinator::Cancel(c)) => self.cancel(&c),
                        Some(FromCoordinator::Cache(c)) => self.clone().cache_command(c, out_tx.clone()),
                        Some(FromCoordinator::Ack(a)) => {
                            self.outbox.ack(a.up_to.min(sent));
                        }
                        Some(FromCoordinator::Welcome(_)) | None => {}
                    }
                }
                _ = tick.tick() => out_tx.send(self.heartbeat())?,
                () = self.beat_now.notified() => out_tx.send(self.heartbeat())?,
                () = self.reconnect.notified() => {
                    tracing::info!("reconnecting with the renewed certificate");
                    return Ok(());
                }
                () = stop.cancelled() => return Ok(()),
            }
        }
    }

    /// Ends the live session; the next one dials with the current TLS files.
    /// Measures or prunes the builder storages off the session's loop and
    /// answers on it; one prune at a time (with `prune::enforce`).
    fn cache_command(self: Arc<Self>, command: proto::CacheCommand, out: mpsc::UnboundedSender<proto::AgentMessage>) {
        tokio::spawn(async move {
            let _one = if command.prune { Some(self.pruning.lock().await) } else { None };
            let mut users: std::collections::BTreeMap<String, Vec<String>> = Default::default();
            for (job_id, r) in lock(&self.running).iter() {
                users.entry(r.storage.clone()).or_default().push(job_id.clone());
            }
            let report = crate::cachecmd::answer(&self.settings, &self.storage_locks, command, users).await;
            // A closed session: the coordinator reports the agent timed out.
            let _ = out.send(proto::AgentMessage { kind: Some(ToCoordinator::CacheReport(report)), seq: 0 });
        });
    }

    pub fn reconnect_now(&self) {
        self.reconnect.notify_one();
    }

    fn start(self: Arc<Self>, env: Arc<JobEnv>, assignment: proto::Assignment) {
        if self.draining.load(Ordering::Relaxed) {
            // Raced with our drain notice: give it straight back.
            let refusal = proto::JobResult {
                job_id: assignment.job_id,
                attempt: assignment.attempt,
                lease_id: assignment.lease_id,
                outcome: Some(proto::job_result::Outcome::Failure(proto::JobFailure {
                    kind: proto::FailureKind::Infra as i32,
                    message: "the agent is stopping".into(),
                    ..Default::default()
                })),
                phases: Vec::new(),
                provenance: None,
                footprint: None,
            };
            self.deliver(refusal);
            return;
        }
        let cancel = CancellationToken::new();
        let hand_back = Arc::new(AtomicBool::new(false));
        {
            let mut running = lock(&self.running);
            if running.contains_key(&assignment.job_id) {
                return;
            }
            running.insert(
                assignment.job_id.clone(),
                Running {
                    attempt: assignment.attempt,
                    lease_id: assignment.lease_id.clone(),
                    cancel: cancel.clone(),
                    hand_back: hand_back.clone(),
                    storage: assignment
                        .platform
                        .parse()
                        .map_or_else(|_| assignment.platform.clone(), |p| crate::prune::storage_name(&p)),
                },
            );
        }
        tokio::spawn(async move {
            let job_id = assignment.job_id.clone();
            let mut result = job::run(env.clone(), assignment, cancel).await;
            if hand_back.load(Ordering::Relaxed) {
                result.outcome = Some(proto::job_result::Outcome::Failure(proto::JobFailure {
                    kind: proto::FailureKind::Infra as i32,
                    message: "the agent stopped before finishing; handed back".into(),
                    ..Default::default()
                }));
            }
            // Queue the result before forgetting the job, so a reconnect in
            // between still claims it.
            self.deliver(result);
            lock(&self.running).remove(&job_id);
            if let Ok(_one) = self.pruning.try_lock() {
                crate::prune::enforce(&self.settings, &self.storage_locks).await;
            }
        });
    }

    /// Queues a result until the coordinator acknowledges it.
    fn deliver(&self, result: proto::JobResult) {
        self.outbox.push(proto::AgentMessage { kind: Some(ToCoordinator::Result(result)), seq: 0 });
    }

    fn cancel(&self, c: &proto::CancelJob) {
        if let Some(r) = lock(&self.running).get(&c.job_id)
            && r.attempt == c.attempt
        {
            tracing::info!(job_id = %c.job_id, reason = %c.reason, "cancelling job");
            r.cancel.cancel();
        }
    }
}

#[cfg(test)]
mod refusal_tests {
    use super::*;

    fn error(status: tonic::Status) -> SessionError {
        Box::new(status)
    }

    #[test]
    fn a_refused_version_is_told_apart_from_other_refusals() {
        let version = tonic::Status::failed_precondition(
            "agent version \"0.2.0\" is not supported by coordinator version 0.1.0: this coordinator accepts agents \
             >=0.1.0, <0.2.0",
        );
        assert!(is_refused_version(&error(version)));
        assert!(!is_refused_identity(&error(tonic::Status::failed_precondition("agent version \"x\""))));
        assert!(!is_refused_version(&error(tonic::Status::failed_precondition("something else"))));
        assert!(!is_refused_version(&error(tonic::Status::permission_denied("agent version"))));
        assert!(!is_refused_version(&"agent version".into()));
    }
}
