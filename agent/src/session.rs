//! The agent's one session with the coordinator: dial out, say hello,
//! heartbeat, take jobs, report; reconnect with backoff if the link drops,
//! keeping running jobs and undelivered results.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;

use braid_shared::proto::{
    self, agent_message::Kind as ToCoordinator, agents_client::AgentsClient,
    coordinator_message::Kind as FromCoordinator,
};

use crate::cache::ContextCache;
use crate::job::{self, JobEnv};
use crate::settings::Valid;

struct Running {
    attempt: u32,
    lease_id: String,
    cancel: CancellationToken,
}

/// State that outlives one connection.
pub struct Agent {
    settings: Valid,
    running: Mutex<HashMap<String, Running>>,
    /// Results not yet handed to a live session.
    undelivered: Mutex<Vec<proto::JobResult>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing here leaves the maps half-written on a panic.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Agent {
    pub fn new(settings: Valid) -> Arc<Agent> {
        Arc::new(Agent { settings, running: Mutex::new(HashMap::new()), undelivered: Mutex::new(Vec::new()) })
    }

    fn hello(&self) -> proto::AgentMessage {
        let s = &self.settings;
        let running = lock(&self.running)
            .iter()
            .map(|(job_id, r)| proto::RunningJob {
                job_id: job_id.clone(),
                attempt: r.attempt,
                lease_id: r.lease_id.clone(),
            })
            .collect();
        proto::AgentMessage {
            kind: Some(ToCoordinator::Hello(proto::Hello {
                name: s.settings.name.clone(),
                platforms: s.platforms.iter().map(ToString::to_string).collect(),
                slots: s.settings.slots,
                backend: s.settings.backend.clone(),
                version: braid_shared::VERSION.to_owned(),
                running,
            })),
        }
    }

    /// Keeps a session up until `stop` is cancelled.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let cache = match ContextCache::new(
            self.settings.settings.work_dir.join("contexts"),
            self.settings.settings.coordinator.clone(),
            self.settings.settings.context_cache_bytes,
        ) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                tracing::error!(error = %e, "cannot create the context cache");
                return;
            }
        };
        let mut backoff = Duration::from_millis(250);
        while !stop.is_cancelled() {
            match self.clone().connect_once(cache.clone(), &stop).await {
                Ok(()) => backoff = Duration::from_millis(250),
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "coordinator session ended")
                }
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = stop.cancelled() => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    async fn connect_once(
        self: Arc<Self>,
        cache: Arc<ContextCache>,
        stop: &CancellationToken,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let mut client = AgentsClient::connect(self.settings.settings.coordinator.clone())
            .await?
            .max_decoding_message_size(braid_shared::limits::GRPC_MESSAGE_BYTES);
        let (out_tx, out_rx) = mpsc::unbounded_channel::<proto::AgentMessage>();
        out_tx.send(self.hello())?;
        let mut inbound = client.session(UnboundedReceiverStream::new(out_rx)).await?.into_inner();
        let first = inbound.message().await?;
        let heartbeat = match first.and_then(|m| m.kind) {
            Some(FromCoordinator::Welcome(w)) => Duration::from_secs(w.heartbeat_seconds.clamp(1, 3600).into()),
            _ => return Err("the coordinator did not welcome this agent".into()),
        };
        tracing::info!(coordinator = %self.settings.settings.coordinator, "connected");
        for result in std::mem::take(&mut *lock(&self.undelivered)) {
            out_tx.send(proto::AgentMessage { kind: Some(ToCoordinator::Result(result)) })?;
        }
        let env = Arc::new(JobEnv { settings: self.settings.clone(), cache, outbox: out_tx.clone() });
        let mut tick = tokio::time::interval(heartbeat);
        loop {
            tokio::select! {
                message = inbound.message() => {
                    let Some(message) = message? else { return Ok(()) };
                    match message.kind {
                        Some(FromCoordinator::Assign(a)) => self.clone().start(env.clone(), a),
                        Some(FromCoordinator::Cancel(c)) => self.cancel(&c),
                        Some(FromCoordinator::Welcome(_)) | None => {}
                    }
                }
                _ = tick.tick() => {
                    let running = lock(&self.running)
                        .iter()
                        .map(|(job_id, r)| proto::RunningJob { job_id: job_id.clone(), attempt: r.attempt, lease_id: r.lease_id.clone() })
                        .collect();
                    out_tx.send(proto::AgentMessage { kind: Some(ToCoordinator::Heartbeat(proto::Heartbeat { running })) })?;
                }
                () = stop.cancelled() => return Ok(()),
            }
        }
    }

    fn start(self: Arc<Self>, env: Arc<JobEnv>, assignment: proto::Assignment) {
        let cancel = CancellationToken::new();
        {
            let mut running = lock(&self.running);
            if running.contains_key(&assignment.job_id) {
                return;
            }
            running.insert(
                assignment.job_id.clone(),
                Running { attempt: assignment.attempt, lease_id: assignment.lease_id.clone(), cancel: cancel.clone() },
            );
        }
        tokio::spawn(async move {
            let job_id = assignment.job_id.clone();
            let result = job::run(env.clone(), assignment, cancel).await;
            lock(&self.running).remove(&job_id);
            let message = proto::AgentMessage { kind: Some(ToCoordinator::Result(result.clone())) };
            if env.outbox.send(message).is_err() {
                lock(&self.undelivered).push(result);
            }
        });
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
