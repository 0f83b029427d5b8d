//! Placement in the farm: requirements refused at submit, a job that ran
//! out of memory retried once on a larger agent, footprints learned.

use braid_shared::Platform;
use braid_shared::placement;
use braid_shared::proto;

use super::{World, farm, hello, image, next_assignment};
use crate::model::Declared;
use crate::store::Write;

fn connect_labelled(w: &mut World, name: &str, memory: &str) -> (u64, super::Inbox) {
    let mut h = hello(name, &["linux/arm/v7"]);
    h.labels = [("memory".to_owned(), memory.to_owned())].into_iter().collect();
    w.connect_with(&h, None).unwrap()
}

fn submit_tagged(w: &mut World, requirements: &[&str]) -> String {
    let spec = proto::BuildSpec {
        platforms: vec!["linux/arm/v7".into()],
        tags: vec!["127.0.0.1:5000/app:1".into()],
        context_digest: format!("sha256:{}", "0".repeat(64)),
        push: true,
        requirements: requirements.iter().map(|r| r.to_string()).collect(),
        ..Default::default()
    };
    let v = crate::validate::spec(spec).unwrap();
    let new = w.farm.new_build(v.spec, v.platforms, v.tags, None, vec![], vec![]);
    let (record, spec, first) = new.parts();
    w.store.write(&[Write::Insert(record, spec), Write::Events(std::slice::from_ref(first))]).unwrap();
    let (id, effects) = w.farm.admit(new);
    w.run(effects);
    id
}

fn oom(a: &proto::Assignment, peak: u64) -> proto::JobResult {
    proto::JobResult {
        outcome: Some(proto::job_result::Outcome::Failure(proto::JobFailure {
            kind: proto::FailureKind::Build as i32,
            message: "builder exited with signal 9".into(),
            ..Default::default()
        })),
        footprint: Some(proto::JobFootprint { peak_memory_bytes: peak, out_of_memory: true, ..Default::default() }),
        ..image(a, 'a')
    }
}

#[test]
fn unmet_requirements_name_the_requirement_and_each_agents_value() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, _store) = farm(dir.path());
    let declare = |mem: &str| Declared {
        platforms: vec!["linux/arm/v7".parse().unwrap()],
        emulates: vec![],
        last_seen_ms: 0,
        labels: [("memory".to_owned(), mem.to_owned()), ("disk".to_owned(), "ssd".to_owned())].into_iter().collect(),
    };
    w.farm.restore_declared(vec![("pi-01".into(), declare("1GiB")), ("pi-02".into(), declare("2048MiB"))]);
    let p: Vec<Platform> = vec!["linux/arm/v7".parse().unwrap(), "linux/amd64".parse().unwrap()];
    let reqs =
        |r: &[&str]| placement::check_requirements(&r.iter().map(|s| s.to_string()).collect::<Vec<_>>(), &p).unwrap();
    assert_eq!(
        w.farm.unmet_requirements(&p, false, &reqs(&["memory>=4GiB"])).unwrap(),
        "linux/arm/v7: memory>=4GiB: agents pi-01 has 1.0 GiB, pi-02 has 2.0 GiB"
    );
    assert_eq!(w.farm.unmet_requirements(&p, false, &reqs(&["memory>=2GiB", "disk=ssd"])), None);
    let e = w.farm.unmet_requirements(&p, false, &reqs(&["linux/arm/v7:disk=hdd"])).unwrap();
    assert_eq!(e, "linux/arm/v7: disk=hdd: agents pi-01 has disk ssd, pi-02 has disk ssd");
    // amd64 has no known agent: it waits, as before.
    assert_eq!(w.farm.unmet_requirements(&p[1..], false, &reqs(&["memory>=64GiB"])), None);
}

#[test]
fn out_of_memory_retries_on_a_larger_agent_and_the_footprint_steers_the_next_build() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, store) = farm(dir.path());
    let (small_session, mut small) = connect_labelled(&mut w, "a-small", "1GiB");
    let (big_session, mut big) = connect_labelled(&mut w, "b-big", "4GiB");
    let first = submit_tagged(&mut w, &[]);
    w.schedule();
    let a = next_assignment(&mut small);
    w.job_result("a-small", small_session, oom(&a, 1_052_266_987));
    let job = &w.build(&first).unwrap().record.jobs[0];
    assert_eq!(
        job.message,
        "linux/arm/v7: out of memory on a-small (1.0 GiB, peak 0.98 GiB); a larger agent may take it; re-queued"
    );
    w.schedule();
    let b = next_assignment(&mut big);
    assert_eq!(b.attempt, 2);
    let mut done = image(&b, 'a');
    done.footprint = Some(proto::JobFootprint { peak_memory_bytes: 3 << 29, cpu_millis: 1200, ..Default::default() });
    w.job_result("b-big", big_session, done);
    let f = w.build(&first).unwrap().record.jobs[0].footprint.clone().unwrap();
    assert_eq!((f.peak_memory_bytes, f.cpu_millis, f.agent.as_str()), (3 << 29, 1200, "b-big"));
    assert_eq!(store.footprints().unwrap()[0].0, "127.0.0.1:5000/app|linux/arm/v7");

    // The next build prefers the agent whose memory covers 1.5 GiB + 25%,
    // though the small one comes first by name.
    let second = submit_tagged(&mut w, &[]);
    w.schedule();
    let c = next_assignment(&mut big);
    assert_eq!(w.build(&second).unwrap().record.jobs[0].id, c.job_id);
    // Out of memory where no agent is larger: failed, with the hint.
    w.job_result("b-big", big_session, oom(&c, 4 << 30));
    let b2 = w.build(&second).unwrap();
    assert!(
        b2.record.message.contains(
            "linux/arm/v7: out of memory on b-big (4.0 GiB, peak 4.0 GiB); no larger agent of linux/arm/v7 is known: \
             add --require linux/arm/v7:memory>=8GiB"
        ),
        "{}",
        b2.record.message
    );
}

#[test]
fn free_memory_is_the_label_or_the_hosts_available_memory_when_less() {
    use crate::farm::placement_free_memory as free;
    let labels: placement::Labels = [("memory".to_owned(), "2GiB".to_owned())].into_iter().collect();
    let labels = crate::farm::placement_memory_of(&labels);
    let health = |m: u64| proto::AgentHealth { memory_available_bytes: m, ..Default::default() };
    assert_eq!(free(labels, None), 2 << 30);
    assert_eq!(free(labels, Some(&health(1 << 30))), 1 << 30);
    assert_eq!(free(labels, Some(&health(8 << 30))), 2 << 30);
    assert_eq!(free(None, Some(&health(3 << 30))), 3 << 30);
    assert_eq!(free(None, Some(&health(0))), 0);
}
