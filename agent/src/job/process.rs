//! Running a builder process: its own process group, its output streamed
//! as the job's log, the whole group killed on cancel.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::BufReader;
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use braid_shared::steps::{self, Epilogue, Step, Tracker};
use braid_shared::{limits, proto};

use super::JobEnv;
use crate::jobdir::JobDir;
use crate::joblog::{self, JobLog};

pub(super) enum RunError {
    /// It ran and failed: its error message (or its last lines), and the
    /// step it was at, if it printed steps.
    Exit(String, Option<Step>),
    Spawn(std::io::Error),
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::Exit(tail, _) => f.write_str(tail),
            RunError::Spawn(e) => write!(f, "{e}"),
        }
    }
}

/// Lines kept for a failure message.
const TAIL_LINES: usize = 12;

/// Runs a builder command in its own process group, streaming its output
/// as log lines; cancellation kills the whole group. The job directory
/// outlives the group: its output readers hold it until every process
/// that could write there has closed its output.
pub(super) async fn run_logged(
    env: &JobEnv,
    a: &proto::Assignment,
    cmd: Command,
    job_dir: &JobDir,
    cancel: &CancellationToken,
) -> Result<(), RunError> {
    run_logged_watching(env, a, cmd, job_dir, cancel, &mut |_| {}).await
}

/// `run_logged`, with `watch` shown each line of output as it is logged.
pub(super) async fn run_logged_watching(
    env: &JobEnv,
    a: &proto::Assignment,
    mut cmd: Command,
    job_dir: &JobDir,
    cancel: &CancellationToken,
    watch: &mut (dyn FnMut(&str) + Send),
) -> Result<(), RunError> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0).kill_on_drop(true);
    let mut child = cmd.spawn().map_err(RunError::Spawn)?;
    let pgid = child.id();
    // Into the job's cgroup before it starts RUN steps (they inherit it).
    let _ = super::joblimits::CGROUP.try_with(|c| {
        if let (Some(c), Some(pid)) = (c, pgid) {
            c.add(pid);
        }
    });
    let guard = KillGroupOnDrop(pgid);
    let mut log = JobLog::new(a, env.outbox.clone(), env.log_budget.clone());
    let (line_tx, mut line_rx) = mpsc::channel::<String>(joblog::CHANNEL_LINES);
    for reader in [
        child.stdout.take().map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        child.stderr.take().map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = line_tx.clone();
        let keep = job_dir.clone();
        let shared = log.shared();
        tokio::spawn(async move {
            // Reads to the end even when no one listens any more (the job
            // was cancelled), so the directory lives as long as the group.
            joblog::read_lines(BufReader::new(reader), tx, shared).await;
            drop(keep);
        });
    }
    drop(line_tx);
    let mut tail: std::collections::VecDeque<String> = std::collections::VecDeque::with_capacity(TAIL_LINES);
    let mut tracker = Tracker::default();
    let mut epilogue = Epilogue::default();
    let mut logged: Vec<String> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            line = line_rx.recv() => match line {
                Some(line) => {
                    watch(&line);
                    tracker.observe(&line);
                    let line = braid_shared::shorten(&line, limits::LOG_LINE_BYTES);
                    if tail.len() == TAIL_LINES { tail.pop_front(); }
                    tail.push_back(line.clone());
                    // buildah's noise: a warning about the automatic ARGs
                    // it sets itself, a line it prints twice.
                    let Some(line) = steps::without_automatic_args(&line) else { continue };
                    if steps::is_repeated_exit_line(&line, &logged) { continue; }
                    for line in epilogue.offer(line) {
                        if logged.len() == 3 { logged.remove(0); }
                        logged.push(line.clone());
                        log.push(line);
                    }
                }
                None => break,
            },
            _ = tick.tick() => log.flush(),
            () = cancel.cancelled() => break,
        }
    }
    let status = tokio::select! {
        status = child.wait() => status,
        () = cancel.cancelled() => {
            log.finish();
            drop(guard);
            return Err(RunError::Exit("cancelled".into(), None));
        }
    };
    let status = match status {
        Ok(status) => status,
        Err(e) => {
            log.finish();
            return Err(RunError::Spawn(e));
        }
    };
    for line in epilogue.finish(!status.success()) {
        log.push(line);
    }
    log.finish();
    std::mem::forget(guard);
    if status.success() {
        return Ok(());
    }
    Err(RunError::Exit(failure_summary(&tail, status, &tracker), tracker.failed_step().cloned()))
}

/// The builder's own error line if it printed one (buildah's `Error: `,
/// BuildKit's `#N ERROR: `), else its last lines.
fn failure_summary(
    tail: &std::collections::VecDeque<String>,
    status: std::process::ExitStatus,
    tracker: &Tracker,
) -> String {
    if let Some(err) = tail.iter().rev().find(|l| l.starts_with("Error: ")) {
        return err.trim_start_matches("Error: ").to_owned();
    }
    if let Some(err) = tracker.error_message() {
        return err.to_owned();
    }
    let lines: Vec<&str> = tail.iter().map(String::as_str).collect();
    format!("builder exited with {status}: {}", lines.join(" | "))
}

/// Kills a builder's whole process group when its job is dropped (cancelled).
struct KillGroupOnDrop(Option<u32>);

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0.and_then(|p| i32::try_from(p).ok()) {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}
