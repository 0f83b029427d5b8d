//! The farm's state machine driven directly, with channels standing in for
//! agent sessions (the end-to-end tests run the real ones).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use braid_shared::oci::ImageDescriptor;
use braid_shared::proto::{self, coordinator_message::Kind as ToAgent};

use crate::farm::{BuildStatus, Farm, FollowUp, JobStatus};
use crate::store::Store;
use crate::validate;

type Inbox = mpsc::UnboundedReceiver<Result<proto::CoordinatorMessage, tonic::Status>>;

fn farm(dir: &std::path::Path) -> (Farm, Arc<Store>) {
    let store = Arc::new(Store::open(&dir.join("braid.db")).unwrap());
    let metrics = Arc::new(crate::metrics::Metrics::default());
    (Farm::load(store.clone(), 2, vec!["127.0.0.1:5000".into()], metrics).unwrap(), store)
}

fn connect(farm: &mut Farm, name: &str, platforms: &[&str]) -> (u64, Inbox) {
    let (tx, rx) = mpsc::unbounded_channel();
    let hello = proto::Hello {
        name: name.into(),
        platforms: platforms.iter().map(|p| p.to_string()).collect(),
        slots: 1,
        backend: "buildah".into(),
        version: "test".into(),
        running: vec![],
        emulated_platforms: vec![],
    };
    let parsed = platforms.iter().map(|p| p.parse().unwrap()).collect();
    (farm.agent_connected(&hello, parsed, vec![], tx, None).unwrap(), rx)
}

