//! The farm's state machine driven directly: a clock the test moves, the
//! effects it returns performed by a small executor here (store writes
//! made at once, messages put on channels standing in for agent sessions).
//! The end-to-end tests run the real ones.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use braid_shared::oci::ImageDescriptor;
use braid_shared::proto::{self, coordinator_message::Kind as ToAgent};

use crate::farm::{BuildStatus, Effect, Effects, Farm, FarmConfig, JobStatus};
use crate::model::{CertStamp, ManualClock};
use crate::store::Write;
use crate::stores::Store;
use crate::validate;

#[path = "farm_tests_placement.rs"]
mod placement;

type Inbox = mpsc::UnboundedReceiver<Result<proto::CoordinatorMessage, tonic::Status>>;

/// A farm, its store, its clock and the sessions its effects reach.
struct World {
    farm: Farm,
    store: Arc<Store>,
    clock: Arc<ManualClock>,
    sessions: HashMap<u64, mpsc::UnboundedSender<Result<proto::CoordinatorMessage, tonic::Status>>>,
}

impl std::ops::Deref for World {
    type Target = Farm;
    fn deref(&self) -> &Farm {
        &self.farm
    }
}

impl std::ops::DerefMut for World {
    fn deref_mut(&mut self) -> &mut Farm {
        &mut self.farm
    }
}

impl World {
    /// Performs effects as the coordinator does; returns the verifications
    /// and merges, which the test performs itself.
    fn run(&mut self, effects: Effects) -> Effects {
        let mut rest = Vec::new();
        for e in effects {
            match e {
                Effect::Persist(record) => self.store.write(&[Write::Record(&record)]).unwrap(),
                Effect::Append { events, delivered, .. } => {
                    let mut writes = vec![Write::Events(&events)];
                    if let Some((agent, d)) = &delivered {
                        writes.push(Write::Delivered(agent, d));
                    }
                    self.store.write(&writes).unwrap();
                }
                Effect::Cordon { agent, cordoned } => self.store.write(&[Write::Cordon(&agent, cordoned)]).unwrap(),
                Effect::Builder { agent, builder } => {
                    self.store.write(&[Write::Builder(&agent, builder.as_ref())]).unwrap()
                }
                Effect::Declared { agent, declared } => {
                    self.store.write(&[Write::Declared(&agent, declared.as_ref())]).unwrap()
                }
                Effect::Footprint { key, footprint, now_ms } => {
                    self.store.write(&[Write::Footprint(&key, &footprint, now_ms)]).unwrap()
                }
                Effect::Assign { session, assignment } => self.send(session, Ok(ToAgent::Assign(*assignment))),
                Effect::Cancel { session, cancel } => self.send(session, Ok(ToAgent::Cancel(cancel))),
                Effect::Disconnect { session, agent, why } => {
                    if let Some(tx) = self.sessions.remove(&session) {
                        let _ = tx.send(Err(crate::error::disconnect_status(&agent, why)));
                    }
                }
                other => rest.push(other),
            }
        }
        rest
    }

    fn send(&mut self, session: u64, kind: Result<ToAgent, tonic::Status>) {
        if let Some(tx) = self.sessions.get(&session) {
            let _ = tx.send(kind.map(|k| proto::CoordinatorMessage { kind: Some(k) }));
        }
    }

    fn schedule(&mut self) {
        let e = self.farm.schedule();
        self.run(e);
    }

    fn reap(&mut self, lost_after: Duration) {
        let e = self.farm.reap(lost_after);
        self.run(e);
    }

    fn job_result(&mut self, name: &str, session: u64, result: proto::JobResult) -> Effects {
        let e = self.farm.job_result(name, session, result);
        self.run(e)
    }

    fn job_log(&mut self, name: &str, session: u64, log: proto::JobLog) {
        let e = self.farm.job_log(name, session, log);
        self.run(e);
    }

    fn forget_agent(&mut self, name: &str) -> (bool, u32) {
        let (out, e) = self.farm.forget_agent(name);
        self.run(e);
        out
    }

    fn set_cordoned(&mut self, name: &str, cordoned: bool) {
        let e = self.farm.set_cordoned(name, cordoned).unwrap();
        self.run(e);
    }

    fn connect_with(
        &mut self,
        hello: &proto::Hello,
        cert: Option<CertStamp>,
    ) -> Result<(u64, Inbox), crate::farm::FarmError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let platforms = hello.platforms.iter().map(|p| p.parse().unwrap()).collect();
        let emulates = hello.emulated_platforms.iter().map(|p| p.parse().unwrap()).collect();
        let (connected, effects) = self.farm.agent_connected(hello, platforms, emulates, cert)?;
        self.sessions.insert(connected.session, tx);
        self.run(effects);
        Ok((connected.session, rx))
    }
}

/// Milliseconds the test clock starts at.
const T0: i64 = 1_700_000_000_000;

fn farm(dir: &std::path::Path) -> (World, Arc<Store>) {
    let store = Arc::new(Store::open(&dir.join("braid.db")).unwrap());
    let metrics = Arc::new(crate::metrics::Metrics::default());
    let clock = Arc::new(ManualClock::at(T0));
    let config = FarmConfig {
        max_attempts: 2,
        insecure_registries: vec!["127.0.0.1:5000".into()],
        configured: Vec::new(),
        secrets_grace_ms: 60_000,
    };
    let mut farm = Farm::new(config, clock.clone(), metrics);
    farm.restore(store.load_builds().unwrap(), store.cordons().unwrap());
    farm.restore_deliveries(store.deliveries().unwrap());
    farm.restore_builders(store.builders().unwrap());
    farm.restore_declared(store.declared().unwrap());
    (World { farm, store: store.clone(), clock, sessions: HashMap::new() }, store)
}

