//! The agents table: sessions, cordons, leases and lost agents.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use braid_shared::placement::Labels;
use braid_shared::proto;
use braid_shared::{Digest, Platform};

use super::{AgentEntry, Disconnect, Effect, Effects, Farm, FarmError, Result};

/// A session just opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connected {
    pub session: u64,
    /// Jobs the agent said it still holds (running, or results not
    /// acknowledged).
    pub claimed: usize,
    /// Those still leased to it, now running under this session.
    pub readopted: usize,
}
use crate::metrics::Metrics;
use crate::model::{CertStamp, Delivered, Delivery};

impl Farm {
    /// Jobs whose agents we have not heard from since a restart; they get
    /// `lost_after` to reconnect like any agent that goes quiet.
    pub(super) fn adopt_orphans(&mut self) {
        let now = self.now();
        let mut orphans: HashMap<String, Vec<(String, String)>> = HashMap::new();
        for b in self.builds.values() {
            for j in &b.record.jobs {
                if let Some((agent, _)) = j.status.leased() {
                    orphans.entry(agent.to_owned()).or_default().push((b.record.id.clone(), j.id.clone()));
                }
            }
        }
        for (name, jobs) in orphans {
            let cordoned = self.cordons.contains(&name);
            self.agents.insert(
                name.clone(),
                AgentEntry {
                    name,
                    platforms: Vec::new(),
                    slots: 0,
                    backend: String::new(),
                    version: String::new(),
                    running: jobs.into_iter().collect(),
                    session: 0,
                    connected: false,
                    last_seen_ms: now,
                    cordoned,
                    emulates: Vec::new(),
                    draining: false,
                    lost: false,
                    cert: None,
                    builder: None,
                    health: None,
                    labels: Labels::new(),
                    memory_label: None,
                },
            );
        }
    }

    /// Every known agent, by name.
    pub fn agent_list(&self) -> Vec<&AgentEntry> {
        // A BTreeMap: already in name order.
        self.agents.values().collect()
    }

    /// Sets or clears an operator's cordon.
    pub fn set_cordoned(&mut self, name: &str, cordoned: bool) -> Result<Effects> {
        let agent = self
            .agents
            .get_mut(name)
            .ok_or_else(|| FarmError::NotFound(format!("agent {:?} not found", braid_shared::shorten(name, 80))))?;
        agent.cordoned = cordoned;
        self.out.push(Effect::Cordon { agent: name.to_owned(), cordoned });
        if cordoned {
            self.cordons.insert(name.to_owned());
        } else {
            self.cordons.remove(name);
        }
        tracing::info!(agent = name, cordoned, "agent cordon changed");
        Ok(self.take())
    }

