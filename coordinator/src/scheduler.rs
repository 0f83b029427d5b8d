//! The placement decision, as a pure function of the queue and the agents.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};

use braid_shared::Platform;
use braid_shared::capability::CapSet;
use braid_shared::placement::{Labels, Requirement};

/// A job waiting for an agent.
#[derive(Debug, Clone)]
pub struct QueuedJob {
    pub job_id: String,
    /// Builds are served in this order, one job each in turn.
    pub build_order: u64,
    pub platform: Platform,
    /// Repository and platform: the agent that last built it has a warm cache.
    pub affinity_key: String,
    /// The build allows emulation where no agent builds the platform natively.
    pub allow_emulation: bool,
    /// Who submitted the build (token id; empty without tokens): submitters
    /// take turns, then their builds do.
    pub submitter: String,
    /// What its build needs of the agent's builder: only an agent whose
    /// builder has all of it may take the job.
    pub needs: CapSet,
    /// What an agent's labels must satisfy (the build's `--require` for
    /// this platform, sorted; after an out-of-memory failure, more memory).
    pub requires: Vec<Requirement>,
    /// Memory an agent should have (its `memory` label) for this job: the
    /// repository's learned peak plus a margin; a preference only (0: none).
    pub prefer_memory: u64,
}

/// One placement decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub job_id: String,
    pub agent: String,
    pub emulated: bool,
}

/// What the scheduler needs to know of one agent, borrowed from the farm
/// (a pass over 10,000 agents copies none of them). `assign` takes them
/// sorted by name.
#[derive(Debug, Clone)]
pub struct AgentView<'a> {
    pub name: &'a str,
    pub platforms: &'a [Platform],
    /// Platforms it runs only through emulation.
    pub emulates: &'a [Platform],
    pub slots: u32,
    pub running: u32,
    pub schedulable: bool,
    /// What its builder can do.
    pub capabilities: CapSet,
    /// Its labels (see `braid_shared::placement`).
    pub labels: &'a Labels,
    /// Its `memory` label in bytes (0: unknown).
    pub memory: u64,
}

impl AgentView<'_> {
    pub fn builds(&self, platform: &Platform) -> bool {
        self.platforms.iter().any(|p| p.matches(platform))
    }

    pub fn emulates(&self, platform: &Platform) -> bool {
        self.emulates.iter().any(|p| p.matches(platform))
    }

    /// Its builder has everything in `needs`.
    pub fn can(&self, needs: CapSet) -> bool {
        self.capabilities.has_all(needs)
    }

    /// Its builder has what the job needs and its labels satisfy the
    /// job's requirements.
    pub fn meets(&self, needs: CapSet, requires: &[Requirement]) -> bool {
        self.can(needs) && requires.iter().all(|r| r.satisfied_by(self.labels))
    }

    /// It has less memory than `prefer` (never when nothing is preferred).
    pub fn short_of(&self, prefer: u64) -> bool {
        prefer != 0 && self.memory < prefer
    }
}

/// Assigns queued jobs to agents: only to an agent that builds the platform
/// natively, whose builder has what the job needs, whose labels satisfy its
/// requirements, is schedulable and has a free slot; preferring an agent
/// whose memory covers the job's learned footprint, then the agent that
/// built the same affinity key last, then the least loaded, then the one
/// warm for the fewest other keys (so repositories spread). Builds take turns
/// (one job each per round), so one wide build cannot starve the others.
///
/// A job whose build allows emulation may go to an agent that emulates its
/// platform (and has what it needs), but only while no schedulable agent
/// that has what it needs builds it natively.
pub fn assign(queue: &[QueuedJob], agents: &[AgentView<'_>], last_agent: &HashMap<String, String>) -> Vec<Placement> {
    let mut pool = Pool::new(queue, agents, last_agent);
    // submitter -> build order -> jobs; the oldest submitter's turn first.
    let mut by_submitter: BTreeMap<&str, BTreeMap<u64, Vec<&QueuedJob>>> = BTreeMap::new();
    for job in queue {
        by_submitter.entry(job.submitter.as_str()).or_default().entry(job.build_order).or_default().push(job);
    }
    let mut lanes: Vec<Lane> = by_submitter
        .into_values()
        .map(|builds| Lane { builds: builds.into_values().map(Into::into).collect(), next: 0 })
        .collect();
    lanes.sort_by_key(|l| l.builds.first().and_then(|b| b.front()).map(|j| j.build_order));
    let mut out = Vec::new();
    loop {
        let mut progressed = false;
        for lane in &mut lanes {
            // This submitter places one job, from its next build that can.
            let count = lane.builds.len();
            for step in 0..count {
                let b = (lane.next + step) % count;
                let found =
                    lane.builds[b].iter().enumerate().find_map(|(pos, job)| pool.pick(job).map(|choice| (pos, choice)));
                let Some((pos, (i, emulated))) = found else { continue };
                let Some(job) = lane.builds[b].remove(pos) else { continue };
                pool.take_slot(i);
                out.push(Placement { job_id: job.job_id.clone(), agent: agents[i].name.to_owned(), emulated });
                lane.next = (b + 1) % count;
                progressed = true;
                break;
            }
        }
        if !progressed {
            return out;
        }
    }
}

/// One submitter's queued builds, served in rotation.
struct Lane<'a> {
    builds: Vec<std::collections::VecDeque<&'a QueuedJob>>,
    next: usize,
}