fn hello(name: &str, platforms: &[&str]) -> proto::Hello {
    proto::Hello {
        name: name.into(),
        platforms: platforms.iter().map(|p| p.to_string()).collect(),
        slots: 1,
        backend: "buildah".into(),
        version: "test".into(),
        running: vec![],
        emulated_platforms: vec![],
        incarnation: String::new(),
        // A builder that can do everything: these tests are not about placement by capability.
        builder: Some(proto::BuilderInfo {
            name: "buildah".into(),
            version: "1.99.0".into(),
            capabilities: braid_shared::capability::Capability::ALL.iter().map(|c| c.name().to_owned()).collect(),
        }),
        labels: Default::default(),
    }
}

fn connect(w: &mut World, name: &str, platforms: &[&str]) -> (u64, Inbox) {
    w.connect_with(&hello(name, platforms), None).unwrap()
}

fn submit(w: &mut World, platforms: &[&str]) -> String {
    submit_with_secrets(w, platforms, vec![])
}

fn submit_with_secrets(w: &mut World, platforms: &[&str], secrets: Vec<proto::SecretValue>) -> String {
    let spec = proto::BuildSpec {
        secrets: secrets.iter().map(|s| proto::SecretRef { id: s.id.clone(), provided: true }).collect(),
        platforms: platforms.iter().map(|p| p.to_string()).collect(),
        tags: vec!["127.0.0.1:5000/app:1".into()],
        context_digest: format!("sha256:{}", "0".repeat(64)),
        push: true,
        ..Default::default()
    };
    let v = validate::spec(spec).unwrap();
    let new = w.farm.new_build(v.spec, v.platforms, v.tags, None, vec![], secrets);
    let (record, spec, first) = new.parts();
    w.store.write(&[Write::Insert(record, spec), Write::Events(std::slice::from_ref(first))]).unwrap();
    let (id, effects) = w.farm.admit(new);
    w.run(effects);
    id
}

fn next_assignment(inbox: &mut Inbox) -> proto::Assignment {
    loop {
        match inbox.try_recv().expect("a message for the agent").unwrap().kind {
            Some(ToAgent::Assign(a)) => return a,
            _ => continue,
        }
    }
}

fn image(result: &proto::Assignment, digest_char: char) -> proto::JobResult {
    proto::JobResult {
        job_id: result.job_id.clone(),
        attempt: result.attempt,
        lease_id: result.lease_id.clone(),
        outcome: Some(proto::job_result::Outcome::Image(proto::ImageResult {
            digest: format!("sha256:{}", digest_char.to_string().repeat(64)),
            size: 100,
            media_type: braid_shared::oci::OCI_MANIFEST.into(),
            ..Default::default()
        })),
        phases: vec![],
        provenance: Some(proto::JobProvenance {
            dockerfile_digest: format!("sha256:{}", "d".repeat(64)),
            base_images: vec![
                proto::BaseImage {
                    reference: "127.0.0.1:5000/base:1".into(),
                    digest: format!("sha256:{}", "b".repeat(64)),
                },
                proto::BaseImage { reference: "elsewhere/x".into(), digest: "not a digest".into() },
            ],
        }),
        footprint: None,
    }
}

fn descriptor(c: char) -> ImageDescriptor {
    ImageDescriptor {
        digest: format!("sha256:{}", c.to_string().repeat(64)).parse().unwrap(),
        size: 100,
        media_type: braid_shared::oci::OCI_MANIFEST.into(),
    }
}

#[test]
fn a_build_goes_from_queue_to_index_and_ignores_stale_results() {
    let dir = tempfile::tempdir().unwrap();
    let (mut farm, store) = farm(dir.path());
    let (amd_session, mut amd) = connect(&mut farm, "amd", &["linux/amd64"]);
    let build_id = submit(&mut farm, &["linux/amd64"]);
    farm.schedule();
    let a = next_assignment(&mut amd);
    assert_eq!((a.platform.as_str(), a.attempt), ("linux/amd64", 1));
    assert_eq!(a.push_repositories, ["127.0.0.1:5000/app"]);
    assert_eq!(a.insecure_registries, ["127.0.0.1:5000"]);

    let mut stale = image(&a, 'b');
    stale.lease_id = "not-the-lease".into();
    assert!(farm.job_result("amd", amd_session, stale).is_empty(), "a stale lease is ignored");

    let Some(Effect::Verify { job_id, digest, .. }) = farm.job_result("amd", amd_session, image(&a, 'a')).pop() else {
        panic!("a pushed image is verified next");
    };
    assert_eq!(digest.as_str(), format!("sha256:{}", "a".repeat(64)));
    let verified = farm.farm.verified(&build_id, &job_id, Ok(descriptor('a')));
    let merge = farm.run(verified);
    assert!(matches!(merge.as_slice(), [Effect::Merge { .. }]));
    let merged = farm.farm.merged(&build_id, Ok(descriptor('f')));
    assert!(farm.run(merged).is_empty());
    let build = farm.build(&build_id).unwrap();
    assert_eq!(build.record.status, BuildStatus::Succeeded);
    assert_eq!(build.record.index.as_ref().unwrap().digest.as_str(), format!("sha256:{}", "f".repeat(64)));

    let events = store.events_after(&build_id, 0, 1000).unwrap();
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "events are numbered without gaps");
    assert!(matches!(
        &events.last().unwrap().kind,
        Some(proto::build_event::Kind::Build(b)) if b.state == proto::BuildState::Succeeded as i32
    ));
}