    /// Registers an agent's session; re-adopts the jobs it still runs and
    /// hands back those it lost. A connected agent's session is replaced
    /// only by one presenting the same certificate or one recorded after
    /// it (plaintext sessions carry none and always replace).
    pub fn agent_connected(
        &mut self,
        hello: &proto::Hello,
        platforms: Vec<Platform>,
        emulates: Vec<Platform>,
        cert: Option<CertStamp>,
    ) -> Result<(Connected, Effects)> {
        if let Some(prev) = self.agents.get(&hello.name)
            && prev.connected
            && let (Some(old), Some(new)) = (&prev.cert, &cert)
            && old.serial != new.serial
            && new.issued_ms <= old.issued_ms
        {
            return Err(FarmError::AlreadyExists(format!(
                "agent {:?} is connected with certificate serial {}; a session with certificate serial {}, not \
                 issued after it, may not replace it",
                hello.name, old.serial, new.serial
            )));
        }
        self.metrics.declare_platforms(platforms.iter().chain(&emulates).map(ToString::to_string));
        // check_hello validated them.
        let labels: Labels = hello.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let memory_label = super::placement::memory_of(&labels);
        let declared = crate::model::Declared {
            platforms: platforms.clone(),
            emulates: emulates.clone(),
            last_seen_ms: self.clock.now_ms(),
            labels: labels.clone(),
        };
        self.note_declared(&hello.name, Some(declared));
        let session = self.next_session;
        self.next_session += 1;
        let claimed: HashSet<(String, u32, String)> =
            hello.running.iter().map(|r| (r.job_id.clone(), r.attempt, r.lease_id.clone())).collect();
        let previous = self.agents.remove(&hello.name);
        // check_hello validated it; an invalid one never gets here.
        let builder = crate::model::Builder::from_hello(hello.builder.as_ref()).ok().flatten();
        if previous.as_ref().is_none_or(|p| p.builder != builder) {
            self.out.push(Effect::Builder { agent: hello.name.clone(), builder: builder.clone() });
        }
        let mut running = HashSet::new();
        let mut lost = Vec::new();
        if let Some(prev) = previous {
            if prev.connected {
                let agent = prev.name.clone();
                self.out.push(Effect::Disconnect { session: prev.session, agent, why: Disconnect::Replaced });
            }
            for (build_id, job_id) in prev.running {
                let still = self
                    .builds
                    .get(&build_id)
                    .and_then(|b| b.record.jobs.iter().find(|j| j.id == job_id))
                    .and_then(|j| j.status.leased().map(|(_, lease)| (j.attempt, lease.to_owned())))
                    .is_some_and(|(attempt, lease)| claimed.contains(&(job_id.clone(), attempt, lease)));
                if still {
                    running.insert((build_id, job_id));
                } else {
                    lost.push((build_id, job_id));
                }
            }
        }
        // Jobs the agent runs that we no longer lease to it: stop them.
        for r in &hello.running {
            let ours = running.iter().any(|(_, j)| *j == r.job_id);
            if !ours {
                let cancel = proto::CancelJob {
                    job_id: r.job_id.clone(),
                    attempt: r.attempt,
                    reason: "the coordinator no longer leases this job to this agent".into(),
                };
                self.out.push(Effect::Cancel { session, cancel });
            }
        }
        self.agents.insert(
            hello.name.clone(),
            AgentEntry {
                name: hello.name.clone(),
                platforms,
                // validate_hello allows 1 to AGENT_SLOTS; the fallback is never taken.
                slots: u32::try_from(hello.slots).unwrap_or(braid_shared::limits::AGENT_SLOTS),
                backend: hello.backend.clone(),
                version: hello.version.clone(),
                running,
                session,
                connected: true,
                last_seen_ms: self.clock.now_ms(),
                cordoned: self.cordons.contains(&hello.name),
                emulates,
                draining: false,
                lost: false,
                cert,
                builder,
                health: None,
                labels,
                memory_label,
            },
        );
        let readopted = self.agents.get(&hello.name).map_or(0, |a| a.running.len());
        for (build_id, job_id) in lost {
            self.requeue(&build_id, &job_id, &format!("agent {} restarted without it", hello.name));
        }
        self.new_incarnation(&hello.name, &hello.incarnation);
        Ok((Connected { session, claimed: hello.running.len(), readopted }, self.take()))
    }

    /// Takes back the builders agents last reported (from the store), for
    /// the agents known before they reconnect.
    pub fn restore_builders(&mut self, builders: Vec<(String, crate::model::Builder)>) {
        for (name, builder) in builders {
            if let Some(agent) = self.agents.get_mut(&name) {
                agent.builder.get_or_insert(builder);
            }
        }
    }

    /// Takes back the last message applied per agent (from the store).
    pub fn restore_deliveries(&mut self, deliveries: Vec<(String, Delivered)>) {
        self.deliveries = deliveries.into_iter().collect();
    }

    /// A new agent process numbers its messages from 1 again; the same
    /// process reconnecting goes on where it was. An agent that numbers
    /// nothing (empty incarnation) gets no deduplication.
    fn new_incarnation(&mut self, name: &str, incarnation: &str) {
        if incarnation.is_empty() {
            self.deliveries.remove(name);
            return;
        }
        if self.deliveries.get(name).is_none_or(|d| d.incarnation != incarnation) {
            let fresh = Delivered { incarnation: incarnation.to_owned(), seq: 0 };
            self.deliveries.insert(name.to_owned(), fresh);
        }
    }

    /// Decides about an agent's message numbered `seq` (0: unnumbered,
    /// always applied), and notes it as applied.
    pub fn accept(&mut self, name: &str, session: u64, seq: u64) -> Delivery {
        if self.agents.get(name).is_none_or(|a| a.session != session) {
            return Delivery::Stale;
        }
        let Some(last) = self.deliveries.get_mut(name).filter(|_| seq > 0) else {
            return Delivery::Apply;
        };
        if seq <= last.seq {
            return Delivery::Duplicate;
        }
        last.seq = seq;
        Delivery::Apply
    }

    /// Stores the agent's last applied number with the last events its
    /// message made, in their transaction: a restart then repeats none of
    /// them. (A message that made no events changed nothing a resend could
    /// double: results and progress apply only to the state they expect.)
    pub(super) fn mark_delivered(&mut self, name: &str) {
        let Some(d) = self.deliveries.get(name).filter(|d| d.seq > 0) else { return };
        let last_append = self.out.iter_mut().rev().find_map(|e| match e {
            Effect::Append { delivered, .. } => Some(delivered),
            _ => None,
        });
        if let Some(delivered) = last_append {
            *delivered = Some((name.to_owned(), d.clone()));
        }
    }

