//! How builds, jobs and events read to a person: the words `braid build`
//! prints while it follows a build and `braid logs|inspect|builds` print.

use braid_shared::proto::{self, build_event::Kind};

/// A build state as `logs`, `inspect` and `builds` name it.
pub fn build_state_name(state: i32) -> &'static str {
    match proto::BuildState::try_from(state).unwrap_or_default() {
        proto::BuildState::Queued => "queued",
        proto::BuildState::Running => "running",
        proto::BuildState::Merging => "merging",
        proto::BuildState::Succeeded => "succeeded",
        proto::BuildState::Failed => "failed",
        proto::BuildState::Cancelled => "cancelled",
        proto::BuildState::Unspecified => "unknown",
    }
}

/// A job state as every command names it.
pub fn job_word(state: i32) -> &'static str {
    match proto::JobState::try_from(state).unwrap_or_default() {
        proto::JobState::Pending => "pending",
        proto::JobState::Assigned => "assigned",
        proto::JobState::Building => "building",
        proto::JobState::Pushed => "pushed",
        proto::JobState::Verified => "verified",
        proto::JobState::Failed => "failed",
        proto::JobState::Cancelled => "cancelled",
        proto::JobState::Unspecified => "unknown",
    }
}

/// How long a finished job took; 0 until it has started and finished.
pub fn seconds(job: &proto::Job) -> f64 {
    match (&job.started, &job.finished) {
        (Some(s), Some(f)) => (f.seconds - s.seconds) as f64 + f64::from(f.nanos - s.nanos) / 1e9,
        _ => 0.0,
    }
}

/// One event as a line of `braid build`'s and `braid logs`' output; none
/// for an event of an unknown kind.
pub fn event_line(e: &proto::BuildEvent) -> Option<String> {
    Some(match &e.kind {
        Some(Kind::Log(l)) => format!("[{}] {}", l.platform, l.line),
        Some(Kind::Notice(n)) => format!("#  {}", n.text),
        Some(Kind::Job(j)) => {
            let mut line = format!("#  {} {}", j.platform, job_word(j.state));
            if !j.agent.is_empty() {
                line.push_str(&format!(" on {}", j.agent));
            }
            if j.attempt > 1 {
                line.push_str(&format!(" (attempt {})", j.attempt));
            }
            if !j.message.is_empty() {
                line.push_str(&format!(": {}", j.message));
            }
            line
        }
        Some(Kind::Build(b)) => format!("#  build {}", build_state_name(b.state)),
        None => return None,
    })
}