#[test]
fn a_build_error_fails_the_build_and_cancels_the_other_platforms() {
    let dir = tempfile::tempdir().unwrap();
    let (mut farm, _) = farm(dir.path());
    let (amd_session, mut amd) = connect(&mut farm, "amd", &["linux/amd64"]);
    let (_, mut arm) = connect(&mut farm, "arm", &["linux/arm64"]);
    let build_id = submit(&mut farm, &["linux/amd64", "linux/arm64"]);
    farm.schedule();
    let a = next_assignment(&mut amd);
    let arm_job = next_assignment(&mut arm);
    let failure = proto::JobResult {
        job_id: a.job_id.clone(),
        attempt: a.attempt,
        lease_id: a.lease_id.clone(),
        outcome: Some(proto::job_result::Outcome::Failure(proto::JobFailure {
            kind: proto::FailureKind::Build as i32,
            message: "exit status 3".into(),
            failed_step: Some(proto::FailedStep {
                step: "[2/2] RUN make".into(),
                dockerfile: "Dockerfile".into(),
                line: 2,
                end_line: 2,
                first_line: 1,
                lines: vec!["FROM a".into(); 1000],
            }),
        })),
        phases: vec![],
        provenance: None,
        footprint: None,
    };
    farm.job_result("amd", amd_session, failure);
    let b = farm.build(&build_id).unwrap();
    assert_eq!(b.record.status, BuildStatus::Failed);
    assert_eq!(b.record.message, "linux/amd64: exit status 3");
    let failed = b.record.jobs.iter().find(|j| j.id == a.job_id).unwrap();
    assert_eq!(failed.message, "exit status 3", "the job's message does not repeat its platform");
    let step = failed.to_proto().failed_step.unwrap();
    assert_eq!((step.step.as_str(), step.line), ("[2/2] RUN make", 2));
    assert_eq!(step.lines.len(), braid_shared::limits::EXCERPT_LINES, "an agent's excerpt is cut to the limit");
    let other = b.record.jobs.iter().find(|j| j.id == arm_job.job_id).unwrap();
    assert_eq!(other.status, JobStatus::Cancelled);
    let cancel = arm.try_recv().unwrap().unwrap();
    assert!(matches!(cancel.kind, Some(ToAgent::Cancel(c)) if c.job_id == arm_job.job_id));
}

#[test]
fn a_lost_agent_s_job_runs_elsewhere_and_its_late_result_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let (mut farm, _) = farm(dir.path());
    let (first_session, mut first) = connect(&mut farm, "arm-a", &["linux/arm64"]);
    let build_id = submit(&mut farm, &["linux/arm64"]);
    farm.schedule();
    let a = next_assignment(&mut first);
    let (second_session, mut second) = connect(&mut farm, "arm-b", &["linux/arm64"]);
    farm.agent_disconnected("arm-a", first_session);
    farm.heartbeat("arm-b", second_session);
    farm.clock.advance(20);
    farm.heartbeat("arm-b", second_session);
    farm.reap(Duration::from_millis(10));
    farm.schedule();
    let retry = next_assignment(&mut second);
    assert_eq!((retry.job_id.as_str(), retry.attempt), (a.job_id.as_str(), 2));
    assert!(farm.job_result("arm-a", first_session, image(&a, 'a')).is_empty(), "late result ignored");
    assert!(!farm.job_result("arm-b", second_session, image(&retry, 'b')).is_empty());
    let job = &farm.build(&build_id).unwrap().record.jobs[0];
    assert_eq!(job.result.as_ref().unwrap().digest.as_str(), format!("sha256:{}", "b".repeat(64)));
}

#[test]
fn a_restart_keeps_builds_and_gives_up_after_max_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let build_id = {
        let (mut farm, _) = farm(dir.path());
        let (_, mut inbox) = connect(&mut farm, "arm-a", &["linux/arm64"]);
        let id = submit(&mut farm, &["linux/arm64"]);
        farm.schedule();
        next_assignment(&mut inbox);
        id
    };
    let (mut farm, _) = farm(dir.path());
    let job = &farm.build(&build_id).unwrap().record.jobs[0];
    assert!(matches!(job.status, JobStatus::Assigned { .. }), "still leased after the restart");
    // arm-a never comes back: lost, re-queued (attempt 2 of 2), lost again: failed.
    farm.clock.advance(20);
    farm.reap(Duration::from_millis(10));
    let (session, mut inbox) = connect(&mut farm, "arm-b", &["linux/arm64"]);
    farm.schedule();
    assert_eq!(next_assignment(&mut inbox).attempt, 2);
    farm.agent_disconnected("arm-b", session);
    farm.clock.advance(20);
    farm.reap(Duration::from_millis(10));
    let b = farm.build(&build_id).unwrap();
    assert_eq!(b.record.status, BuildStatus::Failed);
    assert!(b.record.message.contains("gave up after 2 attempts"), "{}", b.record.message);
}

#[test]
fn a_cordon_outlasts_a_reconnect_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut farm, _) = farm(dir.path());
        let (session, _inbox) = connect(&mut farm, "arm-a", &["linux/arm64"]);
        farm.set_cordoned("arm-a", true);
        farm.agent_disconnected("arm-a", session);
        let (_, mut inbox) = connect(&mut farm, "arm-a", &["linux/arm64"]);
        assert_eq!(farm.agent_list()[0].state().as_str(), "cordoned", "a reconnect keeps the cordon");
        submit(&mut farm, &["linux/arm64"]);
        farm.schedule();
        assert!(
            std::iter::from_fn(|| inbox.try_recv().ok()).all(|m| !matches!(m.unwrap().kind, Some(ToAgent::Assign(_)))),
            "a cordoned agent gets no job"
        );
    }
    let (mut farm, _) = farm(dir.path());
    let (_, _inbox) = connect(&mut farm, "arm-a", &["linux/arm64"]);
    assert_eq!(farm.agent_list()[0].state().as_str(), "cordoned", "a restart keeps the cordon");
    farm.set_cordoned("arm-a", false);
    let (mut farm, _) = self::farm(dir.path());
    let (_, _inbox) = connect(&mut farm, "arm-a", &["linux/arm64"]);
    assert_eq!(farm.agent_list()[0].state().as_str(), "idle", "uncordoning is kept too");
}