    /// Closes the live session of `name` if it presented another certificate
    /// than `keep` (one just revoked by a newer one). Its jobs stay leased:
    /// the newer certificate's session re-adopts those it still runs, the
    /// rest are re-queued when the agent is declared lost.
    pub fn close_superseded_session(&mut self, name: &str, keep: &str) -> Effects {
        let Some(agent) = self.agents.get_mut(name) else { return Vec::new() };
        if agent.cert.as_ref().is_none_or(|c| c.serial == keep) || !agent.connected {
            return Vec::new();
        }
        agent.connected = false;
        let session = agent.session;
        tracing::warn!(agent = name, "closed a session whose certificate was superseded");
        self.out.push(Effect::Disconnect { session, agent: name.to_owned(), why: Disconnect::Superseded });
        self.take()
    }

    /// `braid agents forget`: closes the agent's session, re-queues its
    /// running jobs as for a lost agent and drops it from the farm.
    /// Returns (a live session was closed, jobs re-queued).
    pub fn forget_agent(&mut self, name: &str) -> ((bool, u32), Effects) {
        // Known from the store only (not seen since a restart): its
        // platforms go all the same.
        if self.declared.contains_key(name) {
            self.note_declared(name, None);
        }
        let Some(agent) = self.agents.remove(name) else {
            return ((false, 0), self.take());
        };
        self.deliveries.remove(name);
        let disconnected = agent.connected;
        if disconnected {
            self.out.push(Effect::Disconnect {
                session: agent.session,
                agent: name.to_owned(),
                why: Disconnect::Forgotten,
            });
        }
        self.out.push(Effect::Builder { agent: name.to_owned(), builder: None });
        let requeued = agent.running.len() as u32;
        for (build_id, job_id) in agent.running {
            self.requeue(&build_id, &job_id, &format!("agent {name} was forgotten"));
        }
        tracing::warn!(agent = name, disconnected, requeued, "agent forgotten");
        ((disconnected, requeued), self.take())
    }

    /// The session ended; the agent keeps its jobs until it is lost.
    /// Stores when it was last seen, for the notices of builds waiting
    /// for it after a restart.
    pub fn agent_disconnected(&mut self, name: &str, session: u64) -> Effects {
        if let Some(agent) = self.agents.get_mut(name)
            && agent.session == session
        {
            agent.connected = false;
            let seen = agent.last_seen_ms;
            self.store_last_seen(name, seen);
        }
        self.take()
    }

    pub fn heartbeat(&mut self, name: &str, session: u64) {
        let now = self.now();
        if let Some(agent) = self.agents.get_mut(name)
            && agent.session == session
        {
            agent.last_seen_ms = now;
        }
    }

    /// Keeps an agent's latest health report (checked by the caller).
    pub fn set_health(&mut self, name: &str, session: u64, health: Option<proto::AgentHealth>) {
        if let Some(agent) = self.agents.get_mut(name)
            && agent.session == session
        {
            agent.health = health;
        }
    }

    /// The agent said it is stopping: no new jobs for it.
    pub fn set_draining(&mut self, name: &str, session: u64, draining: bool) {
        if let Some(agent) = self.agents.get_mut(name)
            && agent.session == session
            && agent.draining != draining
        {
            agent.draining = draining;
            tracing::info!(agent = name, draining, "agent drain state changed");
        }
    }

    /// Declares lost the agents unheard of for `lost_after`, and re-queues
    /// their jobs.
    pub fn reap(&mut self, lost_after: Duration) -> Effects {
        let now = self.now();
        let lost_after = i64::try_from(lost_after.as_millis()).unwrap_or(i64::MAX);
        let lost: Vec<String> = self
            .agents
            .values()
            .filter(|a| !a.lost && now.saturating_sub(a.last_seen_ms) > lost_after)
            .map(|a| a.name.clone())
            .collect();
        for name in lost {
            let Some(agent) = self.agents.get_mut(&name) else {
                continue;
            };
            tracing::warn!(agent = %name, jobs = agent.running.len(), "agent lost");
            Metrics::add(&self.metrics.agents_lost, 1);
            agent.lost = true;
            if agent.connected {
                agent.connected = false;
                let session = agent.session;
                self.out.push(Effect::Disconnect { session, agent: name.clone(), why: Disconnect::Lost });
            }
            let running = std::mem::take(&mut agent.running);
            let seen = agent.last_seen_ms;
            self.store_last_seen(&name, seen);
            for (build_id, job_id) in running {
                self.requeue(&build_id, &job_id, &format!("agent {name} was lost"));
            }
        }
        self.take()
    }

