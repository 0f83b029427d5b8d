//! Placement by what a build needs of a machine: agents' labels, the
//! build's requirements (refused at submit when no known agent of a
//! platform satisfies them), the footprints jobs leave (the next build of
//! the repository prefers an agent whose memory covers the last peak plus
//! a margin) and jobs that ran out of memory (retried once on a larger
//! agent, else failed with a hint).

use braid_shared::Platform;
use braid_shared::placement::{self, Labels, Requirement, format_bytes, format_bytes_like};
use braid_shared::proto;

use super::{Effect, Farm};
use crate::model::{Declared, Footprint};

/// Labels of an agent that reported none.
pub static NO_LABELS: Labels = Labels::new();

/// Percent added to a learned peak for the memory an agent should have.
pub const FOOTPRINT_MARGIN_PERCENT: u64 = 25;

/// Agents named in one refusal.
const NAMED: usize = 8;

/// A build's requirements as stored; they were checked at submit, so a
/// stored one that no longer parses (a newer version's) is left out.
pub fn requirements(spec: &proto::BuildSpec) -> Vec<Requirement> {
    let mut out: Vec<Requirement> =
        spec.requirements.iter().filter_map(|r| placement::parse_requirement(r).ok()).collect();
    out.sort();
    out
}

/// An agent's memory, from its `memory` label.
pub fn memory_of(labels: &Labels) -> Option<u64> {
    labels.get(placement::MEMORY).and_then(|m| braid_shared::size::parse_ram(m))
}

/// The memory an agent has for a job, for the footprint preference: its
/// `memory` label, or its host's available memory as its last heartbeat
/// reported it when that is less (0: unknown).
pub fn free_memory(memory_label: Option<u64>, health: Option<&proto::AgentHealth>) -> u64 {
    let available = health.map(|h| h.memory_available_bytes).filter(|&m| m != 0);
    match (memory_label, available) {
        (Some(l), Some(a)) => l.min(a),
        (l, a) => l.or(a).unwrap_or(0),
    }
}

impl Farm {
    /// An agent's labels as its last hello reported them.
    pub fn labels_of(&self, name: &str) -> Labels {
        self.declared.get(name).map(|d| d.labels.clone()).unwrap_or_default()
    }

    pub(super) fn labels_ref(&self, name: &str) -> &Labels {
        self.declared.get(name).map_or(&NO_LABELS, |d| &d.labels)
    }

    /// Takes back the footprints jobs left (from the store).
    pub fn restore_footprints(&mut self, footprints: Vec<(String, Footprint)>) {
        self.footprints.extend(footprints);
    }

    /// The memory an agent should have for the next job of `key`: the
    /// last peak plus the margin (0: nothing learned).
    pub(super) fn preferred_memory(&self, key: &str) -> u64 {
        self.footprints.get(key).map_or(0, |f| f.peak_memory_bytes.saturating_mul(100 + FOOTPRINT_MARGIN_PERCENT) / 100)
    }

    /// For each platform: when agents are known that build it (natively,
    /// or by emulation where allowed) and none satisfies the build's
    /// requirements, why, naming the requirement and the agents' values.
    pub fn unmet_requirements(
        &self,
        platforms: &[Platform],
        allow_emulation: bool,
        requirements: &[Requirement],
    ) -> Option<String> {
        if requirements.is_empty() {
            return None;
        }
        let mut refusals = Vec::new();
        for platform in platforms {
            let reqs: Vec<&Requirement> = requirements.iter().filter(|r| r.applies_to(platform)).collect();
            let builds = |d: &Declared| {
                d.platforms.iter().any(|p| p.matches(platform))
                    || (allow_emulation && d.emulates.iter().any(|p| p.matches(platform)))
            };
            // Asked under the farm's lock at every submit: stop at the first
            // agent that satisfies them; gather the known ones only to refuse.
            if self.declared.values().any(|d| builds(d) && reqs.iter().all(|r| r.satisfied_by(&d.labels))) {
                continue;
            }
            let known: Vec<(&String, &Labels)> =
                self.declared.iter().filter(|(_, d)| builds(d)).map(|(n, d)| (n, &d.labels)).collect();
            if reqs.is_empty() || known.is_empty() || known.iter().any(|(_, l)| reqs.iter().all(|r| r.satisfied_by(l)))
            {
                continue;
            }
            // The first requirement none satisfies; else (each is met by
            // some agent) the first the first agent misses.
            let req = reqs
                .iter()
                .find(|r| !known.iter().any(|(_, l)| r.satisfied_by(l)))
                .or_else(|| reqs.iter().find(|r| !r.satisfied_by(known[0].1)))
                .copied()
                .unwrap_or(reqs[0]);
            let mut named: Vec<String> =
                known.iter().take(NAMED).map(|(n, l)| format!("{n} {}", req.what_has(l))).collect();
            if known.len() > NAMED {
                named.push(format!("and {} more", known.len() - NAMED));
            }
            let word = if known.len() == 1 { "agent" } else { "agents" };
            let mut shown = req.clone();
            shown.platform = None;
            refusals.push(format!("{platform}: {shown}: {word} {}", named.join(", ")));
        }
        (!refusals.is_empty()).then(|| refusals.join("\n"))
    }