#[test]
fn a_job_log_is_cut_at_its_limit_with_one_notice() {
    let dir = tempfile::tempdir().unwrap();
    let (mut farm, store) = farm(dir.path());
    let (session, mut inbox) = connect(&mut farm, "amd", &["linux/amd64"]);
    let build_id = submit(&mut farm, &["linux/amd64"]);
    farm.schedule();
    let a = next_assignment(&mut inbox);
    let line = "x".repeat(braid_shared::limits::LOG_LINE_BYTES);
    let per_message = 64;
    let messages = braid_shared::limits::JOB_LOG_BYTES / (line.len() * per_message) + 2;
    for _ in 0..messages {
        let log =
            proto::JobLog { job_id: a.job_id.clone(), attempt: a.attempt, lines: vec![line.clone(); per_message] };
        farm.job_log("amd", session, log);
    }
    let events = store.events_after(&build_id, 0, 1_000_000).unwrap();
    let kept: usize = events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(proto::build_event::Kind::Log(l)) => Some(l.line.len()),
            _ => None,
        })
        .sum();
    assert!(kept <= braid_shared::limits::JOB_LOG_BYTES, "kept {kept} bytes");
    assert!(kept > braid_shared::limits::JOB_LOG_BYTES - line.len() * 2);
    let notices: Vec<&str> = events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(proto::build_event::Kind::Notice(n)) => Some(n.text.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(
        notices,
        ["log of linux/amd64 cut at the limit of 16 MiB per job; later lines are dropped and counted at the end"]
    );
    // The result says, once, how many lines were dropped after the cut.
    let kept_lines = events.iter().filter(|e| matches!(e.kind, Some(proto::build_event::Kind::Log(_)))).count();
    let dropped = messages * per_message - kept_lines;
    farm.job_result("amd", session, image(&a, 'a'));
    farm.job_result("amd", session, image(&a, 'a'));
    let said: Vec<String> = store
        .events_after(&build_id, 0, 1_000_000)
        .unwrap()
        .into_iter()
        .filter_map(|e| match e.kind {
            Some(proto::build_event::Kind::Notice(n)) if n.text.contains("after the cut") => Some(n.text),
            _ => None,
        })
        .collect();
    assert_eq!(said, [format!("log of linux/amd64: {dropped} more lines dropped after the cut")]);
    // A log line from an agent that holds no lease is dropped.
    let (intruder, _) = connect(&mut farm, "other", &["linux/amd64"]);
    let before = store.events_after(&build_id, 0, 1_000_000).unwrap().len();
    let log = proto::JobLog { job_id: a.job_id.clone(), attempt: a.attempt, lines: vec!["forged".into()] };
    farm.job_log("other", intruder, log);
    assert_eq!(store.events_after(&build_id, 0, 1_000_000).unwrap().len(), before);
}

#[test]
fn a_build_keeps_its_state_events_past_the_event_limit() {
    let dir = tempfile::tempdir().unwrap();
    let (mut farm, store) = farm(dir.path());
    farm.max_build_events = 50;
    let (session, mut inbox) = connect(&mut farm, "amd", &["linux/amd64"]);
    let build_id = submit(&mut farm, &["linux/amd64"]);
    farm.schedule();
    let a = next_assignment(&mut inbox);
    for _ in 0..5 {
        let log = proto::JobLog { job_id: a.job_id.clone(), attempt: a.attempt, lines: vec!["line".into(); 30] };
        farm.job_log("amd", session, log);
    }
    let events = store.events_after(&build_id, 0, 10_000).unwrap();
    assert!(events.len() <= 50, "{} events kept", events.len());
    let notice = events.iter().find_map(|e| match &e.kind {
        Some(proto::build_event::Kind::Notice(n)) => Some(n.text.clone()),
        _ => None,
    });
    assert_eq!(
        notice.as_deref(),
        Some(
            "log of linux/amd64 cut at the limit of 50 events per build; later lines are dropped and counted at the end"
        )
    );
    // State changes still go through after the cut.
    let follow = farm.job_result("amd", session, image(&a, 'a'));
    assert!(matches!(follow.as_slice(), [Effect::Verify { .. }]));
    let last = store.events_after(&build_id, 0, 10_000).unwrap().pop().unwrap();
    assert!(matches!(last.kind, Some(proto::build_event::Kind::Job(j)) if j.state == proto::JobState::Pushed as i32));
}