/// Lower sorts first: memory enough for the footprint, least loaded, then
/// warm for the fewest other keys, then by name, which is the agent's
/// index (the warm agent is looked up directly).
type Preference = (bool, u64, usize, usize);

/// What a group's jobs ask of an agent: platform, builder, labels, memory.
type Demand<'a> = (&'a Platform, CapSet, &'a [Requirement], u64);

/// The agents that could take a job of one platform, the free ones in a
/// min-heap by preference, so a placement costs a lookup, not a scan of
/// the farm. An agent whose load changed is pushed again; the stale entry
/// is dropped when it reaches the top.
struct Group<'a> {
    platform: &'a Platform,
    needs: CapSet,
    requires: &'a [Requirement],
    prefer_memory: u64,
    emulated: bool,
    members: usize,
    free: BinaryHeap<Reverse<Preference>>,
}

/// Agents grouped by the queue's platforms, natively and by emulation.
struct Pool<'a> {
    agents: &'a [AgentView<'a>],
    running: Vec<u32>,
    spread: Vec<usize>,
    last_agent: &'a HashMap<String, String>,
    native: HashMap<Demand<'a>, usize>,
    emulated: HashMap<Demand<'a>, usize>,
    groups: Vec<Group<'a>>,
}

impl<'a> Pool<'a> {
    fn new(queue: &'a [QueuedJob], agents: &'a [AgentView<'a>], last_agent: &'a HashMap<String, String>) -> Pool<'a> {
        debug_assert!(agents.windows(2).all(|w| w[0].name < w[1].name), "agents come in name order");
        let mut spread = vec![0; agents.len()];
        for name in last_agent.values() {
            if let Some(i) = index_of(agents, name) {
                spread[i] += 1;
            }
        }
        let mut pool = Pool {
            agents,
            running: agents.iter().map(|a| a.running).collect(),
            spread,
            last_agent,
            native: HashMap::new(),
            emulated: HashMap::new(),
            groups: Vec::new(),
        };
        for job in queue {
            let key = demand(job);
            if !pool.native.contains_key(&key) {
                let g = pool.group(key, false);
                pool.native.insert(key, g);
            }
            if job.allow_emulation && !pool.emulated.contains_key(&key) {
                let g = pool.group(key, true);
                pool.emulated.insert(key, g);
            }
        }
        pool
    }

    fn preference(&self, i: usize, prefer_memory: u64) -> Preference {
        let load = u64::from(self.running[i]) * 1_000_000 / u64::from(self.agents[i].slots.max(1));
        (self.agents[i].short_of(prefer_memory), load, self.spread[i], i)
    }

    fn is_free(&self, i: usize) -> bool {
        self.running[i] < self.agents[i].slots
    }

    /// The group of the schedulable agents that build the platform, or
    /// emulate it, and meet the demand.
    fn group(&mut self, demand: Demand<'a>, emulated: bool) -> usize {
        let (platform, needs, requires, prefer_memory) = demand;
        let mut group =
            Group { platform, needs, requires, prefer_memory, emulated, members: 0, free: BinaryHeap::new() };
        let mut free = Vec::new();
        for (i, agent) in self.agents.iter().enumerate() {
            if group.admits(agent) {
                group.members += 1;
                if self.is_free(i) {
                    free.push(Reverse(self.preference(i, prefer_memory)));
                }
            }
        }
        group.free = BinaryHeap::from(free);
        self.groups.push(group);
        self.groups.len() - 1
    }