    /// Checks that `agent` holds the current lease of a job.
    pub(super) fn leased_to(
        &self,
        name: &str,
        session: u64,
        build_id: &str,
        job_id: &str,
        attempt: u32,
        lease: Option<&str>,
    ) -> bool {
        let agent_ok = self.agents.get(name).is_some_and(|a| a.session == session);
        let job_ok =
            self.builds.get(build_id).and_then(|b| b.record.jobs.iter().find(|j| j.id == job_id)).is_some_and(|j| {
                j.attempt == attempt
                    && j.status.leased().is_some_and(|(a, l)| a == name && lease.is_none_or(|want| want == l))
            });
        agent_ok && job_ok
    }

    /// The agent holding `lease` on a job's `attempt`, when the job's build
    /// exports (so it may upload blobs).
    pub fn exporting_lease_holder(&self, job_id: &str, attempt: u32, lease: &str) -> Option<String> {
        let b = self.builds.get(self.job_index.get(job_id)?)?;
        if !b.spec.export {
            return None;
        }
        let job = b.record.jobs.iter().find(|j| j.id == job_id && j.attempt == attempt)?;
        job.status.leased().filter(|(_, l)| *l == lease).map(|(agent, _)| agent.to_owned())
    }

    /// The agent holding `lease` on a job's `attempt`, and the context digest
    /// of the job's build (a context is served only to such an agent).
    pub fn lease_holder_and_context(&self, job_id: &str, attempt: u32, lease: &str) -> Option<(String, String)> {
        let b = self.builds.get(self.job_index.get(job_id)?)?;
        let job = b.record.jobs.iter().find(|j| j.id == job_id && j.attempt == attempt)?;
        let (agent, _) = job.status.leased().filter(|(_, l)| *l == lease)?;
        Some((agent.to_owned(), b.spec.context_digest.clone()))
    }

    /// The agent holding `lease` on a job's `attempt`, the job's build and
    /// its `--ssh` ids (an SSH tunnel is opened only by that agent).
    pub fn ssh_lease(&self, job_id: &str, attempt: u32, lease: &str) -> Option<(String, String, Vec<String>)> {
        let build_id = self.job_index.get(job_id)?;
        let b = self.builds.get(build_id)?;
        let job = b.record.jobs.iter().find(|j| j.id == job_id && j.attempt == attempt)?;
        let (agent, _) = job.status.leased().filter(|(_, l)| *l == lease)?;
        Some((agent.to_owned(), build_id.clone(), b.spec.ssh_ids.clone()))
    }

    /// A context is served only to the agent holding the current lease of a
    /// job whose build uses it (`caller` is None in plaintext mode, where the
    /// lease alone counts).
    pub fn check_context_lease(
        &self,
        caller: Option<&str>,
        job_id: &str,
        attempt: u32,
        lease: &str,
        digest: &Digest,
    ) -> Result<()> {
        if job_id.is_empty() {
            return Err(FarmError::PermissionDenied(
                "job_id: required; a context is served only to the agent holding a lease on a job whose build uses it"
                    .into(),
            ));
        }
        let shown = braid_shared::shorten(job_id, 80);
        let (holder, context) = self.lease_holder_and_context(job_id, attempt, lease).ok_or_else(|| {
            FarmError::FailedPrecondition(format!(
                "job {shown} attempt {attempt}: no such lease (cancelled or re-queued?); no context served"
            ))
        })?;
        if let Some(name) = caller
            && name != holder
        {
            return Err(FarmError::PermissionDenied(format!(
                "job {shown} is leased to agent {holder:?}, not {name:?}"
            )));
        }
        let named = |d: &str| {
            let Some(b) = self.job_index.get(job_id).and_then(|id| self.builds.get(id)) else { return false };
            b.spec
                .build_contexts
                .iter()
                .any(|c| c.value.strip_prefix(braid_shared::buildneeds::UPLOADED_SCHEME) == Some(d))
        };
        // The build's main context, or one of its --build-context directories.
        let wanted = digest.to_string();
        if context != wanted && !named(&wanted) {
            return Err(FarmError::PermissionDenied(format!(
                "job {shown}'s build uses context {context}, not {digest}"
            )));
        }
        Ok(())
    }
}