#[test]
fn a_connected_agent_is_replaced_only_by_its_own_or_a_newer_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (mut farm, _store) = farm(dir.path());
    let hello = hello("pi-01", &["linux/arm64"]);
    let stamp = |serial: &str, issued_ms| Some(CertStamp { serial: serial.into(), issued_ms });
    let (_, mut real) = farm.connect_with(&hello, stamp("aa", 100)).unwrap();
    let build = submit(&mut farm, &["linux/arm64"]);
    farm.schedule();
    let assignment = next_assignment(&mut real);

    // Another certificate, not recorded after the real one: refused, and the
    // real session keeps its job.
    for older in [stamp("bb", 50), stamp("cc", 100)] {
        let e = farm.connect_with(&hello, older).map(|_| ()).unwrap_err();
        assert!(matches!(e, crate::farm::FarmError::AlreadyExists(_)), "{e}");
    }
    assert!(real.try_recv().is_err(), "the real session was not told to go");
    let job = &farm.build(&build).unwrap().record.jobs[0];
    assert_eq!(job.status, JobStatus::Assigned { agent: "pi-01".into(), lease: assignment.lease_id.clone() });

    // The same certificate (the agent reconnecting) replaces it.
    let running = proto::RunningJob { job_id: assignment.job_id.clone(), attempt: 1, lease_id: assignment.lease_id };
    let again = proto::Hello { running: vec![running], ..hello.clone() };
    let (_, _same) = farm.connect_with(&again, stamp("aa", 100)).unwrap();
    assert!(matches!(real.try_recv(), Ok(Err(_))), "the old session was closed");
    // So does a newer one; forgetting the agent re-queues its job.
    let (_, mut newer) = farm.connect_with(&again, stamp("dd", 200)).unwrap();
    assert_eq!(farm.forget_agent("pi-01"), (true, 1));
    assert!(matches!(newer.try_recv(), Ok(Err(s)) if s.code() == tonic::Code::Unauthenticated));
    assert_eq!(farm.build(&build).unwrap().record.jobs[0].status, JobStatus::Pending);
    assert!(farm.agent_list().is_empty());
}

#[test]
fn a_context_lease_names_its_holder_and_its_build_context() {
    let dir = tempfile::tempdir().unwrap();
    let (mut farm, _store) = farm(dir.path());
    let (_, mut inbox) = connect(&mut farm, "pi-01", &["linux/arm64"]);
    submit(&mut farm, &["linux/arm64"]);
    farm.schedule();
    let a = next_assignment(&mut inbox);
    let context = format!("sha256:{}", "0".repeat(64));
    assert_eq!(farm.lease_holder_and_context(&a.job_id, a.attempt, &a.lease_id), Some(("pi-01".into(), context)));
    // Another lease, attempt or job: no lease, nothing served.
    assert_eq!(farm.lease_holder_and_context(&a.job_id, a.attempt, "other"), None);
    assert_eq!(farm.lease_holder_and_context(&a.job_id, a.attempt + 1, &a.lease_id), None);
    assert_eq!(farm.lease_holder_and_context("nope", a.attempt, &a.lease_id), None);

    // The service's check: the holder, of that context, under that lease.
    let digest: braid_shared::Digest = format!("sha256:{}", "0".repeat(64)).parse().unwrap();
    let other: braid_shared::Digest = format!("sha256:{}", "1".repeat(64)).parse().unwrap();
    let check = |farm: &Farm, caller, job: &str, lease: &str, d| {
        farm.check_context_lease(caller, job, a.attempt, lease, d).map_err(|e| {
            let s = tonic::Status::from(e);
            (s.code(), s.message().to_owned())
        })
    };
    assert!(check(&farm, Some("pi-01"), &a.job_id, &a.lease_id, &digest).is_ok());
    assert!(check(&farm, None, &a.job_id, &a.lease_id, &digest).is_ok(), "plaintext: the lease alone");
    let (code, message) = check(&farm, Some("pi-02"), &a.job_id, &a.lease_id, &digest).unwrap_err();
    assert_eq!(code, tonic::Code::PermissionDenied);
    assert!(message.contains(&a.job_id) && message.contains("\"pi-01\", not \"pi-02\""), "{message}");
    let (code, message) = check(&farm, Some("pi-01"), &a.job_id, &a.lease_id, &other).unwrap_err();
    assert_eq!(code, tonic::Code::PermissionDenied);
    assert!(message.contains("uses context sha256:000"), "{message}");
    let (code, message) = check(&farm, Some("pi-01"), &a.job_id, "stale", &digest).unwrap_err();
    assert_eq!(code, tonic::Code::FailedPrecondition);
    assert!(message.contains(&a.job_id), "{message}");
    assert_eq!(check(&farm, Some("pi-01"), "", "", &digest).unwrap_err().0, tonic::Code::PermissionDenied);

    // Once the agent is forgotten the job is re-queued and the lease is gone.
    farm.forget_agent("pi-01");
    assert_eq!(farm.lease_holder_and_context(&a.job_id, a.attempt, &a.lease_id), None);
}

