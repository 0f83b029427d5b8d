//! The model and the farm as the wire shows them.

use braid_shared::proto;

use crate::farm::{AgentEntry, BuildEntry, Farm};
use crate::model::{BuildRecord, JobRecord, Role, TokenRecord, timestamp};

/// A build as `Get`, `List` and `Cancel` answer it (without its inline Dockerfile).
pub fn build(b: &BuildEntry) -> proto::Build {
    build_as(b, &b.record)
}

/// A build as `record` (its stored record, `journal::Stored`) has it.
pub fn build_as(b: &BuildEntry, r: &BuildRecord) -> proto::Build {
    proto::Build {
        build_id: r.id.clone(),
        state: r.status.to_proto() as i32,
        spec: Some(proto::BuildSpec { dockerfile_inline: Vec::new(), ..b.spec.clone() }),
        jobs: r.jobs.iter().map(JobRecord::to_proto).collect(),
        index_digest: r.index.as_ref().map(|i| i.digest.to_string()).unwrap_or_default(),
        index_size: r.index.as_ref().map(|i| i.size).unwrap_or_default(),
        index_media_type: r.index.as_ref().map(|i| i.media_type.clone()).unwrap_or_default(),
        message: r.message.clone(),
        created: Some(timestamp(r.created_ms)),
        finished: r.finished_ms.map(timestamp),
        merge_started: r.merge_started_ms.map(timestamp),
    }
}

/// An agent as `braid agents` shows it.
pub fn agent_info(farm: &Farm, a: &AgentEntry) -> proto::AgentInfo {
    let mut running_jobs: Vec<String> = a
        .running
        .iter()
        .map(|(build_id, job_id)| {
            let platform = farm.job_platform(build_id, job_id).unwrap_or_default();
            format!("{build_id} {platform}")
        })
        .collect();
    running_jobs.sort();
    proto::AgentInfo {
        name: a.name.clone(),
        platforms: a.platforms.iter().map(ToString::to_string).collect(),
        emulated_platforms: a.emulates.iter().map(ToString::to_string).collect(),
        backend: a.backend.clone(),
        version: a.version.clone(),
        state: a.state().as_str().to_owned(),
        slots: a.slots,
        running: a.running.len() as u32,
        last_heartbeat: Some(timestamp(a.last_seen_ms)),
        running_jobs,
        builder: a.builder.as_ref().map(crate::model::Builder::to_proto),
        health: a.health,
        connected: a.connected,
        session: a.session,
        labels: farm.labels_of(&a.name).into_iter().collect(),
    }
}

pub fn token_info(t: &TokenRecord) -> proto::TokenInfo {
    proto::TokenInfo {
        token_id: t.id.clone(),
        role: Role::parse(&t.role).map_or(proto::Role::Unspecified, Role::to_proto) as i32,
        created: Some(timestamp(t.created_ms)),
        expires: t.expires_ms.map(timestamp),
        single_use: t.single_use,
        used: t.used,
        revoked: t.revoked,
        description: t.description.clone(),
        agent_name: t.agent_name.clone().unwrap_or_default(),
        replace: t.replace,
    }
}