    /// The agent for a job and whether it would emulate: the warm agent if
    /// it can take it, else the most preferred free one.
    fn pick(&mut self, job: &QueuedJob) -> Option<(usize, bool)> {
        let key = demand(job);
        let native = *self.native.get(&key)?;
        let (g, emulated) = if self.groups[native].members > 0 {
            (native, false)
        } else if job.allow_emulation {
            (*self.emulated.get(&key)?, true)
        } else {
            return None;
        };
        let warm = self.last_agent.get(&job.affinity_key).and_then(|name| index_of(self.agents, name));
        if let Some(w) = warm
            && self.groups[g].admits(&self.agents[w])
            && self.is_free(w)
            && !self.agents[w].short_of(job.prefer_memory)
        {
            return Some((w, emulated));
        }
        while let Some(&Reverse(top)) = self.groups[g].free.peek() {
            let i = top.3;
            if self.is_free(i) && top == self.preference(i, job.prefer_memory) {
                return Some((i, emulated));
            }
            self.groups[g].free.pop();
        }
        None
    }

    /// One more job on agent `i`: its place in every group it is in moves.
    fn take_slot(&mut self, i: usize) {
        self.running[i] += 1;
        if !self.is_free(i) {
            return;
        }
        let (_, load, spread, _) = self.preference(i, 0);
        let agent = &self.agents[i];
        for group in self.groups.iter_mut().filter(|g| g.admits(agent)) {
            group.free.push(Reverse((agent.short_of(group.prefer_memory), load, spread, i)));
        }
    }
}

impl Group<'_> {
    fn admits(&self, agent: &AgentView<'_>) -> bool {
        agent.schedulable
            && agent.meets(self.needs, self.requires)
            && if self.emulated { agent.emulates(self.platform) } else { agent.builds(self.platform) }
    }
}

fn demand(job: &QueuedJob) -> Demand<'_> {
    (&job.platform, job.needs, &job.requires, job.prefer_memory)
}