#[test]
fn transitions_return_their_effects_and_read_time_from_the_clock() {
    use proto::build_event::Kind;
    let dir = tempfile::tempdir().unwrap();
    let (mut w, store) = farm(dir.path());
    let (session, _inbox) = connect(&mut w, "arm-a", &["linux/arm64"]);
    let build_id = submit(&mut w, &["linux/arm64"]);

    // Placing the job: one assignment to the agent's session, the build's
    // and the job's new states appended and the record stored once.
    let placed = w.farm.schedule();
    let assignments: Vec<&proto::Assignment> = placed
        .iter()
        .filter_map(|e| match e {
            Effect::Assign { session: s, assignment } if *s == session => Some(&**assignment),
            _ => None,
        })
        .collect();
    assert_eq!(assignments.len(), 1, "{placed:?}");
    let a = assignments[0].clone();
    let states: Vec<i32> = placed
        .iter()
        .flat_map(|e| match e {
            Effect::Append { events, .. } => events.iter().collect(),
            _ => Vec::new(),
        })
        .filter_map(|e| match &e.kind {
            Some(Kind::Job(j)) => Some(j.state),
            Some(Kind::Build(b)) => Some(b.state),
            _ => None,
        })
        .collect();
    assert_eq!(states, [proto::BuildState::Running as i32, proto::JobState::Assigned as i32]);
    assert_eq!(placed.iter().filter(|e| matches!(e, Effect::Persist(_))).count(), 1);
    assert!(store.events_after(&build_id, 1, 10).unwrap().is_empty(), "the farm itself wrote nothing");
    w.run(placed);

    // A log batch appends events and leaves the record alone.
    let log = proto::JobLog { job_id: a.job_id.clone(), attempt: a.attempt, lines: vec!["a".into(), "b".into()] };
    let logged = w.farm.job_log("arm-a", session, log);
    assert!(matches!(logged.as_slice(), [Effect::Append { events, .. }] if events.len() == 2), "{logged:?}");
    w.run(logged);

    // Heard of at T0; lost only once more than lost_after has passed on the clock.
    let lost_after = Duration::from_secs(30);
    w.clock.advance(30_000);
    assert!(w.farm.reap(lost_after).is_empty(), "exactly lost_after is not yet lost");
    w.clock.advance(1);
    let lost = w.farm.reap(lost_after);
    assert!(
        matches!(&lost[0], Effect::Disconnect { session: s, why: crate::farm::Disconnect::Lost, .. } if *s == session),
        "{lost:?}"
    );
    let requeued = lost.iter().any(|e| {
        matches!(e, Effect::Append { events, .. } if events.iter().any(|ev| matches!(&ev.kind,
            Some(Kind::Job(j)) if j.state == proto::JobState::Pending as i32 && j.message.contains("agent arm-a was lost"))))
    });
    assert!(requeued, "{lost:?}");
    w.run(lost);
    assert_eq!(w.agent_list()[0].state().as_str(), "lost");

    // The next agent gets attempt 2; its result asks for a verification in
    // the registry it pushed to, stamped by the clock.
    let (second, mut inbox) = connect(&mut w, "arm-b", &["linux/arm64"]);
    w.schedule();
    let retry = next_assignment(&mut inbox);
    assert_eq!(retry.attempt, 2);
    w.clock.advance(5_000);
    let verify = w.farm.job_result("arm-b", second, image(&retry, 'c'));
    let at = verify.iter().find_map(|e| match e {
        Effect::Verify { at, digest, .. } => Some((at.clone(), digest.to_string())),
        _ => None,
    });
    let (at, digest) = at.expect("a verification");
    assert!(matches!(at, crate::farm::VerifyIn::Registry(r) if r.name() == "127.0.0.1:5000/app"));
    assert_eq!(digest, format!("sha256:{}", "c".repeat(64)));
    let job = &w.build(&build_id).unwrap().record.jobs[0];
    assert_eq!(job.result_ms, Some(T0 + 30_001 + 5_000));
}

#[test]
fn claimed_and_readopted_jobs_are_counted_apart() {
    let dir = tempfile::tempdir().unwrap();
    let (mut farm, _) = farm(dir.path());
    let (session, mut inbox) = connect(&mut farm, "amd", &["linux/amd64"]);
    submit(&mut farm, &["linux/amd64"]);
    farm.schedule();
    let a = next_assignment(&mut inbox);
    farm.agent_disconnected("amd", session);
    let mut again = hello("amd", &["linux/amd64"]);
    let held = proto::RunningJob { job_id: a.job_id.clone(), attempt: a.attempt, lease_id: a.lease_id.clone() };
    let unknown = proto::RunningJob { job_id: "gone".into(), attempt: 1, lease_id: "l".into() };
    again.running = vec![held, unknown];
    let platforms = vec!["linux/amd64".parse().unwrap()];
    let (connected, _) = farm.farm.agent_connected(&again, platforms, vec![], None).unwrap();
    assert_eq!((connected.claimed, connected.readopted), (2, 1));
}

#[test]
fn an_agent_s_messages_are_applied_once_across_reconnects_and_restarts() {
    use crate::model::Delivery;
    let dir = tempfile::tempdir().unwrap();
    let log = |a: &proto::Assignment, line: &str| proto::JobLog {
        job_id: a.job_id.clone(),
        attempt: a.attempt,
        lines: vec![line.into()],
    };
    let logged = |store: &Store, build_id: &str| -> Vec<String> {
        store
            .events_after(build_id, 0, 1000)
            .unwrap()
            .into_iter()
            .filter_map(|e| match e.kind {
                Some(proto::build_event::Kind::Log(l)) => Some(l.line),
                _ => None,
            })
            .collect()
    };
    let mut first = hello("amd", &["linux/amd64"]);
    first.incarnation = "one".into();
    let (build_id, a) = {
        let (mut farm, store) = farm(dir.path());
        let (session, mut inbox) = farm.connect_with(&first, None).unwrap();
        let build_id = submit(&mut farm, &["linux/amd64"]);
        farm.schedule();
        let a = next_assignment(&mut inbox);
        assert_eq!(farm.accept("amd", session, 1), Delivery::Apply);
        farm.job_log("amd", session, log(&a, "1"));
        assert_eq!(farm.accept("amd", session, 1), Delivery::Duplicate);
        // A reconnect of the same process: its resend of 1 is not applied
        // again, 2 is; the old session's late copy is neither.
        first.running =
            vec![proto::RunningJob { job_id: a.job_id.clone(), attempt: a.attempt, lease_id: a.lease_id.clone() }];
        let (next, _inbox) = farm.connect_with(&first, None).unwrap();
        assert_eq!(farm.accept("amd", next, 1), Delivery::Duplicate);
        assert_eq!(farm.accept("amd", session, 2), Delivery::Stale);
        assert_eq!(farm.accept("amd", next, 2), Delivery::Apply);
        farm.job_log("amd", next, log(&a, "2"));
        assert_eq!(logged(&store, &build_id), ["1", "2"]);
        (build_id, a)
    };
    // A restart keeps what was applied, stored with the lines themselves.
    let (mut farm, store) = farm(dir.path());
    let (session, _inbox) = farm.connect_with(&first, None).unwrap();
    assert_eq!(farm.accept("amd", session, 2), Delivery::Duplicate);
    assert_eq!(farm.accept("amd", session, 3), Delivery::Apply);
    farm.job_log("amd", session, log(&a, "3"));
    assert_eq!(logged(&store, &build_id), ["1", "2", "3"]);
    // A new process numbers from 1 again.
    let mut second = first.clone();
    second.incarnation = "two".into();
    let (session, _inbox) = farm.connect_with(&second, None).unwrap();
    assert_eq!(farm.accept("amd", session, 1), Delivery::Apply);
    // Unnumbered messages (an older agent) are always applied.
    assert_eq!(farm.accept("amd", session, 0), Delivery::Apply);
}

