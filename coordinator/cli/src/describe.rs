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
/// for an event of an unknown kind. `detail`: a failed job's message and
/// Dockerfile excerpt too (`braid logs`); `braid build` says them once, at
/// the end, with the build's error.
pub fn event_line(e: &proto::BuildEvent, detail: bool) -> Option<String> {
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
            let failed = j.state == proto::JobState::Failed as i32;
            if !j.message.is_empty() && (detail || !failed) {
                line.push_str(&format!(": {}", j.message));
            }
            if detail && let Some(step) = &j.failed_step {
                for l in excerpt(step) {
                    line.push('\n');
                    line.push_str(&l);
                }
            }
            line
        }
        Some(Kind::Build(b)) => format!("#  build {}", build_state_name(b.state)),
        None => return None,
    })
}

/// A failed step's Dockerfile lines as BuildKit prints them
/// (`Dockerfile:7`, the lines, `>>>` at the step's); none when the agent
/// could not place the step.
pub fn excerpt(f: &proto::FailedStep) -> Vec<String> {
    if f.line == 0 || f.lines.is_empty() {
        return Vec::new();
    }
    let excerpt = braid_shared::instructions::Excerpt {
        line: f.line,
        end_line: f.end_line,
        first_line: f.first_line,
        lines: f.lines.clone(),
    };
    excerpt.render(&f.dockerfile)
}