/// An agent's index by name, in agents sorted by name.
fn index_of(agents: &[AgentView<'_>], name: &str) -> Option<usize> {
    agents.binary_search_by(|a| a.name.cmp(name)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use braid_shared::capability::Capability;
    use proptest::prelude::*;

    static NO_LABELS: Labels = Labels::new();

    fn p(s: &str) -> Platform {
        s.parse().unwrap()
    }

    /// Views borrow from the farm; tests leak what they would borrow.
    fn leak<T>(v: Vec<T>) -> &'static [T] {
        Box::leak(v.into_boxed_slice())
    }

    fn agent(name: &str, platforms: &[&str], slots: u32, running: u32) -> AgentView<'static> {
        AgentView {
            name: Box::leak(name.to_owned().into_boxed_str()),
            platforms: leak(platforms.iter().map(|s| p(s)).collect()),
            emulates: &[],
            slots,
            running,
            schedulable: true,
            capabilities: CapSet::EMPTY,
            labels: &NO_LABELS,
            memory: 0,
        }
    }

    fn job(id: &str, build: u64, platform: &str, key: &str) -> QueuedJob {
        QueuedJob {
            job_id: id.into(),
            build_order: build,
            platform: p(platform),
            affinity_key: key.into(),
            allow_emulation: false,
            submitter: String::new(),
            needs: CapSet::EMPTY,
            requires: Vec::new(),
            prefer_memory: 0,
        }
    }

    #[test]
    fn routes_by_platform_and_prefers_warm_then_least_loaded() {
        let agents = [
            agent("amd", &["linux/amd64"], 2, 0),
            agent("arm-a", &["linux/arm64"], 2, 1),
            agent("arm-b", &["linux/arm64"], 2, 0),
        ];
        let queue = [job("1", 1, "linux/amd64", "r|amd64"), job("2", 1, "linux/aarch64", "r|arm64")];
        let out = assign(&queue, &agents, &HashMap::new());
        assert_eq!(pairs(&out), [("1", "amd"), ("2", "arm-b")]);
        let warm = HashMap::from([("r|arm64".to_owned(), "arm-a".to_owned())]);
        let out = assign(&queue[1..], &agents, &warm);
        assert_eq!(pairs(&out), [("2", "arm-a")]);
    }

    #[test]
    fn a_busy_submitter_does_not_starve_another() {
        let agents = [agent("amd", &["linux/amd64"], 2, 0)];
        let mut queue = Vec::new();
        for b in 0..5 {
            for n in 0..3 {
                queue.push(QueuedJob {
                    submitter: "busy".into(),
                    ..job(&format!("busy-{b}-{n}"), b, "linux/amd64", "a")
                });
            }
        }
        queue.push(QueuedJob { submitter: "other".into(), ..job("other-1", 9, "linux/amd64", "b") });
        let out = assign(&queue, &agents, &HashMap::new());
        let ids: Vec<&str> = out.iter().map(|p| p.job_id.as_str()).collect();
        assert_eq!(ids, ["busy-0-0", "other-1"]);
    }

    fn pairs(out: &[Placement]) -> Vec<(&str, &str)> {
        out.iter().map(|p| (p.job_id.as_str(), p.agent.as_str())).collect()
    }

    #[test]
    fn emulation_only_when_asked_and_no_native_agent_exists() {
        let mut amd = agent("amd", &["linux/amd64"], 2, 0);
        amd.emulates = leak(vec![p("linux/arm64")]);
        let arm = agent("arm", &["linux/arm64"], 1, 1);
        let wants = |allow| QueuedJob { allow_emulation: allow, ..job("1", 1, "linux/arm64", "k") };
        assert!(assign(&[wants(false)], std::slice::from_ref(&amd), &HashMap::new()).is_empty(), "not asked");
        let out = assign(&[wants(true)], std::slice::from_ref(&amd), &HashMap::new());
        assert_eq!(out, [Placement { job_id: "1".into(), agent: "amd".into(), emulated: true }]);
        // A busy native agent is waited for rather than emulated.
        assert!(assign(&[wants(true)], &[amd, arm], &HashMap::new()).is_empty());
    }

    #[test]
    fn a_second_repository_spreads_to_the_cold_agent() {
        let agents = [agent("arm-a", &["linux/arm64"], 1, 0), agent("arm-b", &["linux/arm64"], 1, 0)];
        let warm = HashMap::from([("repo-one|linux/arm64".to_owned(), "arm-a".to_owned())]);
        let out = assign(&[job("1", 1, "linux/arm64", "repo-two|linux/arm64")], &agents, &warm);
        assert_eq!(pairs(&out), [("1", "arm-b")]);
        let out = assign(&[job("2", 1, "linux/arm64", "repo-one|linux/arm64")], &agents, &warm);
        assert_eq!(pairs(&out), [("2", "arm-a")]);
    }

    #[test]
    fn nothing_for_unserved_platforms_or_cordoned_agents() {
        let mut cordoned = agent("amd", &["linux/amd64"], 4, 0);
        cordoned.schedulable = false;
        let queue = [job("1", 1, "linux/riscv64", "k"), job("2", 1, "linux/amd64", "k")];
        assert!(assign(&queue, &[cordoned], &HashMap::new()).is_empty());
    }

    #[test]
    fn builds_take_turns() {
        let agents = [agent("amd", &["linux/amd64"], 2, 0)];
        let queue = [
            job("wide-1", 1, "linux/amd64", "a"),
            job("wide-2", 1, "linux/amd64", "a"),
            job("wide-3", 1, "linux/amd64", "a"),
            job("small-1", 2, "linux/amd64", "b"),
        ];
        let out = assign(&queue, &agents, &HashMap::new());
        let ids: Vec<&str> = out.iter().map(|p| p.job_id.as_str()).collect();
        assert_eq!(ids, ["wide-1", "small-1"]);
    }

    /// Two bits of a small number as a set of two capabilities.
    fn caps_of(bits: u8) -> CapSet {
        let mut set = CapSet::EMPTY;
        if bits & 1 != 0 {
            set.insert(Capability::Secrets);
        }
        if bits & 2 != 0 {
            set.insert(Capability::Heredocs);
        }
        set
    }

    #[test]
    fn a_job_goes_only_to_an_agent_with_what_it_needs() {
        let mut plain = agent("a-plain", &["linux/amd64"], 4, 0);
        plain.capabilities = caps_of(2);
        let mut secrets = agent("b-secrets", &["linux/amd64"], 1, 1);
        secrets.capabilities = caps_of(1);
        let needs = QueuedJob { needs: caps_of(1), ..job("1", 1, "linux/amd64", "k") };
        // The agent that can is busy: the job waits rather than go to the idle one that cannot.
        assert!(assign(std::slice::from_ref(&needs), &[plain.clone(), secrets.clone()], &HashMap::new()).is_empty());
        secrets.running = 0;
        let out = assign(&[needs.clone(), job("2", 2, "linux/amd64", "k")], &[plain, secrets], &HashMap::new());
        assert_eq!(pairs(&out), [("1", "b-secrets"), ("2", "a-plain")]);
        // A native agent lacking what the job needs does not stop emulation on one that has it.
        let mut emulator = agent("emu", &["linux/amd64"], 1, 0);
        emulator.emulates = leak(vec![p("linux/arm64")]);
        emulator.capabilities = caps_of(1);
        let native = agent("native", &["linux/arm64"], 1, 0);
        let arm = QueuedJob { needs: caps_of(1), allow_emulation: true, ..job("3", 1, "linux/arm64", "k") };
        let out = assign(&[arm], &[emulator, native], &HashMap::new());
        assert_eq!(out, [Placement { job_id: "3".into(), agent: "emu".into(), emulated: true }]);
    }

    /// Labels from three bits: memory 1, 2 or 4 GiB (or none), and an ssd.
    fn labelled(bits: u8) -> AgentView<'static> {
        let mut labels = Labels::new();
        let memory = match bits & 3 {
            0 => 0,
            n => 1u64 << (29 + n),
        };
        if memory != 0 {
            labels.insert("memory".into(), format!("{}MiB", memory >> 20));
        }
        if bits & 4 != 0 {
            labels.insert("disk".into(), "ssd".into());
        }
        AgentView { labels: Box::leak(Box::new(labels)), memory, ..agent("x", &[], 1, 0) }
    }

    /// One of four requirement sets.
    fn requirements_of(n: u8) -> Vec<Requirement> {
        let raw: &[&str] = match n {
            0 => &[],
            1 => &["memory>=2GiB"],
            2 => &["disk=ssd"],
            _ => &["memory>2GiB", "disk!=ssd"],
        };
        raw.iter().map(|r| braid_shared::placement::parse_requirement(r).unwrap()).collect()
    }

    #[test]
    fn requirements_route_and_footprints_steer() {
        let small = AgentView { name: "a-small", platforms: leak(vec![p("linux/arm/v7")]), ..labelled(1) };
        let big = AgentView { name: "b-big", platforms: leak(vec![p("linux/arm/v7")]), ..labelled(3 | 4) };
        let agents = [small, big];
        let need = QueuedJob { requires: requirements_of(1), ..job("1", 1, "linux/arm/v7", "k") };
        assert_eq!(pairs(&assign(&[need], &agents, &HashMap::new())), [("1", "b-big")]);
        // Without a footprint the small one (first by name) takes it; with
        // one over its memory the big one does, even when the small is warm.
        let warm = HashMap::from([("k".to_owned(), "a-small".to_owned())]);
        assert_eq!(pairs(&assign(&[job("2", 1, "linux/arm/v7", "k")], &agents, &warm)), [("2", "a-small")]);
        let steered = QueuedJob { prefer_memory: 3 << 30, ..job("3", 1, "linux/arm/v7", "k") };
        assert_eq!(pairs(&assign(std::slice::from_ref(&steered), &agents, &warm)), [("3", "b-big")]);
        // A preference only: with the big one full the small one takes it.
        let full = [agents[0].clone(), AgentView { running: 1, ..agents[1].clone() }];
        assert_eq!(pairs(&assign(&[steered], &full, &warm)), [("3", "a-small")]);
    }

    const PLATFORMS: &[&str] =
        &["linux/amd64", "linux/arm64", "linux/arm/v7", "linux/arm/v6", "linux/386", "linux/riscv64"];

    /// The first, scanning version of `assign`: every job against every
    /// agent. The indexed one must decide exactly as it did.
    fn reference_assign(
        queue: &[QueuedJob],
        agents: &[AgentView],
        last_agent: &HashMap<String, String>,
    ) -> Vec<Placement> {
        let mut running: Vec<u32> = agents.iter().map(|a| a.running).collect();
        let mut warm_keys: HashMap<&str, usize> = HashMap::new();
        for agent in last_agent.values() {
            *warm_keys.entry(agent.as_str()).or_default() += 1;
        }
        // submitter -> build order -> jobs; the oldest submitter's turn first.
        let mut by_submitter: BTreeMap<&str, BTreeMap<u64, Vec<&QueuedJob>>> = BTreeMap::new();
        for job in queue {
            by_submitter.entry(job.submitter.as_str()).or_default().entry(job.build_order).or_default().push(job);
        }
        let mut lanes: Vec<RefLane> = by_submitter
            .into_values()
            .map(|builds| RefLane { builds: builds.into_values().map(Into::into).collect(), next: 0 })
            .collect();
        lanes.sort_by_key(|l| l.builds.first().and_then(|b| b.front()).map(|j| j.build_order));
        let mut out = Vec::new();
        loop {
            let mut progressed = false;
            for lane in &mut lanes {
                // This submitter places one job, from its next build that can.
                let count = lane.builds.len();
                for step in 0..count {
                    let b = (lane.next + step) % count;
                    let found = lane.builds[b].iter().enumerate().find_map(|(pos, job)| {
                        reference_pick(job, agents, &running, last_agent, &warm_keys).map(|choice| (pos, choice))
                    });
                    let Some((pos, (i, emulated))) = found else { continue };
                    let Some(job) = lane.builds[b].remove(pos) else { continue };
                    running[i] += 1;
                    out.push(Placement { job_id: job.job_id.clone(), agent: agents[i].name.to_owned(), emulated });
                    lane.next = (b + 1) % count;
                    progressed = true;
                    break;
                }
            }
            if !progressed {
                return out;
            }
        }
    }

    struct RefLane<'a> {
        builds: Vec<std::collections::VecDeque<&'a QueuedJob>>,
        next: usize,
    }

    fn reference_pick(
        job: &QueuedJob,
        agents: &[AgentView],
        running: &[u32],
        last_agent: &HashMap<String, String>,
        warm_keys: &HashMap<&str, usize>,
    ) -> Option<(usize, bool)> {
        let meets = |a: &AgentView| a.can(job.needs) && job.requires.iter().all(|r| r.satisfied_by(a.labels));
        let native_exists = agents.iter().any(|a| a.schedulable && meets(a) && a.builds(&job.platform));
        let emulated = !native_exists && job.allow_emulation;
        let fits =
            |a: &AgentView| meets(a) && if emulated { a.emulates(&job.platform) } else { a.builds(&job.platform) };
        let candidates = agents.iter().enumerate().filter(|(i, a)| a.schedulable && running[*i] < a.slots && fits(a));
        // Lower sorts first: memory enough for the footprint, then warm,
        // then least loaded, then fewest warm keys, then name.
        type Preference<'a> = (bool, bool, u64, usize, &'a str);
        let mut best: Option<(usize, Preference)> = None;
        for (i, agent) in candidates {
            let short = job.prefer_memory != 0 && agent.memory < job.prefer_memory;
            let warm = last_agent.get(&job.affinity_key).map(String::as_str) == Some(agent.name);
            let load = u64::from(running[i]) * 1_000_000 / u64::from(agent.slots.max(1));
            let spread = warm_keys.get(agent.name).copied().unwrap_or(0);
            let key = (short, !warm || short, load, spread, agent.name);
            if best.as_ref().is_none_or(|(_, b)| key < *b) {
                best = Some((i, key));
            }
        }
        best.map(|(i, _)| (i, emulated))
    }

    proptest! {
        #[test]
        fn the_indexed_scheduler_decides_as_the_scan_did(
            agent_specs in proptest::collection::vec((proptest::sample::subsequence(PLATFORMS, 1..3), 1u32..4, 0u32..3, any::<bool>(), 0u8..4, 0u8..8), 0..8),
            job_specs in proptest::collection::vec((0u64..4, proptest::sample::select(PLATFORMS), 0usize..3, any::<bool>(), 0u8..4, (0u8..4, 0u8..3)), 0..24),
            warm in proptest::collection::vec((0usize..6, 0usize..8), 0..6),
        ) {
            let agents: Vec<AgentView> = agent_specs.iter().enumerate().map(|(i, (ps, slots, running, ok, caps, labels))| AgentView {
                name: Box::leak(format!("a{i}").into_boxed_str()),
                platforms: leak(ps.iter().map(|s| p(s)).collect()),
                emulates: leak(vec![p("linux/riscv64"), p("linux/arm64")]),
                slots: *slots,
                running: (*running).min(*slots),
                schedulable: *ok,
                capabilities: caps_of(*caps),
                ..labelled(*labels)
            }).collect();
            let queue: Vec<QueuedJob> = job_specs.iter().enumerate()
                .map(|(i, (b, pl, key, emulate, needs, (requires, prefer)))| QueuedJob {
                    allow_emulation: *emulate,
                    submitter: format!("s{}", b % 2),
                    needs: caps_of(*needs),
                    requires: requirements_of(*requires),
                    prefer_memory: u64::from(*prefer) << 31,
                    ..job(&i.to_string(), *b, pl, &format!("repo{key}|{pl}"))
                })
                .collect();
            let last_agent: HashMap<String, String> = warm.iter()
                .map(|(key, agent)| (format!("repo{}|{}", key % 3, PLATFORMS[key % PLATFORMS.len()]), format!("a{agent}")))
                .collect();
            prop_assert_eq!(assign(&queue, &agents, &last_agent), reference_assign(&queue, &agents, &last_agent));
        }

        #[test]
        fn assignments_respect_every_rule(
            agent_specs in proptest::collection::vec((proptest::sample::subsequence(PLATFORMS, 1..3), 1u32..4, 0u32..3, any::<bool>(), 0u8..4, 0u8..8), 0..6),
            job_specs in proptest::collection::vec((0u64..4, proptest::sample::select(PLATFORMS), 0u8..4, 0u8..4), 0..20),
        ) {
            let agents: Vec<AgentView> = agent_specs.iter().enumerate().map(|(i, (ps, slots, running, ok, caps, labels))| AgentView {
                name: Box::leak(format!("a{i}").into_boxed_str()),
                platforms: leak(ps.iter().map(|s| p(s)).collect()),
                emulates: leak(vec![p("linux/riscv64")]),
                slots: *slots,
                running: (*running).min(*slots),
                schedulable: *ok,
                capabilities: caps_of(*caps),
                ..labelled(*labels)
            }).collect();
            let queue: Vec<QueuedJob> = job_specs.iter().enumerate()
                .map(|(i, (b, pl, needs, requires))| QueuedJob {
                    allow_emulation: i % 2 == 0,
                    needs: caps_of(*needs),
                    requires: requirements_of(*requires),
                    ..job(&i.to_string(), *b, pl, pl)
                })
                .collect();
            let out = assign(&queue, &agents, &HashMap::new());

            let mut load: HashMap<&str, u32> = agents.iter().map(|a| (a.name, a.running)).collect();
            let mut seen = std::collections::HashSet::new();
            for Placement { job_id, agent: agent_name, emulated } in &out {
                prop_assert!(seen.insert(job_id.clone()), "job assigned twice");
                let j = queue.iter().find(|j| &j.job_id == job_id).unwrap();
                let a = agents.iter().find(|a| a.name == agent_name).unwrap();
                prop_assert!(a.schedulable);
                prop_assert!(a.meets(j.needs, &j.requires), "placed on an agent lacking what the job needs");
                if *emulated {
                    prop_assert!(a.emulates(&j.platform));
                    prop_assert!(
                        !agents.iter().any(|x| x.schedulable && x.meets(j.needs, &j.requires) && x.builds(&j.platform)),
                        "emulated while a native agent that can exists"
                    );
                } else {
                    prop_assert!(a.builds(&j.platform));
                }
                *load.get_mut(a.name).unwrap() += 1;
                prop_assert!(load[a.name] <= a.slots, "agent over capacity");
            }
            // Maximal: no job left that some agent could still take.
            for j in queue.iter().filter(|j| !seen.contains(&j.job_id)) {
                let native_exists = agents.iter().any(|a| a.schedulable && a.meets(j.needs, &j.requires) && a.builds(&j.platform));
                let fits = |a: &AgentView| if !native_exists && j.allow_emulation { a.emulates(&j.platform) } else { a.builds(&j.platform) };
                let placeable = agents.iter().any(|a| a.schedulable && a.meets(j.needs, &j.requires) && fits(a) && load[a.name] < a.slots);
                prop_assert!(!placeable, "job {} left unassigned with a free agent", j.job_id);
            }
        }
    }
}