#[test]
fn secret_values_ride_every_attempt_and_a_restart_waits_for_them_then_fails() {
    let dir = tempfile::tempdir().unwrap();
    let value = || vec![proto::SecretValue { id: "tok".into(), value: b"hunter2-value".to_vec() }];
    let (waits, fails) = {
        let (mut farm, store) = farm(dir.path());
        let (session, mut inbox) = connect(&mut farm, "amd", &["linux/amd64"]);
        let first = submit_with_secrets(&mut farm, &["linux/amd64"], value());
        farm.schedule();
        let a = next_assignment(&mut inbox);
        assert_eq!(a.build_id, first);
        assert_eq!(a.secrets, value(), "the assignment carries the values");
        assert_eq!(a.spec.unwrap().secrets, [proto::SecretRef { id: "tok".into(), provided: true }]);
        // A lost agent's retry carries them too.
        farm.agent_disconnected("amd", session);
        farm.clock.advance(20);
        farm.reap(Duration::from_millis(10));
        let (_, mut inbox) = connect(&mut farm, "amd2", &["linux/amd64"]);
        farm.schedule();
        let retry = next_assignment(&mut inbox);
        assert_eq!((retry.attempt, retry.secrets), (2, value()));
        // amd2 is busy: these two wait in the queue.
        let waits = submit_with_secrets(&mut farm, &["linux/amd64"], value());
        let fails = submit_with_secrets(&mut farm, &["linux/arm64"], value());
        let db = std::fs::read(dir.path().join("braid.db")).unwrap();
        assert!(!db.windows(13).any(|w| w == b"hunter2-value"), "never in the database");
        drop(store);
        (waits, fails)
    };
    // A restart: the values are gone; the builds wait for them.
    let (mut farm, _) = farm(dir.path());
    assert!(farm.build(&waits).unwrap().lacks_secrets());
    farm.clock.advance(40_000);
    let (_, mut amd) = connect(&mut farm, "amd3", &["linux/amd64"]);
    let (_, mut arm) = connect(&mut farm, "arm", &["linux/arm64"]);
    farm.schedule();
    assert!(amd.try_recv().is_err() && arm.try_recv().is_err(), "nothing placed without the values");
    assert!(farm.farm.provide_secrets(&waits, value()).unwrap());
    farm.schedule();
    assert_eq!(next_assignment(&mut amd).secrets, value());
    farm.clock.advance(30_000);
    let e = farm.farm.check_timeouts(None);
    farm.run(e);
    let b = farm.build(&fails).unwrap();
    assert_eq!(b.record.status, BuildStatus::Failed);
    assert!(
        b.record.message.contains("--secret values (tok) were lost when the coordinator restarted"),
        "{}",
        b.record.message
    );
    assert!(b.secrets.is_empty() && farm.farm.provide_secrets(&fails, value()).is_err(), "an ended build holds none");
}

#[test]
fn platforms_agents_declared_outlast_a_restart_and_name_who_is_known() {
    let dir = tempfile::tempdir().unwrap();
    let p = |s: &str| -> braid_shared::Platform { s.parse().unwrap() };
    {
        let (mut farm, _) = farm(dir.path());
        let no_agents = farm.undeclared(&[p("linux/amd64")], false).unwrap();
        assert!(no_agents.contains("no agent has ever connected"), "{no_agents}");
        let mut h = hello("amd-a", &["linux/amd64"]);
        h.emulated_platforms = vec!["linux/arm64".into(), "linux/riscv64".into()];
        let (session, _inbox) = farm.connect_with(&h, None).unwrap();
        assert_eq!(farm.undeclared(&[p("linux/amd64")], false), None);
        assert_eq!(farm.undeclared(&[p("linux/riscv64")], true), None, "emulation allowed");
        let why = farm.undeclared(&[p("linux/riscv64")], false).unwrap();
        assert!(why.starts_with("platform linux/riscv64: no agent has ever declared it"), "{why}");
        assert!(why.contains("the farm has linux/amd64 (by emulation: linux/arm64, linux/riscv64)"), "{why}");
        assert!(why.contains("agent amd-a emulates it: --allow-emulation would use it"), "{why}");
        let why = farm.undeclared(&[p("linux/s390x")], true).unwrap();
        assert!(why.contains("platform linux/s390x") && !why.contains("--allow-emulation"), "{why}");
        farm.clock.advance(5_000);
        farm.heartbeat("amd-a", session);
        let e = farm.agent_disconnected("amd-a", session);
        farm.run(e);
    }
    // A restart: the agent has not come back, its platforms are still known.
    let (mut farm, store) = farm(dir.path());
    assert_eq!(farm.undeclared(&[p("linux/amd64")], false), None);
    assert!(farm.undeclared(&[p("linux/riscv64")], false).unwrap().contains("--allow-emulation"));
    let id = submit(&mut farm, &["linux/amd64"]);
    farm.schedule();
    let waiting = store
        .events_after(&id, 0, 100)
        .unwrap()
        .iter()
        .find_map(|e| match &e.kind {
            Some(proto::build_event::Kind::Notice(n)) if n.text.starts_with("waiting") => Some(n.text.clone()),
            _ => None,
        })
        .unwrap();
    let seen = crate::farm::utc(T0 + 5_000);
    assert_eq!(
        waiting,
        format!("waiting for an agent for linux/amd64: 1 agent is known for it: amd-a (last seen {seen})")
    );
    assert_eq!(seen, "2023-11-14T22:13:25Z");
    // Forgetting the agent forgets its platforms.
    assert_eq!(farm.forget_agent("amd-a"), (false, 0));
    drop(farm);
    let (again, _) = self::farm(dir.path());
    assert!(again.undeclared(&[p("linux/amd64")], false).unwrap().contains("no agent has ever connected"));
}