fn submit(farm: &mut Farm, platforms: &[&str]) -> String {
    let spec = proto::BuildSpec {
        platforms: platforms.iter().map(|p| p.to_string()).collect(),
        tags: vec!["127.0.0.1:5000/app:1".into()],
        context_digest: format!("sha256:{}", "0".repeat(64)),
        push: true,
        ..Default::default()
    };
    let v = validate::spec(spec).unwrap();
    farm.submit(v.spec, v.platforms, v.tags, None, vec![]).unwrap()
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
        })),
        phases: vec![],
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
    farm.schedule().unwrap();
    let a = next_assignment(&mut amd);
    assert_eq!((a.platform.as_str(), a.attempt), ("linux/amd64", 1));
    assert_eq!(a.push_repositories, ["127.0.0.1:5000/app"]);
    assert_eq!(a.insecure_registries, ["127.0.0.1:5000"]);

    let mut stale = image(&a, 'b');
    stale.lease_id = "not-the-lease".into();
    assert!(farm.job_result("amd", amd_session, stale).unwrap().is_none(), "a stale lease is ignored");

    let Some(FollowUp::Verify { job_id, digest, .. }) = farm.job_result("amd", amd_session, image(&a, 'a')).unwrap()
    else {
        panic!("a pushed image is verified next");
    };
    assert_eq!(digest.as_str(), format!("sha256:{}", "a".repeat(64)));
    let merge = farm.verified(&build_id, &job_id, Ok(descriptor('a'))).unwrap();
    assert!(matches!(merge, Some(FollowUp::Merge { .. })));
    farm.merged(&build_id, Ok(descriptor('f'))).unwrap();
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
    farm.schedule().unwrap();
    let a = next_assignment(&mut amd);
    let arm_job = next_assignment(&mut arm);
    let failure = proto::JobResult {
        job_id: a.job_id.clone(),
        attempt: a.attempt,
        lease_id: a.lease_id.clone(),
        outcome: Some(proto::job_result::Outcome::Failure(proto::JobFailure {
            kind: proto::FailureKind::Build as i32,
            message: "exit status 3".into(),
        })),
        phases: vec![],
    };
    farm.job_result("amd", amd_session, failure).unwrap();
    let b = farm.build(&build_id).unwrap();
    assert_eq!(b.record.status, BuildStatus::Failed);
    assert_eq!(b.record.message, "linux/amd64: exit status 3");
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
    farm.schedule().unwrap();
    let a = next_assignment(&mut first);
    let (second_session, mut second) = connect(&mut farm, "arm-b", &["linux/arm64"]);
    farm.agent_disconnected("arm-a", first_session);
    farm.heartbeat("arm-b", second_session);
    std::thread::sleep(Duration::from_millis(20));
    farm.heartbeat("arm-b", second_session);
    farm.reap(Duration::from_millis(10)).unwrap();
    farm.schedule().unwrap();
    let retry = next_assignment(&mut second);
    assert_eq!((retry.job_id.as_str(), retry.attempt), (a.job_id.as_str(), 2));
    assert!(farm.job_result("arm-a", first_session, image(&a, 'a')).unwrap().is_none(), "late result ignored");
    assert!(farm.job_result("arm-b", second_session, image(&retry, 'b')).unwrap().is_some());
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
        farm.schedule().unwrap();
        next_assignment(&mut inbox);
        id
    };
    let (mut farm, _) = farm(dir.path());
    farm.adopt_orphans();
    let job = &farm.build(&build_id).unwrap().record.jobs[0];
    assert!(matches!(job.status, JobStatus::Assigned { .. }), "still leased after the restart");
    // arm-a never comes back: lost, re-queued (attempt 2 of 2), lost again: failed.
    std::thread::sleep(Duration::from_millis(20));
    farm.reap(Duration::from_millis(10)).unwrap();
    let (session, mut inbox) = connect(&mut farm, "arm-b", &["linux/arm64"]);
    farm.schedule().unwrap();
    assert_eq!(next_assignment(&mut inbox).attempt, 2);
    farm.agent_disconnected("arm-b", session);
    std::thread::sleep(Duration::from_millis(20));
    farm.reap(Duration::from_millis(10)).unwrap();
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
        farm.set_cordoned("arm-a", true).unwrap();
        farm.agent_disconnected("arm-a", session);
        let (_, mut inbox) = connect(&mut farm, "arm-a", &["linux/arm64"]);
        assert_eq!(farm.agent_list()[0].state().as_str(), "cordoned", "a reconnect keeps the cordon");
        submit(&mut farm, &["linux/arm64"]);
        farm.schedule().unwrap();
        assert!(
            std::iter::from_fn(|| inbox.try_recv().ok()).all(|m| !matches!(m.unwrap().kind, Some(ToAgent::Assign(_)))),
            "a cordoned agent gets no job"
        );
    }
    let (mut farm, _) = farm(dir.path());
    let (_, _inbox) = connect(&mut farm, "arm-a", &["linux/arm64"]);
    assert_eq!(farm.agent_list()[0].state().as_str(), "cordoned", "a restart keeps the cordon");
    farm.set_cordoned("arm-a", false).unwrap();
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
    farm.schedule().unwrap();
    let a = next_assignment(&mut inbox);
    let line = "x".repeat(braid_shared::limits::LOG_LINE_BYTES);
    let per_message = 64;
    let messages = braid_shared::limits::JOB_LOG_BYTES / (line.len() * per_message) + 2;
    for _ in 0..messages {
        let log =
            proto::JobLog { job_id: a.job_id.clone(), attempt: a.attempt, lines: vec![line.clone(); per_message] };
        farm.job_log("amd", session, log).unwrap();
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
    assert_eq!(notices, ["log of linux/amd64 cut at the limit of 16 MiB per job; later lines are dropped"]);
    // A log line from an agent that holds no lease is dropped.
    let (intruder, _) = connect(&mut farm, "other", &["linux/amd64"]);
    let before = store.events_after(&build_id, 0, 1_000_000).unwrap().len();
    let log = proto::JobLog { job_id: a.job_id.clone(), attempt: a.attempt, lines: vec!["forged".into()] };
    farm.job_log("other", intruder, log).unwrap();
    assert_eq!(store.events_after(&build_id, 0, 1_000_000).unwrap().len(), before);
}