    /// Keeps what a job used: on the job (for `braid inspect`) and, for a
    /// tagged build, as its repository's footprint on the platform.
    pub(super) fn record_footprint(&mut self, build_id: &str, job_id: &str, agent: &str, f: &proto::JobFootprint) {
        let now_ms = self.now();
        let Some(b) = self.builds.get_mut(build_id) else { return };
        let tagged = !b.tags.is_empty();
        let Some(platform) = b.record.jobs.iter().find(|j| j.id == job_id).map(|j| j.platform.clone()) else {
            return;
        };
        let key = b.affinity_key(&platform);
        let footprint = Footprint::from_proto(f, agent);
        if let Some(job) = b.record.jobs.iter_mut().find(|j| j.id == job_id) {
            job.footprint = Some(footprint.clone());
        }
        if tagged && footprint.peak_memory_bytes > 0 {
            // Bounded as the store is (which keeps the most recent): past
            // the limit one other entry goes from memory.
            if self.footprints.len() >= braid_shared::limits::FOOTPRINTS && !self.footprints.contains_key(&key) {
                let other = self.footprints.keys().next().cloned();
                other.map(|k| self.footprints.remove(&k));
            }
            self.footprints.insert(key.clone(), footprint.clone());
            self.out.push(Effect::Footprint { key, footprint, now_ms });
        }
    }

    /// A job the OOM killer hit: retried once, as an infrastructure
    /// failure, when a known agent of the platform has more memory (and
    /// meets the build's requirements); else the build fails with a hint.
    pub(super) fn out_of_memory(&mut self, build_id: &str, job_id: &str, agent: &str, f: &proto::JobFootprint) {
        let labels = self.labels_ref(agent).clone();
        let Some(b) = self.builds.get(build_id) else { return };
        let user_limit = b.spec.memory_limit_bytes;
        let reqs = requirements(&b.spec);
        let allow_emulation = b.spec.allow_emulation;
        let Some(job) = b.record.jobs.iter().find(|j| j.id == job_id) else { return };
        let platform = job.platform.clone();
        let retried = job.memory_floor != 0;
        let had = if f.memory_limit_bytes != 0 { f.memory_limit_bytes } else { memory_of(&labels).unwrap_or(0) };
        let message = if had == 0 {
            format!("{platform}: out of memory on {agent} (peak {})", format_bytes(f.peak_memory_bytes))
        } else {
            format!(
                "{platform}: out of memory on {agent} ({}, peak {})",
                format_bytes(had),
                format_bytes_like(f.peak_memory_bytes, had)
            )
        };
        if user_limit != 0 && f.memory_limit_bytes == user_limit {
            let hint = format!("; raise --memory (now {})", format_bytes(user_limit));
            return self.fail_build(build_id, job_id, message + &hint);
        }
        let larger = self.declared.iter().any(|(name, d)| {
            name != agent
                && (d.platforms.iter().any(|p| p.matches(&platform))
                    || (allow_emulation && d.emulates.iter().any(|p| p.matches(&platform))))
                && memory_of(&d.labels).is_some_and(|m| m > had)
                && reqs.iter().filter(|r| r.applies_to(&platform)).all(|r| r.satisfied_by(&d.labels))
        });
        if larger && !retried {
            if let Some(job) = self.job_mut(build_id, job_id) {
                job.memory_floor = had.max(1);
            }
            return self.requeue(build_id, job_id, &format!("{message}; a larger agent may take it"));
        }
        let want = (had.max(f.peak_memory_bytes) * 2).div_ceil(1 << 30).max(1);
        let hint = format!("; no larger agent of {platform} is known: add --require {platform}:memory>={want}GiB");
        self.fail_build(build_id, job_id, message + &hint);
    }
}