#[test]
fn a_refusal_names_a_bounded_number_of_the_farm_s_platforms() {
    let dir = tempfile::tempdir().unwrap();
    let (mut farm, _) = farm(dir.path());
    let platforms: Vec<String> = (0..40).map(|i| format!("linux/arch{i:02}")).collect();
    let names: Vec<&str> = platforms.iter().map(String::as_str).collect();
    connect(&mut farm, "many", &names);
    let why = farm.undeclared(&["linux/riscv64".parse().unwrap()], false).unwrap();
    assert!(why.contains("linux/arch31 and 8 more") && !why.contains("arch32"), "{why}");
}

#[test]
fn an_agent_s_latest_health_is_shown_while_its_session_lives() {
    let dir = tempfile::tempdir().unwrap();
    let (mut farm, _) = farm(dir.path());
    let (first, _inbox) = connect(&mut farm, "arm-a", &["linux/arm64"]);
    let report = proto::AgentHealth { disk_free_bytes: 7 << 30, memory_total_bytes: 8 << 30, ..Default::default() };
    farm.set_health("arm-a", first, Some(report));
    let info = crate::api::convert::agent_info(&farm, farm.agent_list()[0]);
    assert_eq!(info.health, Some(report));
    let gauges = farm.gauges();
    assert_eq!((gauges.agent_health[0].name.as_str(), gauges.agent_health[0].health), ("arm-a", Some(report)));

    // A new session starts without one; a report of the old one is ignored.
    let (second, _inbox2) = connect(&mut farm, "arm-a", &["linux/arm64"]);
    farm.set_health("arm-a", first, Some(report));
    assert_eq!(farm.agent_list()[0].health, None);
    farm.set_health("arm-a", second, Some(report));
    assert!(farm.agent_list()[0].health.is_some());
    // Disconnected: its last report is stale, no series for it (its last heartbeat stays).
    farm.agent_disconnected("arm-a", second);
    let gauges = farm.gauges();
    assert_eq!((gauges.agent_health.len(), gauges.agent_health[0].health), (1, None));
}

#[test]
fn provenance_inputs_come_from_the_spec_the_agent_s_report_and_what_the_farm_knows_and_are_stored() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, store) = farm(dir.path());
    let stamp = CertStamp { serial: "4a01".into(), issued_ms: T0 };
    let (session, mut amd) = w.connect_with(&hello("amd", &["linux/amd64"]), Some(stamp)).unwrap();
    let spec = proto::BuildSpec {
        platforms: vec!["linux/amd64".into()],
        tags: vec!["127.0.0.1:5000/app:1".into()],
        context_digest: format!("sha256:{}", "0".repeat(64)),
        push: true,
        provenance_mode: "max".into(),
        provenance_version: "v1".into(),
        build_args: [("V".to_owned(), "2".to_owned())].into_iter().collect(),
        ..Default::default()
    };
    let v = validate::spec(spec).unwrap();
    let new = w.farm.new_build(v.spec, v.platforms, v.tags, None, vec![], vec![]);
    let (record, spec, first) = new.parts();
    store.write(&[Write::Insert(record, spec), Write::Events(std::slice::from_ref(first))]).unwrap();
    let (build_id, effects) = w.farm.admit(new);
    w.run(effects);
    w.schedule();
    let a = next_assignment(&mut amd);
    let effects = w.farm.job_result("amd", session, image(&a, 'a'));
    w.run(effects);
    let inputs = w.farm.merge_inputs(&build_id).unwrap().provenance;
    let [input] = inputs.as_slice() else { panic!("one statement per platform: {inputs:?}") };
    assert_eq!(input.digest.as_str(), format!("sha256:{}", "a".repeat(64)));
    assert_eq!(input.names, ["127.0.0.1:5000/app:1"]);
    assert_eq!(input.base_images[0], ("127.0.0.1:5000/base:1".to_owned(), format!("sha256:{}", "b".repeat(64))));
    assert_eq!(input.base_images[1], ("elsewhere/x".to_owned(), String::new()), "a bad digest is dropped");
    assert_eq!(input.build_args["V"], "2");
    let m = &input.metadata;
    assert_eq!((m.agent.as_str(), m.builder_name.as_str(), m.builder_version.as_str()), ("amd", "buildah", "1.99.0"));
    assert!(m.native);
    assert_eq!(m.agent_identity, "OU=agent,CN=amd serial 4a01", "the certificate the agent's session presented");
    assert_eq!((m.build_id.as_str(), m.job_id.as_str()), (build_id.as_str(), a.job_id.as_str()));
    // Stored with the job: a restarted coordinator makes the same statement.
    let stored = store.load_builds().unwrap();
    let (record, _) = stored.iter().find(|(r, _)| r.id == build_id).unwrap();
    assert_eq!(record.jobs[0].provenance.as_ref().unwrap().builder_version, "1.99.0");
}