#[test]
fn a_build_keeps_its_state_events_past_the_event_limit() {
    let dir = tempfile::tempdir().unwrap();
    let (mut farm, store) = farm(dir.path());
    farm.max_build_events = 50;
    let (session, mut inbox) = connect(&mut farm, "amd", &["linux/amd64"]);
    let build_id = submit(&mut farm, &["linux/amd64"]);
    farm.schedule().unwrap();
    let a = next_assignment(&mut inbox);
    for _ in 0..5 {
        let log = proto::JobLog { job_id: a.job_id.clone(), attempt: a.attempt, lines: vec!["line".into(); 30] };
        farm.job_log("amd", session, log).unwrap();
    }
    let events = store.events_after(&build_id, 0, 10_000).unwrap();
    assert!(events.len() <= 50, "{} events kept", events.len());
    let notice = events.iter().find_map(|e| match &e.kind {
        Some(proto::build_event::Kind::Notice(n)) => Some(n.text.clone()),
        _ => None,
    });
    assert_eq!(
        notice.as_deref(),
        Some("log of linux/amd64 cut at the limit of 50 events per build; later lines are dropped")
    );
    // State changes still go through after the cut.
    let follow = farm.job_result("amd", session, image(&a, 'a')).unwrap();
    assert!(matches!(follow, Some(FollowUp::Verify { .. })));
    let last = store.events_after(&build_id, 0, 10_000).unwrap().pop().unwrap();
    assert!(matches!(last.kind, Some(proto::build_event::Kind::Job(j)) if j.state == proto::JobState::Pushed as i32));
}

#[test]
fn a_connected_agent_is_replaced_only_by_its_own_or_a_newer_certificate() {
    use crate::enroll::CertStamp;
    let dir = tempfile::tempdir().unwrap();
    let (mut farm, _store) = farm(dir.path());
    let hello = proto::Hello {
        name: "pi-01".into(),
        platforms: vec!["linux/arm64".into()],
        slots: 1,
        backend: "buildah".into(),
        version: "test".into(),
        running: vec![],
        emulated_platforms: vec![],
    };
    let platforms = || vec!["linux/arm64".parse().unwrap()];
    let stamp = |serial: &str, issued_ms| Some(CertStamp { serial: serial.into(), issued_ms });
    let (tx, mut real) = mpsc::unbounded_channel();
    farm.agent_connected(&hello, platforms(), vec![], tx, stamp("aa", 100)).unwrap();
    let build = submit(&mut farm, &["linux/arm64"]);
    farm.schedule().unwrap();
    let assignment = next_assignment(&mut real);

    // Another certificate, not recorded after the real one: refused, and the
    // real session keeps its job.
    for older in [stamp("bb", 50), stamp("cc", 100)] {
        let (tx, _rx) = mpsc::unbounded_channel();
        let e = farm.agent_connected(&hello, platforms(), vec![], tx, older).unwrap_err();
        assert!(matches!(e, crate::error::CoordinatorError::AlreadyExists(_)), "{e}");
    }
    assert!(real.try_recv().is_err(), "the real session was not told to go");
    let job = &farm.build(&build).unwrap().record.jobs[0];
    assert_eq!(job.status, JobStatus::Assigned { agent: "pi-01".into(), lease: assignment.lease_id.clone() });

    // The same certificate (the agent reconnecting) replaces it.
    let (tx, _same) = mpsc::unbounded_channel();
    let running = proto::RunningJob { job_id: assignment.job_id.clone(), attempt: 1, lease_id: assignment.lease_id };
    let again = proto::Hello { running: vec![running], ..hello.clone() };
    farm.agent_connected(&again, platforms(), vec![], tx, stamp("aa", 100)).unwrap();
    assert!(matches!(real.try_recv(), Ok(Err(_))), "the old session was closed");
    // So does a newer one; forgetting the agent re-queues its job.
    let (tx, mut newer) = mpsc::unbounded_channel();
    farm.agent_connected(&again, platforms(), vec![], tx, stamp("dd", 200)).unwrap();
    assert_eq!(farm.forget_agent("pi-01").unwrap(), (true, 1));
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
    farm.schedule().unwrap();
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
    farm.forget_agent("pi-01").unwrap();
    assert_eq!(farm.lease_holder_and_context(&a.job_id, a.attempt, &a.lease_id), None);
}
